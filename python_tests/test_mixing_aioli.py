"""Aioli: settings validation, the LearnParams schedule, and each update formula on hand-made observations."""
import math

import pytest
import torch

from aioli_ext.mixing import (Aioli, MixerProtocolError, eg_gradient, exponentiated_gradient_step,
                              largest_remainder, normalize_interaction, objective_weights, smoothed_one_hot,
                              unmix_smoothing)

F = torch.float64


def feed_round(mixer, start_losses, measured):
    """Drive one round whose LearnParams loss drops are exactly ``measured`` (B [m, m], per sweep) and return the
    step at which the round's mixture starts. The round's opening evaluation is ``start_losses``."""
    losses = torch.as_tensor(start_losses, dtype=F)
    step = mixer.next_eval_step
    mixer.observe(step, losses)
    for _ in range(mixer.lp_sweeps * mixer.num_groups):
        phase = mixer.phase(step)
        assert phase.label == "learn_params" and phase.num_steps == mixer.lp_steps
        losses = losses - torch.as_tensor(measured, dtype=F)[:, phase.group]
        step = phase.stop
        assert mixer.wants_eval(step)
        mixer.observe(step, losses)
    return step


# ---- settings --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("settings,message", [
    (dict(update_steps=24, lp_sweeps=2, lp_steps=4), r"LearnParams takes lp_sweeps\*num_groups\*lp_steps = "
                                                     r"2\*3\*4 = 24 steps, which must be fewer than update_steps"),
    (dict(update_steps=100, one_hot=1 / 3), r"one_hot must be in \(1/num_groups, 1\]"),
    (dict(update_steps=100, one_hot=1.01), r"one_hot must be <= 1.0"),
    (dict(update_steps=100, eta=0.0), r"eta must be > 0.0"),
    (dict(update_steps=100, eta=-1.0), r"eta must be > 0.0"),
    (dict(update_steps=100, ema=1.0), r"ema must be < 1.0"),
    (dict(update_steps=100, prior_steps=10), r"prior_steps = 10 needs prior proportions"),
    (dict(update_steps=100, prior=[1.0, -1.0, 1.0]), r"prior must be non-negative"),
    (dict(update_steps=100, prior=[1.0, 1.0]), r"prior must have shape \(3,\)"),
    (dict(update_steps=100, total_steps=99), r"steps do not fit: .* exceeds total_steps = 99"),
    (dict(update_steps=100, rounds=3, total_steps=250), r"steps do not fit: .*rounds\*update_steps.* = 300 exceeds"),
    (dict(update_steps=100, prior=[1, 1, 1], prior_steps=50, total_steps=120), r"steps do not fit"),
    (dict(update_steps=0), r"update_steps must be >= 1"),
    (dict(update_steps=100, objective="ppl"), r"objective must be one of \['loss', 'perplexity'\], got 'ppl'"),
    (dict(update_steps=100, lp_base="current"), r"lp_base must be one of \['uniform', 'mixture'\], got 'current'"),
    (dict(update_steps=100, lp_steps=0), r"lp_steps must be >= 1"),
])
def test_bad_settings_fail_up_front(settings, message):
    with pytest.raises(ValueError, match=message):
        Aioli(3, **settings)


def test_bad_setting_types_and_group_count():
    with pytest.raises(TypeError, match=r"update_steps must be an int"):
        Aioli(3, update_steps=100.0)
    with pytest.raises(TypeError, match=r"normalize_A must be a bool"):
        Aioli(3, update_steps=100, normalize_A=1)
    with pytest.raises(ValueError, match=r"num_groups must be >= 2"):
        Aioli(1, update_steps=100)


def test_for_run_splits_the_steps_after_the_prior():
    mixer = Aioli.for_run(3, total_steps=1050, rounds=4, prior=[2, 1, 1], prior_steps=250, lp_sweeps=2, lp_steps=2)
    assert (mixer.update_steps, mixer.rounds, mixer.prior_steps) == (200, 4, 250)
    with pytest.raises(ValueError, match=r"steps do not fit"):
        Aioli.for_run(3, total_steps=10, rounds=20)


# ---- schedule --------------------------------------------------------------------------------------------------

def test_schedule_of_a_round():
    mixer = Aioli(3, update_steps=20, lp_sweeps=2, lp_steps=2, one_hot=0.6, seed=3)
    assert mixer.next_eval_step == 0 and mixer.wants_eval(0)
    with pytest.raises(MixerProtocolError, match=r"evaluation is due at step 0 and has not been observed"):
        mixer.proportions(0)
    mixer.observe(0, [5.0, 5.0, 5.0])
    hot_groups = []
    for sub_phase in range(6):
        phase = mixer.phase(2 * sub_phase)
        assert (phase.start, phase.stop, phase.label) == (2 * sub_phase, 2 * sub_phase + 2, "learn_params")
        assert torch.equal(mixer.proportions(2 * sub_phase + 1), smoothed_one_hot(3, phase.group, 0.6))
        assert not mixer.wants_eval(2 * sub_phase + 1)
        hot_groups.append(phase.group)
        mixer.observe(phase.stop, [5.0 - 0.1 * (sub_phase + 1)] * 3)
    # Each sweep visits every group once.
    assert sorted(hot_groups[:3]) == [0, 1, 2] and sorted(hot_groups[3:]) == [0, 1, 2]
    phase = mixer.phase(12)
    assert (phase.start, phase.stop, phase.label) == (12, 20, "mix")
    assert mixer.next_eval_step == 20
    # 1 + k·m evaluations per round, the round's closing one being the next round's opening one.
    assert [entry["step"] for entry in mixer.log.evaluations] == [0, 2, 4, 6, 8, 10, 12]


def test_sub_phases_around_the_mixture_follow_it_from_round_to_round():
    # c = (3·0.6 − 1)/2 = 0.4: sub-phase j trains on 0.6·p + 0.4·e_j, p being the round's mixture.
    mixer = Aioli(3, update_steps=20, lp_sweeps=1, lp_steps=2, one_hot=0.6, lp_base="mixture", eta=2.0,
                  prior=[0.6, 0.3, 0.1], prior_steps=4, seed=3)
    for _ in range(3):
        p = mixer.proportions(mixer.next_eval_step - 1)
        start = mixer.next_eval_step
        mixer.observe(start, [5.0, 5.0, 5.0])
        drawn, losses = torch.zeros(3, dtype=F), torch.full((3,), 5.0, dtype=F)
        for sub_phase in range(3):
            phase = mixer.phase(start + 2 * sub_phase)
            assert phase.label == "learn_params"
            expected = 0.6 * p + 0.4 * torch.eye(3, dtype=F)[phase.group]
            assert torch.allclose(mixer.proportions(phase.start), expected, rtol=0, atol=1e-15)
            drawn += mixer.proportions(phase.start) / 3
            drops = torch.tensor([[0.3, 0.1, 0.0], [0.05, 0.2, 0.0], [0.0, 0.1, 0.1]], dtype=F)
            losses = losses - drops[:, phase.group]
            mixer.observe(phase.stop, losses)
        # Averaged over the sweep the sub-phases drew 0.6·p + 0.4/3, not uniform.
        assert torch.allclose(drawn, 0.6 * p + 0.4 / 3, rtol=0, atol=1e-15)
        assert not torch.allclose(mixer.proportions(start + 6), p)  # the EG step moved p for the next round


def test_sweep_orders_are_fresh_every_round_and_reproducible():
    def orders(seed):
        mixer = Aioli(4, update_steps=20, lp_sweeps=1, lp_steps=1, seed=seed)
        result = []
        for _ in range(8):
            feed_round(mixer, [5.0] * 4, torch.eye(4, dtype=F) * 0.1)
            result.append(tuple(entry["group"] for entry in mixer.log.phases if entry["label"] == "learn_params")[-4:])
        return result

    first = orders(7)
    assert first == orders(7)
    # A generator re-seeded every round would repeat round 0's order; 8 rounds of 4! orders all equal would be
    # a (1/24)^7 coincidence.
    assert len(set(first)) > 1
    assert first != orders(8)


def test_losses_must_be_finite_and_of_the_right_length():
    mixer = Aioli(3, update_steps=20, lp_sweeps=1, lp_steps=2)
    with pytest.raises(ValueError, match=r"losses must be finite, got non-finite values at index \[1\]"):
        mixer.observe(0, [1.0, math.nan, 1.0])
    with pytest.raises(ValueError, match=r"losses must be finite, got non-finite values at index \[2\]"):
        mixer.observe(0, torch.tensor([1.0, 1.0, math.inf]))
    with pytest.raises(ValueError, match=r"losses must have shape \(3,\), got \(2,\)"):
        mixer.observe(0, [1.0, 1.0])
    # A rejected observation leaves the mixer where it was.
    assert mixer.wants_eval(0) and mixer.log.evaluations == []
    mixer.observe(0, [1.0, 1.0, 1.0])
    assert mixer.phase(0).label == "learn_params"


# ---- update formulas -------------------------------------------------------------------------------------------

def test_one_round_by_hand():
    # B = [[1.25, 1.75], [3.25, 3.75]] with one-hot 0.75 un-mixes to A = [[1, 2], [3, 4]]; normalised A = A / 10
    # has column sums [0.4, 0.6]; with η = 5 ln 2: p ∝ [0.5·2^2, 0.5·2^3] = [1/3, 2/3].
    mixer = Aioli(2, update_steps=5, lp_sweeps=1, lp_steps=1, one_hot=0.75, eta=5 * math.log(2.0))
    start = feed_round(mixer, [10.0, 10.0], [[1.25, 1.75], [3.25, 3.75]])
    assert start == 2
    assert torch.allclose(mixer.interaction, torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=F), rtol=0, atol=1e-13)
    assert torch.allclose(mixer.proportions(2), torch.tensor([1 / 3, 2 / 3], dtype=F), rtol=0, atol=1e-14)
    estimate = mixer.log.estimates[-1]
    assert torch.allclose(torch.tensor(estimate["normalized"], dtype=F),
                          torch.tensor([[0.1, 0.2], [0.3, 0.4]], dtype=F), rtol=0, atol=1e-14)


def test_measurements_average_over_sweeps():
    # Three sweeps of identical drops: B /= k leaves the per-sweep drop.
    mixer = Aioli(2, update_steps=10, lp_sweeps=3, lp_steps=1, one_hot=1.0, eta=1.0)
    feed_round(mixer, [10.0, 10.0], [[0.5, 0.1], [0.2, 0.3]])
    assert torch.allclose(mixer.interaction, torch.tensor([[0.5, 0.1], [0.2, 0.3]], dtype=F), rtol=0, atol=1e-13)


def around_mixture(measured, one_hot, p, diagonal):
    """A from B = A·W with W's columns (1 − c)·p + c·e_j, solved directly (not with the closed form)."""
    m = p.numel()
    c = (m * one_hot - 1) / (m - 1)
    weights = (1 - c) * p[:, None] + c * torch.eye(m, dtype=F)
    if diagonal:
        return torch.diag(torch.diagonal(measured) / torch.diagonal(weights))
    return torch.linalg.solve(weights.T, measured.T).T


def expected_rounds(measured_rounds, one_hot, eta, *, start, ema=None, diagonal=False, normalize=True,
                    closing_losses=None, lp_base="uniform"):
    """``closing_losses`` (one [m] per round, the losses at the end of LearnParams) switch on the perplexity
    objective: each row i of A is weighed by exp(L_i), scaled to mean 1. ``lp_base="mixture"``: the
    sub-phases perturbed the round's starting p."""
    p, smoothed, result = start.clone(), None, []
    for index, measured in enumerate(measured_rounds):
        if lp_base == "mixture":
            interaction = around_mixture(measured, one_hot, p, diagonal)
        else:
            interaction = unmix_smoothing(measured, one_hot, diagonal=diagonal)
        used = normalize_interaction(interaction) if normalize else interaction
        weights = torch.ones(len(start), dtype=F)
        if closing_losses is not None:
            perplexities = torch.exp(closing_losses[index])
            weights = perplexities / perplexities.mean()
        if ema is None:
            p = exponentiated_gradient_step(p, weights @ used, eta)
        else:
            smoothed = used if smoothed is None else (1 - ema) * used + ema * smoothed
            p = exponentiated_gradient_step(start, weights @ smoothed, eta)
        result.append(p)
    return result


@pytest.mark.parametrize("variant", [dict(), dict(ema=0.3), dict(diagonal=True), dict(normalize_A=False),
                                     dict(prior=[0.6, 0.3, 0.1], prior_steps=7),
                                     dict(prior=[0.6, 0.3, 0.1], prior_steps=7, ema=0.5),
                                     dict(objective="perplexity"), dict(objective="perplexity", ema=0.4),
                                     dict(lp_base="mixture"), dict(lp_base="mixture", diagonal=True),
                                     dict(lp_base="mixture", prior=[0.6, 0.3, 0.1], prior_steps=7),
                                     dict(lp_base="mixture", prior=[0.6, 0.3, 0.1], prior_steps=7, ema=0.5)])
def test_rounds_follow_the_formulas(variant):
    generator = torch.Generator().manual_seed(5)
    measured_rounds = [torch.rand(3, 3, generator=generator, dtype=F) * 0.2 - 0.03 for _ in range(3)]
    mixer = Aioli(3, update_steps=30, lp_sweeps=2, lp_steps=2, one_hot=0.7, eta=0.8, **variant)
    if "prior" in variant:
        phase = mixer.phase(0)
        assert (phase.start, phase.stop, phase.label) == (0, 7, "prior")
        assert torch.allclose(phase.proportions, torch.tensor([0.6, 0.3, 0.1], dtype=F), rtol=0, atol=1e-15)
        assert mixer.next_eval_step == 7
        start = torch.tensor([0.6, 0.3, 0.1], dtype=F)
    else:
        start = torch.full((3,), 1 / 3, dtype=F)
    opening = torch.tensor([3.0, 2.0, 1.5], dtype=F)
    # feed_round runs 2 sweeps of the 3 sub-phases: the round closes at L0 − 2·(row sums of B).
    closing = [opening - 2 * measured.sum(dim=1) for measured in measured_rounds]
    expected = expected_rounds(measured_rounds, 0.7, 0.8, start=start, ema=variant.get("ema"),
                               diagonal=variant.get("diagonal", False), normalize=variant.get("normalize_A", True),
                               closing_losses=closing if variant.get("objective") == "perplexity" else None,
                               lp_base=variant.get("lp_base", "uniform"))
    for measured, p in zip(measured_rounds, expected):
        mix_start = feed_round(mixer, opening, measured)
        assert torch.allclose(mixer.proportions(mix_start), p, rtol=0, atol=1e-14)
        assert mixer.phase(mix_start).stop == mixer.next_eval_step == mix_start - 12 + 30


def test_rounds_limit_keeps_the_last_mixture():
    mixer = Aioli(2, update_steps=10, lp_sweeps=1, lp_steps=1, rounds=2, eta=1.0)
    feed_round(mixer, [5.0, 5.0], [[0.3, 0.1], [0.0, 0.2]])
    start = feed_round(mixer, [5.0, 5.0], [[0.3, 0.1], [0.0, 0.2]])
    assert start == 12 and mixer.next_eval_step is None
    phase = mixer.phase(10_000)
    assert (phase.start, phase.stop, phase.label) == (12, None, "mix")
    assert not mixer.wants_eval(20) and not mixer.wants_eval(10_000)
    with pytest.raises(MixerProtocolError, match=r"no evaluation is due"):
        mixer.observe(20, [1.0, 1.0])


def test_total_steps_sets_the_number_of_whole_rounds():
    mixer = Aioli(2, update_steps=10, lp_sweeps=1, lp_steps=1, total_steps=35)
    assert mixer.rounds == 3


def test_group_counts_realise_each_sub_phase():
    mixer = Aioli(3, update_steps=40, lp_sweeps=1, lp_steps=3, one_hot=0.5)
    mixer.observe(0, [1.0, 1.0, 1.0])
    phase = mixer.phase(0)
    counts = torch.stack([mixer.group_counts(step, 5) for step in range(3)])
    assert counts.sum(1).tolist() == [5, 5, 5]
    # The 15 samples of the sub-phase hold the largest-remainder shares of q: quotas [3.75, 3.75, 7.5] (in some
    # order) -> 3 + 3 + 7 and the two leftovers to the 0.75 remainders: 4, 4 and 7 on the hot group.
    assert torch.equal(counts.sum(0), largest_remainder(phase.proportions, 15))
    assert counts.sum(0)[phase.group] == 7


# ---- objectives ------------------------------------------------------------------------------------------------

def test_eg_gradient_weighs_the_rows_of_A():
    interaction = torch.tensor([[0.5, -0.1, 0.0], [0.2, 0.3, 0.1], [0.0, 0.4, 0.6]], dtype=F)
    weights = torch.tensor([2.0, 0.5, 1.0], dtype=F)
    expected = torch.tensor([2.0 * 0.5 + 0.5 * 0.2, 2.0 * -0.1 + 0.5 * 0.3 + 0.4, 0.5 * 0.1 + 0.6], dtype=F)
    assert torch.allclose(eg_gradient(interaction, weights), expected, rtol=0, atol=1e-15)
    assert torch.equal(eg_gradient(interaction), interaction.sum(dim=0))
    with pytest.raises(ValueError, match=r"weights must be non-negative"):
        eg_gradient(interaction, [1.0, -1.0, 1.0])


def test_perplexity_weights_follow_exp_of_the_losses():
    losses = torch.tensor([1.0, 2.0, 2.8], dtype=F)
    weights = objective_weights("perplexity", losses)
    assert torch.allclose(weights, torch.exp(losses) * 3 / torch.exp(losses).sum(), rtol=1e-14, atol=0)
    assert torch.allclose(weights.mean(), torch.tensor(1.0, dtype=F), rtol=1e-14, atol=0)
    # Huge losses (a diverged group) stay finite: only ratios exp(L_i − L_j) matter.
    huge = objective_weights("perplexity", [1000.0, 999.0])
    assert torch.isfinite(huge).all() and math.isclose(float(huge[0] / huge[1]), math.e, rel_tol=1e-12)
    assert torch.equal(objective_weights("loss", losses), torch.ones(3, dtype=F))
    with pytest.raises(ValueError, match=r"objective must be one of \['loss', 'perplexity'\], got 'nats'"):
        objective_weights("nats", losses)


def test_perplexity_objective_keeps_more_of_a_high_loss_group():
    # Group 1 (loss 2.8, e.g. noise) gains from its own steps and loses a little from group 0's; group 0 (loss 1.0)
    # gains more from its own. Summed losses favour group 0; perplexities, which weigh group 1 by e^1.8 more,
    # favour group 1.
    measured = [[0.30, -0.05], [-0.02, 0.20]]
    mixers = {name: Aioli(2, update_steps=10, lp_sweeps=1, lp_steps=1, one_hot=1.0, eta=1.0, objective=name)
              for name in ("loss", "perplexity")}
    proportions = {}
    for name, mixer in mixers.items():
        start = feed_round(mixer, [1.0 + 0.28, 2.8 + 0.18], measured)
        proportions[name] = mixer.proportions(start)
    assert proportions["loss"][0] > 0.5 > proportions["perplexity"][0]
