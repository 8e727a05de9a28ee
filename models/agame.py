"""A-GAME's generative appearance module on the fused diagonal-Gaussian ops.

Source: A-GAME (Johnander et al., CVPR 2019, "A Generative Appearance Model for End-to-end
Video Object Segmentation"), ``joakimjohnander/agame-vos``: ``models/agame_model.py``
class ``GaussiansAgame`` (``get_init_state``, ``update``, ``forward``), built by ``AGAME``
with ``('GaussiansAgame', (2048, 512, .1, -2))``, ``residual=True``, ``covest=True``.

Equations (paper section 3.2): per component k a diagonal Gaussian fitted with soft
weights ``w`` (eq. 3–4 with A-GAME's ``1/N`` regulariser, ``S_k = Σ_n w_nk``):
``μ_k = Σ_n w_nk x_n / (1 + S_k)``, ``σ²_k = softplus(r_k) + Σ_n w_nk (x_n − μ_k)² / (1 + S_k)``
(:func:`vos_kernels.diag_gmm_fit`); log-likelihood
``s_k(x) = −½ Σ_d (log σ²_kd + (x_d − μ_kd)² / σ²_kd)`` (eq. 5 without ``2π`` and prior;
:func:`vos_kernels.diag_gmm_log_prob`); components 0 = background, 1 = target, 2 and 3 =
their distractors, fitted with the residuals ``relu(p_i − y_i)`` of the two-component
posterior ``p = softmax(s_0, s_1)`` (eq. 6); online update ``θ ← (1 − λ)·θ + λ·θ_new``,
λ = 0.1 (eq. 7). Everything is differentiable: A-GAME trains by unrolling 8 frames
(then 14), and both ops have autograd.

Layout: features ``[B, C_in, H, W]`` (A-GAME's ``feats['s16']``) and segmentations
``[B, 2, H, W]`` on the same grid; the component parameters are channels-last
``[B, 4, D]`` (A-GAME keeps lists of ``[B, D, 1, 1]`` tensors).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

import vos_kernels

from .pcan import _feature_map, _pos_int, _unit_float

NUM_COMPONENTS = 4


class AgameState(NamedTuple):
    """The appearance model of one object: ``mean`` and ``var`` ``[B, 4, D]``, components
    0 = bg, 1 = fg, 2 = bg distractor, 3 = fg distractor (A-GAME's ``state['appmod']``)."""
    mean: torch.Tensor
    var: torch.Tensor


class GaussiansAgame(torch.nn.Module):
    """A-GAME's appearance module ``GaussiansAgame`` (``residual=True, covest=True``).

    ``conv_in`` (1×1, ``C_in → D``, Kaiming-uniform weight) projects the stride-16
    features; ``cov_reg [4, D]`` (init ``cov_reg_init`` = −2) regularises the variances
    through ``var_reg = softplus(cov_reg)``.

    - :meth:`get_init_state` ``(feats, seg)``: fit components 0 and 1 with the two
      segmentation channels (``diag_gmm_fit``), score the frame with them, ``p`` = 2-way
      softmax, fit components 2 and 3 with ``relu(p_0 − y_0)`` and ``relu(p_1 − y_1)``.
    - :meth:`update` ``(feats, seg, state)``: ``θ = (1 − lr)·θ_old + lr·θ_new`` on means and
      variances, θ_new from :meth:`get_init_state`.
    - :meth:`forward` ``(feats, state)``: the raw 4 log-likelihood scores ``[B, 4, H, W]``
      (A-GAME passes them to the fusion conv; A-GAME's forward also returns the state
      unchanged, this one returns the scores only).

    The segmentation ``seg [B, 2, H, W]`` (``y_0`` = background, ``y_1`` = object,
    ``y_0 + y_1 = 1``) must already be on the feature grid: as in A-GAME, the caller
    average-pools it (``F.avg_pool2d(label_maps, 16)`` for a given mask,
    ``softmax(coarse_segscore)`` for predictions); :meth:`pool_segmentation` does the
    first. The sum is not checked (A-GAME does not).

    Interpretations: ``cov_reg`` is ``[4, D]`` here, A-GAME's is ``[4, 1, D, 1, 1]``;
    loading an A-GAME state dict reshapes it (``_load_from_state_dict``), and ``conv_in``
    keeps A-GAME's parameter names.

    Args:
        in_channels: C_in (A-GAME: 2048, ResNet-101 layer4).
        channels: D (A-GAME 512).
        lr: λ of :meth:`update` (A-GAME 0.1).
        cov_reg_init: initial ``cov_reg`` (A-GAME −2).

    Raises:
        ValueError: non-positive sizes, lr outside [0, 1], a non-finite cov_reg_init.
    """

    def __init__(self, in_channels: int = 2048, channels: int = 512, lr: float = 0.1, cov_reg_init: float = -2.0):
        super().__init__()
        self.in_channels = _pos_int(in_channels, "in_channels")
        self.channels = _pos_int(channels, "channels")
        self.lr = _unit_float(lr, "lr")
        if isinstance(cov_reg_init, bool) or not isinstance(cov_reg_init, (int, float)) \
                or not float("-inf") < cov_reg_init < float("inf"):
            raise ValueError(f"cov_reg_init: expected a finite number, got {cov_reg_init!r}")
        self.conv_in = torch.nn.Conv2d(in_channels, channels, 1)
        self.cov_reg = torch.nn.Parameter(float(cov_reg_init) * torch.ones(NUM_COMPONENTS, channels))
        torch.nn.init.kaiming_uniform_(self.conv_in.weight)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "cov_reg"
        if key in state_dict and state_dict[key].dim() == 5:           # A-GAME's [4, 1, D, 1, 1]
            state_dict[key] = state_dict[key].reshape(state_dict[key].shape[0], -1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @staticmethod
    def pool_segmentation(labels: torch.Tensor, object_id: int, stride: int = 16) -> torch.Tensor:
        """A-GAME's ``F.avg_pool2d(cat([labels != id, labels == id]).float(), 16)``:
        integer ``labels [B, 1, H, W]`` → soft ``[B, 2, H/stride, W/stride]`` (float32)."""
        if not isinstance(labels, torch.Tensor) or labels.dim() != 4 or labels.shape[1] != 1 \
                or labels.dtype.is_floating_point:
            got = list(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
            raise ValueError(f"labels: expected integer labels [B, 1, H, W], got {got}")
        seg = torch.cat([labels != object_id, labels == object_id], dim=1).float()
        return F.avg_pool2d(seg, stride)

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        """``conv_in(feats)`` as channels-last points ``[B, H·W, D]``."""
        _feature_map(feats, "feats", self.in_channels)
        return self.conv_in(feats).flatten(2).transpose(1, 2)

    def _seg(self, seg, feats: torch.Tensor) -> torch.Tensor:
        B, _, H, W = feats.shape
        if not isinstance(seg, torch.Tensor) or list(seg.shape) != [B, 2, H, W] or not seg.dtype.is_floating_point:
            got = f"shape {list(seg.shape)} {seg.dtype}" if isinstance(seg, torch.Tensor) else type(seg).__name__
            raise ValueError(f"seg: expected a float [B={B}, 2, H={H}, W={W}] segmentation on the feature grid "
                             f"(avg-pool it first), got {got}")
        if seg.device != feats.device:
            raise ValueError(f"seg: expected a tensor on {feats.device} like feats, got {seg.device}")
        return seg.to(feats.dtype).flatten(2).transpose(1, 2)                  # [B, N, 2]

    def _state(self, state, feats: torch.Tensor) -> AgameState:
        B = feats.shape[0]
        shape = [B, NUM_COMPONENTS, self.channels]
        if not isinstance(state, tuple) or len(state) != 2 or not all(isinstance(t, torch.Tensor) for t in state) \
                or any(list(t.shape) != shape for t in state):
            got = [list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in state] \
                if isinstance(state, tuple) else type(state).__name__
            raise ValueError(f"state: expected (mean, var), each {shape}, got {got}")
        return AgameState(*state)

    def get_init_state(self, feats: torch.Tensor, seg: torch.Tensor) -> AgameState:
        """Fit the four components on a frame.

        Args:
            feats: ``[B, C_in, H, W]`` features.
            seg: ``[B, 2, H, W]`` soft segmentation on the feature grid (bg, object).

        Returns:
            :class:`AgameState` ``(mean [B, 4, D], var [B, 4, D])``, differentiable w.r.t.
            ``conv_in``, ``cov_reg``, feats and seg.

        Raises:
            ValueError: feats or seg of the wrong shape / dtype / device.
        """
        x = self.project(feats)                                                 # [B, N, D]
        y = self._seg(seg, feats)
        var_reg = F.softplus(self.cov_reg).to(x.dtype)                          # [4, D]
        mean01, var01 = vos_kernels.diag_gmm_fit(x, y, var_reg[:2])
        p = torch.softmax(vos_kernels.diag_gmm_log_prob(x, mean01, var01), dim=2)   # [B, N, 2]
        residual = F.relu(p - y)
        mean23, var23 = vos_kernels.diag_gmm_fit(x, residual, var_reg[2:])
        return AgameState(torch.cat([mean01, mean23], 1), torch.cat([var01, var23], 1))

    def update(self, feats: torch.Tensor, seg: torch.Tensor, state: AgameState) -> AgameState:
        """``θ = (1 − lr)·θ_old + lr·θ_new`` with θ_new = :meth:`get_init_state` ``(feats, seg)``.

        Raises:
            ValueError: feats, seg or state of the wrong shape / dtype / device.
        """
        old = self._state(state, feats)
        new = self.get_init_state(feats, seg)
        return AgameState((1 - self.lr) * old.mean + self.lr * new.mean, (1 - self.lr) * old.var + self.lr * new.var)

    def forward(self, feats: torch.Tensor, state: AgameState) -> torch.Tensor:
        """The 4 raw log-likelihood scores of every feature-grid position.

        Args:
            feats: ``[B, C_in, H, W]``. state: :class:`AgameState` (or a ``(mean, var)`` tuple).

        Returns:
            ``[B, 4, H, W]``: ``s_k = −½ Σ_d (log var_kd + (x_d − μ_kd)² / var_kd)``.

        Raises:
            ValueError: feats or state of the wrong shape.
        """
        x = self.project(feats)
        st = self._state(state, feats)
        B, _, H, W = feats.shape
        return vos_kernels.diag_gmm_log_prob(x, st.mean, st.var).transpose(1, 2).reshape(B, NUM_COMPONENTS, H, W)
