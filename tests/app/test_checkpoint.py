"""Checkpoints carry the sha256 of their content and are verified on load: a flipped byte in a tensor record
or in data.pkl is refused with one line naming the file; files that are not checkpoints (a folder, an image,
a text file, a pickled object) are refused with one line saying what they are; checkpoints written before the
checksum load with a warning."""
from __future__ import annotations

import random
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

from decafa_fast.app import cli
from decafa_fast.app.model import DeCaFA, DeCaFAConfig
from decafa_fast.app.model.checkpoint import (
    CHECKSUM,
    UnverifiedCheckpointWarning,
    content_checksum,
    load_checkpoint,
    load_model,
    save_checkpoint,
)

CONFIG = DeCaFAConfig(stages=1, image_size=16, embedding_channels=4, widths=(4, 4, 4))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = DeCaFA(CONFIG)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.rand(2, 1, 16, 16))[-1][0].sum().backward()
    optimizer.step()  # an optimizer state with int keys and tensors
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    return save_checkpoint(path, model, CONFIG, optimizer, step=1, extra={"nme": [0.5, float("nan")]})


def _members(path: Path) -> dict[str, tuple[int, int]]:
    """zip member name -> (offset of its data in the file, size); torch stores members uncompressed."""
    out = {}
    with zipfile.ZipFile(path) as z:
        raw = path.read_bytes()
        for info in z.infolist():
            assert info.compress_type == zipfile.ZIP_STORED
            start = info.header_offset
            name_len = int.from_bytes(raw[start + 26:start + 28], "little")
            extra_len = int.from_bytes(raw[start + 28:start + 30], "little")
            out[info.filename] = (start + 30 + name_len + extra_len, info.file_size)
    return out


def _flipped(source: Path, target: Path, offset: int) -> Path:
    data = bytearray(source.read_bytes())
    data[offset] ^= 0x10
    target.write_bytes(bytes(data))
    return target


def test_checksum_survives_save_and_load_and_covers_everything(saved):
    state = load_checkpoint(saved)
    assert state["version"] == 3 and state[CHECKSUM] == content_checksum(state)
    assert state[CHECKSUM].startswith("sha256:") and len(state[CHECKSUM]) == 7 + 64
    changed = dict(state, model={**state["model"]})
    name = next(iter(changed["model"]))
    changed["model"][name] = changed["model"][name].clone()
    changed["model"][name].view(-1)[0] += 1e-6
    assert content_checksum(changed) != state[CHECKSUM]
    assert content_checksum(dict(state, step=2)) != state[CHECKSUM]
    assert content_checksum(dict(state, step=1.0)) != state[CHECKSUM]  # types count, not only values
    assert content_checksum(dict(state, extra={"nme": (0.5, float("nan"))})) != state[CHECKSUM]


def test_a_flipped_byte_in_any_tensor_record_is_refused(saved, tmp_path):
    records = {n: span for n, span in _members(saved).items() if "/data/" in n and span[1] > 0}
    assert len(records) > 10
    for name, (offset, size) in records.items():
        bad = _flipped(saved, tmp_path / "bad.pt", offset + size // 2)
        with pytest.raises(ValueError, match="bad.pt' is corrupt: its content does not match the checksum") as err:
            load_checkpoint(bad)
        assert "\n" not in str(err.value), name


def test_a_flipped_byte_in_data_pkl_is_refused_or_changes_nothing(saved, tmp_path):
    """Every flip inside data.pkl (a sample of positions) either makes the file refused with a line naming it, or
    leaves the loaded content exactly as saved (a byte torch ignores, such as the storage's device name)."""
    offset, size = next(span for n, span in _members(saved).items() if n.endswith("data.pkl"))
    original = load_checkpoint(saved)[CHECKSUM]
    positions = sorted(random.Random(0).sample(range(size), min(size, 150)))
    refused = 0
    for position in positions:
        bad = _flipped(saved, tmp_path / "bad.pt", offset + position)
        try:
            state = load_checkpoint(bad)
        except ValueError as error:
            assert "bad.pt" in str(error) and "\n" not in str(error), position
            refused += 1
            continue
        assert content_checksum(state) == original and state[CHECKSUM] == original, position
    assert refused > len(positions) // 2


def test_cli_refuses_a_corrupt_checkpoint_in_one_line(saved, tmp_path, capsys):
    offset, size = _members(saved)[next(n for n in _members(saved) if n.endswith("/data/0"))]
    bad = _flipped(saved, tmp_path / "flipped.pt", offset + size // 2)
    assert cli.main(["evaluate", "--data", "synthetic:2", "--checkpoint", str(bad), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"decafa-fast evaluate: error: '{bad}' is corrupt: its content does not match the checksum "
                   "stored in it (the file changed after it was written); use another copy or train again")


def test_old_checkpoints_load_with_a_warning_and_a_stripped_checksum_is_refused(saved, tmp_path, capsys):
    state = load_checkpoint(saved)
    old = {k: v for k, v in state.items() if k != CHECKSUM}
    torch.save(dict(old, version=2), tmp_path / "v2.pt")
    with pytest.warns(UnverifiedCheckpointWarning, match="v2.pt' has no checksum .*version 2"):
        model, _ = load_model(tmp_path / "v2.pt")
    assert torch.equal(model.state_dict()[next(iter(state["model"]))], next(iter(state["model"].values())))
    # on the command line the warning is one line and the command goes on
    assert cli.main(["evaluate", "--data", "synthetic:2", "--checkpoint", str(tmp_path / "v2.pt"),
                     "--no-progress"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [f"decafa-fast evaluate: warning: '{tmp_path / 'v2.pt'}' has no checksum (checkpoint version 2, "
                   "written before checkpoints carried one): its content cannot be verified"]
    torch.save(old, tmp_path / "v3.pt")
    with pytest.raises(ValueError, match="v3.pt' is damaged or was edited: checkpoint version 3 carries a checksum"):
        load_checkpoint(tmp_path / "v3.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a current checkpoint loads without any warning
        load_checkpoint(saved)


def test_not_a_checkpoint_says_what_the_file_is(saved, tmp_path):
    import cv2
    import numpy as np

    cv2.imwrite(str(tmp_path / "face.png"), np.zeros((8, 8), np.uint8))
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")  # a whole pickled module: needs code to load
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(saved.read_bytes())
    cases = {
        tmp_path / "face.png": "face.png' is not a readable decafa-fast checkpoint: it is a PNG image",
        tmp_path / "notes.txt": "notes.txt' is not a readable decafa-fast checkpoint: it is a text file",
        tmp_path / "empty.pt": "empty.pt' is not a readable decafa-fast checkpoint: it is an empty file",
        tmp_path / "module.pt": "module.pt' is a torch file holding python objects other than tensors",
        run: f"checkpoint '{run}' is a folder, not a checkpoint file; did you mean '{run / 'checkpoint.pt'}'?",
        tmp_path: "is a folder, not a checkpoint file; name the checkpoint file itself",
    }
    for path, expected in cases.items():
        with pytest.raises(ValueError) as error:
            load_checkpoint(path)
        message = str(error.value)
        assert expected in message and "\n" not in message and "weights_only" not in message, message
