"""Benchmark: mixture sampling, sample ids per second, against what users run today.

Providers (one setup per case, all in this process, so the ratios are same-machine, same-moment):
  aioli_ext (iid / systematic)   MixtureSampler.sample: group per slot + position in a keyed permutation
  aioli_ext (iid, out= reused)   the same draws written into one output pair kept across calls
  torch.multinomial              group ids only (no sample ids, no without-replacement bookkeeping)
  numpy choice + shuffled index  Generator.choice for groups, then a lookup in pre-shuffled per-group indices
                                 (cursor per group, stable argsort for the ranks; the shuffle is setup cost)
  WeightedRandomSampler          torch.utils.data over per-sample weights p_g / size_g (refuses > 2^24 samples)
  greedy blending index          the deterministic builder that picks, per step i, the group with the largest
                                 weight * (i + 1) - count (O(B * K); a numpy loop, so run at small B)

Script mode writes bench/results/mixture_sample_<device>.json (machine, torch, commit, numbers) and a Markdown
table next to it:
    python bench/bench_mixture_sample.py [--device cuda] [--threads 2]
pytest-benchmark mode:
    python -m pytest bench/bench_mixture_sample.py --benchmark-only
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from aioli_ext import reference  # noqa: E402
from aioli_ext.sampler import MixtureSampler  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TOTAL_SAMPLES = 1 << 24          # sample space shared by every provider (WeightedRandomSampler's maximum)
BATCH = 1 << 22
GROUP_COUNTS = [16, 1024, 10**5]
WRS_BATCH = 1 << 18              # WeightedRandomSampler binary-searches 2^24 categories per id: smaller batch
GREEDY_BATCH = {16: 1 << 16, 1024: 1 << 14, 10**5: 1 << 10}


def make_case(num_groups, seed=0):
    """Equal-ish group sizes totalling TOTAL_SAMPLES and a random proportion vector."""
    sizes = np.full(num_groups, TOTAL_SAMPLES // num_groups, dtype=np.int64)
    sizes[: TOTAL_SAMPLES - int(sizes.sum())] += 1
    p = np.random.default_rng(seed).random(num_groups) + 0.05
    return sizes, p / p.sum()


# ------------------------------------------------------------------------------------------------------------
# Providers: each make_* returns a zero-argument callable that draws one batch, and the batch size it draws.
# ------------------------------------------------------------------------------------------------------------
def make_aioli(sizes, p, mode="iid", device="cpu", batch=BATCH, reuse_out=False):
    """reuse_out: draw into one (sample_ids, group_ids) pair kept across calls (``sample(..., out=...)``)."""
    sampler = MixtureSampler(sizes, seed=0, mode=mode, device=device)
    proportions = torch.from_numpy(p)
    out = None
    if reuse_out:
        out = (torch.empty(batch, dtype=torch.int64, device=device),
               torch.empty(batch, dtype=torch.int64, device=device))
    sampler.sample(batch, proportions, out=out)  # builds the threshold tables once, as a training loop would
    return (lambda: sampler.sample(batch, proportions, out=out)), batch


def make_multinomial(sizes, p, device="cpu", batch=BATCH):
    weights = torch.from_numpy(p).to(device)
    return (lambda: torch.multinomial(weights, batch, replacement=True)), batch


def make_numpy_choice(sizes, p, batch=BATCH):
    rng = np.random.default_rng(0)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    shuffled = np.concatenate([s + rng.permutation(n) for s, n in zip(starts, sizes)])
    cursor = np.zeros(len(sizes), dtype=np.int64)

    def draw():
        groups = rng.choice(len(sizes), size=batch, p=p)
        order = np.argsort(groups, kind="stable")
        counts = np.bincount(groups, minlength=len(sizes))
        run_start = np.concatenate([[0], np.cumsum(counts)[:-1]])
        ranks = np.empty(batch, dtype=np.int64)
        ranks[order] = np.arange(batch) - run_start[groups[order]]
        positions = (cursor[groups] + ranks) % sizes[groups]
        cursor[:] += counts
        return shuffled[starts[groups] + positions]

    return draw, batch


def make_weighted_random_sampler(sizes, p, total=TOTAL_SAMPLES, batch=WRS_BATCH):
    per_sample = torch.from_numpy(np.repeat(p / sizes, sizes)[:total])
    sampler = torch.utils.data.WeightedRandomSampler(per_sample, num_samples=batch, replacement=True)
    return (lambda: list(iter(sampler))), batch


def make_greedy_blending(sizes, p, batch):
    weights = np.asarray(p, dtype=np.float64)

    def draw():
        counts = np.zeros(len(weights), dtype=np.int64)
        groups = np.empty(batch, dtype=np.int64)
        positions = np.empty(batch, dtype=np.int64)
        for i in range(batch):
            g = int(np.argmax(weights * (i + 1) - counts))
            groups[i], positions[i] = g, counts[g]
            counts[g] += 1
        return groups, positions

    return draw, batch


def check_against_reference(device):
    """The benchmarked op must agree with the slot-by-slot reference before it is timed."""
    sizes, p = [13, 0, 40, 7], [0.3, 0.0, 0.5, 0.2]
    for mode in ("iid", "systematic"):
        sampler = MixtureSampler(sizes, seed=5, mode=mode, device=device)
        cursor, residual = [0] * 4, ([0] * 4 if mode == "systematic" else None)
        for step in range(3):
            ids, _ = sampler.sample(32, p)
            expected, _, cursor, residual = reference.mixture_sample(sizes, p, cursor, 5, step, 32,
                                                                     residual=residual)
            if ids.tolist() != expected:
                raise SystemExit(f"{mode} sampling on {device} disagrees with aioli_ext.reference")


def weighted_random_sampler_limit():
    """Whether WeightedRandomSampler refuses a sample space one past 2^24 (torch.multinomial's category cap)."""
    try:
        weights = torch.ones(TOTAL_SAMPLES + 1, dtype=torch.float64)
        next(iter(torch.utils.data.WeightedRandomSampler(weights, num_samples=1)))
    except RuntimeError as exc:
        return f"refuses {TOTAL_SAMPLES + 1} samples: {str(exc).splitlines()[0]}"
    return f"accepts {TOTAL_SAMPLES + 1} samples"


# ------------------------------------------------------------------------------------------------------------
# Timing
# ------------------------------------------------------------------------------------------------------------
def time_call(draw, device, repeats):
    """Median wall-clock seconds per call, and median CPU seconds per call summed over the process's threads
    (on a shared machine the CPU time shows the cost per id even when other jobs take the cores)."""
    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    # Three untimed calls: the first large allocations of a process (huge pages, OpenMP pool start) stall for
    # longer than one call on some VMs, and a training loop sees the steady state.
    for _ in range(3):
        draw()
    sync()
    times, cpu_times = [], []
    for _ in range(repeats):
        cpu_start = time.process_time()
        start = time.perf_counter()
        draw()
        sync()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return statistics.median(times), statistics.median(cpu_times)


def machine_info(device):
    info = {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "platform": platform.platform()}
    try:
        with open("/proc/cpuinfo") as f:
            models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu"] = f"{models[0]} x {len(models)}" if models else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    try:
        info["load_average"] = os.getloadavg()
    except OSError:
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    try:
        info["commit"] = subprocess.check_output(["git", "rev-parse", "HEAD"], text=True,
                                                 cwd=os.path.dirname(os.path.abspath(__file__))).strip()
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = None
    return info


def run_cpu(repeats):
    rows = []
    for num_groups in GROUP_COUNTS:
        sizes, p = make_case(num_groups)
        cases = [
            ("aioli_ext MixtureSampler (iid)", "sample ids", make_aioli(sizes, p, "iid"), repeats),
            ("aioli_ext MixtureSampler (systematic)", "sample ids", make_aioli(sizes, p, "systematic"), repeats),
            ("aioli_ext MixtureSampler (iid, out= reused)", "sample ids",
             make_aioli(sizes, p, "iid", reuse_out=True), repeats),
            ("torch.multinomial", "group ids only", make_multinomial(sizes, p), repeats),
            ("numpy choice + shuffled index", "sample ids", make_numpy_choice(sizes, p), max(1, repeats // 2)),
            ("WeightedRandomSampler (per-sample weights)", "sample ids", make_weighted_random_sampler(sizes, p), 1),
            ("greedy blending index (numpy loop)", "group + position", make_greedy_blending(
                sizes, p, GREEDY_BATCH[num_groups]), 1),
        ]
        case_rows = []
        for name, output, (draw, batch), reps in cases:
            seconds, cpu_seconds = time_call(draw, "cpu", reps)
            case_rows.append({"provider": name, "output": output, "K": num_groups, "B": batch,
                              "median_s": seconds, "ids_per_s": batch / seconds,
                              "cpu_ns_per_id": cpu_seconds / batch * 1e9})
            print(f"K={num_groups:>6} {name:<45} B={batch:>8} {batch / seconds / 1e6:10.2f} M ids/s "
                  f"{cpu_seconds / batch * 1e9:8.1f} CPU ns/id", flush=True)
        multinomial_rate = next(r["ids_per_s"] for r in case_rows if r["provider"] == "torch.multinomial")
        for r in case_rows:
            r["ratio_vs_multinomial"] = r["ids_per_s"] / multinomial_rate
        rows += case_rows
    return rows


def run_cuda(repeats):
    rows = []
    for num_groups in GROUP_COUNTS:
        sizes, p = make_case(num_groups)
        for name, (draw, batch) in [
            ("aioli_ext MixtureSampler (iid)", make_aioli(sizes, p, "iid", "cuda")),
            ("aioli_ext MixtureSampler (systematic)", make_aioli(sizes, p, "systematic", "cuda")),
            ("aioli_ext MixtureSampler (iid, out= reused)", make_aioli(sizes, p, "iid", "cuda", reuse_out=True)),
            ("torch.multinomial", make_multinomial(sizes, p, "cuda")),
        ]:
            seconds, _ = time_call(draw, "cuda", repeats)
            rows.append({"provider": name, "K": num_groups, "B": batch, "median_s": seconds,
                         "ids_per_s": batch / seconds})
            print(f"K={num_groups:>6} {name:<40} B={batch} {batch / seconds / 1e9:8.2f} G ids/s", flush=True)
    sizes, p = make_case(1024)
    for mode in ("iid", "systematic"):
        draw, batch = make_aioli(sizes, p, mode, "cuda", batch=8192)
        seconds, _ = time_call(draw, "cuda", max(repeats, 50))
        rows.append({"provider": f"aioli_ext MixtureSampler ({mode}) per call", "K": 1024, "B": batch,
                     "median_s": seconds, "ids_per_s": batch / seconds})
        print(f"B=8192 K=1024 {mode}: {seconds * 1e6:.1f} us per call", flush=True)
    return rows


def markdown(rows, info, device):
    lines = [f"Mixture sampling on {info.get('gpu') if device == 'cuda' else info['cpu']} "
             f"({info['threads']} threads, torch {info['torch']}, load average {info.get('load_average')}); "
             f"sample space {TOTAL_SAMPLES} ids.", "",
             "| K | provider | output | B | M ids/s (wall) | vs torch.multinomial | CPU ns per id |",
             "|---:|---|---|---:|---:|---:|---:|"]
    for r in rows:
        ratio = f"{r['ratio_vs_multinomial']:.2f}x" if "ratio_vs_multinomial" in r else ""
        cpu = f"{r['cpu_ns_per_id']:.1f}" if "cpu_ns_per_id" in r else ""
        lines.append(f"| {r['K']} | {r['provider']} | {r.get('output', 'sample ids')} | {r['B']} | "
                     f"{r['ids_per_s'] / 1e6:.1f} | {ratio} | {cpu} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (targets are for 2)")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a GPU")
    info = machine_info(args.device)
    check_against_reference(args.device)
    rows = run_cpu(args.repeats) if args.device == "cpu" else run_cuda(args.repeats)
    info["weighted_random_sampler_limit"] = weighted_random_sampler_limit()
    os.makedirs(RESULTS, exist_ok=True)
    stem = os.path.join(RESULTS, f"mixture_sample_{args.device}")
    with open(stem + ".json", "w") as f:
        json.dump({"machine": info, "results": rows}, f, indent=2)
    table = markdown(rows, info, args.device)
    with open(stem + ".md", "w") as f:
        f.write(table)
    print(table)
    print(f"WeightedRandomSampler: {info['weighted_random_sampler_limit']}")
    print(f"wrote {stem}.json and {stem}.md")


# ------------------------------------------------------------------------------------------------------------
# pytest-benchmark mode (collected only when this file is named on the command line)
# ------------------------------------------------------------------------------------------------------------
try:
    import pytest
except ImportError:  # script mode without pytest installed
    pytest = None

if pytest is not None:
    _PROVIDERS = {
        "aioli_iid": lambda sizes, p: make_aioli(sizes, p, "iid"),
        "aioli_systematic": lambda sizes, p: make_aioli(sizes, p, "systematic"),
        "aioli_iid_out": lambda sizes, p: make_aioli(sizes, p, "iid", reuse_out=True),
        "multinomial": make_multinomial,
        "numpy_choice": make_numpy_choice,
    }

    @pytest.mark.parametrize("num_groups", GROUP_COUNTS)
    @pytest.mark.parametrize("provider", list(_PROVIDERS))
    def test_mixture_sample_throughput(benchmark, provider, num_groups):
        torch.set_num_threads(2)
        sizes, p = make_case(num_groups)
        draw, batch = _PROVIDERS[provider](sizes, p)
        benchmark.extra_info["ids_per_call"] = batch
        benchmark.pedantic(draw, rounds=5, warmup_rounds=1)

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
    @pytest.mark.parametrize("batch", [8192, BATCH])
    def test_mixture_sample_cuda(benchmark, batch):
        sizes, p = make_case(1024)
        draw, _ = make_aioli(sizes, p, "iid", "cuda", batch=batch)

        def synced():
            draw()
            torch.cuda.synchronize()

        benchmark.pedantic(synced, rounds=20, warmup_rounds=2)


if __name__ == "__main__":
    main()
