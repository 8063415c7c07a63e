"""Public drop-in ops: spatial softmax, soft-argmax, attention mask, F1-F5 fusion and the fused DeCaFA head.

Each public function validates its arguments, picks a backend and calls one custom op. The custom ops
share one set of schemas across backends (`decafa_fast.contract.schemas`):

    decafa::<op>          C++ (csrc/), CPU kernels always, CUDA kernels when built with CUDA
    decafa_triton::<op>   Triton (decafa_fast/triton/), registered with torch.library.triton_op

`beta` is a Python number or a tensor broadcastable to (B, L) (see reference.expand_beta); a tensor reaches
the ops as `beta_map` (B, L) and gets its gradient. Forward ops also return per-map `stats` (B, L, 2) =
(max, sum of exp(s - max)) of s = beta*T; backward ops take them and recompute Phi = exp(s - max) / sum
instead of storing Phi. Autograd (`autograd.py`: fused backward for plain reverse mode, a differentiable
formulation for higher orders) and fake kernels (`contract.fakes`) are registered for every namespace, so every
backend works under autograd, torch.compile(fullgraph=True) and opcheck. Under torch.func transforms
(grad, vjp, jacrev, jacfwd, vmap, jvp) and forward-mode AD with dual inputs the ops run the reference
formulation, which those transforms differentiate exactly. Loading the C++ extension is in `extension.py`,
importing Triton in `triton_import.py`, what is available in `status.py`, the measured table "auto" reads on
a GPU in `auto.py`, the choice and resolution of a backend in `backend.py`, argument checks in
`validation.py`, the fusion layout in `contract.layout`, the CPU kernels' output cache in `cpu_cache.py`, the
CUDA kernels' runs of maps in `cuda_runs.py`.
"""
from __future__ import annotations

import torch

from .. import _torch_private, reference
from ..contract.fakes import FAKES, acc_dtype, register_fakes
from ..contract.layout import FusionLayout, fusion_layout
from ..contract.schemas import SCHEMAS, define_schemas
from ..contract.table import OPS_BY_NAME
from . import cpu_cache, cuda_runs, extension, triton_import
from .auto import AUTO_CUDA_PREFERENCE, measured_gpus
from .autograd import register_autograd
from .backend import BACKENDS, get_backend, namespace, resolve, set_backend, use_backend
from .status import backends
from .validation import (
    FUSION_MODES,
    check_backend_dtype,
    check_companion,
    check_mode,
    check_tensor,
    prepare_logits,
    reference_beta,
)

__all__ = [
    "AUTO_CUDA_PREFERENCE",
    "BACKENDS",
    "FAKES",
    "FUSION_MODES",
    "SCHEMAS",
    "FusionLayout",
    "acc_dtype",
    "attention_mask",
    "backends",
    "cpu_cache",
    "cuda_runs",
    "decafa_head",
    "fuse",
    "fusion_layout",
    "get_backend",
    "landmark_attention",
    "measured_gpus",
    "namespace",
    "resolve",
    "set_backend",
    "use_backend",
    "soft_argmax",
    "spatial_softmax",
]

# --------------------------------------------------------------------------------------------------
# Public ops
# --------------------------------------------------------------------------------------------------
def _transformed(*tensors: torch.Tensor | None) -> bool:
    """True under a torch.func transform, or with forward-mode AD dual inputs: the compiled ops have no
    forward-mode or batching rules, so these run the reference formulation instead (exact under every
    transform). Never true while torch.compile traces (the check would only break the graph)."""
    if torch.compiler.is_compiling():
        return False
    return _torch_private.in_functorch_transform() or _torch_private.has_tangent(tensors)


def _public_outputs(name: str, out) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """What the public function returns of op `name`'s outputs: the differentiable ones of the op table
    (the stats, and the head's mask, are for the backward)."""
    op = OPS_BY_NAME[name]
    kept = tuple(o for o, n in zip(out if isinstance(out, tuple) else (out,), op.outputs) if n not in op.nondiff)
    return kept[0] if len(kept) == 1 else kept


def _maps_op(name: str, logits: torch.Tensor, beta, *flags: bool):
    """The public op `name` of the logits alone: (logits, beta, beta_map, *flags) for the op, (logits, beta,
    *flags) for the reference."""
    backend, beta, beta_map = prepare_logits(name, logits, beta)
    if backend == "reference" or _transformed(logits, beta_map):
        return getattr(reference, name)(logits, reference_beta(beta, beta_map), *flags)
    return _public_outputs(name, getattr(namespace(backend), name)(logits, beta, beta_map, *flags))


def spatial_softmax(logits: torch.Tensor, beta: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Eq. (1): softmax of beta * logits over the H*W pixels of each map.

    logits (B, L, H, W) -> Phi (B, L, H, W), same dtype. NaN in a map gives NaN over that map.
    beta: a number or a tensor broadcastable to (B, L) ((), (L,), (L, 1), (B, L), (B, L, 1)).
    """
    return _maps_op("spatial_softmax", logits, beta)


def soft_argmax(
    logits: torch.Tensor, beta: float | torch.Tensor = 1.0, normalized: bool = False
) -> torch.Tensor:
    """Eqs. (1)+(2): soft-argmax of each map as (x, y), x the column and y the row.

    logits (B, L, H, W) -> z (B, L, 2), same dtype; pixels 0..W-1 / 0..H-1, or [-1, 1] when normalized
    (a one-pixel axis gives 0). beta as in spatial_softmax.
    """
    return _maps_op("soft_argmax", logits, beta, bool(normalized))


def attention_mask(logits: torch.Tensor, beta: float | torch.Tensor = 1.0) -> torch.Tensor:
    """The summed attention mask M = sum over l of Phi_l: logits (B, L, H, W) -> M (B, 1, H, W)."""
    return _maps_op("attention_mask", logits, beta)


def landmark_attention(
    logits: torch.Tensor, beta: float | torch.Tensor = 1.0, normalized: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft-argmax and summed mask in one pass: logits (B, L, H, W) -> (z (B, L, 2), M (B, 1, H, W))."""
    return _maps_op("landmark_attention", logits, beta, bool(normalized))


def fuse(image: torch.Tensor, embedding: torch.Tensor, mask: torch.Tensor, mode: str = "F5") -> torch.Tensor:
    """Eqs. (4)-(8): F1 = E; F2 = I*M; F3 = I|I*M; F4 = I|I*M|E*M; F5 = I|I*M|E|E*M (channel concat).

    image (B, Ci, H, W), embedding (B, C, H, W), mask (B, 1, H, W) -> (B, channels(mode), H, W) in the
    memory format of the embedding.
    """
    check_tensor("image", image)
    mode_id = check_mode(mode)
    check_companion("embedding", embedding, image, "image")
    check_companion("mask", mask, image, "image")
    backend = resolve(image.device, "fuse", (image, embedding, mask))
    check_backend_dtype(backend, image)
    if backend == "reference" or _transformed(image, embedding, mask):
        return reference.fuse(image, embedding, mask, mode)
    return namespace(backend).fuse(image, embedding, mask, mode_id)


def decafa_head(
    logits: torch.Tensor,
    image: torch.Tensor,
    embedding: torch.Tensor,
    mode: str = "F5",
    beta: float | torch.Tensor = 1.0,
    normalized: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused landmark-attention head: softmax + moments + mask + fusion in one op.

    logits (B, L, H, W), image (B, Ci, H, W), embedding (B, C, H, W), all of one dtype and device
    -> (z (B, L, 2), fused (B, channels(mode), H, W), in the embedding's memory format). Equals
    `z, M = landmark_attention(logits, beta); fuse(image, embedding, M, mode)` without materialising Phi.
    """
    mode_id = check_mode(mode)
    backend, beta, beta_map = prepare_logits("decafa_head", logits, beta, image=image, embedding=embedding)
    if backend == "reference" or _transformed(logits, image, embedding, beta_map):
        return reference.decafa_head(logits, image, embedding, mode, reference_beta(beta, beta_map),
                                     bool(normalized))
    return _public_outputs("decafa_head", namespace(backend).decafa_head(
        logits, image, embedding, mode_id, beta, beta_map, bool(normalized)))


# The C++ extension registers implementations only; the schemas are defined here, then fakes and autograd.
if extension.extension_error is None:
    define_schemas("decafa")
    register_fakes("decafa")
    register_autograd("decafa")
if triton_import.triton_error is None:
    register_autograd("decafa_triton")
