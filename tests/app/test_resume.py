"""Exact resume: a run stopped after a checkpoint and resumed from it equals one that never stopped, bit for
bit on CPU (weights, optimizer state, metrics rows), and metrics.csv holds each step once."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from decafa_fast.app.cli import main
from decafa_fast.app.model.checkpoint import CHECKSUM, content_checksum, load_checkpoint
from decafa_fast.app.training.config import TrainConfig
from decafa_fast.app.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]

# two stages (so the fusion is in the loop), flips on, three alternating sets, small enough for ~1 s a run
SMALL = dict(stages=2, image_size=16, widths=(4, 4, 4), embedding_channels=4, train_size=24, val_size=4,
             batch_size=4, device="cpu", threads=1, progress=False, log_every=1)


def _config(out, **changes) -> TrainConfig:
    return TrainConfig.from_preset("tiny", out=str(out), **{**SMALL, **changes})


def _rows(out) -> list[dict]:
    with open(out / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in csv.DictReader(f)]


def _assert_same_state(a_path, b_path):
    a, b = load_checkpoint(a_path), load_checkpoint(b_path)
    assert a["step"] == b["step"]
    assert a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), f"weight {name} differs"
    for index, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][index][key]), f"optimizer {index} {key} differs"
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]


def test_killed_after_a_checkpoint_and_resumed_equals_uninterrupted(tmp_path):
    steps = 8
    whole = Trainer(_config(tmp_path / "whole", steps=steps, seed=3))
    whole.run()

    # the interrupted run checkpoints at step 4, writes its rows up to step 6, then dies (no final save)
    broken = Trainer(_config(tmp_path / "broken", steps=steps, seed=3, save_every=steps // 2))
    broken.setup()
    for _ in range(6):
        assert broken.advance()
    broken.close_progress()
    assert load_checkpoint(tmp_path / "broken" / "checkpoint.pt")["step"] == steps // 2
    assert [r["step"] for r in _rows(tmp_path / "broken")] == [str(s) for s in range(1, 7)]

    resumed = Trainer(_config(tmp_path / "broken", steps=steps, seed=3, save_every=steps // 2, resume="auto"))
    resumed.run()
    _assert_same_state(tmp_path / "whole" / "checkpoint.pt", tmp_path / "broken" / "checkpoint.pt")
    # rows 5 and 6 were cut back and written again: each step once, with the uninterrupted run's numbers
    assert _rows(tmp_path / "broken") == _rows(tmp_path / "whole")


def test_cli_run_stopped_by_max_minutes_resumes_exactly(tmp_path):
    """--max-minutes stops a run (and checkpoints it); `--resume auto` finishes it as if it never stopped."""
    args = ["--preset", "tiny", "--no-progress", "--threads", "1", "--device", "cpu", "--stages", "2",
            "--image-size", "16", "--widths", "4,4,4", "--embedding-channels", "4", "--steps", "5", "--log-every", "1"]
    assert main(["train", *args, "--out", str(tmp_path / "whole")]) == 0
    assert main(["train", *args, "--out", str(tmp_path / "cut"), "--max-minutes", "1e-9"]) == 0
    stopped = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert stopped["step"] == 1 and stopped["extra"]["val_nme"]  # stopped after its first step
    assert main(["train", "--out", str(tmp_path / "cut"), "--resume", "auto", "--max-minutes", "60"]) == 0
    _assert_same_state(tmp_path / "whole" / "checkpoint.pt", tmp_path / "cut" / "checkpoint.pt")
    cut, whole = _rows(tmp_path / "cut"), _rows(tmp_path / "whole")
    assert [r["step"] for r in cut] == ["1", "2", "3", "4", "5"]  # the stop's own row stands for step 1
    for key in ("loss", "train_nme", "lr", "data"):
        assert [r[key] for r in cut] == [r[key] for r in whole], key
    assert cut[0]["val_nme_wflw98"] != "" and whole[0]["val_nme_wflw98"] == ""  # the stop validated


def test_resume_keeps_the_settings_of_the_checkpoint(tmp_path):
    """`--resume auto` alone takes every setting from the checkpoint (the run's preset and size)."""
    out = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--no-progress", "--threads", "1", "--image-size", "16",
                 "--widths", "4,4,4", "--steps", "2", "--out", str(out)]) == 0
    state = load_checkpoint(out / "checkpoint.pt")
    saved = TrainConfig.from_dict(state["training"]["config"])
    assert (saved.preset, saved.image_size, saved.widths, saved.steps) == ("tiny", 16, (4, 4, 4), 2)
    assert main(["train", "--out", str(out), "--resume", "auto", "--steps", "3"]) == 0
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["step"] == 3 and state["config"]["image_size"] == 16
    assert TrainConfig.from_dict(state["training"]["config"]).steps == 3


@pytest.mark.slow  # ~20-40 s: a training process is started, killed with SIGKILL mid-run, then resumed
def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path):
    args = ["train", "--preset", "tiny", "--no-progress", "--threads", "1", "--device", "cpu", "--stages", "2",
            "--image-size", "16", "--widths", "4,4,4", "--embedding-channels", "4", "--steps", "60",
            "--log-every", "1", "--save-every", "5"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "decafa_fast.app.cli", *args, "--out", str(cut)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            if (cut / "checkpoint.pt").exists() and len(_rows(cut)) > load_checkpoint(cut / "checkpoint.pt")["step"]:
                proc.send_signal(signal.SIGKILL)  # rows were logged after the checkpoint: kill now
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None and time.monotonic() >= deadline:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before the kill: {proc.stderr.read()[-2000:]!r}"
    killed_at = load_checkpoint(cut / "checkpoint.pt")["step"]
    assert 0 < killed_at < 60
    assert main([*args, "--out", str(cut), "--resume", "auto"]) == 0
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    _assert_same_state(tmp_path / "whole" / "checkpoint.pt", cut / "checkpoint.pt")
    rows, whole = _rows(cut), _rows(tmp_path / "whole")
    assert [r["step"] for r in rows] == [str(s) for s in range(1, 61)]  # no row twice, none missing
    assert [r["loss"] for r in rows] == [r["loss"] for r in whole]


def test_resume_says_when_the_training_data_changed(tmp_path, capsys):
    """The checkpoint keeps a fingerprint of the training sets: resuming on other data (another synthetic
    generator, other files) says that the run will not continue as the original would have."""
    out = tmp_path / "run"
    Trainer(_config(out, steps=3, save_every=1)).run()
    state = load_checkpoint(out / "checkpoint.pt")
    assert len(state["training"]["data"]) == 16
    Trainer(_config(out, steps=4, save_every=1, resume="auto")).run()
    assert "training data differ" not in capsys.readouterr().out
    state = load_checkpoint(out / "checkpoint.pt")
    state["training"]["data"] = "0" * 16
    state[CHECKSUM] = content_checksum(state)  # an edited checkpoint with a matching checksum
    torch.save(state, out / "checkpoint.pt")
    Trainer(_config(out, steps=5, resume="auto")).run()
    printed = capsys.readouterr().out
    assert f"note: the training data differ from those {out / 'checkpoint.pt'} was trained on" in printed
