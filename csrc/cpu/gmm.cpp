// CPU kernels of the GMM prototype ops (PCAN _em_iter / _prop, EMANet EMAU) and of
// A-GAME's diagonal Gaussians (fit, log-likelihood and their backward passes).
//
// Semantics (shared with every backend): docs/internals.md ("GMM prototypes and A-GAME
// Gaussians"), ../shared/spec/api.md and ../shared/spec/gmm.md.
//
// gmm_em, float32 with K ≤ 16, N ≤ 768, N·C ≤ 65 536 (PCAN's instance head): the small-K
// path (gmm_small.h, compiled in gmm_small_k*.cpp): one work item per problem running all
// iterations, x packed once per problem, hand-written register-blocked products (no BLAS).
// gmm_em otherwise: per iteration one read of x. The points of a batch element are cut into tiles
// of `tile` rows (≈ 256 KiB, L2-resident) and the tiles into G groups (G a function of
// the shapes only: ≤ 16 groups of ≥ 3 tiles). One work item = one (batch, group); items
// run in parallel (so a batch of small RoI problems parallelises over the batch, a single
// frame over groups of N). Per tile, with single-threaded BLAS inside the parallel region:
//   Zᵀ [K, rows] = μ · X_tileᵀ              (logits, points along the fast axis)
//   softmax over K per column, in cache     (max subtracted, vectorised exp, × mask)
//   A_g += Zᵀ · X_tile,  S_g += Σ_rows Zᵀ  (the M-step sums of the group)
// then, after the items, a finalize per (batch, k): A = Σ_g A_g, S = Σ_g S_g in group
// order, μ = A / (1e-6 + S), optional μ /= (1e-6 + ‖μ‖). The last iteration also writes
// resp [N, K] (the masked softmax, transposed back). The softmax is computed on columns
// of Zᵀ, so every loop over points is a vertical SIMD loop (no reassociation needed).
//
// prototype_values: per (batch, group) one GEMM Rᵀ·V over the group's rows, combined in
// group order, divided by 1e-6 + Σ r. prototype_attention: per query tile the logits GEMM,
// the same column softmax, a GEMM attn · values, attn transposed into [Nq, K].
//
// A-GAME: row loops over d (D = 512) for K components; sums over d use 16 fixed stripes
// (lane u takes d ≡ u mod 16, stripes added in order at the end) so that the compiler
// vectorises them without reassociation; sums over N use per-(batch, group) partials
// combined in group order. fit: pass 1 S, Σ w x; pass 2 Q = Σ w (x − μ)² (never the
// E[x²] − E[x]² expansion). log_prob works on (x − μ)²·(1/var). The backward passes
// follow docs/internals.md; fit's backward recomputes S and Q with the same code (bitwise
// the forward's values).
//
// Determinism: every sum has an order fixed by the shapes (tile, group and stripe
// boundaries never depend on the thread count), so reruns are bitwise equal, with any
// number of threads. Hot loops are compiled for AVX-512, AVX2 and baseline x86-64
// (target_clones); the three clones perform the same IEEE operations in the same order
// (-ffp-contract=off: no FMA contraction), so they give the same bits.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "gmm_small.h"  // VOS_GMM_CLONES, VOS_GMM_INLINE, the small-K path

namespace vos_kernels {
namespace cpu {
namespace {

using at::Tensor;

constexpr int64_t kLanes = 16;                        // stripes of the sums over d / over points
constexpr int64_t kMaxGroups = 16;                    // most groups of N per batch element
constexpr int64_t kMinTilesPerGroup = 3;              // fewer, larger groups for mid-size N
constexpr int64_t kTileBytes = int64_t(256) << 10;    // EM / attention tile of x: 256 KiB
constexpr int64_t kPartialBudget = int64_t(1) << 21;  // elements of per-group partials
constexpr int64_t kRowTile = 64;                      // A-GAME group granularity (rows)

// A fixed split of n rows into `groups` groups of whole tiles; a function of the shapes
// only, never of the thread count.
struct Split {
  int64_t n, tile, tiles, groups;
  Split(int64_t n_, int64_t tile_, int64_t max_groups) : n(n_), tile(tile_) {
    tiles = (n + tile - 1) / tile;
    groups = std::clamp<int64_t>((tiles + kMinTilesPerGroup - 1) / kMinTilesPerGroup, 1,
                                 std::max<int64_t>(1, max_groups));
  }
  int64_t begin(int64_t g) const { return std::min(n, (g * tiles / groups) * tile); }
  int64_t end(int64_t g) const { return begin(g + 1); }
};

int64_t max_groups_for(int64_t batch, int64_t partial_elems) {
  const int64_t per = std::max<int64_t>(1, batch * partial_elems);
  return std::clamp<int64_t>(kPartialBudget / per, 1, kMaxGroups);
}

template <typename T>
int64_t tile_rows(int64_t C) {
  const int64_t rows = kTileBytes / (std::max<int64_t>(C, 1) * int64_t(sizeof(T)));
  return std::clamp<int64_t>(rows / kLanes * kLanes, kLanes, 256);
}

template <typename T>
VOS_GMM_INLINE T sum_lanes(const T* acc) {
  T s = acc[0];
  for (int u = 1; u < kLanes; ++u) s += acc[u];
  return s;
}

// ------------------------------------------------------------------------ exp, softmax
// exp(x) for x ≤ 0 (after the max subtraction) or NaN: Cephes expf (range reduction by
// n·ln2 in two parts, degree-5 polynomial, 2ⁿ built from bits), < 2 ulp, NaN in → NaN
// out; written with branch-free selects and a magic-number rounding so that it
// vectorises on every target. Inputs below −87 give exp(−87) ≈ 1.6e-38 instead of a
// denormal or 0 (irrelevant next to the max term 1 of a softmax).
VOS_GMM_INLINE float exp_approx(float x) {
  x = x < -87.0f ? -87.0f : x;  // NaN passes through both selects
  x = x > 88.0f ? 88.0f : x;
  const float y = x * 1.44269504088896341f + 12582912.0f;  // 1.5·2²³: round to nearest
  const float fx = y - 12582912.0f;
  const int32_t n = std::bit_cast<int32_t>(y) - 0x4B400000;
  return gmm_small::exp_poly(x, fx) * std::bit_cast<float>(static_cast<int32_t>(static_cast<uint32_t>(n + 127) << 23));
}
VOS_GMM_INLINE double exp_approx(double x) { return std::exp(x); }

// Softmax over K of the columns of z [K, m] (row stride m), logits kappa·z − h_k
// (h = kappa/2·‖μ_k‖² for the l2 kernel, null for dot), max subtracted, divided by the
// column sum, then × mask[j] when mask is given. When s16 [K, 16] is given, adds the
// new column values into it (stripe j mod 16, j in order). cm, cs: m scratch values each.
template <typename T>
VOS_GMM_INLINE void softmax_cols_impl(T* z, int64_t K, int64_t m, T kappa, const T* h, const T* mask,
                                      T* s16, T* cm, T* cs) {
  for (int64_t j = 0; j < m; ++j) cm[j] = -std::numeric_limits<T>::infinity();
  for (int64_t k = 0; k < K; ++k) {
    T* row = z + k * m;
    if (h != nullptr) {
      const T hk = h[k];
      for (int64_t j = 0; j < m; ++j) {
        const T l = kappa * row[j] - hk;
        row[j] = l;
        cm[j] = l > cm[j] ? l : cm[j];
      }
    } else {
      for (int64_t j = 0; j < m; ++j) {
        const T l = kappa * row[j];
        row[j] = l;
        cm[j] = l > cm[j] ? l : cm[j];
      }
    }
  }
  for (int64_t j = 0; j < m; ++j) cs[j] = 0;
  for (int64_t k = 0; k < K; ++k) {
    T* row = z + k * m;
    for (int64_t j = 0; j < m; ++j) {
      const T e = exp_approx(row[j] - cm[j]);
      row[j] = e;
      cs[j] += e;
    }
  }
  for (int64_t k = 0; k < K; ++k) {
    T* row = z + k * m;
    T acc[kLanes];
    for (int u = 0; u < kLanes; ++u) acc[u] = 0;
    int64_t j = 0;
    if (mask != nullptr) {
      for (; j + kLanes <= m; j += kLanes) {
        for (int u = 0; u < kLanes; ++u) {
          const T v = row[j + u] / cs[j + u] * mask[j + u];
          row[j + u] = v;
          acc[u] += v;
        }
      }
      for (int u = 0; j + u < m; ++u) {
        const T v = row[j + u] / cs[j + u] * mask[j + u];
        row[j + u] = v;
        acc[u] += v;
      }
    } else {
      for (; j + kLanes <= m; j += kLanes) {
        for (int u = 0; u < kLanes; ++u) {
          const T v = row[j + u] / cs[j + u];
          row[j + u] = v;
          acc[u] += v;
        }
      }
      for (int u = 0; j + u < m; ++u) {
        const T v = row[j + u] / cs[j + u];
        row[j + u] = v;
        acc[u] += v;
      }
    }
    if (s16 != nullptr) {
      for (int u = 0; u < kLanes; ++u) s16[k * kLanes + u] += acc[u];
    }
  }
}

VOS_GMM_CLONES void softmax_cols_f32(float* z, int64_t K, int64_t m, float kappa, const float* h,
                                     const float* mask, float* s16, float* cm, float* cs) {
  softmax_cols_impl<float>(z, K, m, kappa, h, mask, s16, cm, cs);
}
VOS_GMM_CLONES void softmax_cols_f64(double* z, int64_t K, int64_t m, double kappa, const double* h,
                                     const double* mask, double* s16, double* cm, double* cs) {
  softmax_cols_impl<double>(z, K, m, kappa, h, mask, s16, cm, cs);
}
inline void softmax_cols(float* z, int64_t K, int64_t m, float kappa, const float* h, const float* mask,
                         float* s16, float* cm, float* cs) {
  softmax_cols_f32(z, K, m, kappa, h, mask, s16, cm, cs);
}
inline void softmax_cols(double* z, int64_t K, int64_t m, double kappa, const double* h, const double* mask,
                         double* s16, double* cm, double* cs) {
  softmax_cols_f64(z, K, m, kappa, h, mask, s16, cm, cs);
}

// --------------------------------------------------------------------------- GEMM tiles
// Column-major BLAS gemm: the Fortran sgemm_ / dgemm_ that torch's own CPU BLAS path calls
// (MKL in the official builds, OpenBLAS in others), declared weak: when the torch build
// exports none, the same product runs through at::mm_out / addmm_ on from_blob views.
// Inside at::parallel_for the BLAS runs single-threaded (one tile per call).
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
}

inline bool blas_ok(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc) {
  constexpr int64_t lim = std::numeric_limits<int>::max();
  return m <= lim && n <= lim && k <= lim && lda <= lim && ldb <= lim && ldc <= lim;
}

// C [m, n] (column-major, ldc == m) = op(A) [m, k] · op(B) [k, n] + beta · C, beta 0 or 1
template <typename T>
void gemm_cm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const T* a, int64_t lda, const T* b, int64_t ldb,
             T beta, T* c) {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (beta == T(0)) std::fill(c, c + m * n, T(0));
    return;
  }
  const int64_t ldc = m;
  auto* blas = [] {
    if constexpr (std::is_same_v<T, float>) {
      return sgemm_;
    } else {
      return dgemm_;
    }
  }();
  if (blas != nullptr && blas_ok(m, n, k, lda, ldb, ldc)) {
    const char tra = ta ? 'T' : 'N', trb = tb ? 'T' : 'N';
    const int im = int(m), in = int(n), ik = int(k), ilda = int(lda), ildb = int(ldb), ildc = int(ldc);
    const T one = 1;
    blas(&tra, &trb, &im, &in, &ik, &one, a, &ilda, b, &ildb, &beta, c, &ildc);
    return;
  }
  // row-major view: Cᵀ [n, m] = op(B)ᵀ [n, k] · op(A)ᵀ [k, m]
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const Tensor at_ = ta ? at::from_blob(const_cast<T*>(a), {m, k}, {lda, 1}, opts).t()
                        : at::from_blob(const_cast<T*>(a), {k, m}, {lda, 1}, opts);
  const Tensor bt = tb ? at::from_blob(const_cast<T*>(b), {k, n}, {ldb, 1}, opts).t()
                       : at::from_blob(const_cast<T*>(b), {n, k}, {ldb, 1}, opts);
  Tensor ct = at::from_blob(c, {n, m}, opts);
  if (beta == T(0)) {
    at::mm_out(ct, bt, at_);
  } else {
    ct.addmm_(bt, at_);
  }
}

// zt [K, m] (row stride m) = mu [K, C] · x [m, C]ᵀ
template <typename T>
void logits_t(const T* mu, const T* x, int64_t K, int64_t m, int64_t C, T* zt) {
  // column-major: ztᵀ [m, K] = x [m, C] · muᵀ [C, K]
  gemm_cm<T>(true, false, m, K, C, x, C, mu, C, T(0), zt);
}

// acc [K, C] (+)= zt [K, m] · x [m, C]
template <typename T>
void accumulate_zx(const T* zt, const T* x, int64_t K, int64_t m, int64_t C, T beta, T* acc) {
  // column-major: accᵀ [C, K] = xᵀ [C, m] · ztᵀ [m, K]
  gemm_cm<T>(false, false, C, K, m, x, C, zt, m, beta, acc);
}

// ------------------------------------------------------------------------------ gmm_em
template <typename T>
struct EmState {
  const T* x;     // [B, N, C]
  const T* mask;  // [B, N] or null
  T* mu;          // [B, K, C] current means (the output)
  T* h;           // [B, K] kappa/2·‖μ_k‖² (l2) or null
  T* A;           // [B, G, K, C] group partials of Σ z x
  T* S;           // [B, G, K, 16] group partials (stripes) of Σ z
  T* resp;        // [B, N, K]
  int64_t N, C, K;
  T kappa;
};

template <typename T>
void em_item(const EmState<T>& s, const Split& sp, int64_t b, int64_t g, bool last, std::vector<T>& buf) {
  const int64_t N = s.N, C = s.C, K = s.K, tile = sp.tile;
  const int64_t G = sp.groups;
  T* A = s.A + (b * G + g) * K * C;
  T* S = s.S + (b * G + g) * K * kLanes;
  std::fill(A, A + K * C, T(0));
  std::fill(S, S + K * kLanes, T(0));
  const int64_t n0 = sp.begin(g), n1 = sp.end(g);
  if (n0 == n1) return;
  buf.resize(K * tile + 2 * tile);
  T* zt = buf.data();
  T* cm = zt + K * tile;
  T* cs = cm + tile;
  const T* x = s.x + b * N * C;
  const T* mu = s.mu + b * K * C;
  const T* h = s.h != nullptr ? s.h + b * K : nullptr;
  const T* mask = s.mask != nullptr ? s.mask + b * N : nullptr;
  for (int64_t t0 = n0; t0 < n1; t0 += tile) {
    const int64_t m = std::min(tile, n1 - t0);
    const T* xt = x + t0 * C;
    logits_t<T>(mu, xt, K, m, C, zt);
    softmax_cols(zt, K, m, s.kappa, h, mask != nullptr ? mask + t0 : nullptr, S, cm, cs);
    accumulate_zx<T>(zt, xt, K, m, C, T(1), A);
    if (last) {
      T* r = s.resp + (b * N + t0) * K;
      for (int64_t j = 0; j < m; ++j)
        for (int64_t k = 0; k < K; ++k) r[j * K + k] = zt[k * m + j];
    }
  }
}

template <typename T>
T sq_norm(const T* v, int64_t n) {
  T acc = 0;
  for (int64_t i = 0; i < n; ++i) acc += v[i] * v[i];
  return acc;
}

template <typename T>
void em_finalize(const EmState<T>& s, const Split& sp, int64_t b, int64_t k, bool normalize) {
  const int64_t C = s.C, K = s.K, G = sp.groups;
  T S = 0;
  for (int64_t g = 0; g < G; ++g) {
    const T* sg = s.S + ((b * G + g) * K + k) * kLanes;
    for (int u = 0; u < kLanes; ++u) S += sg[u];
  }
  T* mu = s.mu + (b * K + k) * C;
  const T* a0 = s.A + (b * G * K + k) * C;
  for (int64_t c = 0; c < C; ++c) mu[c] = a0[c];
  for (int64_t g = 1; g < G; ++g) {
    const T* ag = s.A + ((b * G + g) * K + k) * C;
    for (int64_t c = 0; c < C; ++c) mu[c] += ag[c];
  }
  const T den = T(1e-6) + S;
  for (int64_t c = 0; c < C; ++c) mu[c] = mu[c] / den;
  if (normalize) {
    const T nd = T(1e-6) + std::sqrt(sq_norm(mu, C));
    for (int64_t c = 0; c < C; ++c) mu[c] = mu[c] / nd;
  }
  if (s.h != nullptr) s.h[b * K + k] = s.kappa / T(2) * sq_norm(mu, C);
}

std::tuple<Tensor, Tensor> gmm_em_impl(const Tensor& x_in, const Tensor& means_in, int64_t num_iters, double kappa,
                                       const std::optional<Tensor>& mask_in, int64_t kernel, bool normalize_means) {
  TORCH_CHECK(x_in.dim() == 3, "gmm_em: expected x [B,N,C], got ", x_in.sizes());
  TORCH_CHECK(means_in.dim() == 3 && means_in.size(0) == x_in.size(0) && means_in.size(2) == x_in.size(2),
              "gmm_em: expected means [B,K,C] with B, C of x ", x_in.sizes(), ", got ", means_in.sizes());
  const auto st = x_in.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble, "gmm_em (CPU): x must be float32 or float64, got ", st);
  TORCH_CHECK(means_in.scalar_type() == st, "gmm_em: means must have the dtype of x (", st, "), got ",
              means_in.scalar_type());
  TORCH_CHECK(num_iters >= 1, "gmm_em: num_iters must be >= 1, got ", num_iters);
  TORCH_CHECK(kernel == 0 || kernel == 1, "gmm_em: kernel must be 0 (dot) or 1 (l2), got ", kernel);
  TORCH_CHECK(std::isfinite(kappa), "gmm_em: kappa must be finite, got ", kappa);
  const int64_t B = x_in.size(0), N = x_in.size(1), C = x_in.size(2), K = means_in.size(1);
  Tensor mask;
  if (mask_in.has_value()) {
    TORCH_CHECK(mask_in->dim() == 2 && mask_in->size(0) == B && mask_in->size(1) == N,
                "gmm_em: expected mask [B,N] = [", B, ",", N, "], got ", mask_in->sizes());
    TORCH_CHECK(mask_in->scalar_type() == st, "gmm_em: mask must have the dtype of x (", st, "), got ",
                mask_in->scalar_type());
    mask = mask_in->contiguous();
  }
  const Tensor x = x_in.contiguous();
  Tensor mu = means_in.contiguous().clone();
  Tensor resp = at::empty({B, N, K}, x.options());
  if (B == 0 || K == 0) return {mu, resp};
  AT_DISPATCH_FLOATING_TYPES(st, "gmm_em_cpu", [&] {
    using T = scalar_t;
    if constexpr (std::is_same_v<T, float>) {
      if (gmm_small::em_small_path(true, N, C, K)) {
        std::vector<float> h(kernel == 1 ? B * K : 0);
        float* mup = mu.data_ptr<float>();
        const float kap = static_cast<float>(kappa);
        for (int64_t i = 0; i < (kernel == 1 ? B * K : 0); ++i) h[i] = kap / 2.0f * sq_norm(mup + i * C, C);
        const float* xp = x.data_ptr<float>();
        const float* mp = mask.defined() ? mask.data_ptr<float>() : nullptr;
        float* rp = resp.data_ptr<float>();
        const gmm_small::SmallEmLayout L(N, C, K);
        at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
          std::vector<float> work(L.total + 16);
          float* w = work.data();
          w += (16 - (reinterpret_cast<uintptr_t>(w) / sizeof(float)) % 16) % 16;  // 64-byte aligned
          for (int64_t b = b0; b < b1; ++b)
            gmm_small::em_small_problem_f32(xp + b * N * C, mp != nullptr ? mp + b * N : nullptr, mup + b * K * C,
                                            kernel == 1 ? h.data() + b * K : nullptr, rp + b * N * K, N, C, K,
                                            num_iters, kap, normalize_means, w,
                                            b + 1 < b1 ? xp + (b + 1) * N * C : nullptr);
        });
        return;
      }
    }
    const Split sp(N, tile_rows<T>(C), max_groups_for(B, K * (C + kLanes)));
    const int64_t G = sp.groups;
    std::vector<T> A(B * G * K * C), S(B * G * K * kLanes), h(kernel == 1 ? B * K : 0);
    EmState<T> s{x.data_ptr<T>(), mask.defined() ? mask.data_ptr<T>() : nullptr, mu.data_ptr<T>(),
                 kernel == 1 ? h.data() : nullptr, A.data(), S.data(), resp.data_ptr<T>(), N, C, K,
                 static_cast<T>(kappa)};
    if (kernel == 1) {
      for (int64_t i = 0; i < B * K; ++i) h[i] = s.kappa / T(2) * sq_norm(s.mu + i * C, C);
    }
    const int64_t fin_grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, G * C));
    for (int64_t it = 0; it < num_iters; ++it) {
      const bool last = it == num_iters - 1;
      at::parallel_for(0, B * G, 1, [&](int64_t i0, int64_t i1) {
        std::vector<T> buf;
        for (int64_t i = i0; i < i1; ++i) em_item<T>(s, sp, i / G, i % G, last, buf);
      });
      at::parallel_for(0, B * K, fin_grain, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) em_finalize<T>(s, sp, i / K, i % K, normalize_means);
      });
    }
  });
  return {mu, resp};
}

// -------------------------------------------------------------------- prototype_values
Tensor prototype_values_impl(const Tensor& values_in, const Tensor& resp_in) {
  TORCH_CHECK(values_in.dim() == 3 && resp_in.dim() == 3,
              "prototype_values: expected values [B,N,CV] and resp [B,N,K], got ", values_in.sizes(), " and ",
              resp_in.sizes());
  TORCH_CHECK(resp_in.size(0) == values_in.size(0) && resp_in.size(1) == values_in.size(1),
              "prototype_values: resp ", resp_in.sizes(), " does not match values ", values_in.sizes());
  const auto st = values_in.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble,
              "prototype_values (CPU): values must be float32 or float64, got ", st);
  TORCH_CHECK(resp_in.scalar_type() == st, "prototype_values: resp must have the dtype of values (", st,
              "), got ", resp_in.scalar_type());
  const int64_t B = values_in.size(0), N = values_in.size(1), CV = values_in.size(2), K = resp_in.size(2);
  const Tensor v = values_in.contiguous(), r = resp_in.contiguous();
  Tensor out = at::empty({B, K, CV}, v.options());
  if (B == 0 || K == 0 || CV == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(st, "prototype_values_cpu", [&] {
    using T = scalar_t;
    const Split sp(N, 256, max_groups_for(B, K * (CV + 1)));
    const int64_t G = sp.groups;
    std::vector<T> P(B * G * K * CV), S(B * G * K);
    const T* vp = v.data_ptr<T>();
    const T* rp = r.data_ptr<T>();
    at::parallel_for(0, B * G, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / G, g = i % G, n0 = sp.begin(g), n1 = sp.end(g);
        T* Pg = P.data() + i * K * CV;
        T* Sg = S.data() + i * K;
        std::fill(Sg, Sg + K, T(0));
        const T* rb = rp + (b * N + n0) * K;
        const T* vb = vp + (b * N + n0) * CV;
        if (n1 == n0) {
          std::fill(Pg, Pg + K * CV, T(0));
          continue;
        }
        // column-major: Pgᵀ [CV, K] = vᵀ [CV, n] · r [n, K]
        gemm_cm<T>(false, true, CV, K, n1 - n0, vb, CV, rb, K, T(0), Pg);
        for (int64_t n = 0; n < n1 - n0; ++n)
          for (int64_t k = 0; k < K; ++k) Sg[k] += rb[n * K + k];
      }
    });
    T* op = out.data_ptr<T>();
    at::parallel_for(0, B * K, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / K, k = i % K;
        T s = 0;
        for (int64_t g = 0; g < G; ++g) s += S[(b * G + g) * K + k];
        T* o = op + i * CV;
        const T* p0 = P.data() + (b * G * K + k) * CV;
        for (int64_t c = 0; c < CV; ++c) o[c] = p0[c];
        for (int64_t g = 1; g < G; ++g) {
          const T* pg = P.data() + ((b * G + g) * K + k) * CV;
          for (int64_t c = 0; c < CV; ++c) o[c] += pg[c];
        }
        const T den = T(1e-6) + s;
        for (int64_t c = 0; c < CV; ++c) o[c] = o[c] / den;
      }
    });
  });
  return out;
}

// ----------------------------------------------------------------- prototype_attention
std::tuple<Tensor, Tensor> prototype_attention_impl(const Tensor& query_in, const Tensor& keys_in,
                                                    const Tensor& values_in, double kappa, int64_t kernel) {
  TORCH_CHECK(query_in.dim() == 3 && keys_in.dim() == 3 && values_in.dim() == 3,
              "prototype_attention: expected query [B,Nq,C], proto_keys [B,K,C], proto_values [B,K,CV]");
  const int64_t B = query_in.size(0), Nq = query_in.size(1), C = query_in.size(2);
  const int64_t K = keys_in.size(1), CV = values_in.size(2);
  TORCH_CHECK(keys_in.size(0) == B && keys_in.size(2) == C && values_in.size(0) == B && values_in.size(1) == K,
              "prototype_attention: shapes do not agree: query ", query_in.sizes(), ", proto_keys ",
              keys_in.sizes(), ", proto_values ", values_in.sizes());
  const auto st = query_in.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble,
              "prototype_attention (CPU): query must be float32 or float64, got ", st);
  TORCH_CHECK(keys_in.scalar_type() == st && values_in.scalar_type() == st,
              "prototype_attention: proto_keys and proto_values must have the dtype of query (", st, ")");
  TORCH_CHECK(kernel == 0 || kernel == 1, "prototype_attention: kernel must be 0 (dot) or 1 (l2), got ", kernel);
  const Tensor q = query_in.contiguous(), mk = keys_in.contiguous(), mv = values_in.contiguous();
  Tensor out = at::empty({B, Nq, CV}, q.options());
  Tensor attn = at::empty({B, Nq, K}, q.options());
  if (B == 0 || Nq == 0) return {out, attn};
  if (K == 0) {
    out.zero_();
    return {out, attn};
  }
  AT_DISPATCH_FLOATING_TYPES(st, "prototype_attention_cpu", [&] {
    using T = scalar_t;
    const T kap = static_cast<T>(kappa);
    const int64_t tile = tile_rows<T>(C);
    const int64_t tiles = (Nq + tile - 1) / tile;
    const T* qp = q.data_ptr<T>();
    const T* kp = mk.data_ptr<T>();
    const T* vp = mv.data_ptr<T>();
    T* op = out.data_ptr<T>();
    T* ap = attn.data_ptr<T>();
    std::vector<T> h(kernel == 1 ? B * K : 0);
    for (int64_t i = 0; i < (kernel == 1 ? B * K : 0); ++i) h[i] = kap / T(2) * sq_norm(kp + i * C, C);
    at::parallel_for(0, B * tiles, 1, [&](int64_t i0, int64_t i1) {
      std::vector<T> buf(K * tile + 2 * tile);
      T* zt = buf.data();
      T* cm = zt + K * tile;
      T* cs = cm + tile;
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / tiles, t0 = (i % tiles) * tile, m = std::min(tile, Nq - t0);
        logits_t<T>(kp + b * K * C, qp + (b * Nq + t0) * C, K, m, C, zt);
        softmax_cols(zt, K, m, kap, kernel == 1 ? h.data() + b * K : nullptr, static_cast<const T*>(nullptr),
                     static_cast<T*>(nullptr), cm, cs);
        T* a = ap + (b * Nq + t0) * K;
        for (int64_t j = 0; j < m; ++j)
          for (int64_t k = 0; k < K; ++k) a[j * K + k] = zt[k * m + j];
        if (CV > 0) {
          // column-major: outᵀ [CV, m] = vᵀ [CV, K] · zt [K, m]
          gemm_cm<T>(false, true, CV, m, K, vp + b * K * CV, CV, zt, m, T(0), op + (b * Nq + t0) * CV);
        }
      }
    });
  });
  return {out, attn};
}

// ------------------------------------------------------------------ A-GAME: row loops
// Σ_d stripes: lane u takes d ≡ u (mod 16), in increasing d; the tail continues the lanes.

// out[r, k] = −½ (lsum_k + Σ_d (x_rd − μ_kd)² · iv_kd), rows [r0, r1)
template <typename T>
VOS_GMM_INLINE void logprob_rows_impl(const T* x, const T* mu, const T* iv, const T* lsum, T* out, int64_t r0,
                                      int64_t r1, int64_t K, int64_t D) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * D;
    int64_t k = 0;
    for (; k + 4 <= K; k += 4) {  // four components per sweep: independent accumulators
      T acc[4][kLanes];
      for (int c = 0; c < 4; ++c)
        for (int u = 0; u < kLanes; ++u) acc[c][u] = 0;
      int64_t d = 0;
      for (; d + kLanes <= D; d += kLanes) {
        for (int c = 0; c < 4; ++c) {
          const T* m = mu + (k + c) * D + d;
          const T* v = iv + (k + c) * D + d;
          for (int u = 0; u < kLanes; ++u) {
            const T t = xr[d + u] - m[u];
            acc[c][u] += t * t * v[u];
          }
        }
      }
      for (int c = 0; c < 4; ++c) {
        const T* m = mu + (k + c) * D;
        const T* v = iv + (k + c) * D;
        for (int u = 0; d + u < D; ++u) {
          const T t = xr[d + u] - m[d + u];
          acc[c][u] += t * t * v[d + u];
        }
        out[r * K + k + c] = T(-0.5) * (lsum[k + c] + sum_lanes(acc[c]));
      }
    }
    for (; k < K; ++k) {
      T acc[kLanes];
      for (int u = 0; u < kLanes; ++u) acc[u] = 0;
      const T* m = mu + k * D;
      const T* v = iv + k * D;
      int64_t d = 0;
      for (; d + kLanes <= D; d += kLanes) {
        for (int u = 0; u < kLanes; ++u) {
          const T t = xr[d + u] - m[d + u];
          acc[u] += t * t * v[d + u];
        }
      }
      for (int u = 0; d + u < D; ++u) {
        const T t = xr[d + u] - m[d + u];
        acc[u] += t * t * v[d + u];
      }
      out[r * K + k] = T(-0.5) * (lsum[k] + sum_lanes(acc));
    }
  }
}

// grad_x rows and the group partials P1 += g t, P2 += g (1 − t² iv), t = x − μ
template <typename T>
VOS_GMM_INLINE void logprob_bwd_rows_impl(const T* g, const T* x, const T* mu, const T* iv, T* gx, T* P1, T* P2,
                                          int64_t r0, int64_t r1, int64_t K, int64_t D) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * D;
    T* gxr = gx + r * D;
    for (int64_t d = 0; d < D; ++d) gxr[d] = 0;
    for (int64_t k = 0; k < K; ++k) {
      const T gk = g[r * K + k];
      const T* m = mu + k * D;
      const T* v = iv + k * D;
      T* p1 = P1 + k * D;
      T* p2 = P2 + k * D;
      for (int64_t d = 0; d < D; ++d) {
        const T t = xr[d] - m[d];
        const T gt = gk * t;
        p1[d] += gt;
        p2[d] += gk * (T(1) - t * t * v[d]);
        gxr[d] += gt * v[d];
      }
    }
    for (int64_t d = 0; d < D; ++d) gxr[d] = -gxr[d];
  }
}

// fit pass 1: S_k += w, M_kd += w x;  pass 2 (and fit backward pass 1): S_k += w (when
// S is given), Q_kd += w (x − μ)²
template <typename T>
VOS_GMM_INLINE void fit_moment_rows_impl(const T* x, const T* w, T* S, T* M, int64_t r0, int64_t r1, int64_t K,
                                         int64_t D) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * D;
    for (int64_t k = 0; k < K; ++k) {
      const T wk = w[r * K + k];
      S[k] += wk;
      T* mk = M + k * D;
      for (int64_t d = 0; d < D; ++d) mk[d] += wk * xr[d];
    }
  }
}

template <typename T>
VOS_GMM_INLINE void fit_q_rows_impl(const T* x, const T* w, const T* mu, T* S, T* Q, int64_t r0, int64_t r1,
                                    int64_t K, int64_t D) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * D;
    for (int64_t k = 0; k < K; ++k) {
      const T wk = w[r * K + k];
      if (S != nullptr) S[k] += wk;
      const T* m = mu + k * D;
      T* qk = Q + k * D;
      for (int64_t d = 0; d < D; ++d) {
        const T t = xr[d] - m[d];
        qk[d] += wk * (t * t);
      }
    }
  }
}

// fit backward pass 2: grad_x_rd = Σ_k w_rk a_k (P_kd + 2 gv_kd t), grad_w_rk =
// a_k Σ_d [P_kd t + gv_kd (t² − aQ_kd)], t = x_rd − μ_kd (P = gμ − 2 a μ gv)
template <typename T>
VOS_GMM_INLINE void fit_bwd_rows_impl(const T* x, const T* w, const T* mu, const T* a, const T* P, const T* V,
                                      const T* V2, const T* AQ, T* gx, T* gw, int64_t r0, int64_t r1, int64_t K,
                                      int64_t D) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * D;
    T* gxr = gx + r * D;
    for (int64_t d = 0; d < D; ++d) gxr[d] = 0;
    for (int64_t k = 0; k < K; ++k) {
      const T c = w[r * K + k] * a[k];
      const T* m = mu + k * D;
      const T* p = P + k * D;
      const T* v = V + k * D;
      const T* v2 = V2 + k * D;
      const T* aq = AQ + k * D;
      T acc[kLanes];
      for (int u = 0; u < kLanes; ++u) acc[u] = 0;
      int64_t d = 0;
      for (; d + kLanes <= D; d += kLanes) {
        for (int u = 0; u < kLanes; ++u) {
          const T t = xr[d + u] - m[d + u];
          gxr[d + u] += c * (p[d + u] + v2[d + u] * t);
          acc[u] += p[d + u] * t + v[d + u] * (t * t - aq[d + u]);
        }
      }
      for (int u = 0; d + u < D; ++u) {
        const T t = xr[d + u] - m[d + u];
        gxr[d + u] += c * (p[d + u] + v2[d + u] * t);
        acc[u] += p[d + u] * t + v[d + u] * (t * t - aq[d + u]);
      }
      gw[r * K + k] = a[k] * sum_lanes(acc);
    }
  }
}

// target_clones entry points, float32 and float64
#define VOS_GMM_ROW_KERNELS(T, SUF)                                                                              \
  VOS_GMM_CLONES void logprob_rows_##SUF(const T* x, const T* mu, const T* iv, const T* lsum, T* out, int64_t r0, \
                                         int64_t r1, int64_t K, int64_t D) {                                    \
    logprob_rows_impl<T>(x, mu, iv, lsum, out, r0, r1, K, D);                                                    \
  }                                                                                                              \
  VOS_GMM_CLONES void logprob_bwd_rows_##SUF(const T* g, const T* x, const T* mu, const T* iv, T* gx, T* P1,     \
                                             T* P2, int64_t r0, int64_t r1, int64_t K, int64_t D) {              \
    logprob_bwd_rows_impl<T>(g, x, mu, iv, gx, P1, P2, r0, r1, K, D);                                            \
  }                                                                                                              \
  VOS_GMM_CLONES void fit_moment_rows_##SUF(const T* x, const T* w, T* S, T* M, int64_t r0, int64_t r1,          \
                                            int64_t K, int64_t D) {                                              \
    fit_moment_rows_impl<T>(x, w, S, M, r0, r1, K, D);                                                           \
  }                                                                                                              \
  VOS_GMM_CLONES void fit_q_rows_##SUF(const T* x, const T* w, const T* mu, T* S, T* Q, int64_t r0, int64_t r1,  \
                                       int64_t K, int64_t D) {                                                   \
    fit_q_rows_impl<T>(x, w, mu, S, Q, r0, r1, K, D);                                                            \
  }                                                                                                              \
  VOS_GMM_CLONES void fit_bwd_rows_##SUF(const T* x, const T* w, const T* mu, const T* a, const T* P,            \
                                         const T* V, const T* V2, const T* AQ, T* gx, T* gw, int64_t r0,         \
                                         int64_t r1, int64_t K, int64_t D) {                                     \
    fit_bwd_rows_impl<T>(x, w, mu, a, P, V, V2, AQ, gx, gw, r0, r1, K, D);                                       \
  }

VOS_GMM_ROW_KERNELS(float, f32)
VOS_GMM_ROW_KERNELS(double, f64)
#undef VOS_GMM_ROW_KERNELS

template <typename T>
struct Rows;
template <>
struct Rows<float> {
  static constexpr auto logprob = logprob_rows_f32;
  static constexpr auto logprob_bwd = logprob_bwd_rows_f32;
  static constexpr auto fit_moment = fit_moment_rows_f32;
  static constexpr auto fit_q = fit_q_rows_f32;
  static constexpr auto fit_bwd = fit_bwd_rows_f32;
};
template <>
struct Rows<double> {
  static constexpr auto logprob = logprob_rows_f64;
  static constexpr auto logprob_bwd = logprob_bwd_rows_f64;
  static constexpr auto fit_moment = fit_moment_rows_f64;
  static constexpr auto fit_q = fit_q_rows_f64;
  static constexpr auto fit_bwd = fit_bwd_rows_f64;
};

// Σ_g part[b, g, :n] in group order into out[:n]
template <typename T>
void sum_groups(const T* part, int64_t G, int64_t n, T* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = part[i];
  for (int64_t g = 1; g < G; ++g)
    for (int64_t i = 0; i < n; ++i) out[i] += part[g * n + i];
}

// Sums over the N rows of each batch element, W values wide, in an order fixed by the
// shapes: the rows are split into groups (Split over kRowTile tiles), one parallel item
// per (batch, group) calls rows(b, begin, end, part) on a zeroed part[W], then per batch
// element done(b, sum) receives Σ_g part in group order.
template <typename T, typename RowsFn, typename DoneFn>
void grouped_row_sums(int64_t B, int64_t N, int64_t W, const RowsFn& rows, const DoneFn& done) {
  const Split sp(N, kRowTile, max_groups_for(B, W));
  const int64_t G = sp.groups;
  std::vector<T> part(B * G * W);
  at::parallel_for(0, B * G, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      T* ps = part.data() + i * W;
      std::fill(ps, ps + W, T(0));
      rows(i / G, sp.begin(i % G), sp.end(i % G), ps);
    }
  });
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    std::vector<T> tmp(W);
    for (int64_t b = b0; b < b1; ++b) {
      sum_groups(part.data() + b * G * W, G, W, tmp.data());
      done(b, tmp.data());
    }
  });
}

void check_agame(const char* op, const Tensor& x, const Tensor& mean, const Tensor* var) {
  TORCH_CHECK(x.dim() == 3, op, ": expected x [B,N,D], got ", x.sizes());
  TORCH_CHECK(mean.dim() == 3 && mean.size(0) == x.size(0) && mean.size(2) == x.size(2), op,
              ": expected mean [B,K,D] with B, D of x ", x.sizes(), ", got ", mean.sizes());
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble, op, " (CPU): x must be float32 or float64, got ", st);
  TORCH_CHECK(mean.scalar_type() == st, op, ": mean must have the dtype of x (", st, "), got ", mean.scalar_type());
  if (var != nullptr) {
    TORCH_CHECK(var->sizes() == mean.sizes(), op, ": var ", var->sizes(), " must have the shape of mean ",
                mean.sizes());
    TORCH_CHECK(var->scalar_type() == st, op, ": var must have the dtype of x (", st, "), got ",
                var->scalar_type());
  }
}

// per batch: iv = 1 / var, lsum_k = Σ_d log var_kd (d in order)
template <typename T>
void inverse_and_logsum(const T* var, int64_t BK, int64_t D, std::vector<T>& iv, std::vector<T>& lsum) {
  iv.resize(BK * D);
  lsum.resize(BK);
  at::parallel_for(0, BK, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      T s = 0;
      for (int64_t d = 0; d < D; ++d) {
        iv[i * D + d] = T(1) / var[i * D + d];
        s += std::log(var[i * D + d]);
      }
      lsum[i] = s;
    }
  });
}

// ------------------------------------------------------------------- diag_gmm_log_prob
Tensor diag_gmm_log_prob_impl(const Tensor& x_in, const Tensor& mean_in, const Tensor& var_in) {
  check_agame("diag_gmm_log_prob", x_in, mean_in, &var_in);
  const int64_t B = x_in.size(0), N = x_in.size(1), D = x_in.size(2), K = mean_in.size(1);
  const Tensor x = x_in.contiguous(), mean = mean_in.contiguous(), var = var_in.contiguous();
  Tensor out = at::empty({B, N, K}, x.options());
  if (B * N * K == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "diag_gmm_log_prob_cpu", [&] {
    using T = scalar_t;
    std::vector<T> iv, lsum;
    inverse_and_logsum<T>(var.data_ptr<T>(), B * K, D, iv, lsum);
    const T* xp = x.data_ptr<T>();
    const T* mp = mean.data_ptr<T>();
    T* op = out.data_ptr<T>();
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, K * D));
    at::parallel_for(0, B * N, grain, [&](int64_t i0, int64_t i1) {
      while (i0 < i1) {  // row ranges within one batch element
        const int64_t b = i0 / N, r0 = i0 % N, r1 = std::min(N, r0 + (i1 - i0));
        Rows<T>::logprob(xp + b * N * D, mp + b * K * D, iv.data() + b * K * D, lsum.data() + b * K, op + b * N * K,
                         r0, r1, K, D);
        i0 += r1 - r0;
      }
    });
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor> diag_gmm_log_prob_backward_impl(const Tensor& grad_in, const Tensor& x_in,
                                                                   const Tensor& mean_in, const Tensor& var_in) {
  check_agame("diag_gmm_log_prob_backward", x_in, mean_in, &var_in);
  const int64_t B = x_in.size(0), N = x_in.size(1), D = x_in.size(2), K = mean_in.size(1);
  TORCH_CHECK(grad_in.dim() == 3 && grad_in.size(0) == B && grad_in.size(1) == N && grad_in.size(2) == K,
              "diag_gmm_log_prob_backward: expected grad [B,N,K] = [", B, ",", N, ",", K, "], got ", grad_in.sizes());
  TORCH_CHECK(grad_in.scalar_type() == x_in.scalar_type(), "diag_gmm_log_prob_backward: grad must have the dtype of x (",
              x_in.scalar_type(), "), got ", grad_in.scalar_type());
  const Tensor g = grad_in.contiguous(), x = x_in.contiguous(), mean = mean_in.contiguous(),
               var = var_in.contiguous();
  Tensor gx = at::empty_like(x), gm = at::empty_like(mean), gv = at::empty_like(mean);
  if (B == 0) return {gx, gm, gv};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "diag_gmm_log_prob_backward_cpu", [&] {
    using T = scalar_t;
    std::vector<T> iv, lsum;
    inverse_and_logsum<T>(var.data_ptr<T>(), B * K, D, iv, lsum);
    const int64_t KD = K * D;
    const T* gp = g.data_ptr<T>();
    const T* xp = x.data_ptr<T>();
    const T* mp = mean.data_ptr<T>();
    T* gxp = gx.data_ptr<T>();
    T* gmp = gm.data_ptr<T>();
    T* gvp = gv.data_ptr<T>();
    grouped_row_sums<T>(
        B, N, 2 * KD,
        [&](int64_t b, int64_t n0, int64_t n1, T* part) {
          Rows<T>::logprob_bwd(gp + b * N * K, xp + b * N * D, mp + b * KD, iv.data() + b * KD, gxp + b * N * D,
                               part, part + KD, n0, n1, K, D);
        },
        [&](int64_t b, const T* sum) {
          const T* v = iv.data() + b * KD;
          for (int64_t i = 0; i < KD; ++i) {
            gmp[b * KD + i] = v[i] * sum[i];
            gvp[b * KD + i] = T(-0.5) * v[i] * sum[KD + i];
          }
        });
  });
  return {gx, gm, gv};
}

// ------------------------------------------------------------------------ diag_gmm_fit
void check_fit(const char* op, const Tensor& x, const Tensor& w) {
  TORCH_CHECK(x.dim() == 3, op, ": expected x [B,N,D], got ", x.sizes());
  TORCH_CHECK(w.dim() == 3 && w.size(0) == x.size(0) && w.size(1) == x.size(1), op,
              ": expected weights [B,N,K] with B, N of x ", x.sizes(), ", got ", w.sizes());
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble, op, " (CPU): x must be float32 or float64, got ", st);
  TORCH_CHECK(w.scalar_type() == st, op, ": weights must have the dtype of x (", st, "), got ", w.scalar_type());
}

// S [B, K] and Q [B, K, D] = Σ_n w (x − μ)², in the fixed group order (shared by the fit
// and its backward so that both see the same bits)
template <typename T>
void fit_s_q(const T* xp, const T* wp, const T* mp, int64_t B, int64_t N, int64_t K, int64_t D, T* S, T* Q,
             bool want_s) {
  const int64_t KD = K * D;
  grouped_row_sums<T>(
      B, N, K + KD,
      [&](int64_t b, int64_t n0, int64_t n1, T* part) {
        Rows<T>::fit_q(xp + b * N * D, wp + b * N * K, mp + b * KD, want_s ? part : nullptr, part + K, n0, n1, K, D);
      },
      [&](int64_t b, const T* sum) {
        if (want_s) std::copy(sum, sum + K, S + b * K);
        std::copy(sum + K, sum + K + KD, Q + b * KD);
      });
}

// S [B, K] = Σ_n w, M [B, K, D] = Σ_n w x
template <typename T>
void fit_s_m(const T* xp, const T* wp, int64_t B, int64_t N, int64_t K, int64_t D, T* S, T* M) {
  const int64_t KD = K * D;
  grouped_row_sums<T>(
      B, N, K + KD,
      [&](int64_t b, int64_t n0, int64_t n1, T* part) {
        Rows<T>::fit_moment(xp + b * N * D, wp + b * N * K, part, part + K, n0, n1, K, D);
      },
      [&](int64_t b, const T* sum) {
        std::copy(sum, sum + K, S + b * K);
        std::copy(sum + K, sum + K + KD, M + b * KD);
      });
}

std::tuple<Tensor, Tensor> diag_gmm_fit_impl(const Tensor& x_in, const Tensor& w_in, const Tensor& var_reg_in) {
  check_fit("diag_gmm_fit", x_in, w_in);
  const int64_t B = x_in.size(0), N = x_in.size(1), D = x_in.size(2), K = w_in.size(2);
  TORCH_CHECK(var_reg_in.dim() == 2 && var_reg_in.size(0) == K && var_reg_in.size(1) == D,
              "diag_gmm_fit: expected var_reg [K,D] = [", K, ",", D, "], got ", var_reg_in.sizes());
  TORCH_CHECK(var_reg_in.scalar_type() == x_in.scalar_type(), "diag_gmm_fit: var_reg must have the dtype of x (",
              x_in.scalar_type(), "), got ", var_reg_in.scalar_type());
  const Tensor x = x_in.contiguous(), w = w_in.contiguous(), vr = var_reg_in.contiguous();
  Tensor mean = at::empty({B, K, D}, x.options()), var = at::empty({B, K, D}, x.options());
  if (B * K * D == 0) return {mean, var};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "diag_gmm_fit_cpu", [&] {
    using T = scalar_t;
    const int64_t KD = K * D;
    std::vector<T> S(B * K);
    const T* xp = x.data_ptr<T>();
    const T* wp = w.data_ptr<T>();
    const T* vrp = vr.data_ptr<T>();
    T* mp = mean.data_ptr<T>();
    T* vp = var.data_ptr<T>();
    fit_s_m<T>(xp, wp, B, N, K, D, S.data(), mp);  // mean holds Σ w x
    for (int64_t b = 0; b < B; ++b)
      for (int64_t k = 0; k < K; ++k) {
        const T den = T(1) + S[b * K + k];
        T* m = mp + (b * K + k) * D;
        for (int64_t d = 0; d < D; ++d) m[d] = m[d] / den;
      }
    fit_s_q<T>(xp, wp, mp, B, N, K, D, nullptr, vp, false);  // var holds Q
    for (int64_t b = 0; b < B; ++b)
      for (int64_t k = 0; k < K; ++k) {
        const T den = T(1) + S[b * K + k];
        T* v = vp + (b * K + k) * D;
        for (int64_t d = 0; d < D; ++d) v[d] = vrp[k * D + d] + v[d] / den;
      }
    (void)KD;
  });
  return {mean, var};
}

std::tuple<Tensor, Tensor> diag_gmm_fit_backward_impl(const Tensor& grad_mean_in, const Tensor& grad_var_in,
                                                      const Tensor& x_in, const Tensor& w_in, const Tensor& mean_in) {
  check_fit("diag_gmm_fit_backward", x_in, w_in);
  const int64_t B = x_in.size(0), N = x_in.size(1), D = x_in.size(2), K = w_in.size(2);
  const auto st = x_in.scalar_type();
  for (const Tensor* t : {&grad_mean_in, &grad_var_in, &mean_in}) {
    TORCH_CHECK(t->dim() == 3 && t->size(0) == B && t->size(1) == K && t->size(2) == D,
                "diag_gmm_fit_backward: expected grad_mean, grad_var and mean [B,K,D] = [", B, ",", K, ",", D,
                "], got ", t->sizes());
    TORCH_CHECK(t->scalar_type() == st, "diag_gmm_fit_backward: grad_mean, grad_var and mean must have the dtype "
                "of x (", st, "), got ", t->scalar_type());
  }
  const Tensor gmu = grad_mean_in.contiguous(), gvar = grad_var_in.contiguous(), x = x_in.contiguous(),
               w = w_in.contiguous(), mean = mean_in.contiguous();
  Tensor gx = at::empty_like(x), gw = at::empty_like(w);
  if (B * N == 0) return {gx, gw};
  if (K == 0) {
    gx.zero_();
    return {gx, gw};
  }
  AT_DISPATCH_FLOATING_TYPES(st, "diag_gmm_fit_backward_cpu", [&] {
    using T = scalar_t;
    const int64_t KD = K * D;
    const T* xp = x.data_ptr<T>();
    const T* wp = w.data_ptr<T>();
    const T* mp = mean.data_ptr<T>();
    std::vector<T> S(B * K), Q(B * KD);
    fit_s_q<T>(xp, wp, mp, B, N, K, D, S.data(), Q.data(), true);
    // per (b, k, d): a, P = gμ − 2 a μ gv, V = gv, V2 = 2 gv, AQ = a Q
    std::vector<T> a(B * K), P(B * KD), V2(B * KD), AQ(B * KD);
    const T* gmp = gmu.data_ptr<T>();
    const T* gvp = gvar.data_ptr<T>();
    for (int64_t i = 0; i < B * K; ++i) {
      const T ak = T(1) / (T(1) + S[i]);
      a[i] = ak;
      for (int64_t d = 0; d < D; ++d) {
        const int64_t j = i * D + d;
        P[j] = gmp[j] - T(2) * ak * mp[j] * gvp[j];
        V2[j] = T(2) * gvp[j];
        AQ[j] = ak * Q[j];
      }
    }
    T* gxp = gx.data_ptr<T>();
    T* gwp = gw.data_ptr<T>();
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, KD));
    at::parallel_for(0, B * N, grain, [&](int64_t i0, int64_t i1) {
      while (i0 < i1) {
        const int64_t b = i0 / N, r0 = i0 % N, r1 = std::min(N, r0 + (i1 - i0));
        Rows<T>::fit_bwd(xp + b * N * D, wp + b * N * K, mp + b * KD, a.data() + b * K, P.data() + b * KD,
                         gvp + b * KD, V2.data() + b * KD, AQ.data() + b * KD, gxp + b * N * D, gwp + b * N * K, r0,
                         r1, K, D);
        i0 += r1 - r0;
      }
    });
  });
  return {gx, gw};
}

}  // namespace

TORCH_LIBRARY_IMPL(vos_kernels, CPU, m) {
  m.impl("gmm_em", &gmm_em_impl);
  m.impl("prototype_values", &prototype_values_impl);
  m.impl("prototype_attention", &prototype_attention_impl);
  m.impl("diag_gmm_log_prob", &diag_gmm_log_prob_impl);
  m.impl("diag_gmm_log_prob_backward", &diag_gmm_log_prob_backward_impl);
  m.impl("diag_gmm_fit", &diag_gmm_fit_impl);
  m.impl("diag_gmm_fit_backward", &diag_gmm_fit_backward_impl);
}

}  // namespace cpu
}  // namespace vos_kernels
