// The argument checks of the C++ glue, shared by the CPU kernels (csrc/cpu/) and the CUDA glue (csrc/cuda/):
// a raw torch.ops.decafa.* call with a bad argument must raise, never crash or read out of bounds. Each check
// raises a RuntimeError (TORCH_CHECK) that names the op and the argument. The shapes are the op table's
// (TENSOR_ARGS in decafa_fast/contract/table.py).
//
// Nothing here knows the device: each glue checks that the tensor that places the op (the logits, or fuse's
// image) is on its device and takes its dtype; every other tensor is checked against that one here.
// Header-only, on ATen/core/Tensor.h alone: nvcc compiles it with the CUDA glue, the host compiler with the
// CPU kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>

namespace decafa {

// The accumulation dtype of a data dtype: double for double, float otherwise (also the dtype of stats,
// beta_map and grad_beta).
inline at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

namespace checks {

inline bool is_floating(at::ScalarType s) {
  return s == at::kHalf || s == at::kBFloat16 || s == at::kFloat || s == at::kDouble;
}

// A floating tensor (float16, bfloat16, float32 or float64) of rank `rank`.
inline void tensor(const char* op, const char* name, const at::Tensor& t, int64_t rank) {
  TORCH_CHECK(t.defined(), op, ": ", name, " must be a tensor, got None");
  TORCH_CHECK(t.dim() == rank, op, ": ", name, " must have rank ", rank, ", got shape ", t.sizes());
  TORCH_CHECK(is_floating(t.scalar_type()), op, ": ", name, " must be float16, bfloat16, float32 or float64, got ",
              t.scalar_type());
}

// t has exactly the sizes `want`.
inline void sizes(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef want) {
  TORCH_CHECK(t.sizes() == want, op, ": ", name, " must have shape ", want, ", got ", t.sizes());
}

// t on the device of `ref`.
inline void same_device(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                        const at::Tensor& ref) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device(), "; put them on one device");
}

// t in the dtype of `ref`.
inline void same_dtype(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                       const at::Tensor& ref) {
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have the dtype of ", ref_name, " (",
              ref.scalar_type(), "), got ", t.scalar_type());
}

// logits (B, L, H, W) with L, H, W >= 1 (the softmax of no pixels is undefined).
inline void logits(const char* op, const at::Tensor& t) {
  tensor(op, "logits", t, 4);
  TORCH_CHECK(t.size(1) >= 1 && t.size(2) >= 1 && t.size(3) >= 1, op,
              ": logits (B, L, H, W) must have L, H, W >= 1, got shape ", t.sizes());
}

// A (B, C, H, W) companion of `ref` (the logits, or fuse's image): its B, H, W, dtype and device; C is free.
inline void companion(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                      const at::Tensor& ref) {
  tensor(op, name, t, 4);
  TORCH_CHECK(t.size(0) == ref.size(0) && t.size(2) == ref.size(2) && t.size(3) == ref.size(3), op, ": ", name,
              " must match ", ref_name, " in batch and spatial size (B=", ref.size(0), ", H=", ref.size(2),
              ", W=", ref.size(3), "), got shape ", t.sizes());
  same_dtype(op, name, t, ref_name, ref);
  same_device(op, name, t, ref_name, ref);
}

// mask (B, 1, H, W), a companion of `ref`.
inline void mask(const char* op, const at::Tensor& t, const char* ref_name, const at::Tensor& ref) {
  companion(op, "mask", t, ref_name, ref);
  TORCH_CHECK(t.size(1) == 1, op, ": mask must have 1 channel, shape (B, 1, H, W), got shape ", t.sizes());
}

// A (B, L, ...) tensor of the logits' statistics (stats (B, L, 2), beta_map (B, L)): `want` sizes, the
// accumulation dtype of the logits, their device.
inline void per_map(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef want,
                    const at::Tensor& logits) {
  tensor(op, name, t, static_cast<int64_t>(want.size()));
  sizes(op, name, t, want);
  const at::ScalarType acc = acc_type(logits.scalar_type());
  TORCH_CHECK(t.scalar_type() == acc, op, ": ", name, " must have dtype ", acc,
              " (the accumulation dtype of the logits), got ", t.scalar_type());
  same_device(op, name, t, "logits", logits);
}

// stats (B, L, 2) of the logits.
inline void stats(const char* op, const at::Tensor& t, const at::Tensor& logits) {
  per_map(op, "stats", t, {logits.size(0), logits.size(1), 2}, logits);
}

// beta_map, when given: (B, L) of the logits. Returns whether it was given.
inline bool beta_map(const char* op, const std::optional<at::Tensor>& t, const at::Tensor& logits) {
  if (!t.has_value() || !t->defined()) return false;
  per_map(op, "beta_map", *t, {logits.size(0), logits.size(1)}, logits);
  return true;
}

// An incoming gradient: a floating tensor of exactly `want` sizes on the device of `ref`. Its dtype may
// differ from the data's where the glue converts it.
inline void grad(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef want, const char* ref_name,
                 const at::Tensor& ref) {
  tensor(op, name, t, static_cast<int64_t>(want.size()));
  sizes(op, name, t, want);
  same_device(op, name, t, ref_name, ref);
}

// An optional incoming gradient (None for an output the loss does not use). Returns whether it was given.
inline bool optional_grad(const char* op, const char* name, const std::optional<at::Tensor>& t, at::IntArrayRef want,
                          const char* ref_name, const at::Tensor& ref) {
  if (!t.has_value() || !t->defined()) return false;
  grad(op, name, *t, want, ref_name, ref);
  return true;
}

// mode: the fusion number 1..5 (F1..F5).
inline int mode(const char* op, int64_t m) {
  TORCH_CHECK(m >= 1 && m <= 5, op, ": mode must be 1..5 (F1..F5), got ", m);
  return static_cast<int>(m);
}

}  // namespace checks
}  // namespace decafa
