"""`decafa-fast train` refuses bad settings and unusable checkpoints or folders with one clear line naming the
setting or the path (a UserError, which the CLI prints without a traceback), and leaves no `.tmp` behind."""
from __future__ import annotations

import argparse
import builtins
import errno
import io
import os
from pathlib import Path

import pytest
import torch

from decafa_fast.app.errors import UserError
from decafa_fast.app.files import WriteError, temporary_name, write_atomically
from decafa_fast.app.model import DeCaFA, DeCaFAConfig
from decafa_fast.app.model.checkpoint import save_checkpoint
from decafa_fast.app.training import train as train_cmd
from decafa_fast.app.training.config import ConfigError, TrainConfig

SMALL = ["--preset", "tiny", "--no-progress", "--threads", "1", "--device", "cpu", "--image-size", "16",
         "--widths", "4,4,4", "--embedding-channels", "4"]


def _train(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    train_cmd.add_arguments(parser)
    return train_cmd.run(parser.parse_args(argv))


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and message
    return message


# ---- settings -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("changes, message", [
    ({"image_size": "32"}, "image_size must be an integer, got '32'"),
    ({"steps": 0}, "steps must be >= 1, got 0"),
    ({"lr": -1.0}, "lr must be a positive number, got -1.0"),
    ({"lr": "fast"}, "lr must be a number, got 'fast'"),
    ({"flip": "yes"}, "flip must be true or false, got 'yes'"),
    ({"fusion": "F6"}, "fusion must be one of F1, F2, F3, F4, F5, got 'F6'"),
    ({"widths": "4,x,8"}, "widths must hold integers, got 'x'"),
    ({"widths": (4, 8)}, "widths must be three positive ints"),
    ({"data_weights": (1, 1)}, r"data_weights needs one weight per training set \(3\)"),
    ({"max_minutes": 0}, "max_minutes must be a positive number, got 0.0"),
    ({"nonsense": 1}, r"unknown training setting\(s\) \['nonsense'\]"),
])
def test_bad_settings_name_the_setting(changes, message):
    with pytest.raises(ConfigError, match=message) as error:
        TrainConfig.from_preset("tiny", **changes)
    _one_line(error)
    assert isinstance(error.value, UserError) and isinstance(error.value, ValueError)


def test_config_text_values_and_round_trip():
    config = TrainConfig.from_preset("tiny", widths="4,8,8", markups="wflw98,celeba5", lambdas="0.5,1",
                                     stages=2, data_weights="3,1")
    assert config.widths == (4, 8, 8) and config.markups == ("wflw98", "celeba5")
    assert config.lambdas == (0.5, 1.0) and config.data_weights == (3, 1)
    assert TrainConfig.from_dict(config.to_dict()) == config
    assert TrainConfig() == TrainConfig.from_preset("cpu")  # the dataclass defaults are the cpu preset
    with pytest.raises(ValueError, match="image_size must be an integer, got '32'"):
        DeCaFAConfig(image_size="32")  # the model config checks its types too


def test_steps_zero_on_the_command_line(tmp_path):
    with pytest.raises(ConfigError, match="steps must be >= 1, got 0") as error:
        _train([*SMALL, "--steps", "0", "--out", str(tmp_path / "run")])
    _one_line(error)
    assert not (tmp_path / "run").exists()  # refused before anything was written


# ---- checkpoints --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    assert _train([*SMALL, "--steps", "2", "--out", str(out)]) == 0
    return out


def test_resuming_a_finished_run_says_so(finished_run):
    with pytest.raises(UserError, match="is a finished run: it reached step 2.*--steps larger than 2") as error:
        _train(["--out", str(finished_run), "--resume", "auto"])
    assert str(finished_run / "checkpoint.pt") in _one_line(error)


def test_checkpoint_of_another_configuration_names_file_and_setting(finished_run, tmp_path):
    ckpt = str(finished_run / "checkpoint.pt")
    with pytest.raises(UserError, match="another configuration.*trained with stages=1, this run asks for stages=2"
                       ) as error:
        _train(["--resume", ckpt, "--stages", "2", "--steps", "5", "--out", str(tmp_path / "new")])
    assert ckpt in _one_line(error)
    # the API compares every setting that decides the weights, not only the ones given as flags
    config = TrainConfig.from_preset("tiny", image_size=16, widths=(4, 4, 4), embedding_channels=4, steps=5,
                                     lr=1e-3, resume=ckpt, out=str(tmp_path / "api"), progress=False)
    with pytest.raises(UserError, match=r"lr=0.0005, this run asks for lr=0.001"):
        train_cmd.train(config)


def test_checkpoint_without_training_state_or_missing(tmp_path):
    model_only = tmp_path / "model_only.pt"
    config = DeCaFAConfig(stages=1, widths=(4, 4, 4), embedding_channels=4, image_size=16)
    save_checkpoint(model_only, DeCaFA(config), config)
    with pytest.raises(UserError, match="model_only.pt.*no training state.*not resumed"):
        _train([*SMALL, "--resume", str(model_only), "--out", str(tmp_path / "run")])
    with pytest.raises(UserError, match="missing.pt.*does not exist"):
        _train([*SMALL, "--resume", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "run")])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(os.urandom(200))
    with pytest.raises(UserError, match="garbage.pt.*not a readable decafa-fast checkpoint"):
        _train([*SMALL, "--resume", str(garbage), "--out", str(tmp_path / "run")])


# ---- output folder and disk ---------------------------------------------------------------------------
def test_output_folder_that_cannot_be_created(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(UserError, match=f"cannot create the output folder '{blocker / 'run'}'") as error:
        _train([*SMALL, "--steps", "1", "--out", str(blocker / "run")])
    _one_line(error)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; the full-disk test covers "
                                                "the same write path")
def test_read_only_output_folder(tmp_path):
    out = tmp_path / "ro"
    out.mkdir()
    out.chmod(0o555)
    try:
        with pytest.raises(UserError, match=f"'{out / 'metrics.csv'}'.*Permission denied"):
            _train([*SMALL, "--steps", "1", "--out", str(out)])
    finally:
        out.chmod(0o755)
    assert not list(out.glob("*.tmp"))


def _full_disk_for(monkeypatch, target: Path) -> None:
    """Every write to a file opened for writing beside `target` under a name that starts with `.<target's
    name>` (its temporary files) fails with ENOSPC, as on a full disk."""
    real_open = builtins.open

    class FullFile(io.RawIOBase):
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def fileno(self):
            return self.f.fileno()

        def close(self):
            self.f.close()
            super().close()

    def fake_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if any(c in mode for c in "wax") and Path(file).parent == target.parent \
                and Path(file).name.startswith(f".{target.name}."):
            return FullFile(f)
        return f

    monkeypatch.setattr(builtins, "open", fake_open)


def test_full_disk_names_the_checkpoint_and_leaves_no_tmp(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    _full_disk_for(monkeypatch, out / "checkpoint.pt")
    with pytest.raises(WriteError, match=f"cannot write checkpoint '{out / 'checkpoint.pt'}': No space "
                                         "left on device; free some space") as error:
        _train([*SMALL, "--steps", "1", "--out", str(out)])
    _one_line(error)
    assert not (out / "checkpoint.pt").exists() and not list(out.glob("*.tmp"))


def test_atomic_write_keeps_the_previous_file_when_a_write_fails(tmp_path, monkeypatch):
    target = tmp_path / "checkpoint.pt"
    write_atomically(target, b"previous")
    _full_disk_for(monkeypatch, target)
    with pytest.raises(WriteError) as error:
        write_atomically(target, torch.zeros(1000).numpy().tobytes())
    assert error.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"previous" and sorted(tmp_path.iterdir()) == [target]


def test_atomic_write_leaves_a_users_tmp_file_and_other_writers_alone(tmp_path):
    """The temporary file is this call's own: a user's `<name>.tmp` (or another writer's temporary file)
    beside the target is neither overwritten nor removed, on success or on failure."""
    target = tmp_path / "checkpoint.pt"
    users = tmp_path / "checkpoint.pt.tmp"
    users.write_bytes(b"the user's own file")
    write_atomically(target, b"new")
    assert target.read_bytes() == b"new" and users.read_bytes() == b"the user's own file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "checkpoint.pt.tmp"]
    names = {temporary_name(target) for _ in range(100)}
    assert len(names) == 100 and all(n.parent == tmp_path and n.name.startswith(".checkpoint.pt.") for n in names)


def test_cli_prints_one_line_and_exits_with_status_2(finished_run, tmp_path, capsys):
    from decafa_fast.app.cli import main

    ckpt = finished_run / "checkpoint.pt"
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    cases = [
        ([*SMALL, "--steps", "0", "--out", str(tmp_path / "a")], "steps must be >= 1, got 0"),
        ([*SMALL, "--image-size", "x"], "--image-size: invalid int value: 'x'"),
        (["--out", str(finished_run), "--resume", "auto"], f"'{ckpt}' is a finished run"),
        (["--resume", str(ckpt), "--stages", "2", "--steps", "5", "--out", str(tmp_path / "b")],
         f"'{ckpt}' is a checkpoint of another configuration: it was trained with stages=1, this run asks for "
         "stages=2"),
        ([*SMALL, "--out", str(blocker / "run")], f"cannot create the output folder '{blocker / 'run'}'"),
    ]
    for argv, expected in cases:
        assert main(["train", *argv]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and err.startswith("decafa-fast train: error: ") and expected in err, err


def test_checkpoint_with_a_bad_config_value_names_file_and_setting(finished_run, tmp_path):
    """A checkpoint whose stored config says image_size "32" (a string) is refused with the file and setting,
    for resuming (training config) and for loading the model (model config) alike."""
    from decafa_fast.app.model.checkpoint import CHECKSUM, content_checksum, load_checkpoint, load_model

    state = load_checkpoint(finished_run / "checkpoint.pt")
    state["training"]["config"]["image_size"] = "32"
    state["config"]["image_size"] = "32"
    edited = tmp_path / "edited.pt"
    torch.save(state, edited)  # the stored checksum no longer matches: refused as corrupt
    with pytest.raises(UserError, match="edited.pt' is corrupt: its content does not match the checksum"):
        _train(["--resume", str(edited), "--steps", "5", "--out", str(tmp_path / "run")])
    state[CHECKSUM] = content_checksum(state)  # an edit with a matching checksum: its settings are still checked
    torch.save(state, edited)
    with pytest.raises(UserError, match="edited.pt' holds an invalid training config: image_size must be an "
                                        "integer, got '32'"):
        _train(["--resume", str(edited), "--steps", "5", "--out", str(tmp_path / "run")])
    with pytest.raises(ValueError, match="edited.pt' holds an invalid model config: image_size must be an "
                                         "integer, got '32'"):
        load_model(edited)


# ---- a run folder is never replaced unasked; Ctrl-C says what is kept -----------------------------------
def test_a_run_folder_is_not_replaced_without_overwrite(finished_run, tmp_path, capsys):
    """`train --out DIR` over a run is refused (naming --resume auto and --overwrite) and changes nothing;
    with --overwrite it starts over."""
    import shutil

    from decafa_fast.app.cli import main

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert main(["train", *SMALL, "--steps", "3", "--seed", "1", "--out", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"decafa-fast train: error: --out '{run}' already holds a run ('{run / 'checkpoint.pt'}'); "
                   "continue it with --resume auto, start it over with --overwrite (its checkpoint, metrics.csv and "
                   "summary.json are replaced), or choose another --out")
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    # resuming another checkpoint into it would replace it as well
    assert main(["train", "--resume", str(finished_run / "checkpoint.pt"), "--steps", "3", "--out", str(run)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", *SMALL, "--steps", "3", "--seed", "1", "--out", str(run), "--overwrite"]) == 0
    from decafa_fast.app.model.checkpoint import load_checkpoint

    assert load_checkpoint(run / "checkpoint.pt")["step"] == 3
    assert (run / "checkpoint.pt").read_bytes() != before["checkpoint.pt"]


def test_out_naming_a_file_says_so(tmp_path, capsys):
    from decafa_fast.app.cli import main

    blocker = tmp_path / "notes.txt"
    blocker.write_text("x")
    assert main(["train", *SMALL, "--steps", "1", "--out", str(blocker)]) == 2
    assert capsys.readouterr().err.strip() == (f"decafa-fast train: error: --out '{blocker}' is a file, not a folder; "
                                               "choose a folder (it is made if missing)")


@pytest.mark.parametrize("save_every", [1, 0], ids=["with-checkpoint", "before-any-checkpoint"])
def test_ctrl_c_ends_train_with_one_line_saying_what_is_kept(tmp_path, capsys, monkeypatch, save_every):
    """Ctrl-C (a KeyboardInterrupt at the third step) ends `train` with exit status 130 and one line naming the
    checkpoint kept and how to continue; no traceback."""
    from decafa_fast.app.cli import main
    from decafa_fast.app.training.trainer import Trainer

    real_step = Trainer.step
    calls = []

    def step(self):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(Trainer, "step", step)
    out = tmp_path / "run"
    code = main(["train", *SMALL, "--steps", "5", "--save-every", str(save_every), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 130 and "Traceback" not in err
    if save_every:
        assert err.strip() == (f"decafa-fast train: interrupted: stopped at step 2 of 5; kept {out / 'checkpoint.pt'} "
                               f"(step 2) and {out / 'metrics.csv'}; continue with --resume auto --out {out}")
        monkeypatch.setattr(Trainer, "step", real_step)
        assert main(["train", "--resume", "auto", "--out", str(out)]) == 0  # the line's advice works
    else:
        assert err.strip() == ("decafa-fast train: interrupted: stopped at step 2 of 5; no checkpoint was written "
                               "yet; --save-every N saves one every N steps")
        assert not (out / "checkpoint.pt").exists()


@pytest.mark.slow
def test_sigint_ends_train_with_one_line_and_status_130(tmp_path):
    """A real SIGINT (Ctrl-C in a terminal) during `decafa-fast train`, once a checkpoint exists."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-m", "decafa_fast.app.cli", "train", *SMALL, "--steps", "100000",
                             "--save-every", "1", "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 240
        while not (out / "checkpoint.pt").exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert lines[0].startswith("decafa-fast train: interrupted: stopped at step ")
    assert f"kept {out / 'checkpoint.pt'} (step " in lines[0] and "continue with --resume auto" in lines[0]


def test_ablate_does_not_replace_the_runs_of_its_rows_without_overwrite(tmp_path):
    import argparse as _argparse

    from decafa_fast.app.training import ablate

    parser = _argparse.ArgumentParser()
    ablate.add_arguments(parser)
    (tmp_path / "row2").mkdir()
    (tmp_path / "row2" / "checkpoint.pt").write_bytes(b"a run")
    with pytest.raises(UserError, match=f"--out '{tmp_path}' already holds runs of these rows "
                                        f"\\({tmp_path / 'row2'}\\); replace them with --overwrite") as error:
        ablate.run(parser.parse_args(["--rows", "1,2", "--out", str(tmp_path)]))
    _one_line(error)
    assert not (tmp_path / "row1").exists() and (tmp_path / "row2" / "checkpoint.pt").read_bytes() == b"a run"
    assert ablate.row_config(parser.parse_args(["--out", str(tmp_path), "--overwrite"]), 1).overwrite
