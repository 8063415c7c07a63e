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
};

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
// keep the extra traffic small at the large batches that matter. DECAFA_CUDA_RUNS=n forces n.
int map_runs(MapShape shape, const DeviceInfo& dev);

// The two halves of every op (stats.cu, fusion.cu); the public launchers (head.cu) chain them.
// maps_forward: stats, z, phi and the `runs` partial masks per batch element (partial may be null).
cudaError_t maps_forward(DType dtype, MapShape shape, const Logits& logits, bool normalized, float* stats, void* z,
                         void* phi, float* partial, int runs, cudaStream_t stream);
// pixels_forward: the mask from `runs` partial masks (or from mask_in when partial is null), written to
// mask_out when non-null, and the fusion when `fusion` is non-null.
cudaError_t pixels_forward(DType dtype, MapShape shape, const float* partial, int runs, const void* mask_in,
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
