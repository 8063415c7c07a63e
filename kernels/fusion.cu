// Pixel-tiled kernels: a block of 64 x 4 threads covers a tile of pixels of one batch element; the 4 thread
// groups (threadIdx.y) split the partial masks and the channels, and their partial sums meet in shared
// memory in a fixed order (deterministic, no atomics).
//   pixels_forward:  M = the run partial masks summed in a fixed order (or a given mask), written when asked;
//                    then every fusion channel straight into F, I and E read once.
//   pixels_backward: grad I = gF_plain + gF_masked M, grad E likewise, and the mask gradient
//                    gM = sum over the masked channels of gF * source, from grad F, I, E and the saved M.
// Two thread mappings, chosen by the embedding's layout:
//   NCHW (pixel-major planes): a thread takes V adjacent pixels of a channel, 16-byte accesses along the
//     pixels; a warp covers one contiguous run of each plane.
//   channels_last: a thread takes one pixel and VC adjacent channels per access (as wide as the channel
//     offsets of F allow); a warp covers 32 adjacent pixels, and the NCHW gradients it writes stay coalesced.
#include <climits>
#include <type_traits>

#include "common.cuh"
#include "fusion_layout.h"  // F's channel layout, shared with csrc/cpu and decafa_fast/ops/layout.py
#include "launch.cuh"

namespace decafa_kernels {

size_t dtype_size(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

namespace detail {
namespace {

// 64 x 4 threads: a 512-thread block would cap a thread at 128 registers, too few for the backward's
// 16-byte vectors of 2-byte elements on sm_80 (they spill).
constexpr int kPixelThreads = 64;  // threads along the pixels of a tile (blockDim.x)
constexpr int kGroups = 4;          // thread groups (blockDim.y) that split the mask partials and the channels

// One source of the fusion (I or E) and where its blocks go in F: output channel offsets, -1 = absent.
template <typename T>
struct Source {
  const T* data;
  Strides s;
  int channels, plain, masked;
};

template <typename T>
struct PixelForwardArgs {
  PartialPlanes partial;  // float32 partial masks (hw floats a plane), or data null
  const T* mask_in;       // (B, hw) given mask, used when partial.data is null
  T* mask_out;       // (B, hw) or null
  Source<T> image, embed;
  T* fused;
  Strides fs;
  int hw, tiles;
  bool need_mask;
};

template <typename T, typename G>
struct PixelBackwardArgs {
  const T* grad_fused;
  Strides gfs;
  const T* mask;  // (B, hw)
  Source<T> image, embed;
  T* grad_image;
  Strides gis;
  T* grad_embed;
  Strides ges;
  G* grad_mask;  // (B, hw) or null
  int hw, tiles;
  bool need_mask;
};

// Shared scratch of a pixel block: one float per (group, pixel of the thread, pixel thread).
template <int V>
using GroupScratch = float[kGroups][V][kPixelThreads];

// Sums the kGroups partial vectors of this pixel thread in group order (deterministic); every group gets the
// total. Contains __syncthreads: call from all threads of the block.
template <int V>
__device__ __forceinline__ void sum_groups(const float (&partial)[V], GroupScratch<V>& scratch, float (&total)[V]) {
  const int x = threadIdx.x, y = threadIdx.y;
  __syncthreads();  // earlier readers of the scratch are done
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

// Where a thread works: batch element b, first pixel p (V pixels in the NCHW mapping, one otherwise).
struct Tile {
  int64_t b;
  int p;
  bool active;
};

template <int V>
__device__ __forceinline__ Tile tile_of_block(int tiles, int hw) {
  Tile t;
  t.b = blockIdx.x / tiles;
  const int tile = static_cast<int>(blockIdx.x - t.b * tiles);
  t.p = (tile * kPixelThreads + static_cast<int>(threadIdx.x)) * V;
  t.active = t.p < hw;  // V divides hw whenever V > 1
  return t;
}

// The mask at this thread's V pixels: group y sums the batch element's partial planes y, y + kGroups, ... (or
// group 0 reads the given mask), then the groups' sums are added in group order.
template <typename T, int V>
__device__ __forceinline__ void load_mask(const PartialPlanes& partial, const T* mask_in, int hw, const Tile& t,
                                          GroupScratch<V>& scratch, float (&m)[V]) {
  float mine[V];
#pragma unroll
  for (int j = 0; j < V; ++j) mine[j] = 0.f;
  if (t.active) {
    if (partial.data != nullptr) {
      const PlaneRange planes = plane_range(partial, t.b);
      for (int r = threadIdx.y; r < planes.count; r += kGroups) {
        float v[V];
        load_n<false, V>(partial.data + planes.plane(r) * hw + t.p, 1, v);
#pragma unroll
        for (int j = 0; j < V; ++j) mine[j] += v[j];
      }
    } else if (threadIdx.y == 0) {
      load_n<false, V>(mask_in + t.b * hw + t.p, 1, mine);
    }
  }
  sum_groups<V>(mine, scratch, m);
}

// Group y's channels c = y*NC, (y + kGroups)*NC, ... of one source, NC per access (NCHW mapping: NC = 1 and
// V pixels per access along the pixels; channels_last mapping: V = 1 and NC channels along the channels).
template <typename T, int V, int NC>
__device__ __forceinline__ void forward_source(const Source<T>& src, const Tile& t, T* fused, const Strides& fs,
                                               const float (&m)[V]) {
  constexpr int N = V * NC;
  const T* in = src.data + t.b * src.s.batch + static_cast<int64_t>(t.p) * src.s.pixel;
  T* out = fused + t.b * fs.batch + static_cast<int64_t>(t.p) * fs.pixel;
  const int64_t in_step = V > 1 ? src.s.pixel : src.s.channel;
  const int64_t out_step = V > 1 ? fs.pixel : fs.channel;
  for (int c = threadIdx.y * NC; c < src.channels; c += kGroups * NC) {
    float x[N];
    load_n<true, N>(in + c * src.s.channel, in_step, x);
    if (src.plain >= 0) store_n<true, N>(out + (src.plain + c) * fs.channel, out_step, x);
    if (src.masked >= 0) {
#pragma unroll
      for (int j = 0; j < N; ++j) x[j] *= m[V > 1 ? j : 0];
      store_n<true, N>(out + (src.masked + c) * fs.channel, out_step, x);
    }
  }
}

template <typename T, int V, int VC>
__global__ void __launch_bounds__(kPixelThreads * kGroups) pixels_forward(PixelForwardArgs<T> a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // a programmatic dependent launch (set_programmatic_launch) may start before the per-map kernel is done: wait
  // for it (and its memory) here; returns at once otherwise
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
  __shared__ GroupScratch<V> scratch;
  const Tile t = tile_of_block<V>(a.tiles, a.hw);
  float m[V];
#pragma unroll
  for (int j = 0; j < V; ++j) m[j] = 0.f;
  if (a.need_mask) {  // uniform over the block, so the barriers inside are safe
    load_mask<T, V>(a.partial, a.mask_in, a.hw, t, scratch, m);
    if (a.mask_out != nullptr && threadIdx.y == 0 && t.active) store_n<false, V>(a.mask_out + t.b * a.hw + t.p, 1, m);
  }
  if (!t.active || a.fused == nullptr) return;  // no barrier below
  forward_source<T, V, 1>(a.image, t, a.fused, a.fs, m);  // Ci is small (1 or 3): one channel per access
  forward_source<T, V, VC>(a.embed, t, a.fused, a.fs, m);
}

// Group y's channels of one source: g_src = gF_plain + gF_masked * M (zero when F has no block of this
// source) written to grad_src, and gm += gF_masked * src.
template <typename T, int V, int NC>
__device__ __forceinline__ void backward_source(const Source<T>& src, const Tile& t, const T* grad_fused,
                                                const Strides& gfs, T* grad_src, const Strides& gss,
                                                const float (&m)[V], float (&gm)[V]) {
  constexpr int N = V * NC;
  const T* in = src.data + t.b * src.s.batch + static_cast<int64_t>(t.p) * src.s.pixel;
  const T* gf = grad_fused + t.b * gfs.batch + static_cast<int64_t>(t.p) * gfs.pixel;
  T* out = grad_src + t.b * gss.batch + static_cast<int64_t>(t.p) * gss.pixel;
  const int64_t in_step = V > 1 ? src.s.pixel : src.s.channel;
  const int64_t gf_step = V > 1 ? gfs.pixel : gfs.channel;
  const int64_t out_step = V > 1 ? gss.pixel : gss.channel;
  for (int c = threadIdx.y * NC; c < src.channels; c += kGroups * NC) {
    float acc[N];
#pragma unroll
    for (int j = 0; j < N; ++j) acc[j] = 0.f;
    if (src.plain >= 0) {
      float g[N];
      load_n<true, N>(gf + (src.plain + c) * gfs.channel, gf_step, g);
#pragma unroll
      for (int j = 0; j < N; ++j) acc[j] += g[j];
    }
    if (src.masked >= 0) {
      float g[N], x[N];
      load_n<true, N>(gf + (src.masked + c) * gfs.channel, gf_step, g);
      load_n<true, N>(in + c * src.s.channel, in_step, x);
#pragma unroll
      for (int j = 0; j < N; ++j) {
        acc[j] += g[j] * m[V > 1 ? j : 0];
        gm[V > 1 ? j : 0] += g[j] * x[j];
      }
    }
    store_n<true, N>(out + c * gss.channel, out_step, acc);
  }
}

template <typename T, typename G, int V, int VC>
__global__ void __launch_bounds__(kPixelThreads * kGroups) pixels_backward(PixelBackwardArgs<T, G> a) {
  __shared__ GroupScratch<V> scratch;
  const Tile t = tile_of_block<V>(a.tiles, a.hw);
  float m[V], gm[V];
#pragma unroll
  for (int j = 0; j < V; ++j) m[j] = gm[j] = 0.f;
  if (a.need_mask) load_mask<T, V>(PartialPlanes{}, a.mask, a.hw, t, scratch, m);
  if (t.active) {
    backward_source<T, V, 1>(a.image, t, a.grad_fused, a.gfs, a.grad_image, a.gis, m, gm);
    backward_source<T, V, VC>(a.embed, t, a.grad_fused, a.gfs, a.grad_embed, a.ges, m, gm);
  }
  if (a.grad_mask != nullptr) {  // uniform over the block
    float total[V];
    sum_groups<V>(gm, scratch, total);
    if (threadIdx.y == 0 && t.active) store_n<false, V>(a.grad_mask + t.b * a.hw + t.p, 1, total);
  }
}

// Can a tensor be accessed with n-element vectors along `axis_stride` == 1? (Other layouts take scalar
// accesses inside load_n / store_n and need nothing.)
bool vec_fits(const void* p, size_t elem, const Strides& s, bool along_pixels, int n) {
  if (p == nullptr || n == 1) return true;
  const int64_t axis = along_pixels ? s.pixel : s.channel;
  if (axis != 1) return true;
  const int64_t other = along_pixels ? s.channel : s.pixel;
  return aligned(p, n * elem) && s.batch % n == 0 && other % n == 0;
}

// Pixels per thread in the NCHW mapping: the widest (16 bytes) whose accesses are aligned, fewer while the
// grid would not give every multiprocessor a block.
template <typename T>
int pixels_per_thread(int64_t batch, int hw, const DeviceInfo& dev, bool (*fits)(int, const void*), const void* ctx) {
  int v = vec_width(sizeof(T));
  while (v > 1 && (hw % v != 0 || !fits(v, ctx))) v /= 2;
  while (v > 1 && batch * ceil_div(hw, static_cast<int64_t>(kPixelThreads) * v) < dev.sm_count) v /= 2;
  return v;
}

// Channels per access of the embedding in the channels_last mapping: the widest (16 bytes) that divides C
// and the embedding blocks' channel offsets in F, with aligned accesses.
template <typename T>
int channels_per_access(int channels, int plain, int masked, bool (*fits)(int, const void*), const void* ctx) {
  int v = vec_width(sizeof(T));
  while (v > 1 && (channels % v != 0 || (plain > 0 && plain % v != 0) || (masked > 0 && masked % v != 0) ||
                   !fits(v, ctx)))
    v /= 2;
  return v;
}

template <typename T, int V, int VC, typename Args>
cudaError_t launch_forward(Args a, int64_t batch, cudaStream_t stream) {
  a.tiles = static_cast<int>(ceil_div(a.hw, static_cast<int64_t>(kPixelThreads) * V));
  const int64_t blocks = batch * a.tiles;
  if (blocks > INT_MAX) return cudaErrorInvalidValue;
#ifndef DECAFA_EMULATION
  if (programmatic_launch()) {
    DeviceInfo dev;
    if (device_info(&dev) == cudaSuccess && dev.cc_major >= 9) {
      cudaLaunchAttribute attr[1];
      attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
      attr[0].val.programmaticStreamSerializationAllowed = 1;
      cudaLaunchConfig_t config{};
      config.gridDim = dim3(static_cast<unsigned>(blocks));
      config.blockDim = dim3(kPixelThreads, kGroups);
      config.dynamicSmemBytes = 0;
      config.stream = stream;
      config.attrs = attr;
      config.numAttrs = 1;
      return cudaLaunchKernelEx(&config, pixels_forward<T, V, VC>, a);
    }
  }
#endif
  // (the emulation runs every launch in order: the programmatic one is this one there)
  pixels_forward<T, V, VC><<<static_cast<unsigned>(blocks), dim3(kPixelThreads, kGroups), 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T, typename G, int V, int VC, typename Args>
cudaError_t launch_backward(Args a, int64_t batch, cudaStream_t stream) {
  a.tiles = static_cast<int>(ceil_div(a.hw, static_cast<int64_t>(kPixelThreads) * V));
  const int64_t blocks = batch * a.tiles;
  if (blocks > INT_MAX) return cudaErrorInvalidValue;
  pixels_backward<T, G, V, VC><<<static_cast<unsigned>(blocks), dim3(kPixelThreads, kGroups), 0, stream>>>(a);
  return cudaGetLastError();
}

// Dispatches the run-time (mapping, width) to the kernel instantiations: NCHW with V in {1, 2, 4, 8} or
// channels_last with VC in {1, 2, 4, 8} (each up to 16 bytes).
template <typename T, typename Launch>
cudaError_t by_width(bool channels_last, int width, Launch launch) {
  constexpr int kMax = vec_width(sizeof(T));
  if (channels_last) {
    if (width >= 8 && kMax >= 8) return launch(std::integral_constant<int, 1>{}, std::integral_constant<int, (kMax >= 8 ? 8 : 1)>{});
    if (width >= 4) return launch(std::integral_constant<int, 1>{}, std::integral_constant<int, 4>{});
    if (width >= 2) return launch(std::integral_constant<int, 1>{}, std::integral_constant<int, 2>{});
    return launch(std::integral_constant<int, 1>{}, std::integral_constant<int, 1>{});
  }
  if (width >= 8 && kMax >= 8) return launch(std::integral_constant<int, (kMax >= 8 ? 8 : 1)>{}, std::integral_constant<int, 1>{});
  if (width >= 4) return launch(std::integral_constant<int, 4>{}, std::integral_constant<int, 1>{});
  if (width >= 2) return launch(std::integral_constant<int, 2>{}, std::integral_constant<int, 1>{});
  return launch(std::integral_constant<int, 1>{}, std::integral_constant<int, 1>{});
}

template <typename T>
Source<T> source(const void* data, Strides s, int channels, int plain, int masked) {
  return {static_cast<const T*>(data), s, channels, plain, masked};
}

// The embedding decides the mapping: channels_last when its channels are adjacent and its pixels are not.
bool channels_last_mapping(const FusionInputs& f) {
  return f.embedding_strides.channel == 1 && f.embedding_strides.pixel != 1;
}

template <typename T>
cudaError_t pixels_forward_t(MapShape shape, const PartialPlanes& partial, const T* mask_in, T* mask_out,
                             const FusionInputs* f, T* fused, Strides fs, cudaStream_t stream) {
  const int64_t hw = static_cast<int64_t>(shape.height) * shape.width;
  if (hw > INT_MAX / 2) return cudaErrorInvalidValue;
  const FusionLayout lay = f != nullptr ? fusion_layout(f->mode, f->image_channels, f->embedding_channels)
                                        : fusion_layout(0, 0, 0);
  if (lay.channels < 0 || (f != nullptr && fused == nullptr)) return cudaErrorInvalidValue;
  DeviceInfo dev;
  cudaError_t err = device_info(&dev);
  if (err != cudaSuccess) return err;
  PixelForwardArgs<T> a{};
  a.partial = partial;
  a.mask_in = mask_in;
  a.mask_out = mask_out;
  if (f != nullptr) {
    a.image = source<T>(f->image, f->image_strides, f->image_channels, lay.image, lay.image_mask);
    a.embed = source<T>(f->embedding, f->embedding_strides, f->embedding_channels, lay.embedding, lay.embedding_mask);
  }
  a.fused = f != nullptr ? fused : nullptr;
  a.fs = fs;
  a.hw = static_cast<int>(hw);
  a.need_mask = mask_out != nullptr || lay.image_mask >= 0 || lay.embedding_mask >= 0;
  if (a.need_mask && partial.data == nullptr && mask_in == nullptr) return cudaErrorInvalidValue;
  const bool cl = f != nullptr && channels_last_mapping(*f);
  struct Ctx {
    const PixelForwardArgs<T>* a;
    bool cl;
  } ctx{&a, cl};
  auto fits = [](int n, const void* c) {
    const Ctx& x = *static_cast<const Ctx*>(c);
    const PixelForwardArgs<T>& a = *x.a;
    const size_t e = sizeof(T);
    const bool dense_ok = x.cl || (aligned(a.partial.data, 16) && aligned(a.mask_in, 16) && aligned(a.mask_out, 16));
    const bool image_ok = x.cl || vec_fits(a.image.data, e, a.image.s, true, n);
    return dense_ok && image_ok && vec_fits(a.embed.data, e, a.embed.s, !x.cl, n) &&
           vec_fits(a.fused, e, a.fs, !x.cl, n);
  };
  const int width = cl ? channels_per_access<T>(a.embed.channels, a.embed.plain, a.embed.masked, fits, &ctx)
                       : pixels_per_thread<T>(shape.batch, a.hw, dev, fits, &ctx);
  return by_width<T>(cl, width, [&](auto v, auto vc) {
    return launch_forward<T, decltype(v)::value, decltype(vc)::value>(a, shape.batch, stream);
  });
}

template <typename T, typename G>
cudaError_t pixels_backward_t(MapShape shape, const T* grad_fused, Strides gfs, const T* mask, const FusionInputs& f,
                              T* grad_image, Strides gis, T* grad_embed, Strides ges, G* grad_mask,
                              cudaStream_t stream) {
  const int64_t hw = static_cast<int64_t>(shape.height) * shape.width;
  if (hw > INT_MAX / 2) return cudaErrorInvalidValue;
  const FusionLayout lay = fusion_layout(f.mode, f.image_channels, f.embedding_channels);
  if (lay.channels <= 0 || grad_fused == nullptr) return cudaErrorInvalidValue;
  DeviceInfo dev;
  cudaError_t err = device_info(&dev);
  if (err != cudaSuccess) return err;
  PixelBackwardArgs<T, G> a{};
  a.grad_fused = grad_fused;
  a.gfs = gfs;
  a.mask = mask;
  a.image = source<T>(f.image, f.image_strides, f.image_channels, lay.image, lay.image_mask);
  a.embed = source<T>(f.embedding, f.embedding_strides, f.embedding_channels, lay.embedding, lay.embedding_mask);
  a.grad_image = grad_image;
  a.gis = gis;
  a.grad_embed = grad_embed;
  a.ges = ges;
  a.grad_mask = grad_mask;
  a.hw = static_cast<int>(hw);
  a.need_mask = lay.image_mask >= 0 || lay.embedding_mask >= 0;
  if (a.need_mask && mask == nullptr) return cudaErrorInvalidValue;
  const bool cl = channels_last_mapping(f);
  struct Ctx {
    const PixelBackwardArgs<T, G>* a;
    bool cl;
  } ctx{&a, cl};
  auto fits = [](int n, const void* c) {
    const Ctx& x = *static_cast<const Ctx*>(c);
    const PixelBackwardArgs<T, G>& a = *x.a;
    const size_t e = sizeof(T);
    const bool dense_ok = x.cl || (aligned(a.mask, 16) && aligned(a.grad_mask, 16));
    const bool image_ok = x.cl || (vec_fits(a.image.data, e, a.image.s, true, n) &&
                                   vec_fits(a.grad_image, e, a.gis, true, n));
    return dense_ok && image_ok && vec_fits(a.embed.data, e, a.embed.s, !x.cl, n) &&
           vec_fits(a.grad_fused, e, a.gfs, !x.cl, n) && vec_fits(a.grad_embed, e, a.ges, !x.cl, n);
  };
  const int width = cl ? channels_per_access<T>(a.embed.channels, a.embed.plain, a.embed.masked, fits, &ctx)
                       : pixels_per_thread<T>(shape.batch, a.hw, dev, fits, &ctx);
  return by_width<T>(cl, width, [&](auto v, auto vc) {
    return launch_backward<T, G, decltype(v)::value, decltype(vc)::value>(a, shape.batch, stream);
  });
}

}  // namespace

cudaError_t pixels_forward(DType dtype, MapShape shape, const PartialPlanes& partial, const void* mask_in,
                           void* mask_out, const FusionInputs* fusion, void* fused, Strides fused_strides,
                           cudaStream_t stream) {
  if (shape.batch == 0 || shape.height == 0 || shape.width == 0) return cudaSuccess;
  DECAFA_DISPATCH(dtype, return pixels_forward_t<scalar_t>(
                             shape, partial, static_cast<const scalar_t*>(mask_in),
                             static_cast<scalar_t*>(mask_out), fusion, static_cast<scalar_t*>(fused), fused_strides,
                             stream));
  return cudaSuccess;
}

}  // namespace detail

cudaError_t fuse_forward(DType dtype, MapShape shape, const void* mask, const FusionInputs& fusion, void* fused,
                         Strides fused_strides, cudaStream_t stream) {
  if (shape.batch == 0 || shape.height == 0 || shape.width == 0) return cudaSuccess;  // (empty: no pointers)
  if (mask == nullptr) return cudaErrorInvalidValue;
  return detail::pixels_forward(dtype, shape, detail::PartialPlanes{}, mask, nullptr, &fusion, fused, fused_strides,
                                stream);
}

cudaError_t fuse_backward(DType dtype, MapShape shape, const void* grad_fused, Strides grad_fused_strides,
                          const void* mask, const FusionInputs& fusion, void* grad_image, Strides grad_image_strides,
                          void* grad_embedding, Strides grad_embedding_strides, void* grad_mask,
                          bool grad_mask_float32, cudaStream_t stream) {
  if (shape.batch == 0 || shape.height == 0 || shape.width == 0) return cudaSuccess;
  DECAFA_DISPATCH(
      dtype,
      if (grad_mask_float32) {
        return detail::pixels_backward_t<scalar_t, float>(
            shape, static_cast<const scalar_t*>(grad_fused), grad_fused_strides, static_cast<const scalar_t*>(mask),
            fusion, static_cast<scalar_t*>(grad_image), grad_image_strides, static_cast<scalar_t*>(grad_embedding),
            grad_embedding_strides, static_cast<float*>(grad_mask), stream);
      } return detail::pixels_backward_t<scalar_t, scalar_t>(
          shape, static_cast<const scalar_t*>(grad_fused), grad_fused_strides, static_cast<const scalar_t*>(mask),
          fusion, static_cast<scalar_t*>(grad_image), grad_image_strides, static_cast<scalar_t*>(grad_embedding),
          grad_embedding_strides, static_cast<scalar_t*>(grad_mask), stream));
  return cudaSuccess;
}

}  // namespace decafa_kernels
