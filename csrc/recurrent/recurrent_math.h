// Per-element ConvLSTM / ConvGRU gate math: the single source of truth that the CPU kernels
// (recurrent_cpu.cpp) and the CUDA kernels (recurrent_cuda.cu) both call. Every function works on
// one (batch, channel, pixel) cell in the accumulation type acc_t (float for fp32/bf16/fp16,
// double for fp64). The equations are documented in fastvid/reference/recurrent.py.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <cstring>

// Forced inlining: the CPU gate loops only vectorise when the whole gate math is inlined into them.
#if defined(__CUDACC__)
#define FASTVID_MATH __host__ __device__ __forceinline__
#elif defined(__GNUC__)
#define FASTVID_MATH __attribute__((always_inline)) inline
#else
#define FASTVID_MATH inline
#endif

namespace fastvid {
namespace recurrent {

// exp(x) for float. On the host a branch-free Cody-Waite range reduction plus a degree-6
// polynomial (coefficients of the Cephes expf, ~1 ulp on the clamped range), written so gcc
// auto-vectorises the gate loops; libm's expf would keep them scalar. n = round(x·log2 e) comes from
// adding 1.5·2^23 (+ the exponent bias 127): the sum's low mantissa bits are n + 127, so one add gives
// both n and the bits of 2^n (no floor and float-to-int conversion). On the device: expf.
// Its constants, shared with the CPU gate rows' explicit-vector version (recurrent_cpu.cpp, gate_vec).
namespace exp_fast_constants {
constexpr float kLow = -87.3f, kHigh = 88.3f;      // the clamped range
constexpr float kLog2e = 1.44269504088896341f;
constexpr float kShifter = 12583039.0f;            // 1.5·2^23 + 127
constexpr float kLn2Hi = 0.693359375f, kLn2Lo = 2.12194440e-4f;  // ln 2 = kLn2Hi - kLn2Lo
constexpr float kP0 = 1.9875691500e-4f, kP1 = 1.3981999507e-3f, kP2 = 8.3334519073e-3f, kP3 = 4.1665795894e-2f,
                kP4 = 1.6666665459e-1f, kP5 = 5.0000001201e-1f;
constexpr float kSigmoidExpMax = 87.0f;  // σ's exp argument bound (see sigmoid<float>)
}  // namespace exp_fast_constants

FASTVID_MATH float exp_fast(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  using namespace exp_fast_constants;
  x = x < kLow ? kLow : x;
  x = x > kHigh ? kHigh : x;
  const float shifted = x * kLog2e + kShifter;
  const float n = shifted - kShifter;
  float r = x - n * kLn2Hi;
  r = r + n * kLn2Lo;
  float p = kP0;
  p = p * r + kP1;
  p = p * r + kP2;
  p = p * r + kP3;
  p = p * r + kP4;
  p = p * r + kP5;
  p = p * r * r + r + 1.0f;
  uint32_t bits;
  std::memcpy(&bits, &shifted, sizeof(bits));
  bits <<= 23;  // n + 127 (in [1, 254] on the clamped range) into the exponent field
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
#endif
}

FASTVID_MATH double exp_fast(double x) { return ::exp(x); }

template <typename acc_t>
FASTVID_MATH acc_t sigmoid(acc_t x) {
  return acc_t(1) / (acc_t(1) + exp_fast(-x));
}

#if !defined(__CUDA_ARCH__)
// 1/d for float d in [1, 2^126] without a division: a bit-trick first guess (within 12 %) and three
// Newton steps (error ~1e-7 relative, as the division's rounding). On the Intel Xeon measured here the
// gate loops were bound by vdivps (five per LSTM cell): 7.4 ns per cell with it, 2.5 ns without
// (AVX-512; AVX2 14.8 -> 8.3 ns).
FASTVID_MATH float reciprocal(float d) {
  uint32_t i;
  std::memcpy(&i, &d, sizeof(i));
  i = 0x7EF311C3u - i;
  float y;
  std::memcpy(&y, &i, sizeof(y));
  y = y * (2.0f - d * y);
  y = y * (2.0f - d * y);
  y = y * (2.0f - d * y);
  return y;
}

// float: exp's argument clamped to 87 keeps 1 + e^-x within reciprocal's range (σ(-87) ~ 1.6e-38).
template <>
FASTVID_MATH float sigmoid<float>(float x) {
  const float m = x < -exp_fast_constants::kSigmoidExpMax ? exp_fast_constants::kSigmoidExpMax : -x;
  return reciprocal(1.0f + exp_fast(m));
}
#endif

// tanh(x) = 2σ(2x) − 1: absolute error ~1e-7 in float, vectorises like sigmoid.
template <typename acc_t>
FASTVID_MATH acc_t tanh_fast(acc_t x) {
  return acc_t(2) * sigmoid(acc_t(2) * x) - acc_t(1);
}

// ---------------------------------------------------------------- LSTM (gate order i, f, g, o)
// Forward. a_*: pre-activations (input conv + hidden conv + bias); w_c*: peephole weights, read only
// with `peephole` (without, a NaN cell state must not reach i, f, o through 0 · c). Outputs the
// activated gates (the backward cache), the new cell and hidden.
template <typename acc_t>
struct LstmState {
  acc_t i, f, g, o, c, h;
};

template <typename acc_t>
FASTVID_MATH LstmState<acc_t> lstm_forward(acc_t a_i, acc_t a_f, acc_t a_g, acc_t a_o, acc_t c_prev, acc_t w_ci,
                                           acc_t w_cf, acc_t w_co, bool peephole) {
  LstmState<acc_t> s;
  s.i = sigmoid(peephole ? a_i + w_ci * c_prev : a_i);
  s.f = sigmoid(peephole ? a_f + w_cf * c_prev : a_f);
  s.g = tanh_fast(a_g);
  s.c = s.f * c_prev + s.i * s.g;
  s.o = sigmoid(peephole ? a_o + w_co * s.c : a_o);
  s.h = s.o * tanh_fast(s.c);
  return s;
}

template <typename acc_t>
struct LstmGrad {
  acc_t a_i, a_f, a_g, a_o, c_prev;
};

// Backward of lstm_forward. dh: gradient reaching h; dc: gradient reaching c from later steps.
template <typename acc_t>
FASTVID_MATH LstmGrad<acc_t> lstm_backward(acc_t dh, acc_t dc, acc_t i, acc_t f, acc_t g, acc_t o,
                                                     acc_t c_prev, acc_t c, acc_t w_ci, acc_t w_cf,
                                                     acc_t w_co) {
  LstmGrad<acc_t> d;
  const acc_t tanh_c = tanh_fast(c);
  d.a_o = dh * tanh_c * o * (acc_t(1) - o);
  const acc_t dc_total = dc + dh * o * (acc_t(1) - tanh_c * tanh_c) + d.a_o * w_co;
  d.a_i = dc_total * g * i * (acc_t(1) - i);
  d.a_g = dc_total * i * (acc_t(1) - g * g);
  d.a_f = dc_total * c_prev * f * (acc_t(1) - f);
  d.c_prev = dc_total * f + d.a_i * w_ci + d.a_f * w_cf;
  return d;
}

// ----------------------------------------------------------------- GRU (gate order r, z, n)
// reset_after (nn.GRU): n = tanh(x_n + r·h_n); otherwise (Ballas et al.) n = tanh(x_n + h_n),
// where the caller computed h_n = U*(r·h_prev). h = (1 − z)·n + z·h_prev.
template <typename acc_t>
struct GruState {
  acc_t r, z, n, h;
};

template <typename acc_t>
FASTVID_MATH GruState<acc_t> gru_forward(acc_t x_r, acc_t x_z, acc_t x_n, acc_t h_r, acc_t h_z,
                                                   acc_t h_n, acc_t h_prev, bool reset_after) {
  GruState<acc_t> s;
  s.r = sigmoid(x_r + h_r);
  s.z = sigmoid(x_z + h_z);
  s.n = tanh_fast(x_n + (reset_after ? s.r * h_n : h_n));
  s.h = (acc_t(1) - s.z) * s.n + s.z * h_prev;
  return s;
}

template <typename acc_t>
struct GruGrad {
  acc_t r, z, x_n, h_n, h_prev;  // d pre-activations of r, z (same for the x and h convs), of x_n, h_n
};

// Backward of gru_forward from its cache (r, z, n, h_n). Without reset_after, r does not enter
// this stage: its gradient comes from gru_reset_backward and d.r is 0 here.
template <typename acc_t>
FASTVID_MATH GruGrad<acc_t> gru_backward(acc_t dh, acc_t r, acc_t z, acc_t n, acc_t h_n,
                                                   acc_t h_prev, bool reset_after) {
  GruGrad<acc_t> d;
  const acc_t dn_pre = dh * (acc_t(1) - z) * (acc_t(1) - n * n);
  d.z = dh * (h_prev - n) * z * (acc_t(1) - z);
  d.x_n = dn_pre;
  d.h_n = reset_after ? dn_pre * r : dn_pre;
  d.r = reset_after ? dn_pre * h_n * r * (acc_t(1) - r) : acc_t(0);
  d.h_prev = dh * z;
  return d;
}

// First stage of the Ballas GRU: r = σ(x_r + h_r), returns r·h_prev (and r through *r_out).
template <typename acc_t>
FASTVID_MATH acc_t gru_reset_forward(acc_t x_r, acc_t h_r, acc_t h_prev, acc_t* r_out) {
  const acc_t r = sigmoid(x_r + h_r);
  *r_out = r;
  return r * h_prev;
}

// Backward of gru_reset_forward: returns d r_pre and adds d(r·h_prev)/d h_prev to *dh_prev.
template <typename acc_t>
FASTVID_MATH acc_t gru_reset_backward(acc_t d_reset_h, acc_t r, acc_t h_prev, acc_t* dh_prev) {
  *dh_prev += d_reset_h * r;
  return d_reset_h * h_prev * r * (acc_t(1) - r);
}

}  // namespace recurrent
}  // namespace fastvid
