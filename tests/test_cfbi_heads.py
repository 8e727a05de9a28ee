"""CFBIMatchingHead / CFBIPlusMatchingHead against a straight port of CFBI's per-sample
concatenation (``tests/cfbi_port.py``), fused against reference gradients in float64,
state_dict round trips, torch.compile, and argument errors."""
import copy

import oracle
import pytest
import torch
from cfbi_port import port_cfbi_input, port_cfbip_input
from vos_models.cfbi import CFBIMatchingHead, CFBIPlusMatchingHead, IAGate

SIZES = ((13, 11), (7, 6), (4, 3))           # stride-4 / 8 / 16 maps of a 52 × 44 crop
FULL = (52, 44)
C = 10
CFG = dict(embedding_dims=(C, C, C), matching_dims=(4, 6, C), local_windows=((2, 4, 6), (1, 2, 3), (1, 2)),
           global_atrous=(2, 1, 1), local_atrous=(2, 1, 1))


def _labels(gen, gt_ids, size=FULL, ignore=0.1):
    """[B, H, W] ids in 0..gt_ids[n] with 255 (ignore) pixels; every id present."""
    out = []
    for g in gt_ids:
        lab = torch.randint(0, g + 1, size, generator=gen)
        lab[torch.rand(size, generator=gen) < ignore] = 255
        out.append(lab)
    return torch.stack(out)


def _emb(gen, B, sizes=SIZES, c=C, dtype=torch.float64, frames=None):
    shape = (lambda h, w: (B, c, h, w)) if frames is None else (lambda h, w: (B, frames, c, h, w))
    return [torch.randn(*shape(h, w), generator=gen, dtype=dtype) for h, w in sizes]


def _plus_head(gen, dtype=torch.float64, **kw):
    head = CFBIPlusMatchingHead(**{**CFG, **kw}).to(dtype)
    with torch.no_grad():
        head.bg_bias.copy_(0.3 * torch.randn(3, 1, 1, 1, generator=gen))
        head.fg_bias.copy_(0.3 * torch.randn(3, 1, 1, 1, generator=gen))
    return head


def _split(out):
    return [[f.split(out.object_counts) for f in out.features], [g.split(out.object_counts) for g in out.guidance]]


def _assert_port(out, want, atol=1e-9):
    feats, guides = _split(out)
    for n, per_scale in enumerate(want):
        for s, (ce, head) in enumerate(per_scale):
            torch.testing.assert_close(feats[s][n], ce, rtol=0, atol=atol, msg=f"features, sample {n} scale {s}")
            torch.testing.assert_close(guides[s][n], head, rtol=0, atol=atol, msg=f"guidance, sample {n} scale {s}")


# ------------------------------------------------------------------ CFBI+ vs the port
@pytest.mark.parametrize("matching", ["fused", "reference"])
@pytest.mark.parametrize("gt_ids", [(2, 0, 3), (1,), (0, 0)])
def test_cfbip_training_equals_port(gen, matching, gt_ids):
    B = len(gt_ids)
    head = _plus_head(gen, matching=matching).train()
    cur, ref, prev = _emb(gen, B), _emb(gen, B), _emb(gen, B)
    ref_lab, prev_lab = _labels(gen, gt_ids), _labels(gen, gt_ids)
    if max(gt_ids) > 1:
        ref_lab[0][ref_lab[0] == 2] = 0        # object 2 of sample 0 absent from the reference
    out = head(cur, ref, prev, ref_lab, prev_lab, list(gt_ids))
    assert out.object_counts == tuple(g + 1 for g in gt_ids)
    assert [f.shape[1] for f in out.features] == list(head.in_channels) == [3 * C + 3 + 2 * 3, 3 * C + 3 + 6,
                                                                           3 * C + 3 + 4]
    want = port_cfbip_input(cur, [[r] for r in ref], prev, [ref_lab[:, None]], prev_lab[:, None], gt_ids,
                            head.bg_bias.detach(), head.fg_bias.detach(), CFG["matching_dims"], CFG["local_windows"],
                            CFG["global_atrous"], CFG["local_atrous"], training=True)
    _assert_port(out, want)


@pytest.mark.parametrize("pixel_num", [0, 3])
def test_cfbip_eval_several_references_equals_port(gen, pixel_num):
    """CFBI+ evaluation: T = 2 reference frames, atrous_obj_pixel_num 0 (labels untouched)
    or 3 (only big objects subsampled, in place, as the attention head sees them)."""
    gt_ids = (3, 1)
    B, T = 2, 2
    head = _plus_head(gen, global_min_pixels=pixel_num).eval()
    cur, prev = _emb(gen, B), _emb(gen, B)
    ref = _emb(gen, B, frames=T)
    ref_lab = torch.stack([_labels(gen, gt_ids) for _ in range(T)], 1)     # [B, T, H, W]
    ref_lab[0, 0][ref_lab[0, 0] == 3] = 0
    ref_lab[0, 1][(ref_lab[0, 1] == 3)] = 0
    ref_lab[0, 1, 8:16, 8:16] = 3      # 2 × 2 pixels at stride 4: below 3·2² pixels, not subsampled
    prev_lab = _labels(gen, gt_ids)
    out = head(cur, ref, prev, ref_lab, prev_lab, list(gt_ids))
    want = port_cfbip_input(cur, [[r[:, t] for t in range(T)] for r in ref], prev,
                            [ref_lab[:, t, None] for t in range(T)], prev_lab[:, None], gt_ids,
                            head.bg_bias.detach(), head.fg_bias.detach(), CFG["matching_dims"], CFG["local_windows"],
                            CFG["global_atrous"], CFG["local_atrous"], training=False, pixel_num=pixel_num)
    _assert_port(out, want)


def test_training_mode_changes_only_the_atrous_reference_means(gen):
    """CFBI's in-place label subsampling reaches the guidance in training only (P = 0)."""
    head = _plus_head(gen)
    cur, ref, prev = _emb(gen, 1), _emb(gen, 1), _emb(gen, 1)
    lab = _labels(gen, (2,))
    a = head.train()(cur, ref, prev, lab, lab, [2])
    b = head.eval()(cur, ref, prev, lab, lab, [2])
    for s in range(3):
        torch.testing.assert_close(a.features[s], b.features[s], rtol=0, atol=0)
    assert not torch.allclose(a.guidance[0][:, :2 * C], b.guidance[0][:, :2 * C])   # stride 4, rate 2: subsampled
    torch.testing.assert_close(a.guidance[0][:, 2 * C:], b.guidance[0][:, 2 * C:], rtol=0, atol=0)
    torch.testing.assert_close(a.guidance[1], b.guidance[1], rtol=0, atol=0)


def test_cfbip_float32_fused_equals_port(gen):
    gt_ids = (2, 4)
    head = _plus_head(gen, dtype=torch.float32)
    cur, ref, prev = (_emb(gen, 2, dtype=torch.float32) for _ in range(3))
    ref_lab, prev_lab = _labels(gen, gt_ids), _labels(gen, gt_ids)
    out = head(cur, ref, prev, ref_lab, prev_lab, list(gt_ids))
    want = port_cfbip_input([x.double() for x in cur], [[r.double()] for r in ref], [x.double() for x in prev],
                            [ref_lab[:, None]], prev_lab[:, None], gt_ids, head.bg_bias.detach().double(),
                            head.fg_bias.detach().double(), CFG["matching_dims"], CFG["local_windows"],
                            CFG["global_atrous"], CFG["local_atrous"])
    feats, guides = _split(out)
    for n, per_scale in enumerate(want):
        for s, (ce, g) in enumerate(per_scale):
            torch.testing.assert_close(feats[s][n].double(), ce, rtol=0, atol=2e-5)
            torch.testing.assert_close(guides[s][n].double(), g, rtol=0, atol=2e-5)


def test_noncontiguous_embeddings(gen):
    head = _plus_head(gen)
    gt_ids = (2, 1)
    cur = [x.transpose(2, 3).contiguous().transpose(2, 3) for x in _emb(gen, 2)]
    ref = [torch.randn(2, h, w, C, generator=gen, dtype=torch.float64).permute(0, 3, 1, 2) for h, w in SIZES]
    prev = _emb(gen, 2)
    lab = _labels(gen, gt_ids)
    got = head(cur, ref, prev, lab, lab, list(gt_ids))
    want = head([x.contiguous() for x in cur], [x.contiguous() for x in ref], prev, lab, lab, list(gt_ids))
    for a, b in zip(got.features + got.guidance, want.features + want.guidance):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# -------------------------------------------------------------------- CFBI vs the port
@pytest.mark.parametrize("gt_ids", [(3, 1), (0,)])
def test_cfbi_head_equals_port(gen, gt_ids):
    B = len(gt_ids)
    head = CFBIMatchingHead(embedding_dim=C, local_windows=(1, 2, 3)).double()
    with torch.no_grad():
        head.bg_bias.fill_(-0.2)
        head.fg_bias.fill_(0.4)
    h, w = SIZES[0]
    cur, ref, prev = (torch.randn(B, C, h, w, generator=gen, dtype=torch.float64) for _ in range(3))
    ref_lab, prev_lab = _labels(gen, gt_ids), _labels(gen, gt_ids)
    out = head(cur, ref, prev, ref_lab, prev_lab, list(gt_ids))
    assert out.features[0].shape[1] == head.in_channels[0] == 3 * C + 64
    want = port_cfbi_input(cur, ref, prev, ref_lab[:, None], prev_lab[:, None], gt_ids, head.bg_bias.detach(),
                           head.fg_bias.detach(), (1, 2, 3), head.dynamic_prehead)
    feats, guides = _split(out)
    for n, (ce, g) in enumerate(want):
        torch.testing.assert_close(feats[0][n], ce, rtol=0, atol=1e-9)
        torch.testing.assert_close(guides[0][n], g, rtol=0, atol=1e-9)


def test_cfbi_head_without_prehead_puts_maps_first(gen):
    head = CFBIMatchingHead(embedding_dim=C, local_windows=(1, 2), prehead_channels=None, local_downsample=False).double()
    h, w = SIZES[0]
    cur, ref, prev = (torch.randn(1, C, h, w, generator=gen, dtype=torch.float64) for _ in range(3))
    lab = _labels(gen, (2,))
    out = head(cur, ref, prev, lab, lab, [2])
    assert out.features[0].shape[1] == head.in_channels[0] == 3 + 4 + 3 * C
    torch.testing.assert_close(out.features[0][:, 7:7 + C], cur.expand(3, -1, -1, -1), rtol=0, atol=0)


# ------------------------------------------------------------------------- gradients
def _loss(out, gen):
    total = 0
    for f in out.features + out.guidance:
        total = total + (f * torch.randn(f.shape, generator=gen, dtype=f.dtype)).sum()
    return total


@pytest.mark.parametrize("kind", ["plus", "cfbi"])
def test_gradients_fused_equal_reference_float64(gen, kind):
    gt_ids = (2, 0, 3)
    B = len(gt_ids)
    if kind == "plus":
        head = _plus_head(gen)
        cur, ref, prev = _emb(gen, B), _emb(gen, B), _emb(gen, B)
    else:
        head = CFBIMatchingHead(embedding_dim=C, local_windows=(1, 2, 3)).double()
        cur, ref, prev = ([x] for x in (_emb(gen, B, SIZES[:1])[0], _emb(gen, B, SIZES[:1])[0],
                                        _emb(gen, B, SIZES[:1])[0]))
    ref_lab, prev_lab = _labels(gen, gt_ids), _labels(gen, gt_ids)
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    grads = {}
    for matching in ("fused", "reference"):
        h = copy.deepcopy(head)
        h.matching = matching
        xs = [x.clone().requires_grad_(True) for x in cur + ref + prev]
        k = len(cur)
        args = (xs[:k], xs[k:2 * k], xs[2 * k:]) if kind == "plus" else (xs[0], xs[1], xs[2])
        out = h(*args, ref_lab, prev_lab, list(gt_ids))
        _loss(out, torch.Generator().manual_seed(seed)).backward()
        grads[matching] = [x.grad for x in xs] + [p.grad for p in h.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads[matching])
    for a, b in zip(grads["fused"], grads["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
    assert float(grads["fused"][-1].abs().sum()) > 0 or kind == "cfbi"   # fg_bias gets a gradient


def test_gradcheck_small_plus_head(gen):
    head = CFBIPlusMatchingHead(embedding_dims=(3, 3), matching_dims=(2, 3), local_windows=((1, 2), (1,)),
                                global_atrous=(2, 1), local_atrous=(1, 1)).double()
    sizes = ((5, 4), (3, 2))
    lab = _labels(gen, (2,), (10, 8), ignore=0.0)
    bias = [head.bg_bias, head.fg_bias]

    def f(*xs):
        out = head(list(xs[0:2]), list(xs[2:4]), list(xs[4:6]), lab, lab, [2])
        return tuple(out.features) + tuple(out.guidance)

    # every matching minimum separated by more than a finite difference moves it
    # (oracle.kink_margin measures the matching ops by fb_min_gap)
    xs = oracle.draw_separated(lambda: _emb(gen, 1, sizes, 3) + _emb(gen, 1, sizes, 3) + _emb(gen, 1, sizes, 3),
                               lambda *xs: oracle.kink_margin(f, *xs)[0])
    xs = [x.requires_grad_(True) for x in xs]
    assert torch.autograd.gradcheck(f, xs, eps=1e-6, atol=1e-6, fast_mode=True)
    assert torch.autograd.gradcheck(lambda *b: f(*xs), bias, eps=1e-6, atol=1e-6, fast_mode=True)


# ------------------------------------------------------------- state_dict, compile, gate
def test_state_dict_keys_and_round_trip(gen):
    head = _plus_head(gen)
    assert {k: tuple(v.shape) for k, v in head.state_dict().items()} == {"bg_bias": (3, 1, 1, 1),
                                                                         "fg_bias": (3, 1, 1, 1)}
    other = CFBIPlusMatchingHead(**CFG).double()
    other.load_state_dict(head.state_dict())
    cur, ref, prev = _emb(gen, 1), _emb(gen, 1), _emb(gen, 1)
    lab = _labels(gen, (2,))
    a, b = head(cur, ref, prev, lab, lab, [2]), other(cur, ref, prev, lab, lab, [2])
    for x, y in zip(a.features + a.guidance, b.features + b.guidance):
        torch.testing.assert_close(x, y, rtol=0, atol=0)

    cfbi = CFBIMatchingHead(embedding_dim=C)
    assert sorted(cfbi.state_dict()) == ["bg_bias", "dynamic_prehead.bn.bias", "dynamic_prehead.bn.weight",
                                         "dynamic_prehead.conv.bias", "dynamic_prehead.conv.weight", "fg_bias"]
    assert tuple(cfbi.bg_bias.shape) == (1, 1, 1, 1)
    clone = CFBIMatchingHead(embedding_dim=C)
    clone.load_state_dict(cfbi.state_dict())
    for k, v in cfbi.state_dict().items():
        assert torch.equal(v, clone.state_dict()[k])


def test_torch_compile_same_outputs(gen):
    torch._dynamo.reset()
    head = _plus_head(gen, dtype=torch.float32)
    cur, ref, prev = (_emb(gen, 2, dtype=torch.float32) for _ in range(3))
    ref_lab, prev_lab = _labels(gen, (2, 1)), _labels(gen, (2, 1))
    want = head(cur, ref, prev, ref_lab, prev_lab, [2, 1])
    got = torch.compile(head)(cur, ref, prev, ref_lab, prev_lab, [2, 1])
    for a, b in zip(got.features + got.guidance, want.features + want.guidance):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_iagate_formula(gen):
    gate = IAGate(6, 4).double()
    x = torch.randn(3, 4, 5, 5, generator=gen, dtype=torch.float64)
    g = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    want = x * (1 + torch.tanh(g @ gate.IA.weight.t() + gate.IA.bias)).view(3, 4, 1, 1)
    torch.testing.assert_close(gate(x, g), want, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------ errors
def test_errors(gen):
    head = CFBIPlusMatchingHead(**CFG)
    cur, ref, prev = (_emb(gen, 2, dtype=torch.float32) for _ in range(3))
    lab = _labels(gen, (2, 1))
    with pytest.raises(ValueError, match="current: expected a sequence of 3"):
        head(cur[:2], ref, prev, lab, lab, [2, 1])
    with pytest.raises(ValueError, match="num_objects: expected one count per sample"):
        head(cur, ref, prev, lab, lab, [2])
    with pytest.raises(ValueError, match=r"current\[1\]"):
        head([cur[0], cur[1][:, :5], cur[2]], ref, prev, lab, lab, [2, 1])
    with pytest.raises(ValueError, match=r"reference\[0\]"):
        head(cur, [ref[0][:, :, :5], ref[1], ref[2]], prev, lab, lab, [2, 1])
    with pytest.raises(ValueError, match=r"previous\[2\]"):
        head(cur, ref, [prev[0], prev[1], prev[2].double()], lab, lab, [2, 1])
    with pytest.raises(ValueError, match="reference_labels: expected values"):
        head(cur, ref, prev, lab, lab, [1, 1])
    with pytest.raises(ValueError, match="previous_labels: expected an integer tensor"):
        head(cur, ref, prev, lab, lab.float(), [2, 1])
    with pytest.raises(ValueError, match="num_objects"):
        head(cur, ref, prev, lab, lab, [2, -1])
    with pytest.raises(ValueError, match="local_windows"):
        CFBIPlusMatchingHead(**{**CFG, "local_windows": ((2, 2, 4), (1,), (1,))})
    with pytest.raises(ValueError, match="matching_dims"):
        CFBIPlusMatchingHead(**{**CFG, "matching_dims": (4, 6, C + 1)})
    with pytest.raises(ValueError, match="matching"):
        CFBIPlusMatchingHead(**CFG, matching="naive")
    with pytest.raises(ValueError, match="prehead_channels"):
        CFBIMatchingHead(embedding_dim=C, prehead_channels=10)
    with pytest.raises(ValueError, match="global_min_pixels"):
        CFBIPlusMatchingHead(**CFG, global_min_pixels=-1)


def test_ops_see_the_batch_label_count(gen, monkeypatch):
    """One matching call per op and scale with L = max objects + 1 (pooling: + the
    "no object" label), whatever the per-sample counts."""
    from vos_kernels import matching as ops

    seen = []
    for name in ("fb_global_matching", "fb_multi_local_matching", "fb_instance_pooling"):
        real = getattr(ops, name)

        def spy(*args, _real=real, _name=name):
            seen.append((_name, args[0].shape[0], args[3] if _name != "fb_instance_pooling" else args[2]))
            return _real(*args)
        monkeypatch.setattr(ops, name, spy)
    head = _plus_head(gen)
    for gt_ids in ((2, 1), (3, 3)):
        seen.clear()
        lab = _labels(gen, gt_ids)
        out = head(_emb(gen, 2), _emb(gen, 2), _emb(gen, 2), lab, lab, list(gt_ids))
        L = max(gt_ids) + 1
        assert sorted(set(seen)) == sorted({("fb_global_matching", 2, L), ("fb_multi_local_matching", 2, L),
                                            ("fb_instance_pooling", 2, L + 1)})
        assert len(seen) == 3 * 4
        assert out.features[0].shape[0] == sum(gt_ids) + 2
