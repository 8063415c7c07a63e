"""What a run trains on and in which order: the training sets, their alternation, and endless batches
whose order is a pure function of their position.

The default data is synthetic faces, split into one part per markup (a 98-, a 68- and a 5-point annotated
part), as the paper alternates batches of data sets annotated with different markups.

Epoch e of a data set is a permutation drawn from a generator seeded by (seed + e), the one
`DistributedSampler` draws, cut into per-rank shards and then into batches. Batch number p of a rank
is therefore known from p alone, so a resumed run only needs the number of batches drawn from each set
to continue exactly where the interrupted one was (no sampler or loader state to save).
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from ..data.synthetic import SyntheticFaces, collate_faces
from ..errors import UserError
from .config import TrainConfig

__all__ = ["BatchOrder", "batches", "build_train_sets", "build_val_set", "fingerprint", "interleave"]


def build_train_sets(config: TrainConfig) -> list[tuple[str, Dataset]]:
    """(name, dataset) pairs whose batches alternate. Synthetic default: one part per markup."""
    if config.data:
        from ..data.real import build_dataset

        return [(spec, build_dataset(spec, "train", config.image_size, config.markups, augment=True,
                                     seed=config.seed)) for spec in config.data]
    per = max(1, config.train_size // len(config.markups))
    return [(f"synthetic-{markup}", SyntheticFaces(per, size=config.image_size, seed=config.seed * 1000 + 1 + k,
                                                   markups=config.markups, annotate=(markup,)))
            for k, markup in enumerate(config.markups)]


def build_val_set(config: TrainConfig) -> Dataset:
    if config.val_data:
        from ..data.real import build_dataset

        return build_dataset(config.val_data, "test", config.image_size, config.markups, seed=config.seed)
    # a seed range never used for training
    return SyntheticFaces(config.val_size, size=config.image_size, seed=config.seed * 1000 + 999,
                          markups=config.markups)


def interleave(weights: tuple[int, ...]) -> list[int]:
    """One turn of the alternation, data set k appearing weights[k] times, spread out by smooth weighted
    round robin: (2, 1, 1) -> [0, 1, 2, 0]; (1, 1, 1) -> [0, 1, 2]."""
    total, current, cycle = sum(weights), [0] * len(weights), []
    for _ in range(total):
        current = [c + w for c, w in zip(current, weights)]
        k = max(range(len(weights)), key=lambda i: current[i])
        current[k] -= total
        cycle.append(k)
    return cycle


class BatchOrder:
    """Indices of batch `position` for one rank of `world_size`.

    Each epoch uses the first `world_size * per_rank` samples of its permutation (the rest are dropped, as
    `DistributedSampler(drop_last=True)` does); a rank's shard is cut into full batches, or into one
    smaller batch when the shard is smaller than a batch."""

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        per_rank = size // world_size
        if per_rank < 1:
            raise UserError(f"a training set of {size} sample(s) cannot feed {world_size} processes; "
                            f"give it at least {world_size} samples")
        self.size, self.seed, self.rank, self.world_size = size, seed, rank, world_size
        self.batch_size = min(batch_size, per_rank)
        self.per_rank = per_rank
        self.batches_per_epoch = per_rank // self.batch_size

    def indices(self, position: int) -> list[int]:
        epoch, k = divmod(position, self.batches_per_epoch)
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch))
        shard = order[: self.per_rank * self.world_size][self.rank:: self.world_size]
        return shard[k * self.batch_size: (k + 1) * self.batch_size].tolist()


class _FromPosition(torch.utils.data.Sampler):
    """Batch sampler: the batches of `order` from `start` on, without end."""

    def __init__(self, order: BatchOrder, start: int) -> None:
        self.order, self.start = order, start

    def __iter__(self) -> Iterator[list[int]]:
        position = self.start
        while True:
            yield self.order.indices(position)
            position += 1


def batches(dataset: Dataset, order: BatchOrder, start: int = 0, workers: int = 0) -> Iterator[dict]:
    """Collated batches of `dataset` in `order`, from batch number `start` on (endless)."""
    loader = DataLoader(dataset, batch_sampler=_FromPosition(order, start), collate_fn=collate_faces,
                        num_workers=workers)
    return iter(loader)


def fingerprint(datasets: list[Dataset]) -> str:
    """A short hash of what the training sets hold (their sizes, and the first and last face of each: the
    synthetic image and points, or a real record's file and points), read without drawing any random
    number. A resumed run compares it with its checkpoint's: another synthetic generator or other files
    mean the run cannot continue as the original would have."""
    digest = hashlib.sha256()

    def add(ds: Dataset) -> None:
        digest.update(f"{type(ds).__name__}:{len(ds)};".encode())
        if isinstance(ds, ConcatDataset):
            for part in ds.datasets:
                add(part)
            return
        ends = sorted({0, len(ds) - 1}) if len(ds) else []
        for i in ends:
            if isinstance(ds, SyntheticFaces):
                image, points = ds.raw(i)
                digest.update(np.ascontiguousarray(image).tobytes() + np.asarray(points, np.float64).tobytes())
            elif hasattr(ds, "records"):
                record = ds.records[i]
                digest.update(str(record.image).encode() + np.asarray(record.landmarks, np.float64).tobytes())

    for ds in datasets:
        add(ds)
    return digest.hexdigest()[:16]
