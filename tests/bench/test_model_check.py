"""bench/model_check.py (the whole-model step of bench/gpu_check.sh) runs only on a GPU session: its logic
(case order, deadline per case, JSON after every case, speed-up against the reference) checked here on CPU
with the tiny model, the cpp backend standing in for the GPU ones."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import model_check


def test_eager_cases_first_with_speedups(tmp_path):
    out = tmp_path / "model.json"
    args = model_check.parse_args(["--tiny", "--batches", "1", "--reps", "1", "--no-compile",
                                   "--backends", "reference,cpp,cuda", "--json", str(out)])
    assert model_check.run(args, torch.device("cpu"), ("cpp",), deadline=time.monotonic() + 300) == 0
    cases = json.loads(out.read_text())["cases"]
    assert [(c["case"], c["backend"], c["batch"]) for c in cases] == [("eager", "reference", 1), ("eager", "cpp", 1)]
    assert cases[1]["speedup"] == cases[0]["ms"] / cases[1]["ms"]


def test_every_case_checks_the_deadline(tmp_path, capsys):
    out = tmp_path / "model.json"
    args = model_check.parse_args(["--tiny", "--batches", "1,2", "--backends", "reference", "--json", str(out)])
    assert model_check.run(args, torch.device("cpu"), ("cpp",), deadline=time.monotonic() - 1) == 0
    assert json.loads(out.read_text())["cases"] == []
    text = capsys.readouterr().out
    assert "skipped (out of time): eager reference B=1" in text and "compile default reference B=1" in text
