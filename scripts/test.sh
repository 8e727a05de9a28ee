#!/usr/bin/env bash
# The test command of the README: set-up (scripts/install.sh), then the whole test suite
# and the pytest-benchmark cases as a smoke pass (timing disabled), then, without a GPU,
# tests/test_cuda.py on CPU tensors, on the Triton kernels under the Triton interpreter,
# and on the CUDA emulator (plain, race-checked, then memory-checked).
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k global`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY=${PYTHON:-python3}
"$PY" -m pytest -q tests benchmarks --benchmark-disable "$@"
# Without a GPU, tests/test_cuda.py skips above; run its logic once more on CPU tensors
# (backend "cpu", same inputs, oracles and tolerances) so the GPU session's tests of
# record are themselves tested. Skipped when arguments select tests (-k, paths).
if [ $# -eq 0 ] && ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    VOS_CUDA_TESTS_ON_CPU=1 "$PY" -m pytest -q tests/test_cuda.py
    # the Triton kernels (backend "triton") under the Triton interpreter, with the same
    # fixed and random-shape cases (~3 min)
    if "$PY" -c 'import triton' >/dev/null 2>&1; then
        VOS_CUDA_TESTS_TRITON=1 "$PY" -m pytest -q tests/test_cuda.py
    fi
    # and the CUDA C++ kernels themselves, on the CPU emulator of tests/cuda_emu (g++,
    # fibers; a process of its own, as it replaces the CPU kernels of those ops)
    if command -v g++ >/dev/null 2>&1; then
        VOS_CUDA_TESTS_EMULATED=1 "$PY" -m pytest -q tests/test_cuda.py
        # and once more with the emulator's race detector (ThreadSanitizer, ~8 min) and
        # memory checker (AddressSanitizer, ~7 min); exit 3: no such runtime here, said
        # and skipped
        bash scripts/race_check.sh || { rc=$?; [ "$rc" -eq 3 ] || exit "$rc"; }
        bash scripts/memcheck.sh || { rc=$?; [ "$rc" -eq 3 ] || exit "$rc"; }
    fi
fi
