"""Triton backend of vos_kernels (CUDA; CPU tensors under ``TRITON_INTERPRET=1``).

The entry points live in :mod:`vos_kernels.triton.matching`. They are re-exported here
lazily, so that importing this package does not import ``triton`` (set
``TRITON_INTERPRET=1`` before the first access if the kernels must run on CPU).
"""

__all__ = [
    "labelled_nearest_sqdist",
    "fb_global_matching",
    "fb_multi_local_matching",
    "fb_instance_pooling",
    "nearest_sqdist_backward",
]


def __getattr__(name):
    if name in __all__:
        from . import matching
        return getattr(matching, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
