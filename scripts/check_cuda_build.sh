#!/usr/bin/env bash
# Compile-, link- and load-check of the CUDA C++ kernels without a GPU (CI runs it):
#   1. nvcc -c -arch=sm_90 on every csrc/cuda/*.cu (torch-free sources);
#   2. g++ -c on every csrc/cuda/*.cpp (the ATen glue) against the installed torch's
#      headers, which may be a CPU build: the glue uses no ATen/cuda header;
#   3. links them with cudart into one shared library, loads it into a torch process
#      next to the operator schemas (argument 1: a library holding them, e.g. the CMake
#      build's libvos_kernels_ops.so) and checks that every op named in
#      csrc/cuda/OPS now has a CUDA kernel registered.
# Nothing runs on a GPU here; the GPU check is scripts/gpu_check.sh.
# Usage: scripts/check_cuda_build.sh SCHEMA_LIBRARY [WORKDIR]
# CUDA_CHECK_FILES="a.cu a_glue.cpp" limits it to those files (plus common.cu) and
# CUDA_CHECK_OPS="op1 op2" the ops checked, while other kernels are being written.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
schema_lib=${1:?usage: check_cuda_build.sh SCHEMA_LIBRARY [WORKDIR]}
work=${2:-$(mktemp -d)}
mkdir -p "$work"
shopt -s nullglob
cu_files=(csrc/cuda/*.cu)
cpp_files=(csrc/cuda/*.cpp)
if [ -n "${CUDA_CHECK_FILES:-}" ]; then
  cu_files=(csrc/cuda/common.cu); cpp_files=()
  for f in $CUDA_CHECK_FILES; do
    case "$f" in *.cu) cu_files+=("csrc/cuda/$f") ;; *) cpp_files+=("csrc/cuda/$f") ;; esac
  done
fi
if ! command -v nvcc >/dev/null 2>&1 || [ ${#cu_files[@]} -eq 0 ]; then
  echo "skipped (nvcc: $(command -v nvcc || echo none); .cu files: ${#cu_files[@]})"
  exit 0
fi
torch_dir=$("$PY" -c 'import os, torch; print(os.path.dirname(torch.__file__))')
abi=$("$PY" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')
objs=()
for f in "${cu_files[@]}"; do
  o="$work/$(basename "$f").o"
  echo "nvcc -c -arch=sm_90 $f"
  # torch's CUDAExtension adds the -D__CUDA_NO_HALF*/BFLOAT16 flags: compile as it will
  nvcc -c -arch=sm_90 -std=c++17 -O3 -Icsrc -Xcompiler -fPIC --resource-usage --expt-relaxed-constexpr \
    -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
    -D__CUDA_NO_HALF2_OPERATORS__ "$f" -o "$o" 2>"$o.log" \
    || { cat "$o.log"; exit 1; }
  grep -E "error|warning" "$o.log" || true
  objs+=("$o")
done
for f in "${cpp_files[@]}"; do
  o="$work/$(basename "$f").o"
  echo "g++ -c $f (CPU torch headers)"
  g++ -c -std=c++20 -O1 -fPIC -Wall -Wno-unused-function -D_GLIBCXX_USE_CXX11_ABI="$abi" -Icsrc \
    -I"$torch_dir/include" -I"$torch_dir/include/torch/csrc/api/include" "$f" -o "$o"
  objs+=("$o")
done
lib="$work/libvos_kernels_cuda_check.so"
# nvcc links the CUDA runtime statically, wherever the toolkit keeps it.
nvcc -shared -o "$lib" "${objs[@]}" -L"$torch_dir/lib" -lc10 -ltorch_cpu \
  -Xlinker -rpath,"$torch_dir/lib" -Xlinker --no-undefined
echo "linked $lib"
"$PY" - "$schema_lib" "$lib" csrc/cuda/OPS <<'PY'
import sys, torch
schema_lib, lib, ops_file = sys.argv[1:]
torch.ops.load_library(schema_lib)
torch.ops.load_library(lib)
import os
names = [l.split("#")[0].strip() for l in open(ops_file)]
names = os.environ.get("CUDA_CHECK_OPS", "").split() or [n for n in names if n]
missing = [n for n in names
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"vos_kernels::{n}", "CUDA")]
if missing:
    sys.exit(f"CUDA kernels not registered by the glue: {missing}")
print(f"the CUDA library loads next to the schemas and registers {len(names)} ops: {', '.join(names)}")
PY
