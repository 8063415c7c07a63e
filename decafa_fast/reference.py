"""Plain-PyTorch oracle of every decafa_fast op, written for clarity rather than speed.

Every test and benchmark compares against these functions. They use nothing but torch, work in any
floating dtype (float64 included, for gradcheck) and get their gradients from autograd. Reductions run in
float32 (or float64 for float64 inputs) and results are cast back to the input dtype, as the fused ops do.

Shapes: logits T (B, L, H, W); image I (B, Ci, H, W); embedding E (B, C, H, W); mask M (B, 1, H, W).
Coordinates: x is the column, y the row, 0-based; normalized=True maps to [-1, 1] (x_n = 2 x / (W - 1) - 1).
"""
from __future__ import annotations

import torch

FUSION_MODES = ("F1", "F2", "F3", "F4", "F5")


def _accumulation_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def pixel_grid(h: int, w: int, normalized: bool, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Column (x) and row (y) coordinates of every pixel, each of shape (H*W,), in row-major order."""

    def axis(n: int) -> torch.Tensor:
        if normalized:
            # linspace(-1, 1, 1) is [-1], which is also what kornia gives for a one-pixel axis
            return torch.linspace(-1.0, 1.0, n, device=device, dtype=dtype)
        return torch.arange(n, device=device, dtype=dtype)

    ys, xs = torch.meshgrid(axis(h), axis(w), indexing="ij")
    return xs.reshape(-1), ys.reshape(-1)


def spatial_softmax(logits: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Eq. (1): softmax of beta * T over the H*W pixels of each (b, l) map. Returns Phi (B, L, H, W)."""
    b, l, h, w = logits.shape
    flat = logits.to(_accumulation_dtype(logits)).reshape(b, l, h * w) * beta
    return torch.softmax(flat, dim=-1).reshape(b, l, h, w).to(logits.dtype)


def soft_argmax(logits: torch.Tensor, beta: float = 1.0, normalized: bool = False) -> torch.Tensor:
    """Eqs. (1)+(2): expected (x, y) under Phi for each map. Returns z (B, L, 2).

    Computed from the column and row marginals of Phi (sum over rows, then over columns): the same value as
    sum_p Phi_p x_p, but summing H or W terms at a time keeps float32 accurate on flat 128 x 128 maps.
    """
    h, w = logits.shape[2:]
    acc = _accumulation_dtype(logits)
    phi = spatial_softmax(logits.to(acc), beta)
    xs = pixel_grid(1, w, normalized, logits.device, acc)[0]
    ys = pixel_grid(h, 1, normalized, logits.device, acc)[1]
    z = torch.stack([phi.sum(dim=2) @ xs, phi.sum(dim=3) @ ys], dim=-1)
    return z.to(logits.dtype)


def attention_mask(logits: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """The summed attention mask M = sum_l Phi_l. Returns (B, 1, H, W)."""
    acc = _accumulation_dtype(logits)
    phi = spatial_softmax(logits.to(acc), beta)
    return phi.sum(dim=1, keepdim=True).to(logits.dtype)


def landmark_attention(
    logits: torch.Tensor, beta: float = 1.0, normalized: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft-argmax coordinates and the summed mask together: (z (B, L, 2), M (B, 1, H, W))."""
    return soft_argmax(logits, beta, normalized), attention_mask(logits, beta)


def fuse(image: torch.Tensor, embedding: torch.Tensor, mask: torch.Tensor, mode: str = "F5") -> torch.Tensor:
    """Eqs. (4)-(8), channel concatenation (‖) of:
    F1 = E;  F2 = I*M;  F3 = I ‖ I*M;  F4 = I ‖ I*M ‖ E*M;  F5 = I ‖ I*M ‖ E ‖ E*M.
    """
    i, e, m = image, embedding, mask
    parts = {
        "F1": [e],
        "F2": [i * m],
        "F3": [i, i * m],
        "F4": [i, i * m, e * m],
        "F5": [i, i * m, e, e * m],
    }
    if mode not in parts:
        raise ValueError(f"mode must be one of {FUSION_MODES}, got {mode!r}")
    return torch.cat(parts[mode], dim=1)


def decafa_head(
    logits: torch.Tensor,
    image: torch.Tensor,
    embedding: torch.Tensor,
    mode: str = "F5",
    beta: float = 1.0,
    normalized: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax + moments + mask + fusion: (z (B, L, 2), F (B, channels(mode), H, W))."""
    z, m = landmark_attention(logits, beta, normalized)
    return z, fuse(image, embedding, m, mode)


def fused_channels(mode: str, image_channels: int, embedding_channels: int) -> int:
    """Number of channels of fuse(I, E, M, mode)."""
    ci, c = image_channels, embedding_channels
    counts = {"F1": c, "F2": ci, "F3": 2 * ci, "F4": 2 * ci + c, "F5": 2 * ci + 2 * c}
    if mode not in counts:
        raise ValueError(f"mode must be one of {FUSION_MODES}, got {mode!r}")
    return counts[mode]
