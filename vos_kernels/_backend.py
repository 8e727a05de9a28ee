"""Backend selection: which implementation a public op runs on.

`set_backend(name)` or the environment variable ``VOS_KERNELS_BACKEND`` choose one of
``"auto"`` (default: the fastest built kernel for the tensors' device), ``"cuda"``
(CUDA C++), ``"triton"``, ``"cpu"`` (C++ CPU kernels) or ``"reference"`` (the naive
PyTorch of :mod:`vos_kernels.reference`). :func:`available_backends` lists what this
install can run.

On CUDA tensors an op runs the kernel registered at its CUDA dispatch key: the CUDA C++
kernel where one is written and built (``cuda_cpp_ops()``), the Triton kernel otherwise.
Backend ``"cuda"`` runs that registered kernel (so an op without a CUDA C++ kernel runs
Triton); backend ``"triton"`` calls the Triton kernel from Python, with the op's
autograd, also for ops that hold a CUDA C++ kernel. ``"auto"`` follows the per-device,
per-op choice measured by ``scripts/gpu_check.sh`` (``vos_kernels/data/auto_cuda.json``,
see :func:`auto_choice`).
"""
from __future__ import annotations

import importlib.util
import json
import os
import warnings

import torch

from . import _ops

BACKENDS = ("auto", "cuda", "triton", "cpu", "reference")

_state = {"backend": "auto"}

# "auto" on CUDA tensors, per op that holds both kernels: the faster one on that device as
# measured by scripts/gpu_check.sh (scripts/auto_table.py turns its benchmark results into
# vos_kernels/data/auto_cuda.json: {"devices": {device name: {op: "cuda" | "triton"}}}).
# An op or device not listed runs the CUDA C++ kernel. AUTO_CUDA overrides the file for
# every device (tests, or a user who measured their own).
AUTO_CUDA: dict[str, str] = {}
_AUTO_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "auto_cuda.json")
_device_names: dict[int, str] = {}


def _auto_table() -> dict[str, dict[str, str]]:
    try:
        with open(_AUTO_FILE) as f:
            devices = json.load(f).get("devices", {})
    except (OSError, ValueError):
        return {}
    return {name: {op: b for op, b in ops.items() if b in ("cuda", "triton")} for name, ops in devices.items()}


AUTO_CUDA_BY_DEVICE = _auto_table()


def auto_choice(op: str | None, device: torch.device) -> str:
    """``"cuda"`` or ``"triton"``: what ``"auto"`` runs for ``op`` on this CUDA device."""
    if op in AUTO_CUDA:
        return AUTO_CUDA[op]
    if not AUTO_CUDA_BY_DEVICE:
        return "cuda"
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _device_names:
        _device_names[index] = torch.cuda.get_device_name(index)
    return AUTO_CUDA_BY_DEVICE.get(_device_names[index], {}).get(op, "cuda")


def _library_loaded() -> bool:
    return _ops.LOADED


def _has_cuda_cpp() -> bool:
    """Whether the library was built with CUDA C++ kernels (csrc/cuda/)."""
    return _ops.CUDA_CPP


def cuda_cpp_ops() -> list[str]:
    """The ops whose CUDA kernel is CUDA C++ in this install (the others run Triton on CUDA)."""
    return sorted(_ops.CUDA_CPP_OPS)


def triton_from_python(backend: str, device: torch.device, op: str) -> bool:
    """Whether a resolved backend means calling the op's Triton kernel from Python (with the
    op's autograd) rather than through the dispatcher: the interpreter on CPU tensors, or
    backend "triton" on CUDA tensors of an op whose CUDA key holds a CUDA C++ kernel."""
    return backend == "triton" and (device.type == "cpu" or op in _ops.CUDA_CPP_OPS)


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


def resolve(device: torch.device, op: str | None = None) -> str:
    """The concrete backend (``"cpu"``, ``"triton"``, ``"cuda"``, ``"reference"``) for a device
    (and op: ``"auto"`` on CUDA follows :func:`auto_choice`).

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
        if name == "cuda":
            if not _has_cuda_cpp():
                raise ValueError("backend: 'cuda' requested but the CUDA C++ kernels are not built in this install")
            return "cuda"
        if name == "auto" and _has_cuda_cpp():
            choice = auto_choice(op, device) if op in _ops.CUDA_CPP_OPS else "cuda"
            if choice == "cuda" or _triton_importable():
                return choice
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
