"""bench/learn_params_noise.py, bench/probe_aioli.py and bench/late_switch.py: every repeated LearnParams
sub-phase or probe starts from the same model and optimizer state (a restore that missed the optimizer's
moments would let one sub-phase leak into the next), a horizon continues every probe on the same batches, the
probe round un-mixes what it measured, and a schedule trains each segment on its own mixture."""
import argparse
import json
import math
import os
import sys

import pytest
import torch

from aioli_ext.mixing.allocation import phase_group_counts
from aioli_ext.mixing.lmo import smoothed_one_hot
from aioli_ext.train.loop import Run, train_step
from test_train import corpus, tiny  # noqa: F401  (corpus is a pytest fixture)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import late_switch  # noqa: E402
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


def test_horizon_continues_every_probe_on_the_same_batches(corpus, tmp_path, monkeypatch):
    run = _trained_run(corpus, tmp_path)
    steps = []

    def recording_step(run_, step, counts):
        # The sampler's state as plain values, so that the states of two steps compare with ==.
        state = {k: v.tolist() if torch.is_tensor(v) else v for k, v in run_.sampler.state_dict().items()}
        steps.append((step, counts.tolist(), state))
        return train_step(run_, step, counts)

    monkeypatch.setattr(learn_params_noise, "train_step", recording_step)
    evaluators = [lambda: run.val_evaluator(run.forward)]
    base = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    drops = learn_params_noise.measure(run, evaluators, one_hot=0.6, lp_steps=[2], replicates=1, seed=5,
                                       horizon=3, base=base)
    assert drops.shape == (1, 1, 1, 3, 3)
    per_probe = [steps[5 * j:5 * (j + 1)] for j in range(3)]
    assert len(steps) == 15 and [s for s, _, _ in per_probe[0]] == list(range(run.step, run.step + 5))
    for probe in per_probe[1:]:
        # The sub-phases start from the same sampler state with their own mixtures...
        assert probe[0][2] == per_probe[0][0][2]
        assert [c for _, c, _ in probe[:2]] != [c for _, c, _ in per_probe[0][:2]]
        # ...and every continuation is the same: the base mixture's counts, drawn from one sampler state.
        assert [(c, state) for _, c, state in probe[2:]] == [(c, state) for _, c, state in per_probe[0][2:]]
        assert probe[2][2] != probe[0][2]
    assert [c for _, c, _ in per_probe[0][2:]] == phase_group_counts(base, 3, run.cfg.batch).tolist()
    for bad, rule in [({"horizon": -1}, "horizon must be >= 0"), ({"horizon": 2, "base": [1.0, -1.0, 1.0]},
                                                                  "base must be non-negative")]:
        with pytest.raises(ValueError, match=rule):
            learn_params_noise.measure(run, evaluators, one_hot=0.6, lp_steps=[2], replicates=1, seed=5, **bad)
    # What the continuation trains shows in the drops: without it they differ.
    monkeypatch.setattr(learn_params_noise, "train_step", train_step)
    assert not torch.equal(drops, learn_params_noise.measure(run, evaluators, one_hot=0.6, lp_steps=[2],
                                                             replicates=1, seed=5))


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


def test_schedule_segments_are_parsed_and_refused_with_the_rule():
    segments = late_switch.parse_schedule("0:uniform,5:1/0/3", 3, 10)
    assert [s for s, _ in segments] == [0, 5]
    torch.testing.assert_close(segments[0][1], torch.full((3,), 1 / 3, dtype=torch.float64))
    torch.testing.assert_close(segments[1][1], torch.tensor([0.25, 0.0, 0.75], dtype=torch.float64))
    for text, rule in [("2:uniform", "begin at 0"), ("0:uniform,0:uniform", "increase"),
                       ("0:uniform,10:uniform", "below steps=10"), ("0:0.5/0.5", "must have 3 parts"),
                       ("uniform", "'step:mixture'"), ("0:1/-1/1", "non-negative")]:
        with pytest.raises(ValueError, match=rule):
            late_switch.parse_schedule(text, 3, 10)


def test_schedule_trains_each_segment_on_its_own_mixture(corpus, tmp_path, monkeypatch):
    drawn = []

    def recording_step(run, step, counts):
        per_token, group_ids = train_step(run, step, counts)
        drawn.append((step, torch.bincount(group_ids, minlength=3).tolist()))
        return per_token, group_ids

    monkeypatch.setattr(learn_params_noise, "train_step", recording_step)  # train_on_mixture calls it
    cfg = tiny(corpus, tmp_path, method="stratified", steps=6)
    run = late_switch.train_schedule(cfg, late_switch.parse_schedule("0:0/0/1,2:1/0/0,4:uniform", 3, 6))
    assert [s for s, _ in drawn] == list(range(6))
    assert [c for _, c in drawn[:4]] == [[0, 0, 8]] * 2 + [[8, 0, 0]] * 2
    assert all(sorted(c) == [2, 3, 3] for _, c in drawn[4:])
    # The same schedule again trains the same model: the runs are reproducible.
    again = late_switch.train_schedule(cfg, late_switch.parse_schedule("0:0/0/1,2:1/0/0,4:uniform", 3, 6))
    for key, value in run.model.state_dict().items():
        assert torch.equal(value, again.model.state_dict()[key]), key
    # The result a diagnostic writes: the mixer's validation subset, averaged as perplexities.
    args = argparse.Namespace(out=str(tmp_path / "result"), schedule="0:0/0/1,2:1/0/0,4:uniform")
    result = learn_params_noise.write_val_result(run, args, 0.0, note="x")
    with open(tmp_path / "result" / "result.json") as handle:
        assert json.load(handle) == result
    final = run.val_evaluator(run.forward).tolist()
    assert result["final_val_loss"] == final and result["note"] == "x"
    assert result["avg_val_ppl"] == pytest.approx(sum(math.exp(x) for x in final) / 3)
    assert result["settings"]["schedule"] == args.schedule
