// The CUDA gate kernels (csrc/recurrent/recurrent_cuda_kernels.cuh) run on the CPU under the host shim
// and compared with a double-precision oracle written here: the forward equations of
// fastvid/reference/recurrent.py, and for the backward kernels the same forward equations
// differentiated with dual numbers. Every dtype, NCHW and NHWC planes, gate slots inside [B, G·C, H, W]
// tensors, the aliasing the time loops use, and a grid small enough that the grid-stride loop wraps.
#include "recurrent/recurrent_cuda_kernels.cuh"

#include "emulation_common.h"

#include <functional>
#include <type_traits>

using namespace fastvid::recurrent;
using namespace emu_test;

namespace {

constexpr int64_t B = 2, C = 5, H = 7, W = 9, P = H * W;
constexpr int64_t kMaxBlocks = 2;  // 2 blocks x 256 threads < B·C·P = 630 elements: the loop wraps
static_assert(kMaxBlocks * cuda::kThreads < B * C * P, "the grid must be smaller than the problem");

// A [B, G·C, H, W] tensor (G gate slots of C channels), NCHW or NHWC, inside a NaN-framed buffer.
template <typename T>
struct Tensor4 {
  int64_t G;
  Framed<T> buf;
  int64_t sb, sc, sp;
  Tensor4(int64_t G_, bool nhwc) : G(G_), buf(B * G_ * C * P) {
    const int64_t Ch = G * C;
    if (nhwc) sb = P * Ch, sc = 1, sp = Ch;
    else sb = Ch * P, sc = P, sp = 1;
  }
  Plane slot(int64_t k = 0) {
    Plane p;
    p.data = buf.data() + k * C * sc;
    p.stride_b = sb, p.stride_c = sc, p.stride_p = sp;
    return p;
  }
  T& ref(int64_t k, int64_t b, int64_t c, int64_t p) { return buf.data()[b * sb + (k * C + c) * sc + p * sp]; }
  double at(int64_t k, int64_t b, int64_t c, int64_t p) { return static_cast<double>(ref(k, b, c, p)); }
  void fill(std::mt19937& rng, double lo, double hi) { buf.fill_uniform(rng, lo, hi); }
  void check_frames(const std::string& name) { buf.frames_intact(name); }
};

template <typename T>
std::string tag(const char* op, bool nhwc, const std::string& variant) {
  return std::string(op) + "[" + dtype_name<T>() + (nhwc ? ",nhwc" : ",nchw") + variant + "]";
}

// Tolerances: the result rounded to its storage type (eps_T·|ref|) plus the acc-type math (exp,
// tanh, a few products) measured against the double oracle.
template <typename T, typename A>
double tol_store(double ref) { return eps<T>() * std::fabs(ref) + 64 * eps<A>() * (1 + std::fabs(ref)); }

template <typename A>
double tol_acc(double ref) { return 64 * eps<A>() * (1 + std::fabs(ref)); }

void for_each_element(const std::function<void(int64_t, int64_t, int64_t)>& f) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < C; ++c)
      for (int64_t p = 0; p < P; ++p) f(b, c, p);
}

Geometry geometry(at::ScalarType dtype) { return Geometry{B, C, P, dtype}; }

// Variable lengths: at step kStep sample 0 is valid (length 4) and sample 1 masked (length 3). A masked
// sample's step is the identity on its state (recurrent_kernels.h), checked exactly.
const int64_t kLengths[B] = {4, 3};
constexpr int64_t kStep = 3;
StepMask test_mask(bool masked) {
  StepMask m;
  if (masked) m.lengths = kLengths, m.t = kStep;
  return m;
}
bool is_masked(bool masked, int64_t b) { return masked && b == 1; }
std::string mask_tag(bool masked) { return masked ? ",masked" : ""; }

// -------------------------------------------------------------------- LSTM forward
template <typename T>
void lstm_forward_case(bool nhwc, bool peephole, bool save, std::mt19937& rng, bool masked = false) {
  using A = at::opmath_type<T>;
  const std::string name = tag<T>("lstm_forward", nhwc, std::string(peephole ? ",peephole" : "") + (save ? ",save" : ",c-in-place") + mask_tag(masked));
  Tensor4<T> ax(4, nhwc), ah(4, nhwc), gates(4, nhwc), h1(1, nhwc), h2(1, nhwc), h_prev(1, nhwc);
  Tensor4<T> c_saved(1, nhwc);  // with save: c once more in T (the bf16 sequence reserve's c_save)
  Tensor4<A> c_prev(1, nhwc), c_out(1, nhwc);
  Framed<A> peep(3 * C);
  ax.fill(rng, -2, 2), ah.fill(rng, -2, 2), c_prev.fill(rng, -2, 2), peep.fill_uniform(rng, -1, 1);
  h_prev.fill(rng, -1, 1), gates.fill(rng, -1, 1);
  Tensor4<A> c_prev_copy = c_prev;
  LstmForwardArgs a;
  a.geo = geometry(c10::CppTypeToScalarType<T>::value);
  for (int k = 0; k < 4; ++k) a.a_x[k] = ax.slot(k), a.a_h[k] = ah.slot(k);
  a.c_prev = c_prev.slot();
  a.c_out = save ? c_out.slot() : c_prev.slot();  // the time loop without a cache updates c in place
  a.h_out = h1.slot(), a.h_out2 = h2.slot();
  if (save) {
    for (int k = 0; k < 4; ++k) a.gates_out[k] = gates.slot(k);
    a.c_save = c_saved.slot();
  }
  a.peephole = peephole ? peep.data() : nullptr;
  a.save = save;
  a.mask = test_mask(masked);
  a.h_prev = h_prev.slot();
  cuda::launch_elementwise(cuda::LstmForwardOp<T>{a}, kMaxBlocks, 0);
  Tensor4<A>& c_res = save ? c_out : c_prev;
  for_each_element([&](int64_t b, int64_t c, int64_t p) {
    if (is_masked(masked, b)) {  // output 0, state unchanged, cache 0
      expect_close(name + " masked h", h1.at(0, b, c, p), 0, 0);
      expect_close(name + " masked h2", h2.at(0, b, c, p), h_prev.at(0, b, c, p), 0);
      expect_close(name + " masked c", c_res.at(0, b, c, p), c_prev_copy.at(0, b, c, p), 0);
      if (save) {
        const double kept = c_prev_copy.at(0, b, c, p);
        expect_close(name + " masked c_save", c_saved.at(0, b, c, p), kept, tol_store<T, A>(kept));
      }
      for (int k = 0; k < 4 && save; ++k) expect_close(name + " masked gates", gates.at(k, b, c, p), 0, 0);
      return;
    }
    const double w_ci = peephole ? double(peep[c]) : 0, w_cf = peephole ? double(peep[C + c]) : 0,
                 w_co = peephole ? double(peep[2 * C + c]) : 0;
    double pre[4];
    for (int k = 0; k < 4; ++k) pre[k] = ax.at(k, b, c, p) + ah.at(k, b, c, p);
    const double cp = c_prev_copy.at(0, b, c, p);
    const double i = 1 / (1 + std::exp(-(pre[0] + w_ci * cp))), f = 1 / (1 + std::exp(-(pre[1] + w_cf * cp)));
    const double g = std::tanh(pre[2]), cn = f * cp + i * g;
    const double o = 1 / (1 + std::exp(-(pre[3] + w_co * cn))), h = o * std::tanh(cn);
    expect_close(name + " h", h1.at(0, b, c, p), h, tol_store<T, A>(h));
    expect_close(name + " h2", h2.at(0, b, c, p), h, tol_store<T, A>(h));
    expect_close(name + " c", c_res.at(0, b, c, p), cn, tol_acc<A>(cn));
    if (save) {
      expect_close(name + " c_save", c_saved.at(0, b, c, p), cn, tol_store<T, A>(cn));
      const double act[4] = {i, f, g, o};
      for (int k = 0; k < 4; ++k) expect_close(name + " gates", gates.at(k, b, c, p), act[k], tol_store<T, A>(act[k]));
    }
  });
  for (auto* t : {&ax, &ah, &gates, &h1, &h2, &h_prev, &c_saved}) t->check_frames(name);
  c_prev.check_frames(name), c_out.check_frames(name), peep.frames_intact(name);
}

// -------------------------------------------------------------------- LSTM backward
// Cell: the saved cell states' type, the accumulation type or T (cells_in_dtype, the bf16 sequence reserve).
template <typename T, typename Cell = at::opmath_type<T>>
void lstm_backward_case(bool nhwc, bool peephole, std::mt19937& rng, bool masked = false) {
  using A = at::opmath_type<T>;
  constexpr bool kCellsInDtype = !std::is_same_v<Cell, A>;
  const std::string name = tag<T>("lstm_backward", nhwc, std::string(peephole ? ",peephole" : "") +
                                  (kCellsInDtype ? ",cells-in-dtype" : "") + mask_tag(masked));
  Tensor4<T> dh0(1, nhwc), dh1(1, nhwc), dh2(1, nhwc), gates(4, nhwc), d_gates(4, nhwc), dh_prev(1, nhwc);
  dh_prev.fill(rng, -1, 1);
  Tensor4<A> dc(1, nhwc);
  Tensor4<Cell> c_prev(1, nhwc), c(1, nhwc);
  Framed<A> peep(3 * C);
  dh0.fill(rng, -1, 1), dh1.fill(rng, -1, 1), dh2.fill(rng, -1, 1), dc.fill(rng, -1, 1), c_prev.fill(rng, -2, 2);
  peep.fill_uniform(rng, -1, 1);
  // The cache as the forward leaves it: activated gates (kept away from 0 and ±1 so the oracle's
  // logit/atanh are well conditioned) and c = f·c_prev + i·g.
  std::uniform_real_distribution<double> unit(0.05, 0.95), sym(-0.95, 0.95);
  for_each_element([&](int64_t b, int64_t ch, int64_t p) {
    for (int k = 0; k < 4; ++k) gates.ref(k, b, ch, p) = static_cast<T>(k == 2 ? sym(rng) : unit(rng));
    c.ref(0, b, ch, p) = static_cast<Cell>(gates.at(1, b, ch, p) * c_prev.at(0, b, ch, p) +
                                           gates.at(0, b, ch, p) * gates.at(2, b, ch, p));
  });
  Tensor4<A> dc_copy = dc;
  LstmBackwardArgs a;
  a.geo = geometry(c10::CppTypeToScalarType<T>::value);
  a.dh_in[0] = dh0.slot(), a.dh_in[1] = dh1.slot(), a.dh_in[2] = dh2.slot();
  a.dc_in = a.dc_prev_out = dc.slot();  // the time loop carries dc in place
  for (int k = 0; k < 4; ++k) a.gates[k] = gates.slot(k), a.d_gates_out[k] = d_gates.slot(k);
  a.c_prev = c_prev.slot(), a.c = c.slot();
  a.cells_in_dtype = kCellsInDtype;
  a.peephole = peephole ? peep.data() : nullptr;
  a.mask = test_mask(masked);
  if (masked) a.dh_prev_out = dh_prev.slot();
  cuda::launch_elementwise(cuda::LstmBackwardOp<T>{a}, kMaxBlocks, 0);
  for_each_element([&](int64_t b, int64_t ch, int64_t p) {
    if (is_masked(masked, b)) {  // no gate gradient; dc and the state's dh (not the output's) pass through
      for (int k = 0; k < 4; ++k) expect_close(name + " masked d_gates", d_gates.at(k, b, ch, p), 0, 0);
      expect_close(name + " masked dc_prev", dc.at(0, b, ch, p), dc_copy.at(0, b, ch, p), 0);
      const double pass = dh1.at(0, b, ch, p) + dh2.at(0, b, ch, p);
      expect_close(name + " masked dh_prev", dh_prev.at(0, b, ch, p), pass, tol_store<T, A>(pass));
      return;
    }
    if (masked) expect_close(name + " dh_prev of a valid sample", dh_prev.at(0, b, ch, p), 0, 0);
    const double w_ci = peephole ? double(peep[ch]) : 0, w_cf = peephole ? double(peep[C + ch]) : 0,
                 w_co = peephole ? double(peep[2 * C + ch]) : 0;
    const double i = gates.at(0, b, ch, p), f = gates.at(1, b, ch, p), g = gates.at(2, b, ch, p),
                 o = gates.at(3, b, ch, p), cp = c_prev.at(0, b, ch, p), cc = c.at(0, b, ch, p);
    const double dh = dh0.at(0, b, ch, p) + dh1.at(0, b, ch, p) + dh2.at(0, b, ch, p);
    const double dcn = dc_copy.at(0, b, ch, p);
    const double base[5] = {logit(i) - w_ci * cp, logit(f) - w_cf * cp, std::atanh(g), logit(o) - w_co * cc, cp};
    double grad[5];
    for (int s = 0; s < 5; ++s) {  // d(dh·h + dc·c) / d(input s)
      Dual x[5];
      for (int k = 0; k < 5; ++k) x[k] = Dual(base[k], k == s ? 1 : 0);
      const Dual gi = sigmoid(x[0] + Dual(w_ci) * x[4]), gf = sigmoid(x[1] + Dual(w_cf) * x[4]), gg = tanh(x[2]);
      Dual cn = gf * x[4] + gi * gg;
      // cells in T: the kernel evaluates the gradient where the reserve says the forward was (its rounded
      // c), so the oracle does too: the stored value with the derivative of the exact c.
      if (kCellsInDtype) cn = Dual(cc, cn.d);
      const Dual go = sigmoid(x[3] + Dual(w_co) * cn);
      const Dual loss = Dual(dh) * (go * tanh(cn)) + Dual(dcn) * cn;
      grad[s] = loss.d;
    }
    for (int k = 0; k < 4; ++k)
      expect_close(name + " d_gates", d_gates.at(k, b, ch, p), grad[k], tol_store<T, A>(grad[k]));
    expect_close(name + " dc_prev", dc.at(0, b, ch, p), grad[4], tol_acc<A>(grad[4]));
  });
  for (auto* t : {&dh0, &dh1, &dh2, &gates, &d_gates, &dh_prev}) t->check_frames(name);
  dc.check_frames(name), c_prev.check_frames(name), c.check_frames(name), peep.frames_intact(name);
}

// -------------------------------------------------------------------- GRU forward
template <typename T>
void gru_forward_case(bool nhwc, bool reset_after, bool save, std::mt19937& rng, bool masked = false) {
  using A = at::opmath_type<T>;
  const std::string name =
      tag<T>("gru_forward", nhwc, std::string(reset_after ? ",reset_after" : ",ballas") + (save ? ",save" : ",h-in-place") + mask_tag(masked));
  Tensor4<T> x(3, nhwc), h(3, nhwc), h_prev(1, nhwc), h1(1, nhwc), h2(1, nhwc), cache(4, nhwc);
  x.fill(rng, -2, 2), h.fill(rng, -2, 2), h_prev.fill(rng, -2, 2);
  Tensor4<T> h_prev_copy = h_prev;
  GruForwardArgs a;
  a.geo = geometry(c10::CppTypeToScalarType<T>::value);
  for (int k = 0; k < 3; ++k) a.x[k] = x.slot(k), a.h[k] = h.slot(k);
  a.h_prev = h_prev.slot();
  a.h_out = h1.slot();
  a.h_out2 = save ? h2.slot() : h_prev.slot();  // hoisted loop: the next step's h overwrites h_prev
  if (save)
    for (int k = 0; k < 4; ++k) a.cache_out[k] = cache.slot(k);
  a.reset_after = reset_after, a.save = save;
  a.mask = test_mask(masked);
  cache.fill(rng, -1, 1);
  cuda::launch_elementwise(cuda::GruForwardOp<T>{a}, kMaxBlocks, 0);
  Tensor4<T>& h2_res = save ? h2 : h_prev;
  for_each_element([&](int64_t b, int64_t c, int64_t p) {
    if (is_masked(masked, b)) {
      expect_close(name + " masked h", h1.at(0, b, c, p), 0, 0);
      expect_close(name + " masked h2", h2_res.at(0, b, c, p), h_prev_copy.at(0, b, c, p), 0);
      for (int k = 0; k < 4 && save; ++k) expect_close(name + " masked cache", cache.at(k, b, c, p), 0, 0);
      return;
    }
    const double r = 1 / (1 + std::exp(-(x.at(0, b, c, p) + h.at(0, b, c, p))));
    const double z = 1 / (1 + std::exp(-(x.at(1, b, c, p) + h.at(1, b, c, p))));
    const double hn = h.at(2, b, c, p);
    const double n = std::tanh(x.at(2, b, c, p) + (reset_after ? r * hn : hn));
    const double hh = (1 - z) * n + z * h_prev_copy.at(0, b, c, p);
    expect_close(name + " h", h1.at(0, b, c, p), hh, tol_store<T, A>(hh));
    expect_close(name + " h2", h2_res.at(0, b, c, p), hh, tol_store<T, A>(hh));
    if (save) {
      const double want[4] = {r, z, n, hn};
      for (int k = 0; k < 4; ++k) expect_close(name + " cache", cache.at(k, b, c, p), want[k], tol_store<T, A>(want[k]));
    }
  });
  for (auto* t : {&x, &h, &h_prev, &h1, &h2, &cache}) t->check_frames(name);
}

// -------------------------------------------------------------------- GRU backward
template <typename T>
void gru_backward_case(bool nhwc, bool reset_after, std::mt19937& rng, bool masked = false) {
  using A = at::opmath_type<T>;
  const std::string name = tag<T>("gru_backward", nhwc, std::string(reset_after ? ",reset_after" : ",ballas") + mask_tag(masked));
  Tensor4<T> dh0(1, nhwc), dh1(1, nhwc), dh_direct(1, nhwc), cache(4, nhwc), h_prev(1, nhwc), d_x(3, nhwc),
      d_h(3, nhwc);
  dh0.fill(rng, -1, 1), dh1.fill(rng, -1, 1), dh_direct.fill(rng, -1, 1), h_prev.fill(rng, -2, 2);
  std::uniform_real_distribution<double> unit(0.05, 0.95), sym(-0.95, 0.95), wide(-2, 2);
  for_each_element([&](int64_t b, int64_t c, int64_t p) {
    cache.ref(0, b, c, p) = static_cast<T>(unit(rng));
    cache.ref(1, b, c, p) = static_cast<T>(unit(rng));
    cache.ref(2, b, c, p) = static_cast<T>(sym(rng));
    cache.ref(3, b, c, p) = static_cast<T>(wide(rng));
  });
  Tensor4<T> dh_direct_copy = dh_direct;
  GruBackwardArgs a;
  a.geo = geometry(c10::CppTypeToScalarType<T>::value);
  a.dh_in[0] = dh0.slot(), a.dh_in[1] = dh1.slot();
  a.dh_in[2] = a.dh_prev_out = dh_direct.slot();  // the time loop reads and overwrites dh_direct
  for (int k = 0; k < 4; ++k) a.cache[k] = cache.slot(k);
  for (int k = 0; k < 3; ++k) a.d_x_out[k] = d_x.slot(k), a.d_h_out[k] = d_h.slot(k);
  a.h_prev = h_prev.slot();
  a.reset_after = reset_after;
  a.mask = test_mask(masked);
  cuda::launch_elementwise(cuda::GruBackwardOp<T>{a}, kMaxBlocks, 0);
  for_each_element([&](int64_t b, int64_t c, int64_t p) {
    if (is_masked(masked, b)) {  // no gate gradient; the state's dh (dh_in[1] + dh_in[2]) passes through
      for (int k = 0; k < 3; ++k) {
        expect_close(name + " masked d_x", d_x.at(k, b, c, p), 0, 0);
        expect_close(name + " masked d_h", d_h.at(k, b, c, p), 0, 0);
      }
      const double pass = dh1.at(0, b, c, p) + dh_direct_copy.at(0, b, c, p);
      expect_close(name + " masked dh_prev", dh_direct.at(0, b, c, p), pass, tol_store<T, A>(pass));
      return;
    }
    const double r = cache.at(0, b, c, p), z = cache.at(1, b, c, p), n = cache.at(2, b, c, p), hn = cache.at(3, b, c, p);
    const double dh = dh0.at(0, b, c, p) + dh1.at(0, b, c, p) + dh_direct_copy.at(0, b, c, p);
    const double base[5] = {logit(r), logit(z), std::atanh(n) - (reset_after ? r * hn : hn), hn, h_prev.at(0, b, c, p)};
    double grad[5];  // d(dh·h) / d(r_pre, z_pre, x_n, h_n, h_prev)
    for (int s = 0; s < 5; ++s) {
      Dual v[5];
      for (int k = 0; k < 5; ++k) v[k] = Dual(base[k], k == s ? 1 : 0);
      const Dual gr = sigmoid(v[0]), gz = sigmoid(v[1]);
      const Dual gn = tanh(v[2] + (reset_after ? gr * v[3] : v[3]));
      grad[s] = (Dual(dh) * ((Dual(1) - gz) * gn + gz * v[4])).d;
    }
    const double want_x[3] = {grad[0], grad[1], grad[2]}, want_h[3] = {grad[0], grad[1], grad[3]};
    for (int k = 0; k < 3; ++k) {
      expect_close(name + " d_x", d_x.at(k, b, c, p), want_x[k], tol_store<T, A>(want_x[k]));
      expect_close(name + " d_h", d_h.at(k, b, c, p), want_h[k], tol_store<T, A>(want_h[k]));
    }
    expect_close(name + " dh_prev", dh_direct.at(0, b, c, p), grad[4], tol_store<T, A>(grad[4]));
  });
  for (auto* t : {&dh0, &dh1, &dh_direct, &cache, &h_prev, &d_x, &d_h}) t->check_frames(name);
}

// -------------------------------------------------------------------- GRU reset (Ballas first stage)
template <typename T>
void gru_reset_forward_case(bool nhwc, bool save, std::mt19937& rng, bool masked = false) {
  using A = at::opmath_type<T>;
  const std::string name = tag<T>("gru_reset_forward", nhwc, std::string(save ? ",save" : "") + mask_tag(masked));
  Tensor4<T> x_r(1, nhwc), h_r(1, nhwc), h_prev(1, nhwc), out(1, nhwc), r_out(1, nhwc);
  x_r.fill(rng, -2, 2), h_r.fill(rng, -2, 2), h_prev.fill(rng, -2, 2);
  GruResetForwardArgs a;
  a.geo = geometry(c10::CppTypeToScalarType<T>::value);
  a.x_r = x_r.slot(), a.h_r = h_r.slot(), a.h_prev = h_prev.slot(), a.reset_h_out = out.slot();
  if (save) a.r_out = r_out.slot();
  a.save = save;
  a.mask = test_mask(masked);
  cuda::launch_elementwise(cuda::GruResetForwardOp<T>{a}, kMaxBlocks, 0);
  for_each_element([&](int64_t b, int64_t c, int64_t p) {
    if (is_masked(masked, b)) {
      expect_close(name + " masked reset_h", out.at(0, b, c, p), 0, 0);
      if (save) expect_close(name + " masked r", r_out.at(0, b, c, p), 0, 0);
      return;
    }
    const double r = 1 / (1 + std::exp(-(x_r.at(0, b, c, p) + h_r.at(0, b, c, p))));
    const double want = r * h_prev.at(0, b, c, p);
    expect_close(name + " reset_h", out.at(0, b, c, p), want, tol_store<T, A>(want));
    if (save) expect_close(name + " r", r_out.at(0, b, c, p), r, tol_store<T, A>(r));
  });
  for (auto* t : {&x_r, &h_r, &h_prev, &out, &r_out}) t->check_frames(name);
}

template <typename T>
void gru_reset_backward_case(bool nhwc, std::mt19937& rng, bool masked = false) {
  using A = at::opmath_type<T>;
  const std::string name = tag<T>("gru_reset_backward", nhwc, mask_tag(masked));
  Tensor4<T> d_reset(1, nhwc), r(1, nhwc), h_prev(1, nhwc), dh_prev(1, nhwc), d_r(1, nhwc);
  d_reset.fill(rng, -1, 1), h_prev.fill(rng, -2, 2), dh_prev.fill(rng, -1, 1), r.fill(rng, 0.05, 0.95);
  Tensor4<T> dh_prev_copy = dh_prev;
  GruResetBackwardArgs a;
  a.geo = geometry(c10::CppTypeToScalarType<T>::value);
  a.d_reset_h = d_reset.slot(), a.r = r.slot(), a.h_prev = h_prev.slot();
  a.dh_prev_in = a.dh_prev_out = dh_prev.slot();  // accumulated in place, as the time loop does
  a.d_r_out = d_r.slot();
  a.mask = test_mask(masked);
  cuda::launch_elementwise(cuda::GruResetBackwardOp<T>{a}, kMaxBlocks, 0);
  for_each_element([&](int64_t b, int64_t c, int64_t p) {
    if (is_masked(masked, b)) {
      expect_close(name + " masked d_r", d_r.at(0, b, c, p), 0, 0);
      expect_close(name + " masked dh_prev", dh_prev.at(0, b, c, p), dh_prev_copy.at(0, b, c, p), 0);
      return;
    }
    const double g = d_reset.at(0, b, c, p);
    double grad[2];  // d(g · σ(r_pre)·h_prev) / d(r_pre, h_prev)
    for (int s = 0; s < 2; ++s) {
      const Dual pre(logit(r.at(0, b, c, p)), s == 0), hp(h_prev.at(0, b, c, p), s == 1);
      grad[s] = (Dual(g) * sigmoid(pre) * hp).d;
    }
    const double want_dh = dh_prev_copy.at(0, b, c, p) + grad[1];
    expect_close(name + " d_r", d_r.at(0, b, c, p), grad[0], tol_store<T, A>(grad[0]));
    expect_close(name + " dh_prev", dh_prev.at(0, b, c, p), want_dh, tol_store<T, A>(want_dh));
  });
  for (auto* t : {&d_reset, &r, &h_prev, &dh_prev, &d_r}) t->check_frames(name);
}

// -------------------------------------------------------------------- thread order
// Records, per emulated thread, the offsets (in a G=4 gate slot) of the elements it handles, then
// checks that within each warp neighbouring threads touch neighbouring addresses: the coalescing
// property of the launcher's index order, for NCHW and NHWC planes.
struct RecordOp {
  struct {
    Geometry geo;
  } a;
  Plane plane;
  std::vector<std::vector<int64_t>>* log;
  const Plane& layout() const { return plane; }
  void operator()(int64_t b, int64_t c, int64_t p) const {
    (*log)[blockIdx.x * blockDim.x + threadIdx.x].push_back(b * plane.stride_b + c * plane.stride_c + p * plane.stride_p);
  }
};

void thread_order_case(bool nhwc) {
  Tensor4<float> t(4, nhwc);
  std::vector<std::vector<int64_t>> log(kMaxBlocks * cuda::kThreads);
  RecordOp op{{geometry(at::kFloat)}, t.slot(1), &log};
  cuda::launch_elementwise(op, kMaxBlocks, 0);
  int64_t pairs = 0, unit = 0, visited = 0;
  for (const auto& l : log) visited += static_cast<int64_t>(l.size());
  for (size_t th = 0; th + 1 < log.size(); ++th) {
    if ((th + 1) % 32 == 0) continue;  // next thread is in another warp
    for (size_t k = 0; k < log[th].size() && k < log[th + 1].size(); ++k, ++pairs) unit += log[th + 1][k] - log[th][k] == 1;
  }
  const double share = double(unit) / double(pairs);
  const std::string name = std::string("thread_order[") + (nhwc ? "nhwc" : "nchw") + "]";
  expect_close(name + " elements visited", double(visited), double(B * C * P), 0);
  // NHWC: all but the step to the next pixel (1 in C) are unit steps; NCHW: all but 1 in P.
  const double want = nhwc ? double(C - 1) / C : double(P - 1) / P;
  if (share < want - 0.05) {
    std::printf("FAIL %s: only %.2f of neighbouring threads touch neighbouring addresses (want >= %.2f)\n",
                name.c_str(), share, want - 0.05);
    ++failures;
  }
  ++checks;
}

template <typename T>
void all_cases(std::mt19937& rng) {
  for (bool nhwc : {false, true}) {
    for (bool peephole : {false, true}) {
      lstm_forward_case<T>(nhwc, peephole, true, rng);
      lstm_forward_case<T>(nhwc, peephole, false, rng);
      lstm_backward_case<T>(nhwc, peephole, rng);
      if constexpr (!std::is_same_v<T, at::opmath_type<T>>) lstm_backward_case<T, T>(nhwc, peephole, rng);
    }
    for (bool reset_after : {true, false}) {
      gru_forward_case<T>(nhwc, reset_after, true, rng);
      gru_forward_case<T>(nhwc, reset_after, false, rng);
      gru_backward_case<T>(nhwc, reset_after, rng);
    }
    gru_reset_forward_case<T>(nhwc, true, rng);
    gru_reset_forward_case<T>(nhwc, false, rng);
    gru_reset_backward_case<T>(nhwc, rng);
    // variable lengths: one valid and one masked sample
    for (bool save : {true, false}) {
      lstm_forward_case<T>(nhwc, true, save, rng, true);
      gru_forward_case<T>(nhwc, false, save, rng, true);
      gru_reset_forward_case<T>(nhwc, save, rng, true);
    }
    lstm_backward_case<T>(nhwc, true, rng, true);
    for (bool reset_after : {true, false}) gru_backward_case<T>(nhwc, reset_after, rng, true);
    gru_reset_backward_case<T>(nhwc, rng, true);
  }
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  thread_order_case(false);
  thread_order_case(true);
  all_cases<float>(rng);
  all_cases<double>(rng);
  all_cases<c10::BFloat16>(rng);
  all_cases<c10::Half>(rng);
  return report("emulated CUDA gate kernels");
}
