"""Ahead-of-time compilation of the top-k read's and the GMM ops' Triton kernels for sm_90
(H100 / H200).

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


# GMM prototypes and A-GAME Gaussians (vos_kernels/triton/gmm.py): every kernel in each
# input dtype with the tiles and warps its launcher uses on the GPU (fp32: IEEE FMA dots,
# fp16 / bf16: TF32 dots), K padded to 16 (PCAN instance head), 32 (PCAN frame level) and
# 64 (EMANet); the dtype-independent kernels (fp32 scratch only) once.
GMM_SCRIPT = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from vos_kernels.triton import gmm as tg

target = GPUTarget("cuda", 90, 32)
TYPES = {"X": "*{dt}", "F": "*fp32", "i": "i32", "c": "constexpr"}


def sig(spec, dt):
    return {name: TYPES[kind].format(dt=dt) for name, kind in (item.split(":") for item in spec.split())}


EM = ("x_ptr:X mu_ptr:F nsq_ptr:F mask_ptr:F kap_ptr:F resp_ptr:F out_ptr:F ps_ptr:F pa_ptr:F N:i C:i K:i NCB:i "
      "SPLITS:i split_rows:i it0:i iters:i num_iters:i BLOCK_N:c BLOCK_C:c KP:c NCB_P:c KERNEL:c NORMALIZE:c "
      "HAS_MASK:c FUSED:c TF32:c")
SUM = "pa_ptr:F ps_ptr:F add_ptr:F out_ptr:F nsq_ptr:F C:i K_OUT:i NCB:i SPLITS:i KP:c BLOCK_C:c MODE:c HAS_ADD:c WRITE_NSQ:c"
OUT = "mu_ptr:F nsq_ptr:F out_ptr:F C:i K:i NCB:i KP:c NCB_P:c BLOCK_C:c NORMALIZE:c"
PV = "v_ptr:X r_ptr:X out_ptr:F ps_ptr:F pa_ptr:F N:i K:i CV:i SPLITS:i split_rows:i BLOCK_N:c BLOCK_V:c KP:c DIRECT:c TF32:c"
ATT = ("q_ptr:X k_ptr:X v_ptr:X kap_ptr:F out_ptr:F attn_ptr:F Nq:i C:i K:i CV:i BLOCK_Q:c BLOCK_C:c BLOCK_V:c KP:c "
       "KERNEL:c TF32:c")
LP = "x_ptr:X m_ptr:X v_ptr:X out_ptr:F N:i D:i K:i BLOCK_N:c BLOCK_D:c KP:c"
LPB = ("g_ptr:F x_ptr:X m_ptr:X v_ptr:X gx_ptr:F gm_ptr:F gv_ptr:F pm_ptr:F pv_ptr:F N:i D:i K:i SPLITS:i "
       "split_rows:i BLOCK_N:c BLOCK_D:c KP:c DIRECT:c")
FIT = ("x_ptr:X w_ptr:X mean_ptr:F add_ptr:F out_ptr:F ps_ptr:F pa_ptr:F N:i D:i K:i SPLITS:i split_rows:i "
       "BLOCK_N:c BLOCK_D:c KP:c SECOND:c DIRECT:c MODE:c HAS_ADD:c")
FITB = ("gm_ptr:F gv_ptr:F x_ptr:X w_ptr:X mean_ptr:F q_ptr:F ps_ptr:F gx_ptr:F gw_ptr:F N:i D:i K:i SPLITS:i "
        "BLOCK_N:c BLOCK_D:c KP:c")
jobs = []
for dt in ("fp32", "fp16", "bf16"):
    tf = dt != "fp32"
    bn = 64 if tf else 32
    em_configs = ((True, 1, 16, 16), (False, 1, 64, 32)) + (((False, 0, 32, 16),) if dt == "fp32" else ())
    for fused, kernel, kp, ncb in em_configs:
        jobs.append((tg._em_kernel, sig(EM, dt), 8, dict(BLOCK_N=bn, BLOCK_C=16, KP=kp, NCB_P=ncb, KERNEL=kernel,
                                                         NORMALIZE=True, HAS_MASK=fused, FUSED=fused, TF32=tf)))
    jobs.append((tg._pv_kernel, sig(PV, dt), 4, dict(BLOCK_N=64, BLOCK_V=64, KP=32, DIRECT=dt == "fp32", TF32=tf)))
    jobs.append((tg._attention_kernel, sig(ATT, dt), 4, dict(BLOCK_Q=32, BLOCK_C=16, BLOCK_V=32, KP=32, KERNEL=1,
                                                             TF32=tf)))
    jobs.append((tg._log_prob_kernel, sig(LP, dt), 4, dict(BLOCK_N=32, BLOCK_D=32, KP=4)))
    jobs.append((tg._log_prob_bwd_kernel, sig(LPB, dt), 8, dict(BLOCK_N=32, BLOCK_D=32, KP=4, DIRECT=dt == "fp32")))
    for second in (False, True):
        jobs.append((tg._fit_pass_kernel, sig(FIT, dt), 4, dict(BLOCK_N=32, BLOCK_D=32, KP=4, SECOND=second,
                                                                DIRECT=second, MODE=2, HAS_ADD=second)))
    jobs.append((tg._fit_bwd_kernel, sig(FITB, dt), 8, dict(BLOCK_N=32, BLOCK_D=32, KP=4)))
for mode, kp, nsq in ((1, 32, True), (0, 4, False), (2, 4, False)):
    jobs.append((tg._split_sum_kernel, sig(SUM, "fp32"), 4, dict(KP=kp, BLOCK_C=16, MODE=mode, HAS_ADD=mode == 2,
                                                                 WRITE_NSQ=nsq)))
jobs.append((tg._em_output_kernel, sig(OUT, "fp32"), 4, dict(KP=64, NCB_P=32, BLOCK_C=16, NORMALIZE=True)))
for fn, s, warps, cx in jobs:
    kernel = triton.compile(ASTSource(fn, s, constexprs=cx), target=target, options={"num_warps": warps})
    assert len(kernel.asm["cubin"]) > 0
    print("compiled", fn.__name__, next(iter(s.values())), cx, flush=True)
print("ALL", len(jobs))
'''


def test_gmm_kernels_compile_for_sm90(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "cache"),
               TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-c", GMM_SCRIPT],
                          capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("this triton install has no ptxas")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "ALL 32" in proc.stdout
