"""Argument checks of the public API: every failure is a ValueError naming the argument,
what was expected and what was given, raised before anything is computed or written."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

_CPU_FLOATS = (torch.float32, torch.float64)
# float64 on CUDA runs on the CUDA C++ kernels (and the Triton GMM kernels); the Triton
# matching and top-k kernels reject it with their own error.
_CUDA_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def fail(name: str, expected: str, got) -> None:
    raise ValueError(f"{name}: expected {expected}, got {got}")


def tensor(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        fail(name, "a torch.Tensor", type(x).__name__)
    return x


def float_tensor(x, name: str, rank: int | Sequence[int], layout: str) -> torch.Tensor:
    tensor(x, name)
    ranks = (rank,) if isinstance(rank, int) else tuple(rank)
    if x.dim() not in ranks:
        fail(name, f"shape {layout} (rank {' or '.join(map(str, ranks))})", f"shape {list(x.shape)}")
    allowed = _CPU_FLOATS if x.device.type == "cpu" else _CUDA_FLOATS
    if x.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        fail(name, f"dtype in ({names}) on {x.device.type}", str(x.dtype).replace("torch.", ""))
    if x.numel() == 0:
        fail(name, f"a non-empty tensor {layout}", f"shape {list(x.shape)}")
    return x


def int_arg(x, name: str, minimum: int) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        if isinstance(x, torch.Tensor) and x.numel() == 1 and not x.dtype.is_floating_point:
            x = int(x)
        else:
            fail(name, f"an int >= {minimum}", repr(x))
    if x < minimum:
        fail(name, f"an int >= {minimum}", x)
    return int(x)


def positive_float(x, name: str, expected: str = "a finite float > 0") -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x <= 0:
        fail(name, expected, repr(x))
    return float(x)


def windows_arg(windows, name: str = "windows") -> list[int]:
    if isinstance(windows, int) or not isinstance(windows, (Sequence, torch.Tensor)):
        fail(name, "a non-empty sequence of strictly ascending ints >= 1", repr(windows))
    ws = [w.item() if isinstance(w, torch.Tensor) else w for w in windows]
    if not ws or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in ws):
        fail(name, "a non-empty sequence of strictly ascending ints >= 1", repr(list(ws)))
    if any(b <= a for a, b in zip(ws, ws[1:])):
        fail(name, "strictly ascending windows", repr(list(ws)))
    return [int(w) for w in ws]


def labels_arg(labels, name: str, shape: Sequence[int], num_labels: int, device: torch.device) -> torch.Tensor:
    tensor(labels, name)
    if labels.dtype not in (torch.int64, torch.int32):
        fail(name, "dtype int64 or int32", str(labels.dtype).replace("torch.", ""))
    if list(labels.shape) != list(shape):
        fail(name, f"shape {list(shape)}", f"shape {list(labels.shape)}")
    if labels.device != device:
        fail(name, f"a tensor on {device} like the embeddings", f"a tensor on {labels.device}")
    if not torch.compiler.is_compiling():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < -1 or hi >= num_labels:
            fail(name, f"values in [-1, num_labels) = [-1, {num_labels})", f"values in [{lo}, {hi}]")
    return labels


def bias_arg(bias, num_labels: int, device: torch.device, name: str = "bias") -> torch.Tensor:
    if not isinstance(bias, torch.Tensor):
        if isinstance(bias, Sequence) and all(isinstance(b, (int, float)) for b in bias):
            bias = torch.tensor([float(b) for b in bias], dtype=torch.float32, device=device)
        else:
            fail(name, f"a float tensor of shape [num_labels] = [{num_labels}]", type(bias).__name__)
    if not bias.dtype.is_floating_point:
        fail(name, "a floating-point tensor", str(bias.dtype).replace("torch.", ""))
    if list(bias.shape) != [num_labels]:
        fail(name, f"shape [num_labels] = [{num_labels}]", f"shape {list(bias.shape)}")
    if bias.device != device:
        fail(name, f"a tensor on {device} like the embeddings", f"a tensor on {bias.device}")
    return bias


def same_device_dtype(ref: torch.Tensor, ref_name: str, other: torch.Tensor, other_name: str) -> None:
    if other.device != ref.device:
        fail(other_name, f"a tensor on {ref.device} like {ref_name}", f"a tensor on {other.device}")
    if other.dtype != ref.dtype:
        fail(other_name, f"dtype {str(ref.dtype).replace('torch.', '')} like {ref_name}",
             str(other.dtype).replace("torch.", ""))
