"""`decafa-fast ablate`: the paper's Table 1 grid at a small size, printed as a table of validation NME.

Rows: fusion F1-F4 (chained, increasing lambdas), then F5 with independent / chained transfer layers and
decreasing / constant / increasing stage weights. Every row trains a fresh model with the same data,
seed and schedule (`decafa-fast train` underneath) and reports the validation NME of each markup and
their mean. The defaults are small so that the whole grid runs in minutes on a CPU; the numbers are
therefore noisy and only indicative at this size.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..files import write_atomically
from . import train as train_mod
from .config import PRESETS, TrainConfig

__all__ = ["TABLE1", "add_arguments", "row_config", "run"]

# (fusion, transfer, lambdas) in the order of the paper's Table 1
TABLE1: list[tuple[str, str, str]] = [
    ("F1", "chained", "increasing"),
    ("F2", "chained", "increasing"),
    ("F3", "chained", "increasing"),
    ("F4", "chained", "increasing"),
    ("F5", "independent", "decreasing"),
    ("F5", "independent", "constant"),
    ("F5", "independent", "increasing"),
    ("F5", "chained", "decreasing"),
    ("F5", "chained", "constant"),
    ("F5", "chained", "increasing"),
]
_ARROWS = {"increasing": "up", "constant": "=", "decreasing": "down"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", default="all", help="which Table 1 rows to run: 'all' or 1-based indices, e.g. 1,5,10")
    p.add_argument("--stages", type=int, default=2, help="cascade stages (>= 2 so that fusion matters)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--widths", default="8,16,32")
    p.add_argument("--embedding-channels", type=int, default=8)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--train-size", type=int, default=1500)
    p.add_argument("--val-size", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--out", default="runs/ablate", help="folder for each row's run and ablation.md / ablation.json")
    p.add_argument("--overwrite", action="store_true", help="replace the rows' runs already in --out")


def _rows(spec: str) -> list[int]:
    if spec == "all":
        return list(range(len(TABLE1)))
    try:
        rows = [int(v) - 1 for v in spec.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--rows must be 'all' or comma-separated indices 1..{len(TABLE1)}, got {spec!r}") from None
    bad = [r + 1 for r in rows if not 0 <= r < len(TABLE1)]
    if bad or not rows:
        raise UserError(f"--rows must be 'all' or indices 1..{len(TABLE1)}, got {spec!r}")
    return rows


def row_config(args: argparse.Namespace, row: int) -> TrainConfig:
    """The training config of Table 1 row `row` (0-based) at the size the flags give."""
    fusion, transfer, lambdas = TABLE1[row]
    return TrainConfig.from_preset(
        "cpu", stages=args.stages, image_size=args.image_size, widths=args.widths,
        embedding_channels=args.embedding_channels, steps=args.steps, batch_size=args.batch_size,
        train_size=args.train_size, val_size=args.val_size, seed=args.seed, fusion=fusion, transfer=transfer,
        lambdas=lambdas, device=args.device, threads=args.threads or PRESETS["cpu"]["threads"], progress=False,
        out=str(Path(args.out) / f"row{row + 1}"), overwrite=bool(getattr(args, "overwrite", False)))


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    rows = _rows(args.rows)
    configs = [row_config(args, r) for r in rows]  # every row's settings checked before the first trains
    taken = [c.out for c in configs if (Path(c.out) / "checkpoint.pt").exists()]
    if taken and not args.overwrite:
        raise UserError(f"--out {str(out)!r} already holds runs of these rows ({', '.join(taken)}); replace them with "
                        f"--overwrite, or choose another --out")
    results = []
    for r, config in zip(rows, configs):
        fusion, transfer, lambdas = TABLE1[r]
        print(f"[{r + 1}/{len(TABLE1)}] {fusion} {transfer} {lambdas}", flush=True)
        summary = train_mod.train(config)
        val = summary["val_nme"]
        markups = summary["config"]["markups"]
        row = {"row": r + 1, "fusion": fusion, "transfer": transfer, "lambdas": lambdas,
               "nme": {m: val.get(m) for m in markups}, "avg_nme": float(np.mean([val[m] for m in markups])),
               "elapsed_s": summary["elapsed_s"]}
        results.append(row)

    markups = list(results[0]["nme"]) if results else []
    header = ["#", "fusion", "task order", "lambdas"] + [f"NME {m} (%)" for m in markups] + ["avg NME (%)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in results:
        cells = [str(row["row"]), row["fusion"], row["transfer"], _ARROWS[row["lambdas"]]]
        cells += [f"{100 * row['nme'][m]:.2f}" for m in markups] + [f"{100 * row['avg_nme']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(f"\nTable 1 at {args.image_size}x{args.image_size}, S={args.stages}, widths {args.widths}, "
          f"{args.steps} steps x batch {args.batch_size} (validation NME, lower is better):\n")
    print(table)
    write_atomically(out / "ablation.md", (table + "\n").encode(), what="ablation table")
    write_atomically(out / "ablation.json", json.dumps(results, indent=2).encode(), what="ablation results")
    return 0
