// CUDA launchers of the fused ConvLSTM / ConvGRU gate kernels (interface: recurrent_kernels.h).
// One grid-stride elementwise kernel per op; the per-element math is recurrent_math.h, shared
// with the CPU kernels. Every plane is a [B, C, P] strided view (see recurrent_kernels.h).
#include "recurrent_kernels.h"
#include "recurrent_math.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>

namespace fastvid {
namespace recurrent {
namespace {

// Element (b, c, p) of a plane whose storage type is T.
template <typename T>
__device__ __forceinline__ T& elem(const Plane& pl, int64_t b, int64_t c, int64_t p) {
  return static_cast<T*>(pl.data)[b * pl.stride_b + c * pl.stride_c + p * pl.stride_p];
}

// Reads a plane element and widens it to the accumulation type.
template <typename acc_t, typename T>
__device__ __forceinline__ acc_t load(const Plane& pl, int64_t b, int64_t c, int64_t p) {
  return static_cast<acc_t>(elem<T>(pl, b, c, p));
}

// Narrows v to the plane's storage type T and writes it.
template <typename T, typename acc_t>
__device__ __forceinline__ void store(const Plane& pl, int64_t b, int64_t c, int64_t p, acc_t v) {
  elem<T>(pl, b, c, p) = static_cast<T>(v);
}

// Runs op(b, c, p) over all B·C·P elements, p fastest. The op holds its Args by value (trivially
// copyable, well under the 4 KiB kernel parameter limit).
template <typename Op>
__global__ void elementwise_kernel(Op op, int64_t n, int64_t C, int64_t P) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const int64_t p = i % P;
    const int64_t bc = i / P;
    op(bc / C, bc % C, p);
  }
}

// n = B·C·P > 0 (the launchers return early on empty input).
template <typename Op>
void launch(const Op& op, const Geometry& geo) {
  const int64_t n = geo.batch * geo.channels * geo.pixels;
  constexpr int threads = 256;
  const int64_t max_blocks = int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
  const int64_t blocks = std::min((n + threads - 1) / threads, max_blocks);
  elementwise_kernel<<<static_cast<unsigned>(blocks), threads, 0, at::cuda::getCurrentCUDAStream()>>>(
      op, n, geo.channels, geo.pixels);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Peephole weight k (0: w_ci, 1: w_cf, 2: w_co) of channel c; w: [3, C] or nullptr (all zero).
template <typename acc_t>
__device__ __forceinline__ acc_t peephole_w(const acc_t* w, int64_t k, int64_t C, int64_t c) {
  return w ? w[k * C + c] : acc_t(0);
}

template <typename scalar_t>
struct LstmForwardOp {
  using acc_t = at::opmath_type<scalar_t>;
  // a_x, a_h, h_out, h_out2, gates_out: scalar_t; c_prev, c_out: acc_t; peephole: acc_t [3, C].
  LstmForwardArgs a;
  __device__ void operator()(int64_t b, int64_t c, int64_t p) const {
    acc_t pre[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      pre[k] = load<acc_t, scalar_t>(a.a_x[k], b, c, p) + load<acc_t, scalar_t>(a.a_h[k], b, c, p);
    }
    const acc_t* w = static_cast<const acc_t*>(a.peephole);
    const int64_t C = a.geo.channels;
    const LstmState<acc_t> s =
        lstm_forward(pre[0], pre[1], pre[2], pre[3], load<acc_t, acc_t>(a.c_prev, b, c, p),
                     peephole_w(w, 0, C, c), peephole_w(w, 1, C, c), peephole_w(w, 2, C, c));
    store<scalar_t>(a.h_out, b, c, p, s.h);
    store<scalar_t>(a.h_out2, b, c, p, s.h);
    store<acc_t>(a.c_out, b, c, p, s.c);
    if (a.save) {
      store<scalar_t>(a.gates_out[0], b, c, p, s.i);
      store<scalar_t>(a.gates_out[1], b, c, p, s.f);
      store<scalar_t>(a.gates_out[2], b, c, p, s.g);
      store<scalar_t>(a.gates_out[3], b, c, p, s.o);
    }
  }
};

template <typename scalar_t>
struct LstmBackwardOp {
  using acc_t = at::opmath_type<scalar_t>;
  // dh_in, gates, d_gates_out: scalar_t; dc_in, c_prev, c, dc_prev_out (may alias dc_in): acc_t.
  LstmBackwardArgs a;
  __device__ void operator()(int64_t b, int64_t c, int64_t p) const {
    const acc_t dh = load<acc_t, scalar_t>(a.dh_in[0], b, c, p) + load<acc_t, scalar_t>(a.dh_in[1], b, c, p) +
                     load<acc_t, scalar_t>(a.dh_in[2], b, c, p);
    const acc_t* w = static_cast<const acc_t*>(a.peephole);
    const int64_t C = a.geo.channels;
    const LstmGrad<acc_t> d = lstm_backward(
        dh, load<acc_t, acc_t>(a.dc_in, b, c, p), load<acc_t, scalar_t>(a.gates[0], b, c, p),
        load<acc_t, scalar_t>(a.gates[1], b, c, p), load<acc_t, scalar_t>(a.gates[2], b, c, p),
        load<acc_t, scalar_t>(a.gates[3], b, c, p), load<acc_t, acc_t>(a.c_prev, b, c, p),
        load<acc_t, acc_t>(a.c, b, c, p), peephole_w(w, 0, C, c), peephole_w(w, 1, C, c), peephole_w(w, 2, C, c));
    store<scalar_t>(a.d_gates_out[0], b, c, p, d.a_i);
    store<scalar_t>(a.d_gates_out[1], b, c, p, d.a_f);
    store<scalar_t>(a.d_gates_out[2], b, c, p, d.a_g);
    store<scalar_t>(a.d_gates_out[3], b, c, p, d.a_o);
    store<acc_t>(a.dc_prev_out, b, c, p, d.c_prev);
  }
};

template <typename scalar_t>
struct GruForwardOp {
  using acc_t = at::opmath_type<scalar_t>;
  // All planes scalar_t; h_out2 may alias h_prev. cache_out: r, z, n, h_n.
  GruForwardArgs a;
  __device__ void operator()(int64_t b, int64_t c, int64_t p) const {
    const acc_t h_n = load<acc_t, scalar_t>(a.h[2], b, c, p);
    const GruState<acc_t> s = gru_forward(
        load<acc_t, scalar_t>(a.x[0], b, c, p), load<acc_t, scalar_t>(a.x[1], b, c, p),
        load<acc_t, scalar_t>(a.x[2], b, c, p), load<acc_t, scalar_t>(a.h[0], b, c, p),
        load<acc_t, scalar_t>(a.h[1], b, c, p), h_n, load<acc_t, scalar_t>(a.h_prev, b, c, p), a.reset_after);
    store<scalar_t>(a.h_out, b, c, p, s.h);
    store<scalar_t>(a.h_out2, b, c, p, s.h);
    if (a.save) {
      store<scalar_t>(a.cache_out[0], b, c, p, s.r);
      store<scalar_t>(a.cache_out[1], b, c, p, s.z);
      store<scalar_t>(a.cache_out[2], b, c, p, s.n);
      store<scalar_t>(a.cache_out[3], b, c, p, h_n);
    }
  }
};

template <typename scalar_t>
struct GruBackwardOp {
  using acc_t = at::opmath_type<scalar_t>;
  // All planes scalar_t. cache: r, z, n, h_n; d_x_out: d(x_r, x_z, x_n); d_h_out: d(h_r, h_z, h_n).
  GruBackwardArgs a;
  __device__ void operator()(int64_t b, int64_t c, int64_t p) const {
    const acc_t dh = load<acc_t, scalar_t>(a.dh_in[0], b, c, p) + load<acc_t, scalar_t>(a.dh_in[1], b, c, p) +
                     load<acc_t, scalar_t>(a.dh_in[2], b, c, p);
    const GruGrad<acc_t> d = gru_backward(
        dh, load<acc_t, scalar_t>(a.cache[0], b, c, p), load<acc_t, scalar_t>(a.cache[1], b, c, p),
        load<acc_t, scalar_t>(a.cache[2], b, c, p), load<acc_t, scalar_t>(a.cache[3], b, c, p),
        load<acc_t, scalar_t>(a.h_prev, b, c, p), a.reset_after);
    store<scalar_t>(a.d_x_out[0], b, c, p, d.r);
    store<scalar_t>(a.d_x_out[1], b, c, p, d.z);
    store<scalar_t>(a.d_x_out[2], b, c, p, d.x_n);
    store<scalar_t>(a.d_h_out[0], b, c, p, d.r);
    store<scalar_t>(a.d_h_out[1], b, c, p, d.z);
    store<scalar_t>(a.d_h_out[2], b, c, p, d.h_n);
    store<scalar_t>(a.dh_prev_out, b, c, p, d.h_prev);
  }
};

template <typename scalar_t>
struct GruResetForwardOp {
  using acc_t = at::opmath_type<scalar_t>;
  // All planes scalar_t: reset_h_out = r·h_prev, r_out = r (if save).
  GruResetForwardArgs a;
  __device__ void operator()(int64_t b, int64_t c, int64_t p) const {
    acc_t r;
    const acc_t reset_h = gru_reset_forward(load<acc_t, scalar_t>(a.x_r, b, c, p),
                                            load<acc_t, scalar_t>(a.h_r, b, c, p),
                                            load<acc_t, scalar_t>(a.h_prev, b, c, p), &r);
    store<scalar_t>(a.reset_h_out, b, c, p, reset_h);
    if (a.save) store<scalar_t>(a.r_out, b, c, p, r);
  }
};

template <typename scalar_t>
struct GruResetBackwardOp {
  using acc_t = at::opmath_type<scalar_t>;
  // All planes scalar_t; dh_prev_out = dh_prev_in + d_reset_h·r (may alias dh_prev_in).
  GruResetBackwardArgs a;
  __device__ void operator()(int64_t b, int64_t c, int64_t p) const {
    acc_t dh = load<acc_t, scalar_t>(a.dh_prev_in, b, c, p);
    const acc_t d_r = gru_reset_backward(load<acc_t, scalar_t>(a.d_reset_h, b, c, p),
                                         load<acc_t, scalar_t>(a.r, b, c, p),
                                         load<acc_t, scalar_t>(a.h_prev, b, c, p), &dh);
    store<scalar_t>(a.d_r_out, b, c, p, d_r);
    store<scalar_t>(a.dh_prev_out, b, c, p, dh);
  }
};

}  // namespace

#define FASTVID_DEFINE_CUDA_LAUNCHER(fn, ArgsT, OpT)                                                       \
  void fn(const ArgsT& args) {                                                                         \
    if (args.geo.batch * args.geo.channels * args.geo.pixels == 0) return;                             \
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, args.geo.dtype, #fn,                     \
                                    [&] { launch(OpT<scalar_t>{args}, args.geo); });                   \
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
