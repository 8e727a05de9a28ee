"""Test set-up: without a GPU, Triton kernels run in the interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton decorates any kernel, so it is set here,
before any test module imports vos_kernels.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def gen(request):
    """A fresh generator per test, seeded from the test's name (reproducible, not shared)."""
    seed = abs(hash(request.node.nodeid)) % (2**31)
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True)
def _reset_backend():
    import vos_kernels

    before = vos_kernels.get_backend()
    yield
    vos_kernels.set_backend(before)
