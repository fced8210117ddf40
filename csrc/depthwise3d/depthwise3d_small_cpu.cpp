// CPU depthwise 3D conv kernels for small planes: channel multiplier 1, every stride 1 (the forward
// also W stride 2 with any T and H stride, the backward also any stride), rows narrower than the ops send
// elsewhere (depthwise3d_ops.cpp, kernel_path: NCDHW rows narrower than 16, the backward of channels_last_3d
// rows narrower than 8).
//
// Vectorised along W (depthwise3d_ncdhw_cpu.cpp), rows of 7 values leave most lanes of a vector idle
// and a plane's set-up costs more than its few outputs; vectorised along channels, every lane is
// busy, but NCDHW tensors had to be copied to channels_last_3d and back through memory (two copies per
// forward, three per backward). Here one work unit is one batch item × one vector of L channels: its
// source volume is brought into a zero-padded channels-innermost scratch [Tp][Hp][Wp][L] in cache
// (NCDHW: the L channels' T·H·W values lie one after another and are transposed L×L blocks at a time in
// registers; channels_last_3d: one vector per position), every tap is then a whole-vector FMA with
// the unit's L weights, no bounds tests, and the unit's results go back the same way. Each tensor
// is read or written once per call.
//   forward:         out[o] = bias + Σ_k w[k] · X[o·s + k·d]            (X: the input padded by p)
//   input gradient:  the forward over grad_output with the kernel flipped and padding d·(k - 1) - p
//                    (flipped_geometry); with a stride s, one such correlation per phase of the input
//                    positions (i mod s along each dim), each with the flipped taps that reach
//                    grad_output's positions (backward_phases)
//   weight gradient: gw[k] = Σ_o go[o] · X[o·s + k·d], gb = Σ_o go[o]: one partial per unit, the units
//                    of a channel vector added in batch order (bit-identical whatever the thread count)
// Everything below is compiled once per ISA path (cpu_isa.h); the entry points at the top pick one.
#include "depthwise3d_kernels.h"
#include "depthwise3d_math.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <utility>
#include <vector>

#include "../cpu_isa.h"
#include "../fastvid_common.h"

#ifdef FASTVID_ISA_X86
#include <immintrin.h>  // cpu_vec.h's bf16 / fp16 conversions: included once, outside the per-ISA passes
#endif

#ifndef FASTVID_ISA
// The path's geometry rules (read by every ISA pass below and by small_plane_applies).
namespace fastvid {
namespace depthwise3d {
namespace small_plane {
// Output positions computed together along W (independent accumulators); the last block of a row
// reads the scratch's zero columns past the row and is stored only up to OW.
constexpr int64_t kBlock = 8;
// Scratch width: the forward's blocks read up to (round_up(OW, kBlock) - 1)·sW + (kW - 1)·dW.
inline int64_t padded_width(const Geometry& g) {
  const int64_t blocks_end =
      ((g.out[2] + kBlock - 1) / kBlock * kBlock - 1) * g.stride[2] + (g.kernel[2] - 1) * g.dilation[2] + 1;
  return std::max(g.in[2] + 2 * g.padding[2], blocks_end);
}
// Positions of the padded volume the forward (or, for the flipped geometry, the input gradient) reads.
inline int64_t padded_positions(const Geometry& g) {
  return (g.in[0] + 2 * g.padding[0]) * (g.in[1] + 2 * g.padding[1]) * padded_width(g);
}
// Per unit the scratch holds up to three such volumes of one 64-byte vector per position (the backward:
// two padded ones and its result). Larger volumes take the other kernels: against the row kernels
// (AVX-512, two threads, session 33) the small-plane ones were 12-15 % faster at 9,792 positions
// (2×192×32×14²), ~5 % at 12,096 (2×64×16×40×10) and 10-25 % slower at 19,008 (2×96×64×14²).
constexpr int64_t kMaxPositions = 16384;
// The backward's input gradient along one dim, stride s: grad_input[i] = Σ_j wf[j] · G[i + j·d - P'] with
// the flipped taps wf, P' = d·(k - 1) - p, and G grad_output on the stride-1 output grid (its values at the
// positions o·s, zeros between). The input positions i = s·m + π of one phase π read nonzero values
// only through the taps j with (π + j·d - P') divisible by s: grad_output[m + (π + j·d - P') / s]. So each
// phase is a stride-1 correlation over the compact grad_output with those taps (j s/gcd(s, d) apart,
// reading d/gcd(s, d) positions apart). Stride 1: one phase, every tap (the flipped forward).
struct Phase {
  int64_t count = 0;      // input positions of the phase (m < count)
  int64_t taps = 0;       // taps reaching grad_output (0: the phase's gradient is 0)
  int64_t first_tap = 0;  // j of the first; the next ones tap_step apart
  int64_t tap_step = 1;
  int64_t first_read = 0;  // grad_output position the first tap reads for m = 0; the next taps' read_step apart
  int64_t read_step = 1;
};
struct PhasesOfDim {
  std::vector<Phase> phases;  // one per π < s
  int64_t pad_before = 0, pad_after = 0;  // zero positions grad_output's scratch needs on each side
};
inline PhasesOfDim phases_of_dim(const Geometry& g, int d) {
  const int64_t k = g.kernel[d], s = g.stride[d], dil = g.dilation[d], reach = dil * (k - 1) - g.padding[d];
  const int64_t gcd = std::gcd(s, dil);
  PhasesOfDim result;
  for (int64_t pi = 0; pi < s; ++pi) {
    Phase ph;
    ph.count = pi < g.in[d] ? (g.in[d] - pi + s - 1) / s : 0;
    ph.tap_step = s / gcd;
    ph.read_step = dil / gcd;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t offset = pi + j * dil - reach;
      if (((offset % s) + s) % s != 0) continue;
      if (ph.taps++ == 0) ph.first_tap = j, ph.first_read = offset / s;  // exact division
    }
    if (ph.count > 0 && ph.taps > 0) {
      const int64_t last_read = ph.count - 1 + ph.first_read + (ph.taps - 1) * ph.read_step;
      result.pad_before = std::max(result.pad_before, -ph.first_read);
      result.pad_after = std::max(result.pad_after, last_read - (g.out[d] - 1));
    }
    result.phases.push_back(ph);
  }
  return result;
}
using BackwardPhases = std::array<PhasesOfDim, 3>;  // T, H, W
inline BackwardPhases backward_phases(const Geometry& g) {
  return {phases_of_dim(g, 0), phases_of_dim(g, 1), phases_of_dim(g, 2)};
}
// Positions of the backward's grad_output scratch (compact, padded as the phases ask).
inline int64_t grad_output_positions(const Geometry& g, const BackwardPhases& phases) {
  int64_t n = 1;
  for (int d = 0; d < 3; ++d) n *= g.out[d] + phases[d].pad_before + phases[d].pad_after;
  return n;
}
// The rules both directions share: m == 1, a padding within the kernel's reach (as flipped_geometry),
// the input's padded volume and the input's and output's positions within the limit.
inline bool fits_small_planes(const Geometry& g) {
  if (g.multiplier != 1) return false;
  for (int d = 0; d < 3; ++d)
    if (g.padding[d] > g.dilation[d] * (g.kernel[d] - 1)) return false;
  const int64_t out_positions = g.out[0] * g.out[1] * g.out[2], in_positions = g.in[0] * g.in[1] * g.in[2];
  return padded_positions(g) <= kMaxPositions && std::max(out_positions, in_positions) <= kMaxPositions;
}
}  // namespace small_plane
}  // namespace depthwise3d
}  // namespace fastvid

#define FASTVID_ISA_SOURCE "depthwise3d/depthwise3d_small_cpu.cpp"
#include "../cpu_isa_each.h"

namespace fastvid {
namespace depthwise3d {
// The forward alone also takes W stride 2, with any T and H stride: 4x192x8x14^2 -> 7^2 (X3D's stride-2
// block into its last stage, two threads, session 34) 0.83 -> 0.36 ms (AVX-512: layout copies before),
// 0.64 -> 0.32 (AVX2: the row kernels); 4x96x16x12^2 -> 6^2 0.63 -> 0.26 / 0.69 -> 0.26 ms. Not a T or
// H stride alone: the row kernels stay as fast or faster there (T stride 2, 14^2: 0.43-0.45 against
// 0.44-0.52 ms).
bool small_plane_forward_applies(const Geometry& g) {
  const bool unit_strides = g.stride[0] == 1 && g.stride[1] == 1 && g.stride[2] == 1;
  return (unit_strides || g.stride[2] == 2) && small_plane::fits_small_planes(g);
}

// The backward: the shared rules and grad_output's volume within the limit; any stride (one correlation
// per phase: backward_phases).
// Against the other kernels (the row kernels, or layout copies) it was faster on every stride measured
// (session 35, two threads, both gradients after native's fwd+bwd, AVX-512 / AVX2): 4x192x8x14^2
// s(1,2,2) 2.34 -> 0.88 / 2.96 -> 0.73 ms; s(2,1,1) 1.31 -> 1.09 / 1.74 -> 0.88; s(2,2,2) 1.90 -> 0.66 /
// 1.89 -> 0.56; s(3,3,3) 1.56 -> 0.61 / 1.70 -> 0.53; 4x96x16x12^2 s(1,2,2) 1.44 -> 0.59 / 1.56 -> 0.51;
// 4x432x8x7^2 s(1,2,2) 1.39 -> 0.53 / 1.46 -> 0.52, its channels_last_3d backward 0.65 -> 0.57 /
// 0.71 -> 0.53.
bool small_plane_applies(const Geometry& g) {
  return small_plane::fits_small_planes(g) &&  // before the phases: they assume a padding within reach
         small_plane::grad_output_positions(g, small_plane::backward_phases(g)) <= small_plane::kMaxPositions;
}
void forward_small_cpu(const ForwardArgs& args) { FASTVID_ISA_CALL(depthwise3d, forward_small(args)); }
void backward_small_cpu(const InputGradArgs& input_grad_args, const WeightGradArgs& weight_grad_args,
                        bool channels_last) {
  FASTVID_ISA_CALL(depthwise3d, backward_small(input_grad_args, weight_grad_args, channels_last));
}
}  // namespace depthwise3d
}  // namespace fastvid

#else  // ------------------------------------------------ one ISA path: namespace FASTVID_ISA
#include "depthwise3d_cpu_vec.h"

namespace fastvid {
namespace depthwise3d {
namespace FASTVID_ISA {
namespace {

using cpu::load_vec;
using cpu::store_vec;
using cpu::Vec;
using small_plane::kBlock;

#ifndef FASTVID_INLINE
#define FASTVID_INLINE __attribute__((always_inline)) inline
#endif

// Rows a and b of an L×L block, a = row i and b = row i + bit (bit i clear): exchanges element
// (i, l + bit) with (i + bit, l) for every column l with that bit clear, i.e. swaps that bit of the
// row and of the column index. Doing it for every bit (in any order) transposes the block.
template <int bit, typename V, size_t... l>
FASTVID_INLINE void exchange_bit(V& a, V& b, std::index_sequence<l...>) {
  constexpr size_t L = sizeof...(l);
  const V low = __builtin_shufflevector(a, b, ((l & bit) ? L + l - bit : l)...);
  const V high = __builtin_shufflevector(a, b, ((l & bit) ? L + l : l + bit)...);
  a = low, b = high;
}
template <int bit, int L, typename V, size_t... i>
FASTVID_INLINE void exchange_rows(V (&r)[L], std::index_sequence<i...>) {
  (((i & bit) == 0 ? exchange_bit<bit>(r[i], r[(i + bit) % L], std::make_index_sequence<L>{}) : void()), ...);
}
template <int L, int bit = L / 2, typename V>
FASTVID_INLINE void transpose(V (&r)[L]) {
  if constexpr (bit >= 1) {
    exchange_rows<bit, L>(r, std::make_index_sequence<L>{});
    transpose<L, bit / 2>(r);
  }
}

// One unit's source volume into its padded scratch: channel l's n values at src + l·n (l < lanes)
// to dst[offset[j] + l] for positions j in [0, n); lanes >= `lanes` (the tail of the channels) get 0.
template <typename scalar_t, typename acc_t>
void scatter_in(const scalar_t* src, int64_t lanes, int64_t n, const int64_t* offset, acc_t* dst) {
  using V = typename Vec<acc_t>::type;
  constexpr int L = Vec<acc_t>::lanes;
  V r[L];
  int64_t j0 = 0;
  for (; j0 + L <= n; j0 += L) {
#pragma GCC unroll 16
    for (int l = 0; l < L; ++l) r[l] = l < lanes ? load_vec<V>(src + l * n + j0) : V{};
    transpose<L>(r);
#pragma GCC unroll 16
    for (int j = 0; j < L; ++j) store_vec(dst + offset[j0 + j], r[j]);
  }
  if (j0 == n) return;
  const int64_t rest = n - j0;  // the last positions: through a zeroed block (no reads past a row)
  alignas(64) acc_t block[L][L] = {};
  for (int64_t l = 0; l < lanes; ++l)
    for (int64_t j = 0; j < rest; ++j) block[l][j] = static_cast<acc_t>(src[l * n + j0 + j]);
#pragma GCC unroll 16
  for (int l = 0; l < L; ++l) r[l] = load_vec<V>(block[l]);
  transpose<L>(r);
#pragma GCC unroll 16
  for (int j = 0; j < L; ++j)
    if (j < rest) store_vec(dst + offset[j0 + j], r[j]);
}

// The inverse for a compact result: src[j·L + l] (positions j in [0, n), src readable up to position
// round_up(n, L)) into channel rows dst + l·n for l < lanes.
template <typename scalar_t, typename acc_t>
void gather_out(const acc_t* src, int64_t lanes, int64_t n, scalar_t* dst) {
  using V = typename Vec<acc_t>::type;
  constexpr int L = Vec<acc_t>::lanes;
  V r[L];
  for (int64_t j0 = 0; j0 < n; j0 += L) {
#pragma GCC unroll 16
    for (int j = 0; j < L; ++j) r[j] = load_vec<V>(src + (j0 + j) * L);
    transpose<L>(r);
    const int64_t count = std::min<int64_t>(L, n - j0);
    if (count == L) {
#pragma GCC unroll 16
      for (int l = 0; l < L; ++l)
        if (l < lanes) store_vec(dst + l * n + j0, r[l]);
    } else {
#pragma GCC unroll 16
      for (int l = 0; l < L; ++l) {
        if (l >= lanes) continue;
        alignas(64) acc_t values[L];
        std::memcpy(values, &r[l], sizeof values);
        for (int64_t j = 0; j < count; ++j) dst[l * n + j0 + j] = static_cast<scalar_t>(values[j]);
      }
    }
  }
}

// One unit's values in an activation tensor: NCDHW (its L channel rows of n values one after another,
// transposed by scatter_in / gather_out) or channels innermost (at every position L values, C apart:
// copied a vector at a time). The channel tail (lanes < L) goes through a zeroed block.
template <bool kChannelsLast, typename scalar_t, typename acc_t>
void load_unit(const scalar_t* src, int64_t C, int64_t lanes, int64_t n, const int64_t* offset, acc_t* dst) {
  if constexpr (!kChannelsLast) {
    scatter_in(src, lanes, n, offset, dst);
  } else {
    using V = typename Vec<acc_t>::type;
    constexpr int L = Vec<acc_t>::lanes;
    if (lanes == L) {
      for (int64_t j = 0; j < n; ++j) store_vec(dst + offset[j], load_vec<V>(src + j * C));
      return;
    }
    alignas(64) acc_t block[L] = {};
    for (int64_t j = 0; j < n; ++j) {
      for (int64_t l = 0; l < lanes; ++l) block[l] = static_cast<acc_t>(src[j * C + l]);
      store_vec(dst + offset[j], load_vec<V>(block));
    }
  }
}
template <bool kChannelsLast, typename scalar_t, typename acc_t>
void store_unit(const acc_t* src, int64_t C, int64_t lanes, int64_t n, scalar_t* dst) {
  if constexpr (!kChannelsLast) {
    gather_out(src, lanes, n, dst);
  } else {
    using V = typename Vec<acc_t>::type;
    constexpr int L = Vec<acc_t>::lanes;
    if (lanes == L) {
      for (int64_t j = 0; j < n; ++j) store_vec(dst + j * C, load_vec<V>(src + j * L));
      return;
    }
    for (int64_t j = 0; j < n; ++j)
      for (int64_t l = 0; l < lanes; ++l) dst[j * C + l] = static_cast<scalar_t>(src[j * L + l]);
  }
}

// Unit u (channel vector u / B, batch item u % B) of an activation tensor with `positions` positions.
template <bool kChannelsLast>
struct UnitIndex {
  int64_t B, C, L;
  int64_t offset(int64_t u, int64_t positions) const {
    const int64_t b = u % B, c0 = u / B * L;
    return kChannelsLast ? b * positions * C + c0 : (b * C + c0) * positions;
  }
  int64_t lanes(int64_t u) const { return std::min(L, C - u / B * L); }
};

// Scratch of one unit's padded source volume: dims[0] × dims[1] × dims[2] positions of L lanes, and
// the scratch offset of each source position (t, h, w) in row-major order.
struct PaddedVolume {
  int64_t dims[3] = {0, 0, 0}, pad[3] = {0, 0, 0};
  std::vector<int64_t> offset;
  int64_t elements(int lanes) const { return dims[0] * dims[1] * dims[2] * lanes; }
  // Scratch element of padded position (t, h, w) relative to the source's (0, 0, 0) position.
  int64_t at(int64_t t, int64_t h, int64_t w, int lanes) const {
    return (((t + pad[0]) * dims[1] + h + pad[1]) * dims[2] + w + pad[2]) * lanes;
  }
};

// Scratch offsets of a source's count[0] × count[1] × count[2] positions (row-major) from the volume's
// (0, 0, 0): where load_unit writes them.
std::vector<int64_t> source_offsets(const PaddedVolume& v, const int64_t* count, int lanes) {
  std::vector<int64_t> offset;
  offset.reserve(count[0] * count[1] * count[2]);
  for (int64_t t = 0; t < count[0]; ++t)
    for (int64_t h = 0; h < count[1]; ++h)
      for (int64_t w = 0; w < count[2]; ++w) offset.push_back(v.at(t, h, w, lanes));
  return offset;
}

// The volume a correlation with geometry g reads (its input, padded by g.padding).
PaddedVolume padded_volume(const Geometry& g, int lanes) {
  PaddedVolume v;
  for (int d = 0; d < 3; ++d) v.pad[d] = g.padding[d];
  v.dims[0] = g.in[0] + 2 * g.padding[0];
  v.dims[1] = g.in[1] + 2 * g.padding[1];
  v.dims[2] = small_plane::padded_width(g);
  v.offset = source_offsets(v, g.in, lanes);
  return v;
}

// One correlation over a unit's scratch: count[0] × count[1] × count[2] outputs, output (ot, oh, ow)
//   out[out0 + ot·out_t + oh·out_h + ow·out_step] =
//     init + Σ_(row r) Σ_(kw < kW) src[ot·src_t + oh·src_h + ow·S·L + row_offset[r] + kw·kw_step] · w[r·kW + kw]
// with w from the sweep's first weight vector. The forward is one sweep (forward_sweep); the backward's
// input gradient one per phase of the input positions (input_grad_sweeps).
struct Sweep {
  int64_t rows = 0;                // tap rows: (kt, kh) pairs
  int64_t row_offset[7 * 7] = {};  // each one's source row, from the output's (elements)
  int64_t kW = 0, kw_step = 0;     // W taps per row and the scratch step between them
  int64_t weights = 0;             // the sweep's first weight vector
  int64_t count[3] = {0, 0, 0};
  int64_t src_t = 0, src_h = 0;                          // source step per output T / H row
  int64_t out0 = 0, out_t = 0, out_h = 0, out_step = 0;  // output offsets
  // kW where correlate_block shares a row's loads among its taps (3, 5, and 2: the phases of a k = 3,
  // stride-2 input gradient; 9-11 % faster there than one load per FMA), else 0
  int64_t reuse_kw = 0;
  int S = 1;             // source positions per output position along W (1 or 2)
};

// R output rows × P positions along W (R·P independent accumulators) of a sweep; rows src_h / out_h
// apart. KW > 0 (kW = KW, kw_step = L): each source vector of a row is loaded once for the up to KW
// positions that read it ((P - 1)·S + KW loads for KW·P FMAs), the KW weights held; KW = 0: any kW and
// step, one load per FMA.
template <int P, int R, int KW, int S, typename V, typename acc_t>
FASTVID_INLINE void correlate_block(const Sweep& t, const acc_t* src, const acc_t* w, const V& init, acc_t* out) {
  constexpr int L = sizeof(V) / sizeof(acc_t);
  V a[R][P];
#pragma GCC unroll 16
  for (int i = 0; i < R * P; ++i) a[i / P][i % P] = init;
  for (int64_t r = 0; r < t.rows; ++r, w += t.kW * L) {
    const acc_t* x = src + t.row_offset[r];
    if constexpr (KW > 0) {
      V wk[KW];
#pragma GCC unroll 8
      for (int k = 0; k < KW; ++k) wk[k] = load_vec<V>(w + k * L);
#pragma GCC unroll 2
      for (int rr = 0; rr < R; ++rr) {
#pragma GCC unroll 32
        for (int i = 0; i < (P - 1) * S + KW; ++i) {
          V xv = load_vec<V>(x + rr * t.src_h + i * L);
          asm("" : "+v"(xv));  // one load for its up to KW FMAs (gcc would fold it into each of them)
#pragma GCC unroll 8
          for (int k = 0; k < KW; ++k)
            if (i - k >= 0 && (i - k) % S == 0 && (i - k) / S < P) a[rr][(i - k) / S] += xv * wk[k];
        }
      }
    } else {
      for (int64_t kw = 0; kw < t.kW; ++kw, x += t.kw_step) {
        const V wv = load_vec<V>(w + kw * L);
#pragma GCC unroll 16
        for (int i = 0; i < R * P; ++i)
          a[i / P][i % P] += load_vec<V>(x + (i / P) * t.src_h + (i % P) * S * L) * wv;
      }
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < R * P; ++i) store_vec(out + (i / P) * t.out_h + (i % P) * t.out_step, a[i / P][i % P]);
}

template <int R, int KW, int S, typename V, typename acc_t>
FASTVID_INLINE void correlate_rows(const Sweep& t, const acc_t* src, const acc_t* w, const V& init, acc_t* out) {
  constexpr int L = sizeof(V) / sizeof(acc_t);
  const int64_t OW = t.count[2];
  for (int64_t ow0 = 0; ow0 < OW; ow0 += kBlock) {
    const acc_t* x = src + ow0 * S * L;
    acc_t* o = out + ow0 * t.out_step;
    switch (std::min<int64_t>(kBlock, OW - ow0)) {  // exactly the row's positions: no idle accumulators
      case 1: correlate_block<1, R, KW, S>(t, x, w, init, o); break;
      case 2: correlate_block<2, R, KW, S>(t, x, w, init, o); break;
      case 3: correlate_block<3, R, KW, S>(t, x, w, init, o); break;
      case 4: correlate_block<4, R, KW, S>(t, x, w, init, o); break;
      case 5: correlate_block<5, R, KW, S>(t, x, w, init, o); break;
      case 6: correlate_block<6, R, KW, S>(t, x, w, init, o); break;
      case 7: correlate_block<7, R, KW, S>(t, x, w, init, o); break;
      default: correlate_block<8, R, KW, S>(t, x, w, init, o); break;
    }
  }
}

// Two output rows where there are two, else one.
template <int KW, int S, typename V, typename acc_t>
FASTVID_INLINE void correlate_row_pair(const Sweep& t, int64_t rows, const acc_t* src, const acc_t* w, const V& init,
                                       acc_t* out) {
  if (rows == 2) correlate_rows<2, KW, S>(t, src, w, init, out);
  else correlate_rows<1, KW, S>(t, src, w, init, out);
}

// Memory the next steps of a thread will touch (the next unit's source volume, this unit's output
// rows), prefetched a few lines at a time while a unit computes from its scratch. Without it each
// unit's L channel rows start cold: rows of a few hundred values are too short for the hardware
// prefetchers to run ahead, and the transposes wait on their lines (4x432x8x7^2, two threads: forward
// 0.36-0.38 -> 0.32 ms back to back, 0.53-0.56 -> 0.43-0.46 after a 64 MB write; fwd+bwd after
// native's 1.63-1.76 -> 1.44-1.57 ms).
struct Prefetch {
  static constexpr int kMax = 3;
  const char* next[kMax] = {};
  int64_t left[kMax] = {}, step[kMax] = {};  // lines, bytes between them
  int regions = 0;
  int64_t total = 0;
  // One unit's values in a tensor (as load_unit / store_unit read and write them): NCDHW a contiguous
  // block, channels innermost one line per position.
  template <bool kChannelsLast, typename scalar_t>
  void add(const scalar_t* p, const UnitIndex<kChannelsLast>& unit, int64_t u, int64_t positions) {
    if (p == nullptr || regions == kMax) return;
    next[regions] = reinterpret_cast<const char*>(p + unit.offset(u, positions));
    left[regions] = kChannelsLast ? positions : (unit.lanes(u) * positions * int64_t(sizeof(scalar_t)) + 63) / 64;
    step[regions] = kChannelsLast ? unit.C * int64_t(sizeof(scalar_t)) : 64;
    total += left[regions++];
  }
  // Up to n more lines, in region order.
  void issue(int64_t n) {
    for (int r = 0; r < regions && n > 0; ++r)
      for (; left[r] > 0 && n > 0; --left[r], --n, next[r] += step[r]) __builtin_prefetch(next[r], 0, 2);
  }
};

// The forward's sweep for a unit: out[(ot·OH + oh)·OW + ow] = bias + Σ_taps w[tap] · src[the padded
// position o·s + k·d] (W stride 1 or 2), src padded as padded_volume(g), w [taps][L], out compact.
Sweep forward_sweep(const Geometry& g, const PaddedVolume& v, int L) {
  Sweep t;
  const int64_t src_row = v.dims[2] * L;
  t.rows = g.kernel[0] * g.kernel[1];
  for (int64_t kt = 0; kt < g.kernel[0]; ++kt)
    for (int64_t kh = 0; kh < g.kernel[1]; ++kh)
      t.row_offset[kt * g.kernel[1] + kh] = (kt * g.dilation[0] * v.dims[1] + kh * g.dilation[1]) * src_row;
  t.kW = g.kernel[2];
  t.kw_step = g.dilation[2] * L;
  t.reuse_kw = g.dilation[2] == 1 && (t.kW == 3 || t.kW == 5) ? t.kW : 0;
  for (int d = 0; d < 3; ++d) t.count[d] = g.out[d];
  t.src_t = g.stride[0] * v.dims[1] * src_row;
  t.src_h = g.stride[1] * src_row;
  t.out_t = g.out[1] * g.out[2] * L;
  t.out_h = g.out[2] * L;
  t.out_step = L;
  t.S = static_cast<int>(g.stride[2]);
  return t;
}

// The backward's grad_output scratch: compact, padded as its phases ask.
PaddedVolume grad_output_volume(const Geometry& g, const small_plane::BackwardPhases& phases, int lanes) {
  PaddedVolume v;
  for (int d = 0; d < 3; ++d) {
    v.pad[d] = phases[d].pad_before;
    v.dims[d] = g.out[d] + phases[d].pad_before + phases[d].pad_after;
  }
  v.offset = source_offsets(v, g.out, lanes);
  return v;
}

// The input gradient's sweeps, one per phase (πT, πH, πW) of the input positions (backward_phases) over
// grad_output's scratch v, each storing its positions s·m + π of the compact result. weight_taps gets
// the weight's tap (of [taps], unflipped) for each weight vector the sweeps read, in order.
std::vector<Sweep> input_grad_sweeps(const Geometry& g, const small_plane::BackwardPhases& dims, const PaddedVolume& v,
                                     int L, std::vector<int64_t>& weight_taps) {
  using small_plane::Phase;
  const int64_t src_row = v.dims[2] * L, taps = g.taps();
  std::vector<Sweep> sweeps;
  weight_taps.clear();
  for (int64_t pt = 0; pt < g.stride[0]; ++pt)
    for (int64_t ph = 0; ph < g.stride[1]; ++ph)
      for (int64_t pw = 0; pw < g.stride[2]; ++pw) {
        const Phase& T = dims[0].phases[pt];
        const Phase& H = dims[1].phases[ph];
        const Phase& W = dims[2].phases[pw];
        if (T.count == 0 || H.count == 0 || W.count == 0) continue;
        Sweep t;
        t.rows = T.taps * H.taps;  // 0 (or kW = 0): the phase's gradient is 0, stored as such
        t.weights = static_cast<int64_t>(weight_taps.size());
        for (int64_t at = 0; at < T.taps; ++at)
          for (int64_t ah = 0; ah < H.taps; ++ah) {
            t.row_offset[at * H.taps + ah] =
                v.at(T.first_read + at * T.read_step, H.first_read + ah * H.read_step, W.first_read, L);
            for (int64_t aw = 0; aw < W.taps; ++aw) {
              const int64_t jt = T.first_tap + at * T.tap_step, jh = H.first_tap + ah * H.tap_step,
                            jw = W.first_tap + aw * W.tap_step;
              weight_taps.push_back(taps - 1 - (jt * g.kernel[1] + jh) * g.kernel[2] - jw);  // j flipped
            }
          }
        t.kW = W.taps;
        t.kw_step = W.read_step * L;
        t.reuse_kw = W.read_step == 1 && (W.taps == 2 || W.taps == 3 || W.taps == 5) ? W.taps : 0;
        t.count[0] = T.count, t.count[1] = H.count, t.count[2] = W.count;
        t.src_t = v.dims[1] * src_row;
        t.src_h = src_row;
        t.out0 = ((pt * g.in[1] + ph) * g.in[2] + pw) * L;
        t.out_t = g.stride[0] * g.in[1] * g.in[2] * L;
        t.out_h = g.stride[1] * g.in[2] * L;
        t.out_step = g.stride[2] * L;
        t.S = 1;
        sweeps.push_back(t);
      }
  return sweeps;
}

// One unit's sweeps: w the unit's weight vectors (as the sweeps' weights index them), bias [L] or
// nullptr. Output rows in pairs (two rows' accumulators: at OW = 7, 14 chains instead of 7).
template <int S, typename V, typename acc_t>
void run_sweep(const Sweep& t, const acc_t* src, const acc_t* w, const V& init, acc_t* out, Prefetch& prefetch,
               int64_t per_step) {
  for (int64_t ot = 0; ot < t.count[0]; ++ot)
    for (int64_t oh = 0; oh < t.count[1]; oh += 2) {
      prefetch.issue(per_step);
      const acc_t* x = src + ot * t.src_t + oh * t.src_h;
      acc_t* o = out + t.out0 + ot * t.out_t + oh * t.out_h;
      const int64_t rows = std::min<int64_t>(2, t.count[1] - oh);
      if (t.reuse_kw == 2) correlate_row_pair<2, S>(t, rows, x, w, init, o);
      else if (t.reuse_kw == 3) correlate_row_pair<3, S>(t, rows, x, w, init, o);
      else if (t.reuse_kw == 5) correlate_row_pair<5, S>(t, rows, x, w, init, o);
      else correlate_row_pair<0, S>(t, rows, x, w, init, o);
    }
}
template <typename acc_t>
void correlate_unit(const std::vector<Sweep>& sweeps, const acc_t* src, const acc_t* w, const acc_t* bias, acc_t* out,
                    Prefetch& prefetch) {
  using V = typename Vec<acc_t>::type;
  constexpr int L = Vec<acc_t>::lanes;
  const V init = bias != nullptr ? load_vec<V>(bias) : V{};
  int64_t steps = 0;
  for (const Sweep& t : sweeps) steps += t.count[0] * ((t.count[1] + 1) / 2);
  const int64_t per_step = steps > 0 ? (prefetch.total + steps - 1) / steps : 0;
  for (const Sweep& t : sweeps) {
    if (t.S == 2) run_sweep<2>(t, src, w + t.weights * L, init, out, prefetch, per_step);
    else run_sweep<1>(t, src, w + t.weights * L, init, out, prefetch, per_step);
  }
}

// dW = 1, W stride S: a[kh·KW + kw] += Σ_p go[p] · x[kh][p·S + kw] for KH rows of X and KW taps over
// P positions of one output row, the P grad_output vectors loaded once and each X vector once for the
// up to KW (p, kw) pairs reading it (P + KH·((P - 1)·S + KW) loads for KH·KW·P FMAs). P + KH·KW + 1
// vector registers: P up to 8 with 32 registers, 4 with 16.
constexpr int kWeightBlock = cpu::kVecBytes == 64 ? 8 : 4;
template <int P, int KH, int KW, int S, typename V, typename acc_t>
FASTVID_INLINE void weight_grad_block(const acc_t* go, const acc_t* const* x, int64_t x0, V (&a)[KH * KW]) {
  constexpr int L = sizeof(V) / sizeof(acc_t);
  V gv[P];
#pragma GCC unroll 8
  for (int p = 0; p < P; ++p) gv[p] = load_vec<V>(go + p * L);
#pragma GCC unroll 3
  for (int kh = 0; kh < KH; ++kh) {
#pragma GCC unroll 20
    for (int i = 0; i < (P - 1) * S + KW; ++i) {
      V xv = load_vec<V>(x[kh] + x0 + i * L);
      asm("" : "+v"(xv));  // one load for its up to KW FMAs
#pragma GCC unroll 5
      for (int kw = 0; kw < KW; ++kw)
        if (i - kw >= 0 && (i - kw) % S == 0 && (i - kw) / S < P) a[kh * KW + kw] += gv[(i - kw) / S] * xv;
    }
  }
}
template <int KH, int KW, int S, typename V, typename acc_t>
FASTVID_INLINE void weight_grad_block(int64_t count, const acc_t* go, const acc_t* const* x, int64_t x0,
                                      V (&a)[KH * KW]) {
  switch (count) {
    case 1: return weight_grad_block<1, KH, KW, S>(go, x, x0, a);
    case 2: return weight_grad_block<2, KH, KW, S>(go, x, x0, a);
    case 3: return weight_grad_block<3, KH, KW, S>(go, x, x0, a);
    case 4: return weight_grad_block<4, KH, KW, S>(go, x, x0, a);
  }
  if constexpr (kWeightBlock == 8) {
    switch (count) {
      case 5: return weight_grad_block<5, KH, KW, S>(go, x, x0, a);
      case 6: return weight_grad_block<6, KH, KW, S>(go, x, x0, a);
      case 7: return weight_grad_block<7, KH, KW, S>(go, x, x0, a);
      default: return weight_grad_block<8, KH, KW, S>(go, x, x0, a);
    }
  }
}

// A unit's weight and bias gradient sums added to sums[tap·L + l] (tap == taps: the bias):
// gw[k] = Σ_o go[o] · X[o·s + k·d], gb = Σ_o go[o]; go and X in their padded scratch volumes.
template <typename acc_t>
void weight_grad_unit(const Geometry& g, const PaddedVolume& go_volume, const acc_t* go, const PaddedVolume& x_volume,
                      const acc_t* x, bool want_weight, bool want_bias, acc_t* sums) {
  using V = typename Vec<acc_t>::type;
  constexpr int L = Vec<acc_t>::lanes;
  const int64_t OT = g.out[0], OH = g.out[1], OW = g.out[2], sW = g.stride[2];
  const int64_t kT = g.kernel[0], kH = g.kernel[1], kW = g.kernel[2], taps = g.taps();
  const auto go_row = [&](int64_t ot, int64_t oh) { return go + go_volume.at(ot, oh, 0, L); };
  // X's padded row o·s + k·d (the padded volume's first position is X's (0, 0, 0)).
  const auto x_row = [&](int64_t ot, int64_t oh, int64_t kt, int64_t kh) {
    return x + ((ot * g.stride[0] + kt * g.dilation[0]) * x_volume.dims[1] + oh * g.stride[1] + kh * g.dilation[1]) *
                   x_volume.dims[2] * L;
  };
  if (want_bias) {
    V a[4] = {};
    for (int64_t ot = 0; ot < OT; ++ot)
      for (int64_t oh = 0; oh < OH; ++oh) {
        const acc_t* gr = go_row(ot, oh);
        int64_t ow = 0;
        for (; ow + 4 <= OW; ow += 4)
#pragma GCC unroll 4
          for (int p = 0; p < 4; ++p) a[p] += load_vec<V>(gr + (ow + p) * L);
        for (; ow < OW; ++ow) a[0] += load_vec<V>(gr + ow * L);
      }
    store_vec(sums + taps * L, load_vec<V>(sums + taps * L) + ((a[0] + a[1]) + (a[2] + a[3])));
  }
  if (!want_weight) return;
  // The KH·KW sums of KH (kh) rows of one kt in registers over every output row, added to sums.
  const auto sweep = [&](auto kh_rows, auto kw_taps, auto w_stride, int64_t kt, int64_t kh0) {
    constexpr int KH = decltype(kh_rows)::value, KW = decltype(kw_taps)::value, S = decltype(w_stride)::value;
    V a[KH * KW] = {};
    for (int64_t ot = 0; ot < OT; ++ot)
      for (int64_t oh = 0; oh < OH; ++oh) {
        const acc_t* xr[KH];
        for (int kh = 0; kh < KH; ++kh) xr[kh] = x_row(ot, oh, kt, kh0 + kh);
        const acc_t* gr = go_row(ot, oh);
        for (int64_t ow0 = 0; ow0 < OW; ow0 += kWeightBlock)
          weight_grad_block<KH, KW, S>(std::min<int64_t>(kWeightBlock, OW - ow0), gr + ow0 * L, xr, ow0 * S * L, a);
      }
    for (int i = 0; i < KH * KW; ++i) {
      acc_t* s = sums + ((kt * kH + kh0) * kW + i) * L;
      store_vec(s, load_vec<V>(s) + a[i]);
    }
  };
  // The register sweeps for dW = 1 and a W stride of 1 or 2.
  const auto sweeps = [&](auto w_stride) {
    using std::integral_constant;
    if (kH == 3 && kW == 3) {  // the 9 (kh, kw) sums of a kt together
      for (int64_t kt = 0; kt < kT; ++kt)
        sweep(integral_constant<int, 3>{}, integral_constant<int, 3>{}, w_stride, kt, 0);
      return;
    }
    for (int64_t kt = 0; kt < kT; ++kt)  // a (kt, kh) row of taps at a time
      for (int64_t kh = 0; kh < kH; ++kh) {
        if (kW == 3) sweep(integral_constant<int, 1>{}, integral_constant<int, 3>{}, w_stride, kt, kh);
        else sweep(integral_constant<int, 1>{}, integral_constant<int, 5>{}, w_stride, kt, kh);
      }
  };
  if ((kW == 3 || kW == 5) && g.dilation[2] == 1 && sW <= 2) {
    if (sW == 2) sweeps(std::integral_constant<int, 2>{});
    else sweeps(std::integral_constant<int, 1>{});
    return;
  }
  for (int64_t kt = 0; kt < kT; ++kt)
    for (int64_t kh = 0; kh < kH; ++kh)
      for (int64_t kw = 0; kw < kW; ++kw) {
        V a[4] = {};
        for (int64_t ot = 0; ot < OT; ++ot)
          for (int64_t oh = 0; oh < OH; ++oh) {
            const acc_t* gr = go_row(ot, oh);
            const acc_t* xr = x_row(ot, oh, kt, kh) + kw * g.dilation[2] * L;
            int64_t ow = 0;
            for (; ow + 4 <= OW; ow += 4)
#pragma GCC unroll 4
              for (int p = 0; p < 4; ++p)
                a[p] += load_vec<V>(gr + (ow + p) * L) * load_vec<V>(xr + (ow + p) * sW * L);
            for (; ow < OW; ++ow) a[0] += load_vec<V>(gr + ow * L) * load_vec<V>(xr + ow * sW * L);
          }
        acc_t* s = sums + ((kt * kH + kh) * kW + kw) * L;
        store_vec(s, load_vec<V>(s) + ((a[0] + a[1]) + (a[2] + a[3])));
      }
}

// The unit's weight vectors w[n·L + l] = weight[l·taps + tap_of[n]] for n < count (the forward: every tap
// in order, tap_of nullptr), lanes past the channels 0, from the [C, taps] weight.
template <typename acc_t>
void unit_weights(const acc_t* weight, int64_t taps, int64_t lanes, const int64_t* tap_of, int64_t count, acc_t* w) {
  constexpr int L = Vec<acc_t>::lanes;
  std::fill(w, w + count * L, acc_t(0));
  for (int64_t l = 0; l < lanes; ++l)
    for (int64_t n = 0; n < count; ++n) w[n * L + l] = weight[l * taps + (tap_of != nullptr ? tap_of[n] : n)];
}

// NCDHW only: the channels-innermost forward beats this one on channels_last_3d inputs (kernel_path).
template <typename scalar_t>
void forward_impl(const ForwardArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int L = Vec<acc_t>::lanes;
  const Geometry& g = a.geo;
  const int64_t B = g.batch, C = g.channels, taps = g.taps(), groups = (C + L - 1) / L;
  const int64_t in_positions = g.in[0] * g.in[1] * g.in[2], out_positions = g.out[0] * g.out[1] * g.out[2];
  if (B == 0) return;
  const auto* input = static_cast<const scalar_t*>(a.input);
  const auto* weight = static_cast<const acc_t*>(a.weight);
  const auto* bias = static_cast<const acc_t*>(a.bias);
  auto* output = static_cast<scalar_t*>(a.output);
  const PaddedVolume volume = padded_volume(g, L);
  const std::vector<Sweep> sweeps{forward_sweep(g, volume, L)};
  const UnitIndex<false> unit{B, C, L};
  // Units (channel vector, batch item), batch innermost: consecutive units share their weights.
  at::parallel_for(0, groups * B, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> x(volume.elements(L), acc_t(0));  // its padding stays 0: only positions are written
    std::vector<acc_t> out((out_positions + L) * L, acc_t(0));
    std::vector<acc_t> w((taps + 1) * L);
    int64_t group = -1;
    for (int64_t u = begin; u < end; ++u) {
      const int64_t gi = u / B, c0 = gi * L, lanes = unit.lanes(u);
      if (gi != group) {
        unit_weights(weight + c0 * taps, taps, lanes, nullptr, taps, w.data());
        std::fill(w.begin() + taps * L, w.end(), acc_t(0));
        if (bias != nullptr) std::copy(bias + c0, bias + c0 + lanes, w.begin() + taps * L);
        group = gi;
      }
      load_unit<false>(input + unit.offset(u, in_positions), C, lanes, in_positions, volume.offset.data(), x.data());
      Prefetch prefetch;  // this unit's output, the next unit's input
      prefetch.add(output, unit, u, out_positions);
      if (u + 1 < end) prefetch.add(input, unit, u + 1, in_positions);
      correlate_unit(sweeps, x.data(), w.data(), bias != nullptr ? w.data() + taps * L : nullptr, out.data(), prefetch);
      store_unit<false>(out.data(), C, lanes, out_positions, output + unit.offset(u, out_positions));
    }
  });
}

template <typename scalar_t, bool kChannelsLast>
void backward_impl(const InputGradArgs& ia, const WeightGradArgs& wa) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int L = Vec<acc_t>::lanes;
  auto* grad_input = static_cast<scalar_t*>(ia.grad_input);
  auto* grad_weight = static_cast<acc_t*>(wa.grad_weight);
  auto* grad_bias = static_cast<acc_t*>(wa.grad_bias);
  const bool want_input = grad_input != nullptr, want_weight = grad_weight != nullptr, want_bias = grad_bias != nullptr;
  if (!want_input && !want_weight && !want_bias) return;
  const Geometry& g = want_input ? ia.geo : wa.geo;
  const int64_t B = g.batch, C = g.channels, taps = g.taps(), groups = (C + L - 1) / L;
  const int64_t in_positions = g.in[0] * g.in[1] * g.in[2], out_positions = g.out[0] * g.out[1] * g.out[2];
  const auto* grad_output = static_cast<const scalar_t*>(want_input ? ia.grad_output : wa.grad_output);
  const auto* weight = static_cast<const acc_t*>(ia.weight);
  const auto* input = static_cast<const scalar_t*>(wa.input);
  const int64_t units = groups * B, per_unit = (taps + 1) * L;
  const UnitIndex<kChannelsLast> unit{B, C, L};
  // grad_output padded for the input gradient's sweeps (their weight vectors: the taps in weight_taps),
  // the input padded as for the forward.
  const small_plane::BackwardPhases phases = small_plane::backward_phases(g);
  const PaddedVolume go_volume = grad_output_volume(g, phases, L);
  std::vector<int64_t> weight_taps;
  const std::vector<Sweep> sweeps =
      want_input ? input_grad_sweeps(g, phases, go_volume, L, weight_taps) : std::vector<Sweep>{};
  const PaddedVolume x_volume = want_weight ? padded_volume(g, L) : PaddedVolume{};
  std::vector<acc_t> partials(want_weight || want_bias ? units * per_unit : 0, acc_t(0));
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> go(go_volume.elements(L), acc_t(0)), x(x_volume.elements(L), acc_t(0));
    std::vector<acc_t> gi(want_input ? (in_positions + L) * L : 0, acc_t(0)), w(weight_taps.size() * L);
    int64_t group = -1;
    for (int64_t u = begin; u < end; ++u) {
      const int64_t gr = u / B, c0 = gr * L, lanes = unit.lanes(u);
      load_unit<kChannelsLast>(grad_output + unit.offset(u, out_positions), C, lanes, out_positions,
                               go_volume.offset.data(), go.data());
      if (want_input) {
        if (gr != group) {
          unit_weights(weight + c0 * taps, taps, lanes, weight_taps.data(), static_cast<int64_t>(weight_taps.size()),
                       w.data());
          group = gr;
        }
        Prefetch prefetch;  // this unit's grad_input, the next unit's grad_output and input
        prefetch.add(grad_input, unit, u, in_positions);
        if (u + 1 < end) {
          prefetch.add(grad_output, unit, u + 1, out_positions);
          if (want_weight) prefetch.add(input, unit, u + 1, in_positions);
        }
        correlate_unit(sweeps, go.data(), w.data(), static_cast<const acc_t*>(nullptr), gi.data(), prefetch);
        store_unit<kChannelsLast>(gi.data(), C, lanes, in_positions, grad_input + unit.offset(u, in_positions));
      }
      if (want_weight)
        load_unit<kChannelsLast>(input + unit.offset(u, in_positions), C, lanes, in_positions,
                                 x_volume.offset.data(), x.data());
      if (want_weight || want_bias)
        weight_grad_unit(g, go_volume, go.data(), x_volume, x.data(), want_weight, want_bias,
                         partials.data() + u * per_unit);
    }
  });
  if (want_weight) std::fill(grad_weight, grad_weight + C * taps, acc_t(0));
  if (want_bias) std::fill(grad_bias, grad_bias + C, acc_t(0));
  for (int64_t u = 0; u < units; ++u) {  // batch order within each channel vector
    const int64_t c0 = u / B * L, lanes = unit.lanes(u);
    const acc_t* p = partials.data() + u * per_unit;
    for (int64_t l = 0; l < lanes; ++l) {
      if (want_weight)
        for (int64_t t = 0; t < taps; ++t) grad_weight[(c0 + l) * taps + t] += p[t * L + l];
      if (want_bias) grad_bias[c0 + l] += p[taps * L + l];
    }
  }
}

}  // namespace

void forward_small(const ForwardArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, args.dtype, "fastvid.depthwise_conv3d",
                                  [&] { forward_impl<scalar_t>(args); });
}

void backward_small(const InputGradArgs& input_grad_args, const WeightGradArgs& weight_grad_args, bool channels_last) {
  const at::ScalarType dtype =
      input_grad_args.grad_input != nullptr ? input_grad_args.dtype : weight_grad_args.dtype;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "fastvid.depthwise_conv3d_backward", [&] {
    if (channels_last) backward_impl<scalar_t, true>(input_grad_args, weight_grad_args);
    else backward_impl<scalar_t, false>(input_grad_args, weight_grad_args);
  });
}

}  // namespace FASTVID_ISA
}  // namespace depthwise3d
}  // namespace fastvid
#endif  // FASTVID_ISA
