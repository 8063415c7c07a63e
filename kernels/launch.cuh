// Host-side helpers for the launchers: device facts (cached per device), dtype dispatch, alignment.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "decafa_kernels.cuh"

namespace decafa_kernels {
namespace detail {

struct DeviceInfo {
  int sm_count = 1;
  int l2_bytes = 0;
  int smem_optin = 48 * 1024;   // max dynamic + static shared memory per block after opt-in
  int smem_per_sm = 48 * 1024;  // shared memory per multiprocessor
  int cc_major = 8;             // compute capability
};

// Whether pixels_forward is launched as a programmatic dependent of the per-map kernel before it
// (set_programmatic_launch; sm_90 and later only).
bool programmatic_launch();

// Facts about the current device, queried once per device.
cudaError_t device_info(DeviceInfo* out);

// Elements per 16-byte vector for element size `bytes`.
constexpr int vec_width(size_t bytes) { return static_cast<int>(16 / bytes); }

inline bool aligned(const void* p, size_t bytes) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Threads for a block that walks `n` items: a multiple of 32 in [32, max_threads].
inline int threads_for(int64_t n, int max_threads) {
  const int64_t t = ceil_div(n, 32) * 32;
  return static_cast<int>(t < 32 ? 32 : (t > max_threads ? max_threads : t));
}

// Maps per thread-held tile of the on-chip map kernels: each thread keeps kMapValues values of a map (and
// of the run's partial mask / mask gradient) in registers; a block has at most kMapThreads threads, so
// maps of up to kMapThreads * kMapValues pixels (128 x 128) are held on chip, larger ones streamed.
constexpr int kMapThreads = 1024;
constexpr int kMapValues = 16;
constexpr int64_t kOnChipPixels = static_cast<int64_t>(kMapThreads) * kMapValues;

// Runs of maps per batch element for the per-map kernels: enough blocks for two per multiprocessor, never
// more than the maps. Each run writes (forward) or reads (backward) one H*W float32 plane, so few runs
// keep the extra traffic small at the large batches that matter. set_map_runs(n) forces n.
int map_runs(MapShape shape, const DeviceInfo& dev);

// Output coordinate = o + k * pixel index (column for x, row for y).
struct Coords {
  float ox, kx, oy, ky;
};

inline Coords coords_for(int height, int width, bool normalized) {
  if (!normalized) return {0.f, 1.f, 0.f, 1.f};
  // x_n = 2 col / (W - 1) - 1; a one-pixel axis gives 0, its centre (kornia's convention).
  return {width > 1 ? -1.f : 0.f, width > 1 ? 2.f / (width - 1) : 0.f, height > 1 ? -1.f : 0.f,
          height > 1 ? 2.f / (height - 1) : 0.f};
}

// The ring layout of the per-map work (ring.cu): CTA c of `ctas` takes the maps [ring_start(c), ring_start(c + 1))
// of the B * L maps in (b, l) order, a balanced contiguous range of at most L maps (ctas >= B), so it touches
// at most two batch elements and writes at most two partial masks: plane 2c for its first batch element, 2c + 1
// for its second.
DECAFA_HD inline int64_t ring_start(int64_t c, int64_t total, int64_t ctas) { return c * total / ctas; }
// The CTA whose range holds map m.
DECAFA_HD inline int64_t ring_cta_of(int64_t m, int64_t total, int64_t ctas) { return ((m + 1) * ctas - 1) / total; }

// Where the partial masks of a forward are: `runs` planes per batch element (maps_forward), or the ring's two
// planes per CTA (ctas > 0). Batch element b sums planes plane(b, 0 .. count(b) - 1) in that order.
struct PartialPlanes {
  const float* data = nullptr;
  int runs = 0;
  int ctas = 0;
  int maps = 0;
  int64_t total = 0;
  // The planes are the launcher's own workspace, free to overwrite: a channel-split pixels_forward may sum them
  // once into each batch element's first plane (pixels_mask) rather than in every channel group.
  bool scratch = false;
};

// The planes of batch element b: first CTA c_lo and count (ring), or runs planes from b * runs.
struct PlaneRange {
  int64_t base;  // runs: b * runs; ring: 2 * c_lo
  int count;
  int skip;  // ring: 1 when c_lo's range starts in batch element b - 1 (b's part is c_lo's second plane)
  bool ring;
  DECAFA_HD int64_t plane(int j) const { return ring ? base + 2 * j + (j == 0 ? skip : 0) : base + j; }
};

DECAFA_HD inline PlaneRange plane_range(const PartialPlanes& p, int64_t b) {
  if (p.ctas <= 0) return {b * p.runs, p.runs, 0, false};
  const int64_t first = b * p.maps;
  const int64_t lo = ring_cta_of(first, p.total, p.ctas), hi = ring_cta_of(first + p.maps - 1, p.total, p.ctas);
  return {2 * lo, static_cast<int>(hi - lo + 1), ring_start(lo, p.total, p.ctas) < first ? 1 : 0, true};
}

// Whether the per-map forward runs the ring kernels (DECAFA_CUDA_MAPS=ring, read once per process; default:
// the on-chip run kernels).
bool ring_selected();

// The ring forward (ring.cu) where it covers the case (NCHW maps of at most 16384 pixels, H*W a multiple of 512,
// W of a 16-byte vector, H of 16 / the vector, 16-byte aligned T, batch and map strides, shared memory for two stages);
// `*ctas` gets its grid (0: not covered, nothing launched, the caller runs maps_forward instead).
// ring_forward_workspace_floats: the partial masks' floats, 0 where the ring does not cover the shape.
size_t ring_forward_workspace_floats(MapShape shape, const DeviceInfo& dev);
cudaError_t maps_forward_ring(DType dtype, MapShape shape, const Logits& logits, bool normalized, float* stats,
                              void* z, void* phi, float* partial, int* ctas, cudaStream_t stream);
// The ring backward (ring.cu) for a per-batch float32 mask gradient (or none) and grad z, where the ring covers
// the shape (as above, and grad_mask, grad_logits 16-byte aligned): `*done` says whether it ran.
cudaError_t maps_backward_ring(DType dtype, MapShape shape, const Logits& logits, const float* stats, bool normalized,
                               const float* grad_mask, const void* grad_z, void* grad_logits, float* grad_beta,
                               bool* done, cudaStream_t stream);

// The two halves of every op (stats.cu, fusion.cu); the public launchers (head.cu) chain them.
// maps_forward: stats, z, phi and the `runs` partial masks per batch element (partial may be null).
cudaError_t maps_forward(DType dtype, MapShape shape, const Logits& logits, bool normalized, float* stats, void* z,
                         void* phi, float* partial, int runs, cudaStream_t stream);
// pixels_forward: the mask from the partial masks (or from mask_in when partial.data is null), written to
// mask_out when non-null, and the fusion when `fusion` is non-null.
cudaError_t pixels_forward(DType dtype, MapShape shape, const PartialPlanes& partial, const void* mask_in,
                           void* mask_out, const FusionInputs* fusion, void* fused, Strides fused_strides,
                           cudaStream_t stream);

}  // namespace detail
}  // namespace decafa_kernels

// Runs the statement block with `scalar_t` bound to the element type of `dtype`.
#define DECAFA_DISPATCH(dtype, ...)                        \
  switch (dtype) {                                         \
    case ::decafa_kernels::DType::kFloat32: {              \
      using scalar_t = float;                              \
      __VA_ARGS__;                                         \
      break;                                               \
    }                                                      \
    case ::decafa_kernels::DType::kFloat16: {              \
      using scalar_t = __half;                             \
      __VA_ARGS__;                                         \
      break;                                               \
    }                                                      \
    case ::decafa_kernels::DType::kBFloat16: {             \
      using scalar_t = __nv_bfloat16;                      \
      __VA_ARGS__;                                         \
      break;                                               \
    }                                                      \
    default:                                               \
      return cudaErrorInvalidValue;                        \
  }
