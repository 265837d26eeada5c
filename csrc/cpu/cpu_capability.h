// Run-time choice of the vectorised CPU kernels. Kernels compiled per ISA (files *_avx2.cpp, *_avx512.cpp,
// built with that ISA's flags) are selected here from what the CPU supports.
#pragma once

namespace aioli_ext {

enum class CpuCapability { Default = 0, AVX2 = 1, AVX512 = 2 };

// The capability kernels dispatch to now: the best the CPU supports (capped by the environment variable
// AIOLI_EXT_CPU_CAPABILITY=default|avx2|avx512), unless forced through the cpu_capability op.
CpuCapability cpu_capability();

const char* cpu_capability_name(CpuCapability c);

}  // namespace aioli_ext
