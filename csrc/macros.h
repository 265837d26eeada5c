// Macros shared by host (C++) and device (CUDA) code.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define AIOLI_HOST_DEVICE __host__ __device__ __forceinline__
#define AIOLI_DEVICE __device__ __forceinline__
#else
#define AIOLI_HOST_DEVICE inline
#define AIOLI_DEVICE inline
#endif
