// CUDA launchers of the depthwise 3D conv kernels (interface: depthwise3d_kernels.h). The kernels
// live in depthwise3d_cuda_kernels.cuh, which tests run on the CPU; this file only picks the dtype,
// the grid size, the stream and allocates the weight gradient's workspace. `*_cuda` take NDHWC
// tensors, `*_ncdhw_cuda` NCDHW ones (both any channel multiplier).
#include "depthwise3d_cuda_kernels.cuh"
#include "depthwise3d_kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

namespace fastvid {
namespace depthwise3d {
namespace {

int64_t multiprocessors() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }
int64_t max_blocks() { return multiprocessors() * 32; }

void forward(const ForwardArgs& a, bool ncdhw) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.dtype, "fastvid.depthwise_conv3d", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cuda::launch_forward<scalar_t>(a.geo, ncdhw, static_cast<const scalar_t*>(a.input),
                                   static_cast<const acc_t*>(a.weight), static_cast<const acc_t*>(a.bias),
                                   static_cast<scalar_t*>(a.output), max_blocks(),
                                   at::cuda::getCurrentCUDAStream().stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void input_grad(const InputGradArgs& a, bool ncdhw) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.dtype, "fastvid.depthwise_conv3d_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cuda::launch_input_grad<scalar_t>(a.geo, ncdhw, static_cast<const scalar_t*>(a.grad_output),
                                      static_cast<const acc_t*>(a.weight), static_cast<scalar_t*>(a.grad_input),
                                      max_blocks(), at::cuda::getCurrentCUDAStream().stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void weight_grad(const WeightGradArgs& a, bool ncdhw) {
  if (a.grad_weight == nullptr && a.grad_bias == nullptr) return;
  const cuda::WeightGradPlan plan = cuda::weight_grad_plan(a.geo, ncdhw, multiprocessors() * 8);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.dtype, "fastvid.depthwise_conv3d_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // The partial sums, through the caching allocator on the current device and stream.
    const at::Tensor workspace =
        at::empty({plan.workspace_elems}, at::TensorOptions().device(at::kCUDA, at::cuda::current_device())
                                              .dtype(c10::CppTypeToScalarType<acc_t>::value));
    cuda::launch_weight_grad<scalar_t>(a.geo, ncdhw, plan, static_cast<const scalar_t*>(a.grad_output),
                                       static_cast<const scalar_t*>(a.input), workspace.data_ptr<acc_t>(),
                                       static_cast<acc_t*>(a.grad_weight), static_cast<acc_t*>(a.grad_bias),
                                       max_blocks(), at::cuda::getCurrentCUDAStream().stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

void forward_cuda(const ForwardArgs& args) { forward(args, false); }
void input_grad_cuda(const InputGradArgs& args) { input_grad(args, false); }
void weight_grad_cuda(const WeightGradArgs& args) { weight_grad(args, false); }
void forward_ncdhw_cuda(const ForwardArgs& args) { forward(args, true); }
void input_grad_ncdhw_cuda(const InputGradArgs& args) { input_grad(args, true); }
void weight_grad_ncdhw_cuda(const WeightGradArgs& args) { weight_grad(args, true); }

}  // namespace depthwise3d
}  // namespace fastvid
