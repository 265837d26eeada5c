// CUDA kernels of the mixture sampler. Per-slot math lives in csrc/mixture_sample.h (the code the CPU kernels
// run); the host-side pieces (systematic allocation, redraw rounds for capped groups) are the CPU's own
// functions from csrc/mixture_sample_host.h. This file only adds the parallel structure:
//   iid:        draw kernel (a thread per slot pair) -> stable radix sort of (group, slot) -> run starts ->
//               place kernel (rank = index - run start) -> cursor advance at run ends;
//   systematic: host allocation -> one thread per slot of the slice (group and rank come straight from the
//               cumulative counts) -> cursor advance per group.
#include <algorithm>
#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/nonzero.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cub/device/device_radix_sort.cuh>
#include <torch/library.h>

#include "checks.h"
#include "mixture_sample.h"
#include "mixture_sample_host.h"

namespace aioli_ext {
namespace {

constexpr int kThreads = 256;

int64_t blocks_for(int64_t n) { return (n + kThreads - 1) / kThreads; }

struct DeviceIndex {
  const int64_t* ranges;  // [K, 2]: start, size
  const int64_t* csr;     // nullptr for implicit ranges
  uint64_t seed;

  __device__ __forceinline__ int64_t sample(int64_t group, int64_t position) const {
    const int64_t start = ranges[2 * group];
    const uint64_t size = static_cast<uint64_t>(ranges[2 * group + 1]);
    const int64_t flat = start + static_cast<int64_t>(mixture::group_stream_offset(
                                     seed, static_cast<uint64_t>(group), size, static_cast<uint64_t>(position)));
    return csr != nullptr ? csr[flat] : flat;
  }
};

__global__ void mixture_draw_kernel(uint64_t seed, uint64_t step, int64_t batch, const int64_t* cumulative,
                                    int64_t num_groups, const int32_t* guide, int guide_shift, uint32_t* slot_group,
                                    int32_t* slot_index) {
  const int64_t pair = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t j = 2 * pair;
  if (j >= batch) return;
  const mixture::SlotPairRandom r = mixture::slot_pair_random(seed, step, 0, static_cast<uint64_t>(pair));
  slot_group[j] = static_cast<uint32_t>(mixture::draw_group(r.even, cumulative, num_groups, guide, guide_shift));
  slot_index[j] = static_cast<int32_t>(j);
  if (j + 1 < batch) {
    slot_group[j + 1] =
        static_cast<uint32_t>(mixture::draw_group(r.odd, cumulative, num_groups, guide, guide_shift));
    slot_index[j + 1] = static_cast<int32_t>(j + 1);
  }
}

// run_start[g] = first index of group g in the sorted order (entries of absent groups are never read).
__global__ void mixture_run_start_kernel(int64_t batch, const uint32_t* sorted_group, int32_t* run_start) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= batch) return;
  if (i == 0 || sorted_group[i - 1] != sorted_group[i]) run_start[sorted_group[i]] = static_cast<int32_t>(i);
}

// The sort is stable, so within a run the slots are in slot order: rank = i - run start.
__global__ void mixture_place_sorted_kernel(int64_t batch, const uint32_t* sorted_group, const int32_t* sorted_slot,
                                            const int32_t* run_start, const int64_t* cursor,
                                            const int64_t* capacity, DeviceIndex index, int64_t slice_begin,
                                            int64_t slice_end, int64_t* out_ids, int64_t* out_groups,
                                            uint8_t* overflow) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= batch) return;
  const int64_t g = sorted_group[i];
  const int64_t j = sorted_slot[i];
  const int64_t position = cursor[g] + (i - run_start[g]);
  if (capacity != nullptr && position >= capacity[g]) {
    overflow[j] = 1;
    return;
  }
  if (j >= slice_begin && j < slice_end) {
    out_ids[j - slice_begin] = index.sample(g, position);
    out_groups[j - slice_begin] = g;
  }
}

__global__ void mixture_advance_sorted_kernel(int64_t batch, const uint32_t* sorted_group, const int32_t* run_start,
                                              int64_t* cursor, const int64_t* capacity) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= batch) return;
  const uint32_t g = sorted_group[i];
  if (i + 1 < batch && sorted_group[i + 1] == g) return;  // only the last slot of each run
  const int64_t count = i - run_start[g] + 1;
  const int64_t room = capacity != nullptr ? capacity[g] - cursor[g] : count;
  cursor[g] += count < room ? count : (room > 0 ? room : 0);
}

__global__ void mixture_place_systematic_kernel(KeyedPermutation order, const int64_t* slot_counts,
                                                int64_t num_groups, int64_t from, int64_t to, const int64_t* cursor,
                                                const int64_t* capacity, DeviceIndex index, int64_t slice_begin,
                                                int64_t slice_end, int64_t* out_ids, int64_t* out_groups,
                                                uint8_t* overflow) {
  const int64_t j = from + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= to) return;
  const int64_t q = static_cast<int64_t>(order(static_cast<uint64_t>(j)));
  const int64_t g = mixture::find_group(slot_counts, 0, num_groups - 1, static_cast<uint64_t>(q));
  const int64_t position = cursor[g] + (q - slot_counts[g]);
  if (capacity != nullptr && position >= capacity[g]) {
    overflow[j] = 1;
    return;
  }
  if (j >= slice_begin && j < slice_end) {
    out_ids[j - slice_begin] = index.sample(g, position);
    out_groups[j - slice_begin] = g;
  }
}

__global__ void mixture_advance_counts_kernel(int64_t num_groups, const int64_t* slot_counts, int64_t* cursor,
                                              const int64_t* capacity) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= num_groups) return;
  const int64_t count = slot_counts[g + 1] - slot_counts[g];
  const int64_t room = capacity != nullptr ? capacity[g] - cursor[g] : count;
  cursor[g] += count < room ? count : (room > 0 ? room : 0);
}

// Slots placed by the host redraw rounds: (offset in the slice, group, flat index into the group ranges).
__global__ void mixture_scatter_placed_kernel(int64_t count, const int64_t* placed, const int64_t* csr,
                                              int64_t* out_ids, int64_t* out_groups) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= count) return;
  const int64_t slot = placed[3 * i];
  const int64_t flat = placed[3 * i + 2];
  out_ids[slot] = csr != nullptr ? csr[flat] : flat;
  out_groups[slot] = placed[3 * i + 1];
}

at::Tensor on_device(const at::Tensor& t, const at::Device& device) {
  return t.device() == device ? t : t.to(device, /*non_blocking=*/true);
}

mixture::SampleShape check_cuda_sample_args(
    const at::Tensor& group_ranges, const std::optional<at::Tensor>& csr_sample_ids, const at::Tensor& cumulative,
    const at::Tensor& guide, const at::Tensor& cursor, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& capacity, int64_t step, int64_t batch_size, int64_t rank, int64_t world_size) {
  TORCH_CHECK(group_ranges.is_cuda(), "group_ranges must be a CUDA tensor for the CUDA kernel, got ",
              group_ranges.device());
  // The threshold tables may be CPU tensors: the systematic allocation reads them on the host.
  return mixture::check_sample_args(group_ranges, csr_sample_ids, cumulative, guide, cursor, residual, capacity,
                                    step, batch_size, rank, world_size, /*tables_may_be_on_host=*/true);
}

// The draw itself, into outputs already checked (or freshly allocated) by the two entry points below.
void sample_into(const mixture::SampleShape& shape, const at::Tensor& group_ranges,
                 const std::optional<at::Tensor>& csr_sample_ids, const at::Tensor& cumulative,
                 const at::Tensor& guide, const at::Tensor& cursor, const std::optional<at::Tensor>& residual,
                 const std::optional<at::Tensor>& capacity, int64_t seed, int64_t step, const at::Tensor& out_ids,
                 const at::Tensor& out_groups) {
  const at::Device device = group_ranges.device();
  const at::Tensor cumulative_dev_or_host = cumulative;
  c10::cuda::CUDAGuard guard(device);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index());

  const int64_t num_groups = shape.num_groups;
  const int64_t batch = shape.batch_size;
  const DeviceIndex index{group_ranges.data_ptr<int64_t>(),
                          shape.csr ? csr_sample_ids->data_ptr<int64_t>() : nullptr, static_cast<uint64_t>(seed)};
  int64_t* cursor_ptr = cursor.data_ptr<int64_t>();
  const int64_t* capacity_ptr = shape.capped ? capacity->data_ptr<int64_t>() : nullptr;
  at::Tensor overflow;
  if (shape.capped) overflow = at::zeros({batch}, group_ranges.options().dtype(at::kByte));
  uint8_t* overflow_ptr = shape.capped ? overflow.data_ptr<uint8_t>() : nullptr;
  at::Tensor cumulative_host;  // filled when the host needs the table

  if (shape.systematic) {
    cumulative_host = cumulative_dev_or_host.cpu();
    const int64_t* table = cumulative_host.data_ptr<int64_t>();
    TORCH_CHECK(static_cast<uint64_t>(table[num_groups]) == mixture::kThresholdTotal && table[0] == 0,
                "cumulative must be a threshold table made by mixture_thresholds (from 0 to 2^62)");
    at::Tensor counts_host =
        at::empty({num_groups + 1}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
    mixture::systematic_allocate(table, num_groups, batch, residual->data_ptr<int64_t>(),
                                 counts_host.data_ptr<int64_t>());
    const at::Tensor slot_counts = counts_host.to(device, /*non_blocking=*/true);
    const KeyedPermutation order =
        mixture::slot_order_permutation(static_cast<uint64_t>(seed), static_cast<uint64_t>(step),
                                        static_cast<uint64_t>(batch));
    const int64_t from = shape.capped ? 0 : shape.slice_begin;
    const int64_t to = shape.capped ? batch : shape.slice_end;
    if (to > from) {
      mixture_place_systematic_kernel<<<blocks_for(to - from), kThreads, 0, stream>>>(
          order, slot_counts.data_ptr<int64_t>(), num_groups, from, to, cursor_ptr, capacity_ptr, index,
          shape.slice_begin, shape.slice_end, out_ids.data_ptr<int64_t>(), out_groups.data_ptr<int64_t>(),
          overflow_ptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    mixture_advance_counts_kernel<<<blocks_for(num_groups), kThreads, 0, stream>>>(
        num_groups, slot_counts.data_ptr<int64_t>(), cursor_ptr, capacity_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    const at::Tensor table = on_device(cumulative, device);
    const at::Tensor guide_table = on_device(guide, device);
    // One scratch allocation carved into the five int32 arrays and cub's temporary storage: at small B the
    // allocator calls would otherwise cost as much as the kernels.
    const int key_bits = std::max(1, bit_width_u64(static_cast<uint64_t>(num_groups - 1)));
    size_t temp_bytes = 0;
    C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, static_cast<const uint32_t*>(nullptr),
                                                   static_cast<uint32_t*>(nullptr),
                                                   static_cast<const int32_t*>(nullptr),
                                                   static_cast<int32_t*>(nullptr), static_cast<int>(batch), 0,
                                                   key_bits, stream));
    auto aligned = [](int64_t bytes) { return (bytes + 255) / 256 * 256; };
    const int64_t array_bytes = aligned(4 * batch);
    const int64_t scratch_bytes =
        4 * array_bytes + aligned(4 * num_groups) + aligned(static_cast<int64_t>(temp_bytes));
    at::Tensor scratch = at::empty({scratch_bytes}, group_ranges.options().dtype(at::kByte));
    uint8_t* base = scratch.data_ptr<uint8_t>();
    uint32_t* slot_group = reinterpret_cast<uint32_t*>(base);
    int32_t* slot_index = reinterpret_cast<int32_t*>(base + array_bytes);
    uint32_t* sorted_group = reinterpret_cast<uint32_t*>(base + 2 * array_bytes);
    int32_t* sorted_slot = reinterpret_cast<int32_t*>(base + 3 * array_bytes);
    int32_t* run_start = reinterpret_cast<int32_t*>(base + 4 * array_bytes);
    void* temp = base + 4 * array_bytes + aligned(4 * num_groups);
    mixture_draw_kernel<<<blocks_for((batch + 1) / 2), kThreads, 0, stream>>>(
        static_cast<uint64_t>(seed), static_cast<uint64_t>(step), batch, table.data_ptr<int64_t>(), num_groups,
        guide_table.data_ptr<int32_t>(), shape.guide_shift, slot_group, slot_index);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // Radix sort is stable; only the bits that can differ between group ids take part (one pass for K <= 256).
    C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp, temp_bytes, slot_group, sorted_group, slot_index,
                                                   sorted_slot, static_cast<int>(batch), 0, key_bits, stream));
    mixture_run_start_kernel<<<blocks_for(batch), kThreads, 0, stream>>>(batch, sorted_group, run_start);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    mixture_place_sorted_kernel<<<blocks_for(batch), kThreads, 0, stream>>>(
        batch, sorted_group, sorted_slot, run_start, cursor_ptr, capacity_ptr, index, shape.slice_begin,
        shape.slice_end, out_ids.data_ptr<int64_t>(), out_groups.data_ptr<int64_t>(), overflow_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    mixture_advance_sorted_kernel<<<blocks_for(batch), kThreads, 0, stream>>>(batch, sorted_group, run_start,
                                                                               cursor_ptr, capacity_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  if (shape.capped) {
    // Rare path (a group reached its cap inside this call): the redraw rounds run on the host, in the very
    // function the CPU kernel uses, so both backends place these slots identically.
    const at::Tensor pending_slots = at::nonzero(overflow).reshape({-1}).cpu();
    if (pending_slots.numel() > 0) {
      if (!cumulative_host.defined()) cumulative_host = cumulative_dev_or_host.cpu();
      at::Tensor cursor_host = cursor.cpu();
      const at::Tensor capacity_host = capacity->cpu();
      const at::Tensor ranges_host = group_ranges.cpu();
      const int64_t* pending_ptr = pending_slots.data_ptr<int64_t>();
      std::vector<int64_t> pending(pending_ptr, pending_ptr + pending_slots.numel());
      std::vector<mixture::PlacedSlot> placed;
      TORCH_CHECK(mixture::redraw_pending_slots(static_cast<uint64_t>(seed), static_cast<uint64_t>(step),
                                                num_groups, cumulative_host.data_ptr<int64_t>(),
                                                capacity_host.data_ptr<int64_t>(), cursor_host.data_ptr<int64_t>(),
                                                std::move(pending), &placed),
                  mixture::exhausted_message());
      cursor.copy_(cursor_host);
      const int64_t* ranges = ranges_host.data_ptr<int64_t>();
      std::vector<int64_t> in_slice;
      for (const auto& p : placed) {
        if (p.slot < shape.slice_begin || p.slot >= shape.slice_end) continue;
        const uint64_t offset = mixture::group_stream_offset(static_cast<uint64_t>(seed),
                                                             static_cast<uint64_t>(p.group),
                                                             static_cast<uint64_t>(ranges[2 * p.group + 1]),
                                                             static_cast<uint64_t>(p.position));
        in_slice.push_back(p.slot - shape.slice_begin);
        in_slice.push_back(p.group);
        in_slice.push_back(ranges[2 * p.group] + static_cast<int64_t>(offset));
      }
      const int64_t count = static_cast<int64_t>(in_slice.size() / 3);
      if (count > 0) {
        // A blocking copy from pageable memory: in_slice may go away once it returns.
        const at::Tensor placed_dev =
            at::from_blob(in_slice.data(), {count * 3}, at::TensorOptions().dtype(at::kLong)).to(device);
        mixture_scatter_placed_kernel<<<blocks_for(count), kThreads, 0, stream>>>(
            count, placed_dev.data_ptr<int64_t>(), index.csr, out_ids.data_ptr<int64_t>(),
            out_groups.data_ptr<int64_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
  }
}

std::tuple<at::Tensor, at::Tensor> mixture_sample_cuda(
    const at::Tensor& group_ranges, const std::optional<at::Tensor>& csr_sample_ids, const at::Tensor& cumulative,
    const at::Tensor& guide, const at::Tensor& cursor, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& capacity, int64_t seed, int64_t step, int64_t batch_size, int64_t rank,
    int64_t world_size) {
  const mixture::SampleShape shape = check_cuda_sample_args(group_ranges, csr_sample_ids, cumulative, guide, cursor,
                                                            residual, capacity, step, batch_size, rank, world_size);
  const int64_t per_rank = shape.slice_end - shape.slice_begin;
  at::Tensor out_ids = at::empty({per_rank}, group_ranges.options());
  at::Tensor out_groups = at::empty({per_rank}, group_ranges.options());
  sample_into(shape, group_ranges, csr_sample_ids, cumulative, guide, cursor, residual, capacity, seed, step, out_ids,
              out_groups);
  return {out_ids, out_groups};
}

// The out= variant (mixture_sample_into): the same draws written into caller-owned outputs (no allocation).
void mixture_sample_into_cuda(
    const at::Tensor& group_ranges, const std::optional<at::Tensor>& csr_sample_ids, const at::Tensor& cumulative,
    const at::Tensor& guide, const at::Tensor& cursor, const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& capacity, int64_t seed, int64_t step, int64_t batch_size, int64_t rank,
    int64_t world_size, const at::Tensor& sample_ids, const at::Tensor& group_ids) {
  const mixture::SampleShape shape = check_cuda_sample_args(group_ranges, csr_sample_ids, cumulative, guide, cursor,
                                                            residual, capacity, step, batch_size, rank, world_size);
  mixture::check_sample_outputs(sample_ids, group_ids, shape, group_ranges, csr_sample_ids, cumulative, guide,
                                cursor, residual, capacity);
  sample_into(shape, group_ranges, csr_sample_ids, cumulative, guide, cursor, residual, capacity, seed, step,
              sample_ids, group_ids);
}

__global__ void philox4x32_kernel(int64_t n, const int64_t* counters, uint32_t k0, uint32_t k1, int64_t* out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int64_t* w = counters + 4 * i;
  const Philox4x32Value r = philox4x32_10(static_cast<uint32_t>(w[0]), static_cast<uint32_t>(w[1]),
                                          static_cast<uint32_t>(w[2]), static_cast<uint32_t>(w[3]), k0, k1);
  for (int j = 0; j < 4; ++j) out[4 * i + j] = static_cast<int64_t>(r.v[j]);
}

at::Tensor philox4x32_cuda(const at::Tensor& counters, const at::Tensor& key) {
  check_dtype(counters, "counters", {at::kLong}, "int64");
  TORCH_CHECK(counters.dim() == 2 && counters.size(1) == 4, "counters must have shape [N, 4], got ",
              counters.sizes());
  check_dtype(key, "key", {at::kLong}, "int64");
  TORCH_CHECK(key.dim() == 1 && key.size(0) == 2, "key must have shape [2], got ", key.sizes());
  const at::Tensor c = counters.contiguous();
  TORCH_CHECK(c.numel() == 0 || !(c.lt(0).logical_or(c.gt(0xFFFFFFFFll))).any().item<bool>(),
              "counters must hold 32-bit words in [0, 2^32)");
  const at::Tensor k = key.cpu();
  const int64_t* k_ptr = k.data_ptr<int64_t>();
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK(k_ptr[i] >= 0 && k_ptr[i] <= 0xFFFFFFFFll, "key must hold 32-bit words in [0, 2^32), got ",
                k_ptr[i]);
  }
  c10::cuda::CUDAGuard guard(c.device());
  at::Tensor out = at::empty({c.size(0), 4}, c.options());
  if (c.size(0) > 0) {
    philox4x32_kernel<<<blocks_for(c.size(0)), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        c.size(0), c.data_ptr<int64_t>(), static_cast<uint32_t>(k_ptr[0]), static_cast<uint32_t>(k_ptr[1]),
        out.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

__global__ void keyed_permutation_kernel(int64_t count, const int64_t* positions, KeyedPermutation perm,
                                         int64_t* out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= count) return;
  out[i] = static_cast<int64_t>(perm(static_cast<uint64_t>(positions[i])));
}

at::Tensor keyed_permutation_cuda(const at::Tensor& positions, int64_t n, int64_t seed, int64_t group,
                                  int64_t epoch) {
  check_dtype(positions, "positions", {at::kLong}, "int64");
  TORCH_CHECK(n >= 1 && static_cast<uint64_t>(n) <= mixture::kThresholdTotal, "n must be in [1, 2^62], got ", n);
  TORCH_CHECK(group >= 0 && group <= 0xFFFFFFFFll, "group must be in [0, 2^32), got ", group);
  TORCH_CHECK(epoch >= 0, "epoch must be >= 0, got ", epoch);
  const at::Tensor pos = positions.contiguous();
  // Cycle walking from outside [0, 2^m) would never end: check the range (a sync; this is a test op).
  TORCH_CHECK(pos.numel() == 0 || !(pos.lt(0).logical_or(pos.ge(n))).any().item<bool>(),
              "positions must be in [0, n=", n, ")");
  const KeyedPermutation perm = mixture::group_epoch_permutation(
      static_cast<uint64_t>(seed), static_cast<uint64_t>(group), static_cast<uint64_t>(epoch),
      static_cast<uint64_t>(n));
  c10::cuda::CUDAGuard guard(pos.device());
  at::Tensor out = at::empty_like(pos);
  if (pos.numel() > 0) {
    keyed_permutation_kernel<<<blocks_for(pos.numel()), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        pos.numel(), pos.data_ptr<int64_t>(), perm, out.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(aioli_ext, CUDA, m) {
  m.impl("mixture_sample", &mixture_sample_cuda);
  m.impl("mixture_sample_into", &mixture_sample_into_cuda);
  m.impl("philox4x32", &philox4x32_cuda);
  m.impl("keyed_permutation", &keyed_permutation_cuda);
}

}  // namespace aioli_ext
