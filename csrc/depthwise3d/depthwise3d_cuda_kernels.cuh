// The depthwise 3D conv kernels of the CUDA build (launched by depthwise3d_cuda.cu). They need no
// CUDA runtime: tests/cuda_emulation runs them on the CPU under csrc/cuda_emulation's host shim.
//
// Both activation layouts run as they are, no copies: NDHWC (channels_last_3d) and NCDHW
// (contiguous). A Layout gives every operand's element strides; the thread order follows the layout
// so neighbouring threads touch neighbouring addresses (channels fastest for NDHWC, W fastest for
// NCDHW). Weights (acc type): [taps, C*m] with the NDHWC kernels, [C*m, taps] with the NCDHW ones.
// Geometry, the index helpers and the channel mapping o = c*m + j are those of depthwise3d_math.h.
//
// Forward / input gradient: one grid-stride thread per output / input element.
// Weight (and bias) gradient, deterministic: partial sums per (channel block, tap, chunk of output
// rows) written to a workspace [chunks, taps + 1, C*m], then reduced over the chunks in a fixed order.
// A row is (b, ot, oh); the tap is decoded once per block and the input row once per output row, so
// the inner loop over ow has no divisions.
#pragma once

#include "depthwise3d_math.h"
#include "../cuda_emulation/kernel_launch.h"

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>

namespace fastvid {
namespace depthwise3d {
namespace cuda {

// Element strides of a [B, C, T, H, W] activation.
struct Strides {
  int64_t b, c, t, h, w;
};

struct Layout {
  bool ncdhw;
  Strides in, out;     // input / grad_input; output / grad_output
  int64_t w_tap, w_o;  // weight element (tap, o) at tap * w_tap + o * w_o
};

inline Strides dense_strides(int64_t C, const int64_t* dims, bool ncdhw) {
  const int64_t T = dims[0], H = dims[1], W = dims[2];
  if (ncdhw) return {C * T * H * W, T * H * W, H * W, W, 1};
  return {T * H * W * C, 1, H * W * C, W * C, C};
}

inline Layout make_layout(const Geometry& g, bool ncdhw) {
  Layout L;
  L.ncdhw = ncdhw;
  L.in = dense_strides(g.channels, g.in, ncdhw);
  L.out = dense_strides(g.out_channels(), g.out, ncdhw);
  L.w_tap = ncdhw ? 1 : g.out_channels();
  L.w_o = ncdhw ? g.taps() : 1;
  return L;
}

// Decodes the dense index i of an activation with dims (C, d[0], d[1], d[2]) in the layout's order.
template <bool kNcdhw>
__device__ __forceinline__ void decode(int64_t i, int64_t C, const int64_t* d, int64_t* b, int64_t* c, int64_t* t,
                                       int64_t* h, int64_t* w) {
  if (kNcdhw) {
    *w = i % d[2];
    i /= d[2];
    *h = i % d[1];
    i /= d[1];
    *t = i % d[0];
    i /= d[0];
    *c = i % C;
    *b = i / C;
  } else {
    *c = i % C;
    i /= C;
    *w = i % d[2];
    i /= d[2];
    *h = i % d[1];
    i /= d[1];
    *t = i % d[0];
    *b = i / d[0];
  }
}

// output[b, o, ot, oh, ow] (before the cast to scalar_t).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t forward_at(const Geometry& g, const Layout& L, const scalar_t* input,
                                            const acc_t* weight, const acc_t* bias, int64_t b, int64_t o, int64_t ot,
                                            int64_t oh, int64_t ow) {
  const scalar_t* x = input + b * L.in.b + (o / g.multiplier) * L.in.c;
  acc_t acc = bias != nullptr ? bias[o] : acc_t(0);
  for (int64_t kt = 0; kt < g.kernel[0]; ++kt) {
    int64_t it;
    if (!input_index(ot, kt, g.stride[0], g.padding[0], g.dilation[0], g.in[0], &it)) continue;
    for (int64_t kh = 0; kh < g.kernel[1]; ++kh) {
      int64_t ih;
      if (!input_index(oh, kh, g.stride[1], g.padding[1], g.dilation[1], g.in[1], &ih)) continue;
      for (int64_t kw = 0; kw < g.kernel[2]; ++kw) {
        int64_t iw;
        if (!input_index(ow, kw, g.stride[2], g.padding[2], g.dilation[2], g.in[2], &iw)) continue;
        const int64_t tap = (kt * g.kernel[1] + kh) * g.kernel[2] + kw;
        acc += static_cast<acc_t>(x[it * L.in.t + ih * L.in.h + iw * L.in.w]) * weight[tap * L.w_tap + o * L.w_o];
      }
    }
  }
  return acc;
}

// grad_input[b, c, it, ih, iw]: a gather over every (output, tap) pair that reads the element.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t input_grad_at(const Geometry& g, const Layout& L, const scalar_t* grad_output,
                                               const acc_t* weight, int64_t b, int64_t c, int64_t it, int64_t ih,
                                               int64_t iw) {
  const int64_t m = g.multiplier;
  const scalar_t* go = grad_output + b * L.out.b + c * m * L.out.c;
  acc_t acc(0);
  for (int64_t kt = 0; kt < g.kernel[0]; ++kt) {
    int64_t ot;
    if (!output_index(it, kt, g.stride[0], g.padding[0], g.dilation[0], g.out[0], &ot)) continue;
    for (int64_t kh = 0; kh < g.kernel[1]; ++kh) {
      int64_t oh;
      if (!output_index(ih, kh, g.stride[1], g.padding[1], g.dilation[1], g.out[1], &oh)) continue;
      for (int64_t kw = 0; kw < g.kernel[2]; ++kw) {
        int64_t ow;
        if (!output_index(iw, kw, g.stride[2], g.padding[2], g.dilation[2], g.out[2], &ow)) continue;
        const int64_t tap = (kt * g.kernel[1] + kh) * g.kernel[2] + kw;
        const int64_t at = ot * L.out.t + oh * L.out.h + ow * L.out.w;
        for (int64_t j = 0; j < m; ++j)
          acc += static_cast<acc_t>(go[at + j * L.out.c]) * weight[tap * L.w_tap + (c * m + j) * L.w_o];
      }
    }
  }
  return acc;
}

template <typename scalar_t, bool kNcdhw>
__global__ void forward_kernel(Geometry g, Layout L, const scalar_t* input, const at::opmath_type<scalar_t>* weight,
                               const at::opmath_type<scalar_t>* bias, scalar_t* output, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t b, o, ot, oh, ow;
    decode<kNcdhw>(i, g.out_channels(), g.out, &b, &o, &ot, &oh, &ow);
    output[i] = static_cast<scalar_t>(forward_at<scalar_t, acc_t>(g, L, input, weight, bias, b, o, ot, oh, ow));
  }
}

template <typename scalar_t, bool kNcdhw>
__global__ void input_grad_kernel(Geometry g, Layout L, const scalar_t* grad_output,
                                  const at::opmath_type<scalar_t>* weight, scalar_t* grad_input, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t b, c, it, ih, iw;
    decode<kNcdhw>(i, g.channels, g.in, &b, &c, &it, &ih, &iw);
    grad_input[i] = static_cast<scalar_t>(input_grad_at<scalar_t, acc_t>(g, L, grad_output, weight, b, c, it, ih, iw));
  }
}

// ---------------------------------------------------------------- weight gradient
// Block: kWidth x kLanes threads. NDHWC: threadIdx.x = one of kWidth output channels (coalesced reads
// of the channel-innermost rows), threadIdx.y strides over the chunk's rows, each thread walks ow.
// NCDHW: one output channel per block, threadIdx.x strides over ow (the contiguous dim),
// threadIdx.y over the rows. grid = (channel blocks, taps + 1 (the last is the bias), chunks).
constexpr int kWidth = 32, kLanes = 8;

template <typename scalar_t, bool kNcdhw>
__global__ void weight_grad_partial_kernel(Geometry g, Layout L, const scalar_t* grad_output, const scalar_t* input,
                                           bool want_weight, bool want_bias, int64_t rows_per_chunk,
                                           at::opmath_type<scalar_t>* partial) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t sums[kLanes][kWidth];
  const int64_t Cout = g.out_channels(), taps = g.taps();
  const int64_t tap = blockIdx.y;
  const bool bias = tap == taps;
  if (bias ? !want_bias : !want_weight) return;  // uniform over the block
  const int64_t o = kNcdhw ? int64_t(blockIdx.x) : int64_t(blockIdx.x) * kWidth + threadIdx.x;
  const int64_t OT = g.out[0], OH = g.out[1], OW = g.out[2];
  const int64_t rows = g.batch * OT * OH;
  const int64_t row_end = std::min(rows, (int64_t(blockIdx.z) + 1) * rows_per_chunk);
  const int64_t kw = bias ? 0 : tap % g.kernel[2], kh = bias ? 0 : (tap / g.kernel[2]) % g.kernel[1];
  const int64_t kt = bias ? 0 : tap / (g.kernel[2] * g.kernel[1]);
  // Output columns ow whose input column iw = ow * stride - padding + kw * dilation lies inside [0, W).
  const int64_t shift = kw * g.dilation[2] - g.padding[2], sw = g.stride[2], W = g.in[2];
  const int64_t ow_begin = bias || shift >= 0 ? 0 : (-shift + sw - 1) / sw;
  const int64_t ow_end = bias ? OW : std::min(OW, W - shift <= 0 ? int64_t(0) : (W - shift + sw - 1) / sw);
  const int64_t ow_first = kNcdhw ? ow_begin + threadIdx.x : ow_begin;
  const int64_t ow_step = kNcdhw ? kWidth : 1;
  acc_t sum(0);
  if (o < Cout) {
    for (int64_t r = int64_t(blockIdx.z) * rows_per_chunk + threadIdx.y; r < row_end; r += kLanes) {
      const int64_t oh = r % OH, ot = (r / OH) % OT, b = r / (OH * OT);
      const scalar_t* go = grad_output + b * L.out.b + o * L.out.c + ot * L.out.t + oh * L.out.h;
      if (bias) {
        for (int64_t ow = ow_first; ow < ow_end; ow += ow_step) sum += static_cast<acc_t>(go[ow * L.out.w]);
        continue;
      }
      int64_t it, ih;
      if (!input_index(ot, kt, g.stride[0], g.padding[0], g.dilation[0], g.in[0], &it) ||
          !input_index(oh, kh, g.stride[1], g.padding[1], g.dilation[1], g.in[1], &ih))
        continue;
      const scalar_t* x = input + b * L.in.b + (o / g.multiplier) * L.in.c + it * L.in.t + ih * L.in.h;
      for (int64_t ow = ow_first; ow < ow_end; ow += ow_step)
        sum += static_cast<acc_t>(go[ow * L.out.w]) * static_cast<acc_t>(x[(ow * sw + shift) * L.in.w]);
    }
  }
  sums[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  // Fixed-order reduction: the result does not depend on thread timing.
  acc_t* slot = partial + (int64_t(blockIdx.z) * (taps + 1) + tap) * Cout;
  if (kNcdhw) {
    if (threadIdx.x == 0 && threadIdx.y == 0) {
      acc_t total(0);
      for (int l = 0; l < kLanes; ++l)
        for (int x = 0; x < kWidth; ++x) total += sums[l][x];
      slot[o] = total;
    }
  } else if (threadIdx.y == 0 && o < Cout) {
    acc_t total(0);
    for (int l = 0; l < kLanes; ++l) total += sums[l][threadIdx.x];
    slot[o] = total;
  }
}

// grad_weight[tap, o] (at tap * w_tap + o * w_o) and grad_bias[o]: the chunks' partial sums in order.
template <typename acc_t>
__global__ void weight_grad_reduce_kernel(Geometry g, Layout L, const acc_t* partial, int64_t chunks,
                                          acc_t* grad_weight, acc_t* grad_bias) {
  const int64_t Cout = g.out_channels(), taps = g.taps(), n = (taps + 1) * Cout;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t tap = i / Cout, o = i % Cout;
    acc_t* out = tap < taps ? (grad_weight ? grad_weight + tap * L.w_tap + o * L.w_o : nullptr)
                            : (grad_bias ? grad_bias + o : nullptr);
    if (out == nullptr) continue;
    acc_t total(0);
    for (int64_t k = 0; k < chunks; ++k) total += partial[k * n + i];
    *out = total;
  }
}

// How the weight gradient is split: enough chunks of output rows that the grid has about
// target_blocks blocks, each chunk at least one row per lane.
struct WeightGradPlan {
  dim3 grid, block;
  int64_t rows_per_chunk = 1, chunks = 1;
  int64_t workspace_elems = 0;  // acc_t elements of the partial sums
};

inline WeightGradPlan weight_grad_plan(const Geometry& g, bool ncdhw, int64_t target_blocks) {
  const int64_t Cout = g.out_channels(), rows = g.batch * g.out[0] * g.out[1];
  const int64_t channel_blocks = ncdhw ? Cout : (Cout + kWidth - 1) / kWidth;
  const int64_t blocks_per_chunk = channel_blocks * (g.taps() + 1);
  const int64_t max_chunks = std::max<int64_t>(1, std::min<int64_t>((rows + kLanes - 1) / kLanes, 65535));
  const int64_t wanted = std::clamp<int64_t>((target_blocks + blocks_per_chunk - 1) / blocks_per_chunk, 1, max_chunks);
  WeightGradPlan p;
  p.rows_per_chunk = std::max<int64_t>(1, (rows + wanted - 1) / wanted);
  p.chunks = std::max<int64_t>(1, (rows + p.rows_per_chunk - 1) / p.rows_per_chunk);
  p.grid = dim3(static_cast<unsigned>(channel_blocks), static_cast<unsigned>(g.taps() + 1),
                static_cast<unsigned>(p.chunks));
  p.block = dim3(kWidth, kLanes);
  p.workspace_elems = p.chunks * (g.taps() + 1) * Cout;
  return p;
}

// ---------------------------------------------------------------- launchers (shared with the tests)
constexpr int kThreads = 256;

inline dim3 grid_for(int64_t n, int64_t max_blocks) {
  return dim3(static_cast<unsigned>(std::max<int64_t>(1, std::min((n + kThreads - 1) / kThreads, max_blocks))));
}

template <typename scalar_t, typename Stream>
void launch_forward(const Geometry& g, bool ncdhw, const scalar_t* input, const at::opmath_type<scalar_t>* weight,
                    const at::opmath_type<scalar_t>* bias, scalar_t* output, int64_t max_blocks, Stream stream) {
  const int64_t n = g.batch * g.out[0] * g.out[1] * g.out[2] * g.out_channels();
  if (n == 0) return;
  const Layout L = make_layout(g, ncdhw);
  const auto kernel = ncdhw ? &forward_kernel<scalar_t, true> : &forward_kernel<scalar_t, false>;
  FASTVID_KERNEL_LAUNCH(kernel, grid_for(n, max_blocks), dim3(kThreads), stream, g, L, input, weight, bias, output, n);
}

template <typename scalar_t, typename Stream>
void launch_input_grad(const Geometry& g, bool ncdhw, const scalar_t* grad_output,
                       const at::opmath_type<scalar_t>* weight, scalar_t* grad_input, int64_t max_blocks,
                       Stream stream) {
  const int64_t n = g.batch * g.in[0] * g.in[1] * g.in[2] * g.channels;
  if (n == 0) return;
  const Layout L = make_layout(g, ncdhw);
  const auto kernel = ncdhw ? &input_grad_kernel<scalar_t, true> : &input_grad_kernel<scalar_t, false>;
  FASTVID_KERNEL_LAUNCH(kernel, grid_for(n, max_blocks), dim3(kThreads), stream, g, L, grad_output, weight, grad_input,
                        n);
}

// workspace: plan.workspace_elems acc_t elements (scratch). grad_weight / grad_bias may be nullptr.
template <typename scalar_t, typename Stream>
void launch_weight_grad(const Geometry& g, bool ncdhw, const WeightGradPlan& plan, const scalar_t* grad_output,
                        const scalar_t* input, at::opmath_type<scalar_t>* workspace,
                        at::opmath_type<scalar_t>* grad_weight, at::opmath_type<scalar_t>* grad_bias,
                        int64_t max_blocks, Stream stream) {
  using acc_t = at::opmath_type<scalar_t>;
  if (grad_weight == nullptr && grad_bias == nullptr) return;
  const Layout L = make_layout(g, ncdhw);
  const auto partial = ncdhw ? &weight_grad_partial_kernel<scalar_t, true> : &weight_grad_partial_kernel<scalar_t, false>;
  FASTVID_KERNEL_LAUNCH(partial, plan.grid, plan.block, stream, g, L, grad_output, input, grad_weight != nullptr,
                        grad_bias != nullptr, plan.rows_per_chunk, workspace);
  const auto reduce = &weight_grad_reduce_kernel<acc_t>;
  const int64_t n = (g.taps() + 1) * g.out_channels();
  FASTVID_KERNEL_LAUNCH(reduce, grid_for(n, max_blocks), dim3(kThreads), stream, g, L,
                        static_cast<const acc_t*>(workspace), plan.chunks, grad_weight, grad_bias);
}

}  // namespace cuda
}  // namespace depthwise3d
}  // namespace fastvid
