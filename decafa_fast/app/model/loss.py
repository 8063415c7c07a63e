"""The DeCaFA training loss, eq. (10): sum_i lambda_i sum_k (1/L_k) |z_i^k - z^k*|_1.

Only the markups a sample is annotated with count (per-sample masks), so one batch may mix 98-, 68- and
5-point samples. The L1 norm sums |dx| + |dy| over the L_k points; dividing by L_k weighs markups alike.
The result is averaged over the batch.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

__all__ = ["decafa_loss"]


def decafa_loss(
    outputs: Sequence[Sequence[torch.Tensor]],
    targets: Mapping[str, torch.Tensor],
    valid: Mapping[str, torch.Tensor],
    markups: Sequence[str],
    lambdas: Sequence[float],
    scale: float = 1.0,
) -> torch.Tensor:
    """Weighted intermediate supervision.

    outputs: list over S stages of list over K markups of z (B, L_k, 2), as DeCaFA returns.
    targets: markup name -> ground truth (B, L_k, 2) (any values where not annotated).
    valid: markup name -> (B,) bool, True where the sample is annotated with that markup.
      Markups missing from `targets` count as unannotated for every sample.
    lambdas: S stage weights. scale: multiplies coordinates (e.g. 1/image_size to work in image units).
    Returns a scalar: the per-sample loss summed over stages and markups, averaged over the batch.
    """
    if len(outputs) != len(lambdas):
        raise ValueError(f"got {len(outputs)} stages of outputs but {len(lambdas)} lambdas")
    if not outputs:
        raise ValueError("outputs must hold at least one stage")
    batch = outputs[0][0].shape[0]
    device = outputs[0][0].device
    total = torch.zeros((), device=device, dtype=torch.float32)
    for k, name in enumerate(markups):
        if name not in targets:
            continue
        target = targets[name]
        mask = valid[name].to(device=device, dtype=torch.bool)
        if mask.shape != (batch,):
            raise ValueError(f"valid[{name!r}] must have shape ({batch},), got {tuple(mask.shape)}")
        if not bool(mask.any()):
            continue  # nothing annotated: skip without touching the (possibly garbage) targets
        target = target.to(device=device, dtype=torch.float32)
        # zero the unannotated targets so NaN placeholders cannot leak through the masked sum
        target = torch.where(mask[:, None, None], target, torch.zeros_like(target))
        for lam, stage in zip(lambdas, outputs):
            z = stage[k]
            if z.shape != target.shape:
                raise ValueError(f"markup {name!r}: prediction {tuple(z.shape)} vs target {tuple(target.shape)}")
            per_sample = (z.float() - target).abs().sum(dim=(1, 2)) / z.shape[1]
            total = total + lam * scale * (per_sample * mask).sum()
    return total / max(batch, 1)
