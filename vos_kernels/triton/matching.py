"""Triton kernels for CFBI / CFBI+ matching.

Backend of ``vos_kernels`` for CUDA devices (and, under ``TRITON_INTERPRET=1``, for CPU
tensors, which is how the test-suite runs on machines without a GPU). The contract every
backend implements is ``docs/internals.md``; the public semantics are in
``shared/spec/api.md`` and ``shared/spec/matching.md``.

Entry points (same names and return values as the other backends):

* :func:`labelled_nearest_sqdist`  -- per-label nearest squared distance + argmin
  (CFBI+ global matching, eq. 2-3, with atrous sampling, eq. 8-9).
* :func:`fb_global_matching`       -- the same, followed by the fg transform and the
  foreground-to-background epilogue (eq. 2-3, 8-9).
* :func:`fb_multi_local_matching`  -- windowed matching against the previous frame for a
  set of windows in one pass (eq. 4-7 and the atrous multi-local variant, eq. 10-12).
* :func:`fb_instance_pooling`      -- per-label fg/bg mean embeddings (instance-level
  attention head).
* :func:`nearest_sqdist_backward`  -- the scatter of the gradient of a min to its argmin
  pair.

Common rules (docs/internals.md):

* squared distance ``d = ||e_p - e_q||^2`` in float32, clamped ``d < 0 ? 0 : d`` (keeps NaN);
* per (pixel, label) minimum, candidates scanned in increasing flat index with the update
  ``if (d < best || (d != d && best == best)) { best = d; idx = q; }`` starting at
  ``best = +inf, idx = -1``: ties -> lowest flat index, the first NaN is sticky;
* empty label -> ``sqdist = +inf``, ``index = -1``, ``fg = 1.0`` exactly;
* ``fg[l] = tanh((d + bias[l]) / 2)`` in float32; ``bg[l] = min over m != l of fg[m]``
  (1.0 when L == 1) from the best and second-best label per pixel (NaN first, then by
  value, ties -> lowest label).

Inputs may have any strides (they are made contiguous), query/reference/previous/embedding
may be float32, float16 or bfloat16 (all arithmetic is float32, outputs float32), labels
int32 or int64. Argument validation is the job of the public wrapper (``vos_kernels``);
this module only assumes shapes that agree. Labels outside ``[0, num_labels)`` are never
matched (``-1`` is "ignore").

Nothing here was run on a GPU by its author (it was developed under the Triton
interpreter); the GPU code path uses only standard Triton constructs.
"""

from __future__ import annotations

import os
from typing import Sequence, Tuple

import torch
import triton
import triton.language as tl

from . import _MODULE
from ._limits import check_count, launch_grid
from . import __all__ as _ENTRY_POINTS  # one list of entry points, kept in the light package module

__all__ = [name for name in _ENTRY_POINTS if _MODULE.get(name, "matching") == "matching"]

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Largest number of (label, window) accumulator columns one multi-local program keeps in
# registers; more labels are split over several programs (grid axis 1).
_LOCAL_MAX_COLS = 64

# tl.dot modes of the global kernel.
_DOT_IEEE = 0      # fp32 inputs, exact fp32 products (no TF32): default for fp32
_DOT_TF32 = 1      # fp32 inputs, TF32 tensor cores (opt-in, ~1e-3 relative error)
_DOT_NATIVE = 2    # fp16 / bf16 inputs, fp32 accumulation
_DOT_UPCAST = 3    # bf16 under the interpreter (its dot does not handle bf16): upcast


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _next_pow2(n: int) -> int:
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _check_device(*tensors: torch.Tensor) -> torch.device:
    dev = tensors[0].device
    for t in tensors:
        if t.device != dev:
            raise ValueError(
                f"vos_kernels.triton: all tensors must be on one device, got {dev} and {t.device}")
    if dev.type != "cuda" and not _interpreting():
        raise ValueError(
            f"vos_kernels.triton: expected CUDA tensors (or TRITON_INTERPRET=1 for CPU), got {dev}")
    return dev


def _float_input(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.dtype not in _FLOAT_DTYPES:
        raise ValueError(
            f"vos_kernels.triton: {name} must be float32, float16 or bfloat16, got {t.dtype}")
    return t.contiguous()


def _label_input(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"vos_kernels.triton: {name} must be int32 or int64, got {t.dtype}")
    return t.contiguous()


def _int32_labels(t: torch.Tensor, name: str, num_labels: int) -> torch.Tensor:
    """Labels as contiguous int32, clamped to [-1, num_labels] first: the kernels ignore
    labels outside [0, num_labels), and an int64 label of 2^32 would wrap to 0."""
    t = _label_input(t, name)
    if t.dtype == torch.int64:
        t = t.clamp(-1, num_labels)
    return t.to(torch.int32).contiguous()


def _c_blocking(C: int, max_block: int = 128, chunk: int = 64) -> Tuple[int, int]:
    """(BLOCK_C, NUM_C_CHUNKS): one chunk of next_pow2(C) (>= 16 for tl.dot) when it fits."""
    bc = max(16, _next_pow2(C))
    if bc <= max_block:
        return bc, 1
    return chunk, triton.cdiv(C, chunk)


# ----------------------------------------------------------------------------------------
# Shared device helpers
# ----------------------------------------------------------------------------------------


@triton.jit
def _fg_transform(d, bias):
    """tanh((d + bias) / 2) in fp32 as sign(z) * (1 - e^{-|z|}) / (1 + e^{-|z|}).

    Overflow-free for any z (z = +inf -> 1, -inf -> -1), NaN stays NaN.
    """
    z = d + bias
    t = tl.exp(-tl.abs(z))
    y = (1.0 - t) / (1.0 + t)
    return tl.where(z < 0.0, -y, y)


# ----------------------------------------------------------------------------------------
# Global matching: per-label nearest neighbour (FlashAttention-style tile loop)
# ----------------------------------------------------------------------------------------


@triton.jit
def _mm(a, b, b_f32, acc, DOT_MODE: tl.constexpr):
    """acc + a @ b with fp32 accumulation, precision per DOT_MODE (see _DOT_*); ``out_dtype``
    named, as Triton 3.6 does not take it from the accumulator (3.9 does)."""
    if DOT_MODE == 0:
        acc = tl.dot(a, b, acc, input_precision="ieee", out_dtype=acc.dtype)
    elif DOT_MODE == 1:
        acc = tl.dot(a, b, acc, input_precision="tf32", out_dtype=acc.dtype)
    elif DOT_MODE == 2:
        acc = tl.dot(a, b, acc, out_dtype=acc.dtype)
    else:
        acc = tl.dot(a, b_f32, acc, input_precision="ieee", out_dtype=acc.dtype)
    return acc


@triton.jit
def _global_min_kernel(
    q_ptr,        # [B, Nq, C] query, contiguous (fp32/fp16/bf16)
    r_ptr,        # [Ncand, C] candidate reference rows, sorted by (b, label, flat index)
    ridx_ptr,     # [Ncand] int32 original flat index (t*Hr*Wr + y*Wr + x) of each row
    seg_ptr,      # [B*L + 1] int64: rows of (b, l) are seg[b*L+l] .. seg[b*L+l+1]-1
    bias_ptr,     # [L] fp32 (only read when WRITE_FG)
    out_ptr,      # [B, L, Nq] fp32: sqdist, or fg when WRITE_FG
    idx_ptr,      # [B, L, Nq] int64
    Nq, C, L,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    NUM_C_CHUNKS: tl.constexpr, DOT_MODE: tl.constexpr, WRITE_FG: tl.constexpr,
):
    pid_m = tl.program_id(0)
    lab = tl.program_id(1)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)

    seg_start = tl.load(seg_ptr + b64 * L + lab)
    seg_end = tl.load(seg_ptr + b64 * L + lab + 1)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < Nq
    offs_c = tl.arange(0, BLOCK_C)
    q_rows = q_ptr + b64 * Nq * C + offs_m.to(tl.int64)[:, None] * C

    # |q|^2 (fp32); with a single C chunk the query tile stays in registers.
    if NUM_C_CHUNKS == 1:
        c_mask = offs_c < C
        q_res = tl.load(q_rows + offs_c[None, :], mask=m_mask[:, None] & c_mask[None, :], other=0.0)
        q_f = q_res.to(tl.float32)
        qn = tl.sum(q_f * q_f, axis=1)
        if DOT_MODE == 3:
            q_res = q_f
    else:
        qn = tl.zeros([BLOCK_M], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):                 # runtime loop: not unrolled
            cc = c0 + offs_c
            qc = tl.load(q_rows + cc[None, :], mask=m_mask[:, None] & (cc < C)[None, :], other=0.0)
            qc = qc.to(tl.float32)
            qn += tl.sum(qc * qc, axis=1)

    best = tl.full([BLOCK_M], float("inf"), tl.float32)
    bidx = tl.full([BLOCK_M], -1, tl.int32)
    BIG: tl.constexpr = 2147483647

    for n0 in range(seg_start, seg_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < seg_end
        r_cols = r_ptr + offs_n[None, :] * C            # [1, BLOCK_N] (int64 offsets)
        if NUM_C_CHUNKS == 1:
            r = tl.load(r_cols + offs_c[:, None], mask=c_mask[:, None] & n_mask[None, :],
                        other=0.0)                      # [BLOCK_C, BLOCK_N]
            r_f = r.to(tl.float32)
            rn = tl.sum(r_f * r_f, axis=0)
            acc = _mm(q_res, r, r_f, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), DOT_MODE)
        else:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            rn = tl.zeros([BLOCK_N], dtype=tl.float32)
            for c0 in range(0, C, BLOCK_C):
                cc = c0 + offs_c
                cm = cc < C
                r = tl.load(r_cols + cc[:, None], mask=cm[:, None] & n_mask[None, :], other=0.0)
                r_f = r.to(tl.float32)
                rn += tl.sum(r_f * r_f, axis=0)
                qt = tl.load(q_rows + cc[None, :], mask=m_mask[:, None] & cm[None, :], other=0.0)
                if DOT_MODE == 3:
                    qt = qt.to(tl.float32)
                acc = _mm(qt, r, r_f, acc, DOT_MODE)
        d = qn[:, None] + rn[None, :] - 2.0 * acc
        d = tl.where(d < 0.0, 0.0, d)                    # clamp, NaN kept
        ridx = tl.load(ridx_ptr + offs_n, mask=n_mask, other=0)
        # NaN handled explicitly (tl.min may drop NaN): first NaN of the tile per row.
        is_nan = (d != d) & n_mask[None, :]
        has_nan = tl.max(is_nan.to(tl.int32), axis=1) > 0
        first_nan = tl.min(tl.where(is_nan, ridx[None, :], BIG), axis=1)
        dv = tl.where(n_mask[None, :] & (d == d), d, float("inf"))
        tmin = tl.min(dv, axis=1)
        # lowest original flat index among the tile's minima
        targ = tl.min(tl.where(dv == tmin[:, None], ridx[None, :], BIG), axis=1)
        # Same result as the sequential rule over the tile: a NaN in the tile wins unless
        # the running best is already NaN; otherwise strict < keeps the earlier index.
        new_nan = has_nan & (best == best)
        upd = tmin < best
        best = tl.where(new_nan, float("nan"), tl.where(upd, tmin, best))
        bidx = tl.where(new_nan, first_nan, tl.where(upd, targ, bidx))

    out_off = (b64 * L + lab) * Nq + offs_m
    if WRITE_FG:
        bias = tl.load(bias_ptr + lab)
        fg = _fg_transform(best, bias)
        fg = tl.where(bidx < 0, 1.0, fg)
        tl.store(out_ptr + out_off, fg, mask=m_mask)
    else:
        tl.store(out_ptr + out_off, best, mask=m_mask)
    tl.store(idx_ptr + out_off, bidx.to(tl.int64), mask=m_mask)


# ----------------------------------------------------------------------------------------
# bg epilogue: bg[l] = min over m != l of fg[m]
# ----------------------------------------------------------------------------------------


@triton.jit
def _bg_kernel(
    fg_ptr,       # [B, L, S] fp32
    bg_ptr,       # [B, L, S] fp32
    L, S,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < S
    base = b.to(tl.int64) * L * S + offs
    # best (v1, m1) and second-best value v2 over labels, order: NaN first, then value,
    # ties -> lowest label (labels scanned in increasing order with strict comparisons).
    # v2 starts at 1.0: every fg is <= 1 or NaN, so 1.0 is a neutral "empty" second
    # best, and it is exactly the required bg when L == 1.
    v1 = tl.full([BLOCK], float("inf"), tl.float32)
    m1 = tl.full([BLOCK], -1, tl.int32)
    v2 = tl.full([BLOCK], 1.0, tl.float32)
    # label planes by pointer steps of S: no i32 product lab * S (it would wrap at L·S ≥ 2³¹)
    p = fg_ptr + base
    for lab in range(L):
        v = tl.load(p, mask=mask, other=1.0)
        p += S
        before1 = ((v != v) & (v1 == v1)) | (v < v1)
        before2 = ((v != v) & (v2 == v2)) | (v < v2)
        old1_before2 = ((v1 != v1) & (v2 == v2)) | (v1 < v2)
        v2 = tl.where(before1, tl.where(old1_before2, v1, v2), tl.where(before2, v, v2))
        m1 = tl.where(before1, lab, m1)
        v1 = tl.where(before1, v, v1)
    p = bg_ptr + base
    for lab in range(L):
        out = tl.where(m1 == lab, v2, v1)
        tl.store(p, out, mask=mask)
        p += S


def _bg_from_fg(fg: torch.Tensor, op: str) -> torch.Tensor:
    """bg [B, L, ...] from fg [B, L, ...] (fp32, contiguous) of the op ``op``."""
    B, L = fg.shape[0], fg.shape[1]
    S = fg[0, 0].numel() if fg.numel() else 0
    bg = torch.empty_like(fg)
    if fg.numel() == 0:
        return bg
    check_count(op, "pixels per label plane of fg", S)
    BLOCK = 256 if not _interpreting() else 1024
    grid = launch_grid(op, pixel_blocks=triton.cdiv(S, BLOCK), batch_elements=B)
    _bg_kernel[grid](fg, bg, L, S, BLOCK=BLOCK)
    return bg


# ----------------------------------------------------------------------------------------
# Host side of global matching
# ----------------------------------------------------------------------------------------


def _global_candidates(reference: torch.Tensor, reference_labels: torch.Tensor,
                       num_labels: int, atrous_rate: int):
    """Compact, label-sorted candidate buffer (O(reference) memory, no host sync).

    Returns (rows [B*Ns, C] in the input dtype, ridx [B*Ns] int32 flat index within the
    batch element, seg [B*L+1] int64). Rows of (b, l) are ``seg[b*L+l] .. seg[b*L+l+1]``,
    ordered by increasing flat index; rows after ``seg[B*L]`` are non-candidates (unused).
    """
    B, T, Hr, Wr, C = reference.shape
    L = int(num_labels)
    dev = reference.device
    rate = int(atrous_rate)
    ref_sub = reference[:, :, ::rate, ::rate, :]            # atrous grid (eq. 8-9)
    lab_sub = reference_labels[:, :, ::rate, ::rate]
    Hs, Ws = ref_sub.shape[2], ref_sub.shape[3]
    Ns = T * Hs * Ws
    tt = torch.arange(T, device=dev, dtype=torch.int64).view(T, 1, 1) * (Hr * Wr)
    yy = torch.arange(Hs, device=dev, dtype=torch.int64).view(1, Hs, 1) * (rate * Wr)
    xx = torch.arange(Ws, device=dev, dtype=torch.int64).view(1, 1, Ws) * rate
    flat = (tt + yy + xx).reshape(1, Ns).expand(B, Ns)
    lab = lab_sub.reshape(B, Ns).to(torch.int64)
    valid = (lab >= 0) & (lab < L)
    bofs = torch.arange(B, device=dev, dtype=torch.int64).view(B, 1) * L
    key = torch.where(valid, bofs + lab, torch.full_like(lab, B * L)).reshape(-1)
    sorted_key, perm = torch.sort(key, stable=True)
    rows = ref_sub.reshape(B * Ns, C)[perm].contiguous()
    ridx = flat.reshape(-1)[perm].to(torch.int32).contiguous()
    bounds = torch.arange(B * L + 1, device=dev, dtype=torch.int64)
    seg = torch.searchsorted(sorted_key, bounds).to(torch.int64).contiguous()
    return rows, ridx, seg


def _global_launch(query, reference, reference_labels, num_labels, atrous_rate, bias,
                   block_m=None, block_n=None, allow_tf32=False):
    if query.dim() != 4 or reference.dim() != 5 or reference_labels.dim() != 4:
        raise ValueError("vos_kernels.triton: expected query [B,H,W,C], reference "
                         "[B,T,Hr,Wr,C], reference_labels [B,T,Hr,Wr]")
    if int(atrous_rate) < 1:
        raise ValueError(f"vos_kernels.triton: atrous_rate must be >= 1, got {atrous_rate}")
    op = "labelled_nearest_sqdist" if bias is None else "fb_global_matching"
    # before any copy: ridx / bidx hold the reference pixel's flat index in int32
    check_count(op, "H*W (query pixels)", query.shape[1] * query.shape[2])
    check_count(op, "T*Hr*Wr (reference pixels)", reference.shape[1] * reference.shape[2] * reference.shape[3])
    dev = _check_device(query, reference, reference_labels)
    query = _float_input(query, "query")
    reference = _float_input(reference, "reference")
    reference_labels = _label_input(reference_labels, "reference_labels")
    B, H, W, C = query.shape
    L = int(num_labels)
    if reference.shape[0] != B or reference.shape[4] != C:
        raise ValueError(f"vos_kernels.triton: reference must be [B={B}, T, Hr, Wr, C={C}], "
                         f"got {tuple(reference.shape)}")
    if tuple(reference_labels.shape) != tuple(reference.shape[:4]):
        raise ValueError(f"vos_kernels.triton: reference_labels must be "
                         f"{tuple(reference.shape[:4])}, got {tuple(reference_labels.shape)}")
    if bias is not None and bias.numel() != L:
        raise ValueError(f"vos_kernels.triton: bias must have num_labels={L} elements, "
                         f"got {bias.numel()}")
    Nq = H * W
    out = torch.empty((B, L, H, W), device=dev, dtype=torch.float32)
    idx = torch.empty((B, L, H, W), device=dev, dtype=torch.int64)
    if out.numel() == 0:
        return out, idx
    if reference.dtype != query.dtype:
        common = torch.promote_types(query.dtype, reference.dtype)
        query = query.to(common)
        reference = reference.to(common)
    rows, ridx, seg = _global_candidates(reference, reference_labels, L, atrous_rate)
    if rows.shape[0] == 0:          # T*Hr*Wr == 0: keep a valid pointer
        rows = torch.zeros((1, C), device=dev, dtype=query.dtype)
        ridx = torch.zeros((1,), device=dev, dtype=torch.int32)
    if query.dtype == torch.float32:
        dot_mode = _DOT_TF32 if allow_tf32 else _DOT_IEEE
    elif query.dtype == torch.bfloat16 and _interpreting():
        dot_mode = _DOT_UPCAST
    else:
        dot_mode = _DOT_NATIVE
    # Tile configuration (checked with ptxas for sm_80 / sm_90: no register spills).
    # C <= 128: the query tile [BLOCK_M, C] stays in registers (one C chunk); above, C is
    # streamed in chunks (16 for fp32 "ieee" dots, which run on FMA units with operands
    # in registers, 64 for tensor-core dots).
    if dot_mode in (_DOT_IEEE, _DOT_UPCAST):
        BLOCK_C, NCH = _c_blocking(C, max_block=128, chunk=16)
    else:
        BLOCK_C, NCH = _c_blocking(C, max_block=128, chunk=64)
    BLOCK_M = int(block_m) if block_m else 64
    BLOCK_N = int(block_n) if block_n else 64
    write_fg = bias is not None
    if write_fg:
        bias_t = bias.to(device=dev, dtype=torch.float32).contiguous()
    else:
        bias_t = out  # unused pointer
    grid = launch_grid(op, query_blocks=triton.cdiv(Nq, BLOCK_M), labels=L, batch_elements=B)
    _global_min_kernel[grid](
        query, rows, ridx, seg, bias_t, out, idx, Nq, C, L,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_C=BLOCK_C, NUM_C_CHUNKS=NCH,
        DOT_MODE=dot_mode, WRITE_FG=write_fg, num_warps=8, num_stages=2,
    )
    return out, idx


def labelled_nearest_sqdist(query: torch.Tensor, reference: torch.Tensor,
                            reference_labels: torch.Tensor, num_labels: int,
                            atrous_rate: int = 1, *, block_m: int = None,
                            block_n: int = None, allow_tf32: bool = False):
    """Per-label nearest squared distance (CFBI+ global matching, eq. 2-3; atrous eq. 8-9).

    Args:
        query: ``[B, H, W, C]`` float32/float16/bfloat16, any strides.
        reference: ``[B, T, Hr, Wr, C]`` same float dtypes (5-D only here).
        reference_labels: ``[B, T, Hr, Wr]`` int32/int64; -1 ignore, ``0..L-1`` labels.
        num_labels: L.
        atrous_rate: keep reference pixels with ``y % rate == 0 and x % rate == 0``.
        block_m, block_n: tile sizes (query rows / reference rows per tile), powers of
            two >= 16; default 64 / 64.
        allow_tf32: use TF32 tensor cores for float32 inputs (faster, ~1e-3 relative
            error on the dot product). Default False: exact fp32 products.

    Returns:
        ``(sqdist [B, L, H, W] float32, index [B, L, H, W] int64)``: the minimum over
        candidate reference pixels of label l of ``||e_p - e_q||^2`` clamped at 0, and the
        flat index ``t*Hr*Wr + y*Wr + x`` of the argmin (ties -> lowest index, first NaN
        sticky); ``(+inf, -1)`` for a label with no candidate.

    Kernel: the host selects the candidates (atrous grid, label >= 0), stable-sorts them
    by (batch, label) so each label is a contiguous segment in increasing flat index, and
    gathers them into a compact buffer (O(reference) memory; nothing of size
    query x reference is allocated). Grid ``(cdiv(H*W, BLOCK_M), L, B)``: each program
    loops over its label's segment in BLOCK_N tiles, computes ``|q|^2 + |r|^2 - 2 q.r``
    with ``tl.dot`` (fp32 accumulation; C in one chunk up to 128, else chunks of 16 for
    fp32 / 64 for fp16, bf16, tf32),
    clamps, and folds a per-row min / lowest-index argmin / first-NaN into the running
    state with the contract's update rule.
    """
    return _global_launch(query, reference, reference_labels, num_labels, atrous_rate,
                          None, block_m, block_n, allow_tf32)


def fb_global_matching(query: torch.Tensor, reference: torch.Tensor,
                       reference_labels: torch.Tensor, num_labels: int,
                       bias: torch.Tensor, atrous_rate: int = 1, *, block_m: int = None,
                       block_n: int = None, allow_tf32: bool = False):
    """Foreground/background global matching (CFBI+ eq. 2-3, atrous eq. 8-9).

    Args: as :func:`labelled_nearest_sqdist`, plus ``bias [L]`` float (CFBI passes
    ``[b_B, b_F, b_F, ...]``).

    Returns:
        ``(fg, bg, index)``, each ``[B, L, H, W]``; fg/bg float32, index int64 (argmin
        flat index, -1 empty; saved for backward).
        ``fg[l] = tanh((sqdist[l] + bias[l]) / 2)`` in fp32 (1.0 exactly when index is -1),
        ``bg[l] = min over m != l of fg[m]`` (1.0 when L == 1).

    The global kernel applies the transform in its epilogue (writes fg, not sqdist); a
    second small kernel (grid over pixels) keeps the best label and the best and
    second-best values per pixel (NaN first, ties -> lowest label) and writes bg: O(L)
    per pixel instead of the reference code's O(L^2).
    """
    fg, idx = _global_launch(query, reference, reference_labels, num_labels, atrous_rate,
                             bias, block_m, block_n, allow_tf32)
    bg = _bg_from_fg(fg, "fb_global_matching")
    return fg, bg, idx


# ----------------------------------------------------------------------------------------
# Multi-local matching
# ----------------------------------------------------------------------------------------


@triton.jit
def _local_kernel(
    q_ptr,        # [B, H*W, C] query
    p_ptr,        # [B, H*W, C] previous frame
    lab_ptr,      # [B, H*W] int32 previous labels
    win_ptr,      # [K] int32 windows
    bias_ptr,     # [L] fp32
    fg_ptr,       # [B, L, K, H*W] fp32
    idx_ptr,      # [B, L, K, H*W] int64
    H, W, C, L, RY, RX, NOFF, rate,
    K: tl.constexpr, LG: tl.constexpr, LK_PAD: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, NUM_C_CHUNKS: tl.constexpr,
):
    pid_p = tl.program_id(0)
    grp = tl.program_id(1)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    HW = H * W

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = offs_p < HW
    y = offs_p // W
    x = offs_p % W

    # accumulator columns j -> (label grp*LG + j // K, window j % K)
    cols = tl.arange(0, LK_PAD)
    col_l = grp * LG + cols // K
    col_k = cols % K
    col_ok = (cols < LG * K) & (col_l < L)
    col_w = tl.load(win_ptr + col_k, mask=col_ok, other=-1)

    q_rows = q_ptr + b64 * HW * C + offs_p.to(tl.int64)[:, None] * C
    p_base = p_ptr + b64 * HW * C
    l_base = lab_ptr + b64 * HW
    offs_c = tl.arange(0, BLOCK_C)
    if NUM_C_CHUNKS == 1:
        c_mask = offs_c < C
        q_res = tl.load(q_rows + offs_c[None, :], mask=p_mask[:, None] & c_mask[None, :],
                        other=0.0).to(tl.float32)

    best = tl.full([BLOCK_P, LK_PAD], float("inf"), tl.float32)
    bidx = tl.full([BLOCK_P, LK_PAD], -1, tl.int32)
    # offsets in increasing (dy, dx), each axis clipped to the frame (RY, RX): the
    # neighbour's flat index increases, so the sequential update rule gives ties -> lowest
    # flat index. NOFF = (2 RY + 1)(2 RX + 1) comes from the host: an int64 argument (and
    # loop) where it reaches 2^31.
    SX = 2 * RX + 1
    for oi in range(NOFF):
        dy = (oi // SX - RY).to(tl.int32) * rate        # |dy|, |dx| < 2^30: the host checks H, W
        dx = (oi % SX - RX).to(tl.int32) * rate
        ring = tl.maximum(tl.abs(dy), tl.abs(dx))
        ny = y + dy
        nx = x + dx
        nvalid = p_mask & (ny >= 0) & (ny < H) & (nx >= 0) & (nx < W)
        nflat = ny * W + nx
        nlab = tl.load(l_base + nflat, mask=nvalid, other=-1)
        nvalid = nvalid & (nlab >= 0) & (nlab < L)
        n_rows = p_base + nflat.to(tl.int64)[:, None] * C
        if NUM_C_CHUNKS == 1:
            nb = tl.load(n_rows + offs_c[None, :], mask=nvalid[:, None] & c_mask[None, :],
                         other=0.0).to(tl.float32)
            diff = q_res - nb
            d = tl.sum(diff * diff, axis=1)
        else:
            d = tl.zeros([BLOCK_P], dtype=tl.float32)
            for c0 in range(0, C, BLOCK_C):
                cc = c0 + offs_c
                cm = cc < C
                qc = tl.load(q_rows + cc[None, :], mask=p_mask[:, None] & cm[None, :],
                             other=0.0).to(tl.float32)
                nb = tl.load(n_rows + cc[None, :], mask=nvalid[:, None] & cm[None, :],
                             other=0.0).to(tl.float32)
                diff = qc - nb
                d += tl.sum(diff * diff, axis=1)
        d = tl.where(d < 0.0, 0.0, d)
        m = (nvalid[:, None] & (nlab[:, None] == col_l[None, :]) & col_ok[None, :]
             & (col_w[None, :] >= ring))
        dd = d[:, None] + tl.zeros([BLOCK_P, LK_PAD], dtype=tl.float32)
        upd = m & ((dd < best) | ((dd != dd) & (best == best)))
        best = tl.where(upd, dd, best)
        bidx = tl.where(upd, nflat[:, None], bidx)

    bias = tl.load(bias_ptr + col_l, mask=col_ok, other=0.0)
    fg = _fg_transform(best, bias[None, :])
    fg = tl.where(bidx < 0, 1.0, fg)
    out_off = ((b64 * L + col_l) * K + col_k)[None, :] * HW + offs_p[:, None]
    omask = p_mask[:, None] & col_ok[None, :]
    tl.store(fg_ptr + out_off, fg, mask=omask)
    tl.store(idx_ptr + out_off, bidx.to(tl.int64), mask=omask)


def fb_multi_local_matching(query: torch.Tensor, previous: torch.Tensor,
                            previous_labels: torch.Tensor, num_labels: int,
                            windows: Sequence[int], bias: torch.Tensor,
                            atrous_rate: int = 1, *, block_p: int = None):
    """Foreground/background multi-local matching (CFBI+ eq. 4-7, atrous eq. 10-12).

    Args:
        query, previous: ``[B, H, W, C]`` float32/float16/bfloat16, any strides.
        previous_labels: ``[B, H, W]`` int32/int64 (-1 ignore).
        num_labels: L.
        windows: K ints >= 1 (ascending by contract; output window axis in that order).
        bias: ``[L]`` float.
        atrous_rate: offsets are multiples of the rate.
        block_p: query pixels per program (power of two), default 32 (128 interpreted).

    Returns:
        ``(fg, bg, index)``, each ``[B, L, K, H, W]``; fg/bg float32, index int64 = flat
        index ``(y+dy)*W + (x+dx)`` in the previous frame of the argmin, -1 when empty.
        For window k the candidates of query pixel (y, x) are the previous pixels
        (y+dy, x+dx) inside the frame, label == l, ``dy, dx`` multiples of the rate with
        ``|dy|, |dx| <= k``. fg/bg as in :func:`fb_global_matching`, per window.

    Kernel: grid ``(cdiv(H*W, BLOCK_P), label groups, B)``. One pass over every offset
    of the largest window (clipped to the frame) in increasing (dy, dx); per offset the
    neighbour embeddings are gathered (masked outside the frame / ignored label),
    ``d = sum_c (q - n)^2`` in fp32 (direct difference), and a register state
    ``[BLOCK_P, LK_PAD]`` of (best, index) for every (label, window) column is updated
    where the neighbour has the column's label and ``window >= max(|dy|, |dx|)`` (the
    prefix over rings is implicit). LK_PAD = next_pow2(LG*K) with LG labels per program,
    ``LG*K <= 64`` (more labels -> more programs along grid axis 1, each recomputing the
    distances). The kernel writes fg and index; the bg epilogue is the kernel of
    :func:`fb_global_matching`.
    """
    if query.dim() != 4 or previous.dim() != 4 or previous_labels.dim() != 3:
        raise ValueError("vos_kernels.triton: expected query, previous [B,H,W,C] and "
                         "previous_labels [B,H,W]")
    op = "fb_multi_local_matching"
    H, W = query.shape[1], query.shape[2]
    check_count(op, "H*W (pixels)", H * W)
    if max(H, W) >= 2**30:     # y + dy and x + dx stay in int32
        raise ValueError(f"vos_kernels.triton.{op}: H and W must be below 2^30 for the int32 indexing of the "
                         f"Triton kernels, got {H} x {W}")
    check_count(op, "K*H*W (pixels per label of fg)", len(windows) * H * W)
    dev = _check_device(query, previous, previous_labels)
    query = _float_input(query, "query")
    previous = _float_input(previous, "previous")
    L = int(num_labels)
    labels = _int32_labels(previous_labels, "previous_labels", L)
    rate = int(atrous_rate)
    if rate < 1:
        raise ValueError(f"vos_kernels.triton: atrous_rate must be >= 1, got {atrous_rate}")
    wins = [int(w) for w in windows]
    if len(wins) == 0:
        raise ValueError("vos_kernels.triton: windows must be a non-empty list of ints")
    B, H, W, C = query.shape
    K = len(wins)
    if tuple(previous.shape) != (B, H, W, C):
        raise ValueError(f"vos_kernels.triton: previous must be {(B, H, W, C)}, "
                         f"got {tuple(previous.shape)}")
    if tuple(labels.shape) != (B, H, W):
        raise ValueError(f"vos_kernels.triton: previous_labels must be {(B, H, W)}, "
                         f"got {tuple(labels.shape)}")
    if bias.numel() != L:
        raise ValueError(f"vos_kernels.triton: bias must have num_labels={L} elements, "
                         f"got {bias.numel()}")
    if min(wins) < 1:
        raise ValueError(f"vos_kernels.triton: windows must be >= 1, got {wins}")
    HW = H * W
    fg = torch.empty((B, L, K, H, W), device=dev, dtype=torch.float32)
    idx = torch.empty((B, L, K, H, W), device=dev, dtype=torch.int64)
    if fg.numel() == 0:
        return fg, torch.empty_like(fg), idx
    R = max(wins) // rate
    RY = min(R, (H - 1) // rate)               # offsets beyond the frame never match
    RX = min(R, (W - 1) // rate)
    win_t = torch.tensor(wins, device=dev, dtype=torch.int32)
    bias_t = bias.to(device=dev, dtype=torch.float32).contiguous()
    LG = max(1, min(L, _LOCAL_MAX_COLS // K))
    LK_PAD = _next_pow2(LG * K)
    n_groups = triton.cdiv(L, LG)
    # query tile resident in registers up to C = 128, chunks of 64 above (with
    # BLOCK_P = 32, 8 warps and a [32, 64] state: no spills on sm_80 / sm_90 per ptxas)
    BLOCK_C, NCH = _c_blocking(C, max_block=128, chunk=64)
    BLOCK_C = _next_pow2(C) if NCH == 1 else BLOCK_C   # no tl.dot here: no 16 minimum
    if block_p:
        BLOCK_P = int(block_p)
    else:
        BLOCK_P = 128 if _interpreting() else 32
    grid = launch_grid(op, pixel_blocks=triton.cdiv(HW, BLOCK_P), label_groups=n_groups, batch_elements=B)
    _local_kernel[grid](
        query, previous, labels, win_t, bias_t, fg, idx,
        H, W, C, L, RY, RX, (2 * RY + 1) * (2 * RX + 1), rate,
        K=K, LG=LG, LK_PAD=LK_PAD, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C, NUM_C_CHUNKS=NCH,
        num_warps=8, num_stages=2,
    )
    bg = _bg_from_fg(fg, op)
    return fg, bg, idx


# ----------------------------------------------------------------------------------------
# Instance pooling
# ----------------------------------------------------------------------------------------


@triton.jit
def _pool_kernel(
    e_ptr,        # [B, N, C]
    lab_ptr,      # [B, N] int32
    out_ptr,      # [B, L, 2, C] fp32
    N, C, L,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    lab = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = offs_c < C
    acc_eq = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    acc_ne = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    cnt_eq = tl.zeros([BLOCK_P], dtype=tl.int32)
    cnt_ne = tl.zeros([BLOCK_P], dtype=tl.int32)
    for p0 in range(0, N, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        pm = offs_p < N
        lv = tl.load(lab_ptr + b64 * N + offs_p, mask=pm, other=-1)
        e = tl.load(e_ptr + b64 * N * C + offs_p.to(tl.int64)[:, None] * C + offs_c[None, :],
                    mask=pm[:, None] & cm[None, :], other=0.0).to(tl.float32)
        is_eq = lv == lab
        is_ne = (lv >= 0) & (lv < L) & (lv != lab)
        acc_eq += tl.where(is_eq[:, None], e, 0.0)
        acc_ne += tl.where(is_ne[:, None], e, 0.0)
        cnt_eq += is_eq.to(tl.int32)
        cnt_ne += is_ne.to(tl.int32)
    s_eq = tl.sum(acc_eq, axis=0)
    s_ne = tl.sum(acc_ne, axis=0)
    n_eq = tl.sum(cnt_eq, axis=0).to(tl.float32)
    n_ne = tl.sum(cnt_ne, axis=0).to(tl.float32)
    o = out_ptr + ((b64 * L + lab) * 2) * C + offs_c
    tl.store(o, s_eq / (n_eq + 1e-5), mask=cm)
    tl.store(o + C, s_ne / (n_ne + 1e-5), mask=cm)


def fb_instance_pooling(embedding: torch.Tensor, labels: torch.Tensor, num_labels: int):
    """Per-label fg / bg mean embeddings (CFBI instance-level attention head).

    Args:
        embedding: ``[B, H, W, C]`` float32/float16/bfloat16, any strides.
        labels: ``[B, H, W]`` int32/int64, -1 ignore.
        num_labels: L.

    Returns:
        ``[B, L, 2, C]`` float32: ``out[b,l,0] = sum_{label==l} e / (n_l + 1e-5)``,
        ``out[b,l,1] = sum_{label>=0, label!=l} e / (n_valid - n_l + 1e-5)``.

    Kernel: grid ``(L, cdiv(C, BLOCK_C), B)``; each program loops over the pixels in
    blocks and accumulates both sums and both counts (integers) in registers, then
    divides. Deterministic (no atomics). Cost L x H x W x C loads per batch element.
    """
    if embedding.dim() != 4 or labels.dim() != 3:
        raise ValueError("vos_kernels.triton: expected embedding [B,H,W,C], labels [B,H,W]")
    dev = _check_device(embedding, labels)
    emb = _float_input(embedding, "embedding")
    L = int(num_labels)
    lab = _int32_labels(labels, "labels", L)
    B, H, W, C = emb.shape
    if tuple(lab.shape) != (B, H, W):
        raise ValueError(f"vos_kernels.triton: labels must be {(B, H, W)}, "
                         f"got {tuple(lab.shape)}")
    N = H * W
    out = torch.empty((B, L, 2, C), device=dev, dtype=torch.float32)
    if out.numel() == 0:
        return out
    if N == 0:
        return out.zero_()
    BLOCK_C = min(_next_pow2(C), 64)
    BLOCK_P = 256 if _interpreting() else 32
    grid = launch_grid("fb_instance_pooling", labels=L, channel_blocks=triton.cdiv(C, BLOCK_C), batch_elements=B)
    _pool_kernel[grid](emb, lab, out, N, C, L, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C, num_warps=4)
    return out


# ----------------------------------------------------------------------------------------
# Backward of a nearest squared distance
# ----------------------------------------------------------------------------------------


@triton.jit
def _nearest_bwd_kernel(
    g_ptr,        # [B, M, Nq] fp32
    q_ptr,        # [B, Nq, C]
    r_ptr,        # [B, Nr, C]
    idx_ptr,      # [B, M, Nq] int64
    gq_ptr,       # [B, Nq, C] fp32
    gr_ptr,       # [B, Nr, C] fp32, zero-initialised, atomically accumulated
    M, Nq, Nr, C,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = offs_p < Nq
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = offs_c < C
    q_off = b64 * Nq * C + offs_p.to(tl.int64)[:, None] * C + offs_c[None, :]
    e_p = tl.load(q_ptr + q_off, mask=pm[:, None] & cm[None, :], other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for m in range(M):
        o = (b64 * M + m) * Nq + offs_p
        qi = tl.load(idx_ptr + o, mask=pm, other=-1)
        g = tl.load(g_ptr + o, mask=pm, other=0.0)
        valid = pm & (qi >= 0)
        vm = valid[:, None] & cm[None, :]
        r_off = b64 * Nr * C + qi[:, None] * C + offs_c[None, :]
        e_q = tl.load(r_ptr + r_off, mask=vm, other=0.0).to(tl.float32)
        t = (2.0 * g)[:, None] * (e_p - e_q)
        acc += tl.where(vm, t, 0.0)
        tl.atomic_add(gr_ptr + r_off, -t, mask=vm)
    tl.store(gq_ptr + q_off, acc, mask=pm[:, None] & cm[None, :])


def nearest_sqdist_backward(grad: torch.Tensor, query: torch.Tensor, reference: torch.Tensor,
                            index: torch.Tensor):
    """Gradient of ``d = ||e_p - e_q||^2`` at saved argmin pairs (CFBI+ eq. 2-3 / 4-7).

    Args:
        grad: ``[B, M, Nq]`` float (upstream gradient of each (label/window, pixel) min,
            already multiplied by the transform's derivative).
        query: ``[B, Nq, C]`` float; reference: ``[B, Nr, C]`` float.
        index: ``[B, M, Nq]`` int32/int64 argmin index into Nr, -1 skipped.

    Returns:
        ``(grad_query [B, Nq, C] f32, grad_reference [B, Nr, C] f32)``: for every
        ``(b, m, p)`` with ``q = index >= 0``: ``grad_query[p] += 2 g (e_p - e_q)``,
        ``grad_reference[q] -= 2 g (e_p - e_q)``.

    Kernel: grid ``(cdiv(Nq, BLOCK_P), cdiv(C, BLOCK_C), B)``; each program loops over M,
    gathers ``e_q``, accumulates grad_query in registers (deterministic, fixed order) and
    scatters into grad_reference with ``tl.atomic_add``. The atomics make grad_reference
    NOT bitwise deterministic on GPU (float additions in arrival order; the values agree
    to rounding). Under the interpreter programs run sequentially, so it is deterministic
    there.
    """
    if grad.dim() != 3 or query.dim() != 3 or reference.dim() != 3 or index.dim() != 3:
        raise ValueError("vos_kernels.triton: expected grad [B,M,Nq], query [B,Nq,C], "
                         "reference [B,Nr,C], index [B,M,Nq]")
    check_count("nearest_sqdist_backward", "Nq (query pixels)", query.shape[1])
    dev = _check_device(grad, query, reference, index)
    g = grad.to(torch.float32).contiguous()
    q = _float_input(query, "query")
    r = _float_input(reference, "reference")
    if index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"vos_kernels.triton: index must be int32 or int64, got {index.dtype}")
    idx = index.to(torch.int64).contiguous()
    B, Nq, C = q.shape
    Nr = r.shape[1]
    M = g.shape[1]
    if r.shape[0] != B or r.shape[2] != C:
        raise ValueError(f"vos_kernels.triton: reference must be [B={B}, Nr, C={C}], "
                         f"got {tuple(r.shape)}")
    if tuple(g.shape) != (B, M, Nq) or tuple(idx.shape) != (B, M, Nq):
        raise ValueError(f"vos_kernels.triton: grad and index must be [B={B}, M, Nq={Nq}] "
                         f"and equal, got {tuple(g.shape)} and {tuple(idx.shape)}")
    gq = torch.zeros((B, Nq, C), device=dev, dtype=torch.float32)
    gr = torch.zeros((B, Nr, C), device=dev, dtype=torch.float32)
    if gq.numel() == 0 or M == 0 or Nr == 0:
        return gq, gr
    BLOCK_C = min(_next_pow2(C), 64)
    BLOCK_P = 128 if _interpreting() else 32
    grid = launch_grid("nearest_sqdist_backward", query_blocks=triton.cdiv(Nq, BLOCK_P),
                       channel_blocks=triton.cdiv(C, BLOCK_C), batch_elements=B)
    _nearest_bwd_kernel[grid](g, q, r, idx, gq, gr, M, Nq, Nr, C,
                              BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C, num_warps=8)
    return gq, gr
