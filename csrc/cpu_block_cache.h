// A cache of big CPU blocks for the ops' results and scratch.
//
// With glibc's default malloc, a freed block of more than a few hundred KiB goes back to the system
// (munmap, or a trimmed heap), and the next tensor of that size is faulted in page by page: 0.4-0.7 us
// per 4 KiB page on the Intel Xeon of sessions 25-34, where the 4,672 faults of the two 2.4 MB results
// of a 4x96x8x28^2 channels_last_3d depthwise fwd+bwd step cost 2-3 ms, as much as its kernels. A
// training loop frees and re-allocates the same sizes every step, so the ops take their big tensors
// from here: blocks freed by fastvid tensors are kept (up to a limit) and handed out again, as
// PyTorch's CUDA caching allocator does on the GPU. Small blocks (under kMinBytes) stay with
// PyTorch's CPU allocator.
//
// The limit is the bytes kept while unused: FASTVID_CPU_BLOCK_CACHE_MB (read once, at the cache's first
// use; 0 turns the cache off), default kDefaultLimitMB. Blocks in use are not counted; a
// freed block that would take the cache over the limit pushes out the longest-unused ones.
// release() returns every kept block to the system (fastvid.empty_cpu_cache()).
#pragma once

#include <ATen/ATen.h>

#include <cstddef>
#include <cstdint>

namespace fastvid {
namespace cpu_block_cache {

constexpr size_t kMinBytes = size_t{256} << 10;
constexpr int64_t kDefaultLimitMB = 1024;

// at::empty(sizes, options) for CPU tensors, backed by a cached block where it is big enough; other
// devices get at::empty. options may carry a memory format.
// other_phase_of (optional): where the tensor gets a block, its data starts 64 bytes into it where
// that makes bit 6 of its distance to this address 1 (every block has 64 bytes to spare). A kernel
// that reads `other_phase_of` while it writes the result then never loads lines whose low 12 address
// bits equal those of the result lines it has just stored (4 KiB aliasing: such loads wait on the
// stores; see streams_output in depthwise3d_cpu.cpp). PyTorch's big CPU tensors and the blocks here
// come from posix_memalign(64) at the same offset in their pages, so without this the distance's
// bit 6 was 0 in every case seen.
at::Tensor empty(at::IntArrayRef sizes, const at::TensorOptions& options, const void* other_phase_of = nullptr);

struct Stats {
  int64_t limit_bytes;   // kept-while-unused limit
  int64_t cached_bytes;  // kept now
  int64_t hits;          // allocations served from a kept block
  int64_t misses;        // allocations of kMinBytes or more that needed a new block
};
Stats stats();
void release();

}  // namespace cpu_block_cache
}  // namespace fastvid
