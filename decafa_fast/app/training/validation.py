"""Validation during training: per-sample NME of a model on a data set, and the mean-shape baseline."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data.markups import derive_from_wflw98
from ..data.synthetic import SyntheticFaces, collate_faces
from ..evaluation.metrics import nme

__all__ = ["evaluate_model", "mean_shape_nme"]


@torch.no_grad()
def evaluate_model(model: nn.Module, dataset: Dataset, markups: tuple[str, ...], device: torch.device,
                   batch_size: int = 32, autocast: bool = False, channels_last: bool = False) -> dict[str, np.ndarray]:
    """Per-sample inter-ocular NME of the last stage for every markup annotated in `dataset`:
    {markup: (N_k,)}. Also "<markup>@stage<i>" for the finest markup at every stage."""
    was_training = model.training
    model.eval()
    errors: dict[str, list[np.ndarray]] = {}
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_faces)
    for batch in loader:
        images = batch["image"].to(device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            outputs = model(images)
        for k, name in enumerate(markups):
            if name not in batch["valid"]:
                continue
            ok = batch["valid"][name]
            if not bool(ok.any()):
                continue
            target = batch["landmarks"][name][ok]
            stages = range(len(outputs)) if k == 0 else [len(outputs) - 1]
            for i in stages:
                key = name if i == len(outputs) - 1 else f"{name}@stage{i + 1}"
                pred = outputs[i][k].float().cpu()[ok]
                errors.setdefault(key, []).append(nme(pred, target, name).numpy())
    model.train(was_training)
    return {k: np.concatenate(v) for k, v in errors.items()}


def mean_shape_nme(train_sets: list[tuple[str, Dataset]], val_set: Dataset, markup: str = "wflw98",
                   count: int = 300) -> float | None:
    """NME (mean over the validation set) of always predicting the mean training shape of `markup`."""
    shapes = []
    for _, ds in train_sets:
        for i in range(min(count, len(ds))):
            s = ds[i]
            if markup in s["landmarks"]:
                shapes.append(s["landmarks"][markup].numpy())
    if not shapes:
        # e.g. synthetic parts annotated with other markups: derive the shape from their 98 points
        for _, ds in train_sets:
            if isinstance(ds, SyntheticFaces):
                shapes += [derive_from_wflw98(ds.raw(i)[1], markup) for i in range(min(count, len(ds)))]
    if not shapes:
        return None
    mean = np.mean(shapes, axis=0)
    targets = [val_set[i]["landmarks"][markup].numpy() for i in range(len(val_set))
               if markup in val_set[i]["landmarks"]]
    if not targets:
        return None
    targets = np.stack(targets)
    return float(np.nanmean(nme(np.broadcast_to(mean, targets.shape).copy(), targets, markup)))
