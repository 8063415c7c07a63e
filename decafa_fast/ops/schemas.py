"""The schema of every compiled op, written once. `decafa::<op>` (C++: CPU kernels, CUDA glue) and
`decafa_triton::<op>` (Triton) implement the same schemas; `mode` is the fusion number 1..5 (see layout.py).

Forward ops return the per-map statistics of beta*T beside their outputs; backward ops take them and
recompute Phi instead of storing it."""

SCHEMAS = {
    "spatial_softmax": "(Tensor logits, float beta) -> (Tensor phi, Tensor lse)",
    "spatial_softmax_backward": "(Tensor grad_phi, Tensor logits, Tensor lse, float beta) -> Tensor",
    "soft_argmax": "(Tensor logits, float beta, bool normalized) -> (Tensor z, Tensor lse)",
    "attention_mask": "(Tensor logits, float beta) -> (Tensor mask, Tensor lse)",
    "landmark_attention": "(Tensor logits, float beta, bool normalized) -> (Tensor z, Tensor mask, Tensor lse)",
    "landmark_attention_backward": (
        "(Tensor? grad_z, Tensor? grad_mask, Tensor logits, Tensor lse, float beta, bool normalized) -> Tensor"
    ),
    "fuse": "(Tensor image, Tensor embedding, Tensor mask, int mode) -> Tensor",
    "fuse_backward": (
        "(Tensor grad_fused, Tensor image, Tensor embedding, Tensor mask, int mode) -> (Tensor, Tensor, Tensor)"
    ),
    "decafa_head": (
        "(Tensor logits, Tensor image, Tensor embedding, int mode, float beta, bool normalized)"
        " -> (Tensor z, Tensor fused, Tensor lse)"
    ),
    "decafa_head_backward": (
        "(Tensor? grad_z, Tensor? grad_fused, Tensor logits, Tensor image, Tensor embedding, Tensor lse,"
        " int mode, float beta, bool normalized) -> (Tensor, Tensor, Tensor)"
    ),
}


