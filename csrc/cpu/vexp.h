// exp for the CPU kernels: vectorisable (std::exp is a libm call, which GCC and clang do not vectorise), in
// three precisions, for the x <= 0 of exp(s - max s). Its error bounds are measured by
// tests/ops/cpu_simd_harness.cpp (`exp-error`), which tests/ops/test_cpu_simd.py checks against kExpBounds.
// Hand-written rather than ATen's at::vec::Vectorized<float>: `python bench/vexp_vs_aten.py` (AVX-512, in
// cache) measured the float32 form as accurate as Vectorized::exp (Sleef, 8.5e-8 against 8.3e-8 relative) at
// 1.5x its speed or more (0.21 against 0.31-0.80 ns per element over four runs), exp_u20 no faster and
// flushing to 0 above -87, and the 16-bit forms as fast as fexp_u20 at its accuracy or better
// (bench/RESULTS.md, "CPU exp").
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <c10/util/BFloat16.h>

#include "isa.h"

// The kernels need IEEE float semantics: vexp rounds with an add and subtract of a magic number (folded
// away under -fassociative-math), propagates NaN and returns exactly 0 at -inf (assumed away under
// -ffinite-math-only), and `scaled` rounds beta * t with a "+ 0" (dropped under -fno-signed-zeros). A
// build with any of these would compute wrong values without a sign, so it stops here.
#if defined(__FAST_MATH__) || (defined(__FINITE_MATH_ONLY__) && __FINITE_MATH_ONLY__) || \
    defined(__ASSOCIATIVE_MATH__) || defined(__NO_SIGNED_ZEROS__)
#error "decafa CPU kernels need IEEE float semantics: build without -ffast-math, -Ofast, -ffinite-math-only, -fassociative-math or -fno-signed-zeros"
#endif

namespace decafa {
namespace cpu {

// How exactly vexp computes: to about 1 ulp of float32 for float32 (and float64, which takes std::exp)
// logits; less for 16-bit logits, whose Phi, z and M are 16-bit too, in fewer multiply-adds (on the CPU the
// exp is what bounds the 16-bit statistics ops).
enum class ExpPrecision {
  kFloat,     // Cody-Waite reduction, degree-6 polynomial
  kHalf,      // one-constant reduction, degree 4: 3 multiply-adds fewer
  kBFloat16,  // one-constant reduction, degree 3: 4 fewer
};

// Bounds on the error of vexp<precision> on [kExpLowest, 0] against exp in float64, in units in the last
// place of float32 and relative, for every clone and for GCC and clang builds alike (the harness's
// `exp-error` mode measures them: the AVX2 and AVX-512 clones contract the multiply-adds into FMAs, which
// moves the float32 exp's largest error a little above 1 ulp; without FMA, as in the baseline clone,
// n * ln2 is rounded, which doubles kHalf's error). In the 16-bit types' own units: kHalf within 0.015 ulp of float16, kBFloat16 within 0.03
// ulp of bfloat16 (relative error times 2^11 and 2^8).
struct ExpBound {
  ExpPrecision precision;
  double max_ulp_float32;
  double max_relative;
};
constexpr ExpBound kExpBounds[] = {
    {ExpPrecision::kFloat, 1.1, 1.0e-7},
    {ExpPrecision::kHalf, 110.0, 7.0e-6},
    {ExpPrecision::kBFloat16, 1500.0, 1.1e-4},
};

template <typename scalar_t>
constexpr ExpPrecision exp_precision_for() {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) return ExpPrecision::kBFloat16;
  if constexpr (sizeof(scalar_t) == 2) return ExpPrecision::kHalf;
  return ExpPrecision::kFloat;
}

// The float whose bits are u.
DECAFA_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// Below kExpLowest vexp is 0 (exp(-87) is 1.6e-38, near float32's smallest normal); above it n >= -126, so
// that 2^n and 2^n y are normal floats.
constexpr float kExpLowest = -86.99f;
constexpr float kRoundingMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds a float of |v| < 2^22 to an integer
constexpr float kLog2E = 1.44269504088896341f;
constexpr float kLn2 = 0.693147182464599609375f;  // ln 2 rounded to float32
// Cody-Waite: ln 2 = kLn2High - kLn2HighExcess, kLn2High with few enough bits that n * kLn2High is exact
constexpr float kLn2High = 0.693359375f;
constexpr float kLn2HighExcess = 2.12194440e-4f;

// Polynomials for exp(r) on |r| <= ln2 / 2, each fitted for the least maximum relative error, highest degree
// first. kFloat: exp(r) = 1 + r + r^2 P(r) with these P (its own error 3.7e-9); the others p(r) with
// exp(r) = 1 + r p(r).
constexpr float kExpFloatP[] = {1.3879691250622272e-3f, 8.36869329214096e-3f, 4.166722670197487e-2f,
                                1.666652113199234e-1f, 4.999999701976776e-1f};
constexpr float kExpHalfP[] = {4.151337966322899e-2f, 1.6787388920783997e-1f, 5.000301599502563e-1f,
                               9.999668598175049e-1f};
constexpr float kExpBFloat16P[] = {1.651763916015625e-1f, 5.0412517786026e-1f, 1.0001956224441528f};

// exp(x) for x <= 0 (all the kernels need): -inf gives exactly 0, NaN stays NaN.
template <ExpPrecision kPrecision = ExpPrecision::kFloat>
DECAFA_INLINE float vexp(float x) {
  // Only ever called on s - max(s) <= 0 (or NaN, from NaN or infinite logits): no upper clamp needed.
  const float xc = kExpLowest > x ? kExpLowest : x;  // NaN fails the test and stays NaN
  const float shifted = xc * kLog2E + kRoundingMagic;  // kRoundingMagic + n, n in its low mantissa bits
  const float n = shifted - kRoundingMagic;
  float y;  // exp(r), in [0.7, 1.5]
  if constexpr (kPrecision != ExpPrecision::kFloat) {
    // r = x - n ln2 with ln2 rounded to float32: off by at most 126 * 1.9e-9 (2.4e-7 relative in exp(r),
    // below either polynomial's error)
    const float r = xc - n * kLn2;
    float p;
    if constexpr (kPrecision == ExpPrecision::kHalf) {
      p = kExpHalfP[0];
      p = p * r + kExpHalfP[1];
      p = p * r + kExpHalfP[2];
      p = p * r + kExpHalfP[3];
    } else {
      p = kExpBFloat16P[0];
      p = p * r + kExpBFloat16P[1];
      p = p * r + kExpBFloat16P[2];
    }
    y = p * r + 1.0f;
  } else {
    const float r = xc - n * kLn2High + n * kLn2HighExcess;
    float p = kExpFloatP[0];
    p = p * r + kExpFloatP[1];
    p = p * r + kExpFloatP[2];
    p = p * r + kExpFloatP[3];
    p = p * r + kExpFloatP[4];
    y = p * r * r + r + 1.0f;
  }
  // 2^n y, with 2^n built from the bits of `shifted` (its mantissa holds 2^22 + n, so shifted left by 23 they
  // leave n << 23) and multiplied, not added to y's exponent bits: exact, since 2^n y is a normal float, and
  // NaN in, NaN out whatever the payload (n's bits added to a NaN's exponent could make it finite). No
  // float-to-int conversion, which is undefined behaviour for NaN and out-of-range values, and as many
  // operations as one would take (a shift, an integer add, a multiply).
  uint32_t shifted_bits;
  std::memcpy(&shifted_bits, &shifted, sizeof(shifted_bits));
  constexpr uint32_t kExponentBias = uint32_t(127) << 23;
  const float scale = bits_to_float((shifted_bits << 23) + kExponentBias);
  return x < kExpLowest ? 0.0f : y * scale;
}
template <ExpPrecision kPrecision = ExpPrecision::kFloat>
DECAFA_INLINE double vexp(double x) {
  return std::exp(x);
}

}  // namespace cpu
}  // namespace decafa
