#!/usr/bin/env python
"""Times every decafa_fast op on the CPU against its memory floor, under both CPU allocator settings, in one run.

The CPU counterpart of bench/head_floor.py. For each case (op, pass, dtype, B) it prints:
    floor ms      the op's floor bytes (bench/measure.py's floor_bytes: inputs read once, outputs written
                  once; forward+backward adds the upstream gradients, the inputs again and the input
                  gradients) divided by the copy bandwidth measured in the same run: the higher of the two
                  processes' measurements (a copy into a buffer allocated beforehand does not depend on the
                  allocator setting, and other load on the machine can only lower it), so that both
                  settings' ratios share one floor; each process's own measurement is in the JSON
    cpp, reference, torch.compile, kornia
                  median ms of --reps calls after --warmup calls: decafa_fast.ops on backend "cpp", the same
                  ops on backend "reference" (eager PyTorch), torch.compile of decafa_fast.reference's function
                  (compiled afresh for each case, static shapes; the first call's time, which compiles, is
                  reported apart as "compile s"), and kornia's spatial_softmax2d / spatial_soft_argmax2d where
                  kornia has the op
    cpp / floor   and whether the case meets its target (TARGETS below)
    in-cache ms   forward of the map ops (IN_CACHE_OPS): what cpp takes for the case's B x L maps at the rate it
                  runs on one thread when the logits sit in cache, divided by the thread count (scaling taken
                  as perfect): the best of --reps * 3 one-thread calls on one image of 48 maps minus that of
                  16 maps (a call's fixed cost cancels), per map, times B x L over the threads. (Timed on one
                  thread because a call this short on two measures the second thread's wake-up.) The
                  arithmetic's own floor: an op bound by its exp (one per logit, as many in bfloat16 as in
                  float32, for half the bytes) cannot beat it, whatever its bytes' floor says. cpp / in-cache
                  is how far memory and the rest keep the op from it
Ops: spatial_softmax, soft_argmax, attention_mask, landmark_attention, fuse and decafa_head forward (under
no_grad); soft_argmax and decafa_head also forward+backward (torch.autograd.grad with a random upstream
gradient allocated beforehand, not the expanded ones of .sum(), so that the time is our kernels').
Every timed output is first compared with the reference's (same tolerances as bench/test_ops.py): a wrong
result posts no time and makes the script exit with status 1, as does an error of cpp; an error of another
backend (a torch.compile that fails, say) is recorded as the reason it was not timed.

Allocator settings: this process measures with the setting it was started with (THP_MEM_ALLOC_ENABLE=1 asks
PyTorch's CPU allocator for transparent huge pages; unset is the default), then reruns this script in a
subprocess with the other setting; both go in the table and the JSON. Each run records torch's thread
count, the CPU model and its vector extensions, the date and the load average before and after: on a
shared machine, other processes' load shows up as times in multiples of the scheduler's time slice.

Phases: every case's floor, cpp, reference and kornia times first, then the torch.compile column (tens of
seconds of compilation per case on a 2-core machine; the subprocess may find the same graphs in inductor's
on-disk cache, so its "compile s" can be shorter). `--budget-s` bounds the whole script: this process
gets half of it (all of it with --no-thp), the subprocess what is left; each case checks the time before it
starts, and the JSON is rewritten after every case, so a run cut off keeps what it measured.

    python bench/cpu_floor.py [--no-compile] [--budget-s 1800] [--json cpu_floor.json]
    python bench/cpu_floor.py --quick --no-compile    # tiny shape: checks the machinery in seconds
(also `decafa-fast bench --cpu-floor [--quick] [--out DIR]`.)
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # bench/'s modules import each other by name
    sys.path.insert(0, str(HERE))

import measure  # noqa: E402

OPS = ("spatial_softmax", "soft_argmax", "attention_mask", "landmark_attention", "fuse", "decafa_head")
BACKWARD_OPS = ("soft_argmax", "decafa_head")
KORNIA_OPS = ("spatial_softmax", "soft_argmax")
IN_CACHE_OPS = ("spatial_softmax", "soft_argmax", "attention_mask", "landmark_attention")
IN_CACHE_MAPS = (16, 48)  # maps of one image timed for the in-cache rate: at 128 x 128, 0.5-3 MB of logits
BACKENDS = ("cpp", "reference", "compiled", "kornia")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# (rtol, atol as a fraction of the largest reference value) of the check before timing, as bench/test_ops.py
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 3e-2}
THP = "THP_MEM_ALLOC_ENABLE"
# The paper's head shape, the only one the targets are stated at. --quick: measure.SIZES["tiny"] at B = 2 and 1.
TARGET_SHAPE = {"maps": 98, "size": 128, "channels": 64, "image_channels": 1, "mode": "F5"}
TARGET_BATCH = 8
# The targets for the cpp backend: (name, applies to a row?, limit kind, limit)
TARGETS = (
    ("forward <= 3x its floor (B = 8)", lambda r: r["pass"] == "fwd" and r["batch"] == TARGET_BATCH, "x_floor", 3.0),
    ("head forward+backward <= 25 ms (float32, B = 8)",
     lambda r: (r["op"], r["pass"], r["dtype"], r["batch"]) == ("decafa_head", "fwd+bwd", "float32", TARGET_BATCH),
     "ms", 25.0),
    ("head forward <= 1 ms (B = 1)", lambda r: (r["op"], r["pass"], r["batch"]) == ("decafa_head", "fwd", 1),
     "ms", 1.0),
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="8,1", help="comma-separated batch sizes")
    p.add_argument("--maps", type=int, default=TARGET_SHAPE["maps"], help="L, landmark maps")
    p.add_argument("--size", type=int, default=TARGET_SHAPE["size"], help="H = W")
    p.add_argument("--channels", type=int, default=TARGET_SHAPE["channels"], help="C, embedding channels")
    p.add_argument("--image-channels", type=int, default=TARGET_SHAPE["image_channels"])
    p.add_argument("--mode", default=TARGET_SHAPE["mode"], choices=["F1", "F2", "F3", "F4", "F5"])
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32,bfloat16")
    p.add_argument("--reps", type=int, default=7, help="timed calls per backend and case (median reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before them")
    p.add_argument("--copy-mib", type=int, default=256, help="MiB copied to measure the copy bandwidth")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile column")
    p.add_argument("--no-thp", action="store_true",
                   help="measure only this process's allocator setting (no subprocess with the other)")
    p.add_argument("--quick", action="store_true",
                   help="tiny shape (B 2 and 1, L 5, 16 x 16, C 4), 3 reps, 64 MiB copy: checks the machinery, not the "
                        "kernels (options given explicitly still apply)")
    p.add_argument("--budget-s", type=float, default=1e9,
                   help="start no case after the script has run this many seconds")
    p.add_argument("--json", help="write every number to this file (rewritten after every case)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # the allocator subprocess
    if "--quick" in (sys.argv[1:] if argv is None else argv):  # its shape, unless given explicitly
        tiny = measure.SIZES["tiny"]
        p.set_defaults(batches="2,1", maps=tiny.landmarks, size=tiny.height, channels=tiny.channels,
                       image_channels=tiny.image_channels, mode=tiny.mode, reps=3, copy_mib=64)
    args = p.parse_args(argv)
    unknown = [d for d in split(args.dtypes) if d not in DTYPES]
    if unknown:
        p.error(f"--dtypes: unknown {unknown}; choose from {list(DTYPES)}")
    return args


def split(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


@dataclass(frozen=True)
class Case:
    op: str
    pass_: str  # "fwd" or "fwd+bwd"
    dtype: str
    batch: int

    def __str__(self) -> str:
        return f"{self.op} {self.pass_} {self.dtype} B={self.batch}"


def all_cases(args: argparse.Namespace) -> list[Case]:
    """The cases in order of what a cut-off run must keep: dtype, then batch size, then op."""
    return [Case(op, pass_, dtype, int(b)) for dtype in split(args.dtypes) for b in split(args.batches)
            for op in OPS for pass_ in (("fwd", "fwd+bwd") if op in BACKWARD_OPS else ("fwd",))]


# --------------------------------------------------------------------------------------------------
# Inputs, the functions under test, timing
# --------------------------------------------------------------------------------------------------
def make_inputs(op: str, batch: int, dtype: torch.dtype, args: argparse.Namespace) -> list[torch.Tensor]:
    """The op's tensor arguments, as in bench/test_ops.py: logits (B, L, H, W) for the map ops; image,
    embedding and mask for fuse; logits, image and embedding for the head."""
    g = torch.Generator().manual_seed(0)
    b, s = batch, args.size

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (scale * torch.randn(*shape, generator=g)).to(dtype)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g).to(dtype)

    if op == "fuse":
        return [rand(b, args.image_channels, s, s), randn(b, args.channels, s, s), rand(b, 1, s, s)]
    if op == "decafa_head":
        return [randn(b, args.maps, s, s, scale=3.0), rand(b, args.image_channels, s, s), randn(b, args.channels, s, s)]
    return [randn(b, args.maps, s, s, scale=3.0)]


def as_tuple(out: Any) -> tuple[torch.Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def op_function(op: str, backend: str, mode: str) -> Callable[..., tuple[torch.Tensor, ...]]:
    """(op, backend) as a function of the op's tensors returning a tuple of tensors. torch.compile: a fresh
    compilation (dynamo's caches reset) with static shapes, so that every case gets its own graph."""
    from decafa_fast import ops, reference

    kwargs = {"mode": mode} if op in ("fuse", "decafa_head") else {}
    if backend == "kornia":
        from kornia.geometry.subpix import spatial_soft_argmax2d, spatial_softmax2d

        if op == "spatial_softmax":
            return lambda t: (spatial_softmax2d(t, temperature=1.0),)
        return lambda t: (spatial_soft_argmax2d(t, temperature=1.0, normalized_coordinates=False),)
    if backend == "compiled":
        torch._dynamo.reset()
        compiled = torch.compile(getattr(reference, op), dynamic=False)
        return lambda *a: as_tuple(compiled(*a, **kwargs))
    fn = getattr(ops, op)

    def run(*a: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with ops.use_backend(backend):
            return as_tuple(fn(*a, **kwargs))
    return run


def skip_reason(op: str, backend: str, args: argparse.Namespace) -> str | None:
    """Why (op, backend) is not timed here (None: it is)."""
    if backend == "kornia" and op not in KORNIA_OPS:
        return f"kornia has no {op} (kornia.geometry.subpix has spatial_softmax2d and spatial_soft_argmax2d only)"
    if backend == "compiled" and args.no_compile:
        return "--no-compile"
    return measure.backend_skip_reason(backend, torch.device("cpu"))


def check_close(case: Case, backend: str, got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> None:
    """AssertionError naming the case when `got` differs from the reference's outputs `want`."""
    tol = TOLERANCE[DTYPES[case.dtype]]
    for g, w in zip(got, want):
        scale = max(float(w.abs().max().float()), 1e-30) if w.numel() else 1.0
        torch.testing.assert_close(g.detach().float(), w.float(), rtol=tol, atol=tol * scale,
                                   msg=lambda m: f"{case} {backend}: output differs from the reference: {m}")


# --------------------------------------------------------------------------------------------------
# One allocator setting, in this process
# --------------------------------------------------------------------------------------------------
def allocator_label(env: dict[str, str] | os._Environ) -> str:
    return "thp" if env.get(THP) == "1" else "default"


def cpu_flags() -> list[str]:
    """The vector extensions of /proc/cpuinfo that the CPU kernels can use (empty where it is unreadable)."""
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_fp16", "amx_bf16")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                present = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in present]
    except OSError:
        pass
    return []


def loadavg() -> list[float] | None:
    return [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None


def in_cache_ms(case: Case, args: argparse.Namespace) -> float:
    """cpp's time for the case's B x L maps at its in-cache rate (see the module's docstring)."""
    fn = op_function(case.op, "cpp", args.mode)
    threads = torch.get_num_threads()
    best = []
    torch.set_num_threads(1)
    try:
        for maps in IN_CACHE_MAPS:
            shape = argparse.Namespace(**{**vars(args), "maps": maps})
            logits = make_inputs(case.op, 1, DTYPES[case.dtype], shape)
            with torch.no_grad():
                _, times = measure.median_ms(lambda: fn(*logits), 3 * args.reps, warmup=args.warmup + 1)
            best.append(min(times))
    finally:
        torch.set_num_threads(threads)
    per_map = (best[1] - best[0]) / (IN_CACHE_MAPS[1] - IN_CACHE_MAPS[0])
    return per_map * case.batch * args.maps / threads


def measure_setting(args: argparse.Namespace, deadline: float, on_update: Callable[[dict], None]) -> dict:
    """Every case under this process's allocator setting; `on_update(result)` after every case."""
    facts = measure.device_facts()
    result: dict[str, Any] = {
        "allocator": allocator_label(os.environ), THP: os.environ.get(THP), "pid": os.getpid(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "torch_threads": torch.get_num_threads(),
        "cpu_model": facts["cpu_model"], "cpu_flags": cpu_flags(), "loadavg_before": loadavg(),
        "machine": facts, "rows": [],
    }
    nbytes = args.copy_mib << 20
    bandwidth = measure.copy_bandwidth(torch.device("cpu"), nbytes, repeats=10)
    result["copy_gbs"] = bandwidth / 1e9
    result["fresh_clone_gbs"] = measure.copy_bandwidth(torch.device("cpu"), nbytes, fresh=True) / 1e9
    print(f"[{result['allocator']} allocator] {result['cpu_model']}, {result['torch_threads']} threads; copy "
          f"{result['copy_gbs']:.1f} GB/s (fresh clone {result['fresh_clone_gbs']:.1f} GB/s); load "
          f"{result['loadavg_before']}", flush=True)
    wrong = False

    def due(what: str) -> bool:
        if time.monotonic() > deadline:
            print(f"  skipped (out of time, --budget-s {args.budget_s:g}): {what}", flush=True)
            return True
        return False

    def time_backend(case: Case, row: dict, backend: str, want: tuple[torch.Tensor, ...]) -> None:
        """Times `backend` on `case` into `row`; or records why not: skipped, a wrong result, or an error
        (an error of cpp counts as wrong, one of another backend is a skip reason)."""
        nonlocal wrong
        reason = skip_reason(case.op, backend, args)
        if reason is None and due(f"{case} {backend}"):
            reason = "out of time (--budget-s)"
        if reason:
            row["skipped"][backend] = reason
            return
        try:
            ms, times = first_check_and_time(case, row, backend, want)
        except Exception as exc:
            differs = isinstance(exc, AssertionError)  # check_close: differs from the reference
            message = str(exc)[:500] if differs else f"raised {type(exc).__name__}: {str(exc)[:300]}"
            if differs or backend == "cpp":
                wrong = True
                row["wrong"][backend] = message
            else:
                row["skipped"][backend] = message
            print(f"  {'WRONG' if differs else 'ERROR'} {case} {backend}: {message[:300]}", file=sys.stderr, flush=True)
            return
        row["ms"][backend], row["times_ms"][backend] = ms, times
        extra = f" (compile {row['compile_s']:.1f} s)" if backend == "compiled" else ""
        print(f"  {case!s:40} {backend:9} {ms:9.3f} ms{extra}", flush=True)

    def first_check_and_time(case: Case, row: dict, backend: str,
                             want: tuple[torch.Tensor, ...]) -> tuple[float, list[float]]:
        """A first call (it compiles, for torch.compile), checked against `want`, then the timed calls."""
        backward = case.pass_ == "fwd+bwd"
        inputs = [t.requires_grad_(backward) for t in make_inputs(case.op, case.batch, DTYPES[case.dtype], args)]
        start = time.perf_counter()
        fn = op_function(case.op, backend, args.mode)
        if backward:
            g = torch.Generator().manual_seed(1)
            grads = [torch.randn(w.shape, generator=g).to(w.dtype) for w in want]

            def call() -> object:
                return torch.autograd.grad(fn(*inputs), inputs, grads)
        else:
            def call() -> object:
                with torch.no_grad():
                    return fn(*inputs)
        with torch.set_grad_enabled(backward):
            outputs = fn(*inputs)
        if backward:
            torch.autograd.grad(outputs, inputs, grads)
        if backend == "compiled":
            row["compile_s"] = time.perf_counter() - start
        check_close(case, backend, outputs, want)
        del outputs
        return measure.median_ms(call, args.reps, warmup=args.warmup)

    # phase 1: floor, cpp, reference, kornia of every case; phase 2: torch.compile (slow to compile)
    phases = [("cpp", "reference", "kornia", "compiled")] if args.no_compile else [
        ("cpp", "reference", "kornia"), ("compiled",)]
    rows: dict[Case, dict] = {}
    for phase in phases:
        for case in all_cases(args):
            if case not in rows:
                rows[case] = new_row(case, args)
                result["rows"].append(rows[case])
            row = rows[case]
            # the reference's outputs: what every backend is checked against, and the output bytes
            inputs = make_inputs(case.op, case.batch, DTYPES[case.dtype], args)
            with torch.no_grad():
                want = tuple(o.detach() for o in op_function(case.op, "reference", args.mode)(*inputs))
            set_floor(row, inputs, want, case.pass_ == "fwd+bwd", bandwidth)
            for backend in phase:
                time_backend(case, row, backend, want)
            if ("cpp" in phase and "cpp" in row["ms"] and case.op in IN_CACHE_OPS and case.pass_ == "fwd"
                    and not due(f"{case} in-cache")):
                row["in_cache_ms"] = in_cache_ms(case, args)
                print(f"  {case!s:40} {'in-cache':9} {row['in_cache_ms']:9.3f} ms", flush=True)
            del inputs, want
            gc.collect()
            judge(row)
            on_update(result)
    result["loadavg_after"] = loadavg()
    result["wrong"] = wrong
    on_update(result)
    return result


def new_row(case: Case, args: argparse.Namespace) -> dict:
    return {"op": case.op, "pass": case.pass_, "dtype": case.dtype, "batch": case.batch, "floor_bytes": None,
            "floor_ms": None, "ms": {}, "times_ms": {}, "compile_s": None,
            "skipped": {}, "wrong": {}, "cpp_x_floor": None, "in_cache_ms": None, "cpp_x_in_cache": None,
            "targets": [],
            "target_shape": at_target_shape(args)}


def set_floor(row: dict, inputs: list[torch.Tensor], outputs: tuple[torch.Tensor, ...], backward: bool,
              bandwidth: float) -> None:
    """The row's floor: measure.floor_bytes of the op (every input differentiable in forward+backward)."""
    row["floor_bytes"] = measure.floor_bytes(inputs, outputs, backward, grad_inputs=inputs)
    row["floor_ms"] = row["floor_bytes"] / bandwidth * 1e3


def at_target_shape(args: argparse.Namespace) -> bool:
    return all(getattr(args, k) == v for k, v in TARGET_SHAPE.items())


def judge(row: dict) -> None:
    """cpp / floor, and each target that applies to the row: met True / False, or None when cpp was not
    timed. Targets are stated at TARGET_SHAPE only: none at another shape."""
    cpp = row["ms"].get("cpp")
    row["cpp_x_floor"] = cpp / row["floor_ms"] if cpp is not None and row["floor_ms"] else None
    in_cache = row.get("in_cache_ms")
    row["cpp_x_in_cache"] = cpp / in_cache if cpp is not None and in_cache and in_cache > 0 else None
    row["targets"] = []
    if not row["target_shape"]:
        return
    for name, applies, kind, limit in TARGETS:
        if applies(row):
            value = row["cpp_x_floor"] if kind == "x_floor" else cpp
            row["targets"].append({"target": name, "value": value, "limit": limit, "kind": kind,
                                   "met": None if value is None else value <= limit})


# --------------------------------------------------------------------------------------------------
# The other allocator setting, in a subprocess
# --------------------------------------------------------------------------------------------------
def run_other_setting(args: argparse.Namespace, deadline: float) -> dict:
    """This script again, in a subprocess with the other THP_MEM_ALLOC_ENABLE setting, until `deadline`.
    Its progress lines go to this process's stdout; its JSON (what it measured, even if it was cut off) is
    returned, with the subprocess's exit status."""
    env = dict(os.environ)
    if allocator_label(env) == "thp":
        env.pop(THP)
    else:
        env[THP] = "1"
    budget = max(0.0, deadline - time.monotonic())
    with tempfile.TemporaryDirectory(prefix="cpu_floor_") as tmp:
        path = Path(tmp) / "child.json"
        argv = [sys.executable, str(Path(__file__).resolve()), "--child", "--no-thp", "--json", str(path),
                "--budget-s", f"{budget:.0f}", "--batches", args.batches, "--maps", str(args.maps),
                "--size", str(args.size), "--channels", str(args.channels),
                "--image-channels", str(args.image_channels), "--mode", args.mode, "--dtypes", args.dtypes,
                "--reps", str(args.reps), "--warmup", str(args.warmup), "--copy-mib", str(args.copy_mib)]
        if args.no_compile:
            argv.append("--no-compile")
        print(f"\nrerunning with {THP}={env.get(THP, '(unset)')} in a subprocess", flush=True)
        try:  # a grace period beyond the budget: a case that started in time may compile for a while
            code = subprocess.run(argv, env=env, timeout=budget + 600).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        data = json.loads(path.read_text()) if path.is_file() and path.stat().st_size else {}
    child = data.get("allocators", {}).get(allocator_label(env), {"rows": []})
    child["exit_status"] = code
    return child


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------
def fmt(value: float | None, digits: int = 4) -> str:
    """`digits` significant digits (a tiny shape's floors are microseconds), "-" for None."""
    return "-" if value is None else f"{value:.{digits}g}"


def setting_title(setting: dict) -> str:
    value = setting.get(THP)
    return f"default allocator ({THP} unset)" if value is None else f"{THP}={value}"


def markdown(results: dict) -> str:
    """The tables: one per allocator setting, then the targets side by side, then the skip reasons."""
    lines = []
    settings = results["allocators"]
    first = next(iter(settings.values()), {})
    shape = results["shape"]
    lines += [f"## CPU ops against the memory floor: {first.get('cpu_model')}, {first.get('date')}", "",
              f"L = {shape['maps']}, {shape['size']} x {shape['size']}, C = {shape['channels']}, "
              f"Ci = {shape['image_channels']}, {shape['mode']}; median of {shape['reps']} calls after "
              f"{shape['warmup']} warm-up; floor = bytes / {fmt(results.get('copy_gbs'))} GB/s (the higher of "
              f"the copy bandwidths below); command `{results['command']}`."]
    for s in settings.values():
        lines += ["", f"### {setting_title(s)}", "",
                  f"{s.get('torch_threads')} threads; CPU flags {' '.join(s.get('cpu_flags') or []) or '-'}; copy "
                  f"{fmt(s.get('copy_gbs'), 3)} GB/s read + write (fresh clone {fmt(s.get('fresh_clone_gbs'), 3)} "
                  f"GB/s); load average {s.get('loadavg_before')} before, {s.get('loadavg_after')} after"
                  + (f"; subprocess exit status {s['exit_status']}" if "exit_status" in s else ""), "",
                  "| op | pass | dtype | B | floor ms | cpp ms | cpp / floor | in-cache ms | cpp / in-cache | "
                  "reference ms | torch.compile ms (compile s) | kornia ms | target | met |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in s.get("rows", []):
            ms = r["ms"]
            compiled = fmt(ms.get("compiled"))
            if r["compile_s"] is not None:
                compiled += f" ({r['compile_s']:.1f})"
            targets = "; ".join(t["target"] for t in r["targets"]) or "-"
            met = "; ".join({True: "yes", False: "no", None: "-"}[t["met"]] for t in r["targets"]) or "-"
            cells = [fmt(ms.get(b)) if b not in r["wrong"] else "WRONG" for b in ("cpp", "reference")]
            lines.append(f"| {r['op']} | {r['pass']} | {r['dtype']} | {r['batch']} | {fmt(r['floor_ms'])} | "
                         f"{cells[0]} | {fmt(r['cpp_x_floor'], 3)} | {fmt(r.get('in_cache_ms'))} | "
                         f"{fmt(r.get('cpp_x_in_cache'), 3)} | {cells[1]} | {compiled} | "
                         f"{fmt(ms.get('kornia'))} | {targets} | {met} |")
    lines += ["", "### Targets (cpp)", ""]
    if not any(r["targets"] for s in settings.values() for r in s.get("rows", [])):
        lines.append("No target applies: they are stated at the paper's head shape (L 98, 128 x 128, C 64, Ci 1, F5; "
                     "B 8, and B 1 for the head's latency).")
    else:
        lines += target_table(settings)
    reasons = sorted({f"{b}: {why}" for s in settings.values() for r in s.get("rows", [])
                      for b, why in r["skipped"].items()})
    if reasons:
        lines += ["", "Not timed: " + "; ".join(reasons) + "."]
    return "\n".join(lines)


def target_table(settings: dict) -> list[str]:
    """Each target's row: the cpp value and verdict under every allocator setting, side by side."""
    header = " | ".join(f"{setting_title(s)} | met" for s in settings.values())
    lines = [f"| case | target | {header} |", "|---|---|" + "---|---|" * len(settings)]
    keyed = [{(r["op"], r["pass"], r["dtype"], r["batch"]): r for r in s.get("rows", [])} for s in settings.values()]
    for key, r in (keyed[0] if keyed else {}).items():
        for i, t in enumerate(r["targets"]):
            cells = []
            for rows in keyed:
                other = rows.get(key, {}).get("targets", [])
                t2 = other[i] if i < len(other) else {"value": None, "met": None, "kind": t["kind"]}
                unit = "x floor" if t2["kind"] == "x_floor" else "ms"
                value = "-" if t2["value"] is None else f"{t2['value']:.2f} {unit}"
                cells.append(f"{value} | {({True: 'yes', False: 'no', None: '-'})[t2['met']]}")
            op, pass_, dtype, batch = key
            lines.append(f"| {op} {pass_} {dtype} B={batch} | {t['target']} | {' | '.join(cells)} |")
    return lines


def share_floor(results: dict) -> None:
    """Every row's floor from one copy bandwidth, the highest that a process of this run measured."""
    measured = [s["copy_gbs"] for s in results["allocators"].values() if s.get("copy_gbs")]
    if not measured:
        return
    results["copy_gbs"] = max(measured)
    for setting in results["allocators"].values():
        for row in setting.get("rows", []):
            if row["floor_bytes"] is not None:
                row["floor_ms"] = row["floor_bytes"] / (results["copy_gbs"] * 1e9) * 1e3
                judge(row)


def write_json(path: str | None, results: dict) -> None:
    if path:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as fh:
            json.dump(results, fh, indent=1)
        os.replace(tmp, path)  # a reader never sees half a file


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    shape = {k: getattr(args, k) for k in ("batches", "dtypes", "reps", "warmup", *TARGET_SHAPE)}
    command = "python bench/cpu_floor.py " + " ".join(sys.argv[1:] if argv is None else argv)
    results: dict[str, Any] = {"command": command, "shape": shape, "allocators": {},
                               "targets": [{"target": t[0], "kind": t[2], "limit": t[3]} for t in TARGETS]}
    label = allocator_label(os.environ)
    share = 1.0 if args.no_thp else 0.5
    results["allocators"][label] = {}

    def update(setting: dict) -> None:
        results["allocators"][label] = setting
        write_json(args.json, results)

    mine = measure_setting(args, start + share * args.budget_s, update)
    if not args.no_thp:
        other = run_other_setting(args, start + args.budget_s)
        # the default setting first in the table, whichever this process had
        order = ("default", "thp")
        both = {label: mine, ("thp" if label == "default" else "default"): other}
        results["allocators"] = {k: both[k] for k in order}
    share_floor(results)
    write_json(args.json, results)
    if not args.child:
        print()
        print(markdown(results))
        if args.json:
            print(f"\nJSON: {args.json}")
    wrong = mine.get("wrong") or any(s.get("wrong") for s in results["allocators"].values())
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
