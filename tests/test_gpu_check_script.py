"""Self-test of scripts/gpu_check.sh on the CPU (GPU_CHECK_ALLOW_CPU=1): its orchestration
(steps, the per-call summary, packing after every step, --restore / --resume across calls,
the time budget, option errors) must work the first time a GPU session runs it, when each
command of the lease may run 10 minutes and the machine can go cold between calls."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
FAST_BENCH = ["--quick", "--bench-args", "--repeats 1 --no-memory --no-reference-error"]


def run(*args: str, allow_cpu: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, VOS_KERNELS_GIT_COMMIT="0123456789abcdef")
    env.pop("GPU_CHECK_ALLOW_CPU", None)
    if allow_cpu:
        env["GPU_CHECK_ALLOW_CPU"] = "1"
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def members(tgz: Path) -> dict[str, bytes]:
    with tarfile.open(tgz) as t:
        return {m.name.removeprefix("./"): t.extractfile(m).read() for m in t.getmembers() if m.isfile()}


@pytest.fixture(autouse=True)
def _no_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the script runs for real (scripts/gpu_check.sh)")


def test_calls_pack_restore_resume_and_budget(tmp_path):
    out1, pack1 = tmp_path / "o1", tmp_path / "p1"
    r = run("--out", str(out1), "--pack", str(pack1), "--steps", "build,tests,sanitizer,bench", "--tests", "cuda",
            "--cases", "em/quick", *FAST_BENCH)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = (pack1 / "summary.md").read_text()
    assert summary.startswith("# GPU check: cpu-selftest")
    assert "## Call 1:" in summary and "## Call 2:" not in summary
    for row in ("| build | skipped: CPU self-test |", "| tests | ok |", "| sanitizer | skipped:", "| bench | ok |"):
        assert row in summary, row
    got = members(pack1 / "gpu_check.tgz")
    assert {"summary.md", "env.txt", "tests.log", "tests.xml", "tests-summary.md", "tests.journal", "bench.log",
            "bench/results.json", "bench/results.md", "bench/speedup_memory.png"} <= set(got)
    # the tests ran through scripts/pytest_isolated.py; its outcome counts are in summary.md
    assert "### Tests, call 1" in summary and "skipped." in summary.split("### Tests, call 1")[1].split("\n\n")[1]
    assert "Rounds: 1: finished" in summary
    assert got["summary.md"].decode() == summary  # packed after the last step
    res = json.loads(got["bench/results.json"])
    assert [c["name"] for c in res["cases"]] == ["em/quick"]

    # a second call on a machine that went cold: a fresh --out, restored from the first
    # call's tarball; the benchmark keeps em/quick and adds the new case
    out2, pack2 = tmp_path / "o2", tmp_path / "p2"
    r = run("--out", str(out2), "--pack", str(pack2), "--restore", str(pack1 / "gpu_check.tgz"), "--steps", "bench",
            "--cases", "topk/quick-t2", *FAST_BENCH)
    assert r.returncode == 0, r.stdout + r.stderr
    summary = (pack2 / "summary.md").read_text()
    assert "## Call 1:" in summary and "## Call 2:" in summary
    second = summary.split("## Call 2:")[1]
    assert "| bench | ok | " in second and "| bench-2.log |" in second  # the first call's bench.log kept
    assert (out2 / "bench.log").exists() and (out2 / "bench-2.log").exists()
    res = json.loads((out2 / "bench" / "results.json").read_text())
    assert [c["name"] for c in res["cases"]] == ["topk/quick-t2", "em/quick"]
    assert [r["cases"] for r in res["runs"]] == [["em/quick"], ["topk/quick-t2"]]

    # a call with too little budget left records its steps as skipped and still packs
    r = run("--out", str(out2), "--pack", str(pack2), "--resume", "--budget", "20", "--steps", "bench,segment")
    assert r.returncode == 0, r.stdout + r.stderr
    third = (pack2 / "summary.md").read_text().split("## Call 3:")[1]
    assert "| bench | skipped: budget" in third and "| segment | skipped: budget" in third
    # without --resume the folder starts over
    r = run("--out", str(out2), "--steps", "sanitizer")
    assert r.returncode == 0, r.stdout + r.stderr
    summary = (out2 / "summary.md").read_text()
    assert "## Call 1:" in summary and "## Call 2:" not in summary and not (out2 / "bench").exists()


def test_step_order_and_limits(tmp_path):
    """The short lease's call runs its steps in priority order (--steps order) under per-step
    limits (--limit): a step over its limit is recorded as a timeout and the next goes on."""
    out = tmp_path / "o"
    r = run("--out", str(out), "--steps", "bench,tests,sanitizer", "--tests", "cuda", "--pytest-args", "-k ties",
            "--limit", "bench=1", "--limit", "sanitizer=7,tests=400", "--cases", "em/quick", *FAST_BENCH)
    assert r.returncode == 1, r.stdout + r.stderr   # the bench step timed out
    rows = [ln for ln in (out / "summary.md").read_text().splitlines() if ln.startswith("| ") and "---" not in ln]
    assert [ln.split(" | ")[0][2:] for ln in rows[1:]] == ["bench", "tests", "sanitizer"], rows
    assert "| bench | TIMEOUT after 1s |" in rows[1] and "| tests | ok |" in rows[2]


def test_option_errors_and_no_gpu(tmp_path):
    for args in (["--steps", "build,compile"], ["--tests", "some"], ["--budget", "ten"], ["--test-timeout", "1m"],
                 ["--frobnicate"], ["--steps", "tests,bench,tests"], ["--steps", "tests,build"],
                 ["--limit", "bench=1m"], ["--limit", "compile=60"], ["--limit", "bench"]):
        r = run("--out", str(tmp_path), *args)
        assert r.returncode == 2 and "gpu_check.sh:" in r.stderr, (args, r.stderr)
    r = run("--out", str(tmp_path), allow_cpu=False)
    assert r.returncode == 2 and "no CUDA device" in r.stderr
    r = run("--help")
    assert r.returncode == 0 and "--budget SECONDS" in r.stdout and "--restore FILE" in r.stdout
    assert "--limit STEP=S" in r.stdout


def _sanitize_cases_module():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import sanitize_cases
    finally:
        sys.path.pop(0)
    return sanitize_cases


def test_sanitize_cases_run_on_cpu():
    """scripts/sanitize_cases.py has its first CUDA run in a GPU session: its cases must at
    least run (backend "cpu"), every group in a child process, in one round."""
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "sanitize_cases.py"), "--device", "cpu"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    sanitize_cases = _sanitize_cases_module()
    for g in sanitize_cases.GROUPS:
        assert f"sanitize_cases: {g}: ran" in r.stdout, g
    assert "fresh process" not in r.stdout
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "sanitize_cases.py"), "--groups", "topk,nope"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown ['nope']" in r.stderr
    # after a lost context, the groups the child did not report on run in a fresh one
    out = "sanitize_cases: global: ran\nsanitize_cases: local: FAILED (above)\n"
    assert sanitize_cases.groups_left(["global", "local", "topk", "gmm_em"], out) == ["topk", "gmm_em"]


def test_sanitize_cases_fresh_process_after_lost_context(monkeypatch, capsys):

    sanitize_cases = _sanitize_cases_module()
    calls = []
    replies = [(75, "sanitize_cases: global: ran\nsanitize_cases: local: FAILED (above)\n"),
               (0, "sanitize_cases: topk: ran\nsanitize_cases: gmm_em: ran\n")]

    def fake_run(cmd, **kw):
        calls.append(cmd[cmd.index("--groups") + 1])
        rc, out = replies[len(calls) - 1]
        return subprocess.CompletedProcess(cmd, rc, out)

    monkeypatch.setattr(sanitize_cases.subprocess, "run", fake_run)
    assert sanitize_cases.drive(["global", "local", "topk", "gmm_em"], "cuda") == 1   # a group lost the context
    assert calls == ["global,local,topk,gmm_em", "topk,gmm_em"]
    assert "a fresh process for topk, gmm_em" in capsys.readouterr().out
    calls.clear()
    replies[:] = [(75, "sanitize_cases: global: FAILED (above)\n"), (75, "")]
    assert sanitize_cases.drive(["global", "local"], "cuda") == 1 and calls == ["global,local", "local"]
