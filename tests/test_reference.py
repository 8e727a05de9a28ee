"""vos_kernels.reference against a brute-force float64 oracle written here.

The oracle computes the full distance matrix ``sum((e_p - e_q)^2)`` directly (no
expansion) and scans candidates with explicit Python loops over labels / windows /
offsets in increasing flat index with a strict ``<`` (ties -> lowest index).
"""


import pytest
import torch

from vos_kernels import reference as ref

INF = float("inf")
DT = torch.float64


# ----------------------------------------------------------------------- oracle
def _dist_matrix(q, r):
    """[M, C], [N, C] -> python list of lists of exact-form squared distances."""
    return ((q[:, None, :] - r[None, :, :]) ** 2).sum(-1).tolist()


def oracle_global(query, reference, labels, L, rate):
    B, H, W, C = query.shape
    _, T, Hr, Wr, _ = reference.shape
    M, N = H * W, T * Hr * Wr
    sq = torch.full((B, L, H, W), INF, dtype=DT)
    ix = torch.full((B, L, H, W), -1, dtype=torch.long)
    for b in range(B):
        D = _dist_matrix(query[b].reshape(M, C), reference[b].reshape(N, C))
        lab = labels[b].reshape(N).tolist()
        for l in range(L):
            cand = []
            for n in range(N):
                t, rem = divmod(n, Hr * Wr)
                y, x = divmod(rem, Wr)
                if lab[n] == l and y % rate == 0 and x % rate == 0:
                    cand.append(n)
            for p in range(M):
                best, bi = INF, -1
                for n in cand:
                    if D[p][n] < best:
                        best, bi = D[p][n], n
                sq[b, l, p // W, p % W] = best
                ix[b, l, p // W, p % W] = bi
    return sq, ix


def oracle_local(query, previous, labels, L, windows, rate):
    B, H, W, C = query.shape
    K = len(windows)
    sq = torch.full((B, L, K, H, W), INF, dtype=DT)
    ix = torch.full((B, L, K, H, W), -1, dtype=torch.long)
    for b in range(B):
        D = _dist_matrix(query[b].reshape(H * W, C), previous[b].reshape(H * W, C))
        lab = labels[b].tolist()
        for l in range(L):
            for ki, k in enumerate(windows):
                for y in range(H):
                    for x in range(W):
                        best, bi = INF, -1
                        for dy in range(-k, k + 1):
                            if dy % rate:
                                continue
                            for dx in range(-k, k + 1):
                                if dx % rate:
                                    continue
                                yy, xx = y + dy, x + dx
                                if not (0 <= yy < H and 0 <= xx < W) or lab[yy][xx] != l:
                                    continue
                                d = D[y * W + x][yy * W + xx]
                                if d < best:
                                    best, bi = d, yy * W + xx
                        sq[b, l, ki, y, x] = best
                        ix[b, l, ki, y, x] = bi
    return sq, ix


def oracle_fgbg(sq, ix, bias):
    """fg = tanh((d + b) / 2), 1.0 when empty; bg[l] = min_{m != l} fg[m], 1 if L == 1."""
    L = sq.shape[1]
    shape = [1, L] + [1] * (sq.dim() - 2)
    fg = torch.tanh((sq + bias.view(shape)) / 2)
    fg = torch.where(ix < 0, torch.ones_like(fg), fg)
    bg = torch.ones_like(fg)
    for l in range(L):
        others = [fg[:, m] for m in range(L) if m != l]
        if others:
            v = others[0]
            for o in others[1:]:
                v = torch.minimum(v, o)
            bg[:, l] = v
    return fg, bg


def oracle_pooling(emb, labels, L):
    B, H, W, C = emb.shape
    out = torch.zeros(B, L, 2, C, dtype=DT)
    for b in range(B):
        for l in range(L):
            s_in, n_in = torch.zeros(C, dtype=DT), 0.0
            s_out, n_out = torch.zeros(C, dtype=DT), 0.0
            for y in range(H):
                for x in range(W):
                    v = int(labels[b, y, x])
                    if v == l:
                        s_in += emb[b, y, x]
                        n_in += 1
                    elif v >= 0:
                        s_out += emb[b, y, x]
                        n_out += 1
            out[b, l, 0] = s_in / (n_in + 1e-5)
            out[b, l, 1] = s_out / (n_out + 1e-5)
    return out


# ----------------------------------------------------------------------- inputs
def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _labels(g, shape, L, drop=()):
    """Labels in [-1, L-2] (so label L-1 is always empty), with ``drop`` labels removed."""
    lab = torch.randint(-1, max(L - 1, 1), shape, generator=g)
    if L == 1:
        lab = torch.randint(-1, 1, shape, generator=g)
    for d in drop:
        lab[lab == d] = -1
    return lab


def _emb(g, shape, integer=False):
    if integer:
        return torch.randint(0, 2, shape, generator=g).to(DT)
    return torch.randn(shape, generator=g, dtype=DT)


# ------------------------------------------------------------- global matching
@pytest.mark.parametrize("rate", [1, 2, 3])
@pytest.mark.parametrize("T", [1, 2])
@pytest.mark.parametrize("L", [1, 2, 4])
def test_labelled_nearest_sqdist_matches_oracle(rate, T, L):
    g = _gen(100 * rate + 10 * T + L)
    B, H, W, Hr, Wr, C = 2, 4, 5, 7, 5, 3
    q = _emb(g, (B, H, W, C))
    r = _emb(g, (B, T, Hr, Wr, C))
    lab = _labels(g, (B, T, Hr, Wr), L)
    if L > 2:
        lab[1][lab[1] == 1] = -1  # label 1 empty in the second sequence
    want_sq, want_ix = oracle_global(q, r, lab, L, rate)
    for n_chunks in (1, 3, 4, 50):
        sq, ix = ref.labelled_nearest_sqdist(q, r, lab, L, atrous_rate=rate, n_chunks=n_chunks)
        assert sq.dtype == DT and ix.dtype == torch.long
        assert sq.shape == (B, L, H, W) and ix.shape == (B, L, H, W)
        torch.testing.assert_close(sq, want_sq, rtol=1e-10, atol=1e-10)
        assert torch.equal(ix, want_ix)
    if L > 1:
        assert (ix[:, L - 1] == -1).all() and torch.isinf(sq[:, L - 1]).all()


def test_labelled_nearest_sqdist_4d_reference_and_int32_labels():
    g = _gen(1)
    q = _emb(g, (2, 3, 4, 2))
    r = _emb(g, (2, 5, 6, 2))
    lab = _labels(g, (2, 5, 6), 3)
    sq4, ix4 = ref.labelled_nearest_sqdist(q, r, lab.int(), 3, atrous_rate=2)
    sq5, ix5 = ref.labelled_nearest_sqdist(q, r.unsqueeze(1), lab.unsqueeze(1), 3, atrous_rate=2)
    assert torch.equal(sq4, sq5) and torch.equal(ix4, ix5)
    want_sq, want_ix = oracle_global(q, r.unsqueeze(1), lab.unsqueeze(1), 3, 2)
    torch.testing.assert_close(sq4, want_sq, rtol=1e-10, atol=1e-10)
    assert torch.equal(ix4, want_ix)


@pytest.mark.parametrize("rate", [1, 2])
def test_global_ties_pick_lowest_index(rate):
    # Integer embeddings in {0, 1}: many exact ties (also at distance 0).
    g = _gen(7 + rate)
    q = _emb(g, (2, 4, 4, 2), integer=True)
    r = _emb(g, (2, 2, 5, 6, 2), integer=True)
    lab = _labels(g, (2, 2, 5, 6), 3)
    want_sq, want_ix = oracle_global(q, r, lab, 3, rate)
    sq, ix = ref.labelled_nearest_sqdist(q, r, lab, 3, atrous_rate=rate, n_chunks=3)
    assert torch.equal(sq, want_sq)
    assert torch.equal(ix, want_ix)
    fg, bg, ix2 = ref.fb_global_matching(q, r, lab, 3, torch.zeros(3, dtype=DT),
                                         atrous_rate=rate, return_index=True)
    assert torch.equal(ix2, want_ix)


@pytest.mark.parametrize("rate", [1, 3])
@pytest.mark.parametrize("L", [1, 2, 4])
def test_fb_global_matching_matches_oracle(rate, L):
    g = _gen(31 * rate + L)
    B, H, W, T, Hr, Wr, C = 2, 3, 5, 2, 5, 4, 4
    q = _emb(g, (B, H, W, C))
    r = _emb(g, (B, T, Hr, Wr, C))
    lab = _labels(g, (B, T, Hr, Wr), L)
    bias = torch.randn(L, generator=g, dtype=DT)
    sq, ix = oracle_global(q, r, lab, L, rate)
    want_fg, want_bg = oracle_fgbg(sq, ix, bias)
    fg, bg, index = ref.fb_global_matching(q, r, lab, L, bias, atrous_rate=rate,
                                           return_index=True)
    assert fg.dtype == DT and fg.shape == (B, L, H, W) and bg.shape == (B, L, H, W)
    torch.testing.assert_close(fg, want_fg, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bg, want_bg, rtol=1e-12, atol=1e-12)
    assert torch.equal(index, ix)
    # Empty labels are exactly 1.0; L == 1 gives bg exactly 1.0.
    assert (fg[ix < 0] == 1.0).all()
    if L == 1:
        assert (bg == 1.0).all()
    out2 = ref.fb_global_matching(q, r, lab, L, bias, atrous_rate=rate)
    assert len(out2) == 2 and torch.equal(out2[0], fg) and torch.equal(out2[1], bg)


def test_global_all_reference_unlabelled():
    g = _gen(3)
    q = _emb(g, (1, 3, 3, 2))
    r = _emb(g, (1, 4, 4, 2))
    lab = torch.full((1, 4, 4), -1)
    sq, ix = ref.labelled_nearest_sqdist(q, r, lab, 3)
    assert torch.isinf(sq).all() and (ix == -1).all()
    fg, bg = ref.fb_global_matching(q, r, lab, 3, torch.zeros(3, dtype=DT))
    assert (fg == 1.0).all() and (bg == 1.0).all()
    # atrous grid misses the only labelled pixel
    lab[0, 1, 1] = 1
    sq, ix = ref.labelled_nearest_sqdist(q, r, lab, 3, atrous_rate=2)
    assert (ix == -1).all()


def test_global_nan_propagates_to_its_label_only():
    g = _gen(4)
    q = _emb(g, (1, 3, 3, 2))
    r = _emb(g, (1, 4, 4, 2))
    lab = torch.tensor([[[0, 1, 2, 0], [1, 1, 0, 2], [0, 0, 1, 1], [2, 2, 0, 0]]])
    r[0, 2, 2, 0] = float("nan")          # a label-1 pixel, flat index 10
    sq, ix = ref.labelled_nearest_sqdist(q, r, lab, 3)
    assert torch.isnan(sq[:, 1]).all() and (ix[:, 1] == 10).all()
    assert not torch.isnan(sq[:, [0, 2]]).any()
    fg, bg = ref.fb_global_matching(q, r, lab, 3, torch.zeros(3, dtype=DT))
    assert torch.isnan(fg[:, 1]).all() and not torch.isnan(fg[:, [0, 2]]).any()
    assert torch.isnan(bg[:, [0, 2]]).all() and not torch.isnan(bg[:, 1]).any()


def test_float32_in_float32_out():
    g = _gen(5)
    q = torch.randn(1, 3, 4, 3, generator=g)
    r = torch.randn(1, 2, 3, 4, 3, generator=g)
    lab = torch.randint(-1, 3, (1, 2, 3, 4), generator=g)
    fg, bg = ref.fb_global_matching(q, r, lab, 3, torch.zeros(3))
    assert fg.dtype == torch.float32 and bg.dtype == torch.float32
    fg, bg = ref.fb_multi_local_matching(q, q.flip(1), lab[:, 0], 3, [1, 2], torch.zeros(3))
    assert fg.dtype == torch.float32
    assert ref.fb_instance_pooling(q, lab[:, 0], 3).dtype == torch.float32


# --------------------------------------------------------------- local matching
@pytest.mark.parametrize("rate", [1, 2, 3])
@pytest.mark.parametrize("windows", [[1], [1, 2, 4], [2, 3, 7]])
@pytest.mark.parametrize("L", [1, 3])
def test_fb_multi_local_matching_matches_oracle(rate, windows, L):
    # 4x5 frames: window 7 is larger than the frame.
    g = _gen(1000 * rate + 10 * len(windows) + windows[-1] + L)
    B, H, W, C = 2, 4, 5, 3
    q = _emb(g, (B, H, W, C))
    p = _emb(g, (B, H, W, C))
    lab = _labels(g, (B, H, W), L)
    bias = torch.randn(L, generator=g, dtype=DT)
    sq, ix = oracle_local(q, p, lab, L, windows, rate)
    want_fg, want_bg = oracle_fgbg(sq, ix, bias)
    fg, bg, index = ref.fb_multi_local_matching(q, p, lab, L, windows, bias, atrous_rate=rate,
                                                return_index=True)
    K = len(windows)
    assert fg.shape == (B, L, K, H, W) and bg.shape == (B, L, K, H, W) and fg.dtype == DT
    assert torch.equal(index, ix)
    torch.testing.assert_close(fg, want_fg, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bg, want_bg, rtol=1e-12, atol=1e-12)
    assert (fg[ix < 0] == 1.0).all()
    if L == 1:
        assert (bg == 1.0).all()


@pytest.mark.parametrize("rate", [1, 2])
def test_local_ties_pick_lowest_index(rate):
    g = _gen(77 + rate)
    q = _emb(g, (1, 5, 5, 2), integer=True)
    p = _emb(g, (1, 5, 5, 2), integer=True)
    lab = _labels(g, (1, 5, 5), 3)
    windows = [1, 2, 3]
    sq, ix = oracle_local(q, p, lab, 3, windows, rate)
    fg, bg, index = ref.fb_multi_local_matching(q, p, lab, 3, windows, torch.zeros(3, dtype=DT),
                                                atrous_rate=rate, return_index=True)
    assert torch.equal(index, ix)
    want_fg, _ = oracle_fgbg(sq, ix, torch.zeros(3, dtype=DT))
    torch.testing.assert_close(fg, want_fg, rtol=0, atol=1e-15)


# ------------------------------------------------------------- instance pooling
@pytest.mark.parametrize("L", [1, 3, 5])
def test_fb_instance_pooling_matches_oracle(L):
    g = _gen(200 + L)
    emb = _emb(g, (2, 4, 5, 3))
    lab = _labels(g, (2, 4, 5), L)
    got = ref.fb_instance_pooling(emb, lab, L)
    assert got.shape == (2, L, 2, 3) and got.dtype == DT
    torch.testing.assert_close(got, oracle_pooling(emb, lab, L), rtol=1e-12, atol=1e-12)


# -------------------------------------------------------------------- gradients
def test_gradient_of_min_flows_to_argmin():
    g = _gen(9)
    q = _emb(g, (2, 3, 4, 3)).requires_grad_()
    r = _emb(g, (2, 2, 3, 3, 3)).requires_grad_()
    lab = _labels(g, (2, 2, 3, 3), 4)
    w = torch.randn(2, 4, 3, 4, generator=g, dtype=DT)
    sq, ix = ref.labelled_nearest_sqdist(q, r, lab, 4)
    (torch.where(ix >= 0, sq, torch.zeros_like(sq)) * w).sum().backward()
    gq = torch.zeros_like(q)
    gr = torch.zeros_like(r).view(2, -1, 3)
    qd, rd = q.detach(), r.detach().view(2, -1, 3)
    for b in range(2):
        for l in range(4):
            for y in range(3):
                for x in range(4):
                    n = int(ix[b, l, y, x])
                    if n < 0:
                        continue
                    diff = 2 * w[b, l, y, x] * (qd[b, y, x] - rd[b, n])
                    gq[b, y, x] += diff
                    gr[b, n] -= diff
    torch.testing.assert_close(q.grad, gq)
    torch.testing.assert_close(r.grad, gr.view_as(r))


@pytest.mark.parametrize("rate", [1, 2])
def test_gradcheck_global(rate):
    g = _gen(11 + rate)
    q = (3 * _emb(g, (1, 2, 3, 2))).requires_grad_()
    r = (3 * _emb(g, (1, 2, 3, 3, 2))).requires_grad_()
    lab = torch.tensor([[[[0, 1, 2], [1, 0, 2], [2, 1, 0]], [[1, 1, 0], [-1, 2, 0], [0, 2, 1]]]])
    bias = torch.randn(4, generator=g, dtype=DT).requires_grad_()  # label 3 empty
    fn = lambda q, r, b: ref.fb_global_matching(q, r, lab, 4, b, atrous_rate=rate)
    assert torch.autograd.gradcheck(fn, (q, r, bias))
    lab3 = lab.clamp_min(0)
    fn2 = lambda q, r: ref.labelled_nearest_sqdist(q, r, lab3, 3, atrous_rate=rate)[0]
    assert torch.autograd.gradcheck(fn2, (q, r))


@pytest.mark.parametrize("rate", [1, 2])
def test_gradcheck_local(rate):
    g = _gen(21 + rate)
    q = (3 * _emb(g, (1, 4, 4, 2))).requires_grad_()
    p = (3 * _emb(g, (1, 4, 4, 2))).requires_grad_()
    lab = _labels(g, (1, 4, 4), 4)
    bias = torch.randn(4, generator=g, dtype=DT).requires_grad_()
    fn = lambda q, p, b: ref.fb_multi_local_matching(q, p, lab, 4, [1, 2], b, atrous_rate=rate)
    assert torch.autograd.gradcheck(fn, (q, p, bias))


def test_gradcheck_pooling():
    g = _gen(31)
    emb = _emb(g, (2, 3, 4, 2)).requires_grad_()
    lab = _labels(g, (2, 3, 4), 3)
    assert torch.autograd.gradcheck(lambda e: ref.fb_instance_pooling(e, lab, 3), (emb,))


# ------------------------------------------------------------------- bad input
def test_bad_input_raises_value_error():
    q = torch.zeros(1, 3, 3, 2, dtype=DT)
    r = torch.zeros(1, 3, 3, 2, dtype=DT)
    lab = torch.zeros(1, 3, 3, dtype=torch.long)
    b = torch.zeros(2, dtype=DT)
    with pytest.raises(ValueError, match="reference_labels"):
        ref.labelled_nearest_sqdist(q, r, lab + 2, 2)
    with pytest.raises(ValueError, match="num_labels"):
        ref.labelled_nearest_sqdist(q, r, lab, 0)
    with pytest.raises(ValueError, match="atrous_rate"):
        ref.fb_global_matching(q, r, lab, 2, b, atrous_rate=0)
    with pytest.raises(ValueError, match="bias"):
        ref.fb_global_matching(q, r, lab, 2, torch.zeros(3, dtype=DT))
    with pytest.raises(ValueError, match="windows"):
        ref.fb_multi_local_matching(q, r, lab, 2, [3, 1], b)
    with pytest.raises(ValueError, match="previous"):
        ref.fb_multi_local_matching(q, r[:, :2], lab, 2, [1], b)
    with pytest.raises(ValueError, match="labels"):
        ref.fb_instance_pooling(q, lab.float(), 2)
