#!/usr/bin/env python
"""Times the whole DeCaFA model (S = 4, 98/68/5, F5, 128 x 128) on one GPU for bench/gpu_check.sh, inside a
deadline, cheapest and most telling cases first:

1. eager inference at B = 1 and B = 64, bfloat16 weights and images, channels_last, for the reference ops
   and each available GPU backend (triton, cuda): the fused ops' gain as a ratio measured in one run;
2. the same B = 1 cases replayed from a CUDA graph (GPU time without Python and launch overhead);
3. only then, while time remains, torch.compile(mode="reduce-overhead") at B = 1 per backend (each one
   compiles the whole network, tens of seconds).

Each case checks the deadline before it starts, and the JSON file is rewritten after every case, so a run
cut off by its time limit keeps what it measured. Needs a CUDA GPU (exit status 2 otherwise):

    python bench/model_check.py --json model.json [--budget-s 100] [--backends reference,triton,cuda]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # bench/'s modules import each other by name
    sys.path.insert(0, str(HERE))

import measure  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default="reference,triton,cuda")
    p.add_argument("--batches", default="1,64", help="eager batch sizes")
    p.add_argument("--reps", type=int, default=20, help="timed repetitions per case (median reported)")
    p.add_argument("--budget-s", type=float, default=1e9, help="start no case after this many seconds")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile cases")
    p.add_argument("--tiny", action="store_true", help="a two-stage toy model (checks the machinery)")
    p.add_argument("--json", help="write all numbers to this file (after every case)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/model_check.py needs a CUDA GPU: torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    return run(args, torch.device("cuda"), ("triton", "cuda"), time.monotonic() + args.budget_s)


def run(args: argparse.Namespace, device: torch.device, gpu_backends: tuple[str, ...], deadline: float) -> int:
    """All cases on `device`; `gpu_backends` are the fused backends allowed (the tests pass ("cpp",) on CPU)."""
    from decafa_fast import ops
    from decafa_fast.app.model import DeCaFA, DeCaFAConfig

    status = ops.backends()
    wanted = [b.strip() for b in args.backends.split(",") if b.strip()]
    backends = [b for b in wanted
                if b == "reference" or (b in gpu_backends and status.get(b, "").startswith("available"))]
    for b in wanted:
        if b not in backends:
            print(f"backend {b!r} skipped: {status.get(b, 'not a backend for this device')}")
    cfg = (DeCaFAConfig(stages=2, image_size=32, widths=(8, 8, 8), embedding_channels=8) if args.tiny
           else DeCaFAConfig())
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = DeCaFA(cfg).to(device=device, dtype=dtype, memory_format=torch.channels_last).eval()
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "dtype": str(dtype).replace("torch.", ""), "cases": []}
    reference_ms: dict[tuple, float] = {}

    def images(batch: int) -> torch.Tensor:
        g = torch.Generator(device=device).manual_seed(batch)
        x = torch.rand(batch, cfg.image_channels, cfg.image_size, cfg.image_size, device=device, generator=g)
        return x.to(dtype).contiguous(memory_format=torch.channels_last)

    def case(name: str, backend: str, batch: int, make: Callable[[], Callable[[], object]]) -> None:
        if time.monotonic() > deadline:
            print(f"skipped (out of time): {name} {backend} B={batch}", flush=True)
            return
        try:
            with ops.use_backend(backend), torch.no_grad():
                ms = measure.median_ms(make(), args.reps, device)[0]
        except Exception as exc:  # one failing case must not cost the others their numbers
            print(f"FAILED {name} {backend} B={batch}: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            results["cases"].append({"case": name, "backend": backend, "batch": batch, "error": str(exc)[:300]})
            write_json(args.json, results)
            return
        row = {"case": name, "backend": backend, "batch": batch, "ms": ms, "images_per_s": batch / ms * 1e3}
        if backend == "reference":
            reference_ms[(name, batch)] = ms
        elif (name, batch) in reference_ms:
            row["speedup"] = reference_ms[(name, batch)] / ms
        results["cases"].append(row)
        write_json(args.json, results)
        speed = f"  {row['speedup']:.2f}x the reference" if "speedup" in row else ""
        print(f"{name:28} {backend:10} B={batch:<4} {ms:9.3f} ms{speed}", flush=True)

    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    for batch in batches:  # 1. eager
        x = images(batch)
        for backend in backends:
            case("eager", backend, batch, lambda x=x: (lambda: model(x)))
    if device.type == "cuda":  # 2. CUDA graphs at B = 1
        x = images(1)
        for backend in backends:
            case("eager cuda graph", backend, 1, lambda x=x: measure.cuda_graph(lambda: model(x)))
    if not args.no_compile:  # 3. compiled, while time remains
        x = images(1)
        mode = "reduce-overhead" if device.type == "cuda" else None

        def compiled_call(x=x):
            compiled = torch.compile(model, mode=mode)
            return lambda: compiled(x)

        for backend in backends:
            torch._dynamo.reset()
            case(f"compile {mode or 'default'}", backend, 1, compiled_call)
    write_json(args.json, results)
    print("\n| case | backend | B | ms | images/s | x reference |\n|---|---|---|---|---|---|")
    for r in results["cases"]:
        if "ms" in r:
            speed = f"{r['speedup']:.2f}" if "speedup" in r else ""
            print(f"| {r['case']} | {r['backend']} | {r['batch']} | {r['ms']:.3f} | {r['images_per_s']:.0f} "
                  f"| {speed} |")
    return 1 if any("error" in r for r in results["cases"]) else 0


def write_json(path: str | None, results: dict) -> None:
    if path:
        with open(path, "w") as fh:
            json.dump(results, fh, indent=1)


if __name__ == "__main__":
    sys.exit(main())
