// Shared by the ConvLSTM/ConvGRU sequence ops (recurrent_ops.cpp and any other time loop over the
// fused gate kernels): tensor <-> Plane views, frame layouts, argument checks and the ATen
// convolutions of one time step.
#pragma once

#include "recurrent_kernels.h"
#include "../cpu_block_cache.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>
#include <vector>

namespace fastvid {
namespace recurrent {


using at::Tensor;
using OptTensor = std::optional<Tensor>;

constexpr int64_t kHoisted = 0;
constexpr int64_t kConcat = 1;
constexpr int64_t kWinograd = 2;  // hoisted, both convs Winograd (CPU, 3x3, dilation 1): recurrent_winograd.h

// ------------------------------------------------------------------------ planes
inline Plane plane(const Tensor& t) {  // t: [B, C, H, W] with mergeable H, W
  TORCH_INTERNAL_ASSERT(t.dim() == 4, "plane() expects a 4-D tensor");
  const int64_t H = t.size(2), W = t.size(3);
  TORCH_INTERNAL_ASSERT(H == 1 || W == 1 || t.stride(2) == W * t.stride(3), "plane(): H and W do not merge");
  Plane p;
  p.data = t.data_ptr();
  p.stride_b = t.stride(0);
  p.stride_c = t.stride(1);
  p.stride_p = W > 1 ? t.stride(3) : (H > 1 ? t.stride(2) : 1);
  return p;
}

// Channels [k·C, (k + 1)·C) of t: plane(t.narrow(1, k·C, C)) without building the view (narrow is
// three dispatcher calls; the time loops take about a dozen slots per step).
inline Plane slot(const Tensor& t, int64_t k, int64_t C) {
  TORCH_INTERNAL_ASSERT(t.dim() == 4 && k >= 0 && (k + 1) * C <= t.size(1), "slot(): channels out of range");
  Plane p = plane(t);
  p.data = static_cast<char*>(p.data) + k * C * t.stride(1) * static_cast<int64_t>(t.element_size());
  return p;
}

inline Plane zero_plane(const Tensor& zeros) {  // zeros: >= max(C, H·W) elements, never written
  Plane p;
  p.data = zeros.data_ptr();
  return p;
}


inline at::ScalarType acc_type(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

inline at::MemoryFormat frame_format(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// [lead..., C, H, W] with the channels innermost when channels_last (the per-frame slices are then
// channels_last 4-D tensors), else contiguous.
inline Tensor empty_frames(std::vector<int64_t> lead, int64_t C, int64_t H, int64_t W, bool channels_last,
                    const at::TensorOptions& options) {
  const int64_t n = static_cast<int64_t>(lead.size());
  std::vector<int64_t> sizes = lead;
  if (!channels_last) {
    sizes.insert(sizes.end(), {C, H, W});
    return cpu_block_cache::empty(sizes, options);
  }
  sizes.insert(sizes.end(), {H, W, C});
  std::vector<int64_t> perm;
  for (int64_t i = 0; i < n; ++i) perm.push_back(i);
  perm.insert(perm.end(), {n + 2, n, n + 1});
  return cpu_block_cache::empty(sizes, options).permute(perm);
}

// A [B, T, C, H, W] tensor laid out like empty_frames (copies only if it is not already).
inline Tensor to_frames_layout(const Tensor& t, bool channels_last) {
  if (!channels_last) return t.contiguous();
  return t.permute({0, 1, 3, 4, 2}).contiguous().permute({0, 1, 4, 2, 3});
}

inline Tensor zeros_for_planes(int64_t C, int64_t H, int64_t W, const at::TensorOptions& options) {
  return at::zeros({std::max<int64_t>(C, H * W)}, options);
}

// ------------------------------------------------------------------------ checks
struct SeqGeometry {
  int64_t B, T, Cin, C, H, W;
  bool channels_last;
  std::array<int64_t, 2> padding, dilation;
};

inline void check_same(const char* op, const char* name, const Tensor& t, const Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device(),
              "; all tensors must be on one device");
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
                   " but x has dtype ", x.scalar_type());
}

inline void check_state(const char* op, const char* name, const Tensor& s, const SeqGeometry& g, const Tensor& x) {
  TORCH_CHECK_VALUE(s.dim() == 4 && s.size(0) == g.B && s.size(1) == g.C && s.size(2) == g.H && s.size(3) == g.W,
                    op, ": ", name, " must be [B, C, H, W] = [", g.B, ", ", g.C, ", ", g.H, ", ", g.W, "], got ",
                    s.sizes());
  TORCH_CHECK(s.device() == x.device(), op, ": ", name, " is on ", s.device(), " but x is on ", x.device());
  TORCH_CHECK_TYPE(at::isFloatingType(s.scalar_type()), op, ": ", name, " must be floating point, got ",
                   s.scalar_type());
}

inline SeqGeometry check_sequence(const char* op, const Tensor& x, const Tensor& weight_ih, const Tensor& weight_hh,
                           const Tensor& h0, int64_t num_gates, at::IntArrayRef padding, at::IntArrayRef dilation,
                           int64_t strategy, bool channels_last) {
  TORCH_CHECK_VALUE(x.dim() == 5, op, ": x must be [B, T, C_in, H, W], got shape ", x.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), op, ": x must be floating point, got ", x.scalar_type());
  SeqGeometry g;
  g.B = x.size(0), g.T = x.size(1), g.Cin = x.size(2), g.H = x.size(3), g.W = x.size(4);
  TORCH_CHECK_VALUE(g.B > 0, op, ": x has batch size B = 0 (shape ", x.sizes(), ")");
  TORCH_CHECK_VALUE(g.T > 0, op, ": x has sequence length T = 0 (shape ", x.sizes(), ")");
  TORCH_CHECK_VALUE(g.Cin > 0 && g.H > 0 && g.W > 0, op, ": x has an empty dimension, shape ", x.sizes());
  TORCH_CHECK_VALUE(weight_ih.dim() == 4 && weight_ih.size(0) % num_gates == 0 && weight_ih.size(0) > 0, op,
                    ": weight_ih must be [", num_gates, "*C, C_in, kH, kW], got ", weight_ih.sizes());
  g.C = weight_ih.size(0) / num_gates;
  TORCH_CHECK_VALUE(weight_ih.size(1) == g.Cin, op, ": weight_ih has ", weight_ih.size(1),
                    " input channels but x has C_in = ", g.Cin);
  TORCH_CHECK_VALUE(weight_hh.dim() == 4 && weight_hh.size(0) == num_gates * g.C && weight_hh.size(1) == g.C &&
                        weight_hh.size(2) == weight_ih.size(2) && weight_hh.size(3) == weight_ih.size(3),
                    op, ": weight_hh must be [", num_gates * g.C, ", ", g.C, ", ", weight_ih.size(2), ", ",
                    weight_ih.size(3), "], got ", weight_hh.sizes());
  check_same(op, "weight_ih", weight_ih, x);
  check_same(op, "weight_hh", weight_hh, x);
  check_state(op, "h0", h0, g, x);
  TORCH_CHECK_TYPE(h0.scalar_type() == x.scalar_type(), op, ": h0 has dtype ", h0.scalar_type(),
                   " but x has dtype ", x.scalar_type());
  TORCH_CHECK_VALUE(padding.size() == 2 && dilation.size() == 2, op, ": padding and dilation must have 2 values");
  for (int d = 0; d < 2; ++d) {
    const int64_t k = weight_ih.size(2 + d);
    TORCH_CHECK_VALUE(dilation[d] >= 1 && padding[d] >= 0 && 2 * padding[d] == dilation[d] * (k - 1), op,
                      ": the hidden state must keep its H x W: need an odd kernel and padding = dilation * (k - 1) / 2,"
                      " got kernel ", k, ", padding ", padding[d], ", dilation ", dilation[d]);
    g.padding[d] = padding[d];
    g.dilation[d] = dilation[d];
  }
  TORCH_CHECK_VALUE(strategy == kHoisted || strategy == kConcat || strategy == kWinograd, op,
                    ": strategy must be 0 (hoisted), 1 (concat) or 2 (winograd), got ", strategy);
  g.channels_last = channels_last;
  return g;
}

inline void check_bias(const char* op, const char* name, const OptTensor& bias, int64_t size, const Tensor& x) {
  if (!bias.has_value()) return;
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == size, op, ": ", name, " must be [", size, "], got ",
                    bias->sizes());
  check_same(op, name, *bias, x);
}

// A tensor argument that must have exactly `sizes`, live on ref's device and have dtype `dtype`
// (any floating dtype when nullopt: the op converts it). Checked before any pointer is taken.
inline void check_arg(const char* op, const char* name, const Tensor& t, at::IntArrayRef sizes, const Tensor& ref,
               const char* ref_name, std::optional<at::ScalarType> dtype) {
  TORCH_CHECK_VALUE(t.sizes() == sizes, op, ": ", name, " must be ", sizes, ", got ", t.sizes());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", ref_name, " is on ",
              ref.device(), "; all tensors must be on one device");
  if (dtype.has_value()) {
    TORCH_CHECK_TYPE(t.scalar_type() == *dtype, op, ": ", name, " must have dtype ", *dtype, ", got ", t.scalar_type());
  } else {
    TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be floating point, got ",
                     t.scalar_type());
  }
}

inline void check_optional_arg(const char* op, const char* name, const OptTensor& t, at::IntArrayRef sizes, const Tensor& ref,
                        const char* ref_name, std::optional<at::ScalarType> dtype) {
  if (t.has_value()) check_arg(op, name, *t, sizes, ref, ref_name, dtype);
}

// Conv outputs are brought to the sequence's layout (a no-op unless a backend, e.g. the fp64 CPU
// path, ignores channels_last), since the gate kernels read conv outputs and buffers side by side.
inline Tensor conv(const Tensor& input, const Tensor& weight, const OptTensor& bias, const SeqGeometry& g) {
  return at::conv2d(input, weight, bias, {1, 1}, g.padding, g.dilation, 1).contiguous(frame_format(g.channels_last));
}

inline Tensor conv_input_grad(const Tensor& grad_out, const Tensor& input, const Tensor& weight, const SeqGeometry& g) {
  return std::get<0>(at::convolution_backward(grad_out, input, weight, std::nullopt, {1, 1}, g.padding, g.dilation,
                                              false, {0, 0}, 1, {true, false, false}))
      .contiguous(frame_format(g.channels_last));
}

// Weight (and bias) gradient of conv(input, weight) over all frames at once.
inline std::tuple<Tensor, Tensor> conv_weight_grad(const Tensor& grad_out, const Tensor& input, const Tensor& weight,
                                            bool with_bias, const SeqGeometry& g) {
  const auto grads = at::convolution_backward(grad_out, input, weight, at::IntArrayRef({weight.size(0)}), {1, 1},
                                              g.padding, g.dilation, false, {0, 0}, 1, {false, true, with_bias});
  return {std::get<1>(grads), std::get<2>(grads)};
}

inline Tensor flat(const Tensor& frames) {  // [d0, d1, C, H, W] -> [d0*d1, C, H, W]
  return frames.reshape({frames.size(0) * frames.size(1), frames.size(2), frames.size(3), frames.size(4)});
}

inline OptTensor add_optional(const OptTensor& a, const OptTensor& b) {
  if (a.has_value() && b.has_value()) return *a + *b;
  return a.has_value() ? a : b;
}

inline OptTensor narrow_optional(const OptTensor& t, int64_t start, int64_t length) {
  if (!t.has_value()) return std::nullopt;
  return t->narrow(0, start, length);
}

inline Tensor empty_like_frame(const SeqGeometry& g, int64_t C, const at::TensorOptions& o) {
  return cpu_block_cache::empty({g.B, C, g.H, g.W}, o.memory_format(frame_format(g.channels_last)));
}

// Time index of forward step f.
inline int64_t time_of(int64_t f, int64_t T, bool reverse) { return reverse ? T - 1 - f : f; }

// The hidden state entering each time step, [B, T, C, H, W]: h0 at the first step.
inline Tensor previous_hidden(const Tensor& output, const Tensor& h0, bool reverse) {
  const int64_t T = output.size(1);
  const Tensor first = h0.unsqueeze(1);
  if (T == 1) return first;
  return reverse ? at::cat({output.narrow(1, 1, T - 1), first}, 1) : at::cat({first, output.narrow(1, 0, T - 1)}, 1);
}

// ------------------------------------------------------------------------ variable lengths
// The sequence ops' optional `lengths` ([B] integers in 1..T, on the CPU or x's device), as the int64
// tensor on x's device that StepMask points into; undefined without lengths. Values are checked here
// for CPU lengths (free; they then reach the GPU by an asynchronous pinned copy, no device sync); on
// the device they are not read back (a sync per call), the Python API checks them. Any value is
// memory-safe: the kernels only compare t < lengths[b].
inline Tensor check_lengths(const char* op, const OptTensor& lengths, const SeqGeometry& g, const Tensor& x) {
  if (!lengths.has_value()) return Tensor();
  const Tensor& l = *lengths;
  TORCH_CHECK_VALUE(l.dim() == 1 && l.size(0) == g.B, op, ": lengths must be [B] = [", g.B, "], got shape ",
                    l.sizes());
  TORCH_CHECK_TYPE(at::isIntegralType(l.scalar_type(), /*includeBool=*/false), op,
                   ": lengths must be an integer tensor, got ", l.scalar_type());
  TORCH_CHECK(l.device().is_cpu() || l.device() == x.device(), op, ": lengths is on ", l.device(),
              " but x is on ", x.device(), "; lengths must be on the CPU or x's device");
  if (!l.device().is_cpu()) return l.to(at::kLong).contiguous();
  const Tensor host = l.to(at::kLong).contiguous();
  const auto [lo, hi] = at::aminmax(host);
  const int64_t min_length = lo.item<int64_t>(), max_length = hi.item<int64_t>();
  TORCH_CHECK_VALUE(min_length >= 1 && max_length <= g.T, op, ": lengths must be in 1..T = 1..", g.T,
                    ", got values from ", min_length, " to ", max_length);
  if (x.device().is_cpu()) return host;
  return host.pin_memory().to(x.device(), at::kLong, /*non_blocking=*/true);
}

inline StepMask step_mask(const Tensor& lengths, int64_t t) {
  StepMask m;
  m.lengths = lengths.defined() ? lengths.const_data_ptr<int64_t>() : nullptr;
  m.t = t;
  return m;
}

// The state entering each step, [B, T, C, H, W], where `output` holds 0 at masked steps: as
// previous_hidden, except that in reverse sample b's first step t = lengths[b] - 1 starts from h0.
inline Tensor previous_state(const Tensor& output, const Tensor& h0, bool reverse, const Tensor& lengths,
                             bool channels_last) {
  const Tensor prev = previous_hidden(output, h0, reverse);
  if (!lengths.defined() || !reverse) return prev;
  const int64_t B = output.size(0), T = output.size(1);
  const Tensor from_h0 = at::arange(1, T + 1, lengths.options()).unsqueeze(0).ge(lengths.unsqueeze(1));
  return to_frames_layout(at::where(from_h0.view({B, T, 1, 1, 1}), h0.unsqueeze(1), prev), channels_last);
}

}  // namespace recurrent
}  // namespace fastvid
