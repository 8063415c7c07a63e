"""Builds decafa_fast._C: the C++ CPU kernels always, the CUDA kernels where a CUDA toolkit and a CUDA
build of torch are present (or FORCE_CUDA=1). Never decided by torch.cuda.is_available(), so a GPU-less
build machine can still produce a CUDA build."""
import glob
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    sys.exit(
        "decafa-fast: torch must be installed before building, and the build must see it:\n"
        "    pip install torch && pip install --no-build-isolation -e .\n"
        "(build isolation would compile against a different torch than the one you run.)"
    )

here = os.path.dirname(os.path.abspath(__file__))


def rel(pattern: str) -> list[str]:
    return sorted(os.path.relpath(p, here) for p in glob.glob(os.path.join(here, pattern)))


def want_cuda() -> bool:
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    return CUDA_HOME is not None and torch.version.cuda is not None


cpu_sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
# -fno-trapping-math lets GCC vectorise the branch-free exp in csrc/cpu/map_math.h (NaN still propagates).
cxx_flags = ["-O3", "-std=c++20", "-fno-trapping-math"]
if sys.platform != "win32":
    cxx_flags += ["-fopenmp"]

if want_cuda():
    cuda_sources = rel("csrc/cuda/*.cu") + rel("kernels/*.cu")
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not arch_list:
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    ext = CUDAExtension(
        "decafa_fast._C",
        cpu_sources + cuda_sources,
        include_dirs=[os.path.join(here, "kernels")],
        define_macros=[("DECAFA_WITH_CUDA", "1")],
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math", "-std=c++20", "-lineinfo"]},
        extra_link_args=["-fopenmp"] if sys.platform != "win32" else [],
    )
else:
    ext = CppExtension(
        "decafa_fast._C",
        cpu_sources,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=["-fopenmp"] if sys.platform != "win32" else [],
    )

setup(
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
