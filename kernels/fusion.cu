// Per-pixel-tile kernels. A block covers 128 * V adjacent pixels of one batch element with 128 x 4 threads:
// threadIdx.x picks V pixels, threadIdx.y one of 4 groups that split the L maps (for the mask) and the
// channels (for the fusion), which gives small problems 4x the parallelism without atomics (the groups'
// partial sums meet in shared memory in a fixed order).
//   pixel_forward_kernel:  M_p = sum_l exp(beta*T_lp - lse_l) (or M read from memory), then every fusion
//                          channel written straight into the concatenated output, reading I and E once.
//   pixel_backward_kernel: gI, gE and the mask gradient gM_p = sum over masked segments of gF * source.
// Consecutive threads of a warp handle consecutive pixels: every warp access is one contiguous run.
#include <climits>

#include "common.cuh"
#include "launch.cuh"

namespace decafa_kernels {

FusionLayout fusion_layout(int mode, int ci, int c) {
  switch (mode) {
    case 0: return {-1, -1, -1, -1, 0};
    case 1: return {-1, -1, 0, -1, c};                              // E
    case 2: return {-1, 0, -1, -1, ci};                             // I*M
    case 3: return {0, ci, -1, -1, 2 * ci};                         // I | I*M
    case 4: return {0, ci, -1, 2 * ci, 2 * ci + c};                 // I | I*M | E*M
    case 5: return {0, ci, 2 * ci, 2 * ci + c, 2 * ci + 2 * c};     // I | I*M | E | E*M
    default: return {-1, -1, -1, -1, -1};
  }
}

namespace detail {
namespace {

constexpr int kPixelThreads = 128;  // threads along the pixels of a tile (blockDim.x), V pixels each
constexpr int kGroups = 4;          // thread groups (blockDim.y) that split the L maps and the channels

template <typename T>
struct PixelForwardArgs {
  const T* logits;
  const float* lse;
  int maps;
  float beta;
  const T* mask_in;
  T* mask_out;
  const T* image;
  int ci;
  const T* embed;
  int c;
  FusionLayout layout;
  T* fused;
  int hw;
  int tiles;  // pixel tiles per batch element
  bool need_mask;
};

template <typename T, typename G>
struct PixelBackwardArgs {
  const T* grad_fused;
  const T* logits;
  const float* lse;
  int maps;
  float beta;
  const T* mask_in;
  const T* image;
  int ci;
  const T* embed;
  int c;
  FusionLayout layout;
  T* grad_image;
  T* grad_embed;
  G* grad_mask;
  int hw;
  int tiles;
  bool need_mask;
};

// Shared scratch of a pixel block: one float per (group, vector element, pixel thread); element-major so
// that a warp's accesses fall in consecutive banks.
template <int V>
using GroupScratch = float[kGroups][V][kPixelThreads];

// Sums the kGroups partial vectors of this pixel thread in a fixed order (deterministic); every group
// gets the same total. Contains __syncthreads: call from all threads of the block.
template <int V>
__device__ __forceinline__ void sum_groups(const float (&partial)[V], GroupScratch<V>& scratch, float (&total)[V]) {
  const int x = threadIdx.x, y = threadIdx.y;
#pragma unroll
  for (int j = 0; j < V; ++j) scratch[y][j][x] = partial[j];
  __syncthreads();
#pragma unroll
  for (int j = 0; j < V; ++j) {
    float acc = scratch[0][j][x];
#pragma unroll
    for (int g = 1; g < kGroups; ++g) acc += scratch[g][j][x];
    total[j] = acc;
  }
}

// M at pixels p..p+V-1 of batch element b. Read from mask_in when given; else group y sums the maps
// l = y, y + kGroups, ... and the groups' partial sums are added in a fixed order. Call from all threads
// (it synchronises the block); inactive threads (p past the end) contribute nothing.
template <typename T, int V>
__device__ __forceinline__ void mask_tile(const T* __restrict__ mask_in, const T* __restrict__ logits,
                                          const float* __restrict__ lse, int maps, int hw, float beta, int64_t b,
                                          int p, bool active, GroupScratch<V>& scratch, float (&m)[V]) {
#pragma unroll
  for (int j = 0; j < V; ++j) m[j] = 0.f;
  if (mask_in != nullptr) {
    if (active) load_floats<V>(mask_in + b * hw + p, m);
    return;
  }
  float partial[V];
#pragma unroll
  for (int j = 0; j < V; ++j) partial[j] = 0.f;
  if (active) {
    const T* t = logits + b * maps * hw + p;
    const float* ls = lse + b * maps;
#pragma unroll 8
    for (int l = threadIdx.y; l < maps; l += kGroups) {
      float a[V];
      load_floats<V>(t + static_cast<int64_t>(l) * hw, a);
      const float lv = __ldg(ls + l);
#pragma unroll
      for (int j = 0; j < V; ++j) partial[j] += __expf(beta * a[j] - lv);
    }
  }
  sum_groups<V>(partial, scratch, m);
}

// Group `first` of one source (I or E): channels first, first + kGroups, ... into their plain and masked
// output segments (offset -1: absent).
template <typename T, int V>
__device__ __forceinline__ void write_segments(const T* __restrict__ src, int channels, int first, int64_t plane,
                                               T* __restrict__ out, int plain, int masked, const float (&m)[V]) {
#pragma unroll 4
  for (int c = first; c < channels; c += kGroups) {
    const Vec<T, V> raw = load_stream<V>(src + c * plane);
    if (plain >= 0) store_stream<V>(out + (plain + c) * plane, raw);
    if (masked >= 0) {
      float v[V];
      to_floats<V>(raw, v);
#pragma unroll
      for (int j = 0; j < V; ++j) v[j] *= m[j];
      store_floats_stream<V>(out + (masked + c) * plane, v);
    }
  }
}

template <typename T, int V>
__global__ void __launch_bounds__(kPixelThreads * kGroups, 2) pixel_forward_kernel(PixelForwardArgs<T> a) {
  __shared__ GroupScratch<V> scratch;
  const int64_t b = blockIdx.x / a.tiles;
  const int tile = static_cast<int>(blockIdx.x - b * a.tiles);
  const int p = (tile * kPixelThreads + static_cast<int>(threadIdx.x)) * V;
  const bool active = p < a.hw;  // V divides hw whenever V > 1, so a started vector is always whole
  const int64_t plane = a.hw;

  float m[V];
#pragma unroll
  for (int j = 0; j < V; ++j) m[j] = 0.f;
  if (a.need_mask) {  // uniform over the block, so the barrier inside is safe
    mask_tile<T, V>(a.mask_in, a.logits, a.lse, a.maps, a.hw, a.beta, b, p, active, scratch, m);
    if (a.mask_out != nullptr && threadIdx.y == 0 && active) store_floats<V>(a.mask_out + b * plane + p, m);
  }
  const FusionLayout& lay = a.layout;
  if (!active || lay.channels <= 0) return;  // no barrier below
  T* out = a.fused + b * lay.channels * plane + p;
  const int group = threadIdx.y;
  if (lay.image_plain >= 0 || lay.image_masked >= 0)
    write_segments<T, V>(a.image + b * a.ci * plane + p, a.ci, group, plane, out, lay.image_plain,
                         lay.image_masked, m);
  if (lay.embed_plain >= 0 || lay.embed_masked >= 0)
    write_segments<T, V>(a.embed + b * a.c * plane + p, a.c, group, plane, out, lay.embed_plain,
                         lay.embed_masked, m);
}

// Group `first` of one source: g_src = gF_plain + gF_masked * M for its channels (zeros when the mode has
// no segment of this source), and gm += gF_masked * src.
template <typename T, int V>
__device__ __forceinline__ void grad_segments(const T* __restrict__ grad_out, const T* __restrict__ src,
                                              int channels, int first, int64_t plane, T* __restrict__ grad_src,
                                              int plain, int masked, const float (&m)[V], float (&gm)[V]) {
#pragma unroll 4
  for (int c = first; c < channels; c += kGroups) {
    float acc[V];
#pragma unroll
    for (int j = 0; j < V; ++j) acc[j] = 0.f;
    if (plain >= 0) {
      float g[V];
      load_floats_stream<V>(grad_out + (plain + c) * plane, g);
#pragma unroll
      for (int j = 0; j < V; ++j) acc[j] += g[j];
    }
    if (masked >= 0) {
      float g[V], x[V];
      load_floats_stream<V>(grad_out + (masked + c) * plane, g);
      load_floats_stream<V>(src + c * plane, x);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        acc[j] += g[j] * m[j];
        gm[j] += g[j] * x[j];
      }
    }
    store_floats_stream<V>(grad_src + c * plane, acc);
  }
}

template <typename T, typename G, int V>
__global__ void __launch_bounds__(kPixelThreads * kGroups, 2) pixel_backward_kernel(PixelBackwardArgs<T, G> a) {
  __shared__ GroupScratch<V> scratch;
  const int64_t b = blockIdx.x / a.tiles;
  const int tile = static_cast<int>(blockIdx.x - b * a.tiles);
  const int p = (tile * kPixelThreads + static_cast<int>(threadIdx.x)) * V;
  const bool active = p < a.hw;
  const int64_t plane = a.hw;

  float m[V], gm[V];
#pragma unroll
  for (int j = 0; j < V; ++j) m[j] = gm[j] = 0.f;
  if (a.need_mask) mask_tile<T, V>(a.mask_in, a.logits, a.lse, a.maps, a.hw, a.beta, b, p, active, scratch, m);

  if (active) {
    const FusionLayout& lay = a.layout;
    const int group = threadIdx.y;
    const T* gf = a.grad_fused + b * lay.channels * plane + p;
    grad_segments<T, V>(gf, a.image + b * a.ci * plane + p, a.ci, group, plane,
                        a.grad_image + b * a.ci * plane + p, lay.image_plain, lay.image_masked, m, gm);
    grad_segments<T, V>(gf, a.embed + b * a.c * plane + p, a.c, group, plane,
                        a.grad_embed + b * a.c * plane + p, lay.embed_plain, lay.embed_masked, m, gm);
  }
  if (a.grad_mask != nullptr) {  // uniform over the block
    __syncthreads();             // every thread has read the mask out of scratch
    float total[V];
    sum_groups<V>(gm, scratch, total);
    if (threadIdx.y == 0 && active) store_floats<V>(a.grad_mask + b * plane + p, total);
  }
}

// Vector width for a pixel launch: the widest (up to 16 bytes) that still gives the grid at least two
// blocks per multiprocessor, but never under 4 bytes per access; scalar when the pointers are unaligned.
template <typename T>
int pixel_vec(int64_t batch, int hw, bool all_aligned, const DeviceInfo& dev) {
  if (!all_aligned) return 1;
  for (int v = vec_width(sizeof(T)); v > 1; v /= 2) {
    if (hw % v != 0) continue;
    const bool enough = batch * ceil_div(hw, static_cast<int64_t>(kPixelThreads) * v) >= 2 * dev.sm_count;
    if (enough || v * sizeof(T) <= 4) return v;
  }
  return 1;
}

template <typename Args, typename Kernel>
cudaError_t launch_pixels(Kernel kernel, Args args, int64_t batch, int v, cudaStream_t stream) {
  args.tiles = static_cast<int>(ceil_div(args.hw, static_cast<int64_t>(kPixelThreads) * v));
  const int64_t blocks = batch * args.tiles;
  if (blocks > INT_MAX) return cudaErrorInvalidValue;
  kernel<<<static_cast<unsigned>(blocks), dim3(kPixelThreads, kGroups), 0, stream>>>(args);
  return cudaGetLastError();
}

// Launches the kernel instantiated for vector width v (a power of two <= V).
template <typename T, int V = vec_width(sizeof(T))>
cudaError_t forward_with_vec(int v, const PixelForwardArgs<T>& args, int64_t batch, cudaStream_t stream) {
  if constexpr (V == 1) {
    return launch_pixels(pixel_forward_kernel<T, 1>, args, batch, 1, stream);
  } else {
    if (v == V) return launch_pixels(pixel_forward_kernel<T, V>, args, batch, V, stream);
    return forward_with_vec<T, V / 2>(v, args, batch, stream);
  }
}

template <typename T, typename G, int V = vec_width(sizeof(T))>
cudaError_t backward_with_vec(int v, const PixelBackwardArgs<T, G>& args, int64_t batch, cudaStream_t stream) {
  if constexpr (V == 1) {
    return launch_pixels(pixel_backward_kernel<T, G, 1>, args, batch, 1, stream);
  } else {
    if (v == V) return launch_pixels(pixel_backward_kernel<T, G, V>, args, batch, V, stream);
    return backward_with_vec<T, G, V / 2>(v, args, batch, stream);
  }
}

template <typename T>
cudaError_t pixel_forward_t(MapShape shape, const T* logits, const float* lse, float beta, const T* mask_in,
                            T* mask_out, const T* image, int ci, const T* embed, int c, int mode, T* fused,
                            cudaStream_t stream) {
  const int64_t hw64 = static_cast<int64_t>(shape.height) * shape.width;
  const FusionLayout lay = fusion_layout(mode, ci, c);
  if (lay.channels < 0) return cudaErrorInvalidValue;
  if (shape.batch == 0 || hw64 == 0) return cudaSuccess;
  if (hw64 > INT_MAX / 2) return cudaErrorInvalidValue;
  const bool need_mask = mask_out != nullptr || lay.image_masked >= 0 || lay.embed_masked >= 0;
  if (need_mask && mask_in == nullptr && (logits == nullptr || lse == nullptr)) return cudaErrorInvalidValue;
  DeviceInfo dev;
  cudaError_t err = device_info(&dev);
  if (err != cudaSuccess) return err;
  PixelForwardArgs<T> args{logits, lse, shape.maps, beta, mask_in, mask_out, image, ci, embed, c, lay, fused,
                           static_cast<int>(hw64), 0, need_mask};
  const bool all_aligned = aligned(logits, 16) && aligned(mask_in, 16) && aligned(mask_out, 16) &&
                           aligned(image, 16) && aligned(embed, 16) && aligned(fused, 16);
  return forward_with_vec<T>(pixel_vec<T>(shape.batch, args.hw, all_aligned, dev), args, shape.batch, stream);
}

template <typename T, typename G>
cudaError_t pixel_backward_t(MapShape shape, const T* grad_fused, const T* logits, const float* lse, float beta,
                             const T* mask_in, const T* image, int ci, const T* embed, int c, int mode,
                             T* grad_image, T* grad_embed, G* grad_mask, cudaStream_t stream) {
  const int64_t hw64 = static_cast<int64_t>(shape.height) * shape.width;
  const FusionLayout lay = fusion_layout(mode, ci, c);
  if (lay.channels <= 0 || grad_fused == nullptr) return cudaErrorInvalidValue;
  if (shape.batch == 0 || hw64 == 0) return cudaSuccess;
  if (hw64 > INT_MAX / 2) return cudaErrorInvalidValue;
  const bool need_mask = lay.image_masked >= 0 || lay.embed_masked >= 0;
  if (need_mask && mask_in == nullptr && (logits == nullptr || lse == nullptr)) return cudaErrorInvalidValue;
  DeviceInfo dev;
  cudaError_t err = device_info(&dev);
  if (err != cudaSuccess) return err;
  PixelBackwardArgs<T, G> args{grad_fused, logits,     lse,        shape.maps, beta,
                               mask_in,    image,      ci,         embed,      c,
                               lay,        grad_image, grad_embed, grad_mask,  static_cast<int>(hw64),
                               0,          need_mask};
  constexpr int kVec = vec_width(sizeof(T));
  const bool all_aligned = aligned(grad_fused, 16) && aligned(logits, 16) && aligned(mask_in, 16) &&
                           aligned(image, 16) && aligned(embed, 16) && aligned(grad_image, 16) &&
                           aligned(grad_embed, 16) && aligned(grad_mask, kVec * sizeof(G));
  return backward_with_vec<T, G>(pixel_vec<T>(shape.batch, args.hw, all_aligned, dev), args, shape.batch, stream);
}

}  // namespace
}  // namespace detail

cudaError_t pixel_forward(DType dtype, MapShape shape, const void* logits, const float* lse, float beta,
                          const void* mask_in, void* mask_out, const void* image, int image_channels,
                          const void* embed, int embed_channels, int mode, void* fused, cudaStream_t stream) {
  DECAFA_DISPATCH(dtype, return detail::pixel_forward_t<scalar_t>(
                             shape, static_cast<const scalar_t*>(logits), lse, beta,
                             static_cast<const scalar_t*>(mask_in), static_cast<scalar_t*>(mask_out),
                             static_cast<const scalar_t*>(image), image_channels,
                             static_cast<const scalar_t*>(embed), embed_channels, mode,
                             static_cast<scalar_t*>(fused), stream));
  return cudaSuccess;
}

cudaError_t pixel_backward(DType dtype, MapShape shape, const void* grad_fused, const void* logits,
                           const float* lse, float beta, const void* mask_in, const void* image,
                           int image_channels, const void* embed, int embed_channels, int mode, void* grad_image,
                           void* grad_embed, void* grad_mask, bool grad_mask_float32, cudaStream_t stream) {
  DECAFA_DISPATCH(
      dtype,
      if (grad_mask_float32) {
        return detail::pixel_backward_t<scalar_t, float>(
            shape, static_cast<const scalar_t*>(grad_fused), static_cast<const scalar_t*>(logits), lse, beta,
            static_cast<const scalar_t*>(mask_in), static_cast<const scalar_t*>(image), image_channels,
            static_cast<const scalar_t*>(embed), embed_channels, mode, static_cast<scalar_t*>(grad_image),
            static_cast<scalar_t*>(grad_embed), static_cast<float*>(grad_mask), stream);
      } return detail::pixel_backward_t<scalar_t, scalar_t>(
          shape, static_cast<const scalar_t*>(grad_fused), static_cast<const scalar_t*>(logits), lse, beta,
          static_cast<const scalar_t*>(mask_in), static_cast<const scalar_t*>(image), image_channels,
          static_cast<const scalar_t*>(embed), embed_channels, mode, static_cast<scalar_t*>(grad_image),
          static_cast<scalar_t*>(grad_embed), static_cast<scalar_t*>(grad_mask), stream));
  return cudaSuccess;
}

}  // namespace decafa_kernels
