"""Race-detector cases of the CUDA emulator, run in a process with ThreadSanitizer.

tests/test_cuda_emu.py runs this file as a script in a subprocess with ThreadSanitizer's
runtime preloaded and the emulator's self-test kernels (selftest.cu) built with
``VOS_EMU_SANITIZE=thread``. Before each case it writes ``=== <case>`` to stderr, where
ThreadSanitizer writes its reports, so the test can tell which case a report belongs to.
A case whose launch fails or whose defined result is wrong writes ``CASE FAILED: ...``.

    python tests/cuda_emu/race_cases.py CASE [CASE ...]

Each entry of CASES: (kernel the race is in, or None for a race-free case; the call).
"""
from __future__ import annotations

import ctypes
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import emu_build  # noqa: E402


def _ptr(a):
    return a.ctypes.data_as(ctypes.c_void_p)


def _check(ok: bool, what: str):
    if not ok:
        os.write(2, f"CASE FAILED: {what}\n".encode())


def _barrier(lib, sync):
    v = np.arange(64, dtype=np.int32)
    out = np.zeros(64, np.int32)
    _check(lib.st_barrier(_ptr(v), _ptr(out), 64, sync) == 0, "launch")
    if sync:
        _check(np.array_equal(out, np.roll(v, -1)), "result")


def _warp_handoff(lib, order):
    v = np.arange(32, dtype=np.int32) * 3
    out = np.zeros(32, np.int32)
    _check(lib.st_warp_handoff(_ptr(v), _ptr(out), order) == 0, "launch")
    if order == 1:
        _check(np.array_equal(out, v[np.arange(32) ^ 1]), "result")


def _counter(lib, atomic):
    out = np.zeros(1, np.int32)
    _check(lib.st_counter(_ptr(out), 64, atomic) == 0, "launch")
    _check(out[0] == 64, f"count {out[0]}")


def _cp_async(lib, sync):
    src = np.arange(4 * 16, dtype=np.float32)
    out = np.zeros(16, np.float32)
    _check(lib.st_cp_async_neighbour(_ptr(src), _ptr(out), 16, sync) == 0, "launch")
    if sync:
        _check(np.array_equal(out, src.reshape(16, 4)[(np.arange(16) + 1) % 16, 0]), "result")


def _exit_then_barrier(lib):
    v = np.arange(32, dtype=np.int32) + 100
    out = np.zeros(32, np.int32)
    _check(lib.st_exit_then_barrier(_ptr(v), _ptr(out)) == 0, "launch")
    _check(np.array_equal(out[:16], v[16:]), "result")


def _collectives(lib):
    # the emulator's own exchange slots, barrier counters and mma fragments are not the
    # kernels': none of them may show up as a race
    v = np.arange(96, dtype=np.int32)
    out = np.zeros((96, 6), np.int32)
    _check(lib.st_warp(_ptr(v), _ptr(out), 96) == 0, "warp launch")
    a, b, c = (np.ones(s, np.float32) for s in ((16, 8), (8, 8), (16, 8)))
    d = np.zeros((16, 8), np.float32)
    _check(lib.st_mma(_ptr(a), _ptr(b), _ptr(c), _ptr(d)) == 0, "mma launch")
    _check(np.all(d == 9), "mma result")
    s = np.arange(128, dtype=np.int32)
    scan, total = np.zeros(128, np.int32), np.zeros(1, np.int32)
    _check(lib.st_scan(_ptr(s), _ptr(scan), _ptr(total)) == 0, "scan launch")
    _check(total[0] == s.sum(), "scan total")


def _blocks(lib, mode):
    out = np.zeros(4 * 32, np.int32)
    _check(lib.st_blocks(_ptr(out), mode) == 0, "launch")
    if mode == 0:
        _check(np.array_equal(out, np.repeat(np.arange(4, dtype=np.int32), 32)), "result")
    if mode == 3:
        _check(out[0] == 4 * 32, f"count {out[0]}")


def _blocks_then_next(lib):
    out, out2 = np.zeros(4 * 32, np.int32), np.zeros(4 * 32, np.int32)
    _check(lib.st_blocks_then_next(_ptr(out), _ptr(out2)) == 0, "launch")
    _check(np.array_equal(out2, np.repeat(np.roll(np.arange(4, dtype=np.int32), -1), 32)), "result")


def _static_shared(lib):
    out = np.zeros(2 * 4, np.int32)
    _check(lib.st_static_shared(_ptr(out), 4, 64) == 0, "launch")
    _check(np.array_equal(out, np.tile([-1, 64], 4)), f"result {out}")


CASES = {
    "barrier": (None, lambda lib: _barrier(lib, 1)),
    "barrier_missing": ("barrier_kernel", lambda lib: _barrier(lib, 0)),
    "syncwarp": (None, lambda lib: _warp_handoff(lib, 1)),
    "syncwarp_missing": ("warp_handoff_kernel", lambda lib: _warp_handoff(lib, 0)),
    "shuffle_orders_no_memory": ("warp_handoff_kernel", lambda lib: _warp_handoff(lib, 2)),
    "atomic_counter": (None, lambda lib: _counter(lib, 1)),
    "plain_counter": ("counter_kernel", lambda lib: _counter(lib, 0)),
    "cp_async_then_barrier": (None, lambda lib: _cp_async(lib, 1)),
    "cp_async_without_barrier": ("cp_async_neighbour_kernel", lambda lib: _cp_async(lib, 0)),
    "exited_thread_then_barrier": (None, _exit_then_barrier),
    "collectives": (None, _collectives),
    "blocks_disjoint": (None, lambda lib: _blocks(lib, 0)),
    "blocks_same_word": ("blocks_kernel", lambda lib: _blocks(lib, 1)),
    "blocks_read_next": ("blocks_kernel", lambda lib: _blocks(lib, 2)),
    "blocks_atomic": (None, lambda lib: _blocks(lib, 3)),
    "barrier_orders_own_block_only": ("blocks_kernel", lambda lib: _blocks(lib, 4)),
    "syncwarp_orders_own_block_only": ("blocks_kernel", lambda lib: _blocks(lib, 5)),
    "launches_ordered": (None, _blocks_then_next),
    "static_shared_per_block": (None, _static_shared),
}


def main(names: list[str], cases: dict = CASES) -> None:
    """Runs ``cases[name]`` for each name, each after its ``=== name`` line (also used by
    mem_cases.py)."""
    lib = ctypes.CDLL(emu_build.build_selftest())
    for name in names or list(cases):
        os.write(2, f"=== {name}\n".encode())
        cases[name][1](lib)
    os.write(2, b"=== end\n")


if __name__ == "__main__":
    main(sys.argv[1:])
