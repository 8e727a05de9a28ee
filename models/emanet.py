"""EMANet's Expectation-Maximization Attention Unit on the fused GMM op.

Source: EMANet (Li et al., ICCV 2019, "Expectation-Maximization Attention Networks for
Semantic Segmentation"), ``XiaLiPKU/EMANet``: ``network.py`` class ``EMAU`` (the unit) and
``train.py`` ``Session.train_batch`` (the moving average of the bases). mmsegmentation's
``ema_head.py`` (``EMAModule``) is the same unit.

Equations (paper section 3.2): E-step ``Z = softmax_K(λ·X·μ)`` (eq. 12, λ = 1 in the
code), M-step ``μ_k = Σ_n z̄_nk x_n`` with ``z̄ = Z / (1e-6 + Σ_n Z)`` (eq. 13), bases
L2-normalised; reconstruction ``X̃ = Z·μᵀ`` (eq. 14) with the last E-step's Z (not
column-normalised); bases moving average ``μ̄ ← α·μ̄ + (1 − α)·mean_B(μ_T)``, α = 0.9
(section 3.2.3, training only).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import vos_kernels

from .pcan import _feature_map, _kernel, _l2norm, _pos_float, _pos_int, _unit_float


class EMAU(torch.nn.Module):
    """EMANet's ``EMAU``: 1×1 conv, EM attention with :func:`vos_kernels.gmm_em`, ReLU,
    1×1 conv (no bias) + norm, residual, ReLU.

    ``forward(x)``, ``x [B, C, H, W]`` (EMANet's layout; reshaped to the op's channels-last
    ``[B, N = H·W, C]`` internally):

    1. ``h = conv1(x)``;
    2. ``μ, z = gmm_em(h, mu (repeated over B), T, κ = 1, kernel "dot",
       normalize_means=True)`` (EMANet's ``stage_num`` loop of ``bmm``, ``softmax``,
       ``_l2norm``);
    3. ``y = relu(μ·zᵀ)`` reshaped to ``[B, C, H, W]``;
    4. ``out = relu(conv2(y) + x)`` (``conv2`` = 1×1 conv without bias, then the norm layer);
    5. training only: ``mu ← momentum·mu + (1 − momentum)·mean_B(μ)`` under ``no_grad``
       (EMANet does this in ``train.py`` with the returned ``mu``; mmsegmentation inside the
       module). Eval leaves ``mu`` alone.

    Gradients: EMANet runs the EM under ``torch.no_grad()``, so μ and z carry no gradient
    and the reconstruction is a constant w.r.t. the parameters: the network trains
    ``conv2`` and the norm through the reconstruction (and everything before ``x``
    through the residual), but not through the EM, and ``conv1`` receives no gradient at
    all. The same holds here (:func:`vos_kernels.gmm_em` never carries a gradient).

    Interpretations: EMANet does not re-normalise ``mu`` after the moving average
    (mmsegmentation does, with its ``momentum = 0.1`` on the new value); this follows
    EMANet. EMANet's norm layer is ``SynchronizedBatchNorm2d`` with ``momentum = 3e-4``;
    the default here is ``torch.nn.BatchNorm2d`` with its own defaults (pass
    ``norm_layer``). Initialisation as EMANet: conv weights normal with std
    ``sqrt(2 / (k·k·out_channels))``, norm weight 1 and bias 0, conv1's bias left at
    PyTorch's default.

    Args:
        channels: C, input and output channels (EMANet 512).
        num_bases: K (EMANet 64).
        num_iters: EM iterations (EMANet ``stage_num`` 3).
        kappa: E-step scale (EMANet 1). kernel: ``"dot"`` (EMANet) or ``"l2"``.
        momentum: α of the moving average (EMANet ``EM_MOM`` 0.9).
        norm_layer: callable ``(channels) -> Module`` for conv2's norm.

    Buffer: ``mu [1, C, K]`` (EMANet's name and layout): normal std ``sqrt(2/K)``,
    L2-normalised over C.

    Raises:
        ValueError: non-positive sizes or kappa, momentum outside [0, 1], unknown kernel.
    """

    def __init__(self, channels: int = 512, num_bases: int = 64, num_iters: int = 3, kappa: float = 1.0,
                 kernel: str = "dot", momentum: float = 0.9, norm_layer=torch.nn.BatchNorm2d):
        super().__init__()
        self.channels = _pos_int(channels, "channels")
        self.num_bases = _pos_int(num_bases, "num_bases")
        self.num_iters = _pos_int(num_iters, "num_iters")
        self.kappa = _pos_float(kappa, "kappa")
        self.kernel = _kernel(kernel)
        self.momentum = _unit_float(momentum, "momentum")

        mu = torch.empty(1, channels, num_bases).normal_(0, math.sqrt(2.0 / num_bases))
        self.register_buffer("mu", _l2norm(mu, dim=1))
        self.conv1 = torch.nn.Conv2d(channels, channels, 1)
        self.conv2 = torch.nn.Sequential(torch.nn.Conv2d(channels, channels, 1, bias=False), norm_layer(channels))
        for m in self.modules():
            if isinstance(m, torch.nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / n))
            elif isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.weight.data.fill_(1)
                if m.bias is not None:
                    m.bias.data.zero_()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Args:
            x: ``[B, C, H, W]`` float features (EMANet: ``fc0``'s output, stride 8).

        Returns:
            ``(out [B, C, H, W], mu [B, C, K])``, as EMANet's ``EMAU.forward``: the output
            and the per-image bases of the last M-step (channels-first, EMANet's layout;
            no gradient).

        Raises:
            ValueError: ``x`` not ``[B, channels, H, W]`` float.
        """
        _feature_map(x, "x", self.channels)
        idn = x
        h = self.conv1(x)
        B, C, H, W = h.shape
        mu0 = self.mu.to(h.dtype).transpose(1, 2).expand(B, -1, -1)            # [B, K, C]
        mu, z = vos_kernels.gmm_em(h.flatten(2).transpose(1, 2), mu0, self.num_iters, self.kappa,
                                   kernel=self.kernel)                          # [B, K, C], [B, N, K]
        y = torch.bmm(z, mu).transpose(1, 2).reshape(B, C, H, W)               # μ·zᵀ
        y = F.relu(y)
        out = F.relu(self.conv2(y) + idn)
        mu = mu.transpose(1, 2)                                                 # [B, C, K]
        if self.training:
            with torch.no_grad():
                self.mu.mul_(self.momentum).add_((1.0 - self.momentum) * mu.mean(0, keepdim=True).to(self.mu.dtype))
        return out, mu
