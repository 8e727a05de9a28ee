"""Guards for long runs on a GPU whose kernels may fault or hang (the GPU check).

A CUDA kernel that faults (illegal address, misaligned access, trap) leaves the process's
CUDA context unusable: every later CUDA call in that process fails with the same error. A
kernel that never ends blocks the host in the next synchronisation, where no Python
signal handler runs. The test runner (``scripts/pytest_isolated.py``) and the benchmark
(``vos_kernels.benchmark``) use these two guards to end the process as soon as either
happens, say which test or case did it, and go on in a fresh process without it.
"""
from __future__ import annotations

import contextlib
import faulthandler
import sys
from typing import IO, Iterator

# Exit status of a process that stopped because its CUDA context was lost; its driver
# starts a fresh process that goes on after the test or case that lost it (EX_TEMPFAIL).
CONTEXT_LOST_EXIT = 75


def error_line(exc: BaseException) -> str:
    """``"Type: first line of the message"`` (at most 300 characters of it), for records."""
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}"


def cuda_context_lost() -> str | None:
    """``None`` if CUDA was never initialised in this process or is still usable, else the
    error that a fresh probe (a small tensor op and a synchronisation) raises.

    A pending non-sticky error (raised by the first synchronisation) is not a lost
    context: only an error of the probe that follows counts.
    """
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    with contextlib.suppress(Exception):
        torch.cuda.synchronize()
    try:
        x = torch.ones(8, device="cuda")
        total = float((x + x).sum().item())
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - the error is the answer
        return error_line(exc)
    if total != 16.0:
        return f"probe computed {total} instead of 16.0"
    return None


@contextlib.contextmanager
def watchdog(seconds: float | None, file: IO[str]) -> Iterator[None]:
    """Within the block, after ``seconds`` (``None`` or 0: never), write every thread's
    Python traceback to ``file`` and end the process at once (exit status 1).

    :func:`faulthandler.dump_traceback_later` runs in its own C thread, so it also ends a
    process blocked inside a CUDA synchronisation. ``file`` must have a file descriptor
    and stay open. One watchdog at a time (it replaces any earlier one).
    """
    if not seconds or seconds <= 0:
        yield
        return
    faulthandler.dump_traceback_later(seconds, exit=True, file=file)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()
