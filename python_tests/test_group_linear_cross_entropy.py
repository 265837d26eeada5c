"""aioli_ext.group_linear_cross_entropy (chunked LM head + group cross-entropy) against matmul + reference loss."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import aioli_ext
from aioli_ext import group_linear_cross_entropy, losses
from aioli_ext.reference import group_linear_cross_entropy_reference, group_objective_reference

ops = torch.ops.aioli_ext

from devices import DEVICES

# (dtype, u): the relative error of one logit as the op computes it (hidden @ weight.T in the input dtype):
# the unit roundoff of the output rounding for fp16 (2^-11) and bf16 (2^-8, rounding to nearest is 2^-9: a
# factor 2 of margin), the dot-product accumulation for fp32 (a few 1e-7 at these D, 2e-6 with margin), fp64
# likewise. Both tolerances follow from u and the largest logit |z| (see tolerances()).
DTYPE_TOLS = [
    pytest.param(torch.float32, 2e-6, id="fp32"),
    pytest.param(torch.bfloat16, 2.0**-8, id="bf16"),
    pytest.param(torch.float16, 2.0**-11, id="fp16"),
    pytest.param(torch.float64, 1e-14, id="fp64"),
]


def make_inputs(rows, dim, vocab, num_groups, dtype=torch.float32, device="cpu", ignore_frac=0.1, seed=0,
                with_bias=False, logit_scale=2.0):
    """hidden ~ N(0, 1), weight ~ N(0, logit_scale^2 / D): logits ~ N(0, logit_scale^2) whatever D is."""
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, dim, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, dim, generator=gen, dtype=torch.float64) * (logit_scale / dim ** 0.5)
    bias = torch.randn(vocab, generator=gen, dtype=torch.float64) * 0.5 if with_bias else None
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    targets[torch.rand(rows, generator=gen) < ignore_frac] = -100
    group_ids = torch.randint(0, num_groups, (rows,), generator=gen)
    cast = (lambda x: None if x is None else x.to(dtype=dtype, device=device))
    return cast(hidden), cast(weight), cast(bias), targets.to(device), group_ids.to(device)


def relative_error(actual, expected):
    expected = expected.double()
    return float((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30))


def tolerances(hidden, weight, bias, u):
    """(loss atol, relative gradient tolerance) against the fp64 reference, from the logits' error bound.

    Every logit is off by at most max|z| * u. A token's loss moves by at most twice that (its target logit and
    its log-sum-exp). A softmax row moves by p_ij * (dz_ij - sum_k p_ik dz_ik), at most 2 * max|z| * u relative;
    the gradient rows stored in the input dtype, the gradient matmul's output and autograd's cast of the
    reference gradient to the input dtype add one roundoff each.
    """
    logits = hidden.double() @ weight.double().T + (0 if bias is None else bias.double())
    logit_error = float(logits.abs().max() if logits.numel() else 0.0) * u
    return 2 * logit_error + 1e-12, 2 * logit_error + 3 * u


def leaf(x):
    return None if x is None else x.detach().clone().requires_grad_()


def objective(kind, loss, group_sums, token_counts, num_groups):
    """Upstream objectives: "mean" gives every counted token the same coefficient (the rescaling backward path);
    "group_weighted" and "token_weighted" give them different ones (the recomputing path)."""
    if kind == "mean":
        return group_sums.sum() / token_counts.sum().clamp_min(1)
    if kind == "group_weighted":
        weights = torch.linspace(0.2, 2.0, num_groups, dtype=torch.float64, device=group_sums.device)
        return group_objective_reference(group_sums, token_counts, weights.to(group_sums.dtype), "groups")
    gen = torch.Generator().manual_seed(7)
    token_weights = torch.rand(loss.shape, generator=gen, dtype=torch.float64).to(loss.device, loss.dtype)
    return (loss * token_weights).sum()


def run_both(hidden, weight, bias, targets, group_ids, num_groups, kind, **kwargs):
    ours = [leaf(hidden), leaf(weight), leaf(bias)]
    stats = group_linear_cross_entropy(ours[0], ours[1], targets, group_ids, num_groups, bias=ours[2], **kwargs)
    objective(kind, *stats, num_groups).backward()
    ref = [leaf(hidden), leaf(weight), leaf(bias)]
    ref_stats = group_linear_cross_entropy_reference(ref[0], ref[1], targets, group_ids, num_groups, bias=ref[2],
                                                     ignore_index=kwargs.get("ignore_index", -100))
    objective(kind, *ref_stats, num_groups).backward()
    return stats, ours, ref_stats, ref


def assert_matches(stats, ours, ref_stats, ref, loss_tol, grad_tol):
    loss, group_sums, token_counts = stats
    ref_loss, ref_sums, ref_counts = ref_stats
    assert loss.shape == ref_loss.shape
    torch.testing.assert_close(loss.double(), ref_loss, rtol=0, atol=loss_tol)
    # A group sum adds up to n_g token errors.
    sum_tol = loss_tol * max(1, int(ref_counts.max()) if ref_counts.numel() else 1)
    torch.testing.assert_close(group_sums.double(), ref_sums, rtol=0, atol=sum_tol)
    assert torch.equal(token_counts.cpu(), ref_counts.cpu())
    for name, mine, theirs in zip(("hidden", "weight", "bias"), ours, ref):
        if mine is None:
            continue
        assert mine.grad is not None and mine.grad.dtype == mine.dtype and mine.grad.shape == mine.shape, name
        if not torch.any(theirs.grad != 0):
            assert torch.all(mine.grad == 0), name
        else:
            assert relative_error(mine.grad, theirs.grad) < grad_tol, name


# ------------------------------------------------------------------------------------- values and gradients

SHAPES = [  # (N, D, V, chunk_size)
    (37, 16, 111, 8),     # N not a multiple of the chunk: 4 full chunks and a tail of 5
    (37, 16, 111, None),  # default chunk size: one chunk
    (1, 8, 7, None),
    (20, 12, 1, 3),       # V = 1: every loss is 0, every gradient 0
    (0, 8, 11, 4),        # no rows
    (64, 24, 300, 64),    # exactly one full chunk
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,u", DTYPE_TOLS)
@pytest.mark.parametrize("rows,dim,vocab,chunk_size", SHAPES)
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("kind", ["mean", "group_weighted"])
def test_matches_reference(device, dtype, u, rows, dim, vocab, chunk_size, with_bias, kind):
    num_groups = 5
    inputs = make_inputs(rows, dim, vocab, num_groups, dtype, device, with_bias=with_bias)
    results = run_both(*inputs, num_groups, kind, chunk_size=chunk_size)
    stats = results[0]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert stats[0].dtype == acc and stats[1].dtype == acc and stats[2].dtype == torch.int64
    assert_matches(*results, *tolerances(*inputs[:3], u))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["mean", "group_weighted", "token_weighted"])
def test_gradients_of_every_objective_kind(device, kind):
    inputs = make_inputs(45, 20, 97, 4, device=device, ignore_frac=0.3, with_bias=True)
    assert_matches(*run_both(*inputs, 4, kind, chunk_size=16), 1e-5, 1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_chunk_size_does_not_change_results(device):
    hidden, weight, bias, targets, group_ids = make_inputs(50, 16, 73, 3, device=device, with_bias=True)
    outputs = []
    for chunk_size in (1, 7, 16, 50, 1000, None):
        h, w, b = leaf(hidden), leaf(weight), leaf(bias)
        stats = group_linear_cross_entropy(h, w, targets, group_ids, 3, bias=b, chunk_size=chunk_size)
        objective("group_weighted", *stats, 3).backward()
        outputs.append((*stats, h.grad, w.grad, b.grad))
    for other in outputs[1:]:
        assert torch.equal(other[2], outputs[0][2])
        for a, b in zip(other, outputs[0]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,u", [DTYPE_TOLS[0], DTYPE_TOLS[1]])
def test_small_memory_budget_splits_rows_and_vocabulary(monkeypatch, device, dtype, u):
    # A 2 KiB budget: default chunks of 16 rows, and half-precision weight gradients accumulated in blocks of 32
    # vocabulary rows (the temporary of each block's product is bounded by the same budget).
    monkeypatch.setattr(losses, "CHUNK_LOGITS_BYTES", 2048)
    assert losses.default_chunk_size(50, 111, 2) == 16
    inputs = make_inputs(50, 16, 111, 3, dtype, device, with_bias=True)
    assert_matches(*run_both(*inputs, 3, "mean"), *tolerances(*inputs[:3], u))


@pytest.mark.parametrize("device", DEVICES)
def test_ignored_tokens_and_all_ignored(device):
    hidden, weight, bias, targets, group_ids = make_inputs(30, 8, 40, 3, device=device, ignore_frac=0.5)
    ignored = targets == -100
    assert ignored.any() and (~ignored).any()
    h, w = leaf(hidden), leaf(weight)
    loss, group_sums, token_counts = group_linear_cross_entropy(h, w, targets, group_ids, 3, chunk_size=8)
    assert torch.all(loss[ignored] == 0) and torch.all(loss[~ignored] > 0)
    assert int(token_counts.sum()) == int((~ignored).sum())
    loss.sum().backward()
    assert torch.all(h.grad[ignored] == 0) and torch.any(h.grad[~ignored] != 0)

    targets = torch.full_like(targets, -100)
    for kind in ("mean", "group_weighted"):
        h, w = leaf(hidden), leaf(weight)
        stats = group_linear_cross_entropy(h, w, targets, group_ids, 3, chunk_size=8)
        assert torch.all(stats[0] == 0) and torch.all(stats[1] == 0) and torch.all(stats[2] == 0)
        objective(kind, *stats, 3).backward()
        assert torch.all(h.grad == 0) and torch.all(w.grad == 0)


@pytest.mark.parametrize("device", DEVICES)
def test_custom_ignore_index_inside_vocabulary(device):
    hidden, weight, _, targets, group_ids = make_inputs(40, 8, 20, 3, device=device, ignore_frac=0.0)
    targets[::3] = 0
    results = run_both(hidden, weight, None, targets, group_ids, 3, "mean", ignore_index=0, chunk_size=16)
    assert torch.all(results[0][0][targets == 0] == 0)
    assert_matches(*results, 1e-5, 1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_groups_get_zero(device):
    hidden, weight, _, targets, group_ids = make_inputs(50, 8, 40, 10, device=device)
    group_ids = torch.where(group_ids < 5, 0, 3).to(device)
    results = run_both(hidden, weight, None, targets, group_ids, 10, "group_weighted", chunk_size=16)
    _, group_sums, token_counts = results[0]
    empty = torch.ones(10, dtype=torch.bool)
    empty[[0, 3]] = False
    assert torch.all(group_sums.cpu()[empty] == 0) and torch.all(token_counts.cpu()[empty] == 0)
    assert_matches(*results, 1e-5, 1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_3d_hidden_with_per_sequence_group_ids(device, id_dtype):
    batch, seq, dim, vocab = 4, 9, 8, 30
    hidden, weight, _, targets, _ = make_inputs(batch * seq, dim, vocab, 3, device=device)
    hidden, targets = hidden.view(batch, seq, dim), targets.view(batch, seq)
    seq_groups = torch.tensor([2, 0, 2, 1], dtype=id_dtype, device=device)
    results = run_both(hidden, weight, None, targets, seq_groups, 3, "group_weighted", chunk_size=5)
    assert results[0][0].shape == (batch, seq)
    assert_matches(*results, 1e-5, 1e-5)
    per_token = group_linear_cross_entropy(hidden, weight, targets, seq_groups[:, None].expand(batch, seq), 3,
                                           chunk_size=5)
    for a, b in zip(results[0], per_token):
        assert torch.equal(a.detach(), b)


@pytest.mark.parametrize("device", DEVICES)
def test_no_grad_forward_matches_training_forward(device):
    hidden, weight, bias, targets, group_ids = make_inputs(33, 12, 50, 4, device=device, with_bias=True)
    with torch.no_grad():
        plain = group_linear_cross_entropy(hidden, weight, targets, group_ids, 4, bias=bias, chunk_size=8)
    training = group_linear_cross_entropy(leaf(hidden), weight, targets, group_ids, 4, bias=bias, chunk_size=8)
    assert plain[0].grad_fn is None and training[0].grad_fn is not None
    for a, b in zip(plain, training):
        assert torch.equal(a, b.detach())


def test_autocast_runs_the_head_in_the_autocast_dtype():
    # fp32 parameters under bf16 autocast: the same as feeding bf16 copies, with fp32 gradients for the fp32 leaves.
    hidden, weight, bias, targets, group_ids = make_inputs(33, 16, 70, 3, with_bias=True)
    ours = [leaf(hidden), leaf(weight), leaf(bias)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stats = group_linear_cross_entropy(ours[0], ours[1], targets, group_ids, 3, bias=ours[2], chunk_size=8)
    objective("mean", *stats, 3).backward()
    cast = [leaf(x.bfloat16()) for x in (hidden, weight, bias)]
    cast_stats = group_linear_cross_entropy(cast[0], cast[1], targets, group_ids, 3, bias=cast[2], chunk_size=8)
    objective("mean", *cast_stats, 3).backward()
    for a, b in zip(stats, cast_stats):
        assert torch.equal(a.detach(), b.detach())
    for mine, theirs in zip(ours, cast):
        assert mine.grad.dtype == torch.float32
        assert torch.equal(mine.grad, theirs.grad.float())


# -------------------------------------------------------------------------------------- backward paths

class PassCounter:
    def __init__(self, monkeypatch):
        self.calls = 0
        original = losses._recompute_gradients

        def counting(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)
        monkeypatch.setattr(losses, "_recompute_gradients", counting)


@pytest.mark.parametrize("kind,second_passes", [("mean", 0), ("group_weighted", 1), ("token_weighted", 1)])
def test_backward_rescales_for_constant_coefficients_and_recomputes_otherwise(monkeypatch, kind, second_passes):
    counter = PassCounter(monkeypatch)
    inputs = make_inputs(40, 8, 60, 3, with_bias=True)
    results = run_both(*inputs, 3, kind, chunk_size=16)
    assert counter.calls == second_passes
    assert_matches(*results, 1e-5, 1e-5)


def test_frozen_weight_gets_no_gradient_and_no_weight_pass(monkeypatch):
    hidden, weight, _, targets, group_ids = make_inputs(40, 8, 60, 3)
    counter = PassCounter(monkeypatch)
    h = leaf(hidden)
    stats = group_linear_cross_entropy(h, weight, targets, group_ids, 3, chunk_size=16)
    objective("group_weighted", *stats, 3).backward()
    # grad_hidden is always the saved rows scaled per row: no second pass even for per-group weights.
    assert counter.calls == 0 and weight.grad is None
    h_ref = leaf(hidden)
    objective("group_weighted", *group_linear_cross_entropy_reference(h_ref, weight, targets, group_ids, 3),
              3).backward()
    assert relative_error(h.grad, h_ref.grad) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_raw_statistics_op_is_differentiable(device):
    # Called directly on inputs that require grad, the statistics op recomputes every gradient in backward.
    hidden, weight, bias, targets, group_ids = make_inputs(21, 6, 17, 3, device=device, with_bias=True)
    ours = [leaf(hidden), leaf(weight), leaf(bias)]
    loss, group_sums, _ = ops.group_linear_cross_entropy(ours[0], ours[1], ours[2], targets, group_ids, 3, -100, 1,
                                                          4)
    (loss.sum() + 2 * group_sums[1]).backward()
    ref = [leaf(hidden), leaf(weight), leaf(bias)]
    ref_loss, ref_sums, _ = group_linear_cross_entropy_reference(ref[0], ref[1], targets, group_ids, 3, bias=ref[2])
    (ref_loss.sum() + 2 * ref_sums[1]).backward()
    for mine, theirs in zip(ours, ref):
        assert relative_error(mine.grad, theirs.grad) < 1e-5


@pytest.mark.parametrize("device", DEVICES)
def test_retained_graph_gives_the_same_gradient_twice(device):
    hidden, weight, _, targets, group_ids = make_inputs(30, 8, 64, 3, device=device)
    h, w = leaf(hidden), leaf(weight)
    loss = group_linear_cross_entropy(h, w, targets, group_ids, 3, chunk_size=8)[0]
    first = torch.autograd.grad(loss.sum() * 0.5, (h, w), retain_graph=True)
    second = torch.autograd.grad(loss.sum() * 0.5, (h, w))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_fp64(device):
    hidden, weight, bias, targets, group_ids = make_inputs(9, 4, 6, 3, torch.float64, device, ignore_frac=0.2,
                                                           with_bias=True)
    args = (leaf(hidden), leaf(weight), leaf(bias))

    def both_outputs(h, w, b):  # per-element upstream gradients: the recomputing path
        return group_linear_cross_entropy(h, w, targets, group_ids, 3, bias=b, chunk_size=4)[:2]

    def mean_loss(h, w, b):  # one coefficient for every token: the rescaling path
        loss, group_sums, token_counts = group_linear_cross_entropy(h, w, targets, group_ids, 3, bias=b,
                                                                    chunk_size=4)
        return group_sums.sum() / token_counts.sum()

    assert torch.autograd.gradcheck(both_outputs, args)
    assert torch.autograd.gradcheck(mean_loss, args)


# ------------------------------------------------------------------------------------- torch.library checks

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op_name", ["group_linear_cross_entropy", "group_linear_cross_entropy_with_grad",
                                     "group_linear_cross_entropy_backward"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
def test_opcheck(device, op_name, with_bias):
    hidden, weight, bias, targets, group_ids = make_inputs(12, 5, 19, 3, device=device, with_bias=with_bias)
    h, w, b = leaf(hidden), leaf(weight), leaf(bias)
    if op_name == "group_linear_cross_entropy":
        args = (h, w, b, targets, group_ids, 3, -100, 1, 5)
    elif op_name == "group_linear_cross_entropy_with_grad":
        args = (h, w, b, targets, group_ids[:4], 3, -100, 3, 5, True, True, with_bias)
    else:
        coef = torch.rand(12, device=device)
        saved = ops.group_linear_cross_entropy_with_grad(hidden, weight, bias, targets, group_ids, 3, -100, 1, 5,
                                                         True, True, with_bias)[3:]
        args = (coef, hidden, weight, bias, targets, -100, 5, True, True, with_bias, *saved)
    torch.library.opcheck(getattr(ops, op_name), args)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    def mean_and_group_losses(hidden, weight, targets, group_ids):
        loss, group_sums, token_counts = group_linear_cross_entropy(hidden, weight, targets, group_ids, 4,
                                                                    chunk_size=16)
        return group_sums.sum() / token_counts.sum(), group_sums / token_counts.clamp_min(1)

    compiled = torch.compile(mean_and_group_losses, fullgraph=True)
    hidden, weight, _, targets, group_ids = make_inputs(40, 8, 33, 4, device=device)
    eager_inputs, compiled_inputs = (leaf(hidden), leaf(weight)), (leaf(hidden), leaf(weight))
    eager = mean_and_group_losses(*eager_inputs, targets, group_ids)
    got = compiled(*compiled_inputs, targets, group_ids)
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # Per-group weights: the traced backward calls the backward op, which takes the recomputing path.
    weights = torch.tensor([0.5, 1.0, 2.0, 3.0], device=device)
    (got[0] + (got[1] * weights).sum()).backward()
    (eager[0] + (eager[1] * weights).sum()).backward()
    for a, b in zip(compiled_inputs, eager_inputs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(compiled(hidden, weight, targets, group_ids)[0], eager[0].detach(),
                                   rtol=1e-6, atol=1e-6)


# -------------------------------------------------------------------------------------------- memory

_PEAK_SCRIPT = textwrap.dedent("""
    import sys, torch, aioli_ext
    from aioli_ext.reference import group_linear_cross_entropy_eager
    def rss_kib(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1])
    provider, rows, dim, vocab = sys.argv[1], *map(int, sys.argv[2:5])
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, dim, generator=gen).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=gen) / dim ** 0.5).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    group_ids = torch.randint(0, 4, (rows,), generator=gen)
    fn = aioli_ext.group_linear_cross_entropy if provider == "ours" else group_linear_cross_entropy_eager
    kwargs = {"chunk_size": 128} if provider == "ours" else {}
    def step(rows):
        loss, group_sums, token_counts = fn(hidden[:rows], weight, targets[:rows], group_ids[:rows], 4, **kwargs)
        (group_sums.sum() / token_counts.sum()).backward()
        hidden.grad = weight.grad = None
    step(16)  # the first call pages in library code (MKL, oneDNN: ~170 MB of RSS): not data
    open("/proc/self/clear_refs", "w").write("5")  # peak RSS := current RSS
    before = rss_kib("VmRSS:")
    step(rows)
    print((rss_kib("VmHWM:") - before) * 1024)
""")


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs")
def test_peak_memory_stays_far_below_the_logits():
    # fp32 logits [2048, 16384] are 128 MiB; eager holds several such tensors at once. Ours holds a 8 MiB chunk,
    # grad_weight (4 MiB) and grad_hidden: its peak above the inputs must stay under a quarter of one logits.
    rows, dim, vocab = 2048, 64, 16384
    logits_bytes = rows * vocab * 4
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(aioli_ext.__file__))))
    workers = {provider: subprocess.Popen([sys.executable, "-c", _PEAK_SCRIPT, provider, str(rows), str(dim),
                                           str(vocab)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                          env=env)
               for provider in ("ours", "eager")}
    peaks = {}
    for provider, worker in workers.items():
        stdout, stderr = worker.communicate(timeout=120)
        assert worker.returncode == 0, stderr
        peaks[provider] = int(stdout.split()[-1])
    assert peaks["eager"] >= logits_bytes, peaks  # the measurement sees a materialised [N, V]
    assert peaks["ours"] < logits_bytes / 4, peaks


def test_default_chunk_size():
    assert losses.default_chunk_size(0, 50304, 4) == 1
    assert losses.default_chunk_size(100, 50304, 4) == 100
    budget = losses.CHUNK_LOGITS_BYTES
    for rows, vocab, itemsize in [(8192, 50304, 4), (16384, 128256, 2), (10_000, 1_000_000, 4), (100, 10**9, 4)]:
        chunk = losses.default_chunk_size(rows, vocab, itemsize)
        assert chunk % losses.CHUNK_ALIGN == 0
        # within the budget, up to the alignment rounding (and never below CHUNK_ALIGN rows)
        assert chunk == losses.CHUNK_ALIGN or (chunk - losses.CHUNK_ALIGN) * vocab * itemsize <= budget
        chunks = -(-rows // chunk)
        assert rows - (chunks - 1) * chunk > 0  # no empty trailing chunk
    # 8192 rows of fp32 V = 50304: 7 chunks of 1184 rows instead of 6 x 1328 + 224.
    assert losses.default_chunk_size(8192, 50304, 4) == 1184


# -------------------------------------------------------------------------------------------- bad input

def _valid(device, rows=6, dim=4, vocab=10, num_groups=3):
    hidden, weight, _, targets, group_ids = make_inputs(rows, dim, vocab, num_groups, device=device,
                                                        ignore_frac=0.0)
    return hidden, weight, targets, group_ids


def _set(tensor, index, value):
    return tensor.index_fill(0, torch.tensor([index], device=tensor.device), value)


BAD_INPUTS = {
    "hidden_1d": (lambda h, w, t, g: ((h[0], w, t, g, 3), {}), ValueError,
                  r"hidden must be 2-D \[N, D\] or 3-D \[B, T, D\], got 1-D tensor of shape \(4,\)"),
    "hidden_int": (lambda h, w, t, g: ((h.long(), w, t, g, 3), {}), RuntimeError,
                   r"hidden must be float32, float16, bfloat16 or float64, got Long"),
    "weight_dim_mismatch": (lambda h, w, t, g: ((h, w[:, :3], t, g, 3), {}), ValueError,
                            r"weight must be 2-D \[V, D\] with D = hidden.shape\[-1\] = 4, got shape \(10, 3\)"),
    "weight_1d": (lambda h, w, t, g: ((h, w[0], t, g, 3), {}), ValueError,
                  r"weight must be 2-D \[V, D\] with D = hidden.shape\[-1\] = 4, got shape \(4,\)"),
    "weight_no_rows": (lambda h, w, t, g: ((h, w[:0], t, g, 3), {}), RuntimeError,
                       r"weight must have at least one row \(vocabulary size V >= 1\), got shape \(0, 4\)"),
    "weight_dtype": (lambda h, w, t, g: ((h, w.double(), t, g, 3), {}), RuntimeError,
                     r"weight must have hidden's dtype Float, got Double"),
    "bias_shape": (lambda h, w, t, g: ((h, w, t, g, 3), {"bias": torch.zeros(9, device=h.device)}), ValueError,
                   r"bias must be 1-D \[V\] = \[10\], got shape \(9,\)"),
    "bias_dtype": (lambda h, w, t, g: ((h, w, t, g, 3), {"bias": torch.zeros(10, device=h.device).half()}),
                   RuntimeError, r"bias must have hidden's dtype Float, got Half"),
    "targets_float": (lambda h, w, t, g: ((h, w, t.float(), g, 3), {}), RuntimeError,
                      r"targets must be int64, got Float"),
    "targets_shape": (lambda h, w, t, g: ((h, w, t[:-1], g, 3), {}), ValueError,
                      r"targets must have shape hidden.shape\[:-1\] = \(6,\), got \(5,\)"),
    "group_ids_float": (lambda h, w, t, g: ((h, w, t, g.float(), 3), {}), RuntimeError,
                        r"group_ids must be int32 or int64, got Float"),
    "group_ids_shape": (lambda h, w, t, g: ((h, w, t, g[:-1], 3), {}), ValueError,
                        r"group_ids must have the targets' shape \(6,\) \(one id per token\), got \(5,\)"),
    "group_ids_per_sequence_shape": (
        lambda h, w, t, g: ((h.view(2, 3, 4), w, t.view(2, 3), g[:4], 3), {}), ValueError,
        r"group_ids must have the targets' shape \(2, 3\) \(one id per token\) or \[B\] = \(2,\) "
        r"\(one id per sequence\), got \(4,\)"),
    "target_too_large": (lambda h, w, t, g: ((h, w, _set(t, 3, 10), g, 3), {}), RuntimeError,
                         r"targets must be in \[0, V\) = \[0, 10\) or equal ignore_index \(-100\), "
                         r"got targets\[3\] = 10"),
    "target_negative": (lambda h, w, t, g: ((h, w, _set(t, 0, -1), g, 3), {}), RuntimeError,
                        r"targets must be in \[0, V\) = \[0, 10\) or equal ignore_index \(-100\), "
                        r"got targets\[0\] = -1"),
    "group_id_too_large": (lambda h, w, t, g: ((h, w, t, _set(g, 5, 3), 3), {}), RuntimeError,
                           r"group_ids must be in \[0, num_groups\) = \[0, 3\), got group_ids\[5\] = 3"),
    "group_id_negative": (lambda h, w, t, g: ((h, w, t, _set(g, 2, -2), 3), {}), RuntimeError,
                          r"group_ids must be in \[0, num_groups\) = \[0, 3\), got group_ids\[2\] = -2"),
    "per_sequence_group_id_too_large": (
        lambda h, w, t, g: ((h.view(2, 3, 4), w, t.view(2, 3), torch.tensor([0, 5], device=h.device), 3), {}),
        RuntimeError, r"group_ids must be in \[0, num_groups\) = \[0, 3\), got group_ids\[1\] = 5"),
    "no_groups": (lambda h, w, t, g: ((h, w, t, g.clamp_max(0), 0), {}), RuntimeError,
                  r"num_groups must be >= 1, got 0"),
    "targets_other_device": (lambda h, w, t, g: ((h, w, t.to("meta"), g, 3), {}), ValueError,
                             r"hidden and targets must be on the same device, got \w+(:\d)? and meta"),
    "group_ids_other_device": (lambda h, w, t, g: ((h, w, t, g.to("meta"), 3), {}), ValueError,
                               r"hidden and group_ids must be on the same device, got \w+(:\d)? and meta"),
    "weight_other_device": (lambda h, w, t, g: ((h, w.to("meta"), t, g, 3), {}), ValueError,
                            r"hidden and weight must be on the same device, got \w+(:\d)? and meta"),
    "chunk_size_zero": (lambda h, w, t, g: ((h, w, t, g, 3), {"chunk_size": 0}), ValueError,
                        r"chunk_size must be >= 1, got 0"),
    "chunk_size_float": (lambda h, w, t, g: ((h, w, t, g, 3), {"chunk_size": 2.5}), ValueError,
                         r"chunk_size must be an int >= 1 or None, got 2.5"),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
@pytest.mark.parametrize("requires_grad", [False, True])
def test_bad_input_is_rejected_with_its_rule(device, case, requires_grad):
    make_args, error, message = BAD_INPUTS[case]
    args, kwargs = make_args(*_valid(device))
    if requires_grad and args[0].is_floating_point():
        args = (args[0].clone().requires_grad_(),) + args[1:]
    with pytest.raises(error, match=message):
        group_linear_cross_entropy(*args, **kwargs)


def test_op_level_argument_checks():
    hidden, weight, targets, group_ids = _valid("cpu")
    with pytest.raises(RuntimeError, match=r"seq_len must divide the number of rows N = 6, got seq_len = 4"):
        ops.group_linear_cross_entropy(hidden, weight, None, targets, group_ids[:1], 3, -100, 4, 8)
    with pytest.raises(ValueError, match=r"group_ids must be 1-D \[N / seq_len\] = \[2\], got \(3,\)"):
        ops.group_linear_cross_entropy(hidden, weight, None, targets, group_ids[:3], 3, -100, 3, 8)
    with pytest.raises(ValueError, match=r"hidden must be 2-D \[N, D\], got 3-D tensor of shape \(2, 3, 4\)"):
        ops.group_linear_cross_entropy(hidden.view(2, 3, 4), weight, None, targets, group_ids, 3, -100, 1, 8)
    with pytest.raises(ValueError, match=r"chunk_size must be >= 1, got 0"):
        ops.group_linear_cross_entropy_with_grad(hidden, weight, None, targets, group_ids, 3, -100, 1, 0,
                                                 True, True, False)
