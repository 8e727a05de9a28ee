"""CFBI and CFBI+ matching heads: the collaborative ensembler's input, built on the fused ops.

CFBI (Yang et al., ECCV 2020) and CFBI+ (Yang et al., TPAMI 2021) turn the embeddings of
the current frame, the reference frame(s) and the previous frame into, per object, a stack
of matching maps and embeddings that their collaborative ensembler decodes. The official
code (``z-x-yang/CFBI``, ``networks/cfbi/cfbi.py`` and ``cfbip.py``,
``before_seghead_process``) builds it per sample in Python with the naive matching of
``networks/layers/matching.py``. These modules build the same tensors with
:func:`vos_kernels.fb_global_matching`, :func:`vos_kernels.fb_multi_local_matching` and
:func:`vos_kernels.fb_instance_pooling`, for the whole batch at once.

Per scale and per object o of sample n (o = 0 is the background, O_n = objects + 1), in
CFBI's channel order:

====================  =====  ===========================================================
channels              count  what
====================  =====  ===========================================================
global fg             1      ``tanh((min_q ‖e_p − e_q‖² + b_o) / 2)`` over reference pixels
                             q of object o (CFBI+ eq. 2, 8)
multi-local fg        K      the same over previous-frame pixels of o within each window,
                             CFBI's order ``[largest, smallest, …, second-largest]``
                             (eq. 4, 10)
previous mask         1      ``previous_labels == o``
multi-local bg        K      ``min over o' ≠ o`` of the multi-local fg maps (eq. 6, 11)
global bg             1      ``min over o' ≠ o`` of the global fg maps (eq. 3, 9)
current embedding     C      the whole embedding (not only the matching channels)
previous × mask       C      previous embedding × the previous mask of o
previous × (1 − mask) C      previous embedding × (1 − the previous mask of o)
====================  =====  ===========================================================

``b_o`` is ``b_B`` for the background and ``b_F`` for every object (learned, one pair per
scale in CFBI+). Matching uses the first ``matching_dims[s]`` channels of the embedding
(CFBI+: 32 / 64 / 128 of 256 at strides 4 / 8 / 16; CFBI: all 100). CFBI runs the first
3 + 2K channels through its ``DynamicPreHead`` (1×1 conv, GroupNorm, ReLU, 64 channels)
and puts them last: ``[current, previous × mask, previous × (1 − mask), prehead(maps)]``;
:class:`CFBIMatchingHead` does the same.

The instance-level guidance (``networks/layers/attention.py``) is, per object,
``[ref_fg_mean, ref_bg_mean, prev_fg_mean, prev_bg_mean]`` (``[4C]``): fg mean
``Σ e·m / (Σ m + 1e-5)``, bg mean ``(Σ e − Σ e·m) / (Σ (1 − m) + 1e-5)`` over every pixel
of the frame (several reference frames: sums over all of them before dividing). It feeds
the :class:`~vos_models.ensembler.IAGate` channel gates ``1 + tanh(Linear(·))`` of the
ensembler. CFBI+'s ensembler uses the stride-4 guidance only; all scales' are returned.

CFBI behaviours kept because a trained checkpoint depends on them:

* Labels are brought to each scale with ``F.interpolate(mode="nearest")``; a pixel whose
  label is not an object of its sample (ignore: -1 or 255) is unlabelled for matching and
  counts as background of every object in the guidance means.
* Global atrous matching (CFBI+ stride 4, rate 2) keeps reference pixels whose row and
  column are multiples of the rate; with ``global_min_pixels = P > 0`` (CFBI+ evaluation:
  100) only labels with more than ``P·rate²`` pixels in a reference frame are subsampled.
  CFBI's ``global_matching`` zeroes the off-grid labels of the subsampled objects in the
  label tensor that the attention head then reads, so the reference means of the guidance
  use only the grid pixels of those objects (their other pixels count as background).
  This happens in training mode, and in evaluation mode when ``P > 0``
  (``global_matching_for_eval`` leaves the labels alone when ``P = 0``).
* An object's bg map is ``min over the other objects`` of the transformed fg maps
  (``foreground2background``); a sample with no object (O_n = 1) gets bg = fg.
* CFBI's local downsampling (``local_downsample=True``, CFBI's default, not CFBI+):
  embeddings bilinear (``align_corners=True``) to ``(⌊h/2⌋ + 1, ⌊w/2⌋ + 1)``, labels
  nearest, the fg maps bilinear back, bg from the upsampled fg maps.

Differences from CFBI's code: distances are exact (clamped at 0) instead of
``‖x‖² + ‖y‖² − 2x·y``; an empty object gives exactly 1.0 (CFBI: ``transform(5e4 + b)``,
1.0 in float32); the batch is processed at once (results equal CFBI's per-sample loop).
Output layout: the objects of all samples are stacked along dim 0 (sample 0's O_0 objects,
then sample 1's, …), the layout the ensembler wants; CFBI's per-sample tensors are
``features[s].split(object_counts)``.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ensembler import IAGate
from .propagation import _matching_ops as _ops

__all__ = ["CFBIHeadOutput", "CFBIMatchingHead", "CFBIPlusMatchingHead", "IAGate",
           "CFBI_LOCAL_WINDOWS", "CFBIP_LOCAL_WINDOWS", "CFBIP_MATCHING_DIMS", "CFBIP_EMBEDDING_DIM",
           "CFBIP_GLOBAL_ATROUS", "CFBIP_LOCAL_ATROUS", "EPSILON"]

#: CFBI (``configs/resnet101_cfbi.py``): windows on the downsampled stride-4 map.
CFBI_LOCAL_WINDOWS = (2, 4, 6, 8, 10, 12)
#: CFBI+ (``configs/resnet101_cfbip.py``), per stride 4 / 8 / 16.
CFBIP_LOCAL_WINDOWS = ((4, 8, 12, 16, 20, 24), (2, 4, 6, 8, 10, 12), (2, 4, 6, 8, 10))
CFBIP_EMBEDDING_DIM = 256
CFBIP_MATCHING_DIMS = (32, 64, 128)
CFBIP_GLOBAL_ATROUS = (2, 1, 1)
CFBIP_LOCAL_ATROUS = (2, 1, 1)
#: The denominators' epsilon of the guidance means (CFBI's ``MODEL_EPSILON``; the fused
#: pooling op's).
EPSILON = 1e-5
_IGNORE_VALUES = (-1, 255)


class CFBIHeadOutput(NamedTuple):
    """What a matching head returns.

    Attributes:
        features: one tensor per scale, ``[ΣO_n, in_channels[s], h_s, w_s]``, the objects of
            all samples stacked (background first within each sample).
        guidance: one tensor per scale, ``[ΣO_n, 4·C_s]``,
            ``[ref_fg_mean, ref_bg_mean, prev_fg_mean, prev_bg_mean]``.
        object_counts: ``O_n = num_objects[n] + 1`` per sample.
    """

    features: list[torch.Tensor]
    guidance: list[torch.Tensor]
    object_counts: tuple[int, ...]


def _ints(values, name: str, n: int | None = None, minimum: int = 1, ascending: bool = False) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in values)
    except TypeError:
        raise ValueError(f"{name}: expected a sequence of ints, got {values!r}") from None
    if (n is not None and len(out) != n) or not out or min(out) < minimum:
        what = f"{n} ints" if n is not None else "a non-empty sequence of ints"
        raise ValueError(f"{name}: expected {what} >= {minimum}, got {values!r}")
    if ascending and any(a >= b for a, b in zip(out, out[1:])):
        raise ValueError(f"{name}: expected strictly ascending windows, got {values!r}")
    return out


def _compiling() -> bool:
    return torch.compiler.is_compiling()


class _Scale(NamedTuple):
    embedding_dim: int
    matching_dim: int
    windows: tuple[int, ...]
    global_atrous: int
    local_atrous: int
    local_downsample: bool

    @property
    def maps(self) -> int:
        """Matching channels: global fg/bg, previous mask, local fg/bg per window."""
        return 3 + 2 * len(self.windows)


class _MatchingBase(nn.Module):
    """Shared forward of the two heads (validation, labels, matching, assembly)."""

    def __init__(self, scales: Sequence[_Scale], global_min_pixels: int, matching: str):
        super().__init__()
        self.scales = tuple(scales)
        self.global_min_pixels = int(global_min_pixels)
        if self.global_min_pixels < 0:
            raise ValueError(f"global_min_pixels: expected >= 0, got {global_min_pixels}")
        _ops(matching)
        self.matching = matching
        n = len(self.scales)
        self.bg_bias = nn.Parameter(torch.zeros(n, 1, 1, 1))
        self.fg_bias = nn.Parameter(torch.zeros(n, 1, 1, 1))

    @property
    def guidance_dims(self) -> tuple[int, ...]:
        """``4·C_s`` per scale (the IA gates' input size)."""
        return tuple(4 * s.embedding_dim for s in self.scales)

    def bias(self, scale: int, num_labels: int) -> torch.Tensor:
        """CFBI's ``dis_bias`` of a scale as the fused ops' ``[L]``: ``[b_B, b_F, …, b_F]``."""
        fg = self.fg_bias[scale].reshape(1).expand(num_labels - 1)
        return torch.cat([self.bg_bias[scale].reshape(1), fg])

    # ------------------------------------------------------------------ checks
    def _check(self, current, reference, previous, reference_labels, previous_labels, num_objects):
        n = len(self.scales)
        for name, x in (("current", current), ("reference", reference), ("previous", previous)):
            if not isinstance(x, (list, tuple)) or len(x) != n:
                raise ValueError(f"{name}: expected a sequence of {n} tensors (one per scale), got "
                                 f"{type(x).__name__}{'' if not isinstance(x, (list, tuple)) else f' of {len(x)}'}")
        B = current[0].shape[0] if current[0].dim() == 4 else -1
        counts = _ints(num_objects, "num_objects", None, 0)
        if len(counts) != B:
            raise ValueError(f"num_objects: expected one count per sample ({B}), got {len(counts)}")
        dtype, device = current[0].dtype, current[0].device
        if dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            raise ValueError(f"current: expected floating-point embeddings, got {dtype}")
        T = None
        for s, cfg in enumerate(self.scales):
            cur, ref, prev = current[s], reference[s], previous[s]
            want = (B, cfg.embedding_dim)
            if cur.dim() != 4 or tuple(cur.shape[:2]) != want:
                raise ValueError(f"current[{s}]: expected [B, {cfg.embedding_dim}, h, w] with B = {B}, "
                                 f"got {tuple(cur.shape)}")
            if prev.shape != cur.shape:
                raise ValueError(f"previous[{s}]: expected shape {tuple(cur.shape)} like current[{s}], "
                                 f"got {tuple(prev.shape)}")
            if ref.dim() == 4:
                ref_shape = (B, 1, *ref.shape[1:])
            elif ref.dim() == 5:
                ref_shape = tuple(ref.shape)
            else:
                raise ValueError(f"reference[{s}]: expected [B, C, h, w] or [B, T, C, h, w], got {tuple(ref.shape)}")
            if ref_shape[0] != B or ref_shape[2:] != tuple(cur.shape[1:]):
                raise ValueError(f"reference[{s}]: expected [B, (T,) {cfg.embedding_dim}, "
                                 f"{cur.shape[2]}, {cur.shape[3]}] like current[{s}], got {tuple(ref.shape)}")
            if T is None:
                T = ref_shape[1]
            elif ref_shape[1] != T:
                raise ValueError(f"reference[{s}]: expected {T} reference frames like reference[0], got {ref_shape[1]}")
            for name, x in ((f"current[{s}]", cur), (f"reference[{s}]", ref), (f"previous[{s}]", prev)):
                if x.dtype != dtype or x.device != device:
                    raise ValueError(f"{name}: expected {dtype} on {device} like current[0], got {x.dtype} on {x.device}")
        ref_labels = reference_labels
        if isinstance(ref_labels, torch.Tensor) and ref_labels.dim() == 3:
            ref_labels = ref_labels.unsqueeze(1)
        prev_labels = previous_labels
        if isinstance(prev_labels, torch.Tensor) and prev_labels.dim() == 4 and prev_labels.shape[1] == 1:
            prev_labels = prev_labels[:, 0]
        for name, lab, dims, shape in (("reference_labels", ref_labels, 4, f"[B, H, W] or [B, {T}, H, W]"),
                                       ("previous_labels", prev_labels, 3, "[B, H, W]")):
            if (not isinstance(lab, torch.Tensor) or lab.is_floating_point() or lab.is_complex()
                    or lab.dtype == torch.bool or lab.dim() != dims or lab.shape[0] != B
                    or (dims == 4 and lab.shape[1] != T)):
                got = f"{lab.dtype} {tuple(lab.shape)}" if isinstance(lab, torch.Tensor) else type(lab).__name__
                raise ValueError(f"{name}: expected an integer tensor {shape} with B = {B}, got {got}")
            if lab.device != device:
                raise ValueError(f"{name}: expected a tensor on {device} like the embeddings, got {lab.device}")
            if not _compiling() and lab.numel():
                top = torch.tensor(counts, device=device).view(B, *([1] * (lab.dim() - 1)))
                ok = ((lab >= 0) & (lab <= top)) | (lab == -1) | (lab == 255)
                if not bool(ok.all()):
                    bad = lab[~ok][0].item()
                    raise ValueError(f"{name}: expected values in [0, num_objects[n]] or -1 / 255 (ignore), "
                                     f"got {bad} (num_objects = {list(counts)})")
        return counts, ref_labels, prev_labels, T

    # ---------------------------------------------------------------- matching
    def _labels_at(self, labels: torch.Tensor, size, counts) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest-resized labels ``[B, T, h, w]`` as (matching labels with -1 where the
        pixel is no label of its sample, pooling labels with L there); ``counts`` = O_n."""
        lab = labels
        if tuple(lab.shape[-2:]) != tuple(size):
            lab = F.interpolate(lab.float(), size=size, mode="nearest")
        lab = lab.long()
        L = max(counts)
        top = torch.tensor(counts, device=lab.device).view(-1, 1, 1, 1)
        valid = (lab >= 0) & (lab < top)
        return torch.where(valid, lab, torch.full_like(lab, -1)), torch.where(valid, lab, torch.full_like(lab, L))

    def _atrous_labels(self, match, pool, rate: int, L: int):
        """CFBI's atrous subsampling of the reference labels (see the module doc).
        Returns (matching labels, rate of the op call, pooling labels)."""
        if rate == 1:
            return match, 1, pool
        h, w = match.shape[-2:]
        grid = ((torch.arange(h, device=match.device) % rate == 0).view(h, 1)
                & (torch.arange(w, device=match.device) % rate == 0).view(1, w))
        P = self.global_min_pixels
        if P == 0:
            big_pix = match >= 0          # every label with a pixel is subsampled
        else:
            counts = F.one_hot(match + 1, L + 1)[..., 1:].sum((2, 3))          # [B, T, L]
            big = counts > P * rate * rate
            big_pix = (match >= 0) & torch.gather(big, 2, match.clamp_min(0).flatten(2)).view_as(match)
        off = big_pix & ~grid
        if self.training or P > 0:
            pool = torch.where(off, torch.full_like(pool, L), pool)
        if P == 0:
            return match, rate, pool      # the op's own atrous grid gives the same candidates
        return torch.where(off, torch.full_like(match, -1), match), 1, pool

    def _scale(self, ops, s: int, cur, ref, prev, ref_labels, prev_labels, counts):
        cfg = self.scales[s]
        B, C, h, w = cur.shape
        L = max(counts)                   # counts: O_n = objects + 1 per sample
        m = cfg.matching_dim
        if ref.dim() == 4:
            ref = ref.unsqueeze(1)
        T = ref.shape[1]
        ref_match, ref_pool = self._labels_at(ref_labels, (h, w), counts)
        prev_match, prev_pool = self._labels_at(prev_labels.unsqueeze(1), (h, w), counts)
        prev_match, prev_pool = prev_match[:, 0], prev_pool[:, 0]
        ref_match, rate, ref_pool = self._atrous_labels(ref_match, ref_pool, cfg.global_atrous, L)
        bias = self.bias(s, L).to(cur.dtype)

        q = cur[:, :m].permute(0, 2, 3, 1)                                  # [B, h, w, m]
        r = ref[:, :, :m].permute(0, 1, 3, 4, 2)                             # [B, T, h, w, m]
        p = prev[:, :m].permute(0, 2, 3, 1)
        g_fg, g_bg = ops.fb_global_matching(q, r, ref_match, L, bias, rate)  # [B, L, h, w]

        K = len(cfg.windows)
        if cfg.local_downsample:
            down = (int(h / 2) + 1, int(w / 2) + 1)
            qd = F.interpolate(cur[:, :m], size=down, mode="bilinear", align_corners=True).permute(0, 2, 3, 1)
            pd = F.interpolate(prev[:, :m], size=down, mode="bilinear", align_corners=True).permute(0, 2, 3, 1)
            ld = F.interpolate(prev_match.unsqueeze(1).float(), size=down, mode="nearest")[:, 0].long()
            l_fg, _ = ops.fb_multi_local_matching(qd, pd, ld, L, cfg.windows, bias, cfg.local_atrous)
            l_fg = F.interpolate(l_fg.reshape(B, L * K, *down), size=(h, w), mode="bilinear",
                                 align_corners=True).view(B, L, K, h, w)
            l_bg = _others_min(l_fg, counts)
        else:
            l_fg, l_bg = ops.fb_multi_local_matching(q, p, prev_match, L, cfg.windows, bias, cfg.local_atrous)
        single = [n for n, c in enumerate(counts) if c == 1]
        if single:                        # CFBI's foreground2background returns fg when O_n = 1
            one = torch.zeros(B, dtype=torch.bool, device=cur.device)
            one[single] = True
            g_bg = torch.where(one.view(B, 1, 1, 1), g_fg, g_bg)
            l_bg = torch.where(one.view(B, 1, 1, 1, 1), l_fg, l_bg)

        mask = (prev_match.unsqueeze(1) == torch.arange(L, device=cur.device).view(1, L, 1, 1)).to(cur.dtype)

        # guidance: fb_instance_pooling with label L = "no object" (background of every object)
        ref_e = ref.permute(0, 1, 3, 4, 2).reshape(B, T * h, w, C)
        ref_means = ops.fb_instance_pooling(ref_e, ref_pool.reshape(B, T * h, w), L + 1)[:, :L]
        prev_means = ops.fb_instance_pooling(prev.permute(0, 2, 3, 1), prev_pool, L + 1)[:, :L]
        guidance = torch.cat([ref_means[:, :, 0], ref_means[:, :, 1], prev_means[:, :, 0], prev_means[:, :, 1]], -1)

        # Per (sample, object) row; built as [B', L', ·, h, w] pieces for one cat along dim 2:
        # when every sample has L objects, B' = B and L' = L and the current embedding goes
        # in expanded (no copy); otherwise the existing rows are gathered first (B' = 1).
        rows, samples = _rows(counts, L, cur.device)
        if rows is None:
            take = lambda x: x                                                   # noqa: E731
            cur_e, prev_e, mask_e = cur.unsqueeze(1).expand(B, L, C, h, w), prev.unsqueeze(1), mask.unsqueeze(2)
        else:
            take = lambda x: x.flatten(0, 1).index_select(0, rows).unsqueeze(0)  # noqa: E731
            mask_e = take(mask).unsqueeze(2)
            cur_e, prev_e = cur.index_select(0, samples).unsqueeze(0), prev.index_select(0, samples).unsqueeze(0)
        # CFBI's window order [largest, smallest, ..., second-largest]: two slices of the
        # ascending maps, joined by the final cat (no reordered copy)
        l_fg, l_bg = take(l_fg), take(l_bg)
        maps = [take(g_fg).unsqueeze(2), l_fg[:, :, K - 1:], l_fg[:, :, :K - 1], mask_e,
                l_bg[:, :, K - 1:], l_bg[:, :, :K - 1], take(g_bg).unsqueeze(2)]
        prev_fg = prev_e * mask_e
        embeddings = [cur_e, prev_fg, prev_e - prev_fg]
        return maps, embeddings, take(guidance).flatten(0, 1)

    def _run(self, current, reference, previous, reference_labels, previous_labels, num_objects):
        counts, ref_labels, prev_labels, _ = self._check(current, reference, previous, reference_labels,
                                                          previous_labels, num_objects)
        counts = tuple(c + 1 for c in counts)
        ops = _ops(self.matching)
        return [self._scale(ops, s, current[s], reference[s], previous[s], ref_labels, prev_labels, counts)
                for s in range(len(self.scales))], counts


def _rows(counts: tuple[int, ...], L: int, device):
    """Flat indices of the existing (sample, object) rows of a ``[B·L]`` layout and the sample
    of each, or (None, None) when every sample has L objects."""
    if all(c == L for c in counts):
        return None, None
    rows = [n * L + o for n, c in enumerate(counts) for o in range(c)]
    samples = [n for n, c in enumerate(counts) for _ in range(c)]
    return torch.tensor(rows, device=device), torch.tensor(samples, device=device)


def _others_min(fg: torch.Tensor, counts: tuple[int, ...]) -> torch.Tensor:
    """``bg[:, l] = min over the sample's other objects l' ≠ l of fg[:, l']`` (labels past a
    sample's O_n excluded); ``fg`` where the sample has one label (fixed up by the caller)."""
    B, L = fg.shape[:2]
    if L == 1:
        return fg
    valid = torch.tensor([[o < c for o in range(L)] for c in counts], device=fg.device)
    shape = (B, L) + (1,) * (fg.dim() - 2)
    masked = fg.masked_fill(~valid.view(shape), float("inf"))
    low = masked.topk(2, dim=1, largest=False)
    first, second = low.values[:, :1], low.values[:, 1:2]
    is_first = torch.arange(L, device=fg.device).view((1, L) + (1,) * (fg.dim() - 2)) == low.indices[:, :1]
    return torch.where(is_first, second, first)


def _scale_tuple(value, n: int, name: str):
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (int(value),) * n
    return _ints(value, name, n, 1)


class CFBIPlusMatchingHead(_MatchingBase):
    """CFBI+'s multi-scale matching head: the ensembler's input at strides 4, 8 and 16.

    Args:
        embedding_dims: C_s per scale (CFBI+: 256 each).
        matching_dims: the first channels used for matching per scale (CFBI+: 32, 64, 128).
        local_windows: per scale, strictly ascending window half-widths in pixels of that
            scale (CFBI+: ``[4..24]``, ``[2..12]``, ``[2..10]``).
        global_atrous: per scale (CFBI+: 2, 1, 1; ``TRAIN/TEST_GLOBAL_ATROUS_RATE``).
        local_atrous: per scale (CFBI+: 2, 1, 1).
        global_min_pixels: CFBI's ``atrous_obj_pixel_num`` (0 in training, 100 in CFBI+'s
            evaluation): only labels with more pixels than this × rate² are subsampled.
        matching: ``"fused"`` (vos_kernels ops, whichever backend is selected) or
            ``"reference"`` (``vos_kernels.reference``, CFBI's naive matching).

    Parameters (``state_dict`` keys as CFBI+'s ``CFBIP``): ``bg_bias``, ``fg_bias``, each
    ``[3, 1, 1, 1]`` float32, zeros (b_B and b_F per scale).

    Forward:
        current, reference, previous: one tensor per scale, ``[B, C_s, h_s, w_s]``
            (reference also ``[B, T, C_s, h_s, w_s]``: several reference frames, CFBI's
            evaluation); float32 (float64 on CPU).
        reference_labels: ``[B, H, W]`` or ``[B, T, H, W]`` integers at any resolution
            (resized to each scale with nearest): 0 = background, 1..num_objects[n] the
            objects, -1 or 255 ignore.
        previous_labels: ``[B, H, W]`` (or ``[B, 1, H, W]``), the same values.
        num_objects: per sample, the number of objects (CFBI's ``gt_ids``).

    Returns:
        :class:`CFBIHeadOutput`: per scale ``[ΣO_n, 3·C_s + 3 + 2·K_s, h_s, w_s]`` in CFBI's
        channel order (module doc) and the guidance ``[ΣO_n, 4·C_s]``; differentiable with
        respect to every embedding and both biases.

    Raises:
        ValueError: naming the argument: wrong number of scales, shapes, dtypes, devices,
            label values outside ``[0, num_objects[n]]`` ∪ {-1, 255}, bad configuration.
    """

    def __init__(self, embedding_dims: Sequence[int] = (CFBIP_EMBEDDING_DIM,) * 3,
                 matching_dims: Sequence[int] = CFBIP_MATCHING_DIMS,
                 local_windows: Sequence[Sequence[int]] = CFBIP_LOCAL_WINDOWS,
                 global_atrous: Sequence[int] | int = CFBIP_GLOBAL_ATROUS,
                 local_atrous: Sequence[int] | int = CFBIP_LOCAL_ATROUS,
                 global_min_pixels: int = 0, matching: str = "fused"):
        emb = _ints(embedding_dims, "embedding_dims")
        n = len(emb)
        mat = _ints(matching_dims, "matching_dims", n)
        if any(m > c for m, c in zip(mat, emb)):
            raise ValueError(f"matching_dims: expected <= embedding_dims {emb}, got {mat}")
        if len(local_windows) != n:
            raise ValueError(f"local_windows: expected {n} window lists (one per scale), got {len(local_windows)}")
        wins = [_ints(w, f"local_windows[{i}]", None, 1, ascending=True) for i, w in enumerate(local_windows)]
        ga = _scale_tuple(global_atrous, n, "global_atrous")
        la = _scale_tuple(local_atrous, n, "local_atrous")
        super().__init__([_Scale(e, m, w, g, l, False) for e, m, w, g, l in zip(emb, mat, wins, ga, la)],
                         global_min_pixels, matching)

    @property
    def in_channels(self) -> tuple[int, ...]:
        """Channels of each scale's ensembler input, ``3·C_s + 3 + 2·K_s``."""
        return tuple(3 * s.embedding_dim + s.maps for s in self.scales)

    def forward(self, current, reference, previous, reference_labels, previous_labels,
                num_objects) -> CFBIHeadOutput:
        out, counts = self._run(current, reference, previous, reference_labels, previous_labels, num_objects)
        features = [torch.cat([*maps, *emb], 2).flatten(0, 1) for maps, emb, _ in out]
        return CFBIHeadOutput(features, [g for _, _, g in out], counts)


class _DynamicPreHead(nn.Module):
    """CFBI's ``DynamicPreHead``: 1×1 conv, GroupNorm (channels / 4 groups), ReLU."""

    def __init__(self, in_channels: int, channels: int):
        super().__init__()
        if channels % 4:
            raise ValueError(f"prehead_channels: expected a multiple of 4 (GroupNorm of channels / 4 groups), "
                             f"got {channels}")
        self.conv = nn.Conv2d(in_channels, channels, 1)
        self.bn = nn.GroupNorm(channels // 4, channels)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class CFBIMatchingHead(_MatchingBase):
    """CFBI's single-scale matching head (stride 4), with its ``DynamicPreHead``.

    Args:
        embedding_dim: C (CFBI: 100); matching uses all of it unless ``matching_dim``.
        matching_dim: channels used for matching (default C).
        local_windows: strictly ascending (CFBI: 2..12, on the downsampled map).
        global_atrous, local_atrous: CFBI: 1 and 1 (its fast mode: global 2).
        local_downsample: CFBI's default True (module doc).
        prehead_channels: CFBI's ``MODEL_PRE_HEAD_EMBEDDING_DIM`` (64); ``None``: no pre-head,
            the raw maps in CFBI+'s order come first: ``[maps, current, prev×m, prev×(1−m)]``.
        global_min_pixels, matching: as :class:`CFBIPlusMatchingHead`.

    Parameters (``state_dict`` keys as CFBI's ``CFBI``): ``bg_bias``, ``fg_bias``
    (``[1, 1, 1, 1]``), ``dynamic_prehead.conv.{weight,bias}``,
    ``dynamic_prehead.bn.{weight,bias}``.

    Forward: as :class:`CFBIPlusMatchingHead` with single tensors instead of per-scale
    sequences. Returns a :class:`CFBIHeadOutput` with one scale:
    ``[ΣO_n, 3·C + prehead_channels, h, w]`` = ``[current, prev×m, prev×(1−m),
    prehead(maps)]`` (CFBI's ``to_cat``) and the guidance ``[ΣO_n, 4·C]``.
    """

    def __init__(self, embedding_dim: int = 100, matching_dim: int | None = None,
                 local_windows: Sequence[int] = CFBI_LOCAL_WINDOWS, global_atrous: int = 1,
                 local_atrous: int = 1, local_downsample: bool = True, prehead_channels: int | None = 64,
                 global_min_pixels: int = 0, matching: str = "fused"):
        (emb,) = _ints([embedding_dim], "embedding_dim")
        (mat,) = _ints([emb if matching_dim is None else matching_dim], "matching_dim")
        if mat > emb:
            raise ValueError(f"matching_dim: expected <= embedding_dim {emb}, got {mat}")
        wins = _ints(local_windows, "local_windows", None, 1, ascending=True)
        (ga,) = _ints([global_atrous], "global_atrous")
        (la,) = _ints([local_atrous], "local_atrous")
        super().__init__([_Scale(emb, mat, wins, ga, la, bool(local_downsample))], global_min_pixels, matching)
        self.dynamic_prehead = (None if prehead_channels is None
                                else _DynamicPreHead(self.scales[0].maps, int(prehead_channels)))

    @property
    def in_channels(self) -> tuple[int]:
        """Channels of the ensembler input: ``3·C + prehead_channels`` (or ``+ 3 + 2K``)."""
        s = self.scales[0]
        return (3 * s.embedding_dim + (s.maps if self.dynamic_prehead is None else self.dynamic_prehead.conv.out_channels),)

    def forward(self, current, reference, previous, reference_labels, previous_labels,
                num_objects) -> CFBIHeadOutput:
        out, counts = self._run([current], [reference], [previous], reference_labels, previous_labels, num_objects)
        maps, emb, guidance = out[0]
        if self.dynamic_prehead is None:
            features = torch.cat([*maps, *emb], 2).flatten(0, 1)
        else:
            pre = self.dynamic_prehead(torch.cat(maps, 2).flatten(0, 1))
            features = torch.cat([*emb, pre.view(*emb[1].shape[:2], *pre.shape[1:])], 2).flatten(0, 1)
        return CFBIHeadOutput([features], [guidance], counts)
