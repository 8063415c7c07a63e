// Which instruction set the CPU kernels run with, and the dispatch to it.
//
// Each kernel of map_math.h and fusion_tiles.h (a function `name_impl`, always inlined) is compiled three times by
// DECAFA_ISA_DISPATCH(name): for x86-64-v4 (AVX-512), x86-64-v3 (AVX2 + FMA) and the baseline ISA, and
// `name(...)` calls the one active_isa() names. The dispatch is written out here instead of GCC's
// target_clones, whose resolver picks a clone at load time with no way to force another: a forced choice
// (DECAFA_CPU_ISA) is what lets a test run every clone on one machine, and the per-function target attribute
// it rests on is one GCC and clang both honour, so a clang build gets the same clones. The ISA levels keep
// each clone's features together (a list "avx2,fma" would make two clones, AVX2 without FMA and FMA without
// AVX2). tests/ops/test_cpu_simd.py checks each clone's vector width in the built library (objdump).
//
// Torch-free: the standalone harness (tests/ops/cpu_simd_harness.cpp) includes it and links isa.cpp.
#pragma once

#include <string>
#include <utility>

// Always inlined: how a kernel's helpers get the ISA of the clone that calls them.
#if defined(__GNUC__)
#define DECAFA_INLINE inline __attribute__((always_inline))
#else
#define DECAFA_INLINE inline
#endif

namespace decafa {
namespace cpu {

enum class Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// The environment variable that forces the kernels' ISA: "avx512", "avx2", "baseline" or "auto" (unset or
// empty: auto, the best the CPU supports).
constexpr const char* kIsaVariable = "DECAFA_CPU_ISA";

// "avx512", "avx2", "baseline".
const char* isa_name(Isa isa);

// Whether this CPU (and its OS, for the AVX state) runs code built for `isa`. Baseline always.
bool cpu_supports(Isa isa);

// The best ISA this CPU supports among those this build has clones for (baseline off x86-64).
Isa best_isa();

// What `requested` (DECAFA_CPU_ISA's value, or null when unset) selects on a CPU whose best ISA is `best`,
// and a one-line warning when the request was not honoured as written (not a known name: auto is used; an
// ISA the CPU lacks: the best it has). Never throws.
std::pair<Isa, std::string> choose_isa(const char* requested, Isa best);

// The ISA every kernel call of this process runs with: choose_isa(DECAFA_CPU_ISA, best_isa()), resolved
// once, at the first call (its warning, if any, goes to stderr then).
Isa active_isa();

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define DECAFA_ISA_CLONES 1
#define DECAFA_TARGET_AVX512 __attribute__((target("arch=x86-64-v4")))
#define DECAFA_TARGET_AVX2 __attribute__((target("arch=x86-64-v3")))
// NAME(args...) runs NAME##_impl(args...) compiled for active_isa(). NAME##_impl must be always inlined
// (DECAFA_INLINE), and so must everything it calls whose loops should get the clone's vectors: a function
// left out of line is compiled for the baseline. The baseline clone is kept out of line as the others are,
// so that each clone is a symbol of its own that tests/ops/test_cpu_simd.py finds in the library.
#define DECAFA_ISA_DISPATCH(NAME)                                                          \
  template <typename... Args>                                                              \
  DECAFA_TARGET_AVX512 decltype(auto) NAME##_avx512(Args&&... args) {                      \
    return NAME##_impl(std::forward<Args>(args)...);                                       \
  }                                                                                        \
  template <typename... Args>                                                              \
  DECAFA_TARGET_AVX2 decltype(auto) NAME##_avx2(Args&&... args) {                          \
    return NAME##_impl(std::forward<Args>(args)...);                                       \
  }                                                                                        \
  template <typename... Args>                                                              \
  __attribute__((noinline)) decltype(auto) NAME##_baseline(Args&&... args) {               \
    return NAME##_impl(std::forward<Args>(args)...);                                       \
  }                                                                                        \
  template <typename... Args>                                                              \
  inline decltype(auto) NAME(Args&&... args) {                                             \
    switch (::decafa::cpu::active_isa()) {                                                 \
      case ::decafa::cpu::Isa::kAvx512:                                                    \
        return NAME##_avx512(std::forward<Args>(args)...);                                 \
      case ::decafa::cpu::Isa::kAvx2:                                                      \
        return NAME##_avx2(std::forward<Args>(args)...);                                   \
      default:                                                                             \
        return NAME##_baseline(std::forward<Args>(args)...);                               \
    }                                                                                      \
  }
#else
#define DECAFA_ISA_CLONES 0
#define DECAFA_ISA_DISPATCH(NAME)                          \
  template <typename... Args>                              \
  inline decltype(auto) NAME(Args&&... args) {             \
    return NAME##_impl(std::forward<Args>(args)...);       \
  }
#endif

}  // namespace cpu
}  // namespace decafa
