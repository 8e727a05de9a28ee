"""GMM prototype ops (gmm_em, prototype_values, prototype_attention) and A-GAME's diagonal
Gaussians (diag_gmm_log_prob, diag_gmm_fit) on the default backend (C++ on CPU): against
the float64 reference einsum chains / loops of vos_kernels.reference, edge cases (empty
mask, K = 1, N < K, near-hard kappa, NaN, non-contiguous inputs), cancellation-prone fits,
gradients, opcheck, torch.compile, determinism and bad input."""
import pytest
import torch

import oracle
import vos_kernels as vk
from vos_kernels import reference as R

F64 = torch.float64


def unit(t, dim=-1):
    return t / t.norm(dim=dim, keepdim=True)


def points(gen, *shape, dtype=torch.float32, scale=None):
    """Random points with about unit norm rows (PCAN features are O(1) after the FPN)."""
    x = torch.randn(*shape, generator=gen, dtype=F64)
    x = x / (shape[-1] ** 0.5 if scale is None else scale)
    return x.to(dtype)


def em_inputs(gen, B, N, C, K, dtype=torch.float32, mask=False, empty_rows=()):
    x = points(gen, B, N, C, dtype=dtype)
    mu = unit(torch.randn(B, K, C, generator=gen, dtype=F64)).to(dtype)
    m = None
    if mask:
        m = (torch.rand(B, N, generator=gen) > 0.4).to(dtype)
        for b in empty_rows:
            m[b] = 0
    return x, mu, m


EM_CASES = [  # B, N, C, K, iters, kappa, kernel, normalize, mask
    (2, 50, 8, 3, 3, 20.0, "dot", True, False),
    (1, 300, 16, 30, 3, 20.0, "dot", True, False),        # PCAN frame level, small
    (6, 196, 32, 10, 6, 20.0, "dot", True, True),         # PCAN instance head: many masked problems
    (2, 120, 24, 64, 3, 1.0, "dot", True, False),         # EMANet: K = 64, kappa 1
    (3, 80, 12, 5, 4, 20.0, "l2", True, True),
    (2, 90, 12, 4, 3, 3.0, "l2", False, False),           # the paper's GMM, unnormalised means
    (2, 60, 10, 6, 2, 5.0, "dot", False, True),
    (2, 40, 6, 1, 3, 20.0, "dot", True, True),            # K = 1
    (2, 5, 6, 9, 3, 20.0, "dot", True, False),            # N < K
    (2, 64, 16, 8, 5, 200.0, "dot", True, True),          # near-hard assignments
    (1, 1, 4, 3, 2, 20.0, "l2", True, False),             # one point
]


def _case_id(c):
    return "B{}N{}C{}K{}T{}k{}-{}-{}-{}".format(*c[:6], c[6], "norm" if c[7] else "raw", "mask" if c[8] else "nomask")


@pytest.mark.parametrize("case", EM_CASES, ids=_case_id)
def test_gmm_em_float64_equals_reference(gen, case):
    B, N, C, K, T, kappa, kernel, norm, use_mask = case
    x, mu, m = em_inputs(gen, B, N, C, K, dtype=F64, mask=use_mask)
    means, resp = vk.gmm_em(x, mu, T, kappa, mask=m, kernel=kernel, normalize_means=norm)
    r_means, r_resp = R.gmm_em(x, mu, T, kappa, mask=m, kernel=kernel, normalize_means=norm)
    assert means.shape == (B, K, C) and resp.shape == (B, N, K) and means.dtype == F64
    torch.testing.assert_close(means, r_means, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(resp, r_resp, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("case", EM_CASES, ids=_case_id)
def test_gmm_em_float32_against_float64(gen, case):
    B, N, C, K, T, kappa, kernel, norm, use_mask = case
    x, mu, m = em_inputs(gen, B, N, C, K, mask=use_mask)
    means, resp = vk.gmm_em(x, mu, T, kappa, mask=m, kernel=kernel, normalize_means=norm)
    assert means.dtype == torch.float32 and resp.dtype == torch.float32
    # tolerance from the float64 reference's sensitivity to float32 rounding, per element
    # (kappa 200 amplifies it by ~10 over kappa 20 near the decision boundaries)
    oracle.assert_within_rounding(
        (means, resp), lambda a, b, w: R.gmm_em(a, b, T, kappa, mask=w, kernel=kernel, normalize_means=norm),
        (x, mu, m), C, what="gmm_em")


def test_gmm_em_empty_mask_gives_zero_means(gen):
    x, mu, m = em_inputs(gen, 4, 100, 16, 5, mask=True, empty_rows=(1, 3))
    for norm in (True, False):
        means, resp = vk.gmm_em(x, mu, 3, 20.0, mask=m, normalize_means=norm)
        assert torch.isfinite(means).all() and torch.isfinite(resp).all()
        assert torch.equal(means[1], torch.zeros_like(means[1])) and torch.equal(means[3], torch.zeros_like(means[3]))
        assert torch.equal(resp[1], torch.zeros_like(resp[1]))
        assert (means[0].norm(dim=-1) > (0.99 if norm else 0.05)).all()
    # bool masks are weights 0 / 1
    a = vk.gmm_em(x, mu, 3, 20.0, mask=m.bool())
    b = vk.gmm_em(x, mu, 3, 20.0, mask=m)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_gmm_em_dot_and_l2_agree_on_unit_means(gen):
    """gmm.md: with unit-norm means the dot and L2 kernels give the same softmax."""
    x, mu, m = em_inputs(gen, 3, 150, 16, 7, dtype=F64, mask=True)
    a = vk.gmm_em(x, mu, 4, 20.0, mask=m, kernel="dot")
    b = vk.gmm_em(x, mu, 4, 20.0, mask=m, kernel="l2")
    # not exact: means have norm ‖A‖/(1e-6 + ‖A‖), so kappa/2·‖μ_k‖² differs by ~1e-5 across k
    torch.testing.assert_close(a[0], b[0], atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(a[1], b[1], atol=1e-4, rtol=1e-3)


def test_gmm_em_resp_is_the_last_masked_softmax(gen):
    """resp = softmax of the last E-step (the means before the last M-step), times the mask."""
    x, mu, m = em_inputs(gen, 2, 70, 8, 4, dtype=F64, mask=True)
    before, _ = vk.gmm_em(x, mu, 2, 20.0, mask=m)
    _, resp = vk.gmm_em(x, mu, 3, 20.0, mask=m)
    expect = torch.softmax(20.0 * x @ before.transpose(1, 2), dim=-1) * m.unsqueeze(-1)
    torch.testing.assert_close(resp, expect, atol=1e-12, rtol=1e-10)


def test_gmm_em_non_contiguous(gen):
    x, mu, m = em_inputs(gen, 3, 90, 12, 5, mask=True)
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)          # [B, N, C] with odd strides
    mut = mu.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    mt = m.t().contiguous().t()
    assert not xt.is_contiguous() and not mut.is_contiguous() and not mt.is_contiguous()
    a = vk.gmm_em(xt, mut, 3, 20.0, mask=mt)
    b = vk.gmm_em(x, mu, 3, 20.0, mask=m)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_gmm_em_nan_propagates_within_its_problem(gen):
    x, mu, _ = em_inputs(gen, 3, 60, 8, 4)
    x[1, 17, 3] = float("nan")
    means, resp = vk.gmm_em(x, mu, 2, 20.0)
    assert torch.isnan(means[1]).all() and torch.isnan(resp[1, 17]).all()
    assert torch.isfinite(means[0]).all() and torch.isfinite(means[2]).all()


def test_gmm_em_deterministic_and_thread_count_independent(gen):
    x, mu, m = em_inputs(gen, 2, 5000, 64, 30, mask=True)
    first = vk.gmm_em(x, mu, 3, 20.0, mask=m)
    again = vk.gmm_em(x, mu, 3, 20.0, mask=m)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = vk.gmm_em(x, mu, 3, 20.0, mask=m)
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, again, single):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_gmm_em_no_grad(gen):
    x, mu, _ = em_inputs(gen, 1, 30, 8, 3)
    x.requires_grad_(True)
    means, resp = vk.gmm_em(x, mu, 2, 20.0)
    assert not means.requires_grad and not resp.requires_grad
    # the op itself, called with inputs that require grad, refuses a backward pass loudly
    means, _ = torch.ops.vos_kernels.gmm_em(x, mu, 2, 20.0, None, 0, True)
    with pytest.raises(RuntimeError, match="no gradient"):
        means.sum().backward()


# --------------------------------------------------------------- prototype values and read
def soft_resp(gen, B, N, K, dtype=F64):
    r = torch.softmax(3 * torch.randn(B, N, K, generator=gen, dtype=F64), -1)
    r = r * (torch.rand(B, N, 1, generator=gen, dtype=F64) > 0.3)
    return r.to(dtype)


@pytest.mark.parametrize("shape", [(2, 50, 8, 3), (1, 196, 40, 10), (3, 7, 5, 12), (2, 30, 4, 1)],
                         ids=lambda s: "B{}N{}CV{}K{}".format(*s))
def test_prototype_values_against_reference(gen, shape):
    B, N, CV, K = shape
    v = points(gen, B, N, CV, dtype=F64)
    r = soft_resp(gen, B, N, K)
    r[0, :, 0] = 0                                   # a prototype with no responsibility: zero
    out = vk.prototype_values(v, r)
    torch.testing.assert_close(out, R.prototype_values(v, r), atol=1e-12, rtol=1e-10)
    assert torch.equal(out[0, 0], torch.zeros_like(out[0, 0]))
    out32 = vk.prototype_values(v.float(), r.float())
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), R.prototype_values(v, r), atol=2e-6, rtol=1e-4)


@pytest.mark.parametrize("kernel", ["dot", "l2"])
@pytest.mark.parametrize("shape", [(2, 60, 8, 5, 6), (1, 300, 32, 30, 32), (2, 9, 4, 1, 3), (2, 5, 6, 20, 7)],
                         ids=lambda s: "B{}Nq{}C{}K{}CV{}".format(*s))
def test_prototype_attention_against_reference(gen, shape, kernel):
    B, Nq, C, K, CV = shape
    q = points(gen, B, Nq, C, dtype=F64, scale=1.0)            # |q| ~ sqrt(C): a peaked softmax
    keys = unit(torch.randn(B, K, C, generator=gen, dtype=F64))
    vals = torch.randn(B, K, CV, generator=gen, dtype=F64)
    for kappa in (1.0, 20.0):
        out = vk.prototype_attention(q, keys, vals, kappa, kernel=kernel)
        ref = R.prototype_attention(q, keys, vals, kappa, kernel=kernel)
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-9)
        out32 = vk.prototype_attention(q.float(), keys.float(), vals.float(), kappa, kernel=kernel)
        torch.testing.assert_close(out32.double(), ref, atol=5e-4, rtol=1e-3)


def test_prototype_attention_large_logits_do_not_overflow(gen):
    q = 100 * unit(torch.randn(1, 20, 8, generator=gen))
    keys = unit(torch.randn(1, 6, 8, generator=gen))
    vals = torch.randn(1, 6, 3, generator=gen)
    out = vk.prototype_attention(q, keys, vals, 50.0)              # logits up to 5000: exp overflows
    assert torch.isfinite(out).all()                               # without the max subtracted
    ref = R.prototype_attention(q.double(), keys.double(), vals.double(), 50.0)
    # float32 logits of size 5000 carry ~3e-4 rounding, which the softmax passes on
    torch.testing.assert_close(out.double(), ref, atol=2e-3, rtol=2e-3)


# ------------------------------------------------------------------------- A-GAME
def agame_inputs(gen, B, N, D, K, dtype=F64, offset=0.0):
    x = (torch.randn(B, N, D, generator=gen, dtype=F64) + offset).to(dtype)
    mean = (torch.randn(B, K, D, generator=gen, dtype=F64) + offset).to(dtype)
    var = (0.2 + torch.rand(B, K, D, generator=gen, dtype=F64)).to(dtype)
    w = torch.rand(B, N, K, generator=gen, dtype=F64).to(dtype)
    reg = (torch.nn.functional.softplus(torch.full((K, D), -2.0, dtype=F64))
           + 0.05 * torch.rand(K, D, generator=gen, dtype=F64)).to(dtype)
    return x, mean, var, w, reg


@pytest.mark.parametrize("shape", [(2, 45, 16, 4), (1, 405, 64, 4), (3, 7, 5, 1), (2, 3, 8, 6)],
                         ids=lambda s: "B{}N{}D{}K{}".format(*s))
def test_diag_gmm_against_reference(gen, shape):
    B, N, D, K = shape
    x, mean, var, w, reg = agame_inputs(gen, B, N, D, K)
    lp = vk.diag_gmm_log_prob(x, mean, var)
    torch.testing.assert_close(lp, R.diag_gmm_log_prob(x, mean, var), atol=1e-10, rtol=1e-11)
    m, v = vk.diag_gmm_fit(x, w, reg)
    rm, rv = R.diag_gmm_fit(x, w, reg)
    torch.testing.assert_close(m, rm, atol=1e-12, rtol=1e-11)
    torch.testing.assert_close(v, rv, atol=1e-12, rtol=1e-11)
    lp32 = vk.diag_gmm_log_prob(x.float(), mean.float(), var.float())
    torch.testing.assert_close(lp32.double(), R.diag_gmm_log_prob(x, mean, var), atol=1e-3, rtol=1e-5)
    m32, v32 = vk.diag_gmm_fit(x.float(), w.float(), reg.float())
    torch.testing.assert_close(m32.double(), rm, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v32.double(), rv, atol=1e-5, rtol=1e-5)


def test_diag_gmm_fit_has_no_one_pass_cancellation(gen):
    """Features far from 0 with a small spread: E[x²] − E[x]² would lose every digit of the
    variance in float32 (ulp(1e4) ≈ 1e-3 against var ≈ 1e-2); two passes keep ~1e-4."""
    B, N, D, K = 2, 1620, 32, 4
    x = (100 + 0.1 * torch.randn(B, N, D, generator=gen, dtype=F64))
    w = torch.rand(B, N, K, generator=gen, dtype=F64)
    reg = torch.full((K, D), 1e-6, dtype=F64)
    rm, rv = R.diag_gmm_fit(x, w, reg)
    m, v = vk.diag_gmm_fit(x.float(), w.float(), reg.float())
    rel = ((v.double() - rv) / rv).abs().max()
    assert rel < 2e-3, rel
    # the log-likelihood on differences keeps its precision too
    lp = vk.diag_gmm_log_prob(x.float(), m, v)
    ref = R.diag_gmm_log_prob(x, rm, rv)
    assert ((lp.double() - ref).abs() / ref.abs().clamp(min=1)).max() < 1e-3


def test_diag_gmm_zero_weights_and_nan(gen):
    x, mean, var, w, reg = agame_inputs(gen, 2, 30, 6, 3, dtype=torch.float32)
    w[1, :, 2] = 0                                        # an empty component: mean 0, var = var_reg
    m, v = vk.diag_gmm_fit(x, w, reg)
    assert torch.equal(m[1, 2], torch.zeros(6)) and torch.equal(v[1, 2], reg[2])
    x[0, 4, 1] = float("nan")
    m, v = vk.diag_gmm_fit(x, w, reg)
    assert torch.isnan(m[0, :, 1]).all() and torch.isnan(v[0, :, 1]).all()      # feature 1 only
    assert torch.isfinite(m[0, :, 0]).all() and torch.isfinite(m[1]).all()
    lp = vk.diag_gmm_log_prob(x, mean, var)
    assert torch.isnan(lp[0, 4]).all() and torch.isfinite(lp[0, 5]).all()


def test_diag_gmm_non_contiguous(gen):
    x, mean, var, w, reg = agame_inputs(gen, 2, 40, 12, 4, dtype=torch.float32)
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)
    wt = w.transpose(0, 2).contiguous().transpose(0, 2)
    assert torch.equal(vk.diag_gmm_log_prob(xt, mean[:, :, :], var.transpose(1, 2).contiguous().transpose(1, 2)),
                       vk.diag_gmm_log_prob(x, mean, var))
    a, b = vk.diag_gmm_fit(xt, wt, reg.t().contiguous().t()), vk.diag_gmm_fit(x, w, reg)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


# ------------------------------------------------------------------------ gradients
def test_gradcheck_prototype_ops(gen):
    v = points(gen, 2, 9, 4, dtype=F64).requires_grad_()
    r = soft_resp(gen, 2, 9, 3).requires_grad_()
    assert torch.autograd.gradcheck(vk.prototype_values, (v, r))
    q = points(gen, 2, 7, 5, dtype=F64, scale=1.0).requires_grad_()
    keys = unit(torch.randn(2, 4, 5, generator=gen, dtype=F64)).requires_grad_()
    vals = torch.randn(2, 4, 3, generator=gen, dtype=F64).requires_grad_()
    for kernel in ("dot", "l2"):
        assert torch.autograd.gradcheck(lambda a, b, c: vk.prototype_attention(a, b, c, 1.5, kernel=kernel),
                                        (q, keys, vals))


def test_gradcheck_diag_gmm(gen):
    x, mean, var, w, reg = agame_inputs(gen, 2, 8, 5, 3)
    for t in (x, mean, var, w, reg):
        t.requires_grad_()
    assert torch.autograd.gradcheck(vk.diag_gmm_log_prob, (x, mean, var))
    assert torch.autograd.gradcheck(vk.diag_gmm_fit, (x, w, reg))
    # the composition A-GAME trains through: fit, then score the same features
    assert torch.autograd.gradcheck(lambda a, b, c: vk.diag_gmm_log_prob(a, *vk.diag_gmm_fit(a, b, c)), (x, w, reg))


def test_agame_unroll_gradients_equal_reference(gen):
    """Eight frames of fit → score → update (λ = 0.1) with a loss on the scores: the fused
    ops' gradients equal autograd through the reference loops (float64)."""
    x = torch.randn(8, 2, 60, 16, generator=gen, dtype=F64, requires_grad=True)
    seg = torch.rand(8, 2, 60, 1, generator=gen, dtype=F64)
    w = torch.cat([1 - seg, seg], -1)
    reg = torch.full((2, 16), -2.0, dtype=F64, requires_grad=True)

    def unroll(log_prob, fit):
        var_reg = torch.nn.functional.softplus(reg)
        mean, var = fit(x[0], w[0], var_reg)
        loss = 0
        for t in range(1, 8):
            s = log_prob(x[t], mean, var)
            loss = loss + torch.nn.functional.cross_entropy(s.reshape(-1, 2), (seg[t, ..., 0] > 0.5).long().reshape(-1))
            m2, v2 = fit(x[t], torch.softmax(s, -1), var_reg)
            mean, var = 0.9 * mean + 0.1 * m2, 0.9 * var + 0.1 * v2
        return loss

    a = unroll(vk.diag_gmm_log_prob, vk.diag_gmm_fit)
    ga = torch.autograd.grad(a, (x, reg))
    b = unroll(R.diag_gmm_log_prob, R.diag_gmm_fit)
    gb = torch.autograd.grad(b, (x, reg))
    torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v, atol=1e-10, rtol=1e-9)


# ------------------------------------------------------------------ opcheck and compile
def _op_samples(gen):
    x, mu, m = em_inputs(gen, 2, 20, 6, 4, dtype=F64, mask=True)
    v = points(gen, 2, 20, 3, dtype=F64)
    r = soft_resp(gen, 2, 20, 4)
    xa, mean, var, w, reg = agame_inputs(gen, 2, 10, 5, 3)
    g = torch.randn(2, 10, 3, generator=gen, dtype=F64)
    op = torch.ops.vos_kernels
    x, mu, v, r, xa, mean, var, w, reg = (t.detach().clone() for t in (x, mu, v, r, xa, mean, var, w, reg))
    return [
        (op.gmm_em, (x, mu, 3, 20.0, m, 0, True), ()),
        (op.gmm_em, (x.float(), mu.float(), 2, 5.0, None, 1, False), ()),
        (op.prototype_values, (v.requires_grad_(), r.requires_grad_()), ()),
        (op.prototype_attention, (x.clone().requires_grad_(), mu.clone().requires_grad_(),
                                  v[:, :4].detach().clone().requires_grad_(), 2.0, 1), ()),
        (op.diag_gmm_log_prob, (xa.clone().requires_grad_(), mean.clone().requires_grad_(),
                                var.clone().requires_grad_()), ()),
        (op.diag_gmm_log_prob_backward, (g, xa.detach(), mean.detach(), var.detach()), ()),
        (op.diag_gmm_fit, (xa.clone().requires_grad_(), w.clone().requires_grad_(), reg.clone().requires_grad_()),
         ()),
        (op.diag_gmm_fit_backward, (torch.randn_like(mean), torch.randn_like(mean), xa.detach(), w.detach(),
                                    mean.detach()), ()),
    ]


def test_opcheck(gen):
    for op, args, _ in _op_samples(gen):
        torch.library.opcheck(op, args)


def test_torch_compile_fullgraph(gen):
    x, mean, var, w, reg = agame_inputs(gen, 2, 30, 8, 4, dtype=torch.float32)
    q = points(gen, 2, 25, 8)
    keys = unit(torch.randn(2, 5, 8, generator=gen))

    def f(x, w, reg, q, keys):
        m, v = vk.diag_gmm_fit(x, w, reg)
        means, resp = vk.gmm_em(x, keys, 2, 20.0)
        return vk.diag_gmm_log_prob(x, m, v), vk.prototype_attention(q, means, keys, 1.0), resp

    fn = torch.compile(f, fullgraph=True)
    for a, b in zip(fn(x, w, reg, q, keys), f(x, w, reg, q, keys)):
        torch.testing.assert_close(a, b)


def test_reference_backend_agrees(gen):
    x, mu, m = em_inputs(gen, 2, 80, 8, 5, dtype=F64, mask=True)
    xa, mean, var, w, reg = agame_inputs(gen, 2, 30, 6, 3)
    fused = (vk.gmm_em(x, mu, 3, 20.0, mask=m), vk.diag_gmm_fit(xa, w, reg), vk.diag_gmm_log_prob(xa, mean, var))
    vk.set_backend("reference")
    ref = (vk.gmm_em(x, mu, 3, 20.0, mask=m), vk.diag_gmm_fit(xa, w, reg), vk.diag_gmm_log_prob(xa, mean, var))
    for a, b in zip(torch.utils._pytree.tree_leaves(fused), torch.utils._pytree.tree_leaves(ref)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


# ------------------------------------------------------------------------ bad input
def _good():
    return dict(x=torch.randn(2, 10, 4), means=torch.randn(2, 3, 4), mask=torch.ones(2, 10),
                values=torch.randn(2, 10, 5), resp=torch.rand(2, 10, 3), query=torch.randn(2, 6, 4),
                keys=torch.randn(2, 3, 4), pvals=torch.randn(2, 3, 5), mean=torch.randn(2, 3, 4),
                var=torch.rand(2, 3, 4) + 0.1, weights=torch.rand(2, 10, 3), var_reg=torch.rand(3, 4))


BAD = [
    ("gmm_em", "x", dict(x=torch.randn(10, 4))),
    ("gmm_em", "x", dict(x=torch.randint(0, 3, (2, 10, 4)))),
    ("gmm_em", "means", dict(means=torch.randn(2, 3, 5))),
    ("gmm_em", "means", dict(means=torch.randn(1, 3, 4))),
    ("gmm_em", "means", dict(means=torch.randn(2, 3, 4, dtype=F64))),
    ("gmm_em", "means", dict(means=torch.randn(2, 0, 4))),
    ("gmm_em", "mask", dict(mask=torch.ones(2, 9))),
    ("gmm_em", "mask", dict(mask=torch.ones(2, 10, dtype=torch.int64))),
    ("gmm_em", "num_iters", dict(num_iters=0)),
    ("gmm_em", "kappa", dict(kappa=0.0)),
    ("gmm_em", "kappa", dict(kappa=float("inf"))),
    ("gmm_em", "kernel", dict(kernel="cosine")),
    ("gmm_em", "normalize_means", dict(normalize_means=1)),
    ("prototype_values", "resp", dict(resp=torch.rand(2, 9, 3))),
    ("prototype_values", "values", dict(values=torch.randn(10, 5))),
    ("prototype_values", "resp", dict(resp=torch.rand(2, 10, 3, dtype=F64))),
    ("prototype_attention", "proto_keys", dict(keys=torch.randn(2, 3, 5))),
    ("prototype_attention", "proto_values", dict(pvals=torch.randn(2, 4, 5))),
    ("prototype_attention", "kappa", dict(kappa=-1.0)),
    ("prototype_attention", "kernel", dict(kernel="L2")),
    ("diag_gmm_log_prob", "mean", dict(mean=torch.randn(2, 3, 5))),
    ("diag_gmm_log_prob", "var", dict(var=torch.rand(2, 4, 4))),
    ("diag_gmm_log_prob", "mean", dict(mean=torch.randn(2, 3, 4, dtype=F64))),
    ("diag_gmm_fit", "weights", dict(weights=torch.rand(2, 11, 3))),
    ("diag_gmm_fit", "var_reg", dict(var_reg=torch.rand(4, 4))),
    ("diag_gmm_fit", "var_reg", dict(var_reg=torch.rand(3, 4).to(torch.int64))),
]


@pytest.mark.parametrize("case", BAD, ids=lambda c: f"{c[0]}-{c[1]}-{'-'.join(c[2])}")
def test_bad_input_raises_value_error_naming_the_argument(case):
    fn, name, change = case
    a = _good()
    a.update({k: v for k, v in change.items() if k in a})
    opt = {k: v for k, v in change.items() if k not in a}
    with pytest.raises(ValueError, match=f"^{name}:"):
        if fn == "gmm_em":
            vk.gmm_em(a["x"], a["means"], opt.get("num_iters", 3), opt.get("kappa", 20.0), mask=a["mask"],
                      kernel=opt.get("kernel", "dot"), normalize_means=opt.get("normalize_means", True))
        elif fn == "prototype_values":
            vk.prototype_values(a["values"], a["resp"])
        elif fn == "prototype_attention":
            vk.prototype_attention(a["query"], a["keys"], a["pvals"], opt.get("kappa", 1.0),
                                   kernel=opt.get("kernel", "dot"))
        elif fn == "diag_gmm_log_prob":
            vk.diag_gmm_log_prob(a["x"], a["mean"], a["var"])
        else:
            vk.diag_gmm_fit(a["x"], a["weights"], a["var_reg"])
