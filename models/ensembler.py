"""A small CFBI+-style collaborative ensembler: the decoder after a CFBI+ matching head.

Source: CFBI+ (Yang, Wei and Yang, TPAMI 2021, "Collaborative Video Object Segmentation by
Multi-Scale Foreground-Background Integration"), ``z-x-yang/CFBI``:
``networks/cfbi/ensembler.py`` class ``CollaborativeEnsemblerMS`` (CFBI+, three scales)
and class ``CollaborativeEnsembler`` (CFBI, stride 4 only); the ``IA_gate`` of
``networks/layers/attention.py``; the GCT ``Bottleneck`` of ``networks/layers/gct.py``.
GCT: Yang et al., CVPR 2020, "Gated Channel Transformation for Visual Recognition" (l2
mode). The code here is written from the papers' and the repository's described structure,
not copied.

What it computes (``N_obj`` = all objects of the batch, background included; objects are
the batch dimension, ``A`` = guidance width, ``E`` = ``embed_dim``, ``R`` = ``refine_dim``;
every stage below is preceded by an :class:`IAGate` on the guidance):

1. stride 4: ``Bottleneck(Cin_4 → E)``, ``Bottleneck(E → E, dilation 2)``; the result is the
   stage-1 skip;
2. stride 8: ``Bottleneck(E → 2E, stride 2)``, concat the stride-8 input,
   ``Bottleneck(2E + Cin_8 → 2E, dilation 2)``, ``Bottleneck(2E → 2E, dilation 4)``;
3. stride 16: the same with the stride-16 input;
4. ASPP-lite ``2E → E``;
5. decoder: bicubic (``align_corners=True``) upsampling to the stride-4 size; skip =
   ``[low-level backbone feature of the object's sample, stage-1 output]`` through GCT,
   1×1 conv, GroupNorm, ReLU to ``R``; concat; 3×3 conv + GN + ReLU to ``E/2``; 3×3 conv +
   GN + ReLU;
6. per-object 1×1 conv whose weight and bias are a Linear of the guidance
   (``IA_final_fg`` / ``IA_final_bg``), giving the fg and bg logits ``[N_obj, 1, h4, w4]``;
7. background augmentation, per sample with ``O_n > 1`` objects: the background entry's
   (index 0) logit gets ``+ min_{j=1..O_n-1} bg_logit_j``; the sample's prediction is
   ``[1, O_n, h4, w4]``.

With one scale (``len(in_channels) == 1``, CFBI's ``CollaborativeEnsembler``) stages 2 and
3 run without their concat.

Differences from CFBI+ (``CollaborativeEnsemblerMS`` as configured in the CFBI+ release):

- Widths: defaults ``embed_dim = 64``, ``refine_dim = 32`` (CFBI+: 256 and 64); the
  low-level width is an argument (CFBI+: 256, ResNet-101 ``layer1``); the guidance width
  is an argument (CFBI+: the 4·C instance-level fg/bg means of its matching head).
- ASPP: an ASPP-lite of this module (1×1 branch, 3×3 branches at dilations 2 and 4, an
  image-pooling branch, each ``E`` wide with GN + ReLU, concat, 1×1 projection to ``E`` +
  GN + ReLU) instead of CFBI's ``networks/layers/aspp.py``, the DeepLabV3+ ASPP
  (DeepLabV3+: three 3×3 branches at rates 6 / 12 / 18; in CFBI+ 2E = 512 in, E = 256
  out). Its exact branch widths and norms are not reproduced. The layer counts of the
  three stages, the gates and the decoder are CFBI+'s.
- GroupNorm groups: ``gcd(C, min(32, C // 2))`` (at least 1) for every norm of ``C``
  channels, which always divides ``C``, equals CFBI's 32 for ``C = 256`` and keeps at least
  two channels per group when ``C >= 2`` (so the image-pooling branch's 1×1 map is not
  normalised to its bias alone). CFBI uses fixed counts (e.g. ``GroupNorm(32, E/2)`` and
  ``GroupNorm(R/4, R)`` in the decoder), which require CFBI's widths.
- Bottleneck width: ``planes = max(1, out // 4)`` (expansion 4, as CFBI).
- Batching: all objects of all samples run as one batch and the low-level feature is
  repeated per object of its sample; CFBI calls the ensembler once per sample. Every norm
  is a per-instance GroupNorm, so the two are equivalent (objects are independent).
- Sizes: before each concat, if the stride-2 output's size differs from the next scale's
  input (odd sizes), the stage output is resized to the input's size with bilinear
  interpolation (``align_corners=True``); CFBI assumes the sizes match.
- The guidance is a single tensor ``[N_obj, A]`` (CFBI+ passes a list and uses entry 0).
- The per-object logit is an ``einsum`` (CFBI: a grouped conv), and the background minimum
  is ``amin`` (on ties the gradient is shared among the minima; CFBI's ``torch.min``
  gives it to one): same values.
- Top-level attribute names follow ``CollaborativeEnsemblerMS`` (``S1_IA1``, ``S1_layer1``,
  ..., ``ASPP_IA``, ``ASPP``, ``GCT_sc``, ``conv_sc``, ``bn_sc``, ``IA10``, ``conv1``,
  ``bn1``, ``IA11``, ``conv2``, ``bn2``, ``IA_final_fg``, ``IA_final_bg``); the internals of
  the Bottleneck and ASPP-lite are this module's own, so CFBI checkpoints do not load as is.

Initialisation as CFBI: convolutions kaiming normal (``fan_out``, ``relu``), no conv bias
(each conv is followed by a GroupNorm), GroupNorm weight 1 and bias 0, GCT ``alpha`` 1,
``gamma`` 0, ``beta`` 0 (so every GCT gate is exactly 1 at initialisation and ``alpha``
receives a zero gradient until ``gamma`` moves), Linear layers PyTorch's default.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .pcan import _pos_int

__all__ = ["GCT", "ASPPLite", "Bottleneck", "CollaborativeEnsembler", "IAGate", "gn_groups"]


def gn_groups(channels: int) -> int:
    """GroupNorm group count used here: ``gcd(C, min(32, C // 2))``, at least 1.

    Always divides ``C``; 32 for ``C = 256`` (CFBI's count); two or more channels per group
    whenever ``C >= 2``."""
    return max(1, math.gcd(channels, max(1, min(32, channels // 2))))


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(gn_groups(channels), channels)


class IAGate(nn.Module):
    """CFBI's instance-attention gate ``IA_gate``: ``x · (1 + tanh(IA(guidance)))``.

    Args:
        guidance_dim: A, width of the guidance vector.
        channels: C, channels of the gated map; ``IA = Linear(A, C)`` (state_dict keys
            ``IA.weight``, ``IA.bias``, as CFBI).

    ``forward(x, guidance)``: ``x [N, C, H, W]``, ``guidance [N, A]`` (same floating dtype),
    returns ``[N, C, H, W]``: ``x * (1 + tanh(IA(guidance)))[:, :, None, None]``.
    """

    def __init__(self, guidance_dim: int, channels: int):
        super().__init__()
        self.IA = nn.Linear(_pos_int(guidance_dim, "guidance_dim"), _pos_int(channels, "channels"))

    def forward(self, x: Tensor, guidance: Tensor) -> Tensor:
        gate = 1.0 + torch.tanh(self.IA(guidance))
        return x * gate[:, :, None, None]


class GCT(nn.Module):
    """Gated Channel Transformation (Yang et al., CVPR 2020), l2 mode.

    ``s = sqrt(Σ_{H,W} x² + ε)·α``, ``ŝ = γ / sqrt(mean_C(s²) + ε)``,
    ``out = x · (1 + tanh(s·ŝ + β))``, ε = 1e-5; ``alpha`` (ones), ``gamma`` and ``beta``
    (zeros) are ``[1, C, 1, 1]``. ``x [N, C, H, W]`` → same shape.
    """

    def __init__(self, channels: int, epsilon: float = 1e-5):
        super().__init__()
        _pos_int(channels, "channels")
        self.alpha = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.epsilon = float(epsilon)

    def forward(self, x: Tensor) -> Tensor:
        embedding = (x.pow(2).sum(dim=(2, 3), keepdim=True) + self.epsilon).sqrt() * self.alpha
        norm = self.gamma / (embedding.pow(2).mean(dim=1, keepdim=True) + self.epsilon).sqrt()
        return x * (1.0 + torch.tanh(embedding * norm + self.beta))


class Bottleneck(nn.Module):
    """CFBI's GCT bottleneck: GCT, 1×1 conv to ``planes = max(1, out // 4)``, GN, ReLU,
    3×3 conv (``stride``, ``dilation``, padding = dilation), GN, ReLU, 1×1 conv to ``out``,
    GN; plus the residual (identity, or 1×1 conv with ``stride`` + GN when the shape
    changes), then ReLU. ``[N, in, H, W]`` → ``[N, out, ceil(H/stride), ceil(W/stride)]``.
    """

    expansion = 4

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        planes = max(1, out_channels // self.expansion)
        self.gct = GCT(in_channels)
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = _norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = _norm(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = _norm(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), _norm(out_channels)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(self.gct(x))))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        residual = x if self.downsample is None else self.downsample(x)
        return F.relu(out + residual)


class ASPPLite(nn.Module):
    """A small ASPP: a 1×1 branch, one 3×3 branch per dilation, an image-pooling branch
    (global mean, 1×1 conv), each ``out`` wide with GN + ReLU; concat; 1×1 projection to
    ``out`` + GN + ReLU. ``[N, in, H, W]`` → ``[N, out, H, W]``."""

    def __init__(self, in_channels: int, out_channels: int, dilations: Sequence[int] = (2, 4)):
        super().__init__()
        branches = [nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), _norm(out_channels), nn.ReLU())]
        for d in dilations:
            branches.append(
                nn.Sequential(
                    nn.Conv2d(in_channels, out_channels, 3, padding=d, dilation=d, bias=False),
                    _norm(out_channels),
                    nn.ReLU(),
                )
            )
        self.branches = nn.ModuleList(branches)
        self.pool = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False), _norm(out_channels), nn.ReLU())
        self.project = nn.Sequential(
            nn.Conv2d(out_channels * (len(branches) + 1), out_channels, 1, bias=False), _norm(out_channels), nn.ReLU()
        )

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        outs = [b(x) for b in self.branches]
        pooled = self.pool(x.mean(dim=(2, 3), keepdim=True))
        outs.append(pooled.expand(-1, -1, h, w))
        return self.project(torch.cat(outs, dim=1))


class CollaborativeEnsembler(nn.Module):
    """CFBI+'s collaborative ensembler (``CollaborativeEnsemblerMS``), small widths.

    Args:
        in_channels: per-scale input widths; length 3 (CFBI+: strides 4, 8, 16) or 1 (CFBI:
            stride 4 only, stages 2 and 3 then have no concat).
        guidance_dim: A, width of the per-object guidance (CFBI+: 4·C instance-level fg/bg
            means).
        low_level_channels: C_low, width of the stride-4 low-level backbone feature.
        embed_dim: E (even, >= 2); stages 2–3 are 2E wide, ASPP outputs E, the decoder E/2.
        refine_dim: R, width of the skip projection.

    Raises:
        ValueError: an argument of the wrong type or value (named in the message).

    ``forward(features, guidance, low_level, object_counts)``:

    - ``features``: ``len(in_channels)`` tensors ``[N_obj, in_channels[s], h_s, w_s]``
      (strides 4, 8, 16; the coarser sizes need not be exact halvings);
    - ``guidance``: ``[N_obj, guidance_dim]``;
    - ``low_level``: ``[B, low_level_channels, h4, w4]``, ``B = len(object_counts)``, the
      same spatial size as ``features[0]``;
    - ``object_counts``: Python ints ``O_n >= 1`` (objects + background, background first),
      ``sum == N_obj``; sample n owns rows ``sum(O_<n) .. sum(O_<=n) - 1``.

    All tensors share one floating dtype (float32 / float64, the module's) and device.
    Returns a list of B logit tensors ``[1, O_n, h4, w4]`` (background first), CFBI's
    layout. Raises ``ValueError`` naming the argument on a wrong number of scales, channel
    count, object count, guidance shape, low-level batch / channel / size, or dtype /
    device mismatch.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        guidance_dim: int,
        low_level_channels: int,
        embed_dim: int = 64,
        refine_dim: int = 32,
    ):
        super().__init__()
        if isinstance(in_channels, (str, bytes)) or not isinstance(in_channels, Sequence):
            raise ValueError(f"in_channels: expected a sequence of 1 or 3 ints, got {in_channels!r}")
        if len(in_channels) not in (1, 3):
            raise ValueError(f"in_channels: expected 1 or 3 scales (strides 4 or 4, 8, 16), got {len(in_channels)}")
        self.in_channels = tuple(_pos_int(c, f"in_channels[{i}]") for i, c in enumerate(in_channels))
        self.guidance_dim = _pos_int(guidance_dim, "guidance_dim")
        self.low_level_channels = _pos_int(low_level_channels, "low_level_channels")
        E = _pos_int(embed_dim, "embed_dim")
        if E % 2:
            raise ValueError(f"embed_dim: expected an even int >= 2, got {embed_dim!r}")
        R = _pos_int(refine_dim, "refine_dim")
        self.embed_dim, self.refine_dim = E, R
        A = self.guidance_dim
        c8 = self.in_channels[1] if len(self.in_channels) == 3 else 0
        c16 = self.in_channels[2] if len(self.in_channels) == 3 else 0

        # stage 1 (stride 4)
        self.S1_IA1 = IAGate(A, self.in_channels[0])
        self.S1_layer1 = Bottleneck(self.in_channels[0], E)
        self.S1_IA2 = IAGate(A, E)
        self.S1_layer2 = Bottleneck(E, E, 1, 2)
        # stage 2 (stride 8)
        self.S2_IA1 = IAGate(A, E)
        self.S2_layer1 = Bottleneck(E, 2 * E, 2)
        self.S2_IA2 = IAGate(A, 2 * E + c8)
        self.S2_layer2 = Bottleneck(2 * E + c8, 2 * E, 1, 2)
        self.S2_IA3 = IAGate(A, 2 * E)
        self.S2_layer3 = Bottleneck(2 * E, 2 * E, 1, 4)
        # stage 3 (stride 16)
        self.S3_IA1 = IAGate(A, 2 * E)
        self.S3_layer1 = Bottleneck(2 * E, 2 * E, 2)
        self.S3_IA2 = IAGate(A, 2 * E + c16)
        self.S3_layer2 = Bottleneck(2 * E + c16, 2 * E, 1, 2)
        self.S3_IA3 = IAGate(A, 2 * E)
        self.S3_layer3 = Bottleneck(2 * E, 2 * E, 1, 4)
        # ASPP
        self.ASPP_IA = IAGate(A, 2 * E)
        self.ASPP = ASPPLite(2 * E, E)
        # decoder
        self.GCT_sc = GCT(self.low_level_channels + E)
        self.conv_sc = nn.Conv2d(self.low_level_channels + E, R, 1, bias=False)
        self.bn_sc = _norm(R)
        self.IA10 = IAGate(A, E + R)
        self.conv1 = nn.Conv2d(E + R, E // 2, 3, padding=1, bias=False)
        self.bn1 = _norm(E // 2)
        self.IA11 = IAGate(A, E // 2)
        self.conv2 = nn.Conv2d(E // 2, E // 2, 3, padding=1, bias=False)
        self.bn2 = _norm(E // 2)
        # output: per-object 1×1 conv weights (E/2) and bias (1)
        self.IA_final_fg = nn.Linear(A, E // 2 + 1)
        self.IA_final_bg = nn.Linear(A, E // 2 + 1)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ validation
    def _check(self, features, guidance, low_level, object_counts) -> None:
        if isinstance(features, Tensor) or not isinstance(features, Sequence):
            raise ValueError("features: expected a list of tensors, one per scale")
        if len(features) != len(self.in_channels):
            raise ValueError(f"features: expected {len(self.in_channels)} scales, got {len(features)}")
        for i, f in enumerate(features):
            if not isinstance(f, Tensor) or f.dim() != 4:
                raise ValueError(f"features[{i}]: expected a 4-D tensor [N_obj, C, H, W]")
            if not f.is_floating_point():
                raise ValueError(f"features[{i}]: expected a floating dtype, got {f.dtype}")
            if f.shape[1] != self.in_channels[i]:
                raise ValueError(f"features[{i}]: expected {self.in_channels[i]} channels, got {f.shape[1]}")
        ref = features[0]
        n_obj = ref.shape[0]
        for i, f in enumerate(features):
            if f.shape[0] != n_obj:
                raise ValueError(f"features[{i}]: expected N_obj = {n_obj} rows (as features[0]), got {f.shape[0]}")
            if f.dtype != ref.dtype or f.device != ref.device:
                raise ValueError(f"features[{i}]: dtype/device {f.dtype}/{f.device} differs from features[0]'s")
        if isinstance(object_counts, Tensor) or not isinstance(object_counts, Sequence) or not object_counts:
            raise ValueError("object_counts: expected a non-empty sequence of Python ints")
        for i, o in enumerate(object_counts):
            _pos_int(o, f"object_counts[{i}]")
        if sum(object_counts) != n_obj:
            raise ValueError(f"object_counts: sum {sum(object_counts)} != N_obj = {n_obj} (rows of features[0])")
        if not isinstance(guidance, Tensor) or tuple(guidance.shape) != (n_obj, self.guidance_dim):
            shape = tuple(guidance.shape) if isinstance(guidance, Tensor) else type(guidance).__name__
            raise ValueError(f"guidance: expected shape ({n_obj}, {self.guidance_dim}), got {shape}")
        if not isinstance(low_level, Tensor) or low_level.dim() != 4:
            raise ValueError("low_level: expected a 4-D tensor [B, C_low, h4, w4]")
        if low_level.shape[0] != len(object_counts):
            raise ValueError(f"low_level: batch {low_level.shape[0]} != len(object_counts) = {len(object_counts)}")
        if low_level.shape[1] != self.low_level_channels:
            raise ValueError(f"low_level: expected {self.low_level_channels} channels, got {low_level.shape[1]}")
        if low_level.shape[2:] != ref.shape[2:]:
            raise ValueError(
                f"low_level: spatial size {tuple(low_level.shape[2:])} != features[0]'s {tuple(ref.shape[2:])}"
            )
        for name, t in (("guidance", guidance), ("low_level", low_level)):
            if t.dtype != ref.dtype or t.device != ref.device:
                raise ValueError(f"{name}: dtype/device {t.dtype}/{t.device} differs from features[0]'s")

    # ------------------------------------------------------------------ parts
    @staticmethod
    def _match(x: Tensor, ref: Tensor) -> Tensor:
        """Resize ``x`` to ``ref``'s spatial size when they differ (bilinear)."""
        if x.shape[-2:] == ref.shape[-2:]:
            return x
        return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=True)

    def _decoder_features(self, features, guidance, low_level, object_counts) -> Tensor:
        """Everything up to the last decoder ReLU: ``[N_obj, E/2, h4, w4]``."""
        g = guidance
        x = self.S1_layer1(self.S1_IA1(features[0], g))
        x = self.S1_layer2(self.S1_IA2(x, g))
        low = torch.cat(
            [low_level[n : n + 1].expand(o, -1, -1, -1) for n, o in enumerate(object_counts)], dim=0
        )
        skip = torch.cat([low, x], dim=1)

        x = self.S2_layer1(self.S2_IA1(x, g))
        if len(features) == 3:
            x = torch.cat([self._match(x, features[1]), features[1]], dim=1)
        x = self.S2_layer2(self.S2_IA2(x, g))
        x = self.S2_layer3(self.S2_IA3(x, g))

        x = self.S3_layer1(self.S3_IA1(x, g))
        if len(features) == 3:
            x = torch.cat([self._match(x, features[2]), features[2]], dim=1)
        x = self.S3_layer2(self.S3_IA2(x, g))
        x = self.S3_layer3(self.S3_IA3(x, g))

        x = self.ASPP(self.ASPP_IA(x, g))

        x = F.interpolate(x, size=skip.shape[-2:], mode="bicubic", align_corners=True)
        skip = F.relu(self.bn_sc(self.conv_sc(self.GCT_sc(skip))))
        x = torch.cat([x, skip], dim=1)
        x = F.relu(self.bn1(self.conv1(self.IA10(x, g))))
        x = F.relu(self.bn2(self.conv2(self.IA11(x, g))))
        return x

    @staticmethod
    def _instance_logit(x: Tensor, guidance: Tensor, head: nn.Linear) -> Tensor:
        """Per-object 1×1 conv: ``[N, c, h, w]`` → ``[N, 1, h, w]`` with weights
        ``head(guidance)[:, :c]`` and bias ``head(guidance)[:, c]``."""
        params = head(guidance)
        c = x.shape[1]
        logit = torch.einsum("nchw,nc->nhw", x, params[:, :c]) + params[:, c, None, None]
        return logit.unsqueeze(1)

    def _fg_bg_logits(self, features, guidance, low_level, object_counts) -> tuple[Tensor, Tensor]:
        """The fg and bg logits ``[N_obj, 1, h4, w4]`` before background augmentation
        (inputs are not validated here)."""
        x = self._decoder_features(features, guidance, low_level, object_counts)
        return (
            self._instance_logit(x, guidance, self.IA_final_fg),
            self._instance_logit(x, guidance, self.IA_final_bg),
        )

    @staticmethod
    def _augment_background(fg: Tensor, bg: Tensor, object_counts: Sequence[int]) -> list[Tensor]:
        """Per sample: entry 0's fg logit + min over entries 1..O_n-1 of the bg logits
        (nothing when O_n == 1); returns ``[1, O_n, h, w]`` per sample."""
        preds = []
        start = 0
        for o in object_counts:
            f = fg[start : start + o]
            if o > 1:
                aug = bg[start + 1 : start + o].amin(dim=0, keepdim=True)
                f = torch.cat([f[:1] + aug, f[1:]], dim=0)
            preds.append(f.permute(1, 0, 2, 3))
            start += o
        return preds

    def forward(
        self,
        features: Sequence[Tensor],
        guidance: Tensor,
        low_level: Tensor,
        object_counts: Sequence[int],
    ) -> list[Tensor]:
        self._check(features, guidance, low_level, object_counts)
        fg, bg = self._fg_bg_logits(features, guidance, low_level, object_counts)
        return self._augment_background(fg, bg, object_counts)
