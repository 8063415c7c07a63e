"""The schema of every compiled op, written once.

`decafa::<op>` (C++: CPU kernels, CUDA glue) and `decafa_triton::<op>` (Triton) implement the same schemas.
The C++ extension only registers implementations (TORCH_LIBRARY_IMPL); the schemas of the `decafa`
namespace are defined here, from Python, when decafa_fast.ops is imported (`define_schemas`), so
`torch.ops.decafa.*` is usable after `import decafa_fast`. Triton registers from the same strings.

Conventions: `mode` is the fusion number 1..5 (F1..F5, see layout.py). `beta_map` (B, L), when given,
replaces the float `beta` (per-map inverse temperature). Forward ops return the per-map `stats` (B, L, 2)
= (max, sum of exp(s - max)) of s = beta * T beside their outputs; backward ops take them and recompute
Phi = exp(s - max) / sum instead of storing it, and return grad_beta (B, L) beside the input gradients.
"""
from __future__ import annotations

import torch

SCHEMAS: dict[str, str] = {
    "spatial_softmax": "(Tensor logits, float beta, Tensor? beta_map) -> (Tensor phi, Tensor stats)",
    "spatial_softmax_backward": (
        "(Tensor grad_phi, Tensor logits, Tensor stats, float beta, Tensor? beta_map)"
        " -> (Tensor grad_logits, Tensor grad_beta)"
    ),
    "soft_argmax": "(Tensor logits, float beta, Tensor? beta_map, bool normalized) -> (Tensor z, Tensor stats)",
    "attention_mask": "(Tensor logits, float beta, Tensor? beta_map) -> (Tensor mask, Tensor stats)",
    "landmark_attention": (
        "(Tensor logits, float beta, Tensor? beta_map, bool normalized) -> (Tensor z, Tensor mask, Tensor stats)"
    ),
    "landmark_attention_backward": (
        "(Tensor? grad_z, Tensor? grad_mask, Tensor logits, Tensor stats, float beta, Tensor? beta_map,"
        " bool normalized) -> (Tensor grad_logits, Tensor grad_beta)"
    ),
    "fuse": "(Tensor image, Tensor embedding, Tensor mask, int mode) -> Tensor",
    "fuse_backward": (
        "(Tensor grad_fused, Tensor image, Tensor embedding, Tensor mask, int mode)"
        " -> (Tensor grad_image, Tensor grad_embedding, Tensor grad_mask)"
    ),
    "decafa_head": (
        "(Tensor logits, Tensor image, Tensor embedding, int mode, float beta, Tensor? beta_map, bool normalized)"
        " -> (Tensor z, Tensor fused, Tensor mask, Tensor stats)"
    ),
    "decafa_head_backward": (
        "(Tensor? grad_z, Tensor? grad_fused, Tensor logits, Tensor image, Tensor embedding, Tensor mask,"
        " Tensor stats, int mode, float beta, Tensor? beta_map, bool normalized)"
        " -> (Tensor grad_logits, Tensor grad_image, Tensor grad_embedding, Tensor grad_beta)"
    ),
}

# Libraries own their definitions: kept alive for the life of the process.
_LIBRARIES: dict[str, torch.library.Library] = {}


def define_schemas(namespace: str) -> torch.library.Library:
    """Defines every op of SCHEMAS in `namespace` (once per process) and returns its library."""
    if namespace not in _LIBRARIES:
        lib = torch.library.Library(namespace, "DEF")
        for name, schema in SCHEMAS.items():
            lib.define(name + schema)
        _LIBRARIES[namespace] = lib
    return _LIBRARIES[namespace]
