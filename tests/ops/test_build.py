"""Both ways decafa_fast._C gets built (decafa_fast/_build.py): by setup.py at install when the build can import
torch, and on first import when it cannot (a plain, build-isolated `pip install`). The first-use build runs
on a copy of the package and sources in a temporary folder, so the checkout's built _C is never touched."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
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


def test_a_killed_build_leaves_no_lock_that_blocks_the_next(tmp_path):
    """torch's build lock outlives a killed build; a later first use removes it once nothing has been written in
    that build folder for a while, and leaves the lock of a build that is still writing."""
    from decafa_fast import _build

    folder = tmp_path / "build"
    folder.mkdir()
    (folder / "lock").touch()
    (folder / "attention.o").write_bytes(b"")
    assert not _build.clear_stale_lock(folder)  # just written: a build may be running
    old = time.time() - _build.STALE_LOCK_S - 60
    for path in folder.iterdir():
        os.utime(path, (old, old))
    assert _build.clear_stale_lock(folder) and not (folder / "lock").exists()
    assert not _build.clear_stale_lock(folder)  # no lock: nothing to do


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
