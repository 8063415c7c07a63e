// The ring forward of the per-map pass (DECAFA_CUDA_MAPS=ring): a persistent grid of CTAs, each walking a
// balanced contiguous range of the B * L maps (ring_start, launch.cuh), with the maps streamed through a ring of
// shared-memory stages by 16-byte cp.async, so that the next maps load while the current one is reduced: up to
// `stages - 1` maps in flight per CTA at every moment (3 in 16-bit types, 2 in float32 on an H100).
//   per map: the thread's 16 values from the stage into registers; the max (of the raw logits when the scalar
//   beta is positive and finite: beta * t is monotone in t, so max(beta * t) = beta * max t, bit for bit; else
//   of s = beta * t); e = exp2(t * k - shift) (one FFMA and one EX2 per logit); the sums of e, e * col and
//   e * row in one reduction (a reduce-scatter of four values per warp butterfly); the max and sums into a
//   shared-memory buffer, whose stats and z are written once per group of kRingGroup maps; Phi = e / sum stored
//   when asked; the map's stage refilled with the map `stages` ahead; the partial mask kept in registers across
//   the range's maps and written once per batch element the range touches (at most two planes per CTA).
// Pixel coordinates come from the loop structure: a thread's pixels are the same in every map (its vector k lies
// H / K rows below its vector 0, same column), so its column and first row are found once per CTA (no division
// per vector), and a vector never crosses a row (W is a multiple of the vector): per map, sum e col =
// col0 sum e + sum q e_q and sum e row = row0 sum e + (H / K) sum k e_k (q: element of a vector, k: vector).
// Covered: NCHW maps (pixel stride 1) of at most 16384 pixels in whole tiles (H * W a multiple of 512: 16 values a
// thread, whole warps, no bounds test), W a multiple of the 16-byte vector V and H of 16 / V, 16-byte aligned T with
// batch and map strides multiples of V, and two stages of shared memory; other cases run the on-chip run kernels
// (stats.cu): channels_last T, other shapes, larger maps.
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "async_copy.cuh"
#include "common.cuh"
#include "launch.cuh"

namespace decafa_kernels {
namespace detail {

bool ring_selected() {
  static const bool selected = [] {
    const char* env = std::getenv("DECAFA_CUDA_MAPS");
    return env != nullptr && std::strcmp(env, "ring") == 0;
  }();
  return selected;
}

namespace {

constexpr int kRingThreads = 1024;
constexpr int kRingValues = 16;  // values of a map per thread
constexpr int kRingMaxStages = 4;
constexpr int64_t kRingPixels = static_cast<int64_t>(kRingThreads) * kRingValues;
constexpr float kLog2e = 1.4426950408889634f;

// The ring's waits take a constant (cp.async.wait_group has an immediate): each map's copies are committed as
// one group padded with kRingMaxStages - stages empty groups, so that "the maps ahead of the current one" is
// always the same number of groups whatever the stages (an empty group completes at once).
__device__ __forceinline__ void commit_padding(int stages) {
  cp_async_commit_if(stages < kRingMaxStages);
  cp_async_commit_if(stages < kRingMaxStages - 1);
}

__device__ __forceinline__ float fast_exp2(float x) {
#ifdef DECAFA_EMULATION
  return std::exp2(x);
#else
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#endif
}

// The stats' sum as the contract has it, sum of exp(s - max), from the ring's sum of e. The exp2 form's exponent
// at the map's max is d0 = fma(max, k2, -shift), not 0 (max: of the raw logits with k2 = beta log2 e, or of s with
// k2 = log2 e; shift = smax log2 e): k2 and the shift are rounded apart, so every e, and their sum, is 2^d0 times
// exp(s - max) (|d0| up to ~|s| 2^-23: 1e-4 relative at |s| = 1000). Phi = e / sum and z are ratios and do not
// see it; the stats do, and every backward divides by them. (The overflow maps' exact constants have d0 = 0.)
// The forward's k2 and shift again, from the map's smax and (raw path) raw max, so that the loop holds nothing
// for it.
template <bool RawMax>
__device__ __forceinline__ float stats_sum(float sum, float smax, float raw_max, float beta) {
  if (overflowed(smax)) return sum;
  const float shift = smax * kLog2e;
  return sum * exp2f(-(RawMax ? fmaf(raw_max, beta * kLog2e, -shift) : fmaf(smax, kLog2e, -shift)));
}

DECAFA_HD inline int64_t i64_min(int64_t x, int64_t y) { return x < y ? x : y; }

template <typename T>
struct RingArgs {
  const T* logits;
  Strides ts;  // batch, map, pixel (pixel == 1)
  float beta;
  const float* beta_map;
  int maps, hw, width;
  int64_t total;  // B * L
  int64_t map_step, batch_step;  // bytes from a map to the next: within a batch element, across its end
  int ctas, stages, stage_bytes;
  unsigned ring_bytes;  // stages * stage_bytes
  Coords co;
  float* stats;
  T* z;
  T* phi;
  float* partial;  // 2 planes of hw floats per CTA, or null
};

// Sums four values over a warp as a reduce-scatter: after it, lane l holds the warp's total of value (l >> 3) & 3.
// Six shuffles instead of twenty; the order of the additions is fixed (deterministic).
__device__ __forceinline__ float warp_sum4(float a0, float a1, float a2, float a3) {
  const bool hi16 = (threadIdx.x & 16u) != 0;
  float k0 = hi16 ? a2 : a0, k1 = hi16 ? a3 : a1;
  const float s0 = hi16 ? a0 : a2, s1 = hi16 ? a1 : a3;
  k0 += __shfl_xor_sync(0xffffffffu, s0, 16);
  k1 += __shfl_xor_sync(0xffffffffu, s1, 16);
  const bool hi8 = (threadIdx.x & 8u) != 0;
  float k = hi8 ? k1 : k0;
  k += __shfl_xor_sync(0xffffffffu, hi8 ? k0 : k1, 8);
  k += __shfl_xor_sync(0xffffffffu, k, 4);
  k += __shfl_xor_sync(0xffffffffu, k, 2);
  k += __shfl_xor_sync(0xffffffffu, k, 1);
  return k;
}

// The block's sums of four values, every thread gets all four; one barrier. `scratch` is __shared__
// float[32][4], written before the barrier and read after it; the caller's next barrier (another reduction's)
// separates these reads from the next call's writes.
// ring_block_sum4_scattered leaves lane l of every warp with the block's total of value (l >> 3) & 3 only.
__device__ __forceinline__ float ring_block_sum4_scattered(const float (&v)[4], float (*scratch)[4]) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int num_warps = blockDim.x >> 5;
  const float k = warp_sum4(v[0], v[1], v[2], v[3]);
  if ((lane & 7) == 0) scratch[warp][lane >> 3] = k;
  __syncthreads();
  // every warp adds the warp totals itself (no second barrier)
  const bool has = lane < num_warps;
  return warp_sum4(has ? scratch[lane][0] : 0.f, has ? scratch[lane][1] : 0.f, has ? scratch[lane][2] : 0.f,
                   has ? scratch[lane][3] : 0.f);
}

__device__ __forceinline__ void ring_block_sum4(float (&v)[4], float (*scratch)[4]) {
  const float k = ring_block_sum4_scattered(v, scratch);
#pragma unroll
  for (int q = 0; q < 4; ++q) v[q] = __shfl_sync(0xffffffffu, k, q * 8);
}

// A float as an int with the same order (non-NaN values; -0 below +0), for the integer warp reductions.
__device__ __forceinline__ int ordered_bits(float f) {
  union {
    float f;
    int i;
  } u{f};
  return u.i >= 0 ? u.i : u.i ^ 0x7fffffff;
}
__device__ __forceinline__ float from_ordered_bits(int i) {
  union {
    int i;
    float f;
  } u{i >= 0 ? i : i ^ 0x7fffffff};
  return u.f;
}

// The block's maximum of a value no thread holds as NaN, one barrier: each warp's maximum in one integer
// reduction (REDUX, sm_80+) on the float's ordered bits, exact as a max is; `scratch` is __shared__ float[32] (the
// warp maxima's bits), as above.
__device__ __forceinline__ float ring_block_max(float v, float* scratch) {
  const int lane = threadIdx.x & 31;
  int* warp_max_bits = reinterpret_cast<int*>(scratch);
  const int m = __reduce_max_sync(0xffffffffu, ordered_bits(v));
  if (lane == 0) warp_max_bits[threadIdx.x >> 5] = m;
  __syncthreads();
  const int all = lane < static_cast<int>(blockDim.x >> 5) ? warp_max_bits[lane] : INT_MIN;
  return from_ordered_bits(__reduce_max_sync(0xffffffffu, all));
}

// The next map to copy into the ring: its index in (b, l) order, its l, and this thread's first 16-byte chunk of
// it in global memory.
struct IssueCursor {
  const char* src;
  int64_t map;
  int l;
};

// The cursor at map `start`.
template <typename Args>
__device__ __forceinline__ IssueCursor first_map(const Args& a, int64_t start, unsigned mine) {
  const int64_t b = start / a.maps;
  IssueCursor c;
  c.map = start;
  c.l = static_cast<int>(start - b * a.maps);
  c.src = reinterpret_cast<const char*>(a.logits + b * a.ts.batch + static_cast<int64_t>(c.l) * a.ts.channel) + mine;
  return c;
}

// Issues this thread's copies of the cursor's map into the stage whose chunk for this thread is at `dst` (the
// thread's chunks are 16 * (thread + k * blockDim.x) bytes into the map and into the stage, `step` =
// 16 * blockDim.x apart); with beta_map, thread 0 also copies the map's beta to `beta_dst`. Advances the cursor
// to the next map in (b, l) order. The caller commits.
template <typename T, int K, typename Args>
__device__ __forceinline__ void issue_map(const Args& a, IssueCursor& c, SmemAddr dst, SmemAddr beta_dst,
                                          unsigned step) {
#pragma unroll
  for (int k = 0; k < K; ++k) cp_async16(dst + k * step, c.src + k * step);
  if (a.beta_map != nullptr && threadIdx.x == 0) cp_async4(beta_dst, a.beta_map + c.map);
  // to the next map: within a batch element, or across its end (the steps are kernel parameters, not registers)
  const bool wrap = ++c.l == a.maps;
  c.src += wrap ? a.batch_step : a.map_step;
  if (wrap) c.l = 0;
  ++c.map;
}

// The V values of a 16-byte vector as floats; bfloat16 straight from the 32-bit words (a shift or a mask each).
template <typename T, int V>
__device__ __forceinline__ void unpack(const Vec<T, V>& x, float (&f)[V]) {
#pragma unroll
  for (int q = 0; q < V; ++q) f[q] = to_float(x.v[q]);
}
#ifndef DECAFA_EMULATION
template <>
__device__ __forceinline__ void unpack(const Vec<__nv_bfloat16, 8>& x, float (&f)[8]) {
  const uint4 w = *reinterpret_cast<const uint4*>(&x);
  const unsigned u[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = __uint_as_float(u[i] << 16);
    f[2 * i + 1] = __uint_as_float(u[i] & 0xffff0000u);
  }
}
#endif

// The forward's block reductions take their scratch with the slots of absent warps (blockDim.x < 1024) filled
// once at the kernel's start: 0 for the sums, INT_MIN for the max, so that no lane tests its warp index per map.
// The block's maximum of a value no thread holds as NaN, one barrier (as ring_block_max); `bits` is __shared__
// int[32].
__device__ __forceinline__ float ring_block_max_filled(float v, int* bits) {
  const int lane = threadIdx.x & 31;
  const int m = __reduce_max_sync(0xffffffffu, ordered_bits(v));
  if (lane == 0) bits[threadIdx.x >> 5] = m;
  __syncthreads();
  return from_ordered_bits(__reduce_max_sync(0xffffffffu, bits[lane]));
}

// The block's sums of four values, one barrier: lane l of every warp ends with the block's total of value l >> 3.
// `scratch` is __shared__ float[4 * 32], value q of warp w at 32 q + w, so that lane l finds the four warp totals
// it adds at 4 l (one 16-byte read), and three butterfly steps finish (instead of a second four-value
// reduce-scatter and three broadcasts). The order of the additions is fixed (deterministic).
__device__ __forceinline__ float ring_block_sum4_lanes(float a0, float a1, float a2, float a3, float* scratch,
                                                       int slot) {
  const float k = warp_sum4(a0, a1, a2, a3);
  scratch[slot] = k;  // slot = 32 (lane >> 3) + warp (the 8 lanes of a value write the same bits: no test)
  __syncthreads();
  const float4 w = *reinterpret_cast<const float4*>(scratch + 4 * (threadIdx.x & 31));
  float s = (w.x + w.y) + (w.z + w.w);
  s += __shfl_xor_sync(0xffffffffu, s, 4);
  s += __shfl_xor_sync(0xffffffffu, s, 2);
  s += __shfl_xor_sync(0xffffffffu, s, 1);
  return s;
}

constexpr int kRingGroup = 8;  // maps whose stats and z wait in shared memory, written together

// Every thread holds K whole 16-byte vectors of each map (the launcher makes H * W = 16 * blockDim.x), so no
// bounds test anywhere in the loop.
// The copies and the reads split a map differently: a thread reads vectors thread + k * blockDim.x (its pixels
// lie in one column, which gives the moments cheaply), but copies the vectors 32 K warp + 32 k + lane, so that
// its K copies of a map sit 512 bytes apart in global and in shared memory (immediate offsets: one pointer and one
// shared address per map; a warp's copy still covers 512 contiguous bytes). The barrier after each wait makes
// the other threads' copies visible.
// Per map, only the arithmetic on the logits, the two block reductions and the copy issue stay in the loop:
// the stats and z go to a shared-memory buffer (every thread writes its lane's reduced value, and the max) and
// are written out once per group of kRingGroup maps by as many threads; a tensor beta is read per group.
template <typename T, bool RawMax, bool Phi>
__global__ void __launch_bounds__(kRingThreads) maps_forward_ring(RingArgs<T> a) {
  constexpr int V = static_cast<int>(16 / sizeof(T));
  constexpr int K = kRingValues / V;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  // (one object: one shared address to form, the rest immediate offsets)
  __shared__ struct alignas(16) {
    float sum_scratch[4 * 32];
    // per map of the group: sum, max, sum e col, raw max, sum e row, -, 0, - (lane l writes its value at 2 (l >> 3))
    float out_buf[kRingGroup][8];
    int max_bits[32];
    float beta_buf[kRingGroup];
  } sh;
  const int64_t start = ring_start(blockIdx.x, a.total, a.ctas);
  const int count = static_cast<int>(ring_start(blockIdx.x + 1, a.total, a.ctas) - start);
  const int stages = a.stages;
  const unsigned step = 16u * blockDim.x;
  const int lane = static_cast<int>(threadIdx.x & 31), warp = static_cast<int>(threadIdx.x >> 5);
  const int num_warps = static_cast<int>(blockDim.x >> 5);
  for (int i = threadIdx.x; i < 4 * 32; i += blockDim.x)
    if ((i & 31) >= num_warps) sh.sum_scratch[i] = 0.f;
  if (threadIdx.x < 32 && lane >= num_warps) sh.max_bits[lane] = INT_MIN;
  // (visible after the first map's barrier)

  // This thread's vectors i = thread + k * blockDim.x: vector k is H / K rows below vector 0 in the same column
  // (blockDim.x * V = H * W / K pixels, whole rows: the launcher requires K to divide H), so the thread's column
  // and first row are found once for every map, and a map's moments need only sums over k.
  const int p0 = static_cast<int>(threadIdx.x) * V;
  const float row0 = static_cast<float>(p0 / a.width);
  const float col0 = static_cast<float>(p0 - (p0 / a.width) * a.width);
  const float row_step = static_cast<float>(a.hw / a.width / K);

  // The copy cursor: this thread's first copy of the next map to issue; the range's maps from `wrap` on belong to
  // its second batch element (batch_step instead of map_step to get there: map_step, then the difference).
  const unsigned copy_off = 16u * static_cast<unsigned>(warp * 32 * K + lane);
  const int64_t b0 = start / a.maps;
  const int wrap = static_cast<int>(i64_min(count, (b0 + 1) * a.maps - start));
  const char* src = reinterpret_cast<const char*>(a.logits + b0 * a.ts.batch +
                                                  (start - b0 * a.maps) * a.ts.channel) + copy_off;
  const SmemAddr copy_base = smem_address(smem_raw) + copy_off;
  const unsigned mine = 16u * threadIdx.x;
  // copies map n (of the range) into the stage at byte `stage_off`; the cursor moves to map n + 1
  auto issue = [&](bool last_of_first, unsigned stage_off, bool in_range) {
    const SmemAddr dst = copy_base + stage_off;
    if (in_range) {
#pragma unroll
      for (int k = 0; k < K; ++k) cp_async16(dst + 512 * k, src + 512 * k);
    }
    src += a.map_step;  // (past the range's end too: never read)
    if (last_of_first) src += a.batch_step - a.map_step;
  };

  // Prologue: maps 0 .. stages - 1 of the range in flight (every stage). One group per map (empty past the range),
  // each after kRingMaxStages - stages empty ones, so that waiting for all but the newest kRingMaxStages - 1 groups
  // always means: the current map has landed (the stages - 1 maps after it may not have).
  const unsigned ring_bytes = a.ring_bytes;
  // the loop's issue at map j is map j + stages: in the range below issue_end, the last of the first batch
  // element at wrap_issue
  const int issue_end = count - stages, wrap_issue = wrap - 1 - stages;
  for (int j = 0; j < stages; ++j) {
    commit_padding(stages);
    issue(j + 1 == wrap, static_cast<unsigned>(j) * a.stage_bytes, j < count);
    cp_async_commit();
  }

  float mask[K][V];
#pragma unroll
  for (int k = 0; k < K; ++k)
#pragma unroll
    for (int q = 0; q < V; ++q) mask[k][q] = 0.f;
  unsigned stage_off = 0;  // the current map's stage
  const int sum_slot = 32 * (lane >> 3) + warp;
  const int out_col = 2 * (lane >> 3);
  int j = 0;
  // the range's part of each batch element it touches (at most two: plane 0, then plane 1)
  for (int plane = 0; j < count; ++plane) {
    const int part_end = plane == 0 ? wrap : count;
    while (j < part_end) {
      const int g0 = j;
      const int group_end = j + kRingGroup < part_end ? j + kRingGroup : part_end;
      if constexpr (!RawMax) {  // the group's betas (the previous group's reads are behind its last barrier)
        if (static_cast<int>(threadIdx.x) < group_end - g0)
          sh.beta_buf[threadIdx.x] = a.beta_map != nullptr ? load1(a.beta_map + start + j + threadIdx.x) : a.beta;
        __syncthreads();
      }
      for (; j < group_end; ++j) {
        cp_async_wait(kRingMaxStages - 1);
        __syncthreads();  // every thread's copies of map j have landed

        const int slot = j - g0;
        const float beta = RawMax ? a.beta : sh.beta_buf[slot];
        // (the block-uniform part of the address first, this thread's offset last)
        const unsigned char* stage_ptr = smem_raw + stage_off;
        // exp(s - max) = exp2(t * k2 - max log2 e): k2 = beta log2 e on raw logits, log2 e on s; the shift from
        // the saved max alone, so that a backward recomputes the same bits from the stats.
        float v[K][V];
        float mx, smax, k2, shift;
        // The general path reads an overflow map (max of s +-inf) again, with the sign of beta in place of beta
        // (the limit softmax, common.cuh): v = +-t, whose max is +-c, c the extreme logit in the direction of
        // beta; then |b| = overflow_scale(1, c) (b = overflow_scale(beta, c)) makes v |b| - |b| max = b (t - c)
        // exact, as on raw logits: exp2 of it is exactly 1 at c and 0 elsewhere (NaN with a NaN logit, or where
        // the limit does not exist).
        for (int pass = 0;; ++pass) {
          const float factor = pass == 0 ? beta : (beta < 0.f ? -1.f : 1.f);
#pragma unroll
          for (int k = 0; k < K; ++k) {
            const Vec<T, V> x = *reinterpret_cast<const Vec<T, V>*>(stage_ptr + k * step + mine);
            float t[V];
            unpack(x, t);
#pragma unroll
            for (int q = 0; q < V; ++q) {
              v[k][q] = RawMax ? t[q] : scaled_logit(factor, t[q]);
              mx = k == 0 && q == 0 ? v[k][q] : fmaxf(mx, v[k][q]);
            }
          }
          mx = ring_block_max_filled(mx, sh.max_bits);
          if (pass == 0) smax = RawMax ? scaled_logit(beta, mx) : mx;
          if (RawMax || pass == 1 || !overflowed(smax)) break;
          __syncthreads();  // every thread has read the max's scratch before the second pass writes it
        }
        if (!overflowed(smax)) {
          k2 = RawMax ? beta * kLog2e : kLog2e;
          shift = smax * kLog2e;
        } else {  // mx: c on raw logits (beta > 0), +-c on the general path's second pass
          // (the limit exists where c and beta are finite; beta = 0 never gets here: s is then 0 or NaN)
          const bool exists = RawMax ? fabsf(mx) < INFINITY : fmaxf(fabsf(mx), fabsf(beta)) < INFINITY;
          k2 = exists ? overflow_scale(1.f, mx) : NAN;
          shift = k2 * mx;
        }
        if constexpr (RawMax) sh.out_buf[slot][3] = mx;  // the raw max, for the stats' sum (stats_sum)
        // per thread: S = sum e, X = sum q e (q: the element in its vector), R = sum k e (k: the vector); then
        // sum e col = col0 S + X and sum e row = row0 S + row_step R
        float sum_e = 0.f, sum_qe = 0.f, sum_ke = 0.f;
#pragma unroll
        for (int k = 0; k < K; ++k) {
          float vs, wx;  // sum of the vector's e, sum of q * e_q
#pragma unroll
          for (int q = 0; q < V; ++q) {
            const float e = fast_exp2(fmaf(v[k][q], k2, -shift));
            v[k][q] = e;
            if (q == 0) {
              vs = e;
            } else {
              vs += e;
              wx = q == 1 ? e : fmaf(static_cast<float>(q), e, wx);
            }
          }
          sum_e = k == 0 ? vs : sum_e + vs;
          sum_qe = k == 0 ? wx : sum_qe + wx;
          if (k > 0) sum_ke = k == 1 ? vs : fmaf(static_cast<float>(k), vs, sum_ke);
        }
        // lane l: the block's total of value l >> 3 (sum e, sum e col, sum e row, 0)
        const float tot = ring_block_sum4_lanes(sum_e, fmaf(col0, sum_e, sum_qe),
                                                fmaf(row0, sum_e, row_step * sum_ke), 0.f, sh.sum_scratch, sum_slot);
        const float sum = __shfl_sync(0xffffffffu, tot, 0);
        // every thread writes its lane's value (the same in every warp, bit for bit: the same additions)
        sh.out_buf[slot][out_col] = tot;
        sh.out_buf[slot][1] = smax;
        const float inv = 1.f / sum;
#pragma unroll
        for (int k = 0; k < K; ++k) {
          if constexpr (Phi) {
            float p[V];
#pragma unroll
            for (int q = 0; q < V; ++q) {
              p[q] = v[k][q] * inv;
              mask[k][q] += p[q];
            }
            const int i = static_cast<int>(threadIdx.x) + k * static_cast<int>(blockDim.x);
            store_n<true, V>(a.phi + (start + j) * a.hw + static_cast<int64_t>(i) * V, 1, p);
          } else {
#pragma unroll
            for (int q = 0; q < V; ++q) mask[k][q] = fmaf(v[k][q], inv, mask[k][q]);
          }
        }
        // Refill this map's stage with the map `stages` ahead: every thread read it before the barrier of the sums.
        // (Padding first, as in the prologue.)
        commit_padding(stages);
        issue(j == wrap_issue, stage_off, j < issue_end);
        cp_async_commit();
        stage_off += a.stage_bytes;
        if (stage_off == ring_bytes) stage_off = 0;
      }
      // the group's stats and z, one map a thread
      __syncthreads();  // the group's buffer is written (and read no more by the maps, for the betas)
      if (static_cast<int>(threadIdx.x) < group_end - g0) {
        const int64_t map = start + g0 + threadIdx.x;
        const float* o = sh.out_buf[threadIdx.x];
        const float sum = o[0];
        store1(a.stats + 2 * map, o[1]);
        store1(a.stats + 2 * map + 1, stats_sum<RawMax>(sum, o[1], o[3], a.beta));
        if (a.z != nullptr) {
          store1(a.z + 2 * map, a.co.ox + a.co.kx * (o[2] / sum));
          store1(a.z + 2 * map + 1, a.co.oy + a.co.ky * (o[4] / sum));
        }
      }
    }
    // the partial mask of this batch element's part
    if (a.partial != nullptr) {
      float* out = a.partial + (2 * static_cast<int64_t>(blockIdx.x) + plane) * a.hw;
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int i = static_cast<int>(threadIdx.x) + k * static_cast<int>(blockDim.x);
        store_n<false, V>(out + static_cast<int64_t>(i) * V, 1, mask[k]);
#pragma unroll
        for (int q = 0; q < V; ++q) mask[k][q] = 0.f;
      }
    }
  }
  cp_async_wait(0);  // no copy may outlive the CTA's shared memory
}

template <typename Kernel>
cudaError_t allow_ring_smem(Kernel kernel, size_t smem) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
}

// The ring's grid: the SMs (one CTA each: the stages take the shared memory), times enough to give every CTA at
// most L maps (ctas >= B: at most two batch elements per range), never more CTAs than maps.
int64_t ring_ctas(MapShape shape, const DeviceInfo& dev) {
  const int64_t sms = dev.sm_count > 0 ? dev.sm_count : 1;
  int64_t ctas = sms * ceil_div(shape.batch, sms);
  const int64_t total = shape.batch * shape.maps;
  return ctas < total ? ctas : total;
}

// Stages of `map_bytes` each that fit the device's shared memory per block (1 KiB left for the static part).
int ring_stages(int64_t map_bytes, const DeviceInfo& dev) {
  const int64_t fit = (static_cast<int64_t>(dev.smem_optin) - 1024) / map_bytes;
  return static_cast<int>(fit < kRingMaxStages ? fit : kRingMaxStages);
}

// The ring's launch for T at this shape, or plan.ok = false where the ring does not cover the case (whole
// tiles: 16 values a thread, threads a multiple of 32, so H * W a multiple of 512; W a multiple of the vector V
// and H of 16 / V; NCHW maps with vector-aligned strides and base; two stages of shared memory).
struct RingPlan {
  bool ok = false;
  int stages = 0, ctas = 0, threads = 0;
  int64_t map_bytes = 0, total = 0;
};

template <typename T>
cudaError_t ring_plan(MapShape shape, const Logits& lg, RingPlan* plan) {
  constexpr int V = static_cast<int>(16 / sizeof(T));
  const int64_t hw = static_cast<int64_t>(shape.height) * shape.width;
  *plan = RingPlan{};
  if (hw > kRingPixels || hw % (kRingValues * 32) != 0 || shape.width % V != 0 ||
      shape.height % (kRingValues / V) != 0 || lg.strides.pixel != 1 || lg.strides.channel % V != 0 ||
      lg.strides.batch % V != 0 || !aligned(lg.data, 16))
    return cudaSuccess;
  DeviceInfo dev;
  const cudaError_t err = device_info(&dev);
  if (err != cudaSuccess) return err;
  plan->map_bytes = hw * static_cast<int64_t>(sizeof(T));
  plan->stages = ring_stages(plan->map_bytes, dev);
  const int64_t ctas = ring_ctas(shape, dev);
  plan->total = shape.batch * shape.maps;
  if (plan->stages < 2 || ctas > INT_MAX || ctas > (INT64_MAX / 2) / (plan->total + 1)) return cudaSuccess;
  plan->ctas = static_cast<int>(ctas);
  plan->threads = static_cast<int>(hw / kRingValues);
  plan->ok = true;
  return cudaSuccess;
}

// Bytes from map (b, l) to (b, l + 1), and from (b, L - 1) to (b + 1, 0).
template <typename T>
int64_t map_step(const Logits& lg, MapShape) {
  return static_cast<int64_t>(sizeof(T)) * lg.strides.channel;
}
template <typename T>
int64_t batch_step(const Logits& lg, MapShape shape) {
  return static_cast<int64_t>(sizeof(T)) * (lg.strides.batch - static_cast<int64_t>(shape.maps - 1) * lg.strides.channel);
}

// Raw logits in the exponent (max(beta t) = beta max t): a positive finite scalar beta.
// (k2 = beta log2 e must be finite too: a beta within a factor 1.44 of FLT_MAX takes the general path)
inline bool raw_max(const Logits& lg) {
  return lg.beta_map == nullptr && lg.beta > 0.f && std::isfinite(lg.beta * kLog2e);
}

template <typename T>
cudaError_t maps_forward_ring_t(MapShape shape, const Logits& lg, bool normalized, float* stats, T* z, T* phi,
                                float* partial, int* ctas_out, cudaStream_t stream) {
  *ctas_out = 0;
  RingPlan plan;
  cudaError_t err = ring_plan<T>(shape, lg, &plan);
  if (err != cudaSuccess || !plan.ok || !aligned(phi, 16) || !aligned(partial, 16)) return err;
  RingArgs<T> a{static_cast<const T*>(lg.data), lg.strides, lg.beta, lg.beta_map, shape.maps,
                shape.height * shape.width, shape.width, plan.total, map_step<T>(lg, shape), batch_step<T>(lg, shape),
                plan.ctas, plan.stages, static_cast<int>(plan.map_bytes),
                static_cast<unsigned>(plan.stages * plan.map_bytes), coords_for(shape.height, shape.width, normalized),
                stats, z, phi, partial};
  const size_t smem = static_cast<size_t>(plan.stages) * plan.map_bytes;
  const bool raw = raw_max(lg);
  const unsigned grid = static_cast<unsigned>(plan.ctas);
  const int threads = plan.threads;
  if (raw && phi != nullptr) {
    if ((err = allow_ring_smem(maps_forward_ring<T, true, true>, smem)) != cudaSuccess) return err;
    maps_forward_ring<T, true, true><<<grid, threads, smem, stream>>>(a);
  } else if (raw) {
    if ((err = allow_ring_smem(maps_forward_ring<T, true, false>, smem)) != cudaSuccess) return err;
    maps_forward_ring<T, true, false><<<grid, threads, smem, stream>>>(a);
  } else if (phi != nullptr) {
    if ((err = allow_ring_smem(maps_forward_ring<T, false, true>, smem)) != cudaSuccess) return err;
    maps_forward_ring<T, false, true><<<grid, threads, smem, stream>>>(a);
  } else {
    if ((err = allow_ring_smem(maps_forward_ring<T, false, false>, smem)) != cudaSuccess) return err;
    maps_forward_ring<T, false, false><<<grid, threads, smem, stream>>>(a);
  }
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  *ctas_out = plan.ctas;
  return cudaSuccess;
}

// ------------------------------------------------------------------------------------------------------------
// Backward over the ring, for a per-batch float32 gradient of Phi (the head's mask gradient, or none) and grad z:
//   Phi = exp2(s log2 e - shift) / (sum 2^d0) from the saved stats (max, sum), s = beta T in float32 and
//   shift = max log2 e, whose exponent at the max, d0 = fma(max, log2 e, -shift), the stats alone give (not so the
//   forward's exp2(T beta log2 e - shift) on raw logits, which would need the raw max: stats_sum); the
//   exponential once per logit; g_phi = gM + grad_z . coord; S = sum Phi g_phi; g_s = Phi (g_phi - S);
//   grad T = beta g_s (streamed out); grad beta = sum T g_s, reduced together with the next map's S (one
//   reduction round per map). gM of the current batch element is held in registers (read once per element of
//   the range); T is read from the stage twice (the stage is refilled only after the next map's first barrier).
// ------------------------------------------------------------------------------------------------------------
template <typename T>
struct RingBackArgs {
  const T* logits;
  Strides ts;
  float beta;
  const float* beta_map;
  const float* stats;
  const float* grad_mask;  // (B, hw) float32, or null
  const T* grad_z;         // (B, L, 2), or null
  T* grad_logits;          // NCHW contiguous
  float* grad_beta;
  int maps, hw, width;
  int64_t total;
  int64_t map_step, batch_step;  // as in RingArgs
  int ctas, stages, stage_bytes;
  Coords co;
};

// Per-map constants of the backward, copied by thread 0 into the map's slot with the map's logits.
struct alignas(16) RingMapConsts {
  float mx, sum, beta, pad;
  float gz[2];  // float32 grad z (T = float), or two 16-bit values in gz[0]
  float pad2[2];
};

// The backward of the range's overflow maps (saved max +-inf with a finite k: the limit softmax, common.cuh),
// after the map loop, from memory: per map, c (the extreme logit in the direction of beta) by one reduction,
// Phi = [T == c] / k, then the usual g_s = Phi (g_phi - S), grad T = beta g_s, grad beta = sum T g_s.
template <typename T, int K, int V>
__device__ __forceinline__ void ring_overflow_backward(const RingBackArgs<T>& a, int64_t start, int count, float col0,
                                                       float row0, float row_step, float* scratch) {
  __shared__ float sum_scratch[33][1];
  for (int j = 0; j < count; ++j) {
    const int64_t map = start + j;
    const float mx = load1(a.stats + 2 * map), k = load1(a.stats + 2 * map + 1);
    if (!overflowed(mx, k)) continue;  // (the same for every thread: the same loads)
    const int64_t b = map / a.maps;
    const int l = static_cast<int>(map - b * a.maps);
    const float beta = a.beta_map != nullptr ? load1(a.beta_map + map) : a.beta;
    const float sign = beta < 0.f ? -1.f : 1.f;
    const T* src = a.logits + b * a.ts.batch + static_cast<int64_t>(l) * a.ts.channel;
    // (T and the mask gradient are read from memory in each sweep: nothing is held beside the loop's registers)
    float cand = -INFINITY;
#pragma unroll 1
    for (int kk = 0; kk < K; ++kk) {
      float t[V];
      load_n<false, V>(src + (static_cast<int64_t>(threadIdx.x) + kk * blockDim.x) * V, 1, t);
#pragma unroll
      for (int q = 0; q < V; ++q) cand = fmaxf(cand, sign * t[q]);
    }
    __syncthreads();  // the scratch's last readers are done
    const float c = sign * ring_block_max(cand, scratch);
    const float gzx = a.grad_z != nullptr ? load1(a.grad_z + 2 * map) : 0.f;
    const float gzy = a.grad_z != nullptr ? load1(a.grad_z + 2 * map + 1) : 0.f;
    const float gx0 = gzx * (a.co.ox + a.co.kx * col0), gxq = gzx * a.co.kx;
    const float gzy0 = gzy * (a.co.oy + a.co.ky * row0), gyk = gzy * a.co.ky * row_step;
    // Phi (exactly 1 / k at c, 0 elsewhere; NaN where c is not finite) and g_phi at element q of vector kk
    auto phi_and_g = [&](int kk, float (&t)[V], float (&p)[V], float (&g)[V]) {
      const int64_t i = static_cast<int64_t>(threadIdx.x) + kk * blockDim.x;
      load_n<false, V>(src + i * V, 1, t);
      if (a.grad_mask != nullptr) {
        load_n<false, V>(a.grad_mask + b * a.hw + i * V, 1, g);
      } else {
#pragma unroll
        for (int q = 0; q < V; ++q) g[q] = 0.f;
      }
#pragma unroll
      for (int q = 0; q < V; ++q) {
        p[q] = fabsf(c) < INFINITY ? (t[q] == c ? 1.f : 0.f) / k : NAN;
        g[q] += gx0 + gzy0 + gxq * static_cast<float>(q) + gyk * static_cast<float>(kk);
      }
    };
    float acc[1] = {0.f};
#pragma unroll 1
    for (int kk = 0; kk < K; ++kk) {
      float t[V], p[V], g[V];
      phi_and_g(kk, t, p, g);
#pragma unroll
      for (int q = 0; q < V; ++q) acc[0] = fmaf(p[q], g[q], acc[0]);
    }
    block_sum<1>(acc, sum_scratch);
    const float S = acc[0];
    float gb[1] = {0.f};
    T* dst = a.grad_logits + map * a.hw;
#pragma unroll 1
    for (int kk = 0; kk < K; ++kk) {
      float t[V], p[V], g[V], out[V];
      phi_and_g(kk, t, p, g);
#pragma unroll
      for (int q = 0; q < V; ++q) {
        const float gs = p[q] * (g[q] - S);
        gb[0] = fmaf(t[q], gs, gb[0]);
        out[q] = beta * gs;
      }
      store_n<true, V>(dst + (static_cast<int64_t>(threadIdx.x) + kk * blockDim.x) * V, 1, out);
    }
    block_sum<1>(gb, sum_scratch);
    if (threadIdx.x == 0) store1(a.grad_beta + map, gb[0]);
  }
}

template <typename T>
__global__ void __launch_bounds__(kRingThreads) maps_backward_ring(RingBackArgs<T> a) {
  constexpr int V = static_cast<int>(16 / sizeof(T));
  constexpr int K = kRingValues / V;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __align__(16) __shared__ float sum_scratch[32][4];
  __shared__ RingMapConsts consts[kRingMaxStages];
  const int64_t start = ring_start(blockIdx.x, a.total, a.ctas);
  const int count = static_cast<int>(ring_start(blockIdx.x + 1, a.total, a.ctas) - start);
  const int stages = a.stages;
  const unsigned mine = 16u * threadIdx.x, step = 16u * blockDim.x;
  const SmemAddr ring_base = smem_address(smem_raw) + mine, consts_base = smem_address(consts);
  const int p0 = static_cast<int>(threadIdx.x) * V;
  const float row0 = static_cast<float>(p0 / a.width);
  const float col0 = static_cast<float>(p0 - (p0 / a.width) * a.width);
  const float row_step = static_cast<float>(a.hw / a.width / K);

  // thread 0 also copies the map's stats, beta and grad z into the stage's constants
  auto issue = [&](IssueCursor& c, int st) {
    const int64_t map = c.map;
    if (threadIdx.x == 0) {
      const SmemAddr slot = consts_base + st * static_cast<unsigned>(sizeof(RingMapConsts));
      cp_async4(slot, a.stats + 2 * map);
      cp_async4(slot + 4, a.stats + 2 * map + 1);
      if (a.grad_z != nullptr) {
        cp_async4(slot + 16, a.grad_z + 2 * map);
        if (sizeof(T) == 4) cp_async4(slot + 20, a.grad_z + 2 * map + 1);
      }
    }
    // the logits, and beta_map into slot + 8
    issue_map<T, K>(a, c, ring_base + st * a.stage_bytes, consts_base + st * sizeof(RingMapConsts) + 8, step);
  };

  IssueCursor next = first_map(a, start, mine);
  int istage = 0;
  for (int j = 0; j < stages - 1; ++j) {
    if (j < count) issue(next, istage);
    cp_async_commit();
    commit_padding(stages);
    istage = istage + 1 == stages ? 0 : istage + 1;
  }

  float gm[K][V];  // the current batch element's mask gradient
  int64_t b = start / a.maps;
  int l = static_cast<int>(start - b * a.maps);
  int stage = 0;
  float gb_prev = 0.f;  // this thread's part of the previous map's grad beta (map - 1), reduced with this map's S
  for (int j = 0; j < count; ++j) {
    // (padding after each map: the newest kRingMaxStages - 2 groups are then the stages - 2 maps after map j)
    cp_async_wait(kRingMaxStages - 2);
    __syncthreads();  // map j has landed; every thread is done with map j - 1 (its stage may be refilled)
    if (j + stages - 1 < count) issue(next, istage);
    cp_async_commit();
    commit_padding(stages);
    istage = istage + 1 == stages ? 0 : istage + 1;
    if (j == 0 || l == 0) {  // a new batch element: its mask gradient
#pragma unroll
      for (int k = 0; k < K; ++k) {
        const int i = static_cast<int>(threadIdx.x) + k * static_cast<int>(blockDim.x);
        if (a.grad_mask != nullptr) {
          load_n<false, V>(a.grad_mask + b * a.hw + static_cast<int64_t>(i) * V, 1, gm[k]);
        } else {
#pragma unroll
          for (int q = 0; q < V; ++q) gm[k][q] = 0.f;
        }
      }
    }
    const int64_t map = b * a.maps + l;
    const RingMapConsts& c = consts[stage];
    const float beta = a.beta_map != nullptr ? c.beta : a.beta;
    const float shift = c.mx * kLog2e;
    const float inv = 1.f / (c.sum * fast_exp2(fmaf(c.mx, kLog2e, -shift)));
    float gzx = 0.f, gzy = 0.f;
    if (a.grad_z != nullptr) {
      if constexpr (sizeof(T) == 4) {
        gzx = c.gz[0];
        gzy = c.gz[1];
      } else {
        const T* g = reinterpret_cast<const T*>(&c.gz[0]);
        gzx = to_float(g[0]);
        gzy = to_float(g[1]);
      }
    }
    // g_phi = gM + gx0 + gxq q + gyk k at element q of vector k
    const float gxq = gzx * a.co.kx;
    const float gbase = gzx * (a.co.ox + a.co.kx * col0) + gzy * (a.co.oy + a.co.ky * row0);
    const float gyk = gzy * a.co.ky * row_step;
    const unsigned char* mine_in_stage = smem_raw + stage * a.stage_bytes + mine;
    float ph[K][V];
    float acc = 0.f;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const Vec<T, V> x = *reinterpret_cast<const Vec<T, V>*>(mine_in_stage + k * step);
      const float gk = fmaf(static_cast<float>(k), gyk, gbase);
      float t[V];
      unpack(x, t);
#pragma unroll
      for (int q = 0; q < V; ++q) {
        ph[k][q] = fast_exp2(fmaf(scaled_logit(beta, t[q]), kLog2e, -shift)) * inv;
        acc = fmaf(ph[k][q], gm[k][q] + fmaf(static_cast<float>(q), gxq, gk), acc);
      }
    }
    float red[4] = {acc, gb_prev, 0.f, 0.f};
    ring_block_sum4(red, sum_scratch);
    const float S = red[0];
    if (threadIdx.x == 0 && j > 0) store1(a.grad_beta + map - 1, red[1]);
    float gb = 0.f;
    T* dst = a.grad_logits + map * a.hw;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const Vec<T, V> x = *reinterpret_cast<const Vec<T, V>*>(mine_in_stage + k * step);
      const float gk = fmaf(static_cast<float>(k), gyk, gbase);
      float out[V], t[V];
      unpack(x, t);
#pragma unroll
      for (int q = 0; q < V; ++q) {
        const float gs = ph[k][q] * (gm[k][q] + fmaf(static_cast<float>(q), gxq, gk) - S);
        gb = fmaf(t[q], gs, gb);
        out[q] = beta * gs;
      }
      const int i = static_cast<int>(threadIdx.x) + k * static_cast<int>(blockDim.x);
      store_n<true, V>(dst + static_cast<int64_t>(i) * V, 1, out);
    }
    gb_prev = gb;
    stage = stage + 1 == stages ? 0 : stage + 1;
    if (++l == a.maps) l = 0, ++b;
  }
  if (count > 0) {  // the last map's grad beta
    float red[4] = {gb_prev, 0.f, 0.f, 0.f};
    ring_block_sum4(red, sum_scratch);
    if (threadIdx.x == 0) store1(a.grad_beta + start + count - 1, red[0]);
  }
  cp_async_wait(0);
}

// Overflow maps (saved max +-inf with a finite k) in the ring backward: maps_backward_ring gives them NaN (its
// exponent has no case for them, so that its map loop keeps neither code nor registers for them), and this
// launch, queued after it over the same ranges, writes their grad T and grad beta: a CTA whose range holds none
// (one parallel look at its stats) returns at once.
template <typename T>
__global__ void __launch_bounds__(kRingThreads) maps_backward_ring_overflow(RingBackArgs<T> a) {
  constexpr int V = static_cast<int>(16 / sizeof(T));
  constexpr int K = kRingValues / V;
  __shared__ float max_scratch[32];
  const int64_t start = ring_start(blockIdx.x, a.total, a.ctas);
  const int count = static_cast<int>(ring_start(blockIdx.x + 1, a.total, a.ctas) - start);
  bool any = false;
  for (int j = threadIdx.x; j < count; j += blockDim.x)
    any = any || overflowed(load1(a.stats + 2 * (start + j)), load1(a.stats + 2 * (start + j) + 1));
  if (!__syncthreads_or(any)) return;
  const int p0 = static_cast<int>(threadIdx.x) * V;
  const float row0 = static_cast<float>(p0 / a.width);
  const float col0 = static_cast<float>(p0 - (p0 / a.width) * a.width);
  const float row_step = static_cast<float>(a.hw / a.width / K);
  ring_overflow_backward<T, K, V>(a, start, count, col0, row0, row_step, max_scratch);
}

template <typename T>
cudaError_t maps_backward_ring_t(MapShape shape, const Logits& lg, const float* stats, bool normalized,
                                 const float* grad_mask, const T* grad_z, T* grad_logits, float* grad_beta, bool* done,
                                 cudaStream_t stream) {
  *done = false;
  RingPlan plan;
  cudaError_t err = ring_plan<T>(shape, lg, &plan);
  // (grad z is copied a map's pair at a time in 4 bytes: a 16-bit pair needs a 4-byte aligned base)
  if (err != cudaSuccess || !plan.ok || !aligned(grad_mask, 16) || !aligned(grad_logits, 16) || !aligned(grad_z, 4))
    return err;
  RingBackArgs<T> a{static_cast<const T*>(lg.data), lg.strides, lg.beta, lg.beta_map, stats, grad_mask, grad_z,
                    grad_logits, grad_beta, shape.maps, shape.height * shape.width, shape.width, plan.total,
                    map_step<T>(lg, shape), batch_step<T>(lg, shape), plan.ctas, plan.stages,
                    static_cast<int>(plan.map_bytes),
                    coords_for(shape.height, shape.width, normalized)};
  const size_t smem = static_cast<size_t>(plan.stages) * plan.map_bytes;
  const unsigned grid = static_cast<unsigned>(plan.ctas);
  if ((err = allow_ring_smem(maps_backward_ring<T>, smem)) != cudaSuccess) return err;
  maps_backward_ring<T><<<grid, plan.threads, smem, stream>>>(a);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  maps_backward_ring_overflow<T><<<grid, plan.threads, 0, stream>>>(a);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  *done = true;
  return cudaSuccess;
}

}  // namespace

size_t ring_forward_workspace_floats(MapShape shape, const DeviceInfo& dev) {
  const int64_t hw = static_cast<int64_t>(shape.height) * shape.width;
  if (!ring_selected() || hw > kRingPixels || shape.batch <= 0 || shape.maps <= 0) return 0;
  return static_cast<size_t>(2 * ring_ctas(shape, dev) * hw);
}

cudaError_t maps_forward_ring(DType dtype, MapShape shape, const Logits& logits, bool normalized, float* stats,
                              void* z, void* phi, float* partial, int* ctas, cudaStream_t stream) {
  DECAFA_DISPATCH(dtype, return maps_forward_ring_t<scalar_t>(shape, logits, normalized, stats,
                                                              static_cast<scalar_t*>(z), static_cast<scalar_t*>(phi),
                                                              partial, ctas, stream));
  return cudaSuccess;
}

cudaError_t maps_backward_ring(DType dtype, MapShape shape, const Logits& logits, const float* stats, bool normalized,
                               const float* grad_mask, const void* grad_z, void* grad_logits, float* grad_beta,
                               bool* done, cudaStream_t stream) {
  DECAFA_DISPATCH(dtype, return maps_backward_ring_t<scalar_t>(shape, logits, stats, normalized, grad_mask,
                                                               static_cast<const scalar_t*>(grad_z),
                                                               static_cast<scalar_t*>(grad_logits), grad_beta, done,
                                                               stream));
  return cudaSuccess;
}

}  // namespace detail
}  // namespace decafa_kernels
