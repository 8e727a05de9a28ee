"""Backend selection on CUDA tensors (vos_kernels/_backend.py), checked without a GPU:
the resolution only looks at the device type, the chosen backend and which ops hold a
CUDA C++ kernel, so those are patched here."""
from pathlib import Path

import pytest
import torch

import vos_kernels as vk
from vos_kernels import _backend, _ops

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


@pytest.fixture
def built(monkeypatch):
    """As if the CUDA C++ kernels of global matching and top-k were built."""
    monkeypatch.setattr(_ops, "CUDA_CPP_OPS", frozenset({"fb_global_matching", "topk_memory_read"}))
    monkeypatch.setattr(_ops, "CUDA_CPP", True)
    monkeypatch.setattr(_backend, "AUTO_CUDA", {"topk_memory_read": "triton"})
    monkeypatch.setattr(_backend, "_triton_importable", lambda: True)


def test_auto_follows_the_measured_table(built):
    vk.set_backend("auto")
    assert _backend.resolve(CUDA, "fb_global_matching") == "cuda"
    assert _backend.resolve(CUDA, "topk_memory_read") == "triton"
    assert _backend.resolve(CUDA, "gmm_em") == "cuda"          # no C++ kernel: the dispatcher (Triton)
    assert _backend.resolve(CPU, "topk_memory_read") == "cpu"
    assert sorted(vk.cuda_cpp_ops()) == ["fb_global_matching", "topk_memory_read"]


def test_triton_beside_cuda_cpp_is_called_from_python(built):
    vk.set_backend("triton")
    assert _backend.resolve(CUDA, "fb_global_matching") == "triton"
    assert _backend.triton_from_python("triton", CUDA, "fb_global_matching")
    assert not _backend.triton_from_python("triton", CUDA, "gmm_em")     # its CUDA key is Triton already
    assert not _backend.triton_from_python("cuda", CUDA, "fb_global_matching")
    assert _backend.triton_from_python("triton", CPU, "gmm_em")           # the interpreter


def test_cuda_backend_without_cuda_cpp_raises(monkeypatch):
    monkeypatch.setattr(_ops, "CUDA_CPP_OPS", frozenset())
    monkeypatch.setattr(_ops, "CUDA_CPP", False)
    vk.set_backend("cuda")
    with pytest.raises(ValueError, match="not built"):
        _backend.resolve(CUDA, "fb_global_matching")
    vk.set_backend("cpu")
    with pytest.raises(ValueError, match="needs CPU tensors"):
        _backend.resolve(CUDA, "fb_global_matching")


def test_cuda_ops_cover_every_op_with_a_triton_kernel():
    from vos_kernels import triton as tk

    for name in _ops.CUDA_OPS:
        assert hasattr(tk, name), f"{name} has no Triton entry point"
    built = vk.cuda_cpp_ops()
    if torch.version.cuda is None:
        assert built == []          # a CPU build of torch never compiles csrc/cuda
    else:
        # a CUDA torch compiles csrc/cuda where a toolkit is found (FORCE_CUDA=1 without a GPU
        # too, as when the build is checked against the GPU image's torch): all of it or none
        listed = Path(__file__).resolve().parent.parent / "csrc" / "cuda" / "OPS"
        ops = sorted(ln.strip() for ln in listed.read_text().splitlines() if ln.strip() and not ln.startswith("#"))
        assert built in ([], ops), built


def test_auto_reads_the_per_device_table(built, monkeypatch):
    monkeypatch.setattr(_backend, "AUTO_CUDA", {})
    monkeypatch.setattr(_backend, "AUTO_CUDA_BY_DEVICE", {"NVIDIA H100 80GB HBM3": {"fb_global_matching": "triton"}})
    monkeypatch.setattr(_backend, "_device_names", {0: "NVIDIA H100 80GB HBM3", 1: "NVIDIA H200"})
    vk.set_backend("auto")
    assert _backend.resolve(torch.device("cuda", 0), "fb_global_matching") == "triton"
    assert _backend.resolve(torch.device("cuda", 1), "fb_global_matching") == "cuda"   # device not measured
    assert _backend.resolve(torch.device("cuda", 0), "topk_memory_read") == "cuda"      # op not listed
    with open(_backend._AUTO_FILE) as f:
        import json
        assert "devices" in json.load(f)


def test_auto_table_from_benchmark_results(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    def case(op, cuda_ms, triton_ms):
        return dict(op=op, fused=dict(backend="cuda", time=dict(median_ms=cuda_ms)),
                    alternatives=dict(triton=dict(time=dict(median_ms=triton_ms))))

    results = dict(environment=dict(device="cuda", device_name="NVIDIA H100 80GB HBM3", git_commit="abc"),
                   cases=[case("global", 1.0, 3.0), case("global", 2.0, 1.0), case("local", 1.0, 0.5),
                          case("topk", 1.0, 1.5), dict(op="em", fused=dict(backend="cuda", status="error"),
                                                       alternatives={})])
    src = tmp_path / "results.json"
    src.write_text(json.dumps(results))
    merged = tmp_path / "auto.json"
    merged.write_text(json.dumps({"schema": 1, "devices": {"other": {"gmm_em": "triton"}}}))
    script = Path(__file__).resolve().parents[1] / "scripts" / "auto_table.py"
    out = subprocess.run([sys.executable, str(script), str(src), "--out", str(tmp_path / "e.json"),
                          "--merge", str(merged)], capture_output=True, text=True, check=True).stdout
    assert "| global | 2 |" in out
    devices = json.loads(merged.read_text())["devices"]
    assert devices["other"] == {"gmm_em": "triton"}
    # global: geometric mean of triton/cuda = sqrt(3 * 0.5) > 1 -> cuda; local 0.5 -> triton
    assert devices["NVIDIA H100 80GB HBM3"] == {"labelled_nearest_sqdist": "cuda", "fb_global_matching": "cuda",
                                                "fb_multi_local_matching": "triton", "topk_memory_read": "cuda"}
