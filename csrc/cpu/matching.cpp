// CPU kernels of the CFBI / CFBI+ matching ops.
//
// Semantics (shared with every backend): ../shared/spec/api.md, docs/internals.md.
// Sources: CFBI+ (Yang et al., TPAMI) eq. 2-3 (global), 4-7 (multi-local), 8-12 (atrous);
// the behaviour users rely on is that of z-x-yang/CFBI networks/layers/matching.py.
//
// Memory: nothing of size query x reference or pixels x window is allocated. Global
// matching streams the label-grouped reference through one fixed-size tile buffer
// (kTileElems scalars); multi-local matching keeps L*K running minima per pixel.

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <vector>

namespace vos_kernels {
namespace cpu {
namespace {

using at::Tensor;

// One thread's GEMM tile: kTileRows queries x (kTileElems / kTileRows) reference pixels
// (512 KiB of float32: it stays in L2 between the product and the epilogue).
constexpr int64_t kTileElems = int64_t(1) << 17;
constexpr int64_t kTileRows = 128;

// The running-minimum update rule every backend uses: strict '<' (ties keep the
// earlier, lower flat index), and a NaN distance replaces a non-NaN minimum once.
template <typename T>
inline bool improves(T d, T best) {
  return d < best || (d != d && best == best);
}

// Whether candidate (v, i) beats the incumbent (bv, bi) in scan order: an empty
// candidate (index -1) never wins, NaN wins over numbers, then the smaller value, then
// the lower flat index.
template <typename T>
inline bool beats(T v, int64_t i, T bv, int64_t bi) {
  if (i < 0) return false;
  if (bi < 0) return true;
  const bool vn = v != v, bn = bv != bv;
  if (vn != bn) return vn;
  if (!vn && v != bv) return v < bv;
  return i < bi;
}

template <typename T>
inline T clamp_nonneg(T d) {
  return d < T(0) ? T(0) : d;  // keeps NaN
}

// Squared L2 distance of two length-C vectors with eight independent partial sums, so
// that the compiler vectorises it without reassociating a single sum.
template <typename T>
__attribute__((always_inline)) inline T l2sq(const T* a, const T* b, int64_t C) {
  T acc[8] = {T(0), T(0), T(0), T(0), T(0), T(0), T(0), T(0)};
  int64_t c = 0;
  for (; c + 8 <= C; c += 8) {
    for (int u = 0; u < 8; ++u) {
      const T t = a[c + u] - b[c + u];
      acc[u] += t * t;
    }
  }
  T s = T(0);
  for (; c < C; ++c) {
    const T t = a[c] - b[c];
    s += t * t;
  }
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + s;
}

bool cpu_has_avx2_fma() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

// ---------------------------------------------------------------------------------
// Argument checks. The Python API raises ValueError with the argument's name before it
// gets here; these keep direct torch.ops calls from crashing or writing garbage.
// ---------------------------------------------------------------------------------

void check_float(const Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "vos_kernels: ", name, " must be a CPU tensor here");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "vos_kernels: ", name, " must be float32 (or float64) on CPU, got ",
              t.scalar_type());
}

Tensor checked_labels(const Tensor& labels, int64_t num_labels, const char* name) {
  TORCH_CHECK(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt,
              "vos_kernels: ", name, " must be int64 or int32, got ", labels.scalar_type());
  Tensor lab = labels.to(at::kLong).contiguous();
  const int64_t* p = lab.data_ptr<int64_t>();
  const int64_t n = lab.numel();
  int64_t bad = 0;
  for (int64_t i = 0; i < n; ++i) bad += (p[i] < -1) | (p[i] >= num_labels);
  TORCH_CHECK(bad == 0, "vos_kernels: ", name, " must lie in [-1, num_labels) = [-1, ",
              num_labels, "); ", bad, " entries do not");
  return lab;
}

Tensor checked_bias(const Tensor& bias, int64_t num_labels, at::ScalarType st) {
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == num_labels,
              "vos_kernels: bias must have shape [num_labels] = [", num_labels, "], got ",
              bias.sizes());
  return bias.to(at::kCPU, st).contiguous();
}

// ---------------------------------------------------------------------------------
// labelled_nearest_sqdist
// ---------------------------------------------------------------------------------

// One BLAS chunk of query-reference dot products, [m, n] row-major, and where its
// rows' running minima live.
template <typename T>
struct ChunkArgs {
  const T* dots;          // [m, n]
  const T* qn;            // [m] squared norms of the query rows
  const T* rn;            // [n] squared norms of the reference columns
  const int64_t* index;   // [n] flat reference index of each column
  int64_t n;
  T* best;                // [m] running minimum of this label
  int64_t* best_index;    // [m]
};

// Whether squared norms are small enough (<= max/4, which NaN and inf fail) that the
// expansion |q|^2 + |r|^2 - 2 q.r cannot overflow.
template <typename T>
inline bool norms_safe(const T* v, int64_t n) {
  constexpr T kSafe = std::numeric_limits<T>::max() / T(4);
  bool ok = true;
  for (int64_t j = 0; j < n; ++j) ok &= v[j] <= kSafe;
  return ok;
}

// d = |q|^2 + |r|^2 - 2 q.r, clamped at 0, folded into the running minimum with the
// update rule of `improves`.
//
// Fast path (every squared norm <= max/4, so that no partial sum, |q|^2 + |r|^2 or 2 q.r
// can overflow and no distance can be NaN): kLanes independent running
// (min, first index) pairs over j = u mod kLanes, which the compiler turns into SIMD
// compares and blends; the lanes are then merged by (value, index). Same result as a
// sequential scan with strict '<'. Rows or chunks with a larger or non-finite norm take
// the sequential scan, where NaN is sticky (first NaN's index).
template <typename T>
__attribute__((always_inline)) inline void fold_rows_impl(const ChunkArgs<T>& a, int64_t r0,
                                                          int64_t r1) {
  constexpr int kLanes = 16;
  const int64_t n = a.n;
  const bool cols_safe = norms_safe(a.rn, n);
  for (int64_t r = r0; r < r1; ++r) {
    const T* row = a.dots + r * n;
    const T qnr = a.qn[r];
    T& best = a.best[r];
    if (best != best) continue;  // NaN is sticky
    if (!cols_safe || !norms_safe(&qnr, 1)) {
      for (int64_t j = 0; j < n; ++j) {
        const T d = clamp_nonneg(qnr + a.rn[j] - T(2) * row[j]);
        if (improves(d, best)) {
          best = d;
          a.best_index[r] = a.index[j];
          if (d != d) break;
        }
      }
      continue;
    }
    T mv[kLanes];
    int32_t iv[kLanes];
    for (int u = 0; u < kLanes; ++u) {
      mv[u] = std::numeric_limits<T>::infinity();
      iv[u] = -1;
    }
    int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes) {
      for (int u = 0; u < kLanes; ++u) {
        const T d = clamp_nonneg(qnr + a.rn[j + u] - T(2) * row[j + u]);
        const bool lt = d < mv[u];
        mv[u] = lt ? d : mv[u];
        iv[u] = lt ? static_cast<int32_t>(j + u) : iv[u];
      }
    }
    T mn = std::numeric_limits<T>::infinity();
    int64_t at = -1;
    for (int u = 0; u < kLanes; ++u) {
      if (iv[u] >= 0 && (mv[u] < mn || (mv[u] == mn && iv[u] < at))) {
        mn = mv[u];
        at = iv[u];
      }
    }
    for (; j < n; ++j) {  // tail, in order after every lane's elements
      const T d = clamp_nonneg(qnr + a.rn[j] - T(2) * row[j]);
      if (d < mn) {
        mn = d;
        at = j;
      }
    }
    if (at >= 0 && mn < best) {
      best = mn;
      a.best_index[r] = a.index[at];
    }
  }
}

template <typename T>
void fold_rows_default(const ChunkArgs<T>& a, int64_t r0, int64_t r1) {
  fold_rows_impl<T>(a, r0, r1);
}

#if defined(__x86_64__)
// AVX2 fast path of fold_rows_impl for float32: the same IEEE operations in the same
// order ((|q|^2 + |r|^2) - 2 q.r, then the clamp as a blend so -0.0 and NaN behave as in
// the scalar code), two 8-wide (min, first index) accumulators kept in registers.
__attribute__((target("avx2,fma"))) void fold_rows_avx2(const ChunkArgs<float>& a, int64_t r0,
                                                        int64_t r1) {
  const int64_t n = a.n;
  const bool cols_safe = norms_safe(a.rn, n);
  const __m256 two = _mm256_set1_ps(2.0f), zero = _mm256_setzero_ps();
  const __m256 inf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  for (int64_t r = r0; r < r1; ++r) {
    const float qnr = a.qn[r];
    if (a.best[r] != a.best[r]) continue;  // NaN is sticky
    if (!cols_safe || !norms_safe(&qnr, 1) || n < 16) {
      fold_rows_impl<float>(a, r, r + 1);
      continue;
    }
    const float* row = a.dots + r * n;
    const __m256 vq = _mm256_set1_ps(qnr);
    __m256 m0 = inf, m1 = inf;
    __m256i i0 = _mm256_set1_epi32(-1), i1 = i0;
    __m256i j0 = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256i j1 = _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15);
    const __m256i step = _mm256_set1_epi32(16);
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
      __m256 d0 = _mm256_sub_ps(_mm256_add_ps(vq, _mm256_loadu_ps(a.rn + j)),
                                _mm256_mul_ps(two, _mm256_loadu_ps(row + j)));
      __m256 d1 = _mm256_sub_ps(_mm256_add_ps(vq, _mm256_loadu_ps(a.rn + j + 8)),
                                _mm256_mul_ps(two, _mm256_loadu_ps(row + j + 8)));
      d0 = _mm256_blendv_ps(d0, zero, _mm256_cmp_ps(d0, zero, _CMP_LT_OQ));
      d1 = _mm256_blendv_ps(d1, zero, _mm256_cmp_ps(d1, zero, _CMP_LT_OQ));
      const __m256 lt0 = _mm256_cmp_ps(d0, m0, _CMP_LT_OQ);
      const __m256 lt1 = _mm256_cmp_ps(d1, m1, _CMP_LT_OQ);
      m0 = _mm256_blendv_ps(m0, d0, lt0);
      m1 = _mm256_blendv_ps(m1, d1, lt1);
      i0 = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(i0), _mm256_castsi256_ps(j0), lt0));
      i1 = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(i1), _mm256_castsi256_ps(j1), lt1));
      j0 = _mm256_add_epi32(j0, step);
      j1 = _mm256_add_epi32(j1, step);
    }
    alignas(32) float mv[16];
    alignas(32) int32_t iv[16];
    _mm256_store_ps(mv, m0);
    _mm256_store_ps(mv + 8, m1);
    _mm256_store_si256(reinterpret_cast<__m256i*>(iv), i0);
    _mm256_store_si256(reinterpret_cast<__m256i*>(iv + 8), i1);
    float mn = std::numeric_limits<float>::infinity();
    int64_t at = -1;
    for (int u = 0; u < 16; ++u) {
      if (iv[u] >= 0 && (mv[u] < mn || (mv[u] == mn && iv[u] < at))) {
        mn = mv[u];
        at = iv[u];
      }
    }
    for (; j < n; ++j) {
      const float d = clamp_nonneg(qnr + a.rn[j] - 2.0f * row[j]);
      if (d < mn) {
        mn = d;
        at = j;
      }
    }
    if (at >= 0 && mn < a.best[r]) {
      a.best[r] = mn;
      a.best_index[r] = a.index[at];
    }
  }
}
#endif

template <typename T>
void fold_rows(const ChunkArgs<T>& a, int64_t r0, int64_t r1) {
#if defined(__x86_64__)
  if constexpr (std::is_same_v<T, float>) {
    if (cpu_has_avx2_fma()) return fold_rows_avx2(a, r0, r1);
  }
#endif
  fold_rows_default<T>(a, r0, r1);
}

template <typename T>
void nearest_one_batch(const Tensor& query,      // [Nq, C] contiguous
                       const Tensor& reference,  // [Nr, C] contiguous
                       const int64_t* lab,       // [Nr]
                       int64_t Hr, int64_t Wr, int64_t L, int64_t rate,
                       T* out_d,  // [L, Nq]
                       int64_t* out_i) {
  const int64_t Nq = query.size(0), Nr = reference.size(0), C = query.size(1);
  // Candidates (atrous grid, labelled), grouped by label in increasing flat index:
  // a stable counting sort, O(reference).
  std::vector<int64_t> seg(L + 1, 0);
  for (int64_t n = 0; n < Nr; ++n) {
    const int64_t y = (n / Wr) % Hr, x = n % Wr;
    if (lab[n] >= 0 && y % rate == 0 && x % rate == 0) ++seg[lab[n] + 1];
  }
  for (int64_t l = 0; l < L; ++l) seg[l + 1] += seg[l];
  const int64_t Ncand = seg[L];
  Tensor cand_index = at::empty({Ncand}, query.options().dtype(at::kLong));
  int64_t* ci = cand_index.data_ptr<int64_t>();
  {
    std::vector<int64_t> fill(seg.begin(), seg.end() - 1);
    for (int64_t n = 0; n < Nr; ++n) {
      const int64_t y = (n / Wr) % Hr, x = n % Wr;
      if (lab[n] >= 0 && y % rate == 0 && x % rate == 0) ci[fill[lab[n]]++] = n;
    }
  }
  for (int64_t i = 0; i < L * Nq; ++i) {
    out_d[i] = std::numeric_limits<T>::infinity();
    out_i[i] = -1;
  }
  if (Ncand == 0 || Nq == 0) return;

  const Tensor cand = reference.index_select(0, cand_index);  // [Ncand, C]
  const Tensor cand_t = cand.t();
  std::vector<T> rn(Ncand), qn(Nq);
  const T* cp = cand.data_ptr<T>();
  const T* qp = query.data_ptr<T>();
  at::parallel_for(0, Ncand, 1024, [&](int64_t s, int64_t e) {
    for (int64_t j = s; j < e; ++j) {
      T acc = 0;
      for (int64_t c = 0; c < C; ++c) acc += cp[j * C + c] * cp[j * C + c];
      rn[j] = acc;
    }
  });
  at::parallel_for(0, Nq, 1024, [&](int64_t s, int64_t e) {
    for (int64_t i = s; i < e; ++i) {
      T acc = 0;
      for (int64_t c = 0; c < C; ++c) acc += qp[i * C + c] * qp[i * C + c];
      qn[i] = acc;
    }
  });

  // Query tiles in parallel. Each thread multiplies its tile by label-grouped chunks of
  // the reference into a private L2-sized buffer (BLAS runs single-threaded inside the
  // parallel region) and folds each chunk into its rows' running per-label minima.
  const int64_t BM = std::min<int64_t>(kTileRows, Nq);
  const int64_t BN = std::max<int64_t>(1, kTileElems / BM);
  const int64_t num_tiles = (Nq + BM - 1) / BM;
  at::parallel_for(0, num_tiles, 1, [&](int64_t t0, int64_t t1) {
    // Worker threads do not inherit the caller's dispatch state: without this guard the
    // at::mm_out below sees inputs that require grad and goes through autograd (an error
    // for out= ops) whenever the op runs under the autograd key on several threads.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    Tensor tile = at::empty({BM * BN}, query.options());
    T* tp = tile.data_ptr<T>();
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t q0 = t * BM, m = std::min(BM, Nq - q0);
      const Tensor qt = query.narrow(0, q0, m);
      for (int64_t l = 0; l < L; ++l) {
        for (int64_t s0 = seg[l]; s0 < seg[l + 1]; s0 += BN) {
          const int64_t n = std::min(BN, seg[l + 1] - s0);
          Tensor dots = tile.narrow(0, 0, m * n).view({m, n});
          at::mm_out(dots, qt, cand_t.narrow(1, s0, n));  // BLAS: [m, C] x [C, n]
          const ChunkArgs<T> a{tp, qn.data() + q0, rn.data() + s0, ci + s0, n,
                               out_d + l * Nq + q0, out_i + l * Nq + q0};
          fold_rows(a, 0, m);
        }
      }
    }
  });
}

std::tuple<Tensor, Tensor> nearest_impl(const Tensor& query, const Tensor& reference,
                                        const Tensor& labels, int64_t L, int64_t rate) {
  check_float(query, "query");
  check_float(reference, "reference");
  TORCH_CHECK(query.dim() == 4, "vos_kernels: query must be [B,H,W,C], got ", query.sizes());
  TORCH_CHECK(reference.dim() == 5, "vos_kernels: reference must be [B,T,Hr,Wr,C], got ",
              reference.sizes());
  TORCH_CHECK(reference.scalar_type() == query.scalar_type(),
              "vos_kernels: query and reference dtypes differ");
  const int64_t B = query.size(0), H = query.size(1), W = query.size(2), C = query.size(3);
  const int64_t T_ = reference.size(1), Hr = reference.size(2), Wr = reference.size(3);
  TORCH_CHECK(reference.size(0) == B && reference.size(4) == C,
              "vos_kernels: reference must be [B,T,Hr,Wr,C] with B=", B, " C=", C, ", got ",
              reference.sizes());
  TORCH_CHECK(labels.dim() == 4 && labels.size(0) == B && labels.size(1) == T_ &&
                  labels.size(2) == Hr && labels.size(3) == Wr,
              "vos_kernels: reference_labels must be [B,T,Hr,Wr], got ", labels.sizes());
  TORCH_CHECK(L >= 1, "vos_kernels: num_labels must be >= 1, got ", L);
  TORCH_CHECK(rate >= 1, "vos_kernels: atrous_rate must be >= 1, got ", rate);
  const Tensor lab = checked_labels(labels, L, "reference_labels");
  const Tensor q = query.contiguous().view({B, H * W, C});
  const Tensor r = reference.contiguous().view({B, T_ * Hr * Wr, C});
  Tensor out_d = at::empty({B, L, H, W}, query.options());
  Tensor out_i = at::empty({B, L, H, W}, query.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "labelled_nearest_sqdist_cpu", [&] {
    for (int64_t b = 0; b < B; ++b) {
      nearest_one_batch<scalar_t>(q[b], r[b], lab.data_ptr<int64_t>() + b * T_ * Hr * Wr, Hr,
                                  Wr, L, rate, out_d.data_ptr<scalar_t>() + b * L * H * W,
                                  out_i.data_ptr<int64_t>() + b * L * H * W);
    }
  });
  return {out_d, out_i};
}

// ---------------------------------------------------------------------------------
// fg / bg epilogue: fg = tanh((d + b_l) / 2) (1.0 when empty), bg[l] = min_{m != l} fg[m]
// from the best and second-best label of each pixel.
// ---------------------------------------------------------------------------------

// sq, idx: [B, L, P]; writes fg, bg [B, L, P].
template <typename T>
void fb_epilogue(const T* sq, const int64_t* idx, const T* bias, int64_t B, int64_t L,
                 int64_t P, T* fg, T* bg) {
  at::parallel_for(0, B * P, 2048, [&](int64_t s, int64_t e) {
    for (int64_t bp = s; bp < e; ++bp) {
      const int64_t b = bp / P, p = bp % P;
      const int64_t base = b * L * P + p;
      int64_t best = -1, second = -1;
      for (int64_t l = 0; l < L; ++l) {
        const int64_t o = base + l * P;
        const T v = idx[o] < 0 ? T(1) : std::tanh((sq[o] + bias[l]) / T(2));
        fg[o] = v;
        // Ordering: NaN first, then value, ties -> lower label (l increases).
        auto less = [&](int64_t a, int64_t c) {
          const T va = fg[base + a * P], vc = fg[base + c * P];
          const bool na = va != va, nc = vc != vc;
          if (na != nc) return na;
          return !na && va < vc;
        };
        if (best < 0 || less(l, best)) {
          second = best;
          best = l;
        } else if (second < 0 || less(l, second)) {
          second = l;
        }
      }
      for (int64_t l = 0; l < L; ++l) {
        const int64_t src = (l == best) ? second : best;
        bg[base + l * P] = src < 0 ? T(1) : fg[base + src * P];
      }
    }
  });
}

std::tuple<Tensor, Tensor, Tensor> global_impl(const Tensor& query, const Tensor& reference,
                                               const Tensor& labels, int64_t L,
                                               const Tensor& bias, int64_t rate) {
  const Tensor b = checked_bias(bias, L, query.scalar_type());
  auto [sq, idx] = nearest_impl(query, reference, labels, L, rate);
  Tensor fg = at::empty_like(sq), bg = at::empty_like(sq);
  const int64_t P = sq.size(2) * sq.size(3);
  AT_DISPATCH_FLOATING_TYPES(sq.scalar_type(), "fb_global_matching_cpu", [&] {
    fb_epilogue<scalar_t>(sq.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(),
                          b.data_ptr<scalar_t>(), sq.size(0), L, P, fg.data_ptr<scalar_t>(),
                          bg.data_ptr<scalar_t>());
  });
  return {fg, bg, idx};
}

// ---------------------------------------------------------------------------------
// fb_multi_local_matching: one pass over the largest window, a running minimum per
// (label, ring) where ring = the smallest window holding the offset, then a prefix
// minimum over the windows.
// ---------------------------------------------------------------------------------

template <typename T>
struct LocalArgs {
  const T* q;        // [B, H, W, C]
  const T* prev;     // [B, H, W, C]
  const int64_t* lab;  // [B, H, W]
  int64_t H, W, C, L, K, P, rate;
  const int64_t* window_of_ring;  // [P + 1]
  T* sq;             // [B, L, K, H, W]
  int64_t* idx;      // [B, L, K, H, W]
};

template <typename T>
__attribute__((always_inline)) inline void local_rows(const LocalArgs<T>& a, int64_t row0,
                                                      int64_t row1) {
  const int64_t H = a.H, W = a.W, C = a.C, L = a.L, K = a.K, P = a.P, r = a.rate;
  const int64_t HW = H * W;
  std::vector<T> rb(L * K);
  std::vector<int64_t> ri(L * K);
  for (int64_t by = row0; by < row1; ++by) {
    const int64_t b = by / H, y = by % H;
    const T* prev_b = a.prev + b * HW * C;
    const int64_t* lab_b = a.lab + b * HW;
    for (int64_t x = 0; x < W; ++x) {
      const T* qp = a.q + ((b * H + y) * W + x) * C;
      std::fill(rb.begin(), rb.end(), std::numeric_limits<T>::infinity());
      std::fill(ri.begin(), ri.end(), int64_t(-1));
      // Offsets on the atrous grid within the frame; dy-major so flat index increases.
      const int64_t dy0 = -std::min(P, (y / r) * r), dy1 = std::min(P, ((H - 1 - y) / r) * r);
      const int64_t dx0 = -std::min(P, (x / r) * r), dx1 = std::min(P, ((W - 1 - x) / r) * r);
      for (int64_t dy = dy0; dy <= dy1; dy += r) {
        const int64_t yy = y + dy;
        const int64_t ady = dy < 0 ? -dy : dy;
        for (int64_t dx = dx0; dx <= dx1; dx += r) {
          const int64_t n = yy * W + x + dx;
          const int64_t l = lab_b[n];
          if (l < 0) continue;
          const T d = clamp_nonneg(l2sq(qp, prev_b + n * C, C));
          const int64_t adx = dx < 0 ? -dx : dx;
          const int64_t s = l * K + a.window_of_ring[ady > adx ? ady : adx];
          if (improves(d, rb[s])) {
            rb[s] = d;
            ri[s] = n;
          }
        }
      }
      for (int64_t l = 0; l < L; ++l) {
        for (int64_t k = 0; k < K; ++k) {
          const int64_t s = l * K + k;
          if (k > 0 && beats(rb[s - 1], ri[s - 1], rb[s], ri[s])) {
            rb[s] = rb[s - 1];
            ri[s] = ri[s - 1];
          }
          const int64_t o = ((b * L + l) * K + k) * HW + y * W + x;
          a.sq[o] = rb[s];
          a.idx[o] = ri[s];
        }
      }
    }
  }
}

template <typename T>
void local_rows_default(const LocalArgs<T>& a, int64_t r0, int64_t r1) {
  local_rows<T>(a, r0, r1);
}

#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) void local_rows_avx2(const LocalArgs<float>& a,
                                                         int64_t r0, int64_t r1) {
  local_rows<float>(a, r0, r1);
}
#endif

template <typename T>
void run_local(const LocalArgs<T>& a, int64_t rows) {
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
#if defined(__x86_64__)
    if constexpr (std::is_same_v<T, float>) {
      if (cpu_has_avx2_fma()) return local_rows_avx2(a, r0, r1);
    }
#endif
    local_rows_default<T>(a, r0, r1);
  });
}

std::tuple<Tensor, Tensor, Tensor> local_impl(const Tensor& query, const Tensor& previous,
                                              const Tensor& labels, int64_t L,
                                              at::IntArrayRef windows, const Tensor& bias,
                                              int64_t rate) {
  check_float(query, "query");
  check_float(previous, "previous");
  TORCH_CHECK(query.dim() == 4, "vos_kernels: query must be [B,H,W,C], got ", query.sizes());
  TORCH_CHECK(previous.sizes() == query.sizes(),
              "vos_kernels: previous must have the shape of query ", query.sizes(), ", got ",
              previous.sizes());
  TORCH_CHECK(previous.scalar_type() == query.scalar_type(),
              "vos_kernels: query and previous dtypes differ");
  const int64_t B = query.size(0), H = query.size(1), W = query.size(2), C = query.size(3);
  TORCH_CHECK(labels.dim() == 3 && labels.size(0) == B && labels.size(1) == H &&
                  labels.size(2) == W,
              "vos_kernels: previous_labels must be [B,H,W], got ", labels.sizes());
  TORCH_CHECK(L >= 1, "vos_kernels: num_labels must be >= 1, got ", L);
  TORCH_CHECK(rate >= 1, "vos_kernels: atrous_rate must be >= 1, got ", rate);
  const int64_t K = static_cast<int64_t>(windows.size());
  TORCH_CHECK(K >= 1, "vos_kernels: windows must not be empty");
  for (int64_t k = 0; k < K; ++k) {
    TORCH_CHECK(windows[k] >= 1 && (k == 0 || windows[k] > windows[k - 1]),
                "vos_kernels: windows must be strictly ascending ints >= 1, got ", windows);
  }
  const Tensor lab = checked_labels(labels, L, "previous_labels");
  const Tensor b = checked_bias(bias, L, query.scalar_type());
  const Tensor q = query.contiguous(), pv = previous.contiguous();
  const int64_t kmax = windows[K - 1];
  const int64_t P = kmax - kmax % rate;
  std::vector<int64_t> window_of_ring(P + 1);
  for (int64_t ring = 0; ring <= P; ++ring) {
    int64_t k = 0;
    while (windows[k] < ring) ++k;
    window_of_ring[ring] = k;
  }
  Tensor sq = at::empty({B, L, K, H, W}, query.options());
  Tensor idx = at::empty({B, L, K, H, W}, query.options().dtype(at::kLong));
  Tensor fg = at::empty_like(sq), bg = at::empty_like(sq);
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "fb_multi_local_matching_cpu", [&] {
    LocalArgs<scalar_t> a{q.data_ptr<scalar_t>(), pv.data_ptr<scalar_t>(),
                          lab.data_ptr<int64_t>(), H, W, C, L, K, P, rate,
                          window_of_ring.data(), sq.data_ptr<scalar_t>(),
                          idx.data_ptr<int64_t>()};
    run_local<scalar_t>(a, B * H);
    fb_epilogue<scalar_t>(sq.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(),
                          b.data_ptr<scalar_t>(), B, L, K * H * W, fg.data_ptr<scalar_t>(),
                          bg.data_ptr<scalar_t>());
  });
  return {fg, bg, idx};
}

// ---------------------------------------------------------------------------------
// fb_instance_pooling: per-label sums in float64, parallel over channel blocks so the
// summation order never depends on the thread count.
// ---------------------------------------------------------------------------------

Tensor pooling_impl(const Tensor& embedding, const Tensor& labels, int64_t L) {
  check_float(embedding, "embedding");
  TORCH_CHECK(embedding.dim() == 4, "vos_kernels: embedding must be [B,H,W,C], got ",
              embedding.sizes());
  const int64_t B = embedding.size(0), H = embedding.size(1), W = embedding.size(2),
                C = embedding.size(3), N = H * W;
  TORCH_CHECK(labels.dim() == 3 && labels.size(0) == B && labels.size(1) == H &&
                  labels.size(2) == W,
              "vos_kernels: labels must be [B,H,W], got ", labels.sizes());
  TORCH_CHECK(L >= 1, "vos_kernels: num_labels must be >= 1, got ", L);
  const Tensor lab = checked_labels(labels, L, "labels");
  const Tensor e = embedding.contiguous();
  Tensor out = at::empty({B, L, 2, C}, embedding.options());
  AT_DISPATCH_FLOATING_TYPES(embedding.scalar_type(), "fb_instance_pooling_cpu", [&] {
    const scalar_t* ep = e.data_ptr<scalar_t>();
    const int64_t* lp = lab.data_ptr<int64_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    for (int64_t b = 0; b < B; ++b) {
      std::vector<double> count(L, 0.0);
      double valid = 0.0;
      for (int64_t n = 0; n < N; ++n) {
        const int64_t l = lp[b * N + n];
        if (l >= 0) {
          count[l] += 1.0;
          valid += 1.0;
        }
      }
      constexpr int64_t kBlock = 16;
      at::parallel_for(0, (C + kBlock - 1) / kBlock, 1, [&](int64_t c0, int64_t c1) {
        std::vector<double> sum(L * kBlock), total(kBlock);
        for (int64_t cb = c0; cb < c1; ++cb) {
          const int64_t cs = cb * kBlock, ce = std::min(C, cs + kBlock), cw = ce - cs;
          std::fill(sum.begin(), sum.end(), 0.0);
          std::fill(total.begin(), total.end(), 0.0);
          for (int64_t n = 0; n < N; ++n) {
            const int64_t l = lp[b * N + n];
            if (l < 0) continue;
            const scalar_t* row = ep + (b * N + n) * C + cs;
            for (int64_t c = 0; c < cw; ++c) sum[l * kBlock + c] += static_cast<double>(row[c]);
          }
          for (int64_t l = 0; l < L; ++l)
            for (int64_t c = 0; c < cw; ++c) total[c] += sum[l * kBlock + c];
          for (int64_t l = 0; l < L; ++l) {
            const double fg_den = count[l] + 1e-5, bg_den = valid - count[l] + 1e-5;
            for (int64_t c = 0; c < cw; ++c) {
              const double s = sum[l * kBlock + c];
              op[((b * L + l) * 2 + 0) * C + cs + c] = static_cast<scalar_t>(s / fg_den);
              op[((b * L + l) * 2 + 1) * C + cs + c] =
                  static_cast<scalar_t>((total[c] - s) / bg_den);
            }
          }
        }
      });
    }
  });
  return out;
}

// ---------------------------------------------------------------------------------
// nearest_sqdist_backward: d/de_p ‖e_p − e_q‖² · g = 2 (e_p − e_q) g, and the negative
// for e_q, for the saved argmin q of every (label, window, pixel).
// ---------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> backward_impl(const Tensor& grad, const Tensor& query,
                                         const Tensor& reference, const Tensor& index) {
  check_float(query, "query");
  check_float(reference, "reference");
  TORCH_CHECK(query.dim() == 3 && reference.dim() == 3 && grad.dim() == 3 &&
                  index.dim() == 3,
              "vos_kernels: nearest_sqdist_backward expects grad [B,M,Nq], query [B,Nq,C], "
              "reference [B,Nr,C], index [B,M,Nq]");
  const int64_t B = query.size(0), Nq = query.size(1), C = query.size(2);
  const int64_t Nr = reference.size(1), M = grad.size(1);
  TORCH_CHECK(reference.size(0) == B && reference.size(2) == C, "vos_kernels: reference ",
              reference.sizes(), " does not match query ", query.sizes());
  TORCH_CHECK(grad.sizes() == index.sizes() && grad.size(0) == B && grad.size(2) == Nq,
              "vos_kernels: grad ", grad.sizes(), " and index ", index.sizes(),
              " must both be [B,M,Nq] = [", B, ",", M, ",", Nq, "]");
  const Tensor idx = index.to(at::kLong).contiguous();
  {
    const int64_t* ip = idx.data_ptr<int64_t>();
    int64_t bad = 0;
    for (int64_t i = 0; i < idx.numel(); ++i) bad += (ip[i] < -1) | (ip[i] >= Nr);
    TORCH_CHECK(bad == 0, "vos_kernels: index must lie in [-1, ", Nr, ")");
  }
  const Tensor q = query.contiguous(), r = reference.contiguous();
  const Tensor g = grad.to(query.scalar_type()).contiguous();
  Tensor gq = at::zeros_like(q), gr = at::zeros_like(r);
  AT_DISPATCH_FLOATING_TYPES(query.scalar_type(), "nearest_sqdist_backward_cpu", [&] {
    using T = scalar_t;
    const T* qp = q.data_ptr<T>();
    const T* rp = r.data_ptr<T>();
    const T* gp = g.data_ptr<T>();
    const int64_t* ip = idx.data_ptr<int64_t>();
    T* gqp = gq.data_ptr<T>();
    T* grp = gr.data_ptr<T>();
    at::parallel_for(0, B * Nq, 256, [&](int64_t s, int64_t e) {
      for (int64_t bp = s; bp < e; ++bp) {
        const int64_t b = bp / Nq, p = bp % Nq;
        for (int64_t m = 0; m < M; ++m) {
          const int64_t o = (b * M + m) * Nq + p, n = ip[o];
          if (n < 0) continue;
          const T two_g = T(2) * gp[o];
          const T* ep = qp + bp * C;
          const T* eq = rp + (b * Nr + n) * C;
          for (int64_t c = 0; c < C; ++c) gqp[bp * C + c] += two_g * (ep[c] - eq[c]);
        }
      }
    });
    // Reference gradient: channel blocks in parallel, each summing in a fixed order.
    constexpr int64_t kBlock = 8;
    for (int64_t b = 0; b < B; ++b) {
      at::parallel_for(0, (C + kBlock - 1) / kBlock, 1, [&](int64_t c0, int64_t c1) {
        for (int64_t cb = c0; cb < c1; ++cb) {
          const int64_t cs = cb * kBlock, ce = std::min(C, cs + kBlock);
          for (int64_t m = 0; m < M; ++m) {
            for (int64_t p = 0; p < Nq; ++p) {
              const int64_t o = (b * M + m) * Nq + p, n = ip[o];
              if (n < 0) continue;
              const T two_g = T(2) * gp[o];
              const T* ep = qp + (b * Nq + p) * C;
              const T* eq = rp + (b * Nr + n) * C;
              T* dst = grp + (b * Nr + n) * C;
              for (int64_t c = cs; c < ce; ++c) dst[c] -= two_g * (ep[c] - eq[c]);
            }
          }
        }
      });
    }
  });
  return {gq, gr};
}

}  // namespace

TORCH_LIBRARY_IMPL(vos_kernels, CPU, m) {
  m.impl("labelled_nearest_sqdist", &nearest_impl);
  m.impl("fb_global_matching", &global_impl);
  m.impl("fb_multi_local_matching", &local_impl);
  m.impl("fb_instance_pooling", &pooling_impl);
  m.impl("nearest_sqdist_backward", &backward_impl);
}

}  // namespace cpu
}  // namespace vos_kernels
