"""Benchmark workload ``"train-step"``: one CFBI+ training step of the matching head,
forward + backward, for the harness of :mod:`vos_kernels.benchmark`.

The step runs :class:`vos_models.cfbi.CFBIPlusMatchingHead` (CFBI+'s defaults: C per scale,
matching dims ``(C//8, C//4, C//2)``, local windows ``(4..24 step 4)``, ``(2..12 step 2)``,
``(2..10 step 2)``, global and local atrous ``(2, 1, 1)``, training mode) with
``matching="fused"`` (vos_kernels ops: the C++ kernels on CPU) or ``matching="reference"``
(``vos_kernels.reference``, CFBI's naive matching: chunked ``[m, L, N]`` global distances,
unfolded ``[HW, C, offsets]`` local tensors), on identical inputs and parameters.

Sizes (a :class:`~vos_kernels.benchmark.Case` with ``op="train-step"``): ``height`` ×
``width`` is the stride-4 map (CFBI+ training crop 465×465 → 117×117), the stride-8 and
stride-16 maps are its ceil halvings (59×59, 30×30); the labels are at full resolution
``(4·height − 3) × (4·width − 3)`` (465×465 for 117: the crop whose stride-4 map is
``height``; the head resizes them to each scale with nearest). ``channels`` = C per scale
(256), ``num_labels`` = objects + 1 (the same count for every sample), ``batch`` = B,
``frames`` = N sequential current frames. ``atrous_rate`` and ``windows`` of the case are
not used (CFBI+'s per-scale defaults are).

Inputs (from the case's generator): leaf embeddings ``N(0, 1) / sqrt(C)`` per scale for the
reference frame (``reference_s{s}`` ``[B, C, h, w]``), the frame before the first current
frame (``previous_s{s}``) and the N current frames (``current_s{s}`` ``[N, B, C, h, w]``);
blob-like label maps (random labels 0..objects on a coarse 8×8 grid, every label present,
upsampled with nearest; no ignore pixels) for the reference frame and frames 0..N
(``frame_labels`` ``[N + 1, B, H, W]``; frame N's labels would be the loss target of a real
step and are not read here); the biases ``bg_bias`` = −0.25 and ``fg_bias`` = +0.25 per
scale; and per frame and scale fixed random weights per channel for the ensembler input
(``feature_weights_s{s}`` ``[N, 3C + 3 + 2K_s]``, ``N(0, 1) / (h_s·w_s)``: a mean over
the pixels, like a segmentation loss, so that the bias gradients, sums over every pixel,
stay O(1) like the embedding gradients are O(1/h_s·w_s)) and for the guidance
(``guidance_weights_s{s}`` ``[N, 4C]``, ``N(0, 1)``), which make the scalar loss without a
weight tensor the size of the outputs.

The step: for t = 1..N, ``out = head(current_t, reference, previous = embeddings of frame
t − 1, reference_labels, previous_labels = labels of frame t − 1, num_objects)`` and
``loss += Σ_s (out.features[s] · w_feat[t, s]).sum() + (out.guidance[s] · w_guid[t, s]).sum()``;
then ``torch.autograd.grad(loss, [embedding leaves…, bg_bias, fg_bias])``. Frame t's
embeddings are the current frame of step t and the previous frame of step t + 1, so its
gradient has both contributions ("sequential training"). In CFBI's training the previous
mask is the previous *prediction*; here it is the label map of frame t − 1, so that the
fused and the reference side see identical inputs (no decoder in the loop).

Outputs (``OUTPUTS``): the gradients, flattened and concatenated per group:
``grad_reference`` (scales 0, 1, 2 of the reference frame), ``grad_current`` (the N current
frames, scale-major), ``grad_previous`` (frame 0) and ``grad_bias`` (``[bg_bias(3),
fg_bias(3)]``).

Oracle of the max error: the *fused* head in float64 on float64 CPU copies of the inputs
(backend ``"cpu"``), not the reference: the reference head keeps every unfolded local
tensor and global distance chunk for backward (13.3 GiB extra measured in float32 for
``train-step/cfbip-b2-o2``, twice that in float64). The fused and reference heads'
gradients agree in float64 to 1e-9 on small inputs
(``tests/test_cfbi_heads.py::test_gradients_fused_equal_reference_float64``).
A near tie of two nearest neighbours (global or local min) that float32 resolves the other
way than float64 moves that query's gradient to the other pixel: at full size a few such
ties per step are expected, and the max error is then the size of one query's gradient
(``train-step/cfbip-b2-o2``: 6e-5 for both float32 implementations, from one stride-16
global tie — 128 channels of one current pixel and 2 × 128 of two reference pixels —
while every other gradient element is within 1e-7), not float32 rounding.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._backend import get_backend, set_backend

SCALES = 3
STRIDES = (4, 8, 16)
CFBIP_WINDOWS = ((4, 8, 12, 16, 20, 24), (2, 4, 6, 8, 10, 12), (2, 4, 6, 8, 10))
CFBIP_GLOBAL_ATROUS = (2, 1, 1)
CFBIP_LOCAL_ATROUS = (2, 1, 1)
BIAS_BG, BIAS_FG = -0.25, 0.25
LABEL_GRID = 8                   # blob labels: random labels on an 8×8 grid, upsampled (nearest)
REFERENCE_CHUNKS = 4             # CFBI's n_chunks of the global matching (the head's default)
OUTPUTS = ("grad_reference", "grad_current", "grad_previous", "grad_bias")
ORACLE_TEXT = ("the fused matching head (vos_kernels C++ CPU kernels) in float64 on float64 CPU copies of the "
               "inputs; the reference head in float64 would need ~2x its float32 peak, and "
               "tests/test_cfbi_heads.py checks fused == reference gradients in float64 to 1e-9")


# ------------------------------------------------------------------------- sizes
def scale_sizes(case) -> list[tuple[int, int]]:
    """``(h, w)`` per scale: the stride-4 map, then ceil halvings."""
    h, w = case.height, case.width
    out = []
    for _ in range(SCALES):
        out.append((h, w))
        h, w = -(-h // 2), -(-w // 2)
    return out


def label_size(case) -> tuple[int, int]:
    """Full-resolution label size ``4·h − 3`` (465 for the 117 map of a 465 crop)."""
    return 4 * case.height - 3, 4 * case.width - 3


def matching_dims(channels: int) -> tuple[int, ...]:
    """CFBI+'s matching channels per scale: C/8, C/4, C/2 (32 / 64 / 128 of 256)."""
    return tuple(max(1, channels // d) for d in (8, 4, 2))


def in_channels(case) -> tuple[int, ...]:
    """Ensembler input channels per scale: ``3C + 3 + 2K_s``."""
    return tuple(3 * case.channels + 3 + 2 * len(w) for w in CFBIP_WINDOWS)


def _offsets(s: int) -> int:
    """Offsets of the largest window of scale ``s`` on its atrous grid: (2·⌊D/r⌋ + 1)²."""
    return (2 * (max(CFBIP_WINDOWS[s]) // CFBIP_LOCAL_ATROUS[s]) + 1) ** 2


def _candidates(h: int, w: int, s: int) -> int:
    """Reference pixels on the global atrous grid of scale ``s`` (all labelled here)."""
    r = CFBIP_GLOBAL_ATROUS[s]
    return -(-h // r) * -(-w // r)


def sizes(case) -> str:
    """The ``sizes`` column of the tables."""
    maps = " / ".join(f"{h}×{w}" for h, w in scale_sizes(case))
    H, W = label_size(case)
    return (f"B {case.batch}, {case.frames} frames, {maps} (labels {H}×{W}), C {case.channels} "
            f"(match {'/'.join(map(str, matching_dims(case.channels)))}), {case.num_labels - 1} objects, fwd+bwd")


# ------------------------------------------------------------------------ inputs
def _embedding(gen: torch.Generator, shape) -> torch.Tensor:
    """N(0, 1/C) along the channel dim (-3)."""
    return torch.randn(*shape, generator=gen).mul_(1.0 / math.sqrt(shape[-3]))


def _blob_labels(gen: torch.Generator, batch: int, objects: int, size: tuple[int, int]) -> torch.Tensor:
    """``[B, H, W]`` int64: labels 0..objects on a LABEL_GRID² grid, every label on at
    least one cell, upsampled with nearest."""
    g = LABEL_GRID
    maps = []
    for _ in range(batch):
        coarse = torch.randint(0, objects + 1, (g * g,), generator=gen)
        cells = torch.randperm(g * g, generator=gen)[: objects + 1]
        coarse[cells] = torch.arange(objects + 1)
        maps.append(coarse.view(g, g))
    lab = torch.stack(maps).unsqueeze(1).float()
    return F.interpolate(lab, size=size, mode="nearest")[:, 0].long()


def train_inputs(case, gen: torch.Generator) -> dict:
    B, N, C = case.batch, case.frames, case.channels
    objects = case.num_labels - 1
    H, W = label_size(case)
    x: dict = {}
    for s, (h, w) in enumerate(scale_sizes(case)):
        x[f"reference_s{s}"] = _embedding(gen, (B, C, h, w))
        x[f"previous_s{s}"] = _embedding(gen, (B, C, h, w))
        x[f"current_s{s}"] = _embedding(gen, (N, B, C, h, w))
    x["reference_labels"] = _blob_labels(gen, B, objects, (H, W))
    x["frame_labels"] = torch.stack([_blob_labels(gen, B, objects, (H, W)) for _ in range(N + 1)])
    x["num_objects"] = [objects] * B
    x["bg_bias"] = torch.full((SCALES, 1, 1, 1), BIAS_BG)
    x["fg_bias"] = torch.full((SCALES, 1, 1, 1), BIAS_FG)
    for s, (cin, (h, w)) in enumerate(zip(in_channels(case), scale_sizes(case))):
        x[f"feature_weights_s{s}"] = torch.randn(N, cin, generator=gen).div_(h * w)
        x[f"guidance_weights_s{s}"] = torch.randn(N, 4 * C, generator=gen)
    return x


# -------------------------------------------------------------------------- step
def cfbip_train_step(matching: str, **x) -> tuple[torch.Tensor, ...]:
    """One CFBI+ matching-head training step (module doc) with ``matching`` "fused" or
    "reference"; returns the gradients named by ``OUTPUTS``."""
    from vos_models.cfbi import CFBIPlusMatchingHead

    leaf = lambda t: t.detach().requires_grad_(True)  # noqa: E731
    ref = [leaf(x[f"reference_s{s}"]) for s in range(SCALES)]
    prev0 = [leaf(x[f"previous_s{s}"]) for s in range(SCALES)]
    cur = [leaf(x[f"current_s{s}"]) for s in range(SCALES)]
    C = ref[0].shape[1]
    head = CFBIPlusMatchingHead(embedding_dims=(C,) * SCALES, matching_dims=matching_dims(C),
                                local_windows=CFBIP_WINDOWS, global_atrous=CFBIP_GLOBAL_ATROUS,
                                local_atrous=CFBIP_LOCAL_ATROUS, matching=matching)
    head = head.to(device=ref[0].device, dtype=ref[0].dtype).train()
    with torch.no_grad():
        head.bg_bias.copy_(x["bg_bias"])
        head.fg_bias.copy_(x["fg_bias"])

    frames = [c.unbind(0) for c in cur]           # views: no zero-filled [N, …] gradient per frame
    labels, num_objects = x["frame_labels"], x["num_objects"]
    loss = ref[0].new_zeros(())
    for t in range(len(frames[0])):
        current = [frames[s][t] for s in range(SCALES)]
        previous = [prev0[s] if t == 0 else frames[s][t - 1] for s in range(SCALES)]
        out = head(current, ref, previous, x["reference_labels"], labels[t], num_objects)
        for s in range(SCALES):
            wf = x[f"feature_weights_s{s}"][t].view(1, -1, 1, 1)
            wg = x[f"guidance_weights_s{s}"][t].view(1, -1)
            loss = loss + (out.features[s] * wf).sum() + (out.guidance[s] * wg).sum()
        del out
    grads = torch.autograd.grad(loss, [*ref, *cur, *prev0, head.bg_bias, head.fg_bias])
    flat = lambda gs: torch.cat([g.reshape(-1) for g in gs])  # noqa: E731
    n = SCALES
    return flat(grads[:n]), flat(grads[n:2 * n]), flat(grads[2 * n:3 * n]), flat(grads[3 * n:])


def train_fused(**x):
    return cfbip_train_step("fused", **x)


def train_reference(**x):
    return cfbip_train_step("reference", **x)


def train_oracle(case, inputs) -> tuple[torch.Tensor, ...]:
    """The fused step in float64 on float64 CPU copies of the inputs (module doc)."""
    x = {k: (v.detach().cpu().double() if v.is_floating_point() else v.cpu()) if isinstance(v, torch.Tensor) else v
         for k, v in inputs.items()}
    before = get_backend()
    set_backend("cpu")
    try:
        return tuple(t.detach() for t in train_fused(**x))
    finally:
        set_backend(before)


# --------------------------------------------------------------- cost estimates
def train_flops(case, inputs) -> float:
    """Matching only: per scale 2·Nq·Nr·C_m (global, Nr = reference pixels on the atrous
    grid) + 2·Nq·offsets·C_m (local, offsets of the largest window), ×3 for forward +
    backward, × frames × batch. Pooling, concatenation and the loss are not counted."""
    per = 0.0
    for s, ((h, w), cm) in enumerate(zip(scale_sizes(case), matching_dims(case.channels))):
        nq = h * w
        per += 2.0 * nq * _candidates(h, w, s) * cm + 2.0 * nq * _offsets(s) * cm
    return 3 * per * case.frames * case.batch


def _feature_elems(case) -> int:
    """Elements of one frame's ensembler input (all scales, all samples' objects)."""
    return sum(case.batch * case.num_labels * cin * h * w for cin, (h, w) in zip(in_channels(case), scale_sizes(case)))


def train_bytes(case) -> float:
    """Rough model, float32: per frame the ensembler input written, read by the loss, and
    its gradient written and read (4×), and the three embeddings (current, previous,
    reference) read 3 times forward and their gradients written / read 3 times backward."""
    emb = sum(case.batch * case.channels * h * w for h, w in scale_sizes(case))
    return 4.0 * case.frames * (4 * _feature_elems(case) + 6 * 3 * emb)


def train_reference_peak(case, elem: int) -> float:
    """Estimated extra peak of the reference step: what autograd keeps per sample and
    frame until the backward, summed over B·N — per scale the unfolded local tensor
    ``[HW, C_m, S]`` (kept by the matmul), the clamped ``[HW, S]`` distances and the
    ``[HW, S, L]`` bool masks, and the ``[Nq, Nr]`` global distances (kept by the clamp,
    all chunks) — plus the largest transient: one frame's ensembler input and its product
    with the weights, and the larger of the biggest unfolded tensor (its gradient in the
    backward) and a global ``[⌈Nq/4⌉, L, Nr]`` chunk. ``train-step/cfbip-b2-o2``: 13.8 GiB
    estimated, 13.3 GiB measured; a 59×59, C 128, B 1, 2-frame case: 0.68 / 0.68 GiB."""
    L = case.num_labels
    kept, transient = 0.0, 0.0
    for s, ((h, w), cm) in enumerate(zip(scale_sizes(case), matching_dims(case.channels))):
        hw, S, nr = h * w, _offsets(s), _candidates(h, w, s)
        kept += hw * S * (cm * elem + elem + L) + hw * nr * elem
        transient = max(transient, hw * S * cm * elem, -(-hw // REFERENCE_CHUNKS) * L * nr * elem)
    return float(case.batch * case.frames * kept + transient + 2 * _feature_elems(case) * elem)
