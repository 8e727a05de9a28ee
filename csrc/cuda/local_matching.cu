// CUDA kernels of fb_multi_local_matching (forward) and fb_instance_pooling.
//
// Semantics: csrc/cpu/matching.cpp (local_impl, fb_epilogue, pooling_impl). For query
// pixel (y, x), window k and label l: min over previous-frame pixels (y + r a, x + r b)
// inside the frame, of label l, |a|, |b| <= windows[k] / r, of d = sum_c (q_c - n_c)^2
// (direct differences, float32 accumulation in channel order, clamped at 0 keeping NaN);
// ties -> lowest flat index, any NaN wins (the NaN of lowest flat index); empty -> fg = 1,
// index = -1; fg = tanh((d + bias[l]) / 2); bg[l] = min over m != l of fg[m] (NaN first,
// ties -> lowest label; 1 when L == 1).
//
// ---- multi-local design (float32 / float16 / bfloat16 inputs, float32 math) ----------
// * Lattice classes. With atrous rate r, query (y, x) only meets previous pixels of the same
//   class (y mod r, x mod r). A block takes one class of one image and a tile of 4 x 32
//   class-lattice queries (so neighbours on the lattice are dense in memory and in smem).
//   Rc = min(max_window / r, frame extent on the lattice - 1), S = 2 Rc + 1 offsets per axis.
// * Offset rows in stages. A stage covers ND offset rows a (dy = r a); the previous-frame
//   strip it needs is (4 + ND - 1) lattice rows x (32 + DX*nblk - 1) lattice columns, staged
//   in shared memory, channel chunk by channel chunk (CC <= 32 channels, layout
//   [row][channel][column], float), with the labels of the strip (-1 outside the frame).
//   The query tile [channel][4 x 32] is staged once when C <= 32, else per chunk.
// * Register blocking. A thread owns 8 consecutive queries of one tile row x DX consecutive
//   column offsets b of one offset row a: acc[8][DX] partial distances stay in registers
//   across the channel chunks of the stage; per channel it loads 8 query values (two
//   LDS.128) and 8 + DX - 1 neighbour values and does 8*DX (sub + FMA). DX in 4..8 is picked
//   to waste the fewest offsets (25 -> 5, 13 -> 7, 11 -> 6, 21 -> 7); blockDim =
//   16 * nblk * ND (nblk = ceil(S / DX)), 128..320 threads.
// * Running minima. Per (query, label, window-ring) one 64-bit key in shared memory:
//   key = (NaN ? 0 : float_bits(d) + 1) << 32 | offset id, offset id = (a+Rc)*S + (b+Rc),
//   which for one query increases with the flat index. The unsigned order of keys is
//   exactly the CPU order (NaN first, then value, then lowest flat index; empty = ~0).
//   A thread pre-reduces runs of equal (label, window) among its DX offsets in registers,
//   then does a shared atomicMin (skipped when a relaxed read shows it cannot improve).
//   min is order-independent, so the result is deterministic. The window of an offset is
//   the smallest window containing its ring max(|dy|, |dx|) (smem table).
// * Epilogue (same block): prefix-min of the keys over windows, decode (value, flat index),
//   fg = tanhf((d + bias) / 2), index; with all labels in the block (L*K <= 64) bg is
//   computed there too (best / second-best label), else by a small bg kernel over fg.
//   Labels beyond 64 / K per block are split over blocks (each recomputes the distances).
// * float64, and shapes whose strip does not fit in shared memory: a simple kernel, one
//   thread per (b, l, k, pixel) scanning its window in flat order (CPU update rule).
//
// Prediction, H100 SXM (FP32 ~67 TFLOP/s = 33.5 T FP32 instr/s; the direct difference costs
// two FP32 instructions (FADD + FFMA) per pair-channel, chosen over the |q|^2+|n|^2-2qn
// expansion to match the CPU/Triton values, exact zeros and inf behaviour):
//   CFBI+ s4 120x214, C=32, windows 4..24, r=2: 25.7k px x 625 offsets x 32 ch = 0.51 G
//     pair-ch (DX 5, ND 2: +4% padded offset rows) -> 1.07 G instr: 32 us at peak; expected
//     ~70-90 us (~40-50% of peak: ~14 LDS per 80 FP instr, staging not overlapped with math,
//     240 blocks of 160 threads). 145x261: x1.47 -> ~110-130 us.
//   CFBI+ s8 60x107, C=64, windows 2..12, r=1: 6.4k x 625 (25x25) x 64 (DX 5, ND 2)
//     -> 0.51 G instr: 15 us at peak, expected ~35-45 us (only 60 blocks: under-filled GPU).
//   CFBI+ s16 30x54, C=128, windows 2..10: 1.6k x 441 x 128 -> 0.18 G instr: 5.5 us at peak,
//     ~15-20 us (latency / occupancy bound: ~16 blocks).
//   CFBI s8 downsampled 61x108, C=100, windows 2..12: 6.6k x 625 x 100 -> 0.82 G instr:
//     25 us at peak, ~50-60 us.
//   DRAM: q + prev + labels + outputs (3 x L x K x HW x 4-8 B) ~ 10 MB at s4: ~3 us, so the
//   op is FP-instruction bound; the strip re-reads (~(4+2Rc)/4 x per tile) come from L2.
//
// ---- instance pooling -------------------------------------------------------------------
// Deterministic two-pass segmented sums in float64: pass 1, block = (pixel chunk, 32
// channels, label group): 8 warps stream the chunk's pixels, lane = channel, each warp adds
// into its own smem row sum[warp][label][lane] (no atomics), then the 8 rows are summed in
// warp order into workspace[b][chunk][label][c] (+ counts). Pass 2, one thread per
// (b, l, c): sums the chunks in order, the total over labels in label order, divides.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/fb_state.cuh"
#include "cuda/local_matching.h"

namespace vos {
namespace cuda {
namespace {

constexpr int kTQY = 4;    // tile rows (class lattice)
constexpr int kTQX = 32;   // tile columns
constexpr int kQX = 8;     // queries per thread
constexpr int kGroups = kTQX / kQX;
constexpr int kTQ = kTQY * kTQX;
constexpr int kMaxThreads = 320;
constexpr int kMaxSlots = 64;  // labels x windows per block

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ double to_float(double v) { return v; }

template <typename T>
__device__ __forceinline__ T pos_inf();
template <>
__device__ __forceinline__ float pos_inf<float>() { return __int_as_float(0x7f800000); }
template <>
__device__ __forceinline__ double pos_inf<double>() { return __longlong_as_double(0x7ff0000000000000ll); }


__device__ __forceinline__ unsigned long long make_key(float d, unsigned int id) {
  if (!(d > 0.0f)) d = (d != d) ? d : 0.0f;  // clamp at +0, keep NaN
  // d = +inf never improves the CPU/Triton running minimum (strict '<' from +inf): such a
  // candidate is no match at all (fg = 1, index = -1), i.e. the empty key.
  if (d == __int_as_float(0x7f800000)) return ~0ull;
  const unsigned int hi = (d != d) ? 0u : __float_as_uint(d) + 1u;
  return (static_cast<unsigned long long>(hi) << 32) | id;
}

// The running minimum of a shared-memory key, read without an atomic before an atomicMin that
// may not be needed: a relaxed load at block scope (PTX ISA, memory consistency model), so it
// is well defined beside the atomicMin of other threads. The keys only decrease, so a stale
// value is never below the current one and at worst costs an atomicMin that changes nothing.
__device__ __forceinline__ unsigned long long load_relaxed_shared(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.relaxed.cta.shared.u64 %0, [%1];"
               : "=l"(v)
               : "r"(static_cast<unsigned>(__cvta_generic_to_shared(p))));
  return v;
}

struct LocalParams {
  const void* q;
  const void* p;
  const int32_t* lab;
  const int32_t* windows;
  const float* bias;
  float* fg;
  float* bg;
  int64_t* idx;
  int64_t H, W, C, L, K, rate;
  int64_t b_begin;  // first batch of this launch
  int Rc, S, Hmax, Wmax, ncy, ncx, tilesY, tilesX, ngroups, LG, ND, nblk, CC, SW, SWp;
  int fuse_bg;
};


__device__ __forceinline__ float fg_of_key(unsigned long long key, float bias) {
  if (key == ~0ull) return 1.0f;
  const unsigned int hi = static_cast<unsigned int>(key >> 32);
  const float d = hi == 0u ? __uint_as_float(0x7fc00000u) : __uint_as_float(hi - 1u);
  return tanhf((d + bias) / 2.0f);
}

template <typename Tin, int DX>
__global__ void __launch_bounds__(kMaxThreads, 1) local_fast_kernel(const LocalParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int LG = p.LG, K = static_cast<int>(p.K), CC = p.CC, SW = p.SW, SWp = p.SWp;
  const int Rc = p.Rc, S = p.S, ND = p.ND, nblk = p.nblk;
  const int NR = kTQY + ND - 1;
  const int r = static_cast<int>(p.rate);
  const int H = static_cast<int>(p.H), W = static_cast<int>(p.W), C = static_cast<int>(p.C);

  unsigned long long* state = reinterpret_cast<unsigned long long*>(smem_raw);  // [kTQ][LG][K]
  float* qs = reinterpret_cast<float*>(state + kTQ * LG * K);                   // [CC][kTQ]
  float* strip = qs + CC * kTQ;                                                  // [NR][CC][SWp]
  int* labs = reinterpret_cast<int*>(strip + NR * CC * SWp);                    // [NR][SWp]
  int* wk = labs + NR * SWp;                                                     // [Rc + 1]

  // Block -> (batch, label group, class, tile).
  int64_t bid = blockIdx.x;
  const int tx = static_cast<int>(bid % p.tilesX);
  bid /= p.tilesX;
  const int ty = static_cast<int>(bid % p.tilesY);
  bid /= p.tilesY;
  const int cls = static_cast<int>(bid % (p.ncy * p.ncx));
  bid /= (p.ncy * p.ncx);
  const int grp = static_cast<int>(bid % p.ngroups);
  const int64_t b = p.b_begin + bid / p.ngroups;
  const int cy = cls / p.ncx, cx = cls % p.ncx;
  const int Hc = (H - cy + r - 1) / r, Wc = (W - cx + r - 1) / r;
  const int i0 = ty * kTQY, j0 = tx * kTQX;
  if (i0 >= Hc || j0 >= Wc) return;  // whole block: before any barrier
  const int l0 = grp * LG;
  const int LGe = min(LG, static_cast<int>(p.L) - l0);

  const int tid = threadIdx.x, nthreads = blockDim.x;
  const int g = tid % kGroups;
  const int blk = (tid / kGroups) % nblk;
  const int t = (tid / (kGroups * nblk)) % kTQY;
  const int e = tid / (kGroups * nblk * kTQY);

  for (int s = tid; s < kTQ * LG * K; s += nthreads) state[s] = ~0ull;
  for (int ring = tid; ring <= Rc; ring += nthreads) {
    const int reach = ring * r;
    int k = 0;
    while (k < K - 1 && p.windows[k] < reach) ++k;
    wk[ring] = k;
  }

  const int64_t HW = static_cast<int64_t>(H) * W;
  const Tin* qb = static_cast<const Tin*>(p.q) + b * HW * C;
  const Tin* pb = static_cast<const Tin*>(p.p) + b * HW * C;
  const int32_t* lb = p.lab + b * HW;
  const int nchunks = (C + CC - 1) / CC;

  auto stage_queries = [&](int c0, int cn) {
    for (int it = tid; it < kTQ * cn; it += nthreads) {
      const int c = it % cn, tq = it / cn;
      const int qi = i0 + tq / kTQX, qj = j0 + tq % kTQX;
      float v = 0.0f;
      if (qi < Hc && qj < Wc) {
        const int64_t pix = static_cast<int64_t>(cy + r * qi) * W + (cx + r * qj);
        v = to_float(qb[pix * C + c0 + c]);
      }
      qs[c * kTQ + tq] = v;
    }
  };
  if (nchunks == 1) stage_queries(0, C);

  float acc[kQX][DX];
  const int nstages = (S + ND - 1) / ND;
  for (int st = 0; st < nstages; ++st) {
    const int a0 = -Rc + st * ND;
    const int a = a0 + e;  // this thread's offset row
#pragma unroll
    for (int j = 0; j < kQX; ++j)
#pragma unroll
      for (int i = 0; i < DX; ++i) acc[j][i] = 0.0f;

    for (int ch = 0; ch < nchunks; ++ch) {
      const int c0 = ch * CC, cn = min(CC, C - c0);
      __syncthreads();  // the previous chunk / stage is done with the strip and labels
      for (int it = tid; it < NR * SW * cn; it += nthreads) {
        const int c = it % cn, rest = it / cn;
        const int col = rest % SW, rr = rest / SW;
        const int li = i0 + a0 + rr, lj = j0 - Rc + col;
        float v = 0.0f;
        if (li >= 0 && li < Hc && lj >= 0 && lj < Wc) {
          const int64_t pix = static_cast<int64_t>(cy + r * li) * W + (cx + r * lj);
          v = to_float(pb[pix * C + c0 + c]);
        }
        strip[(rr * CC + c) * SWp + col] = v;
      }
      if (ch == 0) {
        for (int it = tid; it < NR * SW; it += nthreads) {
          const int col = it % SW, rr = it / SW;
          const int li = i0 + a0 + rr, lj = j0 - Rc + col;
          int lv = -1;
          if (li >= 0 && li < Hc && lj >= 0 && lj < Wc)
            lv = lb[static_cast<int64_t>(cy + r * li) * W + (cx + r * lj)];
          labs[rr * SWp + col] = lv;
        }
      }
      if (nchunks > 1) stage_queries(c0, cn);
      __syncthreads();
      if (a <= Rc) {
        const float* qrow = qs + t * kTQX + g * kQX;
        const float* nrow = strip + (t + e) * CC * SWp + g * kQX + blk * DX;
#pragma unroll 2
        for (int c = 0; c < cn; ++c) {
          const float4 qa = *reinterpret_cast<const float4*>(qrow + c * kTQ);
          const float4 qc = *reinterpret_cast<const float4*>(qrow + c * kTQ + 4);
          const float qv[kQX] = {qa.x, qa.y, qa.z, qa.w, qc.x, qc.y, qc.z, qc.w};
          float nv[kQX + DX - 1];
#pragma unroll
          for (int u = 0; u < kQX + DX - 1; ++u) nv[u] = nrow[c * SWp + u];
#pragma unroll
          for (int j = 0; j < kQX; ++j)
#pragma unroll
            for (int i = 0; i < DX; ++i) {
              const float dd = qv[j] - nv[j + i];
              acc[j][i] = fmaf(dd, dd, acc[j][i]);
            }
        }
      }
    }

    // Fold this stage's distances into the running minima.
    if (a <= Rc) {
      const int qi = i0 + t;
      const int* lrow = labs + (t + e) * SWp + g * kQX + blk * DX;
      const int aa = a < 0 ? -a : a;
      const unsigned int idbase = static_cast<unsigned int>((a + Rc) * S);
#pragma unroll
      for (int j = 0; j < kQX; ++j) {
        const int qj = j0 + g * kQX + j;
        if (qi >= Hc || qj >= Wc) continue;
        unsigned long long* sq = state + (t * kTQX + g * kQX + j) * LG * K;
        int cur = -1;
        unsigned long long ck = ~0ull;
#pragma unroll
        for (int i = 0; i < DX; ++i) {
          const int bi = blk * DX + i;
          if (bi >= S) continue;
          const int l = lrow[j + i] - l0;
          if (l < 0 || l >= LGe) continue;
          const int bo = bi - Rc;
          const int ring = max(aa, bo < 0 ? -bo : bo);
          const int slot = l * K + wk[ring];
          const unsigned long long key = make_key(acc[j][i], idbase + static_cast<unsigned int>(bi));
          if (slot == cur) {
            ck = key < ck ? key : ck;
          } else {
            if (cur >= 0 && ck < load_relaxed_shared(sq + cur))
              atomicMin(sq + cur, ck);
            cur = slot;
            ck = key;
          }
        }
        if (cur >= 0 && ck < load_relaxed_shared(sq + cur))
          atomicMin(sq + cur, ck);
      }
    }
  }
  __syncthreads();

  // Epilogue: prefix-min over windows, decode, fg (+ bg), index.
  const int64_t LK = p.L * p.K;
  for (int it = tid; it < kTQ * K; it += nthreads) {
    const int tq = it % kTQ, k = it / kTQ;
    const int qi = i0 + tq / kTQX, qj = j0 + tq % kTQX;
    if (qi >= Hc || qj >= Wc) continue;
    const int y = cy + r * qi, x = cx + r * qj;
    const int64_t pix = static_cast<int64_t>(y) * W + x;
    const int64_t obase = (b * LK + static_cast<int64_t>(l0) * K + k) * HW + pix;
    const unsigned long long* sq = state + tq * LG * K;
    FbState<float> fb;
    fb.init();
    for (int l = 0; l < LGe; ++l) {
      unsigned long long key = ~0ull;
      for (int kk = 0; kk <= k; ++kk) {
        const unsigned long long v = sq[l * K + kk];
        key = v < key ? v : key;
      }
      const float f = fg_of_key(key, p.bias[l0 + l]);
      int64_t index = -1;
      if (key != ~0ull) {
        const int id = static_cast<int>(key & 0xffffffffull);
        const int ao = id / S - Rc, bo = id % S - Rc;
        index = static_cast<int64_t>(y + r * ao) * W + (x + r * bo);
      }
      const int64_t o = obase + static_cast<int64_t>(l) * K * HW;
      p.fg[o] = f;
      p.idx[o] = index;
      fb.add(f, l);
    }
    if (p.fuse_bg) {
      for (int l = 0; l < LGe; ++l) p.bg[obase + static_cast<int64_t>(l) * K * HW] = fb.bg(l);
    }
  }
}

// Simple kernel (float64, and the fallback): one thread per (b, l, k, pixel), the window
// scanned in increasing flat index with the CPU update rule.
template <typename Tin, typename Acc>
__global__ void local_simple_kernel(const Tin* __restrict__ q, const Tin* __restrict__ prev,
                                    const int32_t* __restrict__ lab,
                                    const int32_t* __restrict__ windows,
                                    const Acc* __restrict__ bias, int64_t B, int64_t H,
                                    int64_t W, int64_t C, int64_t L, int64_t K, int64_t rate,
                                    Acc* __restrict__ fg, int64_t* __restrict__ idx) {
  const int64_t HW = H * W, total = B * L * K * HW;
  for (int64_t o = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; o < total;
       o += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t pix = o % HW, k = (o / HW) % K, l = (o / (HW * K)) % L, b = o / (HW * K * L);
    const int64_t y = pix / W, x = pix % W;
    const int64_t A = windows[k] / rate;
    const int64_t ya = y / rate, yb = (H - 1 - y) / rate, xa = x / rate, xb = (W - 1 - x) / rate;
    const int64_t a0 = -(A < ya ? A : ya), a1 = A < yb ? A : yb;
    const int64_t c0 = -(A < xa ? A : xa), c1 = A < xb ? A : xb;
    const Tin* qp = q + (b * HW + pix) * C;
    Acc best = pos_inf<Acc>();
    int64_t bi = -1;
    for (int64_t a = a0; a <= a1; ++a) {
      for (int64_t c = c0; c <= c1; ++c) {
        const int64_t n = (y + a * rate) * W + x + c * rate;
        if (lab[b * HW + n] != l) continue;
        const Tin* np = prev + (b * HW + n) * C;
        Acc d = Acc(0);
        for (int64_t ch = 0; ch < C; ++ch) {
          const Acc t = static_cast<Acc>(to_float(qp[ch])) - static_cast<Acc>(to_float(np[ch]));
          d += t * t;
        }
        d = d < Acc(0) ? Acc(0) : d;
        if (d < best || (d != d && best == best)) {
          best = d;
          bi = n;
        }
      }
    }
    fg[o] = bi < 0 ? Acc(1) : tanh((best + bias[l]) / Acc(2));
    idx[o] = bi;
  }
}

// bg[l] = min over m != l of fg[m] per (b, k, pixel): best / second-best label (NaN
// first, ties -> lowest label), as fb_epilogue of the CPU kernel.
template <typename T>
__global__ void bg_kernel(const T* __restrict__ fg, T* __restrict__ bg, int64_t B, int64_t L,
                          int64_t S) {
  const int64_t total = B * S;
  for (int64_t o = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; o < total;
       o += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t b = o / S, s = o % S;
    const int64_t base = b * L * S + s;
    FbState<T> fb;  // labels fit in int: they are int32 after the glue's cast
    fb.init();
    for (int64_t l = 0; l < L; ++l) fb.add(fg[base + l * S], static_cast<int>(l));
    for (int64_t l = 0; l < L; ++l) bg[base + l * S] = fb.bg(static_cast<int>(l));
  }
}

inline unsigned int grid_for(int64_t total, int threads) {
  int64_t blocks = (total + threads - 1) / threads;
  if (blocks > (int64_t(1) << 20)) blocks = int64_t(1) << 20;  // grid-stride loops
  return static_cast<unsigned int>(blocks < 1 ? 1 : blocks);
}

template <typename T>
int launch_bg(const T* fg, T* bg, int64_t B, int64_t L, int64_t S, cudaStream_t stream) {
  bg_kernel<T><<<grid_for(B * S, 256), 256, 0, stream>>>(fg, bg, B, L, S);
  VOS_CUDA_CHECK_LAUNCH();
  return 0;
}

template <typename Tin, typename Acc>
int launch_simple(const Tin* q, const Tin* prev, const int32_t* lab, const int32_t* windows,
                  const Acc* bias, int64_t B, int64_t H, int64_t W, int64_t C, int64_t L,
                  int64_t K, int64_t rate, Acc* fg, Acc* bg, int64_t* idx, cudaStream_t stream) {
  local_simple_kernel<Tin, Acc><<<grid_for(B * L * K * H * W, 128), 128, 0, stream>>>(
      q, prev, lab, windows, bias, B, H, W, C, L, K, rate, fg, idx);
  VOS_CUDA_CHECK_LAUNCH();
  return launch_bg<Acc>(fg, bg, B, L, K * H * W, stream);
}

struct FastPlan {
  int DX, nblk, ND, CC, SW, SWp, LG, ngroups;
  int64_t smem;
};

int64_t fast_smem_bytes(int LG, int64_t K, int CC, int ND, int SWp, int Rc) {
  const int64_t NR = kTQY + ND - 1;
  return int64_t(kTQ) * LG * K * 8 + int64_t(CC) * kTQ * 4 + NR * CC * SWp * 4 + NR * SWp * 4 +
         (int64_t(Rc) + 1) * 4;
}

// Returns false when the fast kernel cannot take the shape (the simple kernel runs).
bool plan_fast(int64_t C, int64_t L, int64_t K, int Rc, int max_smem, FastPlan* plan) {
  if (K > kMaxSlots) return false;
  const int S = 2 * Rc + 1;
  // DX: fewest wasted offsets, ties -> the larger block.
  int DX = 8, waste = INT_MAX;
  for (int d = 8; d >= 4; --d) {
    const int w = (S + d - 1) / d * d - S;
    if (w < waste) {
      waste = w;
      DX = d;
    }
  }
  const int nblk = (S + DX - 1) / DX;
  const int per_row = kTQY * kGroups * nblk;  // threads per offset row
  if (per_row > kMaxThreads) return false;
  int nd_min = (128 + per_row - 1) / per_row, nd_max = kMaxThreads / per_row;
  if (nd_max > S) nd_max = S;
  if (nd_min > nd_max) nd_min = nd_max;
  int ND = nd_min, rows = INT_MAX;
  for (int nd = nd_min; nd <= nd_max; ++nd) {  // fewest padded offset rows, ties -> larger
    const int rr = (S + nd - 1) / nd * nd;
    if (rr <= rows) {
      rows = rr;
      ND = nd;
    }
  }
  const int SW = kTQX + DX * nblk - 1;
  const int SWp = SW | 1;  // odd column stride
  int LG = static_cast<int>(kMaxSlots / K);
  if (LG > L) LG = static_cast<int>(L);
  if (LG < 1) LG = 1;
  int CC = C < 32 ? static_cast<int>(C) : 32;
  if (CC < 1) CC = 1;
  const int64_t budget = max_smem < 200 * 1024 ? max_smem : 200 * 1024;
  while (fast_smem_bytes(LG, K, CC, ND, SWp, Rc) > budget && CC > 4) CC = (CC + 1) / 2;
  const int64_t smem = fast_smem_bytes(LG, K, CC, ND, SWp, Rc);
  if (smem > max_smem) return false;
  plan->DX = DX;
  plan->nblk = nblk;
  plan->ND = ND;
  plan->CC = CC;
  plan->SW = SW;
  plan->SWp = SWp;
  plan->LG = LG;
  plan->ngroups = static_cast<int>((L + LG - 1) / LG);
  plan->smem = smem;
  return true;
}

template <typename Tin, int DX>
int launch_fast_dx(LocalParams prm, const FastPlan& plan, int64_t B, cudaStream_t stream) {
  auto kernel = local_fast_kernel<Tin, DX>;
  VOS_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(plan.smem)));
  const int threads = kTQY * kGroups * plan.nblk * plan.ND;
  const int64_t per_batch =
      int64_t(plan.ngroups) * prm.ncy * prm.ncx * prm.tilesY * int64_t(prm.tilesX);
  const int64_t max_blocks = INT_MAX;
  int64_t bstep = max_blocks / per_batch;
  if (bstep < 1) return static_cast<int>(cudaErrorInvalidConfiguration);
  for (int64_t b0 = 0; b0 < B; b0 += bstep) {
    const int64_t nb = B - b0 < bstep ? B - b0 : bstep;
    prm.b_begin = b0;
    kernel<<<static_cast<unsigned int>(nb * per_batch), threads, plan.smem, stream>>>(prm);
    VOS_CUDA_CHECK_LAUNCH();
  }
  return 0;
}

template <typename Tin>
int launch_fast(LocalParams prm, const FastPlan& plan, int64_t B, cudaStream_t stream) {
  switch (plan.DX) {
    case 4: return launch_fast_dx<Tin, 4>(prm, plan, B, stream);
    case 5: return launch_fast_dx<Tin, 5>(prm, plan, B, stream);
    case 6: return launch_fast_dx<Tin, 6>(prm, plan, B, stream);
    case 7: return launch_fast_dx<Tin, 7>(prm, plan, B, stream);
    default: return launch_fast_dx<Tin, 8>(prm, plan, B, stream);
  }
}

template <typename Tin>
int local_forward_f32(const Tin* q, const Tin* prev, const int32_t* lab, const int32_t* windows,
                      int64_t K, int64_t max_window, const float* bias, int64_t B, int64_t H,
                      int64_t W, int64_t C, int64_t L, int64_t rate, float* fg, float* bg,
                      int64_t* idx, cudaStream_t stream) {
  const int64_t Hmax = (H + rate - 1) / rate, Wmax = (W + rate - 1) / rate;
  int64_t R = max_window / rate;
  const int64_t ext = (Hmax > Wmax ? Hmax : Wmax) - 1;  // larger offsets never hit the frame
  if (R > ext) R = ext;
  FastPlan plan{};
  int device = 0;
  VOS_CUDA_TRY(cudaGetDevice(&device));
  // rate < 2^30 too: the kernel keeps the rate in an int (a larger rate would truncate).
  const bool fits = C >= 1 && H < (int64_t(1) << 30) && W < (int64_t(1) << 30) && C < (int64_t(1) << 30) &&
                    rate < (int64_t(1) << 30) &&
                    R <= 4096 && plan_fast(C, L, K, static_cast<int>(R), max_dynamic_smem(device), &plan);
  if (!fits)
    return launch_simple<Tin, float>(q, prev, lab, windows, bias, B, H, W, C, L, K, rate, fg, bg, idx,
                                     stream);
  LocalParams prm{};
  prm.q = q;
  prm.p = prev;
  prm.lab = lab;
  prm.windows = windows;
  prm.bias = bias;
  prm.fg = fg;
  prm.bg = bg;
  prm.idx = idx;
  prm.H = H;
  prm.W = W;
  prm.C = C;
  prm.L = L;
  prm.K = K;
  prm.rate = rate;
  prm.b_begin = 0;
  prm.Rc = static_cast<int>(R);
  prm.S = static_cast<int>(2 * R + 1);
  prm.Hmax = static_cast<int>(Hmax);
  prm.Wmax = static_cast<int>(Wmax);
  prm.ncy = static_cast<int>(rate < H ? rate : H);
  prm.ncx = static_cast<int>(rate < W ? rate : W);
  prm.tilesY = static_cast<int>((Hmax + kTQY - 1) / kTQY);
  prm.tilesX = static_cast<int>((Wmax + kTQX - 1) / kTQX);
  prm.ngroups = plan.ngroups;
  prm.LG = plan.LG;
  prm.ND = plan.ND;
  prm.nblk = plan.nblk;
  prm.CC = plan.CC;
  prm.SW = plan.SW;
  prm.SWp = plan.SWp;
  prm.fuse_bg = plan.ngroups == 1 ? 1 : 0;
  if (int64_t(prm.ncy) * prm.ncx > INT_MAX / 4)  // absurd rates: simple kernel
    return launch_simple<Tin, float>(q, prev, lab, windows, bias, B, H, W, C, L, K, rate, fg, bg, idx,
                                     stream);
  const int rc = launch_fast<Tin>(prm, plan, B, stream);
  if (rc != 0) return rc;
  if (!prm.fuse_bg) return launch_bg<float>(fg, bg, B, L, K * H * W, stream);
  return 0;
}

// ---------------------------------------------------------------------------------------
// Instance pooling
// ---------------------------------------------------------------------------------------

constexpr int kPoolWarps = 8;
constexpr int64_t kPoolMaxChunks = 1024;
constexpr int64_t kPoolChunk = 512;  // pixels per block (at least)

int64_t pool_num_chunks(int64_t N) {
  int64_t n = (N + kPoolChunk - 1) / kPoolChunk;
  if (n > kPoolMaxChunks) n = kPoolMaxChunks;
  return n < 1 ? 1 : n;
}

int pool_labels_per_block(int64_t L, int max_smem) {
  const int64_t per_label = int64_t(kPoolWarps) * 32 * 8 + kPoolWarps * 4;
  int64_t budget = max_smem < 96 * 1024 ? max_smem : 96 * 1024;
  int64_t lg = budget / per_label;
  if (lg > L) lg = L;
  return static_cast<int>(lg < 1 ? 1 : lg);
}

// Block = (chunk, channel block of 32, label group, batch), flattened in blockIdx.x.
template <typename Tin>
__global__ void __launch_bounds__(kPoolWarps * 32, 1)
    pool_partial_kernel(const Tin* __restrict__ e, const int32_t* __restrict__ lab, int64_t N,
                        int64_t C, int64_t L, int LG, int64_t nchunks, int64_t chunk,
                        int64_t ncb, int64_t ngroups, int64_t b_begin, double* __restrict__ ws_sum,
                        double* __restrict__ ws_cnt) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  double* sum = reinterpret_cast<double*>(smem_raw);                        // [warps][LG][32]
  int* cnt = reinterpret_cast<int*>(sum + int64_t(kPoolWarps) * LG * 32);  // [warps][LG]
  int64_t bid = blockIdx.x;
  const int64_t ck = bid % nchunks;
  bid /= nchunks;
  const int64_t cb = bid % ncb;
  bid /= ncb;
  const int64_t grp = bid % ngroups;
  const int64_t b = b_begin + bid / ngroups;
  const int64_t l0 = grp * LG;
  const int LGe = static_cast<int>(L - l0 < LG ? L - l0 : LG);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int i = threadIdx.x; i < kPoolWarps * LG * 32; i += blockDim.x) sum[i] = 0.0;
  for (int i = threadIdx.x; i < kPoolWarps * LG; i += blockDim.x) cnt[i] = 0;
  __syncthreads();
  const int64_t c = cb * 32 + lane;
  const bool cok = c < C;
  const int64_t n0 = ck * chunk, n1 = n0 + chunk < N ? n0 + chunk : N;
  double* my = sum + int64_t(warp) * LG * 32 + lane;
  int* mycnt = cnt + warp * LG;
  for (int64_t n = n0 + warp; n < n1; n += kPoolWarps) {
    const int64_t l = static_cast<int64_t>(lab[b * N + n]) - l0;
    if (l < 0 || l >= LGe) continue;  // warp-uniform
    if (cok) my[l * 32] += static_cast<double>(to_float(e[(b * N + n) * C + c]));
    if (lane == 0) mycnt[l] += 1;
  }
  __syncthreads();
  const int64_t wbase = (b * nchunks + ck) * L + l0;
  for (int i = threadIdx.x; i < LGe * 32; i += blockDim.x) {
    const int l = i / 32, ln = i % 32;
    const int64_t cc = cb * 32 + ln;
    if (cc >= C) continue;
    double s = 0.0;
    for (int w = 0; w < kPoolWarps; ++w) s += sum[(int64_t(w) * LG + l) * 32 + ln];
    ws_sum[(wbase + l) * C + cc] = s;
  }
  if (cb == 0) {
    for (int l = threadIdx.x; l < LGe; l += blockDim.x) {
      int s = 0;
      for (int w = 0; w < kPoolWarps; ++w) s += cnt[w * LG + l];
      ws_cnt[wbase + l] = static_cast<double>(s);
    }
  }
}

template <typename To>
__global__ void pool_final_kernel(const double* __restrict__ ws_sum, const double* __restrict__ ws_cnt,
                                  int64_t B, int64_t C, int64_t L, int64_t nchunks,
                                  To* __restrict__ out) {
  const int64_t total = B * L * C;
  for (int64_t o = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; o < total;
       o += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = o % C, l = (o / C) % L, b = o / (C * L);
    double s = 0.0, n = 0.0, total_s = 0.0, valid = 0.0;
    for (int64_t m = 0; m < L; ++m) {
      double sm = 0.0, nm = 0.0;
      for (int64_t ck = 0; ck < nchunks; ++ck) {
        const int64_t w = (b * nchunks + ck) * L + m;
        sm += ws_sum[w * C + c];
        nm += ws_cnt[w];
      }
      total_s += sm;
      valid += nm;
      if (m == l) {
        s = sm;
        n = nm;
      }
    }
    const double fg_den = n + 1e-5, bg_den = valid - n + 1e-5;
    out[((b * L + l) * 2 + 0) * C + c] = static_cast<To>(s / fg_den);
    out[((b * L + l) * 2 + 1) * C + c] = static_cast<To>((total_s - s) / bg_den);
  }
}

template <typename Tin, typename To>
int pool_forward(const Tin* e, const int32_t* lab, int64_t B, int64_t H, int64_t W, int64_t C,
                 int64_t L, To* out, void* workspace, int64_t workspace_bytes, cudaStream_t stream) {
  const int64_t N = H * W;
  const int64_t nchunks = pool_num_chunks(N);
  const int64_t chunk = (N + nchunks - 1) / nchunks;
  const int64_t need = B * nchunks * L * (C + 1) * 8;
  if (workspace_bytes < need) return static_cast<int>(cudaErrorInvalidValue);
  double* ws_sum = static_cast<double*>(workspace);
  double* ws_cnt = ws_sum + B * nchunks * L * C;
  int device = 0;
  VOS_CUDA_TRY(cudaGetDevice(&device));
  const int LG = pool_labels_per_block(L, max_dynamic_smem(device));
  const int64_t ngroups = (L + LG - 1) / LG;
  const int64_t ncb = (C + 31) / 32;
  const int64_t smem = int64_t(kPoolWarps) * LG * 32 * 8 + int64_t(kPoolWarps) * LG * 4;
  auto kernel = pool_partial_kernel<Tin>;
  VOS_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(smem)));
  const int64_t per_batch = nchunks * ncb * ngroups;
  if (per_batch > INT_MAX) return static_cast<int>(cudaErrorInvalidConfiguration);
  const int64_t bstep = INT_MAX / per_batch;
  for (int64_t b0 = 0; b0 < B; b0 += bstep) {
    const int64_t nb = B - b0 < bstep ? B - b0 : bstep;
    kernel<<<static_cast<unsigned int>(nb * per_batch), kPoolWarps * 32, smem, stream>>>(
        e, lab, N, C, L, LG, nchunks, chunk, ncb, ngroups, b0, ws_sum, ws_cnt);
    VOS_CUDA_CHECK_LAUNCH();
  }
  pool_final_kernel<To><<<grid_for(B * L * C, 256), 256, 0, stream>>>(ws_sum, ws_cnt, B, C, L,
                                                                       nchunks, out);
  VOS_CUDA_CHECK_LAUNCH();
  return 0;
}

}  // namespace

int fb_multi_local_matching_forward(Dtype dtype, const void* query, const void* previous,
                                    const int32_t* labels, const int32_t* windows, int64_t K,
                                    int64_t max_window, const void* bias, int64_t B, int64_t H,
                                    int64_t W, int64_t C, int64_t L, int64_t rate, void* fg,
                                    void* bg, int64_t* index, void* stream) {
  if (B * H * W * L * K == 0) return 0;
  if (K < 1 || L < 1 || rate < 1 || C < 0) return static_cast<int>(cudaErrorInvalidValue);
  cudaStream_t st = as_stream(stream);
  switch (dtype) {
    case Dtype::kFloat64:
      return launch_simple<double, double>(
          static_cast<const double*>(query), static_cast<const double*>(previous), labels, windows,
          static_cast<const double*>(bias), B, H, W, C, L, K, rate, static_cast<double*>(fg),
          static_cast<double*>(bg), index, st);
    case Dtype::kFloat32:
      return local_forward_f32<float>(static_cast<const float*>(query),
                                      static_cast<const float*>(previous), labels, windows, K,
                                      max_window, static_cast<const float*>(bias), B, H, W, C, L,
                                      rate, static_cast<float*>(fg), static_cast<float*>(bg), index, st);
    case Dtype::kFloat16:
      return local_forward_f32<__half>(static_cast<const __half*>(query),
                                       static_cast<const __half*>(previous), labels, windows, K,
                                       max_window, static_cast<const float*>(bias), B, H, W, C, L,
                                       rate, static_cast<float*>(fg), static_cast<float*>(bg), index, st);
    case Dtype::kBFloat16:
      return local_forward_f32<__nv_bfloat16>(
          static_cast<const __nv_bfloat16*>(query), static_cast<const __nv_bfloat16*>(previous),
          labels, windows, K, max_window, static_cast<const float*>(bias), B, H, W, C, L, rate,
          static_cast<float*>(fg), static_cast<float*>(bg), index, st);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

int64_t fb_instance_pooling_workspace_bytes(int64_t B, int64_t H, int64_t W, int64_t C, int64_t L) {
  return B * pool_num_chunks(H * W) * L * (C + 1) * 8;
}

int fb_instance_pooling_forward(Dtype dtype, const void* embedding, const int32_t* labels,
                                int64_t B, int64_t H, int64_t W, int64_t C, int64_t L,
                                void* out, void* workspace, int64_t workspace_bytes,
                                void* stream) {
  if (B * L * C == 0) return 0;
  cudaStream_t st = as_stream(stream);
  if (H * W == 0) return static_cast<int>(cudaMemsetAsync(
      out, 0, B * L * 2 * C * (dtype == Dtype::kFloat64 ? 8 : 4), st));
  switch (dtype) {
    case Dtype::kFloat64:
      return pool_forward<double, double>(static_cast<const double*>(embedding), labels, B, H, W, C,
                                          L, static_cast<double*>(out), workspace, workspace_bytes, st);
    case Dtype::kFloat32:
      return pool_forward<float, float>(static_cast<const float*>(embedding), labels, B, H, W, C, L,
                                        static_cast<float*>(out), workspace, workspace_bytes, st);
    case Dtype::kFloat16:
      return pool_forward<__half, float>(static_cast<const __half*>(embedding), labels, B, H, W, C,
                                         L, static_cast<float*>(out), workspace, workspace_bytes, st);
    case Dtype::kBFloat16:
      return pool_forward<__nv_bfloat16, float>(static_cast<const __nv_bfloat16*>(embedding), labels,
                                                B, H, W, C, L, static_cast<float*>(out), workspace,
                                                workspace_bytes, st);
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace cuda
}  // namespace vos
