// The fused ConvLSTM / ConvGRU gate kernels of the CUDA build (launched by recurrent_cuda.cu). They
// need no CUDA runtime: tests/cuda_emulation runs them on the CPU under csrc/cuda_emulation's host
// shim. One grid-stride elementwise kernel per op over the [B, C, P] planes of recurrent_kernels.h;
// the per-element math is recurrent_math.h, shared with the CPU kernels.
#pragma once

#include "recurrent_kernels.h"
#include "recurrent_math.h"
#include "../cuda_emulation/kernel_launch.h"

#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>

namespace fastvid {
namespace recurrent {
namespace cuda {

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

// Peephole weight k (0: w_ci, 1: w_cf, 2: w_co) of channel c; w: [3, C] or nullptr (all zero).
template <typename acc_t>
__device__ __forceinline__ acc_t peephole_w(const acc_t* w, int64_t k, int64_t C, int64_t c) {
  return w ? w[k * C + c] : acc_t(0);
}

template <typename scalar_t>
struct LstmForwardOp {
  using acc_t = at::opmath_type<scalar_t>;
  const Plane& layout() const { return a.h_out; }
  // a_x, a_h, h_out, h_out2, gates_out, c_save (optional): scalar_t; c_prev, c_out: acc_t; peephole: acc_t [3, C].
  LstmForwardArgs a;
  __device__ void operator()(int64_t b, int64_t c, int64_t p) const {
    if (!a.mask.valid(b)) {  // the step leaves this sample's state unchanged (h_out2 may alias h_prev)
      store<scalar_t>(a.h_out, b, c, p, acc_t(0));
      store<scalar_t>(a.h_out2, b, c, p, load<acc_t, scalar_t>(a.h_prev, b, c, p));
      store<acc_t>(a.c_out, b, c, p, load<acc_t, acc_t>(a.c_prev, b, c, p));
      if (a.c_save.data != nullptr) store<scalar_t>(a.c_save, b, c, p, load<acc_t, acc_t>(a.c_prev, b, c, p));
      if (a.save) {
#pragma unroll
        for (int k = 0; k < 4; ++k) store<scalar_t>(a.gates_out[k], b, c, p, acc_t(0));
      }
      return;
    }
    acc_t pre[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      pre[k] = load<acc_t, scalar_t>(a.a_x[k], b, c, p) + load<acc_t, scalar_t>(a.a_h[k], b, c, p);
    }
    const acc_t* w = static_cast<const acc_t*>(a.peephole);
    const int64_t C = a.geo.channels;
    const LstmState<acc_t> s =
        lstm_forward(pre[0], pre[1], pre[2], pre[3], load<acc_t, acc_t>(a.c_prev, b, c, p),
                     peephole_w(w, 0, C, c), peephole_w(w, 1, C, c), peephole_w(w, 2, C, c), w != nullptr);
    store<scalar_t>(a.h_out, b, c, p, s.h);
    store<scalar_t>(a.h_out2, b, c, p, s.h);
    store<acc_t>(a.c_out, b, c, p, s.c);
    if (a.c_save.data != nullptr) store<scalar_t>(a.c_save, b, c, p, s.c);
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
  const Plane& layout() const { return a.d_gates_out[0]; }
  // dh_in, gates, d_gates_out: scalar_t; dc_in, dc_prev_out (may alias dc_in): acc_t; c_prev, c: scalar_t
  // with cells_in_dtype, else acc_t.
  // With a mask, dh_prev_out: scalar_t.
  LstmBackwardArgs a;
  __device__ void operator()(int64_t b, int64_t c, int64_t p) const {
    if (!a.mask.valid(b)) {  // identity step: state gradients pass through, no gate gradient
#pragma unroll
      for (int k = 0; k < 4; ++k) store<scalar_t>(a.d_gates_out[k], b, c, p, acc_t(0));
      store<acc_t>(a.dc_prev_out, b, c, p, load<acc_t, acc_t>(a.dc_in, b, c, p));
      store<scalar_t>(a.dh_prev_out, b, c, p,
                      load<acc_t, scalar_t>(a.dh_in[1], b, c, p) + load<acc_t, scalar_t>(a.dh_in[2], b, c, p));
      return;
    }
    if (a.mask.lengths != nullptr) store<scalar_t>(a.dh_prev_out, b, c, p, acc_t(0));
    const acc_t dh = load<acc_t, scalar_t>(a.dh_in[0], b, c, p) + load<acc_t, scalar_t>(a.dh_in[1], b, c, p) +
                     load<acc_t, scalar_t>(a.dh_in[2], b, c, p);
    const acc_t* w = static_cast<const acc_t*>(a.peephole);
    const int64_t C = a.geo.channels;
    const auto cell = [&](const Plane& q) {
      return a.cells_in_dtype ? load<acc_t, scalar_t>(q, b, c, p) : load<acc_t, acc_t>(q, b, c, p);
    };
    const LstmGrad<acc_t> d = lstm_backward(
        dh, load<acc_t, acc_t>(a.dc_in, b, c, p), load<acc_t, scalar_t>(a.gates[0], b, c, p),
        load<acc_t, scalar_t>(a.gates[1], b, c, p), load<acc_t, scalar_t>(a.gates[2], b, c, p),
        load<acc_t, scalar_t>(a.gates[3], b, c, p), cell(a.c_prev), cell(a.c), peephole_w(w, 0, C, c),
        peephole_w(w, 1, C, c), peephole_w(w, 2, C, c));
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
  const Plane& layout() const { return a.h_out; }
  // All planes scalar_t; h_out2 may alias h_prev. cache_out: r, z, n, h_n.
  GruForwardArgs a;
  __device__ void operator()(int64_t b, int64_t c, int64_t p) const {
    if (!a.mask.valid(b)) {  // the step leaves this sample's state unchanged
      store<scalar_t>(a.h_out, b, c, p, acc_t(0));
      store<scalar_t>(a.h_out2, b, c, p, load<acc_t, scalar_t>(a.h_prev, b, c, p));
      if (a.save) {
#pragma unroll
        for (int k = 0; k < 4; ++k) store<scalar_t>(a.cache_out[k], b, c, p, acc_t(0));
      }
      return;
    }
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
  const Plane& layout() const { return a.dh_prev_out; }
  // All planes scalar_t. cache: r, z, n, h_n; d_x_out: d(x_r, x_z, x_n); d_h_out: d(h_r, h_z, h_n).
  GruBackwardArgs a;
  __device__ void operator()(int64_t b, int64_t c, int64_t p) const {
    if (!a.mask.valid(b)) {  // identity step: the state gradient passes through (dh_prev_out may alias dh_in[2])
#pragma unroll
      for (int k = 0; k < 3; ++k) {
        store<scalar_t>(a.d_x_out[k], b, c, p, acc_t(0));
        store<scalar_t>(a.d_h_out[k], b, c, p, acc_t(0));
      }
      store<scalar_t>(a.dh_prev_out, b, c, p,
                      load<acc_t, scalar_t>(a.dh_in[1], b, c, p) + load<acc_t, scalar_t>(a.dh_in[2], b, c, p));
      return;
    }
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
  const Plane& layout() const { return a.reset_h_out; }
  // All planes scalar_t: reset_h_out = r·h_prev, r_out = r (if save).
  GruResetForwardArgs a;
  __device__ void operator()(int64_t b, int64_t c, int64_t p) const {
    if (!a.mask.valid(b)) {
      store<scalar_t>(a.reset_h_out, b, c, p, acc_t(0));
      if (a.save) store<scalar_t>(a.r_out, b, c, p, acc_t(0));
      return;
    }
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
  const Plane& layout() const { return a.d_r_out; }
  // All planes scalar_t; dh_prev_out = dh_prev_in + d_reset_h·r (may alias dh_prev_in).
  GruResetBackwardArgs a;
  __device__ void operator()(int64_t b, int64_t c, int64_t p) const {
    if (!a.mask.valid(b)) {
      store<scalar_t>(a.d_r_out, b, c, p, acc_t(0));
      store<scalar_t>(a.dh_prev_out, b, c, p, load<acc_t, scalar_t>(a.dh_prev_in, b, c, p));
      return;
    }
    acc_t dh = load<acc_t, scalar_t>(a.dh_prev_in, b, c, p);
    const acc_t d_r = gru_reset_backward(load<acc_t, scalar_t>(a.d_reset_h, b, c, p),
                                         load<acc_t, scalar_t>(a.r, b, c, p),
                                         load<acc_t, scalar_t>(a.h_prev, b, c, p), &dh);
    store<scalar_t>(a.d_r_out, b, c, p, d_r);
    store<scalar_t>(a.dh_prev_out, b, c, p, dh);
  }
};

// Element (b, c, p) handled by grid-stride index i. Neighbouring threads must touch neighbouring
// addresses: pixels fastest for NCHW planes (pixel stride 1), channels fastest for NHWC planes
// (channel stride 1; with pixels fastest, neighbours would be G·C elements apart).
template <bool kChannelsFastest>
__device__ __forceinline__ void element_of(int64_t i, int64_t C, int64_t P, int64_t* b, int64_t* c, int64_t* p) {
  if (kChannelsFastest) {
    *c = i % C;
    const int64_t bp = i / C;
    *p = bp % P;
    *b = bp / P;
  } else {
    *p = i % P;
    const int64_t bc = i / P;
    *c = bc % C;
    *b = bc / C;
  }
}

// The index order for a plane: channels fastest when its channels lie closer together than its pixels.
inline bool channels_fastest(const Plane& pl) { return pl.stride_c != 0 && pl.stride_c < pl.stride_p; }

// Runs op(b, c, p) over all n = B·C·P elements. The op holds its Args by value (trivially copyable,
// well under the 4 KiB kernel parameter limit).
template <bool kChannelsFastest, typename Op>
__global__ void elementwise_kernel(Op op, int64_t n, int64_t C, int64_t P) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    int64_t b, c, p;
    element_of<kChannelsFastest>(i, C, P, &b, &c, &p);
    op(b, c, p);
  }
}

constexpr int kThreads = 256;

// Launches op over its geometry with at most max_blocks blocks (the launcher passes 32 per SM;
// tests pass fewer so the grid-stride loop wraps). The index order follows op.layout(), the plane it
// writes.
template <typename Op, typename Stream>
void launch_elementwise(const Op& op, int64_t max_blocks, Stream stream) {
  const Geometry& geo = op.a.geo;
  const int64_t n = geo.batch * geo.channels * geo.pixels;
  if (n == 0) return;
  const dim3 grid(static_cast<unsigned>(std::min((n + kThreads - 1) / kThreads, max_blocks)));
  const dim3 block(kThreads);
  if (channels_fastest(op.layout())) {
    const auto kernel = &elementwise_kernel<true, Op>;
    FASTVID_KERNEL_LAUNCH(kernel, grid, block, stream, op, n, geo.channels, geo.pixels);
  } else {
    const auto kernel = &elementwise_kernel<false, Op>;
    FASTVID_KERNEL_LAUNCH(kernel, grid, block, stream, op, n, geo.channels, geo.pixels);
  }
}

}  // namespace cuda
}  // namespace recurrent
}  // namespace fastvid
