"""Skill-It, DoReMi and the skills graph, against hand-computed updates."""
import math

import pytest
import torch

from aioli_ext.mixing import DoReMi, SkillIt, skills_graph_from_runs

F = torch.float64


def observe_rounds(mixer, losses_per_round):
    """Observe each round's opening evaluation; return the proportions each round trains on."""
    result = []
    for losses in losses_per_round:
        step = mixer.next_eval_step
        mixer.observe(step, losses)
        result.append(mixer.proportions(step))
    return result


def test_skillit_by_hand():
    # S = [[1, 0.5], [0, 1]], η = ln 2; the gradient of round τ is Σ_i L_i^τ S_ij:
    #   L = [1, 2] -> [1, 2.5]; L = [1, 1] -> [1, 1.5]; L = [3, 0] -> [3, 1.5].
    # window 2: p ∝ 2^[1, 2.5]; 2^[2, 4] = [4, 16]; 2^[4, 3] = [16, 8].
    mixer = SkillIt(2, skills_graph=[[1.0, 0.5], [0.0, 1.0]], update_steps=10, eta=math.log(2.0), window=2)
    rounds = observe_rounds(mixer, [[1.0, 2.0], [1.0, 1.0], [3.0, 0.0]])
    first = torch.tensor([2.0, 2.0 ** 2.5], dtype=F)
    assert torch.allclose(rounds[0], first / first.sum(), rtol=0, atol=1e-15)
    assert torch.allclose(rounds[1], torch.tensor([0.2, 0.8], dtype=F), rtol=0, atol=1e-15)
    assert torch.allclose(rounds[2], torch.tensor([2 / 3, 1 / 3], dtype=F), rtol=0, atol=1e-15)
    assert [phase["start"] for phase in mixer.log.phases] == [0, 10, 20]
    # A^t = diag(L^t)·S is logged.
    assert mixer.log.estimates[2]["interaction"] == [[3.0, 1.5], [0.0, 0.0]]


def test_skillit_without_window_sums_every_round():
    mixer = SkillIt(2, skills_graph=[[1.0, 0.5], [0.0, 1.0]], update_steps=10, eta=math.log(2.0), window=None)
    last = observe_rounds(mixer, [[1.0, 2.0], [1.0, 1.0], [3.0, 0.0]])[-1]
    expected = torch.tensor([2.0 ** 5, 2.0 ** 5.5], dtype=F)
    assert torch.allclose(last, expected / expected.sum(), rtol=0, atol=1e-15)


def test_doremi_by_hand():
    # λ = max(L - L_ref, 0) = [1, 0.5]; μ = ln 2: α' ∝ [0.5·2, 0.5·√2]; α = 0.9·α'/Σ + 0.1/2.
    mixer = DoReMi(2, reference_losses=[2.0, 3.0], update_steps=5, step_size=math.log(2.0), smoothing=0.1)
    first, second = observe_rounds(mixer, [[3.0, 3.5], [1.0, 5.0]])
    share = 2.0 / (2.0 + math.sqrt(2.0))
    expected_first = torch.tensor([0.9 * share + 0.05, 0.9 * (1 - share) + 0.05], dtype=F)
    assert torch.allclose(first, expected_first, rtol=0, atol=1e-15)
    # Second round: λ = [0, 2] (group 0 is below its reference: no push), α' ∝ α·[1, 4].
    stepped = expected_first * torch.tensor([1.0, 4.0], dtype=F)
    expected_second = 0.9 * stepped / stepped.sum() + 0.05
    assert torch.allclose(second, expected_second, rtol=0, atol=1e-15)
    assert torch.allclose(mixer.average_proportions, (expected_first + expected_second) / 2, rtol=0, atol=1e-15)
    assert mixer.log.estimates[1]["interaction"] == [[0.0, 0.0], [0.0, 2.0]]


def test_doremi_weights_never_fall_below_the_smoothing_floor():
    mixer = DoReMi(3, reference_losses=[0.0, 0.0, 0.0], update_steps=1, step_size=5.0, smoothing=0.03)
    for _ in range(20):
        mixer.observe(mixer.next_eval_step, [10.0, 0.0, 0.0])
    assert bool((mixer.proportions(19) >= 0.01 - 1e-15).all())
    assert mixer.proportions(19)[0] > 0.97


def test_skills_graph_from_runs_by_hand():
    # S[i, j] = (L0_i - losses after training on j only, evaluated on i) / L0_i
    graph = skills_graph_from_runs([2.0, 4.0], [[1.0, 4.0], [2.5, 3.0]])
    assert torch.allclose(graph, torch.tensor([[0.5, -0.25], [0.0, 0.25]], dtype=F), rtol=0, atol=1e-16)


@pytest.mark.parametrize("build,error,message", [
    (lambda: SkillIt(2, skills_graph=torch.eye(3), update_steps=5), ValueError,
     r"skills_graph must have shape \(2, 2\), got \(3, 3\)"),
    (lambda: SkillIt(2, skills_graph=torch.eye(2), update_steps=5, window=0), ValueError, r"window must be >= 1"),
    (lambda: SkillIt(2, skills_graph=torch.eye(2), update_steps=5, eta=0), ValueError, r"eta must be > 0.0"),
    (lambda: SkillIt(2, skills_graph=[[1, math.nan], [0, 1]], update_steps=5), ValueError,
     r"skills_graph must be finite"),
    (lambda: DoReMi(2, reference_losses=[1.0], update_steps=5), ValueError,
     r"reference_losses must have shape \(2,\)"),
    (lambda: DoReMi(2, reference_losses=[1.0, 1.0], update_steps=5, step_size=-1.0), ValueError,
     r"step_size must be > 0.0"),
    (lambda: DoReMi(2, reference_losses=[1.0, 1.0], update_steps=5, smoothing=1.5), ValueError,
     r"smoothing must be <= 1.0"),
    (lambda: DoReMi(2, reference_losses=[1.0, 1.0], update_steps=5, rounds=3, total_steps=10), ValueError,
     r"steps do not fit: rounds = 3"),
    (lambda: skills_graph_from_runs([0.0, 1.0], torch.ones(2, 2)), ValueError, r"initial_losses must be > 0"),
    (lambda: skills_graph_from_runs([1.0, 1.0], torch.ones(3, 2)), ValueError,
     r"losses_after must have shape \(2, 2\)"),
])
def test_bad_baseline_settings(build, error, message):
    with pytest.raises(error, match=message):
        build()


def test_round_mixers_stop_asking_at_the_end_of_the_run():
    mixer = DoReMi(2, reference_losses=[1.0, 1.0], update_steps=4, total_steps=10)
    assert mixer.rounds == 3
    observe_rounds(mixer, [[2.0, 2.0]] * 3)
    assert mixer.next_eval_step is None and mixer.phase(9).stop is None
