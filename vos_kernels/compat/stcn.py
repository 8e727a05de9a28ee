"""Drop-ins for STCN's and XMem's memory reads, backed by :func:`vos_kernels.topk_memory_read`.

- :class:`MemoryBank`: STCN's inference memory bank (``inference_memory_bank.py``) with
  the same constructor and methods (``add_memory``, ``match_memory``) and the same tensor
  layouts — keys ``[1, CK, H, W]``, values ``[O, CV, H, W]`` (one per object), readout
  ``[O, CV, h, w]`` — but without the ``[N, HW]`` affinity: the read is the fused top-k
  op on the N-major copy of the memory it keeps.
- :func:`xmem_topk_readout`: XMem's ``get_similarity`` (no shrinkage / selection term)
  + ``do_softmax(..., top_k, return_usage=True)`` + ``readout`` in XMem's layouts, returning
  the readout and the usage ``Σ_q w[n, q]``.

Difference from both: the softmax subtracts the maximum of the k selected values (equal up
to rounding; STCN's ``softmax_w_top`` can overflow in fp16 without it), and ties pick the
lowest memory index.
"""
from __future__ import annotations

import torch

from ..memory import topk_memory_read


class MemoryBank:
    """STCN's inference ``MemoryBank(k, top_k=20)``: ``k`` objects, ``top_k`` entries per query.

    ``add_memory(key [1, CK, H, W], value [O, CV, H, W], is_temp=False)``: append a frame
    (``is_temp``: the one-frame temporary slot that the next ``add_memory`` flushes, as in
    STCN). ``match_memory(qk [1, CK, h, w]) -> [O, CV, h, w]``.
    """

    def __init__(self, k: int, top_k: int = 20):
        self.num_objects = int(k)
        self.top_k = int(top_k)
        self.CK = None
        self.CV = None
        self.mem_k = None        # [1, N, CK]
        self.mem_v = None        # [1, N, O·CV]
        self.temp_k = None
        self.temp_v = None

    @staticmethod
    def _keys(key: torch.Tensor) -> torch.Tensor:
        return key.flatten(start_dim=2).transpose(1, 2).contiguous()           # [1, HW, CK]

    def _values(self, value: torch.Tensor) -> torch.Tensor:
        O, CV = value.shape[:2]
        if O != self.num_objects:
            raise ValueError(f"value: expected {self.num_objects} objects (MemoryBank(k={self.num_objects})), "
                             f"got {O}")
        return value.flatten(start_dim=2).permute(2, 0, 1).reshape(1, -1, O * CV).contiguous()

    def add_memory(self, key: torch.Tensor, value: torch.Tensor, is_temp: bool = False) -> None:
        if key.dim() != 4 or key.shape[0] != 1:
            raise ValueError(f"key: expected [1, CK, H, W], got {list(key.shape)}")
        if value.dim() != 4 or value.shape[2:] != key.shape[2:]:
            raise ValueError(f"value: expected [O, CV, H, W] with H, W of the key {list(key.shape[2:])}, "
                             f"got {list(value.shape)}")
        self.temp_k = None
        self.temp_v = None
        k, v = self._keys(key), self._values(value)
        if self.mem_k is None:
            self.mem_k, self.mem_v = k, v
            self.CK, self.CV = key.shape[1], value.shape[1]
        elif is_temp:
            self.temp_k, self.temp_v = k, v
        else:
            self.mem_k = torch.cat([self.mem_k, k], 1)
            self.mem_v = torch.cat([self.mem_v, v], 1)

    def match_memory(self, qk: torch.Tensor) -> torch.Tensor:
        if self.mem_k is None:
            raise ValueError("memory bank: empty (add_memory first)")
        _, _, h, w = qk.shape
        mk, mv = self.mem_k, self.mem_v
        if self.temp_k is not None:
            mk = torch.cat([mk, self.temp_k], 1)
            mv = torch.cat([mv, self.temp_v], 1)
        out = topk_memory_read(self._keys(qk), mk, mv, self.top_k)                # [1, hw, O·CV]
        return out[0].view(h * w, self.num_objects, self.CV).permute(1, 2, 0).reshape(
            self.num_objects, self.CV, h, w)


def xmem_topk_readout(memory_key: torch.Tensor, query_key: torch.Tensor, memory_value: torch.Tensor,
                      top_k: int, return_usage: bool = True):
    """XMem's ``readout(do_softmax(get_similarity(mk, None, qk, None), top_k, return_usage=True), mv)``.

    Args:
        memory_key: ``[B, CK, N]``; query_key: ``[B, CK, HW]``; memory_value: ``[B, CV, N]``
            (XMem's layouts).
        top_k: entries per query (XMem: 30).

    Returns:
        ``readout [B, CV, HW]`` and, with ``return_usage``, ``usage [B, N]`` float32 =
        the sum over queries of each entry's softmax weight (XMem's ``affinity.sum(dim=2)``).
    """
    B, _CK, N = memory_key.shape
    usage = torch.zeros(B, N, device=memory_key.device, dtype=torch.float32) if return_usage else None
    out = topk_memory_read(query_key.transpose(1, 2), memory_key.transpose(1, 2), memory_value.transpose(1, 2),
                           top_k, usage=usage, usage_mode="weights")
    out = out.transpose(1, 2)
    return (out, usage) if return_usage else out
