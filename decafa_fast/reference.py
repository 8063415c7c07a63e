"""Plain-PyTorch oracle of every decafa_fast op, written for clarity rather than speed.

Every test and benchmark compares against these functions. They use nothing but torch, work in any
floating dtype (float64 included, for gradcheck) and get their gradients, of any order, forward mode and
under torch.func transforms, from autograd. Reductions run in float32 (or float64 for float64 inputs) and
results are cast back to the input dtype, as the fused ops do.

Shapes: logits T (B, L, H, W); image I (B, Ci, H, W); embedding E (B, C, H, W); mask M (B, 1, H, W).
Coordinates: x is the column, y the row, 0-based; normalized=True maps to [-1, 1] (x_n = 2 x / (W - 1) - 1;
a one-pixel axis gives 0, its centre, as kornia does).
`beta` (inverse temperature) is a number or a tensor broadcastable to (B, L): see `expand_beta`.
"""
from __future__ import annotations

import torch

from .contract.layout import fused_memory_format, fusion_layout, mode_number

Beta = float | torch.Tensor


def _accumulation_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def expand_beta(beta: torch.Tensor, b: int, l: int) -> torch.Tensor:
    """A tensor beta as (B, L), one value per map. Accepted shapes: () or (1,), (L,), (L, 1) (kornia's
    per-map temperature; a 2-d tensor whose last size is 1 is read this way when L > 1), (B, L) and
    (B, L, 1), each size also 1 to broadcast. Raises ValueError for anything else."""
    t = beta
    if t.dim() == 3 and t.shape[2] == 1:
        t = t[..., 0]
    elif t.dim() == 2 and t.shape[1] == 1 and l != 1:
        t = t[:, 0]
    if t.dim() > 2:
        raise ValueError(f"beta must broadcast to (B, L) = ({b}, {l}), got shape {tuple(beta.shape)}")
    try:
        return t.expand(b, l)
    except RuntimeError:
        raise ValueError(
            f"beta must be a number or a tensor of shape (), (L,), (L, 1), (B, L) or (B, L, 1) with "
            f"(B, L) = ({b}, {l}), got shape {tuple(beta.shape)}"
        ) from None


def _scaled_logits(logits: torch.Tensor, beta: Beta) -> torch.Tensor:
    """s = beta * T in the accumulation dtype, as (B, L, H*W), shifted on the maps where beta * T overflows.

    A map whose largest beta * t is +-inf (a finite beta too large for its logits) is computed as
    beta * (T - c) instead, with c the map's largest logit for beta > 0, its smallest for beta < 0: the same
    softmax, which then holds the exact limit, 1/k on the k pixels where t == c and 0 elsewhere. A map with a
    NaN, or whose c is infinite, stays NaN (amax propagates NaN; inf - inf is NaN). The other maps are
    beta * T exactly as before (they are shifted by 0). c carries no gradient: the softmax does not depend
    on it.
    """
    b, l, h, w = logits.shape
    acc = _accumulation_dtype(logits)
    flat = logits.to(acc).reshape(b, l, h * w)
    if isinstance(beta, torch.Tensor):
        beta = expand_beta(beta, b, l).to(acc).unsqueeze(-1)
    with torch.no_grad():
        # the largest beta * t is beta * c (rounding is monotone): no pass over beta * T to find the maps
        if isinstance(beta, torch.Tensor):
            c = torch.where(beta > 0, flat.amax(dim=-1, keepdim=True), flat.amin(dim=-1, keepdim=True))
        else:
            c = flat.amax(dim=-1, keepdim=True) if beta > 0 else flat.amin(dim=-1, keepdim=True)
        overflows = ~torch.isfinite(c * beta)
        shift = torch.where(overflows, c, 0.0)
    shifted = flat - shift.detach()  # no_grad does not stop forward-mode AD: detach does
    if isinstance(beta, torch.Tensor) and beta.requires_grad:
        # T - c itself can overflow (logits of both signs near the dtype's largest value): such a pixel's Phi is
        # 0 either way, and the dtype's largest value in its place keeps grad_beta's 0 * (T - c) from being NaN;
        # the bounds are infinite (no change) on the other maps
        largest = torch.where(overflows, c.new_tensor(torch.finfo(acc).max), c.new_tensor(torch.inf))
        return torch.clamp(shifted, -largest, largest) * beta
    return shifted.mul_(beta)  # beta takes no gradient: in place, one allocation fewer


def pixel_grid(h: int, w: int, normalized: bool, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Column (x) and row (y) coordinates of every pixel, each of shape (H*W,), in row-major order."""

    def axis(n: int) -> torch.Tensor:
        if normalized:
            # a one-pixel axis is its own centre, 0 (linspace(-1, 1, 1) would give -1)
            return torch.linspace(-1.0, 1.0, n, device=device, dtype=dtype) if n > 1 else torch.zeros(
                n, device=device, dtype=dtype)
        return torch.arange(n, device=device, dtype=dtype)

    ys, xs = torch.meshgrid(axis(h), axis(w), indexing="ij")
    return xs.reshape(-1), ys.reshape(-1)


def _phi(logits: torch.Tensor, beta: Beta) -> torch.Tensor:
    """Phi (B, L, H, W) in the accumulation dtype."""
    return torch.softmax(_scaled_logits(logits, beta), dim=-1).reshape(logits.shape)


def spatial_softmax(logits: torch.Tensor, beta: Beta = 1.0) -> torch.Tensor:
    """Eq. (1): softmax of beta * T over the H*W pixels of each (b, l) map. Returns Phi (B, L, H, W)."""
    return _phi(logits, beta).to(logits.dtype)


def soft_argmax(logits: torch.Tensor, beta: Beta = 1.0, normalized: bool = False) -> torch.Tensor:
    """Eqs. (1)+(2): expected (x, y) under Phi for each map. Returns z (B, L, 2).

    Computed from the column and row marginals of Phi (sum over rows, then over columns): the same value as
    sum_p Phi_p x_p, but summing H or W terms at a time keeps float32 accurate on flat 128 x 128 maps.
    """
    h, w = logits.shape[2:]
    acc = _accumulation_dtype(logits)
    phi = _phi(logits, beta)
    xs = pixel_grid(1, w, normalized, logits.device, acc)[0]
    ys = pixel_grid(h, 1, normalized, logits.device, acc)[1]
    z = torch.stack([phi.sum(dim=2) @ xs, phi.sum(dim=3) @ ys], dim=-1)
    return z.to(logits.dtype)


def attention_mask(logits: torch.Tensor, beta: Beta = 1.0) -> torch.Tensor:
    """The summed attention mask M = sum_l Phi_l. Returns (B, 1, H, W)."""
    return _phi(logits, beta).sum(dim=1, keepdim=True).to(logits.dtype)


def landmark_attention(
    logits: torch.Tensor, beta: Beta = 1.0, normalized: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft-argmax coordinates and the summed mask together: (z (B, L, 2), M (B, 1, H, W))."""
    return soft_argmax(logits, beta, normalized), attention_mask(logits, beta)


def fuse(image: torch.Tensor, embedding: torch.Tensor, mask: torch.Tensor, mode: str = "F5") -> torch.Tensor:
    """Eqs. (4)-(8), channel concatenation (|) of:
    F1 = E;  F2 = I*M;  F3 = I | I*M;  F4 = I | I*M | E*M;  F5 = I | I*M | E | E*M
    (the layout table in decafa_fast/contract/layout.py). F is in E's memory format.
    """
    layout = fusion_layout(mode_number(mode), image.shape[1], embedding.shape[1])
    blocks = [
        (layout.image, lambda: image),
        (layout.image_mask, lambda: image * mask),
        (layout.embedding, lambda: embedding),
        (layout.embedding_mask, lambda: embedding * mask),
    ]
    parts = [make() for first, make in sorted(blocks, key=lambda blk: blk[0]) if first >= 0]
    return torch.cat(parts, dim=1).contiguous(memory_format=fused_memory_format(embedding))


def decafa_head(
    logits: torch.Tensor,
    image: torch.Tensor,
    embedding: torch.Tensor,
    mode: str = "F5",
    beta: Beta = 1.0,
    normalized: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax + moments + mask + fusion: (z (B, L, 2), F (B, channels(mode), H, W))."""
    z, m = landmark_attention(logits, beta, normalized)
    return z, fuse(image, embedding, m, mode)


def fused_channels(mode: str, image_channels: int, embedding_channels: int) -> int:
    """Number of channels of fuse(I, E, M, mode)."""
    return fusion_layout(mode_number(mode), image_channels, embedding_channels).channels
