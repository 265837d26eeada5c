// Body of the per-ISA sampler kernels (see mixture_draw_kernel.h); included by exactly one translation unit
// per ISA, which the build compiles with that ISA's flags.
#pragma once

#include <cstddef>
#include <cstdint>

#include "cpu/mixture_draw_kernel.h"
#include "permutation.h"
#include "philox.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace aioli_ext {
// GCC 12 reports its own AVX-512 shift intrinsics (an "undefined" pass-through operand) as uninitialised reads.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// Internal linkage: each ISA's translation unit must keep its own copy (inline functions of the same name
// would be merged by the linker into whichever ISA it saw first).
namespace {

#if defined(__AVX512F__)
// 16 lanes of 32-bit words; vpmuludq multiplies the even lanes of each 64-bit pair, so the odd lanes are
// shifted down for a second multiply, and the (hi, lo) halves are put back in place with masked blends.
struct Lanes {
  using V = __m512i;
  static constexpr int kWidth = 16;
  static V load(const uint32_t* p) { return _mm512_load_si512(p); }
  static void store(uint32_t* p, V v) { _mm512_store_si512(p, v); }
  static V splat(uint32_t x) { return _mm512_set1_epi32(static_cast<int>(x)); }
  static V bitxor(V a, V b) { return _mm512_xor_si512(a, b); }
  static void mul_hi_lo(V a, V m, V* hi, V* lo) {
    const V even = _mm512_mul_epu32(a, m);
    const V odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
    *hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
    *lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  }
};
#elif defined(__AVX2__)
struct Lanes {
  using V = __m256i;
  static constexpr int kWidth = 8;
  static V load(const uint32_t* p) { return _mm256_load_si256(reinterpret_cast<const __m256i*>(p)); }
  static void store(uint32_t* p, V v) { _mm256_store_si256(reinterpret_cast<__m256i*>(p), v); }
  static V splat(uint32_t x) { return _mm256_set1_epi32(static_cast<int>(x)); }
  static V bitxor(V a, V b) { return _mm256_xor_si256(a, b); }
  static void mul_hi_lo(V a, V m, V* hi, V* lo) {
    const V even = _mm256_mul_epu32(a, m);
    const V odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
    *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
    *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  }
};
#endif

// Philox4x32-10 of the counters {first_pair + i, round, step lo, step hi} under the seed, lanes i in [0, 64):
// the rounds of philox.h (same bits), one vector of lanes at a time with the ten rounds kept in registers. The
// whole block is always computed (fixed trip counts); the caller keeps the first `pairs` lanes.
inline void slot_random_pairs_impl(uint64_t seed, uint64_t step, uint32_t round, uint64_t first_pair, int pairs,
                                   uint64_t* out) {
  using namespace philox_detail;
  constexpr int kLanes = kSlotRandomBlockPairs;
  alignas(64) uint32_t c0[kLanes], c1[kLanes], c2[kLanes], c3[kLanes];
  const uint32_t first = static_cast<uint32_t>(first_pair);  // the low word of the pair index
  const uint32_t step_lo = static_cast<uint32_t>(step), step_hi = static_cast<uint32_t>(step >> 32);
  const uint32_t seed_lo = static_cast<uint32_t>(seed), seed_hi = static_cast<uint32_t>(seed >> 32);
#if defined(__AVX512F__) || defined(__AVX2__)
  using V = Lanes::V;
  alignas(64) uint32_t index[Lanes::kWidth];
  for (int i = 0; i < Lanes::kWidth; ++i) index[i] = first + static_cast<uint32_t>(i);
  const V mul0 = Lanes::splat(kMul0), mul1 = Lanes::splat(kMul1);
  for (int base = 0; base < kLanes; base += Lanes::kWidth) {
    V x0 = Lanes::load(index), x1 = Lanes::splat(round), x2 = Lanes::splat(step_lo), x3 = Lanes::splat(step_hi);
    uint32_t k0 = seed_lo, k1 = seed_hi;
    for (int r = 0; r < 10; ++r) {
      if (r > 0) {
        k0 += kBump0;
        k1 += kBump1;
      }
      V hi0, lo0, hi1, lo1;
      Lanes::mul_hi_lo(x0, mul0, &hi0, &lo0);
      Lanes::mul_hi_lo(x2, mul1, &hi1, &lo1);
      x0 = Lanes::bitxor(Lanes::bitxor(hi1, x1), Lanes::splat(k0));
      x2 = Lanes::bitxor(Lanes::bitxor(hi0, x3), Lanes::splat(k1));
      x1 = lo1;
      x3 = lo0;
    }
    Lanes::store(c0 + base, x0);
    Lanes::store(c1 + base, x1);
    Lanes::store(c2 + base, x2);
    Lanes::store(c3 + base, x3);
    for (int i = 0; i < Lanes::kWidth; ++i) index[i] += Lanes::kWidth;
  }
#else
  for (int i = 0; i < kLanes; ++i) {
    const Philox4x32Value r = philox4x32_10(first + static_cast<uint32_t>(i), round, step_lo, step_hi, seed_lo,
                                            seed_hi);
    c0[i] = r.v[0];
    c1[i] = r.v[1];
    c2[i] = r.v[2];
    c3[i] = r.v[3];
  }
#endif
  for (int i = 0; i < pairs; ++i) {
    out[2 * i] = c0[i] | (static_cast<uint64_t>(c1[i]) << 32);
    out[2 * i + 1] = c2[i] | (static_cast<uint64_t>(c3[i]) << 32);
  }
}

// One application of KeyedPermutation::network to lanes [0, count) of the arrays, in place, written lane-wise
// (selects, no branches) so that the compiler vectorises it. With `all_wide` every lane has m >= kWideFeistelBits
// and runs its four rounds only; otherwise every lane runs six rounds and keeps the result after four or six.
template <bool all_wide>
inline void network_lanes(int count, uint64_t* __restrict value, const uint64_t* __restrict bits,
                          const uint64_t (*__restrict key)[kPermutationLanes]) {
  for (int i = 0; i < count; ++i) {
    const uint64_t x = value[i];
    const uint64_t m = bits[i];
    const uint64_t right_bits = m - (m >> 1);
    const uint64_t left_shift = 64 - (m >> 1);  // round outputs of the left width: the top floor(m/2) bits
    const uint64_t right_shift = 64 - right_bits;
    uint64_t left = x >> right_bits;
    uint64_t right = x ^ (left << right_bits);  // x mod 2^right_bits (GCC 12 will not vectorise 1 << variable)
    // feistel_round_function(right, key, width): the mixer of (key << 32 | half), top `width` bits. Written out
    // round by round: GCC 12 does not vectorise this loop with an inner round loop left in it.
    auto round = [&](uint64_t round_key, uint64_t out_shift) {
      uint64_t v = (round_key | right) * 0x9E3779B97F4A7C15ull;
      v ^= v >> 32;
      v *= 0xD6E8FEB86659FD93ull;
      const uint64_t mixed = left ^ (v >> out_shift);
      left = right;
      right = mixed;
    };
    round(key[0][i], left_shift);
    round(key[1][i], right_shift);
    round(key[2][i], left_shift);
    round(key[3][i], right_shift);
    const uint64_t four = (left << right_bits) | right;
    if constexpr (all_wide) {
      value[i] = four;
      continue;
    }
    round(key[4][i], left_shift);
    round(key[5][i], right_shift);
    const uint64_t six = (left << right_bits) | right;
    value[i] = m >= static_cast<uint64_t>(kWideFeistelBits) ? four : six;
  }
}

#if defined(__AVX512F__) && defined(__AVX512DQ__)
// kInterleave vectors of eight lanes of the sample kernel, in lockstep: KeyedPermutation::network of each
// lane's epoch permutation, read from the group records with gathers (all fields of a lane lie in one cache
// line). A round is a chain of two 15-cycle multiplies; one vector at a time, the scheduler fills with waiting
// chains before the next vectors' independent work reaches it, so the vectors are interleaved in program order.
constexpr int kInterleave = 4;

struct SampleLanes {
  using Vectors = __m512i[kInterleave];
  using Masks = __mmask8[kInterleave];
  const long long* table;

  __m512i field(__mmask8 live, __m512i index) const {
    return _mm512_mask_i64gather_epi64(_mm512_setzero_si512(), live, index, table, 8);
  }

  // y[u] = the network's image of x[u]; `keys` holds the 64-bit word index of each lane's first key pair, `m`
  // its domain bits; only the lanes of `live` read memory.
  void network(const Masks live, const Vectors keys, const Vectors m, const Vectors x, Vectors y) const {
    const __m512i sixty_four = _mm512_set1_epi64(64);
    const __m512i mul0 = _mm512_set1_epi64(static_cast<long long>(0x9E3779B97F4A7C15ull));
    const __m512i mul1 = _mm512_set1_epi64(static_cast<long long>(0xD6E8FEB86659FD93ull));
    const __m512i high_word = _mm512_set1_epi64(static_cast<long long>(0xFFFFFFFF00000000ull));
    Vectors right_bits, left_shift, right_shift, left, right;
    __mmask8 any_narrow = 0;
    Masks narrow;
    for (int u = 0; u < kInterleave; ++u) {
      const __m512i half = _mm512_srli_epi64(m[u], 1);
      right_bits[u] = _mm512_sub_epi64(m[u], half);
      left_shift[u] = _mm512_sub_epi64(sixty_four, half);
      right_shift[u] = _mm512_sub_epi64(sixty_four, right_bits[u]);
      left[u] = _mm512_srlv_epi64(x[u], right_bits[u]);
      right[u] = _mm512_xor_si512(x[u], _mm512_sllv_epi64(left[u], right_bits[u]));
      narrow[u] = _mm512_mask_cmplt_epu64_mask(live[u], m[u], _mm512_set1_epi64(kWideFeistelBits));
      any_narrow |= narrow[u];
    }
    auto round = [&](const Vectors round_key, const Vectors out_shift) {
      for (int u = 0; u < kInterleave; ++u) {
        __m512i v = _mm512_mullo_epi64(_mm512_or_si512(round_key[u], right[u]), mul0);
        v = _mm512_xor_si512(v, _mm512_srli_epi64(v, 32));
        v = _mm512_mullo_epi64(v, mul1);
        const __m512i mixed = _mm512_xor_si512(left[u], _mm512_srlv_epi64(v, out_shift[u]));
        left[u] = right[u];
        right[u] = mixed;
      }
    };
    auto rounds = [&](const Masks mask, int pair) {
      Vectors even, odd;
      for (int u = 0; u < kInterleave; ++u) {
        const __m512i words = field(mask[u], _mm512_add_epi64(keys[u], _mm512_set1_epi64(pair)));
        even[u] = _mm512_slli_epi64(words, 32);
        odd[u] = _mm512_and_si512(words, high_word);
      }
      round(even, left_shift);
      round(odd, right_shift);
    };
    rounds(live, 0);
    rounds(live, 1);
    for (int u = 0; u < kInterleave; ++u) y[u] = _mm512_or_si512(_mm512_sllv_epi64(left[u], right_bits[u]), right[u]);
    // Narrow domains (m < kWideFeistelBits) take two more rounds; many blocks have none.
    if (any_narrow == 0) return;
    rounds(narrow, 2);
    for (int u = 0; u < kInterleave; ++u) {
      const __m512i six = _mm512_or_si512(_mm512_sllv_epi64(left[u], right_bits[u]), right[u]);
      y[u] = _mm512_mask_blend_epi64(narrow[u], y[u], six);
    }
  }
};

inline __mmask8 lanes_below(int count, int i0) {
  return count - i0 >= 8 ? 0xFF : count - i0 <= 0 ? 0 : static_cast<__mmask8>((1u << (count - i0)) - 1);
}

// KeyedPermutation::operator() for each lane: the network, then cycle walking. Lanes that land below their size
// are done; the others are compressed into a list that the next pass walks on, so a pass costs only the lanes
// still walking.
inline int sample_lanes_impl(const GroupPermutations* groups, const int32_t* group, const uint64_t* offset,
                             int count, int64_t* ids, int32_t* left_over) {
  constexpr int kWords = sizeof(GroupPermutations) / 8;
  constexpr int kKeysWord = offsetof(GroupPermutations, key_pairs) / 8;
  const SampleLanes lanes{reinterpret_cast<const long long*>(groups)};
  // The walk list is written a whole vector at a time (register compress, then a plain store): one vector of
  // slack past the last lane.
  alignas(64) long long walk_value[kPermutationLanes + 8], walk_keys[kPermutationLanes + 8];
  alignas(64) long long walk_lane[kPermutationLanes + 8];
  long long* out = reinterpret_cast<long long*>(ids);
  int walking = 0;
  int left = 0;
  const __m512i size_mask = _mm512_set1_epi64(static_cast<long long>(kSizeMask));
  const __m512i iota = _mm512_set_epi64(7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i keys_word = _mm512_set1_epi64(kKeysWord);
  for (int b0 = 0; b0 < count; b0 += 8 * kInterleave) {
    SampleLanes::Masks live, run;
    SampleLanes::Vectors word, n, m, x, keys, y;
    __mmask8 epoch_b[kInterleave];
    for (int u = 0; u < kInterleave; ++u) {
      const int i0 = b0 + 8 * u;
      live[u] = lanes_below(count, i0);
      const __m512i g = _mm512_cvtepi32_epi64(_mm256_maskz_loadu_epi32(live[u], group + i0));
      word[u] = _mm512_slli_epi64(g, 3);
      const __m512i size_bits = lanes.field(live[u], word[u]);
      n[u] = _mm512_and_si512(size_bits, size_mask);
      m[u] = _mm512_srli_epi64(size_bits, kSizeBitsShift);
      const __m512i o = _mm512_maskz_loadu_epi64(live[u], offset + i0);
      epoch_b[u] = _mm512_mask_cmpge_epu64_mask(live[u], o, n[u]);
      x[u] = _mm512_mask_sub_epi64(o, epoch_b[u], o, n[u]);
      const __mmask8 slow = _mm512_mask_cmpge_epu64_mask(live[u], x[u], n[u]);
      run[u] = live[u] & static_cast<__mmask8>(~slow);
      for (unsigned bits = slow; bits != 0; bits &= bits - 1) left_over[left++] = i0 + __builtin_ctz(bits);
      const __m512i first_keys = _mm512_add_epi64(word[u], keys_word);
      keys[u] = _mm512_mask_add_epi64(first_keys, epoch_b[u], first_keys, _mm512_set1_epi64(3));
    }
    lanes.network(run, keys, m, x, y);
    for (int u = 0; u < kInterleave; ++u) {
      const int i0 = b0 + 8 * u;
      const __mmask8 done = _mm512_mask_cmplt_epu64_mask(run[u], y[u], n[u]);
      const __m512i start = lanes.field(done, _mm512_add_epi64(word[u], _mm512_set1_epi64(1)));
      _mm512_mask_storeu_epi64(out + i0, done, _mm512_add_epi64(start, y[u]));
      const __mmask8 walk = run[u] & static_cast<__mmask8>(~done);
      if (walk != 0) {
        _mm512_storeu_si512(walk_value + walking, _mm512_maskz_compress_epi64(walk, y[u]));
        _mm512_storeu_si512(walk_keys + walking, _mm512_maskz_compress_epi64(walk, keys[u]));
        _mm512_storeu_si512(walk_lane + walking,
                            _mm512_maskz_compress_epi64(walk, _mm512_add_epi64(iota, _mm512_set1_epi64(i0))));
        walking += __builtin_popcount(walk);
      }
    }
  }
  while (walking > 0) {
    // Compressing in place is safe: the write position never passes the vectors just read.
    int still = 0;
    for (int b0 = 0; b0 < walking; b0 += 8 * kInterleave) {
      SampleLanes::Masks live;
      SampleLanes::Vectors word, n, m, x, keys, lane, y;
      for (int u = 0; u < kInterleave; ++u) {
        const int i0 = b0 + 8 * u;
        live[u] = lanes_below(walking, i0);
        x[u] = _mm512_maskz_loadu_epi64(live[u], walk_value + i0);
        keys[u] = _mm512_maskz_loadu_epi64(live[u], walk_keys + i0);
        lane[u] = _mm512_maskz_loadu_epi64(live[u], walk_lane + i0);
        word[u] = _mm512_andnot_si512(_mm512_set1_epi64(kWords - 1), keys[u]);
        const __m512i size_bits = lanes.field(live[u], word[u]);
        n[u] = _mm512_and_si512(size_bits, size_mask);
        m[u] = _mm512_srli_epi64(size_bits, kSizeBitsShift);
      }
      lanes.network(live, keys, m, x, y);
      for (int u = 0; u < kInterleave; ++u) {
        const __mmask8 done = _mm512_mask_cmplt_epu64_mask(live[u], y[u], n[u]);
        const __m512i start = lanes.field(done, _mm512_add_epi64(word[u], _mm512_set1_epi64(1)));
        _mm512_mask_i64scatter_epi64(out, done, lane[u], _mm512_add_epi64(start, y[u]), 8);
        const __mmask8 walk = live[u] & static_cast<__mmask8>(~done);
        if (walk != 0) {
          _mm512_storeu_si512(walk_value + still, _mm512_maskz_compress_epi64(walk, y[u]));
          _mm512_storeu_si512(walk_keys + still, _mm512_maskz_compress_epi64(walk, keys[u]));
          _mm512_storeu_si512(walk_lane + still, _mm512_maskz_compress_epi64(walk, lane[u]));
          still += __builtin_popcount(walk);
        }
      }
    }
    walking = still;
  }
  return left;
}
#else
// The same, written lane-wise for the compiler to vectorise: the lanes' fields are copied out of the records,
// the network runs on all lanes, and after each pass the lanes that landed below their size are done and the
// others are moved to the front, so a pass costs only the lanes still walking.
inline int sample_lanes_impl(const GroupPermutations* groups, const int32_t* group, const uint64_t* offset,
                             int count, int64_t* ids, int32_t* left_over) {
  constexpr int kLanes = kPermutationLanes;
  alignas(64) uint64_t value[kLanes], size[kLanes], bits[kLanes], key[kFeistelRounds][kLanes];
  int64_t start[kLanes];
  uint32_t lane[kLanes];
  int left = 0;
  bool all_wide = true;
  int lanes = 0;
  for (int i = 0; i < count; ++i) {
    const GroupPermutations& record = groups[group[i]];
    const uint64_t n = record.size_bits & kSizeMask;
    const bool epoch_b = offset[i] >= n;
    const uint64_t x = epoch_b ? offset[i] - n : offset[i];
    if (x >= n) {
      left_over[left++] = i;
      continue;
    }
    const uint64_t* pairs = record.key_pairs[epoch_b ? 1 : 0];
    value[lanes] = x;
    size[lanes] = n;
    bits[lanes] = record.size_bits >> kSizeBitsShift;
    for (int r = 0; r < kFeistelRounds / 2; ++r) {
      key[2 * r][lanes] = pairs[r] << 32;
      key[2 * r + 1][lanes] = pairs[r] & 0xFFFFFFFF00000000ull;
    }
    start[lanes] = record.start;
    lane[lanes] = static_cast<uint32_t>(i);
    all_wide = all_wide && bits[lanes] >= static_cast<uint64_t>(kWideFeistelBits);
    ++lanes;
  }
  while (lanes > 0) {
    if (all_wide) {
      network_lanes<true>(lanes, value, bits, key);
    } else {
      network_lanes<false>(lanes, value, bits, key);
    }
    int walking = 0;
    for (int i = 0; i < lanes; ++i) {
      if (value[i] < size[i]) {
        ids[lane[i]] = start[i] + static_cast<int64_t>(value[i]);
        continue;
      }
      value[walking] = value[i];
      size[walking] = size[i];
      bits[walking] = bits[i];
      for (int r = 0; r < kFeistelRounds; ++r) key[r][walking] = key[r][i];
      start[walking] = start[i];
      lane[walking] = lane[i];
      ++walking;
    }
    lanes = walking;
  }
  return left;
}
#endif

}  // namespace

#pragma GCC diagnostic pop
}  // namespace aioli_ext
