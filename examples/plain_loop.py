"""Online data mixing in a plain PyTorch loop: MixtureSampler + a mixer + GroupEvaluator + any model.

Three synthetic groups of token sequences that differ in difficulty (a counting cycle, a noisy Markov chain,
uniform noise); a small GPT learns them while the mixer sets the proportions. Per optimizer step:

    if mixer.wants_eval(step): mixer.observe(step, evaluator(forward))   # the model after `step` steps
    counts = mixer.group_counts(step, batch)                              # exact per-group counts
    sample_ids, group_ids = sampler.sample(batch, counts.double())        # systematic: counts realised exactly
    ...train on the samples...

Run: ``python examples/plain_loop.py --method aioli --steps 240`` (about a minute on 2 CPU cores).
"""
import argparse
import math

import torch

from aioli_ext import MixtureSampler, group_linear_cross_entropy
from aioli_ext.mixing import Aioli, GroupEvaluator, Stratified
from aioli_ext.model import GPT, GPTConfig

GROUP_NAMES = ("cycle", "markov", "noise")


def synthetic_groups(sequences_per_group, length, vocab_size=64, seed=0):
    """One int64 [sequences_per_group, length] tensor per group of GROUP_NAMES.

    cycle: t, t+1, t+2, ... (mod V) from a random start -- learnable to zero loss.
    markov: next = 5·current + u (mod V), u uniform in {0, 1, 2, 3} -- floor loss ln 4.
    noise: uniform tokens -- floor loss ln V, nothing to learn.
    """
    generator = torch.Generator().manual_seed(seed)
    n = sequences_per_group
    starts = torch.randint(vocab_size, (n, 1), generator=generator)
    cycle = (starts + torch.arange(length)) % vocab_size
    steps = torch.randint(4, (n, length), generator=generator)
    markov = torch.empty(n, length, dtype=torch.int64)
    markov[:, 0] = torch.randint(vocab_size, (n,), generator=generator)
    for t in range(1, length):
        markov[:, t] = (5 * markov[:, t - 1] + steps[:, t]) % vocab_size
    noise = torch.randint(vocab_size, (n, length), generator=generator)
    return [cycle, markov, noise]


def build_mixer(method, num_groups, steps, update_steps, seed):
    if method == "stratified":
        return Stratified(num_groups)
    if method == "aioli":
        return Aioli(num_groups, update_steps=update_steps, lp_sweeps=1, lp_steps=2, one_hot=0.75, eta=1.0,
                     total_steps=steps, seed=seed)
    raise ValueError(f"method must be 'aioli' or 'stratified', got {method!r}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="aioli", choices=["aioli", "stratified"])
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--update-steps", type=int, default=40, help="steps per Aioli round")
    parser.add_argument("--batch", type=int, default=24, help="sequences per optimizer step")
    parser.add_argument("--context", type=int, default=32)
    parser.add_argument("--sequences", type=int, default=2048, help="training sequences per group")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


def main(argv=None):
    """Train once; returns {"proportions": float64 [steps, K], "group_counts": int64 [steps, K],
    "evaluations": [(step, [K losses])], "final_val_loss": [K]}."""
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    vocab_size = 64
    train_groups = synthetic_groups(args.sequences, args.context + 1, vocab_size, seed=args.seed)
    val_groups = synthetic_groups(16, args.context + 1, vocab_size, seed=args.seed + 10_000)
    num_groups = len(train_groups)

    # Global sample id i is row i of the concatenated groups: group g owns a consecutive range of ids.
    tokens = torch.cat(train_groups)
    sampler = MixtureSampler([len(g) for g in train_groups], seed=args.seed, mode="systematic")
    evaluator = GroupEvaluator.from_group_sequences(val_groups, batch_size=48)
    model = GPT(GPTConfig(vocab_size=vocab_size, context_length=args.context, d_model=32, n_layers=1,
                          n_heads=2), seed=args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    mixer = build_mixer(args.method, num_groups, args.steps, args.update_steps, args.seed)

    def forward(inputs):
        # (hidden, LM head weight): the evaluator then never materialises [B, T, V] logits.
        return model(inputs), model.lm_head.weight

    proportions, group_counts = [], []
    for step in range(args.steps):
        if mixer.wants_eval(step):
            losses = evaluator(forward)
            mixer.observe(step, losses)
            if not args.quiet:
                mixture = " ".join(f"{name}={p:.2f}" for name, p in zip(GROUP_NAMES, mixer.proportions(step)))
                loss_text = " ".join(f"{value:.3f}" for value in losses.tolist())
                print(f"step {step:4d}  val loss [{loss_text}]  ->  {mixture}")
        counts = mixer.group_counts(step, args.batch)
        sample_ids, group_ids = sampler.sample(args.batch, counts.to(torch.float64))
        window = tokens[sample_ids]
        model.train()
        hidden = model(window[:, :-1])
        per_token, _, _ = group_linear_cross_entropy(hidden, model.lm_head.weight, window[:, 1:], group_ids,
                                                     num_groups)
        optimizer.zero_grad(set_to_none=True)
        per_token.mean().backward()
        optimizer.step()
        proportions.append(mixer.proportions(step))
        group_counts.append(torch.bincount(group_ids, minlength=num_groups))

    final = evaluator(forward)
    if not args.quiet:
        print("final val loss " + " ".join(f"{name}={value:.3f}" for name, value in zip(GROUP_NAMES, final.tolist()))
              + f"  (floors: cycle 0, markov {math.log(4):.3f}, noise {math.log(vocab_size):.3f})")
    return {"proportions": torch.stack(proportions), "group_counts": torch.stack(group_counts),
            "evaluations": [(e["step"], e["losses"]) for e in mixer.log.evaluations],
            "final_val_loss": final.tolist()}


if __name__ == "__main__":
    main()
