"""Training-free PCAN-style propagation: per-object GMM prototypes, updated with momentum.

:class:`TrainingFreePCAN` is ``vos-kernels segment --method pcan``. It applies PCAN's
instance-level prototypes (``SysCV/pcan`` ``em_match_head.py``; ``../shared/spec/gmm.md``
"Instance level": fg and bg prototypes by masked EM, κ = 20, dot kernel, normalised
means; a read that is a softmax over all prototypes whose fg part is summed into a fg map;
momentum ``k̄ = (1 − λ)·k̄ + λ·k``, λ = 0.2) per object to whole frames, with no learned
part:

1. Keys: frozen backbone features (:class:`vos_models.backbone.EfficientNetLite0Features`),
   stride 8 and stride 16 (upsampled to stride 8), each L2-normalised, concatenated and
   scaled by ``1/sqrt(2)`` so that every key is unit-norm (the keys of
   :meth:`vos_models.stcn.TrainingFreeSTCN.key`), channels last ``[1, N, C]``.
2. First frame: for each label l (0 = background, 1 … L−1 the objects) ``K`` prototypes by
   :func:`vos_kernels.gmm_em` (``num_iters`` iterations, κ = ``em_kappa``, dot kernel,
   normalised means) with the label's soft mask (its area fraction in each stride-8 cell,
   squared: ``mask_power``, so that boundary cells count less) as ``mask``. All labels are ONE call: batch row l is label l, ``x`` is the frame's keys
   expanded over the rows (no copy), ``mask`` row l is label l's mask. Initial means are
   deterministic: farthest-point sampling over the label's points (the cell covered most
   by the label first, then each next point the one whose best cosine to those chosen is
   the lowest). A label with no pixel at stride 8 gets zero means from the op; zero
   prototypes are left out of the read.
3. Each next frame: :func:`vos_kernels.prototype_attention` of its keys over the
   concatenation of all labels' prototypes (κ = ``read_kappa``, dot kernel) with values the
   one-hot label of each prototype gives ``P [1, N, L]``: per pixel, the softmax over all
   prototypes summed per label (PCAN: fg prototypes summed → fg map). The object maps are
   multiplied by a prior ``e^b`` (5.), ``P`` is upsampled (bilinear) to the output size
   and argmaxed → labels.
4. Momentum update: EM on the frame's keys masked by the prediction (each label's area
   fraction per stride-8 cell, squared), started from the current prototypes, again one call for all
   labels; ``k̄ = (1 − λ)·k̄ + λ·k`` (λ = ``momentum``, PCAN 0.2), re-normalised. A label
   absent from the prediction keeps its prototypes.
5. Prior: the objects' prototypes also cover background at their boundary cells, and the
   background (varied, with the same K) is covered less well, so a plain read
   over-segments objects (1.3–4× their area on the shared clips). Without training,
   ``b <= 0`` is calibrated once (``calibrate_prior``), like ``TrainingFreeCFBI``'s
   bias: the ``b`` on a grid (0, −0.25, …, −6) whose read of frame 0 itself best recovers
   frame 0's mask (mean object IoU at full size; ties to the smallest ``|b|``).
6. With ``keep_first`` (default) the first frame's prototypes stay in the read beside the
   updated ones (2·K per label): the first mask is the only ground truth a training-free
   model has, and it limits drift (measured in ``docs/segment.md``).

``matching="reference"`` runs the same pipeline on :mod:`vos_kernels.reference` (PCAN's
einsum chains, ``gmm_em`` / ``prototype_attention``) instead of the public ops; the
farthest-point initialisation is shared plain PyTorch.

Limits: stride-8 prototypes and bilinear upsampling lose structures thinner than ~8 px;
a few dozen prototypes per label summarise appearance only (no position), so a distractor
that looks like the object is taken for it. It demonstrates the GMM ops on real video; it
is not a trained PCAN.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

import vos_kernels
from vos_kernels import reference as _reference

from .propagation import argmax_labels, check_first_mask
from .stcn import TrainingFreeSTCN, soft_one_hot


def farthest_point_means(x: torch.Tensor, weights: torch.Tensor, k: int) -> torch.Tensor:
    """Deterministic initial means: farthest-point sampling (cosine) over weighted points.

    Args:
        x: ``[N, C]`` unit-norm points.
        weights: ``[B, N]`` per row, the points' weights (a label's soft mask); points with
            weight > 0 are candidates (all points when a row has none).
        k: means per row.

    Returns:
        ``[B, k, C]``: row b's first mean is its point of largest weight (lowest index on
        ties), each next one the candidate whose largest cosine to those already chosen is
        the smallest (lowest index on ties). Fewer than k candidates repeat points.
    """
    B, N = weights.shape
    out = x.new_empty(B, k, x.shape[1])
    for b in range(B):
        cand = weights[b] > 0
        if not bool(cand.any()):
            cand = torch.ones(N, dtype=torch.bool, device=x.device)
        idx = int(torch.argmax(weights[b]))
        best_cos = torch.full((N,), -2.0, dtype=x.dtype, device=x.device)
        for j in range(k):
            out[b, j] = x[idx]
            best_cos = torch.maximum(best_cos, x @ x[idx])
            score = best_cos.masked_fill(~cand, float("inf"))
            idx = int(torch.argmin(score))
    return out


class TrainingFreePCAN:
    """Training-free PCAN-style propagation (the rule is in the module docstring).

    Args:
        prototypes: K, prototypes per label (PCAN instance level: 10 fg + 10 bg).
        read_kappa: κ of the read's softmax over prototypes (dot kernel, unit keys).
        em_kappa: κ of the EM (PCAN 20).
        num_iters: EM iterations per call (PCAN instance level 6).
        momentum: λ of ``k̄ = (1 − λ)·k̄ + λ·k`` (PCAN paper: 0.2 best); 0 freezes the
            first frame's prototypes.
        keep_first: keep the first frame's prototypes in the read beside the updated ones.
        mask_power: EM masks are the labels' area fractions per cell to this power.
        calibrate_prior: calibrate the object prior ``b`` on frame 0 (else ``b = 0``).
        matching: ``"fused"`` (:mod:`vos_kernels` ops, whichever backend is selected) or
            ``"reference"`` (:mod:`vos_kernels.reference`, PCAN's einsum chains).

    Use: :meth:`start` with frame 0's features and mask, then :meth:`step` per frame.

    Raises:
        ValueError: a bad setting (naming it).
    """

    key_strides = TrainingFreeSTCN.key_strides

    def __init__(self, prototypes: int = 30, read_kappa: float = 20.0, em_kappa: float = 20.0, num_iters: int = 6,
                 momentum: float = 0.2, keep_first: bool = True, mask_power: float = 2.0,
                 calibrate_prior: bool = True, matching: str = "fused"):
        for name, v in (("prototypes", prototypes), ("num_iters", num_iters)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        for name, v in (("read_kappa", read_kappa), ("em_kappa", em_kappa)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
                raise ValueError(f"{name}: expected a finite number > 0, got {v!r}")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum <= 1:
            raise ValueError(f"momentum: expected a number in [0, 1], got {momentum!r}")
        if isinstance(mask_power, bool) or not isinstance(mask_power, (int, float)) or not 0 < mask_power < 100:
            raise ValueError(f"mask_power: expected a number in (0, 100), got {mask_power!r}")
        self.mask_power = float(mask_power)
        self.calibrate_prior = bool(calibrate_prior)
        self.prior: torch.Tensor | None = None
        if matching == "fused":
            self._gmm_em, self._attention = vos_kernels.gmm_em, vos_kernels.prototype_attention
        elif matching == "reference":
            self._gmm_em, self._attention = _reference.gmm_em, _reference.prototype_attention
        else:
            raise ValueError(f"matching: expected 'fused' or 'reference', got {matching!r}")
        self.prototypes, self.read_kappa, self.em_kappa = prototypes, float(read_kappa), float(em_kappa)
        self.num_iters, self.momentum, self.keep_first, self.matching = (
            num_iters, float(momentum), bool(keep_first), matching)
        self.num_labels = 0
        self.means: torch.Tensor | None = None          # [L, K, C] current prototypes
        self.first_means: torch.Tensor | None = None    # [L, K, C] frame 0's
        self.calibration: dict = {}
        self.frame = -1
        self.updates_skipped = 0

    def key(self, features: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """Unit-norm stride-8 keys ``[1, C8 + C16, h, w]`` (:meth:`TrainingFreeSTCN.key`)."""
        return TrainingFreeSTCN.key(self, features)

    def _em(self, x: torch.Tensor, means: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One EM call for all labels: ``x [N, C]`` expanded to ``[L, N, C]``, ``mask [L, N]``."""
        L = mask.shape[0]
        mu, _ = self._gmm_em(x.unsqueeze(0).expand(L, -1, -1), means, self.num_iters, self.em_kappa, mask,
                             "dot", True)
        return mu

    def _read_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Prototype keys ``[1, P, C]`` and one-hot label values ``[1, P, L]`` of the read
        (zero prototypes, from labels absent at stride 8, left out)."""
        sets = [self.means] + ([self.first_means] if self.keep_first else [])
        keys = torch.cat([m.reshape(-1, m.shape[-1]) for m in sets], 0)
        labels = torch.arange(self.num_labels, device=keys.device).repeat_interleave(self.prototypes)
        labels = labels.repeat(len(sets))
        valid = keys.norm(dim=1) > 0.5
        keys, labels = keys[valid], labels[valid]
        values = F.one_hot(labels, self.num_labels).to(keys.dtype)
        return keys.unsqueeze(0).contiguous(), values.unsqueeze(0).contiguous()

    @torch.no_grad()
    def start(self, features: Mapping[int, torch.Tensor], labels: torch.Tensor, num_labels: int) -> None:
        """Frame 0: features, ``labels [H, W]`` in ``[0, num_labels)`` (at least one object pixel)."""
        labels = check_first_mask(labels, num_labels)
        self.num_labels = int(num_labels)
        self._size = (int(labels.shape[0]), int(labels.shape[1]))
        key = self.key(features)
        h, w = key.shape[-2:]
        x = key[0].flatten(1).t().contiguous()                                   # [N, C]
        mask = soft_one_hot(labels, self.num_labels, (h, w))[0].flatten(1).pow(self.mask_power)   # [L, N]
        init = farthest_point_means(x, mask, self.prototypes)
        self.means = self._em(x, init, mask)
        self.first_means = self.means.clone()
        self.prior = torch.ones(self.num_labels, dtype=key.dtype, device=key.device)
        prior_info = {"log_prior": 0.0, "frame0_iou": None}
        if self.calibrate_prior:
            prior_info = self._calibrate(key, labels)
        self.frame = 0
        self.updates_skipped = 0
        self.calibration = {"prototypes_per_label": self.prototypes, "read_kappa": self.read_kappa,
                            "em_kappa": self.em_kappa, "num_iters": self.num_iters, "momentum": self.momentum,
                            "keep_first": self.keep_first, "mask_power": self.mask_power,
                            "key_channels": int(key.shape[1]),
                            "points_per_frame": int(h * w), **prior_info, "initial_means": "farthest-point (cosine)",
                            "labels_without_prototypes": [l for l in range(self.num_labels)
                                                          if not bool((mask[l] > 0).any())]}

    def _calibrate(self, key: torch.Tensor, labels: torch.Tensor) -> dict:
        """Object log-prior ``b <= 0`` (object probabilities × ``e^b``) that best recovers
        frame 0's own mask from its read (mean object IoU at full size; ties to the smallest
        ``|b|``): offsets the objects' prototypes taking the background's boundary cells."""
        up = F.interpolate(self.probabilities(key), size=self._size, mode="bilinear", align_corners=False)
        best_b, best = 0.0, -1.0
        for b in [-x / 4 for x in range(0, 25)]:
            scaled = up.clone()
            scaled[:, 1:] *= math.exp(b)
            pred = argmax_labels(scaled)[0]
            ious = [float(((pred == l) & (labels == l)).sum()) / max(1.0, float(((pred == l) | (labels == l)).sum()))
                    for l in range(1, self.num_labels)]
            score = sum(ious) / len(ious)
            if score > best + 1e-9:
                best, best_b = score, b
        self.prior[1:] = math.exp(best_b)
        return {"log_prior": best_b, "frame0_iou": best}

    def probabilities(self, key: torch.Tensor) -> torch.Tensor:
        """The prototype read of a key map ``[1, C, h, w]`` → per-label ``[1, L, h, w]``."""
        if self.means is None:
            raise RuntimeError("TrainingFreePCAN.start() must be called with the first frame first")
        h, w = key.shape[-2:]
        q = key.flatten(2).transpose(1, 2).contiguous()                          # [1, N, C]
        keys, values = self._read_set()
        prob = self._attention(q, keys, values, self.read_kappa, "dot")          # [1, N, L]
        return prob.transpose(1, 2).reshape(1, self.num_labels, h, w)

    @torch.no_grad()
    def step(self, features: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """Segment the next frame (``[H, W]`` int64 labels), then update the prototypes."""
        if self.means is None:
            raise RuntimeError("TrainingFreePCAN.start() must be called with the first frame first")
        self.frame += 1
        key = self.key(features)
        prob = self.probabilities(key)
        prob = prob * self.prior[None, :, None, None]
        up = F.interpolate(prob, size=self._size, mode="bilinear", align_corners=False)
        pred = argmax_labels(up)[0]
        if self.momentum > 0:
            h, w = key.shape[-2:]
            x = key[0].flatten(1).t().contiguous()
            mask = soft_one_hot(pred, self.num_labels, (h, w))[0].flatten(1).pow(self.mask_power)
            new = self._em(x, self.means, mask)
            present = (mask > 0).any(1)
            self.updates_skipped += int((~present).sum())
            blended = F.normalize((1 - self.momentum) * self.means + self.momentum * new, dim=-1)
            self.means = torch.where(present[:, None, None], blended, self.means)
        return pred
