"""Headroom study: how much do static mixtures beat stratified (uniform) sampling on a token store?

If no static mixture beats uniform, no online mixer can either, so this measures the room a mixer has before
any mixer is run. Each run trains the small GPT of aioli_ext.model with plain torch cross-entropy on a fixed
mixture (a torch.Generator draws each slot's group i.i.d. from the proportions; inside a group, examples
follow a per-group random permutation seeded by (seed, group), so runs with the same seed see the same
examples of each group in the same order, whatever the mixture), then reports per-group VALIDATION loss and
perplexity. The test split is never read here: defaults are chosen on validation only.

One run:     python bench/headroom_study.py run --groups code,docs --mix 0.7,0.3 --seed 0 --label c+d/70-30
Summary:     python bench/headroom_study.py summary      (tables from bench/results/headroom_runs.jsonl)
"""
import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from aioli_ext.data import TokenStore, build_default_corpus  # noqa: E402
from aioli_ext.model import GPT, GPTConfig  # noqa: E402

RESULTS = os.path.join(ROOT, "bench", "results", "headroom_runs.jsonl")


def lr_at(step, steps, peak, warmup, floor=0.1):
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


class StaticMixture:
    """Study-only sampler: group per slot i.i.d. from p; per-group permutations, reshuffled each epoch."""

    def __init__(self, windows, proportions, seed):
        self.windows = windows
        self.p = torch.tensor(proportions, dtype=torch.float64)
        self.slots = torch.Generator().manual_seed(seed * 1_000_003 + 17)
        self.group_gens = [torch.Generator().manual_seed(seed * 1_000_003 + 101 + g)
                           for g in range(windows.num_groups)]
        self.perms = [torch.randperm(int(n), generator=gen) for n, gen in zip(windows.num_examples,
                                                                               self.group_gens)]
        self.cursor = [0] * windows.num_groups
        self.epochs = [0] * windows.num_groups

    def draw(self, batch):
        groups = torch.multinomial(self.p, batch, replacement=True, generator=self.slots)
        ids = torch.empty(batch, dtype=torch.int64)
        for slot, g in enumerate(groups.tolist()):
            if self.cursor[g] == len(self.perms[g]):
                self.perms[g] = torch.randperm(len(self.perms[g]), generator=self.group_gens[g])
                self.cursor[g] = 0
                self.epochs[g] += 1
            ids[slot] = self.windows.offsets[g] + self.perms[g][self.cursor[g]]
            self.cursor[g] += 1
        return ids


@torch.no_grad()
def group_losses(model, windows, id_lists, batch=64):
    """Mean next-token loss (nats) per group over the given global ids, fp32."""
    model.eval()
    out = []
    for ids in id_lists:
        total, count = 0.0, 0
        for begin in range(0, len(ids), batch):
            inputs, targets, _ = windows.batch(ids[begin:begin + batch])
            logits = model.logits(model(inputs)).float()
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                     reduction="sum").item()
            count += targets.numel()
        out.append(total / count)
    model.train()
    return out


def run(args):
    torch.set_num_threads(args.threads)
    if not os.path.isfile(os.path.join(args.corpus, "manifest.json")):
        build_default_corpus(args.corpus)
    store = TokenStore.open(args.corpus, groups=args.groups)
    k = len(store.groups)
    if args.mix == "uniform":
        mix = [1.0 / k] * k
    else:
        mix = [float(x) for x in args.mix.split(",")]
        if len(mix) != k or min(mix) < 0 or sum(mix) <= 0:
            raise SystemExit(f"--mix needs {k} non-negative numbers, got {args.mix}")
        mix = [x / sum(mix) for x in mix]
    train = store.windows("train", args.context)
    val = store.windows("val", args.context)
    curve_ids = val.evaluation_ids(args.eval_windows)
    final_ids = val.evaluation_ids(args.final_windows)
    config = GPTConfig(vocab_size=store.vocab_size, context_length=args.context, d_model=args.d_model,
                       n_layers=args.layers, n_heads=args.heads)
    model = GPT(config, seed=args.seed)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    sampler = StaticMixture(train, mix, args.seed)
    load_before = os.getloadavg()
    curve = []
    start = time.time()
    train_seconds = 0.0
    for step in range(args.steps):
        if step % args.eval_every == 0:
            curve.append({"step": step, "val_loss": group_losses(model, val, curve_ids)})
        tick = time.time()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        inputs, targets, _ = train.batch(sampler.draw(args.batch))
        logits = model.logits(model(inputs))
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        train_seconds += time.time() - tick
    curve.append({"step": args.steps, "val_loss": group_losses(model, val, curve_ids)})
    final = group_losses(model, val, final_ids)
    wall = time.time() - start
    ppl = [math.exp(x) for x in final]
    record = {
        "label": args.label, "groups": store.groups, "mix": mix, "seed": args.seed, "steps": args.steps,
        "batch": args.batch, "context": args.context, "lr": args.lr, "model": config.to_dict(),
        "parameters": model.num_parameters(), "val_loss": final, "val_ppl": ppl,
        "avg_val_ppl": sum(ppl) / k, "final_windows": [len(x) for x in final_ids],
        "epochs_seen": [round(c / max(1, int(n)) + e, 3) for c, n, e in
                        zip(sampler.cursor, train.num_examples, sampler.epochs)],
        "curve": curve, "wall_s": round(wall, 1), "train_s": round(train_seconds, 1),
        "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()],
        "threads": args.threads, "torch": torch.__version__, "machine": platform.machine(),
        "cpus": os.cpu_count(), "commit": _commit(), "corpus_fingerprint": store.manifest.get("fingerprint"),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "a") as handle:
        handle.write(json.dumps(record) + "\n")
    print(f"{args.label}: groups {store.groups} mix {[round(x, 3) for x in mix]} seed {args.seed} -> val ppl "
          f"{[round(x, 3) for x in ppl]} avg {record['avg_val_ppl']:.3f}  ({wall:.0f}s, load {load_before[0]:.1f})")


def _commit():
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def summary(args):
    """Markdown tables per group set: every run, then each static mixture minus uniform, paired by seed and lr."""
    rows = [json.loads(line) for line in open(args.out) if line.strip()]
    by_groups = {}
    for r in rows:
        by_groups.setdefault(",".join(r["groups"]), []).append(r)
    lines = []
    for groups, runs in by_groups.items():
        names = runs[0]["groups"]
        lines.append(f"\n#### {groups.replace(',', ' + ')}\n")
        lines.append("| run | seed | lr | mix | " + " | ".join(names) + " | avg val PPL | wall s (load) |")
        lines.append("|---" * (len(names) + 6) + "|")
        for r in sorted(runs, key=lambda r: (r["lr"], r["label"], r["seed"])):
            lines.append(f"| {r['label']} | {r['seed']} | {r['lr']:g} | {'/'.join(f'{x:.2f}' for x in r['mix'])} | "
                         + " | ".join(f"{x:.2f}" for x in r["val_ppl"])
                         + f" | **{r['avg_val_ppl']:.3f}** | {r['wall_s']:.0f} ({r['load_before'][0]:.1f}) |")
        uniform = {(r["seed"], r["lr"]): r for r in runs if max(r["mix"]) - min(r["mix"]) < 1e-9}
        for r in runs:
            base = uniform.get((r["seed"], r["lr"]))
            if base is not None and base is not r:
                lines.append(f"\n{r['label']} minus uniform (seed {r['seed']}, lr {r['lr']:g}): "
                             f"{r['avg_val_ppl'] - base['avg_val_ppl']:+.3f} avg val PPL")
    text = "\n".join(lines)
    print(text)
    return text


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--corpus", default=os.path.join(ROOT, "runs", "default_corpus"))
    r.add_argument("--groups", default=None, help="comma-separated subset, in order (default: all)")
    r.add_argument("--mix", default="uniform", help="'uniform' or comma-separated proportions")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--steps", type=int, default=1000)
    r.add_argument("--batch", type=int, default=16)
    r.add_argument("--context", type=int, default=128)
    r.add_argument("--d-model", type=int, default=128)
    r.add_argument("--layers", type=int, default=2)
    r.add_argument("--heads", type=int, default=4)
    r.add_argument("--lr", type=float, default=3e-3)
    r.add_argument("--warmup", type=int, default=50)
    r.add_argument("--weight-decay", type=float, default=0.1)
    r.add_argument("--eval-every", type=int, default=100)
    r.add_argument("--eval-windows", type=int, default=32)
    r.add_argument("--final-windows", type=int, default=256)
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--label", default="run")
    r.add_argument("--out", default=RESULTS)
    s = sub.add_parser("summary")
    s.add_argument("--out", default=RESULTS)
    args = parser.parse_args(argv)
    if args.command == "run":
        if args.groups:
            args.groups = args.groups.split(",")
        run(args)
    else:
        summary(args)


if __name__ == "__main__":
    main()
