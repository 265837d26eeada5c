"""Pure-torch references of the aioli_ext ops, imported by the tests and the benchmarks alike.

Nothing here touches the compiled extension: these are the independent definitions the kernels are checked
against, plus the code users run today without the extension (the benchmark baselines).
"""
from typing import Optional

import torch
import torch.nn.functional as F


def _expand_group_ids(logits: torch.Tensor, targets: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Group id of every token, the targets' shape (expands per-sequence ids [B] of [B, T, V] logits)."""
    if group_ids.shape == targets.shape:
        return group_ids.long()
    if logits.dim() == 3 and group_ids.shape == targets.shape[:1]:
        return group_ids.long().unsqueeze(1).expand(targets.shape)
    raise ValueError(f"group_ids must have the targets' shape {tuple(targets.shape)} or [B], "
                     f"got {tuple(group_ids.shape)}")


def group_cross_entropy_reference(logits: torch.Tensor, targets: torch.Tensor, group_ids: torch.Tensor,
                                  num_groups: int, *, ignore_index: int = -100,
                                  compute_dtype: torch.dtype = torch.float64):
    """Reference of ``aioli_ext.group_cross_entropy``: (loss, group_sums, token_counts).

    logits [N, V] or [B, T, V] of any float dtype are upcast to ``compute_dtype`` (fp64 by default) and go
    through ``log_softmax``; loss = -log_softmax[target], 0 where ``targets == ignore_index``; group_sums [K]
    in ``compute_dtype``; token_counts [K] int64. Differentiable with respect to logits (plain autograd).
    """
    ids = _expand_group_ids(logits, targets, group_ids).reshape(-1)
    log_probs = torch.log_softmax(logits.to(compute_dtype), dim=-1)
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    picked = log_probs.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    loss = torch.where(valid, -picked, torch.zeros_like(picked))
    group_sums = torch.zeros(num_groups, dtype=compute_dtype, device=logits.device).index_add(
        0, ids, loss.reshape(-1))
    token_counts = torch.zeros(num_groups, dtype=torch.int64, device=logits.device).index_add(
        0, ids, valid.reshape(-1).long())
    return loss, group_sums, token_counts


def group_objective_reference(group_sums: torch.Tensor, token_counts: torch.Tensor,
                              group_weights: Optional[torch.Tensor] = None, normalize: str = "tokens"):
    """The objective of ``aioli_ext.group_cross_entropy_fused`` from group statistics (differentiable in
    group_sums): "tokens" sum_g w_g S_g / sum_g n_g; "groups" sum_g w_g S_g / n_g over non-empty groups;
    "none" sum_g w_g S_g. No token at all gives 0."""
    weights = torch.ones_like(group_sums) if group_weights is None else group_weights.to(group_sums.dtype)
    counts = token_counts.to(group_sums.dtype)
    if normalize == "tokens":
        return (weights * group_sums).sum() / counts.sum().clamp_min(1)
    if normalize == "groups":
        per_group = torch.where(token_counts > 0, group_sums / counts.clamp_min(1), torch.zeros_like(group_sums))
        return (weights * per_group).sum()
    if normalize == "none":
        return (weights * group_sums).sum()
    raise ValueError(f"normalize must be one of 'tokens', 'groups', 'none', got {normalize!r}")


def group_cross_entropy_eager(logits: torch.Tensor, targets: torch.Tensor, group_ids: torch.Tensor,
                              num_groups: int, *, ignore_index: int = -100):
    """What users write today without the extension (the benchmark baseline): ``F.cross_entropy`` with
    ``reduction="none"`` in the logits' dtype, then ``index_add_`` of the losses per group.
    Returns (loss, group_sums, token_counts) like the op, group sums in fp32."""
    vocab = logits.shape[-1]
    ids = _expand_group_ids(logits, targets, group_ids).reshape(-1)
    loss = F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1), reduction="none",
                           ignore_index=ignore_index)
    group_sums = torch.zeros(num_groups, dtype=torch.float32, device=logits.device).index_add_(
        0, ids, loss.float())
    token_counts = torch.zeros(num_groups, dtype=torch.int64, device=logits.device).index_add_(
        0, ids, (targets.reshape(-1) != ignore_index).long())
    return loss.view(targets.shape), group_sums, token_counts


def group_linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                         group_ids: torch.Tensor, num_groups: int, *,
                                         bias: Optional[torch.Tensor] = None, ignore_index: int = -100,
                                         compute_dtype: torch.dtype = torch.float64):
    """Reference of ``aioli_ext.group_linear_cross_entropy``: logits = hidden @ weight.T (+ bias) computed in
    ``compute_dtype`` (fp64 by default) from the given values, then :func:`group_cross_entropy_reference`.
    Differentiable with respect to hidden, weight and bias (plain autograd)."""
    logits = hidden.to(compute_dtype) @ weight.to(compute_dtype).T
    if bias is not None:
        logits = logits + bias.to(compute_dtype)
    return group_cross_entropy_reference(logits, targets, group_ids, num_groups, ignore_index=ignore_index,
                                         compute_dtype=compute_dtype)


def group_linear_cross_entropy_eager(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                     group_ids: torch.Tensor, num_groups: int, *,
                                     bias: Optional[torch.Tensor] = None, ignore_index: int = -100):
    """What users write today (the benchmark baseline): ``hidden @ weight.T`` (+ bias) in the inputs' dtype,
    materialising the [N, V] logits, then :func:`group_cross_entropy_eager` (F.cross_entropy + index_add_)."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return group_cross_entropy_eager(logits, targets, group_ids, num_groups, ignore_index=ignore_index)
