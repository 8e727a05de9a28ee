"""Size limits of the Triton backend (vos_kernels/triton/_limits.py).

* Batches larger than CUDA's grid allows (65535 programs along y and z, where every
  Triton kernel keeps the batch) run over batch slices in the op entries of
  ``vos_kernels.triton``: checked with the slice lowered to 2, against one launch.
* Counts the kernels index in int32 (pixels, memory entries, points, padded prototype
  rows) raise ValueError, first thing in each host function: checked on meta tensors
  (shapes without memory; the checks come before the device check, so this holds on a
  GPU too).
* Grid axes other than the batch past CUDA's limits raise ValueError.
* Labels outside [0, num_labels) are ignored by every Triton matching kernel, int64
  labels of 2^32 included (they were cast to int32, wrapping to 0).

Without CUDA the kernels run under the Triton interpreter (conftest.py sets
TRITON_INTERPRET=1), so inputs are small.
"""
import importlib

import pytest
import torch

import vos_kernels.triton as vt
from vos_kernels.triton import _limits

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BIG = 2**31       # above INDEX_LIMIT


def randn(g, *shape):
    return torch.randn(*shape, generator=g).to(DEV)


def randint(g, lo, hi, *shape):
    return torch.randint(lo, hi, shape, generator=g).to(DEV)


def positive(g, *shape):
    return (torch.rand(*shape, generator=g) + 0.25).to(DEV)


def op_inputs(g, name, B):
    """Arguments of the op ``name`` with batch B (small shapes)."""
    q, r, lab = randn(g, B, 3, 4, 8), randn(g, B, 2, 3, 4, 8), randint(g, -1, 3, B, 2, 3, 4)
    img, prev_lab = randn(g, B, 4, 5, 8), randint(g, -1, 3, B, 4, 5)
    bias = torch.tensor([-0.3, 0.2, 0.1], device=DEV)
    x, mean, var = randn(g, B, 30, 4), randn(g, B, 3, 4), positive(g, B, 3, 4)
    w = torch.softmax(randn(g, B, 30, 3), -1)
    return {
        "labelled_nearest_sqdist": (q, r, lab, 3, 1),
        "fb_global_matching": (q, r, lab, 3, bias, 2),
        "fb_multi_local_matching": (img, randn(g, B, 4, 5, 8), prev_lab, 3, [1, 2], bias, 1),
        "fb_instance_pooling": (img, prev_lab, 3),
        "nearest_sqdist_backward": (randn(g, B, 3, 12), randn(g, B, 12, 8), randn(g, B, 24, 8),
                                    randint(g, -1, 24, B, 3, 12)),
        "topk_memory_read": (randn(g, B, 6, 8), randn(g, B, 20, 8), randn(g, B, 20, 4), 3, 0.35,
                             torch.rand(B, 20, generator=g).to(DEV), 2),
        "gmm_em": (randn(g, B, 30, 8), randn(g, B, 3, 8), 2, 5.0, torch.rand(B, 30, generator=g).to(DEV), 1, True),
        "prototype_values": (randn(g, B, 30, 4), w),
        "prototype_attention": (randn(g, B, 6, 8), randn(g, B, 3, 8), randn(g, B, 3, 4), 2.0, 0),
        "diag_gmm_log_prob": (x, mean, var),
        "diag_gmm_log_prob_backward": (randn(g, B, 30, 3), x, mean, var),
        "diag_gmm_fit": (x, w, positive(g, 3, 4) * 0.1),
        "diag_gmm_fit_backward": (randn(g, B, 3, 4), randn(g, B, 3, 4), x, w, mean),
    }[name]


def host_function(name):
    """The module function behind the op entry (one launch per kernel)."""
    module = importlib.import_module(f"vos_kernels.triton.{vt._MODULE.get(name, 'matching')}")
    assert vt._host_function(name) is getattr(module, name)
    return getattr(module, name)


def outputs(result):
    return result if isinstance(result, tuple) else (result,)


@pytest.mark.parametrize("name", vt.__all__)
def test_batch_slices_match_one_launch(gen, name, monkeypatch):
    B = 5
    args = op_inputs(gen, name, B)
    fn = host_function(name)
    calls = []

    def counted(*a):
        calls.append(a[0].shape[0])
        return fn(*a)

    monkeypatch.setattr(_limits, "BATCH_SLICE", 2)
    sliced_args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]   # usage is updated in place
    usage_before = args[5].clone() if name == "topk_memory_read" else None
    got = vt._batch_sliced(name, counted)(*sliced_args)
    want = fn(*args)
    assert calls == [2, 2, 1], "three slices of at most 2"
    for g_out, w_out in zip(outputs(got), outputs(want), strict=True):
        assert g_out.shape == w_out.shape and g_out.dtype == w_out.dtype
        if g_out.is_floating_point():
            # the split reductions may pick other splits for another batch size on a GPU
            torch.testing.assert_close(g_out, w_out, rtol=1e-5, atol=1e-6, equal_nan=True)
        else:
            assert torch.equal(g_out, w_out)
    if name == "topk_memory_read":       # usage [B, Nm], updated in place through each slice's view
        torch.testing.assert_close(sliced_args[5], args[5], rtol=1e-6, atol=1e-6)
        assert not torch.equal(args[5], usage_before)


def test_batch_slices_check_the_batch(gen, monkeypatch):
    monkeypatch.setattr(_limits, "BATCH_SLICE", 2)
    q, r, lab, L, rate = op_inputs(gen, "labelled_nearest_sqdist", 5)
    with pytest.raises(ValueError, match="argument 1 must have the batch size B=5"):
        vt._batch_sliced("labelled_nearest_sqdist", host_function("labelled_nearest_sqdist"))(q, r[:4], lab, L, rate)


def test_op_entries_slice_the_batch():
    """The names of vos_kernels.triton (what the registered ops call) are the sliced entries."""
    for name in vt.__all__:
        entry = getattr(vt, name)
        assert entry.__name__ == name and entry is not host_function(name)
        assert entry is getattr(vt, name)            # built once


@pytest.mark.parametrize("name", ["fb_global_matching", "prototype_attention"])
def test_public_api_runs_the_slices(gen, name, monkeypatch):
    """``vos_kernels.<op>`` with backend "triton" reaches the kernels through the sliced op
    entries (forward, and on CUDA the matching backward kernel), and gives the C++ op's
    values and gradients."""
    import vos_kernels as vk

    module = importlib.import_module(f"vos_kernels.triton.{vt._MODULE.get(name, 'matching')}")
    seen = []
    for fname in (name, "nearest_sqdist_backward"):
        fn = getattr(module, fname, None)
        if fn is not None:
            monkeypatch.setattr(module, fname,
                                lambda *a, fn=fn, fname=fname: seen.append((fname, a[0].shape[0])) or fn(*a))
    monkeypatch.setattr(_limits, "BATCH_SLICE", 2)
    args = [a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() and i < 2 else a
            for i, a in enumerate(op_inputs(gen, name, 5))]
    if name == "prototype_attention":
        args[4] = "dot"
    vk.set_backend("triton")
    try:
        got = outputs(getattr(vk, name)(*args))[0]
        got.sum().backward()
        grads = [a.grad.clone() for a in args[:2]]
    finally:
        vk.set_backend("auto")
    for a in args[:2]:
        a.grad = None
    want = outputs(getattr(vk, name)(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in args]))[0]
    want.sum().backward()
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-5)
    for g_got, a in zip(grads, args[:2]):
        torch.testing.assert_close(g_got.cpu(), a.grad.cpu(), rtol=1e-4, atol=1e-5)
    assert [b for f, b in seen if f == name] == [2, 2, 1]
    if name == "fb_global_matching" and DEV.type == "cuda":     # on CPU tensors the backward is the C++ op
        assert [b for f, b in seen if f == "nearest_sqdist_backward"] == [2, 2, 1]


def meta(*shape, dtype=torch.float32):
    """A meta tensor of ``shape`` (no memory, no data): the checks read shapes only, and an
    op that went past a missing check fails at once on it instead of allocating gigabytes."""
    return torch.empty(shape, device="meta", dtype=dtype)


def meta_labels(*shape):
    return meta(*shape, dtype=torch.int64)


S15 = 2**15
INDEX_CASES = {
    "global reference pixels": ("labelled_nearest_sqdist", "T\\*Hr\\*Wr",
                                lambda: (meta(1, 1, 1, 1), meta(1, 2, S15, S15, 1), meta_labels(1, 2, S15, S15),
                                         2, 1)),
    "global query pixels": ("fb_global_matching", "H\\*W",
                            lambda: (meta(1, 2 * S15, S15, 1), meta(1, 1, 1, 1, 1), meta_labels(1, 1, 1, 1), 2,
                                     torch.zeros(2, device=DEV), 1)),
    "local pixels": ("fb_multi_local_matching", "H\\*W",
                     lambda: (meta(1, 2 * S15, S15, 1), meta(1, 2 * S15, S15, 1), meta_labels(1, 2 * S15, S15),
                              2, [1], torch.zeros(2, device=DEV), 1)),
    "local fg planes": ("fb_multi_local_matching", "K\\*H\\*W",
                        lambda: (meta(1, S15, S15 // 2, 1), meta(1, S15, S15 // 2, 1),
                                 meta_labels(1, S15, S15 // 2), 2, [1, 2, 3, 4], torch.zeros(2, device=DEV), 1)),
    "local frame side": ("fb_multi_local_matching", "H and W must be below 2\\^30",
                         lambda: (meta(1, 1, 2**30, 1), meta(1, 1, 2**30, 1), meta_labels(1, 1, 2**30), 2, [1],
                                  torch.zeros(2, device=DEV), 1)),
    "backward query pixels": ("nearest_sqdist_backward", "Nq",
                              lambda: (meta(1, 1, BIG), meta(1, BIG, 1), meta(1, 1, 1), meta_labels(1, 1, BIG))),
    "top-k memory entries": ("topk_memory_read", "Nm",
                             lambda: (meta(1, 1, 1), meta(1, BIG, 1), meta(1, BIG, 1), 1, 1.0, None, 0)),
    "top-k queries": ("topk_memory_read", "Nq",
                      lambda: (meta(1, BIG, 1), meta(1, 1, 1), meta(1, 1, 1), 1, 1.0, None, 0)),
    "EM points": ("gmm_em", "N \\(points\\)",
                  lambda: (meta(1, BIG, 1), meta(1, 2, 1), 1, 1.0, None, 0, False)),
    "EM prototype rows": ("gmm_em", "16 x C",
                          lambda: (meta(1, 4, 2**27), meta(1, 16, 2**27), 1, 1.0, None, 0, False)),
    "prototype values points": ("prototype_values", "N \\(points\\)",
                                lambda: (meta(1, BIG, 1), meta(1, BIG, 2))),
    "prototype values rows": ("prototype_values", "16 x CV",
                              lambda: (meta(1, 4, 2**27), meta(1, 4, 3))),
    "prototype attention queries": ("prototype_attention", "N \\(points\\)",
                                    lambda: (meta(1, BIG, 1), meta(1, 2, 1), meta(1, 2, 1), 1.0, 0)),
    "A-GAME log-likelihood points": ("diag_gmm_log_prob", "N \\(points\\)",
                                     lambda: (meta(1, BIG, 1), meta(1, 2, 1), meta(1, 2, 1))),
    "A-GAME log-likelihood backward": ("diag_gmm_log_prob_backward", "N \\(points\\)",
                                       lambda: (meta(1, BIG, 2), meta(1, BIG, 1), meta(1, 2, 1),
                                                meta(1, 2, 1))),
    "A-GAME fit points": ("diag_gmm_fit", "N \\(points\\)",
                          lambda: (meta(1, BIG, 1), meta(1, BIG, 2), meta(2, 1))),
    "A-GAME fit backward rows": ("diag_gmm_fit_backward", "16 x D",
                                 lambda: (meta(1, 2, 2**27), meta(1, 2, 2**27), meta(1, 3, 2**27),
                                          meta(1, 3, 2), meta(1, 2, 2**27))),
}


@pytest.mark.parametrize("case", list(INDEX_CASES))
def test_int32_counts_raise(case):
    name, what, make = INDEX_CASES[case]
    args = make()
    with pytest.raises(ValueError, match=f"{name}: {what}.* int32 indexing of the Triton kernels"):
        getattr(vt, name)(*args)


def test_launch_grid_limits():
    assert _limits.launch_grid("op", a=2**31 - 1, b=65535, c=65535) == (2**31 - 1, 65535, 65535)
    with pytest.raises(ValueError, match="op: 2147483648 query blocks exceed .*axis x"):
        _limits.launch_grid("op", query_blocks=2**31)
    with pytest.raises(ValueError,
                       match="op: 65536 labels exceed the CUDA grid limit \\(65535 programs along grid axis y"):
        _limits.launch_grid("op", query_blocks=1, labels=65536, batch_elements=1)
    with pytest.raises(ValueError, match="axis z"):
        _limits.launch_grid("op", a=1, b=1, batch_elements=65536)


GRID_CASES = {
    # L labels on grid axis y of the global kernel
    "global labels": ("fb_global_matching", "65536 labels",
                      lambda g: (randn(g, 1, 1, 1, 4), randn(g, 1, 1, 1, 1, 4),
                                 torch.zeros(1, 1, 1, 1, dtype=torch.int64, device=DEV), 65536,
                                 torch.zeros(65536, device=DEV), 1)),
    # 64 windows: one label per program, L label groups on axis y
    "local label groups": ("fb_multi_local_matching", "65536 label groups",
                           lambda g: (randn(g, 1, 1, 1, 4), randn(g, 1, 1, 1, 4),
                                      torch.zeros(1, 1, 1, dtype=torch.int64, device=DEV), 65536, list(range(1, 65)),
                                      torch.zeros(65536, device=DEV), 1)),
    # channel blocks of 64 on axis y
    "pooling channels": ("fb_instance_pooling", "65536 channel blocks",
                         lambda g: (randn(g, 1, 1, 1, 65536 * 64), torch.zeros(1, 1, 1, dtype=torch.int64, device=DEV),
                                    1)),
    "backward channels": ("nearest_sqdist_backward", "65536 channel blocks",
                          lambda g: (randn(g, 1, 1, 1), randn(g, 1, 1, 65536 * 64), randn(g, 1, 1, 65536 * 64),
                                     torch.zeros(1, 1, 1, dtype=torch.int64, device=DEV))),
    "prototype values channels": ("prototype_values", "65536 value blocks",
                                  lambda g: (randn(g, 1, 1, 65536 * 64), torch.ones(1, 1, 1, device=DEV))),
}


@pytest.mark.parametrize("case", list(GRID_CASES))
def test_grid_axes_past_the_limit_raise(gen, case):
    name, what, make = GRID_CASES[case]
    with pytest.raises(ValueError, match=f"{name}: {what} exceed the CUDA grid limit"):
        getattr(vt, name)(*make(gen))


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_labels_outside_range_are_ignored(gen, dtype):
    """Direct op calls (the public API rejects these labels): a label >= num_labels, and an
    int64 label of 2^32 (which an int32 cast wraps to 0), match like -1 (ignore)."""
    L = 3
    q, p = randn(gen, 2, 5, 6, 8), randn(gen, 2, 5, 6, 8)
    lab = randint(gen, 0, L, 2, 5, 6)
    odd = torch.rand(2, 5, 6, generator=gen).to(DEV) < 0.3
    assert odd.any()
    outside = [L, 7] + ([2**32] if dtype == torch.int64 else [2**31 - 1])
    ignored = torch.where(odd, -1, lab).to(dtype)
    bias = torch.tensor([-0.3, 0.2, 0.1], device=DEV)
    want_local = vt.fb_multi_local_matching(q, p, ignored, L, [1, 2], bias, 1)
    want_pool = vt.fb_instance_pooling(q, ignored, L)
    wrapped = torch.where(odd, 0, lab).to(dtype)         # what a wrapped 2^32 would give
    assert not torch.equal(vt.fb_multi_local_matching(q, p, wrapped, L, [1, 2], bias, 1)[2], want_local[2])
    assert not torch.equal(vt.fb_instance_pooling(q, wrapped, L), want_pool)
    for value in outside:
        bad = torch.where(odd, value, lab).to(dtype)
        for got, want in zip(vt.fb_multi_local_matching(q, p, bad, L, [1, 2], bias, 1), want_local, strict=True):
            assert torch.equal(got, want), value
        assert torch.equal(vt.fb_instance_pooling(q, bad, L), want_pool), value
