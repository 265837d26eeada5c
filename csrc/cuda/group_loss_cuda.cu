// CUDA implementation of the group cross-entropy ops; the schemas and their contract are in
// csrc/registration.cpp, the per-row math shared with the CPU kernels in csrc/group_loss.h, and the argument
// checks (same rules and messages as the CPU backend) in csrc/group_loss_checks.h.
//
// An op call runs, on the current stream of logits' device:
//  1. validate_inputs_kernel: finds the first out-of-range target and group id. Its two results are copied to
//     the host, which is the op's only host synchronisation: bad input must raise before anything is written
//     (the fused op may write into logits itself).
//  2. group_cross_entropy_kernel: one team of threads per row (a warp when V <= 1024, else a whole CTA). The
//     team reads the row once with 16-byte loads and keeps an online (max, sum of exp) state in fp32 (fp64 for
//     fp64 logits) registers, merged by warp shuffles and, for a CTA, a 16-entry shared array. Rows are
//     streamed, never staged, so any V works. The gradient variant sweeps the row a second time (mostly L2
//     hits: the grid is sized so the rows in flight fit in L2) and writes scale * (softmax - onehot).
//  3. group statistics from the per-row losses, without float atomics so that repeated calls give identical
//     bits:
//     - num_groups <= 256: each CTA sums a fixed slice of rows per group in row order (fp64), a second kernel
//       adds the per-CTA partials in CTA order. Work is N * K / 32 warp iterations, negligible next to the
//       N * V logits for such K.
//     - larger num_groups: a stable radix sort (CUB) of the losses by group id (ignored rows get key K and
//       sort last), segment offsets from the integer counts (warp-aggregated atomics, then an integer scan),
//       and one warp per group summing its segment in a fixed order (fp64).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>

#include "group_loss.h"
#include "group_loss_checks.h"

namespace aioli_ext {
namespace {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
// Rows up to this many columns get one warp each (8 rows per 256-thread CTA); longer rows get a CTA each.
constexpr int kMaxWarpRowCols = 1024;
constexpr int kWarpRowThreads = 256;
constexpr int kWarpRowsPerBlock = kWarpRowThreads / kWarpSize;
constexpr int kMaxRowThreads = 512;
// 16-byte vectors each thread has in flight per loop trip: with two 512-thread CTAs per SM that is 64 KB of
// outstanding loads per SM, enough to cover HBM latency.
constexpr int kUnroll = 4;
constexpr int64_t kMaxGrid = int64_t(1) << 30;
// Column indices inside a row are 32-bit; this bound keeps `index + team size` from overflowing.
constexpr int64_t kMaxCols = int64_t(1) << 30;
constexpr int kDenseMaxGroups = 256;
constexpr int kStatsThreads = 256;
static_assert(kDenseMaxGroups <= kStatsThreads, "the dense route gives each group its own thread");
constexpr int kStatsWindow = 1024;
constexpr int64_t kMaxStatsBlocks = 1024;
constexpr int64_t kMaxScanBlocks = 4096;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ------------------------------------------------------------------------------------------------------------
// Device math
// ------------------------------------------------------------------------------------------------------------

template <typename scalar_t, int kN>
struct alignas(sizeof(scalar_t) * kN) AlignedVec {
  scalar_t val[kN];
};

// Elements per 16-byte vector: 4 fp32, 8 fp16/bf16, 2 fp64.
template <typename scalar_t>
constexpr int vec_width() {
  return 16 / static_cast<int>(sizeof(scalar_t));
}

constexpr float kLog2e = 1.4426950408889634f;

// MUFU.EX2 without the denormal fix-up sequence of exp2f: results below 2^-126 become 0, which cannot change
// a softmax denominator (it is >= 1) and is far below any gradient tolerance. The row helpers below are also
// host-callable so that their indexing can be exercised without a GPU; kernels take the device branch.
AIOLI_HOST_DEVICE float exp2_ftz(float x) {
#ifdef __CUDA_ARCH__
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return exp2f(x);
#endif
}

// fp32 exponentials are exp(x - m) = 2^(x * log2e - m * log2e): one FFMA and one MUFU per element, which keeps
// bf16 rows memory-bound. fp64 (used for gradcheck) keeps the exact library exp.
AIOLI_HOST_DEVICE float exp_of(float d) { return exp2_ftz(d * kLog2e); }
AIOLI_HOST_DEVICE double exp_of(double d) { return exp(d); }
AIOLI_HOST_DEVICE float shift_for(float m) { return m * kLog2e; }
AIOLI_HOST_DEVICE double shift_for(double m) { return m; }
AIOLI_HOST_DEVICE float exp_shifted(float x, float shift) { return exp2_ftz(fmaf(x, kLog2e, -shift)); }
AIOLI_HOST_DEVICE double exp_shifted(double x, double shift) { return exp(x - shift); }
// fmax drops NaN; a NaN element still reaches the sum through its exp, so the loss is NaN as in torch.
AIOLI_HOST_DEVICE float max_of(float a, float b) { return fmaxf(a, b); }
AIOLI_HOST_DEVICE double max_of(double a, double b) { return fmax(a, b); }

// Adds kN values to a running (max, sum of exp(x - max)) state, rescaling at most once per vector.
template <typename acc_t, int kN>
AIOLI_HOST_DEVICE void lse_accumulate(acc_t& row_max, acc_t& row_sum, const acc_t (&x)[kN]) {
  acc_t vec_max = x[0];
#pragma unroll
  for (int k = 1; k < kN; ++k) vec_max = max_of(vec_max, x[k]);
  if (vec_max > row_max) {
    row_sum *= exp_of(row_max - vec_max);  // row_max = -inf gives exp(-inf) = 0
    row_max = vec_max;
  }
  // While row_max is -inf every value seen so far is -inf: shifting by 0 makes their exp 0 instead of NaN.
  const acc_t shift = row_max == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : shift_for(row_max);
#pragma unroll
  for (int k = 0; k < kN; ++k) row_sum += exp_shifted(x[k], shift);
}

template <typename acc_t, typename scalar_t, int kN>
AIOLI_HOST_DEVICE void to_acc(const AlignedVec<scalar_t, kN>& v, acc_t (&x)[kN]) {
#pragma unroll
  for (int k = 0; k < kN; ++k) x[k] = static_cast<acc_t>(v.val[k]);
}

// Leading elements of a row before its first 16-byte boundary (the host guarantees element alignment).
template <typename scalar_t>
AIOLI_HOST_DEVICE int elements_to_alignment(const scalar_t* p, int num_cols) {
  const unsigned misalign = static_cast<unsigned>(reinterpret_cast<uintptr_t>(p) & 15u);
  const int head = misalign == 0 ? 0 : static_cast<int>((16u - misalign) / sizeof(scalar_t));
  return head < num_cols ? head : num_cols;
}

// This thread's share of one row's log-sum-exp state. The row splits into a scalar head up to the first
// 16-byte boundary, a body of aligned vectors, and a scalar tail, so every row gets vector loads whatever its
// stride or offset.
template <typename scalar_t, typename acc_t>
AIOLI_HOST_DEVICE LseState<acc_t> row_lse_partial(const scalar_t* row, int num_cols, int rank, int team) {
  constexpr int kVec = vec_width<scalar_t>();
  using Vec = AlignedVec<scalar_t, kVec>;
  acc_t row_max = -std::numeric_limits<acc_t>::infinity();
  acc_t row_sum = acc_t(0);
  const int head = elements_to_alignment(row, num_cols);
  const int num_vecs = (num_cols - head) / kVec;
  const int tail_begin = head + num_vecs * kVec;

  for (int c = rank; c < head; c += team) {
    const acc_t x[1] = {static_cast<acc_t>(row[c])};
    lse_accumulate(row_max, row_sum, x);
  }
  const Vec* vecs = reinterpret_cast<const Vec*>(row + head);
  int v = rank;
  for (; v + (kUnroll - 1) * team < num_vecs; v += kUnroll * team) {
    Vec buf[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) buf[u] = vecs[v + u * team];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      acc_t x[kVec];
      to_acc(buf[u], x);
      lse_accumulate(row_max, row_sum, x);
    }
  }
  for (; v < num_vecs; v += team) {
    acc_t x[kVec];
    to_acc(vecs[v], x);
    lse_accumulate(row_max, row_sum, x);
  }
  for (int c = tail_begin + rank; c < num_cols; c += team) {
    const acc_t x[1] = {static_cast<acc_t>(row[c])};
    lse_accumulate(row_max, row_sum, x);
  }
  return {row_max, row_sum};
}

// Merges the team's partial states. lse_combine is commutative bit for bit, so the xor butterfly leaves the
// same state in every lane; lane 0's is broadcast anyway so nothing downstream depends on that argument. The
// closing barrier orders every read of the row before any write of its gradient (in-place fused op), and,
// for a CTA, protects warp_states before the next row reuses it.
template <bool kWarpPerRow, typename acc_t>
__device__ __forceinline__ LseState<acc_t> team_reduce(LseState<acc_t> state, LseState<acc_t>* warp_states) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const LseState<acc_t> other{__shfl_xor_sync(kFullMask, state.max, offset),
                                __shfl_xor_sync(kFullMask, state.sum, offset)};
    state = lse_combine(state, other);
  }
  if constexpr (kWarpPerRow) {
    (void)warp_states;
    state.max = __shfl_sync(kFullMask, state.max, 0);
    state.sum = __shfl_sync(kFullMask, state.sum, 0);
    __syncwarp();
    return state;
  } else {
    const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
    if (threadIdx.x % kWarpSize == 0) warp_states[warp] = state;
    __syncthreads();
    // Every thread folds the same entries in the same order, so all hold identical bits.
    LseState<acc_t> total = warp_states[0];
    const int num_warps = static_cast<int>(blockDim.x) / kWarpSize;
    for (int w = 1; w < num_warps; ++w) total = lse_combine(total, warp_states[w]);
    __syncthreads();
    return total;
  }
}

// d loss / d logits of one element: scale * (softmax - onehot(target)). Unlike the forward sum, the exponent
// is formed as (x - lse) before scaling: folding lse * log2e into an FFMA would add an error proportional to
// |lse|, which shows at the target element, where softmax - 1 cancels.
template <typename scalar_t, typename acc_t>
struct RowGrad {
  acc_t lse;
  acc_t scale;
  int target;

  AIOLI_HOST_DEVICE scalar_t operator()(acc_t x, int col) const {
    const acc_t p = exp_of(x - lse);
    return static_cast<scalar_t>(scale * (col == target ? p - acc_t(1) : p));
  }
};

// Second sweep of a row. Vectors follow row_out's alignment (stores are never split); row_in uses vector loads
// when it has the same alignment phase (always when in place or both rows are 16-byte aligned), else scalar
// loads, which hit L2 after the first sweep. Each element is read and then written by the same thread.
template <typename scalar_t, typename acc_t>
AIOLI_HOST_DEVICE void write_grad_row(const scalar_t* row_in, scalar_t* row_out, int num_cols,
                                               const RowGrad<scalar_t, acc_t> grad, int rank, int team) {
  constexpr int kVec = vec_width<scalar_t>();
  using Vec = AlignedVec<scalar_t, kVec>;
  const int head = elements_to_alignment(row_out, num_cols);
  const int num_vecs = (num_cols - head) / kVec;
  const int tail_begin = head + num_vecs * kVec;

  for (int c = rank; c < head; c += team) row_out[c] = grad(static_cast<acc_t>(row_in[c]), c);
  Vec* out_vecs = reinterpret_cast<Vec*>(row_out + head);
  const bool same_phase = ((reinterpret_cast<uintptr_t>(row_in) ^ reinterpret_cast<uintptr_t>(row_out)) & 15u) == 0;
  if (same_phase) {
    const Vec* in_vecs = reinterpret_cast<const Vec*>(row_in + head);
    int v = rank;
    for (; v + (kUnroll - 1) * team < num_vecs; v += kUnroll * team) {
      Vec buf[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) buf[u] = in_vecs[v + u * team];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int col0 = head + (v + u * team) * kVec;
        Vec out;
#pragma unroll
        for (int k = 0; k < kVec; ++k) out.val[k] = grad(static_cast<acc_t>(buf[u].val[k]), col0 + k);
        out_vecs[v + u * team] = out;
      }
    }
    for (; v < num_vecs; v += team) {
      const Vec in = in_vecs[v];
      const int col0 = head + v * kVec;
      Vec out;
#pragma unroll
      for (int k = 0; k < kVec; ++k) out.val[k] = grad(static_cast<acc_t>(in.val[k]), col0 + k);
      out_vecs[v] = out;
    }
  } else {
    for (int v = rank; v < num_vecs; v += team) {
      const int col0 = head + v * kVec;
      Vec out;
#pragma unroll
      for (int k = 0; k < kVec; ++k) out.val[k] = grad(static_cast<acc_t>(row_in[col0 + k]), col0 + k);
      out_vecs[v] = out;
    }
  }
  for (int c = tail_begin + rank; c < num_cols; c += team) row_out[c] = grad(static_cast<acc_t>(row_in[c]), c);
}

// Ignored rows: a zero gradient row, written without reading the logits (they may hold inf or NaN).
template <typename scalar_t>
AIOLI_HOST_DEVICE void zero_row(scalar_t* row_out, int num_cols, int rank, int team) {
  constexpr int kVec = vec_width<scalar_t>();
  using Vec = AlignedVec<scalar_t, kVec>;
  const scalar_t zero = static_cast<scalar_t>(0.0f);
  const int head = elements_to_alignment(row_out, num_cols);
  const int num_vecs = (num_cols - head) / kVec;
  const int tail_begin = head + num_vecs * kVec;
  for (int c = rank; c < head; c += team) row_out[c] = zero;
  Vec zeros;
#pragma unroll
  for (int k = 0; k < kVec; ++k) zeros.val[k] = zero;
  Vec* out_vecs = reinterpret_cast<Vec*>(row_out + head);
  for (int v = rank; v < num_vecs; v += team) out_vecs[v] = zeros;
  for (int c = tail_begin + rank; c < num_cols; c += team) row_out[c] = zero;
}

// ------------------------------------------------------------------------------------------------------------
// Kernels
// ------------------------------------------------------------------------------------------------------------

template <typename index_t>
__global__ void __launch_bounds__(256) validate_inputs_kernel(const int64_t* targets, int64_t num_rows,
                                                              int64_t num_cols, int64_t ignore_index,
                                                              const index_t* group_ids, int64_t num_ids,
                                                              int64_t num_groups, unsigned long long* first_bad) {
  const int64_t count = num_rows > num_ids ? num_rows : num_ids;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += stride) {
    if (i < num_rows) {
      const int64_t t = targets[i];
      if (t != ignore_index && (t < 0 || t >= num_cols)) atomicMin(&first_bad[0], static_cast<unsigned long long>(i));
    }
    if (i < num_ids) {
      const int64_t g = static_cast<int64_t>(group_ids[i]);
      if (g < 0 || g >= num_groups) atomicMin(&first_bad[1], static_cast<unsigned long long>(i));
    }
  }
}

template <typename scalar_t, typename index_t>
struct RowsParams {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* logits;
  int64_t logits_row_stride;
  const int64_t* targets;
  const index_t* group_ids;  // gradient variant only
  int64_t seq_len;
  const acc_t* group_scale;  // gradient variant only
  scalar_t* grad;            // gradient variant only; may equal logits (same row stride then)
  int64_t grad_row_stride;
  acc_t* loss;
  int64_t num_rows;
  int num_cols;
  int64_t ignore_index;
};

// Register budget: 2 CTAs of 512 (or 4 of 256 for warp rows) per SM, i.e. <= 64 registers; fp64 gets twice that.
template <typename scalar_t, bool kWarpPerRow>
constexpr int rows_min_blocks() {
  return (kWarpPerRow ? 4 : 2) / (sizeof(scalar_t) == 8 ? 2 : 1);
}

// Loss (and optionally gradient) of every row. Rows are visited in a grid-stride loop whose bounds are uniform
// over the team (warp or CTA), so every barrier is reached by the whole team.
template <typename scalar_t, typename index_t, bool kWriteGrad, bool kWarpPerRow>
__global__ void __launch_bounds__(kWarpPerRow ? kWarpRowThreads : kMaxRowThreads,
                                  (rows_min_blocks<scalar_t, kWarpPerRow>()))
group_cross_entropy_kernel(const RowsParams<scalar_t, index_t> p) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ LseState<acc_t> warp_states[kMaxRowThreads / kWarpSize];
  const int team = kWarpPerRow ? kWarpSize : static_cast<int>(blockDim.x);
  const int rank = kWarpPerRow ? static_cast<int>(threadIdx.x) % kWarpSize : static_cast<int>(threadIdx.x);
  const int64_t rows_per_block = kWarpPerRow ? blockDim.x / kWarpSize : 1;
  const int64_t first_row =
      static_cast<int64_t>(blockIdx.x) * rows_per_block + (kWarpPerRow ? threadIdx.x / kWarpSize : 0);
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * rows_per_block;

  for (int64_t row = first_row; row < p.num_rows; row += row_step) {
    const int64_t target = p.targets[row];
    if (target == p.ignore_index) {
      if (rank == 0) p.loss[row] = acc_t(0);
      if constexpr (kWriteGrad) zero_row(p.grad + row * p.grad_row_stride, p.num_cols, rank, team);
      continue;
    }
    const scalar_t* row_in = p.logits + row * p.logits_row_stride;
    // Read before team_reduce's barrier: the in-place gradient overwrites this element after it.
    acc_t target_logit = acc_t(0);
    if (rank == 0) target_logit = static_cast<acc_t>(row_in[target]);
    LseState<acc_t> state = row_lse_partial<scalar_t, acc_t>(row_in, p.num_cols, rank, team);
    state = team_reduce<kWarpPerRow>(state, warp_states);
    const acc_t lse = lse_value(state);
    if (rank == 0) p.loss[row] = lse - target_logit;
    if constexpr (kWriteGrad) {
      const acc_t scale = p.group_scale[row_group(p.group_ids, row, p.seq_len)];
      const RowGrad<scalar_t, acc_t> grad{lse, scale, static_cast<int>(target)};
      write_grad_row(row_in, p.grad + row * p.grad_row_stride, p.num_cols, grad, rank, team);
    }
  }
}

// Dense route, step 1: CTA b sums the losses of rows [b * rows_per_block, (b + 1) * rows_per_block) per group,
// thread g owning group g and adding that slice's rows in row order. Rows are staged through shared memory in
// windows; the threads of a warp read the same entry at once (a broadcast).
template <typename acc_t, typename index_t>
__global__ void __launch_bounds__(kStatsThreads)
group_partials_kernel(const acc_t* loss, const int64_t* targets, const index_t* group_ids, int64_t seq_len,
                      int64_t num_rows, int64_t ignore_index, int num_groups, int64_t rows_per_block,
                      double* partial_sums, int64_t* partial_counts) {
  __shared__ int window_group[kStatsWindow];
  __shared__ acc_t window_loss[kStatsWindow];
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * rows_per_block;
  const int64_t end = begin + rows_per_block < num_rows ? begin + rows_per_block : num_rows;
  const int group = static_cast<int>(threadIdx.x);
  double sum = 0.0;
  int64_t count = 0;
  for (int64_t window = begin; window < end; window += kStatsWindow) {
    const int rows = static_cast<int>(end - window < kStatsWindow ? end - window : kStatsWindow);
    for (int r = static_cast<int>(threadIdx.x); r < rows; r += blockDim.x) {
      const int64_t row = window + r;
      window_group[r] =
          targets[row] == ignore_index ? -1 : static_cast<int>(row_group(group_ids, row, seq_len));
      window_loss[r] = loss[row];
    }
    __syncthreads();
    if (group < num_groups) {
      for (int r = 0; r < rows; ++r) {
        if (window_group[r] == group) {
          sum += static_cast<double>(window_loss[r]);
          ++count;
        }
      }
    }
    __syncthreads();
  }
  if (group < num_groups) {
    partial_sums[static_cast<int64_t>(blockIdx.x) * num_groups + group] = sum;
    partial_counts[static_cast<int64_t>(blockIdx.x) * num_groups + group] = count;
  }
}

// Dense route, step 2: per group, the partials of all CTAs added in CTA order.
template <typename acc_t>
__global__ void __launch_bounds__(kStatsThreads)
group_finalize_kernel(const double* partial_sums, const int64_t* partial_counts, int64_t num_partials,
                      int num_groups, acc_t* group_sums, int64_t* token_counts) {
  const int group = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (group >= num_groups) return;
  double sum = 0.0;
  int64_t count = 0;
  for (int64_t b = 0; b < num_partials; ++b) {
    sum += partial_sums[b * num_groups + group];
    count += partial_counts[b * num_groups + group];
  }
  group_sums[group] = static_cast<acc_t>(sum);
  token_counts[group] = count;
}

// Sort route, step 1: the sort key of every row (its group, or num_groups when ignored) and the token counts.
// Lanes of a warp with the same group add their count with one atomic, so a dominant group costs one atomic per
// warp rather than per row. The loop bound is warp-uniform, as __match_any_sync needs.
template <typename index_t>
__global__ void __launch_bounds__(kStatsThreads)
group_keys_kernel(const int64_t* targets, const index_t* group_ids, int64_t seq_len, int64_t num_rows,
                  int64_t ignore_index, uint32_t num_groups, uint32_t* keys, unsigned long long* token_counts) {
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
  const int64_t num_warps = static_cast<int64_t>(gridDim.x) * blockDim.x / kWarpSize;
  for (int64_t base = warp * kWarpSize; base < num_rows; base += num_warps * kWarpSize) {
    const int64_t row = base + lane;
    uint32_t key = num_groups;
    if (row < num_rows) {
      if (targets[row] != ignore_index) key = static_cast<uint32_t>(row_group(group_ids, row, seq_len));
      keys[row] = key;
    }
    const unsigned peers = __match_any_sync(kFullMask, key);
    if (key < num_groups && lane == __ffs(peers) - 1) {
      atomicAdd(&token_counts[key], static_cast<unsigned long long>(__popc(peers)));
    }
  }
}

// Sort route, step 3: one warp per group sums its segment of the sorted losses, lane-strided then by a fixed
// butterfly, so the order of additions depends only on the segment.
template <typename acc_t>
__global__ void __launch_bounds__(kStatsThreads)
group_segment_sum_kernel(const acc_t* sorted_loss, const int64_t* offsets, int64_t num_groups, acc_t* group_sums) {
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int64_t group = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
  if (group >= num_groups) return;  // uniform over the warp
  const int64_t begin = offsets[group];
  const int64_t end = offsets[group + 1];
  double sum = 0.0;
  for (int64_t i = begin + lane; i < end; i += kWarpSize) sum += static_cast<double>(sorted_loss[i]);
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) sum += __shfl_xor_sync(kFullMask, sum, offset);
  if (lane == 0) group_sums[group] = static_cast<acc_t>(sum);
}

// ------------------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------------------

template <typename F>
void dispatch_index_type(at::ScalarType type, F&& f) {
  if (type == at::kInt) {
    f(int32_t(0));
  } else {
    f(int64_t(0));
  }
}

template <typename F>
void dispatch_acc_type(at::ScalarType type, F&& f) {
  if (type == at::kDouble) {
    f(double(0));
  } else {
    f(float(0));
  }
}

bool element_aligned(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % static_cast<uintptr_t>(t.element_size()) == 0;
}

// The op's inputs in the layout the kernels read: logits rows with unit column stride, flat contiguous index
// tensors.
struct Inputs {
  at::Tensor logits;
  at::Tensor targets;
  at::Tensor group_ids;
  int64_t num_rows;
  int64_t num_cols;
  int64_t num_groups;
  int64_t ignore_index;
  int64_t seq_len;
};

// CUDA-only limits, after the shared checks of group_loss_checks.h: column indices inside a row are 32-bit,
// and sort keys of the many-groups route are 32-bit.
void check_cuda_limits(const at::Tensor& logits, int64_t num_groups) {
  TORCH_CHECK(logits.size(1) <= kMaxCols, "logits must have at most 2^30 columns (V) on CUDA, got V = ",
              logits.size(1));
  TORCH_CHECK(num_groups < (int64_t(1) << 31), "num_groups must be < 2^31 on CUDA, got ", num_groups);
}

// After the same-device checks of every tensor argument: the dispatcher chose this kernel because one of them
// is a CUDA tensor, so this only fails when that one was checked last.
void check_on_cuda(const at::Tensor& logits) {
  TORCH_CHECK(logits.is_cuda(), "logits must be a CUDA tensor for the CUDA kernel, got ", logits.device());
}

Inputs prepare_inputs(const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& group_ids,
                      int64_t num_groups, int64_t ignore_index, int64_t seq_len) {
  Inputs in;
  in.logits = logits;
  if (in.logits.size(1) > 1 && in.logits.stride(1) != 1) in.logits = in.logits.contiguous();
  // Vector loads assume an element-aligned base; only a hand-made view can miss it.
  if (!element_aligned(in.logits)) in.logits = in.logits.clone(at::MemoryFormat::Contiguous);
  in.targets = targets.reshape({-1}).contiguous();
  in.group_ids = group_ids.reshape({-1}).contiguous();
  in.num_rows = logits.size(0);
  in.num_cols = logits.size(1);
  in.num_groups = num_groups;
  in.ignore_index = ignore_index;
  in.seq_len = seq_len;
  return in;
}

// Range checks of targets and group_ids: one small kernel, then a 16-byte copy to the host (the op's one
// synchronisation). The error names the first offending entry, with the CPU backend's message.
void validate_values(const Inputs& in, cudaStream_t stream) {
  const int64_t num_ids = in.group_ids.numel();
  const int64_t count = std::max(in.num_rows, num_ids);
  if (count == 0) return;
  at::Tensor first_bad = at::empty({2}, in.targets.options());
  // All-ones bytes: UINT64_MAX as the atomicMin identity, read back as -1 ("none").
  C10_CUDA_CHECK(cudaMemsetAsync(first_bad.data_ptr(), 0xFF, 2 * sizeof(int64_t), stream));
  const int64_t blocks = std::min(ceil_div(count, 256), kMaxScanBlocks);
  dispatch_index_type(in.group_ids.scalar_type(), [&](auto index_tag) {
    using index_t = decltype(index_tag);
    validate_inputs_kernel<index_t><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
        in.targets.data_ptr<int64_t>(), in.num_rows, in.num_cols, in.ignore_index,
        in.group_ids.data_ptr<index_t>(), num_ids, in.num_groups,
        reinterpret_cast<unsigned long long*>(first_bad.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const at::Tensor host = first_bad.cpu();
  const int64_t bad_row = host.data_ptr<int64_t>()[0];
  const int64_t bad_id = host.data_ptr<int64_t>()[1];
  if (bad_row >= 0) {
    const int64_t value = in.targets[bad_row].item<int64_t>();
    TORCH_CHECK(false, "targets must be in [0, V) = [0, ", in.num_cols, ") or equal ignore_index (", in.ignore_index,
                "), got targets[", bad_row, "] = ", value);
  }
  if (bad_id >= 0) {
    const int64_t value = in.group_ids[bad_id].item<int64_t>();
    TORCH_CHECK(false, "group_ids must be in [0, num_groups) = [0, ", in.num_groups, "), got group_ids[", bad_id,
                "] = ", value);
  }
}

// Persistent grid of the gradient sweep: about as many rows in flight as fit in 60% of L2 (counting the
// gradient row too when it is a separate buffer), so the second read of a row is an L2 hit; at least one CTA
// per SM, at most the CTAs that can be resident (1024 threads per SM at <= 64 registers each).
int64_t grad_sweep_grid(int device, int threads, int64_t row_footprint_bytes) {
  int num_sms = 0;
  int l2_bytes = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&l2_bytes, cudaDevAttrL2CacheSize, device));
  const int64_t rows_in_l2 = static_cast<int64_t>(l2_bytes) * 3 / 5 / std::max<int64_t>(row_footprint_bytes, 1);
  const int64_t resident = static_cast<int64_t>(num_sms) * std::max(1, 1024 / threads);
  return std::max<int64_t>(1, std::min(std::max<int64_t>(num_sms, rows_in_l2), resident));
}

template <typename scalar_t, typename index_t, bool kWriteGrad>
void launch_rows(const RowsParams<scalar_t, index_t>& params, int device, bool in_place, cudaStream_t stream) {
  if (params.num_rows == 0) return;
  if (params.num_cols <= kMaxWarpRowCols) {
    const int64_t grid = std::min(ceil_div(params.num_rows, kWarpRowsPerBlock), kMaxGrid);
    group_cross_entropy_kernel<scalar_t, index_t, kWriteGrad, true>
        <<<static_cast<unsigned>(grid), kWarpRowThreads, 0, stream>>>(params);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  // About 8-32 vectors per thread: enough loads in flight per thread without idle threads on mid-size rows.
  const int threads = params.num_cols <= 4096 ? 128 : (params.num_cols <= 16384 ? 256 : kMaxRowThreads);
  int64_t grid = std::min(params.num_rows, kMaxGrid);
  if constexpr (kWriteGrad) {
    const int64_t row_bytes = static_cast<int64_t>(params.num_cols) * static_cast<int64_t>(sizeof(scalar_t));
    grid = std::min(grid, grad_sweep_grid(device, threads, in_place ? row_bytes : 2 * row_bytes));
  }
  group_cross_entropy_kernel<scalar_t, index_t, kWriteGrad, false>
      <<<static_cast<unsigned>(grid), threads, 0, stream>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Per-row losses of every row, and the gradient into `grad` (rows of grad_row_stride, unit column stride)
// when given.
void run_rows(const Inputs& in, at::Tensor& loss, const at::Tensor* group_scale, const at::Tensor* grad,
              bool in_place, cudaStream_t stream) {
  const int device = in.logits.device().index();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.logits.scalar_type(), "group_cross_entropy_cuda",
                                  [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (grad == nullptr) {
      RowsParams<scalar_t, int64_t> params{in.logits.data_ptr<scalar_t>(), in.logits.stride(0),
                                           in.targets.data_ptr<int64_t>(), nullptr, in.seq_len, nullptr, nullptr, 0,
                                           loss.data_ptr<acc_t>(), in.num_rows, static_cast<int>(in.num_cols),
                                           in.ignore_index};
      launch_rows<scalar_t, int64_t, false>(params, device, in_place, stream);
      return;
    }
    dispatch_index_type(in.group_ids.scalar_type(), [&](auto index_tag) {
      using index_t = decltype(index_tag);
      RowsParams<scalar_t, index_t> params{in.logits.data_ptr<scalar_t>(), in.logits.stride(0),
                                           in.targets.data_ptr<int64_t>(), in.group_ids.data_ptr<index_t>(),
                                           in.seq_len, group_scale->data_ptr<acc_t>(), grad->data_ptr<scalar_t>(),
                                           grad->stride(0), loss.data_ptr<acc_t>(), in.num_rows,
                                           static_cast<int>(in.num_cols), in.ignore_index};
      launch_rows<scalar_t, index_t, true>(params, device, in_place, stream);
    });
  });
}

template <typename acc_t, typename index_t>
void dense_group_statistics(const Inputs& in, const at::Tensor& loss, at::Tensor& group_sums,
                            at::Tensor& token_counts, cudaStream_t stream) {
  const int num_groups = static_cast<int>(in.num_groups);
  const int64_t blocks = std::min(ceil_div(in.num_rows, kStatsWindow), kMaxStatsBlocks);
  const int64_t rows_per_block = ceil_div(in.num_rows, blocks);
  at::Tensor partial_sums = at::empty({blocks * num_groups}, loss.options().dtype(at::kDouble));
  at::Tensor partial_counts = at::empty({blocks * num_groups}, loss.options().dtype(at::kLong));
  group_partials_kernel<acc_t, index_t><<<static_cast<unsigned>(blocks), kStatsThreads, 0, stream>>>(
      loss.data_ptr<acc_t>(), in.targets.data_ptr<int64_t>(), in.group_ids.data_ptr<index_t>(), in.seq_len,
      in.num_rows, in.ignore_index, num_groups, rows_per_block, partial_sums.data_ptr<double>(),
      partial_counts.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  group_finalize_kernel<acc_t><<<static_cast<unsigned>(ceil_div(num_groups, kStatsThreads)), kStatsThreads, 0,
                                 stream>>>(partial_sums.data_ptr<double>(), partial_counts.data_ptr<int64_t>(),
                                           blocks, num_groups, group_sums.data_ptr<acc_t>(),
                                           token_counts.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename acc_t, typename index_t>
void sorted_group_statistics(const Inputs& in, const at::Tensor& loss, at::Tensor& group_sums,
                             at::Tensor& token_counts, cudaStream_t stream) {
  const int64_t num_rows = in.num_rows;
  const int64_t num_groups = in.num_groups;
  at::Tensor keys = at::empty({num_rows}, loss.options().dtype(at::kInt));
  at::Tensor sorted_keys = at::empty({num_rows}, loss.options().dtype(at::kInt));
  at::Tensor sorted_loss = at::empty({num_rows}, loss.options());
  at::Tensor offsets = at::zeros({num_groups + 1}, loss.options().dtype(at::kLong));
  uint32_t* keys_ptr = reinterpret_cast<uint32_t*>(keys.data_ptr<int32_t>());
  uint32_t* sorted_keys_ptr = reinterpret_cast<uint32_t*>(sorted_keys.data_ptr<int32_t>());
  int64_t* counts_ptr = token_counts.data_ptr<int64_t>();
  int64_t* offsets_ptr = offsets.data_ptr<int64_t>();

  const int64_t key_blocks = std::min(ceil_div(num_rows, kStatsThreads), kMaxScanBlocks);
  group_keys_kernel<index_t><<<static_cast<unsigned>(key_blocks), kStatsThreads, 0, stream>>>(
      in.targets.data_ptr<int64_t>(), in.group_ids.data_ptr<index_t>(), in.seq_len, num_rows, in.ignore_index,
      static_cast<uint32_t>(num_groups), keys_ptr, reinterpret_cast<unsigned long long*>(counts_ptr));
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // Keys take values 0..num_groups: sort only the bits that can be set.
  int end_bit = 1;
  while ((int64_t(1) << end_bit) <= num_groups) ++end_bit;
  size_t scan_bytes = 0;
  size_t sort_bytes = 0;
  C10_CUDA_CHECK(cub::DeviceScan::InclusiveSum(nullptr, scan_bytes, counts_ptr, offsets_ptr + 1, num_groups, stream));
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, sort_bytes, keys_ptr, sorted_keys_ptr,
                                                 loss.data_ptr<acc_t>(), sorted_loss.data_ptr<acc_t>(), num_rows, 0,
                                                 end_bit, stream));
  at::Tensor temp = at::empty({static_cast<int64_t>(std::max<size_t>(std::max(scan_bytes, sort_bytes), 1))},
                              loss.options().dtype(at::kByte));
  // offsets[0] = 0 (zeros above), offsets[g + 1] = rows of groups 0..g: an integer scan, exact in any order.
  C10_CUDA_CHECK(cub::DeviceScan::InclusiveSum(temp.data_ptr(), scan_bytes, counts_ptr, offsets_ptr + 1, num_groups,
                                               stream));
  // Stable: rows of one group keep their row order, so each segment (and its sum) is the same on every call.
  C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp.data_ptr(), sort_bytes, keys_ptr, sorted_keys_ptr,
                                                 loss.data_ptr<acc_t>(), sorted_loss.data_ptr<acc_t>(), num_rows, 0,
                                                 end_bit, stream));
  const int64_t sum_blocks = ceil_div(num_groups * kWarpSize, kStatsThreads);
  group_segment_sum_kernel<acc_t><<<static_cast<unsigned>(sum_blocks), kStatsThreads, 0, stream>>>(
      sorted_loss.data_ptr<acc_t>(), offsets_ptr, num_groups, group_sums.data_ptr<acc_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> group_statistics(const Inputs& in, const at::Tensor& loss, cudaStream_t stream) {
  const auto acc_options = loss.options();
  at::Tensor group_sums;
  at::Tensor token_counts;
  if (in.num_rows == 0) {
    return {at::zeros({in.num_groups}, acc_options), at::zeros({in.num_groups}, acc_options.dtype(at::kLong))};
  }
  const bool dense = in.num_groups <= kDenseMaxGroups;
  group_sums = at::empty({in.num_groups}, acc_options);
  token_counts = dense ? at::empty({in.num_groups}, acc_options.dtype(at::kLong))
                       : at::zeros({in.num_groups}, acc_options.dtype(at::kLong));  // atomics add into it
  dispatch_acc_type(loss.scalar_type(), [&](auto acc_tag) {
    using acc_t = decltype(acc_tag);
    dispatch_index_type(in.group_ids.scalar_type(), [&](auto index_tag) {
      using index_t = decltype(index_tag);
      if (dense) {
        dense_group_statistics<acc_t, index_t>(in, loss, group_sums, token_counts, stream);
      } else {
        sorted_group_statistics<acc_t, index_t>(in, loss, group_sums, token_counts, stream);
      }
    });
  });
  return {group_sums, token_counts};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_cross_entropy_cuda(const at::Tensor& logits,
                                                                        const at::Tensor& targets,
                                                                        const at::Tensor& group_ids,
                                                                        int64_t num_groups, int64_t ignore_index,
                                                                        int64_t seq_len) {
  check_group_cross_entropy_args(logits, targets, group_ids, num_groups, seq_len);
  check_cuda_limits(logits, num_groups);
  check_on_cuda(logits);
  c10::cuda::CUDAGuard device_guard(logits.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Inputs in = prepare_inputs(logits, targets, group_ids, num_groups, ignore_index, seq_len);
  validate_values(in, stream);
  at::Tensor loss = at::empty({in.num_rows}, logits.options().dtype(group_loss_acc_dtype(logits)));
  run_rows(in, loss, nullptr, nullptr, false, stream);
  auto [group_sums, token_counts] = group_statistics(in, loss, stream);
  return {loss, group_sums, token_counts};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_cross_entropy_with_grad_cuda(
    const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& group_ids, int64_t num_groups,
    int64_t ignore_index, int64_t seq_len, const at::Tensor& group_scale) {
  check_group_cross_entropy_args(logits, targets, group_ids, num_groups, seq_len);
  check_group_scale(group_scale, logits, num_groups);
  check_cuda_limits(logits, num_groups);
  check_on_cuda(logits);
  c10::cuda::CUDAGuard device_guard(logits.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Inputs in = prepare_inputs(logits, targets, group_ids, num_groups, ignore_index, seq_len);
  const at::Tensor scale = group_scale.contiguous();
  validate_values(in, stream);
  at::Tensor loss = at::empty({in.num_rows}, logits.options().dtype(group_loss_acc_dtype(logits)));
  at::Tensor grad_logits = at::empty({in.num_rows, in.num_cols}, logits.options());
  run_rows(in, loss, &scale, &grad_logits, false, stream);
  auto [group_sums, token_counts] = group_statistics(in, loss, stream);
  return {loss, group_sums, token_counts, grad_logits};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_cross_entropy_fused_cuda(
    const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& group_ids, int64_t num_groups,
    int64_t ignore_index, int64_t seq_len, const at::Tensor& group_scale, at::Tensor& grad_logits) {
  check_group_cross_entropy_args(logits, targets, group_ids, num_groups, seq_len);
  check_group_scale(group_scale, logits, num_groups);
  check_grad_logits(grad_logits, logits);  // contiguous, and logits itself or no overlap where decidable
  check_cuda_limits(logits, num_groups);
  check_on_cuda(logits);
  TORCH_CHECK(element_aligned(grad_logits), "grad_logits must start at an address aligned to its element size");
  c10::cuda::CUDAGuard device_guard(logits.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const Inputs in = prepare_inputs(logits, targets, group_ids, num_groups, ignore_index, seq_len);
  const at::Tensor scale = group_scale.contiguous();
  const int64_t num_rows = in.num_rows;
  const int64_t num_cols = in.num_cols;

  // grad_logits is contiguous, so the kernel writes its rows directly. The shared check cannot decide overlap
  // with row-strided (non-dense) logits; the exact test for two row-major ranges is done here.
  bool in_place = false;
  if (num_rows > 0 && num_cols > 0) {
    const int64_t element_size = grad_logits.element_size();
    const auto* grad_begin = static_cast<const char*>(grad_logits.data_ptr());
    const auto* logits_begin = static_cast<const char*>(in.logits.data_ptr());
    in_place = grad_begin == logits_begin && (num_rows == 1 || in.logits.stride(0) == num_cols);
    if (!in_place) {
      const auto* grad_end = grad_begin + num_rows * num_cols * element_size;
      const auto* logits_end = logits_begin + ((num_rows - 1) * in.logits.stride(0) + num_cols) * element_size;
      TORCH_CHECK(grad_end <= logits_begin || logits_end <= grad_begin,
                  "grad_logits must be logits itself (in place) or not overlap it, got a partial overlap");
    }
  }
  validate_values(in, stream);
  at::Tensor loss = at::empty({num_rows}, logits.options().dtype(group_loss_acc_dtype(logits)));
  run_rows(in, loss, &scale, &grad_logits, in_place, stream);
  auto [group_sums, token_counts] = group_statistics(in, loss, stream);
  return {loss, group_sums, token_counts};
}

TORCH_LIBRARY_IMPL(aioli_ext, CUDA, m) {
  m.impl("group_cross_entropy", &group_cross_entropy_cuda);
  m.impl("group_cross_entropy_with_grad", &group_cross_entropy_with_grad_cuda);
  m.impl("group_cross_entropy_fused", &group_cross_entropy_fused_cuda);
}

}  // namespace aioli_ext
