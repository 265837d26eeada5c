"""How much a LearnParams loss drop tells the mixer: sub-phases repeated from one model state.

Aioli estimates column j of the interaction matrix A from the per-group validation-loss drop over a short
sub-phase trained on the smoothed one-hot mixture q^(j). This script measures how much of that drop is signal.
A stratified run is trained to each step in ``--at``; from that state (model and optimizer restored each time)
one of two designs is repeated ``--replicates`` times, each replicate with its own batches (its own sampler
seed):

  * ``--design probes``: every sub-phase (hot group j, length s in ``--lp-steps``) alone from the state; the
    drop is measured on the mixer's validation subset (``eval_windows`` evenly spaced windows per group, as
    in training) and on a larger one (``--big-windows`` per group), to separate the subset's own noise. The
    sub-phases of one replicate draw the same examples of each group, so column differences are paired.
    ``--horizon h`` follows every sub-phase with h steps on the uniform mixture (the same batches for every
    column) before measuring: what the sub-phase is still worth h steps later.
  * ``--design rounds``: Aioli's own LearnParams round, ``--sweeps`` sweeps over the groups in a random order,
    each sub-phase starting where the previous one ended (with the optimizer's momentum of the earlier ones),
    its drop taken from the previous evaluation; the result is the round's B (drops summed / sweeps).

Reported per (step, s, design): the quantity the EG step acts on, the column sums c_j = Σ_i B[i, j]
(mean ± sd over replicates), and for every pair of columns the mean difference and the signal-to-noise ratio
|mean(c_j − c_k)| / sd(c_j − c_k). Un-mixing B and normalising A change the scale, not this ratio; the EG
step sums one such difference per round, so a per-round SNR r over R rounds gives at best r·sqrt(R).

    python bench/learn_params_noise.py --groups code,legal,noise --one-hot 0.4 --at 500,1500,2500 \
        --lp-steps 2,8,24 --out runs/lp_noise
    python bench/learn_params_noise.py --design rounds --replicates 12 --lp-steps 2,8 --out runs/lp_noise
    python bench/learn_params_noise.py --lp-steps 8 --horizon 100 --out runs/horizon

Writes <out>/lp_noise[_rounds].{json,md}. Each takes 10-15 minutes on one CPU thread.
"""
import argparse
import copy
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from aioli_ext.mixing.allocation import phase_group_counts  # noqa: E402
from aioli_ext.mixing.checks import as_proportions, check_int  # noqa: E402
from aioli_ext.mixing.lmo import smoothed_one_hot  # noqa: E402
from aioli_ext.sampler import MixtureSampler  # noqa: E402
from aioli_ext.train.checkpoint import load_checkpoint  # noqa: E402
from aioli_ext.train.config import TrainConfig  # noqa: E402
from aioli_ext.train.loop import CHECKPOINT, Run, train, train_step  # noqa: E402


def _ints(text):
    return [int(x) for x in text.split(",") if x]


def snapshot(run):
    """Copies of the model's and optimizer's state, and the sampler itself (the measurements swap it)."""
    return {"model": copy.deepcopy(run.model.state_dict()), "optimizer": copy.deepcopy(run.optimizer.state_dict()),
            "sampler": run.sampler}


def restore(run, state):
    """Model, optimizer and sampler back to ``state``. The optimizer gets a copy: ``Optimizer.load_state_dict``
    keeps the given tensors (same dtype and device) as its state, and the next step would update them in place."""
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
    run.sampler = state["sampler"]


def train_on_mixture(run, proportions, start, num_steps):
    """Trains ``run`` for ``num_steps`` steps from step ``start`` on ``proportions`` (float64 [m]), each step's group
    counts from the mixers' systematic allocation over those steps; returns the next step."""
    run.train_model.train()
    counts = phase_group_counts(proportions, num_steps, run.cfg.batch)
    for t in range(num_steps):
        train_step(run, start + t, counts[t])
    return start + num_steps


def fresh_sampler(run, seed):
    """A sampler over ``run``'s training windows with its own ``seed`` (the run's mode)."""
    return MixtureSampler(run.train_windows.num_examples.tolist(), seed=seed, mode=run.cfg.sampler_mode)


def write_val_result(run, args, tick, **extra):
    """Final validation of a diagnostic run (the mixer's subset, as ``avg_val_ppl`` of a training run), written
    with ``args`` and ``extra`` to <args.out>/result.json; returns the result. The test split is never read."""
    final = run.val_evaluator(run.forward).tolist()
    result = {"groups": run.groups, "seed": run.cfg.seed, "settings": vars(args), "final_val_loss": final,
              "avg_val_ppl": sum(math.exp(x) for x in final) / run.num_groups, **extra,
              "seconds": round(time.perf_counter() - tick, 1)}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "result.json"), "w") as handle:
        json.dump(result, handle, indent=1)
    return result


def measure(run, evaluators, *, one_hot, lp_steps, replicates, seed, horizon=0, base=None):
    """Drops [replicate, s index, subset, i, j] (float64) of every repeated sub-phase from ``run``'s state.

    horizon: after the s-step sub-phase, train this many more steps on the mixture ``base`` (float64 [m];
    uniform when None) before measuring, so that the drop says what the sub-phase is still worth later on
    rather than right after it. The continuation draws the same examples for every (s, j) of a replicate, from
    its own sampler, so columns differ only by the sub-phase."""
    state = snapshot(run)
    m = run.num_groups
    start = run.step
    before = [evaluate() for evaluate in evaluators]
    drops = torch.zeros(replicates, len(lp_steps), len(evaluators), m, m, dtype=torch.float64)
    check_int(horizon, "horizon", minimum=0)
    base = torch.full((m,), 1.0 / m, dtype=torch.float64) if base is None else as_proportions(base, m, "base")
    for r in range(replicates):
        for si, s in enumerate(lp_steps):
            for j in range(m):
                restore(run, state)
                # Replicate r draws the same batches for every (s, j): the comparison between columns is paired.
                run.sampler = fresh_sampler(run, seed + 1000 * (r + 1))
                step = train_on_mixture(run, smoothed_one_hot(m, j, one_hot), start, s)
                if horizon:
                    run.sampler = fresh_sampler(run, seed + 1000 * (r + 1) + 500)
                    train_on_mixture(run, base, step, horizon)
                for e, evaluate in enumerate(evaluators):
                    drops[r, si, e, :, j] = before[e] - evaluate()
    restore(run, state)
    return drops


def measure_rounds(run, evaluate, *, one_hot, lp_steps, sweeps, replicates, seed, paired=False):
    """Aioli's own LearnParams, repeated from ``run``'s state: ``sweeps`` sweeps over the groups in a random order,
    each sub-phase ``lp_steps`` steps, its drop measured from the previous evaluation (so a sub-phase starts
    where the last one ended, with the optimizer's momentum of the earlier ones). ``paired``: every sub-phase
    of a sweep draws the same examples of each group (the sampler is rewound to the sweep's start), so the
    columns of one sweep differ by the mixture, not by which examples were drawn. Returns the round's
    B = summed drops / sweeps, float64 [replicate, i, j]."""
    state = snapshot(run)
    m, start = run.num_groups, run.step
    rounds = torch.zeros(replicates, m, m, dtype=torch.float64)
    for r in range(replicates):
        restore(run, state)
        run.sampler = fresh_sampler(run, seed + 1000 * (r + 1))
        orders = torch.Generator().manual_seed(seed + r)
        last, step = evaluate(), start
        for _ in range(sweeps):
            sweep_start = copy.deepcopy(run.sampler.state_dict())
            for j in torch.randperm(m, generator=orders).tolist():
                if paired:
                    run.sampler.load_state_dict(copy.deepcopy(sweep_start))
                step = train_on_mixture(run, smoothed_one_hot(m, j, one_hot), step, lp_steps)
                now = evaluate()
                rounds[r, :, j] += last - now
                last = now
    restore(run, state)
    return rounds / sweeps


def pair_snr(columns, groups):
    """Mean and SNR of c_j − c_k over the first dimension of ``columns`` [R, m]."""
    out = []
    for j in range(len(groups)):
        for k in range(j + 1, len(groups)):
            diff = columns[:, j] - columns[:, k]
            sd = float(diff.std())
            out.append({"pair": f"{groups[j]}-{groups[k]}", "mean": float(diff.mean()), "sd": sd,
                        "snr": abs(float(diff.mean())) / sd if sd > 0 else math.inf})
    return out


def summarise(drops, lp_steps, subsets, groups):
    rows = []
    for si, s in enumerate(lp_steps):
        for e, subset in enumerate(subsets):
            b = drops[:, si, e]                      # [R, i, j]
            columns = b.sum(dim=1)                   # [R, j]
            pairs = pair_snr(columns, groups)
            rows.append({"lp_steps": s, "subset": subset, "mean": b.mean(0).tolist(), "sd": b.std(0).tolist(),
                         "column_mean": columns.mean(0).tolist(), "column_sd": columns.std(0).tolist(),
                         "pairs": pairs})
    return rows


def _table(title, rows, groups):
    lines = [title, "", "| step | s | design | " + " | ".join(f"c_{g}" for g in groups) +
             " | pairs: mean c_j − c_k (SNR) |", "|---|---|---|" + "---|" * len(groups) + "---|"]
    for row in rows:
        cols = " | ".join(f"{mu:+.4f} ± {sd:.4f}" for mu, sd in zip(row["column_mean"], row["column_sd"]))
        pairs = ", ".join(f"{p['pair']} {p['mean']:+.4f} ({p['snr']:.2f})" for p in row["pairs"])
        lines.append(f"| {row['step']} | {row['lp_steps']} | {row['design']} | {cols} | {pairs} |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", default="runs/corpus")
    parser.add_argument("--groups", default="code,legal,noise")
    parser.add_argument("--steps", type=int, default=3000, help="length of the run (sets the lr schedule)")
    parser.add_argument("--at", default="500,1500,2500", help="steps at which to measure")
    parser.add_argument("--lp-steps", default="2,8", help="sub-phase lengths s")
    parser.add_argument("--one-hot", type=float, default=0.4)
    parser.add_argument("--replicates", type=int, default=8)
    parser.add_argument("--horizon", type=int, default=0,
                        help="probes: steps on the uniform mixture after each sub-phase before measuring")
    parser.add_argument("--big-windows", type=int, default=256)
    parser.add_argument("--sweeps", type=int, default=2, help="sweeps per round in the rounds design")
    parser.add_argument("--design", choices=["probes", "rounds"], default="probes",
                        help="probes: every sub-phase from the same state; rounds: Aioli's sequential round")
    parser.add_argument("--seed", type=int, default=100)
    parser.add_argument("--out", default="runs/lp_noise")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    lp_steps, at = _ints(args.lp_steps), sorted(_ints(args.at))
    cfg = TrainConfig(corpus=args.corpus, groups=args.groups.split(","), method="stratified", seed=args.seed,
                      steps=args.steps, out=os.path.join(args.out, "run"), progress=False)
    rows, raw = [], []
    for i, step in enumerate(at):
        train(cfg, resume=i > 0, overwrite=i == 0, stop_at_step=step)
        run = Run(cfg)
        run.load_state_dict(load_checkpoint(os.path.join(cfg.out, CHECKPOINT)), cfg.out)
        small = lambda: run.val_evaluator(run.forward)  # noqa: E731
        with torch.random.fork_rng():
            if args.design == "probes":
                big = run._evaluator(run.val_windows, args.big_windows)
                drops = measure(run, [small, lambda: big(run.forward)], one_hot=args.one_hot, lp_steps=lp_steps,
                                replicates=args.replicates, seed=args.seed, horizon=args.horizon)
                later = f" +{args.horizon} uniform steps" if args.horizon else ""
                subsets = [f"probe{later}, val {cfg.eval_windows}/group", f"probe{later}, val {args.big_windows}/group"]
                found = summarise(drops, lp_steps, subsets, run.groups)
            else:
                drops, found = [], []
                for s, paired in [(s, paired) for s in lp_steps for paired in (False, True)]:
                    b = measure_rounds(run, small, one_hot=args.one_hot, lp_steps=s, sweeps=args.sweeps,
                                       replicates=args.replicates, seed=args.seed, paired=paired)
                    columns = b.sum(dim=1)
                    found.append({"lp_steps": s, "subset": f"round of {args.sweeps} {'paired ' if paired else ''}"
                                  f"sweeps, val {cfg.eval_windows}/group", "mean": b.mean(0).tolist(),
                                  "sd": b.std(0).tolist(),
                                  "column_mean": columns.mean(0).tolist(), "column_sd": columns.std(0).tolist(),
                                  "pairs": pair_snr(columns, run.groups)})
                    drops.append(b.tolist())
        for row in found:
            row["step"], row["design"] = step, row.pop("subset")
        rows += found
        raw.append({"step": step, "drops": drops.tolist() if torch.is_tensor(drops) else drops})
        print(f"step {step} measured", flush=True)
    report = {"groups": run.groups, "one_hot": args.one_hot, "replicates": args.replicates, "seed": args.seed,
              "design": args.design, "settings": cfg.numeric_settings(), "rows": rows, "raw": raw}
    name = "lp_noise" if args.design == "probes" else "lp_noise_rounds"
    with open(os.path.join(args.out, f"{name}.json"), "w") as handle:
        json.dump(report, handle, indent=1)
    what = ("one sub-phase; pairs share their batches" if args.design == "probes"
            else f"one round's B (drops summed over {args.sweeps} sweeps / {args.sweeps}); pairs from one round")
    title = (f"# LearnParams loss drops repeated from one state ({', '.join(run.groups)}; one_hot {args.one_hot}; "
             f"{args.replicates} replicates; seed {args.seed}; design {args.design})\n\n"
             f"Column sums c_j = Σ_i B[i, j] (the EG gradient before normalisation), mean ± sd over replicates; "
             f"pair SNR = |mean(c_j − c_k)| / sd(c_j − c_k) for {what}.")
    lines = _table(title, rows, run.groups)
    with open(os.path.join(args.out, f"{name}.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
