"""Process memory probes (Linux ``/proc``; ``getrusage`` elsewhere), the CPU's name, and a
per-section time and peak-memory meter, shared by the benchmark harness,
``vos-kernels segment`` and the long-video benchmark."""
from __future__ import annotations

import platform
import resource
import sys
import time


def proc_status() -> dict[str, int] | None:
    """VmRSS and VmHWM of this process in bytes (Linux), or None."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}
    except (OSError, KeyError, ValueError):
        return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    status = proc_status()
    return status is not None and status["VmHWM"] <= status["VmRSS"] + 64 * 1024


def ru_maxrss() -> int:
    """Peak RSS in bytes from getrusage (KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


class SectionMeter:
    """Wall time and peak extra memory of a code section (CPU: VmHWM reset through
    ``/proc/self/clear_refs``; CUDA: ``max_memory_allocated``)."""

    def __init__(self, device):
        import torch

        self.torch = torch
        self.device = device
        self.cuda = device.type == "cuda"
        self.peak_bytes = 0          # process peak seen (CPU RSS / CUDA allocated)
        self.method = "torch.cuda.max_memory_allocated" if self.cuda else "VmHWM - VmRSS per section"

    def _sync(self):
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def run(self, fn):
        self._sync()
        if self.cuda:
            base = self.torch.cuda.memory_allocated(self.device)
            self.torch.cuda.reset_peak_memory_stats(self.device)
        else:
            st = proc_status()
            if st is not None:
                self.peak_bytes = max(self.peak_bytes, st["VmHWM"])
            exact = reset_peak_rss()
            base = proc_status()["VmRSS"] if exact else ru_maxrss()
        t0 = time.perf_counter()
        out = fn()
        self._sync()
        dt = time.perf_counter() - t0
        if self.cuda:
            peak = self.torch.cuda.max_memory_allocated(self.device)
        else:
            st = proc_status() if exact else None
            peak = st["VmHWM"] if st is not None else ru_maxrss()
        self.peak_bytes = max(self.peak_bytes, peak)
        return out, dt, max(0, int(peak - base))

    def process_peak(self) -> int:
        from vos_kernels._memory import proc_status

        if not self.cuda:
            st = proc_status()
            if st is not None:
                self.peak_bytes = max(self.peak_bytes, st["VmHWM"])
        return self.peak_bytes


# ----------------------------------------------------------------------- metric
