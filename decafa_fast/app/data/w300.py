"""300W (iBUG): `.pts` landmark files beside the images, 68 points, 1-based pixel coordinates.

Expected layout (the iBUG 300W download; folder names are matched case-insensitively):
```
ROOT/afw/*.jpg, *.pts
ROOT/helen/trainset/ ...   ROOT/helen/testset/ ...
ROOT/lfpw/trainset/ ...    ROOT/lfpw/testset/ ...
ROOT/ibug/ ...
ROOT/300W/01_Indoor/, 02_Outdoor/   (optional: the 300-W challenge test set, subset "private")
```
Splits (the usual protocol): train = LFPW train + HELEN train + AFW (3148 faces); common = LFPW test + HELEN
test (554); challenging = IBUG (135); full = common + challenging (689).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .records import NO_IMAGE, FaceRecord, check_coordinates, find_image, raise_missing

MARKUP = "300w68"
# split -> folders (each a path below ROOT, matched case-insensitively)
SPLITS: dict[str, tuple[str, ...]] = {
    "train": ("lfpw/trainset", "helen/trainset", "afw"),
    "common": ("lfpw/testset", "helen/testset"),
    "challenging": ("ibug",),
    "full": ("lfpw/testset", "helen/testset", "ibug"),
    "private": ("300W/01_Indoor", "300W/02_Outdoor"),
}
SPLITS["test"] = SPLITS["full"]
# the subsets reported by `evaluate`, as in the paper's 300W table
EVAL_SUBSETS = ("common", "challenging", "full")


def parse_pts(path: str | Path) -> np.ndarray:
    """Read a `.pts` file: `version: 1`, `n_points: N`, `{`, N lines `x y`, `}`.

    Returns the points (N, 2) float64 exactly as written (300W's are 1-based). A malformed file raises
    ValueError naming the file and the line.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8", errors="replace")
    # keep line numbers of non-blank lines for error messages
    lines = [(i + 1, line.strip()) for i, line in enumerate(text.splitlines()) if line.strip()]

    def fail(lineno: int, message: str):
        raise ValueError(f"{path}:{lineno}: {message}")

    def header(index: int, key: str) -> str:
        if index >= len(lines):
            fail(len(text.splitlines()) or 1, f"expected '{key}: ...', file ended")
        lineno, line = lines[index]
        name, sep, value = line.partition(":")
        if not sep or name.strip().lower() != key:
            fail(lineno, f"expected '{key}: ...', got {line!r}")
        return value.strip()

    header(0, "version")
    n_text = header(1, "n_points")
    try:
        n = int(n_text)
    except ValueError:
        fail(lines[1][0], f"n_points must be an integer, got {n_text!r}")
    if n < 1:
        fail(lines[1][0], f"n_points must be >= 1, got {n}")
    if len(lines) < 3 or lines[2][1] != "{":
        fail(lines[2][0] if len(lines) > 2 else lines[1][0], "expected '{' after n_points")
    points = np.empty((n, 2), dtype=np.float64)
    for k in range(n):
        if 3 + k >= len(lines):
            fail(lines[-1][0], f"expected {n} points, found {k}")
        lineno, line = lines[3 + k]
        if line == "}":
            fail(lineno, f"expected {n} points, found {k}")
        fields = line.split()
        if len(fields) != 2:
            fail(lineno, f"expected 'x y', got {line!r}")
        try:
            points[k] = [float(fields[0]), float(fields[1])]
        except ValueError:
            fail(lineno, f"coordinates must be numbers, got {line!r}")
        check_coordinates(points[k:k + 1], f"{path}:{lineno}")
    end = 3 + n
    if end >= len(lines) or lines[end][1] != "}":
        fail(lines[end][0] if end < len(lines) else lines[-1][0], f"expected '}}' after {n} points")
    if end + 1 < len(lines):
        fail(lines[end + 1][0], f"unexpected text after '}}': {lines[end + 1][1]!r}")
    return points


def write_pts(path: str | Path, points: np.ndarray) -> None:
    """Write points (N, 2) as a `.pts` file (coordinates as given: pass 1-based ones for 300W)."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    body = "\n".join(f"{x:.3f} {y:.3f}" for x, y in points)
    Path(path).write_text(f"version: 1\nn_points: {len(points)}\n{{\n{body}\n}}\n", encoding="utf-8")


def _find_dir(root: Path, relative: str) -> Path | None:
    """root/relative with every component matched case-insensitively; None if absent."""
    current = root
    for part in relative.split("/"):
        if not current.is_dir():
            return None
        match = next((c for c in sorted(current.iterdir()) if c.is_dir() and c.name.lower() == part.lower()), None)
        if match is None:
            return None
        current = match
    return current


def read_folder(folder: Path, source: str, pts_offset: float = 1.0, markup: str | None = MARKUP) -> list[FaceRecord]:
    """Every `.pts` file directly in `folder` with its image (same stem); points converted to 0-based by
    subtracting `pts_offset`. Missing images raise FileNotFoundError listing them."""
    records, missing = [], []
    for pts in sorted(folder.glob("*.pts")):
        points = parse_pts(pts) - pts_offset
        if markup is not None and len(points) != 68:
            raise ValueError(f"{pts}:2: a 300W file must have 68 points, got {len(points)}")
        image = find_image(pts)
        if image is None:
            missing.append(pts)
            continue
        records.append(FaceRecord(image=image, landmarks=points, markup=markup or MARKUP, source=source,
                                  origin=str(pts)))
    raise_missing(missing, NO_IMAGE)
    return records


def read_300w(root: str | Path, split: str = "train") -> list[FaceRecord]:
    """The faces of one 300W split ("train", "common", "challenging", "full" = "test", "private")."""
    root = Path(root)
    if split not in SPLITS:
        raise ValueError(f"300W split must be one of {sorted(SPLITS)}, got {split!r}")
    if not root.is_dir():
        raise FileNotFoundError(f"300W root {root} is not a directory")
    records: list[FaceRecord] = []
    for relative in SPLITS[split]:
        folder = _find_dir(root, relative)
        if folder is None:
            raise FileNotFoundError(
                f"300W root {root} has no '{relative}' folder (needed by split {split!r}); expected the iBUG "
                f"layout afw/, helen/{{trainset,testset}}/, lfpw/{{trainset,testset}}/, ibug/")
        found = read_folder(folder, source=relative.lower())
        if not found:
            raise ValueError(f"300W folder {folder} holds no .pts files")
        records += found
    return records


def read_300w_subsets(root: str | Path) -> dict[str, list[FaceRecord]]:
    """The evaluation subsets common, challenging and full (and private when its folders are there)."""
    subsets = {name: read_300w(root, name) for name in EVAL_SUBSETS}
    if _find_dir(Path(root), "300W/01_Indoor") is not None:
        subsets["private"] = read_300w(root, "private")
    return subsets
