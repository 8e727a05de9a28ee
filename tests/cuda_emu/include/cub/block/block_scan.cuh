// Emulator stand-in for cub::BlockScan (the ExclusiveSum / InclusiveSum the kernels use).
#pragma once
#include "vos_emu/runtime.h"

namespace cub {

template <class T, int BLOCK_THREADS>
class BlockScan {
 public:
  struct TempStorage {
    T v[BLOCK_THREADS];
  };
  explicit BlockScan(TempStorage& s) : s_(s) {}

  void ExclusiveSum(T in, T& out, T& aggregate) {
    const int t = tid();
    s_.v[t] = in;
    __syncthreads();
    T run = T(0), total = T(0);
    for (int i = 0; i < BLOCK_THREADS; ++i) {
      if (i == t) run = total;
      total = total + s_.v[i];
    }
    __syncthreads();
    out = run;
    aggregate = total;
  }
  void ExclusiveSum(T in, T& out) {
    T aggregate;
    ExclusiveSum(in, out, aggregate);
  }
  void InclusiveSum(T in, T& out, T& aggregate) {
    ExclusiveSum(in, out, aggregate);
    out = out + in;
  }
  void InclusiveSum(T in, T& out) {
    T aggregate;
    InclusiveSum(in, out, aggregate);
  }

 private:
  static int tid() {
    if (blockDim.x * blockDim.y * blockDim.z != BLOCK_THREADS)
      vos_emu::fail("cub::BlockScan: the block does not have BLOCK_THREADS threads");
    return static_cast<int>(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z));
  }
  TempStorage& s_;
};

}  // namespace cub
