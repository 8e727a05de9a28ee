"""Build and load the CUDA C++ kernels of csrc/cuda/ on the CPU emulator (tests/cuda_emu).

``load()`` translates every ``csrc/cuda/*.cu`` (emu_translate.py), compiles it with g++
against the emulator's headers, compiles the ATen glue with ``-DVOS_CUDA_EMU``, links one
shared library and loads it. Loading registers the CUDA kernels at the CPU dispatch key of
their ops (csrc/cuda/OPS), in place of the CPU C++ kernels, for the rest of the process:
``torch.ops.vos_kernels.<op>`` on CPU tensors then runs the CUDA C++ kernel on the
emulator. Load it only in a process of its own (tests/test_cuda.py with
``VOS_CUDA_TESTS_EMULATED=1``). The library is cached under
``build/cuda_emu/<hash of the sources>`` (or ``$VOS_EMU_BUILD_DIR``).

    python tests/cuda_emu/emu_build.py        # build only, print the library's path

``VOS_EMU_SANITIZE=address`` builds with AddressSanitizer, the emulator's memory checker:
it reports any out-of-bounds access of a kernel to a tensor (torch's CPU allocations) or to
shared memory (dynamic: allocated per block at its launch size; static: per declaration and
block), and goes on after a report (``-fsanitize-recover=address`` with
``ASAN_OPTIONS=halt_on_error=0``) so that each report fails the test that made it. The
process needs the runtime preloaded (``asan_runtime()``); ``bash scripts/memcheck.sh`` runs
tests/test_cuda.py so. (ASan warns once that it does not fully support swapcontext, which
the fibers use.)

``VOS_EMU_SANITIZE=thread`` builds with ThreadSanitizer, the emulator's race detector
(runtime.h, "Data races"): ``bash scripts/race_check.sh`` runs tests/test_cuda.py on it.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CSRC = os.path.join(ROOT, "csrc")
sys.path.insert(0, HERE)

import emu_translate as translate  # noqa: E402

_lib = None


def available() -> str | None:
    """None if the emulator can be built here, else why not."""
    if shutil.which("g++") is None:
        return "no g++"
    if not sys.platform.startswith("linux"):
        return "the emulator's fibers need Linux (ucontext)"
    return None


def _sources() -> tuple[list[str], list[str]]:
    cu = sorted(glob.glob(os.path.join(CSRC, "cuda", "*.cu")))
    glue = sorted(glob.glob(os.path.join(CSRC, "cuda", "*_glue.cpp")))
    return cu, glue


_SANITIZE = {"": [], "address": ["-fsanitize=address", "-fsanitize-recover=address", "-fno-omit-frame-pointer", "-g1"],
             "thread": ["-fsanitize=thread", "-g1"]}  # -g1: file and line in their reports


def _sanitize_flags() -> list[str]:
    mode = os.environ.get("VOS_EMU_SANITIZE", "")
    if mode not in _SANITIZE:
        raise ValueError(f"VOS_EMU_SANITIZE: expected 'address', 'thread' or nothing, got {mode!r}")
    return _SANITIZE[mode]


def _preload_if_it_starts(libs: list[str], **env: str) -> str | None:
    """``libs`` (names for g++ -print-file-name) as one LD_PRELOAD value, or None if g++
    lacks one of them or this interpreter (``sys.executable``), with ``env`` set, does not
    start with them preloaded (a sanitizer runtime that cannot map its shadow memory here)."""
    paths = []
    for name in libs:
        try:
            path = subprocess.run(["g++", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
        except OSError:
            return None
        if not (os.path.isabs(path) and os.path.exists(path)):
            return None
        paths.append(path)
    preload = " ".join(paths)
    probe = subprocess.run([sys.executable, "-c", "pass"], env={**os.environ, **env, "LD_PRELOAD": preload},
                           capture_output=True, timeout=120)
    return preload if probe.returncode == 0 else None


@functools.lru_cache(maxsize=None)
def tsan_runtime() -> str | None:
    """g++'s ThreadSanitizer runtime, to LD_PRELOAD into this interpreter, or None if there
    is none that it starts with."""
    return _preload_if_it_starts(["libtsan.so"])


# Python's own allocations are not freed at exit (no leak checks); go on after a report
ASAN_OPTIONS = "detect_leaks=0:halt_on_error=0"


@functools.lru_cache(maxsize=None)
def asan_runtime() -> str | None:
    """g++'s AddressSanitizer runtime and libstdc++ as one LD_PRELOAD value for this
    interpreter, or None if there is none that it starts with. (libstdc++ too: Python does
    not load it, and ASan resolves the real C++ exception functions it intercepts, such as
    ``__cxa_throw``, at start.)"""
    return _preload_if_it_starts(["libasan.so", "libstdc++.so.6"], ASAN_OPTIONS=ASAN_OPTIONS)


def _digest(torch_dir: str) -> str:
    h = hashlib.sha256()
    h.update(repr(_sanitize_flags()).encode())
    files = sorted(glob.glob(os.path.join(CSRC, "cuda", "*")) + glob.glob(os.path.join(HERE, "**", "*"),
                                                                           recursive=True))
    for f in files:
        if os.path.isfile(f) and "__pycache__" not in f:
            h.update(f.encode())
            with open(f, "rb") as fh:
                h.update(fh.read())
    h.update(torch_dir.encode())
    return h.hexdigest()[:16]


def _translated(src: str, out: str, translate_fn) -> str:
    """Writes ``translate_fn`` of ``src`` to ``out/<name>.emu.cpp`` (compiler messages keep
    the original file and lines) and returns that path."""
    cpp = os.path.join(out, os.path.splitext(os.path.basename(src))[0] + ".emu.cpp")
    with open(src) as f:
        text = translate_fn(f.read())
    with open(cpp, "w") as f:
        f.write(f'#line 1 "{src}"\n{text}')
    return cpp


def build(jobs: int | None = None) -> str:
    """Path to the emulator library, building it if the sources changed."""
    import torch

    torch_dir = os.path.dirname(torch.__file__)
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    out = os.environ.get("VOS_EMU_BUILD_DIR") or os.path.join(ROOT, "build", "cuda_emu", _digest(torch_dir))
    lib = os.path.join(out, "libvos_kernels_cuda_emu.so")
    if os.path.exists(lib):
        return lib
    os.makedirs(out, exist_ok=True)
    cu, glue = _sources()
    common = ["g++", "-c", "-O1", "-g0", "-fPIC", "-DVOS_CUDA_EMU", "-Wno-attributes", *_sanitize_flags(),
              "-I" + CSRC]
    cmds = []
    for src in cu:
        cpp = _translated(src, out, translate.translate_cu)
        cmds.append(common + ["-std=c++17", "-I" + os.path.join(HERE, "include"), cpp, "-o", cpp[:-4] + ".o"])
    for src in glue:
        cpp = _translated(src, out, translate.translate_glue)
        cmds.append(common + ["-std=c++20", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-I" + os.path.join(torch_dir, "include"),
                              "-I" + os.path.join(torch_dir, "include", "torch", "csrc", "api", "include"), cpp,
                              "-o", cpp[:-4] + ".o"])

    def run(cmd):
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"emulator build failed: {' '.join(cmd)}\n{r.stderr[-6000:]}")
        return cmd[-1]

    with ThreadPoolExecutor(jobs or os.cpu_count() or 2) as pool:
        objs = list(pool.map(run, cmds))
    tmp = lib + f".tmp{os.getpid()}"
    run(["g++", "-shared", *_sanitize_flags(), "-o", tmp, *objs, "-L" + os.path.join(torch_dir, "lib"), "-lc10", "-ltorch_cpu",
         "-Wl,-rpath," + os.path.join(torch_dir, "lib"), "-Wl,--no-undefined"])
    os.replace(tmp, lib)
    return lib


def build_selftest() -> str:
    """The emulator's own test kernels (selftest.cu) as a torch-free library for ctypes."""
    out = os.environ.get("VOS_EMU_BUILD_DIR") or os.path.join(ROOT, "build", "cuda_emu", _digest(""))
    lib = os.path.join(out, "libvos_emu_selftest.so")
    if os.path.exists(lib):
        return lib
    os.makedirs(out, exist_ok=True)
    cpp = _translated(os.path.join(HERE, "selftest.cu"), out, translate.translate_cu)
    tmp = lib + f".tmp{os.getpid()}"
    r = subprocess.run(["g++", "-shared", "-O1", "-fPIC", "-std=c++17", "-Wno-attributes", *_sanitize_flags(),
                        "-I" + os.path.join(HERE, "include"), cpp, "-o", tmp], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"emulator self-test build failed:\n{r.stderr[-6000:]}")
    os.replace(tmp, lib)
    return lib


def load() -> str:
    """Build if needed and load the library (after vos_kernels, whose CPU kernels it
    replaces for the ops of csrc/cuda/OPS); returns its path."""
    global _lib
    import torch

    import vos_kernels  # noqa: F401  (the schemas and the CPU kernels first)

    if _lib is None:
        _lib = build()
        torch.ops.load_library(_lib)
    return _lib


if __name__ == "__main__":
    if sys.argv[1:] == ["--runtime"]:   # the LD_PRELOAD value for VOS_EMU_SANITIZE, "" if none
        mode = os.environ.get("VOS_EMU_SANITIZE", "")
        print({"thread": tsan_runtime, "address": asan_runtime}.get(mode, lambda: "")() or "")
    else:
        print(build())
