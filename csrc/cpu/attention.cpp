// CPU implementations of the attention ops: spatial_softmax, soft_argmax, attention_mask, landmark_attention
// and their backward. Maps are independent, so each pass is an at::parallel_for over maps or pixel tiles,
// without atomics: results do not depend on the thread count.
#include "attention.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "map_math.h"

namespace decafa {
namespace cpu {
namespace {

void check_logits(const at::Tensor& logits, const char* op) {
  TORCH_CHECK(logits.dim() == 4, op, ": logits must have shape (B, L, H, W), got ", logits.sizes());
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), op, ": logits must be floating point, got ",
              logits.scalar_type());
}

}  // namespace

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

at::Tensor empty_lse(const at::Tensor& logits) {
  return at::empty({logits.size(0), logits.size(1)}, logits.options().dtype(acc_type(logits.scalar_type())));
}

at::Tensor as_acc(const std::optional<at::Tensor>& grad, at::ScalarType logits_type) {
  if (!grad.has_value() || !grad->defined()) return at::Tensor();
  return grad->to(acc_type(logits_type)).contiguous();
}

// Tasks a pass that sums a mask aims for: each image's maps are split into ceil(kMaskTasks / B) runs (at
// most L), each summing its Phi into its own partial mask. A function of the shape alone, so that the
// summation order, and so the result, does not depend on the thread count.
constexpr int64_t kMaskTasks = 64;

// Calls maps(first, last, scratch, mask_acc) over every map of B images of L maps, in parallel, each call
// on a run of maps with `scratch` (hw values) to itself. Without `mask`, mask_acc is null. With `mask`
// (contiguous (B, hw) in acc_t), each run lies in one image and gets its own zeroed partial mask as
// mask_acc; the partials are then added into `mask` in run order.
template <typename acc_t, typename Maps>
void for_each_map(int64_t B, int64_t L, int64_t hw, at::Tensor* mask, Maps maps) {
  if (mask == nullptr) {
    at::parallel_for(0, B * L, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> scratch(hw);
      maps(begin, end, scratch.data(), nullptr);
    });
    return;
  }
  const int64_t runs = std::clamp<int64_t>((kMaskTasks + B - 1) / std::max<int64_t>(B, 1), 1, std::max<int64_t>(L, 1));
  // (B, runs, hw) partial masks; the mask itself when there is one run per image
  at::Tensor partial = runs == 1 ? *mask : at::empty({B, runs, hw}, mask->options());
  acc_t* partial_p = partial.data_ptr<acc_t>();
  at::parallel_for(0, B * runs, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(hw);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / runs, run = task % runs;
      acc_t* acc = partial_p + task * hw;
      std::fill(acc, acc + hw, acc_t(0));
      maps(b * L + run * L / runs, b * L + (run + 1) * L / runs, scratch.data(), acc);
    }
  });
  if (runs == 1) return;
  acc_t* m_p = mask->data_ptr<acc_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const acc_t* first = partial_p + b * runs * hw;
      std::copy(first, first + hw, m_p + b * hw);
      for (int64_t run = 1; run < runs; ++run) accumulate_scaled(first + run * hw, hw, acc_t(1), m_p + b * hw);
    }
  });
}

void map_statistics(const at::Tensor& logits, double beta, bool normalized, at::Tensor& lse, at::Tensor* z,
                    at::Tensor* phi, at::Tensor* mask) {
  const int64_t B = logits.size(0), L = logits.size(1), H = logits.size(2), W = logits.size(3), hw = H * W;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "decafa_map_statistics", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* t = logits.const_data_ptr<scalar_t>();
    acc_t* lse_p = lse.data_ptr<acc_t>();
    scalar_t* z_p = z != nullptr ? z->data_ptr<scalar_t>() : nullptr;
    scalar_t* phi_p = phi != nullptr ? phi->data_ptr<scalar_t>() : nullptr;
    const std::vector<acc_t> xs = axis_coordinates<acc_t>(W, normalized), ys = axis_coordinates<acc_t>(H, normalized);
    for_each_map<acc_t>(B, L, hw, mask, [&](int64_t first, int64_t last, acc_t* a, acc_t* mask_acc) {
      for (int64_t map = first; map < last; ++map) {
        const acc_t m = load_scaled_max(t + map * hw, hw, static_cast<acc_t>(beta), a);
        const MapStats<acc_t> st = exp_sums(a, m, H, W, z_p != nullptr, xs.data(), ys.data());
        lse_p[map] = st.lse;
        if (z_p != nullptr) {
          z_p[2 * map] = to_storage<scalar_t>(st.zx);
          z_p[2 * map + 1] = to_storage<scalar_t>(st.zy);
        }
        const acc_t scale = std::exp(m - st.lse);  // Phi = a * scale
        if (phi_p != nullptr) store_scaled(a, hw, scale, phi_p + map * hw);
        if (mask_acc != nullptr) accumulate_scaled(a, hw, scale, mask_acc);
      }
    });
  });
}

at::Tensor logits_gradient(const at::Tensor& logits, const at::Tensor& lse, double beta, bool normalized,
                           const at::Tensor& grad_z, const at::Tensor& grad_mask, at::Tensor* mask) {
  const int64_t B = logits.size(0), L = logits.size(1), H = logits.size(2), W = logits.size(3), hw = H * W;
  at::Tensor grad = at::empty_like(logits, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "decafa_logits_gradient", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* t = logits.const_data_ptr<scalar_t>();
    const acc_t* lse_p = lse.const_data_ptr<acc_t>();
    const acc_t* gz = grad_z.defined() ? grad_z.const_data_ptr<acc_t>() : nullptr;
    const acc_t* gm = grad_mask.defined() ? grad_mask.const_data_ptr<acc_t>() : nullptr;
    scalar_t* out = grad.data_ptr<scalar_t>();
    const std::vector<acc_t> xs = axis_coordinates<acc_t>(W, normalized), ys = axis_coordinates<acc_t>(H, normalized);
    for_each_map<acc_t>(B, L, hw, mask, [&](int64_t first, int64_t last, acc_t* phi, acc_t* mask_acc) {
      for (int64_t map = first; map < last; ++map) {
        const int64_t b = map / L;
        recompute_phi(t + map * hw, hw, static_cast<acc_t>(beta), lse_p[map], phi);
        landmark_grad(phi, H, W, static_cast<acc_t>(beta), xs.data(), ys.data(), gz != nullptr ? gz + 2 * map : nullptr,
                      gm != nullptr ? gm + b * hw : nullptr, out + map * hw);
        if (mask_acc != nullptr) accumulate_scaled(phi, hw, acc_t(1), mask_acc);
      }
    });
  });
  return grad;
}

namespace {

std::tuple<at::Tensor, at::Tensor> spatial_softmax(const at::Tensor& logits_in, double beta) {
  check_logits(logits_in, "spatial_softmax");
  const at::Tensor logits = logits_in.contiguous();
  at::Tensor lse = empty_lse(logits);
  at::Tensor phi = at::empty_like(logits, at::MemoryFormat::Contiguous);
  map_statistics(logits, beta, false, lse, nullptr, &phi);
  return {phi, lse};
}

at::Tensor spatial_softmax_backward(const at::Tensor& grad_phi_in, const at::Tensor& logits_in,
                                    const at::Tensor& lse, double beta) {
  check_logits(logits_in, "spatial_softmax_backward");
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor grad_phi = grad_phi_in.contiguous();
  const int64_t maps = logits.size(0) * logits.size(1), hw = logits.size(2) * logits.size(3);
  at::Tensor grad = at::empty_like(logits, at::MemoryFormat::Contiguous);
  if (grad.numel() == 0) return grad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "decafa_softmax_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* t = logits.const_data_ptr<scalar_t>();
    const scalar_t* g = grad_phi.const_data_ptr<scalar_t>();
    const acc_t* lse_p = lse.const_data_ptr<acc_t>();
    scalar_t* out = grad.data_ptr<scalar_t>();
    const acc_t b = static_cast<acc_t>(beta);
    at::parallel_for(0, maps, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> phi(hw);
      for (int64_t map = begin; map < end; ++map) {
        recompute_phi(t + map * hw, hw, b, lse_p[map], phi.data());
        softmax_grad(phi.data(), g + map * hw, hw, b, out + map * hw);
      }
    });
  });
  return grad;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_forward(const at::Tensor& logits_in, double beta,
                                                                 bool normalized, bool want_z, bool want_mask,
                                                                 const char* op) {
  check_logits(logits_in, op);
  const at::Tensor logits = logits_in.contiguous();
  const int64_t B = logits.size(0), L = logits.size(1), H = logits.size(2), W = logits.size(3);
  at::Tensor lse = empty_lse(logits);
  at::Tensor z = want_z ? at::empty({B, L, 2}, logits.options()) : at::Tensor();
  at::Tensor mask = want_mask ? at::empty({B, 1, H, W}, logits.options()) : at::Tensor();
  // M is summed in the accumulation dtype: straight into `mask` when that is the output dtype too
  const at::ScalarType acc = acc_type(logits.scalar_type());
  at::Tensor mask_acc;
  if (want_mask) {
    mask_acc = acc == logits.scalar_type() ? mask.view({B, H * W}) : at::empty({B, H * W}, mask.options().dtype(acc));
  }
  map_statistics(logits, beta, normalized, lse, want_z ? &z : nullptr, nullptr, want_mask ? &mask_acc : nullptr);
  if (want_mask && acc != logits.scalar_type()) mask.view({B, H * W}).copy_(mask_acc);
  return {z, mask, lse};
}

std::tuple<at::Tensor, at::Tensor> soft_argmax(const at::Tensor& logits, double beta, bool normalized) {
  auto [z, mask, lse] = attention_forward(logits, beta, normalized, true, false, "soft_argmax");
  return {z, lse};
}

std::tuple<at::Tensor, at::Tensor> attention_mask(const at::Tensor& logits, double beta) {
  auto [z, mask, lse] = attention_forward(logits, beta, false, false, true, "attention_mask");
  return {mask, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> landmark_attention(const at::Tensor& logits, double beta,
                                                                  bool normalized) {
  return attention_forward(logits, beta, normalized, true, true, "landmark_attention");
}

at::Tensor landmark_attention_backward(const std::optional<at::Tensor>& grad_z,
                                       const std::optional<at::Tensor>& grad_mask, const at::Tensor& logits,
                                       const at::Tensor& lse, double beta, bool normalized) {
  check_logits(logits, "landmark_attention_backward");
  const at::ScalarType t = logits.scalar_type();
  return logits_gradient(logits.contiguous(), lse.contiguous(), beta, normalized, as_acc(grad_z, t),
                         as_acc(grad_mask, t));
}

}  // namespace

TORCH_LIBRARY_IMPL(decafa, CPU, m) {
  m.impl("spatial_softmax", &spatial_softmax);
  m.impl("spatial_softmax_backward", &spatial_softmax_backward);
  m.impl("soft_argmax", &soft_argmax);
  m.impl("attention_mask", &attention_mask);
  m.impl("landmark_attention", &landmark_attention);
  m.impl("landmark_attention_backward", &landmark_attention_backward);
}

}  // namespace cpu
}  // namespace decafa
