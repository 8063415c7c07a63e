"""Builds decafa-fast. The C++ extension decafa_fast._C must be compiled against the torch that runs it, so:

- when this build can import torch (`pip install --no-build-isolation ...`, as CI does), _C is compiled now:
  the C++ CPU kernels always, the CUDA kernels where a CUDA toolkit and a CUDA build of torch are present
  (or FORCE_CUDA=1; never decided by torch.cuda.is_available(), so a GPU-less machine can build for GPUs);
- when it cannot (plain `pip install .` builds in an isolated environment without torch), the package is
  installed without _C and compiles it on first import, against the torch installed then, once
  (decafa_fast/_build.py). The wheel then carries the C++/CUDA sources for that build.

Sources and flags are defined once, in decafa_fast/_build.py, for both.
"""
import importlib.util
import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

here = Path(__file__).resolve().parent

# decafa_fast/_build.py by path: importing the package would import torch and the extension being built
_spec = importlib.util.spec_from_file_location("_decafa_build", here / "decafa_fast" / "_build.py")
build_config = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_config)

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    torch = None


# Trees beside the package that the application reads from a wheel: `decafa-fast bench` (decafa_fast/app/
# benchmark.py) runs the suite in bench/, from the checkout or from this copy. Not part of the op library.
APP_TREES = ("bench",)


class BuildPyWithSources(build_py):
    """A wheel (not an editable install, which reads the checkout) also carries the sources that only live
    beside the package: csrc/ and kernels/ for the first-use build, APP_TREES for the application."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "decafa_fast" / build_config.WHEEL_SOURCES
        for tree in (*build_config.SOURCE_TREES, *APP_TREES):
            if target.joinpath(tree).exists():
                shutil.rmtree(target / tree)
            shutil.copytree(here / tree, target / tree,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "build*"))


def extension_modules() -> list:
    if torch is None:
        print("decafa-fast: torch is not importable by this build (pip's build isolation), so decafa_fast._C "
              "will be compiled on first import against the installed torch; `pip install "
              "--no-build-isolation ...` compiles it now instead")
        return []
    cuda = build_config.want_cuda(torch.version.cuda, CUDA_HOME)
    kwargs = build_config.extension_kwargs(here, cuda)
    kwargs["sources"] = [os.path.relpath(p, here) for p in kwargs["sources"]]  # setuptools wants relative paths
    if cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = build_config.cuda_archs()
        return [CUDAExtension("decafa_fast._C", **kwargs)]
    return [CppExtension("decafa_fast._C", **kwargs)]


ext_modules = extension_modules()
cmdclass = {"build_py": BuildPyWithSources}
if ext_modules:
    cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
