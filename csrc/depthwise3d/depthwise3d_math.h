// Depthwise 3D convolution: geometry and per-element math shared by the CPU kernel
// (depthwise3d_cpu.cpp) and any device kernel. Inline C10_HOST_DEVICE functions, 64-bit index math.
//
// Layout used by the kernels: channels innermost (NDHWC).
//   input        [B, T, H, W, C]            (scalar_t)
//   weight       [kT, kH, kW, C*m]          (acc_t; the op's [C*m, 1, kT, kH, kW] transposed)
//   bias         [C*m]                      (acc_t) or nullptr
//   output       [B, OT, OH, OW, C*m]       (scalar_t)
// Output channel o = c*m + j reads input channel c = o / m (nn.Conv3d(C, m*C, groups=C)).
// Along each of the three dims: in = out*stride - padding + k*dilation (zero padding outside).
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

namespace fastvid {
namespace depthwise3d {

struct Geometry {
  int64_t batch = 0, channels = 0, multiplier = 1;
  int64_t in[3] = {0, 0, 0};       // T, H, W
  int64_t out[3] = {0, 0, 0};      // OT, OH, OW
  int64_t kernel[3] = {1, 1, 1};   // kT, kH, kW
  int64_t stride[3] = {1, 1, 1}, padding[3] = {0, 0, 0}, dilation[3] = {1, 1, 1};

  C10_HOST_DEVICE int64_t out_channels() const { return channels * multiplier; }
  C10_HOST_DEVICE int64_t taps() const { return kernel[0] * kernel[1] * kernel[2]; }
};

// Output extent along one dim (floor mode, as conv3d).
C10_HOST_DEVICE inline int64_t output_size(int64_t in, int64_t k, int64_t stride, int64_t padding,
                                           int64_t dilation) {
  return (in + 2 * padding - dilation * (k - 1) - 1) / stride + 1;
}

// Input index read by output index `o` through tap `k`; false when it falls in the zero padding.
C10_HOST_DEVICE inline bool input_index(int64_t o, int64_t k, int64_t stride, int64_t padding, int64_t dilation,
                                        int64_t in, int64_t* i) {
  *i = o * stride - padding + k * dilation;
  return *i >= 0 && *i < in;
}

// Output index whose tap `k` reads input index `i`; false when there is none (stride skips it or
// it lies outside the output).
C10_HOST_DEVICE inline bool output_index(int64_t i, int64_t k, int64_t stride, int64_t padding, int64_t dilation,
                                         int64_t out, int64_t* o) {
  const int64_t num = i + padding - k * dilation;
  if (num < 0 || num % stride != 0) return false;
  *o = num / stride;
  return *o < out;
}

// Offset of element (b, t, h, w, c) of an NDHWC tensor with dims (T, H, W, C).
C10_HOST_DEVICE inline int64_t ndhwc_offset(int64_t b, int64_t t, int64_t h, int64_t w, int64_t c, int64_t T,
                                            int64_t H, int64_t W, int64_t C) {
  return (((b * T + t) * H + h) * W + w) * C + c;
}

// One output element out[b, ot, oh, ow, o] (the per-thread formula of a device kernel, and the
// scalar oracle of the vectorised CPU loops). input: NDHWC scalar_t, weight: [taps, C*m] acc_t.
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline acc_t forward_element(const Geometry& g, const scalar_t* input, const acc_t* weight,
                                             const acc_t* bias, int64_t b, int64_t ot, int64_t oh, int64_t ow,
                                             int64_t o) {
  const int64_t Cout = g.out_channels(), c = o / g.multiplier;
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
        acc += static_cast<acc_t>(input[ndhwc_offset(b, it, ih, iw, c, g.in[0], g.in[1], g.in[2], g.channels)]) *
               weight[tap * Cout + o];
      }
    }
  }
  return acc;
}

// One input-gradient element grad_input[b, it, ih, iw, c] (gather over every output that reads it).
// grad_output: NDHWC scalar_t with C*m channels, weight: [taps, C*m] acc_t.
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline acc_t input_grad_element(const Geometry& g, const scalar_t* grad_output, const acc_t* weight,
                                                int64_t b, int64_t it, int64_t ih, int64_t iw, int64_t c) {
  const int64_t Cout = g.out_channels(), m = g.multiplier;
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
        const int64_t base = ndhwc_offset(b, ot, oh, ow, c * m, g.out[0], g.out[1], g.out[2], Cout);
        for (int64_t j = 0; j < m; ++j)
          acc += static_cast<acc_t>(grad_output[base + j]) * weight[tap * Cout + c * m + j];
      }
    }
  }
  return acc;
}

// One term of the weight (tap >= 0) or bias (tap == taps()) gradient of output channel o:
// grad_output[position, o] · input[the element tap reads, o / m] (0 in the padding), or
// grad_output[position, o] for the bias. position = ((b·OT + ot)·OH + oh)·OW + ow.
template <typename scalar_t, typename acc_t>
C10_HOST_DEVICE inline acc_t weight_grad_term(const Geometry& g, const scalar_t* grad_output, const scalar_t* input,
                                              int64_t position, int64_t tap, int64_t o) {
  const acc_t go = static_cast<acc_t>(grad_output[position * g.out_channels() + o]);
  if (tap == g.taps()) return go;
  const int64_t ow = position % g.out[2], oh = (position / g.out[2]) % g.out[1];
  const int64_t ot = (position / (g.out[2] * g.out[1])) % g.out[0], b = position / (g.out[2] * g.out[1] * g.out[0]);
  const int64_t kw = tap % g.kernel[2], kh = (tap / g.kernel[2]) % g.kernel[1], kt = tap / (g.kernel[2] * g.kernel[1]);
  int64_t it, ih, iw;
  if (!input_index(ot, kt, g.stride[0], g.padding[0], g.dilation[0], g.in[0], &it) ||
      !input_index(oh, kh, g.stride[1], g.padding[1], g.dilation[1], g.in[1], &ih) ||
      !input_index(ow, kw, g.stride[2], g.padding[2], g.dilation[2], g.in[2], &iw))
    return acc_t(0);
  return go * static_cast<acc_t>(
                  input[ndhwc_offset(b, it, ih, iw, o / g.multiplier, g.in[0], g.in[1], g.in[2], g.channels)]);
}

}  // namespace depthwise3d
}  // namespace fastvid
