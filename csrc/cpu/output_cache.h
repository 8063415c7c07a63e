// Outputs of the CPU kernels from a bounded cache of freed blocks.
//
// A fresh multi-megabyte allocation costs the kernel that first writes it one page fault per page (the
// kernel zeroes each page first): measured 21 ms for the 68 MB fusion output of the head at B = 8 on the
// 2-core CI machine, where writing the same bytes into memory already touched takes 3 ms. So outputs of
// 1 MiB and more come from blocks that earlier outputs of the same rounded size freed, like the CUDA caching
// allocator does on a GPU; smaller ones take at::empty as usual. The cache holds at most `limit` bytes of
// freed blocks (1 GiB until decafa_fast.ops sets DECAFA_CPU_CACHE_MB's value, parsed in Python; 0 turns it
// off), and `empty` gives them back to the system. Allocations and frees are reported to the PyTorch
// profiler like the default allocator's.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/MemoryFormat.h>
#include <c10/core/TensorOptions.h>

#include <cstddef>

namespace decafa {
namespace cpu {

// at::empty(sizes, options, format) for a CPU tensor, from the cache when it is large.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options,
                        at::MemoryFormat format = at::MemoryFormat::Contiguous);

// A contiguous tensor of t's shape and options.
at::Tensor empty_output_like(const at::Tensor& t);

}  // namespace cpu
}  // namespace decafa

// For decafa_fast.ops.cpu_cache (ctypes): bytes of freed blocks held, bytes handed out and still alive,
// the limit, and emptying the cache. None throws; the two that act return 0, or -1 where they failed.
extern "C" {
size_t decafa_cpu_cache_cached_bytes();
size_t decafa_cpu_cache_live_bytes();
size_t decafa_cpu_cache_limit();
int decafa_cpu_cache_set_limit(size_t bytes);
int decafa_cpu_cache_empty();
}
