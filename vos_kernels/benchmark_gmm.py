"""Benchmark cases of the GMM prototype ops (PCAN, EMANet) and A-GAME's Gaussians, for the
harness of :mod:`vos_kernels.benchmark` (sizes: ``../shared/spec/gmm.md``).

Three workloads, each run with the fused ops (``vos_kernels.<op>``) and with their
reference (``vos_kernels.reference``: PCAN's / EMANet's einsum chains, A-GAME's
per-component loops), on the same inputs:

* ``em``: one ``gmm_em`` call (PCAN frame level, EMANet): outputs means and resp;
* ``pcan-instance``: PCAN's instance head for R RoIs of 14×14: four EM calls (reference
  frame fg / bg, current frame fg / bg; 10 prototypes each, 6 iterations, kappa 20,
  masked by the binarised mask), the momentum blend λ = 0.2, and the read of the current
  RoI features against the 20 prototypes (kappa 1; fg / bg maps as the sums of the fg / bg
  prototypes' weights, i.e. one-hot values);
* ``agame``: forward + backward of A-GAME's appearance model over an unroll of
  ``frames`` frames: fit components 0 / 1 on the soft segmentation, score, fit the
  distractors 2 / 3 on the residuals ``relu(p − y)``; each later frame: score the 4
  components, a 2-way prediction (logsumexp of each class's two components), cross
  entropy against the frame's segmentation, refit on the prediction and blend the
  parameters 0.9 / 0.1. Outputs: gradients w.r.t. the features and ``cov_reg``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import gmm as _fused
from . import reference as _reference

PCAN_INSTANCE_PROTOTYPES = 10
PCAN_INSTANCE_ITERS = 6
PCAN_KAPPA = 20.0
PCAN_MOMENTUM = 0.2
AGAME_LR = 0.1


def _points(gen: torch.Generator, shape) -> torch.Tensor:
    """N(0, 1/C) points: rows of about unit norm, so kappa · x·μ is O(kappa)."""
    return torch.randn(*shape, generator=gen) / shape[-1] ** 0.5


def _unit(gen: torch.Generator, shape) -> torch.Tensor:
    mu = torch.randn(*shape, generator=gen)
    return mu / mu.norm(dim=-1, keepdim=True)


def _mask(gen: torch.Generator, shape, fg: float = 0.4) -> torch.Tensor:
    return (torch.rand(*shape, generator=gen) < fg).float()


# ----------------------------------------------------------------------------- em
def em_inputs(case, gen):
    B, N, C, K = case.batch, case.pixels, case.channels, case.components
    return dict(x=_points(gen, (B, N, C)), means=_unit(gen, (B, K, C)), num_iters=case.iters, kappa=case.kappa)


def em_fused(**kw):
    return _fused.gmm_em(**kw)


def em_reference(**kw):
    with torch.no_grad():
        return _reference.gmm_em(**kw)


def em_flops(case, inputs) -> float:
    """Per iteration: the E-step dots and the M-step sums, 2·N·K·C each."""
    return 4.0 * case.batch * case.pixels * case.components * case.channels * case.iters


def em_bytes(case) -> float:
    """The fused target: x read once per iteration, resp and means written once."""
    B, N, C, K = case.batch, case.pixels, case.channels, case.components
    return 4.0 * (case.iters * B * N * C + B * N * K + 2 * B * K * C)


def em_reference_peak(case, elem: int) -> float:
    """z, its normalised copy and the logits, [B, N, K] each."""
    return float(elem) * 3 * case.batch * case.pixels * case.components


# -------------------------------------------------------------------- PCAN instance
def instance_inputs(case, gen):
    R, N, C, K = case.batch, case.pixels, case.channels, case.components
    return dict(ref_x=_points(gen, (R, N, C)), ref_mask=_mask(gen, (R, N)), cur_x=_points(gen, (R, N, C)),
                cur_mask=_mask(gen, (R, N)), mu_fg=_unit(gen, (R, K, C)), mu_bg=_unit(gen, (R, K, C)))


def pcan_instance_head(ops, ref_x, ref_mask, cur_x, cur_mask, mu_fg, mu_bg):
    """PCAN's instance-level prototypes and read (``em_match_head.py``), with ``ops`` the
    fused module or the reference. Returns ``(read [R, N, 2], prototypes [R, 2K, C])``."""
    T, kappa = PCAN_INSTANCE_ITERS, PCAN_KAPPA
    with torch.no_grad():
        ref_fg, _ = ops.gmm_em(ref_x, mu_fg, T, kappa, mask=ref_mask)
        ref_bg, _ = ops.gmm_em(ref_x, mu_bg, T, kappa, mask=1 - ref_mask)
        cur_fg, _ = ops.gmm_em(cur_x, ref_fg, T, kappa, mask=cur_mask)
        cur_bg, _ = ops.gmm_em(cur_x, ref_bg, T, kappa, mask=1 - cur_mask)
    lam = PCAN_MOMENTUM
    protos = torch.cat([(1 - lam) * ref_fg + lam * cur_fg, (1 - lam) * ref_bg + lam * cur_bg], dim=1)
    K = mu_fg.shape[1]
    onehot = torch.zeros(protos.shape[0], 2 * K, 2, dtype=protos.dtype, device=protos.device)
    onehot[:, :K, 0] = 1
    onehot[:, K:, 1] = 1
    return ops.prototype_attention(cur_x, protos, onehot, 1.0), protos


def instance_fused(**kw):
    return pcan_instance_head(_fused, **kw)


def instance_reference(**kw):
    return pcan_instance_head(_reference, **kw)


def instance_flops(case, inputs) -> float:
    """Four EM calls (4·N·K·C per iteration each) and the read (2·N·2K·C + 2·N·2K·2)."""
    R, N, C, K = case.batch, case.pixels, case.channels, case.components
    return 4 * 4.0 * R * N * K * C * PCAN_INSTANCE_ITERS + 2.0 * R * N * 2 * K * (C + 2)


def instance_bytes(case) -> float:
    R, N, C = case.batch, case.pixels, case.channels
    return 4.0 * (4 * PCAN_INSTANCE_ITERS * R * N * C + R * N * C + 2 * R * N)


def instance_reference_peak(case, elem: int) -> float:
    return float(elem) * 4 * case.batch * case.pixels * 2 * case.components


# --------------------------------------------------------------------------- A-GAME
def agame_inputs(case, gen):
    T, B, N, D = case.frames, case.batch, case.pixels, case.channels
    seg = torch.rand(T, B, N, generator=gen)
    seg = torch.where(torch.rand(T, B, N, generator=gen) < 0.8, (seg > 0.6).float(), seg)   # mostly hard labels
    return dict(x=torch.randn(T, B, N, D, generator=gen), seg=seg,
                cov_reg=torch.full((4, D), -2.0) + 0.1 * torch.randn(4, D, generator=gen))


def agame_unroll(ops, x, seg, cov_reg):
    """Forward + backward of A-GAME's appearance model over ``x.shape[0]`` frames (see the
    module doc). Returns ``(grad_x [T, B, N, D], grad_cov_reg [4, D])``."""
    x = x.detach().requires_grad_(True)
    reg = cov_reg.detach().requires_grad_(True)
    var_reg = F.softplus(reg)
    frames = x.unbind(0)     # one view per frame (x[t] would make autograd fill a zero [T, B, N, D] per frame)

    def fit_state(xt, y):                                      # GaussiansAgame.get_init_state
        m01, v01 = ops.diag_gmm_fit(xt, y, var_reg[:2])
        p = torch.softmax(ops.diag_gmm_log_prob(xt, m01, v01), dim=-1)
        m23, v23 = ops.diag_gmm_fit(xt, F.relu(p - y), var_reg[2:])
        return torch.cat([m01, m23], 1), torch.cat([v01, v23], 1)

    y0 = torch.stack([1 - seg[0], seg[0]], -1)
    mean, var = fit_state(frames[0], y0)
    loss = x.new_zeros(())
    for t in range(1, x.shape[0]):
        s = ops.diag_gmm_log_prob(frames[t], mean, var)                  # [B, N, 4]
        logits = torch.stack([torch.logsumexp(s[..., 0::2], -1), torch.logsumexp(s[..., 1::2], -1)], -1)
        y = torch.stack([1 - seg[t], seg[t]], -1)
        loss = loss - (y * torch.log_softmax(logits, -1)).sum(-1).mean()
        m_new, v_new = fit_state(frames[t], torch.softmax(logits, -1))
        mean = (1 - AGAME_LR) * mean + AGAME_LR * m_new
        var = (1 - AGAME_LR) * var + AGAME_LR * v_new
    return torch.autograd.grad(loss, (x, reg))


def agame_fused(**kw):
    return agame_unroll(_fused, **kw)


def agame_reference(**kw):
    return agame_unroll(_reference, **kw)


def agame_flops(case, inputs) -> float:
    """Forward per frame ≈ 4 + 2 components scored (4 flops per element each) and 4 fitted
    (6 per element); backward counted as twice the forward."""
    per_frame = (6 * 4.0 + 4 * 6.0) * case.batch * case.pixels * case.channels
    return 3 * per_frame * case.frames


def agame_bytes(case) -> float:
    """Features read about 8 times per frame forward and backward."""
    return 4.0 * 8 * case.frames * case.batch * case.pixels * case.channels


def agame_reference_peak(case, elem: int) -> float:
    """Autograd keeps about 30 [B, N, D] tensors per frame in the per-component loops."""
    return float(elem) * 30 * case.frames * case.batch * case.pixels * case.channels


def float64_oracle(reference):
    """The oracle of a GMM case: ``reference`` run on float64 copies of the inputs."""
    def oracle(case, inputs):
        x = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}
        return tuple(t.detach() for t in reference(**x))
    return oracle
