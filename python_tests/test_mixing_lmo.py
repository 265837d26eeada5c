"""The LMO core and the sample allocation, against small cases computed by hand."""
import math

import pytest
import torch

from aioli_ext.mixing import (eg_gradient, exponentiated_gradient_step, largest_remainder, linear_dynamic_law,
                              mix_with_uniform, normalize_interaction, phase_group_counts, smoothed_one_hot,
                              smoothing_matrix, unmix_smoothing)

F = torch.float64


def test_linear_dynamic_law_by_hand():
    # L' = L - A p: [3 - (0.2*0.25 + 0.1*0.75), 2 - 0.4*0.75]
    result = linear_dynamic_law([3.0, 2.0], [[0.2, 0.1], [0.0, 0.4]], [0.25, 0.75])
    assert result.dtype == F
    assert torch.allclose(result, torch.tensor([2.875, 1.7], dtype=F), rtol=0, atol=1e-15)


def test_eg_gradient_is_column_sums():
    assert torch.equal(eg_gradient([[1.0, 2.0], [3.0, -4.0]]), torch.tensor([4.0, -2.0], dtype=F))


def test_exponentiated_gradient_step_by_hand():
    # p ∝ [0.5 * exp(ln 3 * 1), 0.5 * exp(0)] = [1.5, 0.5] -> [0.75, 0.25]
    result = exponentiated_gradient_step([0.5, 0.5], [1.0, 0.0], math.log(3.0))
    assert torch.allclose(result, torch.tensor([0.75, 0.25], dtype=F), rtol=0, atol=1e-15)
    # Unnormalised input weights are normalised first; a zero weight stays zero.
    result = exponentiated_gradient_step([2.0, 0.0, 2.0], [0.0, 5.0, math.log(2.0)], 1.0)
    assert torch.allclose(result, torch.tensor([1 / 3, 0.0, 2 / 3], dtype=F), rtol=0, atol=1e-15)


def test_exponentiated_gradient_step_does_not_overflow():
    result = exponentiated_gradient_step([0.5, 0.5], [1000.0, 999.0], 10.0)
    expected = 1.0 / (1.0 + math.exp(-10.0))
    assert torch.isfinite(result).all()
    assert result[0].item() == pytest.approx(expected, abs=1e-15)


def test_exponentiated_gradient_step_rejects_bad_eta():
    with pytest.raises(ValueError, match=r"eta must be > 0.0"):
        exponentiated_gradient_step([0.5, 0.5], [1.0, 0.0], 0.0)
    with pytest.raises(ValueError, match=r"eta must be finite"):
        exponentiated_gradient_step([0.5, 0.5], [1.0, 0.0], math.inf)


def test_smoothed_one_hot_and_smoothing_matrix():
    assert torch.equal(smoothed_one_hot(3, 1, 0.6), torch.tensor([0.2, 0.6, 0.2], dtype=F))
    matrix = smoothing_matrix(3, 0.6)
    for group in range(3):
        assert torch.equal(matrix[:, group], smoothed_one_hot(3, group, 0.6))
    assert torch.equal(smoothing_matrix(2, 1.0), torch.eye(2, dtype=F))


@pytest.mark.parametrize("num_groups,one_hot", [(2, 0.5), (4, 0.25), (4, 0.1), (3, 1.5)])
def test_one_hot_outside_range_is_rejected(num_groups, one_hot):
    with pytest.raises(ValueError, match=r"one_hot must be"):
        smoothing_matrix(num_groups, one_hot)


def test_unmix_smoothing_by_hand():
    # A = [[1, 2], [3, 4]], W = [[.75, .25], [.25, .75]]: B = A W = [[1.25, 1.75], [3.25, 3.75]].
    measured = torch.tensor([[1.25, 1.75], [3.25, 3.75]], dtype=F)
    assert torch.allclose(unmix_smoothing(measured, 0.75), torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=F),
                          rtol=0, atol=1e-14)
    # Diagonal variant: A_ii = B_ii / one_hot.
    assert torch.allclose(unmix_smoothing(measured, 0.75, diagonal=True),
                          torch.tensor([[1.25 / 0.75, 0.0], [0.0, 5.0]], dtype=F), rtol=0, atol=1e-14)
    # one_hot = 1: the sub-phases were pure, A = B.
    assert torch.equal(unmix_smoothing(measured, 1.0), measured)


def test_unmix_smoothing_matches_a_general_solve():
    generator = torch.Generator().manual_seed(0)
    interaction = torch.randn(5, 5, generator=generator, dtype=F)
    weights = smoothing_matrix(5, 0.4)
    measured = interaction @ weights
    expected = torch.linalg.solve(weights.T, measured.T).T
    assert torch.allclose(unmix_smoothing(measured, 0.4), expected, rtol=0, atol=1e-12)
    assert torch.allclose(unmix_smoothing(measured, 0.4), interaction, rtol=0, atol=1e-12)


def explicit_sub_phase_matrix(base, one_hot):
    """W written out column by column from its definition: q^(j) = (1 − c)·b + c·e_j, c = (m·one_hot − 1)/(m − 1)."""
    base = torch.as_tensor(base, dtype=F)
    m = base.numel()
    c = (m * one_hot - 1) / (m - 1)
    return torch.stack([(1 - c) * base + c * torch.eye(m, dtype=F)[j] for j in range(m)], dim=1)


@pytest.mark.parametrize("base", [[0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.15, 0.05], [0.0, 0.5, 0.5, 0.0]])
@pytest.mark.parametrize("one_hot", [0.3, 0.6, 1.0])
def test_sub_phases_around_a_base(base, one_hot):
    weights = smoothing_matrix(4, one_hot, base)
    assert torch.allclose(weights, explicit_sub_phase_matrix(base, one_hot), rtol=0, atol=1e-15)
    assert torch.allclose(weights.sum(dim=0), torch.ones(4, dtype=F), rtol=0, atol=1e-15)
    for group in range(4):
        assert torch.equal(smoothed_one_hot(4, group, one_hot, base), weights[:, group])
    # Un-mixing recovers A exactly (to rounding), checked against a general solve of A·W = B.
    interaction = torch.randn(4, 4, generator=torch.Generator().manual_seed(1), dtype=F)
    measured = interaction @ weights
    recovered = unmix_smoothing(measured, one_hot, base=base)
    assert torch.allclose(recovered, torch.linalg.solve(weights.T, measured.T).T, rtol=0, atol=1e-11)
    assert torch.allclose(recovered, interaction, rtol=0, atol=1e-11)
    # Diagonal variant: A_ii = B_ii / W_ii.
    diagonal = torch.diag(torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=F))
    assert torch.allclose(unmix_smoothing(diagonal @ weights, one_hot, base=base, diagonal=True), diagonal,
                          rtol=0, atol=1e-14)


def test_uniform_base_is_the_default():
    uniform = [0.2] * 5
    assert torch.allclose(smoothing_matrix(5, 0.4), explicit_sub_phase_matrix(uniform, 0.4), rtol=0, atol=1e-15)
    assert torch.allclose(smoothing_matrix(5, 0.4, uniform), smoothing_matrix(5, 0.4), rtol=0, atol=1e-15)
    measured = torch.randn(5, 5, generator=torch.Generator().manual_seed(2), dtype=F)
    assert torch.allclose(unmix_smoothing(measured, 0.4, base=uniform), unmix_smoothing(measured, 0.4),
                          rtol=0, atol=1e-13)


@pytest.mark.parametrize("base,message", [
    ([0.5, 0.5], r"base must have shape \(3,\), got \(2,\)"),
    ([0.5, -0.1, 0.6], r"base must be non-negative"),
    ([0.0, 0.0, 0.0], r"base must have a positive sum"),
])
def test_bad_base_is_rejected(base, message):
    with pytest.raises(ValueError, match=message):
        smoothing_matrix(3, 0.6, base)
    with pytest.raises(ValueError, match=message):
        unmix_smoothing(torch.eye(3, dtype=F), 0.6, base=base)


def test_normalize_interaction_by_hand():
    # min -1 -> shift to [[2, 0], [3, 1]], sum 6.
    result = normalize_interaction([[1.0, -1.0], [2.0, 0.0]])
    assert torch.allclose(result, torch.tensor([[2.0, 0.0], [3.0, 1.0]], dtype=F) / 6, rtol=0, atol=1e-16)
    # Non-negative: no shift, only scaling.
    result = normalize_interaction([[1.0, 1.0], [2.0, 0.0]])
    assert torch.allclose(result, torch.tensor([[0.25, 0.25], [0.5, 0.0]], dtype=F), rtol=0, atol=1e-16)
    # All equal (zero sum after the shift, or all zero): no preference, the zero matrix.
    assert torch.equal(normalize_interaction(torch.full((3, 3), -2.0)), torch.zeros(3, 3, dtype=F))
    assert torch.equal(normalize_interaction(torch.zeros(2, 2)), torch.zeros(2, 2, dtype=F))


def test_mix_with_uniform_by_hand():
    assert torch.allclose(mix_with_uniform([1.0, 0.0], 0.1), torch.tensor([0.95, 0.05], dtype=F), rtol=0,
                          atol=1e-15)


def test_bad_matrices_and_vectors_are_rejected():
    with pytest.raises(ValueError, match=r"interaction must be a square matrix"):
        eg_gradient(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"interaction must be finite"):
        normalize_interaction([[1.0, math.nan], [0.0, 1.0]])
    with pytest.raises(ValueError, match=r"proportions must have shape \(2,\)"):
        linear_dynamic_law([1.0, 1.0], torch.eye(2), [1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match=r"proportions must be non-negative"):
        exponentiated_gradient_step([-0.5, 1.5], [0.0, 0.0], 1.0)


def test_largest_remainder_by_hand():
    # quotas 3.5, 2.1, 1.4 -> floors 3, 2, 1, one leftover to the largest remainder (group 0).
    assert largest_remainder([0.5, 0.3, 0.2], 7).tolist() == [4, 2, 1]
    # Equal remainders: the leftover goes to the lower index.
    assert largest_remainder([1.0, 1.0, 1.0], 4).tolist() == [2, 1, 1]
    # A zero-probability group never gets a sample.
    assert largest_remainder([0.0, 1.0, 1.0], 3).tolist() == [0, 2, 1]
    assert largest_remainder([0.2, 0.8], 0).tolist() == [0, 0]


def test_phase_group_counts_realises_the_sub_phase_mixture():
    # 8 groups, one-hot mass 0.5, batch 8, 4 steps: per batch a cold group's share is 0.57 samples, which
    # per-batch rounding cannot represent; over the 32 samples of the sub-phase it is 16/7 = 2.29.
    mixture = smoothed_one_hot(8, 3, 0.5)
    counts = phase_group_counts(mixture, 4, 8)
    assert counts.dtype == torch.int64 and counts.shape == (4, 8)
    assert counts.sum(1).tolist() == [8, 8, 8, 8]
    assert counts.sum(0).tolist() == [3, 3, 2, 16, 2, 2, 2, 2]
    assert counts[:, 3].tolist() == [4, 4, 4, 4]


def test_phase_group_counts_spreads_every_group_evenly():
    # Proven bound for the sorted-position construction: after n samples, group j has n·T_j/N samples to
    # within 0.5 + (m/2)·T_j/N (T_j its phase total, N the phase size).
    generator = torch.Generator().manual_seed(1)
    for trial in range(120):
        m = int(torch.randint(2, 10, (1,), generator=generator))
        steps = int(torch.randint(1, 20, (1,), generator=generator))
        batch = int(torch.randint(1, 33, (1,), generator=generator))
        weights = torch.ones(m, dtype=F) if trial % 4 == 0 else torch.rand(m, generator=generator, dtype=F) ** 3
        weights[int(torch.randint(0, m, (1,), generator=generator))] = 0.0 if trial % 5 == 1 else weights[0]
        counts = phase_group_counts(weights, steps, batch)
        totals = counts.sum(0)
        assert torch.equal(totals, largest_remainder(weights, steps * batch))
        assert bool((counts >= 0).all()) and bool((counts.sum(1) == batch).all())
        assert bool((counts[:, weights == 0] == 0).all())
        size = steps * batch
        seen = torch.arange(1, steps + 1, dtype=F)[:, None] * batch
        deviation = (counts.cumsum(0).to(F) - seen * totals.to(F) / size).abs()
        assert bool((deviation <= 0.5 + m / 2 * totals.to(F) / size + 1e-9).all())
