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
// FULL (the launcher's choice): H*W is a multiple of the tile, so no thread of the grid is past the pixels and
// the kernels carry no bounds test. The forward may split the channels across CTAs (grid.y channel groups) where
// the pixel tiles alone do not give every multiprocessor a CTA (small batches), rather than narrowing the
// accesses; pixels_mask then sums the partial masks once (below).
#include <atomic>
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
// Channels a thread loads before it stores any of them (Little's law: more bytes in flight per thread). The
// backward loads up to three vectors a channel (grad F plain, grad F masked, the source): two channels where a
// vector holds at most 4 values; with 8 (16-bit types, 16 bytes) two channels took ~148 registers on sm_90
// (one CTA of 256 threads an SM, against three with one channel: fewer bytes in flight per SM, not more).
constexpr int kForwardUnroll = 4;
template <int N>
constexpr int kBackwardUnroll = N >= 8 ? 1 : 2;
constexpr int kPlaneUnroll = 4;  // partial-mask planes a thread loads before it adds them (in their order)

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
  T* mask_out;       // (B, hw) or null; pixels_forward: written by the CTAs of channel group 0
  float* reduced_out;  // pixels_mask: the float32 sum written over the batch element's first plane, or null
  Source<T> image, embed;
  T* fused;
  Strides fs;
  int hw, tiles;
  bool need_mask;
  bool reduced;  // pixels_forward: the mask is the first plane alone (pixels_mask summed the planes into it)
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

template <int V, bool FULL>
__device__ __forceinline__ Tile tile_of_block(int tiles, int hw) {
  Tile t;
  t.b = blockIdx.x / tiles;
  const int tile = static_cast<int>(blockIdx.x - t.b * tiles);
  t.p = (tile * kPixelThreads + static_cast<int>(threadIdx.x)) * V;
  t.active = FULL || t.p < hw;  // V divides hw whenever V > 1
  return t;
}

// The mask at this thread's V pixels: group y sums the batch element's partial planes y, y + kGroups, ... in
// that order (kPlaneUnroll loads in flight before the adds), or group 0 reads the given mask or the planes' sum
// (`reduced`: pixels_mask wrote it, with this code, over the first plane); then the groups' sums are added in
// group order. So a pixel's M is the same float whichever kernel, tile or V computes it.
template <typename T, int V>
__device__ __forceinline__ void load_mask(const PartialPlanes& partial, const T* mask_in, bool reduced, int hw,
                                          const Tile& t, GroupScratch<V>& scratch, float (&m)[V]) {
  float mine[V];
#pragma unroll
  for (int j = 0; j < V; ++j) mine[j] = 0.f;
  if (t.active) {
    if (partial.data != nullptr && reduced) {
      if (threadIdx.y == 0) load_n<false, V>(partial.data + plane_range(partial, t.b).plane(0) * hw + t.p, 1, mine);
    } else if (partial.data != nullptr) {
      const PlaneRange planes = plane_range(partial, t.b);
      int r = threadIdx.y;
      for (; r + (kPlaneUnroll - 1) * kGroups < planes.count; r += kPlaneUnroll * kGroups) {
        float v[kPlaneUnroll][V];
#pragma unroll
        for (int u = 0; u < kPlaneUnroll; ++u)
          load_n<false, V>(partial.data + planes.plane(r + u * kGroups) * hw + t.p, 1, v[u]);
#pragma unroll
        for (int u = 0; u < kPlaneUnroll; ++u)
#pragma unroll
          for (int j = 0; j < V; ++j) mine[j] += v[u][j];
      }
      for (; r < planes.count; r += kGroups) {
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

// A thread's channels of one source, NC per access (NCHW mapping: NC = 1 and V pixels per access along the
// pixels; channels_last mapping: V = 1 and NC channels along the channels): the chunks k (channels k*NC ..)
// with (k + rotate) % slots == slot, where slot = this thread's group over the grid's channel groups
// (blockIdx.y * kGroups + threadIdx.y of gridDim.y * kGroups slots); `rotate` starts the embedding's chunks
// after the image's. kForwardUnroll chunks are loaded before any is stored.
template <typename T, int V, int NC>
__device__ __forceinline__ void forward_source(const Source<T>& src, const Tile& t, T* fused, const Strides& fs,
                                               const float (&m)[V], int slot, int slots, int rotate) {
  constexpr int N = V * NC, U = kForwardUnroll;
  const T* in = src.data + t.b * src.s.batch + static_cast<int64_t>(t.p) * src.s.pixel;
  T* out = fused + t.b * fs.batch + static_cast<int64_t>(t.p) * fs.pixel;
  const int64_t in_step = V > 1 ? src.s.pixel : src.s.channel;
  const int64_t out_step = V > 1 ? fs.pixel : fs.channel;
  const int step = slots * NC;  // channels from one of the thread's chunks to the next
  // U chunks from channel c: all loads, then the stores; `some`: only those below src.channels (the last, partial
  // step: its loads still go out together, so a thread with fewer than U chunks keeps them all in flight)
  auto chunks = [&](int c, bool some) {
    float x[U][N];
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (!some || c + u * step < src.channels)
        load_n<true, N>(in + static_cast<int64_t>(c + u * step) * src.s.channel, in_step, x[u]);
    if (src.plain >= 0) {
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (!some || c + u * step < src.channels)
          store_n<true, N>(out + static_cast<int64_t>(src.plain + c + u * step) * fs.channel, out_step, x[u]);
    }
    if (src.masked >= 0) {
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (!some || c + u * step < src.channels) {
#pragma unroll
          for (int j = 0; j < N; ++j) x[u][j] *= m[V > 1 ? j : 0];
          store_n<true, N>(out + static_cast<int64_t>(src.masked + c + u * step) * fs.channel, out_step, x[u]);
        }
    }
  };
  int c = ((slot - rotate) % slots + slots) % slots * NC;
  for (; c + (U - 1) * step < src.channels; c += U * step) chunks(c, false);
  if (c < src.channels) chunks(c, true);
}

// The griddepcontrol.wait of a programmatic dependent launch (set_programmatic_launch): such a launch may start
// before the kernel it depends on is done; wait for it (and its memory) before reading its outputs. Returns at
// once otherwise.
__device__ __forceinline__ void wait_for_primary() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// The mask alone: M from the partial masks (no fusion: landmark_attention), or their sum once before a
// channel-split pixels_forward, written as float32 over the batch element's first plane (reduced_out) for it.
// In place is safe: group 0 of this block is the only reader of those pixels of that plane, and it has read
// them before the barrier in sum_groups.
template <typename T, int V, bool FULL>
__global__ void __launch_bounds__(kPixelThreads * kGroups, 1) pixels_mask(PixelForwardArgs<T> a) {
  wait_for_primary();
  __shared__ GroupScratch<V> scratch;
  const Tile t = tile_of_block<V, FULL>(a.tiles, a.hw);
  float m[V];
  load_mask<T, V>(a.partial, a.mask_in, false, a.hw, t, scratch, m);
  if (threadIdx.y != 0 || !t.active) return;
  if (a.mask_out != nullptr) store_n<false, V>(a.mask_out + t.b * a.hw + t.p, 1, m);
  if (a.reduced_out != nullptr)
    store_n<false, V>(a.reduced_out + plane_range(a.partial, t.b).plane(0) * a.hw + t.p, 1, m);
}

// M (when needed) and F for one pixel tile and one channel group (blockIdx.y) of every source.
template <typename T, int V, int VC, bool FULL>
__global__ void __launch_bounds__(kPixelThreads * kGroups, 1) pixels_forward(PixelForwardArgs<T> a) {
  wait_for_primary();
  __shared__ GroupScratch<V> scratch;
  const Tile t = tile_of_block<V, FULL>(a.tiles, a.hw);
  float m[V];
#pragma unroll
  for (int j = 0; j < V; ++j) m[j] = 0.f;
  if (a.need_mask) {  // uniform over the block, so the barriers inside are safe
    load_mask<T, V>(a.partial, a.mask_in, a.reduced, a.hw, t, scratch, m);
    if (a.mask_out != nullptr && blockIdx.y == 0 && threadIdx.y == 0 && t.active)
      store_n<false, V>(a.mask_out + t.b * a.hw + t.p, 1, m);
  }
  if (!t.active) return;  // no barrier below
  const int slot = static_cast<int>(blockIdx.y) * kGroups + static_cast<int>(threadIdx.y);
  const int slots = static_cast<int>(gridDim.y) * kGroups;
  forward_source<T, V, 1>(a.image, t, a.fused, a.fs, m, slot, slots, 0);  // Ci is small (1 or 3): 1 per access
  forward_source<T, V, VC>(a.embed, t, a.fused, a.fs, m, slot, slots, a.image.channels % slots);
}

// Group y's channels of one source: g_src = gF_plain + gF_masked * M (zero when F has no block of this
// source) written to grad_src, and gm += gF_masked * src (channel by channel in increasing order);
// kBackwardUnroll channels loaded before any is stored.
template <typename T, int V, int NC>
__device__ __forceinline__ void backward_source(const Source<T>& src, const Tile& t, const T* grad_fused,
                                                const Strides& gfs, T* grad_src, const Strides& gss,
                                                const float (&m)[V], float (&gm)[V]) {
  constexpr int N = V * NC, U = kBackwardUnroll<N>;
  const T* in = src.data + t.b * src.s.batch + static_cast<int64_t>(t.p) * src.s.pixel;
  const T* gf = grad_fused + t.b * gfs.batch + static_cast<int64_t>(t.p) * gfs.pixel;
  T* out = grad_src + t.b * gss.batch + static_cast<int64_t>(t.p) * gss.pixel;
  const int64_t in_step = V > 1 ? src.s.pixel : src.s.channel;
  const int64_t gf_step = V > 1 ? gfs.pixel : gfs.channel;
  const int64_t out_step = V > 1 ? gss.pixel : gss.channel;
  constexpr int step = kGroups * NC;
  // one chunk of U (or 1, the tail) channels: loads, then the sums, then the stores
  auto chunk = [&](auto count, int c) {
    constexpr int K = decltype(count)::value;
    float acc[K][N], g[K][N], gmk[K][N], x[K][N];
#pragma unroll
    for (int u = 0; u < K; ++u) {
      const int64_t cu = c + u * step;
      if (src.plain >= 0) load_n<true, N>(gf + (src.plain + cu) * gfs.channel, gf_step, g[u]);
      if (src.masked >= 0) {
        load_n<true, N>(gf + (src.masked + cu) * gfs.channel, gf_step, gmk[u]);
        load_n<true, N>(in + cu * src.s.channel, in_step, x[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < K; ++u) {
#pragma unroll
      for (int j = 0; j < N; ++j) acc[u][j] = 0.f;
      if (src.plain >= 0) {
#pragma unroll
        for (int j = 0; j < N; ++j) acc[u][j] += g[u][j];
      }
      if (src.masked >= 0) {
#pragma unroll
        for (int j = 0; j < N; ++j) {
          acc[u][j] += gmk[u][j] * m[V > 1 ? j : 0];
          gm[V > 1 ? j : 0] += gmk[u][j] * x[u][j];
        }
      }
    }
#pragma unroll
    for (int u = 0; u < K; ++u) store_n<true, N>(out + (c + u * step) * gss.channel, out_step, acc[u]);
  };
  int c = static_cast<int>(threadIdx.y) * NC;
  for (; c + (U - 1) * step < src.channels; c += U * step) chunk(std::integral_constant<int, U>{}, c);
  for (; c < src.channels; c += step) chunk(std::integral_constant<int, 1>{}, c);
}

// Three CTAs an SM where a thread handles one channel at a time (16-byte vectors of 8 values): at most 85
// registers, which the one-channel loop fits (80) without spills; the two-channel loop takes ~100 (two CTAs).
template <typename T, typename G, int V, int VC, bool FULL>
__global__ void __launch_bounds__(kPixelThreads * kGroups, (V * VC >= 8 ? 3 : 1)) pixels_backward(PixelBackwardArgs<T, G> a) {
  __shared__ GroupScratch<V> scratch;
  const Tile t = tile_of_block<V, FULL>(a.tiles, a.hw);
  float m[V], gm[V];
#pragma unroll
  for (int j = 0; j < V; ++j) m[j] = gm[j] = 0.f;
  if (a.need_mask) load_mask<T, V>(PartialPlanes{}, a.mask, false, a.hw, t, scratch, m);
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

// Pixels per thread in the NCHW mapping: the widest (16 bytes) whose accesses are aligned; with `narrow`, fewer
// while the grid would not give every multiprocessor a block (pixels_mask and pixels_backward, which do not split
// the channels across CTAs).
template <typename T>
int pixels_per_thread(int64_t batch, int hw, const DeviceInfo& dev, bool narrow, bool (*fits)(int, const void*),
                      const void* ctx) {
  int v = vec_width(sizeof(T));
  while (v > 1 && (hw % v != 0 || !fits(v, ctx))) v /= 2;
  while (narrow && v > 1 && batch * ceil_div(hw, static_cast<int64_t>(kPixelThreads) * v) < dev.sm_count) v /= 2;
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

std::atomic<int> forced_groups{0};  // set_pixel_split

// Channel groups (grid.y) of pixels_forward: 1 where the pixel tiles give every multiprocessor a CTA; else
// doubled until they do, while every group's kGroups threads still get a chunk of channels (`chunks`: the
// image's channels and the embedding's accesses). set_pixel_split(n) forces n.
int channel_groups(int64_t blocks, int chunks, const DeviceInfo& dev) {
  const int forced = forced_groups.load(std::memory_order_relaxed);
  if (forced > 0) return forced < 65535 ? forced : 65535;
  int s = 1;
  while (blocks * s < dev.sm_count && 2 * s * kGroups <= chunks) s *= 2;
  return s;
}

// The launch as a programmatic dependent (set_programmatic_launch, sm_90 and later): true when it was made
// (its status in *err); false: the caller makes the ordinary launch (the emulation always: it runs every
// launch in order).
template <typename Kernel, typename Args>
bool launch_programmatic(Kernel kernel, dim3 grid, const Args& a, cudaStream_t stream, cudaError_t* err) {
#ifndef DECAFA_EMULATION
  if (programmatic_launch()) {
    DeviceInfo dev;
    if (device_info(&dev) == cudaSuccess && dev.cc_major >= 9) {
      cudaLaunchAttribute attr[1];
      attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
      attr[0].val.programmaticStreamSerializationAllowed = 1;
      cudaLaunchConfig_t config{};
      config.gridDim = grid;
      config.blockDim = dim3(kPixelThreads, kGroups);
      config.dynamicSmemBytes = 0;
      config.stream = stream;
      config.attrs = attr;
      config.numAttrs = 1;
      *err = cudaLaunchKernelEx(&config, kernel, a);
      return true;
    }
  }
#else
  (void)kernel, (void)grid, (void)a, (void)stream, (void)err;
#endif
  return false;
}

template <typename T, int V, int VC, bool FULL>
cudaError_t launch_forward(const PixelForwardArgs<T>& a, dim3 grid, cudaStream_t stream) {
  cudaError_t err;
  if (launch_programmatic(pixels_forward<T, V, VC, FULL>, grid, a, stream, &err)) return err;
  pixels_forward<T, V, VC, FULL><<<grid, dim3(kPixelThreads, kGroups), 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T, int V, bool FULL>
cudaError_t launch_mask(const PixelForwardArgs<T>& a, dim3 grid, cudaStream_t stream) {
  cudaError_t err;
  if (launch_programmatic(pixels_mask<T, V, FULL>, grid, a, stream, &err)) return err;
  pixels_mask<T, V, FULL><<<grid, dim3(kPixelThreads, kGroups), 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T, typename G, int V, int VC, bool FULL>
cudaError_t launch_backward(const PixelBackwardArgs<T, G>& a, unsigned blocks, cudaStream_t stream) {
  pixels_backward<T, G, V, VC, FULL><<<blocks, dim3(kPixelThreads, kGroups), 0, stream>>>(a);
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

// Pixel tiles of V pixels a thread per batch element, and whether they are all full.
struct Tiling {
  int tiles;
  bool full;
  int64_t blocks;
};

inline Tiling tiling(int64_t batch, int hw, int v) {
  const int64_t tile = static_cast<int64_t>(kPixelThreads) * v;
  const int tiles = static_cast<int>(ceil_div(hw, tile));
  return {tiles, hw % tile == 0, batch * tiles};
}

// pixels_mask over NCHW tiles of `width` pixels a thread.
template <typename T>
cudaError_t run_mask(PixelForwardArgs<T> a, int64_t batch, int width, cudaStream_t stream) {
  return by_width<T>(false, width, [&](auto v, auto) {
    constexpr int V = decltype(v)::value;
    const Tiling tl = tiling(batch, a.hw, V);
    if (tl.blocks > INT_MAX) return cudaErrorInvalidValue;
    a.tiles = tl.tiles;
    const dim3 grid(static_cast<unsigned>(tl.blocks));
    return tl.full ? launch_mask<T, V, true>(a, grid, stream) : launch_mask<T, V, false>(a, grid, stream);
  });
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
  // pixels_mask's vectors: the planes, the given mask and M (16-byte aligned base pointers)
  auto mask_fits = [](int, const void* c) {
    const PixelForwardArgs<T>& a = *static_cast<const PixelForwardArgs<T>*>(c);
    return aligned(a.partial.data, 16) && aligned(a.mask_in, 16) && aligned(a.mask_out, 16);
  };
  if (f == nullptr) {  // the mask alone (landmark_attention): no channels to split, narrower vectors instead
    if (mask_out == nullptr) return cudaSuccess;
    return run_mask<T>(a, shape.batch, pixels_per_thread<T>(shape.batch, a.hw, dev, true, mask_fits, &a), stream);
  }
  const bool cl = channels_last_mapping(*f);
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
                       : pixels_per_thread<T>(shape.batch, a.hw, dev, false, fits, &ctx);
  return by_width<T>(cl, width, [&](auto v, auto vc) {
    constexpr int V = decltype(v)::value, VC = decltype(vc)::value;
    const Tiling tl = tiling(shape.batch, a.hw, V);
    if (tl.blocks > INT_MAX) return cudaErrorInvalidValue;
    a.tiles = tl.tiles;
    const int chunks = a.image.channels + static_cast<int>(ceil_div(a.embed.channels, VC));
    const int groups = channel_groups(tl.blocks, chunks, dev);
    // With channel groups, each CTA needs its tile's M. Re-reading the P planes in every group costs groups * P
    // planes; summing them once first (pixels_mask, float32 over the first plane of the head's workspace) costs
    // P + 1 + groups. The sum's order is the same either way (load_mask), so are the bits.
    if (groups > 1 && a.need_mask && partial.data != nullptr && partial.scratch) {
      const int64_t planes = plane_range(partial, 0).count;
      if (groups * planes > planes + 1 + groups) {
        PixelForwardArgs<T> r = a;
        r.fused = nullptr;
        r.reduced_out = const_cast<float*>(partial.data);  // the head's own workspace (partial.scratch)
        err = run_mask<T>(r, shape.batch, pixels_per_thread<T>(shape.batch, a.hw, dev, true, mask_fits, &a), stream);
        if (err != cudaSuccess) return err;
        a.mask_out = nullptr;  // written by pixels_mask
        a.reduced = true;
      }
    }
    const dim3 grid(static_cast<unsigned>(tl.blocks), static_cast<unsigned>(groups));
    return tl.full ? launch_forward<T, V, VC, true>(a, grid, stream) : launch_forward<T, V, VC, false>(a, grid, stream);
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
  // (the mask gradient sums over the channels: split across CTAs it would need a cross-CTA sum, so the
  // backward narrows its vectors at small batches instead)
  const int width = cl ? channels_per_access<T>(a.embed.channels, a.embed.plain, a.embed.masked, fits, &ctx)
                       : pixels_per_thread<T>(shape.batch, a.hw, dev, true, fits, &ctx);
  return by_width<T>(cl, width, [&](auto v, auto vc) {
    constexpr int V = decltype(v)::value, VC = decltype(vc)::value;
    const Tiling tl = tiling(shape.batch, a.hw, V);
    if (tl.blocks > INT_MAX) return cudaErrorInvalidValue;
    a.tiles = tl.tiles;
    const unsigned blocks = static_cast<unsigned>(tl.blocks);
    return tl.full ? launch_backward<T, G, V, VC, true>(a, blocks, stream)
                   : launch_backward<T, G, V, VC, false>(a, blocks, stream);
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

int set_pixel_split(int groups) {
  return groups < 0 ? detail::forced_groups.load() : detail::forced_groups.exchange(groups);
}

}  // namespace decafa_kernels
