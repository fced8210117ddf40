// ConvLSTM / ConvGRU ops: argument checks, buffers and the time loops. Device-generic: the
// convolutions go through ATen (oneDNN on CPU, cuDNN on CUDA) and the fused gate kernels are
// picked by device (recurrent_cpu.cpp / recurrent_cuda.cu). Registered for CPU and CUDA.
//
// Sequence ops take x as [B, T, C_in, H, W] (any strides) and run one layer in one direction.
// Strategies (see fastvid/ops/recurrent.py for how one is chosen):
//   kHoisted: the input conv runs over the B·chunk frames of a chunk of steps at a time; per step one
//             hidden conv and one fused gate kernel (the cuDNN RNN design).
//   kConcat:  two [x_t, h_{t-1}] buffers [B, C_in + C, H, W] used in turn; per step one conv over one,
//             and the gate kernel writes h straight into the other (no cat).
//   kWinograd: CPU, 3x3, dilation 1: every conv a Winograd F(2x2, 3x3) (bf16/fp16: F(4x4, 3x3);
//             winograd_tile in recurrent_winograd.h) with the
//             weights transformed once per call and the gate kernel run per conv output strip; LSTM
//             sums the x and h convs of a step in the Winograd domain, so does GRU in the nn.GRU form
//             (x_n and h_n kept apart), the Ballas GRU hoists the x conv (chunked as kHoisted's);
//             backward: every input-gradient conv Winograd (LSTM: per step one over d_gates for
//             [grad_x_t, dh], as kConcat's), so are the recomputes of g / h_n (see the reserve), the
//             weight gradients summed over the chunks in the Winograd domain and transformed back once.
// With save=True the forward fills the reserve (activated gates, LSTM cell states; see below).
// Backward walks the steps in reverse, per step one fused gate-backward kernel and one input-gradient
// conv; the weight (and bias) gradients come from one batched conv backward per chunk of steps, whose
// [x_t, h_{t-1}] inputs are rebuilt from x and output.
// lengths (optional, variable-length batches): the gate kernels' StepMask (recurrent_kernels.h) makes
// a sample's steps past its length the identity on its state, in every strategy and direction.
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

// ======================================================================== reserve and chunks
// What backward needs of a forward call (save=True) lives in one uint8 buffer per call, the reserve
// (cuDNN's RNN reserve space): regions of time-major frames [T, B, channels, H, W] in the sequence's
// frame layout (or one [channels] vector), each starting on a 64-byte boundary.
//   LSTM: the activated gates i, f, o (3C, x's dtype), the cell states (C, accumulation type) and the
//         g-gate bias (a [C] vector: the backward op is not given the bias). g = tanh(W_g*[x_t, h_{t-1}]
//         + b_g) is recomputed in backward, one C-output conv per chunk over the [x_t, h_{t-1}] frames
//         the weight gradients need anyway: a fifth of the per-frame state for a quarter of a step's
//         forward conv. bf16 keeps g instead (4C gates) and saves the cell states in bf16 too (the
//         forward still carries them in fp32 from step to step): the same 10C bytes per pixel and step,
//         no recompute (it was ~8 % of a small bf16 ConvLSTM fwd+bwd at two threads), the cell states
//         rounded like the gates beside them. fp16 does not: its range cannot hold every fp32 cell state.
//   GRU:  r, z, n (3C, x's dtype). reset_after's h_n = U_n*h_{t-1} + b_hn (needed only for d r) is
//         recomputed per chunk (one C-output conv of h) in fp32/fp64, and kept (C more, a region of
//         its own) in bf16/fp16, whose 2-byte frames leave room under issue 12's memory bound (the
//         recompute was ~6 % of a small bf16 ConvGRU fwd+bwd; kept in fp32 it would lift that
//         layer's peak from ~0.70x to ~0.80x native's); the Ballas backward does not read h_n.
// Nothing else is kept: the [x_t, h_{t-1}] inputs of the weight gradients are rebuilt from x and output
// chunk by chunk. Mirrored by reserve_bytes in fastvid/ops/recurrent.py (the fake kernels).
constexpr int64_t kReserveAlign = 64;

struct ReserveRegion {
  at::ScalarType dtype;
  int64_t channels;
  bool per_frame = true;  // false: one [channels] vector
};

int64_t region_numel(const SeqGeometry& g, const ReserveRegion& r) {
  return r.per_frame ? g.T * g.B * r.channels * g.H * g.W : r.channels;
}

int64_t region_bytes(const SeqGeometry& g, const ReserveRegion& r) {
  const int64_t bytes = region_numel(g, r) * static_cast<int64_t>(c10::elementSize(r.dtype));
  return (bytes + kReserveAlign - 1) / kReserveAlign * kReserveAlign;
}

bool lstm_keeps_g(at::ScalarType dtype) { return dtype == at::kBFloat16; }

std::vector<ReserveRegion> lstm_reserve(const SeqGeometry& g, at::ScalarType dtype) {
  if (lstm_keeps_g(dtype)) return {{dtype, 4 * g.C}, {dtype, g.C}};
  return {{dtype, 3 * g.C}, {acc_type(dtype), g.C}, {dtype, g.C, false}};
}

// Where gate k (i, f, g, o) of the LSTM lives in the reserve's gate frames: 4C frames in gate order when
// g is kept, else 3C frames i, f, o with g (-1) recomputed.
int lstm_saved_slot(int k, bool keeps_g) {
  constexpr int kWithoutG[4] = {0, 1, -1, 2};
  return keeps_g ? k : kWithoutG[k];
}

bool gru_keeps_hn(at::ScalarType dtype, bool reset_after) { return reset_after && c10::elementSize(dtype) == 2; }

std::vector<ReserveRegion> gru_reserve(const SeqGeometry& g, at::ScalarType dtype, bool reset_after) {
  if (gru_keeps_hn(dtype, reset_after)) return {{dtype, 3 * g.C}, {dtype, g.C}};
  return {{dtype, 3 * g.C}};
}

int64_t reserve_bytes(const SeqGeometry& g, const std::vector<ReserveRegion>& regions) {
  int64_t bytes = 0;
  for (const auto& r : regions) bytes += region_bytes(g, r);
  return bytes;
}

// The regions of `reserve` as [T, B, channels, H, W] frames.
std::vector<Tensor> reserve_views(const Tensor& reserve, const SeqGeometry& g,
                                  const std::vector<ReserveRegion>& regions) {
  std::vector<Tensor> views;
  int64_t offset = 0;
  for (const auto& r : regions) {
    const int64_t n = region_numel(g, r);
    const Tensor flat_view = reserve.narrow(0, offset, n * static_cast<int64_t>(c10::elementSize(r.dtype))).view(r.dtype);
    if (!r.per_frame) views.push_back(flat_view);
    else views.push_back(g.channels_last ? flat_view.view({g.T, g.B, g.H, g.W, r.channels}).permute({0, 1, 4, 2, 3})
                                         : flat_view.view({g.T, g.B, r.channels, g.H, g.W}));
    offset += region_bytes(g, r);
  }
  return views;
}

Tensor new_reserve(bool save, const SeqGeometry& g, const std::vector<ReserveRegion>& regions,
                   const at::TensorOptions& opts) {
  Tensor reserve = cpu_block_cache::empty({save ? reserve_bytes(g, regions) : 0}, opts.dtype(at::kByte));
  if (!save) return reserve;
  // Zero the alignment padding after each region, so the op's output is fully defined (opcheck and
  // compiled graphs compare it byte for byte).
  int64_t offset = 0;
  for (const auto& r : regions) {
    const int64_t used = region_numel(g, r) * static_cast<int64_t>(c10::elementSize(r.dtype));
    const int64_t padded = region_bytes(g, r);
    if (padded > used) reserve.narrow(0, offset + used, padded - used).zero_();
    offset += padded;
  }
  return reserve;
}

void check_reserve(const char* op, const Tensor& reserve, const SeqGeometry& g,
                   const std::vector<ReserveRegion>& regions, const Tensor& x) {
  // What the forward op returned with save=True for the same arguments.
  check_arg(op, "reserve", reserve, {reserve_bytes(g, regions)}, x, "x", at::kByte);
  TORCH_CHECK_VALUE(reserve.is_contiguous(), op, ": reserve must be contiguous (as the forward op returns it)");
}

// Steps per chunk: the hoisted input convolution (forward) and the batched weight gradients (backward,
// through backward_chunk_steps) run over the B * chunk frames of consecutive steps, so their outputs,
// gradients and the convolutions' internal copies exist for one chunk instead of the whole sequence.
int64_t chunk_steps(int64_t T) { return std::max<int64_t>(1, T / 16); }

// Steps per chunk of the backward's batched weight gradients. Winograd: chunk_steps (one-step chunks read each
// step's conv inputs in place). The oneDNN strategies (hoisted, concat): at least two steps, their weight-gradient
// convs then run over 2·B frames instead of B. Intel Xeon (AVX-512 + AMX), bf16 autocast, two threads, same-process
// A/Bs (order shuffled, medians of 8-10), fwd+bwd: ConvGRU B=4 T=8 C=32 32^2 16.5 -> 15.7 and 15.7 -> 14.9 ms,
// ConvLSTM same 15.4 -> 14.5 and 18.9 -> 18.3, ConvLSTM B=8 T=16 C=64 181.8 -> 174.4 and 190.6 -> 184.0; with
// `hoisted` forced (B=4 T=8, medians of 10): bf16 ConvLSTM 17.3 -> 16.3 and ConvGRU 15.3 -> 13.8 ms, fp32 65.7 ->
// 64.0 and 49.6 -> 49.4. The cost, one more step of gate gradients and conv inputs: peak memory (profiler, warm)
// 14.0 -> 16.5, 16.4 -> 17.9 and 110.7 -> 116.7 MiB (native's 25.5, 25.4, 212.0). Four steps ran faster still at T
// = 8 but the ConvGRU's step then took 21.5 MiB, above 0.8x native's; fp32 Winograd ran 2-20 % slower with any
// chunk above one.
int64_t backward_chunk_steps(int64_t T, int64_t strategy) {
  return strategy == kWinograd ? chunk_steps(T) : std::min<int64_t>(T, std::max<int64_t>(2, chunk_steps(T)));
}

// A bias in the accumulation type of dtype, for a time loop's Winograd convs: converted once per call
// (the convs would otherwise convert it at every step, an ATen op each).
OptTensor winograd_bias(const OptTensor& bias, at::ScalarType dtype) {
  if (!bias.has_value()) return std::nullopt;
  return bias->to(acc_type(dtype)).contiguous();
}

// The chunk [t0, t0 + n) of `chunk` steps that holds time t.
std::pair<int64_t, int64_t> chunk_of(int64_t t, int64_t chunk, int64_t T) {
  const int64_t t0 = t / chunk * chunk;
  return {t0, std::min(chunk, T - t0)};
}

// Frames [t0, t0 + n) of batch-first x, copied time-major into dst [>= n, B, C, H, W].
void copy_time_major(Tensor dst, const Tensor& x, int64_t t0, int64_t n) {
  dst.narrow(0, 0, n).copy_(x.narrow(1, t0, n).transpose(0, 1));
}

// The forward's hoisted input conv, one chunk of steps at a time: gates(t) is step t's [B, gates, H, W]
// frame of the chunk's conv output; when t leaves the current chunk, that chunk's x frames are copied
// time-major and conv_frames runs over its n·B frames.
class HoistedInput {
 public:
  HoistedInput(const Tensor& x, const SeqGeometry& g, const at::TensorOptions& opts)
      : x_(x), chunk_(chunk_steps(g.T)), x_chunk_(empty_frames({chunk_, g.B}, g.Cin, g.H, g.W, g.channels_last, opts)) {}

  template <typename ConvFrames>
  Tensor gates(int64_t t, const ConvFrames& conv_frames) {
    const auto [t0, n] = chunk_of(t, chunk_, x_.size(1));
    if (t0 != start_) {
      start_ = t0;
      copy_time_major(x_chunk_, x_, t0, n);
      x_gates_ = Tensor();  // free the previous chunk's before the conv allocates
      const Tensor out = conv_frames(flat(x_chunk_.narrow(0, 0, n)));
      x_gates_ = out.view({n, x_.size(0), out.size(1), out.size(2), out.size(3)});
    }
    return x_gates_.select(0, t - start_);
  }

 private:
  Tensor x_;
  int64_t chunk_, start_ = -1;
  Tensor x_chunk_, x_gates_;
};

// dst[:n] = the state entering the steps [t0, t0 + n): frame t - 1 (forward) or t + 1 (reverse) of the
// sequence `all` ([B, T, ...] batch-first when time_dim = 1, time-major when 0), `first` at the first step.
void copy_previous(Tensor dst, const Tensor& all, int64_t time_dim, const Tensor& first, int64_t t0, int64_t n,
                   bool reverse) {
  const int64_t T = all.size(time_dim);
  const auto frames = [&](int64_t start, int64_t len) {
    const Tensor v = all.narrow(time_dim, start, len);
    return time_dim == 1 ? v.transpose(0, 1) : v;
  };
  if (!reverse) {
    const int64_t skip = t0 == 0 ? 1 : 0;
    if (skip) dst.select(0, 0).copy_(first);
    if (n > skip) dst.narrow(0, skip, n - skip).copy_(frames(t0 + skip - 1, n - skip));
  } else {
    const int64_t last = t0 + n == T ? 1 : 0;
    if (last) dst.select(0, n - 1).copy_(first);
    if (n > last) dst.narrow(0, 0, n - last).copy_(frames(t0 + 1, n - last));
  }
}

// The state entering step t without a copy: frame t - 1 (reverse: t + 1) of `all` [B, T, ...], `first`
// at the first step.
Tensor previous_frame(const Tensor& all, const Tensor& first, int64_t t, bool reverse) {
  const int64_t prev = reverse ? t + 1 : t - 1;
  return prev < 0 || prev >= all.size(1) ? first : all.select(1, prev);
}

// copy_previous of the hidden state with lengths: in reverse, sample b's first step t = lengths[b] - 1
// (and its masked steps after it) start from h0, not from the zero output of step t + 1. The per-chunk
// form of previous_state (recurrent_sequence.h); dst [n, B, C, H, W] holds the steps [t0, t0 + n).
void copy_previous_hidden(Tensor dst, const Tensor& output, const Tensor& h0, int64_t t0, int64_t n, bool reverse,
                          const Tensor& lengths) {
  copy_previous(dst, output, 1, h0, t0, n, reverse);
  if (!reverse || !lengths.defined()) return;
  const Tensor from_h0 = at::arange(t0 + 1, t0 + n + 1, lengths.options()).unsqueeze(1).ge(lengths.unsqueeze(0));
  dst.copy_(at::where(from_h0.view({n, h0.size(0), 1, 1, 1}), h0.unsqueeze(0), dst));
}

// An initial state as the kernels and copies read it: in `dtype` and the frame format; a state that is
// one value broadcast over [B, C, H, W] (every stride 0, e.g. the default zeros of fastvid.ops) stays
// unmaterialised: a [B, C, H, W] view with strides 0 of max(C, H*W) copies of the value, which the
// kernels read as a broadcast plane (recurrent_kernels.h) and copy_ / where broadcast.
Tensor initial_state(const Tensor& s, at::ScalarType dtype, at::MemoryFormat fmt) {
  const auto strides = s.strides();
  if (s.numel() == 0 || std::any_of(strides.begin(), strides.end(), [](int64_t st) { return st != 0; }))
    return s.to(dtype).contiguous(fmt);
  const int64_t n = std::max(s.size(1), s.size(2) * s.size(3));
  const Tensor values = s.reshape({-1}).narrow(0, 0, 1).to(dtype).expand({n}).contiguous();
  return values.as_strided(s.sizes(), {0, 0, 0, 0});
}

// ======================================================================== LSTM
// [3, C] peephole gradient: Σ over batch, time, pixels of d a_i·c_prev, d a_f·c_prev, d a_o·c
// (all arguments [n, B, ., H, W]).
// Summed in c_prev's type (the accumulation type; c may be the bf16 reserve's).
Tensor peephole_grad(const Tensor& d_gates, const Tensor& c_prev, const Tensor& c) {
  const int64_t C = c.size(2);
  const Tensor dg = d_gates.to(c_prev.scalar_type()), c_acc = c.to(c_prev.scalar_type());
  const std::vector<int64_t> dims = {0, 1, 3, 4};
  return at::stack({(dg.narrow(2, 0, C) * c_prev).sum(dims), (dg.narrow(2, C, C) * c_prev).sum(dims),
                    (dg.narrow(2, 3 * C, C) * c_acc).sum(dims)});
}

std::tuple<Tensor, Tensor, Tensor, Tensor> convlstm_sequence(
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
  const bool hoisted = strategy == kHoisted;

  Tensor output = empty_frames({B, T}, C, H, W, g.channels_last, opts);
  const auto regions = lstm_reserve(g, x.scalar_type());
  Tensor reserve = new_reserve(save, g, regions, opts);
  // save: the reserve's [T, B, 3C] activated i, f, o and [T, B, C] cell states; g goes to a scratch frame
  // (backward recomputes it) and the g-gate bias into the reserve. bf16 (keeps_g): [T, B, 4C] i, f, g, o
  // and the cell states in bf16, written beside the fp32 state carried in two frames used in turn.
  const bool keeps_g = save && lstm_keeps_g(x.scalar_type());
  Tensor gates, cells, g_scratch, c_steps;
  if (save) {
    const auto views = reserve_views(reserve, g, regions);
    gates = views[0], cells = views[1];
    if (keeps_g) {
      c_steps = empty_frames({2, B}, C, H, W, g.channels_last, acc_opts);
    } else {
      if (bias.has_value()) views[2].copy_(bias->narrow(0, 2 * C, C));
      else views[2].zero_();
      g_scratch = empty_like_frame(g, C, opts);
    }
  }
  Tensor c_init = initial_state(c0, acc_type(x.scalar_type()), fmt);
  Tensor c_run = save ? Tensor() : empty_like_frame(g, C, acc_opts).copy_(c0);
  Tensor h_n = empty_like_frame(g, C, opts);
  Tensor zeros = zeros_for_planes(C, H, W, opts);
  Tensor peep = peephole.has_value() ? peephole->to(acc_opts.dtype()).contiguous() : Tensor();

  LstmForwardArgs a;
  a.geo = {B, C, H * W, x.scalar_type()};
  a.peephole = peep.defined() ? peep.data_ptr() : nullptr;
  a.save = save;

  // hoisted: the input conv of one chunk of steps at a time (HoistedInput).
  // concat: two [x_t, h_{t-1}] slots used in turn; the gate kernel writes h into the next step's.
  // winograd: per step the x and h convs summed in the Winograd domain, the gate kernel per strip.
  const bool wino = strategy == kWinograd;
  // winograd's first hidden conv reads h0 with any strides: a broadcast zero h0 stays unmaterialised
  const Tensor h0_state = wino ? initial_state(h0, x.scalar_type(), fmt) : Tensor();
  std::optional<HoistedInput> hoist;
  Tensor h_buf, slots, w_cat, v_ih, v_hh;
  const OptTensor bias_wino = wino ? winograd_bias(bias, x.scalar_type()) : std::nullopt;
  if (wino) {
    v_ih = winograd_weights(weight_ih);
    v_hh = winograd_weights(weight_hh);
  } else if (hoisted) {
    hoist.emplace(x, g, opts);
    h_buf = empty_like_frame(g, C, opts).copy_(h0);
  } else {
    slots = empty_frames({2, B}, Cin + C, H, W, g.channels_last, opts);
    slots.select(0, 0).narrow(1, Cin, C).copy_(h0);
    w_cat = at::cat({weight_ih, weight_hh}, 1);
  }
  // Per-step conv outputs the planes point into. Declared outside the loop so the previous step's
  // buffer is still alive while the next conv allocates: malloc then alternates two blocks instead of
  // returning a large block to the OS and page-faulting it back every step.
  Tensor h_gates, gates_pre;
  for (int64_t f = 0; f < T; ++f) {
    const int64_t t = time_of(f, T, reverse);
    const bool last = f == T - 1;
    if (wino) {
      for (int k = 0; k < 4; ++k) a.a_h[k] = zero_plane(zeros);  // a_x: per conv strip
      a.h_out2 = plane(last ? h_n : output.select(1, t));
    } else if (hoisted) {
      const Tensor x_gates_t = hoist->gates(t, [&](const Tensor& frames) { return conv(frames, weight_ih, bias, g); });
      h_gates = conv(h_buf, weight_hh, std::nullopt, g);
      for (int k = 0; k < 4; ++k) {
        a.a_x[k] = slot(x_gates_t, k, C);
        a.a_h[k] = slot(h_gates, k, C);
      }
      a.h_out2 = plane(last ? h_n : h_buf);
      a.h_prev = plane(h_buf);
    } else {
      const Tensor slot_t = slots.select(0, f % 2);
      slot_t.narrow(1, 0, Cin).copy_(x.select(1, t));
      gates_pre = conv(slot_t, w_cat, bias, g);
      a.h_prev = plane(slot_t.narrow(1, Cin, C));
      for (int k = 0; k < 4; ++k) {
        a.a_x[k] = slot(gates_pre, k, C);
        a.a_h[k] = zero_plane(zeros);
      }
      a.h_out2 = plane(last ? h_n : slots.select(0, (f + 1) % 2).narrow(1, Cin, C));
    }
    a.h_out = plane(output.select(1, t));
    if (!save) {
      a.c_prev = a.c_out = plane(c_run);
    } else if (keeps_g) {
      a.c_prev = plane(f == 0 ? c_init : c_steps.select(0, (f - 1) % 2));
      a.c_out = plane(c_steps.select(0, f % 2));
      a.c_save = plane(cells.select(0, t));
    } else {
      a.c_prev = plane(f == 0 ? c_init : cells.select(0, time_of(f - 1, T, reverse)));
      a.c_out = plane(cells.select(0, t));
    }
    for (int k = 0; k < 4 && save; ++k) {
      const int s = lstm_saved_slot(k, keeps_g);
      a.gates_out[k] = s < 0 ? plane(g_scratch) : slot(gates.select(0, t), s, C);
    }
    a.mask = step_mask(lengths_d, t);
    if (wino)
      winograd_lstm_step(a, x.select(1, t), v_ih, bias_wino,
                         f == 0 ? h0_state : output.select(1, time_of(f - 1, T, reverse)), v_hh, g);
    else FASTVID_LAUNCH(lstm_forward, a, x.device());
  }
  Tensor c_n = keeps_g ? c_steps.select(0, (T - 1) % 2).clone()
                : save    ? cells.select(0, time_of(T - 1, T, reverse)).clone()
                          : c_run;
  return {output, h_n, c_n, reserve};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> convlstm_sequence_backward(
    const OptTensor& grad_output, const OptTensor& grad_h_n, const OptTensor& grad_c_n, const Tensor& x,
    const Tensor& weight_ih, const Tensor& weight_hh, bool has_bias, const Tensor& h0, const Tensor& c0,
    const OptTensor& peephole, const Tensor& output, const Tensor& reserve, at::IntArrayRef padding,
    at::IntArrayRef dilation, bool reverse, int64_t strategy, bool channels_last, const OptTensor& lengths) {
  const char* op = "fastvid.convlstm_sequence_backward";
  const SeqGeometry g = check_sequence(op, x, weight_ih, weight_hh, h0, 4, padding, dilation, strategy, channels_last);
  if (strategy == kWinograd) check_winograd(op, x, weight_hh, g, lengths);
  const Tensor lengths_d = check_lengths(op, lengths, g, x);
  const auto regions = lstm_reserve(g, x.scalar_type());
  {
    const int64_t B = g.B, T = g.T, C = g.C, H = g.H, W = g.W;
    check_state(op, "c0", c0, g, x);
    check_optional_arg(op, "peephole", peephole, {3, C}, x, "x", std::nullopt);
    check_optional_arg(op, "grad_output", grad_output, {B, T, C, H, W}, x, "x", x.scalar_type());
    check_optional_arg(op, "grad_h_n", grad_h_n, {B, C, H, W}, x, "x", std::nullopt);
    check_optional_arg(op, "grad_c_n", grad_c_n, {B, C, H, W}, x, "x", std::nullopt);
    check_arg(op, "output", output, {B, T, C, H, W}, x, "x", x.scalar_type());
    check_reserve(op, reserve, g, regions, x);
  }
  const c10::DeviceGuard guard(x.device());
  const int64_t B = g.B, T = g.T, C = g.C, Cin = g.Cin, H = g.H, W = g.W;
  const auto opts = x.options();
  const auto acc_opts = opts.dtype(acc_type(x.scalar_type()));
  const auto fmt = frame_format(g.channels_last);
  // winograd: per step one Winograd conv of d_gates gives [grad_x_t, dh] (as concat's oneDNN one), and
  // the weight gradient is summed in the Winograd domain over the chunks, transformed back once.
  const bool wino = strategy == kWinograd;
  const bool hoisted = strategy == kHoisted;
  const auto views = reserve_views(reserve, g, regions);
  // gates: i, f, o, or i, f, g, o in bf16 (lstm_saved_slot); cells: the acc type's, or bf16's with g kept
  const bool keeps_g = lstm_keeps_g(x.scalar_type());
  const Tensor &gates = views[0], &cells = views[1];
  const Tensor bias_g = keeps_g ? Tensor() : views[2];

  const Tensor zeros = zeros_for_planes(C, H, W, opts);
  const Tensor g_out = grad_output.has_value() ? to_frames_layout(*grad_output, g.channels_last) : Tensor();
  const Tensor c_init = initial_state(c0, cells.scalar_type(), fmt);  // read as the saved cell states are
  Tensor dc = grad_c_n.has_value() ? grad_c_n->to(acc_opts.dtype()).contiguous(fmt).clone()
                                   : empty_like_frame(g, C, acc_opts).zero_();
  Tensor dh_rec = grad_h_n.has_value() ? grad_h_n->to(x.scalar_type()).contiguous(fmt) : Tensor();
  Tensor peep = peephole.has_value() ? peephole->to(acc_opts.dtype()).contiguous() : Tensor();
  const Tensor h0_l = initial_state(h0, x.scalar_type(), fmt);
  const Tensor w_cat = at::cat({weight_ih, weight_hh}, 1);
  const Tensor v_cat_grad = wino ? winograd_input_grad_weights(w_cat) : Tensor();
  Tensor dV_cat =
      wino ? winograd_weight_grad_buffer(Cin + C, 4 * C, x.scalar_type(), B * chunk_steps(T), H, W) : Tensor();
  Tensor db_acc = wino && has_bias ? at::zeros({4 * C}, opts.dtype(at::kDouble)) : Tensor();  // winograd: the bias gradient
  Tensor grad_x = empty_frames({B, T}, Cin, H, W, g.channels_last, opts);

  // Chunk by chunk of consecutive steps (in reverse): the d(pre-activation gates) of the chunk's steps
  // and their conv inputs [x_t, h_{t-1}] (rebuilt from x and output), then one batched weight (and bias)
  // gradient over the chunk, accumulated; hoisted also gets the chunk's grad_x in one conv.
  const int64_t chunk = backward_chunk_steps(T, strategy);
  Tensor d_gates = empty_frames({chunk, B}, 4 * C, H, W, g.channels_last, opts);
  // winograd with one-step chunks (T < 32): the step's conv inputs x_t and h_{t-1} are read where they
  // are (x, and the output or h0; winograd takes no lengths) instead of copied into `inputs`; the g
  // recompute and the weight gradient take them as two inputs.
  const bool in_place_inputs = wino && chunk == 1;
  Tensor inputs = in_place_inputs ? Tensor() : empty_frames({chunk, B}, Cin + C, H, W, g.channels_last, opts);
  Tensor x_step, h_step;  // in_place_inputs: the current step's x_t and h_{t-1} ([B, ., H, W] views)
  Tensor dh_buf = wino ? empty_like_frame(g, C, opts) : Tensor();  // winograd: each step's dh from its conv
  Tensor grad_w_cat, grad_bias, grad_peephole;
  Tensor g_chunk;  // the chunk's recomputed g gates [n, B, C] (not in the reserve; none with keeps_g)
  const Tensor w_g = w_cat.narrow(0, 2 * C, C);
  const bool wino_g = wino && !keeps_g;  // winograd: the g recompute a Winograd conv too
  const Tensor v_g = wino_g ? winograd_weights(w_g) : Tensor();
  const OptTensor bias_g_wino = wino_g ? winograd_bias(bias_g, x.scalar_type()) : std::nullopt;
  const auto add_to = [](Tensor& sum, const Tensor& term) { sum = sum.defined() ? sum.add_(term) : term; };
  int64_t chunk_start = -1, chunk_len = 0;
  const auto load_chunk = [&](int64_t t0, int64_t n) {
    g_chunk = Tensor();  // free the previous chunk's before the conv allocates
    if (in_place_inputs) {
      x_step = x.select(1, t0);
      h_step = previous_frame(output, h0_l, t0, reverse);
      if (keeps_g) return;
      g_chunk = winograd_conv2(x_step, v_g.narrow(1, 0, Cin), h_step, v_g.narrow(1, Cin, C), bias_g_wino, g,
                               /*tanh=*/true)
                    .view({1, B, C, H, W});
      return;
    }
    copy_time_major(inputs.narrow(2, 0, Cin), x, t0, n);
    copy_previous_hidden(inputs.narrow(2, Cin, C), output, h0_l, t0, n, reverse, lengths_d);
    if (keeps_g) return;
    const Tensor frames = flat(inputs.narrow(0, 0, n));
    g_chunk = (wino ? winograd_conv(frames, v_g, bias_g_wino, g, /*tanh=*/true) : conv(frames, w_g, bias_g, g).tanh_())
                  .view({n, B, C, H, W});
  };
  const auto flush_chunk = [&](int64_t t0, int64_t n) {
    const Tensor d = flat(d_gates.narrow(0, 0, n));
    const Tensor in = in_place_inputs ? Tensor() : inputs.narrow(0, 0, n);
    if (in_place_inputs) {
      winograd_weight_grad_add(dV_cat, x_step, d, has_bias ? &db_acc : nullptr, &h_step);
    } else if (wino) {
      winograd_weight_grad_add(dV_cat, flat(in), d, has_bias ? &db_acc : nullptr);
    } else {
      auto [gw, gb] = conv_weight_grad(d, flat(in), w_cat, has_bias, g);
      add_to(grad_w_cat, gw);
      if (has_bias) add_to(grad_bias, gb);
    }
    if (hoisted) {
      const Tensor gx = conv_input_grad(d, flat(in.narrow(2, 0, Cin)), weight_ih, g);
      grad_x.narrow(1, t0, n).copy_(gx.view({n, B, Cin, H, W}).transpose(0, 1));
    }
    if (peephole.has_value()) {
      Tensor c_prev = empty_frames({n, B}, C, H, W, g.channels_last, acc_opts);
      copy_previous(c_prev, cells, 0, c_init, t0, n, reverse);
      add_to(grad_peephole, peephole_grad(d_gates.narrow(0, 0, n), c_prev, cells.narrow(0, t0, n)));
    }
  };

  LstmBackwardArgs a;
  a.geo = {B, C, H * W, x.scalar_type()};
  a.peephole = peep.defined() ? peep.data_ptr() : nullptr;
  a.cells_in_dtype = keeps_g;
  // lengths: the state gradient masked samples pass straight to the previous step.
  const Tensor dh_skip = lengths_d.defined() ? empty_like_frame(g, C, opts) : Tensor();
  if (dh_skip.defined()) a.dh_prev_out = plane(dh_skip);
  for (int64_t f = T - 1; f >= 0; --f) {
    const int64_t t = time_of(f, T, reverse);
    const auto [t0, n] = chunk_of(t, chunk, T);
    if (t0 != chunk_start) {
      if (chunk_start >= 0) flush_chunk(chunk_start, chunk_len);
      chunk_start = t0, chunk_len = n;
      load_chunk(t0, n);
    }
    a.dh_in[0] = g_out.defined() ? plane(g_out.select(1, t)) : zero_plane(zeros);
    a.dh_in[1] = dh_rec.defined() ? plane(dh_rec) : zero_plane(zeros);
    a.dh_in[2] = zero_plane(zeros);
    a.dc_in = plane(dc);
    a.dc_prev_out = plane(dc);
    const Tensor gates_t = gates.select(0, t);
    const Tensor d_gates_t = d_gates.select(0, t - t0);
    for (int k = 0; k < 4; ++k) {
      const int s = lstm_saved_slot(k, keeps_g);
      a.gates[k] = s < 0 ? plane(g_chunk.select(0, t - t0)) : slot(gates_t, s, C);
      a.d_gates_out[k] = slot(d_gates_t, k, C);
    }
    a.c_prev = plane(f == 0 ? c_init : cells.select(0, time_of(f - 1, T, reverse)));
    a.c = plane(cells.select(0, t));
    a.mask = step_mask(lengths_d, t);
    FASTVID_LAUNCH(lstm_backward, a, x.device());
    if (wino) {  // [grad_x_t, dh] from one conv, grad_x_t straight into its frame; dh_buf was read above
      winograd_conv_split_out(d_gates_t, v_cat_grad, g, grad_x.select(1, t), dh_buf);
      dh_rec = dh_buf;
    } else if (hoisted) {
      dh_rec = conv_input_grad(d_gates_t, inputs.select(0, t - t0).narrow(1, Cin, C), weight_hh, g);
    } else {
      const Tensor d_inputs = conv_input_grad(d_gates_t, inputs.select(0, t - t0), w_cat, g);
      grad_x.select(1, t).copy_(d_inputs.narrow(1, 0, Cin));
      dh_rec = d_inputs.narrow(1, Cin, C);
    }
    if (dh_skip.defined()) dh_rec.add_(dh_skip);
  }
  flush_chunk(chunk_start, chunk_len);
  if (wino) grad_w_cat = winograd_weight_grad_finish(winograd_weight_grad_total(dV_cat), weight_ih.scalar_type());
  if (wino && has_bias) grad_bias = db_acc.to(x.scalar_type());
  // Not hoisted, dh_rec is a view into the last [grad_x_t, dh] conv output: the output gets its own storage.
  Tensor grad_h0 = hoisted ? dh_rec.contiguous(fmt) : dh_rec.clone(fmt);
  Tensor grad_c0 = dc.to(c0.scalar_type());
  if (!has_bias) grad_bias = at::empty({0}, opts);
  grad_peephole = peephole.has_value() ? grad_peephole.to(peephole->scalar_type()) : at::empty({0}, opts);
  // Weight gradients contiguous like the weights (oneDNN returns channels_last ones for channels_last input).
  return {grad_x, grad_w_cat.narrow(1, 0, Cin).contiguous(), grad_w_cat.narrow(1, Cin, C).contiguous(), grad_bias,
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

std::tuple<Tensor, Tensor, Tensor> convgru_sequence(
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
  const bool wino = strategy == kWinograd;
  // winograd's first hidden conv reads h0 with any strides: a broadcast zero h0 stays unmaterialised
  const Tensor h0_state = wino ? initial_state(h0, x.scalar_type(), fmt) : Tensor();
  const bool hoisted = strategy != kConcat;  // winograd: hoisted, every conv Winograd

  Tensor output = empty_frames({B, T}, C, H, W, g.channels_last, opts);
  const auto regions = gru_reserve(g, x.scalar_type(), reset_after);
  const bool keep_hn = gru_keeps_hn(x.scalar_type(), reset_after);
  Tensor reserve = new_reserve(save, g, regions, opts);
  const auto views = save ? reserve_views(reserve, g, regions) : std::vector<Tensor>();
  Tensor cache = save ? views[0] : Tensor();                              // [T, B, 3C]: r, z, n
  Tensor hn_kept = save && keep_hn ? views[1] : Tensor();                 // [T, B, C]: h_n
  Tensor hn_scratch = save && !keep_hn ? empty_like_frame(g, C, opts) : Tensor();  // h_n recomputed in backward
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

  // hoisted: the input conv of one chunk of steps at a time (HoistedInput).
  // concat: two [x_t, h_{t-1}] slots used in turn (the gate kernel writes h into the next step's) and,
  // for the Ballas form, one [x_t, r·h_{t-1}] buffer. winograd: the hoisted x conv Winograd too, and
  // the gate kernel run per strip of the step's last h conv.
  std::optional<HoistedInput> hoist;
  Tensor h_buf, slots, buffer2, v_ih, v_h, v_n;
  GruConcatWeights cw;
  // winograd, reset_after: no hoisted x conv; per step x and h convs in the Winograd domain
  // (winograd_gru_fused_step), a.h[0..1] zero planes (x_r + h_r and x_z + h_z come summed in a.x).
  const bool fused = wino && reset_after;
  Tensor bias_fused;
  if (fused) {
    v_ih = winograd_gate_weights(weight_ih, 3);
    v_h = winograd_gate_weights(weight_hh, 3);
    bias_fused = winograd_gru_bias(bias_ih, bias_hh, C, x.scalar_type());
    a.h[0] = a.h[1] = zero_plane(zeros);
  } else if (hoisted) {
    hoist.emplace(x, g, opts);
    if (!wino) h_buf = empty_like_frame(g, C, opts).copy_(h0);
  } else {
    slots = empty_frames({2, B}, Cin + C, H, W, g.channels_last, opts);
    slots.select(0, 0).narrow(1, Cin, C).copy_(h0);
    if (!reset_after) buffer2 = empty_like_frame(g, Cin + C, opts);
    cw = gru_concat_weights(weight_ih, weight_hh, bias_ih, bias_hh, C, reset_after);
  }
  OptTensor wb_ih, wb_hh;  // winograd, not fused: the biases for its convs
  if (wino && !fused) {
    v_ih = winograd_weights(weight_ih);
    v_h = winograd_weights(weight_hh.narrow(0, 0, 2 * C));
    v_n = winograd_weights(weight_hh.narrow(0, 2 * C, C));
    wb_ih = winograd_bias(bias_ih, x.scalar_type());
    wb_hh = winograd_bias(bias_hh, x.scalar_type());
  }
  Tensor keep1, keep2;  // per-step conv outputs the planes point into (outside the loop: see convlstm_sequence)
  for (int64_t f = 0; f < T; ++f) {
    const int64_t t = time_of(f, T, reverse);
    const bool last = f == T - 1;
    a.mask = ra.mask = step_mask(lengths_d, t);
    Tensor h_prev, h_next;
    if (save) {
      for (int k = 0; k < 3; ++k) a.cache_out[k] = slot(cache.select(0, t), k, C);
      a.cache_out[3] = plane(keep_hn ? hn_kept.select(0, t) : hn_scratch);
      ra.r_out = a.cache_out[0];
    }
    if (fused) {
      h_prev = f == 0 ? h0_state : output.select(1, time_of(f - 1, T, reverse));
      h_next = last ? h_n : output.select(1, t);
    } else if (hoisted) {
      const Tensor x_gates_t = hoist->gates(t, [&](const Tensor& frames) {
        return wino ? winograd_conv(frames, v_ih, wb_ih, g) : conv(frames, weight_ih, bias_ih, g);
      });
      // winograd reads h_{t-1} from the output (a strip's conv reads its neighbours' rows: no in-place h)
      h_prev = !wino ? h_buf : f == 0 ? h0_state : output.select(1, time_of(f - 1, T, reverse));
      h_next = last ? h_n : wino ? output.select(1, t) : h_buf;
      for (int k = 0; k < 3; ++k) a.x[k] = slot(x_gates_t, k, C);
      if (reset_after) {
        if (!wino) {  // winograd: the h conv per strip
          keep1 = conv(h_buf, weight_hh, bias_hh, g);
          for (int k = 0; k < 3; ++k) a.h[k] = slot(keep1, k, C);
        }
      } else {
        const OptTensor bias_rz = narrow_optional(bias_hh, 0, 2 * C);
        keep1 = wino ? winograd_conv(h_prev, v_h, narrow_optional(wb_hh, 0, 2 * C), g)
                     : conv(h_buf, weight_hh.narrow(0, 0, 2 * C), bias_rz, g);
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
      const Tensor buffer_t = slots.select(0, f % 2);
      buffer_t.narrow(1, 0, Cin).copy_(x.select(1, t));
      h_prev = buffer_t.narrow(1, Cin, C);
      h_next = last ? h_n : slots.select(0, (f + 1) % 2).narrow(1, Cin, C);
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
        buffer2.narrow(1, 0, Cin).copy_(x.select(1, t));
        ra.x_r = slot(keep1, 0, C);
        ra.h_r = zero_plane(zeros);
        ra.h_prev = plane(h_prev);
        ra.reset_h_out = plane(buffer2.narrow(1, Cin, C));
        FASTVID_LAUNCH(gru_reset_forward, ra, x.device());
        keep2 = conv(buffer2, cw.w_b, cw.b_b, g);
        a.x[2] = plane(keep2);
        a.h[0] = a.h[1] = a.h[2] = zero_plane(zeros);
      }
    }
    a.h_prev = plane(h_prev);
    a.h_out = plane(output.select(1, t));
    a.h_out2 = plane(h_next);
    if (fused) winograd_gru_fused_step(a, x.select(1, t), v_ih, h_prev, v_h, bias_fused, g);
    else if (wino) winograd_gru_step(a, reset_h, v_n, narrow_optional(wb_hh, 2 * C, C), 2, g);
    else FASTVID_LAUNCH(gru_forward, a, x.device());
  }
  return {output, h_n, reserve};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> convgru_sequence_backward(
    const OptTensor& grad_output, const OptTensor& grad_h_n, const Tensor& x, const Tensor& weight_ih,
    const Tensor& weight_hh, const OptTensor& bias_ih, const OptTensor& bias_hh, const Tensor& h0,
    const Tensor& output, const Tensor& reserve, at::IntArrayRef padding, at::IntArrayRef dilation, bool reset_after,
    bool reverse, int64_t strategy, bool channels_last, const OptTensor& lengths) {
  const char* op = "fastvid.convgru_sequence_backward";
  const SeqGeometry g = check_sequence(op, x, weight_ih, weight_hh, h0, 3, padding, dilation, strategy, channels_last);
  if (strategy == kWinograd) check_winograd(op, x, weight_hh, g, lengths);
  check_bias(op, "bias_ih", bias_ih, 3 * g.C, x);
  check_bias(op, "bias_hh", bias_hh, 3 * g.C, x);
  const Tensor lengths_d = check_lengths(op, lengths, g, x);
  const auto regions = gru_reserve(g, x.scalar_type(), reset_after);
  {
    const int64_t B = g.B, T = g.T, C = g.C, H = g.H, W = g.W;
    check_optional_arg(op, "grad_output", grad_output, {B, T, C, H, W}, x, "x", x.scalar_type());
    check_optional_arg(op, "grad_h_n", grad_h_n, {B, C, H, W}, x, "x", std::nullopt);
    check_arg(op, "output", output, {B, T, C, H, W}, x, "x", x.scalar_type());
    check_reserve(op, reserve, g, regions, x);
  }
  const c10::DeviceGuard guard(x.device());
  const int64_t B = g.B, T = g.T, C = g.C, Cin = g.Cin, H = g.H, W = g.W;
  const auto opts = x.options();
  const auto fmt = frame_format(g.channels_last);
  const bool hoisted = strategy != kConcat;  // winograd: hoisted with the per-step input-grad convs Winograd
  const bool wino = strategy == kWinograd;
  const bool has_bias = bias_ih.has_value() || bias_hh.has_value();
  const auto views = reserve_views(reserve, g, regions);
  const Tensor& cache = views[0];  // [T, B, 3C]: r, z, n
  const bool keep_hn = gru_keeps_hn(x.scalar_type(), reset_after);  // views[1]: [T, B, C] h_n

  const Tensor zeros = zeros_for_planes(C, H, W, opts);
  const Tensor g_out = grad_output.has_value() ? to_frames_layout(*grad_output, g.channels_last) : Tensor();
  const Tensor h0_l = initial_state(h0, x.scalar_type(), fmt);
  Tensor dh_conv = grad_h_n.has_value() ? grad_h_n->to(x.scalar_type()).contiguous(fmt) : Tensor();
  Tensor dh_direct = empty_like_frame(g, C, opts).zero_();
  Tensor grad_x = empty_frames({B, T}, Cin, H, W, g.channels_last, opts);
  GruConcatWeights cw;
  if (!hoisted) cw = gru_concat_weights(weight_ih, weight_hh, bias_ih, bias_hh, C, reset_after);
  const Tensor w_rz = weight_hh.narrow(0, 0, 2 * C), w_n = weight_hh.narrow(0, 2 * C, C);
  // Chunk by chunk of consecutive steps (see below); winograd reset_after with one-step chunks (T < 32)
  // reads the step's conv inputs x_t and h_{t-1} where they are (x, and the output or h0; winograd takes
  // no lengths) instead of copying them into `inputs` (Ballas scales h_{t-1} in place, so it keeps the copy).
  const int64_t chunk = backward_chunk_steps(T, strategy);
  const bool in_place_inputs = wino && reset_after && chunk == 1;
  // ... and runs the step's two input-gradient convs as one: the gate gradients in one frame
  // [x_n, r, z, h_n] (d_x = its channels [0, 3C), d_h = [C, 4C)), d r and d z transformed once.
  const bool merged_input_grads = in_place_inputs;
  Tensor v_grad_h, v_grad_rz, v_grad_n;  // winograd: transformed flipped weights of the input-grad convs
  if (wino && reset_after && !merged_input_grads) v_grad_h = winograd_input_grad_weights(weight_hh);
  if (wino && !reset_after) v_grad_rz = winograd_input_grad_weights(w_rz), v_grad_n = winograd_input_grad_weights(w_n);
  // winograd: grad_x per chunk a Winograd conv too; the weight gradients summed in the Winograd domain
  // (hh: [r, z, n] reset_after, else [r, z] and [n] apart), transformed back once at the end.
  const Tensor v_grad_x = wino && !merged_input_grads ? winograd_input_grad_weights(weight_ih) : Tensor();
  const Tensor v_input_grads = merged_input_grads ? winograd_gru_input_grad_weights(weight_ih, weight_hh) : Tensor();
  const Tensor v_n = wino && reset_after && !keep_hn ? winograd_weights(w_n) : Tensor();  // the h_n recompute
  const OptTensor wb_hn = v_n.defined() ? winograd_bias(narrow_optional(bias_hh, 2 * C, C), x.scalar_type()) : std::nullopt;
  Tensor dV_ih, dV_hh, dV_n, dV_frame;
  Tensor db_x, db_h;  // winograd: Σ d_x (b_ih's gradient, and the Ballas b_hh's) and Σ d_h (reset_after's b_hh)
  Tensor db_frame;    // merged_input_grads: Σ of the gradient frame [x_n, r, z, h_n] (both biases' gradients)
  const int64_t frames = B * chunk;
  if (merged_input_grads) {  // both weight gradients from one call per step: rows [0, Cin) W_ih's, [Cin, Cin + C) W_hh's
    if (has_bias) db_frame = at::zeros({4 * C}, opts.dtype(at::kDouble));
    dV_frame = winograd_weight_grad_buffer(Cin + C, 4 * C, x.scalar_type(), frames, H, W);
  } else if (wino) {
    if (has_bias) db_x = at::zeros({3 * C}, opts.dtype(at::kDouble));
    if (reset_after && bias_hh.has_value()) db_h = at::zeros({3 * C}, opts.dtype(at::kDouble));
    dV_ih = winograd_weight_grad_buffer(Cin, 3 * C, x.scalar_type(), frames, H, W);
    dV_hh = winograd_weight_grad_buffer(C, reset_after ? 3 * C : 2 * C, x.scalar_type(), frames, H, W);
    if (!reset_after) dV_n = winograd_weight_grad_buffer(C, C, x.scalar_type(), frames, H, W);
  }

  // Chunk by chunk of consecutive steps (in reverse), as in convlstm_sequence_backward. Per chunk:
  // d(pre-activations) -- hoisted: d_x [n, B, 3C] and, for reset_after, d_h [n, B, 3C]; concat: [n, B, 4C]
  // (r, z, x_n, h_n) for reset_after, [n, B, 3C] for Ballas -- and the conv inputs [x_t, h_{t-1}] rebuilt
  // from x and output; at its end the batched weight gradients (Ballas: h_{t-1} is then scaled by r
  // in place for U_n's) and, hoisted, the chunk's grad_x (merged_input_grads: one [1, B, 4C] frame
  // [x_n, r, z, h_n] holding d_x and d_h, grad_x written per step with dh).
  const int64_t d_channels = (!hoisted && reset_after) ? 4 * C : 3 * C;
  const Tensor d_merged = merged_input_grads ? empty_frames({1, B}, 4 * C, H, W, g.channels_last, opts) : Tensor();
  Tensor d_x = merged_input_grads ? d_merged.narrow(2, 0, 3 * C)  // [x_n, r, z]: dV_ih's columns in that order
                                  : empty_frames({chunk, B}, d_channels, H, W, g.channels_last, opts);
  Tensor d_h = merged_input_grads ? d_merged.narrow(2, C, 3 * C)
               : (hoisted && reset_after) ? empty_frames({chunk, B}, 3 * C, H, W, g.channels_last, opts) : Tensor();
  const Tensor d_frame = merged_input_grads ? d_merged.select(0, 0) : Tensor();  // its [B, 4C, H, W] frame
  Tensor dh_buf = merged_input_grads ? empty_like_frame(g, C, opts) : Tensor();
  Tensor inputs = in_place_inputs ? Tensor() : empty_frames({chunk, B}, Cin + C, H, W, g.channels_last, opts);
  Tensor x_step, h_step;  // in_place_inputs: the current step's x_t and h_{t-1} ([B, ., H, W] views)
  Tensor grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh;
  const auto add_to = [](Tensor& sum, const Tensor& term) {
    if (term.defined() && term.numel() > 0) sum = sum.defined() ? sum.add_(term) : term;
  };
  int64_t chunk_start = -1, chunk_len = 0;
  Tensor hn_chunk;  // reset_after: the chunk's h_n = U_n*h_{t-1} + b_hn [n, B, C], kept or recomputed
  const auto load_chunk = [&](int64_t t0, int64_t n) {
    if (in_place_inputs) {
      x_step = x.select(1, t0);
      h_step = previous_frame(output, h0_l, t0, reverse);
    } else {
      copy_time_major(inputs.narrow(2, 0, Cin), x, t0, n);
      copy_previous_hidden(inputs.narrow(2, Cin, C), output, h0_l, t0, n, reverse, lengths_d);
    }
    if (!reset_after) return;
    if (keep_hn) {
      hn_chunk = views[1].narrow(0, t0, n);
      return;
    }
    hn_chunk = Tensor();  // free the previous chunk's before the conv allocates
    const Tensor h_frames = in_place_inputs ? h_step : flat(inputs.narrow(0, 0, n).narrow(2, Cin, C));
    hn_chunk = (wino ? winograd_conv(h_frames, v_n, wb_hn, g) : conv(h_frames, w_n, narrow_optional(bias_hh, 2 * C, C), g))
                   .view({n, B, C, H, W});
  };
  const auto flush_chunk = [&](int64_t t0, int64_t n) {
    const Tensor dx = flat(d_x.narrow(0, 0, n));
    const Tensor in = in_place_inputs ? Tensor() : inputs.narrow(0, 0, n);
    const Tensor h_in = in_place_inputs ? Tensor() : in.narrow(2, Cin, C);  // h_{t-1}; Ballas: scaled to r·h_{t-1} below
    if (merged_input_grads) {
      // grad_x_t was written with dh in the step loop. W_ih's rows read the frame's [x_n, r, z], W_hh's
      // its [r, z, h_n]: d r and d z gathered and transformed once for both.
      WeightGradColumns columns;
      columns.begin[0] = 0, columns.end[0] = 3 * C;
      columns.begin[1] = C, columns.end[1] = 4 * C;
      winograd_weight_grad_add(dV_frame, x_step, d_frame, db_frame.defined() ? &db_frame : nullptr, &h_step, columns);
    } else if (wino) {
      if (n == 1) {  // straight into the frame (T < 32: every chunk is one step)
        winograd_conv_out(dx, v_grad_x, std::nullopt, g, grad_x.select(1, t0));
      } else {
        const Tensor gx = winograd_conv(dx, v_grad_x, std::nullopt, g);
        grad_x.narrow(1, t0, n).copy_(gx.view({n, B, Cin, H, W}).transpose(0, 1));
      }
      winograd_weight_grad_add(dV_ih, in_place_inputs ? x_step : flat(in.narrow(2, 0, Cin)), dx,
                               db_x.defined() ? &db_x : nullptr);
      if (reset_after) {
        winograd_weight_grad_add(dV_hh, in_place_inputs ? h_step : flat(h_in), flat(d_h.narrow(0, 0, n)),
                                 db_h.defined() ? &db_h : nullptr);
      } else {
        // In the Ballas form d(h-conv pre-activations) equal d(x-conv pre-activations).
        winograd_weight_grad_add(dV_hh, flat(h_in), dx.narrow(1, 0, 2 * C));
        h_in.mul_(cache.narrow(0, t0, n).narrow(2, 0, C));
        winograd_weight_grad_add(dV_n, flat(h_in), dx.narrow(1, 2 * C, C));
      }
    } else if (hoisted) {
      const auto grads = at::convolution_backward(dx, flat(in.narrow(2, 0, Cin)), weight_ih, at::IntArrayRef({3 * C}),
                                                  {1, 1}, g.padding, g.dilation, false, {0, 0}, 1,
                                                  {true, true, bias_ih.has_value()});
      grad_x.narrow(1, t0, n).copy_(std::get<0>(grads).view({n, B, Cin, H, W}).transpose(0, 1));
      add_to(grad_w_ih, std::get<1>(grads));
      add_to(grad_b_ih, std::get<2>(grads));
      if (reset_after) {
        auto [gw, gb] = conv_weight_grad(flat(d_h.narrow(0, 0, n)), flat(h_in), weight_hh, bias_hh.has_value(), g);
        add_to(grad_w_hh, gw);
        add_to(grad_b_hh, gb);
      } else {
        // In the Ballas form d(h-conv pre-activations) equal d(x-conv pre-activations).
        auto [gw_rz, gb_rz] = conv_weight_grad(dx.narrow(1, 0, 2 * C), flat(h_in), w_rz, bias_hh.has_value(), g);
        h_in.mul_(cache.narrow(0, t0, n).narrow(2, 0, C));
        auto [gw_n, gb_n] = conv_weight_grad(dx.narrow(1, 2 * C, C), flat(h_in), w_n, bias_hh.has_value(), g);
        add_to(grad_w_hh, at::cat({gw_rz, gw_n}, 0));
        if (bias_hh.has_value()) add_to(grad_b_hh, at::cat({gb_rz, gb_n}, 0));
      }
    } else if (reset_after) {
      auto [gw, gb] = conv_weight_grad(dx, flat(in), cw.w_a, has_bias, g);
      add_to(grad_w_ih, gw.narrow(0, 0, 3 * C).narrow(1, 0, Cin));
      add_to(grad_w_hh, at::cat({gw.narrow(0, 0, 2 * C).narrow(1, Cin, C), gw.narrow(0, 3 * C, C).narrow(1, Cin, C)}, 0));
      if (has_bias) {
        add_to(grad_b_ih, gb.narrow(0, 0, 3 * C).contiguous());
        add_to(grad_b_hh, at::cat({gb.narrow(0, 0, 2 * C), gb.narrow(0, 3 * C, C)}, 0));
      }
    } else {
      auto [gw1, gb1] = conv_weight_grad(dx.narrow(1, 0, 2 * C), flat(in), cw.w_a, has_bias, g);
      h_in.mul_(cache.narrow(0, t0, n).narrow(2, 0, C));
      auto [gw2, gb2] = conv_weight_grad(dx.narrow(1, 2 * C, C), flat(in), cw.w_b, has_bias, g);
      add_to(grad_w_ih, at::cat({gw1.narrow(1, 0, Cin), gw2.narrow(1, 0, Cin)}, 0));
      add_to(grad_w_hh, at::cat({gw1.narrow(1, Cin, C), gw2.narrow(1, Cin, C)}, 0));
      if (has_bias) add_to(grad_b_ih, at::cat({gb1, gb2}, 0));
    }
  };

  GruBackwardArgs a;
  a.geo = {B, C, H * W, x.scalar_type()};
  a.reset_after = reset_after;
  GruResetBackwardArgs ra;
  ra.geo = a.geo;
  for (int64_t f = T - 1; f >= 0; --f) {
    const int64_t t = time_of(f, T, reverse);
    const auto [t0, n] = chunk_of(t, chunk, T);
    if (t0 != chunk_start) {
      if (chunk_start >= 0) flush_chunk(chunk_start, chunk_len);
      chunk_start = t0, chunk_len = n;
      load_chunk(t0, n);
    }
    a.mask = ra.mask = step_mask(lengths_d, t);
    const Tensor cache_t = cache.select(0, t);
    const Tensor d_x_t = d_x.select(0, t - t0);
    const Tensor d_h_t = d_h.defined() ? d_h.select(0, t - t0) : Tensor();  // hoisted reset_after only
    const Tensor inputs_t = in_place_inputs ? Tensor() : inputs.select(0, t - t0);
    const Tensor h_prev = in_place_inputs ? h_step : inputs_t.narrow(1, Cin, C);
    a.dh_in[0] = g_out.defined() ? plane(g_out.select(1, t)) : zero_plane(zeros);
    a.dh_in[1] = dh_conv.defined() ? plane(dh_conv) : zero_plane(zeros);
    a.dh_in[2] = plane(dh_direct);
    for (int k = 0; k < 3; ++k) a.cache[k] = slot(cache_t, k, C);
    a.cache[3] = reset_after ? plane(hn_chunk.select(0, t - t0)) : zero_plane(zeros);  // Ballas: not read
    a.h_prev = plane(h_prev);
    a.dh_prev_out = plane(dh_direct);
    for (int k = 0; k < 3; ++k) {
      a.d_x_out[k] = slot(d_x_t, k, C);
      a.d_h_out[k] = a.d_x_out[k];  // d r, d z (and Ballas' d n) are the same for both convs: same value twice
    }
    if (merged_input_grads) {  // the frame [x_n, r, z, h_n]: d r, d z written once for both convs
      a.d_x_out[0] = a.d_h_out[0] = slot(d_frame, 1, C);
      a.d_x_out[1] = a.d_h_out[1] = slot(d_frame, 2, C);
      a.d_x_out[2] = slot(d_frame, 0, C);
      a.d_h_out[2] = slot(d_frame, 3, C);
    } else if (hoisted && reset_after) {
      for (int k = 0; k < 3; ++k) a.d_h_out[k] = slot(d_h_t, k, C);
    } else if (!hoisted && reset_after) {
      a.d_h_out[2] = slot(d_x_t, 3, C);
    }
    FASTVID_LAUNCH(gru_backward, a, x.device());

    if (reset_after) {
      if (merged_input_grads) {
        winograd_gru_input_grads(d_frame, v_input_grads, g, grad_x.select(1, t), dh_buf);
        dh_conv = dh_buf;  // the next step's gate kernel reads it before this buffer is written again
      } else if (hoisted) {
        dh_conv = wino ? winograd_conv(d_h_t, v_grad_h, std::nullopt, g) : conv_input_grad(d_h_t, h_prev, weight_hh, g);
      } else {
        const Tensor d_inputs = conv_input_grad(d_x_t, inputs_t, cw.w_a, g);
        grad_x.select(1, t).copy_(d_inputs.narrow(1, 0, Cin));
        dh_conv = d_inputs.narrow(1, Cin, C);
      }
      continue;
    }
    // Ballas: back through h_n = U_n*(r·h_prev), then through r = σ(x_r + U_r*h_prev).
    Tensor d_reset_h, d_x_part;
    if (hoisted) {
      d_reset_h = wino ? winograd_conv(d_x_t.narrow(1, 2 * C, C), v_grad_n, std::nullopt, g)
                       : conv_input_grad(d_x_t.narrow(1, 2 * C, C), h_prev, w_n, g);
    } else {
      const Tensor d_inputs2 = conv_input_grad(d_x_t.narrow(1, 2 * C, C), inputs_t, cw.w_b, g);
      d_x_part = d_inputs2.narrow(1, 0, Cin);
      d_reset_h = d_inputs2.narrow(1, Cin, C);
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
      const Tensor d_inputs1 = conv_input_grad(d_x_t.narrow(1, 0, 2 * C), inputs_t, cw.w_a, g);
      Tensor grad_x_t = grad_x.select(1, t);
      at::add_out(grad_x_t, d_x_part, d_inputs1.narrow(1, 0, Cin));
      dh_conv = d_inputs1.narrow(1, Cin, C);
    }
  }
  flush_chunk(chunk_start, chunk_len);
  if (merged_input_grads) {
    const Tensor total = winograd_weight_grad_total(dV_frame);
    grad_w_ih = winograd_weight_grad_finish(total.narrow(1, 0, Cin).narrow(2, 0, 3 * C), weight_ih.scalar_type());
    grad_w_hh = winograd_weight_grad_finish(total.narrow(1, Cin, C).narrow(2, C, 3 * C), weight_hh.scalar_type());
    // W_ih's rows and b_ih's sums came in the frame's order [x_n, r, z]; W_hh's are [r, z, h_n] already
    grad_w_ih = at::cat({grad_w_ih.narrow(0, C, 2 * C), grad_w_ih.narrow(0, 0, C)}, 0);
    if (bias_ih.has_value())
      grad_b_ih = at::cat({db_frame.narrow(0, C, 2 * C), db_frame.narrow(0, 0, C)}, 0).to(x.scalar_type());
    if (bias_hh.has_value()) grad_b_hh = db_frame.narrow(0, C, 3 * C).to(x.scalar_type());
  } else if (wino) {
    grad_w_ih = winograd_weight_grad_finish(winograd_weight_grad_total(dV_ih), weight_ih.scalar_type());
    grad_w_hh = winograd_weight_grad_finish(winograd_weight_grad_total(dV_hh), weight_hh.scalar_type());
    if (!reset_after)
      grad_w_hh = at::cat({grad_w_hh, winograd_weight_grad_finish(winograd_weight_grad_total(dV_n),
                                                                  weight_hh.scalar_type())}, 0);
    if (bias_ih.has_value()) grad_b_ih = db_x.to(x.scalar_type());
    if (bias_hh.has_value()) grad_b_hh = (reset_after ? db_h : db_x).to(x.scalar_type());
  }
  Tensor grad_h0 = dh_conv.defined() ? at::add(dh_conv, dh_direct).contiguous(fmt) : dh_direct;

  if (!hoisted && !reset_after && has_bias) grad_b_hh = grad_b_ih.clone();  // Ballas concat: one summed bias
  if (!bias_ih.has_value()) grad_b_ih = at::empty({0}, opts);
  if (!bias_hh.has_value()) grad_b_hh = at::empty({0}, opts);
  return {grad_x, grad_w_ih.contiguous(), grad_w_hh.contiguous(), grad_b_ih, grad_b_hh, grad_h0};
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
