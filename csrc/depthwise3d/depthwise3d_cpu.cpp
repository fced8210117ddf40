// CPU depthwise 3D conv kernels: direct stencil loops over NDHWC tensors, vectorised over the
// contiguous channels, parallel over rows (b, depth, row) with at::parallel_for.
//
// m == 1 (the common depthwise case):
//   kW = 3, W dilation 1, W stride 1 or 2 (X3D, CSN, S3D): forward_k3. Every output position goes
//     through conv_block_k3 (P positions × one channel vector: per (kt, kh) row the source window is
//     loaded once into registers and each tap's weight vector serves all P positions), W borders
//     included. Work items are boxes of output rows whose input fits in L2, swept two 64-byte lines
//     of channels at a time, the next box's rows prefetched meanwhile where the input is unlikely
//     to be in L3; fp32 outputs too large for L3 are written with streaming stores (see "Loop order" below).
//   other widths / strides, per row of W positions: interior positions (every W tap in range) go
//     8 at a time through sweep_positions (each weight vector loaded once per tap for 8 positions;
//     the input gradient 8 inputs of one W residue at a time, with W stride or W dilation 1); border
//     positions build their list of valid taps and run accumulate_channels.
//   With every stride 1 the input gradient is the forward with the kernel flipped
//     (flipped_geometry). kW = 3 with W stride 2 and padding 1 (X3D's downsampling convs): per input
//     row both W phases of a block of outputs at once (input_grad_row_w2). The other input gradients and
//     the generic weight gradient walk their rows in bands along H (BandOrder).
//     The accumulators stay in registers, in GCC vectors of the accumulation
//     type (fp32 for bf16/fp16) as wide as the ISA path's registers, stored once per position.
//   weight gradient: kH = kW = 3 with W stride, dilation and padding 1: weight_grad_rows_k3 (the
//     9 (kh, kw) sums of one kt and the bias sum in registers while a 3-vector grad_output window
//     sweeps each row). Otherwise with W stride and dilation 1 (kW 3 or 5), all W taps of a
//     (grad_output row, input row) pair in one sweep over the interior positions
//     (weight_taps_reuse); the borders and other geometries per tap, one register-blocked sweep
//     along the row into a partial sum.
//   both gradients of one call, stride 1 with the output the size of the input (X3D's 3x3x3): one
//     pass, each chunk of the weight gradient first computing its rows' input gradient (backward_impl).
// m > 1: the per-element formulas of depthwise3d_math.h (the ones the CUDA kernel runs; the CPU
//   weight gradient keeps its own loop).
// Everything below is compiled once per ISA path (cpu_isa.h); the entry points at the top pick one.
// The weight gradient is reduced without races: fixed chunks of rows (their count a function of the
// shape, never of the thread count) each sum into their own partial buffer (for kH = kW = 3 a chunk's
// channel groups each write their own channels, whichever thread runs them), added in chunk order at
// the end: bit-identical results whatever the thread count.
#include "depthwise3d_kernels.h"
#include "depthwise3d_math.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../cpu_isa.h"
#include "../fastvid_common.h"

#ifdef FASTVID_ISA_X86
#include <immintrin.h>  // store_lanes' masked stores on the AVX-512 / AVX2 paths
#endif

#ifndef FASTVID_ISA
#define FASTVID_ISA_SOURCE "depthwise3d/depthwise3d_cpu.cpp"
#include "../cpu_isa_each.h"

namespace fastvid {
namespace depthwise3d {
void forward_cpu(const ForwardArgs& args) { FASTVID_ISA_CALL(depthwise3d, forward(args)); }
void input_grad_cpu(const InputGradArgs& args) { FASTVID_ISA_CALL(depthwise3d, input_grad(args)); }
void weight_grad_cpu(const WeightGradArgs& args) { FASTVID_ISA_CALL(depthwise3d, weight_grad(args)); }
void backward_cpu(const InputGradArgs& input_grad_args, const WeightGradArgs& weight_grad_args) {
  FASTVID_ISA_CALL(depthwise3d, backward(input_grad_args, weight_grad_args));
}

namespace {
std::atomic<int> g_streaming{static_cast<int>(Streaming::kAuto)};
}
Streaming streaming() { return static_cast<Streaming>(g_streaming.load(std::memory_order_relaxed)); }
void set_streaming(Streaming mode) { g_streaming.store(static_cast<int>(mode), std::memory_order_relaxed); }
}  // namespace depthwise3d
}  // namespace fastvid

#else  // ------------------------------------------------ one ISA path: namespace FASTVID_ISA
#include "depthwise3d_cpu_vec.h"

namespace fastvid {
namespace depthwise3d {
namespace FASTVID_ISA {
namespace {

using cpu::Vec;
using cpu::load_vec;
using cpu::store_vec;

// Valid taps along one dim for output index o: [k_begin, k_end) with input index in range.
struct TapRange {
  int64_t begin, end;
};

TapRange valid_taps(int64_t o, int64_t k, int64_t stride, int64_t padding, int64_t dilation, int64_t in) {
  int64_t begin = 0, end = k, i;
  while (begin < end && !input_index(o, begin, stride, padding, dilation, in, &i)) ++begin;
  while (end > begin && !input_index(o, end - 1, stride, padding, dilation, in, &i)) --end;
  return {begin, end};
}

// Chunks of rows of the weight gradient (each with its own partial sums).
constexpr int64_t kWeightGradChunks = 64;

// Rows per task so that a task has >= ~32k output elements.
int64_t grain_for(int64_t row_elements) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row_elements)); }

constexpr int kMaxTaps = 7 * 7 * 7;

// out[c0 .. c0+NV·lanes) = init + Σ_i src[src_offsets[i] + c] · weight[weight_offsets[i] + c]: the
// NV vector accumulators stay in registers across the taps (the channel loop of the m == 1 kernels).
template <int NV, typename scalar_t, typename acc_t>
__attribute__((always_inline)) inline void accumulate_block(int64_t n, const int64_t* src_offsets,
                                                            const int64_t* weight_offsets, const scalar_t* src,
                                                            const acc_t* weight, const acc_t* init, scalar_t* out,
                                                            int64_t c0) {
  using V = typename Vec<acc_t>::type;
  constexpr int L = Vec<acc_t>::lanes;
  V a[NV];
#pragma GCC unroll 8
  for (int j = 0; j < NV; ++j) a[j] = init != nullptr ? load_vec<V>(init + c0 + j * L) : V{};
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t* x = src + src_offsets[i] + c0;
    const acc_t* w = weight + weight_offsets[i] + c0;
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) a[j] += load_vec<V>(x + j * L) * load_vec<V>(w + j * L);
  }
#pragma GCC unroll 8
  for (int j = 0; j < NV; ++j) store_vec(out + c0 + j * L, a[j]);
}

// The same for one channel (the tail).
template <typename scalar_t, typename acc_t>
__attribute__((always_inline)) inline void accumulate_one(int64_t n, const int64_t* src_offsets,
                                                          const int64_t* weight_offsets, const scalar_t* src,
                                                          const acc_t* weight, const acc_t* init, scalar_t* out,
                                                          int64_t c) {
  acc_t a = init != nullptr ? init[c] : acc_t(0);
  for (int64_t i = 0; i < n; ++i) a += static_cast<acc_t>(src[src_offsets[i] + c]) * weight[weight_offsets[i] + c];
  out[c] = static_cast<scalar_t>(a);
}

// All C channels of one position, in register blocks of 4 vectors, 1 vector and 1 channel.
template <typename scalar_t, typename acc_t>
__attribute__((always_inline)) inline void accumulate_channels(int64_t C, int64_t n, const int64_t* src_offsets,
                                                               const int64_t* weight_offsets, const scalar_t* src,
                                                               const acc_t* weight, const acc_t* init,
                                                               scalar_t* out) {
  constexpr int L = Vec<acc_t>::lanes;
  int64_t c = 0;
  for (; c + 4 * L <= C; c += 4 * L) accumulate_block<4>(n, src_offsets, weight_offsets, src, weight, init, out, c);
  for (; c + L <= C; c += L) accumulate_block<1>(n, src_offsets, weight_offsets, src, weight, init, out, c);
  for (; c < C; ++c) accumulate_one(n, src_offsets, weight_offsets, src, weight, init, out, c);
}


// kPositions consecutive positions along W at once, all of whose W taps are in range (interior):
//   out[p·out_step + c] = init[c] + Σ_r Σ_kw src_rows[r][kw·kw_step + p·p_step + c] · w_rows[r][kw·w_step + c]
// for the (kt, kh) pairs r. Each weight vector is loaded once per tap and used for every position,
// so the loop does ~1 load per FMA instead of 2. Used by the forward and the input gradient without
// a flipped kernel (input_grad_row: the inputs of one W residue, taps every s-th).
constexpr int kPositions = 8;

// The same sum when the W taps step by one position (kw_step = S·p_step, S = ±1: the forward with
// W stride = dilation, the input gradient with both 1), for kernel width KW: each source vector is
// loaded once and used for every (position, tap) pair that reads it (P + KW - 1 loads for P·KW
// FMAs per row instead of P·KW), the KW weight vectors held in registers. Per position the taps are
// added in the same order as in sweep_positions' general loop (kw ascending): identical results.
template <int KW, int S, int P, typename V, typename scalar_t, typename acc_t>
__attribute__((always_inline)) inline void sweep_rows_reuse(int64_t rows, const scalar_t* const* src_rows,
                                                            const acc_t* const* w_rows, int64_t w_step,
                                                            int64_t step, int64_t c0, V (&a)[P]) {
  for (int64_t r = 0; r < rows; ++r) {
    V w[KW];
#pragma GCC unroll 8
    for (int k = 0; k < KW; ++k) w[k] = load_vec<V>(w_rows[r] + k * w_step + c0);
    // Source position q of step i; position p reads q = p + S·k. The empty asm statements keep gcc
    // from turning the pointer walk into one offset register per position (too few registers) and
    // from folding the one load back into every FMA that uses it.
    const scalar_t* x = src_rows[r] + c0 + (S > 0 ? 0 : P - 1) * step;
    const int64_t walk = S * step;
#pragma GCC unroll 16
    for (int i = 0; i < P + KW - 1; ++i) {
      const int q = S > 0 ? i : P - 1 - i;
      V xv = load_vec<V>(x);
      asm("" : "+v"(xv));
      x += walk;
      asm("" : "+r"(x));
#pragma GCC unroll 8
      for (int k = 0; k < KW; ++k) {
        const int p = q - S * k;
        if (p >= 0 && p < P) a[p] += xv * w[k];
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
__attribute__((always_inline)) inline void sweep_positions(int64_t C, int64_t rows, const scalar_t* const* src_rows,
                                                           const acc_t* const* w_rows, int64_t kW, int64_t w_step,
                                                           int64_t kw_step,
                                                           int64_t p_step, const acc_t* init, scalar_t* out,
                                                           int64_t out_step) {
  using V = typename Vec<acc_t>::type;
  constexpr int L = Vec<acc_t>::lanes, P = kPositions;
  int64_t c0 = 0;
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    // 2·L channels at a time without widening shuffles (see weight_block_bf16): even and odd
    // channels are accumulated apart; weights and bias are split once per tap, the sums
    // interleaved once per position.
    // Narrower than 64-byte vectors: 16 registers, so half the positions at a time (2·PB
    // accumulators + 2 weights fit).
    using cpu::kEven, cpu::kOdd, cpu::kLow, cpu::kHigh;
    typedef cpu::U32 U;
    constexpr int PB = cpu::kVecBytes == 64 ? P : P / 2;
    for (; c0 + 2 * L <= C; c0 += 2 * L) {
     for (int p0 = 0; p0 < P; p0 += PB) {
      V ae[PB], ao[PB];
      V se{}, so{};
      if (init != nullptr) {
        const V v0 = load_vec<V>(init + c0), v1 = load_vec<V>(init + c0 + L);
        se = __builtin_shuffle(v0, v1, kEven);
        so = __builtin_shuffle(v0, v1, kOdd);
      }
#pragma GCC unroll 8
      for (int p = 0; p < PB; ++p) ae[p] = se, ao[p] = so;
      for (int64_t r = 0; r < rows; ++r) {
        for (int64_t kw = 0; kw < kW; ++kw) {
          const V w0 = load_vec<V>(w_rows[r] + kw * w_step + c0), w1 = load_vec<V>(w_rows[r] + kw * w_step + c0 + L);
          const V we = __builtin_shuffle(w0, w1, kEven), wo = __builtin_shuffle(w0, w1, kOdd);
          const scalar_t* x = src_rows[r] + kw * kw_step + p0 * p_step + c0;
#pragma GCC unroll 8
          for (int p = 0; p < PB; ++p) {
            U words;
            std::memcpy(&words, x + p * p_step, sizeof words);
            const U e = words << 16, o = words & 0xFFFF0000u;
            V xe, xo;
            std::memcpy(&xe, &e, sizeof xe);
            std::memcpy(&xo, &o, sizeof xo);
            ae[p] += xe * we;
            ao[p] += xo * wo;
          }
        }
      }
#pragma GCC unroll 8
      for (int p = 0; p < PB; ++p) {
        store_vec(out + (p0 + p) * out_step + c0, V(__builtin_shuffle(ae[p], ao[p], kLow)));
        store_vec(out + (p0 + p) * out_step + c0 + L, V(__builtin_shuffle(ae[p], ao[p], kHigh)));
      }
     }
    }
  }
  // The channel tail (C >= L) as the last whole vector, overlapping channels already done: they are
  // stored again with the same values, instead of a scalar loop over the tail (X3D's 108, 216, 432
  // channels leave 12 of 16 / 4 of 8 lanes).
  for (; c0 < C && C >= L; c0 += L) {
    const int64_t cv = std::min(c0, C - L);
    V a[P];
    const V start = init != nullptr ? load_vec<V>(init + cv) : V{};
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p) a[p] = start;
    if (kW == 3 && kw_step == p_step) sweep_rows_reuse<3, 1>(rows, src_rows, w_rows, w_step, p_step, cv, a);
    else if (kW == 5 && kw_step == p_step) sweep_rows_reuse<5, 1>(rows, src_rows, w_rows, w_step, p_step, cv, a);
    else if (kW == 3 && kw_step == -p_step) sweep_rows_reuse<3, -1>(rows, src_rows, w_rows, w_step, p_step, cv, a);
    else if (kW == 5 && kw_step == -p_step) sweep_rows_reuse<5, -1>(rows, src_rows, w_rows, w_step, p_step, cv, a);
    else for (int64_t r = 0; r < rows; ++r) {
      for (int64_t kw = 0; kw < kW; ++kw) {
        const V w = load_vec<V>(w_rows[r] + kw * w_step + cv);
        const scalar_t* x = src_rows[r] + kw * kw_step + cv;
#pragma GCC unroll 8
        for (int p = 0; p < P; ++p) a[p] += load_vec<V>(x + p * p_step) * w;
      }
    }
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p) store_vec(out + p * out_step + cv, a[p]);
  }
  for (; c0 < C; ++c0) {
    for (int p = 0; p < P; ++p) {
      acc_t a = init != nullptr ? init[c0] : acc_t(0);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t kw = 0; kw < kW; ++kw)
          a += static_cast<acc_t>(src_rows[r][kw * kw_step + p * p_step + c0]) * w_rows[r][kw * w_step + c0];
      out[p * out_step + c0] = static_cast<scalar_t>(a);
    }
  }
}

// ------------------------------------------------------------------------ forward
// One output row out[b, ot, oh, :, :]. acc: scratch of C*m acc_t.
// The input rows of output row (b, ot, oh) for its (kt, kh) taps in rt x rh, with their weight rows
// (w_row_stride values per (kt, kh)); returns how many (at most 7 x 7).
template <typename scalar_t, typename acc_t>
int64_t tap_rows(const Geometry& g, int64_t b, int64_t ot, int64_t oh, const TapRange& rt, const TapRange& rh,
                 const scalar_t* input, const acc_t* weight, int64_t w_row_stride, const scalar_t** src_rows,
                 const acc_t** w_rows) {
  const int64_t T = g.in[0], H = g.in[1], W = g.in[2], C = g.channels;
  int64_t rows = 0;
  for (int64_t kt = rt.begin; kt < rt.end; ++kt) {
    const int64_t it = ot * g.stride[0] - g.padding[0] + kt * g.dilation[0];
    for (int64_t kh = rh.begin; kh < rh.end; ++kh, ++rows) {
      const int64_t ih = oh * g.stride[1] - g.padding[1] + kh * g.dilation[1];
      src_rows[rows] = input + ndhwc_offset(b, it, ih, 0, 0, T, H, W, C);
      w_rows[rows] = weight + (kt * g.kernel[1] + kh) * w_row_stride;
    }
  }
  return rows;
}

template <typename scalar_t, bool kUnitMultiplier>
void forward_row(const Geometry& g, const scalar_t* input, const at::opmath_type<scalar_t>* weight,
                                    const at::opmath_type<scalar_t>* bias, scalar_t* out_row, int64_t b, int64_t ot,
                                    int64_t oh) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = g.channels, m = kUnitMultiplier ? 1 : g.multiplier, Cout = C * m;
  const int64_t T = g.in[0], H = g.in[1], W = g.in[2];
  const TapRange rt = valid_taps(ot, g.kernel[0], g.stride[0], g.padding[0], g.dilation[0], T);
  const TapRange rh = valid_taps(oh, g.kernel[1], g.stride[1], g.padding[1], g.dilation[1], H);
  if (kUnitMultiplier) {  // tap list per position, register-blocked channel loop
    int64_t x_offsets[kMaxTaps], w_offsets[kMaxTaps];
    // (kt, kh) pairs of this row, for the interior sweep.
    const scalar_t* src_rows[7 * 7];
    const acc_t* w_rows[7 * 7];
    const int64_t rows = tap_rows(g, b, ot, oh, rt, rh, input, weight, g.kernel[2] * Cout, src_rows, w_rows);
    // Interior outputs: every W tap in range.
    const int64_t s_w = g.stride[2], pad_w = g.padding[2], d_w = g.dilation[2], kW = g.kernel[2];
    const int64_t ow_lo = (pad_w + s_w - 1) / s_w;
    const int64_t ow_hi = std::min<int64_t>(g.out[2], W - 1 + pad_w - (kW - 1) * d_w >= 0
                                                          ? (W - 1 + pad_w - (kW - 1) * d_w) / s_w + 1 : 0);
    for (int64_t ow = 0; ow < g.out[2];) {
      if (ow >= ow_lo && ow + kPositions <= ow_hi) {
        const scalar_t* rows_at[7 * 7];
        const int64_t iw0 = ow * s_w - pad_w;
        for (int64_t r = 0; r < rows; ++r) rows_at[r] = src_rows[r] + iw0 * C;
        sweep_positions(C, rows, rows_at, w_rows, kW, C, d_w * C, s_w * C, bias, out_row + ow * Cout, Cout);
        ow += kPositions;
        continue;
      }
      const TapRange rw = valid_taps(ow, g.kernel[2], g.stride[2], g.padding[2], g.dilation[2], W);
      int64_t n = 0;
      for (int64_t kt = rt.begin; kt < rt.end; ++kt) {
        const int64_t it = ot * g.stride[0] - g.padding[0] + kt * g.dilation[0];
        for (int64_t kh = rh.begin; kh < rh.end; ++kh) {
          const int64_t ih = oh * g.stride[1] - g.padding[1] + kh * g.dilation[1];
          for (int64_t kw = rw.begin; kw < rw.end; ++kw, ++n) {
            const int64_t iw = ow * g.stride[2] - g.padding[2] + kw * g.dilation[2];
            x_offsets[n] = ndhwc_offset(b, it, ih, iw, 0, T, H, W, C);
            w_offsets[n] = ((kt * g.kernel[1] + kh) * g.kernel[2] + kw) * Cout;
          }
        }
      }
      accumulate_channels(C, n, x_offsets, w_offsets, input, weight, bias, out_row + ow * Cout);
      ++ow;
    }
    return;
  }
  // m > 1: the per-element formula of depthwise3d_math.h (the one the CUDA kernel runs).
  for (int64_t ow = 0; ow < g.out[2]; ++ow)
    for (int64_t o = 0; o < Cout; ++o)
      out_row[ow * Cout + o] = static_cast<scalar_t>(
          forward_element<scalar_t, acc_t>(g, input, weight, bias, b, ot, oh, ow, o));
}

// ---------------------------------------------------------- forward, kW = 3 (register-blocked rows)
// m == 1, kernel width 3, W dilation 1, W stride 1 or 2 (the depthwise convs of X3D, CSN, S3D, and
// the input gradient of stride-1 ones): every output position of a row goes through a register
// block of P positions × one channel vector, the W borders included (source positions in the
// padding read as zero), so no position takes the per-tap-list path.
//
// Positions per block: the block's source window, its P sums and one weight fill the registers
// (16 + 14 + 1 of 32 at 512 bits; 9 + 7 + 1 of 16 below); W stride 2 reads a window twice as wide.
// The widths: 14 and 7 tile 7·2^k (224-pixel crops), 10 and 5 tile 5·2^k (X3D-XS/S's 160-pixel
// crops: rows of 5, 10, 20); with only 14, 7, 4 a row of 5 ran 8 positions, one of 10 ran 14.
constexpr int kBlockWidths[] = {14, 10, 7, 5, 4, 1};
template <int S>
constexpr int max_block_width() { return cpu::kVecBytes == 64 ? (S == 1 ? 14 : 7) : (S == 1 ? 7 : 5); }
// Where positions are n·64 bytes apart with 4 | n (C = 64, 128, 192, 256 fp32), a channel group's lines
// of a row fall into 128 / gcd(n, 64) of the L1's 64 sets (C = 128: 16; rows and planes of such a
// tensor land on the same sets), the rows a band reuses do not stay in L1, and the blocks' window
// loads come from L2. There 4-wide blocks (6 loads, 12 FMAs per row) ran faster than 14-wide (16
// loads, 42 FMAs) at 512 bits: Intel Xeon, 4xCx8x28^2, two threads, in-process A/Bs (order shuffled,
// p20 of 30-50 rounds, four runs on a noisy VM), data in L2/L3: forward C = 64 -8..-24 %, 128 -4..-31 %,
// 192 -21..-26 %, 256 -8..-29 %; fused backward -5..-10 % (once +6 % at C = 192); with the inputs
// from memory (after native's step) within +-5 %. Not where the sets are not the problem (C = 96
// equal, C = 108 +10 %: its split loads), nor at 256 bits (7-wide blocks; 4-wide within +-6 %), nor for
// bf16 (C = 128 and 256: 9-17 % slower).
constexpr int kConflictBlockW = 4;
// Loop order (forward_k3): work items are boxes of output rows -- one batch index, a chunk of output
// planes and a band of up to kBandRows rows (Boxes) -- whose input rows fit in L2 (kItemInputBytes).
// Within an item the channels go in groups of two 64-byte lines per position (group_vectors: 2 vectors at
// 512 bits, 4 at 256, 8 at 128; one line where the output is streamed; all channels where positions do
// not start lines: positions_start_lines), outermost, and each group sweeps the item's planes and rows: a
// group's input rows are reused from L1 by the rows of the band and the planes after it, and the box's
// input lines come from memory once (for the first group) and from L2 for the others. While the later
// groups run, the next item's new input rows are prefetched into L2, spread over the register blocks, so
// that its first group does not wait on memory. AMD Zen 4, 4x96x8x28^2, two threads, each call's input
// cold: 1.8 -> 1.1 ms with the streaming stores below (one channel vector over whole output planes
// before: every 64-byte line of a position read in a separate pass over the plane, ~25 % of the FMA peak
// against ~80 % with the data in L2; all channels of a row at a time: no reuse of a row from L1 across
// planes).
constexpr int kBandRows = 4;
constexpr int64_t kItemInputBytes = 512 * 1024;
constexpr int kLineBytes = 64;
// Channel vectors per group of forward_k3's loop order (see "Loop order" above): two 64-byte lines per
// position, the pair the L2 spatial prefetcher fetches together. Intel Xeon, 4x96x8x28^2, two threads,
// same-process A/B against one line (order shuffled per round): module step (fwd+bwd) 6-7 % faster on
// both paths after native's step and 6-9 % back to back, the forward after native's step 0-9 % (AVX-512)
// and 12 % (AVX2); four lines no better. With streaming stores one line, the group streams_output's
// 4 KiB-aliasing rule was derived and measured for.
int group_vectors(bool stream) { return (stream ? kLineBytes : 2 * kLineBytes) / cpu::kVecBytes; }
// Whether each position of a channels-innermost tensor starts a 64-byte line (C · element size a multiple
// of 64). Where not (X3D's 54, 108, 216 channels in fp32), a line holds the end of one position and the
// start of the next, and a two-line group is not two lines: the lines at a group's edges are the next
// group's too and came into L1 once per group. There forward_k3's rows (and the fused backward's
// input-gradient rows) take all channels of a row in one group (split only where the boxes are too few
// for the threads): Zen 4, two threads, same-process A/Bs (60 rounds alternating, medians), forward
// -5..-18 % on both paths at 4x108x8x28^2, 4x216x8x14^2 and the X3D-S shapes (2x54x13x40^2 ..
// 2x216x13x10^2, stride 1 and 2), both gradients -2..-9 %. Not where positions start lines: there
// (4x96x8x28^2 and x56^2, 4x192x8x14^2, 2x432x13x20^2, ...) -13..+15 %, no rule.
bool positions_start_lines(const Geometry& g, int64_t element_bytes) {
  return g.channels * element_bytes % kLineBytes == 0;
}
// Whether tensors of `bytes` an op is about to read or write are likely in the last-level cache
// already: at most a quarter of it (the layers around them keep theirs there too). Then the next
// work item's rows need no software prefetch and an output no streaming stores (see streams_output
// and the two SpreadPrefetch users). An unknown size (0) counts as too small.
bool likely_in_last_level_cache(int64_t bytes) { return bytes <= cpu_isa::last_level_cache_bytes() / 4; }

// Outputs larger than this per thread (more than its L2 can keep for a consumer) and than a quarter of
// the last-level cache may be written with streaming stores (fp32, aligned whole vectors): the line is
// not read from memory first. At 256 bits the two halves of a line are streamed back to back (conv_row_k3's
// line pairs) and meet in the write-combining buffers. Zen 4 (32 MB L3), 4x96x8x28^2,
// each call's tensors cold: AVX-512 two threads 1.5 -> 1.1 ms, AVX2 one thread 3.5 -> 2.2 ms; a BatchNorm
// + ReLU on the output after it took the same time (1.13 vs 1.20 ms) either way. See streams_output.
constexpr int64_t kStreamBytesPerThread = 1024 * 1024;

// Whether forward_k3 writes its output with streaming stores (besides the dtype and width: kStreams):
// - only where every position starts a line (C a multiple of 16 floats, output line-aligned): with
//   C = 108 most vectors straddle two lines, and streaming the aligned ones among plain stores to the
//   same lines made the AVX2 forward slower (4x108x8x28^2, two threads: 2.2-2.4 -> 2.8-3.1 ms);
// - at 256 bits only for outputs above a quarter of the last-level cache: a smaller one's lines are
//   likely still cached (the allocator hands out recently written memory, and the layers around keep
//   theirs in L3), and a streaming store to a cached line first evicts it. Intel Xeon with a 480 MB L3,
//   4x96x8x28^2 (9.6 MB out), two threads, in-process A/B: plain stores 1.0-1.1 ms against streaming
//   2.6-3.6 ms (AVX2) right after native's conv. At 512 bits (a store is a whole line) at any size:
//   7fd9c13 measured plain 1.05-1.15 against streaming 1.8-1.9 ms there, but session 36 on the
//   same Xeon, in the bench's cycles (each variant after native's module step, variants shuffled per
//   round, 30 rounds, medians, phases below differing), 4x96x8x28^2 module fwd+bwd 5.4-5.6 -> 4.8-4.9
//   ms and no-grad forward 1.76-1.78 -> 1.30-1.33; 4x48x8x56^2 10.7 -> 9.0 and 3.09 -> 2.18;
//   4x192x8x14^2 3.57 -> 3.42 and 1.04 -> 0.92; 4x432x8x7^2 2.53 -> 2.40 and 0.84 -> 0.60;
// - not where a position is a whole number of 128-byte pairs of lines (C·4 a multiple of 128) and the
//   output and input have the same 128-byte phase (bit 6 of their distance 0): then the input lines a
//   channel group loads are 4 KiB aliases of output lines it has just stored (the same low 12 address
//   bits; with the phases differing, only lines of another group are), and such loads wait for the
//   streaming stores ahead of them to leave the store buffer. Same Intel, back to back: AVX2 2.1 vs
//   1.2 ms, AVX-512 1.27 vs 1.12 (plain stores: 1.04 vs 0.97 ms). Not measured on AMD; session 24 saw
//   the AVX2 forward take 0.9 ms in one process and 1.9 in the next on Zen 4, which this would explain.
//   The ops' results come from cpu_block_cache::empty in the other phase of the operand the kernel
//   reads (depthwise3d_ops.cpp), so this rule bites only where that cache is off or the result small:
//   before, every big result of session 36's runs had the equal phase (PyTorch's and the cache's big
//   blocks sit at the same offset in their pages), and none streamed. Bench workload of the quick run's
//   channels_last_3d fwd+bwd (4x96x8x28^2, AVX-512, two threads, after native's step, medians of 35,
//   two alternations): 6.75 / 6.40 ms before both changes -> 5.86 / 5.19.
// (Streaming::kAlways / kNever: see depthwise3d_kernels.h.)
bool streams_output(const Geometry& g, const void* input, const void* output, int64_t output_bytes, int64_t threads) {
  const auto in = reinterpret_cast<uintptr_t>(input), out = reinterpret_cast<uintptr_t>(output);
  const int64_t position_bytes = g.channels * int64_t(sizeof(float));
  const bool lines = positions_start_lines(g, sizeof(float)) && out % kLineBytes == 0;
  const bool aliasing_phase = position_bytes % (2 * kLineBytes) == 0 && ((out - in) / kLineBytes) % 2 == 0;
  switch (streaming()) {
    case Streaming::kAlways: return lines;
    case Streaming::kNever: return false;
    case Streaming::kAuto: break;
  }
  const bool likely_uncached = cpu::kVecBytes == 64 || !likely_in_last_level_cache(output_bytes);
  return lines && output_bytes > threads * kStreamBytesPerThread && likely_uncached && !aliasing_phase;
}

// Where positions do not start lines (C·4 not a multiple of 64: X3D's 54, 108 and 216 channels), a
// line of the output holds parts of two positions, written by different channel groups at different
// times, so no vector store can stream it (see the first rule above) and every output line was read
// from memory before being written. There forward_k3 writes a box's rows into a per-thread buffer
// (L2-resident: a box's input takes at most kItemInputBytes) and, after the box's last channel group,
// streams them to the output whole lines at a time (stream_copy), under streams_output's size rules.
// Zen 4 (1 MiB L2, 32 MB L3), two threads, module calls in the bench's cycle (each variant after
// native's step; same process, 30 rounds, medians; the variants' order swapped between processes, as
// the second slot measured ~10 % faster with identical code), buffered against plain stores:
// 4x108x8x28^2 forward -16 % (AVX-512) / -23 % (AVX2), fwd+bwd -6 % / -8 %; 4x54x8x28^2 and
// 4x216x8x14^2 (5.4 MB, AVX-512 only: the AVX2 rule keeps them plain) forward -4 % / 0 %, fwd+bwd
// -1..-3 %. The fused backward's input-gradient rows (backward_impl) go through such a buffer per chunk.
bool streams_buffered_rows(int64_t output_bytes, int64_t threads);
bool streams_rows(const Geometry& g, int64_t output_bytes, int64_t threads) {
  if (positions_start_lines(g, sizeof(float))) return false;  // streams_output's case
  return streams_buffered_rows(output_bytes, threads);
}
// The size rule of rows written through a buffer and streamed out whole lines at a time (stream_copy):
// streams_rows' and the W-stride-2 input gradient's (input_grad_row_w2).
bool streams_buffered_rows(int64_t output_bytes, int64_t threads) {
  switch (streaming()) {
    case Streaming::kAlways: return true;
    case Streaming::kNever: return false;
    case Streaming::kAuto: break;
  }
  const bool likely_uncached = cpu::kVecBytes == 64 || !likely_in_last_level_cache(output_bytes);
  return output_bytes > threads * kStreamBytesPerThread && likely_uncached;
}

// Stores lanes [first, L) of v to p + first (the lanes below belong to another channel vector: not
// written, another thread may be writing them). fp32 at 512 / 256 bits: one masked store (X3D's
// C = 108, one thread, Zen 5: forward 1-2 %, input gradient 3-5 % faster than the round trip
// through the stack below).
template <typename T, typename V>
__attribute__((always_inline)) inline void store_lanes(T* p, const V& v, int first) {
  constexpr int L = sizeof(V) / sizeof(v[0]);
#if FASTVID_VEC_BYTES == 64
  if constexpr (std::is_same_v<T, float> && sizeof(V) == 64) {
    _mm512_mask_storeu_ps(p, static_cast<__mmask16>(0xFFFFu << first), (__m512)v);
    return;
  } else if constexpr (std::is_same_v<T, float> && sizeof(V) == 32) {  // conv_row_k3's half tails
    _mm256_mask_storeu_ps(p, static_cast<__mmask8>(0xFFu << first), (__m256)v);
    return;
  }
#elif FASTVID_VEC_BYTES == 32
  if constexpr (std::is_same_v<T, float>) {
    const cpu::I32 lane = {0, 1, 2, 3, 4, 5, 6, 7};
    _mm256_maskstore_ps(p, (__m256i)(lane >= first), (__m256)v);
    return;
  }
#endif
  T tmp[L];
  store_vec(tmp, v);
  std::memcpy(p + first, tmp + first, (L - first) * sizeof(T));
}

// Whether store_line streams: fp32 vectors of 32 or 64 bytes (the AVX2 and AVX-512 paths).
template <typename T>
constexpr bool kStreams = std::is_same_v<T, float> && FASTVID_VEC_BYTES >= 32;

// Stores v to p with a streaming (non-temporal) store where p is aligned to the vector (forward_k3 streams
// only where all whole vectors are), else a plain one.
// Callers fence (_mm_sfence) before their writes are read by another thread.
template <typename T, typename V>
__attribute__((always_inline)) inline void store_line(T* p, const V& v) {
#if FASTVID_VEC_BYTES == 64
  if constexpr (kStreams<T> && sizeof(V) == 64) {
    if ((reinterpret_cast<uintptr_t>(p) & 63) == 0) return _mm512_stream_ps(p, (__m512)v);
  }
#elif FASTVID_VEC_BYTES == 32
  if constexpr (kStreams<T>) {
    if ((reinterpret_cast<uintptr_t>(p) & 31) == 0) return _mm256_stream_ps(p, (__m256)v);
  }
#endif
  store_vec(p, v);
}

// dst[0, n) = src[0, n), the whole 64-byte lines of dst with streaming stores (fp32 at 256 / 512 bits),
// the partial lines at either end with plain ones. Callers fence (_mm_sfence).
template <typename T>
void stream_copy(T* dst, const T* src, int64_t n) {
#if FASTVID_VEC_BYTES >= 32
  if constexpr (kStreams<T>) {
    constexpr int64_t kLine = kLineBytes / int64_t(sizeof(T));
    const int64_t to_line = (kLineBytes - reinterpret_cast<uintptr_t>(dst) % kLineBytes) % kLineBytes;
    const int64_t head = std::min<int64_t>(n, to_line / int64_t(sizeof(T)));
    std::memcpy(dst, src, head * sizeof(T));
    int64_t i = head;
    for (; i + kLine <= n; i += kLine) {
#if FASTVID_VEC_BYTES == 64
      _mm512_stream_ps(dst + i, _mm512_loadu_ps(src + i));
#else
      _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
      _mm256_stream_ps(dst + i + 8, _mm256_loadu_ps(src + i + 8));
#endif
    }
    std::memcpy(dst + i, src + i, (n - i) * sizeof(T));
    return;
  }
#endif
  std::memcpy(dst, src, n * sizeof(T));
}

// The calling thread's buffer of at least n values (the rows stream_copy streams out), kept across calls: no
// allocation per call. forward_k3's boxes and the fused backward's chunks share it (they never nest).
template <typename T>
T* thread_rows_buffer(int64_t n) {
  thread_local std::vector<T> buffer;
  if (buffer.size() < size_t(n)) buffer.resize(n);
  return buffer.data();
}

// Prefetches runs of memory into L2, a few 64-byte lines per step(): the next work item's rows,
// fetched while the current item computes from L2 (the loop orders of forward_k3 and the weight
// gradient), instead of loaded when that item starts and waits on them.
class SpreadPrefetch {
 public:
  void clear() { runs_.clear(), run_ = 0, line_ = 0, lines_ = 0, per_step_ = 0; }
  void add(const void* p, int64_t bytes) {
    const int64_t lines = (bytes + kLineBytes - 1) / kLineBytes;
    if (lines > 0) runs_.push_back({static_cast<const char*>(p), lines}), lines_ += lines;
  }
  // The lines added are spread evenly over `steps` calls of step().
  void spread_over(int64_t steps) { per_step_ = steps > 0 ? (lines_ + steps - 1) / steps : lines_; }
  void step() {
    for (int64_t k = 0; k < per_step_ && run_ < runs_.size(); ++k) {
      __builtin_prefetch(runs_[run_].first + line_ * kLineBytes, 0, 2);  // into L2 (prefetcht1)
      if (++line_ == runs_[run_].second) ++run_, line_ = 0;
    }
  }

 private:
  std::vector<std::pair<const char*, int64_t>> runs_;
  size_t run_ = 0;
  int64_t line_ = 0, lines_ = 0, per_step_ = 0;
};

// Rows (b, plane, row) in band order: per batch item, bands of `band` rows along H, each band's rows plane
// by plane (band 0 or >= height: the plain order). Where a row reads rows of kT planes of another tensor
// (the input gradient grad_output's, the weight gradient the input's), walking a band through the planes
// keeps the rows it reads in L2 for the next planes, while the plain order reads them from memory once
// per T tap when planes are larger than L2.
struct BandOrder {
  int64_t planes, height, band;
  int64_t row(int64_t index) const {
    if (band <= 0 || band >= height) return index;
    const int64_t per_item = planes * height, b = index / per_item, i = index % per_item;
    const int64_t bands = (height + band - 1) / band;
    const int64_t k = std::min(i / (band * planes), bands - 1), within = i - k * band * planes;
    const int64_t rows = std::min(band, height - k * band);  // the last band may be lower
    return b * per_item + (within / rows) * height + k * band + within % rows;
  }
};
// The band height such that the rows a band reads per plane, `stride` per row plus `reach` - stride, over
// all planes it reads (`source_plane_row_bytes`: the bytes of one row in each of them), take at most half
// of L2. Zen 4 (1 MiB L2), two threads, same-process A/B over the band height, X3D-S's stride-2 layers
// (2x54x13x80^2, 2x108x13x40^2, 2x216x13x20^2): the weight gradient's bands of 2 / 4 / 8 rows (this rule:
// 4 at all three) against the plain order -17..-33 % / -16..-26 % / -6..-25 % at 80^2 and 40^2, -5..-8 %
// at 20^2 (with 8 at 40^2 10 % slower than 4); the input gradient (kW = 3 W-stride-2 rows) bands of 2, 8
// and 36 input rows within 5 % of one another, 3-10 % faster than the plain order.
int64_t rows_per_band(int64_t source_plane_row_bytes, int64_t stride, int64_t reach) {
  const int64_t rows_read = cpu_isa::l2_cache_bytes() / 2 / std::max<int64_t>(1, source_plane_row_bytes);
  return std::max<int64_t>(1, (rows_read - reach) / stride + 1);
}

// Half tails: at 512 bits a channel tail of at most 8 fp32 runs in a 256-bit vector (from C - 8), not in a
// 512-bit one overlapping the vector before (C = 24 computed 32 channels, 40 computed 48, 54 computed 64);
// on Zen 4 a 256-bit FMA takes half a 512-bit one's time (on CPUs with two 512-bit FMA units the half
// vector costs the same time). Used by conv_row_k3 (fp32 only: store_vec narrows full-width vectors) and
// weight_grad_rows_k3. Same-process A/B (40 rounds alternating, medians, inputs warm), AVX-512 path,
// forward: 4x24x8x56^2 -10 % (two threads) / -13 % (one), 4x40x8x56^2 -10 / -4 %, 2x54x13x40^2 -3 / -4 %
// (4x96x8x28^2, no tail, -2.5 %: the noise); fwd+bwd -3..-4 % at C = 24 and 40.
typedef float HalfVec __attribute__((vector_size(32)));
bool has_half_tail(int64_t C) {
  constexpr int64_t L = Vec<float>::lanes;
  return cpu::kVecBytes == 64 && C % L != 0 && C % L <= L / 2;
}

// Where a register block's source window leaves its row (conv_block_k3): nowhere, at its first position
// only (the left padding of 1), at its last only (the right one), or anywhere (bounds from q0 at run time).
// The first three are template cases, so the unrolled window loads carry no bounds tests: at 512 bits
// every block of a 28-wide row is a left or right one. Zen 4, 4x96x8x28^2 cl3d, two threads, in-process
// A/B against kBorderAny for both: forward and input gradient 4-5 % (AVX-512) and 5-7 % (AVX2) faster.
enum BlockBorder { kBorderNone, kBorderLeft, kBorderRight, kBorderAny };

// One register block: P output positions, the channel vector V at c0 (the path's vector, or a 256-bit
// one for conv_row_k3's half tails):
//   out[p·C + c] = init[c] + Σ_r Σ_{k<3} src_rows[r][(q0 + p·S + k)·C + c] · w_rows[r][k·C + c]
// over the (kt, kh) rows r. Per row the source window (N vectors) is loaded once into registers,
// then each tap's weight vector is used for all P positions; per position the taps are added in tap
// order (as forward_element). Border (BlockBorder): window positions outside [0, width) are the zero padding (a
// zero product where forward_element skips the tap: the same sum for finite weights). The sums go to
// `to` (BlockOut).
template <typename scalar_t, typename acc_t>
struct BlockOut {
  scalar_t* out;  // position p's vector at out + p·step
  int64_t step;
  int first_lane;  // lanes below it are not stored
  bool stream;
  // Streamed fp32 at 256 bits (conv_row_k3's line pairs): the line's first vector of each position,
  // at line_head + p·lanes, streamed just before this block's vector (the line's second).
  const acc_t* line_head;
};
template <int P, int S, int Border, typename V, typename scalar_t, typename acc_t>
__attribute__((always_inline)) inline void conv_block_k3(int64_t rows, const scalar_t* const* src_rows,
                                                         const acc_t* const* w_rows, int64_t C, int64_t q0,
                                                         int64_t width, const acc_t* init, int64_t c0,
                                                         const BlockOut<scalar_t, acc_t>& to) {
  constexpr int N = (P - 1) * S + 3;  // source positions read
  V a[P];
  const V start = init != nullptr ? load_vec<V>(init + c0) : V{};
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p) a[p] = start;
  // Window positions [lo, hi) lie inside the row.
  const int64_t lo = Border == kBorderLeft ? 1 : Border == kBorderAny ? std::max<int64_t>(0, -q0) : 0;
  const int64_t hi = Border == kBorderRight ? N - 1 : Border == kBorderAny ? std::min<int64_t>(N, width - q0) : N;
  for (int64_t r = 0; r < rows; ++r) {
    // The empty asm statement keeps gcc from giving every window position its own offset register
    // (too few registers: it spills them).
    const scalar_t* x = src_rows[r] + q0 * C + c0;
    V xs[N];
#pragma GCC unroll 32
    for (int i = 0; i < N; ++i, x += C) {
      asm("" : "+r"(x));
      xs[i] = Border != kBorderNone && (i < lo || i >= hi) ? V{} : load_vec<V>(x);
    }
    const acc_t* wp = w_rows[r] + c0;
#pragma GCC unroll 3
    for (int k = 0; k < 3; ++k) {
      const V w = load_vec<V>(wp + k * C);
#pragma GCC unroll 16
      for (int p = 0; p < P; ++p) a[p] += xs[p * S + k] * w;
    }
  }
#pragma GCC unroll 16
  for (int p = 0; p < P; ++p) {
    scalar_t* dst = to.out + p * to.step;
    if (to.line_head != nullptr) {
      store_line(dst - Vec<acc_t>::lanes, load_vec<V>(to.line_head + p * Vec<acc_t>::lanes));
      store_line(dst, a[p]);
    } else if (to.first_lane > 0) {
      store_lanes(dst, a[p], to.first_lane);
    } else if (to.stream) {
      store_line(dst, a[p]);
    } else {
      store_vec(dst, a[p]);
    }
  }
}

// One output row in P-position blocks (the last block ends at the row's end, overlapping the one
// before it where P does not divide the width), for the channel vectors [v_begin, v_end) (vector v
// starts at channel v·L; the last one, where C is not a multiple of L, at C - L). `prefetch`, where
// given, steps once per block (forward_k3's next-box prefetch).
//
// Line pairs: a streamed fp32 output at 256 bits has two vectors per 64-byte line, computed by two
// blocks in turn. The first block's sums wait in line_head (L1) and the second streams both halves
// back to back, so the write-combining buffer receives the whole line at once; streamed one block
// apart (7 positions x 9 rows of FMAs), the halves could leave separately, each a partial-line write.
// AMD Zen 4, AVX2 path, 4x96x8x28^2, each call's input cold, same-process A/B (40 rounds alternating,
// medians, three runs): two threads -15/-22/-21 %, one thread -0.3/-7.3/-1.4 %; 4x64x8x56^2 two threads
// +0.2/-28/+5 %, one -3..+3 %. The gains came in the runs where memory was busy (plain 2.4-2.8 ms; on a
// quiet machine both ~1.6 ms).
template <int P, int S, typename scalar_t, typename acc_t>
void conv_row_k3(const Geometry& g, int64_t rows, const scalar_t* const* src_rows, const acc_t* const* w_rows,
                 const acc_t* init, scalar_t* out_row, int64_t v_begin, int64_t v_end, bool stream,
                 SpreadPrefetch* prefetch = nullptr) {
  constexpr int L = Vec<acc_t>::lanes, N = (P - 1) * S + 3;
  constexpr bool kLinePairs = kStreams<scalar_t> && cpu::kVecBytes == 32;
  const int64_t C = g.channels, W = g.in[2], OW = g.out[2], pad = g.padding[2];
  const bool pairs = kLinePairs && stream;
  // Streaming happens only where positions start lines: whole lines per group (group_vectors).
  TORCH_INTERNAL_ASSERT(!pairs || (v_begin % 2 == 0 && v_end % 2 == 0 && C % (2 * L) == 0));
  alignas(64) acc_t line_head[kLinePairs ? P * L : 1];
  constexpr bool kHalfTails = cpu::kVecBytes == 64 && std::is_same_v<scalar_t, float>;  // see has_half_tail
  const int64_t last = (C + L - 1) / L - 1;
  const bool half_tail = kHalfTails && has_half_tail(C);
  for (int64_t ow0 = 0; ow0 < OW; ow0 += P) {
    const int64_t start = std::min(ow0, OW - P), q0 = start * S - pad;
    scalar_t* out = out_row + start * C;
    const int border = q0 >= 0 && q0 + N <= W ? kBorderNone
                       : q0 == -1 && N <= W + 1 ? kBorderLeft
                       : q0 >= 0 && q0 + N == W + 1 ? kBorderRight : kBorderAny;
    // The block over channels [c0, c0 + lanes of vec) for this border case.
    auto run_block = [&](auto vec, int64_t c0, const BlockOut<scalar_t, acc_t>& to) {
      using V = decltype(vec);
      auto block = [&](auto kind) {
        conv_block_k3<P, S, decltype(kind)::value, V>(rows, src_rows, w_rows, C, q0, W, init, c0, to);
      };
      if (border == kBorderNone) block(std::integral_constant<int, kBorderNone>{});
      else if (border == kBorderLeft) block(std::integral_constant<int, kBorderLeft>{});
      else if (border == kBorderRight) block(std::integral_constant<int, kBorderRight>{});
      else block(std::integral_constant<int, kBorderAny>{});
    };
    for (int64_t v = v_begin; v < v_end; ++v) {
      if constexpr (kHalfTails) {
        if (half_tail && v == last) {
          const int64_t c0 = C - L / 2;
          run_block(HalfVec{}, c0, BlockOut<scalar_t, acc_t>{out + c0, C, static_cast<int>(v * L - c0), false, nullptr});
          continue;
        }
      }
      const int64_t c0 = std::min(v * L, C - L);
      BlockOut<scalar_t, acc_t> to{out + c0, C, static_cast<int>(v * L - c0), stream, nullptr};
      if constexpr (kLinePairs) {
        if (pairs && v % 2 == 0) to = {line_head, L, 0, false, nullptr};
        else if (pairs) to.line_head = line_head;
      }
      run_block(typename Vec<acc_t>::type{}, c0, to);
    }
    if (prefetch != nullptr) prefetch->step();
  }
}

// Whether forward_k3 handles the geometry (else forward_row).
template <typename acc_t>
bool forward_k3_applies(const Geometry& g) {
  return g.multiplier == 1 && g.kernel[2] == 3 && g.dilation[2] == 1 && (g.stride[2] == 1 || g.stride[2] == 2) &&
         g.channels >= Vec<acc_t>::lanes;
}

// The block width for a row of OW outputs: the candidate with the fewest window loads + FMAs
// (blocks × (P·S + 5)), P <= OW. Below 512 bits a stride-2 block of 5 needs 17 vectors (11 of window,
// 5 sums, a weight) in 16 registers and ran 1-4 % slower per position than blocks of 4 (AVX2, Zen 4,
// rows of 20 and 40): it counts 2 more, so it runs only where it saves blocks (rows of 5, 10, 25, ...).
template <int S>
int block_width(int64_t OW) {
  int best = 1;
  int64_t best_cost = OW * (S + 5);
  for (int P : kBlockWidths) {
    if (P > OW || P > max_block_width<S>()) continue;
    const int spill = cpu::kVecBytes < 64 && S == 2 && P == 5 ? 2 : 0;
    const int64_t cost = (OW + P - 1) / P * (P * S + 5 + spill);
    if (cost < best_cost) best = P, best_cost = cost;
  }
  return best;
}

// Output row `row` = (b·OT + ot)·OH + oh, channel vectors [v_begin, v_end), written to out_row.
template <int S, typename scalar_t>
void forward_row_k3(const Geometry& g, const scalar_t* input, const at::opmath_type<scalar_t>* weight,
                    const at::opmath_type<scalar_t>* bias, scalar_t* out_row, int64_t row, int P, int64_t v_begin,
                    int64_t v_end, bool stream, SpreadPrefetch* prefetch = nullptr) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = g.channels, T = g.in[0], H = g.in[1], OT = g.out[0], OH = g.out[1];
  const int64_t b = row / (OT * OH), ot = (row / OH) % OT, oh = row % OH;
  const TapRange rt = valid_taps(ot, g.kernel[0], g.stride[0], g.padding[0], g.dilation[0], T);
  const TapRange rh = valid_taps(oh, g.kernel[1], g.stride[1], g.padding[1], g.dilation[1], H);
  const scalar_t* src_rows[7 * 7];
  const acc_t* w_rows[7 * 7];
  const int64_t rows = tap_rows(g, b, ot, oh, rt, rh, input, weight, 3 * C, src_rows, w_rows);
  auto run = [&](auto block) {
    constexpr int kP = decltype(block)::value;
    if constexpr (kP <= max_block_width<S>())
      conv_row_k3<kP, S>(g, rows, src_rows, w_rows, bias, out_row, v_begin, v_end, stream, prefetch);
    else
      TORCH_INTERNAL_ASSERT(false, "depthwise3d: block width ", kP, " above this path's register budget");
  };
  switch (P) {
    case 14: return run(std::integral_constant<int, 14>{});
    case 10: return run(std::integral_constant<int, 10>{});
    case 7: return run(std::integral_constant<int, 7>{});
    case 5: return run(std::integral_constant<int, 5>{});
    case 4: return run(std::integral_constant<int, 4>{});
    default: return run(std::integral_constant<int, 1>{});
  }
}

// Input indices [begin, end) that output indices [o0, o1) read along one dim.
struct IndexRange {
  int64_t begin, end;
};
IndexRange input_range(int64_t o0, int64_t o1, int64_t k, int64_t stride, int64_t padding, int64_t dilation, int64_t in) {
  return {std::max<int64_t>(0, o0 * stride - padding),
          std::min<int64_t>(in, (o1 - 1) * stride - padding + (k - 1) * dilation + 1)};
}

// One work item of forward_k3: output planes [t0, t1) and rows [h0, h1) of batch index b, channel
// groups [v0, v1) (groups of group_vectors vectors).
struct Box {
  int64_t b, t0, t1, h0, h1, v0, v1;
};

// The items: boxes whose input rows take at most kItemInputBytes: of the bands of up to kBandRows output
// rows, each with as many planes as fit (at least one), the one that reads the fewest input rows per
// output row (ties: the taller band); the channel groups split further only where there would be fewer
// than 4 items per thread (split()). With H stride 2 the tallest band was taken before: 4 rows reading
// 9, which at X3D-S's row sizes (17 KB) left room for one plane, each input plane read by three boxes
// (6.75 input rows per output row; 2 rows x 4 planes: 3.75). Zen 4, two threads, same-process A/B:
// stride-2 forwards 2x54x13x80², 2x108x13x40², 2x216x13x20², 4x192x8x28² -12..-29 % on both paths,
// 2x432x13x10² and 4x48x8x56² -2..-7 %; stride 1 keeps its boxes. Ordered (b, plane chunk, band,
// channel split), the last fastest: consecutive items share input rows.
struct Boxes {
  int64_t bands, band, chunks, planes, wanted_splits, splits = 1, per_split = 1, groups = 1;
  Boxes(const Geometry& g, int64_t threads, int64_t element_bytes) {
    const int64_t OT = g.out[0], OH = g.out[1];
    const int64_t row_bytes = g.in[2] * g.channels * element_bytes;
    auto in_rows = [&](int64_t n, int d) { return (n - 1) * g.stride[d] + (g.kernel[d] - 1) * g.dilation[d] + 1; };
    band = planes = 1;
    double fewest = std::numeric_limits<double>::infinity();
    for (int64_t n = std::min<int64_t>(kBandRows, OH); n >= 1; --n) {
      if (n > 1 && in_rows(n, 1) * in_rows(1, 0) * row_bytes > kItemInputBytes) continue;
      int64_t p = 1;
      while (p < OT && in_rows(n, 1) * in_rows(p + 1, 0) * row_bytes <= kItemInputBytes) ++p;
      const double reads = double(in_rows(n, 1) * in_rows(p, 0)) / double(n * p);
      if (reads < fewest) fewest = reads, band = n, planes = p;
    }
    bands = (OH + band - 1) / band, chunks = (OT + planes - 1) / planes;
    const int64_t boxes = g.batch * chunks * bands;
    wanted_splits = std::max<int64_t>(1, (4 * threads + boxes - 1) / boxes);
  }
  // Splits each box's channel groups into up to wanted_splits items.
  void split(int64_t groups_) {
    groups = groups_, splits = std::min(groups, wanted_splits), per_split = (groups + splits - 1) / splits;
  }
  int64_t count(const Geometry& g) const { return g.batch * chunks * bands * splits; }
  Box operator()(const Geometry& g, int64_t item) const {
    const int64_t split = item % splits, box = item / splits, h = box % bands, rest = box / bands;
    const int64_t t = rest % chunks, b = rest / chunks;
    return {b, t * planes, std::min(g.out[0], (t + 1) * planes), h * band, std::min(g.out[1], (h + 1) * band),
            split * per_split, std::min(groups, (split + 1) * per_split)};
  }
};

// Adds to `prefetch` the input rows of box `next` that box `cur` does not read (per input plane one
// run of consecutive rows: channels-innermost rows of one plane are contiguous).
template <typename scalar_t>
void add_new_input_rows(SpreadPrefetch& prefetch, const Geometry& g, const scalar_t* input, const Box& cur,
                        const Box& next) {
  const IndexRange nt = input_range(next.t0, next.t1, g.kernel[0], g.stride[0], g.padding[0], g.dilation[0], g.in[0]);
  IndexRange nh = input_range(next.h0, next.h1, g.kernel[1], g.stride[1], g.padding[1], g.dilation[1], g.in[1]);
  if (next.b == cur.b && next.t0 == cur.t0) {  // same planes: rows up to cur's last are in L2 already
    const IndexRange ch = input_range(cur.h0, cur.h1, g.kernel[1], g.stride[1], g.padding[1], g.dilation[1], g.in[1]);
    nh.begin = std::max(nh.begin, ch.end);
  }
  const int64_t row_bytes = g.in[2] * g.channels * int64_t(sizeof(scalar_t));
  for (int64_t it = nt.begin; it < nt.end && nh.end > nh.begin; ++it)
    prefetch.add(input + ndhwc_offset(next.b, it, nh.begin, 0, 0, g.in[0], g.in[1], g.in[2], g.channels),
                 (nh.end - nh.begin) * row_bytes);
}

// Whether forward_k3's rows run kConflictBlockW-wide blocks (see there): fp32 on the 512-bit path, W
// stride 1, positions a multiple of 256 bytes apart, rows at least that wide.
template <int S, typename scalar_t>
bool uses_conflict_blocks(const Geometry& g) {
  return S == 1 && cpu::kVecBytes == 64 && std::is_same_v<scalar_t, float> &&
         g.channels * int64_t(sizeof(float)) % 256 == 0 && g.out[2] >= kConflictBlockW;
}

// What forward_k3 decides once per call for its row calls: the register block width, whether the output
// is streamed, and the channel groups of its loop order (group_vectors). The fused backward's
// input-gradient rows (backward_impl) run under the same plan.
template <int S, typename scalar_t>
struct RowPlan {
  using acc_t = at::opmath_type<scalar_t>;
  int P;
  bool stream, stream_rows;
  int64_t vectors, per_group, groups;

  // min_groups: where positions do not start lines, the channels go in that many groups (forward_k3's
  // boxes' splits; all channels in one by default); elsewhere in two-line groups (group_vectors).
  RowPlan(const Geometry& g, const scalar_t* input, const scalar_t* output, int64_t min_groups = 1) {
    const int64_t output_bytes =
        g.batch * g.out[0] * g.out[1] * g.out[2] * g.channels * int64_t(sizeof(scalar_t));
    P = uses_conflict_blocks<S, scalar_t>(g) ? kConflictBlockW : block_width<S>(g.out[2]);
    stream = kStreams<scalar_t> && streams_output(g, input, output, output_bytes, at::get_num_threads());
    stream_rows = kStreams<scalar_t> && streams_rows(g, output_bytes, at::get_num_threads());
    vectors = (g.channels + Vec<acc_t>::lanes - 1) / Vec<acc_t>::lanes;
    const int64_t split = std::min(vectors, min_groups);  // where positions do not start lines: all channels
    per_group = positions_start_lines(g, sizeof(scalar_t)) ? group_vectors(stream) : (vectors + split - 1) / split;
    groups = (vectors + per_group - 1) / per_group;
  }
  // Output row `row` ((b·OT + ot)·OH + oh), channel group v, into out_row (by default the row of output).
  void run_row(const Geometry& g, const scalar_t* input, const acc_t* weight, const acc_t* bias, scalar_t* output,
               int64_t row, int64_t v, scalar_t* out_row = nullptr, SpreadPrefetch* prefetch = nullptr) const {
    if (out_row == nullptr) out_row = output + row * g.out[2] * g.channels;
    forward_row_k3<S>(g, input, weight, bias, out_row, row, P, v * per_group, std::min(vectors, (v + 1) * per_group),
                      stream, prefetch);
  }
};

template <int S, typename scalar_t>
void forward_k3(const Geometry& g, const scalar_t* input, const at::opmath_type<scalar_t>* weight,
                const at::opmath_type<scalar_t>* bias, scalar_t* output) {
  const int64_t OH = g.out[1];
  const int64_t threads = at::get_num_threads();
  Boxes boxes(g, threads, sizeof(scalar_t));
  const RowPlan<S, scalar_t> plan(g, input, output, boxes.wanted_splits);
  boxes.split(plan.groups);
  // The next box's new input rows come from memory only where the input is unlikely to be in L3. Intel
  // Xeon, 480 MB L3, 4x96x8x28^2, two threads, same-process A/B: without that prefetch 3-17 % faster back
  // to back, after native's conv or after a 64 MB read, -10..+9 % after a 64 MB write (Zen 4, 32 MB L3,
  // session 24: 3-56 % slower without it).
  const bool prefetch_next = !likely_in_last_level_cache(g.batch * g.in[0] * g.in[1] * g.in[2] * g.channels *
                                                         int64_t(sizeof(scalar_t)));
  // A box's output rows through the thread's buffer (streams_rows): every channel group of them.
  const bool buffered = plan.stream_rows && boxes.splits == 1;
  const int64_t row_elements = g.out[2] * g.channels;
  at::parallel_for(0, boxes.count(g), 1, [&](int64_t begin, int64_t end) {
    SpreadPrefetch prefetch;
    scalar_t* box_rows = buffered ? thread_rows_buffer<scalar_t>(boxes.planes * boxes.band * row_elements) : nullptr;
    for (int64_t item = begin; item < end; ++item) {
      const Box box = boxes(g, item);
      prefetch.clear();
      if (prefetch_next && item + 1 < end) add_new_input_rows(prefetch, g, input, box, boxes(g, item + 1));
      // over the register blocks after the first group's (all of them where there is one group). Per block,
      // not per row call: with all channels in one group (positions_start_lines) a box has only its 4-8 row
      // calls, and ~1000 prefetches at once per row stalled on the full miss queue (perf: 70 % of the item
      // loop's samples on the prefetcht1) instead of overlapping the FMAs. Zen 4, two threads, same-process
      // A/B (40 rounds alternating, inputs cold), AVX-512 / AVX2: 2x54x13x80^2 stride 2 -23 / -35 %,
      // 2x108x13x40^2 stride 2 0 / -17 %; eight other X3D-S and 4x96x8x28^2 shapes within +-4 %.
      const int64_t band = box.h1 - box.h0, rows = (box.t1 - box.t0) * band;
      const int64_t blocks_per_row = (g.out[2] + plan.P - 1) / plan.P;
      prefetch.spread_over(std::max<int64_t>(1, box.v1 - box.v0 - 1) * rows * blocks_per_row);
      for (int64_t v = box.v0; v < box.v1; ++v) {
        for (int64_t ot = box.t0; ot < box.t1; ++ot)
          for (int64_t oh = box.h0; oh < box.h1; ++oh) {
            scalar_t* out_row = buffered ? box_rows + ((ot - box.t0) * band + oh - box.h0) * row_elements : nullptr;
            const bool steps = v > box.v0 || box.v1 - box.v0 == 1;
            plan.run_row(g, input, weight, bias, output, (box.b * g.out[0] + ot) * OH + oh, v, out_row,
                         steps ? &prefetch : nullptr);
          }
      }
      if (buffered)  // each plane's rows of the box are consecutive in the output
        for (int64_t ot = box.t0; ot < box.t1; ++ot)
          stream_copy(output + ((box.b * g.out[0] + ot) * OH + box.h0) * row_elements,
                      box_rows + (ot - box.t0) * band * row_elements, band * row_elements);
    }
#if FASTVID_VEC_BYTES >= 32
    if (plan.stream || buffered) _mm_sfence();  // the streaming stores are visible before parallel_for returns
#endif
  });
}

template <typename scalar_t>
void forward_impl(const ForwardArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry& g = a.geo;
  const int64_t Cout = g.out_channels(), OT = g.out[0], OH = g.out[1];
  const int64_t rows = g.batch * OT * OH;
  if (rows == 0 || g.out[2] == 0 || Cout == 0) return;
  const auto* input = static_cast<const scalar_t*>(a.input);
  const auto* weight = static_cast<const acc_t*>(a.weight);
  const auto* bias = static_cast<const acc_t*>(a.bias);
  auto* output = static_cast<scalar_t*>(a.output);
  if (forward_k3_applies<acc_t>(g))
    return g.stride[2] == 1 ? forward_k3<1>(g, input, weight, bias, output) : forward_k3<2>(g, input, weight, bias, output);
  at::parallel_for(0, rows, grain_for(g.out[2] * Cout), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / (OT * OH), ot = (row / OH) % OT, oh = row % OH;
      scalar_t* out_row = output + row * g.out[2] * Cout;
      if (g.multiplier == 1) forward_row<scalar_t, true>(g, input, weight, bias, out_row, b, ot, oh);
      else forward_row<scalar_t, false>(g, input, weight, bias, out_row, b, ot, oh);
    }
  });
}

// ------------------------------------------------------------------------ input gradient
// The [taps, C] weight with its taps in reverse order: the kernel of the stride-1 input gradient
// (flipped_geometry), m == 1.
template <typename acc_t>
std::vector<acc_t> flipped_weight(const Geometry& g, const acc_t* weight) {
  const int64_t C = g.channels;
  std::vector<acc_t> w(g.taps() * C);
  for (int64_t t = 0; t < g.taps(); ++t) std::copy_n(weight + (g.taps() - 1 - t) * C, C, w.data() + t * C);
  return w;
}

// The grad_output rows (kt, kh) the input row (b, it, ih) reads, with their weight rows ([kW][C·m] each):
// their count (at most kT·kH <= 7·7).
template <typename scalar_t, typename acc_t>
int64_t rows_read_by_input_row(const Geometry& g, const scalar_t* grad_output, const acc_t* weight, int64_t b,
                               int64_t it, int64_t ih, const scalar_t** go_rows, const acc_t** w_rows) {
  const int64_t Cout = g.out_channels(), OT = g.out[0], OH = g.out[1], OW = g.out[2];
  int64_t rows = 0;
  for (int64_t kt = 0; kt < g.kernel[0]; ++kt) {
    int64_t ot;
    if (!output_index(it, kt, g.stride[0], g.padding[0], g.dilation[0], OT, &ot)) continue;
    for (int64_t kh = 0; kh < g.kernel[1]; ++kh) {
      int64_t oh;
      if (!output_index(ih, kh, g.stride[1], g.padding[1], g.dilation[1], OH, &oh)) continue;
      go_rows[rows] = grad_output + ndhwc_offset(b, ot, oh, 0, 0, OT, OH, OW, Cout);
      w_rows[rows++] = weight + (kt * g.kernel[1] + kh) * g.kernel[2] * Cout;
    }
  }
  return rows;
}

// One input-gradient row grad_input[b, it, ih, :, :] (a gather: no two tasks write one element).
template <typename scalar_t, bool kUnitMultiplier>
void input_grad_row(const Geometry& g, const scalar_t* grad_output,
                                       const at::opmath_type<scalar_t>* weight, scalar_t* gi_row, int64_t b,
                                       int64_t it, int64_t ih) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = g.channels, m = kUnitMultiplier ? 1 : g.multiplier, Cout = C * m, OW = g.out[2];
  if (kUnitMultiplier) {  // tap list per position, register-blocked channel loop
    int64_t go_offsets[kMaxTaps], w_offsets[kMaxTaps];
    // With W stride or W dilation 1, interior inputs (every W tap of their residue reaches an output)
    // take the sweep, kPositions inputs of one residue iw ≡ r (mod s) at a time. Their W taps are every
    // s-th from kw0 ≡ r + pad (mod s) (dilation 1; every tap for stride 1), tap j reading
    // grad_output[ow0 + p - j·(s == 1 ? d : 1)] for the input iw + s·p, ow0 = (iw + pad - kw0·d) / s.
    // Per position through the tap list below, the 4x48x8x56^2 input gradient with H and W stride 2
    // took 3.5-3.7 ms against the forward's 0.9 (two threads, AVX-512); now 1.1-1.2 (AVX2 3.7 -> 1.3-1.8).
    const int64_t pad_w = g.padding[2], s_w = g.stride[2], d_w = g.dilation[2], kW = g.kernel[2], W = g.in[2];
    const bool sweep = s_w == 1 || d_w == 1;
    const int64_t ow_per_tap = s_w == 1 ? d_w : 1;
    const scalar_t* src_rows[7 * 7];
    const acc_t* w_rows[7 * 7];
    const int64_t rows = rows_read_by_input_row(g, grad_output, weight, b, it, ih, src_rows, w_rows);
    for (int64_t r = 0; r < std::min(s_w, W); ++r) {
      const int64_t kw0 = (r + pad_w) % s_w;
      const int64_t taps = kw0 < kW ? (kW - 1 - kw0) / s_w + 1 : 0;  // kw0, kw0 + s, ... below kW
      for (int64_t iw = r; iw < W;) {
        const int64_t ow0 = (iw + pad_w - kw0 * d_w) / s_w;
        if (sweep && taps > 0 && iw + pad_w >= kw0 * d_w && ow0 >= (taps - 1) * ow_per_tap &&
            ow0 + kPositions <= OW && iw + s_w * (kPositions - 1) < W) {
          const scalar_t* rows_at[7 * 7];
          const acc_t* w_at[7 * 7];
          for (int64_t q = 0; q < rows; ++q) rows_at[q] = src_rows[q] + ow0 * Cout, w_at[q] = w_rows[q] + kw0 * Cout;
          sweep_positions<scalar_t, acc_t>(C, rows, rows_at, w_at, taps, s_w * Cout, -ow_per_tap * Cout, Cout,
                                           nullptr, gi_row + iw * C, s_w * C);
          iw += s_w * kPositions;
          continue;
        }
        int64_t n = 0;
        for (int64_t q = 0; q < rows; ++q) {
          for (int64_t kw = 0; kw < kW; ++kw) {
            int64_t ow;
            if (!output_index(iw, kw, s_w, pad_w, d_w, OW, &ow)) continue;
            go_offsets[n] = (src_rows[q] - grad_output) + ow * Cout;
            w_offsets[n++] = (w_rows[q] - weight) + kw * Cout;
          }
        }
        accumulate_channels<scalar_t, acc_t>(C, n, go_offsets, w_offsets, grad_output, weight, nullptr,
                                             gi_row + iw * C);
        iw += s_w;
      }
    }
    return;
  }
  // m > 1: the per-element formula of depthwise3d_math.h (the one the CUDA kernel runs).
  for (int64_t iw = 0; iw < g.in[2]; ++iw)
    for (int64_t c = 0; c < C; ++c)
      gi_row[iw * C + c] = static_cast<scalar_t>(
          input_grad_element<scalar_t, acc_t>(g, grad_output, weight, b, it, ih, iw, c));
}

// ------------------------------------------- input gradient, kW = 3 with W stride 2 (split by W phase)
// With W stride 2, padding 1 and dilation 1 (X3D's and CSN's downsampling convs), input iw = 2j takes
// the middle tap of output j and iw = 2j + 1 the left tap of output j + 1 and the right one of output j:
//   gi[2j]     = Σ_r w_r[1] · go_r[j]
//   gi[2j + 1] = Σ_r w_r[2] · go_r[j] + w_r[0] · go_r[j + 1]
// over the (kt, kh) pairs r whose grad_output row reaches the input row. A block of N outputs j gives the
// 2N consecutive inputs from 2j0 with N + 1 loads and 3N FMAs per row; `has_next`: go_r[j0 + N] exists
// (else its taps are outside); `outputs`: how many of the 2N inputs exist (an odd W ends on an even one).
template <int N, typename V, typename scalar_t, typename acc_t>
__attribute__((always_inline)) inline void input_grad_block_w2(int64_t rows, const scalar_t* const* go_rows,
                                                               const acc_t* const* w_rows, int64_t C, int64_t c0,
                                                               int64_t j0, bool has_next, int64_t outputs,
                                                               scalar_t* out) {
  V even[N], odd[N];
#pragma GCC unroll 16
  for (int i = 0; i < N; ++i) even[i] = V{}, odd[i] = V{};
  for (int64_t r = 0; r < rows; ++r) {
    const V w0 = load_vec<V>(w_rows[r] + c0), w1 = load_vec<V>(w_rows[r] + C + c0),
            w2 = load_vec<V>(w_rows[r] + 2 * C + c0);
    const scalar_t* g = go_rows[r] + j0 * C + c0;
    V cur = load_vec<V>(g);
    asm("" : "+v"(cur));  // one load per vector, not one per FMA that reads it (see sweep_rows_reuse)
#pragma GCC unroll 16
    for (int i = 0; i < N; ++i) {
      even[i] += w1 * cur;
      odd[i] += w2 * cur;
      if (i + 1 < N || has_next) {
        V next = load_vec<V>(g + (i + 1) * C);
        asm("" : "+v"(next));
        odd[i] += w0 * next;
        cur = next;
      }
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < N; ++i) {
    if (2 * i < outputs) store_vec(out + 2 * i * C + c0, even[i]);
    if (2 * i + 1 < outputs) store_vec(out + (2 * i + 1) * C + c0, odd[i]);
  }
}

template <typename acc_t>
bool input_grad_w2_applies(const Geometry& g) {
  return g.multiplier == 1 && g.kernel[2] == 3 && g.stride[2] == 2 && g.padding[2] == 1 && g.dilation[2] == 1 &&
         g.channels >= Vec<acc_t>::lanes;
}

// One input-gradient row grad_input[b, it, ih, :, :] where input_grad_w2_applies: blocks of N outputs
// along W (the rest in blocks of N/2, N/4, ... 1), each over all channel vectors (the tail as the last
// whole vector, overlapping the one before). With a `buffer` (fp32 rows streamed out), the blocks are
// computed there and each block's whole lines streamed to gi_row as soon as they are complete, so the
// streaming stores spread over the row's work instead of coming in one burst.
template <typename scalar_t>
void input_grad_row_w2(const Geometry& g, const scalar_t* grad_output, const at::opmath_type<scalar_t>* weight,
                       scalar_t* gi_row, scalar_t* buffer, int64_t b, int64_t it, int64_t ih) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = typename Vec<acc_t>::type;
  constexpr int L = Vec<acc_t>::lanes;
  // Registers: 2N accumulators, 3 weights, 2 grad_output vectors (32 zmm / 16 ymm).
  constexpr int N = cpu::kVecBytes == 64 ? 8 : 4;
  const int64_t C = g.channels, OT = g.out[0], OH = g.out[1], OW = g.out[2], W = g.in[2];
  const scalar_t* go_rows[7 * 7];
  const acc_t* w_rows[7 * 7];
  const int64_t rows = rows_read_by_input_row(g, grad_output, weight, b, it, ih, go_rows, w_rows);
  // The grad_output rows of the newest plane the row one plane on reads (its kt = 0 taps), into L2 while
  // this row computes: band order (input_grad_impl) comes to them a band of rows later.
  thread_local SpreadPrefetch next_plane;
  next_plane.clear();
  int64_t next_ot;
  if (it + 1 < g.in[0] && output_index(it + 1, 0, g.stride[0], g.padding[0], g.dilation[0], OT, &next_ot))
    for (int64_t kh = 0; kh < g.kernel[1]; ++kh) {
      int64_t oh;
      if (output_index(ih, kh, g.stride[1], g.padding[1], g.dilation[1], OH, &oh))
        next_plane.add(grad_output + ndhwc_offset(b, next_ot, oh, 0, 0, OT, OH, OW, C),
                       OW * C * int64_t(sizeof(scalar_t)));
    }
  next_plane.spread_over((OW + N - 1) / N);
  scalar_t* out = buffer != nullptr ? buffer : gi_row;
  int64_t streamed = 0;  // elements of the row streamed out so far
  int64_t j0 = 0;
  auto block = [&](auto n) {
    const int64_t outputs = std::min<int64_t>(2 * n, W - 2 * j0);
    for (int64_t c0 = 0; c0 < C; c0 += L)
      input_grad_block_w2<decltype(n)::value, V>(rows, go_rows, w_rows, C, std::min(c0, C - L), j0, j0 + n < OW,
                                                 outputs, out + 2 * j0 * C);
    next_plane.step();
    const int64_t done = (2 * j0 + outputs) * C;  // elements of the row complete
    j0 += n;
    if (buffer == nullptr) return;
    // Up to the last line boundary of gi_row (the line across it waits for the next block), all at the end.
    const int64_t upto =
        done == W * C ? done
                      : done - int64_t(reinterpret_cast<uintptr_t>(gi_row + done) % kLineBytes / sizeof(scalar_t));
    if (upto > streamed) stream_copy(gi_row + streamed, buffer + streamed, upto - streamed), streamed = upto;
  };
  while (j0 + N < OW) block(std::integral_constant<int, N>{});
  auto tail = [&](auto n) {
    if (OW - j0 >= n) block(n);
  };
  if constexpr (N > 4) tail(std::integral_constant<int, 8>{});
  tail(std::integral_constant<int, 4>{});
  tail(std::integral_constant<int, 2>{});
  tail(std::integral_constant<int, 1>{});
}

template <typename scalar_t>
void input_grad_impl(const InputGradArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry& g = a.geo;
  const int64_t C = g.channels, T = g.in[0], H = g.in[1];
  const int64_t rows = g.batch * T * H;
  if (rows == 0 || g.in[2] == 0 || C == 0) return;
  const auto* grad_output = static_cast<const scalar_t*>(a.grad_output);
  const auto* weight = static_cast<const acc_t*>(a.weight);
  if (const auto flipped = flipped_geometry(g)) {
    // Stride 1: the forward's kernel (position-blocked sweeps whose loads walk forward) on grad_output,
    // measured 2.3x (AVX-512) / 1.9x (AVX2) faster than the gather below (4x96x8x28^2, one thread).
    const std::vector<acc_t> w = flipped_weight(g, weight);
    ForwardArgs f;
    f.geo = *flipped, f.dtype = a.dtype, f.input = a.grad_output, f.weight = w.data(), f.output = a.grad_input;
    return forward_impl<scalar_t>(f);
  }
  auto* grad_input = static_cast<scalar_t*>(a.grad_input);
  // Band order: the grad_output rows a band's input rows read stay in L2 from one plane to the next. Its
  // height counted in grad_output rows (stride 1, and about one more row read: kH = 3 with H stride 2),
  // H stride input rows each.
  const int64_t go_row_bytes = g.out[2] * C * int64_t(sizeof(scalar_t));
  const BandOrder order{T, H, g.stride[1] * rows_per_band(g.kernel[0] * go_row_bytes, 1, 2)};
  const bool w2 = input_grad_w2_applies<acc_t>(g);
  const bool w2_stream = w2 && kStreams<scalar_t> &&
                         streams_buffered_rows(rows * g.in[2] * C * int64_t(sizeof(scalar_t)), at::get_num_threads());
  at::parallel_for(0, rows, grain_for(g.in[2] * C), [&](int64_t begin, int64_t end) {
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t row = order.row(idx);
      const int64_t b = row / (T * H), it = (row / H) % T, ih = row % H;
      scalar_t* gi_row = grad_input + row * g.in[2] * C;
      if (w2) {
        input_grad_row_w2<scalar_t>(g, grad_output, weight, gi_row,
                                    w2_stream ? thread_rows_buffer<scalar_t>(g.in[2] * C) : nullptr, b, it, ih);
        continue;
      }
      if (g.multiplier == 1) input_grad_row<scalar_t, true>(g, grad_output, weight, gi_row, b, it, ih);
      else input_grad_row<scalar_t, false>(g, grad_output, weight, gi_row, b, it, ih);
    }
#if FASTVID_VEC_BYTES >= 32
    if (w2_stream) _mm_sfence();
#endif
  });
}

// ------------------------------------------------------------------------ weight (+bias) gradient

// pw[c0 .. c0+NV·lanes) += Σ_i go[i·go_step + c] · x[i·x_step + c], accumulators in registers
// (NV = 0: the single channel c0).
template <int NV, typename scalar_t, typename acc_t>
__attribute__((always_inline)) inline void weight_block(acc_t* pw, const scalar_t* go, const scalar_t* x,
                                                        int64_t count, int64_t go_step, int64_t x_step, int64_t c0) {
  if constexpr (NV == 0) {
    acc_t a = pw[c0];
    for (int64_t i = 0; i < count; ++i)
      a += static_cast<acc_t>(go[i * go_step + c0]) * static_cast<acc_t>(x[i * x_step + c0]);
    pw[c0] = a;
  } else {
    using V = typename Vec<acc_t>::type;
    constexpr int L = Vec<acc_t>::lanes;
    V a[NV];
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) a[j] = load_vec<V>(pw + c0 + j * L);
    for (int64_t i = 0; i < count; ++i) {
      const scalar_t* gp = go + i * go_step + c0;
      const scalar_t* xp = x + i * x_step + c0;
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) a[j] += load_vec<V>(gp + j * L) * load_vec<V>(xp + j * L);
    }
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) std::memcpy(pw + c0 + j * L, &a[j], sizeof(V));
  }
}

// bf16 weight-gradient block of NP·2L channels without widening shuffles: 2L bf16 loaded as L 32-bit
// words give the even channels as (word << 16) and the odd channels as (word & 0xFFFF0000), so the
// accumulators hold even and odd channels apart; pw is (de)interleaved once per call.
template <int NP>
__attribute__((always_inline)) inline void weight_block_bf16(float* pw, const c10::BFloat16* go,
                                                             const c10::BFloat16* x, int64_t count,
                                                             int64_t go_step, int64_t x_step, int64_t c0) {
  using V = Vec<float>::type;
  using U = cpu::U32;
  using cpu::kEven, cpu::kOdd, cpu::kLow, cpu::kHigh;
  constexpr int L = Vec<float>::lanes;
  V ae[NP], ao[NP];
#pragma GCC unroll 4
  for (int q = 0; q < NP; ++q) {
    V v0, v1;
    std::memcpy(&v0, pw + c0 + 2 * L * q, sizeof v0);
    std::memcpy(&v1, pw + c0 + 2 * L * q + L, sizeof v1);
    ae[q] = __builtin_shuffle(v0, v1, kEven);
    ao[q] = __builtin_shuffle(v0, v1, kOdd);
  }
  for (int64_t i = 0; i < count; ++i) {
    const c10::BFloat16* gp = go + i * go_step + c0;
    const c10::BFloat16* xp = x + i * x_step + c0;
#pragma GCC unroll 4
    for (int q = 0; q < NP; ++q) {
      U gw, xw;
      std::memcpy(&gw, gp + 2 * L * q, sizeof gw);
      std::memcpy(&xw, xp + 2 * L * q, sizeof xw);
      const U ge = gw << 16, gol = gw & 0xFFFF0000u, xe = xw << 16, xol = xw & 0xFFFF0000u;
      V gef, gof, xef, xof;
      std::memcpy(&gef, &ge, sizeof gef);
      std::memcpy(&gof, &gol, sizeof gof);
      std::memcpy(&xef, &xe, sizeof xef);
      std::memcpy(&xof, &xol, sizeof xof);
      ae[q] += gef * xef;
      ao[q] += gof * xof;
    }
  }
#pragma GCC unroll 4
  for (int q = 0; q < NP; ++q) {
    const V v0 = __builtin_shuffle(ae[q], ao[q], kLow), v1 = __builtin_shuffle(ae[q], ao[q], kHigh);
    std::memcpy(pw + c0 + 2 * L * q, &v0, sizeof v0);
    std::memcpy(pw + c0 + 2 * L * q + L, &v1, sizeof v1);
  }
}

// All KW taps of one (go row, input row) pair at once, W dilation 1 and W stride S:
//   pw[kw·Cout + c] += Σ_{i<count} go[i·go_step + c] · x[(i·S + kw)·x_step + c]   (kw < KW)
// for the NV·lanes channels from c0, less the first `first_lane` ones. Each go and x vector is
// loaded once and used for every tap that reads it (the last KW - S input vectors stay in
// registers): 1 + S loads per KW FMAs instead of 2 per FMA in weight_block, KW·NV accumulator chains.
template <int KW, int NV, int S = 1, typename scalar_t, typename acc_t>
__attribute__((always_inline)) inline void weight_taps_reuse(acc_t* pw, int64_t Cout, const scalar_t* go,
                                                             const scalar_t* x, int64_t count, int64_t go_step,
                                                             int64_t x_step, int64_t c0, int first_lane = 0) {
  using V = typename Vec<acc_t>::type;
  constexpr int L = Vec<acc_t>::lanes;
  static_assert(S >= 1 && S < KW, "weight_taps_reuse: the windows of consecutive outputs must overlap");
  V acc[KW][NV], window[KW][NV];
#pragma GCC unroll 8
  for (int k = 0; k < KW; ++k)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) acc[k][j] = V{};
#pragma GCC unroll 8
  for (int k = 0; k + S < KW; ++k)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) window[k][j] = load_vec<V>(x + k * x_step + c0 + j * L);
  const scalar_t* xp = x + (KW - S) * x_step + c0;  // the S input vectors each output adds
  const scalar_t* gp = go + c0;
  for (int64_t i = 0; i < count; ++i, xp += S * x_step, gp += go_step) {
    V gv[NV];
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) {
      gv[j] = load_vec<V>(gp + j * L);
#pragma GCC unroll 4
      for (int k = KW - S; k < KW; ++k) window[k][j] = load_vec<V>(xp + (k - (KW - S)) * x_step + j * L);
    }
#pragma GCC unroll 8
    for (int k = 0; k < KW; ++k)
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) acc[k][j] += gv[j] * window[k][j];
#pragma GCC unroll 8
    for (int k = 0; k + S < KW; ++k)
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) window[k][j] = window[k + S][j];
  }
#pragma GCC unroll 8
  for (int k = 0; k < KW; ++k)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) {
      for (int l = 0; l < first_lane; ++l) acc[k][j][l] = 0;  // channels another block owns
      acc_t* p = pw + k * Cout + c0 + j * L;
      const V sum = load_vec<V>(p) + acc[k][j];
      std::memcpy(p, &sum, sizeof sum);
    }
}

// weight_taps_reuse over all C channels (register blocks as wide as the ISA's registers allow, then
// one vector; the channel tail as one masked vector, or tap by tap where C is below one vector).
template <int KW, int S = 1, typename scalar_t, typename acc_t>
void weight_row_reuse(acc_t* pw, int64_t C, const scalar_t* go, const scalar_t* x, int64_t count) {
  constexpr int L = Vec<acc_t>::lanes;
  // Registers: KW·NV accumulators + KW·NV window + NV grad_output vectors (32 zmm / 16 ymm, xmm).
  constexpr int NV = cpu::kVecBytes == 64 ? (KW <= 3 ? 4 : 2) : (KW <= 3 ? 2 : 1);
  int64_t c = 0;
  for (; c + NV * L <= C; c += NV * L) weight_taps_reuse<KW, NV, S>(pw, C, go, x, count, C, C, c);
  if constexpr (NV > 1)
    for (; c + L <= C; c += L) weight_taps_reuse<KW, 1, S>(pw, C, go, x, count, C, C, c);
  // The channel tail as the last whole vector, its lanes below c masked out of the sum.
  if (c < C && C >= L) {
    weight_taps_reuse<KW, 1, S>(pw, C, go, x, count, C, C, C - L, static_cast<int>(c - (C - L)));
    c = C;
  }
  for (; c < C; ++c)
    for (int k = 0; k < KW; ++k) weight_block<0>(pw + k * C, go, x + k * C, count, C, S * C, c);
}

// One tap of a row: pw[c] += Σ_{i<count} go[i·go_step + c] · x[i·x_step + c] over all C channels.
template <typename scalar_t, typename acc_t>
void weight_tap_sweep(acc_t* pw, int64_t C, const scalar_t* go, const scalar_t* x, int64_t count, int64_t go_step,
                      int64_t x_step) {
  constexpr int L = Vec<acc_t>::lanes;
  int64_t c = 0;
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    for (; c + 4 * L <= C; c += 4 * L) weight_block_bf16<2>(pw, go, x, count, go_step, x_step, c);
    for (; c + 2 * L <= C; c += 2 * L) weight_block_bf16<1>(pw, go, x, count, go_step, x_step, c);
  }
  for (; c + 4 * L <= C; c += 4 * L) weight_block<4>(pw, go, x, count, go_step, x_step, c);
  for (; c + L <= C; c += L) weight_block<1>(pw, go, x, count, go_step, x_step, c);
  for (; c < C; ++c) weight_block<0>(pw, go, x, count, go_step, x_step, c);
}

// Output positions [begin, end) along one dim whose tap k reads an input index inside [0, in).
TapRange valid_outputs(int64_t k, int64_t stride, int64_t padding, int64_t dilation, int64_t in, int64_t out) {
  const int64_t lo = padding - k * dilation, hi = in - 1 + padding - k * dilation;
  if (hi < 0) return {0, 0};
  const int64_t begin = lo <= 0 ? 0 : (lo + stride - 1) / stride;
  const int64_t end = std::min<int64_t>(out, hi / stride + 1);
  return {begin, std::max(begin, end)};
}
// Adds one output row's contribution: partial_w[tap, o] += go[.., o] · x[.., o / m] and
// partial_b[o] += go[.., o] (partial_w / partial_b may be nullptr when not wanted).
template <typename scalar_t, bool kUnitMultiplier>
void weight_grad_row(const Geometry& g, const scalar_t* input, const scalar_t* go_row,
                                        at::opmath_type<scalar_t>* partial_w, at::opmath_type<scalar_t>* partial_b,
                                        int64_t b, int64_t ot, int64_t oh, SpreadPrefetch* prefetch = nullptr) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = g.channels, m = kUnitMultiplier ? 1 : g.multiplier, Cout = C * m;
  const int64_t T = g.in[0], H = g.in[1], W = g.in[2];
  const TapRange rt = valid_taps(ot, g.kernel[0], g.stride[0], g.padding[0], g.dilation[0], T);
  const TapRange rh = valid_taps(oh, g.kernel[1], g.stride[1], g.padding[1], g.dilation[1], H);
  if (kUnitMultiplier && partial_w != nullptr) {  // register-blocked sweeps over the row
    for (int64_t kt = rt.begin; kt < rt.end; ++kt) {
      const int64_t it = ot * g.stride[0] - g.padding[0] + kt * g.dilation[0];
      for (int64_t kh = rh.begin; kh < rh.end; ++kh) {
        const int64_t ih = oh * g.stride[1] - g.padding[1] + kh * g.dilation[1];
        const scalar_t* x_row = input + ndhwc_offset(b, it, ih, 0, 0, T, H, W, C);
        acc_t* pw_row = partial_w + (kt * g.kernel[1] + kh) * g.kernel[2] * Cout;
        // Interior outputs [lo, hi) (every W tap in range) take all taps at once where the W
        // dilation is 1 and the W stride 1 or 2; the rest goes tap by tap.
        int64_t lo = 0, hi = 0;
        const int64_t sW = g.stride[2];
        if ((sW == 1 || sW == 2) && g.dilation[2] == 1 && (g.kernel[2] == 3 || g.kernel[2] == 5)) {
          lo = std::min((g.padding[2] + sW - 1) / sW, g.out[2]);  // ow·sW - padding >= 0
          if (W + g.padding[2] >= g.kernel[2])  // ow·sW - padding + kW - 1 <= W - 1
            hi = std::max(lo, std::min(g.out[2], (W + g.padding[2] - g.kernel[2]) / sW + 1));
          else
            hi = lo;
          if (hi > lo) {
            const scalar_t* go = go_row + lo * Cout;
            const scalar_t* x = x_row + (lo * sW - g.padding[2]) * C;
            if (sW == 1) {
              if (g.kernel[2] == 3) weight_row_reuse<3>(pw_row, C, go, x, hi - lo);
              else weight_row_reuse<5>(pw_row, C, go, x, hi - lo);
            } else {
              if (g.kernel[2] == 3) weight_row_reuse<3, 2>(pw_row, C, go, x, hi - lo);
              else weight_row_reuse<5, 2>(pw_row, C, go, x, hi - lo);
            }
          }
        }
        if (prefetch != nullptr) prefetch->step();  // once per (kt, kh)
        for (int64_t kw = 0; kw < g.kernel[2]; ++kw) {
          const TapRange r = valid_outputs(kw, g.stride[2], g.padding[2], g.dilation[2], W, g.out[2]);
          // [r.begin, r.end) minus [lo, hi): at most two pieces.
          const TapRange pieces[2] = {{r.begin, hi > lo ? std::min(r.end, lo) : r.end},
                                      {hi > lo ? std::max(r.begin, hi) : r.end, r.end}};
          for (const TapRange& piece : pieces) {
            if (piece.end <= piece.begin) continue;
            const int64_t iw0 = piece.begin * g.stride[2] - g.padding[2] + kw * g.dilation[2];
            weight_tap_sweep(pw_row + kw * Cout, C, go_row + piece.begin * Cout, x_row + iw0 * C,
                             piece.end - piece.begin, Cout, g.stride[2] * C);
          }
        }
      }
    }
    partial_w = nullptr;  // the loop below then only adds the bias gradient
  }
  for (int64_t ow = 0; ow < g.out[2]; ++ow) {
    const scalar_t* go = go_row + ow * Cout;
    if (partial_b != nullptr) {
#pragma GCC ivdep
      for (int64_t o = 0; o < Cout; ++o) partial_b[o] += static_cast<acc_t>(go[o]);
    }
    if (partial_w == nullptr) continue;
    const TapRange rw = valid_taps(ow, g.kernel[2], g.stride[2], g.padding[2], g.dilation[2], W);
    for (int64_t kt = rt.begin; kt < rt.end; ++kt) {
      const int64_t it = ot * g.stride[0] - g.padding[0] + kt * g.dilation[0];
      for (int64_t kh = rh.begin; kh < rh.end; ++kh) {
        const int64_t ih = oh * g.stride[1] - g.padding[1] + kh * g.dilation[1];
        for (int64_t kw = rw.begin; kw < rw.end; ++kw) {
          const int64_t iw = ow * g.stride[2] - g.padding[2] + kw * g.dilation[2];
          const scalar_t* x = input + ndhwc_offset(b, it, ih, iw, 0, T, H, W, C);
          acc_t* pw = partial_w + ((kt * g.kernel[1] + kh) * g.kernel[2] + kw) * Cout;
          if (kUnitMultiplier) {
#pragma GCC ivdep
            for (int64_t c = 0; c < C; ++c) pw[c] += static_cast<acc_t>(go[c]) * static_cast<acc_t>(x[c]);
          } else {
            for (int64_t c = 0; c < C; ++c) {
              const acc_t xv = static_cast<acc_t>(x[c]);
#pragma GCC ivdep
              for (int64_t j = 0; j < m; ++j) pw[c * m + j] += static_cast<acc_t>(go[c * m + j]) * xv;
            }
          }
        }
      }
    }
  }
}

// ------------------------------------------------- weight gradient, kH = kW = 3 (register-blocked)
// m == 1, kernel 3 along H and W, W stride, dilation and padding 1 (any T kernel and T/H stride,
// dilation, padding). For one kt and NV channel vectors, the 9 (kh, kw) sums stay in registers
// over a chunk's rows:
//   acc[kh][kw] += Σ_q x_row(kh)[q·C + c] · go_row[(q + 1 - kw)·C + c]   (0 <= q + 1 - kw < OW = W)
// sweeping the input positions q with the 3 grad_output vectors go[q+1], go[q], go[q-1] in
// registers: each x vector and each grad_output vector is loaded once per row for 3 FMAs
// (registers: 9·NV sums + 3·NV grad_output + NV input).
// Channel vectors per block: 2 with 32 vector registers (18 sums + 2 bias sums + 6 grad_output +
// 2 input), else 1 (9 + 1 + 3 + 1 of 16).
constexpr int kWeightBlockC = cpu::kVecBytes == 64 ? 2 : 1;

template <int NV, typename V>
struct WeightAcc {
  V a[3][3][NV];
  V bias[NV];  // Σ grad_output, added in the sweep of one kt per row (with_bias)
};

// Adds x · (go[q + 1 - kw] for kw in [K0, K1)) to the rows [KhLo, KhHi) (g[kw] holds go[q + 1 - kw]).
template <int KhLo, int KhHi, int K0, int K1, int NV, typename V, typename scalar_t>
__attribute__((always_inline)) inline void weight_step_k3(WeightAcc<NV, V>& acc, const V (&g)[3][NV],
                                                          const scalar_t* const* x_rows, int64_t offset) {
  constexpr int L = sizeof(V) / sizeof(g[0][0][0]);
#pragma GCC unroll 3
  for (int kh = KhLo; kh < KhHi; ++kh)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
      V xv = load_vec<V>(x_rows[kh] + offset + j * L);
      asm("" : "+v"(xv));
#pragma GCC unroll 3
      for (int kw = K0; kw < K1; ++kw) acc.a[kh][kw][j] += xv * g[kw][j];
    }
}

// One output row's contribution for one kt: x_rows[kh] = the input row of tap (kt, kh) (nullptr
// outside [KhLo, KhHi)), go = the grad_output row, both offset to channel c0.
template <int KhLo, int KhHi, int NV, typename V, typename scalar_t>
__attribute__((always_inline)) inline void weight_row_k3(WeightAcc<NV, V>& acc, const scalar_t* const* x_rows,
                                                         const scalar_t* go, int64_t W, int64_t C, bool with_bias) {
  constexpr int L = sizeof(V) / sizeof(acc.a[0][0][0][0]);
  V g[3][NV];
  auto load_go = [&](int kw, int64_t o) {  // each grad_output vector enters the window once
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
      g[kw][j] = load_vec<V>(go + o * C + j * L);
      if (with_bias) acc.bias[j] += g[kw][j];
    }
  };
  load_go(1, 0);
  if (W == 1) {  // q = 0 reads go[0] through kw = 1 only
    weight_step_k3<KhLo, KhHi, 1, 2>(acc, g, x_rows, 0);
    return;
  }
  load_go(0, 1);
  weight_step_k3<KhLo, KhHi, 0, 2>(acc, g, x_rows, 0);  // q = 0: go[-1] is padding
  for (int64_t q = 1; q + 1 < W; ++q) {
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) g[2][j] = g[1][j], g[1][j] = g[0][j];
    load_go(0, q + 1);
    weight_step_k3<KhLo, KhHi, 0, 3>(acc, g, x_rows, q * C);
  }
#pragma GCC unroll 4
  for (int j = 0; j < NV; ++j) g[2][j] = g[1][j], g[1][j] = g[0][j];
  weight_step_k3<KhLo, KhHi, 1, 3>(acc, g, x_rows, (W - 1) * C);  // q = W - 1: go[W] is padding
}

// Whether weight_grad_rows_k3 handles the geometry (else weight_grad_row).
template <typename acc_t>
bool weight_grad_k3_applies(const Geometry& g) {
  return g.multiplier == 1 && g.kernel[1] == 3 && g.kernel[2] == 3 && g.stride[2] == 1 && g.dilation[2] == 1 &&
         g.padding[2] == 1 && g.channels >= Vec<acc_t>::lanes;
}

// Channel vectors per work item of the weight gradient: 128 bytes of fp32 (two 64-byte lines, the
// pair the L2 prefetcher fetches together). Below 512 bits, where the chunks are the items
// (weight_grad_by_chunks), all channels instead. Measured first with the per-row order (all vectors of
// the group per row, now 128 bits only: one group uses every line of a row while it is in L1 where
// two-line groups took each row from L2 once per group, and the lines at a group's edge twice where
// positions do not start lines): Zen 4, AVX2, same-process A/B (40 rounds alternating, medians), weight
// gradient alone, one thread 4x96x8x28^2 -14 %, 4x108x8x28^2 -27 %, 4x112x8x28^2 -24 %, 2x54x13x40^2
// -26 %; two threads -14 %, -44 %, -16 %, -31 % (2x216x13x10^2 within +-5 %); both gradients -4..-20 %;
// the baseline path -5..-16 %. With AVX2's block order (session 52, two threads, same-process A/B, 30
// rounds, cold): all channels against two-line groups 4x48x8x56^2 -20 % / -13 % (weight / both
// gradients), 4x96x8x28^2 +1 % / -8 %, 4x108x8x28^2 +3 %, 2x54x13x40^2 +3 %, 4x192x8x14^2 +3 %,
// 2x216x13x10^2 -2..-7 % / -1 %. At 512 bits (its block order with two vectors per block) all channels
// measured 0..+9 % slower alone: two-line groups kept.
constexpr int64_t kWeightGroupV = 128 / cpu::kVecBytes;

// Prefetches channels [0, width) of `positions` positions C apart from p, one per 64-byte line.
template <typename scalar_t>
void prefetch_positions(const scalar_t* p, int64_t positions, int64_t C, int64_t width) {
  constexpr int64_t kLine = 64 / sizeof(scalar_t);
  for (int64_t q = 0; q < positions; ++q)
    for (int64_t c = 0; c < width; c += kLine) __builtin_prefetch(p + q * C + c);
}

// Output rows [row_begin, row_end), channel vectors [v_begin, v_end) (vector v: channels from v·L; the
// last one, where C is not a multiple of L, from C - L -- a half tail from C - L/2 -- with its lanes
// below v·L masked), added into pw ([taps, C]) and pb ([C]; either may be nullptr). Only the channels of
// those vectors are read or written, so items with other vectors may run at the same time on the same
// pw / pb.
// Per channel block and kt the 9 (kh, kw) sums are carried over the rows and added to pw at the end.
// prefetch_next_rows: software-prefetch each next row's lines (off where the rows are in L2 already).
// on_row of weight_grad_rows_k3: called after each row's sweep (the prefetch of the next chunk's rows).
struct NoStep {
  void operator()() const {}
};
template <typename scalar_t, typename OnRow = NoStep>
void weight_grad_rows_k3(const Geometry& g, const scalar_t* input, const scalar_t* grad_output,
                         at::opmath_type<scalar_t>* pw, at::opmath_type<scalar_t>* pb, int64_t row_begin,
                         int64_t row_end, int64_t v_begin, int64_t v_end, bool prefetch_next_rows,
                         OnRow&& on_row = OnRow{}) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = typename Vec<acc_t>::type;
  constexpr int L = Vec<acc_t>::lanes;
  const int64_t C = g.channels, T = g.in[0], H = g.in[1], W = g.in[2], OT = g.out[0], OH = g.out[1];
  const int64_t c_begin = v_begin * L, c_end = std::min(v_end * L, C);
  // Rows none of whose T taps or none of whose H taps is in range (padding beyond the kernel's reach)
  // add only to the bias; the sweep below skips them.
  if (pb != nullptr)
    for (int64_t row = row_begin; row < row_end; ++row) {
      const TapRange rt = valid_taps((row / OH) % OT, g.kernel[0], g.stride[0], g.padding[0], g.dilation[0], T);
      const TapRange rh = valid_taps(row % OH, 3, g.stride[1], g.padding[1], g.dilation[1], H);
      if (rt.end > rt.begin && rh.end > rh.begin && pw != nullptr) continue;
      const scalar_t* go = grad_output + row * W * C;
      for (int64_t ow = 0; ow < W; ++ow)
        for (int64_t c = c_begin; c < c_end; ++c) pb[c] += static_cast<acc_t>(go[ow * C + c]);
    }
  if (pw == nullptr) return;
  // NV vectors of type decltype(vec) (the path's, or a half tail's) from channel c0.
  auto block = [&](auto nv, int64_t c0, int first_lane, int64_t rows_begin, int64_t rows_end, int64_t pf_end,
                   auto vec) {
    constexpr int NV = decltype(nv)::value;
    using V = decltype(vec);
    constexpr int L = sizeof(V) / sizeof(acc_t);
    for (int64_t kt = 0; kt < g.kernel[0]; ++kt) {
      WeightAcc<NV, V> acc;
      for (int j = 0; j < NV; ++j) {
        acc.bias[j] = V{};
        for (int kh = 0; kh < 3; ++kh)
          for (int kw = 0; kw < 3; ++kw) acc.a[kh][kw][j] = V{};
      }
      for (int64_t row = rows_begin; row < rows_end; ++row) {
        const int64_t b = row / (OT * OH), ot = (row / OH) % OT, oh = row % OH;
        int64_t it;
        if (!input_index(ot, kt, g.stride[0], g.padding[0], g.dilation[0], T, &it)) continue;
        const int64_t first_kt = valid_taps(ot, g.kernel[0], g.stride[0], g.padding[0], g.dilation[0], T).begin;
        // Software prefetch for the next row of the chunk: its grad_output (with the first T tap)
        // and the input row it newly reads through this kt (its last H tap), this block's
        // channels. The sweeps' loads walk 4 rows at once, which the hardware prefetchers follow
        // poorly (AVX2, C = 108, one thread: 4.35 -> 3.65 ms; AVX-512, 2 threads: 0.63 -> 0.58 ms).
        if (row + 1 < pf_end && oh + 1 < OH) {
          int64_t ih;
          if (kt == first_kt) prefetch_positions(grad_output + (row + 1) * W * C + c0, W, C, NV * L);
          if (input_index(oh + 1, 2, g.stride[1], g.padding[1], g.dilation[1], H, &ih))
            prefetch_positions(input + ndhwc_offset(b, it, ih, 0, c0, T, H, W, C), W, C, NV * L);
        }
        // The bias sum rides along the sweep of the row's first T tap in range.
        const bool with_bias = pb != nullptr && kt == first_kt;
        const TapRange rh = valid_taps(oh, g.kernel[1], g.stride[1], g.padding[1], g.dilation[1], H);
        const scalar_t* x_rows[3] = {nullptr, nullptr, nullptr};
        for (int64_t kh = rh.begin; kh < rh.end; ++kh) {
          const int64_t ih = oh * g.stride[1] - g.padding[1] + kh * g.dilation[1];
          x_rows[kh] = input + ndhwc_offset(b, it, ih, 0, c0, T, H, W, C);
        }
        const scalar_t* go = grad_output + row * W * C + c0;
        const int range = static_cast<int>(rh.begin * 4 + rh.end);
        switch (range) {
          case 0 * 4 + 3: weight_row_k3<0, 3>(acc, x_rows, go, W, C, with_bias); break;
          case 1 * 4 + 3: weight_row_k3<1, 3>(acc, x_rows, go, W, C, with_bias); break;
          case 0 * 4 + 2: weight_row_k3<0, 2>(acc, x_rows, go, W, C, with_bias); break;
          case 1 * 4 + 2: weight_row_k3<1, 2>(acc, x_rows, go, W, C, with_bias); break;
          case 0 * 4 + 1: weight_row_k3<0, 1>(acc, x_rows, go, W, C, with_bias); break;
          case 2 * 4 + 3: weight_row_k3<2, 3>(acc, x_rows, go, W, C, with_bias); break;
          default: break;  // no valid kh
        }
        on_row();
      }
      // Adds the sums into dst; in the last vector only lanes [first_lane, L) (those below are
      // another vector's channels: not touched, another item may be writing them).
      auto add_into = [&](acc_t* dst, V (&sums)[NV]) {
        for (int j = 0; j < NV; ++j) {
          if (j == NV - 1 && first_lane > 0) {
            for (int l = first_lane; l < L; ++l) dst[j * L + l] += sums[j][l];
            continue;
          }
          const V sum = load_vec<V>(dst + j * L) + sums[j];
          std::memcpy(dst + j * L, &sum, sizeof sum);
        }
      };
      for (int kh = 0; kh < 3; ++kh)
        for (int kw = 0; kw < 3; ++kw) add_into(pw + ((kt * 3 + kh) * 3 + kw) * C + c0, acc.a[kh][kw]);
      if (pb != nullptr) add_into(pb + c0, acc.bias);
    }
  };
  // The vectors [v_begin, v_end) over rows [rows_begin, rows_end).
  const int64_t full = C / L;  // whole vectors; vector `full` (if any) is the tail
  const int64_t prefetch_end = prefetch_next_rows ? row_end : row_begin;  // rows prefetched: < prefetch_end
  // Half tails (has_half_tail). Zen 4, AVX-512 path, same-process A/B (20-30 rounds alternating, medians),
  // weight + bias gradient two / one threads: 4x24x8x56^2 -11 / -12 %, 4x40x8x56^2 -9 / -7 %, 2x54x13x40^2
  // -5 / -8 %, 2x216x13x10^2 0 / -5 % (4x96x8x28^2, no tail: 0 / +2 %); both gradients -2..-7 %.
  constexpr bool kHalfTails = cpu::kVecBytes == 64 && std::is_same_v<acc_t, float>;
  const bool half_tail = kHalfTails && has_half_tail(C);
  auto blocks = [&](int64_t rows_begin, int64_t rows_end) {
    int64_t v = v_begin;
    for (; v + kWeightBlockC <= std::min(v_end, full); v += kWeightBlockC)
      block(std::integral_constant<int, kWeightBlockC>{}, v * L, 0, rows_begin, rows_end, prefetch_end, V{});
    if constexpr (kWeightBlockC > 1)
      for (; v < std::min(v_end, full); ++v)
        block(std::integral_constant<int, 1>{}, v * L, 0, rows_begin, rows_end, prefetch_end, V{});
    if (v < v_end) {
      if constexpr (kHalfTails) {
        if (half_tail) {
          block(std::integral_constant<int, 1>{}, C - L / 2, static_cast<int>(v * L - (C - L / 2)), rows_begin,
                rows_end, prefetch_end, HalfVec{});
          return;
        }
      }
      block(std::integral_constant<int, 1>{}, C - L, static_cast<int>(v * L - (C - L)), rows_begin,
            rows_end, prefetch_end, V{});
    }
  };
  // Order: at 256 and 512 bits each channel block sweeps all the rows (the sums stay in registers
  // across rows); at 128 bits (quarter lines per position) all vectors of the group per row (every
  // quarter of a line while it is in L1), the sums stored per row. AVX2 had the per-row order until
  // session 52: Zen 4, two threads, same-process A/B (30 rounds alternating, each call's tensors cold,
  // medians, all channels in one group either way), weight + bias gradient 4x96x8x28^2 -15..-19 %,
  // 4x108x8x28^2 -17 %, 4x48x8x56^2 -5 %, 4x192x8x14^2 -15 %, 2x54x13x40^2 -8 %, 2x108x13x20^2 -11 %,
  // 2x216x13x10^2 +10..+12 %; both gradients 4x96x8x28^2 -12 %, 4x48x8x56^2 -6 %, 2x216x13x10^2 -7 %.
  // (Baseline path, one thread: -7, -7, +10, +2 %: kept per row.)
  if (cpu::kVecBytes >= 32) return blocks(row_begin, row_end);
  for (int64_t row = row_begin; row < row_end; ++row) blocks(row, row + 1);
}

// Adds to `prefetch` the rows that output rows [row_begin, row_end) read (the kH = kW = 3 weight
// gradient's, the flipped geometry's of the fused backward, whose input is grad_output, and one row at a
// time the generic weight gradient's): each grad_output row where grad_output is given (stride-1 W only:
// output rows as wide as input rows), and per T tap in range -- or only the last one, last_t_tap_only: in
// the plane-major chunk order the one input plane of a chunk that the chunk before it did not read --
// the input row of its last H tap (all its H taps for the first row and at the top of a plane; with H
// stride 1 the rest were read by the rows before).
template <typename scalar_t>
void add_rows_read(SpreadPrefetch& prefetch, const Geometry& g, const scalar_t* input, const scalar_t* grad_output,
                   int64_t row_begin, int64_t row_end, bool last_t_tap_only) {
  const int64_t T = g.in[0], H = g.in[1], W = g.in[2], C = g.channels, OT = g.out[0], OH = g.out[1];
  const int64_t row_bytes = W * C * int64_t(sizeof(scalar_t));
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t b = row / (OT * OH), ot = (row / OH) % OT, oh = row % OH;
    if (grad_output != nullptr) prefetch.add(grad_output + row * W * C, row_bytes);
    const TapRange rt = valid_taps(ot, g.kernel[0], g.stride[0], g.padding[0], g.dilation[0], T);
    const TapRange rh = valid_taps(oh, g.kernel[1], g.stride[1], g.padding[1], g.dilation[1], H);
    const int64_t kh_begin = row == row_begin || oh == 0 ? rh.begin : std::max(rh.begin, rh.end - 1);
    for (int64_t kt = last_t_tap_only ? std::max(rt.begin, rt.end - 1) : rt.begin; kt < rt.end; ++kt) {
      const int64_t it = ot * g.stride[0] - g.padding[0] + kt * g.dilation[0];
      for (int64_t kh = kh_begin; kh < rh.end; ++kh) {
        const int64_t ih = oh * g.stride[1] - g.padding[1] + kh * g.dilation[1];
        prefetch.add(input + ndhwc_offset(b, it, ih, 0, 0, T, H, W, C), row_bytes);
      }
    }
  }
}

// The weight gradient's fixed chunks of rows, each with its own partial sums ([taps + 1][Cout], the
// last row the bias): a function of the shape only (enough chunks for any core count here, partials
// within ~32 MiB), so the summation order, and the result, do not depend on the thread count.
template <typename acc_t>
int64_t weight_grad_chunks(const Geometry& g) {
  const int64_t per_chunk = (g.taps() + 1) * g.out_channels();
  return std::clamp<int64_t>(
      std::min<int64_t>(kWeightGradChunks, (int64_t(32) << 20) / int64_t(sizeof(acc_t) * per_chunk)), 1,
      g.batch * g.out[0] * g.out[1]);
}

// Whether weight_grad_impl runs the kH = kW = 3 kernel with chunks as its work items (at least 4 per
// thread), each chunk's channel groups in turn.
template <typename acc_t>
bool weight_grad_by_chunks(const Geometry& g) {
  return weight_grad_k3_applies<acc_t>(g) && weight_grad_chunks<acc_t>(g) >= 4 * at::get_num_threads();
}

// weight_grad_impl's other work per chunk (chunk items only, see weight_grad_by_chunks): nothing, or the
// fused backward's input gradient of the chunk's rows (backward_impl). run(row_begin, row_end) comes
// before the chunk's sums; add_next_rows(prefetch, next_begin, next_end) adds what run will read for the
// thread's next chunk to the prefetch spread over this chunk's later channel groups.
struct NoChunkWork {
  void run(int64_t, int64_t) const {}
  void add_next_rows(SpreadPrefetch&, int64_t, int64_t) const {}
};

template <typename scalar_t, typename ChunkWork = NoChunkWork>
void weight_grad_impl(const WeightGradArgs& a, const ChunkWork& chunk_work = ChunkWork{}) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int L = Vec<acc_t>::lanes;
  constexpr bool kChunkWork = !std::is_same_v<ChunkWork, NoChunkWork>;
  const Geometry& g = a.geo;
  const int64_t Cout = g.out_channels(), taps = g.taps(), OT = g.out[0], OH = g.out[1];
  const int64_t rows = g.batch * OT * OH;
  auto* grad_weight = static_cast<acc_t*>(a.grad_weight);
  auto* grad_bias = static_cast<acc_t*>(a.grad_bias);
  if (grad_weight != nullptr) std::fill(grad_weight, grad_weight + taps * Cout, acc_t(0));
  if (grad_bias != nullptr) std::fill(grad_bias, grad_bias + Cout, acc_t(0));
  if (rows == 0 || g.out[2] == 0 || Cout == 0 || (grad_weight == nullptr && grad_bias == nullptr)) return;
  const auto* grad_output = static_cast<const scalar_t*>(a.grad_output);
  const auto* input = static_cast<const scalar_t*>(a.input);
  // Partial sums per chunk: [chunk][taps + 1][Cout] (weight_grad_chunks).
  const int64_t per_chunk = (taps + 1) * Cout;
  const int64_t chunks = weight_grad_chunks<acc_t>(g);
  std::vector<acc_t> partials(chunks * per_chunk, acc_t(0));
  auto chunk_rows = [&](int64_t chunk) { return std::make_pair(rows * chunk / chunks, rows * (chunk + 1) / chunks); };
  if (weight_grad_k3_applies<acc_t>(g)) {
    // Each item writes only its channel groups' sums of its chunk's partials, so the result does not
    // depend on which thread runs it.
    const int64_t vectors = (g.channels + L - 1) / L;
    const bool by_chunks = weight_grad_by_chunks<acc_t>(g);
    const int64_t group_v = cpu::kVecBytes < 64 && by_chunks ? vectors : kWeightGroupV;  // see kWeightGroupV
    const int64_t groups = (vectors + group_v - 1) / group_v;
    auto rows_k3 = [&](int64_t chunk, int64_t group, bool prefetch_next_rows, auto&& on_row) {
      acc_t* pw = partials.data() + chunk * per_chunk;
      const auto [row_begin, row_end] = chunk_rows(chunk);
      weight_grad_rows_k3(g, input, grad_output, grad_weight != nullptr ? pw : nullptr,
                          grad_bias != nullptr ? pw + taps * Cout : nullptr, row_begin, row_end,
                          group * group_v, std::min(vectors, (group + 1) * group_v), prefetch_next_rows,
                          on_row);
    };
    if (by_chunks) {
      // Items: chunks, each with all channel groups in turn. A chunk's rows of input and grad_output
      // come from memory for its first group and from L2 for the others, while those prefetch the
      // next chunk's rows (add_rows_read): Zen 4, 4x96x8x28^2, each call's tensors cold:
      // one thread 3.3 -> 2.4 ms, two 1.8 -> 1.4 ms (AVX2 2.2 -> 2.0) against the groups-major order
      // (items (group, chunk): one group's slices of the input planes stay in L2 from one chunk to
      // the next, but each pass over the tensors reads one line in three, strided). That prefetch only
      // where the tensors are unlikely to be in L3: it stalls on full miss queues (the lines of a row
      // step at once) and the rows come fast enough from L3 without it. Intel Xeon, 480 MB L3, two
      // threads, same-process A/B: without it 17-24 % faster (AVX-512), 8-18 % (AVX2), back to back,
      // after native's fwd+bwd and after a 64 MB read or write; perf put ~45 % of the later groups'
      // samples on the prefetch. Zen 4 (32 MB L3, session 24): 16-27 % faster without it with the data
      // in L3, 30 % slower (AVX2) from memory.
      const bool prefetch_next =
          !likely_in_last_level_cache((g.batch * g.in[0] * g.in[1] * g.in[2] + rows * g.out[2]) * g.channels *
                                      int64_t(sizeof(scalar_t)));
      // The chunks in the order (b, first row, plane): where chunks are parts of planes, the next chunk
      // of a thread is the same rows of the next plane, whose input (and, fused, grad_output) planes it
      // shares but one, still in L2, as forward_k3's boxes. Any order gives the same sums (one partial
      // per chunk). Intel Xeon, 4x96x8x28^2 (chunks of half a plane), two threads, same-process A/B
      // against row order: fused backward 3-8 % faster (AVX-512) and 1-3 % (AVX2), after native's step
      // and back to back.
      std::vector<int64_t> order(chunks);
      for (int64_t c = 0; c < chunks; ++c) order[c] = c;
      auto plane_major = [&](int64_t c) {
        const int64_t r = chunk_rows(c).first;
        return std::make_tuple(r / (OT * OH), r % OH, (r / OH) % OT);
      };
      std::stable_sort(order.begin(), order.end(),
                       [&](int64_t a, int64_t b) { return plane_major(a) < plane_major(b); });
      at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
        SpreadPrefetch prefetch;
        for (int64_t item = begin; item < end; ++item) {
          const int64_t chunk = order[item];
          prefetch.clear();
          if (item + 1 < end) {
            const auto [next_begin, next_end] = chunk_rows(order[item + 1]);
            if (prefetch_next) add_rows_read(prefetch, g, input, grad_output, next_begin, next_end, false);
            else chunk_work.add_next_rows(prefetch, next_begin, next_end);
          }
          const auto [row_begin, row_end] = chunk_rows(chunk);
          chunk_work.run(row_begin, row_end);
          // over the row calls of the later groups (weight_grad_rows_k3: per channel block, kt and row)
          const int64_t calls_per_group = g.kernel[0] * (row_end - row_begin) * (group_v / kWeightBlockC);
          prefetch.spread_over(std::max<int64_t>(1, groups - 1) * calls_per_group);
          // The later groups' rows are in L2 from group 0 and need no per-row prefetch (measured
          // without it, 4x96x8x28^2: AVX-512 1.72 -> 1.65 ms at 2 threads, AVX2 2.91 -> 2.76).
          for (int64_t group = 0; group < groups; ++group) {
            if (group == 0 && groups > 1) rows_k3(chunk, group, true, NoStep{});
            else rows_k3(chunk, group, group == 0, [&] { prefetch.step(); });
          }
        }
#if FASTVID_VEC_BYTES >= 32
        if (kChunkWork) _mm_sfence();  // chunk_work's streaming stores are visible when parallel_for returns
#endif
      });
    } else {
      TORCH_INTERNAL_ASSERT(!kChunkWork, "weight_grad_impl: chunk work needs chunk items (weight_grad_by_chunks)");
      // Few chunks per thread: items (group, chunk), group-major (one group's slices of the input
      // planes stay in L2 from one chunk to the next).
      at::parallel_for(0, groups * chunks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t item = begin; item < end; ++item) rows_k3(item % chunks, item / chunks, true, NoStep{});
      });
    }
  } else {
    TORCH_INTERNAL_ASSERT(!kChunkWork, "weight_grad_impl: chunk work needs chunk items (weight_grad_by_chunks)");
    // Chunks of rows in band order: the input rows a band's grad_output rows read stay in L2 from one plane
    // to the next, instead of coming from memory once per T tap.
    const int64_t x_row_bytes = g.in[2] * g.channels * int64_t(sizeof(scalar_t));
    const BandOrder order{OT, OH, rows_per_band(g.kernel[0] * x_row_bytes, g.stride[1],
                                                (g.kernel[1] - 1) * g.dilation[1] + 1)};
    at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
      for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
        acc_t* pw = partials.data() + chunk * per_chunk;
        acc_t* w = grad_weight != nullptr ? pw : nullptr;
        acc_t* bb = grad_bias != nullptr ? pw + taps * Cout : nullptr;
        const auto [row_begin, row_end] = chunk_rows(chunk);
        SpreadPrefetch next_plane;
        for (int64_t idx = row_begin; idx < row_end; ++idx) {
          const int64_t row = order.row(idx);
          const int64_t b = row / (OT * OH), ot = (row / OH) % OT, oh = row % OH;
          const scalar_t* go_row = grad_output + row * g.out[2] * Cout;
          if (g.multiplier != 1) {
            weight_grad_row<scalar_t, false>(g, input, go_row, w, bb, b, ot, oh);
            continue;
          }
          // The input rows of the newest plane the row one plane on reads (its last T tap), into L2 while
          // this row's taps run: band order comes to them a band of rows later.
          next_plane.clear();
          if (ot + 1 < OT) add_rows_read<scalar_t>(next_plane, g, input, nullptr, row + OH, row + OH + 1, true);
          next_plane.spread_over(g.kernel[0] * g.kernel[1]);
          weight_grad_row<scalar_t, true>(g, input, go_row, w, bb, b, ot, oh, &next_plane);
        }
      }
    });
  }
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const acc_t* pw = partials.data() + chunk * per_chunk;
    if (grad_weight != nullptr)
      for (int64_t i = 0; i < taps * Cout; ++i) grad_weight[i] += pw[i];
    if (grad_bias != nullptr)
      for (int64_t o = 0; o < Cout; ++o) grad_bias[o] += pw[taps * Cout + o];
  }
}

// ------------------------------------------------------------------------ both gradients
// Whether backward_impl computes both gradients in one pass: stride 1 with the output the size of the
// input (output row r and input row r are the same (b, t, h)), the kW = 3 forward kernel serving the
// input gradient and the weight gradient taking its rows chunk by chunk (weight_grad_by_chunks), and
// the rows a chunk works on fitting in three quarters of a core's L2: the fusion's gain is that a
// chunk's grad_output rows, read by its input-gradient rows, are still in L2 for its weight sums. Per
// chunk of r rows of R bytes the input-gradient rows read grad_output rows of three planes and the weight
// sums input rows of three planes, r + 2 rows each (the H halo): 6 (r + 2) R bytes, the next chunk
// sharing two planes of each. Where they do not fit, the two passes are faster: Zen 4 (1 MiB L2), two
// threads, same-process A/B of the module's fwd+bwd (the backward's two forms alternated, p50 of 40):
// 4x96x8x28^2 (1.0 MB of rows) after native's step 5.75 -> 5.31 ms (AVX-512) and 7.10 -> 6.09 (AVX2),
// back to back 4.95 -> 4.32 / 6.74 -> 5.66; 4x108x8x28^2 (1.2 MB) 7.21 -> 6.53 / 11.27 -> 9.64; the
// backward alone at 4x48x8x56^2 (1.9 MB) 6.33 -> 5.17 / 9.27 -> 8.16. Where they fit, the fusion holds
// its own: 4x192x8x14^2 and 2x96x8x28^2 (0.58 MB) after native's step 2.96 / 1.48 ms fused against 3.11 /
// 1.56 in two passes (AVX-512). The Intel Xeon's measurements below (2 MiB L2) are at 1.0 MB.
template <typename scalar_t>
bool fused_backward_applies(const Geometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto f = flipped_geometry(g);
  if (!f || !forward_k3_applies<acc_t>(*f) || !weight_grad_by_chunks<acc_t>(g)) return false;
  if (g.out[0] != g.in[0] || g.out[1] != g.in[1] || g.out[2] != g.in[2]) return false;
  const int64_t chunks = weight_grad_chunks<acc_t>(g);
  const int64_t chunk_rows = (g.batch * g.out[0] * g.out[1] + chunks - 1) / chunks;
  const int64_t row_bytes = g.in[2] * g.channels * int64_t(sizeof(scalar_t));
  return 6 * (chunk_rows + 2) * row_bytes <= cpu_isa::l2_cache_bytes() * 3 / 4;
}

// Both gradients. Where fused_backward_applies, per chunk of rows of the weight gradient first the
// chunk's input-gradient rows (forward_k3's rows on grad_output with the flipped kernel and its RowPlan,
// one channel group at a time over the chunk's rows, as in forward_k3's boxes), then the chunk's
// weight sums, which read the chunk's grad_output rows again while they are in L2: grad_output crosses from
// memory once per call instead of twice. Else the input gradient, then the weight gradient.
// Intel Xeon (480 MB L3, shared), 4x96x8x28^2, two threads, same-process A/B against the two passes,
// each call after the forward, with two-line channel groups (group_vectors): after native's fwd+bwd
// step (which evicts these tensors: reading the input then runs at 20 GB/s, as after a 256 MB write,
// against 51 warm) 12 % faster on AVX-512 and 10 % on AVX2; after a 256 MB write 6 % / 5 %; back to
// back 7 % / 9 %. (With one-line groups back to back was 2-3 % faster / 2-7 % slower.) A chunk is half
// a plane, so its grad_output rows are not reused across planes from L1 as in forward_k3's boxes.
// Two prefetches into L2 of the one plane of rows a chunk reads that the chunk before did not
// (add_rows_read, last_t_tap_only), so that neither phase starts by waiting on memory: while a chunk's
// input-gradient rows run, the input rows its weight sums will read; while its weight sums' later channel
// groups run, the grad_output rows the next chunk's input-gradient rows will read. Intel Xeon, same
// shape, same-process A/Bs (order shuffled, p20 of 40-50 rounds): the first, backward after native's
// step -7 % (AVX-512) / -3 % (AVX2), back to back -2..-5 %, module step -3..-4 % (all three input
// planes instead, or the grad_output plane during the input-gradient rows: no better); the second on
// top, backward after native's step -5..-8 % on both paths, back to back -3..-9 %, module step after
// native's -2..-7 % (AVX-512) / -4..-5 % (AVX2), back to back +3 % / -1 %.
template <typename scalar_t>
void backward_impl(const InputGradArgs& ia, const WeightGradArgs& wa) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry& g = wa.geo;
  if (!fused_backward_applies<scalar_t>(g)) {
    input_grad_impl<scalar_t>(ia);
    return weight_grad_impl<scalar_t>(wa);
  }
  const Geometry f = *flipped_geometry(g);
  const std::vector<acc_t> w = flipped_weight(g, static_cast<const acc_t*>(ia.weight));
  const auto* grad_output = static_cast<const scalar_t*>(ia.grad_output);
  auto* grad_input = static_cast<scalar_t*>(ia.grad_input);
  const RowPlan<1, scalar_t> plan(f, grad_output, grad_input);
  struct InputGradRows {  // weight_grad_impl's chunk work (NoChunkWork)
    const Geometry &g, &f;
    const RowPlan<1, scalar_t>& plan;
    const scalar_t *input, *grad_output;
    const acc_t* weight;  // flipped
    scalar_t* grad_input;
    void run(int64_t row_begin, int64_t row_end) const {
      SpreadPrefetch prefetch;
      add_rows_read<scalar_t>(prefetch, g, input, nullptr, row_begin, row_end, true);
      prefetch.spread_over(plan.groups * (row_end - row_begin));
      // The chunk's rows (consecutive in grad_input) through the thread's buffer where positions do not
      // start lines (streams_rows), as forward_k3's boxes.
      const int64_t row_elements = f.out[2] * f.channels;
      scalar_t* chunk_rows =
          plan.stream_rows ? thread_rows_buffer<scalar_t>((row_end - row_begin) * row_elements) : nullptr;
      for (int64_t v = 0; v < plan.groups; ++v)
        for (int64_t row = row_begin; row < row_end; ++row) {
          scalar_t* out_row = plan.stream_rows ? chunk_rows + (row - row_begin) * row_elements : nullptr;
          plan.run_row(f, grad_output, weight, nullptr, grad_input, row, v, out_row);
          prefetch.step();
        }
      if (plan.stream_rows)
        stream_copy(grad_input + row_begin * row_elements, chunk_rows, (row_end - row_begin) * row_elements);
    }
    void add_next_rows(SpreadPrefetch& prefetch, int64_t next_begin, int64_t next_end) const {
      add_rows_read<scalar_t>(prefetch, f, grad_output, nullptr, next_begin, next_end, true);
    }
  };
  weight_grad_impl<scalar_t>(wa, InputGradRows{g, f, plan, static_cast<const scalar_t*>(wa.input), grad_output,
                                               w.data(), grad_input});
}

}  // namespace

void forward(const ForwardArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, args.dtype, "fastvid.depthwise_conv3d",
                                  [&] { forward_impl<scalar_t>(args); });
}

void input_grad(const InputGradArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, args.dtype, "fastvid.depthwise_conv3d_backward",
                                  [&] { input_grad_impl<scalar_t>(args); });
}

void weight_grad(const WeightGradArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, args.dtype, "fastvid.depthwise_conv3d_backward",
                                  [&] { weight_grad_impl<scalar_t>(args); });
}

void backward(const InputGradArgs& input_grad_args, const WeightGradArgs& weight_grad_args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, weight_grad_args.dtype, "fastvid.depthwise_conv3d_backward",
                                  [&] { backward_impl<scalar_t>(input_grad_args, weight_grad_args); });
}

}  // namespace FASTVID_ISA
}  // namespace depthwise3d
}  // namespace fastvid
#endif  // FASTVID_ISA
