"""Backend selection: which implementation a public op runs on.

`set_backend(name)` or the environment variable ``VOS_KERNELS_BACKEND`` choose one of
``"auto"`` (default: the fastest built kernel for the tensors' device), ``"cuda"``
(CUDA C++), ``"triton"``, ``"cpu"`` (C++ CPU kernels) or ``"reference"`` (the naive
PyTorch of :mod:`vos_kernels.reference`). :func:`available_backends` lists what this
install can run.
"""
from __future__ import annotations

import importlib.util
import os
import warnings

import torch

from . import _ops

BACKENDS = ("auto", "cuda", "triton", "cpu", "reference")

_state = {"backend": "auto"}


def _library_loaded() -> bool:
    return _ops.LOADED


def _has_cuda_cpp() -> bool:
    """Whether the library was built with CUDA C++ kernels (issue 7; none yet, so CUDA
    tensors run the Triton kernels)."""
    return _ops.CUDA_CPP


def triton_interpreted() -> bool:
    """True when Triton kernels run in the interpreter (``TRITON_INTERPRET=1``), on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def available_backends() -> list[str]:
    """Backends this install can run, in order of preference.

    ``"cpu"`` needs the compiled extension; ``"triton"`` needs the triton package and a
    CUDA device (or ``TRITON_INTERPRET=1``, which runs Triton kernels on CPU tensors);
    ``"cuda"`` needs the extension built with CUDA C++ kernels; ``"reference"`` is
    always there.
    """
    out = []
    if _has_cuda_cpp() and torch.cuda.is_available():
        out.append("cuda")
    if _triton_importable() and (torch.cuda.is_available() or triton_interpreted()) and _library_loaded():
        out.append("triton")
    if _library_loaded():
        out.append("cpu")
    out.append("reference")
    return out


def set_backend(name: str) -> None:
    """Choose the backend for every later call: one of ``BACKENDS``.

    Raises ValueError for an unknown name. Availability is checked at call time, where
    the tensors' device is known.
    """
    if name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    _state["backend"] = name


def get_backend() -> str:
    """The backend chosen with :func:`set_backend` (or ``VOS_KERNELS_BACKEND``)."""
    return _state["backend"]


def resolve(device: torch.device) -> str:
    """The concrete backend (``"cpu"``, ``"triton"``, ``"cuda"``, ``"reference"``) for a device.

    Raises ValueError when the chosen backend cannot run tensors of that device, and
    RuntimeError when the compiled extension is missing.
    """
    name = _state["backend"]
    if name == "reference":
        return "reference"
    if not _library_loaded():
        raise RuntimeError(
            "vos_kernels: the compiled operator library is not loaded (pip install --no-build-isolation . "
            "builds it; or set VOS_KERNELS_LIBRARY to a CMake build). Use set_backend('reference') "
            "for the naive PyTorch path."
        )
    if device.type == "cpu":
        if name in ("auto", "cpu"):
            return "cpu"
        if name == "triton":
            if triton_interpreted() and _triton_importable():
                return "triton"
            raise ValueError("backend: 'triton' runs CPU tensors only under TRITON_INTERPRET=1; got CPU tensors")
        raise ValueError(f"backend: {name!r} needs CUDA tensors; got CPU tensors")
    if device.type == "cuda":
        if name == "cpu":
            raise ValueError("backend: 'cpu' needs CPU tensors; got CUDA tensors")
        if name == "cuda" or (name == "auto" and _has_cuda_cpp()):
            if not _has_cuda_cpp():
                raise ValueError("backend: 'cuda' requested but the CUDA C++ kernels are not built in this install")
            return "cuda"
        if not _triton_importable():
            raise RuntimeError("vos_kernels: CUDA tensors need the triton package (pip install triton)")
        return "triton"
    raise ValueError(f"device: expected cpu or cuda tensors, got {device}")


def _init_from_env() -> None:
    name = os.environ.get("VOS_KERNELS_BACKEND", "auto")
    if name not in BACKENDS:
        warnings.warn(f"VOS_KERNELS_BACKEND={name!r} is not one of {BACKENDS}; using 'auto'", stacklevel=2)
        name = "auto"
    _state["backend"] = name


_init_from_env()
