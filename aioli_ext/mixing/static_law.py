"""Static mixing: grid search over the simplex and the fitted static law (DML-style, σ = exp).

The static law of AIOLI.md §1 with T = 1: L_i(p) = c_i + b_i·exp(−Σ_j A_ij p_j). Because Σ_j p_j = 1, b_i is
not identifiable apart from A_i: b·exp(−A_i·p) = exp(−(A_i − log b)·p). The fit therefore uses b_i = 1 and
lets A absorb the scale: L_i(p) = c_i + exp(−Σ_j A_ij p_j), m + 1 parameters per group, fitted by
Levenberg–Marquardt in float64 from the final losses of static sweep runs. The law is convex in p, so its
minimum over the simplex is found by projected gradient descent.
"""
import torch

from .checks import FLOAT, as_float_tensor, check_int, to_tensor

_FIT_ITERATIONS = 300
_SOLVE_ITERATIONS = 5000


def simplex_grid(num_groups, resolution):
    """Every mixture whose entries are multiples of 1/resolution: float64 [C(resolution + m − 1, m − 1), m]."""
    num_groups = check_int(num_groups, "num_groups", minimum=1)
    resolution = check_int(resolution, "resolution", minimum=1)

    def compositions(total, parts):
        if parts == 1:
            yield (total,)
            return
        for first in range(total, -1, -1):
            for rest in compositions(total - first, parts - 1):
                yield (first,) + rest

    return torch.tensor(list(compositions(resolution, num_groups)), dtype=FLOAT) / resolution


def _runs(mixtures, losses):
    mixtures_t = to_tensor(mixtures)
    if mixtures_t.dim() != 2:
        raise ValueError(f"mixtures must be [R, m], got shape {tuple(mixtures_t.shape)}")
    runs, m = mixtures_t.shape
    mixtures_t = as_float_tensor(mixtures_t, "mixtures", (runs, m))
    if bool((mixtures_t < 0).any()) or not torch.allclose(mixtures_t.sum(1), torch.ones(runs, dtype=FLOAT),
                                                          atol=1e-6):
        raise ValueError("mixtures must be non-negative rows that sum to 1")
    losses_t = as_float_tensor(losses, "losses", (runs, m))
    return mixtures_t, losses_t


def best_mixture(mixtures, losses):
    """Grid search: the mixture whose run had the lowest average final loss over groups.

    Args:
        mixtures: float [R, m], the static mixture of each run.
        losses: float [R, m], each run's final per-group validation loss.
    Returns:
        (index of the best run, its mixture float64 [m]); ties go to the lower index.
    """
    mixtures, losses = _runs(mixtures, losses)
    index = int(torch.argmin(losses.mean(dim=1)))
    return index, mixtures[index].clone()


def _project_to_simplex(point):
    # Euclidean projection (sort-based): the threshold tau makes max(point - tau, 0) sum to 1.
    ordered = torch.sort(point, descending=True).values
    cumulative = torch.cumsum(ordered, 0) - 1.0
    ranks = torch.arange(1, point.numel() + 1, dtype=point.dtype)
    support = ordered - cumulative / ranks > 0
    last = int(torch.nonzero(support).max())
    tau = cumulative[last] / (last + 1)
    return torch.clamp(point - tau, min=0.0)


class StaticLaw:
    """A fitted static mixing law L_i(p) = c_i + exp(−Σ_j A_ij p_j).

    Attributes:
        offsets: c float64 [m].
        interaction: A float64 [m, m] (row = evaluated group, column = trained group).
    """

    def __init__(self, offsets, interaction):
        offsets = to_tensor(offsets)
        m = offsets.numel()
        self.offsets = as_float_tensor(offsets, "offsets", (m,))
        self.interaction = as_float_tensor(interaction, "interaction", (m, m))

    @property
    def num_groups(self):
        return self.offsets.numel()

    def predict(self, mixtures):
        """Per-group losses for mixtures float [m] or [R, m]: float64 of the same shape."""
        mixtures = torch.as_tensor(mixtures, dtype=FLOAT)
        return self.offsets + torch.exp(-(mixtures @ self.interaction.T))

    @classmethod
    def fit(cls, mixtures, losses):
        """Fit one law per group to static runs.

        Args:
            mixtures: float [R, m], rows on the simplex, spanning R^m; R >= m + 1.
            losses: float [R, m], each run's final per-group loss.
        Returns:
            :class:`StaticLaw`; ``fit_residuals`` (float64 [R, m]) holds prediction − observation.
        """
        mixtures, losses = _runs(mixtures, losses)
        runs, m = mixtures.shape
        if runs < m + 1:
            raise ValueError(f"fitting the static law needs at least num_groups + 1 = {m + 1} runs, got {runs}")
        if int(torch.linalg.matrix_rank(mixtures)) < m:
            raise ValueError("mixtures must span all groups (rank m) for the law to be identifiable")
        offsets = torch.empty(m, dtype=FLOAT)
        interaction = torch.empty(m, m, dtype=FLOAT)
        for group in range(m):
            offsets[group], interaction[group] = _fit_group(mixtures, losses[:, group])
        law = cls(offsets, interaction)
        law.fit_residuals = law.predict(mixtures) - losses
        return law

    def optimal_proportions(self, group_weights=None, *, tolerance=1e-10):
        """argmin over the simplex of Σ_i w_i·L_i(p) (w = 1 by default): float64 [m].

        The objective is convex; projected gradient descent with a backtracking step size runs until the
        iterate moves less than ``tolerance`` or the objective stops decreasing in float64 (near a flat optimum
        the iterate is then determined to about 1e-8).
        """
        m = self.num_groups
        weights = torch.ones(m, dtype=FLOAT) if group_weights is None else \
            as_float_tensor(group_weights, "group_weights", (m,))

        def objective(p):
            return float((weights * self.predict(p)).sum())

        point = torch.full((m,), 1.0 / m, dtype=FLOAT)
        value = objective(point)
        step = 1.0
        for _ in range(_SOLVE_ITERATIONS):
            gradient = -(weights * torch.exp(-(self.interaction @ point))) @ self.interaction
            while True:
                candidate = _project_to_simplex(point - step * gradient)
                candidate_value = objective(candidate)
                change = candidate - point
                # Sufficient decrease for a projected step: f(x+) <= f(x) + g·(x+ − x) + |x+ − x|²/(2t).
                bound = value + float(gradient @ change) + float((change ** 2).sum()) / (2 * step)
                if candidate_value <= bound or step < 1e-12:
                    break
                step *= 0.5
            if not candidate_value < value:
                break
            moved = float(change.abs().max())
            point, value = candidate, candidate_value
            step *= 2.0
            if moved < tolerance:
                break
        return point


def _fit_group(mixtures, targets):
    """Levenberg–Marquardt fit of y ≈ c + exp(−P a) for one group, from several starting offsets."""
    low = float(targets.min())
    span = max(float(targets.max()) - low, 1e-6 * max(abs(low), 1.0))
    best = None
    for gap in (1e-3, 1e-2, 0.1, 0.5, 1.0, 3.0, 10.0):
        offset = low - gap * span
        # Linearised start: log(y − c) = −P a is linear in a for a fixed c.
        start, *_ = torch.linalg.lstsq(mixtures, -torch.log(targets - offset).unsqueeze(1))
        params = torch.cat([torch.tensor([offset], dtype=FLOAT), start.squeeze(1)])
        params, error = _levenberg_marquardt(mixtures, targets, params)
        if best is None or error < best[1]:
            best = (params, error)
    return best[0][0], best[0][1:]


def _levenberg_marquardt(mixtures, targets, params):
    def residuals(theta):
        return theta[0] + torch.exp(-(mixtures @ theta[1:])) - targets

    error = float((residuals(params) ** 2).sum())
    damping = 1e-3
    for _ in range(_FIT_ITERATIONS):
        exps = torch.exp(-(mixtures @ params[1:]))
        jacobian = torch.cat([torch.ones(mixtures.shape[0], 1, dtype=FLOAT), -exps[:, None] * mixtures], dim=1)
        residual = params[0] + exps - targets
        normal = jacobian.T @ jacobian
        rhs = -(jacobian.T @ residual)
        improved = False
        while damping < 1e12:
            system = normal + damping * torch.diag(torch.diagonal(normal).clamp(min=1e-12))
            delta = torch.linalg.solve(system, rhs)
            candidate = params + delta
            candidate_error = float((residuals(candidate) ** 2).sum())
            if candidate_error < error:
                improved = float(delta.abs().max()) > 1e-14 and error - candidate_error > 1e-30
                params, error = candidate, candidate_error
                damping = max(damping / 3.0, 1e-12)
                break
            damping *= 4.0
        if not improved:
            break
    return params, error
