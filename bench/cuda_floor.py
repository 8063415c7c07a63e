#!/usr/bin/env python
"""Times decafa_head (forward, and forward + backward) on the "cuda" backend against the plain-PyTorch
reference (eager and under torch.compile), the Triton backend where available, and the floor.

The floor is the bytes that must move divided by the device-to-device copy bandwidth measured in the same
run (bytes read + bytes written by a large tensor copy):
    forward:            read T, I, E once; write F and z once
    forward + backward: the forward floor, plus read grad_F, grad_z, T, I, E and write grad_T, grad_I, grad_E
Default shape: the tuned case, B = 64, L = 98, 128 x 128, C = 64, Ci = 1, F5, float32 and bfloat16, plus the
B = 1 forward latency. Needs a CUDA GPU (exits with status 2 and a message otherwise):

    python bench/cuda_floor.py                 # table on stdout
    python bench/cuda_floor.py --json out.json # also the raw numbers
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
from typing import Callable

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--maps", type=int, default=98, help="L, landmark maps")
    p.add_argument("--size", type=int, default=128, help="H = W")
    p.add_argument("--channels", type=int, default=64, help="C, embedding channels")
    p.add_argument("--image-channels", type=int, default=1)
    p.add_argument("--mode", default="F5", choices=["F1", "F2", "F3", "F4", "F5"])
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32,float16,bfloat16")
    p.add_argument("--reps", type=int, default=20, help="timed repetitions per case (median reported)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile reference")
    p.add_argument("--json", help="write all numbers to this file")
    return p.parse_args(argv)


def time_ms(fn: Callable[[], object], reps: int, warmup: int = 3) -> float:
    """Median wall time of fn() in milliseconds, measured with CUDA events around each call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_time_ms(fn: Callable[[], object], reps: int) -> float:
    """Median time of fn() captured in a CUDA graph and replayed: the GPU time without the Python/dispatcher
    launch overhead (which dominates at B = 1)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return time_ms(graph.replay, reps)


def copy_bandwidth_gbs(reps: int) -> float:
    """Device-to-device copy bandwidth (read + write bytes per second) of a 1 GiB tensor copy, in GB/s."""
    src = torch.empty(1 << 28, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), reps)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def floor_bytes(b, l, h, w, ci, c, fused_c, elem) -> tuple[int, int]:
    """(forward bytes, forward + backward bytes) that must move."""
    t, i, e, f, z = b * l * h * w, b * ci * h * w, b * c * h * w, b * fused_c * h * w, b * l * 2
    forward = (t + i + e + f + z) * elem
    backward = (f + z + t + i + e + t + i + e) * elem
    return forward, forward + backward


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/cuda_floor.py needs a CUDA GPU: torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    from decafa_fast import ops, reference

    status = ops.backends()
    if not status["cuda"].startswith("available"):
        print(f"bench/cuda_floor.py: the 'cuda' backend is not available: {status['cuda']}", file=sys.stderr)
        return 2
    backends = ["cuda"] + (["triton"] if status["triton"].startswith("available") else [])

    device_name = torch.cuda.get_device_name()
    bandwidth = copy_bandwidth_gbs(args.reps)
    print(f"device: {device_name}; copy bandwidth {bandwidth:.0f} GB/s (read + write)")

    b, l, s, c, ci, mode = args.batch, args.maps, args.size, args.channels, args.image_channels, args.mode
    fused_c = reference.fused_channels(mode, ci, c)
    compiled_ref = None if args.no_compile else torch.compile(reference.decafa_head)
    rows, results = [], []
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname.strip()]
        g = torch.Generator(device="cuda").manual_seed(0)
        logits = 3 * torch.randn(b, l, s, s, device="cuda", generator=g).to(dtype)
        image = torch.rand(b, ci, s, s, device="cuda", generator=g).to(dtype)
        embed = torch.randn(b, c, s, s, device="cuda", generator=g).to(dtype)
        grad_z = torch.randn(b, l, 2, device="cuda", generator=g).to(dtype)
        grad_f = torch.randn(b, fused_c, s, s, device="cuda", generator=g).to(dtype)
        fwd_floor, total_floor = floor_bytes(b, l, s, s, ci, c, fused_c, logits.element_size())
        fwd_floor_ms = fwd_floor / (bandwidth * 1e9) * 1e3
        total_floor_ms = total_floor / (bandwidth * 1e9) * 1e3

        # name -> (function, environment while timing it)
        variants: dict[str, tuple[Callable, dict[str, str]]] = {"reference eager": (reference.decafa_head, {})}
        if compiled_ref is not None:
            variants["reference compile"] = (compiled_ref, {})
        for name in backends:
            variants[name] = ((lambda name: lambda *a: _with_backend(ops, name, a))(name), {})
        variants["cuda (no batch chunks)"] = (lambda *a: _with_backend(ops, "cuda", a),
                                              {"DECAFA_CUDA_BATCH_CHUNK": "1000000"})

        # correctness at the timed shape, so that a wrong fast kernel cannot post a time
        with torch.no_grad():
            z_ref, f_ref = reference.decafa_head(logits.float(), image.float(), embed.float(), mode, 1.0, False)
            z_got, f_got = _with_backend(ops, "cuda", (logits, image, embed, mode, 1.0, False))
            err = max(((z_got.float() - z_ref).norm() / z_ref.norm()).item(),
                      ((f_got.float() - f_ref).norm() / f_ref.norm()).item())
        print(f"{dname}: cuda vs reference relative error {err:.2e}")

        for vname, (fn, env) in variants.items():
            def forward(fn=fn):
                with torch.no_grad():
                    return fn(logits, image, embed, mode, 1.0, False)

            leaves = [t.detach().clone().requires_grad_() for t in (logits, image, embed)]

            def forward_backward(fn=fn, leaves=leaves):
                for t in leaves:
                    t.grad = None
                z, f = fn(*leaves, mode, 1.0, False)
                torch.autograd.backward((z, f), (grad_z, grad_f))

            try:
                with _environment(env):
                    fwd_ms = time_ms(forward, args.reps)
                    fb_ms = time_ms(forward_backward, max(3, args.reps // 2))
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                rows.append((dname, vname, "OOM", "", "", ""))
                continue
            torch.cuda.empty_cache()
            rows.append((dname, vname, f"{fwd_ms:.3f}", f"{fwd_ms / fwd_floor_ms:.2f}x",
                         f"{fb_ms:.3f}", f"{fb_ms / total_floor_ms:.2f}x"))
            results.append({"dtype": dname, "variant": vname, "forward_ms": fwd_ms, "forward_x_floor":
                            fwd_ms / fwd_floor_ms, "fwd_bwd_ms": fb_ms, "fwd_bwd_x_floor": fb_ms / total_floor_ms})
        rows.append((dname, "floor", f"{fwd_floor_ms:.3f}", "1.00x", f"{total_floor_ms:.3f}", "1.00x"))

        # B = 1 forward latency (target: 15 us or less), eagerly and replayed from a CUDA graph
        one = [t[:1].contiguous() for t in (logits, image, embed)]
        for name in backends:
            with torch.no_grad():
                call = (lambda name: lambda: _with_backend(ops, name, (*one, mode, 1.0, False)))(name)
                us = 1e3 * time_ms(call, args.reps * 5)
                try:
                    graph_us = 1e3 * graph_time_ms(call, args.reps * 5)
                except RuntimeError as exc:  # capture not possible: report, keep going
                    print(f"{name}: CUDA graph capture failed: {exc}", file=sys.stderr)
                    graph_us = float("nan")
            rows.append((dname, f"{name} B=1 forward", f"{us / 1e3:.4f}", f"({us:.1f} us)",
                         f"graph {graph_us:.1f} us", ""))
            results.append({"dtype": dname, "variant": f"{name} B=1", "forward_us": us, "graph_us": graph_us})
        del logits, image, embed, grad_z, grad_f
        torch.cuda.empty_cache()

    header = ("dtype", "variant", "fwd ms", "fwd/floor", "fwd+bwd ms", "fwd+bwd/floor")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    print(f"\ndecafa_head {mode}: B={b} L={l} {s}x{s} C={c} Ci={ci} on {device_name}")
    for r in [header] + rows:
        print("  ".join(str(v).ljust(wd) for v, wd in zip(r, widths)))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": device_name, "copy_gbs": bandwidth, "shape": vars(args), "results": results},
                      fh, indent=2)
    return 0


def _with_backend(ops, name: str, args: tuple):
    before = ops.get_backend()
    ops.set_backend(name)
    try:
        return ops.decafa_head(*args)
    finally:
        ops.set_backend(before)


@contextlib.contextmanager
def _environment(env: dict[str, str]):
    """Sets environment variables for the duration of the block (the CUDA launchers read them per call)."""
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


if __name__ == "__main__":
    sys.exit(main())
