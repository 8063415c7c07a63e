"""Compile checks of the CUDA code that run without a GPU (nvcc is enough).

* kernels/ on its own: CMake configure + build of the static library (sm_80 and sm_90) and the smoke
  executable, which is then run (on a machine without a GPU it says so and exits 0).
* csrc/cuda/*.cu, the torch glue, with nvcc -c against the installed torch's headers (a CPU wheel ships
  ATen/c10 CUDA headers too), one architecture, so that glue which would not build fails CI here.

Both compiles start at once (this machine has few cores); skipped with the reason when nvcc or cmake is
missing.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 900


def _find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and Path(home, "bin", "nvcc").is_file():
            return str(Path(home, "bin", "nvcc"))
    return None


NVCC = _find_nvcc()
CMAKE = shutil.which("cmake")
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (no CUDA toolkit on PATH or in CUDA_HOME)")


def _glue_command(out_dir: Path) -> list[str] | None:
    """nvcc -c for every csrc/cuda/*.cu with the flags torch.utils.cpp_extension would use, or None."""
    torch = pytest.importorskip("torch")
    from torch.utils import cpp_extension

    includes = cpp_extension.include_paths()
    if not any(Path(p, "c10", "cuda", "CUDAStream.h").is_file() for p in includes):
        return None
    sources = sorted(ROOT.glob("csrc/cuda/*.cu"))
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = [NVCC, "-std=c++20", "-arch=sm_90", "-c", "--use_fast_math", "-Xcompiler", "-fPIC",
           f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
           "-DDECAFA_WITH_CUDA=1",
           # a CPU wheel lacks c10/cuda/impl/cuda_cmake_macros.h (generated at build time); it only sets
           # export macros, which a compile check does not need
           "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
           *cpp_extension.COMMON_NVCC_FLAGS, f"-I{ROOT / 'kernels'}", f"-I{sys_include()}"]
    cmd += [f"-I{p}" for p in includes]
    # one nvcc call per source (nvcc -c with several inputs needs -odir); all sources in one shell line
    return [cmd + [str(src), "-o", str(out_dir / (src.stem + ".o"))] for src in sources]


def sys_include() -> str:
    import sysconfig

    return sysconfig.get_paths()["include"]


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Runs the CMake build of kernels/ and the glue compile concurrently; returns their results."""
    tmp = tmp_path_factory.mktemp("cuda_build")
    results: dict[str, subprocess.CompletedProcess | str] = {}

    glue_cmds = _glue_command(tmp)
    glue_procs = []
    if glue_cmds is None:
        results["glue"] = "the installed torch has no c10/cuda headers"
    else:
        for cmd in glue_cmds:
            glue_procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))

    if CMAKE is None:
        results["cmake"] = "cmake not found"
    else:
        build = tmp / "kernels"
        configure = subprocess.run(
            [CMAKE, "-S", str(ROOT), "-B", str(build), f"-DCMAKE_CUDA_COMPILER={NVCC}"],
            capture_output=True, text=True, timeout=TIMEOUT_S,
        )
        if configure.returncode != 0:
            results["cmake"] = configure
        else:
            results["cmake"] = subprocess.run(
                [CMAKE, "--build", str(build), "-j2"], capture_output=True, text=True, timeout=TIMEOUT_S
            )
        results["cmake_dir"] = str(build)

    if glue_procs:
        outputs, codes = [], []
        for proc in glue_procs:
            out, _ = proc.communicate(timeout=TIMEOUT_S)
            outputs.append(out)
            codes.append(proc.returncode)
        results["glue"] = subprocess.CompletedProcess(glue_cmds, max(codes), "\n".join(outputs), "")
        results["glue_objects"] = [str(tmp / (Path(c[-3]).stem + ".o")) for c in glue_cmds]
    return results


def _tail(text: str, n: int = 4000) -> str:
    return text[-n:]


def test_kernels_cmake_build(builds):
    res = builds["cmake"]
    if isinstance(res, str):
        pytest.skip(res)
    assert res.returncode == 0, "CMake build of kernels/ failed:\n" + _tail(res.stdout + res.stderr)
    build = Path(builds["cmake_dir"])
    assert (build / "libdecafa_kernels.a").is_file()
    smoke = build / "decafa_kernels_smoke"
    assert smoke.is_file()
    run = subprocess.run([str(smoke)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "decafa_kernels_smoke:" in run.stdout


def test_cuda_glue_compiles(builds):
    res = builds["glue"]
    if isinstance(res, str):
        pytest.skip(res)
    assert sorted(ROOT.glob("csrc/cuda/*.cu")), "no CUDA glue sources in csrc/cuda/"
    assert res.returncode == 0, "nvcc -c of csrc/cuda/*.cu failed:\n" + _tail(res.stdout)
    for obj in builds["glue_objects"]:
        assert Path(obj).is_file() and Path(obj).stat().st_size > 0, obj
