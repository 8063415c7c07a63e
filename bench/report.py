"""What a run's rows become: the tables printed and saved, plots of time against batch size, the run's
summary with its load average and warnings, and (on a GPU) the Triton-vs-CUDA races saved for the "auto"
backend.

A row is one benchmark's `extra_info` plus its time (bench/test_ops.py, bench/test_model.py); the measured
quantities are defined in bench/measure.py.
"""
from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def update_auto_table(path: str | Path, rows: Sequence[dict[str, Any]], device: torch.device) -> int:
    """Saves the Triton-vs-CUDA races among `rows` for this GPU into the auto-backend table at `path`
    (decafa_fast/autotable.py); returns how many entries the rows gave (0: nothing raced, nothing written)."""
    from decafa_fast import autotable

    entries = autotable.entries_from_rows(rows)
    if entries:
        name = torch.cuda.get_device_properties(device).name
        autotable.save_entries(Path(path), name, entries, source="pytest " + " ".join(sys.argv[1:]))
    return len(entries)


# --------------------------------------------------------------------------------------------------
# Reading results back: tables and plots
# --------------------------------------------------------------------------------------------------
def load_rows(json_path: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The benchmark rows of a pytest-benchmark JSON file (extra_info + time), and its machine_info."""
    data = json.loads(Path(json_path).read_text())
    rows = []
    for bench in data.get("benchmarks", []):
        info = dict(bench.get("extra_info", {}))
        stats = bench.get("stats", {})
        info.setdefault("time_s", stats.get("min"))
        for key in ("min", "median", "max"):
            info.setdefault(f"{key}_s", stats.get(key))
        info.setdefault("rounds", stats.get("rounds"))
        info["name"] = bench.get("name")
        rows.append(info)
    return rows, data.get("machine_info", {})


def load_results(path: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows (and machine_info) of a pytest-benchmark JSON file, or of a --decafa-rows JSON-lines file
    (rows only; what a run cut off before its end has kept)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()], {}
    return load_rows(path)


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _markdown(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in body)])


# --------------------------------------------------------------------------------------------------
# How far a row can be trusted: the machine's load and the spread of its rounds
# --------------------------------------------------------------------------------------------------
# what identifies a case, so that a row finds its reference (the same case with backend "reference")
_CASE_FIELDS = ("suite", "op", "pass", "dtype", "batch", "task", "mode", "L", "H", "W", "C", "stages", "image_size")
BUSY = "busy"
UNRANKED = "spread > gap"


def spread(row: dict[str, Any]) -> float | None:
    """(slowest - fastest) / fastest of the row's timed rounds; None when the row has no slowest round."""
    fastest, slowest = row.get("min_s") or row.get("time_s"), row.get("max_s")
    if not fastest or slowest is None:
        return None
    return (slowest - fastest) / fastest


def is_busy(row: dict[str, Any]) -> bool:
    """Whether the machine was busy when the row ended: 1-minute load average above its core count."""
    load, cores = row.get("loadavg_1m"), row.get("cores")
    return load is not None and bool(cores) and load > cores


def reference_row(row: dict[str, Any], rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The reference (eager) row of the same case in `rows`, if measured."""
    return next((q for q in rows if q.get("backend") == "reference"
                 and all(q.get(k) == row.get(k) for k in _CASE_FIELDS)), None)


def spread_exceeds_gap(row: dict[str, Any], rows: Sequence[dict[str, Any]]) -> bool:
    """Whether the row cannot be ranked against its reference: the wider of their spreads (slowest - fastest,
    in seconds) is larger than the gap between their fastest times."""
    ref = reference_row(row, rows) if row.get("backend") != "reference" else None
    if ref is None or not row.get("time_s") or not ref.get("time_s"):
        return False
    widths = [q["max_s"] - (q.get("min_s") or q["time_s"]) for q in (row, ref) if q.get("max_s") is not None]
    return bool(widths) and max(widths) > abs(row["time_s"] - ref["time_s"])


def row_marks(row: dict[str, Any], rows: Sequence[dict[str, Any]]) -> str:
    """The row's marks, comma-separated: BUSY (measured on a busy machine), UNRANKED (spread wider than the gap to
    the reference); "" for a row that can be trusted."""
    marks = [BUSY] if is_busy(row) else []
    if spread_exceeds_gap(row, rows):
        marks.append(UNRANKED)
    return ", ".join(marks)


def busy_warning(load: float | None, cores: int) -> str | None:
    """The one-line warning for a machine that is busy now (None when it is not, or the load is unknown)."""
    if load is None or load <= cores:
        return None
    return (f"warning: the machine is busy: 1-minute load average {load:.1f} on {cores} cores; times will be "
            f"inflated and noisy, and rows measured while it stays busy are marked '{BUSY}'")


def run_warnings(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One warning line per kind of mark among `rows` (none when every row can be trusted)."""
    lines = []
    busy = [r for r in rows if is_busy(r)]
    if busy:
        peak = max(r["loadavg_1m"] for r in busy)
        lines.append(f"warning: the machine was busy during {len(busy)} of {len(rows)} rows (1-minute load average "
                     f"up to {peak:.1f} on {busy[0]['cores']} cores; marked '{BUSY}'): their times include waiting "
                     f"for the CPU; rerun on an idle machine before comparing them")
    unranked = [r for r in rows if spread_exceeds_gap(r, rows)]
    if unranked:
        lines.append(f"warning: {len(unranked)} row(s) have timed rounds spread wider than their gap to the reference "
                     f"(marked '{UNRANKED}'): they cannot be ranked against it")
    return lines


def _load_line(rows: Sequence[dict[str, Any]]) -> str | None:
    loads = [r["loadavg_1m"] for r in rows if r.get("loadavg_1m") is not None]
    if not loads:
        return None
    cores = next((r["cores"] for r in rows if r.get("cores")), None)
    return (f"1-minute load average as the rows ended: {min(loads):.1f} to {max(loads):.1f}"
            + (f" on {cores} cores" if cores else ""))


def _spread_cell(row: dict[str, Any]) -> str:
    value = spread(row)
    return "-" if value is None else f"{100 * value:.0f}%"


def format_op_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of the op benchmarks: op, pass, dtype, B, backend, time, spread, speed-up, GB/s, % floor,
    peak, marks."""
    ops_rows = [r for r in rows if r.get("suite") == "ops"]
    header = ["op", "pass", "dtype", "B", "backend", "time (ms)", "spread", "speed-up", "GB/s", "% floor", "peak MiB",
              "marks"]
    body = [
        [r["op"], r["pass"], r["dtype"], str(r["batch"]), r["backend"], _fmt(r["time_s"] * 1e3, ".3f"),
         _spread_cell(r), _fmt(r.get("speedup"), ".2f", "x"), _fmt(r.get("gbps"), ".1f"),
         _fmt(r.get("floor_pct"), ".1f"), _fmt(None if r.get("peak_bytes") is None else r["peak_bytes"] / 2**20, ".1f"),
         row_marks(r, rows)]
        for r in ops_rows
    ]
    return _markdown(header, body)


def format_model_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of the model benchmarks: task, mode, dtype, B, backend, time, spread, images/s, speed-up,
    peak memory, (CPU) the share of the time in convolutions and marks; then a note on every row slower than
    the reference whose cause the run measured (model_notes)."""
    model_rows = [r for r in rows if r.get("suite") == "model"]
    header = ["task", "mode", "dtype", "B", "backend", "time (ms)", "spread", "images/s", "speed-up", "peak MiB",
              "conv %", "marks"]
    body = [
        [r["task"], r["mode"], r["dtype"], str(r["batch"]), r["backend"], _fmt(r["time_s"] * 1e3, ".1f"),
         _spread_cell(r), _fmt(r["batch"] / r["time_s"], ".1f"), _fmt(r.get("speedup"), ".2f", "x"),
         _fmt(None if r.get("peak_bytes") is None else r["peak_bytes"] / 2**20, ".1f"),
         _fmt(None if r.get("conv_share") is None else 100 * r["conv_share"], ".0f"), row_marks(r, rows)]
        for r in model_rows
    ]
    notes = model_notes(model_rows)
    return _markdown(header, body) + "".join(f"\n\n{note}" for note in notes)


def model_notes(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Why a model row is slower than the reference, where the run measured it: on CPU the convolutions,
    the same layers with either backend, take most of the time, so the fused ops can move the total by the
    remaining share at most; a gap smaller than the spread of the row's own timed rounds is noise."""
    notes = []
    for r in rows:
        if r.get("suite") != "model" or r.get("speedup") is None or r["speedup"] >= 1.0 or r.get("conv_share") is None:
            continue
        ref = next((q for q in rows if q.get("suite") == "model" and q.get("backend") == "reference"
                    and all(q.get(k) == r.get(k) for k in ("task", "mode", "dtype", "batch"))), {})
        gap = 1.0 / r["speedup"] - 1.0  # extra time over the reference, as a fraction of the reference's
        other = 1.0 - r["conv_share"]
        note = (f"Note: {r['task']} {r['mode']} {r['dtype']} B {r['batch']} {r['backend']} is {r['speedup']:.2f}x the "
                f"reference: convolutions, the same layers with either backend, take {r['conv_share']:.0%} of its "
                f"time, so the fused ops can change the other {other:.0%} at most. It is {gap:.0%} slower")
        spread = [q["median_s"] / q["time_s"] - 1.0 for q in (r, ref) if q.get("median_s") and q.get("time_s")]
        if gap > other:
            note += ", more than that share: the difference comes from the machine, not the ops"
        elif spread and gap <= max(spread):
            note += (f", less than the spread of the timed rounds themselves (median {max(spread):.0%} above the "
                     "fastest): noise")
        if r.get("loadavg_1m") is not None and ref.get("loadavg_1m") is not None:
            note += f" (1-minute load average {r['loadavg_1m']:.1f} here, {ref['loadavg_1m']:.1f} for the reference)"
        notes.append(note + ".")
    return notes


# The project's targets: (description, row filter, measured quantity, threshold).
# (only rows of the paper's size count: L 98, 128 x 128, C 64; the S = 4 model at 128 x 128)
_HEAD_B8 = dict(suite="ops", op="decafa_head", dtype="float32", batch=8, backend="cpp", L=98, H=128, W=128, C=64)
_PAPER_MODEL = dict(suite="model", task="infer", mode="reduce-overhead", stages=4, image_size=128)
TARGETS = [
    ("CPU: fused head forward >= 3x the reference (cpp, fp32, B 8)", dict(_HEAD_B8, **{"pass": "fwd"}),
     "speedup", 3.0),
    ("CPU: fused head forward+backward >= 2x the reference (cpp, fp32, B 8)",
     dict(_HEAD_B8, **{"pass": "fwd+bwd"}), "speedup", 2.0),
    ("CPU: fused head forward+backward peak memory below the reference's (cpp, fp32, B 8)",
     dict(_HEAD_B8, **{"pass": "fwd+bwd"}), "peak_vs_reference", 1.0),
    ("GPU: DeCaFA S=4 at B 1 >= 1000 images/s (CUDA graphs)",
     dict(_PAPER_MODEL, dtype="float32", batch=1), "images_per_s", 1000.0),
    ("GPU: DeCaFA S=4 at B 256 bf16 >= 6000 images/s",
     dict(_PAPER_MODEL, dtype="bfloat16", batch=256), "images_per_s", 6000.0),
]


def format_targets(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of the targets that this run measured: target, backend, measured value, met or not."""
    body = []
    for text, match, quantity, threshold in TARGETS:
        for r in rows:
            if any(r.get(k) != v for k, v in match.items()) or r.get("backend") == "reference":
                continue
            if quantity == "peak_vs_reference":
                ref = next((q for q in rows if q.get("backend") == "reference"
                            and all(q.get(k) == v for k, v in match.items() if k != "backend")), None)
                if ref is None or r.get("peak_bytes") is None or ref.get("peak_bytes") is None:
                    continue
                value = f"{r['peak_bytes'] / 2**20:.1f} MiB vs {ref['peak_bytes'] / 2**20:.1f} MiB"
                met = r["peak_bytes"] < ref["peak_bytes"]
            else:
                measured = r.get(quantity) if quantity != "images_per_s" else r["batch"] / r["time_s"]
                if measured is None:
                    continue
                value, met = f"{measured:.2f}" + ("x" if quantity == "speedup" else " images/s"), measured >= threshold
            body.append([text, r["backend"], value, "yes" if met else "NO"])
    return _markdown(["target", "backend", "measured", "met"], body) if body else ""


# one colour per backend, one marker (and line style) per pass / compile mode, the same in every panel
_COLORS = {"reference": "black", "compiled": "tab:purple", "kornia": "tab:green", "cpp": "tab:blue",
           "triton": "tab:orange", "cuda": "tab:red"}
_MARKERS = {"fwd": "o", "fwd+bwd": "s", "eager": "o", "compile": "^", "reduce-overhead": "D"}
_LINESTYLES = {"fwd": "-", "fwd+bwd": "--", "eager": "-", "compile": "--", "reduce-overhead": ":"}


def _panels(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str], dict[tuple[str, str], list[dict[str, Any]]]]:
    """(panel title, dtype) -> (backend, pass or compile mode) -> its rows sorted by batch size."""
    panels: dict[tuple[str, str], dict[tuple[str, str], list[dict[str, Any]]]] = {}
    for r in rows:
        if r.get("suite") == "ops":
            panel, series = (r["op"], r["dtype"]), (r["backend"], r["pass"])
        elif r.get("suite") == "model":
            panel, series = (f"model {r['task']}", r["dtype"]), (r["backend"], r["mode"])
        else:
            continue
        panels.setdefault(panel, {}).setdefault(series, []).append(r)
    for lines in panels.values():
        for series_rows in lines.values():
            series_rows.sort(key=lambda q: q["batch"])
    return panels


def figure(rows: Sequence[dict[str, Any]]):
    """The matplotlib figure of `rows` (None: no rows): one panel per op (or model task) and dtype; on the x axis
    every batch size measured, evenly spaced; time on a log axis. Each backend has its colour and each pass (or
    compile mode) its marker and line style, named in every panel's legend; a point is the fastest round with a
    bar up to the slowest, side by side when several share a batch size; points of marked rows (row_marks) are
    circled in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = _panels(rows)
    if not panels:
        return None
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 4.0 * nrows), squeeze=False)
    for ax, ((title, dtype), lines) in zip(axes.flat, sorted(panels.items())):
        batches = sorted({r["batch"] for series_rows in lines.values() for r in series_rows})
        position = {b: i for i, b in enumerate(batches)}
        step = 0.7 / len(lines)
        marked_x, marked_y = [], []
        for k, ((backend, style), series_rows) in enumerate(sorted(lines.items())):
            offset = (k - (len(lines) - 1) / 2) * step
            xs = [position[r["batch"]] + offset for r in series_rows]
            ys = [r["time_s"] * 1e3 for r in series_rows]
            up = [max(0.0, (r.get("max_s") or r["time_s"]) * 1e3 - y) for r, y in zip(series_rows, ys)]
            ax.errorbar(xs, ys, yerr=[[0.0] * len(ys), up], color=_COLORS.get(backend, "gray"),
                        marker=_MARKERS.get(style, "x"), linestyle=_LINESTYLES.get(style, "-"), markersize=5,
                        capsize=2, linewidth=1, label=f"{backend} {style}")
            for x, y, r in zip(xs, ys, series_rows):
                if row_marks(r, rows):
                    marked_x.append(x)
                    marked_y.append(y)
        if marked_x:
            ax.scatter(marked_x, marked_y, s=110, facecolors="none", edgecolors="red", linewidths=1.2,
                       label=f"marked ({BUSY} / {UNRANKED})", zorder=5)
        ax.set_xticks(range(len(batches)), [str(b) for b in batches])
        ax.set_xlim(-0.5, len(batches) - 0.5)
        ax.set_yscale("log")
        ax.set_title(f"{title} ({dtype})", fontsize=9)
        ax.set_xlabel("batch size")
        ax.set_ylabel("time (ms): fastest round, bar to slowest")
        ax.grid(True, which="both", axis="y", alpha=0.3)
        ax.legend(fontsize=6, loc="best")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def plot_rows(rows: Sequence[dict[str, Any]], path: str | Path) -> Path | None:
    """`figure(rows)` saved as a PNG at `path`; returns the path (None: no rows)."""
    import matplotlib.pyplot as plt

    fig = figure(rows)
    if fig is None:
        return None
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _machine_line(machine: dict[str, Any]) -> str:
    facts = machine.get("decafa", {})
    parts = [f"CPU {facts.get('cpu_model', machine.get('cpu', {}).get('brand_raw', '?'))} "
             f"({facts.get('cpu_count', '?')} cores, {facts.get('torch_threads', '?')} torch threads)"]
    if facts.get("cuda_device"):
        parts.append(f"GPU {facts['cuda_device']['name']}")
    parts.append(f"torch {facts.get('torch', '?')}, triton {facts.get('triton')}, CUDA {facts.get('torch_cuda')}")
    if facts.get("loadavg"):
        parts.append(f"load average at start {facts['loadavg']}")
    return "; ".join(parts)


def summarize(rows: Sequence[dict[str, Any]], machine: dict[str, Any], out_dir: str | Path | None) -> str:
    """The readable summary of one run (markdown). With `out_dir`: also written to out_dir/summary.md,
    with the plots beside it."""
    text = [f"# decafa-fast bench, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", ""]
    if machine:
        text += [_machine_line(machine), ""]
    load = _load_line(rows)
    if load:
        text += [load, ""]
    warnings = run_warnings(rows)
    if warnings:
        text += [*warnings, ""]
    for suite, title, table in (("ops", "Ops", format_op_table), ("model", "Model (DeCaFA)", format_model_table)):
        suite_rows = [r for r in rows if r.get("suite") == suite]
        if suite_rows:
            text += [f"## {title}", "", table(rows), ""]
            if out_dir is not None:
                text += [f"plot: {plot_rows(suite_rows, Path(out_dir) / f'{suite}_time_vs_batch.png')}", ""]
    targets = format_targets(rows)
    if targets:
        text += ["## Targets", "", targets, ""]
    text += ["time: fastest round; spread: (slowest - fastest) / fastest round; speed-up: reference-eager time / "
             "this time, same run; % floor: (floor bytes / copy bandwidth) / time; marks: "
             f"'{BUSY}' = load average above the core count when the row ended, '{UNRANKED}' = the wider spread of "
             "the row and its reference exceeds the gap between their times.", ""]
    summary = "\n".join(text)
    if out_dir is not None:
        (Path(out_dir) / "summary.md").write_text(summary)
    return summary
