"""Drop-in replacements for CFBI / CFBI+ matching, backed by the fused ops.

A CFBI user swaps one import::

    # from networks.layers.matching import global_matching, global_matching_for_eval, \\
    #     local_matching, foreground2background
    # from networks.layers.attention import calculate_attention_head, \\
    #     calculate_attention_head_for_eval
    from vos_kernels.compat.cfbi import (global_matching, global_matching_for_eval,
        local_matching, foreground2background, calculate_attention_head,
        calculate_attention_head_for_eval)

The functions keep the signatures, argument names, defaults, input and output layouts of
``z-x-yang/CFBI`` (``networks/layers/matching.py``, ``networks/layers/attention.py``) and
the quirks that change what a CFBI model computes (listed per function). The work is done
by :func:`vos_kernels.fb_global_matching`, :func:`vos_kernels.fb_multi_local_matching` and
:func:`vos_kernels.fb_instance_pooling`, imported when a function is called (this module
imports only ``torch``).

What differs from CFBI's code, everywhere:

* Distances are exact squared L2 clamped at 0 (CFBI's ``|x|^2+|y|^2-2xy`` can go
  slightly negative). CFBI pads wrong-label pairs with ``5e4``, so an empty label gives
  ``(sigmoid(5e4 + b) - 0.5) * 2``, which is exactly 1.0 in float32 (and float16); the
  fused ops return exactly 1.0 for an empty label, so the results agree.
* ``use_float16=True``: the inputs are rounded to float16 as in CFBI; on CUDA the fused
  op reads them as float16 and accumulates in float32, on the CPU (float32-only kernels)
  they are converted back to float32. CFBI does the matmul and the transform in float16,
  so its outputs are less accurate than ours. Outputs are float32 (CFBI: float32 with
  ``use_float16``, else the input dtype; we cast to the input dtype in that case).
* Labels are CFBI's one-hot float maps ``[H, W, O]`` built with
  ``(label == obj_ids).float()``; each pixel must belong to at most one object (a pixel
  whose row has no entry > 0.9 is unlabelled, otherwise its label is the arg-max).
* ``n_chunks`` and ``allow_parallel`` are accepted and ignored (the fused ops need no
  chunking; CFBI's loop path ``allow_parallel=False`` is broken in CFBI and is not
  reproduced -- both give the parallel path's result).
"""

import torch
import torch.nn.functional as F

__all__ = [
    "WRONG_LABEL_PADDING_DISTANCE",
    "global_matching",
    "global_matching_for_eval",
    "local_matching",
    "foreground2background",
    "calculate_attention_head",
    "calculate_attention_head_for_eval",
]

WRONG_LABEL_PADDING_DISTANCE = 5e4
_FUSED_EPSILON = 1e-5  # the denominator epsilon of vos_kernels.fb_instance_pooling


# --------------------------------------------------------------------------- helpers
def _vk():
    import vos_kernels  # lazy: this module must import before the package is built

    return vos_kernels


def _prep(x, use_float16=False):
    """Dtype handed to the fused ops: CFBI's fp16 rounding, then what the device takes."""
    if use_float16:
        x = x.half()
    if x.device.type == "cuda":
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            x = x.float()
    elif x.dtype != torch.float32:
        x = x.float()
    return x


def _bias(dis_bias, num_labels, device):
    """CFBI's ``dis_bias`` ([O, 1, 1, 1], or anything with O or 1 element, or a float)
    -> the fused ops' float32 ``bias [L]`` (autograd flows back to ``dis_bias``)."""
    if isinstance(dis_bias, torch.Tensor):
        b = dis_bias.reshape(-1).to(device=device, dtype=torch.float32)
        if b.numel() == 1 and num_labels != 1:
            b = b.expand(num_labels)
        if b.numel() != num_labels:
            raise ValueError(
                f"dis_bias: expected {num_labels} elements (one per object, [O, 1, 1, 1]) "
                f"or 1, got shape {tuple(dis_bias.shape)}")
        return b
    return torch.full((num_labels,), float(dis_bias), device=device, dtype=torch.float32)


def _onehot_to_index(labels):
    """CFBI one-hot labels ``[..., O]`` -> int64 labels ``[...]`` (-1 where no entry > 0.9)."""
    mx, am = labels.max(dim=-1)
    return torch.where(mx > 0.9, am, torch.full_like(am, -1))


def _atrous_grid(h, w, rate, device):
    ys = torch.arange(h, device=device) % rate == 0
    xs = torch.arange(w, device=device) % rate == 0
    return ys.view(h, 1) & xs.view(1, w)


def _subsample_big_objects_(reference_labels, rate, atrous_obj_pixel_num):
    """CFBI's in-place atrous sampling of ``reference_labels [H, W, O]``.

    Objects with more than ``atrous_obj_pixel_num * rate**2`` pixels keep only the pixels
    whose row and column are multiples of ``rate``; their other pixels are zeroed IN THE
    CALLER'S TENSOR (CFBI writes ``reference_labels[:, :, is_big_obj] = ...``). Returns
    whether an object that is not subsampled has pixels (then the fused op must run at
    rate 1 on the explicit candidate map)."""
    h, w, _ = reference_labels.shape
    counts = reference_labels.sum(dim=(0, 1))
    is_big = counts > (atrous_obj_pixel_num * rate ** 2)
    keep = _atrous_grid(h, w, rate, reference_labels.device).unsqueeze(-1) | ~is_big
    reference_labels.mul_(keep.to(reference_labels.dtype))
    return bool(((counts > 0) & ~is_big).any())


def _out_dtype(x, use_float16):
    if use_float16 or not x.is_floating_point():
        return torch.float32
    return x.dtype


def _global(query_embeddings, ref_list, lab_list, obj_nums, dis_bias, ori_size, rate,
            use_float16):
    """Shared body of the global functions: ``ref_list`` of ``[H, W, C]``,
    ``lab_list`` of int ``[H, W]`` -> ``[1, H', W', O, 1]``."""
    h, w, c = query_embeddings.shape
    shapes = {tuple(r.shape) for r in ref_list}
    if len(shapes) != 1 or any(tuple(l.shape) != tuple(ref_list[0].shape[:2]) for l in lab_list):
        raise ValueError(
            "all_reference_embeddings / all_reference_labels: expected frames of one size "
            f"[H, W, C] / [H, W, O], got {sorted(shapes)} / "
            f"{sorted({tuple(l.shape) for l in lab_list})}")
    if ref_list[0].shape[-1] != c:
        raise ValueError(f"reference_embeddings: expected C = {c} (like query_embeddings), "
                         f"got {ref_list[0].shape[-1]}")
    labels = torch.stack(lab_list, 0)                                # [T, Hr, Wr]
    if not bool((labels[:, ::rate, ::rate] >= 0).any()):
        # CFBI quirk: no labelled reference pixel -> ones of the query's size, float32,
        # ignoring ori_size.
        return torch.ones(1, h, w, obj_nums, 1, device=query_embeddings.device)
    vk = _vk()
    q = _prep(query_embeddings, use_float16).unsqueeze(0)           # [1, H, W, C]
    r = torch.stack([_prep(e, use_float16) for e in ref_list], 0).unsqueeze(0)
    bias = _bias(dis_bias, obj_nums, q.device)
    fg, _ = vk.fb_global_matching(q, r, labels.unsqueeze(0), obj_nums, bias, atrous_rate=rate)
    if ori_size is not None:
        fg = F.interpolate(fg, size=(int(ori_size[0]), int(ori_size[1])), mode="bilinear",
                           align_corners=True)
    out = fg.permute(0, 2, 3, 1).unsqueeze(-1).contiguous()         # [1, H', W', O, 1]
    return out.to(_out_dtype(query_embeddings, use_float16))


# ------------------------------------------------------------------ global matching
def global_matching(reference_embeddings, query_embeddings, reference_labels,
                    n_chunks=100, dis_bias=0., ori_size=None, atrous_rate=1,
                    use_float16=True, atrous_obj_pixel_num=0):
    """CFBI's ``global_matching`` (training path), fused.

    Args (CFBI's):
        reference_embeddings: ``[H, W, C]``.
        query_embeddings: ``[H, W, C]``.
        reference_labels: ``[H, W, O]`` one-hot float, O = objects + 1 (0 = background).
        n_chunks: accepted, ignored.
        dis_bias: ``[O, 1, 1, 1]`` (CFBI: ``cat([bg_bias, fg_bias.expand(O-1, ...)])``),
            or a 1-element tensor / float broadcast to every object.
        ori_size: if given, the output is bilinearly (``align_corners=True``) resized to it.
        atrous_rate: keep reference pixels whose row and column are multiples of it.
        use_float16: round the embeddings to float16 (see the module doc).
        atrous_obj_pixel_num: only objects with more than
            ``atrous_obj_pixel_num * atrous_rate**2`` pixels are subsampled.

    Returns:
        ``[1, H', W', O, 1]``: ``(sigmoid(min_q d(p, q) + dis_bias[o]) - 0.5) * 2`` over the
        reference pixels q of object o (1.0 for an object with no pixel).

    CFBI quirks kept: with ``atrous_rate > 1`` the off-grid pixels of the subsampled
    objects are zeroed in ``reference_labels`` in place (CFBI+ then feeds that tensor to
    its attention head); when no reference pixel is labelled the result is
    ``torch.ones(1, H, W, O, 1)`` at the query's size even if ``ori_size`` is given.
    Differences: see the module doc (clamp at 0, exact 1.0 for empty objects).
    """
    del n_chunks
    if tuple(reference_embeddings.shape[:2]) != tuple(reference_labels.shape[:2]):
        raise ValueError(
            "reference_labels: expected the spatial size of reference_embeddings "
            f"{tuple(reference_embeddings.shape[:2])}, got {tuple(reference_labels.shape[:2])}")
    obj_nums = reference_labels.size(2)
    rate = int(atrous_rate)
    call_rate = rate
    if rate > 1:
        if _subsample_big_objects_(reference_labels, rate, atrous_obj_pixel_num):
            call_rate = 1  # small objects keep every pixel: explicit candidate map
    labels = _onehot_to_index(reference_labels)
    return _global(query_embeddings, [reference_embeddings], [labels], obj_nums, dis_bias,
                   ori_size, call_rate, use_float16)


def global_matching_for_eval(all_reference_embeddings, query_embeddings, all_reference_labels,
                             n_chunks=20, dis_bias=0., ori_size=None, atrous_rate=1,
                             use_float16=True, atrous_obj_pixel_num=0):
    """CFBI's ``global_matching_for_eval``, fused.

    Args (CFBI's): ``all_reference_embeddings`` a list of ``[H, W, C]`` (the first frame and
    the frames where new objects appear), ``all_reference_labels`` a list of one-hot
    ``[H, W, O]``, ``query_embeddings [H, W, C]``; the rest as :func:`global_matching`.
    The per-object minimum runs over the pixels of all reference frames at once (the fused
    op's ``reference [1, T, H, W, C]``).

    Returns ``[1, H', W', O, 1]`` as :func:`global_matching`.

    CFBI quirks kept: with ``atrous_obj_pixel_num > 0`` and ``atrous_rate > 1`` the
    big/small decision is made per reference frame and the labels of big objects are
    zeroed off the grid in place (the CFBI+ eval attention head sees those labels); with
    ``atrous_obj_pixel_num == 0`` every frame is subsampled and the labels are untouched;
    no labelled pixel -> ``ones(1, H, W, O, 1)`` ignoring ``ori_size``. ``n_chunks``
    (multiplied by the number of frames in CFBI) is ignored.
    """
    del n_chunks
    obj_nums = all_reference_labels[0].size(2)
    rate = int(atrous_rate)
    call_rate = rate
    if atrous_obj_pixel_num > 0 and rate > 1:
        small = False
        for lab in all_reference_labels:
            small = _subsample_big_objects_(lab, rate, atrous_obj_pixel_num) or small
        if small:
            call_rate = 1
    labels = [_onehot_to_index(lab) for lab in all_reference_labels]
    return _global(query_embeddings, list(all_reference_embeddings), labels, obj_nums,
                   dis_bias, ori_size, call_rate, use_float16)


# --------------------------------------------------------------- local matching
def local_matching(prev_frame_embedding, query_embedding, prev_frame_labels,
                   dis_bias=0., multi_local_distance=[15],
                   ori_size=None, atrous_rate=1, use_float16=True, allow_downsample=True,
                   allow_parallel=True):
    """CFBI's ``local_matching`` (multi-window), fused.

    Args (CFBI's):
        prev_frame_embedding, query_embedding: ``[H, W, C]``.
        prev_frame_labels: ``[H, W, O]`` one-hot float.
        dis_bias: ``[O, 1, 1, 1]`` (or 1 element / float).
        multi_local_distance: the windows, ascending; the last is the largest.
        ori_size: output size (default: ``(H, W)``); the output is bilinearly resized
            (``align_corners=True``) to it when the matching size differs.
        atrous_rate: offsets are multiples of it (CFBI: window k is the centre crop of
            half-width ``k // rate`` on the atrous grid).
        use_float16: see the module doc.
        allow_downsample: CFBI's default ``True``: embeddings bilinearly
            (``align_corners=True``) resized to ``(int(H/2) + 1, int(W/2) + 1)``, labels
            nearest, the output bilinearly back to ``ori_size``. CFBI+ passes ``False``.
        allow_parallel: accepted, ignored.

    Returns:
        ``[1, H', W', O, K]`` with CFBI's channel order ``[largest, smallest, ...,
        second-largest]`` (``multi_local_distance[-1]`` first, then
        ``multi_local_distance[:-1]``). Empty neighbourhood -> 1.0 (CFBI: the 5e4 pad,
        which saturates to 1.0 in float32).
    """
    del allow_parallel
    windows = [int(k) for k in multi_local_distance]
    if len(windows) == 0 or min(windows) < 1 or max(windows) != windows[-1]:
        raise ValueError("multi_local_distance: expected ascending ints >= 1 whose last is "
                         f"the largest, got {list(multi_local_distance)}")
    if tuple(query_embedding.shape) != tuple(prev_frame_embedding.shape):
        raise ValueError(f"query_embedding: expected the shape of prev_frame_embedding "
                         f"{tuple(prev_frame_embedding.shape)}, got {tuple(query_embedding.shape)}")
    H, W = prev_frame_embedding.shape[:2]
    if ori_size is None:
        ori_size = (H, W)
    ori_size = (int(ori_size[0]), int(ori_size[1]))
    obj_num = prev_frame_labels.size(2)
    rate = int(atrous_rate)

    x = _prep(query_embedding, use_float16)
    y = _prep(prev_frame_embedding, use_float16)
    if allow_downsample:
        down = (int(H / 2) + 1, int(W / 2) + 1)
        x = F.interpolate(x.permute(2, 0, 1).unsqueeze(0), size=down, mode="bilinear",
                          align_corners=True)[0].permute(1, 2, 0)
        y = F.interpolate(y.permute(2, 0, 1).unsqueeze(0), size=down, mode="bilinear",
                          align_corners=True)[0].permute(1, 2, 0)
    h, w = x.shape[:2]

    labels = _onehot_to_index(prev_frame_labels)                    # [H, W]
    if tuple(labels.shape) != (h, w):
        labels = F.interpolate(labels.view(1, 1, *labels.shape).float(), size=(h, w),
                               mode="nearest")[0, 0].long()

    uniq = sorted(set(windows))
    vk = _vk()
    fg, _ = vk.fb_multi_local_matching(x.unsqueeze(0), y.unsqueeze(0), labels.unsqueeze(0),
                                       obj_num, uniq, _bias(dis_bias, obj_num, x.device),
                                       atrous_rate=rate)
    order = [uniq.index(k) for k in [windows[-1]] + windows[:-1]]  # CFBI's channel order
    md = fg[0][:, order]                                             # [O, K, h, w]
    if (h, w) != ori_size:
        md = F.interpolate(md, size=ori_size, mode="bilinear", align_corners=True)
    out = md.permute(2, 3, 0, 1).unsqueeze(0).contiguous()          # [1, H', W', O, K]
    return out.to(_out_dtype(query_embedding, use_float16))


# ------------------------------------------------------------------ background
def foreground2background(dis, obj_num):
    """CFBI's ``foreground2background``: ``bg[i] = min over j != i of dis[j]``.

    ``dis`` is CFBI's ``[O, 1, H, W]`` (global) or ``[O, 1, H, W, K]`` (local, as CFBI
    reshapes it); the minimum is over the other objects and over axis 1, keepdim, exactly
    as CFBI's concatenation along axis 1 does. Quirk kept: ``obj_num == 1`` returns
    ``dis`` itself. Pure torch (the fused ops compute bg internally; this function takes
    already transformed maps); vectorised instead of CFBI's O(O^2) Python loop, same
    values, NaN propagation and gradient routing (first minimum in CFBI's order).
    """
    n = int(obj_num)
    if n == 1:
        return dis
    x = dis[:n]
    rest = x.shape[1:]
    eye = torch.eye(n, dtype=torch.bool, device=dis.device).view(n, n, *([1] * len(rest)))
    big = x.unsqueeze(0).expand(n, *x.shape)                        # [i, j, ...] = dis[j]
    big = torch.where(eye, torch.full((), float("inf"), dtype=x.dtype, device=x.device), big)
    big = big.reshape(n, n * rest[0], *rest[1:])                     # CFBI's cat along dim 1
    return torch.min(big, dim=1, keepdim=True)[0]


# ----------------------------------------------------------- attention heads
def _check_binary(name, m):
    if not bool(((m == 0) | (m == 1)).all()):
        raise ValueError(f"{name}: expected binary 0/1 object masks (CFBI's "
                         "(label == obj_ids).float()), got other values")


def _concat_frames(embs, labs):
    """Stack frames ``[N, h_t, w_t, C]`` / ``[N, h_t, w_t]`` along H (W padded with
    unlabelled pixels) so one pooling call sums over all of them."""
    wmax = max(e.shape[2] for e in embs)
    if any(e.shape[2] != wmax for e in embs):
        embs = [F.pad(e, (0, 0, 0, wmax - e.shape[2])) for e in embs]
        labs = [F.pad(l, (0, wmax - l.shape[2]), value=-1) for l in labs]
    return torch.cat(embs, 1), torch.cat(labs, 1)


def _masked_means(emb_list, mask_list, epsilon):
    """CFBI's ``sum(e * m) / (sum(m) + eps)`` and ``(sum(e) - sum(e * m)) /
    (sum(1 - m) + eps)`` summed over a list of frames (``emb [E, C, H, W]`` with E = O or
    1, ``mask [O, 1, H, W]``), via ``vos_kernels.fb_instance_pooling``. Returns
    ``(pos [O, C], neg [O, C])`` float32."""
    vk = _vk()
    O = mask_list[0].shape[0]
    masks = [m.reshape(m.shape[0], m.shape[-2], m.shape[-1]) for m in mask_list]  # [O, H, W]
    for m in masks:
        _check_binary("labels", m)
    pos_num = sum(m.sum(dim=(1, 2)).float() for m in masks)         # [O]
    npix = float(sum(m.shape[1] * m.shape[2] for m in masks))
    neg_num = npix - pos_num
    shared = all(e.shape[0] == 1 or e.stride(0) == 0 for e in emb_list)
    # Overlapping masks cannot be one int label map: use the per-object path then.
    shared = shared and not any(bool((m.sum(0) > 1).any()) for m in masks)
    if shared:
        # One embedding per frame: one int label map with a dummy label O for pixels of
        # no object (CFBI counts them as background of every object).
        embs, labs = [], []
        for e, m in zip(emb_list, masks):
            embs.append(_prep(e[0]).permute(1, 2, 0).unsqueeze(0))   # [1, H, W, C]
            idx = m.argmax(0)
            labs.append(torch.where(m.sum(0) > 0.5, idx, torch.full_like(idx, O)).unsqueeze(0))
        E, Lb = _concat_frames(embs, labs)
        out = vk.fb_instance_pooling(E, Lb.long(), O + 1)            # [1, O+1, 2, C]
        pos, neg = out[0, :O, 0], out[0, :O, 1]
    else:
        # Per-object embeddings (or overlapping masks): one batch entry per object,
        # labels 1 = object, 0 = everything else.
        embs, labs = [], []
        for e, m in zip(emb_list, masks):
            e = e.expand(O, *e.shape[1:]) if e.shape[0] == 1 else e
            embs.append(_prep(e).permute(0, 2, 3, 1))                # [O, H, W, C]
            labs.append((m > 0.5).long())
        E, Lb = _concat_frames(embs, labs)
        out = vk.fb_instance_pooling(E, Lb, 2)                       # [O, 2, 2, C]
        pos, neg = out[:, 1, 0], out[:, 1, 1]
    if epsilon != _FUSED_EPSILON:
        pos = pos * ((pos_num + _FUSED_EPSILON) / (pos_num + epsilon)).unsqueeze(-1)
        neg = neg * ((neg_num + _FUSED_EPSILON) / (neg_num + epsilon)).unsqueeze(-1)
    return pos, neg


def calculate_attention_head(ref_embedding, ref_label, prev_embedding, prev_label,
                             epsilon=1e-5):
    """CFBI's ``calculate_attention_head`` (``networks/layers/attention.py``), fused.

    Args (CFBI's): ``ref_embedding``, ``prev_embedding`` ``[O, C, H, W]`` (CFBI passes the
    frame's embedding expanded over the objects; ``[1, C, H, W]`` also works);
    ``ref_label``, ``prev_label`` ``[O, 1, H, W]`` binary object masks; ``epsilon``.

    Returns ``[O, 4C]`` = ``[ref_fg_mean, ref_bg_mean, prev_fg_mean, prev_bg_mean]`` with
    fg mean ``sum(e*m) / (sum(m) + eps)`` and bg mean ``(sum(e) - sum(e*m)) /
    (sum(1-m) + eps)`` over every pixel (CFBI counts pixels of no object, e.g. ignore,
    as background of every object -- kept here). Computed in float32.
    """
    rp, rn = _masked_means([ref_embedding], [ref_label], epsilon)
    pp, pn = _masked_means([prev_embedding], [prev_label], epsilon)
    out = torch.cat([rp, rn, pp, pn], dim=1)
    return out.to(torch.promote_types(ref_embedding.dtype, prev_embedding.dtype))


def calculate_attention_head_for_eval(ref_embeddings, ref_labels, prev_embedding, prev_label,
                                      epsilon=1e-5):
    """CFBI's ``calculate_attention_head_for_eval``, fused.

    Args (CFBI's): ``ref_embeddings`` a list of ``[1, C, H, W]`` (CFBI's batch of one) or
    ``[O, C, H, W]``, ``ref_labels`` a list of ``[O, 1, H, W]``; the rest as
    :func:`calculate_attention_head`. The reference sums and counts are accumulated over
    all reference frames before dividing, as in CFBI. Returns ``[O, 4C]``.
    """
    rp, rn = _masked_means(list(ref_embeddings), list(ref_labels), epsilon)
    pp, pn = _masked_means([prev_embedding], [prev_label], epsilon)
    out = torch.cat([rp, rn, pp, pn], dim=1)
    return out.to(torch.promote_types(ref_embeddings[0].dtype, prev_embedding.dtype))
