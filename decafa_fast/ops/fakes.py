"""Fake (meta) kernels: the output shapes and dtypes of every compiled op, one per op for every namespace,
so that torch.compile and opcheck can trace them without running a kernel."""
from __future__ import annotations

from typing import Callable

import torch

from .. import reference
from .validation import FUSION_MODES

def _fused_channels(mode: int, image: torch.Tensor, embedding: torch.Tensor) -> int:
    return reference.fused_channels(FUSION_MODES[mode - 1], image.shape[1], embedding.shape[1])


def lse_dtype(logits_dtype: torch.dtype) -> torch.dtype:
    """dtype of the saved log-sum-exp: float64 for float64 logits, float32 otherwise."""
    return torch.float64 if logits_dtype == torch.float64 else torch.float32


def _lse_like(logits: torch.Tensor) -> torch.Tensor:
    return logits.new_empty(logits.shape[:2], dtype=lse_dtype(logits.dtype))


def _z_like(logits: torch.Tensor) -> torch.Tensor:
    return logits.new_empty((*logits.shape[:2], 2))


def _mask_like(logits: torch.Tensor) -> torch.Tensor:
    b, _, h, w = logits.shape
    return logits.new_empty((b, 1, h, w))


def _contiguous_like(t: torch.Tensor) -> torch.Tensor:
    return t.new_empty(t.shape)


FAKES: dict[str, Callable] = {
    "spatial_softmax": lambda logits, beta: (_contiguous_like(logits), _lse_like(logits)),
    "spatial_softmax_backward": lambda grad_phi, logits, lse, beta: _contiguous_like(logits),
    "soft_argmax": lambda logits, beta, normalized: (_z_like(logits), _lse_like(logits)),
    "attention_mask": lambda logits, beta: (_mask_like(logits), _lse_like(logits)),
    "landmark_attention": lambda logits, beta, normalized: (
        _z_like(logits),
        _mask_like(logits),
        _lse_like(logits),
    ),
    "landmark_attention_backward": lambda grad_z, grad_mask, logits, lse, beta, normalized: _contiguous_like(logits),
    "fuse": lambda image, embedding, mask, mode: image.new_empty(
        (image.shape[0], _fused_channels(mode, image, embedding), *image.shape[2:])
    ),
    "fuse_backward": lambda grad_fused, image, embedding, mask, mode: (
        _contiguous_like(image),
        _contiguous_like(embedding),
        _contiguous_like(mask),
    ),
    "decafa_head": lambda logits, image, embedding, mode, beta, normalized: (
        _z_like(logits),
        logits.new_empty((logits.shape[0], _fused_channels(mode, image, embedding), *logits.shape[2:])),
        _lse_like(logits),
    ),
    "decafa_head_backward": lambda grad_z, grad_fused, logits, image, embedding, lse, mode, beta, normalized: (
        _contiguous_like(logits),
        _contiguous_like(image),
        _contiguous_like(embedding),
    ),
}


def register_fakes(ns_name: str) -> None:
    for op, fake in FAKES.items():
        torch.library.register_fake(f"{ns_name}::{op}", fake)
