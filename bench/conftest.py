"""Shared benchmark fixtures and options; device facts go into every run's machine_info.

Options (also set by `decafa-fast bench`):
    --decafa-size paper|tiny    op problem size (paper: L 98, 128 x 128, C 64; tiny: machinery check)
    --decafa-quick              a small subset (see bench/test_ops.py and bench/test_model.py)
    --decafa-full               also the slow cases skipped by default on CPU
    --decafa-backends a,b,...   only these backends (reference, compiled, kornia, cpp, triton, cuda)
    --decafa-auto-table PATH    on a GPU, save the Triton-vs-CUDA races for the "auto" backend
    --decafa-rows PATH          append each row to a JSON-lines file as it is measured

The helpers live beside this file: bench/measure.py (what is measured, and the machine) and bench/report.py
(tables, plots, the auto-backend table); pytest puts this folder on sys.path, so they import by name.

Unlike tests/, nothing here sets TRITON_INTERPRET: the Triton interpreter is not a benchmark, so Triton
cases run on a GPU only.
"""
from __future__ import annotations

import json
from typing import Any

import measure
import pytest
import report
import torch

from decafa_fast import ops


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("decafa", "decafa-fast benchmarks")
    group.addoption("--decafa-size", choices=sorted(measure.SIZES), default="paper", help="op problem size")
    group.addoption("--decafa-quick", action="store_true", help="a small subset of the benchmarks")
    group.addoption("--decafa-full", action="store_true", help="also the slow cases skipped by default on CPU")
    group.addoption("--decafa-backends", default=None, help="comma-separated backends to run (default: all)")
    group.addoption("--decafa-auto-table", default=None, metavar="PATH",
                    help="on a GPU, save which of Triton and CUDA won each case into this auto-backend table "
                         "(decafa_fast/autotable.py; written after every case, so a cut-off run keeps its races)")
    group.addoption("--decafa-rows", default=None, metavar="PATH",
                    help="append every benchmark's row (extra_info and time) to this JSON-lines file as it ends")
    group.addoption("--decafa-no-summary", action="store_true",
                    help="do not print the speed-up tables at the end (decafa-fast bench prints its own)")


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict[str, Any]) -> None:
    facts = measure.device_facts()
    device = measure.bench_device()
    bw = getattr(config, "_decafa_copy_bw", None)
    if bw is not None:
        facts["copy_gbps"] = round(bw / 1e9, 2)
    facts["clone_gbps"] = round(measure.copy_bandwidth(device, repeats=3, fresh=True) / 1e9, 2)
    machine_info["decafa"] = facts


@pytest.fixture(scope="session")
def bench_size(pytestconfig: pytest.Config) -> measure.BenchSize:
    return measure.SIZES[pytestconfig.getoption("--decafa-size")]


@pytest.fixture(scope="session")
def device() -> torch.device:
    return measure.bench_device()


@pytest.fixture(scope="session")
def tiny(pytestconfig: pytest.Config) -> bool:
    """--decafa-size tiny: a machinery check, so every measurement is kept short."""
    return pytestconfig.getoption("--decafa-size") == "tiny"


@pytest.fixture(scope="session")
def time_budget(tiny: bool) -> float | None:
    """Seconds of timed rounds per benchmark (None: measure.choose_rounds's default)."""
    return 0.1 if tiny else None


@pytest.fixture(scope="session")
def min_rounds(tiny: bool) -> int | None:
    """Fewest timed rounds per benchmark (None: measure.choose_rounds's default)."""
    return 1 if tiny else None


@pytest.fixture(scope="session")
def copy_bw(pytestconfig: pytest.Config, device: torch.device, tiny: bool) -> float:
    """Copy bandwidth (bytes/s) of this device, measured once per session: the ceiling for % of floor."""
    bw = measure.copy_bandwidth(device, nbytes=(32 << 20) if tiny else None)
    pytestconfig._decafa_copy_bw = bw  # also reported in machine_info
    return bw


@pytest.fixture(scope="session")
def reference_times() -> dict[tuple, float]:
    """Fastest time of the reference (eager) per case key, for speed-ups within one run."""
    return {}


@pytest.fixture(scope="session")
def bench_rows(pytestconfig: pytest.Config) -> list[dict[str, Any]]:
    """Every benchmark's extra_info (with its time), for the tables printed at the end of the session."""
    rows: list[dict[str, Any]] = []
    pytestconfig._decafa_rows = rows
    return rows


@pytest.fixture(scope="session")
def record_row(pytestconfig: pytest.Config, bench_rows: list[dict[str, Any]], device: torch.device):
    """Keeps one benchmark's row: for the closing tables, in --decafa-rows as a JSON line, and (a GPU race)
    in --decafa-auto-table. Both files are written as each case ends, so a run cut off by a time limit
    keeps what it measured (pytest-benchmark writes its JSON only at the very end)."""
    rows_path = pytestconfig.getoption("--decafa-rows")
    auto_table = pytestconfig.getoption("--decafa-auto-table")

    def record(info: dict[str, Any]) -> None:
        info.update(_spread_of(getattr(pytestconfig, "_decafa_benchmark", None)))
        bench_rows.append(dict(info))
        if rows_path:
            with open(rows_path, "a") as fh:
                fh.write(json.dumps(info, default=str) + "\n")
        if auto_table and device.type == "cuda" and info.get("backend") in ("triton", "cuda"):
            report.update_auto_table(auto_table, bench_rows, device)

    return record


@pytest.fixture(autouse=True)
def _current_benchmark(request: pytest.FixtureRequest, pytestconfig: pytest.Config):
    """The running test's pytest-benchmark fixture, where record_row reads the spread of its rounds."""
    pytestconfig._decafa_benchmark = (request.getfixturevalue("benchmark") if "benchmark" in request.fixturenames
                                      else None)
    yield
    pytestconfig._decafa_benchmark = None


def _spread_of(benchmark: Any) -> dict[str, Any]:
    """min_s, median_s, max_s (seconds per call) and rounds of a benchmark's timed rounds ({} before timing)."""
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is None:
        return {}
    return {"min_s": stats.min, "median_s": stats.median, "max_s": stats.max, "rounds": stats.rounds}


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    rows = getattr(config, "_decafa_rows", None)
    if not rows or config.getoption("--decafa-no-summary"):
        return
    terminalreporter.section("decafa-fast: speed-up over the reference, % of the copy-bandwidth floor")
    if any(r.get("suite") == "ops" for r in rows):
        terminalreporter.write_line(report.format_op_table(rows))
    if any(r.get("suite") == "model" for r in rows):
        terminalreporter.write_line(report.format_model_table(rows))
    targets = report.format_targets(rows)
    if targets:
        terminalreporter.write_line(targets)
    for line in report.run_warnings(rows):
        terminalreporter.write_line(line)
    terminalreporter.write_line("time: fastest round; definitions in bench/measure.py")


@pytest.fixture
def use_backend():
    """Selects an ops backend for one benchmark and restores the previous one afterwards."""
    previous = ops.get_backend()

    def select(name: str) -> None:
        ops.set_backend(name)

    yield select
    ops.set_backend(previous)

