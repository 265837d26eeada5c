// Argument checks of the group cross-entropy ops, shared by the CPU and CUDA entry points so both backends
// reject the same input with the same message (host code only). Value checks (targets in [0, V), group ids in
// [0, K)) need the data and are done by each backend.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "checks.h"

namespace aioli_ext {

struct GroupLossSizes {
  int64_t rows;   // N
  int64_t vocab;  // V
};

// Dtype of the per-token loss, the group sums and group_scale: fp64 for fp64 logits, else fp32.
inline at::ScalarType group_loss_acc_dtype(const at::Tensor& logits) {
  return logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline GroupLossSizes check_group_cross_entropy_args(const at::Tensor& logits, const at::Tensor& targets,
                                                     const at::Tensor& group_ids, int64_t num_groups,
                                                     int64_t seq_len) {
  check_same_device(logits, "logits", targets, "targets");
  check_same_device(logits, "logits", group_ids, "group_ids");
  check_dim(logits, "logits", 2, "[N, V]");
  check_dtype(logits, "logits", {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble},
              "float32, float16, bfloat16 or float64");
  const int64_t rows = logits.size(0);
  const int64_t vocab = logits.size(1);
  TORCH_CHECK(vocab >= 1, "logits must have at least one column (vocabulary size V >= 1), got shape ",
              logits.sizes());
  check_dtype(targets, "targets", {at::kLong}, "int64");
  TORCH_CHECK(targets.dim() == 1 && targets.size(0) == rows, "targets must be 1-D [N] with N = logits.size(0) = ",
              rows, ", got shape ", targets.sizes());
  check_dtype(group_ids, "group_ids", {at::kInt, at::kLong}, "int32 or int64");
  TORCH_CHECK(num_groups >= 1, "num_groups must be >= 1, got ", num_groups);
  TORCH_CHECK(seq_len >= 1, "seq_len must be >= 1, got ", seq_len);
  TORCH_CHECK(rows % seq_len == 0, "seq_len must divide the number of rows N = ", rows, ", got seq_len = ",
              seq_len);
  if (seq_len == 1) {
    TORCH_CHECK(group_ids.dim() == 1 && group_ids.size(0) == rows,
                "group_ids must be 1-D [N] (one id per row) with N = logits.size(0) = ", rows, ", got shape ",
                group_ids.sizes());
  } else {
    TORCH_CHECK(group_ids.dim() == 1 && group_ids.size(0) == rows / seq_len,
                "group_ids must be 1-D [N / seq_len] (one id per sequence of seq_len rows) = [", rows / seq_len,
                "], got shape ", group_ids.sizes());
  }
  return {rows, vocab};
}

inline void check_group_scale(const at::Tensor& group_scale, const at::Tensor& logits, int64_t num_groups) {
  check_same_device(logits, "logits", group_scale, "group_scale");
  const auto want = group_loss_acc_dtype(logits);
  TORCH_CHECK(group_scale.scalar_type() == want, "group_scale must be ", want == at::kDouble ? "float64" : "float32",
              " (", want == at::kDouble ? "float64" : "float32", " for ", logits.scalar_type(), " logits), got ",
              group_scale.scalar_type());
  TORCH_CHECK(group_scale.dim() == 1 && group_scale.size(0) == num_groups,
              "group_scale must be 1-D [num_groups] = [", num_groups, "], got shape ", group_scale.sizes());
}

inline void check_grad_logits(const at::Tensor& grad_logits, const at::Tensor& logits) {
  check_same_device(logits, "logits", grad_logits, "grad_logits");
  TORCH_CHECK(grad_logits.scalar_type() == logits.scalar_type(), "grad_logits must have the logits' dtype ",
              logits.scalar_type(), ", got ", grad_logits.scalar_type());
  TORCH_CHECK(grad_logits.sizes() == logits.sizes(), "grad_logits must have the logits' shape ", logits.sizes(),
              ", got ", grad_logits.sizes());
  TORCH_CHECK(grad_logits.is_contiguous(), "grad_logits must be contiguous (it is written row by row)");
  // In place (grad_logits is logits) is allowed: the kernels read a whole row before writing its gradient.
  TORCH_CHECK(at::get_overlap_status(grad_logits, logits) != at::MemOverlapStatus::Partial,
              "grad_logits must be logits itself (in place) or not overlap it, got a partial overlap");
}

}  // namespace aioli_ext
