"""CFBI / CFBI+ matching: the public functions.

Each function validates its arguments (ValueError naming the argument), picks the backend
(:func:`vos_kernels.set_backend`) and calls ``torch.ops.vos_kernels.<name>`` (C++ on CPU,
CUDA C++ or Triton on CUDA), or :mod:`vos_kernels.reference` for the ``"reference"`` backend.
Semantics: ``../shared/spec/api.md``; backend contract: ``docs/internals.md``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _validation as V
from . import reference as _reference
from ._backend import resolve, triton_from_python
from ._ops import _InterpretedTriton


def _call(name: str, device: torch.device, *args):
    backend = resolve(device, name)
    if backend == "reference":
        return None
    if triton_from_python(backend, device, name):  # Triton interpreter, or Triton beside CUDA C++
        return _InterpretedTriton.function(name).apply(*args)
    return getattr(torch.ops.vos_kernels, name)(*args)


def _global_args(query, reference, reference_labels, num_labels, atrous_rate):
    V.float_tensor(query, "query", 4, "[B,H,W,C]")
    V.float_tensor(reference, "reference", (4, 5), "[B,T,Hr,Wr,C] or [B,Hr,Wr,C]")
    V.same_device_dtype(query, "query", reference, "reference")
    L = V.int_arg(num_labels, "num_labels", 1)
    rate = V.int_arg(atrous_rate, "atrous_rate", 1)
    if reference.dim() == 4:
        reference = reference.unsqueeze(1)
        if isinstance(reference_labels, torch.Tensor) and reference_labels.dim() == 3:
            reference_labels = reference_labels.unsqueeze(1)
    B, C = query.shape[0], query.shape[-1]
    if reference.shape[0] != B:
        V.fail("reference", f"batch size {B} like query", reference.shape[0])
    if reference.shape[-1] != C:
        V.fail("reference", f"{C} channels like query", f"{reference.shape[-1]} channels")
    V.labels_arg(reference_labels, "reference_labels", reference.shape[:4], L, query.device)
    return reference, reference_labels, L, rate


def labelled_nearest_sqdist(
    query: torch.Tensor,
    reference: torch.Tensor,
    reference_labels: torch.Tensor,
    num_labels: int,
    atrous_rate: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-label nearest squared distance from every query pixel to a labelled reference.

    ``sqdist[b,l,y,x] = min_q ‖query[b,y,x] − reference[b,q]‖²`` over the reference pixels
    q of label l (clamped at 0), and ``index`` = the flat index of that q in ``T·Hr·Wr``.
    CFBI+ eq. 2 (global matching) before the distance transform; atrous matching
    (eq. 8-9) keeps reference pixels whose row and column are multiples of the rate.

    Args:
        query: ``[B,H,W,C]`` float32; float64 (CPU, CUDA C++); float16/bfloat16 (CUDA).
        reference: ``[B,T,Hr,Wr,C]`` (several reference frames) or ``[B,Hr,Wr,C]``.
        reference_labels: ``[B,T,Hr,Wr]`` (or ``[B,Hr,Wr]``) int64/int32; -1 = ignore,
            0 = background, 1..L-1 = objects.
        num_labels: L, counting the background.
        atrous_rate: ≥ 1.

    Returns:
        ``(sqdist [B,L,H,W] float32, index [B,L,H,W] int64)``; ``inf`` and -1 where label
        l has no reference pixel. Ties pick the lowest flat index; NaN propagates.
        Differentiable w.r.t. query and reference (through the argmin pair).

    Raises:
        ValueError: wrong rank/shape/dtype, channel or batch mismatch, device mix, label
            outside [-1, L), num_labels < 1, atrous_rate < 1.
    """
    reference, reference_labels, L, rate = _global_args(query, reference, reference_labels, num_labels, atrous_rate)
    out = _call("labelled_nearest_sqdist", query.device, query, reference, reference_labels, L, rate)
    if out is None:
        return _reference.labelled_nearest_sqdist(query, reference, reference_labels, L, rate)
    return out


def fb_global_matching(
    query: torch.Tensor,
    reference: torch.Tensor,
    reference_labels: torch.Tensor,
    num_labels: int,
    bias: torch.Tensor | Sequence[float],
    atrous_rate: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground-background global matching of CFBI / CFBI+ (eq. 2-3; atrous eq. 8-9).

    ``fg[b,l] = tanh((sqdist[b,l] + bias[l]) / 2)`` (= ``1 − 2/(1+exp(d+b))``, CFBI's
    ``(sigmoid(d+b) − 0.5)·2``), exactly 1.0 where label l has no reference pixel;
    ``bg[b,l] = min over m ≠ l of fg[b,m]`` (CFBI's ``foreground2background``), 1.0 when
    L = 1. Computed tile by tile: no query × reference matrix is materialised.

    Args:
        query, reference, reference_labels, num_labels, atrous_rate: as in
            :func:`labelled_nearest_sqdist`.
        bias: ``[L]`` float tensor (CFBI passes ``[b_B, b_F, b_F, …]``), or a list of floats.

    Returns:
        ``(fg, bg)``, each ``[B,L,H,W]`` float32 (float64 for float64 inputs), ready for
        a convolution. Differentiable w.r.t. query, reference and bias.

    Raises:
        ValueError: as :func:`labelled_nearest_sqdist`, and bias not of shape ``[L]``.
    """
    reference, reference_labels, L, rate = _global_args(query, reference, reference_labels, num_labels, atrous_rate)
    bias = V.bias_arg(bias, L, query.device)
    out = _call("fb_global_matching", query.device, query, reference, reference_labels, L, bias, rate)
    if out is None:
        return _reference.fb_global_matching(query, reference, reference_labels, L, bias, rate)
    return out[0], out[1]


def fb_multi_local_matching(
    query: torch.Tensor,
    previous: torch.Tensor,
    previous_labels: torch.Tensor,
    num_labels: int,
    windows: Sequence[int],
    bias: torch.Tensor | Sequence[float],
    atrous_rate: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground-background multi-local matching of CFBI / CFBI+ (eq. 4-7, 10-12).

    For every window k (half-width in pixels), ``fg[b,l,k,y,x] = tanh((d + bias[l]) / 2)``
    with d the smallest ``‖query[b,y,x] − previous[b,y+dy,x+dx]‖²`` over the previous-frame
    pixels of label l at offsets ``|dy|, |dx| ≤ k`` that are multiples of ``atrous_rate``
    and inside the frame; 1.0 when there is none. ``bg`` = min over m ≠ l of fg[m].
    All windows in one pass over the largest window; nothing of size pixels × window is
    materialised.

    Args:
        query, previous: ``[B,H,W,C]`` (same shape, dtype and device).
        previous_labels: ``[B,H,W]`` int64/int32 (-1 ignore, 0 background, 1..L-1).
        num_labels: L.
        windows: strictly ascending ints ≥ 1 (CFBI+ stride 4: ``[4,8,12,16,20,24]``).
        bias: ``[L]`` float tensor or list (``[b_B, b_F, …]``).
        atrous_rate: ≥ 1 (CFBI+ uses 2 at stride 4).

    Returns:
        ``(fg, bg)``, each ``[B,L,K,H,W]`` float32, K = len(windows), ascending (CFBI's
        own channel order ``[largest, smallest, …]`` is in :mod:`vos_kernels.compat.cfbi`).
        Differentiable w.r.t. query, previous and bias.

    Raises:
        ValueError: wrong rank/shape/dtype, device mix, label outside [-1, L), windows
            empty/not ascending/< 1, atrous_rate < 1, bias not ``[L]``.
    """
    V.float_tensor(query, "query", 4, "[B,H,W,C]")
    V.float_tensor(previous, "previous", 4, "[B,H,W,C]")
    V.same_device_dtype(query, "query", previous, "previous")
    if previous.shape != query.shape:
        V.fail("previous", f"shape {list(query.shape)} like query", f"shape {list(previous.shape)}")
    L = V.int_arg(num_labels, "num_labels", 1)
    ws = V.windows_arg(windows)
    rate = V.int_arg(atrous_rate, "atrous_rate", 1)
    V.labels_arg(previous_labels, "previous_labels", query.shape[:3], L, query.device)
    bias = V.bias_arg(bias, L, query.device)
    out = _call("fb_multi_local_matching", query.device, query, previous, previous_labels, L, ws, bias, rate)
    if out is None:
        return _reference.fb_multi_local_matching(query, previous, previous_labels, L, ws, bias, rate)
    return out[0], out[1]


def fb_instance_pooling(embedding: torch.Tensor, labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """Instance-level fg/bg mean embeddings (CFBI ``networks/layers/attention.py``).

    ``out[b,l,0] = Σ_{label=l} e / (n_l + 1e-5)`` and
    ``out[b,l,1] = Σ_{label≥0, ≠l} e / (n_valid − n_l + 1e-5)``; ignore pixels (-1) count
    in neither.

    Args:
        embedding: ``[B,H,W,C]`` float32; float64 (CPU, CUDA C++); float16/bfloat16 (CUDA).
        labels: ``[B,H,W]`` int64/int32.
        num_labels: L.

    Returns:
        ``[B,L,2,C]`` float32. Differentiable w.r.t. embedding.

    Raises:
        ValueError: wrong rank/shape/dtype, device mix, label outside [-1, L).
    """
    V.float_tensor(embedding, "embedding", 4, "[B,H,W,C]")
    L = V.int_arg(num_labels, "num_labels", 1)
    V.labels_arg(labels, "labels", embedding.shape[:3], L, embedding.device)
    out = _call("fb_instance_pooling", embedding.device, embedding, labels, L)
    if out is None:
        return _reference.fb_instance_pooling(embedding, labels, L)
    return out
