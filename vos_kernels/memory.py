"""Top-k memory read (STCN / XMem / AMM): the public function.

Validates its arguments (ValueError naming the argument, before anything is computed or
mutated), then calls ``torch.ops.vos_kernels.topk_memory_read`` (C++ on CPU, Triton on
CUDA), the Triton kernel under ``TRITON_INTERPRET=1`` for the ``"triton"`` backend on CPU
tensors, or :mod:`vos_kernels.reference` for the ``"reference"`` backend.
Semantics: ``../shared/spec/api.md`` and ``../shared/spec/memory.md``.
"""
from __future__ import annotations

import math

import torch

from . import _ops
from . import _validation as V
from . import reference as _reference
from ._backend import resolve, triton_from_python

USAGE_MODES = {"hits": 1, "weights": 2}


def topk_memory_read(query_key: torch.Tensor, memory_key: torch.Tensor, memory_value: torch.Tensor, k: int,
                     scale: float | None = None, usage: torch.Tensor | None = None, usage_mode: str = "hits",
                     return_topk: bool = False):
    """STCN's top-k memory read with fused usage counters, without the Nm × Nq affinity.

    ``s[n, q] = (2·m_n·q − ‖m_n‖²)·scale`` (STCN ``model/network.py``; the ``−‖q‖²`` term is
    constant per query and dropped); per query the ``k' = min(k, Nm)`` largest s (ties: the
    lowest memory index; NaN ranks first, as in ``torch.topk``); ``w = softmax(s_topk)`` with
    the maximum subtracted (STCN's ``softmax_w_top`` does not subtract it, which overflows
    in fp16); ``readout[q] = Σ_j w_j · v[idx_j]``, a gather of k' value rows.

    Args:
        query_key: ``[B, Nq, CK]`` float32 (float64 for gradcheck).
        memory_key: ``[B, Nm, CK]``, same dtype and device.
        memory_value: ``[B, Nm, CV]``, same dtype and device; objects folded into CV
            (keys are object-agnostic).
        k: ≥ 1 (STCN 20, XMem 30, MiVOS 50); ``k ≥ Nm`` reads the whole memory.
        scale: affinity scale, default ``1/sqrt(CK)``.
        usage: optional ``[B, Nm]`` float32 counters, updated in place in the same call:
            ``"hits"`` adds, per entry, the number of queries whose top-k holds it (AMM
            thesis); ``"weights"`` adds the sum of its softmax weights (XMem ``do_softmax``).
        usage_mode: ``"hits"`` or ``"weights"``.
        return_topk: also return ``(index [B, Nq, k'] int64, weight [B, Nq, k'])``.

    Returns:
        ``readout [B, Nq, CV]`` (float32, or float64 for float64 inputs), plus
        ``(index, weight)`` when ``return_topk``. Differentiable w.r.t. query_key,
        memory_key and memory_value (through the softmax over the selected k' and the
        gather; the selection is piecewise constant).

    Raises:
        ValueError: wrong rank / shape / dtype, device mix, empty memory, k < 1, bad scale,
            usage not float32 ``[B, Nm]`` on the same device, unknown usage_mode. Nothing
            is mutated when it raises.
        RuntimeError: CUDA tensors without the triton package.

    Backends: C++ on CPU (``csrc/cpu/memory_read.cpp``, deterministic), Triton on CUDA
    (``vos_kernels/triton/memory.py``; ``"weights"`` usage is summed with atomics, so its
    last bits can differ between runs), ``"reference"`` = STCN's dense path.
    """
    V.float_tensor(query_key, "query_key", 3, "[B,Nq,CK]")
    V.float_tensor(memory_key, "memory_key", 3, "[B,Nm,CK]")
    V.float_tensor(memory_value, "memory_value", 3, "[B,Nm,CV]")
    V.same_device_dtype(query_key, "query_key", memory_key, "memory_key")
    V.same_device_dtype(query_key, "query_key", memory_value, "memory_value")
    B, _Nq, CK = query_key.shape
    if memory_key.shape[0] != B or memory_key.shape[2] != CK:
        V.fail("memory_key", f"shape [B={B}, Nm, CK={CK}] like query_key", f"shape {list(memory_key.shape)}")
    Nm = memory_key.shape[1]
    if memory_value.shape[0] != B or memory_value.shape[1] != Nm:
        V.fail("memory_value", f"shape [B={B}, Nm={Nm}, CV] like memory_key", f"shape {list(memory_value.shape)}")
    k = V.int_arg(k, "k", 1)
    if scale is None:
        scale = 1.0 / math.sqrt(CK)
    else:
        scale = V.positive_float(scale, "scale", "a finite float > 0 (or None for 1/sqrt(CK))")
    if usage_mode not in USAGE_MODES:
        V.fail("usage_mode", f"one of {sorted(USAGE_MODES)}", repr(usage_mode))
    if usage is not None:
        V.tensor(usage, "usage")
        if usage.dtype != torch.float32 or list(usage.shape) != [B, Nm] or usage.device != query_key.device:
            V.fail("usage", f"a float32 tensor [B, Nm] = [{B}, {Nm}] on {query_key.device}",
                   f"{str(usage.dtype).replace('torch.', '')} {list(usage.shape)} on {usage.device}")
    backend = resolve(query_key.device, "topk_memory_read")
    if backend == "reference":
        out, (index, weight) = _reference.topk_memory_read(query_key, memory_key, memory_value, k, float(scale),
                                                           usage, usage_mode, return_topk=True)
    elif triton_from_python(backend, query_key.device, "topk_memory_read"):   # interpreter, or Triton beside CUDA C++
        out, index, weight = _ops.topk_read_interpreted(
            query_key, memory_key, memory_value, k, float(scale), usage, USAGE_MODES[usage_mode])
    else:   # C++ on CPU; on CUDA the op's registered kernel (CUDA C++ where built, else Triton)
        out, index, weight = torch.ops.vos_kernels.topk_memory_read(
            query_key, memory_key, memory_value, k, float(scale), usage, USAGE_MODES[usage_mode])
    return (out, (index, weight)) if return_topk else out
