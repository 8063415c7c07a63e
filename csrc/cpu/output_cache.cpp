// The output cache of the CPU kernels (see output_cache.h).
#include "output_cache.h"

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <c10/core/Allocator.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <unordered_map>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__unix__)
#include <pthread.h>
#endif

namespace decafa {
namespace cpu {
namespace {

constexpr size_t kMiB = size_t(1) << 20;
// Blocks are whole multiples of 2 MiB, aligned to 2 MiB: a transparent huge page each where the system
// allows them (one fault per 2 MiB instead of 512), and a few sizes that repeat from call to call.
constexpr size_t kGranule = 2 * kMiB;
constexpr size_t kSmallest = kMiB;  // below: at::empty

// The limit until decafa_fast.ops sets the one of DECAFA_CPU_CACHE_MB, which Python parses and range-checks
// (decafa_fast/settings.py): nothing here reads the environment or can throw on a bad value.
constexpr size_t kDefaultLimit = 1024 * kMiB;

class OutputCache final : public c10::Allocator {
 public:
  // Never destroyed: tensors may outlive static destruction at exit and still give their blocks back.
  static OutputCache& instance() {
    static OutputCache* cache = new OutputCache();
    return *cache;
  }

  c10::DataPtr allocate(size_t n) override {
    const size_t size = (n + kGranule - 1) / kGranule * kGranule;
    void* p = take(size);
    if (p == nullptr) p = fresh(size);
    size_t live, reserved;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      live_[p] = size;
      live_bytes_ += size;
      live = live_bytes_;
      reserved = live_bytes_ + cached_bytes_;
    }
    c10::reportMemoryUsageToProfiler(p, static_cast<int64_t>(size), live, reserved, c10::Device(c10::kCPU));
    return {p, p, &OutputCache::release, c10::Device(c10::kCPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  size_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return cached_bytes_;
  }
  size_t live_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return live_bytes_;
  }
  size_t limit() {
    std::lock_guard<std::mutex> lock(mutex_);
    return limit_;
  }
  void set_limit(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    limit_ = bytes;
    trim_locked();
  }
  void empty() { set_limit_and_restore(0); }

 private:
  OutputCache() : limit_(kDefaultLimit) {
#if defined(__unix__)
    // A fork (a DataLoader worker) while another thread holds the lock would leave the child's copy locked
    // forever: hold it across the fork, then release it on both sides.
    pthread_atfork([] { instance().mutex_.lock(); }, [] { instance().mutex_.unlock(); },
                   [] { instance().mutex_.unlock(); });
#endif
  }

  static void release(void* p) { instance().give_back(p); }

  // A cached block of exactly `size` bytes, or null.
  void* take(size_t size) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto it = free_.find(size);
    if (it == free_.end()) return nullptr;
    void* p = it->second;
    free_.erase(it);
    cached_bytes_ -= size;
    return p;
  }

  void* fresh(size_t size) {
    void* p = std::aligned_alloc(kGranule, size);
    if (p == nullptr) {  // the cached blocks may be what is missing
      empty();
      p = std::aligned_alloc(kGranule, size);
    }
    TORCH_CHECK_WITH(OutOfMemoryError, p != nullptr, "decafa CPU kernels: out of memory allocating ", size,
                     " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(p, size, MADV_HUGEPAGE);  // a hint: without huge pages the block works the same
#endif
    return p;
  }

  void give_back(void* p) {
    size_t size, live, reserved;
    bool cached;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      const auto it = live_.find(p);
      size = it->second;
      live_.erase(it);
      live_bytes_ -= size;
      cached = cached_bytes_ + size <= limit_;
      if (cached) {
        free_.emplace(size, p);
        cached_bytes_ += size;
      }
      live = live_bytes_;
      reserved = live_bytes_ + cached_bytes_;
    }
    if (!cached) std::free(p);
    c10::reportMemoryUsageToProfiler(p, -static_cast<int64_t>(size), live, reserved, c10::Device(c10::kCPU));
  }

  // Frees every cached block, keeping the limit.
  void set_limit_and_restore(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    const size_t kept = limit_;
    limit_ = bytes;
    trim_locked();
    limit_ = kept;
  }

  void trim_locked() {
    while (cached_bytes_ > limit_) {
      const auto largest = std::prev(free_.end());
      cached_bytes_ -= largest->first;
      std::free(largest->second);
      free_.erase(largest);
    }
  }

  std::mutex mutex_;
  std::multimap<size_t, void*> free_;  // block size -> cached block
  std::unordered_map<void*, size_t> live_;  // handed-out block -> its size
  size_t cached_bytes_ = 0, live_bytes_ = 0, limit_;
};

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options, at::MemoryFormat format) {
  TORCH_CHECK(options.device().is_cpu(), "decafa CPU kernels: output on ", options.device());
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const size_t nbytes = static_cast<size_t>(numel) * options.dtype().itemsize();
  OutputCache& cache = OutputCache::instance();
  if (nbytes < kSmallest || cache.limit() == 0) return at::empty(sizes, options.memory_format(format));
  return at::detail::empty_generic(sizes, &cache, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(options.dtype()), format);
}

at::Tensor empty_output_like(const at::Tensor& t) { return empty_output(t.sizes(), t.options()); }

}  // namespace cpu
}  // namespace decafa

// ctypes calls these: no exception may cross into C (a std::system_error from a mutex would terminate).
extern "C" {
size_t decafa_cpu_cache_cached_bytes() {
  try {
    return decafa::cpu::OutputCache::instance().cached_bytes();
  } catch (...) {
    return 0;
  }
}
size_t decafa_cpu_cache_live_bytes() {
  try {
    return decafa::cpu::OutputCache::instance().live_bytes();
  } catch (...) {
    return 0;
  }
}
size_t decafa_cpu_cache_limit() {
  try {
    return decafa::cpu::OutputCache::instance().limit();
  } catch (...) {
    return 0;
  }
}
int decafa_cpu_cache_set_limit(size_t bytes) {
  try {
    decafa::cpu::OutputCache::instance().set_limit(bytes);
    return 0;
  } catch (...) {
    return -1;
  }
}
int decafa_cpu_cache_empty() {
  try {
    decafa::cpu::OutputCache::instance().empty();
    return 0;
  } catch (...) {
    return -1;
  }
}
}
