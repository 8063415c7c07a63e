"""FaceAligner and `decafa-fast predict` on synthetic images and a short video written here."""
from __future__ import annotations

import contextlib
import csv
import json

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from decafa_fast.app import cli
from decafa_fast.app.data import SyntheticFaces
from decafa_fast.app.data.crop import DETECTOR_SCALE, DETECTOR_SHIFT, crop_from_box, crop_whole_image
from decafa_fast.app.model import DeCaFA, DeCaFAConfig
from decafa_fast.app.model.checkpoint import save_checkpoint
from decafa_fast.app.prediction.aligner import Face, FaceAligner, FaceDetector, LandmarkSmoother

SIZE = 32


def tiny_checkpoint(path):
    torch.manual_seed(0)
    config = DeCaFAConfig(stages=1, image_size=SIZE, embedding_channels=8, widths=(8, 8, 8))
    return save_checkpoint(path, DeCaFA(config).eval(), config)


class ConstantModel(nn.Module):
    """The same crop-space points for every face (and records the batch sizes it sees)."""

    def __init__(self):
        super().__init__()
        self.config = DeCaFAConfig(stages=1, image_size=SIZE, embedding_channels=8, widths=(8, 8, 8))
        self.anchor = nn.Parameter(torch.zeros(()))  # so .to(device) has something to move
        rng = np.random.default_rng(1)
        self.points = [torch.from_numpy(rng.uniform(0, SIZE - 1, (n, 2))).float() for n in self.config.n_points]
        self.batches: list[int] = []

    def forward(self, images):
        self.batches.append(len(images))
        return [[p.expand(len(images), -1, -1) for p in self.points]]


def synthetic_frames(n: int, size: int = 64) -> list[np.ndarray]:
    faces = SyntheticFaces(n, size=size, seed=5)
    return [cv2.cvtColor((faces[i]["image"][0].numpy() * 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)
            for i in range(n)]


HAS_HAAR = hasattr(cv2, "CascadeClassifier")  # OpenCV 4 has it; OpenCV 5 no longer ships cascades


def test_face_aligner_is_exported_and_falls_back_to_the_whole_image(tmp_path):
    with pytest.warns(UserWarning, match="Haar") if not HAS_HAAR else contextlib.nullcontext():
        aligner = FaceAligner(tiny_checkpoint(tmp_path / "t.pt"), device="cpu", detector="haar"
                              if HAS_HAAR else "auto")
    assert aligner.detector.kind == ("haar" if HAS_HAAR else "none")
    image = synthetic_frames(1, size=48)[0][:, :40]  # not square: 48 rows, 40 columns
    assert aligner.detect(image).shape == (0, 4)  # no detector finds a synthetic face
    (face,) = aligner.align(image)
    assert face.source == "whole-image"
    assert set(face.landmarks) == {"wflw98", "300w68", "celeba5"} and face.landmarks["wflw98"].shape == (98, 2)
    # soft-argmax points lie inside the crop, and the whole-image crop spans the image's bounding square
    pts = face.landmarks["wflw98"]
    assert pts[:, 1].min() >= -0.5 and pts[:, 1].max() <= 47.5 and pts[:, 0].min() >= -4.5 and pts[:, 0].max() <= 43.5


@pytest.mark.skipif(not HAS_HAAR, reason=f"OpenCV {cv2.__version__} has no CascadeClassifier")
def test_haar_detector_loads_and_finds_no_face_in_noise():
    detector = FaceDetector("haar")
    noise = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    assert detector(noise).shape == (0, 4)


def test_detector_errors():
    with pytest.raises(ValueError, match="detector must be one of"):
        FaceDetector("mtcnn")
    with pytest.raises(FileNotFoundError, match="yunet"):
        FaceDetector("yunet", "missing.onnx")
    assert FaceDetector("none")(np.zeros((20, 20), np.uint8)).shape == (0, 4)


def test_points_map_back_and_batches_are_shared():
    model = ConstantModel()
    aligner = FaceAligner(model=model, device="cpu", batch_size=3, detector="none")
    frames = synthetic_frames(2)
    boxes = [np.array([[10, 12, 40, 44], [5, 5, 20, 25]]), None]
    result = aligner.align_many(frames, boxes)
    assert model.batches == [3]  # three faces of two images in one forward pass
    assert [[f.source for f in faces] for faces in result] == [["given", "given"], ["whole-image"]]
    expected = crop_from_box(boxes[0][1], SIZE, DETECTOR_SCALE, DETECTOR_SHIFT).to_image(model.points[1].numpy())
    np.testing.assert_allclose(result[0][1].landmarks["300w68"], expected, atol=1e-4)
    expected = crop_whole_image(64, 64, SIZE).to_image(model.points[2].numpy())
    np.testing.assert_allclose(result[1][0].landmarks["celeba5"], expected, atol=1e-4)


def test_batched_equals_one_at_a_time(tmp_path):
    aligner = FaceAligner(tiny_checkpoint(tmp_path / "t.pt"), device="cpu", batch_size=2, detector="none")
    frames = synthetic_frames(3)
    together = aligner.align_many(frames)
    for frame, faces in zip(frames, together):
        np.testing.assert_allclose(aligner.align(frame)[0].landmarks["wflw98"], faces[0].landmarks["wflw98"], atol=1e-4)


def test_smoother():
    def face(box, value):
        return Face(box=np.array(box, float), landmarks={"celeba5": np.full((5, 2), float(value))}, source="given")

    smooth = LandmarkSmoother(alpha=0.25)
    smooth([face([0, 0, 10, 10], 0.0), face([50, 50, 60, 60], 8.0)])
    out = smooth([face([1, 0, 11, 10], 4.0), face([100, 100, 110, 110], 4.0)])
    np.testing.assert_allclose(out[0].landmarks["celeba5"], 1.0)  # 0.25 * 4 + 0.75 * 0
    np.testing.assert_allclose(out[1].landmarks["celeba5"], 4.0)  # no overlapping face before: not smoothed
    with pytest.raises(ValueError, match="alpha"):
        LandmarkSmoother(alpha=0.0)


def test_predict_cli_images_folder_and_video(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "t.pt")
    frames = synthetic_frames(5)
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, frame in enumerate(frames[:2]):
        cv2.imwrite(str(folder / f"p{i}.png"), frame)
    single = tmp_path / "single.jpg"
    cv2.imwrite(str(single), frames[2])
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 64))
    for k in range(6):
        writer.write(frames[k % 5])
    writer.release()
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"single.jpg": [[8, 8, 56, 56]]}))
    out = tmp_path / "out"
    assert cli.main(["predict", str(folder), str(single), str(video), "--checkpoint", str(ckpt), "--out", str(out),
                     "--boxes", str(boxes), "--csv", "--smooth", "0.5", "--batch-size", "4",
                     "--markups", "300w68", "celeba5", "--detector", "none"]) == 0
    assert "9 images/frames, 9 faces" in capsys.readouterr().out
    entries = json.loads((out / "predictions.json").read_text())
    assert len(entries) == 3 + 6
    by_source = {e["source"]: e for e in entries if "frame" not in e}
    assert by_source[str(single)]["faces"][0]["source"] == "given"
    assert by_source[str(folder / "p0.png")]["faces"][0]["source"] == "whole-image"
    assert [e["frame"] for e in entries if "frame" in e] == list(range(6))
    assert set(entries[0]["faces"][0]["landmarks"]) == {"300w68", "celeba5"}
    with open(out / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 9 * (68 + 5) and rows[0].keys() >= {"source", "frame", "markup", "point", "x", "y"}
    assert (out / "p0_landmarks.png").is_file() and (out / "single_landmarks.png").is_file()
    annotated = cv2.VideoCapture(str(out / "clip_landmarks.mp4"))
    n = 0
    while annotated.read()[0]:
        n += 1
    assert n == 6


def test_predict_cli_bad_input(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "t.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cli.run_command(["predict", str(tmp_path / "none.jpg"), "--checkpoint", str(ckpt)])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not an image"):
        cli.run_command(["predict", str(tmp_path / "notes.txt"), "--checkpoint", str(ckpt)])
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match="--smooth"):
        cli.run_command(["predict", str(tmp_path / "a.png"), "--checkpoint", str(ckpt), "--smooth", "2"])


@pytest.mark.parametrize("ext", [".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp", ".png", ".jpg", ".jpeg"])
def test_every_opencv_format_in_cli_api_and_folder(tmp_path, ext):
    """One list of image formats for predict's inputs and folders, the API and the annotated-folder reader."""
    from decafa_fast.app.data import folder

    ckpt = tiny_checkpoint(tmp_path / "t.pt")
    frame = synthetic_frames(1)[0]
    image = tmp_path / "photos" / f"face{ext}"
    image.parent.mkdir()
    assert cv2.imwrite(str(image), frame[:, :, 0] if ext == ".pgm" else frame)
    out = tmp_path / "out"
    assert cli.main(["predict", str(image), str(image.parent), "--checkpoint", str(ckpt), "--out", str(out),
                     "--detector", "none", "--no-annotate"]) == 0
    entries = json.loads((out / "predictions.json").read_text())
    assert [e["source"] for e in entries] == [str(image), str(image)]
    aligner = FaceAligner(ckpt, device="cpu", detector="none")
    assert aligner.align(image)[0].landmarks["wflw98"].shape == (98, 2)
    (image.parent / "face.json").write_text(json.dumps(np.full((5, 2), 20.0).tolist()))
    (record,) = folder.read_annotated_folder(image.parent)
    assert record.image == image


def test_bad_image_in_a_folder_is_reported_and_skipped(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "t.pt")
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, frame in enumerate(synthetic_frames(2)):
        cv2.imwrite(str(photos / f"ok{i}.png"), frame)
    (photos / "broken.jpg").write_bytes(b"this is not a JPEG")
    (photos / "empty.ppm").write_bytes(b"")
    out = tmp_path / "out"
    assert cli.main(["predict", str(photos), "--checkpoint", str(ckpt), "--out", str(out), "--detector", "none"]) == 1
    captured = capsys.readouterr()
    assert "broken.jpg" in captured.err and "empty.ppm" in captured.err and "2 image(s) skipped" in captured.err
    assert "Traceback" not in captured.err
    entries = json.loads((out / "predictions.json").read_text())
    assert sorted(e["source"] for e in entries) == [str(photos / "ok0.png"), str(photos / "ok1.png")]
    assert (out / "ok0_landmarks.png").is_file() and (out / "ok1_landmarks.png").is_file()


def test_the_run_reports_faces_per_image(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "t.pt")
    image = tmp_path / "a.png"
    cv2.imwrite(str(image), synthetic_frames(1)[0])
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"b.png": [[4, 4, 40, 40], [30, 30, 60, 60]]}))
    cv2.imwrite(str(tmp_path / "b.png"), synthetic_frames(1)[0])
    assert cli.main(["predict", str(image), str(tmp_path / "b.png"), "--checkpoint", str(ckpt), "--out",
                     str(tmp_path / "out"), "--detector", "none", "--boxes", str(boxes)]) == 0
    captured = capsys.readouterr()
    # with --detector none no face is looked for: the whole image is the expected result, not a warning
    assert f"{image}: aligned the whole image as one face (--detector none)" in captured.out
    assert "warning" not in captured.err
    assert "b.png: 2 face(s) from --boxes" in captured.out
    assert "face detector: none (every image is aligned as a whole); images listed in --boxes use the boxes" \
        in captured.out


def test_predict_names_its_detector_and_draws_a_legend(tmp_path, capsys):
    """The run says which detector ran; each annotated image is the picture, untouched outside the drawn points,
    above a legend strip with one line per markup in its colour and one for the face boxes."""
    from decafa_fast.app.prediction.predict import COLOURS, draw, legend_lines

    frame = synthetic_frames(1)[0]
    cv2.imwrite(str(tmp_path / "face.png"), frame)
    code = cli.main(["predict", str(tmp_path / "face.png"), "--checkpoint", str(tiny_checkpoint(tmp_path / "t.pt")),
                     "--out", str(tmp_path / "out"), "--detector", "none"])
    out = capsys.readouterr().out
    assert code == 0 and "face detector: none (every image is aligned as a whole)" in out
    annotated = cv2.imread(str(tmp_path / "out" / "face_landmarks.png"))
    assert annotated.shape[0] > frame.shape[0] and annotated.shape[1] >= frame.shape[1]
    strip = annotated[frame.shape[0]:]
    for colour in COLOURS:  # each markup's colour appears in the legend strip
        assert (np.abs(strip.astype(int) - colour).sum(axis=2) < 40).any(), colour

    face = Face(box=np.array([2.0, 2.0, 40.0, 40.0]), source="detector",
                landmarks={"wflw98": np.full((98, 2), 10.0), "celeba5": np.full((5, 2), 20.0)})
    lines = legend_lines([face], ["wflw98", "celeba5"], "yuface")
    assert lines == [("wflw98 (98 points)", COLOURS[0]), ("celeba5 (5 points)", COLOURS[1]),
                     ("box: detected by yuface", (255, 255, 255))]
    canvas = draw(frame, [face], ["wflw98", "celeba5"], "yuface")
    assert canvas.shape[0] == frame.shape[0] + 18 * 3 + 6
    untouched = np.ones(frame.shape[:2], bool)
    untouched[:44, :44] = False  # the box and the points
    assert np.array_equal(canvas[:frame.shape[0], :frame.shape[1]][untouched], frame[untouched])


def test_detector_model_that_opencv_cannot_load_is_one_line(tmp_path, capfd):
    """A text file given as --detector-model: one line naming it, no cv2.error traceback."""
    (tmp_path / "model.onnx").write_text("not a model")
    frame = synthetic_frames(1)[0]
    cv2.imwrite(str(tmp_path / "face.png"), frame)
    code = cli.main(["predict", str(tmp_path / "face.png"), "--checkpoint", str(tiny_checkpoint(tmp_path / "t.pt")),
                     "--out", str(tmp_path / "out"), "--detector-model", str(tmp_path / "model.onnx")])
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err and "cv2.error" not in err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"decafa-fast predict: error: --detector-model '{tmp_path / 'model.onnx'}' is not a "
                                "YuNet ONNX model that OpenCV")


def test_ctrl_c_during_predict_keeps_the_images_done(tmp_path, capsys, monkeypatch):
    """Ctrl-C after the first of two images: exit 130, predictions.json holds the first, and the one line says so."""
    frames = synthetic_frames(2)
    for i, frame in enumerate(frames):
        cv2.imwrite(str(tmp_path / f"p{i}.png"), frame)
    real = FaceAligner.align_many
    calls = []

    def align_many(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(FaceAligner, "align_many", align_many)
    out = tmp_path / "out"
    code = cli.main(["predict", str(tmp_path / "p0.png"), str(tmp_path / "p1.png"), "--checkpoint",
                     str(tiny_checkpoint(tmp_path / "t.pt")), "--out", str(out), "--detector", "none",
                     "--batch-size", "1"])
    err = capsys.readouterr().err
    assert code == 130 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"decafa-fast predict: interrupted: kept the 1 image(s)/frame(s) done so "
                                            f"far in {out / 'predictions.json'} and 1 annotated file(s) in {out}")
    assert [e["source"] for e in json.loads((out / "predictions.json").read_text())] == [str(tmp_path / "p0.png")]
