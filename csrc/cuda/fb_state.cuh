// The fg/bg epilogue shared by global and multi-local matching (torch-free): bg[l] is the
// minimum of fg over the other labels, kept as the best and second-best fg of a query
// over the labels seen so far, in the CPU epilogue's order (NaN first, then by value,
// ties keep the earlier label). An empty set gives 1, fg's value for an empty label.
#pragma once

#include <cuda_runtime.h>

namespace vos {
namespace cuda {

template <typename T>
__device__ __forceinline__ bool less_nan_first(T a, T b) {
  const bool na = a != a, nb = b != b;
  if (na != nb) return na;
  return !na && a < b;
}

template <typename T>
struct FbState {
  T vb, vs;
  int lb, ls;
  __device__ __forceinline__ void init() {
    vb = T(1);
    vs = T(1);
    lb = -1;
    ls = -1;
  }
  __device__ __forceinline__ void add(T v, int l) {
    if (lb < 0 || less_nan_first(v, vb)) {
      vs = vb;
      ls = lb;
      vb = v;
      lb = l;
    } else if (ls < 0 || less_nan_first(v, vs)) {
      vs = v;
      ls = l;
    }
  }
  // min over m != l of the fg values added (1 if there is none)
  __device__ __forceinline__ T bg(int l) const {
    if (l == lb) return ls < 0 ? T(1) : vs;
    return vb;
  }
};

}  // namespace cuda
}  // namespace vos
