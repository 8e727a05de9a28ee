// Launchers of the CUDA global-matching kernels (labelled_nearest_sqdist,
// fb_global_matching) and of nearest_sqdist_backward. Plain C++: included by
// global_matching.cu and by global_glue.cpp. Conventions: cuda/api.h.
#pragma once

#include <cstdint>

#include "cuda/api.h"

namespace vos {
namespace cuda {

// Shape of one global-matching call. query [B, Nq, C]; reference [B, T, Hr, Wr, C]
// (Nr = T*Hr*Wr pixels per batch element); labels [B, T, Hr, Wr] int32.
struct GlobalMatchingShape {
  int64_t B, Nq, T, Hr, Wr, C, L, rate;
};

// Scratch bytes of global_matching_launch for this shape and input dtype.
int64_t global_matching_workspace_bytes(const GlobalMatchingShape& s, Dtype dtype);

// query/reference: `dtype` (the same for both), contiguous. labels: int32; entries outside
// [0, L) are never matched. bias: [L] (float64 for kFloat64, else float32) or null.
// bias == null: writes out0 = sqdist [B, L, Nq] and out_index [B, L, Nq] (int64).
// bias != null: writes out0 = fg, out_bg = bg (both [B, L, Nq]) and out_index.
// Outputs are float64 for kFloat64, else float32. `device`: the CUDA device ordinal (for
// the shared-memory limit). workspace: global_matching_workspace_bytes() bytes.
int global_matching_launch(const void* query, const void* reference, const int32_t* labels,
                           const void* bias, void* out0, void* out_bg, int64_t* out_index,
                           const GlobalMatchingShape& s, Dtype dtype, MatmulPrecision precision,
                           void* workspace, int64_t workspace_bytes, int device, void* stream);

// Scratch bytes of nearest_sqdist_backward_launch: B*Nr + 1 int64 segment starts.
int64_t nearest_sqdist_backward_workspace_bytes(int64_t B, int64_t Nr);

// nearest_sqdist_backward on float32 or float64 (dtype) tensors, all contiguous:
//   grad [B, M, Nq], query [B, Nq, C], reference [B, Nr, C], index [B, M, Nq] int64
//   (entries outside [0, Nr) contribute nothing);
//   sorted_keys / order [B*M*Nq] int64: the stable ascending sort of
//   key = b*Nr + index (B*Nr for skipped entries) and its permutation (the glue sorts).
// Writes grad_query [B, Nq, C] and grad_reference [B, Nr, C] (dtype), both fully,
// deterministically (fixed summation order, no atomics).
int nearest_sqdist_backward_launch(const void* grad, const void* query, const void* reference,
                                   const int64_t* index, const int64_t* sorted_keys,
                                   const int64_t* order, void* grad_query, void* grad_reference,
                                   int64_t B, int64_t M, int64_t Nq, int64_t Nr, int64_t C,
                                   Dtype dtype, void* workspace, int64_t workspace_bytes,
                                   void* stream);

}  // namespace cuda
}  // namespace vos
