// The choice of the CPU kernels' clone (isa.h). Torch-free, so that the standalone harness links it as is.
#include "isa.h"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#endif

namespace decafa {
namespace cpu {

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

#if DECAFA_ISA_CLONES
namespace {

// The features of the x86-64 ISA levels the clones are built for (x86-64-v3 includes v2), read with cpuid
// rather than __builtin_cpu_supports, whose feature names differ between compilers (clang 14 knows neither
// "x86-64-v3" nor "f16c"). A bit of each cpuid register, and the AVX state the OS must save (XCR0).
struct CpuidBits {
  unsigned leaf1_ecx = 0, leaf7_ebx = 0, ext1_ecx = 0;
  uint64_t xcr0 = 0;
};

CpuidBits read_cpuid() {
  CpuidBits b;
  unsigned eax, ebx, ecx, edx;
  if (__get_cpuid(1, &eax, &ebx, &ecx, &edx)) b.leaf1_ecx = ecx;
  if (__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) b.leaf7_ebx = ebx;
  if (__get_cpuid(0x80000001u, &eax, &ebx, &ecx, &edx)) b.ext1_ecx = ecx;
  constexpr unsigned kOsxsave = 1u << 27;
  if (b.leaf1_ecx & kOsxsave) {
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    b.xcr0 = (uint64_t(hi) << 32) | lo;
  }
  return b;
}

bool all_of(unsigned reg, unsigned bits) { return (reg & bits) == bits; }

// leaf 1 ecx: SSE3 0, SSSE3 9, FMA 12, CX16 13, SSE4.1 19, SSE4.2 20, MOVBE 22, POPCNT 23, XSAVE 26,
// OSXSAVE 27, AVX 28, F16C 29
constexpr unsigned kV3Leaf1 = (1u << 0) | (1u << 9) | (1u << 12) | (1u << 13) | (1u << 19) | (1u << 20) |
                              (1u << 22) | (1u << 23) | (1u << 26) | (1u << 27) | (1u << 28) | (1u << 29);
// leaf 7 ebx: BMI1 3, AVX2 5, BMI2 8
constexpr unsigned kV3Leaf7 = (1u << 3) | (1u << 5) | (1u << 8);
// leaf 0x80000001 ecx: LAHF/SAHF 0, LZCNT 5
constexpr unsigned kV3Ext1 = (1u << 0) | (1u << 5);
// leaf 7 ebx: AVX512F 16, AVX512DQ 17, AVX512CD 28, AVX512BW 30, AVX512VL 31
constexpr unsigned kV4Leaf7 = (1u << 16) | (1u << 17) | (1u << 28) | (1u << 30) | (1u << 31);
// XCR0: SSE and AVX state (bits 1, 2); AVX-512 opmask and upper registers (bits 5, 6, 7)
constexpr uint64_t kAvxState = 0x6, kAvx512State = 0xE0;

}  // namespace

bool cpu_supports(Isa isa) {
  static const CpuidBits b = read_cpuid();
  const bool v3 = all_of(b.leaf1_ecx, kV3Leaf1) && all_of(b.leaf7_ebx, kV3Leaf7) && all_of(b.ext1_ecx, kV3Ext1) &&
                  (b.xcr0 & kAvxState) == kAvxState;
  switch (isa) {
    case Isa::kAvx512: return v3 && all_of(b.leaf7_ebx, kV4Leaf7) && (b.xcr0 & kAvx512State) == kAvx512State;
    case Isa::kAvx2: return v3;
    default: return true;
  }
}
#else
bool cpu_supports(Isa isa) { return isa == Isa::kBaseline; }
#endif

Isa best_isa() {
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2}) {
    if (cpu_supports(isa)) return isa;
  }
  return Isa::kBaseline;
}

std::pair<Isa, std::string> choose_isa(const char* requested, Isa best) {
  if (requested == nullptr || *requested == '\0' || std::strcmp(requested, "auto") == 0) return {best, ""};
  for (Isa isa : {Isa::kAvx512, Isa::kAvx2, Isa::kBaseline}) {
    if (std::strcmp(requested, isa_name(isa)) != 0) continue;
    if (static_cast<int>(isa) <= static_cast<int>(best)) return {isa, ""};
    return {best, std::string("decafa-fast: ") + kIsaVariable + "=" + requested + " asks for an ISA this " +
                      (DECAFA_ISA_CLONES ? "CPU lacks" : "build has no clone for") + "; the CPU kernels use " +
                      isa_name(best)};
  }
  return {best, std::string("decafa-fast: ") + kIsaVariable + "=" + requested +
                    " is not one of avx512, avx2, baseline, auto; the CPU kernels use " + isa_name(best) +
                    " (auto)"};
}

Isa active_isa() {
  static const Isa isa = [] {
    const auto [chosen, warning] = choose_isa(std::getenv(kIsaVariable), best_isa());
    if (!warning.empty()) std::fprintf(stderr, "%s\n", warning.c_str());
    return chosen;
  }();
  return isa;
}

}  // namespace cpu
}  // namespace decafa

// The active clone's name, for tests and diagnostics: a plain C symbol, so that Python reads it with ctypes
// from the loaded library whichever way it was built, without a schema of its own.
extern "C" __attribute__((visibility("default"))) const char* decafa_cpu_isa() {
  return decafa::cpu::isa_name(decafa::cpu::active_isa());
}
