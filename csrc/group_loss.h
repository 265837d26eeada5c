// Per-row cross-entropy math shared by the CPU and CUDA kernels (host/device).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "macros.h"

namespace aioli_ext {

// Running log-sum-exp of a row, kept as (max, sum of exp(x - max)). Partial states over disjoint pieces of a
// row combine in any grouping, which lets SIMD lanes, threads and warps each reduce their share of the row in
// one pass (the "online softmax" recurrence).
template <typename acc_t>
struct LseState {
  acc_t max;
  acc_t sum;
};

template <typename acc_t>
AIOLI_HOST_DEVICE LseState<acc_t> lse_empty() {
  return {-std::numeric_limits<acc_t>::infinity(), acc_t(0)};
}

template <typename acc_t>
AIOLI_HOST_DEVICE LseState<acc_t> lse_combine(LseState<acc_t> a, LseState<acc_t> b) {
  // An empty side (max = -inf) must not produce exp(-inf - -inf) = NaN.
  if (a.max == -std::numeric_limits<acc_t>::infinity()) return b;
  if (b.max == -std::numeric_limits<acc_t>::infinity()) return a;
  if (a.max >= b.max) return {a.max, a.sum + b.sum * std::exp(b.max - a.max)};
  return {b.max, b.sum + a.sum * std::exp(a.max - b.max)};
}

template <typename acc_t>
AIOLI_HOST_DEVICE acc_t lse_value(LseState<acc_t> s) {
  return s.max + std::log(s.sum);
}

// Group of row `row`: group_ids holds one id per row (seq_len = 1) or one per sequence of seq_len rows, so
// per-sequence ids need no expansion copy.
template <typename index_t>
AIOLI_HOST_DEVICE int64_t row_group(const index_t* group_ids, int64_t row, int64_t seq_len) {
  return static_cast<int64_t>(group_ids[seq_len == 1 ? row : row / seq_len]);
}

}  // namespace aioli_ext
