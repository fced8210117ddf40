// CPU gate kernels: rows of contiguous elements, parallel over rows with at::parallel_for.
//
// A row is one (batch, pixel) for channels-last planes or one (batch, channel) for NCHW planes,
// so every plane's inner stride is 1. The row loops call the shared math of recurrent_math.h and
// are compiled once per ISA path (cpu_isa.h: AVX-512, AVX2+FMA, baseline; gcc auto-vectorises them
// at each path's width; the float LSTM / GRU forward rows run the same math in explicit vectors on
// the AVX-512 and AVX2 paths, gate_vec below, their tails the scalar loop); the entry points at the
// top pick one at run time. Plain loops rather than
// at::vec::Vectorized: a vectorised exp/tanh in at::vec calls Sleef, which an extension cannot link
// portably, and at::vec is compiled for one ISA per build.
#include "recurrent_kernels.h"
#include "recurrent_math.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../cpu_isa.h"
#include "../fastvid_common.h"
#ifdef __x86_64__
#include <immintrin.h>
#endif

#ifndef FASTVID_ISA
#define FASTVID_ISA_SOURCE "recurrent/recurrent_cpu.cpp"
#include "../cpu_isa_each.h"

namespace fastvid {
namespace recurrent {
void lstm_forward_cpu(const LstmForwardArgs& a) { FASTVID_ISA_CALL(recurrent, lstm_forward(a)); }
void lstm_backward_cpu(const LstmBackwardArgs& a) { FASTVID_ISA_CALL(recurrent, lstm_backward(a)); }
void gru_forward_cpu(const GruForwardArgs& a) { FASTVID_ISA_CALL(recurrent, gru_forward(a)); }
void gru_backward_cpu(const GruBackwardArgs& a) { FASTVID_ISA_CALL(recurrent, gru_backward(a)); }
void gru_reset_forward_cpu(const GruResetForwardArgs& a) { FASTVID_ISA_CALL(recurrent, gru_reset_forward(a)); }
void gru_reset_backward_cpu(const GruResetBackwardArgs& a) { FASTVID_ISA_CALL(recurrent, gru_reset_backward(a)); }
}  // namespace recurrent
}  // namespace fastvid

#else  // ------------------------------------------------ one ISA path: namespace FASTVID_ISA
#undef FASTVID_GATE_VECTORS
#if defined(__x86_64__) && FASTVID_VEC_BYTES >= 32
// The LSTM / GRU forward rows of float pre-activations in explicit vectors (FASTVID_GATE_VECTORS): the
// auto-vectorised loops of the same math spilled its constants (AVX2's 16 registers), clamped with
// compare + blend pairs and divided by three Newton steps (no scalar spelling of rcp14/rcpps), at
// ~1 instruction per cycle; the LSTM gate rows were 18 % of the AVX2 fp32 no-grad ConvLSTM.
#define FASTVID_GATE_VECTORS 1
#include "../cpu_vec.h"  // load_vec / store_vec: the storage type <-> float vectors
#endif

namespace fastvid {
namespace recurrent {
namespace FASTVID_ISA {
namespace {

#ifdef FASTVID_GATE_VECTORS
namespace gate_vec {
using cpu_vec::FASTVID_ISA::load_vec;
using cpu_vec::FASTVID_ISA::store_vec;
using V = cpu_vec::FASTVID_ISA::Vec<float>::type;
using U32 = cpu_vec::FASTVID_ISA::U32;
constexpr int kLanes = cpu_vec::FASTVID_ISA::Vec<float>::lanes;

// max(c, x) / min(c, x) with the constant first: a NaN x comes out as NaN (maxps / minps return the
// second operand when either is NaN), as the scalar code's ternaries do.
#if FASTVID_VEC_BYTES == 64
inline V vmax(float c, V x) { return (V)_mm512_max_ps(_mm512_set1_ps(c), (__m512)x); }
inline V vmin(float c, V x) { return (V)_mm512_min_ps(_mm512_set1_ps(c), (__m512)x); }
inline V fma(V a, V b, V c) { return (V)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c); }
// 1/d: rcp14 (relative error < 2^-14) and one Newton step (~2^-28, below float rounding)
inline V reciprocal(V d) {
  const V y = (V)_mm512_rcp14_ps((__m512)d);
  return y * (2.0f - d * y);
}
#else
inline V vmax(float c, V x) { return (V)_mm256_max_ps(_mm256_set1_ps(c), (__m256)x); }
inline V vmin(float c, V x) { return (V)_mm256_min_ps(_mm256_set1_ps(c), (__m256)x); }
inline V fma(V a, V b, V c) { return (V)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c); }
// 1/d: rcpps (relative error < 1.5·2^-12) and two Newton steps (~1e-7 relative after rounding)
inline V reciprocal(V d) {
  V y = (V)_mm256_rcp_ps((__m256)d);
  y = y * (2.0f - d * y);
  return y * (2.0f - d * y);
}
#endif

// exp_fast of recurrent_math.h, lane-wise (same range reduction and polynomial, fused multiply-adds).
inline V exp(V x) {
  using namespace exp_fast_constants;
  x = vmin(kHigh, vmax(kLow, x));
  const V shifted = fma(x, V{} + kLog2e, V{} + kShifter);
  const V n = shifted - kShifter;
  V r = fma(n, V{} - kLn2Hi, x);
  r = fma(n, V{} + kLn2Lo, r);
  V p = V{} + kP0;
  p = fma(p, r, V{} + kP1);
  p = fma(p, r, V{} + kP2);
  p = fma(p, r, V{} + kP3);
  p = fma(p, r, V{} + kP4);
  p = fma(p, r, V{} + kP5);
  p = fma(p * r, r, r) + 1.0f;
  U32 bits;
  std::memcpy(&bits, &shifted, sizeof(bits));
  bits <<= 23;
  V scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline V sigmoid(V x) { return reciprocal(1.0f + exp(vmin(exp_fast_constants::kSigmoidExpMax, -x))); }
inline V tanh(V x) { return 2.0f * sigmoid(2.0f * x) - 1.0f; }
}  // namespace gate_vec
#endif

// ------------------------------------------------------------------------ row iteration
struct RowLayout {
  bool channels_inner;   // rows are (b, pixel) and the inner index is the channel
  int64_t rows_per_batch;
  int64_t inner;         // elements per row
};

bool is_broadcast(const Plane& p) { return p.stride_b == 0 && p.stride_c == 0 && p.stride_p == 0; }

RowLayout row_layout(const Geometry& geo, std::initializer_list<const Plane*> planes) {
  bool pixels_ok = true, channels_ok = true;
  for (const Plane* p : planes) {
    if (p->data == nullptr || is_broadcast(*p)) continue;
    pixels_ok = pixels_ok && (p->stride_p == 1 || geo.pixels == 1);
    channels_ok = channels_ok && (p->stride_c == 1 || geo.channels == 1);
  }
  TORCH_CHECK(pixels_ok || channels_ok,
              "fastvid internal error: gate planes mix NCHW and channels-last layouts");
  if (pixels_ok) return {false, geo.channels, geo.pixels};
  return {true, geo.pixels, geo.channels};
}

// Pointer to the first element of row (b, outer) of plane p.
template <typename T>
T* row_ptr(const Plane& p, const RowLayout& layout, int64_t b, int64_t outer) {
  if (p.data == nullptr) return nullptr;
  const int64_t outer_stride = layout.channels_inner ? p.stride_p : p.stride_c;
  return static_cast<T*>(p.data) + b * p.stride_b + outer * outer_stride;
}

// Runs body(state, b, outer) over all rows in parallel, with one state = make_state() per task (per-task
// scratch); rows are grouped so a task has >= 32k elements.
template <typename MakeState, typename Body>
void for_each_row(const Geometry& geo, const RowLayout& layout, const MakeState& make_state, const Body& body) {
  const int64_t rows = geo.batch * layout.rows_per_batch;
  if (rows == 0 || layout.inner == 0) return;
  const int64_t grain = std::max<int64_t>(1, 32768 / layout.inner);
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    auto state = make_state();
    for (int64_t row = begin; row < end; ++row)
      body(state, row / layout.rows_per_batch, row % layout.rows_per_batch);
  });
}

template <typename Body>
void for_each_row(const Geometry& geo, const RowLayout& layout, const Body& body) {
  for_each_row(geo, layout, [] { return 0; }, [&](int, int64_t b, int64_t outer) { body(b, outer); });
}

// Per-channel peephole weights seen along one row: the weights themselves when channels are the
// inner index, otherwise the row's single channel value repeated (filled per row).
template <typename acc_t>
struct PeepholeRow {
  const acc_t* weights;  // [3, C] or nullptr
  int64_t channels;
  std::vector<acc_t> repeated;

  PeepholeRow(const void* w, int64_t channels, const RowLayout& layout)
      : weights(static_cast<const acc_t*>(w)), channels(channels),
        repeated(3 * layout.inner, acc_t(0)) {}

  // Returns three pointers of length `inner` for w_ci, w_cf, w_co.
  void get(const RowLayout& layout, int64_t outer, const acc_t* out[3]) {
    for (int k = 0; k < 3; ++k) {
      if (weights != nullptr && layout.channels_inner) {
        out[k] = weights + k * channels;
        continue;
      }
      acc_t* dst = repeated.data() + k * layout.inner;
      if (weights != nullptr) std::fill(dst, dst + layout.inner, weights[k * channels + outer]);
      out[k] = dst;  // zeros when there is no peephole
    }
  }
};

template <typename T, typename acc_t>
inline acc_t ld(const T* p, int64_t j) { return static_cast<acc_t>(p[j]); }

// Rows of a sample the StepMask leaves out: zeros, copies of the previous state, and the sum of the
// state gradients dh_in[1] + dh_in[2] (out may alias b).
template <typename T>
void zero_row(T* p, int64_t n) {
  if (p != nullptr) std::fill(p, p + n, T(0));
}

template <typename T>
void copy_row(const T* src, T* dst, int64_t n) {
  if (dst != src) std::copy(src, src + n, dst);
}

template <typename S, typename D>
void convert_row(const S* src, D* dst, int64_t n) {
  if (dst != nullptr)
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<D>(src[j]);
}

template <typename scalar_t>
void sum_row(const scalar_t* a, const scalar_t* b, scalar_t* out, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t j = 0; j < n; ++j) out[j] = static_cast<scalar_t>(ld<scalar_t, acc_t>(a, j) + ld<scalar_t, acc_t>(b, j));
}

// ------------------------------------------------------------------------ LSTM
// pre_t: the pre-activations' type (scalar_t, or the accumulation type for a Winograd strip);
// kHidden: a_h is read and added (false: the hidden part is already in a_x).
template <typename scalar_t, typename pre_t>
struct LstmForwardRow {
  using acc_t = at::opmath_type<scalar_t>;
  const pre_t* a_x[4];
  const pre_t* a_h[4];
  const acc_t* c_prev;
  const acc_t* w[3];
  scalar_t* h_out;
  scalar_t* h_out2;
  acc_t* c_out;
  scalar_t* c_save;  // nullptr: not written
  scalar_t* gates_out[4];
};

template <typename scalar_t, typename pre_t, bool kSave, bool kHidden, bool kPeephole>
void lstm_forward_row(const LstmForwardRow<scalar_t, pre_t>& r, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  const pre_t *xi = r.a_x[0], *xf = r.a_x[1], *xg = r.a_x[2], *xo = r.a_x[3];
  const pre_t *hi = r.a_h[0], *hf = r.a_h[1], *hg = r.a_h[2], *ho = r.a_h[3];
  const acc_t *c_prev = r.c_prev, *w_ci = r.w[0], *w_cf = r.w[1], *w_co = r.w[2];
  scalar_t *h_out = r.h_out, *h_out2 = r.h_out2;
  acc_t* c_out = r.c_out;
  scalar_t* c_save = r.c_save;
  scalar_t *gi = r.gates_out[0], *gf = r.gates_out[1], *gg = r.gates_out[2], *go = r.gates_out[3];
  const auto pre = [&](const pre_t* x, const pre_t* h, int64_t j) {
    if constexpr (kHidden) return ld<pre_t, acc_t>(x, j) + ld<pre_t, acc_t>(h, j);
    else return ld<pre_t, acc_t>(x, j);
  };
  int64_t j0 = 0;
#ifdef FASTVID_GATE_VECTORS
  if constexpr (std::is_same_v<acc_t, float>) {
    namespace gv = gate_vec;
    const auto pre_v = [&](const pre_t* x, const pre_t* h, int64_t j) {
      if constexpr (kHidden) return gv::load_vec<gv::V>(x + j) + gv::load_vec<gv::V>(h + j);
      else return gv::load_vec<gv::V>(x + j);
    };
    for (; j0 + gv::kLanes <= n; j0 += gv::kLanes) {
      const int64_t j = j0;
      const gv::V cp = gv::load_vec<gv::V>(c_prev + j);
      const auto peep = [&](const float* w, gv::V state, gv::V a) {
        if constexpr (kPeephole) return gv::fma(gv::load_vec<gv::V>(w + j), state, a);
        else return a;
      };
      const gv::V i = gv::sigmoid(peep(w_ci, cp, pre_v(xi, hi, j)));
      const gv::V f = gv::sigmoid(peep(w_cf, cp, pre_v(xf, hf, j)));
      const gv::V g = gv::tanh(pre_v(xg, hg, j));
      const gv::V c = f * cp + i * g;
      const gv::V o = gv::sigmoid(peep(w_co, c, pre_v(xo, ho, j)));
      const gv::V h = o * gv::tanh(c);
      gv::store_vec(h_out + j, h);
      gv::store_vec(h_out2 + j, h);
      gv::store_vec(c_out + j, c);
      if (c_save != nullptr) gv::store_vec(c_save + j, c);
      if (kSave) {
        gv::store_vec(gi + j, i);
        gv::store_vec(gf + j, f);
        gv::store_vec(gg + j, g);
        gv::store_vec(go + j, o);
      }
    }
  }
#endif
#pragma GCC ivdep
  for (int64_t j = j0; j < n; ++j) {
    const LstmState<acc_t> s = lstm_forward<acc_t>(pre(xi, hi, j), pre(xf, hf, j), pre(xg, hg, j), pre(xo, ho, j),
                                                   c_prev[j], w_ci[j], w_cf[j], w_co[j], kPeephole);
    h_out[j] = static_cast<scalar_t>(s.h);
    h_out2[j] = static_cast<scalar_t>(s.h);
    c_out[j] = s.c;
    if (c_save != nullptr) c_save[j] = static_cast<scalar_t>(s.c);
    if (kSave) {
      gi[j] = static_cast<scalar_t>(s.i);
      gf[j] = static_cast<scalar_t>(s.f);
      gg[j] = static_cast<scalar_t>(s.g);
      go[j] = static_cast<scalar_t>(s.o);
    }
  }
}

template <typename scalar_t, typename pre_t, bool kHidden>
void lstm_forward_rows(const LstmForwardArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const RowLayout layout = row_layout(a.geo, {&a.a_x[0], &a.a_x[1], &a.a_x[2], &a.a_x[3], &a.a_h[0], &a.a_h[1],
                                              &a.a_h[2], &a.a_h[3], &a.c_prev, &a.h_out, &a.h_out2, &a.c_out,
                                              &a.c_save, &a.gates_out[0], &a.gates_out[1], &a.gates_out[2],
                                              &a.gates_out[3], &a.h_prev});
  TORCH_INTERNAL_ASSERT(a.mask.lengths == nullptr || a.h_prev.data != nullptr, "lstm_forward: a mask needs h_prev");
  const auto make_peephole = [&] { return PeepholeRow<acc_t>(a.peephole, a.geo.channels, layout); };
  for_each_row(a.geo, layout, make_peephole, [&](PeepholeRow<acc_t>& peephole, int64_t b, int64_t outer) {
    LstmForwardRow<scalar_t, pre_t> r;
    for (int k = 0; k < 4; ++k) {
      r.a_x[k] = row_ptr<const pre_t>(a.a_x[k], layout, b, outer);
      r.a_h[k] = kHidden ? row_ptr<const pre_t>(a.a_h[k], layout, b, outer) : nullptr;
      r.gates_out[k] = row_ptr<scalar_t>(a.gates_out[k], layout, b, outer);
    }
    r.c_prev = row_ptr<const acc_t>(a.c_prev, layout, b, outer);
    r.h_out = row_ptr<scalar_t>(a.h_out, layout, b, outer);
    r.h_out2 = row_ptr<scalar_t>(a.h_out2, layout, b, outer);
    r.c_out = row_ptr<acc_t>(a.c_out, layout, b, outer);
    r.c_save = row_ptr<scalar_t>(a.c_save, layout, b, outer);
    if (!a.mask.valid(b)) {
      zero_row(r.h_out, layout.inner);
      copy_row(row_ptr<const scalar_t>(a.h_prev, layout, b, outer), r.h_out2, layout.inner);
      copy_row(r.c_prev, r.c_out, layout.inner);
      convert_row(r.c_prev, r.c_save, layout.inner);
      for (int k = 0; k < 4 && a.save; ++k) zero_row(r.gates_out[k], layout.inner);
      return;
    }
    peephole.get(layout, outer, r.w);
    if (a.peephole != nullptr) {
      if (a.save) lstm_forward_row<scalar_t, pre_t, true, kHidden, true>(r, layout.inner);
      else lstm_forward_row<scalar_t, pre_t, false, kHidden, true>(r, layout.inner);
    } else {
      if (a.save) lstm_forward_row<scalar_t, pre_t, true, kHidden, false>(r, layout.inner);
      else lstm_forward_row<scalar_t, pre_t, false, kHidden, false>(r, layout.inner);
    }
  });
}

template <typename scalar_t>
void lstm_forward_impl(const LstmForwardArgs& a) {
  if (a.pre_acc) lstm_forward_rows<scalar_t, at::opmath_type<scalar_t>, false>(a);
  else lstm_forward_rows<scalar_t, scalar_t, true>(a);
}

// cell_t: the saved cell states' type (the accumulation type, or scalar_t from the bf16 sequence reserve).
template <typename scalar_t, typename cell_t>
struct LstmBackwardRow {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* dh_in[3];
  const acc_t* dc_in;
  const scalar_t* gates[4];
  const cell_t* c_prev;
  const cell_t* c;
  const acc_t* w[3];
  scalar_t* d_gates[4];
  acc_t* dc_prev;
};

template <typename scalar_t, typename cell_t>
void lstm_backward_row(const LstmBackwardRow<scalar_t, cell_t>& r, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t *dh0 = r.dh_in[0], *dh1 = r.dh_in[1], *dh2 = r.dh_in[2];
  const scalar_t *gi = r.gates[0], *gf = r.gates[1], *gg = r.gates[2], *go = r.gates[3];
  const acc_t* dc_in = r.dc_in;
  const cell_t *c_prev = r.c_prev, *c = r.c;
  const acc_t *w_ci = r.w[0], *w_cf = r.w[1], *w_co = r.w[2];
  scalar_t *di = r.d_gates[0], *df = r.d_gates[1], *dg = r.d_gates[2], *d_o = r.d_gates[3];
  acc_t* dc_prev = r.dc_prev;
#pragma GCC ivdep
  for (int64_t j = 0; j < n; ++j) {
    const acc_t dh = ld<scalar_t, acc_t>(dh0, j) + ld<scalar_t, acc_t>(dh1, j) + ld<scalar_t, acc_t>(dh2, j);
    const LstmGrad<acc_t> d = lstm_backward<acc_t>(dh, dc_in[j], ld<scalar_t, acc_t>(gi, j), ld<scalar_t, acc_t>(gf, j),
                                                   ld<scalar_t, acc_t>(gg, j), ld<scalar_t, acc_t>(go, j),
                                                   ld<cell_t, acc_t>(c_prev, j), ld<cell_t, acc_t>(c, j), w_ci[j],
                                                   w_cf[j], w_co[j]);
    di[j] = static_cast<scalar_t>(d.a_i);
    df[j] = static_cast<scalar_t>(d.a_f);
    dg[j] = static_cast<scalar_t>(d.a_g);
    d_o[j] = static_cast<scalar_t>(d.a_o);
    dc_prev[j] = d.c_prev;
  }
}

template <typename scalar_t, typename cell_t>
void lstm_backward_rows(const LstmBackwardArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const RowLayout layout =
      row_layout(a.geo, {&a.dh_in[0], &a.dh_in[1], &a.dh_in[2], &a.dc_in, &a.gates[0], &a.gates[1], &a.gates[2],
                         &a.gates[3], &a.c_prev, &a.c, &a.d_gates_out[0], &a.d_gates_out[1], &a.d_gates_out[2],
                         &a.d_gates_out[3], &a.dc_prev_out, &a.dh_prev_out});
  TORCH_INTERNAL_ASSERT(a.mask.lengths == nullptr || a.dh_prev_out.data != nullptr,
                        "lstm_backward: a mask needs dh_prev_out");
  const auto make_peephole = [&] { return PeepholeRow<acc_t>(a.peephole, a.geo.channels, layout); };
  for_each_row(a.geo, layout, make_peephole, [&](PeepholeRow<acc_t>& peephole, int64_t b, int64_t outer) {
    LstmBackwardRow<scalar_t, cell_t> r;
    for (int k = 0; k < 3; ++k) r.dh_in[k] = row_ptr<const scalar_t>(a.dh_in[k], layout, b, outer);
    for (int k = 0; k < 4; ++k) {
      r.gates[k] = row_ptr<const scalar_t>(a.gates[k], layout, b, outer);
      r.d_gates[k] = row_ptr<scalar_t>(a.d_gates_out[k], layout, b, outer);
    }
    r.dc_in = row_ptr<const acc_t>(a.dc_in, layout, b, outer);
    r.c_prev = row_ptr<const cell_t>(a.c_prev, layout, b, outer);
    r.c = row_ptr<const cell_t>(a.c, layout, b, outer);
    r.dc_prev = row_ptr<acc_t>(a.dc_prev_out, layout, b, outer);
    scalar_t* dh_prev = row_ptr<scalar_t>(a.dh_prev_out, layout, b, outer);
    if (!a.mask.valid(b)) {
      for (int k = 0; k < 4; ++k) zero_row(r.d_gates[k], layout.inner);
      copy_row(r.dc_in, r.dc_prev, layout.inner);
      sum_row(r.dh_in[1], r.dh_in[2], dh_prev, layout.inner);
      return;
    }
    zero_row(dh_prev, layout.inner);
    peephole.get(layout, outer, r.w);
    lstm_backward_row<scalar_t, cell_t>(r, layout.inner);
  });
}

template <typename scalar_t>
void lstm_backward_impl(const LstmBackwardArgs& a) {
  if (a.cells_in_dtype) lstm_backward_rows<scalar_t, scalar_t>(a);
  else lstm_backward_rows<scalar_t, at::opmath_type<scalar_t>>(a);
}

// ------------------------------------------------------------------------ GRU
// pre_t: the pre-activations' type (scalar_t, or the accumulation type for a fused Winograd strip);
// kHidden: h[0], h[1] read and added (false: h's r and z parts are already in x[0], x[1]).
template <typename scalar_t, typename pre_t>
struct GruForwardRow {
  const pre_t* x[3];
  const pre_t* h[3];
  const scalar_t* h_prev;
  scalar_t* h_out;
  scalar_t* h_out2;
  scalar_t* cache[4];
};

template <typename scalar_t, typename pre_t, bool kResetAfter, bool kSave, bool kHidden>
void gru_forward_row(const GruForwardRow<scalar_t, pre_t>& r, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  const pre_t *xr = r.x[0], *xz = r.x[1], *xn = r.x[2], *hr = r.h[0], *hz = r.h[1], *hn = r.h[2];
  const scalar_t* h_prev = r.h_prev;
  scalar_t *h_out = r.h_out, *h_out2 = r.h_out2;
  scalar_t *cr = r.cache[0], *cz = r.cache[1], *cn = r.cache[2], *chn = r.cache[3];
  const auto hidden = [&](const pre_t* h, int64_t j) {
    if constexpr (kHidden) return ld<pre_t, acc_t>(h, j);
    else return acc_t(0);
  };
  int64_t j0 = 0;
#ifdef FASTVID_GATE_VECTORS
  if constexpr (std::is_same_v<acc_t, float>) {
    namespace gv = gate_vec;
    const auto hidden_v = [&](const pre_t* h, int64_t j) {
      if constexpr (kHidden) return gv::load_vec<gv::V>(h + j);
      else return gv::V{};
    };
    for (; j0 + gv::kLanes <= n; j0 += gv::kLanes) {
      const int64_t j = j0;
      const gv::V h_n = gv::load_vec<gv::V>(hn + j);
      const gv::V hp = gv::load_vec<gv::V>(h_prev + j);
      const gv::V r = gv::sigmoid(gv::load_vec<gv::V>(xr + j) + hidden_v(hr, j));
      const gv::V z = gv::sigmoid(gv::load_vec<gv::V>(xz + j) + hidden_v(hz, j));
      const gv::V nn = gv::tanh(gv::load_vec<gv::V>(xn + j) + (kResetAfter ? r * h_n : h_n));
      const gv::V h = (1.0f - z) * nn + z * hp;
      gv::store_vec(h_out + j, h);
      gv::store_vec(h_out2 + j, h);
      if (kSave) {
        gv::store_vec(cr + j, r);
        gv::store_vec(cz + j, z);
        gv::store_vec(cn + j, nn);
        gv::store_vec(chn + j, h_n);
      }
    }
  }
#endif
#pragma GCC ivdep
  for (int64_t j = j0; j < n; ++j) {
    const acc_t h_n = ld<pre_t, acc_t>(hn, j);
    const GruState<acc_t> s = gru_forward<acc_t>(ld<pre_t, acc_t>(xr, j), ld<pre_t, acc_t>(xz, j),
                                                 ld<pre_t, acc_t>(xn, j), hidden(hr, j), hidden(hz, j), h_n,
                                                 ld<scalar_t, acc_t>(h_prev, j), kResetAfter);
    h_out[j] = static_cast<scalar_t>(s.h);
    h_out2[j] = static_cast<scalar_t>(s.h);
    if (kSave) {
      cr[j] = static_cast<scalar_t>(s.r);
      cz[j] = static_cast<scalar_t>(s.z);
      cn[j] = static_cast<scalar_t>(s.n);
      chn[j] = static_cast<scalar_t>(h_n);
    }
  }
}

template <typename scalar_t, typename pre_t, bool kHidden>
void gru_forward_rows(const GruForwardArgs& a) {
  const RowLayout layout =
      row_layout(a.geo, {&a.x[0], &a.x[1], &a.x[2], &a.h[0], &a.h[1], &a.h[2], &a.h_prev, &a.h_out, &a.h_out2,
                         &a.cache_out[0], &a.cache_out[1], &a.cache_out[2], &a.cache_out[3]});
  for_each_row(a.geo, layout, [&](int64_t b, int64_t outer) {
    GruForwardRow<scalar_t, pre_t> r;
    for (int k = 0; k < 3; ++k) {
      r.x[k] = row_ptr<const pre_t>(a.x[k], layout, b, outer);
      r.h[k] = kHidden || k == 2 ? row_ptr<const pre_t>(a.h[k], layout, b, outer) : nullptr;
    }
    for (int k = 0; k < 4; ++k) r.cache[k] = row_ptr<scalar_t>(a.cache_out[k], layout, b, outer);
    r.h_prev = row_ptr<const scalar_t>(a.h_prev, layout, b, outer);
    r.h_out = row_ptr<scalar_t>(a.h_out, layout, b, outer);
    r.h_out2 = row_ptr<scalar_t>(a.h_out2, layout, b, outer);
    if (!a.mask.valid(b)) {
      zero_row(r.h_out, layout.inner);
      copy_row(r.h_prev, r.h_out2, layout.inner);
      for (int k = 0; k < 4 && a.save; ++k) zero_row(r.cache[k], layout.inner);
      return;
    }
    if (a.reset_after) {
      if (a.save) gru_forward_row<scalar_t, pre_t, true, true, kHidden>(r, layout.inner);
      else gru_forward_row<scalar_t, pre_t, true, false, kHidden>(r, layout.inner);
    } else {
      if (a.save) gru_forward_row<scalar_t, pre_t, false, true, kHidden>(r, layout.inner);
      else gru_forward_row<scalar_t, pre_t, false, false, kHidden>(r, layout.inner);
    }
  });
}

template <typename scalar_t>
void gru_forward_impl(const GruForwardArgs& a) {
  TORCH_INTERNAL_ASSERT(!a.pre_acc || a.reset_after, "gru_forward: pre_acc is the fused reset_after step's");
  if (a.pre_acc) gru_forward_rows<scalar_t, at::opmath_type<scalar_t>, false>(a);
  else gru_forward_rows<scalar_t, scalar_t, true>(a);
}

template <typename scalar_t>
struct GruBackwardRow {
  const scalar_t* dh_in[3];
  const scalar_t* cache[4];
  const scalar_t* h_prev;
  scalar_t* d_x[3];
  scalar_t* d_h[3];
  scalar_t* dh_prev;
};

template <typename scalar_t, bool kResetAfter>
void gru_backward_row(const GruBackwardRow<scalar_t>& r, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t *dh0 = r.dh_in[0], *dh1 = r.dh_in[1], *dh2 = r.dh_in[2];
  const scalar_t *cr = r.cache[0], *cz = r.cache[1], *cn = r.cache[2], *chn = r.cache[3];
  const scalar_t* h_prev = r.h_prev;
  scalar_t *dxr = r.d_x[0], *dxz = r.d_x[1], *dxn = r.d_x[2];
  scalar_t *dhr = r.d_h[0], *dhz = r.d_h[1], *dhn = r.d_h[2];
  scalar_t* dh_prev = r.dh_prev;
#pragma GCC ivdep
  for (int64_t j = 0; j < n; ++j) {
    const acc_t dh = ld<scalar_t, acc_t>(dh0, j) + ld<scalar_t, acc_t>(dh1, j) + ld<scalar_t, acc_t>(dh2, j);
    const GruGrad<acc_t> d =
        gru_backward<acc_t>(dh, ld<scalar_t, acc_t>(cr, j), ld<scalar_t, acc_t>(cz, j), ld<scalar_t, acc_t>(cn, j),
                            ld<scalar_t, acc_t>(chn, j), ld<scalar_t, acc_t>(h_prev, j), kResetAfter);
    dxr[j] = static_cast<scalar_t>(d.r);
    dxz[j] = static_cast<scalar_t>(d.z);
    dxn[j] = static_cast<scalar_t>(d.x_n);
    dhr[j] = static_cast<scalar_t>(d.r);
    dhz[j] = static_cast<scalar_t>(d.z);
    dhn[j] = static_cast<scalar_t>(d.h_n);
    dh_prev[j] = static_cast<scalar_t>(d.h_prev);
  }
}

template <typename scalar_t>
void gru_backward_impl(const GruBackwardArgs& a) {
  const RowLayout layout = row_layout(
      a.geo, {&a.dh_in[0], &a.dh_in[1], &a.dh_in[2], &a.cache[0], &a.cache[1], &a.cache[2], &a.cache[3], &a.h_prev,
              &a.d_x_out[0], &a.d_x_out[1], &a.d_x_out[2], &a.d_h_out[0], &a.d_h_out[1], &a.d_h_out[2],
              &a.dh_prev_out});
  for_each_row(a.geo, layout, [&](int64_t b, int64_t outer) {
    GruBackwardRow<scalar_t> r;
    for (int k = 0; k < 3; ++k) {
      r.dh_in[k] = row_ptr<const scalar_t>(a.dh_in[k], layout, b, outer);
      r.d_x[k] = row_ptr<scalar_t>(a.d_x_out[k], layout, b, outer);
      r.d_h[k] = row_ptr<scalar_t>(a.d_h_out[k], layout, b, outer);
    }
    for (int k = 0; k < 4; ++k) r.cache[k] = row_ptr<const scalar_t>(a.cache[k], layout, b, outer);
    r.h_prev = row_ptr<const scalar_t>(a.h_prev, layout, b, outer);
    r.dh_prev = row_ptr<scalar_t>(a.dh_prev_out, layout, b, outer);
    if (!a.mask.valid(b)) {
      for (int k = 0; k < 3; ++k) {
        zero_row(r.d_x[k], layout.inner);
        zero_row(r.d_h[k], layout.inner);
      }
      sum_row(r.dh_in[1], r.dh_in[2], r.dh_prev, layout.inner);
      return;
    }
    if (a.reset_after) gru_backward_row<scalar_t, true>(r, layout.inner);
    else gru_backward_row<scalar_t, false>(r, layout.inner);
  });
}

template <typename scalar_t, bool kSave>
void gru_reset_forward_row(const scalar_t* x_r, const scalar_t* h_r, const scalar_t* h_prev,
                                              scalar_t* reset_h, scalar_t* r_out, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
#pragma GCC ivdep
  for (int64_t j = 0; j < n; ++j) {
    acc_t r;
    const acc_t v = gru_reset_forward<acc_t>(ld<scalar_t, acc_t>(x_r, j), ld<scalar_t, acc_t>(h_r, j),
                                             ld<scalar_t, acc_t>(h_prev, j), &r);
    reset_h[j] = static_cast<scalar_t>(v);
    if (kSave) r_out[j] = static_cast<scalar_t>(r);
  }
}

template <typename scalar_t>
void gru_reset_forward_impl(const GruResetForwardArgs& a) {
  const RowLayout layout = row_layout(a.geo, {&a.x_r, &a.h_r, &a.h_prev, &a.reset_h_out, &a.r_out});
  for_each_row(a.geo, layout, [&](int64_t b, int64_t outer) {
    const scalar_t* x_r = row_ptr<const scalar_t>(a.x_r, layout, b, outer);
    const scalar_t* h_r = row_ptr<const scalar_t>(a.h_r, layout, b, outer);
    const scalar_t* h_prev = row_ptr<const scalar_t>(a.h_prev, layout, b, outer);
    scalar_t* reset_h = row_ptr<scalar_t>(a.reset_h_out, layout, b, outer);
    scalar_t* r_out = row_ptr<scalar_t>(a.r_out, layout, b, outer);
    if (!a.mask.valid(b)) {
      zero_row(reset_h, layout.inner);
      if (a.save) zero_row(r_out, layout.inner);
      return;
    }
    if (a.save) gru_reset_forward_row<scalar_t, true>(x_r, h_r, h_prev, reset_h, r_out, layout.inner);
    else gru_reset_forward_row<scalar_t, false>(x_r, h_r, h_prev, reset_h, r_out, layout.inner);
  });
}

template <typename scalar_t>
void gru_reset_backward_row(const scalar_t* d_reset_h, const scalar_t* r, const scalar_t* h_prev,
                                               const scalar_t* dh_prev_in, scalar_t* d_r, scalar_t* dh_prev_out,
                                               int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
#pragma GCC ivdep
  for (int64_t j = 0; j < n; ++j) {
    acc_t dh = ld<scalar_t, acc_t>(dh_prev_in, j);
    const acc_t dr = gru_reset_backward<acc_t>(ld<scalar_t, acc_t>(d_reset_h, j), ld<scalar_t, acc_t>(r, j),
                                               ld<scalar_t, acc_t>(h_prev, j), &dh);
    d_r[j] = static_cast<scalar_t>(dr);
    dh_prev_out[j] = static_cast<scalar_t>(dh);
  }
}

template <typename scalar_t>
void gru_reset_backward_impl(const GruResetBackwardArgs& a) {
  const RowLayout layout =
      row_layout(a.geo, {&a.d_reset_h, &a.r, &a.h_prev, &a.dh_prev_in, &a.d_r_out, &a.dh_prev_out});
  for_each_row(a.geo, layout, [&](int64_t b, int64_t outer) {
    if (!a.mask.valid(b)) {
      zero_row(row_ptr<scalar_t>(a.d_r_out, layout, b, outer), layout.inner);
      copy_row(row_ptr<const scalar_t>(a.dh_prev_in, layout, b, outer),
               row_ptr<scalar_t>(a.dh_prev_out, layout, b, outer), layout.inner);
      return;
    }
    gru_reset_backward_row<scalar_t>(
        row_ptr<const scalar_t>(a.d_reset_h, layout, b, outer), row_ptr<const scalar_t>(a.r, layout, b, outer),
        row_ptr<const scalar_t>(a.h_prev, layout, b, outer), row_ptr<const scalar_t>(a.dh_prev_in, layout, b, outer),
        row_ptr<scalar_t>(a.d_r_out, layout, b, outer), row_ptr<scalar_t>(a.dh_prev_out, layout, b, outer),
        layout.inner);
  });
}

}  // namespace

#define FASTVID_DISPATCH(dtype, name, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, name, __VA_ARGS__)

void lstm_forward(const LstmForwardArgs& a) {
  FASTVID_DISPATCH(a.geo.dtype, "lstm_forward_cpu", [&] { lstm_forward_impl<scalar_t>(a); });
}
void lstm_backward(const LstmBackwardArgs& a) {
  FASTVID_DISPATCH(a.geo.dtype, "lstm_backward_cpu", [&] { lstm_backward_impl<scalar_t>(a); });
}
void gru_forward(const GruForwardArgs& a) {
  FASTVID_DISPATCH(a.geo.dtype, "gru_forward_cpu", [&] { gru_forward_impl<scalar_t>(a); });
}
void gru_backward(const GruBackwardArgs& a) {
  FASTVID_DISPATCH(a.geo.dtype, "gru_backward_cpu", [&] { gru_backward_impl<scalar_t>(a); });
}
void gru_reset_forward(const GruResetForwardArgs& a) {
  FASTVID_DISPATCH(a.geo.dtype, "gru_reset_forward_cpu", [&] { gru_reset_forward_impl<scalar_t>(a); });
}
void gru_reset_backward(const GruResetBackwardArgs& a) {
  FASTVID_DISPATCH(a.geo.dtype, "gru_reset_backward_cpu", [&] { gru_reset_backward_impl<scalar_t>(a); });
}
#undef FASTVID_DISPATCH

}  // namespace FASTVID_ISA
}  // namespace recurrent
}  // namespace fastvid
#endif  // FASTVID_ISA
