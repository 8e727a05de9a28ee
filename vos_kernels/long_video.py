"""``vos-kernels long-video``: stream thousands of frames through the LFU memory bank and
through STCN's unbounded every-k memory, and plot time and memory per frame.

Per frame t (STCN inference, ``../shared/spec/memory.md``): read the memory with frame t's
query keys (top-k, k = 20), then, on frames 0, mem_every, 2·mem_every, … write frame t's
keys and values. Two memories:

- **LFU bank** (:class:`vos_kernels.LFUMemoryBank`, fixed capacity in frames' worth of
  entries, frame 0 protected, usage ``"hits"``), read with the fused
  :func:`vos_kernels.topk_memory_read`: memory and time per frame must stay flat.
- **STCN every-k** (``torch.cat`` growth, no cap), read with STCN's dense path
  (:func:`vos_kernels.reference.topk_memory_read`: ``[Nm, Nq]`` affinity, top-k, scatter,
  dense ``bmm``): it grows until a frame takes longer than ``--naive-time-limit`` seconds,
  or its next read would need more than ``--naive-memory-limit`` GiB (three ``[Nm, Nq]``
  float32 buffers, the dense path's peak), or an allocation fails; the run stops there.

Streams: ``synthetic`` — STCN DAVIS sizes (Nq = 1620 = 30×54 pixels at stride 16, CK = 64,
CV = 512): a fixed scene of unit keys with AR(1) drift per frame, random values; and real
clips (``blackswan``, ``chair`` from ``../shared/data/vos``, or any DAVIS-layout folder):
frozen EfficientNet-Lite0 stride-16 features (unit-norm, CK = 112) as keys and the soft
one-hot ground-truth mask as values, the clip looped forwards and backwards.

Outputs (``--out``, default ``long_video_out``): ``long_video.json`` (every frame: time,
entries, stored bytes, peak extra memory of the frame's read + write, process RSS),
``long_video.md`` and ``long_video.png``. A method's memory per frame = the bytes it holds
(the bank's fixed buffers; STCN's growing key and value tensors) + the peak extra memory
of that frame's read and write (CPU: VmHWM − VmRSS after a ``clear_refs`` reset; CUDA:
``max_memory_allocated`` − allocated). Time: wall time of the frame's read + write.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path

import numpy as np

SHARED_CLIPS = Path(__file__).resolve().parents[2] / "shared" / "data" / "vos"


# ---------------------------------------------------------------------------- streams
class SyntheticStream:
    """STCN-sized synthetic frames: ``keys [1, Nq, CK]`` unit rows drifting by AR(1) noise
    around a fixed scene (so that frames resemble each other as video frames do),
    ``values [1, Nq, CV]`` standard normal."""

    name = "synthetic"

    def __init__(self, num_queries=1620, key_dim=64, value_dim=512, drift=0.35, seed=0, device="cpu"):
        import torch

        self.torch = torch
        self.g = torch.Generator().manual_seed(seed)
        self.num_queries, self.key_dim, self.value_dim, self.drift = num_queries, key_dim, value_dim, drift
        self.scene = torch.randn(num_queries, key_dim, generator=self.g)
        self.noise = torch.randn(num_queries, key_dim, generator=self.g)
        self.device = device

    def frame(self, t: int):
        torch = self.torch
        self.noise = 0.9 * self.noise + math.sqrt(1 - 0.81) * torch.randn(self.num_queries, self.key_dim,
                                                                          generator=self.g)
        key = torch.nn.functional.normalize(self.scene + self.drift * self.noise, dim=1)
        return key.unsqueeze(0).to(self.device)

    def values(self, t: int):
        return self.torch.randn(1, self.num_queries, self.value_dim, generator=self.g).to(self.device)


class ClipStream:
    """A real clip looped forwards and backwards: stride-16 EfficientNet-Lite0 features
    (unit-norm) as keys, the soft one-hot ground-truth mask (first-frame mask where a frame
    has none) as values. Features are computed once per distinct frame."""

    def __init__(self, path, scale=1.0, device="cpu", quiet=False):
        import torch
        import torch.nn.functional as F

        from vos_models.backbone import EfficientNetLite0Features
        from vos_models.stcn import soft_one_hot

        from .segment import load_frame, open_clip, read_mask

        clip = open_clip(str(path))
        self.name = clip.name
        label_of_id = clip.label_map()
        backbone = EfficientNetLite0Features(strides=(16,)).to(device)
        self.keys, self.vals = [], []
        mask = clip.first_mask
        from tqdm.auto import tqdm

        with torch.no_grad():
            for frame in tqdm(clip.frames, desc=f"features of {clip.name}", unit="frame", disable=quiet,
                              file=sys.stderr):
                x, _ = load_frame(frame, scale)
                f = F.normalize(backbone(x.to(device))[16].float(), dim=1)      # [1, C, h, w]
                if frame.stem in clip.annotations:
                    mask, _ = read_mask(clip.annotations[frame.stem], clip.size)
                labels = torch.from_numpy(label_of_id[mask]).to(device)
                v = soft_one_hot(labels, clip.num_labels, tuple(f.shape[-2:]))  # [1, L, h, w]
                self.keys.append(f.flatten(2).transpose(1, 2).contiguous())
                self.vals.append(v.flatten(2).transpose(1, 2).contiguous())
        self.num_queries, self.key_dim = self.keys[0].shape[1:]
        self.value_dim = self.vals[0].shape[2]
        n = len(self.keys)
        self.order = list(range(n)) + list(range(n - 2, 0, -1)) if n > 1 else [0]

    def frame(self, t: int):
        return self.keys[self.order[t % len(self.order)]]

    def values(self, t: int):
        return self.vals[self.order[t % len(self.order)]]


# ---------------------------------------------------------------------------- runners
def _rss() -> int | None:
    from ._memory import proc_status

    st = proc_status()
    return None if st is None else st["VmRSS"]


def run_stream(stream, frames: int, capacity_frames: float, mem_every: int, top_k: int,
               naive_time_limit: float, naive_memory_limit_gib: float, device, quiet: bool = False) -> dict:
    """Stream ``frames`` frames through the LFU bank and the STCN every-k memory."""
    import torch
    from tqdm.auto import tqdm

    from . import reference
    from ._memory import SectionMeter
    from .memory_bank import LFUMemoryBank

    Nq, CK, CV = stream.num_queries, stream.key_dim, stream.value_dim
    capacity = int(round(capacity_frames * Nq))
    bank = LFUMemoryBank(capacity, CK, CV, "hits", protect_first=True, device=device)
    bank_bytes = sum(b.numel() * b.element_size() for b in (bank.keys, bank.values, bank.usage, bank.birth))
    scale = 1.0 / math.sqrt(CK)
    meter = SectionMeter(torch.device(device))
    naive_keys = naive_values = None
    naive_stop = None
    bank_rows, naive_rows = [], []
    bar = tqdm(range(frames), desc=f"long video: {stream.name}", unit="frame", disable=quiet, file=sys.stderr)
    with torch.no_grad():
        for t in bar:
            q = stream.frame(t)
            write = t % mem_every == 0
            v = stream.values(t) if write else None

            def bank_step():
                if bank.size:
                    bank.read(q, top_k, scale)
                if write:
                    bank.add(q, v, t)

            _, dt, extra = meter.run(bank_step)
            bank_rows.append({"frame": t, "ms": round(dt * 1e3, 3), "extra_bytes": extra, "entries": bank.size,
                              "stored_bytes": bank_bytes,
                              "rss_bytes": _rss() if device == "cpu" else torch.cuda.memory_allocated()})
            if naive_stop is None:
                n_mem = 0 if naive_keys is None else naive_keys.shape[1]
                need = 3 * n_mem * Nq * 4
                if need > naive_memory_limit_gib * 2**30:
                    naive_stop = {"frame": t, "reason": f"the next read needs ~{need / 2**30:.1f} GiB > "
                                                        f"{naive_memory_limit_gib:g} GiB (--naive-memory-limit)"}
                else:
                    def naive_step():
                        nonlocal naive_keys, naive_values
                        if naive_keys is not None:
                            reference.topk_memory_read(q, naive_keys, naive_values, top_k, scale)
                        if write:
                            naive_keys = q if naive_keys is None else torch.cat([naive_keys, q], 1)
                            naive_values = v if naive_values is None else torch.cat([naive_values, v], 1)
                    try:
                        _, dt_n, extra_n = meter.run(naive_step)
                    except (RuntimeError, MemoryError) as exc:       # allocation failure
                        naive_stop = {"frame": t, "reason": f"out of memory: {str(exc).splitlines()[0][:200]}"}
                    else:
                        naive_rows.append({"frame": t, "ms": round(dt_n * 1e3, 3), "extra_bytes": extra_n,
                                           "entries": int(naive_keys.shape[1]),
                                           "stored_bytes": naive_keys.numel() * 4 + naive_values.numel() * 4,
                                           "rss_bytes": _rss() if device == "cpu" else torch.cuda.memory_allocated()})
                        if dt_n > naive_time_limit:
                            naive_stop = {"frame": t, "reason": f"{dt_n:.2f} s for one frame > {naive_time_limit:g} s "
                                                                "(--naive-time-limit)"}
                    if naive_stop is not None:
                        naive_keys = naive_values = None                     # free it for the bank's run
            if not quiet and t % 50 == 0:
                bar.set_postfix(bank_ms=f"{bank_rows[-1]['ms']:.0f}",
                                naive_ms=f"{naive_rows[-1]['ms']:.0f}" if naive_stop is None and naive_rows else "stopped")
    bar.close()
    return {"stream": stream.name, "num_queries": Nq, "key_dim": CK, "value_dim": CV,
            "capacity_entries": capacity, "capacity_frames": capacity_frames, "mem_every": mem_every,
            "top_k": top_k, "frames": frames, "bank": bank_rows, "naive": naive_rows, "naive_stop": naive_stop,
            "bank_evicted_total": bank.evicted_total}


def _stats(rows: list[dict], skip: int) -> dict:
    ms = np.array([r["ms"] for r in rows[skip:]]) if len(rows) > skip else np.array([np.nan])
    rss = np.array([r["rss_bytes"] or 0 for r in rows[skip:]]) if len(rows) > skip else np.array([0])
    return {"ms_median": float(np.median(ms)), "ms_p99": float(np.percentile(ms, 99)), "ms_max": float(ms.max()),
            "rss_min": int(rss.min()), "rss_max": int(rss.max()),
            "extra_max": int(max((r["extra_bytes"] for r in rows), default=0)),
            "memory_max": int(max((r["stored_bytes"] + r["extra_bytes"] for r in rows), default=0))}


def summarise(res: dict) -> dict:
    """Flatness of the bank's curves: median / p99 time and the RSS range after warm-up
    (the first 2·capacity write periods), and where the naive memory stopped."""
    warm = int(math.ceil(res["capacity_frames"] + 2)) * res["mem_every"]
    bank = _stats(res["bank"], warm)
    first = res["bank"][warm: warm + 500]
    last = res["bank"][-500:]
    bank["ms_median_first_500"] = float(np.median([r["ms"] for r in first])) if first else None
    bank["ms_median_last_500"] = float(np.median([r["ms"] for r in last])) if last else None
    out = {"bank": bank, "warmup_frames": warm}
    if res["naive"]:
        n = res["naive"][-1]
        out["naive"] = {"frames_run": len(res["naive"]), "last_ms": n["ms"], "last_entries": n["entries"],
                        "extra_max": max(r["extra_bytes"] for r in res["naive"]),
                        "memory_max": max(r["stored_bytes"] + r["extra_bytes"] for r in res["naive"]),
                        "rss_max": max(r["rss_bytes"] or 0 for r in res["naive"]),
                        "stop": res["naive_stop"]}
    return out


# ---------------------------------------------------------------------------- report
def _plot(results: list[dict], dest: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(5.2 * len(results), 6.4), squeeze=False)
    for j, res in enumerate(results):
        ax_t, ax_m = axes[0, j], axes[1, j]
        b, n = res["bank"], res["naive"]
        xb = [r["frame"] for r in b]
        b = [r for r in b if r["frame"] > 0]                 # frame 0 only writes
        n = [r for r in n if r["frame"] > 0]
        xb = [r["frame"] for r in b]
        ax_t.plot(xb, [r["ms"] for r in b], lw=0.3, color="C0", alpha=0.35)
        w = 25
        if len(b) > w:
            smooth = np.convolve([r["ms"] for r in b], np.ones(w) / w, mode="valid")
            ax_t.plot(xb[w - 1:], smooth, color="C0", label=f"LFU bank ({res['capacity_frames']:g} frames), fused read "
                                                             f"(mean of {w})")
        else:
            ax_t.plot(xb, [r["ms"] for r in b], color="C0", label="LFU bank, fused read")
        ax_m.plot(xb, [(r["stored_bytes"] + r["extra_bytes"]) / 2**20 for r in b], color="C0",
                  label="LFU bank: buffers + read peak extra")
        if n:
            xn = [r["frame"] for r in n]
            ax_t.plot(xn, [r["ms"] for r in n], color="C3", label="STCN every-k, dense read")
            ax_m.plot(xn, [(r["stored_bytes"] + r["extra_bytes"]) / 2**20 for r in n], color="C3",
                      label="STCN every-k: memory + read peak extra")
            if res["naive_stop"]:
                for ax in (ax_t, ax_m):
                    ax.axvline(max(1, res["naive_stop"]["frame"]), color="C3", lw=0.8, ls="--")
                ax_t.text(max(1, res["naive_stop"]["frame"]) * 1.1, 0.5, "STCN memory stopped:\n" +
                          res["naive_stop"]["reason"].split(" (")[0], transform=ax_t.get_xaxis_transform(),
                          fontsize=6, color="C3", va="center")
        ax_t.set_yscale("log")
        ax_t.set_title(f"{res['stream']}: Nq={res['num_queries']}, CK={res['key_dim']}, CV={res['value_dim']}",
                       fontsize=9)
        ax_t.set_ylabel("ms per frame (read + write)")
        ax_m.set_ylabel("MiB")
        ax_m.set_yscale("log")
        ax_m.set_xlabel("frame index")
        for ax in (ax_t, ax_m):
            ax.set_xscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("Long video: fixed-capacity LFU bank vs STCN's growing memory", fontsize=10)
    fig.tight_layout()
    fig.savefig(dest, dpi=110)
    plt.close(fig)


def _markdown(doc: dict) -> str:
    lines = [f"# Long video: LFU bank vs STCN every-k memory ({doc['device_name']}, {doc['threads']} threads, "
             f"{doc['date']})", "",
             f"k = {doc['top_k']}, write every {doc['mem_every']} frames, bank capacity {doc['capacity_frames']:g} "
             "frames' worth of entries (frame 0 protected, usage = top-k hits).", "",
             "| stream | frames | bank ms/frame median (first 500 / last 500) | p99 | bank buffers + read peak extra | "
             "process RSS min–max | STCN every-k: frames run | its last frame | its entries | its memory + read "
             "peak extra | stopped because |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for res in doc["results"]:
        s = res["summary"]
        b, n = s["bank"], s.get("naive", {})
        first_last = (f"{b['ms_median']:.1f} ({b['ms_median_first_500']:.1f} / {b['ms_median_last_500']:.1f})"
                      if b["ms_median_first_500"] is not None else f"{b['ms_median']:.1f}")
        stop = (n.get("stop") or {}).get("reason", "not stopped")
        lines.append(
            f"| {res['stream']} (Nq {res['num_queries']}, CK {res['key_dim']}, CV {res['value_dim']}) | {res['frames']} | "
            f"{first_last} | {b['ms_p99']:.1f} | {b['memory_max'] / 2**20:.1f} MiB | "
            f"{b['rss_min'] / 2**20:.0f}–{b['rss_max'] / 2**20:.0f} MiB | "
            f"{n.get('frames_run', 0)} | {n.get('last_ms', float('nan')):.0f} ms | {n.get('last_entries', 0)} | "
            f"{n.get('memory_max', 0) / 2**20:.0f} MiB | {stop} |")
    lines += ["", "Plot: `long_video.png`. Data (every frame): `long_video.json`. Command: `" + doc["command"] + "`.", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- CLI
def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="vos-kernels long-video")
    p.description = ("Stream a long video through the fixed-capacity LFU memory bank (fused top-k read) and "
                     "STCN's growing every-k memory (dense read); plot time and memory per frame.")
    p.add_argument("--streams", nargs="+", default=["synthetic", "blackswan", "chair"],
                   help="'synthetic', a clip name under ../shared/data/vos, or a DAVIS-layout folder "
                        "(default: synthetic blackswan chair)")
    p.add_argument("--frames", type=int, default=10_000, help="frames per stream (default 10000)")
    p.add_argument("--capacity-frames", type=float, default=2.0,
                   help="LFU bank capacity in frames' worth of entries, frame 0 included (default 2)")
    p.add_argument("--mem-every", type=int, default=5, help="write period in frames (default 5, STCN)")
    p.add_argument("--top-k", type=int, default=20, help="k (default 20, STCN)")
    p.add_argument("--naive-time-limit", type=float, default=2.0,
                   help="stop STCN's memory when one frame takes longer (seconds, default 2)")
    p.add_argument("--naive-memory-limit", type=float, default=8.0,
                   help="stop STCN's memory when its next read would need more (GiB, default 8)")
    p.add_argument("--num-queries", type=int, default=1620, help="synthetic: query pixels per frame (default 1620)")
    p.add_argument("--key-dim", type=int, default=64, help="synthetic: CK (default 64)")
    p.add_argument("--value-dim", type=int, default=512, help="synthetic: CV (default 512)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--out", default="long_video_out", help="output folder (default long_video_out)")
    p.add_argument("--quiet", action="store_true")
    return p


def _check(args) -> None:
    for name in ("frames", "mem_every", "top_k", "num_queries", "key_dim", "value_dim"):
        if getattr(args, name) < 1:
            raise SystemExit(f"vos-kernels long-video: error: --{name.replace('_', '-')} must be >= 1")
    if args.capacity_frames < 2:
        raise SystemExit("vos-kernels long-video: error: --capacity-frames must be >= 2 (frame 0 is kept)")
    if not (args.naive_time_limit > 0 and args.naive_memory_limit > 0):
        raise SystemExit("vos-kernels long-video: error: the --naive-* limits must be > 0")


def run_cli(args: argparse.Namespace) -> int:
    import torch

    from ._memory import cpu_name

    _check(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("vos-kernels long-video: error: --device cuda: torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.streams:
        if name == "synthetic":
            stream = SyntheticStream(args.num_queries, args.key_dim, args.value_dim, device=args.device)
        else:
            path = Path(name)
            if not path.is_dir():
                path = SHARED_CLIPS / name
            if not path.is_dir():
                raise SystemExit(f"vos-kernels long-video: error: no clip folder {name!r} (nor {path})")
            stream = ClipStream(path, device=args.device, quiet=args.quiet)
        res = run_stream(stream, args.frames, args.capacity_frames, args.mem_every, args.top_k,
                         args.naive_time_limit, args.naive_memory_limit, args.device, args.quiet)
        res["summary"] = summarise(res)
        results.append(res)
    doc = {"date": datetime.date.today().isoformat(), "device": args.device,
           "device_name": torch.cuda.get_device_name() if args.device == "cuda" else cpu_name(),
           "threads": torch.get_num_threads(), "torch": torch.__version__,
           "capacity_frames": args.capacity_frames, "mem_every": args.mem_every, "top_k": args.top_k,
           "command": "vos-kernels long-video " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["long-video"]
                                                             else sys.argv[1:]),
           "results": results}
    (out / "long_video.json").write_text(json.dumps(doc, separators=(",", ":")) + "\n")
    (out / "long_video.md").write_text(_markdown(doc))
    _plot(results, out / "long_video.png")
    if not args.quiet:
        print(_markdown(doc))
        print(f"wrote {out / 'long_video.json'}, long_video.md, long_video.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
