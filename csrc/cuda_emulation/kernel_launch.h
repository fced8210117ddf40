// FASTVID_KERNEL_LAUNCH(kernel, grid, block, stream, args...): kernel<<<grid, block, 0, stream>>>(args...)
// under nvcc; on a host compiler, the same grid run on the CPU by cuda_host_shim.h (tests only).
// `kernel` is a plain name (take a pointer first for a template instance: its commas would split
// the macro arguments).
#pragma once

#if defined(__CUDACC__)
#define FASTVID_KERNEL_LAUNCH(kernel, grid, block, stream, ...) kernel<<<grid, block, 0, stream>>>(__VA_ARGS__)
#else
#include "cuda_host_shim.h"
#define FASTVID_KERNEL_LAUNCH(kernel, grid, block, stream, ...) \
  ((void)(stream), ::fastvid_emu::launch(grid, block, kernel, __VA_ARGS__))
#endif
