"""Small torch.distributed helpers shared by the evaluator and the training loop.

Data-parallel runs keep every decision rank-independent without broadcasting it: the mixers are deterministic
functions of the seed and of statistics that every rank receives bit for bit from one all-reduce, so every
rank computes the same proportions on its own. :func:`all_reduce_sum` is that one collective; the rest finds
out where this process stands (rank, world size, main process) and sets up the process group from the
environment that ``torchrun`` exports (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT).
"""
import contextlib
import os

import torch

__all__ = ["all_reduce_sum", "barrier", "env_world_size", "is_initialized", "is_main", "process_group_from_env",
           "rank", "world_size"]


def is_initialized() -> bool:
    """True when a default process group exists (torch.distributed available and initialised)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    """Processes in the default group; 1 without one."""
    return torch.distributed.get_world_size() if is_initialized() else 1


def rank() -> int:
    """This process's rank in the default group; 0 without one."""
    return torch.distributed.get_rank() if is_initialized() else 0


def is_main() -> bool:
    """True on the process that writes files and shows progress (rank 0, or the only process)."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if is_initialized():
        if torch.distributed.get_backend() == "nccl":
            torch.distributed.barrier(device_ids=[torch.cuda.current_device()])
        else:
            torch.distributed.barrier()


def _collective_device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo (and the others) take CPU tensors.
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a float64 1-D tensor over ranks with one all-reduce; returns a new CPU tensor (the input itself is
    left as it is). Without a process group it returns a CPU copy.

    Every rank receives the same bits, so decisions computed from the result agree on all ranks. Integers
    packed into it (token counts, drawn counts) stay exact while the totals are below 2^53.
    """
    if values.dtype != torch.float64 or values.dim() != 1:
        raise ValueError(f"values must be a 1-D float64 tensor, got {values.dtype} of shape {tuple(values.shape)}")
    if not is_initialized():
        return values.to("cpu", copy=True)
    packed = values.to(_collective_device(), copy=True)
    torch.distributed.all_reduce(packed)
    return packed.to("cpu")


def env_world_size() -> int:
    """WORLD_SIZE as exported by torchrun (1 when it is not set); a malformed value is a clear error."""
    text = os.environ.get("WORLD_SIZE", "1")
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"the WORLD_SIZE environment variable must be an integer, got {text!r}") from None
    if value < 1:
        raise ValueError(f"the WORLD_SIZE environment variable must be >= 1, got {value}")
    return value


@contextlib.contextmanager
def process_group_from_env(device_type: str = "cpu"):
    """Initialise the default process group from torchrun's environment for the duration of the block.

    Nothing happens when a group already exists (the caller owns it) or when WORLD_SIZE is unset or 1 (a
    single process runs exactly as without torchrun). Otherwise the backend follows the device: NCCL for
    ``device_type="cuda"`` (and this process's GPU becomes cuda:LOCAL_RANK), gloo for the CPU. The group is
    destroyed on exit if this block created it. Yields the torch.device this rank computes on. A device or
    an environment that cannot work (no GPU for "cuda", WORLD_SIZE without RANK) raises ValueError.
    """
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"device_type must be 'cpu' or 'cuda', got {device_type!r}")
    created = False
    device = torch.device("cpu")
    if device_type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if not torch.cuda.is_available():
            raise ValueError("device is 'cuda' but torch sees no GPU")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"device is 'cuda' but LOCAL_RANK {local_rank} has no GPU: torch sees "
                             f"{torch.cuda.device_count()}")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not is_initialized() and env_world_size() > 1:
        for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
            if name not in os.environ:
                raise ValueError(f"WORLD_SIZE is {env_world_size()} but {name} is not set: start the processes "
                                   f"with torchrun (python -m torch.distributed.run --nproc-per-node N ...)")
        backend = "nccl" if device_type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device_type == "cuda" else {}
        torch.distributed.init_process_group(backend, init_method="env://", **kwargs)
        created = True
    try:
        yield device
    finally:
        if created:
            torch.distributed.destroy_process_group()
