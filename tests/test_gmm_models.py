"""vos_models.pcan / emanet / agame: the GMM-prototype model wrappers against straight
PyTorch ports of the original code (PCAN ``quasi_dense_pcan_seg_refine.py`` and
``em_match_head.py``, EMANet ``network.py`` ``EMAU`` + ``train.py``, A-GAME
``agame_model.py`` ``GaussiansAgame``), written below with plain torch in the original
layouts (channels-first, ``einsum`` / ``bmm`` / ``adaptive_avg_pool2d``).

The modules run with the session's backend (default ``"auto"``: the C++ CPU kernels);
float64 results must match the ports to ~1e-9, float32 to ~1e-4.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from vos_models.agame import AgameState, GaussiansAgame
from vos_models.emanet import EMAU
from vos_models.pcan import FramePrototypes, InstancePrototypes

import vos_kernels

TOL = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=1e-4, atol=1e-4)}


def _seed(gen):
    """Seed the global generator (module initialisation) from the test's generator."""
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))


def _randn(gen, *shape, dtype=torch.float64, scale=1.0):
    return scale * torch.randn(*shape, generator=gen, dtype=dtype)


def _l1norm(inp, dim):
    return inp / (1e-6 + inp.sum(dim=dim, keepdim=True))


def _l2norm(inp, dim):
    return inp / (1e-6 + inp.norm(dim=dim, keepdim=True))


# ------------------------------------------------------------------ PCAN ports (original code)
class PcanFramePort:
    """``EMQuasiDenseMaskRCNNRefine._em_iter`` / ``_prop`` / the loop of ``forward_test``.
    ``blend`` swaps ``memo_banks[i] = x[i]`` for gmm.md's ``0.75·fused + 0.25·memory``."""

    def __init__(self, mus, stage_num=3, levels=2, blend=False):
        self.init_mus, self.stage_num, self.levels, self.blend = mus, stage_num, levels, blend
        self.memo_banks = None

    def _em_iter(self, x, mu):
        R, C, H, W = x.size()
        x = x.view(R, C, H * W)
        for _ in range(self.stage_num):
            z = torch.einsum('rcn,rck->rnk', (x, mu))
            z = F.softmax(20 * z, dim=2)
            z = _l1norm(z, dim=1)
            mu = torch.einsum('rcn,rnk->rck', (x, z))
            mu = _l2norm(mu, dim=1)
        return mu

    def _prop(self, feat, mu):
        B, C, H, W = feat.size()
        x = feat.view(B, C, -1)
        z = torch.einsum('bcn,bck->bnk', (x, mu))
        return F.softmax(z, dim=2)

    def __call__(self, x):
        if self.memo_banks is None:
            self.memo_banks = list(x)
            # PCAN's [1, C, K] buffers (B = 1 in PCAN; repeated over B here).
            self.mus = [m.to(x[0].dtype).repeat(x[0].shape[0], 1, 1) for m in self.init_mus]
        x = list(x)
        self.protos = []
        for i in range(self.levels):
            B, C, H, W = x[i].size()
            protos = self._em_iter(self.memo_banks[i], self.mus[i])
            ref_z = self._prop(x[i], protos)
            ref_r = torch.einsum('bck,bnk->bcn', (protos, ref_z))
            ref_r = ref_r.view(B, C, H, W)
            raw = x[i]
            x[i] = x[i] * 0.75 + ref_r * 0.25
            self.memo_banks[i] = x[i] * 0.75 + self.memo_banks[i] * 0.25 if self.blend else raw
            self.mus[i] = self.mus[i] * 0.5 + protos * 0.5
            self.protos.append(protos)
        return x


def pcan_instance_port(feat_a, mask_a, feat_b, mask_b, pos_mu, neg_mu, lam, stage_num=6, values=None):
    """``EMMatchHeadPlus.forward`` (mask preparation) + ``em_match`` + ``_prop``; value
    prototypes as ``hr_em_match_head.py``'s ``nu`` (on the current frame's last z).
    Returns ``(maps [R, 2, H, W], pos_mu, neg_mu [R, C, K], new buffers, nu)``."""
    def em_iter(x, mask, mu, time):
        R, C, H, W = x.size()
        x = x.view(R, C, H * W)
        m = mask.view(R, 1, H * W)
        if time == 0:
            mu = mu.repeat(R, 1, 1)
        for _ in range(stage_num):
            z = torch.einsum('rcn,rck->rnk', (x, mu))
            z = F.softmax(20 * z, dim=2)
            z = torch.einsum('rnk,ron->rnk', (z, m))
            z = _l1norm(z, dim=1)
            mu = torch.einsum('rcn,rnk->rck', (x, z))
            mu = _l2norm(mu, dim=1)
        return mu, z

    mask_a = F.interpolate(mask_a, size=feat_a.size()[-2:], mode='bilinear')
    mask_b = F.interpolate(mask_b, size=feat_b.size()[-2:], mode='bilinear')
    mask_a = (mask_a.sigmoid() >= 0.5).to(feat_a.dtype)
    mask_b = (mask_b.sigmoid() >= 0.5).to(feat_b.dtype)
    pos_mu_b, neg_mu_b = pos_mu.to(feat_a.dtype), neg_mu.to(feat_a.dtype)
    pos_mu_pre, _ = em_iter(feat_a, mask_a, pos_mu_b, 0)
    neg_mu_pre, _ = em_iter(feat_a, 1 - mask_a, neg_mu_b, 0)
    pos, pos_z_ = em_iter(feat_b, mask_b, pos_mu_pre, 1)
    neg, neg_z_ = em_iter(feat_b, 1 - mask_b, neg_mu_pre, 1)
    new_pos = pos_mu_b * (1 - lam) + pos.mean(dim=0, keepdim=True) * lam
    new_neg = neg_mu_b * (1 - lam) + neg.mean(dim=0, keepdim=True) * lam

    R, C, H, W = feat_b.size()
    mu = torch.cat((pos, neg), dim=2)
    x = feat_b.view(R, C, H * W)
    z = F.softmax(torch.einsum('rck,rcn->rkn', (mu, x)), dim=1)
    pos_z, neg_z = z.chunk(2, dim=1)
    maps = torch.cat([pos_z.sum(dim=1).view(R, 1, H, W), neg_z.sum(dim=1).view(R, 1, H, W)], 1)
    nu = None
    if values is not None:
        y = values.view(R, values.shape[1], H * W)
        nu = torch.cat([_l2norm(torch.einsum('rcn,rnk->rck', (y, zz)), dim=1) for zz in (pos_z_, neg_z_)], 2)
    return maps, pos, neg, new_pos, new_neg, nu


# ------------------------------------------------------------------------------- FramePrototypes
@pytest.mark.parametrize("dtype,blend,batch", [(torch.float64, False, 1), (torch.float64, True, 2),
                                               (torch.float32, False, 1)])
def test_frame_prototypes_match_pcan(gen, dtype, blend, batch):
    _seed(gen)
    C, K = 16, 5
    mod = FramePrototypes(C, K, memory_update="blend" if blend else "replace").to(dtype)
    port = PcanFramePort([mod.mu0, mod.mu1], blend=blend)
    scale = 1.0 if dtype == torch.float64 else 0.25      # float32: logits O(1), no near-hard ties
    sizes = [(8, 10), (4, 5), (2, 3)]
    for _frame in range(4):
        feats = [_randn(gen, batch, C, h, w, dtype=dtype, scale=scale) for h, w in sizes]
        out = mod(feats)
        ref = port([f.clone() for f in feats])
        assert len(out) == 3 and out[2] is feats[2]                      # level 2 untouched
        for o, r in zip(out[:2], ref[:2]):
            assert o.dtype == dtype and o.shape == r.shape
            torch.testing.assert_close(o, r, **TOL[dtype])
        for p, r in zip(mod.prototypes, port.protos):
            torch.testing.assert_close(p, r.transpose(1, 2), **TOL[dtype])
        for m, r in zip(mod.means, port.mus):
            torch.testing.assert_close(m, r.transpose(1, 2), **TOL[dtype])


def test_frame_prototypes_reset_and_grad(gen):
    _seed(gen)
    mod = FramePrototypes(8, 4, num_levels=1).double()
    frames = [[_randn(gen, 1, 8, 6, 6)] for _ in range(3)]
    first = mod(frames[0])[0]
    mod(frames[1])
    mod.reset()
    torch.testing.assert_close(mod(frames[0])[0], first, rtol=0, atol=0)
    # the read is differentiable w.r.t. the current features; memory and means carry no graph
    x = frames[2][0].clone().requires_grad_(True)
    out = mod([x])[0]
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert not mod.memory[0].requires_grad and not mod.means[0].requires_grad


# ---------------------------------------------------------------------------- InstancePrototypes
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_instance_prototypes_match_pcan(gen, dtype):
    _seed(gen)
    R, C, K = 5, 16, 4
    lam = 0.2
    mod = InstancePrototypes(C, K, K, momentum=lam).to(dtype)
    scale = 1.0 if dtype == torch.float64 else 0.25
    for _frame in range(2):
        feat_a, feat_b = _randn(gen, R, C, 14, 14, dtype=dtype, scale=scale), _randn(gen, R, C, 14, 14, dtype=dtype,
                                                                                     scale=scale)
        mask_a, mask_b = _randn(gen, R, 1, 28, 28, dtype=dtype), _randn(gen, R, 1, 14, 14, dtype=dtype)
        values = _randn(gen, R, 6, 14, 14, dtype=dtype)
        maps_r, pos_r, neg_r, new_pos, new_neg, nu_r = pcan_instance_port(
            feat_a, mask_a, feat_b, mask_b, mod.pos_mu.clone(), mod.neg_mu.clone(), lam, values=values)
        maps, nu = mod(feat_a, mask_a, feat_b, mask_b, values=values)
        assert maps.shape == (R, 2, 14, 14) and maps.dtype == dtype
        torch.testing.assert_close(maps, maps_r, **TOL[dtype])
        torch.testing.assert_close(nu, nu_r.transpose(1, 2), **TOL[dtype])
        torch.testing.assert_close(mod.pos_mu, new_pos, **TOL[dtype])
        torch.testing.assert_close(mod.neg_mu, new_neg, **TOL[dtype])
        torch.testing.assert_close(maps.sum(1), torch.ones(R, 14, 14, dtype=dtype), **TOL[dtype])
    # em_match alone gives the port's current-frame prototypes
    mod2 = InstancePrototypes(C, K, K, momentum=lam, update_prototypes=False).to(dtype)
    before = mod2.pos_mu.clone()
    _, pos_r, neg_r, *_ = pcan_instance_port(feat_a, mask_a, feat_b, mask_b, mod2.pos_mu, mod2.neg_mu, lam)
    fg, bg, fg_resp, bg_resp = mod2.em_match(feat_a, mask_a, feat_b, mask_b)
    torch.testing.assert_close(fg, pos_r.transpose(1, 2), **TOL[dtype])
    torch.testing.assert_close(bg, neg_r.transpose(1, 2), **TOL[dtype])
    assert fg_resp.shape == (R, 196, K) and torch.equal(mod2.pos_mu, before)


def test_instance_prototypes_unequal_counts(gen):
    """num_fg != num_bg: two gmm_em launches; same result as the per-problem port."""
    _seed(gen)
    R, C = 3, 8
    mod = InstancePrototypes(C, 3, 5, update_prototypes=False).double()
    feat_a, feat_b = _randn(gen, R, C, 14, 14), _randn(gen, R, C, 14, 14)
    mask_a, mask_b = _randn(gen, R, 1, 14, 14), _randn(gen, R, 1, 14, 14)
    fg, bg, _, _ = mod.em_match(feat_a, mask_a, feat_b, mask_b)
    ma = (mask_a.sigmoid() >= 0.5).double().flatten(1)
    mb = (mask_b.sigmoid() >= 0.5).double().flatten(1)
    xa, xb = feat_a.flatten(2).transpose(1, 2), feat_b.flatten(2).transpose(1, 2)
    ref = vos_kernels.reference
    fg_a, _ = ref.gmm_em(xa, mod.pos_mu.transpose(1, 2).expand(R, -1, -1), 6, 20.0, ma)
    bg_a, _ = ref.gmm_em(xa, mod.neg_mu.transpose(1, 2).expand(R, -1, -1), 6, 20.0, 1 - ma)
    torch.testing.assert_close(fg, ref.gmm_em(xb, fg_a, 6, 20.0, mb)[0], **TOL[torch.float64])
    torch.testing.assert_close(bg, ref.gmm_em(xb, bg_a, 6, 20.0, 1 - mb)[0], **TOL[torch.float64])
    maps = mod.read(feat_b, fg, bg)
    logits = torch.einsum("rnc,rkc->rnk", xb, torch.cat([fg, bg], 1)).softmax(2)
    torch.testing.assert_close(maps[:, 0].flatten(1), logits[..., :3].sum(2), **TOL[torch.float64])


def test_instance_prototypes_all_background_roi(gen):
    _seed(gen)
    R, C = 3, 8
    mod = InstancePrototypes(C, 4, 4).double()
    feat_a, feat_b = _randn(gen, R, C, 14, 14), _randn(gen, R, C, 14, 14)
    mask_a, mask_b = _randn(gen, R, 1, 14, 14), _randn(gen, R, 1, 14, 14)
    mask_a[1], mask_b[1] = -5.0, -5.0        # RoI 1: all background in both frames
    mask_a[2], mask_b[2] = 5.0, 5.0          # RoI 2: all foreground
    fg, bg, fg_resp, bg_resp = mod.em_match(feat_a, mask_a, feat_b, mask_b)
    assert torch.equal(fg[1], torch.zeros_like(fg[1])) and torch.equal(fg_resp[1], torch.zeros_like(fg_resp[1]))
    assert torch.equal(bg[2], torch.zeros_like(bg[2]))
    maps, nu = mod(feat_a, mask_a, feat_b, mask_b, values=feat_b)
    assert torch.isfinite(maps).all() and torch.isfinite(nu).all()
    assert torch.equal(nu[1, :4], torch.zeros_like(nu[1, :4]))
    assert torch.isfinite(mod.pos_mu).all() and torch.isfinite(mod.neg_mu).all()
    # no RoI at all: empty output, buffers untouched
    before = mod.pos_mu.clone()
    empty = feat_b[:0]
    assert mod(empty, mask_a[:0], empty, mask_b[:0]).shape == (0, 2, 14, 14)
    assert torch.equal(mod.pos_mu, before)


# ------------------------------------------------------------------------------------- EMAU
def emau_port(m, x, momentum=0.9):
    """EMANet ``EMAU.forward`` with ``m``'s layers, then ``train.py``'s moving average."""
    idn = x
    x = m.conv1(x)
    b, c, h, w = x.size()
    x = x.view(b, c, h * w)
    mu = m.mu.repeat(b, 1, 1)
    with torch.no_grad():
        for _ in range(m.num_iters):
            x_t = x.permute(0, 2, 1)
            z = torch.bmm(x_t, mu)
            z = F.softmax(z, dim=2)
            z_ = z / (1e-6 + z.sum(dim=1, keepdim=True))
            mu = torch.bmm(x, z_)
            mu = _l2norm(mu, dim=1)
    z_t = z.permute(0, 2, 1)
    x = mu.matmul(z_t)
    x = x.view(b, c, h, w)
    x = F.relu(x, inplace=True)
    x = m.conv2(x)
    x = x + idn
    x = F.relu(x, inplace=True)
    if m.training:
        with torch.no_grad():
            mm = mu.mean(dim=0, keepdim=True)
            m.mu *= momentum
            m.mu += mm * (1 - momentum)
    return x, mu


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("training", [True, False])
def test_emau_matches_emanet(gen, dtype, training):
    _seed(gen)
    mod = EMAU(16, 8).to(dtype).train(training)
    port_mod = copy.deepcopy(mod)
    x = _randn(gen, 2, 16, 6, 7, dtype=dtype)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    mu_before = mod.mu.clone()
    out, mu = mod(xa)
    out_r, mu_r = emau_port(port_mod, xb)
    assert out.shape == (2, 16, 6, 7) and mu.shape == (2, 16, 8)
    torch.testing.assert_close(out, out_r, **TOL[dtype])
    torch.testing.assert_close(mu, mu_r, **TOL[dtype])
    torch.testing.assert_close(mod.mu, port_mod.mu, **TOL[dtype])
    if training:
        assert not torch.equal(mod.mu, mu_before)
    else:
        assert torch.equal(mod.mu, mu_before)
    # gradients: through the reconstruction to conv2 / the norm and the input, none to conv1
    w = _randn(gen, *out.shape, dtype=dtype)
    (out * w).sum().backward()
    (out_r * w).sum().backward()
    for (name, p), (_, q) in zip(mod.named_parameters(), port_mod.named_parameters()):
        if name.startswith("conv1"):
            assert p.grad is None and q.grad is None
        else:
            torch.testing.assert_close(p.grad, q.grad, **TOL[dtype])
    torch.testing.assert_close(xa.grad, xb.grad, **TOL[dtype])


# ------------------------------------------------------------------------------------ A-GAME
def agame_port(m):
    """A-GAME's ``GaussiansAgame`` methods with ``m``'s ``conv_in`` and ``cov_reg``
    (viewed as A-GAME's ``[4, 1, D, 1, 1]``). States are A-GAME's lists of ``[B, D, 1, 1]``."""
    cov_reg = m.cov_reg.view(4, 1, m.channels, 1, 1)

    def forward(feats, state):
        means, covariances = state
        conv_feats = m.conv_in(feats)
        distances = [(conv_feats - means[i]) for i in range(len(means))]
        scores = [-1 / 2 * (torch.log(covariances[i]) + (distances[i] * distances[i]) / covariances[i]).sum(
            dim=-3, keepdim=True) for i in range(len(means))]
        return torch.cat(scores, dim=-3)

    def get_init_state(ref_feats, ref_seg):
        B, C, H, W = ref_feats.size()
        N = H * W
        K1 = ref_seg.size(1)
        conv_ref_feats = m.conv_in(ref_feats)
        means = [F.adaptive_avg_pool2d(conv_ref_feats * ref_seg[:, i:i + 1, :, :], 1)
                 / (1 / N + F.adaptive_avg_pool2d(ref_seg[:, i:i + 1, :, :], 1)) for i in range(K1)]
        distances = [(conv_ref_feats - means[i]) for i in range(K1)]
        covariances = [F.softplus(cov_reg[i]) + F.adaptive_avg_pool2d(distances[i] * distances[i]
                                                                      * ref_seg[:, i:i + 1, :, :], 1)
                       / (1 / N + F.adaptive_avg_pool2d(ref_seg[:, i:i + 1, :, :], 1)) for i in range(K1)]
        test_classification = F.softmax(forward(ref_feats, (means, covariances)), dim=-3)
        residual = F.relu(test_classification[:, :, :, :] - ref_seg[:, :, :, :]).split(1, dim=1)
        means += [(F.adaptive_avg_pool2d(conv_ref_feats * residual[idx], 1)
                   / (1 / N + F.adaptive_avg_pool2d(residual[idx], 1))) for idx in range(K1)]
        distances += [(conv_ref_feats - means[i + 2]) for i in range(K1)]
        covariances += [F.softplus(cov_reg[i + 2]) + F.adaptive_avg_pool2d(distances[i + 2] * distances[i + 2]
                                                                           * residual[i], 1)
                        / (1 / N + F.adaptive_avg_pool2d(residual[i], 1)) for i in range(K1)]
        return means, covariances

    def update(feats, seg, state):
        old_means, old_covariances = state
        new_means, new_covariances = get_init_state(feats, seg)
        means = [(1 - m.lr) * o + m.lr * n for o, n in zip(old_means, new_means)]
        covariances = [(1 - m.lr) * o + m.lr * n for o, n in zip(old_covariances, new_covariances)]
        return means, covariances

    return get_init_state, update, forward


def _as_state(lists):
    means, covs = lists
    return AgameState(torch.cat([t.flatten(1)[:, None] for t in means], 1),
                      torch.cat([t.flatten(1)[:, None] for t in covs], 1))


def _soft_seg(gen, B, H, W, dtype):
    y = torch.rand(B, 1, H, W, generator=gen, dtype=dtype)
    return torch.cat([1 - y, y], 1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_agame_matches_port(gen, dtype):
    _seed(gen)
    B, Cin, D, H, W = 2, 12, 8, 5, 6
    mod = GaussiansAgame(Cin, D).to(dtype)
    init_p, update_p, forward_p = agame_port(mod)
    f0, f1 = _randn(gen, B, Cin, H, W, dtype=dtype), _randn(gen, B, Cin, H, W, dtype=dtype)
    s0, s1 = _soft_seg(gen, B, H, W, dtype), _soft_seg(gen, B, H, W, dtype)
    st = mod.get_init_state(f0, s0)
    st_p = init_p(f0, s0)
    assert st.mean.shape == (B, 4, D) and st.var.shape == (B, 4, D)
    for a, b in zip(st, _as_state(st_p)):
        torch.testing.assert_close(a, b, **TOL[dtype])
    scores = mod(f1, st)
    assert scores.shape == (B, 4, H, W)
    torch.testing.assert_close(scores, forward_p(f1, st_p), **TOL[dtype])
    st, st_p = mod.update(f1, s1, st), update_p(f1, s1, st_p)
    for a, b in zip(st, _as_state(st_p)):
        torch.testing.assert_close(a, b, **TOL[dtype])


def _unroll(mod, feats, seg0, fuse, init_state, update, forward):
    """An 8-frame A-GAME-like unroll: init on frame 0, then per frame score, a fixed linear
    'fusion' of the 4 scores to 2 logits, update with their softmax; loss = Σ NLL of class 1."""
    state = init_state(feats[0], seg0)
    loss = 0.0
    for f in feats[1:]:
        scores = forward(f, state)
        logits = torch.einsum("ok,bkhw->bohw", fuse, scores) / scores.shape[1]
        seg = logits.softmax(1)
        loss = loss - F.log_softmax(logits, 1)[:, 1].mean()
        state = update(f, seg, state)
    return loss


def test_agame_unroll_gradients(gen):
    _seed(gen)
    B, Cin, D, H, W, T = 2, 10, 6, 4, 5, 8
    mod = GaussiansAgame(Cin, D).double()
    feats = [_randn(gen, B, Cin, H, W) for _ in range(T)]
    seg0 = _soft_seg(gen, B, H, W, torch.float64)
    fuse = _randn(gen, 2, 4, scale=0.1)
    params = [mod.conv_in.weight, mod.conv_in.bias, mod.cov_reg]

    def grads(fns):
        loss = _unroll(mod, feats, seg0, fuse, *fns)
        return [loss.detach()] + list(torch.autograd.grad(loss, params))

    ours = grads((mod.get_init_state, mod.update, mod.forward))
    before = vos_kernels.get_backend()
    vos_kernels.set_backend("reference")
    try:
        with_reference = grads((mod.get_init_state, mod.update, mod.forward))
    finally:
        vos_kernels.set_backend(before)
    port = grads(agame_port(mod))
    for a, r, p in zip(ours, with_reference, port):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, r, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(a, p, rtol=1e-9, atol=1e-10)
    assert ours[3].abs().sum() > 0      # cov_reg receives a gradient


def test_agame_pool_segmentation():
    labels = torch.zeros(1, 1, 32, 48, dtype=torch.int64)
    labels[..., :16, :16] = 3
    seg = GaussiansAgame.pool_segmentation(labels, 3)
    assert seg.shape == (1, 2, 2, 3)
    torch.testing.assert_close(seg.sum(1), torch.ones(1, 2, 3))
    assert seg[0, 1, 0, 0] == 1 and seg[0, 1, 1, 1] == 0


# ------------------------------------------------------------------------------ bad inputs
def _raises(name):
    return pytest.raises(ValueError, match=rf"^{name}:")


def test_bad_inputs_name_the_argument(gen):
    d = torch.float64
    with _raises("memory_update"):
        FramePrototypes(8, 4, memory_update="mean")
    with _raises("kappa"):
        FramePrototypes(8, 4, kappa=0)
    with _raises("num_prototypes"):
        FramePrototypes(8, 0)
    fp = FramePrototypes(8, 4, num_levels=2).double()
    with _raises("features"):
        fp(_randn(gen, 1, 8, 4, 4))
    with _raises("features"):
        fp([_randn(gen, 1, 8, 4, 4)])
    with _raises(r"features\[1\]"):
        fp([_randn(gen, 1, 8, 4, 4), _randn(gen, 1, 7, 2, 2)])
    fp([_randn(gen, 1, 8, 4, 4), _randn(gen, 1, 8, 2, 2)])
    with _raises(r"features\[0\]"):
        fp([_randn(gen, 2, 8, 4, 4), _randn(gen, 2, 8, 2, 2)])   # batch changed mid-video
    with _raises(r"features\[0\]"):
        fp([_randn(gen, 1, 8, 4, 4, dtype=torch.float32), _randn(gen, 1, 8, 2, 2, dtype=torch.float32)])

    ip = InstancePrototypes(8, 2, 2).double()
    f, m = _randn(gen, 3, 8, 14, 14), _randn(gen, 3, 1, 14, 14)
    with _raises("momentum"):
        InstancePrototypes(8, momentum=1.5)
    with _raises("ref_feats"):
        ip(_randn(gen, 3, 9, 14, 14), m, f, m)
    with _raises("mask_logits"):
        ip(f, m, f, _randn(gen, 3, 2, 14, 14))
    with _raises("ref_mask_logits"):
        ip(f, _randn(gen, 2, 1, 14, 14), f, m)
    with _raises("mask_logits"):
        ip(f, m, f, m.float())
    with _raises("values"):
        ip(f, m, f, m, values=_randn(gen, 3, 4, 7, 7))

    em = EMAU(8, 4).double()
    with _raises("x"):
        em(_randn(gen, 8, 4, 4))
    with _raises("x"):
        em(_randn(gen, 1, 6, 4, 4))
    with _raises("num_bases"):
        EMAU(8, 0)
    with _raises("kernel"):
        EMAU(8, 4, kernel="cos")

    ag = GaussiansAgame(6, 4).double()
    x = _randn(gen, 2, 6, 3, 4)
    seg = _soft_seg(gen, 2, 3, 4, d)
    with _raises("lr"):
        GaussiansAgame(6, 4, lr=-0.1)
    with _raises("feats"):
        ag.get_init_state(_randn(gen, 2, 5, 3, 4), seg)
    with _raises("seg"):
        ag.get_init_state(x, _soft_seg(gen, 2, 6, 8, d))          # not pooled to the grid
    with _raises("seg"):
        ag.get_init_state(x, seg[:, :1])
    st = ag.get_init_state(x, seg)
    with _raises("state"):
        ag(x, (st.mean[:, :2], st.var[:, :2]))
    with _raises("state"):
        ag.update(x, seg, st.mean)
    with _raises("labels"):
        GaussiansAgame.pool_segmentation(seg, 1)


# ---------------------------------------------------------------------- state_dict round trips
def test_state_dict_round_trip(gen):
    d = torch.float64
    torch.manual_seed(1)
    a = [FramePrototypes(8, 4).double(), InstancePrototypes(8, 3, 3).double(), EMAU(8, 4).double().eval(),
         GaussiansAgame(6, 4).double()]
    torch.manual_seed(2)
    b = [FramePrototypes(8, 4).double(), InstancePrototypes(8, 3, 3).double(), EMAU(8, 4).double().eval(),
         GaussiansAgame(6, 4).double()]
    for ma, mb in zip(a, b):
        sd = ma.state_dict()
        assert not all(torch.equal(sd[k], mb.state_dict()[k]) for k in sd)
        mb.load_state_dict(copy.deepcopy(sd))
        assert all(torch.equal(sd[k], mb.state_dict()[k]) for k in sd)
    assert set(a[0].state_dict()) == {"mu0", "mu1"} and a[0].mu0.shape == (1, 8, 4)
    assert set(a[1].state_dict()) == {"pos_mu", "neg_mu"} and a[1].pos_mu.shape == (1, 8, 3)
    assert a[2].mu.shape == (1, 8, 4)
    torch.testing.assert_close(a[2].mu.norm(dim=1), torch.ones(1, 4, dtype=d), rtol=0, atol=1e-6)

    feats = [_randn(gen, 1, 8, 4, 4), _randn(gen, 1, 8, 2, 2)]
    for x, y in zip(a[0](feats), b[0](feats)):
        assert torch.equal(x, y)
    f, m = _randn(gen, 2, 8, 14, 14), _randn(gen, 2, 1, 14, 14)
    assert torch.equal(a[1](f, m, f, m), b[1](f, m, f, m))
    x = _randn(gen, 2, 8, 3, 3)
    assert torch.equal(a[2](x)[0], b[2](x)[0])
    x, seg = _randn(gen, 2, 6, 3, 4), _soft_seg(gen, 2, 3, 4, d)
    assert torch.equal(a[3](x, a[3].get_init_state(x, seg)), b[3](x, b[3].get_init_state(x, seg)))

    # A-GAME checkpoints store cov_reg as [4, 1, D, 1, 1]
    sd = a[3].state_dict()
    sd["cov_reg"] = sd["cov_reg"].view(4, 1, 4, 1, 1).clone()
    c = GaussiansAgame(6, 4).double()
    c.load_state_dict(sd)
    assert torch.equal(c.cov_reg, a[3].cov_reg)
    assert math.isclose(float(F.softplus(torch.tensor(-2.0))), float(F.softplus(GaussiansAgame(6, 4).cov_reg[0, 0].detach())))
