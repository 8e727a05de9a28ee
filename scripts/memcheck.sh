#!/usr/bin/env bash
# Out-of-bounds accesses in the CUDA C++ kernels, without a GPU: tests/test_cuda.py on the
# CPU emulator of tests/cuda_emu built with AddressSanitizer (VOS_EMU_SANITIZE=address). A
# kernel's read or write past a tensor (torch's CPU allocations, exact size), past its
# dynamic shared memory (allocated per block at the launch's size) or past a static
# __shared__ array (per declaration and block) is reported with the kernel's source line
# and fails the test that ran it. The counterpart of compute-sanitizer memcheck on a GPU.
# Extra arguments go to pytest, e.g. `bash scripts/memcheck.sh -k topk`.
# Needs g++ with libasan (exit 3 without one); about 7 min on 2 cores, 1 of them the build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# the interpreter itself, not a wrapper script (pyenv's shims are bash scripts, and the
# AddressSanitizer runtime must be preloaded into python, not into a shell)
PY=$("$PY" -c 'import sys; print(sys.executable)')
export VOS_EMU_SANITIZE=address VOS_CUDA_TESTS_EMULATED=1
preload=$("$PY" tests/cuda_emu/emu_build.py --runtime)
if [ -z "$preload" ]; then
    echo "memcheck: no AddressSanitizer runtime that $PY starts with (g++ -print-file-name=libasan.so)" >&2
    exit 3
fi
# build before preloading the runtime (the compiler need not run under it)
"$PY" tests/cuda_emu/emu_build.py
opts=$("$PY" -c 'import sys; sys.path.insert(0, "tests/cuda_emu"); import emu_build; print(emu_build.ASAN_OPTIONS)')
# a report fails the test it came in (tests/test_cuda.py); one outside any test (collection,
# exit) fails the run here
log=$(mktemp)
trap 'rm -f "$log"' EXIT
LD_PRELOAD="$preload" ASAN_OPTIONS="$opts${ASAN_OPTIONS:+:$ASAN_OPTIONS}" \
    "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py "$@" 2>&1 | tee "$log"
if grep -q "ERROR: AddressSanitizer" "$log"; then
    echo "memcheck: a report outside the tests (above)" >&2
    exit 1
fi
