"""Triton kernels of the GMM prototype ops and A-GAME Gaussians (vos_kernels/triton/gmm.py)
against the naive PyTorch reference (vos_kernels.reference) in float64, against
torch.autograd of the reference for the backward ops, and through the public API with
``set_backend("triton")`` (gradcheck). Without CUDA the kernels run under the Triton
interpreter (TRITON_INTERPRET=1, set by conftest.py) on CPU tensors, so shapes are small;
the splits keyword forces the partial-sums path (several programs per row + split sums)
that the GPU takes for large N."""
import pytest
import torch
import torch.nn.functional as F

import oracle
import vos_kernels as vk
from vos_kernels import reference as R

pytestmark = pytest.mark.skipif("triton" not in vk.available_backends(), reason="triton backend unavailable")

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
F64 = torch.float64
KERNELS = ("dot", "l2")


def T():
    from vos_kernels import triton as T
    return T


def randn(gen, *shape, dtype=F64):
    return torch.randn(*shape, generator=gen, dtype=F64).to(dtype).to(DEV)


def rand(gen, *shape, dtype=F64):
    return torch.rand(*shape, generator=gen, dtype=F64).to(dtype).to(DEV)


def unit_means(gen, B, K, C, dtype=F64):
    return F.normalize(randn(gen, B, K, C), dim=-1).to(dtype)


def em_both(x, mu, iters, kappa, mask, kernel, normalize, splits=None):
    got = T().gmm_em(x, mu, iters, kappa, mask, KERNELS.index(kernel), normalize, splits=splits)
    ref = R.gmm_em(x.cpu().double(), mu.cpu().double(), iters, kappa,
                   None if mask is None else mask.cpu().double(), kernel, normalize)
    return [g.cpu() for g in got], ref


def close64(a, b, atol=1e-11, rtol=1e-9):
    torch.testing.assert_close(a.cpu().double(), b.cpu().double(), atol=atol, rtol=rtol, equal_nan=True)


@pytest.fixture
def triton_backend():
    vk.set_backend("triton")
    yield
    vk.set_backend("auto")


@pytest.fixture
def calls(monkeypatch):
    """Counts the calls of each Triton entry point (the public functions reach them through
    the lazy ``vos_kernels.triton`` attribute lookup)."""
    from vos_kernels.triton import gmm as tg

    counts = {}

    def spy(name):
        fn = getattr(tg, name)

        def wrapper(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            return fn(*args, **kwargs)
        return wrapper

    for name in tg.__all__:
        monkeypatch.setattr(tg, name, spy(name))
    return counts


# ----------------------------------------------------------------------------- gmm_em


@pytest.mark.parametrize("splits", [None, 3], ids=["one-launch", "split"])
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_gmm_em_float64(gen, kernel, normalize, splits):
    B, N, C, K = 2, 37, 40, 5                 # 3 tiles of 16, 2 C blocks, K padded to 16
    x, mu = randn(gen, B, N, C), unit_means(gen, B, K, C)
    mask = (rand(gen, B, N) > 0.3).double()
    (m, r), (m0, r0) = em_both(x, mu, 3, 2.5, mask, kernel, normalize, splits)
    assert m.dtype == F64 and r.dtype == F64 and m.shape == (B, K, C) and r.shape == (B, N, K)
    close64(m, m0)
    close64(r, r0)


@pytest.mark.parametrize("splits", [None, 2])
def test_gmm_em_zero_mask_row_gives_zero_means(gen, splits):
    B, N, C, K = 3, 20, 16, 4
    x, mu = randn(gen, B, N, C), unit_means(gen, B, K, C)
    mask = rand(gen, B, N)
    mask[1] = 0
    (m, r), (m0, r0) = em_both(x, mu, 2, 20.0, mask, "dot", True, splits)
    assert not torch.isnan(m).any() and not torch.isnan(r).any()
    assert torch.equal(m[1], torch.zeros_like(m[1])) and torch.equal(r[1], torch.zeros_like(r[1]))
    close64(m, m0)
    close64(r, r0)


@pytest.mark.parametrize("kernel", KERNELS)
def test_gmm_em_single_component(gen, kernel):
    B, N, C = 2, 21, 8
    x, mu = randn(gen, B, N, C), unit_means(gen, B, 1, C)
    mask = rand(gen, B, N)
    (m, r), (m0, r0) = em_both(x, mu, 2, 20.0, mask, kernel, True)
    close64(r, mask.cpu().unsqueeze(-1))                    # softmax over one component = 1
    close64(m, m0)
    close64(r, r0)


def test_gmm_em_fewer_points_than_components(gen):
    B, N, C, K = 2, 3, 24, 7
    x, mu = randn(gen, B, N, C), unit_means(gen, B, K, C)
    for normalize in (True, False):
        (m, r), (m0, r0) = em_both(x, mu, 3, 1.0, None, "l2", normalize)
        close64(m, m0)
        close64(r, r0)


@pytest.mark.parametrize("splits", [None, 4])
def test_gmm_em_near_hard_kappa(gen, splits):
    B, N, C, K = 1, 50, 32, 6
    x, mu = F.normalize(randn(gen, B, N, C), dim=-1), unit_means(gen, B, K, C)
    (m, r), (m0, r0) = em_both(x, mu, 4, 200.0, None, "dot", True, splits)
    close64(m, m0, atol=1e-9, rtol=1e-7)        # kappa = 200 amplifies rounding of the logits
    close64(r, r0, atol=1e-9, rtol=1e-7)


def test_gmm_em_non_contiguous(gen):
    B, N, C, K = 2, 19, 20, 3
    x = randn(gen, B, C, N).transpose(1, 2)                       # [B, N, C], strides (C·N, 1, N)
    mu = unit_means(gen, B, C, K).transpose(1, 2)                  # [B, K, C] (values irrelevant)
    mask = rand(gen, B, 2 * N)[:, ::2]
    assert not x.is_contiguous() and not mu.is_contiguous() and not mask.is_contiguous()
    (m, r), (m0, r0) = em_both(x, mu, 2, 3.0, mask, "dot", True)
    close64(m, m0)
    close64(r, r0)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
@pytest.mark.parametrize("splits", [None, 2])
def test_gmm_em_nan_propagates(gen, splits):
    B, N, C, K = 2, 40, 16, 3
    x, mu = randn(gen, B, N, C), unit_means(gen, B, K, C)
    x[0, 5, 3] = float("nan")
    (m, r), (m0, r0) = em_both(x, mu, 2, 5.0, None, "dot", True, splits)
    assert torch.isnan(m[0]).all() and torch.isnan(m0[0]).all()
    assert not torch.isnan(m[1]).any()
    close64(m, m0)                              # NaN where the reference has NaN
    close64(r, r0)


def test_gmm_em_float32_and_determinism(gen):
    B, N, C, K = 2, 45, 48, 9
    x, mu = randn(gen, B, N, C, dtype=torch.float32), unit_means(gen, B, K, C, dtype=torch.float32)
    mask = rand(gen, B, N, dtype=torch.float32)
    for splits in (None, 3):
        m, r = [t.cpu() for t in T().gmm_em(x, mu, 3, 5.0, mask, 0, True, splits=splits)]
        assert m.dtype == torch.float32 and r.dtype == torch.float32
        # tolerance from the float64 reference's sensitivity to float32 rounding
        oracle.assert_within_rounding((m, r), lambda a, b, w: R.gmm_em(a, b, 3, 5.0, w, "dot", True),
                                      (x, mu, mask), C, what=f"gmm_em splits={splits}")
        again = T().gmm_em(x, mu, 3, 5.0, mask, 0, True, splits=splits)
        assert torch.equal(again[0].cpu(), m) and torch.equal(again[1].cpu(), r)      # bitwise reruns


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors of these dtypes: interpreter only")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_under_interpreter(gen, dtype):
    """fp16 / bf16 inputs are read as such and computed in fp32 (outputs fp32)."""
    B, N, C, K = 1, 20, 16, 3
    x, mu = randn(gen, B, N, C, dtype=dtype), unit_means(gen, B, K, C, dtype=dtype)
    m, r = T().gmm_em(x, mu, 2, 4.0, None, 0, True)
    m1, _ = T().gmm_em(x.float(), mu.float(), 2, 4.0, None, 0, True)
    assert m.dtype == torch.float32 and r.dtype == torch.float32
    torch.testing.assert_close(m, m1, atol=1e-6, rtol=1e-5)
    mean, var = randn(gen, B, K, C, dtype=dtype), (rand(gen, B, K, C) + 0.5).to(dtype)
    lp = T().diag_gmm_log_prob(x, mean, var)
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp, T().diag_gmm_log_prob(x.float(), mean.float(), var.float()), atol=1e-4,
                               rtol=1e-5)


# ----------------------------------------------------------------- prototype ops


@pytest.mark.parametrize("splits", [None, 3])
def test_prototype_values(gen, splits):
    B, N, CV, K = 2, 50, 20, 5
    v, r = randn(gen, B, N, CV), rand(gen, B, N, K)
    r[1, :, 2] = 0                                           # empty component: 0, not NaN
    out = T().prototype_values(v, r, splits=splits)
    ref = R.prototype_values(v.cpu(), r.cpu())
    assert out.shape == (B, K, CV) and out.dtype == F64
    close64(out, ref)
    assert torch.equal(out[1, 2].cpu(), torch.zeros(CV, dtype=F64))
    v32 = randn(gen, B, 2 * N, CV, dtype=torch.float32)[:, ::2]          # non-contiguous, fp32
    r32 = rand(gen, B, N, K, dtype=torch.float32)
    torch.testing.assert_close(T().prototype_values(v32, r32, splits=splits).cpu().double(),
                               R.prototype_values(v32.cpu().double(), r32.cpu().double()), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", KERNELS)
def test_prototype_attention(gen, kernel):
    B, Nq, C, K, CV = 2, 21, 36, 5, 18
    q, k, v = randn(gen, B, Nq, C), randn(gen, B, K, C), randn(gen, B, K, CV)
    out, attn = T().prototype_attention(q, k, v, 1.7, KERNELS.index(kernel))
    close64(out, R.prototype_attention(q.cpu(), k.cpu(), v.cpu(), 1.7, kernel))
    close64(attn, torch.softmax(R._logits(q.cpu().transpose(1, 2), k.cpu().transpose(1, 2), 1.7, kernel), dim=2))
    # K = 1, fp32, non-contiguous query
    q32 = randn(gen, B, C, Nq, dtype=torch.float32).transpose(1, 2)
    k1, v1 = randn(gen, B, 1, C, dtype=torch.float32), randn(gen, B, 1, CV, dtype=torch.float32)
    out1, attn1 = T().prototype_attention(q32, k1, v1, 1.0, KERNELS.index(kernel))
    assert torch.equal(attn1.cpu(), torch.ones(B, Nq, 1))
    torch.testing.assert_close(out1.cpu(), v1.cpu().expand(B, Nq, CV))


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_prototype_attention_nan_row(gen):
    B, Nq, C, K, CV = 1, 10, 16, 3, 4
    q, k, v = randn(gen, B, Nq, C), randn(gen, B, K, C), randn(gen, B, K, CV)
    q[0, 4, 0] = float("nan")
    out, attn = T().prototype_attention(q, k, v, 1.0, 0)
    assert torch.isnan(out[0, 4]).all() and torch.isnan(attn[0, 4]).all()
    close64(out, R.prototype_attention(q.cpu(), k.cpu(), v.cpu(), 1.0, "dot"))


# ------------------------------------------------------------------ A-GAME Gaussians


def agame(gen, B, N, D, K, dtype=F64, offset=0.0):
    x = randn(gen, B, N, D) + offset
    mean = randn(gen, B, K, D) * 0.5 + offset
    var = rand(gen, B, K, D) + 0.3
    return x.to(dtype), mean.to(dtype), var.to(dtype)


def test_diag_gmm_log_prob(gen):
    B, N, D, K = 2, 45, 40, 4
    x, mean, var = agame(gen, B, N, D, K)
    close64(T().diag_gmm_log_prob(x, mean, var), R.diag_gmm_log_prob(x.cpu(), mean.cpu(), var.cpu()))
    x, mean, var = agame(gen, B, N, D, 3)                     # K not a power of 2, non-contiguous x
    xs = torch.cat([x, x], dim=2)[:, :, ::2]
    close64(T().diag_gmm_log_prob(xs, mean, var), R.diag_gmm_log_prob(xs.cpu(), mean.cpu(), var.cpu()))


def test_diag_gmm_log_prob_float32_on_differences(gen):
    """Points far from the origin (offset 1000): the differences keep fp32 accuracy where the
    x² − 2xμ + μ² expansion would lose every digit."""
    x, mean, var = agame(gen, 2, 30, 24, 4, offset=1000.0)
    got = T().diag_gmm_log_prob(x.float(), mean.float(), var.float()).cpu().double()
    ref = R.diag_gmm_log_prob(x.float().double().cpu(), mean.float().double().cpu(), var.float().double().cpu())
    torch.testing.assert_close(got, ref, atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("splits", [None, 3])
def test_diag_gmm_log_prob_backward(gen, splits):
    B, N, D, K = 2, 37, 20, 4
    x, mean, var = [t.requires_grad_() for t in agame(gen, B, N, D, K)]
    g = randn(gen, B, N, K)
    ref = torch.autograd.grad(R.diag_gmm_log_prob(x, mean, var), (x, mean, var), g)
    got = T().diag_gmm_log_prob_backward(g, x.detach(), mean.detach(), var.detach(), splits=splits)
    for a, b in zip(got, ref):
        assert a.dtype == F64 and a.shape == b.shape
        close64(a, b, atol=1e-10)


@pytest.mark.parametrize("splits", [None, 3])
def test_diag_gmm_fit(gen, splits):
    B, N, D, K = 2, 70, 36, 4
    x, _, _ = agame(gen, B, N, D, K)
    w = rand(gen, B, N, K)
    w[0, :, 3] = 0                                             # empty component: mean 0, var = var_reg
    reg = rand(gen, K, D) * 0.1
    mean, var = T().diag_gmm_fit(x, w, reg, splits=splits)
    m0, v0 = R.diag_gmm_fit(x.cpu(), w.cpu(), reg.cpu())
    close64(mean, m0)
    close64(var, v0)
    assert torch.equal(var[0, 3].cpu(), reg[3].cpu())


def test_diag_gmm_fit_float32_two_pass(gen):
    """Offset 1000, spread 1: one-pass E[x²] − E[x]² would cancel in fp32; two passes keep
    the variance to ~1e-5 relative."""
    x, _, _ = agame(gen, 1, 80, 16, 2, offset=1000.0)
    w = rand(gen, 1, 80, 2)
    reg = torch.full((2, 16), 0.01, dtype=F64, device=DEV)
    for splits in (None, 2):
        mean, var = T().diag_gmm_fit(x.float(), w.float(), reg.float(), splits=splits)
        m0, v0 = R.diag_gmm_fit(x.float().double().cpu(), w.float().double().cpu(), reg.float().double().cpu())
        torch.testing.assert_close(mean.cpu().double(), m0, atol=0, rtol=1e-6)
        torch.testing.assert_close(var.cpu().double(), v0, atol=0, rtol=2e-4)


@pytest.mark.parametrize("splits", [None, 3])
def test_diag_gmm_fit_backward(gen, splits):
    B, N, D, K = 2, 45, 20, 4
    x = randn(gen, B, N, D).requires_grad_()
    w = rand(gen, B, N, K).requires_grad_()
    reg = rand(gen, K, D) * 0.1
    mean, var = R.diag_gmm_fit(x, w, reg)
    gm, gv = randn(gen, B, K, D), randn(gen, B, K, D)
    ref = torch.autograd.grad((mean, var), (x, w), (gm, gv))
    got = T().diag_gmm_fit_backward(gm, gv, x.detach(), w.detach(), mean.detach(), splits=splits)
    for a, b in zip(got, ref):
        assert a.dtype == F64 and a.shape == b.shape
        close64(a, b, atol=1e-10)


# ------------------------------------------------------- public API, triton backend


def test_public_gmm_em_runs_the_triton_kernel(gen, triton_backend, calls):
    x, mu = randn(gen, 2, 30, 16), unit_means(gen, 2, 4, 16)
    mask = rand(gen, 2, 30) > 0.5                              # bool mask, converted by the wrapper
    m, r = vk.gmm_em(x, mu, 3, 20.0, mask=mask, kernel="l2")
    m0, r0 = R.gmm_em(x.cpu(), mu.cpu(), 3, 20.0, mask.cpu().double(), "l2", True)
    close64(m, m0)
    close64(r, r0)
    assert not m.requires_grad
    assert calls == {"gmm_em": 1}


@pytest.mark.parametrize("kernel", KERNELS)
def test_gradcheck_prototype_ops(gen, triton_backend, calls, kernel):
    v = randn(gen, 1, 5, 3).requires_grad_()
    r = (rand(gen, 1, 5, 2) + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(vk.prototype_values, (v, r), eps=1e-6, atol=1e-7)
    q = randn(gen, 1, 3, 4).requires_grad_()
    k = randn(gen, 1, 2, 4).requires_grad_()
    vv = randn(gen, 1, 2, 3).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, c: vk.prototype_attention(a, b, c, 1.3, kernel=kernel),
                                    (q, k, vv), eps=1e-6, atol=1e-7)
    assert calls["prototype_values"] > 0 and calls["prototype_attention"] > 0


def test_gradcheck_agame(gen, triton_backend, calls):
    x, mean, var = [t.requires_grad_() for t in agame(gen, 1, 3, 4, 2)]
    assert torch.autograd.gradcheck(vk.diag_gmm_log_prob, (x, mean, var), eps=1e-6, atol=1e-6)
    x = randn(gen, 1, 4, 3).requires_grad_()
    w = rand(gen, 1, 4, 2).requires_grad_()
    reg = (rand(gen, 2, 3) * 0.1 + 0.05).requires_grad_()
    assert torch.autograd.gradcheck(vk.diag_gmm_fit, (x, w, reg), eps=1e-6, atol=1e-7)
    assert all(calls.get(name, 0) > 0 for name in ("diag_gmm_log_prob", "diag_gmm_log_prob_backward",
                                                   "diag_gmm_fit", "diag_gmm_fit_backward"))


# ------------------------------------------------------------------- GPU only


def cosine(a, b):
    return F.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 kernels need CUDA")
def test_bf16_matches_fp32_by_cosine(gen):
    B, N, C, K = 4, 3000, 256, 30
    x32 = randn(gen, B, N, C, dtype=torch.float32)
    mu32 = unit_means(gen, B, K, C, dtype=torch.float32)
    x16, mu16 = x32.bfloat16(), mu32.bfloat16()
    for splits in (None, 1):
        m32, _ = T().gmm_em(x32, mu32, 3, 20.0, None, 0, True, splits=splits)
        m16, _ = T().gmm_em(x16, mu16, 3, 20.0, None, 0, True, splits=splits)
        assert m16.dtype == torch.float32
        assert cosine(m16, m32).min() > 0.99
    v = randn(gen, B, N, 64, dtype=torch.float32)
    r = torch.softmax(randn(gen, B, N, K, dtype=torch.float32) * 3, dim=-1)
    assert cosine(T().prototype_values(v.bfloat16(), r.bfloat16()), T().prototype_values(v, r)).min() > 0.999
    out32, _ = T().prototype_attention(x32, mu32, v[:, :K], 1.0, 0)
    out16, _ = T().prototype_attention(x16, mu16, v[:, :K].bfloat16(), 1.0, 0)
    assert cosine(out16, out32).min() > 0.99
    xa, mean, var = agame(gen, B, 1620, 512, 4, dtype=torch.float32)
    lp32 = T().diag_gmm_log_prob(xa, mean, var)
    lp16 = T().diag_gmm_log_prob(xa.bfloat16(), mean.bfloat16(), var.bfloat16())
    assert cosine(lp16, lp32).min() > 0.999
    w = rand(gen, B, 1620, 4, dtype=torch.float32)
    reg = torch.full((4, 512), 0.1, device=DEV)
    for a, b in zip(T().diag_gmm_fit(xa.bfloat16(), w.bfloat16(), reg), T().diag_gmm_fit(xa, w, reg)):
        assert cosine(a, b).min() > 0.999
