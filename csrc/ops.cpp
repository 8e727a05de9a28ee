// Operator schemas of vos_kernels.
//
// Every public op is declared here with TORCH_LIBRARY; the CPU kernels register
// themselves in csrc/cpu/*.cpp with TORCH_LIBRARY_IMPL. The CUDA kernels (Triton, and
// CUDA C++ when built), the fake (meta) kernels and autograd are registered from Python
// in vos_kernels/_ops.py. Semantics: ../shared/spec/api.md and docs/internals.md.

#include <torch/library.h>

#ifdef VOS_KERNELS_PYTHON_MODULE
#include <Python.h>
#endif

TORCH_LIBRARY(vos_kernels, m) {
  // Per-label nearest squared distance over a labelled reference (CFBI+ eq. 2, 8-9).
  m.def(
      "labelled_nearest_sqdist(Tensor query, Tensor reference, Tensor reference_labels, "
      "int num_labels, int atrous_rate=1) -> (Tensor sqdist, Tensor index)");
  // Foreground-background global matching (CFBI+ eq. 2-3, 8-9). The third output is the
  // argmin reference index, saved for the backward pass.
  m.def(
      "fb_global_matching(Tensor query, Tensor reference, Tensor reference_labels, "
      "int num_labels, Tensor bias, int atrous_rate=1) -> (Tensor fg, Tensor bg, Tensor index)");
  // Foreground-background multi-local matching (CFBI+ eq. 4-7, 10-12).
  m.def(
      "fb_multi_local_matching(Tensor query, Tensor previous, Tensor previous_labels, "
      "int num_labels, int[] windows, Tensor bias, int atrous_rate=1) "
      "-> (Tensor fg, Tensor bg, Tensor index)");
  // Instance-level fg/bg mean pooling (CFBI networks/layers/attention.py).
  m.def("fb_instance_pooling(Tensor embedding, Tensor labels, int num_labels) -> Tensor");
  // Backward of every nearest-distance op: the gradient of ‖e_p − e_q*‖² flows to the
  // saved argmin pair only.
  m.def(
      "nearest_sqdist_backward(Tensor grad, Tensor query, Tensor reference, Tensor index) "
      "-> (Tensor grad_query, Tensor grad_reference)");
  // Top-k memory read (STCN inference read, XMem/AMM usage counters): affinity
  // (2 m·q − ‖m‖²)·scale tile by tile, top-k per query (ties: lowest index), softmax over
  // the k' = min(k, Nm) values with the max subtracted, gather readout. `usage` [B, Nm]
  // float32 is updated in place (usage_mode 0: none, 1: hits, 2: softmax weights).
  // index and weight (the softmax weights) are saved for the backward pass.
  m.def(
      "topk_memory_read(Tensor query_key, Tensor memory_key, Tensor memory_value, int k, "
      "float scale, Tensor(a!)? usage, int usage_mode) -> (Tensor readout, Tensor index, Tensor weight)");
  // GMM prototypes (PCAN _em_iter / EMANet EMAU): num_iters fused EM iterations. E-step
  // logits kappa·x·mu ("dot", kernel 0) or kappa·x·mu − kappa/2·‖mu‖² ("l2", kernel 1: the
  // paper's −kappa/2·‖x − mu‖² without the per-point constant −kappa/2·‖x‖², which cancels
  // in the softmax); max-subtracted softmax over K; times mask [B,N] (optional, float32 /
  // float64); M-step mu_k = Σ_n z_nk x_n / (1e-6 + Σ_n z_nk), then mu_k /= (1e-6 + ‖mu_k‖)
  // when normalize_means. Returns the means and the last E-step's masked softmax (resp).
  m.def(
      "gmm_em(Tensor x, Tensor means, int num_iters, float kappa, Tensor? mask, int kernel, "
      "bool normalize_means) -> (Tensor means_out, Tensor resp)");
  // Value prototypes (PCAN em_match_head nu): Σ_n r_nk v_n / (1e-6 + Σ_n r_nk).
  m.def("prototype_values(Tensor values, Tensor resp) -> Tensor");
  // Prototype read (PCAN _prop + read): softmax_K(logits(query, keys)) · values; the
  // softmax weights `attn` [B,Nq,K] are returned for the backward pass.
  m.def(
      "prototype_attention(Tensor query, Tensor proto_keys, Tensor proto_values, float kappa, "
      "int kernel) -> (Tensor out, Tensor attn)");
  // A-GAME diagonal Gaussian log-likelihood: −½ Σ_d (log var_kd + (x_nd − mean_kd)² / var_kd).
  m.def("diag_gmm_log_prob(Tensor x, Tensor mean, Tensor var) -> Tensor");
  m.def(
      "diag_gmm_log_prob_backward(Tensor grad, Tensor x, Tensor mean, Tensor var) "
      "-> (Tensor grad_x, Tensor grad_mean, Tensor grad_var)");
  // A-GAME weighted fit, two passes over x: mean = Σ w x / (1 + S),
  // var = var_reg + Σ w (x − mean)² / (1 + S), S = Σ_n w.
  m.def("diag_gmm_fit(Tensor x, Tensor weights, Tensor var_reg) -> (Tensor mean, Tensor var)");
  // Its backward recomputes Σ w (x − mean)² from x, weights and mean (no var − var_reg
  // cancellation); grad_var_reg = Σ_b grad_var is taken in Python.
  m.def(
      "diag_gmm_fit_backward(Tensor grad_mean, Tensor grad_var, Tensor x, Tensor weights, Tensor mean) "
      "-> (Tensor grad_x, Tensor grad_weights)");
}

#ifdef VOS_KERNELS_PYTHON_MODULE
// `import vos_kernels._C` loads this shared object, which runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "vos_kernels operator library", -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif
