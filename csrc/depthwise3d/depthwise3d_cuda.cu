// CUDA launchers of the depthwise 3D conv kernels (interface: depthwise3d_kernels.h). A thin layer
// over the per-element formulas of depthwise3d_math.h, which the CPU kernel also runs (for channel
// multiplier m > 1): one grid-stride thread per output (forward) or input (input gradient) element,
// channels fastest so neighbouring threads read neighbouring NDHWC elements; the weight and bias
// gradients reduce over all output positions in one block per (32 output channels, tap).
#include "depthwise3d_kernels.h"
#include "depthwise3d_math.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>

namespace fastvid {
namespace depthwise3d {
namespace {

constexpr int kThreads = 256;

int64_t blocks_for(int64_t n) { return std::min<int64_t>((n + kThreads - 1) / kThreads, 1 << 16); }

template <typename scalar_t>
__global__ void forward_kernel(Geometry g, const scalar_t* input, const at::opmath_type<scalar_t>* weight,
                               const at::opmath_type<scalar_t>* bias, scalar_t* output, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t Cout = g.out_channels();
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t o = i % Cout, position = i / Cout;
    const int64_t ow = position % g.out[2], oh = (position / g.out[2]) % g.out[1];
    const int64_t ot = (position / (g.out[2] * g.out[1])) % g.out[0];
    const int64_t b = position / (g.out[2] * g.out[1] * g.out[0]);
    output[i] = static_cast<scalar_t>(forward_element<scalar_t, acc_t>(g, input, weight, bias, b, ot, oh, ow, o));
  }
}

template <typename scalar_t>
__global__ void input_grad_kernel(Geometry g, const scalar_t* grad_output, const at::opmath_type<scalar_t>* weight,
                                  scalar_t* grad_input, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = g.channels;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = i % C, position = i / C;
    const int64_t iw = position % g.in[2], ih = (position / g.in[2]) % g.in[1];
    const int64_t it = (position / (g.in[2] * g.in[1])) % g.in[0];
    const int64_t b = position / (g.in[2] * g.in[1] * g.in[0]);
    grad_input[i] =
        static_cast<scalar_t>(input_grad_element<scalar_t, acc_t>(g, grad_output, weight, b, it, ih, iw, c));
  }
}

// blockIdx.x: 32 output channels (threadIdx.x), blockIdx.y: tap (taps() = bias); threadIdx.y strides
// over the output positions, then the 8 partial sums are reduced in shared memory.
constexpr int kChannelsPerBlock = 32, kLanes = 8;

template <typename scalar_t>
__global__ void weight_grad_kernel(Geometry g, const scalar_t* grad_output, const scalar_t* input,
                                   at::opmath_type<scalar_t>* grad_weight, at::opmath_type<scalar_t>* grad_bias,
                                   int64_t positions) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t partial[kLanes][kChannelsPerBlock];
  const int64_t o = blockIdx.x * static_cast<int64_t>(kChannelsPerBlock) + threadIdx.x;
  const int64_t tap = blockIdx.y;
  const bool wanted = tap < g.taps() ? grad_weight != nullptr : grad_bias != nullptr;
  acc_t sum(0);
  if (wanted && o < g.out_channels())
    for (int64_t p = threadIdx.y; p < positions; p += kLanes)
      sum += weight_grad_term<scalar_t, acc_t>(g, grad_output, input, p, tap, o);
  partial[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && wanted && o < g.out_channels()) {
    acc_t total(0);
    for (int l = 0; l < kLanes; ++l) total += partial[l][threadIdx.x];
    if (tap < g.taps()) grad_weight[tap * g.out_channels() + o] = total;
    else grad_bias[o] = total;
  }
}

}  // namespace

void forward_cuda(const ForwardArgs& a) {
  const Geometry& g = a.geo;
  const int64_t n = g.batch * g.out[0] * g.out[1] * g.out[2] * g.out_channels();
  if (n == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.dtype, "fastvid.depthwise_conv3d", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t><<<static_cast<unsigned>(blocks_for(n)), kThreads, 0,
                               at::cuda::getCurrentCUDAStream()>>>(
        g, static_cast<const scalar_t*>(a.input), static_cast<const acc_t*>(a.weight),
        static_cast<const acc_t*>(a.bias), static_cast<scalar_t*>(a.output), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void input_grad_cuda(const InputGradArgs& a) {
  const Geometry& g = a.geo;
  const int64_t n = g.batch * g.in[0] * g.in[1] * g.in[2] * g.channels;
  if (n == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.dtype, "fastvid.depthwise_conv3d_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    input_grad_kernel<scalar_t><<<static_cast<unsigned>(blocks_for(n)), kThreads, 0,
                                  at::cuda::getCurrentCUDAStream()>>>(
        g, static_cast<const scalar_t*>(a.grad_output), static_cast<const acc_t*>(a.weight),
        static_cast<scalar_t*>(a.grad_input), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void weight_grad_cuda(const WeightGradArgs& a) {
  const Geometry& g = a.geo;
  if (a.grad_weight == nullptr && a.grad_bias == nullptr) return;
  const int64_t positions = g.batch * g.out[0] * g.out[1] * g.out[2];
  const dim3 grid(static_cast<unsigned>((g.out_channels() + kChannelsPerBlock - 1) / kChannelsPerBlock),
                  static_cast<unsigned>(g.taps() + 1));
  const dim3 block(kChannelsPerBlock, kLanes);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.dtype, "fastvid.depthwise_conv3d_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    weight_grad_kernel<scalar_t><<<grid, block, 0, at::cuda::getCurrentCUDAStream()>>>(
        g, static_cast<const scalar_t*>(a.grad_output), static_cast<const scalar_t*>(a.input),
        static_cast<acc_t*>(a.grad_weight), static_cast<acc_t*>(a.grad_bias), positions);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace depthwise3d
}  // namespace fastvid
