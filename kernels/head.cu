// The fused ops as two launches per pass (no batch chunks):
//   forward  = maps_forward (T read once: stats, z, Phi, partial masks) -> pixels_forward (M, F);
//   backward = pixels_backward (grad I, grad E, float32 grad M) -> maps_backward (grad T, grad beta).
// Device facts are cached per device.
#include <atomic>
#include <cstdlib>
#include <mutex>
#include <unordered_map>

#include "launch.cuh"

namespace decafa_kernels {
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
          cudaSuccess ||
      (err = cudaDeviceGetAttribute(&info.cc_major, cudaDevAttrComputeCapabilityMajor, device)) != cudaSuccess)
    return err;
  cache[device] = info;
  *out = info;
  return cudaSuccess;
}

namespace {
// set_programmatic_launch; DECAFA_CUDA_PDL=1 turns it on from the start (how bench/gpu_check.sh times it)
std::atomic<bool> programmatic{[] {
  const char* env = std::getenv("DECAFA_CUDA_PDL");
  return env != nullptr && env[0] == '1' && env[1] == '\0';
}()};
}  // namespace

bool programmatic_launch() { return programmatic.load(std::memory_order_relaxed); }

}  // namespace detail

bool set_programmatic_launch(bool on) { return detail::programmatic.exchange(on); }

size_t head_forward_workspace_floats(MapShape shape) {
  detail::DeviceInfo dev;
  if (detail::device_info(&dev) != cudaSuccess || shape.maps <= 0) return 0;
  const size_t runs = static_cast<size_t>(shape.batch) * detail::map_runs(shape, dev) * shape.height * shape.width;
  const size_t ring = detail::ring_forward_workspace_floats(shape, dev);
  return ring > runs ? ring : runs;
}

cudaError_t head_forward(DType dtype, MapShape shape, Logits logits, bool normalized, float* stats, void* z,
                         void* phi, void* mask, const FusionInputs* fusion, void* fused, Strides fused_strides,
                         float* workspace, cudaStream_t stream) {
  if (shape.batch == 0 || shape.maps == 0 || shape.height == 0 || shape.width == 0) return cudaSuccess;
  const bool pixels = mask != nullptr || fusion != nullptr;
  if (pixels && workspace == nullptr) return cudaErrorInvalidValue;
  detail::DeviceInfo dev;
  cudaError_t err = detail::device_info(&dev);
  if (err != cudaSuccess) return err;
  if (detail::ring_selected()) {  // falls through to the run kernels where the ring does not cover the case
    int ctas = 0;
    err = detail::maps_forward_ring(dtype, shape, logits, normalized, stats, z, phi, pixels ? workspace : nullptr,
                                    &ctas, stream);
    if (err != cudaSuccess || (ctas > 0 && !pixels)) return err;
    if (ctas > 0) {
      detail::PartialPlanes planes;
      planes.data = workspace;
      planes.ctas = ctas;
      planes.maps = shape.maps;
      planes.total = shape.batch * shape.maps;
      planes.scratch = true;
      return detail::pixels_forward(dtype, shape, planes, nullptr, mask, fusion, fused, fused_strides, stream);
    }
  }
  const int runs = detail::map_runs(shape, dev);
  err = detail::maps_forward(dtype, shape, logits, normalized, stats, z, phi, pixels ? workspace : nullptr, runs,
                             stream);
  if (err != cudaSuccess || !pixels) return err;
  detail::PartialPlanes planes;
  planes.data = workspace;
  planes.runs = runs;
  planes.scratch = true;
  return detail::pixels_forward(dtype, shape, planes, nullptr, mask, fusion, fused, fused_strides, stream);
}

size_t head_backward_workspace_floats(MapShape shape) {
  return static_cast<size_t>(shape.batch) * shape.height * shape.width;
}

cudaError_t head_backward(DType dtype, MapShape shape, Logits logits, const float* stats, bool normalized,
                          const void* grad_z, const void* grad_fused, Strides grad_fused_strides, const void* mask,
                          const FusionInputs& fusion, void* grad_logits, float* grad_beta, void* grad_image,
                          Strides grad_image_strides, void* grad_embedding, Strides grad_embedding_strides,
                          float* workspace, cudaStream_t stream) {
  if (shape.batch == 0 || shape.height == 0 || shape.width == 0) return cudaSuccess;
  const FusionLayout lay = fusion_layout(fusion.mode, fusion.image_channels, fusion.embedding_channels);
  if (fusion.mode < 1 || lay.channels < 0) return cudaErrorInvalidValue;
  const size_t elem = dtype_size(dtype);
  cudaError_t err;
  // F1 has no path to T, and without grad F neither I nor E has a gradient.
  const bool mask_grad = grad_fused != nullptr && (lay.image_mask >= 0 || lay.embedding_mask >= 0);
  if (grad_fused == nullptr) {  // the caller's gradient buffers are dense here (the glue allocates them)
    const size_t image_bytes = static_cast<size_t>(shape.batch) * fusion.image_channels * shape.height * shape.width;
    const size_t embed_bytes =
        static_cast<size_t>(shape.batch) * fusion.embedding_channels * shape.height * shape.width;
    if (image_bytes && (err = cudaMemsetAsync(grad_image, 0, image_bytes * elem, stream)) != cudaSuccess) return err;
    if (embed_bytes && (err = cudaMemsetAsync(grad_embedding, 0, embed_bytes * elem, stream)) != cudaSuccess)
      return err;
  } else {
    if (mask_grad && workspace == nullptr) return cudaErrorInvalidValue;
    err = fuse_backward(dtype, shape, grad_fused, grad_fused_strides, mask, fusion, grad_image, grad_image_strides,
                        grad_embedding, grad_embedding_strides, mask_grad ? workspace : nullptr, true, stream);
    if (err != cudaSuccess) return err;
  }
  if (shape.maps == 0) return cudaSuccess;
  const PhiGrad g{mask_grad ? workspace : nullptr, false, true, Strides{0, 0, 0}};
  return maps_backward(dtype, shape, logits, stats, normalized, g, grad_z, grad_logits, grad_beta, stream);
}

}  // namespace decafa_kernels
