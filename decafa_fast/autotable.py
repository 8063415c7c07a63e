"""Which GPU backend the "auto" backend runs: a small table of Triton-vs-CUDA races measured by the benchmarks.

The table is JSON, one section per GPU model (the name torch reports, e.g. "NVIDIA H100 80GB HBM3"):

    {"format": 1, "devices": {"<gpu name>": {"measured": "<date>", "source": "<command>",
        "entries": [{"op": "decafa_head", "pass": "fwd", "dtype": "bfloat16", "batch": 64,
                     "backend": "cuda", "times_us": {"triton": 512.0, "cuda": 480.0}}, ...]}}}

Two files are read when decafa_fast.ops is imported: the one shipped in the package (auto_table.json, for
the GPUs the project was measured on) and the user's (DECAFA_AUTO_TABLE, else
$XDG_CACHE_HOME/decafa_fast/auto_table.json), which `decafa-fast bench` writes after a run on a GPU and
which takes precedence per GPU model. For a call, the entries of the same op, dtype and pass (forward, or
forward+backward when an input requires grad) are used, at the measured batch size nearest to the call's
on a log scale. Where nothing matches, ops.AUTO_CUDA_PREFERENCE decides.
"""
from __future__ import annotations

import json
import os
import reprlib
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from . import settings

FORMAT = 1
GPU_BACKENDS = ("triton", "cuda")
SHIPPED = Path(__file__).with_name("auto_table.json")
# dtypes that were not measured borrow the choice made for one of the same width
_SAME_WIDTH = {"float16": "bfloat16", "bfloat16": "float16"}
_SHORT = reprlib.Repr()  # a bad entry in a message: short, never deep
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 3, 60, 60


def user_table_path() -> Path:
    """Where `decafa-fast bench` saves the user's table (DECAFA_AUTO_TABLE overrides)."""
    return settings.auto_table_path()


def read_table(path: Path) -> dict[str, Any]:
    """The table in `path` ({"format", "devices"}); an empty one if the file is missing. Raises ValueError,
    in one line naming the file, for a file that is not a table of this format (or not text, or nested too
    deep to parse)."""
    if not path.is_file():
        if path.exists():
            raise ValueError(f"{path}: not a file")
        return {"format": FORMAT, "devices": {}}
    try:
        data = json.loads(path.read_bytes())  # bytes: JSON's own UTF-8/16/32 detection, not the locale's
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deep to be an auto table") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("devices"), dict):
        raise ValueError(f"{path}: not a decafa-fast auto table of format {FORMAT}")
    for name, section in data["devices"].items():
        entries = section.get("entries", []) if isinstance(section, dict) else None
        if not isinstance(entries, list):
            raise ValueError(f"{path}: the section of {name!r} has no list of entries")
        for entry in entries:
            if (not isinstance(entry, dict) or entry.get("backend") not in GPU_BACKENDS
                    or not isinstance(entry.get("batch"), int)
                    or not all(isinstance(entry.get(k), str) for k in ("op", "pass", "dtype"))):
                raise ValueError(f"{path}: bad entry for {_SHORT.repr(name)}: {_SHORT.repr(entry)}")
    return data


Index = dict[tuple[str, str, str], tuple[tuple[int, str], ...]]


def index_entries(entries: Iterable[Mapping[str, Any]]) -> Index:
    """(op, dtype, pass) -> ((batch, backend), ...) sorted by batch: what choose() looks up."""
    index: dict[tuple[str, str, str], list[tuple[int, str]]] = {}
    for e in entries:
        index.setdefault((e["op"], e["dtype"], e["pass"]), []).append((int(e["batch"]), e["backend"]))
    return {key: tuple(sorted(rows)) for key, rows in index.items()}


def load_index(paths: Iterable[Path]) -> dict[str, Index]:
    """GPU name -> index of its entries, later files replacing earlier ones per GPU. A broken file is
    skipped with a one-line SettingWarning naming it: a stale cache must not stop `import decafa_fast`."""
    by_device: dict[str, Index] = {}
    for path in paths:
        try:
            table = read_table(Path(path))
        except (ValueError, OSError) as exc:
            reason = exc if isinstance(exc, ValueError) else f"{path}: cannot be read ({exc.strerror or exc})"
            settings.warn(f"decafa_fast: ignoring the auto-backend table {reason}")
            continue
        for name, section in table["devices"].items():
            by_device[name] = index_entries(section.get("entries", []))
    return by_device


def choose(index: Index, op: str, pass_: str, dtype: str, batch) -> str | None:
    """The measured winner for (op, pass, dtype) at the batch size nearest to `batch` (log scale), or None.

    Falls back to the other pass, then to the dtype of the same width, before giving up. Plain dict
    lookups and comparisons, so that torch.compile traces it; `batch` may be a SymInt there (the
    comparisons become guards).
    """
    for want_dtype in (dtype, _SAME_WIDTH.get(dtype)):
        for want_pass in (pass_, "fwd", "fwd+bwd"):
            rows = index.get((op, want_dtype, want_pass))
            if rows:
                best = rows[0][1]
                # step up while batch is past the geometric mean of two measured neighbours
                for (lower, _), (upper, backend) in zip(rows, rows[1:]):
                    if batch * batch > lower * upper:
                        best = backend
                return best
    return None


def entries_from_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Table entries from benchmark rows (bench/test_ops.py extra_info with time_s): one per (op, pass,
    dtype, batch) where at least two GPU backends posted a time, naming the fastest."""
    times: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if r.get("suite") == "ops" and r.get("backend") in GPU_BACKENDS and r.get("time_s"):
            key = (r["op"], r["pass"], r["dtype"], int(r["batch"]))
            times.setdefault(key, {})[r["backend"]] = float(r["time_s"])
    entries = []
    for (op, pass_, dtype, batch), by_backend in sorted(times.items()):
        if len(by_backend) >= 2:
            entries.append({"op": op, "pass": pass_, "dtype": dtype, "batch": batch,
                            "backend": min(by_backend, key=by_backend.get),
                            "times_us": {b: round(t * 1e6, 2) for b, t in sorted(by_backend.items())}})
    return entries


def save_entries(path: Path, device_name: str, entries: list[dict[str, Any]], source: str) -> None:
    """Merges `entries` into the section of `device_name` in the table at `path` (an entry replaces the one
    of the same op, pass, dtype and batch; other GPUs' sections are kept). An unreadable file is replaced."""
    path = Path(path)
    try:
        table = read_table(path)
    except ValueError:
        table = {"format": FORMAT, "devices": {}}
    key = lambda e: (e["op"], e["pass"], e["dtype"], e["batch"])  # noqa: E731
    merged = {key(e): e for e in table["devices"].get(device_name, {}).get("entries", [])}
    merged.update({key(e): e for e in entries})
    table["devices"][device_name] = {"measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                     "source": source, "entries": [merged[k] for k in sorted(merged)]}
    path.parent.mkdir(parents=True, exist_ok=True)
    # atomic: an interrupted run leaves the old table, never half a file; the temporary name is this
    # process's own, so two runs saving at once do not write into one file
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(table, indent=1) + "\n")
    tmp.replace(path)
