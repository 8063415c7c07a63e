// A minimal CPU emulation of the CUDA features the decafa kernels use, so that their logic (indexing,
// edges, reductions, barriers, chunking) can be run and checked on a machine without a GPU:
//   g++ -std=c++20 -ffp-contract=fast -fexpensive-optimizations -mfma -include kernels/smoke/cpu_emulation.h
//       <kernels with <<<>>> rewritten> ...   (FMA contraction as nvcc does by default)
// (tests/cuda/test_kernels_build.py does the rewriting: `k<<<g, b, s, st>>>(args)` ->
// `emu::launch("k", k, g, b, s, st, args)` and the `extern __shared__` line -> `emu::dynamic_smem()`).
//
// Every CUDA thread of a block is a fiber (ucontext) on one OS thread, run round-robin until it waits at a
// barrier or returns; blocks run one after another. __syncthreads waits for every live thread of the block;
// __shfl_xor_sync exchanges through a per-block array between two warp-wide barriers; a thread that
// returns leaves both barriers (as on the GPU). cp.async (the kernels' async_copy.cuh helpers): a thread's
// copies are queued per commit group and performed when it waits for the group (cp_async_wait), or at issue
// with EMU_ASYNC=eager; either way the bytes count as loads. __shared__ variables become function statics:
// shared by the threads of a block, and blocks never overlap. Device memory is host memory. Device facts
// come from EMU_SM_COUNT (default 1, so small grids still take the vector paths) and EMU_L2_BYTES.
// Dynamic shared memory is filled with NaN bytes before each block so that reading unwritten data shows.
// Every global load and store of a kernel is counted (bytes, per kernel name: emu::traffic()), which is how
// the bytes each pass moves are checked without a GPU.
// Not for performance, and only what the kernels need: float shuffles, 1-D/2-D blocks, one stream.
#pragma once

#define DECAFA_EMULATION 1

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <ucontext.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <memory>
#include <vector>

namespace emu {

// A barrier among the live threads of a group (the block, or one warp), for cooperative fibers.
struct Barrier {
  int alive = 0, arrived = 0;
  unsigned generation = 0;
  void release() {
    arrived = 0;
    ++generation;
  }
};

// A cp.async copy not yet performed (the emulation's model: a group of copies lands when the thread waits
// for it, or at issue with EMU_ASYNC=eager).
struct AsyncCopy {
  void* dst;
  const void* src;
  size_t bytes;
};

struct Fiber {
  ucontext_t context;
  char* stack;
  uint3 index;
  bool done = false;
  std::vector<AsyncCopy> open;                 // issued since the last commit
  std::vector<std::vector<AsyncCopy>> groups;  // committed, oldest first
};

constexpr size_t kStackBytes = 128 * 1024;

// Fiber stacks, allocated once (uninitialised) and reused by every launch.
inline char* fiber_stack(int i) {
  static std::vector<std::unique_ptr<char[]>> stacks;
  while (static_cast<int>(stacks.size()) <= i) stacks.emplace_back(new char[kStackBytes]);
  return stacks[i].get();
}

struct Block {
  Barrier sync;
  std::vector<Barrier> warps;
  std::vector<float> shuffle;
  std::vector<unsigned char> smem;
  std::vector<Fiber> fibers;
  std::function<void()> body;
  ucontext_t scheduler;
  int current = 0;
};

inline uint3 t_thread_idx, t_block_idx;
inline dim3 t_block_dim, t_grid_dim;
inline Block* t_block = nullptr;

inline int linear_thread() {
  return static_cast<int>(t_thread_idx.x + t_block_dim.x * (t_thread_idx.y + t_block_dim.y * t_thread_idx.z));
}

inline unsigned char* dynamic_smem() { return t_block->smem.data(); }

inline void yield() {
  Block& b = *t_block;
  swapcontext(&b.fibers[b.current].context, &b.scheduler);
}

// Arrive, then wait (yielding to the other fibers) until every live thread of the group has arrived.
inline void wait_at(Barrier& bar) {
  const unsigned generation = bar.generation;
  if (++bar.arrived == bar.alive) {
    bar.release();
    return;
  }
  while (bar.generation == generation) yield();
}

inline void syncthreads() { wait_at(t_block->sync); }

// __syncthreads_or: a barrier that also tells every thread whether any thread's predicate was non-zero.
inline int syncthreads_or(int predicate) {
  const int tid = linear_thread();
  t_block->shuffle[tid] = predicate != 0 ? 1.f : 0.f;
  wait_at(t_block->sync);
  int any = 0;
  for (size_t i = 0; i < t_block->fibers.size(); ++i) any |= t_block->shuffle[i] != 0.f;
  wait_at(t_block->sync);
  return any;
}

inline float shfl_xor_sync(unsigned, float v, int offset) {
  const int tid = linear_thread();
  Barrier& warp = t_block->warps[tid / 32];
  t_block->shuffle[tid] = v;
  wait_at(warp);
  const float r = t_block->shuffle[tid ^ offset];
  wait_at(warp);
  return r;
}

// __reduce_max_sync: the warp's maximum of an int (every lane of a whole warp takes part).
inline int reduce_max_sync(unsigned, int v) {
  const int tid = linear_thread();
  Barrier& warp = t_block->warps[tid / 32];
  float bits;
  std::memcpy(&bits, &v, sizeof bits);
  t_block->shuffle[tid] = bits;
  wait_at(warp);
  int r = v;
  for (int i = 0; i < 32; ++i) {
    int x;
    std::memcpy(&x, &t_block->shuffle[(tid & ~31) + i], sizeof x);
    r = x > r ? x : r;
  }
  wait_at(warp);
  return r;
}

// __shfl_sync: lane `src` of the warp (src < 32).
inline float shfl_sync(unsigned, float v, int src) {
  const int tid = linear_thread();
  Barrier& warp = t_block->warps[tid / 32];
  t_block->shuffle[tid] = v;
  wait_at(warp);
  const float r = t_block->shuffle[(tid & ~31) + (src & 31)];
  wait_at(warp);
  return r;
}

// cp.async: the bytes are counted as loads at issue; the copy itself is deferred to the wait that covers its
// group (so a read of a stage before its wait sees the NaN fill, and fails the comparison), or done at issue
// with EMU_ASYNC=eager (so a copy into a stage that another thread still reads overwrites it, and fails).
inline void count_load(size_t bytes);
inline bool async_eager() {
  static const bool eager = [] {
    const char* v = std::getenv("EMU_ASYNC");
    return v != nullptr && std::string(v) == "eager";
  }();
  return eager;
}

inline void cp_async(void* dst, const void* src, size_t bytes) {
  count_load(bytes);
  if (async_eager()) {
    std::memcpy(dst, src, bytes);
    return;
  }
  t_block->fibers[t_block->current].open.push_back({dst, src, bytes});
}

inline void cp_async_commit() {
  Fiber& f = t_block->fibers[t_block->current];
  f.groups.push_back(std::move(f.open));
  f.open.clear();
}

// All but the newest `pending` committed groups of this thread land (an uncommitted copy stays pending).
inline void cp_async_wait(int pending) {
  Fiber& f = t_block->fibers[t_block->current];
  while (static_cast<int>(f.groups.size()) > pending) {
    for (const AsyncCopy& c : f.groups.front()) std::memcpy(c.dst, c.src, c.bytes);
    f.groups.erase(f.groups.begin());
  }
}

template <typename T>
inline T ldg(const T* p) {
  return *p;
}

// A returning thread leaves its barriers (as on the GPU), which may complete a barrier the others wait at.
inline void leave(Barrier& bar) {
  if (--bar.alive > 0 && bar.arrived == bar.alive) bar.release();
}

inline void fiber_entry() {
  Block& b = *t_block;
  b.body();
  cp_async_commit();
  cp_async_wait(0);  // copies still in flight land before the thread is gone (as on the GPU)
  const int tid = linear_thread();
  leave(b.warps[tid / 32]);
  leave(b.sync);
  b.fibers[b.current].done = true;
}  // returns to the scheduler through uc_link

// Bytes loaded and stored by each kernel (by name), counted by the kernels' access helpers
// (DECAFA_COUNT_LOAD / DECAFA_COUNT_STORE) for every lane of every access, launches per kernel, and the
// accesses per width in bytes (which shows whether a path used vector accesses).
struct Traffic {
  unsigned long long loads = 0, stores = 0, launches = 0;
  std::map<size_t, unsigned long long> load_widths, store_widths;  // bytes per access -> accesses
};
inline std::map<std::string, Traffic>& traffic() {
  static std::map<std::string, Traffic> t;
  return t;
}
inline Traffic* t_traffic = nullptr;
inline void count_load(size_t bytes) {
  if (!t_traffic) return;
  t_traffic->loads += bytes;
  ++t_traffic->load_widths[bytes];
}
inline void count_store(size_t bytes) {
  if (!t_traffic) return;
  t_traffic->stores += bytes;
  ++t_traffic->store_widths[bytes];
}

// `name` is the kernel's name as written at the launch (template arguments dropped).
template <typename Kernel, typename... Args>
cudaError_t launch(const char* name, Kernel kernel, dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t,
                   Args... args) {
  std::string key(name);
  key = key.substr(0, key.find('<'));
  Traffic& traffic_of_kernel = traffic()[key];
  ++traffic_of_kernel.launches;
  t_traffic = &traffic_of_kernel;
  const int threads = static_cast<int>(block.x * block.y * block.z);
  if (threads <= 0 || threads > 1024 || threads % 32 != 0) return cudaErrorInvalidConfiguration;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaErrorInvalidConfiguration;
  Block blk;
  blk.fibers.resize(threads);
  for (int i = 0; i < threads; ++i) blk.fibers[i].stack = fiber_stack(i);
  blk.body = [&] { kernel(args...); };
  t_block = &blk;
  t_block_dim = block;
  t_grid_dim = grid;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        t_block_idx = {bx, by, bz};
        blk.sync = Barrier{threads, 0, 0};
        blk.warps.assign(threads / 32, Barrier{32, 0, 0});
        blk.shuffle.assign(threads, 0.f);
        blk.smem.assign(smem_bytes, 0xFF);  // NaN for float, and for half/bfloat16
        int id = 0;
        for (unsigned tz = 0; tz < block.z; ++tz)
          for (unsigned ty = 0; ty < block.y; ++ty)
            for (unsigned tx = 0; tx < block.x; ++tx, ++id) {
              Fiber& f = blk.fibers[id];
              f.index = {tx, ty, tz};
              f.done = false;
              f.open.clear();
              f.groups.clear();
              getcontext(&f.context);
              f.context.uc_stack.ss_sp = f.stack;
              f.context.uc_stack.ss_size = kStackBytes;
              f.context.uc_link = &blk.scheduler;
              makecontext(&f.context, fiber_entry, 0);
            }
        // Round-robin until every thread has returned; a fiber runs until it waits at a barrier or ends.
        for (int remaining = threads; remaining > 0;) {
          remaining = 0;
          for (int i = 0; i < threads; ++i) {
            Fiber& f = blk.fibers[i];
            if (f.done) continue;
            blk.current = i;
            t_thread_idx = f.index;
            swapcontext(&blk.scheduler, &f.context);
            remaining += f.done ? 0 : 1;
          }
        }
      }
  t_block = nullptr;
  t_traffic = nullptr;
  return cudaSuccess;
}

// __fmul_rn: the product rounded to float32 and never fused into an FMA with what follows (the volatile store
// forces the rounding even under -ffp-contract=fast, with which the emulation is built to contract a*b+c
// as nvcc does by default).
inline float fmul_rn(float a, float b) {
  volatile float product = a * b;
  return product;
}

inline int env_int(const char* name, int fallback) {
  const char* v = std::getenv(name);
  return v ? std::atoi(v) : fallback;
}

}  // namespace emu

// The kernels' access helpers report every global load and store here.
#define DECAFA_COUNT_LOAD(bytes) ::emu::count_load(bytes)
#define DECAFA_COUNT_STORE(bytes) ::emu::count_store(bytes)

// The CUDA built-ins and intrinsics the kernels use.
#define threadIdx (::emu::t_thread_idx)
#define blockIdx (::emu::t_block_idx)
#define blockDim (::emu::t_block_dim)
#define gridDim (::emu::t_grid_dim)
#define __syncthreads() ::emu::syncthreads()
#define __syncthreads_or(p) ::emu::syncthreads_or(p)
#define __shfl_xor_sync(mask, v, offset) ::emu::shfl_xor_sync(mask, v, offset)
#define __shfl_sync(mask, v, src) ::emu::shfl_sync(mask, v, src)
#define __reduce_max_sync(mask, v) ::emu::reduce_max_sync(mask, v)
#define __ldg(p) ::emu::ldg(p)
#define __expf(x) std::exp(x)
#define __logf(x) std::log(x)
#define __fmul_rn(a, b) ::emu::fmul_rn(a, b)
#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)
#undef __global__
#define __global__
#undef __device__
#define __device__
#undef __forceinline__
#define __forceinline__ inline
#undef __noinline__
#define __noinline__ __attribute__((noinline))
#undef __align__
#define __align__(n) alignas(n)

// The runtime API the launchers and the smoke test call, on host memory.
extern "C" {
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = emu::env_int("EMU_SM_COUNT", 1); break;
    case cudaDevAttrL2CacheSize: *value = emu::env_int("EMU_L2_BYTES", 50 << 20); break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = 227 * 1024; break;
    case cudaDevAttrMaxSharedMemoryPerMultiprocessor: *value = 228 * 1024; break;
    case cudaDevAttrComputeCapabilityMajor: *value = emu::env_int("EMU_CC_MAJOR", 9); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}
cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute, int value) {
  return value <= 227 * 1024 ? cudaSuccess : cudaErrorInvalidValue;
}
cudaError_t cudaMemsetAsync(void* p, int value, size_t count, cudaStream_t) {
  emu::Traffic& t = emu::traffic()["cudaMemsetAsync"];
  ++t.launches;
  t.stores += count;
  std::memset(p, value, count);
  return cudaSuccess;
}
cudaError_t cudaGetLastError(void) { return cudaSuccess; }
const char* cudaGetErrorString(cudaError_t) { return "error (CPU emulation)"; }
cudaError_t cudaMalloc(void** p, size_t size) {
  *p = std::malloc(size ? size : 1);
  return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
cudaError_t cudaFree(void* p) {
  std::free(p);
  return cudaSuccess;
}
cudaError_t cudaMemcpy(void* dst, const void* src, size_t count, cudaMemcpyKind) {
  std::memcpy(dst, src, count);
  return cudaSuccess;
}
cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }
}

// nvcc's runtime header has this overload for function pointers only when compiling CUDA.
template <typename F>
cudaError_t cudaFuncSetAttribute(F* entry, cudaFuncAttribute attr, int value) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(entry), attr, value);
}

// The kernels' cp.async helpers (async_copy.cuh), on the model above.
namespace decafa_kernels {
namespace detail {
using SmemAddr = unsigned char*;
inline SmemAddr smem_address(const void* p) { return static_cast<SmemAddr>(const_cast<void*>(p)); }
inline void cp_async16(SmemAddr smem, const void* gmem) { ::emu::cp_async(smem, gmem, 16); }
inline void cp_async4(SmemAddr smem, const void* gmem) { ::emu::cp_async(smem, gmem, 4); }
inline void cp_async_commit() { ::emu::cp_async_commit(); }
inline void cp_async_commit_if(bool p) {
  if (p) ::emu::cp_async_commit();
}
inline void cp_async_wait(int pending) { ::emu::cp_async_wait(pending); }
}  // namespace detail
}  // namespace decafa_kernels

// Cache-hinted loads and stores are plain ones here.
template <typename T>
inline T __ldcs(const T* p) {
  return *p;
}
template <typename T>
inline void __stcs(T* p, T v) {
  *p = v;
}
