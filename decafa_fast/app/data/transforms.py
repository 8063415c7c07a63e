"""Image / landmark augmentations.

Images are numpy float32 arrays (H, W) in [0, 1] unless a function says it takes tensors. Landmarks are
(L, 2) pixel coordinates, x = column, y = row. Random functions take a numpy Generator, so that a
caller seeding the generator gets the same result every time.
"""
from __future__ import annotations

from collections.abc import Mapping

import cv2
import numpy as np
import torch

from .markups import get_markup

__all__ = [
    "hflip_points",
    "hflip",
    "hflip_batch",
    "affine_points",
    "lighting_gradient",
    "gaussian_blur",
    "gaussian_noise",
    "occlude",
]


def hflip_points(points, width: int, markup: str):
    """Mirror (..., L, 2) points of `markup` in an image `width` pixels wide: x -> W - 1 - x, then the
    markup's flip permutation restores the index meaning (point i of the mirror is point perm[i])."""
    perm = list(get_markup(markup).flip_permutation)
    if points.shape[-2] != len(perm):
        raise ValueError(f"markup {markup!r} has {len(perm)} points, got shape {tuple(points.shape)}")
    out = points[..., perm, :]
    out = out.copy() if isinstance(out, np.ndarray) else out.clone()
    out[..., 0] = (width - 1) - out[..., 0]
    return out


def hflip(image, landmarks: Mapping[str, object]):
    """Mirror one image ((H, W) or (C, H, W), numpy or tensor) and its landmarks {markup: (L, 2)}."""
    width = image.shape[-1]
    flipped = np.ascontiguousarray(image[..., ::-1]) if isinstance(image, np.ndarray) else image.flip(-1)
    return flipped, {name: hflip_points(p, width, name) for name, p in landmarks.items()}


def hflip_batch(
    images: torch.Tensor, landmarks: Mapping[str, torch.Tensor], flags: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mirror the samples of a batch where flags (B,) is True: images (B, C, H, W), landmarks
    {markup: (B, L, 2)} -> new tensors (inputs are not modified)."""
    flags = flags.to(images.device, torch.bool)
    width = images.shape[-1]
    images = torch.where(flags[:, None, None, None], images.flip(-1), images)
    out = {}
    for name, pts in landmarks.items():
        out[name] = torch.where(flags[:, None, None], hflip_points(pts, width, name), pts)
    return images, out


def affine_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """Apply a 2x3 affine matrix (as cv2.warpAffine takes) to (L, 2) points."""
    return points @ matrix[:, :2].T + matrix[:, 2]


def lighting_gradient(image: np.ndarray, rng: np.random.Generator, strength: float = 0.5) -> np.ndarray:
    """Multiply by a linear ramp in a random direction (light from one side), plus brightness/contrast."""
    h, w = image.shape
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    ramp = ((xs - w / 2) * np.cos(angle) + (ys - h / 2) * np.sin(angle)) / max(h, w)
    gain = 1.0 + rng.uniform(-strength, strength) * ramp
    contrast = rng.uniform(0.7, 1.2)
    bias = rng.uniform(-0.1, 0.1)
    return np.clip((image - 0.5) * contrast + 0.5 + bias, 0, 1) * gain


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur with standard deviation `sigma` pixels (no-op for sigma <= 0.1)."""
    if sigma <= 0.1:
        return image
    return cv2.GaussianBlur(image, (0, 0), sigmaX=float(sigma), borderType=cv2.BORDER_REFLECT)


def gaussian_noise(image: np.ndarray, rng: np.random.Generator, std: float) -> np.ndarray:
    """Add N(0, std^2) noise per pixel."""
    return image + rng.normal(0.0, std, size=image.shape).astype(np.float32)


def occlude(image: np.ndarray, rng: np.random.Generator, count: int = 1, max_fraction: float = 0.3) -> np.ndarray:
    """Paint `count` random rectangles / ellipses of random grey level (and stripes) over the image."""
    h, w = image.shape
    out = image.copy()
    for _ in range(count):
        rw = int(rng.uniform(0.08, max_fraction) * w) + 1
        rh = int(rng.uniform(0.08, max_fraction) * h) + 1
        x0 = int(rng.uniform(0, w - rw / 2))
        y0 = int(rng.uniform(0, h - rh / 2))
        value = float(rng.uniform(0, 1))
        if rng.random() < 0.5:
            cv2.rectangle(out, (x0, y0), (x0 + rw, y0 + rh), value, thickness=-1)
        else:
            cv2.ellipse(out, (x0, y0), (rw // 2 + 1, rh // 2 + 1), float(rng.uniform(0, 180)), 0, 360, value, -1)
        if rng.random() < 0.3:  # stripes make the occluder textured, like hair or fingers
            step = max(2, rw // 4)
            for x in range(x0, x0 + rw, step):
                cv2.line(out, (x, y0), (x, y0 + rh), float(rng.uniform(0, 1)), max(1, step // 3))
    return out
