// The CPU kernels' exp (csrc/cpu/vexp.h) against ATen's vectorised exps (at::vec::Vectorized<float>:
// exp(), Sleef's 1-ulp exp; exp_u20(), an inline 20-ulp polynomial; fexp_u20(), a bit-trick exp), on the
// inputs the kernels give it (s - max s in [kExpLowest, 0]): time per element on an in-cache array (the exp's own
// cost, not memory) and the largest relative error against exp in float64. Built and run by
// bench/vexp_vs_aten.py for AVX-512 (the clone CI and the benchmarks run); prints one line per exp.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include <ATen/cpu/vec/vec.h>

#include "vexp.h"

namespace {

using decafa::cpu::ExpPrecision;
using decafa::cpu::vexp;
using Vec = at::vec::Vectorized<float>;

constexpr int kElements = 8192;  // 32 KiB in, 32 KiB out: both stay in L1 / L2
constexpr int kRepeats = 2000;   // calls per timing
constexpr int kTimings = 15;     // best of

template <ExpPrecision kPrecision>
void ours(const float* x, float* y, int n) {
#pragma omp simd
  for (int i = 0; i < n; ++i) y[i] = vexp<kPrecision>(x[i]);
}

template <Vec (Vec::*kExp)() const>
void aten(const float* x, float* y, int n) {
  for (int i = 0; i < n; i += Vec::size()) (Vec::loadu(x + i).*kExp)().store(y + i);
}

using ExpLoop = void (*)(const float*, float*, int);

double nanoseconds_per_element(ExpLoop f, const std::vector<float>& x, std::vector<float>& y) {
  double best = 1e30;
  for (int t = 0; t < kTimings; ++t) {
    const auto start = std::chrono::steady_clock::now();
    for (int r = 0; r < kRepeats; ++r) {
      f(x.data(), y.data(), kElements);
      asm volatile("" : : "r"(y.data()) : "memory");  // keep every call
    }
    const std::chrono::duration<double, std::nano> took = std::chrono::steady_clock::now() - start;
    best = std::min(best, took.count() / (double(kRepeats) * kElements));
  }
  return best;
}

struct Worst {
  double relative_error;
  float at;
};

Worst largest_relative_error(ExpLoop f) {
  // a dense grid of 2^24 points of [kExpLowest, 0], the range where vexp computes (below it, it returns 0,
  // as exp there is under 1.7e-38 and every kernel's sum is at least 1)
  constexpr int kGrid = 1 << 24;
  std::vector<float> x(kGrid), y(kGrid);
  for (int i = 0; i < kGrid; ++i) x[i] = decafa::cpu::kExpLowest * float(i) / float(kGrid - 1);
  f(x.data(), y.data(), kGrid);
  Worst worst{0.0, 0.0f};
  for (int i = 0; i < kGrid; ++i) {
    const double want = std::exp(double(x[i]));
    const double error = std::abs(double(y[i]) - want) / want;
    if (error > worst.relative_error) worst = {error, x[i]};
  }
  return worst;
}

}  // namespace

int main() {
  std::mt19937 rng(0);
  std::uniform_real_distribution<float> logit(decafa::cpu::kExpLowest, 0.0f);
  std::vector<float> x(kElements), y(kElements);
  for (float& v : x) v = logit(rng);
  const struct {
    const char* name;
    ExpLoop loop;
  } exps[] = {
      {"decafa vexp<kFloat> (float32 logits)", ours<ExpPrecision::kFloat>},
      {"decafa vexp<kHalf> (float16 logits)", ours<ExpPrecision::kHalf>},
      {"decafa vexp<kBFloat16> (bfloat16 logits)", ours<ExpPrecision::kBFloat16>},
      {"ATen Vectorized<float>::exp (Sleef u10)", aten<&Vec::exp>},
      {"ATen Vectorized<float>::exp_u20", aten<&Vec::exp_u20>},
      {"ATen Vectorized<float>::fexp_u20", aten<&Vec::fexp_u20>},
  };
  std::printf("| exp | ns per element (in cache, best of %d) | largest relative error on [%.2f, 0] | at x |\n",
              kTimings, double(decafa::cpu::kExpLowest));
  std::printf("|---|---|---|---|\n");
  for (const auto& e : exps) {
    const Worst worst = largest_relative_error(e.loop);
    std::printf("| %s | %.3f | %.2e | %.4g |\n", e.name, nanoseconds_per_element(e.loop, x, y),
                worst.relative_error, double(worst.at));
  }
  return 0;
}
