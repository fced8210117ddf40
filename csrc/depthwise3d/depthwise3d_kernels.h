// The depthwise 3D conv kernels' interface (CPU: depthwise3d_cpu.cpp, CUDA: depthwise3d_cuda.cu), called by the
// device-generic op wrappers in depthwise3d_ops.cpp. Every tensor is channels-innermost (NDHWC)
// and contiguous; shapes and the channel mapping are documented in depthwise3d_math.h.
//
// Dtypes: input, output, grad_output and grad_input have the kernel's scalar type (float,
// double, bfloat16, half); weight, bias, grad_weight and grad_bias have its accumulation type
// (float for the 16-bit types). Index math is 64-bit.
#pragma once

#include "depthwise3d_math.h"

#include <c10/core/ScalarType.h>

#include <optional>

namespace fastvid {
namespace depthwise3d {

// output[b, ot, oh, ow, o] = bias[o] + Σ_taps input[b, it, ih, iw, o / m] · weight[tap, o]
struct ForwardArgs {
  Geometry geo;
  at::ScalarType dtype = at::kFloat;
  const void* input = nullptr;   // [B, T, H, W, C]
  const void* weight = nullptr;  // [taps, C*m]
  const void* bias = nullptr;    // [C*m] or nullptr
  void* output = nullptr;        // [B, OT, OH, OW, C*m]
};

// grad_input[b, it, ih, iw, c] = Σ over (output, tap) pairs reading it of grad_output · weight
struct InputGradArgs {
  Geometry geo;
  at::ScalarType dtype = at::kFloat;
  const void* grad_output = nullptr;  // [B, OT, OH, OW, C*m]
  const void* weight = nullptr;       // [taps, C*m]
  void* grad_input = nullptr;         // [B, T, H, W, C]
};

// grad_weight[tap, o] = Σ_{b, ot, oh, ow} grad_output[.., o] · input[b, it, ih, iw, o / m];
// grad_bias[o] = Σ grad_output[.., o]. Both are overwritten (not accumulated into).
struct WeightGradArgs {
  Geometry geo;
  at::ScalarType dtype = at::kFloat;
  const void* grad_output = nullptr;  // [B, OT, OH, OW, C*m]
  const void* input = nullptr;        // [B, T, H, W, C]
  void* grad_weight = nullptr;        // [taps, C*m] or nullptr (not wanted)
  void* grad_bias = nullptr;          // [C*m] or nullptr (not wanted)
};

// The input gradient of a conv with stride 1 and channel multiplier 1 is a forward over grad_output
// with the kernel flipped along all three dims (taps in reverse order) and padding
// dilation·(k - 1) - padding: grad_input[i] = Σ_k grad_output[i + p - k·d] · w[k]. The geometry of that
// forward, or nullopt where it does not apply (a stride > 1, m > 1, padding beyond dilation·(k - 1)).
inline std::optional<Geometry> flipped_geometry(const Geometry& g) {
  Geometry f = g;
  if (g.multiplier != 1) return std::nullopt;
  for (int d = 0; d < 3; ++d) {
    f.padding[d] = g.dilation[d] * (g.kernel[d] - 1) - g.padding[d];
    if (g.stride[d] != 1 || f.padding[d] < 0) return std::nullopt;
    f.in[d] = g.out[d], f.out[d] = g.in[d];
  }
  return f;
}

void forward_cpu(const ForwardArgs& args);
void input_grad_cpu(const InputGradArgs& args);
void weight_grad_cpu(const WeightGradArgs& args);
// Both gradients of one call (the same geometry in both argument structs): in one pass over the tensors
// where the geometry allows it (stride 1, output the size of the input, kW = 3: depthwise3d_cpu.cpp,
// backward_impl), else input_grad_cpu then weight_grad_cpu.
void backward_cpu(const InputGradArgs& input_grad_args, const WeightGradArgs& weight_grad_args);

// Streaming stores of the channels-last kW = 3 forward and stride-1 input gradient (depthwise3d_cpu.cpp,
// streams_output): kAuto decides per call; kAlways / kNever override that wherever the output's lines
// allow it (tests run the streamed path on any machine; A/Bs). torch.ops.fastvid._set_depthwise_streaming.
enum class Streaming { kAuto, kAlways, kNever };
Streaming streaming();
void set_streaming(Streaming mode);

// depthwise3d_ncdhw_cpu.cpp: the same ops for NCDHW tensors and channel multiplier 1 (vectorised
// along W). The same argument structs with every activation laid out [B, C, T, H, W] (input,
// grad_input) / [B, C, OT, OH, OW] (output, grad_output), weight and grad_weight [C, taps]
// (the op's [C, 1, kT, kH, kW] weight as is, in the accumulation type), bias/grad_bias [C].
void forward_ncdhw_cpu(const ForwardArgs& args);
void input_grad_ncdhw_cpu(const InputGradArgs& args);
void weight_grad_ncdhw_cpu(const WeightGradArgs& args);

// depthwise3d_small_cpu.cpp: small planes (rows narrower than the ops' kSmallPlaneWidth), m == 1 and
// a padding the flipped kernel allows (flipped_geometry), any stride, volumes that fit the path's
// scratch (small_plane_applies): per batch item and vector of channels, in a channels-innermost
// scratch in cache. Activations NCDHW (transposed in and out), in the backward also NDHWC (channels_last),
// weight and grad_weight [C, taps] as for the NCDHW kernels; both gradients in one call, grad_input /
// grad_weight / grad_bias nullptr where not wanted.
bool small_plane_applies(const Geometry& g);
// The forward: every stride 1, or W stride 2 with any T and H stride.
bool small_plane_forward_applies(const Geometry& g);
void forward_small_cpu(const ForwardArgs& args);
void backward_small_cpu(const InputGradArgs& input_grad_args, const WeightGradArgs& weight_grad_args,
                        bool channels_last);

#ifdef FASTVID_WITH_CUDA
// depthwise3d_cuda.cu (kernels: depthwise3d_cuda_kernels.cuh): NDHWC tensors as above, and NCDHW
// tensors with weight / grad_weight [C*m, taps] (any channel multiplier m).
void forward_cuda(const ForwardArgs& args);
void input_grad_cuda(const InputGradArgs& args);
void weight_grad_cuda(const WeightGradArgs& args);
void forward_ncdhw_cuda(const ForwardArgs& args);
void input_grad_ncdhw_cuda(const InputGradArgs& args);
void weight_grad_ncdhw_cuda(const WeightGradArgs& args);
#endif

}  // namespace depthwise3d
}  // namespace fastvid
