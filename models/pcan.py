"""PCAN's prototypical cross-attention (frame level and instance level) on the fused GMM ops.

Source: PCAN (Ke et al., NeurIPS 2021, "Prototypical Cross-Attention Networks for
Multiple Object Tracking and Segmentation"), ``SysCV/pcan``:

- :class:`FramePrototypes`: ``pcan/models/mot/quasi_dense_pcan_seg_refine.py``
  (``EMQuasiDenseMaskRCNNRefine._em_iter``, ``_prop`` and ``forward_test``), the
  frame-level prototypical cross-attention on the FPN features, test time only; initial
  means ``mu%d`` from ``pcan/models/mot/quasi_dense_pcan.py``.
- :class:`InstancePrototypes`: ``pcan/models/roi_heads/refine_heads/em_match_head.py``
  (``EMMatchHeadPlus._em_iter``, ``em_match``, ``_prop`` and the mask binarisation of
  ``forward``): foreground / background prototypes of each RoI, the refine head's
  ``pos_z`` / ``neg_z`` attention maps.

Equations (paper section 3.2; the code uses the dot-product kernel): E-step
``z = softmax_K(κ·xᵀμ)`` (eq. 5.3 with ``κ = 1/σ²``), masked, M-step
``μ = Σ_n z̄_nk x_n`` with ``z̄ = z / (1e-6 + Σ_n z)`` (eq. 5.4), ``μ /= 1e-6 + ‖μ‖``;
value prototypes ``v_k = Σ_n z̄_nk v_n`` (eq. 5.4, :func:`vos_kernels.prototype_values`);
read ``y_i = Σ_k softmax_k(q_iᵀμ_k) v_k`` (eq. 5.5, :func:`vos_kernels.prototype_attention`);
instance prototype momentum ``k̄ = (1 − λ)·k̄ + λ·k`` (eq. 7, λ = 0.2 in the paper's
ablation). EM runs under ``no_grad`` (:func:`vos_kernels.gmm_em` never carries a
gradient), as in PCAN; the reads are differentiable w.r.t. the features.

Layout: both modules take feature maps ``[B, C, H, W]`` as PCAN does and reshape them to
the channels-last point sets ``[B, N = H·W, C]`` of the ops; prototypes are returned
channels-last ``[B, K, C]``, while the registered initial means keep PCAN's buffer
layout ``[1, C, K]`` (and names) so that PCAN checkpoints' buffers load unchanged.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

import vos_kernels

MEMORY_UPDATES = ("replace", "blend")


def _l2norm(inp: torch.Tensor, dim: int) -> torch.Tensor:
    """PCAN's ``_l2norm``: ``inp / (1e-6 + ‖inp‖)``."""
    return inp / (1e-6 + inp.norm(dim=dim, keepdim=True))


def init_means(channels: int, num_prototypes: int) -> torch.Tensor:
    """PCAN's ``init_protos``: ``[1, C, K]`` random normal with std ``sqrt(2/K)``, then
    L2-normalised over C (``_l2norm``). Uses the global torch generator, as PCAN."""
    protos = torch.empty(1, channels, num_prototypes).normal_(0, math.sqrt(2.0 / num_prototypes))
    return _l2norm(protos, dim=1)


def _pos_int(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
    return v


def _pos_float(v, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name}: expected a finite number > 0, got {v!r}")
    return float(v)


def _kernel(v, name: str = "kernel") -> str:
    if v not in vos_kernels.gmm.KERNELS:
        raise ValueError(f"{name}: expected one of {sorted(vos_kernels.gmm.KERNELS)}, got {v!r}")
    return v


def _unit_float(v, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
        raise ValueError(f"{name}: expected a number in [0, 1], got {v!r}")
    return float(v)


def _feature_map(x, name: str, channels: int, batch: int | None = None) -> torch.Tensor:
    """Check a float feature map ``[B, channels, H, W]`` (B = ``batch`` when given)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor [B, {channels}, H, W], got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != channels or (batch is not None and x.shape[0] != batch):
        b = "B" if batch is None else str(batch)
        raise ValueError(f"{name}: expected shape [{b}, {channels}, H, W], got {list(x.shape)}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{name}: expected a floating-point tensor, got {x.dtype}")
    return x


def _points(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` → channels-last points ``[B, H·W, C]`` (a view; the ops accept strides)."""
    return x.flatten(2).transpose(1, 2)


def _initial(buffer: torch.Tensor, batch: int, like: torch.Tensor) -> torch.Tensor:
    """PCAN's ``mu.repeat(R, 1, 1)`` from a ``[1, C, K]`` buffer → ``[batch, K, C]``."""
    return buffer.to(device=like.device, dtype=like.dtype).transpose(1, 2).expand(batch, -1, -1)


class FramePrototypes(torch.nn.Module):
    """PCAN's frame-level prototypical cross-attention, as ``forward_test`` of
    ``quasi_dense_pcan_seg_refine.py`` runs it (``../shared/spec/gmm.md`` "Frame level").

    Per video, for each of the first ``num_levels`` FPN levels ``i`` (PCAN: stride 4 and 8,
    C = 256), with a memory ``M_i`` of features and running initial means ``m_i``:

    1. frame 0: ``M_i = x_i`` (the frame's own features), ``m_i = mu{i}`` (the buffer);
    2. ``protos = gmm_em(M_i, m_i, T = 3, κ = 20)`` (``_em_iter``: dot kernel, means
       L2-normalised, keys not normalised, no gradient);
    3. ``read = prototype_attention(x_i, protos, protos, κ = 1)`` (``_prop`` and
       ``ref_r = einsum('bck,bnk->bcn', protos, ref_z)``: the key prototypes are the values);
    4. memory update, then ``x_i ← 0.75·x_i + 0.25·read`` (``fuse_weight``) and
       ``m_i ← 0.5·m_i + 0.5·protos`` (``mean_momentum``; not re-normalised, as PCAN).

    Levels past ``num_levels`` are returned unchanged (PCAN fuses levels 0 and 1 only).

    Interpretations (``gmm.md`` vs the released code):

    - ``gmm.md`` (and this wrapper's brief) say "EM on the current features" and "memory
      ``0.75·fused + 0.25·memory``". The released ``forward_test`` runs the EM on the
      *memory* (``protos = self._em_iter(self.memo_banks[i], self.mus[i])``), which holds
      the previous frame's raw, unfused features (``self.memo_banks[i] = x[i]`` before the
      fusion; the current frame's own features at frame 0), and reads the current frame
      against those prototypes. ``memory_update="replace"`` (default) does exactly that.
      ``memory_update="blend"`` keeps gmm.md's line instead: ``M_i ← 0.75·fused + 0.25·M_i``
      (same H, W required from frame to frame); everything else is unchanged.
    - PCAN keeps the memory and running means on the model between calls and resets them
      when ``frame_id == 0``; here :meth:`reset` starts a new video (and the first call
      after construction or reset is frame 0). The memory is stored detached.
    - PCAN repeats ``mu`` over the batch implicitly (``einsum`` broadcasting of a
      ``[1, C, K]`` buffer at B = 1); here the buffers are expanded to B.

    Args:
        channels: C of every fused level (PCAN 256).
        num_prototypes: K per level (PCAN 30).
        num_levels: how many levels, from the first, are fused (PCAN 2).
        num_iters: EM iterations T (PCAN 3).
        kappa: EM softmax scale (PCAN 20). read_kappa: read softmax scale (PCAN 1).
        kernel: ``"dot"`` (PCAN's code) or ``"l2"`` (paper eq. 5.3), for EM and read.
        fuse_weight: weight of the read in the fusion (PCAN 0.25).
        mean_momentum: weight of the old initial means (PCAN 0.5).
        memory_update: ``"replace"`` (PCAN's code) or ``"blend"`` (gmm.md), see above.
        memory_weight: weight of the fused features in the ``"blend"`` update (0.75).

    Buffers: ``mu0`` … ``mu{num_levels-1}``, each ``[1, C, K]`` (PCAN's names and layout):
    normal std ``sqrt(2/K)``, L2-normalised over C.

    Raises:
        ValueError: a non-positive size, kappa or read_kappa, a weight outside [0, 1],
            an unknown memory_update or kernel.
    """

    def __init__(self, channels: int = 256, num_prototypes: int = 30, num_levels: int = 2, num_iters: int = 3,
                 kappa: float = 20.0, read_kappa: float = 1.0, kernel: str = "dot", fuse_weight: float = 0.25,
                 mean_momentum: float = 0.5, memory_update: str = "replace", memory_weight: float = 0.75):
        super().__init__()
        self.channels = _pos_int(channels, "channels")
        self.num_prototypes = _pos_int(num_prototypes, "num_prototypes")
        self.num_levels = _pos_int(num_levels, "num_levels")
        self.num_iters = _pos_int(num_iters, "num_iters")
        self.kappa = _pos_float(kappa, "kappa")
        self.read_kappa = _pos_float(read_kappa, "read_kappa")
        self.kernel = _kernel(kernel)
        self.fuse_weight = _unit_float(fuse_weight, "fuse_weight")
        self.mean_momentum = _unit_float(mean_momentum, "mean_momentum")
        if memory_update not in MEMORY_UPDATES:
            raise ValueError(f"memory_update: expected one of {MEMORY_UPDATES}, got {memory_update!r}")
        self.memory_update = memory_update
        self.memory_weight = _unit_float(memory_weight, "memory_weight")
        for i in range(self.num_levels):
            self.register_buffer(f"mu{i}", init_means(self.channels, self.num_prototypes))
        self.reset()

    def reset(self) -> None:
        """Forget the video: the next :meth:`forward` is frame 0."""
        self.memory: list[torch.Tensor] | None = None      # per level [B, N, C]
        self.means: list[torch.Tensor] | None = None       # per level [B, K, C]
        self.prototypes: list[torch.Tensor] | None = None  # per level [B, K, C], of the last frame

    def initial_means(self, level: int) -> torch.Tensor:
        """The registered initial means of a level, ``[1, C, K]`` (PCAN's ``mu{level}``)."""
        return getattr(self, f"mu{level}")

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """One frame: fuse the first ``num_levels`` levels with their memory's prototypes.

        Args:
            features: FPN levels, each ``[B, C_l, H_l, W_l]`` float; the first
                ``num_levels`` must have ``C_l = channels`` and the batch size of the video.

        Returns:
            list of the levels: fused ``[B, C, H_l, W_l]`` (same dtype) for the first
            ``num_levels``, the others as given. Differentiable w.r.t. the current
            features through the read (EM and memory carry no gradient).

        Raises:
            ValueError: ``features`` not a sequence of at least ``num_levels`` tensors, a
                level of the wrong shape or dtype, a batch size / dtype / device other than
                the video's, or (``"blend"``) a level whose H, W changed.
        """
        if isinstance(features, torch.Tensor) or not isinstance(features, Sequence):
            raise ValueError(f"features: expected a sequence of [B, C, H, W] tensors, got {type(features).__name__}")
        if len(features) < self.num_levels:
            raise ValueError(f"features: expected at least num_levels = {self.num_levels} levels, "
                             f"got {len(features)}")
        first = self.memory is None
        batch = None if first else self.memory[0].shape[0]
        xs = []
        for i in range(self.num_levels):
            x = _feature_map(features[i], f"features[{i}]", self.channels, batch)
            batch = x.shape[0]
            if not first:
                mem = self.memory[i]
                if x.dtype != mem.dtype or x.device != mem.device:
                    raise ValueError(f"features[{i}]: expected {mem.dtype} on {mem.device} like the video's "
                                     f"earlier frames, got {x.dtype} on {x.device}")
                if self.memory_update == "blend" and x.shape[2] * x.shape[3] != mem.shape[1]:
                    raise ValueError(f"features[{i}]: memory_update='blend' needs the same H·W every frame "
                                     f"({mem.shape[1]}), got {list(x.shape)}")
            xs.append(x)

        qs = [_points(x) for x in xs]                                            # [B, N, C] views
        if first:       # frame 0: the memory is the frame itself, the means PCAN's buffers
            prev_memory = [q.detach().contiguous() for q in qs]
            prev_means = [_initial(self.initial_means(i), batch, x) for i, x in enumerate(xs)]
        else:
            prev_memory, prev_means = self.memory, self.means
        out = list(features)
        memory, means, protos_all = [], [], []
        for i, (x, q) in enumerate(zip(xs, qs)):
            B, C, H, W = x.shape
            protos, _ = vos_kernels.gmm_em(prev_memory[i], prev_means[i], self.num_iters, self.kappa,
                                           kernel=self.kernel)                       # [B, K, C], no grad
            read = vos_kernels.prototype_attention(q, protos, protos, self.read_kappa, self.kernel)
            fused = (1.0 - self.fuse_weight) * q + self.fuse_weight * read       # [B, N, C]
            if self.memory_update == "replace":                                  # PCAN: memo_banks[i] = x[i]
                memory.append(q.detach().contiguous())
            else:                                                                # gmm.md's blend
                memory.append((self.memory_weight * fused + (1.0 - self.memory_weight) * prev_memory[i]).detach())
            means.append(self.mean_momentum * prev_means[i] + (1.0 - self.mean_momentum) * protos)
            protos_all.append(protos)
            out[i] = fused.transpose(1, 2).reshape(B, C, H, W)
        self.memory, self.means, self.prototypes = memory, means, protos_all   # committed after every level ran
        return out


class InstancePrototypes(torch.nn.Module):
    """PCAN's instance-level foreground / background prototypes (``EMMatchHeadPlus`` of
    ``em_match_head.py``, ``with_both_feat=False``; ``../shared/spec/gmm.md`` "Instance level").

    For R RoIs with features ``[R, C, h, w]`` (PCAN: 256 × 14 × 14, N = 196) and mask logits
    of a reference frame (a) and the current frame (b):

    1. masks: logits bilinearly resized to the feature grid (``F.interpolate``, as
       PCAN; a no-op at 14 × 14), binarised ``sigmoid(m) ≥ 0.5``; fg mask m, bg mask 1 − m;
    2. ``em_match``: EM on the reference RoI from the buffers ``pos_mu`` / ``neg_mu``
       (``mu.repeat(R, 1, 1)``), then EM on the current RoI from those means: T = 6,
       κ = 20, dot kernel. PCAN makes four ``_em_iter`` calls; here the fg and bg problems
       are one :func:`vos_kernels.gmm_em` launch each time (batch 2R: rows ``0..R-1`` fg,
       ``R..2R-1`` bg; two launches per frame when ``num_fg != num_bg``). An empty mask
       gives zero means (never NaN), as PCAN's ``1e-6`` guards do;
    3. momentum update of the buffers with the mean over the RoIs of the current means:
       ``k̄ ← (1 − λ)·k̄ + λ·mean_R(k)`` (under ``no_grad``);
    4. read (``_prop``): ``softmax`` over the ``num_fg + num_bg`` prototypes of
       ``μ_kᵀx_n`` (κ = 1) on the current features; the first ``num_fg`` summed → fg map,
       the last ``num_bg`` → bg map: one :func:`vos_kernels.prototype_attention` call whose
       values are the ``[K, 2]`` fg / bg indicator.

    Interpretations:

    - λ: the paper's ``k̄ = (1 − λ)k̄ + λk`` with λ = 0.2 (its best value) is the default.
      The released code uses ``momentum = 0.95`` on the old value, i.e. λ = 0.05, and
      updates on every call, training and test alike; so does this module unless
      ``update_prototypes=False``.
    - Value prototypes: ``EMMatchHeadPlus`` keeps only the key prototypes; PCAN's
      ``hr_em_match_head.py`` also forms ``nu = l2norm(einsum('ocn,rnk->rck', y, z̄))``.
      With ``values`` given, :meth:`forward` returns those for the current EM:
      :func:`vos_kernels.prototype_values` of the values with the last E-step's
      responsibilities, L2-normalised over the channels as ``nu`` is.

    Args:
        channels: C (PCAN 256).
        num_fg, num_bg: prototypes per RoI (PCAN's ``pos_proto_num``, ``neg_proto_num``;
            10 and 10 here by default).
        num_iters: EM iterations (PCAN 6). kappa: EM scale (PCAN 20).
        read_kappa: read scale (PCAN 1). kernel: ``"dot"`` (code) or ``"l2"`` (paper).
        momentum: λ of the buffer update (paper 0.2; code 0.05).
        update_prototypes: apply the buffer update in :meth:`em_match`.
        mask_threshold: binarisation threshold on ``sigmoid(logit)`` (PCAN 0.5).

    Buffers: ``pos_mu [1, C, num_fg]`` and ``neg_mu [1, C, num_bg]`` (PCAN's names and
    layout): normal std ``sqrt(2/K)``, L2-normalised over C.

    Raises:
        ValueError: bad sizes, kappa, momentum or kernel.
    """

    def __init__(self, channels: int = 256, num_fg: int = 10, num_bg: int = 10, num_iters: int = 6,
                 kappa: float = 20.0, read_kappa: float = 1.0, kernel: str = "dot", momentum: float = 0.2,
                 update_prototypes: bool = True, mask_threshold: float = 0.5):
        super().__init__()
        self.channels = _pos_int(channels, "channels")
        self.num_fg = _pos_int(num_fg, "num_fg")
        self.num_bg = _pos_int(num_bg, "num_bg")
        self.num_iters = _pos_int(num_iters, "num_iters")
        self.kappa = _pos_float(kappa, "kappa")
        self.read_kappa = _pos_float(read_kappa, "read_kappa")
        self.kernel = _kernel(kernel)
        self.momentum = _unit_float(momentum, "momentum")
        if not isinstance(update_prototypes, bool):
            raise ValueError(f"update_prototypes: expected a bool, got {update_prototypes!r}")
        self.update_prototypes = update_prototypes
        self.mask_threshold = _unit_float(mask_threshold, "mask_threshold")
        self.register_buffer("pos_mu", init_means(self.channels, self.num_fg))
        self.register_buffer("neg_mu", init_means(self.channels, self.num_bg))

    def binarize(self, mask_logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """PCAN's ``F.interpolate(mask, size, mode='bilinear')`` then
        ``(mask.sigmoid() >= 0.5).float()``: ``[R, 1, h', w']`` logits → ``[R, h·w]`` in {0, 1}."""
        m = F.interpolate(mask_logits, size=size, mode="bilinear", align_corners=False)
        return (m.sigmoid() >= self.mask_threshold).to(mask_logits.dtype).flatten(1)

    def _em(self, x: torch.Tensor, mask: torch.Tensor, fg_init: torch.Tensor, bg_init: torch.Tensor):
        """fg problem (mask) and bg problem (1 − mask) of ``x [R, N, C]``; one gmm_em launch when
        K_fg = K_bg. Returns ``(fg_means, bg_means, fg_resp, bg_resp)``."""
        R = x.shape[0]
        if self.num_fg == self.num_bg:
            mu, resp = vos_kernels.gmm_em(torch.cat([x, x], 0),
                                          torch.cat([fg_init, bg_init], 0), self.num_iters, self.kappa,
                                          torch.cat([mask, 1 - mask], 0), self.kernel)
            return mu[:R], mu[R:], resp[:R], resp[R:]
        fg, fg_resp = vos_kernels.gmm_em(x, fg_init, self.num_iters, self.kappa, mask, self.kernel)
        bg, bg_resp = vos_kernels.gmm_em(x, bg_init, self.num_iters, self.kappa, 1 - mask, self.kernel)
        return fg, bg, fg_resp, bg_resp

    def _check(self, ref_feats, ref_mask_logits, feats, mask_logits) -> None:
        feats = _feature_map(feats, "feats", self.channels)
        R = feats.shape[0]
        _feature_map(ref_feats, "ref_feats", self.channels, R)
        for name, m in (("ref_mask_logits", ref_mask_logits), ("mask_logits", mask_logits)):
            if not isinstance(m, torch.Tensor) or m.dim() != 4 or m.shape[0] != R or m.shape[1] != 1 \
                    or not m.dtype.is_floating_point:
                got = f"shape {list(m.shape)} {m.dtype}" if isinstance(m, torch.Tensor) else type(m).__name__
                raise ValueError(f"{name}: expected float mask logits [R={R}, 1, h, w], got {got}")
        for name, t in (("ref_feats", ref_feats), ("ref_mask_logits", ref_mask_logits),
                        ("mask_logits", mask_logits)):
            if t.dtype != feats.dtype or t.device != feats.device:
                raise ValueError(f"{name}: expected {feats.dtype} on {feats.device} like feats, "
                                 f"got {t.dtype} on {t.device}")

    def em_match(self, ref_feats: torch.Tensor, ref_mask_logits: torch.Tensor, feats: torch.Tensor,
                 mask_logits: torch.Tensor):
        """PCAN's ``em_match`` (without the read): reference EM from the buffers, current EM
        from the reference means, then the buffer momentum update.

        Args:
            ref_feats, feats: ``[R, C, h, w]`` RoI features of the reference and current
                frame (PCAN: both 14 × 14; the grids may differ).
            ref_mask_logits, mask_logits: ``[R, 1, h', w']`` mask logits (any h', w';
                resized bilinearly to their features' grid), same dtype and device.

        Returns:
            ``(fg_means [R, num_fg, C], bg_means [R, num_bg, C], fg_resp [R, h·w, num_fg],
            bg_resp [R, h·w, num_bg])`` of the current frame's EM (resp: the last E-step's
            masked softmax). No gradient.

        Raises:
            ValueError: shapes, dtypes or devices that do not match (names the argument).
        """
        self._check(ref_feats, ref_mask_logits, feats, mask_logits)
        R = feats.shape[0]
        xa, xb = _points(ref_feats), _points(feats)
        ma = self.binarize(ref_mask_logits, tuple(ref_feats.shape[2:]))
        mb = self.binarize(mask_logits, tuple(feats.shape[2:]))
        fg_a, bg_a, _, _ = self._em(xa, ma, _initial(self.pos_mu, R, xa), _initial(self.neg_mu, R, xa))
        fg, bg, fg_resp, bg_resp = self._em(xb, mb, fg_a, bg_a)
        if self.update_prototypes:
            with torch.no_grad():
                lam = self.momentum
                self.pos_mu.mul_(1 - lam).add_(lam * fg.mean(0, keepdim=True).transpose(1, 2).to(self.pos_mu.dtype))
                self.neg_mu.mul_(1 - lam).add_(lam * bg.mean(0, keepdim=True).transpose(1, 2).to(self.neg_mu.dtype))
        return fg, bg, fg_resp, bg_resp

    def read(self, feats: torch.Tensor, fg_means: torch.Tensor, bg_means: torch.Tensor) -> torch.Tensor:
        """PCAN's ``_prop``: fg / bg attention maps of ``feats [R, C, h, w]`` over the
        prototypes ``fg_means [R, num_fg, C]`` and ``bg_means [R, num_bg, C]``.

        Returns:
            ``[R, 2, h, w]``: channel 0 = Σ of the softmax over the fg prototypes (PCAN's
            ``pos_z``), channel 1 = over the bg prototypes (``neg_z``); they sum to 1.
            Differentiable w.r.t. feats and the means.
        """
        R, _, h, w = _feature_map(feats, "feats", self.channels).shape
        keys = torch.cat([fg_means, bg_means], 1)                                   # [R, K, C]
        ind = torch.zeros(self.num_fg + self.num_bg, 2, dtype=keys.dtype, device=keys.device)
        ind[:self.num_fg, 0] = 1
        ind[self.num_fg:, 1] = 1
        maps = vos_kernels.prototype_attention(_points(feats), keys, ind.expand(R, -1, -1), self.read_kappa,
                                               self.kernel)                         # [R, N, 2]
        return maps.transpose(1, 2).reshape(R, 2, h, w)

    def forward(self, ref_feats: torch.Tensor, ref_mask_logits: torch.Tensor, feats: torch.Tensor,
                mask_logits: torch.Tensor, values: torch.Tensor | None = None):
        """:meth:`em_match` then :meth:`read` on the current features.

        Args:
            ref_feats, ref_mask_logits, feats, mask_logits: as :meth:`em_match`.
            values: optional ``[R, CV, h, w]`` features of the current frame for value
                prototypes (``nu``).

        Returns:
            ``[R, 2, h, w]`` fg / bg maps (same dtype as feats); with ``values``, also
            ``nu [R, num_fg + num_bg, CV]`` (fg then bg prototypes), differentiable w.r.t.
            values. R = 0 gives empty outputs and leaves the buffers alone.

        Raises:
            ValueError: shapes, dtypes or devices that do not match (names the argument).
        """
        if isinstance(feats, torch.Tensor) and feats.dim() == 4 and feats.shape[0] == 0:
            maps = feats.new_zeros(0, 2, *feats.shape[2:])
            return maps if values is None else (maps, feats.new_zeros(0, self.num_fg + self.num_bg, values.shape[1]))
        fg, bg, fg_resp, bg_resp = self.em_match(ref_feats, ref_mask_logits, feats, mask_logits)
        maps = self.read(feats, fg, bg)
        if values is None:
            return maps
        R = feats.shape[0]
        if not isinstance(values, torch.Tensor) or values.dim() != 4 or values.shape[0] != R \
                or values.shape[2:] != feats.shape[2:] or values.dtype != feats.dtype:
            got = list(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
            raise ValueError(f"values: expected {feats.dtype} [R={R}, CV, {feats.shape[2]}, {feats.shape[3]}], "
                             f"got {got}")
        v = _points(values)
        nu = torch.cat([vos_kernels.prototype_values(v, fg_resp), vos_kernels.prototype_values(v, bg_resp)], 1)
        return maps, _l2norm(nu, dim=2)
