// The cache of big CPU blocks (cpu_block_cache.h) and its ops for Python.
#include "cpu_block_cache.h"

#include <ATen/Context.h>
#include <ATen/EmptyTensor.h>
#include <ATen/native/TensorFactories.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cstdlib>
#include <limits>
#include <list>
#include <map>
#include <mutex>
#include <string>

namespace fastvid {
namespace cpu_block_cache {
namespace {

constexpr size_t kPageBytes = 4096;
constexpr size_t kPhaseBytes = 64;  // the spare bytes of each block: empty()'s other_phase_of

// The address whose 128-byte phase the next allocate() on this thread takes the other of (empty()).
thread_local const void* t_other_phase_of = nullptr;

int64_t limit_from_environment() {
  const char* mb = std::getenv("FASTVID_CPU_BLOCK_CACHE_MB");
  if (mb == nullptr || *mb == '\0') return kDefaultLimitMB << 20;
  char* end = nullptr;
  const long long value = std::strtoll(mb, &end, 10);  // skips leading spaces
  while (end != mb && std::isspace(static_cast<unsigned char>(*end))) ++end;  // and trailing ones, as FASTVID_CPU_ISA
  TORCH_CHECK_VALUE(end != mb && *end == '\0' && value >= 0,
                    "FASTVID_CPU_BLOCK_CACHE_MB must be a whole number of MiB >= 0 (0 turns fastvid's CPU block ",
                    "cache off), got '", mb, "'");
  // Beyond 2^43 MiB the byte count overflows int64 (it read as negative: the cache silently off); no
  // machine holds that much, so it is the same as no limit.
  constexpr long long kMaxMB = std::numeric_limits<int64_t>::max() >> 20;
  return static_cast<int64_t>(std::min(value, kMaxMB)) << 20;
}

struct Block {
  void* data;
  size_t bytes;                        // page multiple
  size_t requested = 0;                // of the allocation holding it (reported to the profiler)
  std::list<Block*>::iterator unused;  // its place in Cache::unused_ while kept
};

class Cache final : public c10::Allocator {
 public:
  explicit Cache(int64_t limit) : limit_(limit) {}

  c10::DataPtr allocate(size_t n) override {
    const size_t bytes = (n + kPhaseBytes + kPageBytes - 1) / kPageBytes * kPageBytes;
    Block* block = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      // The smallest kept block that fits without wasting more than an eighth (of its sizes, the most
      // recently freed).
      auto it = by_size_.lower_bound(bytes);
      if (it != by_size_.end() && it->first <= bytes + bytes / 8) {
        block = it->second;
        by_size_.erase(it);
        unused_.erase(block->unused);
        cached_bytes_ -= block->bytes;
        ++hits_;
      } else {
        ++misses_;
      }
    }
    if (block == nullptr) block = new Block{new_memory(bytes), bytes};
    block->requested = n;
    report(block, static_cast<int64_t>(n));
    char* data = static_cast<char*>(block->data);
    if (t_other_phase_of != nullptr) {
      const auto distance = reinterpret_cast<uintptr_t>(data) - reinterpret_cast<uintptr_t>(t_other_phase_of);
      if ((distance & kPhaseBytes) == 0) data += kPhaseBytes;
    }
    return {data, block, &Cache::free_block, at::Device(at::kCPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }

  // Keeps a freed block, pushing out the longest-unused ones beyond the limit.
  void keep(Block* block) {
    report(block, -static_cast<int64_t>(block->requested));
    std::list<Block*> evicted;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (static_cast<int64_t>(block->bytes) > limit_) {
        evicted.push_back(block);
      } else {
        while (cached_bytes_ + static_cast<int64_t>(block->bytes) > limit_) {
          evicted.push_back(take_oldest());
        }
        block->unused = unused_.insert(unused_.end(), block);
        // Before the kept blocks of its size: the most recently used block, the likeliest to be
        // still in cache, is handed out first.
        by_size_.emplace_hint(by_size_.lower_bound(block->bytes), block->bytes, block);
        cached_bytes_ += block->bytes;
      }
    }
    for (Block* b : evicted) destroy(b);
  }

  void release() {
    std::list<Block*> all;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      while (!unused_.empty()) all.push_back(take_oldest());
    }
    for (Block* b : all) destroy(b);
  }

  Stats stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {limit_, cached_bytes_.load(), hits_, misses_};
  }

  int64_t limit() const { return limit_; }

 private:
  static void free_block(void* context);

  Block* take_oldest() {  // mutex_ held, unused_ not empty
    Block* b = unused_.front();
    unused_.pop_front();
    auto range = by_size_.equal_range(b->bytes);
    for (auto it = range.first; it != range.second; ++it) {
      if (it->second == b) {
        by_size_.erase(it);
        break;
      }
    }
    cached_bytes_ -= b->bytes;
    return b;
  }

  // Out of memory with blocks kept: they go back to the system first (PyTorch's allocator's error
  // if that is not enough).
  void* new_memory(size_t bytes) {
    try {
      return c10::alloc_cpu(bytes);
    } catch (const c10::Error&) {
      if (cached_bytes_.load() == 0) throw;
    }
    release();
    return c10::alloc_cpu(bytes);
  }

  static void destroy(Block* b) {
    c10::free_cpu(b->data);
    delete b;
  }

  // torch.profiler's memory events, as PyTorch's CPU allocator reports them: fastvid's results count
  // in peak-memory measurements like any tensor's.
  void report(Block* block, int64_t delta) {
    const int64_t in_use = in_use_bytes_.fetch_add(delta) + delta;
    if (c10::memoryProfilingEnabled()) {
      c10::reportMemoryUsageToProfiler(block->data, delta, in_use, in_use + cached_bytes_.load(),
                                       at::Device(at::kCPU));
    }
  }

  const int64_t limit_;
  std::mutex mutex_;
  std::multimap<size_t, Block*> by_size_;
  std::list<Block*> unused_;  // longest unused first
  std::atomic<int64_t> cached_bytes_{0};  // written under mutex_, read by report() without it
  int64_t hits_ = 0;
  int64_t misses_ = 0;
  std::atomic<int64_t> in_use_bytes_{0};
};

// Never destroyed: tensors may be freed during interpreter shutdown, after static destructors ran.
std::atomic<Cache*> g_cache{nullptr};

// A forked child (DataLoader workers) may inherit the mutex locked by a thread it does not have: it
// starts a cache of its own (blocks it frees go there; the parent's kept blocks are left alone).
void start_new_cache_in_child() {
  Cache* old = g_cache.load();
  if (old != nullptr) g_cache.store(new Cache(old->limit()));
}

Cache& cache() {
  static Cache* const first = [] {
    auto* c = new Cache(limit_from_environment());
    g_cache.store(c);
    pthread_atfork(nullptr, nullptr, &start_new_cache_in_child);
    return c;
  }();
  (void)first;
  return *g_cache.load();
}

void Cache::free_block(void* context) { cache().keep(static_cast<Block*>(context)); }

}  // namespace

at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options, const void* other_phase_of) {
  Cache& c = cache();
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (options.device().type() != at::kCPU || options.pinned_memory() || c.limit() == 0 || bytes < kMinBytes) {
    return at::empty(sizes, options);
  }
  struct PhaseRequest {  // for the allocate() inside empty_generic, and no other
    explicit PhaseRequest(const void* p) { t_other_phase_of = p; }
    ~PhaseRequest() { t_other_phase_of = nullptr; }
  } request(other_phase_of);
  at::Tensor t = at::detail::empty_generic(sizes, &c, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                           c10::typeMetaToScalarType(options.dtype()),
                                           options.memory_format_opt());
  if (at::globalContext().deterministicAlgorithms() && at::globalContext().deterministicFillUninitializedMemory()) {
    at::native::fill_empty_deterministic_(t);
  }
  return t;
}

Stats stats() { return cache().stats(); }
void release() { cache().release(); }

}  // namespace cpu_block_cache
}  // namespace fastvid

TORCH_LIBRARY_IMPL(fastvid, CompositeImplicitAutograd, m) {
  m.impl("_cpu_block_cache_stats", [] {
    const auto s = fastvid::cpu_block_cache::stats();
    return std::vector<int64_t>{s.limit_bytes, s.cached_bytes, s.hits, s.misses};
  });
  m.impl("_cpu_block_cache_release", [] { fastvid::cpu_block_cache::release(); });
  m.impl("_cpu_block_cache_empty", [](at::IntArrayRef size) {
    return fastvid::cpu_block_cache::empty(size, at::TensorOptions().dtype(at::kFloat));
  });
}
