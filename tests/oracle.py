"""Float64 brute-force oracles for the matching ops, written from the formulas in
../shared/spec/api.md (dense [Nq, Nr] distance matrices: tiny inputs only).

They are differentiable through torch autograd (the gradient of a min flows to its
argmin), which makes them the gradient oracle too.
"""
import torch

INF = float("inf")


def sqdist_matrix(a, b):
    """[N, C] x [M, C] -> [N, M] squared distances by direct differences (float64)."""
    return ((a.double()[:, None, :] - b.double()[None, :, :]) ** 2).sum(-1)


def masked_min(D, mask):
    """Min over columns where mask; returns (value, index) with inf / -1 where none."""
    Dm = torch.where(mask, D, torch.full_like(D, INF))
    v, i = Dm.min(dim=1)
    empty = ~mask.any(dim=1)
    return v, torch.where(empty, torch.full_like(i, -1), i)


def nearest(query, reference, labels, L, rate=1):
    """Global matching sqdist/index. reference [B,T,Hr,Wr,C], labels [B,T,Hr,Wr]."""
    B, H, W, C = query.shape
    _, T, Hr, Wr, _ = reference.shape
    n = torch.arange(T * Hr * Wr)
    on_grid = ((n // Wr) % Hr % rate == 0) & (n % Wr % rate == 0)
    vals, idxs = [], []
    for b in range(B):
        D = sqdist_matrix(query[b].reshape(-1, C), reference[b].reshape(-1, C))
        lab = labels[b].reshape(-1).long()
        vb, ib = [], []
        for l in range(L):
            mask = (on_grid & (lab == l))[None, :].expand_as(D)
            v, i = masked_min(D, mask)
            vb.append(v.reshape(H, W))
            ib.append(i.reshape(H, W))
        vals.append(torch.stack(vb))
        idxs.append(torch.stack(ib))
    return torch.stack(vals), torch.stack(idxs)


def local_nearest(query, previous, labels, L, windows, rate=1):
    """Multi-local matching sqdist/index [B,L,K,H,W]."""
    B, H, W, C = query.shape
    ys, xs = torch.arange(H * W) // W, torch.arange(H * W) % W
    dy, dx = ys[None, :] - ys[:, None], xs[None, :] - xs[:, None]
    vals, idxs = [], []
    for b in range(B):
        D = sqdist_matrix(query[b].reshape(-1, C), previous[b].reshape(-1, C))
        lab = labels[b].reshape(-1).long()
        vb, ib = [], []
        for l in range(L):
            vk, ik = [], []
            for w in windows:
                mask = (dy.abs() <= w) & (dx.abs() <= w) & (dy % rate == 0) & (dx % rate == 0) & (lab == l)[None, :]
                v, i = masked_min(D, mask)
                vk.append(v.reshape(H, W))
                ik.append(i.reshape(H, W))
            vb.append(torch.stack(vk))
            ib.append(torch.stack(ik))
        vals.append(torch.stack(vb))
        idxs.append(torch.stack(ib))
    return torch.stack(vals), torch.stack(idxs)


def fb(sqdist, index, bias):
    """fg = tanh((d + b_l)/2), 1 where empty; bg[l] = min over m != l of fg[m]."""
    L = sqdist.shape[1]
    b = bias.double().view(1, L, *([1] * (sqdist.dim() - 2)))
    finite = torch.where(index >= 0, sqdist, torch.zeros_like(sqdist))
    fg = torch.where(index >= 0, torch.tanh((finite + b) / 2), torch.ones_like(sqdist))
    if L == 1:
        return fg, torch.ones_like(fg)
    bg = torch.stack([torch.cat([fg[:, :l], fg[:, l + 1:]], 1).min(1).values for l in range(L)], 1)
    return fg, bg


def pooling(embedding, labels, L):
    B, H, W, C = embedding.shape
    e = embedding.double().reshape(B, -1, C)
    lab = labels.reshape(B, -1).long()
    out = []
    for b in range(B):
        rows = []
        for l in range(L):
            m = (lab[b] == l).double()[:, None]
            o = ((lab[b] >= 0) & (lab[b] != l)).double()[:, None]
            rows.append(torch.stack([(e[b] * m).sum(0) / (m.sum() + 1e-5), (e[b] * o).sum(0) / (o.sum() + 1e-5)]))
        out.append(torch.stack(rows))
    return torch.stack(out)
