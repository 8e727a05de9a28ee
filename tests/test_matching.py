"""The matching ops of the public API (CPU C++ kernels, and every backend that runs here)
against the float64 brute-force oracle of tests/oracle.py."""
import pytest
import torch

import oracle
import vos_kernels

ATOL = 2e-4  # float32 kernels vs float64 oracle, distances of order 2C


def rand(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen, dtype=dtype)


def labels(gen, L, *shape, ignore=True):
    lo = -1 if ignore else 0
    return torch.randint(lo, L, shape, generator=gen)


def assert_index_valid(index, sqdist_oracle, query, reference_flat, ref_labels_flat, valid_position=None):
    """index[b,l,...,p] must be -1 exactly where the oracle has no candidate, else point at a
    reference pixel of label l whose distance to query pixel p equals the oracle minimum."""
    empty = torch.isinf(sqdist_oracle)
    assert torch.equal(index < 0, empty)
    B, C = query.shape[0], query.shape[-1]
    q = query.double().reshape(B, -1, C)
    for b in range(B):
        ib = index[b].reshape(index.shape[1], -1, q.shape[1])  # [L, K, Nq]
        ob = sqdist_oracle[b].reshape(ib.shape)
        for l in range(ib.shape[0]):
            for k in range(ib.shape[1]):
                i = ib[l, k]
                ok = i >= 0
                p = torch.nonzero(ok).squeeze(1)
                n = i[ok]
                assert torch.all(ref_labels_flat[b][n] == l)
                d = ((q[b][p] - reference_flat[b].double()[n]) ** 2).sum(-1)
                torch.testing.assert_close(d, ob[l, k][ok], atol=ATOL, rtol=1e-5)
                if valid_position is not None:
                    assert valid_position(p, n, k).all()


# ---------------------------------------------------------------------------------------
# Global matching
# ---------------------------------------------------------------------------------------

GLOBAL_CASES = [  # (B, H, W, T, Hr, Wr, C, L, rate)
    (1, 6, 7, 1, 6, 7, 8, 3, 1),
    (2, 5, 9, 2, 7, 6, 5, 4, 2),
    (1, 8, 5, 1, 9, 11, 16, 2, 3),
    (2, 4, 4, 3, 5, 5, 33, 5, 2),
    (1, 7, 3, 1, 4, 8, 1, 1, 1),
]


@pytest.mark.parametrize("case", GLOBAL_CASES)
def test_global_matching_against_oracle(gen, case):
    B, H, W, T, Hr, Wr, C, L, rate = case
    q, r = rand(gen, B, H, W, C), rand(gen, B, T, Hr, Wr, C)
    lab = labels(gen, L + 1, B, T, Hr, Wr)
    lab[lab == L] = -1  # ignore pixels, and label L-1 may be rare
    bias = rand(gen, L)
    sq, idx = vos_kernels.labelled_nearest_sqdist(q, r, lab, L, rate)
    sq_o, idx_o = oracle.nearest(q, r, lab, L, rate)
    assert sq.dtype == torch.float32 and idx.dtype == torch.int64 and sq.shape == (B, L, H, W)
    torch.testing.assert_close(sq.double(), sq_o, atol=ATOL, rtol=1e-5)
    Wr_ = Wr

    def on_grid(p, n, k):
        return ((n // Wr_) % Hr % rate == 0) & (n % Wr_ % rate == 0)

    assert_index_valid(idx, sq_o, q, r.reshape(B, -1, C), lab.reshape(B, -1), on_grid)
    fg, bg = vos_kernels.fb_global_matching(q, r, lab, L, bias, rate)
    fg_o, bg_o = oracle.fb(sq_o, idx_o, bias)
    torch.testing.assert_close(fg.double(), fg_o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bg.double(), bg_o, atol=1e-5, rtol=1e-5)


def test_global_reference_without_time_axis(gen):
    q, r = rand(gen, 2, 5, 6, 4), rand(gen, 2, 5, 6, 4)
    lab = labels(gen, 3, 2, 5, 6)
    a = vos_kernels.labelled_nearest_sqdist(q, r, lab, 3)
    b = vos_kernels.labelled_nearest_sqdist(q, r[:, None], lab[:, None], 3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_global_empty_and_ignored_labels(gen):
    q, r = rand(gen, 1, 4, 5, 6), rand(gen, 1, 1, 4, 5, 6)
    lab = torch.full((1, 1, 4, 5), -1)
    lab[0, 0, 0, :3] = 2  # only label 2 present; 0, 1, 3 empty
    sq, idx = vos_kernels.labelled_nearest_sqdist(q, r, lab, 4)
    for l in (0, 1, 3):
        assert torch.isinf(sq[:, l]).all() and (idx[:, l] == -1).all()
    assert (idx[:, 2] >= 0).all() and (idx[:, 2] < 3).all()
    fg, bg = vos_kernels.fb_global_matching(q, r, lab, 4, torch.tensor([0.5, -0.3, -0.3, -0.3]))
    assert (fg[:, [0, 1, 3]] == 1.0).all()  # exactly 1 for empty labels
    assert (bg[:, [0, 1, 3]] == fg[:, 2]).all() and (bg[:, 2] == 1.0).all()
    lab.fill_(-1)  # nothing labelled at all
    fg, bg = vos_kernels.fb_global_matching(q, r, lab, 4, torch.zeros(4))
    assert (fg == 1.0).all() and (bg == 1.0).all()


def test_global_single_label(gen):
    q, r = rand(gen, 1, 3, 4, 5), rand(gen, 1, 3, 4, 5)
    lab = torch.zeros(1, 3, 4, dtype=torch.long)
    fg, bg = vos_kernels.fb_global_matching(q, r, lab, 1, torch.tensor([0.2]))
    assert fg.shape == (1, 1, 3, 4) and (bg == 1.0).all()
    sq_o, idx_o = oracle.nearest(q, r[:, None], lab[:, None], 1)
    torch.testing.assert_close(fg.double(), oracle.fb(sq_o, idx_o, torch.tensor([0.2]))[0], atol=1e-5, rtol=0)


def test_global_ties_pick_lowest_flat_index(gen):
    C = 4
    base = rand(gen, 3, C)
    # reference: rows 0..11 with duplicates of base vectors at several positions
    r = rand(gen, 1, 1, 3, 4, C) * 10
    r[0, 0, 0, 1] = base[0]
    r[0, 0, 2, 3] = base[0]  # later duplicate of the same vector, same label
    r[0, 0, 1, 0] = base[1]
    r[0, 0, 1, 2] = base[1]
    q = torch.stack([base[0], base[1], base[0] + 0.1]).reshape(1, 1, 3, C)
    lab = torch.ones(1, 1, 3, 4, dtype=torch.long)
    sq, idx = vos_kernels.labelled_nearest_sqdist(q, r, lab, 2)
    assert idx[0, 1, 0].tolist() == [1, 4, 1]
    assert 0 <= sq[0, 1, 0, 0] < 1e-5 and 0 <= sq[0, 1, 0, 1] < 1e-5  # |q|²+|r|²−2q·r, clamped at 0
    assert (idx[0, 0] == -1).all()


def test_global_several_reference_frames_index_spans_time(gen):
    q = rand(gen, 1, 2, 2, 3)
    r = rand(gen, 1, 3, 2, 2, 3) * 5
    r[0, 2, 1, 1] = q[0, 0, 0]  # exact match in the third frame
    lab = torch.zeros(1, 3, 2, 2, dtype=torch.long)
    _, idx = vos_kernels.labelled_nearest_sqdist(q, r, lab, 1)
    assert idx[0, 0, 0, 0] == 2 * 4 + 3


def test_global_non_contiguous_inputs(gen):
    B, H, W, C, L = 2, 5, 6, 7, 3
    q_cf = rand(gen, B, C, H, W)  # channels-first, as a conv produces it
    r_cf = rand(gen, B, C, H, W)
    lab = labels(gen, L, B, 2 * H, W)[:, ::2]  # strided labels
    q, r = q_cf.permute(0, 2, 3, 1), r_cf.permute(0, 2, 3, 1)
    assert not q.is_contiguous() and not lab.is_contiguous()
    bias = rand(gen, 2 * L)[::2]
    fg, bg = vos_kernels.fb_global_matching(q, r, lab, L, bias)
    fg_c, bg_c = vos_kernels.fb_global_matching(q.contiguous(), r.contiguous(), lab.contiguous(), L, bias.contiguous())
    assert torch.equal(fg, fg_c) and torch.equal(bg, bg_c)


def test_global_nan_propagates(gen):
    q, r = rand(gen, 1, 3, 4, 5), rand(gen, 1, 1, 3, 4, 5)
    lab = torch.tensor([0, 1, 2, -1] * 3).reshape(1, 1, 3, 4)
    q[0, 1, 2, 3] = float("nan")
    r[0, 0, 2, 1] = float("nan")  # a reference pixel of label 1
    sq, idx = vos_kernels.labelled_nearest_sqdist(q, r, lab, 3)
    assert torch.isnan(sq[0, :, 1, 2]).all()  # NaN query pixel: every label
    assert torch.isnan(sq[0, 1]).all()  # NaN reference pixel of label 1: every query
    expected = torch.full((3, 4), 9)
    expected[1, 2] = 1  # the NaN query pixel: its first distance to label 1 is already NaN
    assert torch.equal(idx[0, 1], expected)  # ... with the first NaN's index
    others = torch.ones(3, 4, dtype=torch.bool)
    others[1, 2] = False
    assert not torch.isnan(sq[0, 0][others]).any() and not torch.isnan(sq[0, 2][others]).any()
    fg, bg = vos_kernels.fb_global_matching(q, r, lab, 3, torch.zeros(3))
    assert torch.isnan(bg[0, 0]).all() and torch.isnan(bg[0, 2]).all()  # min over m != l sees fg[1] = NaN
    assert not torch.isnan(bg[0, 1][others]).any()


def test_global_overflowing_distances_are_not_silently_dropped(gen):
    """|q|^2 + |r|^2 overflows float32 here: the answer must be the oracle's or NaN, never
    a finite minimum taken over the other pixels."""
    q = rand(gen, 1, 2, 3, 1)
    r = rand(gen, 1, 1, 2, 8, 1)
    q[0, 0, 0, 0] = 1.5e19
    r[0, 0, 1, 5, 0] = 1.5e19  # the exact match of the huge query pixel
    lab = torch.zeros(1, 1, 2, 8, dtype=torch.long)
    sq, idx = vos_kernels.labelled_nearest_sqdist(q, r, lab, 1)
    got = sq[0, 0, 0, 0]
    assert torch.isnan(got) or (got == 0 and idx[0, 0, 0, 0] == 13)
    sq_o, _ = oracle.nearest(q, r, lab, 1)
    rest = torch.ones(2, 3, dtype=torch.bool)
    rest[0, 0] = False
    torch.testing.assert_close(sq[0, 0][rest].double(), sq_o[0, 0][rest], atol=ATOL, rtol=1e-5)


def test_global_int32_labels_and_float64(gen):
    q, r = rand(gen, 1, 4, 4, 3, dtype=torch.float64), rand(gen, 1, 4, 4, 3, dtype=torch.float64)
    lab = labels(gen, 3, 1, 4, 4).to(torch.int32)
    bias = torch.tensor([0.1, -0.2, -0.2], dtype=torch.float64)
    fg, bg = vos_kernels.fb_global_matching(q, r, lab, 3, bias)
    assert fg.dtype == torch.float64
    sq_o, idx_o = oracle.nearest(q, r[:, None], lab[:, None], 3)
    fg_o, bg_o = oracle.fb(sq_o, idx_o, bias)
    torch.testing.assert_close(fg, fg_o, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(bg, bg_o, atol=1e-12, rtol=1e-12)


def test_global_deterministic(gen):
    q, r = rand(gen, 1, 20, 30, 16), rand(gen, 1, 2, 20, 30, 16)
    lab = labels(gen, 4, 1, 2, 20, 30)
    a = vos_kernels.fb_global_matching(q, r, lab, 4, torch.zeros(4), 2)
    b = vos_kernels.fb_global_matching(q, r, lab, 4, torch.zeros(4), 2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_global_large_enough_for_several_tiles(gen):
    """More queries and reference pixels than one GEMM tile holds (256 x 1024)."""
    q, r = rand(gen, 1, 23, 25, 4), rand(gen, 1, 1, 41, 60, 4)
    lab = labels(gen, 3, 1, 1, 41, 60)
    sq, _ = vos_kernels.labelled_nearest_sqdist(q, r, lab, 3)
    sq_o, _ = oracle.nearest(q, r, lab, 3)
    torch.testing.assert_close(sq.double(), sq_o, atol=ATOL, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# Multi-local matching
# ---------------------------------------------------------------------------------------

LOCAL_CASES = [  # (B, H, W, C, L, windows, rate)
    (1, 6, 7, 8, 3, [1, 2, 3], 1),
    (2, 7, 9, 5, 4, [2, 4, 6], 2),
    (1, 9, 8, 16, 2, [1, 3, 4, 7], 3),
    (1, 4, 5, 3, 3, [1, 20], 1),  # window larger than the frame
    (2, 5, 5, 33, 1, [2], 2),
    (1, 6, 4, 4, 3, [1, 2], 3),  # windows smaller than the rate: only the centre
]


@pytest.mark.parametrize("case", LOCAL_CASES)
def test_local_matching_against_oracle(gen, case):
    B, H, W, C, L, windows, rate = case
    q, p = rand(gen, B, H, W, C), rand(gen, B, H, W, C)
    lab = labels(gen, L, B, H, W)
    bias = rand(gen, L)
    fg, bg = vos_kernels.fb_multi_local_matching(q, p, lab, L, windows, bias, rate)
    assert fg.shape == (B, L, len(windows), H, W) and fg.dtype == torch.float32
    sq_o, idx_o = oracle.local_nearest(q, p, lab, L, windows, rate)
    fg_o, bg_o = oracle.fb(sq_o, idx_o, bias)
    torch.testing.assert_close(fg.double(), fg_o, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bg.double(), bg_o, atol=1e-5, rtol=1e-5)
    # The op's third output is the argmin index (saved for backward).
    _, _, idx = torch.ops.vos_kernels.fb_multi_local_matching(q, p, lab, L, windows, bias, rate)

    def in_window(pix, n, k):
        dy, dx = n // W - pix // W, n % W - pix % W
        w = windows[k]
        return (dy.abs() <= w) & (dx.abs() <= w) & (dy % rate == 0) & (dx % rate == 0)

    assert_index_valid(idx, sq_o, q, p.reshape(B, -1, C), lab.reshape(B, -1), in_window)


def test_local_borders_and_empty_windows(gen):
    H, W = 5, 6
    q, p = rand(gen, 1, H, W, 4), rand(gen, 1, H, W, 4)
    lab = torch.full((1, H, W), -1)
    lab[0, 0, 0] = 1  # a single labelled pixel in the corner
    bias = torch.full((2,), -100.0)  # keeps tanh away from saturation wherever a pixel matches
    fg, bg = vos_kernels.fb_multi_local_matching(q, p, lab, 2, [1, 2, 4], bias)
    assert (fg[0, 0] == 1.0).all()  # background never present
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    for k, w in enumerate([1, 2, 4]):
        reach = (ys <= w) & (xs <= w)
        assert (fg[0, 1, k][~reach] == 1.0).all()
        assert (fg[0, 1, k][reach] < 1.0).all()


def test_local_windows_are_monotone(gen):
    q, p = rand(gen, 1, 8, 8, 6), rand(gen, 1, 8, 8, 6)
    lab = labels(gen, 3, 1, 8, 8)
    fg, _ = vos_kernels.fb_multi_local_matching(q, p, lab, 3, [1, 2, 3, 5], torch.zeros(3), 1)
    assert (fg[:, :, 1:] <= fg[:, :, :-1]).all()  # a larger window can only lower the min


def test_local_ties_pick_lowest_flat_index(gen):
    H, W, C = 5, 5, 3
    q = rand(gen, 1, H, W, C)
    p = rand(gen, 1, H, W, C) * 10
    v = q[0, 2, 2].clone()
    p[0, 1, 3] = v  # flat 8
    p[0, 3, 1] = v  # flat 16
    p[0, 2, 2] = v  # flat 12 (centre)
    lab = torch.zeros(1, H, W, dtype=torch.long)
    _, _, idx = torch.ops.vos_kernels.fb_multi_local_matching(q, p, lab, 1, [0 + 1, 2], torch.zeros(1), 1)
    assert idx[0, 0, 0, 2, 2] == 8 and idx[0, 0, 1, 2, 2] == 8
    _, _, idx = torch.ops.vos_kernels.fb_multi_local_matching(q, p, lab, 1, [1], torch.zeros(1), 2)
    assert idx[0, 0, 0, 2, 2] == 12  # rate 2: offsets (±1) are off the grid


def test_local_nan_propagates(gen):
    q, p = rand(gen, 1, 6, 6, 4), rand(gen, 1, 6, 6, 4)
    lab = torch.zeros(1, 6, 6, dtype=torch.long)
    lab[0, :, 3:] = 1
    p[0, 0, 0] = float("nan")  # label 0, corner
    fg, bg = vos_kernels.fb_multi_local_matching(q, p, lab, 2, [1, 3], torch.zeros(2))
    near = torch.zeros(6, 6, dtype=torch.bool)
    near[:2, :2] = True
    assert torch.isnan(fg[0, 0, 0][near]).all() and not torch.isnan(fg[0, 0, 0][~near]).any()
    assert torch.isnan(bg[0, 1, 0][near]).all()
    assert not torch.isnan(fg[0, 1]).any()


def test_local_non_contiguous(gen):
    q = rand(gen, 1, 5, 6, 7).permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    p = rand(gen, 1, 6, 5, 7).transpose(1, 2)
    lab = labels(gen, 3, 1, 6, 5).transpose(1, 2)
    a = vos_kernels.fb_multi_local_matching(q, p, lab, 3, [1, 2], torch.zeros(3))
    b = vos_kernels.fb_multi_local_matching(q.contiguous(), p.contiguous(), lab.contiguous(), 3, [1, 2], torch.zeros(3))
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------
# Instance pooling
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("L", [1, 3, 6])
def test_instance_pooling_against_oracle(gen, L):
    e = rand(gen, 2, 5, 7, 9)
    lab = labels(gen, L, 2, 5, 7)
    lab[1, :, :] = torch.where(lab[1] == L - 1, torch.zeros_like(lab[1]), lab[1])  # an empty label
    out = vos_kernels.fb_instance_pooling(e, lab, L)
    assert out.shape == (2, L, 2, 9) and out.dtype == torch.float32
    torch.testing.assert_close(out.double(), oracle.pooling(e, lab, L), atol=1e-5, rtol=1e-5)


def test_instance_pooling_nan_and_empty(gen):
    e = rand(gen, 1, 4, 4, 3)
    lab = torch.zeros(1, 4, 4, dtype=torch.long)
    lab[0, 0, 0] = 1
    e[0, 0, 0, 1] = float("nan")
    out = vos_kernels.fb_instance_pooling(e, lab, 3)
    assert torch.isnan(out[0, 1, 0, 1]) and torch.isnan(out[0, 0, 1, 1])
    assert not torch.isnan(out[0, 1, 0, [0, 2]]).any()
    assert (out[0, 2, 0] == 0).all()  # empty label: zero mean, not NaN


# ---------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------


def test_fb_min_gap_sees_near_ties():
    """The guard of the gradchecks below: it measures both minima fb matching takes."""
    q = torch.zeros(1, 1, 1, 2, dtype=torch.float64)
    r = torch.tensor([[[[[1.0, 0.0], [0.0, 1.0 + 1e-7], [3.0, 0.0]]]]], dtype=torch.float64)  # sqdist 1, 1+2e-7, 9
    bias = torch.zeros(2, dtype=torch.float64)
    gap = oracle.fb_min_gap(*oracle.global_candidates(q, r, torch.tensor([[[[0, 0, 1]]]]), 2), bias)
    assert gap == pytest.approx(2e-7, rel=1e-3)                      # two candidates of label 0
    gap = oracle.fb_min_gap(*oracle.global_candidates(q, r, torch.tensor([[[[0, 1, 1]]]]), 2), bias)
    assert gap == pytest.approx(2e-7, rel=1e-3)                      # label 0 at 1, label 1 at 1 + 2e-7
    gap = oracle.fb_min_gap(*oracle.global_candidates(q, r, torch.tensor([[[[0, 1, 1]]]]), 2),
                            torch.tensor([0.0, 0.5], dtype=torch.float64))
    assert gap == pytest.approx(0.5, rel=1e-3)                       # bias separates the labels
    draws = iter([(0.0,), (1.0,)])
    assert oracle.draw_separated(lambda: next(draws), lambda x: x) == (1.0,)
    with pytest.raises(AssertionError, match="separated"):
        oracle.draw_separated(lambda: (0.0,), lambda x: x, tries=3)



def test_kink_margin_sees_kinks():
    """The guard of the gradchecks through ReLUs, minima and top-k (oracle.kink_margin)."""
    f64 = dict(dtype=torch.float64)
    km = oracle.kink_margin
    x = torch.tensor([0.5, -3e-7, 2.0, 0.0], **f64)   # the exact 0 is a structural tie: skipped
    assert km(torch.relu, x) == (pytest.approx(3e-7), "aten.relu.default")
    assert km(lambda t: torch.nn.functional.relu(t.clone(), inplace=True), x)[0] == pytest.approx(3e-7)
    # gradcheck does straddle that kink, and does not once it is 1e-4 away
    assert not torch.autograd.gradcheck(torch.relu, (x[:3].clone().requires_grad_(),), raise_exception=False)
    assert torch.autograd.gradcheck(torch.relu, (torch.tensor([0.5, -1e-4, 2.0], **f64, requires_grad=True),))
    t = torch.tensor([7.0, 7.0, 7.0 + 3e-7, 9.0], **f64)   # a tie of equals, then a distinct value
    assert km(lambda a: a.amin(0), t)[0] == pytest.approx(3e-7, rel=1e-6)
    assert km(lambda a: a.max(), t)[0] == pytest.approx(2 - 3e-7)
    rows = torch.tensor([[1.0, 2.0], [1.0 + 1e-6, 5.0]], **f64)
    assert km(lambda a: a.min(dim=0), rows) == (pytest.approx(1e-6, rel=1e-6), "aten.min.dim")
    assert km(lambda a: a.max(dim=1), rows)[0] == pytest.approx(1.0)
    assert km(lambda a: a.clamp(min=0.5), torch.tensor([3.0, 0.5 + 2e-6], **f64))[0] == pytest.approx(2e-6, rel=1e-6)
    assert km(torch.maximum, rows[0], rows[1])[0] == pytest.approx(1e-6, rel=1e-6)
    assert km(lambda a: a.topk(2), torch.tensor([3.0, 2.9, 1.0, 2.95], **f64))[0] == pytest.approx(0.05)
    assert km(lambda a: (a * a).sum().tanh(), rows) == (float("inf"), None)
    with pytest.raises(NotImplementedError, match="max_pool2d"):
        km(lambda a: torch.nn.functional.max_pool2d(a, 2), torch.randn(1, 1, 4, 4, **f64))
    # this project's ops, measured on their distances / affinities
    q = torch.zeros(1, 1, 1, 2, **f64)
    r = torch.tensor([[[[[1.0, 0.0], [0.0, 1.0 + 1e-7], [3.0, 0.0]]]]], **f64)   # sqdist 1, 1+2e-7, 9
    lab = torch.tensor([[[[0, 0, 1]]]])
    bias = torch.zeros(2, **f64)
    assert km(lambda a, b: vos_kernels.fb_global_matching(a, b, lab, 2, bias), q, r) == (
        pytest.approx(2e-7, rel=1e-3), "vos_kernels.fb_global_matching.default")
    assert km(lambda a, b: vos_kernels.labelled_nearest_sqdist(a, b, lab, 2), q, r)[0] == pytest.approx(2e-7, rel=1e-3)
    assert km(lambda a, b: vos_kernels.labelled_nearest_sqdist(a, b, torch.tensor([[[[0, 1, 1]]]]), 2), q, r)[0] == pytest.approx(8 - 2e-7)
    qk = torch.tensor([[[1.0, 0.0]]], **f64)
    mk = torch.tensor([[[1.0, 0.0], [1.0 + 1e-7, 0.0], [-1.0, 0.0]]], **f64)      # affinities 1, 1-1e-14, -3 (x 1/sqrt(2))
    mv = torch.randn(1, 3, 2, **f64)
    assert km(lambda a, b, c: vos_kernels.topk_memory_read(a, b, c, 1), qk, mk, mv)[0] < 1e-13
    mk[0, 1, 0] = 0.5                                                              # affinity 0.75
    assert km(lambda a, b, c: vos_kernels.topk_memory_read(a, b, c, 1), qk, mk, mv)[0] == pytest.approx(0.25 / 2**0.5)


def test_gradcheck_global(gen):
    bias = rand(gen, 3, dtype=torch.float64).requires_grad_()
    # minima separated by more than a finite difference moves them (oracle.fb_min_gap)
    q, r, lab = oracle.draw_separated(
        lambda: (rand(gen, 1, 3, 3, 4, dtype=torch.float64), rand(gen, 1, 2, 3, 3, 4, dtype=torch.float64),
                 labels(gen, 3, 1, 2, 3, 3)),
        lambda q, r, lab: min(oracle.fb_min_gap(*oracle.global_candidates(q, r, lab, 3, rate), bias)
                              for rate in (1, 2)))
    q, r = q.requires_grad_(), r.requires_grad_()
    torch.autograd.gradcheck(lambda q, r, b: vos_kernels.fb_global_matching(q, r, lab, 3, b, 1), (q, r, bias))
    torch.autograd.gradcheck(lambda q, r: vos_kernels.labelled_nearest_sqdist(q, r, lab, 3, 2)[0].nan_to_num(posinf=0.0), (q, r))


def test_gradcheck_local(gen):
    bias = rand(gen, 3, dtype=torch.float64).requires_grad_()
    q, p, lab = oracle.draw_separated(
        lambda: (rand(gen, 1, 4, 4, 3, dtype=torch.float64), rand(gen, 1, 4, 4, 3, dtype=torch.float64),
                 labels(gen, 3, 1, 4, 4)),
        lambda q, p, lab: min(oracle.fb_min_gap(*oracle.local_candidates(q, p, lab, 3, w, rate), bias)
                              for w, rate in (([1, 2], 1), ([2], 2))))
    q, p = q.requires_grad_(), p.requires_grad_()
    torch.autograd.gradcheck(lambda q, p, b: vos_kernels.fb_multi_local_matching(q, p, lab, 3, [1, 2], b, 1), (q, p, bias))
    torch.autograd.gradcheck(lambda q, p, b: vos_kernels.fb_multi_local_matching(q, p, lab, 3, [2], b, 2), (q, p, bias))


def test_gradcheck_pooling(gen):
    e = rand(gen, 2, 3, 4, 5, dtype=torch.float64).requires_grad_()
    lab = labels(gen, 3, 2, 3, 4)
    torch.autograd.gradcheck(lambda e: vos_kernels.fb_instance_pooling(e, lab, 3), (e,))


def test_float32_gradients_match_oracle_autograd(gen):
    """Gradients of the float32 kernels against torch autograd through the float64 oracle."""
    q = rand(gen, 1, 5, 6, 8).requires_grad_()
    r = rand(gen, 1, 1, 5, 6, 8).requires_grad_()
    p = rand(gen, 1, 5, 6, 8).requires_grad_()
    lab_r, lab_p = labels(gen, 3, 1, 1, 5, 6), labels(gen, 3, 1, 5, 6)
    bias = rand(gen, 3).requires_grad_()
    w1, w2 = rand(gen, 1, 3, 5, 6), rand(gen, 1, 3, 2, 5, 6)
    fg, bg = vos_kernels.fb_global_matching(q, r, lab_r, 3, bias)
    lfg, lbg = vos_kernels.fb_multi_local_matching(q, p, lab_p, 3, [1, 2], bias)
    ((fg + 0.5 * bg) * w1).sum().add(((lfg - lbg) * w2).sum()).backward()
    qd, rd, pd, bd = (t.detach().double().requires_grad_() for t in (q, r, p, bias))
    ofg, obg = oracle.fb(*oracle.nearest(qd, rd, lab_r, 3), bd)
    olfg, olbg = oracle.fb(*oracle.local_nearest(qd, pd, lab_p, 3, [1, 2]), bd)
    ((ofg + 0.5 * obg) * w1).sum().add(((olfg - olbg) * w2).sum()).backward()
    for ours, theirs in ((q, qd), (r, rd), (p, pd), (bias, bd)):
        torch.testing.assert_close(ours.grad.double(), theirs.grad, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------
# opcheck, torch.compile, backends
# ---------------------------------------------------------------------------------------


def _samples(gen, dtype=torch.float32):
    q = rand(gen, 1, 4, 5, 6, dtype=dtype)
    r = rand(gen, 1, 2, 4, 5, 6, dtype=dtype)
    p = rand(gen, 1, 4, 5, 6, dtype=dtype)
    lr, lp = labels(gen, 3, 1, 2, 4, 5), labels(gen, 3, 1, 4, 5)
    bias = rand(gen, 3, dtype=dtype)
    return q, r, p, lr, lp, bias


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(gen, requires_grad):
    q, r, p, lr, lp, bias = _samples(gen, torch.float64)
    for t in (q, r, p, bias):
        t.requires_grad_(requires_grad)
    ops = torch.ops.vos_kernels
    torch.library.opcheck(ops.labelled_nearest_sqdist.default, (q, r, lr, 3, 2))
    torch.library.opcheck(ops.fb_global_matching.default, (q, r, lr, 3, bias, 1))
    torch.library.opcheck(ops.fb_multi_local_matching.default, (q, p, lp, 3, [1, 2], bias, 1))
    torch.library.opcheck(ops.fb_instance_pooling.default, (q, lp, 3))
    idx = ops.fb_multi_local_matching(q, p, lp, 3, [1, 2], bias, 1)[2].reshape(1, 6, -1)
    torch.library.opcheck(ops.nearest_sqdist_backward.default,
                          (rand(gen, 1, 6, 20, dtype=torch.float64), q.detach().reshape(1, 20, 6),
                           p.detach().reshape(1, 20, 6), idx))


def test_torch_compile(gen):
    q, r, p, lr, lp, bias = _samples(gen)

    def head(q, r, p, bias):
        fg, bg = vos_kernels.fb_global_matching(q, r, lr, 3, bias, 2)
        lfg, lbg = vos_kernels.fb_multi_local_matching(q, p, lp, 3, [1, 2], bias)
        pooled = vos_kernels.fb_instance_pooling(q, lp, 3)
        return torch.cat([fg, bg, lfg.flatten(1, 2), lbg.flatten(1, 2)], 1).relu().sum() + pooled.sum()

    compiled = torch.compile(head, fullgraph=True, backend="aot_eager")
    args = [t.clone().requires_grad_() for t in (q, r, p, bias)]
    args_c = [t.clone().requires_grad_() for t in (q, r, p, bias)]
    head(*args).backward()
    out_c = compiled(*args_c)
    out_c.backward()
    torch.testing.assert_close(out_c, head(*args).detach())
    for a, b in zip(args, args_c):
        torch.testing.assert_close(a.grad, b.grad)


def test_backends_listed_and_reference_agrees(gen):
    assert "cpu" in vos_kernels.available_backends()
    assert "reference" in vos_kernels.available_backends()
    q, r, p, lr, lp, bias = _samples(gen)
    fused = vos_kernels.fb_global_matching(q, r, lr, 3, bias, 2)
    fused_local = vos_kernels.fb_multi_local_matching(q, p, lp, 3, [1, 2], bias, 2)
    vos_kernels.set_backend("reference")
    ref = vos_kernels.fb_global_matching(q, r, lr, 3, bias, 2)
    ref_local = vos_kernels.fb_multi_local_matching(q, p, lp, 3, [1, 2], bias, 2)
    for a, b in zip(fused + fused_local, ref + ref_local):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="backend"):
        vos_kernels.set_backend("tpu")


def test_triton_backend_under_interpreter(gen):
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("covered by the CUDA tests")
    q, r, p, lr, lp, bias = _samples(gen)
    q.requires_grad_()
    cpu = vos_kernels.fb_global_matching(q, r, lr, 3, bias, 2)
    cpu_local = vos_kernels.fb_multi_local_matching(q, p, lp, 3, [1, 2], bias, 2)
    g_cpu = torch.autograd.grad(cpu[0].sum() + cpu_local[1].sum(), q)[0]
    vos_kernels.set_backend("triton")
    tri = vos_kernels.fb_global_matching(q, r, lr, 3, bias, 2)
    tri_local = vos_kernels.fb_multi_local_matching(q, p, lp, 3, [1, 2], bias, 2)
    g_tri = torch.autograd.grad(tri[0].sum() + tri_local[1].sum(), q)[0]
    for a, b in zip(cpu + cpu_local, tri + tri_local):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(g_cpu, g_tri, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(vos_kernels.fb_instance_pooling(q.detach(), lp, 3),
                               torch.ops.vos_kernels.fb_instance_pooling(q.detach(), lp, 3), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------


def _bad_cases(gen):
    q, r, p, lr, lp, bias = _samples(gen)
    g = vos_kernels.fb_global_matching
    lm = vos_kernels.fb_multi_local_matching
    meta = torch.empty(1, 2, 4, 5, 6, device="meta")
    return [
        ("query", lambda: g(q[0], r, lr, 3, bias)),  # wrong rank
        ("reference", lambda: g(q, r[..., :5], lr, 3, bias)),  # channel mismatch
        ("reference", lambda: g(q, meta, lr, 3, bias)),  # device mix
        ("reference_labels", lambda: g(q, r, lr + 1, 3, bias)),  # label >= num_labels
        ("reference_labels", lambda: g(q, r, lr - 1, 3, bias)),  # label < -1
        ("reference_labels", lambda: g(q, r, lr.float(), 3, bias)),
        ("reference_labels", lambda: g(q, r, lr[:, :1], 3, bias)),
        ("bias", lambda: g(q, r, lr, 3, bias[:2])),
        ("atrous_rate", lambda: g(q, r, lr, 3, bias, 0)),
        ("num_labels", lambda: g(q, r, lr, 0, bias)),
        ("query", lambda: g(q.half(), r.half(), lr, 3, bias)),  # half on CPU
        ("windows", lambda: lm(q, p, lp, 3, [2, 1], bias)),
        ("windows", lambda: lm(q, p, lp, 3, [], bias)),
        ("windows", lambda: lm(q, p, lp, 3, [0, 1], bias)),
        ("atrous_rate", lambda: lm(q, p, lp, 3, [1, 2], bias, 0)),
        ("previous", lambda: lm(q, p[:, :3], lp, 3, [1], bias)),
        ("previous_labels", lambda: lm(q, p, lp + 3, 3, [1], bias)),
        ("labels", lambda: vos_kernels.fb_instance_pooling(q, lp[:, :2], 3)),
        ("embedding", lambda: vos_kernels.fb_instance_pooling(q.int(), lp, 3)),
    ], (q, r, p, lr, lp, bias)


def test_bad_input_raises_value_error_naming_the_argument(gen):
    cases, tensors = _bad_cases(gen)
    before = [t.clone() for t in tensors]
    for name, call in cases:
        with pytest.raises(ValueError, match=rf"^{name}: expected"):
            call()
    for b, t in zip(before, tensors):
        assert torch.equal(b, t)  # nothing written


def test_direct_op_calls_with_bad_labels_raise_not_crash(gen):
    q, r, p, lr, lp, bias = _samples(gen)
    with pytest.raises(RuntimeError, match="num_labels"):
        torch.ops.vos_kernels.labelled_nearest_sqdist(q, r, lr + 5, 3, 1)
    with pytest.raises(RuntimeError, match="windows"):
        torch.ops.vos_kernels.fb_multi_local_matching(q, p, lp, 3, [3, 3], bias, 1)


def test_import_without_compiled_library_falls_back_cleanly():
    """A missing extension never breaks `import vos_kernels`: only 'reference' is available,
    fused calls raise a clear RuntimeError, and the reference backend still runs."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import sys
        sys.modules["vos_kernels._C"] = None  # the extension fails to import
        import torch, vos_kernels
        assert vos_kernels.available_backends() == ["reference"], vos_kernels.available_backends()
        q = torch.randn(1, 3, 4, 5); lab = torch.randint(0, 2, (1, 3, 4))
        try:
            vos_kernels.fb_global_matching(q, q, lab, 2, [0.0, 0.0])
        except RuntimeError as e:
            assert "not loaded" in str(e)
        else:
            raise AssertionError("expected RuntimeError")
        vos_kernels.set_backend("reference")
        fg, bg = vos_kernels.fb_global_matching(q, q, lab, 2, [0.0, 0.0])
        assert fg.shape == (1, 2, 3, 4)
        print("ok")
    """)
    env = {k: v for k, v in __import__("os").environ.items() if k != "VOS_KERNELS_LIBRARY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
