// CUDA kernels of CFBI / CFBI+ global matching (labelled_nearest_sqdist,
// fb_global_matching) and of nearest_sqdist_backward. Semantics: csrc/cpu/matching.cpp.
//
// Design
// ------
// Pre-pass (per batch element, O(reference)): the reference pixels on the atrous grid
// (y % rate == 0 and x % rate == 0) with a label in [0, L) are bucketed by label with a
// stable counting sort made of three small kernels: (1) each warp takes 32 consecutive
// grid pixels and writes, per label, how many of them carry it (__match_any_sync), into
// cnt[b][l][warp]; (2) one block per batch element exclusive-scans cnt in (label, warp)
// order, which also gives the label segments seg[b][0..L]; (3) each pixel's position is
// its warp's base plus its rank among the warp's lanes of the same label, so every label
// segment lists its pixels in increasing flat index. Step (3) writes the original flat
// index (ridx) and, for the tensor-core path, gathers the pixel into a float32 workspace
// row of Cpad = roundup(C, 8) channels (zero padded) with its squared norm.
//
// Main kernel (float32 / float16 / bfloat16 inputs): d = |q|^2 + |r|^2 - 2 q.r, the q.r
// on the tensor cores with mma.sync.m16n8k8 TF32 (kIEEE: 3xTF32 split products
// a_lo*b_hi + a_hi*b_lo + a_hi*b_hi, fp32-accurate; kTF32 and half inputs: one product).
// A block is 4 warps and owns 128 query rows for the whole reference: the query tile
// [128][Cpad] lives in shared memory (row stride Cpad + 4 floats: the fragment loads
// hit 32 distinct banks), each warp owns 32 rows (two m16 tiles) and computes a 32 x 64
// block of each 64-pixel reference tile (64 fp32 accumulators per thread). Reference
// tiles ([64][Cpad] + their norms) are double-buffered in shared memory with cp.async.
// Because the workspace is grouped by label, every tile belongs to a single label (the
// last tile of a label is masked), so the epilogue keeps, per query row and thread, one
// running (key, position) pair in registers: key = max(d, 0), or -1 for NaN (NaN sorts
// first, as the CPU's "first NaN is sticky" rule); strict '<' in increasing position
// gives the lowest index on ties, since positions increase with the flat index. At the
// end of a label two quad shuffles merge the four threads of a row (key, then position),
// and one thread per row writes sqdist/index, or fg = tanh((d + bias[l]) / 2) (1.0 for
// an empty label) while keeping the best and second-best fg per row in registers
// across labels; bg is written after the last label.
//
// float64, or a C too large for the shared-memory tiles: a SIMT kernel (a thread per
// query row, candidates in increasing flat index with the CPU's update rule).
//
// Backward: grad_query by a warp per query pixel (lanes over channels, m in order);
// grad_reference by a warp per reference pixel over its segment of the pairs sorted by
// (reference index, original position) (the glue's stable sort), in that order: the
// same summation order as the CPU kernel, no atomics, bitwise reproducible.
//
// Predictions (H100 SXM; TF32 dense 495 TFLOP/s, of which mma.sync reaches ~60%):
// * CFBI+ YouTube-VOS, stride 4, atrous 2: Nq = 145*261 = 37845, Nr = 73*131 = 9563,
//   C = 32, L = 6. 2*Nq*Nr*C = 23.2 GFLOP (3xTF32: 69.5 GFLOP of TF32 work); 362 M
//   distances through an ~8-instruction epilogue (~0.1 ms of issue); reference re-read
//   from L2 once per 128 queries: 0.36 GB (~70 us at L2 bandwidth, overlapped).
//   296 blocks on 132 SMs (2-3 per SM: ~75% wave efficiency). Expect ~0.3 ms
//   ("highest") / ~0.22 ms ("high"); HBM traffic is only ~10 MB, so compute/issue bound.
// * CFBI DAVIS, stride 4, C = 100 (Cpad 104), no atrous: Nq = Nr = 120*214 = 25680,
//   L = 4. 132 GFLOP (3xTF32: 396 GFLOP TF32); 111 KB of shared memory per block, 2 per
//   SM, 201 blocks (~76% wave efficiency). Expect ~1.6 ms ("highest") / ~0.6 ms ("high").
//   Tensor-core bound.
// Resources (ptxas, sm_90): main kernel 138-167 registers (<= 168: 3 blocks/SM), no
// spills, no stack; shared memory (128 + 2*64)*(Cpad+4)*4 + 1 KB: 38 KB at C = 32,
// 112 KB at C = 100. Beyond the device's opt-in limit (C > ~200) the SIMT kernel runs.
// * Pre-pass: 4 launches on O(Nr) data, ~10-15 us. Backward: memory/latency bound,
//   O((B*M*Nq + B*Nr) * C) bytes, plus the glue's sort (~20-40 us at these sizes).

#include <cub/block/block_scan.cuh>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/fb_state.cuh"
#include "cuda/global_matching.h"

namespace vos {
namespace cuda {
namespace {

constexpr int kBM = 128;          // query rows per block
constexpr int kBN = 64;           // reference pixels per tile
constexpr int kThreads = 128;     // 4 warps, 32 query rows each
constexpr int kPreWarps = 8;      // warps per block of the pre-pass kernels
constexpr int kScanThreads = 1024;
constexpr int kMaxGridY = 65535;
constexpr int64_t kAlign = 256;
static_assert(kThreads == kBM, "one thread per query row computes |q|^2");

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T clamp_nonneg(T d) {
  return d < T(0) ? T(0) : d;  // keeps NaN
}

template <typename T>
__device__ __forceinline__ bool improves(T d, T best) {
  return d < best || (d != d && best == best);
}

__device__ __forceinline__ float fg_transform(float d, float b) { return tanhf((d + b) * 0.5f); }
__device__ __forceinline__ double fg_transform(double d, double b) { return tanh((d + b) / 2.0); }


// ---------------------------------------------------------------------------------
// Pre-pass: stable bucketing of the labelled atrous-grid reference pixels by label.
// ---------------------------------------------------------------------------------

struct GridGeom {
  int64_t Hr, Wr, Hg, Wg, HWr, Ncap, Nr;  // Ncap = T*Hg*Wg grid pixels per batch
  int rate, L, NW;
};

// Flat reference index of grid pixel gi (increasing in gi) and its label (-1: none).
__device__ __forceinline__ int grid_label(const int32_t* __restrict__ labels, const GridGeom& g,
                                          int64_t b, int64_t gi, int64_t& n) {
  n = 0;
  if (gi >= g.Ncap) return -1;
  const int64_t hw = g.Hg * g.Wg;
  const int64_t t = gi / hw, rem = gi - t * hw;
  const int64_t yg = rem / g.Wg, xg = rem - yg * g.Wg;
  n = t * g.HWr + yg * g.rate * g.Wr + xg * g.rate;
  const int v = labels[b * g.Nr + n];
  return (v >= 0 && v < g.L) ? v : -1;
}

__global__ void __launch_bounds__(kPreWarps * 32)
    prepass_count_kernel(const int32_t* __restrict__ labels, int32_t* __restrict__ cnt,
                         GridGeom g, int64_t b0) {
  const int lane = threadIdx.x & 31;
  const int64_t w = int64_t(blockIdx.x) * kPreWarps + (threadIdx.x >> 5);
  if (w >= g.NW) return;  // whole warp
  const int64_t b = b0 + blockIdx.y;
  int64_t n;
  const int lab = grid_label(labels, g, b, w * 32 + lane, n);
  const unsigned match = __match_any_sync(0xffffffffu, lab);
  if (lab >= 0 && (__ffs(match) - 1) == lane)
    cnt[(b * g.L + lab) * g.NW + w] = __popc(match);
}

// In-place exclusive scan of cnt[b] (label-major, warp-minor) and seg[b][0..L].
__global__ void __launch_bounds__(kScanThreads)
    prepass_scan_kernel(int32_t* __restrict__ cnt, int32_t* __restrict__ seg, int L, int NW) {
  using Scan = cub::BlockScan<int, kScanThreads>;
  __shared__ typename Scan::TempStorage tmp;
  const int64_t b = blockIdx.x;
  int32_t* c = cnt + b * int64_t(L) * NW;
  int32_t* s = seg + b * int64_t(L + 1);
  const int64_t len = int64_t(L) * NW;
  int carry = 0;
  for (int64_t base = 0; base < len; base += kScanThreads) {
    const int64_t e = base + threadIdx.x;
    int v = e < len ? c[e] : 0;
    int total;
    Scan(tmp).ExclusiveSum(v, v, total);
    v += carry;
    if (e < len) {
      c[e] = v;
      if (e % NW == 0) s[e / NW] = v;
    }
    carry += total;
    __syncthreads();  // tmp is reused
  }
  if (NW == 0) {
    for (int l = threadIdx.x; l < L; l += kScanThreads) s[l] = 0;
  }
  if (threadIdx.x == 0) s[L] = carry;
}

// Positions (stable within each label) -> ridx, and for kGather the float32 rows
// (zero-padded to Cpad) and their squared norms.
template <typename InT, bool kGather>
__global__ void __launch_bounds__(kPreWarps * 32)
    prepass_scatter_kernel(const int32_t* __restrict__ labels, const InT* __restrict__ ref,
                           const int32_t* __restrict__ off, int32_t* __restrict__ ridx,
                           float* __restrict__ ws_ref, float* __restrict__ ws_rn, GridGeom g,
                           int C, int Cpad, int64_t b0) {
  const int lane = threadIdx.x & 31;
  const int64_t w = int64_t(blockIdx.x) * kPreWarps + (threadIdx.x >> 5);
  if (w >= g.NW) return;
  const int64_t b = b0 + blockIdx.y;
  int64_t n;
  const int lab = grid_label(labels, g, b, w * 32 + lane, n);
  const unsigned match = __match_any_sync(0xffffffffu, lab);
  int pos = -1;
  if (lab >= 0) {
    pos = off[(b * g.L + lab) * g.NW + w] + __popc(match & ((1u << lane) - 1u));
    ridx[b * g.Ncap + pos] = static_cast<int32_t>(n);
  }
  if constexpr (kGather) {
    for (int j = 0; j < 32; ++j) {
      const int pj = __shfl_sync(0xffffffffu, pos, j);
      const int64_t nj = __shfl_sync(0xffffffffu, n, j);
      if (pj < 0) continue;  // warp-uniform
      const InT* src = ref + (b * g.Nr + nj) * C;
      float* dst = ws_ref + (b * g.Ncap + pj) * Cpad;
      float ss = 0.f;
      for (int c = lane; c < Cpad; c += 32) {
        const float v = c < C ? to_float(src[c]) : 0.f;
        dst[c] = v;
        ss += v * v;
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
      if (lane == 0) ws_rn[b * g.Ncap + pj] = ss;
    }
  }
}

// ---------------------------------------------------------------------------------
// Tensor-core main kernel.
// ---------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t f2tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
  return r;
}

__device__ __forceinline__ void mma_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void cp_async16(float* smem, const float* gmem, int src_bytes) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(s), "l"(gmem),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async4(float* smem, const float* gmem, int src_bytes) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(s), "l"(gmem),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
__device__ __forceinline__ void cp_async_wait1() { asm volatile("cp.async.wait_group 1;" ::: "memory"); }

// The tile sequence of one block: the label segments in order, kBN pixels at a time.
struct TileIter {
  int l, start, end;
  __device__ __forceinline__ void seek(const int32_t* seg, int L, int from) {
    l = from;
    while (l < L && seg[l] == seg[l + 1]) ++l;
    start = l < L ? seg[l] : 0;
    end = l < L ? seg[l + 1] : 0;
  }
  __device__ __forceinline__ void next(const int32_t* seg, int L) {
    start += kBN;
    if (start >= end) seek(seg, L, l + 1);
  }
};

template <bool kIEEE, bool kRound>
__device__ __forceinline__ void to_tf32(float x, uint32_t& hi, uint32_t& lo) {
  if (kIEEE) {
    hi = f2tf32(x);
    // x = ±inf: x - hi is inf - inf = NaN, which would turn an inf distance (the CPU's
    // answer) into NaN; the remainder of a non-finite x is 0.
    const float r = x - __uint_as_float(hi);
    lo = f2tf32(r == r ? r : 0.f);
  } else {
    hi = kRound ? f2tf32(x) : __float_as_uint(x);
    lo = 0;
  }
}

// acc[mt][ns] = the 32 x 64 block of q.r of this warp: rows mt*16 + {g, g+8},
// columns ns*8 + 2t + {0, 1}.
template <bool kIEEE, bool kRound>
__device__ __forceinline__ void warp_tile_mma(float (&acc)[2][8][4], const float* __restrict__ sQw,
                                              const float* __restrict__ sRs, int S, int KS,
                                              int g, int t) {
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int ns = 0; ns < 8; ++ns)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][ns][i] = 0.f;
#pragma unroll 1
  for (int ks = 0; ks < KS; ++ks) {
    const int kc = ks * 8 + t;
    uint32_t ah[2][4], al[2][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
      const float* pa = sQw + (mt * 16 + g) * S + kc;
      to_tf32<kIEEE, kRound>(pa[0], ah[mt][0], al[mt][0]);
      to_tf32<kIEEE, kRound>(pa[8 * S], ah[mt][1], al[mt][1]);
      to_tf32<kIEEE, kRound>(pa[4], ah[mt][2], al[mt][2]);
      to_tf32<kIEEE, kRound>(pa[8 * S + 4], ah[mt][3], al[mt][3]);
    }
#pragma unroll
    for (int ns = 0; ns < 8; ++ns) {
      const float* pb = sRs + (ns * 8 + g) * S + kc;
      uint32_t bh0, bl0, bh1, bl1;
      to_tf32<kIEEE, kRound>(pb[0], bh0, bl0);
      to_tf32<kIEEE, kRound>(pb[4], bh1, bl1);
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        if (kIEEE) {
          mma_tf32(acc[mt][ns], al[mt], bh0, bh1);
          mma_tf32(acc[mt][ns], ah[mt], bl0, bl1);
        }
        mma_tf32(acc[mt][ns], ah[mt], bh0, bh1);
      }
    }
  }
}

// Folds one tile into the running (key, position) of the thread's four rows.
// key = max(d, 0), -1 for NaN; masked columns (>= ncols) get +inf (never selected).
template <bool kMask>
__device__ __forceinline__ void warp_tile_epilogue(const float (&acc)[2][8][4],
                                                   const float* __restrict__ sRn,
                                                   const float (&qn)[2][2], float (&best)[2][2],
                                                   int (&bpos)[2][2], int start, int ncols,
                                                   int t) {
  float rn[8][2];
#pragma unroll
  for (int ns = 0; ns < 8; ++ns) {
    rn[ns][0] = sRn[ns * 8 + 2 * t];
    rn[ns][1] = sRn[ns * 8 + 2 * t + 1];
  }
  const int lim = ncols - 2 * t;  // column ns*8 + 2t + j is valid iff ns*8 + j < lim
  const float inf = __int_as_float(0x7f800000);
#pragma unroll
  for (int mt = 0; mt < 2; ++mt) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float tk = inf;
      int tc = -1;
#pragma unroll
      for (int ns = 0; ns < 8; ++ns) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
          const float d = (qn[mt][h] + rn[ns][j]) - 2.0f * acc[mt][ns][2 * h + j];
          float k = fmaxf(d, 0.f);
          k = (d != d) ? -1.f : k;
          if (kMask) k = (ns * 8 + j < lim) ? k : inf;
          if (k < tk) {
            tk = k;
            tc = ns * 2 + j;
          }
        }
      }
      if (tk < best[mt][h]) {  // later tiles hold higher positions: strict '<'
        best[mt][h] = tk;
        bpos[mt][h] = start + (tc >> 1) * 8 + 2 * t + (tc & 1);
      }
    }
  }
}

template <typename InT, bool kIEEE, bool kFB>
__global__ void __launch_bounds__(kThreads, 3)
    global_mma_kernel(const InT* __restrict__ query, const float* __restrict__ ws_ref,
                      const float* __restrict__ ws_rn, const int32_t* __restrict__ ws_ridx,
                      const int32_t* __restrict__ seg, const float* __restrict__ bias,
                      float* __restrict__ out0, float* __restrict__ out_bg,
                      int64_t* __restrict__ out_idx, int Nq, int C, int Cpad, int L,
                      int64_t Ncap, int64_t b0) {
  constexpr bool kRound = std::is_same<InT, float>::value;  // half values are exact in TF32
  extern __shared__ __align__(16) float smem[];
  const int S = Cpad + 4;  // row stride: == 4 (mod 8) -> conflict-free fragment loads
  float* sQ = smem;                          // [kBM][S]
  float* sR = sQ + kBM * S;                  // [2][kBN][S]
  float* sRn = sR + 2 * kBN * S;             // [2][kBN]
  float* sQn = sRn + 2 * kBN;                // [kBM]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int64_t b = b0 + blockIdx.y;
  const int m0 = blockIdx.x * kBM;
  const int32_t* segb = seg + b * (L + 1);
  const float* refb = ws_ref + b * Ncap * Cpad;
  const float* rnb = ws_rn + b * Ncap;
  const int32_t* ridxb = ws_ridx + b * Ncap;

  // Query tile -> shared memory (float32, zero padded), then its squared norms.
  {
    const InT* qb = query + (b * Nq + m0) * int64_t(C);
    const int rows = min(kBM, Nq - m0);
    for (int e = tid; e < kBM * Cpad; e += kThreads) {
      const int r = e / Cpad, c = e - r * Cpad;
      sQ[r * S + c] = (r < rows && c < C) ? to_float(qb[int64_t(r) * C + c]) : 0.f;
    }
    __syncthreads();
    float ss = 0.f;
    for (int c = 0; c < C; ++c) {
      const float v = sQ[tid * S + c];
      ss += v * v;
    }
    sQn[tid] = ss;  // kThreads == kBM
  }

  // Reference tile loader (cp.async; pixels past the label's end are zero-filled).
  const int CH = Cpad / 4;  // 16-byte chunks per row
  const int q128 = kThreads / CH, r128 = kThreads % CH;
  const int r_init = tid / CH, c_init = tid % CH;
  auto load_tile = [&](const TileIter& it, int stage) {
    const int ncols = min(kBN, it.end - it.start);
    const float* src = refb + int64_t(it.start) * Cpad;
    float* dst = sR + stage * kBN * S;
    int r = r_init, c4 = c_init;
    for (int e = tid; e < kBN * CH; e += kThreads) {
      const bool ok = r < ncols;
      cp_async16(dst + r * S + c4 * 4, ok ? src + int64_t(e) * 4 : refb, ok ? 16 : 0);
      r += q128;
      c4 += r128;
      if (c4 >= CH) {
        c4 -= CH;
        ++r;
      }
    }
    if (tid < kBN) {
      const bool ok = tid < ncols;
      cp_async4(sRn + stage * kBN + tid, ok ? rnb + it.start + tid : rnb, ok ? 4 : 0);
    }
  };

  __syncthreads();  // sQn visible
  const int wr0 = warp * 32;
  float qn[2][2];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) qn[mt][h] = sQn[wr0 + mt * 16 + g + 8 * h];

  const float inf = __int_as_float(0x7f800000);
  float best[2][2];
  int bpos[2][2];
#pragma unroll
  for (int mt = 0; mt < 2; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      best[mt][h] = inf;
      bpos[mt][h] = -1;
    }

  // The row this thread writes: (mt, h) = (t >> 1, t & 1).
  const int own_row = m0 + wr0 + (t >> 1) * 16 + g + 8 * (t & 1);
  const bool row_ok = own_row < Nq;
  FbState<float> fb;
  fb.init();

  auto write_label = [&](int l, float key, int pos) {
    const float v = key < 0.f ? __int_as_float(0x7fffffff) : key;
    const int64_t idx = pos >= 0 ? int64_t(ridxb[pos]) : int64_t(-1);
    const int64_t o = (b * L + l) * int64_t(Nq) + own_row;
    if (kFB) {
      const float f = idx < 0 ? 1.f : fg_transform(v, bias[l]);
      fb.add(f, l);
      if (row_ok) {
        out0[o] = f;
        out_idx[o] = idx;
      }
    } else if (row_ok) {
      out0[o] = v;
      out_idx[o] = idx;
    }
  };
  auto write_empty = [&](int l0, int l1) {
    for (int l = l0; l < l1; ++l) write_label(l, inf, -1);
  };

  TileIter prod, cons;
  prod.seek(segb, L, 0);
  cons = prod;
  write_empty(0, cons.l);
  if (prod.l < L) {
    load_tile(prod, 0);
    prod.next(segb, L);
  }
  cp_async_commit();
  int stage = 0;
  const int KS = Cpad / 8;
  const float* sQw = sQ + wr0 * S;
  while (cons.l < L) {  // block-uniform
    if (prod.l < L) {
      load_tile(prod, stage ^ 1);
      prod.next(segb, L);
    }
    cp_async_commit();
    cp_async_wait1();
    __syncthreads();
    {
      float acc[2][8][4];
      warp_tile_mma<kIEEE, kRound>(acc, sQw, sR + stage * kBN * S, S, KS, g, t);
      const int ncols = min(kBN, cons.end - cons.start);
      if (ncols == kBN)
        warp_tile_epilogue<false>(acc, sRn + stage * kBN, qn, best, bpos, cons.start, ncols, t);
      else
        warp_tile_epilogue<true>(acc, sRn + stage * kBN, qn, best, bpos, cons.start, ncols, t);
    }
    __syncthreads();  // every warp is done with `stage` before it is refilled
    const bool last = cons.start + kBN >= cons.end;
    const int l_prev = cons.l;
    cons.next(segb, L);
    if (last) {
      // Merge the quad (key, then position), write, reset.
      float key[2][2];
      int pos[2][2];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          float k = best[mt][h];
          int p = bpos[mt][h];
#pragma unroll
          for (int o = 1; o <= 2; o <<= 1) {
            const float ok = __shfl_xor_sync(0xffffffffu, k, o);
            const int op = __shfl_xor_sync(0xffffffffu, p, o);
            if (ok < k || (ok == k && op >= 0 && (p < 0 || op < p))) {
              k = ok;
              p = op;
            }
          }
          key[mt][h] = k;
          pos[mt][h] = p;
          best[mt][h] = inf;
          bpos[mt][h] = -1;
        }
      const float k_own = t == 0 ? key[0][0] : t == 1 ? key[0][1] : t == 2 ? key[1][0] : key[1][1];
      const int p_own = t == 0 ? pos[0][0] : t == 1 ? pos[0][1] : t == 2 ? pos[1][0] : pos[1][1];
      write_label(l_prev, k_own, p_own);
      write_empty(l_prev + 1, cons.l);
    }
    stage ^= 1;
  }
  if (kFB && row_ok) {
    for (int l = 0; l < L; ++l) out_bg[(b * L + l) * int64_t(Nq) + own_row] = fb.bg(l);
  }
}

// ---------------------------------------------------------------------------------
// SIMT kernel: float64, and float32/half when C is too large for the tiles.
// ---------------------------------------------------------------------------------

template <typename T, typename InT>
__device__ __forceinline__ T load_as(const InT* p) {
  return static_cast<T>(to_float(*p));
}
template <>
__device__ __forceinline__ double load_as<double, double>(const double* p) {
  return *p;
}

template <typename T, typename InT, bool kFB>
__global__ void __launch_bounds__(128)
    global_simt_kernel(const InT* __restrict__ query, const InT* __restrict__ ref,
                       const int32_t* __restrict__ ridx, const int32_t* __restrict__ seg,
                       const T* __restrict__ bias, T* __restrict__ out0, T* __restrict__ out_bg,
                       int64_t* __restrict__ out_idx, int64_t Nq, int64_t C, int L, int64_t Ncap,
                       int64_t Nr, int64_t b0) {
  const int64_t b = b0 + blockIdx.y;
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= Nq) return;
  const InT* q = query + (b * Nq + row) * C;
  T qn = T(0);
  for (int64_t c = 0; c < C; ++c) {
    const T v = load_as<T>(q + c);
    qn += v * v;
  }
  const int32_t* segb = seg + b * (L + 1);
  const int32_t* ridxb = ridx + b * Ncap;
  FbState<T> fb;
  fb.init();
  for (int l = 0; l < L; ++l) {
    T best = T(INFINITY);
    int64_t bi = -1;
    for (int p = segb[l]; p < segb[l + 1]; ++p) {
      const int64_t n = ridxb[p];
      const InT* r = ref + (b * Nr + n) * C;
      T rn = T(0), dot = T(0);
      for (int64_t c = 0; c < C; ++c) {
        const T rv = load_as<T>(r + c), qv = load_as<T>(q + c);
        rn += rv * rv;
        dot += qv * rv;
      }
      const T d = clamp_nonneg((qn + rn) - T(2) * dot);
      if (improves(d, best)) {
        best = d;
        bi = n;
        if (d != d) break;  // NaN is sticky
      }
    }
    const int64_t o = (b * L + l) * Nq + row;
    out_idx[o] = bi;
    if (kFB) {
      const T f = bi < 0 ? T(1) : fg_transform(best, bias[l]);
      out0[o] = f;
      fb.add(f, l);
    } else {
      out0[o] = best;
    }
  }
  if (kFB) {
    for (int l = 0; l < L; ++l) out_bg[(b * L + l) * Nq + row] = fb.bg(l);
  }
}

// ---------------------------------------------------------------------------------
// Host side of global matching.
// ---------------------------------------------------------------------------------

struct Layout {
  GridGeom g;
  int64_t Cpad;
  int64_t off_ref, off_rn, off_ridx, off_cnt, off_seg, total;
};

int64_t align_up(int64_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

Layout make_layout(const GlobalMatchingShape& s, Dtype dtype) {
  Layout y{};
  const int64_t rate = s.rate < 1 ? 1 : s.rate;
  y.g.Hr = s.Hr;
  y.g.Wr = s.Wr;
  y.g.Hg = (s.Hr + rate - 1) / rate;
  y.g.Wg = (s.Wr + rate - 1) / rate;
  y.g.HWr = s.Hr * s.Wr;
  y.g.Ncap = s.T * y.g.Hg * y.g.Wg;
  y.g.Nr = s.T * s.Hr * s.Wr;
  y.g.rate = static_cast<int>(rate);
  y.g.L = static_cast<int>(s.L);
  y.g.NW = static_cast<int>((y.g.Ncap + 31) / 32);
  y.Cpad = s.C < 8 ? 8 : (s.C + 7) / 8 * 8;  // >= 8: C == 0 gives one zero k-step
  const bool gather = dtype != Dtype::kFloat64;
  int64_t off = 0;
  auto take = [&](int64_t bytes) {
    const int64_t o = off;
    off += align_up(bytes);
    return o;
  };
  y.off_ref = take(gather ? s.B * y.g.Ncap * y.Cpad * 4 : 0);
  y.off_rn = take(gather ? s.B * y.g.Ncap * 4 : 0);
  y.off_ridx = take(s.B * y.g.Ncap * 4);
  y.off_cnt = take(s.B * s.L * int64_t(y.g.NW) * 4);
  y.off_seg = take(s.B * (s.L + 1) * 4);
  y.total = off;
  return y;
}

size_t mma_smem_bytes(int64_t Cpad) {
  const int64_t S = Cpad + 4;
  return static_cast<size_t>((kBM * S + 2 * kBN * S + 2 * kBN + kBM) * 4);
}

template <typename InT, bool kIEEE, bool kFB>
int launch_mma(const InT* q, const Layout& y, char* ws, const float* bias, float* out0,
               float* out_bg, int64_t* out_idx, const GlobalMatchingShape& s, size_t smem,
               cudaStream_t st) {
  auto kernel = global_mma_kernel<InT, kIEEE, kFB>;
  VOS_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(smem)));
  const unsigned gx = static_cast<unsigned>((s.Nq + kBM - 1) / kBM);
  for (int64_t b0 = 0; b0 < s.B; b0 += kMaxGridY) {
    const unsigned gy = static_cast<unsigned>(s.B - b0 < kMaxGridY ? s.B - b0 : kMaxGridY);
    kernel<<<dim3(gx, gy), kThreads, smem, st>>>(
        q, reinterpret_cast<const float*>(ws + y.off_ref),
        reinterpret_cast<const float*>(ws + y.off_rn),
        reinterpret_cast<const int32_t*>(ws + y.off_ridx),
        reinterpret_cast<const int32_t*>(ws + y.off_seg), bias, out0, out_bg, out_idx,
        static_cast<int>(s.Nq), static_cast<int>(s.C), static_cast<int>(y.Cpad),
        static_cast<int>(s.L), y.g.Ncap, b0);
    VOS_CUDA_CHECK_LAUNCH();
  }
  return 0;
}

template <typename T, typename InT, bool kFB>
int launch_simt(const InT* q, const InT* r, const Layout& y, char* ws, const T* bias, T* out0,
                T* out_bg, int64_t* out_idx, const GlobalMatchingShape& s, cudaStream_t st) {
  const unsigned gx = static_cast<unsigned>((s.Nq + 127) / 128);
  for (int64_t b0 = 0; b0 < s.B; b0 += kMaxGridY) {
    const unsigned gy = static_cast<unsigned>(s.B - b0 < kMaxGridY ? s.B - b0 : kMaxGridY);
    global_simt_kernel<T, InT, kFB><<<dim3(gx, gy), 128, 0, st>>>(
        q, r, reinterpret_cast<const int32_t*>(ws + y.off_ridx),
        reinterpret_cast<const int32_t*>(ws + y.off_seg), bias, out0, out_bg, out_idx, s.Nq,
        s.C, static_cast<int>(s.L), y.g.Ncap, y.g.Nr, b0);
    VOS_CUDA_CHECK_LAUNCH();
  }
  return 0;
}

template <typename InT>
int prepass(const int32_t* labels, const InT* ref, const Layout& y, char* ws, bool gather,
            const GlobalMatchingShape& s, cudaStream_t st) {
  int32_t* cnt = reinterpret_cast<int32_t*>(ws + y.off_cnt);
  int32_t* seg = reinterpret_cast<int32_t*>(ws + y.off_seg);
  int32_t* ridx = reinterpret_cast<int32_t*>(ws + y.off_ridx);
  float* wref = reinterpret_cast<float*>(ws + y.off_ref);
  float* wrn = reinterpret_cast<float*>(ws + y.off_rn);
  const int64_t cnt_bytes = s.B * s.L * int64_t(y.g.NW) * 4;
  if (cnt_bytes > 0) VOS_CUDA_TRY(cudaMemsetAsync(cnt, 0, static_cast<size_t>(cnt_bytes), st));
  const unsigned gx = static_cast<unsigned>((y.g.NW + kPreWarps - 1) / kPreWarps);
  if (gx > 0) {
    for (int64_t b0 = 0; b0 < s.B; b0 += kMaxGridY) {
      const unsigned gy = static_cast<unsigned>(s.B - b0 < kMaxGridY ? s.B - b0 : kMaxGridY);
      prepass_count_kernel<<<dim3(gx, gy), kPreWarps * 32, 0, st>>>(labels, cnt, y.g, b0);
      VOS_CUDA_CHECK_LAUNCH();
    }
  }
  prepass_scan_kernel<<<static_cast<unsigned>(s.B), kScanThreads, 0, st>>>(
      cnt, seg, static_cast<int>(s.L), y.g.NW);
  VOS_CUDA_CHECK_LAUNCH();
  if (gx > 0) {
    for (int64_t b0 = 0; b0 < s.B; b0 += kMaxGridY) {
      const unsigned gy = static_cast<unsigned>(s.B - b0 < kMaxGridY ? s.B - b0 : kMaxGridY);
      if (gather)
        prepass_scatter_kernel<InT, true><<<dim3(gx, gy), kPreWarps * 32, 0, st>>>(
            labels, ref, cnt, ridx, wref, wrn, y.g, static_cast<int>(s.C),
            static_cast<int>(y.Cpad), b0);
      else
        prepass_scatter_kernel<InT, false><<<dim3(gx, gy), kPreWarps * 32, 0, st>>>(
            labels, ref, cnt, ridx, wref, wrn, y.g, static_cast<int>(s.C),
            static_cast<int>(y.Cpad), b0);
      VOS_CUDA_CHECK_LAUNCH();
    }
  }
  return 0;
}

template <typename InT>
int run_float(const InT* q, const InT* r, const int32_t* labels, const float* bias, float* out0,
              float* out_bg, int64_t* out_idx, const GlobalMatchingShape& s,
              MatmulPrecision prec, const Layout& y, char* ws, int device, cudaStream_t st) {
  const size_t smem = mma_smem_bytes(y.Cpad);
  const bool mma = smem <= static_cast<size_t>(max_dynamic_smem(device)) && s.Nq < (int64_t(1) << 31) - kBM;
  if (int rc = prepass<InT>(labels, r, y, ws, mma, s, st)) return rc;
  if (!mma) {
    return bias ? launch_simt<float, InT, true>(q, r, y, ws, bias, out0, out_bg, out_idx, s, st)
                : launch_simt<float, InT, false>(q, r, y, ws, bias, out0, out_bg, out_idx, s, st);
  }
  if constexpr (std::is_same<InT, float>::value) {  // half inputs: one TF32 product is exact
    if (prec == MatmulPrecision::kIEEE) {
      return bias ? launch_mma<InT, true, true>(q, y, ws, bias, out0, out_bg, out_idx, s, smem, st)
                  : launch_mma<InT, true, false>(q, y, ws, bias, out0, out_bg, out_idx, s, smem, st);
    }
  }
  return bias ? launch_mma<InT, false, true>(q, y, ws, bias, out0, out_bg, out_idx, s, smem, st)
              : launch_mma<InT, false, false>(q, y, ws, bias, out0, out_bg, out_idx, s, smem, st);
}

// ---------------------------------------------------------------------------------
// nearest_sqdist_backward
// ---------------------------------------------------------------------------------

constexpr int kBwdWarps = 8;

// grad_query[b, p, :] = sum over m (in order) of 2 g (q - r[idx]).
template <typename T>
__global__ void __launch_bounds__(kBwdWarps * 32)
    bwd_query_kernel(const T* __restrict__ grad, const T* __restrict__ q, const T* __restrict__ r,
                     const int64_t* __restrict__ index, T* __restrict__ gq, int64_t B, int64_t M,
                     int64_t Nq, int64_t Nr, int64_t C) {
  const int lane = threadIdx.x & 31;
  const int64_t bp = int64_t(blockIdx.x) * kBwdWarps + (threadIdx.x >> 5);
  if (bp >= B * Nq) return;
  const int64_t b = bp / Nq, p = bp - b * Nq;
  const T* qrow = q + bp * C;
  for (int64_t c0 = 0; c0 < C; c0 += 32) {
    const int64_t c = c0 + lane;
    const bool cok = c < C;
    const T qc = cok ? qrow[c] : T(0);
    T acc = T(0);
    for (int64_t m = 0; m < M; ++m) {
      const int64_t o = (b * M + m) * Nq + p;
      const int64_t n = index[o];
      if (n < 0 || n >= Nr) continue;  // warp-uniform
      const T two_g = T(2) * grad[o];
      if (cok) acc += two_g * (qc - r[(b * Nr + n) * C + c]);
    }
    if (cok) gq[bp * C + c] = acc;
  }
}

// start[k] = first i with keys[i] >= k (lower bound), for k in [0, K]; keys sorted.
__global__ void bwd_segments_kernel(const int64_t* __restrict__ keys, int64_t P, int64_t K,
                                    int64_t* __restrict__ start) {
  const int64_t k = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k > K) return;
  int64_t lo = 0, hi = P;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (keys[mid] < k)
      lo = mid + 1;
    else
      hi = mid;
  }
  start[k] = lo;
}

// grad_reference[key] = - sum over its sorted pairs (in order) of 2 g (q - r).
template <typename T>
__global__ void __launch_bounds__(kBwdWarps * 32)
    bwd_reference_kernel(const T* __restrict__ grad, const T* __restrict__ q,
                         const T* __restrict__ r, const int64_t* __restrict__ order,
                         const int64_t* __restrict__ start, T* __restrict__ gr, int64_t B,
                         int64_t M, int64_t Nq, int64_t Nr, int64_t C) {
  const int lane = threadIdx.x & 31;
  const int64_t key = int64_t(blockIdx.x) * kBwdWarps + (threadIdx.x >> 5);
  if (key >= B * Nr) return;
  const int64_t s0 = start[key], s1 = start[key + 1];
  const int64_t b = key / Nr;
  const T* rrow = r + key * C;
  for (int64_t c0 = 0; c0 < C; c0 += 32) {
    const int64_t c = c0 + lane;
    const bool cok = c < C;
    const T rc = cok ? rrow[c] : T(0);
    T acc = T(0);
    for (int64_t i = s0; i < s1; ++i) {
      const int64_t o = order[i];
      const int64_t p = o % Nq;
      const T two_g = T(2) * grad[o];
      if (cok) acc -= two_g * (q[(b * Nq + p) * C + c] - rc);
    }
    if (cok) gr[key * C + c] = acc;
  }
  (void)M;
}

template <typename T>
int run_backward(const T* grad, const T* q, const T* r, const int64_t* index,
                 const int64_t* keys, const int64_t* order, T* gq, T* gr, int64_t B, int64_t M,
                 int64_t Nq, int64_t Nr, int64_t C, int64_t* start, cudaStream_t st) {
  if (B * Nq > 0) {
    const int64_t blocks = (B * Nq + kBwdWarps - 1) / kBwdWarps;
    bwd_query_kernel<T><<<static_cast<unsigned>(blocks), kBwdWarps * 32, 0, st>>>(
        grad, q, r, index, gq, B, M, Nq, Nr, C);
    VOS_CUDA_CHECK_LAUNCH();
  }
  if (B * Nr > 0) {
    const int64_t P = B * M * Nq;
    const int64_t sb = (B * Nr + 1 + 255) / 256;
    bwd_segments_kernel<<<static_cast<unsigned>(sb), 256, 0, st>>>(keys, P, B * Nr, start);
    VOS_CUDA_CHECK_LAUNCH();
    const int64_t blocks = (B * Nr + kBwdWarps - 1) / kBwdWarps;
    bwd_reference_kernel<T><<<static_cast<unsigned>(blocks), kBwdWarps * 32, 0, st>>>(
        grad, q, r, order, start, gr, B, M, Nq, Nr, C);
    VOS_CUDA_CHECK_LAUNCH();
  }
  return 0;
}

}  // namespace

int64_t global_matching_workspace_bytes(const GlobalMatchingShape& s, Dtype dtype) {
  return make_layout(s, dtype).total;
}

int global_matching_launch(const void* query, const void* reference, const int32_t* labels,
                           const void* bias, void* out0, void* out_bg, int64_t* out_index,
                           const GlobalMatchingShape& s, Dtype dtype, MatmulPrecision precision,
                           void* workspace, int64_t workspace_bytes, int device, void* stream) {
  if (s.B <= 0 || s.Nq <= 0 || s.L <= 0) return 0;
  const Layout y = make_layout(s, dtype);
  if (workspace_bytes < y.total) return static_cast<int>(cudaErrorInvalidValue);
  char* ws = static_cast<char*>(workspace);
  cudaStream_t st = as_stream(stream);
  switch (dtype) {
    case Dtype::kFloat64: {
      const double* q = static_cast<const double*>(query);
      const double* r = static_cast<const double*>(reference);
      if (int rc = prepass<double>(labels, r, y, ws, false, s, st)) return rc;
      const double* bs = static_cast<const double*>(bias);
      double* o0 = static_cast<double*>(out0);
      double* ob = static_cast<double*>(out_bg);
      return bs ? launch_simt<double, double, true>(q, r, y, ws, bs, o0, ob, out_index, s, st)
                : launch_simt<double, double, false>(q, r, y, ws, bs, o0, ob, out_index, s, st);
    }
    case Dtype::kFloat32:
      return run_float<float>(static_cast<const float*>(query),
                              static_cast<const float*>(reference), labels,
                              static_cast<const float*>(bias), static_cast<float*>(out0),
                              static_cast<float*>(out_bg), out_index, s, precision, y, ws,
                              device, st);
    case Dtype::kFloat16:
      return run_float<__half>(static_cast<const __half*>(query),
                               static_cast<const __half*>(reference), labels,
                               static_cast<const float*>(bias), static_cast<float*>(out0),
                               static_cast<float*>(out_bg), out_index, s, precision, y, ws,
                               device, st);
    case Dtype::kBFloat16:
      return run_float<__nv_bfloat16>(static_cast<const __nv_bfloat16*>(query),
                                      static_cast<const __nv_bfloat16*>(reference), labels,
                                      static_cast<const float*>(bias),
                                      static_cast<float*>(out0), static_cast<float*>(out_bg),
                                      out_index, s, precision, y, ws, device, st);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int64_t nearest_sqdist_backward_workspace_bytes(int64_t B, int64_t Nr) {
  return (B * Nr + 1) * 8;
}

int nearest_sqdist_backward_launch(const void* grad, const void* query, const void* reference,
                                   const int64_t* index, const int64_t* sorted_keys,
                                   const int64_t* order, void* grad_query, void* grad_reference,
                                   int64_t B, int64_t M, int64_t Nq, int64_t Nr, int64_t C,
                                   Dtype dtype, void* workspace, int64_t workspace_bytes,
                                   void* stream) {
  if (B <= 0 || C <= 0) return 0;
  if (workspace_bytes < nearest_sqdist_backward_workspace_bytes(B, Nr))
    return static_cast<int>(cudaErrorInvalidValue);
  cudaStream_t st = as_stream(stream);
  int64_t* start = static_cast<int64_t*>(workspace);
  if (dtype == Dtype::kFloat64)
    return run_backward<double>(static_cast<const double*>(grad), static_cast<const double*>(query),
                                static_cast<const double*>(reference), index, sorted_keys, order,
                                static_cast<double*>(grad_query),
                                static_cast<double*>(grad_reference), B, M, Nq, Nr, C, start, st);
  if (dtype == Dtype::kFloat32)
    return run_backward<float>(static_cast<const float*>(grad), static_cast<const float*>(query),
                               static_cast<const float*>(reference), index, sorted_keys, order,
                               static_cast<float*>(grad_query), static_cast<float*>(grad_reference),
                               B, M, Nq, Nr, C, start, st);
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace cuda
}  // namespace vos
