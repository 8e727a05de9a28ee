"""Test set-up: without a GPU, Triton kernels run in the interpreter on CPU tensors.

TRITON_INTERPRET must be set before triton decorates any kernel, so it is set here,
before any test module imports vos_kernels.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import zlib  # noqa: E402

import pytest  # noqa: E402

# Fresh random inputs on every run; VOS_TEST_SEED=<n> replays a run (printed in the header).
from session_seed import SESSION_SEED  # noqa: E402


def pytest_report_header(config):
    return f"vos_kernels test seed: VOS_TEST_SEED={SESSION_SEED}"


@pytest.fixture
def gen(request):
    """A generator per test, seeded from the session seed and the test's id."""
    seed = (SESSION_SEED ^ zlib.crc32(request.node.nodeid.encode())) % (2**31)
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True)
def _reset_backend():
    import vos_kernels

    before = vos_kernels.get_backend()
    yield
    vos_kernels.set_backend(before)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Repeat the seed at the end of a failing run (the header is hidden under -q)."""
    if exitstatus not in (0, 5):
        terminalreporter.write_line(f"vos_kernels test seed: VOS_TEST_SEED={SESSION_SEED} (set it to replay this run)")
