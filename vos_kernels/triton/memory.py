"""Triton kernel of the top-k memory read (STCN / XMem / AMM), for CUDA tensors (and CPU
tensors under ``TRITON_INTERPRET=1``).

Same contract as the C++ CPU kernel (``csrc/cpu/memory_read.cpp``) and
``shared/spec/api.md``: ``s[n, q] = (2·m_n·q − ‖m_n‖²)·scale``; per query the
``k' = min(k, Nm)`` largest s, ties to the lowest memory index, NaN above every number;
``w = softmax(s_topk)`` with the maximum subtracted; ``readout[q] = Σ_j w_j · v[idx_j]``;
usage counters added in the same call (``"hits"``: 1 per (query, selected entry);
``"weights"``: the softmax weight).

Two or three launches, none of which allocates memory × query:

1. ``_topk_select_kernel`` — one program per (block of queries, memory split, batch). It
   streams its split of the memory keys in tiles of ``BLOCK_M`` rows, computes the
   affinity tile with ``tl.dot`` (IEEE fp32: no TF32, so the selection matches the CPU
   kernel up to fp32 rounding) and folds it into a running top-``KP`` per query (``KP`` = k' rounded up to a power of 2).
   Every candidate is packed into one int64 — a sign-corrected copy of the fp32 bits in
   the high word (so integer order is float order; -0 becomes +0 and every NaN the
   largest key) and the complemented memory index in the low word (so equal values order
   lowest index first). Keys are then unique and totally ordered, and the fold is: drop
   the tile's candidates at or below the running minimum, then repeatedly move each
   query's best remaining candidate into the slot of its running minimum until none is
   left. After the first tiles few candidates pass the threshold, so the insertion loop
   runs a few times per tile. (``tl.topk``/``tl.sort`` bitonic networks were the first
   version: correct, but 20-50× slower under the interpreter, and a full sort of every
   tile where a threshold test suffices.) With one split it then orders the k' survivors,
   decodes values and indices and writes the indices and max-subtracted softmax weights
   (``_finish``); with several it writes its partial top-KP keys to a
   ``[B, splits, Nq, KP]`` int64 scratch (O(Nq), not O(Nq·Nm)) and
   ``_topk_merge_kernel`` reduces them per query and finishes. Splits exist to fill the
   GPU: STCN's Nq = 1620 gives only 26 query blocks for 132 SMs. Keys are unique, so the
   result does not depend on the number of splits.
2. ``_gather_readout_kernel`` — one program per (query, block of value channels, batch):
   gathers the k' value rows, writes their weighted sum, and (program of the first
   channel block only) adds the usage with atomics. ``"hits"`` adds integers, so its
   result is exact and deterministic (below 2^24 hits per entry); ``"weights"`` sums fp32
   in the atomics' order, which can differ between runs in the last bits. The C++ kernel
   adds in query order and is bitwise deterministic.

Inputs: float32, float16 or bfloat16 (all arithmetic fp32; outputs fp32) with any
strides (made contiguous). Validation is the public wrapper's job
(:func:`vos_kernels.topk_memory_read`); this module assumes shapes that agree.
Nothing here was run on a GPU by its author (written and tested under the interpreter).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._limits import check_count, launch_grid
from .matching import _interpreting, _next_pow2

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _pack(s, col, valid):
    """int64 keys whose signed order is (s descending-comparable, then lowest col first)."""
    s = tl.where(s == 0.0, 0.0, s)                                   # -0 -> +0
    bits = s.to(tl.int32, bitcast=True)
    bits = tl.where(s != s, 2147483647, bits)                        # every NaN -> top key
    key = tl.where(bits >= 0, bits, bits ^ 2147483647)               # fp32 order as int32 order
    key = tl.where(valid, key, -2147483647 - 1)                      # padding: below -inf
    low = 4294967295 - col.to(tl.int64)                              # lower index -> larger key
    return (key.to(tl.int64) << 32) | low


@triton.jit
def _take_top(cand, BLOCK_Q: tl.constexpr, KP: tl.constexpr):
    """The KP largest of each row's unique packed keys, largest first (KP rounds of a row max)."""
    SENT = tl.full([1, 1], -2147483647 - 1, tl.int32).to(tl.int64) << 32
    slots = tl.arange(0, KP)
    top = tl.zeros([BLOCK_Q, KP], dtype=tl.int64) + SENT
    for j in range(KP):                  # runtime loop: unrolling it made ptxas take minutes
        mx = tl.max(cand, axis=1)
        top = tl.where(slots[None, :] == j, mx[:, None], top)
        cand = tl.where(cand == mx[:, None], SENT, cand)
    return top


@triton.jit
def _finish(top, offs_q, q_mask, b, Nq, K, idx_ptr, w_ptr, KP: tl.constexpr):
    """Decode the sorted top-KP keys ``top`` of each query into values and indices, and
    write the k' indices and max-subtracted softmax weights."""
    slots = tl.arange(0, KP)
    key = (top >> 32).to(tl.int32)
    bits = tl.where(key >= 0, key, key ^ 2147483647)
    val = bits.to(tl.float32, bitcast=True)
    idx = 4294967295 - (top & 4294967295)
    k_mask = slots < K
    vmax = tl.sum(tl.where(slots[None, :] == 0, val, 0.0), axis=1)   # NaN stays NaN
    e = tl.where(k_mask[None, :], tl.exp(val - vmax[:, None]), 0.0)
    w = e / tl.sum(e, axis=1)[:, None]
    out_off = b * Nq * K + offs_q.to(tl.int64)[:, None] * K + slots[None, :]
    o_mask = q_mask[:, None] & k_mask[None, :]
    tl.store(idx_ptr + out_off, idx, mask=o_mask)
    tl.store(w_ptr + out_off, w, mask=o_mask)


@triton.jit
def _topk_select_kernel(
    q_ptr,        # [B, Nq, CK] contiguous (fp32 / fp16 / bf16)
    m_ptr,        # [B, Nm, CK] contiguous
    idx_ptr,      # [B, Nq, K] int64 out (SPLITS == 1)
    w_ptr,        # [B, Nq, K] fp32 out (SPLITS == 1)
    part_ptr,     # [B, SPLITS, Nq, KP] int64 partial top-KP per memory split (SPLITS > 1)
    Nq, Nm, CK, K, scale, split_rows,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, KP: tl.constexpr,
    SPLITS: tl.constexpr,
):
    pid_q = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = offs_q < Nq
    offs_c = tl.arange(0, BLOCK_C)
    q_rows = q_ptr + b * Nq * CK + offs_q.to(tl.int64)[:, None] * CK
    m_base = m_ptr + b * Nm * CK
    n_lo = split * split_rows
    n_hi = tl.minimum(n_lo + split_rows, Nm)

    SENT = tl.full([1, 1], -2147483647 - 1, tl.int32).to(tl.int64) << 32   # below every key
    run = tl.zeros([BLOCK_Q, KP], dtype=tl.int64) + SENT   # running top-KP (unordered)
    run_min = tl.min(run, axis=1)
    slots = tl.arange(0, KP)
    for n0 in range(n_lo, n_hi, BLOCK_M):
        offs_n = n0 + tl.arange(0, BLOCK_M)
        n_mask = offs_n < n_hi
        acc = tl.zeros([BLOCK_Q, BLOCK_M], dtype=tl.float32)
        msq = tl.zeros([BLOCK_M], dtype=tl.float32)
        for c0 in range(0, CK, BLOCK_C):
            cc = c0 + offs_c
            cm = cc < CK
            qt = tl.load(q_rows + cc[None, :], mask=q_mask[:, None] & cm[None, :], other=0.0).to(tl.float32)
            mt = tl.load(m_base + offs_n.to(tl.int64)[None, :] * CK + cc[:, None],
                         mask=cm[:, None] & n_mask[None, :], other=0.0).to(tl.float32)   # [BLOCK_C, BLOCK_M]
            msq += tl.sum(mt * mt, axis=0)
            acc = tl.dot(qt, mt, acc, input_precision="ieee", out_dtype=acc.dtype)
        s = (2.0 * acc - msq[None, :]) * scale
        packed = _pack(s, offs_n[None, :] + tl.zeros([BLOCK_Q, BLOCK_M], dtype=tl.int32),
                       n_mask[None, :] & q_mask[:, None])
        # Fold the tile into the running top-KP: keep only candidates above the running
        # minimum, then insert the best remaining candidate of every query in place of its
        # running minimum (the lowest slot holding it) until no query has one left. Keys are
        # unique (the index is in the low word), so "== best" removes exactly one candidate.
        # After the first tiles few candidates pass, so the loop runs a few times per tile.
        packed = tl.where(packed > run_min[:, None], packed, SENT)
        best = tl.max(packed, axis=1)
        while tl.max((best > run_min).to(tl.int32), axis=0) > 0:
            take = best > run_min
            slot = tl.min(tl.where(run == run_min[:, None], slots[None, :], KP), axis=1)
            run = tl.where(take[:, None] & (slots[None, :] == slot[:, None]), best[:, None], run)
            run_min = tl.min(run, axis=1)
            packed = tl.where(packed == best[:, None], SENT, packed)
            best = tl.max(packed, axis=1)

    if SPLITS == 1:
        _finish(_take_top(run, BLOCK_Q, KP), offs_q, q_mask, b, Nq, K, idx_ptr, w_ptr, KP)
    else:
        off = ((b * SPLITS + split) * Nq + offs_q.to(tl.int64)[:, None]) * KP + slots[None, :]
        tl.store(part_ptr + off, run, mask=q_mask[:, None])


@triton.jit
def _topk_merge_kernel(
    part_ptr,     # [B, SPLITS, Nq, KP] int64 partial top-KP (padding = the sentinel)
    idx_ptr, w_ptr, Nq, K,
    BLOCK_Q: tl.constexpr, KP: tl.constexpr, SPLITS: tl.constexpr,
):
    """Top-KP of the SPLITS partial sets of each query (:func:`_take_top`), then :func:`_finish`."""
    pid_q = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = offs_q < Nq
    SENT = tl.full([1, 1], -2147483647 - 1, tl.int32).to(tl.int64) << 32
    cols = tl.arange(0, SPLITS * KP)
    split = cols // KP
    off = ((b * SPLITS + split[None, :]) * Nq + offs_q.to(tl.int64)[:, None]) * KP + (cols % KP)[None, :]
    cand = tl.load(part_ptr + off, mask=q_mask[:, None], other=0)
    cand = tl.where(q_mask[:, None], cand, SENT)
    _finish(_take_top(cand, BLOCK_Q, KP), offs_q, q_mask, b, Nq, K, idx_ptr, w_ptr, KP)


@triton.jit
def _gather_readout_kernel(
    v_ptr,        # [B, Nm, CV] contiguous (fp32 / fp16 / bf16)
    idx_ptr,      # [B, Nq, K] int64
    w_ptr,        # [B, Nq, K] fp32
    out_ptr,      # [B, Nq, CV] fp32
    usage_ptr,    # [B, Nm] fp32 (any strides), read only when USAGE_MODE > 0
    usage_sb, usage_sn,
    Nq, Nm, CV, K,
    BLOCK_V: tl.constexpr, KP: tl.constexpr, USAGE_MODE: tl.constexpr,
):
    q = tl.program_id(0).to(tl.int64)
    pid_v = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_k = tl.arange(0, KP)
    k_mask = offs_k < K
    row = b * Nq * K + q * K
    idx = tl.load(idx_ptr + row + offs_k, mask=k_mask, other=0)
    w = tl.load(w_ptr + row + offs_k, mask=k_mask, other=0.0)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    v_mask = offs_v < CV
    vals = tl.load(v_ptr + b * Nm * CV + idx[:, None] * CV + offs_v[None, :],
                   mask=k_mask[:, None] & v_mask[None, :], other=0.0).to(tl.float32)
    acc = tl.sum(w[:, None] * vals, axis=0)
    tl.store(out_ptr + b * Nq * CV + q * CV + offs_v, acc, mask=v_mask)
    if USAGE_MODE > 0:
        if pid_v == 0:
            if USAGE_MODE == 1:
                add = tl.where(k_mask, 1.0, 0.0)
            else:
                add = w
            tl.atomic_add(usage_ptr + b * usage_sb + idx * usage_sn, add, mask=k_mask)


def _memory_splits(Nm: int, q_blocks: int, block_m: int) -> int:
    """Memory splits so that the grid fills the GPU (~2 programs per SM), each split at
    least 8 tiles long; a power of 2 (the merge loads SPLITS · KP keys per query)."""
    if _interpreting() or not torch.cuda.is_available():
        return 1
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    splits = 1
    while q_blocks * splits * 2 <= 2 * sms and Nm // (splits * 2) >= 8 * block_m and splits < 16:
        splits *= 2
    return splits


def topk_memory_read(query_key: torch.Tensor, memory_key: torch.Tensor, memory_value: torch.Tensor,
                     k: int, scale: float, usage: torch.Tensor | None = None, usage_mode: int = 0,
                     memory_splits: int | None = None):
    """Triton entry point with the op's signature (``usage_mode`` 0 none, 1 hits, 2 weights).

    ``memory_splits`` (a power of 2; default: enough programs to fill the GPU, 1 under the
    interpreter) splits the memory over programs, each writing a partial top-KP that a merge
    kernel reduces; the result does not depend on it.

    Returns ``(readout [B, Nq, CV] fp32, index [B, Nq, k'] int64, weight [B, Nq, k'] fp32)``
    and adds to ``usage`` in place.
    """
    for name, t in (("query_key", query_key), ("memory_key", memory_key), ("memory_value", memory_value)):
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"vos_kernels.triton: {name} must be float32, float16 or bfloat16, got {t.dtype} "
                             "(float64 runs on the 'cpu' or 'reference' backend)")
    op = "topk_memory_read"
    if int(k) < 1:
        raise ValueError(f"vos_kernels.triton.{op}: k must be >= 1, got {k}")
    if memory_key.dim() == 3 and memory_key.shape[1] < 1:
        raise ValueError(f"vos_kernels.triton.{op}: the memory is empty (memory_key {tuple(memory_key.shape)})")
    # before any copy: top-k keys keep the memory index in their low 32 bits, and the split
    # bounds are int32
    check_count(op, "Nq (query pixels)", query_key.shape[1])
    check_count(op, "Nm (memory entries)", memory_key.shape[1])
    dev = query_key.device
    q = query_key.contiguous()
    m = memory_key.contiguous()
    v = memory_value.contiguous()
    B, Nq, CK = q.shape
    Nm, CV = m.shape[1], v.shape[2]
    K = min(int(k), Nm)
    out = torch.empty((B, Nq, CV), device=dev, dtype=torch.float32)
    index = torch.empty((B, Nq, K), device=dev, dtype=torch.int64)
    weight = torch.empty((B, Nq, K), device=dev, dtype=torch.float32)
    if Nq == 0:
        return out, index, weight
    KP = max(_next_pow2(K), 2)
    if _interpreting():
        block_q, block_m = 16, max(KP, 32)
    else:
        block_q, block_m = (64 if KP <= 32 else 32), max(KP, 64)
    block_c = min(max(_next_pow2(CK), 16), 64)
    q_blocks = triton.cdiv(Nq, block_q)
    splits = _memory_splits(Nm, q_blocks, block_m) if memory_splits is None else int(memory_splits)
    if splits < 1 or splits & (splits - 1):
        raise ValueError(f"memory_splits: expected a power of 2, got {memory_splits!r}")
    split_rows = triton.cdiv(triton.cdiv(Nm, splits), block_m) * block_m
    check_count(op, "memory_splits x rows per split", splits * split_rows)
    part = (torch.empty((B, splits, Nq, KP), device=dev, dtype=torch.int64) if splits > 1 else index)
    _topk_select_kernel[launch_grid(op, query_blocks=q_blocks, memory_splits=splits, batch_elements=B)](
        q, m, index, weight, part, Nq, Nm, CK, K, float(scale), split_rows,
        BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_C=block_c, KP=KP, SPLITS=splits)
    if splits > 1:
        merge_q = 16 if splits * KP <= 512 else 8        # [merge_q, splits·KP] int64 candidates in registers
        grid = launch_grid(op, query_blocks=triton.cdiv(Nq, merge_q), batch_elements=B)
        _topk_merge_kernel[grid](part, index, weight, Nq, K, BLOCK_Q=merge_q, KP=KP, SPLITS=splits)
    mode = int(usage_mode) if usage is not None else 0
    u = usage if usage is not None else weight          # a valid pointer, never read with mode 0
    usb, usn = (usage.stride(0), usage.stride(1)) if usage is not None else (0, 0)
    block_v = min(max(_next_pow2(CV), 16), 128)
    _gather_readout_kernel[launch_grid(op, queries=Nq, value_blocks=triton.cdiv(CV, block_v),
                                       batch_elements=B)](
        v, index, weight, out, u, usb, usn, Nq, Nm, CV, K,
        BLOCK_V=block_v, KP=KP, USAGE_MODE=mode)
    return out, index, weight
