"""Builds and runs bench/vexp_vs_aten.cpp: the CPU kernels' exp (csrc/cpu/vexp.h) against ATen's vectorised
exps, AVX-512, time per element in cache and largest relative error on the kernels' inputs [-87, 0].

    python bench/vexp_vs_aten.py            # needs g++ and a CPU with AVX-512

Why it exists: the CPU kernels keep a hand-written exp instead of ATen's `Vectorized`; this measures that
choice (the result and the machine are in csrc/cpu/vexp.h's comment and bench/RESULTS.md)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils.cpp_extension import include_paths

ROOT = Path(__file__).resolve().parents[1]
AVX512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma",
          "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]


def main() -> int:
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        print("vexp_vs_aten: no C++ compiler (set CXX)", file=sys.stderr)
        return 2
    if "avx512f" not in Path("/proc/cpuinfo").read_text():
        print("vexp_vs_aten: this CPU has no AVX-512", file=sys.stderr)
        return 2
    lib = Path(torch.__file__).parent / "lib"
    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "vexp_vs_aten"
        cmd = [compiler, "-O2", "-std=c++20", "-fopenmp-simd", "-fno-trapping-math", *AVX512,
               *[f"-I{p}" for p in include_paths()], f"-I{ROOT / 'csrc' / 'cpu'}",
               str(ROOT / "bench" / "vexp_vs_aten.cpp"), "-o", str(exe),
               f"-L{lib}", "-ltorch_cpu", "-lc10", f"-Wl,-rpath,{lib}"]
        built = subprocess.run(cmd, capture_output=True, text=True)
        if built.returncode != 0:
            print(" ".join(cmd), built.stderr[-4000:], sep="\n", file=sys.stderr)
            return 1
        return subprocess.run([str(exe)]).returncode


if __name__ == "__main__":
    sys.exit(main())
