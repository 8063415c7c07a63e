"""Real face-alignment data: the table of readers (one per KIND of a `KIND:PATH` spec) and the cropping Dataset.

A data spec names a data set on the command line:
```
300w:/data/300W        (iBUG layout: afw/, helen/, lfpw/, ibug/)
wflw:/data/WFLW        (WFLW_annotations/ and WFLW_images/)
celeba:/data/CelebA    (list_landmarks_align_celeba.txt, list_eval_partition.txt, img_align_celeba/)
folder:/data/mine      (images with .pts or .json beside them)
synthetic:2000         (N procedural faces, decafa_fast.app.data.synthetic)
```
Several specs can be joined with "+" for training on more than one data set at once
(e.g. `300w:/d/300W+wflw:/d/WFLW`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset

from . import celeba, folder, w300, wflw
from .crop import CROP_SIZE, FaceCrop, crop_from_landmarks, read_image, to_gray
from .records import IMAGE_EXTENSIONS, NO_IMAGE, FaceRecord, check_inside_image, find_image, raise_missing
from .synthetic import SyntheticFaces
from .transforms import hflip

# re-exported: the record and its helpers live in the leaf module `records`
__all__ = ["FaceRecord", "FaceDataset", "IMAGE_EXTENSIONS", "NO_IMAGE", "READERS", "KINDS", "Reader",
           "build_dataset", "find_image", "parse_data_spec", "raise_missing", "read_eval_subsets", "read_records",
           "record_crop"]

# Held-out synthetic faces for evaluation use seeds far from the training ones.
SYNTHETIC_EVAL_SEED = 1_000_003


@dataclass(frozen=True)
class Reader:
    """How one kind of data set is read: `split(path, split)` -> records of a split ("train", "test", ...),
    `subsets(path)` -> {name: records}, the test subsets `evaluate` reports."""

    split: Callable[[str, str], list[FaceRecord]]
    subsets: Callable[[str], dict[str, list[FaceRecord]]]


# The one table of real-data readers: KIND of a KIND:PATH spec -> its reader.
READERS: dict[str, Reader] = {
    "300w": Reader(w300.read_300w, w300.read_300w_subsets),
    "wflw": Reader(wflw.read_wflw, wflw.read_wflw_subsets),
    "celeba": Reader(celeba.read_celeba, lambda path: {"test": celeba.read_celeba(path, "test")}),
    "folder": Reader(lambda path, split: folder.read_annotated_folder(path),
                     lambda path: {"all": folder.read_annotated_folder(path)}),
}
KINDS = (*READERS, "synthetic")


def record_crop(record: FaceRecord, size: int = CROP_SIZE) -> FaceCrop:
    """The crop used for training and evaluation: the landmarks' box with the markup's margin."""
    return crop_from_landmarks(record.landmarks, record.markup, size)


class FaceDataset(Dataset):
    """Annotated real faces cropped to `size` x `size` grayscale, in the item format of `SyntheticFaces`
    (so `collate_faces` batches them with synthetic faces or other data sets), plus the crop transform.

    Item: "image" (1, size, size) float32 in [0, 1]; "landmarks" {markup: (L, 2) float32 crop pixels} for
    the face's own markup; "mask" {markup: bool} over `markups` (every markup the model predicts: True for
    the face's own); "crop" (2, 3) float64, the image -> crop matrix; "index" int.
    augment: random horizontal flips and a jitter of the crop (rotation, scale, shift), drawn from a
    generator seeded by `seed`.
    """

    def __init__(self, records: list[FaceRecord], size: int = CROP_SIZE, markups: tuple[str, ...] | None = None,
                 augment: bool = False, seed: int = 0):
        self.records = list(records)
        self.size = int(size)
        self.markups = tuple(markups) if markups is not None else tuple(sorted({r.markup for r in self.records}))
        unknown = {r.markup for r in self.records} - set(self.markups)
        if unknown:
            raise ValueError(f"records have markups {sorted(unknown)} that are not in markups={self.markups}")
        self.augment = bool(augment)
        self._rng = np.random.default_rng([int(seed), 0xFACE])

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        crop = record_crop(record, self.size)
        if self.augment:
            crop = jitter_crop(crop, self._rng)
        gray = to_gray(read_image(record.image))
        check_inside_image(record, *gray.shape)
        patch = crop.warp(gray)
        image = torch.from_numpy(patch.astype(np.float32) / 255.0)[None]
        landmarks = {record.markup: torch.from_numpy(crop.to_crop(record.landmarks).astype(np.float32))}
        if self.augment and self._rng.random() < 0.5:
            image, landmarks = hflip(image, landmarks)
        return {"image": image, "landmarks": landmarks, "mask": {m: m == record.markup for m in self.markups},
                "crop": torch.from_numpy(crop.matrix.copy()), "index": index}


def jitter_crop(crop: FaceCrop, rng: np.random.Generator, rotation: float = 15.0, scale: float = 0.1,
                shift: float = 0.05) -> FaceCrop:
    """A randomly perturbed crop: rotation up to +-`rotation` degrees, scale up to +-`scale`, shift up to
    +-`shift` of the side, all about the crop centre (training augmentation)."""
    c = (crop.size - 1) / 2
    m = cv2.getRotationMatrix2D((c, c), rng.uniform(-rotation, rotation), 1.0 + rng.uniform(-scale, scale))
    m[:, 2] += rng.uniform(-shift, shift, 2) * crop.size
    combined = m @ np.vstack([crop.matrix, [0.0, 0.0, 1.0]])
    return FaceCrop(combined, crop.size)


# ------------------------------------------------------------------------------------------------------
# KIND:PATH specs
# ------------------------------------------------------------------------------------------------------
def parse_data_spec(spec: str) -> tuple[str, str]:
    """Split "KIND:PATH" into (kind, path); kind is one of KINDS (case-insensitive)."""
    kind, sep, rest = str(spec).partition(":")
    kind = kind.strip().lower()
    if not sep or kind not in KINDS or not rest:
        raise ValueError(f"data spec must be KIND:PATH with KIND one of {KINDS} (e.g. 300w:/data/300W or "
                         f"synthetic:500), got {spec!r}")
    if kind == "synthetic":
        try:
            n = int(rest)
        except ValueError:
            raise ValueError(f"synthetic data spec must be synthetic:N with an integer N, got {spec!r}") from None
        if n < 1:
            raise ValueError(f"synthetic data spec needs N >= 1, got {spec!r}")
    return kind, rest


def read_records(spec: str, split: str = "train") -> list[FaceRecord]:
    """The annotated faces of one split of a real data set ("train" or "test"; "val" for CelebA)."""
    kind, path = parse_data_spec(spec)
    if kind not in READERS:
        raise ValueError(f"{kind!r} data has no records on disk")
    return READERS[kind].split(path, split)


def read_eval_subsets(spec: str) -> dict[str, list[FaceRecord]]:
    """The test subsets reported for a real data set, as in the paper's tables:
    300W common/challenging/full; WFLW test and its six attribute subsets; CelebA test; folder all."""
    kind, path = parse_data_spec(spec)
    if kind not in READERS:
        raise ValueError(f"{kind!r} data has no records on disk")
    return READERS[kind].subsets(path)


def build_dataset(spec: str, split: str = "train", size: int = CROP_SIZE,
                  markups: tuple[str, ...] = ("wflw98", "300w68", "celeba5"), augment: bool = False,
                  seed: int = 0) -> Dataset:
    """A Dataset for a spec (several joined with "+", e.g. "300w:/d/300W+wflw:/d/WFLW"): real data cropped
    to `size`, or `synthetic:N` faces (seeded with `seed`). `markups`: every markup the model predicts.
    Items follow `SyntheticFaces`; batch them with `decafa_fast.app.data.collate_faces`."""
    parts = [p for p in str(spec).split("+") if p]
    if not parts:
        raise ValueError("empty data spec")
    datasets = []
    for part in parts:
        kind, rest = parse_data_spec(part)
        if kind == "synthetic":
            datasets.append(SyntheticFaces(int(rest), size=size, seed=seed, markups=markups, augment=augment))
        else:
            datasets.append(FaceDataset(read_records(part, split), size, markups, augment=augment, seed=seed))
    return datasets[0] if len(datasets) == 1 else ConcatDataset(datasets)

