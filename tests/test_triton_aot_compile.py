"""Ahead-of-time compilation of the top-k read's Triton kernels for sm_90 (H100 / H200).

The interpreter (how the other Triton tests run without a GPU) accepts programs the GPU
compiler rejects (types, layouts, loop-carried values). Compiling to PTX and a cubin with
Triton's bundled ptxas catches those here, without a GPU; kernels are not run. The
compilation runs in a subprocess without TRITON_INTERPRET (which conftest.py sets)."""
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia")

SCRIPT = r'''
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from vos_kernels.triton import memory as tm

target = GPUTarget("cuda", 90, 32)
select_sig = {"q_ptr": "*{dt}", "m_ptr": "*{dt}", "idx_ptr": "*i64", "w_ptr": "*fp32", "part_ptr": "*i64",
              "Nq": "i32", "Nm": "i32", "CK": "i32", "K": "i32", "scale": "fp32", "split_rows": "i32",
              "BLOCK_Q": "constexpr", "BLOCK_M": "constexpr", "BLOCK_C": "constexpr", "KP": "constexpr",
              "SPLITS": "constexpr"}
merge_sig = {"part_ptr": "*i64", "idx_ptr": "*i64", "w_ptr": "*fp32", "Nq": "i32", "K": "i32",
             "BLOCK_Q": "constexpr", "KP": "constexpr", "SPLITS": "constexpr"}
readout_sig = {"v_ptr": "*{dt}", "idx_ptr": "*i64", "w_ptr": "*fp32", "out_ptr": "*fp32", "usage_ptr": "*fp32",
               "usage_sb": "i32", "usage_sn": "i32", "Nq": "i32", "Nm": "i32", "CV": "i32", "K": "i32",
               "BLOCK_V": "constexpr", "KP": "constexpr", "USAGE_MODE": "constexpr"}
jobs = []
for dt in ("fp32", "fp16", "bf16"):
    for bq, bm, bc, kp, sp in ((64, 64, 64, 32, 1), (32, 64, 32, 64, 8), (64, 64, 16, 2, 1)):
        jobs.append((tm._topk_select_kernel, {k: v.format(dt=dt) for k, v in select_sig.items()},
                     dict(BLOCK_Q=bq, BLOCK_M=bm, BLOCK_C=bc, KP=kp, SPLITS=sp)))
    for mode in (0, 1, 2):
        jobs.append((tm._gather_readout_kernel, {k: v.format(dt=dt) for k, v in readout_sig.items()},
                     dict(BLOCK_V=128, KP=32, USAGE_MODE=mode)))
for bq, kp, sp in ((16, 32, 8), (16, 32, 16), (8, 64, 16)):
    jobs.append((tm._topk_merge_kernel, merge_sig, dict(BLOCK_Q=bq, KP=kp, SPLITS=sp)))
for fn, sig, cx in jobs:
    kernel = triton.compile(ASTSource(fn, sig, constexprs=cx), target=target)
    assert len(kernel.asm["cubin"]) > 0
    print("compiled", fn.__name__, sig.get("q_ptr", sig.get("v_ptr")), cx, flush=True)
print("ALL", len(jobs))
'''


def test_topk_read_kernels_compile_for_sm90(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "cache"),
               TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT],
                          capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("this triton install has no ptxas")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "ALL 21" in proc.stdout
