// Winograd F(m x m, 3 x 3) convolution for the CPU time loops of the "winograd" strategy
// (recurrent_winograd_cpu.cpp; strategy code kWinograd in recurrent_sequence.h).
//
// The recurrent setting pays for Winograd: the weights are the same at every step, so they are
// transformed once per sequence call, and each step costs an input transform, alpha² GEMMs (a
// register-blocked kernel per ISA path, recurrent_winograd_cpu.cpp) and an output transform. The output is produced
// strip by strip (m output rows x the whole width of one image) into a small scratch that stays in
// cache, and handed to a callback -- the gate kernel -- so the pre-activations of a step are never
// written to a full-size tensor.
//
// Only stride 1, dilation 1, a 3x3 kernel and padding 1 ('same'); CPU only.
#pragma once

#include "recurrent_kernels.h"
#include "recurrent_sequence.h"

#include <ATen/ATen.h>

#include <functional>
#include <string>

namespace fastvid {
namespace recurrent {

// Output tile m of F(m x m, 3 x 3) for inputs of dtype; both F(4 x 4) (alpha = 6, 36 GEMMs) and
// F(2 x 2) (alpha = 4, 16 GEMMs) are built. Measured in fp32 against an fp64 oracle (per output/gradient
// tensor, max error, seeded ConvLSTM/ConvGRU sequences of tests/test_recurrent_winograd.py): F(4 x 4)
// 3-11x the error of the oneDNN path (issue 12 allows 4x), F(2 x 2) 1.2-2.9x. So fp32 and fp64 take
// F(2 x 2), at 1.8x the GEMM work of F(4 x 4) (4 vs 2.25 multiplies per output, against 9 direct); the
// weight gradients (winograd_weight_grad_*) too: F(2 x 2) 0.3-0.9x the oneDNN path's error, F(4 x 4)
// 1.2-2.2x for a backward only ~5 % faster. bf16 and fp16 take F(4 x 4): the products accumulate in
// fp32, whose F(4 x 4) error (~1e-6 relative) is far below the 2^-9 rounding of the bf16 values the
// step reads and writes, and an fp32 F(4 x 4) GEMM does half the work of a direct bf16 conv at twice
// the fp32 rate (AVX512-BF16's dot product), where F(2 x 2) would do 8/9 of it.
inline int64_t winograd_tile(at::ScalarType dtype) { return at::isReducedFloatingType(dtype) ? 4 : 2; }

// Why the winograd strategy cannot run this sequence ("" when it can).
std::string winograd_unsupported_reason(const Tensor& x, const Tensor& weight_hh, const SeqGeometry& g);

// Raises a ValueError naming the reason when the winograd strategy cannot run.
void check_winograd(const char* op, const Tensor& x, const Tensor& weight_hh, const SeqGeometry& g,
                    const OptTensor& lengths);

// weight [N, K, 3, 3] -> [alpha², K, N] (G w Gᵀ per (n, k), computed in fp64) in the accumulation
// type of weight's dtype, for the tile m = winograd_tile(weight's dtype).
Tensor winograd_weights(const Tensor& weight);

// Transformed weights of the input gradient of conv(·, weight): the kernel flipped and its
// in/out channels swapped (a [K, N, 3, 3] convolution of the output gradient).
Tensor winograd_input_grad_weights(const Tensor& weight);

// Receives output rows [y0, y0 + rows) of image b, all W columns and N channels, as a plane
// [1, N, rows·W] in the sequence's frame layout (g.channels_last) and the inputs' dtype.
using WinogradStripFn = std::function<void(int64_t b, int64_t y0, int64_t rows, const Plane& pre)>;

// conv3x3(input, weight) + bias (stride 1, padding 1) with V = winograd_weights(weight) over input
// [B, K, H, W] (any strides), strip by strip into fn. Strips run in parallel: fn may only touch the
// pixels of its strip.
void winograd_conv(const Tensor& input, const Tensor& V, const OptTensor& bias, const SeqGeometry& g,
                   const WinogradStripFn& fn);

// The same convolution written to a new [B, N, H, W] tensor in the frame layout of g; with tanh,
// tanh of it (applied in fp32 before the rounding to the inputs' dtype).
Tensor winograd_conv(const Tensor& input, const Tensor& V, const OptTensor& bias, const SeqGeometry& g,
                     bool tanh = false);
// The same into out [B, N, H, W] (the inputs' dtype; any strides with H, W mergeable, e.g. one frame of a
// sequence tensor).
void winograd_conv_out(const Tensor& input, const Tensor& V, const OptTensor& bias, const SeqGeometry& g,
                       const Tensor& out, bool tanh = false);
// The same (no bias) with the output channels split: [0, out_a.size(1)) into out_a, the rest into out_b
// (e.g. one frame of grad_x and the hidden state's gradient, from one conv over [x_t, h_{t-1}]'s kernel).
void winograd_conv_split_out(const Tensor& input, const Tensor& V, const SeqGeometry& g, const Tensor& out_a,
                             const Tensor& out_b);
// conv(x, ·) + conv(h, ·) (+ bias) as one convolution of [x, h] with V_x, V_h the rows of its V for x's and
// h's channels (a narrow of one winograd_weights), into a new [B, N, H, W] tensor; with tanh, tanh of it.
Tensor winograd_conv2(const Tensor& x, const Tensor& V_x, const Tensor& h, const Tensor& V_h, const OptTensor& bias,
                      const SeqGeometry& g, bool tanh = false);

// The ConvGRU (reset_after) backward's two input-gradient convolutions of one step as one: from the
// gate-gradient frame d [B, 4C, H, W] with channels [x_n, r, z, h_n], grad_x = conv(d[:, 0:3C],
// W_ih's input-gradient kernel) into grad_x [B, Cin, H, W] and dh = conv(d[:, C:4C], W_hh's) into dh
// [B, C, H, W]: d r and d z (the same for both) are transformed once, 4C input channels instead of
// 6C. V = winograd_gru_input_grad_weights(weight_ih, weight_hh): the two outputs are separate column
// segments of one GEMM, dh's starting at the column block after grad_x's.
Tensor winograd_gru_input_grad_weights(const Tensor& weight_ih, const Tensor& weight_hh);
void winograd_gru_input_grads(const Tensor& d, const Tensor& V, const SeqGeometry& g, const Tensor& grad_x,
                              const Tensor& dh);

// Weight gradient of conv3x3(input, weight) (stride 1, padding 1) in the Winograd domain, summed over
// calls (chunks of steps) and transformed back once. dV = dL/d(G w Gᵀ): a zeroed [chunks, alpha², K, N]
// accumulation-type buffer (padded rows, as winograd_weights' V; one partial sum per worker, chunks =
// min(threads, groups of strips of `frames` frames H x W: the largest call's)); winograd_weight_grad_add
// sums Uᵀ (A dY Aᵀ) over the tiles of input [B, K, H, W] and grad_output [B, N, H, W] (any strides) into
// it; winograd_weight_grad_total adds the partials in a fixed order (bits depend on the thread count at
// allocation only) and returns the [alpha², K, N] sum; winograd_weight_grad_finish gives dL/dw = Gᵀ dV G
// of (a [alpha², K', N'] view of) it as [N', K', 3, 3] in dtype.
Tensor winograd_weight_grad_buffer(int64_t K, int64_t N, at::ScalarType dtype, int64_t frames, int64_t H,
                                   int64_t W);
// Per input (input, input2), the output-gradient channels [begin, end) its dV rows need (end -1: all N);
// dV's other columns of those rows are left unspecified. A GRU's x and h convolutions read different gate
// channels of one gradient frame ([x_n, r, z] and [r, z, h_n]): one call, the shared r, z transformed once.
struct WeightGradColumns {
  int64_t begin[2] = {0, 0};
  int64_t end[2] = {-1, -1};
};
// With db (a contiguous [N] float64 tensor), Σ grad_output over B, H, W is added to it (the bias gradient,
// from the gradient values the kernel reads anyway; fp64 sums: naive fp32 ones over B·T·H·W values
// missed the oneDNN path's accuracy).
// With input2 [B, K2, H, W], dV is [chunks, alpha², K + K2, N]: the gradient of conv(cat([input, input2], 1), w)
// without the concatenation (input2's channels are dV's rows K ..).
void winograd_weight_grad_add(Tensor& dV, const Tensor& input, const Tensor& grad_output, Tensor* db = nullptr,
                              const Tensor* input2 = nullptr, const WeightGradColumns& columns = {});
Tensor winograd_weight_grad_total(const Tensor& dV);
Tensor winograd_weight_grad_finish(const Tensor& total, at::ScalarType dtype);

// One LSTM step of the winograd strategy: per strip, the gate pre-activations conv(x_t, W_ih) + bias +
// conv(h_prev, W_hh), summed in the Winograd domain (one output transform), then the gate kernel on
// that strip. a holds full-frame planes; its a_x are replaced per strip, its a_h must be zero planes.
void winograd_lstm_step(const LstmForwardArgs& a, const Tensor& x_t, const Tensor& V_ih, const OptTensor& bias,
                        const Tensor& h_prev, const Tensor& V_hh, const SeqGeometry& g);

// One GRU step: per strip, conv(input) (+ bias) gives the hidden-conv gates a.h[first_slot...] (N / C
// of them), then the gate kernel on that strip. reset_after: input = h_prev, slots r, z, n; Ballas:
// input = r·h_prev, slot n (a.h[0], a.h[1] full-frame planes set by the caller).
void winograd_gru_step(const GruForwardArgs& a, const Tensor& input, const Tensor& V, const OptTensor& bias,
                       int first_slot, const SeqGeometry& g);

// Transformed weights of `gates` stacked gates ([gates·C, K, 3, 3]) for winograd_gru_fused_step:
// [alpha², K, gates·Cp] with gate k's C columns at k·Cp, Cp = C rounded up to the GEMM column block
// (so every gate starts a column block and the x and h products can be summed or kept apart per gate).
Tensor winograd_gate_weights(const Tensor& weight, int64_t gates);

// The fused GRU step's bias [4·Cp] in the accumulation type of dtype: b_ih + b_hh for r and z, b_ih
// for x_n, b_hh for h_n (slot k at k·Cp); undefined when both are absent.
Tensor winograd_gru_bias(const OptTensor& bias_ih, const OptTensor& bias_hh, int64_t C, at::ScalarType dtype);

// One GRU step of the nn.GRU form (reset_after) with no hoisted x conv: per strip, x_t and h_prev are
// transformed and multiplied in the Winograd domain, x_r + h_r and x_z + h_z summed in the GEMM
// accumulators, x_n and h_n kept apart (n = tanh(x_n + r·h_n)), one output transform of 4 gate slots,
// then the gate kernel on that strip. V_x, V_h from winograd_gate_weights(·, 3), bias from
// winograd_gru_bias; a.h[0], a.h[1] must be zero planes.
void winograd_gru_fused_step(const GruForwardArgs& a, const Tensor& x_t, const Tensor& V_x, const Tensor& h_prev,
                             const Tensor& V_h, const Tensor& bias, const SeqGeometry& g);

// p moved to image b, pixel `pixel` (element size `elem`), e.g. a strip of a full-frame plane.
inline Plane offset_plane(const Plane& p, int64_t b, int64_t pixel, int64_t elem) {
  Plane q = p;
  if (p.stride_b == 0 && p.stride_c == 0 && p.stride_p == 0) return q;  // a zero plane stays one
  q.data = static_cast<char*>(p.data) + (b * p.stride_b + pixel * p.stride_p) * elem;
  return q;
}

}  // namespace recurrent
}  // namespace fastvid
