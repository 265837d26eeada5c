// Host-side pieces of the mixture sampler that both backends run on the CPU, in this one implementation:
// argument checks, the systematic allocation (O(K) integer arithmetic on the residual state) and the redraw
// rounds for groups that reach their max_epochs capacity inside a call. Keeping them on the host, in the same
// code for both backends, is what makes CPU and CUDA results bit-identical without duplicating the logic.
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <optional>
#include <utility>
#include <vector>

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "checks.h"
#include "mixture_sample.h"

namespace aioli_ext {
namespace mixture {

constexpr int64_t kMaxBatchSize = (int64_t{1} << 31) - 1;
constexpr int64_t kMaxGroups = (int64_t{1} << 30) - 1;

struct SampleShape {
  int64_t num_groups;
  int64_t batch_size;
  int64_t slice_begin;  // this rank's slots are [slice_begin, slice_end) of the global batch
  int64_t slice_end;
  int guide_shift;      // bucket of a 62-bit threshold value = value >> guide_shift
  bool systematic;
  bool capped;
  bool csr;
};

inline void check_index_tensor(const at::Tensor& t, const char* name, int64_t length, const at::Tensor& like,
                               const char* like_name) {
  check_dtype(t, name, {at::kLong}, "int64");
  check_dim(t, name, 1, "");
  TORCH_CHECK(length < 0 || t.size(0) == length, name, " must have ", length, " entries, got ", t.size(0));
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  check_same_device(t, name, like, like_name);
}

inline SampleShape check_sample_args(const at::Tensor& group_ranges, const std::optional<at::Tensor>& csr_sample_ids,
                                     const at::Tensor& cumulative, const at::Tensor& guide,
                                     const at::Tensor& cursor, const std::optional<at::Tensor>& residual,
                                     const std::optional<at::Tensor>& capacity, int64_t step,
                                     int64_t batch_size, int64_t rank, int64_t world_size,
                                     bool tables_may_be_on_host = false) {
  check_dtype(group_ranges, "group_ranges", {at::kLong}, "int64");
  TORCH_CHECK(group_ranges.dim() == 2 && group_ranges.size(1) == 2,
              "group_ranges must have shape [K, 2] (start, size per group), got ", group_ranges.sizes());
  TORCH_CHECK(group_ranges.is_contiguous(), "group_ranges must be contiguous");
  const at::Tensor& group_starts = group_ranges;
  const int64_t num_groups = group_ranges.size(0);
  TORCH_CHECK(num_groups >= 1 && num_groups <= kMaxGroups, "group_ranges must have between 1 and ", kMaxGroups,
              " rows (one per group), got ", num_groups);
  if (csr_sample_ids.has_value()) {
    check_index_tensor(*csr_sample_ids, "csr_sample_ids", -1, group_starts, "group_ranges");
  }
  // The CUDA kernel also takes CPU tables: the systematic allocation reads them on the host.
  const bool tables_on_host = tables_may_be_on_host && cumulative.device().is_cpu() && guide.device().is_cpu();
  check_index_tensor(cumulative, "cumulative", num_groups + 1, tables_on_host ? cumulative : group_starts,
                     "group_ranges");
  check_dtype(guide, "guide", {at::kInt}, "int32");
  check_dim(guide, "guide", 1, "[buckets + 1]");
  if (!tables_on_host) check_same_device(guide, "guide", group_starts, "group_ranges");
  TORCH_CHECK(guide.is_contiguous(), "guide must be contiguous");
  const int64_t buckets = guide.size(0) - 1;
  TORCH_CHECK(buckets >= 1 && (buckets & (buckets - 1)) == 0 && buckets >= num_groups &&
                  buckets <= (int64_t{1} << 40),
              "guide must have a power-of-two number of buckets >= the number of groups, plus one entry (as "
              "made by mixture_thresholds), got ", guide.size(0), " entries for ", num_groups, " groups");
  check_index_tensor(cursor, "cursor", num_groups, group_starts, "group_ranges");
  if (residual.has_value()) {
    check_dtype(*residual, "residual", {at::kLong}, "int64");
    check_dim(*residual, "residual", 1, "[K]");
    TORCH_CHECK(residual->size(0) == num_groups, "residual must have ", num_groups, " entries, got ",
                residual->size(0));
    TORCH_CHECK(residual->device().is_cpu(), "residual must be a CPU tensor (the systematic allocation runs on "
                "the host), got ", residual->device());
    TORCH_CHECK(residual->is_contiguous(), "residual must be contiguous");
  }
  if (capacity.has_value()) {
    check_index_tensor(*capacity, "capacity", num_groups, group_starts, "group_ranges");
  }
  TORCH_CHECK(step >= 0, "step must be >= 0, got ", step);
  TORCH_CHECK(batch_size >= 1, "batch_size must be >= 1, got ", batch_size);
  TORCH_CHECK(batch_size <= kMaxBatchSize, "batch_size must be < 2^31, got ", batch_size);
  TORCH_CHECK(world_size >= 1, "world_size must be >= 1, got ", world_size);
  TORCH_CHECK(batch_size % world_size == 0, "batch_size (", batch_size, ") must be divisible by world_size (",
              world_size, ")");
  TORCH_CHECK(rank >= 0 && rank < world_size, "rank must be in [0, world_size=", world_size, "), got ", rank);
  int log2_buckets = 0;
  while ((int64_t{1} << log2_buckets) < buckets) ++log2_buckets;
  const int64_t per_rank = batch_size / world_size;
  return SampleShape{num_groups,
                     batch_size,
                     rank * per_rank,
                     (rank + 1) * per_rank,
                     kThresholdBits - log2_buckets,
                     residual.has_value(),
                     capacity.has_value(),
                     csr_sample_ids.has_value()};
}

// Checks of the out= variant's caller-owned outputs, run before anything is written or advanced (a refused call
// leaves the sampler state as it was). Each output must be exactly [batch_size / world_size] int64, contiguous,
// on the index's device: they are written in place, never resized, so a buffer reused across steps keeps its
// pages (the point of the variant). They may share memory neither with each other nor with any input, since
// the kernels read the inputs while threads write outputs in no fixed order.
inline void check_sample_outputs(const at::Tensor& sample_ids, const at::Tensor& group_ids, const SampleShape& shape,
                                 const at::Tensor& group_ranges, const std::optional<at::Tensor>& csr_sample_ids,
                                 const at::Tensor& cumulative, const at::Tensor& guide, const at::Tensor& cursor,
                                 const std::optional<at::Tensor>& residual,
                                 const std::optional<at::Tensor>& capacity) {
  const std::pair<const at::Tensor*, const char*> inputs[] = {
      {&group_ranges, "group_ranges"},
      {csr_sample_ids ? &*csr_sample_ids : nullptr, "csr_sample_ids"},
      {&cumulative, "cumulative"},
      {&guide, "guide"},
      {&cursor, "cursor"},
      {residual ? &*residual : nullptr, "residual"},
      {capacity ? &*capacity : nullptr, "capacity"}};
  const int64_t per_rank = shape.slice_end - shape.slice_begin;
  const std::pair<const at::Tensor*, const char*> outputs[] = {{&sample_ids, "sample_ids"},
                                                               {&group_ids, "group_ids"}};
  for (const auto& [out, name] : outputs) {
    check_dtype(*out, name, {at::kLong}, "int64");
    TORCH_CHECK(out->dim() == 1 && out->size(0) == per_rank, name, " must have shape [batch_size / world_size] = [",
                per_rank, "], got ", out->sizes());
    TORCH_CHECK(out->is_contiguous(), name, " must be contiguous");
    check_same_device(*out, name, group_ranges, "group_ranges");
    for (const auto& [input, input_name] : inputs) {
      if (input == nullptr) continue;
      TORCH_CHECK(at::get_overlap_status(*out, *input) == at::MemOverlapStatus::No, name,
                  " must not share memory with ", input_name);
    }
  }
  TORCH_CHECK(at::get_overlap_status(sample_ids, group_ids) == at::MemOverlapStatus::No,
              "sample_ids and group_ids must not share memory");
}

// Systematic allocation of `batch_size` slots over the groups, carrying the fractional residual
// r_g = (slots owed to g so far) - (slots given to g so far), in units of 2^-32 slot, from call to call.
//
// This call owes group g the amount x_g = r_g + B * p_g. Every group with positive weight first gets floor(x_g),
// then the D slots left go to the groups with the largest fractional parts (ties to the lower group id): the
// largest-remainder rule. When each positive weight gives at least one slot's worth (B * p_g >= 1) and the set of
// groups with positive weight is fixed, x_g > 0 always, sum(x_g) = B exactly and D = sum of fractions, so every
// group gets floor or ceil of x_g and |r_g| < 1 after every call: cumulative counts stay within +-1 of
// sum(B * p). Groups with zero weight are never given a slot; their residual is kept as it is (frozen) until
// their weight is positive again. When those conditions are broken, D may be negative or exceed the groups
// with a fraction: the rule then still hands out exactly B slots (a deterministic round-robin in the same
// orders), and the bound may be exceeded for that call.
//
// cumulative: K + 1 fixed-point thresholds summing to 2^62. residual: K entries, updated in place.
// slot_counts_cumulative: K + 1 entries out, the exclusive prefix sum of the slot counts (last entry = B).
inline void systematic_allocate(const int64_t* cumulative, int64_t num_groups, int64_t batch_size,
                                int64_t* residual, int64_t* slot_counts_cumulative) {
  const uint64_t fraction_mask = (uint64_t{1} << kResidualFractionBits) - 1;
  std::vector<int64_t> owed(num_groups, 0);
  std::vector<int64_t> counts(num_groups, 0);
  std::vector<uint64_t> order_keys;
  // Owed amounts are differences of a scaled cumulative table, so they sum to exactly B (in 2^-32 units).
  const int shift = kThresholdBits - kResidualFractionBits;
  int64_t previous_scaled = 0;
  int64_t floor_total = 0;
  int64_t eligible = 0;
  for (int64_t g = 0; g < num_groups; ++g) {
    const int64_t scaled = static_cast<int64_t>(
        (static_cast<unsigned __int128>(batch_size) * static_cast<uint64_t>(cumulative[g + 1])) >> shift);
    const int64_t share = scaled - previous_scaled;
    previous_scaled = scaled;
    if (cumulative[g + 1] == cumulative[g]) continue;
    ++eligible;
    owed[g] = residual[g] + share;
    counts[g] = owed[g] >= 0 ? (owed[g] >> kResidualFractionBits) : 0;
    floor_total += counts[g];
  }
  // Fraction of a group that cannot take a slot now (owed < 0) is treated as 0: it is ahead already.
  auto fraction_of = [&](int64_t g) -> uint64_t {
    return owed[g] >= 0 ? (static_cast<uint64_t>(owed[g]) & fraction_mask) : 0;
  };
  int64_t left = batch_size - floor_total;
  if (left > 0) {
    // Key = (fraction, ~group): sorting keys in decreasing order is (fraction desc, group asc).
    order_keys.reserve(eligible);
    for (int64_t g = 0; g < num_groups; ++g) {
      if (cumulative[g + 1] == cumulative[g]) continue;
      order_keys.push_back((fraction_of(g) << 32) | (0xFFFFFFFFull - static_cast<uint64_t>(g)));
    }
    const int64_t each = left / eligible;
    const int64_t extra = left % eligible;
    if (each > 0) {
      for (int64_t g = 0; g < num_groups; ++g) {
        if (cumulative[g + 1] != cumulative[g]) counts[g] += each;
      }
    }
    if (extra > 0) {
      std::nth_element(order_keys.begin(), order_keys.begin() + (extra - 1), order_keys.end(),
                       std::greater<uint64_t>());
      for (int64_t i = 0; i < extra; ++i) {
        counts[0xFFFFFFFFll - static_cast<int64_t>(order_keys[i] & 0xFFFFFFFFull)] += 1;
      }
    }
  } else if (left < 0) {
    // More whole slots are owed than there are: take them back from the smallest fractions first, one per group
    // per pass. Key = (~fraction, ~group): decreasing order is (fraction asc, group asc).
    for (int64_t g = 0; g < num_groups; ++g) {
      if (counts[g] > 0) {
        order_keys.push_back(((fraction_mask - fraction_of(g)) << 32) |
                             (0xFFFFFFFFull - static_cast<uint64_t>(g)));
      }
    }
    std::sort(order_keys.begin(), order_keys.end(), std::greater<uint64_t>());
    while (left < 0) {
      for (uint64_t key : order_keys) {
        const int64_t g = 0xFFFFFFFFll - static_cast<int64_t>(key & 0xFFFFFFFFull);
        if (counts[g] > 0 && left < 0) {
          counts[g] -= 1;
          ++left;
        }
      }
    }
  }
  slot_counts_cumulative[0] = 0;
  for (int64_t g = 0; g < num_groups; ++g) {
    if (cumulative[g + 1] != cumulative[g]) {
      residual[g] = owed[g] - (counts[g] << kResidualFractionBits);
    }
    slot_counts_cumulative[g + 1] = slot_counts_cumulative[g] + counts[g];
  }
}

struct PlacedSlot {
  int64_t slot;
  int64_t group;
  int64_t position;
};

// Slots whose group reached its capacity inside this call are drawn again, i.i.d. from the groups still open
// (weights from the round-0 table), in rounds 1, 2, ...; within a round the k-th pending slot (in slot order)
// that lands in g takes position cursor[g] + k. Each round that leaves a slot pending closes at least one group,
// so there are at most K rounds. `cursor` must already include the round-0 placements and is updated.
// Returns false when slots remain but no open group has weight.
inline bool redraw_pending_slots(uint64_t seed, uint64_t step, int64_t num_groups, const int64_t* round0_cumulative,
                                 const int64_t* capacity, int64_t* cursor, std::vector<int64_t> pending,
                                 std::vector<PlacedSlot>* placed) {
  std::vector<int64_t> cumulative(num_groups + 1, 0);
  std::vector<int64_t> counts(num_groups, 0);
  std::vector<int64_t> still_pending;
  for (uint32_t round = 1; !pending.empty(); ++round) {
    for (int64_t g = 0; g < num_groups; ++g) {
      const int64_t weight = cursor[g] < capacity[g] ? round0_cumulative[g + 1] - round0_cumulative[g] : 0;
      cumulative[g + 1] = cumulative[g] + weight;
    }
    if (cumulative[num_groups] == 0) return false;
    std::fill(counts.begin(), counts.end(), 0);
    still_pending.clear();
    for (int64_t slot : pending) {
      const int64_t g = draw_group(slot_random(seed, step, round, static_cast<uint64_t>(slot)), cumulative.data(),
                                   num_groups, nullptr, 0);
      const int64_t position = cursor[g] + counts[g]++;
      if (position < capacity[g]) {
        placed->push_back(PlacedSlot{slot, g, position});
      } else {
        still_pending.push_back(slot);
      }
    }
    for (int64_t g = 0; g < num_groups; ++g) {
      if (counts[g] > 0) cursor[g] += std::min(counts[g], capacity[g] - cursor[g]);
    }
    pending.swap(still_pending);
  }
  return true;
}

inline const char* exhausted_message() {
  return "every group with a positive proportion has reached max_epochs; no group is left to draw from";
}

}  // namespace mixture
}  // namespace aioli_ext
