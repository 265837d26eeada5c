"""aioli_ext.group_cross_entropy / group_cross_entropy_fused and their ops against the pure-torch reference."""
import os

import pytest
import torch

import aioli_ext
from aioli_ext import group_cross_entropy, group_cross_entropy_fused
from aioli_ext.reference import group_cross_entropy_reference, group_objective_reference

ops = torch.ops.aioli_ext

from devices import DEVICES, requires_cuda

# (dtype, loss tolerance, gradient tolerance), used as rtol = atol.
# The reference upcasts the very same logits to fp64, so for fp32/fp16/bf16 the loss differs only by the
# kernel's fp32 accumulation and its polynomial exp (a few ulp of fp32, ~1e-6 relative): one loss tolerance
# for all three. The gradient is stored in the logits' dtype, so its tolerance is that dtype's rounding of
# values of magnitude <= ~1.5 (half an ulp plus one more rounding when backward rescales the saved rows:
# 2^-7 for bf16, 2^-10 for fp16, a few 2^-24 for fp32). fp64 runs std::exp in fp64.
DTYPE_TOLS = [
    pytest.param(torch.float32, 1e-5, 1e-5, id="fp32"),
    pytest.param(torch.bfloat16, 1e-5, 1e-2, id="bf16"),
    pytest.param(torch.float16, 1e-5, 2e-3, id="fp16"),
    pytest.param(torch.float64, 1e-10, 1e-10, id="fp64"),
]


def make_inputs(rows, vocab, num_groups, dtype=torch.float32, device="cpu", ignore_frac=0.1, seed=0,
                scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=gen, dtype=torch.float64) * scale).to(dtype)
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    targets[torch.rand(rows, generator=gen) < ignore_frac] = -100
    group_ids = torch.randint(0, num_groups, (rows,), generator=gen)
    return logits.to(device), targets.to(device), group_ids.to(device)


def assert_close(actual, expected, tol):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=tol, atol=tol)


def assert_stats_match(got, ref, tol):
    loss, group_sums, token_counts = got
    ref_loss, ref_sums, ref_counts = ref
    assert loss.shape == ref_loss.shape
    assert_close(loss, ref_loss, tol)
    assert_close(group_sums, ref_sums, tol)
    assert torch.equal(token_counts.cpu(), ref_counts.cpu())


@pytest.fixture
def restore_cpu_capability():
    yield
    aioli_ext.cpu_capability("")


def supported_capabilities():
    best = aioli_ext.cpu_capability("")
    return ["default", "avx2", "avx512"][: ["default", "avx2", "avx512"].index(best) + 1]


# ------------------------------------------------------------------------------------------------- forward

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,loss_tol,grad_tol", DTYPE_TOLS)
@pytest.mark.parametrize("rows,vocab", [(1, 1), (9, 3), (33, 111), (3, 50304), (0, 11), (1, 7), (4097, 37)])
def test_forward_matches_reference(device, dtype, loss_tol, grad_tol, rows, vocab):
    num_groups = 5
    logits, targets, group_ids = make_inputs(rows, vocab, num_groups, dtype, device)
    got = group_cross_entropy(logits, targets, group_ids, num_groups)
    ref = group_cross_entropy_reference(logits, targets, group_ids, num_groups)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert got[0].dtype == acc and got[1].dtype == acc and got[2].dtype == torch.int64
    assert_stats_match(got, ref, loss_tol)


@pytest.mark.parametrize("device", DEVICES)
def test_ignored_rows_are_zero_and_uncounted(device):
    logits, targets, group_ids = make_inputs(64, 50, 4, device=device, ignore_frac=0.5)
    loss, group_sums, token_counts = group_cross_entropy(logits, targets, group_ids, 4)
    ignored = targets == -100
    assert ignored.any() and (~ignored).any()
    assert torch.all(loss[ignored] == 0) and torch.all(loss[~ignored] > 0)
    assert int(token_counts.sum()) == int((~ignored).sum())


@pytest.mark.parametrize("device", DEVICES)
def test_custom_ignore_index_inside_vocabulary(device):
    logits, targets, group_ids = make_inputs(40, 20, 3, device=device, ignore_frac=0.0)
    targets[::3] = 0
    got = group_cross_entropy(logits, targets, group_ids, 3, ignore_index=0)
    ref = group_cross_entropy_reference(logits, targets, group_ids, 3, ignore_index=0)
    assert_stats_match(got, ref, 1e-5)
    assert torch.all(got[0][targets == 0] == 0)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_input_gives_zeros_and_empty_gradients(device):
    for logits, targets, group_ids in [
        (torch.randn(0, 7), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)),
        (torch.randn(2, 0, 7), torch.zeros(2, 0, dtype=torch.long), torch.tensor([0, 2])),  # per sequence, T = 0
    ]:
        logits, targets, group_ids = logits.to(device), targets.to(device), group_ids.to(device)
        x = logits.clone().requires_grad_()
        loss, group_sums, token_counts = group_cross_entropy(x, targets, group_ids, 3)
        assert loss.shape == targets.shape
        assert torch.all(group_sums == 0) and torch.all(token_counts == 0) and group_sums.shape == (3,)
        (loss.sum() + group_sums.sum()).backward()
        assert x.grad.shape == logits.shape
        result = group_cross_entropy_fused(logits, targets, group_ids, 3, normalize="groups")
        assert float(result.objective) == 0.0 and result.grad.shape == logits.shape


@pytest.mark.parametrize("device", DEVICES)
def test_all_tokens_ignored(device):
    logits, targets, group_ids = make_inputs(17, 30, 3, device=device)
    targets.fill_(-100)
    loss, group_sums, token_counts = group_cross_entropy(logits, targets, group_ids, 3)
    assert torch.all(loss == 0) and torch.all(group_sums == 0) and torch.all(token_counts == 0)
    result = group_cross_entropy_fused(logits, targets, group_ids, 3)
    assert float(result.objective) == 0.0 and torch.all(result.grad == 0)
    x = logits.clone().requires_grad_()
    group_cross_entropy(x, targets, group_ids, 3)[0].sum().backward()
    assert torch.all(x.grad == 0)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_groups_get_zero(device):
    logits, targets, group_ids = make_inputs(50, 40, 10, device=device)
    group_ids = torch.where(group_ids < 5, 0, 3).to(device)
    loss, group_sums, token_counts = group_cross_entropy(logits, targets, group_ids, 10)
    empty = torch.ones(10, dtype=torch.bool)
    empty[[0, 3]] = False
    assert torch.all(group_sums.cpu()[empty] == 0) and torch.all(token_counts.cpu()[empty] == 0)
    assert_stats_match((loss, group_sums, token_counts),
                       group_cross_entropy_reference(logits, targets, group_ids, 10), 1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_per_sequence_group_ids(device, id_dtype):
    batch, seq, vocab, num_groups = 6, 7, 53, 4
    logits, targets, _ = make_inputs(batch * seq, vocab, num_groups, device=device)
    logits, targets = logits.view(batch, seq, vocab), targets.view(batch, seq)
    seq_groups = torch.tensor([3, 0, 3, 1, 1, 2], dtype=id_dtype, device=device)
    got = group_cross_entropy(logits, targets, seq_groups, num_groups)
    assert got[0].shape == (batch, seq)
    per_token = group_cross_entropy(logits, targets, seq_groups[:, None].expand(batch, seq), num_groups)
    for a, b in zip(got, per_token):
        assert torch.equal(a, b)
    assert_stats_match(got, group_cross_entropy_reference(logits, targets, seq_groups, num_groups), 1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_int32_group_ids_match_int64(device):
    logits, targets, group_ids = make_inputs(70, 90, 6, device=device)
    a = group_cross_entropy(logits, targets, group_ids, 6)
    b = group_cross_entropy(logits, targets, group_ids.int(), 6)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("device", DEVICES)
def test_a_million_groups(device):
    num_groups = 1_000_000
    logits, targets, _ = make_inputs(20, 30, 2, device=device)
    group_ids = torch.arange(20, device=device) * 49_999 + 7
    got = group_cross_entropy(logits, targets, group_ids, num_groups)
    assert got[1].shape == (num_groups,)
    assert_stats_match(got, group_cross_entropy_reference(logits, targets, group_ids, num_groups), 1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_masked_and_extreme_logits(device):
    logits, targets, group_ids = make_inputs(24, 300, 3, device=device, ignore_frac=0.0, scale=1e3)
    logits[:, 100:] = float("-inf")  # a masked part of the vocabulary
    logits[5] = float("-inf")
    logits[5, 7] = 0.0
    targets = targets % 100
    targets[5] = 7  # its only finite logit: loss 0
    got = group_cross_entropy(logits, targets, group_ids, 3)
    ref = group_cross_entropy_reference(logits, targets, group_ids, 3)
    assert torch.isfinite(got[0]).all()
    assert_stats_match(got, ref, 1e-5)
    result = group_cross_entropy_fused(logits, targets, group_ids, 3, normalize="none")
    assert torch.all(result.grad[:, 100:] == 0)


@pytest.mark.parametrize("device", DEVICES)
def test_nan_logit_gives_nan_loss_for_its_row_only(device):
    logits, targets, group_ids = make_inputs(8, 1000, 2, device=device, ignore_frac=0.0)
    logits[3, 517] = float("nan")
    loss = group_cross_entropy(logits, targets, group_ids, 2)[0]
    assert torch.isnan(loss[3]) and torch.isfinite(loss[torch.arange(8, device=device) != 3]).all()


# ------------------------------------------------------------------------------------------------ gradients

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,loss_tol,grad_tol", DTYPE_TOLS)
@pytest.mark.parametrize("rows,vocab", [(33, 111), (5, 3000)])
def test_backward_matches_reference_autograd(device, dtype, loss_tol, grad_tol, rows, vocab):
    num_groups = 4
    logits, targets, group_ids = make_inputs(rows, vocab, num_groups, dtype, device)
    gen = torch.Generator().manual_seed(1)
    grad_loss = (torch.rand(rows, generator=gen, dtype=torch.float64) + 0.25).to(device)
    grad_sums = (torch.rand(num_groups, generator=gen, dtype=torch.float64) * 0.5).to(device)

    x = logits.clone().requires_grad_()
    loss, group_sums, _ = group_cross_entropy(x, targets, group_ids, num_groups)
    ((loss * grad_loss.to(loss.dtype)).sum() + (group_sums * grad_sums.to(loss.dtype)).sum()).backward()

    x_ref = logits.clone().requires_grad_()
    ref_loss, ref_sums, _ = group_cross_entropy_reference(x_ref, targets, group_ids, num_groups)
    ((ref_loss * grad_loss).sum() + (ref_sums * grad_sums).sum()).backward()

    assert x.grad.dtype == dtype
    assert_close(x.grad, x_ref.grad, grad_tol)
    assert_close(loss, ref_loss, loss_tol)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_through_per_sequence_ids_and_3d_logits(device):
    batch, seq, vocab, num_groups = 3, 5, 40, 3
    logits, targets, _ = make_inputs(batch * seq, vocab, num_groups, device=device)
    logits, targets = logits.view(batch, seq, vocab), targets.view(batch, seq)
    seq_groups = torch.tensor([2, 0, 2], device=device)
    weights = torch.tensor([0.5, 2.0, 1.5], device=device)
    x = logits.clone().requires_grad_()
    _, group_sums, _ = group_cross_entropy(x, targets, seq_groups, num_groups)
    (group_sums * weights).sum().backward()
    x_ref = logits.double().requires_grad_()
    (group_cross_entropy_reference(x_ref, targets, seq_groups, num_groups)[1] * weights.double()).sum().backward()
    assert_close(x.grad, x_ref.grad, 1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_fp64(device):
    logits, targets, group_ids = make_inputs(12, 9, 3, torch.float64, device, ignore_frac=0.2)
    x = logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a: group_cross_entropy(a, targets, group_ids, 3)[:2], (x,))
    # The raw op's own autograd (re-reads the logits in backward) must be right as well.
    assert torch.autograd.gradcheck(lambda a: ops.group_cross_entropy(a, targets, group_ids, 3, -100, 1)[:2], (x,))


@pytest.mark.parametrize("device", DEVICES)
def test_retained_graph_gives_the_same_gradient_twice(device):
    logits, targets, group_ids = make_inputs(30, 64, 3, device=device)
    x = logits.clone().requires_grad_()
    loss = group_cross_entropy(x, targets, group_ids, 3)[0]
    first = torch.autograd.grad(loss.sum() * 0.5, x, retain_graph=True)[0]
    second = torch.autograd.grad(loss.sum() * 0.5, x)[0]
    assert torch.equal(first, second)


@pytest.mark.parametrize("device", DEVICES)
def test_double_backward_is_rejected(device):
    logits, targets, group_ids = make_inputs(10, 20, 2, device=device)
    x = logits.clone().requires_grad_()
    for loss in (group_cross_entropy(x, targets, group_ids, 2)[0],
                 ops.group_cross_entropy(x, targets, group_ids, 2, -100, 1)[0]):
        with pytest.raises(RuntimeError, match="not twice differentiable"):
            torch.autograd.grad(loss.sum(), x, create_graph=True)


@pytest.mark.parametrize("device", DEVICES)
def test_with_grad_op_output_is_not_modified_by_backward(device):
    # Calling the op directly, the caller holds grad_logits: backward must not scale it in place.
    logits, targets, group_ids = make_inputs(20, 50, 2, device=device)
    x = logits.clone().requires_grad_()
    scale = torch.ones(2, device=device)
    loss, _, _, grad_logits = ops.group_cross_entropy_with_grad(x, targets, group_ids, 2, -100, 1, scale)
    before = grad_logits.clone()
    (loss.sum() * 3.0).backward()
    assert torch.equal(grad_logits, before)
    assert_close(x.grad, before * 3.0, 1e-6)


# ---------------------------------------------------------------------------------------------- fused path

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,loss_tol,grad_tol", DTYPE_TOLS)
@pytest.mark.parametrize("normalize", ["tokens", "groups", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_fused_objective_and_gradient(device, dtype, loss_tol, grad_tol, normalize, weighted):
    num_groups = 5
    logits, targets, group_ids = make_inputs(41, 77, num_groups, dtype, device)
    group_ids[group_ids == 4] = 3  # group 4 empty: its weight must not matter
    weights = torch.tensor([0.1, 0.3, 0.2, 0.4, 7.0], device=device) if weighted else None
    result = group_cross_entropy_fused(logits, targets, group_ids, num_groups, group_weights=weights,
                                       normalize=normalize)
    x_ref = logits.clone().requires_grad_()
    _, ref_sums, ref_counts = group_cross_entropy_reference(x_ref, targets, group_ids, num_groups)
    ref_objective = group_objective_reference(ref_sums, ref_counts, weights, normalize)
    ref_objective.backward()
    assert_close(result.objective, ref_objective, loss_tol)
    assert result.grad.dtype == dtype and result.grad.shape == logits.shape
    # The gradient here is the objective's (scale <= 1 per row), so the same dtype tolerance holds.
    assert_close(result.grad, x_ref.grad, grad_tol)
    assert_stats_match(result[:3], group_cross_entropy_reference(logits, targets, group_ids, num_groups), loss_tol)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_buffer_reuse_and_in_place(device):
    batch, seq, vocab, num_groups = 4, 6, 97, 3
    logits, targets, _ = make_inputs(batch * seq, vocab, num_groups, device=device)
    logits, targets = logits.view(batch, seq, vocab), targets.view(batch, seq)
    seq_groups = torch.tensor([0, 2, 2, 1], device=device)
    fresh = group_cross_entropy_fused(logits, targets, seq_groups, num_groups, normalize="groups")
    buffer = torch.full_like(logits, 123.0)
    reused = group_cross_entropy_fused(logits, targets, seq_groups, num_groups, normalize="groups", grad_out=buffer)
    assert reused.grad.data_ptr() == buffer.data_ptr() and torch.equal(buffer, fresh.grad)
    overwritten = logits.clone()
    in_place = group_cross_entropy_fused(overwritten, targets, seq_groups, num_groups, normalize="groups",
                                         inplace=True)
    assert in_place.grad.data_ptr() == overwritten.data_ptr()
    assert torch.equal(overwritten, fresh.grad)
    for a, b in zip(in_place[:4], fresh[:4]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype,vocab", [(torch.float32, 65536), (torch.bfloat16, 65537)])
def test_large_gradient_buffers_fresh_reused_and_in_place_agree(dtype, vocab):
    # Over 16 MB, so the CPU kernel writes a reused (resident) buffer with streaming stores, a fresh one with
    # plain stores on huge pages; odd vocab sizes misalign the rows and exercise the peeled head of each row.
    rows = 72 if dtype == torch.float32 else 130
    logits, targets, group_ids = make_inputs(rows, vocab, 3, dtype)
    fresh = group_cross_entropy_fused(logits, targets, group_ids, 3, normalize="groups")
    buffer = torch.zeros_like(logits)
    reused = group_cross_entropy_fused(logits, targets, group_ids, 3, normalize="groups", grad_out=buffer)
    overwritten = logits.clone()
    group_cross_entropy_fused(overwritten, targets, group_ids, 3, normalize="groups", inplace=True)
    assert torch.equal(reused.grad, fresh.grad) and torch.equal(overwritten, fresh.grad)
    x_ref = logits.clone().requires_grad_()
    _, sums, counts = group_cross_entropy_reference(x_ref, targets, group_ids, 3)
    group_objective_reference(sums, counts, normalize="groups").backward()
    assert_close(fresh.grad, x_ref.grad, 1e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_gradient_feeds_autograd(device):
    # Typical use: the model's logits require grad; the fused gradient goes back through logits.backward().
    logits, targets, group_ids = make_inputs(16, 40, 2, device=device)
    weight = torch.randn(40, 40, dtype=torch.float32, device=device, requires_grad=True)
    hidden = logits.float()
    out = group_cross_entropy_fused(hidden @ weight, targets, group_ids, 2)
    (hidden @ weight).backward(out.grad)
    ref_weight = weight.detach().clone().requires_grad_()
    _, sums, counts = group_cross_entropy_reference(hidden @ ref_weight, targets, group_ids, 2)
    group_objective_reference(sums, counts).backward()
    assert_close(weight.grad, ref_weight.grad, 1e-5)


@pytest.mark.parametrize("dtype,loss_tol,grad_tol", DTYPE_TOLS)
def test_scale_rows_matches_torch(restore_cpu_capability, dtype, loss_tol, grad_tol):
    # The CPU op behind backward's row scaling: one rounding of the fp32 product, like torch's mul of the
    # widened tensor, on every ISA path (odd width: vector tails).
    x = (torch.randn(19, 1001, dtype=torch.float64) * 3).to(dtype)
    row_scale = torch.rand(19, dtype=torch.float64 if dtype == torch.float64 else torch.float32) * 4 - 2
    expected = (x.to(row_scale.dtype) * row_scale[:, None]).to(dtype)
    for capability in supported_capabilities():
        aioli_ext.cpu_capability(capability)
        got = x.clone()
        ops.scale_rows_(got, row_scale)
        assert torch.equal(got, expected)
    torch.library.opcheck(ops.scale_rows_, (x.clone(), row_scale))
    with pytest.raises(RuntimeError, match=r"row_scale must be 1-D \[N\] with N = x.size\(0\) = 19, got shape \[18\]"):
        ops.scale_rows_(x.clone(), row_scale[:18])
    with pytest.raises(RuntimeError, match=r"x must be contiguous"):
        ops.scale_rows_(x.t(), row_scale)


# ------------------------------------------------------------------------------------- torch.library checks

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op_name", ["group_cross_entropy", "group_cross_entropy_with_grad",
                                     "group_cross_entropy_fused"])
@pytest.mark.parametrize("per_sequence", [False, True])
def test_opcheck(device, op_name, per_sequence):
    logits, targets, group_ids = make_inputs(12, 19, 3, torch.float32, device)
    seq_len = 4 if per_sequence else 1
    if per_sequence:
        group_ids = group_ids[:3]
    scale = torch.tensor([0.5, 1.0, 2.0], device=device)
    x = logits.clone().requires_grad_(op_name != "group_cross_entropy_fused")
    args = {
        "group_cross_entropy": (x, targets, group_ids, 3, -100, seq_len),
        "group_cross_entropy_with_grad": (x, targets, group_ids, 3, -100, seq_len, scale),
        "group_cross_entropy_fused": (x, targets, group_ids, 3, -100, seq_len, scale, torch.empty_like(x)),
    }[op_name]
    torch.library.opcheck(getattr(ops, op_name), args)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    def mean_loss_and_group_means(logits, targets, group_ids):
        loss, group_sums, token_counts = group_cross_entropy(logits, targets, group_ids, 4)
        return group_sums.sum() / token_counts.sum(), group_sums / token_counts.clamp_min(1)

    compiled = torch.compile(mean_loss_and_group_means, fullgraph=True)
    logits, targets, group_ids = make_inputs(24, 33, 4, device=device)
    x_eager = logits.clone().requires_grad_()
    x_compiled = logits.clone().requires_grad_()
    eager = mean_loss_and_group_means(x_eager, targets, group_ids)
    got = compiled(x_compiled, targets, group_ids)
    assert_close(got[0], eager[0], 1e-6)
    assert_close(got[1], eager[1], 1e-6)
    got[0].backward()
    eager[0].backward()
    assert_close(x_compiled.grad, x_eager.grad, 1e-6)
    with torch.no_grad():
        assert_close(compiled(logits, targets, group_ids)[0], eager[0], 1e-6)


# ------------------------------------------------------- plain loss.backward(): reused buffers, predicted scale

# 64 x 32768 fp32 = 8 MiB, above the 4 MiB from which CPU gradient buffers are cached.
CACHED_SHAPE = (64, 32768)


@pytest.fixture
def clean_gradient_state():
    """An empty buffer cache with its default limit and a prediction that knows nothing, before and after."""
    limit = aioli_ext.gradient_buffer_cache(clear=True).max_bytes
    aioli_ext.gradient_scale_prediction(True, reset=True)
    yield
    aioli_ext.gradient_buffer_cache(limit, clear=True)
    aioli_ext.gradient_scale_prediction(True, reset=True)


def cached_inputs(seed):
    return make_inputs(*CACHED_SHAPE, 3, seed=seed)


def token_mean_backward(x, targets, group_ids, num_groups=3):
    _, group_sums, token_counts = group_cross_entropy(x, targets, group_ids, num_groups)
    (group_sums.sum() / token_counts.sum()).backward()


def test_released_gradient_buffer_is_reused(clean_gradient_state):
    logits, targets, group_ids = cached_inputs(0)
    x = logits.clone().requires_grad_()
    token_mean_backward(x, targets, group_ids)
    first, first_ptr = x.grad.clone(), x.grad.data_ptr()
    before = aioli_ext.gradient_buffer_cache()
    assert before.buffers == 1 and before.idle_bytes == 0  # x.grad is that buffer
    x.grad = None  # as zero_grad(set_to_none=True): nothing references the buffer now
    assert aioli_ext.gradient_buffer_cache().idle_bytes == logits.numel() * 4
    token_mean_backward(x, targets, group_ids)
    after = aioli_ext.gradient_buffer_cache()
    assert x.grad.data_ptr() == first_ptr and after.reuses == before.reuses + 1
    assert after.allocations == before.allocations
    assert torch.equal(x.grad, first)


def _hold(grad, how):
    if how == "tensor":
        return grad
    if how == "view":
        return grad[5:9, 100:200]
    if how == "storage":
        return grad.untyped_storage()
    if how == "numpy":
        return grad.numpy()
    # A weak reference to the storage can be turned back into a storage: it must block reuse too.
    from torch.multiprocessing.reductions import StorageWeakRef
    return StorageWeakRef(grad.untyped_storage())


@pytest.mark.parametrize("how", ["tensor", "view", "storage", "numpy", "storage_weak_ref"])
def test_held_gradient_is_never_overwritten(clean_gradient_state, how):
    logits, targets, group_ids = cached_inputs(0)
    x = logits.clone().requires_grad_()
    token_mean_backward(x, targets, group_ids)
    held_ptr, snapshot = x.grad.data_ptr(), x.grad.clone()
    holder = _hold(x.grad, how)
    x.grad = None
    reuses = aioli_ext.gradient_buffer_cache().reuses
    other_logits, other_targets, other_ids = cached_inputs(1)
    y = other_logits.clone().requires_grad_()
    token_mean_backward(y, other_targets, other_ids)
    assert y.grad.data_ptr() != held_ptr
    assert not torch.equal(y.grad, snapshot)  # different inputs, so an overwrite would show
    if how != "storage_weak_ref":
        held = torch.as_tensor(holder) if how == "numpy" else holder
        if how == "storage":
            held = torch.empty(0).set_(holder).view(CACHED_SHAPE)
        expected = snapshot[5:9, 100:200] if how == "view" else snapshot
        assert torch.equal(held, expected)
    assert aioli_ext.gradient_buffer_cache().reuses == reuses


def test_accumulated_gradient_is_exact(clean_gradient_state):
    # Without zeroing, .grad keeps the first buffer and later gradients are added into it: the cache must
    # hand out a different buffer every step while .grad holds one (then reuse that other one).
    x = cached_inputs(0)[0].clone().requires_grad_()
    x_ref = x.detach().double().requires_grad_()
    reuses = aioli_ext.gradient_buffer_cache().reuses
    for seed in range(3):
        _, targets, group_ids = cached_inputs(seed)
        token_mean_backward(x, targets, group_ids)
        _, sums, counts = group_cross_entropy_reference(x_ref, targets, group_ids, 3)
        (sums.sum() / counts.sum()).backward()
    assert_close(x.grad, x_ref.grad, 1e-5)
    info = aioli_ext.gradient_buffer_cache()
    assert info.reuses == reuses + 1 and info.buffers == 2


def test_threads_never_share_a_held_gradient(clean_gradient_state):
    import threading

    kept, errors = [], []

    def worker(thread):
        try:
            for step in range(4):
                logits, targets, group_ids = cached_inputs(10 * thread + step)
                x = logits.requires_grad_()
                token_mean_backward(x, targets, group_ids)
                if step % 2 == 0:  # keep every other gradient, with a copy taken before anything else ran on it
                    kept.append((x.grad, x.grad.clone()))
        except Exception as exc:  # noqa: BLE001 (reported in the main thread)
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(kept) == 4 and len({grad.data_ptr() for grad, _ in kept}) == 4
    for grad, copy in kept:
        assert torch.equal(grad, copy)


def test_gradient_cache_limit_and_switch_off(clean_gradient_state):
    logits, targets, group_ids = cached_inputs(0)
    x = logits.clone().requires_grad_()
    before = aioli_ext.gradient_buffer_cache(0)
    assert before.max_bytes == 0 and before.cached_bytes == 0
    for _ in range(2):
        x.grad = None
        token_mean_backward(x, targets, group_ids)
    info = aioli_ext.gradient_buffer_cache()
    assert info.reuses == before.reuses and info.buffers == 0 and info.allocations == before.allocations + 2
    # A limit below one buffer caches nothing either.
    aioli_ext.gradient_buffer_cache(logits.numel() * 4 - 1)
    x.grad = None
    token_mean_backward(x, targets, group_ids)
    assert aioli_ext.gradient_buffer_cache().buffers == 0
    with pytest.raises(ValueError, match=r"max_bytes must be >= 0 \(0 disables the gradient buffer cache\), got -1"):
        aioli_ext.gradient_buffer_cache(-1)


def test_gradient_cache_environment_variable_is_checked():
    import subprocess
    import sys

    code = "import aioli_ext; print(aioli_ext.gradient_buffer_cache().max_bytes)"
    env = dict(os.environ, AIOLI_EXT_GRADIENT_CACHE_BYTES="lots")
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0
    assert "AIOLI_EXT_GRADIENT_CACHE_BYTES must be a whole number of bytes >= 0" in bad.stderr
    env["AIOLI_EXT_GRADIENT_CACHE_BYTES"] = "12345"
    good = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert good.returncode == 0 and good.stdout.strip() == "12345"


GROUP_WEIGHTS = torch.tensor([0.1, 0.3, 0.2, 0.4, 7.0], dtype=torch.float64)

# Objectives of (per-token loss, group_sums, token_counts), and whether the prediction must know them from the
# first step (the token mean) or from the second (one miss teaches the form). Weighted forms are learned over
# a few steps; for them only the gradient is checked.
USUAL_OBJECTIVES = {
    "token_mean_of_sums": (lambda l, s, c: s.sum() / c.sum(), 1),
    "token_mean_of_losses": (lambda l, s, c: l.sum() / c.sum(), 1),
    "mean_over_rows": (lambda l, s, c: l.mean(), 2),
    "loss_scaled_token_mean": (lambda l, s, c: (s.sum() / c.sum()) * 1024.0, 2),
    "accumulation_step_of_3": (lambda l, s, c: (s.sum() / c.sum()) / 3, 2),
    "sum": (lambda l, s, c: l.sum(), 2),
    "weighted_group_means": (lambda l, s, c: (GROUP_WEIGHTS.to(s.dtype) * s / c.clamp_min(1)).sum(), None),
    "weighted_token_mean": (lambda l, s, c: (GROUP_WEIGHTS.to(s.dtype) * s).sum() / c.sum(), None),
}


def _plain_gradient(objective, logits, targets, group_ids, num_groups):
    x = logits.clone().requires_grad_()
    objective(*group_cross_entropy(x, targets, group_ids, num_groups)).backward()
    return x.grad


@pytest.mark.parametrize("dtype,loss_tol,grad_tol", DTYPE_TOLS[:3])
@pytest.mark.parametrize("name", sorted(USUAL_OBJECTIVES))
def test_predicted_scale_gives_the_general_gradient(clean_gradient_state, dtype, loss_tol, grad_tol, name):
    objective, hits_from = USUAL_OBJECTIVES[name]
    steps, num_groups = 5, 5
    hit_steps = []
    for step in range(steps):
        # Counts change from step to step (different ignored tokens), as in training.
        logits, targets, group_ids = make_inputs(48, 61, num_groups, dtype, seed=step, ignore_frac=0.2)
        before = aioli_ext.gradient_scale_prediction().hits
        predicted = _plain_gradient(objective, logits, targets, group_ids, num_groups)
        hit_steps.append(aioli_ext.gradient_scale_prediction().hits > before)
        aioli_ext.gradient_scale_prediction(False)
        general = _plain_gradient(objective, logits, targets, group_ids, num_groups)
        aioli_ext.gradient_scale_prediction(True)
        x_ref = logits.clone().requires_grad_()
        objective(*group_cross_entropy_reference(x_ref, targets, group_ids, num_groups)).backward()
        assert predicted.dtype == dtype
        assert_close(predicted, x_ref.grad, grad_tol)
        assert_close(predicted, general, grad_tol)
    if hits_from is not None:
        # The token mean is the first prediction (backward then hands the forward's buffer on as it is), except
        # for fp16, which is written unscaled until a backward has shown the real coefficient.
        first_hit = max(hits_from, 2) if dtype == torch.float16 else hits_from
        assert all(hit_steps[first_hit - 1:]), hit_steps


@pytest.mark.parametrize("dtype,loss_tol,grad_tol", DTYPE_TOLS)
def test_arbitrary_upstream_gradients_after_a_learned_prediction(clean_gradient_state, dtype, loss_tol, grad_tol):
    # Teach the predictor a loss-scaled token mean, then send upstream gradients it cannot have guessed.
    num_groups = 4
    for step in range(2):
        logits, targets, group_ids = make_inputs(40, 77, num_groups, dtype, seed=step)
        _plain_gradient(USUAL_OBJECTIVES["loss_scaled_token_mean"][0], logits, targets, group_ids, num_groups)
    gen = torch.Generator().manual_seed(5)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    per_token = torch.randn(40, generator=gen, dtype=torch.float64)
    per_token[::7] = 0
    per_group = torch.randn(num_groups, generator=gen, dtype=torch.float64)
    cases = [lambda l, s, c: (l * per_token.to(acc)).sum(),
             lambda l, s, c: (s * per_group.to(acc)).sum(),
             lambda l, s, c: (l * per_token.to(acc)).sum() + (s * per_group.to(acc)).sum() / c.sum(),
             lambda l, s, c: s[0] * 0.0]
    logits, targets, group_ids = make_inputs(40, 77, num_groups, dtype, seed=9)
    for objective in cases:
        got = _plain_gradient(objective, logits, targets, group_ids, num_groups)
        x_ref = logits.clone().requires_grad_()
        objective(*group_cross_entropy_reference(x_ref, targets, group_ids, num_groups)).backward()
        # The upstream gradients here reach ~3 in magnitude: the rounding of the logits' dtype scales with it.
        assert_close(got, x_ref.grad, 3 * grad_tol)


def test_predicted_token_mean_with_retained_graph():
    logits, targets, group_ids = make_inputs(30, 64, 3)
    x = logits.clone().requires_grad_()
    _, group_sums, token_counts = group_cross_entropy(x, targets, group_ids, 3)
    objective = group_sums.sum() / token_counts.sum()
    first = torch.autograd.grad(objective, x, retain_graph=True)[0]
    kept = first.clone()
    second = torch.autograd.grad(objective, x)[0]
    assert torch.equal(first, kept) and torch.equal(first, second)
    assert first.data_ptr() != second.data_ptr()


# ------------------------------------------------------------------------------- CPU threads and ISA paths

def test_results_do_not_depend_on_thread_count():
    logits, targets, group_ids = make_inputs(515, 3001, 7, dtype=torch.bfloat16)
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            stats = group_cross_entropy(logits, targets, group_ids, 7)
            fused = group_cross_entropy_fused(logits, targets, group_ids, 7, normalize="groups")
            results.append((*stats, fused.objective, fused.grad))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype,loss_tol,grad_tol", DTYPE_TOLS)
def test_each_cpu_isa_path(restore_cpu_capability, dtype, loss_tol, grad_tol):
    # Odd vocabulary sizes exercise the vector tails of every lane width (8 and 16 fp32 lanes).
    logits, targets, group_ids = make_inputs(37, 1237, 5, dtype)
    ref = group_cross_entropy_reference(logits, targets, group_ids, 5)
    x_ref = logits.clone().requires_grad_()
    _, ref_sums, ref_counts = group_cross_entropy_reference(x_ref, targets, group_ids, 5)
    group_objective_reference(ref_sums, ref_counts, normalize="groups").backward()
    outputs = {}
    for capability in supported_capabilities():
        assert aioli_ext.cpu_capability(capability) == capability
        got = group_cross_entropy(logits, targets, group_ids, 5)
        assert_stats_match(got, ref, loss_tol)
        fused = group_cross_entropy_fused(logits, targets, group_ids, 5, normalize="groups")
        assert_close(fused.grad, x_ref.grad, grad_tol)
        outputs[capability] = (got[0], fused.grad)
    for loss, grad in outputs.values():
        assert_close(loss, outputs["default"][0], loss_tol)
        assert_close(grad, outputs["default"][1], grad_tol)


def test_cpu_capability_rejects_unknown_names(restore_cpu_capability):
    with pytest.raises(RuntimeError, match="force must be one of"):
        aioli_ext.cpu_capability("sse9")


# -------------------------------------------------------------------------------------------- bad input

def _valid(device, rows=6, vocab=10, num_groups=3):
    return make_inputs(rows, vocab, num_groups, device=device, ignore_frac=0.0)


BAD_INPUTS = {
    "logits_1d": (lambda l, t, g: (l[0], t, g, 3), ValueError, r"logits must be 2-D \[N, V\] or 3-D \[B, T, V\]"),
    "logits_int": (lambda l, t, g: (l.long(), t, g, 3), RuntimeError,
                   r"logits must be float32, float16, bfloat16 or float64, got Long"),
    "logits_no_columns": (lambda l, t, g: (l[:, :0], t, g, 3), RuntimeError,
                          r"logits must have at least one column \(vocabulary size V >= 1\)"),
    "targets_float": (lambda l, t, g: (l, t.float(), g, 3), RuntimeError, r"targets must be int64, got Float"),
    "targets_shape": (lambda l, t, g: (l, t[:-1], g, 3), ValueError,
                      r"targets must have shape logits.shape\[:-1\] = \(6,\), got \(5,\)"),
    "group_ids_float": (lambda l, t, g: (l, t, g.float(), 3), RuntimeError,
                        r"group_ids must be int32 or int64, got Float"),
    "group_ids_shape": (lambda l, t, g: (l, t, g[:-1], 3), ValueError,
                        r"group_ids must have the targets' shape \(6,\) \(one id per token\), got \(5,\)"),
    "group_ids_per_sequence_shape": (
        lambda l, t, g: (l.view(2, 3, 10), t.view(2, 3), g[:4], 3), ValueError,
        r"group_ids must have the targets' shape \(2, 3\) \(one id per token\) or \[B\] = \(2,\) "
        r"\(one id per sequence\), got \(4,\)"),
    "target_too_large": (lambda l, t, g: (l, t.index_fill(0, torch.tensor([3], device=t.device), 10), g, 3),
                         RuntimeError, r"targets must be in \[0, V\) = \[0, 10\) or equal ignore_index \(-100\), "
                                       r"got targets\[3\] = 10"),
    "target_negative": (lambda l, t, g: (l, t.index_fill(0, torch.tensor([0], device=t.device), -1), g, 3),
                        RuntimeError, r"targets must be in \[0, V\) = \[0, 10\) or equal ignore_index \(-100\), "
                                      r"got targets\[0\] = -1"),
    "group_id_too_large": (lambda l, t, g: (l, t, g.index_fill(0, torch.tensor([5], device=g.device), 3), 3),
                           RuntimeError, r"group_ids must be in \[0, num_groups\) = \[0, 3\), got group_ids\[5\] = 3"),
    "group_id_negative": (lambda l, t, g: (l, t, g.index_fill(0, torch.tensor([2], device=g.device), -2), 3),
                          RuntimeError, r"group_ids must be in \[0, num_groups\) = \[0, 3\), got group_ids\[2\] = -2"),
    "no_groups": (lambda l, t, g: (l, t, g.clamp_max(0), 0), RuntimeError, r"num_groups must be >= 1, got 0"),
    "targets_other_device": (lambda l, t, g: (l, t.to("meta"), g, 3), ValueError,
                             r"logits and targets must be on the same device, got \w+(:\d)? and meta"),
    "group_ids_other_device": (lambda l, t, g: (l, t, g.to("meta"), 3), ValueError,
                               r"logits and group_ids must be on the same device, got \w+(:\d)? and meta"),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
@pytest.mark.parametrize("requires_grad", [False, True])
def test_bad_input_is_rejected_with_its_rule(device, case, requires_grad):
    make_args, error, message = BAD_INPUTS[case]
    logits, targets, group_ids = _valid(device)
    args = make_args(logits, targets, group_ids)
    if requires_grad and args[0].is_floating_point():
        args = (args[0].clone().requires_grad_(),) + args[1:]
    with pytest.raises(error, match=message):
        group_cross_entropy(*args)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_op_level_arguments(device):
    logits, targets, group_ids = _valid(device)
    scale = torch.ones(3, device=device)
    with pytest.raises(RuntimeError, match=r"logits must be 2-D \[N, V\], got 3-D tensor of shape \[2, 3, 10\]"):
        ops.group_cross_entropy(logits.view(2, 3, 10), targets, group_ids, 3, -100, 1)
    with pytest.raises(RuntimeError, match=r"seq_len must divide the number of rows N = 6, got seq_len = 4"):
        ops.group_cross_entropy(logits, targets, group_ids[:1], 3, -100, 4)
    with pytest.raises(RuntimeError, match=r"seq_len must be >= 1, got 0"):
        ops.group_cross_entropy(logits, targets, group_ids, 3, -100, 0)
    with pytest.raises(RuntimeError, match=r"group_ids must be 1-D \[N / seq_len\] \(one id per sequence of "
                                           r"seq_len rows\) = \[2\], got shape \[3\]"):
        ops.group_cross_entropy(logits, targets, group_ids[:3], 3, -100, 3)
    with pytest.raises(RuntimeError, match=r"group_scale must be float32 \(float32 for Float logits\), got Double"):
        ops.group_cross_entropy_with_grad(logits, targets, group_ids, 3, -100, 1, scale.double())
    with pytest.raises(RuntimeError, match=r"group_scale must be 1-D \[num_groups\] = \[3\], got shape \[2\]"):
        ops.group_cross_entropy_with_grad(logits, targets, group_ids, 3, -100, 1, scale[:2])
    with pytest.raises(RuntimeError, match=r"grad_logits must have the logits' dtype Float, got Half"):
        ops.group_cross_entropy_fused(logits, targets, group_ids, 3, -100, 1, scale, logits.half())
    with pytest.raises(RuntimeError, match=r"grad_logits must have the logits' shape \[6, 10\], got \[6, 9\]"):
        ops.group_cross_entropy_fused(logits, targets, group_ids, 3, -100, 1, scale, logits[:, :9].clone())
    with pytest.raises(RuntimeError, match=r"grad_logits must be contiguous"):
        ops.group_cross_entropy_fused(logits, targets, group_ids, 3, -100, 1, scale,
                                      torch.empty(10, 6, device=device).t())
    storage = torch.zeros(70, device=device)
    overlapping = storage[:60].view(6, 10)
    with pytest.raises(RuntimeError, match=r"grad_logits must be logits itself \(in place\) or not overlap it"):
        ops.group_cross_entropy_fused(overlapping, targets, group_ids, 3, -100, 1, scale,
                                      storage[10:70].view(6, 10))


@requires_cuda
@pytest.mark.cuda
def test_op_rejects_tensors_on_different_devices():
    logits, targets, group_ids = _valid("cpu")
    with pytest.raises(RuntimeError, match=r"logits and targets must be on the same device, got cuda:0 and cpu"):
        ops.group_cross_entropy(logits.cuda(), targets, group_ids.cuda(), 3, -100, 1)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype,loss_tol,grad_tol", DTYPE_TOLS)
def test_cpu_and_cuda_agree(dtype, loss_tol, grad_tol):
    batch, seq, vocab, num_groups = 5, 9, 3001, 4
    logits, targets, _ = make_inputs(batch * seq, vocab, num_groups, dtype)
    logits, targets = logits.view(batch, seq, vocab), targets.view(batch, seq)
    seq_groups = torch.tensor([1, 0, 3, 3, 1])
    cpu = group_cross_entropy_fused(logits, targets, seq_groups, num_groups, normalize="groups")
    cuda = group_cross_entropy_fused(logits.cuda(), targets.cuda(), seq_groups.cuda(), num_groups,
                                     normalize="groups")
    for a, b in zip(cpu[:2], cuda[:2]):
        assert_close(b.cpu(), a, loss_tol)
    assert torch.equal(cpu.token_counts, cuda.token_counts.cpu())
    assert_close(cuda.grad.cpu(), cpu.grad, grad_tol)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_fused_arguments(device):
    logits, targets, group_ids = _valid(device)
    with pytest.raises(ValueError, match=r"normalize must be one of \('tokens', 'groups', 'none'\), got 'mean'"):
        group_cross_entropy_fused(logits, targets, group_ids, 3, normalize="mean")
    with pytest.raises(ValueError, match=r"pass either grad_out or inplace=True, not both"):
        group_cross_entropy_fused(logits, targets, group_ids, 3, grad_out=torch.empty_like(logits), inplace=True)
    with pytest.raises(ValueError, match=r"grad_out must have the logits' shape \(6, 10\) and dtype torch.float32"):
        group_cross_entropy_fused(logits, targets, group_ids, 3, grad_out=torch.empty_like(logits).half())
    with pytest.raises(ValueError, match=r"grad_out must be contiguous"):
        group_cross_entropy_fused(logits, targets, group_ids, 3, grad_out=torch.empty(10, 6, device=device).t())
    with pytest.raises(ValueError, match=r"inplace=True needs contiguous logits"):
        group_cross_entropy_fused(torch.empty(10, 6, device=device).t(), targets, group_ids, 3, inplace=True)
    with pytest.raises(ValueError, match=r"group_weights must be 1-D \[num_groups\] = \[3\], got \(2,\)"):
        group_cross_entropy_fused(logits, targets, group_ids, 3, group_weights=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"num_groups must be >= 1, got 0"):
        group_cross_entropy_fused(logits, targets, group_ids, 0)
    bad_ids = group_ids.clone()
    bad_ids[4] = 7
    with pytest.raises(RuntimeError,
                       match=r"group_ids must be in \[0, num_groups\) = \[0, 3\), got group_ids\[4\] = 7"):
        group_cross_entropy_fused(logits, targets, bad_ids, 3)
