"""STCN-style memory reading on the LFU memory bank, and a training-free propagation on it.

- :class:`MemoryReader` (``torch.nn.Module``): STCN's inference memory
  (``hkchengrex/STCN`` ``inference_core.py`` / ``inference_memory_bank.py``) for a trained
  STCN-like model: write a frame's key ``[B, CK, H, W]`` and value ``[B, CV, H, W]``
  (objects folded into CV) every ``mem_every`` frames, read a query key with the fused top-k
  read. ``capacity_frames=None`` keeps STCN's unbounded memory (``torch.cat`` growth);
  a number bounds it with :class:`vos_kernels.LFUMemoryBank` (AMM thesis: LFU = usage / age,
  usage updated by every read). ``matching="reference"`` reads with STCN's dense path
  (``vos_kernels.reference.topk_memory_read``: the full ``[Nm, Nq]`` affinity, top-k,
  scatter back, dense ``bmm``) — the baseline.
- :class:`TrainingFreeSTCN`: ``vos-kernels segment --method stcn-lfu``. Keys are frozen
  backbone features (L2-normalised, stride 16 upsampled to stride 8 and concatenated with
  stride 8, so each key is unit-norm), values are the soft one-hot mask (area fraction of
  each label in the key cell), the readout is a per-label probability map, upsampled and
  argmaxed. No learned part: with unit keys STCN's affinity ``(2 m·q − ‖m‖²)·scale`` is
  ``(2 cos − 1)·scale``, so ``scale`` is an inverse softmax temperature over cosines.

Frame 0 (the annotated frame) is always written; later frames every ``mem_every`` frames
(STCN: 5), with the predicted mask as value. The bounded variant protects frame 0 by default
(``protect_first``): it is the only ground truth a training-free model has.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

import vos_kernels
from vos_kernels import reference as _reference
from vos_kernels.memory_bank import USAGE_MODES, LFUMemoryBank

from .propagation import check_first_mask


class MemoryReader(torch.nn.Module):
    """STCN's inference memory with a fused top-k read, bounded by LFU eviction or not.

    Args:
        key_dim: CK. value_dim: CV (objects × channels per object, folded).
        top_k: k of the read (STCN 20).
        mem_every: write every this many frames after frame 0 (STCN 5); :meth:`should_write`.
        capacity_frames: ``None`` = unbounded (STCN); else the bank holds this many frames'
            worth of entries (``capacity_frames · H · W``, set at the first write).
        usage_mode: ``"hits"`` (AMM paper), ``"weights"`` (XMem), ``"log_hits"`` (released AMM).
        protect_first: never evict frame 0's entries (bounded only).
        scale: affinity scale (default ``1/sqrt(CK)``, STCN).
        matching: ``"fused"`` (``vos_kernels.topk_memory_read``) or ``"reference"`` (STCN's
            dense path; unbounded only, the LFU bank's usage comes from the fused op).

    Raises:
        ValueError: bad sizes, ``capacity_frames`` < 1 (or < 2 with ``protect_first``),
            unknown ``usage_mode`` or ``matching``, a bounded reference reader.
    """

    def __init__(self, key_dim: int, value_dim: int, top_k: int = 20, mem_every: int = 5,
                 capacity_frames: float | None = None, usage_mode: str = "hits", protect_first: bool = True,
                 scale: float | None = None, matching: str = "fused"):
        super().__init__()
        for name, v in (("key_dim", key_dim), ("value_dim", value_dim), ("top_k", top_k), ("mem_every", mem_every)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
        if matching not in ("fused", "reference"):
            raise ValueError(f"matching: expected 'fused' or 'reference', got {matching!r}")
        if usage_mode not in USAGE_MODES:
            raise ValueError(f"usage_mode: expected one of {USAGE_MODES}, got {usage_mode!r}")
        if capacity_frames is not None:
            low = 2 if protect_first else 1
            if isinstance(capacity_frames, bool) or not isinstance(capacity_frames, (int, float)) \
                    or not capacity_frames >= low:
                raise ValueError(f"capacity_frames: expected None or a number >= {low} "
                                 f"({'frame 0 is protected, ' if protect_first else ''}one frame must fit), "
                                 f"got {capacity_frames!r}")
            if matching == "reference":
                raise ValueError("matching: 'reference' is STCN's unbounded memory; use capacity_frames=None")
        self.key_dim, self.value_dim, self.top_k, self.mem_every = key_dim, value_dim, top_k, mem_every
        self.capacity_frames = capacity_frames
        self.usage_mode, self.protect_first = usage_mode, protect_first
        self.scale = scale
        self.matching = matching
        self.reset()

    def reset(self) -> None:
        """Forget the video."""
        self.bank: LFUMemoryBank | None = None
        self._keys: torch.Tensor | None = None      # unbounded: [B, N, CK]
        self._values: torch.Tensor | None = None    # unbounded: [B, N, CV]
        self.frames_written: list[int] = []

    @property
    def size(self) -> int:
        """Entries in memory (per batch element)."""
        if self.bank is not None:
            return self.bank.size
        return 0 if self._keys is None else int(self._keys.shape[1])

    def should_write(self, frame: int) -> bool:
        """STCN's schedule: frame 0, then every ``mem_every`` frames."""
        return frame == 0 or frame % self.mem_every == 0

    @staticmethod
    def _flat(x: torch.Tensor, name: str, channels: int) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != channels:
            raise ValueError(f"{name}: expected [B, {channels}, H, W], got {tuple(x.shape)}")
        return x.flatten(2).transpose(1, 2).contiguous()          # [B, H·W, C]

    def write(self, key: torch.Tensor, value: torch.Tensor, frame: int) -> int:
        """Add a frame: ``key [B, CK, H, W]``, ``value [B, CV, H, W]``. Returns evicted entries."""
        k = self._flat(key, "key", self.key_dim)
        v = self._flat(value, "value", self.value_dim)
        if k.shape[:2] != v.shape[:2]:
            raise ValueError(f"value: expected the key's [B, H, W], got {tuple(value.shape)} for key {tuple(key.shape)}")
        self.frames_written.append(int(frame))
        if self.capacity_frames is None:
            self._keys = k if self._keys is None else torch.cat([self._keys, k], 1)
            self._values = v if self._values is None else torch.cat([self._values, v], 1)
            return 0
        if self.bank is None:
            self.bank = LFUMemoryBank(int(round(self.capacity_frames * k.shape[1])), self.key_dim, self.value_dim,
                                      self.usage_mode, self.protect_first, batch_size=k.shape[0],
                                      device=k.device, dtype=k.dtype)
        return self.bank.add(k, v, frame)

    def forward(self, query_key: torch.Tensor) -> torch.Tensor:
        """Read memory with ``query_key [B, CK, H, W]`` → readout ``[B, CV, H, W]`` (updates usage)."""
        if self.size == 0:
            raise RuntimeError("MemoryReader: write a frame before reading")
        B, _, H, W = query_key.shape
        q = self._flat(query_key, "query_key", self.key_dim)
        if self.bank is not None:
            out = self.bank.read(q, self.top_k, self.scale)
        elif self.matching == "fused":
            out = vos_kernels.topk_memory_read(q, self._keys, self._values, self.top_k, self.scale)
        else:
            scale = self.scale if self.scale is not None else self.key_dim ** -0.5
            out = _reference.topk_memory_read(q, self._keys, self._values, self.top_k, scale)
        return out.transpose(1, 2).reshape(B, self.value_dim, H, W)


def soft_one_hot(labels: torch.Tensor, num_labels: int, size: tuple[int, int]) -> torch.Tensor:
    """``[H, W]`` int labels → ``[1, L, h, w]`` float32 area fraction of each label per cell."""
    one_hot = F.one_hot(labels.long(), num_labels).permute(2, 0, 1).unsqueeze(0).float()
    return F.adaptive_avg_pool2d(one_hot, size)


class TrainingFreeSTCN:
    """Training-free STCN-style propagation: backbone keys, mask values, top-k memory read.

    Args:
        capacity_frames: LFU bank size in frames' worth of entries; ``None`` = STCN's
            unbounded every-``mem_every`` memory.
        mem_every: write period (STCN: 5). top_k: k (STCN: 20).
        temperature: softmax temperature over cosine similarities; ``scale = 1 / (2·temperature)``
            so the weights are ``∝ exp(cos / temperature)``.
        usage_mode, protect_first: of the bank (:class:`MemoryReader`).
        matching: ``"fused"`` or ``"reference"`` (STCN's dense read, unbounded only).
    """

    key_strides = (8, 16)

    def __init__(self, capacity_frames: float | None = 2, mem_every: int = 5, top_k: int = 20,
                 temperature: float = 0.05, usage_mode: str = "hits", protect_first: bool = True,
                 matching: str = "fused"):
        if not temperature > 0:
            raise ValueError(f"temperature: expected > 0, got {temperature!r}")
        self.capacity_frames, self.mem_every, self.top_k = capacity_frames, mem_every, top_k
        self.temperature, self.usage_mode, self.protect_first, self.matching = (
            temperature, usage_mode, protect_first, matching)
        self.reader: MemoryReader | None = None
        self.calibration: dict = {}
        self.frame = -1

    def key(self, features: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """``{8: [1, C8, h, w], 16: [1, C16, h/2, w/2]}`` → unit-norm key ``[1, C8 + C16, h, w]``."""
        missing = [s for s in self.key_strides if s not in features]
        if missing:
            raise ValueError(f"features: expected strides {self.key_strides}, missing {missing}")
        f8 = F.normalize(features[8].float(), dim=1)
        f16 = F.interpolate(F.normalize(features[16].float(), dim=1), size=f8.shape[-2:], mode="bilinear",
                            align_corners=False)
        return torch.cat([f8, F.normalize(f16, dim=1)], 1) * (0.5 ** 0.5)

    def start(self, features: Mapping[int, torch.Tensor], labels: torch.Tensor, num_labels: int) -> None:
        """Frame 0: features, ``labels [H, W]`` in ``[0, num_labels)`` (at least one object pixel)."""
        labels = check_first_mask(labels, num_labels)
        key = self.key(features)
        self.num_labels = int(num_labels)
        self._size = (int(labels.shape[0]), int(labels.shape[1]))
        self.reader = MemoryReader(key.shape[1], self.num_labels, self.top_k, self.mem_every, self.capacity_frames,
                                   self.usage_mode, self.protect_first, 1.0 / (2.0 * self.temperature),
                                   self.matching)
        self.reader.write(key, soft_one_hot(labels, self.num_labels, tuple(key.shape[-2:])), 0)
        self.frame = 0
        self.evicted = 0
        self.calibration = {"capacity_frames": self.capacity_frames, "mem_every": self.mem_every,
                            "top_k": self.top_k, "temperature": self.temperature, "key_channels": key.shape[1],
                            "entries_per_frame": key.shape[-2] * key.shape[-1]}

    @torch.no_grad()
    def step(self, features: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """Segment the next frame (``[H, W]`` int64 labels); write it to memory on schedule."""
        if self.reader is None:
            raise RuntimeError("TrainingFreeSTCN.start() must be called with the first frame first")
        self.frame += 1
        key = self.key(features)
        prob = self.reader(key)                                          # [1, L, h, w]
        up = F.interpolate(prob, size=self._size, mode="bilinear", align_corners=False)
        pred = up[0].argmax(0)
        if self.reader.should_write(self.frame):
            self.evicted += self.reader.write(key, soft_one_hot(pred, self.num_labels, tuple(key.shape[-2:])),
                                              self.frame)
        return pred

    @property
    def memory_entries(self) -> int:
        return 0 if self.reader is None else self.reader.size
