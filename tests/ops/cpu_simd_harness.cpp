// A standalone driver of the CPU kernels' building blocks (csrc/cpu/map_math.h), without torch's runtime:
// cheaper to rebuild under a sanitizer or another compiler than the extension. tests/ops/test_cpu_simd.py
// builds and runs it; by hand (from the repository root; TORCH_INCLUDES from
// `python3 -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))"`):
//
//   g++ -std=c++20 -O1 -g -fopenmp-simd -fno-trapping-math -fsanitize=undefined,float-cast-overflow \
//       -fno-sanitize-recover=all $TORCH_INCLUDES -Ikernels tests/ops/cpu_simd_harness.cpp csrc/cpu/isa.cpp \
//       -o /tmp/cpu_simd_harness && /tmp/cpu_simd_harness sweeps
//
// Modes:
//   isa     prints "active=<isa> best=<isa>": the clone DECAFA_CPU_ISA selects here, and the CPU's best
//   sweeps  runs every kernel of map_math.h through each clone this CPU supports, on maps holding NaN (several
//           payloads, both signs), +-inf, all -inf, the dtype's largest values, subnormals and signed zeros,
//           for float64, float32, float16 and bfloat16 and betas that overflow; checks what the op contract
//           says of them (a NaN or inf in a map makes its sum NaN, finite maps give finite sums; a map whose
//           max overflows has the limit, 1/k on the k pixels of its extreme logit, unless it holds a NaN or
//           that logit is infinite, and gradients 0 off those pixels and 0 for grad_beta) and prints
//           one digest of every output's bits per clone, "same" when all clones agree bit for bit
//   exp-error  the largest error of vexp in each precision and clone on [kExpLowest, 0], against the bounds
//           vexp.h states (kExpBounds)
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include <c10/util/Half.h>

#include "../../csrc/cpu/fusion_tiles.h"
#include "../../csrc/cpu/map_math.h"

using namespace decafa::cpu;  // NOLINT: the kernels by name, as CLONE calls them
namespace dc = decafa::cpu;

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  if (!ok && failures++ < 20) std::fprintf(stderr, "FAIL: %s\n", what.c_str());
}

// FNV-1a over bytes: one digest of every output a clone wrote.
struct Digest {
  uint64_t h = 1469598103934665603ull;
  void add(const void* p, size_t n) {
    const auto* b = static_cast<const unsigned char*>(p);
    for (size_t i = 0; i < n; ++i) h = (h ^ b[i]) * 1099511628211ull;
  }
  template <typename T>
  void add(const std::vector<T>& v) {
    add(v.data(), v.size() * sizeof(T));
  }
  template <typename T>
  void add_value(T v) {
    add(&v, sizeof(v));
  }
};

#if DECAFA_ISA_CLONES
// NAME's clone for `isa`, called directly (the kernels' own dispatch follows active_isa() alone)
#define CLONE(isa, NAME, ...)                                                              \
  ((isa) == Isa::kAvx512 ? NAME##_avx512(__VA_ARGS__)                                      \
                         : (isa) == Isa::kAvx2 ? NAME##_avx2(__VA_ARGS__) : NAME##_baseline(__VA_ARGS__))
#else
#define CLONE(isa, NAME, ...) NAME(__VA_ARGS__)
#endif

template <typename T>
T from_bits(uint64_t bits) {
  T v;
  std::memcpy(&v, &bits, sizeof(T));  // little-endian: the low bytes
  return v;
}

// NaN of several payloads and both signs, in the storage type.
template <typename scalar_t>
std::vector<scalar_t> nans() {
  if constexpr (std::is_same_v<scalar_t, double>) {
    return {from_bits<double>(0x7FF0000000000001ull), from_bits<double>(0xFFF8000000000000ull),
            from_bits<double>(0x7FFFFFFFFFFFFFFFull)};
  } else if constexpr (std::is_same_v<scalar_t, float>) {
    return {from_bits<float>(0x7F800001u), from_bits<float>(0xFFC00000u), from_bits<float>(0x7FFFFFFFu),
            from_bits<float>(0x7FC000FFu)};
  } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
    return {c10::Half(0x7C01, c10::Half::from_bits()), c10::Half(0xFE00, c10::Half::from_bits()),
            c10::Half(0x7FFF, c10::Half::from_bits())};
  } else {
    return {c10::BFloat16(0x7F81, c10::BFloat16::from_bits()), c10::BFloat16(0xFFC0, c10::BFloat16::from_bits()),
            c10::BFloat16(0x7FFF, c10::BFloat16::from_bits())};
  }
}

enum Pattern { kFinite, kOneNaN, kPlusInf, kMinusInfSome, kAllMinusInf, kHuge, kAllNaN, kTiny, kPatterns };
const char* const kPatternNames[] = {"finite", "one NaN", "+inf", "some -inf", "all -inf", "huge", "all NaN", "tiny"};

template <typename scalar_t>
std::vector<scalar_t> make_map(Pattern pattern, int64_t hw, uint32_t seed) {
  using limits = std::numeric_limits<scalar_t>;
  const float inf = std::numeric_limits<float>::infinity();
  uint32_t state = seed * 2654435761u + 1u;
  auto uniform = [&] {  // in [-1, 1)
    state = state * 1664525u + 1013904223u;
    return static_cast<float>(state >> 8) / 8388608.0f - 1.0f;
  };
  std::vector<scalar_t> t(hw);
  for (int64_t i = 0; i < hw; ++i) t[i] = static_cast<scalar_t>(8.0f * uniform());
  const std::vector<scalar_t> nan = nans<scalar_t>();
  switch (pattern) {
    case kFinite: break;
    case kOneNaN: t[hw / 2] = nan[seed % nan.size()]; break;
    case kPlusInf: t[hw - 1] = static_cast<scalar_t>(inf); break;
    case kMinusInfSome:
      for (int64_t i = 0; i < hw; i += 2) t[i] = static_cast<scalar_t>(-inf);
      break;
    case kAllMinusInf: std::fill(t.begin(), t.end(), static_cast<scalar_t>(-inf)); break;
    case kHuge:
      for (int64_t i = 0; i < hw; ++i) t[i] = i % 3 == 0 ? limits::max() : (i % 3 == 1 ? limits::lowest() : t[i]);
      break;
    case kAllNaN:
      for (int64_t i = 0; i < hw; ++i) t[i] = nan[i % nan.size()];
      break;
    case kTiny:
      for (int64_t i = 0; i < hw; ++i) {
        t[i] = i % 3 == 0 ? limits::denorm_min() : (i % 3 == 1 ? static_cast<scalar_t>(-0.0f) : -limits::denorm_min());
      }
      break;
    default: break;
  }
  return t;
}

template <typename T>
bool is_nan(T v) {
  return std::isnan(static_cast<double>(v));
}

// Every kernel of map_math.h on one map through one clone; the outputs go into `digest`.
template <typename scalar_t>
void run_map(Isa isa, const std::vector<scalar_t>& t, int64_t H, int64_t W, double beta_in, bool finite_map,
             bool poisoned_map, const std::string& what, Digest& digest) {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  const int64_t hw = H * W;
  const acc_t beta = static_cast<acc_t>(beta_in);
  const std::vector<acc_t> xs = dc::axis_coordinates<acc_t>(W, true), ys = dc::axis_coordinates<acc_t>(H, false);
  // the map followed by a copy of itself: exp_rows prefetches the next map's rows
  std::vector<scalar_t> two_maps(t);
  two_maps.insert(two_maps.end(), t.begin(), t.end());
  const scalar_t* tp = two_maps.data();

  const acc_t m = CLONE(isa, scaled_max, tp, hw, beta);
  std::vector<acc_t> e(hw, acc_t(-1));
  const dc::MapStats<acc_t> st = CLONE(isa, exp_sums, tp, H, W, beta, m, true, xs.data(), ys.data(), e.data());
  const dc::MapStats<acc_t> st_plain =
      CLONE(isa, exp_sums, tp, H, W, beta, m, false, xs.data(), ys.data(), static_cast<acc_t*>(nullptr));
  digest.add_value(m);
  digest.add_value(st.sum);
  digest.add_value(st.zx);
  digest.add_value(st.zy);
  digest.add_value(st_plain.sum);
  digest.add(e);
  // the contract: a finite map of a finite beta * t has a finite sum >= 1 (its max contributes exp(0));
  // NaN or an infinity anywhere in beta * t poisons the map
  if (finite_map) {
    expect(std::isfinite(static_cast<double>(st.sum)) && st.sum >= acc_t(1), what + ": finite map, sum " +
                                                                                 std::to_string(double(st.sum)));
  }
  if (poisoned_map) expect(is_nan(st.sum) && is_nan(st_plain.sum), what + ": poisoned map, sum not NaN");

  std::vector<scalar_t> phi_out(hw);
  CLONE(isa, store_scaled, e.data(), hw, acc_t(1) / st.sum, phi_out.data());
  digest.add(phi_out);

  std::vector<acc_t> phi(hw);
  CLONE(isa, recompute_phi, tp, hw, beta, m, st.sum, phi.data());
  digest.add(phi);

  std::vector<scalar_t> g(hw), grad_t(hw);
  for (int64_t i = 0; i < hw; ++i) g[i] = static_cast<scalar_t>(static_cast<float>((i * 7) % 11) - 5.0f);
  digest.add_value(CLONE(isa, softmax_grad, phi.data(), g.data(), tp, hw, beta, grad_t.data()));
  digest.add(grad_t);

  std::vector<acc_t> grad_mask(hw), phi2(hw);
  for (int64_t i = 0; i < hw; ++i) grad_mask[i] = static_cast<acc_t>((i % 5) - 2) * acc_t(0.25);
  const acc_t grad_z[2] = {acc_t(0.5), acc_t(-1.5)};
  const dc::PhiSums<acc_t> sums =
      CLONE(isa, phi_with_sums, tp, H, W, beta, m, st.sum, xs.data(), ys.data(), true, grad_mask.data(), phi2.data());
  digest.add(phi2);
  digest.add_value(sums.zx);
  digest.add_value(sums.zy);
  digest.add_value(sums.s);
  std::vector<scalar_t> staging(W);
  digest.add_value(CLONE(isa, landmark_grad, phi2.data(), sums, tp, H, W, beta, xs.data(), ys.data(), grad_z,
                         grad_mask.data(), grad_t.data(), staging.data()));
  digest.add(grad_t);

  // a map whose max overflowed (beta * t beyond acc_t): the limit, c and k, its e and moments, and its
  // gradients, for the spatial_softmax backward (g) and for landmark_grad's (grad_mask, grad_z)
  if (dc::overflowed(m)) {
    const dc::MapLimit<acc_t> limit = CLONE(isa, map_limit, tp, hw, beta);
    digest.add_value(limit.c);
    digest.add_value(limit.k);
    digest.add_value(limit.exact);
    const acc_t inf = std::numeric_limits<acc_t>::infinity();
    bool any_nan = false;
    acc_t hi = -inf, lo = inf;
    for (scalar_t v : t) {
      any_nan |= is_nan(v);
      if (!is_nan(v)) {
        hi = std::max(hi, static_cast<acc_t>(v));
        lo = std::min(lo, static_cast<acc_t>(v));
      }
    }
    const acc_t c = beta > acc_t(0) ? hi : lo;
    const bool has_limit = !any_nan && std::isfinite(c) && beta != acc_t(0) && std::isfinite(beta);
    expect(limit.exact == has_limit, what + ": overflowed map, limit found " + std::to_string(limit.exact));
    if (limit.exact) {
      int64_t k = 0;
      for (scalar_t v : t) k += static_cast<acc_t>(v) == c;
      std::vector<acc_t> e_limit(hw, acc_t(-1));
      const dc::MapStats<acc_t> st_limit =
          CLONE(isa, limit_sums, tp, H, W, limit, true, xs.data(), ys.data(), e_limit.data());
      expect(limit.c == c && k >= 1 && st_limit.sum == acc_t(k), what + ": limit c or k");
      for (int64_t i = 0; i < hw; ++i) {
        expect(e_limit[i] == (static_cast<acc_t>(t[i]) == c ? acc_t(1) : acc_t(0)), what + ": limit e");
      }
      digest.add(e_limit);
      digest.add_value(st_limit.zx);
      digest.add_value(st_limit.zy);
      const acc_t gb_softmax = CLONE(isa, limit_grad, tp, H, W, limit, beta, static_cast<const scalar_t*>(g.data()),
                                     static_cast<const acc_t*>(nullptr), static_cast<const acc_t*>(nullptr),
                                     static_cast<const acc_t*>(nullptr), static_cast<const acc_t*>(nullptr),
                                     grad_t.data());
      digest.add(grad_t);
      for (int64_t i = 0; i < hw; ++i) {
        if (e_limit[i] == acc_t(0)) expect(static_cast<acc_t>(grad_t[i]) == acc_t(0), what + ": limit grad off c");
        if (k == 1) expect(static_cast<acc_t>(grad_t[i]) == acc_t(0), what + ": limit grad of a lone maximum");
      }
      const acc_t gb_landmark = CLONE(isa, limit_grad, tp, H, W, limit, beta, static_cast<const scalar_t*>(nullptr),
                                      xs.data(), ys.data(), grad_z, grad_mask.data(), grad_t.data());
      digest.add(grad_t);
      expect(gb_softmax == acc_t(0) && gb_landmark == acc_t(0), what + ": limit grad_beta");
    }
  }

  // the mask side: a group of 1..4 maps' e added into an accumulator, partial masks summed in run order
  std::vector<acc_t> group(4 * hw);
  for (int k = 0; k < 4; ++k) std::copy(e.begin(), e.end(), group.begin() + k * hw);
  const acc_t scale[4] = {acc_t(1) / st.sum, acc_t(0.5), acc_t(2), acc_t(-1)};
  std::vector<acc_t> acc(hw, acc_t(0)), summed(hw);
  for (int count = 1; count <= 4; ++count) CLONE(isa, accumulate_group, group.data(), hw, count, scale, acc.data());
  digest.add(acc);
  CLONE(isa, sum_partial_masks, group.data(), int64_t(4), hw, int64_t(0), hw, summed.data());
  digest.add(summed);

  // the fusion (F5: image, image * M, embedding, embedding * M) and its backward, with e as the mask
  const dc::Segments layout(5, 1, 2);
  std::vector<scalar_t> image(t), embedding(two_maps), fused(layout.channels * hw), grad_fused(layout.channels * hw);
  std::vector<scalar_t> grad_image(hw), grad_embedding(2 * hw), fuse_staging(hw);
  for (int64_t i = 0; i < layout.channels * hw; ++i) grad_fused[i] = static_cast<scalar_t>(float(i % 9) - 4.0f);
  CLONE(isa, fuse_tile, layout, image.data(), int64_t(1), embedding.data(), int64_t(2), e.data(), hw, int64_t(0), hw,
        fused.data(), static_cast<scalar_t*>(nullptr));
  std::vector<acc_t> mask_grad(hw);
  CLONE(isa, fuse_tile_backward, layout, grad_fused.data(), image.data(), int64_t(1), embedding.data(), int64_t(2),
        e.data(), hw, int64_t(0), hw, grad_image.data(), grad_embedding.data(), mask_grad.data(), fuse_staging.data());
  digest.add(fused);
  digest.add(grad_image);
  digest.add(grad_embedding);
  digest.add(mask_grad);
}

template <typename scalar_t>
uint64_t sweep_dtype(Isa isa, const char* dtype) {
  Digest digest;
  const int64_t sizes[][2] = {{1, 1}, {3, 7}, {8, 16}, {5, 33}, {2, 1030}};
  const double betas[] = {1.0, 0.7, -1.3, 1e30, -1e38, 0.0};
  for (const auto& size : sizes) {
    const int64_t H = size[0], W = size[1];
    for (int p = 0; p < kPatterns; ++p) {
      const auto pattern = static_cast<Pattern>(p);
      const std::vector<scalar_t> t = make_map<scalar_t>(pattern, H * W, static_cast<uint32_t>(p + 3 * H + W));
      for (double beta : betas) {
        // NaN in s = beta * t, s = +inf (then inf - inf) or s = -inf everywhere (then -inf + inf) poison the
        // map; otherwise every e is in [0, 1] and the max's is 1
        using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        bool any_nan = false, any_plus_inf = false, all_minus_inf = true;
        for (scalar_t v : t) {
          const acc_t s = static_cast<acc_t>(beta) * static_cast<acc_t>(v);
          any_nan |= std::isnan(s);
          any_plus_inf |= s == std::numeric_limits<acc_t>::infinity();
          all_minus_inf &= s == -std::numeric_limits<acc_t>::infinity();
        }
        const bool poisoned = any_nan || any_plus_inf || all_minus_inf;
        const std::string what = std::string(dtype) + " " + dc::isa_name(isa) + " " + kPatternNames[p] + " " +
                                 std::to_string(H) + "x" + std::to_string(W) + " beta " + std::to_string(beta);
        run_map<scalar_t>(isa, t, H, W, beta, !poisoned, poisoned, what, digest);
      }
    }
  }
  return digest.h;
}

int sweeps() {
  std::vector<Isa> clones;
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2, Isa::kBaseline}) {
    if (dc::cpu_supports(isa)) clones.push_back(isa);
  }
  if (!DECAFA_ISA_CLONES) clones = {Isa::kBaseline};
  std::vector<uint64_t> digests[4];
  for (Isa isa : clones) {
    digests[0].push_back(sweep_dtype<double>(isa, "float64"));
    digests[1].push_back(sweep_dtype<float>(isa, "float32"));
    digests[2].push_back(sweep_dtype<c10::Half>(isa, "float16"));
    digests[3].push_back(sweep_dtype<c10::BFloat16>(isa, "bfloat16"));
  }
  const char* dtypes[] = {"float64", "float32", "float16", "bfloat16"};
  for (int d = 0; d < 4; ++d) {
    bool same = true;
    std::printf("%s", dtypes[d]);
    for (size_t c = 0; c < clones.size(); ++c) {
      std::printf(" %s=%016llx", dc::isa_name(clones[c]), static_cast<unsigned long long>(digests[d][c]));
      same &= digests[d][c] == digests[d][0];
    }
    std::printf(" %s\n", same ? "same" : "differ");
  }
  std::printf("%s\n", failures == 0 ? "ok" : "FAILED");
  return failures == 0 ? 0 : 1;
}

// vexp over many x, vectorised as the kernels' loops are, through each clone (DECAFA_ISA_DISPATCH).
template <dc::ExpPrecision kPrecision>
DECAFA_INLINE void exp_table_impl(std::integral_constant<dc::ExpPrecision, kPrecision>, const float* x, int64_t n,
                                  float* out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] = dc::vexp<kPrecision>(x[i]);
}
DECAFA_ISA_DISPATCH(exp_table)

// The largest error of vexp in each precision and clone, on x in [kExpLowest, 0] (every 61st float, and
// both ends) against exp in float64: in float32 ulps and relative.
int exp_error() {
  std::vector<float> x;
  const float lowest = dc::kExpLowest;
  uint32_t last;
  std::memcpy(&last, &lowest, sizeof(last));
  for (uint32_t bits = 0x80000000u; bits <= last; bits += 61) x.push_back(from_bits<float>(bits));
  x.push_back(lowest);
  std::vector<float> y(x.size());
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2, Isa::kBaseline}) {
    if (!dc::cpu_supports(isa) || (!DECAFA_ISA_CLONES && isa != Isa::kBaseline)) continue;
    for (const dc::ExpBound& bound : dc::kExpBounds) {
      const int64_t n = static_cast<int64_t>(x.size());
      switch (bound.precision) {
        case dc::ExpPrecision::kFloat:
          CLONE(isa, exp_table, std::integral_constant<dc::ExpPrecision, dc::ExpPrecision::kFloat>(), x.data(), n,
                y.data());
          break;
        case dc::ExpPrecision::kHalf:
          CLONE(isa, exp_table, std::integral_constant<dc::ExpPrecision, dc::ExpPrecision::kHalf>(), x.data(), n,
                y.data());
          break;
        default:
          CLONE(isa, exp_table, std::integral_constant<dc::ExpPrecision, dc::ExpPrecision::kBFloat16>(), x.data(),
                n, y.data());
      }
      double max_ulp = 0, max_relative = 0;
      for (size_t i = 0; i < x.size(); ++i) {
        const double want = std::exp(static_cast<double>(x[i]));
        const double ulp = std::ldexp(1.0, std::ilogb(want) - 23);  // of float32, at want
        max_ulp = std::max(max_ulp, std::fabs(y[i] - want) / ulp);
        max_relative = std::max(max_relative, std::fabs(y[i] - want) / want);
      }
      const bool ok = max_ulp <= bound.max_ulp_float32 && max_relative <= bound.max_relative;
      expect(ok, std::string("vexp ") + dc::isa_name(isa) + " precision " +
                     std::to_string(static_cast<int>(bound.precision)) + " outside its bound");
      std::printf("exp %s precision=%d max_ulp=%.3g max_relative=%.3g bound_ulp=%.3g bound_relative=%.3g\n",
                  dc::isa_name(isa), static_cast<int>(bound.precision), max_ulp, max_relative,
                  bound.max_ulp_float32, bound.max_relative);
    }
  }
  std::printf("%s\n", failures == 0 ? "ok" : "FAILED");
  return failures == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  if (mode == "isa") {
    std::printf("active=%s best=%s\n", dc::isa_name(dc::active_isa()), dc::isa_name(dc::best_isa()));
    return 0;
  }
  if (mode == "sweeps") return sweeps();
  if (mode == "exp-error") return exp_error();
  std::fprintf(stderr, "usage: %s isa|sweeps|exp-error\n", argv[0]);
  return 2;
}
