// Winograd F(m x m, 3 x 3) convolution on the CPU (interface and design: recurrent_winograd.h).
//
// Work unit: a strip = m output rows of one image across its whole width (ceil(W/m) tiles). Strips
// are grouped (~kGroupTiles tiles) so the alpha² GEMMs of a group -- [tiles, K] x [K, N] each -- have
// enough rows and their operands stay in L2; groups run in parallel (at::parallel_for). Per group:
//   1. gather the padded input rows of the group's strips into a channels-innermost scratch (any
//      input strides, NCHW rows transposed in registers; zero padding; rows shared by neighbouring
//      strips once), input transform Bᵀ d B of every tile into U [alpha², tiles, K];
//   2. per block of kBlockColumns output channels: M = U V with V = G w Gᵀ [alpha², K, N]
//      (transformed once per sequence call); with a second input (x_t and h_{t-1}) both products are
//      summed in the GEMM's registers, per column segment (Job::Segment: GRU sums r and z but keeps
//      x_n and h_n apart); then the output transform Aᵀ M A (+ bias) of those channels of every tile
//      into the group's pixel-major output scratch (M is one column block, not alpha² full slices);
//   3. per strip: the output laid out as the frames (channels innermost or NCHW) in the inputs'
//      dtype, handed to the strip callback (the gate kernel) or copied into an output tensor.
// The GEMM is a register-blocked kernel per ISA path (at::bmm -> MKL ran at ~100 GFLOP/s here, the
// AVX2 rate, half of AVX-512's); the transforms (one helper, Sandwich::apply) are vectorised over
// channels (the inner index of U, M and the scratches) in each path's vectors (cpu_isa.h); the
// transform matrices are compile-time constants and their zero coefficients drop out.
#include "recurrent_winograd.h"
#include "recurrent_math.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <type_traits>
#ifdef __x86_64__
#include <immintrin.h>
#endif
#include <vector>

#include "../cpu_isa.h"
#include "../cpu_block_cache.h"

#ifndef FASTVID_WINOGRAD_SHARED
#define FASTVID_WINOGRAD_SHARED
namespace fastvid {
namespace recurrent {
namespace winograd {

// Transform matrices: output = Aᵀ[(G w Gᵀ) ⊙ (Bᵀ d B)]A. F(4, 3) uses the interpolation points 0, ±1,
// 1/2, -2, ∞ (not Lavin & Gray's 0, ±1, ±2, ∞) with the rows of Bᵀ scaled to max |entry| = 1 and G
// scaled inversely: in an fp32 emulation against fp64 the convolution error is 4-7x oneDNN's direct
// one, against 12-20x with Lavin's points (C = 32-64, 32x32; tests/test_recurrent_winograd.py
// measures what the sequences see).
template <int M>
struct Matrices;

template <>
struct Matrices<4> {
  static constexpr int A = 6;
  static constexpr double BT[6][6] = {{0.5, -0.75, -1, 0.75, 0.5, 0}, {0, -0.4, 0.2, 1, 0.4, 0},
                                      {0, 0.4, -1, 0.2, 0.4, 0},     {0, -1, -0.5, 1, 0.5, 0},
                                      {0, 0.5, -1, -0.5, 1, 0},      {0, 0.5, -0.75, -1, 0.75, 0.5}};
  static constexpr double G[6][3] = {{2, 0, 0},
                                     {5.0 / 6, 5.0 / 6, 5.0 / 6},
                                     {-5.0 / 6, 5.0 / 6, -5.0 / 6},
                                     {-32.0 / 15, -16.0 / 15, -8.0 / 15},
                                     {1.0 / 15, -2.0 / 15, 4.0 / 15},
                                     {0, 0, 2}};
  static constexpr double AT[4][6] = {{1, 1, 1, 1, 1, 0}, {0, 1, -1, 0.5, -2, 0}, {0, 1, 1, 0.25, 4, 0}, {0, 1, -1, 0.125, -8, 1}};
};

// F(2, 3): points 0, ±1, ∞.
template <>
struct Matrices<2> {
  static constexpr int A = 4;
  static constexpr double BT[4][4] = {{1, 0, -1, 0}, {0, 1, 1, 0}, {0, -1, 1, 0}, {0, 1, 0, -1}};
  static constexpr double G[4][3] = {{1, 0, 0}, {0.5, 0.5, 0.5}, {0.5, -0.5, 0.5}, {0, 0, 1}};
  static constexpr double AT[2][4] = {{1, 1, 1, 0}, {0, 1, -1, -1}};
};

// GEMM column block: 2 vectors of the widest path (AVX-512: 2 x 16 floats); V's rows are padded to it.
constexpr int64_t kColumnBlock = 32;
// Tiles per group of strips (the work unit of a parallel region, see the top of the file).
constexpr int64_t kGroupTiles = 64;

// Strips of m rows per group for frames W wide, and the groups of `frames` frames H x W (the work units
// of one convolution or weight-gradient call).
inline int64_t strips_per_group(int64_t W, int64_t m) { return std::max<int64_t>(1, kGroupTiles / ((W + m - 1) / m)); }
inline int64_t strip_groups(int64_t frames, int64_t H, int64_t W, int64_t m) {
  const int64_t per_group = strips_per_group(W, m);
  return (frames * ((H + m - 1) / m) + per_group - 1) / per_group;
}

// Everything one convolution call needs, in plain pointers (the per-ISA kernels see no Tensor).
struct Job {
  struct Input {
    const void* data = nullptr;  // [B, K, H, W] with element strides:
    int64_t sb = 0, sc = 0, sy = 0, sx = 0, K = 0;
    const void* V = nullptr;     // [alpha², K, ldv] (N used columns, zeros up to ldv), accumulation type,
    int64_t sv = 0;              // with slices sv elements apart (K·ldv, or more for a row range of a V)
  };
  static constexpr int kMaxInputs = 3;
  Input in[kMaxInputs];          // the output sums the convolutions of the inputs used (1 to 3)
  int inputs = 1;
  int64_t ldv = 0;               // row length of every input's V
  // The Winograd-domain products M [alpha², tiles, ldm] by column segment: M[:, m0 : m0 + n] = Σ_i
  // U_i V_i[:, v[i] : v[i] + n] over the inputs with v[i] >= 0 (all multiples of kColumnBlock), so
  // one column range can sum x and h convs while another keeps them apart (GRU's n gate). A segment
  // sums at most two inputs (the GEMM's operand pairs).
  struct Segment {
    int64_t m0 = 0, n = 0;
    int64_t v[kMaxInputs] = {0, -1, -1};
  };
  Segment seg[3];
  int segments = 1;
  int64_t ldm = 0;
  const void* bias = nullptr;   // [N] accumulation type, or nullptr
  int64_t B = 0, N = 0, H = 0, W = 0, tile = 2;  // N: output channels = M columns [0, N); tile: V's m
  at::ScalarType dtype = at::kFloat;  // input and output dtype
  bool channels_last = false;         // layout of the strip planes handed out
  const WinogradStripFn* fn = nullptr;
  bool pre_acc = false;  // fn gets the strip in the accumulation type (else in dtype, as the frames)
  Plane out;  // when fn is null: the [B, N, H·W] output plane
  Plane out2;  // when fn is null and split > 0: channels [split, N) go to out2 (its channel 0) instead,
  int64_t split = 0;  // or with split2 > split, channels [split2, N) (those between are dropped)
  int64_t split2 = 0;
  bool tanh = false;  // when fn is null: write tanh(conv) (LSTM backward's recompute of g)
};

// A weight-gradient call (winograd_weight_grad_add): dV += Σ over the tiles of the input and output
// gradient frames of U[e]ᵀ dM[e] (e the alpha² Winograd positions).
struct WeightGradJob {
  Job::Input in;                   // the convolution's input [B, K, H, W]; in.V unused
  Job::Input in2;                  // K2 = in2.K > 0: a second input whose channels follow in's (dV rows K..K+K2)
  const void* grad = nullptr;      // the output gradient [B, N, H, W] with element strides:
  int64_t gb = 0, gc = 0, gy = 0, gx = 0;
  void* dV = nullptr;              // [chunks, alpha², K, ldv] accumulation type, accumulated into: chunk c
  int64_t chunks = 1, chunk_stride = 0;  // of the groups sums into dV + c·chunk_stride (see the kernel)
  int64_t columns[2][2] = {{0, 0}, {0, 0}};  // the output-gradient channels [begin, end) each input's dV
                                             // rows need; the kernel may compute a few more
  double* db = nullptr;            // [N], accumulated into (Σ of the output gradient, summed in fp64), or nullptr
  int64_t ldv = 0, B = 0, N = 0, H = 0, W = 0, tile = 2;  // tile: dV's m
  at::ScalarType dtype = at::kFloat;  // input and gradient dtype
};

// Where transform_weight_rows reads a 3x3 kernel w[n, k, i, j] and writes its transform (see
// transform_weights_into): source row k from its first tap on, destination row k from its first column on.
struct WeightPlacement {
  int64_t sn = 0, sk = 0, si = 0, sj = 0;  // element strides of w (flipped: negative i, j strides)
  int64_t N = 0, gates = 1, Cp = 0;        // gate g's column c (n = g·C + c) at g·Cp + c; gates = 1: Cp = N
  int64_t slice_stride = 0, row_stride = 0;  // V[a·A + b, row, ·] at ab·slice_stride + row·row_stride
  int64_t col0 = 0, row_len = 0;           // the columns start at col0 of destination rows of row_len values
  bool fill = true;                        // zero each whole destination row before writing its columns
};

}  // namespace winograd
}  // namespace recurrent
}  // namespace fastvid
#endif  // FASTVID_WINOGRAD_SHARED

#ifndef FASTVID_ISA
#define FASTVID_ISA_SOURCE "recurrent/recurrent_winograd_cpu.cpp"
#include "../cpu_isa_each.h"

namespace fastvid {
namespace recurrent {

namespace {
void run(const winograd::Job& job) {
  for (int sg = 0; sg < job.segments; ++sg) {
    int used = 0;
    for (int i = 0; i < job.inputs; ++i) used += job.seg[sg].v[i] >= 0;
    TORCH_INTERNAL_ASSERT(used >= 1 && used <= 2, "winograd_conv: a column segment sums one or two inputs");
  }
  FASTVID_ISA_CALL(recurrent, winograd_conv_kernel(job));
}

// A [B, K, H, W] tensor as a Job input: data, element strides and K (V unset).
winograd::Job::Input input_of(const Tensor& t) {
  winograd::Job::Input in;
  in.data = t.data_ptr();
  in.sb = t.stride(0), in.sc = t.stride(1), in.sy = t.stride(2), in.sx = t.stride(3);
  in.K = t.size(1);
  return in;
}

void set_input(winograd::Job& j, int i, const Tensor& input, const Tensor& V) {
  TORCH_CHECK(input.dim() == 4 && input.device().is_cpu(), "winograd_conv: input must be a [B, K, H, W] CPU tensor");
  const int64_t A2 = V.size(0);
  TORCH_CHECK(V.dim() == 3 && V.size(1) == input.size(1) && (A2 == 36 || A2 == 16) &&
                  V.scalar_type() == acc_type(input.scalar_type()) && V.stride(2) == 1 &&
                  V.stride(1) % winograd::kColumnBlock == 0 && V.stride(1) >= V.size(2) &&
                  V.stride(0) >= V.size(1) * V.stride(1),
              "winograd_conv: V must come from winograd_weights ([alpha², K, N], padded rows)");
  TORCH_CHECK(i == 0 || (input.size(2) == j.H && input.size(3) == j.W && input.size(0) == j.B && V.size(2) == j.N &&
                         V.stride(1) == j.ldv && (A2 == 36 ? 4 : 2) == j.tile && input.scalar_type() == j.dtype),
              "winograd_conv: the two inputs must agree in B, H, W, dtype and N");
  winograd::Job::Input& in = j.in[i];
  in = input_of(input);
  in.V = V.data_ptr();
  in.sv = V.stride(0);
  if (i == 0) {
    j.ldv = j.ldm = V.stride(1);
    j.B = input.size(0), j.H = input.size(2), j.W = input.size(3), j.N = V.size(2);
    j.tile = A2 == 36 ? 4 : 2;
    j.dtype = input.scalar_type();
    j.segments = 1;
    j.seg[0] = winograd::Job::Segment{0, j.ldv, {0, -1, -1}};
  } else {
    j.seg[0].v[i] = 0;  // this input's products summed onto the first's
  }
  j.inputs = i + 1;
}

winograd::Job make_job(const Tensor& input, const Tensor& V, const OptTensor& bias, const SeqGeometry& g,
                       Tensor& bias_acc) {
  winograd::Job j;
  set_input(j, 0, input, V);
  j.channels_last = g.channels_last;
  if (bias.has_value()) {
    // a bias already in the accumulation type is used as is (the time loops convert theirs once per
    // call: a conversion here per step was an ATen op per step)
    const bool ready = bias->scalar_type() == acc_type(input.scalar_type()) && bias->is_contiguous();
    bias_acc = ready ? *bias : bias->to(acc_type(input.scalar_type())).contiguous();
    TORCH_CHECK(bias_acc.numel() == j.N, "winograd_conv: bias must have N elements");
    j.bias = bias_acc.data_ptr();
  }
  return j;
}

int64_t gate_columns(int64_t C) {
  return (C + winograd::kColumnBlock - 1) / winograd::kColumnBlock * winograd::kColumnBlock;
}

// transform_weights' pass for the kernel rows [k_begin, k_begin + k_count) only, written into the rows
// [row0, row0 + k_count) of V [A², rows, row_len] (contiguous, accumulation type) at columns from col0 on;
// with `fill` each of those rows is zeroed first (else its other columns are left as they are).
template <int M>
void transform_weights_into(const Tensor& weight, bool flipped, int64_t gates, int64_t k_begin, int64_t k_count,
                            const Tensor& V, int64_t row0, int64_t col0, bool fill) {
  constexpr int A = winograd::Matrices<M>::A;
  TORCH_INTERNAL_ASSERT(V.dim() == 3 && V.size(0) == A * A && V.is_contiguous() &&
                            V.scalar_type() == acc_type(weight.scalar_type()) && row0 + k_count <= V.size(1) &&
                            k_begin + k_count <= weight.size(flipped ? 0 : 1),
                        "transform_weights_into: V must be [alpha², rows, len] in the accumulation type");
  winograd::WeightPlacement p;
  p.N = weight.size(flipped ? 1 : 0);
  p.gates = gates;
  p.Cp = gates > 1 ? gate_columns(p.N / gates) : p.N;
  // element strides of w[n, k, i, j] in weight (flipped: i, j read backwards from the last tap)
  p.sn = weight.stride(flipped ? 1 : 0), p.sk = weight.stride(flipped ? 0 : 1);
  p.si = flipped ? -weight.stride(2) : weight.stride(2), p.sj = flipped ? -weight.stride(3) : weight.stride(3);
  p.slice_stride = V.stride(0), p.row_stride = V.stride(1), p.col0 = col0, p.row_len = V.size(2), p.fill = fill;
  TORCH_INTERNAL_ASSERT(col0 + (gates - 1) * p.Cp + p.N / gates <= p.row_len, "transform_weights_into: columns past the row");
  const int64_t first_tap = (flipped ? 2 * weight.stride(2) + 2 * weight.stride(3) : 0) + k_begin * p.sk;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight.scalar_type(), "winograd_weights", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* src = weight.const_data_ptr<scalar_t>() + first_tap;
    acc_t* dst = V.mutable_data_ptr<acc_t>() + row0 * p.row_stride + col0;
    // parallel over k: transformed per call, serial they were ~3 % of a 2-thread small ConvGRU fwd+bwd
    at::parallel_for(0, k_count, 8, [&](int64_t k0, int64_t k1) {
      FASTVID_ISA_CALL(recurrent, transform_weight_rows<M>(src, p, k0, k1, dst));
    });
  });
}

// V[a·A + b, k, col(n)] = Σ_ij G[a, i] w[n, k, i, j] G[b, j] in fp64 for the kernel w [N, K, 3, 3] =
// weight, or with `flipped` the input-gradient kernel w[n, k, i, j] = weight[k, n, 2 - i, 2 - j]; with
// `gates` > 1 the N rows are that many stacked gates of C and gate g's column c is g·Cp + c (Cp = C
// rounded up to the GEMM column block). V is [A², K, Np] (Np: the columns rounded up to the column
// block, zeros past them) in the accumulation type; returned narrowed to N columns (gates: gates·Cp).
// One parallel pass straight from weight (any strides and floating dtype): the fp64 copy, the permuted
// copy, the zero-filled buffer and the gate copies it replaced were a dozen ATen ops per call.
// Loops with n innermost (contiguous, vectorised; transform_weight_rows, per ISA path): a batched matmul
// of the 6x3 / 3x3 matrices went through ATen's small-matrix bmm, and scalar loops per (n, k) cost ~5 %
// of a small ConvGRU fwd+bwd.
template <int M>
Tensor transform_weights(const Tensor& weight, bool flipped, int64_t gates) {
  constexpr int A = winograd::Matrices<M>::A;
  const int64_t N = weight.size(flipped ? 1 : 0), K = weight.size(flipped ? 0 : 1);
  const int64_t C = N / gates, Cp = gates > 1 ? gate_columns(C) : C;
  const int64_t columns = gates * Cp;
  Tensor V = cpu_block_cache::empty({A * A, K, gate_columns(columns)},
                                    weight.options().dtype(acc_type(weight.scalar_type())));
  transform_weights_into<M>(weight, flipped, gates, 0, K, V, 0, 0, true);
  return V.narrow(2, 0, gates > 1 ? columns : N);
}

// dL/dw [N, K, 3, 3] = Gᵀ dV G per (k, n) from dV = dL/d(G w Gᵀ) [A², K, N], in fp64 (as the forward's
// transform), as loops with n innermost (see transform_weights).
template <int M>
Tensor transform_weight_grad(const Tensor& dV, at::ScalarType dtype) {
  constexpr int A = winograd::Matrices<M>::A;
  TORCH_INTERNAL_ASSERT(dV.size(0) == A * A, "transform_weight_grad: dV must be [alpha², K, N]");
  const int64_t K = dV.size(1), N = dV.size(2);
  // dV read in place (no fp64 copy: at F(4 x 4) that was 36·K·N doubles at the backward's end).
  Tensor dw = at::empty({K, 3, 3, N}, at::TensorOptions().dtype(at::kDouble));
  double* dst = dw.mutable_data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES(dV.scalar_type(), "winograd_weight_grad_finish", [&] {
    const scalar_t* src = dV.const_data_ptr<scalar_t>();
    const int64_t s0 = dV.stride(0), s1 = dV.stride(1);
    at::parallel_for(0, K, 8, [&](int64_t k0, int64_t k1) {  // parallel as transform_weights
      FASTVID_ISA_CALL(recurrent, transform_weight_grad_rows<M>(src, s0, s1, N, k0, k1, dst));
    });
  });
  return dw.permute({3, 0, 1, 2}).to(dtype).contiguous();
}
}  // namespace

std::string winograd_unsupported_reason(const Tensor& x, const Tensor& weight_hh, const SeqGeometry& g) {
  if (!x.device().is_cpu()) return "it runs on CPU tensors only";
  if (weight_hh.size(2) != 3 || weight_hh.size(3) != 3)
    return "it needs a 3x3 kernel, got " + std::to_string(weight_hh.size(2)) + "x" + std::to_string(weight_hh.size(3));
  if (g.dilation[0] != 1 || g.dilation[1] != 1)
    return "it needs dilation 1, got (" + std::to_string(g.dilation[0]) + ", " + std::to_string(g.dilation[1]) + ")";
  return "";
}

void check_winograd(const char* op, const Tensor& x, const Tensor& weight_hh, const SeqGeometry& g,
                    const OptTensor& lengths) {
  // With lengths a masked sample's state differs from its (zero) output, and the winograd loops carry
  // h from step to step in the output frames (a strip's conv reads its neighbours' rows).
  const std::string reason =
      lengths.has_value() ? "it does not take lengths (variable-length batches)" : winograd_unsupported_reason(x, weight_hh, g);
  TORCH_CHECK_VALUE(reason.empty(), op, ": strategy 2 (winograd) cannot run this sequence: ", reason,
                    "; use strategy 0 (hoisted) or 1 (concat)");
}

namespace {
Tensor transformed_weights(const Tensor& weight, bool flipped, int64_t gates) {
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == 3 && weight.size(3) == 3, "winograd_weights: need [N, K, 3, 3]");
  return winograd_tile(weight.scalar_type()) == 4 ? transform_weights<4>(weight, flipped, gates)
                                                  : transform_weights<2>(weight, flipped, gates);
}
}  // namespace

Tensor winograd_weights(const Tensor& weight) { return transformed_weights(weight, false, 1); }

Tensor winograd_gate_weights(const Tensor& weight, int64_t gates) {
  TORCH_CHECK(gates > 0 && weight.dim() == 4 && weight.size(0) % gates == 0,
              "winograd_gate_weights: weight must be [gates·C, K, 3, 3]");
  return transformed_weights(weight, false, gates);
}

Tensor winograd_gru_bias(const OptTensor& bias_ih, const OptTensor& bias_hh, int64_t C, at::ScalarType dtype) {
  if (!bias_ih.has_value() && !bias_hh.has_value()) return Tensor();
  const int64_t Cp = gate_columns(C);
  Tensor out = at::zeros({4 * Cp}, at::TensorOptions().dtype(acc_type(dtype)));
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "winograd_gru_bias", [&] {
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const auto add = [&](const OptTensor& bias, std::initializer_list<std::pair<int64_t, int64_t>> slot_gate) {
      if (!bias.has_value()) return;
      const Tensor b = bias->to(out.scalar_type()).contiguous();  // one conversion per bias, not per gate
      const scalar_t* v = b.const_data_ptr<scalar_t>();
      for (const auto& [slot, gate] : slot_gate)
        for (int64_t c = 0; c < C; ++c) o[slot * Cp + c] += v[gate * C + c];
    };
    add(bias_ih, {{0, 0}, {1, 1}, {2, 2}});  // r, z, x_n
    add(bias_hh, {{0, 0}, {1, 1}, {3, 2}});  // r, z, h_n
  });
  return out;
}

Tensor winograd_input_grad_weights(const Tensor& weight) { return transformed_weights(weight, true, 1); }

void winograd_conv(const Tensor& input, const Tensor& V, const OptTensor& bias, const SeqGeometry& g,
                   const WinogradStripFn& fn) {
  Tensor bias_acc;
  winograd::Job j = make_job(input, V, bias, g, bias_acc);
  j.fn = &fn;
  run(j);
}

void winograd_conv_out(const Tensor& input, const Tensor& V, const OptTensor& bias, const SeqGeometry& g,
                       const Tensor& out, bool tanh) {
  Tensor bias_acc;
  winograd::Job j = make_job(input, V, bias, g, bias_acc);
  TORCH_INTERNAL_ASSERT(out.dim() == 4 && out.size(0) == j.B && out.size(1) == j.N && out.size(2) == j.H &&
                            out.size(3) == j.W && out.scalar_type() == input.scalar_type(),
                        "winograd_conv_out: out must be [B, N, H, W] in the input's dtype");
  j.tanh = tanh;
  j.out = plane(out);
  run(j);
}

void winograd_conv_split_out(const Tensor& input, const Tensor& V, const SeqGeometry& g, const Tensor& out_a,
                             const Tensor& out_b) {
  Tensor no_bias;
  winograd::Job j = make_job(input, V, std::nullopt, g, no_bias);
  const auto fits = [&](const Tensor& o, int64_t channels) {
    return o.dim() == 4 && o.size(0) == j.B && o.size(1) == channels && o.size(2) == j.H && o.size(3) == j.W &&
           o.scalar_type() == input.scalar_type();
  };
  TORCH_INTERNAL_ASSERT(out_a.dim() == 4 && fits(out_a, out_a.size(1)) && fits(out_b, j.N - out_a.size(1)),
                        "winograd_conv_split_out: out_a, out_b must split [B, N, H, W] in the input's dtype");
  j.out = plane(out_a);
  j.out2 = plane(out_b);
  j.split = out_a.size(1);
  run(j);
}

Tensor winograd_conv2(const Tensor& x, const Tensor& V_x, const Tensor& h, const Tensor& V_h, const OptTensor& bias,
                      const SeqGeometry& g, bool tanh) {
  Tensor bias_acc;
  winograd::Job j = make_job(x, V_x, bias, g, bias_acc);
  set_input(j, 1, h, V_h);
  Tensor out = cpu_block_cache::empty({x.size(0), j.N, x.size(2), x.size(3)},
                                      x.options().memory_format(frame_format(g.channels_last)));
  j.tanh = tanh;
  j.out = plane(out);
  run(j);
  return out;
}

// Rows in the order of the gradient frame [x_n, r, z, h_n]; columns [0, Cin) grad_x's (weight_ih's
// input-gradient kernel), [Cp, Cp + C) dh's (weight_hh's), Cp = Cin rounded up to the column block (each
// segment starts a block). The blocks no segment reads, and the columns between, stay zero.
// Each part is transformed straight into its rows and columns (the first writer of a row zeroes it): two
// transforms into temporaries, a zero fill and four copies were ~0.1 ms of a small ConvGRU's backward.
Tensor winograd_gru_input_grad_weights(const Tensor& weight_ih, const Tensor& weight_hh) {
  const int64_t C = weight_hh.size(1), Cin = weight_ih.size(1), Cp = gate_columns(Cin), N = Cp + C;
  const int64_t m = winograd_tile(weight_ih.scalar_type()), A = m + 2;
  TORCH_CHECK(weight_hh.scalar_type() == weight_ih.scalar_type(), "winograd_gru_input_grad_weights: one dtype");
  const Tensor V = cpu_block_cache::empty({A * A, 4 * C, gate_columns(N)},
                             weight_ih.options().dtype(acc_type(weight_ih.scalar_type())));
  const auto place = [&](const Tensor& weight, int64_t k_begin, int64_t k_count, int64_t row0, int64_t col0,
                         bool fill) {
    if (m == 4) transform_weights_into<4>(weight, true, 1, k_begin, k_count, V, row0, col0, fill);
    else transform_weights_into<2>(weight, true, 1, k_begin, k_count, V, row0, col0, fill);
  };
  place(weight_ih, 2 * C, C, 0, 0, true);        // x_n
  place(weight_ih, 0, 2 * C, C, 0, true);        // r, z -> grad_x
  place(weight_hh, 0, 2 * C, C, Cp, false);      // r, z -> dh (rows zeroed just above)
  place(weight_hh, 2 * C, C, 3 * C, Cp, true);   // h_n
  return V.narrow(2, 0, N);
}

void winograd_gru_input_grads(const Tensor& d, const Tensor& V, const SeqGeometry& g, const Tensor& grad_x,
                              const Tensor& dh) {
  const int64_t C = d.size(1) / 4, Cin = grad_x.size(1), Cp = gate_columns(Cin);
  TORCH_INTERNAL_ASSERT(d.size(1) == 4 * C && V.size(1) == 4 * C && V.size(2) == Cp + C && dh.size(1) == C,
                        "winograd_gru_input_grads: d [B, 4C, H, W], V from winograd_gru_input_grad_weights");
  Tensor no_bias;
  winograd::Job j = make_job(d.narrow(1, C, 2 * C), V.narrow(1, C, 2 * C), std::nullopt, g, no_bias);  // r, z
  set_input(j, 1, d.narrow(1, 0, C), V.narrow(1, 0, C));                                                 // x_n
  set_input(j, 2, d.narrow(1, 3 * C, C), V.narrow(1, 3 * C, C));                                        // h_n
  j.segments = 2;
  j.seg[0] = {0, Cp, {0, 0, -1}};                // grad_x = r, z and x_n through W_ih's kernel
  j.seg[1] = {Cp, j.ldv - Cp, {Cp, -1, Cp}};     // dh = r, z and h_n through W_hh's
  const auto fits = [&](const Tensor& o, int64_t channels) {
    return o.dim() == 4 && o.size(0) == j.B && o.size(1) == channels && o.size(2) == j.H && o.size(3) == j.W &&
           o.scalar_type() == d.scalar_type();
  };
  TORCH_INTERNAL_ASSERT(fits(grad_x, Cin) && fits(dh, C), "winograd_gru_input_grads: grad_x, dh must be "
                        "[B, Cin, H, W] and [B, C, H, W] in d's dtype");
  j.out = plane(grad_x);
  j.out2 = plane(dh);
  j.split = Cin;
  j.split2 = Cp;
  run(j);
}

Tensor winograd_conv(const Tensor& input, const Tensor& V, const OptTensor& bias, const SeqGeometry& g, bool tanh) {
  Tensor out = cpu_block_cache::empty({input.size(0), V.size(2), input.size(2), input.size(3)},
                                      input.options().memory_format(frame_format(g.channels_last)));
  winograd_conv_out(input, V, bias, g, out, tanh);
  return out;
}

namespace {
// The strip [y0, y0 + rows) of image b of a full-frame plane of element size elem.
Plane strip_of(const Plane& p, int64_t b, int64_t y0, int64_t W, int64_t elem) {
  return offset_plane(p, b, y0 * W, elem);
}

// The step mask of a strip of image b (the strip's kernel call sees that one image as batch 0).
StepMask strip_mask(const StepMask& m, int64_t b) {
  StepMask s = m;
  if (m.lengths != nullptr) s.lengths = m.lengths + b;
  return s;
}

// Gate slot k (channels [k·C, (k + 1)·C)) of a strip plane.
Plane slot_of(const Plane& p, int64_t k, int64_t C, int64_t elem) {
  Plane q = p;
  q.data = static_cast<char*>(p.data) + k * C * p.stride_c * elem;
  return q;
}
}  // namespace

void winograd_lstm_step(const LstmForwardArgs& a, const Tensor& x_t, const Tensor& V_ih, const OptTensor& bias,
                        const Tensor& h_prev, const Tensor& V_hh, const SeqGeometry& g) {
  const int64_t C = a.geo.channels, W = g.W;
  const int64_t es = c10::elementSize(a.geo.dtype), ea = c10::elementSize(acc_type(a.geo.dtype));
  Tensor bias_acc;
  winograd::Job j = make_job(x_t, V_ih, bias, g, bias_acc);
  set_input(j, 1, h_prev, V_hh);
  j.pre_acc = true;  // the gates read the fp32 output transform: pre-activations never rounded to dtype
  const WinogradStripFn fn = [&](int64_t b, int64_t y0, int64_t rows, const Plane& pre) {
    LstmForwardArgs s = a;
    s.geo.batch = 1;
    s.geo.pixels = rows * W;
    s.pre_acc = true;
    for (int k = 0; k < 4; ++k) {
      s.a_x[k] = slot_of(pre, k, C, ea);  // x and h convs summed in the Winograd domain; a_h not read
      if (a.save) s.gates_out[k] = strip_of(a.gates_out[k], b, y0, W, es);
    }
    s.c_prev = strip_of(a.c_prev, b, y0, W, ea);
    s.c_out = strip_of(a.c_out, b, y0, W, ea);
    s.c_save = strip_of(a.c_save, b, y0, W, es);  // a default (null) plane stays null
    s.h_out = strip_of(a.h_out, b, y0, W, es);
    s.h_out2 = strip_of(a.h_out2, b, y0, W, es);
    s.h_prev = strip_of(a.h_prev, b, y0, W, es);
    s.mask = strip_mask(a.mask, b);
    lstm_forward_cpu(s);
  };
  j.fn = &fn;
  run(j);
}

void winograd_gru_step(const GruForwardArgs& a, const Tensor& input, const Tensor& V, const OptTensor& bias,
                       int first_slot, const SeqGeometry& g) {
  const int64_t C = a.geo.channels, W = g.W;
  const int64_t es = c10::elementSize(a.geo.dtype);
  const int64_t n_slots = V.size(2) / C;
  winograd_conv(input, V, bias, g, [&](int64_t b, int64_t y0, int64_t rows, const Plane& pre) {
    GruForwardArgs s = a;
    s.geo.batch = 1;
    s.geo.pixels = rows * W;
    for (int k = 0; k < 3; ++k) {
      s.x[k] = strip_of(a.x[k], b, y0, W, es);
      s.h[k] = k >= first_slot && k < first_slot + n_slots ? slot_of(pre, k - first_slot, C, es)
                                                            : strip_of(a.h[k], b, y0, W, es);
    }
    if (a.save)
      for (int k = 0; k < 4; ++k) s.cache_out[k] = strip_of(a.cache_out[k], b, y0, W, es);
    s.h_prev = strip_of(a.h_prev, b, y0, W, es);
    s.h_out = strip_of(a.h_out, b, y0, W, es);
    s.h_out2 = strip_of(a.h_out2, b, y0, W, es);
    s.mask = strip_mask(a.mask, b);
    gru_forward_cpu(s);
  });
}

void winograd_gru_fused_step(const GruForwardArgs& a, const Tensor& x_t, const Tensor& V_x, const Tensor& h_prev,
                             const Tensor& V_h, const Tensor& bias, const SeqGeometry& g) {
  const int64_t C = a.geo.channels, W = g.W, Cp = gate_columns(C);
  const int64_t es = c10::elementSize(a.geo.dtype), ea = c10::elementSize(acc_type(a.geo.dtype));
  TORCH_CHECK(V_x.size(2) == 3 * Cp && V_h.size(2) == 3 * Cp, "winograd_gru_fused_step: V must come from winograd_gate_weights");
  winograd::Job j;
  set_input(j, 0, x_t, V_x);
  set_input(j, 1, h_prev, V_h);
  j.channels_last = g.channels_last;
  j.N = j.ldm = 4 * Cp;  // M columns: r and z (x + h), x_n, h_n
  j.segments = 3;
  j.seg[0] = {0, 2 * Cp, {0, 0, -1}};
  j.seg[1] = {2 * Cp, Cp, {2 * Cp, -1, -1}};
  j.seg[2] = {3 * Cp, Cp, {-1, 2 * Cp, -1}};
  if (bias.defined()) {
    TORCH_CHECK(bias.numel() == 4 * Cp && bias.scalar_type() == acc_type(a.geo.dtype),
                "winograd_gru_fused_step: bias must come from winograd_gru_bias");
    j.bias = bias.data_ptr();
  }
  j.pre_acc = true;  // the gates read the fp32 output transform: pre-activations never rounded to dtype
  const WinogradStripFn fn = [&](int64_t b, int64_t y0, int64_t rows, const Plane& pre) {
    GruForwardArgs s = a;
    s.geo.batch = 1;
    s.geo.pixels = rows * W;
    s.pre_acc = true;
    for (int k = 0; k < 3; ++k) s.x[k] = slot_of(pre, k, Cp, ea);
    s.h[2] = slot_of(pre, 3, Cp, ea);  // s.h[0], s.h[1] not read (h's r, z parts are summed into x's)
    if (a.save)
      for (int k = 0; k < 4; ++k) s.cache_out[k] = strip_of(a.cache_out[k], b, y0, W, es);
    s.h_prev = strip_of(a.h_prev, b, y0, W, es);
    s.h_out = strip_of(a.h_out, b, y0, W, es);
    s.h_out2 = strip_of(a.h_out2, b, y0, W, es);
    s.mask = strip_mask(a.mask, b);
    gru_forward_cpu(s);
  };
  j.fn = &fn;
  run(j);
}

Tensor winograd_weight_grad_buffer(int64_t K, int64_t N, at::ScalarType dtype, int64_t frames, int64_t H,
                                   int64_t W) {
  const int64_t m = winograd_tile(dtype), A = m + 2;
  const int64_t Np = (N + winograd::kColumnBlock - 1) / winograd::kColumnBlock * winograd::kColumnBlock;
  // one partial sum per thread, but no more than one call's groups of strips can fill
  const int64_t groups = winograd::strip_groups(frames, H, W, m);
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), groups));
  Tensor partials = cpu_block_cache::empty({chunks, A * A, K, Np}, at::TensorOptions().dtype(acc_type(dtype)));
  return partials.zero_().narrow(3, 0, N);
}

// The layout winograd_weight_grad_buffer allocates: [chunks, alpha², K, N] of dense chunks and slices,
// rows padded to the GEMM column block.
namespace {
bool is_weight_grad_buffer(const Tensor& dV) {
  return dV.dim() == 4 && (dV.size(1) == 36 || dV.size(1) == 16) && dV.stride(3) == 1 &&
         dV.stride(2) % winograd::kColumnBlock == 0 && dV.stride(1) == dV.size(2) * dV.stride(2) &&
         dV.stride(0) == dV.size(1) * dV.stride(1);
}
}  // namespace

void winograd_weight_grad_add(Tensor& dV, const Tensor& input, const Tensor& grad_output, Tensor* db,
                              const Tensor* input2, const WeightGradColumns& columns) {
  TORCH_CHECK(input.dim() == 4 && grad_output.dim() == 4 && input.device().is_cpu() && grad_output.device().is_cpu(),
              "winograd_weight_grad_add: input and grad_output must be [B, ., H, W] CPU tensors");
  TORCH_CHECK(is_weight_grad_buffer(dV),
              "winograd_weight_grad_add: dV must come from winograd_weight_grad_buffer(K, N, ...)");
  const int64_t A2 = dV.size(1);
  const int64_t K2 = input2 != nullptr ? input2->size(1) : 0;
  TORCH_CHECK(input2 == nullptr || (input2->dim() == 4 && input2->device().is_cpu() &&
                                    input2->size(0) == input.size(0) && input2->size(2) == input.size(2) &&
                                    input2->size(3) == input.size(3) && input2->scalar_type() == input.scalar_type()),
              "winograd_weight_grad_add: input2 must agree with input in B, H, W and dtype");
  TORCH_CHECK(dV.size(2) == input.size(1) + K2 && dV.size(3) == grad_output.size(1) &&
                  dV.scalar_type() == acc_type(input.scalar_type()),
              "winograd_weight_grad_add: dV must come from winograd_weight_grad_buffer(K, N, ...)");
  TORCH_CHECK(grad_output.size(0) == input.size(0) && grad_output.size(2) == input.size(2) &&
                  grad_output.size(3) == input.size(3) && grad_output.scalar_type() == input.scalar_type(),
              "winograd_weight_grad_add: input and grad_output must agree in B, H, W and dtype");
  winograd::WeightGradJob j;
  j.in = input_of(input);
  if (input2 != nullptr) j.in2 = input_of(*input2);
  j.grad = grad_output.data_ptr();
  j.gb = grad_output.stride(0), j.gc = grad_output.stride(1), j.gy = grad_output.stride(2),
  j.gx = grad_output.stride(3);
  j.dV = dV.data_ptr();
  j.chunks = dV.size(0), j.chunk_stride = dV.stride(0);
  for (int i = 0; i < 2; ++i) {
    const int64_t N = grad_output.size(1), end = columns.end[i] < 0 ? N : columns.end[i];
    TORCH_CHECK(columns.begin[i] >= 0 && columns.begin[i] < end && end <= N,
                "winograd_weight_grad_add: column range [", columns.begin[i], ", ", end, ") not in [0, ", N, ")");
    j.columns[i][0] = columns.begin[i], j.columns[i][1] = end;
  }
  if (db != nullptr) {
    TORCH_CHECK(db->dim() == 1 && db->numel() == grad_output.size(1) && db->is_contiguous() &&
                    db->scalar_type() == at::kDouble,
                "winograd_weight_grad_add: db must be a contiguous [N] float64 tensor");
    j.db = db->data_ptr<double>();
  }
  j.ldv = dV.stride(2);
  j.B = input.size(0), j.N = grad_output.size(1), j.H = input.size(2), j.W = input.size(3);
  j.tile = A2 == 36 ? 4 : 2;
  j.dtype = input.scalar_type();
  FASTVID_ISA_CALL(recurrent, winograd_weight_grad_kernel(j));
}

Tensor winograd_weight_grad_total(const Tensor& dV) {
  TORCH_CHECK(is_weight_grad_buffer(dV),
              "winograd_weight_grad_total: dV must come from winograd_weight_grad_buffer(K, N, ...)");
  // The chunks' partial sums added into chunk 0 in chunk order (each element's sum order fixed).
  AT_DISPATCH_FLOATING_TYPES(dV.scalar_type(), "winograd_weight_grad_total", [&] {
    scalar_t* sum = dV.mutable_data_ptr<scalar_t>();
    const int64_t size = dV.stride(0), chunks = dV.size(0);
    at::parallel_for(0, chunks > 1 ? size : 0, 1 << 16, [&](int64_t i0, int64_t i1) {
      for (int64_t c = 1; c < chunks; ++c) {
        const scalar_t* part = sum + c * size;
        for (int64_t i = i0; i < i1; ++i) sum[i] += part[i];
      }
    });
  });
  return dV.select(0, 0);
}

Tensor winograd_weight_grad_finish(const Tensor& total, at::ScalarType dtype) {
  // total = dL/d(G w Gᵀ), so dL/dw = Gᵀ total G.
  TORCH_CHECK(total.dim() == 3 && (total.size(0) == 36 || total.size(0) == 16) && total.stride(2) == 1,
              "winograd_weight_grad_finish: takes [alpha², K, N] (a view of) winograd_weight_grad_total's result");
  return total.size(0) == 36 ? transform_weight_grad<4>(total, dtype) : transform_weight_grad<2>(total, dtype);
}

}  // namespace recurrent
}  // namespace fastvid

#else  // ------------------------------------------------ one ISA path: namespace FASTVID_ISA
namespace fastvid {
namespace recurrent {
namespace FASTVID_ISA {
namespace {

using winograd::kGroupTiles;
// The alpha² slices of U and M are read / written together per tile: a slice stride that is a multiple
// of 4 KiB puts all alpha² streams in the same L1 sets. 16 elements (one cache line) of padding.
constexpr int64_t kSlicePad = 16;
// Columns of M computed and output-transformed at a time (a multiple of both paths' GEMM column
// block; the segments of a Job start at multiples of it).
constexpr int64_t kBlockColumns = winograd::kColumnBlock;

// A per-call scratch of n elements, not zero-filled (std::vector's fill was a pass over ~1-2 MB per
// worker per call): whatever is read of it is written first.
template <typename T>
std::unique_ptr<T[]> scratch(int64_t n) {
  return std::unique_ptr<T[]>(new T[n]);
}

// ---------------------------------------------------------------- GEMM
// C [P, ldc] = Σ_i A_i [P, K_i] (row stride lda_i) x B_i [K_i, ldb] over one or two operand pairs, in
// column blocks of NR (2 vectors). Register-blocked: MR rows x 2 vectors of accumulators, B streamed
// row by row, A broadcast; both pairs run into the same accumulators, so C is written once and
// never read. MKL's sgemm (what at::bmm runs) took the AVX2 path on the AMD CPUs measured here, at
// half the AVX-512 rate; this kernel runs each ISA path at its own width.
typedef float vec_f __attribute__((vector_size(FASTVID_VEC_BYTES)));
typedef double vec_d __attribute__((vector_size(FASTVID_VEC_BYTES)));
template <typename T> struct VecOf;
template <> struct VecOf<float> { using type = vec_f; };
template <> struct VecOf<double> { using type = vec_d; };

// c + a·b, fused where the path has FMA (the build's ISO C++ mode does not contract a*b + c).
// broadcast(p): *p in every lane, one load-port broadcast from memory (`V{} + *p` compiled to a scalar
// add of +0.0 and a register broadcast on an FP port, per row and k: 2 extra FP ops per 2 FMAs).
#if FASTVID_VEC_BYTES == 64
inline vec_f fmadd(vec_f a, vec_f b, vec_f c) { return (vec_f)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c); }
inline vec_d fmadd(vec_d a, vec_d b, vec_d c) { return (vec_d)_mm512_fmadd_pd((__m512d)a, (__m512d)b, (__m512d)c); }
inline vec_f broadcast(const float* p) { return (vec_f)_mm512_set1_ps(*p); }
inline vec_d broadcast(const double* p) { return (vec_d)_mm512_set1_pd(*p); }
constexpr int kRows = 12;  // 24 of the 32 vector registers hold accumulators
// B rows prefetched this many rows ahead of the FMAs (with V in column panels, the rest of this
// panel and then the next Winograd position's). Intel Xeon (AVX-512), large ConvLSTM (B8 T16 C64
// 32²) no-grad forward, three process pairs: 4-8 % faster; at 256 bits within noise or slower, so
// the narrower paths do not.
constexpr int64_t kPrefetchRows = 16;
#elif FASTVID_VEC_BYTES == 32
inline vec_f fmadd(vec_f a, vec_f b, vec_f c) { return (vec_f)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c); }
inline vec_d fmadd(vec_d a, vec_d b, vec_d c) { return (vec_d)_mm256_fmadd_pd((__m256d)a, (__m256d)b, (__m256d)c); }
inline vec_f broadcast(const float* p) { return (vec_f)_mm256_broadcast_ss(p); }
inline vec_d broadcast(const double* p) { return (vec_d)_mm256_broadcast_sd(p); }
constexpr int kRows = 6;  // 12 of 16 (+ 2 B vectors + 1 broadcast)
constexpr int64_t kPrefetchRows = 0;
#else
template <typename V> inline V fmadd(V a, V b, V c) { return a * b + c; }
template <typename T> inline typename VecOf<T>::type broadcast(const T* p) {
  typename VecOf<T>::type v;
  for (size_t l = 0; l < FASTVID_VEC_BYTES / sizeof(T); ++l) v[l] = *p;
  return v;
}
constexpr int kRows = 6;
constexpr int64_t kPrefetchRows = 0;
#endif

// One GEMM operand pair: A [P, K] (row stride lda), B [K, ldb] (already moved to the column block).
template <typename T>
struct Operands {
  const T* a = nullptr;
  int64_t lda = 0;
  const T* b = nullptr;
  int64_t ldb = 0, K = 0;
};

template <typename T, int MR, typename V>
__attribute__((always_inline)) inline void accumulate(V (&acc0)[MR], V (&acc1)[MR], const Operands<T>& o, int64_t p0) {
  constexpr int L = FASTVID_VEC_BYTES / sizeof(T);
  const T* a = o.a + p0 * o.lda;
  for (int64_t k = 0; k < o.K; ++k) {
    if constexpr (kPrefetchRows > 0) {  // 512 bits: each of the two B vectors is one 64-byte line
      __builtin_prefetch(o.b + (k + kPrefetchRows) * o.ldb, 0, 3);
      __builtin_prefetch(o.b + (k + kPrefetchRows) * o.ldb + L, 0, 3);
    }
    V b0, b1;
    std::memcpy(&b0, o.b + k * o.ldb, sizeof(V));
    std::memcpy(&b1, o.b + k * o.ldb + L, sizeof(V));
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const V ai = broadcast(a + i * o.lda + k);
      acc0[i] = fmadd(ai, b0, acc0[i]);
      acc1[i] = fmadd(ai, b1, acc1[i]);
    }
  }
}

template <typename T, int MR>
inline void gemm_block(const Operands<T>* ops, int n_ops, int64_t p0, T* c, int64_t ldc) {
  using V = typename VecOf<T>::type;
  constexpr int L = FASTVID_VEC_BYTES / sizeof(T);
  V acc0[MR], acc1[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) acc0[i] = acc1[i] = V{};
  accumulate<T, MR>(acc0, acc1, ops[0], p0);
  if (n_ops > 1) accumulate<T, MR>(acc0, acc1, ops[1], p0);
  c += p0 * ldc;
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    std::memcpy(c + i * ldc, &acc0[i], sizeof(V));
    std::memcpy(c + i * ldc + L, &acc1[i], sizeof(V));
  }
}

// f(r0, n) over [0, rows) in the fewest blocks of at most kRows rows, balanced: 64 rows run as 11, 11,
// 11, 11, 10, 10 rather than 5 x 12 + 4 (a thin last block runs its FMAs at a fraction of the rate).
template <typename F>
inline void for_row_blocks(int64_t rows, const F& f) {
  const int64_t blocks = (rows + kRows - 1) / kRows;
  for (int64_t b = 0, r0 = 0; b < blocks; ++b) {
    const int n = static_cast<int>(rows / blocks + (b < rows % blocks ? 1 : 0));
    f(r0, n);
    r0 += n;
  }
}

template <typename T, int MR>
inline void gemm_rows(int rows, const Operands<T>* ops, int n_ops, int64_t p0, T* c, int64_t ldc) {
  if constexpr (MR > 0) {
    if (rows == MR) gemm_block<T, MR>(ops, n_ops, p0, c, ldc);
    else gemm_rows<T, MR - 1>(rows, ops, n_ops, p0, c, ldc);
  }
}

// C [P, n] = Σ_i A_i B_i [:, 0 : n] (n a multiple of kColumnBlock).
template <typename T>
void gemm(Operands<T> ops[2], int n_ops, int64_t n, T* c, int64_t ldc, int64_t P) {
  constexpr int64_t NR = 2 * FASTVID_VEC_BYTES / sizeof(T);
  static_assert(winograd::kColumnBlock % NR == 0, "V's padding must cover the column block");
  for (int64_t n0 = 0; n0 < n; n0 += NR) {
    Operands<T> o[2] = {ops[0], ops[1]};
    for (int i = 0; i < n_ops; ++i) o[i].b += n0;
    for_row_blocks(P, [&](int64_t p0, int rows) { gemm_rows<T, kRows>(rows, o, n_ops, p0, c + n0, ldc); });
  }
}

// c + a·b for the transforms: a vector FMA (fmadd above), or a scalar multiply-add for the tail lanes.
template <typename V>
inline V mul_add(V a, V b, V c) {
  if constexpr (std::is_arithmetic_v<V>) return a * b + c;
  else return fmadd(a, b, c);
}

template <typename V, typename T>
inline V load_lanes(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename T>
inline void store_lanes(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// out = L in Lᵀ (+ add) per channel for the compile-time matrix L (or, with kTranspose, its transpose):
// the one shape of every Winograd transform -- input Bᵀ d B, output Aᵀ m A (+ bias), output gradient
// A dY Aᵀ. `apply` runs it over `lanes` consecutive channels (the inner index of every scratch):
// input element (r, c) of channel l at src[r·sr + c·sc + l], output (i, j) to dst[i·dr + j·dc + l],
// add[l] (if given) added to every output of channel l. Two passes through a stack temporary
// t[i][c][lane], vectorised over the channels: a whole S x S tile of vectors in registers (the
// previous form) spilled, and so did its 2·S² hoisted addresses. Zero coefficients drop out, ±1 ones
// become adds, once the loops are unrolled.
template <const auto& L, bool kTranspose = false>
struct Sandwich {
  using Matrix = std::remove_cvref_t<decltype(L)>;
  static constexpr int R = kTranspose ? std::extent_v<Matrix, 1> : std::extent_v<Matrix, 0>;  // out: R x R
  static constexpr int S = kTranspose ? std::extent_v<Matrix, 0> : std::extent_v<Matrix, 1>;  // in: S x S
  static constexpr double at(int i, int j) { return kTranspose ? L[j][i] : L[i][j]; }
  static constexpr int64_t kChunk = 64;  // lanes per pass (t: R·S·kChunk elements)

  // v (+)= coef · x, `first`: v is not yet set.
  template <typename V, typename T>
  __attribute__((always_inline)) static inline void term(V& v, bool first, double coef, const V& x) {
    if (coef == 1) v = first ? x : v + x;
    else if (coef == -1) v = first ? -x : v - x;
    else v = first ? T(coef) * x : mul_add<V>(x, V{} + T(coef), v);
  }

  // t[i·S·kChunk] = Σ_r L[i][r] in[r·sr] for the lanes of one vector (or one scalar lane).
  template <typename V, typename T>
  __attribute__((always_inline)) static inline void column(const T* in, int64_t sr, T* t) {
    V d[S];
#pragma GCC unroll 8
    for (int r = 0; r < S; ++r) d[r] = load_lanes<V>(in + r * sr);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      V v{};
      bool first = true;
#pragma GCC unroll 8
      for (int r = 0; r < S; ++r)
        if (at(i, r) != 0) term<V, T>(v, first, at(i, r), d[r]), first = false;
      store_lanes(t + i * S * kChunk, v);
    }
  }

  // out[j·dc] = add + Σ_c t[c·kChunk] L[j][c].
  template <typename V, typename T>
  __attribute__((always_inline)) static inline void row(const T* t, T* out, int64_t dc, const T* add) {
    V x[S];
#pragma GCC unroll 8
    for (int c = 0; c < S; ++c) x[c] = load_lanes<V>(t + c * kChunk);
#pragma GCC unroll 8
    for (int j = 0; j < R; ++j) {
      V v = add != nullptr ? load_lanes<V>(add) : V{};
      bool first = add == nullptr;
#pragma GCC unroll 8
      for (int c = 0; c < S; ++c)
        if (at(j, c) != 0) term<V, T>(v, first, at(j, c), x[c]), first = false;
      store_lanes(out + j * dc, v);
    }
  }

  template <typename T>
  static void apply(const T* src, int64_t sr, int64_t sc, T* dst, int64_t dr, int64_t dc, int64_t lanes,
                    const T* add = nullptr) {
    using V = typename VecOf<T>::type;
    constexpr int64_t Lw = sizeof(V) / sizeof(T);
    static_assert(kChunk % Lw == 0, "a chunk holds whole vectors");
    alignas(64) T t[R][S][kChunk];
    for (int64_t l0 = 0; l0 < lanes; l0 += kChunk) {
      const int64_t n = std::min(kChunk, lanes - l0), nv = n / Lw * Lw;
      const T* a = add != nullptr ? add + l0 : nullptr;
      for (int c = 0; c < S; ++c) {
        const T* in = src + c * sc + l0;
        int64_t l = 0;
        for (; l < nv; l += Lw) column<V, T>(in + l, sr, &t[0][c][l]);
        for (; l < n; ++l) column<T, T>(in + l, sr, &t[0][c][l]);
      }
      for (int i = 0; i < R; ++i) {
        T* out = dst + i * dr + l0;
        int64_t l = 0;
        for (; l < nv; l += Lw) row<V, T>(&t[i][0][l], out + l, dc, a != nullptr ? a + l : nullptr);
        for (; l < n; ++l) row<T, T>(&t[i][0][l], out + l, dc, a != nullptr ? a + l : nullptr);
      }
    }
  }
};

// dst[c·d_ld + r] = src[r·s_ld + c] for r < rows, c < cols (converted to dst_t). fp32 on x86 goes
// through 8 x 8 (AVX paths) and 4 x 4 (SSE) blocks transposed in registers: element by element, the
// stores (or loads) a whole row apart took ~3/4 of the Winograd input gather's time.
template <typename dst_t, typename src_t>
void transpose(const src_t* src, int64_t s_ld, int64_t rows, int64_t cols, dst_t* dst, int64_t d_ld) {
  int64_t r0 = 0;
  const auto tail_columns = [&](int64_t r_begin, int64_t r_end, int64_t c_begin) {
    for (int64_t c = c_begin; c < cols; ++c)
      for (int64_t r = r_begin; r < r_end; ++r) dst[c * d_ld + r] = static_cast<dst_t>(src[r * s_ld + c]);
  };
#ifdef __x86_64__
  if constexpr (std::is_same_v<src_t, float> && std::is_same_v<dst_t, float>) {
#if FASTVID_VEC_BYTES >= 32
    for (; r0 + 8 <= rows; r0 += 8) {
      const float* s = src + r0 * s_ld;
      int64_t c = 0;
      for (; c + 8 <= cols; c += 8) {
        __m256 v[8], t[8];
        for (int i = 0; i < 8; ++i) v[i] = _mm256_loadu_ps(s + i * s_ld + c);
        for (int i = 0; i < 8; i += 2) {  // t[i]: rows i, i+1 interleaved, columns 0,1 | 4,5; t[i+1]: 2,3 | 6,7
          t[i] = _mm256_unpacklo_ps(v[i], v[i + 1]);
          t[i + 1] = _mm256_unpackhi_ps(v[i], v[i + 1]);
        }
        for (int i = 0; i < 8; i += 4)  // v[i + j]: column j | j + 4 of rows i .. i + 3
          for (int h = 0; h < 2; ++h) {
            v[i + 2 * h] = _mm256_shuffle_ps(t[i + h], t[i + h + 2], _MM_SHUFFLE(1, 0, 1, 0));
            v[i + 2 * h + 1] = _mm256_shuffle_ps(t[i + h], t[i + h + 2], _MM_SHUFFLE(3, 2, 3, 2));
          }
        float* d = dst + c * d_ld + r0;
        for (int j = 0; j < 4; ++j) {
          _mm256_storeu_ps(d + j * d_ld, _mm256_permute2f128_ps(v[j], v[j + 4], 0x20));
          _mm256_storeu_ps(d + (j + 4) * d_ld, _mm256_permute2f128_ps(v[j], v[j + 4], 0x31));
        }
      }
      tail_columns(r0, r0 + 8, c);
    }
#endif
    for (; r0 + 4 <= rows; r0 += 4) {
      const float* s = src + r0 * s_ld;
      int64_t c = 0;
      for (; c + 4 <= cols; c += 4) {
        __m128 v0 = _mm_loadu_ps(s + c), v1 = _mm_loadu_ps(s + s_ld + c);
        __m128 v2 = _mm_loadu_ps(s + 2 * s_ld + c), v3 = _mm_loadu_ps(s + 3 * s_ld + c);
        _MM_TRANSPOSE4_PS(v0, v1, v2, v3);
        float* d = dst + c * d_ld + r0;
        _mm_storeu_ps(d, v0), _mm_storeu_ps(d + d_ld, v1), _mm_storeu_ps(d + 2 * d_ld, v2), _mm_storeu_ps(d + 3 * d_ld, v3);
      }
      tail_columns(r0, r0 + 4, c);
    }
  }
#endif
  for (int64_t r = r0; r < rows; ++r)
    for (int64_t c = 0; c < cols; ++c) dst[c * d_ld + r] = static_cast<dst_t>(src[r * s_ld + c]);
}

// dst[(n - c0)·sc + q·sp] = out[pixel q, channel n] for the channels [c0, c1) and the rows·W pixels q of a
// strip: out is pixel-major [rows][Wt][N]; channels-major destinations (sp == 1) are transposed row by row.
template <typename acc_t, typename scalar_t>
void emit_strip_channels(const acc_t* out, int64_t Wt, int64_t W, int64_t rows, int64_t N, int64_t c0, int64_t c1,
                         scalar_t* dst, int64_t sc, int64_t sp) {
  if (sp == 1 && sc > 1) {
    for (int64_t r = 0; r < rows; ++r) transpose(out + r * Wt * N + c0, N, W, c1 - c0, dst + r * W, sc);
    return;
  }
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t x = 0; x < W; ++x) {
      const acc_t* src = out + (r * Wt + x) * N + c0;
      scalar_t* d = dst + (r * W + x) * sp;
      for (int64_t n = 0; n < c1 - c0; ++n) d[n * sc] = static_cast<scalar_t>(src[n]);
    }
}

// All N channels (emit_strip_channels over [0, N)).
template <typename acc_t, typename scalar_t>
void emit_strip(const acc_t* out, int64_t Wt, int64_t W, int64_t rows, int64_t N, scalar_t* dst, int64_t sc,
                int64_t sp) {
  emit_strip_channels(out, Wt, W, rows, N, 0, N, dst, sc, sp);
}

// dst[x·K + k] = src[x·sx + k·sc] for x < W, k < K: one input row, channels innermost, in the
// accumulation type.
template <typename acc_t, typename scalar_t>
void gather_channels_inner(const scalar_t* src, int64_t sx, int64_t sc, int64_t W, int64_t K, acc_t* dst) {
  if (sx == 1 && sc > 1) {
    transpose(src, sc, K, W, dst, K);
    return;
  }
  for (int64_t x = 0; x < W; ++x)
    for (int64_t k = 0; k < K; ++k) dst[x * K + k] = static_cast<acc_t>(src[x * sx + k * sc]);
}

// Step 1 of every Winograd pass (forward and weight gradient) for the strips [s0, s1) (strip s: output
// rows (s % tiles_h)·M .. + M - 1 of sample s / tiles_h): the padded input rows the strips read, gathered
// into D (tiles_w·M + 2 pixels, channels innermost, accumulation type; (s1 - s0)·M + 2 rows) once per
// image -- neighbouring strips share 2 rows --, then per tile and channel U = Bᵀ d B (strip s's tile t,
// channel k, slice (i, j) at (i·A + j)·su + ((s - s0)·tiles_w + t)·K + k).
template <int M, typename acc_t, typename scalar_t>
void gather_transform(const winograd::Job::Input& in, int64_t s0, int64_t s1, int64_t tiles_h, int64_t H, int64_t W,
                      int64_t tiles_w, acc_t* D, acc_t* U, int64_t su) {
  using Mat = winograd::Matrices<M>;
  constexpr int A = Mat::A;
  const int64_t K = in.K, Wp = tiles_w * M + 2;
  for (int64_t s = s0; s < s1;) {
    const int64_t b = s / tiles_h, run_end = std::min(s1, (b + 1) * tiles_h);
    const int64_t y_first = (s % tiles_h) * M - 1, rows = (run_end - s) * M + 2;
    const scalar_t* in_b = static_cast<const scalar_t*>(in.data) + b * in.sb;
    for (int64_t r = 0; r < rows; ++r) {
      acc_t* row = D + r * Wp * K;
      const int64_t y = y_first + r;
      if (y < 0 || y >= H) {
        std::fill(row, row + Wp * K, acc_t(0));
        continue;
      }
      std::fill(row, row + K, acc_t(0));
      std::fill(row + (W + 1) * K, row + Wp * K, acc_t(0));
      gather_channels_inner(in_b + y * in.sy, in.sx, in.sc, W, K, row + K);
    }
    for (const int64_t run_start = s; s < run_end; ++s) {
      const acc_t* D_s = D + (s - run_start) * M * Wp * K;
      for (int64_t tx = 0; tx < tiles_w; ++tx) {
        const acc_t* d0 = D_s + tx * M * K;
        acc_t* u0 = U + ((s - s0) * tiles_w + tx) * K;
        Sandwich<Mat::BT>::apply(d0, Wp * K, K, u0, A * su, su, K);
      }
    }
  }
}

// The GEMMs' B operand of one column block and Winograd position is K rows of kBlockColumns values a
// whole V row (ldv columns) apart. Where the inputs' V together exceed half this core's L2 (they are
// read once per group of strips, around the group's U and M), they come from L3 as a strided stream
// that the loads wait on; then each V is copied once per call into column panels
// [ldv / kBlockColumns][alpha²][K][kBlockColumns], one contiguous run per GEMM and the next position's
// right after it. Intel Xeon, large ConvLSTM (B8 T16 C64 32²: 2 MB of V): stand-alone GEMM 68 -> 100
// GFMA/s per core; the op (two process pairs per path, two threads) no-grad 8-10 % faster at 512
// bits and 5-8 % at 256, fwd+bwd 4-6 % / 1-2 %. The small ConvLSTM and ConvGRU (B4 T8 C32: 512 KB of
// V, L2-resident) measured 1-18 % slower with the copy (a pass over V per conv call, i.e. per step):
// not packed.
// An L2 the OS does not report counts as 1 MB.
bool packs_v(int64_t v_bytes) {
  const int64_t l2 = cpu_isa::l2_cache_bytes();
  return v_bytes > (l2 > 0 ? l2 : int64_t(1) << 20) / 2;
}

// Each input's V in column panels where packs_v says so (input i's at panels + offset[i]), else null.
template <int A, typename acc_t>
std::unique_ptr<acc_t[]> pack_v_panels(const winograd::Job& j, int64_t (&offset)[winograd::Job::kMaxInputs]) {
  int64_t total = 0;
  for (int i = 0; i < j.inputs; ++i) offset[i] = total, total += A * A * j.in[i].K * j.ldv;
  if (!packs_v(total * int64_t(sizeof(acc_t)))) return nullptr;
  auto panels = scratch<acc_t>(total);
  const int64_t blocks = j.ldv / kBlockColumns;
  at::parallel_for(0, j.inputs * A * A, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int i = static_cast<int>(item / (A * A));
      const int64_t e = item % (A * A), K = j.in[i].K;
      const acc_t* src = static_cast<const acc_t*>(j.in[i].V) + e * j.in[i].sv;
      acc_t* dst = panels.get() + offset[i] + e * K * kBlockColumns;
      for (int64_t k = 0; k < K; ++k)
        for (int64_t b = 0; b < blocks; ++b)
          std::memcpy(dst + (b * A * A * K + k) * kBlockColumns, src + k * j.ldv + b * kBlockColumns,
                      kBlockColumns * sizeof(acc_t));
    }
  });
  return panels;
}

template <int M, typename scalar_t>
void winograd_conv_impl(const winograd::Job& j) {
  using acc_t = at::opmath_type<scalar_t>;
  using Mat = winograd::Matrices<M>;
  constexpr int A = Mat::A;
  const int64_t N = j.N, H = j.H, W = j.W;
  int64_t panel_offset[winograd::Job::kMaxInputs] = {0};
  const auto V_panels = pack_v_panels<A, acc_t>(j, panel_offset);
  int64_t K_max = 0;
  for (int i = 0; i < j.inputs; ++i) K_max = std::max(K_max, j.in[i].K);
  const int64_t tiles_h = (H + M - 1) / M, tiles_w = (W + M - 1) / M;
  const int64_t Wt = tiles_w * M;        // tiled width
  const int64_t Wp = Wt + 2;             // padded scratch width
  const int64_t strips = j.B * tiles_h;
  const int64_t per_group = winograd::strips_per_group(W, M);
  const int64_t groups = winograd::strip_groups(j.B, H, W, M);
  const int64_t Np = j.ldm;
  const acc_t* bias = static_cast<const acc_t*>(j.bias);

  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    const int64_t max_tiles = per_group * tiles_w;
    const auto D = scratch<acc_t>((per_group * M + 2) * Wp * K_max);  // padded input rows of a group, channels innermost
    int64_t u_offset[winograd::Job::kMaxInputs + 1] = {0};  // each input's U [alpha², tiles, K] (+ slice padding)
    for (int i = 0; i < j.inputs; ++i) u_offset[i + 1] = u_offset[i] + A * A * (max_tiles * j.in[i].K + kSlicePad);
    const auto U_buf = scratch<acc_t>(u_offset[j.inputs]);
    const auto M_buf = scratch<acc_t>(A * A * (max_tiles * kBlockColumns + kSlicePad));  // one column block of M
    const auto out = scratch<acc_t>(per_group * M * Wt * N);  // the group's strips' outputs, pixel-major
    // a strip for fn in the frames layout: in dtype, or (pre_acc) in the accumulation type -- unless
    // pre_acc with channels innermost and no W padding, where fn reads `out` itself
    const bool direct = j.fn != nullptr && j.pre_acc && j.channels_last && Wt == W;
    const auto pre = scratch<scalar_t>(j.fn != nullptr && !j.pre_acc ? M * W * N : 0);
    const auto pre_acc = scratch<acc_t>(j.fn != nullptr && j.pre_acc && !direct ? M * W * N : 0);
    for (int64_t grp = g0; grp < g1; ++grp) {
      const int64_t s0 = grp * per_group, s1 = std::min(strips, s0 + per_group);
      const int64_t P = (s1 - s0) * tiles_w;
      const int64_t sm = P * kBlockColumns + kSlicePad;  // element stride of the alpha² slices of M
      acc_t* Mm = M_buf.get();
      acc_t* U_in[winograd::Job::kMaxInputs];
      for (int i = 0; i < j.inputs; ++i) U_in[i] = U_buf.get() + u_offset[i];
      int64_t su_in[winograd::Job::kMaxInputs] = {0};  // element stride of the alpha² slices of each U
      for (int i_in = 0; i_in < j.inputs; ++i_in) {
      const winograd::Job::Input& in = j.in[i_in];
      const int64_t K = in.K, su = P * K + kSlicePad;
      su_in[i_in] = su;
      acc_t* U = U_in[i_in];
      // ---- 1. gather + input transform
      gather_transform<M, acc_t, scalar_t>(in, s0, s1, tiles_h, H, W, tiles_w, D.get(), U, su);
      }
      // ---- 2. + 3. per column block [n0, n0 + kBlockColumns) of M: the alpha² GEMMs [P, K_i] x
      // [K_i, block], both inputs' products summed in registers, then the output transform (+ bias)
      // of those channels of every tile: M stays a block (L1/L2-sized) instead of alpha² full slices.
      for (int64_t n0 = 0; n0 < std::min(N, Np); n0 += kBlockColumns) {
        int sg = 0;
        while (sg + 1 < j.segments && n0 >= j.seg[sg].m0 + j.seg[sg].n) ++sg;
        const winograd::Job::Segment& seg = j.seg[sg];
        for (int e = 0; e < A * A; ++e) {
          Operands<acc_t> ops[2];
          int n_ops = 0;
          for (int i = 0; i < j.inputs; ++i) {
            if (seg.v[i] < 0) continue;
            const int64_t K = j.in[i].K, column = seg.v[i] + (n0 - seg.m0);
            const acc_t* b = V_panels ? V_panels.get() + panel_offset[i] + ((column / kBlockColumns) * A * A + e) * K * kBlockColumns
                                      : static_cast<const acc_t*>(j.in[i].V) + e * j.in[i].sv + column;
            ops[n_ops++] = {U_in[i] + e * su_in[i], K, b, V_panels ? kBlockColumns : j.ldv, K};
          }
          gemm<acc_t>(ops, n_ops, kBlockColumns, Mm + e * sm, kBlockColumns, P);
        }
        const int64_t n1 = std::min(N, n0 + kBlockColumns);
        for (int64_t p = 0; p < P; ++p) {
          const acc_t* m0 = Mm + p * kBlockColumns;
          acc_t* o0 = out.get() + (p / tiles_w) * M * Wt * N + (p % tiles_w) * M * N;
          Sandwich<Mat::AT>::apply(m0, A * sm, sm, o0 + n0, Wt * N, N, n1 - n0, bias != nullptr ? bias + n0 : nullptr);
        }
      }
      // ---- 4. per strip: into the frames layout, to the gate kernel (or the output tensor)
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t b = s / tiles_h, y0 = (s % tiles_h) * M;
        const int64_t rows = std::min<int64_t>(M, H - y0);
        const acc_t* out_s = out.get() + (s - s0) * M * Wt * N;
        const int64_t pixels = rows * W;
        if (j.fn != nullptr) {
          Plane pl;
          pl.stride_b = pixels * N;
          pl.stride_c = j.channels_last ? 1 : pixels;
          pl.stride_p = j.channels_last ? N : 1;
          if (direct) {
            pl.data = const_cast<acc_t*>(out_s);
          } else if (j.pre_acc) {
            pl.data = pre_acc.get();
            emit_strip(out_s, Wt, W, rows, N, pre_acc.get(), pl.stride_c, pl.stride_p);
          } else {
            pl.data = pre.get();
            emit_strip(out_s, Wt, W, rows, N, pre.get(), pl.stride_c, pl.stride_p);
          }
          (*j.fn)(b, y0, rows, pl);
        } else {
          scalar_t* dst = static_cast<scalar_t*>(j.out.data) + b * j.out.stride_b + y0 * W * j.out.stride_p;
          if (j.tanh) {  // in place on the strip's fp32 rows, while they are in cache
            acc_t* o = out.get() + (s - s0) * M * Wt * N;
#pragma GCC ivdep
            for (int64_t i = 0; i < rows * Wt * N; ++i) o[i] = tanh_fast(o[i]);
          }
          if (j.split > 0) {  // channels [0, split) to out, the rest to out2 (pixel stride N in out_s)
            scalar_t* dst2 = static_cast<scalar_t*>(j.out2.data) + b * j.out2.stride_b + y0 * W * j.out2.stride_p;
            emit_strip_channels(out_s, Wt, W, rows, N, 0, j.split, dst, j.out.stride_c, j.out.stride_p);
            emit_strip_channels(out_s, Wt, W, rows, N, std::max(j.split, j.split2), N, dst2, j.out2.stride_c,
                                j.out2.stride_p);
          } else {
            emit_strip(out_s, Wt, W, rows, N, dst, j.out.stride_c, j.out.stride_p);
          }
        }
      }
    }
  });
}

}  // namespace

void winograd_conv_kernel(const winograd::Job& j) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, j.dtype, "winograd_conv_cpu", [&] {
    if (j.tile == 4) winograd_conv_impl<4, scalar_t>(j);
    else winograd_conv_impl<2, scalar_t>(j);
  });
}

// ---------------------------------------------------------------- weight gradient
// The transpose of the forward's three steps: per group of strips, the input transform U [alpha²,
// tiles, K] (as the forward's step 1), the output-gradient transform dM = A dY Aᵀ [alpha², tiles, Np]
// of each m x m gradient tile, and alpha² GEMMs dV[e] [K, Np] += U[e]ᵀ dM[e] summing over the tiles.
// The groups are split into a fixed number of chunks (one per thread): chunk 0 sums into the job's dV in
// place, chunk c > 0 into its own partial dV, and the partials are added after the parallel region in
// chunk order -- so the bits depend on the thread count only, never on which thread ran which chunk or
// when, and no chunk waits on another (a pool may run two chunks on one thread). With a bias gradient
// requested, the same pass sums the output gradient per channel (fp64).
namespace {

// C [K, ldc] += Uᵀ A-rows: C[k, :] += Σ_p u[p·ldu + k] b[p·ldb, :] over P rows of b; MR rows of C x 2
// vectors of accumulators, u broadcast (a tile's K values are contiguous), b streamed row by row.
template <typename T, int MR>
inline void gemm_tn_block(const T* u, int64_t ldu, const T* b, int64_t ldb, T* c, int64_t ldc, int64_t P,
                          const T* c_next, int64_t next_rows) {
  using V = typename VecOf<T>::type;
  constexpr int L = FASTVID_VEC_BYTES / sizeof(T);
  V acc0[MR], acc1[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    std::memcpy(&acc0[i], c + i * ldc, sizeof(V));
    std::memcpy(&acc1[i], c + i * ldc + L, sizeof(V));
  }
  for (int64_t p = 0; p < P; ++p) {
    if (p < next_rows) {  // one row of the next block's C per iteration (its 2 vectors)
      __builtin_prefetch(c_next + p * ldc, 1, 3);
      __builtin_prefetch(c_next + p * ldc + L, 1, 3);
    }
    V b0, b1;
    std::memcpy(&b0, b + p * ldb, sizeof(V));
    std::memcpy(&b1, b + p * ldb + L, sizeof(V));
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const V ai = broadcast(u + p * ldu + i);  // from memory: see broadcast()
      acc0[i] = fmadd(ai, b0, acc0[i]);
      acc1[i] = fmadd(ai, b1, acc1[i]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    std::memcpy(c + i * ldc, &acc0[i], sizeof(V));
    std::memcpy(c + i * ldc + L, &acc1[i], sizeof(V));
  }
}

template <typename T, int MR>
inline void gemm_tn_rows(int rows, const T* u, int64_t ldu, const T* b, int64_t ldb, T* c, int64_t ldc, int64_t P,
                         const T* c_next, int64_t next_rows) {
  if constexpr (MR > 0) {
    if (rows == MR) gemm_tn_block<T, MR>(u, ldu, b, ldb, c, ldc, P, c_next, next_rows);
    else gemm_tn_rows<T, MR - 1>(rows, u, ldu, b, ldb, c, ldc, P, c_next, next_rows);
  }
}

// C [K, ldb] += U [P, K]ᵀ (row stride ldu) x B [P, ldb], columns [0, n) rounded up to the column block
// (B's and C's rows hold them). C (a dV slice) is out of L2 at each call (a group's alpha² slices of dV
// are 1.2-4.7 MB), so each block prefetches the C rows of the block after it, one row per iteration of
// its own loop.
template <typename T>
void gemm_tn(const T* u, int64_t ldu, const T* b, int64_t ldb, T* c, int64_t K, int64_t P, int64_t n) {
  constexpr int64_t NR = 2 * FASTVID_VEC_BYTES / sizeof(T);
  for (int64_t n0 = 0; n0 < n; n0 += NR) {
    for_row_blocks(K, [&](int64_t k0, int rows) {
      const int64_t next_k = k0 + rows < K ? k0 + rows : 0, next_n = k0 + rows < K ? n0 : n0 + NR;
      const int64_t next_rows = next_n < n ? std::min<int64_t>(kRows, K - next_k) : 0;
      gemm_tn_rows<T, kRows>(rows, u + k0, ldu, b + n0, ldb, c + k0 * ldb + n0, ldb, P, c + next_k * ldb + next_n,
                             next_rows);
    });
  }
}

// One strip's output gradient rows (zero past H and W), channels innermost, in Gs [M, Wt, N]; its
// Winograd-domain dM = A dY Aᵀ per tile into Mm (tile p of the group at column offset p·Np, alpha²
// slices sm apart); db (when not null) += the rows' sums per channel, in fp64.
template <int M, typename acc_t, typename scalar_t>
void gradient_strip_transform(const winograd::WeightGradJob& j, int64_t b, int64_t y0, int64_t tiles_w,
                              int64_t first_tile, acc_t* Gs, acc_t* Mm, int64_t sm, double* db) {
  using Mat = winograd::Matrices<M>;
  constexpr int A = Mat::A;
  const int64_t N = j.N, H = j.H, W = j.W, Wt = tiles_w * M, Np = j.ldv;
  const scalar_t* g_b = static_cast<const scalar_t*>(j.grad) + b * j.gb;
  const int64_t rows = std::min<int64_t>(M, H - y0);
  for (int64_t r = 0; r < M; ++r) {
    acc_t* row = Gs + r * Wt * N;
    if (r >= rows) {
      std::fill(row, row + Wt * N, acc_t(0));
      continue;
    }
    gather_channels_inner(g_b + (y0 + r) * j.gy, j.gx, j.gc, W, N, row);
    std::fill(row + W * N, row + Wt * N, acc_t(0));
    if (db == nullptr) continue;
    for (int64_t x = 0; x < W; ++x)
#pragma GCC ivdep
      for (int64_t n = 0; n < N; ++n) db[n] += static_cast<double>(row[x * N + n]);
  }
  for (int64_t tx = 0; tx < tiles_w; ++tx)
    Sandwich<Mat::AT, true>::apply(Gs + tx * M * N, Wt * N, N, Mm + (first_tile + tx) * Np, A * sm, sm, N);
}

// Buffers of one worker of the weight gradient (not zero-filled: written before they are read).
template <typename acc_t>
struct WeightGradScratch {
  std::unique_ptr<acc_t[]> D, Gs, U, M;  // padded input rows, gradient rows of a strip, U and dM of a group
};

// dV [alpha², K + K2, Np] += U[e]ᵀ dM[e] over the tiles of the strips [s0, s1) (one group), U the
// input's (rows [0, K)) and the second input's (rows [K, K + K2)).
template <int M, typename acc_t, typename scalar_t>
void weight_grad_group(const winograd::WeightGradJob& j, int64_t s0, int64_t s1, int64_t tiles_h, int64_t tiles_w,
                       WeightGradScratch<acc_t>& buf, acc_t* dV, double* db) {
  constexpr int A = winograd::Matrices<M>::A;
  const int64_t K = j.in.K, K2 = j.in2.K, Kt = K + K2, N = j.N, Np = j.ldv;
  const int64_t P = (s1 - s0) * tiles_w;
  const int64_t su = P * K + kSlicePad, su2 = P * K2 + kSlicePad, sm = P * Np + kSlicePad;
  acc_t* U = buf.U.get();
  acc_t* U2 = U + A * A * su;
  acc_t* Mm = buf.M.get();
  if (N < Np)  // dM's columns >= N: zeros the GEMMs read (the transforms write columns < N)
    for (int e = 0; e < A * A; ++e)
      for (int64_t p = 0; p < P; ++p) std::fill(Mm + e * sm + p * Np + N, Mm + e * sm + (p + 1) * Np, acc_t(0));
  // 1. gather + input transform Bᵀ d B (the forward's step 1)
  gather_transform<M, acc_t, scalar_t>(j.in, s0, s1, tiles_h, j.H, j.W, tiles_w, buf.D.get(), U, su);
  if (K2 > 0) gather_transform<M, acc_t, scalar_t>(j.in2, s0, s1, tiles_h, j.H, j.W, tiles_w, buf.D.get(), U2, su2);
  // 2. per strip: the output gradient's transform dM = A dY Aᵀ
  for (int64_t s = s0; s < s1; ++s)
    gradient_strip_transform<M, acc_t, scalar_t>(j, s / tiles_h, (s % tiles_h) * M, tiles_w, (s - s0) * tiles_w,
                                                 buf.Gs.get(), Mm, sm, db);
  // 3. alpha² GEMMs dV[e] [K, Np] += U[e]ᵀ [K, P] dM[e] [P, Np] (and the second input's rows), over each
  // input's columns: from its begin rounded down to the GEMM's column block (to its end rounded up)
  constexpr int64_t NR = 2 * FASTVID_VEC_BYTES / sizeof(acc_t);
  int64_t c0[2], cn[2];
  for (int i = 0; i < 2; ++i) {
    c0[i] = j.columns[i][0] / NR * NR;
    cn[i] = j.columns[i][1] - c0[i];
  }
  for (int e = 0; e < A * A; ++e) {
    gemm_tn<acc_t>(U + e * su, K, Mm + e * sm + c0[0], Np, dV + e * Kt * Np + c0[0], K, P, cn[0]);
    if (K2 > 0)
      gemm_tn<acc_t>(U2 + e * su2, K2, Mm + e * sm + c0[1], Np, dV + (e * Kt + K) * Np + c0[1], K2, P, cn[1]);
  }
}

template <int M, typename scalar_t>
void winograd_weight_grad_impl(const winograd::WeightGradJob& j) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int A = winograd::Matrices<M>::A;
  const int64_t K = j.in.K + j.in2.K, K_max = std::max(j.in.K, j.in2.K), N = j.N, H = j.H, W = j.W, Np = j.ldv;
  const int64_t tiles_h = (H + M - 1) / M, tiles_w = (W + M - 1) / M;
  const int64_t Wt = tiles_w * M, Wp = Wt + 2;
  const int64_t strips = j.B * tiles_h;
  const int64_t per_group = winograd::strips_per_group(W, M);
  const int64_t groups = winograd::strip_groups(j.B, H, W, M);
  // chunk c of the groups sums into its own partial dV (chunk 0 into dV itself), zeroed at the buffer's
  // allocation and added in chunk order by winograd_weight_grad_total: the partials stay for the
  // whole backward (no per-call zero fill and reduction of alpha²·K·Np values per step).
  const int64_t chunks = at::in_parallel_region() ? 1 : j.chunks;
  std::vector<double> partial_db(j.db == nullptr ? 0 : (chunks - 1) * N, 0.0);

  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    const int64_t max_tiles = per_group * tiles_w;
    WeightGradScratch<acc_t> buf{scratch<acc_t>((per_group * M + 2) * Wp * K_max), scratch<acc_t>(M * Wt * N),
                                 scratch<acc_t>(A * A * (max_tiles * K + 2 * kSlicePad)),
                                 scratch<acc_t>(A * A * (max_tiles * Np + kSlicePad))};
    for (int64_t c = c0; c < c1; ++c) {
      acc_t* dV = static_cast<acc_t*>(j.dV) + c * j.chunk_stride;
      double* db = c == 0 || j.db == nullptr ? j.db : partial_db.data() + (c - 1) * N;
      for (int64_t grp = c * groups / chunks; grp < (c + 1) * groups / chunks; ++grp)
        weight_grad_group<M, acc_t, scalar_t>(j, grp * per_group, std::min(strips, (grp + 1) * per_group), tiles_h,
                                              tiles_w, buf, dV, db);
    }
  });
  if (j.db != nullptr)
    for (int64_t c = 1; c < chunks; ++c)
      for (int64_t n = 0; n < N; ++n) j.db[n] += partial_db[(c - 1) * N + n];
}

}  // namespace

// ---------------------------------------------------------------- weight transforms
// The k range [k0, k1) of transform_weights and transform_weight_grad (see there): fp64 loops with n
// innermost, compiled per ISA path so that they run at its vector width (built once for the baseline,
// two doubles per vector, they were ~3 % of a 2-thread small bf16 ConvGRU fwd+bwd).
template <int M, typename scalar_t, typename acc_t>
void transform_weight_rows(const scalar_t* src, const winograd::WeightPlacement& p, int64_t k0, int64_t k1,
                           acc_t* dst) {
  using Mat = winograd::Matrices<M>;
  constexpr int A = Mat::A;
  const int64_t N = p.N, C = N / p.gates;
  std::vector<double> wk(9 * N), Gw(A * 3 * N);  // w[·, k, i, j] and (G w)[a, j] of one k, n innermost
  for (int64_t k = k0; k < k1; ++k) {
    for (int i = 0; i < 3; ++i)
      for (int j = 0; j < 3; ++j)
        for (int64_t n = 0; n < N; ++n)
          wk[(i * 3 + j) * N + n] = static_cast<double>(src[n * p.sn + k * p.sk + i * p.si + j * p.sj]);
    for (int a = 0; a < A; ++a)
      for (int j = 0; j < 3; ++j) {
        double* row = Gw.data() + (a * 3 + j) * N;
        for (int64_t n = 0; n < N; ++n)
          row[n] = Mat::G[a][0] * wk[j * N + n] + Mat::G[a][1] * wk[(3 + j) * N + n] + Mat::G[a][2] * wk[(6 + j) * N + n];
      }
    for (int a = 0; a < A; ++a)
      for (int b = 0; b < A; ++b) {
        const double* g = Gw.data() + a * 3 * N;
        acc_t* row = dst + (a * A + b) * p.slice_stride + k * p.row_stride;
        if (p.fill) std::fill(row - p.col0, row - p.col0 + p.row_len, acc_t(0));
        for (int64_t gate = 0; gate < p.gates; ++gate)
          for (int64_t c = 0; c < C; ++c) {
            const int64_t n = gate * C + c;
            row[gate * p.Cp + c] =
                static_cast<acc_t>(g[n] * Mat::G[b][0] + g[N + n] * Mat::G[b][1] + g[2 * N + n] * Mat::G[b][2]);
          }
      }
  }
}

template <int M, typename scalar_t>
void transform_weight_grad_rows(const scalar_t* src, int64_t s0, int64_t s1, int64_t N, int64_t k0, int64_t k1,
                                double* dw) {
  using Mat = winograd::Matrices<M>;
  constexpr int A = Mat::A;
  std::vector<double> Gm(3 * A * N);  // (Gᵀ dV)[i, b] of one k, n innermost
  for (int64_t k = k0; k < k1; ++k) {
    for (int i = 0; i < 3; ++i)
      for (int b = 0; b < A; ++b) {
        double* row = Gm.data() + (i * A + b) * N;
        std::fill(row, row + N, 0.0);
        for (int a = 0; a < A; ++a) {
          const scalar_t* d = src + (a * A + b) * s0 + k * s1;
          for (int64_t n = 0; n < N; ++n) row[n] += Mat::G[a][i] * static_cast<double>(d[n]);
        }
      }
    for (int i = 0; i < 3; ++i)
      for (int j = 0; j < 3; ++j) {
        double* out = dw + ((k * 3 + i) * 3 + j) * N;
        std::fill(out, out + N, 0.0);
        for (int b = 0; b < A; ++b) {
          const double* g = Gm.data() + (i * A + b) * N;
          for (int64_t n = 0; n < N; ++n) out[n] += g[n] * Mat::G[b][j];
        }
      }
  }
}

void winograd_weight_grad_kernel(const winograd::WeightGradJob& j) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, j.dtype, "winograd_weight_grad_cpu", [&] {
    if (j.tile == 4) winograd_weight_grad_impl<4, scalar_t>(j);
    else winograd_weight_grad_impl<2, scalar_t>(j);
  });
}

}  // namespace FASTVID_ISA
}  // namespace recurrent
}  // namespace fastvid
#endif  // FASTVID_ISA
