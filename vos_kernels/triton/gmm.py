"""Triton kernels of the GMM prototype ops (PCAN, EMANet) and A-GAME's diagonal Gaussians,
for CUDA tensors (and CPU tensors under ``TRITON_INTERPRET=1``).

Same contract as the C++ CPU kernels: ``docs/internals.md`` ("GMM prototypes and A-GAME
Gaussians (issue 5)"), ``shared/spec/gmm.md``, ``shared/spec/api.md``. Entry points have
the op signatures of ``csrc/ops.cpp`` (plus an optional ``splits`` keyword, see below).

Dtypes. Inputs float32, float16 or bfloat16 (CUDA) and float64 (CPU under the
interpreter, for the oracle tests and gradcheck; Triton's fp64 arithmetic is used as is,
nothing is rounded to fp32). Every kernel reads its inputs in their own dtype and converts
them to the accumulation dtype ``ACC`` = the output pointer's element type: float64 for
float64 inputs, float32 otherwise. Outputs and scratch are ``ACC``. ``mask`` and
``var_reg`` arrive in ``ACC`` (the public wrapper converts them). ``kappa`` is passed as
a one-element ``ACC`` tensor, not as a kernel scalar (Triton types Python floats as fp32,
which would round kappa for float64). Non-contiguous inputs are made contiguous.

Matrix products (``tl.dot``): float32 and float64 inputs use exact IEEE products
(``input_precision="ieee"``: on the GPU fp32 FMAs, no TF32); float16 / bfloat16 inputs are
converted to fp32 and multiplied with TF32 tensor cores (``"tf32"``): their values are
exact in TF32, the other operand (means, responsibilities, softmax weights) is rounded to
10 mantissa bits, better than the inputs' own 7 / 10 bits. Under the interpreter every dot
is IEEE.

Determinism. No atomics. A sum over N is split over ``splits`` programs; each writes its
partial sums (in its tiles' order) to a ``[B, splits, ...]`` scratch buffer, and
``_split_sum_kernel`` adds the partials in split order. The number of splits is chosen
from the shape and the SM count (1 under the interpreter; the ``splits`` keyword of each
entry overrides it, for tests), so reruns on one device are bitwise equal; different
split counts round differently (fp32 sums in another order).

Kernels:

* ``gmm_em``: ``_em_kernel``, one program per (split of N, batch row). Per tile of
  ``BLOCK_N`` points: logits against all ``KP`` means (``KP`` = K padded to a power of two
  ≥ 16 for ``tl.dot``; padded components get logit −inf) over C in ``BLOCK_C`` blocks, the
  max-subtracted softmax, the mask, the tile's ``S_k`` (registers) and its
  ``A_k = Σ_n z_nk x_n`` (``tl.dot(zᵀ, x)`` per C block, added into the program's own
  ``[KP, C]`` slice of the scratch: a read-modify-write of data only this program touches,
  from L1/L2, with a ``debug_barrier`` per tile because the dot's register layout and the
  load's need not give an element to the same thread). The tile's x blocks are read twice
  (logits, then M-step) but from HBM once: the second read hits L2. The resp store happens
  in the last iteration only. Means are kept un-normalised with per-C-block ``Σ_c μ²``
  (``nsq``); the E-step multiplies each loaded block by ``1/(1e-6 + ‖μ_k‖)``.
  - one split (many rows, few points: PCAN's instance head, B = R RoIs × N = 196): the
    program owns its whole row and runs *all* iterations in one launch: after its tiles it
    forms ``μ = A / (1e-6 + S)`` and ``nsq`` itself, then the next iteration, and finally
    writes ``means_out``. One launch per call.
  - several splits (few rows, many points: PCAN frame level, B = 1, N = 60 352): one
    ``_em_kernel`` launch per iteration, then ``_split_sum_kernel`` (grid over C blocks)
    adds the partials in split order and writes μ and ``nsq``; ``_em_output_kernel``
    writes the (normalised) means at the end. 2 launches per iteration + 1.
* ``prototype_values``: ``_pv_kernel`` per (split, CV block, row): ``S += Σ r``,
  ``A += rᵀ·v`` (``tl.dot``) in registers over its tiles; one split writes
  ``A / (1e-6 + S)``, several write partials for ``_split_sum_kernel``.
* ``prototype_attention``: ``_attention_kernel`` per (block of queries, row): logits via
  ``tl.dot`` over C blocks (l2: ``−kappa/2·‖μ_k‖²`` from the loaded key blocks), softmax
  over K, ``attn`` stored, ``out = attn·V`` per CV block.
* ``diag_gmm_log_prob``: ``_log_prob_kernel`` per (block of points, row): for every D
  block the ``[BLOCK_N, KP, BLOCK_D]`` differences ``x − μ`` squared times ``1/var``
  (never the expansion), summed over D, plus ``Σ_d log var`` of the program's components.
* ``diag_gmm_log_prob_backward``: ``_log_prob_bwd_kernel`` per (split of N, D block, row):
  ``t = (x − μ)/var``, ``grad_x = −Σ_k g t`` stored per tile, ``Σ_n g t`` and
  ``−½ Σ_n g (1/var − t²)`` accumulated (partials when split).
* ``diag_gmm_fit``: two launches of ``_fit_pass_kernel`` (per split of N, D block, row):
  pass 1 ``S``, ``Σ w x`` → ``mean = Σ w x / (1 + S)``; pass 2 ``Σ w (x − mean)²`` on the
  differences → ``var = var_reg + Q / (1 + S)``.
* ``diag_gmm_fit_backward``: pass 2 again for ``S``, ``Q`` (raw), then
  ``_fit_bwd_kernel`` per (block of points, row) over all D blocks: ``grad_x`` per tile and
  ``grad_w_nk = a_k Σ_d [...]`` (docs/internals.md formulas).

Validation is the public wrapper's job (:mod:`vos_kernels.gmm`); this module assumes
shapes that agree. Developed under the interpreter; the GPU code paths are compiled for
sm_90 by ``tests/test_triton_aot_compile.py`` but were not run on a GPU by their author.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._limits import check_count, launch_grid
from .matching import _check_device, _interpreting, _next_pow2

__all__ = ["diag_gmm_fit", "diag_gmm_fit_backward", "diag_gmm_log_prob", "diag_gmm_log_prob_backward", "gmm_em",
           "prototype_attention", "prototype_values"]

_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# _split_sum_kernel / epilogue modes.
_SUM = 0          # Σ_s partial
_DIV_EPS = 1      # Σ_s A / (1e-6 + Σ_s S)   (PCAN l1norm)
_DIV_ONE = 2      # Σ_s A / (1 + Σ_s S)      (A-GAME fit)


# ----------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, acc, TF32: tl.constexpr):
    """acc + a @ b: exact IEEE products, or TF32 tensor cores (fp16/bf16 inputs on the GPU).
    ``out_dtype`` is the accumulator's: Triton 3.6 (the GPU image's) defaults it to fp32
    and rejects an fp64 accumulator (float64 inputs) at compile time."""
    if TF32:
        acc = tl.dot(a, b, acc, input_precision="tf32", out_dtype=acc.dtype)
    else:
        acc = tl.dot(a, b, acc, input_precision="ieee", out_dtype=acc.dtype)
    return acc


@triton.jit
def _sqrt(v):
    """Correctly rounded square root for fp32 (tl.sqrt is the fast approximation there)."""
    if v.dtype == tl.float32:
        r = tl.sqrt_rn(v)
    else:
        r = tl.sqrt(v)
    return r


@triton.jit
def _epilogue(a, s, MODE: tl.constexpr):
    """a [KP, BLOCK] partial sums, s [KP]: see _SUM / _DIV_EPS / _DIV_ONE."""
    if MODE == 1:
        a = a / (tl.full([1, 1], 1e-6, a.dtype) + s[:, None])
    elif MODE == 2:
        a = a / (1.0 + s[:, None])
    return a


@triton.jit
def _em_inv_norm(nsq_base, NCB, norm, KP: tl.constexpr, NCB_P: tl.constexpr, ACC: tl.constexpr):
    """[KP] factors of the stored means: ``1 / (1e-6 + ‖μ_k‖)`` where ``norm`` ([KP] int1)
    is set, else 1. ``‖μ_k‖²`` is the sum of the per-C-block sums
    ``nsq[cb, k]`` (in a fixed order; the buffer starts zeroed, so it is always defined)."""
    cb = tl.arange(0, NCB_P)
    offs_k = tl.arange(0, KP)
    nsq = tl.load(nsq_base + cb[:, None] * KP + offs_k[None, :], mask=cb[:, None] < NCB, other=0.0)
    den = tl.full([KP], 1e-6, ACC) + _sqrt(tl.sum(nsq, axis=0))
    return tl.where(norm, 1.0 / den, 1.0)


@triton.jit
def _em_store_means(mu_base, nsq_base, out_base, C, K, NCB, c_lo, c_hi, NORMALIZE: tl.constexpr,
                    KP: tl.constexpr, NCB_P: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """means_out[k < K, c_lo:c_hi] = stored μ times its normalisation factor."""
    offs_k = tl.arange(0, KP)
    offs_c = tl.arange(0, BLOCK_C)
    if NORMALIZE:
        norm = offs_k >= 0
    else:
        norm = offs_k < 0
    scale = _em_inv_norm(nsq_base, NCB, norm, KP, NCB_P, ACC)
    for c0 in range(c_lo, c_hi, BLOCK_C):
        cc = c0 + offs_c
        cm = cc < c_hi
        m = tl.load(mu_base + offs_k[:, None] * C + cc[None, :], mask=cm[None, :], other=0.0)
        tl.store(out_base + offs_k[:, None] * C + cc[None, :], m * scale[:, None],
                 mask=(offs_k[:, None] < K) & cm[None, :])


# ----------------------------------------------------------------------------------------
# Split sums (all ops)
# ----------------------------------------------------------------------------------------


@triton.jit
def _split_sum_kernel(
    pa_ptr,       # [B, SPLITS, KP, C] ACC partial sums
    ps_ptr,       # [B, SPLITS, KP] ACC partial weight sums (MODE > 0)
    add_ptr,      # [K_OUT, C] ACC added to the result (HAS_ADD)
    out_ptr,      # [B, K_OUT, C] ACC
    nsq_ptr,      # [B, NCB, KP] ACC: Σ_c out² of this C block (WRITE_NSQ)
    C, K_OUT, NCB, SPLITS,
    KP: tl.constexpr, BLOCK_C: tl.constexpr, MODE: tl.constexpr, HAS_ADD: tl.constexpr,
    WRITE_NSQ: tl.constexpr,
):
    """Adds the partials of every split in split order, then the epilogue. One program per
    (C block, batch row)."""
    ACC: tl.constexpr = out_ptr.dtype.element_ty
    cb = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_k = tl.arange(0, KP)
    cc = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cc < C
    a = tl.zeros([KP, BLOCK_C], dtype=ACC)
    s = tl.zeros([KP], dtype=ACC)
    for sp in range(SPLITS):
        row = b * SPLITS + sp
        a += tl.load(pa_ptr + (row * KP + offs_k[:, None]) * C + cc[None, :], mask=cm[None, :], other=0.0)
        if MODE > 0:
            s += tl.load(ps_ptr + row * KP + offs_k)
    a = _epilogue(a, s, MODE)
    k_out = offs_k[:, None] < K_OUT
    if HAS_ADD:
        a += tl.load(add_ptr + offs_k[:, None] * C + cc[None, :], mask=k_out & cm[None, :], other=0.0)
    tl.store(out_ptr + (b * K_OUT + offs_k[:, None]) * C + cc[None, :], a, mask=k_out & cm[None, :])
    if WRITE_NSQ:
        tl.store(nsq_ptr + (b * NCB + cb) * KP + offs_k, tl.sum(a * a, axis=1))


# ----------------------------------------------------------------------------------------
# gmm_em
# ----------------------------------------------------------------------------------------


@triton.jit
def _em_kernel(
    x_ptr,        # [B, N, C] contiguous, input dtype
    mu_ptr,       # [B, KP, C] ACC: current means, un-normalised (rows >= K stay 0)
    nsq_ptr,      # [B, NCB, KP] ACC: per-C-block Σ_c μ² of mu
    mask_ptr,     # [B, N] ACC (HAS_MASK)
    kap_ptr,      # [1] ACC: kappa
    resp_ptr,     # [B, N, K] ACC out (last iteration)
    out_ptr,      # [B, K, C] ACC out: means (FUSED)
    ps_ptr,       # [B, SPLITS, KP] ACC partial S (not FUSED)
    pa_ptr,       # [B, SPLITS, KP, C] ACC partial A (the program's RMW slice)
    N, C, K, NCB, SPLITS, split_rows, it0, iters, num_iters,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, KP: tl.constexpr, NCB_P: tl.constexpr,
    KERNEL: tl.constexpr, NORMALIZE: tl.constexpr, HAS_MASK: tl.constexpr, FUSED: tl.constexpr,
    TF32: tl.constexpr,
):
    ACC: tl.constexpr = pa_ptr.dtype.element_ty
    split = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    kappa = tl.load(kap_ptr)
    offs_k = tl.arange(0, KP)
    k_mask = offs_k < K
    offs_c = tl.arange(0, BLOCK_C)
    offs_bn = tl.arange(0, BLOCK_N)
    x_base = x_ptr + b * N * C
    mu_base = mu_ptr + b * KP * C
    nsq_base = nsq_ptr + b * NCB * KP
    pa_base = pa_ptr + (b * SPLITS + split) * KP * C
    n_lo = split * split_rows
    n_hi = tl.minimum(n_lo + split_rows, N)
    for it in range(iters):       # runtime loop: all iterations when FUSED, else one
        glob = it0 + it
        # Per-component / per-row flags as int1 vectors (scalar bools of a runtime loop
        # index are not masks under the interpreter).
        if NORMALIZE:
            norm_in = (offs_k * 0 + glob) > 0     # the initial means are used as given
        else:
            norm_in = offs_k < 0
        scale = _em_inv_norm(nsq_base, NCB, norm_in, KP, NCB_P, ACC)
        last = (offs_bn * 0 + glob) == num_iters - 1     # resp: last iteration only
        if KERNEL == 1:                           # l2: logits − kappa/2·‖μ_k‖²
            musq = tl.zeros([KP], dtype=ACC)
            for c0 in range(0, C, BLOCK_C):
                cc = c0 + offs_c
                m = tl.load(mu_base + offs_k[None, :] * C + cc[:, None], mask=(cc < C)[:, None], other=0.0)
                m = m * scale[None, :]
                musq += tl.sum(m * m, axis=0)
            bias = (-0.5 * kappa) * musq
        s_acc = tl.zeros([KP], dtype=ACC)
        for n0 in range(n_lo, n_hi, BLOCK_N):
            offs_n = n0 + offs_bn
            n_mask = offs_n < n_hi
            rows = x_base + offs_n.to(tl.int64)[:, None] * C
            # E-step: logits of the tile against every mean.
            acc = tl.zeros([BLOCK_N, KP], dtype=ACC)
            for c0 in range(0, C, BLOCK_C):
                cc = c0 + offs_c
                cm = cc < C
                xt = tl.load(rows + cc[None, :], mask=n_mask[:, None] & cm[None, :], other=0.0).to(ACC)
                mt = tl.load(mu_base + offs_k[None, :] * C + cc[:, None], mask=cm[:, None], other=0.0)
                acc = _dot(xt, mt * scale[None, :], acc, TF32)
            logit = kappa * acc
            if KERNEL == 1:
                logit = logit + bias[None, :]
            logit = tl.where(k_mask[None, :], logit, float("-inf"))
            lmax = tl.max(logit, axis=1)
            e = tl.exp(logit - lmax[:, None])
            z = e / tl.sum(e, axis=1)[:, None]
            if HAS_MASK:
                mval = tl.load(mask_ptr + b * N + offs_n, mask=n_mask, other=0.0).to(ACC)
                z = z * mval[:, None]
            valid = n_mask[:, None] & k_mask[None, :]
            z = tl.where(valid, z, 0.0)
            tl.store(resp_ptr + b * N * K + offs_n.to(tl.int64)[:, None] * K + offs_k[None, :], z,
                     mask=valid & last[:, None])
            s_acc += tl.sum(z, axis=0)
            # M-step contribution of the tile: A[KP, C] += zᵀ x (x blocks again, from L2).
            zt = tl.trans(z)
            accumulate = (offs_k * 0 + n0) != n_lo      # [KP] int1: not the first tile (which stores)
            for c0 in range(0, C, BLOCK_C):
                cc = c0 + offs_c
                cm = cc < C
                xt = tl.load(rows + cc[None, :], mask=n_mask[:, None] & cm[None, :], other=0.0).to(ACC)
                pa = pa_base + offs_k[:, None] * C + cc[None, :]
                a = tl.load(pa, mask=accumulate[:, None] & cm[None, :], other=0.0)
                a = _dot(zt, xt, a, TF32)
                tl.store(pa, a, mask=cm[None, :])
            tl.debug_barrier()
        if FUSED:
            # The program holds the whole row: μ = A / (1e-6 + S) and its per-block norms.
            for c0 in range(0, C, BLOCK_C):
                cc = c0 + offs_c
                cm = cc < C
                a = tl.load(pa_base + offs_k[:, None] * C + cc[None, :], mask=cm[None, :], other=0.0)
                a = _epilogue(a, s_acc, 1)
                tl.store(mu_base + offs_k[:, None] * C + cc[None, :], a, mask=cm[None, :])
                tl.store(nsq_base + (c0 // BLOCK_C) * KP + offs_k, tl.sum(a * a, axis=1))
            tl.debug_barrier()
        else:
            tl.store(ps_ptr + (b * SPLITS + split) * KP + offs_k, s_acc)
    if FUSED:
        _em_store_means(mu_base, nsq_base, out_ptr + b * K * C, C, K, NCB, 0, C, NORMALIZE,
                        KP, NCB_P, BLOCK_C, ACC)


@triton.jit
def _em_output_kernel(mu_ptr, nsq_ptr, out_ptr, C, K, NCB,
                      KP: tl.constexpr, NCB_P: tl.constexpr, BLOCK_C: tl.constexpr, NORMALIZE: tl.constexpr):
    """means_out of the split path: one program per (C block, row)."""
    ACC: tl.constexpr = out_ptr.dtype.element_ty
    cb = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    c_lo = cb * BLOCK_C
    _em_store_means(mu_ptr + b * KP * C, nsq_ptr + b * NCB * KP, out_ptr + b * K * C, C, K, NCB, c_lo,
                    tl.minimum(c_lo + BLOCK_C, C), NORMALIZE, KP, NCB_P, BLOCK_C, ACC)


# ----------------------------------------------------------------------------------------
# prototype_values, prototype_attention
# ----------------------------------------------------------------------------------------


@triton.jit
def _pv_kernel(
    v_ptr,        # [B, N, CV] input dtype
    r_ptr,        # [B, N, K] input dtype
    out_ptr,      # [B, K, CV] ACC (DIRECT)
    ps_ptr,       # [B, SPLITS, KP] ACC partial S (not DIRECT)
    pa_ptr,       # [B, SPLITS, KP, CV] ACC partial A (not DIRECT)
    N, K, CV, SPLITS, split_rows,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, KP: tl.constexpr, DIRECT: tl.constexpr, TF32: tl.constexpr,
):
    ACC: tl.constexpr = pa_ptr.dtype.element_ty
    split = tl.program_id(0)
    vb = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_k = tl.arange(0, KP)
    k_mask = offs_k < K
    offs_v = vb * BLOCK_V + tl.arange(0, BLOCK_V)
    v_mask = offs_v < CV
    n_lo = split * split_rows
    n_hi = tl.minimum(n_lo + split_rows, N)
    s_acc = tl.zeros([KP], dtype=ACC)
    a_acc = tl.zeros([KP, BLOCK_V], dtype=ACC)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_hi
        rows = offs_n.to(tl.int64)[:, None]
        r = tl.load(r_ptr + b * N * K + rows * K + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :],
                    other=0.0).to(ACC)
        v = tl.load(v_ptr + b * N * CV + rows * CV + offs_v[None, :], mask=n_mask[:, None] & v_mask[None, :],
                    other=0.0).to(ACC)
        s_acc += tl.sum(r, axis=0)
        a_acc = _dot(tl.trans(r), v, a_acc, TF32)
    if DIRECT:
        tl.store(out_ptr + (b * K + offs_k[:, None]) * CV + offs_v[None, :], _epilogue(a_acc, s_acc, 1),
                 mask=k_mask[:, None] & v_mask[None, :])
    else:
        row = b * SPLITS + split
        tl.store(pa_ptr + (row * KP + offs_k[:, None]) * CV + offs_v[None, :], a_acc, mask=v_mask[None, :])
        tl.store(ps_ptr + row * KP + offs_k, s_acc, mask=(offs_k * 0 + vb) == 0)


@triton.jit
def _attention_kernel(
    q_ptr,        # [B, Nq, C] input dtype
    k_ptr,        # [B, K, C]
    v_ptr,        # [B, K, CV]
    kap_ptr,      # [1] ACC
    out_ptr,      # [B, Nq, CV] ACC
    attn_ptr,     # [B, Nq, K] ACC
    Nq, C, K, CV,
    BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr, KP: tl.constexpr,
    KERNEL: tl.constexpr, TF32: tl.constexpr,
):
    ACC: tl.constexpr = out_ptr.dtype.element_ty
    pid_q = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    kappa = tl.load(kap_ptr)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_mask = offs_q < Nq
    rows = offs_q.to(tl.int64)[:, None]
    offs_k = tl.arange(0, KP)
    k_mask = offs_k < K
    offs_c = tl.arange(0, BLOCK_C)
    acc = tl.zeros([BLOCK_Q, KP], dtype=ACC)
    musq = tl.zeros([KP], dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + offs_c
        cm = cc < C
        qt = tl.load(q_ptr + b * Nq * C + rows * C + cc[None, :], mask=q_mask[:, None] & cm[None, :],
                     other=0.0).to(ACC)
        kt = tl.load(k_ptr + b * K * C + offs_k[None, :] * C + cc[:, None], mask=cm[:, None] & k_mask[None, :],
                     other=0.0).to(ACC)                                   # [BLOCK_C, KP]
        if KERNEL == 1:
            musq += tl.sum(kt * kt, axis=0)
        acc = _dot(qt, kt, acc, TF32)
    logit = kappa * acc
    if KERNEL == 1:
        logit = logit - (0.5 * kappa) * musq[None, :]
    logit = tl.where(k_mask[None, :], logit, float("-inf"))
    lmax = tl.max(logit, axis=1)
    e = tl.exp(logit - lmax[:, None])
    attn = e / tl.sum(e, axis=1)[:, None]
    attn = tl.where(k_mask[None, :], attn, 0.0)
    tl.store(attn_ptr + b * Nq * K + rows * K + offs_k[None, :], attn, mask=q_mask[:, None] & k_mask[None, :])
    offs_v = tl.arange(0, BLOCK_V)
    for v0 in range(0, CV, BLOCK_V):
        vv = v0 + offs_v
        vm = vv < CV
        vt = tl.load(v_ptr + b * K * CV + offs_k[:, None] * CV + vv[None, :], mask=k_mask[:, None] & vm[None, :],
                     other=0.0).to(ACC)
        o = _dot(attn, vt, tl.zeros([BLOCK_Q, BLOCK_V], dtype=ACC), TF32)
        tl.store(out_ptr + b * Nq * CV + rows * CV + vv[None, :], o, mask=q_mask[:, None] & vm[None, :])


# ----------------------------------------------------------------------------------------
# A-GAME diagonal Gaussians
# ----------------------------------------------------------------------------------------


@triton.jit
def _log_prob_kernel(
    x_ptr, m_ptr, v_ptr,      # [B, N, D], [B, K, D], [B, K, D] input dtype
    out_ptr,                  # [B, N, K] ACC
    N, D, K,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, KP: tl.constexpr,
):
    ACC: tl.constexpr = out_ptr.dtype.element_ty
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows = offs_n.to(tl.int64)[:, None]
    offs_k = tl.arange(0, KP)
    k_mask = offs_k < K
    offs_d = tl.arange(0, BLOCK_D)
    quad = tl.zeros([BLOCK_N, KP], dtype=ACC)
    logdet = tl.zeros([KP], dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        dm = dd < D
        kd = (b * K + offs_k[:, None]) * D + dd[None, :]
        kdm = k_mask[:, None] & dm[None, :]
        mt = tl.load(m_ptr + kd, mask=kdm, other=0.0).to(ACC)
        vt = tl.load(v_ptr + kd, mask=kdm, other=1.0).to(ACC)
        logdet += tl.sum(tl.log(vt), axis=1)
        inv = 1.0 / vt
        xt = tl.load(x_ptr + b * N * D + rows * D + dd[None, :], mask=n_mask[:, None] & dm[None, :],
                     other=0.0).to(ACC)
        diff = xt[:, None, :] - mt[None, :, :]                            # [BLOCK_N, KP, BLOCK_D]
        quad += tl.sum(diff * diff * inv[None, :, :], axis=2)
    out = -0.5 * (logdet[None, :] + quad)
    tl.store(out_ptr + b * N * K + rows * K + offs_k[None, :], out, mask=n_mask[:, None] & k_mask[None, :])


@triton.jit
def _log_prob_bwd_kernel(
    g_ptr,                    # [B, N, K] grad of the log-probabilities
    x_ptr, m_ptr, v_ptr,      # [B, N, D], [B, K, D], [B, K, D]
    gx_ptr,                   # [B, N, D] ACC
    gm_ptr, gv_ptr,           # [B, K, D] ACC (DIRECT)
    pm_ptr, pv_ptr,           # [B, SPLITS, KP, D] ACC partials (not DIRECT)
    N, D, K, SPLITS, split_rows,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, KP: tl.constexpr, DIRECT: tl.constexpr,
):
    ACC: tl.constexpr = gx_ptr.dtype.element_ty
    split = tl.program_id(0)
    db = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_k = tl.arange(0, KP)
    k_mask = offs_k < K
    dd = db * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = dd < D
    kd = (b * K + offs_k[:, None]) * D + dd[None, :]
    kdm = k_mask[:, None] & dm[None, :]
    mt = tl.load(m_ptr + kd, mask=kdm, other=0.0).to(ACC)
    inv = 1.0 / tl.load(v_ptr + kd, mask=kdm, other=1.0).to(ACC)
    acc_m = tl.zeros([KP, BLOCK_D], dtype=ACC)
    acc_v = tl.zeros([KP, BLOCK_D], dtype=ACC)
    n_lo = split * split_rows
    n_hi = tl.minimum(n_lo + split_rows, N)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_hi
        rows = offs_n.to(tl.int64)[:, None]
        g = tl.load(g_ptr + b * N * K + rows * K + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :],
                    other=0.0).to(ACC)
        xt = tl.load(x_ptr + b * N * D + rows * D + dd[None, :], mask=n_mask[:, None] & dm[None, :],
                     other=0.0).to(ACC)
        t = (xt[:, None, :] - mt[None, :, :]) * inv[None, :, :]          # (x − μ) / var
        gt = g[:, :, None] * t
        tl.store(gx_ptr + b * N * D + rows * D + dd[None, :], -tl.sum(gt, axis=1),
                 mask=n_mask[:, None] & dm[None, :])
        acc_m += tl.sum(gt, axis=0)
        acc_v += tl.sum(g[:, :, None] * (inv[None, :, :] - t * t), axis=0)
    acc_v = -0.5 * acc_v
    if DIRECT:
        tl.store(gm_ptr + kd, acc_m, mask=kdm)
        tl.store(gv_ptr + kd, acc_v, mask=kdm)
    else:
        part = ((b * SPLITS + split) * KP + offs_k[:, None]) * D + dd[None, :]
        tl.store(pm_ptr + part, acc_m, mask=dm[None, :])
        tl.store(pv_ptr + part, acc_v, mask=dm[None, :])


@triton.jit
def _fit_pass_kernel(
    x_ptr,        # [B, N, D] input dtype
    w_ptr,        # [B, N, K] input dtype
    mean_ptr,     # [B, K, D] ACC (SECOND)
    add_ptr,      # [K, D] ACC added to the result (HAS_ADD, DIRECT)
    out_ptr,      # [B, K, D] ACC (DIRECT)
    ps_ptr,       # [B, SPLITS, KP] ACC: Σ_n w per split (always written)
    pa_ptr,       # [B, SPLITS, KP, D] ACC partials (not DIRECT)
    N, D, K, SPLITS, split_rows,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, KP: tl.constexpr, SECOND: tl.constexpr,
    DIRECT: tl.constexpr, MODE: tl.constexpr, HAS_ADD: tl.constexpr,
):
    """Pass 1 (``SECOND`` False): Σ_n w_nk x_nd; pass 2: Σ_n w_nk (x_nd − μ_kd)²; both Σ_n w."""
    ACC: tl.constexpr = ps_ptr.dtype.element_ty
    split = tl.program_id(0)
    db = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    offs_k = tl.arange(0, KP)
    k_mask = offs_k < K
    dd = db * BLOCK_D + tl.arange(0, BLOCK_D)
    dm = dd < D
    kdm = k_mask[:, None] & dm[None, :]
    if SECOND:
        mt = tl.load(mean_ptr + (b * K + offs_k[:, None]) * D + dd[None, :], mask=kdm, other=0.0)
    s_acc = tl.zeros([KP], dtype=ACC)
    a_acc = tl.zeros([KP, BLOCK_D], dtype=ACC)
    n_lo = split * split_rows
    n_hi = tl.minimum(n_lo + split_rows, N)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_hi
        rows = offs_n.to(tl.int64)[:, None]
        w = tl.load(w_ptr + b * N * K + rows * K + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :],
                    other=0.0).to(ACC)
        xt = tl.load(x_ptr + b * N * D + rows * D + dd[None, :], mask=n_mask[:, None] & dm[None, :],
                     other=0.0).to(ACC)
        s_acc += tl.sum(w, axis=0)
        if SECOND:
            diff = xt[:, None, :] - mt[None, :, :]
            a_acc += tl.sum(w[:, :, None] * (diff * diff), axis=0)
        else:
            a_acc += tl.sum(w[:, :, None] * xt[:, None, :], axis=0)
    row = b * SPLITS + split
    tl.store(ps_ptr + row * KP + offs_k, s_acc, mask=(offs_k * 0 + db) == 0)
    if DIRECT:
        a_acc = _epilogue(a_acc, s_acc, MODE)
        if HAS_ADD:
            a_acc += tl.load(add_ptr + offs_k[:, None] * D + dd[None, :], mask=kdm, other=0.0)
        tl.store(out_ptr + (b * K + offs_k[:, None]) * D + dd[None, :], a_acc, mask=kdm)
    else:
        tl.store(pa_ptr + (row * KP + offs_k[:, None]) * D + dd[None, :], a_acc, mask=dm[None, :])


@triton.jit
def _fit_bwd_kernel(
    gm_ptr, gv_ptr,           # [B, K, D] ACC grads of mean and var
    x_ptr, w_ptr,             # [B, N, D], [B, N, K] input dtype
    mean_ptr,                 # [B, K, D] ACC
    q_ptr,                    # [B, K, D] ACC: Q = Σ_n w (x − μ)²
    ps_ptr,                   # [B, SPLITS, KP] ACC: partial S
    gx_ptr,                   # [B, N, D] ACC
    gw_ptr,                   # [B, N, K] ACC
    N, D, K, SPLITS,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, KP: tl.constexpr,
):
    ACC: tl.constexpr = gx_ptr.dtype.element_ty
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_k = tl.arange(0, KP)
    k_mask = offs_k < K
    s = tl.zeros([KP], dtype=ACC)
    for sp in range(SPLITS):
        s += tl.load(ps_ptr + (b * SPLITS + sp) * KP + offs_k)
    a = 1.0 / (1.0 + s)                                                   # a_k = 1 / (1 + S_k)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows = offs_n.to(tl.int64)[:, None]
    w = tl.load(w_ptr + b * N * K + rows * K + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :],
                other=0.0).to(ACC)
    wa = w * a[None, :]
    gw_acc = tl.zeros([BLOCK_N, KP], dtype=ACC)
    offs_d = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        dm = dd < D
        kd = (b * K + offs_k[:, None]) * D + dd[None, :]
        kdm = k_mask[:, None] & dm[None, :]
        mt = tl.load(mean_ptr + kd, mask=kdm, other=0.0)
        gmt = tl.load(gm_ptr + kd, mask=kdm, other=0.0)
        gvt = tl.load(gv_ptr + kd, mask=kdm, other=0.0)
        aq = a[:, None] * tl.load(q_ptr + kd, mask=kdm, other=0.0)        # a_k Q_kd
        gmp = gmt - 2.0 * a[:, None] * mt * gvt                           # gμ' = gμ − 2 a μ gv
        xt = tl.load(x_ptr + b * N * D + rows * D + dd[None, :], mask=n_mask[:, None] & dm[None, :],
                     other=0.0).to(ACC)
        diff = xt[:, None, :] - mt[None, :, :]                            # [BLOCK_N, KP, BLOCK_D]
        gx = tl.sum(wa[:, :, None] * (gmp[None, :, :] + 2.0 * gvt[None, :, :] * diff), axis=1)
        tl.store(gx_ptr + b * N * D + rows * D + dd[None, :], gx, mask=n_mask[:, None] & dm[None, :])
        gw_acc += tl.sum(gmp[None, :, :] * diff + gvt[None, :, :] * (diff * diff - aq[None, :, :]), axis=2)
    tl.store(gw_ptr + b * N * K + rows * K + offs_k[None, :], a[None, :] * gw_acc,
             mask=n_mask[:, None] & k_mask[None, :])


# ----------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _input(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.dtype not in _INPUT_DTYPES:
        raise ValueError(f"vos_kernels.triton: {name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    return t.contiguous()


def _tf32(t: torch.Tensor) -> bool:
    """TF32 dots for fp16 / bf16 inputs on the GPU (their values are exact in TF32)."""
    return t.dtype in (torch.float16, torch.bfloat16) and not _interpreting()


def _num_sms(dev: torch.device) -> int:
    if _interpreting() or dev.type != "cuda":
        return 0
    return torch.cuda.get_device_properties(dev).multi_processor_count


def _split_rows(N: int, block_n: int, rows: int, dev: torch.device, splits: int | None,
                min_tiles: int = 2) -> tuple[int, int]:
    """(splits, rows per split, a multiple of block_n) for a reduction over N: by default
    enough programs (``rows`` per split) for ~2 per SM, each at least ``min_tiles`` tiles;
    1 under the interpreter. Every split holds at least one point."""
    tiles = max(triton.cdiv(N, block_n), 1)
    if splits is None:
        sms = _num_sms(dev)
        splits = 1 if sms == 0 else max(1, min(triton.cdiv(2 * sms, max(rows, 1)), tiles // min_tiles))
    splits = max(1, min(int(splits), tiles))
    split_rows = triton.cdiv(tiles, splits) * block_n
    return triton.cdiv(max(N, 1), split_rows), split_rows


def _check_sizes(op: str, N: int, K: int, **widths: int) -> None:
    """int32 indexing (``_limits.py``), before any copy: the points N (split bounds, row
    offsets), and one batch element's padded prototype / Gaussian rows ``KP x width``
    (offsets ``k * width`` in int32)."""
    check_count(op, "N (points)", N)
    KP = max(16, _next_pow2(K))
    for name, width in widths.items():
        check_count(op, f"{KP} x {name} (padded rows of one batch element)", KP * width)


def _check_splits(op: str, nsplit: int, split_rows: int) -> None:
    check_count(op, "splits x rows per split", nsplit * split_rows)


def _kappa(kappa: float, acc: torch.dtype, dev: torch.device) -> torch.Tensor:
    return torch.tensor([float(kappa)], dtype=acc, device=dev)


def gmm_em(x: torch.Tensor, means: torch.Tensor, num_iters: int, kappa: float, mask: torch.Tensor | None,
           kernel: int, normalize_means: bool, splits: int | None = None):
    """Triton entry point of ``gmm_em`` (op signature; ``kernel`` 0 dot, 1 l2).

    ``splits`` (default: from the shape and the SM count, 1 under the interpreter) splits
    N over programs: 1 runs every iteration in one launch (one program per row), more
    launch ``_em_kernel`` + ``_split_sum_kernel`` per iteration.

    Returns ``(means_out [B, K, C], resp [B, N, K])`` in float32 (float64 for float64).
    """
    op = "gmm_em"
    _check_sizes(op, x.shape[1], means.shape[1], C=x.shape[2])
    dev = _check_device(x, means) if mask is None else _check_device(x, means, mask)
    x = _input(x, "x")
    B, N, C = x.shape
    K = means.shape[1]
    acc = _acc_dtype(x)
    KP = max(16, _next_pow2(K))
    num_iters = int(num_iters)
    if num_iters < 1:
        raise ValueError(f"vos_kernels.triton: num_iters must be >= 1, got {num_iters}")
    resp = torch.empty((B, N, K), device=dev, dtype=acc)
    out = torch.empty((B, K, C), device=dev, dtype=acc)
    if B == 0 or K == 0 or C == 0:
        return out, resp
    mu = torch.zeros((B, KP, C), device=dev, dtype=acc)
    mu[:, :K] = means.to(acc)
    if N == 0:                          # Σ_n z = 0: μ = 0 (normalised: 0 / 1e-6 = 0)
        return out.zero_(), resp
    m = mask.to(device=dev, dtype=acc).contiguous() if mask is not None else mu   # any valid pointer
    kap = _kappa(kappa, acc, dev)
    # Tiles checked with ptxas for sm_90 (tests/test_triton_aot_compile.py): IEEE fp32 dots
    # run on FMA units with the operands in registers, so C blocks of 16; KP = 64 (EMANet)
    # still fits without spills with 8 warps.
    if _interpreting():
        block_n, block_c = 16, 32
    elif _tf32(x):
        block_n, block_c = 64, 16
    else:
        block_n, block_c = 32, 16
    warps = 8
    block_c = min(block_c, max(16, _next_pow2(C)))
    rows = B
    if splits is None and not _interpreting():
        sms = _num_sms(dev)
        tiles = triton.cdiv(N, block_n)
        # Many rows or few points (PCAN instance head): one program per row, all iterations.
        splits = 1 if 4 * B >= sms or tiles <= 4 else None
    nsplit, split_rows = _split_rows(N, block_n, rows, dev, splits)
    _check_splits(op, nsplit, split_rows)
    common = dict(BLOCK_N=block_n, KP=KP, KERNEL=int(kernel), NORMALIZE=bool(normalize_means),
                  HAS_MASK=mask is not None, TF32=_tf32(x), num_warps=warps)
    if nsplit == 1:
        ncb = triton.cdiv(C, block_c)
        nsq = torch.zeros((B, ncb, KP), device=dev, dtype=acc)
        pa = torch.empty((B, 1, KP, C), device=dev, dtype=acc)
        grid = launch_grid(op, splits=1, batch_elements=B)
        _em_kernel[grid](x, mu, nsq, m, kap, resp, out, pa, pa, N, C, K, ncb, 1, split_rows, 0, num_iters,
                         num_iters, BLOCK_C=block_c, NCB_P=_next_pow2(ncb), FUSED=True, **common)
        return out, resp
    block_f = 16                         # C block of the split sums: C/16 programs per row
    ncb = triton.cdiv(C, block_f)
    nsq = torch.zeros((B, ncb, KP), device=dev, dtype=acc)
    ps = torch.empty((B, nsplit, KP), device=dev, dtype=acc)
    pa = torch.empty((B, nsplit, KP, C), device=dev, dtype=acc)
    for it in range(num_iters):
        grid = launch_grid(op, splits=nsplit, batch_elements=B)
        _em_kernel[grid](x, mu, nsq, m, kap, resp, out, ps, pa, N, C, K, ncb, nsplit, split_rows, it, 1,
                         num_iters, BLOCK_C=block_c, NCB_P=_next_pow2(ncb), FUSED=False, **common)
        grid = launch_grid(op, channel_blocks=ncb, batch_elements=B)
        _split_sum_kernel[grid](pa, ps, mu, mu, nsq, C, KP, ncb, nsplit, KP=KP, BLOCK_C=block_f,
                                MODE=_DIV_EPS, HAS_ADD=False, WRITE_NSQ=True)
    grid = launch_grid(op, channel_blocks=ncb, batch_elements=B)
    _em_output_kernel[grid](mu, nsq, out, C, K, ncb, KP=KP, NCB_P=_next_pow2(ncb), BLOCK_C=block_f,
                            NORMALIZE=bool(normalize_means))
    return out, resp


def prototype_values(values: torch.Tensor, resp: torch.Tensor, splits: int | None = None) -> torch.Tensor:
    """Triton entry point of ``prototype_values``: ``[B, K, CV] = Σ_n r v / (1e-6 + Σ_n r)``."""
    op = "prototype_values"
    _check_sizes(op, values.shape[1], resp.shape[2], CV=values.shape[2])
    dev = _check_device(values, resp)
    v = _input(values, "values")
    r = _input(resp, "resp")
    B, N, CV = v.shape
    K = r.shape[2]
    acc = _acc_dtype(v)
    out = torch.empty((B, K, CV), device=dev, dtype=acc)
    if out.numel() == 0:
        return out
    KP = max(16, _next_pow2(K))
    block_n = 16 if _interpreting() else 64
    block_v = min(64, max(16, _next_pow2(CV)))
    nvb = triton.cdiv(CV, block_v)
    nsplit, split_rows = _split_rows(N, block_n, B * nvb, dev, splits, min_tiles=4)
    _check_splits(op, nsplit, split_rows)
    direct = nsplit == 1
    ps = torch.empty((B, nsplit, KP), device=dev, dtype=acc)
    pa = out if direct else torch.empty((B, nsplit, KP, CV), device=dev, dtype=acc)
    grid = launch_grid(op, splits=nsplit, value_blocks=nvb, batch_elements=B)
    _pv_kernel[grid](v, r, out, ps, pa, N, K, CV, nsplit, split_rows, BLOCK_N=block_n,
                     BLOCK_V=block_v, KP=KP, DIRECT=direct, TF32=_tf32(v))
    if not direct:
        grid = launch_grid(op, value_blocks=nvb, batch_elements=B)
        _split_sum_kernel[grid](pa, ps, out, out, out, CV, K, 1, nsplit, KP=KP, BLOCK_C=block_v,
                                MODE=_DIV_EPS, HAS_ADD=False, WRITE_NSQ=False)
    return out


def prototype_attention(query: torch.Tensor, proto_keys: torch.Tensor, proto_values: torch.Tensor, kappa: float,
                        kernel: int):
    """Triton entry point of ``prototype_attention``: ``(out [B, Nq, CV], attn [B, Nq, K])``."""
    op = "prototype_attention"
    _check_sizes(op, query.shape[1], proto_keys.shape[1], C=query.shape[2], CV=proto_values.shape[2])
    dev = _check_device(query, proto_keys, proto_values)
    q = _input(query, "query")
    k = _input(proto_keys, "proto_keys")
    v = _input(proto_values, "proto_values")
    B, Nq, C = q.shape
    K, CV = k.shape[1], v.shape[2]
    acc = _acc_dtype(q)
    out = torch.empty((B, Nq, CV), device=dev, dtype=acc)
    attn = torch.empty((B, Nq, K), device=dev, dtype=acc)
    if B == 0 or Nq == 0 or K == 0:
        return out.zero_(), attn
    KP = max(16, _next_pow2(K))
    block_q = 16 if _interpreting() else 32          # [32, KP ≤ 64] tiles: no spills for sm_90
    block_c = 16
    block_v = min(32, max(16, _next_pow2(CV)))
    _attention_kernel[launch_grid(op, query_blocks=triton.cdiv(Nq, block_q), batch_elements=B)](
        q, k, v, _kappa(kappa, acc, dev), out, attn, Nq, C, K, CV, BLOCK_Q=block_q, BLOCK_C=block_c,
        BLOCK_V=block_v, KP=KP, KERNEL=int(kernel), TF32=_tf32(q), num_warps=4)
    return out, attn


def _agame_blocks(KP: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_D) with a [BLOCK_N, KP, BLOCK_D] working tile of ~4096 elements."""
    block_d = 32 if KP <= 4 else 16
    block_n = 32
    while block_n > 1 and block_n * KP * block_d > 4096:
        block_n //= 2
    return block_n, block_d


def diag_gmm_log_prob(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Triton entry point of ``diag_gmm_log_prob``: ``[B, N, K]``."""
    op = "diag_gmm_log_prob"
    _check_sizes(op, x.shape[1], mean.shape[1], D=x.shape[2])
    dev = _check_device(x, mean, var)
    x, mean, var = _input(x, "x"), _input(mean, "mean"), _input(var, "var")
    B, N, D = x.shape
    K = mean.shape[1]
    out = torch.empty((B, N, K), device=dev, dtype=_acc_dtype(x))
    if out.numel() == 0:
        return out
    KP = _next_pow2(K)
    block_n, block_d = _agame_blocks(KP)
    grid = launch_grid(op, point_blocks=triton.cdiv(N, block_n), batch_elements=B)
    _log_prob_kernel[grid](x, mean, var, out, N, D, K, BLOCK_N=block_n, BLOCK_D=block_d, KP=KP)
    return out


def diag_gmm_log_prob_backward(grad: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                               splits: int | None = None):
    """Triton entry point of ``diag_gmm_log_prob_backward``: ``(grad_x, grad_mean, grad_var)``."""
    op = "diag_gmm_log_prob_backward"
    _check_sizes(op, x.shape[1], mean.shape[1], D=x.shape[2])
    dev = _check_device(grad, x, mean, var)
    g, x, mean, var = _input(grad, "grad"), _input(x, "x"), _input(mean, "mean"), _input(var, "var")
    B, N, D = x.shape
    K = mean.shape[1]
    acc = _acc_dtype(x)
    gx = torch.empty((B, N, D), device=dev, dtype=acc)
    gm = torch.zeros((B, K, D), device=dev, dtype=acc)
    gv = torch.zeros((B, K, D), device=dev, dtype=acc)
    if B == 0 or K == 0 or D == 0:
        return gx.zero_(), gm, gv
    if N == 0:
        return gx, gm, gv
    KP = _next_pow2(K)
    block_n, block_d = _agame_blocks(KP)
    ndb = triton.cdiv(D, block_d)
    nsplit, split_rows = _split_rows(N, block_n, B * ndb, dev, splits, min_tiles=4)
    _check_splits(op, nsplit, split_rows)
    direct = nsplit == 1
    pm = gm if direct else torch.empty((B, nsplit, KP, D), device=dev, dtype=acc)
    pv = gv if direct else torch.empty((B, nsplit, KP, D), device=dev, dtype=acc)
    grid = launch_grid(op, splits=nsplit, feature_blocks=ndb, batch_elements=B)
    _log_prob_bwd_kernel[grid](g, x, mean, var, gx, gm, gv, pm, pv, N, D, K, nsplit, split_rows,
                               BLOCK_N=block_n, BLOCK_D=block_d, KP=KP, DIRECT=direct, num_warps=8)
    if not direct:
        bf = min(64, max(16, _next_pow2(D)))
        for part, res in ((pm, gm), (pv, gv)):
            grid = launch_grid(op, feature_blocks=triton.cdiv(D, bf), batch_elements=B)
            _split_sum_kernel[grid](part, part, res, res, res, D, K, 1, nsplit, KP=KP,
                                    BLOCK_C=bf, MODE=_SUM, HAS_ADD=False, WRITE_NSQ=False)
    return gx, gm, gv


def _fit_pass(op, x, w, mean, add, mode, second, splits):
    """One pass over x: returns (result [B, K, D] with the epilogue ``mode`` (+ add),
    partial weight sums ``[B, splits, KP]``)."""
    dev = x.device
    B, N, D = x.shape
    K = w.shape[2]
    acc = _acc_dtype(x)
    KP = _next_pow2(K)
    block_n, block_d = _agame_blocks(KP)
    ndb = triton.cdiv(D, block_d)
    nsplit, split_rows = _split_rows(N, block_n, B * ndb, dev, splits, min_tiles=4)
    _check_splits(op, nsplit, split_rows)
    direct = nsplit == 1
    out = torch.empty((B, K, D), device=dev, dtype=acc)
    ps = torch.empty((B, nsplit, KP), device=dev, dtype=acc)
    pa = out if direct else torch.empty((B, nsplit, KP, D), device=dev, dtype=acc)
    has_add = add is not None
    add_t = add if has_add else out
    mean_t = mean if second else out
    grid = launch_grid(op, splits=nsplit, feature_blocks=ndb, batch_elements=B)
    _fit_pass_kernel[grid](x, w, mean_t, add_t, out, ps, pa, N, D, K, nsplit, split_rows,
                           BLOCK_N=block_n, BLOCK_D=block_d, KP=KP, SECOND=second, DIRECT=direct,
                           MODE=mode, HAS_ADD=has_add)
    if not direct:
        bf = min(64, max(16, _next_pow2(D)))
        grid = launch_grid(op, feature_blocks=triton.cdiv(D, bf), batch_elements=B)
        _split_sum_kernel[grid](pa, ps, add_t, out, out, D, K, 1, nsplit, KP=KP, BLOCK_C=bf,
                                MODE=mode, HAS_ADD=has_add, WRITE_NSQ=False)
    return out, ps


def diag_gmm_fit(x: torch.Tensor, weights: torch.Tensor, var_reg: torch.Tensor, splits: int | None = None):
    """Triton entry point of ``diag_gmm_fit``: ``(mean, var)``, two passes over x."""
    op = "diag_gmm_fit"
    _check_sizes(op, x.shape[1], weights.shape[2], D=x.shape[2])
    dev = _check_device(x, weights, var_reg)
    x, w = _input(x, "x"), _input(weights, "weights")
    B, N, D = x.shape
    K = w.shape[2]
    acc = _acc_dtype(x)
    reg = var_reg.to(device=dev, dtype=acc).contiguous()
    if B == 0 or K == 0 or D == 0 or N == 0:
        mean = torch.zeros((B, K, D), device=dev, dtype=acc)
        return mean, mean + reg
    mean, _ = _fit_pass(op, x, w, None, None, _DIV_ONE, False, splits)
    var, _ = _fit_pass(op, x, w, mean, reg, _DIV_ONE, True, splits)
    return mean, var


def diag_gmm_fit_backward(grad_mean: torch.Tensor, grad_var: torch.Tensor, x: torch.Tensor, weights: torch.Tensor,
                          mean: torch.Tensor, splits: int | None = None):
    """Triton entry point of ``diag_gmm_fit_backward``: ``(grad_x [B, N, D], grad_weights [B, N, K])``."""
    op = "diag_gmm_fit_backward"
    _check_sizes(op, x.shape[1], weights.shape[2], D=x.shape[2])
    dev = _check_device(grad_mean, grad_var, x, weights, mean)
    x, w = _input(x, "x"), _input(weights, "weights")
    B, N, D = x.shape
    K = w.shape[2]
    acc = _acc_dtype(x)
    gx = torch.zeros((B, N, D), device=dev, dtype=acc)
    gw = torch.zeros((B, N, K), device=dev, dtype=acc)
    if gx.numel() == 0 or gw.numel() == 0:
        return gx, gw
    gm = grad_mean.to(acc).contiguous()
    gv = grad_var.to(acc).contiguous()
    mu = mean.to(acc).contiguous()
    q, ps = _fit_pass(op, x, w, mu, None, _SUM, True, splits)        # Q = Σ w (x − μ)², S partials
    KP = _next_pow2(K)
    block_n, block_d = _agame_blocks(KP)
    grid = launch_grid(op, point_blocks=triton.cdiv(N, block_n), batch_elements=B)
    _fit_bwd_kernel[grid](gm, gv, x, w, mu, q, ps, gx, gw, N, D, K, ps.shape[1],
                          BLOCK_N=block_n, BLOCK_D=block_d, KP=KP, num_warps=8)
    return gx, gw
