"""vos_kernels: fused CPU / CUDA / Triton kernels for matching-based video object segmentation.

Public ops (``torch.ops.vos_kernels.*`` underneath): :func:`labelled_nearest_sqdist`,
:func:`fb_global_matching`, :func:`fb_multi_local_matching`, :func:`fb_instance_pooling`,
:func:`topk_memory_read`, :func:`gmm_em`, :func:`prototype_values`,
:func:`prototype_attention`, :func:`diag_gmm_log_prob`, :func:`diag_gmm_fit`.
Naive PyTorch oracles: :mod:`vos_kernels.reference`. CFBI drop-ins:
:mod:`vos_kernels.compat.cfbi`. Backend choice: :func:`set_backend`,
:func:`available_backends`, :func:`cuda_cpp_ops`.
"""
from . import _ops  # noqa: F401  (loads the operator library and registers kernels)
from ._backend import BACKENDS, available_backends, cuda_cpp_ops, get_backend, set_backend
from .matching import fb_global_matching, fb_instance_pooling, fb_multi_local_matching, labelled_nearest_sqdist
from .gmm import diag_gmm_fit, diag_gmm_log_prob, gmm_em, prototype_attention, prototype_values
from .memory import topk_memory_read
from .memory_bank import LFUMemoryBank

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "LFUMemoryBank",
    "available_backends",
    "cuda_cpp_ops",
    "diag_gmm_fit",
    "diag_gmm_log_prob",
    "fb_global_matching",
    "fb_instance_pooling",
    "fb_multi_local_matching",
    "get_backend",
    "gmm_em",
    "labelled_nearest_sqdist",
    "prototype_attention",
    "prototype_values",
    "set_backend",
    "topk_memory_read",
]
