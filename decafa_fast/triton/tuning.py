"""The Triton backend's tuning table: launch parameters per GPU model, measured on that GPU.

decafa_fast/triton/tuning_table.json holds {"default": {...}, "gpus": {"<torch.cuda.get_device_name()>":
{...}}}, each entry a set of ops.Tuning fields (map_kernel, map_warps, map_stages, map_programs_per_sm,
mask_runs, fuse_block_p, ...). On the first CUDA call of a process the entry of that GPU (or "default")
is applied to the fields of ops.TUNING that still hold their built-in defaults, so a value set by the user
before that call wins. Nothing is timed in the user's process: there is no autotuning on first call; an
entry comes from a GPU run of bench/triton_kernels.py (--table-out), committed to the table. An empty
table (as shipped until such a run) leaves the ops.Tuning defaults.

DECAFA_TRITON_TUNING=<path> reads another table file; DECAFA_TRITON_TUNING=off applies none.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

TABLE_PATH = Path(__file__).with_name("tuning_table.json")


def load_table(path: str | os.PathLike | None = None) -> dict:
    """The table as {"default": {...}, "gpus": {...}}; ValueError naming the file if it is not one. The shipped
    table missing (an install without its package data) reads as empty."""
    if path is None and not TABLE_PATH.exists():
        return {"default": {}, "gpus": {}}
    path = Path(path) if path is not None else TABLE_PATH
    with open(path) as f:
        try:
            table = json.load(f)
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError: say which file
            raise ValueError(f"tuning table {path}: not JSON ({exc})") from None
    if not isinstance(table, dict) or not isinstance(table.get("default", {}), dict) \
            or not isinstance(table.get("gpus", {}), dict):
        raise ValueError(f"tuning table {path}: expected an object with 'default' and 'gpus' objects")
    return table


def entry_for(gpu_name: str, table: dict) -> dict:
    """The entry of `gpu_name` (exact name), else the table's default entry."""
    return dict(table.get("gpus", {}).get(gpu_name, table.get("default", {})))


def apply(tuning, entry: dict) -> dict:
    """Sets the fields of `entry` on `tuning` (a dataclass instance) where the field still holds its default;
    returns what was set. ValueError naming a field that `tuning` lacks or a value of the wrong type."""
    fields = {f.name: f for f in dataclasses.fields(tuning)}
    applied = {}
    for name, value in entry.items():
        if name not in fields:
            raise ValueError(f"tuning table: unknown field {name!r} (known: {', '.join(sorted(fields))})")
        default = fields[name].default
        if type(value) is not type(default):
            raise ValueError(f"tuning table: {name} must be {type(default).__name__}, got {value!r}")
        if getattr(tuning, name) == default:
            setattr(tuning, name, value)
            applied[name] = value
    return applied


def apply_for_device(tuning, gpu_name: str) -> dict:
    """Applies the table entry of `gpu_name` (honouring DECAFA_TRITON_TUNING); returns what was set."""
    source = os.environ.get("DECAFA_TRITON_TUNING", "")
    if source.lower() == "off":
        return {}
    return apply(tuning, entry_for(gpu_name, load_table(source or None)))
