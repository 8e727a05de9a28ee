"""Smoke test of the benchmark harness (vos_kernels/benchmark.py): a --quick run writes
results.json / results.md / speedup_memory.png with sane numbers, and the pieces the
harness relies on (case selection, the float64 oracle run in pieces) are right."""
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from vos_kernels import benchmark as vb

ROOT = Path(__file__).resolve().parent.parent


def test_quick_run_writes_results(tmp_path):
    assert vb.main(["--quick", "--out", str(tmp_path), "--repeats", "3"]) == 0
    for name in ("results.json", "results.md", "speedup_memory.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "speedup_memory.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    res = json.loads((tmp_path / "results.json").read_text())
    env = res["environment"]
    for key in ("device", "device_name", "torch", "triton", "threads", "git_commit", "date"):
        assert env[key] not in (None, ""), key
    assert env["device"] == "cpu" and env["threads"] >= 1
    assert set(res["peers"]) == {"pykeops", "spatial_correlation_sampler"}
    assert res["ceilings"]["matmul"]["gflops"] > 0 and res["ceilings"]["copy"]["gbytes_per_s"] > 0

    names = [c.name for c in vb.QUICK_CASES]
    assert [c["name"] for c in res["cases"]] == names
    for case in res["cases"]:
        assert case["speedup"] > 0
        assert 0 <= case["max_abs_error"] < 1e-4
        assert case["memory_ratio_pct"] is None or case["memory_ratio_pct"] >= 0
        for which in ("fused", "reference"):
            impl = case[which]
            assert impl["status"] == "ok", (case["name"], which, impl.get("reason"))
            t = impl["time"]
            assert 0 < t["min_ms"] <= t["median_ms"] <= t["max_ms"] and t["iqr_ms"] >= 0 and t["runs"] >= 3
            mem = impl["memory"]
            assert mem["status"] == "ok", mem
            for key in ("extra_bytes", "baseline_bytes", "peak_bytes"):
                assert isinstance(mem[key], int) and mem[key] >= 0, (key, mem)
            assert impl["gflops"] > 0
            assert 0 <= impl["max_abs_error"]["max"] < 1e-4

    table = (tmp_path / "results.md").read_text()
    assert "| case | sizes | fused ms | reference ms | speedup |" in table
    assert all(f"| {n} |" in table for n in names)


def test_select_cases_substring_and_glob():
    names = lambda pat: [c.name for c in vb.select_cases(vb.FULL_CASES, pat)]  # noqa: E731
    assert names("global/cfbip-davis-s4-a2") == ["global/cfbip-davis-s4-a2"]
    assert all(n.startswith("local/") for n in names("local/*")) and len(names("local/*")) >= 5
    assert names("sweep-*-x4") == []  # a glob matches whole names
    assert names("*sweep*x4") == ["global/sweep-a2-c32-x4", "local/sweep-a2-c32-x4"]
    assert names("s16,cfbi-s8") == ["global/cfbip-s16", "local/cfbip-s16", "local/cfbi-s8-down"]
    # @GROUP: every name of a group is a full case (a renamed case would silently drop out
    # of the short GPU lease's selection); a group adds to other patterns
    full = {c.name for c in vb.FULL_CASES}
    for group, members in vb.CASE_GROUPS.items():
        assert set(members) <= full, set(members) - full
        assert sorted(names("@" + group)) == sorted(set(members))
    aims = names("@aims")
    assert "global/cfbi-davis-s4" in aims and not any("sweep" in n for n in aims)
    assert names("@aims,cfbip-s16") == [n for n in (c.name for c in vb.FULL_CASES)
                                        if n in aims or "cfbip-s16" in n]
    with pytest.raises(ValueError, match="unknown case group '@nope'"):
        names("@nope")


def test_oracle_in_pieces_equals_whole(monkeypatch):
    """The float64 oracle is run in query chunks (global) and row bands with a halo
    (local) when large; pieces must give exactly the unsplit reference's values."""
    monkeypatch.setattr(vb, "ORACLE_PIECE_BYTES", 64 * 1024)  # force many pieces
    for case in (vb.Case("global/t", "global", 13, 17, 8, 3, atrous_rate=2),
                 vb.Case("local/t", "local", 23, 11, 8, 3, atrous_rate=2, windows=(2, 4, 6)),
                 vb.Case("local/t1", "local", 19, 9, 4, 4, windows=(1, 3))):
        inputs = vb.make_inputs(case, seed=1)
        x64 = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
               for k, v in inputs.items()}
        whole = vb.OPS[case.op].reference(**x64)
        pieces = vb.OPS[case.op].oracle(case, inputs)
        for a, b in zip(whole, pieces):
            assert a.dtype == b.dtype == torch.float64
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_several_fused_backends(tmp_path):
    """--backends cpu,triton times the Triton kernels (interpreter here) beside the C++ ones
    on the same inputs, with their own error against the oracle, in the table too."""
    assert vb.main(["--quick", "--cases", "global/quick-a2-x1", "--out", str(tmp_path), "--repeats", "1",
                    "--no-memory", "--backends", "cpu,triton"]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["settings"]["backends"] == ["cpu", "triton"]
    (case,) = res["cases"]
    assert case["fused"]["backend"] == "cpu"
    alt = case["alternatives"]["triton"]
    assert alt["status"] == "ok" and alt["backend"] == "triton" and alt["speedup"] > 0
    assert 0 <= alt["max_abs_error"]["max"] < 1e-4
    table = (tmp_path / "results.md").read_text()
    assert "Fused backend: cpu." in table and "| triton ms (speedup) | triton max error |" in table
    assert vb.main(["--quick", "--out", str(tmp_path), "--backends", "reference"]) == 2


def test_resume_adds_cases_and_refuses_other_settings(tmp_path, monkeypatch):
    """results.json is written after every case; --resume keeps the cases it holds, runs the
    rest, re-runs a case that ended in an error, and refuses other settings."""
    common = ["--quick", "--out", str(tmp_path), "--repeats", "1", "--no-memory", "--no-reference-error"]
    written = []
    real_write = vb.write_results

    def spy(results, out_dir):
        written.append([c["name"] for c in results["cases"]])
        return real_write(results, out_dir)

    monkeypatch.setattr(vb, "write_results", spy)
    assert vb.main(common + ["--cases", "topk/quick-t8,em/quick"]) == 0
    # one write per case, then the final one: a run cut off after the first case keeps it
    assert written == [["topk/quick-t8"], ["topk/quick-t8", "em/quick"], ["topk/quick-t8", "em/quick"]]
    first = json.loads((tmp_path / "results.json").read_text())
    t8 = next(c for c in first["cases"] if c["name"] == "topk/quick-t8")

    # mark em/quick as failed: --resume must run it again, and keep topk/quick-t8 untouched
    for c in first["cases"]:
        if c["name"] == "em/quick":
            c["fused"]["status"] = "error"
    (tmp_path / "results.json").write_text(json.dumps(first))
    ran = []
    real_run = vb.run_case
    monkeypatch.setattr(vb, "run_case", lambda case, s: ran.append(case.name) or real_run(case, s))
    assert vb.main(common + ["--cases", "topk/quick-t2,topk/quick-t8,em/quick", "--resume"]) == 0
    assert ran == ["topk/quick-t2", "em/quick"]
    res = json.loads((tmp_path / "results.json").read_text())
    # cases in the suite's order, the kept one bit for bit, each with the commit it was measured at
    assert [c["name"] for c in res["cases"]] == ["topk/quick-t2", "topk/quick-t8", "em/quick"]
    assert next(c for c in res["cases"] if c["name"] == "topk/quick-t8") == t8
    assert all(c["fused"]["status"] == "ok" and c["git_commit"] for c in res["cases"])
    assert [r["cases"] for r in res["runs"]] == [["topk/quick-t8", "em/quick"], ["topk/quick-t2", "em/quick"]]
    assert res["ceilings"] == first["ceilings"]  # measured once

    # other settings: refused, the file left as it was
    before = (tmp_path / "results.json").read_text()
    assert vb.main(common[:-1] + ["--cases", "agame/quick", "--resume"]) == 2  # with the reference error
    assert vb.main(common + ["--repeats", "2", "--cases", "agame/quick", "--resume"]) == 2
    assert (tmp_path / "results.json").read_text() == before
    # without --resume the folder starts over
    assert vb.main(common + ["--cases", "em/quick"]) == 0
    assert [c["name"] for c in json.loads((tmp_path / "results.json").read_text())["cases"]] == ["em/quick"]


def test_commit_from_environment_without_git(monkeypatch):
    """A copy of the tree without .git (a lent GPU machine) names its commit through
    VOS_KERNELS_GIT_COMMIT; git wins where it answers."""
    monkeypatch.setenv("VOS_KERNELS_GIT_COMMIT", "0123456789abcdef")
    monkeypatch.setattr(vb, "_git", lambda *args: None)
    env = vb.environment(torch.device("cpu"), 1)
    assert env["git_commit"] == "0123456789abcdef" and env["git_dirty"] is None
    monkeypatch.setattr(vb, "_git", lambda *args: "fedcba" if args[0] == "rev-parse" else "")
    assert vb.environment(torch.device("cpu"), 1)["git_commit"] == "fedcba"


# ------------------------------------------------- cases that end the process (GPU check)
FAST = ["--quick", "--repeats", "1", "--no-memory", "--no-reference-error"]
LOST = "AcceleratorError: CUDA error: an illegal memory access was encountered"


def _records(out) -> dict:
    return {c["name"]: c for c in json.loads((out / "results.json").read_text())["cases"]}


def _spy_run_case(monkeypatch, out=None) -> list:
    """Names of the cases run_case runs (with running.json's attempt while it runs)."""
    ran, real_run = [], vb.run_case

    def spy(case, s):
        if out is None:
            ran.append(case.name)
        else:
            running = json.loads((out / "running.json").read_text())
            assert running["case"] == case.name and running["pid"] == os.getpid()
            ran.append((case.name, running["attempt"]))
        return real_run(case, s)

    monkeypatch.setattr(vb, "run_case", spy)
    return ran


def test_lost_context_stops_the_run_and_resume_goes_on(tmp_path, monkeypatch):
    """A case after which the CUDA context is lost gets 'fatal', results are written and the
    run stops (exit 75) without the later cases; --resume runs that case once more, then
    the rest."""
    args = FAST + ["--out", str(tmp_path), "--cases", "topk/quick-t2,em/quick"]
    assert vb._context_lost(torch.device("cpu")) is None
    real_check, probes = vb._context_lost, []
    monkeypatch.setattr(vb, "_context_lost", lambda device: probes.append(device.type) or (LOST if len(probes) == 1
                                                                                          else None))
    ran = _spy_run_case(monkeypatch, tmp_path)
    assert vb.main(args) == vb.CONTEXT_LOST_EXIT == 75
    assert ran == [("topk/quick-t2", 1)] and probes == ["cpu"]
    got = _records(tmp_path)
    assert list(got) == ["topk/quick-t2"]  # em/quick not run
    t2 = got["topk/quick-t2"]
    assert t2["fatal"] == f"CUDA context lost: {LOST}" and t2["attempts"] == 1
    assert t2["fused"]["status"] == "ok" and vb._has_error(t2)  # measured values kept, an error all the same
    assert not (tmp_path / "running.json").exists()
    assert f"- topk/quick-t2: CUDA context lost: {LOST} (attempt 1)" in (tmp_path / "results.md").read_text()

    # --resume with the real check (never lost on CPU): topk/quick-t2 once more (attempt 2), then em/quick
    monkeypatch.setattr(vb, "_context_lost", real_check)
    ran.clear()
    assert vb.main(args + ["--resume"]) == 0
    assert ran == [("topk/quick-t2", 2), ("em/quick", 1)]
    got = _records(tmp_path)
    assert list(got) == ["topk/quick-t2", "em/quick"]
    assert "fatal" not in got["topk/quick-t2"] and got["topk/quick-t2"]["attempts"] == 2
    assert got["topk/quick-t2"]["previous_fatal"] == f"CUDA context lost: {LOST}"
    assert got["em/quick"]["attempts"] == 1 and "previous_fatal" not in got["em/quick"]
    assert all(c["fused"]["status"] == c["reference"]["status"] == "ok" for c in got.values())


def test_context_lost_twice_is_not_run_again(tmp_path, monkeypatch):
    """A case that ends fatally in two runs in a row stays a fatal error; --resume goes on
    with the others and the run ends with exit status 1."""
    args = FAST + ["--out", str(tmp_path), "--cases", "topk/quick-t2,em/quick"]
    real_check = vb._context_lost
    monkeypatch.setattr(vb, "_context_lost", lambda device: LOST)
    ran = _spy_run_case(monkeypatch, tmp_path)
    assert vb.main(args) == 75
    assert vb.main(args + ["--resume"]) == 75
    assert ran == [("topk/quick-t2", 1), ("topk/quick-t2", 2)]
    t2 = _records(tmp_path)["topk/quick-t2"]
    assert t2["attempts"] == 2 and t2["fatal"] == t2["previous_fatal"] == f"CUDA context lost: {LOST}"
    ran.clear()
    assert vb.main(args + ["--resume"]) == 75  # topk/quick-t2 left out; em/quick runs and loses it
    assert ran == [("em/quick", 1)]
    got = _records(tmp_path)
    assert got["topk/quick-t2"] == t2 and got["em/quick"]["attempts"] == 1 and got["em/quick"]["fatal"]
    monkeypatch.setattr(vb, "_context_lost", real_check)
    ran.clear()
    assert vb.main(args + ["--resume"]) == 1  # em/quick once more, fine; topk/quick-t2 stays an error
    assert ran == [("em/quick", 2)]
    got = _records(tmp_path)
    assert got["topk/quick-t2"] == t2 and "fatal" not in got["em/quick"]
    ran.clear()
    assert vb.main(args + ["--resume"]) == 1 and ran == []


def test_resume_after_the_process_died_in_a_case(tmp_path, monkeypatch, capsys):
    """running.json left by a process that died in a case (fault, hang, outside kill):
    --resume records that case as fatal and runs it once more; after a second death it is
    a fatal error that every report renders."""
    args = FAST + ["--out", str(tmp_path), "--cases", "topk/quick-t2,em/quick"]
    assert vb.main(FAST + ["--out", str(tmp_path), "--cases", "topk/quick-t2"]) == 0
    died = dict(case="em/quick", started="2030-01-02T03:04:05+00:00", pid=999999, attempt=1, case_timeout_s=300.0,
                git_commit="0123456789ab")
    (tmp_path / "running.json").write_text(json.dumps(died))
    ran = _spy_run_case(monkeypatch, tmp_path)
    capsys.readouterr()
    assert vb.main(args + ["--resume"]) == 0
    err = capsys.readouterr().err
    assert "the process died in case em/quick (attempt 1, started 2030-01-02T03:04:05+00:00)" in err
    assert ran == [("em/quick", 2)]
    em = _records(tmp_path)["em/quick"]
    assert "fatal" not in em and em["attempts"] == 2 and em["fused"]["status"] == "ok"
    assert em["previous_fatal"] == ("the process died while this case ran (fault, hang past --case-timeout, "
                                    "or an outside time limit)")
    assert not (tmp_path / "running.json").exists()

    # it dies again (attempt 2): a fatal error, not run again
    (tmp_path / "running.json").write_text(json.dumps(dict(died, attempt=2)))
    ran.clear()
    assert vb.main(args + ["--resume"]) == 1
    assert ran == [] and not (tmp_path / "running.json").exists()
    res = json.loads((tmp_path / "results.json").read_text())
    em = _records(tmp_path)["em/quick"]
    assert em["attempts"] == 2 and em["fatal"].startswith("the process died while this case ran")
    assert em["fused"]["status"] == em["reference"]["status"] == "error" and em["fused"]["reason"] in em["fatal"]
    assert em["started"] == died["started"] and em["git_commit"] == died["git_commit"]
    assert em["speedup"] is None and em["max_abs_error"] is None and em["memory_ratio_pct"] is None
    assert em["sizes"] == vb.select_cases(vb.QUICK_CASES, "em/quick")[0].sizes() and em["op"] == "em"
    assert vb._has_error(em) and not vb._run_again(em)
    table = (tmp_path / "results.md").read_text()
    assert "| em/quick | B 1, N 500, C 32, K 8, 3 iters, κ 20 | error | error | - |" in table
    assert f"- em/quick: {em['fatal']} (attempt 2)" in table
    assert (tmp_path / "speedup_memory.png").stat().st_size > 0
    print(vb._progress(1, 1, em, 0.0))  # the progress line and auto_table.py read the record too
    spec = importlib.util.spec_from_file_location("auto_table", ROOT / "scripts" / "auto_table.py")
    auto_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(auto_table)
    assert auto_table.choose(res) == ({}, [])

    # running.json of a case whose results were written (killed just before removing it): no death
    t2 = _records(tmp_path)["topk/quick-t2"]
    (tmp_path / "running.json").write_text(json.dumps(dict(case="topk/quick-t2", started=t2["started"],
                                                           pid=1, attempt=t2["attempts"])))
    assert vb.main(args + ["--resume"]) == 1
    assert ran == [] and _records(tmp_path)["topk/quick-t2"] == t2 and not (tmp_path / "running.json").exists()


HANG_DRIVER = """
import sys, time
from vos_kernels import benchmark as vb

real_run = vb.run_case

def hang_in_case(case, s):
    if case.name == "em/quick":
        time.sleep(60)
    return real_run(case, s)

vb.run_case = hang_in_case
sys.exit(vb.main(sys.argv[1:]))
"""


def test_watchdog_ends_a_hung_case_and_resume_records_it(tmp_path, monkeypatch):
    """A case that hangs past --case-timeout: the process ends (exit status 1) with the stacks
    in hang-traceback.txt and running.json naming the case; --resume records it as fatal."""
    driver = tmp_path / "hang_driver.py"
    driver.write_text(HANG_DRIVER)
    out = tmp_path / "out"
    args = FAST + ["--out", str(out), "--cases", "topk/quick-t2,em/quick"]
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, str(driver), *args, "--case-timeout", "2"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log = proc.communicate(timeout=60)[0]
    finally:
        proc.kill()
    assert proc.returncode == 1, log
    assert time.monotonic() - t0 < 20, log
    running = json.loads((out / "running.json").read_text())
    assert running["case"] == "em/quick" and running["attempt"] == 1 and running["pid"] == proc.pid
    assert running["case_timeout_s"] == 2.0
    hang = (out / "hang-traceback.txt").read_text()
    assert hang.count("=== ") == 1 and f"case em/quick, attempt 1, pid {proc.pid}:" in hang  # topk's header taken out
    assert "Timeout (0:00:02)!" in hang and "in hang_in_case" in hang and "hang_driver.py" in hang
    assert list(_records(out)) == ["topk/quick-t2"]

    # --resume of the other case only: em/quick is recorded as a fatal hang (attempt 1) and kept
    assert vb.main(args[:-1] + ["topk/quick-t2", "--resume"]) == 1
    em = _records(out)["em/quick"]
    assert em["attempts"] == 1 and em["fused"]["status"] == "error"
    assert em["fatal"] == ("hang: the case ran past --case-timeout 2 s and the watchdog ended the process; "
                           "Python tracebacks in hang-traceback.txt")
    assert not (out / "running.json").exists() and (out / "hang-traceback.txt").read_text() == hang
    # with both selected: em/quick runs once more (attempt 2) and is fine
    ran = _spy_run_case(monkeypatch, out)
    assert vb.main(args + ["--resume", "--case-timeout", "30"]) == 0
    assert ran == [("em/quick", 2)]
    assert (out / "hang-traceback.txt").read_text() == hang  # the header of a case that ended is taken out


def test_isolate_drives_fresh_processes(tmp_path, monkeypatch):
    """--isolate: a fresh child with --resume after a lost context (75) or a death inside a
    case (running.json left), and it stops on the first other end."""
    out = tmp_path / "o"
    calls = []

    def child(ends):
        def fake_run(cmd, **kw):
            rc, leave_running = ends[len(calls)]
            calls.append(cmd)
            if leave_running:
                (out / vb.RUNNING_FILE).write_text("{}")
            else:
                (out / vb.RUNNING_FILE).unlink(missing_ok=True)
            return subprocess.CompletedProcess(cmd, rc)
        return fake_run

    argv = ["--quick", "--cases", "em/quick,topk/quick-t2", "--isolate", "--out", str(out)]
    monkeypatch.setattr(vb.subprocess, "run", child([(75, False), (1, True), (-11, True), (0, False)]))
    assert vb.main(argv) == 0
    assert len(calls) == 4
    assert all(c[1:3] == ["-m", "vos_kernels.benchmark"] and "--isolate" not in c for c in calls)
    assert ["--resume" in c for c in calls] == [False, True, True, True]
    # an ordinary error (status 1, no running.json) ends the rounds
    calls.clear()
    monkeypatch.setattr(vb.subprocess, "run", child([(1, False)]))
    assert vb.main(argv) == 1 and len(calls) == 1
    # a child that always dies: at most MAX_FATAL_ATTEMPTS rounds per case, plus one
    calls.clear()
    monkeypatch.setattr(vb.subprocess, "run", child([(75, False)] * 20))
    assert vb.main(argv) == 1 and len(calls) == vb.MAX_FATAL_ATTEMPTS * 2 + 1
