// Asynchronous global -> shared copies (cp.async, sm_80+): the copies a thread issues are grouped by
// cp_async_commit and waited for by cp_async_wait(n) (all but the newest n groups of this thread complete);
// a __syncthreads after the wait makes every thread's copies visible to the block. The CPU emulation
// (smoke/cpu_emulation.h) supplies its own versions of these four functions, which model a group as copies
// performed when it is waited for (or at issue, EMU_ASYNC=eager) and count the bytes as loads.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace decafa_kernels {
namespace detail {

#ifndef DECAFA_EMULATION
// A shared-memory address as cp.async takes it (32 bits); found once, then advanced by byte offsets.
using SmemAddr = unsigned;
__device__ __forceinline__ SmemAddr smem_address(const void* p) {
  return static_cast<SmemAddr>(__cvta_generic_to_shared(p));
}

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
// 16 bytes, both addresses 16-byte aligned; .cg: cached in L2 only (the logits are touched once).
__device__ __forceinline__ void cp_async16(SmemAddr smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem), "l"(gmem) : "memory");
}

// 4 bytes, both addresses 4-byte aligned (a per-map constant).
__device__ __forceinline__ void cp_async4(SmemAddr smem, const void* gmem) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(smem), "l"(gmem) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// A commit under a predicate (one predicated instruction, no branch).
__device__ __forceinline__ void cp_async_commit_if(bool p) {
  asm volatile("{\n .reg .pred p;\n setp.ne.b32 p, %0, 0;\n @p cp.async.commit_group;\n}\n" ::"r"(static_cast<int>(p))
               : "memory");
}

// All but the newest `pending` groups of this thread are complete (pending: 0..3, uniform over the block).
__device__ __forceinline__ void cp_async_wait(int pending) {
  switch (pending) {
    case 0: asm volatile("cp.async.wait_group 0;\n" ::: "memory"); break;
    case 1: asm volatile("cp.async.wait_group 1;\n" ::: "memory"); break;
    case 2: asm volatile("cp.async.wait_group 2;\n" ::: "memory"); break;
    default: asm volatile("cp.async.wait_group 3;\n" ::: "memory"); break;
  }
}
#else
// Before sm_80 (a build for older GPUs): synchronous copies through registers, so the kernels still build and
// run correctly there, without the overlap.
__device__ __forceinline__ void cp_async16(SmemAddr smem, const void* gmem) {
  const uint4 v = *static_cast<const uint4*>(gmem);
  asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};\n" ::"r"(smem), "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}
__device__ __forceinline__ void cp_async4(SmemAddr smem, const void* gmem) {
  const unsigned v = *static_cast<const unsigned*>(gmem);
  asm volatile("st.shared.u32 [%0], %1;\n" ::"r"(smem), "r"(v) : "memory");
}
__device__ __forceinline__ void cp_async_commit() {}
__device__ __forceinline__ void cp_async_commit_if(bool) {}
__device__ __forceinline__ void cp_async_wait(int) {}
#endif
#endif

}  // namespace detail
}  // namespace decafa_kernels
