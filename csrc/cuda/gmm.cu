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
//
// Tensor-core path (em_kernel<KB, Tin, float, PREC ≥ 0>; float32 / float16 / bfloat16 with K ≥ 8,
// C ≥ 32, N ≥ 64, sm_80+; float64 and smaller shapes keep the FFMA kernel above)
// ------------------------------------------------------------------------------
// Same plan, staging, softmax, mask, workspace partials and fixed-order finalize; only the two
// products change, to mma.sync.m16n8k8 TF32 (fp32 accumulate), fragments read straight from
// the shared tiles (A row-major a0 (g,t) a1 (g+8,t) a2 (g,t+4) a3 (g+8,t+4), B b0 (k t, n g)
// b1 (k t+4, n g), g = lane/4, t = lane%4):
//   E: logits [128 rows][KB] = x slab [128][36] · μ slab [KB][36]ᵀ per 32 channels; warps
//     WM × WN (8×1 for KB 16, 4×2 for 32/64), warp tile (EMT·16 rows) × (ENT·8 means); row
//     stride 36 ≡ 4 (mod 32): 4g + t hits 32 banks. Epilogue as the FFMA kernel.
//   M: per KB block and slab of CW = 256 (KB 16/32) or 128 (KB 64) channels, every warp all
//     KB means × CW/8 channels; A = zᵀ read from Z (zst = kpad + 8 ≡ 8 or 24 mod 32, so the
//     (row t, mean g) reads hit 32 banks), B = x staged [RT = 4096/CW rows][CW + 8]; Σ z by
//     threads tid < KB, rows in order. Each partial element is owned by one lane: no atomics.
//   Precision: matmul_precision() kIEEE → hi = cvt.rna.tf32(v), lo = cvt.rna(v − hi) (0 when
//     not finite), lo·hi + hi·lo + hi·hi into one fp32 accumulator (3 mma; half/bf16 x is exact
//     in TF32, so x is neither rounded nor split and 2 mma remain); kTF32 → 1 mma.
//   Resources (ptxas sm_90): 176–210 registers, 0 spills; __launch_bounds__(256, 1) (the
//     (256, 2) bound spilled 40–150 B), smem as the FFMA plan (Z stride + 4 floats).
// Prediction, H100 SXM, float32 x, per EM iteration:
//   EMANet (16·8192·512, K 64): 17.2 GFLOP; 3xTF32 = 51.5 GFLOP of mma at ~50–60 % of 495
//     (mma.sync, fragment splits on the FP32/ALU pipes, 8 warps per SM) → ~190 µs; x 268 MB
//     read by E and M (M mostly from L2: sub-chunk 512 KB per block) → 90–180 µs. Expected
//     ~200 µs/it (before ~350 µs FFMA); kTF32: ~100 µs/it (memory / latency bound).
//   PCAN frame P2 (60 352·256, K 30 → 32): 2·2·N·C·32 = 1.98 GFLOP, 3xTF32 5.9 GFLOP → ~20 µs
//     of mma; x 61.8 MB → ~21 µs HBM: expected ~30 µs/it (before ~45 µs), kTF32 ~25 µs.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/load.cuh"
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

// Register-prefetched staging of the E slabs (32 channels each), shared by e_logits and
// e_logits_tc. This thread's slab elements: x rows t0 + (tid >> 5) + 8i (i < 16, valid below
// s1) and means kb·KB + (tid >> 5) + 8j (j < TK, valid below K), channel c0 + (tid & 31) (valid
// below C), 0 elsewhere; stored to xs [128][kXS] and ms [KB][kXS] (stage, stage + kStageE).
// Per slab: __syncthreads (everyone is done with the previous slab), store, __syncthreads,
// prefetch of the next slab into registers, then body(xs, ms).
template <int KB, typename Tin, typename T, typename Body>
__device__ __forceinline__ void e_slabs(const Tin* xb, const T* mub, T* stage, int64_t C, int64_t K, int64_t t0,
                                        int64_t s1, int64_t kb, Body&& body) {
  constexpr int TK = Cfg<KB>::TK;
  const int tid = threadIdx.x;
  T* xs = stage;
  T* ms = stage + kStageE;
  T xr[16], mr[TK];
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
    body(static_cast<const T*>(xs), static_cast<const T*>(ms));
  }
}

// Register-prefetched staging of the M-step's x tiles, shared by m_step and m_step_tc: tile rt
// holds rows s0 + rt·RT … (valid below s1) × channels c0 … c0 + CW − 1 (valid below C), stored
// [RT rows][XST] at stage. This thread's elements: rows s0 + rt·RT + tid / CW + RSTEP·i (i < 16,
// RSTEP = 256 / CW), channel c0 + tid % CW. Per tile: __syncthreads, store, __syncthreads,
// prefetch of the next tile into registers, then body(rt).
template <int CW, int RT, int XST, typename Tin, typename T, typename Body>
__device__ __forceinline__ void m_tiles(const Tin* xb, T* stage, int64_t C, int64_t s0, int64_t s1, int64_t c0,
                                        Body&& body) {
  constexpr int RSTEP = kThreads / CW;
  static_assert(RT * CW == 16 * kThreads, "16 staged elements per thread");
  const int tid = threadIdx.x;
  const int64_t nrt = (s1 - s0 + RT - 1) / RT;
  T xr[16];
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
    body(rt);
  }
}

// Logits of one E tile (rows t0 … t0+127, valid below s1) against means kb·KB …: Z rows
// (t0 − s0 …), columns k < K.
template <int KB, typename Tin, typename T>
__device__ __forceinline__ void e_logits(const EmArgs<Tin, T>& a, const Tin* xb, const T* mub, T* stage, const T* hs,
                                         T* Zt, int64_t t0, int64_t s1, int64_t kb) {
  constexpr int TK = Cfg<KB>::TK;
  const int tid = threadIdx.x;
  const int kg = tid & 7, rg = tid >> 3;
  const int64_t C = a.C, K = a.K;
  T acc[4][TK];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < TK; ++j) acc[i][j] = T(0);
  e_slabs<KB>(xb, mub, stage, C, K, t0, s1, kb, [&](const T* xs, const T* ms) {
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
  });
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
      m_tiles<CW, RT, XST>(xb, stage, C, s0, s1, c0, [&](int64_t rt) {
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
      });
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

// ------------------------------------------------------------------ tensor-core path
// mma.sync m16n8k8 TF32 (fp32 accumulate). PREC 0: one TF32 product; PREC 1: split products
// (hi = rna(v), lo = rna(v − hi), lo·hi + hi·lo + hi·hi; an operand that is exact in TF32 —
// half/bf16 x — is neither rounded nor split, so half x under PREC 1 takes 2 products).
__device__ __forceinline__ uint32_t tf32_rna(float v) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(v));
  return r;
}

// S: split into hi + lo; E: exact in TF32 (passed as is, lo = 0); else one rounded value.
template <bool S, bool E>
__device__ __forceinline__ void tf32_frag(float v, uint32_t& hi, uint32_t& lo) {
  if (E) {
    hi = __float_as_uint(v);
    lo = 0u;
  } else if (S) {
    hi = tf32_rna(v);
    float r = v - __uint_as_float(hi);
    r = r == r ? r : 0.f;  // inf − inf: no remainder
    lo = tf32_rna(r);
  } else {
    hi = tf32_rna(v);
    lo = 0u;
  }
}

__device__ __forceinline__ void mma_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Zero MT × NT m16n8 accumulator fragments.
template <int MT, int NT>
__device__ __forceinline__ void zero_frags(float (&acc)[MT][NT][4]) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[mt][nt][q] = 0.f;
}

// acc[nt] += A · B_nt for one m16 tile and k8 step, small products first.
template <int NT, bool SA, bool SB>
__device__ __forceinline__ void mma_row(float (&acc)[NT][4], const uint32_t (&ah)[4], const uint32_t (&al)[4],
                                        const uint32_t (&bh)[NT][2], const uint32_t (&bl)[NT][2]) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
    if (SB) mma_tf32(acc[nt], ah, bl[nt]);
    if (SA) mma_tf32(acc[nt], al, bh[nt]);
    mma_tf32(acc[nt], ah, bh[nt]);
  }
}

template <int KB>
struct TcCfg {
  // E-step: warps WM × WN over the [128 rows][KB] logits tile, warp tile MT·16 × NT·8.
  static constexpr int WN = KB == 16 ? 1 : 2;
  static constexpr int WM = 8 / WN;
  static constexpr int EMT = kTN / WM / 16;
  static constexpr int ENT = KB / WN / 8;
  // M-step: every warp all KB means (MMT m16 tiles) × MNT·8 channels; slab CW = 8 warps' channels.
  static constexpr int MMT = KB / 16;
  static constexpr int MNT = KB == 64 ? 2 : 4;
  static constexpr int CW = 8 * MNT * 8;      // 128 or 256 channels per slab
  static constexpr int RT = 4096 / CW;        // rows per staging tile (32 or 16)
  static constexpr int XST = CW + 8;          // ≡ 8 (mod 32): conflict-free B fragments
  static_assert(RT * XST <= Cfg<KB>::STAGE, "M staging tile");
  static_assert(RT % 8 == 0 && kTN % RT == 0, "M staging rows");
};

// Tensor-core logits of one E tile: same staging as e_logits (e_slabs: x slab [128][36], mean slab
// [KB][36], register prefetch), products by mma; zst ≡ 8 (mod 32) is not needed here.
template <int KB, int PREC, typename Tin>
__device__ __forceinline__ void e_logits_tc(const EmArgs<Tin, float>& a, const Tin* xb, const float* mub,
                                            float* stage, const float* hs, float* Zt, int64_t t0, int64_t s1,
                                            int64_t kb) {
  using TC = TcCfg<KB>;
  constexpr int MT = TC::EMT, NT = TC::ENT;
  constexpr bool XEX = !std::is_same<Tin, float>::value;
  constexpr bool SA = PREC == 1 && !XEX, SB = PREC == 1;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int rbase = (warp / TC::WN) * (MT * 16), nbase = (warp % TC::WN) * (NT * 8);
  const int64_t C = a.C, K = a.K;
  float acc[MT][NT][4];
  zero_frags(acc);
  e_slabs<KB>(xb, mub, stage, C, K, t0, s1, kb, [&](const float* xs, const float* ms) {
#pragma unroll 1
    for (int k8 = 0; k8 < kCS; k8 += 8) {
      uint32_t bh[NT][2], bl[NT][2];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        const float* q = ms + (nbase + nt * 8 + g) * kXS + k8 + t;
        tf32_frag<SB, false>(q[0], bh[nt][0], bl[nt][0]);
        tf32_frag<SB, false>(q[4], bh[nt][1], bl[nt][1]);
      }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        uint32_t ah[4], al[4];
        const float* p = xs + (rbase + mt * 16 + g) * kXS + k8 + t;
        tf32_frag<SA, XEX>(p[0], ah[0], al[0]);
        tf32_frag<SA, XEX>(p[8 * kXS], ah[1], al[1]);
        tf32_frag<SA, XEX>(p[4], ah[2], al[2]);
        tf32_frag<SA, XEX>(p[8 * kXS + 4], ah[3], al[3]);
        mma_row<NT, SA, SB>(acc[mt], ah, al, bh, bl);
      }
    }
  });
  const bool l2 = a.kernel == 1;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int64_t k = kb * KB + nbase + nt * 8 + 2 * t + j;
      if (k < K) {
        const float hk = l2 ? hs[k] : 0.f;
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const float l = a.kappa * acc[mt][nt][2 * h + j];
            Zt[(rbase + mt * 16 + g + 8 * h) * a.zst + k] = l2 ? l - hk : l;
          }
      }
    }
}

// Tensor-core M-step of one sub-chunk: pacc [K][C] (+)= zᵀ x by mma (A = zᵀ from Z, B = x
// staged [RT rows][CW + 8]), Ss[k] (+)= Σ z by the threads tid < KB in the first slab (rows
// in order). Each partial element always by the same thread.
template <int KB, int PREC, typename Tin>
__device__ __forceinline__ void m_step_tc(const EmArgs<Tin, float>& a, const Tin* xb, float* stage, const float* Z,
                                          float* pacc, float* Ss, int64_t s0, int64_t s1, bool first) {
  using TC = TcCfg<KB>;
  constexpr int MT = TC::MMT, NT = TC::MNT, CW = TC::CW, RT = TC::RT, XST = TC::XST;
  constexpr bool XEX = !std::is_same<Tin, float>::value;
  constexpr bool SA = PREC == 1, SB = PREC == 1 && !XEX;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int wc = warp * (NT * 8);
  const int64_t C = a.C, K = a.K, zst = a.zst;
  for (int64_t kb = 0; kb * KB < a.kpad; ++kb) {
    for (int64_t c0 = 0; c0 < C; c0 += CW) {
      const bool want_s = c0 == 0 && tid < KB && kb * KB + tid < K;
      float sacc = 0.f;
      float acc[MT][NT][4];
      zero_frags(acc);
      m_tiles<CW, RT, XST>(xb, stage, C, s0, s1, c0, [&](int64_t rt) {
        const float* zt = Z + (rt * RT) * zst + kb * KB;
        if (want_s) {
#pragma unroll 4
          for (int r = 0; r < RT; ++r) sacc += zt[r * zst + tid];
        }
#pragma unroll 1
        for (int r8 = 0; r8 < RT; r8 += 8) {
          uint32_t bh[NT][2], bl[NT][2];
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            const float* q = stage + (r8 + t) * XST + wc + nt * 8 + g;
            tf32_frag<SB, XEX>(q[0], bh[nt][0], bl[nt][0]);
            tf32_frag<SB, XEX>(q[4 * XST], bh[nt][1], bl[nt][1]);
          }
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            uint32_t ah[4], al[4];
            const float* p = zt + (r8 + t) * zst + mt * 16 + g;
            tf32_frag<SA, false>(p[0], ah[0], al[0]);
            tf32_frag<SA, false>(p[8], ah[1], al[1]);
            tf32_frag<SA, false>(p[4 * zst], ah[2], al[2]);
            tf32_frag<SA, false>(p[4 * zst + 8], ah[3], al[3]);
            mma_row<NT, SA, SB>(acc[mt], ah, al, bh, bl);
          }
        }
      });
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int64_t k = kb * KB + mt * 16 + g + 8 * h;
          if (k < K) {
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
              for (int j = 0; j < 2; ++j) {
                const int64_t c = c0 + wc + nt * 8 + 2 * t + j;
                if (c < C) {
                  float* dst = pacc + k * C + c;
                  *dst = first ? acc[mt][nt][2 * h + j] : *dst + acc[mt][nt][2 * h + j];
                }
              }
          }
        }
      if (want_s) {
        const int64_t k = kb * KB + tid;
        Ss[k] = first ? sacc : Ss[k] + sacc;
      }
    }
  }
}

// PREC −1: FFMA products (e_logits / m_step); 0, 1: tensor cores (e_logits_tc / m_step_tc), float T only.
template <int KB, typename Tin, typename T, int PREC>
__global__ void __launch_bounds__(kThreads, (sizeof(T) == 4 && KB < 64 && PREC < 0) ? 2 : 1)
    em_kernel(const EmArgs<Tin, T> a) {
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
        for (int64_t kb = 0; kb * KB < a.kpad; ++kb) {
          if constexpr (PREC < 0) {
            e_logits<KB>(a, xb, mub, stage, hs, Zt, t0, s1, kb);
          } else {
            e_logits_tc<KB, PREC>(a, xb, mub, stage, hs, Zt, t0, s1, kb);
          }
        }
        __syncthreads();
        e_softmax(a, Zt, b, t0, s1, last);
      }
      __syncthreads();
      if constexpr (PREC < 0) {
        m_step<KB>(a, xb, stage, Z, pacc, Ss, s0, s1, s0 == n0);
      } else {
        m_step_tc<KB, PREC>(a, xb, stage, Z, pacc, Ss, s0, s1, s0 == n0);
      }
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
  bool tc = false;  // tensor-core products (zst = kpad + 8) instead of FFMA (zst = kpad + 4)
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

// Tensor cores for float32 / float16 / bfloat16 when the tiles are mostly real work: K ≥ 8
// (at least one full n8 tile of means), C ≥ 32 (one full E slab), N ≥ 64 rows per item (half
// an E tile), on sm_80+. float64 and the small shapes keep the FFMA kernel (fp32-exact, and
// there the launch / latency, not the products, is the cost).
bool em_use_tc(int64_t N, int64_t C, int64_t K, Dtype dtype, int cc_major) {
  return dtype != Dtype::kFloat64 && cc_major >= 8 && K >= 8 && C >= 32 && N >= 64;
}

int em_plan(int64_t B, int64_t N, int64_t C, int64_t K, Dtype dtype, EmPlan& p) {
  int dev = 0, sms = 0, ccm = 0;
  VOS_CUDA_TRY(cudaGetDevice(&dev));
  VOS_CUDA_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  VOS_CUDA_TRY(cudaDeviceGetAttribute(&ccm, cudaDevAttrComputeCapabilityMajor, dev));
  const int64_t es = dtype == Dtype::kFloat64 ? 8 : 4;
  p.tc = em_use_tc(N, C, K, dtype, ccm);
  p.kb = K <= 16 ? 16 : (K <= 32 ? 32 : 64);
  p.kpad = std::max<int64_t>(1, (K + p.kb - 1) / p.kb) * p.kb;
  p.zst = p.kpad + (p.tc ? 8 : 4);  // kpad + 8 ≡ 8 (mod 32) or 24: conflict-free zᵀ fragments
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

template <int KB, int PREC, typename Tin, typename T>
int launch_em_kb(const EmArgs<Tin, T>& base, const EmPlan& p, int64_t B, int64_t num_iters, cudaStream_t st) {
  auto* kern = em_kernel<KB, Tin, T, PREC>;
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
              int kernel, bool normalize, MatmulPrecision precision, cudaStream_t st) {
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
  if constexpr (std::is_same<T, float>::value) {
    if (p.tc) {
      if (precision == MatmulPrecision::kIEEE) {
        switch (p.kb) {
          case 16: return launch_em_kb<16, 1>(a, p, B, num_iters, st);
          case 32: return launch_em_kb<32, 1>(a, p, B, num_iters, st);
          default: return launch_em_kb<64, 1>(a, p, B, num_iters, st);
        }
      }
      switch (p.kb) {
        case 16: return launch_em_kb<16, 0>(a, p, B, num_iters, st);
        case 32: return launch_em_kb<32, 0>(a, p, B, num_iters, st);
        default: return launch_em_kb<64, 0>(a, p, B, num_iters, st);
      }
    }
  }
  switch (p.kb) {
    case 16: return launch_em_kb<16, -1>(a, p, B, num_iters, st);
    case 32: return launch_em_kb<32, -1>(a, p, B, num_iters, st);
    default: return launch_em_kb<64, -1>(a, p, B, num_iters, st);
  }
}

// Type tag of the dtype dispatch in gmm_em.
template <typename Tin, typename T>
struct EmTypes {
  using In = Tin;
  using Acc = T;
};

}  // namespace

int64_t gmm_em_workspace_bytes(int64_t B, int64_t N, int64_t C, int64_t K, Dtype dtype) {
  EmPlan p;
  if (em_plan(B, N, C, K, dtype, p) != 0) return 0;
  return p.total;
}

int gmm_em(const void* x, const void* means_in, const void* mask, void* means_out, void* resp, void* workspace,
           int64_t workspace_bytes, int64_t B, int64_t N, int64_t C, int64_t K, int64_t num_iters, double kappa,
           int kernel, bool normalize_means, Dtype dtype, MatmulPrecision precision, void* stream) {
  if (B <= 0 || N <= 0 || K <= 0 || num_iters <= 0) return 0;
  EmPlan p;
  const int rc = em_plan(B, N, C, K, dtype, p);
  if (rc != 0) return rc;
  if (workspace_bytes < p.total) return static_cast<int>(cudaErrorInvalidValue);
  cudaStream_t st = as_stream(stream);
  // launch_em<Tin, T> for the (input, accumulator) types named by the tag
  auto launch = [&](auto tag) {
    using Tin = typename decltype(tag)::In;
    using T = typename decltype(tag)::Acc;
    return launch_em<Tin, T>(x, means_in, mask, means_out, resp, workspace, p, B, N, C, K, num_iters, kappa, kernel,
                             normalize_means, precision, st);
  };
  switch (dtype) {
    case Dtype::kFloat32:
      return launch(EmTypes<float, float>{});
    case Dtype::kFloat64:
      return launch(EmTypes<double, double>{});
    case Dtype::kFloat16:
      return launch(EmTypes<__half, float>{});
    case Dtype::kBFloat16:
      return launch(EmTypes<__nv_bfloat16, float>{});
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace cuda
}  // namespace vos
