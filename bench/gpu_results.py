#!/usr/bin/env python
"""Writes the machine-readable record of a GPU run, bench/results/gpu-<date>-<gpu>.json, from the files that
bench/gpu_check.sh's steps write (bench/head_floor.py --json, bench/model_check.py --json, the ops suite's
--decafa-rows JSON lines):

    python bench/gpu_results.py --head-floor head_floor.json [--head-floor-ring ring.json] [--model model.json]
        [--ops-rows rows.jsonl] [--clocks "1980 MHz, 2619 MHz, 1980 MHz, 2619 MHz"] --out-dir OUTDIR

Top level: commit, device, clocks, copy_gb_s, rows. A row: backend (cuda, triton, reference, compile; kornia in
the ops suite), op (decafa_head, the ops suite's ops such as soft_argmax, or model for the whole model), pass
(fwd or fwd+bwd), dtype, batch, cuda_graph, time_us, and floor_us (the floor's time for that row's bytes at the
measured copy rate) or, for model rows, images_per_s. CUDA rows of the head also say which per-map kernels ran
(`maps`: onchip, or ring from the DECAFA_CUDA_MAPS=ring DECAFA_CUDA_PDL=1 run, the new kernel set). Prints the
path written. Imports nothing beyond the standard library.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _backend(label: str) -> str:
    """head_floor's racer label -> the row's backend."""
    return {"reference eager": "reference", "reference compile": "compile"}.get(label, label)


def head_floor_rows(results: dict, maps: str = "onchip") -> list[dict]:
    """Rows of a head_floor.json: one per timed case (the floor's own rows are folded into floor_us)."""
    batch = int(results.get("shape", {}).get("batch", 0))
    rows = []
    for case in results.get("cases", []):
        name = case["case"]
        if name.startswith("floor "):
            continue
        m = re.match(r"(.+?) (forward\+backward|forward)( B=1)?( eager)?( cuda graph)?(, pixel split (\d+))?$", name)
        if m is None:
            raise ValueError(f"head_floor case {name!r}: not '<backend> forward[+backward][ B=1][ eager][ cuda graph]"
                             "[, pixel split N]'")
        backend = _backend(m.group(1))
        pass_ = "fwd+bwd" if m.group(2) == "forward+backward" else "fwd"
        row = {"backend": backend, "op": "decafa_head", "pass": pass_,
               "dtype": case["dtype"], "batch": 1 if m.group(3) else batch, "cuda_graph": m.group(5) is not None,
               "time_us": case["ms"] * 1e3,
               "floor_us": case["floor_ms"] * 1e3 if case.get("floor_ms") is not None else None}
        if backend == "cuda":
            row["maps"] = maps
            if m.group(7):  # the pixel kernel's channel groups forced (else the launcher's choice)
                row["pixel_split"] = int(m.group(7))
        rows.append(row)
    return rows


def model_rows(results: dict) -> list[dict]:
    """Rows of a model_check.py --json file (failed cases left out)."""
    rows = []
    dtype = results.get("dtype", "")
    for case in results.get("cases", []):
        if "ms" not in case:
            continue
        name = case["case"]
        compiled = name.startswith("compile")
        rows.append({"backend": "compile" if compiled else case["backend"], "op": "model", "pass": "fwd",
                     "dtype": dtype, "batch": int(case["batch"]),
                     "cuda_graph": "cuda graph" in name or "reduce-overhead" in name, "time_us": case["ms"] * 1e3,
                     "images_per_s": case["images_per_s"],
                     **({"ops_backend": case["backend"]} if compiled else {})})
    return rows


def ops_rows(lines: list[dict]) -> list[dict]:
    """Rows of the ops suite's --decafa-rows JSON lines (bench/test_ops.py, eager calls): one per timed case."""
    rows = []
    for r in lines:
        if r.get("suite") != "ops" or r.get("time_s") is None:
            continue
        copy = r.get("copy_gbps")
        backend = r["backend"]
        rows.append({"backend": "compile" if backend == "compiled" else backend, "op": r["op"], "pass": r["pass"],
                     "dtype": r["dtype"], "batch": int(r["batch"]), "cuda_graph": False,
                     "time_us": float(r["time_s"]) * 1e6,
                     "floor_us": float(r["floor_bytes"]) / (float(copy) * 1e9) * 1e6 if copy else None})
    return rows


def parse_clocks(text: str) -> dict:
    """nvidia-smi 'clocks.sm, clocks.mem, clocks.max.sm, clocks.max.mem' (csv, noheader) -> MHz by name; an
    unparsable string is kept as is under 'raw'."""
    names = ("sm_mhz", "mem_mhz", "max_sm_mhz", "max_mem_mhz")
    values = re.findall(r"(\d+)\s*MHz", text)
    if len(values) != len(names):
        return {"raw": text.strip()}
    return dict(zip(names, (int(v) for v in values), strict=True))


def gpu_slug(device: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-") or "gpu"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def build(head_floor: dict | None, head_floor_ring: dict | None, model: dict | None, clocks: str,
          commit: str, ops: list[dict] | None = None, triton_kernels: dict | None = None) -> dict:
    info = (head_floor or {}).get("info", {})
    device = info.get("device") or (model or {}).get("device") or "unknown"
    rows = []
    if head_floor:
        rows += head_floor_rows(head_floor)
    if head_floor_ring:
        rows += [r for r in head_floor_rows(head_floor_ring, maps="ring") if r["backend"] == "cuda"]
    if model:
        rows += model_rows(model)
    if ops:
        rows += ops_rows(ops)
    if triton_kernels:  # bench/triton_kernels.py: rows already in this record's form (backend triton-<kernel>)
        rows += triton_kernels.get("rows", [])
    return {"commit": commit, "device": device, "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "clocks": parse_clocks(clocks), "copy_gb_s": info.get("copy_gbs"), "rows": rows}


def _load(path: str | None) -> dict | None:
    if not path:
        return None
    p = Path(path)
    if not p.is_file():
        print(f"gpu_results: {path} not found (that step did not run); its rows are left out", file=sys.stderr)
        return None
    return json.loads(p.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--head-floor", help="bench/head_floor.py --json output")
    p.add_argument("--head-floor-ring",
                   help="the same with DECAFA_CUDA_MAPS=ring DECAFA_CUDA_PDL=1 (its cuda rows are kept)")
    p.add_argument("--model", help="bench/model_check.py --json output")
    p.add_argument("--ops-rows", help="the ops suite's --decafa-rows JSON lines (bench/test_ops.py)")
    p.add_argument("--triton-kernels", help="bench/triton_kernels.py --json output (Triton kernels old vs new)")
    p.add_argument("--clocks", default="", help="nvidia-smi --query-gpu=clocks.sm,clocks.mem,clocks.max.sm,"
                   "clocks.max.mem --format=csv,noheader")
    p.add_argument("--commit", help="default: git rev-parse HEAD")
    p.add_argument("--out-dir", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    ops = None
    if args.ops_rows and Path(args.ops_rows).is_file():
        ops = [json.loads(line) for line in Path(args.ops_rows).read_text().splitlines() if line.strip()]
    elif args.ops_rows:
        print(f"gpu_results: {args.ops_rows} not found (that step did not run); its rows are left out", file=sys.stderr)
    record = build(_load(args.head_floor), _load(args.head_floor_ring), _load(args.model), args.clocks,
                   args.commit or git_commit(), ops, _load(args.triton_kernels))
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"gpu-{record['date']}-{gpu_slug(record['device'])}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
