"""Naive PyTorch reference for the CFBI / CFBI+ matching ops.

This module is the correctness oracle of ``vos_kernels`` (the tests run it in float64 on
float64 inputs, and through torch autograd as the gradient oracle) and the baseline of
the benchmarks. It mirrors what the official CFBI code (``z-x-yang/CFBI``,
``networks/layers/matching.py`` and ``networks/layers/attention.py``) computes and
materialises -- Python loop over the batch, one-hot labels, the chunked ``[m, L, N_ref]``
global distance tensor, the unfolded ``[HW, C, offsets]`` local tensor -- but it returns
the layouts of the public API (``shared/spec/api.md``) and the exact semantics of
``docs/internals.md``:

* squared distances are CFBI's expansion ``|x|^2 + |y|^2 - 2 x.y``, clamped at 0 (CFBI
  does not clamp);
* wrong-label / ignored / out-of-frame pairs are masked with ``+inf`` in the same
  materialised tensor where CFBI adds ``5e4`` (``WRONG_LABEL_PADDING_DISTANCE``). The
  tensor CFBI builds is built all the same; ``+inf`` just keeps a label's minimum from
  ever coming from another label's pixel (exact for any distance range) and keeps a NaN
  in one label's pixel out of the other labels' minima;
* an empty label gives ``sqdist = inf``, ``index = -1`` and ``fg = 1.0`` exactly (CFBI
  gives ``transform(5e4 + b)``, which is 1.0 in float32 anyway);
* ties pick the lowest flat reference index (``torch.min`` returns the first minimum on
  the CPU; candidates are kept in increasing flat order); NaN propagates.

Only ``torch`` is imported: this file must not depend on the rest of the package.
Everything is differentiable by autograd (the gradient of a min flows to its argmin)
and works in float64.
"""

import math

import torch
import torch.nn.functional as F

__all__ = [
    "WRONG_LABEL_PADDING_DISTANCE",
    "labelled_nearest_sqdist",
    "fb_global_matching",
    "foreground2background",
    "fb_multi_local_matching",
    "fb_instance_pooling",
    "topk_memory_read",
    "gmm_em",
    "prototype_values",
    "prototype_attention",
    "diag_gmm_log_prob",
    "diag_gmm_fit",
]

# CFBI's padding constant for wrong-label pairs. Kept for documentation / the
# out-of-frame squared-norm padding of local matching (where it is masked anyway).
WRONG_LABEL_PADDING_DISTANCE = 5e4

_INF = float("inf")


# --------------------------------------------------------------------------- helpers
def _err(name, expected, got):
    return ValueError(f"{name}: expected {expected}, got {got}")


def _check_float(name, t):
    if not isinstance(t, torch.Tensor):
        raise _err(name, "a torch.Tensor", type(t).__name__)
    if not t.is_floating_point():
        raise _err(name, "a floating point tensor", t.dtype)


def _check_labels(name, labels, shape, num_labels):
    if not isinstance(labels, torch.Tensor):
        raise _err(name, "a torch.Tensor", type(labels).__name__)
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise _err(name, "an integer tensor (int64 or int32)", labels.dtype)
    if tuple(labels.shape) != tuple(shape):
        raise _err(name, f"shape {tuple(shape)}", tuple(labels.shape))
    if labels.numel() > 0:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < -1 or hi >= num_labels:
            raise _err(name, f"values in [-1, {num_labels - 1}]", f"values in [{lo}, {hi}]")


def _check_common(num_labels, atrous_rate):
    if not isinstance(num_labels, int) or isinstance(num_labels, bool) or num_labels < 1:
        raise _err("num_labels", "an int >= 1", num_labels)
    if not isinstance(atrous_rate, int) or isinstance(atrous_rate, bool) or atrous_rate < 1:
        raise _err("atrous_rate", "an int >= 1", atrous_rate)


def _bias_vector(bias, num_labels, dtype, device):
    if not isinstance(bias, torch.Tensor):
        raise _err("bias", f"a float tensor of shape ({num_labels},)", type(bias).__name__)
    if bias.numel() != num_labels:
        raise _err("bias", f"a float tensor of shape ({num_labels},)", tuple(bias.shape))
    return bias.reshape(num_labels).to(device=device, dtype=dtype)


def _onehot(labels, num_labels, dtype):
    """int labels [...] -> float one-hot [..., L]; ignore (-1) rows are all zero (CFBI's
    ``(label == obj_ids).float()``)."""
    valid = (labels >= 0).unsqueeze(-1).to(dtype)
    return F.one_hot(labels.clamp_min(0), num_labels).to(dtype) * valid


def _transform(sqdist, bias_l, empty):
    """CFBI's ``(sigmoid(d + b) - 0.5) * 2`` (= tanh((d + b) / 2)); exactly 1.0 where
    ``empty``. ``bias_l`` broadcasts against ``sqdist`` along the label axis."""
    fg = (torch.sigmoid(sqdist + bias_l) - 0.5) * 2
    return torch.where(empty, torch.ones_like(fg), fg)


def _as_5d(reference, reference_labels):
    if reference.dim() == 4:
        reference = reference.unsqueeze(1)
        if isinstance(reference_labels, torch.Tensor) and reference_labels.dim() == 3:
            reference_labels = reference_labels.unsqueeze(1)
    return reference, reference_labels


# ------------------------------------------------------------------ global matching
def _global_min(query, reference, reference_labels, num_labels, atrous_rate, n_chunks):
    """Shared body of the global ops: per-label min of the clamped squared distance.

    Returns (sqdist [B, L, H, W] in the input dtype, index [B, L, H, W] int64)."""
    _check_float("query", query)
    _check_float("reference", reference)
    _check_common(num_labels, atrous_rate)
    if query.dim() != 4:
        raise _err("query", "a 4-d tensor [B, H, W, C]", tuple(query.shape))
    if reference.dim() not in (4, 5):
        raise _err("reference", "[B, T, Hr, Wr, C] or [B, Hr, Wr, C]", tuple(reference.shape))
    reference, reference_labels = _as_5d(reference, reference_labels)
    B, H, W, C = query.shape
    if reference.shape[0] != B or reference.shape[-1] != C:
        raise _err("reference", f"batch {B} and C = {C} (like query)", tuple(reference.shape))
    _, T, Hr, Wr, _ = reference.shape
    _check_labels("reference_labels", reference_labels, (B, T, Hr, Wr), num_labels)
    if not isinstance(n_chunks, int) or n_chunks < 1:
        raise _err("n_chunks", "an int >= 1", n_chunks)
    if query.device != reference.device or reference_labels.device != query.device:
        raise _err("reference", f"tensors on {query.device}", reference.device)

    dtype = torch.promote_types(query.dtype, reference.dtype)
    query = query.to(dtype)
    reference = reference.to(dtype)
    L, r = num_labels, atrous_rate
    device = query.device
    M = H * W

    # Flat index of every reference pixel in the full (not subsampled) T*Hr*Wr grid.
    flat_index = torch.arange(T * Hr * Wr, device=device).view(T, Hr, Wr)

    all_sq, all_idx = [], []
    for b in range(B):  # CFBI loops over the batch in Python
        ref = reference[b]                       # [T, Hr, Wr, C]
        lab = reference_labels[b].long()         # [T, Hr, Wr]
        idx = flat_index
        if r > 1:
            # CFBI: zero-pad to a multiple of the rate (padding is unlabelled), then keep
            # [::rate, ::rate] through a view.
            hp, wp = (r - Hr % r) % r, (r - Wr % r) % r
            if hp or wp:
                ref = F.pad(ref, (0, 0, 0, wp, 0, hp))
                lab = F.pad(lab, (0, wp, 0, hp), value=-1)
                idx = F.pad(idx, (0, wp, 0, hp), value=-1)
            Hp, Wp = Hr + hp, Wr + wp
            ref = ref.reshape(T, Hp // r, r, Wp // r, r, C)[:, :, 0, :, 0].contiguous()
            lab = lab.reshape(T, Hp // r, r, Wp // r, r)[:, :, 0, :, 0].contiguous()
            idx = idx.reshape(T, Hp // r, r, Wp // r, r)[:, :, 0, :, 0].contiguous()

        ref_flat = ref.reshape(-1, C)
        onehot = _onehot(lab.reshape(-1), L, dtype)      # [N, L], CFBI's one-hot labels
        idx_flat = idx.reshape(-1)
        keep = onehot.sum(1) > 0.9                        # CFBI drops unlabelled pixels
        ref_flat, onehot, idx_flat = ref_flat[keep], onehot[keep], idx_flat[keep]
        q_flat = query[b].reshape(M, C)

        if ref_flat.shape[0] == 0:
            # CFBI returns ones here; in our layout: every label is empty.
            all_sq.append(q_flat.new_full((M, L), _INF))
            all_idx.append(torch.full((M, L), -1, dtype=torch.long, device=device))
            continue

        wrong = (onehot < 0.1).t()                        # [L, N] wrong-label mask
        ref_sq = ref_flat.pow(2).sum(1)                   # [N]
        q_sq = q_flat.pow(2).sum(1)                       # [M]
        chunk = int(math.ceil(M / n_chunks))
        vals, poss = [], []
        for n in range(n_chunks):
            s, e = n * chunk, min((n + 1) * chunk, M)
            if s >= e:
                continue
            # [m, N] distance by CFBI's expansion, clamped at 0 (CFBI does not clamp).
            d = q_sq[s:e].unsqueeze(1) + ref_sq.unsqueeze(0) - 2.0 * (q_flat[s:e] @ ref_flat.t())
            d = d.clamp_min(0.0)
            # The [m, L, N] tensor CFBI materialises (it adds 5e4 * mask; see module doc).
            d = torch.where(wrong.unsqueeze(0), d.new_full((), _INF), d.unsqueeze(1))
            v, p = torch.min(d, dim=2)                    # first minimum -> lowest index
            vals.append(v)
            poss.append(p)
        v = torch.cat(vals, 0)                            # [M, L]
        p = idx_flat[torch.cat(poss, 0)]                  # back to flat T*Hr*Wr index
        p = torch.where(v == _INF, torch.full_like(p, -1), p)  # empty label / all inf
        all_sq.append(v)
        all_idx.append(p)

    sq = torch.stack(all_sq, 0).permute(0, 2, 1).reshape(B, L, H, W)
    ix = torch.stack(all_idx, 0).permute(0, 2, 1).reshape(B, L, H, W)
    return sq, ix


def labelled_nearest_sqdist(query, reference, reference_labels, num_labels, atrous_rate=1,
                            n_chunks=4):
    """Per-label nearest-neighbour squared distance, CFBI's chunked global matching.

    Mirrors ``global_matching`` / ``global_matching_for_eval`` +
    ``_nearest_neighbor_features_per_object_in_chunks`` of CFBI's ``matching.py`` up to
    the min (before bias and transform).

    Args:
        query: float ``[B, H, W, C]``.
        reference: float ``[B, T, Hr, Wr, C]`` (T frames, CFBI's eval list of reference
            frames) or ``[B, Hr, Wr, C]``.
        reference_labels: int ``[B, T, Hr, Wr]`` (or ``[B, Hr, Wr]``): -1 ignore,
            0 background, 1..L-1 objects.
        num_labels: L (background included).
        atrous_rate: keep reference pixels whose row and column are multiples of the
            rate (CFBI: zero-pad to a multiple, then ``[::rate, ::rate]``; the padding is
            unlabelled).
        n_chunks: the queries are processed in this many chunks (CFBI's ``n_chunks``);
            the result does not depend on it.

    Returns:
        ``(sqdist [B, L, H, W], index [B, L, H, W] int64)``: ``sqdist`` in the input
        dtype (float64 in, float64 out), the minimum of ``max(|x|^2+|y|^2-2xy, 0)`` over
        the candidates of label l; ``index`` the flat index ``t*Hr*Wr + y*Wr + x`` of the
        argmin in the full reference (ties -> lowest). Empty label: ``inf`` and -1.

    Differences from CFBI: clamped at 0; ``+inf`` masking instead of ``+5e4``; our
    channels-first layout instead of ``[1, H, W, O, 1]``; batched with T frames.
    """
    return _global_min(query, reference, reference_labels, num_labels, atrous_rate, n_chunks)


def foreground2background(fg):
    """``bg[:, l] = min over m != l of fg[:, m]``; 1.0 when L == 1.

    Mirrors CFBI's ``foreground2background`` (the O(L^2) Python loop of concatenations and
    ``torch.min``), for any ``fg [B, L, ...]``. Difference: CFBI returns ``fg`` itself when
    there is a single label; the API's value is exactly 1.0 (``ones_like``, no gradient).
    NaN propagates (``torch.min``); the gradient flows to the label achieving the min.
    """
    if fg.dim() < 2:
        raise _err("fg", "a tensor [B, L, ...]", tuple(fg.shape))
    L = fg.shape[1]
    if L == 1:
        return torch.ones_like(fg)
    out = []
    for i in range(L):
        others = torch.cat([fg[:, j:j + 1] for j in range(L) if j != i], dim=1)
        out.append(torch.min(others, dim=1, keepdim=True)[0])
    return torch.cat(out, dim=1)


def fb_global_matching(query, reference, reference_labels, num_labels, bias, atrous_rate=1,
                       n_chunks=4, return_index=False):
    """CFBI global foreground/background matching in our layout.

    Mirrors CFBI's ``global_matching`` (``global_matching_for_eval`` when T > 1): the
    chunked per-label min of the padded ``[m, L, N_ref]`` distances, then CFBI's transform
    ``(sigmoid(d + bias[l]) - 0.5) * 2`` (= ``tanh((d + b) / 2)``), then
    ``foreground2background`` for bg. As in CFBI's code the transform is applied to the
    per-label minima (it is increasing, so this equals the min of transformed values).

    Args: as :func:`labelled_nearest_sqdist`, plus ``bias`` float ``[L]`` (CFBI passes
    ``[b_B, b_F, b_F, ...]``) and ``return_index``.

    Returns:
        ``(fg, bg)`` each ``[B, L, H, W]`` in the input dtype, plus ``index`` (as in
        :func:`labelled_nearest_sqdist`) when ``return_index``. Empty label: fg exactly
        1.0 (CFBI: ``transform(5e4 + b)``, 1.0 in float32). ``bg[l] = min_{m != l} fg[m]``,
        1.0 when L == 1 (CFBI returns fg there).

    Differences from CFBI: clamp at 0, exact 1.0 for empty labels, our layouts.
    """
    sq, ix = _global_min(query, reference, reference_labels, num_labels, atrous_rate, n_chunks)
    b = _bias_vector(bias, num_labels, sq.dtype, sq.device).view(1, num_labels, 1, 1)
    fg = _transform(sq, b, ix < 0)
    bg = foreground2background(fg)
    if return_index:
        return fg, bg, ix
    return fg, bg


# --------------------------------------------------------------- local matching
def fb_multi_local_matching(query, previous, previous_labels, num_labels, windows, bias,
                            atrous_rate=1, return_index=False):
    """CFBI multi-local foreground/background matching in our layout.

    Mirrors CFBI's ``local_matching`` with ``local_pairwise_distances_parallel``
    (``allow_downsample=False``): the previous frame is zero-padded by
    ``P = D - D % r`` (D = largest window, r = rate) and unfolded with stride r into the
    ``[H*W, C, (2P/r+1)^2]`` tensor CFBI materialises; the distance per offset is
    ``|x|^2 + |y_off|^2 - 2 x.y_off`` (clamped at 0 here); out-of-frame offsets and
    wrong / ignored labels are masked per label (CFBI: 5e4; here ``+inf``, same tensor
    ``[H, W, offsets, L]``); each window k is the centre crop of half-width ``k // r`` and
    its own min; then the transform ``(sigmoid(d + bias[l]) - 0.5) * 2``.

    Args:
        query, previous: float ``[B, H, W, C]`` (same H, W).
        previous_labels: int ``[B, H, W]`` (-1 ignore).
        num_labels: L.
        windows: ascending ints >= 1 (CFBI's ``multi_local_distance``).
        bias: float ``[L]``.
        atrous_rate: offsets are multiples of the rate.

    Returns:
        ``(fg, bg)`` each ``[B, L, K, H, W]`` in the input dtype, K = len(windows) in the
        given (ascending) order (CFBI orders ``[largest, smallest, ..., second-largest]``),
        plus ``index [B, L, K, H, W]`` int64 (flat in H*W of ``previous``, -1 empty) when
        ``return_index``. Empty -> fg exactly 1.0. Ties -> lowest flat index (offsets are
        scanned dy-major, i.e. in increasing flat index).
    """
    _check_float("query", query)
    _check_float("previous", previous)
    _check_common(num_labels, atrous_rate)
    if query.dim() != 4:
        raise _err("query", "a 4-d tensor [B, H, W, C]", tuple(query.shape))
    if tuple(previous.shape) != tuple(query.shape):
        raise _err("previous", f"shape {tuple(query.shape)} (like query)", tuple(previous.shape))
    B, H, W, C = query.shape
    _check_labels("previous_labels", previous_labels, (B, H, W), num_labels)
    windows = list(windows) if not isinstance(windows, int) else [windows]
    if len(windows) == 0 or any((not isinstance(k, int)) or isinstance(k, bool) or k < 1
                                for k in windows):
        raise _err("windows", "a non-empty list of ints >= 1", windows)
    if any(a > b for a, b in zip(windows, windows[1:])):
        raise _err("windows", "ascending window sizes", windows)

    dtype = torch.promote_types(query.dtype, previous.dtype)
    L, r = num_labels, atrous_rate
    D = max(windows)
    P = D - D % r
    n = 2 * P // r + 1            # offsets per axis on the atrous grid
    c = P // r                    # centre offset position
    device = query.device
    bvec = _bias_vector(bias, L, dtype, device)

    ys = torch.arange(H, device=device).view(H, 1)
    xs = torch.arange(W, device=device).view(1, W)
    fg_b, ix_b = [], []
    for b in range(B):  # CFBI is per sequence
        x = query[b].to(dtype).permute(2, 0, 1).unsqueeze(0)      # [1, C, H, W]
        y = previous[b].to(dtype).permute(2, 0, 1).unsqueeze(0)
        x2 = x.pow(2).sum(1).view(H, W, 1)
        y2 = y.pow(2).sum(1).view(1, 1, H, W)
        padded_y = F.pad(y, (P, P, P, P))
        padded_y2 = F.pad(y2, (P, P, P, P), value=WRONG_LABEL_PADDING_DISTANCE)
        # The [HW, C, offsets] tensor CFBI materialises.
        offset_y = F.unfold(padded_y, kernel_size=(H, W), stride=(r, r)).view(C, H * W, -1)
        offset_y = offset_y.permute(1, 0, 2)
        offset_y2 = F.unfold(padded_y2, kernel_size=(H, W), stride=(r, r)).view(H, W, -1)
        xq = x.view(C, H * W, 1).permute(1, 2, 0)                    # [HW, 1, C]
        d = x2 + offset_y2 - 2.0 * torch.matmul(xq, offset_y).view(H, W, -1)
        d = d.clamp_min(0.0)                                         # [H, W, n*n]

        onehot = _onehot(previous_labels[b].long(), L, dtype).permute(2, 0, 1).unsqueeze(1)
        padded_lab = F.pad(onehot, (P, P, P, P), value=0.0)          # out of frame: no label
        masks = F.unfold(padded_lab, kernel_size=(H, W), stride=(r, r)).view(L, H, W, -1)
        masks = masks.permute(1, 2, 3, 0) > 0.9                      # [H, W, n*n, L]
        d_masked = torch.where(masks, d.unsqueeze(-1), d.new_full((), _INF))
        d_masked = d_masked.view(H, W, n, n, L)

        fgs, ixs = [], []
        for k in windows:
            kc = k // r
            crop = d_masked[:, :, c - kc:c + kc + 1, c - kc:c + kc + 1, :].reshape(H, W, -1, L)
            v, pos = torch.min(crop, dim=2)                          # [H, W, L]
            oy, ox = pos // (2 * kc + 1), pos % (2 * kc + 1)
            fy = ys.unsqueeze(-1) + (oy - kc) * r
            fx = xs.unsqueeze(-1) + (ox - kc) * r
            idx = fy * W + fx
            empty = v == _INF
            idx = torch.where(empty, torch.full_like(idx, -1), idx)
            fg = _transform(v, bvec, empty)
            fgs.append(fg.permute(2, 0, 1))                          # [L, H, W]
            ixs.append(idx.permute(2, 0, 1))
        fg_b.append(torch.stack(fgs, 1))                             # [L, K, H, W]
        ix_b.append(torch.stack(ixs, 1))
    fg = torch.stack(fg_b, 0)
    ix = torch.stack(ix_b, 0)
    bg = foreground2background(fg)
    if return_index:
        return fg, bg, ix
    return fg, bg


# ------------------------------------------------------------- instance pooling
def fb_instance_pooling(embedding, labels, num_labels):
    """Per-label foreground / background mean embedding (CFBI's attention head inputs).

    Mirrors ``calculate_attention_head`` of CFBI's ``attention.py`` (per-object masked sums
    ``sum(e * m)`` and ``sum(m)``, materialising ``e * m`` for every object, epsilon 1e-5):

    * ``out[b, l, 0] = sum_{label == l} e / (n_l + 1e-5)``
    * ``out[b, l, 1] = sum_{label >= 0, label != l} e / (n_valid - n_l + 1e-5)``

    Args: embedding float ``[B, H, W, C]``; labels int ``[B, H, W]`` (-1 ignore);
    num_labels L. Returns ``[B, L, 2, C]`` in the input dtype.

    Difference from CFBI: ignored pixels (label -1) are excluded from the background
    mean; CFBI's ``1 - m`` counts every pixel that is not of the object.
    """
    _check_float("embedding", embedding)
    if embedding.dim() != 4:
        raise _err("embedding", "a 4-d tensor [B, H, W, C]", tuple(embedding.shape))
    _check_common(num_labels, 1)
    B, H, W, C = embedding.shape
    _check_labels("labels", labels, (B, H, W), num_labels)
    labels = labels.long()
    dtype = embedding.dtype
    m = _onehot(labels, num_labels, dtype).permute(0, 3, 1, 2)      # [B, L, H, W]
    valid = (labels >= 0).to(dtype)                                  # [B, H, W]
    e = embedding
    pos_sum = (e.unsqueeze(1) * m.unsqueeze(-1)).sum(dim=(2, 3))     # [B, L, C]
    pos_num = m.sum(dim=(2, 3))                                      # [B, L]
    all_sum = (e * valid.unsqueeze(-1)).sum(dim=(1, 2))              # [B, C]
    all_num = valid.sum(dim=(1, 2))                                  # [B]
    neg_sum = all_sum.unsqueeze(1) - pos_sum
    neg_num = all_num.unsqueeze(1) - pos_num
    pos = pos_sum / (pos_num + 1e-5).unsqueeze(-1)
    neg = neg_sum / (neg_num + 1e-5).unsqueeze(-1)
    return torch.stack([pos, neg], dim=2)


# ------------------------------------------------------------------ top-k memory read
def topk_memory_read(query_key, memory_key, memory_value, k, scale=None, usage=None, usage_mode="hits",
                     return_topk=False):
    """STCN's dense top-k memory read, with XMem's usage, in our layouts.

    Mirrors STCN ``model/network.py`` (``get_affinity`` + ``softmax_w_top`` + ``readout``):
    the dense affinity ``(2·mkᵀqk − ‖mk‖²)·scale`` ``[B, Nm, Nq]``, ``torch.topk`` over the
    memory axis, exp and normalise, the weights scattered back into the dense buffer, and
    a dense ``bmm`` readout. Usage as XMem's ``do_softmax(..., return_usage=True)``: the
    dense weights summed over queries (``"weights"``), or the number of queries whose
    top-k holds the entry (``"hits"``); added in place to ``usage``.

    Differences from STCN: the maximum is subtracted before ``exp`` (STCN's code does not;
    equal unless it overflows); ``k' = min(k, Nm)``; ties follow ``torch.topk``, which does
    not promise the lowest index (the fused op does).

    Returns:
        ``readout [B, Nq, CV]``, plus ``(index, weight)`` ``[B, Nq, k']`` when ``return_topk``.
    """
    B, Nq, CK = query_key.shape
    Nm = memory_key.shape[1]
    scale = 1.0 / math.sqrt(CK) if scale is None else scale
    kk = min(int(k), Nm)
    mk = memory_key.transpose(1, 2)                              # [B, CK, Nm]  (STCN layout)
    qk = query_key.transpose(1, 2)                               # [B, CK, Nq]
    a_sq = mk.pow(2).sum(1).unsqueeze(2)                         # [B, Nm, 1]
    ab = mk.transpose(1, 2) @ qk                                 # [B, Nm, Nq]
    affinity = (2 * ab - a_sq) * scale
    values, indices = torch.topk(affinity, k=kk, dim=1)
    x_exp = (values - values.max(dim=1, keepdim=True)[0]).exp()
    x_exp = x_exp / x_exp.sum(dim=1, keepdim=True)
    dense = torch.zeros_like(affinity).scatter_(1, indices, x_exp)   # [B, Nm, Nq]
    readout = torch.bmm(memory_value.transpose(1, 2), dense).transpose(1, 2)  # [B, Nq, CV]
    if usage is not None:
        with torch.no_grad():
            if usage_mode == "weights":
                usage += dense.sum(2).float()
            else:
                usage += torch.zeros_like(affinity).scatter_(1, indices, 1.0).sum(2).float()
    if return_topk:
        return readout, (indices.transpose(1, 2), x_exp.transpose(1, 2))
    return readout


# ------------------------------------------------------------ GMM prototypes (PCAN, EMANet)
def _l2norm(inp, dim):
    """PCAN / EMANet ``_l2norm``: ``inp / (1e-6 + ‖inp‖)``."""
    return inp / (1e-6 + inp.norm(dim=dim, keepdim=True))


def _l1norm(inp, dim):
    """PCAN / EMANet ``_l1norm``: ``inp / (1e-6 + Σ inp)``."""
    return inp / (1e-6 + inp.sum(dim=dim, keepdim=True))


def _logits(x_cf, mu_cf, kappa, kernel):
    """E-step logits ``[B, N, K]`` from channels-first ``x [B, C, N]`` and ``mu [B, C, K]``:
    ``kappa · xᵀμ`` (``"dot"``, the code) or ``−kappa/2 · ‖x − μ‖²`` (``"l2"``, PCAN paper
    eq. 5.3 with ``kappa = 1/σ²``), the latter through the expansion ``‖x‖² − 2xᵀμ + ‖μ‖²``."""
    z = torch.einsum("bcn,bck->bnk", x_cf, mu_cf)
    if kernel == "dot":
        return kappa * z
    sq = x_cf.pow(2).sum(1).unsqueeze(2) - 2 * z + mu_cf.pow(2).sum(1).unsqueeze(1)
    return (-0.5 * kappa) * sq


def gmm_em(x, means, num_iters, kappa, mask=None, kernel="dot", normalize_means=True):
    """PCAN's ``_em_iter`` / EMANet's ``EMAU`` EM loop, in our layouts.

    Mirrors ``pcan/models/roi_heads/refine_heads/em_match_head.py`` ``_em_iter`` (and
    EMANet ``network.py`` ``EMAU.forward``): per iteration ``z = softmax_K(logits)``,
    ``z *= mask``, ``z_ = z / (1e-6 + Σ_n z)``, ``μ = x z_``, ``μ /= (1e-6 + ‖μ‖_C)``;
    one einsum / softmax / norm launch each, on channels-first views as in their code.

    Args: x ``[B, N, C]``, means ``[B, K, C]``, mask ``[B, N]`` (or None), as
    :func:`vos_kernels.gmm_em`. Returns ``(means [B, K, C], resp [B, N, K])``; resp is the
    last E-step's masked softmax (before the ``Σ_n`` normalisation), as EMANet's
    reconstruction uses it.
    """
    x_cf = x.transpose(1, 2)            # [B, C, N]: PCAN's x.view(R, C, H*W)
    mu = means.transpose(1, 2)          # [B, C, K]
    z = None
    for _ in range(int(num_iters)):
        z = F.softmax(_logits(x_cf, mu, kappa, kernel), dim=2)         # [B, N, K]
        if mask is not None:
            z = torch.einsum("bnk,bn->bnk", z, mask.to(z.dtype))
        z_ = _l1norm(z, dim=1)
        mu = torch.einsum("bcn,bnk->bck", x_cf, z_)
        if normalize_means:
            mu = _l2norm(mu, dim=1)
    return mu.transpose(1, 2), z


def prototype_values(values, resp):
    """PCAN ``em_match_head.py``: ``nu = einsum('ocn,rnk->rck', y, z_)`` with the
    l1-normalised responsibilities: ``[B, K, CV] = Σ_n r_nk v_n / (1e-6 + Σ_n r_nk)``."""
    return torch.einsum("bnk,bnc->bkc", _l1norm(resp, dim=1), values)


def prototype_attention(query, proto_keys, proto_values, kappa, kernel="dot"):
    """PCAN ``_prop`` + read: ``softmax_K(logits(query, keys)) · values`` ``[B, Nq, CV]``
    (logits as :func:`gmm_em`; PCAN reads with ``kappa = 1`` and the dot kernel)."""
    z = F.softmax(_logits(query.transpose(1, 2), proto_keys.transpose(1, 2), kappa, kernel), dim=2)
    return torch.einsum("bnk,bkc->bnc", z, proto_values)


# -------------------------------------------------------------- A-GAME diagonal Gaussians
def diag_gmm_log_prob(x, mean, var):
    """A-GAME ``GaussiansAgame.forward``: per component ``k`` a full ``[B, N, D]`` distance
    tensor, ``s_k = −½ Σ_d (log var_kd + (x_d − μ_kd)² / var_kd)`` (no 2π, no prior).
    Returns ``[B, N, K]``."""
    scores = []
    for k in range(mean.shape[1]):
        d = x - mean[:, k:k + 1]                                       # [B, N, D]
        v = var[:, k:k + 1]
        scores.append(-0.5 * (torch.log(v) + d * d / v).sum(dim=2, keepdim=True))
    return torch.cat(scores, dim=2)


def diag_gmm_fit(x, weights, var_reg):
    """A-GAME ``GaussiansAgame.get_init_state``, two-pass: per component ``k``,
    ``μ_k = Σ_n w_nk x_n / (1 + S_k)``, ``var_k = var_reg_k + Σ_n w_nk (x_n − μ_k)² / (1 + S_k)``,
    ``S_k = Σ_n w_nk`` (A-GAME's ``avgpool(x·w) / (1/N + avgpool(w))``; ``var_reg`` is
    ``softplus(cov_reg)``). Returns ``(mean, var)``, each ``[B, K, D]``."""
    means, variances = [], []
    for k in range(weights.shape[2]):
        w = weights[:, :, k:k + 1]                                     # [B, N, 1]
        den = 1 + w.sum(dim=1, keepdim=True)                           # [B, 1, 1]
        mu = (x * w).sum(dim=1, keepdim=True) / den
        d = x - mu
        variances.append(var_reg[k] + (d * d * w).sum(dim=1, keepdim=True) / den)
        means.append(mu)
    return torch.cat(means, dim=1), torch.cat(variances, dim=1)
