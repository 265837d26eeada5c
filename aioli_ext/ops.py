"""Typed wrappers over torch.ops.aioli_ext: the only module that touches the compiled operators.

Each op has a fake (meta) kernel registered here so torch.compile can trace it, and differentiable ops
have their autograd formula registered through torch.library.
"""
from typing import NamedTuple, Optional, Tuple

import torch
import torch.utils._python_dispatch

from . import _extension  # noqa: F401  (loads the compiled library and registers the schemas)
from . import gradient_prediction
from .gradient_prediction import GradientScalePredictionInfo, gradient_scale_prediction  # noqa: F401  (API)

_ops = torch.ops.aioli_ext


def cpu_capability(force: Optional[str] = None) -> str:
    """Return the ISA the CPU kernels dispatch to ("default", "avx2" or "avx512").

    ``force=None`` only asks. A name pins that ISA (it must be supported by this CPU) for the whole process,
    e.g. to test each vectorised path; ``force=""`` returns to the detected best. The environment variable
    AIOLI_EXT_CPU_CAPABILITY caps the detected value.
    """
    return _ops.cpu_capability(force)


# ---------------------------------------------------------------------------------------------------------------
# Group cross-entropy
# ---------------------------------------------------------------------------------------------------------------

_NORMALIZE_MODES = ("tokens", "groups", "none")


class GroupCrossEntropyResult(NamedTuple):
    """What :func:`group_cross_entropy_fused` returns.

    loss: per-token loss, the targets' shape, fp32 (fp64 for fp64 logits), 0 where ignored.
    group_sums: [K] per-group loss sums (same float type). token_counts: [K] int64 non-ignored tokens per group.
    objective: 0-d tensor, the value of the per-group-weighted objective whose gradient is ``grad``.
    grad: d objective / d logits, the logits' shape and dtype (the buffer that was written).
    """

    loss: torch.Tensor
    group_sums: torch.Tensor
    token_counts: torch.Tensor
    objective: torch.Tensor
    grad: torch.Tensor


def _acc_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _flatten_group_loss_args(logits, targets, group_ids, *, name="logits", last_dim="V"):
    """[N, X] or [B, T, X] inputs -> ([N, X] inputs, [N] targets, group ids, seq_len).

    Shared by group_cross_entropy (``logits``, X = V) and group_linear_cross_entropy (``hidden``, X = D);
    ``name`` and ``last_dim`` only word the error messages. group_ids per token keep the targets' shape;
    per-sequence ids [B] of 3-D inputs stay [B] and the op maps row i to sequence i // T (seq_len = T), so they
    are never expanded to [B * T].
    """
    x = logits
    if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3):
        got = f"{x.dim()}-D tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be 2-D [N, {last_dim}] or 3-D [B, T, {last_dim}], got {got}")
    for arg, tensor in (("targets", targets), ("group_ids", group_ids)):
        if tensor.device != x.device:
            raise ValueError(f"{name} and {arg} must be on the same device, got {x.device} and {tensor.device}")
    lead = tuple(x.shape[:-1])
    if tuple(targets.shape) != lead:
        raise ValueError(f"targets must have shape {name}.shape[:-1] = {lead}, got {tuple(targets.shape)}")
    rows = targets.numel()
    if tuple(group_ids.shape) == lead:
        seq_len = 1
        flat_ids = group_ids.reshape(rows)
    elif x.dim() == 3 and tuple(group_ids.shape) == lead[:1]:
        seq_len = lead[1]
        flat_ids = group_ids
        if rows == 0:
            # No rows: nothing to map, and seq_len = T may be 0.
            seq_len, flat_ids = 1, group_ids[:0]
    else:
        per_seq = f" or [B] = {lead[:1]} (one id per sequence)" if x.dim() == 3 else ""
        raise ValueError(f"group_ids must have the targets' shape {lead} (one id per token){per_seq}, "
                         f"got {tuple(group_ids.shape)}")
    return x.reshape(rows, x.shape[-1]), targets.reshape(rows), flat_ids, seq_len


def _counts_before_kernel(flat_targets, flat_ids, seq_len, num_groups, ignore_index) -> torch.Tensor:
    """Non-ignored tokens per group, int64 [K], from the targets only (no logits pass). Ids are clamped so that
    bad ones cannot break the sum; the op itself then rejects them with its message."""
    valid = (flat_targets != ignore_index).long()
    if seq_len > 1:
        valid = valid.view(-1, seq_len).sum(1)
    safe_ids = flat_ids.long().clamp(0, num_groups - 1)
    return torch.zeros(num_groups, dtype=torch.int64, device=flat_targets.device).index_add_(0, safe_ids, valid)


def _row_groups(group_ids: torch.Tensor, seq_len: int, rows: int) -> torch.Tensor:
    """Group of every row as int64 [N] (expands per-sequence ids; only used on the small backward path)."""
    ids = group_ids.long()
    return ids if seq_len == 1 else ids.repeat_interleave(seq_len)[:rows]


def group_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, group_ids: torch.Tensor, num_groups: int, *,
                        ignore_index: int = -100):
    """Token cross-entropy with per-group sums and counts, in one pass over the logits.

    Args:
        logits: [N, V] or [B, T, V]; float32, float16, bfloat16 (float64 for gradcheck). CPU or CUDA.
        targets: int64, ``logits.shape[:-1]``; each in [0, V) or equal to ``ignore_index``.
        group_ids: int32 or int64 in [0, num_groups): per token (the targets' shape), or per sequence [B] when
            logits are [B, T, V] (used as is, no expansion copy).
        num_groups: K >= 1.
        ignore_index: targets equal to it contribute loss 0 and are not counted.

    Returns:
        (loss, group_sums, token_counts): loss has the targets' shape, fp32 (fp64 for fp64 logits), 0 where
        ignored; group_sums [K] the same float type; token_counts [K] int64 (non-ignored tokens per group).
        Empty groups get 0 and 0. Statistics accumulate in fp32 (group sums in fp64) whatever the logits' dtype.

    Differentiable with respect to ``logits`` through ``loss`` and ``group_sums``. When ``logits`` requires grad
    the gradient rows are computed during this forward pass, in the same read of each logits row (op
    ``group_cross_entropy_with_grad``), already scaled by a prediction of the upstream coefficient
    ``dL/dloss[i] + dL/dgroup_sums[g(i)]`` (on the CPU: 1 / non-ignored tokens at first, the token mean; then
    the pattern the last differing backward showed, see :func:`gradient_scale_prediction`). Backward compares
    the real coefficients with the prediction: when they are equal, as for a token mean (``group_sums.sum() /
    token_counts.sum()``, ``loss.sum() / token_counts.sum()``), it hands the buffer on untouched; otherwise it
    rescales each row by real / predicted (one pass over [N, V]), so every upstream gradient is exact. On the CPU
    the [N, V] gradient comes from a cache of buffers nobody references any more (see
    :func:`gradient_buffer_cache`), which saves the page faults of fresh memory. Not twice differentiable. For
    a known weighted objective, :func:`group_cross_entropy_fused` writes into a buffer you pass.
    """
    flat_logits, flat_targets, flat_ids, seq_len = _flatten_group_loss_args(logits, targets, group_ids)
    if torch.is_grad_enabled() and logits.requires_grad:
        group_scale = _predicted_group_scale(flat_logits, flat_targets, flat_ids, seq_len, num_groups, ignore_index)
        loss, group_sums, token_counts, _ = _ops.group_cross_entropy_with_grad(
            flat_logits, flat_targets, flat_ids, num_groups, ignore_index, seq_len, group_scale)
        if not torch.compiler.is_compiling() and loss.grad_fn is not None:
            # The op's grad_logits output was dropped just above, so backward may scale the saved buffer in
            # place or hand it on (the node object is the autograd ctx).
            loss.grad_fn.saved_gradient_is_private = True
    else:
        loss, group_sums, token_counts = _ops.group_cross_entropy(
            flat_logits, flat_targets, flat_ids, num_groups, ignore_index, seq_len)
    return loss.view(targets.shape), group_sums, token_counts


def group_cross_entropy_fused(logits: torch.Tensor, targets: torch.Tensor, group_ids: torch.Tensor,
                              num_groups: int, *, group_weights=None, normalize: str = "tokens",
                              ignore_index: int = -100, grad_out: Optional[torch.Tensor] = None,
                              inplace: bool = False) -> GroupCrossEntropyResult:
    """Training step helper: group statistics plus the gradient of a per-group-weighted objective, one pass.

    Each logits row is read once from memory; its gradient row is written right after, while it is in cache.
    The objective, with w = ``group_weights`` (default all ones), S_g = group_sums, n_g = token_counts:

    * ``normalize="tokens"``: sum_g w_g S_g / sum_g n_g   (w = 1: the usual mean over non-ignored tokens)
    * ``normalize="groups"``: sum_g w_g S_g / n_g over non-empty groups (DoReMi-style weighted group means)
    * ``normalize="none"``:   sum_g w_g S_g

    The counts come from a bincount over the N targets before the kernel runs (never a second logits pass).
    An objective with no token (all ignored) is 0 with a zero gradient.

    Args:
        logits, targets, group_ids, num_groups, ignore_index: as in :func:`group_cross_entropy`. ``logits`` is
            only read (through ``logits.detach()``: this function computes the gradient itself); pass the
            result to autograd with ``logits.backward(result.grad)``.
        group_weights: [K] floats (tensor or sequence) or None for ones.
        grad_out: buffer for the gradient, the logits' shape and dtype, contiguous (reuse it across steps:
            fresh pages cost more than the kernel's writes).
        inplace: write the gradient over ``logits`` itself (no extra memory; the logits are lost).

    Returns:
        :class:`GroupCrossEntropyResult` (loss, group_sums, token_counts, objective, grad).
    """
    if num_groups < 1:
        raise ValueError(f"num_groups must be >= 1, got {num_groups}")
    if normalize not in _NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {_NORMALIZE_MODES}, got {normalize!r}")
    if inplace and grad_out is not None:
        raise ValueError("pass either grad_out or inplace=True, not both")
    flat_logits, flat_targets, flat_ids, seq_len = _flatten_group_loss_args(logits.detach(), targets, group_ids)
    acc = _acc_dtype(logits)
    device = logits.device
    if inplace:
        if not logits.is_contiguous():
            raise ValueError("inplace=True needs contiguous logits (the gradient is written row by row)")
        grad = logits.detach()
    elif grad_out is not None:
        if tuple(grad_out.shape) != tuple(logits.shape) or grad_out.dtype != logits.dtype:
            raise ValueError(f"grad_out must have the logits' shape {tuple(logits.shape)} and dtype {logits.dtype}, "
                             f"got {tuple(grad_out.shape)} {grad_out.dtype}")
        if not grad_out.is_contiguous():
            raise ValueError("grad_out must be contiguous (the gradient is written row by row)")
        grad = grad_out
    else:
        grad = None  # allocated by the with_grad op (on CPU with huge pages: fresh pages are the cost here)
    if group_weights is None:
        weights = torch.ones(num_groups, dtype=acc, device=device)
    else:
        weights = torch.as_tensor(group_weights, dtype=acc, device=device)
        if weights.shape != (num_groups,):
            raise ValueError(f"group_weights must be 1-D [num_groups] = [{num_groups}], got {tuple(weights.shape)}")

    counts = _counts_before_kernel(flat_targets, flat_ids, seq_len, num_groups, ignore_index)
    if normalize == "tokens":
        group_scale = weights / counts.sum().clamp_min(1).to(acc)
    elif normalize == "groups":
        group_scale = torch.where(counts > 0, weights / counts.clamp_min(1).to(acc), torch.zeros_like(weights))
    else:
        group_scale = weights

    if grad is None:
        loss, group_sums, token_counts, flat_grad = _ops.group_cross_entropy_with_grad(
            flat_logits, flat_targets, flat_ids, num_groups, ignore_index, seq_len, group_scale)
        grad = flat_grad.view(logits.shape)
    else:
        loss, group_sums, token_counts = _ops.group_cross_entropy_fused(
            flat_logits, flat_targets, flat_ids, num_groups, ignore_index, seq_len, group_scale,
            grad.view(flat_logits.shape))
    objective = (group_scale.double() * group_sums.double()).sum().to(acc)
    return GroupCrossEntropyResult(loss.view(targets.shape), group_sums, token_counts, objective, grad)


# ---------------------------------------------------------------------------------------------------------------
# Plain loss.backward() at the fused kernel's speed: reused gradient buffers and a predicted upstream coefficient
# ---------------------------------------------------------------------------------------------------------------

class GradientBufferCacheInfo(NamedTuple):
    """State of the CPU gradient buffer cache (:func:`gradient_buffer_cache`). Sizes in bytes.

    max_bytes: the limit on cached_bytes (0: disabled). cached_bytes / buffers: what the cache references,
    in use or not. idle_bytes: the part no tensor references (memory held only for reuse).
    reuses / allocations: buffers of >= 4 MiB handed out again / newly allocated since the process started.
    """

    max_bytes: int
    cached_bytes: int
    idle_bytes: int
    buffers: int
    reuses: int
    allocations: int


def gradient_buffer_cache(max_bytes: Optional[int] = None, *, clear: bool = False) -> GradientBufferCacheInfo:
    """Configure and inspect the cache of CPU gradient buffers that :func:`group_cross_entropy` (logits that
    require grad) and :func:`group_cross_entropy_fused` (no ``grad_out``) allocate.

    A fresh [N, V] gradient costs more in page faults than the kernel's own writes, so each buffer of >= 4 MiB
    is remembered and handed out again by a later call for the same byte size -- but only once nothing else
    references it: no tensor (``logits.grad``, a saved tensor, a view, a numpy array, a DLPack capsule), no
    ``torch.UntypedStorage`` and no weak reference. A gradient you keep is never overwritten; what is reused is
    exactly memory the allocator would otherwise have freed. In a training loop that drops the gradient each
    step (``zero_grad(set_to_none=True)``, or logits that are not leaves) every step after the first reuses the
    previous step's buffer. The cache holds at most ``max_bytes`` (least recently used buffers are let go
    first); default 4 GiB, or the environment variable AIOLI_EXT_GRADIENT_CACHE_BYTES read at first use.
    CUDA tensors use torch's caching allocator and never go through this cache.

    Args:
        max_bytes: new limit, >= 0; 0 disables the cache and frees its idle buffers. None keeps the limit.
        clear: let go of every cached buffer (idle ones are freed now, ones in use when their users drop them).

    Returns:
        :class:`GradientBufferCacheInfo` after the change.
    """
    if max_bytes is not None and max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0 (0 disables the gradient buffer cache), got {max_bytes}")
    return GradientBufferCacheInfo(*_ops.gradient_buffer_cache(max_bytes, clear))


def _predicted_group_scale(flat_logits, flat_targets, flat_ids, seq_len, num_groups, ignore_index):
    """group_scale [K] for the forward pass: the predicted upstream coefficient of each group, or ones."""
    acc = _acc_dtype(flat_logits)
    scale = None
    if num_groups >= 1 and flat_logits.device.type == "cpu" and not _traced(flat_targets):
        scale = gradient_prediction.predicted_group_scale(
            num_groups, acc, flat_logits.dtype, flat_targets.shape[0],
            lambda: _counts_before_kernel(flat_targets, flat_ids, seq_len, num_groups, ignore_index))
    return torch.ones(max(num_groups, 0), dtype=acc, device=flat_logits.device) if scale is None else scale


@torch.library.register_fake("aioli_ext::group_cross_entropy")
def _group_cross_entropy_fake(logits, targets, group_ids, num_groups, ignore_index, seq_len):
    acc = _acc_dtype(logits)
    return (logits.new_empty((logits.shape[0],), dtype=acc), logits.new_empty((num_groups,), dtype=acc),
            logits.new_empty((num_groups,), dtype=torch.int64))


@torch.library.register_fake("aioli_ext::group_cross_entropy_with_grad")
def _group_cross_entropy_with_grad_fake(logits, targets, group_ids, num_groups, ignore_index, seq_len,
                                        group_scale):
    loss, group_sums, token_counts = _group_cross_entropy_fake(logits, targets, group_ids, num_groups,
                                                               ignore_index, seq_len)
    return loss, group_sums, token_counts, torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.register_fake("aioli_ext::group_cross_entropy_fused")
def _group_cross_entropy_fused_fake(logits, targets, group_ids, num_groups, ignore_index, seq_len, group_scale,
                                    grad_logits):
    return _group_cross_entropy_fake(logits, targets, group_ids, num_groups, ignore_index, seq_len)


@torch.library.register_fake("aioli_ext::scale_rows_")
def _scale_rows_fake(x, row_scale):
    return None


def _row_coefficients(grad_loss, grad_group_sums, targets, group_ids, seq_len, ignore_index, dtype, *,
                      row_groups=None):
    """dL/dloss[i] + dL/dgroup_sums[g(i)] per row ([N]), 0 on ignored rows (their loss is constant 0).
    row_groups: the int64 [N] group of every row when the caller has it already."""
    rows = targets.shape[0]
    coef = torch.zeros(rows, dtype=dtype, device=targets.device)
    if grad_loss is not None:
        coef = coef + grad_loss.to(dtype)
    if grad_group_sums is not None:
        if row_groups is None:
            row_groups = _row_groups(group_ids, seq_len, rows)
        # index_select, not advanced indexing: the latter costs milliseconds for a few thousand rows on the CPU.
        coef = coef + grad_group_sums.to(dtype).index_select(0, row_groups)
    return torch.where(targets != ignore_index, coef, torch.zeros_like(coef))


def _traced(tensor: torch.Tensor) -> bool:
    """True under torch.compile / AOTAutograd / a dispatch mode (fake or functional tensors), where
    value-dependent and in-place shortcuts do not apply."""
    return (torch.compiler.is_compiling() or type(tensor) is not torch.Tensor
            or torch.utils._python_dispatch.is_in_torch_dispatch_mode())


def _can_consume_saved_gradient(saved_grad: torch.Tensor) -> bool:
    """True when this backward is the saved gradient's last use (graph not retained) and runs eagerly."""
    if _traced(saved_grad):
        return False
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    if keep_graph is None:
        return False
    try:
        return not keep_graph()
    except RuntimeError:
        return False


def _check_not_double_backward(saved: torch.Tensor) -> None:
    # backward runs with grad mode on only under create_graph=True; the saved softmax rows are constants to
    # autograd, so a second derivative would silently miss the softmax's own derivative.
    if torch.is_grad_enabled() and not _traced(saved):
        raise RuntimeError("aioli_ext.group_cross_entropy is not twice differentiable: backward with "
                           "create_graph=True is not supported")


def _with_grad_setup_context(ctx, inputs, output):
    _, targets, group_ids, _, ignore_index, seq_len, group_scale = inputs
    _, _, token_counts, grad_logits = output
    ctx.mark_non_differentiable(token_counts, grad_logits)
    # Unused output gradients stay None: materialising them would fill an [N, V] zero tensor for grad_logits.
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(grad_logits, targets, group_ids, group_scale)
    ctx.ignore_index = ignore_index
    ctx.seq_len = seq_len


def _with_grad_backward(ctx, grad_loss, grad_group_sums, _grad_counts, _grad_grad_logits):
    saved_grad, targets, group_ids, group_scale = ctx.saved_tensors
    _check_not_double_backward(saved_grad)
    row_groups = _row_groups(group_ids, ctx.seq_len, targets.shape[0])
    coef = _row_coefficients(grad_loss, grad_group_sums, targets, group_ids, ctx.seq_len, ctx.ignore_index,
                             group_scale.dtype, row_groups=row_groups)
    # The saved rows are group_scale[g] * (softmax - onehot): group_scale is the wrapper's prediction of coef.
    predicted = group_scale.index_select(0, row_groups)
    private = getattr(ctx, "saved_gradient_is_private", False) and _can_consume_saved_gradient(saved_grad)
    if saved_grad.device.type == "cpu" and not _traced(saved_grad):
        counted = targets != ctx.ignore_index
        if torch.equal(coef, torch.where(counted, predicted, torch.zeros_like(predicted))):
            gradient_prediction.record_hit()
            return (saved_grad if private else saved_grad.clone()), None, None, None, None, None, None
        gradient_prediction.record_miss(coef, counted, row_groups, group_scale.shape[0])
    ratio = coef / predicted
    if private:
        # Scaling the saved buffer in place saves a fresh [N, V] allocation (page faults cost more than the
        # multiply); safe because autograd frees the saved tensors right after this call. torch's CPU multiply
        # of a bf16 tensor by an fp32 column is ~10x slower than memory speed, hence the op.
        if saved_grad.device.type == "cpu":
            _ops.scale_rows_(saved_grad, ratio.contiguous())
            return saved_grad, None, None, None, None, None, None
        return saved_grad.mul_(ratio.unsqueeze(1)), None, None, None, None, None, None
    return (saved_grad * ratio.unsqueeze(1)).to(saved_grad.dtype), None, None, None, None, None, None


torch.library.register_autograd("aioli_ext::group_cross_entropy_with_grad", _with_grad_backward,
                                setup_context=_with_grad_setup_context)


def _plain_setup_context(ctx, inputs, output):
    logits, targets, group_ids, num_groups, ignore_index, seq_len = inputs
    ctx.mark_non_differentiable(output[2])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(logits, targets, group_ids)
    ctx.ignore_index = ignore_index
    ctx.seq_len = seq_len


def _plain_backward(ctx, grad_loss, grad_group_sums, _grad_counts):
    # Reached only when torch.ops.aioli_ext.group_cross_entropy is called directly on logits that require grad
    # (the wrapper takes the with_grad op then): re-read the logits once, every row as its own "group" so the
    # kernel applies the per-row coefficient itself.
    logits, targets, group_ids, = ctx.saved_tensors
    _check_not_double_backward(logits)
    rows = targets.shape[0]
    coef = _row_coefficients(grad_loss, grad_group_sums, targets, group_ids, ctx.seq_len, ctx.ignore_index,
                             _acc_dtype(logits))
    row_ids = torch.arange(rows, dtype=torch.int64, device=logits.device)
    _, _, _, grad_logits = _ops.group_cross_entropy_with_grad(
        logits, targets, row_ids, max(rows, 1), ctx.ignore_index, 1, coef if rows else coef.new_zeros(1))
    return grad_logits, None, None, None, None, None


torch.library.register_autograd("aioli_ext::group_cross_entropy", _plain_backward,
                                setup_context=_plain_setup_context)


# ----------------------------------------------------------------------------------------------------------------
# Mixture sampling (csrc/mixture_sample.h, csrc/cpu/mixture_sample_cpu.cpp, csrc/cuda/mixture_sample_cuda.cu).
# The user-facing class is aioli_ext.sampler.MixtureSampler; these are the raw ops it calls.
# ----------------------------------------------------------------------------------------------------------------

def mixture_sample(
    group_ranges: torch.Tensor,
    csr_sample_ids: Optional[torch.Tensor],
    cumulative: torch.Tensor,
    guide: torch.Tensor,
    cursor: torch.Tensor,
    residual: Optional[torch.Tensor],
    capacity: Optional[torch.Tensor],
    seed: int,
    step: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    *,
    out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Draw one global batch of ``batch_size`` slots and return this rank's slice.

    Args:
        group_ranges: [K, 2] int64, (start, size) of each group's range of flat indices, on the sampling device.
        csr_sample_ids: [N] int64 or None; when given, the sample id of flat index i is ``csr_sample_ids[i]``.
        cumulative: [K + 1] int64 fixed-point thresholds from :func:`mixture_thresholds` (on the device).
        guide: [buckets + 1] int32 guide table from :func:`mixture_thresholds` (on the device).
        cursor: [K] int64 draws taken from each group so far (device); advanced in place.
        residual: [K] int64 CPU tensor (systematic mode) updated in place, or None for i.i.d. draws.
        capacity: [K] int64 per-group stream cap (max_epochs * size) on the device, or None.
        seed, step: the counter-based RNG key and call counter.
        batch_size: global batch size B (divisible by ``world_size``).
        out: optional (sample_ids, group_ids) to write into instead of allocating: each exactly [B / world_size]
            int64, contiguous, on the sampling device, sharing memory with no input (never resized).

    Returns:
        sample_ids [B / world_size] int64 and group_ids [B / world_size] int64, for slots
        [rank * B / world_size, (rank + 1) * B / world_size) of the global batch (the ``out`` tensors when given).
    """
    if out is None:
        return _ops.mixture_sample(group_ranges, csr_sample_ids, cumulative, guide, cursor, residual, capacity,
                                   seed, step, batch_size, rank, world_size)
    sample_ids, group_ids = sample_outputs(out, group_ranges.device)
    _ops.mixture_sample_into(group_ranges, csr_sample_ids, cumulative, guide, cursor, residual, capacity, seed,
                             step, batch_size, rank, world_size, sample_ids, group_ids)
    return sample_ids, group_ids


def sample_outputs(out, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Check the form of an ``out=`` pair before anything runs; the kernels check dtype, shape and overlap.

    The device is checked here because the dispatcher would route an output on another device (a meta tensor,
    say) to that device's kernel instead of failing."""
    if not (isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out)):
        raise TypeError(f"out must be a (sample_ids, group_ids) pair of tensors, got {type(out).__name__}"
                        + (f" of length {len(out)}" if isinstance(out, (tuple, list)) else ""))
    for name, tensor in zip(("sample_ids", "group_ids"), out):
        if tensor.device != device:
            raise ValueError(f"{name} (out) must be on the sampling device {device}, got {tensor.device}")
    return out[0], out[1]


def mixture_thresholds(
    proportions: torch.Tensor, group_sizes: torch.Tensor, open_groups: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Validate proportions and build the sampler's integer tables (CPU tensors in and out).

    Args:
        proportions: [K] float32/float64, non-negative, finite, not all zero; normalised here in float64.
        group_sizes: [K] int64; a positive proportion on an empty group is an error.
        open_groups: [K] bool or None; closed groups (max_epochs reached) get weight zero.

    Returns:
        cumulative [K + 1] int64 (0 .. 2^62, group g owns [cumulative[g], cumulative[g + 1])) and
        guide [next_pow2(K) + 1] int32 (first candidate group of each bucket of the threshold range).
    """
    return _ops.mixture_thresholds(proportions, group_sizes, open_groups)


def philox4x32(counters: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Philox4x32-10 of each counter row: counters [N, 4] int64 and key [2] int64 hold 32-bit words;
    returns [N, 4] int64 (32-bit words). Runs csrc/philox.h on the counters' device."""
    return _ops.philox4x32(counters, key)


def keyed_permutation(positions: torch.Tensor, n: int, seed: int, group: int, epoch: int) -> torch.Tensor:
    """Images of ``positions`` ([N] int64 in [0, n)) under the sampler's permutation of group ``group`` in
    epoch ``epoch`` (csrc/permutation.h keyed through csrc/philox.h); [N] int64 on the positions' device."""
    return _ops.keyed_permutation(positions, n, seed, group, epoch)


@torch.library.register_fake("aioli_ext::mixture_sample")
def _mixture_sample_fake(group_ranges, csr_sample_ids, cumulative, guide, cursor, residual, capacity, seed, step,
                         batch_size, rank, world_size):
    torch._check(batch_size >= 1, lambda: f"batch_size must be >= 1, got {batch_size}")
    torch._check(world_size >= 1 and batch_size % world_size == 0,
                 lambda: f"batch_size ({batch_size}) must be divisible by world_size ({world_size})")
    per_rank = batch_size // world_size
    return (group_ranges.new_empty((per_rank,), dtype=torch.int64),
            group_ranges.new_empty((per_rank,), dtype=torch.int64))


@torch.library.register_fake("aioli_ext::mixture_sample_into")
def _mixture_sample_into_fake(group_ranges, csr_sample_ids, cumulative, guide, cursor, residual, capacity, seed,
                              step, batch_size, rank, world_size, sample_ids, group_ids):
    expected = _mixture_sample_fake(group_ranges, csr_sample_ids, cumulative, guide, cursor, residual, capacity, seed,
                                    step, batch_size, rank, world_size)[0].shape
    for name, out in (("sample_ids", sample_ids), ("group_ids", group_ids)):
        torch._check(out.dtype == torch.int64, lambda: f"{name} must be int64, got {out.dtype}")
        torch._check(out.shape == expected,
                     lambda: f"{name} must have shape [batch_size / world_size] = {list(expected)}, got "
                             f"{list(out.shape)}")


@torch.library.register_fake("aioli_ext::mixture_thresholds")
def _mixture_thresholds_fake(proportions, group_sizes, open_groups):
    num_groups = group_sizes.shape[0]
    buckets = 1
    while buckets < num_groups:
        buckets *= 2
    return (group_sizes.new_empty((num_groups + 1,), dtype=torch.int64),
            group_sizes.new_empty((buckets + 1,), dtype=torch.int32))


@torch.library.register_fake("aioli_ext::philox4x32")
def _philox4x32_fake(counters, key):
    return counters.new_empty(counters.shape, dtype=torch.int64)


@torch.library.register_fake("aioli_ext::keyed_permutation")
def _keyed_permutation_fake(positions, n, seed, group, epoch):
    return positions.new_empty(positions.shape, dtype=torch.int64)
