"""Benchmark: aioli_ext.group_linear_cross_entropy against the code users run today, forward + backward.

Providers (one training step each: per-group statistics, the token-mean objective, backward to hidden and
weight):
  aioli    aioli_ext.group_linear_cross_entropy (chunked, no [N, V] logits)
  eager    hidden @ weight.T, F.cross_entropy(reduction="none"), index_add_ per group
           (aioli_ext.reference.group_linear_cross_entropy_eager)
  compile  torch.compile of that same eager function

Every (config, provider) runs in its own process so peak memory is that provider's alone:
  CPU:  peak RSS (VmHWM, reset through /proc/self/clear_refs before the measured step) minus the RSS when the
        step starts, i.e. memory above the inputs (and above what earlier steps left cached). "first call" is the
        same for the very first step, from the RSS right after the inputs were created: it also counts library
        code paged in by the first call and, for torch.compile, the compilation.
  CUDA: torch.cuda.max_memory_allocated() minus memory_allocated() when the step starts (allocator statistics).
Time: median wall time of the measured steps after the warm-up step(s) (CUDA synchronised).

    python bench/bench_group_linear_cross_entropy.py                   # CPU, fp32, the two CPU configs
    python bench/bench_group_linear_cross_entropy.py --device cuda     # adds (16384, 4096, 128256) bf16

Writes bench/results/group_linear_cross_entropy_<device>.json and .md (machine, torch version, commit).
"""
import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
NUM_GROUPS = 8
PROVIDERS = ("aioli", "eager", "compile")
CPU_CONFIGS = [(8192, 768, 50304, "fp32"), (8192, 2048, 50304, "fp32")]
CUDA_CONFIGS = [(8192, 768, 50304, "bf16"), (8192, 2048, 50304, "bf16"), (16384, 4096, 128256, "bf16")]


# ------------------------------------------------------------------------------------------- worker side

def _rss_mib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _reset_peak_rss():
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


def make_case(rows, dim, vocab, dtype, device, seed=0):
    """The inputs every provider gets: hidden ~ N(0, 1), weight ~ N(0, 1/D) (logits ~ N(0, 1)), 5% of the
    targets ignored (padding), NUM_GROUPS groups."""
    import torch
    gen = torch.Generator(device="cpu").manual_seed(seed)
    hidden = torch.randn(rows, dim, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    weight = (torch.randn(vocab, dim, generator=gen, dtype=torch.float32) / dim ** 0.5).to(device=device,
                                                                                            dtype=dtype)
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    targets[torch.rand(rows, generator=gen) < 0.05] = -100
    group_ids = torch.randint(0, NUM_GROUPS, (rows,), generator=gen)
    return hidden.requires_grad_(), weight.requires_grad_(), targets.to(device), group_ids.to(device)


def provider_function(name):
    import torch
    sys.path.insert(0, ROOT)
    import aioli_ext
    from aioli_ext.reference import group_linear_cross_entropy_eager
    if name == "aioli":
        return aioli_ext.group_linear_cross_entropy
    if name == "eager":
        return group_linear_cross_entropy_eager
    if name == "compile":
        return torch.compile(group_linear_cross_entropy_eager)
    raise ValueError(f"provider must be one of {PROVIDERS}, got {name!r}")


def run_worker(provider, rows, dim, vocab, dtype_name, device, warmup, repeats):
    import torch
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    on_cuda = device == "cuda"
    fn = provider_function(provider)
    hidden, weight, targets, group_ids = make_case(rows, dim, vocab, dtype, device)
    gc.collect()
    if on_cuda:
        torch.cuda.synchronize()
    else:
        _reset_peak_rss()
    rss_after_inputs = None if on_cuda else _rss_mib("VmRSS:")

    def step():
        loss, group_sums, token_counts = fn(hidden, weight, targets, group_ids, NUM_GROUPS)
        (group_sums.sum() / token_counts.sum()).backward()

    times, peaks, first_peak = [], [], None
    for index in range(warmup + repeats):
        hidden.grad = weight.grad = None
        gc.collect()
        if on_cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        elif index > 0:
            _reset_peak_rss()
            base = _rss_mib("VmRSS:")
        start = time.perf_counter()
        step()
        if on_cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if on_cuda else \
            _rss_mib("VmHWM:") - (rss_after_inputs if index == 0 else base)
        if index == 0:
            first_peak = peak
        if index >= warmup:
            times.append(elapsed)
            peaks.append(peak)
    return {"provider": provider, "time_s": statistics.median(times), "times_s": times,
            "peak_mib": max(peaks), "first_call_peak_mib": first_peak, "threads": torch.get_num_threads()}


# ------------------------------------------------------------------------------------------- parent side

def machine_info(device):
    import torch
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                           if line.startswith("Model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        info["commit"] = commit + ("+dirty" if dirty else "")
    except OSError:
        info["commit"] = "unknown"
    return info


def run_one(provider, config, device, warmup, repeats, timeout):
    rows, dim, vocab, dtype = config
    command = [sys.executable, os.path.abspath(__file__), "--worker", provider, str(rows), str(dim), str(vocab),
               dtype, "--device", device, "--warmup", str(warmup), "--repeats", str(repeats)]
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"provider": provider, "error": f"did not finish within {timeout} s"}
    if done.returncode != 0:
        return {"provider": provider, "error": done.stderr.strip().splitlines()[-1] if done.stderr else
                f"exit code {done.returncode}"}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_wall_s"] = time.perf_counter() - started
    return result


def markdown(report):
    info = report["machine"]
    hardware = info.get("gpu") or f"{info['cpu']} ({info['cpu_count']} cores, {info['torch_threads']} threads)"
    lines = [f"group_linear_cross_entropy, forward + backward (token-mean objective, grads to hidden and weight), "
             f"{hardware}, torch {info['torch']}, commit {info['commit'][:12]}, load average "
             f"{report['load_average_start'][0]:.1f} -> {report['load_average_end'][0]:.1f}.",
             "",
             "| N | D | V | dtype | provider | time (s) | vs eager | peak above inputs (MiB) | vs eager "
             "| first-call peak (MiB) |",
             "|---:|---:|---:|---|---|---:|---:|---:|---:|---:|"]
    for case in report["cases"]:
        eager = next((r for r in case["results"] if r["provider"] == "eager" and "error" not in r), None)
        for result in case["results"]:
            head = f"| {case['rows']} | {case['dim']} | {case['vocab']} | {case['dtype']} | {result['provider']} "
            if "error" in result:
                lines.append(head + f"| {result['error']} | | | | |")
                continue
            time_ratio = f"{result['time_s'] / eager['time_s']:.2f}x" if eager else "-"
            peak_ratio = f"{result['peak_mib'] / eager['peak_mib']:.3f}x" if eager else "-"
            lines.append(head + f"| {result['time_s']:.2f} | {time_ratio} | {result['peak_mib']:.0f} | "
                                f"{peak_ratio} | {result['first_call_peak_mib']:.0f} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--configs", default=None,
                        help="semicolon-separated N,D,V,dtype (default: the device's list in this file)")
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--warmup", type=int, default=None, help="steps before measuring (default CPU 1, CUDA 2)")
    parser.add_argument("--repeats", type=int, default=None, help="measured steps (default CPU 1, CUDA 5)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per provider process")
    parser.add_argument("--out", default=None, help="output stem (default bench/results/"
                                                     "group_linear_cross_entropy_<device>)")
    parser.add_argument("--worker", nargs=5, metavar=("PROVIDER", "N", "D", "V", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    on_cuda = args.device == "cuda"
    warmup = args.warmup if args.warmup is not None else (2 if on_cuda else 1)
    repeats = args.repeats if args.repeats is not None else (5 if on_cuda else 1)
    if args.worker:
        provider, rows, dim, vocab, dtype = args.worker
        result = run_worker(provider, int(rows), int(dim), int(vocab), dtype, args.device, warmup, repeats)
        print(json.dumps(result))
        return
    if args.configs:
        configs = [(int(n), int(d), int(v), dt) for n, d, v, dt in
                   (item.split(",") for item in args.configs.split(";"))]
    else:
        configs = CUDA_CONFIGS if on_cuda else CPU_CONFIGS
    providers = args.providers.split(",")
    report = {"benchmark": "group_linear_cross_entropy", "device": args.device, "machine": machine_info(args.device),
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "warmup": warmup, "repeats": repeats,
              "load_average_start": os.getloadavg(), "cases": []}
    for rows, dim, vocab, dtype in configs:
        case = {"rows": rows, "dim": dim, "vocab": vocab, "dtype": dtype, "results": []}
        for provider in providers:
            result = run_one(provider, (rows, dim, vocab, dtype), args.device, warmup, repeats, args.timeout)
            case["results"].append(result)
            print(f"N={rows} D={dim} V={vocab} {dtype} {provider}: {result}", flush=True)
        report["cases"].append(case)
    report["load_average_end"] = os.getloadavg()
    stem = args.out or os.path.join(RESULTS, f"group_linear_cross_entropy_{args.device}")
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    with open(stem + ".json", "w") as out:
        json.dump(report, out, indent=2)
    table = markdown(report)
    with open(stem + ".md", "w") as out:
        out.write(table)
    print(table)


if __name__ == "__main__":
    main()
