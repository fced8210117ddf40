// Layer-normalised ConvLSTM step kernels (norm="layer"), the interface between the time loops of
// recurrent_norm_ops.cpp and the CPU kernels of recurrent_norm_cpu.cpp. The equations are in
// fastvid/reference/recurrent_norm.py:
//
//   a   = LN(x_pre; gain_ih) + LN(h_pre; gain_hh) + bias     per sample over all 4C x H x W
//   i, f, g, o = σ(a_i), σ(a_f), tanh(a_g), σ(a_o)
//   c   = f c_prev + i g
//   h   = o tanh(LN(c; gain_c, bias_c))                        per sample over C x H x W
//
// LN(v; γ, β) = γ (v - μ) / sqrt(σ² + eps) + β with the per-sample mean μ and biased variance σ²,
// per-channel γ, β. Every tensor is a Frame: [B, n·C, H, W] whose per-sample block is contiguous in
// NCHW or NHWC order (the sequence ops' frame layouts), given by its data pointer and sample stride.
// Dtypes: x_pre, h_pre, gates, h and their gradients have the scalar type; c, the statistics, the
// gains and biases and d_norm_c have the accumulation type (float for bf16/fp16).
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace fastvid {
namespace recurrent {

constexpr double kLayerNormEps = 1e-5;

struct Frame {
  void* data = nullptr;  // nullptr: absent (an optional gradient)
  int64_t stride_b = 0;  // elements between samples
};

struct NormGeometry {
  int64_t batch = 0, channels = 0, pixels = 0;  // B, C (hidden channels), H·W
  bool channels_last = false;
  at::ScalarType dtype = at::kFloat;
};

// stats: [B, 6] per sample: mean and 1/sqrt(var + eps) of x_pre, h_pre and c, in that order.
struct LnLstmForwardArgs {
  NormGeometry geo;
  Frame x_pre, h_pre;                         // [B, 4C] raw input / hidden conv outputs (no bias)
  const void* gain_ih = nullptr;              // [4C]
  const void* gain_hh = nullptr;              // [4C]
  const void* bias = nullptr;                 // [4C] or nullptr
  const void* gain_c = nullptr;               // [C]
  const void* bias_c = nullptr;               // [C]
  Frame c_prev, c_out;                        // [B, C] (may alias)
  Frame h_out, h_out2;                        // [B, C]; h_out2 optional (the next step's conv input)
  Frame gates_out;                            // [B, 4C] activated i, f, g, o
  Frame stats;                                // [B, 6]
};

struct LnLstmBackwardArgs {
  NormGeometry geo;
  Frame dh_out, dh_rec;                       // [B, C] gradient of h from the output / the next step, optional
  Frame dc;                                   // [B, C] in: dL/dc_t, out: dL/dc_{t-1}
  Frame gates, x_pre, h_pre;                  // forward caches of the step
  Frame c, c_prev, stats;
  const void* gain_ih = nullptr;
  const void* gain_hh = nullptr;
  const void* gain_c = nullptr;
  const void* bias_c = nullptr;
  Frame d_gates;                              // [B, 4C] scratch: dL/da
  Frame d_x_pre, d_h_pre;                     // [B, 4C] out: dL/dx_pre, dL/dh_pre
  Frame d_norm_c;                             // [B, C] scratch: dL/d(LN(c))
  // [14C] fp64, accumulated (+=) step after step: the gradients of gain_ih, gain_hh, bias (= Σ dL/da),
  // gain_c, bias_c, in that order
  double* param_grads = nullptr;
};

void ln_lstm_forward_cpu(const LnLstmForwardArgs& a);
void ln_lstm_backward_cpu(const LnLstmBackwardArgs& a);

// Layer-normalised ConvGRU step (reset_after form): x_g = LN(x_pre; gain_ih) + b_ih, h_g = LN(h_pre;
// gain_hh) + b_hh, r = σ(x_r + h_r), z = σ(x_z + h_z), n = tanh(x_n + r h_n), h = (1 - z) n + z h_prev.
// stats: [B, 4] per sample: mean and 1/sqrt(var + eps) of x_pre and h_pre. Backward recomputes the gates
// from the raw conv outputs and the statistics (no gate cache).
struct LnGruForwardArgs {
  NormGeometry geo;
  Frame x_pre, h_pre;                         // [B, 3C] raw conv outputs (no bias)
  const void* gain_ih = nullptr;              // [3C]
  const void* gain_hh = nullptr;              // [3C]
  const void* bias_ih = nullptr;              // [3C] or nullptr
  const void* bias_hh = nullptr;              // [3C] or nullptr
  Frame h_prev;                               // [B, C]
  Frame h_out, h_out2;                        // [B, C]; h_out2 optional
  Frame stats;                                // [B, 4]
};

struct LnGruBackwardArgs {
  NormGeometry geo;
  Frame dh_out, dh_rec;                       // [B, C] optional
  Frame x_pre, h_pre, h_prev, stats;
  const void* gain_ih = nullptr;
  const void* gain_hh = nullptr;
  const void* bias_ih = nullptr;
  const void* bias_hh = nullptr;
  Frame d_xg, d_hg;                           // [B, 3C] out: dL/dx_g, dL/dh_g (after the norms)
  Frame d_x_pre, d_h_pre;                     // [B, 3C] out
  Frame dh_prev;                              // [B, C] out: the direct part z·dh of dL/dh_prev
};

void ln_gru_forward_cpu(const LnGruForwardArgs& a);
void ln_gru_backward_cpu(const LnGruBackwardArgs& a);

}  // namespace recurrent
}  // namespace fastvid
