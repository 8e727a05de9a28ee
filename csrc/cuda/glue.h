// ATen side of the CUDA kernels: helpers for the *_glue.cpp files of csrc/cuda/.
//
// Only CPU-build torch headers are used (the current CUDA stream comes through c10's
// device-guard interface, not ATen/cuda), so the glue also compiles, and links, against
// a CPU build of torch: scripts/check_cuda_build.sh does that in CI.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include "cuda/api.h"

namespace vos {
namespace cuda {

#ifdef VOS_CUDA_EMU
// The CPU emulator build (tests/cuda_emu): the kernels run on CPU tensors, no stream.
inline void* current_stream(const at::Tensor&) { return nullptr; }
#else
// The current CUDA stream of the tensor's device, as a cudaStream_t.
inline void* current_stream(const at::Tensor& t) {
  c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
  return impl.getStream(t.device()).native_handle();
}
#endif

inline void check_launch(int code, const char* op) {
  TORCH_CHECK(code == 0, "vos_kernels::", op, ": CUDA error: ", error_string(code));
}

inline Dtype dtype_of(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return Dtype::kFloat32;
    case at::kDouble: return Dtype::kFloat64;
    case at::kHalf: return Dtype::kFloat16;
    case at::kBFloat16: return Dtype::kBFloat16;
    default:
      TORCH_CHECK(false, "vos_kernels::", op, ": ", name, " must be float32, float64, float16 or bfloat16, got ",
                  t.scalar_type());
  }
  return Dtype::kFloat32;
}

inline void check_cuda(const at::Tensor& t, const char* op, const char* name) {
#ifdef VOS_CUDA_EMU
  TORCH_CHECK(t.is_cpu(), "vos_kernels::", op, " (CUDA emulator): ", name, " must be a CPU tensor, got ", t.device());
#else
  TORCH_CHECK(t.is_cuda(), "vos_kernels::", op, ": ", name, " must be a CUDA tensor, got ", t.device());
#endif
}

// torch.get_float32_matmul_precision(): "highest" -> fp32-accurate products.
inline MatmulPrecision matmul_precision() {
  return at::globalContext().float32MatmulPrecision() == at::Float32MatmulPrecision::HIGHEST
             ? MatmulPrecision::kIEEE
             : MatmulPrecision::kTF32;
}

// Output dtype of every op: float64 for float64 inputs, else float32.
inline at::ScalarType out_dtype(const at::Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace cuda
}  // namespace vos
