"""Prototype: Aioli whose LearnParams sub-phases are rolled-back probes, to measure before building it in.

`bench/learn_params_noise.py` measured that one round of Aioli's LearnParams (sub-phases in sequence, each on
fresh batches) has a signal-to-noise ratio mostly below 1, and that sub-phases trained from one state on the same
examples raise it 2-5x. This script trains exactly as ``aioli-ext train --method aioli`` does (same model,
initialisation, sampler seed, learning-rate schedule, EG step, un-mixing and normalisation of A), except for
LearnParams: at the start of round r the model and optimizer are copied; for each of ``lp_sweeps`` sweeps,
every group j gets an ``lp_steps``-step probe on the smoothed one-hot q^(j) from that copy, all probes of a
sweep on the same examples (their own sampler, seeded by round and sweep); the drops B are averaged over the
sweeps; the model and optimizer are restored; and all U steps of the round then train on the new mixture. The
probes are extra compute: k·m·s training steps and k·m + 1 evaluations per round.

    python bench/probe_aioli.py --groups code,legal,noise --seed 100 --one-hot 0.4 --out runs/probe/s100

Writes <out>/result.json with the final per-group validation loss (the mixer's 32-window subset, as
``avg_val_ppl`` of a training run) and the mixture of every round. The test split is never read: this is for
choosing, on validation, whether the design is worth building into the mixer.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from learn_params_noise import measure, train_on_mixture, write_val_result  # noqa: E402

from aioli_ext.mixing.lmo import (OBJECTIVES, eg_gradient, exponentiated_gradient_step,  # noqa: E402
                                  normalize_interaction, objective_weights, unmix_smoothing)
from aioli_ext.train.config import TrainConfig  # noqa: E402
from aioli_ext.train.loop import Run  # noqa: E402
from aioli_ext.train.study import TUNED  # noqa: E402


def probe_round(run, evaluate, p, *, round_index, one_hot, lp_steps, lp_sweeps, eta, objective):
    """Probes from ``run``'s state (left unchanged), then the EG step; returns (new p, B, A) float64."""
    base = evaluate()
    # measure() gives replicate r (here: sweep r) its own sampler seeded seed + 1000·(r + 1), shared by the
    # sweep's probes of every group; the seed below makes each round's examples differ from the last's.
    drops = measure(run, [evaluate], one_hot=one_hot, lp_steps=[lp_steps], replicates=lp_sweeps,
                    seed=run.cfg.seed + 100_000 * (round_index + 1))
    measured = drops[:, 0, 0].mean(dim=0)
    interaction = unmix_smoothing(measured, one_hot)
    weights = objective_weights(objective, base)
    new_p = exponentiated_gradient_step(p, eg_gradient(normalize_interaction(interaction), weights), eta)
    return new_p, measured, interaction


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", default="runs/corpus")
    parser.add_argument("--groups", default="code,legal,noise")
    parser.add_argument("--seed", type=int, default=100)
    # Defaults: those of `aioli-ext study`'s three-group setting, so that a run compares with the study's Aioli.
    defaults = TrainConfig(**TUNED["three"])
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--update-steps", type=int, default=defaults.update_steps)
    parser.add_argument("--lp-sweeps", type=int, default=defaults.lp_sweeps)
    parser.add_argument("--lp-steps", type=int, default=defaults.lp_steps)
    parser.add_argument("--one-hot", type=float, default=defaults.one_hot)
    parser.add_argument("--eta", type=float, default=defaults.eta)
    parser.add_argument("--objective", default=defaults.objective, choices=list(OBJECTIVES))
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = TrainConfig(corpus=args.corpus, groups=args.groups.split(","), method="stratified", seed=args.seed,
                      steps=args.steps, out=args.out, progress=False)
    run = Run(cfg)
    evaluate = lambda: run.val_evaluator(run.forward)  # noqa: E731
    m, U = run.num_groups, args.update_steps
    p = torch.full((m,), 1.0 / m, dtype=torch.float64)
    rounds, tick = [], time.perf_counter()
    for r in range(cfg.steps // U):
        run.step = r * U
        p, measured, interaction = probe_round(run, evaluate, p, round_index=r, one_hot=args.one_hot,
                                               lp_steps=args.lp_steps, lp_sweeps=args.lp_sweeps, eta=args.eta,
                                               objective=args.objective)
        rounds.append({"round": r, "proportions": p.tolist(), "measured": measured.tolist(),
                       "interaction": interaction.tolist()})
        train_on_mixture(run, p, r * U, U)
    result = write_val_result(run, args, tick, rounds=rounds)
    print(f"seed {cfg.seed}: avg val PPL {result['avg_val_ppl']:.3f}, final mixture "
          f"{'/'.join(f'{x:.2f}' for x in p.tolist())}, {result['seconds']} s")


if __name__ == "__main__":
    main()
