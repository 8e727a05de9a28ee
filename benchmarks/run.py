#!/usr/bin/env python
"""Run the benchmark suite of vos_kernels from a checkout.

    python benchmarks/run.py                 # full suite -> benchmarks/results/<device>/
    python benchmarks/run.py --quick         # tiny sizes (CI smoke)
    python benchmarks/run.py --list          # the cases; --cases PATTERN selects some
    python benchmarks/run.py --help

Same as ``python -m vos_kernels.benchmark`` and ``vos-kernels bench``; this script puts
the checkout first on ``sys.path`` so that it benchmarks the in-place build.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vos_kernels.benchmark import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
