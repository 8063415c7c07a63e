"""Face crops: a square region around a face box, resized to a small grayscale image, with its transform.

Coordinates follow the rest of the package: x is the column, y the row, 0-based, with pixel centres on
integers. A crop is a similarity transform without rotation (a uniform scale and a translation), stored as a
2x3 affine matrix `A` that maps original-image points to crop points, u = A[:, :2] @ x + A[:, 2]; predictions
made on the crop go back to the original image with the inverse (`FaceCrop.to_image`).

Crop conventions (how much context goes around the face) are set by `scale` (side of the square divided by
the longer side of the box) and `shift_y` (downward shift of the square's centre, as a fraction of its side):
- a landmarks' box: `LANDMARK_SCALE[markup]`; 68 and 98 points span brows to chin, so a 25 % margin;
  five points span only eyes to mouth, so the square is about 2.2 times larger to take in the same face;
- a face detector's box (OpenCV Haar): `DETECTOR_SCALE`, `DETECTOR_SHIFT` (its boxes sit a little high and
  cut the chin);
- the whole image (no face detected): scale 1, the image's bounding square.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..errors import UserError

CROP_SIZE = 128
LANDMARK_SCALE = {"wflw98": 1.25, "300w68": 1.25, "celeba5": 2.75}
DETECTOR_SCALE = 1.2
DETECTOR_SHIFT = 0.08


@dataclass(frozen=True)
class FaceCrop:
    """A square crop of side `size` pixels; `matrix` (2, 3) float64 maps image points to crop points."""

    matrix: np.ndarray
    size: int

    @property
    def inverse(self) -> np.ndarray:
        """(2, 3) matrix mapping crop points back to image points."""
        return cv2.invertAffineTransform(self.matrix)

    def to_crop(self, points: np.ndarray) -> np.ndarray:
        """Image points (..., 2) -> crop points (..., 2)."""
        return apply_affine(self.matrix, points)

    def to_image(self, points: np.ndarray) -> np.ndarray:
        """Crop points (..., 2) -> image points (..., 2)."""
        return apply_affine(self.inverse, points)

    def warp(self, image: np.ndarray) -> np.ndarray:
        """Cut the crop out of `image` (H, W) or (H, W, C) uint8/float; returns (size, size[, C]).

        Bilinear resampling; outside the image is black (0), as when a face is near the border.
        """
        return cv2.warpAffine(
            image, self.matrix, (self.size, self.size), flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_CONSTANT, borderValue=0,
        )


def apply_affine(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a (2, 3) affine matrix to points (..., 2); returns float64 points of the same shape."""
    points = np.asarray(points, dtype=np.float64)
    if points.shape[-1] != 2:
        raise ValueError(f"points must have shape (..., 2), got {points.shape}")
    matrix = np.asarray(matrix, dtype=np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


def check_box(box) -> np.ndarray:
    """A face box (x0, y0, x1, y1) as a float64 array, checked: four finite numbers with x1 > x0, y1 > y0."""
    b = np.asarray(box, dtype=np.float64).reshape(-1)
    if b.shape != (4,) or not np.isfinite(b).all():
        raise ValueError(f"box must be 4 finite numbers (x0, y0, x1, y1), got {box!r}")
    if b[2] <= b[0] or b[3] <= b[1]:
        raise ValueError(f"box must have x1 > x0 and y1 > y0, got {b.tolist()}")
    return b


def crop_from_box(box, size: int = CROP_SIZE, scale: float = 1.0, shift_y: float = 0.0) -> FaceCrop:
    """The square crop around `box` (x0, y0, x1, y1): side = scale * longer box side, centred on the box
    centre moved down by shift_y * side; the square's centre maps to the crop's centre pixel."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    x0, y0, x1, y1 = check_box(box)
    side = scale * max(x1 - x0, y1 - y0)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2 + shift_y * side
    s = size / side
    c = (size - 1) / 2
    matrix = np.array([[s, 0.0, c - s * cx], [0.0, s, c - s * cy]], dtype=np.float64)
    return FaceCrop(matrix, size)


def landmarks_box(points: np.ndarray) -> np.ndarray:
    """The tight box (x0, y0, x1, y1) of landmarks (L, 2), ignoring non-finite (missing) points."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    p = p[np.isfinite(p).all(axis=1)]
    if len(p) < 2:
        raise ValueError("need at least two finite landmarks to make a box")
    lo, hi = p.min(axis=0), p.max(axis=0)
    # a degenerate box (all points on a line) still gets at least one pixel of extent on each axis
    centre, half = (lo + hi) / 2, np.maximum((hi - lo) / 2, 0.5)
    return np.concatenate([centre - half, centre + half])


def crop_from_landmarks(points: np.ndarray, markup: str, size: int = CROP_SIZE, scale: float | None = None) -> FaceCrop:
    """The crop around a face's landmarks (L, 2) with the margin that suits its markup."""
    if scale is None:
        if markup not in LANDMARK_SCALE:
            raise ValueError(f"unknown markup {markup!r}; expected one of {sorted(LANDMARK_SCALE)}")
        scale = LANDMARK_SCALE[markup]
    return crop_from_box(landmarks_box(points), size, scale)


def crop_whole_image(height: int, width: int, size: int = CROP_SIZE) -> FaceCrop:
    """The crop that shows the whole image (its bounding square, centred; letterboxed with black)."""
    return crop_from_box((-0.5, -0.5, width - 0.5, height - 0.5), size, 1.0)


def to_gray(image: np.ndarray) -> np.ndarray:
    """A uint8 grayscale (H, W) image from (H, W), (H, W, 1), (H, W, 3) BGR or (H, W, 4) BGRA."""
    if image.ndim == 2:
        gray = image
    elif image.ndim == 3 and image.shape[2] == 1:
        gray = image[:, :, 0]
    elif image.ndim == 3 and image.shape[2] == 3:
        gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    elif image.ndim == 3 and image.shape[2] == 4:
        gray = cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY)
    else:
        raise ValueError(f"image must be (H, W) or (H, W, 1|3|4), got shape {image.shape}")
    if gray.dtype != np.uint8:
        if gray.dtype.kind == "f":
            # float images are taken to be in [0, 1]
            gray = np.clip(gray * 255.0 + 0.5, 0, 255).astype(np.uint8)
        else:
            gray = np.clip(gray, 0, 255).astype(np.uint8)
    return gray


class ImageReadError(UserError):
    """An image file that exists but OpenCV cannot decode (truncated, or not an image)."""


def read_image(path) -> np.ndarray:
    """Read an image file (any of `records.IMAGE_EXTENSIONS`) as BGR uint8 (H, W, 3), grayscale files
    expanded. FileNotFoundError if it does not exist; ImageReadError if OpenCV cannot decode it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    # imdecode of the bytes (not imread) so that non-ASCII paths work and a decoder error is ours to report
    data = np.fromfile(path, dtype=np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if image is None:
        raise ImageReadError(f"cannot read image {path}: empty, truncated or not an image OpenCV decodes; "
                             "replace or remove the file")
    return image
