"""Transfer layers: 1x1 convolutions from a stage's embedding to landmark logits, one per markup.

Markups come in decreasing landmark count (98 -> 68 -> 5). "chained": transfer k+1 reads transfer k's
logits (so coarse markups also train the finer transfers); "independent": every transfer reads the
embedding.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["TransferLayers", "TRANSFER_MODES"]

TRANSFER_MODES = ("chained", "independent")


class TransferLayers(nn.Module):
    """embedding (B, C, H, W) -> list over markups of logits (B, L_k, H, W)."""

    def __init__(self, embedding_channels: int, n_points: tuple[int, ...], mode: str = "chained") -> None:
        super().__init__()
        if mode not in TRANSFER_MODES:
            raise ValueError(f"transfer must be one of {TRANSFER_MODES}, got {mode!r}")
        if not n_points:
            raise ValueError("at least one markup is needed")
        self.mode = mode
        layers = []
        cin = embedding_channels
        for n in n_points:
            layers.append(nn.Conv2d(cin, n, kernel_size=1))
            if mode == "chained":
                cin = n
        self.layers = nn.ModuleList(layers)

    def forward(self, embedding: torch.Tensor) -> list[torch.Tensor]:
        logits = []
        x = embedding
        for layer in self.layers:
            t = layer(x if self.mode == "chained" else embedding)
            logits.append(t)
            x = t
        return logits
