// Vectorised pieces of the mixture sampler, compiled once per ISA (mixture_draw_default.cpp,
// mixture_draw_avx2.cpp, mixture_draw_avx512.cpp) and picked at run time from cpu_capability(): the sample ids of
// blocks of slots (keyed permutations, below) and the round-0 slot random words.
//
// Why a Philox kernel of its own: one Philox4x32-10 call per slot pair is a large per-slot cost of the i.i.d.
// draws when evaluated one call at a time (ten dependent rounds of two 32x32->64 multiplies). Evaluated for a
// block of consecutive pairs in structure-of-arrays form, the rounds vectorise (vpmuludq): the same bits as
// mixture::slot_pair_random, several pairs per instruction.
#pragma once

#include <cstdint>

#include "permutation.h"

namespace aioli_ext {

// ---- Sample ids of a block of slots ---------------------------------------------------------------------------
// After the group draws and ranks, every slot evaluates the Feistel network of its own group's epoch permutation
// (KeyedPermutation in permutation.h): four or six rounds of two 64-bit multiplies each, plus cycle walking.
// Scalar, that is the largest per-slot cost left; lane-wise over a block of slots (one lane per slot, each lane
// with its own keys and widths) it vectorises (vpmullq, vpsrlvq), same bits. Everything a lane reads about its
// group is in one cache line (GroupPermutations), which the kernel reads itself (gathers on AVX-512), so the
// caller writes only one offset per slot.

// Lanes per kernel call. Cycle walking ends in a few passes over ever fewer lanes, each as slow as a full pass
// (a chain of dependent multiplies); a long block spreads that tail over many lanes.
constexpr int kPermutationLanes = 512;
// size_bits = n | m << kSizeBitsShift; groups of 2^kSizeBitsShift samples or more are left to the caller.
constexpr int kSizeBitsShift = 58;
constexpr uint64_t kSizeMask = (uint64_t{1} << kSizeBitsShift) - 1;

// The permutations of two consecutive epochs of one group: A, the epoch that holds the group's cursor when the
// call starts, and B, the next one (filled only when the call reaches it). A slot's offset o counts from the
// start of epoch A: o < n is position o of A, n <= o < 2n is position o - n of B.
struct alignas(64) GroupPermutations {
  uint64_t size_bits;      // n | m << kSizeBitsShift (m: the network's domain is [0, 2^m)), or 0 when the lane
                           // kernel does not evaluate the group (n <= kSmallPermutationSize or n >= 2^58)
  int64_t start;           // first flat index of the group
  uint64_t key_pairs[2][3];  // epoch A, B: round keys 2r (low word) and 2r + 1 (high word) in pair r
};
static_assert(sizeof(GroupPermutations) == 64, "one cache line per group");

// ids[i] = start + perm(offset[i]) for the slots i < count (<= kPermutationLanes) of groups group[i], where perm
// is the epoch A or B permutation of the group's record in `groups`. The slots it leaves to the caller
// (size_bits == 0, or an offset past epoch B; their ids[i] are not written) go to left_over[], in increasing
// order; returns how many.
using SampleLanesKernel = int (*)(const GroupPermutations* groups, const int32_t* group, const uint64_t* offset,
                                  int count, int64_t* ids, int32_t* left_over);

int sample_lanes_default(const GroupPermutations* groups, const int32_t* group, const uint64_t* offset, int count,
                         int64_t* ids, int32_t* left_over);
int sample_lanes_avx2(const GroupPermutations* groups, const int32_t* group, const uint64_t* offset, int count,
                      int64_t* ids, int32_t* left_over);
int sample_lanes_avx512(const GroupPermutations* groups, const int32_t* group, const uint64_t* offset, int count,
                        int64_t* ids, int32_t* left_over);

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
