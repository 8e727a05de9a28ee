"""pytest set-up for benchmarks/: the device to run on, and the checkout on sys.path.

    python -m pytest benchmarks/ --benchmark-disable -q        # smoke (each case once)
    python -m pytest benchmarks/ --bench-device cuda            # timed, on the GPU
"""
import os
import sys

import pytest
import torch

try:
    import vos_kernels  # noqa: F401
except ImportError:  # `pytest benchmarks/` from a checkout that is not installed
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pytest_addoption(parser):
    parser.addoption("--bench-device", choices=("cpu", "cuda"), default="cpu",
                     help="device of the matching benchmarks (default cpu)")


@pytest.fixture(scope="session")
def bench_device(request):
    """torch.device of the benchmarks; skips when CUDA is asked for and absent."""
    name = request.config.getoption("--bench-device")
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda: no CUDA device")
    return torch.device(name)
