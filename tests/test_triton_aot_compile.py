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


def compile_in_subprocess(script: str, tmp_path, expected: int) -> None:
    """Runs a compile script without the interpreter (conftest.py sets TRITON_INTERPRET) and
    checks that it compiled `expected` kernels; skips where Triton has no ptxas."""
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "cache"),
               TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0 and "ptxas" in proc.stderr and "not found" in proc.stderr:
        pytest.skip("this triton install has no ptxas")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-4000:]
    assert f"ALL {expected}" in proc.stdout

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
    compile_in_subprocess(SCRIPT, tmp_path, 21)


# GMM prototypes and A-GAME Gaussians (vos_kernels/triton/gmm.py): every kernel in each
# input dtype with the tiles and warps its launcher uses on the GPU (fp32: IEEE FMA dots,
# fp16 / bf16: TF32 dots, fp64: fp64 dots, outputs and scratch), K padded to 16 (PCAN
# instance head), 32 (PCAN frame level) and 64 (EMANet); the kernels whose pointers are all
# scratch once per accumulation dtype. fp64 caught Triton 3.6 (the GPU image's version), whose
# tl.dot returns fp32 unless given out_dtype: every dot names out_dtype=acc.dtype.
GMM_SCRIPT = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from vos_kernels.triton import gmm as tg

target = GPUTarget("cuda", 90, 32)
TYPES = {"X": "*{dt}", "F": "*{acc}", "i": "i32", "c": "constexpr"}


def sig(spec, dt):
    acc = "fp64" if dt == "fp64" else "fp32"   # outputs and scratch in the accumulation dtype
    return {name: TYPES[kind].format(dt=dt, acc=acc) for name, kind in (item.split(":") for item in spec.split())}


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
for dt in ("fp32", "fp16", "bf16", "fp64"):
    tf = dt in ("fp16", "bf16")
    bn = 64 if tf else 32
    em_configs = ((True, 1, 16, 16), (False, 1, 64, 32)) + (((False, 0, 32, 16),) if dt == "fp32" else ())
    for fused, kernel, kp, ncb in em_configs:
        jobs.append((tg._em_kernel, sig(EM, dt), 8, dict(BLOCK_N=bn, BLOCK_C=16, KP=kp, NCB_P=ncb, KERNEL=kernel,
                                                         NORMALIZE=True, HAS_MASK=fused, FUSED=fused, TF32=tf)))
    jobs.append((tg._pv_kernel, sig(PV, dt), 4, dict(BLOCK_N=64, BLOCK_V=64, KP=32, DIRECT=not tf, TF32=tf)))
    jobs.append((tg._attention_kernel, sig(ATT, dt), 4, dict(BLOCK_Q=32, BLOCK_C=16, BLOCK_V=32, KP=32, KERNEL=1,
                                                             TF32=tf)))
    jobs.append((tg._log_prob_kernel, sig(LP, dt), 4, dict(BLOCK_N=32, BLOCK_D=32, KP=4)))
    jobs.append((tg._log_prob_bwd_kernel, sig(LPB, dt), 8, dict(BLOCK_N=32, BLOCK_D=32, KP=4, DIRECT=not tf)))
    for second in (False, True):
        jobs.append((tg._fit_pass_kernel, sig(FIT, dt), 4, dict(BLOCK_N=32, BLOCK_D=32, KP=4, SECOND=second,
                                                                DIRECT=second, MODE=2, HAS_ADD=second)))
    jobs.append((tg._fit_bwd_kernel, sig(FITB, dt), 8, dict(BLOCK_N=32, BLOCK_D=32, KP=4)))
for acc in ("fp32", "fp64"):
    for mode, kp, nsq in ((1, 32, True), (0, 4, False), (2, 4, False)):
        jobs.append((tg._split_sum_kernel, sig(SUM, acc), 4, dict(KP=kp, BLOCK_C=16, MODE=mode, HAS_ADD=mode == 2,
                                                                  WRITE_NSQ=nsq)))
    jobs.append((tg._em_output_kernel, sig(OUT, acc), 4, dict(KP=64, NCB_P=32, BLOCK_C=16, NORMALIZE=True)))
for fn, s, warps, cx in jobs:
    kernel = triton.compile(ASTSource(fn, s, constexprs=cx), target=target, options={"num_warps": warps})
    assert len(kernel.asm["cubin"]) > 0
    print("compiled", fn.__name__, next(iter(s.values())), cx, flush=True)
print("ALL", len(jobs))
'''


def test_gmm_kernels_compile_for_sm90(tmp_path):
    compile_in_subprocess(GMM_SCRIPT, tmp_path, 45)


# CFBI matching (vos_kernels/triton/matching.py): the five kernels with the constexprs,
# warps and stages their launchers pass on the GPU, and the argument specialisation a real
# launch produces (int == 1 -> constexpr 1, ints otherwise i32 with tt.divisibility 16 when
# divisible by 16, 16-byte aligned pointers). Query / reference / previous share one dtype
# (the public wrappers check it). Global kernel: DOT_MODE 0 / 1 (fp32 exact / allow_tf32),
# 2 (fp16, bf16), 3 (bf16 upcast, produced only under the interpreter; compiled anyway);
# C <= 128 in one chunk (BLOCK_C = max(16, next_pow2(C))), above in chunks of 16 (IEEE)
# or 64 (tensor cores). Multi-local: LG = max(1, min(L, 64 // K)), LK_PAD = next_pow2(LG*K),
# BLOCK_C = next_pow2(C) (no minimum) or 64-chunks above 128. Pooling / backward:
# BLOCK_C = min(next_pow2(C), 64). BLOCK_P / BLOCK of the interpreter compiled once too.
MATCHING_SCRIPT = r'''
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from vos_kernels.triton import matching as tm

target = GPUTarget("cuda", 90, 32)
D16 = [["tt.divisibility", 16]]


def p2(n):
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def spec(fn, ptrs, ints, cx):
    """(signature, constexprs, attrs) as the JIT builds them for these arguments."""
    sig, consts, attrs = {}, dict(cx), {}
    for i, name in enumerate(fn.arg_names):
        if name in ptrs:
            sig[name] = "*" + ptrs[name]
            attrs[(i,)] = D16
        elif name in ints:
            v = ints[name]
            if v == 1:
                sig[name] = "constexpr"
                consts[name] = 1
                continue
            sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = D16
        else:
            assert name in cx, name
            sig[name] = "constexpr"
    return sig, consts, attrs


jobs = []   # (fn, dtype, sig, constexprs, attrs, num_warps, num_stages)


def add(fn, dt, ptrs, ints, cx, warps, stages=3):
    jobs.append((fn, dt) + spec(fn, ptrs, ints, cx) + (warps, stages))


# global matching: (C, Nq, L, BLOCK_M, BLOCK_N, WRITE_FG)
GLOBAL_SHAPES = ((100, 1620, 3, 64, 64, True), (256, 4096, 8, 64, 64, False), (8, 100, 1, 64, 64, True),
                 (64, 2048, 2, 128, 32, False), (32, 960, 4, 16, 16, True))
for dt, mode in (("fp32", 0), ("fp32", 1), ("fp16", 2), ("bf16", 2), ("bf16", 3)):
    for C, Nq, L, bm, bn, fg in GLOBAL_SHAPES[:2] if mode == 3 else GLOBAL_SHAPES[:4] if mode else GLOBAL_SHAPES:
        chunk = 16 if mode in (0, 3) else 64
        bc, nch = (max(16, p2(C)), 1) if max(16, p2(C)) <= 128 else (chunk, -(-C // chunk))
        add(tm._global_min_kernel, dt,
            dict(q_ptr=dt, r_ptr=dt, ridx_ptr="i32", seg_ptr="i64", bias_ptr="fp32", out_ptr="fp32", idx_ptr="i64"),
            dict(Nq=Nq, C=C, L=L),
            dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_C=bc, NUM_C_CHUNKS=nch, DOT_MODE=mode, WRITE_FG=fg), 8, 2)
# bg epilogue (fp32 only): (BLOCK, L, S)
for block, L, S in ((256, 3, 1620), (256, 1, 4096), (1024, 5, 100)):
    add(tm._bg_kernel, "fp32", dict(fg_ptr="fp32", bg_ptr="fp32"), dict(L=L, S=S), dict(BLOCK=block), 4)
# multi-local matching: (H, W, C, L, windows, rate, BLOCK_P)
LOCAL_SHAPES = ((30, 54, 100, 3, (4, 8, 12), 1, 32), (64, 64, 256, 11, (2, 4, 6, 8, 10, 12), 2, 32),
                (16, 16, 3, 1, (1,), 1, 32), (24, 40, 64, 20, (3, 5, 7, 9, 11), 1, 128))
for dt in ("fp32", "fp16", "bf16"):
    for H, W, C, L, wins, rate, bp in LOCAL_SHAPES if dt == "fp32" else LOCAL_SHAPES[:3]:
        K = len(wins)
        LG = max(1, min(L, 64 // K))
        bc, nch = (p2(C), 1) if p2(C) <= 128 else (64, -(-C // 64))
        RY, RX = (min(max(wins) // rate, (side - 1) // rate) for side in (H, W))
        add(tm._local_kernel, dt,
            dict(q_ptr=dt, p_ptr=dt, lab_ptr="i32", win_ptr="i32", bias_ptr="fp32", fg_ptr="fp32", idx_ptr="i64"),
            dict(H=H, W=W, C=C, L=L, RY=RY, RX=RX, NOFF=(2 * RY + 1) * (2 * RX + 1), rate=rate),
            dict(K=K, LG=LG, LK_PAD=p2(LG * K), BLOCK_P=bp, BLOCK_C=bc, NUM_C_CHUNKS=nch), 8, 2)
# a 40000 x 40000 frame and window: (2 R + 1)^2 >= 2^31 offsets, an int64 NOFF and loop
add(tm._local_kernel, "fp32",
    dict(q_ptr="fp32", p_ptr="fp32", lab_ptr="i32", win_ptr="i32", bias_ptr="fp32", fg_ptr="fp32", idx_ptr="i64"),
    dict(H=40000, W=40000, C=8, L=2, RY=39999, RX=39999, NOFF=79999**2, rate=1),
    dict(K=1, LG=2, LK_PAD=2, BLOCK_P=32, BLOCK_C=8, NUM_C_CHUNKS=1), 8, 2)
# instance pooling: (N, C, L, BLOCK_P)
POOL_SHAPES = ((1620, 100, 3, 32), (4096, 1, 2, 32), (960, 32, 8, 32), (100, 20, 2, 256))
for dt in ("fp32", "fp16", "bf16"):
    for N, C, L, bp in POOL_SHAPES if dt == "fp32" else POOL_SHAPES[:2]:
        add(tm._pool_kernel, dt, dict(e_ptr=dt, lab_ptr="i32", out_ptr="fp32"), dict(N=N, C=C, L=L),
            dict(BLOCK_P=bp, BLOCK_C=min(p2(C), 64)), 4)
# nearest-distance backward: (M, Nq, Nr, C, BLOCK_P)
BWD_SHAPES = ((3, 1620, 4860, 100, 32), (1, 4096, 4096, 8, 32), (6, 100, 100, 20, 128))
for dt in ("fp32", "fp16", "bf16"):
    for M, Nq, Nr, C, bp in BWD_SHAPES if dt == "fp32" else BWD_SHAPES[:2]:
        add(tm._nearest_bwd_kernel, dt,
            dict(g_ptr="fp32", q_ptr=dt, r_ptr=dt, idx_ptr="i64", gq_ptr="fp32", gr_ptr="fp32"),
            dict(M=M, Nq=Nq, Nr=Nr, C=C), dict(BLOCK_P=bp, BLOCK_C=min(p2(C), 64)), 8)

failed = []
for fn, dt, s, cx, attrs, warps, stages in jobs:
    try:
        kernel = triton.compile(ASTSource(fn, s, constexprs=cx, attrs=attrs), target=target,
                                options={"num_warps": warps, "num_stages": stages})
        assert len(kernel.asm["cubin"]) > 0
        print("compiled", fn.__name__, dt, cx, flush=True)
    except Exception as exc:  # report every failing configuration, not just the first
        failed.append(fn.__name__)
        print("FAILED", fn.__name__, dt, s, cx, type(exc).__name__, str(exc)[-1500:], flush=True)
assert not failed, failed
print("ALL", len(jobs), "triton", triton.__version__)
'''


def test_matching_kernels_compile_for_sm90(tmp_path):
    compile_in_subprocess(MATCHING_SCRIPT, tmp_path, 48)
