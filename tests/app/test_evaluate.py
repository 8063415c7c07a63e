"""`decafa-fast evaluate` end to end (tiny untrained model) and the crop -> predict -> image mapping."""
from __future__ import annotations

import json
import re
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from decafa_fast.app import cli
from decafa_fast.app.data import SyntheticFaces, crop, derive_from_wflw98, w300, wflw
from decafa_fast.app.evaluation import metrics
from decafa_fast.app.evaluation.evaluate import evaluate_records, model_points, predict_records
from decafa_fast.app.model import DeCaFA, DeCaFAConfig
from decafa_fast.app.model.checkpoint import save_checkpoint

SIZE = 32


def tiny_checkpoint(path, stages: int = 1):
    torch.manual_seed(0)
    config = DeCaFAConfig(stages=stages, image_size=SIZE, embedding_channels=8, widths=(8, 8, 8))
    return save_checkpoint(path, DeCaFA(config).eval(), config)


class ConstantModel(nn.Module):
    """Predicts the same crop-space points for every face: makes the crop -> image mapping checkable."""

    def __init__(self, markups=("wflw98", "300w68", "celeba5"), size: int = SIZE):
        super().__init__()
        self.config = SimpleNamespace(markups=markups, image_size=size, stages=1)
        rng = np.random.default_rng(0)
        self.points = {m: torch.from_numpy(rng.uniform(0, size - 1, (n, 2)))
                       for m, n in zip(markups, [{"wflw98": 98, "300w68": 68, "celeba5": 5}[m] for m in markups])}

    def forward(self, images):
        return [[p.expand(len(images), -1, -1).float() for p in self.points.values()]]


def write_300w_from_synthetic(root, n_per_folder: int = 2):
    """300W-layout folders whose images are synthetic faces (64 x 64) with their true 68 points."""
    faces = SyntheticFaces(6 * n_per_folder, size=64, seed=7, markups=("300w68",))
    k = 0
    for sub in ["lfpw/trainset", "lfpw/testset", "helen/trainset", "helen/testset", "afw", "ibug"]:
        (root / sub).mkdir(parents=True)
        for _ in range(n_per_folder):
            item = faces[k]
            cv2.imwrite(str(root / sub / f"f{k}.png"), (item["image"][0].numpy() * 255).round().astype(np.uint8))
            w300.write_pts(root / sub / f"f{k}.pts", item["landmarks"]["300w68"].double().numpy() + 1.0)
            k += 1


def test_predictions_map_back_through_the_crop(tmp_path):
    write_300w_from_synthetic(tmp_path)
    records = w300.read_300w(tmp_path, "full")
    model = ConstantModel()
    pred = predict_records(model, records, batch_size=3, progress=False)
    for record, p in zip(records, pred):
        c = crop.crop_from_landmarks(record.landmarks, "300w68", SIZE)
        np.testing.assert_allclose(p, c.to_image(model.points["300w68"].numpy()), atol=1e-4)


def test_overlapping_subsets_share_predictions(tmp_path):
    write_300w_from_synthetic(tmp_path)
    model = ConstantModel()
    results = {r.name: r for r in evaluate_records(model, w300.read_300w_subsets(tmp_path), progress=False)}
    assert {k: r.n for k, r in results.items()} == {"common": 4, "challenging": 2, "full": 6}
    np.testing.assert_allclose(np.sort(results["full"].errors),
                               np.sort(np.concatenate([results["common"].errors, results["challenging"].errors])))
    # the NME is what metrics.nme gives for the mapped-back points
    records = w300.read_300w(tmp_path, "challenging")
    pred = predict_records(model, records, progress=False)
    expected = metrics.nme(pred, np.stack([r.landmarks for r in records]), "300w68")
    np.testing.assert_allclose(results["challenging"].errors, expected)


def test_missing_markup_is_derived_from_98_points():
    outputs = [torch.rand(2, 98, 2)]
    np.testing.assert_allclose(model_points(outputs, ("wflw98",), "300w68"), derive_from_wflw98(outputs[0], "300w68"))
    with pytest.raises(ValueError, match="cannot give"):
        model_points([torch.rand(2, 5, 2)], ("celeba5",), "300w68")


def test_evaluate_cli_synthetic(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    ced, out = tmp_path / "ced.png", tmp_path / "r.json"
    assert cli.main(["evaluate", "--data", "synthetic:6", "--checkpoint", str(ckpt), "--ced", str(ced),
                     "--json", str(out), "--batch-size", "4", "--no-progress"]) == 0
    text = capsys.readouterr().out
    for markup in ("wflw98", "300w68", "celeba5"):
        assert re.search(rf"^{markup}\s+{markup}\s+6\s+\d+\.\d\d", text, re.M), text
    assert "FR@0.10 %" in text and "AUC@0.08" in text
    assert ced.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads(out.read_text())["results"]
    assert [r["faces"] for r in results] == [6, 6, 6]
    assert all(0 <= r["auc@0.10"] <= 1 and np.isfinite(r["nme"]) for r in results)


def test_evaluate_cli_wflw_subsets(tmp_path, capsys):
    """WFLW fixture: the test set and its attribute subsets, empty subsets shown as '-'."""
    faces = SyntheticFaces(3, size=64, seed=9, markups=("wflw98",))
    lines = []
    (tmp_path / "WFLW_images" / "a").mkdir(parents=True)
    for i, flags in enumerate([(), ("pose",), ("pose", "blur")]):
        item = faces[i]
        cv2.imwrite(str(tmp_path / "WFLW_images" / "a" / f"{i}.jpg"), (item["image"][0].numpy() * 255).astype(np.uint8))
        lines.append(wflw.format_wflw_line(item["landmarks"]["wflw98"].numpy(), [0, 0, 63, 63], flags, f"a/{i}.jpg"))
    (tmp_path / "list_98pt_rect_attr_test.txt").write_text("\n".join(lines))
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    assert cli.main(["evaluate", "--data", f"wflw:{tmp_path}", "--checkpoint", str(ckpt), "--ced",
                     str(tmp_path / "ced.png"), "--no-progress"]) == 0
    text = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in text.splitlines()[3:10]}
    assert rows["test"][1] == "3" and rows["pose"][1] == "2" and rows["blur"][1] == "1"
    assert rows["make-up"][1:] == ["0", "-", "-", "-", "-", "-"]


def test_evaluate_cli_bad_input(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    with pytest.raises(ValueError, match="KIND:PATH"):
        cli.run_command(["evaluate", "--data", "imagenet:/x", "--checkpoint", str(ckpt)])
    with pytest.raises(FileNotFoundError, match="300W root"):
        cli.run_command(["evaluate", "--data", f"300w:{tmp_path / 'nope'}", "--checkpoint", str(ckpt)])
    with pytest.raises(ValueError, match="--stage"):
        cli.run_command(["evaluate", "--data", "synthetic:2", "--checkpoint", str(ckpt), "--stage", "3"])


def test_evaluate_json_rows_name_each_face_and_bad_images_are_skipped(tmp_path, capsys):
    """Per-face JSON rows carry the image file; an unreadable image is reported, left out, exit status 1."""
    data = tmp_path / "faces"
    data.mkdir()
    faces = SyntheticFaces(3, size=64, seed=4, markups=("300w68",))
    for i in range(3):
        item = faces[i]
        gray = (item["image"][0].numpy() * 255).round().astype(np.uint8)
        assert cv2.imwrite(str(data / f"f{i}.ppm"), cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR))
        w300.write_pts(data / f"f{i}.pts", item["landmarks"]["300w68"].double().numpy() + 1.0)
    (data / "f2.ppm").write_bytes(b"P6\n64 64\n255\n")  # a header and no pixels: truncated
    out = tmp_path / "r.json"
    code = cli.main(["evaluate", "--data", f"folder:{data}", "--checkpoint", str(tiny_checkpoint(tmp_path / "t.pt")),
                     "--ced", str(tmp_path / "ced.png"), "--json", str(out), "--no-progress"])
    captured = capsys.readouterr()
    assert code == 1 and "f2.ppm" in captured.err and "Traceback" not in captured.err
    result = json.loads(out.read_text())
    rows = result["faces"]["all"]
    assert [row["face"] for row in rows] == [str(data / "f0.ppm"), str(data / "f1.ppm")]
    assert all(row["nme"] > 0 for row in rows)
    assert [s["face"] for s in result["skipped"]] == [str(data / "f2.ppm")]


def test_landmarks_far_outside_the_image_are_rejected(tmp_path):
    data = tmp_path / "faces"
    data.mkdir()
    cv2.imwrite(str(data / "a.png"), np.zeros((40, 50), np.uint8))
    points = np.full((68, 2), 20.0)
    points[7] = (20.0, 900.0)  # more than 10 image heights below a 40-pixel image
    w300.write_pts(data / "a.pts", points + 1.0)
    ckpt = tiny_checkpoint(tmp_path / "t.pt")
    with pytest.raises(ValueError, match=r"a\.pts: landmark 7 .* far outside the 50x40 image"):
        cli.run_command(["evaluate", "--data", f"folder:{data}", "--checkpoint", str(ckpt), "--no-progress",
                         "--ced", str(tmp_path / "ced.png")])
    points[7] = (20.0, 1e30)  # beyond any image: rejected when the file is read, with its line
    w300.write_pts(data / "a.pts", points + 1.0)
    with pytest.raises(ValueError, match=r"a\.pts:11: landmark 0 is .*must be finite pixel positions"):
        cli.run_command(["evaluate", "--data", f"folder:{data}", "--checkpoint", str(ckpt)])


def test_evaluate_writes_files_only_where_asked(tmp_path, capsys, monkeypatch):
    """No --out, --json or --ced: nothing is written (not even into the working folder); --json puts the plot
    beside it; --out DIR holds results.json and ced.png."""
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    base = ["evaluate", "--data", "synthetic:2", "--checkpoint", str(ckpt), "--no-progress"]
    assert cli.main(base) == 0
    assert list(cwd.iterdir()) == []
    assert "no files written (--out DIR saves the results and the CED plot" in capsys.readouterr().out
    assert cli.main([*base, "--json", str(tmp_path / "j" / "r.json")]) == 0
    assert sorted(p.name for p in (tmp_path / "j").iterdir()) == ["r.json", "r_ced.png"]
    assert cli.main([*base, "--out", str(tmp_path / "o")]) == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["ced.png", "results.json"]
    assert (tmp_path / "o" / "ced.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "o" / "results.json").read_text())["results"][0]["faces"] == 2
    assert list(cwd.iterdir()) == []


def test_ctrl_c_during_evaluate_is_one_line(tmp_path, capsys, monkeypatch):
    from decafa_fast.app.evaluation import evaluate

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(evaluate, "evaluate_synthetic", interrupted)
    code = cli.main(["evaluate", "--data", "synthetic:2", "--checkpoint", str(tiny_checkpoint(tmp_path / "t.pt")),
                     "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 130 and err.strip() == ("decafa-fast evaluate: interrupted: nothing was written (the results are "
                                           "written once every face is evaluated)")
