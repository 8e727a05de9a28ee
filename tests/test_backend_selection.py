"""Backend selection on CUDA tensors (vos_kernels/_backend.py), checked without a GPU:
the resolution only looks at the device type, the chosen backend and which ops hold a
CUDA C++ kernel, so those are patched here."""
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
    if not torch.cuda.is_available():
        assert vk.cuda_cpp_ops() == []          # a CPU build of torch never compiles csrc/cuda
