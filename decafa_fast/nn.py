"""nn.Module wrappers of decafa_fast.ops, and kornia's soft-argmax API on top of them.

`SpatialSoftArgmax2d`, `spatial_soft_argmax2d` and `spatial_softmax2d` take the arguments of their namesakes in
``kornia.geometry.subpix`` (kornia 0.9) and return the same values: the heatmaps are divided by `temperature`
before the softmax over each H x W map (so the ops get beta = 1 / temperature) and normalized coordinates are
in [-1, 1] (a one-pixel axis gives 0).
"""
from __future__ import annotations

import torch
from torch import nn

from . import _torch_private, ops

Temperature = float | torch.Tensor


def _reading_values_is_allowed() -> bool:
    """A tensor's values may be read (a data-dependent branch) outside graph capture and torch.func transforms."""
    return not torch.compiler.is_compiling() and not _torch_private.in_functorch_transform()


def beta_from_temperature(temperature: Temperature | None, heatmaps: torch.Tensor) -> float | torch.Tensor:
    """The ops' beta (inverse temperature) for kornia's `temperature` and heatmaps (B, L, H, W).

    None -> 1.0; a positive number n -> 1 / n (the ops' float path); a tensor -> 1 / temperature as (B, L),
    differentiable, in float32 (float64 for float64 heatmaps) on the heatmaps' device. kornia divides
    (B, L, H*W) heatmaps by the tensor, so the shapes with one value per map are accepted: () and (1,), and
    (L, 1), (B, L, 1), (B, 1, 1), ... whose last size is 1 (the pixel axis) and whose leading sizes broadcast
    to (B, L). A last size other than 1 would be a temperature per pixel, which the ops do not compute.
    Like kornia, a temperature must be positive (a tensor's values are not read under torch.compile or a
    torch.func transform).
    """
    if temperature is None:
        return 1.0
    if not isinstance(temperature, torch.Tensor):
        return 1.0 / _positive_number(temperature)
    if not temperature.is_floating_point():
        raise TypeError(f"a tensor temperature must have a floating dtype, got {temperature.dtype}")
    if not isinstance(heatmaps, torch.Tensor):
        raise TypeError(f"input must be a tensor of shape (B, N, H, W), got {type(heatmaps).__name__}")
    if heatmaps.dim() != 4:
        raise ValueError(f"input must have shape (B, N, H, W), got {tuple(heatmaps.shape)}")
    b, l = heatmaps.shape[:2]
    per_map = temperature
    if per_map.dim() >= 1:
        if per_map.shape[-1] != 1:
            raise ValueError(
                f"temperature of shape {tuple(temperature.shape)} would differ per pixel; give one per map: "
                f"(), (1,), (L, 1) or (B, L, 1) with (B, L) = ({b}, {l})"
            )
        per_map = per_map[..., 0]
    if per_map.dim() > 2 or not _broadcasts(per_map.shape, (b, l)):
        raise ValueError(
            f"temperature of shape {tuple(temperature.shape)} does not broadcast to one value per map: give (), "
            f"(1,), (L, 1) or (B, L, 1) with (B, L) = ({b}, {l})"
        )
    if _reading_values_is_allowed() and not bool((temperature > 0).all()):
        raise ValueError(f"temperature must be positive, got {temperature}")
    acc = torch.float64 if heatmaps.dtype == torch.float64 else torch.float32
    return per_map.to(device=heatmaps.device, dtype=acc).reciprocal().expand(b, l)


def _positive_number(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a positive number or a tensor, got {type(temperature).__name__}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return float(temperature)


def _broadcasts(shape: torch.Size, target: tuple[int, int]) -> bool:
    return all(s in (1, t) for s, t in zip(reversed(shape), reversed(target)))


def spatial_softmax2d(input: torch.Tensor, temperature: Temperature | None = None) -> torch.Tensor:
    """kornia's `spatial_softmax2d`: softmax of input / temperature over each map, (B, N, H, W) -> (B, N, H, W)."""
    return ops.spatial_softmax(input, beta_from_temperature(temperature, input))


def spatial_soft_argmax2d(
    input: torch.Tensor,  # kornia's argument name, so keyword calls carry over
    temperature: Temperature | None = None,
    normalized_coordinates: bool = True,
) -> torch.Tensor:
    """kornia's `spatial_soft_argmax2d`: expected (x, y) of each map under the softmax of input / temperature,
    (B, N, H, W) -> (B, N, 2); in [-1, 1] when normalized_coordinates, else pixels (x the column, y the row)."""
    return ops.soft_argmax(input, beta_from_temperature(temperature, input), bool(normalized_coordinates))


class SpatialSoftArgmax2d(nn.Module):
    """Drop-in for ``kornia.geometry.subpix.SpatialSoftArgmax2d``: (B, N, H, W) heatmaps -> (B, N, 2) as (x, y).

    `temperature` is stored as given, as kornia stores it: an ``nn.Parameter`` becomes a parameter of the
    module (it appears in ``parameters()`` and ``state_dict()`` and trains); any other tensor is kept as an
    attribute, and when it requires grad its gradient reaches it (it is not copied); a number keeps the
    ops' float path. None means 1.0. Tensor shapes: see `beta_from_temperature`.
    """

    def __init__(self, temperature: Temperature | None = None, normalized_coordinates: bool = True) -> None:
        super().__init__()
        if temperature is None:
            temperature = 1.0
        if not isinstance(temperature, torch.Tensor):
            temperature = _positive_number(temperature)  # a bad number fails here rather than at the first call
        self.temperature = temperature  # nn.Module.__setattr__ registers an nn.Parameter
        self.normalized_coordinates = bool(normalized_coordinates)

    def forward(self, heatmaps: torch.Tensor) -> torch.Tensor:
        return spatial_soft_argmax2d(heatmaps, self.temperature, self.normalized_coordinates)

    def extra_repr(self) -> str:
        temperature = self.temperature
        if isinstance(temperature, torch.Tensor):
            temperature = f"tensor of shape {tuple(temperature.shape)}" if temperature.numel() > 1 else (
                f"{temperature.item():g}")
        return f"temperature={temperature}, normalized_coordinates={self.normalized_coordinates}"


class LandmarkAttention(nn.Module):
    """The DeCaFA landmark-attention head: (logits, image, embedding) -> (z, fused).

    logits (B, L, H, W), image (B, Ci, H, W), embedding (B, C, H, W) -> z (B, L, 2) as (x, y) and the fusion
    ``mode`` (F1..F5) of image, embedding and the summed attention mask, (B, channels, H, W). `beta` (inverse
    temperature) is a number or a tensor broadcastable to (B, L) (see decafa_fast.ops); an ``nn.Parameter``
    becomes a parameter of the module.
    """

    def __init__(self, mode: str = "F5", beta: float | torch.Tensor = 1.0, normalized: bool = False) -> None:
        super().__init__()
        if mode not in ops.FUSION_MODES:
            raise ValueError(f"mode must be one of {ops.FUSION_MODES}, got {mode!r}")
        self.mode, self.normalized = mode, bool(normalized)
        self.beta = beta if isinstance(beta, torch.Tensor) else float(beta)

    def forward(
        self, logits: torch.Tensor, image: torch.Tensor, embedding: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.decafa_head(logits, image, embedding, self.mode, self.beta, self.normalized)

    def extra_repr(self) -> str:
        beta = self.beta
        if isinstance(beta, torch.Tensor):
            beta = f"tensor of shape {tuple(beta.shape)}" if beta.numel() > 1 else f"{beta.item():g}"
        return f"mode={self.mode!r}, beta={beta}, normalized={self.normalized}"
