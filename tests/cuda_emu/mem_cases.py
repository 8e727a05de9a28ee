"""Memory-checker cases of the CUDA emulator, run in a process with AddressSanitizer.

tests/test_cuda_emu.py runs this file as a script in a subprocess with AddressSanitizer's
runtime preloaded (``emu_build.asan_runtime()``, ``ASAN_OPTIONS=emu_build.ASAN_OPTIONS``)
and the emulator's self-test kernels (selftest.cu) built with ``VOS_EMU_SANITIZE=address``.
As in race_cases.py, ``=== <case>`` goes to stderr before each case, so the test can tell
which case a report belongs to, and a case whose launch fails writes ``CASE FAILED: ...``.

    python tests/cuda_emu/mem_cases.py CASE [CASE ...]

Each entry of CASES: (the kind of access AddressSanitizer must report, or None for an
in-bounds case; the call). selftest.cu's oob_kernel makes the access.
"""
from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from race_cases import _check, _ptr, main  # noqa: E402


def _oob(lib, mode, at):
    src = np.arange(32, dtype=np.int32) * 5
    out = np.zeros(32, np.int32)
    _check(lib.st_oob(_ptr(src), _ptr(out), mode, at) == 0, "launch")
    _check(np.array_equal(out[1:], src[np.arange(2, 33) % 32] + 1), "result")


CASES = {
    "in_bounds": (None, lambda lib: _oob(lib, 0, 32)),
    "global_write_past_the_end": ("WRITE of size 4", lambda lib: _oob(lib, 1, 32)),
    "global_read_before_the_start": ("READ of size 4", lambda lib: _oob(lib, 2, -1)),
    "dynamic_shared_write_past_the_launch_size": ("WRITE of size 4", lambda lib: _oob(lib, 3, 32)),
    "static_shared_read_past_the_array": ("READ of size 4", lambda lib: _oob(lib, 4, 32)),
}


if __name__ == "__main__":
    main(sys.argv[1:], CASES)
