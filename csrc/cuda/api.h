// Shared by the CUDA kernels (*.cu) and their ATen glue (*_glue.cpp): plain C++ only,
// no torch and no CUDA headers, so that both sides compile on machines without either.
//
// Conventions of every launcher in csrc/cuda/:
//   - raw device pointers, sizes as int64_t, the stream as `void*` (a cudaStream_t);
//   - returns 0 on success or the cudaError_t value of the first failing call (launch
//     errors included: each launcher checks cudaGetLastError after its launches);
//   - never allocates: a launcher that needs scratch memory has a `*_workspace_bytes`
//     companion, and the glue passes an at::empty buffer of that size;
//   - inputs are contiguous (the glue calls .contiguous()), labels are int32.
#pragma once

#include <cstdint>

namespace vos {
namespace cuda {

// Element type of a floating-point tensor argument.
enum class Dtype : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

// How float32 dot products run on the tensor cores (torch.get_float32_matmul_precision):
//   kIEEE: "highest", fp32-accurate (3xTF32 split products, or FFMA);
//   kTF32: "high"/"medium", one TF32 product (10-bit mantissa inputs, fp32 accumulation).
// float16/bfloat16 inputs are exact in TF32 and always take one TF32 product.
enum class MatmulPrecision : int { kIEEE = 0, kTF32 = 1 };

// cudaGetErrorString of a launcher's return code.
const char* error_string(int code);

// The largest dynamic shared memory a block may opt into on `device` (bytes).
int max_dynamic_smem(int device);

}  // namespace cuda
}  // namespace vos
