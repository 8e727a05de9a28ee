"""Float64 brute-force oracles for the matching ops, written from the formulas in
../shared/spec/api.md (dense [Nq, Nr] distance matrices: tiny inputs only). Shared by
every test file that checks a backend (test_matching, test_reference, test_triton_matching).

Matching is a minimum of the full distance matrix over a candidate mask
(``global_candidates`` / ``local_candidates``), taken by ``masked_min`` (torch.min: the
first minimum on ties) in ``nearest`` / ``local_nearest``, or by ``seq_min``, the exact
NaN-aware sequential update rule of docs/internals.md, for tests that check NaN indices.

They are differentiable through torch autograd (the gradient of a min flows to its
argmin), which makes them the gradient oracle too; ``sqdist_backward`` is the oracle of
the backward op given the argmin indices.
"""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

INF = float("inf")


def sqdist_matrix(a, b):
    """[N, C] x [M, C] -> [N, M] squared distances by direct differences (float64)."""
    return ((a.double()[:, None, :] - b.double()[None, :, :]) ** 2).sum(-1)


def masked_min(D, mask):
    """Min over the last axis where mask (D and mask broadcast); returns (value, index)
    with inf / -1 where there is no candidate."""
    Dm = torch.where(mask, D, torch.full_like(D, INF))
    v, i = Dm.min(dim=-1)
    empty = ~mask.any(dim=-1)
    return v, torch.where(empty, torch.full_like(i, -1), i)


def seq_min(D, mask):
    """The exact sequential update rule of docs/internals.md over the last axis (D and mask
    broadcast), NaN-aware; returns (value float64, index int64).

    Scanning candidates in increasing index with ``best = +inf, idx = -1``::

        d = d < 0 ? 0 : d
        if (d < best || (d != d && best == best)) { best = d; idx = q; }

    i.e. the lowest index of the minimum (ties at 0 included); inf / -1 without a
    candidate; and once a candidate is NaN the result is NaN with the first NaN's index.
    Unlike ``masked_min`` it does not lean on torch.min's tie or NaN conventions.
    """
    D, mask = torch.broadcast_tensors(D, mask)
    N = D.shape[-1]
    ar = torch.arange(N).expand_as(D)
    past = torch.full_like(ar, N + 1)
    D = torch.where(D < 0, torch.zeros_like(D), D)
    isn = torch.isnan(D) & mask
    has_nan = isn.any(-1)
    first_nan = torch.where(isn, ar, past).min(-1).values
    Dn = torch.where(mask & ~torch.isnan(D), D, torch.full_like(D, INF))
    val = Dn.min(-1).values
    arg = torch.where(Dn == val.unsqueeze(-1), ar, past).min(-1).values
    idx = torch.where(val < INF, arg, torch.full_like(arg, -1))
    val = torch.where(has_nan, torch.full_like(val, float("nan")), val)
    return val, torch.where(has_nan, first_nan, idx)


def _batch_sqdist(a, b):
    """[B, N, C] x [B, M, C] -> [B, N, M], one sqdist_matrix per batch item."""
    return torch.stack([sqdist_matrix(a[i], b[i]) for i in range(a.shape[0])])


def global_candidates(query, reference, labels, L, rate=1):
    """Global matching as a masked minimum: (D [B,1,P,N] float64, cand [B,L,1,N] bool).

    query [B,H,W,C], reference [B,T,Hr,Wr,C], labels [B,T,Hr,Wr]; P = H*W query pixels,
    N = T*Hr*Wr reference pixels (flat index); cand[b, l, 0, n]: reference pixel n has
    label l and lies on the atrous grid (row and column multiples of rate).
    """
    B, H, W, C = query.shape
    _, T, Hr, Wr, _ = reference.shape
    n = torch.arange(T * Hr * Wr)
    on_grid = ((n // Wr) % Hr % rate == 0) & (n % Wr % rate == 0)
    D = _batch_sqdist(query.reshape(B, -1, C), reference.reshape(B, -1, C))
    lab = labels.reshape(B, 1, -1).long()
    cand = torch.stack([(lab == l) & on_grid for l in range(L)], 1)  # [B, L, 1, N]
    return D[:, None], cand


def local_candidates(query, previous, labels, L, windows, rate=1):
    """Multi-local matching as a masked minimum: (D [B,1,1,P,N], cand [B,L,K,P,N]).

    query, previous [B,H,W,C], labels [B,H,W]; P = N = H*W; cand[b, l, k, p, n]: previous
    pixel n has label l and its offset (dy, dx) from query pixel p has |dy|, |dx| <=
    windows[k], both multiples of rate.
    """
    B, H, W, C = query.shape
    ys, xs = torch.arange(H * W) // W, torch.arange(H * W) % W
    dy, dx = ys[None, :] - ys[:, None], xs[None, :] - xs[:, None]
    on_grid = (dy % rate == 0) & (dx % rate == 0)
    D = _batch_sqdist(query.reshape(B, -1, C), previous.reshape(B, -1, C))
    lab = labels.reshape(B, 1, -1).long()
    cand = torch.stack([
        torch.stack([(lab == l) & on_grid & (dy.abs() <= w) & (dx.abs() <= w) for w in windows], 1)
        for l in range(L)], 1)
    return D[:, None, None], cand


def nearest(query, reference, labels, L, rate=1):
    """Global matching sqdist/index [B,L,H,W]. reference [B,T,Hr,Wr,C], labels [B,T,Hr,Wr]."""
    B, H, W, _ = query.shape
    v, i = masked_min(*global_candidates(query, reference, labels, L, rate))
    return v.reshape(B, L, H, W), i.reshape(B, L, H, W)


def local_nearest(query, previous, labels, L, windows, rate=1):
    """Multi-local matching sqdist/index [B,L,K,H,W]."""
    B, H, W, _ = query.shape
    v, i = masked_min(*local_candidates(query, previous, labels, L, windows, rate))
    return v.reshape(B, L, len(windows), H, W), i.reshape(B, L, len(windows), H, W)


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


def _smallest_two_gap(x, dim):
    """Smallest gap between the two smallest finite entries along ``dim``, over all other
    positions (inf where fewer than two are finite)."""
    x = x.movedim(dim, -1)
    if x.shape[-1] < 2:
        return INF
    two = x.topk(2, dim=-1, largest=False).values
    gap = torch.where(torch.isinf(two[..., 1]), torch.full_like(two[..., 0], INF), two[..., 1] - two[..., 0])
    return float(gap.min()) if gap.numel() else INF


def fb_min_gap(D, cand, bias):
    """The smallest margin of the two minima fb matching takes, for float64 gradcheck.

    D, cand as from ``global_candidates`` / ``local_candidates`` (label axis 1); bias [L],
    or None for ``labelled_nearest_sqdist`` (then (a) only).
    Returns the least of (a) the gap between the nearest and second-nearest candidate of
    each (query pixel, label[, window]), and (b) the gap between the two smallest
    ``d_l + bias_l`` over the labels of each query pixel[, window], which orders the
    ``fg`` values the background minimum picks from (tanh is increasing).

    A minimum is not differentiable at a tie. Moving one input by gradcheck's eps = 1e-6
    moves a squared distance by about ``2 * |q_c - r_c| * eps`` (~1e-5 for randn inputs),
    so a finite difference across a gap below that straddles two branches and disagrees
    with the analytical gradient. Tests draw inputs until this gap is well above it.
    """
    Dm = torch.where(cand, D.double(), torch.full_like(D, INF, dtype=torch.float64))
    gap_candidates = _smallest_two_gap(Dm, -1)
    d = Dm.min(-1).values                                          # [B, L, ...]
    if bias is None:  # labelled_nearest_sqdist: no fg/bg transform, no label order
        return gap_candidates
    b = bias.detach().cpu().double().view(1, -1, *([1] * (d.dim() - 2)))
    gap_labels = _smallest_two_gap(d + b, 1)
    return min(gap_candidates, gap_labels)


def draw_separated(draw, gap, margin=1e-4, tries=200):
    """``draw()`` again until ``gap(*draw())`` exceeds ``margin``; returns that draw.

    For gradient checks through minima (see ``fb_min_gap``): redrawing from the test's
    generator keeps the run replayable from its seed."""
    for _ in range(tries):
        xs = draw()
        if gap(*xs) > margin:
            return xs
    raise AssertionError(f"no draw in {tries} had every minimum separated by more than {margin}")


def _least_positive(d):
    """Smallest finite entry of ``d`` above 0 (inf if none): exact zeros are structural
    ties, see ``kink_margin``."""
    d = d[torch.isfinite(d) & (d > 0)]
    return float(d.min()) if d.numel() else INF


def _nearest_other(x, k):
    """x [..., n]: smallest positive distance between one of the ``k`` smallest entries and
    one of the others (the nearest distinct value that could swap places with them)."""
    if x.shape[-1] <= k:
        return INF
    s = torch.nan_to_num(x, nan=INF).sort(dim=-1).values
    return _least_positive((s[..., None, k:] - s[..., :k, None]).abs())


class _KinkMargin(TorchDispatchMode):
    """Records, for every op that branches on its input's value, how far that input is
    from the branch point (see ``kink_margin``)."""

    def __init__(self):
        super().__init__()
        self.margin, self.where = INF, None

    def _note(self, func, gap):
        if gap < self.margin:
            self.margin, self.where = gap, str(func)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self._measure(func, args, kwargs)   # before the call: in-place ops (relu_) overwrite x
        return func(*args, **kwargs)

    def _measure(self, func, args, kwargs):
        if func.namespace == "vos_kernels":
            self._custom(func, list(args) + list(kwargs.values()))
            return
        if func.namespace not in ("aten", "prims"):
            raise NotImplementedError(f"kink_margin does not know {func}")
        name = func.overloadpacket.__name__.rstrip("_")
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if x is None or not x.is_floating_point() or x.numel() == 0:
            return
        if name in _KINK_UNSEEN:
            raise NotImplementedError(f"kink_margin does not see through {func}: check its ties by hand")
        x = x.detach().double()
        other = args[1] if len(args) > 1 and isinstance(args[1], torch.Tensor) else None
        if name in ("relu", "abs", "sign", "sgn", "leaky_relu"):
            self._note(func, _least_positive(x.abs()))
        elif name in ("threshold", "clamp", "clamp_min", "clamp_max", "hardtanh"):
            # threshold(x, threshold, value): only its second argument is a branch point
            bounds = args[1:2] if name == "threshold" else list(args[1:]) + list(kwargs.values())
            for b in bounds:
                if isinstance(b, torch.Tensor):
                    self._note(func, _least_positive((x - b.detach().double()).abs()))
                elif isinstance(b, (int, float)) and not isinstance(b, bool):
                    self._note(func, _least_positive((x - b).abs()))
        elif name in ("minimum", "maximum", "fmin", "fmax", "min", "max", "aminmax", "amin", "amax") and other is not None:
            self._note(func, _least_positive((x - other.detach().double()).abs()))
        elif name in ("min", "max", "amin", "amax", "aminmax"):
            dims = args[1] if len(args) > 1 else kwargs.get("dim", ())
            dims = [] if dims is None else [dims] if isinstance(dims, int) else list(dims)
            dims = [d % x.dim() for d in dims] if x.dim() else []
            dims = dims or list(range(x.dim()))
            keep = [d for d in range(x.dim()) if d not in dims]
            y = x.permute(*keep, *dims).reshape(*[x.shape[d] for d in keep], -1)
            if name in ("min", "amin", "aminmax"):
                self._note(func, _nearest_other(y, 1))
            if name in ("max", "amax", "aminmax"):
                self._note(func, _nearest_other(-y, 1))
        elif name == "topk":
            k = args[1]
            dim = args[2] if len(args) > 2 else kwargs.get("dim", -1)
            largest = args[3] if len(args) > 3 else kwargs.get("largest", True)
            y = x.movedim(dim, -1)
            self._note(func, _nearest_other(-y if largest else y, k))
        elif name == "sort":
            dim = args[1] if len(args) > 1 and isinstance(args[1], int) else kwargs.get("dim", -1)
            y = torch.nan_to_num(x.movedim(dim, -1), nan=INF).sort(dim=-1).values
            self._note(func, _least_positive(y[..., 1:] - y[..., :-1]))

    def _custom(self, func, a):
        """This project's ops, measured before their saturating transforms."""
        name = func.overloadpacket.__name__
        c64 = [x.detach().cpu().double() if isinstance(x, torch.Tensor) and x.is_floating_point()
               else x.detach().cpu() if isinstance(x, torch.Tensor) else x for x in a]
        if name == "labelled_nearest_sqdist":      # query, reference, labels, L, rate
            self._note(func, fb_min_gap(*global_candidates(*c64[:4], *c64[4:5]), None))
        elif name == "fb_global_matching":         # query, reference, labels, L, bias, rate
            self._note(func, fb_min_gap(*global_candidates(*c64[:4], *c64[5:6]), c64[4]))
        elif name == "fb_multi_local_matching":    # query, previous, labels, L, windows, bias, rate
            self._note(func, fb_min_gap(*local_candidates(*c64[:5], *c64[6:7]), c64[5]))
        elif name == "topk_memory_read":           # query_key, memory_key, memory_value, k, scale, ...
            aff, k = affinity(c64[0], c64[1], c64[4]), c64[3]
            top = torch.nan_to_num(aff, nan=INF).sort(dim=-1, descending=True).values[..., :k + 1]
            self._note(func, _least_positive(top[..., :-1] - top[..., 1:]))   # selection and order
        elif name not in _SMOOTH_CUSTOM:
            raise NotImplementedError(f"kink_margin does not know {func}")


# this project's ops without branches on their differentiable inputs' values
_SMOOTH_CUSTOM = {"fb_instance_pooling", "nearest_sqdist_backward", "gmm_em", "prototype_values",
                  "prototype_attention", "diag_gmm_log_prob", "diag_gmm_log_prob_backward",
                  "diag_gmm_fit", "diag_gmm_fit_backward"}

# ops with ties that kink_margin does not measure: it refuses rather than miss them
_KINK_UNSEEN = {"max_pool1d_with_indices", "max_pool2d_with_indices", "max_pool3d_with_indices",
                "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d", "median",
                "nanmedian", "kthvalue", "cummax", "cummin", "round", "floor", "ceil", "trunc"}


def kink_margin(fn, *args):
    """How far ``fn(*args)`` is from a point where it is not differentiable, for gradcheck.

    Runs ``fn`` once under a dispatch mode and returns ``(margin, op)``: the smallest
    distance, over every call of a branching aten op, from that op's input to its branch
    point, and the op that had it (``(inf, None)`` if none). Measured: relu / abs / sign /
    leaky_relu (``|x|``), threshold / clamp / hardtanh (``|x - bound|``),
    minimum / maximum and binary min / max (``|a - b|``), min / max / amin / amax / aminmax
    reductions (each extreme to the nearest other value along the reduced dims), topk (the
    k selected to the nearest unselected) and sort (adjacent values). Pooling maxima,
    medians and rounding raise ``NotImplementedError``. This project's ops are measured
    before their saturating transforms: matching by ``fb_min_gap`` on the distances, top-k
    memory read by the gaps among the k + 1 largest affinities (selection and order). Not
    seen: comparisons feeding ``where``.

    The margin is absolute, at each op's input: meaningful where that input is O(1) and
    moves by O(eps) (normalised activations, distances, affinities). Behind a saturating
    function (a min over sigmoids, as in ``vos_kernels.reference``) ulp-level gaps with no
    gradient show up; guard such code by its structure instead.

    Exact ties (distance 0) are skipped: they are structural (masked entries set to one
    constant, duplicated values, zero padding), a random float64 draw does not produce
    them, and a structural tie at a real kink fails at every seed, not by chance.

    gradcheck's central difference moves an op's input by eps times its sensitivity to
    the perturbed input; across a margin smaller than that it averages two branches and
    disagrees with the (correct) analytical gradient. With ``draw_separated`` a test
    redraws until the margin is well above it.
    """
    with _KinkMargin() as mode:
        fn(*args)
    return mode.margin, mode.where


def pooling(embedding, labels, L):
    """[B,L,2,C]: mean of the pixels of label l, and of the labelled pixels not of l
    (denominators count + 1e-5). Pixels are selected, not multiplied by a 0/1 mask, so a
    NaN reaches only the means its pixel belongs to."""
    B, H, W, C = embedding.shape
    e = embedding.double().reshape(B, -1, C)
    lab = labels.reshape(B, -1).long()
    zero = torch.zeros((), dtype=e.dtype)

    def mean(x, sel):
        return torch.where(sel[:, None], x, zero).sum(0) / (sel.double().sum() + 1e-5)

    def pair(b, l):  # (pixels of label l, labelled pixels not of l)
        return torch.stack([mean(e[b], lab[b] == l), mean(e[b], (lab[b] >= 0) & (lab[b] != l))])

    return torch.stack([torch.stack([pair(b, l) for l in range(L)]) for b in range(B)])


def sqdist_backward(grad, query, reference, index):
    """Gradients (query, reference) of ``sum over index >= 0 of grad * ||query_p -
    reference_index||^2`` by float64 autograd: grad, index [B,M,P]; query [B,P,C];
    reference [B,N,C]. The oracle of the backward of the matching ops."""
    q = query.detach().cpu().double().requires_grad_(True)
    r = reference.detach().cpu().double().requires_grad_(True)
    g = grad.detach().cpu().double()
    idx = index.detach().cpu().long()
    B, M, P = idx.shape
    rq = torch.gather(r, 1, idx.clamp(min=0).reshape(B, M * P, 1)
                      .expand(B, M * P, r.shape[-1])).reshape(B, M, P, -1)
    d = ((q[:, None] - rq) ** 2).sum(-1)
    torch.where(idx >= 0, g * d, torch.zeros_like(d)).sum().backward()
    return q.grad, r.grad


def affinity(query_key, memory_key, scale):
    """STCN's memory-read affinity in float64, ``[B, Nq, Nm]``:
    ``s[b, q, n] = (2·m_n·q − ‖m_n‖²)·scale`` (differentiable; CPU copies of the inputs)."""
    q, m = query_key.cpu().double(), memory_key.cpu().double()
    return (2 * torch.einsum("bnc,bqc->bqn", m, q) - (m * m).sum(-1).unsqueeze(1)) * scale


def topk_read(query_key, memory_key, memory_value, k, scale):
    """Top-k memory read in float64 by brute force: full affinity, a stable descending sort
    (ties: lowest index; NaN first, as torch.topk), max-subtracted softmax, gather.
    Differentiable (torch ops). Returns readout, index, weight, hits [B,Nm], weight sums."""
    q, m, v = query_key.double(), memory_key.double(), memory_value.double()
    B, Nq, _ = q.shape
    Nm = m.shape[1]
    K = min(k, Nm)
    s = affinity(q, m, scale)                                                        # [B,Nq,Nm]
    key = torch.where(torch.isnan(s), torch.full_like(s, float("inf")), s)
    order = torch.sort(key.detach(), dim=-1, descending=True, stable=True).indices[..., :K]
    top = torch.gather(s, -1, order)
    w = torch.softmax(top, dim=-1) if K > 1 else torch.exp(top - top)
    v_sel = torch.gather(v.unsqueeze(1).expand(B, Nq, Nm, v.shape[-1]), 2,
                         order.unsqueeze(-1).expand(B, Nq, K, v.shape[-1]))
    readout = (w.unsqueeze(-1) * v_sel).sum(2)
    hits = torch.zeros(B, Nm, dtype=torch.float64).scatter_add_(1, order.reshape(B, -1),
                                                                 torch.ones(B, Nq * K, dtype=torch.float64))
    wsum = torch.zeros(B, Nm, dtype=torch.float64).scatter_add_(1, order.reshape(B, -1), w.detach().reshape(B, -1))
    return readout, order, w, hits, wsum


def topk_unambiguous(query_key, memory_key, k, scale, eps=1e-4):
    """``[B, Nq]`` bool: queries whose top-k selection and order float32 cannot get wrong —
    every gap between consecutive values among the ``min(k + 1, Nm)`` largest float64
    affinities exceeds ``eps`` (float32 affinities here are off by ~1e-6 relative). Exact
    ties are tested separately with integer inputs."""
    s = affinity(query_key.detach(), memory_key.detach(), scale)
    n = min(k + 1, s.shape[-1])
    top = torch.sort(torch.nan_to_num(s, nan=float("inf")), dim=-1, descending=True).values[..., :n]
    if n < 2:
        return torch.ones(s.shape[:2], dtype=torch.bool)
    return ((top[..., :-1] - top[..., 1:]) > eps).all(-1)


def usage_of(index, weight, num_memory, hits):
    """Brute-force usage of a selection: per memory entry, the number of (query, slot) pairs
    holding it (``hits``) or the sum of their weights. ``[B, Nm]`` float64."""
    B = index.shape[0]
    add = torch.ones(index.numel() // B, dtype=torch.float64).expand(B, -1) if hits else weight.double().reshape(B, -1)
    return torch.zeros(B, num_memory, dtype=torch.float64).scatter_add_(1, index.reshape(B, -1), add)


# ----------------------------------------------------------------------------------------
# float32 tolerances from the conditioning of the exact result
# ----------------------------------------------------------------------------------------
def _as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def rounding_sensitivity(fn, args, rel, trials=8, seed=0):
    """How far rounding errors of relative size ``rel`` in the inputs move the exact result,
    element by element.

    ``fn`` is a float64 oracle returning a tensor or a tuple of tensors; every floating
    tensor of ``args`` is multiplied elementwise by ``1 + rel·u``, u ~ U[-1, 1] (a fixed
    generator: the same perturbations on every call), ``trials`` times. Returns
    ``(exact, sensitivity)``: the oracle on the unperturbed inputs and, per output, the
    largest absolute change of each element over the trials (tuples of float64 tensors of
    the outputs' shapes).

    Iterative ops such as EM (a soft assignment, then means, then again) amplify their
    float32 rounding by the conditioning of the input: a point almost equally close to two
    means, or a mean fed by few points, can turn a 1e-7 logit error into 1e-4 in the
    responsibilities after a few iterations. A fixed tolerance is then either loose for
    well-conditioned inputs or fails on ill-conditioned ones (CI stop 14: 4.9e-5 against
    2e-5 on one random draw). A kernel whose float32 error stays within a few times this
    sensitivity is as accurate as float32 inputs allow (backward stability); a bug is off
    by orders of magnitude more."""
    g = torch.Generator().manual_seed(seed)
    args64 = [a.detach().cpu().double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
    exact = _as_tuple(fn(*args64))
    sens = [torch.zeros_like(e) for e in exact]
    for _ in range(trials):
        moved = [a * (1 + rel * (2 * torch.rand(a.shape, generator=g, dtype=torch.float64) - 1))
                 if torch.is_tensor(a) and a.is_floating_point() else a for a in args64]
        for i, (m, e) in enumerate(zip(_as_tuple(fn(*moved)), exact)):
            sens[i] = torch.maximum(sens[i], torch.nan_to_num((m - e).abs(), nan=0.0))
    return exact, tuple(sens)


def assert_within_rounding(got, fn, args, channels, floor=1e-5, factor=8.0, cap=1e-3, what="output",
                           unit=2.0 ** -24):
    """Checks float32 outputs ``got`` (tensor or tuple) against the float64 oracle ``fn`` on
    ``args``, element by element, with the tolerance ``floor + factor · sensitivity`` of
    that element, the sensitivity measured by :func:`rounding_sensitivity` at
    ``rel = unit·√channels`` (the typical rounding error of a dot product over ``channels``
    terms, relative; ``unit`` is the product's: 2⁻²⁴ for float32 FMAs, 2⁻²² for 3xTF32
    tensor-core products, whose split operands keep about 22 bits).

    ``factor`` 8 with eight perturbations keeps a margin of 4 over the worst element of
    1500 random draws of test_cuda's EM case (CPU float32 kernel, 2026-11-21; with four
    perturbations the per-element estimates were noisier, worst 0.53). Ill-conditioning
    is local (points near a decision boundary), so per-element tolerances stay near
    ``floor`` elsewhere; ``cap`` guards the test itself: if the median tolerance of an
    output exceeds it, the inputs are too ill-conditioned for the comparison to mean much,
    and the test fails as a test-input error."""
    got = _as_tuple(got)
    exact, sens = rounding_sensitivity(fn, args, unit * channels ** 0.5)
    for i, (g, e, s) in enumerate(zip(got, exact, sens)):
        assert g.shape == e.shape, (what, i, g.shape, e.shape)
        tol = floor + factor * s
        if tol.numel():
            assert float(tol.median()) <= cap, (f"{what} {i}: test inputs too ill-conditioned (median tolerance "
                                                f"{float(tol.median()):.3g} > {cap})")
        g = g.detach().cpu().double()
        err = torch.where(torch.isnan(g) & torch.isnan(e), torch.zeros_like(e), (g - e).abs())
        err = torch.nan_to_num(err, nan=float("inf"))            # NaN on one side only fails
        bad = err > tol
        if bad.any():
            j = int(torch.argmax((err / tol).flatten()))
            raise AssertionError(
                f"{what} {i}: {int(bad.sum())} of {bad.numel()} elements off; worst at flat index {j}: "
                f"error {float(err.flatten()[j]):.3g} > tolerance {float(tol.flatten()[j]):.3g} "
                f"(floor {floor} + {factor} x rounding sensitivity {float(s.flatten()[j]):.3g})")
