// CPU kernels of the mixture sampler: mixture_sample, mixture_thresholds (host table builder used by both
// backends) and the test ops philox4x32 / keyed_permutation. Per-slot math lives in csrc/mixture_sample.h;
// this file only adds the parallel structure (chunks of slots over at::parallel_for).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
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

};

// Scratch memory of a call, kept by the calling thread for its next call: a fresh multi-megabyte buffer per
// call costs page faults comparable to the sampling itself. Elements are left uninitialised; the memory is
// cache-line aligned, and large buffers are huge-page aligned and advised (fewer TLB misses on the random
// accesses of large K). A buffer beyond its kept size is freed when the call ends (release()) rather than
// pinning that memory.
template <typename T>
class ScratchBuffer {
 public:
  static constexpr size_t kHugePage = size_t{2} << 20;

  explicit ScratchBuffer(size_t kept_bytes) : kept_bytes_(kept_bytes) {}

  T* get(size_t n) {
    if (n > capacity_) {
      const size_t bytes = n * sizeof(T);
      const size_t alignment = bytes >= 2 * kHugePage ? kHugePage : 64;
      data_.reset(static_cast<T*>(::operator new[](bytes, std::align_val_t{alignment})));
      alignment_ = alignment;
      capacity_ = n;
      advise_huge_pages(data_.get(), static_cast<int64_t>(bytes));
    }
    return data_.get();
  }

  void release() {
    if (capacity_ * sizeof(T) > kept_bytes_) {
      data_.reset();
      capacity_ = 0;
    }
  }

 private:
  struct Free {
    size_t* alignment;
    void operator()(T* p) const { ::operator delete[](p, std::align_val_t{*alignment}); }
  };
  size_t kept_bytes_;
  size_t alignment_ = 64;
  size_t capacity_ = 0;
  std::unique_ptr<T, Free> data_{nullptr, Free{&alignment_}};
};

// A call's scratch buffers, released (when large) however the call ends.
struct CallScratch {
  ScratchBuffer<int32_t>& slot_group;
  ScratchBuffer<int64_t>& chunk_next;
  ScratchBuffer<GroupPermutations>& records;
  ScratchBuffer<int64_t>& group_words;
  ScratchBuffer<uint32_t>& guide;

  static CallScratch of_this_thread() {
    // The slot groups of batches up to 2^24 slots; the per-group tables of up to ~2^18 groups.
    static thread_local ScratchBuffer<int32_t> slot_group(size_t{64} << 20);
    static thread_local ScratchBuffer<int64_t> chunk_next(size_t{16} << 20);
    static thread_local ScratchBuffer<GroupPermutations> records(size_t{16} << 20);
    static thread_local ScratchBuffer<int64_t> group_words(size_t{2} << 20);
    static thread_local ScratchBuffer<uint32_t> guide(size_t{2} << 20);
    return CallScratch{slot_group, chunk_next, records, group_words, guide};
  }

  ~CallScratch() {
    slot_group.release();
    chunk_next.release();
    records.release();
    group_words.release();
    guide.release();
  }
};

// The permutations of the epochs a call's positions fall in, made once per call for every group drawn (one or
// two Philox calls per group), one cache line per group (GroupPermutations), shared by all threads. Positions
// are kept as offsets from the first position of the epoch that holds cursor[g]; a group that passes through
// more than two epochs in one call (fewer samples than draws) falls back to the per-thread cache.
class PermutationTable {
 public:
  PermutationTable(const IndexView& index, const int64_t* cursor, const int64_t* totals, int64_t num_groups,
                   CallScratch& scratch)
      : index_(index) {
    records_ = scratch.records.get(static_cast<size_t>(num_groups));
    epoch_begin_ = scratch.group_words.get(static_cast<size_t>(num_groups));
    at::parallel_for(0, num_groups, 4096, [&](int64_t gb, int64_t ge) {
      for (int64_t g = gb; g < ge; ++g) {
        if (totals[g] <= 0) continue;  // never read
        const uint64_t size = static_cast<uint64_t>(index.ranges[2 * g + 1]);
        const uint64_t epoch = static_cast<uint64_t>(cursor[g]) / size;
        GroupPermutations& record = records_[g];
        const KeyedPermutation a =
            mixture::group_epoch_permutation(index.seed, static_cast<uint64_t>(g), epoch, size);
        const bool lanes = size > kSmallPermutationSize && size <= kSizeMask;
        record.size_bits = lanes ? size | (static_cast<uint64_t>(a.left_bits + a.right_bits) << kSizeBitsShift) : 0;
        record.start = index.ranges[2 * g];
        set_key_pairs(a, record.key_pairs[0]);
        if (static_cast<uint64_t>(cursor[g] + totals[g]) > (epoch + 1) * size) {
          set_key_pairs(mixture::group_epoch_permutation(index.seed, static_cast<uint64_t>(g), epoch + 1, size),
                        record.key_pairs[1]);
        }
        epoch_begin_[g] = static_cast<int64_t>(epoch * size);
      }
    });
  }

  const GroupPermutations* records() const { return records_; }
  int64_t epoch_begin(int64_t g) const { return epoch_begin_[g]; }
  void prefetch(int64_t group) const { __builtin_prefetch(records_ + group); }
  // Into L2 only: a block's worth of records ahead would not fit L1 with everything else.
  void prefetch_far(int64_t group) const { __builtin_prefetch(records_ + group, 0, 2); }
  int64_t flat_to_id(int64_t flat) const { return index_.csr != nullptr ? index_.csr[flat] : flat; }
  bool csr() const { return index_.csr != nullptr; }

  // The sample at offset o of group g, one slot at a time (the slots the lane kernel leaves: tiny or huge
  // groups, and offsets past the tabulated epochs).
  int64_t sample_one(PermutationCache& cache, int64_t g, uint64_t o) const {
    const uint64_t size = static_cast<uint64_t>(index_.ranges[2 * g + 1]);
    if (o < 2 * size) {  // epoch B is tabulated whenever the call reaches it
      const uint64_t* pairs = records_[g].key_pairs[o < size ? 0 : 1];
      const KeyedPermutation perm =
          make_keyed_permutation(size, static_cast<uint32_t>(pairs[0]), static_cast<uint32_t>(pairs[0] >> 32),
                                 static_cast<uint32_t>(pairs[1]), static_cast<uint32_t>(pairs[1] >> 32));
      return flat_to_id(records_[g].start + static_cast<int64_t>(perm(o < size ? o : o - size)));
    }
    return index_.sample(cache, g, epoch_begin_[g] + static_cast<int64_t>(o));
  }

 private:
  static void set_key_pairs(const KeyedPermutation& perm, uint64_t* pairs) {
    for (int r = 0; r < kFeistelRounds / 2; ++r) {
      pairs[r] = perm.keys[2 * r] | (static_cast<uint64_t>(perm.keys[2 * r + 1]) << 32);
    }
  }

  const IndexView& index_;
  GroupPermutations* records_;
  int64_t* epoch_begin_;
};

// Writes the sample ids and group ids of runs of consecutive slots in blocks: the Feistel permutations of a
// block are evaluated together by the vectorised lane kernel; the slots it leaves (tiny or huge groups, offsets
// past the table's epochs) are evaluated one by one.
class SampleWriter {
 public:
  SampleWriter(const PermutationTable& table, PermutationCache& cache, SampleLanesKernel kernel, int64_t* out_ids,
               int64_t* out_groups)
      : table_(table), cache_(cache), kernel_(kernel), out_ids_(out_ids), out_groups_(out_groups) {}

  // Slots out_index .. out_index + n - 1 (n <= kPermutationLanes) take offset offsets[i] of group groups[i].
  void write_block(int64_t out_index, const int32_t* groups, const uint64_t* offsets, int n) {
    int64_t* ids = out_ids_ + out_index;
    int64_t* out_groups = out_groups_ + out_index;
    const int left = kernel_(table_.records(), groups, offsets, n, ids, left_over_);
    for (int i = 0; i < n; ++i) out_groups[i] = groups[i];
    if (table_.csr()) {
      // The left-over slots' ids are not written yet: map the others, then fill those in.
      for (int i = 0, k = 0; i < n; ++i) {
        if (k < left && left_over_[k] == i) {
          ++k;
          continue;
        }
        ids[i] = table_.flat_to_id(ids[i]);
      }
    }
    for (int k = 0; k < left; ++k) {
      const int i = left_over_[k];
      ids[i] = table_.sample_one(cache_, groups[i], offsets[i]);
    }
  }

  // One slot at a time (for loops that skip slots); call flush() after the last add().
  void add(int64_t out_index, int64_t group, uint64_t offset) {
    if (count_ > 0 && out_index != first_out_ + count_) flush();
    if (count_ == 0) first_out_ = out_index;
    group_[count_] = static_cast<int32_t>(group);
    offset_[count_] = offset;
    if (++count_ == kPermutationLanes) flush();
  }

  void flush() {
    if (count_ > 0) write_block(first_out_, group_, offset_, count_);
    count_ = 0;
  }

 private:
  const PermutationTable& table_;
  PermutationCache& cache_;
  SampleLanesKernel kernel_;
  int64_t* out_ids_;
  int64_t* out_groups_;
  int32_t group_[kPermutationLanes];
  uint64_t offset_[kPermutationLanes];
  int32_t left_over_[kPermutationLanes];
  int64_t first_out_ = 0;
  int count_ = 0;
};

SampleLanesKernel select_sample_lanes_kernel() {
  switch (cpu_capability()) {
    case CpuCapability::AVX512: return &sample_lanes_avx512;
    case CpuCapability::AVX2: return &sample_lanes_avx2;
    default: return &sample_lanes_default;
  }
}

// A worker thread's writing state for one call: its permutation cache and block writer, flushed when the
// worker has run its last chunk.
struct SampleWorker {
  PermutationCache cache;
  SampleWriter writer;
  SampleWorker(const PermutationTable& table, int64_t num_groups, int64_t* ids, int64_t* groups)
      : cache(num_groups), writer(table, cache, select_sample_lanes_kernel(), ids, groups) {}
  ~SampleWorker() { writer.flush(); }
};

SlotRandomPairsKernel select_slot_random_kernel() {
  switch (cpu_capability()) {
    case CpuCapability::AVX512: return &slot_random_pairs_avx512;
    case CpuCapability::AVX2: return &slot_random_pairs_avx2;
    default: return &slot_random_pairs_default;
  }
}

constexpr int64_t kMinSlotsPerChunk = 8192;
// Chunks of about this many slots, handed to threads as they finish the previous one: on a shared machine a
// thread that loses its core for a while then delays the call by one chunk, not by its whole static share.
constexpr int64_t kTargetSlotsPerChunk = 32768;
constexpr int64_t kMaxChunks = 64;

// Chunks of whole slot pairs (one Philox call serves two slots). The split never changes the result.
int64_t chunk_count(int64_t batch_size) {
  const int64_t threads = at::get_num_threads();
  const int64_t at_least = std::min<int64_t>(threads, (batch_size + kMinSlotsPerChunk - 1) / kMinSlotsPerChunk);
  const int64_t by_size =
      std::min<int64_t>(kMaxChunks, (batch_size + kTargetSlotsPerChunk - 1) / kTargetSlotsPerChunk);
  return std::max<int64_t>(1, std::max(at_least, by_size));
}

int64_t chunk_begin(int64_t chunk, int64_t num_chunks, int64_t batch_size) {
  const int64_t pairs = (batch_size + 1) / 2;
  return std::min(batch_size, 2 * ((pairs * chunk) / num_chunks));
}

// Runs body(state, chunk) for every chunk, each worker thread taking the next chunk as it finishes one, with
// one state per worker (made by make_state()); which thread runs a chunk never changes the result.
template <typename MakeState, typename Body>
void for_each_chunk(int64_t num_chunks, MakeState&& make_state, Body&& body) {
  std::atomic<int64_t> next_chunk{0};
  const int64_t workers = std::min<int64_t>(num_chunks, at::get_num_threads());
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    auto state = make_state();
    for (int64_t c; (c = next_chunk.fetch_add(1, std::memory_order_relaxed)) < num_chunks;) body(*state, c);
  });
}

// A finer guide than mixture_thresholds' (one bucket per group), made per call when the batch pays for it:
// entry b is the group of bucket b's first value, with the top bit set when the bucket holds more than one
// threshold. An unflagged bucket's values lie in its group or the next, so the draw is one comparison and no
// search loop (whose trip count, 0, 1 or 2, is a coin flip a branch predictor loses).
struct FineGuide {
  static constexpr uint32_t kSearch = 0x80000000u;
  const uint32_t* entries;
  int shift;

  // 16 buckets per group while the guide stays in L2 (up to 2^16 buckets); beyond that two per group. Never
  // more buckets than B / 16: building the guide is O(buckets + K) per call.
  static int bits_for(int64_t num_groups, int64_t batch_size) {
    const int group_bits = bit_width_u64(static_cast<uint64_t>(num_groups - 1));
    const int batch_bits = bit_width_u64(static_cast<uint64_t>(batch_size)) - 4;
    const int wanted = group_bits <= 12 ? std::min(group_bits + 4, 16) : group_bits + 1;
    return std::max(group_bits, std::min(wanted, batch_bits));
  }

  // Over values in [0, 2^value_bits) and a table whose last entry exceeds every value drawn.
  static FineGuide build(const int64_t* cumulative, int64_t num_groups, int bits, int value_bits,
                         uint32_t* entries) {
    const int shift = value_bits - bits;
    const int64_t buckets = int64_t{1} << bits;
    const uint64_t* cum = reinterpret_cast<const uint64_t*>(cumulative);
    int64_t g = 0;
    for (int64_t b = 0; b < buckets; ++b) {
      const uint64_t first = static_cast<uint64_t>(b) << shift;
      const uint64_t last = first + ((uint64_t{1} << shift) - 1);
      while (g < num_groups - 1 && cum[g + 1] <= first) ++g;
      int64_t h = g;
      while (h < num_groups - 1 && cum[h + 1] <= last) ++h;
      entries[b] = static_cast<uint32_t>(g) | (h > g + 1 ? kSearch : 0u);
    }
    entries[buckets] = static_cast<uint32_t>(num_groups - 1);
    return FineGuide{entries, shift};
  }

  // Same as mixture::group_of_value(value, cumulative, ...): the first g with cumulative[g + 1] > value.
  __attribute__((always_inline)) int64_t group_of(uint64_t value, const int64_t* cumulative) const {
    const uint64_t bucket = value >> shift;
    const uint32_t e = entries[bucket];
    const int64_t lo = static_cast<int64_t>(e & ~kSearch);
    const int64_t g = lo + (static_cast<uint64_t>(cumulative[lo + 1]) <= value ? 1 : 0);
    if (__builtin_expect((e & kSearch) != 0, 0)) {
      return mixture::find_group(cumulative, lo, static_cast<int64_t>(entries[bucket + 1] & ~kSearch), value);
    }
    return g;
  }
};

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
  CallScratch scratch = CallScratch::of_this_thread();
  int32_t* slot_group = scratch.slot_group.get(static_cast<size_t>(batch));
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
  // the offset (see PermutationTable) each chunk's first slot of each group takes. Chunks are limited to
  // 2^19 counters in all (with large K every chunk's row is zeroed, scanned and randomly accessed: more chunks
  // cost more than the finer load balance gains), but one chunk per thread is allowed up to 4 B counters.
  const int64_t counter_budget = std::max<int64_t>(
      std::min<int64_t>(at::get_num_threads(), (4 * batch) / num_groups), (int64_t{1} << 19) / num_groups);
  num_chunks = std::max<int64_t>(1, std::min(num_chunks, counter_budget));
  pending.assign(num_chunks, {});
  // Rows padded to whole pairs of cache lines: threads count adjacent chunks at the same time, and a shared
  // line would bounce between their caches on every increment.
  const int64_t row = (num_groups + 15) & ~int64_t{15};
  int64_t* chunk_next = scratch.chunk_next.get(static_cast<size_t>(num_chunks * row));
  const uint64_t* cumulative_u = reinterpret_cast<const uint64_t*>(cumulative);
  // Tables that stay in L1/L2 need no prefetching; it only costs instructions there.
  const bool large_tables = num_groups > 4096;
  const int fine_bits = FineGuide::bits_for(num_groups, batch);
  const bool use_fine_guide = fine_bits + shape.guide_shift > mixture::kThresholdBits;
  const FineGuide fine =
      use_fine_guide ? FineGuide::build(cumulative, num_groups, fine_bits, mixture::kThresholdBits,
                                        scratch.guide.get((size_t{1} << fine_bits) + 1))
                     : FineGuide{nullptr, 0};
  const SlotRandomPairsKernel slot_random_pairs = select_slot_random_kernel();
  // Large K: the guide, threshold and counter look-ups miss the caches. A three-stage software pipeline over
  // blocks of slots: block b + 2's random words and a prefetch of their guide buckets, block b + 1's guide
  // entries and a prefetch of their threshold and counter lines, block b's groups and counts; so every look-up
  // was requested a whole block before it is used.
  auto draw_large_k = [&](int64_t begin, int64_t end, int64_t* counts) {
    constexpr int kBlock = 2 * kSlotRandomBlockPairs;
    uint64_t ring[3][kBlock];
    int length[3] = {0, 0, 0};
    auto bucket_group = [&](uint64_t value) -> int64_t {
      return use_fine_guide ? fine.entries[value >> fine.shift] & ~FineGuide::kSearch
                            : guide[value >> shape.guide_shift];
    };
    const int64_t blocks = (end - begin + kBlock - 1) / kBlock;
    for (int64_t b = -2; b < blocks; ++b) {
      if (b + 2 < blocks) {
        const int64_t j0 = begin + (b + 2) * kBlock;
        uint64_t* values = ring[(b + 2) % 3];
        const int n = static_cast<int>(std::min<int64_t>(kBlock, end - j0));
        slot_random_pairs(seed, step, 0, static_cast<uint64_t>(j0) >> 1, (n + 1) / 2, values);
        for (int i = 0; i < n; ++i) {
          values[i] >>= 2;  // cumulative[K] == 2^62, so threshold_value is a shift
          __builtin_prefetch(use_fine_guide ? static_cast<const void*>(fine.entries + (values[i] >> fine.shift))
                                            : static_cast<const void*>(guide + (values[i] >> shape.guide_shift)));
        }
        length[(b + 2) % 3] = n;
      }
      if (b + 1 >= 0 && b + 1 < blocks) {
        const uint64_t* values = ring[(b + 1) % 3];
        for (int i = 0; i < length[(b + 1) % 3]; ++i) {
          const int64_t lo_group = bucket_group(values[i]);
          __builtin_prefetch(cumulative_u + lo_group + 1);
          __builtin_prefetch(counts + lo_group, 1);
        }
      }
      if (b >= 0) {
        const uint64_t* values = ring[b % 3];
        int32_t* groups = slot_group + begin + b * kBlock;
        for (int i = 0; i < length[b % 3]; ++i) {
          const int64_t g = use_fine_guide ? fine.group_of(values[i], cumulative)
                                           : mixture::group_of_value(values[i], cumulative, num_groups, guide,
                                                                     shape.guide_shift);
          groups[i] = static_cast<int32_t>(g);
          ++counts[g];
        }
      }
    }
  };
  struct NoState {};
  for_each_chunk(
      num_chunks, [] { return std::make_unique<NoState>(); },
      [&](NoState&, int64_t c) {
        // Blocks of slots: all random words of a block first (the vectorised Philox kernel; chunks start on even
        // slots), then the groups.
        constexpr int kBlock = 2 * kSlotRandomBlockPairs;
        uint64_t values[kBlock];
        int64_t* counts = chunk_next + c * row;
        std::fill(counts, counts + num_groups, int64_t{0});
        const int64_t begin = chunk_begin(c, num_chunks, batch);
        const int64_t end = chunk_begin(c + 1, num_chunks, batch);
        if (large_tables) {
          draw_large_k(begin, end, counts);
          return;
        }
        for (int64_t j0 = begin; j0 < end; j0 += kBlock) {
          const int n = static_cast<int>(std::min<int64_t>(kBlock, end - j0));
          slot_random_pairs(seed, step, 0, static_cast<uint64_t>(j0) >> 1, (n + 1) / 2, values);
          int32_t* groups = slot_group + j0;
          // cumulative[K] == 2^62, so threshold_value is a shift.
          if (use_fine_guide) {
            for (int i = 0; i < n; ++i) {
              const int64_t g = fine.group_of(values[i] >> 2, cumulative);
              groups[i] = static_cast<int32_t>(g);
              ++counts[g];
            }
            continue;
          }
          for (int i = 0; i < n; ++i) {
            const int64_t g = mixture::group_of_value(values[i] >> 2, cumulative, num_groups, guide,
                                                      shape.guide_shift);
            groups[i] = static_cast<int32_t>(g);
            ++counts[g];
          }
        }
      });
  // Exclusive scan over chunks, per group, starting from the group's offset in its current epoch.
  std::vector<int64_t> group_total(num_groups);
  at::parallel_for(0, num_groups, 4096, [&](int64_t gb, int64_t ge) {
    for (int64_t g = gb; g < ge; ++g) {
      const int64_t size = index.ranges[2 * g + 1];
      group_total[g] = size > 0 ? cursor[g] % size : 0;
    }
    for (int64_t c = 0; c < num_chunks; ++c) {
      int64_t* next = chunk_next + c * row;
      for (int64_t g = gb; g < ge; ++g) {
        const int64_t n = next[g];
        next[g] = group_total[g];
        group_total[g] += n;
      }
    }
    for (int64_t g = gb; g < ge; ++g) {
      const int64_t size = index.ranges[2 * g + 1];
      group_total[g] -= size > 0 ? cursor[g] % size : 0;
    }
  });
  const PermutationTable table(index, cursor, group_total.data(), num_groups, scratch);
  for_each_chunk(
      num_chunks,
      [&] { return std::make_unique<SampleWorker>(table, num_groups, out_ids, out_groups); },
      [&](SampleWorker& worker, int64_t c) {
        // With large K the group's counter and record are cache misses (L3 or memory): fetch them far enough
        // ahead to cover a memory latency. The records are read a block later than the counters (by the lane
        // kernel, which waits on all of a gather's loads at once), so they are fetched a block further ahead.
        constexpr int64_t kCounterAhead = 96;
        constexpr int64_t kRecordAhead = kCounterAhead + kPermutationLanes;
        int64_t* next = chunk_next + c * row;
        const int64_t begin = chunk_begin(c, num_chunks, batch);
        const int64_t chunk_end = chunk_begin(c + 1, num_chunks, batch);
        auto prefetch = [&](int64_t j, int64_t end) {
          if (!large_tables) return;
          if (j + kCounterAhead < end) __builtin_prefetch(next + slot_group[j + kCounterAhead], 1);
          if (j + kRecordAhead < end) table.prefetch_far(slot_group[j + kRecordAhead]);
        };
        if (shape.capped) {
          for (int64_t j = begin; j < chunk_end; ++j) {
            prefetch(j, chunk_end);
            const int64_t g = slot_group[j];
            const int64_t offset = next[g]++;
            if (table.epoch_begin(g) + offset >= capacity[g]) {
              pending[c].push_back(j);
              continue;
            }
            if (j >= lo && j < hi) worker.writer.add(j - lo, g, static_cast<uint64_t>(offset));
          }
          return;
        }
        // Slots before this rank's slice only advance the counters; the slice's slots go in blocks.
        const int64_t from = std::max(begin, lo), to = std::min(chunk_end, hi);
        for (int64_t j = begin; j < std::min(from, chunk_end); ++j) {
          prefetch(j, chunk_end);
          ++next[slot_group[j]];
        }
        uint64_t offsets[kPermutationLanes];
        for (int64_t j0 = from; j0 < to; j0 += kPermutationLanes) {
          const int n = static_cast<int>(std::min<int64_t>(kPermutationLanes, to - j0));
          const int32_t* groups = slot_group + j0;
          for (int i = 0; i < n; ++i) {
            prefetch(j0 + i, to);
            offsets[i] = static_cast<uint64_t>(next[groups[i]]++);
          }
          worker.writer.write_block(j0 - lo, groups, offsets, n);
        }
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
  CallScratch scratch = CallScratch::of_this_thread();
  // A guide over the group-major list (bucket of entry q -> first candidate group), like the threshold guide
  // of the i.i.d. draws: O(1) steps and a small table, where a binary search over K would stall on dependent
  // loads. Same result as mixture::find_group over the whole table (what the CUDA kernel does).
  const int entry_bits = bit_width_u64(static_cast<uint64_t>(batch - 1));
  const int guide_bits = std::min(entry_bits, FineGuide::bits_for(num_groups, batch));
  const FineGuide guide = FineGuide::build(slot_counts.data(), num_groups, guide_bits, entry_bits,
                                           scratch.guide.get((size_t{1} << guide_bits) + 1));
  // The slot order is one keyed permutation of [0, B): evaluated a block at a time by the lane kernel, as the
  // one group of a one-record table (batches of <= kSmallPermutationSize slots are left to the scalar code).
  GroupPermutations order_record{};
  order_record.size_bits = static_cast<uint64_t>(batch) > kSmallPermutationSize
                               ? static_cast<uint64_t>(batch) |
                                     (static_cast<uint64_t>(order.left_bits + order.right_bits) << kSizeBitsShift)
                               : 0;
  for (int r = 0; r < kFeistelRounds / 2; ++r) {
    order_record.key_pairs[0][r] = order.keys[2 * r] | (static_cast<uint64_t>(order.keys[2 * r + 1]) << 32);
  }
  const bool large_tables = num_groups > 4096;
  std::vector<int64_t> group_total(num_groups);
  for (int64_t g = 0; g < num_groups; ++g) group_total[g] = slot_counts[g + 1] - slot_counts[g];
  const PermutationTable table(index, cursor, group_total.data(), num_groups, scratch);
  const int64_t num_chunks = chunk_count(batch);
  std::vector<std::vector<int64_t>> pending(num_chunks);
  const SampleLanesKernel sample_lanes = select_sample_lanes_kernel();
  static const int32_t kGroupZero[kPermutationLanes] = {};
  for_each_chunk(
      num_chunks,
      [&] { return std::make_unique<SampleWorker>(table, num_groups, out_ids, out_groups); },
      [&](SampleWorker& worker, int64_t c) {
        const int64_t begin = chunk_begin(c, num_chunks, batch);
        const int64_t end = chunk_begin(c + 1, num_chunks, batch);
        const int64_t from = shape.capped ? begin : std::max(begin, lo);
        const int64_t to = shape.capped ? end : std::min(end, hi);
        // Blocks of slots in stages (entries, then groups, then samples), each stage prefetching what the next
        // one reads, so that with large K the table look-ups of a block overlap.
        constexpr int kBlock = kPermutationLanes;
        uint64_t position[kBlock];
        int64_t entry[kBlock];
        int32_t group[kBlock];
        uint64_t offset[kBlock];
        int32_t left_over[kBlock];
        for (int64_t j0 = from; j0 < to; j0 += kBlock) {
          const int n = static_cast<int>(std::min<int64_t>(kBlock, to - j0));
          for (int i = 0; i < n; ++i) position[i] = static_cast<uint64_t>(j0 + i);
          const int left = sample_lanes(&order_record, kGroupZero, position, n, entry, left_over);
          for (int k = 0; k < left; ++k) entry[left_over[k]] = static_cast<int64_t>(order(position[left_over[k]]));
          if (large_tables) {
            for (int i = 0; i < n; ++i) __builtin_prefetch(guide.entries + (entry[i] >> guide.shift));
            for (int i = 0; i < n; ++i) {
              const uint32_t lo_group = guide.entries[entry[i] >> guide.shift] & ~FineGuide::kSearch;
              __builtin_prefetch(slot_counts.data() + lo_group + 1);
            }
          }
          for (int i = 0; i < n; ++i) {
            group[i] = static_cast<int32_t>(guide.group_of(static_cast<uint64_t>(entry[i]), slot_counts.data()));
            if (large_tables) {
              __builtin_prefetch(cursor + group[i]);
              table.prefetch(group[i]);
            }
          }
          for (int i = 0; i < n; ++i) {
            const int64_t g = group[i];
            offset[i] = static_cast<uint64_t>(cursor[g] + (entry[i] - slot_counts[g]) - table.epoch_begin(g));
          }
          if (!shape.capped) {
            worker.writer.write_block(j0 - lo, group, offset, n);
            continue;
          }
          for (int i = 0; i < n; ++i) {
            const int64_t j = j0 + i;
            const int64_t g = group[i];
            if (entry[i] - slot_counts[g] >= remaining[g]) {
              pending[c].push_back(j);
              continue;
            }
            if (j >= lo && j < hi) worker.writer.add(j - lo, g, offset[i]);
          }
        }
      });
  for (int64_t g = 0; g < num_groups; ++g) {
    const int64_t count = slot_counts[g + 1] - slot_counts[g];
    cursor[g] += shape.capped ? std::min(count, remaining[g]) : count;
  }
  return concat(pending);
}

void check_threshold_table(const mixture::SampleShape& shape, const at::Tensor& cumulative) {
  const int64_t* cumulative_ptr = cumulative.data_ptr<int64_t>();
  TORCH_CHECK(static_cast<uint64_t>(cumulative_ptr[shape.num_groups]) == mixture::kThresholdTotal &&
                  cumulative_ptr[0] == 0,
              "cumulative must be a threshold table made by mixture_thresholds (from 0 to 2^62)");
}

// The draw itself, into outputs already checked (or freshly allocated) by the two entry points below.
void sample_into(const mixture::SampleShape& shape, const at::Tensor& group_ranges,
                 const std::optional<at::Tensor>& csr_sample_ids, const at::Tensor& cumulative,
                 const at::Tensor& guide, const at::Tensor& cursor, const std::optional<at::Tensor>& residual,
                 const std::optional<at::Tensor>& capacity, int64_t seed, int64_t step, const at::Tensor& out_ids,
                 const at::Tensor& out_groups) {
  const int64_t* cumulative_ptr = cumulative.data_ptr<int64_t>();
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
}

std::tuple<at::Tensor, at::Tensor> mixture_sample_cpu(
    const at::Tensor& group_ranges, const std::optional<at::Tensor>& csr_sample_ids, const at::Tensor& cumulative,
    const at::Tensor& guide, const at::Tensor& cursor, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& capacity, int64_t seed, int64_t step, int64_t batch_size, int64_t rank,
    int64_t world_size) {
  const mixture::SampleShape shape = mixture::check_sample_args(group_ranges, csr_sample_ids, cumulative, guide,
                                                                cursor, residual, capacity, step, batch_size, rank,
                                                                world_size);
  check_threshold_table(shape, cumulative);
  const int64_t per_rank = shape.slice_end - shape.slice_begin;
  at::Tensor out_ids = at::empty({per_rank}, group_ranges.options());
  at::Tensor out_groups = at::empty({per_rank}, group_ranges.options());
  advise_huge_pages(out_ids);
  advise_huge_pages(out_groups);
  sample_into(shape, group_ranges, csr_sample_ids, cumulative, guide, cursor, residual, capacity, seed, step, out_ids,
              out_groups);
  return {out_ids, out_groups};
}

// The out= variant (mixture_sample_into): the same draws written into caller-owned outputs (no allocation, no
// first-touch page faults when the caller reuses them across steps).
void mixture_sample_into_cpu(
    const at::Tensor& group_ranges, const std::optional<at::Tensor>& csr_sample_ids, const at::Tensor& cumulative,
    const at::Tensor& guide, const at::Tensor& cursor, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& capacity, int64_t seed, int64_t step, int64_t batch_size, int64_t rank,
    int64_t world_size, const at::Tensor& sample_ids, const at::Tensor& group_ids) {
  const mixture::SampleShape shape = mixture::check_sample_args(group_ranges, csr_sample_ids, cumulative, guide,
                                                                cursor, residual, capacity, step, batch_size, rank,
                                                                world_size);
  check_threshold_table(shape, cumulative);
  mixture::check_sample_outputs(sample_ids, group_ids, shape, group_ranges, csr_sample_ids, cumulative, guide,
                                cursor, residual, capacity);
  sample_into(shape, group_ranges, csr_sample_ids, cumulative, guide, cursor, residual, capacity, seed, step,
              sample_ids, group_ids);
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
  m.impl("mixture_sample_into", &mixture_sample_into_cpu);
  m.impl("mixture_thresholds", &mixture_thresholds_cpu);
  m.impl("philox4x32", &philox4x32_cpu);
  m.impl("keyed_permutation", &keyed_permutation_cpu);
}

}  // namespace aioli_ext
