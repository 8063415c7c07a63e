"""`decafa-fast bench`: runs the benchmark suite, which lives in bench/ with its runner (bench/run.py), its
measuring helpers (bench/measure.py) and its tables and plots (bench/report.py). It is found in the source
checkout above this package (an editable install) or in the copy that a wheel carries
(decafa_fast/_sources/bench, put there by setup.py); the command takes bench/run.py's options.

The runner runs as its own process, `python -B bench/run.py OPTIONS`, rather than being imported: bench/ is
a client of the package (its suites import decafa_fast.ops and decafa_fast.app.model), so importing it from
here would close an import cycle and need sys.path edits to find its modules by name, which its pytest
suites require. As a script it is also exactly what a user runs by hand in a checkout. The child process
gets this package's folder first on PYTHONPATH, so that it measures this copy of decafa_fast; Ctrl-C
reaches both, and the runner says what it kept.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parents[1]
SUITE_DIRS = (PACKAGE_DIR.parent / "bench", PACKAGE_DIR / "_sources" / "bench")


def suite_dir() -> Path | None:
    """The folder of the benchmark suite: the checkout's bench/, else the wheel's copy (None: neither)."""
    return next((d for d in SUITE_DIRS if (d / "run.py").is_file() and (d / "measure.py").is_file()), None)


def runner_command(folder: Path, argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that run `folder`/run.py with `argv` on this copy of decafa_fast."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PACKAGE_DIR.parent), env.get("PYTHONPATH", "")) if p)
    return [sys.executable, "-B", str(folder / "run.py"), *argv], env


def run_argv(argv: list[str]) -> int:
    """Run the benchmark runner with these options (all of them are its own, --help included); its exit status."""
    folder = suite_dir()
    if folder is None:
        print("decafa-fast bench: this install has no benchmark suite (bench/); in a source checkout run "
              "`python bench/run.py` with the same options", file=sys.stderr)
        return 2
    command, env = runner_command(folder, argv)
    process = subprocess.Popen(command, env=env)
    while True:
        try:
            code = process.wait()
            break
        except KeyboardInterrupt:  # the runner received the same Ctrl-C: wait for it to say what it kept
            continue
    return 128 + signal.SIGINT if code == -signal.SIGINT else (128 - code if code < 0 else code)
