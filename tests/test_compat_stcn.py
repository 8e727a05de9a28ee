"""vos_kernels.compat.stcn against straight ports of STCN's and XMem's dense formulas."""
import math

import pytest
import torch

from vos_kernels.compat import stcn


def stcn_dense_read(mem_k, mem_v, qk, top_k):
    """STCN inference read, as its formulas go: keys [1, CK, N], values [O, CV, N],
    qk [1, CK, HW]; affinity (2 mkᵀq − ‖mk‖²)/sqrt(CK), top-k softmax scattered into the
    dense [N, HW] matrix, bmm per object."""
    CK = mem_k.shape[1]
    aff = (2 * mem_k.transpose(1, 2) @ qk - mem_k.pow(2).sum(1).unsqueeze(2)) / math.sqrt(CK)
    vals, idx = torch.topk(aff, k=min(top_k, aff.shape[1]), dim=1)
    w = torch.softmax(vals, dim=1)
    dense = torch.zeros_like(aff).scatter_(1, idx, w)
    return torch.bmm(mem_v, dense.expand(mem_v.shape[0], -1, -1)), dense


def test_memory_bank_matches_stcn(gen):
    O, CK, CV, H, W = 3, 16, 8, 6, 7
    bank = stcn.MemoryBank(O, top_k=5)
    keys, values = [], []
    for t in range(4):
        k = torch.randn(1, CK, H, W, generator=gen)
        v = torch.randn(O, CV, H, W, generator=gen)
        bank.add_memory(k, v, is_temp=(t == 3))
        if t < 3 or t == 3:
            keys.append(k.flatten(2))
            values.append(v.flatten(2))
    qk = torch.randn(1, CK, H, W, generator=gen)
    got = bank.match_memory(qk)
    want, _ = stcn_dense_read(torch.cat(keys, 2), torch.cat(values, 2), qk.flatten(2), 5)
    assert got.shape == (O, CV, H, W)
    torch.testing.assert_close(got, want.view(O, CV, H, W), atol=2e-5, rtol=1e-5)
    # the temporary frame is flushed by the next add
    bank.add_memory(torch.randn(1, CK, H, W, generator=gen), torch.randn(O, CV, H, W, generator=gen))
    assert bank.temp_k is None and bank.mem_k.shape[1] == 4 * H * W


def test_memory_bank_bad_input(gen):
    bank = stcn.MemoryBank(2)
    with pytest.raises(ValueError, match="empty"):
        bank.match_memory(torch.randn(1, 8, 3, 3))
    with pytest.raises(ValueError, match="objects"):
        bank.add_memory(torch.randn(1, 8, 3, 3), torch.randn(3, 4, 3, 3))
    with pytest.raises(ValueError, match="value"):
        bank.add_memory(torch.randn(1, 8, 3, 3), torch.randn(2, 4, 3, 2))


def test_xmem_topk_readout_matches_do_softmax(gen):
    B, CK, CV, N, HW = 2, 16, 6, 300, 40
    mk = torch.randn(B, CK, N, generator=gen)
    qk = torch.randn(B, CK, HW, generator=gen)
    mv = torch.randn(B, CV, N, generator=gen)
    out, usage = stcn.xmem_topk_readout(mk, qk, mv, 30)
    want, dense = stcn_dense_read(mk, mv, qk, 30)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(usage, dense.sum(2), atol=1e-5, rtol=1e-5)
