"""The face detectors compared on real photos that installed packages ship (the table in docs/datasets.md):

    python -m decafa_fast.app.prediction.detector_report

Photos: Grace Hopper's portrait (matplotlib, a dependency) and, where scikit-image is installed (the dev
extra), its astronaut (frontal), cameraman (a face turned to near profile) and photos with no face. Small
faces are the real photos shrunk (INTER_AREA) so that the face spans 12 to 24 pixels, alone or pasted into
the cameraman photo scaled to 640 or 1280 pixels; a large face is the portrait enlarged 3 times. A face
counts as found when a box overlaps its place (measured by eye) with IoU > 0.4; any other box is false.
"""
from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

__all__ = ["CAMERA_FACE", "GRACE_FACE", "Case", "cases", "grace_photo", "iou", "main", "skimage_photo"]

GRACE_FACE = np.array([180.0, 120.0, 350.0, 335.0])  # (x0, y0, x1, y1) in grace_hopper.jpg, 512 x 600
CAMERA_FACE = np.array([185.0, 105.0, 255.0, 200.0])  # hairline to chin, ear to nose, in camera.png, 512 x 512
ASTRONAUT_FACE = np.array([175.0, 60.0, 270.0, 180.0])  # in astronaut.png, 512 x 512
NO_FACE = ("coffee.png", "chelsea.png", "rocket.jpg", "motorcycle_left.png", "hubble_deep_field.jpg",
           "coins.png", "cell.png", "brick.png", "page.png", "retina.jpg")
FOUND_IOU = 0.4


def iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def grace_photo() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


def skimage_photo(name: str) -> Path | None:
    """A photo of scikit-image's data folder, found without importing scikit-image; None if not installed."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / name
    return path if path.is_file() else None


def shrunk(image: np.ndarray, faces: list[np.ndarray], face_px: float, face: np.ndarray):
    """`image` scaled so that `face` spans face_px pixels across, and its faces scaled with it."""
    s = face_px / (face[2] - face[0])
    return cv2.resize(image, None, fx=s, fy=s, interpolation=cv2.INTER_AREA), [f * s for f in faces]


@dataclass
class Case:
    name: str
    image: np.ndarray
    faces: list[np.ndarray]


def cases() -> list[Case]:
    grace = cv2.imread(str(grace_photo()))
    out = [Case("portrait (Grace Hopper) 512x600", grace, [GRACE_FACE])]
    camera_path, astronaut_path = skimage_photo("camera.png"), skimage_photo("astronaut.png")
    camera = cv2.imread(str(camera_path)) if camera_path else None
    if camera is not None:
        out.append(Case("astronaut 512x512", cv2.imread(str(astronaut_path)), [ASTRONAUT_FACE]))
        out.append(Case("cameraman, near profile, 512x512", camera, [CAMERA_FACE]))
        mirrored = np.array([512 - CAMERA_FACE[2], CAMERA_FACE[1], 512 - CAMERA_FACE[0], CAMERA_FACE[3]])
        out.append(Case("cameraman mirrored", np.ascontiguousarray(camera[:, ::-1]), [mirrored]))
    for px in (24, 20, 16, 12):
        image, faces = shrunk(grace, [GRACE_FACE], px, GRACE_FACE)
        out.append(Case(f"portrait shrunk, face {px} px, {image.shape[1]}x{image.shape[0]}", image, faces))
    if camera is not None:
        for px in (24, 20):
            image, faces = shrunk(camera, [CAMERA_FACE], px, CAMERA_FACE)
            out.append(Case(f"cameraman shrunk, face {px} px, {image.shape[1]}x{image.shape[0]}", image, faces))
        for side in (640, 1280):
            for px in (20, 16):
                out.append(pasted(grace, camera, side, px))
    big = cv2.resize(grace, None, fx=3, fy=3, interpolation=cv2.INTER_CUBIC)
    out.append(Case(f"portrait enlarged x3, face 510 px, {big.shape[1]}x{big.shape[0]}", big, [GRACE_FACE * 3]))
    for name in NO_FACE:
        path = skimage_photo(name)
        if path is not None:
            image = cv2.imread(str(path), cv2.IMREAD_COLOR)
            out.append(Case(f"no face: {name} {image.shape[1]}x{image.shape[0]}", image, []))
    return out


def pasted(grace: np.ndarray, camera: np.ndarray, side: int, px: int) -> Case:
    """The portrait shrunk to a `px`-pixel face, pasted at the right of the cameraman photo scaled to `side`:
    two faces, a small one and a turned one."""
    canvas = cv2.resize(camera, (side, side), interpolation=cv2.INTER_CUBIC)
    small, (face,) = shrunk(grace, [GRACE_FACE], px, GRACE_FACE)
    h, w = small.shape[:2]
    x0, y0 = side - w - 40, side // 2
    canvas[y0:y0 + h, x0:x0 + w] = small
    return Case(f"{px} px portrait in cameraman {side}x{side}", canvas,
                [face + [x0, y0, x0, y0], CAMERA_FACE * side / 512])


def score(boxes: np.ndarray, faces: list[np.ndarray]) -> tuple[int, int]:
    """(faces found, false boxes)."""
    found = sum(any(iou(b, f) > FOUND_IOU for b in boxes) for f in faces)
    false = sum(all(iou(b, f) <= FOUND_IOU for f in faces) for b in boxes)
    return found, false


def main() -> None:
    from .aligner import FaceDetector
    from .ssd import ssd_available
    from .yunet import yunet_available

    kinds = [k for k, ok in (("haar", hasattr(cv2, "CascadeClassifier")), ("ssd", ssd_available()),
                             ("yuface", yunet_available())) if ok]
    detectors = {k: FaceDetector(k) for k in kinds}
    print(f"{'photo':48s}" + "".join(f"| {k:>22s} " for k in kinds))
    print(f"{'':48s}" + "".join(f"| {'found  false      ms':>22s} " for _ in kinds))
    totals = {k: [0, 0, 0] for k in kinds}
    for case in cases():
        row = f"{case.name:48s}"
        for k, detector in detectors.items():
            start = time.perf_counter()
            boxes = detector(case.image)
            ms = 1000 * (time.perf_counter() - start)
            found, false = score(boxes, case.faces)
            totals[k][0] += found
            totals[k][1] += false
            totals[k][2] += len(case.faces)
            row += f"| {found:>3d}/{len(case.faces)} {false:>6d} {ms:>8.0f} "
        print(row, flush=True)
    print(f"{'total':48s}" + "".join(f"| {t[0]:>3d}/{t[2]} {t[1]:>6d} {'':>8s} " for t in totals.values()))


if __name__ == "__main__":
    main()
