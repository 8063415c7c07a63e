"""A generic folder of annotated images: each image with a `.pts` or `.json` file of the same name beside it.

- `.pts`: the 300W format, 1-based coordinates (as 300W writes them); 0-based after reading.
- `.json`: 0-based pixel coordinates, either a list of [x, y] pairs or an object
  `{"landmarks": [[x, y], ...], "markup": "300w68", "box": [x0, y0, x1, y1]}` (markup and box optional).
The markup is taken from the number of points when not given: 98 -> wflw98, 68 -> 300w68, 5 -> celeba5.
Sub-folders are searched too. `list_images` lists a folder's images for prediction (no annotations needed).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .markups import MARKUPS
from .records import NO_IMAGE, FaceRecord, check_coordinates, find_image, is_image_file, raise_missing
from .w300 import parse_pts

MARKUP_BY_POINTS = {98: "wflw98", 68: "300w68", 5: "celeba5"}


def _markup_for(n: int, path: Path, lineno: int | None) -> str:
    if n not in MARKUP_BY_POINTS:
        where = f"{path}:{lineno}" if lineno else str(path)
        raise ValueError(f"{where}: {n} points match no markup (expected one of {sorted(MARKUP_BY_POINTS)})")
    return MARKUP_BY_POINTS[n]


def parse_json_annotation(path: str | Path) -> tuple[np.ndarray, str, np.ndarray | None]:
    """A `.json` annotation -> (landmarks (L, 2) 0-based, markup, box or None). ValueError names the file
    (and the line for syntax errors)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a text file (expected JSON landmarks)") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    markup, box = None, None
    if isinstance(data, dict):
        if "landmarks" not in data:
            raise ValueError(f"{path}: a JSON object annotation needs a 'landmarks' key")
        markup, box = data.get("markup"), data.get("box")
        data = data["landmarks"]
    try:
        points = np.asarray(data, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: landmarks must be a list of [x, y] number pairs") from None
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"{path}: landmarks must be a list of [x, y] pairs, got shape {points.shape}")
    check_coordinates(points, str(path))
    if markup is None:
        markup = _markup_for(len(points), path, None)
    elif not isinstance(markup, str) or markup not in MARKUPS or MARKUPS[markup].n_points != len(points):
        raise ValueError(f"{path}: markup {markup!r} does not fit {len(points)} points")
    if box is not None:
        try:
            box = np.asarray(box, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{path}: box must be [x0, y0, x1, y1] numbers, got {box!r}") from None
        if box.shape != (4,) or not np.isfinite(box).all():
            raise ValueError(f"{path}: box must be [x0, y0, x1, y1], got {box.tolist()}")
    return points, markup, box


def read_annotated_folder(folder: str | Path) -> list[FaceRecord]:
    """Every annotated image under `folder` (recursively). Annotations whose image is missing are
    reported (FileNotFoundError), never skipped."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"annotation folder {folder} is not a directory")
    records, missing = [], []
    annotations = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".pts", ".json") and p.is_file())
    if not annotations:
        raise ValueError(f"{folder} holds no .pts or .json annotation files")
    for path in annotations:
        if path.suffix.lower() == ".pts":
            points = parse_pts(path) - 1.0  # 1-based, as 300W writes them
            markup, box = _markup_for(len(points), path, 2), None
        else:
            points, markup, box = parse_json_annotation(path)
        image = find_image(path)
        if image is None:
            missing.append(path)
            continue
        records.append(FaceRecord(image=image, landmarks=points, markup=markup, box=box,
                                  source=str(path.parent.relative_to(folder)), origin=str(path)))
    raise_missing(missing, NO_IMAGE)
    return records


def list_images(folder: str | Path) -> list[Path]:
    """The image files under `folder` (recursively), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} is not a directory")
    return sorted(p for p in folder.rglob("*") if is_image_file(p) and p.is_file())
