// Runs CUDA kernels on the CPU, so CI machines without a GPU execute the real kernel bodies
// (csrc/*/*_cuda_kernels.cuh) and compare them with a reference. Only for tests: never compiled into
// fastvid._C.
//
// What it provides, with CUDA's meaning:
//   __global__/__device__/__host__/__forceinline__   plain (inline) host functions
//   threadIdx, blockIdx (per emulated thread), blockDim, gridDim
//   __shared__                                        one object per kernel, i.e. per block, since the
//                                                     blocks of a grid run one after another
//   __syncthreads()                                   a barrier over the block's threads
//   launch(grid, block, kernel, args...)              kernel<<<grid, block>>>(args...), synchronous
// Every thread of a block is a std::thread, so the threads of a block really run concurrently and
// a missing __syncthreads can show up as a wrong result (and under -fsanitize=thread as a race).
// Blocks run in order, all threads of one block finishing (a barrier) before the next starts.
// __CUDA_ARCH__ stays undefined: device-only branches (e.g. expf instead of the host polynomial in
// recurrent_math.h) take their host form here.
#pragma once

#if defined(__CUDACC__)
#error "cuda_host_shim.h is for host compilers only"
#endif

#include <barrier>
#include <cstdint>
#include <functional>
#include <stdexcept>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local dim3 threadIdx{0, 0, 0};
inline thread_local dim3 blockIdx{0, 0, 0};
inline dim3 blockDim;  // written before the threads start, read-only while they run
inline dim3 gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static

namespace fastvid_emu {

inline std::barrier<>*& block_barrier() {
  static std::barrier<>* b = nullptr;
  return b;
}

// CUDA's limits on a launch configuration; a kernel launched outside them fails on a GPU.
inline void check_config(dim3 grid, dim3 block) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || threads == 0)
    throw std::invalid_argument("launch: empty grid or block");
  if (threads > 1024 || block.z > 64) throw std::invalid_argument("launch: more than 1024 threads per block");
  if (grid.y > 65535 || grid.z > 65535) throw std::invalid_argument("launch: gridDim.y/z above 65535");
  if (grid.x > 2147483647u) throw std::invalid_argument("launch: gridDim.x above 2^31 - 1");
}

}  // namespace fastvid_emu

inline void __syncthreads() { fastvid_emu::block_barrier()->arrive_and_wait(); }

namespace fastvid_emu {

// kernel<<<grid, block>>>(args...) on the CPU; returns when the grid has finished.
template <typename Kernel, typename... Args>
void launch(dim3 grid, dim3 block, Kernel kernel, Args... args) {
  check_config(grid, block);
  const unsigned threads = block.x * block.y * block.z;
  gridDim = grid;
  blockDim = block;
  std::barrier<> barrier(threads);
  block_barrier() = &barrier;
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (unsigned t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] {
      threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
      for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
          for (unsigned bx = 0; bx < grid.x; ++bx) {
            blockIdx = dim3(bx, by, bz);
            kernel(args...);
            barrier.arrive_and_wait();  // the block is done before the next one reuses __shared__
          }
    });
  }
  for (std::thread& th : pool) th.join();
  block_barrier() = nullptr;
}

}  // namespace fastvid_emu
