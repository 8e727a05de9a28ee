"""vos_models.stcn: the STCN-style MemoryReader (bounded by the LFU bank or not, fused or
STCN's dense read) and the training-free propagation behind ``segment --method stcn-lfu``."""
import pytest
import torch
import torch.nn.functional as F

import oracle
from vos_models.stcn import MemoryReader, TrainingFreeSTCN, soft_one_hot


def frames(gen, n, CK=16, CV=6, H=5, W=7):
    return [(torch.randn(2, CK, H, W, generator=gen), torch.randn(2, CV, H, W, generator=gen)) for _ in range(n)]


def test_unbounded_fused_equals_stcn_dense_read_and_the_oracle(gen):
    fused = MemoryReader(16, 6, top_k=7, mem_every=2)
    dense = MemoryReader(16, 6, top_k=7, mem_every=2, matching="reference")
    seq = frames(gen, 9)
    written = []
    for t, (k, v) in enumerate(seq):
        if t:
            a, b = fused(k), dense(k)
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
            mk = torch.cat([x.flatten(2).transpose(1, 2) for x, _ in written], 1)
            mv = torch.cat([y.flatten(2).transpose(1, 2) for _, y in written], 1)
            r = oracle.topk_read(k.flatten(2).transpose(1, 2), mk, mv, 7, 16 ** -0.5)[0]
            torch.testing.assert_close(a.flatten(2).transpose(1, 2).double(), r, atol=2e-5, rtol=1e-5)
        if fused.should_write(t):
            assert fused.write(k, v, t) == 0 and dense.write(k, v, t) == 0
            written.append((k, v))
    assert fused.frames_written == [0, 2, 4, 6, 8] and fused.size == 5 * 35


def test_bounded_reader_equals_unbounded_until_it_is_full(gen):
    big = MemoryReader(16, 6, top_k=5, mem_every=1, capacity_frames=50)
    plain = MemoryReader(16, 6, top_k=5, mem_every=1)
    for t, (k, v) in enumerate(frames(gen, 6)):
        if t:
            torch.testing.assert_close(big(k), plain(k), atol=0, rtol=0)
        big.write(k, v, t)
        plain.write(k, v, t)
    assert big.bank.evicted_total == 0 and big.size == plain.size


def test_bounded_reader_keeps_capacity_and_frame_zero(gen):
    reader = MemoryReader(16, 6, top_k=5, mem_every=1, capacity_frames=2.5)
    seq = frames(gen, 12)
    for t, (k, v) in enumerate(seq):
        if t:
            reader(k)
        reader.write(k, v, t)
        assert reader.size <= reader.bank.capacity == round(2.5 * 35)
    births = reader.bank.birth[0, : reader.size]
    assert int((births == 0).sum()) == 35                       # frame 0 protected
    assert int(births.max()) == 11                              # the latest frame was added
    first = reader.bank.keys[:, : reader.size][:, births == 0]
    torch.testing.assert_close(first, seq[0][0].flatten(2).transpose(1, 2))


@pytest.mark.parametrize("kwargs, name", [
    (dict(key_dim=0), "key_dim"), (dict(top_k=0), "top_k"), (dict(mem_every=0), "mem_every"),
    (dict(capacity_frames=1.5), "capacity_frames"), (dict(capacity_frames=0.5, protect_first=False), "capacity_frames"),
    (dict(usage_mode="lru"), "usage_mode"), (dict(matching="dense"), "matching"),
    (dict(capacity_frames=3, matching="reference"), "matching"),
])
def test_bad_arguments_raise_value_error(kwargs, name):
    args = dict(key_dim=8, value_dim=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=f"^{name}:"):
        MemoryReader(**args)


def test_reader_shape_errors(gen):
    reader = MemoryReader(16, 6)
    with pytest.raises(RuntimeError, match="write a frame"):
        reader(torch.randn(1, 16, 4, 4))
    with pytest.raises(ValueError, match="^key:"):
        reader.write(torch.randn(1, 15, 4, 4), torch.randn(1, 6, 4, 4), 0)
    with pytest.raises(ValueError, match="^value:"):
        reader.write(torch.randn(1, 16, 4, 4), torch.randn(1, 6, 4, 5), 0)


def test_soft_one_hot_is_the_area_fraction():
    labels = torch.tensor([[0, 0, 1, 1], [0, 2, 1, 1], [2, 2, 0, 0], [2, 2, 0, 1]])
    v = soft_one_hot(labels, 3, (2, 2))
    torch.testing.assert_close(v.sum(1), torch.ones(1, 2, 2))
    torch.testing.assert_close(v[0, :, 0, 0], torch.tensor([0.75, 0.0, 0.25]))
    torch.testing.assert_close(v[0, :, 1, 1], torch.tensor([0.75, 0.25, 0.0]))
    torch.testing.assert_close(v[0, :, 0, 1], torch.tensor([0.0, 1.0, 0.0]))


def _scene(t, H=32, W=48):
    """Features of a textured background and a square of a distinct texture moving 1 px/frame
    at stride 8 (so 8 output px), at strides 8 and 16, plus the square's mask."""
    g = torch.Generator().manual_seed(0)
    bg8, obj8 = torch.randn(12, H, W, generator=g), torch.randn(12, 1, 1, generator=g) + 2.0
    y0, x0 = 8, 4 + t
    feat8 = bg8.clone()
    feat8[:, y0:y0 + 10, x0:x0 + 10] = obj8 + 0.3 * torch.randn(12, 10, 10, generator=g)
    feat16 = F.avg_pool2d(feat8.unsqueeze(0), 2)[0]
    mask = torch.zeros(H * 8, W * 8, dtype=torch.long)
    mask[y0 * 8:(y0 + 10) * 8, x0 * 8:(x0 + 10) * 8] = 1
    return {8: feat8.unsqueeze(0), 16: feat16.unsqueeze(0)}, mask


@pytest.mark.parametrize("capacity", [2, None])
def test_training_free_stcn_tracks_a_moving_square(capacity):
    model = TrainingFreeSTCN(capacity_frames=capacity, mem_every=2, top_k=10)
    feats, mask = _scene(0)
    model.start(feats, mask, 2)
    for t in range(1, 15):
        feats, mask = _scene(t)
        pred = model.step(feats)
        iou = float(((pred == 1) & (mask == 1)).sum()) / float(((pred == 1) | (mask == 1)).sum())
        assert iou > 0.9, (t, iou)
    if capacity is not None:
        assert model.memory_entries == 2 * 32 * 48 and model.evicted > 0
    else:
        assert model.memory_entries == 8 * 32 * 48


def test_training_free_stcn_rejects_bad_first_mask():
    feats, mask = _scene(0)
    model = TrainingFreeSTCN()
    with pytest.raises(ValueError, match="no object pixel"):
        model.start(feats, torch.zeros_like(mask), 2)
    with pytest.raises(ValueError, match="^labels:"):
        model.start(feats, mask + 5, 2)
    with pytest.raises(RuntimeError, match="start"):
        TrainingFreeSTCN().step(feats)
    with pytest.raises(ValueError, match="^features:"):
        model.start({8: feats[8]}, mask, 2)
