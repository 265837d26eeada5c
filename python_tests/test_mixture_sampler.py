"""Tests of the mixture sampler: Philox and permutation header code, the sampling op against the slot-by-slot
reference, statistics, exhaustion without replacement, exact resume, rank slices, scale, CPU/CUDA identity, bad
input messages and the DataLoader adapter."""
import copy

import numpy as np
import pytest
import scipy.stats
import torch

import aioli_ext
from aioli_ext import ops
from aioli_ext import reference as ref
from aioli_ext.sampler import MixtureBatchSampler, MixtureSampler

from devices import DEVICES, requires_cuda
MODES = ["iid", "systematic"]
# Statistical tests run with fixed seeds (deterministic) and reject below this p-value.
P_VALUE_THRESHOLD = 1e-4

# Random123 kat_vectors, philox4x32 10: counter[4], key[2] -> output[4].
PHILOX_KAT = [
    ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
    ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
    ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0],
     [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
]


def _group_of_ids(sizes, ids):
    bounds = np.cumsum(sizes)
    return np.searchsorted(bounds, np.asarray(ids), side="right")


# ---------------------------------------------------------------------------------------------------------------
# Philox and the keyed permutation (the header code, through the test ops)
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
def test_philox_known_answer_vectors(device):
    for counter, key, expected in PHILOX_KAT:
        out = ops.philox4x32(torch.tensor([counter], device=device), torch.tensor(key))
        assert out.cpu().tolist() == [expected]
        assert [int(w) for w in ref.philox4x32_10(counter, key)] == expected


def test_philox_op_matches_reference():
    gen = torch.Generator().manual_seed(0)
    counters = torch.randint(0, 1 << 32, (257, 4), generator=gen)
    key = torch.tensor([0x12345678, 0x9ABCDEF0])
    assert torch.equal(ops.philox4x32(counters, key), ref.philox4x32(counters, key))


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 1000, 2**16, 2**20 + 7])
@pytest.mark.parametrize("device", DEVICES)
def test_permutation_is_a_bijection(n, device):
    for seed, group, epoch in [(0, 0, 0), (7, 3, 1), (2**63 - 1, 2**32 - 1, 2**40)]:
        image = ops.keyed_permutation(torch.arange(n, device=device), n, seed, group, epoch).cpu()
        assert torch.equal(torch.sort(image).values, torch.arange(n))


@pytest.mark.parametrize("n", [3, 1000, 2**20 + 7, 2**40 + 3, 2**62])
def test_permutation_matches_reference(n):
    gen = np.random.default_rng(n % 1000)
    positions = torch.from_numpy(gen.integers(0, n, size=300, dtype=np.int64))
    got = ops.keyed_permutation(positions, n, 5, 11, 2)
    assert torch.equal(got, ref.keyed_permutation(positions, n, 5, 11, 2))
    assert bool(((got >= 0) & (got < n)).all())


def test_permutation_is_uniform_over_keys():
    # perm(0) over 3000 (group) keys of a 6-element domain: chi-square against uniform.
    n, groups = 6, 3000
    first = [int(ops.keyed_permutation(torch.tensor([0]), n, 1, g, 0)) for g in range(groups)]
    counts = np.bincount(first, minlength=n)
    assert scipy.stats.chisquare(counts).pvalue > P_VALUE_THRESHOLD
    # Different epochs and groups give different orders.
    a = ops.keyed_permutation(torch.arange(1000), 1000, 1, 0, 0)
    assert not torch.equal(a, ops.keyed_permutation(torch.arange(1000), 1000, 1, 0, 1))
    assert not torch.equal(a, ops.keyed_permutation(torch.arange(1000), 1000, 1, 1, 0))
    assert not torch.equal(a, ops.keyed_permutation(torch.arange(1000), 1000, 2, 0, 0))


@pytest.mark.parametrize("n", [7, 20, 24])
def test_permutation_pairs_are_uniform(n):
    # (perm(0), perm(1)) over 30 * n * (n - 1) keys against the n * (n - 1) equally likely ordered pairs: covers
    # the exact small-domain shuffle (n <= 20) and the Feistel network just above it, where too few rounds show.
    keys = 30 * n * (n - 1)
    pairs = np.zeros((n, n), dtype=np.int64)
    for g in range(keys):
        a, b = ops.keyed_permutation(torch.tensor([0, 1]), n, 3, g, 1).tolist()
        pairs[a, b] += 1
    assert np.trace(pairs) == 0
    assert scipy.stats.chisquare(pairs[~np.eye(n, dtype=bool)]).pvalue > P_VALUE_THRESHOLD


@pytest.mark.parametrize("n", [1100, 2**16 + 5])
def test_wide_permutation_pairs_and_order_look_random(n):
    # Four-round domains (2^10 and up): (perm(0), perm(1)) binned 8 x 8 over 16000 keys against the
    # without-replacement expectation, and no rank correlation between x and perm(x) within single keys
    # (|z| < 4.5 over 40 keys, with z = rho * sqrt(n - 1) standard normal for a random order).
    keys, bins = 16000, 8
    edges = np.linspace(0, n, bins + 1).astype(np.int64)
    first = np.empty((keys, 2), dtype=np.int64)
    for g in range(keys):
        first[g] = ops.keyed_permutation(torch.tensor([0, 1]), n, 4, g, 0).numpy()
    cell = np.searchsorted(edges, first, side="right") - 1
    observed = np.zeros((bins, bins))
    np.add.at(observed, (cell[:, 0], cell[:, 1]), 1)
    width = np.diff(edges)
    expected = (np.outer(width, width) - np.diag(width)) / (n * (n - 1)) * keys
    assert scipy.stats.chisquare(observed.ravel(), expected.ravel()).pvalue > P_VALUE_THRESHOLD
    for g in range(40):
        image = ops.keyed_permutation(torch.arange(n), n, 4, g, 3).numpy()
        rho = np.corrcoef(np.arange(n), image)[0, 1]
        assert abs(rho * np.sqrt(n - 1)) < 4.5


def test_thresholds_match_reference_and_skip_zero_groups():
    p = torch.tensor([0.0, 0.3, 1e-12, 0.0, 2.5, 0.7, 0.0])
    sizes = torch.full((7,), 10, dtype=torch.int64)
    cumulative, guide = ops.mixture_thresholds(p, sizes)
    assert cumulative.tolist() == ref.thresholds(p.double().tolist())
    assert cumulative[0] == 0 and cumulative[-1] == 2**62
    widths = (cumulative[1:] - cumulative[:-1]).tolist()
    assert [w == 0 for w in widths] == [True, False, False, True, False, False, True]
    assert guide.numel() == 8 + 1


# ---------------------------------------------------------------------------------------------------------------
# The sampling op against the slot-by-slot reference
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("world_size", [1, 4])
@pytest.mark.parametrize("capped", [False, True])
def test_sample_matches_reference(mode, world_size, capped):
    sizes = [13, 5, 0, 40, 2, 9]
    rank = world_size - 1
    cap = [2 * s for s in sizes] if capped else None
    sampler = MixtureSampler(sizes, seed=11, mode=mode, rank=rank, world_size=world_size,
                             max_epochs=2 if capped else None)
    cursor, residual = [0] * 6, ([0] * 6 if mode == "systematic" else None)
    gen = np.random.default_rng(1)
    for step in range(8 if capped else 14):  # capped: 128 of the 138 capacity, several groups close
        p = gen.random(6)
        p[2] = 0.0
        if step % 5 == 4:
            p[gen.integers(0, 6)] = 0.0
            p[3] = 0.5
        ids, groups = sampler.sample(16, p)
        r_ids, r_groups, cursor, residual = ref.mixture_sample(sizes, p, cursor, 11, step, 16, rank, world_size,
                                                               residual=residual, capacity=cap)
        assert ids.tolist() == r_ids and groups.tolist() == r_groups, f"step {step}"
        assert sampler.cursor.tolist() == cursor
        if residual is not None:
            assert sampler.state_dict()["residual"].tolist() == residual


@pytest.mark.parametrize("mode", MODES)
def test_sample_with_more_groups_than_slots_matches_reference(mode):
    # K > 4 B takes the CPU kernel's sort-based ranking instead of per-chunk counters.
    gen = np.random.default_rng(4)
    sizes = gen.integers(0, 6, size=3000).tolist()
    p = gen.random(3000) * (np.array(sizes) > 0)
    p[:50] *= 200.0  # a few heavy groups so that some groups get several slots per call
    sampler = MixtureSampler(sizes, seed=2, mode=mode, rank=1, world_size=2)
    cursor, residual = [0] * 3000, ([0] * 3000 if mode == "systematic" else None)
    for step in range(4):
        ids, groups = sampler.sample(256, p)
        r_ids, r_groups, cursor, residual = ref.mixture_sample(sizes, p, cursor, 2, step, 256, 1, 2,
                                                               residual=residual)
        assert ids.tolist() == r_ids and groups.tolist() == r_groups
    assert sampler.cursor.tolist() == cursor


def test_csr_sample_matches_reference():
    indptr = [0, 4, 4, 11, 12]
    sample_ids = [100, 7, 55, 3, 9, 8, 1000, 2, 77, 6, 5, 4242]
    sampler = MixtureSampler.from_csr(indptr, sample_ids, seed=3, mode="systematic")
    cursor, residual = [0] * 4, [0] * 4
    for step in range(6):
        p = [0.2, 0.0, 0.5, 0.3]
        ids, _ = sampler.sample(8, p)
        r_ids, _, cursor, residual = ref.mixture_sample([4, 0, 7, 1], p, cursor, 3, step, 8, residual=residual,
                                                        csr_sample_ids=sample_ids, group_starts=indptr[:-1])
        assert ids.tolist() == r_ids
    assert set(ids.tolist()) <= set(sample_ids)


def _supported_cpu_capabilities():
    names = ["default", "avx2", "avx512"]
    return names[: names.index(aioli_ext.cpu_capability("")) + 1]


@pytest.fixture
def restore_cpu_capability():
    yield
    aioli_ext.cpu_capability("")


@pytest.mark.parametrize("capability", _supported_cpu_capabilities())
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("csr", [False, True])
def test_every_cpu_isa_path_matches_reference(capability, mode, csr, restore_cpu_capability):
    # Group sizes that reach every branch of the CPU sample kernels: Fisher-Yates groups (<= 20), the narrow
    # six-round networks (m < 10) with and without cycle walking, wide four-round networks, groups too large
    # for the lane kernel (>= 2^58), groups that pass through more than two epochs in one call, an empty group;
    # batches longer than one kernel block; a rank slice.
    aioli_ext.cpu_capability(capability)
    if csr:
        sizes = [3, 0, 20, 21, 167, 1000, 4096, 7]
        sample_ids = np.random.default_rng(5).permutation(sum(sizes)) * 3 + 1
        indptr = np.concatenate([[0], np.cumsum(sizes)])
        sampler = MixtureSampler.from_csr(indptr, sample_ids, seed=9, mode=mode, rank=1, world_size=2)
        extra = dict(csr_sample_ids=sample_ids.tolist(), group_starts=indptr[:-1].tolist())
    else:
        sizes = [3, 0, 20, 21, 167, 1000, 4096, 2**40 + 3, 2**59, 7]
        sampler = MixtureSampler(sizes, seed=9, mode=mode, rank=1, world_size=2)
        extra = {}
    cursor, residual = [0] * len(sizes), ([0] * len(sizes) if mode == "systematic" else None)
    gen = np.random.default_rng(3)
    for step in range(4):
        p = gen.random(len(sizes)) + 0.05
        p[1] = 0.0
        ids, groups = sampler.sample(2400, p)
        r_ids, r_groups, cursor, residual = ref.mixture_sample(sizes, p, cursor, 9, step, 2400, 1, 2,
                                                               residual=residual, **extra)
        assert ids.tolist() == r_ids and groups.tolist() == r_groups, f"step {step}"
    assert sampler.cursor.tolist() == cursor


def test_iid_large_batch_with_many_groups_starts_like_the_reference():
    # An i.i.d. slot's group and rank depend only on (seed, step, slot) and the slots before it, so the first
    # slots of a large batch equal a small batch's. The large batch takes the CPU kernel's paths for many groups
    # (prefetching pipeline, per-call fine guide, several counter chunks); the small one is checked slot by slot.
    gen = np.random.default_rng(6)
    sizes = gen.integers(1, 400, size=6000)
    p = gen.random(6000)
    large = MixtureSampler(sizes, seed=4).sample(1 << 18, p)
    small = MixtureSampler(sizes, seed=4).sample(3000, p)
    assert torch.equal(large[0][:3000], small[0]) and torch.equal(large[1][:3000], small[1])
    r_ids, r_groups, _, _ = ref.mixture_sample(sizes.tolist(), p, [0] * 6000, 4, 0, 3000)
    assert small[0].tolist() == r_ids and small[1].tolist() == r_groups


@pytest.mark.parametrize("mode", MODES)
def test_cpu_isa_paths_agree_on_a_large_batch(mode, restore_cpu_capability):
    # Many groups of mixed sizes, a batch of many kernel blocks and several chunks: every ISA path gives the same
    # draws as the portable one.
    gen = np.random.default_rng(8)
    sizes = np.concatenate([gen.integers(1, 30, size=300), gen.integers(30, 5000, size=600),
                            gen.integers(5000, 10**7, size=100)])
    p = gen.random(sizes.size)
    outputs = {}
    for capability in _supported_cpu_capabilities():
        aioli_ext.cpu_capability(capability)
        sampler = MixtureSampler(sizes, seed=1, mode=mode)
        outputs[capability] = [sampler.sample(200003 if mode == "iid" else 200000, p) for _ in range(3)]
    for capability, draws in outputs.items():
        for (ids, groups), (ref_ids, ref_groups) in zip(draws, outputs["default"]):
            assert torch.equal(ids, ref_ids) and torch.equal(groups, ref_groups), capability


# ---------------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------------
def test_iid_group_frequencies_chi_square():
    p = np.array([0.05, 0.2, 0.01, 0.3, 0.14, 0.1, 0.2])
    sampler = MixtureSampler([10**6] * 7, seed=123)
    counts = np.zeros(7, dtype=np.int64)
    for _ in range(40):
        _, groups = sampler.sample(4096, p)
        counts += np.bincount(groups.numpy(), minlength=7)
    expected = p / p.sum() * counts.sum()
    assert scipy.stats.chisquare(counts, expected).pvalue > P_VALUE_THRESHOLD


def test_iid_draws_are_independent_of_slot_parity():
    # One Philox call serves two slots: even and odd slots must each follow p.
    p = np.array([0.5, 0.25, 0.25])
    _, groups = MixtureSampler([1000] * 3, seed=5).sample(2**16, p)
    for half in (groups[0::2], groups[1::2]):
        counts = np.bincount(half.numpy(), minlength=3)
        assert scipy.stats.chisquare(counts, p * counts.sum()).pvalue > P_VALUE_THRESHOLD


@pytest.mark.parametrize("mode", MODES)
def test_zero_weight_groups_are_never_drawn(mode):
    sampler = MixtureSampler([50, 50, 50, 50, 50], seed=2, mode=mode)
    gen = np.random.default_rng(0)
    for _ in range(100):
        p = gen.random(5)
        p[[1, 4]] = 0.0
        _, groups = sampler.sample(37, p)
        assert not bool(((groups == 1) | (groups == 4)).any())


def test_systematic_cumulative_counts_stay_within_one():
    # Proportions change every step; every positive proportion is >= 1 / B and the zero groups stay zero: the
    # largest-remainder rule then keeps |drawn - sum(B p)| < 1 for every group after every call.
    num_groups, batch = 12, 64
    sampler = MixtureSampler([1000] * num_groups, seed=4, mode="systematic")
    gen = np.random.default_rng(7)
    drawn = np.zeros(num_groups)
    owed = np.zeros(num_groups)
    worst = 0.0
    for _ in range(400):
        p = gen.dirichlet(np.full(num_groups, 0.5)) + 1.0 / batch
        p[[0, 5, 6]] = 0.0
        p /= p.sum()
        _, groups = sampler.sample(batch, p)
        drawn += np.bincount(groups.numpy(), minlength=num_groups)
        owed += batch * p
        worst = max(worst, np.abs(drawn - owed).max())
    assert worst < 1.0 + 1e-6
    assert drawn[[0, 5, 6]].sum() == 0


# ---------------------------------------------------------------------------------------------------------------
# Without replacement within an epoch
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_each_epoch_covers_a_group_exactly_once_while_proportions_change(mode):
    sizes = [5, 17, 64, 3, 1]
    sampler = MixtureSampler(sizes, seed=9, mode=mode)
    gen = np.random.default_rng(3)
    seen = [dict() for _ in sizes]
    for _ in range(150):
        ids, groups = sampler.sample(16, gen.random(5))
        assert torch.equal(torch.from_numpy(_group_of_ids(sizes, ids.numpy())), groups)
        for i, g in zip(ids.tolist(), groups.tolist()):
            seen[g][i] = seen[g].get(i, 0) + 1
    start = 0
    for g, (size, cursor) in enumerate(zip(sizes, sampler.cursor.tolist())):
        full_epochs, partial = divmod(cursor, size)
        counts = [seen[g].get(start + i, 0) for i in range(size)]
        # Every id was drawn full_epochs times, and `partial` distinct ids once more.
        assert sorted(counts) == [full_epochs] * (size - partial) + [full_epochs + 1] * partial
        start += size


@pytest.mark.parametrize("mode", MODES)
def test_one_epoch_is_a_permutation_of_the_group(mode):
    sampler = MixtureSampler([1000], seed=1, mode=mode)
    ids = torch.cat([sampler.sample(100, [1.0])[0] for _ in range(10)])
    assert torch.equal(torch.sort(ids).values, torch.arange(1000))
    next_epoch = torch.cat([sampler.sample(100, [1.0])[0] for _ in range(10)])
    assert torch.equal(torch.sort(next_epoch).values, torch.arange(1000))
    assert not torch.equal(ids, next_epoch)


# ---------------------------------------------------------------------------------------------------------------
# State, resume, determinism
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("capped", [False, True])
def test_resume_from_random_steps_reproduces_the_stream(mode, capped):
    sizes = [7, 300, 31, 0, 1200]
    gen = np.random.default_rng(11)
    schedule = []
    for _ in range(40):
        p = gen.random(5)
        p[3] = 0.0
        schedule.append(p)

    def make():
        return MixtureSampler(sizes, seed=21, mode=mode, max_epochs=3 if capped else None)

    sampler = make()
    states, outputs = [], []
    for p in schedule:
        states.append(copy.deepcopy(sampler.state_dict()))
        outputs.append(sampler.sample(24, p))
    for start in sorted(gen.choice(40, size=4, replace=False)):
        resumed = make()
        resumed.load_state_dict(states[start])
        for step in range(start, 40):
            ids, groups = resumed.sample(24, schedule[step])
            assert torch.equal(ids, outputs[step][0]) and torch.equal(groups, outputs[step][1])
        assert torch.equal(resumed.cursor, sampler.cursor)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("num_groups", [3, 5000])
def test_draws_do_not_depend_on_the_thread_count(mode, num_groups):
    # The CPU kernel splits slots into one chunk per thread; ranks and draws must not depend on the split.
    sizes = np.random.default_rng(0).integers(1, 100, size=num_groups)
    p = np.random.default_rng(1).random(num_groups)
    threads = torch.get_num_threads()
    outputs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            sampler = MixtureSampler(sizes, seed=3, mode=mode)
            outputs.append([sampler.sample(40000, p) for _ in range(2)])
    finally:
        torch.set_num_threads(threads)
    for other in outputs[1:]:
        for (a_ids, a_groups), (b_ids, b_groups) in zip(outputs[0], other):
            assert torch.equal(a_ids, b_ids) and torch.equal(a_groups, b_groups)


def test_same_seed_same_draws_other_seed_other_draws():
    p = [0.3, 0.7]
    a = MixtureSampler([100, 100], seed=5).sample(64, p)[0]
    b = MixtureSampler([100, 100], seed=5).sample(64, p)[0]
    c = MixtureSampler([100, 100], seed=6).sample(64, p)[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_proportions_modified_in_place_are_seen():
    sampler = MixtureSampler([10, 10], seed=0)
    p = torch.tensor([1.0, 0.0])
    assert bool((sampler.sample(4, p)[1] == 0).all())
    p[0], p[1] = 0.0, 1.0
    assert bool((sampler.sample(4, p)[1] == 1).all())
    p[1] = float("nan")
    with pytest.raises(ValueError, match="proportions must be finite"):
        sampler.sample(4, p)


def test_state_is_small_and_loading_another_index_fails():
    sampler = MixtureSampler([10, 20, 30], seed=1)
    sampler.sample(8, [1, 1, 1])
    state = sampler.state_dict()
    assert state["cursor"].numel() == 3
    with pytest.raises(ValueError, match="different index: it has 3 groups, this sampler has 2"):
        MixtureSampler([30, 30]).load_state_dict(state)
    with pytest.raises(ValueError, match="different index: it has 60 samples, this sampler has 61"):
        MixtureSampler([10, 20, 31]).load_state_dict(state)
    with pytest.raises(ValueError, match="different index: fingerprint"):
        MixtureSampler([20, 10, 30]).load_state_dict(state)
    csr = MixtureSampler.from_csr([0, 2, 3], [5, 6, 7])
    with pytest.raises(ValueError, match="different index: fingerprint"):
        MixtureSampler.from_csr([0, 2, 3], [5, 6, 8]).load_state_dict(csr.state_dict())
    with pytest.raises(ValueError, match="state was made for mode 'iid'"):
        MixtureSampler([10, 20, 30], mode="systematic").load_state_dict(state)


# ---------------------------------------------------------------------------------------------------------------
# Distributed slices
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("world_size", [2, 3, 8])
def test_rank_slices_are_disjoint_and_complete(mode, world_size):
    sizes = [40, 9, 300, 77]
    single = MixtureSampler(sizes, seed=8, mode=mode)
    ranks = [MixtureSampler(sizes, seed=8, mode=mode, rank=r, world_size=world_size) for r in range(world_size)]
    gen = np.random.default_rng(2)
    for _ in range(12):
        p = gen.random(4)
        full_ids, full_groups = single.sample(24, p)
        parts = [s.sample(24, p) for s in ranks]
        assert torch.equal(torch.cat([ids for ids, _ in parts]), full_ids)
        assert torch.equal(torch.cat([g for _, g in parts]), full_groups)
    for s in ranks:
        assert torch.equal(s.cursor, single.cursor)
    # Disjoint within a call as long as no group wraps into a new epoch inside it.
    ids = torch.cat([s.sample(24, [1, 0, 1, 1])[0] for s in ranks])
    assert ids.unique().numel() == ids.numel()


# ---------------------------------------------------------------------------------------------------------------
# Scale
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_single_group(mode):
    sampler = MixtureSampler([37], mode=mode)
    ids, groups = sampler.sample(37, [2.0])
    assert torch.equal(torch.sort(ids).values, torch.arange(37)) and bool((groups == 0).all())


@pytest.mark.parametrize("mode", MODES)
def test_a_million_groups(mode):
    num_groups = 10**6
    sizes = torch.randint(1, 1000, (num_groups,), generator=torch.Generator().manual_seed(0))
    sampler = MixtureSampler(sizes, seed=3, mode=mode)
    p = torch.rand(num_groups, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    starts = torch.cumsum(sizes, 0) - sizes
    for _ in range(3):
        ids, groups = sampler.sample(8192, p)
        assert bool(((ids >= starts[groups]) & (ids < starts[groups] + sizes[groups])).all())
    assert int(sampler.cursor.sum()) == 3 * 8192
    state = sampler.state_dict()
    assert state["cursor"].numel() == num_groups


@pytest.mark.parametrize("mode", MODES)
def test_trillion_sample_space_with_o_k_state(mode):
    sizes = [10**9] * 999 + [10**12 - 999 * 10**9 + 2**40]
    sampler = MixtureSampler(sizes, seed=4, mode=mode)
    assert sampler.total_samples == 10**12 + 2**40
    starts = torch.tensor(np.cumsum([0] + sizes[:-1]))
    p = torch.ones(1000, dtype=torch.float64)
    p[-1] = 50.0
    ids, groups = sampler.sample(4096, p)
    sizes_t = torch.tensor(sizes)
    assert bool(((ids >= starts[groups]) & (ids < starts[groups] + sizes_t[groups])).all())
    assert int(ids.max()) > 10**12 - 999 * 10**9  # the 2^40-sized group is drawn
    assert all(v.numel() == 1000 for v in sampler.state_dict().values() if isinstance(v, torch.Tensor))


# ---------------------------------------------------------------------------------------------------------------
# Repetition cap
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_max_epochs_stops_drawing_a_group_and_reports_it(mode):
    sizes = [3, 5, 100]
    sampler = MixtureSampler(sizes, seed=6, mode=mode, max_epochs=2)
    seen = np.zeros(108, dtype=np.int64)
    for _ in range(20):
        ids, _ = sampler.sample(8, [1.0, 1.0, 0.1])
        np.add.at(seen, ids.numpy(), 1)
    assert seen[:8].tolist() == [2] * 8  # groups 0 and 1 reached their cap and were not drawn again
    assert sampler.exhausted_groups.tolist() == [0, 1]
    assert seen.max() <= 2 and seen.sum() == 160
    with pytest.raises(ValueError, match="every group with a positive proportion has reached max_epochs"):
        sampler.sample(8, [1.0, 1.0, 0.0])
    # The last group runs out inside a call: the call fails and leaves the state unchanged.
    state = sampler.state_dict()
    with pytest.raises(ValueError, match="reached max_epochs"):
        sampler.sample(64, [0.0, 0.0, 1.0])
    assert torch.equal(sampler.cursor, state["cursor"]) and sampler.step == state["step"]


# ---------------------------------------------------------------------------------------------------------------
# CPU and CUDA agree bit for bit
# ---------------------------------------------------------------------------------------------------------------
@requires_cuda
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["ranges", "csr", "capped", "ranks", "many_groups"])
def test_cpu_and_cuda_give_identical_draws(mode, kind):
    gen = np.random.default_rng(0)
    num_groups = 5000 if kind == "many_groups" else 6
    sizes = gen.integers(0 if kind != "many_groups" else 1, 50, size=num_groups).tolist()
    sizes[0] = 5

    def make(device):
        kwargs = dict(seed=17, mode=mode, device=device)
        if kind == "csr":
            indptr = np.concatenate([[0], np.cumsum(sizes)])
            return MixtureSampler.from_csr(indptr, gen_ids, **kwargs)
        if kind == "capped":
            kwargs["max_epochs"] = 2
        if kind == "ranks":
            kwargs.update(rank=1, world_size=4)
        return MixtureSampler(sizes, **kwargs)

    gen_ids = np.random.default_rng(1).permutation(10 * sum(sizes))[:sum(sizes)]
    cpu, cuda = make("cpu"), make("cuda")
    for _ in range(10):
        p = gen.random(num_groups) * (np.array(sizes) > 0)
        a, b = cpu.sample(64, p), cuda.sample(64, p)
        assert torch.equal(a[0], b[0].cpu()) and torch.equal(a[1], b[1].cpu())
    assert torch.equal(cpu.cursor, cuda.cursor)
    big_p = np.ones(num_groups) * (np.array(sizes) > 0)
    if kind != "capped":
        a, b = cpu.sample(2**20, big_p), cuda.sample(2**20, big_p)
        assert torch.equal(a[0], b[0].cpu()) and torch.equal(a[1], b[1].cpu())


@requires_cuda
def test_cuda_state_round_trips_through_cpu():
    cuda = MixtureSampler([10, 20, 30], seed=2, device="cuda", mode="systematic")
    cuda.sample(16, [1, 2, 3])
    cpu = MixtureSampler([10, 20, 30], seed=2, mode="systematic")
    cpu.load_state_dict(cuda.state_dict())
    assert torch.equal(cpu.sample(16, [3, 2, 1])[0], cuda.sample(16, [3, 2, 1])[0].cpu())


# ---------------------------------------------------------------------------------------------------------------
# out= variant
# ---------------------------------------------------------------------------------------------------------------
def _make_out_case(kind, mode, device):
    sizes = [7, 300, 31, 0, 1200]
    kwargs = dict(seed=5, mode=mode, device=device)
    if kind == "csr":
        indptr = np.concatenate([[0], np.cumsum(sizes)])
        ids = np.random.default_rng(3).permutation(4 * sum(sizes))[:sum(sizes)]
        return lambda: MixtureSampler.from_csr(indptr, ids, **kwargs)
    if kind == "capped":
        kwargs["max_epochs"] = 1  # the 7-sample group closes inside a call: the host redraw path writes into out
    if kind == "ranks":
        kwargs.update(rank=2, world_size=4)
    return lambda: MixtureSampler(sizes, **kwargs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["ranges", "csr", "capped", "ranks"])
def test_out_writes_the_same_draws_into_reused_buffers(kind, mode, device):
    make = _make_out_case(kind, mode, device)
    plain, into = make(), make()
    gen = np.random.default_rng(8)
    batch = 32
    per_rank = batch // into.world_size
    # Garbage in the reused buffers must be overwritten everywhere.
    out = (torch.full((per_rank,), -7, dtype=torch.int64, device=device),
           torch.full((per_rank,), -7, dtype=torch.int64, device=device))
    pointers = (out[0].data_ptr(), out[1].data_ptr())
    for _ in range(25):
        p = gen.random(5)
        p[3] = 0.0
        expected = plain.sample(batch, p)
        got = into.sample(batch, p, out=out)
        assert got[0] is out[0] and got[1] is out[1]
        assert (out[0].data_ptr(), out[1].data_ptr()) == pointers
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert torch.equal(into.cursor, plain.cursor) and into.step == plain.step
    if kind == "capped":
        assert into.exhausted_groups.tolist() == plain.exhausted_groups.tolist()
        assert into.exhausted_groups.any()


def test_out_variant_compiles_and_matches_the_eager_draws():
    ranges = torch.tensor([[0, 40], [40, 60], [100, 5]])
    cumulative, guide = ops.mixture_thresholds(torch.tensor([1.0, 2.0, 0.5]), ranges[:, 1].contiguous())

    def draw(cursor, sample_ids, group_ids):
        return ops.mixture_sample(ranges, None, cumulative, guide, cursor, None, None, 4, 0, 16,
                                  out=(sample_ids, group_ids))

    compiled = torch.compile(draw, fullgraph=True, backend="aot_eager")
    eager_cursor, compiled_cursor = torch.zeros(3, dtype=torch.int64), torch.zeros(3, dtype=torch.int64)
    eager = ops.mixture_sample(ranges, None, cumulative, guide, eager_cursor, None, None, 4, 0, 16)
    out = (torch.empty(16, dtype=torch.int64), torch.empty(16, dtype=torch.int64))
    compiled(compiled_cursor, *out)
    assert torch.equal(out[0], eager[0]) and torch.equal(out[1], eager[1])
    assert torch.equal(compiled_cursor, eager_cursor)


def _bad_outs(sampler):
    good = torch.empty(8, dtype=torch.int64)
    return {
        "short": ((torch.empty(7, dtype=torch.int64), good),
                  ValueError, r"sample_ids must have shape \[batch_size / world_size\] = \[8\], got \[7\]"),
        "2-D": ((good, torch.empty(2, 4, dtype=torch.int64)),
                ValueError, r"group_ids must have shape \[batch_size / world_size\] = \[8\], got \[2, 4\]"),
        "int32": ((good.int(), good.clone()), ValueError, "sample_ids must be int64, got Int"),
        "strided": ((torch.empty(16, dtype=torch.int64)[::2], good), ValueError, "sample_ids must be contiguous"),
        "same tensor": ((good, good), ValueError, "sample_ids and group_ids must not share memory"),
        "overlapping": ((lambda base: (base[:8], base[4:]))(torch.empty(12, dtype=torch.int64)), ValueError,
                        "sample_ids and group_ids must not share memory"),
        "cursor": ((sampler._cursor, good), ValueError, "sample_ids must not share memory with cursor"),
        "index": ((good, sampler._csr[:8]), ValueError, "group_ids must not share memory with csr_sample_ids"),
        "meta": ((good, torch.empty(8, dtype=torch.int64, device="meta")), ValueError,
                 r"group_ids \(out\) must be on the sampling device cpu, got meta"),
        "one tensor": (good, TypeError, r"out must be a \(sample_ids, group_ids\) pair of tensors, got Tensor"),
        "triple": ((good, good, good), TypeError, "pair of tensors, got tuple of length 3"),
    }


@pytest.mark.parametrize("case", ["short", "2-D", "int32", "strided", "same tensor", "overlapping", "cursor",
                                  "index", "meta", "one tensor", "triple"])
@pytest.mark.parametrize("mode", MODES)
def test_bad_out_fails_with_a_clear_message_and_leaves_the_state(case, mode):
    # K = 8 groups so a batch of 8 has the cursor's length: overlap, not shape, must be what refuses it.
    sizes = [5, 9, 13, 2, 30, 1, 8, 4]
    indptr = np.concatenate([[0], np.cumsum(sizes)])
    make = lambda: MixtureSampler.from_csr(indptr, np.arange(sum(sizes))[::-1].copy(), seed=2, mode=mode)
    sampler, reference_sampler = make(), make()
    p = np.arange(1, 9, dtype=np.float64)
    sampler.sample(8, p), reference_sampler.sample(8, p)
    out, error, message = _bad_outs(sampler)[case]
    cursor, step = sampler.cursor.clone(), sampler.step
    with pytest.raises(error, match=message):
        sampler.sample(8, p, out=out)
    assert torch.equal(sampler.cursor, cursor) and sampler.step == step
    # The next draw continues the stream as if the refused call never happened (residuals included).
    expected, got = reference_sampler.sample(8, p), sampler.sample(8, p)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("proportions, message", [
    ([0.5, -0.1, 0.6], r"proportions must be >= 0, got proportions\[1\] = -0.1"),
    ([0.5, float("nan"), 0.6], r"proportions must be finite, got proportions\[1\] = nan"),
    ([0.5, float("inf"), 0.6], r"proportions must be finite, got proportions\[1\] = inf"),
    ([0.0, 0.0, 0.0], "proportions must not be all zero"),
    ([0.5, 0.5], r"proportions must have one entry per group \(K=3\), got shape \[2\]"),
    ([0.5, 0.2, 0.3, 0.1], r"proportions must have one entry per group \(K=3\), got shape \[4\]"),
    ([0.5, 0.0, 0.3], None),
    ([0.5, 0.1, 0.3], r"proportions\[1\] = 0.1 is positive but group 1 is empty \(size 0\)"),
])
def test_bad_proportions_fail_with_a_clear_message(proportions, message):
    sampler = MixtureSampler([4, 0, 6], world_size=2)
    if message is None:
        sampler.sample(2, proportions)
        return
    with pytest.raises(ValueError, match=message):
        sampler.sample(2, proportions)
    with pytest.raises(ValueError, match=message):
        MixtureBatchSampler(sampler, 2, proportions)


def test_bad_arguments_fail_with_a_clear_message():
    sampler = MixtureSampler([4, 5, 6], world_size=4)
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        sampler.sample(0, [1, 1, 1])
    with pytest.raises(ValueError, match=r"batch_size \(10\) must be divisible by world_size \(4\)"):
        sampler.sample(10, [1, 1, 1])
    with pytest.raises(ValueError, match=r"group_sizes must be >= 0, got group_sizes\[1\] = -2"):
        MixtureSampler([3, -2, 1])
    with pytest.raises(ValueError, match="mode must be one of"):
        MixtureSampler([3], mode="stratified")
    with pytest.raises(ValueError, match="rank must be < 2, got 2"):
        MixtureSampler([3], rank=2, world_size=2)
    with pytest.raises(ValueError, match="seed must be >= 0"):
        MixtureSampler([3], seed=-1)
    with pytest.raises(ValueError, match="group sizes must total <= 2"):
        MixtureSampler([2**61, 2**61, 2**61])
    with pytest.raises(ValueError, match="indptr must be non-decreasing"):
        MixtureSampler.from_csr([0, 3, 2], [1, 2])
    with pytest.raises(ValueError, match=r"max_epochs must be >= 1, got max_epochs\[0\] = 0"):
        MixtureSampler([3], max_epochs=0)


def test_op_checks_name_the_argument():
    ranges = torch.tensor([[0, 4], [4, 6]])
    cumulative, guide = ops.mixture_thresholds(torch.tensor([1.0, 1.0]), ranges[:, 1].contiguous())
    cursor = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="batch_size must be >= 1, got 0"):
        ops.mixture_sample(ranges, None, cumulative, guide, cursor, None, None, 0, 0, 0)
    with pytest.raises(RuntimeError, match=r"batch_size \(6\) must be divisible by world_size \(4\)"):
        ops.mixture_sample(ranges, None, cumulative, guide, cursor, None, None, 0, 0, 6, 0, 4)
    with pytest.raises(RuntimeError, match="cursor must have 2 entries"):
        ops.mixture_sample(ranges, None, cumulative, guide, torch.zeros(3, dtype=torch.int64), None, None, 0, 0, 4)
    with pytest.raises(RuntimeError, match=r"group_ranges must have shape \[K, 2\]"):
        ops.mixture_sample(ranges[:, 0].contiguous(), None, cumulative, guide, cursor, None, None, 0, 0, 4)
    with pytest.raises(RuntimeError, match="positions must be in"):
        ops.keyed_permutation(torch.tensor([5]), 5, 0, 0, 0)
    with pytest.raises(RuntimeError, match="counters must hold 32-bit words"):
        ops.philox4x32(torch.tensor([[0, 0, 0, 2**32]]), torch.tensor([0, 0]))


def test_opcheck():
    ranges = torch.tensor([[0, 4], [4, 6], [10, 0]])
    sizes = ranges[:, 1].contiguous()
    cumulative, guide = ops.mixture_thresholds(torch.tensor([1.0, 2.0, 0.0]), sizes)
    torch.library.opcheck(torch.ops.aioli_ext.mixture_thresholds.default, (torch.tensor([1.0, 2.0, 0.0]), sizes, None))
    torch.library.opcheck(torch.ops.aioli_ext.philox4x32.default,
                          (torch.tensor([[1, 2, 3, 4]]), torch.tensor([5, 6])))
    torch.library.opcheck(torch.ops.aioli_ext.keyed_permutation.default, (torch.arange(7), 7, 1, 2, 3))
    for residual in (None, torch.zeros(3, dtype=torch.int64)):
        torch.library.opcheck(torch.ops.aioli_ext.mixture_sample.default,
                              (ranges, None, cumulative, guide, torch.zeros(3, dtype=torch.int64), residual, None,
                               1, 0, 8, 1, 2),
                              test_utils=("test_schema", "test_faketensor"))
        torch.library.opcheck(torch.ops.aioli_ext.mixture_sample_into.default,
                              (ranges, None, cumulative, guide, torch.zeros(3, dtype=torch.int64), residual, None,
                               1, 0, 8, 1, 2, torch.empty(4, dtype=torch.int64), torch.empty(4, dtype=torch.int64)))


# ---------------------------------------------------------------------------------------------------------------
# DataLoader adapter
# ---------------------------------------------------------------------------------------------------------------
class _IdentityDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 2000

    def __getitem__(self, index):
        return index


def test_batch_sampler_with_workers_lag_and_exact_resume():
    workers, prefetch = 2, 2
    lag = workers * prefetch
    switch_after, resume_after, total = 5, 13, 20

    def make_batch_sampler(num_batches):
        sampler = MixtureSampler([1000, 1000], seed=31)
        return MixtureBatchSampler(sampler, 8, [1.0, 0.0], num_batches=num_batches)

    batch_sampler = make_batch_sampler(total)
    loader = torch.utils.data.DataLoader(_IdentityDataset(), batch_sampler=batch_sampler, num_workers=workers,
                                         prefetch_factor=prefetch)
    batches, state = [], None
    for t, batch in enumerate(loader):
        batches.append(batch)
        if t == switch_after:
            batch_sampler.set_proportions([0.0, 1.0])
        if t + 1 == resume_after:
            state = copy.deepcopy(batch_sampler.state_dict(consumed_batches=resume_after))
    groups = [set((b // 1000).tolist()) for b in batches]
    first_new = switch_after + 1 + lag
    assert groups[:first_new] == [{0}] * first_new
    assert groups[first_new:] == [{1}] * (total - first_new)

    # The same stream straight from the sampler, with the lagged schedule.
    direct = MixtureSampler([1000, 1000], seed=31)
    for t in range(total):
        ids, _ = direct.sample(8, [1.0, 0.0] if t < first_new else [0.0, 1.0])
        assert torch.equal(ids, batches[t])

    resumed = make_batch_sampler(total - resume_after)
    resumed.load_state_dict(state)
    loader = torch.utils.data.DataLoader(_IdentityDataset(), batch_sampler=resumed, num_workers=workers,
                                         prefetch_factor=prefetch)
    rest = list(loader)
    assert len(rest) == total - resume_after
    for t, batch in enumerate(rest):
        assert torch.equal(batch, batches[resume_after + t])


def test_batch_sampler_state_limits():
    batch_sampler = MixtureBatchSampler(MixtureSampler([10, 10]), 4, [1, 1], max_pending=2)
    iterator = iter(batch_sampler)
    for _ in range(5):
        next(iterator)
    with pytest.raises(ValueError, match="consumed_batches \\(6\\) must be <= the batches drawn so far \\(5\\)"):
        batch_sampler.state_dict(6)
    with pytest.raises(ValueError, match="3 batches are in flight but only 2 are kept"):
        batch_sampler.state_dict(2)
    assert len(batch_sampler.state_dict(4)["pending"]) == 1
    with pytest.raises(TypeError, match="infinite"):
        len(batch_sampler)
