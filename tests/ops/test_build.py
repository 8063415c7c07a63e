"""Both ways decafa_fast._C gets built (decafa_fast/_build.py): by setup.py at install when the build can import
torch, and on first import when it cannot (a plain, build-isolated `pip install`). The first-use build runs
on a copy of the package and sources in a temporary folder, so the checkout's built _C is never touched."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IGNORE = shutil.ignore_patterns("__pycache__", "*.so", "*.pyd", "build*", "*.egg-info")


def _copy_checkout(dest: Path, trees=("decafa_fast", "csrc", "kernels")) -> Path:
    """The package and the C++/CUDA sources, without any built extension."""
    for tree in trees:
        shutil.copytree(ROOT / tree, dest / tree, ignore=IGNORE)
    return dest


# An editable install's import hook would find the checkout's decafa_fast._C for the copy's package: drop it,
# so that the copy is all the subprocess sees.
_ONLY_THE_COPY = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path "
                  "if not getattr(f, '__module__', '').startswith('__editable__')]\n")


def _run_python(code: str, cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, **env}
    return subprocess.run([sys.executable, "-c", _ONLY_THE_COPY + code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


# setup.py with setuptools.setup replaced: what it would build, without building it
_SETUP_PROBE = """
import runpy, sys
import setuptools
captured = {}
setuptools.setup = lambda **kw: captured.update(kw)
if HIDE_TORCH:
    sys.modules["torch"] = None  # what pip's isolated build environment looks like
sys.argv = ["setup.py"]
runpy.run_path("setup.py", run_name="__main__")
exts = captured["ext_modules"]
print("EXT", [e.name for e in exts], sorted(s for e in exts for s in e.sources))
print("CMDS", sorted(captured["cmdclass"]))
"""


@pytest.mark.slow
def test_setup_compiles_at_install_when_it_can_import_torch():
    proc = _run_python("HIDE_TORCH = False" + _SETUP_PROBE, ROOT, {}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ext_line = next(line for line in proc.stdout.splitlines() if line.startswith("EXT"))
    assert "'decafa_fast._C'" in ext_line and "csrc/module.cpp" in ext_line and "csrc/cpu/attention.cpp" in ext_line
    assert "build_ext" in proc.stdout


def test_setup_without_torch_defers_the_build_and_ships_the_sources(tmp_path):
    """Build isolation: no extension now, one line saying it will be compiled on first import; build_py copies
    csrc/, kernels/ and bench/ into the wheel for that build and for `decafa-fast bench`."""
    proc = _run_python("HIDE_TORCH = True" + _SETUP_PROBE, ROOT, {}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "EXT [] []" in proc.stdout and "compiled on first import" in proc.stdout

    build_lib = tmp_path / "lib"
    code = ("import runpy, sys; sys.modules['torch'] = None; "
            f"sys.argv = ['setup.py', '-q', 'build_py', '--build-lib', {str(build_lib)!r}]; "
            "runpy.run_path('setup.py', run_name='__main__')")
    proc = _run_python(code, ROOT, {}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sources = build_lib / "decafa_fast" / "_sources"
    for path in ("csrc/module.cpp", "csrc/cpu/attention.cpp", "kernels/decafa_kernels.cuh", "bench/run.py",
                 "bench/measure.py", "bench/report.py", "bench/test_ops.py", "bench/conftest.py"):
        assert (sources / path).is_file(), path
    assert not list(sources.rglob("*.so")) and not list(sources.rglob("__pycache__"))


@pytest.mark.slow
def test_first_use_build_without_a_compiler_says_so_in_one_line(tmp_path):
    """No compiler: importing the package still works, the cpp backend names the reason, ops run the reference."""
    copy = _copy_checkout(tmp_path / "src")
    code = ("import decafa_fast.ops as ops, torch; print('CPP', ops.backends()['cpp']); "
            "print('AUTO', ops.soft_argmax(torch.zeros(1, 1, 3, 3)).tolist())")
    proc = _run_python(code, tmp_path, {"PYTHONPATH": str(copy), "CXX": str(tmp_path / "no-such-compiler"),
                                        "DECAFA_EXTENSIONS_DIR": str(tmp_path / "cache")}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cpp = next(line for line in proc.stdout.splitlines() if line.startswith("CPP"))
    assert "cannot compile decafa_fast._C" in cpp and "no C++ compiler found" in cpp and "\n" not in cpp
    assert "AUTO [[[1.0, 1.0]]]" in proc.stdout  # the centre of a flat 3 x 3 map, by the reference
    assert "Traceback" not in proc.stderr


def test_first_use_build_can_be_turned_off(tmp_path, monkeypatch):
    from decafa_fast import _build

    monkeypatch.setenv("DECAFA_FIRST_USE_BUILD", "0")
    with pytest.raises(RuntimeError, match="DECAFA_FIRST_USE_BUILD=0 turns off"):
        _build.load_or_build(_copy_checkout(tmp_path / "src", ("csrc", "kernels")), tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


@pytest.mark.slow
def test_first_use_build_compiles_once_then_loads_the_cache(tmp_path):
    """A package without _C compiles it on first import (one line before, one after), against this torch,
    into the cache; the cpp backend then matches the reference; a second process loads it without compiling.
    About 2 minutes on a loaded 2-core machine."""
    copy = _copy_checkout(tmp_path / "src")
    env = {"PYTHONPATH": str(copy), "DECAFA_EXTENSIONS_DIR": str(tmp_path / "cache")}
    code = """
import torch
import decafa_fast.ops as ops
from decafa_fast import reference
print("CPP", ops.backends()["cpp"])
t = torch.randn(2, 3, 8, 9, generator=torch.Generator().manual_seed(0))
with ops.use_backend("cpp"):
    got = ops.soft_argmax(t)
torch.testing.assert_close(got, reference.soft_argmax(t), rtol=1e-5, atol=1e-5)
print("MATCH")
print("CACHE LIMIT", ops.cpu_cache.limit())  # the C entry points of the first-use build are found too
"""
    start = time.perf_counter()
    first = _run_python(code, tmp_path, env, timeout=1500)
    first_s = time.perf_counter() - start
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    assert "CPP available" in first.stdout and "MATCH" in first.stdout
    assert f"CACHE LIMIT {1024 << 20}" in first.stdout
    assert "compiling the C++ extension" in first.stderr and "C++ extension built in" in first.stderr
    (build,) = (tmp_path / "cache").iterdir()  # one build, named by torch, Python and the sources
    assert build.name.startswith("torch") and list(build.glob("decafa_fast_C.*"))

    start = time.perf_counter()
    second = _run_python(code, tmp_path, env, timeout=300)
    second_s = time.perf_counter() - start
    assert second.returncode == 0, second.stderr[-3000:]
    assert "MATCH" in second.stdout and "compiling" not in second.stderr
    assert second_s < first_s


# --------------------------------------------------------------------------------------------------
# The first-use build is crash-safe. Each case runs the first import of a copy of the package in a fresh
# process with the compiler step replaced: `_compile` copies the checkout's built _C to the name torch's
# build gives it and loads it, as torch.utils.cpp_extension.load does after compiling. What is under test
# (the record, the checks before loading, the install, the lock) runs as it is.
# --------------------------------------------------------------------------------------------------
def _prebuilt() -> Path:
    built = sorted((ROOT / "decafa_fast").glob("_C*.so"))
    if not built:
        pytest.skip("decafa_fast._C is not built in this checkout")
    return built[0]


@pytest.mark.parametrize("force, expected", [(None, [False, False, False, True]), ("1", [True] * 4),
                                             ("0", [False] * 4), ("maybe", [False, False, False, True])])
def test_force_cuda_decides_over_detection(monkeypatch, force, expected):
    """Unset: CUDA kernels only where both a toolkit and a CUDA torch are found; FORCE_CUDA=1 always; FORCE_CUDA=0
    never (a CPU-only build beside a toolkit and a CUDA torch); a bad value warns and leaves it to detection."""
    from decafa_fast import _build, settings

    monkeypatch.setattr(settings, "_warned", set())
    if force is None:
        monkeypatch.delenv("FORCE_CUDA", raising=False)
    else:
        monkeypatch.setenv("FORCE_CUDA", force)
    cases = [(None, None), ("13.0", None), (None, "/usr/local/cuda"), ("13.0", "/usr/local/cuda")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", settings.SettingWarning)
        assert [_build.want_cuda(version, home) for version, home in cases] == expected


def test_an_empty_cuda_arch_list_means_the_default(monkeypatch):
    """TORCH_CUDA_ARCH_LIST empty builds for the default architectures, as unset does (torch reads it so), so
    both name the same cached build; another list names another."""
    from decafa_fast import _build

    keys = {}
    for value in (None, "", _build.DEFAULT_CUDA_ARCHS, "8.6"):
        if value is None:
            monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
        else:
            monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", value)
        keys[value] = (_build.cuda_archs(), _build.build_key(ROOT, cuda=True), _build.build_key(ROOT, cuda=False))
    assert keys[None] == keys[""] == keys[_build.DEFAULT_CUDA_ARCHS]
    assert keys[None][0] == _build.DEFAULT_CUDA_ARCHS
    assert keys["8.6"][0] == "8.6" and keys["8.6"][1] != keys[None][1]
    assert keys["8.6"][2] == keys[None][2]  # a CPU build does not depend on it


@pytest.fixture(scope="module")
def package_copy(tmp_path_factory) -> Path:
    return _copy_checkout(tmp_path_factory.mktemp("first_use") / "src")


_STUBBED_COMPILE = """
import importlib.util, shutil, sys
from pathlib import Path
spec = importlib.util.spec_from_file_location("decafa_fast._build", Path({copy!r}) / "decafa_fast" / "_build.py")
b = importlib.util.module_from_spec(spec)
sys.modules["decafa_fast._build"] = b
spec.loader.exec_module(b)

def fake_compile(root, build_dir, cuda):
    import torch
    staged = build_dir / (b.STAGED_NAME + b.LIBRARY_SUFFIX)
    shutil.copyfile({prebuilt!r}, staged)
    torch.ops.load_library(str(staged))
    print("COMPILED", flush=True)
    return staged

b._compile = fake_compile
b.missing_tool = lambda cuda: None
{patch}
import torch
import decafa_fast.ops as ops
from decafa_fast import reference
print("CPP", ops.backends()["cpp"])
if ops.backends()["cpp"] == "available":
    t = torch.randn(2, 3, 8, 9, generator=torch.Generator().manual_seed(0))
    with ops.use_backend("cpp"):
        got = ops.soft_argmax(t)
    torch.testing.assert_close(got, reference.soft_argmax(t), rtol=1e-5, atol=1e-5)
    print("MATCH", ops.cpu_cache.limit())
"""


def _first_use(copy: Path, cache: Path, patch: str = "") -> subprocess.CompletedProcess:
    code = _STUBBED_COMPILE.format(copy=str(copy), prebuilt=str(_prebuilt()), patch=patch)
    proc = _run_python(code, copy.parent, {"PYTHONPATH": str(copy), "DECAFA_EXTENSIONS_DIR": str(cache)},
                       timeout=300)
    assert proc.returncode >= 0, f"killed by signal {-proc.returncode}: {proc.stderr[-2000:]}"  # e.g. SIGBUS
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc


def _installed(copy: Path, cache: Path) -> Path:
    """Where the first-use build of `copy` keeps its library in `cache` (what load_or_build computes: with the
    CUDA kernels where a CUDA torch meets a toolkit, unless FORCE_CUDA says otherwise)."""
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    from decafa_fast import _build

    cuda = _build.want_cuda(torch.version.cuda, CUDA_HOME)
    return _build.library_path(cache / _build.build_key(copy, cuda=cuda))


def _install_prebuilt(copy: Path, cache: Path) -> Path:
    from decafa_fast import _build

    library = _installed(copy, cache)
    library.parent.mkdir(parents=True)
    _build.install(_prebuilt(), library)
    assert _build.check_installed(library) is None
    return library


def test_first_use_build_installs_a_recorded_library_and_later_loads_it_without_compiling(package_copy, tmp_path):
    from decafa_fast import _build

    cache = tmp_path / "cache"
    first = _first_use(package_copy, cache)
    assert first.returncode == 0 and "COMPILED" in first.stdout, first.stdout + first.stderr[-2000:]
    assert f"MATCH {1024 << 20}" in first.stdout  # the cache's C entry points are found in the staged library
    library = _installed(package_copy, cache)
    record = json.loads(_build.record_path(library).read_text())
    assert record["size"] == library.stat().st_size == _prebuilt().stat().st_size
    assert record["sha256"] == hashlib.sha256(library.read_bytes()).hexdigest()
    assert not list(library.parent.glob(".*.tmp"))  # nothing left under a temporary name
    assert (library.parent / _build.LOCK_NAME).read_text() == ""  # released: no holder named

    second = _first_use(package_copy, cache)
    assert second.returncode == 0 and "COMPILED" not in second.stdout and "MATCH" in second.stdout, second.stdout


def _truncate(library: Path) -> None:
    library.write_bytes(library.read_bytes()[: library.stat().st_size // 2])


def _foreign(library: Path) -> None:
    """Another project's library at that path (any other shared object will do)."""
    import torch

    other = next(Path(torch.__file__).parent.joinpath("lib").glob("libc10.so*"))
    shutil.copyfile(other, library)


DAMAGE = {"truncated": _truncate, "empty": lambda lib: lib.write_bytes(b""), "foreign": _foreign,
          "no record": lambda lib: lib.with_name(lib.name + ".json").unlink()}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_cached_library_is_rebuilt_before_it_is_loaded(package_copy, tmp_path, damage):
    """A library cut short (a killed copy, a full disk) would crash the import with SIGBUS if it were mapped; an
    empty one or another project's would fail to load. Each fails the check against its record and is rebuilt."""
    from decafa_fast import _build

    cache = tmp_path / "cache"
    library = _install_prebuilt(package_copy, cache)
    DAMAGE[damage](library)
    assert _build.check_installed(library) is not None
    proc = _first_use(package_copy, cache)
    assert proc.returncode == 0 and "COMPILED" in proc.stdout and "MATCH" in proc.stdout, proc.stdout + proc.stderr
    assert _build.check_installed(library) is None


def test_a_damaged_library_in_a_read_only_cache_names_the_file_and_the_way_out(package_copy, tmp_path):
    """Where the cache cannot be written (here: the lock cannot be created, as in a read-only folder; this test
    may run as root, which chmod does not stop), the import still works, without the C++ backend, and the
    reason says which file to delete and how to build elsewhere."""
    cache = tmp_path / "cache"
    library = _install_prebuilt(package_copy, cache)
    _truncate(library)
    read_only = ("def no_lock(self, log):\n    raise PermissionError(13, 'Permission denied', str(self.path))\n"
                 "b.BuildLock.acquire = no_lock\n")
    proc = _first_use(package_copy, cache, patch=read_only)
    assert proc.returncode == 0 and "COMPILED" not in proc.stdout, proc.stdout + proc.stderr
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("CPP")]
    assert f"{library} is " in line and "truncated" in line and "not writable (Permission denied)" in line, line
    assert f"delete {library}" in line and "DECAFA_EXTENSIONS_DIR" in line, line

    good = _install_prebuilt(package_copy, tmp_path / "good")  # a good library loads without writing anything
    proc = _first_use(package_copy, tmp_path / "good", patch=read_only)
    assert proc.returncode == 0 and "MATCH" in proc.stdout and "COMPILED" not in proc.stdout, proc.stdout
    assert good.is_file()


# The lock, held by a process that prints HOLDING, then sleeps or is killed
_HOLD_LOCK = """
import importlib.util, os, signal, sys, time
from pathlib import Path
spec = importlib.util.spec_from_file_location("_b", {build!r})
b = importlib.util.module_from_spec(spec)
spec.loader.exec_module(b)
b.BuildLock(Path({folder!r})).acquire(sys.stdout)
print("HOLDING", os.getpid(), flush=True)
if {kill}:
    os.kill(os.getpid(), signal.SIGKILL)
time.sleep(3)
"""


def _hold_lock(folder: Path, kill: bool) -> subprocess.Popen:
    code = _HOLD_LOCK.format(build=str(ROOT / "decafa_fast" / "_build.py"), folder=str(folder), kill=kill)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    line = holder.stdout.readline()
    assert line.startswith("HOLDING"), line
    return holder


def test_a_lock_whose_holder_died_is_taken_over_at_once(tmp_path):
    from decafa_fast import _build

    holder = _hold_lock(tmp_path, kill=True)
    pid = holder.pid
    assert holder.wait(timeout=30) == -9
    assert f'"pid": {pid}' in (tmp_path / _build.LOCK_NAME).read_text()  # the record outlives its holder
    log = io.StringIO()
    start = time.perf_counter()
    lock = _build.BuildLock(tmp_path).acquire(log)
    assert time.perf_counter() - start < 2
    assert f"taking over the build lock {tmp_path / _build.LOCK_NAME} of PID {pid} on " in log.getvalue()
    assert f'"pid": {os.getpid()}' in (tmp_path / _build.LOCK_NAME).read_text()
    lock.release()
    assert (tmp_path / _build.LOCK_NAME).read_text() == ""


def test_a_live_holder_is_waited_for_and_named(tmp_path):
    from decafa_fast import _build

    holder = _hold_lock(tmp_path, kill=False)
    log = io.StringIO()
    start = time.perf_counter()
    lock = _build.BuildLock(tmp_path).acquire(log)
    waited = time.perf_counter() - start
    lock.release()
    assert holder.wait(timeout=30) == 0
    assert waited > 1, waited
    assert f"waiting for the build of the C++ extension by PID {holder.pid} on " in log.getvalue()
    assert "taking over" not in log.getvalue()  # released in order: nothing to take over


def test_a_killed_build_does_not_block_the_next_import(package_copy, tmp_path):
    """A build killed mid-way leaves its lock record and torch's own lock file (which made later imports wait
    15 minutes): the next first use takes the lock over, clears torch's and builds at once."""
    from decafa_fast import _build

    cache = tmp_path / "cache"
    build_dir = _installed(package_copy, cache).parent
    build_dir.mkdir(parents=True)
    holder = _hold_lock(build_dir, kill=True)
    assert holder.wait(timeout=30) == -9
    (build_dir / _build.TORCH_LOCK_NAME).touch()
    start = time.perf_counter()
    proc = _first_use(package_copy, cache)
    assert proc.returncode == 0 and "COMPILED" in proc.stdout and "MATCH" in proc.stdout, proc.stdout + proc.stderr
    assert f"taking over the build lock {build_dir / _build.LOCK_NAME} of PID {holder.pid}" in proc.stderr
    assert not (build_dir / _build.TORCH_LOCK_NAME).exists()
    assert time.perf_counter() - start < 240


def test_first_use_build_turned_off_names_a_damaged_library(tmp_path, monkeypatch):
    from decafa_fast import _build

    copy = _copy_checkout(tmp_path / "src", ("csrc", "kernels"))
    library = _install_prebuilt(copy, tmp_path / "cache")
    _truncate(library)
    monkeypatch.setenv("DECAFA_FIRST_USE_BUILD", "0")
    with pytest.raises(_build.BuildError, match=f"delete {library.parent}, or unset DECAFA_FIRST_USE_BUILD=0"):
        _build.load_or_build(copy, tmp_path / "cache")


def test_elf_completeness(tmp_path):
    from decafa_fast import _build

    whole = tmp_path / "whole.so"
    shutil.copyfile(_prebuilt(), whole)
    assert _build.elf_complete(whole)
    _truncate(whole)
    assert not _build.elf_complete(whole)
    whole.write_bytes(b"")
    assert not _build.elf_complete(whole)
    whole.write_bytes(os.urandom(4096))
    assert not _build.elf_complete(whole)
