// The per-map passes shared by the CPU ops (attention.cpp) and the fused head (fusion.cpp), the CPU glue's
// argument checks beside the shared ones of csrc/common/checks.h, and the CPU implementation of every op.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "../common/checks.h"
#include "../common/op_list.h"

namespace decafa {
namespace cpu {

// An empty stats (B, L, 2) = (max, sum of exp(s - max)) per map, and an empty grad_beta (B, L).
at::Tensor empty_stats(const at::Tensor& logits);
at::Tensor empty_grad_beta(const at::Tensor& logits);

// An optional incoming gradient as a contiguous tensor of the accumulation dtype, or undefined.
at::Tensor as_acc(const std::optional<at::Tensor>& grad, at::ScalarType logits_type);

// Argument checks: the shared ones are in csrc/common/checks.h (decafa::checks); these add what is the CPU
// glue's own. Each raises a RuntimeError (TORCH_CHECK) naming the op and the argument.
// `t` is a CPU tensor (the tensor that places the op; the others are checked against it).
void check_on_cpu(const char* op, const char* name, const at::Tensor& t);
// logits (B, L, H, W) with L, H, W >= 1, on the CPU.
void check_logits(const at::Tensor& logits, const char* op);
// beta_map, when given: (B, L) in the accumulation dtype of the logits. Returns it contiguous (or undefined).
at::Tensor checked_beta_map(const std::optional<at::Tensor>& beta_map, const at::Tensor& logits, const char* op);

// The CPU implementation of every op of the table: decafa::cpu::<op> (attention.cpp, fusion.cpp), declared
// from the table's list and registered from it (registration.cpp).
#define DECAFA_DECLARE_OP(name, returns, params) returns name params;
DECAFA_OPS(DECAFA_DECLARE_OP)
#undef DECAFA_DECLARE_OP

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
