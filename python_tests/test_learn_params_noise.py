"""bench/learn_params_noise.py and bench/probe_aioli.py: every repeated LearnParams sub-phase or probe starts
from the same model and optimizer state (a restore that missed the optimizer's moments would let one
sub-phase leak into the next), and the probe round un-mixes what it measured."""
import os
import sys

import pytest
import torch

from aioli_ext.mixing.lmo import smoothed_one_hot
from aioli_ext.train.loop import Run, train_step
from test_train import corpus, tiny  # noqa: F401  (corpus is a pytest fixture)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import learn_params_noise  # noqa: E402
import probe_aioli  # noqa: E402


def _trained_run(corpus, out):
    run = Run(tiny(corpus, out, method="stratified"))
    for step in range(3):  # the optimizer holds moments and a step count from here on
        train_step(run, step, torch.tensor([3, 3, 2]))
    return run


def test_repeated_sub_phases_start_from_the_same_state(corpus, tmp_path):
    run = _trained_run(corpus, tmp_path)
    weights = {k: v.clone() for k, v in run.model.state_dict().items()}
    moments = [s["exp_avg"].clone() for s in run.optimizer.state.values()]
    evaluators = [lambda: run.val_evaluator(run.forward)]
    first = learn_params_noise.measure(run, evaluators, one_hot=0.6, lp_steps=[1, 3], replicates=2, seed=5)
    second = learn_params_noise.measure(run, evaluators, one_hot=0.6, lp_steps=[1, 3], replicates=2, seed=5)
    assert first.shape == (2, 2, 1, 3, 3)
    assert torch.equal(first, second)
    # Replicates draw different batches, so their drops differ.
    assert not torch.equal(first[0], first[1])
    for key, value in run.model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    for before, state in zip(moments, run.optimizer.state.values()):
        assert torch.equal(before, state["exp_avg"])


def test_repeated_rounds_are_reproducible_and_leave_the_state(corpus, tmp_path):
    run = _trained_run(corpus, tmp_path)
    weights = {k: v.clone() for k, v in run.model.state_dict().items()}
    evaluate = lambda: run.val_evaluator(run.forward)  # noqa: E731
    first = learn_params_noise.measure_rounds(run, evaluate, one_hot=0.6, lp_steps=2, sweeps=2, replicates=2,
                                              seed=3)
    second = learn_params_noise.measure_rounds(run, evaluate, one_hot=0.6, lp_steps=2, sweeps=2, replicates=2,
                                               seed=3)
    assert first.shape == (2, 3, 3)
    assert torch.equal(first, second)
    for key, value in run.model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    # Replicates draw different batches (and sweep orders), so their rounds differ.
    assert not torch.equal(first[0], first[1])
    # Paired sweeps rewind the sampler for every sub-phase: other batches, and just as reproducible.
    paired = [learn_params_noise.measure_rounds(run, evaluate, one_hot=0.6, lp_steps=2, sweeps=2, replicates=2,
                                                seed=3, paired=True) for _ in range(2)]
    assert torch.equal(paired[0], paired[1])
    assert not torch.equal(paired[0], first)


def test_pair_snr_is_mean_over_sd_of_the_difference():
    columns = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 1.0]], dtype=torch.float64)
    (pair,) = learn_params_noise.pair_snr(columns, ["a", "b"])
    diff = torch.tensor([1.0, 3.0, 1.0], dtype=torch.float64)
    assert pair["pair"] == "a-b"
    assert pair["mean"] == pytest.approx(float(diff.mean()))
    assert pair["snr"] == pytest.approx(float(diff.mean() / diff.std()))


def test_probe_round_leaves_training_state_and_moves_the_mixture(corpus, tmp_path):
    run = _trained_run(corpus, tmp_path)
    sampler_state = run.sampler.state_dict()
    sampler = run.sampler
    weights = {k: v.clone() for k, v in run.model.state_dict().items()}
    evaluate = lambda: run.val_evaluator(run.forward)  # noqa: E731
    p = torch.full((3,), 1 / 3, dtype=torch.float64)
    results = [probe_aioli.probe_round(run, evaluate, p, round_index=0, one_hot=0.6, lp_steps=2, lp_sweeps=2,
                                       eta=0.5, objective="loss") for _ in range(2)]
    new_p, measured, interaction = results[0]
    assert torch.equal(new_p, results[1][0]) and torch.equal(measured, results[1][1])
    assert new_p.sum().item() == pytest.approx(1.0) and not torch.equal(new_p, p)
    # B is what the probes measured and A its un-mixing: re-mixing A gives B back.
    q = torch.stack([smoothed_one_hot(3, j, 0.6) for j in range(3)], dim=1)
    torch.testing.assert_close(interaction @ q, measured)
    assert run.sampler is sampler and run.sampler.state_dict().keys() == sampler_state.keys()
    for key, value in run.model.state_dict().items():
        assert torch.equal(value, weights[key]), key
