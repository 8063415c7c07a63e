#!/usr/bin/env python
"""Builds kernels/*.cu with nvcc for sm_80 and sm_90 (no GPU needed), disassembles them and prints per kernel:
registers, shared memory (static, plus the dynamic shared memory its launcher asks for at the paper shape),
spills, threads, the theoretical CTAs per SM on an A100 (sm_80) and an H100 (sm_90), and the SASS
instructions per logit of its per-map loop.

The per-map loop is found by its back edge (a branch whose target lies before it): the innermost loop that
computes exponentials (MUFU.EX2) among the function's main code (the out-of-line paths that warp shuffles branch to when
a warp has diverged, placed after the body, are left out). Its instructions are counted statically (NOPs
excluded; code that only warp 0 runs, such as thread 0's per-map stores, is counted as if every warp ran it)
and divided by the logits a thread handles per iteration at the paper shape (L = 98, 128 x 128):

    python bench/sass_report.py [--arch 80,90] [--kernels REGEX] [--targs REGEX] [--json out.json]

Needs nvcc (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin) and cuobjdump (the same places, or the copy that the
triton wheel ships); exits with status 2 and a message when one is missing.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "kernels"

# The flags of CMakeLists.txt (the extension's macros), plus ptxas' resource report.
NVCC_FLAGS = ["-std=c++20", "--use_fast_math", "-lineinfo", "-Xptxas=-v",
              "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
              "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]

# Per-SM limits used for the theoretical occupancy (CUDA occupancy calculator figures).
LIMITS = {
    80: {"gpu": "A100", "regs": 65536, "threads": 2048, "ctas": 32, "smem": 167936, "smem_reserved": 1024},
    90: {"gpu": "H100", "regs": 65536, "threads": 2048, "ctas": 32, "smem": 233472, "smem_reserved": 1024},
}
REG_ALLOC_UNIT = 256  # registers per warp are allocated in units of 256

# The paper shape's per-map facts: pixels per map, maps.
HW, MAPS = 128 * 128, 98


@dataclass
class Launch:
    """What a kernel's launcher picks at the paper shape (T NCHW contiguous, the head's forward / backward)."""

    threads: int
    dynamic_smem: int
    logits_per_iteration: int  # logits a thread handles per iteration of the per-map loop (0: no such loop)


def _esize(dtype: str) -> int:
    return {"float": 4, "__half": 2, "__nv_bfloat16": 2}.get(dtype, 4)


def launch_of(name: str, targs: list[str], arch: int = 90) -> Launch | None:
    """The launch of kernel `name` with template arguments `targs` at the paper shape (stats.cu, ring.cu and
    fusion.cu launchers), or None for a kernel this table does not know."""
    esize = _esize(targs[0]) if targs else 4
    if name == "maps_forward_onchip":
        vec, pairs = int(targs[1]), targs[2] == "true"
        mask = HW * 4 if vec > 1 else 16 * 1024 * 4
        return Launch(1024, mask + (16 * 1024 * esize if pairs else 0), 16)
    if name == "maps_backward_onchip":
        pairs = targs[4] == "true"
        return Launch(1024, 2 * 16 * 1024 * esize if pairs else 0, 16)
    if name in ("maps_forward_streamed", "maps_backward_streamed"):
        return Launch(1024, 0, 0)
    if name in ("maps_forward_ring", "maps_backward_ring"):
        # stages of one map each (kernels/ring.cu ring_stages): as many as the shared memory per block holds
        # (227 KiB on sm_90, 163 KiB on sm_80, 1 KiB kept for the static part), at most 4
        optin = 227 * 1024 if arch >= 90 else 163 * 1024
        stages = min(4, (optin - 1024) // (HW * esize))
        return Launch(1024, stages * HW * esize, HW // 1024)
    if name in ("pixels_forward", "pixels_backward", "pixels_mask"):
        return Launch(64 * 4, 0, 0)
    return None


@dataclass
class Kernel:
    arch: int
    mangled: str
    name: str = ""
    targs: list[str] = field(default_factory=list)
    registers: int = 0
    static_smem: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack: int = 0
    instructions: int = 0
    loop_instructions: int = 0
    threads: int | None = None
    dynamic_smem: int | None = None
    ctas_per_sm: int | None = None
    limited_by: str = ""
    per_logit: float | None = None


def find_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    for home in homes:
        if home and Path(home, "bin", name).is_file():
            return str(Path(home, "bin", name))
    try:  # the triton wheel ships cuobjdump and nvdisasm
        import importlib.util

        spec = importlib.util.find_spec("triton")
        if spec and spec.origin:
            cand = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / name
            if cand.is_file():
                return str(cand)
    except (ImportError, ValueError):
        pass
    return None


# ------------------------------------------------------------------------------------------------------
# Parsing (pure functions, tested on text)
# ------------------------------------------------------------------------------------------------------
_ENTRY = re.compile(r"Compiling entry function '(\S+)' for 'sm_(\d+)'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_ptxas(text: str) -> dict[str, dict[str, int]]:
    """ptxas -v output -> {mangled name: {registers, static_smem, stack, spill_stores, spill_loads}}."""
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in text.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = out.setdefault(m.group(1), {"registers": 0, "static_smem": 0, "stack": 0,
                                                  "spill_stores": 0, "spill_loads": 0})
            continue
        if current is None:
            continue
        m = _SPILL.search(line)
        if m:
            current["stack"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
            continue
        m = _USED.search(line)
        if m:
            current["registers"] = int(m.group(1))
            current["static_smem"] = int(m.group(2) or 0)
    return out


_FUNC = re.compile(r"^\s*Function : (\S+)")
_INSN = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def parse_sass(text: str) -> dict[str, list[tuple[int, str]]]:
    """cuobjdump -sass output -> {mangled name: [(address, instruction text), ...]}."""
    out: dict[str, list[tuple[int, str]]] = {}
    current = None
    for line in text.splitlines():
        m = _FUNC.match(line)
        if m:
            current = out.setdefault(m.group(1), [])
            continue
        m = _INSN.match(line)
        if m and current is not None:
            current.append((int(m.group(1), 16), m.group(2).strip()))
    return out


_BRANCH = re.compile(r"^(?:@!?U?P\w+\s+)?(BRA(?:\.\w+)*)\s+(?:U?R\w+,\s*)?(?:`?\(?)?0x([0-9a-f]+)")


def _opcode(insn: str) -> str:
    parts = insn.split()
    if parts and parts[0].startswith("@"):
        parts = parts[1:]
    return parts[0] if parts else ""


def per_map_loop(insns: list[tuple[int, str]]) -> tuple[int, int] | None:
    """(first address, last address) of the per-map loop: the innermost loop of the main code that computes
    exponentials (MUFU.EX2), else the outermost loop. A loop is a back edge (a branch to an earlier address)
    whose source lies in the main code: before the last unconditional EXIT and before the targets of BRA.DIV
    (the out-of-line paths of warp shuffles sit there and branch back into the loop). None when the function
    has no loop."""
    exits = [a for a, i in insns if i.split()[0] == "EXIT"]
    cut = exits[-1] if exits else None
    edges = []
    for addr, insn in insns:
        m = _BRANCH.match(insn)
        if not m:
            continue
        target = int(m.group(2), 16)
        if m.group(1).startswith("BRA.DIV"):
            cut = target if cut is None else min(cut, target)
        elif target < addr:
            edges.append((target, addr))
    edges = [(t, s) for t, s in edges if cut is None or s < cut]
    if not edges:
        return None
    exps = [a for a, i in insns if _opcode(i) == "MUFU.EX2"]
    with_exp = [e for e in edges if any(e[0] <= a <= e[1] for a in exps)]
    if with_exp:
        return min(with_exp, key=lambda e: e[1] - e[0])
    return max(edges, key=lambda e: e[1] - e[0])


def count_instructions(insns: list[tuple[int, str]], first: int, last: int) -> int:
    return sum(1 for a, i in insns if first <= a <= last and _opcode(i) != "NOP")


def split_name(demangled: str) -> tuple[str, list[str]]:
    """'void ns::(anonymous namespace)::k<float, 4, false>(Args<float>)' -> ('k', ['float', '4', 'false'])."""
    head = demangled.split("(", 1)[0] if "(anonymous" not in demangled else demangled
    head = re.sub(r"\(anonymous namespace\)::", "", demangled)
    head = head.removeprefix("void ").split("(", 1)[0]
    m = re.match(r"(?:[\w:]+::)?(\w+)(?:<(.*)>)?$", head)
    if not m:
        return head, []
    name, args = m.group(1), m.group(2) or ""
    targs, depth, cur = [], 0, ""
    for ch in args:
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        if ch == "," and depth == 0:
            targs.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        targs.append(cur.strip())
    return name, targs


def occupancy(arch: int, registers: int, smem: int, threads: int) -> tuple[int, str]:
    """Theoretical CTAs per SM and the limiting resource (registers, shared memory, threads, CTAs)."""
    lim = LIMITS[arch]
    warps = -(-threads // 32)
    regs_per_warp = -(-max(registers, 1) * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by = {
        "registers": (lim["regs"] // regs_per_warp) // warps,
        "threads": lim["threads"] // (warps * 32),
        "ctas": lim["ctas"],
        "shared memory": lim["smem"] // (smem + lim["smem_reserved"]),
    }
    limit = min(by, key=lambda k: by[k])
    return by[limit], limit


# ------------------------------------------------------------------------------------------------------
# Build and report
# ------------------------------------------------------------------------------------------------------
def demangle(names: list[str]) -> dict[str, str]:
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines(), strict=True))


def build(archs: list[int], sources: list[Path], tmp: Path, nvcc: str, cuobjdump: str) -> list[Kernel]:
    jobs = []
    for arch in archs:
        for src in sources:
            cubin = tmp / f"{src.stem}.sm_{arch}.cubin"
            cmd = [nvcc, *NVCC_FLAGS, f"-arch=sm_{arch}", "-cubin", f"-I{KERNELS}", str(src), "-o", str(cubin)]
            jobs.append((arch, cubin, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                       text=True)))
    kernels: list[Kernel] = []
    for arch, cubin, proc in jobs:
        log, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed for {cubin.name}:\n{log[-4000:]}")
        res = parse_ptxas(log)
        sass = parse_sass(subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True,
                                         check=True).stdout)
        for mangled, insns in sass.items():
            k = Kernel(arch, mangled, **res.get(mangled, {}))
            k.instructions = sum(1 for _, i in insns if _opcode(i) != "NOP")
            loop = per_map_loop(insns)
            if loop is not None:
                k.loop_instructions = count_instructions(insns, *loop)
            kernels.append(k)
    names = demangle([k.mangled for k in kernels])
    for k in kernels:
        k.name, k.targs = split_name(names[k.mangled])
        launch = launch_of(k.name, k.targs, k.arch)
        if launch is not None:
            k.threads, k.dynamic_smem = launch.threads, launch.dynamic_smem
            k.ctas_per_sm, k.limited_by = occupancy(k.arch, k.registers, k.static_smem + k.dynamic_smem, k.threads)
            if launch.logits_per_iteration and k.loop_instructions:
                k.per_logit = k.loop_instructions / launch.logits_per_iteration
    return sorted(kernels, key=lambda k: (k.name, k.targs, k.arch))


def table(kernels: list[Kernel]) -> str:
    rows = ["| kernel | sm | regs | smem static + dynamic (B) | spills st/ld (B) | threads | CTAs/SM (limit) "
            "| loop insns | insns/logit |",
            "|---|---|---|---|---|---|---|---|---|"]
    for k in kernels:
        targs = ", ".join(t.replace("__nv_bfloat16", "bf16").replace("__half", "half") for t in k.targs)
        occ = f"{k.ctas_per_sm} ({k.limited_by})" if k.ctas_per_sm is not None else "-"
        dyn = f"{k.static_smem} + {k.dynamic_smem}" if k.dynamic_smem is not None else f"{k.static_smem} + ?"
        per = f"{k.per_logit:.1f}" if k.per_logit is not None else "-"
        rows.append(f"| {k.name}<{targs}> | {k.arch} | {k.registers} | {dyn} | {k.spill_stores}/{k.spill_loads} "
                    f"| {k.threads or '-'} | {occ} | {k.loop_instructions or '-'} | {per} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="80,90", help="comma-separated SM versions (80, 90)")
    p.add_argument("--kernels", default="^maps_", help="regex on the kernel name (default: the per-map kernels)")
    p.add_argument("--targs", default="", help="regex on the kernel's template arguments, joined by ', '")
    p.add_argument("--sources", default="", help="comma-separated kernels/*.cu files (default: all)")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    archs = [int(a) for a in args.arch.split(",") if a]
    for a in archs:
        if a not in LIMITS:
            p.error(f"--arch: {a} is not one of {sorted(LIMITS)}")
    nvcc, cuobjdump = find_tool("nvcc"), find_tool("cuobjdump")
    if nvcc is None or cuobjdump is None:
        print(f"sass_report: needs nvcc and cuobjdump (found nvcc={nvcc}, cuobjdump={cuobjdump})", file=sys.stderr)
        return 2
    sources = ([KERNELS / s for s in args.sources.split(",") if s] if args.sources
               else sorted(KERNELS.glob("*.cu")))
    with tempfile.TemporaryDirectory() as tmp:
        kernels = build(archs, sources, Path(tmp), nvcc, cuobjdump)
    pattern = re.compile(args.kernels)
    targs = re.compile(args.targs)
    kernels = [k for k in kernels if pattern.search(k.name) and targs.search(", ".join(k.targs))]
    print(table(kernels))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(k) for k in kernels], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
