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
}

#ifdef VOS_KERNELS_PYTHON_MODULE
// `import vos_kernels._C` loads this shared object, which runs the registrations above.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "vos_kernels operator library", -1, nullptr};
  return PyModule_Create(&module_def);
}
#endif
