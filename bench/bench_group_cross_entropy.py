"""Benchmark: aioli_ext group cross-entropy vs what users run today (torch eager and torch.compile).

Cases: logits [4096, 50304] and [16384, 50304] in fp32 and bf16 (forward, and forward + backward), and
[16384, 128256] bf16 forward only; K = 16 groups, 10% ignored tokens. The 16384-row cases need several GB and
minutes: they run only with AIOLI_BENCH_LARGE=1 (or --large).

Providers, all timed in the same process (so ratios compare like with like):
  forward (statistics only, logits do not require grad)
    eager        F.cross_entropy(reduction="none") + index_add_ per group      (aioli_ext.reference)
    compile      the same function under torch.compile
    aioli        aioli_ext.group_cross_entropy
    read-floor   logits.sum(): one read of the logits at this machine's memory bandwidth, for scale (not a
                 competitor: it is the time no one-pass kernel can beat)
  forward + backward of the token-mean objective sum_g S_g / sum_g n_g
    eager, compile   autograd through the functions above (fresh .grad every step)
    aioli            aioli_ext.group_cross_entropy + plain objective.backward() (.grad set to None every step, as
                     zero_grad does; the gradient buffer comes back from aioli_ext's cache, and backward finds
                     the token mean predicted, so it makes no pass over the gradient)
    aioli-no-cache   ... with the gradient buffer cache off (fresh pages every step)
    aioli-no-predict ... with the coefficient prediction off (backward scales the gradient rows)
    aioli-neither    ... with both off (the behaviour before either existed)
    fused-fresh      aioli_ext.group_cross_entropy_fused without grad_out (the op allocates the gradient; from
                     the cache once the previous step's result is dropped)
    fused-reuse      ... grad_out= a buffer reused across steps (the fair fast path)
    fused-inplace    ... inplace=True (gradient written over the logits; later steps run on the previous
                     step's output, which is the same work)

Run:
  python bench/bench_group_cross_entropy.py [--quick] [--large]   # writes bench/results/group_cross_entropy_cpu.json
  python -m pytest bench/bench_group_cross_entropy.py -q            # pytest-benchmark
  AIOLI_BENCH_QUICK=1 python -m pytest bench/bench_group_cross_entropy.py -q   # the same, fewer rounds
"""
import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import aioli_ext  # noqa: E402
from aioli_ext.reference import group_cross_entropy_eager  # noqa: E402

NUM_GROUPS = 16
IGNORE_FRACTION = 0.1
LARGE = os.environ.get("AIOLI_BENCH_LARGE", "0") == "1"
QUICK = os.environ.get("AIOLI_BENCH_QUICK", "0") == "1"

# (rows, vocab, dtype name, with backward)
CASES = [
    (4096, 50304, "float32", True),
    (4096, 50304, "bfloat16", True),
    (16384, 50304, "float32", True),
    (16384, 50304, "bfloat16", True),
    (16384, 128256, "bfloat16", False),
]
FORWARD_PROVIDERS = ["read-floor", "eager", "compile", "aioli"]
TRAIN_PROVIDERS = ["eager", "compile", "aioli", "aioli-no-cache", "aioli-no-predict", "aioli-neither", "fused-fresh",
                   "fused-reuse", "fused-inplace"]


def is_large(rows):
    return rows > 4096


def make_case(rows, vocab, dtype_name, seed=0):
    """One setup for every provider: logits, targets with 10% ignored, K = 16 per-token group ids."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.empty(rows, vocab, dtype=getattr(torch, dtype_name))
    for start in range(0, rows, 1024):  # in slices: no fp32 temporary of the whole [N, V] for bf16
        logits[start:start + 1024] = torch.randn(min(1024, rows - start), vocab, generator=gen) * 2
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    targets[torch.rand(rows, generator=gen) < IGNORE_FRACTION] = -100
    group_ids = torch.randint(0, NUM_GROUPS, (rows,), generator=gen)
    return logits, targets, group_ids


def _token_mean(group_sums, token_counts):
    return group_sums.sum() / token_counts.sum()


def _eager_forward(logits, targets, group_ids):
    return group_cross_entropy_eager(logits, targets, group_ids, NUM_GROUPS)


def _eager_train(logits, targets, group_ids):
    _, group_sums, token_counts = group_cross_entropy_eager(logits, targets, group_ids, NUM_GROUPS)
    objective = _token_mean(group_sums, token_counts)
    objective.backward()
    return objective


_compiled = {}


def _compiled_fn(name):
    if name not in _compiled:
        if name == "forward":
            _compiled[name] = torch.compile(_eager_forward)
        else:
            def objective_fn(logits, targets, group_ids):
                _, group_sums, token_counts = group_cross_entropy_eager(logits, targets, group_ids, NUM_GROUPS)
                return _token_mean(group_sums, token_counts)
            _compiled[name] = torch.compile(objective_fn)
    return _compiled[name]


@contextlib.contextmanager
def _gradient_features(cache, predict):
    """Switch aioli_ext's gradient buffer cache and coefficient prediction for one step, then restore them."""
    limit = aioli_ext.gradient_buffer_cache().max_bytes
    was_predicting = aioli_ext.gradient_scale_prediction().enabled
    if not cache:
        aioli_ext.gradient_buffer_cache(0)
    aioli_ext.gradient_scale_prediction(predict)
    try:
        yield
    finally:
        aioli_ext.gradient_buffer_cache(limit)
        aioli_ext.gradient_scale_prediction(was_predicting)


def make_step(provider, train, logits, targets, group_ids):
    """A no-argument callable running one step of `provider`, plus the tensors it keeps alive."""
    if not train:
        if provider == "read-floor":
            return lambda: logits.sum()
        if provider == "eager":
            return lambda: _eager_forward(logits, targets, group_ids)
        if provider == "compile":
            fn = _compiled_fn("forward")
            return lambda: fn(logits, targets, group_ids)
        if provider == "aioli":
            return lambda: aioli_ext.group_cross_entropy(logits, targets, group_ids, NUM_GROUPS)
        raise ValueError(provider)

    if provider in ("eager", "compile") or provider.startswith("aioli"):
        leaf = logits.detach().requires_grad_()

        def step():
            leaf.grad = None  # a fresh gradient every step, as in a training loop with zero_grad(set_to_none)
            if provider == "eager":
                return _eager_train(leaf, targets, group_ids)
            if provider == "compile":
                objective = _compiled_fn("train")(leaf, targets, group_ids)
                objective.backward()
                return objective
            with _gradient_features(cache=provider in ("aioli", "aioli-no-predict"),
                                    predict=provider in ("aioli", "aioli-no-cache")):
                _, group_sums, token_counts = aioli_ext.group_cross_entropy(leaf, targets, group_ids, NUM_GROUPS)
                objective = _token_mean(group_sums, token_counts)
                objective.backward()
            return objective
        return step
    if provider == "fused-fresh":
        return lambda: aioli_ext.group_cross_entropy_fused(logits, targets, group_ids, NUM_GROUPS)
    if provider == "fused-reuse":
        buffer = torch.empty_like(logits)
        return lambda: aioli_ext.group_cross_entropy_fused(logits, targets, group_ids, NUM_GROUPS, grad_out=buffer)
    if provider == "fused-inplace":
        scratch = logits.clone()
        return lambda: aioli_ext.group_cross_entropy_fused(scratch, targets, group_ids, NUM_GROUPS, inplace=True)
    raise ValueError(provider)


def time_step(step, repeats, warmup=1):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times), min(times)


def bytes_moved(logits, train):
    """Logits read once, plus the gradient written once for training steps: the kernel's memory floor."""
    size = logits.numel() * logits.element_size()
    return size * (2 if train else 1)


# --------------------------------------------------------------------------------------- pytest-benchmark

def _pytest_cases():
    for rows, vocab, dtype_name, with_backward in CASES:
        marks = [pytest.mark.skipif(not LARGE, reason="16384-row cases need AIOLI_BENCH_LARGE=1")] \
            if is_large(rows) else []
        for train in ([False, True] if with_backward else [False]):
            for provider in (TRAIN_PROVIDERS if train else FORWARD_PROVIDERS):
                yield pytest.param(rows, vocab, dtype_name, train, provider, marks=marks,
                                   id=f"{rows}x{vocab}-{dtype_name}-{'fwd+bwd' if train else 'fwd'}-{provider}")


_case_cache = {}


@pytest.mark.parametrize("rows,vocab,dtype_name,train,provider", list(_pytest_cases()))
def test_group_cross_entropy(benchmark, rows, vocab, dtype_name, train, provider):
    key = (rows, vocab, dtype_name)
    if key not in _case_cache:
        _case_cache.clear()  # one case's tensors in memory at a time
        _case_cache[key] = make_case(rows, vocab, dtype_name)
    logits, targets, group_ids = _case_cache[key]
    benchmark.group = f"{rows}x{vocab} {dtype_name} {'fwd+bwd' if train else 'fwd'}"
    benchmark.extra_info["bytes_floor"] = bytes_moved(logits, train)
    step = make_step(provider, train, logits, targets, group_ids)
    benchmark.pedantic(step, rounds=2 if QUICK else 5, warmup_rounds=1, iterations=1)


# ------------------------------------------------------------------------------------------- script mode

def machine_info():
    cpu_model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        # Earlier result files do not make the measured code dirty.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)bench/results"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout.strip() != ""
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", False
    return {
        "cpu_model": cpu_model,
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": aioli_ext.cpu_capability(),
        "torch_version": torch.__version__,
        "git_commit": commit + ("-dirty" if dirty else ""),
        "load_average_before": os.getloadavg(),
    }


def markdown_table(rows_out):
    lines = ["| logits | dtype | step | provider | median ms | min ms | GB/s (floor bytes) | speed-up vs eager |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows_out:
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['step']} | {r['provider']} | {r['median_ms']:.1f} | "
                     f"{r['min_ms']:.1f} | {r['gb_per_s']:.1f} | {r['speedup_vs_eager']:.2f}x |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (3 instead of 7)")
    parser.add_argument("--large", action="store_true", help="also the 16384-row cases (needs ~20 GB, minutes)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baselines")
    parser.add_argument("--output", default=os.path.join(ROOT, "bench", "results", "group_cross_entropy_cpu.json"))
    args = parser.parse_args(argv)
    repeats = 3 if args.quick or QUICK else 7
    large = args.large or LARGE

    info = machine_info()
    print(f"# {info['cpu_model']}, {info['logical_cores']} logical cores, torch {info['torch_version']} "
          f"({info['torch_threads']} threads), kernels: {info['cpu_capability']}, load {info['load_average_before']}")
    results = []
    for rows, vocab, dtype_name, with_backward in CASES:
        if is_large(rows) and not large:
            continue
        logits, targets, group_ids = make_case(rows, vocab, dtype_name)
        for train in ([False, True] if with_backward else [False]):
            group = []
            for provider in (TRAIN_PROVIDERS if train else FORWARD_PROVIDERS):
                if provider == "compile" and args.no_compile:
                    continue
                step = make_step(provider, train, logits, targets, group_ids)
                median_s, min_s = time_step(step, repeats, warmup=2 if provider == "compile" else 1)
                del step
                group.append({
                    "shape": f"[{rows}, {vocab}]", "dtype": dtype_name, "step": "fwd+bwd" if train else "fwd",
                    "provider": provider, "median_ms": median_s * 1e3, "min_ms": min_s * 1e3,
                    "gb_per_s": bytes_moved(logits, train) / median_s / 1e9,
                })
            eager_ms = next(r["median_ms"] for r in group if r["provider"] == "eager")
            for row in group:
                row["speedup_vs_eager"] = eager_ms / row["median_ms"]
                print(f"{row['shape']:>16} {dtype_name:>8} {row['step']:>7} {row['provider']:>16}: "
                      f"{row['median_ms']:8.1f} ms (min {row['min_ms']:.1f})  {row['gb_per_s']:5.1f} GB/s  "
                      f"{row['speedup_vs_eager']:.2f}x vs eager", flush=True)
            results.extend(group)
        del logits, targets, group_ids
        _compiled.clear()
    info["load_average_after"] = os.getloadavg()
    table = markdown_table(results)
    print()
    print(table)
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"machine": info, "repeats": repeats, "num_groups": NUM_GROUPS,
                   "ignore_fraction": IGNORE_FRACTION, "results": results, "markdown": table}, f, indent=2)
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
