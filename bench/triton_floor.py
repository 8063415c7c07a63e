#!/usr/bin/env python
"""Times the Triton decafa_head against its floor, the reference (eager and torch.compile), on one GPU.

The floor is the bytes that must move divided by the device-to-device copy bandwidth measured in this run
(bytes read + bytes written by a 1 GiB copy):
    forward:            read T, I, E once; write F and z once
    forward + backward: the forward floor, plus read grad_F, grad_z, T, I, E and write grad_T, grad_I, grad_E
Default: the tuned case B = 64, L = 98, 128 x 128, C = 64, Ci = 1, F5, in float32 and bfloat16, plus B = 1
forward latency (eager, and replayed from a CUDA graph, which removes Python launch overhead).
`--sweep` also times the forward under one-at-a-time changes of decafa_fast.triton.ops.TUNING.
Needs a CUDA GPU (exits with status 2 and a message otherwise):

    python bench/triton_floor.py [--sweep] [--json out.json]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Callable

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# One-at-a-time variations of the Tuning defaults for --sweep.
SWEEP = {
    "chunk_bytes": [0, 8 << 20, 16 << 20, 32 << 20, 128 << 20],
    "fuse_block_p": [64, 128, 512, 1024],
    "fuse_min_programs": [0, 1056, 4224],
    "fuse_block_l": [4, 16],
    "fuse_block_c": [4, 16],
    "fuse_warps": [2, 8],
    "stats_block": [1024, 2048, 8192],
    "stats_warps": [4, 16],
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--maps", type=int, default=98, help="L, landmark maps")
    p.add_argument("--size", type=int, default=128, help="H = W")
    p.add_argument("--channels", type=int, default=64, help="C, embedding channels")
    p.add_argument("--image-channels", type=int, default=1)
    p.add_argument("--mode", default="F5", choices=["F1", "F2", "F3", "F4", "F5"])
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile reference")
    p.add_argument("--sweep", action="store_true", help="also time the forward under TUNING variations")
    p.add_argument("--json", help="write all numbers to this file")
    p.add_argument("--budget-s", type=float, default=1e9, help="stop the sweep after this many seconds in all")
    return p.parse_args(argv)


def bench_ms(fn: Callable[[], object], graph: bool = False) -> float:
    """Median time of fn() in ms (triton.testing; L2 flushed between runs); graph=True replays a CUDA graph."""
    import triton.testing

    if graph:  # graphs cannot be captured on the default stream
        with torch.cuda.stream(torch.cuda.Stream()):
            return float(triton.testing.do_bench_cudagraph(fn, rep=50, return_mode="median"))
    return float(triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median"))


def copy_bandwidth_gbs() -> float:
    src = torch.empty(1 << 28, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9


def floor_bytes(b, l, h, w, ci, c, fc, elem) -> tuple[int, int]:
    t, i, e, f, z = b * l * h * w, b * ci * h * w, b * c * h * w, b * fc * h * w, b * l * 2
    forward = (t + i + e + f + z) * elem
    return forward, forward + (f + z + t + i + e + t + i + e) * elem


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    deadline = time.monotonic() + args.budget_s
    if not torch.cuda.is_available():
        print("bench/triton_floor.py needs a CUDA GPU: torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    from decafa_fast import ops, reference

    status = ops.backends()["triton"]
    if not status.startswith("available"):
        print(f"bench/triton_floor.py: the Triton backend is not available: {status}", file=sys.stderr)
        return 2
    from decafa_fast.triton import ops as tops

    ops.set_backend("triton")
    props = torch.cuda.get_device_properties(0)
    bandwidth = copy_bandwidth_gbs()
    info = {"device": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
            "copy_gbs": bandwidth, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "tuning": dataclasses.asdict(tops.TUNING)}
    import triton

    info["triton"] = triton.__version__
    print(f"device {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, "
          f"triton {triton.__version__}; copy bandwidth {bandwidth:.0f} GB/s (read + write)")

    b, l, s, c, ci, mode = args.batch, args.maps, args.size, args.channels, args.image_channels, args.mode
    fc = reference.fused_channels(mode, ci, c)
    compiled_ref = None if args.no_compile else torch.compile(reference.decafa_head)
    rows, results = [], {"info": info, "cases": [], "sweep": []}

    def record(dname, what, ms, floor_ms=None):
        row = {"dtype": dname, "case": what, "ms": ms, "floor_ms": floor_ms,
               "x_floor": (ms / floor_ms) if floor_ms else None}
        results["cases"].append(row)
        rows.append(row)
        extra = f"  {ms / floor_ms:5.2f}x floor" if floor_ms else ""
        print(f"{dname:9} {what:38} {ms * 1e3:9.1f} us{extra}", flush=True)

    def inputs(dtype):
        g = torch.Generator(device="cuda").manual_seed(0)
        t = (3 * torch.randn(b, l, s, s, device="cuda", generator=g)).to(dtype)
        im = torch.rand(b, ci, s, s, device="cuda", generator=g).to(dtype)
        e = torch.randn(b, c, s, s, device="cuda", generator=g).to(dtype)
        return t, im, e

    def write_json():
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(results, fh, indent=1)

    dnames = [d.strip() for d in args.dtypes.split(",")]
    floors = {}
    for dname in dnames:
        dtype = DTYPES[dname]
        t, im, e = inputs(dtype)
        g = torch.Generator(device="cuda").manual_seed(1)
        gz = torch.randn(b, l, 2, device="cuda", generator=g).to(dtype)
        gf = torch.randn(b, fc, s, s, device="cuda", generator=g).to(dtype)
        fwd_b, tot_b = floor_bytes(b, l, s, s, ci, c, fc, t.element_size())
        fwd_floor, tot_floor = fwd_b / bandwidth / 1e6, tot_b / bandwidth / 1e6  # ms
        floors[dname] = fwd_floor

        # correctness at the timed shape, so that a wrong fast kernel cannot post a time
        with torch.no_grad():
            z, f = ops.decafa_head(t, im, e, mode=mode)
            zr, fr = reference.decafa_head(t.float(), im.float(), e.float(), mode=mode)
        errs = {"z": rel_err(z, zr), "fused": rel_err(f, fr)}
        del z, f, zr, fr
        limit = 1e-5 if dtype == torch.float32 else 1e-2
        print(f"{dname:9} relative error vs float32 reference: z {errs['z']:.2e}, fused {errs['fused']:.2e}")
        if max(errs.values()) > limit:
            print(f"FAIL: Triton decafa_head differs from the reference (limit {limit})", file=sys.stderr)
            return 1

        record(dname, "floor forward", fwd_floor)
        record(dname, "floor forward+backward", tot_floor)
        with torch.no_grad():
            record(dname, "triton forward", bench_ms(lambda: ops.decafa_head(t, im, e, mode=mode)), fwd_floor)
            record(dname, "triton forward cuda graph",
                   bench_ms(lambda: ops.decafa_head(t, im, e, mode=mode), graph=True), fwd_floor)
        leaves = [x.detach().requires_grad_(True) for x in (t, im, e)]

        def fwd_bwd():
            z, f = ops.decafa_head(*leaves, mode=mode)
            torch.autograd.backward([z, f], [gz, gf])

        record(dname, "triton forward+backward", bench_ms(fwd_bwd), tot_floor)
        del leaves

        # B = 1 latency: eager (Python + launches) and graph-replayed (GPU time)
        t1, i1, e1 = t[:1].clone(), im[:1].clone(), e[:1].clone()
        f1b, _ = floor_bytes(1, l, s, s, ci, c, fc, t.element_size())
        with torch.no_grad():
            record(dname, "triton forward B=1 eager", bench_ms(lambda: ops.decafa_head(t1, i1, e1, mode=mode)),
                   f1b / bandwidth / 1e6)
            record(dname, "triton forward B=1 cuda graph",
                   bench_ms(lambda: ops.decafa_head(t1, i1, e1, mode=mode), graph=True), f1b / bandwidth / 1e6)
            record(dname, "reference eager forward", bench_ms(lambda: reference.decafa_head(t, im, e, mode=mode)),
                   fwd_floor)
            if compiled_ref is not None:
                compiled_ref(t, im, e, mode=mode)
                record(dname, "reference compile forward", bench_ms(lambda: compiled_ref(t, im, e, mode=mode)),
                       fwd_floor)
        del t, im, e, gz, gf, t1, i1, e1
        torch.cuda.empty_cache()

    print("\n| dtype | case | time (us) | x floor |\n|---|---|---|---|")
    for r in rows:
        xf = f"{r['x_floor']:.2f}" if r["x_floor"] else ""
        print(f"| {r['dtype']} | {r['case']} | {r['ms'] * 1e3:.1f} | {xf} |")
    write_json()

    # Forward under one-at-a-time TUNING changes, until the time budget is spent.
    if args.sweep:
        base = dataclasses.asdict(tops.TUNING)
        for dname in dnames:
            t, im, e = inputs(DTYPES[dname])
            for field, values in SWEEP.items():
                for value in values:
                    if time.monotonic() > deadline:
                        print(f"sweep stopped: --budget-s {args.budget_s} spent")
                        write_json()
                        return 0
                    setattr(tops.TUNING, field, value)
                    try:
                        # chunks trade L2 hits for launches: time them from a CUDA graph too (GPU time only)
                        for graph in (False, True) if field == "chunk_bytes" else (False,):
                            with torch.no_grad():
                                ms = bench_ms(lambda: ops.decafa_head(t, im, e, mode=mode), graph=graph)
                            results["sweep"].append({"dtype": dname, field: value, "graph": graph, "ms": ms,
                                                     "x_floor": ms / floors[dname]})
                            print(f"{dname:9} sweep {field}={value:<10} forward{' graph' if graph else '      '} "
                                  f"{ms * 1e3:9.1f} us  {ms / floors[dname]:5.2f}x floor", flush=True)
                    except Exception as exc:  # a variant that does not compile (e.g. too many registers)
                        print(f"{dname:9} sweep {field}={value}: {type(exc).__name__}: {str(exc)[:200]}")
                    finally:
                        setattr(tops.TUNING, field, base[field])
            del t, im, e
            torch.cuda.empty_cache()
        write_json()
    return 0


if __name__ == "__main__":
    sys.exit(main())
