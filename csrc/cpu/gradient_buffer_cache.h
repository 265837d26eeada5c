// Reuse of large CPU gradient buffers across training steps (csrc/cpu/gradient_buffer_cache.cpp).
#pragma once

#include <ATen/core/Tensor.h>

namespace aioli_ext {

// A new contiguous CPU tensor of `sizes` and `dtype` with undefined contents, like at::empty: the caller must
// write every element. A large request (>= 4 MiB) is served from the gradient buffer cache when a buffer of
// the same byte size is referenced by nothing but the cache -- no tensor, view, storage object or weak
// reference anywhere holds it, so it is memory an allocator could hand out again -- which saves the page
// faults of fresh pages (most of the cost of filling a fresh [N, V] gradient). Otherwise the buffer is newly
// allocated (transparent huge pages advised) and, if it fits the cache's byte limit, remembered.
at::Tensor empty_gradient_buffer(at::IntArrayRef sizes, at::ScalarType dtype);

}  // namespace aioli_ext
