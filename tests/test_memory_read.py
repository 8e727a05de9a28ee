"""topk_memory_read: C++ CPU kernel against a float64 brute-force oracle, STCN's dense
reference, usage counters, gradients, opcheck, torch.compile, and bad input."""
import math

import pytest
import torch

import oracle
import vos_kernels as vk
from vos_kernels import reference as R


def inputs(gen, B, Nq, Nm, CK, CV, dtype=torch.float32, requires_grad=False):
    t = [torch.randn(B, n, c, generator=gen, dtype=torch.float64).to(dtype) for n, c in
         ((Nq, CK), (Nm, CK), (Nm, CV))]
    return [x.requires_grad_(requires_grad) for x in t]


SHAPES = [  # B, Nq, Nm, CK, CV, k
    (1, 37, 300, 16, 8, 20),
    (2, 64, 1000, 64, 24, 20),     # CV = 3 objects x 8
    (2, 200, 30, 8, 4, 5),        # Nm < Nq
    (1, 9, 12, 4, 3, 1),          # k = 1
    (2, 9, 12, 4, 3, 12),         # k = Nm
    (1, 5, 7, 4, 3, 50),          # k > Nm: k' = Nm
    (3, 130, 2500, 32, 5, 30),    # several memory tiles and query tiles
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", ["hits", "weights"])
def test_against_float64_oracle(gen, shape, mode):
    B, Nq, Nm, CK, CV, k = shape
    q, m, v = inputs(gen, B, Nq, Nm, CK, CV)
    start = torch.rand(B, Nm, generator=gen)           # counters accumulate on what is there
    usage = start.clone()
    out, (idx, w) = vk.topk_memory_read(q, m, v, k, usage=usage, usage_mode=mode, return_topk=True)
    r, o_idx, o_w, hits, wsum = oracle.topk_read(q, m, v, k, 1 / math.sqrt(CK))
    K = min(k, Nm)
    assert out.shape == (B, Nq, CV) and idx.shape == (B, Nq, K) and w.shape == (B, Nq, K)
    assert out.dtype == torch.float32 and idx.dtype == torch.int64
    # queries with a float64 near-tie (< 1e-4) among the k+1 largest may legitimately differ
    # in float32; the others (most of them, checked) must match exactly
    ok = oracle.topk_unambiguous(q, m, k, 1 / math.sqrt(CK))
    assert ok.float().mean() > 0.5, ok.float().mean()
    assert torch.equal(idx[ok], o_idx[ok])
    torch.testing.assert_close(w[ok].double(), o_w[ok], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(out[ok].double(), r[ok], atol=2e-5, rtol=1e-5)
    # usage: a brute-force count of what the kernel selected, and the oracle's when unambiguous
    own = oracle.usage_of(idx, w, Nm, hits=mode == "hits")
    torch.testing.assert_close(usage.double(), start.double() + own, atol=1e-4, rtol=1e-6)
    if bool(ok.all()):
        expect = start.double() + (hits if mode == "hits" else wsum)
        torch.testing.assert_close(usage.double(), expect, atol=1e-4, rtol=1e-6)


def test_float64_is_exact_to_rounding(gen):
    q, m, v = inputs(gen, 2, 40, 500, 16, 6, dtype=torch.float64)
    out, (idx, w) = vk.topk_memory_read(q, m, v, 20, scale=0.3, return_topk=True)
    r, o_idx, o_w, _, _ = oracle.topk_read(q, m, v, 20, 0.3)
    assert torch.equal(idx, o_idx) and out.dtype == torch.float64
    torch.testing.assert_close(out, r, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(w, o_w, atol=1e-13, rtol=1e-12)


def test_ties_pick_the_lowest_index(gen):
    """Integer keys give exact affinities; duplicated memory rows tie exactly."""
    base = torch.randint(-2, 3, (1, 6, 4), generator=gen).float()
    m = base.repeat(1, 5, 1)                              # every key 5 times: 30 entries
    q = torch.randint(-2, 3, (1, 11, 4), generator=gen).float()
    v = torch.randn(1, 30, 3, generator=gen)
    for k in (1, 3, 5, 7, 30):
        usage = torch.zeros(1, 30)
        _, (idx, w) = vk.topk_memory_read(q, m, v, k, usage=usage, return_topk=True)
        _, o_idx, _, hits, _ = oracle.topk_read(q, m, v, k, 0.5)
        assert torch.equal(idx, o_idx), k
        assert torch.equal(usage.double(), hits)


def test_non_contiguous_inputs(gen):
    q = torch.randn(2, 16, 50, generator=gen).transpose(1, 2)       # [2, 50, 16] strided
    m = torch.randn(2, 400, 32, generator=gen)[:, :, ::2]           # [2, 400, 16] strided
    v = torch.randn(2, 6, 400, generator=gen).transpose(1, 2)
    usage = torch.zeros(2, 800)[:, ::2]                              # strided counters
    out = vk.topk_memory_read(q, m, v, 10, usage=usage)
    r, _, _, hits, _ = oracle.topk_read(q, m, v, 10, 0.25)
    ok = oracle.topk_unambiguous(q, m, 10, 0.25)
    torch.testing.assert_close(out[ok].double(), r[ok], atol=2e-5, rtol=1e-5)
    if bool(ok.all()):
        assert torch.equal(usage.double(), hits)
    assert float(usage.sum()) == 2 * 50 * 10


def test_nan_propagates():
    q = torch.randn(1, 6, 8)
    m = torch.randn(1, 40, 8)
    v = torch.randn(1, 40, 3)
    q_nan = q.clone()
    q_nan[0, 2, 3] = float("nan")
    out = vk.topk_memory_read(q_nan, m, v, 5)
    assert torch.isnan(out[0, 2]).all() and not torch.isnan(out[0, [0, 1, 3, 4, 5]]).any()
    m_nan = m.clone()
    m_nan[0, 17, 0] = float("nan")
    out, (idx, _) = vk.topk_memory_read(q, m_nan, v, 5, return_topk=True)
    assert torch.isnan(out).all()                        # the NaN entry ranks first everywhere
    assert (idx[..., 0] == 17).all()


def test_reference_is_stcn_dense_path_and_agrees(gen):
    q, m, v = inputs(gen, 2, 30, 400, 16, 5)
    u1, u2 = torch.zeros(2, 400), torch.zeros(2, 400)
    a = vk.topk_memory_read(q, m, v, 20, usage=u1, usage_mode="weights")
    b = R.topk_memory_read(q, m, v, 20, usage=u2, usage_mode="weights")
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(u1, u2, atol=1e-5, rtol=1e-5)
    vk.set_backend("reference")
    u3 = torch.zeros(2, 400)
    c = vk.topk_memory_read(q, m, v, 20, usage=u3, usage_mode="weights")
    torch.testing.assert_close(c, b, atol=0, rtol=0)
    torch.testing.assert_close(u3, u2, atol=0, rtol=0)


def test_gradcheck_float64(gen):
    read5 = lambda q, m, v: vk.topk_memory_read(q, m, v, 5)  # noqa: E731
    weights4 = lambda q, m, v: vk.topk_memory_read(q, m, v, 4, return_topk=True)[1][1]  # noqa: E731
    # the k + 1 largest affinities apart by more than a finite difference moves them (a
    # near tie swaps the selection or the order of the weights between the two evaluations)
    q, m, v = oracle.draw_separated(
        lambda: inputs(gen, 2, 7, 40, 6, 3, dtype=torch.float64, requires_grad=True),
        lambda *x: min(oracle.kink_margin(read5, *x)[0], oracle.kink_margin(weights4, *x)[0]))
    assert torch.autograd.gradcheck(read5, (q, m, v))
    assert torch.autograd.gradcheck(weights4, (q, m, v))


def test_gradients_match_oracle_float32(gen):
    q, m, v = inputs(gen, 2, 50, 600, 16, 8, requires_grad=True)
    out = vk.topk_memory_read(q, m, v, 20)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, m, v), g)
    r = oracle.topk_read(q, m, v, 20, 0.25)[0]
    want = torch.autograd.grad(r, (q, m, v), g.double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b.double(), atol=2e-4, rtol=1e-4)


def test_opcheck(gen):
    q, m, v = inputs(gen, 2, 20, 100, 8, 4, requires_grad=True)
    op = torch.ops.vos_kernels.topk_memory_read
    for usage, mode in ((torch.zeros(2, 100), 1), (torch.zeros(2, 100), 2), (None, 0)):
        torch.library.opcheck(op, (q, m, v, 5, 0.3, usage, mode))


def test_torch_compile_fullgraph(gen):
    q, m, v = inputs(gen, 1, 30, 200, 8, 4, requires_grad=True)
    fn = torch.compile(lambda q, m, v, u: vk.topk_memory_read(q, m, v, 7, usage=u), fullgraph=True)
    u1, u2 = torch.zeros(1, 200), torch.zeros(1, 200)
    a = fn(q, m, v, u1)
    b = vk.topk_memory_read(q, m, v, 7, usage=u2)
    torch.testing.assert_close(a, b)
    assert torch.equal(u1, u2) and u1.sum() == 30 * 7
    ga = torch.autograd.grad(a.sum(), (q, m, v))
    gb = torch.autograd.grad(b.sum(), (q, m, v))
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y)


def test_deterministic(gen):
    q, m, v = inputs(gen, 2, 300, 3000, 32, 8)
    runs = []
    for _ in range(2):
        u = torch.zeros(2, 3000)
        out = vk.topk_memory_read(q, m, v, 20, usage=u, usage_mode="weights")
        runs.append((out, u))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("case", [
    ("k", dict(k=0)),
    ("k", dict(k=2.5)),
    ("memory_key", dict(m=torch.randn(1, 50, 9))),
    ("memory_key", dict(m=torch.randn(2, 50, 8))),
    ("memory_value", dict(v=torch.randn(1, 49, 4))),
    ("memory_key", dict(m=torch.randn(1, 0, 8))),
    ("query_key", dict(q=torch.randn(10, 8))),
    ("memory_key", dict(m=torch.randn(1, 50, 8, dtype=torch.float64))),
    ("usage", dict(usage=torch.zeros(1, 49))),
    ("usage", dict(usage=torch.zeros(1, 50, dtype=torch.float64))),
    ("usage", dict(usage=torch.zeros(1, 50, dtype=torch.int64))),
    ("usage_mode", dict(usage_mode="log_hits")),
    ("scale", dict(scale=-1.0)),
    ("scale", dict(scale=float("nan"))),
], ids=lambda c: c[0] + "-" + "-".join(c[1]))
def test_bad_input_raises_and_mutates_nothing(case):
    name, change = case
    args = dict(q=torch.randn(1, 10, 8), m=torch.randn(1, 50, 8), v=torch.randn(1, 50, 4), k=5,
                usage=torch.zeros(1, 50), usage_mode="hits", scale=None)
    args.update(change)
    before = args["usage"].clone()
    with pytest.raises(ValueError, match=f"^{name}:"):
        vk.topk_memory_read(args["q"], args["m"], args["v"], args["k"], scale=args["scale"],
                            usage=args["usage"], usage_mode=args["usage_mode"])
    assert torch.equal(args["usage"], before)


def test_rows_sum_sorted_path_equals_index_add(gen):
    """The top-k backward's scatter to memory rows: the sorted, in-order path that CUDA
    takes (bitwise reproducible) gives index_add_'s sums, empty rows 0."""
    from vos_kernels._ops import rows_sum

    flat = torch.randint(0, 40, (500,), generator=gen)
    flat[flat == 7] = 8                                   # row 7 receives nothing
    contrib = torch.randn(500, 6, generator=gen, dtype=torch.float64)
    want = torch.zeros(40, 6, dtype=torch.float64).index_add_(0, flat, contrib)
    got = rows_sum(flat, contrib, 40, deterministic=True)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12) and (got[7] == 0).all()
    assert torch.equal(rows_sum(flat, contrib, 40, deterministic=False), want)
