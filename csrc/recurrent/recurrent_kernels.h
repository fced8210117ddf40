// The fused gate kernels' interface, shared by the CPU and CUDA implementations and by the
// device-generic time loops of recurrent_ops.cpp (helpers in recurrent_sequence.h).
//
// Every tensor a kernel touches is a Plane: a [B, C, H·W] view given by a data pointer and element
// strides for batch, channel and pixel (H and W must merge into one pixel dimension, which holds
// for NCHW and NHWC tensors and their channel slices). A gate "slot" is the plane of one gate's C
// channels inside a [B, G·C, H, W] tensor. A plane with all strides 0 that points at a zero buffer
// of at least max(C, H·W) elements stands for an absent operand (e.g. no hidden-conv input).
//
// Dtypes: gate, hidden and gradient planes have the kernel's scalar type (float, double, bfloat16,
// half); cell-state planes (LSTM c) and peephole weights have its accumulation type (float for
// the 16-bit types). Index math is 64-bit.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace fastvid {
namespace recurrent {

struct Plane {
  void* data = nullptr;
  int64_t stride_b = 0, stride_c = 0, stride_p = 0;
};

struct Geometry {
  int64_t batch = 0, channels = 0, pixels = 0;
  at::ScalarType dtype = at::kFloat;  // scalar type of the gate planes
};

// Variable-length sequences (the sequence ops' `lengths`): sample b takes part in time step t when
// t < lengths[b]. A masked sample's step is the identity on its state: the kernels write 0 to the
// layer output, copy the previous state to the state outputs and caches 0; their backward gives
// zero gate gradients and passes the state gradients (dh_in[1], dh_in[2], dc_in) straight through.
// dh_in[0] is always the layer output's gradient, which a masked step drops.
struct StepMask {
  const int64_t* lengths = nullptr;  // [B] int64 on the kernel's device, or nullptr: every sample valid
  int64_t t = 0;
  C10_HOST_DEVICE bool valid(int64_t b) const { return lengths == nullptr || t < lengths[b]; }
};

// h, c = LSTM(a_x + a_h, c_prev); gates_out (if save) receives the activated i, f, g, o.
struct LstmForwardArgs {
  Geometry geo;
  Plane a_x[4], a_h[4], c_prev;
  Plane h_out, h_out2, c_out;  // h is written twice: to the layer output and to the next conv input
  Plane c_save;                // optional: c once more, in the gates' dtype (the bf16 sequence reserve)
  Plane gates_out[4];
  const void* peephole = nullptr;  // [3, C] contiguous (w_ci, w_cf, w_co) in acc type, or nullptr
  bool save = false;
  StepMask mask;
  Plane h_prev;  // the hidden state entering the step (read only for masked samples; may alias h_out2)
  // CPU, Winograd step: a_x hold the summed pre-activations in the accumulation type (the strip's fp32
  // output transform, never rounded to the input dtype) and a_h are not read.
  bool pre_acc = false;
};

// dh = dh_in[0] + dh_in[1] + dh_in[2]; dc_in is the gradient reaching c (may alias dc_prev_out).
struct LstmBackwardArgs {
  Geometry geo;
  Plane dh_in[3], dc_in, gates[4], c_prev, c;
  Plane d_gates_out[4], dc_prev_out;
  bool cells_in_dtype = false;  // c_prev, c in geo.dtype (the bf16 sequence reserve), else the acc type
  const void* peephole = nullptr;
  StepMask mask;
  // With a mask: receives the state gradient dh_in[1] + dh_in[2] of masked samples and 0 for the
  // others (the hidden conv's input gradient, which the caller adds, is 0 for masked samples).
  Plane dh_prev_out;
};

// h = GRU(x gates, h gates, h_prev); cache_out (if save) receives r, z, n, h_n.
struct GruForwardArgs {
  Geometry geo;
  Plane x[3], h[3], h_prev;
  Plane h_out, h_out2;
  Plane cache_out[4];
  bool reset_after = true, save = false;
  StepMask mask;
  // CPU, fused Winograd step (reset_after): x[0..2] (r and z with h's part summed in) and h[2] hold the
  // pre-activations in the accumulation type (the strip's fp32 output transform); h[0], h[1] not read.
  bool pre_acc = false;
};

// dh = dh_in[0] + dh_in[1] + dh_in[2]. d_x_out: d(x_r, x_z, x_n); d_h_out: d(h_r, h_z, h_n);
// dh_prev_out receives the direct part dh·z (the conv part is added by the caller; masked samples:
// dh_in[1] + dh_in[2]). dh_prev_out may alias dh_in[2].
struct GruBackwardArgs {
  Geometry geo;
  Plane dh_in[3], cache[4], h_prev;
  Plane d_x_out[3], d_h_out[3], dh_prev_out;
  bool reset_after = true;
  StepMask mask;
};

// reset_h = σ(x_r + h_r)·h_prev; r_out (if save) receives r.
struct GruResetForwardArgs {
  Geometry geo;
  Plane x_r, h_r, h_prev, reset_h_out, r_out;
  bool save = false;
  StepMask mask;  // masked samples: reset_h_out = 0, r_out = 0
};

// d_r_out = d r_pre; dh_prev_out = dh_prev_in + d_reset_h·r (may alias).
struct GruResetBackwardArgs {
  Geometry geo;
  Plane d_reset_h, r, h_prev, dh_prev_in;
  Plane d_r_out, dh_prev_out;
  StepMask mask;  // masked samples: d_r_out = 0, dh_prev_out = dh_prev_in
};

void lstm_forward_cpu(const LstmForwardArgs& args);
void lstm_backward_cpu(const LstmBackwardArgs& args);
void gru_forward_cpu(const GruForwardArgs& args);
void gru_backward_cpu(const GruBackwardArgs& args);
void gru_reset_forward_cpu(const GruResetForwardArgs& args);
void gru_reset_backward_cpu(const GruResetBackwardArgs& args);

#ifdef FASTVID_WITH_CUDA
void lstm_forward_cuda(const LstmForwardArgs& args);
void lstm_backward_cuda(const LstmBackwardArgs& args);
void gru_forward_cuda(const GruForwardArgs& args);
void gru_backward_cuda(const GruBackwardArgs& args);
void gru_reset_forward_cuda(const GruResetForwardArgs& args);
void gru_reset_backward_cuda(const GruResetBackwardArgs& args);
#endif

}  // namespace recurrent
}  // namespace fastvid
