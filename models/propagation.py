"""Training-free CFBI+-style mask propagation on frozen backbone features.

:class:`TrainingFreeCFBI` segments every frame of a video from the first frame's mask with
no learned head: CFBI+'s matching (global against the first frame, multi-local against
the previous prediction, foreground and background, at strides 4, 8 and 16, atrous 2 at
stride 4) computed by the fused ops, and a fixed rule in place of CFBI's collaborative
ensembler.

The rule, per frame t ≥ 1 and stride s ∈ {4, 8, 16}:

1. Embedding: backbone features at stride s, L2-normalised per pixel and scaled by
   ``sqrt(temperature)`` (default 4), so ``‖e_p − e_q‖² ∈ [0, 4·temperature]``.
2. Global matching against frame 0 (``fb_global_matching``, atrous 2 at stride 4, 1
   elsewhere; CFBI+ eq. 2-3, 8-9) gives ``G_fg[l]``, ``G_bg[l]`` with CFBI's distance
   ``tanh((d + b_l) / 2)``.
3. Multi-local matching against frame t−1 and its prediction
   (``fb_multi_local_matching``, CFBI+'s windows ``[4..24]/[2..12]/[2..10]`` and local
   atrous ``2/1/1``; eq. 4-7, 10-12) gives ``M_fg[l, k]``, ``M_bg[l, k]``.
4. Score: ``S_s[l] = (G_bg[l] − G_fg[l]) + mean_k (M_bg[l,k] − M_fg[l,k])``: how much
   closer pixel p is to label l than to the best other label, globally and locally.
5. Prediction: ``argmax_l Σ_s w_s · up(S_s[l])``, ``up`` = bilinear to the output size,
   ``w_s = 1``. All objects are segmented at once (label 0 = background).

Biases: CFBI learns ``b_B`` and ``b_F`` per stride to offset that background has many more
pixels to match than an object (more candidates give a smaller nearest distance, which
erodes objects frame after frame). Without training, ``b_B = 0`` and ``b_F`` is calibrated
once per stride on the annotated first frame: its pixels at even (row, col) are matched
(``labelled_nearest_sqdist``) against its pixels at odd (row, col), so that no pixel
matches itself, and ``b_F`` is the value on a grid (−3 … 0, step 0.1) that gives the
highest mean object IoU of ``argmin_l (d_l + b_l)`` on those held-out pixels (ties: the
smallest |b_F|). ``b_F`` is never positive: the bias exists to offset the background's
larger sample, and a positive value fitted to one frame's held-out split lost a moving
object in a synthetic test. The same biases serve global and local matching, as in CFBI.

Labels are brought to stride s by area-majority (``adaptive_avg_pool2d`` of the one-hot
mask, then argmax): nearest-neighbour subsampling shifts masks by up to s−1 pixels and
makes objects drift or shrink over a video.

Limits: frozen ImageNet features at stride ≥ 4 and bilinear upsampling lose structures
thinner than ~4 px (chair legs); there is no re-identification of objects that leave the
frame beyond what global matching against frame 0 recovers. It demonstrates the fused
kernels on real video; it is not a substitute for a trained CFBI+. The variants measured
on the way to this rule are in ``docs/segment.md``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

#: CFBI+ defaults (``configs/resnet101_cfbip.py``, test mode with ``--global_atrous_rate 2``).
CFBIP_LOCAL_WINDOWS = {4: (4, 8, 12, 16, 20, 24), 8: (2, 4, 6, 8, 10, 12), 16: (2, 4, 6, 8, 10)}
CFBIP_LOCAL_ATROUS = {4: 2, 8: 1, 16: 1}
CFBIP_GLOBAL_ATROUS = {4: 2, 8: 1, 16: 1}


def check_first_mask(labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """Validate a first-frame mask: ``[H, W]`` integers in ``[0, num_labels)`` with at least
    one object pixel, ``num_labels >= 2``. Returns it as int64.

    Raises:
        ValueError: naming ``labels`` or ``num_labels``.
    """
    if labels.dim() != 2 or labels.is_floating_point():
        raise ValueError(f"labels: expected an integer tensor [H, W], got {labels.dtype} {tuple(labels.shape)}")
    if num_labels < 2:
        raise ValueError(f"num_labels: expected >= 2 (background + at least one object), got {num_labels}")
    labels = labels.long()
    if int(labels.min()) < 0 or int(labels.max()) >= num_labels:
        raise ValueError(f"labels: expected values in [0, {num_labels}), got "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    if not bool((labels > 0).any()):
        raise ValueError("labels: the first-frame mask has no object pixel")
    return labels


def downsample_labels(labels: torch.Tensor, num_labels: int, size: tuple[int, int]) -> torch.Tensor:
    """Area-majority downsampling of an integer mask.

    Args:
        labels: ``[H, W]`` int64 in ``[0, num_labels)``.
        num_labels: L.
        size: ``(h, w)``.

    Returns:
        ``[1, h, w]`` int64: per output cell, the label covering most of its area
        (``adaptive_avg_pool2d`` of the one-hot mask, ties to the lowest label).
    """
    onehot = F.one_hot(labels, num_labels).permute(2, 0, 1).unsqueeze(0).float()
    return argmax_labels(F.adaptive_avg_pool2d(onehot, size))


def argmax_labels(score: torch.Tensor) -> torch.Tensor:
    """``score.argmax(1)`` for ``[B, L, H, W]`` with few labels, ties to the lowest label.

    A running maximum over the L planes: each pass is a contiguous elementwise op, several
    times faster on CPU than ``argmax`` over the strided label dimension.
    """
    best = score[:, 0].clone()
    index = torch.zeros(best.shape, dtype=torch.long, device=score.device)
    for l in range(1, score.shape[1]):
        plane = score[:, l]
        better = plane > best
        index.masked_fill_(better, l)
        best = torch.where(better, plane, best)
    return index


def _matching_ops(matching: str):
    if matching == "fused":
        from vos_kernels import matching as ops
    elif matching == "reference":
        from vos_kernels import reference as ops
    else:
        raise ValueError(f"matching: expected 'fused' or 'reference', got {matching!r}")
    return ops


class TrainingFreeCFBI:
    """CFBI+-style propagation without training (the rule is in the module docstring).

    Args:
        strides: feature strides used, a subset of ``(4, 8, 16)``.
        matching: ``"fused"`` (``vos_kernels`` ops, whichever backend is selected) or
            ``"reference"`` (``vos_kernels.reference``, CFBI's naive PyTorch).
        temperature: squared-distance scale of the unit-norm embeddings (> 0).
        global_atrous, local_windows, local_atrous: per stride, CFBI+'s by default.
        scale_weights: per stride weight of the score (default 1 each).
        calibrate_bias: calibrate ``b_F`` on the first frame; if False, ``b_F = fg_bias``.
        fg_bias: ``b_F`` when not calibrated.
        bias_grid: candidate ``b_F`` values of the calibration (default −3.0 … 0.0, step 0.1).

    Use: :meth:`start` with frame 0's features and mask, then :meth:`step` per frame.
    Features are the output of :class:`vos_models.backbone.EfficientNetLite0Features`
    (``{stride: [1, C, h, w]}``) for one frame.
    """

    def __init__(self, strides: Sequence[int] = (4, 8, 16), *, matching: str = "fused",
                 temperature: float = 4.0,
                 global_atrous: Mapping[int, int] | None = None,
                 local_windows: Mapping[int, Sequence[int]] | None = None,
                 local_atrous: Mapping[int, int] | None = None,
                 scale_weights: Mapping[int, float] | None = None,
                 calibrate_bias: bool = True, fg_bias: float = 0.0,
                 bias_grid: Sequence[float] | None = None):
        self.strides = tuple(sorted(int(s) for s in strides))
        if not self.strides or any(s not in CFBIP_LOCAL_WINDOWS for s in self.strides):
            raise ValueError(f"strides: expected a non-empty subset of (4, 8, 16), got {tuple(strides)}")
        if not temperature > 0:
            raise ValueError(f"temperature: expected > 0, got {temperature}")
        self.ops = _matching_ops(matching)
        self.matching = matching
        self.temperature = float(temperature)
        self.global_atrous = {s: int((global_atrous or CFBIP_GLOBAL_ATROUS)[s]) for s in self.strides}
        self.local_windows = {s: tuple(int(k) for k in (local_windows or CFBIP_LOCAL_WINDOWS)[s])
                              for s in self.strides}
        self.local_atrous = {s: int((local_atrous or CFBIP_LOCAL_ATROUS)[s]) for s in self.strides}
        self.scale_weights = {s: float((scale_weights or {}).get(s, 1.0)) for s in self.strides}
        self.calibrate_bias = bool(calibrate_bias)
        self.fg_bias = float(fg_bias)
        grid = torch.arange(-30, 1, dtype=torch.float64) / 10 if bias_grid is None else torch.as_tensor(bias_grid)
        # ties resolve to the smallest |b|: try candidates in order of |b| (then sign)
        self.bias_grid = sorted((float(b) for b in grid), key=lambda b: (abs(b), b))
        self.num_labels = 0
        self.bias: dict[int, torch.Tensor] = {}
        self.calibration: dict[int, dict] = {}
        self._reference: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._previous: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._size: tuple[int, int] = (0, 0)

    # ------------------------------------------------------------------ helpers
    def embed(self, features: Mapping[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """``{stride: [1, C, h, w]}`` → ``{stride: [1, h, w, C]}`` unit-norm × sqrt(temperature)."""
        missing = [s for s in self.strides if s not in features]
        if missing:
            raise ValueError(f"features: expected strides {self.strides}, missing {missing}")
        scale = self.temperature ** 0.5
        return {s: (F.normalize(features[s].float().permute(0, 2, 3, 1), dim=-1) * scale).contiguous()
                for s in self.strides}

    def _calibrate(self, emb: torch.Tensor, labels: torch.Tensor) -> tuple[float, dict]:
        L = self.num_labels
        held_out = emb[:, 0::2, 0::2].contiguous()
        ref = emb[:, 1::2, 1::2].contiguous()
        ref_labels = labels[:, 1::2, 1::2].contiguous()
        truth = labels[0, 0::2, 0::2]
        present = [l for l in range(1, L) if bool((truth == l).any()) and bool((ref_labels == l).any())]
        if not present or not bool((ref_labels == 0).any()):
            return 0.0, {"bias": 0.0, "held_out_iou": None, "reason": "too few labelled pixels at this stride"}
        d = self.ops.labelled_nearest_sqdist(held_out, ref, ref_labels, L, 1)[0][0].double()
        best_b, best = 0.0, -1.0
        for b in self.bias_grid:
            shifted = d.clone()
            shifted[1:] += b
            pred = shifted.argmin(0)
            ious = [float(((pred == l) & (truth == l)).sum()) / max(1.0, float(((pred == l) | (truth == l)).sum()))
                    for l in present]
            score = sum(ious) / len(ious)
            if score > best + 1e-12:
                best, best_b = score, b
        return best_b, {"bias": best_b, "held_out_iou": best}

    # ---------------------------------------------------------------------- API
    def start(self, features: Mapping[int, torch.Tensor], labels: torch.Tensor, num_labels: int) -> None:
        """Take frame 0: its features and its mask.

        Args:
            features: ``{stride: [1, C, h, w]}`` of frame 0.
            labels: ``[H, W]`` int64 mask at the output resolution, values in
                ``[0, num_labels)`` (0 = background); every later prediction has this size.
            num_labels: L = objects + 1.

        Raises:
            ValueError: labels not a 2-D integer tensor in range, or with no object pixel.
        """
        labels = check_first_mask(labels, num_labels)
        self.num_labels = int(num_labels)
        self._size = (int(labels.shape[0]), int(labels.shape[1]))
        emb = self.embed(features)
        self._reference, self.bias, self.calibration = {}, {}, {}
        for s in self.strides:
            lab = downsample_labels(labels, self.num_labels, tuple(emb[s].shape[1:3]))
            if self.calibrate_bias:
                b_f, info = self._calibrate(emb[s], lab)
            else:
                b_f, info = self.fg_bias, {"bias": self.fg_bias, "held_out_iou": None}
            bias = torch.full((self.num_labels,), b_f, dtype=torch.float32, device=emb[s].device)
            bias[0] = 0.0
            self.bias[s], self.calibration[s] = bias, info
            self._reference[s] = (emb[s], lab)
        self._previous = dict(self._reference)

    @torch.no_grad()
    def scores(self, features: Mapping[int, torch.Tensor]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Per-label scores of a new frame (no state change).

        Returns:
            ``(score [1, L, H, W] float32 at the output size, embeddings)``.
        """
        if not self._reference:
            raise RuntimeError("TrainingFreeCFBI.start() must be called with the first frame first")
        emb = self.embed(features)
        L = self.num_labels
        total = None
        for s in self.strides:
            q = emb[s]
            if q.shape != self._reference[s][0].shape:
                raise ValueError(f"features: stride {s} map {tuple(q.shape[1:3])} differs from the first "
                                 f"frame's {tuple(self._reference[s][0].shape[1:3])}")
            ref, ref_lab = self._reference[s]
            prev, prev_lab = self._previous[s]
            g_fg, g_bg = self.ops.fb_global_matching(q, ref, ref_lab, L, self.bias[s], self.global_atrous[s])
            m_fg, m_bg = self.ops.fb_multi_local_matching(q, prev, prev_lab, L, self.local_windows[s],
                                                          self.bias[s], self.local_atrous[s])
            score = (g_bg - g_fg) + (m_bg - m_fg).mean(2)
            up = F.interpolate(score, size=self._size, mode="bilinear", align_corners=False)
            total = up * self.scale_weights[s] if total is None else total + up * self.scale_weights[s]
        return total, emb

    @torch.no_grad()
    def step(self, features: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """Segment the next frame and make it the previous frame of the next step.

        Returns:
            ``[H, W]`` int64 labels at the output size.
        """
        total, emb = self.scores(features)
        pred = argmax_labels(total)[0]
        self._previous = {s: (emb[s], downsample_labels(pred, self.num_labels, tuple(emb[s].shape[1:3])))
                          for s in self.strides}
        return pred
