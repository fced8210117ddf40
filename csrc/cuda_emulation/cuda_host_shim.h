// Runs CUDA kernels on the CPU, so CI machines without a GPU execute the real kernel bodies
// (csrc/*/*_cuda_kernels.cuh) and compare them with a reference. Only for tests: never compiled into
// fastvid._C.
//
// What it provides, with CUDA's meaning:
//   __global__/__device__/__host__/__forceinline__   plain (inline) host functions
//   threadIdx, blockIdx, blockDim, gridDim
//   __shared__                                        one object per kernel, i.e. per block, since the
//                                                     blocks of a grid run one after another
//   __syncthreads()                                   a barrier over the block's threads
//   launch(grid, block, kernel, args...)              kernel<<<grid, block>>>(args...), synchronous
// The threads of a block are fibers (ucontext) on the calling thread: each runs until it reaches
// __syncthreads or returns, then the next one runs; a block has passed a barrier when all its threads
// have reached it. So a thread that reads shared memory its peers write without a barrier in between
// reads stale data deterministically (thread 0, the usual reducer, runs first), and a barrier that
// not every thread of the block reaches is reported. Fiber switches are annotated for AddressSanitizer.
// __CUDA_ARCH__ stays undefined: device-only branches (e.g. expf instead of the host polynomial in
// recurrent_math.h) take their host form here.
#pragma once

#if defined(__CUDACC__)
#error "cuda_host_shim.h is for host compilers only"
#endif

#include <ucontext.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <stdexcept>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define FASTVID_EMU_ASAN 1
#endif

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// One OS thread runs every emulated thread, so these are plain globals, set before each fiber resumes.
inline dim3 threadIdx{0, 0, 0};
inline dim3 blockIdx{0, 0, 0};
inline dim3 blockDim;
inline dim3 gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static

namespace fastvid_emu {

// CUDA's limits on a launch configuration; a kernel launched outside them fails on a GPU.
inline void check_config(dim3 grid, dim3 block) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || threads == 0)
    throw std::invalid_argument("launch: empty grid or block");
  if (threads > 1024 || block.z > 64) throw std::invalid_argument("launch: more than 1024 threads per block");
  if (grid.y > 65535 || grid.z > 65535) throw std::invalid_argument("launch: gridDim.y/z above 65535");
  if (grid.x > 2147483647u) throw std::invalid_argument("launch: gridDim.x above 2^31 - 1");
}

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  bool done = false;
};

struct Scheduler {
  static constexpr size_t kStackBytes = 256 * 1024;
  ucontext_t main;
  std::vector<Fiber> fibers;
  unsigned current = 0;
  void (*body)(void*) = nullptr;  // runs the kernel for threadIdx
  void* body_arg = nullptr;
  const void* main_stack_bottom = nullptr;
  size_t main_stack_size = 0;
};

inline Scheduler*& scheduler() {
  static Scheduler* s = nullptr;
  return s;
}

// Switches from the running context to `to` (stack [bottom, bottom + size) for ASan).
inline void switch_context(ucontext_t* from, ucontext_t* to, const void* bottom, size_t size, bool exiting) {
#ifdef FASTVID_EMU_ASAN
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(exiting ? nullptr : &fake_stack, bottom, size);
  swapcontext(from, to);
  __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#else
  (void)bottom, (void)size, (void)exiting;
  swapcontext(from, to);
#endif
}

inline void yield_to_scheduler(bool exiting) {
  Scheduler& s = *scheduler();
  switch_context(&s.fibers[s.current].context, &s.main, s.main_stack_bottom, s.main_stack_size, exiting);
}

inline void fiber_entry() {
  Scheduler& s = *scheduler();
#ifdef FASTVID_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &s.main_stack_bottom, &s.main_stack_size);
#endif
  s.body(s.body_arg);
  s.fibers[s.current].done = true;
  yield_to_scheduler(true);
}

}  // namespace fastvid_emu

inline void __syncthreads() { fastvid_emu::yield_to_scheduler(false); }

namespace fastvid_emu {

// Runs one block: every thread to its next barrier in turn, until all have returned.
inline void run_block(Scheduler& s, unsigned threads) {
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = s.fibers[t];
    f.done = false;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.get();
    f.context.uc_stack.ss_size = Scheduler::kStackBytes;
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiber_entry, 0);
  }
  for (unsigned finished = 0; finished < threads;) {
    finished = 0;
    for (unsigned t = 0; t < threads; ++t) {
      s.current = t;
      threadIdx = dim3(t % blockDim.x, (t / blockDim.x) % blockDim.y, t / (blockDim.x * blockDim.y));
      switch_context(&s.main, &s.fibers[t].context, s.fibers[t].stack.get(), Scheduler::kStackBytes, false);
      finished += s.fibers[t].done;
    }
    if (finished != 0 && finished != threads) {
      std::fprintf(stderr, "cuda_host_shim: __syncthreads() not reached by every thread of block (%u, %u, %u)\n",
                   blockIdx.x, blockIdx.y, blockIdx.z);
      std::abort();
    }
  }
}

// kernel<<<grid, block>>>(args...) on the CPU; returns when the grid has finished.
template <typename Kernel, typename... Args>
void launch(dim3 grid, dim3 block, Kernel kernel, Args... args) {
  check_config(grid, block);
  const unsigned threads = block.x * block.y * block.z;
  gridDim = grid;
  blockDim = block;
  auto call = [&] { kernel(args...); };
  Scheduler s;
  s.fibers.resize(threads);
  for (Fiber& f : s.fibers) f.stack.reset(new char[Scheduler::kStackBytes]);
  s.body = [](void* arg) { (*static_cast<decltype(call)*>(arg))(); };
  s.body_arg = &call;
  scheduler() = &s;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        blockIdx = dim3(bx, by, bz);
        run_block(s, threads);
      }
  scheduler() = nullptr;
}

}  // namespace fastvid_emu
