// Helpers shared by every op family.
#pragma once

#include <c10/util/Exception.h>

// CPU inner loops are compiled once per ISA path and picked at run time: see cpu_isa.h.

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
