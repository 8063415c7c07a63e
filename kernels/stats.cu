// Per-map kernels: one block per (b, l) map of H*W pixels.
//   map_forward_kernel:  lse, z (soft-argmax) and optionally Phi, with an online softmax in one read of T.
//   map_backward_kernel: the softmax / soft-argmax / mask gradient, two sweeps over the map (the map is
//                        staged in shared memory when it fits, so T comes from HBM once).
#include <climits>

#include "common.cuh"
#include "launch.cuh"

namespace decafa_kernels {
namespace detail {
namespace {

constexpr int kMapThreads = 512;

// Output coordinate = offset + scale * pixel index (column for x, row for y).
struct Coords {
  float ox, kx, oy, ky;
};

Coords coords_for(int height, int width, bool normalized) {
  if (!normalized) return {0.f, 1.f, 0.f, 1.f};
  // x_n = -1 + 2 col / (W - 1); a one-pixel axis sits at -1 (torch.linspace(-1, 1, 1) and kornia).
  return {-1.f, width > 1 ? 2.f / (width - 1) : 0.f, -1.f, height > 1 ? 2.f / (height - 1) : 0.f};
}

// Each thread walks vectors i = threadIdx.x, +blockDim.x, ... of V pixels, keeping running softmax stats
// (max, sum, and the two exp-weighted coordinate sums, rescaled when the max grows); the block merges them.
template <typename T, int V>
__global__ void __launch_bounds__(kMapThreads)
    map_forward_kernel(const T* __restrict__ logits, int hw, int width, float beta, Coords co,
                       float* __restrict__ lse, T* __restrict__ z, T* __restrict__ phi, bool staged) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ SoftStats scratch[33];
  T* stage = reinterpret_cast<T*>(smem_raw);

  const int64_t map = blockIdx.x;
  const T* src = logits + map * hw;
  const int num_vec = hw / V;

  SoftStats st{-INFINITY, 0.f, 0.f, 0.f};
#pragma unroll 4
  for (int i = threadIdx.x; i < num_vec; i += blockDim.x) {
    const Vec<T, V> raw = load_raw<V>(src + i * V);
    if (staged) store_raw<V>(stage + i * V, raw);  // read back by this same thread below
    float a[V];
    to_floats<V>(raw, a);
    float m = st.m;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      a[j] *= beta;
      m = fmaxf(m, a[j]);  // fmaxf skips NaN; a NaN still reaches s through its own exp below
    }
    const float f = rescale(st.m, m);
    st.s *= f;
    st.sx *= f;
    st.sy *= f;
    st.m = m;
    int col, row;
    pixel_of(i * V, width, col, row);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      // a == m == -inf would give exp(nan); an all -inf map ends as lse = -inf, z = nan (like torch).
      const float e = a[j] == -INFINITY ? 0.f : __expf(a[j] - m);
      st.s += e;
      st.sx += e * static_cast<float>(col);
      st.sy += e * static_cast<float>(row);
      next_pixel(width, col, row);
    }
  }
  const SoftStats total = block_merge(st, scratch);
  const float map_lse = total.m + __logf(total.s);
  if (threadIdx.x == 0) {
    lse[map] = map_lse;
    if (z != nullptr) {
      z[2 * map] = from_float<T>(co.ox + co.kx * (total.sx / total.s));
      z[2 * map + 1] = from_float<T>(co.oy + co.ky * (total.sy / total.s));
    }
  }
  if (phi != nullptr) {
    const T* again = staged ? stage : src;  // unstaged: the block's own map, just read, comes from L2
    T* dst = phi + map * hw;
#pragma unroll 4
    for (int i = threadIdx.x; i < num_vec; i += blockDim.x) {
      float a[V];
      load_floats<V>(again + i * V, a);
#pragma unroll
      for (int j = 0; j < V; ++j) a[j] = __expf(beta * a[j] - map_lse);
      store_floats_stream<V>(dst + i * V, a);
    }
  }
}

// grad_logits = beta * Phi * [(g_p - s) + gx (col - zx) + gy (row - zy)], s = sum g Phi, (zx, zy) = sum Phi
// (col, row); gx, gy already carry the coordinate scale (normalised: x_n - zx_n = kx (col - zx)).
// Phi = exp(beta T - lse) is renormalised by its sum S, taken in sweep 1: lse is a rounded float32, and for
// |beta T| ~ 40 that alone makes S drift from 1 by ~1e-6, biasing z by ~1e-6 * col and so the gradient.
template <typename T, typename G, int V>
__global__ void __launch_bounds__(kMapThreads)
    map_backward_kernel(const T* __restrict__ logits, const float* __restrict__ lse, int maps, int hw, int width,
                        float beta, const G* __restrict__ grad, bool grad_per_map, const T* __restrict__ grad_z,
                        float kx, float ky, T* __restrict__ grad_logits, bool staged) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ float scratch[33][4];
  T* stage = reinterpret_cast<T*>(smem_raw);

  const int64_t map = blockIdx.x;
  const int64_t b = map / maps;
  const T* src = logits + map * hw;
  const G* g = grad == nullptr ? nullptr : grad + (grad_per_map ? map : b) * hw;
  const bool want_z = grad_z != nullptr;
  const float map_lse = lse[map];
  const int num_vec = hw / V;

  // Sweep 1: s = sum g Phi and the coordinates z = sum Phi (col, row).
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll 2
  for (int i = threadIdx.x; i < num_vec; i += blockDim.x) {
    const Vec<T, V> raw = load_raw<V>(src + i * V);
    if (staged) store_raw<V>(stage + i * V, raw);
    float a[V];
    to_floats<V>(raw, a);
    float gv[V];
    if (g != nullptr) load_floats<V>(g + i * V, gv);
    int col, row;
    pixel_of(i * V, width, col, row);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float p = __expf(beta * a[j] - map_lse);
      acc[3] += p;
      if (g != nullptr) acc[0] += gv[j] * p;
      if (want_z) {
        acc[1] += p * static_cast<float>(col);
        acc[2] += p * static_cast<float>(row);
      }
      next_pixel(width, col, row);
    }
  }
  block_sum<4>(acc, scratch);
  const float inv_sum = 1.f / acc[3];
  const float s = acc[0] * inv_sum, zx = acc[1] * inv_sum, zy = acc[2] * inv_sum;
  const float gx = want_z ? to_float(grad_z[2 * map]) * kx : 0.f;
  const float gy = want_z ? to_float(grad_z[2 * map + 1]) * ky : 0.f;

  // Sweep 2: the gradient, from the staged map (or L2).
  const T* again = staged ? stage : src;
  T* dst = grad_logits + map * hw;
#pragma unroll 2
  for (int i = threadIdx.x; i < num_vec; i += blockDim.x) {
    float a[V];
    load_floats<V>(again + i * V, a);
    float gv[V];
    if (g != nullptr) load_floats<V>(g + i * V, gv);
    int col, row;
    pixel_of(i * V, width, col, row);
    float out[V];
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float p = __expf(beta * a[j] - map_lse) * inv_sum;
      float d = gx * (static_cast<float>(col) - zx) + gy * (static_cast<float>(row) - zy) - s;
      if (g != nullptr) d += gv[j];
      out[j] = beta * p * d;
      next_pixel(width, col, row);
    }
    store_floats_stream<V>(dst + i * V, out);
  }
}

// Raises the dynamic shared-memory limit of `kernel` when a launch needs more than the default 48 KiB.
template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

template <typename T, int V>
cudaError_t run_map_forward(int64_t maps, int hw, int width, float beta, Coords co, const T* logits, float* lse,
                            T* z, T* phi, bool staged, cudaStream_t stream) {
  const size_t smem = staged ? static_cast<size_t>(hw) * sizeof(T) : 0;
  auto kernel = map_forward_kernel<T, V>;
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  const int threads = threads_for(hw / V, kMapThreads);
  kernel<<<static_cast<unsigned>(maps), threads, smem, stream>>>(logits, hw, width, beta, co, lse, z, phi, staged);
  return cudaGetLastError();
}

template <typename T>
cudaError_t map_forward_t(MapShape shape, const T* logits, float beta, bool normalized, float* lse, T* z, T* phi,
                          cudaStream_t stream) {
  const int64_t maps = shape.batch * shape.maps;
  const int64_t hw64 = static_cast<int64_t>(shape.height) * shape.width;
  if (maps == 0 || hw64 == 0) return cudaSuccess;
  if (maps > INT_MAX || hw64 > INT_MAX) return cudaErrorInvalidValue;
  const int hw = static_cast<int>(hw64);
  DeviceInfo dev;
  cudaError_t err = device_info(&dev);
  if (err != cudaSuccess) return err;
  constexpr int kVec = vec_width(sizeof(T));
  const bool vec = hw % kVec == 0 && aligned(logits, 16) && aligned(phi, 16);
  const bool staged = phi != nullptr && static_cast<size_t>(hw) * sizeof(T) <= staging_limit(dev);
  const Coords co = coords_for(shape.height, shape.width, normalized);
  if (vec) return run_map_forward<T, kVec>(maps, hw, shape.width, beta, co, logits, lse, z, phi, staged, stream);
  return run_map_forward<T, 1>(maps, hw, shape.width, beta, co, logits, lse, z, phi, staged, stream);
}

template <typename T, typename G, int V>
cudaError_t run_map_backward(MapShape shape, int hw, const G* grad, bool grad_per_map, const T* grad_z,
                             const T* logits, const float* lse, float beta, float kx, float ky, T* grad_logits,
                             bool staged, cudaStream_t stream) {
  const size_t smem = staged ? static_cast<size_t>(hw) * sizeof(T) : 0;
  auto kernel = map_backward_kernel<T, G, V>;
  cudaError_t err = allow_smem(kernel, smem);
  if (err != cudaSuccess) return err;
  const int threads = threads_for(hw / V, kMapThreads);
  const unsigned blocks = static_cast<unsigned>(shape.batch * shape.maps);
  kernel<<<blocks, threads, smem, stream>>>(logits, lse, shape.maps, hw, shape.width, beta, grad, grad_per_map,
                                            grad_z, kx, ky, grad_logits, staged);
  return cudaGetLastError();
}

template <typename T, typename G>
cudaError_t map_backward_t(MapShape shape, const G* grad, bool grad_per_map, const T* grad_z, const T* logits,
                           const float* lse, float beta, bool normalized, T* grad_logits, cudaStream_t stream) {
  const int64_t maps = shape.batch * shape.maps;
  const int64_t hw64 = static_cast<int64_t>(shape.height) * shape.width;
  if (maps == 0 || hw64 == 0) return cudaSuccess;
  if (maps > INT_MAX || hw64 > INT_MAX) return cudaErrorInvalidValue;
  if (grad == nullptr && grad_z == nullptr) {
    cudaError_t err = cudaMemsetAsync(grad_logits, 0, static_cast<size_t>(maps * hw64) * sizeof(T), stream);
    return err;
  }
  const int hw = static_cast<int>(hw64);
  DeviceInfo dev;
  cudaError_t err = device_info(&dev);
  if (err != cudaSuccess) return err;
  constexpr int kVec = vec_width(sizeof(T));
  const bool vec = hw % kVec == 0 && aligned(logits, 16) && aligned(grad_logits, 16) &&
                   aligned(grad, kVec * sizeof(G));
  const bool staged = static_cast<size_t>(hw) * sizeof(T) <= staging_limit(dev);
  const Coords co = coords_for(shape.height, shape.width, normalized);
  if (vec)
    return run_map_backward<T, G, kVec>(shape, hw, grad, grad_per_map, grad_z, logits, lse, beta, co.kx, co.ky,
                                        grad_logits, staged, stream);
  return run_map_backward<T, G, 1>(shape, hw, grad, grad_per_map, grad_z, logits, lse, beta, co.kx, co.ky,
                                   grad_logits, staged, stream);
}

}  // namespace
}  // namespace detail

cudaError_t map_forward(DType dtype, MapShape shape, const void* logits, float beta, bool normalized, float* lse,
                        void* z, void* phi, cudaStream_t stream) {
  DECAFA_DISPATCH(dtype, return detail::map_forward_t<scalar_t>(
                             shape, static_cast<const scalar_t*>(logits), beta, normalized, lse,
                             static_cast<scalar_t*>(z), static_cast<scalar_t*>(phi), stream));
  return cudaSuccess;
}

cudaError_t map_backward(DType dtype, MapShape shape, const void* grad, bool grad_per_map, bool grad_float32,
                         const void* grad_z, const void* logits, const float* lse, float beta, bool normalized,
                         void* grad_logits, cudaStream_t stream) {
  DECAFA_DISPATCH(
      dtype,
      if (grad_float32) {
        return detail::map_backward_t<scalar_t, float>(
            shape, static_cast<const float*>(grad), grad_per_map, static_cast<const scalar_t*>(grad_z),
            static_cast<const scalar_t*>(logits), lse, beta, normalized, static_cast<scalar_t*>(grad_logits),
            stream);
      } return detail::map_backward_t<scalar_t, scalar_t>(
          shape, static_cast<const scalar_t*>(grad), grad_per_map, static_cast<const scalar_t*>(grad_z),
          static_cast<const scalar_t*>(logits), lse, beta, normalized, static_cast<scalar_t*>(grad_logits),
          stream));
  return cudaSuccess;
}

}  // namespace decafa_kernels
