// ATen glue of the CUDA gmm_em kernel (csrc/cuda/gmm.cu).
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "cuda/glue.h"
#include "cuda/gmm.h"

namespace vos {
namespace cuda {
namespace {

std::tuple<at::Tensor, at::Tensor> gmm_em_cuda(const at::Tensor& x_in, const at::Tensor& means_in, int64_t num_iters,
                                               double kappa, const std::optional<at::Tensor>& mask_in, int64_t kernel,
                                               bool normalize_means) {
  const char* op = "gmm_em";
  check_cuda(x_in, op, "x");
  check_cuda(means_in, op, "means");
  TORCH_CHECK(x_in.dim() == 3, "vos_kernels::gmm_em: expected x [B,N,C], got ", x_in.sizes());
  TORCH_CHECK(means_in.dim() == 3 && means_in.size(0) == x_in.size(0) && means_in.size(2) == x_in.size(2),
              "vos_kernels::gmm_em: expected means [B,K,C] with B, C of x ", x_in.sizes(), ", got ", means_in.sizes());
  TORCH_CHECK(means_in.device() == x_in.device(), "vos_kernels::gmm_em: means must be on the device of x (",
              x_in.device(), "), got ", means_in.device());
  const Dtype dt = dtype_of(x_in, op, "x");
  TORCH_CHECK(means_in.scalar_type() == x_in.scalar_type(), "vos_kernels::gmm_em: means must have the dtype of x (",
              x_in.scalar_type(), "), got ", means_in.scalar_type());
  TORCH_CHECK(num_iters >= 1, "vos_kernels::gmm_em: num_iters must be >= 1, got ", num_iters);
  TORCH_CHECK(kernel == 0 || kernel == 1, "vos_kernels::gmm_em: kernel must be 0 (dot) or 1 (l2), got ", kernel);
  TORCH_CHECK(std::isfinite(kappa), "vos_kernels::gmm_em: kappa must be finite, got ", kappa);
  const int64_t B = x_in.size(0), N = x_in.size(1), C = x_in.size(2), K = means_in.size(1);
  const at::ScalarType ot = out_dtype(x_in);
  at::Tensor mask;
  if (mask_in.has_value()) {
    check_cuda(*mask_in, op, "mask");
    TORCH_CHECK(mask_in->device() == x_in.device(), "vos_kernels::gmm_em: mask must be on the device of x (",
                x_in.device(), "), got ", mask_in->device());
    TORCH_CHECK(mask_in->dim() == 2 && mask_in->size(0) == B && mask_in->size(1) == N,
                "vos_kernels::gmm_em: expected mask [B,N] = [", B, ",", N, "], got ", mask_in->sizes());
    TORCH_CHECK(at::isFloatingType(mask_in->scalar_type()) || mask_in->scalar_type() == at::kBool,
                "vos_kernels::gmm_em: mask must be a floating-point (or bool) tensor, got ", mask_in->scalar_type());
    mask = mask_in->to(ot).contiguous();
  }
  c10::DeviceGuard guard(x_in.device());
  const at::TensorOptions opts = x_in.options().dtype(ot);
  at::Tensor resp = at::empty({B, N, K}, opts);
  if (B == 0 || K == 0) return {means_in.to(ot).contiguous().clone(), resp};
  if (N == 0) return {at::zeros({B, K, C}, opts), resp};  // Σ z = 0: μ = 0 / (1e-6 + 0) = 0
  const at::Tensor x = x_in.contiguous();
  const at::Tensor means = means_in.to(ot).contiguous();
  at::Tensor out = at::empty({B, K, C}, opts);
  const int64_t ws_bytes = gmm_em_workspace_bytes(B, N, C, K, dt);
  TORCH_CHECK(ws_bytes > 0, "vos_kernels::gmm_em: no launch configuration for B=", B, " N=", N, " C=", C, " K=", K,
              " on this device");
  at::Tensor ws = at::empty({ws_bytes}, x.options().dtype(at::kByte));
  const int code = gmm_em(x.data_ptr(), means.data_ptr(), mask.defined() ? mask.data_ptr() : nullptr, out.data_ptr(),
                          resp.data_ptr(), ws.data_ptr(), ws_bytes, B, N, C, K, num_iters, kappa,
                          static_cast<int>(kernel), normalize_means, dt, matmul_precision(), current_stream(x));
  check_launch(code, op);
  return {out, resp};
}

}  // namespace
}  // namespace cuda
}  // namespace vos

TORCH_LIBRARY_IMPL(vos_kernels, CUDA, m) { m.impl("gmm_em", &vos::cuda::gmm_em_cuda); }
