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
