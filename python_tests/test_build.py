"""The build: what was compiled, the import-time torch check, and the CMake library."""
import importlib
import os
import subprocess
import sys

import pytest
import torch

import aioli_ext
from aioli_ext import _extension

OPS_WITH_BACKENDS = ["group_cross_entropy", "group_cross_entropy_with_grad", "group_cross_entropy_fused"]


@pytest.mark.parametrize("op", OPS_WITH_BACKENDS)
def test_backends_registered_match_build(op):
    name = f"aioli_ext::{op}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")
    # cuda_built() must tell the truth: CUDA kernels are registered exactly when they were compiled.
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA") == aioli_ext.cuda_built()


def test_build_info_agrees_with_module():
    info = importlib.import_module("aioli_ext._build_info")
    assert info.WITH_CUDA == aioli_ext.cuda_built()
    assert info.TORCH_VERSION.split("+")[0] == torch.__version__.split("+")[0]


def test_cpu_capability_force_and_reset():
    detected = aioli_ext.cpu_capability("")
    assert detected in ("default", "avx2", "avx512")
    try:
        assert aioli_ext.cpu_capability("default") == "default"
        assert aioli_ext.cpu_capability() == "default"
    finally:
        assert aioli_ext.cpu_capability("") == detected
    with pytest.raises(RuntimeError, match="force must be one of"):
        aioli_ext.cpu_capability("sse9")


def test_mismatched_torch_build_is_reported(monkeypatch):
    info = importlib.import_module("aioli_ext._build_info")
    monkeypatch.setattr(info, "TORCH_VERSION", "1.0.0")
    with pytest.raises(ImportError, match=r"(?s)built against torch 1\.0\.0.*pip install --no-build-isolation"):
        _extension.load()


CMAKE_LIB = os.environ.get("AIOLI_EXT_CMAKE_LIB", "")

CMAKE_CHECK = r"""
import sys, torch
import importlib.util
torch.ops.load_library(sys.argv[1])
# reference.py is plain torch; load it by path so the package (and its aioli_ext._C) is not imported.
spec = importlib.util.spec_from_file_location("reference", sys.argv[2])
reference = importlib.util.module_from_spec(spec)
spec.loader.exec_module(reference)
g = torch.Generator().manual_seed(0)
logits = torch.randn(37, 11, generator=g)
targets = torch.randint(0, 11, (37,), generator=g)
targets[3] = -100
groups = torch.randint(0, 4, (37,), generator=g)
loss, sums, counts = torch.ops.aioli_ext.group_cross_entropy(logits, targets, groups, 4, -100, 1)
ref_loss, ref_sums, ref_counts = reference.group_cross_entropy_reference(logits, targets, groups, 4)
torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-5)
torch.testing.assert_close(sums.double(), ref_sums, rtol=1e-5, atol=1e-5)
assert torch.equal(counts, ref_counts)
print("cmake library OK")
"""


@pytest.mark.skipif(not os.path.isfile(CMAKE_LIB), reason="AIOLI_EXT_CMAKE_LIB does not name a built CMake library "
                    "(scripts/test.sh builds one and sets it)")
def test_cmake_library_runs_the_ops():
    # A separate process: the CMake library registers the same operator namespace as aioli_ext._C.
    reference_py = os.path.join(os.path.dirname(aioli_ext.__file__), "reference.py")
    out = subprocess.run([sys.executable, "-c", CMAKE_CHECK, CMAKE_LIB, reference_py], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "cmake library OK" in out.stdout
