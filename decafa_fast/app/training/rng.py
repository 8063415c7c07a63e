"""Every random generator a training process draws from, captured and restored for exact resume.

Captured: python's `random`, numpy's global generator, torch's CPU (and CUDA) generators, the trainer's
own generators (the flip generator) and the numpy generators data sets hold for their augmentation
(attributes of type `np.random.Generator`, inside `ConcatDataset`s too). States are stored as tensors,
plain ints and JSON text so that checkpoints load with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import json
import random

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset

__all__ = ["capture_rng", "restore_rng"]


def _dataset_generators(dataset: Dataset) -> list[np.random.Generator]:
    if isinstance(dataset, ConcatDataset):
        return [g for part in dataset.datasets for g in _dataset_generators(part)]
    return [value for _, value in sorted(vars(dataset).items()) if isinstance(value, np.random.Generator)]


def capture_rng(generators: dict[str, torch.Generator], datasets: list[Dataset]) -> dict:
    """The state of every generator of this process (see the module docstring)."""
    version, mt_state, gauss = random.getstate()
    kind, key, pos, has_gauss, cached_gauss = np.random.get_state(legacy=True)
    return {
        "python": [version, list(mt_state), gauss],
        "numpy": {"key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gauss": float(cached_gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": {name: g.get_state() for name, g in generators.items()},
        "datasets": [json.dumps(g.bit_generator.state) for ds in datasets for g in _dataset_generators(ds)],
    }


def restore_rng(state: dict, generators: dict[str, torch.Generator], datasets: list[Dataset]) -> None:
    """Put back what `capture_rng` returned (the same generators and data sets, in the same order)."""
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, g in generators.items():
        g.set_state(state["generators"][name])
    held = [g for ds in datasets for g in _dataset_generators(ds)]
    if len(held) != len(state["datasets"]):
        raise ValueError(f"the data sets hold {len(held)} random generator(s), the checkpoint "
                         f"{len(state['datasets'])}")
    for g, text in zip(held, state["datasets"]):
        g.bit_generator.state = json.loads(text)
