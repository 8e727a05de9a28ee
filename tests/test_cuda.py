"""Every op on every CUDA backend against the float64 reference (issue 7).

On a CUDA machine each test runs once per CUDA backend: ``"cuda"`` (the CUDA C++ kernels
of csrc/cuda/, where built; ops without one run Triton there) and ``"triton"`` (the
Triton kernels called from Python). The oracle is :mod:`vos_kernels.reference` run in
float64 on CPU copies of the same fresh random inputs. Without CUDA every test skips,
except when
- ``VOS_CUDA_TESTS_ON_CPU=1``: they run on CPU tensors with backend ``"cpu"``, which
  checks this file's own logic on machines without a GPU;
- ``VOS_CUDA_TESTS_TRITON=1``: they run the Triton kernels on CPU tensors under the Triton
  interpreter (backend ``"triton"``; conftest.py sets ``TRITON_INTERPRET=1``);
- ``VOS_CUDA_TESTS_EMULATED=1``: they run the CUDA C++ kernels of csrc/cuda/ on the CPU
  emulator of tests/cuda_emu (built and loaded at import, in place of the CPU kernels of
  those ops, so run this file in a pytest process of its own). ``VOS_EMU_ORDER`` picks
  the order in which the emulator runs the threads of a block between barriers and the
  blocks of a grid; by default a shuffle seeded by the run's ``VOS_TEST_SEED``.

Tolerances (documented in docs/internals.md, "CUDA precision"):
- float32 under ``torch.get_float32_matmul_precision() == "highest"`` (torch's default):
  fp32-accurate products (3xTF32 on the tensor cores): 1e-4 relative to ‖q‖² + ‖r‖²;
- ``"high"`` (one TF32 product, 10-bit mantissa operands): 5e-3 relative;
- float16 / bfloat16 inputs: exact in TF32, compared with the float64 reference on the
  same (rounded) values: 1e-4 relative;
- float64: 1e-9;
- EM (iterative: float32 rounding amplified by the input's conditioning): per element,
  1e-5 + 8 x the float64 reference's sensitivity to rounding (``oracle.assert_within_rounding``).
Indices are checked by the distance they point at, since under TF32 a near tie may pick
either pixel; where the minimum is unique by a margin the index must be the oracle's.

Besides the fixed cases, ``test_random_*`` (at the end) draw shapes, dtypes, matmul
precisions, label patterns and NaN placements with hypothesis across the kernels' tile
boundaries, a few examples per run (``VOS_CUDA_FUZZ_EXAMPLES``, default 8), seeded by
``VOS_TEST_SEED``.
"""
from __future__ import annotations

import contextlib
import os
import sys

import hypothesis
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import oracle
from session_seed import SESSION_SEED
import vos_kernels as vk
import vos_kernels.triton
from vos_kernels import reference as R
from vos_kernels.gmm import KERNELS as GMM_KERNELS
from vos_kernels.memory import USAGE_MODES

EMULATED = os.environ.get("VOS_CUDA_TESTS_EMULATED") == "1" and not torch.cuda.is_available()
TRITON_INTERPRETED = os.environ.get("VOS_CUDA_TESTS_TRITON") == "1" and not torch.cuda.is_available()
ON_CPU = ((os.environ.get("VOS_CUDA_TESTS_ON_CPU") == "1" or EMULATED or TRITON_INTERPRETED)
          and not torch.cuda.is_available())
if torch.cuda.is_available():
    DEV = torch.device("cuda")
    BACKENDS = ["cuda", "triton"]
elif EMULATED:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_emu"))
    import emu_build as cuda_emu  # noqa: E402

    # a fresh thread order per run, replayed with the run's VOS_TEST_SEED
    os.environ.setdefault("VOS_EMU_ORDER", f"shuffle:{SESSION_SEED}")
    cuda_emu.load()
    DEV = torch.device("cpu")
    BACKENDS = ["cuda-emulated"]
elif TRITON_INTERPRETED:       # conftest.py sets TRITON_INTERPRET=1
    DEV = torch.device("cpu")
    BACKENDS = ["triton"]
elif ON_CPU:
    DEV = torch.device("cpu")
    BACKENDS = ["cpu"]
else:
    DEV = torch.device("cpu")
    BACKENDS = ["cuda", "triton"]

# The emulator built with ThreadSanitizer (scripts/race_check.sh) or AddressSanitizer
# (scripts/memcheck.sh): a race or an out-of-bounds access reported while a test runs fails
# that test.
SANITIZER_REPORT = {"thread": ("WARNING: ThreadSanitizer", "ThreadSanitizer reported a race in a CUDA kernel"),
                    "address": ("ERROR: AddressSanitizer", "AddressSanitizer reported a bad access in a CUDA kernel")}
if EMULATED and os.environ.get("VOS_EMU_SANITIZE") in SANITIZER_REPORT:
    _REPORT, _WHAT = SANITIZER_REPORT[os.environ["VOS_EMU_SANITIZE"]]

    @pytest.fixture(autouse=True)
    def _no_sanitizer_report(capfd):
        yield
        err = capfd.readouterr().err
        if _REPORT in err:
            pytest.fail(f"{_WHAT}:\n{err[:12000]}", pytrace=False)

# Without a GPU (on CPU tensors, and so on the emulator), every at::empty / torch.empty of a
# test fills its memory (NaN for floating point, the largest value for integers, 0xff bytes
# for the kernels' workspaces), so that memory a kernel reads without having written it, or
# an output word it leaves unwritten, carries NaN or an out-of-range value into the results
# the test checks, not zeros that may pass (the role of compute-sanitizer initcheck on a
# GPU). Not on a GPU: deterministic mode there also makes torch raise for its
# nondeterministic CUDA ops.
if ON_CPU:
    @pytest.fixture(autouse=True)
    def _fill_uninitialized_memory():
        det = torch.utils.deterministic
        old = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
               det.fill_uninitialized_memory)
        torch.use_deterministic_algorithms(True)
        det.fill_uninitialized_memory = True
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(old[0], warn_only=old[1])
            det.fill_uninitialized_memory = old[2]


pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available() and not ON_CPU, reason="needs a CUDA GPU"),
]


@pytest.fixture(params=BACKENDS)
def backend(request):
    name = request.param
    if name == "cuda" and DEV.type == "cuda" and "cuda" not in vk.available_backends():
        pytest.skip("the CUDA C++ kernels are not built in this install")
    vk.set_backend("cpu" if name == "cuda-emulated" else name)   # the CPU key runs the emulator
    return name


def cuda_cpp(backend):
    """Whether the ops with a CUDA C++ kernel run it (on a GPU or on the emulator)."""
    return EMULATED or (backend == "cuda" and DEV.type == "cuda")


def no_f64_triton(backend, dtype):
    """The Triton matching and top-k kernels take float32/16/bf16 only (float64 on CUDA runs
    on the CUDA C++ kernels)."""
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton matching / top-k kernels have no float64 path")


def randn(g, *shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEV)


def labels(g, L, *shape, ignore=True, dtype=torch.int64):
    lo = -1 if ignore else 0
    return torch.randint(lo, L, shape, generator=g).to(dtype).to(DEV)


def cpu64(*ts):
    return [t.detach().cpu().double() if t.is_floating_point() else t.detach().cpu() for t in ts]


def rel_tol(dtype):
    if dtype == torch.float64:
        return 1e-9
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return 5e-3
    return 1e-4


def assert_close_rel(out, want, scale, tol, what):
    out, want = out.detach().cpu().double(), want.detach().cpu().double()
    assert out.shape == want.shape, (what, out.shape, want.shape)
    both_inf = torch.isinf(out) & torch.isinf(want) & (torch.sign(out) == torch.sign(want))
    both_nan = torch.isnan(out) & torch.isnan(want)
    err = torch.where(both_inf | both_nan, torch.zeros_like(out), (out - want).abs())
    err = torch.nan_to_num(err, nan=float("inf"))
    bad = err > tol * scale                 # scale: a number, or a tensor per element
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} elements off; max err "
                           f"{float(err.max()):.3g} > tol {tol} x scale {float(torch.as_tensor(scale).max()):.3g}")


def sqdist_at(query, reference, index):
    """‖q − r[index]‖² in float64 for index [B, L, H, W] into T·Hr·Wr (inf at -1)."""
    q, r = cpu64(query, reference)
    B, H, W, C = q.shape
    rf = r.reshape(B, -1, C)
    idx = index.cpu()
    L = idx.shape[1]
    safe = idx.clamp(min=0).reshape(B, L * H * W)
    rsel = torch.gather(rf, 1, safe.unsqueeze(-1).expand(-1, -1, C)).reshape(B, L, H, W, C)
    d = ((q.unsqueeze(1) - rsel) ** 2).sum(-1)
    return torch.where(idx >= 0, d, torch.full_like(d, float("inf")))


def norm_scale(query, reference):
    """Per-problem scale of a squared distance: max ‖q‖² + max ‖r‖² over the rows without
    NaN (a NaN scale would make every comparison against it pass)."""
    q, r = cpu64(query, reference)
    return float(torch.nan_to_num((q * q).sum(-1), nan=0.0).max() + torch.nan_to_num((r * r).sum(-1), nan=0.0).max())


def check_nearest(q, r, lab, L, rate, sq, ix, tol, exact_index, oracle_fn=R.labelled_nearest_sqdist):
    """labelled_nearest_sqdist's (sqdist, index) against the float64 reference (or
    ``oracle_fn`` of its signature): the minima within ``tol`` relative to ‖q‖² + ‖r‖², the
    same empty labels, an index that points at a pixel of its label at that distance, and
    (``exact_index``) the reference's index."""
    want, want_ix = oracle_fn(*cpu64(q, r), lab.cpu(), L, rate)
    scale = norm_scale(q, r)
    assert_close_rel(sq, want, scale, tol, "sqdist")
    assert ((ix >= 0).cpu() == (want_ix >= 0)).all(), "empty labels differ"
    at = sqdist_at(q, r, ix)
    assert_close_rel(at.clamp(min=0), want, scale, tol, "distance at the returned index")
    B = lab.shape[0]
    lab_flat = lab.cpu().reshape(B, -1)
    got_lab = torch.gather(lab_flat, 1, ix.cpu().clamp(min=0).reshape(B, -1)).reshape(ix.shape)
    lvals = torch.arange(L).view(1, L, 1, 1).expand_as(got_lab)
    assert ((got_lab == lvals) | (ix.cpu() < 0)).all(), "index points at a pixel of another label"
    if exact_index:
        assert (ix.cpu() == want_ix).all()


# ----------------------------------------------------------------------------------------
# global matching
# ----------------------------------------------------------------------------------------
GLOBAL_CASES = [
    # (H, W, T, Hr, Wr, C, L, rate)
    (7, 9, 1, 6, 11, 3, 1, 1),
    (13, 17, 1, 11, 19, 7, 3, 1),
    (16, 16, 2, 16, 16, 32, 4, 2),
    (9, 23, 1, 21, 10, 100, 6, 3),
    (33, 31, 1, 35, 29, 64, 5, 2),
    (5, 70, 1, 40, 37, 128, 2, 1),
]


@pytest.mark.parametrize("case", GLOBAL_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_global_sqdist(gen, backend, case, dtype):
    no_f64_triton(backend, dtype)
    H, W, T, Hr, Wr, C, L, rate = case
    q = randn(gen, 2, H, W, C, dtype=dtype)
    r = randn(gen, 2, T, Hr, Wr, C, dtype=dtype)
    lab = labels(gen, L, 2, T, Hr, Wr)
    sq, ix = vk.labelled_nearest_sqdist(q, r, lab, L, rate)
    check_nearest(q, r, lab, L, rate, sq, ix, rel_tol(dtype), exact_index=dtype == torch.float64)


@pytest.mark.parametrize("rate", [1, 2])
def test_fb_global_matching(gen, backend, rate):
    L = 4
    q = randn(gen, 2, 15, 22, 32)
    r = randn(gen, 2, 1, 17, 20, 32)
    lab = labels(gen, L, 2, 1, 17, 20)
    lab[1, :, :, :][lab[1] == 2] = 3          # label 2 empty in the second sample
    bias = torch.tensor([-0.7, 0.4, 0.4, 0.4], device=DEV)
    fg, bg = vk.fb_global_matching(q, r, lab, L, bias, rate)
    wfg, wbg = R.fb_global_matching(*cpu64(q, r), lab.cpu(), L, bias.cpu().double(), rate)
    tol = rel_tol(torch.float32) * norm_scale(q, r)     # tanh' <= 1/2: distance tolerance bounds fg's
    assert_close_rel(fg, wfg, 1.0, tol, "fg")
    assert_close_rel(bg, wbg, 1.0, tol, "bg")
    assert (fg[1, 2] == 1).all(), "an empty label must give fg exactly 1"


def test_global_ties_lowest_index(gen, backend):
    # integer embeddings: exact distances in every precision, many exact ties
    q = torch.randint(-2, 3, (1, 6, 7, 4), generator=gen).float().to(DEV)
    r = torch.randint(-2, 3, (1, 1, 9, 8, 4), generator=gen).float().to(DEV)
    lab = labels(gen, 3, 1, 1, 9, 8, ignore=False)
    sq, ix = vk.labelled_nearest_sqdist(q, r, lab, 3, 1)
    want, want_ix = R.labelled_nearest_sqdist(*cpu64(q, r), lab.cpu(), 3, 1)
    assert torch.equal(sq.cpu().double(), want)
    assert torch.equal(ix.cpu(), want_ix), "ties must go to the lowest flat reference index"


def test_global_nan_propagates(gen, backend):
    q = randn(gen, 1, 5, 6, 8)
    r = randn(gen, 1, 1, 5, 6, 8)
    lab = labels(gen, 2, 1, 1, 5, 6, ignore=False)
    q[0, 2, 3, 1] = float("nan")
    sq, _ = vk.labelled_nearest_sqdist(q, r, lab, 2, 1)
    want, _ = R.labelled_nearest_sqdist(*cpu64(q, r), lab.cpu(), 2, 1)
    assert torch.equal(torch.isnan(sq.cpu()), torch.isnan(want))
    assert torch.isnan(sq[0, :, 2, 3]).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_global_half_inputs(gen, backend, dtype):
    if DEV.type == "cpu" and not EMULATED:
        pytest.skip("float16/bfloat16 inputs are a CUDA feature")
    q = randn(gen, 1, 12, 14, 32, dtype=dtype)
    r = randn(gen, 1, 1, 13, 11, 32, dtype=dtype)
    lab = labels(gen, 3, 1, 1, 13, 11)
    # the emulator runs on CPU tensors, where the public API takes float32/64 only: the op
    op = torch.ops.vos_kernels.labelled_nearest_sqdist if EMULATED else vk.labelled_nearest_sqdist
    sq, ix = op(q, r, lab, 3, 2)
    assert sq.dtype == torch.float32
    want, _ = R.labelled_nearest_sqdist(*cpu64(q, r), lab.cpu(), 3, 2)
    assert_close_rel(sq, want, norm_scale(q, r), 1e-4, "sqdist (half inputs, float64 oracle on the same values)")


def test_global_noncontiguous_int32(gen, backend):
    q = randn(gen, 1, 10, 12, 16).permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    r = randn(gen, 1, 1, 9, 13, 16)[..., ::1]
    r = r.transpose(2, 3).contiguous().transpose(2, 3)
    lab = labels(gen, 3, 1, 1, 9, 13, dtype=torch.int32)
    assert not q.is_contiguous() and not r.is_contiguous()
    sq, _ = vk.labelled_nearest_sqdist(q, r, lab, 3, 1)
    want, _ = R.labelled_nearest_sqdist(*cpu64(q, r), lab.cpu().long(), 3, 1)
    assert_close_rel(sq, want, norm_scale(q, r), rel_tol(torch.float32), "sqdist")


# ----------------------------------------------------------------------------------------
# multi-local matching
# ----------------------------------------------------------------------------------------
LOCAL_CASES = [
    # (H, W, C, L, windows, rate)
    (9, 11, 3, 1, (1,), 1),
    (17, 13, 32, 3, (2, 4, 6), 2),
    (24, 30, 32, 4, (4, 8, 12, 16, 20, 24), 2),
    (15, 19, 64, 3, (2, 4, 6, 8, 10, 12), 1),
    (7, 8, 100, 2, (2, 20), 1),          # windows larger than the frame
    (12, 14, 128, 5, (1, 3, 6), 3),
]


@pytest.mark.parametrize("case", LOCAL_CASES, ids=lambda c: f"{c[0]}x{c[1]}-C{c[2]}-L{c[3]}-w{max(c[4])}-r{c[5]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_local(gen, backend, case, dtype):
    no_f64_triton(backend, dtype)
    H, W, C, L, windows, rate = case
    q = randn(gen, 2, H, W, C, dtype=dtype)
    p = randn(gen, 2, H, W, C, dtype=dtype)
    lab = labels(gen, L, 2, H, W)
    bias = torch.linspace(-0.5, 0.5, L, device=DEV)
    fg, bg = vk.fb_multi_local_matching(q, p, lab, L, list(windows), bias, rate)
    wfg, wbg = R.fb_multi_local_matching(*cpu64(q, p), lab.cpu(), L, list(windows), bias.cpu().double(), rate)
    tol = 1e-9 if dtype == torch.float64 else 1e-5 * norm_scale(q, p)   # FFMA: fp32-accurate
    assert_close_rel(fg, wfg, 1.0, tol, "fg")
    assert_close_rel(bg, wbg, 1.0, tol, "bg")


def test_local_ties_and_nan(gen, backend):
    q = torch.randint(-1, 2, (1, 9, 10, 3), generator=gen).float().to(DEV)
    p = torch.randint(-1, 2, (1, 9, 10, 3), generator=gen).float().to(DEV)
    p[0, 4, 4, 0] = float("nan")
    lab = labels(gen, 3, 1, 9, 10)
    bias = torch.zeros(3, device=DEV)
    fg, bg = vk.fb_multi_local_matching(q, p, lab, 3, [1, 2, 4], bias, 1)
    wfg, wbg = R.fb_multi_local_matching(*cpu64(q, p), lab.cpu(), 3, [1, 2, 4], bias.cpu().double(), 1)
    assert torch.equal(torch.isnan(fg.cpu()), torch.isnan(wfg)), "NaN pattern of fg"
    assert_close_rel(fg, wfg, 1.0, 1e-6, "fg")
    assert_close_rel(bg, wbg, 1.0, 1e-6, "bg")


# ----------------------------------------------------------------------------------------
# gradients (through the argmin pair), instance pooling
# ----------------------------------------------------------------------------------------
def _grads(fn, *inputs):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    outs = fn(*inputs)
    loss = sum((o * torch.linspace(0.5, 1.5, o.numel(), dtype=o.dtype, device=o.device).view_as(o)).sum()
               for o in outs)
    # an input no output depends on (every label empty: fg is the constant 1) gets zeros
    grads = torch.autograd.grad(loss, inputs, allow_unused=True) if loss.requires_grad else [None] * len(inputs)
    return [torch.zeros_like(t) if gr is None else gr for t, gr in zip(inputs, grads)]


def assert_grads_match(kernel_fn, reference_fn, inputs, names, what, tol=1e-8):
    """The gradients of a weighted sum of the outputs with respect to ``inputs``: the
    kernel's (``kernel_fn`` on ``inputs``) against the float64 reference's (on CPU copies)."""
    got = _grads(kernel_fn, *inputs)
    want = _grads(reference_fn, *cpu64(*inputs))
    for gt, w, name in zip(got, want, names):
        assert_close_rel(gt, w, 1.0, tol, f"{what} grad {name}")


def test_backward_global_and_local_float64(gen, backend):
    # float64: the argmin pairs equal the oracle's, so the gradients must too
    no_f64_triton(backend, torch.float64)
    L = 3
    q = randn(gen, 2, 9, 10, 16, dtype=torch.float64)
    r = randn(gen, 2, 1, 8, 11, 16, dtype=torch.float64)
    lab = labels(gen, L, 2, 1, 8, 11)
    bias = torch.tensor([-0.3, 0.2, 0.2], dtype=torch.float64, device=DEV)
    assert_grads_match(lambda a, b, c: vk.fb_global_matching(a, b, lab, L, c, 2),
                       lambda a, b, c: R.fb_global_matching(a, b, lab.cpu(), L, c, 2),
                       (q, r, bias), ("query", "reference", "bias"), "global")
    p = randn(gen, 2, 9, 10, 16, dtype=torch.float64)
    plab = labels(gen, L, 2, 9, 10)
    assert_grads_match(lambda a, b, c: vk.fb_multi_local_matching(a, b, plab, L, [1, 3], c, 1),
                       lambda a, b, c: R.fb_multi_local_matching(a, b, plab.cpu(), L, [1, 3], c, 1),
                       (q, p, bias), ("query", "previous", "bias"), "local")


def test_instance_pooling(gen, backend):
    e = randn(gen, 2, 11, 13, 40)
    lab = labels(gen, 4, 2, 11, 13)
    out = vk.fb_instance_pooling(e, lab, 4)
    want = R.fb_instance_pooling(*cpu64(e), lab.cpu(), 4)
    assert_close_rel(out, want, 1.0, 1e-5, "pooled means")


# ----------------------------------------------------------------------------------------
# top-k memory read
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(1, 37, 50, 16, 24, 5), (2, 100, 700, 64, 96, 20), (1, 64, 9, 32, 8, 20)],
                         ids=lambda s: "B{}-Nq{}-Nm{}-CK{}-CV{}-k{}".format(*s))
@pytest.mark.parametrize("usage_mode", ["hits", "weights"])
def test_topk_read(gen, backend, shape, usage_mode):
    B, Nq, Nm, CK, CV, k = shape
    qk = randn(gen, B, Nq, CK)
    mk = randn(gen, B, Nm, CK)
    mv = randn(gen, B, Nm, CV)
    usage = torch.rand(B, Nm, generator=gen).to(DEV)
    u0 = usage.clone()
    out, (index, weight) = vk.topk_memory_read(qk, mk, mv, k, usage=usage, usage_mode=usage_mode, return_topk=True)
    u_ref = u0.cpu().clone()
    want, (windex, wweight) = R.topk_memory_read(*cpu64(qk, mk, mv), k, usage=u_ref, usage_mode=usage_mode,
                                                 return_topk=True)
    # queries whose k-th and (k+1)-th affinities are within 1e-4 may pick either entry
    aff = oracle.affinity(qk, mk, CK ** -0.5)
    kk = min(k, Nm)
    top = aff.topk(min(kk + 1, Nm), dim=-1).values
    clear = (top[..., kk - 1] - top[..., kk]).abs() > 1e-4 if Nm > kk else torch.ones(B, Nq, dtype=torch.bool)
    assert clear.float().mean() > 0.5
    assert_close_rel(out.cpu()[clear], want[clear], 1.0, 1e-4, "readout")
    assert torch.equal(index.cpu()[clear].sort(-1).values, windex[clear].sort(-1).values), "top-k sets"
    if bool(clear.all()):
        assert_close_rel(usage, u_ref, 1.0, 1e-4, "usage")


def test_topk_ties_nan(gen, backend):
    qk = torch.zeros(1, 4, 8, device=DEV)
    mk = torch.zeros(1, 30, 8, device=DEV)            # every affinity ties at 0
    mv = randn(gen, 1, 30, 5)
    out, (index, _) = vk.topk_memory_read(qk, mk, mv, 6, return_topk=True)
    assert torch.equal(index.cpu().sort(-1).values, torch.arange(6).expand(1, 4, 6)), "ties: lowest indices"
    mk2 = randn(gen, 1, 30, 8)
    mk2[0, 17, 3] = float("nan")
    _, (index2, _) = vk.topk_memory_read(randn(gen, 1, 4, 8), mk2, mv, 6, return_topk=True)
    assert (index2.cpu() == 17).any(-1).all(), "NaN ranks first"


# ----------------------------------------------------------------------------------------
# GMM prototypes
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 196, 64, 10, 6), (1, 3000, 256, 30, 3), (3, 50, 17, 5, 1)],
                         ids=lambda s: "B{}-N{}-C{}-K{}-it{}".format(*s))
@pytest.mark.parametrize("kernel", ["dot", "l2"])
def test_gmm_em(gen, backend, shape, kernel):
    B, N, C, K, iters = shape
    x = randn(gen, B, N, C, scale=C ** -0.5)            # rows of about unit norm (PCAN features)
    mu = torch.nn.functional.normalize(randn(gen, B, K, C), dim=-1)
    mask = (torch.rand(B, N, generator=gen) > 0.3).float().to(DEV)
    if B > 1:
        mask[-1] = 0                                    # an empty mask: means 0, not NaN
    means, resp = vk.gmm_em(x, mu, iters, 20.0, mask, kernel)
    if B > 1:
        assert torch.equal(means[-1].cpu(), torch.zeros(K, C)), "empty mask: zero means"
    # tolerance from the float64 reference's sensitivity to float32 rounding (kappa 20 and
    # 6 iterations amplify it; a fixed 2e-4 failed ~2 % of random draws). The CUDA C++ EM
    # multiplies on the tensor cores for K >= 8, C >= 32: 3xTF32 under "highest", ~22 bits.
    tensor_cores = cuda_cpp(backend) and K >= 8 and C >= 32
    oracle.assert_within_rounding((means, resp), lambda a, b, w: R.gmm_em(a, b, iters, 20.0, w, kernel),
                                  (x, mu, mask), C, what=f"gmm_em {kernel}",
                                  unit=2.0 ** -22 if tensor_cores else 2.0 ** -24)


def test_prototype_ops(gen, backend):
    q = randn(gen, 2, 300, 32)
    keys = torch.nn.functional.normalize(randn(gen, 2, 20, 32), dim=-1)
    vals = randn(gen, 2, 20, 48)
    for kernel in ("dot", "l2"):
        out = vk.prototype_attention(q, keys, vals, 1.0, kernel)
        want = R.prototype_attention(*cpu64(q, keys, vals), 1.0, kernel)
        assert_close_rel(out, want, 1.0, 1e-4, f"prototype_attention {kernel}")
    resp = torch.softmax(randn(gen, 2, 300, 20), -1)
    assert_close_rel(vk.prototype_values(vals[:, :1].expand(2, 300, 48).contiguous(), resp),
                     R.prototype_values(*cpu64(vals[:, :1].expand(2, 300, 48), resp)), 1.0, 1e-4, "prototype_values")
    # a long N with few (b, k) blocks: split over N, partial sums reduced by a second kernel
    v_long = randn(gen, 1, 3000, 40)
    r_long = torch.softmax(randn(gen, 1, 3000, 6), -1)
    assert_close_rel(vk.prototype_values(v_long, r_long), R.prototype_values(*cpu64(v_long, r_long)), 1.0, 1e-4,
                     "prototype_values (N split)")


# ----------------------------------------------------------------------------------------
# every dtype of the CUDA C++ kernels (the registered op: float64 and the half types, which
# the Triton kernels and the public API on CPU tensors do not all take)
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_cuda_cpp_ops_every_dtype(gen, backend, dtype):
    if not cuda_cpp(backend):
        pytest.skip("the dtypes of the CUDA C++ kernels (registered op)")
    ops = torch.ops.vos_kernels
    # float64: float64-accurate; half inputs: exact in float32, compared with the float64
    # oracle on the same rounded values, float32 arithmetic (tolerance relative to the
    # output's scale)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    out_dt = torch.float64 if dtype == torch.float64 else torch.float32

    L = 3
    q = randn(gen, 2, 11, 13, 32, dtype=dtype)
    p = randn(gen, 2, 11, 13, 32, dtype=dtype)
    lab = labels(gen, L, 2, 11, 13)
    bias = torch.linspace(-0.4, 0.4, L, device=DEV, dtype=out_dt)
    fg, bg, _ = ops.fb_multi_local_matching(q, p, lab, L, [1, 4, 7], bias, 2)
    assert fg.dtype == out_dt
    wfg, wbg = R.fb_multi_local_matching(*cpu64(q, p), lab.cpu(), L, [1, 4, 7], bias.cpu().double(), 2)
    assert_close_rel(fg, wfg, 1.0, tol * norm_scale(q, p), "local fg")
    assert_close_rel(bg, wbg, 1.0, tol * norm_scale(q, p), "local bg")

    pooled = ops.fb_instance_pooling(q, lab, L)
    assert_close_rel(pooled, R.fb_instance_pooling(*cpu64(q), lab.cpu(), L), 1.0, tol, "pooling")

    B, Nq, Nm, CK, CV, k = 2, 40, 300, 32, 24, 7
    qk, mk, mv = randn(gen, B, Nq, CK, dtype=dtype), randn(gen, B, Nm, CK, dtype=dtype), randn(gen, B, Nm, CV,
                                                                                              dtype=dtype)
    usage = torch.zeros(B, Nm, device=DEV)
    out, index, weight = ops.topk_memory_read(qk, mk, mv, k, CK ** -0.5, usage, 2)
    u_ref = torch.zeros(B, Nm)
    want, (windex, _) = R.topk_memory_read(*cpu64(qk, mk, mv), k, usage=u_ref, usage_mode="weights",
                                           return_topk=True)
    aff = oracle.affinity(qk, mk, CK ** -0.5)
    top = aff.topk(k + 1, dim=-1).values
    clear = (top[..., k - 1] - top[..., k]).abs() > 1e-4        # the k-th entry is not a near tie
    assert clear.float().mean() > 0.5
    assert torch.equal(index.cpu()[clear].sort(-1).values, windex[clear].sort(-1).values), "top-k sets"
    assert_close_rel(out.cpu()[clear], want[clear], 1.0, tol, "readout")

    x = randn(gen, 2, 150, 32, dtype=dtype, scale=32 ** -0.5)
    mu = torch.nn.functional.normalize(randn(gen, 2, 8, 32), dim=-1).to(dtype)
    keys = mu
    vals = randn(gen, 2, 8, 20, dtype=dtype)
    for kernel, kid in (("dot", 0), ("l2", 1)):
        got, attn = ops.prototype_attention(x, keys, vals, 1.0, kid)
        assert_close_rel(got, R.prototype_attention(*cpu64(x, keys, vals), 1.0, kernel), 1.0, tol,
                         f"prototype_attention {kernel}")
    resp = torch.softmax(randn(gen, 2, 150, 8), -1).to(dtype)
    assert_close_rel(ops.prototype_values(x, resp), R.prototype_values(*cpu64(x, resp)), 1.0, tol,
                     "prototype_values")
    means, resp = ops.gmm_em(x, mu, 3, 10.0, None, 1, True)
    if dtype == torch.float64:
        wm, wr = R.gmm_em(*cpu64(x, mu), 3, 10.0, None, "l2")
        assert_close_rel(means, wm, 1.0, 1e-9, "gmm_em means")
        assert_close_rel(resp, wr, 1.0, 1e-9, "gmm_em resp")
    else:
        oracle.assert_within_rounding((means, resp), lambda a, b: R.gmm_em(a, b, 3, 10.0, None, "l2"),
                                      tuple(t.float() for t in (x, mu)), 32, what="gmm_em (half inputs)",
                                      unit=2.0 ** -22)


# ----------------------------------------------------------------------------------------
# determinism: bitwise-equal reruns
# ----------------------------------------------------------------------------------------
def test_determinism(gen, backend):
    if EMULATED or TRITON_INTERPRETED:
        pytest.skip("the emulator and the Triton interpreter run threads / programs one at a time: reruns are "
                    "equal by construction")
    L = 4
    q = randn(gen, 2, 30, 33, 32)
    r = randn(gen, 2, 1, 30, 33, 32)
    lab = labels(gen, L, 2, 1, 30, 33)
    bias = torch.tensor([-0.5, 0.3, 0.3, 0.3], device=DEV)

    def run():
        g = _grads(lambda a, b, c: vk.fb_global_matching(a, b, lab, L, c, 2), q, r, bias)
        loc = _grads(lambda a, b, c: vk.fb_multi_local_matching(a, b, lab[:, 0], L, [2, 4, 8], c, 2), q, r[:, 0],
                     bias)
        fwd = vk.fb_global_matching(q, r, lab, L, bias, 1) + vk.fb_multi_local_matching(q, r[:, 0], lab[:, 0], L,
                                                                                          [4, 8], bias, 1)
        usage = torch.zeros(2, 990, device=DEV)
        top = vk.topk_memory_read(q.reshape(2, -1, 32), r.reshape(2, -1, 32), q.reshape(2, -1, 32), 20,
                                  usage=usage, usage_mode="weights")
        top_grads = _grads(lambda a, b, c: (vk.topk_memory_read(a, b, c, 20),), q.reshape(2, -1, 32),
                           r.reshape(2, -1, 32), r.reshape(2, -1, 32) * 0.5)
        em = vk.gmm_em(q.reshape(2, -1, 32), torch.nn.functional.normalize(r[:, 0, 0, :10], dim=-1), 3, 20.0)
        return [*g, *loc, *fwd, top, usage, *top_grads, *em]

    first, second = run(), run()
    for i, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"output {i} differs between two runs on the same inputs"


# ----------------------------------------------------------------------------------------
# opcheck on CUDA (schemas, fake kernels, autograd registration, dispatcher round trips)
# ----------------------------------------------------------------------------------------
def test_opcheck_cuda(gen, backend):
    if backend != BACKENDS[0]:
        pytest.skip("opcheck tests the registered kernel (the CUDA dispatch key)")
    L = 3
    q = randn(gen, 1, 6, 7, 8)
    r = randn(gen, 1, 1, 6, 7, 8)
    lab = labels(gen, L, 1, 1, 6, 7)
    bias = torch.tensor([-0.2, 0.1, 0.1], device=DEV)
    ops = torch.ops.vos_kernels
    torch.library.opcheck(ops.labelled_nearest_sqdist, (q, r, lab, L, 2))
    torch.library.opcheck(ops.fb_global_matching, (q, r, lab, L, bias, 1))
    torch.library.opcheck(ops.fb_multi_local_matching, (q, r[:, 0], lab[:, 0], L, [1, 2], bias, 1))
    torch.library.opcheck(ops.topk_memory_read, (q.reshape(1, -1, 8), r.reshape(1, -1, 8), q.reshape(1, -1, 8), 5,
                                                 0.3, torch.zeros(1, 42, device=DEV), 1),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(ops.gmm_em, (q.reshape(1, -1, 8), r.reshape(1, -1, 8)[:, :4], 2, 5.0, None, 0, True))


# ----------------------------------------------------------------------------------------
# 64-bit indexing: inputs of more than 2^31 elements (about 9 GB each)
# ----------------------------------------------------------------------------------------
def _free_bytes():
    return torch.cuda.mem_get_info()[0] if DEV.type == "cuda" else 0


@pytest.mark.slow
def test_large_global_64bit_offsets(gen, backend):
    if _free_bytes() < 30 * 2**30:
        pytest.skip("needs 30 GiB of free GPU memory")
    C, side = 128, 4100                     # 1·4100·4100·128 = 2.15e9 > 2^31 reference elements
    q = torch.randn(1, 4, 4, C, device=DEV)
    r = torch.empty(1, 1, side, side, C, device=DEV).normal_()
    lab = torch.randint(0, 2, (1, 1, side, side), device=DEV)
    far = side * side - 3                     # plant an exact copy of a query beyond 2^31 elements
    r.view(-1, C)[far] = q[0, 1, 2]
    lab.view(-1)[far] = 1
    sq, ix = vk.labelled_nearest_sqdist(q, r, lab, 2, 1)
    assert int(ix[0, 1, 1, 2]) == far and float(sq[0, 1, 1, 2]) <= 1e-3 * float((q[0, 1, 2] ** 2).sum())
    # every other query: its minimum by a chunked float32 torch computation
    rf = r.view(-1, C)
    best = torch.full((16, 2), float("inf"), device=DEV)
    for s in range(0, rf.shape[0], 1 << 22):
        d = torch.cdist(q.view(16, C), rf[s:s + (1 << 22)]) ** 2
        lb = lab.view(-1)[s:s + (1 << 22)]
        for lv in range(2):
            best[:, lv] = torch.minimum(best[:, lv], torch.where(lb == lv, d, float("inf")).min(1).values)
    got = sq[0].permute(1, 2, 0).reshape(16, 2)
    assert torch.allclose(got, best, rtol=1e-3, atol=1e-2 * C)


@pytest.mark.slow
def test_large_topk_64bit_offsets(gen, backend):
    if _free_bytes() < 30 * 2**30:
        pytest.skip("needs 30 GiB of free GPU memory")
    Nm, CV = 1 << 21, 1024                   # memory values: 2^31 elements
    qk = torch.randn(1, 16, 64, device=DEV)
    mk = torch.randn(1, Nm, 64, device=DEV)
    mv = torch.empty(1, Nm, CV, device=DEV).normal_()
    mk[0, Nm - 5] = qk[0, 3] * 8               # a dominant entry at the far end
    out, (index, weight) = vk.topk_memory_read(qk, mk, mv, 20, return_topk=True)
    assert int(index[0, 3, 0]) == Nm - 5 or (index[0, 3] == Nm - 5).any()
    aff = (2 * qk[0] @ mk[0].T - (mk[0] ** 2).sum(-1)) / 8.0
    top = aff.topk(20, dim=-1)
    w = torch.softmax(top.values, -1)
    want = torch.einsum("qk,qkc->qc", w, mv[0][top.indices])
    assert torch.allclose(out[0], want, rtol=1e-3, atol=1e-3)


# ----------------------------------------------------------------------------------------
# a batch over CUDA's grid limit (65535 blocks along y and z): the CUDA C++ launchers loop
# over batch slices or use grid axis x; the Triton op entries run slices (_limits.py)
# ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_batch_over_the_grid_limit(gen, backend):
    """65537 tiny problems per op. Oracles: the float64 reference, and for the matching ops
    (whose references loop over the batch in Python: minutes) the C++ CPU op in float64,
    itself tested against that reference."""
    if DEV.type != "cuda":
        pytest.skip("CUDA's grid limit: on a GPU only (the emulator would run 65537 blocks one by one)")
    registered = torch.ops.vos_kernels
    B, L = 65537, 2
    q, r, lab = randn(gen, B, 2, 2, 4), randn(gen, B, 1, 2, 2, 4), labels(gen, L, B, 1, 2, 2)
    sq, ix = vk.labelled_nearest_sqdist(q, r, lab, L)
    check_nearest(q, r, lab, L, 1, sq, ix, rel_tol(torch.float32), exact_index=False,
                  oracle_fn=registered.labelled_nearest_sqdist)
    prev, plab = randn(gen, B, 2, 2, 4), labels(gen, L, B, 2, 2)
    bias = torch.tensor([-0.2, 0.3], device=DEV)
    fg, bg = vk.fb_multi_local_matching(q, prev, plab, L, [1], bias)
    wfg, wbg, _ = registered.fb_multi_local_matching(*cpu64(q, prev), plab.cpu(), L, [1], bias.cpu().double(), 1)
    assert_close_rel(fg, wfg, 1.0, 1e-5 * norm_scale(q, prev), "local fg")
    assert_close_rel(bg, wbg, 1.0, 1e-5 * norm_scale(q, prev), "local bg")
    assert_close_rel(vk.fb_instance_pooling(q, plab, L), R.fb_instance_pooling(*cpu64(q), plab.cpu(), L), 1.0, 1e-5,
                     "pooled means")
    # the backward kernel on random argmin indices (no near ties to route)
    g, qf, rf = randn(gen, B, L, 4), q.reshape(B, 4, 4), r.reshape(B, 4, 4)
    index = labels(gen, 4, B, L, 4)
    bwd = vos_kernels.triton.nearest_sqdist_backward if backend == "triton" else registered.nearest_sqdist_backward
    gq, gr = bwd(g, qf, rf, index)
    g64, q64, r64 = cpu64(g, qf, rf)
    ok = index.cpu() >= 0
    sel = torch.gather(r64, 1, index.cpu().clamp(min=0).reshape(B, -1, 1).expand(-1, -1, 4)).reshape(B, L, 4, 4)
    t = torch.where(ok.unsqueeze(-1), 2 * g64.unsqueeze(-1) * (q64.unsqueeze(1) - sel), 0.0)
    want_gr = torch.zeros(B, 4, 4, dtype=torch.float64).scatter_add_(
        1, index.cpu().clamp(min=0).reshape(B, -1, 1).expand(-1, -1, 4), -t.reshape(B, -1, 4))
    assert_close_rel(gq, t.sum(1), 1.0, 1e-5, "grad_query")
    assert_close_rel(gr, want_gr, 1.0, 1e-5, "grad_reference")
    # top-k with usage: k = Nm, so the selection is every entry (no near ties to pick)
    qk, mk, mv = randn(gen, B, 3, 4), randn(gen, B, 5, 4), randn(gen, B, 5, 3)
    usage = torch.zeros(B, 5, device=DEV)
    out = vk.topk_memory_read(qk, mk, mv, 5, usage=usage, usage_mode="weights")
    u_ref = torch.zeros(B, 5)
    want = R.topk_memory_read(*cpu64(qk, mk, mv), 5, usage=u_ref, usage_mode="weights")
    assert_close_rel(out, want, 1.0, 1e-4, "top-k readout")
    assert_close_rel(usage, u_ref, 1.0, 1e-4, "top-k usage")
    x, mu = randn(gen, B, 6, 4), torch.nn.functional.normalize(randn(gen, B, 3, 4), dim=-1)
    for got, want, what in zip(vk.gmm_em(x, mu, 2, 5.0), R.gmm_em(*cpu64(x, mu), 2, 5.0), ("means", "resp")):
        assert_close_rel(got, want, 1.0, 1e-4, f"gmm_em {what}")       # kappa 5, 4 channels: well conditioned
    resp = torch.softmax(randn(gen, B, 6, 3), -1)
    assert_close_rel(vk.prototype_values(x, resp), R.prototype_values(*cpu64(x, resp)), 1.0, 1e-4, "prototype_values")
    assert_close_rel(vk.prototype_attention(x, mu, mv[:, :3], 1.0),
                     R.prototype_attention(*cpu64(x, mu, mv[:, :3]), 1.0), 1.0, 1e-4, "prototype_attention")
    var = torch.rand(B, 3, 4, generator=gen).to(DEV) + 0.5
    assert_close_rel(vk.diag_gmm_log_prob(x, mu, var), R.diag_gmm_log_prob(*cpu64(x, mu, var)), 1.0, 1e-4,
                     "diag_gmm_log_prob")
    reg = torch.full((3, 4), 0.1, device=DEV)
    for got, want, what in zip(vk.diag_gmm_fit(x, resp, reg), R.diag_gmm_fit(*cpu64(x, resp, reg)), ("mean", "var")):
        assert_close_rel(got, want, 1.0, 1e-4, f"diag_gmm_fit {what}")


# ----------------------------------------------------------------------------------------
# gradcheck in float64 (the CUDA C++ kernels; the Triton matching kernels have no float64)
# ----------------------------------------------------------------------------------------
def test_gradcheck_float64(gen, backend):
    no_f64_triton(backend, torch.float64)
    L = 3
    bias = torch.tensor([-0.3, 0.2, 0.2], dtype=torch.float64, device=DEV, requires_grad=True)
    # inputs whose minima are not near ties, where a finite difference straddles two branches
    q, r, lab = oracle.draw_separated(
        lambda: (randn(gen, 1, 4, 5, 6, dtype=torch.float64), randn(gen, 1, 1, 5, 4, 6, dtype=torch.float64),
                 labels(gen, L, 1, 1, 5, 4, ignore=False)),
        lambda q, r, lab: oracle.fb_min_gap(*oracle.global_candidates(*cpu64(q, r, lab), L), bias))
    q, r = q.requires_grad_(), r.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, c: vk.fb_global_matching(a, b, lab, L, c, 1), (q, r, bias))
    q4, lab4 = q[:, :4, :4].detach().contiguous(), lab[:, 0, :4, :4].contiguous()
    (p4,) = oracle.draw_separated(
        lambda: (randn(gen, 1, 4, 4, 6, dtype=torch.float64),),
        lambda p4: oracle.fb_min_gap(*oracle.local_candidates(*cpu64(q4, p4, lab4), L, [1, 2]), bias))
    assert torch.autograd.gradcheck(
        lambda a, b, c: vk.fb_multi_local_matching(a, b, lab4, L, [1, 2], c, 1),
        (q4.requires_grad_(), p4.requires_grad_(), bias))
    pq = randn(gen, 2, 7, 6, dtype=torch.float64).requires_grad_()
    pk = randn(gen, 2, 4, 6, dtype=torch.float64).requires_grad_()
    pv = randn(gen, 2, 4, 5, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, c: vk.prototype_attention(a, b, c, 0.7, "l2"), (pq, pk, pv))


# ----------------------------------------------------------------------------------------
# random shapes: every CUDA C++ op against the float64 reference on shapes, dtypes, matmul
# precisions, label patterns and NaN placements drawn by hypothesis, seeded by the run's
# VOS_TEST_SEED (a failing run replays with it; hypothesis prints the drawn values). The
# ranges straddle the boundaries the kernels are written around: 128-row query blocks,
# 64-pixel reference / memory tiles, Cpad = roundup(C, 8) and the shared-memory limit of
# the tensor-core path (C > 222 runs the SIMT kernel), 32-channel slabs, the 16 / 32 / 64
# mean blocks of EM, split memory axes and k above the register top-k's 64, windows larger
# than the frame. Sizes are capped by a work budget (multiply-adds per call) so that the
# emulator runs an example in about a second; VOS_CUDA_FUZZ_EXAMPLES sets the examples per
# test (default 8).
# ----------------------------------------------------------------------------------------
FUZZ_EXAMPLES = int(os.environ.get("VOS_CUDA_FUZZ_EXAMPLES", 8))
FUZZ_WORK = 3e7 if DEV.type == "cuda" else 4e6
HALF = (torch.float16, torch.bfloat16)
CHANNELS = st.one_of(st.integers(1, 40), st.sampled_from([31, 32, 33, 63, 64, 65, 100, 127, 128, 129, 222, 224, 260]))


def fuzz(test):
    """A hypothesis test over ``data``, seeded from VOS_TEST_SEED, FUZZ_EXAMPLES examples."""
    if FUZZ_EXAMPLES < 1:
        return pytest.mark.skip(reason="VOS_CUDA_FUZZ_EXAMPLES=0")(test)
    test = given(data=st.data())(test)
    test = settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, print_blob=False,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large])(test)
    return hypothesis.seed(SESSION_SEED)(test)


def draw_dtype(data, backend, triton_f64=False):
    """float32 / float64, and the half types where the CUDA C++ kernels run (through the
    registered op: the public API on CPU tensors takes float32 / float64 only)."""
    if cuda_cpp(backend):
        choices = [torch.float32, torch.float32, torch.float64, torch.float16, torch.bfloat16]
    elif backend == "triton":
        choices = [torch.float32, torch.float64] if triton_f64 else [torch.float32]
    else:
        choices = [torch.float32, torch.float64]
    return data.draw(st.sampled_from(choices), label="dtype")


@contextlib.contextmanager
def float32_matmul_precision(data, dtype):
    """Draws "highest" (3xTF32 on the tensor cores) or "high" (one TF32 product) for
    float32 inputs and sets it for the block."""
    old = torch.get_float32_matmul_precision()
    prec = data.draw(st.sampled_from(["highest", "high"]), label="precision") if dtype == torch.float32 else old
    torch.set_float32_matmul_precision(prec)
    try:
        yield prec
    finally:
        torch.set_float32_matmul_precision(old)


def draw_gen(data):
    return torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="tensor seed"))


def fit_budget(dims, cost):
    """Halves the largest of ``dims`` (a dict of sizes) until ``cost(dims)`` fits the work
    budget FUZZ_WORK; deterministic in the draws, so hypothesis still shrinks and replays."""
    while cost(dims) > FUZZ_WORK and max(dims.values()) > 1:
        name = max(dims, key=dims.get)
        dims[name] = (dims[name] + 1) // 2
    return dims


def draw_labels(data, g, L, shape):
    """Labels in [-1, L): mixed with ignored pixels, dense, a single label present (the
    others empty), mostly ignored, or all ignored."""
    mode = data.draw(st.sampled_from(["mixed", "mixed", "dense", "single", "sparse", "none"]), label="labels")
    if mode == "none":
        return torch.full(shape, -1, dtype=torch.int64).to(DEV)
    if mode == "single":
        return torch.full(shape, int(torch.randint(0, L, (1,), generator=g)), dtype=torch.int64).to(DEV)
    lab = torch.randint(0 if mode == "dense" else -1, L, shape, generator=g)
    if mode == "sparse":
        lab = torch.where(torch.rand(shape, generator=g) < 0.9, torch.full_like(lab, -1), lab)
    dt = data.draw(st.sampled_from([torch.int64, torch.int32]), label="label dtype")
    return lab.to(dt).to(DEV)


def plant_nan(data, g, *tensors):
    """Puts a NaN at a random element of one of ``tensors`` (or of none)."""
    which = data.draw(st.sampled_from([None, None, None] + list(range(len(tensors)))), label="NaN in input")
    if which is not None:
        t = tensors[which]
        t.view(-1)[int(torch.randint(0, t.numel(), (1,), generator=g))] = float("nan")
    return which is not None


def half_tol(dtype, tol32):
    return {torch.float64: 1e-9, torch.float16: 1e-4, torch.bfloat16: 1e-4}.get(dtype, tol32)


@fuzz
def test_random_global(backend, data):
    g = draw_gen(data)
    dtype = draw_dtype(data, backend)
    C = data.draw(CHANNELS, label="C")
    d = {k: data.draw(st.integers(1, hi), label=k) for k, hi in (("B", 2), ("H", 24), ("W", 24), ("T", 2),
                                                                  ("Hr", 24), ("Wr", 24))}
    L, rate = data.draw(st.integers(1, 9), label="L"), data.draw(st.integers(1, 4), label="rate")
    d = fit_budget(d, lambda d: d["B"] * d["H"] * d["W"] * d["T"] * d["Hr"] * d["Wr"] * C)
    B, H, W, T, Hr, Wr = d.values()
    q = randn(g, B, H, W, C, dtype=dtype)
    r = randn(g, B, T, Hr, Wr, C, dtype=dtype)
    lab = draw_labels(data, g, L, (B, T, Hr, Wr))
    nan = plant_nan(data, g, q, r)
    fb = data.draw(st.booleans(), label="fb (bias)")
    half = dtype in HALF
    ops = torch.ops.vos_kernels
    with float32_matmul_precision(data, dtype):
        tol = rel_tol(dtype)
        if not fb:
            sq, ix = (ops.labelled_nearest_sqdist if half else vk.labelled_nearest_sqdist)(q, r, lab, L, rate)
            check_nearest(q, r, lab, L, rate, sq, ix, tol, exact_index=dtype == torch.float64)
            return
        out_dt = torch.float64 if dtype == torch.float64 else torch.float32
        bias = (torch.rand(L, generator=g, dtype=torch.float64) - 0.5).to(out_dt).to(DEV)
        fg, bg = ops.fb_global_matching(q, r, lab, L, bias, rate)[:2] if half else \
            vk.fb_global_matching(q, r, lab, L, bias, rate)
        wfg, wbg = R.fb_global_matching(*cpu64(q, r), lab.cpu(), L, bias.cpu().double(), rate)
        scale = norm_scale(q, r)
        assert_close_rel(fg, wfg, 1.0, tol * scale, "fg")       # tanh' <= 1/2
        assert_close_rel(bg, wbg, 1.0, tol * scale, "bg")
    if dtype == torch.float64 and not nan and data.draw(st.booleans(), label="backward"):
        assert_grads_match(lambda a, b, c: vk.fb_global_matching(a, b, lab, L, c, rate),
                           lambda a, b, c: R.fb_global_matching(a, b, lab.cpu(), L, c, rate),
                           (q, r, bias), ("query", "reference", "bias"), "global")


@fuzz
def test_random_local(backend, data):
    g = draw_gen(data)
    dtype = draw_dtype(data, backend)
    C = data.draw(CHANNELS, label="C")
    windows = sorted(set(data.draw(st.lists(st.integers(1, 14), min_size=1, max_size=6), label="windows")))
    rate = data.draw(st.integers(1, 3), label="rate")
    L = data.draw(st.integers(1, 6), label="L")
    d = {k: data.draw(st.integers(1, hi), label=k) for k, hi in (("B", 2), ("H", 26), ("W", 26))}
    offsets = (2 * (max(windows) // rate) + 1) ** 2
    d = fit_budget(d, lambda d: d["B"] * d["H"] * d["W"] * min(offsets, d["H"] * d["W"]) * C)
    B, H, W = d.values()
    q = randn(g, B, H, W, C, dtype=dtype)
    p = randn(g, B, H, W, C, dtype=dtype)
    lab = draw_labels(data, g, L, (B, H, W))
    nan = plant_nan(data, g, q, p)
    out_dt = torch.float64 if dtype == torch.float64 else torch.float32
    bias = (torch.rand(L, generator=g, dtype=torch.float64) - 0.5).to(out_dt).to(DEV)
    fn = (lambda *a: torch.ops.vos_kernels.fb_multi_local_matching(*a)[:2]) if dtype in HALF else \
        vk.fb_multi_local_matching
    fg, bg = fn(q, p, lab, L, windows, bias, rate)
    wfg, wbg = R.fb_multi_local_matching(*cpu64(q, p), lab.cpu(), L, windows, bias.cpu().double(), rate)
    tol = half_tol(dtype, 1e-5) * (1.0 if dtype == torch.float64 else norm_scale(q, p))   # FFMA: fp32-accurate
    assert_close_rel(fg, wfg, 1.0, tol, "fg")
    assert_close_rel(bg, wbg, 1.0, tol, "bg")
    if dtype == torch.float64 and not nan and data.draw(st.booleans(), label="backward"):
        assert_grads_match(lambda a, b, c: vk.fb_multi_local_matching(a, b, lab, L, windows, c, rate),
                           lambda a, b, c: R.fb_multi_local_matching(a, b, lab.cpu(), L, windows, c, rate),
                           (q, p, bias), ("query", "previous", "bias"), "local")


@fuzz
def test_random_instance_pooling(backend, data):
    g = draw_gen(data)
    dtype = draw_dtype(data, backend)
    C = data.draw(CHANNELS, label="C")
    B, H, W = (data.draw(st.integers(1, hi), label=k) for k, hi in (("B", 3), ("H", 30), ("W", 30)))
    L = data.draw(st.integers(1, 8), label="L")
    e = randn(g, B, H, W, C, dtype=dtype)
    lab = draw_labels(data, g, L, (B, H, W))
    out = (torch.ops.vos_kernels.fb_instance_pooling if dtype in HALF else vk.fb_instance_pooling)(e, lab, L)
    want = R.fb_instance_pooling(*cpu64(e), lab.cpu(), L)
    # per element: the rounding of its sum over its count + 1e-5 (1e-5 for an empty side);
    # the reference takes the background sum as all minus foreground, so its rounding is
    # that of the sum over every labelled pixel
    (e64,), lab64 = cpu64(e), lab.cpu().long()
    onehot = torch.nn.functional.one_hot(lab64.clamp(min=0), L).double() * (lab64 >= 0).unsqueeze(-1)
    n_fg = onehot.sum((1, 2))                                                              # [B, L]
    n_bg = (lab64 >= 0).sum((1, 2)).unsqueeze(1) - n_fg
    abs_fg = torch.einsum("bhwl,bhwc->blc", onehot, e64.abs())                             # [B, L, C]
    abs_all = abs_fg.sum(1, keepdim=True).expand_as(abs_fg)
    scale = torch.stack([abs_fg / (n_fg.unsqueeze(-1) + 1e-5), abs_all / (n_bg.unsqueeze(-1) + 1e-5)], dim=2)
    scale = torch.maximum(scale, torch.ones(1))
    assert_close_rel(out, want, scale, half_tol(dtype, 1e-5), "pooled means")


@fuzz
def test_random_topk_read(backend, data):
    g = draw_gen(data)
    dtype = draw_dtype(data, backend)
    CK = data.draw(CHANNELS, label="CK")
    CV = data.draw(st.integers(1, 200), label="CV")
    k = data.draw(st.one_of(st.integers(1, 40), st.sampled_from([31, 32, 33, 63, 64, 65]), st.integers(66, 140)),
                  label="k")
    d = {"B": data.draw(st.integers(1, 2), label="B"), "Nq": data.draw(st.integers(1, 300), label="Nq"),
         "Nm": data.draw(st.integers(1, 1100), label="Nm")}
    d = fit_budget(d, lambda d: d["B"] * d["Nq"] * d["Nm"] * (CK + min(k, d["Nm"])))
    B, Nq, Nm = d.values()
    mode = data.draw(st.sampled_from([None, "hits", "weights"]), label="usage_mode")
    qk, mk, mv = randn(g, B, Nq, CK, dtype=dtype), randn(g, B, Nm, CK, dtype=dtype), randn(g, B, Nm, CV, dtype=dtype)
    nan = plant_nan(data, g, mk)
    usage = torch.rand(B, Nm, generator=g).to(DEV) if mode else None
    u0 = usage.clone() if mode else None
    scale = CK ** -0.5
    with float32_matmul_precision(data, dtype) as prec:
        if dtype in HALF:
            out, index, weight = torch.ops.vos_kernels.topk_memory_read(qk, mk, mv, k, scale, usage,
                                                                       USAGE_MODES[mode] if mode else 0)
        else:
            out, (index, weight) = vk.topk_memory_read(qk, mk, mv, k, usage=usage, usage_mode=mode or "hits",
                                                       return_topk=True)
    kk = min(k, Nm)
    assert index.shape == (B, Nq, kk) and weight.shape == (B, Nq, kk)
    q64, m64, v64 = cpu64(qk, mk, mv)
    idx, w = index.cpu(), weight.cpu().double()
    assert ((idx >= 0) & (idx < Nm)).all(), "index out of [0, Nm)"
    assert (idx.sort(-1).values.diff(dim=-1) > 0).all(), "an entry selected twice by one query"
    s = torch.nan_to_num(oracle.affinity(q64, m64, scale), nan=float("inf"))   # NaN ranks above every number
    # the selection: no entry left out ranks above one taken, beyond the affinities' error
    bound = (2 * q64.norm(dim=-1).amax() * m64.norm(dim=-1).nan_to_num().amax()
             + (m64 * m64).sum(-1).nan_to_num().amax()) * scale
    eps = float(bound) * (1e-12 if dtype == torch.float64 else 5e-3 if prec == "high" else 1e-5)
    taken = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, idx, True)
    low = torch.where(taken, s, torch.full_like(s, float("inf"))).amin(-1)
    high = torch.where(taken, torch.full_like(s, -float("inf")), s).amax(-1)
    assert (low >= high - eps).all(), "an entry left out ranks above one selected"
    want, (windex, _) = R.topk_memory_read(q64, m64, v64, k, usage=None, return_topk=True)
    if nan:
        assert torch.equal(torch.isnan(out.cpu()), torch.isnan(want)), "NaN pattern of the readout"
        return
    # the weights are the softmax of the selected entries' affinities, the readout their sum
    # (softmax moves by at most 2 max|Δs| in l1: the weights' and the readout's tolerances)
    s_sel = torch.gather(s, -1, idx)
    assert_close_rel(w, torch.softmax(s_sel, -1), 1.0, 2 * eps + 1e-6, "weights")
    v_sel = torch.gather(v64.unsqueeze(1).expand(B, Nq, Nm, CV), 2, idx.unsqueeze(-1).expand(B, Nq, kk, CV))
    vmax = float(v64.abs().max())
    assert_close_rel(out, (w.unsqueeze(-1) * v_sel).sum(2), vmax, 1e-5, "readout (from the returned top-k)")
    # where the k-th and (k+1)-th affinities are apart, the set is the oracle's
    top = s.topk(min(kk + 1, Nm), dim=-1).values
    clear = (top[..., kk - 1] - top[..., kk]).abs() > 2 * eps if Nm > kk else torch.ones(B, Nq, dtype=torch.bool)
    assert torch.equal(idx[clear].sort(-1).values, windex[clear].sort(-1).values), "top-k sets"
    assert_close_rel(out.cpu()[clear], want[clear], vmax, 2 * eps + 1e-5, "readout")
    if mode:
        added = oracle.usage_of(idx, w, Nm, hits=mode == "hits")
        assert_close_rel(usage, u0.cpu().double() + added, 1.0 + float(added.max()), 1e-5, "usage")


@fuzz
def test_random_gmm_em(backend, data):
    g = draw_gen(data)
    dtype = draw_dtype(data, backend, triton_f64=True)
    C = data.draw(CHANNELS, label="C")
    K = data.draw(st.one_of(st.integers(1, 12), st.sampled_from([15, 16, 17, 31, 32, 33, 63, 64, 65, 100])), label="K")
    iters = data.draw(st.integers(1, 4), label="iters")
    d = {"B": data.draw(st.integers(1, 3), label="B"), "N": data.draw(st.integers(1, 700), label="N")}
    d = fit_budget(d, lambda d: 2 * d["B"] * d["N"] * C * K * iters)
    B, N = d.values()
    kernel = data.draw(st.sampled_from(["dot", "l2"]), label="kernel")
    kappa = data.draw(st.floats(1.0, 25.0), label="kappa")
    x = randn(g, B, N, C, dtype=dtype, scale=C ** -0.5)
    mu = torch.nn.functional.normalize(randn(g, B, K, C, dtype=torch.float64), dim=-1).to(dtype)
    mask_mode = data.draw(st.sampled_from([None, "float", "bool", "empty row"]), label="mask")
    mask = None
    if mask_mode:
        mask = torch.rand(B, N, generator=g) > 0.3
        if mask_mode == "empty row":
            mask[-1] = False
        mask = (mask if mask_mode == "bool" else mask.to(dtype if dtype not in HALF else torch.float32)).to(DEV)
    with float32_matmul_precision(data, dtype) as prec:
        if dtype in HALF:
            means, resp = torch.ops.vos_kernels.gmm_em(x, mu, iters, kappa, mask, GMM_KERNELS[kernel], True)
        else:
            means, resp = vk.gmm_em(x, mu, iters, kappa, mask, kernel)
    if mask_mode == "empty row":
        assert torch.equal(means[-1].cpu().double(), torch.zeros(K, C, dtype=torch.float64)), "empty mask: zero means"
    m64 = None if mask is None else mask.cpu().double()
    if dtype == torch.float64:
        wm, wr = R.gmm_em(*cpu64(x, mu), iters, kappa, m64, kernel)
        assert_close_rel(means, wm, 1.0, 1e-9, "gmm_em means")
        assert_close_rel(resp, wr, 1.0, 1e-9, "gmm_em resp")
        return
    # float32 products: FFMA (2^-24), 3xTF32 ("highest", ~22 bits) or, under "high", one
    # TF32 product (10-bit mantissas: 2^-11), whose rounding EM amplifies by up to kappa per
    # iteration, so that comparison is looser (cap 0.05) and still catches a wrong tile
    tensor_cores = cuda_cpp(backend) and K >= 8 and C >= 32 and N >= 64
    tf32 = tensor_cores and prec == "high"
    unit = 2.0 ** -11 if tf32 else 2.0 ** -22 if tensor_cores or dtype in HALF else 2.0 ** -24
    oracle.assert_within_rounding((means, resp), lambda a, b: R.gmm_em(a, b, iters, kappa, m64, kernel),
                                  tuple(t.float() for t in (x, mu)), C, what=f"gmm_em {kernel} ({prec})",
                                  unit=unit, cap=0.05 if tf32 else 1e-3)


@fuzz
def test_random_prototype_ops(backend, data):
    g = draw_gen(data)
    dtype = draw_dtype(data, backend, triton_f64=True)
    C = data.draw(CHANNELS, label="C")
    CV = data.draw(st.integers(1, 200), label="CV")
    K = data.draw(st.integers(1, 70), label="K")
    d = {"B": data.draw(st.integers(1, 3), label="B"), "N": data.draw(st.integers(1, 3500), label="N")}
    d = fit_budget(d, lambda d: d["B"] * d["N"] * K * (C + CV))
    B, N = d.values()
    kernel = data.draw(st.sampled_from(["dot", "l2"]), label="kernel")
    kappa = data.draw(st.floats(0.5, 20.0), label="kappa")
    q = randn(g, B, N, C, dtype=dtype, scale=C ** -0.5)
    keys = torch.nn.functional.normalize(randn(g, B, K, C, dtype=torch.float64), dim=-1).to(dtype)
    vals = randn(g, B, K, CV, dtype=dtype)
    tol = half_tol(dtype, 1e-5)
    if dtype in HALF:
        out = torch.ops.vos_kernels.prototype_attention(q, keys, vals, kappa, GMM_KERNELS[kernel])[0]
    else:
        out = vk.prototype_attention(q, keys, vals, kappa, kernel)
    assert_close_rel(out, R.prototype_attention(*cpu64(q, keys, vals), kappa, kernel), 1.0, tol,
                     f"prototype_attention {kernel}")
    v = randn(g, B, N, CV, dtype=dtype)
    resp = torch.softmax(randn(g, B, N, K, dtype=torch.float64), -1)
    if K > 1:
        resp[..., int(torch.randint(0, K, (1,), generator=g))] = 0     # a prototype no point belongs to
    resp = resp.to(dtype).to(DEV)
    out = (torch.ops.vos_kernels.prototype_values if dtype in HALF else vk.prototype_values)(v, resp)
    assert_close_rel(out, R.prototype_values(*cpu64(v, resp)), 1.0, tol, "prototype_values")
