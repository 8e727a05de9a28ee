"""The CPU emulator of the CUDA kernels (tests/cuda_emu) checked on its own kernels.

tests/test_cuda.py with ``VOS_CUDA_TESTS_EMULATED=1`` runs the kernels of csrc/cuda/ on
the emulator; that is worth only as much as the emulator's semantics. These tests pin
them with the small CUDA kernels of tests/cuda_emu/selftest.cu: the mma.m16n8k8 TF32
fragment layout and rounding, warp shuffles / ballot / match, __syncthreads_count,
cp.async completing at its wait (and zero-filling), deadlock and exited-lane reports,
the launch limits, static __shared__ variables per block, the thread orders, and the cub
stand-ins; and the race detector (the emulator built with ThreadSanitizer,
tests/cuda_emu/race_cases.py in a subprocess): a race for a missing __syncthreads or
__syncwarp, a shuffle that orders no memory, a plain += on a shared counter, a cp.async copy
read by another thread without a barrier, and two blocks of one launch writing one word or
one reading what the other writes (a barrier orders its own block only); none for the same
kernels correctly ordered, for atomics, for blocks with disjoint words or in consecutive
launches, for __shared__ variables (each block's own) or for the emulator's own
bookkeeping; and the memory checker (the emulator built with AddressSanitizer,
tests/cuda_emu/mem_cases.py in a subprocess): a report with the kernel's line for a write
past a tensor, a read before one, a write past the launch's dynamic shared memory and a read
past a static __shared__ array; none for the same kernel in bounds.
"""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_emu"))
import emu_build as cuda_emu  # noqa: E402
import mem_cases  # noqa: E402
import race_cases  # noqa: E402

pytestmark = pytest.mark.skipif(cuda_emu.available() is not None, reason=f"emulator: {cuda_emu.available()}")

INVALID_VALUE, INVALID_CONFIGURATION, LAUNCH_FAILURE = 1, 9, 719


@pytest.fixture
def rng(gen):
    """numpy generator from the session-seeded torch generator of the test (conftest.gen)."""
    return np.random.default_rng(int(gen.initial_seed()))


@pytest.fixture(scope="module")
def st():
    lib = ctypes.CDLL(cuda_emu.build_selftest())
    lib.st_error.restype = ctypes.c_char_p
    return lib


def ptr(a):
    return a.ctypes.data_as(ctypes.c_void_p)


def tf32_round(x):
    """Round to nearest, ties away from zero, to a 10-bit mantissa (cvt.rna.tf32.f32)."""
    b = x.astype(np.float32).view(np.uint32)
    r = (b + np.uint32(0x1000)) & np.uint32(0xFFFFE000)
    return np.where((b & 0x7F800000) == 0x7F800000, b, r).view(np.float32)


def tf32_trunc(x):
    return (x.astype(np.float32).view(np.uint32) & np.uint32(0xFFFFE000)).view(np.float32)


def test_mma_layout_and_tf32_operands(st, rng):
    A = rng.standard_normal((16, 8)).astype(np.float32)
    B = rng.standard_normal((8, 8)).astype(np.float32)
    C = rng.standard_normal((16, 8)).astype(np.float32)
    D = np.zeros((16, 8), np.float32)
    assert st.st_mma(ptr(A), ptr(B), ptr(C), ptr(D)) == 0
    # operands enter as TF32 (low 13 bits ignored); products exact, so D is within fp32
    # rounding of the float64 product of the truncated operands
    want = tf32_trunc(A).astype(np.float64) @ tf32_trunc(B).astype(np.float64) + C
    np.testing.assert_allclose(D, want, rtol=0, atol=1e-5 * (np.abs(want).max() + 1))
    # and visibly not the fp32 product: the layout maps every element exactly once
    assert not np.allclose(D, A.astype(np.float64) @ B + C, rtol=0, atol=1e-7)
    # a permuted fragment (the transpose of B) would not match
    assert not np.allclose(D, tf32_trunc(A).astype(np.float64) @ tf32_trunc(B).T + C, atol=1e-3)


def test_cvt_rna_tf32(st, rng):
    base = rng.standard_normal(200).astype(np.float32)
    # exact ties: low 13 bits 0x1000 (away from zero on both signs), and the specials
    ties = (np.array([0x3F801000, 0xBF801000, 0x3F803000, 0x7F7FF000], np.uint32)).view(np.float32)
    special = np.array([np.inf, -np.inf, 0.0, -0.0, np.nan], np.float32)
    x = np.concatenate([base, ties, special])
    out = np.zeros(x.size, np.uint32)
    assert st.st_tf32(ptr(x), ptr(out), x.size) == 0
    got = out.view(np.float32)
    want = tf32_round(x)
    finite = np.isfinite(x)
    assert np.array_equal(got[finite].view(np.uint32), want[finite].view(np.uint32))
    assert got[-5] == np.inf and got[-4] == -np.inf and np.isnan(got[-1])
    assert np.all(np.abs(got[:200]) >= np.abs(tf32_trunc(x[:200])))
    assert got[200] == np.float32(1.0 + 2.0**-10) and got[201] == -np.float32(1.0 + 2.0**-10)
    assert np.isinf(got[203]), "rounding past the largest TF32 value gives inf"


@pytest.mark.parametrize("threads", [32, 96])
def test_warp_collectives(st, rng, threads):
    v = rng.integers(-50, 50, threads).astype(np.int32)
    out = np.zeros((threads, 6), np.int32)
    assert st.st_warp(ptr(v), ptr(out), threads) == 0
    odd_total = int((v & 1).sum())
    for t in range(threads):
        w0, lane = t - t % 32, t % 32
        warp = v[w0:w0 + 32]
        assert out[t, 0] == warp.sum()
        assert out[t, 1] == warp[(lane // 8) * 8 + (lane + 3) % 8]
        # CUDA guide: a group may read earlier groups; a later group gives its own value
        assert out[t, 2] == (warp[lane] if lane < 16 else warp[lane ^ 16])
        assert np.uint32(out[t, 3]) == sum(1 << i for i in range(32) if warp[i] & 1)
        rem = np.fmod(warp, 3)                  # C's % truncates toward zero
        assert np.uint32(out[t, 4]) == sum(1 << i for i in range(32) if rem[i] == rem[lane])
        assert out[t, 5] == odd_total


@pytest.mark.parametrize("blocks", [1, 3])
def test_static_shared_is_per_block(st, blocks):
    # each block's __shared__ variables start as the 0xff fill, not as the last block left them
    out = np.zeros(2 * blocks, np.int32)
    assert st.st_static_shared(ptr(out), blocks, 96) == 0
    assert np.array_equal(out, np.tile([-1, 96], blocks))


def test_static_plus_dynamic_shared_limit(st):
    out = np.zeros(1, np.int32)
    assert st.st_big_static_shared(ptr(out), 16 * 1024) == 0 and out[0] == 1
    code = st.st_big_static_shared(ptr(out), 40 * 1024)
    assert code == LAUNCH_FAILURE
    assert b"204800 bytes static + 40960 dynamic" in st.st_error(code)


def test_deadlock_is_reported(st):
    out = np.zeros(1, np.int32)
    code = st.st_deadlock(ptr(out))
    assert code == LAUNCH_FAILURE
    assert b"deadlock" in st.st_error(code)


def test_mask_naming_an_exited_lane_is_reported(st):
    out = np.zeros(32, np.int32)
    code = st.st_exited_lane(ptr(out))
    assert code == LAUNCH_FAILURE
    assert b"exited" in st.st_error(code)


@pytest.mark.parametrize("src_bytes", [16, 8, 0])
def test_cp_async_lands_at_the_wait(st, rng, src_bytes):
    threads = 8
    src = rng.standard_normal(4 * threads).astype(np.float32)
    out = np.zeros((threads, 8), np.float32)
    assert st.st_cp_async(ptr(src), ptr(out), threads, src_bytes) == 0
    assert np.isnan(out[:, :4]).all(), "before the wait: shared memory still holds the fill"
    n = src_bytes // 4
    assert np.array_equal(out[:, 4:4 + n], src.reshape(threads, 4)[:, :n])
    assert (out[:, 4 + n:] == 0).all(), "bytes past src-size are zero-filled"


@pytest.mark.parametrize("order", ["forward", "reverse", "shuffle:7"])
def test_thread_orders_expose_a_missing_barrier(st, rng, order, monkeypatch):
    monkeypatch.setenv("VOS_EMU_ORDER", order)
    threads = 64
    v = rng.integers(0, 1000, threads).astype(np.int32)
    out = np.zeros(threads, np.int32)
    assert st.st_barrier(ptr(v), ptr(out), threads, 1) == 0
    assert np.array_equal(out, np.roll(v, -1)), "with the barrier: every order gives the same answer"
    assert st.st_barrier(ptr(v), ptr(out), threads, 0) == 0
    stale = out == -1                       # the 0xff fill: read before its writer ran
    if order == "forward":
        assert stale[:-1].all() and not stale[-1]
    elif order == "reverse":
        assert not stale[:-1].any() and stale[-1]
    else:
        assert stale.any() and not stale.all()


def test_block_scan(st, rng):
    v = rng.integers(0, 10, 128).astype(np.int32)
    out = np.zeros(128, np.int32)
    total = np.zeros(1, np.int32)
    assert st.st_scan(ptr(v), ptr(out), ptr(total)) == 0
    assert np.array_equal(out, np.concatenate([[0], np.cumsum(v)[:-1]]))
    assert total[0] == v.sum()


@pytest.mark.parametrize("config, code", [
    ((4, 3, 256, 0, 0), 0),
    ((1, 65535, 32, 0, 0), 0),
    ((1, 65536, 32, 0, 0), INVALID_CONFIGURATION),    # grid.y limit
    ((0, 1, 32, 0, 0), INVALID_CONFIGURATION),        # empty grid
    ((1, 1, 1025, 0, 0), INVALID_CONFIGURATION),      # block limit
    ((1, 1, 32, 48 * 1024, 0), 0),
    ((1, 1, 32, 64 * 1024, 0), INVALID_VALUE),        # over 48 KiB without the opt-in
    ((1, 1, 32, 64 * 1024, 100 * 1024), 0),
    ((1, 1, 32, 200 * 1024, 300 * 1024), INVALID_VALUE),  # opt-in over the sm_90 limit
])
def test_launch_limits(st, config, code):
    assert st.st_launch(*config) == code


def test_sort_pairs_is_stable_on_the_key_bits(st, rng):
    n = 500
    keys = rng.integers(0, 1 << 12, n).astype(np.uint32) | (rng.integers(0, 4, n).astype(np.uint32) << 20)
    vals = np.arange(n, dtype=np.float32)
    ko, vo = np.zeros(n, np.uint32), np.zeros(n, np.float32)
    assert st.st_sort(ptr(keys), ptr(vals), ptr(ko), ptr(vo), n, 12) == 0
    order = np.argsort(keys & 0xFFF, kind="stable")    # bits 20.. are outside [0, 12): ignored
    assert np.array_equal(vo, vals[order]) and np.array_equal(ko, keys[order])


# ---- race detector and memory checker (the emulator built with a sanitizer) ---------------
def _case_reports(script: str, mode: str, runtime: str | None, **env: str) -> dict:
    """{case: its stderr} of ``script`` (race_cases.py or mem_cases.py) run in a subprocess
    with the self-test kernels built with ``VOS_EMU_SANITIZE=mode`` and ``runtime``
    preloaded."""
    if runtime is None:
        pytest.skip(f"g++ has no sanitizer runtime for VOS_EMU_SANITIZE={mode}")
    build_env = {**os.environ, "VOS_EMU_SANITIZE": mode}
    # build first without the runtime preloaded (g++ under a sanitizer is slow)
    subprocess.run([sys.executable, "-c", "import emu_build; emu_build.build_selftest()"], check=True,
                   env=build_env, cwd=os.path.dirname(script))
    r = subprocess.run([sys.executable, script], env={**build_env, **env, "LD_PRELOAD": runtime},
                       capture_output=True, text=True, timeout=600)
    parts = r.stderr.split("=== ")
    reports = {p.split("\n", 1)[0]: p for p in parts[1:]}
    assert "end" in reports, f"{os.path.basename(script)} did not finish (exit {r.returncode}):\n{r.stderr[-4000:]}"
    return reports


@pytest.fixture(scope="module")
def race_reports():
    # report every race, even one whose stacks or address an earlier report had
    return _case_reports(race_cases.__file__, "thread", cuda_emu.tsan_runtime(),
                         TSAN_OPTIONS="suppress_equal_stacks=0 suppress_equal_addresses=0")


@pytest.fixture(scope="module")
def mem_reports():
    return _case_reports(mem_cases.__file__, "address", cuda_emu.asan_runtime(), ASAN_OPTIONS=cuda_emu.ASAN_OPTIONS)


@pytest.mark.parametrize("case", list(race_cases.CASES))
def test_race_detector(race_reports, case):
    racy_kernel = race_cases.CASES[case][0]
    text = race_reports[case]
    assert "CASE FAILED" not in text, text
    if racy_kernel is None:
        assert "ThreadSanitizer" not in text, f"a race reported in a race-free case:\n{text[:6000]}"
    else:
        assert "WARNING: ThreadSanitizer: data race" in text, f"no race reported:\n{text[:3000]}"
        first = text.split("WARNING: ThreadSanitizer", 2)[1]
        assert racy_kernel in first and "of block (0,0,0)" in first, first[:6000]


@pytest.mark.parametrize("case", list(mem_cases.CASES))
def test_memory_checker(mem_reports, case):
    access = mem_cases.CASES[case][0]
    text = mem_reports[case]
    assert "CASE FAILED" not in text, text
    if access is None:
        assert "AddressSanitizer" not in text, f"a report for an in-bounds case:\n{text[:6000]}"
    else:
        assert "ERROR: AddressSanitizer" in text, f"no report:\n{text[:3000]}"
        first = text.split("ERROR: AddressSanitizer", 2)[1]
        assert access in first and "oob_kernel" in first and "selftest.cu" in first, first[:6000]
