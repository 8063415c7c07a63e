"""The leaf of the data package: the record every reader returns and the helpers the readers share.

Nothing here imports another module of `decafa_fast.app.data`, so every reader (300W, WFLW, CelebA, folder)
and `real` (the registry of readers and the cropping Dataset) can import it without a cycle.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["FaceRecord", "IMAGE_EXTENSIONS", "NO_IMAGE", "MAX_COORDINATE", "FAR_OUTSIDE", "find_image",
           "is_image_file", "raise_missing", "check_coordinates", "check_inside_image"]

# The image files OpenCV 4 decodes (opencv-python-headless), one list for the readers, `predict` and the API.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".dib", ".webp", ".ppm", ".pgm", ".pbm", ".pnm",
                    ".tif", ".tiff", ".jp2", ".sr", ".ras", ".avif")
NO_IMAGE = "annotation(s) without an image of the same name (.jpg, .png, .ppm, .bmp, .tif, .webp, ...)"
# No photo is a million pixels wide: a coordinate beyond this is a corrupt file, whatever its image.
MAX_COORDINATE = 1e6
# Once the image is known: a landmark more than this many image sides outside it is an error in the file.
FAR_OUTSIDE = 10.0


@dataclass
class FaceRecord:
    """One annotated face: `landmarks` (L, 2) float64 in 0-based pixel coordinates of the image file.

    origin: where the annotation came from, "file" or "file:line", for error messages."""

    image: Path
    landmarks: np.ndarray
    markup: str
    box: np.ndarray | None = None  # the data set's face box (x0, y0, x1, y1), if it has one
    attributes: tuple[str, ...] = ()  # e.g. WFLW's ("pose", "blur")
    source: str = ""  # which part of the data set (e.g. "helen/testset")
    origin: str = ""


def is_image_file(path: str | Path) -> bool:
    """True for a file name with one of IMAGE_EXTENSIONS (any case)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def find_image(annotation: Path) -> Path | None:
    """The image beside an annotation file with the same stem (any of IMAGE_EXTENSIONS, any case)."""
    for ext in IMAGE_EXTENSIONS:
        for candidate in (annotation.with_suffix(ext), annotation.with_suffix(ext.upper())):
            if candidate.is_file():
                return candidate
    return None


def raise_missing(missing: list[Path], what: str = "image(s) missing") -> None:
    """Report missing files (never skip them silently): FileNotFoundError naming the first few."""
    if missing:
        shown = ", ".join(str(p) for p in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise FileNotFoundError(f"{len(missing)} {what}: {shown}{more}")


def check_coordinates(points: np.ndarray, where: str) -> np.ndarray:
    """Landmarks read from a file: finite and within +-MAX_COORDINATE pixels, else ValueError naming
    `where` ("file:line") and the first bad point."""
    points = np.asarray(points, dtype=np.float64)
    bad = ~(np.isfinite(points) & (np.abs(points) <= MAX_COORDINATE))
    if bad.any():
        k = int(np.argwhere(bad)[0][0]) if points.ndim > 1 else 0
        value = points[k].tolist() if points.ndim > 1 else points.tolist()
        raise ValueError(f"{where}: landmark {k} is {value}: coordinates must be finite pixel positions "
                         f"(|x|, |y| <= {MAX_COORDINATE:g}); fix the annotation file")
    return points


def check_inside_image(record: FaceRecord, height: int, width: int) -> None:
    """ValueError naming the annotation when a landmark lies more than FAR_OUTSIDE image sides outside
    the (height, width) image: such a file is corrupt or belongs to another image."""
    p = np.asarray(record.landmarks, dtype=np.float64)
    lo = -FAR_OUTSIDE * np.array([width, height])
    hi = (FAR_OUTSIDE + 1) * np.array([width, height])
    outside = ((p < lo) | (p > hi)).any(axis=1)
    if outside.any():
        k = int(np.argmax(outside))
        raise ValueError(f"{record.origin or record.image}: landmark {k} at {np.round(p[k], 2).tolist()} is far "
                         f"outside the {width}x{height} image {record.image}; fix the annotation or the image")
