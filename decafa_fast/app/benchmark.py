"""`decafa-fast bench`: runs the benchmark suite, which lives in bench/ with its runner (bench/run.py), its
measuring helpers (bench/measure.py) and its tables and plots (bench/report.py). It is found in the source
checkout above this package (an editable install) or in the copy that a wheel carries
(decafa_fast/_sources/bench, put there by setup.py); the command takes bench/run.py's options.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

PACKAGE_DIR = Path(__file__).resolve().parents[1]
SUITE_DIRS = (PACKAGE_DIR.parent / "bench", PACKAGE_DIR / "_sources" / "bench")


def suite_dir() -> Path | None:
    """The folder of the benchmark suite: the checkout's bench/, else the wheel's copy (None: neither)."""
    return next((d for d in SUITE_DIRS if (d / "run.py").is_file() and (d / "measure.py").is_file()), None)


def _runner() -> ModuleType | None:
    folder = suite_dir()
    if folder is None:
        return None
    if "decafa_bench_run" not in sys.modules:
        spec = importlib.util.spec_from_file_location("decafa_bench_run", folder / "run.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["decafa_bench_run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    runner = _runner()
    if runner is None:  # run() says why: let any options through, so that its line is what the user sees
        parser.error = lambda message: None
    else:
        runner.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    runner = _runner()
    if runner is None:
        print("decafa-fast bench: this install has no benchmark suite (bench/); in a source checkout run "
              "`python bench/run.py` with the same options", file=sys.stderr)
        return 2
    return runner.run(args)
