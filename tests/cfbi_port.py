"""A straight port of what CFBI's ``networks/layers/matching.py`` and ``attention.py``
compute, written here in a few lines of plain torch (one-hot labels, chunk distances padded
with 5e4, sigmoid transform, unfold-based local matching with CFBI's channel order,
attention-head means), and of the per-sample loop of CFBI / CFBI+'s
``before_seghead_process`` that concatenates the collaborative ensembler's input.

The oracle of ``test_compat_cfbi.py`` and ``test_cfbi_heads.py``.
"""

import torch
import torch.nn.functional as F

PAD = 5e4

def _grid(h, w, rate):
    ys = torch.arange(h) % rate == 0
    xs = torch.arange(w) % rate == 0
    return (ys[:, None] & xs[None, :]).float()


def port_atrous_labels(labels, rate, pixel_num):
    """CFBI: objects with > pixel_num * rate^2 pixels keep only grid pixels."""
    labels = labels.clone()
    if rate > 1:
        big = labels.sum(dim=(0, 1)) > pixel_num * rate ** 2
        labels[:, :, big] = labels[:, :, big] * _grid(*labels.shape[:2], rate)[..., None]
    return labels


def port_global(ref_list, query, lab_list, dis_bias, ori_size=None, rate=1, pixel_num=0):
    h, w, c = query.shape
    O = lab_list[0].shape[2]
    R = torch.cat([r.reshape(-1, c) for r in ref_list])
    Lb = torch.cat([port_atrous_labels(l, rate, pixel_num).reshape(-1, O) for l in lab_list])
    keep = Lb.sum(1) > 0.9
    if keep.sum() == 0:
        return torch.ones(1, h, w, O, 1)
    R, Lb = R[keep], Lb[keep]
    q = query.reshape(-1, c)
    d = (q * q).sum(1)[:, None] + (R * R).sum(1)[None] - 2 * q @ R.t()
    d = d[:, None, :] + (Lb < 0.1).t().float()[None] * PAD          # [m, O, N]
    nn = d.min(dim=2)[0]
    out = (torch.sigmoid(nn.view(1, h, w, O, 1) + dis_bias.view(1, 1, 1, -1, 1)) - 0.5) * 2
    if ori_size is not None:
        out = F.interpolate(out.view(h, w, O, 1).permute(2, 3, 0, 1), size=ori_size,
                            mode="bilinear", align_corners=True)
        out = out.permute(2, 3, 0, 1).reshape(1, ori_size[0], ori_size[1], O, 1)
    return out


def port_local(prev, query, prev_lab, dis_bias, windows, ori_size=None, rate=1,
               allow_downsample=True):
    H, W, C = prev.shape
    O = prev_lab.shape[2]
    ori_size = (H, W) if ori_size is None else tuple(ori_size)
    x = query.permute(2, 0, 1)[None]
    y = prev.permute(2, 0, 1)[None]
    if allow_downsample:
        size = (H // 2 + 1, W // 2 + 1)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        y = F.interpolate(y, size=size, mode="bilinear", align_corners=True)
    h, w = x.shape[2:]
    D = windows[-1]
    P = D - D % rate
    n = 2 * P // rate + 1
    c = P // rate
    offs = F.unfold(F.pad(y, (P, P, P, P)), (h, w), stride=rate).view(C, h * w, n * n)
    x2 = x.pow(2).sum(1).view(h * w, 1)
    y2 = F.unfold(F.pad(y.pow(2).sum(1, keepdim=True), (P, P, P, P), value=PAD), (h, w),
                  stride=rate).view(h * w, n * n)
    d = x2 + y2 - 2 * torch.einsum("cp,cpo->po", x.view(C, h * w), offs)   # [hw, n*n]
    lab = prev_lab.permute(2, 0, 1)[:, None]
    if (h, w) != (H, W):
        lab = F.interpolate(lab, size=(h, w), mode="nearest")
    masks = F.unfold(F.pad(lab, (P, P, P, P)), (h, w), stride=rate).view(O, h * w, n * n) > 0.9
    dm = torch.where(masks, d[None], torch.full((), PAD)).view(O, h * w, n, n)
    outs = []
    for k in [windows[-1]] + list(windows[:-1]):     # CFBI: [largest, smallest, ...]
        kc = k // rate
        outs.append(dm[:, :, c - kc:c + kc + 1, c - kc:c + kc + 1].reshape(O, h * w, -1)
                    .min(-1)[0])
    md = torch.stack(outs, 1).view(O, len(windows), h, w)
    md = (torch.sigmoid(md + dis_bias.view(-1, 1, 1, 1)) - 0.5) * 2
    if (h, w) != ori_size:
        md = F.interpolate(md, size=ori_size, mode="bilinear", align_corners=True)
    return md.permute(2, 3, 0, 1).reshape(1, ori_size[0], ori_size[1], O, len(windows))


def port_f2b(dis, obj_num):
    if obj_num == 1:
        return dis
    out = []
    for i in range(obj_num):
        others = torch.cat([dis[j][None] for j in range(obj_num) if j != i], dim=1)
        out.append(others.min(dim=1, keepdim=True)[0])
    return torch.cat(out, 0)


def port_means(emb, lab, eps):
    pos = (emb * lab).sum(dim=(2, 3))
    neg = emb.sum(dim=(2, 3)) - pos
    return pos, neg, lab.sum(dim=(2, 3)), (1.0 - lab).sum(dim=(2, 3))


def port_head(ref_e, ref_l, prev_e, prev_l, eps=1e-5):
    rp, rn, rpn, rnn = port_means(ref_e, ref_l, eps)
    pp, pn, ppn, pnn = port_means(prev_e, prev_l, eps)
    return torch.cat([rp / (rpn + eps), rn / (rnn + eps), pp / (ppn + eps), pn / (pnn + eps)], 1)


def port_head_eval(ref_es, ref_ls, prev_e, prev_l, eps=1e-5):
    acc = [0.0, 0.0, 0.0, 0.0]
    for e, l in zip(ref_es, ref_ls):
        acc = [a + v for a, v in zip(acc, port_means(e, l, eps))]
    pp, pn, ppn, pnn = port_means(prev_e, prev_l, eps)
    return torch.cat([acc[0] / (acc[2] + eps), acc[1] / (acc[3] + eps),
                      pp / (ppn + eps), pn / (pnn + eps)], 1)


# ------------------------------------------------- the ensembler's input (CFBI / CFBI+)
def _scale_label(labels, size):
    """CFBI: ``F.interpolate(label.float(), size, mode='nearest').int()`` of ``[B, 1, H, W]``."""
    return F.interpolate(labels.float(), size=size, mode="nearest").int()


def port_cfbip_input(cur, ref, prev, ref_label, prev_label, gt_ids, bg_bias, fg_bias, matching_dims,
                     windows, global_rates, local_rates, training=True, pixel_num=0, eps=1e-5):
    """CFBI+'s ``before_seghead_process`` up to the ensembler, per sample and scale.

    ``cur``, ``prev``: per scale ``[B, C, h, w]``; ``ref``: per scale a list of T reference
    frames ``[B, C, h, w]``; ``ref_label``: a list of T ``[B, 1, H, W]``; ``prev_label``
    ``[B, 1, H, W]``; ``bg_bias``, ``fg_bias`` ``[S, 1, 1, 1]``. Returns per sample a list
    over scales of ``(CE_input [O, Cin, h, w], attention_head [O, 4C])``.
    """
    out = []
    for n in range(cur[0].shape[0]):
        ids = torch.arange(0, gt_ids[n] + 1).int().view(-1, 1, 1, 1)
        O = ids.shape[0]
        per_scale = []
        for s in range(len(cur)):
            h, w = cur[s].shape[2:]
            m = matching_dims[s]
            e_cur = cur[s][n]
            e_prev = prev[s][n]
            dt = e_cur.dtype      # CFBI's .float(): the embeddings' dtype (float64 tests)
            prev_l = (_scale_label(prev_label, (h, w))[n].int() == ids).to(dt)           # [O, 1, h, w]
            if gt_ids[n] > 0:
                dis_bias = torch.cat([bg_bias[s].unsqueeze(0), fg_bias[s].unsqueeze(0).expand(gt_ids[n], -1, -1, -1)])
            else:
                dis_bias = bg_bias[s].unsqueeze(0)
            q = e_cur[:m].permute(1, 2, 0)
            ref_ls = [(_scale_label(lab, (h, w))[n].int() == ids).to(dt) for lab in ref_label]  # [O, 1, h, w]
            rate = global_rates[s]
            subsample = rate > 1 and (training or pixel_num > 0)
            if subsample:       # CFBI zeroes the off-grid labels of big objects in place
                for lab in ref_ls:
                    view = lab.squeeze(1).permute(1, 2, 0)
                    view.copy_(port_atrous_labels(view, rate, pixel_num))
            g_fg = port_global([r[n][:m].permute(1, 2, 0) for r in ref[s]], q,
                               [lab.squeeze(1).permute(1, 2, 0) for lab in ref_ls], dis_bias.view(-1),
                               rate=rate, pixel_num=pixel_num if subsample else 0)
            l_fg = port_local(e_prev[:m].permute(1, 2, 0), q, prev_l.squeeze(1).permute(1, 2, 0), dis_bias.view(-1),
                              windows[s], rate=local_rates[s], allow_downsample=False)
            g_fg = g_fg.squeeze(0).permute(2, 3, 0, 1)                                 # [O, 1, h, w]
            l_fg = l_fg.squeeze(0).permute(2, 3, 0, 1)                                 # [O, K, h, w]
            g_bg = port_f2b(g_fg, O)
            l_bg = port_f2b(l_fg.permute(0, 2, 3, 1).unsqueeze(1), O).permute(0, 4, 2, 3, 1).squeeze(-1)
            cur_e = e_cur.unsqueeze(0).expand(O, -1, -1, -1)
            prev_e = e_prev.unsqueeze(0).expand(O, -1, -1, -1)
            ce = torch.cat([g_fg, l_fg, prev_l, l_bg, g_bg, cur_e, prev_e * prev_l, prev_e * (1 - prev_l)], 1)
            head = port_head_eval([r[n].unsqueeze(0).expand(O, -1, -1, -1) for r in ref[s]], ref_ls, prev_e, prev_l, eps)
            per_scale.append((ce, head))
        out.append(per_scale)
    return out


def port_cfbi_input(cur, ref, prev, ref_label, prev_label, gt_ids, bg_bias, fg_bias, windows, prehead,
                    global_rate=1, local_rate=1, eps=1e-5):
    """CFBI's ``before_seghead_process`` (training path, one reference frame) up to the
    ensembler: ``[current, prev × m, prev × (1 − m), prehead(maps)]`` with CFBI's local
    downsampling. ``prehead``: a callable on ``[O, 3 + 2K, h, w]``."""
    out = []
    h, w = cur.shape[2:]
    for n in range(cur.shape[0]):
        ids = torch.arange(0, gt_ids[n] + 1).int().view(-1, 1, 1, 1)
        O = ids.shape[0]
        dis_bias = torch.cat([bg_bias, fg_bias.expand(gt_ids[n], -1, -1, -1)]) if gt_ids[n] > 0 else bg_bias
        q = cur[n].permute(1, 2, 0)
        ref_l = (_scale_label(ref_label, (h, w))[n].int() == ids).to(cur.dtype)
        g_fg = port_global([ref[n].permute(1, 2, 0)], q, [ref_l.squeeze(1).permute(1, 2, 0)], dis_bias.view(-1),
                           rate=global_rate)
        prev_l = (_scale_label(prev_label, (h, w))[n].int() == ids).to(cur.dtype)
        l_fg = port_local(prev[n].permute(1, 2, 0), q, prev_l.squeeze(1).permute(1, 2, 0), dis_bias.view(-1),
                          windows, rate=local_rate, allow_downsample=True)
        g_fg = g_fg.squeeze(0).permute(2, 3, 0, 1)
        l_fg = l_fg.squeeze(0).permute(2, 3, 0, 1)
        g_bg = port_f2b(g_fg, O)
        l_bg = port_f2b(l_fg.permute(0, 2, 3, 1).unsqueeze(1), O).permute(0, 4, 2, 3, 1).squeeze(-1)
        maps = prehead(torch.cat([g_fg, l_fg, prev_l, l_bg, g_bg], 1))
        cur_e = cur[n].unsqueeze(0).expand(O, -1, -1, -1)
        prev_e = prev[n].unsqueeze(0).expand(O, -1, -1, -1)
        ce = torch.cat([cur_e, prev_e * prev_l, prev_e * (1 - prev_l), maps], 1)
        head = port_head(ref[n].unsqueeze(0).expand(O, -1, -1, -1), ref_l, prev_e, prev_l, eps)
        out.append((ce, head))
    return out
