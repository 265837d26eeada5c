// CPU entry points of the group cross-entropy ops (schemas and their contract: csrc/registration.cpp).
//
// Work split and determinism: every row's loss (and gradient row) is computed by the same code whatever thread
// runs it, so the per-row outputs do not depend on the thread count. The per-group sums are then reduced by
// one sequential pass over the N per-row losses in row order, accumulating in fp64: O(N) work next to the
// O(N * V) kernel (16 us for N = 16384), bit-identical for any thread count, and it needs only one [K]
// accumulator, so K up to millions costs no (blocks x K) partial buffers.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#include <unistd.h>
#endif

#include "cpu/cpu_capability.h"
#include "cpu/gradient_buffer_cache.h"
#include "cpu/group_loss_kernel.h"
#include "group_loss.h"
#include "group_loss_checks.h"

namespace aioli_ext {
namespace {

// Elements per parallel task at least, so short rows are batched; a row of a real vocabulary is one task.
constexpr int64_t kMinElemsPerTask = 1 << 16;

LogitsDtype to_logits_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return LogitsDtype::Half;
    case at::kBFloat16: return LogitsDtype::BFloat16;
    case at::kDouble: return LogitsDtype::Double;
    default: return LogitsDtype::Float;
  }
}

// Gradient buffers smaller than this stay in cache for their consumer: plain stores.
constexpr int64_t kStreamMinBytes = int64_t(16) << 20;

// True when the memory page holding `p` is resident (Linux mincore; false elsewhere).
bool page_resident(const void* p) {
#ifdef __linux__
  const auto page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  unsigned char resident = 0;
  void* start = reinterpret_cast<void*>(reinterpret_cast<uintptr_t>(p) & ~(page - 1));
  return mincore(start, page, &resident) == 0 && (resident & 1);
#else
  (void)p;
  return false;
#endif
}

// Non-temporal stores save the read-for-ownership of every gradient line (a third of the traffic) when
// writing into a large, already-used buffer (grad_out reused across steps). Into fresh pages they lose: the
// kernel has just zeroed each page into the cache on first touch, and streaming past it doubles the writes.
// So: out of place, large, and resident at both ends.
bool should_stream_gradient(const at::Tensor& grad_logits, const at::Tensor& logits) {
  const int64_t bytes = grad_logits.numel() * grad_logits.element_size();
  if (bytes < kStreamMinBytes || grad_logits.const_data_ptr() == logits.const_data_ptr()) return false;
  const auto* first = static_cast<const char*>(grad_logits.const_data_ptr());
  return page_resident(first) && page_resident(first + bytes - 1);
}


using RowsKernel = void (*)(const GroupLossRowsArgs&);

RowsKernel select_rows_kernel(LogitsDtype dtype) {
  if (dtype == LogitsDtype::Double) return &group_loss_rows_default;
  switch (cpu_capability()) {
    case CpuCapability::AVX512: return &group_loss_rows_avx512;
    case CpuCapability::AVX2: return &group_loss_rows_avx2;
    default: return &group_loss_rows_default;
  }
}

template <typename group_id_t>
void check_values_typed(const int64_t* targets, const group_id_t* group_ids, int64_t rows, int64_t vocab,
                        int64_t num_groups, int64_t ignore_index, int64_t seq_len) {
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t t = targets[i];
    TORCH_CHECK(t == ignore_index || (t >= 0 && t < vocab), "targets must be in [0, V) = [0, ", vocab,
                ") or equal ignore_index (", ignore_index, "), got targets[", i, "] = ", t);
  }
  const int64_t n_ids = rows / seq_len;
  for (int64_t j = 0; j < n_ids; ++j) {
    const int64_t g = static_cast<int64_t>(group_ids[j]);
    TORCH_CHECK(g >= 0 && g < num_groups, "group_ids must be in [0, num_groups) = [0, ", num_groups, "), got group_ids[",
                j, "] = ", g);
  }
}

void check_values(const at::Tensor& targets, const at::Tensor& group_ids, int64_t rows, int64_t vocab,
                  int64_t num_groups, int64_t ignore_index, int64_t seq_len) {
  if (group_ids.scalar_type() == at::kLong) {
    check_values_typed(targets.const_data_ptr<int64_t>(), group_ids.const_data_ptr<int64_t>(), rows, vocab,
                       num_groups, ignore_index, seq_len);
  } else {
    check_values_typed(targets.const_data_ptr<int64_t>(), group_ids.const_data_ptr<int32_t>(), rows, vocab,
                       num_groups, ignore_index, seq_len);
  }
}

template <typename acc_t, typename group_id_t>
void reduce_groups_typed(const acc_t* loss, const int64_t* targets, const group_id_t* group_ids, int64_t rows,
                         int64_t num_groups, int64_t ignore_index, int64_t seq_len, acc_t* group_sums,
                         int64_t* token_counts) {
  std::vector<double> sums(static_cast<size_t>(num_groups), 0.0);
  for (int64_t i = 0; i < rows; ++i) {
    if (targets[i] == ignore_index) continue;
    const int64_t g = row_group(group_ids, i, seq_len);
    sums[g] += static_cast<double>(loss[i]);
    token_counts[g] += 1;
  }
  for (int64_t g = 0; g < num_groups; ++g) group_sums[g] = static_cast<acc_t>(sums[g]);
}

void reduce_groups(const at::Tensor& loss, const at::Tensor& targets, const at::Tensor& group_ids, int64_t rows,
                   int64_t num_groups, int64_t ignore_index, int64_t seq_len, at::Tensor& group_sums,
                   at::Tensor& token_counts) {
  auto run = [&](auto acc_zero) {
    using acc_t = decltype(acc_zero);
    if (group_ids.scalar_type() == at::kLong) {
      reduce_groups_typed(loss.const_data_ptr<acc_t>(), targets.const_data_ptr<int64_t>(),
                          group_ids.const_data_ptr<int64_t>(), rows, num_groups, ignore_index, seq_len,
                          group_sums.mutable_data_ptr<acc_t>(), token_counts.mutable_data_ptr<int64_t>());
    } else {
      reduce_groups_typed(loss.const_data_ptr<acc_t>(), targets.const_data_ptr<int64_t>(),
                          group_ids.const_data_ptr<int32_t>(), rows, num_groups, ignore_index, seq_len,
                          group_sums.mutable_data_ptr<acc_t>(), token_counts.mutable_data_ptr<int64_t>());
    }
  };
  if (loss.scalar_type() == at::kDouble) {
    run(double(0));
  } else {
    run(float(0));
  }
}

// The shared body of the three ops. grad_logits undefined: statistics only.
std::tuple<at::Tensor, at::Tensor, at::Tensor> group_cross_entropy_impl(
    const at::Tensor& logits_in, const at::Tensor& targets_in, const at::Tensor& group_ids_in, int64_t num_groups,
    int64_t ignore_index, int64_t seq_len, const at::Tensor* group_scale_in, at::Tensor* grad_logits) {
  const auto sizes = check_group_cross_entropy_args(logits_in, targets_in, group_ids_in, num_groups, seq_len);
  TORCH_CHECK(logits_in.device().is_cpu(), "logits must be a CPU tensor for the CPU kernel, got ",
              logits_in.device());
  at::Tensor group_scale;
  if (group_scale_in) {
    check_group_scale(*group_scale_in, logits_in, num_groups);
    group_scale = group_scale_in->contiguous();
  }
  if (grad_logits) {
    check_grad_logits(*grad_logits, logits_in);
  }
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor targets = targets_in.contiguous();
  const at::Tensor group_ids = group_ids_in.contiguous();
  const int64_t rows = sizes.rows;
  const int64_t vocab = sizes.vocab;
  check_values(targets, group_ids, rows, vocab, num_groups, ignore_index, seq_len);

  const auto acc_dtype = group_loss_acc_dtype(logits);
  at::Tensor loss = at::empty({rows}, logits.options().dtype(acc_dtype));
  at::Tensor group_sums = at::zeros({num_groups}, logits.options().dtype(acc_dtype));
  at::Tensor token_counts = at::zeros({num_groups}, logits.options().dtype(at::kLong));
  if (rows == 0) return {loss, group_sums, token_counts};

  GroupLossRowsArgs args{};
  args.logits = logits.const_data_ptr();
  args.grad_logits = grad_logits ? grad_logits->mutable_data_ptr() : nullptr;
  args.targets = targets.const_data_ptr<int64_t>();
  args.group_ids = group_ids.const_data_ptr();
  args.group_ids_int64 = group_ids.scalar_type() == at::kLong;
  args.seq_len = seq_len;
  args.group_scale = group_scale.defined() ? group_scale.const_data_ptr() : nullptr;
  args.loss = loss.mutable_data_ptr();
  args.dtype = to_logits_dtype(logits.scalar_type());
  args.vocab = vocab;
  args.ignore_index = ignore_index;
  args.stream_grad = grad_logits && should_stream_gradient(*grad_logits, logits);
  const RowsKernel kernel = select_rows_kernel(args.dtype);
  const int64_t grain = std::max<int64_t>(1, kMinElemsPerTask / vocab);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    GroupLossRowsArgs task = args;
    task.row_begin = begin;
    task.row_end = end;
    kernel(task);
  });

  reduce_groups(loss, targets, group_ids, rows, num_groups, ignore_index, seq_len, group_sums, token_counts);
  return {loss, group_sums, token_counts};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_cross_entropy_cpu(const at::Tensor& logits,
                                                                       const at::Tensor& targets,
                                                                       const at::Tensor& group_ids,
                                                                       int64_t num_groups, int64_t ignore_index,
                                                                       int64_t seq_len) {
  return group_cross_entropy_impl(logits, targets, group_ids, num_groups, ignore_index, seq_len, nullptr, nullptr);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> group_cross_entropy_with_grad_cpu(
    const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& group_ids, int64_t num_groups,
    int64_t ignore_index, int64_t seq_len, const at::Tensor& group_scale) {
  check_dim(logits, "logits", 2, "[N, V]");
  at::Tensor grad_logits = empty_gradient_buffer(logits.sizes(), logits.scalar_type());
  auto [loss, group_sums, token_counts] = group_cross_entropy_impl(logits, targets, group_ids, num_groups,
                                                                   ignore_index, seq_len, &group_scale, &grad_logits);
  return {loss, group_sums, token_counts, grad_logits};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_cross_entropy_fused_cpu(
    const at::Tensor& logits, const at::Tensor& targets, const at::Tensor& group_ids, int64_t num_groups,
    int64_t ignore_index, int64_t seq_len, const at::Tensor& group_scale, at::Tensor& grad_logits) {
  return group_cross_entropy_impl(logits, targets, group_ids, num_groups, ignore_index, seq_len, &group_scale,
                                  &grad_logits);
}

void scale_rows_cpu(at::Tensor& x, const at::Tensor& row_scale) {
  check_dim(x, "x", 2, "[N, V]");
  check_dtype(x, "x", {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble}, "float32, float16, bfloat16 or float64");
  TORCH_CHECK(x.is_contiguous(), "x must be contiguous");
  check_same_device(x, "x", row_scale, "row_scale");
  const auto want = group_loss_acc_dtype(x);
  TORCH_CHECK(row_scale.scalar_type() == want, "row_scale must be ", want == at::kDouble ? "float64" : "float32",
              " for ", x.scalar_type(), " x, got ", row_scale.scalar_type());
  TORCH_CHECK(row_scale.dim() == 1 && row_scale.size(0) == x.size(0), "row_scale must be 1-D [N] with N = x.size(0) = ",
              x.size(0), ", got shape ", row_scale.sizes());
  const int64_t rows = x.size(0);
  const int64_t vocab = x.size(1);
  if (rows == 0 || vocab == 0) return;
  const at::Tensor scale = row_scale.contiguous();
  ScaleRowsArgs args{};
  args.x = x.mutable_data_ptr();
  args.row_scale = scale.const_data_ptr();
  args.dtype = to_logits_dtype(x.scalar_type());
  args.vocab = vocab;
  auto kernel = &scale_rows_default;
  if (args.dtype != LogitsDtype::Double) {
    switch (cpu_capability()) {
      case CpuCapability::AVX512: kernel = &scale_rows_avx512; break;
      case CpuCapability::AVX2: kernel = &scale_rows_avx2; break;
      default: break;
    }
  }
  at::parallel_for(0, rows, std::max<int64_t>(1, kMinElemsPerTask / vocab), [&](int64_t begin, int64_t end) {
    ScaleRowsArgs task = args;
    task.row_begin = begin;
    task.row_end = end;
    kernel(task);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(aioli_ext, CPU, m) {
  m.impl("scale_rows_", &scale_rows_cpu);
  m.impl("group_cross_entropy", &group_cross_entropy_cpu);
  m.impl("group_cross_entropy_with_grad", &group_cross_entropy_with_grad_cpu);
  m.impl("group_cross_entropy_fused", &group_cross_entropy_fused_cpu);
}

}  // namespace aioli_ext
