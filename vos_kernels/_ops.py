"""Loads the operator library and registers what lives in Python: fake (meta) kernels for
torch.compile, autograd formulas, and the CUDA kernels that are written in Triton.

Schemas and CPU kernels are C++ (csrc/ops.cpp, csrc/cpu/). The backward formulas follow
../shared/spec/matching.md ("Gradients"): the gradient of a minimum flows only to the
saved argmin pair, through the derivative of the fg transform; bg routes its gradient to
the label that achieved min over m != l.
"""
from __future__ import annotations

import os

import torch

LIBRARY_ERROR: str | None = None


def _load_library() -> str | None:
    """Load the compiled ops: the setuptools extension, else VOS_KERNELS_LIBRARY (CMake)."""
    global LIBRARY_ERROR
    try:
        from . import _C  # noqa: F401  (registers the ops on import)

        return "extension"
    except ImportError as exc:
        LIBRARY_ERROR = str(exc)
    path = os.environ.get("VOS_KERNELS_LIBRARY")
    if path:
        try:
            torch.ops.load_library(path)
            return path
        except OSError as exc:
            LIBRARY_ERROR = f"{LIBRARY_ERROR}; VOS_KERNELS_LIBRARY={path}: {exc}"
    return None


LIBRARY = _load_library()
LOADED = LIBRARY is not None
# Ops with a CUDA kernel: CUDA C++ (csrc/cuda/, registered by the C++ library itself when
# it was built with CUDA) where written, Triton otherwise (registered below).
GMM_OPS = ("gmm_em", "prototype_values", "prototype_attention", "diag_gmm_log_prob", "diag_gmm_log_prob_backward",
           "diag_gmm_fit", "diag_gmm_fit_backward")
CUDA_OPS = ("labelled_nearest_sqdist", "fb_global_matching", "fb_multi_local_matching", "fb_instance_pooling",
            "nearest_sqdist_backward", "topk_memory_read") + GMM_OPS
# Which of them hold a CUDA C++ kernel: read before the Triton kernels are registered.
CUDA_CPP_OPS = frozenset(
    name for name in CUDA_OPS
    if LOADED and torch._C._dispatch_has_kernel_for_dispatch_key("vos_kernels::" + name, "CUDA"))
CUDA_CPP = bool(CUDA_CPP_OPS)


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------
# Backward pieces, written with device-agnostic torch ops (CPU, CUDA, Triton interpreter).
# ----------------------------------------------------------------------------------------


def route_bg_grad(grad_fg, grad_bg, fg):
    """Total gradient on fg[b, l, ...] given grads of fg and of bg = min_{m != l} fg[m].

    The minimum over m != l is fg[best] for every l != best and fg[second] for l = best,
    with best/second ordered as in the forward (NaN first, then value, lowest label).
    """
    L = fg.shape[1]
    if grad_fg is None:
        grad_fg = torch.zeros_like(fg)
    if grad_bg is None or L == 1:
        return grad_fg
    key = torch.where(torch.isnan(fg), torch.full_like(fg, float("-inf")), fg)
    order = torch.sort(key, dim=1, stable=True).indices
    best, second = order[:, :1], order[:, 1:2]
    labels = torch.arange(L, device=fg.device).view(1, L, *([1] * (fg.dim() - 2)))
    is_best = labels == best
    to_best = (grad_bg * (~is_best)).sum(dim=1, keepdim=True)
    return grad_fg + is_best * to_best + (labels == second) * grad_bg.gather(1, best)


def _fb_backward(ctx, grad_fg, grad_bg, M):
    """Shared by global and multi-local matching: returns (grad_query, grad_reference, grad_bias)."""
    fg, index = ctx.saved_tensors[2], ctx.saved_tensors[3]
    g_fg = route_bg_grad(grad_fg, grad_bg, fg)
    g_d = g_fg * (1.0 - fg * fg) * 0.5  # d/dx tanh(x/2); 0 for empty labels (fg == 1)
    g_d = torch.where(index >= 0, g_d, torch.zeros_like(g_d))
    B = fg.shape[0]
    reduce_dims = [0] + list(range(2, fg.dim()))
    grad_bias = g_d.sum(dim=reduce_dims)
    return g_d.reshape(B, M, -1), index.reshape(B, M, -1), grad_bias


def _sqdist_grads(ctx, g, index, query, reference):
    B, C = query.shape[0], query.shape[-1]
    q = query.reshape(B, -1, C)
    r = reference.reshape(B, -1, C)
    gq, gr = _backward_op(ctx, "nearest_sqdist_backward")(g.to(_out_dtype(q)), q, r, index)
    return gq.reshape(query.shape).to(query.dtype), gr.reshape(reference.shape).to(reference.dtype)


def _global_setup(ctx, inputs, output):
    # inputs: query, reference, labels, num_labels, bias, atrous_rate
    query, reference, _lab, _L, bias, _rate = inputs
    fg, _bg, index = output
    ctx.bias_dtype = bias.dtype
    ctx.save_for_backward(query, reference, fg, index)


def _global_backward(ctx, grad_fg, grad_bg, _grad_index):
    query, reference = ctx.saved_tensors[0], ctx.saved_tensors[1]
    L = ctx.saved_tensors[2].shape[1]
    g, index, grad_bias = _fb_backward(ctx, grad_fg, grad_bg, L)
    gq = gr = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        gq, gr = _sqdist_grads(ctx, g, index, query, reference)
    return gq, gr, None, None, grad_bias.to(ctx.bias_dtype), None


def _local_setup(ctx, inputs, output):
    # inputs: query, previous, labels, num_labels, windows, bias, atrous_rate
    query, previous, _lab, _L, _windows, bias, _rate = inputs
    fg, _bg, index = output
    ctx.bias_dtype = bias.dtype
    ctx.save_for_backward(query, previous, fg, index)


def _local_backward(ctx, grad_fg, grad_bg, _grad_index):
    query, previous, fg = ctx.saved_tensors[0], ctx.saved_tensors[1], ctx.saved_tensors[2]
    M = fg.shape[1] * fg.shape[2]
    g, index, grad_bias = _fb_backward(ctx, grad_fg, grad_bg, M)
    gq = gp = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        gq, gp = _sqdist_grads(ctx, g, index, query, previous)
    return gq, gp, None, None, None, grad_bias.to(ctx.bias_dtype), None


def _sqdist_setup(ctx, inputs, output):
    query, reference = inputs[0], inputs[1]
    sqdist, index = output
    ctx.save_for_backward(query, reference, index)


def _sqdist_backward(ctx, grad_sqdist, _grad_index):
    query, reference, index = ctx.saved_tensors
    B, L = index.shape[0], index.shape[1]
    if grad_sqdist is None:
        return None, None, None, None, None
    g = torch.where(index >= 0, grad_sqdist, torch.zeros_like(grad_sqdist))
    gq, gr = _sqdist_grads(ctx, g.reshape(B, L, -1), index.reshape(B, L, -1), query, reference)
    return gq, gr, None, None, None


def _pooling_setup(ctx, inputs, output):
    embedding, labels, num_labels = inputs
    ctx.num_labels = num_labels
    ctx.emb_dtype = embedding.dtype
    ctx.save_for_backward(labels)


def _pooling_backward(ctx, grad_out):
    (labels,) = ctx.saved_tensors
    L = ctx.num_labels
    B, H, W = labels.shape
    C = grad_out.shape[-1]
    lab = labels.reshape(B, -1).long()
    valid = lab >= 0
    lc = lab.clamp(min=0)
    g = grad_out.to(_out_dtype(grad_out))
    counts = torch.zeros(B, L, dtype=g.dtype, device=g.device).scatter_add_(1, lc, valid.to(g.dtype))
    n_valid = valid.to(g.dtype).sum(dim=1, keepdim=True)
    fg_part = g[:, :, 0] / (counts + 1e-5).unsqueeze(-1)  # [B, L, C]
    bg_part = g[:, :, 1] / (n_valid - counts + 1e-5).unsqueeze(-1)
    per_label = (fg_part - bg_part).gather(1, lc.unsqueeze(-1).expand(-1, -1, C))
    grad = (per_label + bg_part.sum(dim=1, keepdim=True)) * valid.unsqueeze(-1)
    return grad.reshape(B, H, W, C).to(ctx.emb_dtype), None, None


def rows_sum(flat, contrib, num_rows, deterministic=None):
    """``zeros(num_rows, C).index_add_(0, flat, contrib)``, bitwise reproducible on CUDA.

    CPU: ``index_add_`` (sequential, deterministic). CUDA (or ``deterministic=True``): a stable
    sort of the rows by destination and an in-order sum per destination
    (``torch.segment_reduce``), where ``index_add_`` would add with float atomics in
    whatever order the threads arrive.
    """
    if deterministic is None:
        deterministic = contrib.is_cuda
    if not deterministic:
        return torch.zeros(num_rows, contrib.shape[1], dtype=contrib.dtype,
                           device=contrib.device).index_add_(0, flat, contrib)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_rows)
    return torch.segment_reduce(contrib.index_select(0, order), "sum", lengths=counts, axis=0, unsafe=True)


def topk_read_backward(grad_out, grad_weight, query_key, memory_key, memory_value, index, weight, scale):
    """Gradients of the top-k memory read through the k' selected entries (the selection
    itself is piecewise constant). All tensors are k-sparse gathers: memory O(Nq·k'·C),
    never Nm × Nq; the scatters to memory entries are deterministic (:func:`rows_sum`).

    readout[q] = Σ_j w_qj v[i_qj];  w = softmax_j(s_qj);  s_qj = (2 m_i·q − ‖m_i‖²)·scale.
    """
    B, Nq, K = index.shape
    Nm = memory_key.shape[1]
    flat = (index + torch.arange(B, device=index.device).view(B, 1, 1) * Nm).reshape(-1)
    mv = memory_value.reshape(B * Nm, -1)
    mk = memory_key.reshape(B * Nm, -1)
    gw = torch.zeros_like(weight) if grad_weight is None else grad_weight.to(weight.dtype)
    grad_v = None
    if grad_out is not None:
        g = grad_out.to(weight.dtype)
        v_sel = mv.index_select(0, flat).view(B, Nq, K, -1)
        gw = gw + torch.einsum("bqc,bqkc->bqk", g, v_sel)
        contrib = (weight.unsqueeze(-1) * g.unsqueeze(2)).reshape(B * Nq * K, -1)
        grad_v = rows_sum(flat, contrib, B * Nm).view_as(memory_value)
    gs = weight * (gw - (weight * gw).sum(-1, keepdim=True))          # softmax backward
    m_sel = mk.index_select(0, flat).view(B, Nq, K, -1)
    grad_q = torch.einsum("bqk,bqkc->bqc", gs, m_sel) * (2 * scale)
    contrib = (gs.unsqueeze(-1) * (2 * scale) * (query_key.unsqueeze(2) - m_sel)).reshape(B * Nq * K, -1)
    grad_m = rows_sum(flat, contrib, B * Nm).view_as(memory_key)
    return grad_q, grad_m, grad_v


class _TopkMemoryRead(torch.autograd.Function):
    """Autograd of ``topk_memory_read``, registered at the op's Autograd key: the op mutates
    ``usage``, and ``torch.library.register_autograd`` accepts functional ops only.
    ``impl`` is None for the dispatcher (C++ on CPU, Triton on CUDA), or a Python forward
    (the Triton kernel on CPU tensors under the interpreter)."""

    @staticmethod
    def forward(ctx, impl, query_key, memory_key, memory_value, k, scale, usage, usage_mode):
        if impl is None:
            with torch._C._AutoDispatchBelowADInplaceOrView():
                out, index, weight = torch.ops.vos_kernels.topk_memory_read(
                    query_key, memory_key, memory_value, k, scale, usage, usage_mode)
        else:
            out, index, weight = impl(query_key, memory_key, memory_value, k, scale, usage, usage_mode)
        ctx.save_for_backward(query_key, memory_key, memory_value, index, weight)
        ctx.scale = scale
        ctx.mark_non_differentiable(index)
        return out, index, weight

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out, _grad_index, grad_weight):
        q, m, v, index, weight = ctx.saved_tensors
        gq, gm, gv = topk_read_backward(grad_out, grad_weight, q, m, v, index, weight, ctx.scale)
        return (None,
                gq.to(q.dtype) if ctx.needs_input_grad[1] else None,
                gm.to(m.dtype) if ctx.needs_input_grad[2] else None,
                gv.to(v.dtype) if ctx.needs_input_grad[3] and gv is not None else None,
                None, None, None, None)


def _topk_autograd(query_key, memory_key, memory_value, k, scale, usage, usage_mode):
    return _TopkMemoryRead.apply(None, query_key, memory_key, memory_value, k, scale, usage, usage_mode)


def topk_read_interpreted(query_key, memory_key, memory_value, k, scale, usage, usage_mode):
    """The Triton top-k read called from Python, with the op's autograd: on CPU tensors
    (``TRITON_INTERPRET=1``), or on CUDA tensors when the op's CUDA key holds the CUDA C++ kernel."""
    return _TopkMemoryRead.apply(_triton_entry("topk_memory_read"), query_key, memory_key, memory_value,
                                 k, scale, usage, usage_mode)


# ----------------------------------------------------------------------------------------
# GMM prototypes and A-GAME Gaussians: backward formulas of docs/internals.md. The two
# A-GAME backward passes are ops (C++ / Triton); the prototype ops' backward are GEMMs.
# ----------------------------------------------------------------------------------------


def _backward_op(ctx, name):
    """The backward op: the registered kernel, or the Triton kernel when the forward ran
    as a Triton kernel called from Python (the interpreter on CPU tensors, or backend
    "triton" on CUDA tensors whose op holds a CUDA C++ kernel)."""
    return _triton_entry(name) if getattr(ctx, "triton_backward", False) else getattr(torch.ops.vos_kernels, name)


def _proto_values_setup(ctx, inputs, output):
    values, resp = inputs
    ctx.dtypes = (values.dtype, resp.dtype)
    ctx.save_for_backward(values, resp, output)


def _proto_values_backward(ctx, grad):
    values, resp, out = ctx.saved_tensors
    dt = out.dtype
    v, r, g = values.to(dt), resp.to(dt), grad.to(dt)
    den = 1e-6 + r.sum(dim=1)                                    # [B, K]
    gd = g / den.unsqueeze(-1)                                   # [B, K, CV]
    grad_v = grad_r = None
    if ctx.needs_input_grad[0]:
        grad_v = torch.bmm(r, gd).to(ctx.dtypes[0])
    if ctx.needs_input_grad[1]:
        grad_r = (torch.bmm(v, gd.transpose(1, 2)) - (out * gd).sum(-1).unsqueeze(1)).to(ctx.dtypes[1])
    return grad_v, grad_r


def _proto_attention_setup(ctx, inputs, output):
    query, keys, values, kappa, kernel = inputs
    ctx.kappa, ctx.kernel = kappa, kernel
    ctx.dtypes = (query.dtype, keys.dtype, values.dtype)
    ctx.save_for_backward(query, keys, values, output[1])


def _proto_attention_backward(ctx, grad_out, _grad_attn):
    query, keys, values, attn = ctx.saved_tensors
    dt = attn.dtype
    q, mu, v, g = query.to(dt), keys.to(dt), values.to(dt), grad_out.to(dt)
    kappa = ctx.kappa
    g_attn = torch.bmm(g, v.transpose(1, 2))                     # [B, Nq, K]
    if _grad_attn is not None:
        g_attn = g_attn + _grad_attn.to(dt)
    gl = attn * (g_attn - (attn * g_attn).sum(-1, keepdim=True))   # softmax backward
    grad_q = grad_k = grad_v = None
    if ctx.needs_input_grad[0]:
        grad_q = kappa * torch.bmm(gl, mu)
        if ctx.kernel == 1:
            grad_q = grad_q - kappa * gl.sum(-1, keepdim=True) * q
        grad_q = grad_q.to(ctx.dtypes[0])
    if ctx.needs_input_grad[1]:
        grad_k = kappa * torch.bmm(gl.transpose(1, 2), q)
        if ctx.kernel == 1:
            grad_k = grad_k - kappa * gl.sum(1).unsqueeze(-1) * mu
        grad_k = grad_k.to(ctx.dtypes[1])
    if ctx.needs_input_grad[2]:
        grad_v = torch.bmm(attn.transpose(1, 2), g).to(ctx.dtypes[2])
    return grad_q, grad_k, grad_v, None, None


def _log_prob_setup(ctx, inputs, output):
    x, mean, var = inputs
    ctx.save_for_backward(x, mean, var)


def _log_prob_backward(ctx, grad):
    x, mean, var = ctx.saved_tensors
    gx, gm, gv = _backward_op(ctx, "diag_gmm_log_prob_backward")(grad.contiguous(), x, mean, var)
    return gx.to(x.dtype), gm.to(mean.dtype), gv.to(var.dtype)


def _fit_setup(ctx, inputs, output):
    x, weights, var_reg = inputs
    ctx.var_reg_dtype = var_reg.dtype
    ctx.save_for_backward(x, weights, output[0])


def _fit_backward(ctx, grad_mean, grad_var):
    x, weights, mean = ctx.saved_tensors
    grad_mean = torch.zeros_like(mean) if grad_mean is None else grad_mean.to(mean.dtype).contiguous()
    grad_var = torch.zeros_like(mean) if grad_var is None else grad_var.to(mean.dtype).contiguous()
    gx, gw = _backward_op(ctx, "diag_gmm_fit_backward")(grad_mean, grad_var, x, weights, mean)
    return gx.to(x.dtype), gw.to(weights.dtype), grad_var.sum(0).to(ctx.var_reg_dtype)


def _em_setup(ctx, inputs, output):
    pass


def _em_backward(ctx, grad_means, grad_resp):
    raise RuntimeError(
        "vos_kernels::gmm_em has no gradient: EM runs under no_grad in PCAN and EMANet "
        "(vos_kernels.gmm_em returns detached outputs); detach its inputs, or differentiate "
        "through prototype_values / prototype_attention of its outputs")


_GMM_AUTOGRAD = {
    "gmm_em": (_em_setup, _em_backward),
    "prototype_values": (_proto_values_setup, _proto_values_backward),
    "prototype_attention": (_proto_attention_setup, _proto_attention_backward),
    "diag_gmm_log_prob": (_log_prob_setup, _log_prob_backward),
    "diag_gmm_fit": (_fit_setup, _fit_backward),
}


def gmm_interpreted(name, *args):
    """A GMM op's Triton kernel called from Python, with the op's autograd (CPU tensors under
    ``TRITON_INTERPRET=1``, or CUDA tensors when the op's CUDA key holds the CUDA C++ kernel)."""
    entry = _triton_entry(name)
    if name == "gmm_em":
        return entry(*args)
    setup, backward = _GMM_AUTOGRAD[name]

    def setup_interpreted(ctx, inputs, output):
        ctx.triton_backward = True
        setup(ctx, inputs, output)

    fn = _InterpretedTriton._cache.get("gmm:" + name)
    if fn is None:
        fn = type(f"TritonInterpreted_{name}", (torch.autograd.Function,),
                  {"forward": staticmethod(lambda *a: entry(*a)),
                   "setup_context": staticmethod(setup_interpreted),
                   "backward": staticmethod(backward)})
        _InterpretedTriton._cache["gmm:" + name] = fn
    return fn.apply(*args)


# ----------------------------------------------------------------------------------------
# Registration
# ----------------------------------------------------------------------------------------


def _register() -> None:
    lib = "vos_kernels::"

    @torch.library.register_fake(lib + "labelled_nearest_sqdist")
    def _(query, reference, reference_labels, num_labels, atrous_rate=1):
        B, H, W, _C = query.shape
        return (query.new_empty((B, num_labels, H, W), dtype=_out_dtype(query)),
                query.new_empty((B, num_labels, H, W), dtype=torch.int64))

    @torch.library.register_fake(lib + "fb_global_matching")
    def _(query, reference, reference_labels, num_labels, bias, atrous_rate=1):
        B, H, W, _C = query.shape
        shape = (B, num_labels, H, W)
        dt = _out_dtype(query)
        return query.new_empty(shape, dtype=dt), query.new_empty(shape, dtype=dt), query.new_empty(shape, dtype=torch.int64)

    @torch.library.register_fake(lib + "fb_multi_local_matching")
    def _(query, previous, previous_labels, num_labels, windows, bias, atrous_rate=1):
        B, H, W, _C = query.shape
        shape = (B, num_labels, len(windows), H, W)
        dt = _out_dtype(query)
        return query.new_empty(shape, dtype=dt), query.new_empty(shape, dtype=dt), query.new_empty(shape, dtype=torch.int64)

    @torch.library.register_fake(lib + "fb_instance_pooling")
    def _(embedding, labels, num_labels):
        B, _H, _W, C = embedding.shape
        return embedding.new_empty((B, num_labels, 2, C), dtype=_out_dtype(embedding))

    @torch.library.register_fake(lib + "nearest_sqdist_backward")
    def _(grad, query, reference, index):
        dt = _out_dtype(query)
        return query.new_empty(query.shape, dtype=dt), reference.new_empty(reference.shape, dtype=dt)

    @torch.library.register_fake(lib + "topk_memory_read")
    def _(query_key, memory_key, memory_value, k, scale, usage, usage_mode):
        B, Nq, _CK = query_key.shape
        K = min(k, memory_key.shape[1])
        dt = _out_dtype(query_key)
        return (query_key.new_empty((B, Nq, memory_value.shape[2]), dtype=dt),
                query_key.new_empty((B, Nq, K), dtype=torch.int64), query_key.new_empty((B, Nq, K), dtype=dt))

    @torch.library.register_fake(lib + "gmm_em")
    def _(x, means, num_iters, kappa, mask, kernel, normalize_means):
        B, N, C = x.shape
        dt = _out_dtype(x)
        return x.new_empty((B, means.shape[1], C), dtype=dt), x.new_empty((B, N, means.shape[1]), dtype=dt)

    @torch.library.register_fake(lib + "prototype_values")
    def _(values, resp):
        return values.new_empty((values.shape[0], resp.shape[2], values.shape[2]), dtype=_out_dtype(values))

    @torch.library.register_fake(lib + "prototype_attention")
    def _(query, proto_keys, proto_values, kappa, kernel):
        B, Nq, _C = query.shape
        dt = _out_dtype(query)
        return (query.new_empty((B, Nq, proto_values.shape[2]), dtype=dt),
                query.new_empty((B, Nq, proto_keys.shape[1]), dtype=dt))

    @torch.library.register_fake(lib + "diag_gmm_log_prob")
    def _(x, mean, var):
        return x.new_empty((x.shape[0], x.shape[1], mean.shape[1]), dtype=_out_dtype(x))

    @torch.library.register_fake(lib + "diag_gmm_log_prob_backward")
    def _(grad, x, mean, var):
        dt = _out_dtype(x)
        return x.new_empty(x.shape, dtype=dt), x.new_empty(mean.shape, dtype=dt), x.new_empty(var.shape, dtype=dt)

    @torch.library.register_fake(lib + "diag_gmm_fit")
    def _(x, weights, var_reg):
        shape = (x.shape[0], weights.shape[2], x.shape[2])
        dt = _out_dtype(x)
        return x.new_empty(shape, dtype=dt), x.new_empty(shape, dtype=dt)

    @torch.library.register_fake(lib + "diag_gmm_fit_backward")
    def _(grad_mean, grad_var, x, weights, mean):
        dt = _out_dtype(x)
        return x.new_empty(x.shape, dtype=dt), x.new_empty(weights.shape, dtype=dt)

    for name, (setup, backward) in _GMM_AUTOGRAD.items():
        torch.library.register_autograd(lib + name, backward, setup_context=setup)

    _IMPL_LIB.impl("topk_memory_read", _topk_autograd, "Autograd")

    torch.library.register_autograd(lib + "labelled_nearest_sqdist", _sqdist_backward, setup_context=_sqdist_setup)
    torch.library.register_autograd(lib + "fb_global_matching", _global_backward, setup_context=_global_setup)
    torch.library.register_autograd(lib + "fb_multi_local_matching", _local_backward, setup_context=_local_setup)
    torch.library.register_autograd(lib + "fb_instance_pooling", _pooling_backward, setup_context=_pooling_setup)

    # CUDA tensors: Triton kernels (imported lazily so that importing vos_kernels never
    # needs triton, and TRITON_INTERPRET is read when the kernels are first used).
    for name in CUDA_OPS:
        if name not in CUDA_CPP_OPS:
            torch.library.register_kernel(lib + name, "cuda", _triton_entry(name))


def _triton_entry(name):
    def run(*args):
        from . import triton as triton_backend

        return getattr(triton_backend, name)(*args)

    run.__name__ = f"triton_{name}"
    return run


class _InterpretedTriton:
    """Autograd wrappers that call the Triton kernels from Python, with the same backward
    formulas as the registered ops (whose backward kernels are the Triton ones too): on CPU
    tensors under TRITON_INTERPRET=1, and for backend "triton" on CUDA tensors when the
    op's CUDA key holds the CUDA C++ kernel."""

    _cache: dict = {}

    @classmethod
    def function(cls, name):
        if name not in cls._cache:
            setups = {"labelled_nearest_sqdist": (_sqdist_setup, _sqdist_backward),
                      "fb_global_matching": (_global_setup, _global_backward),
                      "fb_multi_local_matching": (_local_setup, _local_backward),
                      "fb_instance_pooling": (_pooling_setup, _pooling_backward)}
            setup, backward = setups[name]
            entry = _triton_entry(name)

            def setup_triton(ctx, inputs, output, setup=setup):
                # On CPU tensors the backward keeps the C++ nearest_sqdist_backward.
                ctx.triton_backward = inputs[0].is_cuda
                setup(ctx, inputs, output)

            cls._cache[name] = type(
                f"TritonInterpreted_{name}", (torch.autograd.Function,),
                {"forward": staticmethod(lambda *args: entry(*args)),
                 "setup_context": staticmethod(setup_triton),
                 "backward": staticmethod(backward)})
        return cls._cache[name]


_IMPL_LIB = torch.library.Library("vos_kernels", "IMPL")  # kept alive: owns the Autograd registration

if LOADED:
    _register()
