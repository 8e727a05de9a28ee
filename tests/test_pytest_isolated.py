"""scripts/pytest_isolated.py, the test runner of the GPU check: a test that crashes the
process, hangs, or loses the CUDA context must cost only itself, and every other test must
still run and be reported, the first time the CUDA kernels run on a GPU. The faults are
simulated on the CPU: a segfault, a sleep past the per-test limit, and a monkeypatched
context probe (vos_kernels._device_guard.cuda_context_lost)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vos_kernels import _device_guard

ROOT = Path(__file__).resolve().parent.parent
RUNNER = ROOT / "scripts" / "pytest_isolated.py"

DEMO = '''
import time
import pytest

def test_a_pass():
    pass

def test_b_fail():
    assert 1 == 2

def test_c_segfault():
    import ctypes
    ctypes.string_at(0)

def test_d_hang():
    time.sleep(120)

@pytest.mark.skip(reason="demo")
def test_e_skip():
    pass

def test_f_lost_context():
    import vos_kernels._device_guard as guard
    guard.cuda_context_lost = lambda: "simulated: an illegal memory access was encountered"

def test_g_pass():
    pass

@pytest.fixture
def broken():
    raise RuntimeError("fixture")

def test_h_setup_error(broken):
    pass
'''


def run_runner(tmp_path: Path, *runner_args: str, pytest_args=("demo_test.py",)) -> subprocess.CompletedProcess:
    env = dict(os.environ, VOS_TEST_SEED="12345")
    return subprocess.run([sys.executable, str(RUNNER), *runner_args, "--", "-q", "-p", "no:cacheprovider",
                           *pytest_args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_faults_cost_only_their_test(tmp_path):
    (tmp_path / "demo_test.py").write_text(DEMO)
    t0 = time.monotonic()
    r = run_runner(tmp_path, "--test-timeout", "3", "--journal", str(tmp_path / "j"),
                   "--summary", str(tmp_path / "summary.md"), "--junitxml", str(tmp_path / "junit.xml"))
    elapsed = time.monotonic() - t0
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert elapsed < 100, f"the hang was not cut at the per-test limit ({elapsed:.0f} s)"
    summary = (tmp_path / "summary.md").read_text()
    assert "Outcomes: 2 passed, 1 skipped, 1 failed, 1 error, 1 crashed, 1 hung, 1 lost-context." in summary, out
    rows = {line.split("`")[1]: line.split("|")[2].strip() for line in summary.splitlines() if line.startswith("| `")}
    assert rows == {"demo_test.py::test_b_fail": "failed", "demo_test.py::test_c_segfault": "crashed",
                    "demo_test.py::test_d_hang": "hung", "demo_test.py::test_f_lost_context": "lost-context",
                    "demo_test.py::test_h_setup_error": "error"}
    assert "by signal 11" in summary and "simulated: an illegal memory access" in summary
    # the rounds: segfault, hang, lost context, then the rest to the end
    assert "1: process ended with status -11" in summary and "2: process ended with status 1" in summary
    assert "3: CUDA context lost" in summary and "4: finished" in summary
    # the hung test's stacks, written by the watchdog from inside the stuck process
    hang = (tmp_path / "j.hang.txt").read_text()
    assert "demo_test.py::test_d_hang" in hang and "in test_d_hang" in hang
    # same seed in every round; each test ran once (started once in the journal)
    assert "VOS_TEST_SEED=12345" in out
    starts = [ln.split("\t")[1] for ln in (tmp_path / "j").read_text().splitlines() if ln.startswith("start")]
    assert sorted(starts) == sorted(set(starts)) and len(starts) == 8
    # JUnit XML of the rounds whose process ended normally (3 and 4)
    assert {p.name for p in tmp_path.glob("junit*.xml")} == {"junit-r3.xml", "junit-r4.xml"}


def test_clean_run_is_one_round(tmp_path):
    (tmp_path / "demo_test.py").write_text(DEMO)
    r = run_runner(tmp_path, "--summary", str(tmp_path / "s.md"),
                   pytest_args=("demo_test.py", "-k", "a_pass or e_skip or g_pass"))
    assert r.returncode == 0, r.stdout + r.stderr
    text = (tmp_path / "s.md").read_text()
    assert "Outcomes: 2 passed, 1 skipped." in text and "Rounds: 1: finished" in text and "| `" not in text


def test_collection_error_stops(tmp_path):
    (tmp_path / "demo_test.py").write_text("import no_such_module_xyz\n")
    r = run_runner(tmp_path, "--summary", str(tmp_path / "s.md"))
    assert r.returncode == 1
    assert "pytest exit 2" in (tmp_path / "s.md").read_text()


def test_guards_on_cpu(tmp_path):
    assert _device_guard.cuda_context_lost() is None or __import__("torch").cuda.is_available()
    with open(tmp_path / "w.txt", "w") as f, _device_guard.watchdog(None, f):
        pass  # no watchdog armed: nothing happens
    with open(tmp_path / "w.txt", "w") as f, _device_guard.watchdog(30, f):
        pass  # armed and cancelled on leaving
    time.sleep(0.01)
    assert (tmp_path / "w.txt").read_text() == ""


def test_watchdog_ends_a_stuck_process(tmp_path):
    code = ("import time, sys\nfrom vos_kernels._device_guard import watchdog\n"
            f"f = open({str(tmp_path / 'dump.txt')!r}, 'w')\n"
            "with watchdog(1, f):\n    time.sleep(60)\nsys.exit(0)\n")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and time.monotonic() - t0 < 30
    assert "Timeout" in (tmp_path / "dump.txt").read_text()


@pytest.mark.parametrize("path,k,want", [("a/tests.xml", 1, "a/tests.xml"), ("a/tests.xml", 3, "a/tests-r3.xml"),
                                         ("a.b/junit", 2, "a.b/junit-r2")])
def test_round_paths(path, k, want):
    sys.path.insert(0, str(RUNNER.parent))
    try:
        import pytest_isolated
    finally:
        sys.path.pop(0)
    assert pytest_isolated._round_path(path, k) == want
