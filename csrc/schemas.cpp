// The decafa operator library: one schema per forward and backward op. The same schemas are implemented
// for CPU (csrc/cpu/), for CUDA (csrc/cuda/, calling kernels/) and, under the decafa_triton namespace,
// by Triton (decafa_fast/triton/). Fake kernels and autograd are registered from Python (decafa_fast/ops.py).
//
// Conventions shared by every implementation:
//   logits (B, L, H, W); image (B, Ci, H, W); embedding (B, C, H, W); mask (B, 1, H, W); z (B, L, 2) as (x, y).
//   lse (B, L) = logsumexp over pixels of beta * logits, float32 (float64 for float64 logits).
//   mode 1..5 selects the fusion F1..F5. Outputs are contiguous and have the input dtype.
//   Backward ops recompute Phi = exp(beta * logits - lse); grad_z / grad_mask / grad_fused may be None.
#include <torch/library.h>

TORCH_LIBRARY(decafa, m) {
  m.def("spatial_softmax(Tensor logits, float beta) -> (Tensor phi, Tensor lse)");
  m.def("spatial_softmax_backward(Tensor grad_phi, Tensor logits, Tensor lse, float beta) -> Tensor");
  m.def("soft_argmax(Tensor logits, float beta, bool normalized) -> (Tensor z, Tensor lse)");
  m.def("attention_mask(Tensor logits, float beta) -> (Tensor mask, Tensor lse)");
  m.def("landmark_attention(Tensor logits, float beta, bool normalized) -> (Tensor z, Tensor mask, Tensor lse)");
  m.def(
      "landmark_attention_backward(Tensor? grad_z, Tensor? grad_mask, Tensor logits, Tensor lse, float beta, "
      "bool normalized) -> Tensor");
  m.def("fuse(Tensor image, Tensor embedding, Tensor mask, int mode) -> Tensor");
  m.def(
      "fuse_backward(Tensor grad_fused, Tensor image, Tensor embedding, Tensor mask, int mode) "
      "-> (Tensor, Tensor, Tensor)");
  m.def(
      "decafa_head(Tensor logits, Tensor image, Tensor embedding, int mode, float beta, bool normalized) "
      "-> (Tensor z, Tensor fused, Tensor lse)");
  m.def(
      "decafa_head_backward(Tensor? grad_z, Tensor? grad_fused, Tensor logits, Tensor image, Tensor embedding, "
      "Tensor lse, int mode, float beta, bool normalized) -> (Tensor, Tensor, Tensor)");
}
