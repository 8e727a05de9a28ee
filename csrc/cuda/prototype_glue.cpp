// ATen glue of the CUDA prototype_attention and prototype_values kernels
// (csrc/cuda/prototype.cu).
#include <torch/library.h>

#include <tuple>

#include "cuda/glue.h"
#include "cuda/prototype.h"

namespace vos {
namespace cuda {
namespace {

at::Tensor prototype_values_cuda(const at::Tensor& values_in, const at::Tensor& resp_in) {
  const char* op = "prototype_values";
  check_cuda(values_in, op, "values");
  check_cuda(resp_in, op, "resp");
  TORCH_CHECK(values_in.dim() == 3 && resp_in.dim() == 3,
              "vos_kernels::prototype_values: expected values [B,N,CV] and resp [B,N,K], got ", values_in.sizes(),
              " and ", resp_in.sizes());
  TORCH_CHECK(resp_in.size(0) == values_in.size(0) && resp_in.size(1) == values_in.size(1),
              "vos_kernels::prototype_values: resp ", resp_in.sizes(), " does not match values ", values_in.sizes());
  TORCH_CHECK(resp_in.device() == values_in.device(),
              "vos_kernels::prototype_values: resp must be on the device of values (", values_in.device(), "), got ",
              resp_in.device());
  const Dtype dt = dtype_of(values_in, op, "values");
  TORCH_CHECK(resp_in.scalar_type() == values_in.scalar_type(),
              "vos_kernels::prototype_values: resp must have the dtype of values (", values_in.scalar_type(),
              "), got ", resp_in.scalar_type());
  const int64_t B = values_in.size(0), N = values_in.size(1), CV = values_in.size(2), K = resp_in.size(2);
  c10::DeviceGuard guard(values_in.device());
  const at::TensorOptions opts = values_in.options().dtype(out_dtype(values_in));
  if (B == 0 || K == 0 || CV == 0) return at::empty({B, K, CV}, opts);
  if (N == 0) return at::zeros({B, K, CV}, opts);  // 0 / (1e-6 + 0) = 0
  const at::Tensor v = values_in.contiguous(), r = resp_in.contiguous();
  at::Tensor out = at::empty({B, K, CV}, opts);
  const int64_t ws_bytes = prototype_values_workspace_bytes(B, N, CV, K, dt);
  at::Tensor ws;
  if (ws_bytes > 0) ws = at::empty({ws_bytes}, v.options().dtype(at::kByte));
  const int code = prototype_values(v.data_ptr(), r.data_ptr(), out.data_ptr(), ws.defined() ? ws.data_ptr() : nullptr,
                                    ws_bytes, B, N, CV, K, dt, matmul_precision(), current_stream(v));
  check_launch(code, op);
  return out;
}

std::tuple<at::Tensor, at::Tensor> prototype_attention_cuda(const at::Tensor& query_in, const at::Tensor& keys_in,
                                                            const at::Tensor& values_in, double kappa,
                                                            int64_t kernel) {
  const char* op = "prototype_attention";
  check_cuda(query_in, op, "query");
  check_cuda(keys_in, op, "proto_keys");
  check_cuda(values_in, op, "proto_values");
  TORCH_CHECK(query_in.dim() == 3 && keys_in.dim() == 3 && values_in.dim() == 3,
              "vos_kernels::prototype_attention: expected query [B,Nq,C], proto_keys [B,K,C], proto_values "
              "[B,K,CV], got ",
              query_in.sizes(), ", ", keys_in.sizes(), ", ", values_in.sizes());
  const int64_t B = query_in.size(0), Nq = query_in.size(1), C = query_in.size(2);
  const int64_t K = keys_in.size(1), CV = values_in.size(2);
  TORCH_CHECK(keys_in.size(0) == B && keys_in.size(2) == C && values_in.size(0) == B && values_in.size(1) == K,
              "vos_kernels::prototype_attention: shapes do not agree: query ", query_in.sizes(), ", proto_keys ",
              keys_in.sizes(), ", proto_values ", values_in.sizes());
  TORCH_CHECK(keys_in.device() == query_in.device() && values_in.device() == query_in.device(),
              "vos_kernels::prototype_attention: proto_keys and proto_values must be on the device of query (",
              query_in.device(), "), got ", keys_in.device(), " and ", values_in.device());
  const Dtype dt = dtype_of(query_in, op, "query");
  TORCH_CHECK(keys_in.scalar_type() == query_in.scalar_type() && values_in.scalar_type() == query_in.scalar_type(),
              "vos_kernels::prototype_attention: proto_keys and proto_values must have the dtype of query (",
              query_in.scalar_type(), "), got ", keys_in.scalar_type(), " and ", values_in.scalar_type());
  TORCH_CHECK(kernel == 0 || kernel == 1,
              "vos_kernels::prototype_attention: kernel must be 0 (dot) or 1 (l2), got ", kernel);
  c10::DeviceGuard guard(query_in.device());
  const at::TensorOptions opts = query_in.options().dtype(out_dtype(query_in));
  at::Tensor out = at::empty({B, Nq, CV}, opts);
  at::Tensor attn = at::empty({B, Nq, K}, opts);
  if (B == 0 || Nq == 0) return {out, attn};
  if (K == 0) {
    out.zero_();
    return {out, attn};
  }
  const at::Tensor q = query_in.contiguous(), k = keys_in.contiguous(), v = values_in.contiguous();
  const int code = prototype_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), attn.data_ptr(), B,
                                       Nq, C, K, CV, kappa, static_cast<int>(kernel), dt, matmul_precision(),
                                       current_stream(q));
  check_launch(code, op);
  return {out, attn};
}

}  // namespace
}  // namespace cuda
}  // namespace vos

TORCH_LIBRARY_IMPL(vos_kernels, CUDA, m) {
  m.impl("prototype_values", &vos::cuda::prototype_values_cuda);
  m.impl("prototype_attention", &vos::cuda::prototype_attention_cuda);
}
