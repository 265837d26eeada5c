// Body of the per-ISA slot random kernels (see mixture_draw_kernel.h); included by exactly one translation unit
// per ISA, which the build compiles with that ISA's flags.
#pragma once

#include <cstdint>
#include <cstring>

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
// (selects, no branches) so that the compiler vectorises it: every lane runs six rounds and keeps the result
// after four (m >= kWideFeistelBits) or six.
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
    round(key[4][i], left_shift);
    round(key[5][i], right_shift);
    const uint64_t six = (left << right_bits) | right;
    value[i] = m >= static_cast<uint64_t>(kWideFeistelBits) ? four : six;
  }
}

// KeyedPermutation::operator() for each lane: the network, then cycle walking. After each pass the lanes that
// landed below their size are done and the others are moved to the front, so a pass costs only the lanes still
// walking (a fixed-width walk would run every lane until the slowest of the block had landed).
inline void permutation_lanes_impl(PermutationLanes& lanes, int count) {
  constexpr int kLanes = kPermutationLanes;
  alignas(64) uint64_t value[kLanes], size[kLanes], bits[kLanes], key[6][kLanes];
  std::memcpy(value, lanes.value, sizeof(value));
  std::memcpy(size, lanes.size, sizeof(size));
  std::memcpy(bits, lanes.bits, sizeof(bits));
  std::memcpy(key, lanes.key, sizeof(key));
  uint32_t* lane = lanes.lane;
  for (int i = 0; i < count; ++i) lane[i] = static_cast<uint32_t>(i);
  while (count > 0) {
    network_lanes(count, value, bits, key);
    int walking = 0;
    for (int i = 0; i < count; ++i) {
      if (value[i] < size[i]) {
        lanes.value[lane[i]] = value[i];
        continue;
      }
      value[walking] = value[i];
      size[walking] = size[i];
      bits[walking] = bits[i];
      for (int r = 0; r < 6; ++r) key[r][walking] = key[r][i];
      lane[walking] = lane[i];
      ++walking;
    }
    count = walking;
  }
}

}  // namespace

#pragma GCC diagnostic pop
}  // namespace aioli_ext
