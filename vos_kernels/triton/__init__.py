"""Triton backend of vos_kernels (CUDA; CPU tensors under ``TRITON_INTERPRET=1``).

The entry points live in :mod:`vos_kernels.triton.matching` (CFBI matching) and
:mod:`vos_kernels.triton.memory` (top-k memory read) and :mod:`vos_kernels.triton.gmm`
(GMM prototypes, A-GAME Gaussians). They are re-exported here
lazily, so that importing this package does not import ``triton`` (set
``TRITON_INTERPRET=1`` before the first access if the kernels must run on CPU).
"""

__all__ = [
    "labelled_nearest_sqdist",
    "fb_global_matching",
    "fb_multi_local_matching",
    "fb_instance_pooling",
    "nearest_sqdist_backward",
    "topk_memory_read",
    "gmm_em",
    "prototype_values",
    "prototype_attention",
    "diag_gmm_log_prob",
    "diag_gmm_log_prob_backward",
    "diag_gmm_fit",
    "diag_gmm_fit_backward",
]

_MODULE = {"topk_memory_read": "memory", "gmm_em": "gmm", "prototype_values": "gmm", "prototype_attention": "gmm",
           "diag_gmm_log_prob": "gmm", "diag_gmm_log_prob_backward": "gmm", "diag_gmm_fit": "gmm",
           "diag_gmm_fit_backward": "gmm"}


def __getattr__(name):
    if name in __all__:
        import importlib

        module = importlib.import_module(f"{__name__}.{_MODULE.get(name, 'matching')}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
