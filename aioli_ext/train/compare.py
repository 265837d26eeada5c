"""Several methods × paired seeds on one corpus: parallel worker processes, tables, paired differences, plots.

Seed s fixes the model's initial weights, the sampler's key (so each group's examples come in the same order)
and Aioli's sweep-order generator; the evaluation subsets are fixed. Only the mixer differs between the runs of
one seed, so the per-seed difference of two methods is a paired measurement. Results do not depend on
``jobs``: each run is one single-threaded process whose numbers depend on its settings only.
"""
import concurrent.futures as futures
import csv
import io
import json
import math
import multiprocessing
import os
import queue as queue_module
import time

from .. import distributed
from .checkpoint import write_json_atomic, write_text_atomic
from .config import METHOD_SETTINGS, TrainConfig, validate
from .loop import RESULT, Run, RunError, train

NOISE_GROUP = "noise"


def run_folder(out, method, seed):
    return os.path.join(out, f"{method}-s{seed}")


def _worker(settings, resume, messages):
    import torch
    torch.set_num_threads(1)
    cfg = TrainConfig(**settings)
    label = f"{cfg.method}-s{cfg.seed}"

    def report(step, loss, counts):
        if step % 10 == 0 or step == cfg.steps:
            messages.put((label, step, loss, counts))

    return train(cfg, resume=resume, progress=False, callback=report)


def compare(base: TrainConfig, methods, seeds, *, jobs=2, out="runs/compare", resume=False, progress=True,
            title=""):
    """Train every (method, seed) and write compare.json / .csv / .md / .png under ``out``; returns the summary."""
    if not methods or not seeds:
        raise RunError("compare needs at least one method and one seed")
    if len(set(methods)) != len(methods) or len(set(seeds)) != len(seeds):
        raise RunError(f"methods and seeds must not repeat, got {methods} and {seeds}")
    if not isinstance(jobs, int) or jobs < 1:
        raise RunError(f"jobs must be a positive integer, got {jobs!r}")
    try:
        launched = distributed.env_world_size()
    except ValueError as exc:
        raise RunError(str(exc)) from None
    if launched > 1 or distributed.is_initialized():
        # The worker processes would each inherit the launcher's rank environment and join one process group.
        raise RunError("compare runs its own worker processes and cannot run under torchrun or in a process "
                       "group; launch `aioli-ext train` with torchrun for a data-parallel run")
    configs = []
    for method in methods:
        for seed in seeds:
            cfg = base.replace(method=method, seed=int(seed), out=run_folder(out, method, seed), threads=1,
                               progress=False)
            try:
                validate(cfg)
            except ValueError as exc:
                raise RunError(str(exc)) from None
            configs.append(cfg)
    # Everything is checked (data, settings, every method, and every seed's run that a reference_run or
    # prior_run names) before the first run starts or writes.
    checked = {c.method: c for c in configs}
    checked.update({(c.method, c.seed): c for c in configs
                    if any(getattr(c, name) is not None for name in ("reference_run", "prior_run")
                           if name in METHOD_SETTINGS[c.method])})
    for cfg in checked.values():
        Run(cfg)
    if not resume:
        taken = [c.out for c in configs if os.path.exists(c.out)]
        if taken:
            raise RunError(f"out: {out!r} already holds runs ({len(taken)} of them); pass --resume to finish or "
                           f"reuse them, or choose another --out")
    results = _run_all(configs, jobs, resume, progress)
    return summarise(results, out, title=title)


def _run_all(configs, jobs, resume, progress):
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=sum(c.steps for c in configs), desc=f"{len(configs)} runs", unit="step",
                   dynamic_ncols=True)
    done_steps = {}
    results = {}
    context = multiprocessing.get_context("spawn")
    with context.Manager() as manager:
        messages = manager.Queue()
        with futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
            pending = {pool.submit(_worker, c.to_dict(), resume, messages): c for c in configs}
            while pending:
                finished, _ = futures.wait(pending, timeout=0.5, return_when=futures.FIRST_COMPLETED)
                _drain(messages, bar, done_steps)
                for future in finished:
                    cfg = pending.pop(future)
                    try:
                        results[(cfg.method, cfg.seed)] = future.result()
                    except Exception:
                        for other in pending:
                            other.cancel()
                        raise
                    label = f"{cfg.method}-s{cfg.seed}"
                    if bar is not None:
                        bar.update(cfg.steps - done_steps.get(label, 0))
                        done_steps[label] = cfg.steps
                        r = results[(cfg.method, cfg.seed)]
                        bar.write(f"{label}: avg test PPL {r['avg_test_ppl']:.3f}  ("
                                  + ", ".join(f"{g} {p:.2f}" for g, p in zip(r["groups"], r["test_ppl"])) + ")")
            _drain(messages, bar, done_steps)
    if bar is not None:
        bar.close()
    return [results[(c.method, c.seed)] for c in configs]


def _drain(messages, bar, done_steps):
    while True:
        try:
            label, step, loss, counts = messages.get_nowait()
        except queue_module.Empty:
            return
        if bar is None:
            continue
        bar.update(max(0, step - done_steps.get(label, 0)))
        done_steps[label] = max(step, done_steps.get(label, 0))
        total = sum(counts) or 1
        bar.set_postfix_str(f"{label} loss {loss:.3f} p [{' '.join(f'{c / total:.2f}' for c in counts)}]")


# ---------------------------------------------------------------------------------------------- statistics

def t_interval(values, confidence=0.95):
    """(mean, low, high) of a t-interval for the mean of ``values`` (n >= 2), or (mean, nan, nan) for n = 1."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan, math.nan
    from scipy import stats
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def _sd(values):
    n = len(values)
    if n < 2:
        return math.nan
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def _avg_without(result, group):
    kept = [p for g, p in zip(result["groups"], result["test_ppl"]) if g != group]
    return sum(kept) / len(kept) if kept else math.nan


def summarise(results, out, title="", baseline="stratified"):
    """Tables over seeds: per-group test perplexity, their average (mean ± sd), paired differences against
    ``baseline`` with a 95% t-interval. Writes compare.json / compare.csv / compare.md / compare.png."""
    groups = results[0]["groups"]
    by_method = {}
    for r in results:
        by_method.setdefault(r["method"], {})[r["seed"]] = r
    has_noise = NOISE_GROUP in groups and len(groups) > 1
    methods = {}
    for method, runs in by_method.items():
        seeds = sorted(runs)
        avg = [runs[s]["avg_test_ppl"] for s in seeds]
        entry = {"seeds": seeds, "avg_test_ppl": avg, "mean": sum(avg) / len(avg), "sd": _sd(avg),
                 "per_group_mean": [sum(runs[s]["test_ppl"][g] for s in seeds) / len(seeds)
                                    for g in range(len(groups))],
                 "avg_val_ppl_mean": sum(runs[s]["avg_val_ppl"] for s in seeds) / len(seeds),
                 "train_seconds_mean": sum(runs[s]["train_seconds"] for s in seeds) / len(seeds),
                 "final_proportions_mean": [sum(runs[s]["proportions"][-1][g] for s in seeds) / len(seeds)
                                            for g in range(len(groups))]}
        if has_noise:
            entry["avg_without_noise_mean"] = sum(_avg_without(runs[s], NOISE_GROUP) for s in seeds) / len(seeds)
        if method != baseline and baseline in by_method:
            base = by_method[baseline]
            paired = [s for s in seeds if s in base]
            if paired:
                diffs = [runs[s]["avg_test_ppl"] - base[s]["avg_test_ppl"] for s in paired]
                mean, low, high = t_interval(diffs)
                entry["paired"] = {"seeds": paired, "differences": diffs, "mean": mean, "ci95": [low, high],
                                   "wins": sum(d < 0 for d in diffs)}
                val_diffs = [runs[s]["avg_val_ppl"] - base[s]["avg_val_ppl"] for s in paired]
                mean, low, high = t_interval(val_diffs)
                entry["paired_val"] = {"differences": val_diffs, "mean": mean, "ci95": [low, high]}
                if has_noise:
                    diffs = [_avg_without(runs[s], NOISE_GROUP) - _avg_without(base[s], NOISE_GROUP) for s in paired]
                    mean, low, high = t_interval(diffs)
                    entry["paired_without_noise"] = {"differences": diffs, "mean": mean, "ci95": [low, high]}
        methods[method] = entry
    summary = {"title": title, "groups": groups, "baseline": baseline, "methods": methods,
               "runs": [{k: r[k] for k in ("method", "seed", "test_ppl", "avg_test_ppl", "final_val_loss",
                                           "avg_val_ppl", "drawn_share", "train_seconds", "evaluations")}
                        for r in results],
               "settings": {k: v for k, v in results[0]["settings"].items()
                            if k not in ("method", "seed", "out", "progress")}}
    os.makedirs(out, exist_ok=True)
    write_json_atomic(summary, os.path.join(out, "compare.json"))
    write_text_atomic(runs_csv(results), os.path.join(out, "compare.csv"))
    write_text_atomic(markdown(summary), os.path.join(out, "compare.md"))
    from .plots import plot_compare
    plot_compare(results, os.path.join(out, "compare.png"), title=title)
    return summary


def runs_csv(results):
    groups = results[0]["groups"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["method", "seed"] + [f"test_ppl_{g}" for g in groups] + ["avg_test_ppl", "avg_val_ppl"]
                    + [f"drawn_{g}" for g in groups] + ["train_seconds", "evaluations"])
    for r in results:
        writer.writerow([r["method"], r["seed"]] + [f"{x:.4f}" for x in r["test_ppl"]]
                        + [f"{r['avg_test_ppl']:.4f}", f"{r['avg_val_ppl']:.4f}"]
                        + [f"{x:.4f}" for x in r["drawn_share"]] + [r["train_seconds"], r["evaluations"]])
    return buffer.getvalue()


def _ci(entry):
    low, high = entry["ci95"]
    if math.isnan(low):
        return f"{entry['mean']:+.3f}"
    return f"{entry['mean']:+.3f} [{low:+.3f}, {high:+.3f}]"


def markdown(summary):
    """The comparison as Markdown: per-group test PPL and average per method, then the paired differences."""
    groups = summary["groups"]
    baseline = summary["baseline"]
    lines = []
    if summary.get("title"):
        lines.append(f"#### {summary['title']}\n")
    n_seeds = max(len(m["seeds"]) for m in summary["methods"].values())
    lines.append(f"Test perplexity per group (mean over {n_seeds} seeds) and the average over groups "
                 f"(mean ± sd over seeds); lower is better.\n")
    lines.append("| method | " + " | ".join(groups) + " | avg test PPL | final mixture |")
    lines.append("|---" * (len(groups) + 3) + "|")
    for method, m in summary["methods"].items():
        sd = "" if math.isnan(m["sd"]) else f" ± {m['sd']:.3f}"
        lines.append(f"| {method} | " + " | ".join(f"{x:.3f}" for x in m["per_group_mean"])
                     + f" | **{m['mean']:.3f}**{sd} | " + "/".join(f"{x:.2f}" for x in m["final_proportions_mean"])
                     + " |")
    paired = [(method, m) for method, m in summary["methods"].items() if "paired" in m]
    if paired:
        noise = any("paired_without_noise" in m for _, m in paired)
        lines.append(f"\nPaired differences against {baseline} (same seed = same initial weights and data order; "
                     f"negative = better), mean and 95% t-interval over seeds:\n")
        header = "| method | seeds | avg test PPL Δ [95% CI] | wins | per-seed Δ test | avg val PPL Δ [95% CI] |"
        if noise:
            header += f" test Δ without {NOISE_GROUP} [95% CI] |"
        lines.append(header)
        lines.append("|---" * (7 if noise else 6) + "|")
        for method, m in paired:
            p = m["paired"]
            row = (f"| {method} | {len(p['seeds'])} | **{_ci(p)}** | {p['wins']}/{len(p['seeds'])} | "
                   + ", ".join(f"{d:+.3f}" for d in p["differences"]) + f" | {_ci(m['paired_val'])} |")
            if noise:
                row += f" {_ci(m['paired_without_noise'])} |"
            lines.append(row)
    return "\n".join(lines) + "\n"
