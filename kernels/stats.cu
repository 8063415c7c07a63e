// Per-map kernels: one block per (b, run of consecutive maps of b), the maps of a run in turn.
//   maps_forward:  s = beta_eff T; max; sum exp(s - max) and the two coordinate moments; z; Phi when asked;
//                  and the run's partial mask sum_{l in run} Phi_l, written once at the end of the run.
//   maps_backward: Phi = exp(s - max) / sum from the saved stats; g_phi = g + grad_z . coord;
//                  S = sum Phi g_phi; g_s = Phi (g_phi - S); grad_T = beta_eff g_s; grad_beta = sum T g_s.
// On chip (H*W <= kOnChipPixels, 128 x 128): each thread keeps its pixels of the current map, of the run's
// partial mask and of the run's mask gradient in registers, so T is read from memory exactly once and the
// mask gradient once per run. Larger maps are streamed: the map is read twice (stats, then Phi) and the
// partial mask is accumulated in the workspace.
// channels_last T (maps adjacent in memory, L elements between pixels) is read on chip a pair of maps per
// access where the pointer and strides allow (MapPairs): map l is used from registers, map l + 1 waits in
// shared memory until its turn, so every map is still reduced alone, in the same order, with the same bits.
#include <atomic>
#include <climits>

#include "common.cuh"
#include "launch.cuh"

namespace decafa_kernels {
namespace detail {

namespace {
std::atomic<int> forced_runs{0};  // set_map_runs
}  // namespace

int map_runs(MapShape shape, const DeviceInfo& dev) {
  int64_t runs = ceil_div(2 * static_cast<int64_t>(dev.sm_count), shape.batch > 0 ? shape.batch : 1);
  if (const int n = forced_runs.load(std::memory_order_relaxed); n > 0) runs = n;
  if (runs > shape.maps) runs = shape.maps;
  if (runs < 1) runs = 1;
  // Equal runs of ceil(L / runs) maps: the last may be shorter, none empty.
  const int64_t per_run = ceil_div(shape.maps, runs);
  return static_cast<int>(ceil_div(shape.maps, per_run));
}

namespace {

// The maps of a block: batch element b, maps [first, last).
struct Run {
  int64_t b;
  int run, first, last;
};

__device__ __forceinline__ Run run_of_block(int runs, int per_run, int maps) {
  Run r;
  r.b = blockIdx.x / runs;
  r.run = static_cast<int>(blockIdx.x - r.b * runs);
  r.first = r.run * per_run;
  r.last = r.first + per_run < maps ? r.first + per_run : maps;
  return r;
}

template <typename T>
struct ForwardArgs {
  const T* logits;
  Strides ts;  // batch, map, pixel
  float beta;
  const float* beta_map;
  int maps, hw, width, runs, per_run;
  Coords co;
  float* stats;
  T* z;
  T* phi;
  float* partial;  // (B, runs, hw) or null
};

template <typename T>
__device__ __forceinline__ void write_map_outputs(const ForwardArgs<T>& a, int64_t map, float mx, float sum, float sx,
                                                  float sy) {
  store1(a.stats + 2 * map, mx);
  store1(a.stats + 2 * map + 1, sum);
  if (a.z != nullptr) {
    store1(a.z + 2 * map, a.co.ox + a.co.kx * (sx / sum));
    store1(a.z + 2 * map + 1, a.co.oy + a.co.ky * (sy / sum));
  }
}

// V logits of a map. The vector path (NCHW, pixel stride 1) touches them once: streaming loads. The scalar
// path serves channels_last maps, whose sectors the next maps of the run share (L elements apart, the run's
// next maps are the next elements): cached loads, so that those maps find them in L2.
template <int V, typename T>
__device__ __forceinline__ void load_logits(const T* p, int64_t pixel_stride, float (&out)[V]) {
  load_n<(V > 1), V>(p, pixel_stride, out);
}

// Pair loads of channels_last T (Pairs): at each pixel maps l and l + 1 are adjacent, so one 2-element access
// (8 bytes in float32, 4 in 16-bit types) fetches both. `l` even, the pointer aligned to 2 elements (the
// launcher checks base, batch and pixel strides). Map l is returned, map l + 1 goes to the thread's own slot
// of the shared-memory stash, from which the next map takes it (no barrier: only this thread touches it).
// Slot of the thread's value k: k * blockDim.x + threadIdx.x, so a warp's accesses hit distinct banks.
template <typename T>
__device__ __forceinline__ float load_pair(const T* p, T* slot) {
  const Vec<T, 2> v = load_one<false, 2>(p);
  *slot = v.v[1];
  return to_float(v.v[0]);
}

// The V logits at `q` of map l on chip: from the stash `slot` when map l came with map l - 1 (`stashed`), as
// the first of a pair (`pair`), or on their own.
template <bool Pairs, int V, typename T>
__device__ __forceinline__ void load_map_values(const T* q, int64_t pixel_stride, T* slot, bool pair, bool stashed,
                                                float (&out)[V]) {
  if constexpr (Pairs) {
    static_assert(V == 1, "pairs of maps are the channels_last (scalar pixel) path");
    if (stashed) {
      out[0] = to_float(*slot);
      return;
    }
    if (pair) {
      out[0] = load_pair(q, slot);
      return;
    }
  }
  load_logits<V>(q, pixel_stride, out);
}

// Whether map l of the run [l, last) starts a pair: an even map index (alignment) with a next map in the run.
template <bool Pairs>
__device__ __forceinline__ bool starts_pair(int l, int last) {
  return Pairs && (l & 1) == 0 && l + 1 < last;
}

// A per-map value loaded by thread 0 and handed to the block through shared memory: one load per block
// instead of one per thread. Two slots by map parity: a slot is rewritten only after every thread has
// passed the next map's barrier, so after its read. Call from all threads.
template <typename C, typename Load>
__device__ __forceinline__ C broadcast(C (&slots)[2], int l, Load load) {
  if (threadIdx.x == 0) slots[l & 1] = load();
  __syncthreads();
  return slots[l & 1];
}

// The logits of map l of the run's image (forward and backward arguments alike).
template <typename Args>
__device__ __forceinline__ auto map_logits(const Args& a, const Run& r, int l) {
  return a.logits + r.b * a.ts.batch + l * a.ts.channel;
}

// The forward's beta of map `map` (l in its image): the scalar, or beta_map[map] through `slots`.
template <typename T>
__device__ __forceinline__ float forward_beta(const ForwardArgs<T>& a, int64_t map, int l, float (&slots)[2]) {
  return a.beta_map == nullptr ? a.beta : broadcast(slots, l, [&] { return load1(a.beta_map + map); });
}

// Vector k (of K) of this thread in the on-chip kernels: interleaved over the block when V > 1 (a warp access
// is one contiguous run), a contiguous run of K pixels per thread on the scalar path (V == 1), whose pixel
// coordinates then simply advance by one (K hoisted divisions would spill registers).
template <int V, int K>
__device__ __forceinline__ int vec_index(int k) {
  return V > 1 ? static_cast<int>(threadIdx.x + k * blockDim.x) : static_cast<int>(threadIdx.x * K + k);
}

// Elements between consecutive vectors of a thread, in pixels.
template <int V>
__device__ __forceinline__ int64_t vec_step() {
  return V > 1 ? static_cast<int64_t>(blockDim.x) * V : 1;
}

// The coordinates of the thread's first pixel on the scalar path (V == 1); the vector path sets them per vector.
template <int V, int K>
__device__ __forceinline__ void first_pixel(int width, int& col, int& row) {
  col = row = 0;
  if (V == 1) pixel_of(vec_index<V, K>(0), width, col, row);
}

// On the scalar path (V == 1) a thread's K values belong to adjacent pixels i0 .. i0 + K - 1, so the forward's
// stores to a dense output (Phi, the partial mask) go out as 16-byte vectors when all K pixels are in the map
// and `dst` (pixel i0) is 16-byte aligned; else one scalar each (the last thread of a map whose size is not a
// multiple of K, or an output at an odd offset).
template <bool Stream, int K, typename T>
__device__ __forceinline__ void store_run(T* dst, int i0, int nvec, const float (&v)[K][1]) {
  constexpr int C = static_cast<int>(16 / sizeof(T));
  static_assert(K % C == 0, "whole 16-byte vectors");
  if (i0 + K <= nvec && reinterpret_cast<uintptr_t>(dst) % 16 == 0) {
#pragma unroll
    for (int c = 0; c < K; c += C) {
      float chunk[C];
#pragma unroll
      for (int j = 0; j < C; ++j) chunk[j] = v[c + j][0];
      store_n<Stream, C>(dst + c, 1, chunk);
    }
  } else {
#pragma unroll
    for (int k = 0; k < K; ++k)
      if (i0 + k < nvec) store_n<Stream, 1>(dst + k, 1, v[k]);
  }
}

// Where the partial mask keeps vector k (pixel i * V) of this thread in shared memory: on the vector path at
// the pixel's own place (a warp's 16-byte vectors are adjacent), on the scalar path at k * blockDim.x +
// thread, so that a warp's 32 lanes, whose pixels are K apart, hit 32 different banks (at i they would
// hit 2 banks in float32: 16-way conflicts on every access). The launcher sizes the mask to match.
template <int V, int K>
__device__ __forceinline__ int mask_slot(int k, int i) {
  return V > 1 ? i * V : static_cast<int>(k * blockDim.x + threadIdx.x);
}

// An overflow map of the on-chip forward (max of s +-inf: the limit softmax, common.cuh), after the run's map
// loop, from memory (any layout, one value per access): c, the extreme logit in the direction of beta, by one
// reduction; e = 1 at c, 0 elsewhere (NaN with a NaN logit, or where the limit does not exist); k = sum e and
// the moments by a second; stats (smax, k), z, Phi = e / k and the partial mask (the slot of every pixel,
// whichever thread holds it in the loop).
template <int V, int K, typename T>
__device__ __forceinline__ void onchip_overflow_map(const ForwardArgs<T>& a, const Run& r, int l, int64_t map,
                                                    float smax, float* mask, float* max_scratch,
                                                    float (*sum_scratch)[3]) {
  const T* src = map_logits(a, r, l);
  const int64_t ps = a.ts.pixel;
  const float beta = a.beta_map != nullptr ? load1(a.beta_map + map) : a.beta;
  const float sign = beta < 0.f ? -1.f : 1.f;
  float cand = -INFINITY;
  for (int p = threadIdx.x; p < a.hw; p += blockDim.x) cand = fmaxf(cand, sign * load1(src + p * ps));
  __syncthreads();  // the scratch's last readers are done
  const float cn = block_max(cand, max_scratch);
  const bool ok = overflow_limit_exists(cn, beta);
  const float c = sign * cn;
  auto e_of = [&](float t) { return !ok || t != t ? NAN : (t == c ? 1.f : 0.f); };
  float acc[3] = {0.f, 0.f, 0.f};
  for (int p = threadIdx.x; p < a.hw; p += blockDim.x) {
    const float e = e_of(load1(src + p * ps));
    const int row = p / a.width;
    acc[0] += e;
    acc[1] += e * static_cast<float>(p - row * a.width);
    acc[2] += e * static_cast<float>(row);
  }
  block_sum<3>(acc, sum_scratch);
  if (threadIdx.x == 0) write_map_outputs(a, map, smax, acc[0], acc[1], acc[2]);
  for (int p = threadIdx.x; p < a.hw; p += blockDim.x) {
    const float ph = e_of(load1(src + p * ps)) / acc[0];
    if (a.phi != nullptr) store1(a.phi + map * a.hw + p, ph);
    if (a.partial != nullptr) mask[V > 1 ? p : (p % K) * static_cast<int>(blockDim.x) + p / K] += ph;
  }
}

// The map on chip: thread x holds vectors x, x + blockDim.x, ... (K of them, V pixels each).
template <typename T, int V, bool Pairs>
__global__ void __launch_bounds__(kMapThreads) maps_forward_onchip(ForwardArgs<T> a) {
  constexpr int K = kMapValues / V;
  // The run's partial mask, H*W floats in dynamic shared memory (the registers hold the map), then with
  // Pairs the stash of kMapValues * blockDim.x values of T; each thread only touches its own slots (pixels), so
  // no barrier guards them.
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* mask = reinterpret_cast<float*>(smem_raw);
  T* stash = reinterpret_cast<T*>(mask + (a.partial == nullptr ? 0 : V > 1 ? a.hw : kMapValues * blockDim.x));
  __shared__ float max_scratch[33];
  __shared__ float sum_scratch[33][3];
  __shared__ float beta_slots[2];
  const Run r = run_of_block(a.runs, a.per_run, a.maps);
  const int nvec = a.hw / V;

  if (a.partial != nullptr) {  // (zeros first: a run's first map may be an overflow map, added after the loop)
#pragma unroll
    for (int k = 0; k < K; ++k)
      if (vec_index<V, K>(k) < nvec)
#pragma unroll
        for (int j = 0; j < V; ++j) mask[mask_slot<V, K>(k, vec_index<V, K>(k)) + j] = 0.f;
  }
  bool any_over = false;  // an overflow map was left for after the loop
  bool stashed = false;   // map l's values came with map l - 1 (Pairs)
  for (int l = r.first; l < r.last; ++l) {
    const int64_t map = r.b * a.maps + l;
    const float beta = forward_beta(a, map, l, beta_slots);
    const T* src = map_logits(a, r, l);
    const bool pair = starts_pair<Pairs>(l, r.last);
    float s[K][V];
    float mx = -INFINITY;
    // one running pointer instead of K 64-bit addresses (registers)
    const T* q = src + static_cast<int64_t>(vec_index<V, K>(0)) * V * a.ts.pixel;
    const int64_t step = vec_step<V>() * a.ts.pixel;
    T* slot = stash + threadIdx.x;
#pragma unroll
    for (int k = 0; k < K; ++k, q += step, slot += blockDim.x) {
      const int i = vec_index<V, K>(k);
      if (i < nvec) {
        load_map_values<Pairs, V>(q, a.ts.pixel, slot, pair, stashed, s[k]);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          s[k][j] = scaled_logit(beta, s[k][j]);
          mx = fmaxf(mx, s[k][j]);
        }
      }
    }
    mx = block_max(mx, max_scratch);
    if (overflowed(mx)) {
      // an overflow map: left for onchip_overflow_map after the loop, which finds it by this NaN sum
      if (threadIdx.x == 0) {
        store1(a.stats + 2 * map, mx);
        store1(a.stats + 2 * map + 1, NAN);
      }
      any_over = true;
      stashed = pair;
      continue;
    }
    const float smax = mx;
    float acc[3] = {0.f, 0.f, 0.f};  // sum, sum * col, sum * row
    int col, row;
    first_pixel<V, K>(a.width, col, row);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int i = vec_index<V, K>(k);
      if (V > 1) pixel_of(i * V, a.width, col, row);
      if (i < nvec) {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const float e = __expf(s[k][j] - mx);
          s[k][j] = e;
          acc[0] += e;
          acc[1] += e * static_cast<float>(col);
          acc[2] += e * static_cast<float>(row);
          next_pixel(a.width, col, row);
        }
      }
    }
    block_sum<3>(acc, sum_scratch);
    const float sum = acc[0];
    if (threadIdx.x == 0) write_map_outputs(a, map, smax, sum, acc[1], acc[2]);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int i = vec_index<V, K>(k);
      if (i < nvec) {
        float p[V];
#pragma unroll
        for (int j = 0; j < V; ++j) p[j] = s[k][j] / sum;
        if (a.partial != nullptr) {
          float* mine = mask + mask_slot<V, K>(k, i);
#pragma unroll
          for (int j = 0; j < V; ++j) mine[j] += p[j];
        }
        if constexpr (V == 1) {
          s[k][0] = p[0];  // stored below as a run of the thread's adjacent pixels
        } else if (a.phi != nullptr) {
          store_n<true, V>(a.phi + map * a.hw + static_cast<int64_t>(i) * V, 1, p);
        }
      }
    }
    if constexpr (V == 1) {
      const int i0 = vec_index<V, K>(0);
      if (a.phi != nullptr) store_run<true, K>(a.phi + map * a.hw + i0, i0, nvec, s);
    }
    stashed = pair;
  }
  if (any_over) {  // (the same in every thread)
    __syncthreads();  // every thread is done with its own mask slots
    for (int l = r.first; l < r.last; ++l) {
      const int64_t map = r.b * a.maps + l;
      const float mx = load1(a.stats + 2 * map), sum = load1(a.stats + 2 * map + 1);
      if (overflowed(mx) && sum != sum) onchip_overflow_map<V, K>(a, r, l, map, mx, mask, max_scratch, sum_scratch);
    }
    __syncthreads();  // the mask slots written for other threads
  }
  if (a.partial == nullptr) return;
  float* out = a.partial + (r.b * a.runs + r.run) * a.hw;
  if constexpr (V == 1) {
    float v[K][1];
#pragma unroll
    for (int k = 0; k < K; ++k) v[k][0] = vec_index<V, K>(k) < nvec ? mask[mask_slot<V, K>(k, 0)] : 0.f;
    store_run<false, K>(out + vec_index<V, K>(0), vec_index<V, K>(0), nvec, v);
  } else {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int i = vec_index<V, K>(k);
      if (i < nvec) {
        float v[V];
#pragma unroll
        for (int j = 0; j < V; ++j) v[j] = mask[mask_slot<V, K>(k, i) + j];
        store_n<false, V>(out + static_cast<int64_t>(i) * V, 1, v);
      }
    }
  }
}

// The extreme logit of a streamed map in the direction of beta (common.cuh), over the block. Overflow maps
// only.
template <int V, typename T>
__device__ __forceinline__ float streamed_extreme(const T* src, int64_t pixel_stride, int nvec, bool negative,
                                                  float* scratch) {
  // (a NaN logit is skipped here: its own exponential makes the map NaN)
  const float sign = negative ? -1.f : 1.f;
  float cand = -INFINITY;
#pragma unroll 1
  for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
    float t[V];
    load_n<false, V>(src + static_cast<int64_t>(i) * V * pixel_stride, pixel_stride, t);
#pragma unroll
    for (int j = 0; j < V; ++j) cand = fmaxf(cand, sign * t[j]);
  }
  __syncthreads();  // every thread has read the scratch's last values
  return block_max(cand, scratch);
}

// This thread's online statistics of s = beta T over its pixels of a map too large to hold.
template <int V, typename T>
__device__ __forceinline__ SoftStats streamed_stats(const ForwardArgs<T>& a, const T* src, int nvec, float beta) {
  SoftStats st{-INFINITY, 0.f, 0.f, 0.f};
  for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
    float s[V];
    load_n<false, V>(src + static_cast<int64_t>(i) * V * a.ts.pixel, a.ts.pixel, s);
    float m = st.m;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      s[j] = scaled_logit(beta, s[j]);
      m = fmaxf(m, s[j]);
    }
    const float f = rescale(st.m, m);
    st = {m, st.s * f, st.sx * f, st.sy * f};
    int col, row;
    pixel_of(i * V, a.width, col, row);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float e = s[j] == -INFINITY ? 0.f : __expf(s[j] - m);
      st.s += e;
      st.sx += e * static_cast<float>(col);
      st.sy += e * static_cast<float>(row);
      next_pixel(a.width, col, row);
    }
  }
  return st;
}

// Maps too large to hold: online statistics in one sweep, then Phi and the partial mask in a second.
template <typename T, int V>
__global__ void __launch_bounds__(kMapThreads) maps_forward_streamed(ForwardArgs<T> a) {
  __shared__ SoftStats scratch[33];
  __shared__ float beta_slots[2];
  const Run r = run_of_block(a.runs, a.per_run, a.maps);
  const int nvec = a.hw / V;
  for (int l = r.first; l < r.last; ++l) {
    const int64_t map = r.b * a.maps + l;
    const float beta = forward_beta(a, map, l, beta_slots);
    const T* src = map_logits(a, r, l);
    SoftStats total = block_merge(streamed_stats<V>(a, src, nvec, beta), scratch);
    const float smax = total.m;
    float ebeta = beta;  // beta in the exponent
    if (overflowed(smax)) {
      // the limit softmax (common.cuh): the statistics again with the overflow scale b as beta, which makes every
      // exponential exactly 1 at c and 0 elsewhere (so sum = k and the moments those of the pixels at c)
      const bool negative = beta < 0.f;
      const float cn = streamed_extreme<V>(src, a.ts.pixel, nvec, negative, reinterpret_cast<float*>(scratch));
      const float c = negative ? -cn : cn;
      ebeta = overflow_limit_exists(cn, beta) ? overflow_scale(beta, c) : NAN;
      __syncthreads();  // every thread has read the max's scratch
      total = block_merge(streamed_stats<V>(a, src, nvec, ebeta), scratch);
    }
    if (threadIdx.x == 0) write_map_outputs(a, map, smax, total.s, total.sx, total.sy);
    float* part = a.partial == nullptr ? nullptr : a.partial + (r.b * a.runs + r.run) * a.hw;
    for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
      float p[V];
      load_n<true, V>(src + static_cast<int64_t>(i) * V * a.ts.pixel, a.ts.pixel, p);
#pragma unroll
      for (int j = 0; j < V; ++j) p[j] = __expf(scaled_logit(ebeta, p[j]) - total.m) / total.s;
      if (a.phi != nullptr) store_n<true, V>(a.phi + map * a.hw + static_cast<int64_t>(i) * V, 1, p);
      if (part != nullptr) {  // this thread's own pixels: no other thread touches them
        float acc[V];
        if (l == r.first) {
#pragma unroll
          for (int j = 0; j < V; ++j) acc[j] = p[j];
        } else {
          load_n<false, V>(part + static_cast<int64_t>(i) * V, 1, acc);
#pragma unroll
          for (int j = 0; j < V; ++j) acc[j] += p[j];
        }
        store_n<false, V>(part + static_cast<int64_t>(i) * V, 1, acc);
      }
    }
  }
}

template <typename T, typename G>
struct BackwardArgs {
  const T* logits;
  Strides ts;
  float beta;
  const float* beta_map;
  const float* stats;
  int maps, hw, width, runs, per_run;
  Coords co;
  const G* grad;  // null = 0
  Strides gs;     // per map: batch, map, pixel; per batch: batch, -, pixel
  const T* grad_z;
  T* grad_logits;  // NCHW contiguous
  float* grad_beta;
};

// Per-map constants of the backward.
struct MapBackward {
  float beta, mx, sum, gzx, gzy;
  float ebeta;  // beta in the exponent: beta, or an overflow map's scale (with mx = that scale times c)
};

template <typename T, typename G>
__device__ __forceinline__ MapBackward map_backward_constants(const BackwardArgs<T, G>& a, int64_t map) {
  MapBackward c;
  c.beta = a.beta_map != nullptr ? load1(a.beta_map + map) : a.beta;
  c.mx = load1(a.stats + 2 * map);
  c.sum = load1(a.stats + 2 * map + 1);
  c.gzx = a.grad_z != nullptr ? load1(a.grad_z + 2 * map) : 0.f;
  c.gzy = a.grad_z != nullptr ? load1(a.grad_z + 2 * map + 1) : 0.f;
  c.ebeta = c.beta;
  return c;
}

// Phi = exp(s - max) / sum from the saved stats, s rounded as in the forward.
__device__ __forceinline__ float phi_of(float t, const MapBackward& c) {
  return __expf(scaled_logit(c.ebeta, t) - c.mx) / c.sum;
}

// An overflow map's backward (saved max +-inf, finite k: common.cuh) from its extreme `cn` (in the direction of
// beta): exp(b T - b c) is exactly 1 at c and 0 elsewhere, so phi_of gives [T == c] / k; NaN without a limit.
__device__ __forceinline__ void overflow_backward_constants(MapBackward& c, float cn) {
  const float x = c.beta < 0.f ? -cn : cn;
  c.ebeta = overflow_limit_exists(cn, c.beta) ? overflow_scale(c.beta, x) : NAN;
  c.mx = c.ebeta * x;
}

// g_phi at (col, row): the incoming gradient of Phi plus grad_z . coordinate.
__device__ __forceinline__ float g_phi(float g, const MapBackward& c, const Coords& co, int col, int row) {
  return g + c.gzx * (co.ox + co.kx * static_cast<float>(col)) + c.gzy * (co.oy + co.ky * static_cast<float>(row));
}

// The backward holds the run's mask gradient (or a map's gradient) in registers beside the map, with no
// register to spare: the pair loads' registers must not pile up next to them (nvcc batches the K loads; that
// spilled). So with Pairs every map of the backward comes through the stash: a pair's maps go to plane 0
// (map l) and plane 1 (map l + 1, `plane` elements further), a single map to plane 0, and the map's loop then
// reads plane 0, or plane 1 for the second map of a pair. Same slots as load_pair.
template <int K, typename T>
__device__ __forceinline__ void stash_maps(const T* q, int64_t step, T* slot, int plane, int nvec, bool pair) {
#pragma unroll
  for (int k = 0; k < K; ++k, q += step, slot += blockDim.x) {
    if (vec_index<1, K>(k) < nvec) {
      if (pair) {
        const Vec<T, 2> v = load_one<false, 2>(q);
        slot[0] = v.v[0];
        slot[plane] = v.v[1];
      } else {
        slot[0] = load_one<false, 1>(q).v[0];
      }
    }
  }
}

// The backward of an overflow map of the on-chip kernel (saved max +-inf with a finite k), after the run's map
// loop, from memory (any layout, one value per access): c again by one reduction, Phi = [T == c] / k, then the
// usual two sums.
template <bool PerMap, typename T, typename G>
__device__ __forceinline__ void overflow_backward_map(const BackwardArgs<T, G>& a, const Run& r, int l, int64_t map,
                                                      MapBackward c, float* scratch) {
  const T* src = map_logits(a, r, l);
  const int64_t ps = a.ts.pixel;
  const float sign = c.beta < 0.f ? -1.f : 1.f;
  float cand = -INFINITY;
  for (int p = threadIdx.x; p < a.hw; p += blockDim.x) cand = fmaxf(cand, sign * load1(src + p * ps));
  __syncthreads();  // the scratch's last readers are done
  const float cn = block_max(cand, scratch);
  const bool ok = overflow_limit_exists(cn, c.beta);
  const float cx = sign * cn;
  const G* gsrc = a.grad == nullptr ? nullptr : a.grad + r.b * a.gs.batch + (PerMap ? l * a.gs.channel : 0);
  float acc[1] = {0.f}, gb[1] = {0.f};
  for (int sweep = 0; sweep < 2; ++sweep) {
    const float S = acc[0];
    for (int p = threadIdx.x; p < a.hw; p += blockDim.x) {
      const float t = load1(src + p * ps);
      const float g = gsrc == nullptr ? 0.f : load1(gsrc + p * a.gs.pixel);
      const int row = p / a.width;
      // Phi = [T == c] / k directly (the exponential of the other kernels gives exactly that)
      const float ph = ok ? (t == cx ? 1.f : 0.f) / c.sum : NAN, gp = g_phi(g, c, a.co, p - row * a.width, row);
      if (sweep == 0) {
        acc[0] += ph * gp;
      } else {
        const float gs = ph * (gp - S);
        gb[0] += t * gs;
        store1(a.grad_logits + map * a.hw + p, c.beta * gs);
      }
    }
    __syncthreads();  // the scratch's last readers are done
    block_sum<1>(sweep == 0 ? acc : gb, reinterpret_cast<float (*)[1]>(scratch));
  }
  if (threadIdx.x == 0) store1(a.grad_beta + map, gb[0]);
}

template <typename T, typename G, int V, bool PerMap, bool Pairs>
__global__ void __launch_bounds__(kMapThreads) maps_backward_onchip(BackwardArgs<T, G> a) {
  constexpr int K = kMapValues / V;
  // With Pairs: the stash, two planes of kMapValues * blockDim.x values of T (a pair's maps, stash_pair), each
  // thread's own slots only.
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* stash = reinterpret_cast<T*>(smem_raw);
  const int plane = kMapValues * blockDim.x;
  __shared__ float scratch[33][1];
  __shared__ MapBackward slots[2];
  const Run r = run_of_block(a.runs, a.per_run, a.maps);
  const int nvec = a.hw / V;
  float g[K][V];  // per batch: the run's mask gradient, read once
#pragma unroll
  for (int k = 0; k < K; ++k) {
    const int i = vec_index<V, K>(k);
#pragma unroll
    for (int j = 0; j < V; ++j) g[k][j] = 0.f;
    if (!PerMap && a.grad != nullptr && i < nvec)
      load_n<false, V>(a.grad + r.b * a.gs.batch + static_cast<int64_t>(i) * V * a.gs.pixel, a.gs.pixel, g[k]);
  }
  bool any_over = false;  // an overflow map was left for after the loop
  bool stashed = false;   // map l's values came with map l - 1 (Pairs)
  for (int l = r.first; l < r.last; ++l) {
    const int64_t map = r.b * a.maps + l;
    MapBackward c = broadcast(slots, l, [&] { return map_backward_constants(a, map); });
    const T* src = map_logits(a, r, l);
    const bool pair = starts_pair<Pairs>(l, r.last);
    float t[K][V];  // Phi is recomputed in the second loop: one more exp is cheaper than 32 registers
    float acc[1] = {0.f};  // S = sum Phi g_phi
    int col, row;
    first_pixel<V, K>(a.width, col, row);
    const T* q = src + static_cast<int64_t>(vec_index<V, K>(0)) * V * a.ts.pixel;
    const int64_t step = vec_step<V>() * a.ts.pixel;
    if constexpr (Pairs) {
      if (!stashed) stash_maps<K>(q, step, stash + threadIdx.x, plane, nvec, pair);
    }
    if (overflowed(c.mx, c.sum)) {  // an overflow map: overflow_backward_map after the loop
      any_over = true;
      stashed = pair;
      continue;
    }
    c.ebeta = c.beta;
    T* slot = stash + threadIdx.x + (stashed ? plane : 0);  // plane 1: the second map of a pair
#pragma unroll
    for (int k = 0; k < K; ++k, q += step, slot += blockDim.x) {
      const int i = vec_index<V, K>(k);
      if (i < nvec) {
        load_map_values<Pairs, V>(q, a.ts.pixel, slot, false, true, t[k]);  // Pairs: always from the stash
        if (PerMap && a.grad != nullptr)
          load_n<true, V>(a.grad + r.b * a.gs.batch + l * a.gs.channel + static_cast<int64_t>(i) * V * a.gs.pixel,
                          a.gs.pixel, g[k]);
        if (V > 1) pixel_of(i * V, a.width, col, row);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          acc[0] += phi_of(t[k][j], c) * g_phi(g[k][j], c, a.co, col, row);
          next_pixel(a.width, col, row);
        }
      }
    }
    block_sum<1>(acc, scratch);
    const float S = acc[0];
    float gb[1] = {0.f};  // grad_beta = sum T g_s
    T* dst = a.grad_logits + map * a.hw;
    first_pixel<V, K>(a.width, col, row);
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const int i = vec_index<V, K>(k);
      if (V > 1) pixel_of(i * V, a.width, col, row);
      if (i < nvec) {
        float out[V];
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const float gs = phi_of(t[k][j], c) * (g_phi(g[k][j], c, a.co, col, row) - S);
          gb[0] += t[k][j] * gs;
          out[j] = c.beta * gs;
          next_pixel(a.width, col, row);
        }
        // (one scalar each on the scalar path: holding them for store_run spills in the backward)
        store_n<true, V>(dst + static_cast<int64_t>(i) * V, 1, out);
      }
    }
    block_sum<1>(gb, scratch);
    if (threadIdx.x == 0) store1(a.grad_beta + map, gb[0]);
    stashed = pair;
  }
  if (any_over) {  // (the same in every thread)
    for (int l = r.first; l < r.last; ++l) {
      const int64_t map = r.b * a.maps + l;
      MapBackward c = map_backward_constants(a, map);
      if (overflowed(c.mx, c.sum)) overflow_backward_map<PerMap>(a, r, l, map, c, &scratch[0][0]);
    }
  }
}

// Maps too large to hold: two sweeps per map (S, then the gradient), T and g read in each.
template <typename T, typename G, int V, bool PerMap>
__global__ void __launch_bounds__(kMapThreads) maps_backward_streamed(BackwardArgs<T, G> a) {
  __shared__ float scratch[33][1];
  __shared__ MapBackward slots[2];
  const Run r = run_of_block(a.runs, a.per_run, a.maps);
  const int nvec = a.hw / V;
  for (int l = r.first; l < r.last; ++l) {
    const int64_t map = r.b * a.maps + l;
    MapBackward c = broadcast(slots, l, [&] { return map_backward_constants(a, map); });
    const T* src = map_logits(a, r, l);
    if (overflowed(c.mx, c.sum))
      overflow_backward_constants(c, streamed_extreme<V>(src, a.ts.pixel, nvec, c.beta < 0.f, &scratch[0][0]));
    const G* gsrc = a.grad == nullptr ? nullptr : a.grad + r.b * a.gs.batch + (PerMap ? l * a.gs.channel : 0);
    float acc[1] = {0.f}, gb[1] = {0.f};
#pragma unroll 1
    for (int sweep = 0; sweep < 2; ++sweep) {
      const float S = acc[0];
      for (int i = threadIdx.x; i < nvec; i += blockDim.x) {
        float t[V], g[V];
        load_n<false, V>(src + static_cast<int64_t>(i) * V * a.ts.pixel, a.ts.pixel, t);
#pragma unroll
        for (int j = 0; j < V; ++j) g[j] = 0.f;
        if (gsrc != nullptr) load_n<false, V>(gsrc + static_cast<int64_t>(i) * V * a.gs.pixel, a.gs.pixel, g);
        int col, row;
        pixel_of(i * V, a.width, col, row);
        float out[V];
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const float ph = phi_of(t[j], c);
          const float gp = g_phi(g[j], c, a.co, col, row);
          if (sweep == 0) {
            acc[0] += ph * gp;
          } else {
            const float gs = ph * (gp - S);
            gb[0] += t[j] * gs;
            out[j] = c.beta * gs;
          }
          next_pixel(a.width, col, row);
        }
        if (sweep == 1) store_n<true, V>(a.grad_logits + map * a.hw + static_cast<int64_t>(i) * V, 1, out);
      }
      block_sum<1>(sweep == 0 ? acc : gb, scratch);
    }
    if (threadIdx.x == 0) store1(a.grad_beta + map, gb[0]);
  }
}

// Raises the dynamic shared-memory limit of `kernel` when a launch needs more than the default 48 KiB.
template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

// Whether the on-chip kernels read channels_last T a pair of maps per access (Pairs): adjacent maps (map
// stride 1), even pixel and batch strides and a base aligned to two elements (so every even map's pair is an
// aligned 2-element access), at least two maps, and `smem` bytes of dynamic shared memory (the stash, and the
// partial mask in the forward; static shared memory is under 1 KiB) within the device's limit. Otherwise one
// scalar access per value.
template <typename T>
bool map_pairs(const Logits& lg, int maps, size_t smem) {
  if (maps < 2 || lg.strides.channel != 1 || lg.strides.pixel % 2 != 0 || lg.strides.batch % 2 != 0 ||
      !aligned(lg.data, 2 * sizeof(T)))
    return false;
  DeviceInfo dev;
  if (device_info(&dev) != cudaSuccess) return false;
  return smem + 1024 <= static_cast<size_t>(dev.smem_optin);
}

// Threads of a per-map block: enough for the map's vectors (K per thread on chip), a multiple of 32.
int map_threads(int nvec, bool on_chip, int V) {
  const int64_t per_thread = on_chip ? kMapValues / V : 1;
  return threads_for(ceil_div(nvec, per_thread), kMapThreads);
}

template <typename T>
cudaError_t maps_forward_t(MapShape shape, const Logits& lg, bool normalized, float* stats, T* z, T* phi,
                           float* partial, int runs, cudaStream_t stream) {
  const int64_t hw = static_cast<int64_t>(shape.height) * shape.width;
  const int per_run = static_cast<int>(ceil_div(shape.maps, runs));
  const int64_t blocks = shape.batch * runs;
  if (blocks > INT_MAX || hw > INT_MAX / 2) return cudaErrorInvalidValue;
  ForwardArgs<T> a{static_cast<const T*>(lg.data), lg.strides, lg.beta, lg.beta_map, shape.maps,
                   static_cast<int>(hw), shape.width, runs, per_run, coords_for(shape.height, shape.width, normalized),
                   stats, z, phi, partial};
  constexpr int kVec = vec_width(sizeof(T));
  const bool vec = hw % kVec == 0 && lg.strides.pixel == 1 && lg.strides.batch % kVec == 0 &&
                   lg.strides.channel % kVec == 0 && aligned(lg.data, 16) && aligned(phi, 16) && aligned(partial, 16);
  const bool on_chip = hw <= kOnChipPixels;
  const int v = vec ? kVec : 1;
  const int threads = map_threads(static_cast<int>(hw / v), on_chip, v);
  const unsigned grid = static_cast<unsigned>(blocks);
  if (on_chip) {
    // the partial mask: H*W floats, or K slots a thread on the scalar path (mask_slot)
    const size_t mask_smem =
        partial == nullptr ? 0 : (vec ? static_cast<size_t>(hw) : static_cast<size_t>(kMapValues) * threads) * sizeof(float);
    const size_t stash_smem = static_cast<size_t>(kMapValues) * threads * sizeof(T);
    const bool pairs = !vec && map_pairs<T>(lg, shape.maps, mask_smem + stash_smem);
    const size_t smem = mask_smem + (pairs ? stash_smem : 0);
    cudaError_t err;
    if (vec) {
      if ((err = allow_smem(maps_forward_onchip<T, kVec, false>, smem)) != cudaSuccess) return err;
      maps_forward_onchip<T, kVec, false><<<grid, threads, smem, stream>>>(a);
    } else if (pairs) {
      if ((err = allow_smem(maps_forward_onchip<T, 1, true>, smem)) != cudaSuccess) return err;
      maps_forward_onchip<T, 1, true><<<grid, threads, smem, stream>>>(a);
    } else {
      if ((err = allow_smem(maps_forward_onchip<T, 1, false>, smem)) != cudaSuccess) return err;
      maps_forward_onchip<T, 1, false><<<grid, threads, smem, stream>>>(a);
    }
  } else {
    if (vec) maps_forward_streamed<T, kVec><<<grid, threads, 0, stream>>>(a);
    else maps_forward_streamed<T, 1><<<grid, threads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

template <typename T, typename G, bool PerMap>
cudaError_t maps_backward_launch(const BackwardArgs<T, G>& a, bool vec, bool pairs, bool on_chip, int64_t blocks,
                                 cudaStream_t stream) {
  constexpr int kVec = vec_width(sizeof(T));
  const int v = vec ? kVec : 1;
  const int threads = map_threads(a.hw / v, on_chip, v);
  const unsigned grid = static_cast<unsigned>(blocks);
  if (on_chip) {
    // A 16-bit mask gradient held for the run (G = T, the raw maps_backward's) leaves no register for the
    // pair path (ptxas spills for sm_80): that variant reads channels_last T one value per access.
    constexpr bool kPairsFit = PerMap || sizeof(G) == 4;
    if (vec) {
      maps_backward_onchip<T, G, kVec, PerMap, false><<<grid, threads, 0, stream>>>(a);
    } else if (kPairsFit && pairs) {
      if constexpr (kPairsFit) {
        const size_t smem = 2 * static_cast<size_t>(kMapValues) * threads * sizeof(T);  // the stash's two planes
        const cudaError_t err = allow_smem(maps_backward_onchip<T, G, 1, PerMap, true>, smem);
        if (err != cudaSuccess) return err;
        maps_backward_onchip<T, G, 1, PerMap, true><<<grid, threads, smem, stream>>>(a);
      }
    } else {
      maps_backward_onchip<T, G, 1, PerMap, false><<<grid, threads, 0, stream>>>(a);
    }
  } else {
    if (vec) maps_backward_streamed<T, G, kVec, PerMap><<<grid, threads, 0, stream>>>(a);
    else maps_backward_streamed<T, G, 1, PerMap><<<grid, threads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

template <typename T, typename G>
cudaError_t maps_backward_t(MapShape shape, const Logits& lg, const float* stats, bool normalized, const PhiGrad& gp,
                            const T* grad_z, T* grad_logits, float* grad_beta, cudaStream_t stream) {
  const int64_t hw = static_cast<int64_t>(shape.height) * shape.width;
  if (hw > INT_MAX / 2) return cudaErrorInvalidValue;
  DeviceInfo dev;
  cudaError_t err = device_info(&dev);
  if (err != cudaSuccess) return err;
  const int runs = map_runs(shape, dev);
  const int64_t blocks = shape.batch * runs;
  if (blocks > INT_MAX) return cudaErrorInvalidValue;
  const Strides gs = gp.per_map ? gp.strides : Strides{hw, 0, 1};
  BackwardArgs<T, G> a{static_cast<const T*>(lg.data), lg.strides, lg.beta, lg.beta_map, stats, shape.maps,
                       static_cast<int>(hw), shape.width, runs, static_cast<int>(ceil_div(shape.maps, runs)),
                       coords_for(shape.height, shape.width, normalized), static_cast<const G*>(gp.data), gs,
                       grad_z, grad_logits, grad_beta};
  constexpr int kVec = vec_width(sizeof(T));
  const bool grad_vec = gp.data == nullptr || (gs.pixel == 1 && gs.batch % kVec == 0 &&
                                               (!gp.per_map || gs.channel % kVec == 0) && aligned(gp.data, 16));
  const bool vec = hw % kVec == 0 && lg.strides.pixel == 1 && lg.strides.batch % kVec == 0 &&
                   lg.strides.channel % kVec == 0 && aligned(lg.data, 16) && aligned(grad_logits, 16) && grad_vec;
  const bool on_chip = hw <= kOnChipPixels;
  const size_t stash_smem = 2 * static_cast<size_t>(kMapValues) * map_threads(static_cast<int>(hw), true, 1) * sizeof(T);
  const bool pairs = !vec && on_chip && map_pairs<T>(lg, shape.maps, stash_smem);
  if (gp.per_map) return maps_backward_launch<T, G, true>(a, vec, pairs, on_chip, blocks, stream);
  return maps_backward_launch<T, G, false>(a, vec, pairs, on_chip, blocks, stream);
}

}  // namespace

cudaError_t maps_forward(DType dtype, MapShape shape, const Logits& logits, bool normalized, float* stats, void* z,
                         void* phi, float* partial, int runs, cudaStream_t stream) {
  DECAFA_DISPATCH(dtype, return maps_forward_t<scalar_t>(shape, logits, normalized, stats, static_cast<scalar_t*>(z),
                                                         static_cast<scalar_t*>(phi), partial, runs, stream));
  return cudaSuccess;
}

}  // namespace detail

int set_map_runs(int runs) {
  return runs < 0 ? detail::forced_runs.load() : detail::forced_runs.exchange(runs);
}

int map_runs_setting() { return detail::forced_runs.load(); }

cudaError_t maps_backward(DType dtype, MapShape shape, Logits logits, const float* stats, bool normalized,
                          PhiGrad grad_phi, const void* grad_z, void* grad_logits, float* grad_beta,
                          cudaStream_t stream) {
  if (shape.batch == 0 || shape.maps == 0 || shape.height == 0 || shape.width == 0) return cudaSuccess;
  // the ring backward where selected and covered: a per-batch float32 gradient of Phi (or none)
  if (detail::ring_selected() && !grad_phi.per_map && (grad_phi.float32 || grad_phi.data == nullptr)) {
    bool done = false;
    const cudaError_t err =
        detail::maps_backward_ring(dtype, shape, logits, stats, normalized, static_cast<const float*>(grad_phi.data),
                                   grad_z, grad_logits, grad_beta, &done, stream);
    if (err != cudaSuccess || done) return err;
  }
  DECAFA_DISPATCH(
      dtype,
      if (grad_phi.float32) {
        return detail::maps_backward_t<scalar_t, float>(shape, logits, stats, normalized, grad_phi,
                                                        static_cast<const scalar_t*>(grad_z),
                                                        static_cast<scalar_t*>(grad_logits), grad_beta, stream);
      } return detail::maps_backward_t<scalar_t, scalar_t>(shape, logits, stats, normalized, grad_phi,
                                                           static_cast<const scalar_t*>(grad_z),
                                                           static_cast<scalar_t*>(grad_logits), grad_beta, stream));
  return cudaSuccess;
}

}  // namespace decafa_kernels
