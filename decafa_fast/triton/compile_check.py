"""Compile every decafa Triton kernel for a GPU target without a GPU, and report its resources.

    python -m decafa_fast.triton.compile_check [--arch 90] [--float-args fp64] [--quick] [--fail-on-spill]

Builds each kernel variant used at the tuned size (B*L maps of 128 x 128, L = 98, Ci = 1, C = 64; the
persistent per-map kernels at B = 64 over 132 programs) for float32, float16 and bfloat16 through
`triton.compile` with a `GPUTarget` (so the real code generator runs, unlike TRITON_INTERPRET), then prints
registers, spills (the stack frame), static / dynamic shared memory, whether the pixel loads are 16-byte
vectors (`ld.global.v4` in the PTX) or asynchronous copies to shared memory (`cp.async`, the pipelined
next map), and for the per-map kernels the block barriers per map: the `bar.sync` / `barrier.sync` inside
the innermost PTX loop that computes the exps (the map loop), using the cuobjdump that ships with Triton.
Run it once per Triton version, e.g. the GPU machine's 3.6 installed aside:
    pip install --target /tmp/triton36 triton==3.6.0
    PYTHONPATH=/tmp/triton36:. python -m decafa_fast.triton.compile_check --fail-on-spill
Python float arguments (beta, coordinate scales) are typed fp32, as Triton's JIT launches them, or with
--float-args fp64 as torch.compile's inductor does when it compiles the kernels of a triton_op (wrap_triton
keeps a Python float's double precision). Either way every variant must keep its arithmetic in float32: a
variant whose Triton IR computes in f64 anywhere but the conversion of such an argument counts as failed.
Must run without TRITON_INTERPRET=1. Exit status 1 if any variant fails to compile, computes in f64, or
(with --fail-on-spill) spills past its allowance.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import ops as tops
from .fusion import fuse_bwd_kernel, mask_fuse_fwd_kernel
from .persistent import map_bwd_persistent_kernel, map_fwd_persistent_kernel
from .stats import map_bwd_kernel, map_fwd_kernel

_PTR = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}


def _signature(kernel, values: dict, ptr_types: dict, constexprs: dict, float_type: str = "fp32"):
    """Signature/constants/attrs the way Triton's JIT specialises a launch with these argument values
    (float_type: the type a Python float argument gets, fp32 for the JIT, fp64 under inductor)."""
    sig, consts, attrs = {}, dict(constexprs), {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ptr_types:
            sig[name] = ptr_types[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            v = values[name]
            if isinstance(v, float):
                sig[name] = float_type
            elif v == 1:  # the JIT turns int arguments equal to 1 into constants
                sig[name] = "constexpr"
                consts[name] = 1
            else:
                sig[name] = "i32"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


QUICK = ("map_fwd head", "map_bwd head", "pmap_fwd head", "pmap_bwd head", "mask_fuse_fwd F5 (partials)",
         "mask_fuse_fwd F5 (pieces)", "fuse_bwd F5", "mask_fuse_fwd F5 B=1",
         "fuse_bwd F5 B=1", "mask_fuse_fwd F5 channels_last")


# Stack bytes a variant may use before --fail-on-spill counts it: none (DEFAULT_STACK) unless SPILL_ALLOWANCE
# lists it for the running Triton (major, minor), as the stack measured (sm_90, the most over fp32 / fp16 /
# bf16) so that any growth fails. Every variant compiles without a stack frame on Triton 3.6 and 3.9 (the
# docs table of decafa_fast/triton/__init__.py), so the table is empty.
# The per-map kernels hold a whole 128 x 128 map at 32 warps (64 registers a thread, the most at 1024
# threads; 16 pixels a thread) beside a second per-pixel tile that lives across maps (the partial mask,
# or the mask gradient in the backward). What took the last stacks away:
# - backward (persistent and per-run): T centred for grad beta as a = beta T - max, the exp's argument,
#   divided by beta once per map (T - T_max = a / beta): T is dead once a is formed, where T and a (or the
#   exp's input) were live together beside Phi and G (3.6 pmap_bwd head 24 / 16 / 16 to 0). Maps with
#   |beta| < 2**-40 (0 included) get grad beta from a sweep after the map loop (stats._gbeta_map).
# - grad z folded into g_phi = g + gx col + gy row, formed per element in the sums (3 sums, not 7 with the
#   x / y moments) and written differently in the store, so that no g_phi tile is live across the reduction
#   (3.9 barriers per map of the head backward 8 to 4; fewer registers).
# - the per-run kernels (TUNING.map_kernel = "runs", channels_last T) with the persistent ones' reductions:
#   the sums of a map in one tl.reduce (backward), the max as one reduction and z per row then across rows
#   (forward), in place of one 2-D tl.sum each, and constant pixel offsets for full maps (map_fwd head
#   32 / 48 / 48 on 3.6 and map_bwd head 72 / 136 / 160 on 3.6, 24 / 48 / 48 on 3.9, to 0; barriers per map
#   12 to 6 and 21 to 3 on 3.6, 10-14 to 6 and 18-26 to 4 on 3.9).
# - channels_last on 3.6: Triton 3.6 orders the layout of a load without contiguity (T at the pixel stride
#   L) dimension 0 first, 3.9 dimension 1 first; the per-run kernels take a [W, H] tile on Triton < 3.9
#   (COLS_FIRST, ops._map_cfg) so that the loads of T and the contiguous stores share a layout: no layout
#   conversion through shared memory per map, whose loop-invariant shared addresses spilled (map_bwd head
#   channels_last 352 / 728 / 728 on 3.6 to 0, 40 / 64 / 64 on 3.9 to 0 with the two items above; barriers
#   43 to 3; the forward 21 to 6 barriers, no 64 KiB conversion buffer). [W, H] on 3.9: 136-168 bytes.
# Tried before (persistent head kernels, both Tritons): 16 and 8 warps (40-344 bytes), row / column
# marginals for z (more barriers, 32-56 bytes), num_stages 1 and 3 (no better); a loop per batch item inside
# the persistent loop (its invariants live across the map loop: 96-168 bytes), so the map loop is one flat
# loop over the program's range; for the overflow handling, a branch inside the map loop (up to 136 bytes),
# scalar selects of the exp's scale and shift (one more register in the loop), the fix-up helpers as
# noinline calls (the call frame: 3.9 pmap_bwd head 136). The per-map kernels end with the fix-up of maps
# whose beta T overflows (or, backward, whose beta is small), a loop after the map loop.
DEFAULT_STACK = 0
SPILL_ALLOWANCE: dict[tuple[int, int], dict[str, int]] = {}


def spill_allowance(name: str, version: str | None = None) -> int:
    """Stack bytes variant `name` may use with Triton `version` (default: the installed one). A Triton not
    measured gets, per variant, the largest allowance of any measured version."""
    key = tuple(int(x) for x in re.findall(r"\d+", version or triton.__version__)[:2])
    if key in SPILL_ALLOWANCE:
        return SPILL_ALLOWANCE[key].get(name, DEFAULT_STACK)
    return max([table.get(name, DEFAULT_STACK) for table in SPILL_ALLOWANCE.values()], default=DEFAULT_STACK)


def _variants(dt: str):
    L, H, W, CI, C = 98, 128, 128, 1, 64
    hw = H * W
    ptr = _PTR[dt]
    n_runs, run_len = tops._runs(L, tops.TUNING.mask_runs)
    t_vals = dict(L=L, W=W, HW=hw, inv_w=1.0 / W, n_runs=n_runs, run_len=run_len, s_tb=L * hw, s_tl=hw, s_tp=1,
                  beta=1.0, x_scale=1.0, x_off=0.5, y_scale=1.0, y_off=0.5)
    cl_vals = dict(t_vals, s_tl=1, s_tp=L)
    fwd_ptrs = dict(t_ptr=ptr, beta_ptr="*fp32", stats_ptr="*fp32", z_ptr=ptr, phi_ptr=ptr, part_ptr="*fp32")

    def cfg(run, interleaved):
        c = dict(tops._map_cfg(H, W, run, L if interleaved else 1, interleaved))
        return c, c.pop("num_warps")

    flags = dict(HAS_BETA_MAP=False, INT_DIV=False, PIX64=False)
    for label, vals, run, inter, wz, wp, wpart in (
        ("head", t_vals, run_len, False, True, False, True),
        ("softmax", t_vals, 1, False, False, True, False),
        ("soft_argmax", t_vals, 1, False, True, False, False),
        ("head channels_last", cl_vals, run_len, True, True, False, True),
    ):
        c, warps = cfg(run, inter)
        yield (f"map_fwd {label}", map_fwd_kernel, vals, fwd_ptrs,
               dict(c, **flags, WRITE_Z=wz, WRITE_PHI=wp, WRITE_PART=wpart), warps)
    b_vals = dict(t_vals, s_gb=hw, s_gl=0, s_gp=1)
    b_vals.pop("x_off"), b_vals.pop("y_off")
    bwd_ptrs = dict(t_ptr=ptr, beta_ptr="*fp32", stats_ptr="*fp32", g_ptr="*fp32", gz_ptr=ptr, gt_ptr=ptr,
                    gbeta_ptr="*fp32")
    for label, vals, run, inter, g, per_map, gz in (
        ("head", b_vals, run_len, False, True, False, True),
        ("softmax", dict(b_vals, s_gb=L * hw, s_gl=hw), 1, False, True, True, False),
        ("head channels_last", dict(b_vals, s_tl=1, s_tp=L), run_len, True, True, False, True),
    ):
        c, warps = cfg(run, inter)
        ptrs = dict(bwd_ptrs, g_ptr=ptr) if per_map else bwd_ptrs
        yield (f"map_bwd {label}", map_bwd_kernel, vals, ptrs,
               dict(c, **flags, HAS_G=g, G_PER_MAP=per_map, HAS_GZ=gz), warps)

    # the persistent per-map kernels (persistent.py) at B = 64 on a 132-SM GPU: 132 programs of 47-48 maps
    p_vals = dict(L=L, W=W, HW=hw, n_maps=64 * L, n_progs=132, s_tb=L * hw, s_tl=hw, s_tp=1,
                  beta=1.0, x_scale=1.0, x_off=0.5, y_scale=1.0, y_off=0.5)
    pc = tops._persistent_cfg(H, W)
    pc, pwarps = dict(pc), pc["num_warps"]
    pc.pop("num_warps")
    pflags = dict(pc, PIX64=False, HAS_BETA_MAP=False)
    for label, wz, wp, wpart in (("head", True, False, True), ("attention_mask", False, False, True),
                                 ("softmax", False, True, False), ("soft_argmax", True, False, False)):
        yield (f"pmap_fwd {label}", map_fwd_persistent_kernel, p_vals, fwd_ptrs,
               dict(pflags, WRITE_Z=wz, WRITE_PHI=wp, WRITE_PART=wpart), pwarps)
    pb_vals = dict(p_vals, s_gb=hw, s_gl=0, s_gp=1)
    pb_vals.pop("x_off"), pb_vals.pop("y_off")
    for label, vals, g, per_map, gz in (
        ("head", pb_vals, True, False, True),
        ("attention_mask", pb_vals, True, False, False),
        ("softmax", dict(pb_vals, s_gb=L * hw, s_gl=hw), True, True, False),
        ("soft_argmax", pb_vals, False, False, True),
    ):
        ptrs = dict(bwd_ptrs, g_ptr=ptr) if per_map else bwd_ptrs
        yield (f"pmap_bwd {label}", map_bwd_persistent_kernel, vals, ptrs,
               dict(pflags, HAS_G=g, G_PER_MAP=per_map, HAS_GZ=gz), pwarps)

    def fuse_cfg(nb, channels_last=False):
        c = dict(tops._fuse_cfg(hw, CI, C, nb, torch.device("cpu"), channels_last))
        return c, c.pop("num_warps")

    cf = 2 * CI + 2 * C
    f_vals = dict(HW=hw, CI=CI, C=C, n_tiles=0, n_runs=n_runs, n_maps=64 * L, L=L, s_mb=hw, s_mp=1, s_ib=CI * hw,
                  s_ic=hw, s_ip=1, s_eb=C * hw, s_ec=hw, s_ep=1, s_fb=cf * hw, s_fc=hw, s_fp=1, ip_off=0, im_off=CI,
                  ep_off=2 * CI, em_off=2 * CI + C)
    fptrs = dict(part_ptr="*fp32", m_ptr=ptr, i_ptr=ptr, e_ptr=ptr, f_ptr=ptr, m_out_ptr=ptr)
    c64, w64 = fuse_cfg(64)
    f64 = dict(f_vals, n_tiles=hw // c64["BLOCK_P"])
    for mode in range(6):
        yield (f"mask_fuse_fwd F{mode} (partials)", mask_fuse_fwd_kernel, f64, fptrs,
               dict(c64, MODE=mode, FROM_PARTS=True, WRITE_MASK=True, PIECES=False), w64)
    yield ("mask_fuse_fwd F5 (mask)", mask_fuse_fwd_kernel, f64, fptrs,
           dict(c64, MODE=5, FROM_PARTS=False, WRITE_MASK=False, PIECES=False), w64)
    ccl, wcl = fuse_cfg(64, True)
    fcl = dict(f_vals, n_tiles=hw // ccl["BLOCK_P"], s_ec=1, s_ep=C, s_fc=1, s_fp=cf)
    yield ("mask_fuse_fwd F5 channels_last", mask_fuse_fwd_kernel, fcl, fptrs,
           dict(ccl, MODE=5, FROM_PARTS=True, WRITE_MASK=True, PIECES=False), wcl)
    # B = 1 on a 132-SM GPU: narrow pixel tiles, tall channel tiles
    saved = tops.TUNING.fuse_min_programs
    tops.TUNING.fuse_min_programs = 4 * 132
    c1, w1 = fuse_cfg(1)
    tops.TUNING.fuse_min_programs = saved
    f1 = dict(f_vals, n_tiles=hw // c1["BLOCK_P"])
    yield (f"mask_fuse_fwd F5 B=1 P{c1['BLOCK_P']}", mask_fuse_fwd_kernel, f1, fptrs,
           dict(c1, MODE=5, FROM_PARTS=True, WRITE_MASK=True, PIECES=False), w1)
    yield ("mask_fuse_fwd F5 (pieces)", mask_fuse_fwd_kernel, dict(f64, n_runs=132), fptrs,
           dict(c64, MODE=5, FROM_PARTS=True, WRITE_MASK=True, PIECES=True), w64)
    b_f = {k: v for k, v in f64.items() if k not in ("n_runs", "n_maps", "L")}
    bptrs = dict(m_ptr=ptr, i_ptr=ptr, e_ptr=ptr, gf_ptr=ptr, gi_ptr=ptr, ge_ptr=ptr, gm_ptr="*fp32")
    for mode in range(1, 6):
        yield (f"fuse_bwd F{mode}", fuse_bwd_kernel, b_f, bptrs, dict(c64, MODE=mode), w64)
    yield (f"fuse_bwd F5 B=1 P{c1['BLOCK_P']}", fuse_bwd_kernel, dict(b_f, n_tiles=f1["n_tiles"]), bptrs,
           dict(c1, MODE=5), w1)
    yield ("fuse_bwd F5 channels_last", fuse_bwd_kernel,
           {k: v for k, v in fcl.items() if k not in ("n_runs", "n_maps", "L")}, bptrs, dict(ccl, MODE=5), wcl)


def _f64_ops(ttir: str) -> list[str]:
    """Lines of a kernel's Triton IR that compute in f64. Converting an f64 argument down to f32 is the one
    allowed use; any other f64 value (a product, a loop-carried variable) means a double argument promoted
    float32 arithmetic."""
    args = set(re.findall(r"%([\w.]+): f64", "".join(re.findall(r"tt\.func[^\n]*", ttir))))
    converted = re.compile(r"arith\.truncf %([\w.]+) : f64 to f32")
    bad = []
    for line in ttir.splitlines():
        if not re.search(r"\bf64\b", line) or line.lstrip().startswith("tt.func"):
            continue
        m = converted.search(line)
        if not (m and m.group(1) in args):
            bad.append(line.strip())
    return bad


_LABEL = re.compile(r"^\s*(\$L__\w+):")
_BRANCH = re.compile(r"\bbra(?:\.uni)?\s+(\$L__\w+);")
_BARRIER = re.compile(r"\b(?:bar|barrier)(?:\.cta)?\.sync\b")


def barriers_per_map(ptx: str) -> int | None:
    """Block barriers executed once per map: those in the loop of the PTX (a backward branch to a label) that
    computes the most exps (ex2), the innermost of those, i.e. the map loop of a per-map kernel (not the
    pixel-chunk loops of its overflow fix-up, one exp a thread). None when no loop has exps."""
    lines = ptx.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines) if (m := _LABEL.match(line))}
    loops = []
    for i, line in enumerate(lines):
        m = _BRANCH.search(line)
        if m and labels.get(m.group(1), i) < i:
            loops.append((labels[m.group(1)], i))
    with_exps = [(-exps, end - start, start, end) for start, end in loops
                 if (exps := sum("ex2.approx" in line for line in lines[start:end + 1]))]
    if not with_exps:
        return None
    _, _, start, end = min(with_exps)
    return sum(1 for line in lines[start:end + 1] if _BARRIER.search(line))


def _resources(cubin: bytes) -> tuple[str, int]:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return "(no cuobjdump)", 0
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", out)
    if not m:
        return out.strip()[-120:], 0
    return f"regs {m.group(1):>3} stack {m.group(2):>4} smem {m.group(3):>6}", int(m.group(2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90")
    parser.add_argument("--dtypes", default="fp32,fp16,bf16")
    parser.add_argument("--quick", action="store_true", help="only the variants the fused head uses")
    parser.add_argument("--only", default="", help="only variants whose name starts with this")
    parser.add_argument("--fail-on-spill", action="store_true",
                        help="count a variant with a stack frame over its allowance as failed (none, unless"
                        " SPILL_ALLOWANCE lists it for this Triton)")
    parser.add_argument("--allowance", action="append", default=[], metavar="VARIANT=BYTES",
                        help="override the stack allowance of a variant (repeatable)")
    parser.add_argument("--float-args", choices=("fp32", "fp64"), default="fp32",
                        help="type of the Python float arguments: fp32 as Triton's JIT launches them, fp64 as"
                        " torch.compile's inductor compiles a triton_op's kernels")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("compile_check needs TRITON_INTERPRET unset (the interpreter does not compile)", file=sys.stderr)
        return 2
    overrides = {name: int(b) for name, b in (a.rsplit("=", 1) for a in args.allowance)}
    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    for dt in args.dtypes.split(","):
        for name, kernel, values, ptrs, constexprs, warps in _variants(dt):
            if (args.quick and not name.startswith(QUICK)) or not name.startswith(args.only):
                continue
            sig, consts, attrs = _signature(kernel, values, ptrs, constexprs, args.float_args)
            try:
                k = triton.compile(ASTSource(kernel, sig, consts, attrs), target=target,
                                   options={"num_warps": warps})
            except Exception as exc:  # report every failing variant, not just the first
                failures += 1
                print(f"FAIL {dt:4} {name}: {type(exc).__name__}: {str(exc)[:400]}")
                continue
            f64 = _f64_ops(k.asm["ttir"])
            if f64:
                failures += 1
                print(f"FP64 {dt:4} {name}: {len(f64)} f64 operation(s) in the Triton IR, first: {f64[0][:200]}")
                continue
            ptx = k.asm["ptx"]
            v4 = len(re.findall(r"ld\.global(?:\.[\w:]+)*\.v4", ptx))
            v2 = len(re.findall(r"ld\.global(?:\.[\w:]+)*\.v2", ptx))
            st4 = len(re.findall(r"st\.global(?:\.[\w:]+)*\.v4", ptx))
            cp_async = len(re.findall(r"cp\.async\.c[ag]\.", ptx))
            bars = barriers_per_map(ptx) if "map_" in name else None
            res, stack = _resources(k.asm["cubin"])
            allowed = overrides.get(name, spill_allowance(name))
            spill = args.fail_on_spill and stack > allowed
            failures += spill
            print(f"{'SPILL' if spill else 'ok  '} {dt:4} {name:32} warps {warps:2} {res} "
                  f"dyn {k.metadata.shared:6} ld.v4 {v4:3} ld.v2 {v2:3} st.v4 {st4:3} cp.async {cp_async:3}"
                  + (f" barriers/map {bars:2}" if bars is not None else "")
                  + (f"  stack {stack} bytes > allowed {allowed} (triton {triton.__version__})" if spill else ""))
    print(f"{failures} variant(s) failed" if failures else "all variants compiled")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
