"""aioli_ext: online data mixing (Aioli) for PyTorch training runs.

Compiled kernels for per-group token losses and mixture sampling, and the mixers that drive them.
"""
from ._extension import cuda_built
from . import ops
from .ops import cpu_capability
from .sampler import MixtureBatchSampler, MixtureSampler

__version__ = "0.1.0"
