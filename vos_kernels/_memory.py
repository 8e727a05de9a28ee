"""Process memory probes (Linux ``/proc``; ``getrusage`` elsewhere) and the CPU's name,
shared by the benchmark harness and ``vos-kernels segment``."""
from __future__ import annotations

import platform
import resource
import sys


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
