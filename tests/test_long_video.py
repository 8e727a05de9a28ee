"""`vos-kernels long-video`: a short stream through the LFU bank and STCN's every-k memory.
Checks the bank's invariants and that the naive memory grows and is stopped by its limits;
timings are recorded, never asserted."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vos_kernels import long_video

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "vos"


def test_synthetic_stream_bank_is_bounded_and_naive_grows_until_its_time_limit(tmp_path):
    stream = long_video.SyntheticStream(num_queries=64, key_dim=16, value_dim=8, seed=1)
    res = long_video.run_stream(stream, frames=60, capacity_frames=2.5, mem_every=3, top_k=5,
                                naive_time_limit=1e9, naive_memory_limit_gib=64, device="cpu", quiet=True)
    cap = round(2.5 * 64)
    assert res["capacity_entries"] == cap
    assert max(r["entries"] for r in res["bank"]) == cap                 # filled, never above
    assert len({r["stored_bytes"] for r in res["bank"]}) == 1             # buffers allocated once
    assert res["bank_evicted_total"] == 20 * 64 - cap                     # 20 writes (frames 0, 3, ..., 57)
    assert res["naive_stop"] is None and len(res["naive"]) == 60
    assert [r["entries"] for r in res["naive"]][::3] == [64 * (i + 1) for i in range(20)]
    assert res["naive"][-1]["stored_bytes"] == 20 * 64 * (16 + 8) * 4


def test_naive_memory_stops_at_its_limits():
    stream = long_video.SyntheticStream(num_queries=32, key_dim=8, value_dim=4, seed=2)
    res = long_video.run_stream(stream, frames=30, capacity_frames=2, mem_every=1, top_k=3,
                                naive_time_limit=1e9, naive_memory_limit_gib=3 * 10 * 32 * 32 * 4 / 2**30,
                                device="cpu", quiet=True)
    # the read at frame t needs 3 · (32 t) · 32 · 4 bytes; the limit allows t = 10, not 11
    assert res["naive_stop"]["frame"] == 11 and "--naive-memory-limit" in res["naive_stop"]["reason"]
    assert len(res["naive"]) == 11 and len(res["bank"]) == 30
    stream = long_video.SyntheticStream(num_queries=32, key_dim=8, value_dim=4, seed=2)
    res = long_video.run_stream(stream, frames=10, capacity_frames=2, mem_every=1, top_k=3,
                                naive_time_limit=1e-9, naive_memory_limit_gib=64, device="cpu", quiet=True)
    assert res["naive_stop"]["frame"] == 0 and "--naive-time-limit" in res["naive_stop"]["reason"]


def test_command_writes_json_markdown_and_plot(tmp_path):
    streams = ["synthetic"] + (["blackswan"] if (SHARED / "blackswan").is_dir() else [])
    exe = shutil.which("vos-kernels")
    cmd = [exe] if exe else [sys.executable, "-m", "vos_kernels.cli"]
    proc = subprocess.run(cmd + ["long-video", "--streams", *streams, "--frames", "40", "--num-queries", "100",
                                 "--value-dim", "16", "--naive-time-limit", "0.02", "--out", str(tmp_path),
                                 "--quiet"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((tmp_path / "long_video.json").read_text())
    assert [r["stream"] for r in doc["results"]] == streams
    assert all(len(r["bank"]) == 40 for r in doc["results"])
    assert (tmp_path / "long_video.png").stat().st_size > 0
    assert "| synthetic" in (tmp_path / "long_video.md").read_text()


@pytest.mark.parametrize("args", [["--frames", "0"], ["--capacity-frames", "1"], ["--naive-time-limit", "0"],
                                  ["--streams", "no-such-clip"]])
def test_bad_arguments_fail_with_one_line(tmp_path, args):
    exe = shutil.which("vos-kernels")
    cmd = [exe] if exe else [sys.executable, "-m", "vos_kernels.cli"]
    proc = subprocess.run(cmd + ["long-video", *args, "--out", str(tmp_path / "o"), "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and "error" in proc.stderr, proc.stderr
