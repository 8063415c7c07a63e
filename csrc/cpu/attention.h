// The per-map passes shared by the CPU ops (attention.cpp) and the fused head (fusion.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace decafa {
namespace cpu {

// The accumulation dtype of an input dtype: double for double, float otherwise (also the dtype of lse).
at::ScalarType acc_type(at::ScalarType t);

// An empty lse (B, L) for the logits.
at::Tensor empty_lse(const at::Tensor& logits);

// An optional incoming gradient as a contiguous tensor of the accumulation dtype, or undefined.
at::Tensor as_acc(const std::optional<at::Tensor>& grad, at::ScalarType logits_type);

// Per-(b, l) statistics of contiguous logits (B, L, H, W) in one pass over each map: fills lse (B, L), and,
// when given, z (B, L, 2), phi (B, L, H, W) and mask, M = sum_l Phi_l as a contiguous (B, H*W) tensor of the
// accumulation dtype (summed from the same exp values, so M costs no second exp per pixel).
void map_statistics(const at::Tensor& logits, double beta, bool normalized, at::Tensor& lse, at::Tensor* z,
                    at::Tensor* phi, at::Tensor* mask = nullptr);

// Gradient of contiguous logits for a loss depending on z and M = sum_l Phi_l, recomputing Phi from lse.
// grad_z (B, L, 2) and grad_mask (B, 1, H, W) are contiguous in the accumulation dtype, or undefined. When
// `mask` is given (contiguous (B, H*W), accumulation dtype), M is summed into it from the recomputed Phi.
at::Tensor logits_gradient(const at::Tensor& logits, const at::Tensor& lse, double beta, bool normalized,
                           const at::Tensor& grad_z, const at::Tensor& grad_mask, at::Tensor* mask = nullptr);

// Number of pixels one parallel task of a per-pixel-tile pass covers.
constexpr int64_t kPixelTile = 2048;

}  // namespace cpu
}  // namespace decafa
