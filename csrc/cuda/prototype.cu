// prototype_attention and prototype_values on CUDA (PCAN _prop + read, em_match_head nu).
// Semantics: csrc/cpu/gmm.cpp (prototype_attention_impl, prototype_values_impl),
// ../shared/spec/gmm.md, the schema comments in csrc/ops.cpp. Backward passes stay in
// Python (vos_kernels/_ops.py).
//
// Design
// ------
// prototype_attention, float32 / float16 / bfloat16 inputs with K ≤ 64 (the fast path):
//   one launch, one block of 256 threads per (batch row b, tile of ≤ TQ queries), TQ = 128
//   when that still gives ≥ 2 blocks per SM, else 64; the tiles of a row are balanced
//   (ceil(Nq / ceil(Nq / TQ)) rows each: PCAN's 196 → 4 × 49). 2 blocks per SM (≤ 128
//   registers, no spills). KB = K rounded up to 8/16/24/32/48/64.
//   Logits [TQ][KB] by FFMA: C streamed in slabs of 32 channels through shared memory
//   (query slab [TQ][36], key slab [KB][36]; the next slab is prefetched into registers
//   while the current one is multiplied); thread tile TQ/32 rows × KB/8 keys (rows rg+32i,
//   keys kg+8j: conflict-free 16-byte shared loads). The 8 lanes that hold one row's
//   logits are adjacent lanes of a warp, so the softmax runs in registers: kappa·acc
//   (− h_k for l2), max over k < K (NaN skipped as `l > m ? l : m`, as the CPU kernel),
//   exp(l − max), sum, z = e / sum, with xor-shuffle trees over the 8 lanes; z goes to
//   Zs [TQ][KB+4] in shared memory (0 in the padded columns). attn is stored from Zs as
//   one contiguous, coalesced run (the tile's rows of attn [B, Nq, K] are contiguous).
//   Readout out = Zs · V: V streamed in chunks of CW = 64 (TQ 64) / 32 (TQ 128) value
//   channels through shared memory [KB][CW] (next chunk prefetched into registers); thread
//   tile 4 rows × 4 channels, sum over k in order; 16-byte stores when CV % 4 == 0.
//   h_k = kappa/2·‖μ_k‖² (l2) by one warp per key at the block start (shuffle tree).
// prototype_values, float32 / float16 / bfloat16 (any K): one block per (b, split of N,
//   block of KB = 16/32/64 keys, chunk of CW = 4096/KB value channels). Rows are staged 32
//   at a time through shared memory (r [32][KB], v [32][CW], next tile prefetched);
//   thread tile 4 keys × 4 channels (a warp = 4 key groups × 8 channel groups: every
//   16-byte shared load is a broadcast of ≤ 8 addresses), rows summed in order; Σ_n r by
//   the channel-group-0 threads. One split (enough blocks already, or N small): the block
//   divides by 1e-6 + Σ r and writes out. Several splits (few rows, long N: PCAN frame
//   level): partials to the workspace, then pv_reduce_kernel adds them in split order.
// float64 (tests, gradcheck), and prototype_attention with K > 64 or a shared-memory
//   shortfall: simple SIMT kernels (attention: one warp per query row, logits in the attn
//   output then softmaxed in place; values: one thread per output element, n in order).
// Order of operations as the CPU kernel: l = kappa·(q·μ) − kappa/2·‖μ‖²; max; e = exp(l −
// max); z = e / Σe; out = z·V. values: (Σ r v) / (1e-6 + Σ r). Determinism: every sum has
// a fixed order (thread tiles, shuffle trees, split order; splits chosen from the shape
// and SM count only); no atomics. Products are FFMA in fp32 (fp32-accurate under either
// matmul precision; half inputs are converted to fp32 on load).
//
// Prediction, H100 SXM (FFMA ~67 TFLOP/s, HBM ~3.0 TB/s), fp32:
//   attention, PCAN instance (B 100, Nq 196, K 20 → KB 24, C = CV = 256): 400 blocks of
//     49 rows (TQ 64, 1.5 waves at 2 blocks/SM); HBM: query 20.1 MB + out 20.1 MB + attn 1.6 MB ≈ 42 MB → 14 µs; FFMA (padded)
//     2·100·256·24·512 = 0.63 GFLOP → 9 µs at peak: memory-bound, ~20 µs expected.
//   attention, PCAN frame P2 (B 1, Nq 60 352, K 30 → 32, C = CV = 256): 472 blocks of
//     TQ 128; 131 MB → 44 µs; 1.98 GFLOP → 30 µs at peak; both overlap: ~55 µs (P3 ~15 µs).
//   attention, EMANet-like (B 16, Nq 8 192, K 64, C = CV = 512): 570 MB → 190 µs;
//     17.2 GFLOP → 256 µs at peak: FFMA-bound, ~340 µs (TF32 mma would be the next step).
//   values, PCAN instance (B 100, N 196, K 20 → 32, CV 256): 200 blocks, one split;
//     21.7 MB → 7 µs, 0.32 GFLOP → 5 µs: ~10 µs.
//   values, PCAN frame P2 (B 1, N 60 352, K 30 → 32, CV 256): ~126 splits × 2 chunks;
//     61.8 MB → 21 µs, 0.99 GFLOP → 15 µs; + 3.9 MB partials and the reduce: ~30 µs.

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>

#include "cuda/common.cuh"
#include "cuda/load.cuh"
#include "cuda/prototype.h"

namespace vos {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kSlab = 32;         // channels per logits slab
constexpr int kXS = kSlab + 4;    // row stride of the logits staging tiles
constexpr int kRT = 32;           // rows per prototype_values staging tile

// ------------------------------------------------------------ prototype_attention (fast)
template <int TQ, int KB>
struct AttnCfg {
  static constexpr int RI = TQ / 32;            // rows per thread in the logits tile
  static constexpr int TK = KB / 8;             // keys per thread in the logits tile
  static constexpr int ZST = KB + 4;            // row stride of Zs
  static constexpr int RG = TQ / 4;             // readout row groups (4 rows each)
  static constexpr int CG = kThreads / RG;      // readout channel groups (4 channels each)
  static constexpr int CW = 4 * CG;             // value channels per readout chunk
  static constexpr int QL = TQ * kSlab / kThreads;   // query slab elements per thread
  static constexpr int VL = KB * CW / kThreads;      // value chunk elements per thread
  static constexpr int STAGE_L = (TQ + KB) * kXS;
  static constexpr int STAGE_V = KB * CW;
  static constexpr int STAGE = STAGE_L > STAGE_V ? STAGE_L : STAGE_V;
  static constexpr int SMEM_FLOATS = KB + STAGE + TQ * ZST;
  static_assert(TQ == 64 || TQ == 128, "query tile");
  static_assert(KB % 8 == 0 && KB <= 64, "key block");
  static_assert(KB * 32 % kThreads == 0, "key slab load");
  static_assert(KB * CW % kThreads == 0, "value chunk load");
};

template <typename Tin>
struct AttnArgs {
  const Tin* q;   // [B, Nq, C]
  const Tin* k;   // [B, K, C]
  const Tin* v;   // [B, K, CV]
  float* out;     // [B, Nq, CV]
  float* attn;    // [B, Nq, K]
  int64_t Nq, C, K, CV, ntiles, rpt;  // rpt: rows per tile (≤ TQ), tiles balanced over Nq
  float kappa;
  int kernel;
};

template <int TQ, int KB, typename Tin>
__global__ void __launch_bounds__(kThreads, 2) attn_kernel(const AttnArgs<Tin> a) {
  using Cf = AttnCfg<TQ, KB>;
  constexpr int RI = Cf::RI, TK = Cf::TK, ZST = Cf::ZST, RG = Cf::RG, CG = Cf::CG, CW = Cf::CW;
  constexpr int QL = Cf::QL, VL = Cf::VL;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* hs = reinterpret_cast<float*>(smem_raw);  // [KB]
  float* stage = hs + KB;                          // logits: xs [TQ][kXS], ks [KB][kXS]; readout: vs [KB][CW]
  float* Zs = stage + Cf::STAGE;                   // [TQ][ZST]
  float* xs = stage;
  float* ks = stage + TQ * kXS;
  float* vs = stage;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t blk = blockIdx.x;
  const int64_t b = blk / a.ntiles;
  const int64_t Nq = a.Nq, C = a.C, K = a.K, CV = a.CV;
  const int64_t t0 = (blk % a.ntiles) * a.rpt;
  const int64_t t1 = min64(Nq, t0 + a.rpt);  // the tile's rows: t0 … t1 − 1
  const Tin* qb = a.q + (b * Nq) * C;
  const Tin* kbp = a.k + (b * K) * C;
  const Tin* vb = a.v + (b * K) * CV;
  const bool l2 = a.kernel == 1;

  // h_k = kappa/2·‖μ_k‖² (l2), 0 in the padded keys
  for (int k = warp; k < KB; k += kThreads / 32) {
    float s = 0.f;
    if (l2 && k < K) {
      const Tin* kr = kbp + k * C;
      for (int64_t c = lane; c < C; c += 32) {
        const float t = to_acc(kr[c]);
        s += t * t;
      }
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    }
    if (lane == 0) hs[k] = l2 ? a.kappa / 2.0f * s : 0.f;
  }

  // ---- logits by FFMA, C in slabs of 32
  const int kg = tid & 7, rg = tid >> 3;
  float acc[RI][TK];
#pragma unroll
  for (int i = 0; i < RI; ++i)
#pragma unroll
    for (int j = 0; j < TK; ++j) acc[i][j] = 0.f;
  float xr[QL], kr[TK];
  // slab elements of this thread: rows t0 + (tid >> 5) + 8i, keys (tid >> 5) + 8j, channel c0 + lane
  const int64_t r_first = t0 + warp;
  const int nrow_ok = r_first < t1 ? static_cast<int>(min64(QL, (t1 - r_first + 7) / 8)) : 0;
  const int nk_ok = warp < K ? static_cast<int>(min64(TK, (K - warp + 7) / 8)) : 0;
  const Tin* xp = qb + r_first * C + lane;
  const Tin* kp = kbp + static_cast<int64_t>(warp) * C + lane;
  auto load = [&](int64_t c0) {
    const bool c_ok = c0 + lane < C;
    const int64_t step = 8 * C;
    const Tin* p = xp + c0;
#pragma unroll
    for (int i = 0; i < QL; ++i) {
      xr[i] = (c_ok && i < nrow_ok) ? to_acc(*p) : 0.f;
      p += step;
    }
    const Tin* m = kp + c0;
#pragma unroll
    for (int j = 0; j < TK; ++j) {
      kr[j] = (c_ok && j < nk_ok) ? to_acc(*m) : 0.f;
      m += step;
    }
  };
  const int64_t nslab = (C + kSlab - 1) / kSlab;
  if (nslab > 0) load(0);
  for (int64_t s = 0; s < nslab; ++s) {
    __syncthreads();  // everyone is done with the previous slab (and hs is written)
#pragma unroll
    for (int i = 0; i < QL; ++i) xs[(warp + 8 * i) * kXS + lane] = xr[i];
#pragma unroll
    for (int j = 0; j < TK; ++j) ks[(warp + 8 * j) * kXS + lane] = kr[j];
    __syncthreads();
    if (s + 1 < nslab) load((s + 1) * kSlab);
#pragma unroll 1
    for (int c = 0; c < kSlab; c += 4) {
      float xv[RI][4];
#pragma unroll
      for (int i = 0; i < RI; ++i) ld4(xs + (rg + 32 * i) * kXS + c, xv[i]);
#pragma unroll
      for (int j = 0; j < TK; ++j) {
        float mv[4];
        ld4(ks + (kg + 8 * j) * kXS + c, mv);
#pragma unroll
        for (int i = 0; i < RI; ++i)
#pragma unroll
          for (int u = 0; u < 4; ++u) acc[i][j] += xv[i][u] * mv[u];
      }
    }
  }
  __syncthreads();  // hs visible (C = 0: no slab), stage free for the readout

  // ---- softmax over K in registers: the 8 lanes of a row are lanes 8g … 8g+7
#pragma unroll
  for (int i = 0; i < RI; ++i) {
    float l[TK];
    float m = -INFINITY;
#pragma unroll
    for (int j = 0; j < TK; ++j) {
      const int k = kg + 8 * j;
      float t = __fmul_rn(a.kappa, acc[i][j]);
      if (l2) t = t - hs[k];
      l[j] = t;
      if (k < K) m = t > m ? t : m;
    }
#pragma unroll
    for (int off = 1; off < 8; off <<= 1) {
      const float o = __shfl_xor_sync(0xffffffffu, m, off);
      m = o > m ? o : m;
    }
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < TK; ++j) {
      const int k = kg + 8 * j;
      const float e = k < K ? expf(l[j] - m) : 0.f;
      l[j] = e;
      sum += e;
    }
#pragma unroll
    for (int off = 1; off < 8; off <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
    float* zr = Zs + (rg + 32 * i) * ZST;
#pragma unroll
    for (int j = 0; j < TK; ++j) {
      const int k = kg + 8 * j;
      zr[k] = k < K ? l[j] / sum : 0.f;
    }
  }
  __syncthreads();

  // ---- attn: the tile's rows are one contiguous run of attn
  {
    const int nrows = static_cast<int>(t1 - t0);
    const int Ki = static_cast<int>(K);
    const int total = nrows * Ki;
    float* ap = a.attn + (b * Nq + t0) * K;
    for (int e = tid; e < total; e += kThreads) {
      const int r = e / Ki;
      ap[e] = Zs[r * ZST + (e - r * Ki)];
    }
  }

  // ---- readout: out = Zs · V, CV in chunks of CW
  const int og = tid % CG, orr = tid / CG;
  float vr[VL];
  // value chunk elements of this thread: keys tid / CW + (256 / CW)·p, channel c0 + tid % CW
  constexpr int VRS = kThreads / CW;
  const int v_k = tid / CW, v_col = tid % CW;
  const int nvk = v_k < K ? static_cast<int>(min64(VL, (K - v_k + VRS - 1) / VRS)) : 0;
  auto vload = [&](int64_t c0) {
    const bool c_ok = c0 + v_col < CV;
    const Tin* p = vb + static_cast<int64_t>(v_k) * CV + c0 + v_col;
#pragma unroll
    for (int u = 0; u < VL; ++u) {
      vr[u] = (c_ok && u < nvk) ? to_acc(*p) : 0.f;
      p += VRS * CV;
    }
  };
  const int64_t nchunk = (CV + CW - 1) / CW;
  const bool vec_out = (CV & 3) == 0;
  if (nchunk > 0) vload(0);
  for (int64_t ch = 0; ch < nchunk; ++ch) {
    const int64_t c0 = ch * CW;
    __syncthreads();  // previous chunk (or the logits stage) no longer read
#pragma unroll
    for (int p = 0; p < VL; ++p) vs[tid + kThreads * p] = vr[p];
    __syncthreads();
    if (ch + 1 < nchunk) vload(c0 + CW);
    float o[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int p = 0; p < 4; ++p) o[i][p] = 0.f;
#pragma unroll 1
    for (int k = 0; k < KB; k += 4) {
      float zv[4][4];
#pragma unroll
      for (int i = 0; i < 4; ++i) ld4(Zs + (orr + RG * i) * ZST + k, zv[i]);
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        float vv[4];
        ld4(vs + (k + u) * CW + og * 4, vv);
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int p = 0; p < 4; ++p) o[i][p] += zv[i][u] * vv[p];
      }
    }
    const int64_t col = c0 + og * 4;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t row = t0 + orr + RG * i;
      if (row < t1) {
        st4(a.out + (b * Nq + row) * CV + col, o[i], CV - col, vec_out);
      }
    }
  }
}

// ------------------------------------------------------------ prototype_attention (simple)
// One warp per query row (rows of all batches flattened): logits into the attn row, then
// the softmax in place, then out = attn · V with lanes over the value channels.
template <typename Tin, typename T>
__global__ void __launch_bounds__(kThreads) attn_simple_kernel(const Tin* __restrict__ q, const Tin* __restrict__ kt,
                                                               const Tin* __restrict__ vt, T* __restrict__ out,
                                                               T* attn, int64_t rows, int64_t Nq, int64_t C, int64_t K,
                                                               int64_t CV, T kappa, int kernel) {
  const int lane = threadIdx.x & 31;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + (threadIdx.x >> 5);
  if (row >= rows) return;  // whole warps leave; no block barrier below
  const int64_t b = row / Nq;
  const Tin* qr = q + row * C;
  T* ar = attn + row * K;
  const bool l2 = kernel == 1;
  for (int64_t k = 0; k < K; ++k) {
    const Tin* kr = kt + (b * K + k) * C;
    T dot = T(0), sq = T(0);
    for (int64_t c = lane; c < C; c += 32) {
      const T kv = T(to_acc(kr[c]));
      dot += T(to_acc(qr[c])) * kv;
      sq += kv * kv;
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      dot += __shfl_xor_sync(0xffffffffu, dot, off);
      sq += __shfl_xor_sync(0xffffffffu, sq, off);
    }
    const T l = kappa * dot;
    if (lane == (k & 31)) ar[k] = l2 ? l - kappa / T(2) * sq : l;
  }
  __syncwarp();
  T m = T(-INFINITY);
  for (int64_t k = lane; k < K; k += 32) {
    const T l = ar[k];
    m = l > m ? l : m;
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const T o = __shfl_xor_sync(0xffffffffu, m, off);
    m = o > m ? o : m;
  }
  T sum = T(0);
  for (int64_t k = lane; k < K; k += 32) {
    const T e = exp(ar[k] - m);
    ar[k] = e;
    sum += e;
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  for (int64_t k = lane; k < K; k += 32) ar[k] = ar[k] / sum;
  __syncwarp();
  T* orow = out + row * CV;
  const Tin* vb = vt + b * K * CV;
  for (int64_t c = lane; c < CV; c += 32) {
    T o = T(0);
    for (int64_t k = 0; k < K; ++k) o += ar[k] * T(to_acc(vb[k * CV + c]));
    orow[c] = o;
  }
}

// ---------------------------------------------------------------- prototype_values (fast)
template <int KB>
struct PvCfg {
  static constexpr int KQ = KB / 4;               // key groups (4 keys each)
  static constexpr int CQ = kThreads / KQ;        // channel groups (4 channels each)
  static constexpr int CW = 4 * CQ;               // value channels per block
  static constexpr int RL = kRT * KB / kThreads;  // r elements per thread and staging tile
  static constexpr int VL = kRT * CW / kThreads;  // v elements per thread and staging tile
  static_assert(KB == 16 || KB == 32 || KB == 64, "key block");
};

template <typename Tin>
struct PvArgs {
  const Tin* v;   // [B, N, CV]
  const Tin* r;   // [B, N, K]
  float* out;     // [B, K, CV] (G == 1)
  float* pa;      // [B, G, K, CV] partial Σ r v (G > 1)
  float* ps;      // [B, G, K] partial Σ r (G > 1)
  int64_t N, CV, K, G, rps, nkb, nch;
};

template <int KB, typename Tin>
__global__ void __launch_bounds__(kThreads, 2) pv_kernel(const PvArgs<Tin> a) {
  using Cf = PvCfg<KB>;
  constexpr int KQ = Cf::KQ, CW = Cf::CW, RL = Cf::RL, VL = Cf::VL;
  __shared__ __align__(16) float rs[kRT * KB];
  __shared__ __align__(16) float vs[kRT * CW];
  __shared__ float Ss[KB];
  const int tid = threadIdx.x;
  int64_t blk = blockIdx.x;
  const int64_t ch = blk % a.nch;
  blk /= a.nch;
  const int64_t kblk = blk % a.nkb;
  blk /= a.nkb;
  const int64_t g = blk % a.G;
  const int64_t b = blk / a.G;
  const int64_t N = a.N, CV = a.CV, K = a.K;
  const int64_t n0 = g * a.rps, n1 = min64(N, n0 + a.rps);
  const int64_t k0 = kblk * KB, c0 = ch * CW;
  // a warp = 4 key groups × 8 channel groups
  const int kq = (tid >> 3) % KQ;
  const int cg = (tid & 7) + 8 * ((tid >> 3) / KQ);
  const bool want_s = cg == 0;
  float acc[4][4], sacc[4];
#pragma unroll
  for (int u = 0; u < 4; ++u) {
    sacc[u] = 0.f;
#pragma unroll
    for (int p = 0; p < 4; ++p) acc[u][p] = 0.f;
  }
  float rr[RL], vr[VL];
  // staging elements of this thread: r rows s0 + tid / KB + (256 / KB)·p, key k0 + tid % KB;
  // v rows s0 + tid / CW + (256 / CW)·p, channel c0 + tid % CW
  constexpr int RSR = kThreads / KB, RSV = kThreads / CW;
  const int r_row = tid / KB, v_row = tid / CW;
  const bool rk_ok = k0 + tid % KB < K;
  const bool vc_ok = c0 + tid % CW < CV;
  const Tin* rp0 = a.r + (b * N + n0 + r_row) * K + k0 + tid % KB;
  const Tin* vp0 = a.v + (b * N + n0 + v_row) * CV + c0 + tid % CW;
  auto load = [&](int64_t s0) {
    const int64_t rem_r = n1 - s0 - r_row, rem_v = n1 - s0 - v_row;
    const int nr = rk_ok && rem_r > 0 ? static_cast<int>(min64(RL, (rem_r + RSR - 1) / RSR)) : 0;
    const int nv = vc_ok && rem_v > 0 ? static_cast<int>(min64(VL, (rem_v + RSV - 1) / RSV)) : 0;
    const Tin* rq = rp0 + (s0 - n0) * K;
#pragma unroll
    for (int p = 0; p < RL; ++p) {
      rr[p] = p < nr ? to_acc(*rq) : 0.f;
      rq += RSR * K;
    }
    const Tin* vq = vp0 + (s0 - n0) * CV;
#pragma unroll
    for (int p = 0; p < VL; ++p) {
      vr[p] = p < nv ? to_acc(*vq) : 0.f;
      vq += RSV * CV;
    }
  };
  if (n0 < n1) load(n0);
  for (int64_t s0 = n0; s0 < n1; s0 += kRT) {
    __syncthreads();
#pragma unroll
    for (int p = 0; p < RL; ++p) rs[tid + kThreads * p] = rr[p];
#pragma unroll
    for (int p = 0; p < VL; ++p) vs[tid + kThreads * p] = vr[p];
    __syncthreads();
    if (s0 + kRT < n1) load(s0 + kRT);
#pragma unroll 4
    for (int n = 0; n < kRT; ++n) {
      float zv[4], xv[4];
      ld4(rs + n * KB + kq * 4, zv);
      ld4(vs + n * CW + cg * 4, xv);
#pragma unroll
      for (int u = 0; u < 4; ++u) {
#pragma unroll
        for (int p = 0; p < 4; ++p) acc[u][p] += zv[u] * xv[p];
        if (want_s) sacc[u] += zv[u];
      }
    }
  }
  const int64_t col = c0 + cg * 4;
  const bool vec = (CV & 3) == 0;
  if (a.G == 1) {
    if (want_s) {
#pragma unroll
      for (int u = 0; u < 4; ++u) Ss[kq * 4 + u] = sacc[u];
    }
    __syncthreads();
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int64_t k = k0 + kq * 4 + u;
      if (k < K) {
        const float den = 1e-6f + Ss[kq * 4 + u];
        const float v[4] = {acc[u][0] / den, acc[u][1] / den, acc[u][2] / den, acc[u][3] / den};
        st4(a.out + (b * K + k) * CV + col, v, CV - col, vec);
      }
    }
  } else {
    const int64_t row = b * a.G + g;
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int64_t k = k0 + kq * 4 + u;
      if (k < K) {
        st4(a.pa + (row * K + k) * CV + col, acc[u], CV - col, vec);
        if (want_s && ch == 0) a.ps[row * K + k] = sacc[u];
      }
    }
  }
}

// out[b, k, c] = Σ_g pa[b, g, k, c] / (1e-6 + Σ_g ps[b, g, k]), g in order.
__global__ void __launch_bounds__(kThreads) pv_reduce_kernel(const float* __restrict__ pa,
                                                             const float* __restrict__ ps, float* __restrict__ out,
                                                             int64_t total, int64_t G, int64_t K, int64_t CV) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (idx >= total) return;
  const int64_t c = idx % CV, bk = idx / CV;
  const int64_t k = bk % K, b = bk / K;
  float s = 0.f, v = 0.f;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t row = b * G + g;
    s += ps[row * K + k];
    v += pa[(row * K + k) * CV + c];
  }
  out[idx] = v / (1e-6f + s);
}

// ---------------------------------------------------------------- prototype_values (simple)
template <typename Tin, typename T>
__global__ void __launch_bounds__(kThreads) pv_simple_kernel(const Tin* __restrict__ v, const Tin* __restrict__ r,
                                                             T* __restrict__ out, int64_t total, int64_t N, int64_t K,
                                                             int64_t CV) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (idx >= total) return;
  const int64_t c = idx % CV, bk = idx / CV;
  const int64_t k = bk % K, b = bk / K;
  const Tin* rp = r + b * N * K + k;
  const Tin* vp = v + b * N * CV + c;
  T a = T(0), s = T(0);
  for (int64_t n = 0; n < N; ++n) {
    const T w = T(to_acc(rp[n * K]));
    a += w * T(to_acc(vp[n * CV]));
    s += w;
  }
  out[idx] = a / (T(1e-6) + s);
}

// ----------------------------------------------------------------------------- plans
int device_sms(int& dev, int& sms) {
  VOS_CUDA_TRY(cudaGetDevice(&dev));
  VOS_CUDA_TRY(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  sms = std::max(sms, 1);
  return 0;
}

inline int64_t align256(int64_t v) { return (v + 255) / 256 * 256; }

struct PvPlan {
  bool simple = false;
  int kb = 16;
  int64_t G = 1, rps = 0, nkb = 1, nch = 1;
  int64_t off_s = 0, total = 0;
};

int pv_cw(int kb) { return 4 * (kThreads / (kb / 4)); }

int pv_plan(int64_t B, int64_t N, int64_t CV, int64_t K, Dtype dtype, PvPlan& p) {
  p = PvPlan();
  if (dtype == Dtype::kFloat64) {
    p.simple = true;
    return 0;
  }
  int dev = 0, sms = 0;
  const int rc = device_sms(dev, sms);
  if (rc != 0) return rc;
  p.kb = K <= 16 ? 16 : (K <= 32 ? 32 : 64);
  p.nkb = (K + p.kb - 1) / p.kb;
  p.nch = (CV + pv_cw(p.kb) - 1) / pv_cw(p.kb);
  const int64_t n = std::max<int64_t>(N, 1);
  const int64_t base = std::max<int64_t>(1, B * p.nkb * p.nch);
  const int64_t target = 2 * int64_t(sms);
  int64_t G = base >= target ? 1 : (target + base - 1) / base;
  G = std::max<int64_t>(1, std::min<int64_t>(G, n / 256));  // ≥ 256 rows per split
  p.rps = ((n + G - 1) / G + kRT - 1) / kRT * kRT;
  p.G = (n + p.rps - 1) / p.rps;
  if (p.G > 1) {
    p.off_s = align256(B * p.G * K * CV * int64_t(sizeof(float)));
    p.total = p.off_s + align256(B * p.G * K * int64_t(sizeof(float)));
  }
  return 0;
}

template <int KB, typename Tin>
int launch_pv_kb(const void* values, const void* resp, void* out, void* ws, const PvPlan& p, int64_t B, int64_t N,
                 int64_t CV, int64_t K, cudaStream_t st) {
  PvArgs<Tin> a;
  a.v = static_cast<const Tin*>(values);
  a.r = static_cast<const Tin*>(resp);
  a.out = static_cast<float*>(out);
  unsigned char* w = static_cast<unsigned char*>(ws);
  a.pa = p.G > 1 ? reinterpret_cast<float*>(w) : nullptr;
  a.ps = p.G > 1 ? reinterpret_cast<float*>(w + p.off_s) : nullptr;
  a.N = N;
  a.CV = CV;
  a.K = K;
  a.G = p.G;
  a.rps = p.rps;
  a.nkb = p.nkb;
  a.nch = p.nch;
  const int64_t blocks = B * p.G * p.nkb * p.nch;
  if (blocks > 0x7fffffffLL) return static_cast<int>(cudaErrorInvalidConfiguration);
  pv_kernel<KB, Tin><<<dim3(static_cast<unsigned>(blocks)), kThreads, 0, st>>>(a);
  VOS_CUDA_CHECK_LAUNCH();
  if (p.G > 1) {
    const int64_t total = B * K * CV;
    const int64_t nb = (total + kThreads - 1) / kThreads;
    if (nb > 0x7fffffffLL) return static_cast<int>(cudaErrorInvalidConfiguration);
    pv_reduce_kernel<<<dim3(static_cast<unsigned>(nb)), kThreads, 0, st>>>(a.pa, a.ps, a.out, total, p.G, K, CV);
    VOS_CUDA_CHECK_LAUNCH();
  }
  return 0;
}

template <typename Tin>
int launch_pv(const void* values, const void* resp, void* out, void* ws, const PvPlan& p, int64_t B, int64_t N,
              int64_t CV, int64_t K, cudaStream_t st) {
  switch (p.kb) {
    case 16: return launch_pv_kb<16, Tin>(values, resp, out, ws, p, B, N, CV, K, st);
    case 32: return launch_pv_kb<32, Tin>(values, resp, out, ws, p, B, N, CV, K, st);
    default: return launch_pv_kb<64, Tin>(values, resp, out, ws, p, B, N, CV, K, st);
  }
}

template <typename Tin, typename T>
int launch_pv_simple(const void* values, const void* resp, void* out, int64_t B, int64_t N, int64_t CV, int64_t K,
                     cudaStream_t st) {
  const int64_t total = B * K * CV;
  const int64_t nb = (total + kThreads - 1) / kThreads;
  if (nb > 0x7fffffffLL) return static_cast<int>(cudaErrorInvalidConfiguration);
  pv_simple_kernel<Tin, T><<<dim3(static_cast<unsigned>(nb)), kThreads, 0, st>>>(
      static_cast<const Tin*>(values), static_cast<const Tin*>(resp), static_cast<T*>(out), total, N, K, CV);
  VOS_CUDA_CHECK_LAUNCH();
  return 0;
}

// attention: fast-path launch of one (TQ, KB) instance; returns -1 when its shared memory
// does not fit the device (the caller then takes the simple kernel).
template <int TQ, int KB, typename Tin>
int launch_attn_tq(const AttnArgs<Tin>& base, int64_t B, int dev, cudaStream_t st) {
  using Cf = AttnCfg<TQ, KB>;
  const int smem = Cf::SMEM_FLOATS * static_cast<int>(sizeof(float));
  if (smem > max_dynamic_smem(dev)) return -1;
  AttnArgs<Tin> a = base;
  a.ntiles = (a.Nq + TQ - 1) / TQ;
  a.rpt = (a.Nq + a.ntiles - 1) / a.ntiles;
  const int64_t blocks = B * a.ntiles;
  if (blocks > 0x7fffffffLL) return static_cast<int>(cudaErrorInvalidConfiguration);
  auto* kern = attn_kernel<TQ, KB, Tin>;
  VOS_CUDA_TRY(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  kern<<<dim3(static_cast<unsigned>(blocks)), kThreads, smem, st>>>(a);
  VOS_CUDA_CHECK_LAUNCH();
  return 0;
}

template <int KB, typename Tin>
int launch_attn_kb(const AttnArgs<Tin>& a, int64_t B, bool big_tile, int dev, cudaStream_t st) {
  return big_tile ? launch_attn_tq<128, KB, Tin>(a, B, dev, st) : launch_attn_tq<64, KB, Tin>(a, B, dev, st);
}

template <typename Tin>
int launch_attn_fast(const void* query, const void* keys, const void* values, void* out, void* attn, int64_t B,
                     int64_t Nq, int64_t C, int64_t K, int64_t CV, double kappa, int kernel, int dev, int sms,
                     cudaStream_t st) {
  AttnArgs<Tin> a;
  a.q = static_cast<const Tin*>(query);
  a.k = static_cast<const Tin*>(keys);
  a.v = static_cast<const Tin*>(values);
  a.out = static_cast<float*>(out);
  a.attn = static_cast<float*>(attn);
  a.Nq = Nq;
  a.C = C;
  a.K = K;
  a.CV = CV;
  a.ntiles = 1;
  a.rpt = 1;
  a.kappa = static_cast<float>(kappa);
  a.kernel = kernel;
  const bool big = B * ((Nq + 127) / 128) >= 2 * int64_t(sms);
  if (K <= 8) return launch_attn_kb<8, Tin>(a, B, big, dev, st);
  if (K <= 16) return launch_attn_kb<16, Tin>(a, B, big, dev, st);
  if (K <= 24) return launch_attn_kb<24, Tin>(a, B, big, dev, st);
  if (K <= 32) return launch_attn_kb<32, Tin>(a, B, big, dev, st);
  if (K <= 48) return launch_attn_kb<48, Tin>(a, B, big, dev, st);
  return launch_attn_kb<64, Tin>(a, B, big, dev, st);
}

template <typename Tin, typename T>
int launch_attn_simple(const void* query, const void* keys, const void* values, void* out, void* attn, int64_t B,
                       int64_t Nq, int64_t C, int64_t K, int64_t CV, double kappa, int kernel, cudaStream_t st) {
  const int64_t rows = B * Nq;
  const int64_t wpb = kThreads / 32;
  const int64_t nb = (rows + wpb - 1) / wpb;
  if (nb > 0x7fffffffLL) return static_cast<int>(cudaErrorInvalidConfiguration);
  attn_simple_kernel<Tin, T><<<dim3(static_cast<unsigned>(nb)), kThreads, 0, st>>>(
      static_cast<const Tin*>(query), static_cast<const Tin*>(keys), static_cast<const Tin*>(values),
      static_cast<T*>(out), static_cast<T*>(attn), rows, Nq, C, K, CV, static_cast<T>(kappa), kernel);
  VOS_CUDA_CHECK_LAUNCH();
  return 0;
}

template <typename Tin>
int attn_dispatch(const void* query, const void* keys, const void* values, void* out, void* attn, int64_t B,
                  int64_t Nq, int64_t C, int64_t K, int64_t CV, double kappa, int kernel, cudaStream_t st) {
  if (K <= 64) {
    int dev = 0, sms = 0;
    const int rc0 = device_sms(dev, sms);
    if (rc0 != 0) return rc0;
    const int rc = launch_attn_fast<Tin>(query, keys, values, out, attn, B, Nq, C, K, CV, kappa, kernel, dev, sms, st);
    if (rc != -1) return rc;
  }
  return launch_attn_simple<Tin, float>(query, keys, values, out, attn, B, Nq, C, K, CV, kappa, kernel, st);
}

}  // namespace

int64_t prototype_values_workspace_bytes(int64_t B, int64_t N, int64_t CV, int64_t K, Dtype dtype) {
  if (B <= 0 || N <= 0 || CV <= 0 || K <= 0) return 0;
  PvPlan p;
  if (pv_plan(B, N, CV, K, dtype, p) != 0) return 0;
  return p.total;
}

int prototype_values(const void* values, const void* resp, void* out, void* workspace, int64_t workspace_bytes,
                     int64_t B, int64_t N, int64_t CV, int64_t K, Dtype dtype, MatmulPrecision precision,
                     void* stream) {
  (void)precision;  // FFMA products: fp32-accurate under either precision
  if (B <= 0 || N <= 0 || CV <= 0 || K <= 0) return 0;
  PvPlan p;
  const int rc = pv_plan(B, N, CV, K, dtype, p);
  if (rc != 0) return rc;
  if (workspace_bytes < p.total || (p.total > 0 && workspace == nullptr)) return static_cast<int>(cudaErrorInvalidValue);
  cudaStream_t st = as_stream(stream);
  switch (dtype) {
    case Dtype::kFloat32: return launch_pv<float>(values, resp, out, workspace, p, B, N, CV, K, st);
    case Dtype::kFloat16: return launch_pv<__half>(values, resp, out, workspace, p, B, N, CV, K, st);
    case Dtype::kBFloat16: return launch_pv<__nv_bfloat16>(values, resp, out, workspace, p, B, N, CV, K, st);
    case Dtype::kFloat64: return launch_pv_simple<double, double>(values, resp, out, B, N, CV, K, st);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int prototype_attention(const void* query, const void* keys, const void* values, void* out, void* attn, int64_t B,
                        int64_t Nq, int64_t C, int64_t K, int64_t CV, double kappa, int kernel, Dtype dtype,
                        MatmulPrecision precision, void* stream) {
  (void)precision;  // FFMA products: fp32-accurate under either precision
  if (B <= 0 || Nq <= 0 || K <= 0) return 0;
  if (C < 0 || CV < 0) return static_cast<int>(cudaErrorInvalidValue);
  cudaStream_t st = as_stream(stream);
  switch (dtype) {
    case Dtype::kFloat32: return attn_dispatch<float>(query, keys, values, out, attn, B, Nq, C, K, CV, kappa, kernel, st);
    case Dtype::kFloat16:
      return attn_dispatch<__half>(query, keys, values, out, attn, B, Nq, C, K, CV, kappa, kernel, st);
    case Dtype::kBFloat16:
      return attn_dispatch<__nv_bfloat16>(query, keys, values, out, attn, B, Nq, C, K, CV, kappa, kernel, st);
    case Dtype::kFloat64:
      return launch_attn_simple<double, double>(query, keys, values, out, attn, B, Nq, C, K, CV, kappa, kernel, st);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace cuda
}  // namespace vos
