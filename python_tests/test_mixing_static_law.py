"""Grid search and the fitted static law."""
import math

import pytest
import torch

from aioli_ext.mixing import StaticLaw, best_mixture, simplex_grid

F = torch.float64


def test_simplex_grid():
    grid = simplex_grid(3, 4)
    assert grid.shape == (math.comb(4 + 2, 2), 3)
    assert torch.allclose(grid.sum(1), torch.ones(15, dtype=F), rtol=0, atol=1e-15)
    assert len({tuple(row) for row in grid.tolist()}) == 15
    assert bool(((grid * 4).round() == grid * 4).all())
    assert simplex_grid(1, 5).tolist() == [[1.0]]


def test_best_mixture_picks_the_lowest_average_loss():
    mixtures = [[1.0, 0.0], [0.5, 0.5], [0.0, 1.0]]
    losses = [[3.0, 5.0], [3.5, 4.0], [5.0, 3.4]]
    index, mixture = best_mixture(mixtures, losses)
    assert index == 1 and mixture.tolist() == [0.5, 0.5]
    with pytest.raises(ValueError, match=r"mixtures must be non-negative rows that sum to 1"):
        best_mixture([[0.7, 0.7]], [[1.0, 1.0]])
    with pytest.raises(ValueError, match=r"losses must have shape \(3, 2\)"):
        best_mixture(mixtures, [[1.0, 1.0]])


def true_law():
    offsets = torch.tensor([2.0, 2.5, 1.5], dtype=F)
    # Group i's loss L_i = c_i + b_i·exp(-Σ_j T_ij p_j) with b = [1.5, 2, 0.8]: A_i = T_i - log b_i.
    transfer = torch.tensor([[1.5, 0.3, 0.2], [0.4, 1.2, 0.0], [0.1, 0.6, 2.0]], dtype=F)
    interaction = transfer - torch.log(torch.tensor([1.5, 2.0, 0.8], dtype=F))[:, None]
    return StaticLaw(offsets, interaction)


def test_fit_recovers_an_exact_static_law():
    law = true_law()
    mixtures = simplex_grid(3, 3)
    fitted = StaticLaw.fit(mixtures, law.predict(mixtures))
    assert torch.allclose(fitted.offsets, law.offsets, rtol=0, atol=1e-7)
    assert torch.allclose(fitted.interaction, law.interaction, rtol=0, atol=1e-6)
    held_out = simplex_grid(3, 7)
    assert torch.allclose(fitted.predict(held_out), law.predict(held_out), rtol=0, atol=1e-8)


def test_optimal_proportions_beat_every_grid_point():
    law = true_law()
    best = law.optimal_proportions()
    assert abs(best.sum().item() - 1.0) < 1e-12 and bool((best >= 0).all())
    grid = simplex_grid(3, 60)
    objective = law.predict(grid).sum(1)
    assert law.predict(best).sum().item() <= objective.min().item() + 1e-12
    # The optimum lies within one grid cell of the best grid point.
    assert (grid[int(torch.argmin(objective))] - best).abs().max().item() <= 1 / 60 + 1e-9


def test_fit_needs_enough_spanning_runs():
    with pytest.raises(ValueError, match=r"needs at least num_groups \+ 1 = 4 runs, got 3"):
        StaticLaw.fit(torch.eye(3), torch.ones(3, 3))
    with pytest.raises(ValueError, match=r"mixtures must span all groups"):
        StaticLaw.fit([[0.5, 0.5, 0.0]] * 4, torch.ones(4, 3))


def test_optimal_proportions_of_a_symmetric_law_are_uniform():
    law = StaticLaw([1.0, 1.0, 1.0, 1.0], 2.0 * torch.eye(4, dtype=F))
    assert torch.allclose(law.optimal_proportions(), torch.full((4,), 0.25, dtype=F), rtol=0, atol=1e-8)
