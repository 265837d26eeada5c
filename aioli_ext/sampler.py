"""Mixture sampling from a device-resident index: :class:`MixtureSampler` and its DataLoader adapter.

Groups own consecutive ranges of a global sample space (or explicit CSR lists of sample ids). Each call of
:meth:`MixtureSampler.sample` draws one global batch for the given proportions in one op call:

* a group per slot -- i.i.d. (``mode="iid"``) or by a low-variance systematic allocation whose cumulative per-group
  counts stay within +-1 of sum(B * p) (``mode="systematic"``, fractional residual carried in the state);
* a position inside the group that walks a per-group, per-epoch keyed permutation, so every group is consumed
  without replacement within an epoch however often the proportions change, and an exhausted group starts a new
  epoch with a new permutation.

All randomness is Philox4x32-10 keyed by (seed, step, slot) or (seed, group, epoch): CPU and CUDA give identical
draws, and the state -- seed, step, one cursor per group (plus the systematic residual), and a fingerprint of
the index -- is O(K) and resumes the stream exactly.
"""
import hashlib
from collections import deque
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import ops
from ._extension import cuda_built

__all__ = ["MixtureSampler", "MixtureBatchSampler"]

_MAX_GROUP_SIZE = 1 << 62
_MAX_TOTAL = 1 << 62
_MAX_GROUPS = (1 << 30) - 1
_MODES = ("iid", "systematic")
_STATE_VERSION = 1

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence[int], Sequence[float]]


def _int64_cpu(values: ArrayLike, name: str) -> torch.Tensor:
    t = torch.as_tensor(values)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got dtype {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {list(t.shape)}")
    return t.detach().to("cpu", torch.int64).contiguous()


def _proportions_cpu(proportions: ArrayLike) -> torch.Tensor:
    t = torch.as_tensor(proportions)
    if not (t.dtype.is_floating_point or t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64,
                                                      torch.uint8)):
        raise TypeError(f"proportions must be real numbers, got dtype {t.dtype}")
    return t.detach().to("cpu", torch.float64).contiguous()


def _check_int(value, name: str, low: int, high: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value >= high:
        raise ValueError(f"{name} must be < {high}, got {value}")
    return value


def _fingerprint(kind: str, *arrays: torch.Tensor) -> str:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(kind.encode())
    for a in arrays:
        data = a.detach().cpu().contiguous().numpy()
        digest.update(str(data.shape).encode())
        digest.update(data.tobytes())
    return digest.hexdigest()


class MixtureSampler:
    """Draws batches of sample ids from K groups at given proportions; exactly resumable, CPU or CUDA.

    Args:
        group_sizes: K group sizes (>= 0, each < 2^62, total <= 2^62). Group g owns the sample ids
            [sum(sizes[:g]), sum(sizes[:g + 1])). Use :meth:`from_csr` for explicit lists of ids.
        seed: RNG key in [0, 2^63).
        device: where the index, the cursors and the draws live ("cpu" or a CUDA device).
        mode: "iid" (independent multinomial draw per slot) or "systematic" (low-variance allocation).
        rank, world_size: this process's slice of every global batch; all ranks must use the same seed, index and
            proportions, and then return disjoint slices whose union is the single-process batch.
        max_epochs: optional repetition cap, an int or one int per group: a group that has been drawn
            max_epochs * size times is no longer drawn (its share goes to the open groups; see
            :attr:`exhausted_groups`). With a cap, each call reads the cursors back once (a device sync on CUDA).

    Example::

        sampler = MixtureSampler([1000, 50, 7], seed=0)
        ids, groups = sampler.sample(8, [0.5, 0.3, 0.2])
    """

    def __init__(self, group_sizes: ArrayLike, *, seed: int = 0, device: Union[str, torch.device] = "cpu",
                 mode: str = "iid", rank: int = 0, world_size: int = 1,
                 max_epochs: Optional[Union[int, Sequence[int]]] = None):
        sizes = _int64_cpu(group_sizes, "group_sizes")
        self._setup(sizes, None, _fingerprint("ranges", sizes), seed=seed, device=device, mode=mode, rank=rank,
                    world_size=world_size, max_epochs=max_epochs)

    @classmethod
    def from_csr(cls, indptr: ArrayLike, sample_ids: ArrayLike, **kwargs) -> "MixtureSampler":
        """Groups given as a CSR list: group g holds ``sample_ids[indptr[g]:indptr[g + 1]]``.

        ``indptr`` has K + 1 non-decreasing entries from 0 to len(sample_ids); the ids are any int64 values.
        Takes the same keyword arguments as the constructor.
        """
        indptr = _int64_cpu(indptr, "indptr")
        ids = torch.as_tensor(sample_ids)
        if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"sample_ids must be a 1-D integer tensor, got shape {list(ids.shape)} and dtype "
                             f"{ids.dtype}")
        if indptr.numel() < 2:
            raise ValueError(f"indptr must have K + 1 >= 2 entries, got {indptr.numel()}")
        if int(indptr[0]) != 0:
            raise ValueError(f"indptr must start at 0, got indptr[0] = {int(indptr[0])}")
        steps = indptr[1:] - indptr[:-1]
        if bool((steps < 0).any()):
            g = int(torch.nonzero(steps < 0)[0])
            raise ValueError(f"indptr must be non-decreasing, got indptr[{g}] = {int(indptr[g])} > "
                             f"indptr[{g + 1}] = {int(indptr[g + 1])}")
        if int(indptr[-1]) != ids.numel():
            raise ValueError(f"indptr must end at len(sample_ids) = {ids.numel()}, got {int(indptr[-1])}")
        self = cls.__new__(cls)
        ids64 = ids.detach().to(torch.int64).contiguous()
        self._setup(steps, ids64, _fingerprint("csr", indptr, ids64), starts=indptr[:-1].clone(), **kwargs)
        return self

    def _setup(self, sizes: torch.Tensor, csr_ids: Optional[torch.Tensor], fingerprint: str, *, seed: int = 0,
               device: Union[str, torch.device] = "cpu", mode: str = "iid", rank: int = 0, world_size: int = 1,
               max_epochs=None, starts: Optional[torch.Tensor] = None):
        num_groups = sizes.numel()
        if num_groups < 1 or num_groups > _MAX_GROUPS:
            raise ValueError(f"group_sizes must have between 1 and {_MAX_GROUPS} entries, got {num_groups}")
        if bool((sizes < 0).any()):
            g = int(torch.nonzero(sizes < 0)[0])
            raise ValueError(f"group_sizes must be >= 0, got group_sizes[{g}] = {int(sizes[g])}")
        if bool((sizes >= _MAX_GROUP_SIZE).any()):
            g = int(torch.nonzero(sizes >= _MAX_GROUP_SIZE)[0])
            raise ValueError(f"group_sizes must be < 2^62, got group_sizes[{g}] = {int(sizes[g])}")
        # Each size is < 2^62, so a float64 sum within a rounding error of 2^62 tells whether the exact int64 sum
        # can overflow.
        approximate_total = float(sizes.double().sum())
        if approximate_total > 1.0001 * _MAX_TOTAL or int(sizes.sum()) > _MAX_TOTAL:
            raise ValueError(f"the group sizes must total <= 2^62 samples, got about {approximate_total:.4g}")
        if int(sizes.sum()) == 0:
            raise ValueError("group_sizes must not all be zero")
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        self.seed = _check_int(seed, "seed", 0, 1 << 63)
        self.world_size = _check_int(world_size, "world_size", 1)
        self.rank = _check_int(rank, "rank", 0, self.world_size)
        self.device = torch.device(device)
        if self.device.type == "cuda" and not cuda_built():
            raise RuntimeError("device is CUDA but aioli_ext was built without CUDA kernels; rebuild with a CUDA "
                               "toolkit (see README)")
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be a CPU or CUDA device, got {self.device}")
        self.mode = mode
        self.num_groups = num_groups
        self.total_samples = int(sizes.sum())
        self.fingerprint = fingerprint
        self._sizes_cpu = sizes
        if starts is None:
            starts = torch.cumsum(sizes, 0) - sizes
        self._ranges = torch.stack([starts, sizes], 1).contiguous().to(self.device)
        self._csr = None if csr_ids is None else csr_ids.to(self.device)
        self._max_epochs = self._parse_max_epochs(max_epochs)
        self._capacity = None
        if self._max_epochs is not None:
            capacity = [m * int(s) for m, s in zip(self._max_epochs, sizes.tolist())]
            if max(capacity) >= 1 << 63:
                raise ValueError("max_epochs * group size must be < 2^63 for every group")
            self._capacity = torch.tensor(capacity, dtype=torch.int64, device=self.device)
        self.step = 0
        self._cursor = torch.zeros(num_groups, dtype=torch.int64, device=self.device)
        self._residual = torch.zeros(num_groups, dtype=torch.int64) if mode == "systematic" else None
        self._table_key: Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]] = None
        self._last_object: Optional[torch.Tensor] = None
        self._last_version = -1
        self._tables: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    def _parse_max_epochs(self, max_epochs) -> Optional[List[int]]:
        if max_epochs is None:
            return None
        if isinstance(max_epochs, (int, np.integer)) and not isinstance(max_epochs, bool):
            values = [int(max_epochs)] * self.num_groups
        else:
            values = [int(v) for v in torch.as_tensor(max_epochs).reshape(-1).tolist()]
            if len(values) != self.num_groups:
                raise ValueError(f"max_epochs must be an int or have one entry per group (K={self.num_groups}), "
                                 f"got {len(values)} entries")
        for g, v in enumerate(values):
            if v < 1:
                raise ValueError(f"max_epochs must be >= 1, got max_epochs[{g}] = {v}")
        return values

    # ---------------------------------------------------------------------------------------------------------
    # Drawing
    # ---------------------------------------------------------------------------------------------------------
    def _open_groups(self) -> Optional[torch.Tensor]:
        if self._capacity is None:
            return None
        return (self._cursor < self._capacity).cpu()

    def _thresholds(self, proportions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        # Proportions usually change far less often than every call: rebuild the O(K) tables only on change.
        open_groups = self._open_groups()
        key = self._table_key
        if (key is None or key[0].shape != proportions.shape or not torch.equal(key[0], proportions)
                or (open_groups is not None and not torch.equal(key[1], open_groups))):
            cumulative, guide = ops.mixture_thresholds(proportions, self._sizes_cpu, open_groups)
            # The systematic allocation reads the table on the host; i.i.d. draws read it where they run.
            if self.mode == "iid":
                cumulative, guide = cumulative.to(self.device), guide.to(self.device)
            self._tables = (cumulative, guide)
            self._table_key = (proportions.clone(), open_groups)
        return self._tables

    def check_proportions(self, proportions: ArrayLike) -> torch.Tensor:
        """Validate proportions (length K, finite, >= 0, not all zero, zero on empty groups); returns them as a
        float64 CPU tensor. Raises ValueError naming the rule that failed."""
        p = _proportions_cpu(proportions)
        try:
            ops.mixture_thresholds(p, self._sizes_cpu, None)
        except RuntimeError as exc:
            raise ValueError(str(exc).split("\n")[0]) from None
        return p

    def sample(self, batch_size: int, proportions: ArrayLike, *,
               out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Draw the next global batch of ``batch_size`` slots and return this rank's slice.

        Args:
            batch_size: global batch size B >= 1, divisible by world_size.
            proportions: K non-negative finite weights (not all zero, zero on empty groups); normalised here.
            out: optional (sample_ids, group_ids) to write the draws into, each exactly [B / world_size] int64,
                contiguous, on the sampler's device (never resized). Reusing one pair across steps saves the
                allocation and first-touch cost of fresh outputs; the draws are the same as without ``out``.
                A refused ``out`` leaves the sampler's state as it was; after any other failed call (all groups
                exhausted under max_epochs) the state is restored too, but the contents of ``out`` are unspecified.

        Returns:
            (sample_ids, group_ids): [B / world_size] int64 tensors on the sampler's device (the ``out`` tensors
            when given).
        """
        batch_size = _check_int(batch_size, "batch_size", 1, 1 << 31)
        if batch_size % self.world_size:
            raise ValueError(f"batch_size ({batch_size}) must be divisible by world_size ({self.world_size})")
        if (self._capacity is None and isinstance(proportions, torch.Tensor) and proportions is self._last_object
                and proportions._version == self._last_version):
            # The same, unmodified tensor as last call: skip the conversion and the O(K) comparison.
            cumulative, guide = self._tables
        else:
            p = _proportions_cpu(proportions)
            try:
                cumulative, guide = self._thresholds(p)
            except RuntimeError as exc:
                raise ValueError(str(exc).split("\n")[0]) from None
            if isinstance(proportions, torch.Tensor):
                self._last_object, self._last_version = proportions, proportions._version
        backup = None
        if self._capacity is not None:
            # A call that runs out of open groups half-way must leave the state as it was.
            backup = (self._cursor.clone(), None if self._residual is None else self._residual.clone())
        try:
            ids, groups = ops.mixture_sample(self._ranges, self._csr, cumulative, guide, self._cursor,
                                             self._residual, self._capacity, self.seed, self.step, batch_size,
                                             self.rank, self.world_size, out=out)
        except RuntimeError as exc:
            if backup is not None:
                self._cursor.copy_(backup[0])
                if backup[1] is not None:
                    self._residual.copy_(backup[1])
            raise ValueError(str(exc).split("\n")[0]) from None
        self.step += 1
        return ids, groups

    # ---------------------------------------------------------------------------------------------------------
    # Introspection
    # ---------------------------------------------------------------------------------------------------------
    @property
    def group_sizes(self) -> torch.Tensor:
        """[K] int64 (CPU): samples per group."""
        return self._sizes_cpu.clone()

    @property
    def cursor(self) -> torch.Tensor:
        """[K] int64 (CPU): draws taken from each group so far (epoch = cursor // size)."""
        return self._cursor.cpu().clone()

    @property
    def epochs(self) -> torch.Tensor:
        """[K] int64 (CPU): completed epochs of each group (0 for empty groups)."""
        sizes = self._sizes_cpu.clamp(min=1)
        return torch.where(self._sizes_cpu > 0, self.cursor // sizes, torch.zeros_like(sizes))

    @property
    def exhausted_groups(self) -> torch.Tensor:
        """Indices (CPU int64) of the groups that reached max_epochs and are no longer drawn."""
        if self._capacity is None:
            return torch.zeros(0, dtype=torch.int64)
        return torch.nonzero((self._cursor >= self._capacity) & (self._capacity > 0)).reshape(-1).cpu()

    # ---------------------------------------------------------------------------------------------------------
    # State
    # ---------------------------------------------------------------------------------------------------------
    def state_dict(self) -> Dict:
        """The O(K) state: seed, step, cursor per group, systematic residual, and the index fingerprint."""
        return {
            "version": _STATE_VERSION,
            "seed": self.seed,
            "step": self.step,
            "mode": self.mode,
            "cursor": self._cursor.cpu().clone(),
            "residual": None if self._residual is None else self._residual.clone(),
            "max_epochs": None if self._max_epochs is None else list(self._max_epochs),
            "fingerprint": self.fingerprint,
            "num_groups": self.num_groups,
            "total_samples": self.total_samples,
        }

    def load_state_dict(self, state: Dict) -> None:
        """Restore a state from :meth:`state_dict`; the stream continues exactly where it was saved.

        Raises ValueError when the state was made for another index, mode or max_epochs.
        """
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"state version must be {_STATE_VERSION}, got {state.get('version')!r}")
        if state["num_groups"] != self.num_groups:
            raise ValueError(f"state was made for a different index: it has {state['num_groups']} groups, this "
                             f"sampler has {self.num_groups}")
        if state["total_samples"] != self.total_samples:
            raise ValueError(f"state was made for a different index: it has {state['total_samples']} samples, "
                             f"this sampler has {self.total_samples}")
        if state["fingerprint"] != self.fingerprint:
            raise ValueError(f"state was made for a different index: fingerprint {state['fingerprint']} does "
                             f"not match this index's {self.fingerprint} (same group count and total, different "
                             f"group sizes or sample ids)")
        if state["mode"] != self.mode:
            raise ValueError(f"state was made for mode {state['mode']!r}, this sampler uses {self.mode!r}")
        if state["max_epochs"] != (None if self._max_epochs is None else list(self._max_epochs)):
            raise ValueError(f"state was made with max_epochs={state['max_epochs']}, this sampler has "
                             f"max_epochs={self._max_epochs}")
        cursor = torch.as_tensor(state["cursor"], dtype=torch.int64)
        if cursor.shape != (self.num_groups,) or bool((cursor < 0).any()):
            raise ValueError(f"state cursor must be {self.num_groups} non-negative ints")
        self.seed = _check_int(state["seed"], "seed", 0, 1 << 63)
        self.step = _check_int(state["step"], "step", 0)
        self._cursor.copy_(cursor.to(self.device))
        if self._residual is not None:
            self._residual.copy_(torch.as_tensor(state["residual"], dtype=torch.int64))
        self._table_key = None
        self._last_object = None

    def __repr__(self) -> str:
        return (f"MixtureSampler(K={self.num_groups}, samples={self.total_samples}, mode={self.mode!r}, "
                f"device={self.device}, rank={self.rank}/{self.world_size}, step={self.step})")


class MixtureBatchSampler(torch.utils.data.Sampler):
    """A batch sampler for ``torch.utils.data.DataLoader(dataset, batch_sampler=...)``.

    Each batch is this rank's slice (a list of sample ids) of one :meth:`MixtureSampler.sample` call at the
    current proportions. The training loop changes the mixture between batches with :meth:`set_proportions`.

    Prefetch lag: the DataLoader asks its batch sampler for batches ahead of the loop. With ``num_workers = w``
    and ``prefetch_factor = f`` it holds w * f batches in flight, so proportions set after the loop received
    batch t (counting from 0) apply from batch t + 1 + w * f on (from batch t + 1 when w = 0).

    Exact resume: the loop counts the batches it has taken from the loader and passes that count to
    :meth:`state_dict`; the state records it together with the batches already drawn but not yet consumed (at
    most ``max_pending``, which must cover w * f), and a loader over a batch sampler restored with
    :meth:`load_state_dict` yields those batches first, then continues the uninterrupted stream.

    Args:
        sampler: the :class:`MixtureSampler` to draw from (its rank/world_size select the slice).
        batch_size: global batch size per draw (each rank gets batch_size / world_size ids).
        proportions: initial proportions.
        num_batches: batches per iteration over the sampler (``len()``); None iterates forever.
        max_pending: how many recent batches to keep for :meth:`state_dict`.
    """

    def __init__(self, sampler: MixtureSampler, batch_size: int, proportions: ArrayLike,
                 num_batches: Optional[int] = None, max_pending: int = 64):
        self.sampler = sampler
        self.batch_size = _check_int(batch_size, "batch_size", 1, 1 << 31)
        if self.batch_size % sampler.world_size:
            raise ValueError(f"batch_size ({batch_size}) must be divisible by world_size ({sampler.world_size})")
        self.num_batches = None if num_batches is None else _check_int(num_batches, "num_batches", 0)
        self.max_pending = _check_int(max_pending, "max_pending", 1)
        self._proportions = sampler.check_proportions(proportions)
        self._drawn = 0
        self._recent: deque = deque(maxlen=self.max_pending)
        self._replay: deque = deque()

    def set_proportions(self, proportions: ArrayLike) -> None:
        """Use these proportions for every batch drawn from now on (see the prefetch lag above)."""
        self._proportions = self.sampler.check_proportions(proportions)

    @property
    def proportions(self) -> torch.Tensor:
        return self._proportions.clone()

    @property
    def drawn_batches(self) -> int:
        """Batches handed to the DataLoader so far (consumed or in flight)."""
        return self._drawn

    def _next_batch(self) -> torch.Tensor:
        if self._replay:
            ids = self._replay.popleft()
        else:
            ids, _ = self.sampler.sample(self.batch_size, self._proportions)
            ids = ids.cpu()
        self._drawn += 1
        self._recent.append(ids)
        return ids

    def __iter__(self) -> Iterator[List[int]]:
        produced = 0
        while self.num_batches is None or produced < self.num_batches:
            yield self._next_batch().tolist()
            produced += 1

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("MixtureBatchSampler(num_batches=None) is infinite and has no len()")
        return self.num_batches

    def state_dict(self, consumed_batches: int) -> Dict:
        """State for an exact resume after the loop has taken ``consumed_batches`` batches (counted since this
        batch sampler was created, including batches counted by a loaded state)."""
        consumed_batches = _check_int(consumed_batches, "consumed_batches", 0)
        in_flight = self._drawn - consumed_batches
        if in_flight < 0:
            raise ValueError(f"consumed_batches ({consumed_batches}) must be <= the batches drawn so far "
                             f"({self._drawn})")
        if in_flight > len(self._recent):
            raise ValueError(f"{in_flight} batches are in flight but only {len(self._recent)} are kept: raise "
                             f"max_pending above num_workers * prefetch_factor")
        pending = list(self._recent)[len(self._recent) - in_flight:] if in_flight else []
        return {
            "sampler": self.sampler.state_dict(),
            "consumed_batches": consumed_batches,
            "pending": [p.clone() for p in pending] + [p.clone() for p in self._replay],
            "proportions": self._proportions.clone(),
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: Dict) -> None:
        """Restore a state from :meth:`state_dict`: the next batches are the ones that were in flight."""
        if state["batch_size"] != self.batch_size:
            raise ValueError(f"state was made with batch_size={state['batch_size']}, this batch sampler has "
                             f"batch_size={self.batch_size}")
        self.sampler.load_state_dict(state["sampler"])
        self._proportions = self.sampler.check_proportions(state["proportions"])
        self._drawn = int(state["consumed_batches"])
        self._recent.clear()
        self._replay = deque(p.clone() for p in state["pending"])
