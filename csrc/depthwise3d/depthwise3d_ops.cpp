// Depthwise 3D conv ops: argument checks, layout conversion and the kernel launches.
//
// Outputs are laid out like the input: channels_last_3d when `channels_last(input)` holds, else
// contiguous (fastvid/ops/depthwise3d.py mirrors this rule in the fake kernels).
// Input not channels_last, and on CPU channel multiplier 1 and rows wide enough (kernel_path): the
// NCDHW kernels (depthwise3d_ncdhw_cpu.cpp, depthwise3d_cuda.cu) run on the contiguous tensors
// directly, weight as [C*m, taps]; on CPU narrow rows (the forward: every stride 1 or a W stride of 2, the
// backward: any stride; and the backward of narrow channels_last_3d ones) run the small-plane kernels on the tensors as they are
// (depthwise3d_small_cpu.cpp, weight [C, taps]). Otherwise the kernels work on channels-innermost
// (NDHWC) tensors: the wrappers bring input and grad_output to channels_last_3d (a no-op for channels_last_3d inputs),
// transpose the weight to [taps, C*m] in the accumulation type, and copy outputs back to contiguous
// where the input is not channels_last. Registered for CPU, and for CUDA when built with CUDA (kernels
// in depthwise3d_cuda.cu).
#include "depthwise3d_kernels.h"
#include "../cpu_block_cache.h"
#include "../cpu_isa.h"
#include "../fastvid_common.h"

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace fastvid {
namespace depthwise3d {
namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

constexpr int64_t kMaxKernel = 7;
const char* const kDims[3] = {"T", "H", "W"};

at::ScalarType acc_type(at::ScalarType t) { return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t; }

// Output layout rule (mirrored by _channels_last in fastvid/ops/depthwise3d.py): channels_last_3d
// when the input has several channels, more than one position, and unit channel stride.
bool channels_last(const Tensor& input) {
  return input.size(1) > 1 && input.stride(1) == 1 && input.size(2) * input.size(3) * input.size(4) > 1;
}

// The row width (input and output rows) from which the NCDHW row kernels (depthwise3d_ncdhw_cpu.cpp) beat
// the channels-innermost kernels with their layout copies, for geometries the small-plane kernels do not
// take (kernel_path). Narrower rows leave most vector lanes idle and pay the per-plane set-up for few
// outputs (4x192x8x14^2 with H and W stride 2, 7-wide output rows, AVX-512, session 33: forward 0.93-1.03
// ms / backward 2.84-3.00 on the row kernels against 0.73-0.83 / 1.66-2.28 on layout copies). Measured on
// the Intel Xeon (two threads, 4×C×8×W² with C·W² ≈ 37632, forward and backward with both gradients,
// separate processes, the best of 3-4 on a noisy VM), session 32: AVX-512 NCDHW faster from W = 8
// (W = 8: forward 1.3 ms against 1.7-1.9, backward 2.8-2.9 against 3.6; W = 7 at C = 432: 0.96 / 2.0
// against 0.62 / 1.3), AVX2 from W = 7 for fp32 (7: 1.45 / 2.9 against 1.65 / 3.5; 6: equal) and W = 8
// otherwise (bf16 at 7x7: 2.55 / 4.15 against 1.5-1.8 / 3.4-3.5, its narrow rows are stored one value
// at a time). The baseline path keeps the width of one AVX-512 vector (not measured).
int64_t ncdhw_min_width(at::ScalarType dtype) {
  switch (cpu_isa::active()) {
    case cpu_isa::Isa::avx512: return 8;
    case cpu_isa::Isa::avx2: return dtype == at::kFloat ? 7 : 8;
    default: return 16;
  }
}

// Rows narrower than kSmallPlaneWidth take the small-plane kernels where small_plane_applies (the
// backward: any stride, a padding within the kernel's reach, volumes that fit their scratch) or
// small_plane_forward_applies (the forward: the same with every stride 1 or a W stride of 2). Session 33, same
// machine and method, two threads, 4×C×8×W² with C·W² ≈ 37632, the best of two. NCDHW, against the row
// kernels: faster up to W = 14 on every path and dtype (AVX-512 fp32 W = 8: forward 0.58 ms / backward
// 1.16 against 1.26 / 2.83; W = 14: 0.53 / 1.28 against 0.65 / 1.41; bf16 W = 14: 0.46 / 1.11 against
// 1.14 / 2.04; AVX2 W = 14: 0.60 / 1.23 against 0.69 / 1.53; baseline W = 14: 0.94 / 1.90 against 1.12 /
// 2.62), about equal at W = 16 (AVX-512 0.61 / 1.42 against 0.53 / 1.10). channels_last_3d, against the
// channels-innermost kernels: their forward stays faster at every width (7², C = 432: 0.23 against 0.30
// ms), the backward is slower up to W = 7 (AVX-512 / AVX2, C = 432, three runs: 0.77-1.33 / 1.02-1.67
// against 0.59-0.66 / 0.77-1.13; W = 5, C = 864: 1.16 / 1.44 against 0.80 / 0.90), not from W = 8
// (C = 588: 1.46 / 1.68 against 1.59 / 2.27): there only the backward of rows narrower than
// kSmallPlaneWidthChannelsLast takes them.
constexpr int64_t kSmallPlaneWidth = 16;
constexpr int64_t kSmallPlaneWidthChannelsLast = 8;

// Which kernels a call (forward or backward) runs. CUDA: the NCDHW kernels (any width and multiplier:
// threads along W stay coalesced), the channels-innermost ones for channels_last inputs. CPU with
// m == 1: the small-plane kernels for narrow rows (above); else, for inputs not channels_last, the row
// kernels for rows at least ncdhw_min_width wide; everything else the channels-innermost kernels (NCDHW
// inputs through layout copies).
enum class Path { ncdhw_rows, small_planes, channels_last };
Path kernel_path(const Tensor& input, const Geometry& g, bool backward) {
  const bool cl = channels_last(input);
  if (input.is_cuda()) return cl ? Path::channels_last : Path::ncdhw_rows;
  const int64_t small_width = !cl ? kSmallPlaneWidth : backward ? kSmallPlaneWidthChannelsLast : 0;
  const bool small_applies = backward ? small_plane_applies(g) : small_plane_forward_applies(g);
  if (g.multiplier == 1 && input.size(4) < small_width && small_applies) return Path::small_planes;
  if (cl || g.multiplier != 1) return Path::channels_last;
  const int64_t min_width = ncdhw_min_width(input.scalar_type());
  return std::min(input.size(4), g.out[2]) >= min_width ? Path::ncdhw_rows : Path::channels_last;
}

void check_same(const char* op, const char* name, const Tensor& t, const Tensor& input) {
  TORCH_CHECK(t.device() == input.device(), op, ": ", name, " is on ", t.device(), " but input is on ",
              input.device(), "; all tensors must be on one device");
  TORCH_CHECK_TYPE(t.scalar_type() == input.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
                   " but input has dtype ", input.scalar_type());
}

Geometry check_geometry(const char* op, const Tensor& input, const Tensor& weight, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK_VALUE(input.dim() == 5, op, ": input must be [B, C, T, H, W], got shape ", input.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(input.scalar_type()), op, ": input must be floating point, got ",
                   input.scalar_type());
  const int64_t C = input.size(1);
  TORCH_CHECK_VALUE(C > 0, op, ": input has no channels, shape ", input.sizes());
  TORCH_CHECK_VALUE(weight.dim() == 5 && weight.size(1) == 1 && weight.size(0) > 0 && weight.size(0) % C == 0, op,
                    ": weight must be [m*C, 1, kT, kH, kW] with C = ", C, " input channels and m >= 1, got shape ",
                    weight.sizes());
  check_same(op, "weight", weight, input);
  TORCH_CHECK_VALUE(stride.size() == 3, op, ": stride must have 3 values (T, H, W), got ", stride);
  TORCH_CHECK_VALUE(padding.size() == 3, op, ": padding must have 3 values (T, H, W), got ", padding);
  TORCH_CHECK_VALUE(dilation.size() == 3, op, ": dilation must have 3 values (T, H, W), got ", dilation);
  Geometry g;
  g.batch = input.size(0);
  g.channels = C;
  g.multiplier = weight.size(0) / C;
  for (int d = 0; d < 3; ++d) {
    const int64_t k = weight.size(2 + d), in = input.size(2 + d);
    TORCH_CHECK_VALUE(k >= 1 && k <= kMaxKernel, op, ": weight's kernel size along ", kDims[d], " must be 1..",
                      kMaxKernel, ", got ", k, " (weight shape ", weight.sizes(), ")");
    TORCH_CHECK_VALUE(stride[d] >= 1, op, ": stride must be >= 1, got ", stride);
    TORCH_CHECK_VALUE(dilation[d] >= 1, op, ": dilation must be >= 1, got ", dilation);
    TORCH_CHECK_VALUE(padding[d] >= 0, op, ": padding must be non-negative, got ", padding);
    TORCH_CHECK_VALUE(in > 0, op, ": input has an empty ", kDims[d], " dimension, shape ", input.sizes());
    const int64_t extent = dilation[d] * (k - 1) + 1;
    TORCH_CHECK_VALUE(extent <= in + 2 * padding[d], op, ": kernel size along ", kDims[d], " (", k, ", dilated to ",
                      extent, ") is larger than the padded input (", in, " + 2*", padding[d], " = ",
                      in + 2 * padding[d], ")");
    g.in[d] = in;
    g.kernel[d] = k;
    g.stride[d] = stride[d];
    g.padding[d] = padding[d];
    g.dilation[d] = dilation[d];
    g.out[d] = output_size(in, k, stride[d], padding[d], dilation[d]);
  }
  return g;
}

// [C*m, 1, kT, kH, kW] -> [taps, C*m] in the accumulation type.
Tensor kernel_weight(const Tensor& weight, const Geometry& g) {
  return weight.to(acc_type(weight.scalar_type())).reshape({g.out_channels(), g.taps()}).t().contiguous();
}

// [C*m, 1, kT, kH, kW] -> [C*m, taps] in the accumulation type (the NCDHW kernels' weight).
Tensor ncdhw_weight(const Tensor& weight, const Geometry& g) {
  return weight.to(acc_type(weight.scalar_type())).reshape({g.out_channels(), g.taps()}).contiguous();
}

Tensor empty_channels_last(const Geometry& g, int64_t channels, bool input_side, const at::TensorOptions& options,
                           const void* read_alongside) {
  const int64_t* dims = input_side ? g.in : g.out;
  return cpu_block_cache::empty({g.batch, channels, dims[0], dims[1], dims[2]},
                                options.memory_format(at::MemoryFormat::ChannelsLast3d), read_alongside);
}

// The op's result for a kernel output computed in NDHWC: kept if the input is channels_last,
// else copied into a fresh contiguous tensor.
Tensor in_input_layout(const Tensor& ndhwc, const Tensor& input) {
  if (channels_last(input)) return ndhwc;
  Tensor out = cpu_block_cache::empty(ndhwc.sizes(), ndhwc.options().memory_format(at::MemoryFormat::Contiguous));
  out.copy_(ndhwc);
  return out;
}

// Where the kernels run (kernel_path) and so how operands, weights and results are laid out for them;
// the argument structs are the same for all.
struct KernelLayout {
  Path path;
  bool channels_last_3d;  // operands and kernel outputs channels_last_3d (else contiguous)
  KernelLayout(Path p, const Tensor& input)
      : path(p), channels_last_3d(p == Path::channels_last || (p == Path::small_planes && channels_last(input))) {}
  // The weight (and its gradient) as [C*m, taps]; the channels-innermost kernels take [taps, C*m].
  bool weight_per_channel() const { return path != Path::channels_last; }
  Tensor operand(const Tensor& t) const {
    const auto format = channels_last_3d ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::Contiguous;
    if (t.is_contiguous(format)) return t;
    return cpu_block_cache::empty(t.sizes(), t.options().memory_format(format)).copy_(t);
  }
  // In the accumulation type.
  Tensor weight(const Tensor& w, const Geometry& g) const {
    return weight_per_channel() ? ncdhw_weight(w, g) : kernel_weight(w, g);
  }
  // A kernel output; read_alongside: the operand the kernel reads while writing it. Channels innermost,
  // the result takes its other 128-byte phase (cpu_block_cache::empty; the channels-innermost kernels'
  // streaming stores need it: streams_output). NCDHW results keep the cache's own placement: the NCDHW
  // kernels load and store along W (their forward with the other phase: 1.64-2.05 ms against 1.69-1.97,
  // 4x96x8x28^2, bench loop, five alternations: no gain to take).
  Tensor empty(const Geometry& g, int64_t channels, bool input_side, const at::TensorOptions& options,
               const void* read_alongside) const {
    if (channels_last_3d) return empty_channels_last(g, channels, input_side, options, read_alongside);
    const int64_t* dims = input_side ? g.in : g.out;
    return cpu_block_cache::empty({g.batch, channels, dims[0], dims[1], dims[2]}, options);
  }
  Tensor result(const Tensor& t, const Tensor& input) const { return channels_last_3d ? in_input_layout(t, input) : t; }
};

Tensor depthwise_conv3d(const Tensor& input, const Tensor& weight, const OptTensor& bias, at::IntArrayRef stride,
                        at::IntArrayRef padding, at::IntArrayRef dilation) {
  const char* op = "fastvid.depthwise_conv3d";
  const Geometry g = check_geometry(op, input, weight, stride, padding, dilation);
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == g.out_channels(), op, ": bias must be [",
                      g.out_channels(), "], got shape ", bias->sizes());
    check_same(op, "bias", *bias, input);
  }
  const c10::DeviceGuard guard(input.device());
  const Tensor b = bias.has_value() ? bias->to(acc_type(input.scalar_type())).contiguous() : Tensor();
  const KernelLayout layout(kernel_path(input, g, false), input);
  const Tensor x = layout.operand(input);
  const Tensor w = layout.weight(weight, g);
  Tensor out = layout.empty(g, g.out_channels(), false, input.options(), x.data_ptr());
  ForwardArgs a;
  a.geo = g;
  a.dtype = input.scalar_type();
  a.input = x.data_ptr();
  a.weight = w.data_ptr();
  a.bias = b.defined() ? b.data_ptr() : nullptr;
  a.output = out.data_ptr();
  if (layout.path == Path::small_planes) forward_small_cpu(a);  // NCDHW: kernel_path sends no channels_last forward
  else if (layout.path == Path::ncdhw_rows) FASTVID_LAUNCH(forward_ncdhw, a, input.device());
  else FASTVID_LAUNCH(forward, a, input.device());
  return layout.result(out, input);
}

std::tuple<Tensor, Tensor, Tensor> depthwise_conv3d_backward(const Tensor& grad_output, const Tensor& input,
                                                             const Tensor& weight, at::IntArrayRef stride,
                                                             at::IntArrayRef padding, at::IntArrayRef dilation,
                                                             std::array<bool, 3> output_mask) {
  const char* op = "fastvid.depthwise_conv3d_backward";
  const Geometry g = check_geometry(op, input, weight, stride, padding, dilation);
  check_same(op, "grad_output", grad_output, input);
  TORCH_CHECK_VALUE(grad_output.dim() == 5 && grad_output.size(0) == g.batch &&
                        grad_output.size(1) == g.out_channels() && grad_output.size(2) == g.out[0] &&
                        grad_output.size(3) == g.out[1] && grad_output.size(4) == g.out[2],
                    op, ": grad_output must be [B, C*m, OT, OH, OW] = [", g.batch, ", ", g.out_channels(), ", ",
                    g.out[0], ", ", g.out[1], ", ", g.out[2], "], got shape ", grad_output.sizes());
  const c10::DeviceGuard guard(input.device());
  const auto acc = acc_type(input.scalar_type());
  Tensor grad_input = at::empty({0}, input.options());
  Tensor grad_weight = at::empty({0}, input.options());
  Tensor grad_bias = at::empty({0}, input.options());
  const KernelLayout layout(kernel_path(input, g, true), input);
  const Tensor go = layout.operand(grad_output);
  const bool want_input = output_mask[0], want_weight = output_mask[1] || output_mask[2];
  Tensor w, gi, x, gw, gb;
  InputGradArgs ia;
  if (want_input) {
    w = layout.weight(weight, g);
    gi = layout.empty(g, g.channels, true, input.options(), go.data_ptr());
    ia.geo = g;
    ia.dtype = input.scalar_type();
    ia.grad_output = go.data_ptr();
    ia.weight = w.data_ptr();
    ia.grad_input = gi.data_ptr();
  }
  WeightGradArgs wa;
  if (want_weight) {
    x = layout.operand(input);
    // The kernels' weight gradient is laid out like their weight: [C*m, taps] or [taps, C*m].
    const std::vector<int64_t> gw_shape = layout.weight_per_channel()
                                              ? std::vector<int64_t>{g.out_channels(), g.taps()}
                                              : std::vector<int64_t>{g.taps(), g.out_channels()};
    if (output_mask[1]) gw = at::empty(gw_shape, input.options().dtype(acc));
    if (output_mask[2]) gb = at::empty({g.out_channels()}, input.options().dtype(acc));
    wa.geo = g;
    wa.dtype = input.scalar_type();
    wa.grad_output = go.data_ptr();
    wa.input = x.data_ptr();
    wa.grad_weight = gw.defined() ? gw.data_ptr() : nullptr;
    wa.grad_bias = gb.defined() ? gb.data_ptr() : nullptr;
  }
  if (layout.path == Path::small_planes) {
    backward_small_cpu(ia, wa, layout.channels_last_3d);  // both in one pass
  } else if (want_input && want_weight && layout.path == Path::channels_last && !input.is_cuda()) {
    backward_cpu(ia, wa);  // both in one pass where it can
  } else {
    if (want_input) {
      if (layout.path == Path::ncdhw_rows) FASTVID_LAUNCH(input_grad_ncdhw, ia, input.device());
      else FASTVID_LAUNCH(input_grad, ia, input.device());
    }
    if (want_weight) {
      if (layout.path == Path::ncdhw_rows) FASTVID_LAUNCH(weight_grad_ncdhw, wa, input.device());
      else FASTVID_LAUNCH(weight_grad, wa, input.device());
    }
  }
  if (want_input) grad_input = layout.result(gi, input);
  if (gw.defined()) {
    grad_weight = at::empty(weight.sizes(), input.options());
    grad_weight.view({g.out_channels(), g.taps()}).copy_(layout.weight_per_channel() ? gw : gw.t());
  }
  if (gb.defined()) {
    grad_bias = at::empty({g.out_channels()}, input.options());
    grad_bias.copy_(gb);
  }
  return {grad_input, grad_weight, grad_bias};
}

}  // namespace

#define FASTVID_REGISTER_DEPTHWISE3D(m)                              \
  m.impl("depthwise_conv3d", &depthwise_conv3d);                     \
  m.impl("depthwise_conv3d_backward", &depthwise_conv3d_backward)

TORCH_LIBRARY_IMPL(fastvid, CPU, m) { FASTVID_REGISTER_DEPTHWISE3D(m); }

// No tensor arguments: a CompositeImplicitAutograd kernel serves every call.
TORCH_LIBRARY_IMPL(fastvid, CompositeImplicitAutograd, m) {
  m.impl("_set_depthwise_streaming", [](std::string mode) {
    using fastvid::depthwise3d::Streaming;
    const char* names[] = {"auto", "always", "never"};
    int want = -1;
    for (int i = 0; i < 3; ++i)
      if (mode == names[i]) want = i;
    TORCH_CHECK(want >= 0, "fastvid._set_depthwise_streaming: mode must be one of auto, always, never, got '", mode, "'");
    const std::string previous = names[static_cast<int>(fastvid::depthwise3d::streaming())];
    fastvid::depthwise3d::set_streaming(static_cast<Streaming>(want));
    return previous;
  });
}

#ifdef FASTVID_WITH_CUDA
TORCH_LIBRARY_IMPL(fastvid, CUDA, m) { FASTVID_REGISTER_DEPTHWISE3D(m); }
#endif

}  // namespace depthwise3d
}  // namespace fastvid
