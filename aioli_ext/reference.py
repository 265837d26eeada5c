"""Pure-torch references of the aioli_ext ops, imported by the tests and the benchmarks alike.

Nothing here touches the compiled extension: these are the independent definitions the kernels are checked
against, plus the code users run today without the extension (the benchmark baselines).
"""
import bisect
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F


def _expand_group_ids(logits: torch.Tensor, targets: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """Group id of every token, the targets' shape (expands per-sequence ids [B] of [B, T, V] logits)."""
    if group_ids.shape == targets.shape:
        return group_ids.long()
    if logits.dim() == 3 and group_ids.shape == targets.shape[:1]:
        return group_ids.long().unsqueeze(1).expand(targets.shape)
    raise ValueError(f"group_ids must have the targets' shape {tuple(targets.shape)} or [B], "
                     f"got {tuple(group_ids.shape)}")


def group_cross_entropy_reference(logits: torch.Tensor, targets: torch.Tensor, group_ids: torch.Tensor,
                                  num_groups: int, *, ignore_index: int = -100,
                                  compute_dtype: torch.dtype = torch.float64):
    """Reference of ``aioli_ext.group_cross_entropy``: (loss, group_sums, token_counts).

    logits [N, V] or [B, T, V] of any float dtype are upcast to ``compute_dtype`` (fp64 by default) and go
    through ``log_softmax``; loss = -log_softmax[target], 0 where ``targets == ignore_index``; group_sums [K]
    in ``compute_dtype``; token_counts [K] int64. Differentiable with respect to logits (plain autograd).
    """
    ids = _expand_group_ids(logits, targets, group_ids).reshape(-1)
    log_probs = torch.log_softmax(logits.to(compute_dtype), dim=-1)
    valid = targets != ignore_index
    safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
    picked = log_probs.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    loss = torch.where(valid, -picked, torch.zeros_like(picked))
    group_sums = torch.zeros(num_groups, dtype=compute_dtype, device=logits.device).index_add(
        0, ids, loss.reshape(-1))
    token_counts = torch.zeros(num_groups, dtype=torch.int64, device=logits.device).index_add(
        0, ids, valid.reshape(-1).long())
    return loss, group_sums, token_counts


def group_objective_reference(group_sums: torch.Tensor, token_counts: torch.Tensor,
                              group_weights: Optional[torch.Tensor] = None, normalize: str = "tokens"):
    """The objective of ``aioli_ext.group_cross_entropy_fused`` from group statistics (differentiable in
    group_sums): "tokens" sum_g w_g S_g / sum_g n_g; "groups" sum_g w_g S_g / n_g over non-empty groups;
    "none" sum_g w_g S_g. No token at all gives 0."""
    weights = torch.ones_like(group_sums) if group_weights is None else group_weights.to(group_sums.dtype)
    counts = token_counts.to(group_sums.dtype)
    if normalize == "tokens":
        return (weights * group_sums).sum() / counts.sum().clamp_min(1)
    if normalize == "groups":
        per_group = torch.where(token_counts > 0, group_sums / counts.clamp_min(1), torch.zeros_like(group_sums))
        return (weights * per_group).sum()
    if normalize == "none":
        return (weights * group_sums).sum()
    raise ValueError(f"normalize must be one of 'tokens', 'groups', 'none', got {normalize!r}")


def group_cross_entropy_eager(logits: torch.Tensor, targets: torch.Tensor, group_ids: torch.Tensor,
                              num_groups: int, *, ignore_index: int = -100):
    """What users write today without the extension (the benchmark baseline): ``F.cross_entropy`` with
    ``reduction="none"`` in the logits' dtype, then ``index_add_`` of the losses per group.
    Returns (loss, group_sums, token_counts) like the op, group sums in fp32."""
    vocab = logits.shape[-1]
    ids = _expand_group_ids(logits, targets, group_ids).reshape(-1)
    loss = F.cross_entropy(logits.reshape(-1, vocab), targets.reshape(-1), reduction="none",
                           ignore_index=ignore_index)
    group_sums = torch.zeros(num_groups, dtype=torch.float32, device=logits.device).index_add_(
        0, ids, loss.float())
    token_counts = torch.zeros(num_groups, dtype=torch.int64, device=logits.device).index_add_(
        0, ids, (targets.reshape(-1) != ignore_index).long())
    return loss.view(targets.shape), group_sums, token_counts


def group_linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                         group_ids: torch.Tensor, num_groups: int, *,
                                         bias: Optional[torch.Tensor] = None, ignore_index: int = -100,
                                         compute_dtype: torch.dtype = torch.float64):
    """Reference of ``aioli_ext.group_linear_cross_entropy``: logits = hidden @ weight.T (+ bias) computed in
    ``compute_dtype`` (fp64 by default) from the given values, then :func:`group_cross_entropy_reference`.
    Differentiable with respect to hidden, weight and bias (plain autograd)."""
    logits = hidden.to(compute_dtype) @ weight.to(compute_dtype).T
    if bias is not None:
        logits = logits + bias.to(compute_dtype)
    return group_cross_entropy_reference(logits, targets, group_ids, num_groups, ignore_index=ignore_index,
                                         compute_dtype=compute_dtype)


def group_linear_cross_entropy_eager(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                                     group_ids: torch.Tensor, num_groups: int, *,
                                     bias: Optional[torch.Tensor] = None, ignore_index: int = -100):
    """What users write today (the benchmark baseline): ``hidden @ weight.T`` (+ bias) in the inputs' dtype,
    materialising the [N, V] logits, then :func:`group_cross_entropy_eager` (F.cross_entropy + index_add_)."""
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return group_cross_entropy_eager(logits, targets, group_ids, num_groups, ignore_index=ignore_index)


# ----------------------------------------------------------------------------------------------------------------
# Mixture sampling: Philox4x32-10, the keyed permutation and the whole sampler step.
# torch has no unsigned 64-bit arithmetic, so the bit-level parts use numpy uint64 (exact, wrapping mod 2^64)
# and Python integers (the systematic allocation and the slot bookkeeping).
# ----------------------------------------------------------------------------------------------------------------
_MASK32 = np.uint64(0xFFFFFFFF)
_U32 = np.uint64(32)
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85

TAG_SLOT_ORDER = 0x40000000
TAG_PERMUTATION = 0x80000000
THRESHOLD_BITS = 62
THRESHOLD_TOTAL = 1 << THRESHOLD_BITS
RESIDUAL_FRACTION_BITS = 32


def _u64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.uint64)


def philox4x32_10(counter: Sequence, key: Sequence) -> List[np.ndarray]:
    """Philox4x32-10 (Random123). ``counter``: four words (ints or uint64 arrays); ``key``: two words.
    Returns the four output words as uint64 arrays holding 32-bit values."""
    c0, c1, c2, c3 = (_u64(w) & _MASK32 for w in counter)
    k0, k1 = (_u64(w) & _MASK32 for w in key)
    m0, m1 = np.uint64(PHILOX_M0), np.uint64(PHILOX_M1)
    for round_index in range(10):
        if round_index:
            k0 = (k0 + np.uint64(PHILOX_W0)) & _MASK32
            k1 = (k1 + np.uint64(PHILOX_W1)) & _MASK32
        p0 = m0 * c0  # both factors < 2^32: the product is exact in uint64
        p1 = m1 * c2
        c0, c1, c2, c3 = ((p1 >> _U32) ^ c1 ^ k0, p1 & _MASK32, (p0 >> _U32) ^ c3 ^ k1, p0 & _MASK32)
    return [np.broadcast_to(c, np.broadcast(c0, c1, c2, c3).shape).copy() for c in (c0, c1, c2, c3)]


def philox4x32(counters: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Reference of ops.philox4x32: counters [N, 4] int64, key [2] int64 -> [N, 4] int64."""
    c = counters.cpu().numpy().astype(np.uint64)
    k = key.cpu().numpy().astype(np.uint64)
    out = philox4x32_10([c[:, 0], c[:, 1], c[:, 2], c[:, 3]], [k[0], k[1]])
    return torch.from_numpy(np.stack(out, axis=1).astype(np.int64))


_MASK64 = (1 << 64) - 1
SMALL_PERMUTATION_SIZE = 20
WIDE_FEISTEL_ROUNDS = 4
WIDE_FEISTEL_BITS = 10


def _mix(v):
    """The 64-bit multiply-xorshift mixer of csrc/permutation.h (numpy uint64 arrays or Python ints)."""
    if isinstance(v, int):
        v = (v * 0x9E3779B97F4A7C15) & _MASK64
        v ^= v >> 32
        return (v * 0xD6E8FEB86659FD93) & _MASK64
    with np.errstate(over="ignore"):
        v = v * np.uint64(0x9E3779B97F4A7C15)
        v = v ^ (v >> _U32)
        return v * np.uint64(0xD6E8FEB86659FD93)


def _round_function(half: np.ndarray, key: int, out_bits: int) -> np.ndarray:
    if out_bits == 0:
        return np.zeros_like(half)
    return _mix((np.uint64(key) << _U32) | half) >> np.uint64(64 - out_bits)


class FeistelPermutation:
    """The keyed bijection of [0, n): a Fisher-Yates shuffle decoded from the key for n <= 20, else an unbalanced
    Feistel network on [0, 2^m) (six rounds, four when m >= 10) with cycle walking down to [0, n)."""

    def __init__(self, n: int, keys: Sequence[int]):
        self.n = int(n)
        m = (self.n - 1).bit_length() if self.n > 1 else 0
        self.left_bits, self.right_bits = m // 2, m - m // 2
        keys = [int(k) for k in keys]
        if len(keys) == 4:
            extra = _mix(((keys[0] ^ keys[2]) << 32) | (keys[1] ^ keys[3] ^ 0x2545F491))
            keys += [extra >> 32, extra & 0xFFFFFFFF]
        self.keys = keys

    def network(self, x: np.ndarray) -> np.ndarray:
        wl, wr = self.left_bits, self.right_bits
        left = x >> np.uint64(wr)
        right = x & np.uint64((1 << wr) - 1)
        rounds = WIDE_FEISTEL_ROUNDS if wl + wr >= WIDE_FEISTEL_BITS else len(self.keys)
        for key in self.keys[:rounds]:
            left, right = right, left ^ _round_function(right, key, wl)
            wl, wr = wr, wl
        return (left << np.uint64(wr)) | right

    def small_order(self) -> List[int]:
        order = list(range(self.n))
        words = [self.keys[0] | (self.keys[1] << 32), self.keys[2] | (self.keys[3] << 32)]
        for i in range(self.n - 1, 0, -1):
            w = 0 if i >= 12 else 1
            j, words[w] = divmod(words[w] * (i + 1), 1 << 64)
            order[i], order[j] = order[j], order[i]
        return order

    def __call__(self, x) -> np.ndarray:
        x = _u64(x).copy()
        if self.n <= 1:
            return np.zeros_like(x)
        if self.n <= SMALL_PERMUTATION_SIZE:
            return np.asarray(self.small_order(), dtype=np.uint64)[x.astype(np.int64)]
        y = self.network(x)
        outside = y >= np.uint64(self.n)
        while outside.any():
            y[outside] = self.network(y[outside])
            outside = y >= np.uint64(self.n)
        return y


def _seed_words(seed: int) -> Tuple[int, int]:
    seed &= (1 << 64) - 1
    return seed & 0xFFFFFFFF, seed >> 32


def group_epoch_permutation(seed: int, group: int, epoch: int, n: int) -> FeistelPermutation:
    words = philox4x32_10([group & 0xFFFFFFFF, TAG_PERMUTATION, epoch & 0xFFFFFFFF, epoch >> 32], _seed_words(seed))
    return FeistelPermutation(n, [int(w) for w in words])


def slot_order_permutation(seed: int, step: int, batch_size: int) -> FeistelPermutation:
    words = philox4x32_10([0, TAG_SLOT_ORDER, step & 0xFFFFFFFF, step >> 32], _seed_words(seed))
    return FeistelPermutation(batch_size, [int(w) for w in words])


def keyed_permutation(positions: torch.Tensor, n: int, seed: int, group: int, epoch: int) -> torch.Tensor:
    """Reference of ops.keyed_permutation."""
    perm = group_epoch_permutation(seed, group, epoch, n)
    return torch.from_numpy(perm(positions.cpu().numpy().astype(np.uint64)).astype(np.int64))


def slot_random(seed: int, step: int, round_index: int, slots: np.ndarray) -> np.ndarray:
    """64 random bits per slot: one Philox call per pair of slots (even slot: words 0-1, odd slot: words 2-3)."""
    slots = _u64(slots)
    w = philox4x32_10([slots >> np.uint64(1), round_index, step & 0xFFFFFFFF, step >> 32], _seed_words(seed))
    odd = (slots & np.uint64(1)).astype(bool)
    return np.where(odd, w[2] | (w[3] << _U32), w[0] | (w[1] << _U32))


def thresholds(proportions: Sequence[float], open_groups: Optional[Sequence[bool]] = None) -> List[int]:
    """Cumulative fixed-point thresholds (K + 1 ints from 0 to 2^62) of the (open) proportions."""
    p = [float(v) for v in proportions]
    is_open = [True] * len(p) if open_groups is None else [bool(o) for o in open_groups]
    total = 0.0
    for v, o in zip(p, is_open):
        if o:
            total += v
    table = [0]
    prefix = 0.0
    for v, o in zip(p, is_open):
        if o:
            prefix += v
        table.append(max(table[-1], min(THRESHOLD_TOTAL, int(np.floor(prefix / total * float(THRESHOLD_TOTAL))))))
    table[-1] = THRESHOLD_TOTAL
    return table


def _group_of(table: List[int], value: int) -> int:
    # First g with table[g + 1] > value.
    return bisect.bisect_right(table, value, lo=1) - 1


def systematic_allocation(table: List[int], residual: List[int], batch_size: int) -> Tuple[List[int], List[int]]:
    """Largest-remainder allocation with carried residuals (units of 2^-32 slot); returns (counts, residual)."""
    num_groups = len(table) - 1
    one = 1 << RESIDUAL_FRACTION_BITS
    shift = THRESHOLD_BITS - RESIDUAL_FRACTION_BITS
    eligible = [table[g + 1] > table[g] for g in range(num_groups)]
    owed = list(residual)
    counts = [0] * num_groups
    for g in range(num_groups):
        if eligible[g]:
            share = ((batch_size * table[g + 1]) >> shift) - ((batch_size * table[g]) >> shift)
            owed[g] = residual[g] + share
            counts[g] = owed[g] // one if owed[g] >= 0 else 0
    fraction = [owed[g] % one if eligible[g] and owed[g] >= 0 else 0 for g in range(num_groups)]
    left = batch_size - sum(counts)
    members = [g for g in range(num_groups) if eligible[g]]
    if left > 0:
        each, extra = divmod(left, len(members))
        for g in members:
            counts[g] += each
        for g in sorted(members, key=lambda g: (-fraction[g], g))[:extra]:
            counts[g] += 1
    elif left < 0:
        order = sorted((g for g in range(num_groups) if counts[g] > 0), key=lambda g: (fraction[g], g))
        while left < 0:
            for g in order:
                if counts[g] > 0 and left < 0:
                    counts[g] -= 1
                    left += 1
    new_residual = [owed[g] - counts[g] * one if eligible[g] else residual[g] for g in range(num_groups)]
    return counts, new_residual


def mixture_sample(group_sizes: Sequence[int], proportions: Sequence[float], cursor: Sequence[int], seed: int,
                   step: int, batch_size: int, rank: int = 0, world_size: int = 1,
                   residual: Optional[Sequence[int]] = None, capacity: Optional[Sequence[int]] = None,
                   csr_sample_ids: Optional[Sequence[int]] = None, group_starts: Optional[Sequence[int]] = None):
    """One sampler step, slot by slot. Returns (sample_ids, group_ids, new_cursor, new_residual) as lists;
    new_residual is None in i.i.d. mode. Groups closed by ``capacity`` at the start get weight zero."""
    sizes = [int(s) for s in group_sizes]
    num_groups = len(sizes)
    if group_starts is None:
        group_starts = [sum(sizes[:g]) for g in range(num_groups)]
    cursor = [int(c) for c in cursor]
    open_groups = None if capacity is None else [cursor[g] < capacity[g] for g in range(num_groups)]
    table = thresholds(proportions, open_groups)
    slot_group = [0] * batch_size
    slot_rank = [0] * batch_size
    new_residual = None
    if residual is None:
        bits = slot_random(seed, step, 0, np.arange(batch_size))
        seen = [0] * num_groups
        for j in range(batch_size):
            g = _group_of(table, (int(bits[j]) * table[-1]) >> 64)
            slot_group[j], slot_rank[j] = g, seen[g]
            seen[g] += 1
        counts = seen
    else:
        counts, new_residual = systematic_allocation(table, [int(r) for r in residual], batch_size)
        starts = [0]
        for c in counts:
            starts.append(starts[-1] + c)
        order = slot_order_permutation(seed, step, batch_size)(np.arange(batch_size))
        for j in range(batch_size):
            q = int(order[j])
            g = _group_of(starts, q)
            slot_group[j], slot_rank[j] = g, q - starts[g]
    placed = {}
    pending = []
    for j in range(batch_size):
        g, k = slot_group[j], slot_rank[j]
        if capacity is not None and cursor[g] + k >= capacity[g]:
            pending.append(j)
        else:
            placed[j] = (g, cursor[g] + k)
    for g in range(num_groups):
        cursor[g] += counts[g] if capacity is None else min(counts[g], capacity[g] - cursor[g])
    round_index = 1
    while pending:
        weights = [table[g + 1] - table[g] if cursor[g] < capacity[g] else 0 for g in range(num_groups)]
        round_table = [0]
        for w in weights:
            round_table.append(round_table[-1] + w)
        if round_table[-1] == 0:
            raise RuntimeError("every group with a positive proportion has reached max_epochs")
        bits = slot_random(seed, step, round_index, np.array(pending))
        seen = [0] * num_groups
        still = []
        for j, b in zip(pending, bits):
            g = _group_of(round_table, (int(b) * round_table[-1]) >> 64)
            position = cursor[g] + seen[g]
            seen[g] += 1
            if position < capacity[g]:
                placed[j] = (g, position)
            else:
                still.append(j)
        for g in range(num_groups):
            cursor[g] += min(seen[g], capacity[g] - cursor[g])
        pending = still
        round_index += 1
    per_rank = batch_size // world_size
    ids, groups = [], []
    for j in range(rank * per_rank, (rank + 1) * per_rank):
        g, position = placed[j]
        epoch, offset = divmod(position, sizes[g])
        flat = group_starts[g] + int(group_epoch_permutation(seed, g, epoch, sizes[g])(np.array([offset]))[0])
        ids.append(int(csr_sample_ids[flat]) if csr_sample_ids is not None else flat)
        groups.append(g)
    return ids, groups, cursor, new_residual
