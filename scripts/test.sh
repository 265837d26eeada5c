#!/usr/bin/env bash
# The one test command: sets everything up on a fresh machine (virtual environment, torch, the compiled
# extension with CPU and -- where nvcc is found -- CUDA kernels, the CMake library) and runs the test suite.
#   bash scripts/test.sh [pytest arguments]
# AIOLI_EXT_CPU_ONLY=1 skips the CUDA kernels for a quick build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q -r requirements-dev.txt
if [ -n "${CI:-}" ]; then
  # CI compiles and links every CUDA kernel, for one architecture to keep its time down.
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
fi
.venv/bin/python -m pip install -q --no-build-isolation -e .
mkdir -p build
bash scripts/cmake_build.sh
export AIOLI_EXT_CMAKE_LIB="$PWD/build/cmake/libaioli_ext_ops.so"
.venv/bin/python -m pytest python_tests "$@"
