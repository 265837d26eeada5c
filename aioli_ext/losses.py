"""Group cross-entropy fused with the LM head: per-group token losses from hidden states, chunk by chunk.

``group_linear_cross_entropy(hidden [N, D], weight [V, D], ...)`` returns what
``group_cross_entropy(hidden @ weight.T, ...)`` returns, without ever holding the [N, V] logits or their
gradient: rows are processed in chunks of C rows, and only one [C, V] buffer exists at a time.

Training forward, per chunk (when any input requires grad):
    logits_c = hidden_c @ W.T (+ b)                          one [C, V] buffer, reused by every chunk
    group_cross_entropy_fused(logits_c, inplace=True)        statistics, and G_c = softmax - onehot written over
                                                             logits_c in the same read of each row
    grad_hidden_c = G_c @ W;  grad_W += G_c.T @ hidden_c;  grad_b += G_c.sum(0)
The three "unit" gradients are saved (grad_W and grad_b accumulate in fp32 for fp16/bf16 inputs). They are the
gradients for upstream coefficient 1 on every non-ignored row.

Backward gets dL/dloss [N] and dL/dgroup_sums [K], i.e. a coefficient per row c_i = dL/dloss[i] +
dL/dgroup_sums[g(i)] (0 on ignored rows). Two paths:
  * c constant over the non-ignored rows (mean or sum over tokens, sum of group sums: the common case):
    grad_W = c * saved grad_W, grad_b = c * saved grad_b. Cost O(V * D), no matmul. Deciding it reads two
    scalars on the host (min and max of c): free on CPU, one small synchronisation per step on CUDA.
  * otherwise (per-group weights, per-token weights): grad_W cannot be rescaled, so a second chunked pass
    recomputes logits_c, writes c_i * G_c rows with the fused kernel, and accumulates grad_W / grad_b:
    2 of the forward's 3 matmuls again (about +2/3 of the forward's time), no extra [N, V] memory.
grad_hidden is always the saved rows scaled by c_i (exact, O(N * D)).

Under torch.compile the backward cannot branch on a host value inside the traced graph, so it calls the opaque
op ``aioli_ext::group_linear_cross_entropy_backward``, which makes the same choice when it runs.
"""
import contextlib
import math
from typing import Optional

import torch
import torch.utils._python_dispatch

from .ops import (_acc_dtype, _can_consume_saved_gradient, _flatten_group_loss_args, _row_coefficients,
                  group_cross_entropy, group_cross_entropy_fused)

# Bytes of one chunk's logits buffer (the only [C, V] tensor alive at any time). 256 MiB keeps the matmuls
# large (C >= ~1000 rows for V = 128K in bf16) while staying small next to [N, V] logits of real runs.
CHUNK_LOGITS_BYTES = 256 * 2**20
# Chunk rows are a multiple of this (tensor-core and vector friendly).
CHUNK_ALIGN = 16

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def default_chunk_size(rows: int, vocab: int, itemsize: int) -> int:
    """Rows per chunk for ``rows`` x ``vocab`` logits of ``itemsize`` bytes: one chunk when the whole logits fit
    in CHUNK_LOGITS_BYTES, otherwise equal chunks (a multiple of CHUNK_ALIGN rows) that each fit in it, so the
    last chunk is not a small remainder."""
    max_rows = max(CHUNK_ALIGN, CHUNK_LOGITS_BYTES // max(1, vocab * itemsize) // CHUNK_ALIGN * CHUNK_ALIGN)
    if rows <= max_rows:
        return max(rows, 1)
    chunks = math.ceil(rows / max_rows)
    return math.ceil(math.ceil(rows / chunks) / CHUNK_ALIGN) * CHUNK_ALIGN


def _type_name(tensor: torch.Tensor) -> str:
    """The dtype as the compiled ops spell it in messages ("Float", "BFloat16", "Long")."""
    return tensor.type().rsplit(".", 1)[-1][: -len("Tensor")]


def _check_linear_args(hidden, weight, bias, targets, group_ids, num_groups, seq_len, chunk_size):
    """Checks of the ops' arguments (hidden [N, D], targets [N], group ids [N / seq_len]) that need no data."""
    named = [("weight", weight), ("targets", targets), ("group_ids", group_ids)]
    if bias is not None:
        named.append(("bias", bias))
    for name, tensor in named:
        if tensor.device != hidden.device:
            raise ValueError(f"hidden and {name} must be on the same device, got {hidden.device} and {tensor.device}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise RuntimeError(f"hidden must be float32, float16, bfloat16 or float64, got {_type_name(hidden)}")
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be 2-D [N, D], got {hidden.dim()}-D tensor of shape {tuple(hidden.shape)}")
    dim = hidden.shape[1]
    if weight.dim() != 2 or weight.shape[1] != dim:
        raise ValueError(f"weight must be 2-D [V, D] with D = hidden.shape[-1] = {dim}, "
                         f"got shape {tuple(weight.shape)}")
    vocab = weight.shape[0]
    if vocab < 1:
        raise RuntimeError(f"weight must have at least one row (vocabulary size V >= 1), got shape "
                           f"{tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise RuntimeError(f"weight must have hidden's dtype {_type_name(hidden)}, got {_type_name(weight)}")
    if bias is not None:
        if tuple(bias.shape) != (vocab,):
            raise ValueError(f"bias must be 1-D [V] = [{vocab}], got shape {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise RuntimeError(f"bias must have hidden's dtype {_type_name(hidden)}, got {_type_name(bias)}")
    rows = hidden.shape[0]
    if targets.dtype != torch.int64:
        raise RuntimeError(f"targets must be int64, got {_type_name(targets)}")
    if tuple(targets.shape) != (rows,):
        raise ValueError(f"targets must be 1-D [N] with N = hidden.shape[0] = {rows}, got {tuple(targets.shape)}")
    if group_ids.dtype not in (torch.int32, torch.int64):
        raise RuntimeError(f"group_ids must be int32 or int64, got {_type_name(group_ids)}")
    if num_groups < 1:
        raise RuntimeError(f"num_groups must be >= 1, got {num_groups}")
    if seq_len < 1:
        raise RuntimeError(f"seq_len must be >= 1, got {seq_len}")
    if rows % seq_len != 0:
        raise RuntimeError(f"seq_len must divide the number of rows N = {rows}, got seq_len = {seq_len}")
    if tuple(group_ids.shape) != (rows // seq_len,):
        raise ValueError(f"group_ids must be 1-D [N / seq_len] = [{rows // seq_len}], got {tuple(group_ids.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def _check_values(targets, group_ids, vocab, num_groups, ignore_index):
    """Range checks with the messages of group_cross_entropy, indices over the whole input (the per-chunk ops
    would report chunk-relative ones). One host read of two flags."""
    bad_targets = (targets != ignore_index) & ((targets < 0) | (targets >= vocab))
    bad_ids = (group_ids < 0) | (group_ids >= num_groups)
    any_bad_target, any_bad_id = torch.stack([bad_targets.any(), bad_ids.any()]).tolist()
    if any_bad_target:
        i = int(bad_targets.nonzero()[0, 0])
        raise RuntimeError(f"targets must be in [0, V) = [0, {vocab}) or equal ignore_index ({ignore_index}), "
                           f"got targets[{i}] = {int(targets[i])}")
    if any_bad_id:
        j = int(bad_ids.nonzero()[0, 0])
        raise RuntimeError(f"group_ids must be in [0, num_groups) = [0, {num_groups}), "
                           f"got group_ids[{j}] = {int(group_ids[j])}")


def _without_autocast(tensor):
    """The ops' bodies run their matmuls in the dtype they were given: the wrapper already applied autocast."""
    if tensor.device.type in ("cpu", "cuda"):
        return torch.autocast(tensor.device.type, enabled=False)
    return contextlib.nullcontext()


def _validated_row_groups(hidden, weight, bias, targets, group_ids, num_groups, ignore_index, seq_len, chunk_size):
    """Check everything, then return the group of every row (int64 [N]) so chunks can slice it."""
    _check_linear_args(hidden, weight, bias, targets, group_ids, num_groups, seq_len, chunk_size)
    _check_values(targets, group_ids, weight.shape[0], num_groups, ignore_index)
    ids = group_ids.long()
    return ids if seq_len == 1 else ids.repeat_interleave(seq_len)


def _chunk_bounds(rows, chunk_size):
    return [(start, min(rows, start + chunk_size)) for start in range(0, rows, chunk_size)]


def _logits_buffer(hidden, weight, chunk_size):
    rows = min(chunk_size, hidden.shape[0])
    return torch.empty((rows, weight.shape[0]), dtype=hidden.dtype, device=hidden.device)


def _chunk_logits(buffer, hidden_rows, weight, bias):
    out = buffer[: hidden_rows.shape[0]]
    if bias is None:
        return torch.mm(hidden_rows, weight.t(), out=out)
    return torch.addmm(bias, hidden_rows, weight.t(), out=out)


def _accumulate_weight_grad(grad_weight, grad_rows, hidden_rows):
    """grad_weight += grad_rows.T @ hidden_rows, with grad_weight fp32 for fp16/bf16 rows.

    Half inputs: on CUDA the GEMM writes fp32 (out_dtype) so nothing is rounded before the fp32 accumulator; the
    CPU GEMM has no fp32 output for half inputs, so each chunk's product is rounded once to the input dtype
    before it is added in fp32. Vocabulary blocks bound the temporary to about one chunk buffer.
    """
    if grad_weight.dtype == grad_rows.dtype:
        grad_weight.addmm_(grad_rows.t(), hidden_rows)
        return
    vocab, dim = grad_weight.shape
    block = max(CHUNK_ALIGN, CHUNK_LOGITS_BYTES // (4 * max(1, dim)))
    for start in range(0, vocab, block):
        part = grad_rows[:, start:start + block].t()
        if grad_rows.is_cuda:
            product = torch.mm(part, hidden_rows, out_dtype=grad_weight.dtype)
        else:
            product = torch.mm(part, hidden_rows)
        grad_weight[start:start + block].add_(product)


def _forward_statistics(hidden, weight, bias, targets, row_groups, num_groups, ignore_index, chunk_size):
    """loss [N], group_sums [K], token_counts [K]: chunked matmul + group_cross_entropy, no gradient writes.
    Group sums accumulate across chunks in fp64."""
    rows = hidden.shape[0]
    acc = _acc_dtype(hidden)
    loss = torch.empty(rows, dtype=acc, device=hidden.device)
    sums = torch.zeros(num_groups, dtype=torch.float64, device=hidden.device)
    counts = torch.zeros(num_groups, dtype=torch.int64, device=hidden.device)
    buffer = _logits_buffer(hidden, weight, chunk_size)
    for start, stop in _chunk_bounds(rows, chunk_size):
        logits = _chunk_logits(buffer, hidden[start:stop], weight, bias)
        chunk_loss, chunk_sums, chunk_counts = group_cross_entropy(
            logits, targets[start:stop], row_groups[start:stop], num_groups, ignore_index=ignore_index)
        loss[start:stop] = chunk_loss
        sums += chunk_sums
        counts += chunk_counts
    return loss, sums.to(acc), counts


def _empty(like):
    return like.new_empty((0,))


def _forward_with_unit_grads(hidden, weight, bias, targets, row_groups, num_groups, ignore_index, chunk_size,
                             need_grad_hidden, need_grad_weight, need_grad_bias):
    """Statistics plus the gradients for coefficient 1 on every non-ignored row (empty [0] where not needed):
    grad_hidden in hidden's dtype, grad_weight and grad_bias in fp32 (fp64 for fp64 inputs)."""
    rows = hidden.shape[0]
    acc = _acc_dtype(hidden)
    device = hidden.device
    need_grad_bias = need_grad_bias and bias is not None
    loss = torch.empty(rows, dtype=acc, device=device)
    sums = torch.zeros(num_groups, dtype=torch.float64, device=device)
    counts = torch.zeros(num_groups, dtype=torch.int64, device=device)
    grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=device) if need_grad_hidden else _empty(hidden)
    grad_weight = torch.zeros(weight.shape, dtype=acc, device=device) if need_grad_weight else _empty(hidden)
    grad_bias = torch.zeros(weight.shape[0], dtype=acc, device=device) if need_grad_bias else _empty(hidden)
    buffer = _logits_buffer(hidden, weight, chunk_size)
    for start, stop in _chunk_bounds(rows, chunk_size):
        hidden_rows = hidden[start:stop]
        logits = _chunk_logits(buffer, hidden_rows, weight, bias)
        result = group_cross_entropy_fused(logits, targets[start:stop], row_groups[start:stop], num_groups,
                                           normalize="none", ignore_index=ignore_index, inplace=True)
        grad_rows = result.grad  # softmax - onehot, written over the chunk's logits
        loss[start:stop] = result.loss
        sums += result.group_sums
        counts += result.token_counts
        _chunk_backward(grad_rows, hidden_rows, weight, grad_hidden if need_grad_hidden else None,
                        grad_weight if need_grad_weight else None, grad_bias if need_grad_bias else None,
                        start, stop)
    return loss, sums.to(acc), counts, grad_hidden, grad_weight, grad_bias


def _chunk_backward(grad_rows, hidden_rows, weight, grad_hidden, grad_weight, grad_bias, start, stop):
    """Push one chunk's logits gradient [rows, V] through the LM head into whichever gradients are wanted
    (None = not wanted): grad_hidden rows [start, stop) are written, grad_weight and grad_bias accumulated."""
    if grad_hidden is not None:
        torch.mm(grad_rows, weight, out=grad_hidden[start:stop])
    if grad_weight is not None:
        _accumulate_weight_grad(grad_weight, grad_rows, hidden_rows)
    if grad_bias is not None:
        grad_bias += grad_rows.sum(0, dtype=grad_bias.dtype)


def _recompute_gradients(coef, hidden, weight, bias, targets, ignore_index, chunk_size, need_grad_hidden,
                         need_grad_weight, need_grad_bias, grad_weight_out=None, grad_bias_out=None):
    """Second chunked pass for per-row coefficients: the fused kernel writes coef[i] * (softmax - onehot) rows
    (each row its own "group" scaled by coef), then the needed gradient matmuls. grad_hidden in hidden's dtype,
    grad_weight / grad_bias fp32 (fp64) accumulators, written into the given buffers when passed."""
    rows = hidden.shape[0]
    acc = coef.dtype
    device = hidden.device
    grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=device) if need_grad_hidden else None
    grad_weight = grad_bias = None
    if need_grad_weight:
        grad_weight = grad_weight_out.zero_() if grad_weight_out is not None else \
            torch.zeros(weight.shape, dtype=acc, device=device)
    if need_grad_bias:
        grad_bias = grad_bias_out.zero_() if grad_bias_out is not None else \
            torch.zeros(weight.shape[0], dtype=acc, device=device)
    if rows == 0:
        return grad_hidden, grad_weight, grad_bias
    buffer = _logits_buffer(hidden, weight, chunk_size)
    row_index = torch.arange(min(chunk_size, rows), dtype=torch.int64, device=device)
    for start, stop in _chunk_bounds(rows, chunk_size):
        hidden_rows = hidden[start:stop]
        count = stop - start
        logits = _chunk_logits(buffer, hidden_rows, weight, bias)
        grad_rows = group_cross_entropy_fused(logits, targets[start:stop], row_index[:count], count,
                                              group_weights=coef[start:stop], normalize="none",
                                              ignore_index=ignore_index, inplace=True).grad
        _chunk_backward(grad_rows, hidden_rows, weight, grad_hidden, grad_weight, grad_bias, start, stop)
    return grad_hidden, grad_weight, grad_bias


def _scaled(saved, scale, dtype, in_place):
    """saved * scale cast to dtype; never returns ``saved`` itself unless in_place (no alias of a saved input)."""
    if in_place:
        if scale != 1.0:
            saved.mul_(scale)
        return saved.to(dtype)
    if scale != 1.0:
        return (saved * scale).to(dtype)
    return saved.to(dtype, copy=True)


def _constant_coefficient(coef, targets, ignore_index):
    """The common coefficient of the non-ignored rows, or None when they differ (NaN counts as differing).
    0.0 when every row is ignored. One host read of two scalars."""
    if coef.numel() == 0:
        return 0.0
    valid = targets != ignore_index
    low = torch.where(valid, coef, torch.full_like(coef, math.inf)).amin()
    high = torch.where(valid, coef, torch.full_like(coef, -math.inf)).amax()
    low, high = torch.stack([low, high]).tolist()
    if math.isinf(low) and low > 0:  # no valid row
        return 0.0
    return low if low == high else None


def _gradients_from_coefficients(coef, hidden, weight, bias, targets, ignore_index, chunk_size, need, saved,
                                 in_place):
    """(grad_hidden, grad_weight, grad_bias) in the inputs' dtypes, None where not needed.

    need: three bools; saved: the unit gradients of the training forward (None where it did not compute them).
    in_place: the saved buffers may be overwritten (eager backward that is their last use).
    """
    need_hidden, need_weight, need_bias = need[0], need[1], need[2] and bias is not None
    saved_hidden, saved_weight, saved_bias = saved
    grad_hidden = grad_weight = grad_bias = None
    if need_hidden and saved_hidden is not None:
        row_scale = coef.unsqueeze(1)
        if in_place:
            grad_hidden = saved_hidden.mul_(row_scale)
        else:
            grad_hidden = (saved_hidden * row_scale).to(hidden.dtype)
    scale_weight = need_weight and saved_weight is not None
    scale_bias = need_bias and saved_bias is not None
    if scale_weight or scale_bias:
        constant = _constant_coefficient(coef, targets, ignore_index)
        if constant is None:
            scale_weight = scale_bias = False
        else:
            if scale_weight:
                grad_weight = _scaled(saved_weight, constant, weight.dtype, in_place)
            if scale_bias:
                grad_bias = _scaled(saved_bias, constant, bias.dtype, in_place)
    recompute = (need_hidden and grad_hidden is None, need_weight and not scale_weight, need_bias and not scale_bias)
    if any(recompute):
        new_hidden, new_weight, new_bias = _recompute_gradients(
            coef, hidden, weight, bias, targets, ignore_index, chunk_size, *recompute,
            grad_weight_out=saved_weight if in_place and saved_weight is not None else None,
            grad_bias_out=saved_bias if in_place and saved_bias is not None else None)
        if recompute[0]:
            grad_hidden = new_hidden
        if recompute[1]:
            grad_weight = new_weight.to(weight.dtype)
        if recompute[2]:
            grad_bias = new_bias.to(bias.dtype)
    return grad_hidden, grad_weight, grad_bias


# ------------------------------------------------------------------------------------------------ the ops

@torch.library.custom_op("aioli_ext::group_linear_cross_entropy", mutates_args=())
def _statistics_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                   group_ids: torch.Tensor, num_groups: int, ignore_index: int, seq_len: int,
                   chunk_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss [N], group_sums [K], token_counts [K]) of logits = hidden @ weight.T (+ bias), chunk by chunk.
    Differentiable; its backward recomputes every gradient with one chunked pass."""
    row_groups = _validated_row_groups(hidden, weight, bias, targets, group_ids, num_groups, ignore_index, seq_len,
                                       chunk_size)
    with _without_autocast(hidden):
        return _forward_statistics(hidden, weight, bias, targets, row_groups, num_groups, ignore_index, chunk_size)


@_statistics_op.register_fake
def _statistics_fake(hidden, weight, bias, targets, group_ids, num_groups, ignore_index, seq_len, chunk_size):
    acc = _acc_dtype(hidden)
    return (hidden.new_empty((hidden.shape[0],), dtype=acc), hidden.new_empty((num_groups,), dtype=acc),
            hidden.new_empty((num_groups,), dtype=torch.int64))


@torch.library.custom_op("aioli_ext::group_linear_cross_entropy_with_grad", mutates_args=())
def _with_grad_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], targets: torch.Tensor,
                  group_ids: torch.Tensor, num_groups: int, ignore_index: int, seq_len: int, chunk_size: int,
                  need_grad_hidden: bool, need_grad_weight: bool, need_grad_bias: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training forward: the statistics plus the unit gradients (grad_hidden [N, D] in hidden's dtype,
    grad_weight [V, D] and grad_bias [V] in fp32 / fp64; empty [0] where not requested or no bias)."""
    row_groups = _validated_row_groups(hidden, weight, bias, targets, group_ids, num_groups, ignore_index, seq_len,
                                       chunk_size)
    with _without_autocast(hidden):
        return _forward_with_unit_grads(hidden, weight, bias, targets, row_groups, num_groups, ignore_index,
                                        chunk_size, need_grad_hidden, need_grad_weight, need_grad_bias)


@_with_grad_op.register_fake
def _with_grad_fake(hidden, weight, bias, targets, group_ids, num_groups, ignore_index, seq_len, chunk_size,
                    need_grad_hidden, need_grad_weight, need_grad_bias):
    acc = _acc_dtype(hidden)
    loss, group_sums, token_counts = _statistics_fake(hidden, weight, bias, targets, group_ids, num_groups,
                                                      ignore_index, seq_len, chunk_size)
    grad_hidden = hidden.new_empty(hidden.shape) if need_grad_hidden else _empty(hidden)
    grad_weight = hidden.new_empty(weight.shape, dtype=acc) if need_grad_weight else _empty(hidden)
    grad_bias = hidden.new_empty((weight.shape[0],), dtype=acc) if need_grad_bias and bias is not None \
        else _empty(hidden)
    return loss, group_sums, token_counts, grad_hidden, grad_weight, grad_bias


@torch.library.custom_op("aioli_ext::group_linear_cross_entropy_backward", mutates_args=())
def _backward_op(coef: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 targets: torch.Tensor, ignore_index: int, chunk_size: int, need_grad_hidden: bool,
                 need_grad_weight: bool, need_grad_bias: bool, saved_grad_hidden: Optional[torch.Tensor],
                 saved_grad_weight: Optional[torch.Tensor], saved_grad_bias: Optional[torch.Tensor]
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients for per-row coefficients coef [N] (fp32 / fp64): scales the saved unit gradients when coef is
    constant over the non-ignored rows, else recomputes them chunk by chunk. Empty [0] where not needed.
    Used by the traced (torch.compile) backward; the eager backward runs the same code directly."""
    with _without_autocast(hidden):
        grads = _gradients_from_coefficients(
            coef, hidden, weight, bias, targets, ignore_index, chunk_size,
            (need_grad_hidden, need_grad_weight, need_grad_bias),
            (saved_grad_hidden, saved_grad_weight, saved_grad_bias), in_place=False)
    return tuple(_empty(hidden) if g is None else g for g in grads)


@_backward_op.register_fake
def _backward_fake(coef, hidden, weight, bias, targets, ignore_index, chunk_size, need_grad_hidden,
                   need_grad_weight, need_grad_bias, saved_grad_hidden, saved_grad_weight, saved_grad_bias):
    return (hidden.new_empty(hidden.shape) if need_grad_hidden else _empty(hidden),
            weight.new_empty(weight.shape) if need_grad_weight else _empty(hidden),
            bias.new_empty(bias.shape) if need_grad_bias and bias is not None else _empty(hidden))


def _runs_eagerly(tensor):
    """Real tensors outside any tracing: host reads and in-place shortcuts are allowed."""
    return (not torch.compiler.is_compiling() and type(tensor) is torch.Tensor
            and not torch.utils._python_dispatch.is_in_torch_dispatch_mode())


def _backward(ctx, coef, need, saved):
    hidden, weight, bias, targets = ctx.inputs_for_backward
    if _runs_eagerly(hidden):
        in_place = getattr(ctx, "saved_gradient_is_private", False) and _can_consume_saved_gradient(hidden)
        with _without_autocast(hidden):
            return _gradients_from_coefficients(coef, hidden, weight, bias, targets, ctx.ignore_index,
                                                ctx.chunk_size, need, saved, in_place)
    grads = _backward_op(coef, hidden, weight, bias, targets, ctx.ignore_index, ctx.chunk_size, *need, *saved)
    return tuple(g if wanted else None for g, wanted in zip(grads, need))


def _statistics_setup_context(ctx, inputs, output):
    hidden, weight, bias, targets, group_ids, num_groups, ignore_index, seq_len, chunk_size = inputs
    ctx.mark_non_differentiable(output[2])
    ctx.save_for_backward(hidden, weight, bias, targets, group_ids)
    ctx.ignore_index, ctx.seq_len, ctx.chunk_size = ignore_index, seq_len, chunk_size


def _statistics_backward(ctx, grad_loss, grad_group_sums, _grad_counts):
    hidden, weight, bias, targets, group_ids = ctx.saved_tensors
    coef = _row_coefficients(grad_loss, grad_group_sums, targets, group_ids, ctx.seq_len, ctx.ignore_index,
                             _acc_dtype(hidden))
    ctx.inputs_for_backward = (hidden, weight, bias, targets)
    need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bool(ctx.needs_input_grad[2]))
    grad_hidden, grad_weight, grad_bias = _backward(ctx, coef, need, (None, None, None))
    return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None


_statistics_op.register_autograd(_statistics_backward, setup_context=_statistics_setup_context)


def _with_grad_setup_context(ctx, inputs, output):
    (hidden, weight, bias, targets, group_ids, num_groups, ignore_index, seq_len, chunk_size,
     need_grad_hidden, need_grad_weight, need_grad_bias) = inputs
    _, _, token_counts, grad_hidden, grad_weight, grad_bias = output
    ctx.mark_non_differentiable(token_counts, grad_hidden, grad_weight, grad_bias)
    ctx.save_for_backward(hidden, weight, bias, targets, group_ids, grad_hidden, grad_weight, grad_bias)
    ctx.ignore_index, ctx.seq_len, ctx.chunk_size = ignore_index, seq_len, chunk_size
    ctx.computed = (need_grad_hidden, need_grad_weight, need_grad_bias and bias is not None)


def _with_grad_backward(ctx, grad_loss, grad_group_sums, *_grad_non_differentiable):
    hidden, weight, bias, targets, group_ids, grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
    coef = _row_coefficients(grad_loss, grad_group_sums, targets, group_ids, ctx.seq_len, ctx.ignore_index,
                             _acc_dtype(hidden))
    ctx.inputs_for_backward = (hidden, weight, bias, targets)
    need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bool(ctx.needs_input_grad[2]))
    # An input the forward was not asked about (a direct op call) is recomputed, never read from an empty buffer.
    saved = tuple(buffer if computed else None
                  for buffer, computed in zip((grad_hidden, grad_weight, grad_bias), ctx.computed))
    grads = _backward(ctx, coef, need, saved)
    return (*grads, None, None, None, None, None, None, None, None, None)


_with_grad_op.register_autograd(_with_grad_backward, setup_context=_with_grad_setup_context)


# ------------------------------------------------------------------------------------------------ the API

def _flatten_linear_args(hidden, targets, group_ids):
    """[N, D] or [B, T, D] hidden -> ([N, D] hidden, [N] targets, group ids, seq_len), with the argument rules
    (and messages) of group_cross_entropy's logits."""
    return _flatten_group_loss_args(hidden, targets, group_ids, name="hidden", last_dim="D")


def group_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               group_ids: torch.Tensor, num_groups: int, *, bias: Optional[torch.Tensor] = None,
                               ignore_index: int = -100, chunk_size: Optional[int] = None):
    """Per-group token cross-entropy of the LM head ``hidden @ weight.T (+ bias)``, without [N, V] logits.

    Args:
        hidden: [N, D] or [B, T, D]; float32, float16, bfloat16 (float64 for gradcheck). CPU or CUDA.
        weight: [V, D], hidden's dtype and device (the LM head / tied embedding).
        targets: int64, ``hidden.shape[:-1]``; each in [0, V) or equal to ``ignore_index``.
        group_ids: int32 or int64 in [0, num_groups): per token (the targets' shape), or per sequence [B] when
            hidden is [B, T, D].
        num_groups: K >= 1.
        bias: optional [V], hidden's dtype.
        ignore_index: targets equal to it contribute loss 0 and are not counted.
        chunk_size: rows per chunk (>= 1). Default :func:`default_chunk_size`: chunks whose [C, V] logits fit
            in CHUNK_LOGITS_BYTES (256 MiB), a multiple of 16 rows.

    Returns:
        (loss, group_sums, token_counts) as :func:`aioli_ext.group_cross_entropy` returns for the logits
        ``hidden @ weight.T + bias``: loss with the targets' shape (fp32; fp64 for fp64 inputs), group_sums [K],
        token_counts [K] int64.

    Differentiable with respect to hidden, weight and bias through loss and group_sums. Memory beyond the
    inputs: one [C, V] chunk buffer plus the gradients (grad_weight kept in fp32 for half inputs), never
    [N, V]. When an input requires grad the forward also computes the gradients for a unit coefficient per row;
    backward rescales them when the upstream coefficient is the same for every counted token (mean / sum
    losses) and otherwise recomputes grad_weight / grad_bias with a second chunked pass (see the module
    docstring). Argument and value checks read two flags from the device (one synchronisation on CUDA).
    Not twice differentiable. Under torch.autocast, hidden, weight and bias are cast to the autocast dtype first
    (as F.linear would be).
    """
    flat_hidden, flat_targets, flat_ids, seq_len = _flatten_linear_args(hidden, targets, group_ids)
    device_type = hidden.device.type
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type) and hidden.is_floating_point():
        # What autocast does to F.linear: the head runs in the autocast dtype; the casts are differentiable, so
        # an fp32 weight still gets an fp32 gradient.
        autocast_dtype = torch.get_autocast_dtype(device_type)
        cast = (lambda t: t.to(autocast_dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
        flat_hidden, weight, bias = cast(flat_hidden), cast(weight), cast(bias)
    if chunk_size is None:
        if hidden.dtype in _FLOAT_DTYPES and weight.dim() == 2:
            chunk_size = default_chunk_size(flat_hidden.shape[0], weight.shape[0], flat_hidden.element_size())
        else:
            chunk_size = 1  # the checks below reject these inputs with their own message
    elif not isinstance(chunk_size, int) or isinstance(chunk_size, bool):
        raise ValueError(f"chunk_size must be an int >= 1 or None, got {chunk_size!r}")
    _check_linear_args(flat_hidden, weight, bias, flat_targets, flat_ids, num_groups, seq_len, chunk_size)
    need = (flat_hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    if torch.is_grad_enabled() and any(need):
        loss, group_sums, token_counts, *_ = _with_grad_op(flat_hidden, weight, bias, flat_targets, flat_ids,
                                                           num_groups, ignore_index, seq_len, chunk_size, *need)
        if not torch.compiler.is_compiling() and loss.grad_fn is not None:
            # The unit gradients were dropped just above, so backward may scale them in place.
            loss.grad_fn.saved_gradient_is_private = True
    else:
        loss, group_sums, token_counts = _statistics_op(flat_hidden, weight, bias, flat_targets, flat_ids,
                                                        num_groups, ignore_index, seq_len, chunk_size)
    return loss.view(targets.shape), group_sums, token_counts
