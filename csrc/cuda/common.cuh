// Device helpers shared by the CUDA kernels of csrc/cuda/ (torch-free; see api.h).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/api.h"

#define VOS_CUDA_TRY(expr)                                   \
  do {                                                       \
    cudaError_t vos_err_ = (expr);                           \
    if (vos_err_ != cudaSuccess) return static_cast<int>(vos_err_); \
  } while (0)

// After a launch: the launch's own error (bad configuration, too much shared memory).
#define VOS_CUDA_CHECK_LAUNCH() VOS_CUDA_TRY(cudaGetLastError())

namespace vos {
namespace cuda {

template <typename T>
__host__ __device__ inline T ceil_div(T a, T b) {
  return (a + b - 1) / b;
}

inline cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

}  // namespace cuda
}  // namespace vos
