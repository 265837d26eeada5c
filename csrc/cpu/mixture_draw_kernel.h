// Round-0 slot random words of the mixture sampler, compiled once per ISA (mixture_draw_default.cpp,
// mixture_draw_avx2.cpp, mixture_draw_avx512.cpp) and picked at run time from cpu_capability().
//
// Why a kernel of its own: one Philox4x32-10 call per slot pair is the largest per-slot cost of the i.i.d.
// draws when evaluated one call at a time (ten dependent rounds of two 32x32->64 multiplies). Evaluated for a
// block of consecutive pairs in structure-of-arrays form, the rounds vectorise (vpmuludq): the same bits as
// mixture::slot_pair_random, several pairs per instruction.
#pragma once

#include <cstdint>

namespace aioli_ext {

// ---- Keyed permutations of many groups at once ----------------------------------------------------------------
// After the group draws, every slot evaluates the Feistel network of its own group's epoch permutation
// (KeyedPermutation in permutation.h): four or six rounds of two 64-bit multiplies each, plus cycle walking.
// Scalar, that is the largest per-slot cost left; lane-wise over a block of slots (structure of arrays, one
// lane per slot, each lane with its own keys and widths) it vectorises (vpmullq, vpsrlvq), same bits.

constexpr int kPermutationLanes = 64;

struct alignas(64) PermutationLanes {
  uint64_t value[kPermutationLanes];     // in: offset in [0, size); out: its image
  uint64_t size[kPermutationLanes];      // n of the lane's permutation (> kSmallPermutationSize)
  uint64_t bits[kPermutationLanes];      // m = left_bits + right_bits: the network's domain is [0, 2^m)
  uint64_t key[6][kPermutationLanes];    // round keys, shifted into the high word as the round function uses
  uint32_t lane[kPermutationLanes];      // scratch: the kernel's compacted lane order
};

// lanes.value[i] = the image of lanes.value[i] under lane i's permutation, for i < count (<= kPermutationLanes).
using PermutationLanesKernel = void (*)(PermutationLanes& lanes, int count);

void permutation_lanes_default(PermutationLanes& lanes, int count);
void permutation_lanes_avx2(PermutationLanes& lanes, int count);
void permutation_lanes_avx512(PermutationLanes& lanes, int count);

// ---- Round-0 slot random words --------------------------------------------------------------------------------

// The most pairs one call fills.
constexpr int kSlotRandomBlockPairs = 64;

// out[2 i] and out[2 i + 1] = the 64-bit random words of slots 2 (first_pair + i) and 2 (first_pair + i) + 1 in
// draw round `round` of step `step` (mixture::slot_pair_random), for i in [0, pairs), pairs <= the block size.
using SlotRandomPairsKernel = void (*)(uint64_t seed, uint64_t step, uint32_t round, uint64_t first_pair,
                                       int pairs, uint64_t* out);

void slot_random_pairs_default(uint64_t seed, uint64_t step, uint32_t round, uint64_t first_pair, int pairs,
                               uint64_t* out);
void slot_random_pairs_avx2(uint64_t seed, uint64_t step, uint32_t round, uint64_t first_pair, int pairs,
                            uint64_t* out);
void slot_random_pairs_avx512(uint64_t seed, uint64_t step, uint32_t round, uint64_t first_pair, int pairs,
                              uint64_t* out);

}  // namespace aioli_ext
