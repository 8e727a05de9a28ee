"""A fixed-capacity memory bank with least-frequently-used eviction (AMM thesis), read
through the fused top-k memory read.

Keys are object-agnostic ``[B, N, CK]``; values ``[B, N, CV]`` fold the objects into CV.
Every entry keeps a usage counter (updated inside :func:`vos_kernels.topk_memory_read`)
and its birth frame; when an added frame does not fit, the entries with the lowest
``usage / age`` (age = current frame − birth frame, at least 1) are evicted first. The
buffers are allocated once at ``capacity``: memory is constant for any video length.

Modes (``usage_mode``):
- ``"hits"`` (the AMM paper: LFU = index / age, index = number of top-k appearances):
  usage += number of queries whose top-k holds the entry; eviction removes exactly the
  entries needed, lowest ``usage / age`` first, ties → oldest (then lowest slot).
- ``"weights"`` (XMem's usage): usage += sum of the entry's softmax weights; same eviction.
- ``"log_hits"`` (the released AMM code, ``alipga/AMM_VOS`` ``FeatureBank.py``): usage +=
  log(hits) for entries hit in a read (a single hit adds 0), clamped to [0, 1e5];
  eviction raises an integer threshold on ``usage / age`` until at least the needed number
  of entries lies below it and removes all of them (it can remove more than needed).
  Differences kept on purpose: the released code's EMA merge of similar keys is not
  reproduced (it averages the wrong tensor); the first frame is unprotected there too.

Source: "Adaptive Memory Management in Video Object Segmentation" (AMM thesis) and its
code; STCN ``inference_memory_bank.py`` for the read; ``../shared/spec/memory.md``.
"""
from __future__ import annotations

import math

import torch

from . import _validation as V
from .memory import topk_memory_read

USAGE_MODES = ("hits", "weights", "log_hits")
LOG_HITS_CLAMP = 1e5


class LFUMemoryBank:
    """Fixed-capacity key/value memory with LFU eviction.

    Args:
        capacity: entries per batch element (e.g. 2 frames' worth: ``2 · H · W``).
        key_dim: CK. value_dim: CV (objects folded in).
        usage_mode: ``"hits"``, ``"weights"`` or ``"log_hits"`` (module docstring).
        protect_first: never evict the entries added with the first frame.
        batch_size: B. device, dtype: of the buffers (dtype float32, or float64 for checks).

    Raises:
        ValueError: capacity < 1, dims < 1, unknown usage_mode, batch_size < 1.
    """

    def __init__(self, capacity: int, key_dim: int, value_dim: int, usage_mode: str = "hits",
                 protect_first: bool = False, *, batch_size: int = 1, device=None, dtype=torch.float32):
        self.capacity = V.int_arg(capacity, "capacity", 1)
        self.key_dim = V.int_arg(key_dim, "key_dim", 1)
        self.value_dim = V.int_arg(value_dim, "value_dim", 1)
        self.batch_size = V.int_arg(batch_size, "batch_size", 1)
        if usage_mode not in USAGE_MODES:
            V.fail("usage_mode", f"one of {USAGE_MODES}", repr(usage_mode))
        self.usage_mode = usage_mode
        self.protect_first = bool(protect_first)
        B, N = self.batch_size, self.capacity
        self.keys = torch.zeros(B, N, self.key_dim, device=device, dtype=dtype)
        self.values = torch.zeros(B, N, self.value_dim, device=device, dtype=dtype)
        self.usage = torch.zeros(B, N, device=device, dtype=torch.float32)
        self.birth = torch.zeros(B, N, device=device, dtype=torch.int64)
        self.size = 0
        self.frame = None            # latest frame index seen by add()
        self.first_frame = None
        self.evicted_total = 0

    # ----------------------------------------------------------------- views
    def memory(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The filled part: ``(keys [B, size, CK], values [B, size, CV])`` (views)."""
        return self.keys[:, : self.size], self.values[:, : self.size]

    def lfu_score(self, frame: int | None = None) -> torch.Tensor:
        """``usage / age`` of the filled entries, ``[B, size]`` (age ≥ 1 frame)."""
        frame = self.frame if frame is None else frame
        age = (frame - self.birth[:, : self.size]).clamp(min=1).to(torch.float64)
        return self.usage[:, : self.size].double() / age

    # ---------------------------------------------------------------- update
    def add(self, keys: torch.Tensor, values: torch.Tensor, frame: int) -> int:
        """Add one frame's entries, evicting first if they do not fit.

        Args:
            keys: ``[B, N, CK]``; values: ``[B, N, CV]`` (same dtype/device as the bank).
            frame: the frame index (non-decreasing over calls).

        Returns:
            The number of entries evicted (per batch element).

        Raises:
            ValueError: shapes, dtype or device differ from the bank's; N > capacity
                (capacity smaller than one frame); a frame index that goes back; with
                ``protect_first``, no room left beside the first frame. Nothing changes
                when it raises.
        """
        V.tensor(keys, "keys")
        V.tensor(values, "values")
        B = self.batch_size
        if keys.dim() != 3 or keys.shape[0] != B or keys.shape[2] != self.key_dim:
            V.fail("keys", f"shape [B={B}, N, CK={self.key_dim}]", f"shape {list(keys.shape)}")
        n_new = keys.shape[1]
        if values.dim() != 3 or values.shape[0] != B or values.shape[1] != n_new or values.shape[2] != self.value_dim:
            V.fail("values", f"shape [B={B}, N={n_new}, CV={self.value_dim}]", f"shape {list(values.shape)}")
        for t, name in ((keys, "keys"), (values, "values")):
            if t.dtype != self.keys.dtype or t.device != self.keys.device:
                V.fail(name, f"{self.keys.dtype} on {self.keys.device} like the bank", f"{t.dtype} on {t.device}")
        if n_new < 1:
            V.fail("keys", "at least one entry", "N = 0")
        if n_new > self.capacity:
            V.fail("capacity", f">= one frame's entries ({n_new})", self.capacity)
        frame = V.int_arg(frame, "frame", -(2**62))
        if self.frame is not None and frame < self.frame:
            V.fail("frame", f"an index >= the last one ({self.frame})", frame)
        protected = 0
        if self.protect_first and self.first_frame is not None:
            protected = int((self.birth[0, : self.size] == self.first_frame).sum())
            if protected + n_new > self.capacity:
                V.fail("capacity", f">= the protected first frame ({protected}) + one frame ({n_new})",
                       self.capacity)
        self.frame = frame
        evicted = 0
        need = self.size + n_new - self.capacity
        if need > 0:
            evicted = self._evict(need, frame)
        s = self.size
        self.keys[:, s: s + n_new] = keys
        self.values[:, s: s + n_new] = values
        self.usage[:, s: s + n_new] = 0
        self.birth[:, s: s + n_new] = frame
        self.size = s + n_new
        if self.first_frame is None:
            self.first_frame = frame
        self.evicted_total += evicted
        return evicted

    def _evict(self, need: int, frame: int) -> int:
        n = self.size
        score = self.lfu_score(frame)                                        # [B, n]
        if self.protect_first and self.first_frame is not None:
            score = score.masked_fill(self.birth[:, :n] == self.first_frame, math.inf)
        if self.usage_mode == "log_hits":
            # released AMM code: the smallest integer threshold t >= 1 with at least `need`
            # entries below it (its loop raises t by one until that holds); all of them go.
            kth = torch.kthvalue(score, need, dim=1).values                 # [B]
            threshold = torch.clamp(torch.floor(kth) + 1, min=1.0)
            remove = score < threshold.unsqueeze(1)
            counts = remove.sum(1)
            if not bool((counts == counts[0]).all()):
                # batch elements must stay the same size: each removes the largest count, in LFU order
                order = self._order(score)
                remove = torch.zeros_like(remove)
                remove.scatter_(1, order[:, : int(counts.max())], True)
            count = int(remove[0].sum())
        else:
            order = self._order(score)
            remove = torch.zeros(score.shape, dtype=torch.bool, device=score.device)
            remove.scatter_(1, order[:, :need], True)
            count = need
        keep = ~remove                                                        # same count per row
        kept = int(keep[0].sum())
        idx = torch.nonzero(keep, as_tuple=False)[:, 1].view(self.batch_size, kept)   # ascending slots
        for buf in (self.keys, self.values):
            buf[:, :kept] = torch.gather(buf[:, :n], 1, idx.unsqueeze(-1).expand(-1, -1, buf.shape[2]))
        self.usage[:, :kept] = torch.gather(self.usage[:, :n], 1, idx)
        self.birth[:, :kept] = torch.gather(self.birth[:, :n], 1, idx)
        self.size = kept
        return count

    def _order(self, score: torch.Tensor) -> torch.Tensor:
        """Eviction order per row: lowest score, then oldest birth, then lowest slot."""
        n = score.shape[1]
        by_birth = torch.sort(self.birth[:, :n], dim=1, stable=True).indices
        by_score = torch.sort(torch.gather(score, 1, by_birth), dim=1, stable=True).indices
        return torch.gather(by_birth, 1, by_score)

    # ------------------------------------------------------------------ read
    def read(self, query_key: torch.Tensor, k: int = 20, scale: float | None = None,
             return_topk: bool = False):
        """Top-k read of the bank with a query, updating the usage counters.

        Args:
            query_key: ``[B, Nq, CK]``. k, scale: as :func:`vos_kernels.topk_memory_read`.

        Returns:
            ``readout [B, Nq, CV]`` (and ``(index, weight)`` into the bank's slots with
            ``return_topk``).

        Raises:
            ValueError: an empty bank, or bad arguments (as ``topk_memory_read``).
        """
        if self.size == 0:
            raise ValueError("memory bank: empty (add a frame before reading)")
        keys, values = self.memory()
        usage = self.usage[:, : self.size]
        if self.usage_mode == "log_hits":
            hits = torch.zeros_like(usage)
            out = topk_memory_read(query_key, keys, values, k, scale, usage=hits, usage_mode="hits",
                                   return_topk=return_topk)
            hit = hits > 0
            usage.add_(torch.where(hit, hits.clamp(min=1).log(), torch.zeros_like(hits))).clamp_(0, LOG_HITS_CLAMP)
            return out
        return topk_memory_read(query_key, keys, values, k, scale, usage=usage, usage_mode=self.usage_mode,
                                return_topk=return_topk)

    def __repr__(self) -> str:
        return (f"LFUMemoryBank(capacity={self.capacity}, size={self.size}, key_dim={self.key_dim}, "
                f"value_dim={self.value_dim}, usage_mode={self.usage_mode!r}, protect_first={self.protect_first})")
