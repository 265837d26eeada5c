// CPU kernels of the mixture sampler: mixture_sample, mixture_thresholds (host table builder used by both
// backends) and the test ops philox4x32 / keyed_permutation. Per-slot math lives in csrc/mixture_sample.h;
// this file only adds the parallel structure (chunks of slots over at::parallel_for).
#include <cmath>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/cpu_capability.h"
#include "cpu/huge_pages.h"
#include "cpu/mixture_draw_kernel.h"
#include "mixture_sample.h"
#include "mixture_sample_host.h"

namespace aioli_ext {
namespace {

using aioli_ext::KeyedPermutation;

// Consecutive slots of the same (group, epoch) share its permutation: one Philox call and no 64-bit division
// per hit, only a range test. Direct-mapped on the group id; K <= kEntries never misses within an epoch.
class PermutationCache {
 public:
  // One entry per group up to 4096 groups (about 200 KB, L2-resident); beyond that groups share entries.
  explicit PermutationCache(int64_t num_groups) {
    int64_t entries = 1;
    while (entries < num_groups && entries < 4096) entries <<= 1;
    mask_ = entries - 1;
    entries_.resize(entries);
    for (auto& e : entries_) e.group = -1;
  }

  // Offset of stream position `position` inside its epoch, and that epoch's permutation.
  __attribute__((always_inline)) const KeyedPermutation& get(uint64_t seed, int64_t group, uint64_t position,
                                                             uint64_t size, uint64_t* offset) {
    Entry& e = entries_[group & mask_];
    if (e.group != group || position - e.epoch_begin >= size) {  // unsigned: also catches position < begin
      const uint64_t epoch = position / size;
      e.group = group;
      e.epoch_begin = epoch * size;
      e.perm = mixture::group_epoch_permutation(seed, static_cast<uint64_t>(group), epoch, size);
    }
    *offset = position - e.epoch_begin;
    return e.perm;
  }

 private:
  struct Entry {
    int64_t group;
    uint64_t epoch_begin;
    KeyedPermutation perm;
  };
  std::vector<Entry> entries_;
  int64_t mask_;
};

struct IndexView {
  const int64_t* ranges;  // [K, 2]: start, size
  const int64_t* csr;     // nullptr for implicit ranges
  uint64_t seed;

  __attribute__((always_inline)) int64_t sample(PermutationCache& cache, int64_t group, int64_t position) const {
    const int64_t start = ranges[2 * group];
    const uint64_t size = static_cast<uint64_t>(ranges[2 * group + 1]);
    uint64_t offset;
    const KeyedPermutation& perm = cache.get(seed, group, static_cast<uint64_t>(position), size, &offset);
    const int64_t flat = start + static_cast<int64_t>(perm(offset));
    return csr != nullptr ? csr[flat] : flat;
  }

  void prefetch(int64_t group) const { __builtin_prefetch(ranges + 2 * group); }
};

// The permutations of the epochs a call's positions fall in, made once per call for every group drawn
// (positions cursor[g] .. cursor[g] + total[g] - 1), shared by all threads. With many groups a per-slot cache
// keyed on the group misses nearly every time (one Philox call and a permutation set-up per slot); this table
// costs one or two Philox calls per drawn group instead, and one cache line of look-up per slot. A group that
// passes through more than two epochs in one call (fewer samples than draws) falls back to the cache.
class GroupEpochTable {
 public:
  GroupEpochTable(const IndexView& index, const int64_t* cursor, const int64_t* totals, int64_t num_groups)
      : index_(index), entries_(static_cast<size_t>(num_groups)) {
    at::parallel_for(0, num_groups, 4096, [&](int64_t gb, int64_t ge) {
      for (int64_t g = gb; g < ge; ++g) {
        if (totals[g] <= 0) continue;  // never read
        Entry& e = entries_[g];
        e.start = index.ranges[2 * g];
        e.size = static_cast<uint64_t>(index.ranges[2 * g + 1]);
        const uint64_t epoch = static_cast<uint64_t>(cursor[g]) / e.size;
        e.epoch_begin = epoch * e.size;
        e.perm[0] = mixture::group_epoch_permutation(index.seed, static_cast<uint64_t>(g), epoch, e.size);
        if (static_cast<uint64_t>(cursor[g] + totals[g]) > e.epoch_begin + e.size) {
          e.perm[1] = mixture::group_epoch_permutation(index.seed, static_cast<uint64_t>(g), epoch + 1, e.size);
        }
      }
    });
  }

  void prefetch(int64_t group) const { __builtin_prefetch(&entries_[group]); }

  // The permutation and offset of stream position `position` of `group` (a position of this call), and the
  // group's first flat index; nullptr when the position is past the tabulated epochs.
  __attribute__((always_inline)) const KeyedPermutation* find(int64_t group, int64_t position, uint64_t* offset,
                                                              int64_t* start) const {
    const Entry& e = entries_[group];
    uint64_t o = static_cast<uint64_t>(position) - e.epoch_begin;
    *start = e.start;
    if (o < e.size) {
      *offset = o;
      return &e.perm[0];
    }
    if ((o -= e.size) < e.size) {
      *offset = o;
      return &e.perm[1];
    }
    return nullptr;
  }

  // Same value as IndexView::sample(cache, group, position), for a position of this call.
  __attribute__((always_inline)) int64_t sample(PermutationCache& cache, int64_t group, int64_t position) const {
    uint64_t offset;
    int64_t start;
    const KeyedPermutation* perm = find(group, position, &offset, &start);
    if (perm == nullptr) return index_.sample(cache, group, position);
    return flat_to_id(start + static_cast<int64_t>((*perm)(offset)));
  }

  int64_t flat_to_id(int64_t flat) const { return index_.csr != nullptr ? index_.csr[flat] : flat; }

 private:
  struct alignas(64) Entry {
    int64_t start;
    uint64_t size;
    uint64_t epoch_begin;  // first position of the epoch of perm[0]; perm[1] is the next epoch
    KeyedPermutation perm[2];
  };
  const IndexView& index_;
  std::vector<Entry> entries_;
};

// Writes the sample ids of a thread's slots in blocks: the Feistel permutations of a block are evaluated
// together by the vectorised lane kernel; tiny groups (Fisher-Yates permutations) and positions past the
// table's epochs are evaluated one by one. Call flush() after the last add().
class SampleWriter {
 public:
  SampleWriter(const GroupEpochTable& table, PermutationCache& cache, PermutationLanesKernel kernel,
               int64_t* out_ids, int64_t* out_groups)
      : table_(table), cache_(cache), kernel_(kernel), out_ids_(out_ids), out_groups_(out_groups) {}

  __attribute__((always_inline)) void add(int64_t out_index, int64_t group, int64_t position) {
    out_groups_[out_index] = group;
    uint64_t offset;
    int64_t start;
    const KeyedPermutation* perm = table_.find(group, position, &offset, &start);
    if (perm == nullptr) {
      out_ids_[out_index] = table_.sample(cache_, group, position);
      return;
    }
    if (perm->size <= kSmallPermutationSize) {
      out_ids_[out_index] = table_.flat_to_id(start + static_cast<int64_t>((*perm)(offset)));
      return;
    }
    const int i = count_;
    lanes_.value[i] = offset;
    lanes_.size[i] = perm->size;
    lanes_.bits[i] = static_cast<uint64_t>(perm->left_bits + perm->right_bits);
    for (int r = 0; r < kFeistelRounds; ++r) lanes_.key[r][i] = static_cast<uint64_t>(perm->keys[r]) << 32;
    start_[i] = start;
    out_index_[i] = out_index;
    if (++count_ == kPermutationLanes) flush();
  }

  void flush() {
    if (count_ == 0) return;
    kernel_(lanes_, count_);
    for (int i = 0; i < count_; ++i) {
      out_ids_[out_index_[i]] = table_.flat_to_id(start_[i] + static_cast<int64_t>(lanes_.value[i]));
    }
    count_ = 0;
  }

 private:
  const GroupEpochTable& table_;
  PermutationCache& cache_;
  PermutationLanesKernel kernel_;
  int64_t* out_ids_;
  int64_t* out_groups_;
  PermutationLanes lanes_;
  int64_t start_[kPermutationLanes];
  int64_t out_index_[kPermutationLanes];
  int count_ = 0;
};

PermutationLanesKernel select_permutation_lanes_kernel() {
  switch (cpu_capability()) {
    case CpuCapability::AVX512: return &permutation_lanes_avx512;
    case CpuCapability::AVX2: return &permutation_lanes_avx2;
    default: return &permutation_lanes_default;
  }
}

SlotRandomPairsKernel select_slot_random_kernel() {
  switch (cpu_capability()) {
    case CpuCapability::AVX512: return &slot_random_pairs_avx512;
    case CpuCapability::AVX2: return &slot_random_pairs_avx2;
    default: return &slot_random_pairs_default;
  }
}


constexpr int64_t kMinSlotsPerChunk = 8192;

// Chunks of whole slot pairs (one Philox call serves two slots).
int64_t chunk_count(int64_t batch_size) {
  const int64_t by_size = (batch_size + kMinSlotsPerChunk - 1) / kMinSlotsPerChunk;
  return std::max<int64_t>(1, std::min<int64_t>(by_size, at::get_num_threads()));
}

int64_t chunk_begin(int64_t chunk, int64_t num_chunks, int64_t batch_size) {
  const int64_t pairs = (batch_size + 1) / 2;
  return std::min(batch_size, 2 * ((pairs * chunk) / num_chunks));
}

std::vector<int64_t> concat(std::vector<std::vector<int64_t>>& parts) {
  std::vector<int64_t> all;
  for (auto& p : parts) all.insert(all.end(), p.begin(), p.end());
  return all;
}

// Round 0, mode "iid": draws every slot of the global batch (ranks need them all), ranks the slots of each group
// in slot order, and writes this rank's slice. Returns the slots that overflowed their group's capacity.
std::vector<int64_t> sample_iid_round0(const mixture::SampleShape& shape, const IndexView& index, uint64_t step,
                                       const int64_t* cumulative, const int32_t* guide, int64_t* cursor,
                                       const int64_t* capacity, int64_t* out_ids, int64_t* out_groups) {
  const int64_t num_groups = shape.num_groups;
  const int64_t batch = shape.batch_size;
  const uint64_t seed = index.seed;
  const int64_t lo = shape.slice_begin, hi = shape.slice_end;
  std::vector<int64_t> remaining;
  if (shape.capped) {
    remaining.resize(num_groups);
    for (int64_t g = 0; g < num_groups; ++g) remaining[g] = capacity[g] - cursor[g];
  }
  auto draw_pair = [&](int64_t j, int32_t* g0, int32_t* g1) {
    const mixture::SlotPairRandom r = mixture::slot_pair_random(seed, step, 0, static_cast<uint64_t>(j) >> 1);
    *g0 = static_cast<int32_t>(mixture::draw_group(r.even, cumulative, num_groups, guide, shape.guide_shift));
    *g1 = static_cast<int32_t>(mixture::draw_group(r.odd, cumulative, num_groups, guide, shape.guide_shift));
  };

  int64_t num_chunks = chunk_count(batch);
  // Reused across calls (up to 2^24 slots, 64 MB): a fresh B-sized buffer per call costs page faults comparable
  // to the sampling itself. Larger one-off batches get their own buffer rather than pinning that memory.
  static thread_local std::vector<int32_t> slot_group_buffer;
  std::vector<int32_t> one_off_buffer;
  std::vector<int32_t>& buffer = batch <= (int64_t{1} << 24) ? slot_group_buffer : one_off_buffer;
  if (static_cast<int64_t>(buffer.size()) < batch) buffer.resize(batch);
  int32_t* slot_group = buffer.data();
  std::vector<std::vector<int64_t>> pending(num_chunks);

  if (num_groups > 4 * batch) {
    // Many more groups than slots: rank by sorting (group, slot) keys, O(B log B) instead of O(K) counters.
    std::vector<uint64_t> keys(batch);
    at::parallel_for(0, num_chunks, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c) {
        const int64_t end = chunk_begin(c + 1, num_chunks, batch);
        for (int64_t j = chunk_begin(c, num_chunks, batch); j < end; j += 2) {
          int32_t g0, g1;
          draw_pair(j, &g0, &g1);
          slot_group[j] = g0;
          keys[j] = (static_cast<uint64_t>(g0) << 32) | static_cast<uint64_t>(j);
          if (j + 1 < end) {
            slot_group[j + 1] = g1;
            keys[j + 1] = (static_cast<uint64_t>(g1) << 32) | static_cast<uint64_t>(j + 1);
          }
        }
      }
    });
    std::sort(keys.begin(), keys.end());
    std::vector<int32_t> rank_in_group(batch);
    int64_t run_start = 0;
    for (int64_t i = 0; i < batch; ++i) {
      const uint64_t g = keys[i] >> 32;
      if (i > 0 && (keys[i - 1] >> 32) != g) run_start = i;
      rank_in_group[keys[i] & 0xFFFFFFFFull] = static_cast<int32_t>(i - run_start);
    }
    at::parallel_for(0, num_chunks, 1, [&](int64_t cb, int64_t ce) {
      PermutationCache cache(shape.num_groups);
      for (int64_t c = cb; c < ce; ++c) {
        const int64_t begin = chunk_begin(c, num_chunks, batch);
        const int64_t end = shape.capped ? chunk_begin(c + 1, num_chunks, batch)
                                         : std::min(hi, chunk_begin(c + 1, num_chunks, batch));
        for (int64_t j = shape.capped ? begin : std::max(begin, lo); j < end; ++j) {
          const int64_t g = slot_group[j];
          const int64_t k = rank_in_group[j];
          if (shape.capped && k >= remaining[g]) {
            pending[c].push_back(j);
            continue;
          }
          if (j >= lo && j < hi) {
            out_ids[j - lo] = index.sample(cache, g, cursor[g] + k);
            out_groups[j - lo] = g;
          }
        }
      }
    });
    for (int64_t i = 0; i < batch; ++i) {
      if (i + 1 == batch || (keys[i + 1] >> 32) != (keys[i] >> 32)) {
        const int64_t g = static_cast<int64_t>(keys[i] >> 32);
        const int64_t count = static_cast<int64_t>(rank_in_group[keys[i] & 0xFFFFFFFFull]) + 1;
        cursor[g] += shape.capped ? std::min(count, remaining[g]) : count;
      }
    }
    return concat(pending);
  }

  // Counting ranks: each chunk counts its slots per group; an exclusive scan over chunks turns the counts into
  // the stream position each chunk's first slot of each group takes. O(chunks * K) memory, kept <= 4 B entries.
  num_chunks = std::max<int64_t>(1, std::min<int64_t>(num_chunks, (4 * batch) / num_groups));
  pending.resize(num_chunks);
  std::vector<int64_t> chunk_next(static_cast<size_t>(num_chunks) * num_groups, 0);
  const uint64_t* cumulative_u = reinterpret_cast<const uint64_t*>(cumulative);
  // Tables that stay in L1/L2 need no prefetching; it only costs instructions there.
  const bool large_tables = num_groups > 4096;
  const SlotRandomPairsKernel slot_random_pairs = select_slot_random_kernel();
  at::parallel_for(0, num_chunks, 1, [&](int64_t cb, int64_t ce) {
    // Blocks of slots: all random numbers of a block first, with a prefetch of their guide buckets, so that
    // the table look-ups of a large K overlap instead of stalling one after the other.
    // The random words of a block come from the vectorised Philox kernel (chunks start on even slots).
    constexpr int kBlock = 2 * kSlotRandomBlockPairs;
    uint64_t values[kBlock];
    for (int64_t c = cb; c < ce; ++c) {
      int64_t* counts = chunk_next.data() + c * num_groups;
      const int64_t end = chunk_begin(c + 1, num_chunks, batch);
      for (int64_t j0 = chunk_begin(c, num_chunks, batch); j0 < end; j0 += kBlock) {
        const int n = static_cast<int>(std::min<int64_t>(kBlock, end - j0));
        slot_random_pairs(seed, step, 0, static_cast<uint64_t>(j0) >> 1, (n + 1) / 2, values);
        for (int i = 0; i < n; ++i) {
          values[i] = mixture::threshold_value(values[i], cumulative, num_groups);
          if (large_tables) __builtin_prefetch(guide + (values[i] >> shape.guide_shift));
        }
        if (large_tables) {
          for (int i = 0; i < n; ++i) {
            const int64_t lo_group = guide[values[i] >> shape.guide_shift];
            __builtin_prefetch(cumulative_u + lo_group + 1);
          }
        }
        for (int i = 0; i < n; ++i) {
          const int64_t g =
              mixture::group_of_value(values[i], cumulative, num_groups, guide, shape.guide_shift);
          slot_group[j0 + i] = static_cast<int32_t>(g);
          ++counts[g];
        }
      }
    }
  });
  std::vector<int64_t> group_total(num_groups, 0);
  for (int64_t c = 0; c < num_chunks; ++c) {
    int64_t* next = chunk_next.data() + c * num_groups;
    for (int64_t g = 0; g < num_groups; ++g) {
      const int64_t n = next[g];
      next[g] = cursor[g] + group_total[g];
      group_total[g] += n;
    }
  }
  const GroupEpochTable table(index, cursor, group_total.data(), num_groups);
  const PermutationLanesKernel permutation_lanes = select_permutation_lanes_kernel();
  at::parallel_for(0, num_chunks, 1, [&](int64_t cb, int64_t ce) {
    PermutationCache cache(shape.num_groups);
    SampleWriter writer(table, cache, permutation_lanes, out_ids, out_groups);
    // With large K the group's counter and table entry are cache misses (L3 or memory): fetch them far enough
    // ahead to cover a memory latency at a few ns per slot; with small K the prefetches are cheap L1 hits.
    constexpr int64_t kAhead = 24;
    for (int64_t c = cb; c < ce; ++c) {
      int64_t* next = chunk_next.data() + c * num_groups;
      const int64_t begin = chunk_begin(c, num_chunks, batch);
      const int64_t chunk_end = chunk_begin(c + 1, num_chunks, batch);
      const int64_t end = shape.capped ? chunk_end : std::min(hi, chunk_end);
      for (int64_t j = begin; j < end; ++j) {
        if (j + kAhead < end) {
          const int64_t ahead = slot_group[j + kAhead];
          __builtin_prefetch(next + ahead);
          if (j + kAhead >= lo) table.prefetch(ahead);
        }
        const int64_t g = slot_group[j];
        const int64_t position = next[g]++;
        if (shape.capped && position >= capacity[g]) {
          pending[c].push_back(j);
          continue;
        }
        if (j >= lo && j < hi) writer.add(j - lo, g, position);
      }
    }
    writer.flush();
  });
  for (int64_t g = 0; g < num_groups; ++g) {
    cursor[g] += shape.capped ? std::min(group_total[g], remaining[g]) : group_total[g];
  }
  return concat(pending);
}

// Round 0, mode "systematic": the host allocation fixes the per-group counts; the keyed slot order maps slot j
// to the q-th entry of the group-major list, whose group and rank follow from the cumulative counts.
std::vector<int64_t> sample_systematic_round0(const mixture::SampleShape& shape, const IndexView& index,
                                              uint64_t step, const int64_t* cumulative, int64_t* residual,
                                              int64_t* cursor, const int64_t* capacity, int64_t* out_ids,
                                              int64_t* out_groups) {
  const int64_t num_groups = shape.num_groups;
  const int64_t batch = shape.batch_size;
  const int64_t lo = shape.slice_begin, hi = shape.slice_end;
  std::vector<int64_t> slot_counts(num_groups + 1);
  mixture::systematic_allocate(cumulative, num_groups, batch, residual, slot_counts.data());
  const KeyedPermutation order = mixture::slot_order_permutation(index.seed, step, static_cast<uint64_t>(batch));
  std::vector<int64_t> remaining;
  if (shape.capped) {
    remaining.resize(num_groups);
    for (int64_t g = 0; g < num_groups; ++g) remaining[g] = capacity[g] - cursor[g];
  }
  // A guide over the group-major list (bucket of entry q -> first candidate group), like the threshold guide
  // of the i.i.d. draws: O(1) expected search steps and a small table, where a binary search over K would stall
  // on dependent loads. Same result as mixture::find_group over the whole table (what the CUDA kernel does).
  const int entry_bits = bit_width_u64(static_cast<uint64_t>(batch - 1));
  const int bucket_bits = std::min(entry_bits, bit_width_u64(static_cast<uint64_t>(num_groups - 1)));
  const int bucket_shift = entry_bits - bucket_bits;
  const int64_t buckets = int64_t{1} << bucket_bits;
  std::vector<int32_t> entry_guide(buckets + 1);
  {
    int64_t g = 0;
    for (int64_t b = 0; b < buckets; ++b) {
      const int64_t point = b << bucket_shift;
      while (g < num_groups - 1 && slot_counts[g + 1] <= point) ++g;
      entry_guide[b] = static_cast<int32_t>(g);
    }
    entry_guide[buckets] = static_cast<int32_t>(num_groups - 1);
  }
  const bool large_tables = num_groups > 4096;
  std::vector<int64_t> group_total(num_groups);
  for (int64_t g = 0; g < num_groups; ++g) group_total[g] = slot_counts[g + 1] - slot_counts[g];
  const GroupEpochTable table(index, cursor, group_total.data(), num_groups);
  const int64_t num_chunks = chunk_count(batch);
  std::vector<std::vector<int64_t>> pending(num_chunks);
  const PermutationLanesKernel permutation_lanes = select_permutation_lanes_kernel();
  at::parallel_for(0, num_chunks, 1, [&](int64_t cb, int64_t ce) {
    PermutationCache cache(shape.num_groups);
    SampleWriter writer(table, cache, permutation_lanes, out_ids, out_groups);
    for (int64_t c = cb; c < ce; ++c) {
      const int64_t begin = chunk_begin(c, num_chunks, batch);
      const int64_t end = chunk_begin(c + 1, num_chunks, batch);
      const int64_t from = shape.capped ? begin : std::max(begin, lo);
      const int64_t to = shape.capped ? end : std::min(end, hi);
      // Blocks of slots in stages (entries, then groups, then samples), each stage prefetching what the next
      // one reads, so that with large K the table look-ups of a block overlap.
      constexpr int kBlock = 32;
      int64_t entry[kBlock];
      int64_t group[kBlock];
      for (int64_t j0 = from; j0 < to; j0 += kBlock) {
        const int n = static_cast<int>(std::min<int64_t>(kBlock, to - j0));
        for (int i = 0; i < n; ++i) {
          entry[i] = static_cast<int64_t>(order(static_cast<uint64_t>(j0 + i)));
          if (large_tables) __builtin_prefetch(entry_guide.data() + (entry[i] >> bucket_shift));
        }
        if (large_tables) {
          for (int i = 0; i < n; ++i) {
            __builtin_prefetch(slot_counts.data() + entry_guide[entry[i] >> bucket_shift] + 1);
          }
        }
        for (int i = 0; i < n; ++i) {
          const int64_t bucket = entry[i] >> bucket_shift;
          group[i] = mixture::find_group(slot_counts.data(), entry_guide[bucket], entry_guide[bucket + 1],
                                         static_cast<uint64_t>(entry[i]));
          if (large_tables) {
            __builtin_prefetch(cursor + group[i]);
            table.prefetch(group[i]);
          }
        }
        for (int i = 0; i < n; ++i) {
          const int64_t j = j0 + i;
          const int64_t g = group[i];
          const int64_t k = entry[i] - slot_counts[g];
          if (shape.capped && k >= remaining[g]) {
            pending[c].push_back(j);
            continue;
          }
          if (j >= lo && j < hi) writer.add(j - lo, g, cursor[g] + k);
        }
      }
    }
    writer.flush();
  });
  for (int64_t g = 0; g < num_groups; ++g) {
    const int64_t count = slot_counts[g + 1] - slot_counts[g];
    cursor[g] += shape.capped ? std::min(count, remaining[g]) : count;
  }
  return concat(pending);
}

std::tuple<at::Tensor, at::Tensor> mixture_sample_cpu(
    const at::Tensor& group_ranges, const std::optional<at::Tensor>& csr_sample_ids, const at::Tensor& cumulative,
    const at::Tensor& guide, const at::Tensor& cursor, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& capacity, int64_t seed, int64_t step, int64_t batch_size, int64_t rank,
    int64_t world_size) {
  const mixture::SampleShape shape = mixture::check_sample_args(group_ranges, csr_sample_ids, cumulative, guide,
                                                                cursor, residual, capacity, step, batch_size, rank,
                                                                world_size);
  const int64_t* cumulative_ptr = cumulative.data_ptr<int64_t>();
  TORCH_CHECK(static_cast<uint64_t>(cumulative_ptr[shape.num_groups]) == mixture::kThresholdTotal &&
                  cumulative_ptr[0] == 0,
              "cumulative must be a threshold table made by mixture_thresholds (from 0 to 2^62)");
  const int64_t per_rank = shape.slice_end - shape.slice_begin;
  at::Tensor out_ids = at::empty({per_rank}, group_ranges.options());
  at::Tensor out_groups = at::empty({per_rank}, group_ranges.options());
  advise_huge_pages(out_ids);
  advise_huge_pages(out_groups);
  const IndexView index{group_ranges.data_ptr<int64_t>(),
                        shape.csr ? csr_sample_ids->data_ptr<int64_t>() : nullptr, static_cast<uint64_t>(seed)};
  int64_t* cursor_ptr = cursor.data_ptr<int64_t>();
  const int64_t* capacity_ptr = shape.capped ? capacity->data_ptr<int64_t>() : nullptr;
  int64_t* ids_ptr = out_ids.data_ptr<int64_t>();
  int64_t* groups_ptr = out_groups.data_ptr<int64_t>();

  std::vector<int64_t> pending =
      shape.systematic
          ? sample_systematic_round0(shape, index, static_cast<uint64_t>(step), cumulative_ptr,
                                     residual->data_ptr<int64_t>(), cursor_ptr, capacity_ptr, ids_ptr, groups_ptr)
          : sample_iid_round0(shape, index, static_cast<uint64_t>(step), cumulative_ptr,
                              guide.data_ptr<int32_t>(), cursor_ptr, capacity_ptr, ids_ptr, groups_ptr);
  if (!pending.empty()) {
    std::vector<mixture::PlacedSlot> placed;
    TORCH_CHECK(mixture::redraw_pending_slots(static_cast<uint64_t>(seed), static_cast<uint64_t>(step),
                                              shape.num_groups, cumulative_ptr, capacity_ptr, cursor_ptr,
                                              std::move(pending), &placed),
                mixture::exhausted_message());
    PermutationCache cache(shape.num_groups);
    for (const auto& p : placed) {
      if (p.slot >= shape.slice_begin && p.slot < shape.slice_end) {
        ids_ptr[p.slot - shape.slice_begin] = index.sample(cache, p.group, p.position);
        groups_ptr[p.slot - shape.slice_begin] = p.group;
      }
    }
  }
  return {out_ids, out_groups};
}

// Proportions -> fixed-point cumulative thresholds (sum 2^62) and the guide table. Runs on the host for both
// backends: float64 prefix sums in a fixed order, scaled by a power of two and floored, so the table is the
// same bit for bit wherever the draws then run. Zero proportions give empty intervals (never drawn).
std::tuple<at::Tensor, at::Tensor> mixture_thresholds_cpu(const at::Tensor& proportions,
                                                          const at::Tensor& group_sizes,
                                                          const std::optional<at::Tensor>& open_groups) {
  check_dtype(group_sizes, "group_sizes", {at::kLong}, "int64");
  check_dim(group_sizes, "group_sizes", 1, "[K]");
  TORCH_CHECK(group_sizes.device().is_cpu(), "group_sizes must be a CPU tensor, got ", group_sizes.device());
  const int64_t num_groups = group_sizes.size(0);
  TORCH_CHECK(num_groups >= 1 && num_groups <= mixture::kMaxGroups, "group_sizes must have between 1 and ",
              mixture::kMaxGroups, " entries, got ", num_groups);
  check_dtype(proportions, "proportions", {at::kFloat, at::kDouble}, "float32 or float64");
  TORCH_CHECK(proportions.device().is_cpu(), "proportions must be a CPU tensor, got ", proportions.device());
  TORCH_CHECK(proportions.dim() == 1 && proportions.size(0) == num_groups,
              "proportions must have one entry per group (K=", num_groups, "), got shape ", proportions.sizes());
  if (open_groups.has_value()) {
    check_dtype(*open_groups, "open_groups", {at::kBool}, "bool");
    TORCH_CHECK(open_groups->dim() == 1 && open_groups->size(0) == num_groups && open_groups->device().is_cpu(),
                "open_groups must be a CPU bool tensor of shape [", num_groups, "], got ", open_groups->sizes(),
                " on ", open_groups->device());
  }
  const at::Tensor p = proportions.to(at::kDouble).contiguous();
  const at::Tensor sizes = group_sizes.contiguous();
  const at::Tensor open = open_groups.has_value() ? open_groups->contiguous() : at::Tensor();
  const double* p_ptr = p.data_ptr<double>();
  const int64_t* size_ptr = sizes.data_ptr<int64_t>();
  const bool* open_ptr = open.defined() ? open.data_ptr<bool>() : nullptr;

  double total = 0.0;
  bool any_positive = false;
  for (int64_t g = 0; g < num_groups; ++g) {
    const double v = p_ptr[g];
    TORCH_CHECK(std::isfinite(v), "proportions must be finite, got proportions[", g, "] = ", v);
    TORCH_CHECK(v >= 0.0, "proportions must be >= 0, got proportions[", g, "] = ", v);
    TORCH_CHECK(!(v > 0.0 && size_ptr[g] == 0), "proportions[", g, "] = ", v, " is positive but group ", g,
                " is empty (size 0)");
    any_positive = any_positive || v > 0.0;
    if (open_ptr == nullptr || open_ptr[g]) total += v;
  }
  TORCH_CHECK(any_positive, "proportions must not be all zero");
  TORCH_CHECK(total > 0.0, mixture::exhausted_message());
  TORCH_CHECK(std::isfinite(total), "proportions must sum to a finite float64, got ", total);

  at::Tensor cumulative = at::empty({num_groups + 1}, group_sizes.options());
  int64_t* cum = cumulative.data_ptr<int64_t>();
  const double scale = static_cast<double>(mixture::kThresholdTotal);
  double prefix = 0.0;
  cum[0] = 0;
  for (int64_t g = 0; g < num_groups; ++g) {
    if (open_ptr == nullptr || open_ptr[g]) prefix += p_ptr[g];
    // prefix / total is in [0, 1] and monotone in g; the last one is total / total == 1 exactly.
    const double scaled = std::floor(prefix / total * scale);
    cum[g + 1] = std::min<int64_t>(static_cast<int64_t>(mixture::kThresholdTotal), static_cast<int64_t>(scaled));
    if (cum[g + 1] < cum[g]) cum[g + 1] = cum[g];
  }
  cum[num_groups] = static_cast<int64_t>(mixture::kThresholdTotal);

  int64_t buckets = 1;
  int log2_buckets = 0;
  while (buckets < num_groups) {
    buckets <<= 1;
    ++log2_buckets;
  }
  at::Tensor guide = at::empty({buckets + 1}, group_sizes.options().dtype(at::kInt));
  int32_t* guide_ptr = guide.data_ptr<int32_t>();
  const int shift = mixture::kThresholdBits - log2_buckets;
  int64_t g = 0;
  for (int64_t b = 0; b < buckets; ++b) {
    const uint64_t point = static_cast<uint64_t>(b) << shift;
    while (static_cast<uint64_t>(cum[g + 1]) <= point) ++g;
    guide_ptr[b] = static_cast<int32_t>(g);
  }
  guide_ptr[buckets] = static_cast<int32_t>(num_groups - 1);
  return {cumulative, guide};
}

at::Tensor philox4x32_cpu(const at::Tensor& counters, const at::Tensor& key) {
  check_dtype(counters, "counters", {at::kLong}, "int64");
  TORCH_CHECK(counters.dim() == 2 && counters.size(1) == 4, "counters must have shape [N, 4], got ",
              counters.sizes());
  check_dtype(key, "key", {at::kLong}, "int64");
  TORCH_CHECK(key.dim() == 1 && key.size(0) == 2, "key must have shape [2], got ", key.sizes());
  const at::Tensor c = counters.contiguous();
  const at::Tensor k = key.contiguous();
  const int64_t* c_ptr = c.data_ptr<int64_t>();
  const int64_t* k_ptr = k.data_ptr<int64_t>();
  const int64_t n = c.size(0);
  for (int64_t i = 0; i < 4 * n; ++i) {
    TORCH_CHECK(c_ptr[i] >= 0 && c_ptr[i] <= 0xFFFFFFFFll, "counters must hold 32-bit words in [0, 2^32), got ",
                c_ptr[i]);
  }
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK(k_ptr[i] >= 0 && k_ptr[i] <= 0xFFFFFFFFll, "key must hold 32-bit words in [0, 2^32), got ",
                k_ptr[i]);
  }
  at::Tensor out = at::empty({n, 4}, c.options());
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, n, 4096, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t* w = c_ptr + 4 * i;
      const Philox4x32Value r = philox4x32_10(static_cast<uint32_t>(w[0]), static_cast<uint32_t>(w[1]),
                                              static_cast<uint32_t>(w[2]), static_cast<uint32_t>(w[3]),
                                              static_cast<uint32_t>(k_ptr[0]), static_cast<uint32_t>(k_ptr[1]));
      for (int j = 0; j < 4; ++j) o[4 * i + j] = static_cast<int64_t>(r.v[j]);
    }
  });
  return out;
}

at::Tensor keyed_permutation_cpu(const at::Tensor& positions, int64_t n, int64_t seed, int64_t group,
                                 int64_t epoch) {
  check_dtype(positions, "positions", {at::kLong}, "int64");
  TORCH_CHECK(n >= 1 && static_cast<uint64_t>(n) <= mixture::kThresholdTotal, "n must be in [1, 2^62], got ", n);
  TORCH_CHECK(group >= 0 && group <= 0xFFFFFFFFll, "group must be in [0, 2^32), got ", group);
  TORCH_CHECK(epoch >= 0, "epoch must be >= 0, got ", epoch);
  const at::Tensor pos = positions.contiguous();
  const int64_t* p = pos.data_ptr<int64_t>();
  const int64_t count = pos.numel();
  for (int64_t i = 0; i < count; ++i) {
    TORCH_CHECK(p[i] >= 0 && p[i] < n, "positions must be in [0, n=", n, "), got ", p[i]);
  }
  const KeyedPermutation perm = mixture::group_epoch_permutation(
      static_cast<uint64_t>(seed), static_cast<uint64_t>(group), static_cast<uint64_t>(epoch),
      static_cast<uint64_t>(n));
  at::Tensor out = at::empty_like(pos);
  int64_t* o = out.data_ptr<int64_t>();
  at::parallel_for(0, count, 16384, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) o[i] = static_cast<int64_t>(perm(static_cast<uint64_t>(p[i])));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(aioli_ext, CPU, m) {
  m.impl("mixture_sample", &mixture_sample_cpu);
  m.impl("mixture_thresholds", &mixture_thresholds_cpu);
  m.impl("philox4x32", &philox4x32_cpu);
  m.impl("keyed_permutation", &keyed_permutation_cpu);
}

}  // namespace aioli_ext
