// Every schema of the aioli_ext operator library, declared once. Backends only add TORCH_LIBRARY_IMPL
// blocks (csrc/cpu/*_cpu.cpp, csrc/cuda/*_cuda.cu); fake kernels live in aioli_ext/ops.py.
#include <torch/library.h>

TORCH_LIBRARY(aioli_ext, m) {
  // ---- group cross-entropy (csrc/cpu/group_loss_cpu.cpp, csrc/cuda/group_loss_cuda.cu) ----
  // logits [N, V] (fp32/fp16/bf16/fp64), targets [N] int64, group_ids [N] or [N / seq_len] (int32/int64):
  // row i belongs to group group_ids[i / seq_len] (seq_len = 1: per-token ids).
  // Returns loss [N] (fp32; fp64 for fp64 logits; 0 where ignored), group_sums [K] (same float type),
  // token_counts [K] int64.
  m.def("group_cross_entropy(Tensor logits, Tensor targets, Tensor group_ids, int num_groups, "
        "int ignore_index, int seq_len) -> (Tensor loss, Tensor group_sums, Tensor token_counts)");
  // Training forward: the statistics plus a new grad_logits [N, V] (logits' dtype) with
  // grad_logits[i, :] = group_scale[g(i)] * (softmax(logits[i]) - onehot(targets[i])), computed in the same
  // pass over each row. Autograd of aioli_ext.group_cross_entropy uses it with group_scale = 1.
  m.def("group_cross_entropy_with_grad(Tensor logits, Tensor targets, Tensor group_ids, int num_groups, "
        "int ignore_index, int seq_len, Tensor group_scale) "
        "-> (Tensor loss, Tensor group_sums, Tensor token_counts, Tensor grad_logits)");
  // Same statistics, plus grad_logits[i, :] = group_scale[g(i)] * (softmax(logits[i]) - onehot(targets[i]))
  // (zero rows where ignored), written into grad_logits in the same pass over each row. grad_logits may be
  // logits itself (in place). group_scale [K] is fp32 (fp64 for fp64 logits).
  m.def("group_cross_entropy_fused(Tensor logits, Tensor targets, Tensor group_ids, int num_groups, "
        "int ignore_index, int seq_len, Tensor group_scale, Tensor(a!) grad_logits) "
        "-> (Tensor loss, Tensor group_sums, Tensor token_counts)");

  // In place x[i, :] *= row_scale[i]; x [N, V] contiguous (fp32/fp16/bf16/fp64), row_scale [N] fp32 (fp64 for
  // fp64 x). CPU only: backward of group_cross_entropy scales its saved gradient rows with it (torch's CPU
  // multiply of a bf16 tensor by an fp32 column is ~10x slower than memory speed); other devices use mul_.
  m.def("scale_rows_(Tensor(a!) x, Tensor row_scale) -> ()");

  // ---- CPU gradient buffer cache (csrc/cpu/gradient_buffer_cache.cpp) ----
  // Large CPU gradients of group_cross_entropy_with_grad are reused across calls once nothing else references
  // them. max_bytes (when given) sets the cache's limit (0 disables it and frees its idle buffers); clear drops
  // every cached buffer. Returns [max_bytes, cached_bytes, idle_bytes, buffers, reuses, allocations].
  m.def("gradient_buffer_cache(int? max_bytes=None, bool clear=False) -> int[]");

  // ---- CPU kernel selection (csrc/cpu/cpu_capability.cpp) ----
  // Returns the capability the CPU kernels dispatch to ("default", "avx2", "avx512"). None only asks; a
  // non-empty `force` pins one for this process (tests use it to exercise each path); "" resets to the
  // detected one.
  m.def("cpu_capability(str? force=None) -> str");

  // ---- mixture sampling (csrc/cpu/mixture_sample_cpu.cpp, csrc/cuda/mixture_sample_cuda.cu) ----
  // One global batch of batch_size slots at `step`; returns this rank's slice [batch_size / world_size] of
  // sample ids (int64) and group ids (int64). Groups own index ranges: flat index group_starts[g] + perm(pos)
  // for pos < group_sizes[g]; the sample id is that flat index, or csr_sample_ids[flat] when given.
  // cumulative [K + 1] int64 and guide [buckets + 1] int32 come from mixture_thresholds. cursor [K] int64
  // (same device) is advanced in place. residual [K] int64 (always a CPU tensor) selects the systematic mode and
  // is updated in place; capacity [K] int64 (same device) caps each group's stream (max_epochs * size).
  m.def("mixture_sample(Tensor group_ranges, Tensor? csr_sample_ids, Tensor cumulative, "
        "Tensor guide, Tensor(a!) cursor, Tensor(b!)? residual, Tensor? capacity, int seed, int step, "
        "int batch_size, int rank, int world_size) -> (Tensor sample_ids, Tensor group_ids)");
  // The same draws written into caller-owned outputs, each exactly [batch_size / world_size] int64, contiguous,
  // on the index's device and sharing memory with no input (never resized): reusing them across steps saves the
  // allocation and the first-touch page faults of fresh outputs.
  // Returns nothing, as mutating custom ops must for torch.compile to functionalise them.
  m.def("mixture_sample_into(Tensor group_ranges, Tensor? csr_sample_ids, Tensor cumulative, "
        "Tensor guide, Tensor(a!) cursor, Tensor(b!)? residual, Tensor? capacity, int seed, int step, "
        "int batch_size, int rank, int world_size, Tensor(c!) sample_ids, Tensor(d!) group_ids) -> ()");
  // Host-side table builder (CPU tensors): proportions [K] float32/float64 -> cumulative fixed-point thresholds
  // [K + 1] int64 (0 .. 2^62) and a guide table [next_pow2(K) + 1] int32. Groups where open_groups [K] bool is
  // false get weight zero.
  m.def("mixture_thresholds(Tensor proportions, Tensor group_sizes, Tensor? open_groups) "
        "-> (Tensor cumulative, Tensor guide)");
  // Test ops over the very header code the sampler runs (csrc/philox.h, csrc/permutation.h):
  // counters [N, 4] int64 holding 32-bit words, key [2] int64 -> Philox4x32-10 outputs [N, 4] int64.
  m.def("philox4x32(Tensor counters, Tensor key) -> Tensor");
  // positions [N] int64 in [0, n) -> their images under the permutation of group `group`, epoch `epoch`.
  m.def("keyed_permutation(Tensor positions, int n, int seed, int group, int epoch) -> Tensor");
}
