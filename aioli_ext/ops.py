"""Typed wrappers over torch.ops.aioli_ext: the only module that touches the compiled operators.

Each op has a fake (meta) kernel registered here so torch.compile can trace it, and differentiable ops
have their autograd formula registered through torch.library.
"""
import torch

from . import _extension  # noqa: F401  (loads the compiled library and registers the schemas)

_ops = torch.ops.aioli_ext


def cpu_capability(force: str = "") -> str:
    """Return the ISA the CPU kernels dispatch to ("default", "avx2" or "avx512").

    ``force`` pins one (it must be supported by this CPU) for the whole process, e.g. to test each vectorised
    path; ``force=""`` returns to the detected best. The environment variable AIOLI_EXT_CPU_CAPABILITY caps
    the detected value.
    """
    return _ops.cpu_capability(force)


# ----------------------------------------------------------------------------------------------------------------
# Mixture sampling (csrc/mixture_sample.h, csrc/cpu/mixture_sample_cpu.cpp, csrc/cuda/mixture_sample_cuda.cu).
# The user-facing class is aioli_ext.sampler.MixtureSampler; these are the raw ops it calls.
# ----------------------------------------------------------------------------------------------------------------
from typing import Optional, Tuple  # noqa: E402


def mixture_sample(
    group_ranges: torch.Tensor,
    csr_sample_ids: Optional[torch.Tensor],
    cumulative: torch.Tensor,
    guide: torch.Tensor,
    cursor: torch.Tensor,
    residual: Optional[torch.Tensor],
    capacity: Optional[torch.Tensor],
    seed: int,
    step: int,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Draw one global batch of ``batch_size`` slots and return this rank's slice.

    Args:
        group_ranges: [K, 2] int64, (start, size) of each group's range of flat indices, on the sampling device.
        csr_sample_ids: [N] int64 or None; when given, the sample id of flat index i is ``csr_sample_ids[i]``.
        cumulative: [K + 1] int64 fixed-point thresholds from :func:`mixture_thresholds` (on the device).
        guide: [buckets + 1] int32 guide table from :func:`mixture_thresholds` (on the device).
        cursor: [K] int64 draws taken from each group so far (device); advanced in place.
        residual: [K] int64 CPU tensor (systematic mode) updated in place, or None for i.i.d. draws.
        capacity: [K] int64 per-group stream cap (max_epochs * size) on the device, or None.
        seed, step: the counter-based RNG key and call counter.
        batch_size: global batch size B (divisible by ``world_size``).

    Returns:
        sample_ids [B / world_size] int64 and group_ids [B / world_size] int64, for slots
        [rank * B / world_size, (rank + 1) * B / world_size) of the global batch.
    """
    return _ops.mixture_sample(group_ranges, csr_sample_ids, cumulative, guide, cursor, residual, capacity,
                               seed, step, batch_size, rank, world_size)


def mixture_thresholds(
    proportions: torch.Tensor, group_sizes: torch.Tensor, open_groups: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Validate proportions and build the sampler's integer tables (CPU tensors in and out).

    Args:
        proportions: [K] float32/float64, non-negative, finite, not all zero; normalised here in float64.
        group_sizes: [K] int64; a positive proportion on an empty group is an error.
        open_groups: [K] bool or None; closed groups (max_epochs reached) get weight zero.

    Returns:
        cumulative [K + 1] int64 (0 .. 2^62, group g owns [cumulative[g], cumulative[g + 1])) and
        guide [next_pow2(K) + 1] int32 (first candidate group of each bucket of the threshold range).
    """
    return _ops.mixture_thresholds(proportions, group_sizes, open_groups)


def philox4x32(counters: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Philox4x32-10 of each counter row: counters [N, 4] int64 and key [2] int64 hold 32-bit words;
    returns [N, 4] int64 (32-bit words). Runs csrc/philox.h on the counters' device."""
    return _ops.philox4x32(counters, key)


def keyed_permutation(positions: torch.Tensor, n: int, seed: int, group: int, epoch: int) -> torch.Tensor:
    """Images of ``positions`` ([N] int64 in [0, n)) under the sampler's permutation of group ``group`` in
    epoch ``epoch`` (csrc/permutation.h keyed through csrc/philox.h); [N] int64 on the positions' device."""
    return _ops.keyed_permutation(positions, n, seed, group, epoch)


@torch.library.register_fake("aioli_ext::mixture_sample")
def _mixture_sample_fake(group_ranges, csr_sample_ids, cumulative, guide, cursor, residual, capacity, seed, step,
                         batch_size, rank, world_size):
    torch._check(batch_size >= 1, lambda: f"batch_size must be >= 1, got {batch_size}")
    torch._check(world_size >= 1 and batch_size % world_size == 0,
                 lambda: f"batch_size ({batch_size}) must be divisible by world_size ({world_size})")
    per_rank = batch_size // world_size
    return (group_ranges.new_empty((per_rank,), dtype=torch.int64),
            group_ranges.new_empty((per_rank,), dtype=torch.int64))


@torch.library.register_fake("aioli_ext::mixture_thresholds")
def _mixture_thresholds_fake(proportions, group_sizes, open_groups):
    num_groups = group_sizes.shape[0]
    buckets = 1
    while buckets < num_groups:
        buckets *= 2
    return (group_sizes.new_empty((num_groups + 1,), dtype=torch.int64),
            group_sizes.new_empty((buckets + 1,), dtype=torch.int32))


@torch.library.register_fake("aioli_ext::philox4x32")
def _philox4x32_fake(counters, key):
    return counters.new_empty(counters.shape, dtype=torch.int64)


@torch.library.register_fake("aioli_ext::keyed_permutation")
def _keyed_permutation_fake(positions, n, seed, group, epoch):
    return positions.new_empty(positions.shape, dtype=torch.int64)
