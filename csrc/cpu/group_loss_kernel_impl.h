// The per-row group cross-entropy kernels, written once on at::vec::Vectorized and compiled once per ISA.
// Include ONLY from group_loss_{default,avx2,avx512}.cpp: at::vec vectorises according to the flags of the
// including translation unit (Vectorized lives in the inline namespace at::vec::CPU_CAPABILITY), and
// everything here has internal linkage so no inline code compiled for one ISA can be linked into another.
#pragma once

// GCC 12 flags the `__Y = __Y` idiom inside its own AVX-512 intrinsic headers (instantiated here through
// at::vec) as possibly uninitialised: a known false positive with no bearing on this code.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include "cpu/group_loss_kernel.h"
#include "group_loss.h"

namespace aioli_ext {
namespace {

using at::vec::Vectorized;

// Loads and stores of 2 * Vectorized<acc_t>::size() logits as two accumulation-type vectors. fp32 and fp64
// logits are their own accumulation type; fp16 and bf16 widen to fp32.
template <typename scalar_t, typename = void>
struct RowIo {
  using acc_t = scalar_t;
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t kStep = 2 * Vec::size();

  static void load(const scalar_t* p, Vec& a, Vec& b) {
    a = Vec::loadu(p);
    b = Vec::loadu(p + Vec::size());
  }
  // 0 < count < kStep; lanes past count take `fill`. Never reads past p + count.
  static void load_partial(const scalar_t* p, int64_t count, const Vec& fill, Vec& a, Vec& b) {
    const int64_t n0 = std::min<int64_t>(count, Vec::size());
    a = Vec::set(fill, Vec::loadu(p, n0), n0);
    b = count > Vec::size() ? Vec::set(fill, Vec::loadu(p + Vec::size(), count - n0), count - n0) : fill;
  }
  static void store(scalar_t* p, const Vec& a, const Vec& b) {
    a.store(p);
    b.store(p + Vec::size());
  }
  static void store_partial(scalar_t* p, int64_t count, const Vec& a, const Vec& b) {
    const int64_t n0 = std::min<int64_t>(count, Vec::size());
    a.store(p, n0);
    if (count > n0) b.store(p + Vec::size(), count - n0);
  }
};

template <typename scalar_t>
struct RowIo<scalar_t, std::enable_if_t<at::vec::is_reduced_floating_point_v<scalar_t>>> {
  using acc_t = float;
  using Vec = Vectorized<float>;
  using RawVec = Vectorized<scalar_t>;
  static_assert(RawVec::size() == 2 * Vec::size(), "a 16-bit vector must widen to exactly two fp32 vectors");
  static constexpr int64_t kStep = RawVec::size();

  static void load(const scalar_t* p, Vec& a, Vec& b) {
    std::tie(a, b) = at::vec::convert_to_float<scalar_t>(RawVec::loadu(p));
  }
  static void load_partial(const scalar_t* p, int64_t count, const Vec& fill, Vec& a, Vec& b) {
    std::tie(a, b) = at::vec::convert_to_float<scalar_t>(RawVec::loadu(p, count));
    const int64_t n0 = std::min<int64_t>(count, Vec::size());
    a = Vec::set(fill, a, n0);
    b = Vec::set(fill, b, count - n0);
  }
  static void store(scalar_t* p, const Vec& a, const Vec& b) {
    at::vec::convert_from_float<scalar_t>(a, b).store(p);
  }
  static void store_partial(scalar_t* p, int64_t count, const Vec& a, const Vec& b) {
    at::vec::convert_from_float<scalar_t>(a, b).store(p, count);
  }
};

// One element as the accumulation type, through the vector path (no scalar c10 conversion code in here).
template <typename scalar_t>
typename RowIo<scalar_t>::acc_t load_one(const scalar_t* p) {
  using Io = RowIo<scalar_t>;
  typename Io::Vec a, b;
  Io::load_partial(p, 1, typename Io::Vec(0), a, b);
  typename Io::acc_t lanes[Io::Vec::size()];
  a.store(lanes);
  return lanes[0];
}

template <typename scalar_t>
void store_one(scalar_t* p, typename RowIo<scalar_t>::acc_t value) {
  using Io = RowIo<scalar_t>;
  const typename Io::Vec v(value);
  Io::store_partial(p, 1, v, v);
}

// exp without Sleef (whose symbols the extension cannot link). The generic version is at::vec's exp_u20:
// std::exp per element in the portable build and for fp64. The AVX2 / AVX-512 builds use the specialisations
// below: exp(x) = 2^n * e^r with n = round(x / ln 2), r = x - n ln 2 (ln 2 split in two for an exact product),
// |r| <= ln(2) / 2, and e^r by its degree-6 Taylor polynomial (truncation error < 1.2e-7 relative, so a few
// ulp in all; exp_u20 allows 20). Inputs below -87.33 (exp < FLT_MIN, including -inf) give exactly 0, which
// keeps denormals out of the sums; NaN propagates. About 12 vector operations, half of exp_u20's count.
template <typename Vec>
Vec vec_exp(const Vec& x) {
  return x.exp_u20();
}

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
constexpr float kExpLog2e = 1.44269504088896341f;
constexpr float kExpLn2Hi = 0.693359375f;      // few mantissa bits: n * kExpLn2Hi is exact for |n| < 2^10
constexpr float kExpLn2Lo = -2.12194440e-4f;   // ln 2 - kExpLn2Hi
constexpr float kExpMinInput = -87.3365448f;   // ln(FLT_MIN)
constexpr float kExpTaylor[7] = {1.0f, 1.0f, 1.0f / 2, 1.0f / 6, 1.0f / 24, 1.0f / 120, 1.0f / 720};
#endif

#if defined(CPU_CAPABILITY_AVX512)
template <>
inline Vectorized<float> vec_exp(const Vectorized<float>& xv) {
  const __m512 x = xv;
  // Not-less-than, unordered: NaN lanes stay in the mask and propagate.
  const __mmask16 keep = _mm512_cmp_ps_mask(x, _mm512_set1_ps(kExpMinInput), _CMP_NLT_UQ);
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kExpLog2e)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kExpLn2Hi), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(kExpLn2Lo), r);
  __m512 p = _mm512_set1_ps(kExpTaylor[6]);
  for (int k = 5; k >= 0; --k) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kExpTaylor[k]));
  return _mm512_maskz_scalef_ps(keep, p, n);
}
#elif defined(CPU_CAPABILITY_AVX2)
template <>
inline Vectorized<float> vec_exp(const Vectorized<float>& xv) {
  const __m256 x = xv;
  const __m256 drop = _mm256_cmp_ps(x, _mm256_set1_ps(kExpMinInput), _CMP_LT_OQ);
  // Clamped so that 2^n stays a normal number; the dropped lanes are zeroed at the end.
  const __m256 xc = _mm256_max_ps(_mm256_set1_ps(kExpMinInput), x);  // second operand wins: NaN propagates
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(kExpLog2e)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kExpLn2Hi), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(kExpLn2Lo), r);
  __m256 p = _mm256_set1_ps(kExpTaylor[6]);
  for (int k = 5; k >= 0; --k) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kExpTaylor[k]));
  const __m256i biased = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
  const __m256 two_n = _mm256_castsi256_ps(_mm256_slli_epi32(biased, 23));
  return _mm256_andnot_ps(drop, _mm256_mul_ps(p, two_n));
}
#endif

// Per-lane online log-sum-exp state: lane k of (max, sum) covers the elements that went through lane k.
template <typename Vec>
struct LaneLse {
  Vec max;
  Vec sum;
};

// Lane-wise max without NaN bookkeeping (at::vec::maximum spends three extra operations per call on it): a NaN
// logit still reaches the sum through exp(x - max) = NaN, so the loss is NaN either way.
template <typename Vec>
inline Vec lane_max(const Vec& a, const Vec& b) {
  return at::vec::maximum(a, b);
}
#if defined(CPU_CAPABILITY_AVX512)
template <>
inline Vectorized<float> lane_max(const Vectorized<float>& a, const Vectorized<float>& b) {
  return _mm512_max_ps(a, b);
}
#elif defined(CPU_CAPABILITY_AVX2)
template <>
inline Vectorized<float> lane_max(const Vectorized<float>& a, const Vectorized<float>& b) {
  return _mm256_max_ps(a, b);
}
#endif

// Pairwise (tree) reduction of xs[0..n) with `op`: log2(n) dependent steps instead of n.
template <int n, typename Vec, typename Op>
inline Vec tree_reduce(const Vec* xs, const Op& op) {
  if constexpr (n == 1) {
    return xs[0];
  } else {
    return op(tree_reduce<n / 2>(xs, op), tree_reduce<n - n / 2>(xs + n / 2, op));
  }
}

// Folds the block `xs[0..n)` into the lane state. The block is loaded once into registers and used for both
// the max and the exps, so memory sees one read of the row and exp runs once per element, plus one exp per
// lane and block to rescale the running sum, skipped when no lane's max moved (the common case after the
// first blocks of a row).
template <int n, typename Vec>
inline void lane_lse_update(LaneLse<Vec>& st, const Vec* xs) {
  const Vec block_max = lane_max(st.max, tree_reduce<n>(xs, [](const Vec& a, const Vec& b) { return lane_max(a, b); }));
  const Vec moved = st.max - block_max;  // <= 0; exactly 0 in lanes whose max did not move
  Vec exps[n];
  for (int k = 0; k < n; ++k) exps[k] = vec_exp(xs[k] - block_max);
  const Vec block_sum = tree_reduce<n>(exps, [](const Vec& a, const Vec& b) { return a + b; });
  if (moved.zero_mask() != (1 << Vec::size()) - 1) {
    st.sum = st.sum * vec_exp(moved) + block_sum;
  } else {
    st.sum = st.sum + block_sum;
  }
  st.max = block_max;
}

// How far ahead of the loads the forward sweep prefetches (bytes; may run into the next row). Measured on a
// 2-vCPU Xeon VM: +25% forward throughput over the hardware prefetcher alone, flat from 2 to 8 KB.
constexpr int64_t kPrefetchAheadBytes = 4096;

// (max, sum of exp(x - max)) over one row, accumulated in acc_t. prefetch_bytes: software prefetch distance,
// 0 when the row is already in cache.
template <typename scalar_t>
LseState<typename RowIo<scalar_t>::acc_t> row_lse(const scalar_t* row, int64_t vocab, int64_t prefetch_bytes) {
  using Io = RowIo<scalar_t>;
  using acc_t = typename Io::acc_t;
  using Vec = typename Io::Vec;
  // Blocks of 8 vectors with 32 registers (AVX-512), 4 otherwise, leave room for the exp constants.
  constexpr int kBlockSteps = Vec::size() * sizeof(acc_t) >= 64 ? 4 : 2;
  constexpr int64_t kBlockElems = kBlockSteps * Io::kStep;
  // Lanes start at the lowest finite value, not -inf: a lane that has seen only -inf logits (masked
  // vocabulary) then gets exp(-inf - lowest) = 0 instead of exp(-inf + inf) = NaN.
  const Vec lowest(std::numeric_limits<acc_t>::lowest());
  const Vec neg_inf(-std::numeric_limits<acc_t>::infinity());
  LaneLse<Vec> st{lowest, Vec(acc_t(0))};
  Vec xs[2 * kBlockSteps];
  int64_t j = 0;
  for (; j + kBlockElems <= vocab; j += kBlockElems) {
    if (prefetch_bytes) {
      for (int64_t off = 0; off < kBlockElems * int64_t(sizeof(scalar_t)); off += 64) {
        __builtin_prefetch(reinterpret_cast<const char*>(row + j) + prefetch_bytes + off, 0, 2);
      }
    }
    for (int k = 0; k < kBlockSteps; ++k) Io::load(row + j + k * Io::kStep, xs[2 * k], xs[2 * k + 1]);
    lane_lse_update<2 * kBlockSteps>(st, xs);
  }
  for (; j + Io::kStep <= vocab; j += Io::kStep) {
    Io::load(row + j, xs[0], xs[1]);
    lane_lse_update<2>(st, xs);
  }
  if (j < vocab) {
    // Filled lanes are -inf: they move no max and add exp(-inf) = 0.
    Io::load_partial(row + j, vocab - j, neg_inf, xs[0], xs[1]);
    lane_lse_update<2>(st, xs);
  }
  acc_t lane_max[Vec::size()], lane_sum[Vec::size()];
  st.max.store(lane_max);
  st.sum.store(lane_sum);
  auto state = lse_empty<acc_t>();
  for (int k = 0; k < Vec::size(); ++k) state = lse_combine(state, LseState<acc_t>{lane_max[k], lane_sum[k]});
  return state;
}

// Non-temporal (streaming) stores of one step of gradient, for an out-of-place gradient buffer: the lines go
// to memory without first being read for ownership, a third less traffic than plain stores. Needs the
// destination aligned to kAlign bytes.
template <typename scalar_t, typename = void>
struct StreamStore {
  static constexpr bool kAvailable = false;
  static constexpr int64_t kAlign = 1;
  template <typename Vec>
  static void store(scalar_t*, const Vec&, const Vec&) {}
};
#if defined(CPU_CAPABILITY_AVX512)
template <>
struct StreamStore<float> {
  static constexpr bool kAvailable = true;
  static constexpr int64_t kAlign = 64;
  static void store(float* p, const Vectorized<float>& a, const Vectorized<float>& b) {
    _mm512_stream_ps(p, a);
    _mm512_stream_ps(p + Vectorized<float>::size(), b);
  }
};
template <typename scalar_t>
struct StreamStore<scalar_t, std::enable_if_t<at::vec::is_reduced_floating_point_v<scalar_t>>> {
  static constexpr bool kAvailable = true;
  static constexpr int64_t kAlign = 64;
  static void store(scalar_t* p, const Vectorized<float>& a, const Vectorized<float>& b) {
    _mm512_stream_si512(reinterpret_cast<__m512i*>(p), at::vec::convert_from_float<scalar_t>(a, b));
  }
};
#elif defined(CPU_CAPABILITY_AVX2)
template <>
struct StreamStore<float> {
  static constexpr bool kAvailable = true;
  static constexpr int64_t kAlign = 32;
  static void store(float* p, const Vectorized<float>& a, const Vectorized<float>& b) {
    _mm256_stream_ps(p, a);
    _mm256_stream_ps(p + Vectorized<float>::size(), b);
  }
};
template <typename scalar_t>
struct StreamStore<scalar_t, std::enable_if_t<at::vec::is_reduced_floating_point_v<scalar_t>>> {
  static constexpr bool kAvailable = true;
  static constexpr int64_t kAlign = 32;
  static void store(scalar_t* p, const Vectorized<float>& a, const Vectorized<float>& b) {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p), at::vec::convert_from_float<scalar_t>(a, b));
  }
};
#endif

inline void stream_store_fence() {
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  _mm_sfence();
#endif
}

// grad[j] = scale * exp(row[j] - lse) for the whole row; grad may be row itself (then kStream = false).
// prefetch_row (or nullptr): the next row to compute, pulled into L2 while this sweep runs from cache, so the
// memory system keeps streaming while the core is busy with exps.
template <bool kStream, typename scalar_t>
void row_scaled_softmax(const scalar_t* row, scalar_t* grad, int64_t vocab, typename RowIo<scalar_t>::acc_t lse,
                        typename RowIo<scalar_t>::acc_t scale, const scalar_t* prefetch_row) {
  using Io = RowIo<scalar_t>;
  using Vec = typename Io::Vec;
  using Stream = StreamStore<scalar_t>;
  constexpr int64_t kStepBytes = Io::kStep * sizeof(scalar_t);
  const Vec lse_v(lse), scale_v(scale);
  const Vec neg_inf(-std::numeric_limits<typename Io::acc_t>::infinity());
  Vec a, b;
  int64_t j = 0;
  if constexpr (kStream) {
    // Plain stores up to the first aligned element (kStep * sizeof(scalar_t) is a multiple of kAlign, so
    // every later step stays aligned).
    const auto misalign = static_cast<int64_t>(reinterpret_cast<uintptr_t>(grad) % Stream::kAlign);
    const int64_t head = std::min<int64_t>(
        vocab, misalign ? (Stream::kAlign - misalign) / static_cast<int64_t>(sizeof(scalar_t)) : 0);
    if (head > 0) {
      Io::load_partial(row, head, neg_inf, a, b);
      Io::store_partial(grad, head, vec_exp(a - lse_v) * scale_v, vec_exp(b - lse_v) * scale_v);
      j = head;
    }
  }
  for (; j + Io::kStep <= vocab; j += Io::kStep) {
    if (prefetch_row) {
      for (int64_t off = 0; off < kStepBytes; off += 64) {
        __builtin_prefetch(reinterpret_cast<const char*>(prefetch_row + j) + off, 0, 2);
      }
    }
    Io::load(row + j, a, b);
    if constexpr (kStream) {
      Stream::store(grad + j, vec_exp(a - lse_v) * scale_v, vec_exp(b - lse_v) * scale_v);
    } else {
      Io::store(grad + j, vec_exp(a - lse_v) * scale_v, vec_exp(b - lse_v) * scale_v);
    }
  }
  if (j < vocab) {
    const int64_t n = vocab - j;
    Io::load_partial(row + j, n, neg_inf, a, b);
    Io::store_partial(grad + j, n, vec_exp(a - lse_v) * scale_v, vec_exp(b - lse_v) * scale_v);
  }
  // Streaming stores are weakly ordered: complete them before the one-hot fix-up rewrites an element.
  if constexpr (kStream) stream_store_fence();
}

template <typename scalar_t>
void row_fill_zero(scalar_t* grad, int64_t vocab) {
  using Io = RowIo<scalar_t>;
  using Vec = typename Io::Vec;
  const Vec zero(0);
  const int64_t n_full = vocab - vocab % Io::kStep;
  for (int64_t j = 0; j < n_full; j += Io::kStep) Io::store(grad + j, zero, zero);
  if (n_full < vocab) Io::store_partial(grad + n_full, vocab - n_full, zero, zero);
}

template <typename scalar_t, typename group_id_t>
void group_loss_rows(const GroupLossRowsArgs& args) {
  using Io = RowIo<scalar_t>;
  using acc_t = typename Io::acc_t;
  using Vec = typename Io::Vec;
  const auto* logits = static_cast<const scalar_t*>(args.logits);
  auto* grad_logits = static_cast<scalar_t*>(args.grad_logits);
  const auto* group_ids = static_cast<const group_id_t*>(args.group_ids);
  const auto* group_scale = static_cast<const acc_t*>(args.group_scale);
  auto* loss = static_cast<acc_t*>(args.loss);
  const int64_t vocab = args.vocab;

  // True when the previous row's gradient sweep prefetched this row into L2.
  bool row_in_cache = false;
  for (int64_t i = args.row_begin; i < args.row_end; ++i) {
    const int64_t target = args.targets[i];
    scalar_t* grad_row = grad_logits ? grad_logits + i * vocab : nullptr;
    if (target == args.ignore_index) {
      loss[i] = acc_t(0);
      if (grad_row) row_fill_zero(grad_row, vocab);
      row_in_cache = false;
      continue;
    }
    const scalar_t* row = logits + i * vocab;
    // Read before the gradient overwrites the row when grad_logits aliases logits.
    const acc_t target_logit = load_one(row + target);
    const acc_t lse = lse_value(row_lse(row, vocab, row_in_cache ? 0 : kPrefetchAheadBytes));
    loss[i] = lse - target_logit;
    row_in_cache = false;
    if (grad_row) {
      const acc_t scale = group_scale[row_group(group_ids, i, args.seq_len)];
      const bool prefetch_next = i + 1 < args.row_end && args.targets[i + 1] != args.ignore_index;
      const scalar_t* next_row = prefetch_next ? row + vocab : nullptr;
      if (StreamStore<scalar_t>::kAvailable && args.stream_grad) {
        row_scaled_softmax<true>(row, grad_row, vocab, lse, scale, next_row);
      } else {
        row_scaled_softmax<false>(row, grad_row, vocab, lse, scale, next_row);
      }
      row_in_cache = prefetch_next;
      // The one-hot term, with the target's probability from the same exp as the vector sweep.
      acc_t lanes[Vec::size()];
      vec_exp(Vec(target_logit) - Vec(lse)).store(lanes);
      store_one(grad_row + target, scale * (lanes[0] - acc_t(1)));
    }
  }
}

template <typename scalar_t>
void scale_rows(const ScaleRowsArgs& args) {
  using Io = RowIo<scalar_t>;
  using acc_t = typename Io::acc_t;
  using Vec = typename Io::Vec;
  auto* x = static_cast<scalar_t*>(args.x);
  const auto* row_scale = static_cast<const acc_t*>(args.row_scale);
  const int64_t vocab = args.vocab;
  for (int64_t i = args.row_begin; i < args.row_end; ++i) {
    scalar_t* row = x + i * vocab;
    const Vec scale(row_scale[i]);
    Vec a, b;
    int64_t j = 0;
    for (; j + Io::kStep <= vocab; j += Io::kStep) {
      Io::load(row + j, a, b);
      Io::store(row + j, a * scale, b * scale);
    }
    if (j < vocab) {
      Io::load_partial(row + j, vocab - j, Vec(acc_t(0)), a, b);
      Io::store_partial(row + j, vocab - j, a * scale, b * scale);
    }
  }
}

template <typename scalar_t>
void group_loss_rows_for(const GroupLossRowsArgs& args) {
  if (args.group_ids_int64) {
    group_loss_rows<scalar_t, int64_t>(args);
  } else {
    group_loss_rows<scalar_t, int32_t>(args);
  }
}

}  // namespace
}  // namespace aioli_ext
