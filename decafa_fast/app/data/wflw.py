"""WFLW: 98 landmarks per face in one annotation line, with a face box and six attribute flags.

Each line: 196 numbers (x0 y0 x1 y1 ... x97 y97, 0-based pixels), 4 box numbers (x_min y_min x_max y_max),
6 flags (0/1: pose, expression, illumination, make-up, occlusion, blur), then the image path relative to
the image folder. Expected layout (the official download):
```
ROOT/WFLW_annotations/list_98pt_rect_attr_train_test/list_98pt_rect_attr_{train,test}.txt
ROOT/WFLW_images/<event folder>/<image>.jpg
```
The test set (2500 faces) and its subsets by flag are what the paper's WFLW table reports.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .records import FaceRecord, check_coordinates, raise_missing

MARKUP = "wflw98"
N_POINTS = 98
ATTRIBUTES = ("pose", "expression", "illumination", "make-up", "occlusion", "blur")
EVAL_SUBSETS = ("test",) + ATTRIBUTES
_FIELDS = 2 * N_POINTS + 4 + len(ATTRIBUTES)  # numbers before the image path


def annotation_name(split: str) -> str:
    return f"list_98pt_rect_attr_{split}.txt"


def parse_wflw_line(line: str, path: Path, lineno: int) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], str]:
    """One annotation line -> (landmarks (98, 2), box (4,), attribute names, relative image path).
    ValueError naming the file and the line if it is malformed."""
    fields = line.split(maxsplit=_FIELDS)  # the image path may contain spaces: keep it whole
    if len(fields) != _FIELDS + 1:
        raise ValueError(f"{path}:{lineno}: expected {_FIELDS} numbers and an image path, got {len(fields)} fields")
    try:
        numbers = np.array([float(v) for v in fields[:_FIELDS]], dtype=np.float64)
    except ValueError as e:
        raise ValueError(f"{path}:{lineno}: {e}") from None
    check_coordinates(numbers[: 2 * N_POINTS + 4].reshape(-1, 2), f"{path}:{lineno}")
    flags = numbers[2 * N_POINTS + 4:]
    if not np.isin(flags, (0.0, 1.0)).all():
        raise ValueError(f"{path}:{lineno}: the 6 attribute flags must be 0 or 1, got {flags.tolist()}")
    landmarks = numbers[: 2 * N_POINTS].reshape(N_POINTS, 2)
    box = numbers[2 * N_POINTS: 2 * N_POINTS + 4]
    attributes = tuple(name for name, flag in zip(ATTRIBUTES, flags) if flag)
    return landmarks, box, attributes, fields[-1].strip()


def read_annotation_file(path: str | Path, image_root: str | Path | None = None) -> list[FaceRecord]:
    """All faces of a WFLW annotation file. Images are looked up under `image_root` (default: the
    WFLW_images folder next to WFLW_annotations, else the annotation file's folder)."""
    path = Path(path)
    parsed = []
    with open(path, encoding="utf-8", errors="replace") as f:  # a binary file fails on its first line
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                parsed.append((lineno, *parse_wflw_line(line, path, lineno)))
    if not parsed:
        raise ValueError(f"{path}: no annotation lines")
    if image_root is None:
        image_root = _guess_image_root(path, parsed[0][4])
    image_root = Path(image_root)
    records, missing = [], []
    for lineno, landmarks, box, attributes, relative in parsed:
        image = image_root / relative
        if not image.is_file():
            missing.append(image)
            continue
        records.append(FaceRecord(image=image, landmarks=landmarks, markup=MARKUP, box=box,
                                  attributes=attributes, source=path.stem, origin=f"{path}:{lineno}"))
    raise_missing(missing)
    return records


def _guess_image_root(annotation: Path, first_image: str) -> Path:
    """Find the folder the image paths are relative to, trying the usual places around the annotation."""
    candidates = []
    for parent in annotation.parents:
        candidates += [parent / "WFLW_images", parent]
        if len(candidates) >= 8:
            break
    for candidate in candidates:
        if (candidate / first_image).is_file():
            return candidate
    return candidates[0] if candidates[0].is_dir() else annotation.parent


def find_annotation(root: Path, split: str) -> Path:
    """The split's annotation file under `root` (searched recursively), or `root` itself if it is a file."""
    if root.is_file():
        return root
    if not root.is_dir():
        raise FileNotFoundError(f"WFLW root {root} does not exist")
    name = annotation_name(split)
    found = sorted(root.rglob(name))
    if not found:
        raise FileNotFoundError(f"no {name} under {root} (expected WFLW_annotations/list_98pt_rect_attr_train_test/)")
    return found[0]


def read_wflw(root: str | Path, split: str = "train") -> list[FaceRecord]:
    """The faces of WFLW's "train" or "test" split; `root` is the WFLW folder or an annotation file."""
    if split not in ("train", "test"):
        raise ValueError(f"WFLW split must be 'train' or 'test', got {split!r}")
    return read_annotation_file(find_annotation(Path(root), split))


def read_wflw_subsets(root: str | Path) -> dict[str, list[FaceRecord]]:
    """The test set and its six attribute subsets (pose, expression, illumination, make-up, occlusion, blur)."""
    test = read_wflw(root, "test")
    subsets = {"test": test}
    for name in ATTRIBUTES:
        subsets[name] = [r for r in test if name in r.attributes]
    return subsets


def format_wflw_line(landmarks: np.ndarray, box, attributes: tuple[str, ...], image: str) -> str:
    """One annotation line in WFLW's format (for writing fixtures or converting data)."""
    landmarks = np.asarray(landmarks, dtype=np.float64).reshape(N_POINTS, 2)
    numbers = [f"{v:.6f}" for v in landmarks.reshape(-1)] + [str(int(round(v))) for v in box]
    numbers += ["1" if name in attributes else "0" for name in ATTRIBUTES]
    return " ".join(numbers + [image])
