"""How decafa_fast._C is built, written once for both times it can be built:

- at install, by setup.py, when the build can import torch (`pip install --no-build-isolation ...`);
- on first use otherwise (plain `pip install .` hides torch from setup.py in an isolated build environment):
  `load_or_build()` compiles the same sources with the same flags against the torch that is running, with
  torch.utils.cpp_extension.load, into a cache folder keyed by torch, Python and the sources, and loads it;
  later processes load the cached library without compiling.

The cached library is installed crash-safe: torch builds and loads it under its own name, then a copy is
written to a temporary name and renamed into place, and its size and SHA-256 are recorded beside it. A later
process checks both before it maps the library (a truncated file would crash the process with SIGBUS), so a
library cut short by a killed copy or a full disk, an empty one, or another project's is rebuilt, or, where
the folder is read-only, named in the error with what to do. One build at a time per folder: an advisory
lock (flock) that the system releases when its holder dies; the lock file names the holder's PID and host.

Importing this module needs neither torch nor the package (setup.py loads it by path).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import socket
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


def _settings():
    """decafa_fast.settings: the package's module when this one is imported as decafa_fast._build, else
    (setup.py) the file beside this one, loaded without importing the package."""
    if __package__:
        from . import settings

        return settings
    module = sys.modules.get("_decafa_settings")
    if module is None:
        spec = importlib.util.spec_from_file_location("_decafa_settings", PACKAGE_DIR / "settings.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["_decafa_settings"] = module
        spec.loader.exec_module(module)
    return module


def cuda_archs() -> str:
    """The CUDA architectures to build for: TORCH_CUDA_ARCH_LIST, or DEFAULT_CUDA_ARCHS where it is unset or
    empty (torch reads an empty list as unset too)."""
    return os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCHS


def want_cuda(torch_cuda_version: str | None, cuda_home: str | None) -> bool:
    """CUDA kernels too when a CUDA toolkit and a CUDA build of torch are present; FORCE_CUDA=1 always,
    FORCE_CUDA=0 never. Never decided by torch.cuda.is_available(), so a GPU-less build machine can still
    produce a CUDA build."""
    forced = _settings().force_cuda()
    if forced is not None:
        return forced
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
class BuildError(RuntimeError):
    """Why decafa_fast._C cannot be loaded or built here, in one line."""


def cache_root() -> Path:
    """Where first-use builds are kept: $DECAFA_EXTENSIONS_DIR, else ~/.cache/decafa_fast/extensions."""
    return _settings().extensions_dir()


def build_key(root: Path, cuda: bool) -> str:
    """Names one build: torch, its CUDA, Python, the flags and every source and header file's bytes. A change
    to any of them builds anew in a new folder instead of loading a library that no longer matches."""
    import torch

    digest = hashlib.sha256()
    for part in (torch.__version__, str(torch.version.cuda), sys.version, str(cuda), " ".join(CXX_FLAGS + NVCC_FLAGS),
                 cuda_archs() if cuda else ""):
        digest.update(part.encode() + b"\0")
    for tree in SOURCE_TREES:
        for path in sorted((root / tree).rglob("*")):
            if path.suffix in (".cpp", ".cu", ".h", ".cuh"):
                digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    version = torch.__version__.replace("+", "_")
    return f"torch{version}-py{sys.version_info.major}{sys.version_info.minor}-{'cuda' if cuda else 'cpu'}-" \
           f"{digest.hexdigest()[:12]}"


LIBRARY_NAME = "decafa_fast_C"
# torch.utils.cpp_extension.load builds and loads <STAGED_NAME><suffix>; the installed copy is <LIBRARY_NAME>.
STAGED_NAME = "decafa_fast_C_build"
LIBRARY_SUFFIX = ".pyd" if sys.platform == "win32" else ".so"  # what cpp_extension.load writes
LOCK_NAME = "build.lock"
TORCH_LOCK_NAME = "lock"  # torch's own, left behind by a killed build


def library_path(build_dir: Path) -> Path:
    return build_dir / f"{LIBRARY_NAME}{LIBRARY_SUFFIX}"


def record_path(library: Path) -> Path:
    """The JSON record of the installed library's size and SHA-256."""
    return library.with_name(library.name + ".json")


def file_digest(path: Path) -> tuple[int, str]:
    """(size, SHA-256 hex) of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def check_installed(library: Path) -> str | None:
    """None when `library` is the one its record describes (same size, same SHA-256), else what is wrong.
    Reads the file; never maps it, so a truncated library cannot crash this process."""
    if not library.is_file():
        return "missing"
    try:
        record = json.loads(record_path(library).read_text())
        size, sha256 = int(record["size"]), str(record["sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"{library} has no readable record of its size and hash (an interrupted install, or not ours)"
    try:
        actual = library.stat().st_size
        if actual != size:
            return f"{library} is {actual} bytes where {size} were recorded (truncated or replaced)"
        if file_digest(library)[1] != sha256:
            return f"{library} does not match the SHA-256 recorded when it was built (replaced)"
    except OSError as exc:
        return f"{library} cannot be read ({exc.strerror})"
    return None


def elf_complete(path: Path) -> bool:
    """Whether an ELF library holds all the bytes its header says (the section table sits at its end, so a
    truncated file fails this). True for non-ELF platforms' libraries, which are not checked."""
    try:
        with open(path, "rb") as f:
            header = f.read(64)
        size = path.stat().st_size
    except OSError:
        return False
    if sys.platform in ("win32", "darwin"):
        return size > 0
    if len(header) < 64 or header[:4] != b"\x7fELF" or header[4] != 2:  # 64-bit ELF
        return False
    order = "little" if header[5] == 1 else "big"
    shoff = int.from_bytes(header[40:48], order)
    shentsize = int.from_bytes(header[58:60], order)
    shnum = int.from_bytes(header[60:62], order)
    return shoff + shentsize * shnum <= size


def install(staged: Path, library: Path) -> None:
    """Copies the built (and loaded) `staged` library to `library`: under a temporary name first, then renamed
    into place, then its size and SHA-256 recorded, each step atomic; a crash anywhere leaves either no
    library or one that `check_installed` refuses."""
    tmp = library.with_name(f".{library.name}.{os.getpid()}.tmp")
    try:
        shutil.copyfile(staged, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        size, sha256 = file_digest(tmp)
        os.replace(tmp, library)
    finally:
        tmp.unlink(missing_ok=True)
    import torch

    record = {"size": size, "sha256": sha256, "torch": torch.__version__, "built": time.time(),
              "pid": os.getpid(), "host": socket.gethostname()}
    tmp_record = record_path(library).with_name(f".{record_path(library).name}.{os.getpid()}.tmp")
    tmp_record.write_text(json.dumps(record) + "\n")
    os.replace(tmp_record, record_path(library))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class BuildLock:
    """One first-use build per build folder at a time. The lock is an flock on `build.lock`, which the system
    releases when the holder exits or is killed, so a dead holder never blocks anyone; the file names the
    holder (PID and host) for whoever waits, and is emptied on release. Where flock is missing (Windows) the
    file's existence is the lock, and one whose holder is a dead process of this host is taken over."""

    def __init__(self, build_dir: Path) -> None:
        self.path = build_dir / LOCK_NAME
        self._fd: int | None = None

    @staticmethod
    def _owner(text: str) -> tuple[int, str] | None:
        try:
            record = json.loads(text)
            return int(record["pid"]), str(record["host"])
        except (ValueError, KeyError, TypeError):
            return None

    def _read_owner(self) -> tuple[int, str] | None:
        try:
            return self._owner(self.path.read_text())
        except OSError:
            return None

    def acquire(self, log) -> BuildLock:
        """Takes the lock, waiting (with one line on `log`) while a live process holds it. Raises OSError
        when the folder cannot be written."""
        me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
        try:
            import fcntl
        except ImportError:
            fcntl = None
        if fcntl is None:
            self._acquire_exclusive(me, log)
            return self
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = self._read_owner()
                who = f"PID {owner[0]} on {owner[1]}" if owner else "another process"
                print(f"decafa-fast: waiting for the build of the C++ extension by {who} (lock {self.path}) ...",
                      file=log, flush=True)
                fcntl.flock(fd, fcntl.LOCK_EX)
            else:
                owner = self._read_owner()
                if owner is not None:  # a holder that did not release: it died
                    print(f"decafa-fast: taking over the build lock {self.path} of PID {owner[0]} on {owner[1]}, "
                          "which ended without releasing it", file=log, flush=True)
            os.ftruncate(fd, 0)
            os.pwrite(fd, me.encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def _acquire_exclusive(self, me: str, log) -> None:
        waiting = False
        while True:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                owner = self._read_owner()
                if owner is not None and owner[1] == socket.gethostname() and not _pid_alive(owner[0]):
                    print(f"decafa-fast: taking over the build lock {self.path} of PID {owner[0]}, which ended",
                          file=log, flush=True)
                    self.path.unlink(missing_ok=True)
                    continue
                if not waiting:
                    who = f"PID {owner[0]} on {owner[1]}" if owner else "another process"
                    print(f"decafa-fast: waiting for the build of the C++ extension by {who} (lock {self.path}) ...",
                          file=log, flush=True)
                    waiting = True
                time.sleep(1.0)
                continue
            os.write(fd, me.encode())
            os.close(fd)
            return

    def release(self) -> None:
        if self._fd is None:
            self.path.unlink(missing_ok=True)
            return
        import fcntl

        try:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None


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


def _load(library: Path) -> Path:
    import torch

    try:
        torch.ops.load_library(str(library))
    except OSError as exc:
        raise BuildError(f"cannot load {library} ({exc}); delete {library.parent} to have it rebuilt") from None
    return library


def load_or_build(root: Path | None = None, cache: Path | None = None, log=None) -> Path:
    """Loads decafa_fast._C's registrations into this process: the cached library built for this torch and
    these sources, once its size and hash match their record, compiling it first if there is none or it does
    not match (one line on `log` (stderr) before and after, since it takes minutes). Returns the path of the
    library this process loaded; raises BuildError with one line saying why it cannot."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    log = sys.stderr if log is None else log
    root = source_root() if root is None else root
    if root is None:
        raise BuildError("decafa_fast._C is not built and its C++ sources are not in this install; reinstall "
                         "with `pip install --no-build-isolation decafa-fast`")
    cuda = want_cuda(torch.version.cuda, CUDA_HOME)
    build_dir = (cache_root() if cache is None else cache) / build_key(root, cuda)
    library = library_path(build_dir)
    problem = check_installed(library)
    if problem is None:
        return _load(library)
    if not _settings().first_use_build():
        if problem == "missing":
            raise BuildError(f"decafa_fast._C is not built for torch {torch.__version__}, and "
                             "DECAFA_FIRST_USE_BUILD=0 turns off compiling it on first use")
        raise BuildError(f"{problem}; delete {build_dir}, or unset DECAFA_FIRST_USE_BUILD=0 to have it rebuilt")
    tool = missing_tool(cuda)
    if tool:
        raise BuildError(f"cannot compile decafa_fast._C for torch {torch.__version__}: {tool}")
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        lock = BuildLock(build_dir).acquire(log)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        where = ("set DECAFA_EXTENSIONS_DIR to a writable folder to build there" if problem == "missing" else
                 f"delete {library} (and {record_path(library).name}) where you can write, or set "
                 "DECAFA_EXTENSIONS_DIR to a writable folder to build there")
        lead = "cannot build decafa_fast._C" if problem == "missing" else problem
        raise BuildError(f"{lead}: {build_dir} is not writable ({reason}); {where}") from None
    try:
        if check_installed(library) is None:  # built by the process this one waited for
            return _load(library)
        # Holding the lock, any lock of torch's here was left by a killed build: it would block torch's load.
        (build_dir / TORCH_LOCK_NAME).unlink(missing_ok=True)
        for stale in (library, record_path(library)):
            stale.unlink(missing_ok=True)
        staged = build_dir / f"{STAGED_NAME}{LIBRARY_SUFFIX}"
        if staged.exists() and not elf_complete(staged):  # a link cut short: make ninja link it again
            staged.unlink()
        print(f"decafa-fast: compiling the C++ extension for torch {torch.__version__} "
              f"({'CPU + CUDA' if cuda else 'CPU'}; once, takes a few minutes; cached in {build_dir}) ...",
              file=log, flush=True)
        start = time.perf_counter()
        loaded = _compile(root, build_dir, cuda)
        install(loaded, library)
        print(f"decafa-fast: C++ extension built in {time.perf_counter() - start:.0f} s", file=log, flush=True)
        return loaded
    except OSError as exc:
        raise BuildError(f"installing decafa_fast._C into {build_dir} failed ({exc})") from None
    finally:
        lock.release()


def _compile(root: Path, build_dir: Path, cuda: bool) -> Path:
    """torch.utils.cpp_extension.load into build_dir, which builds (or finds up to date) and loads the library;
    returns its path."""
    from torch.utils.cpp_extension import load

    kwargs = extension_kwargs(root, cuda)
    flags = kwargs["extra_compile_args"]
    macros = [f"-D{name}={value}" for name, value in kwargs.get("define_macros", [])]
    arch_before = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if cuda:
        os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_archs()  # the architectures build_key named
    try:
        load(name=STAGED_NAME, sources=kwargs["sources"], extra_cflags=flags["cxx"] + macros,
             extra_cuda_cflags=flags.get("nvcc", []) + macros, extra_ldflags=kwargs["extra_link_args"],
             extra_include_paths=kwargs["include_dirs"], build_directory=str(build_dir), with_cuda=cuda,
             is_python_module=False, verbose=_settings().build_verbose())
    except Exception as exc:
        lines = str(exc).strip().splitlines()
        first_error = next((line.strip() for line in lines if "error" in line), lines[-1] if lines else repr(exc))
        raise BuildError(f"compiling decafa_fast._C failed: {first_error} (DECAFA_BUILD_VERBOSE=1 shows the "
                         f"compiler's output)") from None
    finally:
        if cuda and arch_before is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        elif cuda:
            os.environ["TORCH_CUDA_ARCH_LIST"] = arch_before
    return build_dir / f"{STAGED_NAME}{LIBRARY_SUFFIX}"
