// CUDA launchers of the fused ConvLSTM / ConvGRU gate kernels (interface: recurrent_kernels.h). The
// kernels live in recurrent_cuda_kernels.cuh, which tests run on the CPU; this file only picks the
// dtype, the grid size and the stream.
#include "recurrent_cuda_kernels.cuh"

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

namespace fastvid {
namespace recurrent {
namespace {

int64_t max_blocks() { return int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32; }

}  // namespace

#define FASTVID_DEFINE_CUDA_LAUNCHER(fn, ArgsT, OpT)                                                \
  void fn(const ArgsT& args) {                                                                      \
    if (args.geo.batch * args.geo.channels * args.geo.pixels == 0) return;                          \
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.geo.dtype, #fn, [&] {            \
      cuda::launch_elementwise(cuda::OpT<scalar_t>{args}, max_blocks(), at::cuda::getCurrentCUDAStream().stream()); \
      C10_CUDA_KERNEL_LAUNCH_CHECK();                                                               \
    });                                                                                             \
  }

FASTVID_DEFINE_CUDA_LAUNCHER(lstm_forward_cuda, LstmForwardArgs, LstmForwardOp)
FASTVID_DEFINE_CUDA_LAUNCHER(lstm_backward_cuda, LstmBackwardArgs, LstmBackwardOp)
FASTVID_DEFINE_CUDA_LAUNCHER(gru_forward_cuda, GruForwardArgs, GruForwardOp)
FASTVID_DEFINE_CUDA_LAUNCHER(gru_backward_cuda, GruBackwardArgs, GruBackwardOp)
FASTVID_DEFINE_CUDA_LAUNCHER(gru_reset_forward_cuda, GruResetForwardArgs, GruResetForwardOp)
FASTVID_DEFINE_CUDA_LAUNCHER(gru_reset_backward_cuda, GruResetBackwardArgs, GruResetBackwardOp)

#undef FASTVID_DEFINE_CUDA_LAUNCHER

}  // namespace recurrent
}  // namespace fastvid
