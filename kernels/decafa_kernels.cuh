// Host launchers of the decafa CUDA kernels: a torch-free C++ API (raw device pointers, sizes, a stream).
//
// Layout: every tensor is dense and row-major (NCHW, contiguous):
//   logits (B, L, H, W); image (B, Ci, H, W); embedding (B, C, H, W); mask (B, 1, H, W);
//   z (B, L, 2) as (x, y) = (column, row); lse (B, L) float32; fused (B, channels(mode), H, W).
// Element type: `DType` (float32, float16, bfloat16) for every tensor except lse and the float32 workspace;
// all arithmetic accumulates in float32. Pointers must be device pointers; 16-byte alignment enables the
// vector path (any alignment of the element size works). Nothing is synchronised: work is queued on
// `stream`, and the launch status (cudaGetLastError) is returned. Zero-sized problems launch nothing.
// No atomics: results are bitwise reproducible run to run. The math is in notes/kernel_math.md.
//
// Fusion `mode` 1..5: F1 = E; F2 = I*M; F3 = I|I*M; F4 = I|I*M|E*M; F5 = I|I*M|E|E*M (channel concat);
// mode 0 means "no fusion output".
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace decafa_kernels {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Size in bytes of one element of `dtype`.
size_t dtype_size(DType dtype);

// Output-channel offset of each fusion segment (-1 when the mode has no such segment) and the total
// channel count, for mode 0..5 with `image_channels` Ci and `embed_channels` C.
struct FusionLayout {
  int image_plain, image_masked, embed_plain, embed_masked, channels;
};
FusionLayout fusion_layout(int mode, int image_channels, int embed_channels);

// logits (batch, maps, height, width).
struct MapShape {
  int64_t batch;
  int maps;
  int height;
  int width;
};

// ------------------------------------------------------------------------------------------------
// Building blocks
// ------------------------------------------------------------------------------------------------

// One block per (b, l) map: lse (B, L) float32; z (B, L, 2) if non-null; phi = softmax (B, L, H, W) if
// non-null (the map is then staged in shared memory when it fits, so T is read from HBM once).
cudaError_t map_forward(DType dtype, MapShape shape, const void* logits, float beta, bool normalized,
                        float* lse, void* z, void* phi, cudaStream_t stream);

// One block per (b, pixel tile): the mask M = sum_l exp(beta*T - lse_l) (or read from `mask_in`
// (B, 1, H, W) when non-null; logits and lse are then unused); writes `mask_out` (B, 1, H, W) if
// non-null and the fusion `fused` if mode != 0. shape.maps is L (unused with mask_in).
cudaError_t pixel_forward(DType dtype, MapShape shape, const void* logits, const float* lse, float beta,
                          const void* mask_in, void* mask_out, const void* image, int image_channels,
                          const void* embed, int embed_channels, int mode, void* fused, cudaStream_t stream);

// Backward of the fusion per (b, pixel tile): grad_image, grad_embed (always written, zeros for a mode
// without such a segment) and, if grad_mask is non-null, grad_mask (B, H*W) = sum over masked segments
// of grad_fused * source, stored as float32 when grad_mask_float32, else as `dtype`. M is read from
// `mask_in` when non-null, else recomputed from logits and lse.
cudaError_t pixel_backward(DType dtype, MapShape shape, const void* grad_fused, const void* logits,
                           const float* lse, float beta, const void* mask_in, const void* image,
                           int image_channels, const void* embed, int embed_channels, int mode, void* grad_image,
                           void* grad_embed, void* grad_mask, bool grad_mask_float32, cudaStream_t stream);

// One block per (b, l) map: grad_logits = beta * Phi * [(g_p - s) + gx (x_p - zx) + gy (y_p - zy)] with
// s = sum_p g_p Phi_p. `grad` (g) is either per map (B, L, H, W) when grad_per_map (softmax backward) or
// per batch (B, H*W) (the mask gradient), stored as float32 when grad_float32 else as `dtype`; null = 0.
// grad_z (B, L, 2) null = 0. Both null: grad_logits is zero-filled.
cudaError_t map_backward(DType dtype, MapShape shape, const void* grad, bool grad_per_map, bool grad_float32,
                         const void* grad_z, const void* logits, const float* lse, float beta, bool normalized,
                         void* grad_logits, cudaStream_t stream);

// ------------------------------------------------------------------------------------------------
// Fused ops (what the torch glue calls). They run batch chunks sized so that a chunk's logits stay in
// L2 between the per-map and the per-pixel kernel; set DECAFA_CUDA_BATCH_CHUNK=n to force n batches
// per chunk (n <= 0: auto, the default; a huge n: no chunking).
// ------------------------------------------------------------------------------------------------

// Statistics, mask and fusion: lse always; z, mask_out (B, 1, H, W) and fused (mode != 0) when non-null.
cudaError_t head_forward(DType dtype, MapShape shape, const void* logits, const void* image, int image_channels,
                         const void* embed, int embed_channels, int mode, float beta, bool normalized, float* lse,
                         void* z, void* mask_out, void* fused, cudaStream_t stream);

// Floats of workspace head_backward needs: B * H * W (the float32 mask gradient).
size_t head_backward_workspace_floats(MapShape shape);

// Backward of head_forward: grad_logits, grad_image, grad_embed from grad_z (B, L, 2) and grad_fused,
// either of which may be null (= zero). `workspace` holds head_backward_workspace_floats(shape) floats.
cudaError_t head_backward(DType dtype, MapShape shape, const void* grad_z, const void* grad_fused,
                          const void* logits, const void* image, int image_channels, const void* embed,
                          int embed_channels, const float* lse, int mode, float beta, bool normalized,
                          void* grad_logits, void* grad_image, void* grad_embed, float* workspace,
                          cudaStream_t stream);

}  // namespace decafa_kernels
