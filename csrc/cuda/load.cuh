// Element loads and stores shared by the EM and prototype kernels (torch-free): conversion
// of an input element to its accumulation type, 4-wide vector loads from shared memory,
// 4-wide stores at the end of a row.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace vos {
namespace cuda {

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// float16 / bfloat16 inputs accumulate in float32; float32 and float64 in their own type.
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

// Four consecutive elements (16 bytes for float, 2 × 16 for double; p must be aligned so).
__device__ __forceinline__ void ld4(const float* p, float (&v)[4]) {
  const float4 t = *reinterpret_cast<const float4*>(p);
  v[0] = t.x;
  v[1] = t.y;
  v[2] = t.z;
  v[3] = t.w;
}
__device__ __forceinline__ void ld4(const double* p, double (&v)[4]) {
  const double2 a = *reinterpret_cast<const double2*>(p);
  const double2 b = *reinterpret_cast<const double2*>(p + 2);
  v[0] = a.x;
  v[1] = a.y;
  v[2] = b.x;
  v[3] = b.y;
}

// v[0..4) into dst[0..4), of which the first `valid` lie inside the row (none if valid ≤ 0):
// one 16-byte store when `vec` (the row length is a multiple of 4 and dst 16-byte aligned,
// so a row's last group is whole), else element by element.
__device__ __forceinline__ void st4(float* dst, const float (&v)[4], int64_t valid, bool vec) {
  if (vec) {
    if (valid > 0) *reinterpret_cast<float4*>(dst) = make_float4(v[0], v[1], v[2], v[3]);
  } else {
#pragma unroll
    for (int p = 0; p < 4; ++p)
      if (p < valid) dst[p] = v[p];
  }
}

}  // namespace cuda
}  // namespace vos
