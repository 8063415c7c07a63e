// CPU implementations of the fusion ops: fuse (F1-F5 from a given mask), its backward, and the fused head
// decafa_head (statistics per map, summing M on the side; then per pixel tile the fusion channels written
// directly; Phi is never stored) with its backward (M summed again from the Phi that the logits gradient
// recomputes from the saved lse).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "attention.h"
#include "map_math.h"

namespace decafa {
namespace cpu {
namespace {

at::Tensor empty_fused(const at::Tensor& like, const FusionLayout& layout) {
  return at::empty({like.size(0), layout.channels, like.size(2), like.size(3)}, like.options());
}

// Per pixel tile of each image: the fusion channels of image / embedding with the mask, where the mask tile
// comes from `mask_of(b, p0, n, acc)`. Called inside a dtype dispatch.
template <typename scalar_t, typename MaskOf>
void write_fusion(const at::Tensor& image, const at::Tensor& embedding, const FusionLayout& layout, at::Tensor& out,
                  MaskOf mask_of) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = image.size(0), ci = image.size(1), ce = embedding.size(1);
  const int64_t hw = image.size(2) * image.size(3), tiles = (hw + kPixelTile - 1) / kPixelTile;
  if (out.numel() == 0) return;
  {
    const scalar_t* img = image.const_data_ptr<scalar_t>();
    const scalar_t* emb = embedding.const_data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    at::parallel_for(0, B * tiles, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> mask(kPixelTile);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t b = task / tiles, p0 = (task % tiles) * kPixelTile, n = std::min(kPixelTile, hw - p0);
        mask_of(b, p0, n, mask.data());
        fuse_tile(layout, img + b * ci * hw, ci, emb + b * ce * hw, ce, mask.data(), hw, p0, n,
                  o + b * layout.channels * hw);
      }
    });
  }
}

// Per pixel tile: the mask gradient in the accumulation dtype (grad_mask, when defined) and the gradients of
// image and embedding (grad_image and grad_embedding, when defined; they need `mask`, (B, H*W) in the
// accumulation dtype). Called inside a dtype dispatch.
template <typename scalar_t>
void fusion_gradients(const at::Tensor& grad, const at::Tensor& image, const at::Tensor& embedding,
                      const FusionLayout& layout, at::Tensor& grad_image, at::Tensor& grad_embedding,
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
  at::parallel_for(0, B * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(kPixelTile);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / tiles, p0 = (task % tiles) * kPixelTile, n = std::min(kPixelTile, hw - p0);
      const scalar_t* g_b = g + b * layout.channels * hw;
      if (gm != nullptr) {
        fuse_tile_mask_grad(layout, g_b, img + b * ci * hw, ci, emb + b * ce * hw, ce, hw, p0, n, gm + b * hw + p0);
      }
      if (gi != nullptr || ge != nullptr) {
        fuse_tile_source_grads(layout, g_b, ci, ce, m + b * hw + p0, hw, p0, n,
                               gi != nullptr ? gi + b * ci * hw : nullptr, ge != nullptr ? ge + b * ce * hw : nullptr,
                               scratch.data());
      }
    }
  });
}

void check_mode(int64_t mode) { TORCH_CHECK(mode >= 1 && mode <= 5, "mode must be 1..5 (F1..F5), got ", mode); }

// Reads a tile of a given (B, 1, H, W) mask, converted to the accumulation dtype.
template <typename acc_t, typename scalar_t>
auto given_mask(const scalar_t* mask, int64_t hw) {
  return [mask, hw](int64_t b, int64_t p0, int64_t n, acc_t* out) {
    for (int64_t i = 0; i < n; ++i) out[i] = static_cast<acc_t>(mask[b * hw + p0 + i]);
  };
}

at::Tensor fuse(const at::Tensor& image_in, const at::Tensor& embedding_in, const at::Tensor& mask_in, int64_t mode) {
  check_mode(mode);
  const at::Tensor image = image_in.contiguous(), embedding = embedding_in.contiguous(), mask = mask_in.contiguous();
  const FusionLayout layout(mode, image.size(1), embedding.size(1));
  at::Tensor out = empty_fused(image, layout);
  const int64_t hw = image.size(2) * image.size(3);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, image.scalar_type(), "decafa_fuse", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    write_fusion<scalar_t>(image, embedding, layout, out, given_mask<acc_t>(mask.const_data_ptr<scalar_t>(), hw));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fuse_backward(const at::Tensor& grad_in, const at::Tensor& image_in,
                                                             const at::Tensor& embedding_in,
                                                             const at::Tensor& mask_in, int64_t mode) {
  check_mode(mode);
  const at::Tensor grad = grad_in.contiguous(), image = image_in.contiguous(), embedding = embedding_in.contiguous(),
                   mask = mask_in.contiguous();
  const FusionLayout layout(mode, image.size(1), embedding.size(1));
  at::Tensor grad_image = at::empty_like(image), grad_embedding = at::empty_like(embedding);
  at::Tensor grad_mask = at::empty(mask.sizes(), mask.options().dtype(acc_type(image.scalar_type())));
  const at::Tensor mask_acc = mask.to(grad_mask.scalar_type()).view({image.size(0), image.size(2) * image.size(3)});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, image.scalar_type(), "decafa_fuse_backward", [&] {
    fusion_gradients<scalar_t>(grad, image, embedding, layout, grad_image, grad_embedding, grad_mask, mask_acc);
  });
  return {grad_image, grad_embedding, grad_mask.to(mask.scalar_type())};
}

void check_head(const at::Tensor& logits, const at::Tensor& image, const at::Tensor& embedding, int64_t mode) {
  check_mode(mode);
  TORCH_CHECK(logits.dim() == 4 && image.dim() == 4 && embedding.dim() == 4,
              "decafa_head: logits, image and embedding must be 4-d");
  TORCH_CHECK(image.scalar_type() == logits.scalar_type() && embedding.scalar_type() == logits.scalar_type(),
              "decafa_head: logits, image and embedding must share one dtype");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> decafa_head(const at::Tensor& logits_in, const at::Tensor& image_in,
                                                           const at::Tensor& embedding_in, int64_t mode, double beta,
                                                           bool normalized) {
  check_head(logits_in, image_in, embedding_in, mode);
  const at::Tensor logits = logits_in.contiguous(), image = image_in.contiguous(),
                   embedding = embedding_in.contiguous();
  const int64_t B = logits.size(0), L = logits.size(1), hw = logits.size(2) * logits.size(3);
  const FusionLayout layout(mode, image.size(1), embedding.size(1));
  at::Tensor lse = empty_lse(logits);
  at::Tensor z = at::empty({B, L, 2}, logits.options());
  at::Tensor out = empty_fused(logits, layout);
  // M (B, H*W) in the accumulation dtype, summed during the statistics pass: 1/L of the logits' size
  at::Tensor mask = at::empty({B, hw}, logits.options().dtype(acc_type(logits.scalar_type())));
  map_statistics(logits, beta, normalized, lse, &z, nullptr, &mask);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "decafa_head", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    write_fusion<scalar_t>(image, embedding, layout, out, given_mask<acc_t>(mask.const_data_ptr<acc_t>(), hw));
  });
  return {z, out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> decafa_head_backward(
    const std::optional<at::Tensor>& grad_z, const std::optional<at::Tensor>& grad_fused, const at::Tensor& logits_in,
    const at::Tensor& image_in, const at::Tensor& embedding_in, const at::Tensor& lse_in, int64_t mode, double beta,
    bool normalized) {
  check_head(logits_in, image_in, embedding_in, mode);
  const at::Tensor logits = logits_in.contiguous(), image = image_in.contiguous(),
                   embedding = embedding_in.contiguous(), lse = lse_in.contiguous();
  const int64_t B = logits.size(0), H = logits.size(2), W = logits.size(3), hw = H * W;
  const FusionLayout layout(mode, image.size(1), embedding.size(1));
  const at::ScalarType acc = acc_type(logits.scalar_type());
  const at::Tensor gz = as_acc(grad_z, logits.scalar_type());
  if (!grad_fused.has_value() || !grad_fused->defined()) {
    return {logits_gradient(logits, lse, beta, normalized, gz, at::Tensor()), at::zeros_like(image),
            at::zeros_like(embedding)};
  }
  // The mask gradient does not depend on M, so: (1) grad_mask per pixel tile; (2) per map, the logits
  // gradient from the recomputed Phi, summing M from the same Phi; (3) per pixel tile, the image and
  // embedding gradients with that M. One exp per logit in all, and nothing of size B*L*H*W saved.
  const at::Tensor grad = grad_fused->contiguous();
  at::Tensor grad_image = at::empty_like(image), grad_embedding = at::empty_like(embedding);
  at::Tensor grad_mask = at::empty({B, 1, H, W}, logits.options().dtype(acc));
  at::Tensor mask = at::empty({B, hw}, grad_mask.options());
  at::Tensor none;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "decafa_head_backward", [&] {
    fusion_gradients<scalar_t>(grad, image, embedding, layout, none, none, grad_mask, none);
  });
  at::Tensor grad_logits = logits_gradient(logits, lse, beta, normalized, gz, grad_mask, &mask);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "decafa_head_backward", [&] {
    fusion_gradients<scalar_t>(grad, image, embedding, layout, grad_image, grad_embedding, none, mask);
  });
  return {grad_logits, grad_image, grad_embedding};
}

}  // namespace

TORCH_LIBRARY_IMPL(decafa, CPU, m) {
  m.impl("fuse", &fuse);
  m.impl("fuse_backward", &fuse_backward);
  m.impl("decafa_head", &decafa_head);
  m.impl("decafa_head_backward", &decafa_head_backward);
}

}  // namespace cpu
}  // namespace decafa
