// ConvLSTM / ConvGRU ops: argument checks, buffers and the time loops. Device-generic: the
// convolutions go through ATen (oneDNN on CPU, cuDNN on CUDA) and the fused gate kernels are
// picked by device (recurrent_cpu.cpp / recurrent_cuda.cu). Registered for CPU and CUDA.
//
// Sequence ops take x as [B, T, C_in, H, W] (any strides) and run one layer in one direction.
// Strategies (see fastvid/ops/recurrent.py for how one is chosen):
//   kHoisted: the input conv runs once over all B·T frames; per step one hidden conv
//             and one fused gate kernel (the cuDNN RNN design).
//   kConcat:  a persistent time-major buffer [T, B, C_in + C, H, W] holds [x_t, h_{t-1}] for
//             every step; per step one conv over it, and the gate kernel writes h straight into
//             the next step's slot (no cat). The buffer is also the input of the one batched
//             weight-gradient conv in backward.
//   kWinograd: CPU, 3x3, dilation 1: every conv a Winograd F(2x2, 3x3) (recurrent_winograd.h) with the
//             weights transformed once per call and the gate kernel run per conv output strip; LSTM
//             sums the x and h convs of a step in the Winograd domain, GRU hoists the x conv; backward
//             as hoisted with the per-step input-gradient convs Winograd.
// Backward walks the steps in reverse, per step one fused gate-backward kernel and one
// input-gradient conv; all weight (and bias) gradients come from one batched conv backward.
// lengths (optional, variable-length batches): the gate kernels' StepMask (recurrent_kernels.h) makes
// a sample's steps past its length the identity on its state, in both strategies and directions.
#include "recurrent_kernels.h"
#include "recurrent_sequence.h"
#include "recurrent_winograd.h"
#include "../fastvid_common.h"

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>
#include <vector>

namespace fastvid {
namespace recurrent {
namespace {

// ======================================================================== LSTM
constexpr int64_t kWeightGradChunks = 4;  // concat backward: weight gradient in <= 4 batched calls

// [3, C] peephole gradient: Σ over batch, time, pixels of d a_i·c_prev, d a_f·c_prev, d a_o·c
// (all arguments batch-first [B, n, ., H, W]).
Tensor peephole_grad(const Tensor& d_gates, const Tensor& c_prev, const Tensor& c) {
  const int64_t C = c.size(2);
  const Tensor dg = d_gates.to(c.scalar_type());
  const std::vector<int64_t> dims = {0, 1, 3, 4};
  return at::stack({(dg.narrow(2, 0, C) * c_prev).sum(dims), (dg.narrow(2, C, C) * c_prev).sum(dims),
                    (dg.narrow(2, 3 * C, C) * c).sum(dims)});
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> convlstm_sequence(
    const Tensor& x, const Tensor& weight_ih, const Tensor& weight_hh, const OptTensor& bias, const Tensor& h0,
    const Tensor& c0, const OptTensor& peephole, at::IntArrayRef padding, at::IntArrayRef dilation, bool reverse,
    int64_t strategy, bool channels_last, bool save, const OptTensor& lengths) {
  const char* op = "fastvid.convlstm_sequence";
  const SeqGeometry g = check_sequence(op, x, weight_ih, weight_hh, h0, 4, padding, dilation, strategy, channels_last);
  if (strategy == kWinograd) check_winograd(op, x, weight_hh, g, lengths);
  check_state(op, "c0", c0, g, x);
  check_bias(op, "bias", bias, 4 * g.C, x);
  check_optional_arg(op, "peephole", peephole, {3, g.C}, x, "x", std::nullopt);
  const Tensor lengths_d = check_lengths(op, lengths, g, x);
  const c10::DeviceGuard guard(x.device());
  const int64_t B = g.B, T = g.T, C = g.C, Cin = g.Cin, H = g.H, W = g.W;
  const auto opts = x.options();
  const auto acc_opts = opts.dtype(acc_type(x.scalar_type()));
  const auto fmt = frame_format(g.channels_last);

  Tensor output = empty_frames({B, T}, C, H, W, g.channels_last, opts);
  // The gate cache (activated i, f, g, o of every step) is batch-first [B, T, 4C] for hoisted (it is the
  // hoisted input conv's output, overwritten in place) and time-major [T, B, 4C] for concat (it matches
  // the [x, h] buffer). Backward overwrites it with the gate gradients.
  Tensor gates = at::empty({0}, opts);
  Tensor cells = save ? empty_frames({B, T}, C, H, W, g.channels_last, acc_opts) : at::empty({0}, acc_opts);
  Tensor c_init = c0.to(acc_opts.dtype()).contiguous(fmt);
  Tensor c_run = save ? Tensor() : c_init.clone();
  Tensor h_n = empty_like_frame(g, C, opts);
  Tensor zeros = zeros_for_planes(C, H, W, opts);
  Tensor peep = peephole.has_value() ? peephole->to(acc_opts.dtype()).contiguous() : Tensor();

  LstmForwardArgs a;
  a.geo = {B, C, H * W, x.scalar_type()};
  a.peephole = peep.defined() ? peep.data_ptr() : nullptr;
  a.save = save;

  Tensor x_gates, h_buf, buffer, w_cat, v_ih, v_hh;
  if (strategy == kWinograd) {  // per step x and h convs summed in the Winograd domain, gate kernel per strip
    v_ih = winograd_weights(weight_ih);
    v_hh = winograd_weights(weight_hh);
    if (save) gates = empty_frames({B, T}, 4 * C, H, W, g.channels_last, opts);
  } else if (strategy == kHoisted) {
    x_gates = conv(flat(x), weight_ih, bias, g).view({B, T, 4 * C, H, W});
    h_buf = h0.contiguous(fmt).clone();
    if (save) gates = x_gates;
  } else {
    if (save) gates = empty_frames({T, B}, 4 * C, H, W, g.channels_last, opts);
    buffer = empty_frames({T, B}, Cin + C, H, W, g.channels_last, opts);
    fill_concat_buffer(buffer, x, h0, g, reverse);
    w_cat = at::cat({weight_ih, weight_hh}, 1);
  }
  // Per-step conv outputs the planes point into. Declared outside the loop so the previous step's
  // buffer is still alive while the next conv allocates: malloc then alternates two blocks instead of
  // returning a large block to the OS and page-faulting it back every step.
  Tensor h_gates, gates_pre;
  for (int64_t f = 0; f < T; ++f) {
    const int64_t t = time_of(f, T, reverse);
    const bool last = f == T - 1;
    if (strategy == kWinograd) {
      for (int k = 0; k < 4; ++k) a.a_h[k] = zero_plane(zeros);  // a_x: per conv strip
      a.h_out2 = plane(last ? h_n : output.select(1, t));
    } else if (strategy == kHoisted) {
      h_gates = conv(h_buf, weight_hh, std::nullopt, g);
      const Tensor x_gates_t = x_gates.select(1, t);
      for (int k = 0; k < 4; ++k) {
        a.a_x[k] = slot(x_gates_t, k, C);
        a.a_h[k] = slot(h_gates, k, C);
      }
      a.h_out2 = plane(last ? h_n : h_buf);
      a.h_prev = plane(h_buf);
    } else {
      gates_pre = conv(buffer.select(0, t), w_cat, bias, g);
      a.h_prev = plane(buffer.select(0, t).narrow(1, Cin, C));
      for (int k = 0; k < 4; ++k) {
        a.a_x[k] = slot(gates_pre, k, C);
        a.a_h[k] = zero_plane(zeros);
      }
      a.h_out2 = plane(last ? h_n : buffer.select(0, time_of(f + 1, T, reverse)).narrow(1, Cin, C));
    }
    a.h_out = plane(output.select(1, t));
    if (save) {
      a.c_prev = plane(f == 0 ? c_init : cells.select(1, time_of(f - 1, T, reverse)));
      a.c_out = plane(cells.select(1, t));
      const Tensor gates_t = gates.select(strategy == kConcat ? 0 : 1, t);  // in place over x_gates for hoisted
      for (int k = 0; k < 4; ++k) a.gates_out[k] = slot(gates_t, k, C);
    } else {
      a.c_prev = plane(c_run);
      a.c_out = plane(c_run);
    }
    a.mask = step_mask(lengths_d, t);
    if (strategy == kWinograd)
      winograd_lstm_step(a, x.select(1, t), v_ih, bias, f == 0 ? h0 : output.select(1, time_of(f - 1, T, reverse)),
                         v_hh, g);
    else FASTVID_LAUNCH(lstm_forward, a, x.device());
  }
  Tensor c_n = save ? cells.select(1, time_of(T - 1, T, reverse)).clone() : c_run;
  Tensor workspace = (save && strategy == kConcat) ? buffer : at::empty({0}, opts);
  return {output, h_n, c_n, gates, cells, workspace};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> convlstm_sequence_backward(
    const OptTensor& grad_output, const OptTensor& grad_h_n, const OptTensor& grad_c_n, const Tensor& x,
    const Tensor& weight_ih, const Tensor& weight_hh, bool has_bias, const Tensor& h0, const Tensor& c0,
    const OptTensor& peephole, const Tensor& output, const Tensor& gates, const Tensor& cells,
    const Tensor& workspace, at::IntArrayRef padding, at::IntArrayRef dilation, bool reverse, int64_t strategy,
    bool channels_last, const OptTensor& lengths) {
  const char* op = "fastvid.convlstm_sequence_backward";
  const SeqGeometry g = check_sequence(op, x, weight_ih, weight_hh, h0, 4, padding, dilation, strategy, channels_last);
  const Tensor lengths_d = check_lengths(op, lengths, g, x);
  if (strategy == kWinograd) check_winograd(op, x, weight_hh, g, lengths);
  {
    const int64_t B = g.B, T = g.T, C = g.C, H = g.H, W = g.W;
    const auto acc = acc_type(x.scalar_type());
    check_state(op, "c0", c0, g, x);
    check_optional_arg(op, "peephole", peephole, {3, C}, x, "x", std::nullopt);
    check_optional_arg(op, "grad_output", grad_output, {B, T, C, H, W}, x, "x", x.scalar_type());
    check_optional_arg(op, "grad_h_n", grad_h_n, {B, C, H, W}, x, "x", std::nullopt);
    check_optional_arg(op, "grad_c_n", grad_c_n, {B, C, H, W}, x, "x", std::nullopt);
    check_arg(op, "output", output, {B, T, C, H, W}, x, "x", x.scalar_type());
    // The caches saved by convlstm_sequence(save=True) with the same strategy: gates batch-first for
    // hoisted (and winograd), time-major for concat; the concat workspace is the [x, h] buffer.
    if (strategy != kConcat) {
      check_arg(op, "gates", gates, {B, T, 4 * C, H, W}, x, "x", x.scalar_type());
      check_arg(op, "workspace", workspace, {0}, x, "x", x.scalar_type());  // hoisted has none
    } else {
      check_arg(op, "gates", gates, {T, B, 4 * C, H, W}, x, "x", x.scalar_type());
      check_arg(op, "workspace", workspace, {T, B, g.Cin + C, H, W}, x, "x", x.scalar_type());
    }
    check_arg(op, "cells", cells, {B, T, C, H, W}, x, "x", acc);
  }
  const c10::DeviceGuard guard(x.device());
  const int64_t B = g.B, T = g.T, C = g.C, Cin = g.Cin, H = g.H, W = g.W;
  const auto opts = x.options();
  const auto acc_opts = opts.dtype(acc_type(x.scalar_type()));
  const auto fmt = frame_format(g.channels_last);
  const bool hoisted = strategy != kConcat;  // winograd: hoisted with the per-step input-grad conv Winograd
  const Tensor v_hh_grad = strategy == kWinograd ? winograd_input_grad_weights(weight_hh) : Tensor();

  const Tensor zeros = zeros_for_planes(C, H, W, opts);
  const Tensor g_out = grad_output.has_value() ? to_frames_layout(*grad_output, g.channels_last) : Tensor();
  const Tensor cells_l = to_frames_layout(cells, g.channels_last);
  const Tensor output_l = to_frames_layout(output, g.channels_last);
  const Tensor c_init = c0.to(acc_opts.dtype()).contiguous(fmt);
  Tensor dc = grad_c_n.has_value() ? grad_c_n->to(acc_opts.dtype()).contiguous(fmt).clone()
                                   : empty_like_frame(g, C, acc_opts).zero_();
  Tensor dh_rec = grad_h_n.has_value() ? grad_h_n->to(x.scalar_type()).contiguous(fmt) : Tensor();
  Tensor peep = peephole.has_value() ? peephole->to(acc_opts.dtype()).contiguous() : Tensor();
  // d(pre-activation gates), laid out like the gate cache: batch-first for hoisted (matches x),
  // time-major for concat (matches the [x, h] buffer).
  const int64_t time_dim = hoisted ? 1 : 0;
  // concat: the weight gradient is accumulated over chunks of consecutive steps (each chunk one batched
  // conv weight-gradient over its B * chunk frames), so backward holds gate gradients -- and the conv's
  // internal copies of its inputs -- for one chunk instead of the whole sequence. hoisted keeps one call
  // over all frames (its input gradient is one conv over all of x as well).
  const int64_t chunk = hoisted ? T : (T + kWeightGradChunks - 1) / kWeightGradChunks;
  Tensor d_gates = hoisted ? at::empty_like(gates) : empty_frames({chunk, B}, 4 * C, H, W, g.channels_last, opts);
  Tensor grad_x = hoisted ? Tensor() : empty_frames({B, T}, Cin, H, W, g.channels_last, opts);
  Tensor w_cat = hoisted ? Tensor() : at::cat({weight_ih, weight_hh}, 1);
  const Tensor h0_l = h0.contiguous(fmt);
  const Tensor c_prev_all = peephole.has_value() ? previous_hidden(cells_l, c_init, reverse) : Tensor();
  Tensor grad_w_cat, grad_bias, grad_peephole;
  const auto add_to = [](Tensor& sum, const Tensor& term) { sum = sum.defined() ? sum.add_(term) : term; };
  // Weight, bias and peephole gradients of the steps [t0, t0 + n), whose gate gradients are d_gates[:n].
  const auto flush_chunk = [&](int64_t t0) {
    const int64_t n = std::min(chunk, T - t0);
    const Tensor d = d_gates.narrow(0, 0, n);
    auto [gw, gb] = conv_weight_grad(flat(d), flat(workspace.narrow(0, t0, n)), w_cat, has_bias, g);
    add_to(grad_w_cat, gw);
    if (has_bias) add_to(grad_bias, gb);
    if (peephole.has_value())
      add_to(grad_peephole, peephole_grad(d.transpose(0, 1), c_prev_all.narrow(1, t0, n), cells_l.narrow(1, t0, n)));
  };
  int64_t chunk_start = -1;  // first time step of the chunk d_gates holds (concat)

  LstmBackwardArgs a;
  a.geo = {B, C, H * W, x.scalar_type()};
  a.peephole = peep.defined() ? peep.data_ptr() : nullptr;
  // lengths: the state gradient masked samples pass straight to the previous step.
  const Tensor dh_skip = lengths_d.defined() ? empty_like_frame(g, C, opts) : Tensor();
  if (dh_skip.defined()) a.dh_prev_out = plane(dh_skip);
  for (int64_t f = T - 1; f >= 0; --f) {
    const int64_t t = time_of(f, T, reverse);
    a.dh_in[0] = g_out.defined() ? plane(g_out.select(1, t)) : zero_plane(zeros);
    a.dh_in[1] = dh_rec.defined() ? plane(dh_rec) : zero_plane(zeros);
    a.dh_in[2] = zero_plane(zeros);
    a.dc_in = plane(dc);
    a.dc_prev_out = plane(dc);
    if (!hoisted && (chunk_start < 0 || t / chunk != chunk_start / chunk)) {
      if (chunk_start >= 0) flush_chunk(chunk_start);
      chunk_start = t / chunk * chunk;
    }
    const Tensor gates_t = gates.select(time_dim, t);
    const Tensor d_gates_t = hoisted ? d_gates.select(1, t) : d_gates.select(0, t - chunk_start);
    for (int k = 0; k < 4; ++k) {
      a.gates[k] = slot(gates_t, k, C);
      a.d_gates_out[k] = slot(d_gates_t, k, C);
    }
    a.c_prev = plane(f == 0 ? c_init : cells_l.select(1, time_of(f - 1, T, reverse)));
    a.c = plane(cells_l.select(1, t));
    a.mask = step_mask(lengths_d, t);
    FASTVID_LAUNCH(lstm_backward, a, x.device());
    if (hoisted) {
      const Tensor h_prev = f == 0 ? h0_l : output_l.select(1, time_of(f - 1, T, reverse));
      dh_rec = strategy == kWinograd ? winograd_conv(d_gates_t, v_hh_grad, std::nullopt, g)
                                     : conv_input_grad(d_gates_t, h_prev, weight_hh, g);
    } else {
      const Tensor d_buffer = conv_input_grad(d_gates_t, workspace.select(0, t), w_cat, g);
      grad_x.select(1, t).copy_(d_buffer.narrow(1, 0, Cin));
      dh_rec = d_buffer.narrow(1, Cin, C);
    }
    if (dh_skip.defined()) dh_rec.add_(dh_skip);
  }
  if (!hoisted) flush_chunk(chunk_start);
  Tensor grad_h0 = dh_rec.contiguous(fmt);
  Tensor grad_c0 = dc.to(c0.scalar_type());

  Tensor grad_w_ih, grad_w_hh;
  if (hoisted) {
    const Tensor d_gates_flat = flat(d_gates);
    grad_w_hh = std::get<0>(conv_weight_grad(d_gates_flat,
                                             flat(previous_state(output_l, h0_l, reverse, lengths_d, g.channels_last)),
                                             weight_hh, false, g))
                    .contiguous();
    const auto grads = at::convolution_backward(d_gates_flat, flat(x), weight_ih, at::IntArrayRef({4 * C}), {1, 1},
                                                g.padding, g.dilation, false, {0, 0}, 1, {true, true, has_bias});
    grad_x = std::get<0>(grads).view({B, T, Cin, H, W});
    grad_w_ih = std::get<1>(grads).contiguous();
    grad_bias = std::get<2>(grads);
    if (peephole.has_value()) grad_peephole = peephole_grad(d_gates, c_prev_all, cells_l);
  } else {
    grad_w_ih = grad_w_cat.narrow(1, 0, Cin).contiguous();
    grad_w_hh = grad_w_cat.narrow(1, Cin, C).contiguous();
  }
  if (!has_bias) grad_bias = at::empty({0}, opts);

  grad_peephole = peephole.has_value() ? grad_peephole.to(peephole->scalar_type()) : at::empty({0}, opts);
  // Weight gradients contiguous like the weights (oneDNN returns channels_last ones for channels_last input).
  return {to_frames_layout(grad_x, g.channels_last), grad_w_ih.contiguous(), grad_w_hh.contiguous(), grad_bias,
          grad_h0, grad_c0, grad_peephole};
}

// ======================================================================== GRU
// Combined weights of the concat strategy. reset_after needs x_n and h_n apart, so its conv has
// 4C outputs [r, z, x_n, h_n] with zero blocks ([W_in | 0] and [0 | W_hn]; the forward convolves h alone
// for h_n, so only the backward uses the [0 | W_hn] rows); the Ballas form uses two
// convs, [W_rz | U_rz] over [x, h] and [W_n | U_n] over [x, r·h].
struct GruConcatWeights {
  Tensor w_a, w_b;
  OptTensor b_a, b_b;
};

GruConcatWeights gru_concat_weights(const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
                                    const OptTensor& b_hh, int64_t C, bool reset_after) {
  GruConcatWeights w;
  if (reset_after) {
    const Tensor w_rz = at::cat({w_ih.narrow(0, 0, 2 * C), w_hh.narrow(0, 0, 2 * C)}, 1);
    const Tensor w_xn = at::cat({w_ih.narrow(0, 2 * C, C), at::zeros_like(w_hh.narrow(0, 2 * C, C))}, 1);
    const Tensor w_hn = at::cat({at::zeros_like(w_ih.narrow(0, 2 * C, C)), w_hh.narrow(0, 2 * C, C)}, 1);
    w.w_a = at::cat({w_rz, w_xn, w_hn}, 0);
    if (b_ih.has_value() || b_hh.has_value()) {
      const Tensor bi = b_ih.has_value() ? *b_ih : at::zeros({3 * C}, w_ih.options());
      const Tensor bh = b_hh.has_value() ? *b_hh : at::zeros({3 * C}, w_ih.options());
      w.b_a = at::cat({bi.narrow(0, 0, 2 * C) + bh.narrow(0, 0, 2 * C), bi.narrow(0, 2 * C, C), bh.narrow(0, 2 * C, C)});
    }
  } else {
    w.w_a = at::cat({w_ih.narrow(0, 0, 2 * C), w_hh.narrow(0, 0, 2 * C)}, 1);
    w.w_b = at::cat({w_ih.narrow(0, 2 * C, C), w_hh.narrow(0, 2 * C, C)}, 1);
    w.b_a = add_optional(narrow_optional(b_ih, 0, 2 * C), narrow_optional(b_hh, 0, 2 * C));
    w.b_b = add_optional(narrow_optional(b_ih, 2 * C, C), narrow_optional(b_hh, 2 * C, C));
  }
  return w;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> convgru_sequence(
    const Tensor& x, const Tensor& weight_ih, const Tensor& weight_hh, const OptTensor& bias_ih,
    const OptTensor& bias_hh, const Tensor& h0, at::IntArrayRef padding, at::IntArrayRef dilation, bool reset_after,
    bool reverse, int64_t strategy, bool channels_last, bool save, const OptTensor& lengths) {
  const char* op = "fastvid.convgru_sequence";
  const SeqGeometry g = check_sequence(op, x, weight_ih, weight_hh, h0, 3, padding, dilation, strategy, channels_last);
  if (strategy == kWinograd) check_winograd(op, x, weight_hh, g, lengths);
  check_bias(op, "bias_ih", bias_ih, 3 * g.C, x);
  check_bias(op, "bias_hh", bias_hh, 3 * g.C, x);
  const Tensor lengths_d = check_lengths(op, lengths, g, x);
  const c10::DeviceGuard guard(x.device());
  const int64_t B = g.B, T = g.T, C = g.C, Cin = g.Cin, H = g.H, W = g.W;
  const auto opts = x.options();
  const auto fmt = frame_format(g.channels_last);

  Tensor output = empty_frames({B, T}, C, H, W, g.channels_last, opts);
  Tensor cache = save ? empty_frames({B, T}, 4 * C, H, W, g.channels_last, opts) : at::empty({0}, opts);
  Tensor h_n = empty_like_frame(g, C, opts);
  Tensor zeros = zeros_for_planes(C, H, W, opts);
  Tensor reset_h = reset_after ? Tensor() : empty_like_frame(g, C, opts);

  GruForwardArgs a;
  a.geo = {B, C, H * W, x.scalar_type()};
  a.reset_after = reset_after;
  a.save = save;
  GruResetForwardArgs ra;
  ra.geo = a.geo;
  ra.save = save;

  Tensor x_gates, h_buf, buffers, v_h, v_n;
  GruConcatWeights cw;
  if (strategy == kWinograd) {  // hoisted, all convs Winograd; the gate kernel runs per strip of the last one
    x_gates = winograd_conv(flat(x), winograd_weights(weight_ih), bias_ih, g).view({B, T, 3 * C, H, W});
    v_h = winograd_weights(reset_after ? weight_hh : weight_hh.narrow(0, 0, 2 * C));
    if (!reset_after) v_n = winograd_weights(weight_hh.narrow(0, 2 * C, C));
  } else if (strategy == kHoisted) {
    x_gates = conv(flat(x), weight_ih, bias_ih, g).view({B, T, 3 * C, H, W});
    h_buf = h0.contiguous(fmt).clone();
  } else {
    buffers = empty_frames({reset_after ? 1 : 2, T, B}, Cin + C, H, W, g.channels_last, opts);
    Tensor buffer = buffers.select(0, 0);
    fill_concat_buffer(buffer, x, h0, g, reverse);
    if (!reset_after) buffers.select(0, 1).narrow(2, 0, Cin).copy_(x.transpose(0, 1));
    cw = gru_concat_weights(weight_ih, weight_hh, bias_ih, bias_hh, C, reset_after);
  }
  Tensor keep1, keep2;  // per-step conv outputs the planes point into (outside the loop: see convlstm_sequence)
  for (int64_t f = 0; f < T; ++f) {
    const int64_t t = time_of(f, T, reverse);
    const bool last = f == T - 1;
    a.mask = ra.mask = step_mask(lengths_d, t);
    Tensor h_prev, h_next;
    if (save) {
      for (int k = 0; k < 4; ++k) a.cache_out[k] = slot(cache.select(1, t), k, C);
      ra.r_out = a.cache_out[0];
    }
    if (strategy != kConcat) {
      const bool wino = strategy == kWinograd;
      // winograd reads h_{t-1} from the output (a strip's conv reads its neighbours' rows: no in-place h)
      h_prev = !wino ? h_buf : f == 0 ? h0.contiguous(fmt) : output.select(1, time_of(f - 1, T, reverse));
      h_next = last ? h_n : wino ? output.select(1, t) : h_buf;
      const Tensor x_gates_t = x_gates.select(1, t);
      for (int k = 0; k < 3; ++k) a.x[k] = slot(x_gates_t, k, C);
      if (reset_after) {
        if (!wino) keep1 = conv(h_buf, weight_hh, bias_hh, g);  // winograd: per strip
        if (!wino) for (int k = 0; k < 3; ++k) a.h[k] = slot(keep1, k, C);
      } else {
        const OptTensor bias_rz = narrow_optional(bias_hh, 0, 2 * C);
        keep1 = wino ? winograd_conv(h_prev, v_h, bias_rz, g) : conv(h_buf, weight_hh.narrow(0, 0, 2 * C), bias_rz, g);
        ra.x_r = a.x[0];
        ra.h_r = slot(keep1, 0, C);
        ra.h_prev = plane(h_prev);
        ra.reset_h_out = plane(reset_h);
        FASTVID_LAUNCH(gru_reset_forward, ra, x.device());
        if (!wino) keep2 = conv(reset_h, weight_hh.narrow(0, 2 * C, C), narrow_optional(bias_hh, 2 * C, C), g);
        a.h[0] = slot(keep1, 0, C);
        a.h[1] = slot(keep1, 1, C);
        if (!wino) a.h[2] = plane(keep2);  // winograd: per strip
      }
    } else {
      const Tensor buffer_t = buffers.select(0, 0).select(0, t);
      h_prev = buffer_t.narrow(1, Cin, C);
      h_next = last ? h_n : buffers.select(0, 0).select(0, time_of(f + 1, T, reverse)).narrow(1, Cin, C);
      if (reset_after) {
        // [r, z, x_n] from [x, h]; h_n = W_hn h as a convolution of h alone: cw.w_a's zero block over x
        // would turn an inf in x into 0·inf = NaN in h_n (the backward keeps the 4C-row cw.w_a: it
        // reads h_n from the cache and only multiplies gradients by that zero block).
        keep1 = conv(buffer_t, cw.w_a.narrow(0, 0, 3 * C), narrow_optional(cw.b_a, 0, 3 * C), g);
        keep2 = conv(h_prev, weight_hh.narrow(0, 2 * C, C), narrow_optional(bias_hh, 2 * C, C), g);
        for (int k = 0; k < 3; ++k) a.x[k] = slot(keep1, k, C);
        a.h[0] = a.h[1] = zero_plane(zeros);
        a.h[2] = plane(keep2);
      } else {
        keep1 = conv(buffer_t, cw.w_a, cw.b_a, g);  // [r, z]
        for (int k = 0; k < 2; ++k) a.x[k] = slot(keep1, k, C);
        const Tensor buffer2_t = buffers.select(0, 1).select(0, t);
        ra.x_r = slot(keep1, 0, C);
        ra.h_r = zero_plane(zeros);
        ra.h_prev = plane(h_prev);
        ra.reset_h_out = plane(buffer2_t.narrow(1, Cin, C));
        FASTVID_LAUNCH(gru_reset_forward, ra, x.device());
        keep2 = conv(buffer2_t, cw.w_b, cw.b_b, g);
        a.x[2] = plane(keep2);
        a.h[0] = a.h[1] = a.h[2] = zero_plane(zeros);
      }
    }
    a.h_prev = plane(h_prev);
    a.h_out = plane(output.select(1, t));
    a.h_out2 = plane(h_next);
    if (strategy == kWinograd && reset_after) winograd_gru_step(a, h_prev, v_h, bias_hh, 0, g);
    else if (strategy == kWinograd) winograd_gru_step(a, reset_h, v_n, narrow_optional(bias_hh, 2 * C, C), 2, g);
    else FASTVID_LAUNCH(gru_forward, a, x.device());
  }
  Tensor workspace = (save && strategy == kConcat) ? buffers : at::empty({0}, opts);
  return {output, h_n, cache, workspace};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> convgru_sequence_backward(
    const OptTensor& grad_output, const OptTensor& grad_h_n, const Tensor& x, const Tensor& weight_ih,
    const Tensor& weight_hh, const OptTensor& bias_ih, const OptTensor& bias_hh, const Tensor& h0,
    const Tensor& output, const Tensor& cache, const Tensor& workspace, at::IntArrayRef padding,
    at::IntArrayRef dilation, bool reset_after, bool reverse, int64_t strategy, bool channels_last,
    const OptTensor& lengths) {
  const char* op = "fastvid.convgru_sequence_backward";
  const SeqGeometry g = check_sequence(op, x, weight_ih, weight_hh, h0, 3, padding, dilation, strategy, channels_last);
  if (strategy == kWinograd) check_winograd(op, x, weight_hh, g, lengths);
  check_bias(op, "bias_ih", bias_ih, 3 * g.C, x);
  check_bias(op, "bias_hh", bias_hh, 3 * g.C, x);
  const Tensor lengths_d = check_lengths(op, lengths, g, x);
  {
    const int64_t B = g.B, T = g.T, C = g.C, H = g.H, W = g.W;
    check_optional_arg(op, "grad_output", grad_output, {B, T, C, H, W}, x, "x", x.scalar_type());
    check_optional_arg(op, "grad_h_n", grad_h_n, {B, C, H, W}, x, "x", std::nullopt);
    check_arg(op, "output", output, {B, T, C, H, W}, x, "x", x.scalar_type());
    // The caches saved by convgru_sequence(save=True): the concat workspace holds one [x, h] buffer
    // (reset_after) or two ([x, h] and [x, r·h]).
    check_arg(op, "cache", cache, {B, T, 4 * C, H, W}, x, "x", x.scalar_type());
    const std::vector<int64_t> workspace_shape =
        strategy == kConcat ? std::vector<int64_t>{reset_after ? 1 : 2, T, B, g.Cin + C, H, W}
                            : std::vector<int64_t>{0};  // hoisted has none
    check_arg(op, "workspace", workspace, workspace_shape, x, "x", x.scalar_type());
  }
  const c10::DeviceGuard guard(x.device());
  const int64_t B = g.B, T = g.T, C = g.C, Cin = g.Cin, H = g.H, W = g.W;
  const auto opts = x.options();
  const auto fmt = frame_format(g.channels_last);
  const bool hoisted = strategy != kConcat;  // winograd: hoisted with the per-step input-grad convs Winograd
  const bool wino = strategy == kWinograd;
  const bool has_bias = bias_ih.has_value() || bias_hh.has_value();

  const Tensor zeros = zeros_for_planes(C, H, W, opts);
  const Tensor g_out = grad_output.has_value() ? to_frames_layout(*grad_output, g.channels_last) : Tensor();
  const Tensor cache_l = to_frames_layout(cache, g.channels_last);
  const Tensor output_l = to_frames_layout(output, g.channels_last);
  const Tensor h0_l = h0.contiguous(fmt);
  Tensor dh_conv = grad_h_n.has_value() ? grad_h_n->to(x.scalar_type()).contiguous(fmt) : Tensor();
  Tensor dh_direct = empty_like_frame(g, C, opts).zero_();
  Tensor scratch = empty_like_frame(g, C, opts);  // receives gradients a variant does not use

  // d(pre-activations): hoisted: d_x [B, T, 3C] and, for reset_after, d_h [B, T, 3C];
  // concat: [T, B, 4C] (r, z, x_n, h_n) for reset_after, [T, B, 3C] for Ballas.
  const int64_t d_channels = (!hoisted && reset_after) ? 4 * C : 3 * C;
  Tensor d_x = hoisted ? empty_frames({B, T}, 3 * C, H, W, g.channels_last, opts)
                       : empty_frames({T, B}, d_channels, H, W, g.channels_last, opts);
  Tensor d_h = (hoisted && reset_after) ? empty_frames({B, T}, 3 * C, H, W, g.channels_last, opts) : Tensor();
  Tensor grad_x = hoisted ? Tensor() : empty_frames({B, T}, Cin, H, W, g.channels_last, opts);
  GruConcatWeights cw;
  if (!hoisted) cw = gru_concat_weights(weight_ih, weight_hh, bias_ih, bias_hh, C, reset_after);
  const Tensor w_rz = weight_hh.narrow(0, 0, 2 * C), w_n = weight_hh.narrow(0, 2 * C, C);
  Tensor v_grad_h, v_grad_rz, v_grad_n;  // winograd: transformed flipped weights of the input-grad convs
  if (wino && reset_after) v_grad_h = winograd_input_grad_weights(weight_hh);
  if (wino && !reset_after) v_grad_rz = winograd_input_grad_weights(w_rz), v_grad_n = winograd_input_grad_weights(w_n);

  GruBackwardArgs a;
  a.geo = {B, C, H * W, x.scalar_type()};
  a.reset_after = reset_after;
  GruResetBackwardArgs ra;
  ra.geo = a.geo;
  // lengths in reverse: a sample's first step starts from h0, not from the (zero) output after it.
  const Tensor h_prev_masked = (hoisted && lengths_d.defined() && reverse)
                                   ? previous_state(output_l, h0_l, reverse, lengths_d, g.channels_last)
                                   : Tensor();
  for (int64_t f = T - 1; f >= 0; --f) {
    const int64_t t = time_of(f, T, reverse);
    a.mask = ra.mask = step_mask(lengths_d, t);
    const Tensor cache_t = cache_l.select(1, t);
    const Tensor d_x_t = hoisted ? d_x.select(1, t) : d_x.select(0, t);
    const Tensor h_prev = !hoisted                ? workspace.select(0, 0).select(0, t).narrow(1, Cin, C)
                          : h_prev_masked.defined() ? h_prev_masked.select(1, t)
                          : f == 0                ? h0_l
                                                  : output_l.select(1, time_of(f - 1, T, reverse));
    a.dh_in[0] = g_out.defined() ? plane(g_out.select(1, t)) : zero_plane(zeros);
    a.dh_in[1] = dh_conv.defined() ? plane(dh_conv) : zero_plane(zeros);
    a.dh_in[2] = plane(dh_direct);
    for (int k = 0; k < 4; ++k) a.cache[k] = slot(cache_t, k, C);
    a.h_prev = plane(h_prev);
    a.dh_prev_out = plane(dh_direct);
    for (int k = 0; k < 3; ++k) {
      a.d_x_out[k] = slot(d_x_t, k, C);
      a.d_h_out[k] = plane(scratch);
    }
    if (hoisted && reset_after) {
      for (int k = 0; k < 3; ++k) a.d_h_out[k] = slot(d_h.select(1, t), k, C);
    } else if (!hoisted && reset_after) {
      a.d_h_out[2] = slot(d_x_t, 3, C);
    }
    FASTVID_LAUNCH(gru_backward, a, x.device());

    if (reset_after) {
      if (hoisted) {
        dh_conv = wino ? winograd_conv(d_h.select(1, t), v_grad_h, std::nullopt, g)
                       : conv_input_grad(d_h.select(1, t), h_prev, weight_hh, g);
      } else {
        const Tensor d_buffer = conv_input_grad(d_x_t, workspace.select(0, 0).select(0, t), cw.w_a, g);
        grad_x.select(1, t).copy_(d_buffer.narrow(1, 0, Cin));
        dh_conv = d_buffer.narrow(1, Cin, C);
      }
      continue;
    }
    // Ballas: back through h_n = U_n*(r·h_prev), then through r = σ(x_r + U_r*h_prev).
    Tensor d_reset_h, d_x_part;
    if (hoisted) {
      d_reset_h = wino ? winograd_conv(d_x_t.narrow(1, 2 * C, C), v_grad_n, std::nullopt, g)
                       : conv_input_grad(d_x_t.narrow(1, 2 * C, C), h_prev, w_n, g);
    } else {
      const Tensor d_buffer2 = conv_input_grad(d_x_t.narrow(1, 2 * C, C), workspace.select(0, 1).select(0, t),
                                               cw.w_b, g);
      d_x_part = d_buffer2.narrow(1, 0, Cin);
      d_reset_h = d_buffer2.narrow(1, Cin, C);
    }
    ra.d_reset_h = plane(d_reset_h);
    ra.r = slot(cache_t, 0, C);
    ra.h_prev = plane(h_prev);
    ra.dh_prev_in = plane(dh_direct);
    ra.d_r_out = slot(d_x_t, 0, C);
    ra.dh_prev_out = plane(dh_direct);
    FASTVID_LAUNCH(gru_reset_backward, ra, x.device());
    if (hoisted) {
      dh_conv = wino ? winograd_conv(d_x_t.narrow(1, 0, 2 * C), v_grad_rz, std::nullopt, g)
                     : conv_input_grad(d_x_t.narrow(1, 0, 2 * C), h_prev, w_rz, g);
    } else {
      const Tensor d_buffer1 = conv_input_grad(d_x_t.narrow(1, 0, 2 * C), workspace.select(0, 0).select(0, t),
                                               cw.w_a, g);
      Tensor grad_x_t = grad_x.select(1, t);
      at::add_out(grad_x_t, d_x_part, d_buffer1.narrow(1, 0, Cin));
      dh_conv = d_buffer1.narrow(1, Cin, C);
    }
  }
  Tensor grad_h0 = dh_conv.defined() ? at::add(dh_conv, dh_direct).contiguous(fmt) : dh_direct;

  Tensor grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh;
  if (hoisted) {
    const Tensor h_prev_all = h_prev_masked.defined() ? h_prev_masked : previous_hidden(output_l, h0_l, reverse);
    const auto grads = at::convolution_backward(flat(d_x), flat(x), weight_ih, at::IntArrayRef({3 * C}), {1, 1},
                                                g.padding, g.dilation, false, {0, 0}, 1,
                                                {true, true, bias_ih.has_value()});
    grad_x = std::get<0>(grads).view({B, T, Cin, H, W});
    grad_w_ih = std::get<1>(grads).contiguous();
    grad_b_ih = std::get<2>(grads);
    if (reset_after) {
      std::tie(grad_w_hh, grad_b_hh) = conv_weight_grad(flat(d_h), flat(h_prev_all), weight_hh,
                                                        bias_hh.has_value(), g);
      grad_w_hh = grad_w_hh.contiguous();
    } else {
      // In the Ballas form d(h-conv pre-activations) equal d(x-conv pre-activations).
      const Tensor reset_h_all = cache_l.narrow(2, 0, C) * h_prev_all;
      auto [gw_rz, gb_rz] = conv_weight_grad(flat(d_x.narrow(2, 0, 2 * C)), flat(h_prev_all), w_rz,
                                             bias_hh.has_value(), g);
      auto [gw_n, gb_n] = conv_weight_grad(flat(d_x.narrow(2, 2 * C, C)), flat(reset_h_all), w_n,
                                           bias_hh.has_value(), g);
      grad_w_hh = at::cat({gw_rz, gw_n}, 0);
      if (bias_hh.has_value()) grad_b_hh = at::cat({gb_rz, gb_n}, 0);
    }
  } else if (reset_after) {
    auto [gw, gb] = conv_weight_grad(flat(d_x), flat(workspace.select(0, 0)), cw.w_a, has_bias, g);
    grad_w_ih = gw.narrow(0, 0, 3 * C).narrow(1, 0, Cin).contiguous();
    grad_w_hh = at::cat({gw.narrow(0, 0, 2 * C).narrow(1, Cin, C), gw.narrow(0, 3 * C, C).narrow(1, Cin, C)}, 0);
    if (has_bias) {
      grad_b_ih = gb.narrow(0, 0, 3 * C).contiguous();
      grad_b_hh = at::cat({gb.narrow(0, 0, 2 * C), gb.narrow(0, 3 * C, C)}, 0);
    }
  } else {
    auto [gw1, gb1] = conv_weight_grad(flat(d_x.narrow(2, 0, 2 * C)), flat(workspace.select(0, 0)), cw.w_a,
                                       has_bias, g);
    auto [gw2, gb2] = conv_weight_grad(flat(d_x.narrow(2, 2 * C, C)), flat(workspace.select(0, 1)), cw.w_b,
                                       has_bias, g);
    grad_w_ih = at::cat({gw1.narrow(1, 0, Cin), gw2.narrow(1, 0, Cin)}, 0);
    grad_w_hh = at::cat({gw1.narrow(1, Cin, C), gw2.narrow(1, Cin, C)}, 0);
    if (has_bias) grad_b_ih = grad_b_hh = at::cat({gb1, gb2}, 0);
  }
  if (!bias_ih.has_value()) grad_b_ih = at::empty({0}, opts);
  if (!bias_hh.has_value()) grad_b_hh = at::empty({0}, opts);
  if (grad_b_hh.defined() && grad_b_ih.defined() && grad_b_hh.is_same(grad_b_ih)) grad_b_hh = grad_b_ih.clone();
  return {to_frames_layout(grad_x, g.channels_last), grad_w_ih.contiguous(), grad_w_hh.contiguous(), grad_b_ih,
          grad_b_hh, grad_h0};
}

// ======================================================================== cell ops
// Single-step gate ops for user-written loops and the cell modules.
struct CellGeometry {
  int64_t B, C, H, W;
  at::MemoryFormat fmt;
  const char* ref_name;  // the argument the others are checked against
};

CellGeometry check_gates(const char* op, const char* name, const Tensor& gates, int64_t num_gates) {
  TORCH_CHECK_VALUE(gates.dim() == 4, op, ": ", name, " must be [B, ", num_gates, "*C, H, W], got shape ",
                    gates.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(gates.scalar_type()), op, ": ", name, " must be floating point, got ",
                   gates.scalar_type());
  TORCH_CHECK_VALUE(gates.size(1) % num_gates == 0, op, ": ", name, " has ", gates.size(1),
                    " channels, not a multiple of ", num_gates);
  // channels_last only when dense in it (mirrored by _is_cl4 in fastvid/ops/recurrent.py).
  const bool channels_last = gates.is_contiguous(at::MemoryFormat::ChannelsLast) && !gates.is_contiguous();
  CellGeometry g{gates.size(0), gates.size(1) / num_gates, gates.size(2), gates.size(3), frame_format(channels_last),
                 name};
  return g;
}

void check_like(const char* op, const char* name, const Tensor& t, const CellGeometry& g, int64_t channels,
                const Tensor& ref, bool same_dtype) {
  TORCH_CHECK_VALUE(t.dim() == 4 && t.size(0) == g.B && t.size(1) == channels && t.size(2) == g.H &&
                        t.size(3) == g.W,
                    op, ": ", name, " must be [", g.B, ", ", channels, ", ", g.H, ", ", g.W, "], got ", t.sizes());
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", g.ref_name, " is on ",
              ref.device(), "; all tensors must be on one device");
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be floating point, got ",
                   t.scalar_type());
  if (same_dtype)
    TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(),
                     " but ", g.ref_name, " has dtype ", ref.scalar_type());
}

std::tuple<Tensor, Tensor, Tensor> lstm_cell(const Tensor& gates_pre, const Tensor& c_prev,
                                             const OptTensor& peephole) {
  const char* op = "fastvid.lstm_cell";
  const CellGeometry g = check_gates(op, "gates_pre", gates_pre, 4);
  check_like(op, "c_prev", c_prev, g, g.C, gates_pre, false);
  check_optional_arg(op, "peephole", peephole, {3, g.C}, gates_pre, "gates_pre", std::nullopt);
  const c10::DeviceGuard guard(gates_pre.device());
  const auto acc = acc_type(gates_pre.scalar_type());
  const Tensor pre = gates_pre.contiguous(g.fmt);
  const Tensor c_in = c_prev.to(acc).contiguous(g.fmt);
  const Tensor peep = peephole.has_value() ? peephole->to(acc).contiguous() : Tensor();
  Tensor h = at::empty({g.B, g.C, g.H, g.W}, pre.options().memory_format(g.fmt));
  Tensor c = at::empty({g.B, g.C, g.H, g.W}, pre.options().dtype(acc).memory_format(g.fmt));
  Tensor gates = at::empty_like(pre, g.fmt);
  const Tensor zeros = zeros_for_planes(g.C, g.H, g.W, pre.options());
  LstmForwardArgs a;
  a.geo = {g.B, g.C, g.H * g.W, pre.scalar_type()};
  for (int k = 0; k < 4; ++k) {
    a.a_x[k] = slot(pre, k, g.C);
    a.a_h[k] = zero_plane(zeros);
    a.gates_out[k] = slot(gates, k, g.C);
  }
  a.c_prev = plane(c_in);
  a.h_out = a.h_out2 = plane(h);
  a.c_out = plane(c);
  a.peephole = peep.defined() ? peep.data_ptr() : nullptr;
  a.save = true;
  FASTVID_LAUNCH(lstm_forward, a, pre.device());
  return {h, c, gates};
}

std::tuple<Tensor, Tensor> lstm_cell_backward(const OptTensor& grad_h, const OptTensor& grad_c, const Tensor& gates,
                                              const Tensor& c_prev, const Tensor& c, const OptTensor& peephole) {
  const char* op = "fastvid.lstm_cell_backward";
  const CellGeometry g = check_gates(op, "gates", gates, 4);
  check_like(op, "c_prev", c_prev, g, g.C, gates, false);
  check_like(op, "c", c, g, g.C, gates, false);
  check_optional_arg(op, "grad_h", grad_h, {g.B, g.C, g.H, g.W}, gates, "gates", std::nullopt);
  check_optional_arg(op, "grad_c", grad_c, {g.B, g.C, g.H, g.W}, gates, "gates", std::nullopt);
  check_optional_arg(op, "peephole", peephole, {3, g.C}, gates, "gates", std::nullopt);
  const c10::DeviceGuard guard(gates.device());
  const auto acc = acc_type(gates.scalar_type());
  const Tensor gates_l = gates.contiguous(g.fmt);
  const Tensor c_prev_l = c_prev.to(acc).contiguous(g.fmt), c_l = c.to(acc).contiguous(g.fmt);
  const Tensor zeros = zeros_for_planes(g.C, g.H, g.W, gates.options());
  const Tensor dh = grad_h.has_value() ? grad_h->to(gates.scalar_type()).contiguous(g.fmt) : Tensor();
  Tensor dc = grad_c.has_value() ? grad_c->to(acc).contiguous(g.fmt).clone() : at::zeros_like(c_l, g.fmt);
  const Tensor peep = peephole.has_value() ? peephole->to(acc).contiguous() : Tensor();
  Tensor d_gates = at::empty_like(gates_l, g.fmt);
  LstmBackwardArgs a;
  a.geo = {g.B, g.C, g.H * g.W, gates.scalar_type()};
  a.dh_in[0] = dh.defined() ? plane(dh) : zero_plane(zeros);
  a.dh_in[1] = a.dh_in[2] = zero_plane(zeros);
  a.dc_in = a.dc_prev_out = plane(dc);
  for (int k = 0; k < 4; ++k) {
    a.gates[k] = slot(gates_l, k, g.C);
    a.d_gates_out[k] = slot(d_gates, k, g.C);
  }
  a.c_prev = plane(c_prev_l);
  a.c = plane(c_l);
  a.peephole = peep.defined() ? peep.data_ptr() : nullptr;
  FASTVID_LAUNCH(lstm_backward, a, gates.device());
  return {d_gates, dc.to(c_prev.scalar_type())};
}

std::tuple<Tensor, Tensor> gru_cell(const Tensor& x_gates, const Tensor& h_gates, const Tensor& h_prev,
                                    bool reset_after) {
  const char* op = "fastvid.gru_cell";
  const CellGeometry g = check_gates(op, "x_gates", x_gates, 3);
  check_like(op, "h_gates", h_gates, g, 3 * g.C, x_gates, true);
  check_like(op, "h_prev", h_prev, g, g.C, x_gates, true);
  const c10::DeviceGuard guard(x_gates.device());
  const Tensor xg = x_gates.contiguous(g.fmt), hg = h_gates.contiguous(g.fmt), hp = h_prev.contiguous(g.fmt);
  Tensor h = at::empty_like(hp, g.fmt);
  Tensor cache = at::empty({g.B, 4 * g.C, g.H, g.W}, xg.options().memory_format(g.fmt));
  GruForwardArgs a;
  a.geo = {g.B, g.C, g.H * g.W, xg.scalar_type()};
  for (int k = 0; k < 3; ++k) {
    a.x[k] = slot(xg, k, g.C);
    a.h[k] = slot(hg, k, g.C);
  }
  for (int k = 0; k < 4; ++k) a.cache_out[k] = slot(cache, k, g.C);
  a.h_prev = plane(hp);
  a.h_out = a.h_out2 = plane(h);
  a.reset_after = reset_after;
  a.save = true;
  FASTVID_LAUNCH(gru_forward, a, xg.device());
  return {h, cache};
}

std::tuple<Tensor, Tensor, Tensor> gru_cell_backward(const Tensor& grad_h, const Tensor& cache, const Tensor& h_prev,
                                                     bool reset_after) {
  const char* op = "fastvid.gru_cell_backward";
  const CellGeometry g = check_gates(op, "cache", cache, 4);
  check_like(op, "h_prev", h_prev, g, g.C, cache, true);
  check_like(op, "grad_h", grad_h, g, g.C, cache, true);
  const c10::DeviceGuard guard(cache.device());
  const Tensor cache_l = cache.contiguous(g.fmt), hp = h_prev.contiguous(g.fmt), dh = grad_h.contiguous(g.fmt);
  const Tensor zeros = zeros_for_planes(g.C, g.H, g.W, cache.options());
  Tensor d_x = at::empty({g.B, 3 * g.C, g.H, g.W}, cache_l.options().memory_format(g.fmt));
  Tensor d_h = at::empty_like(d_x, g.fmt);
  Tensor dh_prev = at::empty_like(hp, g.fmt);
  GruBackwardArgs a;
  a.geo = {g.B, g.C, g.H * g.W, cache.scalar_type()};
  a.dh_in[0] = plane(dh);
  a.dh_in[1] = a.dh_in[2] = zero_plane(zeros);
  for (int k = 0; k < 4; ++k) a.cache[k] = slot(cache_l, k, g.C);
  for (int k = 0; k < 3; ++k) {
    a.d_x_out[k] = slot(d_x, k, g.C);
    a.d_h_out[k] = slot(d_h, k, g.C);
  }
  a.h_prev = plane(hp);
  a.dh_prev_out = plane(dh_prev);
  a.reset_after = reset_after;
  FASTVID_LAUNCH(gru_backward, a, cache.device());
  return {d_x, d_h, dh_prev};
}

Tensor gru_reset_hidden(const Tensor& x_r, const Tensor& h_r, const Tensor& h_prev) {
  const char* op = "fastvid.gru_reset_hidden";
  const CellGeometry g = check_gates(op, "x_r", x_r, 1);
  check_like(op, "h_r", h_r, g, g.C, x_r, true);
  check_like(op, "h_prev", h_prev, g, g.C, x_r, true);
  const c10::DeviceGuard guard(x_r.device());
  const Tensor xr = x_r.contiguous(g.fmt), hr = h_r.contiguous(g.fmt), hp = h_prev.contiguous(g.fmt);
  Tensor out = at::empty_like(hp, g.fmt);
  GruResetForwardArgs a;
  a.geo = {g.B, g.C, g.H * g.W, xr.scalar_type()};
  a.x_r = plane(xr);
  a.h_r = plane(hr);
  a.h_prev = plane(hp);
  a.reset_h_out = plane(out);
  a.save = false;
  FASTVID_LAUNCH(gru_reset_forward, a, xr.device());
  return out;
}

std::tuple<Tensor, Tensor> gru_reset_hidden_backward(const Tensor& grad, const Tensor& x_r, const Tensor& h_r,
                                                     const Tensor& h_prev) {
  const char* op = "fastvid.gru_reset_hidden_backward";
  const CellGeometry g = check_gates(op, "x_r", x_r, 1);
  check_like(op, "grad", grad, g, g.C, x_r, true);
  check_like(op, "h_r", h_r, g, g.C, x_r, true);
  check_like(op, "h_prev", h_prev, g, g.C, x_r, true);
  const c10::DeviceGuard guard(x_r.device());
  const Tensor xr = x_r.contiguous(g.fmt), hr = h_r.contiguous(g.fmt), hp = h_prev.contiguous(g.fmt);
  const Tensor gr = grad.contiguous(g.fmt);
  // r is recomputed (one sigmoid) rather than saved: the cell op keeps no cache.
  Tensor r = at::sigmoid(xr.to(acc_type(xr.scalar_type())) + hr.to(acc_type(xr.scalar_type()))).to(xr.scalar_type());
  Tensor d_r = at::empty_like(hp, g.fmt);
  Tensor dh_prev = at::zeros_like(hp, g.fmt);
  GruResetBackwardArgs a;
  a.geo = {g.B, g.C, g.H * g.W, xr.scalar_type()};
  a.d_reset_h = plane(gr);
  a.r = plane(r);
  a.h_prev = plane(hp);
  a.dh_prev_in = a.dh_prev_out = plane(dh_prev);
  a.d_r_out = plane(d_r);
  FASTVID_LAUNCH(gru_reset_backward, a, xr.device());
  return {d_r, dh_prev};
}

}  // namespace

#define FASTVID_REGISTER_RECURRENT(m)                                         \
  m.impl("lstm_cell", &lstm_cell);                                            \
  m.impl("lstm_cell_backward", &lstm_cell_backward);                          \
  m.impl("gru_cell", &gru_cell);                                              \
  m.impl("gru_cell_backward", &gru_cell_backward);                            \
  m.impl("gru_reset_hidden", &gru_reset_hidden);                              \
  m.impl("gru_reset_hidden_backward", &gru_reset_hidden_backward);            \
  m.impl("convlstm_sequence", &convlstm_sequence);                            \
  m.impl("convlstm_sequence_backward", &convlstm_sequence_backward);          \
  m.impl("convgru_sequence", &convgru_sequence);                              \
  m.impl("convgru_sequence_backward", &convgru_sequence_backward)

TORCH_LIBRARY_IMPL(fastvid, CPU, m) { FASTVID_REGISTER_RECURRENT(m); }

#ifdef FASTVID_WITH_CUDA
TORCH_LIBRARY_IMPL(fastvid, CUDA, m) { FASTVID_REGISTER_RECURRENT(m); }
#endif

}  // namespace recurrent
}  // namespace fastvid
