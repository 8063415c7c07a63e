"""Face detection on a real photo: Grace Hopper's portrait, which ships inside matplotlib (a dependency).

The SSD detector must find her face (the box is checked against the face's place in the photo, measured by
eye: x 180-350, y 120-335), keep finding it when the photo is rotated in the image plane (where the frontal
Haar cascade stops), and `predict` must report one face for the photo."""
from __future__ import annotations

from pathlib import Path

import cv2
import matplotlib
import numpy as np
import pytest

from decafa_fast.app.prediction.aligner import FaceDetector
from decafa_fast.app.prediction.detectors import SSD_PACKAGE, ssd_available, ssd_model_files

PHOTO = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
FACE = np.array([180.0, 120.0, 350.0, 335.0])  # (x0, y0, x1, y1) of her face in the 512 x 600 photo

pytestmark = pytest.mark.skipif(not ssd_available(), reason=f"{SSD_PACKAGE} (the faces extra) is not installed")


def iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def rotated(image: np.ndarray, degrees: float) -> tuple[np.ndarray, np.ndarray]:
    """The photo rotated about its centre, and the face box's centre carried along."""
    h, w = image.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0)
    centre = m @ np.array([(FACE[0] + FACE[2]) / 2, (FACE[1] + FACE[3]) / 2, 1.0])
    return cv2.warpAffine(image, m, (w, h)), centre


def test_weights_come_from_the_installed_wheel():
    prototxt, weights = ssd_model_files()
    assert weights.stat().st_size > 10_000_000 and prototxt.suffix == ".txt"


def test_ssd_finds_the_face_in_a_real_photo():
    image = cv2.imread(str(PHOTO))
    assert image is not None and image.shape == (600, 512, 3)
    boxes = FaceDetector("ssd")(image)
    assert len(boxes) == 1, boxes
    assert iou(boxes[0], FACE) > 0.6, boxes[0]
    gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)  # grayscale input works too
    assert iou(FaceDetector("ssd")(gray)[0], FACE) > 0.6


@pytest.mark.parametrize("degrees", [20, 30, 45, 60])
def test_ssd_finds_a_tilted_face_that_haar_misses(degrees):
    image, centre = rotated(cv2.imread(str(PHOTO)), degrees)
    boxes = FaceDetector("ssd")(image)
    assert len(boxes) == 1, boxes
    box_centre = (boxes[0, :2] + boxes[0, 2:]) / 2
    assert np.linalg.norm(box_centre - centre) < 40, (box_centre, centre)
    if hasattr(cv2, "CascadeClassifier"):
        assert len(FaceDetector("haar")(image)) == 0  # the frontal cascade loses her past about 10 degrees


def test_auto_picks_the_ssd_when_installed():
    assert FaceDetector("auto").kind == "ssd"


def test_predict_reports_the_face_it_found(tmp_path, capsys):
    import json

    import torch

    from decafa_fast.app import cli
    from decafa_fast.app.model import DeCaFA, DeCaFAConfig
    from decafa_fast.app.training.checkpoint import save_checkpoint

    config = DeCaFAConfig(stages=1, image_size=32, embedding_channels=8, widths=(8, 8, 8))
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "t.pt", DeCaFA(config).eval(), config)
    assert cli.main(["predict", str(PHOTO), "--checkpoint", str(ckpt), "--out", str(tmp_path / "out"),
                     "--no-annotate"]) == 0
    assert f"{PHOTO}: 1 face" in capsys.readouterr().out
    (entry,) = json.loads((tmp_path / "out" / "predictions.json").read_text())
    (face,) = entry["faces"]
    assert face["source"] == "detector" and iou(np.array(face["box"]), FACE) > 0.6


def test_predict_warns_on_several_faces(tmp_path, capsys):
    import torch

    from decafa_fast.app import cli
    from decafa_fast.app.model import DeCaFA, DeCaFAConfig
    from decafa_fast.app.training.checkpoint import save_checkpoint

    photo = cv2.imread(str(PHOTO))
    pair = tmp_path / "pair.png"
    assert len(FaceDetector("ssd")(np.hstack([photo, photo]))) == 2
    cv2.imwrite(str(pair), np.hstack([photo, photo]))
    config = DeCaFAConfig(stages=1, image_size=32, embedding_channels=8, widths=(8, 8, 8))
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "t.pt", DeCaFA(config).eval(), config)
    assert cli.main(["predict", str(pair), "--checkpoint", str(ckpt), "--out", str(tmp_path / "out"),
                     "--no-annotate"]) == 0
    assert f"{pair}: warning: 2 faces detected" in capsys.readouterr().err
