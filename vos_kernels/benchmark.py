"""Benchmark harness: fused kernels against the naive references (CFBI matching, STCN's
dense top-k read, PCAN / EMANet einsum chains, A-GAME's per-component loops).

Runs every case of the suite (``../shared/spec/benchmarks.md``) for the fused op
(``vos_kernels.<op>``: the C++ kernels with backend ``"cpu"`` on CPU, ``"auto"`` on CUDA)
and for the naive baseline (``vos_kernels.reference.<op>``, CFBI's chunked global
matching and unfold-based local matching), on the same fresh random inputs, and writes
to ``--out``:

* ``results.json``: environment (device, torch / triton / CUDA versions, threads, git
  commit, date), measured ceilings (a large matmul and a large copy), peers, and per case:
  time (median, IQR, min, max, runs), speedup = reference / fused, peak extra memory of
  each, achieved GFLOP/s and GB/s, max abs error of fg and bg against the reference run in
  float64 on float64 copies of the inputs (``"train-step"``, a CFBI+ matching-head
  training step of :mod:`vos_kernels.benchmark_train`: against the fused head in float64;
  ``oracle`` per case says which), and ``"OOM"`` / ``"skipped"`` with a reason
  where the reference cannot run;
* ``results.md``: the markdown table (also printed at the end);
* ``speedup_memory.png``: speedup and peak extra memory per case, and the scaling sweep
  (time and memory vs pixels), log scales.

``results.json`` and ``results.md`` are rewritten after every case, so a run cut off by a
time limit keeps the cases it finished; ``--resume`` then runs only the selected cases
that ``--out`` does not hold yet (or that ended in an error) and keeps the others, which is
how a suite longer than one GPU lease call is measured in several calls. It refuses to
mix runs with other settings or another device.

A case can end the process (a CUDA kernel that faults or hangs). ``OUT/running.json``
names the case that runs (name, start, pid, attempt); it is removed once the case's
results are written. ``--case-timeout`` (default 300 s on CUDA, off on CPU) ends the
process when a case runs longer, with every thread's Python traceback in
``OUT/hang-traceback.txt``. On CUDA a small probe after every case checks the CUDA
context; where the case left it unusable, its record gets ``fatal`` ("CUDA context lost:
...") and the run stops there (exit status 75), since every later case would fail.
``--resume`` finds a ``running.json`` left behind and records that case as an error with
``fatal`` (the process died in it). ``attempts`` counts the runs of a case since its last
record without ``fatal``: ``--resume`` runs a case with a fatal record once more (an
outside time limit may have killed it) and not after a second fatal end, which stays in
``results.json`` as an error. Other errors are re-run by every ``--resume``.

Exit status: 0 every case ran without error; 1 some case has an error (fatal ones
included), or the watchdog ended a hung case (``running.json`` left behind); 2 a usage
error (options, a ``--out`` measured with other settings); 75 the CUDA context was lost.
A driver runs again with ``--resume`` while the status is 75 or ``OUT/running.json``
exists (a hang, a fault that killed the process, a kill from outside); this ends, as a
case ends fatally at most twice. ``--isolate`` is that driver: the cases run in child
processes, a fresh one with ``--resume`` after each such end (scripts/gpu_check.sh uses it).

Method
------
Time: one warm-up call (its outputs are the ones checked), then: a call slower than
``min_run_time / repeats`` is run ``--repeats`` times, once each (the reference takes
seconds at paper size); a faster one with ``torch.utils.benchmark.Timer``
(``num_threads`` set explicitly) ``.blocked_autorange(min_run_time)`` on CPU, or blocks
of calls timed with CUDA events on CUDA. The median and the spread (IQR, min, max) of
the per-call times are reported.

Memory on CPU: a fresh subprocess per (case, implementation)
(``python -m vos_kernels.benchmark --_memory-worker SPEC``) warms the op up on a tiny
input (code pages, thread pools), creates the inputs, resets the peak resident set size
(``/proc/self/clear_refs``), runs the op once and reports ``peak RSS − RSS before``
(``VmHWM − VmRSS``). ``getrusage().ru_maxrss`` is the fallback where ``/proc`` is not
available; it is not the default because on Linux a child's ``ru_maxrss`` starts at its
parent's peak (kept across fork + exec), and a peak reached while importing torch hides
any smaller extra. On CUDA: ``torch.cuda.max_memory_allocated()`` after
``reset_peak_memory_stats()``, minus what was allocated before the call (the inputs).

A reference whose estimated peak exceeds ``--max-reference-gib`` is skipped with the
reason recorded; a memory error while it runs is recorded as ``"OOM"``. The float64
oracle is run in pieces of about 8 GiB (query chunks for global matching, row bands with
a halo of the largest window for local matching), which gives the same values.

Usage::

    python -m vos_kernels.benchmark                      # full suite, CPU
    python -m vos_kernels.benchmark --quick              # tiny sizes, seconds
    python -m vos_kernels.benchmark --cases 'global/*' --device cuda
    python -m vos_kernels.benchmark --device cuda --out DIR --resume   # go on where DIR stopped
    python benchmarks/run.py --list
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import fnmatch
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vos_kernels._memory import cpu_name, proc_status, reset_peak_rss, ru_maxrss

import torch

from . import benchmark_gmm as _G
from . import benchmark_train as _T
from . import reference as _reference
from ._backend import BACKENDS, get_backend, set_backend
from ._device_guard import CONTEXT_LOST_EXIT, cuda_context_lost, error_line, watchdog
from .matching import fb_global_matching, fb_multi_local_matching
from .memory import topk_memory_read

__all__ = ["CASE_GROUPS", "Case", "OPS", "FULL_CASES", "QUICK_CASES", "implementation", "make_inputs", "main",
           "run_case", "select_cases"]

MiB = 2**20
GiB = 2**30
IGNORE_FRACTION = 0.05   # share of label -1 (ignore) pixels in the random label maps
BIAS_BG, BIAS_FG = -0.25, 0.25   # CFBI's bias vector [b_B, b_F, b_F, ...]
ORACLE_PIECE_BYTES = 8 * GiB     # memory budget of one piece of the float64 oracle
REFERENCE_CHUNKS = 4             # n_chunks of the timed reference (CFBI's default)
_WORKER_MARK = "VOS_KERNELS_MEMORY_RESULT "
TOPK_AMBIGUOUS_GAP = 1e-4        # top-k read: k-th vs (k+1)-th affinity gap of a near tie


# ------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    """One benchmark configuration (batch 1 unless said otherwise).

    ``op`` is ``"global"`` (query ``[B,H,W,C]`` against a reference ``[B,T,Hr,Wr,C]``),
    ``"local"`` (query and previous frame ``[B,H,W,C]``, ``windows``), ``"topk"`` (top-k
    memory read: ``height·width`` query keys against ``frames·height·width`` memory
    entries, ``channels`` = CK, ``value_channels`` = CV, ``topk`` = k), or a GMM workload of
    :mod:`vos_kernels.benchmark_gmm` (``"em"``, ``"pcan-instance"``, ``"agame"``: ``batch``
    problems (RoIs) of ``height·width`` points, ``channels`` = C or D, ``components`` = K,
    ``iters``, ``kappa``; ``frames`` = unrolled frames for A-GAME), or ``"train-step"``
    (:mod:`vos_kernels.benchmark_train`: a CFBI+ matching-head training step, forward +
    backward; ``height × width`` = the stride-4 map, ``channels`` = C per scale,
    ``num_labels`` = objects + 1, ``batch``, ``frames`` = sequential current frames).
    ``sweep`` names the scaling sweep a case belongs to (None for the paper-sized cases);
    ``scale`` is its factor per side.
    """

    name: str
    op: str
    height: int
    width: int
    channels: int
    num_labels: int
    atrous_rate: int = 1
    windows: tuple[int, ...] = ()
    ref_height: int | None = None
    ref_width: int | None = None
    frames: int = 1
    batch: int = 1
    sweep: str | None = None
    scale: int = 1
    value_channels: int = 0
    topk: int = 0
    components: int = 0
    iters: int = 0
    kappa: float = 0.0

    @property
    def ref_hw(self) -> tuple[int, int]:
        """Reference frame size (global matching); the query size unless given."""
        return (self.ref_height or self.height, self.ref_width or self.width)

    @property
    def pixels(self) -> int:
        """Query pixels per batch element."""
        return self.height * self.width

    def sizes(self) -> str:
        """Human-readable sizes for the tables."""
        hw = f"{self.height}×{self.width}"
        if self.op == "train-step":
            return _T.sizes(self)
        if self.op == "em":
            return (f"B {self.batch}, N {self.pixels}, C {self.channels}, K {self.components}, "
                    f"{self.iters} iters, κ {self.kappa:g}")
        if self.op == "pcan-instance":
            return (f"R {self.batch}, N {self.pixels}, C {self.channels}, K {self.components}+{self.components}, "
                    f"4 EM calls + read")
        if self.op == "agame":
            return f"B {self.batch}, N {self.pixels}, D {self.channels}, K 4, {self.frames}-frame unroll, fwd+bwd"
        if self.op == "topk":
            return (f"Nq {self.pixels}, Nm {self.frames}×{self.pixels}, CK {self.channels}, "
                    f"CV {self.value_channels}, k {self.topk}" + (f", B {self.batch}" if self.batch > 1 else ""))
        if self.op == "global":
            hr, wr = self.ref_hw
            ref = f"{self.frames}×{hr}×{wr}" if self.frames > 1 else f"{hr}×{wr}"
            s = f"q {hw}, ref {ref}"
        else:
            w = self.windows
            s = f"{hw}, w {w[0]}..{w[-1]}" if len(w) > 1 else f"{hw}, w {w[0]}"
        s += f", C {self.channels}, L {self.num_labels}"
        if self.atrous_rate > 1:
            s += f", r {self.atrous_rate}"
        return s + (f", B {self.batch}" if self.batch > 1 else "")

    def shrunk(self, size: int = 8) -> "Case":
        """The same configuration at a tiny frame size (the memory worker's warm-up; a
        train-step case: an 8×8 stride-4 map, 4×4 and 2×2 below, 29×29 labels)."""
        return dataclasses.replace(self, height=size, width=size, ref_height=None, ref_width=None)


CFBIP_S4_WINDOWS = (4, 8, 12, 16, 20, 24)
S8_WINDOWS = (2, 4, 6, 8, 10, 12)
S16_WINDOWS = (2, 4, 6, 8, 10)


def _sweep(name: str, base: Case, scales: Sequence[int] = (1, 2, 4)) -> list[Case]:
    """Scaling sweep: ``base`` with both sides multiplied by each factor."""
    return [
        dataclasses.replace(
            base, name=f"{base.op}/{name}-x{s}", height=base.height * s, width=base.width * s, sweep=name, scale=s
        )
        for s in scales
    ]


FULL_CASES: list[Case] = [
    # Global matching (CFBI+ eq. 2-3, atrous eq. 8-9).
    Case("global/cfbip-davis-s4-a2", "global", 120, 214, 32, 4, atrous_rate=2),
    Case("global/cfbip-ytvos-s4-a2", "global", 145, 261, 32, 6, atrous_rate=2),
    Case("global/cfbi-davis-s4", "global", 120, 214, 100, 4),
    Case("global/cfbip-s8", "global", 60, 107, 64, 4),
    Case("global/cfbip-s16", "global", 30, 54, 128, 4),
    # Multi-local matching (CFBI+ eq. 4-7, 10-12).
    Case("local/cfbip-davis-s4-a2", "local", 120, 214, 32, 4, atrous_rate=2, windows=CFBIP_S4_WINDOWS),
    Case("local/cfbip-ytvos-s4-a2", "local", 145, 261, 32, 6, atrous_rate=2, windows=CFBIP_S4_WINDOWS),
    Case("local/cfbip-s8", "local", 60, 107, 64, 4, windows=S8_WINDOWS),
    Case("local/cfbip-s16", "local", 30, 54, 128, 4, windows=S16_WINDOWS),
    Case("local/cfbi-s8-down", "local", 61, 108, 100, 4, windows=S8_WINDOWS),
    # Scaling sweeps: 60×107 → 120×214 → 240×428.
    *_sweep("sweep-a2-c32", Case("", "global", 60, 107, 32, 4, atrous_rate=2)),
    *_sweep("sweep-a2-c32", Case("", "local", 60, 107, 32, 4, atrous_rate=2, windows=CFBIP_S4_WINDOWS)),
]

def _topk_sweep(name: str, hw: tuple[int, int], frames: Sequence[int], cv: int = 512, k: int = 20) -> list[Case]:
    """STCN top-k read at 1/16 of the frame (benchmarks.md): T memory frames per case."""
    return [Case(f"topk/{name}-t{t}", "topk", hw[0], hw[1], 64, 1, frames=t, value_channels=cv, topk=k,
                 sweep=name, scale=t) for t in frames]


FULL_CASES += [
    # Top-k memory read (STCN; AMM / XMem usage): DAVIS 480p (30×54 = 1620 queries) and 720p.
    *_topk_sweep("stcn-davis", (30, 54), (1, 5, 20, 50, 100)),
    Case("topk/stcn-davis-t20-o2", "topk", 30, 54, 64, 1, frames=20, value_channels=1024, topk=20),
    Case("topk/stcn-davis-t20-o5", "topk", 30, 54, 64, 1, frames=20, value_channels=2560, topk=20),
    *_topk_sweep("stcn-720p", (45, 80), (5, 20, 50)),
]

FULL_CASES += [
    # GMM prototypes (PCAN, EMANet) and A-GAME (gmm.md): N points in one row (height 1).
    # PCAN's two FPN levels at 1296×720 (stride 8: P3, stride 4: P2) double as a sweep (×2 per side)
    Case("em/pcan-p3", "em", 1, 15088, 256, 1, components=30, iters=3, kappa=20.0, sweep="pcan-fpn", scale=1),
    Case("em/pcan-p2", "em", 1, 60352, 256, 1, components=30, iters=3, kappa=20.0, sweep="pcan-fpn", scale=2),
    Case("em/emanet-b2", "em", 1, 4225, 512, 1, batch=2, components=64, iters=3, kappa=1.0),
    Case("pcan-instance/r64", "pcan-instance", 14, 14, 256, 1, batch=64, components=10),
    Case("pcan-instance/r100", "pcan-instance", 14, 14, 256, 1, batch=100, components=10),
    Case("agame/stage1-b4-n405", "agame", 15, 27, 512, 1, batch=4, frames=8),
    Case("agame/stage2-b2-n1620", "agame", 30, 54, 512, 1, batch=2, frames=8),
]

FULL_CASES += [
    # CFBI+ matching-head training step (benchmark_train.py): 465×465 crops → stride-4 map
    # 117×117 (59×59, 30×30 below), C 256 per scale, batch 2, 3 sequential frames, fwd + bwd.
    Case("train-step/cfbip-b2-o2", "train-step", 117, 117, 256, 3, batch=2, frames=3),
    Case("train-step/cfbip-b2-o5", "train-step", 117, 117, 256, 6, batch=2, frames=3),
]

QUICK_CASES: list[Case] = [
    *_sweep("quick-a2", Case("", "global", 20, 30, 16, 3, atrous_rate=2), scales=(1, 2)),
    Case("local/quick-a2", "local", 20, 30, 16, 3, atrous_rate=2, windows=(2, 4, 6), sweep="quick-a2"),
    *_topk_sweep("quick", (10, 12), (2, 8), cv=32, k=8),
    Case("em/quick", "em", 1, 500, 32, 1, components=8, iters=3, kappa=20.0),
    Case("pcan-instance/quick", "pcan-instance", 14, 14, 32, 1, batch=4, components=4),
    Case("agame/quick", "agame", 6, 8, 16, 1, batch=2, frames=3),
    Case("train-step/quick", "train-step", 12, 12, 16, 3, batch=2, frames=2),
]


# Named groups of full cases, selected by ``--cases @NAME``. "aims": the paper sizes that
# issue 7's aims are stated on (global CFBI+ YouTube-VOS stride 4 atrous 2 and CFBI DAVIS
# C 100; local CFBI+ stride 4; top-k STCN DAVIS over T, for "memory linear in T", and
# 720p T 50; PCAN EM and instance head; EMANet; A-GAME; the CFBI+ training step): what a
# short GPU lease measures first (scripts/gpu_check.sh).
CASE_GROUPS: dict[str, tuple[str, ...]] = {
    "aims": ("global/cfbip-ytvos-s4-a2", "global/cfbi-davis-s4", "local/cfbip-davis-s4-a2",
             "local/cfbip-ytvos-s4-a2", "topk/stcn-davis-t5", "topk/stcn-davis-t20", "topk/stcn-davis-t50",
             "topk/stcn-720p-t50", "em/pcan-p2", "em/emanet-b2", "pcan-instance/r100",
             "agame/stage2-b2-n1620", "train-step/cfbip-b2-o2"),
}


def select_cases(cases: Sequence[Case], patterns: str | None) -> list[Case]:
    """Cases whose name matches one of the comma-separated ``patterns``: a glob
    (``*``, ``?``, ``[``) matches the whole name, ``@NAME`` the names of ``CASE_GROUPS[NAME]``,
    anything else is a substring. Raises ``ValueError`` for an unknown group."""
    if not patterns:
        return list(cases)
    pats = [p.strip() for p in patterns.split(",") if p.strip()]
    for p in pats:
        if p.startswith("@") and p[1:] not in CASE_GROUPS:
            raise ValueError(f"unknown case group {p!r}; groups: {', '.join('@' + g for g in CASE_GROUPS)}")

    def hit(name: str, pat: str) -> bool:
        if pat.startswith("@"):
            return name in CASE_GROUPS[pat[1:]]
        return fnmatch.fnmatchcase(name, pat) if any(ch in pat for ch in "*?[") else pat in name

    return [c for c in cases if any(hit(c.name, p) for p in pats)]


# ------------------------------------------------------------------------ op table
def _seed(case: Case, base_seed: int) -> int:
    """A fixed seed per case name: fresh inputs per case, reproducible run to run."""
    return (zlib.crc32(case.name.encode()) + base_seed) % 2**31


def _embedding(gen: torch.Generator, shape: Sequence[int]) -> torch.Tensor:
    """N(0, 1/C) embeddings: squared distances of order 1, so fg is not saturated at 1."""
    return torch.randn(*shape, generator=gen).mul_(1.0 / math.sqrt(shape[-1]))


def _labels(gen: torch.Generator, shape: Sequence[int], num_labels: int) -> torch.Tensor:
    """Uniform labels 0..L-1 with IGNORE_FRACTION of -1 (ignore) pixels, int64."""
    lab = torch.randint(0, num_labels, tuple(shape), generator=gen)
    return lab.masked_fill_(torch.rand(tuple(shape), generator=gen) < IGNORE_FRACTION, -1)


def _bias(num_labels: int) -> torch.Tensor:
    return torch.tensor([BIAS_BG] + [BIAS_FG] * (num_labels - 1))


def _global_inputs(case: Case, gen: torch.Generator) -> dict:
    B, T, C = case.batch, case.frames, case.channels
    hr, wr = case.ref_hw
    return dict(
        query=_embedding(gen, (B, case.height, case.width, C)),
        reference=_embedding(gen, (B, T, hr, wr, C)),
        reference_labels=_labels(gen, (B, T, hr, wr), case.num_labels),
        num_labels=case.num_labels,
        bias=_bias(case.num_labels),
        atrous_rate=case.atrous_rate,
    )


def _local_inputs(case: Case, gen: torch.Generator) -> dict:
    B, H, W, C = case.batch, case.height, case.width, case.channels
    return dict(
        query=_embedding(gen, (B, H, W, C)),
        previous=_embedding(gen, (B, H, W, C)),
        previous_labels=_labels(gen, (B, H, W), case.num_labels),
        num_labels=case.num_labels,
        windows=list(case.windows),
        bias=_bias(case.num_labels),
        atrous_rate=case.atrous_rate,
    )


def _global_candidates(case: Case, inputs: dict | None = None) -> int:
    """Reference pixels on the atrous grid (labelled ones when ``inputs`` are given)."""
    r = case.atrous_rate
    if inputs is not None:
        return int((inputs["reference_labels"][..., ::r, ::r] >= 0).sum())
    hr, wr = case.ref_hw
    return case.batch * case.frames * -(-hr // r) * -(-wr // r)


def _local_offsets(case: Case) -> int:
    """Offsets of the largest window on the atrous grid: (2·⌊D/r⌋ + 1)²."""
    return (2 * (max(case.windows) // case.atrous_rate) + 1) ** 2


def _global_flops(case: Case, inputs: dict) -> float:
    """2·Nq·Nr·C with Nr the candidate (labelled, atrous-grid) reference pixels."""
    return 2.0 * case.pixels * _global_candidates(case, inputs) * case.channels


def _local_flops(case: Case, inputs: dict) -> float:
    """2·HW·(2k/r+1)²·C for the largest window k (benchmarks.md)."""
    return 2.0 * case.batch * case.pixels * _local_offsets(case) * case.channels


def _global_bytes(case: Case) -> float:
    """Each input read once, fg / bg (f32) and the argmin index (i64) written once."""
    hr, wr = case.ref_hw
    nr = case.batch * case.frames * hr * wr
    nq = case.batch * case.pixels
    return 4.0 * (nq + nr) * case.channels + 8.0 * nr + 16.0 * case.num_labels * nq


def _local_bytes(case: Case) -> float:
    """Query and previous read once, labels once, fg / bg / index written once."""
    n = case.batch * case.pixels
    return 8.0 * n * case.channels + 8.0 * n + 16.0 * case.num_labels * len(case.windows) * n


def _global_reference_peak(case: Case, elem: int, n_chunks: int = REFERENCE_CHUNKS) -> float:
    """Estimated extra peak of the reference: the ``[m, L, N]`` masked distances plus
    ~3 ``[m, N]`` temporaries per chunk of m = ⌈Nq / n_chunks⌉ queries (within a few % of
    the measured peak)."""
    m = -(-case.pixels // n_chunks)
    n = _global_candidates(case) // case.batch
    return float(elem) * m * n * (case.num_labels + 3)


def _local_reference_peak(case: Case, elem: int, rows: int | None = None) -> float:
    """Estimated extra peak of the reference: the unfolded ``[HW, C, S]`` previous frame
    plus ~3 ``[HW, S, L]`` mask / distance tensors and ~3 ``[HW, S]`` ones, S = offsets of
    the largest window (within a few % of the measured peak); ``rows`` = a band of that
    many rows."""
    hw = (rows or case.height) * case.width
    return float(elem) * hw * _local_offsets(case) * (case.channels + 3 * case.num_labels + 3)


def _global_oracle(case: Case, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference fg / bg in float64, the queries in chunks of at most ORACLE_PIECE_BYTES."""
    n_chunks = max(REFERENCE_CHUNKS, math.ceil(_global_reference_peak(case, 8, 1) / ORACLE_PIECE_BYTES))
    n_chunks = min(n_chunks, case.pixels)
    return _reference.fb_global_matching(**_as_float64(inputs), n_chunks=n_chunks)


def _local_oracle(case: Case, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference fg / bg in float64, in row bands with a halo of the largest window
    (exact: a query pixel only sees previous pixels within the window; frame edges stay
    edges), each of about ORACLE_PIECE_BYTES; a band is at least twice the halo, so the
    halos at most double the work."""
    x = _as_float64(inputs)
    H, halo = case.height, max(case.windows)
    per_row = _local_reference_peak(case, 8, 1)
    band = max(2 * halo, int(ORACLE_PIECE_BYTES // per_row) - 2 * halo)
    if band >= H:
        return _reference.fb_multi_local_matching(**x)
    fgs, bgs = [], []
    for y0 in range(0, H, band):
        y1 = min(H, y0 + band)
        lo, hi = max(0, y0 - halo), min(H, y1 + halo)
        piece = dict(x, query=x["query"][:, lo:hi], previous=x["previous"][:, lo:hi],
                     previous_labels=x["previous_labels"][:, lo:hi])
        fg, bg = _reference.fb_multi_local_matching(**piece)
        fgs.append(fg[..., y0 - lo:y1 - lo, :])
        bgs.append(bg[..., y0 - lo:y1 - lo, :])
    return torch.cat(fgs, -2), torch.cat(bgs, -2)


def _topk_inputs(case: Case, gen: torch.Generator) -> dict:
    B, nq, nm = case.batch, case.pixels, case.frames * case.pixels
    return dict(query_key=_embedding(gen, (B, nq, case.channels)), memory_key=_embedding(gen, (B, nm, case.channels)),
                memory_value=torch.randn(B, nm, case.value_channels, generator=gen), k=case.topk,
                usage=torch.zeros(B, nm), usage_mode="hits")


def _topk_flops(case: Case, inputs: dict) -> float:
    """2·Nq·Nm·CK (affinity) + 2·Nq·k·CV (gather readout), benchmarks.md."""
    nq, nm = case.batch * case.pixels, case.frames * case.pixels
    return 2.0 * nq * nm * case.channels + 2.0 * nq * min(case.topk, nm) * case.value_channels


def _topk_bytes(case: Case) -> float:
    """Keys read once, k value rows gathered per query, readout and usage written once."""
    nq, nm = case.batch * case.pixels, case.batch * case.frames * case.pixels
    return 4.0 * ((nq + nm) * case.channels + nq * min(case.topk, nm) * case.value_channels
                  + nq * case.value_channels + nm)


def _topk_reference_peak(case: Case, elem: int) -> float:
    """STCN's dense path: affinity, its top-k copy, the dense weight buffer and the hit
    counts, each ``[Nm, Nq]``."""
    return float(elem) * 4 * case.batch * case.frames * case.pixels * case.pixels


def _topk_oracle(case: Case, inputs: dict) -> tuple[torch.Tensor]:
    """The STCN reference in float64, the queries in pieces of at most ORACLE_PIECE_BYTES.

    Queries whose k-th and (k+1)-th float64 affinities differ by less than
    TOPK_AMBIGUOUS_GAP are set to NaN (left out of the max error): a float32 kernel may
    select either entry, and the readouts then differ by that entry's weight times its
    value, which is not an error of the kernel."""
    x = _as_float64(inputs)
    x["usage"] = None
    q, m = x["query_key"], x["memory_key"]
    nq, k = q.shape[1], x["k"]
    per_query = 8.0 * 4 * case.frames * case.pixels
    step = max(1, int(ORACLE_PIECE_BYTES // per_query))
    pieces = []
    for i in range(0, nq, step):
        qi = q[:, i:i + step]
        out = _reference.topk_memory_read(**dict(x, query_key=qi))
        if k < m.shape[1]:
            aff = (2 * torch.einsum("bnc,bqc->bqn", m, qi) - (m * m).sum(-1).unsqueeze(1)) / math.sqrt(m.shape[2])
            top = torch.topk(aff, k + 1, dim=-1).values
            ambiguous = (top[..., k - 1] - top[..., k]) < TOPK_AMBIGUOUS_GAP
            out = out.masked_fill(ambiguous.unsqueeze(-1), float("nan"))
        pieces.append(out)
    return (torch.cat(pieces, 1),)


@dataclass(frozen=True)
class Op:
    """What the harness needs to know about one matching op."""

    fused: Callable
    reference: Callable
    make_inputs: Callable[[Case, torch.Generator], dict]
    flops: Callable[[Case, dict], float]
    bytes_moved: Callable[[Case], float]
    reference_peak: Callable[[Case, int], float]
    oracle: Callable[[Case, dict], tuple]
    outputs: tuple[str, ...] = ("fg", "bg")
    oracle_text: str = "vos_kernels.reference in float64 on float64 copies of the inputs"


OPS: dict[str, Op] = {
    "global": Op(fb_global_matching, _reference.fb_global_matching, _global_inputs, _global_flops,
                 _global_bytes, _global_reference_peak, _global_oracle),
    "local": Op(fb_multi_local_matching, _reference.fb_multi_local_matching, _local_inputs, _local_flops,
                _local_bytes, _local_reference_peak, _local_oracle),
    "topk": Op(lambda **kw: (topk_memory_read(**kw),), lambda **kw: (_reference.topk_memory_read(**kw),),
               _topk_inputs, _topk_flops, _topk_bytes, _topk_reference_peak, _topk_oracle, ("readout",)),
    "em": Op(_G.em_fused, _G.em_reference, _G.em_inputs, _G.em_flops, _G.em_bytes, _G.em_reference_peak,
             _G.float64_oracle(_G.em_reference), ("means", "resp")),
    "pcan-instance": Op(_G.instance_fused, _G.instance_reference, _G.instance_inputs, _G.instance_flops,
                        _G.instance_bytes, _G.instance_reference_peak, _G.float64_oracle(_G.instance_reference),
                        ("read", "prototypes")),
    "agame": Op(_G.agame_fused, _G.agame_reference, _G.agame_inputs, _G.agame_flops, _G.agame_bytes,
                _G.agame_reference_peak, _G.float64_oracle(_G.agame_reference), ("grad_x", "grad_cov_reg")),
    "train-step": Op(_T.train_fused, _T.train_reference, _T.train_inputs, _T.train_flops, _T.train_bytes,
                     _T.train_reference_peak, _T.train_oracle, _T.OUTPUTS, _T.ORACLE_TEXT),
}


def _as_float64(inputs: dict) -> dict:
    return {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}


def make_inputs(case: Case, seed: int = 0, device: str | torch.device = "cpu") -> dict:
    """The keyword arguments of ``case``'s op (fused and reference take the same ones):
    random embeddings, labels with ignore pixels, bias ``[b_B, b_F, …]``, on ``device``."""
    gen = torch.Generator().manual_seed(_seed(case, seed))
    inputs = OPS[case.op].make_inputs(case, gen)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def fused_backend(device: torch.device) -> str:
    """The backend the fused side runs: the C++ kernels on CPU, the fastest on CUDA."""
    return "cpu" if device.type == "cpu" else "auto"


class _Backend:
    """Context manager: ``set_backend(name)`` inside, the previous choice restored after."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        self.before = get_backend()
        set_backend(self.name)

    def __exit__(self, *exc):
        set_backend(self.before)


def implementation(case: Case, which: str, device: torch.device, backend: str | None = None) -> Callable[..., tuple]:
    """``fn(**inputs) -> (fg, bg)`` for ``which`` in {"fused", "reference"}; the fused side
    runs ``backend`` (default :func:`fused_backend`)."""
    op = OPS[case.op]
    if which == "reference":
        return op.reference
    backend = backend or fused_backend(device)

    def fused(**inputs):
        with _Backend(backend):
            return op.fused(**inputs)

    return fused


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    msg = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg
                                              or "not enough memory" in msg or "failed to allocate" in msg)


# -------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cuda_block(fn: Callable[[], object], number: int, device: torch.device) -> float:
    """Mean seconds per call of ``number`` back-to-back calls, timed with CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(number):
        fn()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / 1e3 / number


def time_call(fn: Callable[[], object], device: torch.device, threads: int, repeats: int,
              min_run_time: float) -> dict:
    """Median and spread of the per-call time of ``fn()`` (already warmed up).

    A call slower than ``min_run_time / repeats`` is run ``repeats`` times, one call per
    sample (``torch.utils.benchmark.Timer.timeit`` would add two warm-up calls per sample,
    seconds each for the reference at paper size). A faster one: on CPU
    ``Timer(num_threads=threads).blocked_autorange(min_run_time)``; on CUDA blocks of
    back-to-back calls timed with CUDA events, about ``min_run_time`` seconds in all.
    """
    if device.type == "cpu":
        torch.set_num_threads(threads)

    def once() -> float:
        if device.type == "cuda":
            return _cuda_block(fn, 1, device)
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    first = once()
    if first * repeats >= min_run_time:
        times, number = [first] + [once() for _ in range(repeats - 1)], 1
    elif device.type == "cuda":
        number = max(1, int(min_run_time / (10 * first)))
        times = [_cuda_block(fn, number, device) for _ in range(max(repeats, 10))]
    else:
        from torch.utils.benchmark import Timer

        timer = Timer("fn()", globals={"fn": fn}, num_threads=threads)
        times = []
        while len(times) < repeats:  # blocked_autorange can return fewer blocks when calls slow down
            m = timer.blocked_autorange(min_run_time=min_run_time)
            times, number = times + list(m.times), m.number_per_run
    ts = torch.tensor(times, dtype=torch.float64)
    q = torch.quantile(ts, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
    return dict(median_ms=q[1] * 1e3, iqr_ms=(q[2] - q[0]) * 1e3, min_ms=min(times) * 1e3,
                max_ms=max(times) * 1e3, runs=len(times), calls_per_run=number)


def measure_ceilings(device: torch.device, threads: int, quick: bool) -> dict:
    """The device's measured matmul FLOP rate and copy bandwidth (roofline ceilings)."""
    n = 512 if quick else (8192 if device.type == "cuda" else 2048)
    nbytes = (16 if quick else (1024 if device.type == "cuda" else 256)) * MiB
    a = torch.randn(n, n, device=device)
    src = torch.empty(nbytes // 4, device=device).normal_()
    dst = torch.empty_like(src)
    run_time = 0.05 if quick else 0.5
    mm = time_call(lambda: torch.matmul(a, a), device, threads, 3, run_time)
    cp = time_call(lambda: dst.copy_(src), device, threads, 3, run_time)
    out = dict(
        matmul=dict(n=n, dtype="float32", gflops=2.0 * n**3 / (mm["median_ms"] / 1e3) / 1e9),
        copy=dict(bytes=nbytes, gbytes_per_s=2.0 * nbytes / (cp["median_ms"] / 1e3) / 1e9),
    )
    if device.type == "cuda":
        out["matmul"]["allow_tf32"] = bool(torch.backends.cuda.matmul.allow_tf32)
        # the tensor-core rate the TF32 kernels are held to (fp32 operands, TF32 products)
        before = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision("high")
        try:
            mm32 = time_call(lambda: torch.matmul(a, a), device, threads, 3, run_time)
        finally:
            torch.set_float32_matmul_precision(before)
        out["matmul_tf32"] = dict(n=n, dtype="float32 (TF32 products)",
                                  gflops=2.0 * n**3 / (mm32["median_ms"] / 1e3) / 1e9)
    return out


# -------------------------------------------------------------------------- memory
_proc_status, _reset_peak_rss, _ru_maxrss = proc_status, reset_peak_rss, ru_maxrss


def _memory_worker(spec: dict) -> dict:
    """Body of the fresh subprocess: peak extra RSS of one call of one implementation."""
    case = Case(**{**spec["case"], "windows": tuple(spec["case"]["windows"])})
    device = torch.device("cpu")
    torch.set_num_threads(spec["threads"])
    fn = implementation(case, spec["impl"], device)
    fn(**make_inputs(case.shrunk(), spec["seed"]))   # load code pages and thread pools
    inputs = make_inputs(case, spec["seed"])
    gc.collect()
    exact = _reset_peak_rss()
    before = _proc_status() if exact else None
    ru_before = _ru_maxrss()
    status = "ok"
    try:
        out = fn(**inputs)
        del out
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        if not _is_oom(exc):
            raise
        status = "OOM"
    if exact:
        base, peak, method = before["VmRSS"], _proc_status()["VmHWM"], "VmHWM - VmRSS (clear_refs reset)"
    else:
        base, peak, method = ru_before, _ru_maxrss(), "ru_maxrss difference"
    return dict(status=status, extra_bytes=max(0, int(peak - base)), baseline_bytes=int(base),
                peak_bytes=int(peak), method=method)


def _package_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure_memory_cpu(case: Case, which: str, seed: int, threads: int, timeout: float | None = 3600) -> dict:
    """Peak extra RSS of one call, in a fresh ``python -m vos_kernels.benchmark`` process."""
    spec = dict(case=dataclasses.asdict(case), impl=which, seed=seed, threads=threads)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_package_root(), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "vos_kernels.benchmark", "--_memory-worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(status="error", reason=f"memory worker timed out after {timeout} s")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_WORKER_MARK):
            return json.loads(line[len(_WORKER_MARK):])
    if proc.returncode in (-9, 137):
        return dict(status="OOM", reason="memory worker killed (SIGKILL, likely the OOM killer)")
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return dict(status="error", reason=f"memory worker exit {proc.returncode}: " + " | ".join(tail))


def measure_memory_cuda(fn: Callable[[], object], device: torch.device) -> dict:
    """``max_memory_allocated`` during one call minus what was allocated before it."""
    _sync(device)
    gc.collect()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device)
    del out
    return dict(status="ok", extra_bytes=max(0, int(peak - base)), baseline_bytes=int(base),
                peak_bytes=int(peak), method="torch.cuda.max_memory_allocated - memory_allocated")


# ---------------------------------------------------------------------------- a case
@dataclass
class Settings:
    """Options of a run (from the command line)."""

    device: torch.device
    threads: int
    repeats: int
    min_run_time: float
    seed: int
    max_reference_bytes: float
    memory: bool
    reference_error: bool
    ceilings: dict | None = None
    # fused backends: the first is "fused" in the tables, the others are timed beside it
    backends: tuple[str, ...] = ()


def _max_error(out: Sequence[torch.Tensor], oracle: Sequence[torch.Tensor],
               names: Sequence[str] = ("fg", "bg")) -> dict:
    # NaN in the oracle marks values left out on purpose (top-k near ties); NaN in an
    # output where the oracle is a number still counts (as inf).
    errs = {}
    for name, o, e in zip(names, out, oracle):
        d = (o.double().cpu() - e.cpu()).abs()
        d = torch.where(torch.isnan(e.cpu()), torch.zeros_like(d), torch.nan_to_num(d, nan=math.inf))
        errs[name] = float(d.max()) if d.numel() else 0.0
    errs["max"] = max(errs.values())
    return errs


def _run_impl(case: Case, which: str, inputs: dict, s: Settings,
              backend: str | None = None) -> tuple[dict, tuple | None]:
    """Warm up (keeping the outputs), time, and measure the memory of one implementation."""
    op = OPS[case.op]
    fn = implementation(case, which, s.device, backend)
    res: dict = dict(status="ok")
    if which == "fused":
        res["backend"] = backend or fused_backend(s.device)
    else:
        est = op.reference_peak(case, 4)
        res["estimated_peak_bytes"] = int(est)
        if est > s.max_reference_bytes:
            res.update(status="skipped", reason=f"estimated peak {est / GiB:.1f} GiB > "
                       f"--max-reference-gib {s.max_reference_bytes / GiB:g}")
            return res, None
    call = lambda: fn(**inputs)  # noqa: E731
    phase = ""
    try:
        out = call()
        _sync(s.device)
        out = tuple(t.detach() for t in out[:len(op.outputs)])
        phase = "in the memory measurement: "
        if s.memory:
            if s.device.type == "cuda":
                res["memory"] = measure_memory_cuda(call, s.device)
            else:
                res["memory"] = measure_memory_cpu(case, which, s.seed, s.threads)
        phase = "in the timed calls: "
        res["time"] = time_call(call, s.device, s.threads, s.repeats, s.min_run_time)
    except Exception as exc:  # noqa: BLE001 - recorded in the results; the suite goes on
        res.update(status="OOM" if _is_oom(exc) else "error", reason=phase + error_line(exc))
        if s.device.type == "cuda":
            with contextlib.suppress(Exception):  # raises too where the CUDA context is lost
                torch.cuda.empty_cache()
        return res, None
    seconds = res["time"]["median_ms"] / 1e3
    res["gflops"] = op.flops(case, inputs) / seconds / 1e9
    res["gbytes_per_s"] = op.bytes_moved(case) / seconds / 1e9
    if s.ceilings:
        res["pct_matmul"] = 100.0 * res["gflops"] / s.ceilings["matmul"]["gflops"]
        res["pct_copy"] = 100.0 * res["gbytes_per_s"] / s.ceilings["copy"]["gbytes_per_s"]
        if "matmul_tf32" in s.ceilings:
            res["pct_matmul_tf32"] = 100.0 * res["gflops"] / s.ceilings["matmul_tf32"]["gflops"]
    return res, out


def run_case(case: Case, s: Settings) -> dict:
    """Every figure of one case (see the module doc); never raises on OOM."""
    op = OPS[case.op]
    inputs = make_inputs(case, s.seed, s.device)
    record: dict = dict(
        name=case.name, op=case.op, sweep=case.sweep, scale=case.scale, sizes=case.sizes(),
        config=dataclasses.asdict(case), pixels=case.pixels, seed=_seed(case, s.seed),
        flops=op.flops(case, inputs), bytes=op.bytes_moved(case),
    )
    if case.op == "global":
        record["reference_candidates"] = _global_candidates(case, inputs)
    record["sweep_x"] = case.frames * case.pixels if case.op == "topk" else case.pixels
    outs = {}
    backends = s.backends or (fused_backend(s.device),)
    for which in ("fused", "reference"):
        record[which], outs[which] = _run_impl(case, which, inputs, s, backends[0] if which == "fused" else None)
    alternatives = {}
    for b in backends[1:]:
        alternatives[b], outs["alt:" + b] = _run_impl(case, "fused", inputs, s, b)
    if s.reference_error and any(o is not None for o in outs.values()):
        record["oracle"] = op.oracle_text
        try:
            oracle = op.oracle(case, inputs)
        except Exception as exc:  # noqa: BLE001 - recorded; the timings stand
            record["oracle_error"] = error_line(exc)
        else:
            for which in ("fused", "reference"):
                if outs[which] is not None:
                    record[which]["max_abs_error"] = _max_error(outs[which], oracle, op.outputs)
            for b, res in alternatives.items():
                if outs["alt:" + b] is not None:
                    res["max_abs_error"] = _max_error(outs["alt:" + b], oracle, op.outputs)
            del oracle
    fused, ref = record["fused"], record["reference"]
    both_timed = "time" in ref and "time" in fused
    record["speedup"] = ref["time"]["median_ms"] / fused["time"]["median_ms"] if both_timed else None
    fm, rm = fused.get("memory", {}), ref.get("memory", {})
    record["memory_ratio_pct"] = (100.0 * fm["extra_bytes"] / rm["extra_bytes"]
                                  if fm.get("status") == "ok" and rm.get("status") == "ok" and rm["extra_bytes"]
                                  else None)
    record["max_abs_error"] = fused.get("max_abs_error", {}).get("max")
    if alternatives:
        record["alternatives"] = alternatives
        for res in alternatives.values():
            if "time" in res and "time" in ref:
                res["speedup"] = ref["time"]["median_ms"] / res["time"]["median_ms"]
    return record


# ----------------------------------------------------------------------- environment
def device_slug(device: torch.device, threads: int) -> str:
    """``cpu-<threads>core`` or the CUDA device name, lower-case, dashes."""
    if device.type == "cuda":
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    return f"cpu-{threads}core"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=_package_root(), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


_cpu_name = cpu_name


def _load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (other work on the machine skews CPU timings)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def environment(device: torch.device, threads: int) -> dict:
    """Device, versions, threads, git commit and date of this run."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    env = dict(
        device=device.type,
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        cpu_count=os.cpu_count(),
        threads=threads,
        torch=torch.__version__,
        triton=_version("triton") or "not installed",
        cuda=torch.version.cuda,
        vos_kernels=_version("vos_kernels") or "in-place build",
        python=platform.python_version(),
        platform=platform.platform(),
        # VOS_KERNELS_GIT_COMMIT: where the tree is a copy without .git (a lent GPU machine)
        git_commit=_git("rev-parse", "HEAD") or os.environ.get("VOS_KERNELS_GIT_COMMIT") or "unknown",
        git_dirty=bool(status) if status is not None else None,
        date=_utc_now(),
        load_average_at_start=_load_average(),
    )
    if device.type == "cuda":
        env["cuda_capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return env


PEERS = {
    "pykeops": "KeOps (per-label min via a masked Min reduction)",
    "spatial_correlation_sampler": "spatial-correlation-sampler (local correlation only)",
}


def peers() -> dict:
    """Optional peers: 'not installed' when missing (this harness does not time them)."""
    out = {}
    for module, what in PEERS.items():
        if importlib.util.find_spec(module) is None:
            out[module] = dict(status="not installed", what=what)
        else:
            out[module] = dict(status="installed, not benchmarked by this harness", what=what,
                               version=_version(module.replace("_", "-")) or _version(module))
    return out


# --------------------------------------------------------------------------- reports
def _fmt_ms(impl: dict) -> str:
    if "time" not in impl:
        return impl.get("status", "-")
    t = impl["time"]
    return f"{_sig(t['median_ms'])} ± {_sig(t['iqr_ms'] / 2, 2)}"


def _sig(x: float, digits: int = 3) -> str:
    """``x`` to about ``digits`` significant digits, without an exponent."""
    if x == 0 or not math.isfinite(x):
        return f"{x:g}"
    return f"{x:.{max(0, digits - 1 - math.floor(math.log10(abs(x))))}f}"


def _fmt_mib(impl: dict) -> str:
    mem = impl.get("memory")
    if impl.get("status") != "ok":
        return impl.get("status", "-")
    if not mem or mem.get("status") != "ok":
        return (mem or {}).get("status", "-")
    return _sig(mem["extra_bytes"] / MiB)


def _fmt(x: float | None) -> str:
    return "-" if x is None else _sig(x)


def markdown(results: dict) -> str:
    """The results table (with the run's environment and footnotes)."""
    env = results["environment"]
    head = (f"Device: {env['device_name']} ({env['device']}, {env['threads']} threads), torch {env['torch']}, "
            f"triton {env['triton']}, commit {env['git_commit'][:12]}{' (dirty)' if env.get('git_dirty') else ''}, "
            f"{env['date']}.")
    alt_names = sorted({b for c in results["cases"] for b in c.get("alternatives", {})})
    cuda = env["device"] == "cuda"
    first = results["cases"][0]["fused"].get("backend", "fused") if results["cases"] else "fused"
    head_alt = "".join(f" | {b} ms (speedup) | {b} max error" for b in alt_names)
    head += f" Fused backend: {first}."
    commits = sorted({c["git_commit"][:12] for c in results["cases"] if c.get("git_commit")})
    if len(commits) > 1:
        head += f" Cases measured in {len(results.get('runs', []))} runs, commits {', '.join(commits)}."
    rows = ["| case | sizes | fused ms | reference ms | speedup | fused extra MiB | reference extra MiB "
            "| memory ratio % | max error" + (" | fused GFLOP/s | % TF32 mm | % fp32 mm | % copy" if cuda else "")
            + head_alt + " |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---:" + (" | ---: | ---: | ---: | ---:" if cuda else "")
            + " | ---: | ---:" * len(alt_names) + " |"]
    for c in results["cases"]:
        f, r = c["fused"], c["reference"]
        cells = [f"| {c['name']}", c["sizes"], _fmt_ms(f), _fmt_ms(r), _fmt(c["speedup"]),
                 _fmt_mib(f), _fmt_mib(r), _fmt(c["memory_ratio_pct"]),
                 "-" if c["max_abs_error"] is None else f"{c['max_abs_error']:.1e}"]
        if cuda:
            cells += [_fmt(f.get("gflops")), _fmt(f.get("pct_matmul_tf32")), _fmt(f.get("pct_matmul")),
                      _fmt(f.get("pct_copy"))]
        for b in alt_names:
            a = c.get("alternatives", {}).get(b, {})
            err = a.get("max_abs_error", {}).get("max")
            cells += [f"{_fmt_ms(a)} ({_fmt(a.get('speedup'))})" if a else "-",
                      "-" if err is None else f"{err:.1e}"]
        rows.append(" | ".join(cells) + " |")
    notes = [
        "ms: median ± half the interquartile range of the per-call times; speedup = reference / fused "
        "(medians); extra MiB: peak memory above the inputs during one call "
        + ("(fresh process per case and implementation, peak RSS)" if env["device"] == "cpu"
           else "(torch.cuda.max_memory_allocated)")
        + "; memory ratio = fused / reference; max error: max |fused − reference in float64| over the outputs (fg and bg; the readout of the top-k read, without the queries whose k-th and (k+1)-th affinities are closer than 1e-4, where float32 may pick either entry; means and resp of EM; the read and prototypes of the PCAN instance head; the gradients of the A-GAME unroll; the gradients of the CFBI+ train step, against the fused head in float64, see 'oracle' in results.json).",
        "skipped: the reference's estimated peak exceeds the limit; OOM: it ran out of memory.",
    ]
    if cuda:
        notes.append("% TF32 mm / % fp32 mm / % copy: the fused side's FLOP/s (the op's FLOP count) and bytes/s "
                     "(each input read once, each output written once) over the measured ceilings of this run "
                     "(results.json 'ceilings': an 8192² float32 matmul with TF32 products and in full fp32, and "
                     "a 1 GiB device copy).")
    if alt_names:
        notes.append("Other backends (" + ", ".join(alt_names) + "): the same op run with that backend on the "
                     "same inputs; speedup = reference / that backend.")
    skipped = [f"- {c['name']}: {c['fatal']} (attempt {c.get('attempts', 1)})" if c.get("fatal")
               else f"- {c['name']}: {c['reference']['reason']}"
               for c in results["cases"] if c.get("fatal") or c["reference"].get("reason")]
    return "\n".join([head, "", *rows, "", *notes, *(["", *skipped] if skipped else [])]) + "\n"


def plot(results: dict, path: str) -> None:
    """speedup_memory.png: per-case speedup and extra memory (bars), and the scaling sweep
    (time and extra memory vs query pixels, per op and implementation), log scales."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    cases = results["cases"]
    floor = 1e-3  # MiB: values below (e.g. 0 bytes above the inputs) are drawn at the floor

    def mib(c: dict, which: str) -> float | None:
        mem = c[which].get("memory") or {}
        return max(mem["extra_bytes"] / MiB, floor) if mem.get("status") == "ok" else None

    fig, axes = plt.subplots(2, 2, figsize=(14, 10))
    names = [c["name"] for c in cases]
    x = list(range(len(cases)))
    ax = axes[0][0]
    speed = [c["speedup"] or 0 for c in cases]
    ax.bar(x, [s if s > 0 else float("nan") for s in speed], color="tab:green")
    for i, c in enumerate(cases):
        if not c["speedup"]:
            ax.annotate(c["reference"].get("status", "-"), (i, 1), ha="center", fontsize=7, rotation=90)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_yscale("log")
    ax.set_ylabel("speedup (reference / fused)")
    ax.set_title("Speedup of the fused kernel")
    ax = axes[0][1]
    for k, (which, color) in enumerate((("fused", "tab:blue"), ("reference", "tab:red"))):
        vals = [mib(c, which) for c in cases]
        ax.bar([i + (k - 0.5) * 0.4 for i in x], [v if v else float("nan") for v in vals], width=0.4,
               color=color, label=which)
        for i, v in enumerate(vals):
            if v is None:
                ax.annotate(cases[i][which].get("status", "-"), (i + (k - 0.5) * 0.4, floor), ha="center",
                            fontsize=7, rotation=90)
    ax.set_yscale("log")
    ax.set_ylabel("peak extra memory (MiB; < 1 KiB drawn at 1 KiB)")
    ax.set_title("Peak memory above the inputs")
    ax.legend()
    for ax in axes[0]:
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)

    sweeps = sorted({(c["op"], c["sweep"]) for c in cases if c["sweep"]})
    panels = ((axes[1][0], "time", "time per call (ms)"), (axes[1][1], "memory", "peak extra memory (MiB)"))
    for ax, metric, label in panels:
        for op, sweep in sweeps:
            group = sorted((c for c in cases if c["op"] == op and c["sweep"] == sweep),
                           key=lambda c: c.get("sweep_x", c["pixels"]))
            for which, style in (("fused", "-o"), ("reference", "--s")):
                pts = [(c.get("sweep_x", c["pixels"]), c[which]["time"]["median_ms"] if metric == "time" and "time" in c[which]
                        else (mib(c, which) if metric == "memory" else None)) for c in group]
                pts = [(p, v) for p, v in pts if v]
                if pts:
                    ax.plot(*zip(*pts), style, label=f"{op} {which} ({sweep})")
        if ax.get_lines():
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no scaling sweep data in this run", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("query pixels (matching) / memory entries (top-k read) / points (EM)")
        ax.set_ylabel(label)
        ax.set_title(f"Scaling sweep: {metric}")
    env = results["environment"]
    fig.suptitle(f"vos_kernels: fused vs reference — {env['device_name']}, {env['threads']} threads, "
                 f"torch {env['torch']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _json_safe(x):
    """NaN / inf → strings, so that results.json is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def _progress(i: int, n: int, c: dict, seconds: float) -> str:
    f, r = c["fused"], c["reference"]
    def ms(impl: dict) -> str:
        return f"{_fmt_ms(impl)} ms" if "time" in impl else impl.get("status", "-")

    parts = [f"[{i}/{n}] {c['name']}: fused {ms(f)}"]
    parts.append(f"reference {ms(r)}" + (f" ({_sig(c['speedup'])}x)" if c["speedup"] else ""))
    parts.append(f"extra MiB {_fmt_mib(f)} / {_fmt_mib(r)}")
    if c["max_abs_error"] is not None:
        parts.append(f"max err {c['max_abs_error']:.1e}")
    if f.get("gflops"):
        parts.append(f"{_sig(f['gflops'])} GFLOP/s")
    return ", ".join(parts) + f"  [{seconds:.1f} s]"


# ------------------------------------------------------------------------------ main
RUNNING_FILE = "running.json"          # in --out while a case runs: the case that ended the process
HANG_FILE = "hang-traceback.txt"       # in --out: the stacks of a case that ran past --case-timeout
CUDA_CASE_TIMEOUT = 300.0              # default --case-timeout on CUDA (seconds)
MAX_FATAL_ATTEMPTS = 2                 # --resume runs a case again after 1 fatal end, not after 2


def _has_error(c: dict) -> bool:
    return bool(c.get("fatal")) or "error" in (c["fused"].get("status"), c["reference"].get("status"))


def _run_again(c: dict) -> bool:
    """Whether --resume runs the case of this earlier record again: after an error, unless
    the case ended fatally (lost the CUDA context, or the process died in it) in
    MAX_FATAL_ATTEMPTS runs in a row."""
    if c.get("fatal"):
        return c.get("attempts", 1) < MAX_FATAL_ATTEMPTS
    return _has_error(c)


def _context_lost(device: torch.device) -> str | None:
    """Why the CUDA context of this process is unusable, or None (always on CPU)."""
    return cuda_context_lost() if device.type == "cuda" else None


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def failed_record(case: Case, s: Settings, reason: str, fatal: str | None = None, attempts: int = 1) -> dict:
    """A record of ``case`` whose fused and reference sides both ended in an error with
    ``reason`` (nothing measured), with the keys of :func:`run_case`'s records that the
    tables, the plot and scripts/auto_table.py read; ``fatal`` and ``attempts`` as in the
    module doc."""
    record: dict = dict(
        name=case.name, op=case.op, sweep=case.sweep, scale=case.scale, sizes=case.sizes(),
        config=dataclasses.asdict(case), pixels=case.pixels, seed=_seed(case, s.seed), flops=None,
        bytes=OPS[case.op].bytes_moved(case),
        sweep_x=case.frames * case.pixels if case.op == "topk" else case.pixels,
        fused=dict(status="error", backend=(s.backends or (fused_backend(s.device),))[0], reason=reason),
        reference=dict(status="error", reason=reason),
        speedup=None, memory_ratio_pct=None, max_abs_error=None, attempts=attempts,
    )
    if fatal:
        record["fatal"] = fatal
    return record


def _write_json_atomic(path: str, obj: dict) -> None:
    """``obj`` as JSON at ``path``, written beside it and renamed: a reader never sees half
    a file, even of a process that dies while writing (strict JSON: no NaN)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, allow_nan=False)
    os.replace(tmp, path)


def _died_record(running: dict, out_dir: str, s: Settings) -> dict | None:
    """The fatal record of the case that ``running.json`` (left by a process that died while
    the case ran) names; None if the name is no case of the suite."""
    case = {c.name: c for c in FULL_CASES + QUICK_CASES}.get(running.get("case"))
    if case is None:
        return None
    attempt = int(running.get("attempt") or 1)
    hang_text = ""
    with contextlib.suppress(OSError):
        with open(os.path.join(out_dir, HANG_FILE), errors="replace") as f:
            hang_text = f.read()
    mark = _hang_header_mark(case.name, attempt, running.get("pid"))
    section = hang_text[hang_text.rfind(mark):] if mark in hang_text else ""
    if "Timeout (" in section:  # faulthandler.dump_traceback_later's first line
        seconds = running.get("case_timeout_s")
        reason = (f"hang: the case ran past --case-timeout "
                  f"{f'{seconds:g}' if isinstance(seconds, (int, float)) else seconds} s and the watchdog "
                  f"ended the process; Python tracebacks in {HANG_FILE}")
    elif running.get("interrupted"):
        reason = (f"interrupted (SIGINT: Ctrl-C or an outside time limit) at {running['interrupted']} while this "
                  "case ran")
    else:
        reason = ("the process died while this case ran (fault, hang past --case-timeout, or an outside time limit)"
                  + (f"; see {HANG_FILE}" if hang_text else ""))
    record = failed_record(case, s, reason, fatal=reason, attempts=attempt)
    record.update(started=running.get("started"), git_commit=running.get("git_commit"))
    return record


def _hang_header_mark(name: str, attempt: int, pid: object) -> str:
    return f"case {name}, attempt {attempt}, pid {pid}:"


@contextlib.contextmanager
def _case_guard(hang_file, case: Case, attempt: int, seconds: float):
    """Within the block: the watchdog of --case-timeout (none where ``seconds`` is 0), with a
    header naming the case in ``hang_file`` above the stacks it writes; the header is taken
    out again when the block ends (the file keeps only cases that ended the process)."""
    if not seconds or hang_file is None:
        yield
        return
    hang_file.seek(0, os.SEEK_END)
    pos = hang_file.tell()
    hang_file.write(f"=== {_utc_now()} {_hang_header_mark(case.name, attempt, os.getpid())} the watchdog "
                    f"ends the process after {seconds:g} s; if it did, every thread's Python traceback follows\n")
    hang_file.flush()
    try:
        with watchdog(seconds, hang_file):
            yield
    finally:
        hang_file.truncate(pos)


# Settings that must match for --resume to add cases to an earlier run's results.
RESUME_KEYS = ("quick", "repeats", "min_run_time", "seed", "max_reference_gib", "memory", "reference_error",
               "ignore_fraction", "bias", "reference_n_chunks", "backends", "float32_matmul_precision")


def resumable(path: str, results: dict) -> dict:
    """The earlier results at `path`, if this run may add to them; ValueError says why not."""
    try:
        with open(path) as f:
            previous = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from exc
    if previous.get("schema") != results["schema"] or not isinstance(previous.get("cases"), list):
        raise ValueError(f"{path} is not a results file of this harness (schema {previous.get('schema')!r})")
    env, now = previous.get("environment", {}), results["environment"]
    for key in ("device", "device_name", "threads"):
        if env.get(key) != now[key]:
            raise ValueError(f"{path} was measured with {key} = {env.get(key)!r}, this run has {now[key]!r}; "
                             "use another --out")
    old = previous.get("settings", {})
    for key in RESUME_KEYS:
        if _json_safe(old.get(key)) != _json_safe(results["settings"][key]):
            raise ValueError(f"{path} was measured with {key} = {old.get(key)!r}, this run has "
                             f"{results['settings'][key]!r}; use the same options or another --out")
    return previous


def write_results(results: dict, out_dir: str) -> str:
    """results.json and results.md into out_dir; returns the markdown table."""
    _write_json_atomic(os.path.join(out_dir, "results.json"), _json_safe(results))
    table = markdown(results)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(table)
    return table


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m vos_kernels.benchmark", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (CI smoke run, seconds)")
    p.add_argument("--cases", metavar="PATTERN", help="comma-separated substrings or globs of case names, or @GROUP "
                   "(@aims: the paper sizes of the CUDA aims)")
    p.add_argument("--list", action="store_true", help="list the selected cases and exit")
    p.add_argument("--out", metavar="DIR", help="output folder (default benchmarks/results/<device-slug>)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--backends", metavar="LIST",
                   help="comma-separated fused backends, e.g. 'cuda,triton' (default: cpu on CPU, auto on CUDA); "
                        "the first is the 'fused' column, the others are timed beside it")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads (default: all cores)")
    p.add_argument("--repeats", type=int, default=3, help="minimum timed runs per implementation (default 3)")
    p.add_argument("--min-run-time", type=float, default=None,
                   help="seconds of timed calls for fast ops (default 1.0; 0.05 with --quick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-reference-gib", type=float, default=16.0,
                   help="skip the reference where its estimated peak exceeds this (default 16)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    p.add_argument("--no-reference-error", action="store_true", help="skip the float64 error check")
    p.add_argument("--resume", action="store_true",
                   help="keep the cases already in OUT/results.json (same device and settings) and run only the "
                        "selected cases it lacks or that ended in an error; a case that ended fatally (lost the "
                        "CUDA context, or the process died in it: OUT/running.json) runs once more, not after a "
                        "second fatal end")
    p.add_argument("--case-timeout", type=float, default=None, metavar="SECONDS",
                   help=f"end the process when a case runs longer, its stacks in OUT/{HANG_FILE} (exit status 1; "
                        f"--resume records the case as fatal); default {CUDA_CASE_TIMEOUT:g} on CUDA, 0 on CPU; "
                        "0: no limit")
    p.add_argument("--isolate", action="store_true",
                   help="run the cases in child processes: after a case that loses the CUDA context, hangs or kills "
                        "its process, a fresh one goes on with --resume")
    p.add_argument("--_memory-worker", dest="memory_worker", metavar="SPEC", help=argparse.SUPPRESS)
    return p


def drive_isolated(argv: Sequence[str], out_dir: str, n_cases: int) -> int:
    """``--isolate``: run ``python -m vos_kernels.benchmark ARGV --out OUT_DIR`` (without
    ``--isolate``) in child processes, again with ``--resume`` while a child exits 75 (lost
    CUDA context) or leaves ``OUT_DIR/running.json`` (it died in a case). A case ends
    fatally at most :data:`MAX_FATAL_ATTEMPTS` times, so at most that many rounds per case
    (plus one) run. Returns the last child's exit status (1 if the rounds ran out, 130 on
    an interrupt)."""
    args = [a for a in argv if a != "--isolate"]
    if "--out" not in args and not any(a.startswith("--out=") for a in args):
        args += ["--out", out_dir]
    running = os.path.join(out_dir, RUNNING_FILE)
    for k in range(1, MAX_FATAL_ATTEMPTS * n_cases + 2):
        try:
            rc = subprocess.run([sys.executable, "-m", "vos_kernels.benchmark", *args]).returncode
        except KeyboardInterrupt:
            return 130
        died = os.path.exists(running)
        if rc != CONTEXT_LOST_EXIT and not died:
            return rc
        why = "lost the CUDA context" if rc == CONTEXT_LOST_EXIT else f"ended with status {rc} inside a case"
        print(f"benchmark --isolate: process {k} {why}; a fresh process goes on with --resume", file=sys.stderr,
              flush=True)
        if "--resume" not in args:
            args.append("--resume")
    print("benchmark --isolate: stopped, no more rounds", file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.memory_worker:
        print(_WORKER_MARK + json.dumps(_memory_worker(json.loads(args.memory_worker))), flush=True)
        return 0
    try:
        cases = select_cases(QUICK_CASES if args.quick else FULL_CASES, args.cases)
    except ValueError as e:
        print(f"--cases: {e}", file=sys.stderr)
        return 2
    if args.list:
        for c in cases:
            est = OPS[c.op].reference_peak(c, 4) / GiB
            skip = " (skipped: > --max-reference-gib)" if est * GiB > args.max_reference_gib * GiB else ""
            print(f"{c.name:28s} {c.sizes():42s} reference peak ≈ {est:.2g} GiB{skip}")
        return 0
    if not cases:
        print(f"no case matches {args.cases!r}; --list shows them", file=sys.stderr)
        return 2
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is available", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    threads = max(1, args.threads or 1)
    torch.set_num_threads(threads)
    out_dir = args.out or os.path.join("benchmarks", "results", device_slug(device, threads))
    os.makedirs(out_dir, exist_ok=True)
    if args.isolate:
        return drive_isolated(list(sys.argv[1:] if argv is None else argv), out_dir, len(cases))

    s = Settings(device=device, threads=threads, repeats=max(1, args.repeats),
                 min_run_time=args.min_run_time if args.min_run_time is not None else (0.05 if args.quick else 1.0),
                 seed=args.seed, max_reference_bytes=args.max_reference_gib * GiB, memory=not args.no_memory,
                 reference_error=not args.no_reference_error,
                 backends=tuple(b.strip() for b in args.backends.split(",") if b.strip()) if args.backends else ())
    if args.case_timeout is not None and not (args.case_timeout >= 0):
        print(f"--case-timeout: {args.case_timeout:g} is not a number of seconds >= 0", file=sys.stderr)
        return 2
    timeout = args.case_timeout if args.case_timeout is not None else (
        CUDA_CASE_TIMEOUT if device.type == "cuda" else 0.0)
    for b in s.backends:
        if b not in BACKENDS or b == "reference":
            print(f"--backends: {b!r} is not a fused backend (one of {[x for x in BACKENDS if x != 'reference']})",
                  file=sys.stderr)
            return 2
    results = dict(schema=1, environment=environment(device, threads),
                   settings=dict(quick=args.quick, cases=args.cases, repeats=s.repeats, min_run_time=s.min_run_time,
                                 seed=s.seed, max_reference_gib=args.max_reference_gib, memory=s.memory,
                                 reference_error=s.reference_error, ignore_fraction=IGNORE_FRACTION,
                                 bias=[BIAS_BG, BIAS_FG], reference_n_chunks=REFERENCE_CHUNKS,
                                 backends=list(s.backends) or [fused_backend(device)],
                                 float32_matmul_precision=torch.get_float32_matmul_precision(),
                                 case_timeout_s=timeout),
                   peers=peers(), ceilings=None, cases=[], runs=[])
    json_path = os.path.join(out_dir, "results.json")
    running_path, hang_path = os.path.join(out_dir, RUNNING_FILE), os.path.join(out_dir, HANG_FILE)
    order = {c.name: i for i, c in enumerate(FULL_CASES + QUICK_CASES)}
    earlier: dict[str, dict] = {}  # records of the cases run again, for their attempt count
    if args.resume:
        if os.path.exists(json_path):
            try:
                previous = resumable(json_path, results)
            except ValueError as exc:
                print(f"--resume: {exc}", file=sys.stderr)
                return 2
            results.update(environment=previous["environment"], ceilings=previous.get("ceilings"),
                           runs=previous.get("runs", []), cases=previous["cases"])
            results["settings"]["cases"] = previous["settings"].get("cases")
        if os.path.exists(running_path):
            try:
                with open(running_path) as f:
                    running = json.load(f)
                died = _died_record(running, out_dir, s)
            except (OSError, ValueError, TypeError) as exc:
                running, died = {}, None
                print(f"--resume: cannot read {running_path} ({exc}); left out", file=sys.stderr)
            # a process killed after writing the case's results, before removing running.json: no death
            finished = any(c["name"] == running.get("case") and c.get("started") == running.get("started")
                           and c.get("attempts", 1) == running.get("attempt", 1) for c in results["cases"])
            if died is not None and not finished:
                results["cases"] = [c for c in results["cases"] if c["name"] != died["name"]] + [died]
                print(f"--resume: the process died in case {died['name']} (attempt {died['attempts']}, started "
                      f"{running.get('started')}): {died['reference']['reason']}", file=sys.stderr, flush=True)
            elif died is None and running:
                print(f"--resume: {running_path} names no case of the suite ({running.get('case')!r}); left out",
                      file=sys.stderr)
            os.remove(running_path)
        by_name = {c["name"]: c for c in results["cases"]}
        again = {c.name for c in cases if c.name not in by_name or _run_again(by_name[c.name])}
        for c in cases:
            rec = by_name.get(c.name)
            if rec is not None and c.name not in again and _has_error(rec):
                print(f"--resume: {c.name} is not run again: it ended fatally in {rec.get('attempts', 1)} runs in "
                      f"a row ({rec['fatal']})", file=sys.stderr)
        earlier = {n: by_name[n] for n in again if n in by_name}
        results["cases"] = sorted((c for c in results["cases"] if c["name"] not in again),
                                  key=lambda c: order.get(c["name"], len(order)))
        selected = len(cases)
        cases = [c for c in cases if c.name in again]
        print(f"--resume: {len(results['cases'])} case(s) kept from {out_dir}; {len(cases)} of the {selected} "
              "selected to run", flush=True)
    else:  # the folder starts over
        for stale in (running_path, hang_path):
            with contextlib.suppress(FileNotFoundError):
                os.remove(stale)
    env_now = environment(device, threads)
    results["runs"].append(dict(date=env_now["date"], git_commit=env_now["git_commit"],
                                git_dirty=env_now["git_dirty"], cases_pattern=args.cases,
                                cases=[c.name for c in cases]))
    print(f"vos_kernels benchmark: {len(cases)} case(s) on {results['environment']['device_name']}, "
          f"{threads} thread(s) -> {out_dir}", flush=True)
    load = env_now["load_average_at_start"]
    if device.type == "cpu" and load and load[0] > 0.5:
        print(f"warning: load average {load[0]} before the run: other processes share the cores, "
              "CPU timings will be noisy", flush=True)
    if results["ceilings"] is None:
        results["ceilings"] = measure_ceilings(device, threads, args.quick)
    s.ceilings = results["ceilings"]
    print(f"ceilings: matmul {s.ceilings['matmul']['gflops']:.4g} GFLOP/s, "
          f"copy {s.ceilings['copy']['gbytes_per_s']:.4g} GB/s", flush=True)
    hang_file = open(hang_path, "a") if timeout > 0 else None  # noqa: SIM115 - open for the whole loop
    try:
        for i, case in enumerate(cases, 1):
            t0 = time.perf_counter()
            before = earlier.get(case.name, {})
            attempt = before.get("attempts", 1) + 1 if before.get("fatal") else 1
            started = _utc_now()
            print(f"[{i}/{len(cases)}] {case.name} ({case.sizes()}"
                  + (f"; attempt {attempt}, after: {before['fatal']}" if attempt > 1 else "") + ") ...", flush=True)
            _write_json_atomic(running_path, dict(case=case.name, started=started, pid=os.getpid(), attempt=attempt,
                                                  case_timeout_s=timeout, git_commit=env_now["git_commit"]))
            try:
                with _case_guard(hang_file, case, attempt, timeout):
                    try:
                        record = run_case(case, s)
                    except Exception as exc:  # noqa: BLE001 - recorded; the suite goes on
                        record = failed_record(case, s, f"run_case raised {error_line(exc)}")
                    lost = _context_lost(s.device)
            except KeyboardInterrupt:  # SIGINT: Ctrl-C, or a time limit (timeout --signal=INT)
                with contextlib.suppress(OSError, ValueError):
                    with open(running_path) as f:
                        running = json.load(f)
                    _write_json_atomic(running_path, dict(running, interrupted=_utc_now()))
                raise
            record.update(git_commit=env_now["git_commit"], started=started, attempts=attempt)
            if before.get("fatal"):
                record["previous_fatal"] = before["fatal"]
            if lost:
                record["fatal"] = f"CUDA context lost: {lost}"
            results["cases"].append(record)
            results["cases"].sort(key=lambda c: order.get(c["name"], len(order)))
            write_results(results, out_dir)  # after every case: a run cut off keeps what it measured
            os.remove(running_path)
            print(_progress(i, len(cases), record, time.perf_counter() - t0), flush=True)
            if lost:
                plot(results, os.path.join(out_dir, "speedup_memory.png"))
                again_note = ("it runs once more, then the rest" if attempt < MAX_FATAL_ATTEMPTS
                              else "it is not run again (second fatal end), the rest are")
                print(f"case {case.name} (attempt {attempt}) lost the CUDA context ({lost}); results written to "
                      f"{out_dir}; {len(cases) - i} later case(s) not run. Run again with --resume to go on: "
                      f"{again_note} (exit status {CONTEXT_LOST_EXIT})", file=sys.stderr, flush=True)
                return CONTEXT_LOST_EXIT
            gc.collect()
    finally:
        if hang_file is not None:
            hang_file.close()
            if os.path.getsize(hang_path) == 0:  # no case hung or died: no file
                os.remove(hang_path)

    results["environment"]["load_average_at_end"] = _load_average()
    table = write_results(results, out_dir)
    plot(results, os.path.join(out_dir, "speedup_memory.png"))
    print()
    print(table)
    print(f"wrote {out_dir}/results.json, results.md, speedup_memory.png")
    errors = [c["name"] for c in results["cases"] if _has_error(c)]
    if errors:
        print(f"errors (see results.json): {', '.join(errors)}", file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
