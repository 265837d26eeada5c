"""aioli_ext: online data mixing (Aioli) for PyTorch training runs.

Compiled kernels for per-group token losses and mixture sampling, and the mixers that drive them.
"""
from ._extension import cuda_built
from . import ops
from .ops import (GroupCrossEntropyResult, cpu_capability, gradient_buffer_cache, gradient_scale_prediction,
                  group_cross_entropy, group_cross_entropy_fused)
from .losses import group_linear_cross_entropy
from . import mixing
from .sampler import MixtureBatchSampler, MixtureSampler

__version__ = "0.1.0"
