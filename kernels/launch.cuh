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

// Largest map (bytes) that a per-map kernel stages in dynamic shared memory: what one block may opt in
// to, but leaving room for two blocks per multiprocessor (and the static reduction scratch).
inline size_t staging_limit(const DeviceInfo& dev) {
  const int half_sm = dev.smem_per_sm / 2;
  const int limit = (dev.smem_optin < half_sm ? dev.smem_optin : half_sm) - 2048;
  return limit > 0 ? static_cast<size_t>(limit) : 0;
}

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
