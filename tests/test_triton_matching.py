"""Tests of the Triton matching kernels (vos_kernels/triton/matching.py).

Every entry point is compared, on fresh random inputs (the ``gen`` fixture of
conftest.py), with the float64 brute-force oracle of tests/oracle.py: full query x
reference distance matrix, candidate masks, and the exact sequential update rule of
docs/internals.md (``oracle.seq_min``, NaN-aware). Without CUDA the kernels run under the
Triton interpreter (TRITON_INTERPRET=1 on CPU tensors, set by conftest.py before triton
is imported), so shapes are small.
"""

import pytest
import torch

import oracle
from vos_kernels.triton import matching as tm

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
RTOL = 1e-4
ATOL = 1e-4
MARGIN = 1e-3     # oracle minimum "unique by a margin": no other candidate within this


def randn(g, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=g).to(dtype).to(DEV)


def randint(g, lo, hi, *shape, dtype=torch.int64):
    return torch.randint(lo, hi, shape, generator=g).to(dtype).to(DEV)


def noncontig_image(t):
    """Same values as t [B,H,W,C] with channels-first strides (a permuted view)."""
    v = t.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    assert not v.is_contiguous()
    return v


def host(*ts):
    return [t.detach().cpu() for t in ts]


# ----------------------------------------------------------------------------------------
# float64 oracle (tests/oracle.py), flattened to P query pixels
# ----------------------------------------------------------------------------------------


def oracle_global(query, reference, labels, L, rate):
    """-> (val [B,L,P], idx [B,L,P], D [B,1,P,N], cand [B,L,1,N])."""
    D, cand = oracle.global_candidates(*host(query, reference, labels), L, rate)
    return (*oracle.seq_min(D, cand), D, cand)


def oracle_local(query, previous, labels, L, windows, rate):
    """-> (val [B,L,K,P], idx [B,L,K,P], D [B,1,1,P,N], cand [B,L,K,P,N])."""
    D, cand = oracle.local_candidates(*host(query, previous, labels), L, windows, rate)
    return (*oracle.seq_min(D, cand), D, cand)


def check_min(val, idx, ov, oi, D, cand, exact=False):
    """Kernel (val, idx) against oracle (ov, oi); D/cand broadcast to [..., P, N].

    val may be None (multi-local returns no sqdist): then only the index is checked.
    """
    idx = idx.detach().cpu().reshape(oi.shape)
    assert idx.dtype == torch.int64
    if val is not None:
        val = val.detach().cpu().reshape(ov.shape)
        assert val.dtype == torch.float32
        torch.testing.assert_close(val.double(), ov, rtol=RTOL, atol=ATOL, equal_nan=True)
    assert torch.equal(idx < 0, oi < 0), "empty / non-empty mismatch"
    nan = torch.isnan(ov)
    assert torch.equal(idx[nan], oi[nan]), "first-NaN index mismatch"
    shape = torch.broadcast_shapes(D.shape, cand.shape)
    Df = D.expand(shape)
    cand = cand.expand(shape)
    ok = idx >= 0
    g = idx.clamp(min=0).unsqueeze(-1)
    assert cand.gather(-1, g).squeeze(-1)[ok].all(), "index is not a candidate"
    at = Df.gather(-1, g).squeeze(-1)
    fin = ok & ~nan
    torch.testing.assert_close(at[fin], ov[fin], rtol=RTOL, atol=ATOL)  # achieves the min
    near = (cand & (Df <= (ov + MARGIN).unsqueeze(-1))).sum(-1)
    uniq = fin & (near == 1)
    assert torch.equal(idx[uniq], oi[uniq]), "index differs where the minimum is unique"
    if exact:
        assert torch.equal(idx, oi)


def check_fgbg(fg, bg, efg, ebg):
    torch.testing.assert_close(fg.detach().cpu().double(), efg.reshape(fg.shape),
                               rtol=RTOL, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(bg.detach().cpu().double(), ebg.reshape(bg.shape),
                               rtol=RTOL, atol=1e-5, equal_nan=True)


# ----------------------------------------------------------------------------------------
# global matching
# ----------------------------------------------------------------------------------------


def global_inputs(g, B=2, T=2, H=6, W=7, Hr=6, Wr=8, C=16, L=4, lab_hi=None,
                  dtype=torch.float32, lab_dtype=torch.int64):
    q = randn(g, B, H, W, C, dtype=dtype)
    r = randn(g, B, T, Hr, Wr, C, dtype=dtype)
    hi = L - 1 if lab_hi is None else lab_hi       # default: label L-1 is empty
    lab = randint(g, -1, hi, B, T, Hr, Wr, dtype=lab_dtype)
    return q, r, lab


@pytest.mark.parametrize("rate", [1, 2, 3])
def test_global_sqdist_random(gen, rate):
    L = 4
    q, r, lab = global_inputs(gen, L=L)
    sq, idx = tm.labelled_nearest_sqdist(q, r, lab, L, rate, block_m=16, block_n=16)
    assert sq.shape == (2, L, 6, 7) and idx.shape == (2, L, 6, 7)
    ov, oi, D, cand = oracle_global(q, r, lab, L, rate)
    check_min(sq, idx, ov, oi, D, cand)
    assert (idx[:, L - 1] == -1).all() and torch.isinf(sq[:, L - 1]).all()   # empty label


def test_global_default_blocks_int32_labels_single_frame(gen):
    L = 3
    q, r, lab = global_inputs(gen, T=1, H=9, W=11, Hr=10, Wr=9, C=5, L=L, lab_hi=L,
                              lab_dtype=torch.int32)
    sq, idx = tm.labelled_nearest_sqdist(q, r, lab, L, 1)
    ov, oi, D, cand = oracle_global(q, r, lab, L, 1)
    check_min(sq, idx, ov, oi, D, cand)


def test_global_ties_lowest_index(gen):
    # small-integer embeddings: every distance is exact in fp32, so ties are real ties
    # and the index must be exactly the oracle's (lowest flat index) everywhere.
    B, T, H, W, Hr, Wr, C, L = 2, 2, 5, 6, 6, 7, 3, 3
    q = torch.randint(-2, 3, (B, H, W, C), generator=gen).float().to(DEV)
    r = torch.randint(-2, 3, (B, T, Hr, Wr, C), generator=gen).float()
    r[:, 1] = r[:, 0]                       # duplicate reference rows across frames
    r[:, 0, 3] = r[:, 0, 1]                 # and within a frame
    r = r.to(DEV)
    lab = randint(gen, -1, L, B, T, Hr, Wr)
    for rate in (1, 2):
        sq, idx = tm.labelled_nearest_sqdist(q, r, lab, L, rate, block_m=16, block_n=16)
        ov, oi, D, cand = oracle_global(q, r, lab, L, rate)
        check_min(sq, idx, ov, oi, D, cand, exact=True)
    # exact copies of query pixels in the reference: distance exactly 0, lowest index
    r2 = r.clone()
    r2[:, 0, 0, :W] = q[:, 0]
    r2[:, 1, 0, :W] = q[:, 0]
    lab2 = torch.zeros_like(lab)
    sq, idx = tm.labelled_nearest_sqdist(q, r2, lab2, 1, 1, block_m=16, block_n=16)
    ov, oi, D, cand = oracle_global(q, r2, lab2, 1, 1)
    check_min(sq, idx, ov, oi, D, cand, exact=True)
    assert (sq[:, 0, 0] == 0).all()
    assert torch.equal(idx[:, 0, 0].cpu(), oi.reshape(B, 1, H, W)[:, 0, 0])


def test_global_noncontiguous_and_channel_chunks(gen):
    # C = 144 > 128 exercises the chunked-C path (3 chunks of 64 with masking)
    L = 2
    B, T, H, W, Hr, Wr, C = 1, 2, 4, 5, 4, 4, 144
    q = noncontig_image(randn(gen, B, H, W, C))
    r = randn(gen, B, T, C, Hr, Wr).permute(0, 1, 3, 4, 2)
    lab = randint(gen, -1, L, B, T, Wr, Hr).transpose(2, 3)
    assert not r.is_contiguous() and not lab.is_contiguous()
    sq, idx = tm.labelled_nearest_sqdist(q, r, lab, L, 1, block_m=16, block_n=16)
    ov, oi, D, cand = oracle_global(q, r, lab, L, 1)
    check_min(sq, idx, ov, oi, D, cand)


def test_global_nan_propagates(gen):
    L = 3
    q, r, lab = global_inputs(gen, B=1, T=2, H=5, W=5, Hr=5, Wr=6, C=8, L=L, lab_hi=L)
    q[0, 2, 3, 1] = float("nan")            # one query pixel: all its labels NaN
    r[0, 1, 2, 2, 4] = float("nan")         # one reference pixel: NaN for its label
    lab[0, 1, 2, 2] = 1
    sq, idx = tm.labelled_nearest_sqdist(q, r, lab, L, 1, block_m=16, block_n=16)
    ov, oi, D, cand = oracle_global(q, r, lab, L, 1)
    check_min(sq, idx, ov, oi, D, cand)
    assert torch.isnan(sq[0, :, 2, 3]).all()
    assert torch.isnan(sq[0, 1]).all()      # every query sees the NaN reference pixel
    assert not torch.isnan(sq[0, 0]).all()
    bias = torch.tensor([-0.7, 0.3, 0.3], device=DEV)
    fg, bg, idx2 = tm.fb_global_matching(q, r, lab, L, bias, 1, block_m=16, block_n=16)
    assert torch.equal(idx, idx2)
    efg, ebg = oracle.fb(ov, oi, bias.cpu())
    check_fgbg(fg, bg, efg, ebg)
    assert torch.isnan(fg[0, 1]).all() and torch.isnan(bg[0, 0]).all()
    assert torch.isnan(bg[0, 2]).all()


@pytest.mark.parametrize("rate", [1, 2])
def test_fb_global_matching(gen, rate):
    L = 4
    q, r, lab = global_inputs(gen, L=L)   # label 3 empty
    bias = (torch.randn(L, generator=gen) * 0.5).to(DEV)
    fg, bg, idx = tm.fb_global_matching(q, r, lab, L, bias, rate, block_m=16, block_n=16)
    assert fg.shape == bg.shape == idx.shape == (2, L, 6, 7)
    assert fg.dtype == bg.dtype == torch.float32 and idx.dtype == torch.int64
    ov, oi, D, cand = oracle_global(q, r, lab, L, rate)
    efg, ebg = oracle.fb(ov, oi, bias.cpu())
    check_fgbg(fg, bg, efg, ebg)
    assert (fg[:, L - 1] == 1.0).all()      # empty label: exactly 1.0
    # deterministic: bitwise equal on a second run
    fg2, bg2, idx2 = tm.fb_global_matching(q, r, lab, L, bias, rate, block_m=16, block_n=16)
    assert torch.equal(fg, fg2) and torch.equal(bg, bg2) and torch.equal(idx, idx2)


def test_fb_global_single_label_and_all_empty(gen):
    q, r, lab = global_inputs(gen, B=1, T=1, H=4, W=5, Hr=4, Wr=4, C=6, L=1, lab_hi=1)
    bias = torch.tensor([0.25], device=DEV)
    fg, bg, idx = tm.fb_global_matching(q, r, lab, 1, bias, 1)
    ov, oi, D, cand = oracle_global(q, r, lab, 1, 1)
    efg, ebg = oracle.fb(ov, oi, bias.cpu())
    check_fgbg(fg, bg, efg, ebg)
    assert (bg == 1.0).all()
    # no labelled reference pixel at all: every fg and bg exactly 1.0, index -1
    lab_none = torch.full_like(lab, -1)
    fg, bg, idx = tm.fb_global_matching(q, r, lab_none, 3, torch.zeros(3, device=DEV), 1)
    assert (fg == 1.0).all() and (bg == 1.0).all() and (idx == -1).all()


def test_global_larger_default_blocks_mixed_dtypes(gen):
    # 12x12 query, 2 reference frames of 12x12, atrous 2, default 64x64 tiles; the
    # reference in float16 and the query in float32 (promoted to a common dtype)
    L = 4
    q, r, lab = global_inputs(gen, B=1, T=2, H=12, W=12, Hr=12, Wr=12, C=16, L=L, lab_hi=L)
    r = r.half()
    for rate in (1, 2):
        sq, idx = tm.labelled_nearest_sqdist(q, r, lab, L, rate)
        ov, oi, D, cand = oracle_global(q, r.float(), lab, L, rate)
        check_min(sq, idx, ov, oi, D, cand)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_global_half_inputs(gen, dtype):
    L = 3
    q, r, lab = global_inputs(gen, B=1, T=2, H=5, W=6, Hr=5, Wr=5, C=16, L=L, lab_hi=L,
                              dtype=dtype)
    sq, idx = tm.labelled_nearest_sqdist(q, r, lab, L, 1, block_m=16, block_n=16)
    assert sq.dtype == torch.float32
    ov, oi, D, cand = oracle_global(q, r, lab, L, 1)   # oracle on the same (rounded) values
    check_min(sq, idx, ov, oi, D, cand)


# ----------------------------------------------------------------------------------------
# multi-local matching
# ----------------------------------------------------------------------------------------


def local_inputs(g, B=2, H=7, W=9, C=8, L=3, lab_hi=None, dtype=torch.float32,
                 lab_dtype=torch.int64):
    q = randn(g, B, H, W, C, dtype=dtype)
    p = randn(g, B, H, W, C, dtype=dtype)
    hi = L - 1 if lab_hi is None else lab_hi
    lab = randint(g, -1, hi, B, H, W, dtype=lab_dtype)
    return q, p, lab


def run_local_and_check(q, p, lab, L, windows, rate, bias=None, exact=False, **kw):
    if bias is None:
        bias = torch.linspace(-0.6, 0.4, L).to(DEV)
    fg, bg, idx = tm.fb_multi_local_matching(q, p, lab, L, windows, bias, rate, **kw)
    B, H, W, _ = q.shape
    K = len(windows)
    assert fg.shape == bg.shape == idx.shape == (B, L, K, H, W)
    ov, oi, D, cand = oracle_local(q, p, lab, L, windows, rate)
    efg, ebg = oracle.fb(ov, oi, bias.cpu())
    check_fgbg(fg, bg, efg, ebg)
    check_min(None, idx, ov, oi, D, cand, exact=exact)   # no sqdist output: index only
    assert (fg[idx < 0] == 1.0).all()
    return fg, bg, idx, ov, oi


@pytest.mark.parametrize("rate,windows", [(1, [1, 2, 4]), (2, [2, 3, 20]), (3, [1, 3, 6])])
def test_local_random(gen, rate, windows):
    L = 4                                   # label 3 empty
    q, p, lab = local_inputs(gen, L=L)
    fg, bg, idx, ov, oi = run_local_and_check(q, p, lab, L, windows, rate, block_p=32)
    assert (idx[:, L - 1] == -1).all() and (fg[:, L - 1] == 1.0).all()


def test_local_cfbi_plus_windows(gen):
    # CFBI+ stride-8 style windows on a 12x12 map, atrous 2 (windows up to the frame size)
    L = 4
    q, p, lab = local_inputs(gen, B=1, H=12, W=12, C=16, L=L, lab_hi=L)
    run_local_and_check(q, p, lab, L, [2, 4, 6, 8, 10, 12], 2)


def test_local_window_larger_than_frame_int32_noncontig(gen):
    L = 3
    q, p, lab = local_inputs(gen, B=1, H=5, W=4, C=6, L=L, lab_hi=L, lab_dtype=torch.int32)
    q = noncontig_image(q)
    p = noncontig_image(p)
    lab = lab.transpose(1, 2).contiguous().transpose(1, 2)
    assert not lab.is_contiguous()
    run_local_and_check(q, p, lab, L, [2, 7, 30], 1)


@pytest.mark.parametrize("H,W,rate", [(1, 40, 1), (2, 37, 2), (37, 2, 1), (3, 29, 3)])
def test_local_wide_or_tall_frame(gen, H, W, rate):
    """Each axis's offsets are clipped to the frame on its own (RY, RX): a window larger
    than the short side and shorter than the long one."""
    L = 3
    q, p, lab = local_inputs(gen, B=1, H=H, W=W, C=5, L=L, lab_hi=L)
    run_local_and_check(q, p, lab, L, [1, 4, 9, 60], rate)


def test_local_single_label_and_chunked_channels(gen):
    q, p, lab = local_inputs(gen, B=1, H=4, W=5, C=144, L=1, lab_hi=1)
    fg, bg, idx, _, _ = run_local_and_check(q, p, lab, 1, [1, 2], 1)
    assert (bg == 1.0).all()


def test_local_label_groups(gen, monkeypatch):
    # force one label per program (grid axis 1 = label groups)
    monkeypatch.setattr(tm, "_LOCAL_MAX_COLS", 2)
    L = 4
    q, p, lab = local_inputs(gen, B=2, H=5, W=6, C=5, L=L, lab_hi=L)
    run_local_and_check(q, p, lab, L, [1, 2], 1, block_p=16)


def test_local_ties_integer(gen):
    B, H, W, C, L = 2, 6, 7, 3, 3
    q = torch.randint(-1, 2, (B, H, W, C), generator=gen).float().to(DEV)
    p = torch.randint(-1, 2, (B, H, W, C), generator=gen).float().to(DEV)
    lab = randint(gen, -1, L, B, H, W)
    for rate, windows in ((1, [1, 3]), (2, [2, 4])):
        run_local_and_check(q, p, lab, L, windows, rate, exact=True, block_p=16)


def test_local_nan_propagates(gen):
    L = 3
    q, p, lab = local_inputs(gen, B=1, H=6, W=6, C=4, L=L, lab_hi=L)
    q[0, 1, 1, 0] = float("nan")
    p[0, 4, 4, 2] = float("nan")
    lab[0, 4, 4] = 2
    fg, bg, idx, ov, oi = run_local_and_check(q, p, lab, L, [1, 2], 1)
    assert torch.isnan(fg[0, :, :, 1, 1][idx[0, :, :, 1, 1] >= 0]).all()
    assert torch.isnan(fg[0, 2, 0, 3:6, 3:6]).all()       # all pixels that see (4,4)
    assert not torch.isnan(fg[0, 2, 0, 0, :]).any()        # rows out of its reach


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_local_half_inputs(gen, dtype):
    L = 2
    q, p, lab = local_inputs(gen, B=1, H=5, W=5, C=8, L=L, lab_hi=L, dtype=dtype)
    run_local_and_check(q, p, lab, L, [1, 2], 1)


# ----------------------------------------------------------------------------------------
# instance pooling
# ----------------------------------------------------------------------------------------


def test_instance_pooling(gen):
    B, H, W, C, L = 2, 7, 9, 12, 4
    emb = noncontig_image(randn(gen, B, H, W, C))
    lab = randint(gen, -1, L - 1, B, H, W, dtype=torch.int32)   # label 3 empty
    out = tm.fb_instance_pooling(emb, lab, L)
    assert out.shape == (B, L, 2, C) and out.dtype == torch.float32
    torch.testing.assert_close(out.cpu().double(), oracle.pooling(*host(emb, lab), L),
                               rtol=RTOL, atol=1e-5)
    assert (out[:, L - 1, 0] == 0).all()
    # NaN in one pixel reaches its own label's fg mean and the other labels' bg means
    emb2 = emb.contiguous().clone()
    emb2[1, 3, 4, 5] = float("nan")
    lab2 = lab.clone()
    lab2[1, 3, 4] = 1
    out2 = tm.fb_instance_pooling(emb2, lab2.long(), L)
    torch.testing.assert_close(out2.cpu().double(), oracle.pooling(*host(emb2, lab2), L),
                               rtol=RTOL, atol=1e-5, equal_nan=True)
    assert torch.isnan(out2[1, 1, 0, 5]) and not torch.isnan(out2[1, 1, 1, 5])
    assert torch.isnan(out2[1, 0, 1, 5]) and not torch.isnan(out2[1, 0, 0, 5])
    assert not torch.isnan(out2[0]).any()


def test_instance_pooling_single_label_wide_channels(gen):
    emb = randn(gen, 1, 5, 6, 80)                # C > 64: two channel blocks
    lab = randint(gen, -1, 1, 1, 5, 6)
    out = tm.fb_instance_pooling(emb, lab, 1)
    torch.testing.assert_close(out.cpu().double(), oracle.pooling(*host(emb, lab), 1),
                               rtol=RTOL, atol=1e-5)


# ----------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------


def test_backward_global_indices(gen):
    L = 4
    q, r, lab = global_inputs(gen, B=2, T=2, H=5, W=6, Hr=4, Wr=5, C=10, L=L)  # 1 empty
    sq, idx = tm.labelled_nearest_sqdist(q, r, lab, L, 1)
    B, H, W, C = q.shape
    grad = randn(gen, B, L, H * W)
    qf = q.reshape(B, H * W, C)
    rf = r.reshape(B, -1, C)
    idx3 = idx.reshape(B, L, H * W)
    assert (idx3 < 0).any() and (idx3 >= 0).any()
    gq, gr = tm.nearest_sqdist_backward(grad, qf, rf, idx3)
    eq, er = oracle.sqdist_backward(grad, qf, rf, idx3)
    assert gq.shape == qf.shape and gr.shape == rf.shape
    torch.testing.assert_close(gq.cpu().double(), eq, rtol=RTOL, atol=1e-4)
    torch.testing.assert_close(gr.cpu().double(), er, rtol=RTOL, atol=1e-4)


def test_backward_local_indices_noncontig_int32(gen):
    L = 3
    K = 2
    q, p, lab = local_inputs(gen, B=1, H=5, W=6, C=70, L=L, lab_hi=L)  # C > 64: 2 blocks
    fg, bg, idx = tm.fb_multi_local_matching(q, p, lab, L, [1, 2],
                                             torch.zeros(L, device=DEV), 1)
    B, H, W, C = q.shape
    grad = randn(gen, B, L * K, H * W)
    qf = noncontig_image(q).reshape(B, H * W, C)
    pf = p.reshape(B, H * W, C)
    idx3 = idx.reshape(B, L * K, H * W).to(torch.int32)
    gq, gr = tm.nearest_sqdist_backward(grad, qf, pf, idx3)
    eq, er = oracle.sqdist_backward(grad, qf, pf, idx3)
    torch.testing.assert_close(gq.cpu().double(), eq, rtol=RTOL, atol=1e-4)
    torch.testing.assert_close(gr.cpu().double(), er, rtol=RTOL, atol=1e-4)


def test_shape_mismatch_raises_value_error(gen):
    q, r, lab = global_inputs(gen, B=1, T=1, H=3, W=3, Hr=3, Wr=3, C=4, L=2)
    with pytest.raises(ValueError, match="reference_labels"):
        tm.labelled_nearest_sqdist(q, r, lab[:, :, :2], 2, 1)
    with pytest.raises(ValueError, match="bias"):
        tm.fb_global_matching(q, r, lab, 2, torch.zeros(3, device=DEV), 1)
    with pytest.raises(ValueError, match="previous"):
        tm.fb_multi_local_matching(q, q[:, :2], lab[:, 0], 2, [1], torch.zeros(2, device=DEV))
    with pytest.raises(ValueError, match="labels"):
        tm.fb_instance_pooling(q, lab[:, 0].float(), 2)
