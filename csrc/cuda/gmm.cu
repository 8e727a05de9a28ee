// gmm_em on CUDA: fused EM iterations of the GMM prototypes (PCAN _em_iter, EMANet EMAU).
// Semantics: csrc/cpu/gmm.cpp (gmm_em_impl), ../shared/spec/gmm.md, the schema in csrc/ops.cpp.
//
// Design
// ------
// Work split. Batch row b's N points are cut into G chunks of `rpb` rows (a multiple of
// 128; G from the shape and the SM count only, so reruns on one device give the same
// bits). One block of 256 threads per (b, chunk). A chunk is processed in sub-chunks of
// `ncz` rows (the rows whose responsibilities z fit in shared memory, Zs [ncz][KPAD+4]),
// and a sub-chunk in E tiles of 128 rows:
//   E-step, per tile and per block of KB means (KB = 16/32/64 from K; KPAD = K rounded up
//     to KB): logits [128 rows][KB] by FFMA, C streamed in slabs of 32 through shared
//     memory (x slab [128][36], mean slab [KB][36], next slab prefetched into registers
//     while the current one is multiplied); thread tile 4 rows × KB/8 means (rows rg+32i,
//     means kg+8j: conflict-free 16-byte shared loads); kappa·acc (− h_k for l2) goes to Zs.
//     Then the softmax over K per row (8 lanes per row, shuffles), × mask, z back to Zs,
//     resp written in the last iteration.
//   M-step, per block of KB means and slab of CW = 4096/KB channels: A[KB][CW] += zᵀ x over
//     the sub-chunk's rows in order (thread tile 4 means × 4 channels in registers, x
//     staged [KB rows][CW+4], prefetched as above); Σ_n z by the threads of channel group
//     0 in the first slab. The sums go to the block's own slice of the workspace (stored
//     by the first sub-chunk, read-modify-written by the later ones: each element always
//     by the same thread, no atomics).
//   G == 1 (PCAN instance head: many RoIs of 196 points; any B ≥ 2·SMs / 1 chunk): the
//     block owns its whole row and runs every iteration in one launch: after the M-step
//     it forms μ = A / (1e-6 + S), normalises (warp per mean, fixed shuffle tree) and
//     starts the next E-step from those means (global memory written and read by the same
//     block, ordered by __syncthreads; never through the non-coherent cache).
//   G > 1: per iteration the partial kernel, then em_finalize_kernel per (b, k): partials
//     added in chunk order, μ = A / (1e-6 + S), ‖μ‖ by a fixed block tree, μ /= 1e-6 + ‖μ‖.
// Order of operations as the CPU kernel: l = kappa·(x·μ) − kappa/2·‖μ‖², max over K (NaN
// skipped as `l > m ? l : m`), e = exp(l − max), z = e / Σe · mask; μ = A / (1e-6 + S)
// then μ / (1e-6 + ‖μ‖); h from the normalised means. Empty rows (N = 0) are handled by
// the glue (μ = 0, as the CPU kernel gives). Determinism: every sum has a fixed order
// (thread tiles, shuffle trees, chunk order); no float atomics.
// Products are FFMA in fp32 (fp32-accurate in both matmul precisions; half inputs are
// converted to fp32 on load); float64 runs the same kernels in double.
//
// Prediction, H100 SXM (FFMA peak ~67 TFLOP/s, HBM ~3.0 TB/s), fp32:
//   PCAN frame P2 (B 1, N 60 352, C 256, K 30 → KPAD 32, 3 it): per iteration x read once
//     from HBM (61.8 MB → 21 µs) and once more from L2; 2·2·N·C·32 = 1.98 GFLOP → 30 µs at
//     peak, ~40 µs at the ~75 % an FFMA tile reaches: FFMA-bound, ~45 µs/it with the
//     finalize (7 MB of partials) → ~135 µs per call (P3, N 15 088: ~40 µs).
//   PCAN instance (R 100, N 196 → 256 padded rows, C 256, K 10 → 16, 6 it): one launch,
//     one block per RoI (100 of 132 SMs busy), x from L2; per block and iteration
//     2·(256·16 + 196·16)·256 FMA ≈ 3.7 MFLOP → ~14 K cycles at 128 FMA/clk → ~8 µs/it
//     ideal, ~12 µs with latency → ~70 µs per call (4 calls / frame).
//   EMANet (B 16, N 8 192, C 512, K 64, 3 it): 2·2·B·N·C·64 = 17.2 GFLOP per iteration →
//     ~260 µs at FFMA peak, ~350 µs real; memory (268 MB x) ~90 µs: FFMA-bound. A TF32
//     tensor-core version (mma.sync m16n8k8, 3xTF32 for "highest") would be the next step.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>

#include "cuda/common.cuh"
#include "cuda/gmm.h"

namespace vos {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kTN = 128;        // rows per E tile
constexpr int kCS = 32;         // channels per E slab
constexpr int kXS = kCS + 4;    // row stride of the E staging tiles
constexpr int kStageE = kTN * kXS;

template <int KB>
struct Cfg {
  static constexpr int TK = KB / 8;        // means per thread in the logits tile
  static constexpr int CW = 4096 / KB;     // channels per M slab
  static constexpr int RT = KB;            // rows per M staging tile (RT·CW = 4096)
  static constexpr int XST = CW + 4;       // row stride of the M staging tile
  static constexpr int CQ = CW / 4;        // channel groups (4 channels each)
  static constexpr int STAGE = (kStageE + KB * kXS) > (RT * XST) ? (kStageE + KB * kXS) : (RT * XST);
  static_assert((KB / 4) * CQ == kThreads, "M-step thread tile");
};

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

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

template <typename Tin, typename T>
struct EmArgs {
  const Tin* x;     // [B, N, C]
  const T* mu_in;   // [B, K, C] initial means
  T* mu;            // [B, K, C] means_out (the working means after iteration 0)
  const T* mask;    // [B, N] or null
  T* resp;          // [B, N, K]
  T* pa;            // [B·G, K, C] partial Σ z x (per block)
  T* ps;            // [B·G, K] partial Σ z
  T* zg;            // [B·G, ncz, zst] global Zs, or null (Zs in shared memory)
  int64_t N, C, K, G, rpb, ncz, zst, kpad;
  T kappa;
  int kernel, normalize, fused;
  int64_t it0, iters, num_iters;
};

// Logits of one E tile (rows t0 … t0+127, valid below s1) against means kb·KB …: Z rows
// (t0 − s0 …), columns k < K.
template <int KB, typename Tin, typename T>
__device__ __forceinline__ void e_logits(const EmArgs<Tin, T>& a, const Tin* xb, const T* mub, T* stage, const T* hs,
                                         T* Zt, int64_t t0, int64_t s1, int64_t kb) {
  constexpr int TK = Cfg<KB>::TK;
  const int tid = threadIdx.x;
  const int kg = tid & 7, rg = tid >> 3;
  const int64_t C = a.C, K = a.K;
  T* xs = stage;
  T* ms = stage + kStageE;
  T acc[4][TK];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < TK; ++j) acc[i][j] = T(0);
  T xr[16], mr[TK];
  // slab elements of this thread: rows t0 + (tid >> 5) + 8i, channel c0 + (tid & 31)
  const int64_t r_first = t0 + (tid >> 5);
  const int nrow_ok = r_first < s1 ? static_cast<int>(min64(16, (s1 - r_first + 7) / 8)) : 0;
  const Tin* xp = xb + r_first * C + (tid & 31);
  const int64_t k_first = kb * KB + (tid >> 5);
  const int nk_ok = k_first < K ? static_cast<int>(min64(TK, (K - k_first + 7) / 8)) : 0;
  const T* mp = mub + k_first * C + (tid & 31);
  auto load = [&](int64_t c0) {
    const bool c_ok = c0 + (tid & 31) < C;
    const int64_t step = 8 * C;
    const Tin* q = xp + c0;
    const T* m = mp + c0;
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      xr[i] = (c_ok && i < nrow_ok) ? T(to_acc(*q)) : T(0);
      q += step;
    }
#pragma unroll
    for (int j = 0; j < TK; ++j) {
      mr[j] = (c_ok && j < nk_ok) ? *m : T(0);
      m += step;
    }
  };
  const int64_t nslab = (C + kCS - 1) / kCS;
  if (nslab > 0) load(0);
  for (int64_t s = 0; s < nslab; ++s) {
    __syncthreads();  // everyone is done with the previous slab
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const int e = tid + kThreads * i;
      xs[(e >> 5) * kXS + (e & 31)] = xr[i];
    }
#pragma unroll
    for (int j = 0; j < TK; ++j) {
      const int e = tid + kThreads * j;
      ms[(e >> 5) * kXS + (e & 31)] = mr[j];
    }
    __syncthreads();
    if (s + 1 < nslab) load((s + 1) * kCS);
#pragma unroll 1
    for (int c = 0; c < kCS; c += 4) {
      T xv[4][4];
#pragma unroll
      for (int i = 0; i < 4; ++i) ld4(xs + (rg + 32 * i) * kXS + c, xv[i]);
#pragma unroll
      for (int j = 0; j < TK; ++j) {
        T mv[4];
        ld4(ms + (kg + 8 * j) * kXS + c, mv);
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int q = 0; q < 4; ++q) acc[i][j] += xv[i][q] * mv[q];
      }
    }
  }
  const bool l2 = a.kernel == 1;
#pragma unroll
  for (int j = 0; j < TK; ++j) {
    const int64_t k = kb * KB + kg + 8 * j;
    if (k < K) {
      const T hk = l2 ? hs[k] : T(0);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const T l = a.kappa * acc[i][j];
        Zt[(rg + 32 * i) * a.zst + k] = l2 ? l - hk : l;
      }
    }
  }
}

// Softmax over K of the tile's rows in Zt, × mask; z back to Zt (0 for rows ≥ s1); resp
// in the last iteration.
template <typename Tin, typename T>
__device__ __forceinline__ void e_softmax(const EmArgs<Tin, T>& a, T* Zt, int64_t b, int64_t t0, int64_t s1,
                                          bool last) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int grp = lane >> 3, l8 = lane & 7;
  const int64_t K = a.K, N = a.N;
  for (int rr = warp * 4 + grp; rr < kTN; rr += 32) {  // same trip count in every lane
    const int64_t row = t0 + rr;
    const bool valid = row < s1;
    T* zr = Zt + rr * a.zst;
    T m = -INFINITY;
    for (int64_t k = l8; k < K; k += 8) {
      const T l = zr[k];
      m = l > m ? l : m;
    }
#pragma unroll
    for (int off = 1; off < 8; off <<= 1) {
      const T o = __shfl_xor_sync(0xffffffffu, m, off);
      m = o > m ? o : m;
    }
    T sum = T(0);
    for (int64_t k = l8; k < K; k += 8) {
      const T e = exp(zr[k] - m);
      zr[k] = e;
      sum += e;
    }
#pragma unroll
    for (int off = 1; off < 8; off <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    const T mk = valid ? (a.mask != nullptr ? a.mask[b * N + row] : T(1)) : T(0);
    T* rp = a.resp + (b * N + row) * K;
    for (int64_t k = l8; k < K; k += 8) {
      const T z = valid ? zr[k] / sum * mk : T(0);
      zr[k] = z;
      if (last && valid) rp[k] = z;
    }
  }
}

// M-step of one sub-chunk (rows s0 … s1−1, z in Z): the block's slice pacc [K][C] (+)= zᵀ x,
// Ss[k] (+)= Σ z.
template <int KB, typename Tin, typename T>
__device__ __forceinline__ void m_step(const EmArgs<Tin, T>& a, const Tin* xb, T* stage, const T* Z, T* pacc, T* Ss,
                                       int64_t s0, int64_t s1, bool first) {
  using Cf = Cfg<KB>;
  constexpr int CW = Cf::CW, RT = Cf::RT, XST = Cf::XST, CQ = Cf::CQ;
  const int tid = threadIdx.x;
  const int cg = tid % CQ, kq = tid / CQ;
  const int64_t C = a.C, K = a.K;
  const int64_t nrt = (s1 - s0 + RT - 1) / RT;
  T xr[16];
  for (int64_t kb = 0; kb * KB < a.kpad; ++kb) {
    for (int64_t c0 = 0; c0 < C; c0 += CW) {
      const bool want_s = c0 == 0 && cg == 0;
      T acc[4][4], sacc[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        sacc[q] = T(0);
#pragma unroll
        for (int p = 0; p < 4; ++p) acc[q][p] = T(0);
      }
      // staging elements of this thread: rows s0 + rt·RT + tid / CW + (256 / CW)·i, channel c0 + tid % CW
      constexpr int RSTEP = kThreads / CW;
      const bool c_ok = c0 + tid % CW < C;
      const Tin* xp = xb + (s0 + tid / CW) * C + c0 + tid % CW;
      auto load = [&](int64_t rt) {
        const int64_t r_first = s0 + rt * RT + tid / CW;
        const int nrow_ok = r_first < s1 ? static_cast<int>(min64(16, (s1 - r_first + RSTEP - 1) / RSTEP)) : 0;
        const Tin* xq = xp + rt * RT * C;
        const int64_t step = RSTEP * C;
#pragma unroll
        for (int i = 0; i < 16; ++i) {
          xr[i] = (c_ok && i < nrow_ok) ? T(to_acc(*xq)) : T(0);
          xq += step;
        }
      };
      load(0);
      for (int64_t rt = 0; rt < nrt; ++rt) {
        __syncthreads();
#pragma unroll
        for (int i = 0; i < 16; ++i) {
          const int e = tid + kThreads * i;
          stage[(e / CW) * XST + e % CW] = xr[i];
        }
        __syncthreads();
        if (rt + 1 < nrt) load(rt + 1);
        const T* zrow = Z + (rt * RT) * a.zst + kb * KB + kq * 4;
#pragma unroll 2
        for (int r = 0; r < RT; ++r) {
          T zv[4], xv[4];
          ld4(zrow + r * a.zst, zv);
          ld4(stage + r * XST + cg * 4, xv);
#pragma unroll
          for (int q = 0; q < 4; ++q) {
#pragma unroll
            for (int p = 0; p < 4; ++p) acc[q][p] += zv[q] * xv[p];
            if (want_s) sacc[q] += zv[q];
          }
        }
      }
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const int64_t k = kb * KB + kq * 4 + q;
        if (k < K) {
#pragma unroll
          for (int p = 0; p < 4; ++p) {
            const int64_t c = c0 + cg * 4 + p;
            if (c < C) {
              T* dst = pacc + k * C + c;
              *dst = first ? acc[q][p] : *dst + acc[q][p];
            }
          }
          if (want_s) Ss[k] = first ? sacc[q] : Ss[k] + sacc[q];
        }
      }
    }
  }
}

template <int KB, typename Tin, typename T>
__global__ void __launch_bounds__(kThreads, (sizeof(T) == 4 && KB < 64) ? 2 : 1) em_kernel(const EmArgs<Tin, T> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* hs = reinterpret_cast<T*>(smem_raw);
  T* Ss = hs + a.kpad;
  T* stage = Ss + a.kpad;
  T* Zsm = stage + Cfg<KB>::STAGE;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t blk = blockIdx.x;
  const int64_t b = blk / a.G, g = blk % a.G;
  const int64_t N = a.N, C = a.C, K = a.K;
  const int64_t n0 = g * a.rpb, n1 = min(N, n0 + a.rpb);
  T* Z = a.zg != nullptr ? a.zg + blk * a.ncz * a.zst : Zsm;
  T* pacc = a.pa + blk * K * C;
  const Tin* xb = a.x + b * N * C;
  for (int64_t it = 0; it < a.iters; ++it) {
    const int64_t git = a.it0 + it;
    const bool last = git == a.num_iters - 1;
    const T* mub = (git == 0 ? a.mu_in : static_cast<const T*>(a.mu)) + b * K * C;
    for (int64_t k = tid; k < a.kpad; k += kThreads) {
      hs[k] = T(0);
      Ss[k] = T(0);
    }
    __syncthreads();
    if (a.kernel == 1) {  // h_k = kappa/2·‖μ_k‖²
      for (int64_t k = warp; k < K; k += kThreads / 32) {
        T s = T(0);
        for (int64_t c = lane; c < C; c += 32) {
          const T v = mub[k * C + c];
          s += v * v;
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
        if (lane == 0) hs[k] = a.kappa / T(2) * s;
      }
    }
    __syncthreads();
    for (int64_t s0 = n0; s0 < n1; s0 += a.ncz) {
      const int64_t s1 = min(n1, s0 + a.ncz);
      for (int64_t t0 = s0; t0 < s1; t0 += kTN) {
        T* Zt = Z + (t0 - s0) * a.zst;
        for (int64_t kb = 0; kb * KB < a.kpad; ++kb) e_logits<KB>(a, xb, mub, stage, hs, Zt, t0, s1, kb);
        __syncthreads();
        e_softmax(a, Zt, b, t0, s1, last);
      }
      __syncthreads();
      m_step<KB>(a, xb, stage, Z, pacc, Ss, s0, s1, s0 == n0);
      __syncthreads();
    }
    if (!a.fused) {
      for (int64_t k = tid; k < K; k += kThreads) a.ps[blk * K + k] = Ss[k];
    } else {  // the block owns row b: μ = A / (1e-6 + S), then μ / (1e-6 + ‖μ‖)
      T* mo = a.mu + b * K * C;
      for (int64_t k = warp; k < K; k += kThreads / 32) {
        const T den = T(1e-6) + Ss[k];
        T ss = T(0);
        for (int64_t c = lane; c < C; c += 32) {
          const T m = pacc[k * C + c] / den;
          mo[k * C + c] = m;
          ss += m * m;
        }
        if (a.normalize) {
#pragma unroll
          for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
          const T nd = T(1e-6) + sqrt(ss);
          for (int64_t c = lane; c < C; c += 32) mo[k * C + c] = mo[k * C + c] / nd;
        }
      }
      __syncthreads();
    }
  }
}

// Per (b, k): partials added in chunk order, μ = A / (1e-6 + S), optional normalisation.
template <typename T>
__global__ void __launch_bounds__(kThreads) em_finalize_kernel(const T* __restrict__ pa, const T* __restrict__ ps,
                                                               T* __restrict__ mu, int64_t G, int64_t K, int64_t C,
                                                               int normalize) {
  __shared__ T red[kThreads / 32];
  const int64_t bk = blockIdx.x;
  const int64_t b = bk / K, k = bk % K;
  const int tid = threadIdx.x;
  T S = T(0);
  for (int64_t g = 0; g < G; ++g) S += ps[(b * G + g) * K + k];
  const T den = T(1e-6) + S;
  T* mo = mu + bk * C;
  T ss = T(0);
  for (int64_t c = tid; c < C; c += kThreads) {
    const T* p = pa + (b * G * K + k) * C + c;
    T s = p[0];
    for (int64_t g = 1; g < G; ++g) s += p[g * K * C];
    const T m = s / den;
    mo[c] = m;
    ss += m * m;
  }
  if (!normalize) return;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
  if ((tid & 31) == 0) red[tid >> 5] = ss;
  __syncthreads();
  T tot = red[0];
#pragma unroll
  for (int w = 1; w < kThreads / 32; ++w) tot += red[w];
  const T nd = T(1e-6) + sqrt(tot);
  for (int64_t c = tid; c < C; c += kThreads) mo[c] = mo[c] / nd;
}

// ----------------------------------------------------------------------------- plan
struct EmPlan {
  int kb = 16;
  int64_t kpad = 0, zst = 0, G = 1, rpb = 0, ncz = 0;
  bool zs_global = false;
  int64_t smem = 0;
  int64_t off_s = 0, off_z = 0, total = 0;
};

inline int64_t align256(int64_t v) { return (v + 255) / 256 * 256; }

int stage_elems(int kb) {
  switch (kb) {
    case 16: return Cfg<16>::STAGE;
    case 32: return Cfg<32>::STAGE;
    default: return Cfg<64>::STAGE;
  }
}

int em_plan(int64_t B, int64_t N, int64_t C, int64_t K, Dtype dtype, EmPlan& p) {
  int dev = 0, sms = 0;
  VOS_CUDA_TRY(cudaGetDevice(&dev));
  VOS_CUDA_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  const int64_t es = dtype == Dtype::kFloat64 ? 8 : 4;
  p.kb = K <= 16 ? 16 : (K <= 32 ? 32 : 64);
  p.kpad = std::max<int64_t>(1, (K + p.kb - 1) / p.kb) * p.kb;
  p.zst = p.kpad + 4;
  const int64_t n = std::max<int64_t>(N, 1);
  const int64_t g_target = std::max<int64_t>(1, (2 * int64_t(std::max(sms, 1)) + B - 1) / std::max<int64_t>(B, 1));
  const int64_t g_max = (n + 255) / 256;
  int64_t G = std::min(g_target, g_max);
  p.rpb = ((n + G - 1) / G + kTN - 1) / kTN * kTN;
  p.G = (n + p.rpb - 1) / p.rpb;
  const int64_t fixed = (2 * p.kpad + stage_elems(p.kb)) * es;
  const int64_t cap = max_dynamic_smem(dev);
  const int64_t zbudget = std::min<int64_t>(72 * 1024, cap - fixed);
  const int64_t fit = zbudget > 0 ? zbudget / (p.zst * es) / kTN * kTN : 0;
  if (fit >= kTN) {
    p.ncz = std::min(p.rpb, fit);
    p.zs_global = false;
    p.smem = fixed + p.ncz * p.zst * es;
  } else {
    p.ncz = kTN;
    p.zs_global = true;
    p.smem = fixed;
  }
  if (p.smem > cap) return static_cast<int>(cudaErrorInvalidConfiguration);
  const int64_t blocks = B * p.G;
  p.off_s = align256(blocks * K * C * es);
  p.off_z = p.off_s + align256(blocks * K * es);
  p.total = p.off_z + (p.zs_global ? align256(blocks * p.ncz * p.zst * es) : 0);
  return 0;
}

template <int KB, typename Tin, typename T>
int launch_em_kb(const EmArgs<Tin, T>& base, const EmPlan& p, int64_t B, int64_t num_iters, cudaStream_t st) {
  auto* kern = em_kernel<KB, Tin, T>;
  VOS_CUDA_TRY(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(p.smem)));
  const dim3 grid(static_cast<unsigned>(B * p.G));
  EmArgs<Tin, T> a = base;
  if (a.fused) {
    a.it0 = 0;
    a.iters = num_iters;
    kern<<<grid, kThreads, p.smem, st>>>(a);
    VOS_CUDA_CHECK_LAUNCH();
    return 0;
  }
  for (int64_t it = 0; it < num_iters; ++it) {
    a.it0 = it;
    a.iters = 1;
    kern<<<grid, kThreads, p.smem, st>>>(a);
    VOS_CUDA_CHECK_LAUNCH();
    em_finalize_kernel<T><<<dim3(static_cast<unsigned>(B * a.K)), kThreads, 0, st>>>(a.pa, a.ps, a.mu, a.G, a.K,
                                                                                      a.C, a.normalize);
    VOS_CUDA_CHECK_LAUNCH();
  }
  return 0;
}

template <typename Tin, typename T>
int launch_em(const void* x, const void* means_in, const void* mask, void* means_out, void* resp, void* ws,
              const EmPlan& p, int64_t B, int64_t N, int64_t C, int64_t K, int64_t num_iters, double kappa,
              int kernel, bool normalize, cudaStream_t st) {
  unsigned char* w = static_cast<unsigned char*>(ws);
  EmArgs<Tin, T> a;
  a.x = static_cast<const Tin*>(x);
  a.mu_in = static_cast<const T*>(means_in);
  a.mu = static_cast<T*>(means_out);
  a.mask = static_cast<const T*>(mask);
  a.resp = static_cast<T*>(resp);
  a.pa = reinterpret_cast<T*>(w);
  a.ps = reinterpret_cast<T*>(w + p.off_s);
  a.zg = p.zs_global ? reinterpret_cast<T*>(w + p.off_z) : nullptr;
  a.N = N;
  a.C = C;
  a.K = K;
  a.G = p.G;
  a.rpb = p.rpb;
  a.ncz = p.ncz;
  a.zst = p.zst;
  a.kpad = p.kpad;
  a.kappa = static_cast<T>(kappa);
  a.kernel = kernel;
  a.normalize = normalize ? 1 : 0;
  a.fused = p.G == 1 ? 1 : 0;
  a.it0 = 0;
  a.iters = 1;
  a.num_iters = num_iters;
  switch (p.kb) {
    case 16: return launch_em_kb<16>(a, p, B, num_iters, st);
    case 32: return launch_em_kb<32>(a, p, B, num_iters, st);
    default: return launch_em_kb<64>(a, p, B, num_iters, st);
  }
}

}  // namespace

int64_t gmm_em_workspace_bytes(int64_t B, int64_t N, int64_t C, int64_t K, Dtype dtype) {
  EmPlan p;
  if (em_plan(B, N, C, K, dtype, p) != 0) return 0;
  return p.total;
}

int gmm_em(const void* x, const void* means_in, const void* mask, void* means_out, void* resp, void* workspace,
           int64_t workspace_bytes, int64_t B, int64_t N, int64_t C, int64_t K, int64_t num_iters, double kappa,
           int kernel, bool normalize_means, Dtype dtype, MatmulPrecision precision, void* stream) {
  (void)precision;  // FFMA products: fp32-accurate under either precision
  if (B <= 0 || N <= 0 || K <= 0 || num_iters <= 0) return 0;
  EmPlan p;
  const int rc = em_plan(B, N, C, K, dtype, p);
  if (rc != 0) return rc;
  if (workspace_bytes < p.total) return static_cast<int>(cudaErrorInvalidValue);
  cudaStream_t st = as_stream(stream);
  switch (dtype) {
    case Dtype::kFloat32:
      return launch_em<float, float>(x, means_in, mask, means_out, resp, workspace, p, B, N, C, K, num_iters, kappa,
                                     kernel, normalize_means, st);
    case Dtype::kFloat64:
      return launch_em<double, double>(x, means_in, mask, means_out, resp, workspace, p, B, N, C, K, num_iters,
                                       kappa, kernel, normalize_means, st);
    case Dtype::kFloat16:
      return launch_em<__half, float>(x, means_in, mask, means_out, resp, workspace, p, B, N, C, K, num_iters, kappa,
                                      kernel, normalize_means, st);
    case Dtype::kBFloat16:
      return launch_em<__nv_bfloat16, float>(x, means_in, mask, means_out, resp, workspace, p, B, N, C, K, num_iters,
                                             kappa, kernel, normalize_means, st);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace cuda
}  // namespace vos
