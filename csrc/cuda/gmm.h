// Launchers of the GMM prototype ops on CUDA (csrc/cuda/gmm.cu); plain C++, see api.h.
#pragma once

#include <cstdint>

#include "cuda/api.h"

namespace vos {
namespace cuda {

// gmm_em workspace (bytes) for x [B, N, C] of `dtype` and K means on the current device.
int64_t gmm_em_workspace_bytes(int64_t B, int64_t N, int64_t C, int64_t K, Dtype dtype);

// gmm_em: x [B, N, C] (dtype), means_in [B, K, C], mask [B, N] or null, means_out
// [B, K, C], resp [B, N, K]; means_in, mask and the outputs are float32 (float64 when
// dtype is kFloat64). kernel 0 = dot, 1 = l2. Requires B, N, K ≥ 1, num_iters ≥ 1
// (C may be 0). means_in and means_out must not alias.
int gmm_em(const void* x, const void* means_in, const void* mask, void* means_out, void* resp, void* workspace,
           int64_t workspace_bytes, int64_t B, int64_t N, int64_t C, int64_t K, int64_t num_iters, double kappa,
           int kernel, bool normalize_means, Dtype dtype, MatmulPrecision precision, void* stream);

}  // namespace cuda
}  // namespace vos
