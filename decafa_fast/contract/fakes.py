"""Fake (meta) kernels of the op contract: the output shapes, dtypes and memory formats of every compiled op,
one per op, registered for every namespace (`decafa`, `decafa_triton`), so torch.compile and opcheck
trace them without running a kernel."""
from __future__ import annotations

from collections.abc import Callable

import torch

from .layout import fused_memory_format, fusion_layout

Tensor = torch.Tensor


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype (of stats, beta_map and grad_beta): float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _stats_like(logits: Tensor) -> Tensor:
    return logits.new_empty((*logits.shape[:2], 2), dtype=acc_dtype(logits.dtype))


def _grad_beta_like(logits: Tensor) -> Tensor:
    return logits.new_empty(logits.shape[:2], dtype=acc_dtype(logits.dtype))


def _z_like(logits: Tensor) -> Tensor:
    return logits.new_empty((*logits.shape[:2], 2))


def _mask_like(logits: Tensor) -> Tensor:
    b, _, h, w = logits.shape
    return logits.new_empty((b, 1, h, w))


def _contiguous_like(t: Tensor) -> Tensor:
    return t.new_empty(t.shape)


def _fused_like(image: Tensor, embedding: Tensor, mode: int) -> Tensor:
    channels = fusion_layout(mode, image.shape[1], embedding.shape[1]).channels
    return torch.empty(
        (image.shape[0], channels, *image.shape[2:]),
        dtype=image.dtype,
        device=image.device,
        memory_format=fused_memory_format(embedding),
    )


def spatial_softmax(logits: Tensor, beta: float, beta_map: Tensor | None):
    return _contiguous_like(logits), _stats_like(logits)


def spatial_softmax_backward(grad_phi: Tensor, logits: Tensor, stats: Tensor, beta: float,
                             beta_map: Tensor | None):
    return _contiguous_like(logits), _grad_beta_like(logits)


def soft_argmax(logits: Tensor, beta: float, beta_map: Tensor | None, normalized: bool):
    return _z_like(logits), _stats_like(logits)


def attention_mask(logits: Tensor, beta: float, beta_map: Tensor | None):
    return _mask_like(logits), _stats_like(logits)


def landmark_attention(logits: Tensor, beta: float, beta_map: Tensor | None, normalized: bool):
    return _z_like(logits), _mask_like(logits), _stats_like(logits)


def landmark_attention_backward(grad_z: Tensor | None, grad_mask: Tensor | None, logits: Tensor,
                                stats: Tensor, beta: float, beta_map: Tensor | None, normalized: bool):
    return _contiguous_like(logits), _grad_beta_like(logits)


def fuse(image: Tensor, embedding: Tensor, mask: Tensor, mode: int):
    return _fused_like(image, embedding, mode)


def fuse_backward(grad_fused: Tensor, image: Tensor, embedding: Tensor, mask: Tensor, mode: int):
    return _contiguous_like(image), _contiguous_like(embedding), _contiguous_like(mask)


def decafa_head(logits: Tensor, image: Tensor, embedding: Tensor, mode: int, beta: float,
                beta_map: Tensor | None, normalized: bool):
    return _z_like(logits), _fused_like(image, embedding, mode), _mask_like(logits), _stats_like(logits)


def decafa_head_backward(grad_z: Tensor | None, grad_fused: Tensor | None, logits: Tensor, image: Tensor,
                         embedding: Tensor, mask: Tensor, stats: Tensor, mode: int, beta: float,
                         beta_map: Tensor | None, normalized: bool):
    return (_contiguous_like(logits), _contiguous_like(image), _contiguous_like(embedding),
            _grad_beta_like(logits))


FAKES: dict[str, Callable] = {
    "spatial_softmax": spatial_softmax,
    "spatial_softmax_backward": spatial_softmax_backward,
    "soft_argmax": soft_argmax,
    "attention_mask": attention_mask,
    "landmark_attention": landmark_attention,
    "landmark_attention_backward": landmark_attention_backward,
    "fuse": fuse,
    "fuse_backward": fuse_backward,
    "decafa_head": decafa_head,
    "decafa_head_backward": decafa_head_backward,
}


def register_fakes(namespace: str, lib: torch.library.Library | None = None) -> None:
    """Registers the fake of every op of `namespace` (whose schemas are already defined)."""
    for op, fake in FAKES.items():
        torch.library.register_fake(f"{namespace}::{op}", fake, lib=lib)
