# GPU check of the CUDA group cross-entropy kernels (run by scripts/gpu_check.sh).
# GPU check of the CUDA group cross-entropy kernels: correctness on awkward shapes/views, both statistics routes,
# determinism, in-place fused == with_grad, then timing against a device-to-device copy.
# Usage: python gpucheck.py [cuda|cpu] [notime]   (cpu: same checks on the CPU kernels; notime: correctness only,
# e.g. under compute-sanitizer)
import sys, torch, aioli_ext
dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
op = torch.ops.aioli_ext
gen = torch.Generator().manual_seed(0)

def reference(x, t, g, K, ign, seq, scale):
    xd = x.double(); rows = torch.arange(x.shape[0]); keep = t != ign
    gid = g.long().repeat_interleave(seq); tt = torch.where(keep, t, 0)
    loss = torch.where(keep, torch.logsumexp(xd, 1) - xd[rows, tt], 0.0)
    sums = torch.zeros(K, dtype=torch.float64).index_add_(0, gid[keep], loss[keep])
    counts = torch.bincount(gid[keep], minlength=K)
    grad = torch.softmax(xd, 1); grad[rows, tt] -= 1
    grad = torch.where(keep[:, None], grad * scale.double()[gid][:, None], 0.0)
    return loss, sums, counts, grad

fails = 0
for dtype, tol in [(torch.float64, 1e-10), (torch.float32, 2e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)]:
    for V in [1, 7, 1000, 1025, 5000, 50257]:
        for K, seq, col0 in [(5, 1, 0), (3000, 1, 1), (7, 4, 3)]:
            N = 64
            full = (torch.randn(N, V + col0, generator=gen) * 3).to(dtype)
            x = full[:, col0:]                                     # rows start at every alignment phase
            t = torch.randint(0, V, (N,), generator=gen); t[::7] = -100
            g = torch.randint(0, K, (N // seq,), generator=gen, dtype=torch.int32)
            scale = (torch.rand(K, generator=gen) + 0.5).to(torch.float64 if dtype == torch.float64 else torch.float32)
            rl, rs, rc, rg = reference(x, t, g, K, -100, seq, scale)
            xd = full.to(dev)[:, col0:]                            # slice on the device: .to() would densify
            td, gd, sd = t.to(dev), g.to(dev), scale.to(dev)
            l, s, c = op.group_cross_entropy(xd, td, gd, K, -100, seq)
            l2, s2, c2, gr = op.group_cross_entropy_with_grad(xd, td, gd, K, -100, seq, sd)
            xc = xd.contiguous()                                   # same layout for the bitwise in-place check
            lc, sc, cc, grc = op.group_cross_entropy_with_grad(xc, td, gd, K, -100, seq, sd)
            buf = xc.clone()
            l3, s3, c3 = op.group_cross_entropy_fused(buf, td, gd, K, -100, seq, sd, buf)
            ok = (torch.allclose(l.cpu().double(), rl, rtol=tol, atol=tol) and torch.equal(c.cpu(), rc)
                  and torch.allclose(s.cpu().double(), rs, rtol=tol, atol=tol * N)
                  and torch.allclose(gr.cpu().double(), rg, rtol=tol, atol=tol)
                  and torch.equal(l, l2) and torch.equal(s, s2) and torch.equal(grc, buf) and torch.equal(lc, l3)
                  and torch.equal(sc, s3) and torch.equal(c3, c))
            if not ok:
                fails += 1; print("FAIL", dtype, V, K, seq, col0, (l.cpu().double() - rl).abs().max().item(),
                                  (gr.cpu().double() - rg).abs().max().item())
print("correctness:", "OK" if fails == 0 else f"{fails} FAILED")
if "notime" in sys.argv:
    sys.exit(1 if fails else 0)

N, V, K = (16384, 128256, 8) if dev == "cuda" else (64, 32000, 8)
x = torch.randn(N, V, device=dev, dtype=torch.bfloat16)
t = torch.randint(0, V, (N,), device=dev); t[::10] = -100
g = torch.randint(0, K, (N,), device=dev); scale = torch.ones(K, device=dev)
def bench(f, iters=20):
    f(); f()
    if dev == "cuda":
        torch.cuda.synchronize(); a = torch.cuda.Event(enable_timing=True); b = torch.cuda.Event(enable_timing=True)
        a.record(); [f() for _ in range(iters)]; b.record(); torch.cuda.synchronize()
        return a.elapsed_time(b) / iters / 1e3
    import time; t0 = time.perf_counter(); [f() for _ in range(iters)]; return (time.perf_counter() - t0) / iters
y = torch.empty_like(x); nbytes = x.numel() * x.element_size()
t_copy = bench(lambda: y.copy_(x)); copy_bw = 2 * nbytes / t_copy
r1, r2 = op.group_cross_entropy(x, t, g, K, -100, 1), op.group_cross_entropy(x, t, g, K, -100, 1)
print("deterministic:", all(torch.equal(a, b) for a, b in zip(r1, r2)))
for name, f, moved in [("forward", lambda: op.group_cross_entropy(x, t, g, K, -100, 1), nbytes),
                       ("with_grad", lambda: op.group_cross_entropy_with_grad(x, t, g, K, -100, 1, scale), 2 * nbytes),
                       ("fused in-place", lambda: op.group_cross_entropy_fused(y, t, g, K, -100, 1, scale, y),
                        2 * nbytes)]:
    sec = bench(f); print(f"{name:15s} [{N}, {V}] bf16: {sec * 1e3:8.3f} ms  {moved / sec / 1e9:7.1f} GB/s  "
                          f"= {moved / sec / copy_bw:5.1%} of copy ({copy_bw / 1e9:.0f} GB/s)")
