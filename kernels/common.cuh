// Device helpers shared by the decafa kernels: dtype conversion, 128-bit vector loads/stores, warp and
// block reductions. Torch-free. Only the conversion intrinsics are used (never implicit __half/float
// conversions), so the code also builds with the __CUDA_NO_HALF_CONVERSIONS__ family of macros that
// PyTorch extensions define.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace decafa_kernels {
namespace detail {

// ---------------------------------------------------------------------------------------------
// float <-> storage type
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// ---------------------------------------------------------------------------------------------
// Vectors of V contiguous elements, loaded and stored as one access (16 bytes when
// V * sizeof(T) == 16). The caller guarantees the address is aligned to V * sizeof(T).
// ---------------------------------------------------------------------------------------------
template <typename T, int V>
struct alignas(sizeof(T) * V) Vec {
  T v[V];
};

// Every global-memory access of the kernels goes through the helpers below, so that the CPU emulation
// (kernels/smoke/cpu_emulation.h) can count the bytes each kernel loads and stores (DECAFA_COUNT_LOAD /
// DECAFA_COUNT_STORE; no-ops on the GPU). Shared memory is accessed directly.
#ifndef DECAFA_COUNT_LOAD
#define DECAFA_COUNT_LOAD(bytes) ((void)0)
#define DECAFA_COUNT_STORE(bytes) ((void)0)
#endif

template <int Bytes>
struct Bits;
template <>
struct Bits<16> {
  using type = uint4;
};
template <>
struct Bits<8> {
  using type = uint2;
};
template <>
struct Bits<4> {
  using type = unsigned int;
};
template <>
struct Bits<2> {
  using type = unsigned short;
};

// One access of V contiguous elements (V * sizeof(T) <= 16 bytes, aligned to it); `Stream` = evict-first
// (__ldcs / __stcs) for data touched once.
template <bool Stream, int V, typename T>
__device__ __forceinline__ Vec<T, V> load_one(const T* p) {
  using B = typename Bits<sizeof(T) * V>::type;
  static_assert(sizeof(B) == sizeof(Vec<T, V>), "vector size");
  DECAFA_COUNT_LOAD(sizeof(B));
  union {
    B bits;
    Vec<T, V> vec;
  } u;
  if constexpr (Stream) {
    u.bits = __ldcs(reinterpret_cast<const B*>(p));
  } else {
    u.bits = *reinterpret_cast<const B*>(p);
  }
  return u.vec;
}

template <bool Stream, int V, typename T>
__device__ __forceinline__ void store_one(T* p, const Vec<T, V>& x) {
  using B = typename Bits<sizeof(T) * V>::type;
  DECAFA_COUNT_STORE(sizeof(B));
  union {
    B bits;
    Vec<T, V> vec;
  } u;
  u.vec = x;
  if constexpr (Stream) {
    __stcs(reinterpret_cast<B*>(p), u.bits);
  } else {
    *reinterpret_cast<B*>(p) = u.bits;
  }
}

// N elements p[0], p[stride], ..., p[(N-1) stride] as floats. stride == 1: 16-byte vector accesses (the
// caller guarantees the alignment), else N scalar accesses.
template <bool Stream, int N, typename T>
__device__ __forceinline__ void load_n(const T* p, int64_t stride, float (&out)[N]) {
  constexpr int kChunk = (N * sizeof(T) > 16) ? static_cast<int>(16 / sizeof(T)) : N;
  if (N > 1 && stride == 1) {
#pragma unroll
    for (int c = 0; c < N; c += kChunk) {
      const Vec<T, kChunk> v = load_one<Stream, kChunk>(p + c);
#pragma unroll
      for (int j = 0; j < kChunk; ++j) out[c + j] = to_float(v.v[j]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) out[j] = to_float(load_one<Stream, 1>(p + j * stride).v[0]);
  }
}

template <bool Stream, int N, typename T>
__device__ __forceinline__ void store_n(T* p, int64_t stride, const float (&in)[N]) {
  constexpr int kChunk = (N * sizeof(T) > 16) ? static_cast<int>(16 / sizeof(T)) : N;
  if (N > 1 && stride == 1) {
#pragma unroll
    for (int c = 0; c < N; c += kChunk) {
      Vec<T, kChunk> v;
#pragma unroll
      for (int j = 0; j < kChunk; ++j) v.v[j] = from_float<T>(in[c + j]);
      store_one<Stream, kChunk>(p + c, v);
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      Vec<T, 1> v;
      v.v[0] = from_float<T>(in[j]);
      store_one<Stream, 1>(p + j * stride, v);
    }
  }
}

// One element as a float / from a float.
template <typename T>
__device__ __forceinline__ float load1(const T* p) {
  return to_float(load_one<false, 1>(p).v[0]);
}

template <typename T>
__device__ __forceinline__ void store1(T* p, float v) {
  Vec<T, 1> x;
  x.v[0] = from_float<T>(v);
  store_one<false, 1>(p, x);
}

// ---------------------------------------------------------------------------------------------
// Reductions. Fixed shuffle/tree order, no atomics: results are bitwise reproducible run to run.
// Block reductions need blockDim.x to be a multiple of 32 (at most 1024) and give every thread the total.
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sums each of the N values over the block. `scratch` is __shared__ float[33][N]; the same scratch
// may be reused by consecutive calls.
template <int N>
__device__ __forceinline__ void block_sum(float (&v)[N], float (*scratch)[N]) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int num_warps = blockDim.x >> 5;
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = warp_sum(v[i]);
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) scratch[warp][i] = v[i];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = warp_sum(lane < num_warps ? scratch[lane][i] : 0.f);
    if (lane == 0) {
#pragma unroll
      for (int i = 0; i < N; ++i) scratch[32][i] = v[i];
    }
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = scratch[32][i];
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// The two-level tree of the scalar block reductions: warp_op within each warp, the warp results through
// scratch[0..31], warp_op again in warp 0 (`identity` for the missing warps), the total through scratch[32]
// to every thread. `scratch` is __shared__ T[33]; consecutive calls may reuse it.
template <typename T, typename WarpOp>
__device__ __forceinline__ T block_reduce(T v, T* scratch, T identity, WarpOp warp_op) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int num_warps = blockDim.x >> 5;
  v = warp_op(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = warp_op(lane < num_warps ? scratch[lane] : identity);
    if (lane == 0) scratch[32] = v;
  }
  __syncthreads();
  return scratch[32];
}

// Maximum over the block (fmaxf: NaN is skipped here; a NaN still reaches the sums through its own exp).
// `scratch` is __shared__ float[33].
__device__ __forceinline__ float block_max(float v, float* scratch) {
  return block_reduce<float>(v, scratch, -INFINITY, [](float x) { return warp_max(x); });
}

// s = beta * T rounded to float32, the same in every pass. __fmul_rn is never fused into an FMA: nvcc contracts
// `beta * t - max` into fma(beta, t, -max) by default, which skips this rounding, so the backward's exp(s - max)
// at the pixel holding the max was exp(rounding error of beta * t) instead of the forward's exp(0) = 1 (a
// one-pixel map, Phi = 1, then got a gradient of ~1e-7 instead of 0).
__device__ __forceinline__ float scaled_logit(float beta, float t) { return __fmul_rn(beta, t); }

// Maps whose product with beta overflows float32 (the max of s = beta * T is +-inf) take the exact limit of
// the softmax: Phi = [T == c] / k, c the map's largest logit for beta > 0 (smallest for beta < 0), k the
// number of pixels at c; the map is NaN when c is not finite, the map holds a NaN, or beta is 0, NaN or
// infinite. The test is one scalar per map after the max (the per-logit loops are untouched); an overflow
// map saves the stats (s_max = +-inf, k), by which the backward recognises it (a finite k).
__device__ __forceinline__ bool overflowed(float smax) { return fabsf(smax) == INFINITY; }
__device__ __forceinline__ bool overflowed(float smax, float sum) {
  return fabsf(smax) == INFINITY && fabsf(sum) < INFINITY;
}

// Whether the limit exists for the map's extreme `cn` and beta.
__device__ __forceinline__ bool overflow_limit_exists(float cn, float beta) {
  return fabsf(cn) < INFINITY && fabsf(beta) < INFINITY && beta != 0.f;
}

// An overflow map's P from the usual exponential (the backward's, the streamed forward's): a scale b = +-2^e (the
// sign of beta) with |b c| in [2^40, 2^41) makes b T - b c exact, 0 at c, and below -2^16 at every other
// logit (finite logits differ from c (|c| >= 1 here, since beta is finite) by at least 2^(ilogb(c) - 24)), so
// exp(b T - b c) is exactly 1 at c and 0 elsewhere, and Phi = that / k.
// (From the bits: |c| in [2^E, 2^(E+1)), E in [0, 127], so b's biased exponent 127 + 40 - E is in [40, 167].)
__device__ __forceinline__ float overflow_scale(float beta, float c) {
  union {
    float f;
    uint32_t u;
  } cb{c}, bb{beta}, out;
  out.u = ((294u - ((cb.u >> 23) & 0xffu)) << 23) | (bb.u & 0x80000000u);
  return out.f;
}

// Running softmax statistics of a set of values a_p with pixel coordinates (col_p, row_p):
// m = max a, s = sum exp(a - m), sx = sum exp(a - m) col, sy = sum exp(a - m) row.
struct SoftStats {
  float m, s, sx, sy;
};

// exp(m_old - m_new) for m_old <= m_new; 1 when equal, so that two -inf (nothing seen yet) or two +inf
// maxima do not produce NaN here (a +inf logit still gives NaN through its own exp(a - m) term).
__device__ __forceinline__ float rescale(float m_old, float m_new) {
  return m_old == m_new ? 1.f : __expf(m_old - m_new);
}

__device__ __forceinline__ SoftStats merge(const SoftStats& a, const SoftStats& b) {
  const float m = fmaxf(a.m, b.m);
  const float fa = rescale(a.m, m);
  const float fb = rescale(b.m, m);
  return {m, a.s * fa + b.s * fb, a.sx * fa + b.sx * fb, a.sy * fa + b.sy * fb};
}

__device__ __forceinline__ SoftStats warp_merge(SoftStats v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    SoftStats o;
    o.m = __shfl_xor_sync(0xffffffffu, v.m, offset);
    o.s = __shfl_xor_sync(0xffffffffu, v.s, offset);
    o.sx = __shfl_xor_sync(0xffffffffu, v.sx, offset);
    o.sy = __shfl_xor_sync(0xffffffffu, v.sy, offset);
    v = merge(v, o);
  }
  return v;
}

// Block-wide merge of SoftStats; `scratch` is __shared__ SoftStats[33]. Every thread gets the total.
__device__ __forceinline__ SoftStats block_merge(SoftStats v, SoftStats* scratch) {
  return block_reduce<SoftStats>(v, scratch, SoftStats{-INFINITY, 0.f, 0.f, 0.f},
                                 [](SoftStats x) { return warp_merge(x); });
}

// Pixel p of a row-major map of width w: (col, row). Used once per vector; the elements of a vector
// then advance with next_pixel, wrapping at the row end (so any W works, W = 1 included).
__device__ __forceinline__ void pixel_of(int p, int w, int& col, int& row) {
  row = p / w;
  col = p - row * w;
}

__device__ __forceinline__ void next_pixel(int w, int& col, int& row) {
  if (++col == w) {
    col = 0;
    ++row;
  }
}

}  // namespace detail
}  // namespace decafa_kernels
