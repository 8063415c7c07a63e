"""Checks of the CUDA code that run without a GPU.

* kernels/ on its own: CMake configure + build (nvcc, sm_80 and sm_90) of the static library and the smoke
  executable, which is then run (on a machine without a GPU it says so and exits 0).
* csrc/cuda/*.cu, the torch glue: nvcc -c against the installed torch's headers (a CPU wheel ships the
  ATen/c10 CUDA headers too), one architecture, so that glue which would not build fails here.
* The kernels' logic: kernels/*.cu and the smoke test compiled with g++ against
  kernels/smoke/cpu_emulation.h (CUDA threads as fibers, barriers and warp shuffles emulated), then run:
  every launcher against a CPU double-precision reference, float32/float16/bfloat16, on the vector and the
  scalar paths (EMU_SM_COUNT=1 and 132 steer the pixel kernels' vector width), with the run kernels and with the
  ring kernels (DECAFA_CUDA_MAPS=ring; cp.async copies landing at their wait, or at issue with EMU_ASYNC=eager).
* The bytes each kernel moves: the emulation counts every lane of every global load and store; at the paper
  shape (L = 98, 128 x 128, C = 64, Ci = 1, F5) the fused head's forward must stay within 1.10x its floor
  and forward + backward within 1.15x (issue 13), float32 and bfloat16, NCHW and channels_last, for the
  launch configuration an H100 picks at B = 64. The emulation also counts accesses per width: channels_last
  T must be read a pair of maps per access there (8 bytes in float32, 4 in bfloat16); at B = 1 on an H100
  (132 SMs) pixels_forward must keep 16-byte accesses (channel groups across CTAs, not narrower vectors).

All compiles start at once (this machine has few cores). Each check skips with the reason when its tool
(nvcc, cmake, g++, the CUDA headers) is missing.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 900


def _find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and Path(home, "bin", "nvcc").is_file():
            return str(Path(home, "bin", "nvcc"))
    return None


def _find_cuda_include() -> Path | None:
    """The CUDA toolkit's include directory (cuda_runtime.h, cuda_fp16.h, cuda_bf16.h)."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    if NVCC:
        homes.append(str(Path(NVCC).resolve().parents[1]))
    for home in homes:
        if home and Path(home, "include", "cuda_runtime.h").is_file():
            return Path(home, "include")
    return None


NVCC = _find_nvcc()
CMAKE = shutil.which("cmake")
GXX = shutil.which("g++")
CUDA_INCLUDE = _find_cuda_include()


def _glue_commands(out_dir: Path) -> list[list[str]] | str:
    """One nvcc -c per csrc/cuda/*.cu with the flags torch.utils.cpp_extension uses, or why not."""
    if NVCC is None:
        return "nvcc not found"
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        return f"torch is not importable: {exc}"
    includes = cpp_extension.include_paths()
    if not any(Path(p, "c10", "cuda", "CUDAStream.h").is_file() for p in includes):
        return "the installed torch has no c10/cuda headers"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    base = [NVCC, "-std=c++20", "-arch=sm_90", "-c", "--use_fast_math", "-Xcompiler", "-fPIC",
            f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C",
            "-DDECAFA_WITH_CUDA=1",
            # a CPU wheel lacks c10/cuda/impl/cuda_cmake_macros.h (generated when torch is built); it only
            # sets export macros, which a compile check does not need
            "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
            *cpp_extension.COMMON_NVCC_FLAGS, f"-I{ROOT / 'kernels'}", *[f"-I{p}" for p in includes]]
    return [base + [str(src), "-o", str(out_dir / (src.stem + ".o"))] for src in sorted(ROOT.glob("csrc/cuda/*.cu"))]


def _emulation_sources(out_dir: Path) -> Path:
    """kernels/*.cu and the smoke test as one C++ file for g++: launches and the dynamic shared-memory
    declaration rewritten for kernels/smoke/cpu_emulation.h. Returns the file."""
    parts = []
    for src in sorted(ROOT.glob("kernels/*.cu")):
        text = src.read_text()
        text, launches = re.subn(r"(\w+(?:<[^<>]*>)?)<<<(.*?)>>>\(", r'::emu::launch("\1", \1, \2, ', text, flags=re.S)
        text = text.replace("extern __shared__ __align__(16) unsigned char smem_raw[];",
                            "unsigned char* smem_raw = ::emu::dynamic_smem();")
        assert "<<<" not in text and "extern __shared__" not in text, f"{src.name}: unhandled CUDA syntax"
        dst = out_dir / (src.stem + ".cpp")
        dst.write_text(text)
        parts.append(f'#include "{dst.name}"')
    smoke = out_dir / "smoke_test.cpp"
    smoke.write_text((ROOT / "kernels" / "smoke" / "smoke_test.cu").read_text())
    parts.append(f'#include "{smoke.name}"')
    combined = out_dir / "emulated.cpp"
    combined.write_text("\n".join(parts) + "\n")
    return combined


def _fma_flags() -> list[str]:
    """g++ flags that contract a * b + c into one FMA as nvcc does by default (its --fmad=true), so that the
    emulation rounds like the GPU where that matters (a one-pixel map's Phi must stay exactly 1 in the
    backward). -ffp-contract=fast alone is not enough: GCC forms FMAs only with -fexpensive-optimizations and
    an FMA target; -mfma only where this CPU has FMA (else the binary could not run here)."""
    try:
        has_fma = " fma " in Path("/proc/cpuinfo").read_text().replace("\n", " ")
    except OSError:
        has_fma = False
    return ["-ffp-contract=fast", "-fexpensive-optimizations"] + (["-mfma"] if has_fma else [])


def _start(cmd: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def _finish(procs: list[subprocess.Popen]) -> tuple[int, str]:
    outputs, codes = [], []
    for proc in procs:
        out, _ = proc.communicate(timeout=TIMEOUT_S)
        outputs.append(out)
        codes.append(proc.returncode)
    return max(codes, default=0), "\n".join(outputs)


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Starts the glue compile and the emulation compile, runs the CMake build meanwhile, and collects all.
    Each entry is (returncode, output, extra) or a string saying why it was skipped."""
    tmp = tmp_path_factory.mktemp("cuda_build")
    results: dict[str, object] = {}

    glue = _glue_commands(tmp)
    glue_procs = [_start(cmd) for cmd in glue] if isinstance(glue, list) else []

    emu_procs = []
    if GXX is None or CUDA_INCLUDE is None:
        results["emulation"] = "g++ or the CUDA headers (cuda_runtime.h) not found"
    else:
        emulated = _emulation_sources(tmp)
        binary = tmp / "smoke_emulated"
        emu_procs = [_start([GXX, "-std=c++20", "-O1", *_fma_flags(), "-w", "-include",
                             str(ROOT / "kernels" / "smoke" / "cpu_emulation.h"), f"-I{ROOT / 'kernels'}",
                             f"-I{CUDA_INCLUDE}", str(emulated), "-o", str(binary)], cwd=tmp)]

    if NVCC is None or CMAKE is None:
        results["cmake"] = "nvcc or cmake not found"
    else:
        build = tmp / "kernels"
        configure = subprocess.run([CMAKE, "-S", str(ROOT), "-B", str(build), f"-DCMAKE_CUDA_COMPILER={NVCC}"],
                                   capture_output=True, text=True, timeout=TIMEOUT_S)
        if configure.returncode != 0:
            results["cmake"] = (configure.returncode, configure.stdout + configure.stderr, build)
        else:
            made = subprocess.run([CMAKE, "--build", str(build), "-j2"], capture_output=True, text=True,
                                  timeout=TIMEOUT_S)
            results["cmake"] = (made.returncode, made.stdout + made.stderr, build)

    results["glue"] = (*_finish(glue_procs), tmp) if glue_procs else (glue if isinstance(glue, str) else
                                                                      "no csrc/cuda/*.cu sources")
    if emu_procs:
        results["emulation"] = (*_finish(emu_procs), tmp / "smoke_emulated")
    return results


def _result(builds, key):
    res = builds[key]
    if isinstance(res, str):
        pytest.skip(res)
    return res


@pytest.mark.slow
def test_kernels_cmake_build(builds):
    code, output, build = _result(builds, "cmake")
    assert code == 0, "CMake build of kernels/ failed:\n" + output[-4000:]
    assert (build / "libdecafa_kernels.a").is_file()
    smoke = build / "decafa_kernels_smoke"
    run = subprocess.run([str(smoke), "--quick"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "decafa_kernels_smoke:" in run.stdout


@pytest.mark.slow
def test_cuda_glue_compiles(builds):
    code, output, out_dir = _result(builds, "glue")
    assert code == 0, "nvcc -c of csrc/cuda/*.cu failed:\n" + output[-4000:]
    for src in ROOT.glob("csrc/cuda/*.cu"):
        obj = out_dir / (src.stem + ".o")
        assert obj.is_file() and obj.stat().st_size > 0, obj


def _map_launches(stdout: str) -> dict[str, int]:
    """The smoke test's 'forward launches K N K N' and 'backward launches K N K N' lines -> {kernel: launches}."""
    out = {}
    for line in stdout.splitlines():
        parts = line.split()
        if parts[1:2] == ["launches"] and parts[0] in ("forward", "backward"):
            out.update({parts[i]: int(parts[i + 1]) for i in range(2, len(parts), 2)})
    assert len(out) == 4, "no launch counts:\n" + stdout[-2000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize(("maps", "sm_count", "async_mode"), [
    ("onchip", "1", ""), ("onchip", "132", ""),
    # the ring: one batch element per CTA (1 SM), ranges across batch elements (5), one map per CTA (132);
    # cp.async copies landing at the wait (default) or at issue (eager)
    ("ring", "1", ""), ("ring", "5", ""), ("ring", "132", ""), ("ring", "5", "eager")])
def test_kernels_on_cpu_emulation(builds, maps, sm_count, async_mode):
    """Every launcher against the CPU reference, run through the CUDA emulation (vector width of the pixel
    kernels: the widest with EMU_SM_COUNT=1, scalar for small grids with 132), with the on-chip run kernels
    and with the ring kernels (DECAFA_CUDA_MAPS=ring), which must then run for the NCHW cases they cover."""
    code, output, binary = _result(builds, "emulation")
    assert code == 0, "g++ build of the emulated kernels failed:\n" + output[-4000:]
    env = dict(os.environ, EMU_SM_COUNT=sm_count, DECAFA_CUDA_MAPS=maps, EMU_ASYNC=async_mode)
    env.pop("DECAFA_CUDA_BATCH_CHUNK", None)
    run = subprocess.run([str(binary), "--quick"], capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "all cases passed" in run.stdout
    launches = _map_launches(run.stdout)
    if maps == "ring":
        # the whole-tile NCHW cases: head, attention and softmax forwards; head and z-only backwards (the per-map
        # and 16-bit mask gradients take the run kernels)
        assert launches["maps_forward_ring"] == 21 and launches["maps_backward_ring"] == 14, launches
        assert launches["maps_forward_onchip"] > 0, launches  # channels_last T and shapes the ring leaves
    else:
        assert launches["maps_forward_ring"] == 0 and launches["maps_backward_ring"] == 0, launches


# The runs of maps per batch element an H100 (132 multiprocessors) picks at B = 64: the traffic test counts
# that configuration at a small batch (the ratios do not depend on B once the runs are fixed).
H100_SMS, H100_BATCH = "132", 64
TRAFFIC_LIMITS = {"forward": 1.10, "fwd+bwd": 1.15}


def _widths(field: str) -> dict[int, int]:
    """'4:10,8:20' -> {4: 10, 8: 20} (bytes per access -> accesses); '-' -> {}."""
    return {} if field == "-" else {int(w): int(n) for w, n in (x.split(":") for x in field.split(","))}


def _traffic(binary, batch: int, runs: str, layout: str = "nchw") -> dict:
    env = dict(os.environ, DECAFA_CUDA_RUNS=runs)
    run = subprocess.run([str(binary), "--traffic", str(batch), layout], capture_output=True, text=True,
                         timeout=600, env=env)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    out = {"kernels": [], "summary": {}, "load_widths": {}}
    dtype = None
    for line in run.stdout.splitlines():
        parts = line.split()
        if parts[:2] == ["traffic", "dtype"]:
            dtype = parts[2]
        if parts[:2] == ["traffic", "summary"]:
            # traffic summary DTYPE forward N floor N ratio R fwd+bwd N floor N ratio R
            out["summary"][parts[2]] = {"forward": float(parts[8]), "fwd+bwd": float(parts[14]),
                                        "forward_bytes": int(parts[4]), "fwd+bwd_bytes": int(parts[10])}
        elif parts[:1] == ["traffic"] and parts[1] in ("forward", "backward"):
            # traffic PASS KERNEL LAUNCHES LOADED STORED loads W:N,... stores W:N,...
            out["kernels"].append(parts[1:6])
            out["load_widths"][(dtype, parts[2])] = _widths(parts[7])
    return out


@pytest.mark.slow
def test_ring_traffic_at_the_paper_shape(builds):
    """The ring kernels' counted bytes at the paper shape (NCHW), B = 2 over 5 SMs: ranges of 39-40 maps, three
    partial planes per batch element, as an H100 gets at B = 64 (132 ranges of 47-48 maps: 3.06 planes per
    element); T read once per pass in 16-byte cp.async copies, within 1.10x / 1.15x of the floor."""
    code, output, binary = _result(builds, "emulation")
    assert code == 0, "g++ build of the emulated kernels failed:\n" + output[-4000:]
    env = dict(os.environ, EMU_SM_COUNT="5", DECAFA_CUDA_MAPS="ring")
    run = subprocess.run([str(binary), "--traffic", "2", "nchw"], capture_output=True, text=True, timeout=600,
                         env=env)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    out = {"summary": {}, "kernels": {}}
    dtype = None
    for line in run.stdout.splitlines():
        parts = line.split()
        if parts[:2] == ["traffic", "dtype"]:
            dtype = parts[2]
        elif parts[:2] == ["traffic", "summary"]:
            out["summary"][parts[2]] = {"forward": float(parts[8]), "fwd+bwd": float(parts[14])}
        elif parts[:1] == ["traffic"] and parts[1] in ("forward", "backward"):
            out["kernels"][(dtype, parts[2])] = (int(parts[4]), int(parts[5]), _widths(parts[7]))
    t_values = 2 * 98 * 128 * 128
    for dtype, size in (("float32", 4), ("bfloat16", 2)):
        for pass_, limit in TRAFFIC_LIMITS.items():
            assert out["summary"][dtype][pass_] <= limit, (dtype, pass_, out["summary"])
        loaded, stored, widths = out["kernels"][(dtype, "maps_forward_ring")]
        assert widths == {16: t_values * size // 16}, widths  # T once, 16 bytes a copy, nothing else
        # stats and z, and the partial masks: 3 planes per batch element
        assert stored == 2 * 98 * (8 + 2 * size) + 2 * 3 * 128 * 128 * 4, stored
        # backward: T once (16-byte copies), the mask gradient once per batch element of a range (16-byte loads)
        # and the per-map stats and grad z (4-byte copies); grad T out in 16-byte stores
        loaded, stored, widths = out["kernels"][(dtype, "maps_backward_ring")]
        assert widths[16] == t_values * size // 16 + 6 * 128 * 128 * 4 // 16, widths
        assert set(widths) == {4, 16} and widths[4] == 2 * 98 * (2 + (2 if size == 4 else 1)), widths
        assert stored == t_values * size + 2 * 98 * 4, stored
    assert not any(k[1].endswith("_onchip") for k in out["kernels"]), out["kernels"]


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_traffic_at_the_paper_shape(builds, layout):
    """Counted bytes of every kernel of the fused head against the floor (read T, I, E, write z, F; backward:
    read grad F, grad z, T, I, E, M, stats, write grad T, grad I, grad E), with T, I, E, F and the gradients
    NCHW or channels_last."""
    code, output, binary = _result(builds, "emulation")
    assert code == 0, "g++ build of the emulated kernels failed:\n" + output[-4000:]
    picked = subprocess.run([str(binary), "--runs", str(H100_BATCH)], capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, EMU_SM_COUNT=H100_SMS)).stdout.split()
    assert picked[0] == "runs", picked
    runs = picked[1]
    one, two = _traffic(binary, 1, runs, layout), _traffic(binary, 2, runs, layout)
    for dtype in ("float32", "bfloat16"):
        for pass_, limit in TRAFFIC_LIMITS.items():
            ratio = two["summary"][dtype][pass_]
            assert ratio <= limit, f"{dtype} {pass_}: {ratio:.4f}x the floor's bytes > {limit}x\n{two}"
            assert abs(ratio - one["summary"][dtype][pass_]) < 1e-3, "the ratio depends on B"
        assert two["summary"][dtype]["forward_bytes"] == 2 * one["summary"][dtype]["forward_bytes"]
    # two launches per pass, none per chunk
    launches = [(p, int(n)) for p, _, n, *_ in two["kernels"]]
    assert sum(n for p, n in launches if p == "forward") == 4  # 2 per dtype
    assert sum(n for p, n in launches if p == "backward") == 4
    # how T is read: 16-byte vectors of one map (NCHW), or one access per pixel for a pair of maps
    # (channels_last: L = 98 is even and the buffer aligned, so every map comes in a pair)
    t_values = 2 * 98 * 128 * 128
    for dtype, size in (("float32", 4), ("bfloat16", 2)):
        fwd = two["load_widths"][(dtype, "maps_forward_onchip")]
        bwd = two["load_widths"][(dtype, "maps_backward_onchip")]
        width = 16 if layout == "nchw" else 2 * size
        assert fwd == {width: t_values * size // width}, (dtype, fwd)  # T only, all at that width
        assert bwd.get(width, 0) >= t_values * size // width, (dtype, bwd)
        # no scalar T: narrower loads are only the run's mask-gradient planes (scalars on the channels_last
        # path) and the per-map stats / grad z
        assert sum(n for w, n in bwd.items() if w < width) <= int(runs) * 2 * 128 * 128 + 4 * 2 * 98, (dtype, bwd)


@pytest.mark.slow
@pytest.mark.parametrize("maps", ["onchip", "ring"])
def test_pixels_forward_at_batch_one(builds, maps):
    """B = 1 at the paper shape on an H100 (132 SMs; 98 partial planes, one a map, from the run kernels or the
    ring): the pixel tiles alone are 64 CTAs (float32) / 32 (bfloat16), so pixels_forward splits the channels
    over the fewest power-of-two groups that reach 132 CTAs and keeps 16-byte loads and stores (NCHW);
    pixels_mask sums the 98 planes once (M, and M in float32 over the first plane), and every group reads that
    float32 M: P + 1 + groups planes instead of groups * P."""
    code, output, binary = _result(builds, "emulation")
    assert code == 0, "g++ build of the emulated kernels failed:\n" + output[-4000:]
    env = dict(os.environ, EMU_SM_COUNT=H100_SMS, DECAFA_CUDA_MAPS=maps)
    env.pop("DECAFA_CUDA_RUNS", None)
    run = subprocess.run([str(binary), "--traffic", "1", "nchw"], capture_output=True, text=True, timeout=600,
                         env=env)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    kernels, dtype = {}, None
    for line in run.stdout.splitlines():
        parts = line.split()
        if parts[:2] == ["traffic", "dtype"]:
            dtype = parts[2]
        elif parts[:1] == ["traffic"] and parts[1] in ("forward", "backward"):
            kernels[(dtype, parts[2])] = (int(parts[3]), int(parts[4]), int(parts[5]), _widths(parts[7]),
                                          _widths(parts[9]))
    hw, planes, channels = 128 * 128, 98, 1 + 64  # Ci + C read, 2 (Ci + C) written (F5)
    for dtype, size in (("float32", 4), ("bfloat16", 2)):
        tiles = hw // (64 * (16 // size))
        groups = 1
        while tiles * groups < int(H100_SMS):
            groups *= 2
        launches, loaded, stored, loads, stores = kernels[(dtype, "pixels_forward")]
        assert launches == 1
        assert set(loads) == {16} and set(stores) == {16}, (dtype, loads, stores)
        assert loaded == groups * hw * 4 + channels * hw * size, (dtype, loaded)  # float32 M per group, I, E
        assert stored == 2 * channels * hw * size, (dtype, stored)  # F only: M comes from pixels_mask
        launches, loaded, stored, _, _ = kernels[(dtype, "pixels_mask")]
        assert launches == 1 and loaded == planes * hw * 4, (dtype, loaded)
        assert stored == hw * (size + 4), (dtype, stored)  # M, and M in float32 for the groups
