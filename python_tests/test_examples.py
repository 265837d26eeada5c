"""examples/plain_loop.py runs as documented: its batches follow the mixer's per-step counts exactly."""
import importlib.util
import math
import os

import torch

from aioli_ext.mixing import Aioli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_example():
    spec = importlib.util.spec_from_file_location("plain_loop_example", os.path.join(ROOT, "examples", "plain_loop.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plain_loop_example_follows_the_mixer():
    example = _load_example()
    steps, update_steps, batch = 24, 10, 12
    result = example.main(["--method", "aioli", "--steps", str(steps), "--update-steps", str(update_steps),
                           "--batch", str(batch), "--sequences", "64", "--quiet"])
    # An independent replay: a fresh mixer fed the example's evaluations asks for the counts that were drawn.
    replay = Aioli(3, update_steps=update_steps, lp_sweeps=1, lp_steps=2, one_hot=0.75, eta=1.0, total_steps=steps,
                   seed=0)
    evaluations = dict(result["evaluations"])
    for step in range(steps):
        if replay.wants_eval(step):
            replay.observe(step, torch.tensor(evaluations.pop(step), dtype=torch.float64))
        assert torch.equal(result["group_counts"][step], replay.group_counts(step, batch)), step
        assert torch.equal(result["proportions"][step], replay.proportions(step)), step
    assert evaluations == {}
    assert all(math.isfinite(x) for x in result["final_val_loss"])
    # The counting cycle is learnable; 24 steps at lr 3e-3 already lower its loss.
    assert result["final_val_loss"][0] < result["evaluations"][0][1][0] - 0.3


def test_synthetic_groups_have_the_documented_structure():
    cycle, markov, noise = _load_example().synthetic_groups(32, 20, vocab_size=64, seed=1)
    assert cycle.shape == markov.shape == noise.shape == (32, 20)
    assert torch.equal((cycle[:, 1:] - cycle[:, :-1]) % 64, torch.ones(32, 19, dtype=torch.int64))
    steps = (markov[:, 1:] - 5 * markov[:, :-1]) % 64
    assert set(steps.unique().tolist()) == {0, 1, 2, 3}
    assert noise.min() >= 0 and noise.max() < 64
