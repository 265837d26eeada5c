// Interface between the host entry points (group_loss_cpu.cpp, built without ISA flags) and the per-row
// kernels compiled once per ISA (group_loss_default.cpp, group_loss_avx2.cpp, group_loss_avx512.cpp).
//
// Only plain data and raw pointers cross this boundary: inline ATen/c10 code compiled with AVX-512 flags must
// never be the copy the linker keeps for a caller built for a plainer CPU (one definition rule), so the ISA
// files expose nothing but the three functions below, each with its own name.
#pragma once

#include <cstdint>

namespace aioli_ext {

enum class LogitsDtype { Float, Half, BFloat16, Double };

// One call processes rows [row_begin, row_end) of a row-major [N, V] logits matrix.
struct GroupLossRowsArgs {
  const void* logits;        // [N, V], element type `dtype`
  void* grad_logits;         // [N, V], element type `dtype`, or nullptr (statistics only); may equal logits
  const int64_t* targets;    // [N], validated: in [0, V) or == ignore_index
  const void* group_ids;     // [N / seq_len], int32 or int64, validated: in [0, K)
  bool group_ids_int64;
  int64_t seq_len;
  const void* group_scale;   // [K] float (double for Double logits); read only when grad_logits != nullptr
  void* loss;                // [N] float (double for Double logits); 0 where ignored
  LogitsDtype dtype;
  int64_t vocab;
  int64_t ignore_index;
  int64_t row_begin;
  int64_t row_end;
  // Write grad_logits with non-temporal stores (never when it is logits itself).
  bool stream_grad;
};

// x[i, :] *= row_scale[i] for rows [row_begin, row_end) of a row-major [N, V] matrix, in fp32 (fp64 for Double).
struct ScaleRowsArgs {
  void* x;                 // [N, V], element type `dtype`
  const void* row_scale;   // [N] float (double for Double)
  LogitsDtype dtype;
  int64_t vocab;
  int64_t row_begin;
  int64_t row_end;
};

// Per row i (not ignored): loss[i] = logsumexp(logits[i]) - logits[i, targets[i]], accumulated in fp32 (fp64
// for Double); with grad_logits, also grad_logits[i, :] = s * (softmax(logits[i]) - onehot(targets[i])),
// s = group_scale[g(i)], written while the row is still in cache. Ignored rows: loss 0, gradient row 0, and
// their logits are not read.
void group_loss_rows_default(const GroupLossRowsArgs& args);
void group_loss_rows_avx2(const GroupLossRowsArgs& args);    // Float, Half, BFloat16 only
void group_loss_rows_avx512(const GroupLossRowsArgs& args);  // Float, Half, BFloat16 only

void scale_rows_default(const ScaleRowsArgs& args);
void scale_rows_avx2(const ScaleRowsArgs& args);    // Float, Half, BFloat16 only
void scale_rows_avx512(const ScaleRowsArgs& args);  // Float, Half, BFloat16 only

}  // namespace aioli_ext
