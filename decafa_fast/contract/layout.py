"""The channel layout of the fused output F, one table for every Python user (reference, Triton, fakes).
Its C++ twin is kernels/fusion_layout.h; the two must agree.

Mode 1..5 = F1..F5:  F1 = E;  F2 = I*M;  F3 = I | I*M;  F4 = I | I*M | E*M;  F5 = I | I*M | E | E*M.
Imports torch alone (the reference, the fakes and the Triton ops use it)."""
from __future__ import annotations

from typing import NamedTuple

import torch

FUSION_MODES = ("F1", "F2", "F3", "F4", "F5")


class FusionLayout(NamedTuple):
    """First channel of each block in F (-1 when absent) and F's channel count."""

    image: int
    image_mask: int
    embedding: int
    embedding_mask: int
    channels: int


def fusion_layout(mode: int, ci: int, c: int) -> FusionLayout:
    """Layout of F for mode 1..5 (0: no fusion, no channels), ci image and c embedding channels."""
    table = {
        0: (-1, -1, -1, -1, 0),
        1: (-1, -1, 0, -1, c),
        2: (-1, 0, -1, -1, ci),
        3: (0, ci, -1, -1, 2 * ci),
        4: (0, ci, -1, 2 * ci, 2 * ci + c),
        5: (0, ci, 2 * ci, 2 * ci + c, 2 * ci + 2 * c),
    }
    if mode not in table:
        raise ValueError(f"mode must be 1..5 (F1..F5), got {mode!r}")
    return FusionLayout(*table[mode])


def mode_number(mode: str) -> int:
    """'F1'..'F5' -> 1..5."""
    if mode not in FUSION_MODES:
        raise ValueError(f"mode must be one of {FUSION_MODES}, got {mode!r}")
    return FUSION_MODES.index(mode) + 1


def fused_memory_format(embedding: torch.Tensor) -> torch.memory_format:
    """F follows E: channels_last when E is channels_last (and not also plain contiguous), else contiguous."""
    if embedding.is_contiguous(memory_format=torch.channels_last) and not embedding.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format
