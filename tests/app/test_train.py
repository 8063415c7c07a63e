"""Checkpoints, `decafa-fast train` end to end (resume included), and DDP with gloo on 2 CPU processes."""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from decafa_fast.app.cli import main
from decafa_fast.app.errors import UserError
from decafa_fast.app.model import DeCaFA, DeCaFAConfig
from decafa_fast.app.model.checkpoint import load_checkpoint, load_model, save_checkpoint
from decafa_fast.app.training import ablate

ROOT = Path(__file__).resolve().parents[2]
TINY_ARGS = ["--preset", "tiny", "--no-progress", "--threads", "1"]


def _tiny_model():
    config = DeCaFAConfig(stages=2, widths=(4, 4, 4), embedding_channels=4, image_size=16, lambdas=[0.3, 1.0])
    torch.manual_seed(0)
    return DeCaFA(config), config


def test_checkpoint_roundtrip(tmp_path):
    model, config = _tiny_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    model(torch.rand(2, 1, 16, 16))[-1][0].sum().backward()
    opt.step()
    sched.step()
    path = save_checkpoint(tmp_path / "c.pt", model, config, opt, sched, step=7, extra={"note": "x", "nme": 0.1})
    state = load_checkpoint(path)
    assert state["step"] == 7 and state["extra"] == {"note": "x", "nme": 0.1}
    assert state["config"] == config.to_dict() and state["scheduler"]["last_epoch"] == 1
    loaded, cfg = load_model(path)
    assert cfg == config and not loaded.training
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    opt2 = torch.optim.Adam(loaded.parameters(), lr=1e-3)
    opt2.load_state_dict(state["optimizer"])
    assert opt2.state_dict()["state"][0]["step"] == 1


def test_truncated_foreign_and_missing_checkpoints(tmp_path):
    model, config = _tiny_model()
    good = save_checkpoint(tmp_path / "good.pt", model, config)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated.pt"):
        load_checkpoint(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, foreign)
    with pytest.raises(ValueError, match="foreign.pt.*not a decafa-fast checkpoint"):
        load_model(foreign)
    text = tmp_path / "text.pt"
    text.write_text("hello")
    with pytest.raises(ValueError, match="text.pt"):
        load_checkpoint(text)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_train_cli_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", *TINY_ARGS, "--out", str(out), "--steps", "3", "--log-every", "1"]) == 0
    printed = capsys.readouterr().out
    for expected in ("preset tiny", "val NME wflw98", "mean-shape NME", "model / mean shape"):
        assert expected in printed
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["step"] == 3 and state["optimizer"] is not None
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == ["1", "2", "3"]
    assert [r["data"] for r in rows] == ["synthetic-wflw98", "synthetic-300w68", "synthetic-celeba5"]  # alternating
    assert rows[-1]["val_nme_wflw98"] != "" and float(rows[0]["loss"]) > 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["mean_shape_nme"]["wflw98"] > 0
    model, cfg = load_model(out / "checkpoint.pt")
    assert cfg.stages == 1 and cfg.image_size == 32
    # resume continues from step 3 to 5 with the stored config; metrics.csv keeps one row per step
    assert main(["train", *TINY_ARGS, "--out", str(out), "--steps", "5", "--resume", "auto", "--log-every", "1"]) == 0
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["step"] == 5 and state["config"]["stages"] == 1
    with open(out / "metrics.csv", newline="") as f:
        assert [r["step"] for r in csv.DictReader(f)] == ["1", "2", "3", "4", "5"]


@pytest.mark.slow  # ~30 s: two torchrun processes start, import torch and train
def test_ddp_gloo_two_processes_end_with_equal_weights(tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "decafa_fast.app.cli", "train", *TINY_ARGS, "--device", "cpu", "--steps", "3", "--batch-size", "2",
           "--out", str(out), "--save-rank-weights"]
    result = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "x 2 process(es)" in result.stdout
    w0, w1 = torch.load(out / "rank0.pt", weights_only=True), torch.load(out / "rank1.pt", weights_only=True)
    initial = DeCaFA(DeCaFAConfig.from_dict(load_checkpoint(out / "checkpoint.pt")["config"])).state_dict()
    changed = False
    for name in w0:
        assert torch.equal(w0[name], w1[name]), f"ranks differ in {name}"
        changed |= not torch.equal(w0[name].float(), initial[name].float())
    assert changed  # training did update the weights
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 3


@pytest.mark.slow  # ~90 s: three torchrun launches of two processes
def test_ddp_run_stopped_and_resumed_equals_uninterrupted(tmp_path):
    """Every rank's RNG state is in the checkpoint: a 2-process run stopped by --max-minutes and resumed ends
    with the weights of one that never stopped, on every rank."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "-m", "decafa_fast.app.cli", "train"]
    args = [*TINY_ARGS, "--device", "cpu", "--steps", "4", "--batch-size", "2", "--save-rank-weights"]
    for extra in (["--out", str(tmp_path / "whole")], ["--out", str(tmp_path / "cut"), "--max-minutes", "1e-9"],
                  ["--out", str(tmp_path / "cut"), "--resume", "auto", "--max-minutes", "60"]):
        result = subprocess.run(launch + args + extra, env=env, cwd=tmp_path, capture_output=True, text=True,
                                timeout=240)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resuming at step 1" in result.stdout
    for rank in (0, 1):
        whole = torch.load(tmp_path / "whole" / f"rank{rank}.pt", weights_only=True)
        cut = torch.load(tmp_path / "cut" / f"rank{rank}.pt", weights_only=True)
        for name in whole:
            assert torch.equal(whole[name], cut[name]), f"rank {rank}: {name} differs"


def test_ablate_cli_tiny(tmp_path, capsys):
    out = tmp_path / "ablate"
    assert main(["ablate", "--rows", "2,10", "--steps", "2", "--train-size", "6", "--val-size", "3",
                 "--image-size", "16", "--widths", "4,4,4", "--embedding-channels", "4", "--batch-size", "2",
                 "--threads", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| 2 | F2 | chained | up |" in printed and "| 10 | F5 | chained | up |" in printed
    results = json.loads((out / "ablation.json").read_text())
    assert [r["row"] for r in results] == [2, 10] and all(0 < r["avg_nme"] < 5 for r in results)
    for rows in ("11", "x"):
        with pytest.raises(UserError, match="--rows"):
            ablate.run(_ablate_args(["--rows", rows]))


def _ablate_args(argv):
    parser = argparse.ArgumentParser()
    ablate.add_arguments(parser)
    return parser.parse_args(argv)


def test_ablate_builds_configs_directly(tmp_path):
    """Each Table 1 row is a TrainConfig with the row's fusion / transfer / lambdas and the flags' size."""
    args = _ablate_args(["--stages", "3", "--widths", "4,8,8", "--steps", "7", "--out", str(tmp_path)])
    config = ablate.row_config(args, 4)
    assert (config.fusion, config.transfer, config.lambdas) == ("F5", "independent", "decreasing")
    assert (config.stages, config.widths, config.steps, config.progress) == (3, (4, 8, 8), 7, False)
    assert config.out == str(tmp_path / "row5")
    with pytest.raises(UserError, match="widths"):
        ablate.row_config(_ablate_args(["--widths", "4,x,8"]), 0)


def test_alternation_cycle_and_presets():
    from decafa_fast.app.training.train import PRESETS, interleave

    assert interleave((1, 1, 1)) == [0, 1, 2]
    assert interleave((2, 1, 1)) == [0, 1, 2, 0]  # the finest markup gets half of the batches
    assert [interleave((3, 1)).count(k) for k in (0, 1)] == [3, 1]
    # the paper preset keeps the paper's optimiser and temperature
    assert PRESETS["paper"]["lr"] == 5e-4 and PRESETS["paper"]["beta"] == 1.0 and PRESETS["paper"]["stages"] == 4
