"""Device parametrisation shared by the kernel tests: CUDA cases run where a GPU and a CUDA build exist."""
import pytest
import torch

import aioli_ext

CUDA_OK = torch.cuda.is_available() and aioli_ext.cuda_built()
requires_cuda = pytest.mark.skipif(not CUDA_OK, reason="needs a GPU and a CUDA build of aioli_ext")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, requires_cuda])]
