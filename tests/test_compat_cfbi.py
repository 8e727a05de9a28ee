"""vos_kernels.compat.cfbi against a straight port of CFBI's formulas written here.

The port re-derives what CFBI's ``matching.py`` / ``attention.py`` compute (one-hot
labels, chunk distances padded with 5e4, sigmoid transform, unfold-based local matching
with CFBI's channel order, attention-head means) in a few lines of plain torch. The
compat functions must agree with it on small random inputs, values and gradients.

Skipped until the package's public fused ops exist.
"""

import pytest
import torch

try:
    import vos_kernels

    _HAVE_OPS = all(hasattr(vos_kernels, n) for n in
                    ("fb_global_matching", "fb_multi_local_matching", "fb_instance_pooling"))
except Exception:  # the package or its extension is not built yet
    _HAVE_OPS = False
if not _HAVE_OPS:
    pytest.skip("vos_kernels public fused ops are not available", allow_module_level=True)

from vos_kernels.compat import cfbi  # noqa: E402

from cfbi_port import (port_atrous_labels, port_f2b, port_global, port_head,  # noqa: E402
                       port_head_eval, port_local)

ATOL = 2e-5


# -------------------------------------------------------------------- inputs
def _onehot(ids, O):
    """CFBI's ``(label == obj_ids).float()`` as [H, W, O]; ids outside 0..O-1 (255) ->
    an all-zero row."""
    return (ids[..., None] == torch.arange(O)).float()


def _ids(g, h, w, O, ignore=True):
    ids = torch.randint(0, O, (h, w), generator=g)
    if ignore:
        ids[torch.rand(h, w, generator=g) < 0.15] = 255
    return ids


def _bias(g, O):
    return torch.randn(O, 1, 1, 1, generator=g)


def _frames(g, H, W, C, O, requires_grad=False):
    """Two frame embeddings [H, W, C], one-hot labels [H, W, O] (with 255 pixels) and a
    bias [O, 1, 1, 1]; the embeddings and the bias are leaves when requires_grad."""
    a = torch.randn(H, W, C, generator=g, requires_grad=requires_grad)
    b = torch.randn(H, W, C, generator=g, requires_grad=requires_grad)
    labels = _onehot(_ids(g, H, W, O), O)
    return a, b, labels, _bias(g, O).requires_grad_(requires_grad)


# ----------------------------------------------------------- global matching
@pytest.mark.parametrize("rate", [1, 2, 3])
@pytest.mark.parametrize("pixel_num", [0, 2])
@pytest.mark.parametrize("ori_size", [None, (9, 11)])
@pytest.mark.parametrize("use_float16", [False, True])
def test_global_matching(gen, rate, pixel_num, ori_size, use_float16):
    h, w, C, O = 6, 7, 4, 4
    ref_e = torch.randn(h, w, C, generator=gen)
    qry = torch.randn(h, w, C, generator=gen)
    ids = _ids(gen, h, w, O - 1)      # object O-1 is empty
    ids[ids == 2] = 255
    ids[0, 1] = 2                      # object 2 has a single (small) pixel
    labels = _onehot(ids, O)
    bias = _bias(gen, O)
    if use_float16:
        want = port_global([ref_e.half().float()], qry.half().float(), [labels], bias, ori_size,
                           rate, pixel_num)
    else:
        want = port_global([ref_e], qry, [labels], bias, ori_size, rate, pixel_num)
    lab_in = labels.clone()
    got = cfbi.global_matching(ref_e, qry, lab_in, n_chunks=3, dis_bias=bias, ori_size=ori_size,
                               atrous_rate=rate, use_float16=use_float16,
                               atrous_obj_pixel_num=pixel_num)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    # CFBI quirk: the caller's labels are subsampled in place when atrous_rate > 1.
    assert torch.equal(lab_in, port_atrous_labels(labels, rate, pixel_num))


def test_global_matching_no_labelled_pixel_returns_ones(gen):
    ref_e, qry = torch.randn(5, 6, 3, generator=gen), torch.randn(5, 6, 3, generator=gen)
    labels = torch.zeros(5, 6, 3)
    bias = _bias(gen, 3)
    got = cfbi.global_matching(ref_e, qry, labels, dis_bias=bias, ori_size=(8, 9))
    assert got.shape == (1, 5, 6, 3, 1) and (got == 1).all()   # CFBI ignores ori_size here
    got = cfbi.global_matching_for_eval([ref_e], qry, [labels], dis_bias=bias, atrous_rate=2)
    assert got.shape == (1, 5, 6, 3, 1) and (got == 1).all()


def test_global_matching_float_and_scalar_bias(gen):
    ref_e, qry = torch.randn(5, 4, 3, generator=gen), torch.randn(5, 4, 3, generator=gen)
    labels = _onehot(_ids(gen, 5, 4, 3), 3)
    want = port_global([ref_e], qry, [labels], torch.full((3,), 0.5))
    got = cfbi.global_matching(ref_e, qry, labels.clone(), dis_bias=0.5, use_float16=False)
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    got = cfbi.global_matching(ref_e, qry, labels.clone(), dis_bias=torch.tensor([0.5]),
                               use_float16=False)
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


@pytest.mark.parametrize("rate", [1, 2])
@pytest.mark.parametrize("pixel_num", [0, 1])
@pytest.mark.parametrize("n_ref", [1, 3])
def test_global_matching_for_eval(gen, rate, pixel_num, n_ref):
    h, w, C, O = 5, 7, 3, 4
    refs = [torch.randn(h, w, C, generator=gen) for _ in range(n_ref)]
    qry = torch.randn(h, w, C, generator=gen)
    labels = []
    for t in range(n_ref):
        ids = _ids(gen, h, w, O)
        if t == 0:
            ids[ids == 3] = 255
            ids[1, 1] = 3                # a small object in the first frame
        labels.append(_onehot(ids, O))
    bias = _bias(gen, O)
    want = port_global(refs, qry, labels, bias, None, rate, pixel_num)
    lab_in = [l.clone() for l in labels]
    got = cfbi.global_matching_for_eval(refs, qry, lab_in, dis_bias=bias, atrous_rate=rate,
                                        use_float16=False, atrous_obj_pixel_num=pixel_num)
    assert got.shape == (1, h, w, O, 1)
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    for a, b in zip(lab_in, labels):  # in place only with atrous_obj_pixel_num > 0
        expect = port_atrous_labels(b, rate, pixel_num) if pixel_num > 0 else b
        assert torch.equal(a, expect)


# ------------------------------------------------------------ local matching
@pytest.mark.parametrize("windows", [[1], [1, 2, 3], [2, 4, 6, 8, 10, 12]])
@pytest.mark.parametrize("rate", [1, 2])
@pytest.mark.parametrize("allow_downsample", [False, True])
@pytest.mark.parametrize("ori_size", [None, (10, 12)])
def test_local_matching(gen, windows, rate, allow_downsample, ori_size):
    H, W, C, O = 7, 9, 4, 3
    prev, qry, labels, bias = _frames(gen, H, W, C, O)
    want = port_local(prev, qry, labels, bias, windows, ori_size, rate, allow_downsample)
    got = cfbi.local_matching(prev, qry, labels, dis_bias=bias, multi_local_distance=windows,
                              ori_size=ori_size, atrous_rate=rate, use_float16=False,
                              allow_downsample=allow_downsample)
    assert got.shape == want.shape and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)


def test_local_matching_channel_order_and_fp16(gen):
    H, W, C, O = 6, 6, 3, 2
    prev, qry, labels, bias = _frames(gen, H, W, C, O)
    got = cfbi.local_matching(prev, qry, labels, dis_bias=bias, multi_local_distance=[1, 2, 4],
                              use_float16=True)   # CFBI defaults: fp16, downsample
    want = port_local(prev.half().float(), qry.half().float(), labels, bias, [1, 2, 4])
    torch.testing.assert_close(got, want, rtol=0, atol=ATOL)
    one = [cfbi.local_matching(prev, qry, labels, dis_bias=bias, multi_local_distance=[k],
                               use_float16=False, allow_downsample=False) for k in (1, 2, 4)]
    full = cfbi.local_matching(prev, qry, labels, dis_bias=bias, multi_local_distance=[1, 2, 4],
                               use_float16=False, allow_downsample=False)
    for ch, k in enumerate([2, 0, 1]):          # [largest, smallest, second-largest]
        torch.testing.assert_close(full[..., ch], one[k][..., 0])


# ------------------------------------------------------------------ background
@pytest.mark.parametrize("shape", [(1, 5, 6), (1, 5, 6, 3)])
@pytest.mark.parametrize("O", [1, 2, 4])
def test_foreground2background(gen, shape, O):
    dis = torch.rand((O,) + shape, generator=gen)
    got = cfbi.foreground2background(dis, O)
    torch.testing.assert_close(got, port_f2b(dis, O), rtol=0, atol=0)
    if O == 1:
        assert got is dis


# -------------------------------------------------------------- attention head
@pytest.mark.parametrize("eps", [1e-5, 1e-3])
@pytest.mark.parametrize("shared", [True, False])
def test_calculate_attention_head(gen, eps, shared):
    O, C, H, W = 3, 5, 6, 7
    ref_ids, prev_ids = _ids(gen, H, W, O), _ids(gen, H, W, O)
    ref_l = _onehot(ref_ids, O).permute(2, 0, 1)[:, None]     # [O, 1, H, W]
    prev_l = _onehot(prev_ids, O).permute(2, 0, 1)[:, None]
    if shared:   # CFBI: the frame embedding expanded over the objects
        ref_e = torch.randn(C, H, W, generator=gen)[None].expand(O, -1, -1, -1)
        prev_e = torch.randn(C, H, W, generator=gen)[None].expand(O, -1, -1, -1)
    else:
        ref_e = torch.randn(O, C, H, W, generator=gen)
        prev_e = torch.randn(O, C, H, W, generator=gen)
    got = cfbi.calculate_attention_head(ref_e, ref_l, prev_e, prev_l, epsilon=eps)
    want = port_head(ref_e, ref_l, prev_e, prev_l, eps)
    assert got.shape == (O, 4 * C)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_calculate_attention_head_for_eval(gen):
    O, C, H, W = 4, 3, 5, 6
    ref_es = [torch.randn(1, C, H, W, generator=gen) for _ in range(2)]
    ref_ls = [_onehot(_ids(gen, H, W, O), O).permute(2, 0, 1)[:, None] for _ in range(2)]
    prev_e = torch.randn(C, H, W, generator=gen)[None].expand(O, -1, -1, -1)
    prev_l = _onehot(_ids(gen, H, W, O), O).permute(2, 0, 1)[:, None]
    got = cfbi.calculate_attention_head_for_eval(ref_es, ref_ls, prev_e, prev_l)
    torch.testing.assert_close(got, port_head_eval(ref_es, ref_ls, prev_e, prev_l),
                               rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------- gradients
def assert_same_grads(got, want, inputs, gen):
    """got and want have the same gradients w.r.t. inputs under one random output weight."""
    w = torch.randn(got.shape, generator=gen)
    for a, b in zip(torch.autograd.grad((got * w).sum(), inputs),
                    torch.autograd.grad((want * w).sum(), inputs)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("rate", [1, 2])
def test_global_matching_gradients(gen, rate):
    h, w, C, O = 5, 6, 3, 3
    ref_e, qry, labels, bias = _frames(gen, h, w, C, O, requires_grad=True)
    got = cfbi.global_matching(ref_e, qry, labels.clone(), dis_bias=bias, atrous_rate=rate,
                               use_float16=False)
    want = port_global([ref_e], qry, [labels], bias, None, rate)
    assert_same_grads(got, want, (ref_e, qry, bias), gen)


@pytest.mark.parametrize("rate", [1, 2])
def test_local_matching_gradients(gen, rate):
    H, W, C, O = 6, 5, 3, 3
    prev, qry, labels, bias = _frames(gen, H, W, C, O, requires_grad=True)
    kw = dict(dis_bias=bias, multi_local_distance=[1, 2, 4], atrous_rate=rate)
    got = cfbi.local_matching(prev, qry, labels, use_float16=False, allow_downsample=False, **kw)
    want = port_local(prev, qry, labels, bias, [1, 2, 4], None, rate, False)
    assert_same_grads(got, want, (prev, qry, bias), gen)


def test_attention_head_gradients(gen):
    O, C, H, W = 3, 4, 5, 5
    base = torch.randn(C, H, W, generator=gen, requires_grad=True)
    ref_l = _onehot(_ids(gen, H, W, O), O).permute(2, 0, 1)[:, None]
    prev_l = _onehot(_ids(gen, H, W, O), O).permute(2, 0, 1)[:, None]
    e = base[None].expand(O, -1, -1, -1)
    got = cfbi.calculate_attention_head(e, ref_l, e, prev_l)
    want = port_head(e, ref_l, e, prev_l)
    assert_same_grads(got, want, (base,), gen)
