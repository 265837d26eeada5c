"""What arriving late costs a mixer: a run that switches from one static mixture to another at a given step.

An online mixer starts from a mixture (uniform, for Aioli and stratified sampling) and can only move to a
better one after it has measured something, so it trains on the better mixture for part of the run at most.
This script bounds what that costs with an oracle that needs no measurement at all: it trains as
``aioli-ext train`` does (same model, initialisation, sampler seed, learning-rate schedule, ``train_step``) on
mixture p_0 from step 0, on p_1 from step t_1, and so on. Each segment's per-step group counts come from the
mixers' systematic allocation over the whole segment (``train_on_mixture``); the mixers allocate over blocks
of steps, so which sequences fill each step differs from an ``aioli-ext train`` run, and a schedule is to be
compared with this script's own control, not with a training run. ``--schedule 0:uniform`` is the control,
``0:0.45/0.45/0.1`` the static mixture from the start, ``0:uniform,1500:0.45/0.45/0.1`` an oracle that arrives
at the middle of the run.

    python bench/late_switch.py --groups code,legal,noise --seed 100 \
        --schedule 0:uniform,1500:0.45/0.45/0.1 --out runs/late/s100_1500

Writes <out>/result.json with the final per-group validation loss (the mixer's 32-window subset, as
``avg_val_ppl`` of a training run). The test split is never read.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from learn_params_noise import train_on_mixture, write_val_result  # noqa: E402

from aioli_ext.mixing.checks import as_proportions  # noqa: E402
from aioli_ext.train.config import TrainConfig  # noqa: E402
from aioli_ext.train.loop import Run  # noqa: E402


def parse_schedule(text, num_groups, steps):
    """``"0:uniform,1500:0.45/0.45/0.1"`` -> [(0, p_0), (1500, p_1)], p float64 [num_groups] summing to 1.

    The first segment must start at step 0 and the starts must increase and lie below ``steps``."""
    segments = []
    for part in text.split(","):
        start, sep, mixture = part.partition(":")
        if not sep or not start.strip().isdigit():
            raise ValueError(f"schedule: each segment must be 'step:mixture', got {part!r}")
        if mixture == "uniform":
            p = torch.full((num_groups,), 1.0 / num_groups, dtype=torch.float64)
        else:
            values = [float(x) for x in mixture.split("/")]
            if len(values) != num_groups:
                raise ValueError(f"schedule: mixture {mixture!r} must have {num_groups} parts (one per group), "
                                 f"got {len(values)}")
            p = as_proportions(torch.tensor(values, dtype=torch.float64), num_groups)
        segments.append((int(start), p))
    starts = [s for s, _ in segments]
    if starts[0] != 0 or starts != sorted(set(starts)) or starts[-1] >= steps:
        raise ValueError(f"schedule: segment starts must begin at 0, increase, and stay below steps={steps}, "
                         f"got {starts}")
    return segments


def train_schedule(cfg, segments):
    """Trains a fresh ``Run(cfg)`` on ``segments`` ([(start step, p float64 [m])], from ``parse_schedule``)
    until ``cfg.steps``; returns the run (its model as trained)."""
    run = Run(cfg)
    for (start, p), end in zip(segments, [s for s, _ in segments[1:]] + [cfg.steps]):
        train_on_mixture(run, p, start, end - start)
    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", default="runs/corpus")
    parser.add_argument("--groups", default="code,legal,noise")
    parser.add_argument("--seed", type=int, default=100)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--schedule", default="0:uniform",
                        help="step:mixture segments, e.g. 0:uniform,1500:0.45/0.45/0.1")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    groups = args.groups.split(",")
    cfg = TrainConfig(corpus=args.corpus, groups=groups, method="stratified", seed=args.seed,
                      steps=args.steps, out=args.out, progress=False)
    try:
        segments = parse_schedule(args.schedule, len(groups), cfg.steps)
    except ValueError as error:
        parser.error(f"--{error}")
    tick = time.perf_counter()
    run = train_schedule(cfg, segments)
    result = write_val_result(run, args, tick)
    print(f"seed {cfg.seed} schedule {args.schedule}: avg val PPL {result['avg_val_ppl']:.3f} "
          f"({'/'.join(f'{x:.3f}' for x in result['final_val_loss'])}), {result['seconds']} s")


if __name__ == "__main__":
    main()
