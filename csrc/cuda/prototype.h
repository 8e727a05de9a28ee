// Launchers of the prototype read / value-prototype ops on CUDA (csrc/cuda/prototype.cu);
// plain C++, see api.h.
#pragma once

#include <cstdint>

#include "cuda/api.h"

namespace vos {
namespace cuda {

// prototype_values workspace (bytes) for values [B, N, CV], resp [B, N, K] of `dtype` on
// the current device (0 when no split of N is needed).
int64_t prototype_values_workspace_bytes(int64_t B, int64_t N, int64_t CV, int64_t K, Dtype dtype);

// prototype_values: values [B, N, CV] and resp [B, N, K] (both `dtype`), out [B, K, CV]
// float32 (float64 when dtype is kFloat64): Σ_n r_nk v_n / (1e-6 + Σ_n r_nk).
// Requires B, N, K, CV ≥ 1; workspace of prototype_values_workspace_bytes (may be null
// when that is 0).
int prototype_values(const void* values, const void* resp, void* out, void* workspace, int64_t workspace_bytes,
                     int64_t B, int64_t N, int64_t CV, int64_t K, Dtype dtype, MatmulPrecision precision,
                     void* stream);

// prototype_attention: query [B, Nq, C], keys [B, K, C], values [B, K, CV] (all `dtype`),
// out [B, Nq, CV] and attn [B, Nq, K] float32 (float64 when dtype is kFloat64).
// kernel 0 = dot (kappa·q·μ), 1 = l2 (kappa·q·μ − kappa/2·‖μ‖²). Requires B, Nq, K ≥ 1
// (C and CV may be 0). No workspace.
int prototype_attention(const void* query, const void* keys, const void* values, void* out, void* attn, int64_t B,
                        int64_t Nq, int64_t C, int64_t K, int64_t CV, double kappa, int kernel, Dtype dtype,
                        MatmulPrecision precision, void* stream);

}  // namespace cuda
}  // namespace vos
