"""decafa_fast.ops.cuda_runs: DECAFA_CUDA_RUNS reaches the CUDA kernels through Python (parsed once, at import,
by decafa_fast.settings) instead of being read by the kernels at every launch; set_runs changes it in process.
Runs without a GPU (the kernels' use of the count is checked by the smoke test's in-process sweep and, on a
GPU, by test_ops_cuda.py::test_runs_of_maps_do_not_change_results)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from decafa_fast.ops import cuda_runs


@pytest.mark.parametrize("bad", [0, -1, True, 2**31, 2.0, "3"])
def test_set_runs_refuses_what_is_not_a_count(bad):
    with pytest.raises(ValueError, match="set_runs"):
        cuda_runs.set_runs(bad)


def test_set_runs_round_trip_or_says_why_not():
    if not cuda_runs.available():
        with pytest.raises(RuntimeError, match="no CUDA kernels"):
            cuda_runs.set_runs(3)
        with pytest.raises(RuntimeError, match="no CUDA kernels"):
            cuda_runs.runs()
        return
    saved = cuda_runs.runs()
    try:
        cuda_runs.set_runs(7)
        assert cuda_runs.runs() == 7
        cuda_runs.set_runs(None)
        assert cuda_runs.runs() is None
    finally:
        cuda_runs.set_runs(saved)


@pytest.mark.parametrize("bad", [0, -1, True, 65536, 2.0, "3"])
def test_set_pixel_split_refuses_what_is_not_a_count(bad):
    with pytest.raises(ValueError, match="set_pixel_split"):
        cuda_runs.set_pixel_split(bad)


def test_set_pixel_split_round_trip_or_says_why_not():
    if not cuda_runs.available():
        with pytest.raises(RuntimeError, match="set_pixel_split: the C\\+\\+ extension has no CUDA kernels"):
            cuda_runs.set_pixel_split(1)
        with pytest.raises(RuntimeError, match="pixel_split: the C\\+\\+ extension has no CUDA kernels"):
            cuda_runs.pixel_split()
        return
    saved = cuda_runs.pixel_split()
    try:
        cuda_runs.set_pixel_split(1)
        assert cuda_runs.pixel_split() == 1
        cuda_runs.set_pixel_split(None)
        assert cuda_runs.pixel_split() is None
    finally:
        cuda_runs.set_pixel_split(saved)


def _import(value: str) -> subprocess.CompletedProcess:
    code = ("import decafa_fast.ops as ops\n"
            "from decafa_fast.ops import cuda_runs\n"
            "print('runs', cuda_runs.runs() if cuda_runs.available() else 'unavailable')\n")
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, "DECAFA_CUDA_RUNS": value},
                          capture_output=True, text=True, timeout=300)


def test_environment_is_read_once_at_import():
    good = _import("5")
    assert good.returncode == 0, good.stderr
    assert good.stdout.split()[-1] in ("5", "unavailable"), good.stdout
    bad = _import("five")
    assert bad.returncode == 0, bad.stderr
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "DECAFA_CUDA_RUNS" in lines[0] and "Traceback" not in bad.stderr, bad.stderr
    assert bad.stdout.split()[-1] in ("None", "unavailable"), bad.stdout
