// gmm_em's small-K path on the CPU (float32, K <= 16, N <= 768, N*C <= 65 536: PCAN's
// instance head, many RoI problems of 196 points). Called by gmm_em_impl in gmm.cpp.
//
// The kernels are templates on K, instantiated for K = 1 ... 16 and compiled for three
// targets (AVX-512, AVX2, baseline x86-64). That is most of the compile time of the CPU
// library, so the instantiations are spread over four translation units,
// gmm_small_k{01,05,09,13}.cpp (K 1-4, 5-8, 9-12, 13-16), which build in parallel. Each
// defines its entry point with VOS_GMM_SMALL_ENTRY; the code is the same in all of them and
// gives the same bits as before the split (same flags, same operations, same order).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VOS_GMM_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VOS_GMM_CLONES
#endif
#define VOS_GMM_INLINE __attribute__((always_inline)) inline

namespace vos_kernels {
namespace cpu {
namespace gmm_small {

// The reduced argument and the polynomial of exp_approx (gmm.cpp) for a float, and of its
// 16-lane version exp_v (below) for a vector: r = x - fx*ln2 in two parts, p(r) ~ e^r
// (Cephes expf coefficients); the caller multiplies by 2^n. The same operations in the same
// order for both types, so the two give the same bits.
template <typename V>
VOS_GMM_INLINE V exp_poly(V x, V fx) {
  V r = x - fx * 0.693359375f;
  r = r - fx * -2.12194440e-4f;
  V p = V{} + 1.9875691500e-4f;  // 0 + c: exactly c, as a scalar or in every lane
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * (r * r) + r + 1.0f;
}

constexpr int64_t kSmallMaxK = 16;
constexpr int64_t kSmallMaxNC = 65536;  // x of a problem <= 256 KiB: one tile of the BLAS path
constexpr int64_t kSmallMaxN = 768;     // <= 3 tiles of 256 rows: G = 1 on the BLAS path too, so
                                        // this path never gives up parallelism over groups

// The entry of each translation unit: K in [k0, k0 + 3].
#define VOS_GMM_SMALL_DECLARE(k0)                                                                                  \
  void em_small_problem_f32_k##k0(const float* x, const float* mask, float* mu, float* h, float* resp, int64_t N, \
                                  int64_t C, int64_t K, int64_t iters, float kappa, bool normalize, float* w,    \
                                  const float* next);
VOS_GMM_SMALL_DECLARE(1)
VOS_GMM_SMALL_DECLARE(5)
VOS_GMM_SMALL_DECLARE(9)
VOS_GMM_SMALL_DECLARE(13)
#undef VOS_GMM_SMALL_DECLARE

// One problem: x [N, C], mask [N] or null, mu [K, C] (in: initial means, out: final), h [K]
// (kappa/2 * |mu_k|^2 for the l2 kernel, updated; null for dot), resp [N, K] (out), w a
// 64-byte aligned workspace of SmallEmLayout(N, C, K).total floats, next the next problem's
// x (prefetched) or null. Returns false (and does nothing) when K is outside 1 ... 16.
inline bool em_small_problem_f32(const float* x, const float* mask, float* mu, float* h, float* resp, int64_t N,
                                 int64_t C, int64_t K, int64_t iters, float kappa, bool normalize, float* w,
                                 const float* next) {
  if (K < 1 || K > kSmallMaxK) return false;
  switch ((K - 1) / 4) {
    case 0: em_small_problem_f32_k1(x, mask, mu, h, resp, N, C, K, iters, kappa, normalize, w, next); break;
    case 1: em_small_problem_f32_k5(x, mask, mu, h, resp, N, C, K, iters, kappa, normalize, w, next); break;
    case 2: em_small_problem_f32_k9(x, mask, mu, h, resp, N, C, K, iters, kappa, normalize, w, next); break;
    default: em_small_problem_f32_k13(x, mask, mu, h, resp, N, C, K, iters, kappa, normalize, w, next); break;
  }
  return true;
}

inline bool em_small_path(bool is_float32, int64_t N, int64_t C, int64_t K) {
  return is_float32 && K >= 1 && K <= kSmallMaxK && N >= 1 && N <= kSmallMaxN && C >= 1 && N * C <= kSmallMaxNC;
}

struct SmallEmLayout {
  int64_t P, CP, xt, xr, mt, zp, A, mv, S, total;
  SmallEmLayout(int64_t N, int64_t C, int64_t K) {
    P = (N + 15) / 16;
    CP = (C + 15) / 16 * 16;
    auto up = [](int64_t n) { return (n + 15) / 16 * 16; };
    xt = 0;
    xr = xt + up(P * C * 16);
    mt = xr + (CP != C ? up(N * CP) : 0);
    zp = mt + up(C * K);
    A = zp + up(P * K * 16);
    mv = A + up(K * CP);
    S = mv + P * 16;
    total = S + K * 16;
  }
};

#ifdef VOS_GMM_SMALL_KERNELS
namespace {

// float32, K ≤ 16, N ≤ 768, N·C ≤ 65 536 (PCAN's instance head: many RoI problems of 196 points).
// One work item per problem runs all iterations (no finalize pass between them). Once per
// problem: xᵀ packed in panels of 16 points [P][C][16] (pad points 0), a mask vector
// (pads 0) and, when C % 16 ≠ 0, a row-major copy of x with C padded to CP. Per iteration:
//   E-step per panel, in registers: acc_k = Σ_c μ_kc·xᵀ_c (16 points along the lanes, c in
//     order, mul then add), l = kappa·acc − h, max over k, exp, Σ_k, ÷, × mask; z stored
//     [P][K][16], S_k summed in the 16 lanes (lane = point mod 16);
//   M-step: A [K, CP] = Σ_j z_kj·x_j (C along the lanes, K × NV vectors of accumulators
//     held over all N rows, rows in order);
//   finalize: S_k = lanes added in order, μ = A / (1e-6 + S), ‖μ‖ from 16 stripes.
// K is a template parameter (instantiated 1 … 16) inlined into one target_clones function;
// the summation order depends on the shapes only (reruns, thread counts: same bits).
typedef float v16f __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));

VOS_GMM_INLINE v16f vload(const float* p) {
  v16f v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}
VOS_GMM_INLINE void vstore(float* p, v16f v) { __builtin_memcpy(p, &v, sizeof v); }
VOS_GMM_INLINE v16f splat(float s) {
  v16f v;
  for (int u = 0; u < 16; ++u) v[u] = s;
  return v;
}

// exp_approx on 16 lanes: the same operations as the scalar version.
VOS_GMM_INLINE v16f exp_v(v16f x) {
  x = x < splat(-87.0f) ? splat(-87.0f) : x;  // NaN passes through both selects
  x = x > splat(88.0f) ? splat(88.0f) : x;
  const v16f y = x * 1.44269504088896341f + 12582912.0f;
  const v16f fx = y - 12582912.0f;
  const v16i n = (v16i)y - 0x4B400000;
  return exp_poly(x, fx) * (v16f)((v16u)(n + 127) << 23);
}

// In-register 16 × 16 transpose: four stages, stage b swaps bit b of the row and lane index.
constexpr int tr_lo(int j, int b) { return (j & b) ? 16 + (j & ~b) : j; }
constexpr int tr_hi(int j, int b) { return (j & b) ? 16 + j : (j | b); }
#define VOS_GMM_MASK16(f, b)                                                                            \
  v16i { f(0, b), f(1, b), f(2, b), f(3, b), f(4, b), f(5, b), f(6, b), f(7, b), f(8, b), f(9, b), f(10, b), \
         f(11, b), f(12, b), f(13, b), f(14, b), f(15, b) }
template <int b>
VOS_GMM_INLINE void transpose16_stage(v16f* r) {
  const v16i lo = VOS_GMM_MASK16(tr_lo, b);
  const v16i hi = VOS_GMM_MASK16(tr_hi, b);
  for (int i = 0; i < 16; ++i) {
    if (i & b) continue;
    const v16f a = r[i], c = r[i | b];
    r[i] = __builtin_shuffle(a, c, lo);
    r[i | b] = __builtin_shuffle(a, c, hi);
  }
}
VOS_GMM_INLINE void transpose16(v16f* r) {
  transpose16_stage<1>(r);
  transpose16_stage<2>(r);
  transpose16_stage<4>(r);
  transpose16_stage<8>(r);
}


// z [KK][16] of one panel and S += z; xt [C][16], mt [C][KK] (μᵀ).
template <int KK>
VOS_GMM_INLINE void em_small_estep(const float* xt, const float* mt, int64_t C, const float* h, float kappa,
                                   const float* mv, float* zp, float* S) {
  v16f acc[KK];
  for (int k = 0; k < KK; ++k) acc[k] = v16f{};
  for (int64_t c = 0; c < C; ++c) {
    const v16f xv = vload(xt + c * 16);
    const float* m = mt + c * KK;
    for (int k = 0; k < KK; ++k) acc[k] += xv * m[k];
  }
  v16f mx = splat(-std::numeric_limits<float>::infinity());
  for (int k = 0; k < KK; ++k) {
    const v16f l = h != nullptr ? acc[k] * kappa - h[k] : acc[k] * kappa;
    acc[k] = l;
    mx = l > mx ? l : mx;
  }
  v16f s = v16f{};
  for (int k = 0; k < KK; ++k) {
    const v16f e = exp_v(acc[k] - mx);
    acc[k] = e;
    s += e;
  }
  const v16f mk = vload(mv);
  for (int k = 0; k < KK; ++k) {
    const v16f z = acc[k] / s * mk;
    vstore(zp + k * 16, z);
    vstore(S + k * 16, vload(S + k * 16) + z);
  }
}

// A[k][c0 .. c0 + 16·NV) = Σ_j z_kj · x[j][c0 ..], j = 0 … N−1 in order.
template <int KK, int NV>
VOS_GMM_INLINE void em_small_mstep(const float* zp, const float* xr, int64_t ldx, int64_t N, int64_t c0, float* A,
                                   int64_t CP) {
  v16f acc[KK][NV];
  for (int k = 0; k < KK; ++k)
    for (int v = 0; v < NV; ++v) acc[k][v] = v16f{};
  for (int64_t p = 0; p * 16 < N; ++p) {
    const float* zb = zp + p * KK * 16;
    const int64_t m = std::min<int64_t>(16, N - p * 16);
    for (int64_t u = 0; u < m; ++u) {
      const float* xrow = xr + (p * 16 + u) * ldx + c0;
      v16f xv[NV];
      for (int v = 0; v < NV; ++v) xv[v] = vload(xrow + 16 * v);
      for (int k = 0; k < KK; ++k) {
        const float zk = zb[k * 16 + u];
        for (int v = 0; v < NV; ++v) acc[k][v] += xv[v] * zk;
      }
    }
  }
  for (int k = 0; k < KK; ++k)
    for (int v = 0; v < NV; ++v) vstore(A + k * CP + c0 + 16 * v, acc[k][v]);
}

VOS_GMM_INLINE float sq_norm16(const float* a, int64_t n16) {  // n16 a multiple of 16
  v16f acc = v16f{};
  for (int64_t c = 0; c < n16; c += 16) {
    const v16f v = vload(a + c);
    acc += v * v;
  }
  float s = acc[0];
  for (int u = 1; u < 16; ++u) s += acc[u];
  return s;
}

template <int KK>
VOS_GMM_INLINE void em_small_run(const float* x, const float* mask, float* mu, float* h, float* resp, int64_t N,
                                 int64_t C, int64_t iters, float kappa, bool normalize, float* w,
                                 const float* next) {
  const SmallEmLayout L(N, C, KK);
  const int64_t P = L.P, CP = L.CP;
  float* xt = w + L.xt;
  float* mt = w + L.mt;
  float* zp = w + L.zp;
  float* A = w + L.A;
  float* mv = w + L.mv;
  float* S = w + L.S;
  // pack xᵀ panels, the mask, the padded row-major copy, μᵀ
  const int64_t C16 = C / 16 * 16;
  for (int64_t p = 0; p < P; ++p) {
    float* d = xt + p * C * 16;
    const int64_t m = std::min<int64_t>(16, N - p * 16);
    const float* src = x + p * 16 * C;
    for (int64_t c0 = 0; c0 < C16; c0 += 16) {
      v16f r[16];
      for (int64_t u = 0; u < 16; ++u) r[u] = u < m ? vload(src + u * C + c0) : v16f{};
      transpose16(r);
      for (int t = 0; t < 16; ++t) vstore(d + (c0 + t) * 16, r[t]);
    }
    for (int64_t u = 0; u < 16; ++u)
      for (int64_t c = C16; c < C; ++c) d[c * 16 + u] = u < m ? src[u * C + c] : 0.0f;
    for (int64_t u = 0; u < 16; ++u) {
      const int64_t j = p * 16 + u;
      mv[j] = u >= m ? 0.0f : (mask != nullptr ? mask[j] : 1.0f);
    }
  }
  const float* xr = x;
  if (CP != C) {
    float* xp = w + L.xr;
    for (int64_t j = 0; j < N; ++j) {
      for (int64_t c = 0; c < C; ++c) xp[j * CP + c] = x[j * C + c];
      for (int64_t c = C; c < CP; ++c) xp[j * CP + c] = 0.0f;
    }
    xr = xp;
  }
  for (int64_t k = 0; k < KK; ++k)
    for (int64_t c = 0; c < C; ++c) mt[c * KK + k] = mu[k * C + c];
  constexpr int NV = KK <= 5 ? 4 : (KK <= 10 ? 2 : 1);
  const int64_t lines = (N * C * int64_t(sizeof(float)) + 63) / 64;
  const int64_t per = (lines + iters * P - 1) / (iters * P);
  int64_t pf = 0;
  for (int64_t it = 0; it < iters; ++it) {
    std::fill(S, S + KK * 16, 0.0f);
    for (int64_t p = 0; p < P; ++p) {
      em_small_estep<KK>(xt + p * C * 16, mt, C, h, kappa, mv + p * 16, zp + p * KK * 16, S);
      if (next != nullptr) {  // the next problem's x into L2, spread over all the panels
        const int64_t l1 = std::min(lines, pf + per);
        for (; pf < l1; ++pf) __builtin_prefetch(reinterpret_cast<const char*>(next) + pf * 64, 0, 2);
      }
    }
    if (it == iters - 1) {
      for (int64_t j = 0; j < N; ++j)
        for (int64_t k = 0; k < KK; ++k) resp[j * KK + k] = zp[(j / 16) * KK * 16 + k * 16 + j % 16];
    }
    int64_t c0 = 0;
    for (; c0 + 16 * NV <= CP; c0 += 16 * NV) em_small_mstep<KK, NV>(zp, xr, CP, N, c0, A, CP);
    for (; c0 < CP; c0 += 16) em_small_mstep<KK, 1>(zp, xr, CP, N, c0, A, CP);
    for (int64_t k = 0; k < KK; ++k) {
      float s = S[k * 16];
      for (int u = 1; u < 16; ++u) s += S[k * 16 + u];
      float* a = A + k * CP;
      const v16f den = splat(1e-6f + s);
      for (int64_t c = 0; c < CP; c += 16) vstore(a + c, vload(a + c) / den);
      if (normalize) {
        const v16f nd = splat(1e-6f + std::sqrt(sq_norm16(a, CP)));
        for (int64_t c = 0; c < CP; c += 16) vstore(a + c, vload(a + c) / nd);
      }
      if (h != nullptr) h[k] = kappa / 2.0f * sq_norm16(a, CP);
      for (int64_t c = 0; c < C; ++c) mt[c * KK + k] = a[c];
    }
  }
  for (int64_t k = 0; k < KK; ++k)
    for (int64_t c = 0; c < C; ++c) mu[k * C + c] = A[k * CP + c];
}

}  // namespace

// Defines em_small_problem_f32_k<k0> for K = k0 ... k0 + 3 (one translation unit each).
#define VOS_GMM_SMALL_ENTRY(k0)                                                                                   \
  VOS_GMM_CLONES void em_small_problem_f32_k##k0(const float* x, const float* mask, float* mu, float* h,         \
                                                 float* resp, int64_t N, int64_t C, int64_t K, int64_t iters,    \
                                                 float kappa, bool normalize, float* w, const float* next) {     \
    switch (K - (k0)) {                                                                                          \
      case 0: em_small_run<(k0)>(x, mask, mu, h, resp, N, C, iters, kappa, normalize, w, next); break;          \
      case 1: em_small_run<(k0) + 1>(x, mask, mu, h, resp, N, C, iters, kappa, normalize, w, next); break;      \
      case 2: em_small_run<(k0) + 2>(x, mask, mu, h, resp, N, C, iters, kappa, normalize, w, next); break;      \
      case 3: em_small_run<(k0) + 3>(x, mask, mu, h, resp, N, C, iters, kappa, normalize, w, next); break;      \
      default: break;                                                                                            \
    }                                                                                                            \
  }
#endif  // VOS_GMM_SMALL_KERNELS

}  // namespace gmm_small
}  // namespace cpu
}  // namespace vos_kernels
