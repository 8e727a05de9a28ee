// CUDA kernel of topk_memory_read (STCN / XMem / AMM top-k memory read), forward only.
//
// Semantics (csrc/cpu/memory_read.cpp is the reference): s[q, n] = (2·m_n·q − ‖m_n‖²)·scale;
// per query the k' = min(k, Nm) largest s, ties to the lowest memory index, NaN above every
// number (NaNs among themselves: lowest index), −0 equal to +0; weights = softmax of the k'
// values with the maximum subtracted; readout[q] = Σ_j w_j · v[idx_j] (in slot order j);
// usage[b, idx] += 1 (mode 1) or += w (mode 2), in place.
//
// Design (float32 keys; float16/bfloat16 keys are converted to float32 by the glue):
//  1. topk_select_kernel — a block of 128 threads (4 warps) owns BQ = 128 queries of one
//     batch element and one split of the memory axis. The query tile [128, CK] stays in
//     shared memory; memory-key tiles of BN = 64 rows stream through a cp.async double
//     buffer (16-byte copies when CK % 4 == 0 and the base is aligned, else 4-byte ones,
//     zero-filled outside the matrix). Each warp computes its 32 x 64 affinity tile with
//     mma.sync m16n8k8 TF32 (64 fp32 accumulators per thread): 3xTF32 split products
//     (lo·hi + hi·lo + hi·hi, fp32-accurate) for MatmulPrecision::kIEEE, one TF32 product
//     for kTF32. ‖m‖² is accumulated from the same B fragments in fp32 (each lane of a quad
//     holds every 4th channel of one column; a 2-step quad butterfly and one shuffle per
//     column give every lane the norms of its accumulator columns — the same bits in every
//     warp and block, so the result does not depend on the split). Epilogue in registers:
//     s = fma(2, dot, −‖m‖²)·scale and a threshold test `!(s <= thr)` against the float
//     value of the query's current k'-th entry (NaN while the list is not full or its k'-th
//     value is NaN, so everything passes; exact for the tie rule because earlier tiles hold
//     lower indices only). Only if some lane of the warp has a candidate does the slow path
//     run: candidates are packed into int64 keys (sign-corrected float bits in the high word,
//     NaN -> INT_MAX, −0 -> +0, complemented memory index in the low word: unique keys in a
//     total order that is exactly the CPU ranking), dropped when not above the query's
//     current k'-th key, and dropped into per-query buckets of 8 slots in shared memory
//     (shared atomics); then lane L of the warp inserts the bucket of query 32·w + L into
//     that query's sorted list of k' keys in shared memory (insertion sort; slot-major
//     layout, conflict-free), and the loop repeats while candidates remain (the first tiles
//     of a split fill the lists; later tiles are almost always a single compare). Keys are
//     unique, so the list is independent of the insertion order (deterministic).
//     Each block writes its k' sorted keys per query to a workspace [B, splits, Nq, k'].
//     Splits: when ceil(Nq/128)·B blocks do not fill the GPU, the memory axis is cut into
//     floor(SMs·blocks_per_SM / query_blocks) ≤ 32 splits of ≥ 256 rows (one wave).
//  2. topk_merge_kernel — a warp per query merges the splits' sorted lists (lane = split,
//     k' rounds of a 64-bit warp max; keys unique: exactly one lane advances), decodes
//     values and indices, computes the max-subtracted softmax (sum in double, fixed
//     butterfly order) and writes index / weight.
//  3. topk_readout_kernel — a warp per (query, 512 channels): 16-byte loads of the k' value
//     rows (4 float4 per lane in flight per row), fma in slot order, one store per lane.
//     usage_mode 1: float atomicAdd of 1.0 per (query, slot): every addend is 1, so the
//     result does not depend on the order (exact and deterministic, equal to the CPU's
//     sequential sum). usage_mode 2: deterministic — a stable CUB radix sort of the hits
//     by entry (b·Nm + idx; its input is in (query, slot) order), then one thread per entry
//     adds its weights sequentially in query order starting from the old value: bitwise
//     the CPU kernel's sum for equal weights. (Only if B·Nm ≥ 2^32 would it fall back to
//     float atomics, which are order-dependent.)
//  General path (float64 keys, k' > 64, or a CK whose tiles exceed the shared memory):
//     topk_general_kernel, a block per query: 256 memory rows per step, SIMT dot products
//     in T, a threshold test, a bitonic sort of the survivors in shared memory and a
//     rank-by-binary-search merge into the query's running sorted list (two ping-pong
//     workspace arrays), then the softmax. Correct for any k', slow for large k'.
//
// Prediction for the paper shapes on an H100 (SXM, 132 SMs): affinity FLOPs 2·Nq·Nm·CK;
// 3xTF32 triples the tensor work; mma.sync (not wgmma) with operand splitting on the ALU
// reaches maybe 50% of the 495 TFLOP/s TF32 peak, so ~80 TFLOP/s of fp32-accurate
// affinities ("highest") and ~200 TFLOP/s with one TF32 product ("high"). The selection
// is a compare per affinity in registers once the lists are full. Readout: Nq·k'·CV·4
// bytes gathered (+ writes), bandwidth-bound, from L2 while Nm·CV·4 fits in 50 MB.
//   STCN DAVIS Nq = 1620, CK = 64, k = 20, Nm = 1620·T:
//     T = 1:   0.34 GFLOP  -> ~15 us select (list fill dominates), readout ~10 us (L2)
//     T = 5:   1.7 GFLOP   -> ~25 us (highest) / ~15 us (high)
//     T = 20:  6.7 GFLOP   -> ~85 us / ~40 us
//     T = 50:  16.8 GFLOP  -> ~210 us / ~90 us
//     T = 100: 33.6 GFLOP  -> ~420 us / ~170 us
//     readout O = 1/2/5 (CV = 512/1024/2560): 66/133/332 MB gathered -> ~25/50/120 us
//     from HBM (less from L2 for small T); merge + softmax ~5 us.
//   720p Nq = 3600, Nm = 3600·T: T = 5/20/50: 8.3/33/83 GFLOP -> ~0.11/0.42/1.05 ms
//     (highest), ~0.05/0.17/0.42 ms (high); readout O = 1: 147 MB -> ~55 us.
//   Compute-bound (tensor cores) for T ≥ 5; no memory × query buffer anywhere.

#include <cub/device/device_radix_sort.cuh>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/memory_read.h"

namespace vos {
namespace cuda {
namespace {

constexpr int kBQ = 128;       // queries per select block (4 warps x 32)
constexpr int kBN = 64;        // memory rows per tile
constexpr int kThreads = 128;  // select block
constexpr int kBucket = 8;     // candidate slots per query per insertion round
constexpr int kMaxSplits = 32;
constexpr int kMaxFastK = 64;  // merge kernel: 2 keys per lane
constexpr int kGenThreads = 256;
constexpr unsigned kFull = 0xffffffffu;
constexpr long long kSentinel = (long long)(-2147483647 - 1) * 4294967296LL;  // below every key

// ------------------------------------------------------------------------------------------
// Packed keys: signed int64 order = CPU ranking (value, then lowest index), for float32.
// ------------------------------------------------------------------------------------------
__device__ __forceinline__ long long pack_key(float s, int64_t n) {
  int bits = __float_as_int(s == 0.0f ? 0.0f : s);  // -0 -> +0
  if (s != s) bits = 0x7fffffff;                    // every NaN -> the top key
  const int hk = bits >= 0 ? bits : (bits ^ 0x7fffffff);
  const unsigned low = 0xffffffffu - static_cast<unsigned>(n);  // lower index -> larger key
  return (static_cast<long long>(hk) * 4294967296LL) | static_cast<long long>(low);
}

__device__ __forceinline__ float key_value(long long key) {  // the sentinel decodes to NaN
  const int hk = static_cast<int>(key >> 32);
  return __int_as_float(hk >= 0 ? hk : (hk ^ 0x7fffffff));
}

__device__ __forceinline__ int64_t key_index(long long key) {
  return static_cast<int64_t>(0xffffffffu - static_cast<unsigned>(key & 0xffffffffLL));
}

// ------------------------------------------------------------------------------------------
// PTX helpers
// ------------------------------------------------------------------------------------------
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int n = valid ? 16 : 0;  // 0: zero-fill, nothing read
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}

__device__ __forceinline__ void cp_async4(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int n = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(gmem), "r"(n));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

__device__ __forceinline__ unsigned to_tf32(float x) {
  unsigned r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r & 0xffffe000u;
}

__device__ __forceinline__ void split_tf32(float x, unsigned& hi, unsigned& lo) {
  hi = to_tf32(x);
  lo = to_tf32(x - __uint_as_float(hi));  // x − hi is exact
}

__device__ __forceinline__ void mma_tf32(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// rows [row0, row0 + rows) ∩ [.., row_end) of a [*, CK] float matrix into smem [rows, S]
// (channels CK..CKP-1 and rows past row_end zero).
__device__ __forceinline__ void load_rows(float* dst, const float* src, int64_t row0, int64_t row_end, int rows,
                                          int CK, int CKP, int S, bool vec, int tid) {
  if (vec) {
    const int cpr = CKP >> 2;
    for (int i = tid; i < rows * cpr; i += kThreads) {
      const int r = i / cpr, c = (i - r * cpr) << 2;
      const int64_t row = row0 + r;
      const bool ok = row < row_end && c < CK;
      cp_async16(dst + r * S + c, ok ? src + row * CK + c : src, ok);
    }
  } else {
    for (int i = tid; i < rows * CKP; i += kThreads) {
      const int r = i / CKP, c = i - r * CKP;
      const int64_t row = row0 + r;
      const bool ok = row < row_end && c < CK;
      cp_async4(dst + r * S + c, ok ? src + row * CK + c : src, ok);
    }
  }
}

__device__ __forceinline__ void list_insert(long long* list, int K, long long key) {  // list: stride kBQ
  if (key <= list[(K - 1) * kBQ]) return;
  int pos = K - 1;
  while (pos > 0) {
    const long long prev = list[(pos - 1) * kBQ];
    if (prev >= key) break;
    list[pos * kBQ] = prev;
    --pos;
  }
  list[pos * kBQ] = key;
}

__host__ __device__ inline int select_stride(int64_t CK) { return static_cast<int>((CK + 7) / 8 * 8 + 4); }

__host__ __device__ inline int64_t select_smem_bytes(int64_t CK, int64_t K) {
  return kBQ * K * 8 + kBQ * kBucket * 8 + kBQ * 8 + kBQ * 4 + kBQ * 4 + kBQ * 4 +
         static_cast<int64_t>(kBQ + 2 * kBN) * select_stride(CK) * 4;
}

// ------------------------------------------------------------------------------------------
// 1. select: partial top-k' of one (query block, memory split, batch element)
// ------------------------------------------------------------------------------------------
template <bool kThreeTerm>
__global__ void __launch_bounds__(kThreads, 2)
    topk_select_kernel(const float* __restrict__ query, const float* __restrict__ memory,
                       long long* __restrict__ part, int64_t Nq, int64_t Nm, int CK, int K, float scale,
                       int64_t split_rows, int splits, int64_t b_off, bool vec) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  long long* s_list = reinterpret_cast<long long*>(smem_raw);  // [K][kBQ]
  long long* s_bucket = s_list + kBQ * K;                      // [kBucket][kBQ]
  long long* s_thrkey = s_bucket + kBQ * kBucket;              // [kBQ]
  float* s_thrf = reinterpret_cast<float*>(s_thrkey + kBQ);    // [kBQ]
  int* s_cnt = reinterpret_cast<int*>(s_thrf + kBQ);           // [kBQ]
  int* s_qbad = s_cnt + kBQ;                                   // [kBQ]: query row not finite
  float* s_q = reinterpret_cast<float*>(s_qbad + kBQ);         // [kBQ][S]
  const int CKP = (CK + 7) & ~7;
  const int S = CKP + 4;
  float* s_m = s_q + kBQ * S;  // [2][kBN][S]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, g = lane >> 2, t = lane & 3;
  const int64_t b = static_cast<int64_t>(blockIdx.z) + b_off;
  const int split = blockIdx.y;
  const int64_t q0 = static_cast<int64_t>(blockIdx.x) * kBQ;
  const int64_t n_lo = split * split_rows;
  const int64_t n_hi = n_lo + split_rows < Nm ? n_lo + split_rows : Nm;
  const float* qb = query + b * Nq * CK;
  const float* mb = memory + b * Nm * CK;

  for (int i = tid; i < kBQ * K; i += kThreads) s_list[i] = kSentinel;
  for (int i = tid; i < kBQ; i += kThreads) {
    s_thrkey[i] = kSentinel;
    s_thrf[i] = __int_as_float(0x7fffffff);  // NaN: everything passes the float test
    s_cnt[i] = 0;
  }
  const int64_t num_tiles = n_lo < n_hi ? (n_hi - n_lo + kBN - 1) / kBN : 0;
  load_rows(s_q, qb, q0, Nq, kBQ, CK, CKP, S, vec, tid);
  if (num_tiles > 0) load_rows(s_m, mb, n_lo, n_hi, kBN, CK, CKP, S, vec, tid);
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();
  {  // rows with NaN / inf (or a squared norm that overflows) take the exact SIMT path below
    float sq = 0.0f;
    for (int c = 0; c < CK; ++c) sq = fmaf(s_q[tid * S + c], s_q[tid * S + c], sq);
    s_qbad[tid] = !isfinite(sq);
  }
  __syncthreads();

  const int my_q = warp * 32 + lane;  // the query whose list this lane maintains
  const float* sq = s_q + (warp * 32) * S;

  for (int64_t it = 0; it < num_tiles; ++it) {
    const int64_t n0 = n_lo + it * kBN;
    cp_async_wait_all();
    __syncthreads();  // tile `it` visible; every warp is done with tile it-1 (other buffer)
    if (it + 1 < num_tiles) load_rows(s_m + ((it + 1) & 1) * kBN * S, mb, n0 + kBN, n_hi, kBN, CK, CKP, S, vec, tid);
    cp_async_commit();
    const float* sm = s_m + (it & 1) * kBN * S;

    float acc[2][8][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.0f;
    float msq[8];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) msq[nt] = 0.0f;

#pragma unroll 1
    for (int ks = 0; ks < CKP; ks += 8) {
      unsigned ahi[2][4], alo[2][4];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        const float* r0 = sq + (mt * 16 + g) * S + ks + t;
        const float* r1 = r0 + 8 * S;
        const float a[4] = {r0[0], r1[0], r0[4], r1[4]};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (kThreeTerm) {
            split_tf32(a[e], ahi[mt][e], alo[mt][e]);
          } else {
            ahi[mt][e] = to_tf32(a[e]);
            alo[mt][e] = 0u;
          }
        }
      }
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        const float* bp = sm + (nt * 8 + g) * S + ks + t;
        const float b0 = bp[0], b1 = bp[4];
        msq[nt] = fmaf(b0, b0, msq[nt]);
        msq[nt] = fmaf(b1, b1, msq[nt]);
        if (kThreeTerm) {
          unsigned h0, l0, h1, l1;
          split_tf32(b0, h0, l0);
          split_tf32(b1, h1, l1);
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            mma_tf32(acc[mt][nt], alo[mt], h0, h1);
            mma_tf32(acc[mt][nt], ahi[mt], l0, l1);
            mma_tf32(acc[mt][nt], ahi[mt], h0, h1);
          }
        } else {
          const unsigned h0 = to_tf32(b0), h1 = to_tf32(b1);
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) mma_tf32(acc[mt][nt], ahi[mt], h0, h1);
        }
      }
    }

    // ‖m‖² of the accumulator columns nt·8 + 2t + c: sum the quad (lanes 4g'..4g'+3 hold
    // column nt·8 + g'), then fetch column 2t + c from quad g' = 2t + c.
    float mcol[8][2];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      msq[nt] += __shfl_xor_sync(kFull, msq[nt], 1);
      msq[nt] += __shfl_xor_sync(kFull, msq[nt], 2);
      mcol[nt][0] = __shfl_sync(kFull, msq[nt], (2 * t) * 4);
      mcol[nt][1] = __shfl_sync(kFull, msq[nt], (2 * t + 1) * 4);
    }
    float thr[2][2];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) thr[mt][h] = s_thrf[warp * 32 + mt * 16 + h * 8 + g];

#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[mt][nt][e] = fmaf(2.0f, acc[mt][nt][e], -mcol[nt][e & 1]) * scale;

    // Non-finite inputs: the split products (inf − inf in the residual) and TF32 rounding
    // must not decide NaN / inf; such (query, entry) pairs are recomputed in fp32 FMA from
    // shared memory, as the CPU kernel would (warp-uniform test, rare).
    {
      bool bad = false;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) bad |= !isfinite(mcol[nt][0]) || !isfinite(mcol[nt][1]);
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) bad |= s_qbad[warp * 32 + mt * 16 + h * 8 + g] != 0;
      if (__any_sync(kFull, bad)) {
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int r = warp * 32 + mt * 16 + h * 8 + g;
            const bool qbad = s_qbad[r] != 0;
#pragma unroll
            for (int nt = 0; nt < 8; ++nt)
#pragma unroll
              for (int c = 0; c < 2; ++c) {
                if (qbad || !isfinite(mcol[nt][c])) {
                  const float* qr = s_q + r * S;
                  const float* mr = sm + (nt * 8 + 2 * t + c) * S;
                  float dot = 0.0f;
                  for (int ch = 0; ch < CK; ++ch) dot = fmaf(qr[ch], mr[ch], dot);
                  acc[mt][nt][h * 2 + c] = fmaf(2.0f, dot, -mcol[nt][c]) * scale;
                }
              }
          }
      }
    }

    // pend: this lane's accumulator slots above its query's current k'-th score
    unsigned long long pend = 0ull;
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const int slot = ((mt * 8 + nt) * 2 + h) * 2 + c;
            const float s = acc[mt][nt][h * 2 + c];
            const bool valid = n0 + nt * 8 + 2 * t + c < n_hi;
            if (valid && !(s <= thr[mt][h])) pend |= 1ull << slot;
          }
    if (__any_sync(kFull, pend != 0ull)) {
      while (true) {
        // candidates into the per-query buckets (those no longer above the list's k'-th
        // key are dropped; those that find the bucket full wait for the next round)
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
          for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
              for (int c = 0; c < 2; ++c) {
                const int slot = ((mt * 8 + nt) * 2 + h) * 2 + c;
                if ((pend >> slot) & 1ull) {
                  const int r = warp * 32 + mt * 16 + h * 8 + g;
                  const long long key = pack_key(acc[mt][nt][h * 2 + c], n0 + nt * 8 + 2 * t + c);
                  if (key <= s_thrkey[r]) {
                    pend &= ~(1ull << slot);
                  } else {
                    const int pos = atomicAdd(s_cnt + r, 1);
                    if (pos < kBucket) {
                      s_bucket[pos * kBQ + r] = key;
                      pend &= ~(1ull << slot);
                    }
                  }
                }
              }
        __syncwarp();
        const int cnt = min(s_cnt[my_q], kBucket);
        if (cnt > 0) {
          for (int i = 0; i < cnt; ++i) list_insert(s_list + my_q, K, s_bucket[i * kBQ + my_q]);
          const long long mn = s_list[(K - 1) * kBQ + my_q];
          s_thrkey[my_q] = mn;
          s_thrf[my_q] = key_value(mn);
        }
        s_cnt[my_q] = 0;
        __syncwarp();
        if (!__any_sync(kFull, pend != 0ull)) break;
      }
    }
  }
  cp_async_wait_all();  // nothing may be in flight when the block exits
  __syncwarp();

  // this warp's 32 lists -> part[b, split, q, 0..K)
  long long* dst = part + ((b * splits + split) * Nq) * K;
  for (int i = lane; i < 32 * K; i += 32) {
    const int rl = i / K, j = i - rl * K;
    const int64_t q = q0 + warp * 32 + rl;
    if (q < Nq) dst[q * K + j] = s_list[j * kBQ + warp * 32 + rl];
  }
}

// ------------------------------------------------------------------------------------------
// 2. merge the splits' lists, softmax, write index and weight (a warp per query)
// ------------------------------------------------------------------------------------------
__global__ void __launch_bounds__(256)
    topk_merge_kernel(const long long* __restrict__ part, int64_t* __restrict__ index, float* __restrict__ weight,
                      int64_t B, int64_t Nq, int K, int splits) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x >> 5);
  for (int64_t gw = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5); gw < B * Nq;
       gw += warps) {
    const int64_t b = gw / Nq, q = gw - b * Nq;
    const long long* src = part + ((b * splits + lane) * Nq + q) * K;  // valid for lane < splits
    int h = 0;
    long long cur = lane < splits ? src[0] : kSentinel;
    long long k0 = kSentinel, k1 = kSentinel;
    for (int r = 0; r < K; ++r) {
      long long best = cur;
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        const long long o = __shfl_xor_sync(kFull, best, off);
        best = o > best ? o : best;
      }
      if (lane < splits && cur == best && best != kSentinel) {
        ++h;
        cur = h < K ? src[h] : kSentinel;
      }
      if (r < 32) {
        if (lane == r) k0 = best;
      } else if (lane == r - 32) {
        k1 = best;
      }
    }
    const bool v0 = lane < K, v1 = lane + 32 < K;
    const float top = __shfl_sync(kFull, key_value(k0), 0);
    const float e0 = v0 ? expf(key_value(k0) - top) : 0.0f;
    const float e1 = v1 ? expf(key_value(k1) - top) : 0.0f;
    double sum = static_cast<double>(e0) + static_cast<double>(e1);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(kFull, sum, off);
    const float inv = static_cast<float>(1.0 / sum);
    const int64_t row = gw * K;
    if (v0) {
      index[row + lane] = key_index(k0);
      weight[row + lane] = e0 * inv;
    }
    if (v1) {
      index[row + lane + 32] = key_index(k1);
      weight[row + lane + 32] = e1 * inv;
    }
  }
}

// ------------------------------------------------------------------------------------------
// General path: a block per query (float64, k' > 64, very large CK)
// ------------------------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ bool better(T a, int64_t ia, T b, int64_t ib) {  // (a, ia) ranks above (b, ib)
  if (ib < 0) return ia >= 0;  // index -1: empty slot, below everything
  if (ia < 0) return false;
  const bool an = a != a, bn = b != b;
  if (an || bn) return (an && bn) ? ia < ib : an;
  if (a > b) return true;
  if (a < b) return false;
  return ia < ib;  // equal values (−0 == +0): lowest index first
}

// Entries j < n of the sorted list (v, i) go to position j + #(entries of the sorted list
// (ov, oi) of length on that rank above them) of (out_v, out_i), if below newlen.
template <typename T>
__device__ __forceinline__ void place_by_rank(const T* v, const int64_t* i, int n, const T* ov,
                                              const int64_t* oi, int on, int newlen, T* out_v,
                                              int64_t* out_i, int tid) {
  for (int j = tid; j < n; j += kGenThreads) {
    const T x = v[j];
    const int64_t ix = i[j];
    int lo = 0, hi = on;
    while (lo < hi) {
      const int mid = (lo + hi) >> 1;
      if (better(ov[mid], oi[mid], x, ix)) lo = mid + 1; else hi = mid;
    }
    if (j + lo < newlen) {
      out_v[j + lo] = x;
      out_i[j + lo] = ix;
    }
  }
}

__device__ __forceinline__ float exp_t(float x) { return expf(x); }
__device__ __forceinline__ double exp_t(double x) { return exp(x); }

template <typename T>
__global__ void __launch_bounds__(kGenThreads)
    topk_general_kernel(const T* __restrict__ query, const T* __restrict__ memory, int64_t B, int64_t Nq,
                        int64_t Nm, int64_t CK, int K, T scale, T* lv0, int64_t* li0, T* lv1, int64_t* li1,
                        int64_t* __restrict__ index, T* __restrict__ weight) {
  __shared__ T sv[kGenThreads];
  __shared__ int64_t si[kGenThreads];
  __shared__ double sred[kGenThreads];
  const int tid = threadIdx.x;
  for (int64_t gq = blockIdx.x; gq < B * Nq; gq += gridDim.x) {
    const int64_t b = gq / Nq;
    const T* qp = query + gq * CK;
    const T* mb = memory + b * Nm * CK;
    T* curv = lv0 + gq * K;
    int64_t* curi = li0 + gq * K;
    T* nxtv = lv1 + gq * K;
    int64_t* nxti = li1 + gq * K;
    int filled = 0;
    T thrv = T(0);
    int64_t thri = -1;
    for (int64_t c0 = 0; c0 < Nm; c0 += kGenThreads) {
      const int64_t n = c0 + tid;
      const bool valid = n < Nm;
      T s = T(0);
      if (valid) {
        const T* mp = mb + n * CK;
        T dot = T(0), nrm = T(0);
        for (int64_t c = 0; c < CK; ++c) {
          const T m = mp[c];
          dot += m * qp[c];
          nrm += m * m;
        }
        s = (T(2) * dot - nrm) * scale;
      }
      const bool pass = valid && (filled < K || better(s, n, thrv, thri));
      const int cnt = __syncthreads_count(pass);  // also: the previous step's reads of sv/si are done
      if (cnt == 0) continue;
      sv[tid] = s;
      si[tid] = pass ? n : -1;
      __syncthreads();
      for (int k = 2; k <= kGenThreads; k <<= 1) {  // bitonic sort, best first
        for (int j = k >> 1; j > 0; j >>= 1) {
          const int p = tid ^ j;
          if (p > tid) {
            const bool desc = (tid & k) == 0;
            const T a = sv[tid], bb = sv[p];
            const int64_t ia = si[tid], ib = si[p];
            if (desc ? better(bb, ib, a, ia) : better(a, ia, bb, ib)) {
              sv[tid] = bb;
              sv[p] = a;
              si[tid] = ib;
              si[p] = ia;
            }
          }
          __syncthreads();
        }
      }
      const int newlen = min(K, filled + cnt);
      // merge of two sorted lists: each entry's rank is its own position plus the number
      // of entries of the other list that rank above it (keys are unique)
      place_by_rank(curv, curi, filled, sv, si, cnt, newlen, nxtv, nxti, tid);  // list entries
      place_by_rank(sv, si, cnt, curv, curi, filled, newlen, nxtv, nxti, tid);  // chunk entries
      __syncthreads();  // the new list is visible to the block
      T* tv = curv; curv = nxtv; nxtv = tv;
      int64_t* ti = curi; curi = nxti; nxti = ti;
      filled = newlen;
      if (filled == K) {
        thrv = curv[K - 1];
        thri = curi[K - 1];
      }
    }
    // softmax over the K selected values (max subtracted); sum in double, fixed tree
    const T top = curv[0];
    double partial = 0.0;
    for (int j = tid; j < K; j += kGenThreads) {
      const T e = exp_t(curv[j] - top);
      nxtv[j] = e;
      partial += static_cast<double>(e);
    }
    sred[tid] = partial;
    __syncthreads();
    for (int off = kGenThreads / 2; off > 0; off >>= 1) {
      if (tid < off) sred[tid] += sred[tid + off];
      __syncthreads();
    }
    const T inv = static_cast<T>(1.0 / sred[0]);
    for (int j = tid; j < K; j += kGenThreads) {
      index[gq * K + j] = curi[j];
      weight[gq * K + j] = nxtv[j] * inv;
    }
    __syncthreads();  // sred / the lists before the next query
  }
}

// ------------------------------------------------------------------------------------------
// 3. readout: a warp per (query, 512-channel chunk); usage mode 1 atomics (exact)
// ------------------------------------------------------------------------------------------
template <typename T>
__device__ __forceinline__ float to_f(T x) { return static_cast<float>(x); }
template <>
__device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

__device__ __forceinline__ float fma_t(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fma_t(double a, double b, double c) { return fma(a, b, c); }

template <typename TW, typename T>
__device__ __forceinline__ TW load_t(const T* p) { return static_cast<TW>(to_f(*p)); }
template <>
__device__ __forceinline__ double load_t<double, double>(const double* p) { return *p; }

template <typename T>
struct Vec4 {  // 4 consecutive elements, one aligned load
  __device__ __forceinline__ static void load(const T* p, float (&v)[4]);
};
template <>
struct Vec4<float> {
  __device__ __forceinline__ static void load(const float* p, float (&v)[4]) {
    const float4 x = __ldg(reinterpret_cast<const float4*>(p));
    v[0] = x.x; v[1] = x.y; v[2] = x.z; v[3] = x.w;
  }
};
// float16 / bfloat16: one 8-byte load, two pairs converted to float2
__device__ __forceinline__ float2 pair_to_float2(unsigned u, __half) {
  return __half22float2(*reinterpret_cast<const __half2*>(&u));
}
__device__ __forceinline__ float2 pair_to_float2(unsigned u, __nv_bfloat16) {
  return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u));
}
template <typename T>
__device__ __forceinline__ void load4_16bit(const T* p, float (&v)[4]) {
  const uint2 x = __ldg(reinterpret_cast<const uint2*>(p));
  const float2 a = pair_to_float2(x.x, T());
  const float2 c = pair_to_float2(x.y, T());
  v[0] = a.x; v[1] = a.y; v[2] = c.x; v[3] = c.y;
}
template <>
struct Vec4<__half> {
  __device__ __forceinline__ static void load(const __half* p, float (&v)[4]) { load4_16bit(p, v); }
};
template <>
struct Vec4<__nv_bfloat16> {
  __device__ __forceinline__ static void load(const __nv_bfloat16* p, float (&v)[4]) { load4_16bit(p, v); }
};

constexpr int kChunk = 512;  // channels per warp

// TV: value element type; TW: weight / output type (float, or double for float64).
template <typename TV, typename TW, bool kVec>
__global__ void __launch_bounds__(256)
    topk_readout_kernel(const TV* __restrict__ value, const int64_t* __restrict__ index,
                        const TW* __restrict__ weight, TW* __restrict__ out, float* usage, int64_t usb,
                        int64_t usn, int usage_mode, int64_t B, int64_t Nq, int64_t Nm, int64_t CV, int K) {
  const int lane = threadIdx.x & 31;
  const int64_t chunks = CV > 0 ? (CV + kChunk - 1) / kChunk : 1;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x >> 5);
  for (int64_t gw = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
       gw < B * Nq * chunks; gw += warps) {
    const int64_t row = gw / chunks;  // b·Nq + q
    const int64_t chunk = gw - row * chunks;
    const int64_t b = row / Nq;
    const int64_t* ip = index + row * K;
    const TW* wp = weight + row * K;
    if (usage_mode == 1 && chunk == 0) {
      for (int j = lane; j < K; j += 32) atomicAdd(usage + b * usb + ip[j] * usn, 1.0f);
    }
    const TV* vb = value + b * Nm * CV;
    TW acc[16];
#pragma unroll
    for (int e = 0; e < 16; ++e) acc[e] = TW(0);
    const int64_t cbase = chunk * kChunk;
    for (int jb = 0; jb < K; jb += 32) {
      const int n = min(32, K - jb);
      const int64_t my_i = lane < n ? ip[jb + lane] : 0;
      const TW my_w = lane < n ? wp[jb + lane] : TW(0);
#pragma unroll(sizeof(TW) == 8 ? 1 : 2)
      for (int jj = 0; jj < n; ++jj) {
        const int64_t vi = __shfl_sync(kFull, my_i, jj);
        const TW w = __shfl_sync(kFull, my_w, jj);
        const TV* vr = vb + vi * CV + cbase;
        if constexpr (kVec) {
#pragma unroll
          for (int u = 0; u < 4; ++u) {
            const int64_t c = u * 128 + lane * 4;
            if (cbase + c < CV) {
              float v[4];
              Vec4<TV>::load(vr + c, v);
#pragma unroll
              for (int e = 0; e < 4; ++e) acc[u * 4 + e] = fma_t(w, static_cast<TW>(v[e]), acc[u * 4 + e]);
            }
          }
        } else {
#pragma unroll
          for (int u = 0; u < 16; ++u) {
            const int64_t c = u * 32 + lane;
            if (cbase + c < CV) acc[u] = fma_t(w, load_t<TW>(vr + c), acc[u]);
          }
        }
      }
    }
    TW* op = out + row * CV + cbase;
    if constexpr (kVec) {
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int64_t c = u * 128 + lane * 4;
        if (cbase + c < CV) {
          if constexpr (sizeof(TW) == 4) {
            *reinterpret_cast<float4*>(op + c) = make_float4(acc[u * 4], acc[u * 4 + 1], acc[u * 4 + 2], acc[u * 4 + 3]);
          } else {
#pragma unroll
            for (int e = 0; e < 4; ++e) op[c + e] = acc[u * 4 + e];
          }
        }
      }
    } else {
#pragma unroll
      for (int u = 0; u < 16; ++u) {
        const int64_t c = u * 32 + lane;
        if (cbase + c < CV) op[c] = acc[u];
      }
    }
  }
}

// ------------------------------------------------------------------------------------------
// usage mode 2 (deterministic): keys = b·Nm + idx in (query, slot) order, stable sort,
// then a sequential sum per entry in query order
// ------------------------------------------------------------------------------------------
template <typename TW>
__global__ void usage_prep_kernel(const int64_t* __restrict__ index, const TW* __restrict__ weight,
                                  unsigned* __restrict__ keys, float* __restrict__ vals, int64_t N,
                                  int64_t per_batch, int64_t Nm) {
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < N;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    keys[p] = static_cast<unsigned>((p / per_batch) * Nm + index[p]);
    vals[p] = static_cast<float>(weight[p]);
  }
}

__global__ void usage_segsum_kernel(const unsigned* __restrict__ keys, const float* __restrict__ vals, int64_t N,
                                    float* usage, int64_t usb, int64_t usn, int64_t Nm) {
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < N;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const unsigned e = keys[p];
    if (p > 0 && keys[p - 1] == e) continue;
    const int64_t b = e / Nm, n = e - b * Nm;
    float* u = usage + b * usb + n * usn;
    float acc = *u;
    for (int64_t i = p; i < N && keys[i] == e; ++i) acc += vals[i];
    *u = acc;
  }
}

template <typename TW>
__global__ void usage_atomic_kernel(const int64_t* __restrict__ index, const TW* __restrict__ weight, int64_t N,
                                    int64_t per_batch, float* usage, int64_t usb, int64_t usn) {
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < N;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    atomicAdd(usage + (p / per_batch) * usb + index[p] * usn, static_cast<float>(weight[p]));
  }
}

// ------------------------------------------------------------------------------------------
// host side
// ------------------------------------------------------------------------------------------
inline size_t align256(size_t x) { return (x + 255) & ~static_cast<size_t>(255); }

struct Plan {
  bool fast = false;
  int splits = 1;
  int64_t split_rows = 0;
  int64_t smem = 0;
  bool sort_usage = false;
  int end_bit = 1;
  size_t part_off = 0, list_off = 0, keys_off = 0, keys2_off = 0, vals_off = 0, vals2_off = 0, cub_off = 0;
  size_t cub_bytes = 0, total = 0;
};

int sort_end_bit(int64_t entries) {  // bits of entries - 1 (at least 1)
  int bits = 1;
  while (bits < 32 && (static_cast<int64_t>(1) << bits) < entries) ++bits;
  return bits;
}

int make_plan(int64_t B, int64_t Nq, int64_t Nm, int64_t CK, int64_t K, Dtype key_dtype, int usage_mode,
              int device, Plan& p) {
  p = Plan();
  const int64_t smem = select_smem_bytes(CK, K);
  p.fast = key_dtype == Dtype::kFloat32 && K <= kMaxFastK && CK <= (1 << 20) &&
           smem <= max_dynamic_smem(device);
  size_t off = 0;
  if (p.fast) {
    p.smem = smem;
    int sms = 132;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
      cudaGetLastError();
      sms = 132;
    }
    int bps = 1;
    if (cudaFuncSetAttribute(topk_select_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             static_cast<int>(smem)) != cudaSuccess ||
        cudaOccupancyMaxActiveBlocksPerMultiprocessor(&bps, topk_select_kernel<true>, kThreads,
                                                      static_cast<size_t>(smem)) != cudaSuccess) {
      cudaGetLastError();
      bps = 1;
    }
    if (bps < 1) bps = 1;
    const int64_t q_blocks = (Nq + kBQ - 1) / kBQ * B;
    int64_t splits = static_cast<int64_t>(sms) * bps / q_blocks;        // one wave
    const int64_t by_rows = Nm / (4 * kBN);                              // >= 256 rows each
    splits = splits < by_rows ? splits : by_rows;
    splits = splits < kMaxSplits ? splits : kMaxSplits;
    if (splits < 1) splits = 1;
    int64_t rows = (Nm + splits - 1) / splits;
    rows = (rows + kBN - 1) / kBN * kBN;
    p.split_rows = rows;
    p.splits = static_cast<int>((Nm + rows - 1) / rows);
    p.part_off = off;
    off = align256(off + static_cast<size_t>(B) * p.splits * Nq * K * 8);
  } else {
    const size_t es = key_dtype == Dtype::kFloat64 ? 8 : 4;
    p.list_off = off;
    off = align256(off + static_cast<size_t>(B) * Nq * K * (es + 8) * 2);
  }
  if (usage_mode == 2 && B * Nm <= (static_cast<int64_t>(1) << 32)) {
    const int64_t N = B * Nq * K;
    p.sort_usage = true;
    p.end_bit = sort_end_bit(B * Nm);
    p.keys_off = off;
    off = align256(off + N * 4);
    p.keys2_off = off;
    off = align256(off + N * 4);
    p.vals_off = off;
    off = align256(off + N * 4);
    p.vals2_off = off;
    off = align256(off + N * 4);
    size_t tb = 0;
    cudaError_t err = cub::DeviceRadixSort::SortPairs(nullptr, tb, static_cast<const unsigned*>(nullptr),
                                                      static_cast<unsigned*>(nullptr),
                                                      static_cast<const float*>(nullptr),
                                                      static_cast<float*>(nullptr), N, 0, p.end_bit,
                                                      static_cast<cudaStream_t>(nullptr));
    if (err != cudaSuccess) return static_cast<int>(err);
    p.cub_off = off;
    p.cub_bytes = tb;
    off = align256(off + tb);
  }
  p.total = off > 0 ? off : 1;
  return 0;
}

int grid_for(int64_t items, int64_t per_block) {
  int64_t g = (items + per_block - 1) / per_block;
  if (g < 1) g = 1;
  return static_cast<int>(g < (1 << 20) ? g : (1 << 20));  // grid-stride loops cover the rest
}

template <typename TV, typename TW>
int launch_readout(const void* value, const int64_t* index, const TW* weight, TW* out, float* usage, int64_t usb,
                   int64_t usn, int usage_mode, int64_t B, int64_t Nq, int64_t Nm, int64_t CV, int K, bool vec,
                   cudaStream_t st) {
  const int64_t chunks = CV > 0 ? (CV + kChunk - 1) / kChunk : 1;
  const int grid = grid_for(B * Nq * chunks, 8);
  const TV* v = static_cast<const TV*>(value);
  bool use_vec = vec;
  if constexpr (sizeof(TV) == 8) use_vec = false;  // float64 values: scalar loads (test path)
  if (use_vec) {
    if constexpr (sizeof(TV) < 8)
      topk_readout_kernel<TV, TW, true><<<grid, 256, 0, st>>>(v, index, weight, out, usage, usb, usn, usage_mode, B,
                                                            Nq, Nm, CV, K);
  } else {
    topk_readout_kernel<TV, TW, false><<<grid, 256, 0, st>>>(v, index, weight, out, usage, usb, usn, usage_mode, B,
                                                             Nq, Nm, CV, K);
  }
  VOS_CUDA_CHECK_LAUNCH();
  return 0;
}

template <typename TW>
int launch_usage_weights(const Plan& p, const int64_t* index, const TW* weight, float* usage, int64_t usb,
                         int64_t usn, int64_t B, int64_t Nq, int64_t Nm, int64_t K, unsigned char* ws,
                         cudaStream_t st) {
  const int64_t N = B * Nq * K;
  const int grid = grid_for(N, 256);
  if (!p.sort_usage) {  // B·Nm ≥ 2^32 only: float atomics (order-dependent last bits)
    usage_atomic_kernel<TW><<<grid, 256, 0, st>>>(index, weight, N, Nq * K, usage, usb, usn);
    VOS_CUDA_CHECK_LAUNCH();
    return 0;
  }
  unsigned* keys = reinterpret_cast<unsigned*>(ws + p.keys_off);
  unsigned* keys2 = reinterpret_cast<unsigned*>(ws + p.keys2_off);
  float* vals = reinterpret_cast<float*>(ws + p.vals_off);
  float* vals2 = reinterpret_cast<float*>(ws + p.vals2_off);
  usage_prep_kernel<TW><<<grid, 256, 0, st>>>(index, weight, keys, vals, N, Nq * K, Nm);
  VOS_CUDA_CHECK_LAUNCH();
  size_t tb = p.cub_bytes;
  VOS_CUDA_TRY(cub::DeviceRadixSort::SortPairs(static_cast<void*>(ws + p.cub_off), tb,
                                               static_cast<const unsigned*>(keys), keys2,
                                               static_cast<const float*>(vals), vals2, N, 0, p.end_bit, st));
  VOS_CUDA_CHECK_LAUNCH();
  usage_segsum_kernel<<<grid, 256, 0, st>>>(keys2, vals2, N, usage, usb, usn, Nm);
  VOS_CUDA_CHECK_LAUNCH();
  return 0;
}

template <typename T>
int launch_general(const Plan& p, const void* query, const void* memory, int64_t B, int64_t Nq, int64_t Nm,
                   int64_t CK, int64_t K, double scale, int64_t* index, T* weight, unsigned char* ws,
                   cudaStream_t st) {
  const size_t n = static_cast<size_t>(B) * Nq * K;
  T* lv0 = reinterpret_cast<T*>(ws + p.list_off);
  T* lv1 = lv0 + n;
  int64_t* li0 = reinterpret_cast<int64_t*>(lv1 + n);  // n·sizeof(T)·2 bytes in: 8-aligned
  int64_t* li1 = li0 + n;
  const int grid = grid_for(B * Nq, 1);
  topk_general_kernel<T><<<grid, kGenThreads, 0, st>>>(static_cast<const T*>(query), static_cast<const T*>(memory), B,
                                                       Nq, Nm, CK, static_cast<int>(K), static_cast<T>(scale), lv0,
                                                       li0, lv1, li1, index, weight);
  VOS_CUDA_CHECK_LAUNCH();
  return 0;
}

}  // namespace

int64_t topk_memory_read_workspace_bytes(int64_t B, int64_t Nq, int64_t Nm, int64_t CK, int64_t K, Dtype key_dtype,
                                         int usage_mode, int device) {
  Plan p;
  if (make_plan(B, Nq, Nm, CK, K, key_dtype, usage_mode, device, p) != 0) return -1;
  return static_cast<int64_t>(p.total);
}

int topk_memory_read(const void* query_key, const void* memory_key, Dtype key_dtype, const void* memory_value,
                     Dtype value_dtype, MatmulPrecision precision, int64_t B, int64_t Nq, int64_t Nm, int64_t CK,
                     int64_t CV, int64_t K, double scale, float* usage, int64_t usage_sb, int64_t usage_sn,
                     int usage_mode, void* readout, int64_t* index, void* weight, void* workspace,
                     int64_t workspace_bytes, int device, void* stream) {
  if (B <= 0 || Nq <= 0) return 0;
  if (Nm <= 0 || K <= 0 || K > Nm || CK < 0 || CV < 0 || K > 2147483647 ||
      (key_dtype != Dtype::kFloat32 && key_dtype != Dtype::kFloat64) ||
      ((key_dtype == Dtype::kFloat64) != (value_dtype == Dtype::kFloat64)))
    return static_cast<int>(cudaErrorInvalidValue);
  if (usage == nullptr) usage_mode = 0;
  Plan p;
  VOS_CUDA_TRY(static_cast<cudaError_t>(make_plan(B, Nq, Nm, CK, K, key_dtype, usage_mode, device, p)));
  if (workspace_bytes < static_cast<int64_t>(p.total) || workspace == nullptr)
    return static_cast<int>(cudaErrorInvalidValue);
  cudaStream_t st = as_stream(stream);
  unsigned char* ws = static_cast<unsigned char*>(workspace);
  const int k = static_cast<int>(K);

  if (key_dtype == Dtype::kFloat64) {
    double* w = static_cast<double*>(weight);
    VOS_CUDA_TRY(static_cast<cudaError_t>(
        launch_general<double>(p, query_key, memory_key, B, Nq, Nm, CK, K, scale, index, w, ws, st)));
    VOS_CUDA_TRY(static_cast<cudaError_t>(launch_readout<double, double>(
        memory_value, index, w, static_cast<double*>(readout), usage, usage_sb, usage_sn, usage_mode, B, Nq, Nm,
        CV, k, false, st)));
    if (usage_mode == 2)
      VOS_CUDA_TRY(static_cast<cudaError_t>(
          launch_usage_weights<double>(p, index, w, usage, usage_sb, usage_sn, B, Nq, Nm, K, ws, st)));
    return 0;
  }

  float* w = static_cast<float*>(weight);
  if (p.fast) {
    long long* part = reinterpret_cast<long long*>(ws + p.part_off);
    const int64_t q_blocks = (Nq + kBQ - 1) / kBQ;
    const bool vec = CK % 4 == 0 && (reinterpret_cast<uintptr_t>(query_key) & 15) == 0 &&
                     (reinterpret_cast<uintptr_t>(memory_key) & 15) == 0;
    const bool three = precision == MatmulPrecision::kIEEE;
    auto kernel = three ? topk_select_kernel<true> : topk_select_kernel<false>;
    VOS_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(p.smem)));
    for (int64_t b0 = 0; b0 < B; b0 += 65535) {
      const int64_t nb = B - b0 < 65535 ? B - b0 : 65535;
      const dim3 grid(static_cast<unsigned>(q_blocks), static_cast<unsigned>(p.splits), static_cast<unsigned>(nb));
      kernel<<<grid, kThreads, static_cast<size_t>(p.smem), st>>>(
          static_cast<const float*>(query_key), static_cast<const float*>(memory_key), part, Nq, Nm,
          static_cast<int>(CK), k, static_cast<float>(scale), p.split_rows, p.splits, b0, vec);
      VOS_CUDA_CHECK_LAUNCH();
    }
    topk_merge_kernel<<<grid_for(B * Nq, 8), 256, 0, st>>>(part, index, w, B, Nq, k, p.splits);
    VOS_CUDA_CHECK_LAUNCH();
  } else {
    VOS_CUDA_TRY(static_cast<cudaError_t>(
        launch_general<float>(p, query_key, memory_key, B, Nq, Nm, CK, K, scale, index, w, ws, st)));
  }

  float* out = static_cast<float*>(readout);
  const bool out_aligned = (reinterpret_cast<uintptr_t>(readout) & 15) == 0;
  int rc = 0;
  switch (value_dtype) {
    case Dtype::kFloat32: {
      const bool vec = CV % 4 == 0 && out_aligned && (reinterpret_cast<uintptr_t>(memory_value) & 15) == 0;
      rc = launch_readout<float, float>(memory_value, index, w, out, usage, usage_sb, usage_sn, usage_mode, B, Nq, Nm,
                                        CV, k, vec, st);
      break;
    }
    case Dtype::kFloat16: {
      const bool vec = CV % 4 == 0 && out_aligned && (reinterpret_cast<uintptr_t>(memory_value) & 7) == 0;
      rc = launch_readout<__half, float>(memory_value, index, w, out, usage, usage_sb, usage_sn, usage_mode, B, Nq,
                                         Nm, CV, k, vec, st);
      break;
    }
    case Dtype::kBFloat16: {
      const bool vec = CV % 4 == 0 && out_aligned && (reinterpret_cast<uintptr_t>(memory_value) & 7) == 0;
      rc = launch_readout<__nv_bfloat16, float>(memory_value, index, w, out, usage, usage_sb, usage_sn, usage_mode,
                                                B, Nq, Nm, CV, k, vec, st);
      break;
    }
    default:
      return static_cast<int>(cudaErrorInvalidValue);
  }
  if (rc != 0) return rc;
  if (usage_mode == 2)
    VOS_CUDA_TRY(static_cast<cudaError_t>(
        launch_usage_weights<float>(p, index, w, usage, usage_sb, usage_sn, B, Nq, Nm, K, ws, st)));
  return 0;
}

}  // namespace cuda
}  // namespace vos
