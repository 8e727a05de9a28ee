"""vos_models: model wrappers and training-free pipelines built on vos_kernels.

Installed from the repository's ``models/`` folder under the name ``vos_models`` (a
top-level package called ``models`` would collide with user code). The wrappers (CFBI,
CFBI+, STCN-LFU, PCAN, A-GAME) arrive with the issues that build them; this package is
empty until then.
"""
