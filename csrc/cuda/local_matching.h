// Launchers of the CUDA kernels of fb_multi_local_matching and fb_instance_pooling
// (local_matching.cu). Plain C++: included by the .cu and by local_glue.cpp.
// Conventions: csrc/cuda/api.h (raw pointers, int64 sizes, stream as void*, return 0 or a
// cudaError_t value, contiguous inputs, int32 labels).
#pragma once

#include <cstdint>

#include "cuda/api.h"

namespace vos {
namespace cuda {

// fb_multi_local_matching forward.
//   query, previous: [B, H, W, C] of `dtype`; labels: [B, H, W] int32 (values outside
//   [0, L) are never matched); windows: [K] int32 on the device, strictly ascending >= 1,
//   max_window = windows[K-1] (host copy); bias: [L] float32 (float64 when dtype is
//   float64). Outputs fg, bg: [B, L, K, H, W] float32 (float64 for float64); index: same
//   shape, int64 flat index (y+dy)*W + (x+dx) of the argmin in the previous frame, -1 if
//   the (label, window) is empty. No workspace.
int fb_multi_local_matching_forward(Dtype dtype, const void* query, const void* previous,
                                    const int32_t* labels, const int32_t* windows, int64_t K,
                                    int64_t max_window, const void* bias, int64_t B, int64_t H,
                                    int64_t W, int64_t C, int64_t L, int64_t rate, void* fg,
                                    void* bg, int64_t* index, void* stream);

// fb_instance_pooling: embedding [B, H, W, C] of `dtype`, labels [B, H, W] int32, output
// [B, L, 2, C] float32 (float64 for float64). Sums in float64 in a fixed order
// (deterministic). Needs a workspace of fb_instance_pooling_workspace_bytes(...) bytes.
int64_t fb_instance_pooling_workspace_bytes(int64_t B, int64_t H, int64_t W, int64_t C,
                                            int64_t L);
int fb_instance_pooling_forward(Dtype dtype, const void* embedding, const int32_t* labels,
                                int64_t B, int64_t H, int64_t W, int64_t C, int64_t L,
                                void* out, void* workspace, int64_t workspace_bytes,
                                void* stream);

}  // namespace cuda
}  // namespace vos
