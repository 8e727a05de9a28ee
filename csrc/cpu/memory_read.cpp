// CPU kernel of topk_memory_read: STCN's top-k memory read without the dense affinity.
//
// Per batch: query tiles run in parallel; each thread multiplies its [BM, CK] query tile
// by [CK, BN] chunks of the memory keys into a private L2-sized buffer (single-threaded
// BLAS inside the parallel region), turns dots into STCN affinities
// (2 m·q − ‖m‖²)·scale and folds them into a running top-k per query (a sorted array of
// k' = min(k, Nm) entries; candidates arrive in increasing memory index and only a
// strictly better value enters, so ties keep the lowest index; NaN ranks above every
// number, as in torch.topk); once a query's top-k is full, affinities are tested 16 at a
// time against its k-th value and only blocks with a candidate are inserted. Then a max-subtracted softmax over the k' values and a
// gather readout of k' value rows. Usage counters are added afterwards in query order
// (deterministic): "hits" adds 1 per (query, selected entry), "weights" adds the softmax
// weight. Memory: the outputs, one 512 KiB tile per thread, ‖m‖²; never Nm × Nq.
// Semantics: ../shared/spec/api.md (top-k read) and ../shared/spec/memory.md.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <tuple>
#include <vector>

namespace vos_kernels {
namespace {

using at::Tensor;

constexpr int64_t kTopkTileRows = 64;
constexpr int64_t kTopkTileElems = int64_t(1) << 17;  // 512 KiB of float per thread
constexpr int64_t kFoldBlock = 16;                       // affinities tested per threshold check

template <typename T>
inline bool ranks_above(T a, T b) {  // a strictly better than b; NaN above numbers
  return (std::isnan(a) && !std::isnan(b)) || a > b;
}

template <typename T>
struct TopK {
  T* v;
  int64_t* i;
  int64_t k;
  int64_t filled;
  inline void offer(T a, int64_t n) {
    int64_t pos;
    if (filled < k) {
      pos = filled++;
    } else if (ranks_above(a, v[k - 1])) {
      pos = k - 1;
    } else {
      return;
    }
    while (pos > 0 && ranks_above(a, v[pos - 1])) {
      v[pos] = v[pos - 1];
      i[pos] = i[pos - 1];
      --pos;
    }
    v[pos] = a;
    i[pos] = n;
  }
};

template <typename T>
void topk_one_batch(const Tensor& query,   // [Nq, CK] contiguous
                    const Tensor& memory,  // [Nm, CK] contiguous
                    const Tensor& value,   // [Nm, CV] contiguous
                    int64_t K, double scale,
                    T* out,          // [Nq, CV]
                    int64_t* top_i,  // [Nq, K]
                    T* top_w) {      // [Nq, K]: affinities, then softmax weights
  const int64_t Nq = query.size(0), Nm = memory.size(0), CK = query.size(1), CV = value.size(1);
  if (Nq == 0) return;
  const T* mp = memory.data_ptr<T>();
  std::vector<T> mnorm(Nm);
  at::parallel_for(0, Nm, 1024, [&](int64_t s, int64_t e) {
    for (int64_t n = s; n < e; ++n) {
      T acc = 0;
      for (int64_t c = 0; c < CK; ++c) acc += mp[n * CK + c] * mp[n * CK + c];
      mnorm[n] = acc;
    }
  });
  const Tensor memory_t = memory.t();
  const T sc = static_cast<T>(scale);
  const int64_t BM = std::min<int64_t>(kTopkTileRows, Nq);
  const int64_t BN = std::max<int64_t>(1, kTopkTileElems / BM);
  const int64_t num_tiles = (Nq + BM - 1) / BM;
  const T* vp = value.data_ptr<T>();
  at::parallel_for(0, num_tiles, 1, [&](int64_t t0, int64_t t1) {
    // Worker threads do not inherit the caller's dispatch state: without this guard the
    // at::mm_out below sees inputs that require grad and goes through autograd (an error
    // for out= ops) whenever the op runs under the autograd key on several threads.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    Tensor tile = at::empty({BM * BN}, query.options());
    T* tp = tile.data_ptr<T>();
    std::vector<TopK<T>> heaps(BM);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t q0 = t * BM, m = std::min(BM, Nq - q0);
      for (int64_t r = 0; r < m; ++r) heaps[r] = TopK<T>{top_w + (q0 + r) * K, top_i + (q0 + r) * K, K, 0};
      const Tensor qt = query.narrow(0, q0, m);
      for (int64_t n0 = 0; n0 < Nm; n0 += BN) {
        const int64_t n = std::min(BN, Nm - n0);
        Tensor dots = tile.narrow(0, 0, m * n).view({m, n});
        at::mm_out(dots, qt, memory_t.narrow(1, n0, n));  // BLAS: [m, CK] x [CK, n]
        const T* mn = mnorm.data() + n0;
        for (int64_t r = 0; r < m; ++r) {
          const T* row = tp + r * n;
          TopK<T>& h = heaps[r];
          int64_t j = 0;
          for (; j < n && h.filled < K; ++j) h.offer((2 * row[j] - mn[j]) * sc, n0 + j);
          // Full heap: test a block of affinities against the k-th value at once (a
          // vectorisable loop; `!(s <= thr)` is true for NaN too), and only blocks holding a
          // candidate take the branchy insertion. After the first tiles that is rare.
          for (; j < n; j += kFoldBlock) {
            const int64_t len = std::min(kFoldBlock, n - j);
            T s[kFoldBlock];
            const T thr = h.v[K - 1];
            int any = 0;
            for (int64_t u = 0; u < len; ++u) {
              s[u] = (2 * row[j + u] - mn[j + u]) * sc;
              any |= !(s[u] <= thr);
            }
            if (!any) continue;
            for (int64_t u = 0; u < len; ++u) h.offer(s[u], n0 + j + u);
          }
        }
      }
      // softmax over the k' selected affinities (max subtracted), then the gather readout
      for (int64_t r = 0; r < m; ++r) {
        T* w = top_w + (q0 + r) * K;
        const int64_t* idx = top_i + (q0 + r) * K;
        const T top = w[0];
        double sum = 0;
        for (int64_t j = 0; j < K; ++j) {
          w[j] = std::exp(w[j] - top);
          sum += w[j];
        }
        const T inv = static_cast<T>(1.0 / sum);
        for (int64_t j = 0; j < K; ++j) w[j] *= inv;
        T* o = out + (q0 + r) * CV;
        for (int64_t c = 0; c < CV; ++c) o[c] = 0;
        for (int64_t j = 0; j < K; ++j) {
          const T wj = w[j];
          const T* vrow = vp + idx[j] * CV;
          for (int64_t c = 0; c < CV; ++c) o[c] += wj * vrow[c];
        }
      }
    }
  });
}

std::tuple<Tensor, Tensor, Tensor> topk_memory_read_impl(const Tensor& query_key, const Tensor& memory_key,
                                                         const Tensor& memory_value, int64_t k, double scale,
                                                         const std::optional<Tensor>& usage, int64_t usage_mode) {
  TORCH_CHECK(query_key.dim() == 3 && memory_key.dim() == 3 && memory_value.dim() == 3,
              "topk_memory_read: expected query_key [B,Nq,CK], memory_key [B,Nm,CK], memory_value [B,Nm,CV]");
  const int64_t B = query_key.size(0), Nq = query_key.size(1), CK = query_key.size(2);
  const int64_t Nm = memory_key.size(1), CV = memory_value.size(2);
  TORCH_CHECK(memory_key.size(0) == B && memory_key.size(2) == CK && memory_value.size(0) == B &&
                  memory_value.size(1) == Nm,
              "topk_memory_read: shapes do not agree");
  TORCH_CHECK(k >= 1, "topk_memory_read: k must be >= 1");
  TORCH_CHECK(Nm >= 1, "topk_memory_read: the memory is empty");
  TORCH_CHECK(usage_mode >= 0 && usage_mode <= 2, "topk_memory_read: usage_mode must be 0, 1 or 2");
  const auto st = query_key.scalar_type();
  TORCH_CHECK((st == at::kFloat || st == at::kDouble) && memory_key.scalar_type() == st &&
                  memory_value.scalar_type() == st,
              "topk_memory_read (CPU): float32 or float64 inputs of one dtype");
  const int64_t K = std::min(k, Nm);
  const Tensor q = query_key.contiguous(), mk = memory_key.contiguous(), mv = memory_value.contiguous();
  Tensor out = at::empty({B, Nq, CV}, q.options());
  Tensor index = at::empty({B, Nq, K}, q.options().dtype(at::kLong));
  Tensor weight = at::empty({B, Nq, K}, q.options());
  AT_DISPATCH_FLOATING_TYPES(st, "topk_memory_read", [&] {
    for (int64_t b = 0; b < B; ++b) {
      topk_one_batch<scalar_t>(q[b], mk[b], mv[b], K, scale, out[b].data_ptr<scalar_t>(),
                               index[b].data_ptr<int64_t>(), weight[b].data_ptr<scalar_t>());
    }
  });
  if (usage.has_value() && usage_mode != 0) {
    const Tensor& u = *usage;
    TORCH_CHECK(u.dim() == 2 && u.size(0) == B && u.size(1) == Nm && u.scalar_type() == at::kFloat,
                "topk_memory_read: usage must be float32 [B, Nm]");
    // query order, one thread per batch element: deterministic sums
    AT_DISPATCH_FLOATING_TYPES(st, "topk_memory_usage", [&] {
      at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          float* up = u.data_ptr<float>() + b * u.stride(0);
          const int64_t us = u.stride(1);
          const int64_t* ip = index.data_ptr<int64_t>() + b * Nq * K;
          const scalar_t* wp = weight.data_ptr<scalar_t>() + b * Nq * K;
          for (int64_t j = 0; j < Nq * K; ++j) {
            up[ip[j] * us] += usage_mode == 1 ? 1.0f : static_cast<float>(wp[j]);
          }
        }
      });
    });
  }
  return {out, index, weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(vos_kernels, CPU, m) { m.impl("topk_memory_read", &topk_memory_read_impl); }

}  // namespace vos_kernels
