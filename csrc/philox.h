// Philox4x32-10 counter-based generator (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11),
// shared by the CPU and CUDA kernels so that a (key, counter) pair gives the same 128 bits on every device.
//
// A counter-based generator has no sequential state: every random number is a pure function of where it is
// used (seed, step, slot, ...). That is what makes the sampler resumable from any step and lets each GPU
// thread or CPU chunk draw its slots independently, in any order, with identical results.
#pragma once

#include <cstdint>

#include "macros.h"

namespace aioli_ext {

struct Philox4x32Value {
  uint32_t v[4];
};

namespace philox_detail {

constexpr uint32_t kMul0 = 0xD2511F53u;
constexpr uint32_t kMul1 = 0xCD9E8D57u;
// Weyl increments of the key schedule (golden ratio and sqrt(3) - 1, as 32-bit fractions).
constexpr uint32_t kBump0 = 0x9E3779B9u;
constexpr uint32_t kBump1 = 0xBB67AE85u;

AIOLI_HOST_DEVICE void mul_hi_lo(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
  const uint64_t product = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(product >> 32);
  *lo = static_cast<uint32_t>(product);
}

}  // namespace philox_detail

// Ten rounds of the Philox 4x32 bijection of `counter` under `key`; matches Random123's philox4x32_R(10, ...).
AIOLI_HOST_DEVICE Philox4x32Value philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                                                uint32_t k1) {
  using namespace philox_detail;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    if (round > 0) {
      k0 += kBump0;
      k1 += kBump1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    mul_hi_lo(kMul0, c0, &hi0, &lo0);
    mul_hi_lo(kMul1, c2, &hi1, &lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  return Philox4x32Value{{c0, c1, c2, c3}};
}

}  // namespace aioli_ext
