"""Drop-in replacements for the matching functions of public VOS code bases.

* :mod:`vos_kernels.compat.cfbi` -- CFBI / CFBI+ (``networks/layers/matching.py`` and
  ``networks/layers/attention.py`` of ``z-x-yang/CFBI``): same signatures, layouts and
  quirks, backed by the fused ops of :mod:`vos_kernels`.

The submodules import only ``torch`` at import time; the fused package is imported when
a function is called.
"""

__all__ = ["cfbi"]
