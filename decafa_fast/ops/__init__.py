"""Public drop-in ops: spatial softmax, soft-argmax, attention mask, F1-F5 fusion and the fused DeCaFA head.

Each public function validates its arguments, picks a backend and calls one custom op. The custom ops
share one set of schemas across backends (`schemas.py`):

    decafa::<op>          C++ (csrc/), CPU kernels always, CUDA kernels when built with CUDA
    decafa_triton::<op>   Triton (decafa_fast/triton/), registered with torch.library.triton_op

Forward ops also return the per-map log-sum-exp `lse` (B, L) of beta*T (float32; float64 for float64 T); backward ops take it and
recompute Phi = exp(beta*T - lse) instead of storing Phi. Autograd (`autograd.py`) and fake (meta)
kernels (`fakes.py`) are registered for every namespace, so every backend works under autograd,
torch.compile(fullgraph=True) and opcheck. Backend selection is in `backend.py`, argument checks in
`validation.py`.
"""
from __future__ import annotations

import torch

from .. import reference
from . import backend as _backend_mod
from .autograd import register_autograd
from .backend import (
    AUTO_CUDA_PREFERENCE,
    BACKENDS,
    backends,
    get_backend,
    measured_gpus,
    namespace,
    resolve,
    set_backend,
    use_backend,
)
from .fakes import lse_dtype, register_fakes
from .schemas import SCHEMAS
from .validation import (
    FUSION_MODES,
    check_backend_dtype,
    check_companion,
    check_mode,
    check_tensor,
    prepare_logits,
)

__all__ = [
    "spatial_softmax",
    "soft_argmax",
    "attention_mask",
    "landmark_attention",
    "fuse",
    "decafa_head",
    "set_backend",
    "get_backend",
    "backends",
    "BACKENDS",
]

# --------------------------------------------------------------------------------------------------
# Public ops
# --------------------------------------------------------------------------------------------------
def spatial_softmax(logits: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Eq. (1): softmax of beta * logits over the H*W pixels of each map.

    logits (B, L, H, W) -> Phi (B, L, H, W), same dtype. NaN in a map gives NaN over that map.
    """
    backend, beta = prepare_logits("spatial_softmax", logits, beta)
    if backend == "reference":
        return reference.spatial_softmax(logits, beta)
    phi, _ = namespace(backend).spatial_softmax(logits, beta)
    return phi


def soft_argmax(logits: torch.Tensor, beta: float = 1.0, normalized: bool = False) -> torch.Tensor:
    """Eqs. (1)+(2): soft-argmax of each map as (x, y), x the column and y the row.

    logits (B, L, H, W) -> z (B, L, 2), same dtype; pixels 0..W-1 / 0..H-1, or [-1, 1] when normalized.
    """
    backend, beta = prepare_logits("soft_argmax", logits, beta)
    if backend == "reference":
        return reference.soft_argmax(logits, beta, bool(normalized))
    z, _ = namespace(backend).soft_argmax(logits, beta, bool(normalized))
    return z


def attention_mask(logits: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """The summed attention mask M = sum over l of Phi_l: logits (B, L, H, W) -> M (B, 1, H, W)."""
    backend, beta = prepare_logits("attention_mask", logits, beta)
    if backend == "reference":
        return reference.attention_mask(logits, beta)
    m, _ = namespace(backend).attention_mask(logits, beta)
    return m


def landmark_attention(
    logits: torch.Tensor, beta: float = 1.0, normalized: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft-argmax and summed mask in one pass: logits (B, L, H, W) -> (z (B, L, 2), M (B, 1, H, W))."""
    backend, beta = prepare_logits("landmark_attention", logits, beta)
    if backend == "reference":
        return reference.landmark_attention(logits, beta, bool(normalized))
    z, m, _ = namespace(backend).landmark_attention(logits, beta, bool(normalized))
    return z, m


def fuse(image: torch.Tensor, embedding: torch.Tensor, mask: torch.Tensor, mode: str = "F5") -> torch.Tensor:
    """Eqs. (4)-(8): F1 = E; F2 = I*M; F3 = I‖I*M; F4 = I‖I*M‖E*M; F5 = I‖I*M‖E‖E*M (channel concat).

    image (B, Ci, H, W), embedding (B, C, H, W), mask (B, 1, H, W) -> (B, channels(mode), H, W).
    """
    check_tensor("image", image, 4, "of shape (B, Ci, H, W)")
    mode_id = check_mode(mode)
    check_companion("embedding", embedding, image, "image")
    check_companion("mask", mask, image, "image", channels=1)
    backend = resolve(image.device, "fuse", (image, embedding, mask))
    check_backend_dtype(backend, image)
    if backend == "reference":
        return reference.fuse(image, embedding, mask, mode)
    return namespace(backend).fuse(image, embedding, mask, mode_id)


def decafa_head(
    logits: torch.Tensor,
    image: torch.Tensor,
    embedding: torch.Tensor,
    mode: str = "F5",
    beta: float = 1.0,
    normalized: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused landmark-attention head: softmax + moments + mask + fusion in one op.

    logits (B, L, H, W), image (B, Ci, H, W), embedding (B, C, H, W), all of one dtype and device
    -> (z (B, L, 2), fused (B, channels(mode), H, W)). Equals
    `z, M = landmark_attention(logits); fuse(image, embedding, M, mode)` without materialising M or Phi.
    """
    mode_id = check_mode(mode)
    backend, beta = prepare_logits("decafa_head", logits, beta, image=image, embedding=embedding)
    if backend == "reference":
        return reference.decafa_head(logits, image, embedding, mode, beta, bool(normalized))
    z, fused, _ = namespace(backend).decafa_head(logits, image, embedding, mode_id, beta, bool(normalized))
    return z, fused




if _backend_mod.extension_error is None:
    register_fakes("decafa")
    register_autograd("decafa")
if _backend_mod.triton_error is None:
    register_autograd("decafa_triton")
