#!/usr/bin/env bash
# Data races in the CUDA C++ kernels, without a GPU: tests/test_cuda.py on the CPU emulator
# of tests/cuda_emu built with ThreadSanitizer (VOS_EMU_SANITIZE=thread). Each thread of a
# block is a ThreadSanitizer fiber, ordered only by what CUDA orders (__syncthreads,
# __syncwarp, atomics, the launch; nothing orders two blocks of a launch): a report names the
# kernel, the two source lines and the two threads, and fails the test that ran it. The
# counterpart of compute-sanitizer racecheck on a GPU (which checks shared memory only; this
# checks global memory too, within a block and between the blocks of a launch).
# Extra arguments go to pytest, e.g. `bash scripts/race_check.sh -k local`.
# Needs g++ with libtsan (exit 3 without one); about 8 min on 2 cores, 1 of them the build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# the interpreter itself, not a wrapper script (pyenv's shims are bash scripts, and the
# ThreadSanitizer runtime must be preloaded into python, not into a shell)
PY=$("$PY" -c 'import sys; print(sys.executable)')
export VOS_EMU_SANITIZE=thread VOS_CUDA_TESTS_EMULATED=1
tsan=$("$PY" tests/cuda_emu/emu_build.py --runtime)
if [ -z "$tsan" ]; then
    echo "race_check: no ThreadSanitizer runtime that $PY starts with (g++ -print-file-name=libtsan.so)" >&2
    exit 3
fi
# build before preloading the runtime (the compiler need not run under it)
"$PY" tests/cuda_emu/emu_build.py
# a report fails the test it came in (tests/test_cuda.py); one outside any test (collection,
# exit) fails the run here
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# one OpenMP thread: torch's own threads synchronise in code ThreadSanitizer does not see
OMP_NUM_THREADS=1 LD_PRELOAD="$tsan" TSAN_OPTIONS="halt_on_error=0 ${TSAN_OPTIONS:-}" \
    "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py "$@" 2>&1 | tee "$log"
if grep -q "WARNING: ThreadSanitizer" "$log"; then
    echo "race_check: a report outside the tests (above)" >&2
    exit 1
fi
