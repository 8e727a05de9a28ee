// Host helpers declared in api.h.
#include "cuda/common.cuh"

namespace vos {
namespace cuda {

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

int max_dynamic_smem(int device) {
  int bytes = 0;
  if (cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free error so that the next launch check is clean
    return 48 * 1024;
  }
  return bytes;
}

}  // namespace cuda
}  // namespace vos
