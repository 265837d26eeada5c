"""Integer sample counts that realise a mixture over a whole phase of steps, not batch by batch.

Rounding p·B per batch (the reference code's way) is wrong for small batches and many groups: with 8 groups,
a one-hot mass of 0.5 and a batch of 8, every cold group's share is 0.57 samples per batch, which per-batch
rounding turns into 0 or 1 for every batch, far from the intended mixture. Here the counts of the whole phase
(num_steps · batch_size samples) are apportioned once, by largest remainder, and then spread evenly over the
phase's steps, so every step has exactly ``batch_size`` samples and the phase as a whole holds the intended
mixture to within one sample per group.
"""
import torch

from .checks import as_proportions, check_int, to_tensor


def largest_remainder(proportions, total):
    """Apportion ``total`` samples to groups in proportion to ``proportions`` (Hamilton's method).

    Each group gets floor(total·p_j) and the leftover samples go to the largest fractional parts (ties to the
    lower group index). A group with p_j = 0 never gets a sample.

    Args:
        proportions: [m] non-negative weights with a positive sum (normalised first).
        total: number of samples, >= 0.
    Returns:
        int64 [m] counts summing to ``total``.
    """
    total = check_int(total, "total", minimum=0)
    tensor = to_tensor(proportions)
    if tensor.dim() != 1:
        raise ValueError(f"proportions must be a vector [m], got shape {tuple(tensor.shape)}")
    proportions = as_proportions(tensor, tensor.numel())
    quotas = proportions * total
    counts = torch.floor(quotas).to(torch.int64)
    leftover = total - int(counts.sum())
    if leftover > 0:
        remainders = quotas - counts.to(quotas.dtype)
        remainders[proportions == 0] = -1.0
        # Stable sort on the negated remainders: equal remainders keep ascending group order.
        order = torch.sort(-remainders, stable=True).indices
        counts[order[:leftover]] += 1
    return counts


def phase_group_counts(proportions, num_steps, batch_size):
    """Per-step group counts for a phase of ``num_steps`` steps of ``batch_size`` samples on one mixture.

    The phase total of group j is the largest-remainder share of num_steps·batch_size. Group j's n-th sample
    is placed at position (n + 1/2)/total_j of the phase; sorting all samples by position (ties to the lower
    group index) and cutting the sequence into consecutive batches spreads each group evenly over the phase.

    Args:
        proportions: [m] mixture of the phase.
        num_steps: steps in the phase, >= 1.
        batch_size: samples per step (the global batch, all micro-batches and ranks together), >= 1.
    Returns:
        int64 [num_steps, m]; every row sums to ``batch_size``, column j sums to the group's phase total.
    """
    num_steps = check_int(num_steps, "num_steps", minimum=1)
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    totals = largest_remainder(proportions, num_steps * batch_size)
    num_groups = totals.numel()
    groups = torch.repeat_interleave(torch.arange(num_groups), totals)
    # Index of each sample inside its group: position in the group-major list minus the group's offset.
    offsets = torch.cumsum(totals, 0) - totals
    within = torch.arange(groups.numel()) - offsets[groups]
    positions = (within.to(torch.float64) + 0.5) / totals[groups].to(torch.float64)
    order = torch.sort(positions, stable=True).indices
    slots = groups[order].view(num_steps, batch_size)
    counts = torch.zeros(num_steps, num_groups, dtype=torch.int64)
    counts.scatter_add_(1, slots, torch.ones_like(slots))
    return counts
