#!/usr/bin/env bash
# The device check, as one prepared script for a machine with a GPU (run from the repository root; writes
# everything under $OUT, default ./gpu_check_out): builds the extension with CUDA kernels, runs the whole test
# suite (its CUDA cases run there: CPU-vs-CUDA agreement, bit-identical draws, every op on cuda), the CUDA
# correctness + bandwidth check of the group cross-entropy kernels, and the CUDA benchmarks.
#   OUT=/some/dir bash scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())'
} 2>&1 | tee "$OUT/device.txt"
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} \
  "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -50 "$OUT/build.log"; exit 1; }
"$PY" -c 'import aioli_ext; assert aioli_ext.cuda_built(), "CUDA kernels were not built"'
"$PY" -m pytest python_tests -q -x -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -5
"$PY" bench/gpu_check_group_cross_entropy.py cuda 2>&1 | tee "$OUT/group_cross_entropy_gpu.txt"
"$PY" bench/bench_mixture_sample.py --device cuda 2>&1 | tail -30 | tee "$OUT/mixture_sample_gpu.txt"
cp bench/results/mixture_sample_cuda.* "$OUT/" 2>/dev/null
timeout 240 "$PY" bench/bench_group_linear_cross_entropy.py --device cuda 2>&1 | tail -30 \
  | tee "$OUT/group_linear_cross_entropy_gpu.txt"
cp bench/results/group_linear_cross_entropy_cuda.* "$OUT/" 2>/dev/null
echo "gpu check done: $OUT"
