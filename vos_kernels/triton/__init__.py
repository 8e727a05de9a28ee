"""Triton backend of vos_kernels (CUDA; CPU tensors under ``TRITON_INTERPRET=1``).

The entry points live in :mod:`vos_kernels.triton.matching` (CFBI matching) and
:mod:`vos_kernels.triton.memory` (top-k memory read) and :mod:`vos_kernels.triton.gmm`
(GMM prototypes, A-GAME Gaussians). They are re-exported here
lazily, so that importing this package does not import ``triton`` (set
``TRITON_INTERPRET=1`` before the first access if the kernels must run on CPU).

The names exported here are the op entries: the module's host function, run over batch
slices when the batch is larger than CUDA's grid allows (``_limits.py``). The module
functions themselves launch one grid (and raise ValueError past its limit).
"""
import torch

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


# Positions of each op's batched tensor arguments (dim 0 is the batch B; None allowed for
# the optional ones). The others (bias [L], var_reg [K, D], ints, floats) are shared.
BATCHED_ARGS = {
    "labelled_nearest_sqdist": (0, 1, 2),
    "fb_global_matching": (0, 1, 2),
    "fb_multi_local_matching": (0, 1, 2),
    "fb_instance_pooling": (0, 1),
    "nearest_sqdist_backward": (0, 1, 2, 3),
    "topk_memory_read": (0, 1, 2, 5),           # usage [B, Nm]: updated in place, a view per slice
    "gmm_em": (0, 1, 4),
    "prototype_values": (0, 1),
    "prototype_attention": (0, 1, 2),
    "diag_gmm_log_prob": (0, 1, 2),
    "diag_gmm_log_prob_backward": (0, 1, 2, 3),
    "diag_gmm_fit": (0, 1),
    "diag_gmm_fit_backward": (0, 1, 2, 3, 4),
}
_ENTRIES: dict = {}


def _host_function(name):
    import importlib

    return getattr(importlib.import_module(f"{__name__}.{_MODULE.get(name, 'matching')}"), name)


def _batch_sliced(name, fn=None):
    """``fn`` (a host function of the op's signature; default: the module's, looked up at
    each call) over batch slices of at most ``_limits.BATCH_SLICE`` elements when B is
    larger (CUDA's grid allows 65535 programs along y and z, where every kernel here keeps
    the batch), outputs concatenated."""
    from . import _limits

    positions = BATCHED_ARGS[name]

    module = []

    def run(*args, **kwargs):
        if fn is not None:
            host = fn
        else:                                    # looked up per call: tests may patch the module
            if not module:
                import importlib

                module.append(importlib.import_module(f"{__name__}.{_MODULE.get(name, 'matching')}"))
            host = getattr(module[0], name)
        step = _limits.BATCH_SLICE
        B = args[0].shape[0] if args[0].dim() > 0 else 0
        if B <= step:
            return host(*args, **kwargs)
        for i in positions:
            a = args[i] if i < len(args) else None
            if a is not None and (a.dim() == 0 or a.shape[0] != B):
                raise ValueError(f"vos_kernels.triton.{name}: argument {i} must have the batch size "
                                 f"B={B} of argument 0, got shape {tuple(a.shape)}")
        parts = []
        for b0 in range(0, B, step):
            sliced = [a[b0:b0 + step] if i in positions and a is not None else a for i, a in enumerate(args)]
            parts.append(host(*sliced, **kwargs))
        if isinstance(parts[0], torch.Tensor):
            return torch.cat(parts)
        return tuple(torch.cat(outs) for outs in zip(*parts))

    run.__name__ = run.__qualname__ = name
    run.__doc__ = f"vos_kernels.triton.{name}: the op entry (batch slices of at most 65535, see _limits.py)."
    return run


def __getattr__(name):
    """An op entry: the host function of its module, over batch slices past the grid limit."""
    if name in __all__:
        entry = _ENTRIES.get(name)
        if entry is None:
            _host_function(name)                 # import errors surface at the attribute access
            entry = _ENTRIES[name] = _batch_sliced(name)
        return entry
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
