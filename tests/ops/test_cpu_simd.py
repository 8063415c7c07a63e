"""The CPU kernels' SIMD cannot change silently (csrc/cpu/isa.h, csrc/cpu/map_math.h):

- a build with -ffast-math (or any flag that drops IEEE semantics the exp relies on) stops with an error;
- DECAFA_CPU_ISA forces the clone (avx512, avx2, baseline), read once; a bad value or an ISA the CPU lacks
  warns and falls back, never crashes; the extension reports the clone it runs (`decafa_cpu_isa`);
- each clone of the built extension holds vector code of its width (objdump), so a loop that stopped
  vectorising shows up here;
- (slow) the kernels, through every clone, run clean under -fsanitize=undefined on maps holding NaN, +-inf
  and huge values (tests/ops/cpu_simd_harness.cpp), vexp stays within the error bounds vexp.h states, and
  the same holds for a clang++ build.

.ci/cpu_isa_clones.sh runs the CPU op tests once per clone.
"""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CPU = ROOT / "csrc" / "cpu"
HARNESS = Path(__file__).with_name("cpu_simd_harness.cpp")
CLONES = ("avx512", "avx2", "baseline")
GXX = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")


def torch_includes() -> list[str]:
    from torch.utils.cpp_extension import include_paths

    return [f"-I{p}" for p in include_paths()]


def extension_library() -> Path:
    """The loaded decafa_fast._C (the in-place/installed module or the first-use build)."""
    from decafa_fast import ops

    ops.backends()  # loads the extension where it is built
    try:
        from decafa_fast import _C
    except ImportError:
        _C = None
    if _C is not None and getattr(_C, "__file__", None):
        return Path(_C.__file__)
    with open("/proc/self/maps") as maps:
        for line in maps:
            if "decafa_fast_C" in line or "decafa_fast/_C" in line:
                return Path(line.split()[-1])
    pytest.skip("decafa_fast._C is not loaded in this process")


# --------------------------------------------------------------------------------------------------
# Fast math refused
# --------------------------------------------------------------------------------------------------
def syntax_check(compiler: str, flags: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    tu = tmp_path / "uses_map_math.cpp"
    tu.write_text(f'#include "{CPU / "map_math.h"}"\n')
    return subprocess.run([compiler, "-std=c++20", "-fsyntax-only", *flags, *torch_includes(),
                           f"-I{ROOT / 'kernels'}", str(tu)], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(GXX is None, reason="no C++ compiler")
@pytest.mark.parametrize("flags", [["-ffast-math"], ["-Ofast"], ["-ffinite-math-only"],
                                   ["-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math"],
                                   ["-fno-signed-zeros"]])
def test_fast_math_build_is_refused(flags, tmp_path):
    got = syntax_check(GXX, flags, tmp_path)
    assert got.returncode != 0, f"map_math.h compiled with {flags}"
    assert "need IEEE float semantics" in got.stderr, got.stderr[-2000:]


@pytest.mark.skipif(GXX is None, reason="no C++ compiler")
def test_the_build_flags_are_accepted(tmp_path):
    """The control: the extension's own flags (decafa_fast/_build.py) pass the same check."""
    from decafa_fast._build import CXX_FLAGS

    got = syntax_check(GXX, [f for f in CXX_FLAGS if f != "-std=c++20"], tmp_path)
    assert got.returncode == 0, got.stderr[-2000:]


# --------------------------------------------------------------------------------------------------
# DECAFA_CPU_ISA
# --------------------------------------------------------------------------------------------------
def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    match = re.search(r"^flags\s*:(.*)$", text, re.M)
    return set(match.group(1).split()) if match else set()


def best_clone_here() -> str:
    """What the CPU supports, from /proc/cpuinfo (independent of the C++ cpuid check it tests)."""
    flags = cpu_flags()
    v3 = {"avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe", "abm", "sse4_2", "popcnt"}
    v4 = {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
    if v3 <= flags and v4 <= flags:
        return "avx512"
    return "avx2" if v3 <= flags else "baseline"


def active_isa() -> str:
    """The clone the loaded extension runs (decafa_cpu_isa, csrc/cpu/isa.cpp)."""
    lib = ctypes.CDLL(str(extension_library()))
    lib.decafa_cpu_isa.restype = ctypes.c_char_p
    return lib.decafa_cpu_isa().decode()


CHILD = """
import sys, torch
from decafa_fast import ops, reference
sys.path.insert(0, {tests!r})
from test_cpu_simd import active_isa
ops.set_backend("cpp")
t = torch.randn(2, 3, 16, 16, dtype=torch.float32)
z = ops.soft_argmax(t, 0.7)
torch.testing.assert_close(z, reference.soft_argmax(t, 0.7), rtol=1e-5, atol=1e-5)
print("isa=" + active_isa())
"""


def run_child(value: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("DECAFA_CPU_ISA", None)
    if value is not None:
        env["DECAFA_CPU_ISA"] = value
    code = CHILD.format(tests=str(Path(__file__).parent))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def reported_isa(got: subprocess.CompletedProcess) -> str:
    assert got.returncode == 0, got.stderr[-3000:]
    match = re.search(r"^isa=(\w+)$", got.stdout, re.M)
    assert match, got.stdout
    return match.group(1)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/cpuinfo")
@pytest.mark.parametrize("value", [*CLONES, "auto", None])
def test_forced_isa_is_the_one_that_runs(value):
    """Each setting runs (and the op is right under) the clone it names, or the best one the CPU has, with a
    warning naming the variable when it cannot honour the request."""
    best = best_clone_here()
    got = run_child(value)
    if value in (None, "auto"):
        assert reported_isa(got) == best
        assert "DECAFA_CPU_ISA" not in got.stderr
    elif CLONES.index(value) >= CLONES.index(best):
        assert reported_isa(got) == value
        assert "DECAFA_CPU_ISA" not in got.stderr
    else:
        assert reported_isa(got) == best
        assert f"DECAFA_CPU_ISA={value} asks for an ISA this CPU lacks" in got.stderr


@pytest.mark.parametrize("value", ["AVX512", "sse4", "avx-512", " "])
def test_bad_isa_value_warns_and_falls_back(value):
    got = run_child(value)
    assert reported_isa(got) == best_clone_here()
    assert f"DECAFA_CPU_ISA={value} is not one of avx512, avx2, baseline, auto" in got.stderr, got.stderr


@pytest.mark.skipif(GXX is None, reason="no C++ compiler")
def test_choice_falls_back_on_a_cpu_that_lacks_the_isa(tmp_path):
    """choose_isa on every (request, CPU) pair, the CPUs this machine is not included (isa.cpp alone)."""
    main = tmp_path / "choose.cpp"
    main.write_text(f"""#include "{CPU / 'isa.h'}"
#include <cstdio>
using namespace decafa::cpu;
int main() {{
  const char* requests[] = {{nullptr, "", "auto", "avx512", "avx2", "baseline", "AVX2", "x"}};
  for (Isa best : {{Isa::kBaseline, Isa::kAvx2, Isa::kAvx512}})
    for (const char* r : requests) {{
      auto [isa, warning] = choose_isa(r, best);
      std::printf("%s|%s|%s|%s\\n", isa_name(best), r ? r : "(unset)", isa_name(isa), warning.c_str());
    }}
}}
""")
    exe = tmp_path / "choose"
    subprocess.run([GXX, "-std=c++20", "-O1", str(main), str(CPU / "isa.cpp"), "-o", str(exe)], check=True,
                   timeout=120)
    rows = [line.split("|") for line in subprocess.run([str(exe)], capture_output=True, text=True,
                                                         check=True).stdout.splitlines()]
    assert len(rows) == 24
    for best, request, chosen, warning in rows:
        if request in ("(unset)", "", "auto"):
            assert (chosen, warning) == (best, "")
        elif request in CLONES and CLONES.index(request) >= CLONES.index(best):
            assert (chosen, warning) == (request, "")
        elif request in CLONES:
            assert chosen == best and f"DECAFA_CPU_ISA={request} asks for an ISA" in warning
        else:
            assert chosen == best and "is not one of avx512, avx2, baseline, auto" in warning


# --------------------------------------------------------------------------------------------------
# Each clone vectorised
# --------------------------------------------------------------------------------------------------
KERNELS = ("scaled_max", "exp_sums", "recompute_phi", "softmax_grad", "phi_with_sums", "landmark_grad",
           "store_scaled", "accumulate_group", "sum_partial_masks", "fuse_tile", "fuse_tile_backward")


def clone_registers(library: Path) -> dict[tuple[str, str], set[str]]:
    """{(kernel, clone): the vector register widths ("xmm", "ymm", "zmm") its instantiations use}."""
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(library)], capture_output=True, text=True,
                             check=True, timeout=300).stdout
    found: dict[tuple[str, str], set[str]] = {}
    current = None
    for line in listing.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            symbol = header.group(1)
            current = None
            for kernel in KERNELS:
                match = re.search(rf"\d{kernel}_(avx512|avx2|baseline)I", symbol)
                if match:
                    current = (kernel, match.group(1))
                    found.setdefault(current, set())
            continue
        if current is not None:
            found[current].update(re.findall(r"%([xyz]mm)\d", line))
    return found


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) is not installed")
@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the clones are x86-64's")
def test_each_clone_holds_vectors_of_its_width():
    """The hot loops vectorised in every clone: each kernel's AVX-512 clone uses zmm registers, its AVX2 clone
    ymm and no zmm, its baseline clone neither (a loop that falls back to scalar code, e.g. after a change
    that stops GCC vectorising the exp, leaves the clone without its wide registers). The same count by hand:
    objdump -d decafa_fast/_C*.so | grep -c zmm"""
    found = clone_registers(extension_library())
    for kernel in KERNELS:
        for clone in CLONES:
            assert (kernel, clone) in found, f"no {clone} clone of {kernel} in the extension"
        assert "zmm" in found[(kernel, "avx512")], f"{kernel}'s AVX-512 clone has no 512-bit vector code"
        assert "ymm" in found[(kernel, "avx2")], f"{kernel}'s AVX2 clone has no 256-bit vector code"
        assert "zmm" not in found[(kernel, "avx2")], f"{kernel}'s AVX2 clone uses AVX-512 registers"
        assert not {"ymm", "zmm"} & found[(kernel, "baseline")], f"{kernel}'s baseline clone needs AVX"


# --------------------------------------------------------------------------------------------------
# The harness: undefined behaviour, clang
# --------------------------------------------------------------------------------------------------
def build_harness(compiler: str, flags: list[str], out: Path) -> Path:
    exe = out / "cpu_simd_harness"
    cmd = [compiler, "-std=c++20", "-fopenmp-simd", "-fno-trapping-math", *flags, *torch_includes(),
           f"-I{ROOT / 'kernels'}", str(HARNESS), str(CPU / "isa.cpp"), "-o", str(exe)]
    got = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert got.returncode == 0, f"{' '.join(cmd)}\n{got.stderr[-4000:]}"
    return exe


def run_harness(exe: Path, mode: str) -> str:
    got = subprocess.run([str(exe), mode], capture_output=True, text=True, timeout=600)
    assert got.returncode == 0 and "runtime error" not in got.stderr, got.stdout + got.stderr[-4000:]
    assert got.stdout.strip().endswith("ok"), got.stdout
    return got.stdout


def check_exp_error(exe: Path) -> None:
    """vexp within vexp.h's kExpBounds in each precision, through each clone this CPU runs."""
    out = run_harness(exe, "exp-error")
    rows = re.findall(r"^exp (\w+) precision=(\d) max_ulp=(\S+) max_relative=(\S+)", out, re.M)
    assert {precision for _, precision, _, _ in rows} == {"0", "1", "2"}, out
    assert {clone for clone, _, _, _ in rows} >= {"baseline"}, out


@pytest.mark.slow
@pytest.mark.skipif(GXX is None, reason="no C++ compiler")
def test_sweeps_clean_under_undefined_behaviour_sanitizer(tmp_path):
    """Every kernel through every clone on NaN, +-inf and huge logits; any report of -fsanitize=undefined
    (float-to-int conversions of NaN included: GCC leaves float-cast-overflow out of "undefined") aborts."""
    exe = build_harness(GXX, ["-O1", "-g", "-fsanitize=undefined,float-cast-overflow", "-fno-sanitize-recover=all"],
                        tmp_path)
    out = run_harness(exe, "sweeps")
    for dtype in ("float64", "float32", "float16", "bfloat16"):
        assert re.search(rf"^{dtype} ", out, re.M), out
    check_exp_error(exe)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("clang++") is None, reason="clang++ is not installed")
def test_clang_build_runs_the_sweeps(tmp_path):
    """clang++ compiles the kernels with the same clones (the target attribute, not GCC's target_clones), they
    pass the sweeps and vexp's bounds, and the forced ISA works there too. (clang 14 vectorises the exp
    sweeps but leaves the float max sweep, a max that skips NaN, and float64's std::exp scalar, with a
    -Wpass-failed warning: a clang build is correct, a GCC build the faster.)"""
    exe = build_harness("clang++", ["-O2"], tmp_path)
    run_harness(exe, "sweeps")
    check_exp_error(exe)
    for value in CLONES:
        env = dict(os.environ, DECAFA_CPU_ISA=value)
        got = subprocess.run([str(exe), "isa"], capture_output=True, text=True, env=env, check=True)
        best = re.search(r"best=(\w+)", got.stdout).group(1)
        want = value if CLONES.index(value) >= CLONES.index(best) else best
        assert f"active={want}" in got.stdout, got.stdout + got.stderr


def test_extension_library_exports_the_isa():
    assert active_isa() in CLONES
