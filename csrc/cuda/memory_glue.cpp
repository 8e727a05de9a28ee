// ATen glue of the CUDA kernel of topk_memory_read (csrc/cuda/memory_read.cu): argument
// checks, contiguous inputs, outputs and workspace, the launch on the current stream.
// float16 / bfloat16 keys are converted to float32 here (the affinity then takes one TF32
// product, exact for them); their values are read in their own dtype by the readout.
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "cuda/glue.h"
#include "cuda/memory_read.h"

namespace vos_kernels {
namespace {

using at::Tensor;

std::tuple<Tensor, Tensor, Tensor> topk_memory_read_cuda(const Tensor& query_key, const Tensor& memory_key,
                                                         const Tensor& memory_value, int64_t k, double scale,
                                                         const std::optional<Tensor>& usage, int64_t usage_mode) {
  constexpr const char* op = "topk_memory_read";
  TORCH_CHECK(query_key.dim() == 3 && memory_key.dim() == 3 && memory_value.dim() == 3, "vos_kernels::", op,
              ": expected query_key [B,Nq,CK], memory_key [B,Nm,CK], memory_value [B,Nm,CV], got ",
              query_key.sizes(), ", ", memory_key.sizes(), ", ", memory_value.sizes());
  vos::cuda::check_cuda(query_key, op, "query_key");
  vos::cuda::check_cuda(memory_key, op, "memory_key");
  vos::cuda::check_cuda(memory_value, op, "memory_value");
  TORCH_CHECK(memory_key.device() == query_key.device() && memory_value.device() == query_key.device(),
              "vos_kernels::", op, ": query_key, memory_key and memory_value must be on one device");
  const vos::cuda::Dtype dt = vos::cuda::dtype_of(query_key, op, "query_key");
  TORCH_CHECK(memory_key.scalar_type() == query_key.scalar_type() &&
                  memory_value.scalar_type() == query_key.scalar_type(),
              "vos_kernels::", op, ": query_key, memory_key and memory_value must have one dtype, got ",
              query_key.scalar_type(), ", ", memory_key.scalar_type(), ", ", memory_value.scalar_type());
  const int64_t B = query_key.size(0), Nq = query_key.size(1), CK = query_key.size(2);
  const int64_t Nm = memory_key.size(1), CV = memory_value.size(2);
  TORCH_CHECK(memory_key.size(0) == B && memory_key.size(2) == CK && memory_value.size(0) == B &&
                  memory_value.size(1) == Nm,
              "vos_kernels::", op, ": shapes do not agree: query_key ", query_key.sizes(), ", memory_key ",
              memory_key.sizes(), ", memory_value ", memory_value.sizes());
  TORCH_CHECK(k >= 1, "vos_kernels::", op, ": k must be >= 1, got ", k);
  TORCH_CHECK(Nm >= 1, "vos_kernels::", op, ": the memory is empty");
  TORCH_CHECK(Nm <= std::numeric_limits<int32_t>::max(), "vos_kernels::", op,
              ": more than 2^31 - 1 memory entries are not supported, got ", Nm);
  TORCH_CHECK(usage_mode >= 0 && usage_mode <= 2, "vos_kernels::", op, ": usage_mode must be 0, 1 or 2, got ",
              usage_mode);
  const bool use_usage = usage.has_value() && usage_mode != 0;
  if (use_usage) {
    const Tensor& u = *usage;
    TORCH_CHECK(u.dim() == 2 && u.size(0) == B && u.size(1) == Nm && u.scalar_type() == at::kFloat,
                "vos_kernels::", op, ": usage must be float32 [B, Nm] = [", B, ", ", Nm, "], got ", u.scalar_type(),
                " ", u.sizes());
    TORCH_CHECK(u.device() == query_key.device(), "vos_kernels::", op, ": usage must be on ", query_key.device(),
                ", got ", u.device());
  }

  c10::DeviceGuard guard(query_key.device());
  const int64_t K = std::min(k, Nm);
  const at::ScalarType odt = vos::cuda::out_dtype(query_key);
  const auto opts = query_key.options();
  Tensor out = at::empty({B, Nq, CV}, opts.dtype(odt));
  Tensor index = at::empty({B, Nq, K}, opts.dtype(at::kLong));
  Tensor weight = at::empty({B, Nq, K}, opts.dtype(odt));
  if (B == 0 || Nq == 0) return {out, index, weight};

  const bool half = dt == vos::cuda::Dtype::kFloat16 || dt == vos::cuda::Dtype::kBFloat16;
  const Tensor q = half ? query_key.to(at::kFloat).contiguous() : query_key.contiguous();
  const Tensor m = half ? memory_key.to(at::kFloat).contiguous() : memory_key.contiguous();
  const Tensor v = memory_value.contiguous();
  const vos::cuda::Dtype key_dt = dt == vos::cuda::Dtype::kFloat64 ? dt : vos::cuda::Dtype::kFloat32;
  const vos::cuda::MatmulPrecision prec =
      half ? vos::cuda::MatmulPrecision::kTF32 : vos::cuda::matmul_precision();
  const int mode = use_usage ? static_cast<int>(usage_mode) : 0;
  const int device = query_key.get_device();

  const int64_t ws_bytes = vos::cuda::topk_memory_read_workspace_bytes(B, Nq, Nm, CK, K, key_dt, mode, device);
  TORCH_CHECK(ws_bytes >= 0, "vos_kernels::", op, ": could not size the workspace");
  Tensor ws = at::empty({ws_bytes}, opts.dtype(at::kByte));

  float* u_ptr = nullptr;
  int64_t usb = 0, usn = 0;
  if (use_usage) {
    u_ptr = usage->data_ptr<float>();
    usb = usage->stride(0);
    usn = usage->stride(1);
  }
  const int code = vos::cuda::topk_memory_read(
      q.data_ptr(), m.data_ptr(), key_dt, v.data_ptr(), dt, prec, B, Nq, Nm, CK, CV, K, scale, u_ptr, usb, usn, mode,
      out.data_ptr(), index.data_ptr<int64_t>(), weight.data_ptr(), ws.data_ptr(), ws_bytes, device,
      vos::cuda::current_stream(query_key));
  vos::cuda::check_launch(code, op);
  return {out, index, weight};
}

}  // namespace

TORCH_LIBRARY_IMPL(vos_kernels, CUDA, m) { m.impl("topk_memory_read", &topk_memory_read_cuda); }

}  // namespace vos_kernels
