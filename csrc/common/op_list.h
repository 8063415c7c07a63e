// Generated from decafa_fast/contract/table.py by `python3 -m decafa_fast.contract.op_list`: do not edit.
//
// DECAFA_OPS(X) expands X(name, returns, params) once per op of the table, in table order, with the C++
// signature torch.library gives a kernel of the op's schema. The glue declares its implementations from it
// and registers them with it, so that an op added to the table is registered by every glue (and fails to
// build or load until each defines it):
//   CPU:  decafa::cpu::<name>     (csrc/cpu/registration.cpp)
//   CUDA: <name>_cuda             (csrc/cuda/decafa_cuda.cu)
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace decafa {
using Tensors2 = std::tuple<at::Tensor, at::Tensor>;
using Tensors3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Tensors4 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
}  // namespace decafa

#define DECAFA_OPS(X) \
  X(spatial_softmax, decafa::Tensors2, \
    (const at::Tensor& logits, double beta, const std::optional<at::Tensor>& beta_map)) \
  X(spatial_softmax_backward, decafa::Tensors2, \
    (const at::Tensor& grad_phi, const at::Tensor& logits, const at::Tensor& stats, double beta, const std::optional<at::Tensor>& beta_map)) \
  X(soft_argmax, decafa::Tensors2, \
    (const at::Tensor& logits, double beta, const std::optional<at::Tensor>& beta_map, bool normalized)) \
  X(attention_mask, decafa::Tensors2, \
    (const at::Tensor& logits, double beta, const std::optional<at::Tensor>& beta_map)) \
  X(landmark_attention, decafa::Tensors3, \
    (const at::Tensor& logits, double beta, const std::optional<at::Tensor>& beta_map, bool normalized)) \
  X(landmark_attention_backward, decafa::Tensors2, \
    (const std::optional<at::Tensor>& grad_z, const std::optional<at::Tensor>& grad_mask, const at::Tensor& logits, const at::Tensor& stats, double beta, const std::optional<at::Tensor>& beta_map, bool normalized)) \
  X(fuse, at::Tensor, \
    (const at::Tensor& image, const at::Tensor& embedding, const at::Tensor& mask, int64_t mode)) \
  X(fuse_backward, decafa::Tensors3, \
    (const at::Tensor& grad_fused, const at::Tensor& image, const at::Tensor& embedding, const at::Tensor& mask, int64_t mode)) \
  X(decafa_head, decafa::Tensors4, \
    (const at::Tensor& logits, const at::Tensor& image, const at::Tensor& embedding, int64_t mode, double beta, const std::optional<at::Tensor>& beta_map, bool normalized)) \
  X(decafa_head_backward, decafa::Tensors4, \
    (const std::optional<at::Tensor>& grad_z, const std::optional<at::Tensor>& grad_fused, const at::Tensor& logits, const at::Tensor& image, const at::Tensor& embedding, const at::Tensor& mask, const at::Tensor& stats, int64_t mode, double beta, const std::optional<at::Tensor>& beta_map, bool normalized))
