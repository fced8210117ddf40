// The layer-normalised ConvLSTM sequence ops (norm="layer"; equations in recurrent_norm.h): the time
// loop in C++ over the fused step kernels of recurrent_norm_cpu.cpp. The input conv (no bias: the
// bias is added after the norms) runs once over all B·T frames; per step the hidden conv runs through
// ATen, then one fused kernel normalises both, applies the gates and the cell, normalises c and
// writes h. Only the hoisted strategy exists: the norms need the input and hidden conv outputs apart.
// Backward runs the step kernels in reverse, one hidden-conv input gradient per step, then the weight,
// bias and gain gradients batched over all steps. Registered for CPU; CUDA tensors take the Triton
// backend (fastvid/ops/recurrent_norm.py).
#include "recurrent_norm.h"
#include "recurrent_sequence.h"

#include <torch/library.h>

namespace fastvid {
namespace recurrent {
namespace {

// A [B, n, H, W] tensor whose per-sample block is contiguous in the frame layout, as a Frame.
Frame frame(const Tensor& t, bool channels_last) {
  TORCH_INTERNAL_ASSERT(t.dim() == 4, "frame() expects a 4-D tensor");
  const int64_t n = t.size(1), H = t.size(2), W = t.size(3);
  const std::array<int64_t, 3> expected =
      channels_last ? std::array<int64_t, 3>{1, W * n, n} : std::array<int64_t, 3>{H * W, W, 1};
  for (int d = 0; d < 3; ++d)
    TORCH_INTERNAL_ASSERT(t.size(d + 1) == 1 || t.stride(d + 1) == expected[d], "frame(): unexpected strides ",
                          t.strides(), " for sizes ", t.sizes());
  return {t.data_ptr(), t.stride(0)};
}

Frame frame_or_absent(const Tensor& t, bool channels_last) { return t.defined() ? frame(t, channels_last) : Frame{}; }

// A per-channel gain or bias [size], converted to the accumulation type.
Tensor norm_param(const char* op, const char* name, const Tensor& p, int64_t size, const Tensor& x) {
  check_arg(op, name, p, {size}, x, "x", std::nullopt);
  return p.to(acc_type(x.scalar_type())).contiguous();
}

struct NormParams {
  Tensor gain_ih, gain_hh, gain_c, bias_c;
};

NormParams norm_params(const char* op, const Tensor& gain_ih, const Tensor& gain_hh, const Tensor& gain_c,
                       const Tensor& bias_c, int64_t C, const Tensor& x) {
  return {norm_param(op, "gain_ih", gain_ih, 4 * C, x), norm_param(op, "gain_hh", gain_hh, 4 * C, x),
          norm_param(op, "gain_c", gain_c, C, x), norm_param(op, "bias_c", bias_c, C, x)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> convlstm_ln_sequence(
    const Tensor& x, const Tensor& weight_ih, const Tensor& weight_hh, const OptTensor& bias, const Tensor& h0,
    const Tensor& c0, const Tensor& gain_ih, const Tensor& gain_hh, const Tensor& gain_c, const Tensor& bias_c,
    at::IntArrayRef padding, at::IntArrayRef dilation, bool reverse, bool channels_last, bool save) {
  const char* op = "fastvid.convlstm_ln_sequence";
  const SeqGeometry g = check_sequence(op, x, weight_ih, weight_hh, h0, 4, padding, dilation, kHoisted, channels_last);
  check_state(op, "c0", c0, g, x);
  check_bias(op, "bias", bias, 4 * g.C, x);
  const NormParams p = norm_params(op, gain_ih, gain_hh, gain_c, bias_c, g.C, x);
  const int64_t B = g.B, T = g.T, C = g.C, H = g.H, W = g.W;
  const bool cl = g.channels_last;
  const auto opts = x.options();
  const auto acc_opts = opts.dtype(acc_type(x.scalar_type()));
  const auto fmt = frame_format(cl);
  const Tensor bias_acc = bias.has_value() ? bias->to(acc_opts.dtype()).contiguous() : Tensor();

  Tensor output = empty_frames({B, T}, C, H, W, cl, opts);
  const Tensor x_pre = conv(flat(x), weight_ih, std::nullopt, g).view({B, T, 4 * C, H, W});
  // Caches for backward (save): the hidden conv outputs, activated gates, cells and statistics of
  // every step; without save, one step's worth of scratch.
  Tensor h_pre = save ? empty_frames({B, T}, 4 * C, H, W, cl, opts) : at::empty({0}, opts);
  Tensor gates = save ? empty_frames({B, T}, 4 * C, H, W, cl, opts) : at::empty({0}, opts);
  Tensor cells = save ? empty_frames({B, T}, C, H, W, cl, acc_opts) : at::empty({0}, acc_opts);
  Tensor stats = save ? at::empty({B, T, 6}, acc_opts) : at::empty({0}, acc_opts);
  const Tensor gates_step = save ? Tensor() : empty_like_frame(g, 4 * C, opts);
  const Tensor stats_step = save ? Tensor() : at::empty({B, 1, 6}, acc_opts);
  const Tensor c_init = c0.to(acc_opts.dtype()).contiguous(fmt);
  Tensor c_run = save ? Tensor() : c_init.clone();
  Tensor h_n = empty_like_frame(g, C, opts);
  Tensor h_buf = h0.contiguous(fmt).clone();

  LnLstmForwardArgs a;
  a.geo = {B, C, H * W, cl, x.scalar_type()};
  a.gain_ih = p.gain_ih.data_ptr();
  a.gain_hh = p.gain_hh.data_ptr();
  a.gain_c = p.gain_c.data_ptr();
  a.bias_c = p.bias_c.data_ptr();
  a.bias = bias_acc.defined() ? bias_acc.data_ptr() : nullptr;
  Tensor h_pre_t;  // outside the loop: malloc alternates two blocks instead of page-faulting one back
  for (int64_t f = 0; f < T; ++f) {
    const int64_t t = time_of(f, T, reverse);
    const bool last = f == T - 1;
    h_pre_t = conv(h_buf, weight_hh, std::nullopt, g);
    a.x_pre = frame(x_pre.select(1, t), cl);
    a.h_pre = frame(h_pre_t, cl);
    a.h_out = frame(output.select(1, t), cl);
    a.h_out2 = frame(last ? h_n : h_buf, cl);
    if (save) {
      a.c_prev = frame(f == 0 ? c_init : cells.select(1, time_of(f - 1, T, reverse)), cl);
      a.c_out = frame(cells.select(1, t), cl);
      a.gates_out = frame(gates.select(1, t), cl);
      a.stats = {stats.select(1, t).data_ptr(), stats.stride(0)};
    } else {
      a.c_prev = a.c_out = frame(c_run, cl);
      a.gates_out = frame(gates_step, cl);
      a.stats = {stats_step.data_ptr(), stats_step.stride(0)};
    }
    ln_lstm_forward_cpu(a);
    if (save) h_pre.select(1, t).copy_(h_pre_t);
  }
  Tensor c_n = save ? cells.select(1, time_of(T - 1, T, reverse)).clone() : c_run;
  return {output, h_n, c_n, save ? x_pre : at::empty({0}, opts), h_pre, gates, cells, stats};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>
convlstm_ln_sequence_backward(const OptTensor& grad_output, const OptTensor& grad_h_n, const OptTensor& grad_c_n,
                              const Tensor& x, const Tensor& weight_ih, const Tensor& weight_hh, bool has_bias,
                              const Tensor& h0, const Tensor& c0, const Tensor& gain_ih, const Tensor& gain_hh,
                              const Tensor& gain_c, const Tensor& bias_c, const Tensor& output, const Tensor& x_pre,
                              const Tensor& h_pre, const Tensor& gates, const Tensor& cells, const Tensor& stats,
                              at::IntArrayRef padding, at::IntArrayRef dilation, bool reverse, bool channels_last) {
  const char* op = "fastvid.convlstm_ln_sequence_backward";
  const SeqGeometry g = check_sequence(op, x, weight_ih, weight_hh, h0, 4, padding, dilation, kHoisted, channels_last);
  const int64_t B = g.B, T = g.T, C = g.C, Cin = g.Cin, H = g.H, W = g.W;
  const bool cl = g.channels_last;
  const auto acc = acc_type(x.scalar_type());
  check_state(op, "c0", c0, g, x);
  const NormParams p = norm_params(op, gain_ih, gain_hh, gain_c, bias_c, C, x);
  check_optional_arg(op, "grad_output", grad_output, {B, T, C, H, W}, x, "x", x.scalar_type());
  check_optional_arg(op, "grad_h_n", grad_h_n, {B, C, H, W}, x, "x", std::nullopt);
  check_optional_arg(op, "grad_c_n", grad_c_n, {B, C, H, W}, x, "x", std::nullopt);
  check_arg(op, "output", output, {B, T, C, H, W}, x, "x", x.scalar_type());
  check_arg(op, "x_pre", x_pre, {B, T, 4 * C, H, W}, x, "x", x.scalar_type());
  check_arg(op, "h_pre", h_pre, {B, T, 4 * C, H, W}, x, "x", x.scalar_type());
  check_arg(op, "gates", gates, {B, T, 4 * C, H, W}, x, "x", x.scalar_type());
  check_arg(op, "cells", cells, {B, T, C, H, W}, x, "x", acc);
  check_arg(op, "stats", stats, {B, T, 6}, x, "x", acc);
  const auto opts = x.options();
  const auto acc_opts = opts.dtype(acc);
  const auto fmt = frame_format(cl);

  const Tensor g_out = grad_output.has_value() ? to_frames_layout(*grad_output, cl) : Tensor();
  const Tensor x_pre_l = to_frames_layout(x_pre, cl), h_pre_l = to_frames_layout(h_pre, cl);
  const Tensor gates_l = to_frames_layout(gates, cl), cells_l = to_frames_layout(cells, cl);
  const Tensor output_l = to_frames_layout(output, cl);
  const Tensor stats_c = stats.contiguous();
  const Tensor c_init = c0.to(acc).contiguous(fmt);
  const Tensor h0_l = h0.contiguous(fmt);
  Tensor dc = grad_c_n.has_value() ? grad_c_n->to(acc).contiguous(fmt).clone() : empty_like_frame(g, C, acc_opts).zero_();
  Tensor dh_rec = grad_h_n.has_value() ? grad_h_n->to(x.scalar_type()).contiguous(fmt) : Tensor();
  const Tensor d_gates = empty_like_frame(g, 4 * C, opts);   // per-step scratch
  const Tensor d_norm_c = empty_like_frame(g, C, acc_opts);  // per-step scratch
  Tensor d_x_pre = empty_frames({B, T}, 4 * C, H, W, cl, opts);
  Tensor d_h_pre = empty_frames({B, T}, 4 * C, H, W, cl, opts);
  Tensor param_grads = at::zeros({14 * C}, opts.dtype(at::kDouble));  // gain_ih, gain_hh, bias, gain_c, bias_c

  LnLstmBackwardArgs a;
  a.geo = {B, C, H * W, cl, x.scalar_type()};
  a.gain_ih = p.gain_ih.data_ptr();
  a.gain_hh = p.gain_hh.data_ptr();
  a.gain_c = p.gain_c.data_ptr();
  a.bias_c = p.bias_c.data_ptr();
  a.param_grads = param_grads.data_ptr<double>();
  a.d_gates = frame(d_gates, cl);
  a.d_norm_c = frame(d_norm_c, cl);
  for (int64_t f = T - 1; f >= 0; --f) {
    const int64_t t = time_of(f, T, reverse);
    a.dh_out = g_out.defined() ? frame(g_out.select(1, t), cl) : Frame{};
    a.dh_rec = frame_or_absent(dh_rec, cl);
    a.dc = frame(dc, cl);
    a.gates = frame(gates_l.select(1, t), cl);
    a.x_pre = frame(x_pre_l.select(1, t), cl);
    a.h_pre = frame(h_pre_l.select(1, t), cl);
    a.c = frame(cells_l.select(1, t), cl);
    a.c_prev = frame(f == 0 ? c_init : cells_l.select(1, time_of(f - 1, T, reverse)), cl);
    a.stats = {stats_c.select(1, t).data_ptr(), stats_c.stride(0)};
    a.d_x_pre = frame(d_x_pre.select(1, t), cl);
    a.d_h_pre = frame(d_h_pre.select(1, t), cl);
    ln_lstm_backward_cpu(a);
    const Tensor h_prev = f == 0 ? h0_l : output_l.select(1, time_of(f - 1, T, reverse));
    dh_rec = conv_input_grad(d_h_pre.select(1, t), h_prev, weight_hh, g);
  }
  const Tensor grad_h0 = dh_rec.contiguous(fmt);
  const Tensor grad_c0 = dc.to(c0.scalar_type());

  // Weight gradients over all frames at once.
  const Tensor grad_w_hh = std::get<0>(conv_weight_grad(flat(d_h_pre), flat(previous_hidden(output_l, h0_l, reverse)),
                                                        weight_hh, false, g));
  const auto grads = at::convolution_backward(flat(d_x_pre), flat(x), weight_ih, std::nullopt, {1, 1}, g.padding,
                                              g.dilation, false, {0, 0}, 1, {true, true, false});
  const Tensor grad_x = std::get<0>(grads).view({B, T, Cin, H, W});
  // The gain and bias gradients the step kernels summed over samples, steps and pixels.
  const auto param_grad = [&](int64_t start, int64_t size, at::ScalarType dtype) {
    return param_grads.narrow(0, start, size).to(dtype, /*non_blocking=*/false, /*copy=*/true);  // never a view
  };
  const Tensor grad_bias = has_bias ? param_grad(8 * C, 4 * C, x.scalar_type()) : at::empty({0}, opts);
  return {to_frames_layout(grad_x, cl),
          std::get<1>(grads).contiguous(),
          grad_w_hh.contiguous(),
          grad_bias,
          grad_h0,
          grad_c0,
          param_grad(0, 4 * C, gain_ih.scalar_type()),
          param_grad(4 * C, 4 * C, gain_hh.scalar_type()),
          param_grad(12 * C, C, gain_c.scalar_type()),
          param_grad(13 * C, C, bias_c.scalar_type())};
}

// ======================================================================== GRU (reset_after form)
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> convgru_ln_sequence(
    const Tensor& x, const Tensor& weight_ih, const Tensor& weight_hh, const OptTensor& bias_ih,
    const OptTensor& bias_hh, const Tensor& h0, const Tensor& gain_ih, const Tensor& gain_hh, at::IntArrayRef padding,
    at::IntArrayRef dilation, bool reverse, bool channels_last, bool save) {
  const char* op = "fastvid.convgru_ln_sequence";
  const SeqGeometry g = check_sequence(op, x, weight_ih, weight_hh, h0, 3, padding, dilation, kHoisted, channels_last);
  check_bias(op, "bias_ih", bias_ih, 3 * g.C, x);
  check_bias(op, "bias_hh", bias_hh, 3 * g.C, x);
  const Tensor g_ih = norm_param(op, "gain_ih", gain_ih, 3 * g.C, x);
  const Tensor g_hh = norm_param(op, "gain_hh", gain_hh, 3 * g.C, x);
  const int64_t B = g.B, T = g.T, C = g.C, H = g.H, W = g.W;
  const bool cl = g.channels_last;
  const auto opts = x.options();
  const auto acc_opts = opts.dtype(acc_type(x.scalar_type()));
  const Tensor b_ih = bias_ih.has_value() ? bias_ih->to(acc_opts.dtype()).contiguous() : Tensor();
  const Tensor b_hh = bias_hh.has_value() ? bias_hh->to(acc_opts.dtype()).contiguous() : Tensor();

  Tensor output = empty_frames({B, T}, C, H, W, cl, opts);
  const Tensor x_pre = conv(flat(x), weight_ih, std::nullopt, g).view({B, T, 3 * C, H, W});
  Tensor h_pre = save ? empty_frames({B, T}, 3 * C, H, W, cl, opts) : at::empty({0}, opts);
  Tensor stats = at::empty(save ? std::vector<int64_t>{B, T, 4} : std::vector<int64_t>{B, 1, 4}, acc_opts);
  Tensor h_n = empty_like_frame(g, C, opts);
  Tensor h_buf = h0.contiguous(frame_format(cl)).clone();

  LnGruForwardArgs a;
  a.geo = {B, C, H * W, cl, x.scalar_type()};
  a.gain_ih = g_ih.data_ptr();
  a.gain_hh = g_hh.data_ptr();
  a.bias_ih = b_ih.defined() ? b_ih.data_ptr() : nullptr;
  a.bias_hh = b_hh.defined() ? b_hh.data_ptr() : nullptr;
  Tensor h_pre_t;
  for (int64_t f = 0; f < T; ++f) {
    const int64_t t = time_of(f, T, reverse);
    h_pre_t = conv(h_buf, weight_hh, std::nullopt, g);
    a.x_pre = frame(x_pre.select(1, t), cl);
    a.h_pre = frame(h_pre_t, cl);
    a.h_prev = frame(h_buf, cl);
    a.h_out = frame(output.select(1, t), cl);
    a.h_out2 = frame(f == T - 1 ? h_n : h_buf, cl);
    a.stats = {stats.select(1, save ? t : 0).data_ptr(), stats.stride(0)};
    ln_gru_forward_cpu(a);
    if (save) h_pre.select(1, t).copy_(h_pre_t);
  }
  if (!save) stats = at::empty({0}, acc_opts);
  return {output, h_n, save ? x_pre : at::empty({0}, opts), h_pre, stats};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> convgru_ln_sequence_backward(
    const OptTensor& grad_output, const OptTensor& grad_h_n, const Tensor& x, const Tensor& weight_ih,
    const Tensor& weight_hh, const OptTensor& bias_ih, const OptTensor& bias_hh, const Tensor& h0,
    const Tensor& gain_ih, const Tensor& gain_hh, const Tensor& output, const Tensor& x_pre, const Tensor& h_pre,
    const Tensor& stats, at::IntArrayRef padding, at::IntArrayRef dilation, bool reverse, bool channels_last) {
  const char* op = "fastvid.convgru_ln_sequence_backward";
  const SeqGeometry g = check_sequence(op, x, weight_ih, weight_hh, h0, 3, padding, dilation, kHoisted, channels_last);
  const int64_t B = g.B, T = g.T, C = g.C, Cin = g.Cin, H = g.H, W = g.W;
  const bool cl = g.channels_last;
  const auto acc = acc_type(x.scalar_type());
  check_bias(op, "bias_ih", bias_ih, 3 * C, x);
  check_bias(op, "bias_hh", bias_hh, 3 * C, x);
  const Tensor g_ih = norm_param(op, "gain_ih", gain_ih, 3 * C, x);
  const Tensor g_hh = norm_param(op, "gain_hh", gain_hh, 3 * C, x);
  check_optional_arg(op, "grad_output", grad_output, {B, T, C, H, W}, x, "x", x.scalar_type());
  check_optional_arg(op, "grad_h_n", grad_h_n, {B, C, H, W}, x, "x", std::nullopt);
  check_arg(op, "output", output, {B, T, C, H, W}, x, "x", x.scalar_type());
  check_arg(op, "x_pre", x_pre, {B, T, 3 * C, H, W}, x, "x", x.scalar_type());
  check_arg(op, "h_pre", h_pre, {B, T, 3 * C, H, W}, x, "x", x.scalar_type());
  check_arg(op, "stats", stats, {B, T, 4}, x, "x", acc);
  const auto opts = x.options();
  const auto fmt = frame_format(cl);
  const Tensor b_ih = bias_ih.has_value() ? bias_ih->to(acc).contiguous() : Tensor();
  const Tensor b_hh = bias_hh.has_value() ? bias_hh->to(acc).contiguous() : Tensor();

  const Tensor g_out = grad_output.has_value() ? to_frames_layout(*grad_output, cl) : Tensor();
  const Tensor x_pre_l = to_frames_layout(x_pre, cl), h_pre_l = to_frames_layout(h_pre, cl);
  const Tensor output_l = to_frames_layout(output, cl);
  const Tensor stats_c = stats.contiguous();
  const Tensor h0_l = h0.contiguous(fmt);
  Tensor dh_rec = grad_h_n.has_value() ? grad_h_n->to(x.scalar_type()).contiguous(fmt) : Tensor();
  Tensor d_xg = empty_frames({B, T}, 3 * C, H, W, cl, opts), d_hg = empty_frames({B, T}, 3 * C, H, W, cl, opts);
  Tensor d_x_pre = empty_frames({B, T}, 3 * C, H, W, cl, opts), d_h_pre = empty_frames({B, T}, 3 * C, H, W, cl, opts);
  Tensor dh_direct = empty_like_frame(g, C, opts);

  LnGruBackwardArgs a;
  a.geo = {B, C, H * W, cl, x.scalar_type()};
  a.gain_ih = g_ih.data_ptr();
  a.gain_hh = g_hh.data_ptr();
  a.bias_ih = b_ih.defined() ? b_ih.data_ptr() : nullptr;
  a.bias_hh = b_hh.defined() ? b_hh.data_ptr() : nullptr;
  for (int64_t f = T - 1; f >= 0; --f) {
    const int64_t t = time_of(f, T, reverse);
    const Tensor h_prev = f == 0 ? h0_l : output_l.select(1, time_of(f - 1, T, reverse));
    a.dh_out = g_out.defined() ? frame(g_out.select(1, t), cl) : Frame{};
    a.dh_rec = frame_or_absent(dh_rec, cl);
    a.x_pre = frame(x_pre_l.select(1, t), cl);
    a.h_pre = frame(h_pre_l.select(1, t), cl);
    a.h_prev = frame(h_prev, cl);
    a.stats = {stats_c.select(1, t).data_ptr(), stats_c.stride(0)};
    a.d_xg = frame(d_xg.select(1, t), cl);
    a.d_hg = frame(d_hg.select(1, t), cl);
    a.d_x_pre = frame(d_x_pre.select(1, t), cl);
    a.d_h_pre = frame(d_h_pre.select(1, t), cl);
    a.dh_prev = frame(dh_direct, cl);
    ln_gru_backward_cpu(a);
    dh_rec = conv_input_grad(d_h_pre.select(1, t), h_prev, weight_hh, g).add_(dh_direct);
  }
  const Tensor grad_w_hh = std::get<0>(conv_weight_grad(flat(d_h_pre), flat(previous_hidden(output_l, h0_l, reverse)),
                                                        weight_hh, false, g));
  const auto grads = at::convolution_backward(flat(d_x_pre), flat(x), weight_ih, std::nullopt, {1, 1}, g.padding,
                                              g.dilation, false, {0, 0}, 1, {true, true, false});
  const std::vector<int64_t> dims = {0, 1, 3, 4};
  const auto per_sample = [&](int64_t k) { return stats_c.select(2, k).view({B, T, 1, 1, 1}); };
  const Tensor d_xg_acc = d_xg.to(acc), d_hg_acc = d_hg.to(acc);
  const Tensor x_hat = (x_pre_l.to(acc) - per_sample(0)) * per_sample(1);
  const Tensor h_hat = (h_pre_l.to(acc) - per_sample(2)) * per_sample(3);
  const auto bias_grad = [&](const OptTensor& bias, const Tensor& d) {
    return bias.has_value() ? d.sum(dims).to(bias->scalar_type()) : at::empty({0}, opts);
  };
  return {to_frames_layout(std::get<0>(grads).view({B, T, Cin, H, W}), cl),
          std::get<1>(grads).contiguous(),
          grad_w_hh.contiguous(),
          bias_grad(bias_ih, d_xg_acc),
          bias_grad(bias_hh, d_hg_acc),
          dh_rec.contiguous(fmt),
          (d_xg_acc * x_hat).sum(dims).to(gain_ih.scalar_type()),
          (d_hg_acc * h_hat).sum(dims).to(gain_hh.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastvid, CPU, m) {
  m.impl("convlstm_ln_sequence", &convlstm_ln_sequence);
  m.impl("convlstm_ln_sequence_backward", &convlstm_ln_sequence_backward);
  m.impl("convgru_ln_sequence", &convgru_ln_sequence);
  m.impl("convgru_ln_sequence_backward", &convgru_ln_sequence_backward);
}

}  // namespace recurrent
}  // namespace fastvid
