"""nn.Module wrappers of decafa_fast.ops."""
from __future__ import annotations

import torch
from torch import nn

from . import ops


class SpatialSoftArgmax2d(nn.Module):
    """Drop-in for ``kornia.geometry.subpix.SpatialSoftArgmax2d``: (B, N, H, W) heatmaps -> (B, N, 2) as (x, y).

    As in kornia, the heatmaps are divided by ``temperature`` before the softmax (so beta = 1 / temperature)
    and ``normalized_coordinates=True`` returns coordinates in [-1, 1]. The temperature is a positive Python
    number (a tensor temperature would have to be read back from the device on every call).
    """

    def __init__(self, temperature: float | None = None, normalized_coordinates: bool = True) -> None:
        super().__init__()
        if temperature is None:
            temperature = 1.0
        if isinstance(temperature, torch.Tensor):
            if temperature.numel() != 1:
                raise ValueError(f"temperature must be a scalar, got shape {tuple(temperature.shape)}")
            temperature = float(temperature)
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = float(temperature)
        self.normalized_coordinates = bool(normalized_coordinates)

    def forward(self, heatmaps: torch.Tensor) -> torch.Tensor:
        return ops.soft_argmax(heatmaps, beta=1.0 / self.temperature, normalized=self.normalized_coordinates)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, normalized_coordinates={self.normalized_coordinates}"


class LandmarkAttention(nn.Module):
    """The DeCaFA landmark-attention head: (logits, image, embedding) -> (z, fused).

    logits (B, L, H, W), image (B, Ci, H, W), embedding (B, C, H, W) -> z (B, L, 2) as (x, y) and the fusion
    ``mode`` (F1..F5) of image, embedding and the summed attention mask, (B, channels, H, W).
    """

    def __init__(self, mode: str = "F5", beta: float = 1.0, normalized: bool = False) -> None:
        super().__init__()
        if mode not in ops.FUSION_MODES:
            raise ValueError(f"mode must be one of {ops.FUSION_MODES}, got {mode!r}")
        self.mode, self.beta, self.normalized = mode, float(beta), bool(normalized)

    def forward(
        self, logits: torch.Tensor, image: torch.Tensor, embedding: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.decafa_head(logits, image, embedding, self.mode, self.beta, self.normalized)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, beta={self.beta}, normalized={self.normalized}"
