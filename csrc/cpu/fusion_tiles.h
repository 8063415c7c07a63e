// The fusion ops' per-pixel-tile kernels on raw pointers: the fusion channels F1-F5 of a tile
// (kernels/fusion_layout.h's layout) and their backward, each compiled per ISA (isa.h).
#pragma once

#include <cstdint>
#include <cstring>

#include "../../kernels/fusion_layout.h"
#include "isa.h"
#include "map_math.h"
#include "stream_store.h"

namespace decafa {
namespace cpu {

// The fusion layout (kernels/fusion_layout.h) as a list of blocks: which source (image or embedding) each
// block of output channels copies, and whether it is multiplied by the mask.
struct Segment {
  bool from_embedding;
  bool masked;
  int64_t first_channel;
};

struct Segments {
  Segment segments[4];
  int count = 0;
  int64_t channels = 0;

  Segments(int64_t mode, int64_t image_channels, int64_t embedding_channels) {
    const FusionLayout l = fusion_layout(static_cast<int>(mode), static_cast<int>(image_channels),
                                         static_cast<int>(embedding_channels));
    channels = l.channels;
    // in channel order (the table's offsets increase in this order for every mode)
    if (l.image >= 0) segments[count++] = {false, false, l.image};
    if (l.image_mask >= 0) segments[count++] = {false, true, l.image_mask};
    if (l.embedding >= 0) segments[count++] = {true, false, l.embedding};
    if (l.embedding_mask >= 0) segments[count++] = {true, true, l.embedding_mask};
  }
};

// Writes the fusion channels of pixels [p0, p0 + n) of one image. image_b / embedding_b / out_b point at
// the image's first channel; every channel plane has hw pixels. With `staging` (n values) the output is
// written with streaming stores (stream_store.h): masked channels are computed into staging first.
template <typename scalar_t, typename acc_t>
DECAFA_INLINE void fuse_tile_impl(const Segments& layout, const scalar_t* image_b, int64_t ci, const scalar_t* embedding_b,
                                  int64_t ce, const acc_t* mask, int64_t hw, int64_t p0, int64_t n, scalar_t* out_b,
                                  scalar_t* staging) {
  for (int s = 0; s < layout.count; ++s) {
    const Segment& seg = layout.segments[s];
    const scalar_t* src = seg.from_embedding ? embedding_b : image_b;
    const int64_t channels = seg.from_embedding ? ce : ci;
    for (int64_t c = 0; c < channels; ++c) {
      const scalar_t* in = src + c * hw + p0;
      scalar_t* out = out_b + (seg.first_channel + c) * hw + p0;
      if (seg.masked) {
        scalar_t* product = staging != nullptr ? staging : out;
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) product[i] = to_storage<scalar_t>(static_cast<acc_t>(in[i]) * mask[i]);
        if (staging != nullptr) stream_copy(out, staging, n * sizeof(scalar_t));
      } else if (staging != nullptr) {
        stream_copy(out, in, n * sizeof(scalar_t));
      } else {
        std::memcpy(out, in, n * sizeof(scalar_t));
      }
    }
  }
}
DECAFA_ISA_DISPATCH(fuse_tile)

// One source channel of the fusion backward over n pixels: out = g_plain + mask * g_masked (the channel's
// gradient; g_plain is null when the mode copies no plain block of this source) and grad_mask += g_masked *
// src. Each gradient of F is read once.
template <bool kPlain, bool kOut, bool kMaskGrad, typename scalar_t, typename acc_t>
DECAFA_INLINE void masked_channel_backward(const scalar_t* g_plain, const scalar_t* g_masked, const scalar_t* src,
                                           const acc_t* mask, int64_t n, scalar_t* out, acc_t* grad_mask) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const acc_t g = static_cast<acc_t>(g_masked[i]);
    if constexpr (kMaskGrad) grad_mask[i] += g * static_cast<acc_t>(src[i]);
    if constexpr (kOut) {
      const acc_t plain = kPlain ? static_cast<acc_t>(g_plain[i]) : acc_t(0);
      out[i] = to_storage<scalar_t>(plain + g * mask[i]);
    }
  }
}

// masked_channel_backward with the channel's gradient written, and grad_mask summed when given.
template <bool kPlain, typename scalar_t, typename acc_t>
DECAFA_INLINE void masked_channel_gradient(const scalar_t* g_plain, const scalar_t* g_masked, const scalar_t* src,
                                           const acc_t* mask, int64_t n, scalar_t* out, acc_t* grad_mask) {
  if (grad_mask != nullptr) {
    masked_channel_backward<kPlain, true, true>(g_plain, g_masked, src, mask, n, out, grad_mask);
  } else {
    masked_channel_backward<kPlain, true, false>(g_plain, g_masked, src, mask, n, out, grad_mask);
  }
}

// Backward of fuse_tile over pixels [p0, p0 + n) of one image: the gradients of the image and embedding
// channels (either output may be null when not wanted; they need `mask`) and, when grad_mask is given, the
// gradient of the mask in acc_t: the sum over the masked channels (image first, then embedding, each in
// channel order) of grad * source. With `staging` (n values) the source gradients are written with
// streaming stores.
template <typename scalar_t, typename acc_t>
DECAFA_INLINE void fuse_tile_backward_impl(const Segments& layout, const scalar_t* grad_b, const scalar_t* image_b,
                                           int64_t ci, const scalar_t* embedding_b, int64_t ce, const acc_t* mask,
                                           int64_t hw, int64_t p0, int64_t n, scalar_t* grad_image_b,
                                           scalar_t* grad_embedding_b, acc_t* grad_mask, scalar_t* staging) {
  if (grad_mask != nullptr) {
    for (int64_t i = 0; i < n; ++i) grad_mask[i] = 0;
  }
  for (int from_embedding = 0; from_embedding < 2; ++from_embedding) {
    int64_t plain = -1, masked = -1;  // first channel in F of this source's plain and masked blocks
    for (int k = 0; k < layout.count; ++k) {
      const Segment& seg = layout.segments[k];
      if (seg.from_embedding != static_cast<bool>(from_embedding)) continue;
      (seg.masked ? masked : plain) = seg.first_channel;
    }
    const scalar_t* src_b = from_embedding ? embedding_b : image_b;
    scalar_t* grad_src_b = from_embedding ? grad_embedding_b : grad_image_b;
    const int64_t channels = from_embedding ? ce : ci;
    if (masked < 0 && grad_src_b == nullptr) continue;
    for (int64_t c = 0; c < channels; ++c) {
      const scalar_t* g_plain = plain >= 0 ? grad_b + (plain + c) * hw + p0 : nullptr;
      scalar_t* out = grad_src_b != nullptr ? grad_src_b + c * hw + p0 : nullptr;
      if (masked >= 0) {
        const scalar_t* g_masked = grad_b + (masked + c) * hw + p0;
        const scalar_t* src = src_b + c * hw + p0;
        if (out == nullptr) {
          if (grad_mask != nullptr) {
            masked_channel_backward<false, false, true>(g_plain, g_masked, src, mask, n, out, grad_mask);
          }
          continue;
        }
        scalar_t* target = staging != nullptr ? staging : out;  // where the channel's gradient is computed
        if (g_plain != nullptr) {
          masked_channel_gradient<true>(g_plain, g_masked, src, mask, n, target, grad_mask);
        } else {
          masked_channel_gradient<false>(g_plain, g_masked, src, mask, n, target, grad_mask);
        }
        if (staging != nullptr) stream_copy(out, staging, n * sizeof(scalar_t));
      } else if (g_plain != nullptr) {
        if (staging != nullptr) {
          stream_copy(out, g_plain, n * sizeof(scalar_t));
        } else {
          std::memcpy(out, g_plain, n * sizeof(scalar_t));
        }
      } else {
        std::memset(out, 0, n * sizeof(scalar_t));  // the mode has no block of this source
      }
    }
  }
}
DECAFA_ISA_DISPATCH(fuse_tile_backward)

}  // namespace cpu
}  // namespace decafa
