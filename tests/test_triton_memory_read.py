"""Triton kernel of topk_memory_read (vos_kernels/triton/memory.py) against the float64
brute-force oracle, the C++ CPU kernel, and through the public API with
``set_backend("triton")``. Without CUDA it runs under the Triton interpreter
(TRITON_INTERPRET=1, set by conftest.py), so shapes are small."""
import math

import pytest
import torch

import oracle
import vos_kernels as vk

pytestmark = pytest.mark.skipif("triton" not in vk.available_backends(), reason="triton backend unavailable")

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def inputs(gen, B, Nq, Nm, CK, CV, dtype=torch.float32, requires_grad=False):
    t = [torch.randn(B, n, c, generator=gen, dtype=torch.float64).to(dtype).to(DEV) for n, c in
         ((Nq, CK), (Nm, CK), (Nm, CV))]
    return [x.requires_grad_(requires_grad) for x in t]


def tk(*args, **kwargs):
    from vos_kernels.triton import memory as tm
    return tm.topk_memory_read(*args, **kwargs)


SHAPES = [  # B, Nq, Nm, CK, CV, k
    (1, 37, 300, 16, 8, 20),      # several memory tiles, k not a power of 2
    (2, 20, 150, 64, 24, 20),     # CK = 64, CV = 3 objects x 8
    (2, 40, 30, 8, 4, 5),         # Nm < Nq
    (1, 9, 12, 4, 3, 1),          # k = 1
    (2, 9, 12, 4, 3, 12),         # k = Nm
    (1, 5, 7, 4, 3, 50),          # k > Nm: k' = Nm
    (1, 18, 100, 80, 3, 33),      # CK > one channel block, KP = 64 > k
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mode", [1, 2])
def test_kernel_against_float64_oracle(gen, shape, mode):
    B, Nq, Nm, CK, CV, k = shape
    q, m, v = inputs(gen, B, Nq, Nm, CK, CV)
    start = torch.rand(B, Nm, generator=gen).to(DEV)
    usage = start.clone()
    scale = 1 / math.sqrt(CK)
    out, idx, w = tk(q, m, v, k, scale, usage, mode)
    r, o_idx, o_w, hits, wsum = oracle.topk_read(q.cpu(), m.cpu(), v.cpu(), k, scale)
    K = min(k, Nm)
    assert out.shape == (B, Nq, CV) and idx.shape == (B, Nq, K) and w.shape == (B, Nq, K)
    assert out.dtype == torch.float32 and idx.dtype == torch.int64 and w.dtype == torch.float32
    ok = oracle.topk_unambiguous(q.cpu(), m.cpu(), k, scale)      # float64 near-ties left out
    assert ok.float().mean() > 0.5
    idx, w, out = idx.cpu(), w.cpu(), out.cpu()
    assert torch.equal(idx[ok], o_idx[ok])
    torch.testing.assert_close(w[ok].double(), o_w[ok], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(out[ok].double(), r[ok], atol=2e-5, rtol=1e-5)
    own = oracle.usage_of(idx, w, Nm, hits=mode == 1)
    torch.testing.assert_close(usage.cpu().double(), start.cpu().double() + own, atol=1e-4, rtol=1e-6)
    if bool(ok.all()):
        expect = start.cpu().double() + (hits if mode == 1 else wsum)
        torch.testing.assert_close(usage.cpu().double(), expect, atol=1e-4, rtol=1e-6)


@pytest.mark.parametrize("splits", [2, 4, 8])
@pytest.mark.parametrize("shape", [(2, 21, 300, 16, 5, 20), (1, 9, 100, 8, 3, 33), (1, 6, 40, 4, 2, 3)],
                         ids=lambda s: "x".join(map(str, s)))
def test_memory_splits_give_the_same_result(gen, shape, splits):
    """Memory split over programs (partial top-KP per split, then the merge kernel): the
    same indices and weights as one split, including splits that hold no memory row."""
    B, Nq, Nm, CK, CV, k = shape
    q, m, v = inputs(gen, B, Nq, Nm, CK, CV)
    u1, u2 = torch.zeros(B, Nm, device=DEV), torch.zeros(B, Nm, device=DEV)
    one = tk(q, m, v, k, 0.4, u1, 1, memory_splits=1)
    many = tk(q, m, v, k, 0.4, u2, 1, memory_splits=splits)
    for a, b in zip(one, many):
        assert torch.equal(a, b)
    assert torch.equal(u1, u2)
    _, o_idx, _, _, _ = oracle.topk_read(q.cpu(), m.cpu(), v.cpu(), k, 0.4)
    ok = oracle.topk_unambiguous(q.cpu(), m.cpu(), k, 0.4)
    assert torch.equal(many[1].cpu()[ok], o_idx[ok])


def test_memory_splits_must_be_a_power_of_two(gen):
    q, m, v = inputs(gen, 1, 4, 20, 4, 2)
    with pytest.raises(ValueError, match="memory_splits"):
        tk(q, m, v, 3, 0.5, None, 0, memory_splits=3)


def test_direct_call_refuses_k_below_one_and_an_empty_memory(gen):
    """As the CPU and CUDA C++ ops (the public API checks both before any backend)."""
    q, m, v = inputs(gen, 1, 4, 20, 4, 2)
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        tk(q, m, v, 0, 0.5, None, 0)
    with pytest.raises(ValueError, match="the memory is empty"):
        tk(q, m[:, :0], v[:, :0], 3, 0.5, None, 0)


def test_no_usage_leaves_nothing_touched(gen):
    q, m, v = inputs(gen, 1, 10, 70, 8, 4)
    out, idx, w = tk(q, m, v, 6, 0.3, None, 0)
    r, o_idx, _, _, _ = oracle.topk_read(q.cpu(), m.cpu(), v.cpu(), 6, 0.3)
    ok = oracle.topk_unambiguous(q.cpu(), m.cpu(), 6, 0.3)
    assert torch.equal(idx.cpu()[ok], o_idx[ok])
    torch.testing.assert_close(out.cpu()[ok].double(), r[ok], atol=2e-5, rtol=1e-5)


def test_ties_pick_the_lowest_index(gen):
    """Integer keys give exact affinities; every key appears 5 times, so ties are exact and
    straddle memory tiles (32 rows under the interpreter)."""
    base = torch.randint(-2, 3, (1, 9, 4), generator=gen).float()
    m = base.repeat(1, 5, 1).to(DEV)                      # 45 entries
    q = torch.randint(-2, 3, (1, 11, 4), generator=gen).float().to(DEV)
    v = torch.randn(1, 45, 3, generator=gen).to(DEV)
    for k in (1, 3, 5, 7, 45):
        usage = torch.zeros(1, 45, device=DEV)
        _, idx, _ = tk(q, m, v, k, 0.5, usage, 1)
        _, o_idx, _, hits, _ = oracle.topk_read(q.cpu(), m.cpu(), v.cpu(), k, 0.5)
        assert torch.equal(idx.cpu(), o_idx), k
        assert torch.equal(usage.cpu().double(), hits), k


def test_signed_zero_and_negative_affinities_order_like_floats():
    """Affinities of mixed sign, exact zeros (from zero keys; -0 must tie with +0) and
    -inf-like large negatives: the packed integer order must be the float order."""
    m = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [-1.0, 0.0], [0.0, 0.0], [-30.0, 0.0], [2.0, 0.0]]]).to(DEV)
    q = torch.tensor([[[-1.0, 0.0], [1.0, 0.0], [0.0, 0.0]]]).to(DEV)
    v = torch.arange(6.0).view(1, 6, 1).to(DEV)
    _, idx, _ = tk(q, m, v, 6, 1.0, None, 0)
    _, o_idx, _, _, _ = oracle.topk_read(q.cpu(), m.cpu(), v.cpu(), 6, 1.0)
    assert torch.equal(idx.cpu(), o_idx)
    cpu = vk.topk_memory_read(q.cpu(), m.cpu(), v.cpu(), 6, scale=1.0, return_topk=True)[1][0]
    assert torch.equal(idx.cpu(), cpu)


def test_nan_ranks_first_and_propagates():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 6, 8, generator=g).to(DEV)
    m = torch.randn(1, 40, 8, generator=g).to(DEV)
    v = torch.randn(1, 40, 3, generator=g).to(DEV)
    q_nan = q.clone()
    q_nan[0, 2, 3] = float("nan")
    out, _, _ = tk(q_nan, m, v, 5, 0.35, None, 0)
    assert torch.isnan(out[0, 2]).all() and not torch.isnan(out[0, [0, 1, 3, 4, 5]]).any()
    m_nan = m.clone()
    m_nan[0, 17, 0] = float("nan")
    m_nan[0, 33, 1] = float("nan")
    out, idx, _ = tk(q, m_nan, v, 5, 0.35, None, 0)
    assert torch.isnan(out).all()
    assert (idx[..., 0] == 17).all() and (idx[..., 1] == 33).all()      # NaNs first, lowest index first
    assert torch.equal(tk(q, m_nan, v, 5, 0.35, None, 0, memory_splits=4)[1], idx)
    cpu = vk.topk_memory_read(q.cpu(), m_nan.cpu(), v.cpu(), 5, scale=0.35, return_topk=True)[1][0]
    assert torch.equal(idx.cpu()[..., :2], cpu[..., :2])


def test_public_api_triton_backend_equals_cpu_kernel(gen):
    """set_backend("triton"): strided inputs and counters; same indices as the C++ kernel,
    readout and usage equal to fp32 rounding."""
    vk.set_backend("triton")
    q = torch.randn(2, 16, 30, generator=gen).transpose(1, 2).to(DEV)      # [2, 30, 16] strided
    m = torch.randn(2, 200, 32, generator=gen)[:, :, ::2].to(DEV)          # [2, 200, 16] strided
    v = torch.randn(2, 6, 200, generator=gen).transpose(1, 2).to(DEV)
    for mode in ("hits", "weights"):
        usage = torch.zeros(2, 400, device=DEV)[:, ::2]
        out, (idx, w) = vk.topk_memory_read(q, m, v, 10, usage=usage, usage_mode=mode, return_topk=True)
        vk.set_backend("cpu")
        u_cpu = torch.zeros(2, 200)
        out_c, (idx_c, w_c) = vk.topk_memory_read(q.cpu(), m.cpu(), v.cpu(), 10, usage=u_cpu, usage_mode=mode,
                                                  return_topk=True)
        vk.set_backend("triton")
        ok = oracle.topk_unambiguous(q.cpu(), m.cpu(), 10, 0.25)     # tl.dot and BLAS round differently
        assert torch.equal(idx.cpu()[ok], idx_c[ok])
        torch.testing.assert_close(out.cpu()[ok], out_c[ok], atol=2e-6, rtol=1e-5)
        torch.testing.assert_close(w.cpu()[ok], w_c[ok], atol=1e-6, rtol=1e-5)
        if bool(ok.all()):
            torch.testing.assert_close(usage.cpu(), u_cpu, atol=1e-5, rtol=1e-6)


def test_gradients_match_oracle(gen):
    vk.set_backend("triton")
    q, m, v = inputs(gen, 2, 12, 90, 16, 8, requires_grad=True)
    out, (_, w) = vk.topk_memory_read(q, m, v, 7, return_topk=True)
    g, gw = torch.randn_like(out), torch.randn_like(w)
    got = torch.autograd.grad((out, w), (q, m, v), (g, gw))
    r, _, o_w, _, _ = oracle.topk_read(q.cpu(), m.cpu(), v.cpu(), 7, 0.25)
    want = torch.autograd.grad((r, o_w), (q, m, v), (g.cpu().double(), gw.cpu().double()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu().double(), b.double(), atol=2e-4, rtol=1e-4)


def test_half_inputs_compute_in_float32(gen):
    q, m, v = inputs(gen, 1, 10, 64, 16, 4, dtype=torch.float16)
    out, idx, _ = tk(q, m, v, 8, 0.25, None, 0)
    r, o_idx, _, _, _ = oracle.topk_read(q.cpu(), m.cpu(), v.cpu(), 8, 0.25)   # on the fp16 values
    ok = oracle.topk_unambiguous(q.cpu(), m.cpu(), 8, 0.25)
    assert out.dtype == torch.float32
    assert torch.equal(idx.cpu()[ok], o_idx[ok])
    torch.testing.assert_close(out.cpu()[ok].double(), r[ok], atol=2e-5, rtol=1e-5)


def test_float64_is_refused_with_a_clear_error():
    vk.set_backend("triton")
    x = torch.randn(1, 4, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64 runs on the 'cpu' or 'reference' backend"):
        vk.topk_memory_read(x, torch.randn(1, 9, 8, dtype=torch.float64), torch.randn(1, 9, 2, dtype=torch.float64), 3)
