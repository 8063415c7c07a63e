// Non-temporal (streaming) stores for outputs written once and too large to stay in cache. A plain store
// first reads the cache line it writes (read for ownership), so writing a 68 MB output moves 136 MB; a
// streaming store does not. SSE2 is part of every x86-64 CPU, so no dispatch is needed; elsewhere (or for
// unaligned data) this is memcpy.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace decafa {
namespace cpu {

// Outputs at least this large are written with streaming stores (larger than the last-level caches of the
// machines we measured, so a later reader would find them in DRAM anyway).
constexpr size_t kStreamingBytes = size_t(32) << 20;

// dst[0, n) = src[0, n) (bytes), streaming where dst and src are 16-byte aligned.
inline void stream_copy(void* dst, const void* src, size_t n) {
#if defined(__SSE2__)
  if ((reinterpret_cast<uintptr_t>(dst) | reinterpret_cast<uintptr_t>(src)) % 16 == 0) {
    auto* d = static_cast<__m128i*>(dst);
    const auto* s = static_cast<const __m128i*>(src);
    const size_t vectors = n / 16;
    for (size_t i = 0; i < vectors; ++i) _mm_stream_si128(d + i, _mm_load_si128(s + i));
    std::memcpy(static_cast<char*>(dst) + vectors * 16, static_cast<const char*>(src) + vectors * 16, n % 16);
    return;
  }
#endif
  std::memcpy(dst, src, n);
}

// Orders this thread's streaming stores before whatever it does next (they are weakly ordered): each
// parallel task calls it before it ends, so that the threads that read the output later see them.
inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

}  // namespace cpu
}  // namespace decafa
