"""What the face detectors share: their input as a 3-channel BGR image, and the merging of the face boxes
that a detector finds more than once (in several tiles or at several scales)."""
from __future__ import annotations

import cv2
import numpy as np

__all__ = ["as_bgr", "merge_boxes"]


def as_bgr(image: np.ndarray) -> np.ndarray:
    """A grayscale (H, W) or (H, W, 1), BGR or BGRA uint8 image as BGR (H, W, 3)."""
    if image.ndim == 2 or image.shape[2] == 1:
        return cv2.cvtColor(image.reshape(image.shape[:2]), cv2.COLOR_GRAY2BGR)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return image


def merge_boxes(boxes: np.ndarray, scores: np.ndarray, overlap: float = 0.5) -> list[int]:
    """Indices of the boxes (N, 4) (x0, y0, x1, y1) to keep, best score first. Greedy suppression by score:
    a box goes when it shares more than `overlap` of the smaller box's area with a better one (the same face
    seen at two scales gives boxes of different sizes, which plain IoU would keep both of)."""
    order = list(np.argsort(-scores, kind="stable"))
    area = (boxes[:, 2] - boxes[:, 0]).clip(0) * (boxes[:, 3] - boxes[:, 1]).clip(0)
    keep: list[int] = []
    for i in order:
        ok = True
        for j in keep:
            iw = min(boxes[i, 2], boxes[j, 2]) - max(boxes[i, 0], boxes[j, 0])
            ih = min(boxes[i, 3], boxes[j, 3]) - max(boxes[i, 1], boxes[j, 1])
            if iw > 0 and ih > 0 and iw * ih > overlap * max(min(area[i], area[j]), 1e-9):
                ok = False
                break
        if ok:
            keep.append(int(i))
    return keep
