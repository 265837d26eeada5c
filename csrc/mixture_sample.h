// Per-slot logic of the mixture sampler, shared by the CPU and CUDA kernels (host/device).
//
// One call draws a global batch of B slots at step `step`:
//   1. a group per slot: i.i.d. from fixed-point cumulative thresholds (mode "iid"), or from a systematic
//      allocation of per-group slot counts laid out in a keyed random slot order (mode "systematic");
//   2. the k-th slot (in slot order) that lands in group g takes position cursor[g] + k of g's stream;
//   3. stream position p of group g is sample perm_{g, p / size}(p % size): one keyed permutation per epoch.
// Every random number is a Philox function of (seed, step, slot) or (seed, group, epoch), never of a
// sequential state, so the CPU and the GPU, and any split of the batch over threads or ranks, agree bit for bit.
//
// Counter layout (four 32-bit words; the key is the 64-bit seed). The second word tells the uses apart, so no
// two uses ever share a counter:
//   group draws      {slot / 2, round (< 2^30), step lo, step hi}   (one call serves two slots)
//   slot order       {0, kTagSlotOrder, step lo, step hi}
//   group epoch perm {group, kTagPermutation, epoch lo, epoch hi}
#pragma once

#include <cstdint>

#include "macros.h"
#include "permutation.h"
#include "philox.h"

namespace aioli_ext {
namespace mixture {

constexpr uint32_t kTagSlotOrder = 0x40000000u;
constexpr uint32_t kTagPermutation = 0x80000000u;
// Redraw rounds (max_epochs) are numbered from 1; each one closes at least one group, so K + 1 bounds them.
constexpr int64_t kMaxRounds = int64_t{1} << 30;

// Proportions become integer weights that sum to exactly 2^62: integer arithmetic on them is identical on
// every device, and 2^62 leaves room for sums of two weights without overflow in int64.
constexpr int kThresholdBits = 62;
constexpr uint64_t kThresholdTotal = uint64_t{1} << kThresholdBits;
// Systematic residuals count slots in units of 2^-32.
constexpr int kResidualFractionBits = 32;

AIOLI_HOST_DEVICE uint32_t lo32(uint64_t x) { return static_cast<uint32_t>(x); }
AIOLI_HOST_DEVICE uint32_t hi32(uint64_t x) { return static_cast<uint32_t>(x >> 32); }

// 64 random bits for each of the slots 2 * pair and 2 * pair + 1 in draw round `round` of step `step`.
struct SlotPairRandom {
  uint64_t even;
  uint64_t odd;
};

AIOLI_HOST_DEVICE SlotPairRandom slot_pair_random(uint64_t seed, uint64_t step, uint32_t round, uint64_t pair) {
  const Philox4x32Value r =
      philox4x32_10(lo32(pair), round, lo32(step), hi32(step), lo32(seed), hi32(seed));
  return SlotPairRandom{r.v[0] | (static_cast<uint64_t>(r.v[1]) << 32),
                        r.v[2] | (static_cast<uint64_t>(r.v[3]) << 32)};
}

AIOLI_HOST_DEVICE uint64_t slot_random(uint64_t seed, uint64_t step, uint32_t round, uint64_t slot) {
  const SlotPairRandom r = slot_pair_random(seed, step, round, slot >> 1);
  return (slot & 1) ? r.odd : r.even;
}

// The permutation that orders the slots of a systematic batch (so rank slices each get a mix of groups).
AIOLI_HOST_DEVICE KeyedPermutation slot_order_permutation(uint64_t seed, uint64_t step, uint64_t batch_size) {
  const Philox4x32Value r = philox4x32_10(0u, kTagSlotOrder, lo32(step), hi32(step), lo32(seed), hi32(seed));
  return make_keyed_permutation(batch_size, r.v[0], r.v[1], r.v[2], r.v[3]);
}

// The permutation of group `group`'s `size` samples in epoch `epoch`.
AIOLI_HOST_DEVICE KeyedPermutation group_epoch_permutation(uint64_t seed, uint64_t group, uint64_t epoch,
                                                           uint64_t size) {
  const Philox4x32Value r =
      philox4x32_10(lo32(group), kTagPermutation, lo32(epoch), hi32(epoch), lo32(seed), hi32(seed));
  return make_keyed_permutation(size, r.v[0], r.v[1], r.v[2], r.v[3]);
}

// First g in [lo, hi] with cumulative[g + 1] > value, for a non-decreasing table whose entry hi + 1 exceeds
// value. Groups with zero weight (cumulative[g + 1] == cumulative[g]) can never be returned.
AIOLI_HOST_DEVICE int64_t find_group(const int64_t* cumulative, int64_t lo, int64_t hi, uint64_t value) {
  // Written as selects rather than branches: the comparisons are data-dependent coin flips that a branch
  // predictor would get wrong half the time.
  while (lo < hi) {
    const int64_t mid = lo + ((hi - lo) >> 1);
    const bool above = static_cast<uint64_t>(cumulative[mid + 1]) > value;
    hi = above ? mid : hi;
    lo = above ? lo : mid + 1;
  }
  return lo;
}

// Scaling 64 uniform bits by the table total keeps the draw exact integer arithmetic; for the 2^62 tables
// of round 0 it is a plain shift. The value then falls in exactly one group's interval.
AIOLI_HOST_DEVICE uint64_t threshold_value(uint64_t random_bits, const int64_t* cumulative, int64_t num_groups) {
  return mul_hi_u64(random_bits, static_cast<uint64_t>(cumulative[num_groups]));
}

// The guide table (bucket b of [0, 2^62) -> first group that can hold a value of that bucket) turns the search
// into O(1) expected steps for any K; redraw rounds pass guide == nullptr and search the whole table.
AIOLI_HOST_DEVICE int64_t group_of_value(uint64_t value, const int64_t* cumulative, int64_t num_groups,
                                         const int32_t* guide, int guide_shift) {
  if (guide != nullptr) {
    const uint64_t bucket = value >> guide_shift;
    return find_group(cumulative, guide[bucket], guide[bucket + 1], value);
  }
  return find_group(cumulative, 0, num_groups - 1, value);
}

AIOLI_HOST_DEVICE int64_t draw_group(uint64_t random_bits, const int64_t* cumulative, int64_t num_groups,
                                     const int32_t* guide, int guide_shift) {
  return group_of_value(threshold_value(random_bits, cumulative, num_groups), cumulative, num_groups, guide,
                        guide_shift);
}

// Offset inside the group's index range of stream position `position` of a group with `size` samples.
AIOLI_HOST_DEVICE uint64_t group_stream_offset(uint64_t seed, uint64_t group, uint64_t size, uint64_t position) {
  const uint64_t epoch = position / size;
  const KeyedPermutation perm = group_epoch_permutation(seed, group, epoch, size);
  return perm(position - epoch * size);
}

}  // namespace mixture
}  // namespace aioli_ext
