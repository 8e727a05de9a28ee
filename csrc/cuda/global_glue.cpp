// ATen glue of the CUDA global-matching kernels (global_matching.cu):
// labelled_nearest_sqdist, fb_global_matching and nearest_sqdist_backward on CUDA tensors.
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <tuple>

#include "cuda/global_matching.h"
#include "cuda/glue.h"

namespace vos {
namespace cuda {
namespace {

using at::Tensor;

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();

struct GlobalInputs {
  Tensor q, r, lab;
  GlobalMatchingShape s;
  Dtype dtype;
};

GlobalInputs prepare_global(const Tensor& query, const Tensor& reference, const Tensor& labels,
                            int64_t L, int64_t rate, const char* op) {
  check_cuda(query, op, "query");
  check_cuda(reference, op, "reference");
  check_cuda(labels, op, "reference_labels");
  TORCH_CHECK(reference.device() == query.device() && labels.device() == query.device(),
              "vos_kernels::", op, ": query, reference and reference_labels must be on one device");
  TORCH_CHECK(query.dim() == 4, "vos_kernels::", op, ": query must be [B,H,W,C], got ",
              query.sizes());
  TORCH_CHECK(reference.dim() == 5, "vos_kernels::", op,
              ": reference must be [B,T,Hr,Wr,C], got ", reference.sizes());
  const int64_t B = query.size(0), H = query.size(1), W = query.size(2), C = query.size(3);
  TORCH_CHECK(reference.size(0) == B && reference.size(4) == C, "vos_kernels::", op,
              ": reference must be [B,T,Hr,Wr,C] with B=", B, " C=", C, ", got ",
              reference.sizes());
  const int64_t T = reference.size(1), Hr = reference.size(2), Wr = reference.size(3);
  TORCH_CHECK(labels.dim() == 4 && labels.size(0) == B && labels.size(1) == T &&
                  labels.size(2) == Hr && labels.size(3) == Wr,
              "vos_kernels::", op, ": reference_labels must be [B,T,Hr,Wr] = [", B, ",", T, ",",
              Hr, ",", Wr, "], got ", labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kInt || labels.scalar_type() == at::kLong,
              "vos_kernels::", op, ": reference_labels must be int32 or int64, got ",
              labels.scalar_type());
  TORCH_CHECK(L >= 1, "vos_kernels::", op, ": num_labels must be >= 1, got ", L);
  TORCH_CHECK(L < kInt32Max, "vos_kernels::", op, ": num_labels too large: ", L);
  TORCH_CHECK(rate >= 1, "vos_kernels::", op, ": atrous_rate must be >= 1, got ", rate);
  dtype_of(query, op, "query");
  dtype_of(reference, op, "reference");
  TORCH_CHECK(H * W < kInt32Max - 1024, "vos_kernels::", op, ": H*W = ", H * W,
              " query pixels exceed the int32 range of the kernel");
  TORCH_CHECK(T * Hr * Wr < kInt32Max, "vos_kernels::", op, ": T*Hr*Wr = ", T * Hr * Wr,
              " reference pixels exceed the int32 range of the kernel");
  TORCH_CHECK(C < kInt32Max / 8, "vos_kernels::", op, ": too many channels: ", C);
  // as the CPU op: one dtype for both (the output dtype follows the query, see _ops.py)
  TORCH_CHECK(reference.scalar_type() == query.scalar_type(), "vos_kernels::", op,
              ": query and reference dtypes differ (", query.scalar_type(), " vs ", reference.scalar_type(), ")");
  const at::ScalarType st = query.scalar_type();
  GlobalInputs in;
  in.q = query.to(st).contiguous();
  in.r = reference.to(st).contiguous();
  // clamp before the int32 cast: an int64 label of 2^32 would wrap to 0 (a real label);
  // out-of-range labels are ignored by the kernels (the Python API rejects them)
  in.lab = labels.clamp(-1, L).to(at::kInt).contiguous();
  in.s = GlobalMatchingShape{B, H * W, T, Hr, Wr, C, L, rate};
  in.dtype = dtype_of(in.q, op, "query");
  return in;
}

void launch_global(const GlobalInputs& in, const Tensor* bias, Tensor& out0, Tensor* out_bg,
                   Tensor& out_index, const char* op) {
  const int64_t ws_bytes = global_matching_workspace_bytes(in.s, in.dtype);
  Tensor ws = at::empty({ws_bytes > 0 ? ws_bytes : 1}, in.q.options().dtype(at::kByte));
  const int code = global_matching_launch(
      in.q.data_ptr(), in.r.data_ptr(), in.lab.data_ptr<int32_t>(),
      bias ? bias->data_ptr() : nullptr, out0.data_ptr(), out_bg ? out_bg->data_ptr() : nullptr,
      out_index.data_ptr<int64_t>(), in.s, in.dtype, matmul_precision(), ws.data_ptr(), ws_bytes,
      static_cast<int>(in.q.device().index()), current_stream(in.q));
  check_launch(code, op);
}

std::tuple<Tensor, Tensor> labelled_nearest_sqdist_cuda(const Tensor& query,
                                                        const Tensor& reference,
                                                        const Tensor& reference_labels,
                                                        int64_t num_labels,
                                                        int64_t atrous_rate) {
  const char* op = "labelled_nearest_sqdist";
  c10::DeviceGuard guard(query.device());
  GlobalInputs in = prepare_global(query, reference, reference_labels, num_labels, atrous_rate, op);
  const int64_t B = query.size(0), H = query.size(1), W = query.size(2);
  Tensor sq = at::empty({B, num_labels, H, W}, in.q.options().dtype(out_dtype(in.q)));
  Tensor idx = at::empty({B, num_labels, H, W}, in.q.options().dtype(at::kLong));
  if (sq.numel() == 0) return {sq, idx};
  launch_global(in, nullptr, sq, nullptr, idx, op);
  return {sq, idx};
}

std::tuple<Tensor, Tensor, Tensor> fb_global_matching_cuda(const Tensor& query,
                                                           const Tensor& reference,
                                                           const Tensor& reference_labels,
                                                           int64_t num_labels, const Tensor& bias,
                                                           int64_t atrous_rate) {
  const char* op = "fb_global_matching";
  c10::DeviceGuard guard(query.device());
  GlobalInputs in = prepare_global(query, reference, reference_labels, num_labels, atrous_rate, op);
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == num_labels, "vos_kernels::", op,
              ": bias must have shape [num_labels] = [", num_labels, "], got ", bias.sizes());
  TORCH_CHECK(at::isFloatingType(bias.scalar_type()), "vos_kernels::", op,
              ": bias must be a floating-point tensor, got ", bias.scalar_type());
  const at::ScalarType odt = out_dtype(in.q);
  const Tensor b = bias.to(in.q.device(), odt).contiguous();
  const int64_t B = query.size(0), H = query.size(1), W = query.size(2);
  Tensor fg = at::empty({B, num_labels, H, W}, in.q.options().dtype(odt));
  Tensor bg = at::empty({B, num_labels, H, W}, in.q.options().dtype(odt));
  Tensor idx = at::empty({B, num_labels, H, W}, in.q.options().dtype(at::kLong));
  if (fg.numel() == 0) return {fg, bg, idx};
  launch_global(in, &b, fg, &bg, idx, op);
  return {fg, bg, idx};
}

std::tuple<Tensor, Tensor> nearest_sqdist_backward_cuda(const Tensor& grad, const Tensor& query,
                                                        const Tensor& reference,
                                                        const Tensor& index) {
  const char* op = "nearest_sqdist_backward";
  c10::DeviceGuard guard(query.device());
  check_cuda(grad, op, "grad");
  check_cuda(query, op, "query");
  check_cuda(reference, op, "reference");
  check_cuda(index, op, "index");
  TORCH_CHECK(grad.device() == query.device() && reference.device() == query.device() &&
                  index.device() == query.device(),
              "vos_kernels::", op, ": all tensors must be on one device");
  TORCH_CHECK(query.dim() == 3 && reference.dim() == 3 && grad.dim() == 3 && index.dim() == 3,
              "vos_kernels::", op,
              ": expects grad [B,M,Nq], query [B,Nq,C], reference [B,Nr,C], index [B,M,Nq]");
  const int64_t B = query.size(0), Nq = query.size(1), C = query.size(2);
  const int64_t Nr = reference.size(1), M = grad.size(1);
  TORCH_CHECK(reference.size(0) == B && reference.size(2) == C, "vos_kernels::", op,
              ": reference ", reference.sizes(), " does not match query ", query.sizes());
  TORCH_CHECK(grad.sizes() == index.sizes() && grad.size(0) == B && grad.size(2) == Nq,
              "vos_kernels::", op, ": grad ", grad.sizes(), " and index ", index.sizes(),
              " must both be [B,M,Nq] = [", B, ",", M, ",", Nq, "]");
  TORCH_CHECK(index.scalar_type() == at::kLong || index.scalar_type() == at::kInt,
              "vos_kernels::", op, ": index must be int64 or int32, got ", index.scalar_type());
  TORCH_CHECK(at::isFloatingType(grad.scalar_type()), "vos_kernels::", op,
              ": grad must be floating point, got ", grad.scalar_type());
  dtype_of(query, op, "query");
  dtype_of(reference, op, "reference");
  // Computed and returned in float64 for float64 queries, else float32.
  const at::ScalarType odt = out_dtype(query);
  const Tensor q = query.to(odt).contiguous();
  const Tensor r = reference.to(odt).contiguous();
  const Tensor g = grad.to(odt).contiguous();
  const Tensor idx = index.to(at::kLong).contiguous();
  Tensor gq = at::empty({B, Nq, C}, q.options());
  Tensor gr = at::empty({B, Nr, C}, q.options());
  if (gq.numel() == 0 && gr.numel() == 0) return {gq, gr};
  TORCH_CHECK(B * Nq / 8 < kInt32Max && B * Nr / 8 < kInt32Max, "vos_kernels::", op,
              ": too many pixels for the kernel grid");
  // Pairs sorted by (b * Nr + index), stably (ties keep the original (b, m, p) order);
  // skipped entries (index outside [0, Nr)) get the key B*Nr and sort last.
  const Tensor boff = at::arange(B, idx.options()).mul_(Nr).view({B, 1, 1});
  const Tensor valid = idx.ge(0).logical_and_(idx.lt(Nr));
  const Tensor keys = at::where(valid, idx + boff, at::Scalar(B * Nr)).reshape({-1}).contiguous();
  auto sorted = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const Tensor sk = std::get<0>(sorted).contiguous();
  const Tensor order = std::get<1>(sorted).contiguous();
  const int64_t ws_bytes = nearest_sqdist_backward_workspace_bytes(B, Nr);
  Tensor ws = at::empty({ws_bytes}, q.options().dtype(at::kByte));
  const int code = nearest_sqdist_backward_launch(
      g.data_ptr(), q.data_ptr(), r.data_ptr(), idx.data_ptr<int64_t>(), sk.data_ptr<int64_t>(),
      order.data_ptr<int64_t>(), gq.data_ptr(), gr.data_ptr(), B, M, Nq, Nr, C,
      dtype_of(q, op, "query"), ws.data_ptr(), ws_bytes, current_stream(q));
  check_launch(code, op);
  return {gq, gr};
}

}  // namespace
}  // namespace cuda
}  // namespace vos

TORCH_LIBRARY_IMPL(vos_kernels, CUDA, m) {
  m.impl("labelled_nearest_sqdist", &vos::cuda::labelled_nearest_sqdist_cuda);
  m.impl("fb_global_matching", &vos::cuda::fb_global_matching_cuda);
  m.impl("nearest_sqdist_backward", &vos::cuda::nearest_sqdist_backward_cuda);
}
