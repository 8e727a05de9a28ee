// Launchers of the CUDA kernel of topk_memory_read (csrc/cuda/memory_read.cu); plain C++,
// included by the .cu and by its ATen glue (memory_glue.cpp).
// Conventions: csrc/cuda/api.h (raw pointers, int64_t sizes, stream as void*, returns 0
// or a cudaError_t value, never allocates).
#pragma once

#include <cstdint>

#include "cuda/api.h"

namespace vos {
namespace cuda {

// Scratch bytes the launcher needs (at least 1). Same sizes as the launcher:
// K is k' = min(k, Nm); key_dtype is kFloat32 or kFloat64 (float16/bfloat16 keys are
// converted to float32 by the glue); usage_mode as the launcher's (0 when usage is null).
int64_t topk_memory_read_workspace_bytes(int64_t B, int64_t Nq, int64_t Nm, int64_t CK, int64_t K,
                                         Dtype key_dtype, int usage_mode, int device);

// query_key [B,Nq,CK], memory_key [B,Nm,CK] (key_dtype: float32 or float64), memory_value
// [B,Nm,CV] (value_dtype: any; float64 only with float64 keys), all contiguous.
// Outputs: readout [B,Nq,CV], weight [B,Nq,K] (float64 for float64 keys, else float32),
// index [B,Nq,K] int64. usage: [B,Nm] float32 with strides (usage_sb, usage_sn), updated in
// place when non-null and usage_mode is 1 (hits) or 2 (softmax weights).
// precision: kIEEE = 3xTF32 affinities, kTF32 = one TF32 product (float32 keys only).
// Requires B, Nq, Nm, K >= 1 and K <= Nm.
int topk_memory_read(const void* query_key, const void* memory_key, Dtype key_dtype, const void* memory_value,
                     Dtype value_dtype, MatmulPrecision precision, int64_t B, int64_t Nq, int64_t Nm, int64_t CK,
                     int64_t CV, int64_t K, double scale, float* usage, int64_t usage_sb, int64_t usage_sn,
                     int usage_mode, void* readout, int64_t* index, void* weight, void* workspace,
                     int64_t workspace_bytes, int device, void* stream);

}  // namespace cuda
}  // namespace vos
