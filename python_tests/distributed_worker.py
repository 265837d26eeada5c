"""One rank of the data-parallel checks in test_distributed.py, started by torchrun:

    python -m torch.distributed.run --standalone --nproc-per-node 2 python_tests/distributed_worker.py SPEC OUT

SPEC is a JSON file: {"corpus": ..., "settings": {TrainConfig fields}, "full": folder, "stop": folder,
"stop_at": step, "resume": folder}. Each rank writes OUT/rank<r>.pt with what it saw: its sampler slices,
its evaluator statistics, and after each training run its own copy of the mixer, sampler, model and history
(taken from the Run object, which is never written by ranks other than 0), so the test can compare the ranks
with each other and with a single process.
"""
import contextlib
import json
import os
import sys

import torch

from aioli_ext import distributed
from aioli_ext.mixing import GroupEvaluator
from aioli_ext.sampler import MixtureSampler
from aioli_ext.train import RunError, TrainConfig, train
from aioli_ext.train import loop

SAMPLER_SIZES = [5, 40, 0, 23]
SAMPLER_BATCH = 12
# Proportions change between draws, as a mixer changes them between steps.
SAMPLER_PROPORTIONS = [[0.5, 0.3, 0.0, 0.2], [0.1, 0.1, 0.0, 0.8], [0.25, 0.25, 0.0, 0.5]] * 3


def sampler_draws(rank, world_size, mode):
    """Every slice this rank draws, and the sampler state after the draws."""
    sampler = MixtureSampler(SAMPLER_SIZES, seed=11, mode=mode, rank=rank, world_size=world_size)
    draws = [sampler.sample(SAMPLER_BATCH, p) for p in SAMPLER_PROPORTIONS]
    return {"ids": [d[0] for d in draws], "groups": [d[1] for d in draws], "state": sampler.state_dict()}


def evaluation_set():
    """7 sequences (an uneven split over 2 ranks) in 3 groups, with some ignored targets."""
    generator = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 257, (7, 10), generator=generator)
    targets = tokens[:, 1:].clone()
    targets[2, :4] = -100
    group_ids = torch.tensor([0, 2, 1, 0, 2, 2, 1])
    return tokens[:, :-1].contiguous(), targets, group_ids


def evaluation_model():
    from aioli_ext.model import GPT, GPTConfig
    model = GPT(GPTConfig(vocab_size=257, context_length=9, d_model=16, n_layers=1, n_heads=2), seed=3)
    return lambda inputs: (model(inputs), model.lm_head.weight)


def evaluator_statistics():
    scorer = GroupEvaluator(*evaluation_set(), 3, batch_size=2)
    losses = scorer(evaluation_model())
    return {"losses": losses, "sums": scorer.last_loss_sums, "counts": scorer.last_token_counts}


@contextlib.contextmanager
def recorded_runs():
    """Inside the block, every training Run built is appended to the yielded list (its state is what a rank
    holds); the Run class is restored on exit."""
    runs = []
    build = loop.Run.__init__

    def recording_build(self, *args, **kwargs):
        build(self, *args, **kwargs)
        runs.append(self)

    loop.Run.__init__ = recording_build
    try:
        yield runs
    finally:
        loop.Run.__init__ = build


def snapshot(run):
    """The state of a Run that must not depend on the rank: mixer, sampler, weights, history (but its wall-clock
    time, which each rank measures for itself)."""
    return {"mixer": run.mixer.state_dict(), "sampler": run.sampler.state_dict(),
            "model": {k: v.detach().clone() for k, v in run.model.state_dict().items()},
            "history": {k: v for k, v in run.history.items() if k != "train_seconds"}, "step": run.step}


def main(spec_path, out_dir):
    with open(spec_path) as handle:
        spec = json.load(handle)
    cfg = TrainConfig(**spec["settings"])
    with recorded_runs() as runs, distributed.process_group_from_env("cpu"):
        rank, world_size = distributed.rank(), distributed.world_size()
        seen = {"rank": rank, "world_size": world_size,
                "sampler": {mode: sampler_draws(rank, world_size, mode) for mode in ("systematic", "iid")},
                "evaluator": evaluator_statistics()}
        try:
            train(cfg.replace(batch=world_size * 4 + 1, out=os.path.join(out_dir, f"odd{rank}")))
        except RunError as exc:
            seen["odd_batch_error"] = str(exc)
        # Through JSON, as the result file holds it (torch.__version__ is not a plain string).
        seen["full_result"] = json.loads(json.dumps(train(cfg.replace(out=spec["full"]))))
        seen["full"] = snapshot(runs[-1])
        assert train(cfg.replace(out=spec["stop"]), stop_at_step=spec["stop_at"]) is None
        seen["stop"] = snapshot(runs[-1])
        seen["resume_result"] = json.loads(json.dumps(train(cfg.replace(out=spec["resume"]), resume=True)))
        seen["resume"] = snapshot(runs[-1])
    torch.save(seen, os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(*sys.argv[1:])
