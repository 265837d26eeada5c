#!/usr/bin/env bash
# Configures and builds the C++ library (build/cmake/libaioli_ext_ops.so) with CMake against the torch of
# the project's virtual environment. WITH_CUDA=ON builds the CUDA kernels too.
#   scripts/cmake_build.sh [-DWITH_CUDA=ON] [other cmake -D flags]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
CMAKE=${CMAKE:-$(dirname "$PY")/cmake}
prefix=$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')
site=$("$PY" -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')
extra=()
cuda_torch=$("$PY" -c 'import torch; print(int(torch.version.cuda is not None))')
if [ "$cuda_torch" = 1 ]; then
  # A CUDA build of torch makes find_package(Torch) look for the toolkit even for CPU-only targets:
  # point it at the toolkit that holds nvcc and at the nvrtc that ships in the nvidia pip package.
  cuda_home=${CUDA_HOME:-/usr/local/cuda}
  nvrtc=$(ls "$site"/nvidia/cu*/lib/libnvrtc.so.* "$cuda_home"/lib64/libnvrtc.so* 2>/dev/null | grep -v builtins | head -n 1 || true)
  extra+=(-DCUDA_TOOLKIT_ROOT_DIR="$cuda_home" -DCMAKE_CUDA_COMPILER="$cuda_home/bin/nvcc")
  [ -n "$nvrtc" ] && extra+=(-DCUDA_nvrtc_LIBRARY="$nvrtc")
  # Skips the GPU-probing architecture detection in torch's CMake files (no GPU is needed to build).
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}
fi
"$CMAKE" -S . -B build/cmake -G Ninja -DCMAKE_PREFIX_PATH="$prefix" "${extra[@]}" "$@" > build/cmake-configure.log 2>&1 \
  || { cat build/cmake-configure.log; exit 1; }
"$CMAKE" --build build/cmake -j "${MAX_JOBS:-2}"
