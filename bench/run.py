"""The benchmark runner: `python bench/run.py [options]` in a source checkout, or `decafa-fast bench` (which
runs this file as a script wherever the suite is: the checkout, or the copy a wheel carries in
decafa_fast/_sources). As a script its folder is first on sys.path, so the suite's modules (measure.py,
report.py) import by name, as pytest imports them beside the suites.

It runs the pytest-benchmark suites beside it (test_ops.py, test_model.py) in this process with pytest's own
terminal output off, prints one line per case as it ends and one summary at the end (bench/report.py), and
writes only under --out (default: a new folder under ~/.cache/decafa_fast/bench, named on stdout): the
pytest-benchmark JSON, the rows as JSON lines (what an interrupted run keeps), summary.md and the plots. On a
GPU it also saves the Triton-vs-CUDA races in the table the "auto" backend reads (also named on stdout).

Every row records the 1-minute load average when it ended and the spread of its timed rounds (fastest,
median, slowest). The run warns in one line when the machine is busy (load average above its core count),
and the summary marks rows measured on a busy machine and rows whose spread is wider than their gap to the
reference (they cannot be ranked against it), with one warning line for each kind.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Any

import measure
import report

HERE = Path(__file__).resolve().parent

SUITES = {"all": ("test_ops.py", "test_model.py"), "ops": ("test_ops.py",), "model": ("test_model.py",)}
# Deprecation warnings from the libraries a run imports (torch.jit, kornia, onnxscript ...) say nothing about
# the measurements; this project's own stay visible.
WARNING_FILTERS = ("ignore::DeprecationWarning", "ignore::FutureWarning",
                   "default::DeprecationWarning:decafa_fast", "default::FutureWarning:decafa_fast")


def default_out() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "decafa_fast" / "bench" / time.strftime("%Y%m%d-%H%M%S")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None,
                        help="folder for the JSON, summary and plots (default: a new folder under "
                             "~/.cache/decafa_fast/bench, printed at the start)")
    parser.add_argument("--quick", action="store_true",
                        help="a small subset: the fused head and soft-argmax in float32 at one batch size, and "
                             "model inference at B = 1")
    parser.add_argument("--full", action="store_true",
                        help="everything, also the slow cases skipped by default on CPU (torch.compile in bf16 "
                             "and at B = 1, model training at B = 8)")
    parser.add_argument("--size", choices=sorted(measure.SIZES), default="paper",
                        help="op problem size: paper = L 98, 128x128, C 64 (default); tiny only checks the machinery")
    parser.add_argument("--backends", default=None,
                        help="comma-separated subset of reference,compiled,kornia,cpp,triton,cuda (default: all)")
    parser.add_argument("--suite", choices=sorted(SUITES), default="all", help="which suite(s) to run")
    parser.add_argument("-k", dest="keyword", default=None, help="pytest -k expression to select benchmarks")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    parser.add_argument("--auto-table", default=None,
                        help="on a GPU, save the Triton-vs-CUDA races here for the 'auto' backend (default: "
                             "decafa_fast.autotable.user_table_path(), which 'auto' reads at import)")
    parser.add_argument("--no-auto-table", action="store_true", help="do not save the races for 'auto'")
    parser.add_argument("--cpu-floor", action="store_true",
                        help="run bench/cpu_floor.py instead of the suites: every op on the CPU against its memory "
                             "floor, cpp beside the reference, torch.compile and kornia, under both allocator "
                             "settings; takes --quick, --out and --backends (without 'compiled': no "
                             "torch.compile); its other options: python bench/cpu_floor.py --help")
    parser.add_argument("--report", nargs="+", metavar="FILE", default=None,
                        help="run nothing: print the tables of saved results (pytest-benchmark .json or the "
                             ".jsonl rows that a run streams beside it)")


def auto_table_path(args: argparse.Namespace) -> Path | None:
    """Where this run saves the GPU races for "auto" (None: not on a GPU, or --no-auto-table)."""
    import torch

    if args.no_auto_table or not torch.cuda.is_available():
        return None
    from decafa_fast.autotable import user_table_path

    return Path(args.auto_table) if args.auto_table else user_table_path()


def pytest_args(args: argparse.Namespace, json_path: Path, auto_table: Path | None) -> list[str]:
    """The pytest command line of a run (also printed, to rerun one by hand). Rows also go to a JSON-lines
    file beside the JSON as they are measured, so that an interrupted run keeps them."""
    argv = [str(HERE / name) for name in SUITES[args.suite]]
    argv += ["--benchmark-only", "--benchmark-quiet", f"--benchmark-json={json_path}",
             f"--benchmark-storage=file://{json_path.parent}",  # else it makes .benchmarks/ in the working folder
             f"--decafa-rows={json_path.with_suffix('.jsonl')}", f"--decafa-size={args.size}", "--decafa-no-summary",
             # none of the checkout's or the user's pytest settings: this run is defined by these arguments
             "-c", os.devnull, f"--rootdir={HERE}", "-p", "no:cacheprovider"]
    for spec in WARNING_FILTERS:
        argv += ["-W", spec]
    if args.quick:
        argv.append("--decafa-quick")
    if args.full:
        argv.append("--decafa-full")
    if args.backends:
        argv.append(f"--decafa-backends={args.backends}")
    if args.keyword:
        argv += ["-k", args.keyword]
    if auto_table is not None:
        argv.append(f"--decafa-auto-table={auto_table}")
    return argv


class Progress:
    """A pytest plugin that replaces pytest's terminal output during a run: one line per case as it ends
    (its time and speed-up), each distinct skip reason once, failures in full, warnings that passed the
    filters once each. (pytest's own output would add pytest-benchmark's table before the summary.)"""

    def __init__(self) -> None:
        self.config: Any = None
        self.total = 0
        self.done = 0
        self.skips: dict[str, int] = {}
        self.failed: list[str] = []
        self.warned: set[str] = set()

    def pytest_configure(self, config) -> None:
        self.config = config

    def pytest_collection_finish(self, session) -> None:
        self.total = len(session.items)
        print(f"{self.total} benchmark cases", flush=True)

    def pytest_collectreport(self, report) -> None:
        if report.failed:
            self.failed.append(report.nodeid)
            print(f"could not collect {report.nodeid or 'the suite'}:\n{report.longreprtext}", flush=True)

    def pytest_runtest_logreport(self, report) -> None:
        if report.failed:
            self.failed.append(report.nodeid)
            print(f"FAILED {report.nodeid} ({report.when}):\n{report.longreprtext}", flush=True)
        elif report.skipped:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            reason = reason.removeprefix("Skipped: ")
            if reason not in self.skips:
                print(f"skipped: {reason}", flush=True)
            self.skips[reason] = self.skips.get(reason, 0) + 1
        if report.when == "teardown":
            self.done += 1
        elif report.when == "call" and report.passed:
            rows = getattr(self.config, "_decafa_rows", [])
            line = report_line(rows[-1], rows) if rows else report.nodeid
            print(f"[{self.done + 1:>{len(str(self.total))}}/{self.total}] {line}", flush=True)

    def pytest_warning_recorded(self, warning_message, when, nodeid, location) -> None:
        text = f"{warning_message.category.__name__}: {warning_message.message}"
        if text not in self.warned:
            self.warned.add(text)
            print(f"warning: {text} ({warning_message.filename}:{warning_message.lineno})", flush=True)


def report_line(row: dict[str, Any], rows: list[dict[str, Any]] | None = None) -> str:
    """One finished case: what it was, its time, its spread, its speed-up over the reference when known, and
    its marks (report.row_marks: busy machine, spread wider than the gap to the reference)."""
    if row.get("suite") == "model":
        what = f"model {row['task']} {row['mode']} {row['dtype']} B{row['batch']} {row['backend']}"
        extra = f", {row['batch'] / row['time_s']:.1f} images/s"
    else:
        what = f"{row.get('op')} {row.get('pass')} {row.get('dtype')} B{row.get('batch')} {row.get('backend')}"
        extra = f", {row['floor_pct']:.1f}% of the floor" if row.get("floor_pct") is not None else ""
    spread = report.spread(row)
    spread_text = f" (spread {100 * spread:.0f}%)" if spread is not None else ""
    speedup = f", {row['speedup']:.2f}x the reference" if row.get("speedup") is not None else ""
    marks = report.row_marks(row, rows if rows is not None else [row])
    return f"{what}: {row['time_s'] * 1e3:.3f} ms{spread_text}{extra}{speedup}" + (f" [{marks}]" if marks else "")


def run(args: argparse.Namespace) -> int:
    if args.report:  # tables of saved results, nothing run
        rows, machine = [], {}
        for path in args.report:
            more, info = report.load_results(path)
            rows += more
            machine = machine or info
        print(report.summarize(rows, machine, None))
        return 0 if rows else 1
    if args.cpu_floor:
        return run_cpu_floor(args)
    missing = [m for m in ("pytest", "pytest_benchmark") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"decafa-fast bench needs {' and '.join(missing)}: pip install 'decafa-fast[bench]'", file=sys.stderr)
        return 2
    import pytest

    out = Path(args.out) if args.out else default_out()
    out.mkdir(parents=True, exist_ok=True)
    json_path = (out / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json").resolve()
    auto_table = auto_table_path(args)
    argv = pytest_args(args, json_path, auto_table)
    print(f"results go to {out.resolve()}", flush=True)
    if auto_table is not None:
        print(f"GPU races for the 'auto' backend go to {auto_table}", flush=True)
    print("running: python -m pytest " + " ".join(argv), flush=True)
    busy = report.busy_warning(*measure.load_and_cores())
    if busy:
        print(busy, flush=True)
    sys.dont_write_bytecode = True  # nothing outside --out: no __pycache__ beside the suite
    start = time.perf_counter()
    progress = Progress()
    code = int(pytest.main(["-p", "no:terminal", *argv], plugins=[progress]))
    elapsed = time.perf_counter() - start
    if progress.skips:
        print("skipped: " + "; ".join(f"{n} x {reason}" for reason, n in progress.skips.items()))
    rows_path = json_path.with_suffix(".jsonl")
    if code == pytest.ExitCode.INTERRUPTED:
        return interrupted(rows_path, None if args.no_plot else out)
    rows, machine = report.load_rows(json_path) if json_path.is_file() and json_path.stat().st_size else ([], {})
    if not rows:
        print(f"decafa-fast bench: pytest exited with {code} and measured nothing", file=sys.stderr)
        return code or 1
    summary = report.summarize(rows, machine, None if args.no_plot else out)
    print()
    print(summary)
    print(f"results: {json_path} ({elapsed:.0f} s)")
    return code


EXIT_INTERRUPTED = 130  # as a shell reports a command ended by SIGINT


def interrupted(rows_path: Path, out: Path | None) -> int:
    """Ctrl-C: the summary of the rows measured so far (kept in `rows_path`), and one line saying what is kept."""
    rows = report.load_results(rows_path)[0] if rows_path.is_file() else []
    if rows:
        print()
        print(report.summarize(rows, {}, out))
    kept = (f"kept the {len(rows)} row(s) measured so far in {rows_path} (python bench/run.py --report "
            f"{rows_path} prints them)" if rows else "nothing was measured yet")
    print(f"decafa-fast bench: interrupted: {kept}", file=sys.stderr)
    return EXIT_INTERRUPTED


def run_cpu_floor(args: argparse.Namespace) -> int:
    """bench/cpu_floor.py with this run's --quick and --backends, its JSON under --out."""
    import cpu_floor

    out = Path(args.out) if args.out else default_out()
    out.mkdir(parents=True, exist_ok=True)
    argv = ["--json", str((out / "cpu_floor.json").resolve())]
    if args.quick:
        argv.append("--quick")
    if args.backends and "compiled" not in measure.selected_backends(args.backends):
        argv.append("--no-compile")
    print(f"running: python {cpu_floor.__file__} {' '.join(argv)}", flush=True)
    return cpu_floor.main(argv)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/run.py (decafa-fast bench)",
                                     description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:  # outside pytest's own handling (the report of saved results, say)
        print("decafa-fast bench: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
