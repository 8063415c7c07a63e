"""CelebA: five landmarks per image (left eye, right eye, nose, left and right mouth corners).

Files (found anywhere under ROOT, e.g. the official Anno/, Eval/ and Img/ folders):
```
list_landmarks_align_celeba.txt   line 1: the number of images; line 2: the ten column names;
                                  then "000001.jpg x1 y1 ... x5 y5" per image (pixels of the aligned image)
list_eval_partition.txt           "000001.jpg 0" per image: 0 train, 1 validation, 2 test
img_align_celeba/                 the aligned 178 x 218 images
```
If the aligned list is absent, the in-the-wild `list_landmarks_celeba.txt` with `img_celeba/` is used.
Coordinates are used as written (taken as 0-based pixels).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .records import FaceRecord, check_coordinates, raise_missing

MARKUP = "celeba5"
N_POINTS = 5
SPLITS = {"train": 0, "val": 1, "test": 2}
VARIANTS = (("list_landmarks_align_celeba.txt", "img_align_celeba"), ("list_landmarks_celeba.txt", "img_celeba"))


def parse_landmarks_file(path: str | Path) -> dict[str, np.ndarray]:
    """list_landmarks_*.txt -> {image name: (5, 2) float64}; ValueError with the file and line if malformed."""
    path = Path(path)
    result: dict[str, np.ndarray] = {}
    with open(path, encoding="utf-8", errors="replace") as f:  # a binary file fails on its first line
        lines = f.read().splitlines()
    if len(lines) < 2:
        raise ValueError(f"{path}:{len(lines) or 1}: expected the image count and a header line")
    try:
        count = int(lines[0].strip())
    except ValueError:
        raise ValueError(f"{path}:1: expected the number of images, got {lines[0]!r}") from None
    if len(lines[1].split()) != 2 * N_POINTS:
        raise ValueError(f"{path}:2: expected {2 * N_POINTS} column names, got {lines[1]!r}")
    for lineno, line in enumerate(lines[2:], start=3):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 1 + 2 * N_POINTS:
            raise ValueError(f"{path}:{lineno}: expected an image name and {2 * N_POINTS} numbers, "
                             f"got {len(fields)} fields")
        try:
            points = np.array([float(v) for v in fields[1:]], dtype=np.float64).reshape(N_POINTS, 2)
        except ValueError as e:
            raise ValueError(f"{path}:{lineno}: {e}") from None
        check_coordinates(points, f"{path}:{lineno}")
        result[fields[0]] = points
    if len(result) != count:
        raise ValueError(f"{path}:1: header says {count} images, the file lists {len(result)}")
    return result


def parse_partition_file(path: str | Path) -> dict[str, int]:
    """list_eval_partition.txt -> {image name: 0 | 1 | 2}."""
    path = Path(path)
    result: dict[str, int] = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2 or fields[1] not in ("0", "1", "2"):
                raise ValueError(f"{path}:{lineno}: expected 'image_name 0|1|2', got {line.strip()!r}")
            result[fields[0]] = int(fields[1])
    return result


def _find_one(root: Path, name: str, directory: bool = False) -> Path | None:
    direct = root / name
    if direct.is_dir() if directory else direct.is_file():
        return direct
    for found in sorted(root.rglob(name)):
        if found.is_dir() if directory else found.is_file():
            return found
    return None


def read_celeba(root: str | Path, split: str = "train") -> list[FaceRecord]:
    """The faces of one CelebA split ("train", "val", "test", or "all" without the partition file)."""
    root = Path(root)
    if split not in SPLITS and split != "all":
        raise ValueError(f"CelebA split must be one of {sorted(SPLITS) + ['all']}, got {split!r}")
    if not root.is_dir():
        raise FileNotFoundError(f"CelebA root {root} is not a directory")
    found = [(_find_one(root, name), images) for name, images in VARIANTS]
    landmarks_file, images_name = next(((f, images) for f, images in found if f is not None), (None, None))
    if landmarks_file is None:
        raise FileNotFoundError(f"no list_landmarks_align_celeba.txt (or list_landmarks_celeba.txt) under {root}")
    image_dir = _find_one(root, images_name, directory=True)
    if image_dir is None:
        raise FileNotFoundError(f"no {images_name}/ folder under {root} (needed by {landmarks_file.name})")
    landmarks = parse_landmarks_file(landmarks_file)
    names = sorted(landmarks)
    if split != "all":
        partition_file = _find_one(root, "list_eval_partition.txt")
        if partition_file is None:
            raise FileNotFoundError(f"no list_eval_partition.txt under {root} (needed for split {split!r})")
        partition = parse_partition_file(partition_file)
        unlisted = [n for n in names if n not in partition]
        if unlisted:
            raise ValueError(f"{partition_file}: {len(unlisted)} image(s) of {landmarks_file.name} are not "
                             f"listed, e.g. {unlisted[0]}")
        names = [n for n in names if partition[n] == SPLITS[split]]
    on_disk = {p.name for p in image_dir.iterdir()}  # one listing instead of 200k stat calls
    raise_missing([image_dir / n for n in names if n not in on_disk])
    return [FaceRecord(image=image_dir / n, landmarks=landmarks[n], markup=MARKUP, source=split,
                       origin=f"{landmarks_file} ({n})") for n in names]


def write_celeba_files(root: str | Path, landmarks: dict[str, np.ndarray], partition: dict[str, int]) -> None:
    """Write list_landmarks_align_celeba.txt and list_eval_partition.txt in CelebA's format (fixtures,
    conversions)."""
    root = Path(root)
    header = "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y rightmouth_x rightmouth_y"
    rows = [f"{name} " + " ".join(str(int(round(v))) for v in np.asarray(p).reshape(-1))
            for name, p in sorted(landmarks.items())]
    (root / "list_landmarks_align_celeba.txt").write_text("\n".join([str(len(rows)), header] + rows) + "\n")
    (root / "list_eval_partition.txt").write_text("\n".join(f"{n} {s}" for n, s in sorted(partition.items())) + "\n")
