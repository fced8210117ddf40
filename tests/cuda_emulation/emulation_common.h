// Shared by the emulated-CUDA tests (run by tests/test_cuda_emulation.py): NaN-framed buffers,
// dtype names and tolerances, a forward-mode dual number for gradient oracles, and a failure count.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

namespace emu_test {

inline int failures = 0;
inline int checks = 0;

template <typename T> const char* dtype_name();
template <> inline const char* dtype_name<float>() { return "float32"; }
template <> inline const char* dtype_name<double>() { return "float64"; }
template <> inline const char* dtype_name<c10::BFloat16>() { return "bfloat16"; }
template <> inline const char* dtype_name<c10::Half>() { return "float16"; }

template <typename T>
double eps() { return static_cast<double>(std::numeric_limits<T>::epsilon()); }

// n elements of T with kFrame NaNs (one fixed bit pattern) on either side. The interior starts as
// NaN too: an output element the kernel fails to write stays NaN and fails the comparison, and an
// out-of-bounds read that lands in a frame poisons the result. check_frames() proves no write
// left the interior; ASan catches accesses beyond the frames.
template <typename T>
struct Framed {
  static constexpr size_t kFrame = 64;
  std::vector<T> storage;
  size_t n;
  explicit Framed(size_t n_) : storage(n_ + 2 * kFrame, std::numeric_limits<T>::quiet_NaN()), n(n_) {}
  T* data() { return storage.data() + kFrame; }
  const T* data() const { return storage.data() + kFrame; }
  T& operator[](size_t i) { return data()[i]; }
  void fill_uniform(std::mt19937& rng, double lo, double hi) {
    std::uniform_real_distribution<double> u(lo, hi);
    for (size_t i = 0; i < n; ++i) data()[i] = static_cast<T>(u(rng));
  }
  bool frames_intact(const std::string& name) const {
    const T nan = std::numeric_limits<T>::quiet_NaN();
    for (size_t i = 0; i < kFrame; ++i) {
      const T a = storage[i], b = storage[kFrame + n + i];
      if (std::memcmp(&a, &nan, sizeof(T)) != 0 || std::memcmp(&b, &nan, sizeof(T)) != 0) {
        std::printf("FAIL %s: a frame element around the buffer was written (index %zu)\n", name.c_str(), i);
        ++failures;
        return false;
      }
    }
    return true;
  }
};

// |got - ref| <= tol, with NaN never passing. Prints the first few failures of a run.
inline bool expect_close(const std::string& what, double got, double ref, double tol) {
  ++checks;
  if (std::isfinite(got) && std::fabs(got - ref) <= tol) return true;
  if (failures < 20) std::printf("FAIL %s: got %.10g, expected %.10g (tol %.3g)\n", what.c_str(), got, ref, tol);
  ++failures;
  return false;
}

// Forward-mode dual number: value and derivative along one seeded input (the gradient oracles
// differentiate the forward equations instead of restating the backward formulas).
struct Dual {
  double v, d;
  Dual(double v_ = 0, double d_ = 0) : v(v_), d(d_) {}
};
inline Dual operator+(Dual a, Dual b) { return {a.v + b.v, a.d + b.d}; }
inline Dual operator-(Dual a, Dual b) { return {a.v - b.v, a.d - b.d}; }
inline Dual operator*(Dual a, Dual b) { return {a.v * b.v, a.d * b.v + a.v * b.d}; }
inline Dual sigmoid(Dual a) {
  const double s = 1.0 / (1.0 + std::exp(-a.v));
  return {s, a.d * s * (1.0 - s)};
}
inline Dual tanh(Dual a) {
  const double t = std::tanh(a.v);
  return {t, a.d * (1.0 - t * t)};
}
inline double logit(double p) { return std::log(p / (1.0 - p)); }

inline int report(const char* suite) {
  std::printf("%s: %d checks, %d failures\n", suite, checks, failures);
  return failures == 0 && checks > 0 ? 0 : 1;
}

}  // namespace emu_test
