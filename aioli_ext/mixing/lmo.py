"""Linear Mixing Optimization (LMO): the K-sized math that every online mixer shares.

Notation (AIOLI.md §1): m groups; proportions p ∈ Δ^m; per-group losses L ∈ R^m; the interaction matrix
A ∈ R^{m×m} with A[i, j] = how much training on group j lowers the loss of group i (row = evaluated,
column = trained). Online methods assume the linear dynamic law L' = L − A p and take exponentiated-gradient
(EG) steps p_j ∝ p_j · exp(η Σ_i A[i, j]).

Every function takes tensors or sequences and returns new float64 CPU tensors: K is small (K×K at most),
and float64 keeps the un-mixing solve and the EG exponent exact enough that the decisions do not depend on
summation order.
"""
import torch

from .checks import FLOAT, as_float_tensor, as_proportions, check_float, check_int, to_tensor


def _square(matrix, name):
    tensor = to_tensor(matrix)
    if tensor.dim() != 2 or tensor.shape[0] != tensor.shape[1]:
        raise ValueError(f"{name} must be a square matrix [m, m], got shape {tuple(tensor.shape)}")
    return as_float_tensor(tensor, name, tuple(tensor.shape))


def _proportions(proportions):
    tensor = to_tensor(proportions)
    if tensor.dim() != 1 or tensor.numel() == 0:
        raise ValueError(f"proportions must be a non-empty vector [m], got shape {tuple(tensor.shape)}")
    return as_proportions(tensor, tensor.numel())


def check_one_hot(one_hot, num_groups, name="one_hot"):
    """Validate the mass on the hot group of a smoothed one-hot mixture: it must lie in (1/m, 1].

    At exactly 1/m every smoothed mixture is uniform, so the columns of A cannot be told apart (the smoothing
    matrix is singular); below 1/m the "hot" group would get less than the others.
    """
    num_groups = check_int(num_groups, "num_groups", minimum=2)
    one_hot = check_float(one_hot, name, high=1.0)
    uniform = 1.0 / num_groups
    if one_hot <= uniform:
        raise ValueError(
            f"{name} must be in (1/num_groups, 1] = ({uniform:.6g}, 1], got {one_hot}: at 1/num_groups every "
            f"smoothed one-hot mixture is uniform and the interaction matrix cannot be recovered")
    return one_hot


def linear_dynamic_law(losses, interaction, proportions):
    """One round of the linear dynamic law: L' = L − A p.

    Args:
        losses: [m] per-group losses L^t.
        interaction: [m, m] A^t (row = evaluated group, column = trained group).
        proportions: [m] mixture p^t (used as given, not renormalised).
    Returns:
        float64 [m] predicted losses L^{t+1}.
    """
    interaction = _square(interaction, "interaction")
    m = interaction.shape[0]
    losses = as_float_tensor(losses, "losses", (m,))
    proportions = as_float_tensor(proportions, "proportions", (m,))
    return losses - interaction @ proportions


def eg_gradient(interaction, weights=None):
    """The EG gradient of the linear dynamic law: column sums Σ_i w_i·A[i, j] (float64 [m]).

    ``weights`` [m] (default: all ones, the objective Σ_i L_i) weigh the groups' losses: for an objective
    Σ_i f(L_i) they are f'(L_i) at the current losses (see :func:`objective_weights`).
    """
    interaction = _square(interaction, "interaction")
    if weights is None:
        return interaction.sum(dim=0)
    weights = as_float_tensor(weights, "weights", (interaction.shape[0],))
    if bool((weights < 0).any()):
        raise ValueError(f"weights must be non-negative, got {weights.tolist()}")
    return weights @ interaction


OBJECTIVES = ("loss", "perplexity")


def objective_weights(objective, losses):
    """Per-group weights of the linearised objective at the current per-group ``losses`` [m].

    ``"loss"``: Σ_i L_i, the objective of the paper (all weights 1). ``"perplexity"``: Σ_i exp(L_i), the
    average per-group perplexity that evaluations report; its gradient weighs group i by exp(L_i), rescaled
    here to mean 1 so that η keeps the scale it has for ``"loss"``. Returns float64 [m].
    """
    losses = torch.as_tensor(losses, dtype=FLOAT).flatten()
    if objective == "loss":
        return torch.ones_like(losses)
    if objective == "perplexity":
        # Subtracting the maximum keeps exp finite for any loss; the rescaling removes the shift.
        scaled = torch.exp(losses - losses.max())
        return scaled * (losses.numel() / scaled.sum())
    raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {objective!r}")


def exponentiated_gradient_step(proportions, gradient, eta):
    """p_j ← p_j · exp(η g_j), renormalised (computed in log space, so large η·g cannot overflow).

    Args:
        proportions: [m] non-negative weights with a positive sum (normalised first). A zero weight stays zero.
        gradient: [m] finite gradient g (column sums of A for the linear dynamic law).
        eta: step size η > 0.
    Returns:
        float64 [m] proportions summing to 1.
    """
    proportions = _proportions(proportions)
    gradient = as_float_tensor(gradient, "gradient", tuple(proportions.shape))
    eta = check_float(eta, "eta", low=0.0, low_open=True)
    logits = torch.log(proportions) + eta * gradient
    logits = logits - logits[proportions > 0].max()
    weights = torch.exp(logits)
    return weights / weights.sum()


LP_BASES = ("uniform", "mixture")


def _sub_phase_parts(num_groups, one_hot, base):
    """(c, offsets): sub-phase j trains on q^(j) = offsets + c·e_j, offsets = (1 − c)·b, float64 [m].

    With the uniform base b = 1/m (the paper) the offsets are (1 − one_hot)/(m − 1) and c = one_hot − offset,
    so ``one_hot`` is the hot group's mass. Any other base b on the simplex keeps the same c = (m·one_hot − 1)/
    (m − 1): the same perturbation, around b instead of around uniform.
    """
    one_hot = check_one_hot(one_hot, num_groups)
    off = (1.0 - one_hot) / (num_groups - 1)
    weight = one_hot - off
    if base is None:
        return weight, torch.full((num_groups,), off, dtype=FLOAT)
    return weight, (1.0 - weight) * as_proportions(base, num_groups, "base")


def smoothed_one_hot(num_groups, group, one_hot, base=None):
    """The LearnParams mixture q^(j) = (1 − c)·b + c·e_j with c = (m·one_hot − 1)/(m − 1).

    ``base`` b (float [m] proportions, default uniform) is the mixture the sub-phase perturbs. With the
    uniform base, q^(j) has ``one_hot`` on ``group`` and (1 − one_hot)/(m − 1) on every other group.
    Returns float64 [m] summing to 1.
    """
    group = check_int(group, "group", minimum=0)
    if group >= num_groups:
        raise ValueError(f"group must be < num_groups = {num_groups}, got {group}")
    weight, mixture = _sub_phase_parts(num_groups, one_hot, base)
    # With the uniform base the hot mass is one_hot itself, not off + (one_hot − off) rounded.
    mixture[group] = one_hot if base is None else mixture[group] + weight
    return mixture


def smoothing_matrix(num_groups, one_hot, base=None):
    """W [m, m] float64 whose column j is q^(j) = (1 − c)·b + c·e_j (see :func:`smoothed_one_hot`).

    LearnParams measures B = A·W (column j of B is the loss drop after training on q^(j)).
    """
    return torch.stack([smoothed_one_hot(num_groups, group, one_hot, base) for group in range(num_groups)], dim=1)


def unmix_smoothing(measured, one_hot, *, base=None, diagonal=False):
    """Recover A from LearnParams' measurement B = A·W (AIOLI.md §2 step 3).

    W = c·I + (1 − c)·b·1ᵀ with 1ᵀb = 1, so W⁻¹ = (I − (1 − c)·b·1ᵀ)/c (Sherman–Morrison) and
    A = (B − (1 − c)·(B·b)·1ᵀ)/c. With the uniform base this is A[i, l] = (B[i, l] − o·Σ_j B[i, j])/(one_hot − o),
    o = (1 − one_hot)/(m − 1). ``one_hot = 1`` gives A = B whatever the base. The diagonal variant keeps only
    A[i, i] = B[i, i] / W[i, i].

    Args:
        measured: B [m, m] (row = evaluated group, column = the hot group of the sub-phase).
        one_hot: in (1/m, 1]; sets c = (m·one_hot − 1)/(m − 1).
        base: the proportions b [m] the sub-phases perturbed (default uniform).
        diagonal: return the diagonal estimate instead of the full solve.
    Returns:
        float64 [m, m] A.
    """
    measured = _square(measured, "measured")
    m = measured.shape[0]
    weight, offsets = _sub_phase_parts(m, one_hot, base)
    if diagonal:
        return torch.diag(torch.diagonal(measured) / torch.diagonal(smoothing_matrix(m, one_hot, base)))
    if base is None:
        # The uniform offsets are equal: one row sum (as the paper writes it) instead of a product.
        shift = offsets[0] * measured.sum(dim=1, keepdim=True)
    else:
        shift = measured @ offsets[:, None]
    return (measured - shift) / weight


def normalize_interaction(interaction):
    """Shift A so that its smallest entry is 0 when it is negative, then scale it to sum to 1.

    An all-equal A (zero sum after the shift) carries no preference between groups: the result is the zero
    matrix, whose EG step leaves p unchanged, instead of a division by zero.

    Returns float64 [m, m].
    """
    interaction = _square(interaction, "interaction")
    smallest = interaction.min()
    if smallest < 0:
        interaction = interaction - smallest
    total = interaction.sum()
    if not total > 0:
        return torch.zeros_like(interaction)
    return interaction / total


def mix_with_uniform(proportions, smoothing):
    """(1 − c)·p + c/m: keeps every group's weight at least c/m (DoReMi's smoothing, c ∈ [0, 1])."""
    smoothing = check_float(smoothing, "smoothing", low=0.0, high=1.0)
    proportions = _proportions(proportions)
    return (1.0 - smoothing) * proportions + smoothing / proportions.numel()
