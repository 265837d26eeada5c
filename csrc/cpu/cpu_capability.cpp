#include "cpu/cpu_capability.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>

#include <c10/util/Exception.h>
#include <torch/library.h>

namespace aioli_ext {
namespace {

bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if defined(__x86_64__) || defined(__i386__)
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

bool parse(const std::string& s, CpuCapability* out) {
  if (s == "default") { *out = CpuCapability::Default; return true; }
  if (s == "avx2") { *out = CpuCapability::AVX2; return true; }
  if (s == "avx512") { *out = CpuCapability::AVX512; return true; }
  return false;
}

CpuCapability detect() {
  CpuCapability best = cpu_has_avx512() ? CpuCapability::AVX512
                       : cpu_has_avx2() ? CpuCapability::AVX2
                                        : CpuCapability::Default;
  if (const char* env = std::getenv("AIOLI_EXT_CPU_CAPABILITY")) {
    CpuCapability cap;
    TORCH_CHECK(parse(env, &cap), "AIOLI_EXT_CPU_CAPABILITY must be one of default, avx2, avx512, got '", env, "'");
    if (static_cast<int>(cap) < static_cast<int>(best)) best = cap;
  }
  return best;
}

CpuCapability detected() {
  static const CpuCapability cap = detect();
  return cap;
}

// -1: not forced.
std::atomic<int> forced{-1};

std::string cpu_capability_op(std::optional<c10::string_view> force) {
  if (!force.has_value()) return cpu_capability_name(cpu_capability());
  std::string f(force->data(), force->size());
  if (!f.empty()) {
    CpuCapability cap;
    TORCH_CHECK(parse(f, &cap), "force must be one of '', 'default', 'avx2', 'avx512', got '", f, "'");
    TORCH_CHECK(static_cast<int>(cap) <= static_cast<int>(detected()), "force='", f,
                "' is not supported by this CPU (best: ", cpu_capability_name(detected()), ")");
    forced.store(static_cast<int>(cap));
  } else {
    forced.store(-1);
  }
  return cpu_capability_name(cpu_capability());
}

}  // namespace

CpuCapability cpu_capability() {
  int f = forced.load(std::memory_order_relaxed);
  return f >= 0 ? static_cast<CpuCapability>(f) : detected();
}

const char* cpu_capability_name(CpuCapability c) {
  switch (c) {
    case CpuCapability::AVX512: return "avx512";
    case CpuCapability::AVX2: return "avx2";
    default: return "default";
  }
}

// No tensor arguments, so no dispatch key: a catch-all kernel.
TORCH_LIBRARY_FRAGMENT(aioli_ext, m) {
  m.impl("cpu_capability", &cpu_capability_op);
}

}  // namespace aioli_ext
