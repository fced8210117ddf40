// CPU kernels of one layer-normalised ConvLSTM step (equations in recurrent_norm.h), forward and
// backward, each a few passes over rows of contiguous elements, parallel over rows:
//   forward:  per-sample statistics of x_pre and h_pre (one sample per task, two-pass in fp64);
//             normalise + gates + cell, with per-row mean / M2 of c (combined per sample, Chan et al.);
//             LN(c) + h.
//   backward: the LN(c) gradient sums; the gate gradients, dc_prev and the LN(x_pre) / LN(h_pre)
//             gradient sums; dL/dx_pre and dL/dh_pre.
// A row is one (batch, hidden channel) over the pixels for NCHW frames, or one (batch, pixel) over
// the hidden channels for NHWC frames, so every operand's row is unit-stride; gcc vectorises the row
// loops at each ISA path's width (cpu_isa.h), as in recurrent_cpu.cpp. The row loops that store carry
// `#pragma GCC ivdep`: their operands alias at most element for element (c_prev/c_out, dc in/out), and
// gcc would otherwise give up on the ~20 runtime alias checks and keep them scalar. Reductions use
// lane_sum (fp64 lanes) so they vectorise too.
#include "recurrent_norm.h"
#include "recurrent_math.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <type_traits>
#include <cmath>
#include <vector>

#include "../cpu_isa.h"

#ifndef FASTVID_ISA
#define FASTVID_ISA_SOURCE "recurrent/recurrent_norm_cpu.cpp"
#include "../cpu_isa_each.h"

namespace fastvid {
namespace recurrent {
void ln_lstm_forward_cpu(const LnLstmForwardArgs& a) { FASTVID_ISA_CALL(recurrent, ln_lstm_forward(a)); }
void ln_lstm_backward_cpu(const LnLstmBackwardArgs& a) { FASTVID_ISA_CALL(recurrent, ln_lstm_backward(a)); }
void ln_gru_forward_cpu(const LnGruForwardArgs& a) { FASTVID_ISA_CALL(recurrent, ln_gru_forward(a)); }
void ln_gru_backward_cpu(const LnGruBackwardArgs& a) { FASTVID_ISA_CALL(recurrent, ln_gru_backward(a)); }
}  // namespace recurrent
}  // namespace fastvid

#else  // ------------------------------------------------ one ISA path: namespace FASTVID_ISA
namespace fastvid {
namespace recurrent {
namespace FASTVID_ISA {
namespace {

struct Rows {
  int64_t per_batch, inner, C, P;
  bool cl;
  explicit Rows(const NormGeometry& g)
      : per_batch(g.channels_last ? g.pixels : g.channels), inner(g.channels_last ? g.channels : g.pixels),
        C(g.channels), P(g.pixels), cl(g.channels_last) {}
  // Offset of row r's first element of channel block q in a sample of n blocks of C channels.
  int64_t offset(int64_t r, int64_t q, int64_t n) const { return cl ? r * n * C + q * C : (q * C + r) * P; }
};

template <typename T>
T* row_of(const Frame& f, const Rows& rows, int64_t b, int64_t r, int64_t q, int64_t n) {
  using U = std::remove_const_t<T>;
  return f.data == nullptr ? nullptr : static_cast<U*>(f.data) + b * f.stride_b + rows.offset(r, q, n);
}

template <typename acc_t>
acc_t* sample_stats(const Frame& stats, int64_t b) {
  return static_cast<acc_t*>(stats.data) + b * stats.stride_b;
}

// A per-channel parameter [n*C] seen along one row: a pointer into it (NHWC rows run over channels) or
// the row's channel value repeated (NCHW rows run over pixels); zeros when the parameter is absent.
template <typename acc_t>
struct RowParam {
  const acc_t* data;
  int64_t n;
  std::vector<acc_t> buffer;
  RowParam(const void* d, int64_t n, const Rows& rows)
      : data(static_cast<const acc_t*>(d)), n(n), buffer((d == nullptr || !rows.cl) ? n * rows.inner : 0, acc_t(0)) {}
  void get(const Rows& rows, int64_t r, const acc_t** out) {
    for (int64_t q = 0; q < n; ++q) {
      if (data != nullptr && rows.cl) {
        out[q] = data + q * rows.C;
        continue;
      }
      acc_t* dst = buffer.data() + q * rows.inner;
      if (data != nullptr) std::fill(dst, dst + rows.inner, data[q * rows.C + r]);
      out[q] = dst;
    }
  }
};

// body(b, r, row index) over all rows in parallel; make_state() once per task (per-task scratch).
template <typename MakeState, typename Body>
void for_rows(const Rows& rows, int64_t batch, const MakeState& make_state, const Body& body) {
  const int64_t total = batch * rows.per_batch;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, rows.inner));
  at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
    auto state = make_state();
    for (int64_t row = begin; row < end; ++row) body(state, row / rows.per_batch, row % rows.per_batch, row);
  });
}

// Σ_{j<n} term(j) in fp64 over 8 independent lanes: without -ffast-math gcc never reassociates one
// running sum, so a single accumulator would keep a loop scalar; the lanes vectorise.
template <typename Term>
double lane_sum(int64_t n, const Term& term) {
  double lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int l = 0; l < 8; ++l) lanes[l] += static_cast<double>(term(j + l));
  double tail = 0;
  for (; j < n; ++j) tail += static_cast<double>(term(j));
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7])) + tail;
}

// body(state, b, r, row, sums) over all rows in at most 64 chunks run in parallel; sums points at the
// chunk's own `width` zeroed doubles (per-channel parameter-gradient sums), added into out[width] in
// chunk order afterwards: no races, and the same result for any thread count.
template <typename MakeState, typename Body>
void for_row_chunks(const Rows& rows, int64_t batch, int64_t width, double* out, const MakeState& make_state,
                    const Body& body) {
  const int64_t total = batch * rows.per_batch;
  const int64_t chunks = std::min<int64_t>(total, 64);
  std::vector<double> partial(chunks * width, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      auto state = make_state();
      double* sums = partial.data() + chunk * width;
      for (int64_t row = chunk * total / chunks; row < (chunk + 1) * total / chunks; ++row)
        body(state, row / rows.per_batch, row % rows.per_batch, row, sums);
    }
  });
  for (int64_t chunk = 0; chunk < chunks; ++chunk)
    for (int64_t k = 0; k < width; ++k) out[k] += partial[chunk * width + k];
}

// Mean and 1/sqrt(var + eps) of each sample's n contiguous elements of x (into stats[b, 0..1]) and of h
// (into stats[b, 2..3]); one parallel region for both (each region ends in a barrier).
template <typename scalar_t, typename acc_t>
void sample_moments(const Frame& x, const Frame& h, const Frame& stats, int64_t batch, int64_t n) {
  at::parallel_for(0, 2 * batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / 2, slot = 2 * (task % 2);
      const Frame& f = task % 2 ? h : x;
      const scalar_t* v = static_cast<const scalar_t*>(f.data) + b * f.stride_b;
      const double mean = lane_sum(n, [&](int64_t i) { return static_cast<double>(v[i]); }) / n;
      const double m2 = lane_sum(n, [&](int64_t i) {
        const double d = static_cast<double>(v[i]) - mean;
        return d * d;
      });
      acc_t* st = sample_stats<acc_t>(stats, b);
      st[slot] = static_cast<acc_t>(mean);
      st[slot + 1] = static_cast<acc_t>(1.0 / std::sqrt(m2 / n + kLayerNormEps));
    }
  });
}

// Per-sample mean and 1/sqrt(var + eps) from per-row means and M2 (rows of equal length inner).
void combine_rows(const std::vector<double>& row_mean, const std::vector<double>& row_m2, const Rows& rows,
                  int64_t b, double* mean, double* rstd) {
  const int64_t r0 = b * rows.per_batch;
  double m = 0;
  for (int64_t r = 0; r < rows.per_batch; ++r) m += row_mean[r0 + r];
  m /= rows.per_batch;
  double m2 = 0;
  for (int64_t r = 0; r < rows.per_batch; ++r) {
    const double d = row_mean[r0 + r] - m;
    m2 += row_m2[r0 + r] + rows.inner * d * d;
  }
  *mean = m;
  *rstd = 1.0 / std::sqrt(m2 / (rows.per_batch * rows.inner) + kLayerNormEps);
}

double sample_sum(const std::vector<double>& per_row, const Rows& rows, int64_t b) {
  double s = 0;
  for (int64_t r = 0; r < rows.per_batch; ++r) s += per_row[b * rows.per_batch + r];
  return s;
}

// ------------------------------------------------------------------------ forward
template <typename scalar_t>
void forward_impl(const LnLstmForwardArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const NormGeometry& g = a.geo;
  const Rows rows(g);
  const int64_t B = g.batch, n4 = 4 * g.channels * g.pixels;
  sample_moments<scalar_t, acc_t>(a.x_pre, a.h_pre, a.stats, B, n4);

  // Gates and cell; the per-row mean and M2 of c.
  std::vector<double> row_mean(B * rows.per_batch), row_m2(B * rows.per_batch);
  const auto params = [&] {
    return std::array<RowParam<acc_t>, 3>{RowParam<acc_t>(a.gain_ih, 4, rows), RowParam<acc_t>(a.gain_hh, 4, rows),
                                          RowParam<acc_t>(a.bias, 4, rows)};
  };
  for_rows(rows, B, params, [&](std::array<RowParam<acc_t>, 3>& p, int64_t b, int64_t r, int64_t row) {
    const acc_t* st = sample_stats<acc_t>(a.stats, b);
    const acc_t mx = st[0], rx = st[1], mh = st[2], rh = st[3];
    const acc_t *gx[4], *gh[4], *bs[4];
    p[0].get(rows, r, gx);
    p[1].get(rows, r, gh);
    p[2].get(rows, r, bs);
    const scalar_t *x[4], *h[4];
    scalar_t* gates[4];
    for (int q = 0; q < 4; ++q) {
      x[q] = row_of<const scalar_t>(a.x_pre, rows, b, r, q, 4);
      h[q] = row_of<const scalar_t>(a.h_pre, rows, b, r, q, 4);
      gates[q] = row_of<scalar_t>(a.gates_out, rows, b, r, q, 4);
    }
    const acc_t* c_prev = row_of<const acc_t>(a.c_prev, rows, b, r, 0, 1);
    acc_t* c_out = row_of<acc_t>(a.c_out, rows, b, r, 0, 1);
    #pragma GCC ivdep
    for (int64_t j = 0; j < rows.inner; ++j) {
      acc_t pre[4];
      for (int q = 0; q < 4; ++q)
        pre[q] = gx[q][j] * (static_cast<acc_t>(x[q][j]) - mx) * rx + gh[q][j] * (static_cast<acc_t>(h[q][j]) - mh) * rh +
                 bs[q][j];
      const acc_t i = sigmoid(pre[0]), f = sigmoid(pre[1]), gg = tanh_fast(pre[2]), o = sigmoid(pre[3]);
      const acc_t c = f * c_prev[j] + i * gg;
      c_out[j] = c;
      gates[0][j] = static_cast<scalar_t>(i);
      gates[1][j] = static_cast<scalar_t>(f);
      gates[2][j] = static_cast<scalar_t>(gg);
      gates[3][j] = static_cast<scalar_t>(o);
    }
    const double mean = lane_sum(rows.inner, [&](int64_t j) { return static_cast<double>(c_out[j]); }) / rows.inner;
    row_mean[row] = mean;
    row_m2[row] = lane_sum(rows.inner, [&](int64_t j) {
      const double d = static_cast<double>(c_out[j]) - mean;
      return d * d;
    });
  });
  for (int64_t b = 0; b < B; ++b) {
    double mean, rstd;
    combine_rows(row_mean, row_m2, rows, b, &mean, &rstd);
    acc_t* st = sample_stats<acc_t>(a.stats, b);
    st[4] = static_cast<acc_t>(mean);
    st[5] = static_cast<acc_t>(rstd);
  }

  // h = o tanh(LN(c)).
  const auto c_params = [&] {
    return std::array<RowParam<acc_t>, 2>{RowParam<acc_t>(a.gain_c, 1, rows), RowParam<acc_t>(a.bias_c, 1, rows)};
  };
  for_rows(rows, B, c_params, [&](std::array<RowParam<acc_t>, 2>& p, int64_t b, int64_t r, int64_t) {
    const acc_t* st = sample_stats<acc_t>(a.stats, b);
    const acc_t mc = st[4], rc = st[5];
    const acc_t *gc, *bc;
    p[0].get(rows, r, &gc);
    p[1].get(rows, r, &bc);
    const acc_t* c = row_of<const acc_t>(a.c_out, rows, b, r, 0, 1);
    const scalar_t* o = row_of<const scalar_t>(a.gates_out, rows, b, r, 3, 4);
    scalar_t* h = row_of<scalar_t>(a.h_out, rows, b, r, 0, 1);
    scalar_t* h2 = row_of<scalar_t>(a.h_out2, rows, b, r, 0, 1);
    #pragma GCC ivdep
    for (int64_t j = 0; j < rows.inner; ++j) {
      const acc_t value = static_cast<acc_t>(o[j]) * tanh_fast(gc[j] * (c[j] - mc) * rc + bc[j]);
      h[j] = static_cast<scalar_t>(value);
    }
    if (h2 != nullptr) std::copy(h, h + rows.inner, h2);
  });
}

// ------------------------------------------------------------------------ backward
template <typename scalar_t>
void backward_impl(const LnLstmBackwardArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const NormGeometry& g = a.geo;
  const Rows rows(g);
  const int64_t B = g.batch, n1 = g.channels * g.pixels, n4 = 4 * n1;
  const int64_t nrows = B * rows.per_batch;

  // 1. dL/dLN(c), dL/da_o and the LN(c) gradient sums Σ dĉ, Σ dĉ·ĉ (dĉ = γ_c dL/dLN(c)).
  std::vector<double> s1(nrows), s2(nrows);
  struct ScratchA {
    RowParam<acc_t> gc, bc;
    std::vector<scalar_t> zeros;
  };
  const auto make_a = [&] {
    return ScratchA{RowParam<acc_t>(a.gain_c, 1, rows), RowParam<acc_t>(a.bias_c, 1, rows),
                    std::vector<scalar_t>(rows.inner, scalar_t(0))};
  };
  const int64_t C = g.channels;
  for_row_chunks(rows, B, 2 * C, a.param_grads + 12 * C, make_a, [&](ScratchA& s, int64_t b, int64_t r, int64_t row,
                                                                       double* sums) {
    const acc_t* st = sample_stats<acc_t>(a.stats, b);
    const acc_t mc = st[4], rc = st[5];
    const acc_t *gc, *bc;
    s.gc.get(rows, r, &gc);
    s.bc.get(rows, r, &bc);
    const scalar_t* dh_out = row_of<const scalar_t>(a.dh_out, rows, b, r, 0, 1);
    const scalar_t* dh_rec = row_of<const scalar_t>(a.dh_rec, rows, b, r, 0, 1);
    if (dh_out == nullptr) dh_out = s.zeros.data();
    if (dh_rec == nullptr) dh_rec = s.zeros.data();
    const acc_t* c = row_of<const acc_t>(a.c, rows, b, r, 0, 1);
    const scalar_t* o = row_of<const scalar_t>(a.gates, rows, b, r, 3, 4);
    acc_t* d_norm_c = row_of<acc_t>(a.d_norm_c, rows, b, r, 0, 1);
    scalar_t* d_o = row_of<scalar_t>(a.d_gates, rows, b, r, 3, 4);
    #pragma GCC ivdep
    for (int64_t j = 0; j < rows.inner; ++j) {
      const acc_t dh = static_cast<acc_t>(dh_out[j]) + static_cast<acc_t>(dh_rec[j]);
      const acc_t c_hat = (c[j] - mc) * rc;
      const acc_t tn = tanh_fast(gc[j] * c_hat + bc[j]);
      const acc_t oj = static_cast<acc_t>(o[j]);
      const acc_t dn = dh * oj * (acc_t(1) - tn * tn);
      d_norm_c[j] = dn;
      d_o[j] = static_cast<scalar_t>(dh * tn * oj * (acc_t(1) - oj));
    }
    s1[row] = lane_sum(rows.inner, [&](int64_t j) { return d_norm_c[j] * gc[j]; });
    s2[row] = lane_sum(rows.inner, [&](int64_t j) { return d_norm_c[j] * gc[j] * ((c[j] - mc) * rc); });
    // gain_c, bias_c gradients: Σ dL/dLN(c)·ĉ, Σ dL/dLN(c) per channel
    if (rows.cl) {
      #pragma GCC ivdep
      for (int64_t j = 0; j < rows.inner; ++j) {
        sums[j] += static_cast<double>(d_norm_c[j] * ((c[j] - mc) * rc));
        sums[C + j] += static_cast<double>(d_norm_c[j]);
      }
    } else {
      sums[r] += lane_sum(rows.inner, [&](int64_t j) { return d_norm_c[j] * ((c[j] - mc) * rc); });
      sums[C + r] += lane_sum(rows.inner, [&](int64_t j) { return d_norm_c[j]; });
    }
  });
  std::vector<acc_t> m1(B), m2(B);
  for (int64_t b = 0; b < B; ++b) {
    m1[b] = static_cast<acc_t>(sample_sum(s1, rows, b) / n1);
    m2[b] = static_cast<acc_t>(sample_sum(s2, rows, b) / n1);
  }

  // 2. dL/dc_t in full, the i, f, g gate gradients, dL/dc_{t-1}; then the LN(x_pre) / LN(h_pre) sums
  // Σ u, Σ u·x̂ with u = γ dL/da.
  std::vector<double> sx1(nrows), sx2(nrows), sh1(nrows), sh2(nrows);
  const auto make_b = [&] {
    return std::array<RowParam<acc_t>, 3>{RowParam<acc_t>(a.gain_c, 1, rows), RowParam<acc_t>(a.gain_ih, 4, rows),
                                          RowParam<acc_t>(a.gain_hh, 4, rows)};
  };
  for_rows(rows, B, make_b, [&](std::array<RowParam<acc_t>, 3>& p, int64_t b, int64_t r, int64_t row) {
    const acc_t* st = sample_stats<acc_t>(a.stats, b);
    const acc_t mx = st[0], rx = st[1], mh = st[2], rh = st[3], mc = st[4], rc = st[5];
    const acc_t *gc, *gx[4], *gh[4];
    p[0].get(rows, r, &gc);
    p[1].get(rows, r, gx);
    p[2].get(rows, r, gh);
    const acc_t* c = row_of<const acc_t>(a.c, rows, b, r, 0, 1);
    const acc_t* c_prev = row_of<const acc_t>(a.c_prev, rows, b, r, 0, 1);
    const acc_t* d_norm_c = row_of<const acc_t>(a.d_norm_c, rows, b, r, 0, 1);
    acc_t* dc = row_of<acc_t>(a.dc, rows, b, r, 0, 1);
    const scalar_t *gates[4], *x[4], *h[4];
    scalar_t* d_gates[4];
    for (int q = 0; q < 4; ++q) {
      gates[q] = row_of<const scalar_t>(a.gates, rows, b, r, q, 4);
      x[q] = row_of<const scalar_t>(a.x_pre, rows, b, r, q, 4);
      h[q] = row_of<const scalar_t>(a.h_pre, rows, b, r, q, 4);
      d_gates[q] = row_of<scalar_t>(a.d_gates, rows, b, r, q, 4);
    }
    const acc_t mean1 = m1[b], mean2 = m2[b];
    #pragma GCC ivdep
    for (int64_t j = 0; j < rows.inner; ++j) {
      const acc_t c_hat = (c[j] - mc) * rc;
      const acc_t dc_total = dc[j] + rc * (d_norm_c[j] * gc[j] - mean1 - c_hat * mean2);
      const acc_t i = static_cast<acc_t>(gates[0][j]), f = static_cast<acc_t>(gates[1][j]);
      const acc_t gg = static_cast<acc_t>(gates[2][j]);
      d_gates[0][j] = static_cast<scalar_t>(dc_total * gg * i * (acc_t(1) - i));
      d_gates[1][j] = static_cast<scalar_t>(dc_total * c_prev[j] * f * (acc_t(1) - f));
      d_gates[2][j] = static_cast<scalar_t>(dc_total * i * (acc_t(1) - gg * gg));
      dc[j] = dc_total * f;
    }
    double ax1 = 0, ax2 = 0, ah1 = 0, ah2 = 0;
    for (int q = 0; q < 4; ++q) {
      const auto d = [&](int64_t j) { return static_cast<acc_t>(d_gates[q][j]); };
      ax1 += lane_sum(rows.inner, [&](int64_t j) { return d(j) * gx[q][j]; });
      ax2 += lane_sum(rows.inner, [&](int64_t j) { return d(j) * gx[q][j] * ((static_cast<acc_t>(x[q][j]) - mx) * rx); });
      ah1 += lane_sum(rows.inner, [&](int64_t j) { return d(j) * gh[q][j]; });
      ah2 += lane_sum(rows.inner, [&](int64_t j) { return d(j) * gh[q][j] * ((static_cast<acc_t>(h[q][j]) - mh) * rh); });
    }
    sx1[row] = ax1, sx2[row] = ax2, sh1[row] = ah1, sh2[row] = ah2;
  });
  std::vector<acc_t> mx1(B), mx2(B), mh1(B), mh2(B);
  for (int64_t b = 0; b < B; ++b) {
    mx1[b] = static_cast<acc_t>(sample_sum(sx1, rows, b) / n4);
    mx2[b] = static_cast<acc_t>(sample_sum(sx2, rows, b) / n4);
    mh1[b] = static_cast<acc_t>(sample_sum(sh1, rows, b) / n4);
    mh2[b] = static_cast<acc_t>(sample_sum(sh2, rows, b) / n4);
  }

  // 3. dL/dx_pre = r (u - mean(u) - x̂ mean(u x̂)), likewise dL/dh_pre.
  const auto make_c = [&] {
    return std::array<RowParam<acc_t>, 2>{RowParam<acc_t>(a.gain_ih, 4, rows), RowParam<acc_t>(a.gain_hh, 4, rows)};
  };
  for_row_chunks(rows, B, 12 * C, a.param_grads, make_c, [&](std::array<RowParam<acc_t>, 2>& p, int64_t b, int64_t r,
                                                               int64_t, double* sums) {
    const acc_t* st = sample_stats<acc_t>(a.stats, b);
    const acc_t mx = st[0], rx = st[1], mh = st[2], rh = st[3];
    const acc_t *gx[4], *gh[4];
    p[0].get(rows, r, gx);
    p[1].get(rows, r, gh);
    for (int q = 0; q < 4; ++q) {
      const scalar_t* d = row_of<const scalar_t>(a.d_gates, rows, b, r, q, 4);
      const scalar_t* x = row_of<const scalar_t>(a.x_pre, rows, b, r, q, 4);
      const scalar_t* h = row_of<const scalar_t>(a.h_pre, rows, b, r, q, 4);
      scalar_t* dx = row_of<scalar_t>(a.d_x_pre, rows, b, r, q, 4);
      scalar_t* dhp = row_of<scalar_t>(a.d_h_pre, rows, b, r, q, 4);
      const acc_t ax1 = mx1[b], ax2 = mx2[b], ah1 = mh1[b], ah2 = mh2[b];
      #pragma GCC ivdep
      for (int64_t j = 0; j < rows.inner; ++j) {
        const acc_t dj = static_cast<acc_t>(d[j]);
        const acc_t x_hat = (static_cast<acc_t>(x[j]) - mx) * rx, h_hat = (static_cast<acc_t>(h[j]) - mh) * rh;
        dx[j] = static_cast<scalar_t>(rx * (dj * gx[q][j] - ax1 - x_hat * ax2));
        dhp[j] = static_cast<scalar_t>(rh * (dj * gh[q][j] - ah1 - h_hat * ah2));
      }
      // gain_ih, gain_hh, bias gradients: Σ dL/da·x̂, Σ dL/da·ĥ, Σ dL/da per channel
      const auto x_hat = [&](int64_t j) { return (static_cast<acc_t>(x[j]) - mx) * rx; };
      const auto h_hat = [&](int64_t j) { return (static_cast<acc_t>(h[j]) - mh) * rh; };
      if (rows.cl) {
        double *s_gx = sums + q * C, *s_gh = sums + 4 * C + q * C, *s_b = sums + 8 * C + q * C;
        #pragma GCC ivdep
        for (int64_t j = 0; j < rows.inner; ++j) {
          const acc_t dj = static_cast<acc_t>(d[j]);
          s_gx[j] += static_cast<double>(dj * x_hat(j));
          s_gh[j] += static_cast<double>(dj * h_hat(j));
          s_b[j] += static_cast<double>(dj);
        }
      } else {
        const int64_t k = q * C + r;
        sums[k] += lane_sum(rows.inner, [&](int64_t j) { return static_cast<acc_t>(d[j]) * x_hat(j); });
        sums[4 * C + k] += lane_sum(rows.inner, [&](int64_t j) { return static_cast<acc_t>(d[j]) * h_hat(j); });
        sums[8 * C + k] += lane_sum(rows.inner, [&](int64_t j) { return static_cast<acc_t>(d[j]); });
      }
    }
  });
}

// ------------------------------------------------------------------------ GRU
// dL/dv = r (u - mean(u) - v̂ mean(u v̂)) with u = γ dL/dLN(v), for one normalised input v of n blocks
// (statistics in stats[b, slot], slot + 1); two passes: the per-sample sums, then dL/dv.
template <typename scalar_t>
void norm_backward(const Rows& rows, int64_t B, int64_t n, const Frame& d, const Frame& v, const void* gain,
                   const Frame& stats, int slot, const Frame& dv) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t nrows = B * rows.per_batch, count = n * rows.C * rows.P;
  std::vector<double> s1(nrows), s2(nrows);
  const auto make = [&] { return RowParam<acc_t>(gain, n, rows); };
  for_rows(rows, B, make, [&](RowParam<acc_t>& p, int64_t b, int64_t r, int64_t row) {
    const acc_t* st = sample_stats<acc_t>(stats, b);
    const acc_t mean = st[slot], rstd = st[slot + 1];
    const acc_t* g[4];
    p.get(rows, r, g);
    double a1 = 0, a2 = 0;
    for (int64_t q = 0; q < n; ++q) {
      const scalar_t* dq = row_of<const scalar_t>(d, rows, b, r, q, n);
      const scalar_t* vq = row_of<const scalar_t>(v, rows, b, r, q, n);
      const acc_t* gq = g[q];
      a1 += lane_sum(rows.inner, [&](int64_t j) { return static_cast<acc_t>(dq[j]) * gq[j]; });
      a2 += lane_sum(rows.inner, [&](int64_t j) {
        return static_cast<acc_t>(dq[j]) * gq[j] * ((static_cast<acc_t>(vq[j]) - mean) * rstd);
      });
    }
    s1[row] = a1;
    s2[row] = a2;
  });
  std::vector<acc_t> m1(B), m2(B);
  for (int64_t b = 0; b < B; ++b) {
    m1[b] = static_cast<acc_t>(sample_sum(s1, rows, b) / count);
    m2[b] = static_cast<acc_t>(sample_sum(s2, rows, b) / count);
  }
  for_rows(rows, B, make, [&](RowParam<acc_t>& p, int64_t b, int64_t r, int64_t) {
    const acc_t* st = sample_stats<acc_t>(stats, b);
    const acc_t mean = st[slot], rstd = st[slot + 1], mean1 = m1[b], mean2 = m2[b];
    const acc_t* g[4];
    p.get(rows, r, g);
    for (int64_t q = 0; q < n; ++q) {
      const scalar_t* dq = row_of<const scalar_t>(d, rows, b, r, q, n);
      const scalar_t* vq = row_of<const scalar_t>(v, rows, b, r, q, n);
      scalar_t* out = row_of<scalar_t>(dv, rows, b, r, q, n);
      #pragma GCC ivdep
      for (int64_t j = 0; j < rows.inner; ++j) {
        const acc_t v_hat = (static_cast<acc_t>(vq[j]) - mean) * rstd;
        out[j] = static_cast<scalar_t>(rstd * (static_cast<acc_t>(dq[j]) * g[q][j] - mean1 - v_hat * mean2));
      }
    }
  });
}

template <typename acc_t>
struct GruParams {
  RowParam<acc_t> gain_ih, gain_hh, bias_ih, bias_hh;
  const acc_t *gx[3], *gh[3], *bx[3], *bh[3];
  void get(const Rows& rows, int64_t r) {
    gain_ih.get(rows, r, gx);
    gain_hh.get(rows, r, gh);
    bias_ih.get(rows, r, bx);
    bias_hh.get(rows, r, bh);
  }
};

template <typename scalar_t>
void gru_forward_impl(const LnGruForwardArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const NormGeometry& g = a.geo;
  const Rows rows(g);
  const int64_t B = g.batch;
  sample_moments<scalar_t, acc_t>(a.x_pre, a.h_pre, a.stats, B, 3 * g.channels * g.pixels);
  const auto make = [&] {
    return GruParams<acc_t>{RowParam<acc_t>(a.gain_ih, 3, rows), RowParam<acc_t>(a.gain_hh, 3, rows),
                            RowParam<acc_t>(a.bias_ih, 3, rows), RowParam<acc_t>(a.bias_hh, 3, rows), {}, {}, {}, {}};
  };
  for_rows(rows, B, make, [&](GruParams<acc_t>& p, int64_t b, int64_t r, int64_t) {
    const acc_t* st = sample_stats<acc_t>(a.stats, b);
    const acc_t mx = st[0], rx = st[1], mh = st[2], rh = st[3];
    p.get(rows, r);
    const scalar_t *x[3], *h[3];
    for (int q = 0; q < 3; ++q) {
      x[q] = row_of<const scalar_t>(a.x_pre, rows, b, r, q, 3);
      h[q] = row_of<const scalar_t>(a.h_pre, rows, b, r, q, 3);
    }
    const scalar_t* h_prev = row_of<const scalar_t>(a.h_prev, rows, b, r, 0, 1);
    scalar_t* out = row_of<scalar_t>(a.h_out, rows, b, r, 0, 1);
    scalar_t* out2 = row_of<scalar_t>(a.h_out2, rows, b, r, 0, 1);
    #pragma GCC ivdep
    for (int64_t j = 0; j < rows.inner; ++j) {
      acc_t xg[3], hg[3];
      for (int q = 0; q < 3; ++q) {
        xg[q] = p.gx[q][j] * (static_cast<acc_t>(x[q][j]) - mx) * rx + p.bx[q][j];
        hg[q] = p.gh[q][j] * (static_cast<acc_t>(h[q][j]) - mh) * rh + p.bh[q][j];
      }
      const acc_t rg = sigmoid(xg[0] + hg[0]), z = sigmoid(xg[1] + hg[1]);
      const acc_t n = tanh_fast(xg[2] + rg * hg[2]);
      out[j] = static_cast<scalar_t>((acc_t(1) - z) * n + z * static_cast<acc_t>(h_prev[j]));
    }
    if (out2 != nullptr) std::copy(out, out + rows.inner, out2);
  });
}

template <typename scalar_t>
void gru_backward_impl(const LnGruBackwardArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const NormGeometry& g = a.geo;
  const Rows rows(g);
  const int64_t B = g.batch;
  struct Scratch {
    GruParams<acc_t> p;
    std::vector<scalar_t> zeros;
  };
  const auto make = [&] {
    return Scratch{GruParams<acc_t>{RowParam<acc_t>(a.gain_ih, 3, rows), RowParam<acc_t>(a.gain_hh, 3, rows),
                                    RowParam<acc_t>(a.bias_ih, 3, rows), RowParam<acc_t>(a.bias_hh, 3, rows),
                                    {}, {}, {}, {}},
                   std::vector<scalar_t>(rows.inner, scalar_t(0))};
  };
  for_rows(rows, B, make, [&](Scratch& s, int64_t b, int64_t r, int64_t) {
    const acc_t* st = sample_stats<acc_t>(a.stats, b);
    const acc_t mx = st[0], rx = st[1], mh = st[2], rh = st[3];
    GruParams<acc_t>& p = s.p;
    p.get(rows, r);
    const scalar_t *x[3], *h[3];
    scalar_t *dx[3], *dhg[3];
    for (int q = 0; q < 3; ++q) {
      x[q] = row_of<const scalar_t>(a.x_pre, rows, b, r, q, 3);
      h[q] = row_of<const scalar_t>(a.h_pre, rows, b, r, q, 3);
      dx[q] = row_of<scalar_t>(a.d_xg, rows, b, r, q, 3);
      dhg[q] = row_of<scalar_t>(a.d_hg, rows, b, r, q, 3);
    }
    const scalar_t* dh_out = row_of<const scalar_t>(a.dh_out, rows, b, r, 0, 1);
    const scalar_t* dh_rec = row_of<const scalar_t>(a.dh_rec, rows, b, r, 0, 1);
    if (dh_out == nullptr) dh_out = s.zeros.data();
    if (dh_rec == nullptr) dh_rec = s.zeros.data();
    const scalar_t* h_prev = row_of<const scalar_t>(a.h_prev, rows, b, r, 0, 1);
    scalar_t* dh_prev = row_of<scalar_t>(a.dh_prev, rows, b, r, 0, 1);
    #pragma GCC ivdep
    for (int64_t j = 0; j < rows.inner; ++j) {
      acc_t xg[3], hg[3];
      for (int q = 0; q < 3; ++q) {
        xg[q] = p.gx[q][j] * (static_cast<acc_t>(x[q][j]) - mx) * rx + p.bx[q][j];
        hg[q] = p.gh[q][j] * (static_cast<acc_t>(h[q][j]) - mh) * rh + p.bh[q][j];
      }
      const acc_t rg = sigmoid(xg[0] + hg[0]), z = sigmoid(xg[1] + hg[1]);
      const acc_t n = tanh_fast(xg[2] + rg * hg[2]);
      const acc_t dh = static_cast<acc_t>(dh_out[j]) + static_cast<acc_t>(dh_rec[j]);
      const acc_t d_n = dh * (acc_t(1) - z) * (acc_t(1) - n * n);
      const acc_t d_z = dh * (static_cast<acc_t>(h_prev[j]) - n) * z * (acc_t(1) - z);
      const acc_t d_r = d_n * hg[2] * rg * (acc_t(1) - rg);
      dx[0][j] = dhg[0][j] = static_cast<scalar_t>(d_r);
      dx[1][j] = dhg[1][j] = static_cast<scalar_t>(d_z);
      dx[2][j] = static_cast<scalar_t>(d_n);
      dhg[2][j] = static_cast<scalar_t>(d_n * rg);
      dh_prev[j] = static_cast<scalar_t>(dh * z);
    }
  });
  norm_backward<scalar_t>(rows, B, 3, a.d_xg, a.x_pre, a.gain_ih, a.stats, 0, a.d_x_pre);
  norm_backward<scalar_t>(rows, B, 3, a.d_hg, a.h_pre, a.gain_hh, a.stats, 2, a.d_h_pre);
}

}  // namespace

void ln_lstm_forward(const LnLstmForwardArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.geo.dtype, "ln_lstm_forward_cpu",
                                  [&] { forward_impl<scalar_t>(a); });
}

void ln_lstm_backward(const LnLstmBackwardArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.geo.dtype, "ln_lstm_backward_cpu",
                                  [&] { backward_impl<scalar_t>(a); });
}

void ln_gru_forward(const LnGruForwardArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.geo.dtype, "ln_gru_forward_cpu",
                                  [&] { gru_forward_impl<scalar_t>(a); });
}

void ln_gru_backward(const LnGruBackwardArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, a.geo.dtype, "ln_gru_backward_cpu",
                                  [&] { gru_backward_impl<scalar_t>(a); });
}

}  // namespace FASTVID_ISA
}  // namespace recurrent
}  // namespace fastvid
#endif
