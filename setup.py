"""Build script of vos_kernels.

`pip install --no-build-isolation .` builds the C++ operator library `vos_kernels._C`
from `csrc/` against the torch that is already installed (torch is never pulled in as a
build requirement). CUDA C++ sources under `csrc/cuda/` are added only when torch has
CUDA and a CUDA toolkit is found, or when FORCE_CUDA=1; TORCH_CUDA_ARCH_LIST and
MAX_JOBS are honoured by torch's build helpers. Set VOS_KERNELS_DEBUG=1 for -O0 -g.
"""
import glob
import os

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - message for people who skip the README
    raise SystemExit(
        "vos_kernels builds against an installed torch: install torch first "
        "(pip install torch), then `pip install --no-build-isolation .`"
    ) from exc

HERE = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern):
    return sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, pattern)))


def _extension():
    debug = os.environ.get("VOS_KERNELS_DEBUG", "0") == "1"
    # -g0: Python's own CFLAGS carry -g, which doubles the compile time of the CPU kernels and
    # makes the library ~6x larger; VOS_KERNELS_DEBUG=1 builds with debug information.
    cxx = ["-O0", "-g"] if debug else ["-O3", "-g0"]
    # -fopenmp: at::parallel_for is an OpenMP loop in torch's headers, serial without it.
    cxx += ["-std=c++20", "-DVOS_KERNELS_PYTHON_MODULE", "-ffp-contract=off", "-fopenmp"]
    link = ["-fopenmp"]
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    cuda_sources = _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp")
    force_cuda = os.environ.get("FORCE_CUDA", "0") == "1"
    with_cuda = bool(cuda_sources) and CUDA_HOME is not None and (
        force_cuda or (torch.version.cuda is not None and torch.cuda.is_available())
    )
    if with_cuda:
        # .cu files are torch-free (csrc/cuda/api.h); -lineinfo keeps compute-sanitizer's
        # reports on source lines at no run-time cost.
        nvcc = ["-O0", "-g", "-G"] if debug else ["-O3", "-lineinfo"]
        return CUDAExtension(
            "vos_kernels._C",
            sources + cuda_sources,
            include_dirs=[os.path.join(HERE, "csrc")],
            define_macros=[("VOS_KERNELS_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc + ["-std=c++17"]},
            extra_link_args=link,
        )
    return CppExtension("vos_kernels._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)


setup(
    packages=["vos_kernels", "vos_kernels.triton", "vos_kernels.compat", "vos_models"],
    package_dir={"vos_models": "models"},
    # the embedded default clip of `vos-kernels segment` (PUMaVOS `chair`, CC BY 4.0)
    package_data={"vos_kernels": ["data/auto_cuda.json", "data/chair/ATTRIBUTION.md", "data/chair/JPEGImages/*.jpg",
                                  "data/chair/Annotations/*.png"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
)
