// The per-map passes shared by the CPU ops (attention.cpp) and the fused head (fusion.cpp), and the argument
// checks every CPU entry point runs (a raw torch.ops.decafa.* call must raise, never crash or read out of
// bounds).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace decafa {
namespace cpu {

// The accumulation dtype of an input dtype: double for double, float otherwise (also the dtype of stats,
// beta_map and grad_beta).
at::ScalarType acc_type(at::ScalarType t);

// An empty stats (B, L, 2) = (max, sum of exp(s - max)) per map, and an empty grad_beta (B, L).
at::Tensor empty_stats(const at::Tensor& logits);
at::Tensor empty_grad_beta(const at::Tensor& logits);

// An optional incoming gradient as a contiguous tensor of the accumulation dtype, or undefined.
at::Tensor as_acc(const std::optional<at::Tensor>& grad, at::ScalarType logits_type);

// Argument checks; each raises a RuntimeError (TORCH_CHECK) naming the op and the argument.
// A floating (half, bfloat16, float, double) CPU tensor of rank `dim`.
void check_input(const at::Tensor& t, const char* op, const char* name, int64_t dim);
// logits (B, L, H, W) with L, H, W >= 1.
void check_logits(const at::Tensor& logits, const char* op);
// t has exactly `sizes` and, when `dtype` is given, that dtype.
void check_sizes(const at::Tensor& t, const char* op, const char* name, at::IntArrayRef sizes,
                 std::optional<at::ScalarType> dtype = std::nullopt);
// stats (B, L, 2) in the accumulation dtype of the logits.
void check_stats(const at::Tensor& stats, const at::Tensor& logits, const char* op);
// beta_map, when given: (B, L) in the accumulation dtype of the logits. Returns it contiguous (or undefined).
at::Tensor checked_beta_map(const std::optional<at::Tensor>& beta_map, const at::Tensor& logits, const char* op);
// An optional incoming gradient: when given, a floating CPU tensor of exactly `sizes`.
void check_grad(const std::optional<at::Tensor>& grad, const char* op, const char* name, at::IntArrayRef sizes);
// image (B, Ci, H, W) and embedding (B, C, H, W) agreeing with `like` (logits or image) in B, H, W and dtype.
void check_companion(const at::Tensor& t, const at::Tensor& like, const char* op, const char* name,
                     const char* like_name);
// mode 1..5 (F1..F5).
void check_mode(int64_t mode, const char* op);

// Per-map statistics of contiguous logits (B, L, H, W) in one pass over each map: fills stats (B, L, 2),
// and, when given, z (B, L, 2), phi (B, L, H, W) and mask, M = sum_l Phi_l as a contiguous (B, H*W) tensor
// of the accumulation dtype (summed from the same exp values, so M costs no second exp per pixel). With
// mask_partials instead of mask, M is left as partial sums over runs of maps, a (B, runs, H*W) tensor that
// sum_partial_masks (map_math.h) adds up in run order, giving M's bits. beta_map (contiguous (B, L),
// accumulation dtype), when defined, replaces beta map by map.
void map_statistics(const at::Tensor& logits, double beta, const at::Tensor& beta_map, bool normalized,
                    at::Tensor& stats, at::Tensor* z, at::Tensor* phi, at::Tensor* mask = nullptr,
                    at::Tensor* mask_partials = nullptr);

// Gradients of contiguous logits, and grad_beta (B, L), for a loss depending on z and M = sum_l Phi_l,
// recomputing Phi from the stats. grad_z (B, L, 2) and grad_mask (B, 1, H, W) are contiguous in the
// accumulation dtype, or undefined.
std::tuple<at::Tensor, at::Tensor> logits_gradient(const at::Tensor& logits, const at::Tensor& stats, double beta,
                                                   const at::Tensor& beta_map, bool normalized,
                                                   const at::Tensor& grad_z, const at::Tensor& grad_mask);

// Number of pixels one parallel task of a per-pixel-tile pass covers.
constexpr int64_t kPixelTile = 2048;

}  // namespace cpu
}  // namespace decafa
