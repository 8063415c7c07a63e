"""Compile every decafa Triton kernel for a GPU target without a GPU, and report its resources.

    python -m decafa_fast.triton.compile_check [--arch 90] [--sass]

Builds each kernel variant used at the tuned size (B*L maps of 128 x 128, L = 98, Ci = 1, C = 64) for
float32, float16 and bfloat16 through `triton.compile` with a `GPUTarget` (so the real code generator
runs, unlike TRITON_INTERPRET), then prints registers, spills, shared memory and whether the pixel loads
are 16-byte vectors (`ld.global.v4` in the PTX), using the cuobjdump that ships with Triton.
Must run without TRITON_INTERPRET=1. Exit status 1 if any variant fails to compile.
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
from .stats import map_backward_kernel, map_stats_kernel

_PTR = {"fp32": "*fp32", "fp16": "*fp16", "bf16": "*bf16"}


def _signature(kernel, values: dict, ptr_types: dict, constexprs: dict):
    """Signature/constants/attrs the way Triton's JIT specialises a launch with these argument values."""
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
                sig[name] = "fp32"
            elif v == 1:  # the JIT turns int arguments equal to 1 into constants
                sig[name] = "constexpr"
                consts[name] = 1
            else:
                sig[name] = "i32"
                if v % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


QUICK = ("map_stats z=1 phi=0", "map_backward head", "mask_fuse_fwd F0 (logits)", "mask_fuse_fwd F5 (logits)",
         "fuse_bwd F5 (logits)", "mask_fuse_fwd F5 B=1", "fuse_bwd F5 B=1")


def _variants(dt: str):
    L, H, W, CI, C = 98, 128, 128, 1, 64
    hw = H * W
    scfg = tops._stats_cfg(hw)
    block, warps = scfg["BLOCK"], scfg["num_warps"]
    t_vals = dict(b_start=0, b_step=-1, L=L, W=W, HW=hw, inv_w=1.0 / W, s_tb=L * hw, s_tl=hw, s_tp=1, beta=1.0,
                  x_scale=1.0, x_off=0.5, y_scale=1.0, y_off=0.5)
    ptr = _PTR[dt]
    for wz, wp in ((True, False), (False, True), (False, False)):
        yield (f"map_stats z={int(wz)} phi={int(wp)}", map_stats_kernel, t_vals,
               dict(t_ptr=ptr, lse_ptr="*fp32", z_ptr=ptr, phi_ptr=ptr),
               dict(BLOCK=block, WRITE_Z=wz, WRITE_PHI=wp, INT_DIV=False), warps)
    b_vals = dict(t_vals, s_gb=hw, s_gl=0, s_gp=1, s_zb=2 * L, s_zl=2, s_zc=1)
    for hg, hz, gty, label in ((True, True, "*fp32", "head"), (True, False, ptr, "softmax"), (False, True, ptr, "z")):
        yield (f"map_backward {label}", map_backward_kernel, b_vals,
               dict(t_ptr=ptr, lse_ptr="*fp32", g_ptr=gty, gz_ptr=ptr, gt_ptr=ptr),
               dict(BLOCK=block, HAS_G=hg, HAS_GZ=hz, INT_DIV=False), warps)
    cfg = tops._fuse_cfg(hw, L, CI, C, 64, torch.device("cpu"))
    warps = cfg.pop("num_warps")
    f_vals = dict(b_start=0, b_step=-1, L=L, HW=hw, CI=CI, C=C, n_tiles=hw // cfg["BLOCK_P"],
                  s_tb=L * hw, s_tl=hw, s_tp=1, s_mb=hw, s_mp=1, s_ib=CI * hw, s_ic=hw, s_ip=1,
                  s_eb=C * hw, s_ec=hw, s_ep=1,
                  s_fb=130 * hw, s_fc=hw, s_fp=1, beta=1.0, ip_off=0, im_off=CI, ep_off=2 * CI,
                  em_off=2 * CI + C, CF=2 * CI + 2 * C)
    fptrs = dict(t_ptr=ptr, lse_ptr="*fp32", m_ptr=ptr, i_ptr=ptr, e_ptr=ptr, f_ptr=ptr, m_out_ptr=ptr)
    for mode in range(6):
        yield (f"mask_fuse_fwd F{mode} (logits)", mask_fuse_fwd_kernel, f_vals, fptrs,
               dict(cfg, MODE=mode, FROM_LOGITS=True, WRITE_MASK=mode == 0), warps)
    yield ("mask_fuse_fwd F5 (mask)", mask_fuse_fwd_kernel, f_vals, fptrs,
           dict(cfg, MODE=5, FROM_LOGITS=False, WRITE_MASK=False), warps)
    # B = 1 on a 132-SM GPU: narrow pixel tiles, tall map / channel tiles
    saved = tops.TUNING.fuse_min_programs
    tops.TUNING.fuse_min_programs = 4 * 132
    cfg1 = tops._fuse_cfg(hw, L, CI, C, 1, torch.device("cpu"))
    tops.TUNING.fuse_min_programs = saved
    warps1 = cfg1.pop("num_warps")
    f1 = dict(f_vals, n_tiles=hw // cfg1["BLOCK_P"])
    yield (f"mask_fuse_fwd F5 B=1 P{cfg1['BLOCK_P']} L{cfg1['BLOCK_L']}", mask_fuse_fwd_kernel, f1, fptrs,
           dict(cfg1, MODE=5, FROM_LOGITS=True, WRITE_MASK=False), warps1)
    bptrs = dict(t_ptr=ptr, lse_ptr="*fp32", m_ptr=ptr, i_ptr=ptr, e_ptr=ptr, gf_ptr=ptr, gi_ptr=ptr,
                 ge_ptr=ptr, gm_ptr="*fp32")
    for mode in range(1, 6):
        yield (f"fuse_bwd F{mode} (logits)", fuse_bwd_kernel, f_vals, bptrs,
               dict(cfg, MODE=mode, FROM_LOGITS=True), warps)
    yield ("fuse_bwd F5 (mask)", fuse_bwd_kernel, f_vals, bptrs, dict(cfg, MODE=5, FROM_LOGITS=False), warps)
    yield (f"fuse_bwd F5 B=1 P{cfg1['BLOCK_P']} L{cfg1['BLOCK_L']}", fuse_bwd_kernel, f1, bptrs,
           dict(cfg1, MODE=5, FROM_LOGITS=True), warps1)


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
    parser.add_argument("--fail-on-spill", action="store_true",
                        help="count a variant with a stack frame over 16 bytes (more than a stray spill or two)"
                        " as failed")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("compile_check needs TRITON_INTERPRET unset (the interpreter does not compile)", file=sys.stderr)
        return 2
    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    for dt in args.dtypes.split(","):
        for name, kernel, values, ptrs, constexprs, warps in _variants(dt):
            if args.quick and not name.startswith(QUICK):
                continue
            sig, consts, attrs = _signature(kernel, values, ptrs, constexprs)
            try:
                k = triton.compile(ASTSource(kernel, sig, consts, attrs), target=target,
                                   options={"num_warps": warps})
            except Exception as exc:  # report every failing variant, not just the first
                failures += 1
                print(f"FAIL {dt:4} {name}: {type(exc).__name__}: {str(exc)[:400]}")
                continue
            ptx = k.asm["ptx"]
            v4 = len(re.findall(r"ld\.global(?:\.\w+)*\.v4", ptx))
            v2 = len(re.findall(r"ld\.global(?:\.\w+)*\.v2", ptx))
            res, stack = _resources(k.asm["cubin"])
            spill = args.fail_on_spill and stack > 16
            failures += spill
            print(f"{'SPILL' if spill else 'ok  '} {dt:4} {name:32} warps {warps:2} {res} ld.v4 {v4:3} ld.v2 {v2:3}")
    print(f"{failures} variant(s) failed" if failures else "all variants compiled")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
