// Host launchers of the decafa CUDA kernels: a torch-free C++ API (raw device pointers, sizes, strides, a
// stream). The math is op contract v2 (README.md here):
//   s = beta_eff * T in float32, beta_eff = beta_map[b, l] when beta_map is non-null, else beta;
//   stats (B, L, 2) float32 = (max_p s, sum_p exp(s - max)); Phi = exp(s - max) / sum (never exp(s - lse));
//   z (B, L, 2) = sum_p Phi (col, row), or each axis mapped to [-1, 1] (a one-pixel axis gives 0);
//   M (B, 1, H, W) = sum_l Phi; fusion F1..F5 (fusion_layout.h);
//   backward: g_s = Phi (g_phi - sum_p Phi g_phi), grad_T = beta_eff g_s, grad_beta = sum_p T g_s.
//
// Tensors are described by a base pointer and `Strides` in elements: element (n, c, p) of a batch of
// planes (p = row * W + col) is at data + n*batch + c*channel + p*pixel. NCHW contiguous is
// {C*H*W, H*W, 1}, channels_last is {C*H*W, 1, C}. Stats, beta_map, the workspaces, the mask M and the
// per-batch gradients (B, H*W) are dense. Element type: `DType` for T, I, E, z, Phi, M, F and their
// gradients; float32 for stats, beta_map, grad_beta and the workspaces. All arithmetic is float32.
// Nothing is synchronised: work is queued on `stream` (on the current device; the caller sets it) and the
// launch status is returned. Zero-sized problems launch nothing. No atomics: every sum has a fixed
// order, so results are bitwise reproducible run to run.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "fusion_layout.h"

namespace decafa_kernels {

using decafa::FusionLayout;
using decafa::fusion_layout;

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Size in bytes of one element of `dtype`.
size_t dtype_size(DType dtype);

// Element strides of a batch of planes: (n, c, p) -> n*batch + c*channel + p*pixel.
struct Strides {
  int64_t batch, channel, pixel;
};
inline Strides nchw_strides(int64_t channels, int64_t hw) { return {channels * hw, hw, 1}; }
inline Strides nhwc_strides(int64_t channels, int64_t hw) { return {channels * hw, 1, channels}; }

// logits (batch, maps, height, width).
struct MapShape {
  int64_t batch;
  int maps;
  int height;
  int width;
};

// The logits and their inverse temperature.
struct Logits {
  const void* data;
  Strides strides;        // batch, map, pixel
  float beta;             // used when beta_map is null
  const float* beta_map;  // (B, L) dense, or null
};

// The sources of the fusion (mode 1..5).
struct FusionInputs {
  int mode;
  const void* image;
  Strides image_strides;
  int image_channels;
  const void* embedding;
  Strides embedding_strides;
  int embedding_channels;
};

// ------------------------------------------------------------------------------------------------
// Forward: one kernel over the maps (a block per (b, run of maps) reads each map once, holds it on chip,
// writes stats, z, Phi and one partial mask per run), then, when M or F is wanted, one pixel-tiled kernel
// (sums the partial masks in a fixed order, writes M, reads I and E once, writes F).
// ------------------------------------------------------------------------------------------------

// Runs of consecutive maps each batch element's L maps are split into by the per-map run kernels (one block
// per run): 0, the default, lets the launchers choose (ceil(2 * SMs / B), at most L); n > 0 forces n (at
// most L). Process-wide, read at each launch; the library reads no environment variable for it (the PyTorch
// glue passes DECAFA_CUDA_RUNS in, as decafa_fast.settings parses it; the smoke executable reads it itself).
// Changes results only by the order in which the partial masks are added. Returns the previous value; a
// negative `runs` changes nothing.
int set_map_runs(int runs);
int map_runs_setting();

// Programmatic dependent launch of the forward's pixel kernel (sm_90 and later; off by default until a GPU run
// measures it): the pixel kernel is launched with cudaLaunchAttributeProgrammaticStreamSerialization, so that
// its launch overlaps the per-map kernel's tail, and waits (griddepcontrol.wait) before it reads the partial
// masks. Process-wide; a no-op before sm_90 and in the CPU emulation. Returns the previous value.
bool set_programmatic_launch(bool on);

// Channel groups of the forward's pixel kernel: where its pixel tiles alone give fewer CTAs than multiprocessors
// (small batches), it splits the fusion channels across CTAs, keeping 16-byte accesses (0, the default: its own
// choice; n > 0 forces n groups). Does not change results (the same bits at any n). Process-wide; returns the
// previous value; a negative value changes nothing.
int set_pixel_split(int groups);

// Floats of workspace head_forward needs for the partial masks (B * runs * H * W on the current device).
size_t head_forward_workspace_floats(MapShape shape);

// stats always; z (B, L, 2) dense, phi (B, L, H, W) NCHW contiguous, mask (B, 1, H, W) and the fusion
// (`fusion` non-null, written to `fused` with `fused_strides`) when their pointers are non-null.
// `workspace` (head_forward_workspace_floats) is needed when mask or fusion is.
cudaError_t head_forward(DType dtype, MapShape shape, Logits logits, bool normalized, float* stats, void* z,
                         void* phi, void* mask, const FusionInputs* fusion, void* fused, Strides fused_strides,
                         float* workspace, cudaStream_t stream);

// F from I, E and a given mask (B, 1, H, W) dense: the op `fuse`. shape.maps is unused.
cudaError_t fuse_forward(DType dtype, MapShape shape, const void* mask, const FusionInputs& fusion, void* fused,
                         Strides fused_strides, cudaStream_t stream);

// ------------------------------------------------------------------------------------------------
// Backward: one pixel-tiled kernel over grad F, I, E, M (grad I, grad E, grad M), one kernel over the
// maps (a block per (b, run of maps), the run's mask gradient held on chip) for grad T and grad beta.
// ------------------------------------------------------------------------------------------------

// grad_image, grad_embedding (with their strides; zeros for a source F does not contain) and grad_mask
// (B, H*W) dense, float32 when grad_mask_float32 else `dtype`, null to skip) from grad_fused and the mask
// (B, 1, H, W) dense.
cudaError_t fuse_backward(DType dtype, MapShape shape, const void* grad_fused, Strides grad_fused_strides,
                          const void* mask, const FusionInputs& fusion, void* grad_image, Strides grad_image_strides,
                          void* grad_embedding, Strides grad_embedding_strides, void* grad_mask,
                          bool grad_mask_float32, cudaStream_t stream);

// The incoming gradient of Phi: per map (B, L, H, W) with strides (softmax backward), or one per batch
// element (B, H*W) dense shared by its maps (the mask gradient); float32 or `dtype`; null data = 0.
struct PhiGrad {
  const void* data;
  bool per_map;
  bool float32;
  Strides strides;  // per_map only
};

// grad_logits (B, L, H, W) NCHW contiguous and grad_beta (B, L) float32, from the gradient of Phi and
// grad_z (B, L, 2) dense (null = 0).
cudaError_t maps_backward(DType dtype, MapShape shape, Logits logits, const float* stats, bool normalized,
                          PhiGrad grad_phi, const void* grad_z, void* grad_logits, float* grad_beta,
                          cudaStream_t stream);

// Floats of workspace head_backward needs: B * H * W (the float32 mask gradient).
size_t head_backward_workspace_floats(MapShape shape);

// Backward of head_forward with fusion: fuse_backward into the float32 workspace, then maps_backward.
// grad_z / grad_fused may be null (= 0). grad_logits NCHW contiguous; grad_image / grad_embedding with
// their strides.
cudaError_t head_backward(DType dtype, MapShape shape, Logits logits, const float* stats, bool normalized,
                          const void* grad_z, const void* grad_fused, Strides grad_fused_strides, const void* mask,
                          const FusionInputs& fusion, void* grad_logits, float* grad_beta, void* grad_image,
                          Strides grad_image_strides, void* grad_embedding, Strides grad_embedding_strides,
                          float* workspace, cudaStream_t stream);

}  // namespace decafa_kernels
