// Helpers shared by every op family.
#pragma once

#include <c10/util/Exception.h>

// CPU inner loops are compiled three times (AVX-512, AVX2, baseline) and the loader picks the best
// clone for the running CPU: runtime ISA dispatch without building the extension per ISA.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTVID_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTVID_CPU_CLONES
#endif

// Calls name##_cuda(args) for CUDA tensors and name##_cpu(args) otherwise; without CUDA kernels in
// the build, CUDA tensors get a clear error instead of a missing symbol.
#ifdef FASTVID_WITH_CUDA
#define FASTVID_LAUNCH(name, args, device)       \
  do {                                           \
    if ((device).is_cuda()) name##_cuda(args);   \
    else name##_cpu(args);                       \
  } while (0)
#else
#define FASTVID_LAUNCH(name, args, device)                                                         \
  do {                                                                                             \
    TORCH_CHECK(!(device).is_cuda(), "fastvid was built without CUDA kernels; rebuild with a CUDA " \
                "toolkit and a CUDA build of torch, or use fastvid.backend('reference')");         \
    name##_cpu(args);                                                                              \
  } while (0)
#endif
