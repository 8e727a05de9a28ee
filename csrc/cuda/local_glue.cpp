// ATen glue of the CUDA kernels of fb_multi_local_matching and fb_instance_pooling
// (local_matching.cu). Semantics: csrc/cpu/matching.cpp; shapes: vos_kernels/_ops.py.
// Labels are not range-checked here (that would need a device sync): the Python API
// validates them, and the kernels never match a label outside [0, num_labels).
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "cuda/glue.h"
#include "cuda/local_matching.h"

namespace vos {
namespace cuda {
namespace {

void check_labels_dtype(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, "vos_kernels::", op,
              ": ", name, " must be int32 or int64, got ", t.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fb_multi_local_matching_cuda(
    const at::Tensor& query, const at::Tensor& previous, const at::Tensor& previous_labels,
    int64_t num_labels, c10::IntArrayRef windows, const at::Tensor& bias, int64_t atrous_rate) {
  constexpr const char* op = "fb_multi_local_matching";
  check_cuda(query, op, "query");
  check_cuda(previous, op, "previous");
  check_cuda(previous_labels, op, "previous_labels");
  TORCH_CHECK(previous.device() == query.device() && previous_labels.device() == query.device(),
              "vos_kernels::", op, ": query, previous and previous_labels must be on one device");
  const Dtype dt = dtype_of(query, op, "query");
  TORCH_CHECK(previous.scalar_type() == query.scalar_type(), "vos_kernels::", op,
              ": query and previous dtypes differ (", query.scalar_type(), " vs ",
              previous.scalar_type(), ")");
  TORCH_CHECK(query.dim() == 4, "vos_kernels::", op, ": query must be [B,H,W,C], got ",
              query.sizes());
  TORCH_CHECK(previous.sizes() == query.sizes(), "vos_kernels::", op,
              ": previous must have the shape of query ", query.sizes(), ", got ",
              previous.sizes());
  const int64_t B = query.size(0), H = query.size(1), W = query.size(2), C = query.size(3);
  check_labels_dtype(previous_labels, op, "previous_labels");
  TORCH_CHECK(previous_labels.dim() == 3 && previous_labels.size(0) == B &&
                  previous_labels.size(1) == H && previous_labels.size(2) == W,
              "vos_kernels::", op, ": previous_labels must be [B,H,W] = [", B, ",", H, ",", W,
              "], got ", previous_labels.sizes());
  TORCH_CHECK(num_labels >= 1, "vos_kernels::", op, ": num_labels must be >= 1, got ",
              num_labels);
  TORCH_CHECK(num_labels < std::numeric_limits<int32_t>::max(), "vos_kernels::", op,
              ": num_labels too large: ", num_labels);
  TORCH_CHECK(atrous_rate >= 1, "vos_kernels::", op, ": atrous_rate must be >= 1, got ",
              atrous_rate);
  const int64_t K = static_cast<int64_t>(windows.size());
  TORCH_CHECK(K >= 1, "vos_kernels::", op, ": windows must not be empty");
  for (int64_t k = 0; k < K; ++k) {
    TORCH_CHECK(windows[k] >= 1 && windows[k] <= std::numeric_limits<int32_t>::max() &&
                    (k == 0 || windows[k] > windows[k - 1]),
                "vos_kernels::", op, ": windows must be strictly ascending ints >= 1, got ",
                windows);
  }
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == num_labels, "vos_kernels::", op,
              ": bias must have shape [num_labels] = [", num_labels, "], got ", bias.sizes());

  c10::DeviceGuard guard(query.device());
  const at::ScalarType ot = out_dtype(query);
  const auto opts = query.options().dtype(ot);
  at::Tensor fg = at::empty({B, num_labels, K, H, W}, opts);
  at::Tensor bg = at::empty({B, num_labels, K, H, W}, opts);
  at::Tensor idx = at::empty({B, num_labels, K, H, W}, query.options().dtype(at::kLong));
  if (fg.numel() == 0) return {fg, bg, idx};

  const at::Tensor q = query.contiguous();
  const at::Tensor p = previous.contiguous();
  // clamp before the int32 cast: an int64 label of 2^32 would wrap to 0 (a real label);
  // out-of-range labels are ignored by the kernels (the Python API rejects them)
  const at::Tensor lab = previous_labels.clamp(-1, num_labels).to(at::kInt).contiguous();
  const at::Tensor b = bias.to(query.device(), ot).contiguous();
  std::vector<int32_t> wv(windows.begin(), windows.end());
  const at::Tensor wt =
      at::from_blob(wv.data(), {K}, at::TensorOptions().dtype(at::kInt)).to(query.device());
  const int code = fb_multi_local_matching_forward(
      dt, q.data_ptr(), p.data_ptr(), lab.data_ptr<int32_t>(), wt.data_ptr<int32_t>(), K,
      windows[K - 1], b.data_ptr(), B, H, W, C, num_labels, atrous_rate, fg.data_ptr(),
      bg.data_ptr(), idx.data_ptr<int64_t>(), current_stream(query));
  check_launch(code, op);
  return {fg, bg, idx};
}

at::Tensor fb_instance_pooling_cuda(const at::Tensor& embedding, const at::Tensor& labels,
                                    int64_t num_labels) {
  constexpr const char* op = "fb_instance_pooling";
  check_cuda(embedding, op, "embedding");
  check_cuda(labels, op, "labels");
  TORCH_CHECK(labels.device() == embedding.device(), "vos_kernels::", op,
              ": embedding and labels must be on one device");
  const Dtype dt = dtype_of(embedding, op, "embedding");
  TORCH_CHECK(embedding.dim() == 4, "vos_kernels::", op, ": embedding must be [B,H,W,C], got ",
              embedding.sizes());
  const int64_t B = embedding.size(0), H = embedding.size(1), W = embedding.size(2),
                C = embedding.size(3);
  check_labels_dtype(labels, op, "labels");
  TORCH_CHECK(labels.dim() == 3 && labels.size(0) == B && labels.size(1) == H &&
                  labels.size(2) == W,
              "vos_kernels::", op, ": labels must be [B,H,W] = [", B, ",", H, ",", W,
              "], got ", labels.sizes());
  TORCH_CHECK(num_labels >= 1, "vos_kernels::", op, ": num_labels must be >= 1, got ",
              num_labels);

  c10::DeviceGuard guard(embedding.device());
  at::Tensor out = at::empty({B, num_labels, 2, C}, embedding.options().dtype(out_dtype(embedding)));
  if (out.numel() == 0) return out;
  const at::Tensor e = embedding.contiguous();
  // clamp before the int32 cast: an int64 label of 2^32 would wrap to 0 (a real label);
  // out-of-range labels are ignored by the kernels (the Python API rejects them)
  const at::Tensor lab = labels.clamp(-1, num_labels).to(at::kInt).contiguous();
  const int64_t ws_bytes = fb_instance_pooling_workspace_bytes(B, H, W, C, num_labels);
  at::Tensor ws = at::empty({ws_bytes > 0 ? ws_bytes : 1}, embedding.options().dtype(at::kByte));
  const int code = fb_instance_pooling_forward(dt, e.data_ptr(), lab.data_ptr<int32_t>(), B, H,
                                               W, C, num_labels, out.data_ptr(), ws.data_ptr(),
                                               ws_bytes, current_stream(embedding));
  check_launch(code, op);
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace vos

TORCH_LIBRARY_IMPL(vos_kernels, CUDA, m) {
  m.impl("fb_multi_local_matching", &vos::cuda::fb_multi_local_matching_cuda);
  m.impl("fb_instance_pooling", &vos::cuda::fb_instance_pooling_cuda);
}
