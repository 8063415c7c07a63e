// CPU implementations of the fusion ops: fuse (F1-F5 from a given mask), its backward, and the fused head
// decafa_head (statistics per map, summing M on the side; then per pixel tile the fusion channels written
// directly; Phi is never stored; M and the stats are returned for the backward) with its backward (one
// pixel-tile pass for the image, embedding and mask gradients from the saved M, then one per-map pass that
// recomputes Phi from the stats for the logits gradient and grad_beta). F is in E's memory format.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <vector>

#include "attention.h"
#include "fusion_tiles.h"
#include "map_math.h"
#include "output_cache.h"

namespace decafa {
namespace cpu {
namespace {

at::Tensor empty_fused(const at::Tensor& like, const Segments& layout) {
  return empty_output({like.size(0), layout.channels, like.size(2), like.size(3)}, like.options());
}

// F in the memory format of E: channels_last when E is channels_last and not also plain contiguous. The
// kernels write contiguous F; a channels_last E costs one copy at the end.
at::Tensor in_format_of(const at::Tensor& fused, const at::Tensor& embedding) {
  if (embedding.is_contiguous(at::MemoryFormat::ChannelsLast) && !embedding.is_contiguous()) {
    return empty_output(fused.sizes(), fused.options(), at::MemoryFormat::ChannelsLast).copy_(fused);
  }
  return fused;
}

// Per pixel tile of each image: the fusion channels of image / embedding with the mask, where the mask tile
// comes from `mask_of(b, p0, n, acc)` (called for every tile, even when F has no channels). Called inside a
// dtype dispatch.
template <typename scalar_t, typename MaskOf>
void write_fusion(const at::Tensor& image, const at::Tensor& embedding, const Segments& layout, at::Tensor& out,
                  MaskOf mask_of) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = image.size(0), ci = image.size(1), ce = embedding.size(1);
  const int64_t hw = image.size(2) * image.size(3), tiles = (hw + kPixelTile - 1) / kPixelTile;
  {
    const scalar_t* img = image.const_data_ptr<scalar_t>();
    const scalar_t* emb = embedding.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const bool stream = out.nbytes() >= kStreamingBytes;
    at::parallel_for(0, B * tiles, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> mask(kPixelTile);
      alignas(64) scalar_t staging[kPixelTile];
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / tiles, p0 = (task % tiles) * kPixelTile, n = std::min(kPixelTile, hw - p0);
        mask_of(b, p0, n, mask.data());
        fuse_tile(layout, img + b * ci * hw, ci, emb + b * ce * hw, ce, mask.data(), hw, p0, n,
                  o + b * layout.channels * hw, stream ? staging : nullptr);
      }
      if (stream) stream_fence();
    });
  }
}

// Per pixel tile: the mask gradient in the accumulation dtype (grad_mask, when defined) and the gradients of
// image and embedding (grad_image and grad_embedding, when defined; they need `mask`, (B, H*W) in the
// accumulation dtype). Called inside a dtype dispatch.
template <typename scalar_t>
void fusion_gradients(const at::Tensor& grad, const at::Tensor& image, const at::Tensor& embedding,
                      const Segments& layout, at::Tensor& grad_image, at::Tensor& grad_embedding,
                      at::Tensor& grad_mask, const at::Tensor& mask) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = image.size(0), ci = image.size(1), ce = embedding.size(1);
  const int64_t hw = image.size(2) * image.size(3), tiles = (hw + kPixelTile - 1) / kPixelTile;
  if (B == 0) return;
  const scalar_t* g = grad.const_data_ptr<scalar_t>();
  const scalar_t* img = image.const_data_ptr<scalar_t>();
  const scalar_t* emb = embedding.const_data_ptr<scalar_t>();
  scalar_t* gi = grad_image.defined() ? grad_image.data_ptr<scalar_t>() : nullptr;
  scalar_t* ge = grad_embedding.defined() ? grad_embedding.data_ptr<scalar_t>() : nullptr;
  acc_t* gm = grad_mask.defined() ? grad_mask.data_ptr<acc_t>() : nullptr;
  const acc_t* m = mask.defined() ? mask.const_data_ptr<acc_t>() : nullptr;
  const bool stream = std::max(gi != nullptr ? grad_image.nbytes() : 0, ge != nullptr ? grad_embedding.nbytes() : 0) >=
                      kStreamingBytes;
  at::parallel_for(0, B * tiles, 1, [&](int64_t begin, int64_t end) {
    alignas(64) scalar_t staging[kPixelTile];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / tiles, p0 = (task % tiles) * kPixelTile, n = std::min(kPixelTile, hw - p0);
      fuse_tile_backward(layout, g + b * layout.channels * hw, img + b * ci * hw, ci, emb + b * ce * hw, ce,
                         m != nullptr ? m + b * hw + p0 : nullptr, hw, p0, n, gi != nullptr ? gi + b * ci * hw : nullptr,
                         ge != nullptr ? ge + b * ce * hw : nullptr, gm != nullptr ? gm + b * hw + p0 : nullptr,
                         stream ? staging : nullptr);
    }
    if (stream) stream_fence();
  });
}

// Reads a tile of a given (B, 1, H, W) mask, converted to the accumulation dtype.
template <typename acc_t, typename scalar_t>
auto given_mask(const scalar_t* mask, int64_t hw) {
  return [mask, hw](int64_t b, int64_t p0, int64_t n, acc_t* out) {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<acc_t>(mask[b * hw + p0 + i]);
  };
}

// image (B, Ci, H, W) on the CPU, embedding (B, C, H, W), mask (B, 1, H, W), one dtype; mode 1..5.
void check_fusion_inputs(const at::Tensor& image, const at::Tensor& embedding, const at::Tensor& mask, int64_t mode,
                         const char* op) {
  checks::mode(op, mode);
  checks::tensor(op, "image", image, 4);
  check_on_cpu(op, "image", image);
  checks::companion(op, "embedding", embedding, "image", image);
  checks::mask(op, mask, "image", image);
}

// logits on the CPU, image and embedding their companions; mode 1..5.
void check_head(const at::Tensor& logits, const at::Tensor& image, const at::Tensor& embedding, int64_t mode,
                const char* op) {
  checks::mode(op, mode);
  check_logits(logits, op);
  checks::companion(op, "image", image, "logits", logits);
  checks::companion(op, "embedding", embedding, "logits", logits);
}

}  // namespace

at::Tensor fuse(const at::Tensor& image_in, const at::Tensor& embedding_in, const at::Tensor& mask_in, int64_t mode) {
  check_fusion_inputs(image_in, embedding_in, mask_in, mode, "fuse");
  const at::Tensor image = image_in.contiguous(), embedding = embedding_in.contiguous(), mask = mask_in.contiguous();
  const Segments layout(mode, image.size(1), embedding.size(1));
  at::Tensor out = empty_fused(image, layout);
  const int64_t hw = image.size(2) * image.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, image.scalar_type(), "decafa_fuse", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    write_fusion<scalar_t>(image, embedding, layout, out, given_mask<acc_t>(mask.const_data_ptr<scalar_t>(), hw));
  });
  return in_format_of(out, embedding_in);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fuse_backward(const at::Tensor& grad_in, const at::Tensor& image_in,
                                                             const at::Tensor& embedding_in,
                                                             const at::Tensor& mask_in, int64_t mode) {
  const char* op = "fuse_backward";
  check_fusion_inputs(image_in, embedding_in, mask_in, mode, op);
  const Segments layout(mode, image_in.size(1), embedding_in.size(1));
  checks::grad(op, "grad_fused", grad_in, {image_in.size(0), layout.channels, image_in.size(2), image_in.size(3)},
               "image", image_in);
  const at::Tensor grad = grad_in.to(image_in.scalar_type()).contiguous(), image = image_in.contiguous(),
                   embedding = embedding_in.contiguous(), mask = mask_in.contiguous();
  at::Tensor grad_image = empty_output_like(image), grad_embedding = empty_output_like(embedding);
  at::Tensor grad_mask = empty_output(mask.sizes(), mask.options().dtype(acc_type(image.scalar_type())));
  const at::Tensor mask_acc = mask.to(grad_mask.scalar_type()).view({image.size(0), image.size(2) * image.size(3)});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, image.scalar_type(), "decafa_fuse_backward", [&] {
    fusion_gradients<scalar_t>(grad, image, embedding, layout, grad_image, grad_embedding, grad_mask, mask_acc);
  });
  return {grad_image, grad_embedding, grad_mask.to(mask.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> decafa_head(const at::Tensor& logits_in,
                                                                       const at::Tensor& image_in,
                                                                       const at::Tensor& embedding_in, int64_t mode,
                                                                       double beta,
                                                                       const std::optional<at::Tensor>& beta_map_in,
                                                                       bool normalized) {
  const char* op = "decafa_head";
  check_head(logits_in, image_in, embedding_in, mode, op);
  const at::Tensor beta_map = checked_beta_map(beta_map_in, logits_in, op);
  const at::Tensor logits = logits_in.contiguous(), image = image_in.contiguous(),
                   embedding = embedding_in.contiguous();
  const int64_t B = logits.size(0), L = logits.size(1), H = logits.size(2), W = logits.size(3), hw = H * W;
  const Segments layout(mode, image.size(1), embedding.size(1));
  const at::ScalarType acc = acc_type(logits.scalar_type());
  at::Tensor stats = empty_stats(logits);
  at::Tensor z = at::empty({B, L, 2}, logits.options());
  at::Tensor out = empty_fused(logits, layout);
  // M (B, H*W) in the accumulation dtype: the statistics pass sums each run of maps' Phi into a partial mask
  // (B, runs, H*W); each pixel tile of the fusion pass adds up its tile of them (in run order, the bits of
  // landmark_attention's M), writes it into M and uses it, so M is summed in parallel over tiles, even at B = 1.
  at::Tensor partials;
  map_statistics(logits, beta, beta_map, normalized, stats, &z, nullptr, nullptr, &partials);
  const int64_t runs = partials.size(1);
  at::Tensor mask = runs == 1 ? partials.view({B, hw}) : empty_output({B, hw}, logits.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "decafa_head", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* partial_p = partials.const_data_ptr<acc_t>();
    acc_t* mask_p = mask.data_ptr<acc_t>();
    write_fusion<scalar_t>(image, embedding, layout, out, [&](int64_t b, int64_t p0, int64_t n, acc_t* tile) {
      sum_partial_masks(partial_p + b * runs * hw, runs, hw, p0, n, tile);
      if (runs > 1) std::memcpy(mask_p + b * hw + p0, tile, n * sizeof(acc_t));
    });
  });
  at::Tensor mask_out = mask.view({B, 1, H, W});
  if (acc != logits.scalar_type()) mask_out = mask_out.to(logits.scalar_type());
  return {z, in_format_of(out, embedding_in), mask_out, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> decafa_head_backward(
    const std::optional<at::Tensor>& grad_z, const std::optional<at::Tensor>& grad_fused, const at::Tensor& logits_in,
    const at::Tensor& image_in, const at::Tensor& embedding_in, const at::Tensor& mask_in, const at::Tensor& stats_in,
    int64_t mode, double beta, const std::optional<at::Tensor>& beta_map_in, bool normalized) {
  const char* op = "decafa_head_backward";
  check_head(logits_in, image_in, embedding_in, mode, op);
  const int64_t B = logits_in.size(0), L = logits_in.size(1), H = logits_in.size(2), W = logits_in.size(3), hw = H * W;
  const Segments layout(mode, image_in.size(1), embedding_in.size(1));
  checks::optional_grad(op, "grad_z", grad_z, {B, L, 2}, "logits", logits_in);
  checks::optional_grad(op, "grad_fused", grad_fused, {B, layout.channels, H, W}, "logits", logits_in);
  checks::mask(op, mask_in, "logits", logits_in);
  checks::stats(op, stats_in, logits_in);
  const at::Tensor beta_map = checked_beta_map(beta_map_in, logits_in, op);
  const at::Tensor logits = logits_in.contiguous(), image = image_in.contiguous(),
                   embedding = embedding_in.contiguous(), stats = stats_in.contiguous();
  const at::ScalarType acc = acc_type(logits.scalar_type());
  const at::Tensor gz = as_acc(grad_z, logits.scalar_type());
  if (!grad_fused.has_value() || !grad_fused->defined()) {
    auto [grad_logits, grad_beta] = logits_gradient(logits, stats, beta, beta_map, normalized, gz, at::Tensor());
    return {grad_logits, at::zeros_like(image, at::MemoryFormat::Contiguous),
            at::zeros_like(embedding, at::MemoryFormat::Contiguous), grad_beta};
  }
  // (1) per pixel tile, from the saved M: the image, embedding and mask gradients; (2) per map, the logits
  // gradient and grad_beta from the Phi recomputed from the stats. T is read once, nothing of size B*L*H*W
  // is saved.
  const at::Tensor grad = grad_fused->to(logits.scalar_type()).contiguous();
  const at::Tensor mask = mask_in.to(acc).contiguous().view({B, hw});
  at::Tensor grad_image = empty_output_like(image), grad_embedding = empty_output_like(embedding);
  at::Tensor grad_mask = empty_output({B, 1, H, W}, logits.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "decafa_head_backward", [&] {
    fusion_gradients<scalar_t>(grad, image, embedding, layout, grad_image, grad_embedding, grad_mask, mask);
  });
  auto [grad_logits, grad_beta] = logits_gradient(logits, stats, beta, beta_map, normalized, gz, grad_mask);
  return {grad_logits, grad_image, grad_embedding, grad_beta};
}

}  // namespace cpu
}  // namespace decafa
