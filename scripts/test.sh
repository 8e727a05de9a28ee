#!/usr/bin/env bash
# The test command of the README: set-up (scripts/install.sh), then the whole test suite
# and the pytest-benchmark cases as a smoke pass (timing disabled). Extra arguments go
# to pytest, e.g. `bash scripts/test.sh -k global`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY=${PYTHON:-python3}
"$PY" -m pytest -q tests benchmarks --benchmark-disable "$@"
