#!/usr/bin/env python
"""Races the GPU backends' decafa_head (Triton and CUDA C++) against each other, the plain-PyTorch reference
(eager and under torch.compile) and the floor, on one GPU.

The floor is the bytes that must move (bench/measure.py's floor_bytes) divided by the copy bandwidth
measured in this run:
    forward:            read T, I, E once; write F and z once
    forward + backward: the forward floor, plus read grad_F, grad_z, T, I, E and write grad_T, grad_I, grad_E
Default: the tuned case B = 64, L = 98, 128 x 128, C = 64, Ci = 1, F5, in float32 and bfloat16, forward and
forward + backward, plus the B = 1 forward latency (eager, and replayed from a CUDA graph, which removes the
Python launch overhead). Every GPU case of every dtype runs before the references (torch.compile compiles
for tens of seconds); `--budget-s` bounds the whole script: each case checks it before it starts, and the
JSON file is rewritten after every case. `--sweep` also times the Triton forward under one-at-a-time changes of
decafa_fast.triton.ops.TUNING. Needs a CUDA GPU (exits with status 2 and a message otherwise):

    python bench/head_floor.py [--backends triton,cuda] [--sweep] [--json out.json]
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import Callable

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
GPU_BACKENDS = ("triton", "cuda")

# One-at-a-time variations of the Triton Tuning defaults for --sweep (fields TUNING lacks are skipped).
SWEEP = {
    "mask_runs": [2, 8],
    "map_warps": [16],
    "map_tile": [8192],
    "fuse_block_p": [128, 512],
    "fuse_min_programs": [0, 1056],
    "fuse_block_c": [4, 16],
    "fuse_warps": [2, 8],
    "interleaved_whole_maps": [False],  # channels_last T only (--channels-last)
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--maps", type=int, default=98, help="L, landmark maps")
    p.add_argument("--size", type=int, default=128, help="H = W")
    p.add_argument("--channels", type=int, default=64, help="C, embedding channels")
    p.add_argument("--image-channels", type=int, default=1)
    p.add_argument("--mode", default="F5", choices=["F1", "F2", "F3", "F4", "F5"])
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32,float16,bfloat16")
    p.add_argument("--backends", default=",".join(GPU_BACKENDS), help="GPU backends to race (those available)")
    p.add_argument("--reps", type=int, default=30, help="timed repetitions per case (median reported)")
    p.add_argument("--channels-last", action="store_true", help="T, I and E in channels_last memory format")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile reference")
    p.add_argument("--sweep", action="store_true", help="also time the Triton forward under TUNING variations")
    p.add_argument("--budget-s", type=float, default=1e9,
                   help="start no case (nor sweep point) after the script has run this many seconds")
    p.add_argument("--json", help="write all numbers to this file")
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------
_L2_FLUSH: torch.Tensor | None = None


@contextlib.contextmanager
def pixel_split(groups: int | None):
    """The CUDA C++ forward's pixel kernel with `groups` channel groups forced (None: its own choice) inside
    the block, the setting before it restored after."""
    from decafa_fast.ops import cuda_runs

    saved = cuda_runs.pixel_split()
    cuda_runs.set_pixel_split(groups)
    try:
        yield
    finally:
        cuda_runs.set_pixel_split(saved)


def time_ms(fn: Callable[[], object], reps: int, flush: bool = True) -> float:
    """Median time of fn() in ms from CUDA events around each call; the L2 cache is flushed before each
    call (so that a call cannot read what the previous one left there) unless flush=False."""
    import measure  # bench/measure.py, beside this script

    global _L2_FLUSH
    if _L2_FLUSH is None:
        _L2_FLUSH = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    return measure.median_ms(fn, reps, torch.device("cuda"), before_each=_L2_FLUSH.zero_ if flush else None)[0]


def graph_time_ms(fn: Callable[[], object], reps: int) -> float:
    """Median time of fn() captured once in a CUDA graph and replayed: GPU time without launch overhead."""
    import measure

    return time_ms(measure.cuda_graph(fn), reps)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


# --------------------------------------------------------------------------------------------------
# The race
# --------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    deadline = time.monotonic() + args.budget_s
    if not torch.cuda.is_available():
        print("bench/head_floor.py needs a CUDA GPU: torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    return race(args, torch.device("cuda"), GPU_BACKENDS, deadline)


def race(args: argparse.Namespace, device: torch.device, racers: tuple[str, ...], deadline: float) -> int:
    """Times every case on `device`; `racers` are the backends that may race (the tests run this on CPU)."""
    import measure as B  # bench/measure.py, beside this script

    from decafa_fast import ops, reference

    status = ops.backends()
    wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
    backends = [b for b in wanted if b in racers and status.get(b, "").startswith("available")]
    for b in wanted:
        if b not in backends:
            print(f"backend {b!r} skipped: {status.get(b, 'not a GPU backend')}")
    if not backends:
        print(f"bench/head_floor.py: none of {wanted} is available", file=sys.stderr)
        return 2

    facts = B.device_facts()
    name = facts.get("cuda_device", {}).get("name") if device.type == "cuda" else facts["cpu_model"]
    bandwidth = B.copy_bandwidth(device)  # bytes/s, read + write
    info = {"device": name, "copy_gbs": bandwidth / 1e9, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            **B.device_snapshot(device), "machine": facts}
    print(f"device {name}; copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write); backends "
          f"{', '.join(backends)}", flush=True)
    if "triton" in backends:
        from decafa_fast.triton import ops as tops

        info["triton_tuning"] = dataclasses.asdict(tops.TUNING)

    b, l, s, c, ci, mode = args.batch, args.maps, args.size, args.channels, args.image_channels, args.mode
    fc = reference.fused_channels(mode, ci, c)
    compiled_ref = None if args.no_compile else torch.compile(reference.decafa_head)
    results = {"info": info, "shape": vars(args), "cases": [], "sweep": []}

    def head(name: str) -> Callable:
        """decafa_head on backend `name` (ops.* are plain functions for the references)."""
        if name == "reference eager":
            return lambda *a: reference.decafa_head(*a, mode=mode)
        if name == "reference compile":
            return lambda *a: compiled_ref(*a, mode=mode)

        def run(*a):
            before = ops.get_backend()
            ops.set_backend(name)
            try:
                return ops.decafa_head(*a, mode=mode)
            finally:
                ops.set_backend(before)
        return run

    def record(dname: str, case: str, ms: float, floor_ms: float | None) -> None:
        ratio = ms / floor_ms if floor_ms else None
        results["cases"].append({"dtype": dname, "case": case, "ms": ms, "floor_ms": floor_ms, "x_floor": ratio})
        write_json(args.json, results)  # after every case: a run cut off by a time limit keeps what it measured
        print(f"{dname:9} {case:40} {ms * 1e3:10.1f} us" + (f"  {ratio:5.2f}x floor" if ratio else ""), flush=True)

    def inputs(dtype: torch.dtype, batch: int) -> tuple[torch.Tensor, ...]:
        g = torch.Generator(device=device).manual_seed(0)
        fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        return tuple(x.to(dtype).contiguous(memory_format=fmt) for x in (
            3 * torch.randn(batch, l, s, s, device=device, generator=g),
            torch.rand(batch, ci, s, s, device=device, generator=g),
            torch.randn(batch, c, s, s, device=device, generator=g)))

    def floor_ms(tensors, batch: int, backward: bool) -> float:
        dtype = tensors[0].dtype  # meta tensors: shapes and sizes only
        outputs = [torch.empty(batch, l, 2, dtype=dtype, device="meta"),
                   torch.empty(batch, fc, s, s, dtype=dtype, device="meta")]
        return B.floor_bytes(tensors, outputs, backward, grad_inputs=tensors) / bandwidth * 1e3

    def due(what: str) -> bool:
        """True when the budget is spent: each case checks before it starts."""
        if time.monotonic() > deadline:
            print(f"skipped (out of time, --budget-s {args.budget_s}): {what}", flush=True)
            return True
        return False

    def time_variant(dname: str, name: str, x, leaves, grads, fwd_floor: float, total_floor: float) -> None:
        fn = head(name)

        def fwd_bwd():
            for t in leaves:
                t.grad = None
            torch.autograd.backward(fn(*leaves), grads)

        try:
            with torch.no_grad():
                if not due(f"{dname} {name} forward"):
                    record(dname, f"{name} forward", time_ms(lambda: fn(*x), args.reps), fwd_floor)
                if name in backends and not due(f"{dname} {name} forward cuda graph"):
                    record(dname, f"{name} forward cuda graph", graph_time_ms(lambda: fn(*x), args.reps), fwd_floor)
            if not due(f"{dname} {name} forward+backward"):
                record(dname, f"{name} forward+backward", time_ms(fwd_bwd, max(5, args.reps // 2)), total_floor)
        except torch.cuda.OutOfMemoryError:
            print(f"{dname:9} {name}: out of memory")
        torch.cuda.empty_cache()

    def time_without_pixel_split(dname: str, fn: Callable, one, one_floor: float) -> None:
        """The CUDA C++ forward at B = 1 with the pixel kernel's channels not split across CTAs (one group, as
        before the split: fewer CTAs), beside the launcher's own choice timed above."""
        with pixel_split(1), torch.no_grad():
            for case, timer in (("eager", lambda: time_ms(lambda: fn(*one), args.reps * 3, flush=False)),
                                ("cuda graph", lambda: graph_time_ms(lambda: fn(*one), args.reps * 3))):
                if not due(f"{dname} cuda forward B=1 {case}, pixel split 1"):
                    record(dname, f"cuda forward B=1 {case}, pixel split 1", timer(), one_floor)

    # Every GPU case of every dtype first (what a cut-off run must not lose), then the references:
    # torch.compile spends tens of seconds compiling before its first time.
    dnames = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    floors, prepared = {}, {}
    for dname in dnames:
        dtype = DTYPES[dname]
        x = inputs(dtype, b)
        fwd_floor, total_floor = floor_ms(x, b, False), floor_ms(x, b, True)
        floors[dname] = fwd_floor
        record(dname, "floor forward", fwd_floor, None)
        record(dname, "floor forward+backward", total_floor, None)

        # correctness at the timed shape, so that a wrong fast kernel cannot post a time
        with torch.no_grad():
            want = reference.decafa_head(*(t.float() for t in x), mode=mode)
            for name in backends:
                got = head(name)(*x)
                errs = [rel_err(g_, w_) for g_, w_ in zip(got, want)]
                limit = 1e-5 if dtype == torch.float32 else 1e-2
                print(f"{dname:9} {name}: relative error vs the float32 reference z {errs[0]:.2e}, "
                      f"fused {errs[1]:.2e}")
                if max(errs) > limit:
                    print(f"FAIL: {name} decafa_head differs from the reference (limit {limit})", file=sys.stderr)
                    return 1

        g = torch.Generator(device=device).manual_seed(1)
        grads = (torch.randn(b, l, 2, device=device, generator=g).to(dtype),
                 torch.randn(b, fc, s, s, device=device, generator=g).to(dtype))
        leaves = [t.detach().clone().requires_grad_() for t in x]
        prepared[dname] = (x, leaves, grads, fwd_floor, total_floor)
        for name in backends:
            time_variant(dname, name, x, leaves, grads, fwd_floor, total_floor)

        # B = 1 latency (target 15 us): eager (Python + launches) and replayed from a CUDA graph (GPU time)
        one = tuple(t[:1].clone() for t in x)
        one_floor = floor_ms(one, 1, False)
        for name in backends:
            fn = head(name)
            with torch.no_grad():
                if not due(f"{dname} {name} forward B=1 eager"):
                    record(dname, f"{name} forward B=1 eager", time_ms(lambda: fn(*one), args.reps * 3, flush=False),
                           one_floor)
                if not due(f"{dname} {name} forward B=1 cuda graph"):
                    record(dname, f"{name} forward B=1 cuda graph", graph_time_ms(lambda: fn(*one), args.reps * 3),
                           one_floor)
        if "cuda" in backends:
            time_without_pixel_split(dname, head("cuda"), one, one_floor)
        torch.cuda.empty_cache()

    for dname in dnames:
        for name in ["reference eager"] + (["reference compile"] if compiled_ref else []):
            time_variant(dname, name, *prepared[dname])
        torch.cuda.empty_cache()

    print("\n| dtype | case | time (us) | x floor |\n|---|---|---|---|")
    for r in results["cases"]:
        x_floor = f"{r['x_floor']:.2f}" if r["x_floor"] else ""
        print(f"| {r['dtype']} | {r['case']} | {r['ms'] * 1e3:.1f} | {x_floor} |")
    if args.sweep and "triton" in backends:
        sweep_triton(args, deadline, results, floors, lambda dtype: inputs(dtype, b), head("triton"))
    return 0


def write_json(path: str | None, results: dict) -> None:
    if path:
        with open(path, "w") as fh:
            json.dump(results, fh, indent=1)


def sweep_triton(args, deadline: float, results: dict, floors: dict, inputs: Callable, head: Callable) -> None:
    """The Triton forward under one-at-a-time TUNING changes, until `deadline` (time.monotonic())."""
    from decafa_fast.triton import ops as tops

    base = dataclasses.asdict(tops.TUNING)
    for dname in (d.strip() for d in args.dtypes.split(",") if d.strip()):
        x = inputs(DTYPES[dname])
        for field, values in SWEEP.items():
            if field not in base:
                print(f"sweep: decafa_fast.triton.ops.TUNING has no field {field!r}, skipped")
                continue
            if field == "interleaved_whole_maps" and not args.channels_last:
                continue  # NCHW maps are whole either way
            for value in values:
                if time.monotonic() > deadline:
                    print(f"sweep stopped: --budget-s {args.budget_s} spent")
                    write_json(args.json, results)
                    return
                setattr(tops.TUNING, field, value)
                try:
                    # runs trade bytes for programs: time them from a CUDA graph too (GPU time only)
                    for graph in (False, True) if field == "mask_runs" else (False,):
                        with torch.no_grad():
                            call = lambda: head(*x)  # noqa: E731
                            ms = graph_time_ms(call, args.reps) if graph else time_ms(call, args.reps)
                        results["sweep"].append({"dtype": dname, field: value, "graph": graph, "ms": ms,
                                                 "x_floor": ms / floors[dname]})
                        print(f"{dname:9} sweep {field}={value:<10} forward{' graph' if graph else '      '} "
                              f"{ms * 1e3:9.1f} us  {ms / floors[dname]:5.2f}x floor", flush=True)
                except Exception as exc:  # a variant that does not compile (e.g. too many registers)
                    print(f"{dname:9} sweep {field}={value}: {type(exc).__name__}: {str(exc)[:200]}")
                finally:
                    setattr(tops.TUNING, field, base[field])
        torch.cuda.empty_cache()
    write_json(args.json, results)


if __name__ == "__main__":
    sys.exit(main())
