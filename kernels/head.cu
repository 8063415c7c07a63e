// The fused ops: forward = per-map statistics, then per-pixel mask + fusion; backward = per-pixel fusion
// gradient (M recomputed, float32 mask gradient to a small workspace), then the per-map logits gradient.
// Both run over batch chunks so that a chunk's logits, read by the first kernel, are still in L2 when the
// second kernel reads them again; HBM then sees T once per pass.
#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <type_traits>
#include <unordered_map>

#include "launch.cuh"

namespace decafa_kernels {

size_t dtype_size(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

namespace detail {

cudaError_t device_info(DeviceInfo* out) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  static std::mutex mutex;
  static std::unordered_map<int, DeviceInfo> cache;
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(device);
  if (it != cache.end()) {
    *out = it->second;
    return cudaSuccess;
  }
  DeviceInfo info;
  if ((err = cudaDeviceGetAttribute(&info.sm_count, cudaDevAttrMultiProcessorCount, device)) != cudaSuccess ||
      (err = cudaDeviceGetAttribute(&info.l2_bytes, cudaDevAttrL2CacheSize, device)) != cudaSuccess ||
      (err = cudaDeviceGetAttribute(&info.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device)) !=
          cudaSuccess ||
      (err = cudaDeviceGetAttribute(&info.smem_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device)) !=
          cudaSuccess)
    return err;
  cache[device] = info;
  *out = info;
  return cudaSuccess;
}

namespace {

// Batch elements per chunk: DECAFA_CUDA_BATCH_CHUNK when set to n > 0, else as many as keep the chunk's
// logits within half of L2 (at least one).
int64_t batch_chunk(MapShape shape, size_t elem, const DeviceInfo& dev) {
  if (const char* env = std::getenv("DECAFA_CUDA_BATCH_CHUNK")) {
    const long long n = std::atoll(env);
    if (n > 0) return n;
  }
  const int64_t per_batch = static_cast<int64_t>(shape.maps) * shape.height * shape.width * elem;
  if (dev.l2_bytes <= 0 || per_batch <= 0) return shape.batch;
  const int64_t chunk = (static_cast<int64_t>(dev.l2_bytes) / 2) / per_batch;
  return chunk < 1 ? 1 : chunk;
}

template <typename P>
P* advance(P* p, int64_t elements, size_t elem) {
  if (p == nullptr) return nullptr;
  using Byte = typename std::conditional<std::is_const<P>::value, const char, char>::type;
  return reinterpret_cast<P*>(reinterpret_cast<Byte*>(p) + elements * static_cast<int64_t>(elem));
}

}  // namespace
}  // namespace detail

cudaError_t head_forward(DType dtype, MapShape shape, const void* logits, const void* image, int image_channels,
                         const void* embed, int embed_channels, int mode, float beta, bool normalized, float* lse,
                         void* z, void* mask_out, void* fused, cudaStream_t stream) {
  using detail::advance;
  const FusionLayout lay = fusion_layout(mode, image_channels, embed_channels);
  if (lay.channels < 0 || (mode != 0 && fused == nullptr)) return cudaErrorInvalidValue;
  const int64_t hw = static_cast<int64_t>(shape.height) * shape.width;
  if (shape.batch == 0 || hw == 0) return cudaSuccess;
  const size_t elem = dtype_size(dtype);
  detail::DeviceInfo dev;
  cudaError_t err = detail::device_info(&dev);
  if (err != cudaSuccess) return err;
  const bool need_pixels = mask_out != nullptr || mode != 0;
  const int64_t chunk = need_pixels ? detail::batch_chunk(shape, elem, dev) : shape.batch;
  const int64_t L = shape.maps;
  for (int64_t b0 = 0; b0 < shape.batch; b0 += chunk) {
    const MapShape part{std::min(chunk, shape.batch - b0), shape.maps, shape.height, shape.width};
    const void* t = advance(logits, b0 * L * hw, elem);
    float* part_lse = lse + b0 * L;
    err = map_forward(dtype, part, t, beta, normalized, part_lse, advance(z, b0 * L * 2, elem), nullptr, stream);
    if (err != cudaSuccess) return err;
    if (!need_pixels) continue;
    err = pixel_forward(dtype, part, t, part_lse, beta, nullptr, advance(mask_out, b0 * hw, elem),
                        advance(image, b0 * image_channels * hw, elem), image_channels,
                        advance(embed, b0 * embed_channels * hw, elem), embed_channels, mode,
                        advance(fused, b0 * lay.channels * hw, elem), stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

size_t head_backward_workspace_floats(MapShape shape) {
  return static_cast<size_t>(shape.batch) * shape.height * shape.width;
}

cudaError_t head_backward(DType dtype, MapShape shape, const void* grad_z, const void* grad_fused,
                          const void* logits, const void* image, int image_channels, const void* embed,
                          int embed_channels, const float* lse, int mode, float beta, bool normalized,
                          void* grad_logits, void* grad_image, void* grad_embed, float* workspace,
                          cudaStream_t stream) {
  using detail::advance;
  const FusionLayout lay = fusion_layout(mode, image_channels, embed_channels);
  if (mode < 1 || lay.channels < 0) return cudaErrorInvalidValue;
  const int64_t hw = static_cast<int64_t>(shape.height) * shape.width;
  if (shape.batch == 0 || hw == 0) return cudaSuccess;
  const size_t elem = dtype_size(dtype);
  cudaError_t err;
  if (grad_fused == nullptr) {  // only z has a gradient: gI = gE = 0
    const size_t image_bytes = static_cast<size_t>(shape.batch) * image_channels * hw * elem;
    const size_t embed_bytes = static_cast<size_t>(shape.batch) * embed_channels * hw * elem;
    if (image_bytes && (err = cudaMemsetAsync(grad_image, 0, image_bytes, stream)) != cudaSuccess) return err;
    if (embed_bytes && (err = cudaMemsetAsync(grad_embed, 0, embed_bytes, stream)) != cudaSuccess) return err;
    return map_backward(dtype, shape, nullptr, false, false, grad_z, logits, lse, beta, normalized, grad_logits,
                        stream);
  }
  const bool mask_grad = lay.image_masked >= 0 || lay.embed_masked >= 0;  // F1 has no path to T
  if (mask_grad && workspace == nullptr) return cudaErrorInvalidValue;
  detail::DeviceInfo dev;
  if ((err = detail::device_info(&dev)) != cudaSuccess) return err;
  const int64_t chunk = detail::batch_chunk(shape, elem, dev);
  const int64_t L = shape.maps;
  for (int64_t b0 = 0; b0 < shape.batch; b0 += chunk) {
    const MapShape part{std::min(chunk, shape.batch - b0), shape.maps, shape.height, shape.width};
    const void* t = advance(logits, b0 * L * hw, elem);
    const float* part_lse = lse + b0 * L;
    float* gm = mask_grad ? workspace + b0 * hw : nullptr;
    err = pixel_backward(dtype, part, advance(grad_fused, b0 * lay.channels * hw, elem), t, part_lse, beta,
                         nullptr, advance(image, b0 * image_channels * hw, elem), image_channels,
                         advance(embed, b0 * embed_channels * hw, elem), embed_channels, mode,
                         advance(grad_image, b0 * image_channels * hw, elem),
                         advance(grad_embed, b0 * embed_channels * hw, elem), gm, true, stream);
    if (err != cudaSuccess) return err;
    err = map_backward(dtype, part, gm, false, true, advance(grad_z, b0 * L * 2, elem), t, part_lse, beta,
                       normalized, advance(grad_logits, b0 * L * hw, elem), stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace decafa_kernels
