// Kernels that exercise the CUDA emulator itself (tests/test_cuda_emu.py): written as CUDA
// C++, translated and compiled like csrc/cuda/*.cu, called through extern "C" entry points
// on host memory. Each entry point returns the cudaGetLastError code of its launches.
#include <cub/block/block_scan.cuh>
#include <cub/device/device_radix_sort.cuh>
#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

namespace {

__device__ __forceinline__ uint32_t f2tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}

// One m16n8k8 TF32 product D = A·B + C of row-major A [16,8], B [8,8], C/D [16,8], the
// fragments loaded by the layout of the PTX ISA.
__global__ void mma_kernel(const float* A, const float* B, const float* C, float* D) {
  const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
  uint32_t a[4] = {__float_as_uint(A[g * 8 + t]), __float_as_uint(A[(g + 8) * 8 + t]),
                   __float_as_uint(A[g * 8 + t + 4]), __float_as_uint(A[(g + 8) * 8 + t + 4])};
  uint32_t b0 = __float_as_uint(B[t * 8 + g]), b1 = __float_as_uint(B[(t + 4) * 8 + g]);
  float d[4] = {C[g * 8 + 2 * t], C[g * 8 + 2 * t + 1], C[(g + 8) * 8 + 2 * t], C[(g + 8) * 8 + 2 * t + 1]};
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  D[g * 8 + 2 * t] = d[0];
  D[g * 8 + 2 * t + 1] = d[1];
  D[(g + 8) * 8 + 2 * t] = d[2];
  D[(g + 8) * 8 + 2 * t + 1] = d[3];
}

__global__ void tf32_kernel(const float* x, uint32_t* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = f2tf32(x[i]);
}

// Per lane: [0] butterfly sum, [1] value of lane (lane + 3) % 8 in groups of 8,
// [2] xor-16 partner in width 16 (lanes < 16: their own value, the partner is in a later
// group), [3] ballot of odd values,
// [4] match_any mask of its value % 3, [5] __syncthreads_count of odd values.
__global__ void warp_kernel(const int* v, int* out) {
  const int lane = threadIdx.x & 31, tid = threadIdx.x;
  const int x = v[tid];
  int s = x;
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  out[tid * 6 + 0] = s;
  out[tid * 6 + 1] = __shfl_sync(0xffffffffu, x, (lane + 3) % 8, 8);
  out[tid * 6 + 2] = __shfl_xor_sync(0xffffffffu, x, 16, 16);
  out[tid * 6 + 3] = static_cast<int>(__ballot_sync(0xffffffffu, x & 1));
  out[tid * 6 + 4] = static_cast<int>(__match_any_sync(0xffffffffu, x % 3));
  out[tid * 6 + 5] = __syncthreads_count(x & 1);
}

// Lane 0 waits for its warp while the other lanes wait at the block barrier: deadlock.
__global__ void deadlock_kernel(int* out) {
  if (threadIdx.x == 0)
    out[0] = __shfl_sync(0xffffffffu, 1, 1);
  else
    __syncthreads();
}

// Lanes 16..31 exit; lanes 0..15 then shuffle with a full mask.
__global__ void exited_lane_kernel(int* out) {
  if (threadIdx.x >= 16) return;
  out[threadIdx.x] = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x), 0);
}

// cp.async of 4 floats per thread: out[0..3] read before the wait, out[4..7] after; src
// bytes < 16 zero-fills the rest.
__global__ void cp_async_kernel(const float* src, float* out, int src_bytes) {
  extern __shared__ __align__(16) float smem[];
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem + 4 * threadIdx.x));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(s), "l"(src + 4 * threadIdx.x),
               "r"(src_bytes));
  asm volatile("cp.async.commit_group;");
  for (int i = 0; i < 4; ++i) out[8 * threadIdx.x + i] = smem[4 * threadIdx.x + i];
  asm volatile("cp.async.wait_group 0;" ::: "memory");
  for (int i = 0; i < 4; ++i) out[8 * threadIdx.x + 4 + i] = smem[4 * threadIdx.x + i];
}

// Thread t writes smem[t]; after the barrier reads smem[(t + 1) % n]. Without the barrier
// (sync = 0) the result depends on the order the emulator runs the threads in.
__global__ void barrier_kernel(const int* v, int* out, int sync) {
  extern __shared__ __align__(16) int ring[];
  const int t = threadIdx.x, n = blockDim.x;
  ring[t] = v[t];
  if (sync) __syncthreads();
  out[t] = ring[(t + 1) % n];
}

// Race-detector cases (a build with VOS_EMU_SANITIZE=thread; tests/test_cuda_emu.py).
// Lane l writes s[l], then reads s[l ^ 1] after `order`: 0 nothing, 1 __syncwarp, 2 a shuffle
// (which exchanges registers and orders no memory).
__global__ void warp_handoff_kernel(const int* v, int* out, int order) {
  extern __shared__ __align__(16) int s[];
  const int l = threadIdx.x;
  s[l] = v[l];
  if (order == 1) __syncwarp();
  if (order == 2) (void)__shfl_sync(0xffffffffu, l, 0);
  out[l] = s[l ^ 1];
}

// Every thread adds 1 to one shared counter, by atomicAdd (atomic = 1) or by a plain +=.
__global__ void counter_kernel(int* out, int atomic) {
  __shared__ int count;
  if (threadIdx.x == 0) count = 0;
  __syncthreads();
  if (atomic)
    atomicAdd(&count, 1);
  else
    count += 1;
  __syncthreads();
  if (threadIdx.x == 0) out[0] = count;
}

// Thread t copies 16 bytes to shared memory by cp.async, waits for them, then reads its
// neighbour's copy, after a __syncthreads (sync = 1) or not.
__global__ void cp_async_neighbour_kernel(const float* src, float* out, int sync) {
  extern __shared__ __align__(16) float smem[];
  const int t = threadIdx.x, n = blockDim.x;
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem + 4 * t));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, 16;" ::"r"(s), "l"(src + 4 * t));
  asm volatile("cp.async.commit_group;");
  asm volatile("cp.async.wait_group 0;" ::: "memory");
  if (sync) __syncthreads();
  out[t] = smem[4 * ((t + 1) % n)];
}

// Threads >= 16 write s[t] and exit; the others read s[t + 16] after a __syncthreads.
__global__ void exit_then_barrier_kernel(const int* v, int* out) {
  extern __shared__ __align__(16) int s[];
  const int t = threadIdx.x;
  if (t >= 16) {
    s[t] = v[t];
    return;
  }
  __syncthreads();
  out[t] = s[t + 16];
}

// Blocks of one launch (kBlocks of 32 threads), which nothing orders with each other. mode:
// 0 each block writes its own 32 words (no race); 1 thread 0 of every block writes word 0;
// 2 each block reads the next block's words, then writes its own; 3 every thread
// atomicAdds word 0 (no race); 4 block 0 writes word 0 before a __syncthreads, block 1 reads
// it after one (a barrier orders its own block only); 5 the same with __syncwarp.
constexpr int kBlocks = 4;
__global__ void blocks_kernel(int* out, int mode) {
  const int b = blockIdx.x, t = threadIdx.x;
  if (mode == 0) {
    out[b * 32 + t] = b;
  } else if (mode == 1) {
    if (t == 0) out[0] = b;
  } else if (mode == 2) {
    const int x = out[((b + 1) % kBlocks) * 32 + t];
    out[b * 32 + t] = x + 1;
  } else if (mode == 3) {
    atomicAdd(out, 1);
  } else {
    if (b == 0 && t == 0) out[0] = 7;
    if (mode == 4)
      __syncthreads();
    else
      __syncwarp();
    if (b == 1 && t == 0) out[1] = out[0];
  }
}

// Block b reads block b + 1's words, which the launch before it wrote (no race: launches on
// a stream are ordered).
__global__ void next_block_kernel(const int* in, int* out) {
  const int b = blockIdx.x, t = threadIdx.x;
  out[b * 32 + t] = in[((b + 1) % kBlocks) * 32 + t];
}

// Static __shared__ memory is the block's own: each block's thread 0 reads a word before
// writing it (the fill, not the previous block's value), then every thread atomicAdds a
// per-block counter. out[2b] = the word read, out[2b + 1] = the count.
__global__ void static_shared_kernel(int* out) {
  __shared__ int word;
  __shared__ __align__(16) int count[4];
  if (threadIdx.x == 0) {
    out[2 * blockIdx.x] = word;
    word = static_cast<int>(blockIdx.x);
    count[0] = 0;
  }
  __syncthreads();
  atomicAdd(&count[0], 1);
  __syncthreads();
  if (threadIdx.x == 0) out[2 * blockIdx.x + 1] = count[0];
}

// 200 KiB of static shared memory (st_big_static_shared launches it with dynamic too).
__global__ void big_static_shared_kernel(int* out) {
  __shared__ char big[200 * 1024];
  big[threadIdx.x] = 1;
  if (out) out[0] = big[0];
}

constexpr int kScan = 128;
__global__ void scan_kernel(const int* v, int* out, int* total) {
  using Scan = cub::BlockScan<int, kScan>;
  __shared__ typename Scan::TempStorage tmp;
  int x = v[threadIdx.x], agg;
  Scan(tmp).ExclusiveSum(x, x, agg);
  out[threadIdx.x] = x;
  if (threadIdx.x == 0) *total = agg;
}

__global__ void noop_kernel(int* out) {
  if (out) out[0] = 1;
}

// Memory checker cases (the emulator built with AddressSanitizer, tests/cuda_emu/mem_cases.py):
// thread t writes out[t] = in[(t + 1) % 32] + 1, passed through dynamic and static shared
// memory of 32 ints each; mode 0 stays in bounds, mode m > 0 makes thread 0 also touch one
// word past (or before) a buffer: 1 writes out[32], 2 reads in[-1], 3 writes dynamic shared [32], 4 reads
// static shared [32]. `at` is the index 32 (or -1) from the host, so no compiler sees it.
constexpr int kOob = 32;
__global__ void oob_kernel(const int* in, int* out, int mode, int at) {
  extern __shared__ int dyn[];
  __shared__ int fixed[kOob];
  const int t = threadIdx.x;
  dyn[t] = in[t];
  fixed[t] = dyn[t] + 1;
  __syncthreads();
  int x = fixed[(t + 1) % kOob];
  if (t == 0) {
    if (mode == 1) out[at] = 1;
    if (mode == 2) x += in[at];
    if (mode == 3) dyn[at] = 1;
    if (mode == 4) x += fixed[at];
  }
  out[t] = x;
}

}  // namespace

extern "C" {

const char* st_error(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

int st_mma(const float* A, const float* B, const float* C, float* D) {
  mma_kernel<<<1, 32>>>(A, B, C, D);
  return cudaGetLastError();
}

int st_tf32(const float* x, uint32_t* out, int n) {
  tf32_kernel<<<(n + 63) / 64, 64>>>(x, out, n);
  return cudaGetLastError();
}

int st_warp(const int* v, int* out, int threads) {
  warp_kernel<<<1, threads>>>(v, out);
  return cudaGetLastError();
}

int st_deadlock(int* out) {
  deadlock_kernel<<<1, 64>>>(out);
  return cudaGetLastError();
}

int st_exited_lane(int* out) {
  exited_lane_kernel<<<1, 32>>>(out);
  return cudaGetLastError();
}

int st_cp_async(const float* src, float* out, int threads, int src_bytes) {
  cp_async_kernel<<<1, threads, 16 * threads>>>(src, out, src_bytes);
  return cudaGetLastError();
}

int st_barrier(const int* v, int* out, int threads, int sync) {
  barrier_kernel<<<1, threads, 4 * threads>>>(v, out, sync);
  return cudaGetLastError();
}

int st_warp_handoff(const int* v, int* out, int order) {
  warp_handoff_kernel<<<1, 32, 32 * sizeof(int)>>>(v, out, order);
  return cudaGetLastError();
}

int st_counter(int* out, int threads, int atomic) {
  counter_kernel<<<1, threads>>>(out, atomic);
  return cudaGetLastError();
}

int st_cp_async_neighbour(const float* src, float* out, int threads, int sync) {
  cp_async_neighbour_kernel<<<1, threads, 16 * threads>>>(src, out, sync);
  return cudaGetLastError();
}

int st_exit_then_barrier(const int* v, int* out) {
  exit_then_barrier_kernel<<<1, 32, 32 * sizeof(int)>>>(v, out);
  return cudaGetLastError();
}

int st_blocks(int* out, int mode) {
  blocks_kernel<<<kBlocks, 32>>>(out, mode);
  return cudaGetLastError();
}

// blocks_kernel mode 0 into `out`, then next_block_kernel from `out` into `out2`.
int st_blocks_then_next(int* out, int* out2) {
  blocks_kernel<<<kBlocks, 32>>>(out, 0);
  next_block_kernel<<<kBlocks, 32>>>(out, out2);
  return cudaGetLastError();
}

int st_static_shared(int* out, int blocks, int threads) {
  static_shared_kernel<<<blocks, threads>>>(out);
  return cudaGetLastError();
}

int st_big_static_shared(int* out, int dynamic) {
  const cudaError_t e = cudaFuncSetAttribute(big_static_shared_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             227 * 1024);
  if (e != cudaSuccess) return e;
  big_static_shared_kernel<<<1, 32, static_cast<size_t>(dynamic)>>>(out);
  return cudaGetLastError();
}

int st_scan(const int* v, int* out, int* total) {
  scan_kernel<<<1, kScan>>>(v, out, total);
  return cudaGetLastError();
}

int st_oob(const int* in, int* out, int mode, int at) {
  oob_kernel<<<1, kOob, kOob * sizeof(int)>>>(in, out, mode, at);
  return cudaGetLastError();
}

// Launch configuration: grid (gx, gy), block bx, dynamic smem bytes, opt-in bytes (0: none).
int st_launch(unsigned gx, unsigned gy, unsigned bx, int smem, int optin) {
  const cudaError_t e = cudaFuncSetAttribute(noop_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, optin);
  if (e != cudaSuccess) return cudaGetLastError();
  noop_kernel<<<dim3(gx, gy), bx, static_cast<size_t>(smem)>>>(nullptr);
  return cudaGetLastError();
}

int st_sort(const unsigned* keys, const float* vals, unsigned* keys_out, float* vals_out, int n, int end_bit) {
  size_t bytes = 0;
  cub::DeviceRadixSort::SortPairs(nullptr, bytes, keys, keys_out, vals, vals_out, n, 0, end_bit);
  std::vector<unsigned char> temp(bytes);
  return cub::DeviceRadixSort::SortPairs(temp.data(), bytes, keys, keys_out, vals, vals_out, n, 0, end_bit);
}

}  // extern "C"
