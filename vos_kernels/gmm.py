"""GMM prototypes and prototype attention (PCAN, EMANet) and A-GAME's diagonal Gaussians:
the public functions.

Each validates its arguments (``ValueError`` naming the argument, before anything is
computed), then runs ``torch.ops.vos_kernels.<name>`` (C++ on CPU, Triton on CUDA), the
Triton kernel under ``TRITON_INTERPRET=1`` for the ``"triton"`` backend on CPU tensors,
or :mod:`vos_kernels.reference` (the einsum chains and loops of PCAN, EMANet and A-GAME)
for the ``"reference"`` backend. Semantics: ``../shared/spec/api.md``,
``../shared/spec/gmm.md`` and ``docs/internals.md``.

Kernels: ``"dot"``: logit ``kappa·x·μ`` (PCAN's and EMANet's code); ``"l2"``: logit
``−kappa/2·‖x − μ‖²`` (PCAN paper eq. 5.3 with ``kappa = 1/σ²``). With unit-norm means
the two agree (the ``−kappa/2·(‖x‖² + 1)`` difference is constant per point and cancels
in the softmax over prototypes).
"""
from __future__ import annotations


import torch

from . import _ops
from . import _validation as V
from . import reference as _reference
from ._backend import resolve, triton_from_python

KERNELS = {"dot": 0, "l2": 1}


def _kernel_arg(kernel) -> int:
    if kernel not in KERNELS:
        V.fail("kernel", f"one of {sorted(KERNELS)}", repr(kernel))
    return KERNELS[kernel]


def _shape(x: torch.Tensor, name: str, expected: list, layout: str) -> None:
    """``expected`` holds ints or None (any size) per dimension."""
    if x.dim() != len(expected) or any(e is not None and s != e for s, e in zip(x.shape, expected)):
        V.fail(name, f"shape {layout} = {[('*' if e is None else e) for e in expected]}", f"shape {list(x.shape)}")


def _aux_float(t, name: str, ref: torch.Tensor, ref_name: str) -> torch.Tensor:
    """A float argument that is not an embedding (mask, var_reg): any float dtype, same
    device as ``ref``; returned in the kernels' float dtype (float64 for float64 inputs,
    float32 otherwise)."""
    V.tensor(t, name)
    if not (t.dtype.is_floating_point or t.dtype == torch.bool):
        V.fail(name, "a floating-point (or bool) tensor", str(t.dtype).replace("torch.", ""))
    if t.device != ref.device:
        V.fail(name, f"a tensor on {ref.device} like {ref_name}", f"a tensor on {t.device}")
    return t.to(_ops._out_dtype(ref))


def _run(name: str, device: torch.device, reference, *args):
    """Dispatch to the chosen backend; returns what the op returns (``reference()`` returns
    the same for the ``"reference"`` backend)."""
    backend = resolve(device, name)
    if backend == "reference":
        return reference()
    if triton_from_python(backend, device, name):     # interpreter, or Triton beside CUDA C++; op's autograd
        return _ops.gmm_interpreted(name, *args)
    return getattr(torch.ops.vos_kernels, name)(*args)


def gmm_em(x: torch.Tensor, means: torch.Tensor, num_iters: int, kappa: float, mask: torch.Tensor | None = None,
           kernel: str = "dot", normalize_means: bool = True):
    """Fused EM for GMM prototypes (PCAN ``_em_iter``, EMANet ``EMAU``): every iteration's
    E-step, mask, normalisations and M-step in one pass over ``x``.

    Per iteration (``../shared/spec/gmm.md``): ``z = softmax_K(logits)`` (max subtracted),
    ``z *= mask``, ``μ_k = Σ_n z_nk x_n / (1e-6 + Σ_n z_nk)``, then, when
    ``normalize_means``, ``μ_k /= (1e-6 + ‖μ_k‖)``. An all-zero mask gives zero means.

    Args:
        x: ``[B, N, C]`` points (PCAN: RoI or frame features, channels last), float32
            (float16 / bfloat16 on CUDA; float64 on CPU and CUDA).
        means: ``[B, K, C]`` initial means, same dtype and device (PCAN: L2-normalised
            random-normal buffers; EMANet: the running ``mu``).
        num_iters: EM iterations, ≥ 1 (PCAN 3 frame-level / 6 instance, EMANet 3).
        kappa: > 0; PCAN 20 (``F.softmax(20 * z)``), EMANet 1.
        mask: optional ``[B, N]`` weights multiplying the responsibilities (PCAN's
            binarised mask; fg and bg problems as separate batch rows); float or bool.
        kernel: ``"dot"`` (code) or ``"l2"`` (paper).
        normalize_means: L2-normalise the means after each M-step (PCAN, EMANet).

    Returns:
        ``(means [B, K, C], resp [B, N, K])``: the last means and the last E-step's
        masked softmax (EMANet reconstructs ``means·respᵀ``; :func:`prototype_values`
        turns resp into value prototypes). float32 (float64 for float64 inputs). No
        gradient: EM runs under ``no_grad`` in PCAN and EMANet, and so does this op
        (outputs never require grad).

    Raises:
        ValueError: wrong rank / shape / dtype, device mix, num_iters < 1, kappa not a
            finite float > 0, unknown kernel, mask not ``[B, N]``.
    """
    V.float_tensor(x, "x", 3, "[B,N,C]")
    V.float_tensor(means, "means", 3, "[B,K,C]")
    V.same_device_dtype(x, "x", means, "means")
    B, N, C = x.shape
    if means.shape[0] != B or means.shape[2] != C:
        V.fail("means", f"shape [B={B}, K, C={C}] like x", f"shape {list(means.shape)}")
    num_iters = V.int_arg(num_iters, "num_iters", 1)
    kappa = V.positive_float(kappa, "kappa")
    kid = _kernel_arg(kernel)
    if not isinstance(normalize_means, bool):
        V.fail("normalize_means", "a bool", repr(normalize_means))
    if mask is not None:
        mask = _aux_float(mask, "mask", x, "x")
        _shape(mask, "mask", [B, N], "[B,N]")
    dt = _ops._out_dtype(x)
    with torch.no_grad():
        return _run("gmm_em", x.device,
                    lambda: _reference.gmm_em(x.to(dt), means.to(dt), num_iters, kappa, mask, kernel, normalize_means),
                    x, means, num_iters, kappa, mask, kid, normalize_means)


def prototype_values(values: torch.Tensor, resp: torch.Tensor) -> torch.Tensor:
    """Value prototypes from responsibilities (PCAN ``em_match_head.py``: ``nu``, eq. 5.4):
    ``out[b, k] = Σ_n r_nk v_n / (1e-6 + Σ_n r_nk)``.

    Args:
        values: ``[B, N, CV]`` float (the same points as the EM's x, or other features).
        resp: ``[B, N, K]``, same dtype and device (:func:`gmm_em`'s resp).

    Returns:
        ``[B, K, CV]`` float32 (float64 for float64). Differentiable w.r.t. both inputs.

    Raises:
        ValueError: wrong rank / shape / dtype, device mix.
    """
    V.float_tensor(values, "values", 3, "[B,N,CV]")
    V.float_tensor(resp, "resp", 3, "[B,N,K]")
    V.same_device_dtype(values, "values", resp, "resp")
    B, N, _CV = values.shape
    _shape(resp, "resp", [B, N, None], "[B,N,K] like values")
    return _run("prototype_values", values.device, lambda: _reference.prototype_values(values, resp), values, resp)


def prototype_attention(query: torch.Tensor, proto_keys: torch.Tensor, proto_values: torch.Tensor, kappa: float,
                        kernel: str = "dot") -> torch.Tensor:
    """Prototype read (PCAN ``_prop`` and read, eq. 5.5): ``softmax_K(logits) · values``,
    without materialising more than ``[Nq, K]`` weights.

    Args:
        query: ``[B, Nq, C]`` float.
        proto_keys: ``[B, K, C]`` (the EM means), same dtype and device.
        proto_values: ``[B, K, CV]`` (PCAN frame level: the keys themselves), same dtype.
        kappa: > 0 (PCAN reads with 1).
        kernel: ``"dot"`` or ``"l2"``, as in :func:`gmm_em`.

    Returns:
        ``[B, Nq, CV]`` float32 (float64 for float64). Differentiable w.r.t. all three.

    Raises:
        ValueError: wrong rank / shape / dtype, device mix, bad kappa or kernel.
    """
    V.float_tensor(query, "query", 3, "[B,Nq,C]")
    V.float_tensor(proto_keys, "proto_keys", 3, "[B,K,C]")
    V.float_tensor(proto_values, "proto_values", 3, "[B,K,CV]")
    V.same_device_dtype(query, "query", proto_keys, "proto_keys")
    V.same_device_dtype(query, "query", proto_values, "proto_values")
    B, _Nq, C = query.shape
    _shape(proto_keys, "proto_keys", [B, None, C], "[B,K,C] like query")
    _shape(proto_values, "proto_values", [B, proto_keys.shape[1], None], "[B,K,CV] like proto_keys")
    kappa = V.positive_float(kappa, "kappa")
    kid = _kernel_arg(kernel)
    out, _attn = _run("prototype_attention", query.device,
                      lambda: (_reference.prototype_attention(query, proto_keys, proto_values, kappa, kernel), None),
                      query, proto_keys, proto_values, kappa, kid)
    return out


def diag_gmm_log_prob(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of diagonal Gaussians (A-GAME ``GaussiansAgame.forward``):
    ``s[b, n, k] = −½ Σ_d (log var_kd + (x_nd − μ_kd)² / var_kd)`` (no ``2π`` term, no
    prior), computed on the differences, without a ``[B, N, K, D]`` tensor.

    Args:
        x: ``[B, N, D]`` float features.
        mean, var: ``[B, K, D]``, same dtype and device; var > 0 (a non-positive var
            gives NaN / inf, as ``torch.log`` does).

    Returns:
        ``[B, N, K]`` float32 (float64 for float64). Differentiable w.r.t. all three.

    Raises:
        ValueError: wrong rank / shape / dtype, device mix.
    """
    V.float_tensor(x, "x", 3, "[B,N,D]")
    V.float_tensor(mean, "mean", 3, "[B,K,D]")
    V.float_tensor(var, "var", 3, "[B,K,D]")
    V.same_device_dtype(x, "x", mean, "mean")
    V.same_device_dtype(x, "x", var, "var")
    B, _N, D = x.shape
    _shape(mean, "mean", [B, None, D], "[B,K,D] like x")
    _shape(var, "var", list(mean.shape), "like mean")
    return _run("diag_gmm_log_prob", x.device, lambda: _reference.diag_gmm_log_prob(x, mean, var), x, mean, var)


def diag_gmm_fit(x: torch.Tensor, weights: torch.Tensor, var_reg: torch.Tensor):
    """Weighted fit of diagonal Gaussians (A-GAME ``GaussiansAgame.get_init_state``), two
    passes over ``x`` (no one-pass ``E[x²] − E[x]²`` cancellation):
    ``μ_k = Σ_n w_nk x_n / (1 + S_k)``, ``var_k = var_reg_k + Σ_n w_nk (x_n − μ_k)² / (1 + S_k)``,
    ``S_k = Σ_n w_nk`` (A-GAME's ``avgpool(x·w) / (1/N + avgpool(w))``).

    Args:
        x: ``[B, N, D]`` float features (A-GAME: layer4 projected to D = 512).
        weights: ``[B, N, K]``, same dtype and device (A-GAME: the soft segmentation for
            components 0 and 1, the residuals ``relu(p − y)`` for the distractors 2, 3).
        var_reg: ``[K, D]`` variance floor, any float dtype, same device (A-GAME:
            ``softplus(cov_reg)``, init ``softplus(−2)``).

    Returns:
        ``(mean, var)``, each ``[B, K, D]`` float32 (float64 for float64).
        Differentiable w.r.t. x, weights and var_reg.

    Raises:
        ValueError: wrong rank / shape / dtype, device mix.
    """
    V.float_tensor(x, "x", 3, "[B,N,D]")
    V.float_tensor(weights, "weights", 3, "[B,N,K]")
    V.same_device_dtype(x, "x", weights, "weights")
    B, N, D = x.shape
    _shape(weights, "weights", [B, N, None], "[B,N,K] like x")
    var_reg = _aux_float(var_reg, "var_reg", x, "x")
    _shape(var_reg, "var_reg", [weights.shape[2], D], "[K,D]")
    return _run("diag_gmm_fit", x.device, lambda: _reference.diag_gmm_fit(x, weights, var_reg), x, weights, var_reg)
