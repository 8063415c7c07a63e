// CPU implementations of the attention ops: spatial_softmax, soft_argmax, attention_mask, landmark_attention
// and their backward. Maps are independent, so each pass is an at::parallel_for over maps or pixel tiles,
// without atomics: results do not depend on the thread count.
#include "attention.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "map_math.h"
#include "output_cache.h"

namespace decafa {
namespace cpu {

at::Tensor empty_stats(const at::Tensor& logits) {
  return at::empty({logits.size(0), logits.size(1), 2}, logits.options().dtype(acc_type(logits.scalar_type())));
}

at::Tensor empty_grad_beta(const at::Tensor& logits) {
  return at::empty({logits.size(0), logits.size(1)}, logits.options().dtype(acc_type(logits.scalar_type())));
}

at::Tensor as_acc(const std::optional<at::Tensor>& grad, at::ScalarType logits_type) {
  if (!grad.has_value() || !grad->defined()) return at::Tensor();
  return grad->to(acc_type(logits_type)).contiguous();
}

void check_on_cpu(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor for the CPU kernel, got ", t.device());
}

void check_logits(const at::Tensor& logits, const char* op) {
  checks::logits(op, logits);
  check_on_cpu(op, "logits", logits);
}

at::Tensor checked_beta_map(const std::optional<at::Tensor>& beta_map, const at::Tensor& logits, const char* op) {
  return checks::beta_map(op, beta_map, logits) ? beta_map->contiguous() : at::Tensor();
}

// Tasks a pass that sums a mask aims for: each image's maps are split into ceil(kMaskTasks / B) runs (at
// most L), each summing its Phi into its own partial mask. A function of the shape alone, so that the
// summation order, and so the result, does not depend on the thread count. Each run costs one zeroed and
// summed plane, so runs are few: 16 tasks keep 16 threads busy at B = 1.
constexpr int64_t kMaskTasks = 16;

// Calls maps(first, last, scratch, mask_acc) over every map of B images of L maps, in parallel, each call
// on a run of maps with `scratch` (scratch_size values) to itself. Without `mask` or `partials`, mask_acc
// is null. Otherwise each run lies in one image and gets its own zeroed partial mask as mask_acc: with
// `mask` (contiguous (B, hw) in acc_t) the partials are then added into it in run order; with `partials`
// they are left to the caller as a (B, runs, hw) tensor (sum_partial_masks adds them up).
template <typename acc_t, typename Maps>
void for_each_map(int64_t B, int64_t L, int64_t hw, int64_t scratch_size, at::Tensor* mask, at::Tensor* partials,
                  Maps maps) {
  if (mask == nullptr && partials == nullptr) {
    at::parallel_for(0, B * L, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> scratch(scratch_size);
      maps(begin, end, scratch.data(), nullptr);
    });
    return;
  }
  const int64_t runs = std::clamp<int64_t>((kMaskTasks + B - 1) / std::max<int64_t>(B, 1), 1, std::max<int64_t>(L, 1));
  const at::TensorOptions options = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  // (B, runs, hw) partial masks; the mask itself when there is one run per image
  at::Tensor partial = runs == 1 && mask != nullptr ? *mask : empty_output({B, runs, hw}, options);
  acc_t* partial_p = partial.data_ptr<acc_t>();
  at::parallel_for(0, B * runs, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(scratch_size);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / runs, run = task % runs;
      acc_t* acc = partial_p + task * hw;
      std::fill(acc, acc + hw, acc_t(0));
      maps(b * L + run * L / runs, b * L + (run + 1) * L / runs, scratch.data(), acc);
    }
  });
  if (partials != nullptr) {
    *partials = partial;
    return;
  }
  if (runs == 1) return;
  acc_t* m_p = mask->data_ptr<acc_t>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) sum_partial_masks(partial_p + b * runs * hw, runs, hw, 0, hw, m_p + b * hw);
  });
}

void map_statistics(const at::Tensor& logits, double beta, const at::Tensor& beta_map, bool normalized,
                    at::Tensor& stats, at::Tensor* z, at::Tensor* phi, at::Tensor* mask, at::Tensor* mask_partials) {
  const int64_t B = logits.size(0), L = logits.size(1), H = logits.size(2), W = logits.size(3), hw = H * W;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "decafa_map_statistics", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* t = logits.const_data_ptr<scalar_t>();
    const acc_t* bm = beta_map.defined() ? beta_map.const_data_ptr<acc_t>() : nullptr;
    acc_t* stats_p = stats.data_ptr<acc_t>();
    scalar_t* z_p = z != nullptr ? z->data_ptr<scalar_t>() : nullptr;
    scalar_t* phi_p = phi != nullptr ? phi->data_ptr<scalar_t>() : nullptr;
    const std::vector<acc_t> xs = axis_coordinates<acc_t>(W, normalized), ys = axis_coordinates<acc_t>(H, normalized);
    // scratch: e of up to kMaskGroup maps when M is summed (added into it a group at a time), else of one
    const bool summing = mask != nullptr || mask_partials != nullptr;
    const int64_t group = summing ? kMaskGroup : 1;
    // a large Phi is staged after them and streamed out
    const bool stream = phi != nullptr && phi->nbytes() >= kStreamingBytes;
    const int64_t scratch = group * hw + (stream ? (hw * int64_t(sizeof(scalar_t)) + sizeof(acc_t) - 1) / sizeof(acc_t) : 0);
    for_each_map<acc_t>(B, L, hw, scratch, mask, mask_partials, [&](int64_t first, int64_t last, acc_t* e_group, acc_t* mask_acc) {
      scalar_t* staging = stream ? reinterpret_cast<scalar_t*>(e_group + group * hw) : nullptr;
      for (int64_t group_first = first; group_first < last; group_first += group) {
        const int count = static_cast<int>(std::min(group, last - group_first));
        acc_t scale[kMaskGroup];
        for (int k = 0; k < count; ++k) {
          const int64_t map = group_first + k;
          const acc_t b = bm != nullptr ? bm[map] : static_cast<acc_t>(beta);
          const acc_t m = scaled_max(t + map * hw, hw, b);
          // e = exp(s - m) kept in the scratch only when Phi or M is wanted
          acc_t* e = phi_p != nullptr || mask_acc != nullptr ? e_group + k * hw : nullptr;
          // m = +-inf: beta * t overflows this map, whose Phi is then the limit of the softmax (map_math.h)
          const MapLimit<acc_t> limit = overflowed(m) ? map_limit(t + map * hw, hw, b) : MapLimit<acc_t>{};
          const MapStats<acc_t> st =
              limit.exact ? limit_sums(t + map * hw, H, W, limit, z_p != nullptr, xs.data(), ys.data(), e)
                          : exp_sums(t + map * hw, H, W, b, m, z_p != nullptr, xs.data(), ys.data(), e);
          stats_p[2 * map] = m;
          stats_p[2 * map + 1] = st.sum;
          if (z_p != nullptr) {
            z_p[2 * map] = to_storage<scalar_t>(st.zx);
            z_p[2 * map + 1] = to_storage<scalar_t>(st.zy);
          }
          scale[k] = acc_t(1) / st.sum;  // Phi = e * scale
          if (phi_p != nullptr && staging != nullptr) {
            store_scaled(e, hw, scale[k], staging);
            stream_copy(phi_p + map * hw, staging, hw * sizeof(scalar_t));
          } else if (phi_p != nullptr) {
            store_scaled(e, hw, scale[k], phi_p + map * hw);
          }
        }
        if (mask_acc != nullptr) accumulate_group(e_group, hw, count, scale, mask_acc);
      }
      if (stream) stream_fence();
    });
  });
}

std::tuple<at::Tensor, at::Tensor> logits_gradient(const at::Tensor& logits, const at::Tensor& stats, double beta,
                                                   const at::Tensor& beta_map, bool normalized,
                                                   const at::Tensor& grad_z, const at::Tensor& grad_mask) {
  const int64_t B = logits.size(0), L = logits.size(1), H = logits.size(2), W = logits.size(3), hw = H * W;
  at::Tensor grad = empty_output_like(logits);
  at::Tensor grad_beta = empty_grad_beta(logits);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "decafa_logits_gradient", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* t = logits.const_data_ptr<scalar_t>();
    const acc_t* stats_p = stats.const_data_ptr<acc_t>();
    const acc_t* bm = beta_map.defined() ? beta_map.const_data_ptr<acc_t>() : nullptr;
    const acc_t* gz = grad_z.defined() ? grad_z.const_data_ptr<acc_t>() : nullptr;
    const acc_t* gm = grad_mask.defined() ? grad_mask.const_data_ptr<acc_t>() : nullptr;
    scalar_t* out = grad.data_ptr<scalar_t>();
    acc_t* gb = grad_beta.data_ptr<acc_t>();
    const std::vector<acc_t> xs = axis_coordinates<acc_t>(W, normalized), ys = axis_coordinates<acc_t>(H, normalized);
    // grad_t rows are staged in the scratch after Phi and streamed out when grad_t is large
    const bool stream = grad.nbytes() >= kStreamingBytes;
    const int64_t staging_values = stream ? (W * int64_t(sizeof(scalar_t)) + sizeof(acc_t) - 1) / sizeof(acc_t) : 0;
    for_each_map<acc_t>(B, L, hw, hw + staging_values, nullptr, nullptr, [&](int64_t first, int64_t last, acc_t* phi, acc_t*) {
      scalar_t* staging = stream ? reinterpret_cast<scalar_t*>(phi + hw) : nullptr;
      for (int64_t map = first; map < last; ++map) {
        const int64_t b = map / L;
        const acc_t beta_eff = bm != nullptr ? bm[map] : static_cast<acc_t>(beta);
        const acc_t* gm_b = gm != nullptr ? gm + b * hw : nullptr;
        if (saved_as_limit(stats_p[2 * map], stats_p[2 * map + 1])) {
          gb[map] = limit_grad(t + map * hw, H, W, map_limit(t + map * hw, hw, beta_eff), beta_eff,
                               static_cast<const scalar_t*>(nullptr), xs.data(), ys.data(),
                               gz != nullptr ? gz + 2 * map : nullptr, gm_b, out + map * hw);
          continue;
        }
        const PhiSums<acc_t> sums = phi_with_sums(t + map * hw, H, W, beta_eff, stats_p[2 * map], stats_p[2 * map + 1],
                                                  xs.data(), ys.data(), gz != nullptr, gm_b, phi);
        gb[map] = landmark_grad(phi, sums, t + map * hw, H, W, beta_eff, xs.data(), ys.data(),
                                gz != nullptr ? gz + 2 * map : nullptr, gm_b, out + map * hw, staging);
      }
      if (stream) stream_fence();
    });
  });
  return {grad, grad_beta};
}

std::tuple<at::Tensor, at::Tensor> spatial_softmax(const at::Tensor& logits_in, double beta,
                                                   const std::optional<at::Tensor>& beta_map_in) {
  const char* op = "spatial_softmax";
  check_logits(logits_in, op);
  const at::Tensor beta_map = checked_beta_map(beta_map_in, logits_in, op);
  const at::Tensor logits = logits_in.contiguous();
  at::Tensor stats = empty_stats(logits);
  at::Tensor phi = empty_output_like(logits);
  map_statistics(logits, beta, beta_map, false, stats, nullptr, &phi);
  return {phi, stats};
}

std::tuple<at::Tensor, at::Tensor> spatial_softmax_backward(const at::Tensor& grad_phi_in, const at::Tensor& logits_in,
                                                            const at::Tensor& stats_in, double beta,
                                                            const std::optional<at::Tensor>& beta_map_in) {
  const char* op = "spatial_softmax_backward";
  check_logits(logits_in, op);
  checks::grad(op, "grad_phi", grad_phi_in, logits_in.sizes(), "logits", logits_in);
  checks::stats(op, stats_in, logits_in);
  const at::Tensor beta_map = checked_beta_map(beta_map_in, logits_in, op);
  const at::Tensor logits = logits_in.contiguous(), stats = stats_in.contiguous();
  const at::Tensor grad_phi = grad_phi_in.to(logits.scalar_type()).contiguous();
  const int64_t L = logits.size(1), maps = logits.size(0) * L, hw = logits.size(2) * logits.size(3);
  at::Tensor grad = empty_output_like(logits);
  at::Tensor grad_beta = empty_grad_beta(logits);
  if (grad.numel() == 0) return {grad, grad_beta};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "decafa_softmax_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* t = logits.const_data_ptr<scalar_t>();
    const scalar_t* g = grad_phi.const_data_ptr<scalar_t>();
    const acc_t* stats_p = stats.const_data_ptr<acc_t>();
    const acc_t* bm = beta_map.defined() ? beta_map.const_data_ptr<acc_t>() : nullptr;
    scalar_t* out = grad.data_ptr<scalar_t>();
    acc_t* gb = grad_beta.data_ptr<acc_t>();
    at::parallel_for(0, maps, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> phi(hw);
      for (int64_t map = begin; map < end; ++map) {
        const acc_t b = bm != nullptr ? bm[map] : static_cast<acc_t>(beta);
        if (saved_as_limit(stats_p[2 * map], stats_p[2 * map + 1])) {
          gb[map] = limit_grad(t + map * hw, logits.size(2), logits.size(3), map_limit(t + map * hw, hw, b), b,
                               g + map * hw, static_cast<const acc_t*>(nullptr), static_cast<const acc_t*>(nullptr),
                               static_cast<const acc_t*>(nullptr), static_cast<const acc_t*>(nullptr),
                               out + map * hw);
          continue;
        }
        recompute_phi(t + map * hw, hw, b, stats_p[2 * map], stats_p[2 * map + 1], phi.data());
        gb[map] = softmax_grad(phi.data(), g + map * hw, t + map * hw, hw, b, out + map * hw);
      }
    });
  });
  return {grad, grad_beta};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_forward(const at::Tensor& logits_in, double beta,
                                                                 const std::optional<at::Tensor>& beta_map_in,
                                                                 bool normalized, bool want_z, bool want_mask,
                                                                 const char* op) {
  check_logits(logits_in, op);
  const at::Tensor beta_map = checked_beta_map(beta_map_in, logits_in, op);
  const at::Tensor logits = logits_in.contiguous();
  const int64_t B = logits.size(0), L = logits.size(1), H = logits.size(2), W = logits.size(3);
  at::Tensor stats = empty_stats(logits);
  at::Tensor z = want_z ? at::empty({B, L, 2}, logits.options()) : at::Tensor();
  at::Tensor mask = want_mask ? empty_output({B, 1, H, W}, logits.options()) : at::Tensor();
  // M is summed in the accumulation dtype: straight into `mask` when that is the output dtype too
  const at::ScalarType acc = acc_type(logits.scalar_type());
  at::Tensor mask_acc;
  if (want_mask) {
    mask_acc = acc == logits.scalar_type() ? mask.view({B, H * W}) : empty_output({B, H * W}, mask.options().dtype(acc));
  }
  map_statistics(logits, beta, beta_map, normalized, stats, want_z ? &z : nullptr, nullptr,
                 want_mask ? &mask_acc : nullptr);
  if (want_mask && acc != logits.scalar_type()) mask.view({B, H * W}).copy_(mask_acc);
  return {z, mask, stats};
}

std::tuple<at::Tensor, at::Tensor> soft_argmax(const at::Tensor& logits, double beta,
                                               const std::optional<at::Tensor>& beta_map, bool normalized) {
  auto [z, mask, stats] = attention_forward(logits, beta, beta_map, normalized, true, false, "soft_argmax");
  return {z, stats};
}

std::tuple<at::Tensor, at::Tensor> attention_mask(const at::Tensor& logits, double beta,
                                                  const std::optional<at::Tensor>& beta_map) {
  auto [z, mask, stats] = attention_forward(logits, beta, beta_map, false, false, true, "attention_mask");
  return {mask, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> landmark_attention(const at::Tensor& logits, double beta,
                                                                  const std::optional<at::Tensor>& beta_map,
                                                                  bool normalized) {
  return attention_forward(logits, beta, beta_map, normalized, true, true, "landmark_attention");
}

std::tuple<at::Tensor, at::Tensor> landmark_attention_backward(const std::optional<at::Tensor>& grad_z,
                                                               const std::optional<at::Tensor>& grad_mask,
                                                               const at::Tensor& logits, const at::Tensor& stats,
                                                               double beta,
                                                               const std::optional<at::Tensor>& beta_map_in,
                                                               bool normalized) {
  const char* op = "landmark_attention_backward";
  check_logits(logits, op);
  const int64_t B = logits.size(0), L = logits.size(1), H = logits.size(2), W = logits.size(3);
  checks::optional_grad(op, "grad_z", grad_z, {B, L, 2}, "logits", logits);
  checks::optional_grad(op, "grad_mask", grad_mask, {B, 1, H, W}, "logits", logits);
  checks::stats(op, stats, logits);
  const at::Tensor beta_map = checked_beta_map(beta_map_in, logits, op);
  const at::ScalarType t = logits.scalar_type();
  return logits_gradient(logits.contiguous(), stats.contiguous(), beta, beta_map, normalized, as_acc(grad_z, t),
                         as_acc(grad_mask, t));
}

}  // namespace cpu
}  // namespace decafa
