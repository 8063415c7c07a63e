#!/usr/bin/env python
"""Times each Triton per-map op on its own, the persistent kernels (decafa_fast/triton/persistent.py) beside
the per-run ones (stats.py), against the floor, on one GPU:

    python bench/triton_kernels.py [--batches 1,64] [--dtypes float32,bfloat16] [--budget-s S]
                                   [--json OUT.json] [--table-out TABLE.json]

Ops: decafa_head, soft_argmax, spatial_softmax, attention_mask, landmark_attention, each pass on its own:
"forward" (the op) and "backward" (its backward op: decafa_head_backward, spatial_softmax_backward,
landmark_attention_backward, which serves attention_mask and soft_argmax too). Backends "triton-persistent"
and "triton-runs" (decafa_fast.triton.ops.TUNING.map_kernel), eager and, at B = 1, replayed from a CUDA
graph (no Python launch overhead). Default shape: L = 98 maps of 128 x 128, Ci = 1, C = 64, F5.

A row: {"backend", "op", "pass", "dtype", "batch", "cuda_graph", "time_us" (median), "floor_us"} plus
"suite": "triton_kernels" and "gpu". floor_us = the bytes the call must move (every tensor it reads and
every tensor it returns, once) / the copy bandwidth measured at the start (bench/measure.py).
Rows are printed as they are measured and the JSON file (--json) is rewritten after each case, so a run cut
off by its time budget keeps what it measured. --table-out writes a tuning-table entry for this GPU model
(decafa_fast/triton/tuning_table.json format): the map_kernel whose forward + backward rows took less time
in total over the rows measured for both. Needs a CUDA GPU (exit status 2 otherwise); --allow-cpu runs it on
CPU tensors under TRITON_INTERPRET=1 (tiny shapes only: a test of the script).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/measure.py
KERNELS = ("persistent", "runs")
OPS = ("decafa_head", "soft_argmax", "spatial_softmax", "attention_mask", "landmark_attention")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="1,64")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--ops", default=",".join(OPS))
    p.add_argument("--kernels", default=",".join(KERNELS), help="TUNING.map_kernel values to race")
    p.add_argument("--maps", type=int, default=98)
    p.add_argument("--size", type=int, default=128, help="H = W")
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--no-graph", action="store_true", help="no CUDA-graph rows at B = 1")
    p.add_argument("--budget-s", type=float, default=1e9, help="start no case after this many seconds")
    p.add_argument("--json", default=None, help="write the rows here (rewritten after each case)")
    p.add_argument("--table-out", default=None, help="write a tuning-table entry for this GPU model here")
    p.add_argument("--allow-cpu", action="store_true", help="run on CPU under TRITON_INTERPRET=1 (tests)")
    args = p.parse_args(argv)
    for name in args.ops.split(","):
        if name not in OPS:
            p.error(f"--ops: unknown op {name!r} (known: {', '.join(OPS)})")
    for name in args.kernels.split(","):
        if name not in KERNELS:
            p.error(f"--kernels: unknown kernel family {name!r} (known: {', '.join(KERNELS)})")
    for name in args.dtypes.split(","):
        if name not in DTYPES:
            p.error(f"--dtypes: unknown dtype {name!r} (known: {', '.join(DTYPES)})")
    return args


def _calls(op: str, b: int, l: int, s: int, c: int, dtype: torch.dtype, device: torch.device):
    """{pass: (fn, tensors read, tensors returned by one call)} of one op at one size."""
    ns = torch.ops.decafa_triton
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype).to(device)

    t = rand(b, l, s, s)
    if op == "decafa_head":
        i, e = rand(b, 1, s, s), rand(b, c, s, s)
        out = ns.decafa_head(t, i, e, 5, 1.0, None, True)
        z, f, m, stats = out
        gz, gf = rand(*z.shape), rand(*f.shape)
        back = (gz, gf, t, i, e, m, stats)
        return {"forward": (lambda: ns.decafa_head(t, i, e, 5, 1.0, None, True), (t, i, e), out),
                "backward": (lambda: ns.decafa_head_backward(*back, 5, 1.0, None, True), back,
                             ns.decafa_head_backward(*back, 5, 1.0, None, True))}
    if op == "spatial_softmax":
        out = ns.spatial_softmax(t, 1.0, None)
        back = (rand(*t.shape), t, out[1])
        return {"forward": (lambda: ns.spatial_softmax(t, 1.0, None), (t,), out),
                "backward": (lambda: ns.spatial_softmax_backward(*back, 1.0, None), back,
                             ns.spatial_softmax_backward(*back, 1.0, None))}
    if op == "soft_argmax":
        out = ns.soft_argmax(t, 1.0, None, True)
        back = (rand(*out[0].shape), None, t, out[1])
    elif op == "attention_mask":
        out = ns.attention_mask(t, 1.0, None)
        back = (None, rand(*out[0].shape), t, out[1])
    else:
        out = ns.landmark_attention(t, 1.0, None, True)
        back = (rand(*out[0].shape), rand(*out[1].shape), t, out[2])
    fwd = {"soft_argmax": lambda: ns.soft_argmax(t, 1.0, None, True),
           "attention_mask": lambda: ns.attention_mask(t, 1.0, None),
           "landmark_attention": lambda: ns.landmark_attention(t, 1.0, None, True)}[op]
    return {"forward": (fwd, (t,), out),
            "backward": (lambda: ns.landmark_attention_backward(*back, 1.0, None, True), back,
                         ns.landmark_attention_backward(*back, 1.0, None, True))}


def _bytes(tensors) -> int:
    return sum(x.numel() * x.element_size() for x in tensors if isinstance(x, torch.Tensor))


def best_kernel(rows: list[dict]) -> str | None:
    """The map_kernel with less total eager time over the (op, pass, dtype, batch) cases measured for every
    kernel family present, or None without such a case."""
    times: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if not r["cuda_graph"]:
            key = (r["op"], r["pass"], r["dtype"], r["batch"])
            times.setdefault(key, {})[r["backend"].removeprefix("triton-")] = r["time_us"]
    families = {k for per in times.values() for k in per}
    complete = [per for per in times.values() if set(per) == families]
    if len(families) < 2 or not complete:
        return None
    return min(families, key=lambda k: sum(per[k] for per in complete))


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    if args.allow_cpu and not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        print("triton_kernels.py: no CUDA GPU (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    import measure
    import triton

    from decafa_fast.triton import ops as tops

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)"
    bandwidth = measure.copy_bandwidth(device, None if device.type == "cuda" else 1 << 20, repeats=3)
    print(f"device {gpu}, copy bandwidth {bandwidth / 1e9:.0f} GB/s, triton {triton.__version__}")
    rows: list[dict] = []
    saved = tops.TUNING.map_kernel
    stopped = None
    try:
        for dtype_name in args.dtypes.split(","):
            for b in (int(x) for x in args.batches.split(",")):
                for op in args.ops.split(","):
                    for kernel in args.kernels.split(","):
                        if time.perf_counter() - start > args.budget_s:
                            stopped = f"budget of {args.budget_s:.0f} s spent before {op} B={b} {dtype_name}"
                            raise StopIteration
                        tops.TUNING.map_kernel = kernel
                        calls = _calls(op, b, args.maps, args.size, args.channels, DTYPES[dtype_name], device)
                        for pass_, (fn, reads, out) in calls.items():
                            floor_us = (_bytes(reads) + _bytes(out)) / bandwidth * 1e6
                            graphs = [False] + ([True] if b == 1 and device.type == "cuda"
                                                and not args.no_graph else [])
                            for graph in graphs:
                                run = measure.cuda_graph(fn) if graph else fn
                                ms, _ = measure.median_ms(run, args.reps, device)
                                row = dict(backend=f"triton-{kernel}", op=op, **{"pass": pass_}, dtype=dtype_name,
                                           batch=b, cuda_graph=graph, time_us=ms * 1e3, floor_us=floor_us,
                                           suite="triton_kernels", gpu=gpu)
                                rows.append(row)
                                print(f"{op:18} {pass_:8} {dtype_name:8} B={b:<3} {row['backend']:17} "
                                      f"graph={int(graph)} {row['time_us']:9.1f} us  floor {floor_us:8.1f} us  "
                                      f"{row['time_us'] / floor_us:5.2f}x", flush=True)
                        if args.json:
                            Path(args.json).write_text(json.dumps({"gpu": gpu, "rows": rows}, indent=1))
    except StopIteration:
        print(f"stopped: {stopped}")
    finally:
        tops.TUNING.map_kernel = saved
    winner = best_kernel(rows)
    if args.table_out:
        entry = {} if winner is None else {"map_kernel": winner}
        Path(args.table_out).write_text(json.dumps({"default": {}, "gpus": {gpu: entry}}, indent=1))
        print(f"tuning-table entry for {gpu}: {entry} -> {args.table_out}")
    if args.json:
        Path(args.json).write_text(json.dumps({"gpu": gpu, "rows": rows, "best_map_kernel": winner}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
