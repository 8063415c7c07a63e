// The per-map sweeps of the CPU kernels on raw pointers: the max of a map, its exp sums and moments, Phi,
// the mask accumulation, and the per-map backward; the at::parallel_for loops that call them live in
// attention.cpp and fusion.cpp, the exp in vexp.h, the ISA dispatch in isa.h, the fusion tiles in
// fusion_tiles.h.
//
// Every function works on contiguous data. `acc_t` is float for float/half/bfloat16 inputs and double for
// double. The inner loops are written so that the compiler vectorises them (`#pragma omp simd`); each kernel
// (DECAFA_ISA_DISPATCH) is compiled for AVX-512, AVX2 and the baseline ISA.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include <c10/util/BFloat16.h>

#include "isa.h"
#include "stream_store.h"
#include "vexp.h"

namespace decafa {
namespace cpu {

// acc_t -> storage dtype. c10's float-to-bfloat16 rounds with a NaN branch that keeps GCC from vectorising
// the store loops; bfloat16 takes the same rounding (to nearest even, NaN -> quiet NaN) written as a select.
template <typename scalar_t, typename acc_t>
DECAFA_INLINE scalar_t to_storage(acc_t v) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && std::is_same_v<acc_t, float>) {
    constexpr uint32_t kAbsMask = 0x7FFFFFFFu, kInfinity = 0x7F800000u;  // float32 bits
    constexpr uint32_t kHalfLowBits = 0x7FFFu;                             // one short of half the dropped bits
    constexpr uint32_t kQuietNaN = 0x7FC0u;                                // bfloat16 bits
    uint32_t u;
    std::memcpy(&u, &v, sizeof(u));
    const uint32_t rounded = (u + kHalfLowBits + ((u >> 16) & 1u)) >> 16;  // ties to the even bfloat16
    const uint32_t bits = (u & kAbsMask) > kInfinity ? kQuietNaN : rounded;
    return c10::BFloat16(static_cast<uint16_t>(bits), c10::BFloat16::from_bits());
  } else {
    return static_cast<scalar_t>(v);
  }
}

// Pixel coordinates along an axis of n pixels: 0..n-1, or linspace(-1, 1, n) when normalised (a one-pixel
// axis is its own centre, 0, as in kornia). Kept as a table so that the moment loops read coordinates
// instead of converting int64 indices (which does not vectorise before AVX-512).
template <typename acc_t>
std::vector<acc_t> axis_coordinates(int64_t n, bool normalized) {
  std::vector<acc_t> c(n);
  const acc_t step = normalized ? (n > 1 ? acc_t(2) / acc_t(n - 1) : acc_t(0)) : acc_t(1);
  const acc_t first = normalized && n > 1 ? acc_t(-1) : acc_t(0);
  for (int64_t i = 0; i < n; ++i) c[i] = first + step * acc_t(i);
  return c;
}

// s = beta * t rounded to acc_t, as the op contract says. The "+ 0" keeps the compiler from fusing the product
// into the subtraction that follows (an FMA skips the rounding of s: 3% off in Phi at |s| ~ 1e6); with FMA
// it is one fma(beta, t, 0), without it one more add. (-0 becomes +0: the same for max and exp.) kUnitBeta:
// beta is 1 (the default), s = t, the same value without the multiply.
template <bool kUnitBeta, typename scalar_t, typename acc_t>
DECAFA_INLINE acc_t scaled(scalar_t t, acc_t beta) {
  if constexpr (kUnitBeta) {
    return static_cast<acc_t>(t);
  } else {
    return beta * static_cast<acc_t>(t) + acc_t(0);
  }
}

template <bool kUnitBeta, typename scalar_t, typename acc_t>
DECAFA_INLINE acc_t scaled_max_of(const scalar_t* t, int64_t n, acc_t beta) {
  // four quarters of the map at once: four independent chains of max (one vector chain waits on the max's
  // latency at every step; with the map in cache, that, not the loads, bounded the sweep)
  const acc_t lowest = -std::numeric_limits<acc_t>::infinity();
  acc_t m0 = lowest, m1 = lowest, m2 = lowest, m3 = lowest;
  const int64_t q = n / 4;
#pragma omp simd reduction(max : m0, m1, m2, m3)
  for (int64_t i = 0; i < q; ++i) {
    const acc_t s0 = scaled<kUnitBeta>(t[i], beta), s1 = scaled<kUnitBeta>(t[q + i], beta);
    const acc_t s2 = scaled<kUnitBeta>(t[2 * q + i], beta), s3 = scaled<kUnitBeta>(t[3 * q + i], beta);
    m0 = s0 > m0 ? s0 : m0;
    m1 = s1 > m1 ? s1 : m1;
    m2 = s2 > m2 ? s2 : m2;
    m3 = s3 > m3 ? s3 : m3;
  }
  for (int64_t i = 4 * q; i < n; ++i) {
    const acc_t s = scaled<kUnitBeta>(t[i], beta);
    m0 = s > m0 ? s : m0;
  }
  m0 = m1 > m0 ? m1 : m0;
  m2 = m3 > m2 ? m3 : m2;
  const acc_t m = m2 > m0 ? m2 : m0;
  // OpenMP leaves the starting value of the reduction's per-lane copies to the compiler: GCC's is -inf,
  // clang's the lowest finite value, which a map of -inf (or NaN) would then return instead of -inf. Such a
  // result is rare, and rescanned in order.
  if (m != std::numeric_limits<acc_t>::lowest()) return m;
  acc_t exact = lowest;
  for (int64_t i = 0; i < n; ++i) {
    const acc_t s = scaled<kUnitBeta>(t[i], beta);
    exact = s > exact ? s : exact;
  }
  return exact;
}

// Largest of n > 0 16-bit floats (bfloat16 or float16), read as int16 without widening: 32 values per
// 512-bit integer max and min instead of 16 per float max after two widening operations (the max sweep of
// 16-bit logits is bound by those, not by the loads: `python bench/cpu_floor.py` times the ops). A
// sign-magnitude float read as int16 orders like its value when positive and in reverse when
// negative, so the largest value is the largest int16 when that is >= 0, else the smallest int16. False
// when the values hold a NaN that decides the answer: the float sweep, which skips NaN, then takes over,
// so that the result is the same in every case.
template <typename scalar_t>
DECAFA_INLINE bool max_of_16_bit(const scalar_t* t, int64_t n, float& out) {
  constexpr int16_t kInfinityBits = std::is_same_v<scalar_t, c10::BFloat16> ? 0x7F80 : 0x7C00;
  const int16_t* bits = reinterpret_cast<const int16_t*>(t);
  int16_t hi = std::numeric_limits<int16_t>::min(), lo = std::numeric_limits<int16_t>::max();
#pragma omp simd reduction(max : hi) reduction(min : lo)
  for (int64_t i = 0; i < n; ++i) {
    hi = bits[i] > hi ? bits[i] : hi;
    lo = bits[i] < lo ? bits[i] : lo;
  }
  // a positive NaN is above +inf; a negative one, -NaN, has the largest magnitude, so lo is one only when
  // every value is a negative NaN
  const int16_t kNegativeNaNAbove = static_cast<int16_t>(kInfinityBits - 0x8000);
  if (hi > kInfinityBits || (hi < 0 && lo > kNegativeNaNAbove)) return false;
  const int16_t largest = hi >= 0 ? hi : lo;
  scalar_t v;
  std::memcpy(&v, &largest, sizeof(v));
  out = static_cast<float>(v);
  return true;
}

// max of s = beta * t over n values: the first sweep of a map, which only reads it. For 16-bit logits and
// a positive finite beta, beta times the largest logit: rounding is monotonic, so that is the same value.
template <typename scalar_t, typename acc_t>
DECAFA_INLINE acc_t scaled_max_impl(const scalar_t* t, int64_t n, acc_t beta) {
  if constexpr (sizeof(scalar_t) == 2) {
    float largest;
    if (n > 0 && beta > acc_t(0) && beta < std::numeric_limits<acc_t>::infinity() && max_of_16_bit(t, n, largest)) {
      return beta == acc_t(1) ? largest : scaled<false>(largest, beta);
    }
  }
  return beta == acc_t(1) ? scaled_max_of<true>(t, n, beta) : scaled_max_of<false>(t, n, beta);
}
DECAFA_ISA_DISPATCH(scaled_max)

// e = exp(s - m): the one expression the forward and the backward both evaluate, so the same bits. The
// bfloat16 pair sweep passes logits it has widened to float itself, with the bfloat16 precision.
template <bool kUnitBeta, typename scalar_t, typename acc_t, ExpPrecision kPrecision = exp_precision_for<scalar_t>()>
DECAFA_INLINE acc_t shifted_exp(scalar_t t, acc_t beta, acc_t m) {
  return vexp<kPrecision>(scaled<kUnitBeta>(t, beta) - m);
}

// dst = scale * src, converted to the output dtype.
template <typename scalar_t, typename acc_t>
DECAFA_INLINE void store_scaled_impl(const acc_t* src, int64_t n, acc_t scale, scalar_t* dst) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = to_storage<scalar_t>(scale * src[i]);
}
DECAFA_ISA_DISPATCH(store_scaled)

// out[0, n) = sum over runs of partial[run * hw + p0 + i], added in run order (so M has the same bits
// whichever pixels a task sums).
template <typename acc_t>
DECAFA_INLINE void sum_partial_masks_impl(const acc_t* partial, int64_t runs, int64_t hw, int64_t p0, int64_t n,
                                          acc_t* out) {
  std::memcpy(out, partial + p0, n * sizeof(acc_t));
  for (int64_t run = 1; run < runs; ++run) {
    const acc_t* src = partial + run * hw + p0;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) out[i] += src[i];
  }
}
DECAFA_ISA_DISPATCH(sum_partial_masks)

// Maps whose Phi are added into a mask accumulator in one sweep (their e kept side by side in cache): the
// accumulator is read and written once per group instead of once per map.
constexpr int kMaskGroup = 4;

template <int K, typename acc_t>
DECAFA_INLINE void accumulate_group_of(const acc_t* e, int64_t n, const acc_t* scale, acc_t* dst) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    acc_t v = dst[i];
    for (int k = 0; k < K; ++k) v += scale[k] * e[k * n + i];
    dst[i] = v;
  }
}

// dst += sum over k < count of scale[k] * e[k * n : (k + 1) * n], k in order; count <= kMaskGroup.
template <typename acc_t>
DECAFA_INLINE void accumulate_group_impl(const acc_t* e, int64_t n, int count, const acc_t* scale, acc_t* dst) {
  switch (count) {
    case 1: return accumulate_group_of<1>(e, n, scale, dst);
    case 2: return accumulate_group_of<2>(e, n, scale, dst);
    case 3: return accumulate_group_of<3>(e, n, scale, dst);
    default: return accumulate_group_of<kMaskGroup>(e, n, scale, dst);
  }
}
DECAFA_ISA_DISPATCH(accumulate_group)

// Brings the W values at `row` into cache. The exp sweep of a map is bound by arithmetic, the max sweep of
// the next one by memory: prefetching the next map's rows during the exp sweep lets the two overlap. A
// prefetch never faults, so the row after the tensor's last map may be asked for.
constexpr int64_t kCacheLineBytes = 64;

template <typename scalar_t>
DECAFA_INLINE void prefetch_row(const scalar_t* row, int64_t W) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < W * static_cast<int64_t>(sizeof(scalar_t)); b += kCacheLineBytes) {
    __builtin_prefetch(bytes + b, /*read*/ 0, /*keep in all cache levels*/ 3);
  }
}

template <typename acc_t>
struct MapStats {
  acc_t sum, zx, zy;
};

// Widest map swept with per-column accumulators (stack arrays of this many acc_t).
constexpr int64_t kColumnSumsMax = 1024;

// kRows (1 or 2) rows of exp_rows' sweep starting at t (row coordinates y[0..kRows)): e stored when kStore,
// and added into the column accumulators, the rows' values summed first (so a pair of rows reads and writes
// the accumulators once).
template <int kRows, bool kUnitBeta, bool kMoments, bool kStore, typename scalar_t, typename acc_t>
DECAFA_INLINE void exp_rows_into(const scalar_t* t, int64_t W, acc_t beta, acc_t m, const acc_t* y, acc_t* e,
                                 acc_t* column_sums, acc_t* column_ys) {
  const scalar_t* t1 = kRows == 2 ? t + W : t;
  acc_t* e1 = kStore && kRows == 2 ? e + W : e;
  const acc_t y0 = kMoments ? y[0] : acc_t(0), y1 = kMoments && kRows == 2 ? y[1] : acc_t(0);
#pragma omp simd
  for (int64_t col = 0; col < W; ++col) {
    const acc_t v0 = shifted_exp<kUnitBeta>(t[col], beta, m);
    if constexpr (kStore) e[col] = v0;
    if constexpr (kRows == 2) {
      const acc_t v1 = shifted_exp<kUnitBeta>(t1[col], beta, m);
      if constexpr (kStore) e1[col] = v1;
      column_sums[col] += v0 + v1;
      if constexpr (kMoments) column_ys[col] += v0 * y0 + v1 * y1;
    } else {
      column_sums[col] += v0;
      if constexpr (kMoments) column_ys[col] += v0 * y0;
    }
  }
}

// The second sweep of a map, two rows at a time: e = exp(beta * t - m) (stored when kStore) is added into
// per-column accumulators, of e and, when kMoments, of e * y (the row's coordinate): a row ends without a
// horizontal sum (a 128-value row is 8 vectors, and a per-row sum cost a quarter of the sweep), and the x
// moment comes from the column sums once per map (one add per value instead of a multiply-add).
template <bool kUnitBeta, bool kMoments, bool kStore, typename scalar_t, typename acc_t>
DECAFA_INLINE MapStats<acc_t> exp_rows(const scalar_t* t, int64_t H, int64_t W, acc_t beta, acc_t m,
                                       const acc_t* xs, const acc_t* ys, acc_t* e) {
  acc_t column_sums[kColumnSumsMax], column_ys[kMoments ? kColumnSumsMax : 1];
  std::fill(column_sums, column_sums + W, acc_t(0));
  if constexpr (kMoments) std::fill(column_ys, column_ys + W, acc_t(0));
  int64_t row = 0;
  for (; row + 1 < H; row += 2) {
    prefetch_row(t + H * W + row * W, 2 * W);  // the next map: its max sweep then finds it in cache
    exp_rows_into<2, kUnitBeta, kMoments, kStore>(t + row * W, W, beta, m, ys + row, kStore ? e + row * W : nullptr,
                                                  column_sums, column_ys);
  }
  if (row < H) {
    prefetch_row(t + H * W + row * W, W);
    exp_rows_into<1, kUnitBeta, kMoments, kStore>(t + row * W, W, beta, m, ys + row, kStore ? e + row * W : nullptr,
                                                  column_sums, column_ys);
  }
  acc_t sum = 0, sx = 0, sy = 0;
#pragma omp simd reduction(+ : sum, sx, sy)
  for (int64_t col = 0; col < W; ++col) {
    sum += column_sums[col];
    if constexpr (kMoments) {
      sx += column_sums[col] * xs[col];
      sy += column_ys[col];
    }
  }
  return {sum, kMoments ? sx / sum : 0, kMoments ? sy / sum : 0};
}

// The same for maps wider than kColumnSumsMax: a sum per row.
template <bool kUnitBeta, bool kMoments, bool kStore, typename scalar_t, typename acc_t>
DECAFA_INLINE MapStats<acc_t> exp_rows_wide(const scalar_t* t, int64_t H, int64_t W, acc_t beta, acc_t m,
                                            const acc_t* xs, const acc_t* ys, acc_t* e) {
  acc_t sum = 0, sx = 0, sy = 0;
  for (int64_t row = 0; row < H; ++row) {
    const scalar_t* tr = t + row * W;
    acc_t* er = kStore ? e + row * W : nullptr;
    acc_t row_sum = 0, row_sx = 0;
#pragma omp simd reduction(+ : row_sum, row_sx)
    for (int64_t col = 0; col < W; ++col) {
      const acc_t v = shifted_exp<kUnitBeta>(tr[col], beta, m);
      if constexpr (kStore) er[col] = v;
      row_sum += v;
      if constexpr (kMoments) row_sx += v * xs[col];
    }
    sum += row_sum;
    sx += row_sx;
    sy += row_sum * ys[row];
  }
  return {sum, kMoments ? sx / sum : 0, kMoments ? sy / sum : 0};
}

// Two bfloat16 values from one 32-bit load (a bfloat16 is the high half of its float32): the even column's
// float is the word shifted left by 16, the odd column's the word with its low half cleared. Half the
// widening operations of one value at a time, which cost a quarter of a bfloat16 sweep.
#if defined(__GNUC__)
typedef uint32_t bf16_pair_t __attribute__((may_alias, aligned(2)));
DECAFA_INLINE uint32_t load_bf16_pair(const c10::BFloat16* t) { return *reinterpret_cast<const bf16_pair_t*>(t); }
#else
DECAFA_INLINE uint32_t load_bf16_pair(const c10::BFloat16* t) {
  uint32_t u;
  std::memcpy(&u, t, sizeof(u));
  return u;
}
#endif

// exp_rows for bfloat16 logits of an even width when e is not stored: a pair of columns per 32-bit load,
// with column accumulators for the even and the odd columns (the sums' order differs from exp_rows', so the
// last bits of the sums and moments do; each is still fixed by the shape). Storing e would need the pairs
// interleaved again, which costs what the loads save (measured: within 5% either way).
template <bool kUnitBeta, bool kMoments>
DECAFA_INLINE MapStats<float> exp_rows_bf16_pairs(const c10::BFloat16* t, int64_t H, int64_t W, float beta,
                                                  float m, const float* xs, const float* ys) {
  constexpr ExpPrecision kBFloat16Exp = exp_precision_for<c10::BFloat16>();
  const int64_t half = W / 2;
  float sums_even[kColumnSumsMax / 2], sums_odd[kColumnSumsMax / 2];
  float ys_even[kMoments ? kColumnSumsMax / 2 : 1], ys_odd[kMoments ? kColumnSumsMax / 2 : 1];
  std::fill(sums_even, sums_even + half, 0.0f);
  std::fill(sums_odd, sums_odd + half, 0.0f);
  if constexpr (kMoments) {
    std::fill(ys_even, ys_even + half, 0.0f);
    std::fill(ys_odd, ys_odd + half, 0.0f);
  }
  for (int64_t row = 0; row < H; ++row) {
    prefetch_row(t + H * W + row * W, W);  // the next map, as in exp_rows
    const c10::BFloat16* tr = t + row * W;
    const float y = kMoments ? ys[row] : 0.0f;
#pragma omp simd
    for (int64_t j = 0; j < half; ++j) {
      const uint32_t pair = load_bf16_pair(tr + 2 * j);
      const float v0 = shifted_exp<kUnitBeta, float, float, kBFloat16Exp>(bits_to_float(pair << 16), beta, m);
      const float v1 = shifted_exp<kUnitBeta, float, float, kBFloat16Exp>(bits_to_float(pair & 0xFFFF0000u), beta, m);
      sums_even[j] += v0;
      sums_odd[j] += v1;
      if constexpr (kMoments) {
        ys_even[j] += v0 * y;
        ys_odd[j] += v1 * y;
      }
    }
  }
  float sum = 0, sx = 0, sy = 0;
#pragma omp simd reduction(+ : sum, sx, sy)
  for (int64_t j = 0; j < half; ++j) {
    sum += sums_even[j] + sums_odd[j];
    if constexpr (kMoments) {
      sx += sums_even[j] * xs[2 * j] + sums_odd[j] * xs[2 * j + 1];
      sy += ys_even[j] + ys_odd[j];
    }
  }
  return {sum, kMoments ? sx / sum : 0, kMoments ? sy / sum : 0};
}

template <bool kUnitBeta, bool kMoments, bool kStore, typename scalar_t, typename acc_t>
DECAFA_INLINE MapStats<acc_t> exp_sweep(const scalar_t* t, int64_t H, int64_t W, acc_t beta, acc_t m,
                                        const acc_t* xs, const acc_t* ys, acc_t* e) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> && !kStore) {
    if (W % 2 == 0 && W <= kColumnSumsMax) return exp_rows_bf16_pairs<kUnitBeta, kMoments>(t, H, W, beta, m, xs, ys);
  }
  return W <= kColumnSumsMax ? exp_rows<kUnitBeta, kMoments, kStore>(t, H, W, beta, m, xs, ys, e)
                             : exp_rows_wide<kUnitBeta, kMoments, kStore>(t, H, W, beta, m, xs, ys, e);
}

template <bool kUnitBeta, typename scalar_t, typename acc_t>
DECAFA_INLINE MapStats<acc_t> exp_sums_of(const scalar_t* t, int64_t H, int64_t W, acc_t beta, acc_t m,
                                          bool moments, const acc_t* xs, const acc_t* ys, acc_t* e) {
  if (moments) {
    return e != nullptr ? exp_sweep<kUnitBeta, true, true>(t, H, W, beta, m, xs, ys, e)
                        : exp_sweep<kUnitBeta, true, false>(t, H, W, beta, m, xs, ys, e);
  }
  return e != nullptr ? exp_sweep<kUnitBeta, false, true>(t, H, W, beta, m, xs, ys, e)
                      : exp_sweep<kUnitBeta, false, false>(t, H, W, beta, m, xs, ys, e);
}

// The second sweep of a map (H x W logits t, m = max of s = beta * t from scaled_max): the sum of
// e = exp(s - m), so that Phi = e / sum (never exp(s - lse): that cancels in float32 at large |s|), and, when
// `moments`, the first moments (zx, zy) (else 0, 0). When `e` is given (H*W values) it receives e. t is read
// again, from cache: the map was just read by scaled_max.
template <typename scalar_t, typename acc_t>
DECAFA_INLINE MapStats<acc_t> exp_sums_impl(const scalar_t* t, int64_t H, int64_t W, acc_t beta, acc_t m, bool moments,
                                            const acc_t* xs, const acc_t* ys, acc_t* e) {
  return beta == acc_t(1) ? exp_sums_of<true>(t, H, W, beta, m, moments, xs, ys, e)
                          : exp_sums_of<false>(t, H, W, beta, m, moments, xs, ys, e);
}
DECAFA_ISA_DISPATCH(exp_sums)

template <bool kUnitBeta, typename scalar_t, typename acc_t>
DECAFA_INLINE void recompute_phi_of(const scalar_t* t, int64_t hw, acc_t beta, acc_t max, acc_t inv, acc_t* phi) {
#pragma omp simd
  for (int64_t i = 0; i < hw; ++i) phi[i] = shifted_exp<kUnitBeta>(t[i], beta, max) * inv;
}

// Phi of one map from the logits and its saved statistics: phi = exp(beta * t - max) / sum, from the same
// expression as the forward (shifted_exp), so the same values.
template <typename scalar_t, typename acc_t>
DECAFA_INLINE void recompute_phi_impl(const scalar_t* t, int64_t hw, acc_t beta, acc_t max, acc_t sum, acc_t* phi) {
  const acc_t inv = acc_t(1) / sum;
  if (beta == acc_t(1)) {
    recompute_phi_of<true>(t, hw, beta, max, inv, phi);
  } else {
    recompute_phi_of<false>(t, hw, beta, max, inv, phi);
  }
}
DECAFA_ISA_DISPATCH(recompute_phi)

// Softmax backward of one map: g_s = Phi * (g - sum_p g_p Phi_p) is the gradient of s = beta * T;
// grad_t = beta * g_s, and the return value is the map's grad_beta = sum_p T_p g_s,p.
template <typename scalar_t, typename acc_t>
DECAFA_INLINE acc_t softmax_grad_impl(const acc_t* phi, const scalar_t* g, const scalar_t* t, int64_t hw, acc_t beta,
                                      scalar_t* grad_t) {
  acc_t s = 0, gb = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < hw; ++i) s += static_cast<acc_t>(g[i]) * phi[i];
#pragma omp simd reduction(+ : gb)
  for (int64_t i = 0; i < hw; ++i) {
    const acc_t gs = phi[i] * (static_cast<acc_t>(g[i]) - s);
    grad_t[i] = to_storage<scalar_t>(beta * gs);
    gb += static_cast<acc_t>(t[i]) * gs;
  }
  return gb;
}
DECAFA_ISA_DISPATCH(softmax_grad)

// What the logits gradient of one map needs besides Phi: its first moments (zx, zy) and s = sum_p gM_p Phi_p.
template <typename acc_t>
struct PhiSums {
  acc_t zx = 0, zy = 0, s = 0;
};

// Per-column accumulators as in exp_rows (no horizontal sum per row) for maps up to kColumnSumsMax wide,
// a sum per row beyond.
template <bool kUnitBeta, bool kMoments, bool kMaskGrad, typename scalar_t, typename acc_t>
DECAFA_INLINE PhiSums<acc_t> phi_with_sums_of(const scalar_t* t, int64_t H, int64_t W, acc_t beta, acc_t max,
                                              acc_t inv, const acc_t* xs, const acc_t* ys, const acc_t* grad_mask,
                                              acc_t* phi) {
  PhiSums<acc_t> out;
  if (W > kColumnSumsMax) {
    for (int64_t row = 0; row < H; ++row) {
      const scalar_t* tr = t + row * W;
      const acc_t* gm = kMaskGrad ? grad_mask + row * W : nullptr;
      acc_t* p = phi + row * W;
      acc_t row_sum = 0, row_sx = 0, row_s = 0;
#pragma omp simd reduction(+ : row_sum, row_sx, row_s)
      for (int64_t col = 0; col < W; ++col) {
        const acc_t v = shifted_exp<kUnitBeta>(tr[col], beta, max) * inv;
        p[col] = v;
        if constexpr (kMoments) {
          row_sum += v;
          row_sx += v * xs[col];
        }
        if constexpr (kMaskGrad) row_s += gm[col] * v;
      }
      out.zx += row_sx;
      out.zy += row_sum * ys[row];
      out.s += row_s;
    }
    return out;
  }
  acc_t column_sums[kMoments ? kColumnSumsMax : 1], column_ys[kMoments ? kColumnSumsMax : 1];
  acc_t column_s[kMaskGrad ? kColumnSumsMax : 1];
  if constexpr (kMoments) {
    std::fill(column_sums, column_sums + W, acc_t(0));
    std::fill(column_ys, column_ys + W, acc_t(0));
  }
  if constexpr (kMaskGrad) std::fill(column_s, column_s + W, acc_t(0));
  for (int64_t row = 0; row < H; ++row) {
    const scalar_t* tr = t + row * W;
    const acc_t* gm = kMaskGrad ? grad_mask + row * W : nullptr;
    acc_t* p = phi + row * W;
    const acc_t y = kMoments ? ys[row] : acc_t(0);
#pragma omp simd
    for (int64_t col = 0; col < W; ++col) {
      const acc_t v = shifted_exp<kUnitBeta>(tr[col], beta, max) * inv;
      p[col] = v;
      if constexpr (kMoments) {
        column_sums[col] += v;
        column_ys[col] += v * y;
      }
      if constexpr (kMaskGrad) column_s[col] += gm[col] * v;
    }
  }
  acc_t zx = 0, zy = 0, s = 0;
#pragma omp simd reduction(+ : zx, zy, s)
  for (int64_t col = 0; col < W; ++col) {
    if constexpr (kMoments) {
      zx += column_sums[col] * xs[col];
      zy += column_ys[col];
    }
    if constexpr (kMaskGrad) s += column_s[col];
  }
  out.zx = zx;
  out.zy = zy;
  out.s = s;
  return out;
}

template <bool kUnitBeta, typename scalar_t, typename acc_t>
DECAFA_INLINE PhiSums<acc_t> phi_with_sums_beta(const scalar_t* t, int64_t H, int64_t W, acc_t beta, acc_t max,
                                                acc_t inv, const acc_t* xs, const acc_t* ys, bool moments,
                                                const acc_t* grad_mask, acc_t* phi) {
  if (moments) {
    return grad_mask != nullptr
               ? phi_with_sums_of<kUnitBeta, true, true>(t, H, W, beta, max, inv, xs, ys, grad_mask, phi)
               : phi_with_sums_of<kUnitBeta, true, false>(t, H, W, beta, max, inv, xs, ys, grad_mask, phi);
  }
  return grad_mask != nullptr ? phi_with_sums_of<kUnitBeta, false, true>(t, H, W, beta, max, inv, xs, ys, grad_mask, phi)
                              : phi_with_sums_of<kUnitBeta, false, false>(t, H, W, beta, max, inv, xs, ys, grad_mask, phi);
}

// Phi of one map recomputed as recompute_phi does (the same values), in one sweep with the moments (when
// `moments`) and s (when grad_mask, the H*W gradient of M for the map's image, is given).
template <typename scalar_t, typename acc_t>
DECAFA_INLINE PhiSums<acc_t> phi_with_sums_impl(const scalar_t* t, int64_t H, int64_t W, acc_t beta, acc_t max, acc_t sum,
                                                const acc_t* xs, const acc_t* ys, bool moments, const acc_t* grad_mask,
                                                acc_t* phi) {
  const acc_t inv = acc_t(1) / sum;
  return beta == acc_t(1) ? phi_with_sums_beta<true>(t, H, W, beta, max, inv, xs, ys, moments, grad_mask, phi)
                          : phi_with_sums_beta<false>(t, H, W, beta, max, inv, xs, ys, moments, grad_mask, phi);
}
DECAFA_ISA_DISPATCH(phi_with_sums)

// One row of landmark_grad: g_s = Phi (gM + gx x + row_term), grad_t = beta g_s, and T g_s added into the
// column accumulators (kByColumn) or into row_gb.
template <bool kMaskGrad, bool kByColumn, typename scalar_t, typename acc_t>
DECAFA_INLINE void logits_grad_row(const acc_t* p, const scalar_t* tr, const acc_t* gm, const acc_t* xs, int64_t W,
                                   acc_t gx, acc_t row_term, acc_t beta, scalar_t* target, acc_t* column_gb,
                                   acc_t& row_gb) {
  acc_t gb = 0;
#pragma omp simd reduction(+ : gb)
  for (int64_t col = 0; col < W; ++col) {
    const acc_t g = kMaskGrad ? gm[col] + gx * xs[col] + row_term : gx * xs[col] + row_term;
    const acc_t gs = p[col] * g;
    target[col] = to_storage<scalar_t>(beta * gs);
    if constexpr (kByColumn) {
      column_gb[col] += static_cast<acc_t>(tr[col]) * gs;
    } else {
      gb += static_cast<acc_t>(tr[col]) * gs;
    }
  }
  if constexpr (!kByColumn) row_gb += gb;
}

// Gradient of one map's logits given its Phi and phi_with_sums' sums, for a scalar loss depending on z and M:
//   g_s = Phi * [(gM - s) + gx (x - zx) + gy (y - zy)],  grad_t = beta * g_s,
// returning the map's grad_beta = sum_p T_p g_s,p. grad_mask (H*W values, may be null) is the gradient
// w.r.t. M for this map's image; grad_z (2 values, may be null) the gradient w.r.t. (zx, zy). With `staging`
// (W values) grad_t is written with streaming stores.
template <typename scalar_t, typename acc_t>
DECAFA_INLINE acc_t landmark_grad_impl(const acc_t* phi, const PhiSums<acc_t>& sums, const scalar_t* t, int64_t H,
                                       int64_t W, acc_t beta, const acc_t* xs, const acc_t* ys, const acc_t* grad_z,
                                       const acc_t* grad_mask, scalar_t* grad_t, scalar_t* staging) {
  const acc_t gx = grad_z != nullptr ? grad_z[0] : acc_t(0), gy = grad_z != nullptr ? grad_z[1] : acc_t(0);
  // grad beta's terms added per column (as in exp_rows), or per row for maps over kColumnSumsMax wide
  const bool by_column = W <= kColumnSumsMax;
  acc_t column_gb[kColumnSumsMax];
  if (by_column) std::fill(column_gb, column_gb + W, acc_t(0));
  acc_t gb = 0;
  for (int64_t row = 0; row < H; ++row) {
    const acc_t* p = phi + row * W;
    const scalar_t* tr = t + row * W;
    const acc_t* gm = grad_mask != nullptr ? grad_mask + row * W : nullptr;
    scalar_t* out = grad_t + row * W;
    scalar_t* target = staging != nullptr ? staging : out;
    const acc_t row_term = gy * (ys[row] - sums.zy) - gx * sums.zx - sums.s;
    if (by_column) {
      gm != nullptr ? logits_grad_row<true, true>(p, tr, gm, xs, W, gx, row_term, beta, target, column_gb, gb)
                    : logits_grad_row<false, true>(p, tr, gm, xs, W, gx, row_term, beta, target, column_gb, gb);
    } else {
      gm != nullptr ? logits_grad_row<true, false>(p, tr, gm, xs, W, gx, row_term, beta, target, column_gb, gb)
                    : logits_grad_row<false, false>(p, tr, gm, xs, W, gx, row_term, beta, target, column_gb, gb);
    }
    if (staging != nullptr) stream_copy(out, staging, W * sizeof(scalar_t));
  }
  if (by_column) {
#pragma omp simd reduction(+ : gb)
    for (int64_t col = 0; col < W; ++col) gb += column_gb[col];
  }
  return gb;
}
DECAFA_ISA_DISPATCH(landmark_grad)

// ---- Maps where beta * t overflows the accumulation dtype --------------------------------------------
// When scaled_max gives +-inf (a finite beta too large for the map's logits), softmax(beta * t) is taken at
// its exact limit: with c the map's largest logit for beta > 0 (its smallest for beta < 0) and k the number
// of pixels where t == c, Phi = 1/k on those pixels and 0 elsewhere. exp(beta * (t - c)) rounds to exactly
// that: off the ties |beta * (t - c)| is beyond the dtype's largest value. A map holding a NaN, or whose c
// is infinite, or a beta that is not finite, has no such limit and stays NaN (the normal sweep gives it).
// The statistics saved for the backward are (max = +-inf, sum = k): a finite sum next to an infinite max
// is what marks such a map (a NaN map's sum is NaN). These run once per overflowing map, off the normal
// path: the sweeps above are unchanged, and the only cost to other maps is the test of the max.
template <typename acc_t>
struct MapLimit {
  acc_t c = 0;   // the logit Phi concentrates on
  acc_t k = 0;   // how many pixels hold it
  bool exact = false;  // false: no finite limit (NaN, c infinite, beta not finite): the map is NaN
};

// Whether map_statistics' max m (scaled_max) calls for the limit instead of the exp sweep.
template <typename acc_t>
DECAFA_INLINE bool overflowed(acc_t m) {
  return !(m > -std::numeric_limits<acc_t>::infinity() && m < std::numeric_limits<acc_t>::infinity());
}

// Whether a map's saved statistics are those of a limit (an infinite max with a finite sum).
template <typename acc_t>
DECAFA_INLINE bool saved_as_limit(acc_t max, acc_t sum) {
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  return (max == inf || max == -inf) && sum > acc_t(0) && sum < inf;
}

// c and k of n logits for this beta (one read for the extremes and NaN, one for the ties).
template <typename scalar_t, typename acc_t>
DECAFA_INLINE MapLimit<acc_t> map_limit_impl(const scalar_t* t, int64_t n, acc_t beta) {
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  MapLimit<acc_t> out;
  if (!(beta != acc_t(0) && beta > -inf && beta < inf)) return out;  // NaN beta fails too
  acc_t hi = -inf, lo = inf;
  int nan = 0;
#pragma omp simd reduction(max : hi) reduction(min : lo) reduction(| : nan)
  for (int64_t i = 0; i < n; ++i) {
    const acc_t v = static_cast<acc_t>(t[i]);
    hi = v > hi ? v : hi;
    lo = v < lo ? v : lo;
    nan |= v != v ? 1 : 0;
  }
  const acc_t c = beta > acc_t(0) ? hi : lo;
  if (nan != 0 || !(c > -inf && c < inf)) return out;
  int64_t k = 0;
#pragma omp simd reduction(+ : k)
  for (int64_t i = 0; i < n; ++i) k += static_cast<acc_t>(t[i]) == c ? 1 : 0;
  // OpenMP may start a min / max reduction's private copies at the largest finite value rather than at
  // infinity (clang does): a map of +inf logits only (beta < 0) then gives c = the largest finite value, held
  // by no pixel. No pixel at c means no finite extreme: the map is NaN.
  if (k == 0) return out;
  out.c = c;
  out.k = static_cast<acc_t>(k);
  out.exact = true;
  return out;
}
DECAFA_ISA_DISPATCH(map_limit)

// exp_sums for a limit: e = [t == c] (stored when e is given), sum = k, and the moments when `moments`.
template <typename scalar_t, typename acc_t>
DECAFA_INLINE MapStats<acc_t> limit_sums_impl(const scalar_t* t, int64_t H, int64_t W, const MapLimit<acc_t>& limit,
                                              bool moments, const acc_t* xs, const acc_t* ys, acc_t* e) {
  acc_t sx = 0, sy = 0;
  for (int64_t row = 0; row < H; ++row) {
    const scalar_t* tr = t + row * W;
    acc_t row_count = 0;
#pragma omp simd reduction(+ : sx, row_count)
    for (int64_t col = 0; col < W; ++col) {
      const acc_t v = static_cast<acc_t>(tr[col]) == limit.c ? acc_t(1) : acc_t(0);
      if (e != nullptr) e[row * W + col] = v;
      row_count += v;
      sx += v * xs[col];
    }
    sy += row_count * ys[row];
  }
  return {limit.k, moments ? sx / limit.k : acc_t(0), moments ? sy / limit.k : acc_t(0)};
}
DECAFA_ISA_DISPATCH(limit_sums)

// The backward of a limit map: Phi_p = [t_p == c] / k and, with G_p the gradient w.r.t. Phi_p (g_phi when
// given, the spatial_softmax backward; else gM_p + gx x_p + gy y_p from grad_mask and grad_z, either may be
// null), g_s = Phi (G - sum_q Phi_q G_q) and grad_t = beta * g_s: exactly 0 off the ties, and 0 on a lone
// maximum too (sum_q Phi_q G_q is then its G). Returns grad_beta = sum_p t_p g_s,p = sum_p (t_p - c) g_s,p
// (sum_p g_s,p = 0): g_s is 0 off the ties and t_p - c is 0 on them, so every term is 0 * g_s, 0 or NaN
// (with a non-finite incoming gradient, as the reference gives); t_p - c itself is not formed, it can
// overflow.
template <typename scalar_t, typename acc_t>
DECAFA_INLINE acc_t limit_grad_impl(const scalar_t* t, int64_t H, int64_t W, const MapLimit<acc_t>& limit, acc_t beta,
                                    const scalar_t* g_phi, const acc_t* xs, const acc_t* ys, const acc_t* grad_z,
                                    const acc_t* grad_mask, scalar_t* grad_t) {
  const acc_t inv = acc_t(1) / limit.k;
  const acc_t gx = grad_z != nullptr ? grad_z[0] : acc_t(0), gy = grad_z != nullptr ? grad_z[1] : acc_t(0);
  auto incoming = [&](int64_t row, int64_t col) {
    const int64_t p = row * W + col;
    if (g_phi != nullptr) return static_cast<acc_t>(g_phi[p]);
    const acc_t gm = grad_mask != nullptr ? grad_mask[p] : acc_t(0);
    return gm + gx * xs[col] + gy * ys[row];
  };
  acc_t mean = 0;  // sum_q Phi_q G_q
  for (int64_t row = 0; row < H; ++row) {
    for (int64_t col = 0; col < W; ++col) {
      const acc_t phi = static_cast<acc_t>(t[row * W + col]) == limit.c ? inv : acc_t(0);
      mean += phi * incoming(row, col);
    }
  }
  acc_t gb = 0;
  for (int64_t row = 0; row < H; ++row) {
    for (int64_t col = 0; col < W; ++col) {
      const acc_t phi = static_cast<acc_t>(t[row * W + col]) == limit.c ? inv : acc_t(0);
      const acc_t gs = phi * (incoming(row, col) - mean);
      grad_t[row * W + col] = to_storage<scalar_t>(beta * gs);
      gb += acc_t(0) * gs;
    }
  }
  return gb;
}
DECAFA_ISA_DISPATCH(limit_grad)

}  // namespace cpu
}  // namespace decafa
