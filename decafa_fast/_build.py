"""How decafa_fast._C is built, written once for both times it can be built:

- at install, by setup.py, when the build can import torch (`pip install --no-build-isolation ...`);
- on first use otherwise (plain `pip install .` hides torch from setup.py in an isolated build environment):
  `load_or_build()` compiles the same sources with the same flags against the torch that is running, with
  torch.utils.cpp_extension.load, into a cache folder keyed by torch, Python and the sources, and loads it;
  later processes load the cached library without compiling.

Importing this module needs neither torch nor the package (setup.py loads it by path).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
# The source trees the extension is compiled from. A source checkout (editable install) has them beside the
# package; a wheel carries a copy in decafa_fast/_sources (setup.py's build_py puts it there).
SOURCE_TREES = ("csrc", "kernels")
WHEEL_SOURCES = "_sources"

CXX_FLAGS = ["-O3", "-std=c++20", "-fno-trapping-math"]  # -fno-trapping-math: GCC vectorises vexp.h's exp
NVCC_FLAGS = ["-O3", "--use_fast_math", "-std=c++20", "-lineinfo"]
OPENMP = [] if sys.platform == "win32" else ["-fopenmp"]
DEFAULT_CUDA_ARCHS = "8.0;9.0"  # A100 and H100 when TORCH_CUDA_ARCH_LIST is not set


def source_root() -> Path | None:
    """The folder holding csrc/ and kernels/: the checkout above the package, else the wheel's copy."""
    for root in (PACKAGE_DIR.parent, PACKAGE_DIR / WHEEL_SOURCES):
        if (root / "csrc" / "module.cpp").is_file():
            return root
    return None


def cpu_sources(root: Path) -> list[Path]:
    return sorted(root.glob("csrc/*.cpp")) + sorted(root.glob("csrc/cpu/*.cpp"))


def cuda_sources(root: Path) -> list[Path]:
    return sorted(root.glob("csrc/cuda/*.cu")) + sorted(root.glob("kernels/*.cu"))


def want_cuda(torch_cuda_version: str | None, cuda_home: str | None) -> bool:
    """CUDA kernels too when a CUDA toolkit and a CUDA build of torch are present, or FORCE_CUDA=1. Never
    decided by torch.cuda.is_available(), so a GPU-less build machine can still produce a CUDA build."""
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    return cuda_home is not None and torch_cuda_version is not None


def extension_kwargs(root: Path, cuda: bool) -> dict:
    """Sources and flags of decafa_fast._C, as CppExtension / CUDAExtension / cpp_extension.load take them
    (paths relative to `root`'s parent are the caller's business: these are absolute)."""
    sources = cpu_sources(root) + (cuda_sources(root) if cuda else [])
    kwargs = {
        "sources": [str(p) for p in sources],
        "include_dirs": [str(root / "kernels")],
        "extra_link_args": list(OPENMP),
    }
    if cuda:
        kwargs["define_macros"] = [("DECAFA_WITH_CUDA", "1")]
        kwargs["extra_compile_args"] = {"cxx": CXX_FLAGS + OPENMP, "nvcc": list(NVCC_FLAGS)}
    else:
        kwargs["extra_compile_args"] = {"cxx": CXX_FLAGS + OPENMP}
    return kwargs


# --------------------------------------------------------------------------------------------------
# The first-use build
# --------------------------------------------------------------------------------------------------
def cache_root() -> Path:
    """Where first-use builds are kept: $DECAFA_EXTENSIONS_DIR, else ~/.cache/decafa_fast/extensions."""
    if os.environ.get("DECAFA_EXTENSIONS_DIR"):
        return Path(os.environ["DECAFA_EXTENSIONS_DIR"])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "decafa_fast" / "extensions"


def build_key(root: Path, cuda: bool) -> str:
    """Names one build: torch, its CUDA, Python, the flags and every source and header file's bytes. A change
    to any of them builds anew in a new folder instead of loading a library that no longer matches."""
    import torch

    digest = hashlib.sha256()
    for part in (torch.__version__, str(torch.version.cuda), sys.version, str(cuda), " ".join(CXX_FLAGS + NVCC_FLAGS),
                 os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS) if cuda else ""):
        digest.update(part.encode() + b"\0")
    for tree in SOURCE_TREES:
        for path in sorted((root / tree).rglob("*")):
            if path.suffix in (".cpp", ".cu", ".h", ".cuh"):
                digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    version = torch.__version__.replace("+", "_")
    return f"torch{version}-py{sys.version_info.major}{sys.version_info.minor}-{'cuda' if cuda else 'cpu'}-" \
           f"{digest.hexdigest()[:12]}"


LIBRARY_NAME = "decafa_fast_C"
LIBRARY_SUFFIX = ".pyd" if sys.platform == "win32" else ".so"  # what cpp_extension.load writes


def missing_tool(cuda: bool) -> str | None:
    """Why this machine cannot compile the extension (None: it can)."""
    from torch.utils.cpp_extension import CUDA_HOME, is_ninja_available

    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return (f"no C++ compiler found (looked for {compiler!r}; install one, e.g. `apt install g++` or Xcode's "
                "command line tools, or name it in CXX)")
    if not is_ninja_available():
        return "the ninja build tool is missing (`pip install ninja`)"
    if cuda and (CUDA_HOME is None or shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc")) is None):
        return f"the CUDA kernels need nvcc, which is not in CUDA_HOME={CUDA_HOME!r} (set it to a CUDA toolkit)"
    return None


def load_or_build(root: Path | None = None, cache: Path | None = None, log=None) -> Path:
    """Loads decafa_fast._C's registrations into this process: the cached library built for this torch and
    these sources, compiling it first if there is none (one line on `log` (stderr) before and after, since
    it takes minutes). Returns the library's path; raises RuntimeError with one line saying why it cannot."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    log = sys.stderr if log is None else log
    root = source_root() if root is None else root
    if root is None:
        raise RuntimeError("decafa_fast._C is not built and its C++ sources are not in this install; reinstall "
                           "with `pip install --no-build-isolation decafa-fast`")
    cuda = want_cuda(torch.version.cuda, CUDA_HOME)
    build_dir = (cache_root() if cache is None else cache) / build_key(root, cuda)
    library = build_dir / f"{LIBRARY_NAME}{LIBRARY_SUFFIX}"
    if not library.is_file():
        if os.environ.get("DECAFA_FIRST_USE_BUILD", "1") == "0":
            raise RuntimeError(f"decafa_fast._C is not built for torch {torch.__version__}, and "
                               "DECAFA_FIRST_USE_BUILD=0 turns off compiling it on first use")
        problem = missing_tool(cuda)
        if problem:
            raise RuntimeError(f"cannot compile decafa_fast._C for torch {torch.__version__}: {problem}")
        build_dir.mkdir(parents=True, exist_ok=True)
        clear_stale_lock(build_dir)
        print(f"decafa-fast: compiling the C++ extension for torch {torch.__version__} "
              f"({'CPU + CUDA' if cuda else 'CPU'}; once, takes a few minutes; cached in {build_dir}) ...",
              file=log, flush=True)
        start = time.perf_counter()
        _compile(root, build_dir, cuda)
        print(f"decafa-fast: C++ extension built in {time.perf_counter() - start:.0f} s", file=log, flush=True)
    torch.ops.load_library(str(library))
    return library


STALE_LOCK_S = 15 * 60


def clear_stale_lock(build_dir: Path, stale_after_s: float = STALE_LOCK_S) -> bool:
    """Removes torch's build lock when the build that held it is gone (killed: the lock outlives it, and every
    later first use would wait on it forever). A build writes into its folder as it goes, so a lock in a folder
    where nothing was written for `stale_after_s` is stale. Returns whether it removed one."""
    lock = build_dir / "lock"
    try:
        newest = max(p.stat().st_mtime for p in build_dir.iterdir())
        if lock.exists() and time.time() - newest > stale_after_s:
            lock.unlink()
            return True
    except (OSError, ValueError):  # a file came or went meanwhile: leave the lock to torch
        pass
    return False


def _compile(root: Path, build_dir: Path, cuda: bool) -> None:
    """torch.utils.cpp_extension.load into build_dir (its lock file keeps concurrent first uses apart)."""
    from torch.utils.cpp_extension import load

    kwargs = extension_kwargs(root, cuda)
    flags = kwargs["extra_compile_args"]
    macros = [f"-D{name}={value}" for name, value in kwargs.get("define_macros", [])]
    arch_before = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if cuda and not arch_before:
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    try:
        load(name=LIBRARY_NAME, sources=kwargs["sources"], extra_cflags=flags["cxx"] + macros,
             extra_cuda_cflags=flags.get("nvcc", []) + macros, extra_ldflags=kwargs["extra_link_args"],
             extra_include_paths=kwargs["include_dirs"], build_directory=str(build_dir), with_cuda=cuda,
             is_python_module=False, verbose=os.environ.get("DECAFA_BUILD_VERBOSE", "0") == "1")
    except Exception as exc:
        lines = str(exc).strip().splitlines()
        first_error = next((line.strip() for line in lines if "error" in line), lines[-1] if lines else repr(exc))
        raise RuntimeError(f"compiling decafa_fast._C failed: {first_error} (DECAFA_BUILD_VERBOSE=1 shows the "
                           f"compiler's output)") from exc
    finally:
        if cuda and not arch_before:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
