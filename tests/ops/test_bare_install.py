"""The bare install (`pip install decafa-fast`, no extra) is the op library: torch and numpy (and ninja, for the
first-use build), nothing of the face-alignment application.

- The metadata a build of this checkout gives a wheel or an install (setuptools' prepare_metadata_for_build_wheel,
  what pip runs) requires, outside the extras, only those distributions; the application's come with `app`.
- In a fresh venv that holds only torch, numpy, ninja and what they require (linked from this interpreter's
  site-packages) beside this checkout's decafa_fast, importing the library and running every op, forward and
  backward, on every CPU backend, and decafa_fast.nn, works and loads no OpenCV, matplotlib or tqdm (they are
  absent there, so an import of them, even one that catches its ImportError, is seen by an import hook; the
  attempts torch makes itself while it is imported, before decafa_fast, are not counted).
  That proves the library needs nothing else at run time; installing it (compiling _C) is the build tests'
  business, so this reuses the _C built in the checkout.
- The `decafa-fast` console script in that venv says in one line which extra to install.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "decafa_fast"
CORE = {"torch", "numpy", "ninja"}
APP_EXTRA = {"opencv-python-headless", "tqdm", "matplotlib"}
APP_MODULES = ("cv2", "matplotlib", "tqdm")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET", "PYTHONHOME")}
    env.update(extra)
    return env


@pytest.mark.slow
def test_the_bare_install_requires_torch_and_numpy_only(tmp_path):
    egg_info_before = (ROOT / "decafa_fast.egg-info").exists()
    code = ("import sys, setuptools.build_meta as b; "
            f"print(b.prepare_metadata_for_build_wheel({str(tmp_path)!r}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_clean_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    dist_info = tmp_path / proc.stdout.strip().splitlines()[-1]
    metadata = (dist_info / "METADATA").read_text()
    requirements = [Requirement(line.split(":", 1)[1].strip()) for line in metadata.splitlines()
                    if line.startswith("Requires-Dist:")]
    core = {_canonical(r.name) for r in requirements if r.marker is None or "extra" not in str(r.marker)}
    assert core == CORE, core

    def extra(name: str) -> set[str]:
        return {_canonical(r.name) for r in requirements if r.marker is not None and r.marker.evaluate({"extra": name})
                and "extra" in str(r.marker)}

    assert extra("app") == APP_EXTRA
    for name in ("bench", "export", "faces", "dev"):  # each pulls the application in
        assert any(_canonical(r.name) == "decafa-fast" and "app" in r.extras and r.marker.evaluate({"extra": name})
                   for r in requirements if r.marker is not None), name
    assert "triton" in extra("dev") | extra("gpu") and {"ruff", "pytest"} <= extra("dev") | extra("bench")
    entry_points = (dist_info / "entry_points.txt").read_text()
    assert re.search(r"^decafa-fast = decafa_fast\._cli:main$", entry_points, re.M), entry_points
    assert (ROOT / "decafa_fast.egg-info").exists() == egg_info_before  # it wrote nothing into the checkout


def _closure(names: set[str]) -> list[importlib.metadata.Distribution]:
    """The distributions `names` need (their requirements without extras, markers evaluated here), recursively."""
    seen: dict[str, importlib.metadata.Distribution] = {}
    todo = list(names)
    while todo:
        name = _canonical(todo.pop())
        if name in seen:
            continue
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # a requirement this platform's marker leaves out, or one torch lists but does not need
        seen[name] = dist
        for line in dist.requires or ():
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return list(seen.values())


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory) -> Path:
    """A venv with torch, numpy, ninja and their requirements linked in, and this checkout's decafa_fast."""
    if not list(PACKAGE.glob("_C*.so")) and not list(PACKAGE.glob("_C*.pyd")):
        pytest.skip("decafa_fast._C is not built in this checkout (the venv would compile it on first import)")
    home = tmp_path_factory.mktemp("bare") / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(home)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(home), "platbase": str(home)}))
    site.mkdir(parents=True, exist_ok=True)
    linked = set()
    for dist in _closure(CORE):
        tops = {Path(str(f)).parts[0] for f in dist.files or () if not str(f).startswith("..")}
        for top in tops:  # the dist's modules, its .dist-info (for importlib.metadata), its .libs
            source = Path(dist.locate_file(top))
            if top not in linked and top != "__pycache__" and source.exists():
                (site / top).symlink_to(source, target_is_directory=source.is_dir())
                linked.add(top)
    (site / "decafa_fast").symlink_to(PACKAGE, target_is_directory=True)
    python = home / "bin" / "python"
    assert python.exists(), python
    return python


RUN_EVERY_OP = r"""
import importlib.abc, importlib.util, json, sys

APP_MODULES = %r
tried = []

class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in APP_MODULES:
            tried.append(name)
        return None

sys.meta_path.insert(0, Watch())
absent = [m for m in APP_MODULES if importlib.util.find_spec(m) is not None]
tried.clear()

import torch

by_torch = sorted(set(tried))  # torch.hub tries tqdm, say: what torch does itself is not the library's doing
tried.clear()
import decafa_fast
from decafa_fast import nn, ops, reference

T = torch.randn(2, 3, 5, 6, requires_grad=True)
I = torch.randn(2, 1, 5, 6, requires_grad=True)
E = torch.randn(2, 4, 5, 6, requires_grad=True)
backends = [b for b in ("reference", "cpp") if ops.backends()[b] == "available"]
ran = []
for backend in backends:
    with ops.use_backend(backend):
        outputs = [ops.spatial_softmax(T, 0.5), ops.soft_argmax(T, normalized=True), ops.attention_mask(T),
                   *ops.landmark_attention(T), ops.fuse(I, E, ops.attention_mask(T), "F5"),
                   *ops.decafa_head(T, I, E, "F4", 2.0),
                   nn.SpatialSoftArgmax2d(temperature=0.5)(T), nn.spatial_soft_argmax2d(T),
                   nn.spatial_softmax2d(T), *nn.LandmarkAttention("F5")(T, I, E)]
        grads = torch.autograd.grad(sum(o.float().square().sum() for o in outputs), (T, I, E))
        assert all(torch.isfinite(g).all() for g in grads)
        ran.append(backend)
z = reference.soft_argmax(T.detach())
loaded = sorted({m.split(".")[0] for m in sys.modules} & set(APP_MODULES))
print(json.dumps({"present": absent, "by_torch": by_torch, "tried": tried, "loaded": loaded, "ran": ran,
                  "decafa_fast": decafa_fast.__file__, "app": sorted(m for m in sys.modules if ".app" in m)}))
"""


@pytest.mark.slow
def test_the_ops_and_nn_run_without_the_application(bare_python):
    proc = subprocess.run([str(bare_python), "-c", RUN_EVERY_OP % (APP_MODULES,)], cwd=ROOT.parent, env=_clean_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["present"] == [], f"the venv is not bare: {result['present']}"
    assert Path(result["decafa_fast"]).resolve().parent == PACKAGE  # this checkout's package
    assert result["ran"] == ["reference", "cpp"]  # the compiled kernels too, not only the reference
    assert result["tried"] == [] and result["loaded"] == [] and result["app"] == [], result


@pytest.mark.slow
def test_the_console_script_without_the_app_extra_names_it(bare_python):
    code = "import sys; from decafa_fast._cli import main; sys.exit(main(['info']))"
    proc = subprocess.run([str(bare_python), "-c", code], cwd=ROOT.parent, env=_clean_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stdout == "" and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert 'pip install "decafa-fast[app]"' in proc.stderr and "Traceback" not in proc.stderr
    assert "opencv-python-headless, tqdm, matplotlib" in proc.stderr


def test_the_console_script_hands_over_to_the_application_when_it_is_installed(capsys):
    pytest.importorskip("cv2")
    pytest.importorskip("tqdm")
    pytest.importorskip("matplotlib")
    from decafa_fast import _cli

    assert _cli.missing_app_modules() == []
    assert _cli.main(["info"]) == 0
    assert capsys.readouterr().out.startswith("decafa-fast ")
