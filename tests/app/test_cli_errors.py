"""Every user error of the CLI is one line on stderr naming the file (and line) or the flag, exit status 2,
and no traceback; --debug (or DECAFA_DEBUG=1) shows the traceback instead."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

from decafa_fast.app import cli
from decafa_fast.app.data import SyntheticFaces, w300, wflw
from decafa_fast.app.model import DeCaFA, DeCaFAConfig
from decafa_fast.app.model.checkpoint import save_checkpoint

SIZE = 32


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Good and bad inputs, written once: name -> path."""
    root = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    config = DeCaFAConfig(stages=1, image_size=SIZE, embedding_channels=8, widths=(8, 8, 8))
    good = save_checkpoint(root / "good.pt", DeCaFA(config).eval(), config)
    data = good.read_bytes()
    f = {"good.pt": good}
    (root / "empty.pt").write_bytes(b"")
    (root / "truncated.pt").write_bytes(data[: len(data) // 2])
    (root / "random.pt").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    torch.save({"format": "something-else", "weights": torch.zeros(3)}, root / "foreign.pt")
    for name in ("empty.pt", "truncated.pt", "random.pt", "foreign.pt"):
        f[name] = root / name
    f["missing.pt"] = root / "missing.pt"

    face = SyntheticFaces(1, size=64, seed=3, markups=("300w68",))[0]
    gray = (face["image"][0].numpy() * 255).round().astype(np.uint8)
    points = face["landmarks"]["300w68"].double().numpy()

    def folder(name: str, annotation: str, text: str | bytes) -> None:
        d = root / name
        d.mkdir()
        cv2.imwrite(str(d / "face.png"), gray)
        target = d / annotation
        target.write_bytes(text) if isinstance(text, bytes) else target.write_text(text)
        f[name] = d

    good_pts = (root / "tmp.pts")
    w300.write_pts(good_pts, points + 1)
    lines = good_pts.read_text().splitlines()
    folder("pts_word", "face.pts", "\n".join(lines[:5] + ["12.5 x"] + lines[6:]) + "\n")
    folder("pts_short", "face.pts", "\n".join(lines[:20]) + "\n")
    folder("pts_huge", "face.pts", "\n".join(lines[:5] + ["1e30 12"] + lines[6:]) + "\n")
    folder("pts_nan", "face.pts", "\n".join(lines[:5] + ["nan 12"] + lines[6:]) + "\n")
    folder("pts_binary", "face.pts", bytes(range(256)) * 4)
    folder("pts_far", "face.pts", "\n".join(lines[:5] + ["20 900"] + lines[6:]) + "\n")  # 14 sides below
    folder("json_syntax", "face.json", "[[1, 2],\n [3, 4,]\n")
    folder("json_shape", "face.json", "[1, 2, 3]")
    folder("json_markup", "face.json", '{"landmarks": [[1, 2], [3, 4], [5, 6], [7, 8], [9, 10]], "markup": "300w68"}')
    folder("json_binary", "face.json", b"\xff\xfe\x00garbage")
    folder("json_count", "face.json", "[[1, 2], [3, 4], [5, 6]]")

    wroot = root / "wflw"
    (wroot / "WFLW_images").mkdir(parents=True)
    cv2.imwrite(str(wroot / "WFLW_images" / "a.jpg"), gray)
    line = wflw.format_wflw_line(np.full((98, 2), 20.0), [0, 0, 63, 63], (), "a.jpg")
    bad_flag = line.replace(" 0 0 0 0 0 0 ", " 0 0 2 0 0 0 ")  # the attribute flags must be 0 or 1
    (wroot / "list_98pt_rect_attr_test.txt").write_text(line + "\n" + bad_flag + "\n")
    f["wflw_flags"] = wroot
    croot = root / "celeba"
    (croot / "img_align_celeba").mkdir(parents=True)
    cv2.imwrite(str(croot / "img_align_celeba" / "000001.jpg"), gray)
    (croot / "list_landmarks_align_celeba.txt").write_text("1\nlefteye_x lefteye_y righteye_x righteye_y nose_x "
                                                           "nose_y leftmouth_x leftmouth_y rightmouth_x rightmouth_y\n"
                                                           "000001.jpg 1 2 3 4 5 6 7 8 9\n")
    (croot / "list_eval_partition.txt").write_text("000001.jpg 2\n")
    f["celeba_short"] = croot

    cv2.imwrite(str(root / "photo.png"), gray)
    f["photo.png"] = root / "photo.png"
    (root / "boxes.json").write_text('{"photo.png": [[10, 10, 5, 5]]}')
    f["boxes.json"] = root / "boxes.json"
    (root / "notes.txt").write_text("not an image")
    f["notes.txt"] = root / "notes.txt"
    (root / "config.json").write_text("{}")
    return f


CHECKPOINTS = ["missing.pt", "empty.pt", "truncated.pt", "random.pt", "foreign.pt"]
FOLDERS = {  # folder -> what the message must contain besides the file name
    "pts_word": "face.pts:6", "pts_short": "face.pts:20", "pts_huge": "face.pts:6", "pts_nan": "face.pts:6",
    "pts_binary": "face.pts:1", "json_syntax": "face.json:2", "json_shape": "face.json", "json_markup": "face.json",
    "json_binary": "face.json", "json_count": "face.json",
}


def ref(name: str) -> str:
    """A placeholder for the fixture file `name` in an argv of the table."""
    return "{" + name + "}"


def cases() -> list[tuple[str, list[str], str]]:
    """(id, argv with {name} placeholders for fixture files, text the one line must contain)."""
    table = []
    for name in CHECKPOINTS:
        table.append((f"evaluate-{name}", ["evaluate", "--data", "synthetic:2", "--checkpoint", ref(name)], name))
        table.append((f"predict-{name}", ["predict", "{photo.png}", "--checkpoint", ref(name)], name))
        table.append((f"export-{name}", ["export", "--checkpoint", ref(name), "--out", "{tmp}/x.onnx"], name))
    for name, where in FOLDERS.items():
        table.append((f"evaluate-{name}", ["evaluate", "--data", "folder:" + ref(name), "--checkpoint", "{good.pt}"],
                      where))
    table += [
        ("evaluate-far-in-a-worker", ["evaluate", "--data", "folder:{pts_far}", "--checkpoint", "{good.pt}",
                                      "--workers", "1", "--no-progress"],
         "face.pts: landmark 2 at [19.0, 899.0] is far outside"),
        ("evaluate-wflw-flags", ["evaluate", "--data", "wflw:{wflw_flags}", "--checkpoint", "{good.pt}"],
         "list_98pt_rect_attr_test.txt:2"),
        ("evaluate-celeba-short", ["evaluate", "--data", "celeba:{celeba_short}", "--checkpoint", "{good.pt}"],
         "list_landmarks_align_celeba.txt:3"),
        ("evaluate-missing-300w", ["evaluate", "--data", "300w:{tmp}/nope", "--checkpoint", "{good.pt}"], "nope"),
        ("evaluate-bad-spec", ["evaluate", "--data", "imagenet:/x", "--checkpoint", "{good.pt}"], "KIND:PATH"),
        ("evaluate-bad-stage", ["evaluate", "--data", "synthetic:2", "--checkpoint", "{good.pt}", "--stage", "7"],
         "--stage"),
        ("evaluate-batch-0", ["evaluate", "--checkpoint", "{good.pt}", "--batch-size", "0"], "--batch-size"),
        ("evaluate-device", ["evaluate", "--checkpoint", "{good.pt}", "--device", "gpu7"], "gpu7"),
        ("evaluate-no-checkpoint", ["evaluate"], "--checkpoint"),
        ("evaluate-unknown-flag", ["evaluate", "--checkpoint", "{good.pt}", "--fast"], "--fast"),
        ("predict-missing-input", ["predict", "{tmp}/none.jpg", "--checkpoint", "{good.pt}"], "none.jpg"),
        ("predict-not-image", ["predict", "{notes.txt}", "--checkpoint", "{good.pt}"], "notes.txt"),
        ("predict-bad-boxes", ["predict", "{photo.png}", "--checkpoint", "{good.pt}", "--boxes", "{boxes.json}"],
         "boxes.json"),
        ("predict-boxes-not-json", ["predict", "{photo.png}", "--checkpoint", "{good.pt}", "--boxes", "{notes.txt}"],
         "notes.txt:1"),
        ("predict-smooth", ["predict", "{photo.png}", "--checkpoint", "{good.pt}", "--smooth", "3"], "--smooth"),
        ("predict-detector", ["predict", "{photo.png}", "--checkpoint", "{good.pt}", "--detector", "mtcnn"],
         "--detector"),
        ("predict-yunet-no-model", ["predict", "{photo.png}", "--checkpoint", "{good.pt}", "--detector", "yunet"],
         "--detector-model"),
        ("predict-markups", ["predict", "{photo.png}", "--checkpoint", "{good.pt}", "--markups", "abc"], "abc"),
        ("unknown-command", ["fly"], "fly"),
        ("evaluate-checkpoint-folder", ["evaluate", "--checkpoint", "{tmp}"], "is a folder, not a checkpoint file"),
        ("evaluate-checkpoint-png", ["evaluate", "--checkpoint", "{photo.png}"],
         "photo.png' is not a readable decafa-fast checkpoint: it is a PNG image"),
        ("predict-checkpoint-text", ["predict", "{photo.png}", "--checkpoint", "{notes.txt}"], "it is a text file"),
        ("evaluate-out-file", ["evaluate", "--checkpoint", "{good.pt}", "--out", "{notes.txt}"],
         "notes.txt' is a file, not a folder"),
        ("evaluate-json-folder", ["evaluate", "--checkpoint", "{good.pt}", "--json", "{tmp}"], "is a folder"),
        ("predict-out-file", ["predict", "{photo.png}", "--checkpoint", "{good.pt}", "--out", "{notes.txt}"],
         "--out '{notes.txt}' is a file, not a folder"),
        ("export-out-folder", ["export", "--checkpoint", "{good.pt}", "--out", "{tmp}"], "is a folder; name the ONNX"),
        ("train-out-file", ["train", "--preset", "tiny", "--out", "{notes.txt}"], "is a file, not a folder"),
        ("predict-detector-model-text", ["predict", "{photo.png}", "--checkpoint", "{good.pt}", "--detector-model",
                                         "{notes.txt}"], "notes.txt' is not a YuNet ONNX model"),
    ]
    return table


@pytest.mark.parametrize("case_id, argv, expected", cases(), ids=[c[0] for c in cases()])
def test_one_line_and_status_2(files, tmp_path, capsys, monkeypatch, case_id, argv, expected):
    monkeypatch.delenv("DECAFA_DEBUG", raising=False)
    names = {k: str(v) for k, v in files.items()} | {"tmp": str(tmp_path)}
    argv = [re.sub(r"\{([\w.]+)\}", lambda m: names[m.group(1)], a) for a in argv]
    code = cli.main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("decafa-fast") and ": error: " in lines[0]
    assert re.sub(r"\{([\w.]+)\}", lambda m: names[m.group(1)], expected) in lines[0], lines[0]
    assert "weights_only" not in err and "File exists" not in err


@pytest.mark.slow
def test_debug_shows_the_traceback(files):
    argv = [sys.executable, "-m", "decafa_fast.app.cli", "evaluate", "--data", "synthetic:2", "--checkpoint",
            str(files["random.pt"])]
    env = dict(os.environ)
    env.pop("DECAFA_DEBUG", None)
    plain = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert len(plain.stderr.strip().splitlines()) == 1 and "random.pt" in plain.stderr
    debug = subprocess.run(argv + ["--debug"], capture_output=True, text=True, env=env, timeout=300)
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    env["DECAFA_DEBUG"] = "1"
    assert "Traceback" in subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300).stderr


def test_unreadable_images_are_skipped_with_status_1(files, tmp_path, capsys):
    """Non-images named .jpg inside a folder are reported one line each and skipped; the rest is written."""
    photos = tmp_path / "photos"
    photos.mkdir()
    cv2.imwrite(str(photos / "ok.png"), cv2.imread(str(files["photo.png"])))
    (photos / "text.jpg").write_text("hello")
    (photos / "half.png").write_bytes(files["photo.png"].read_bytes()[:30])
    code = cli.main(["predict", str(photos), "--checkpoint", str(files["good.pt"]), "--out", str(tmp_path / "out"),
                     "--detector", "none"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert sum("skipped:" in line for line in err.splitlines()) == 2 and "text.jpg" in err and "half.png" in err
    assert (tmp_path / "out" / "ok_landmarks.png").is_file()


# ---- a full disk: every error names the file -----------------------------------------------------------
@pytest.fixture
def full_disk(tmp_path, monkeypatch):
    """Every write to a file under tmp_path/full fails with ENOSPC, as on a full disk (the error carries no file
    name, as a failed write() does not)."""
    import builtins
    import errno

    root = tmp_path / "full"
    root.mkdir()
    real_open = builtins.open

    class FullFile:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def __getattr__(self, name):
            return getattr(self.f, name)

    def fake_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if any(c in mode for c in "wax") and str(file).startswith(str(root)):
            return FullFile(f)
        return f

    monkeypatch.setattr(builtins, "open", fake_open)
    return root


@pytest.mark.parametrize("argv, target", [
    (["evaluate", "--data", "synthetic:2", "--checkpoint", "{good.pt}", "--no-progress", "--out", "{full}/eval"],
     "eval/ced.png"),
    (["evaluate", "--data", "synthetic:2", "--checkpoint", "{good.pt}", "--no-progress", "--json", "{full}/r.json",
      "--ced", "{tmp}/ced.png"], "r.json"),
    (["evaluate", "--data", "synthetic:2", "--checkpoint", "{good.pt}", "--no-progress", "--ced", "{full}/c.png"],
     "c.png"),
    (["predict", "{photo.png}", "--checkpoint", "{good.pt}", "--detector", "none", "--out", "{full}/p"],
     "p/photo_landmarks.png"),
    (["predict", "{photo.png}", "--checkpoint", "{good.pt}", "--detector", "none", "--no-annotate", "--out",
      "{full}/p"], "p/predictions.json"),
    (["train", "--preset", "tiny", "--no-progress", "--device", "cpu", "--steps", "1", "--out", "{full}/run"],
     "run/metrics.csv"),
], ids=["evaluate-out", "evaluate-json", "evaluate-ced", "predict-image", "predict-json", "train"])
def test_full_disk_names_the_file(files, full_disk, tmp_path, capsys, monkeypatch, argv, target):
    monkeypatch.delenv("DECAFA_DEBUG", raising=False)
    names = {k: str(v) for k, v in files.items()} | {"tmp": str(tmp_path), "full": str(full_disk)}
    argv = [re.sub(r"\{([\w.]+)\}", lambda m: names[m.group(1)], a) for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"'{full_disk / target}': No space left on device; free some space or choose another --" in lines[0]
    assert not list(full_disk.rglob("*.tmp"))


@pytest.mark.slow
def test_full_disk_names_the_onnx_file(files, full_disk, capsys):
    out = full_disk / "m.onnx"
    assert cli.main(["export", "--checkpoint", str(files["good.pt"]), "--out", str(out), "--no-check"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"decafa-fast export: error: cannot write ONNX model '{out}': No space left on device; free some "
                   "space or choose another --out")
