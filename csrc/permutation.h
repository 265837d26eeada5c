// A keyed pseudo-random bijection of [0, n) for any n <= 2^62, evaluated point by point (host and device).
//
// Shuffling a group of 2^40 samples cannot be materialised; instead position p of an epoch maps to sample
// perm(p). Two constructions, both keyed by four 32-bit words (one Philox call per (seed, group, epoch), made by
// the caller):
//
// * n > kSmallPermutationSize: a Feistel network (six rounds; four from m = 10 on) on the smallest power-of-two
//   domain [0, 2^m) that holds n, made a bijection of [0, n) by cycle walking (apply the network until the
//   value lands below n).
//   Walk length: the network permutes [0, 2^m), so over one epoch (all n starting points) the walks visit every
//   point of the domain exactly once: the mean walk is exactly 2^m / n < 2 network evaluations (a power-of-4
//   domain would give < 4). Single walks can be longer (geometric tail), never unbounded.
//   The halves are unbalanced when m is odd (left floor(m/2) bits, right ceil(m/2) bits); a round maps
//   (L, R) -> (R, L xor F(R)), which swaps the widths, so after an even number of rounds the widths are back.
//   Each round is a bijection whatever F is, so the composition is one. F is a multiply-xorshift mixer of
//   (round key, R): two 64-bit multiplies, far cheaper than a Philox call. Four rounds (the Luby-Rackoff
//   minimum) leave pair correlations a chi-square test detects at n of a few dozen, six do not; from
//   2^10-element domains on, four rounds pass the same tests, so wide domains use four.
// * n <= kSmallPermutationSize: tiny domains are where Feistel networks are weakest (they cannot reach all
//   orders), so the permutation is an exact Fisher-Yates shuffle whose swap choices are the mixed-radix digits
//   of two 64-bit key words (each digit costs one multiply; the bias is below 2^-31).
#pragma once

#include <cstdint>

#include "macros.h"

namespace aioli_ext {

constexpr int kFeistelRounds = 6;
// From 2^10-element domains on, four rounds (the Luby-Rackoff minimum) already pass the pair tests; they save a
// third of the permutation's cost where it matters (large groups are drawn most).
constexpr int kWideFeistelRounds = 4;
constexpr int kWideFeistelBits = 10;
constexpr uint64_t kSmallPermutationSize = 20;

AIOLI_HOST_DEVICE int bit_width_u64(uint64_t x) {
#if defined(__CUDA_ARCH__)
  return x == 0 ? 0 : 64 - __clzll(static_cast<long long>(x));
#else
  return x == 0 ? 0 : 64 - __builtin_clzll(x);
#endif
}

AIOLI_HOST_DEVICE uint64_t mul_hi_u64(uint64_t a, uint64_t b) {
#if defined(__CUDA_ARCH__)
  return __umul64hi(a, b);
#else
  return static_cast<uint64_t>((static_cast<unsigned __int128>(a) * b) >> 64);
#endif
}

// 64 -> 64-bit mixer with full avalanche (used for round functions and to stretch key words).
AIOLI_HOST_DEVICE uint64_t mix_u64(uint64_t v) {
  v *= 0x9E3779B97F4A7C15ull;
  // Multiplication only carries low bits upwards; the shift brings the well-mixed high half back down so the
  // second multiply spreads every input bit into the top bits.
  v ^= v >> 32;
  v *= 0xD6E8FEB86659FD93ull;
  return v;
}

// Round function: `half` has at most 31 bits, so (key, half) packs into one 64-bit word without collisions.
// Returns `out_bits` (0..31) bits taken from the top of the mixed word, where the multiplies mix best.
AIOLI_HOST_DEVICE uint64_t feistel_round_function(uint64_t half, uint32_t key, int out_bits) {
  const uint64_t v = mix_u64((static_cast<uint64_t>(key) << 32) | half);
  return out_bits == 0 ? 0 : (v >> (64 - out_bits));
}

struct KeyedPermutation {
  uint64_t size;        // n: the permutation is of [0, n)
  int left_bits;        // floor(m / 2)
  int right_bits;       // ceil(m / 2), m = bit width of n - 1
  uint32_t keys[kFeistelRounds];

  // The network on [0, 2^m), `rounds` rounds (even).
  template <int rounds>
  AIOLI_HOST_DEVICE uint64_t network_rounds(uint64_t x) const {
    int wl = left_bits, wr = right_bits;
    uint64_t left = x >> wr;
    uint64_t right = x & ((uint64_t{1} << wr) - 1);
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int round = 0; round < rounds; ++round) {
      const uint64_t mixed = left ^ feistel_round_function(right, keys[round], wl);
      left = right;
      right = mixed;
      const int w = wl;
      wl = wr;
      wr = w;
    }
    return (left << wr) | right;
  }

  AIOLI_HOST_DEVICE uint64_t network(uint64_t x) const {
    return left_bits + right_bits >= kWideFeistelBits ? network_rounds<kWideFeistelRounds>(x)
                                                      : network_rounds<kFeistelRounds>(x);
  }

  // Fisher-Yates for n <= kSmallPermutationSize: swap i with digit j in [0, i] for i = n-1 .. 1. The digits of
  // radix > 12 come from one key word, the others from a second, so neither word spends more than 33 bits.
  AIOLI_HOST_DEVICE uint64_t small(uint64_t x) const {
    uint8_t order[kSmallPermutationSize];
    for (uint64_t i = 0; i < size; ++i) order[i] = static_cast<uint8_t>(i);
    uint64_t high_radix_bits = keys[0] | (static_cast<uint64_t>(keys[1]) << 32);
    uint64_t low_radix_bits = keys[2] | (static_cast<uint64_t>(keys[3]) << 32);
    for (uint64_t i = size - 1; i >= 1; --i) {
      uint64_t& bits = i >= 12 ? high_radix_bits : low_radix_bits;
      const uint64_t j = mul_hi_u64(bits, i + 1);
      bits *= i + 1;  // the fraction left after taking the digit (exact modulo 2^64)
      const uint8_t t = order[i];
      order[i] = order[j];
      order[j] = t;
    }
    return order[x];
  }

  // Image of x in [0, n).
  AIOLI_HOST_DEVICE uint64_t operator()(uint64_t x) const {
    if (size <= kSmallPermutationSize) return size <= 1 ? 0 : small(x);
    do {
      x = network(x);
    } while (x >= size);
    return x;
  }
};

AIOLI_HOST_DEVICE KeyedPermutation make_keyed_permutation(uint64_t n, uint32_t k0, uint32_t k1, uint32_t k2,
                                                          uint32_t k3) {
  KeyedPermutation p;
  p.size = n;
  const int m = n <= 1 ? 0 : bit_width_u64(n - 1);
  p.left_bits = m / 2;
  p.right_bits = m - m / 2;
  p.keys[0] = k0;
  p.keys[1] = k1;
  p.keys[2] = k2;
  p.keys[3] = k3;
  // Rounds five and six need two more words; any distinct values work since F itself is a full mixer.
  const uint64_t extra = mix_u64((static_cast<uint64_t>(k0 ^ k2) << 32) | (k1 ^ k3 ^ 0x2545F491u));
  p.keys[4] = static_cast<uint32_t>(extra >> 32);
  p.keys[5] = static_cast<uint32_t>(extra);
  return p;
}

}  // namespace aioli_ext
