"""decafa_fast.ops.cuda_runs: DECAFA_CUDA_RUNS reaches the CUDA kernels through Python (parsed once, at import,
by decafa_fast.settings) instead of being read by the kernels at every launch; set_runs changes it in process,
and set_pixel_split the forward pixel kernel's channel groups. Runs without a GPU (the kernels' use of the count
is checked by the smoke test's in-process sweep and, on a GPU, by
test_ops_cuda.py::test_runs_of_maps_do_not_change_results)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from decafa_fast.ops import cuda_runs

# (getter, setter, largest count, a count to set)
SETTINGS = {"runs": ("runs", "set_runs", 2**31 - 1, 7), "pixel split": ("pixel_split", "set_pixel_split", 65535, 1)}


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("bad", [0, -1, True, "too many", 2.0, "3"])
def test_setters_refuse_what_is_not_a_count(setting, bad):
    _, setter, largest, _ = SETTINGS[setting]
    with pytest.raises(ValueError, match=setter):
        getattr(cuda_runs, setter)(largest + 1 if bad == "too many" else bad)


@pytest.mark.parametrize("setting", SETTINGS)
def test_settings_round_trip_or_say_why_not(setting):
    getter, setter, _, n = SETTINGS[setting]
    get, set_ = getattr(cuda_runs, getter), getattr(cuda_runs, setter)
    if not cuda_runs.available():
        with pytest.raises(RuntimeError, match=f"{setter}: the C\\+\\+ extension has no CUDA kernels"):
            set_(n)
        with pytest.raises(RuntimeError, match=f"{getter}: the C\\+\\+ extension has no CUDA kernels"):
            get()
        return
    saved = get()
    try:
        set_(n)
        assert get() == n
        set_(None)
        assert get() is None
    finally:
        set_(saved)


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
