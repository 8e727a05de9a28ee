"""vos_kernels.reference against the float64 brute-force oracle of tests/oracle.py.

The oracle computes the full distance matrix ``sum((e_p - e_q)^2)`` directly (no
expansion) and takes the per-label / per-window minimum over explicit candidate masks
(ties -> lowest index). The reference is float64, so values are compared to ~1e-10 and
indices exactly. Inputs are fresh random draws from the ``gen`` fixture of conftest.py.
"""


import pytest
import torch

import oracle
from vos_kernels import reference as ref

DT = torch.float64


# ----------------------------------------------------------------------- inputs
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
def test_labelled_nearest_sqdist_matches_oracle(gen, rate, T, L):
    B, H, W, Hr, Wr, C = 2, 4, 5, 7, 5, 3
    q = _emb(gen, (B, H, W, C))
    r = _emb(gen, (B, T, Hr, Wr, C))
    lab = _labels(gen, (B, T, Hr, Wr), L)
    if L > 2:
        lab[1][lab[1] == 1] = -1  # label 1 empty in the second sequence
    want_sq, want_ix = oracle.nearest(q, r, lab, L, rate)
    for n_chunks in (1, 3, 4, 50):
        sq, ix = ref.labelled_nearest_sqdist(q, r, lab, L, atrous_rate=rate, n_chunks=n_chunks)
        assert sq.dtype == DT and ix.dtype == torch.long
        assert sq.shape == (B, L, H, W) and ix.shape == (B, L, H, W)
        torch.testing.assert_close(sq, want_sq, rtol=1e-10, atol=1e-10)
        assert torch.equal(ix, want_ix)
    if L > 1:
        assert (ix[:, L - 1] == -1).all() and torch.isinf(sq[:, L - 1]).all()


def test_labelled_nearest_sqdist_4d_reference_and_int32_labels(gen):
    q = _emb(gen, (2, 3, 4, 2))
    r = _emb(gen, (2, 5, 6, 2))
    lab = _labels(gen, (2, 5, 6), 3)
    sq4, ix4 = ref.labelled_nearest_sqdist(q, r, lab.int(), 3, atrous_rate=2)
    sq5, ix5 = ref.labelled_nearest_sqdist(q, r.unsqueeze(1), lab.unsqueeze(1), 3, atrous_rate=2)
    assert torch.equal(sq4, sq5) and torch.equal(ix4, ix5)
    want_sq, want_ix = oracle.nearest(q, r.unsqueeze(1), lab.unsqueeze(1), 3, 2)
    torch.testing.assert_close(sq4, want_sq, rtol=1e-10, atol=1e-10)
    assert torch.equal(ix4, want_ix)


@pytest.mark.parametrize("rate", [1, 2])
def test_global_ties_pick_lowest_index(gen, rate):
    # Integer embeddings in {0, 1}: many exact ties (also at distance 0).
    q = _emb(gen, (2, 4, 4, 2), integer=True)
    r = _emb(gen, (2, 2, 5, 6, 2), integer=True)
    lab = _labels(gen, (2, 2, 5, 6), 3)
    want_sq, want_ix = oracle.nearest(q, r, lab, 3, rate)
    sq, ix = ref.labelled_nearest_sqdist(q, r, lab, 3, atrous_rate=rate, n_chunks=3)
    assert torch.equal(sq, want_sq)
    assert torch.equal(ix, want_ix)
    fg, bg, ix2 = ref.fb_global_matching(q, r, lab, 3, torch.zeros(3, dtype=DT),
                                         atrous_rate=rate, return_index=True)
    assert torch.equal(ix2, want_ix)


@pytest.mark.parametrize("rate", [1, 3])
@pytest.mark.parametrize("L", [1, 2, 4])
def test_fb_global_matching_matches_oracle(gen, rate, L):
    B, H, W, T, Hr, Wr, C = 2, 3, 5, 2, 5, 4, 4
    q = _emb(gen, (B, H, W, C))
    r = _emb(gen, (B, T, Hr, Wr, C))
    lab = _labels(gen, (B, T, Hr, Wr), L)
    bias = torch.randn(L, generator=gen, dtype=DT)
    sq, ix = oracle.nearest(q, r, lab, L, rate)
    want_fg, want_bg = oracle.fb(sq, ix, bias)
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


def test_global_all_reference_unlabelled(gen):
    q = _emb(gen, (1, 3, 3, 2))
    r = _emb(gen, (1, 4, 4, 2))
    lab = torch.full((1, 4, 4), -1)
    sq, ix = ref.labelled_nearest_sqdist(q, r, lab, 3)
    assert torch.isinf(sq).all() and (ix == -1).all()
    fg, bg = ref.fb_global_matching(q, r, lab, 3, torch.zeros(3, dtype=DT))
    assert (fg == 1.0).all() and (bg == 1.0).all()
    # atrous grid misses the only labelled pixel
    lab[0, 1, 1] = 1
    sq, ix = ref.labelled_nearest_sqdist(q, r, lab, 3, atrous_rate=2)
    assert (ix == -1).all()


def test_global_nan_propagates_to_its_label_only(gen):
    q = _emb(gen, (1, 3, 3, 2))
    r = _emb(gen, (1, 4, 4, 2))
    lab = torch.tensor([[[0, 1, 2, 0], [1, 1, 0, 2], [0, 0, 1, 1], [2, 2, 0, 0]]])
    r[0, 2, 2, 0] = float("nan")          # a label-1 pixel, flat index 10
    sq, ix = ref.labelled_nearest_sqdist(q, r, lab, 3)
    assert torch.isnan(sq[:, 1]).all() and (ix[:, 1] == 10).all()
    assert not torch.isnan(sq[:, [0, 2]]).any()
    fg, bg = ref.fb_global_matching(q, r, lab, 3, torch.zeros(3, dtype=DT))
    assert torch.isnan(fg[:, 1]).all() and not torch.isnan(fg[:, [0, 2]]).any()
    assert torch.isnan(bg[:, [0, 2]]).all() and not torch.isnan(bg[:, 1]).any()


def test_float32_in_float32_out(gen):
    q = torch.randn(1, 3, 4, 3, generator=gen)
    r = torch.randn(1, 2, 3, 4, 3, generator=gen)
    lab = torch.randint(-1, 3, (1, 2, 3, 4), generator=gen)
    fg, bg = ref.fb_global_matching(q, r, lab, 3, torch.zeros(3))
    assert fg.dtype == torch.float32 and bg.dtype == torch.float32
    fg, bg = ref.fb_multi_local_matching(q, q.flip(1), lab[:, 0], 3, [1, 2], torch.zeros(3))
    assert fg.dtype == torch.float32
    assert ref.fb_instance_pooling(q, lab[:, 0], 3).dtype == torch.float32


# --------------------------------------------------------------- local matching
@pytest.mark.parametrize("rate", [1, 2, 3])
@pytest.mark.parametrize("windows", [[1], [1, 2, 4], [2, 3, 7]])
@pytest.mark.parametrize("L", [1, 3])
def test_fb_multi_local_matching_matches_oracle(gen, rate, windows, L):
    # 4x5 frames: window 7 is larger than the frame.
    B, H, W, C = 2, 4, 5, 3
    q = _emb(gen, (B, H, W, C))
    p = _emb(gen, (B, H, W, C))
    lab = _labels(gen, (B, H, W), L)
    bias = torch.randn(L, generator=gen, dtype=DT)
    sq, ix = oracle.local_nearest(q, p, lab, L, windows, rate)
    want_fg, want_bg = oracle.fb(sq, ix, bias)
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
def test_local_ties_pick_lowest_index(gen, rate):
    q = _emb(gen, (1, 5, 5, 2), integer=True)
    p = _emb(gen, (1, 5, 5, 2), integer=True)
    lab = _labels(gen, (1, 5, 5), 3)
    windows = [1, 2, 3]
    sq, ix = oracle.local_nearest(q, p, lab, 3, windows, rate)
    fg, bg, index = ref.fb_multi_local_matching(q, p, lab, 3, windows, torch.zeros(3, dtype=DT),
                                                atrous_rate=rate, return_index=True)
    assert torch.equal(index, ix)
    want_fg, _ = oracle.fb(sq, ix, torch.zeros(3, dtype=DT))
    torch.testing.assert_close(fg, want_fg, rtol=0, atol=1e-15)


# ------------------------------------------------------------- instance pooling
@pytest.mark.parametrize("L", [1, 3, 5])
def test_fb_instance_pooling_matches_oracle(gen, L):
    emb = _emb(gen, (2, 4, 5, 3))
    lab = _labels(gen, (2, 4, 5), L)
    got = ref.fb_instance_pooling(emb, lab, L)
    assert got.shape == (2, L, 2, 3) and got.dtype == DT
    torch.testing.assert_close(got, oracle.pooling(emb, lab, L), rtol=1e-12, atol=1e-12)


# -------------------------------------------------------------------- gradients
def test_gradient_of_min_flows_to_argmin(gen):
    q = _emb(gen, (2, 3, 4, 3)).requires_grad_()
    r = _emb(gen, (2, 2, 3, 3, 3)).requires_grad_()
    lab = _labels(gen, (2, 2, 3, 3), 4)
    w = torch.randn(2, 4, 3, 4, generator=gen, dtype=DT)
    sq, ix = ref.labelled_nearest_sqdist(q, r, lab, 4)
    (torch.where(ix >= 0, sq, torch.zeros_like(sq)) * w).sum().backward()
    gq, gr = oracle.sqdist_backward(w.reshape(2, 4, 12), q.reshape(2, 12, 3), r.reshape(2, 18, 3),
                                    ix.reshape(2, 4, 12))
    torch.testing.assert_close(q.grad, gq.view_as(q))
    torch.testing.assert_close(r.grad, gr.view_as(r))


@pytest.mark.parametrize("rate", [1, 2])
def test_gradcheck_global(gen, rate):
    lab = torch.tensor([[[[0, 1, 2], [1, 0, 2], [2, 1, 0]], [[1, 1, 0], [-1, 2, 0], [0, 2, 1]]]])
    lab3 = lab.clamp_min(0)
    # minima separated by more than a finite difference moves them (oracle.fb_min_gap)
    q, r, bias = oracle.draw_separated(
        lambda: (3 * _emb(gen, (1, 2, 3, 2)), 3 * _emb(gen, (1, 2, 3, 3, 2)),
                 torch.randn(4, generator=gen, dtype=DT)),  # label 3 empty
        lambda q, r, b: min(oracle.fb_min_gap(*oracle.global_candidates(q, r, lab, 4, rate), b),
                            oracle.fb_min_gap(*oracle.global_candidates(q, r, lab3, 3, rate), None)))
    q, r, bias = q.requires_grad_(), r.requires_grad_(), bias.requires_grad_()
    fn = lambda q, r, b: ref.fb_global_matching(q, r, lab, 4, b, atrous_rate=rate)
    assert torch.autograd.gradcheck(fn, (q, r, bias))
    fn2 = lambda q, r: ref.labelled_nearest_sqdist(q, r, lab3, 3, atrous_rate=rate)[0]
    assert torch.autograd.gradcheck(fn2, (q, r))


@pytest.mark.parametrize("rate", [1, 2])
def test_gradcheck_local(gen, rate):
    lab = _labels(gen, (1, 4, 4), 4)
    q, p, bias = oracle.draw_separated(
        lambda: (3 * _emb(gen, (1, 4, 4, 2)), 3 * _emb(gen, (1, 4, 4, 2)), torch.randn(4, generator=gen, dtype=DT)),
        lambda q, p, b: oracle.fb_min_gap(*oracle.local_candidates(q, p, lab, 4, [1, 2], rate), b))
    q, p, bias = q.requires_grad_(), p.requires_grad_(), bias.requires_grad_()
    fn = lambda q, p, b: ref.fb_multi_local_matching(q, p, lab, 4, [1, 2], b, atrous_rate=rate)
    assert torch.autograd.gradcheck(fn, (q, p, bias))


def test_gradcheck_pooling(gen):
    emb = _emb(gen, (2, 3, 4, 2)).requires_grad_()
    lab = _labels(gen, (2, 3, 4), 3)
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
