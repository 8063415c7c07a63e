#!/usr/bin/env python
"""The fused head's kernels once each, for a profiler: decafa_head forward and forward + backward on one
backend at the paper shape (B, L = 98, 128 x 128, C = 64, Ci = 1, F5), after warm-up calls, between
cudaProfilerStart and cudaProfilerStop, so that `ncu --profile-from-start off` profiles exactly one call of
each kernel per dtype (bench/gpu_check.sh runs it under ncu with DECAFA_CUDA_MAPS unset and =ring):

    ncu --profile-from-start off --section SpeedOfLight ... python bench/ncu_head.py [--batch 64]

--device cpu runs the same calls on the CPU backend without the profiler calls (to test the script).
"""
from __future__ import annotations

import argparse
import sys

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=128, help="H = W")
    p.add_argument("--maps", type=int, default=98)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--backend", default="cuda")
    p.add_argument("--device", default="cuda")
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args(argv)
    for d in args.dtypes.split(","):
        if d not in DTYPES:
            p.error(f"--dtypes: {d!r} is not one of {sorted(DTYPES)}")
    if args.batch < 1:
        p.error("--batch must be >= 1")
    return args


def run(args: argparse.Namespace) -> int:
    from decafa_fast import ops

    device = torch.device(args.device)
    profile = device.type == "cuda"
    if profile and not torch.cuda.is_available():
        print("bench/ncu_head.py needs a CUDA GPU (or --device cpu)", file=sys.stderr)
        return 2
    b, l, s, c = args.batch, args.maps, args.size, args.channels
    calls = []
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        g = torch.Generator(device=device).manual_seed(0)
        x = [(3 * torch.randn(b, l, s, s, device=device, generator=g)).to(dtype),
             torch.rand(b, 1, s, s, device=device, generator=g).to(dtype),
             torch.randn(b, c, s, s, device=device, generator=g).to(dtype)]
        leaves = [t.clone().requires_grad_() for t in x]
        grads = None

        def forward(x=x):
            with torch.no_grad():
                return ops.decafa_head(*x)

        def forward_backward(leaves=leaves):
            nonlocal grads
            out = ops.decafa_head(*leaves)
            if grads is None:
                grads = [torch.randn_like(o) for o in out]
            torch.autograd.backward(out, grads)
            return out

        calls += [(name, "forward", forward), (name, "forward+backward", forward_backward)]
    with ops.use_backend(args.backend):
        for _ in range(args.warmup):
            for _, _, fn in calls:
                fn()
        if profile:
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStart()
        for name, what, fn in calls:
            fn()
            print(f"ncu_head: {args.backend} {name} {what} B={b}", flush=True)
        if profile:
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaProfilerStop()
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
