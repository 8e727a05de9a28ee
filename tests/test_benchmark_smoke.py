"""Smoke test of the benchmark harness (vos_kernels/benchmark.py): a --quick run writes
results.json / results.md / speedup_memory.png with sane numbers, and the pieces the
harness relies on (case selection, the float64 oracle run in pieces) are right."""
import json

import torch

from vos_kernels import benchmark as vb


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
