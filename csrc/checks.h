// Argument checks shared by the CPU and CUDA entry points. Every message names the argument and the rule.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace aioli_ext {

inline void check_dtype(const at::Tensor& t, const char* name, std::initializer_list<at::ScalarType> allowed,
                        const char* rule) {
  for (auto s : allowed) {
    if (t.scalar_type() == s) return;
  }
  TORCH_CHECK(false, name, " must be ", rule, ", got ", t.scalar_type());
}

inline void check_dim(const at::Tensor& t, const char* name, int64_t dim, const char* shape) {
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D ", shape, ", got ", t.dim(), "-D tensor of shape ",
              t.sizes());
}

inline void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK(a.device() == b.device(), a_name, " and ", b_name, " must be on the same device, got ", a.device(),
              " and ", b.device());
}

}  // namespace aioli_ext
