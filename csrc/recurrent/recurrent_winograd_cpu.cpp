// Winograd F(m x m, 3 x 3) convolution on the CPU (interface and design: recurrent_winograd.h).
//
// Work unit: a strip = m output rows of one image across its whole width (ceil(W/m) tiles). Strips
// are grouped (~kGroupTiles tiles) so the alpha² GEMMs of a group -- [tiles, K] x [K, N] each, one
// at::bmm call -- are large enough for the BLAS and their operands stay in L2; groups run in
// parallel (at::parallel_for; the bmm inside a task runs on that task's thread). Per group:
//   1. gather the m + 2 padded input rows of each strip into a channels-innermost scratch (any
//      input strides; zero padding), input transform Bᵀ d B of every tile into U [alpha², tiles, K];
//   2. M = U V with V = G w Gᵀ [alpha², K, N] (transformed once per sequence call);
//   3. output transform Aᵀ M A (+ bias) of every tile of a strip into a pixel-major strip scratch,
//      laid out as the frames (channels innermost or NCHW) in the inputs' dtype, then handed to the
//      strip callback (the gate kernel) or copied into an output tensor.
// The transforms are vectorised over channels (the inner index of U, M and the scratches) by the
// compiler at each ISA path's width (cpu_isa.h); the transform matrices are compile-time constants
// and the zero coefficients drop out.
#include "recurrent_winograd.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../cpu_isa.h"

#ifndef FASTVID_WINOGRAD_SHARED
#define FASTVID_WINOGRAD_SHARED
namespace fastvid {
namespace recurrent {
namespace winograd {

// Transform matrices (Lavin & Gray 2016). F(4, 3): interpolation points 0, ±1, ±2, ∞.
template <int M>
struct Matrices;

template <>
struct Matrices<4> {
  static constexpr int A = 6;
  static constexpr double BT[6][6] = {{4, 0, -5, 0, 1, 0},  {0, -4, -4, 1, 1, 0}, {0, 4, -4, -1, 1, 0},
                                      {0, -2, -1, 2, 1, 0}, {0, 2, -1, -2, 1, 0}, {0, 4, 0, -5, 0, 1}};
  static constexpr double G[6][3] = {{1.0 / 4, 0, 0},
                                     {-1.0 / 6, -1.0 / 6, -1.0 / 6},
                                     {-1.0 / 6, 1.0 / 6, -1.0 / 6},
                                     {1.0 / 24, 1.0 / 12, 1.0 / 6},
                                     {1.0 / 24, -1.0 / 12, 1.0 / 6},
                                     {0, 0, 1}};
  static constexpr double AT[4][6] = {{1, 1, 1, 1, 1, 0}, {0, 1, -1, 2, -2, 0}, {0, 1, 1, 4, 4, 0}, {0, 1, -1, 8, -8, 1}};
};

// F(2, 3): points 0, ±1, ∞.
template <>
struct Matrices<2> {
  static constexpr int A = 4;
  static constexpr double BT[4][4] = {{1, 0, -1, 0}, {0, 1, 1, 0}, {0, -1, 1, 0}, {0, 1, 0, -1}};
  static constexpr double G[4][3] = {{1, 0, 0}, {0.5, 0.5, 0.5}, {0.5, -0.5, 0.5}, {0, 0, 1}};
  static constexpr double AT[2][4] = {{1, 1, 1, 0}, {0, 1, -1, -1}};
};

// Everything one convolution call needs, in plain pointers (the per-ISA kernels see no Tensor).
struct Job {
  const void* input = nullptr;  // [B, K, H, W] with element strides:
  int64_t in_sb = 0, in_sc = 0, in_sy = 0, in_sx = 0;
  const void* V = nullptr;      // [alpha², K, N] contiguous, accumulation type
  const void* bias = nullptr;   // [N] accumulation type, or nullptr
  int64_t B = 0, K = 0, N = 0, H = 0, W = 0, tile = kWinogradTile;
  at::ScalarType dtype = at::kFloat;  // input and output dtype
  bool channels_last = false;         // layout of the strip planes handed out
  const WinogradStripFn* fn = nullptr;
  Plane out;  // when fn is null: the [B, N, H·W] output plane
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
void run(const winograd::Job& job) { FASTVID_ISA_CALL(recurrent, winograd_conv_kernel(job)); }

winograd::Job make_job(const Tensor& input, const Tensor& V, const OptTensor& bias, const SeqGeometry& g,
                       Tensor& bias_acc) {
  TORCH_CHECK(input.dim() == 4 && input.device().is_cpu(), "winograd_conv: input must be a [B, K, H, W] CPU tensor");
  const int64_t A2 = V.size(0);
  TORCH_CHECK(V.dim() == 3 && V.size(1) == input.size(1) && (A2 == 36 || A2 == 16) &&
                  V.scalar_type() == acc_type(input.scalar_type()) && V.is_contiguous(),
              "winograd_conv: V must be contiguous [alpha², K, N] in the accumulation type");
  winograd::Job j;
  j.input = input.data_ptr();
  j.in_sb = input.stride(0), j.in_sc = input.stride(1), j.in_sy = input.stride(2), j.in_sx = input.stride(3);
  j.V = V.data_ptr();
  j.B = input.size(0), j.K = input.size(1), j.H = input.size(2), j.W = input.size(3), j.N = V.size(2);
  j.tile = A2 == 36 ? 4 : 2;
  j.dtype = input.scalar_type();
  j.channels_last = g.channels_last;
  if (bias.has_value()) {
    bias_acc = bias->to(V.scalar_type()).contiguous();
    TORCH_CHECK(bias_acc.numel() == j.N, "winograd_conv: bias must have N elements");
    j.bias = bias_acc.data_ptr();
  }
  return j;
}

template <int M>
Tensor transform_weights(const Tensor& weight) {
  using Mat = winograd::Matrices<M>;
  constexpr int A = Mat::A;
  const Tensor G = at::empty({A, 3}, weight.options().dtype(at::kDouble).device(at::kCPU));
  for (int a = 0; a < A; ++a)
    for (int i = 0; i < 3; ++i) G[a][i] = Mat::G[a][i];
  const Tensor w = weight.to(at::kDouble);
  // V[a, b, k, n] = Σ_ij G[a, i] w[n, k, i, j] G[b, j]
  const Tensor V = at::einsum("ai,nkij,bj->abkn", {G, w, G}).reshape({A * A, weight.size(1), weight.size(0)});
  return V.to(acc_type(weight.scalar_type())).contiguous();
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

void check_winograd(const char* op, const Tensor& x, const Tensor& weight_hh, const SeqGeometry& g) {
  const std::string reason = winograd_unsupported_reason(x, weight_hh, g);
  TORCH_CHECK_VALUE(reason.empty(), op, ": strategy 2 (winograd) cannot run this sequence: ", reason,
                    "; use strategy 0 (hoisted) or 1 (concat)");
}

Tensor winograd_weights(const Tensor& weight, int64_t tile) {
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == 3 && weight.size(3) == 3, "winograd_weights: need [N, K, 3, 3]");
  TORCH_CHECK(tile == 4 || tile == 2, "winograd_weights: tile must be 4 or 2, got ", tile);
  return tile == 4 ? transform_weights<4>(weight) : transform_weights<2>(weight);
}

Tensor winograd_input_grad_weights(const Tensor& weight, int64_t tile) {
  return winograd_weights(weight.flip({2, 3}).transpose(0, 1), tile);
}

void winograd_conv(const Tensor& input, const Tensor& V, const OptTensor& bias, const SeqGeometry& g,
                   const WinogradStripFn& fn) {
  Tensor bias_acc;
  winograd::Job j = make_job(input, V, bias, g, bias_acc);
  j.fn = &fn;
  run(j);
}

Tensor winograd_conv(const Tensor& input, const Tensor& V, const OptTensor& bias, const SeqGeometry& g) {
  Tensor bias_acc;
  winograd::Job j = make_job(input, V, bias, g, bias_acc);
  Tensor out = at::empty({j.B, j.N, j.H, j.W}, input.options().memory_format(frame_format(g.channels_last)));
  j.out = plane(out);
  run(j);
  return out;
}

namespace {
// The strip [y0, y0 + rows) of image b of a full-frame plane of element size elem.
Plane strip_of(const Plane& p, int64_t b, int64_t y0, int64_t W, int64_t elem) {
  return offset_plane(p, b, y0 * W, elem);
}

// Gate slot k (channels [k·C, (k + 1)·C)) of a strip plane.
Plane slot_of(const Plane& p, int64_t k, int64_t C, int64_t elem) {
  Plane q = p;
  q.data = static_cast<char*>(p.data) + k * C * p.stride_c * elem;
  return q;
}
}  // namespace

void winograd_lstm_step(const LstmForwardArgs& a, const Tensor& h_prev, const Tensor& V_hh, const SeqGeometry& g) {
  const int64_t C = a.geo.channels, W = g.W;
  const int64_t es = c10::elementSize(a.geo.dtype), ea = c10::elementSize(acc_type(a.geo.dtype));
  winograd_conv(h_prev, V_hh, std::nullopt, g, [&](int64_t b, int64_t y0, int64_t rows, const Plane& pre) {
    LstmForwardArgs s = a;
    s.geo.batch = 1;
    s.geo.pixels = rows * W;
    for (int k = 0; k < 4; ++k) {
      s.a_x[k] = strip_of(a.a_x[k], b, y0, W, es);
      s.a_h[k] = slot_of(pre, k, C, es);
      if (a.save) s.gates_out[k] = strip_of(a.gates_out[k], b, y0, W, es);
    }
    s.c_prev = strip_of(a.c_prev, b, y0, W, ea);
    s.c_out = strip_of(a.c_out, b, y0, W, ea);
    s.h_out = strip_of(a.h_out, b, y0, W, es);
    s.h_out2 = strip_of(a.h_out2, b, y0, W, es);
    lstm_forward_cpu(s);
  });
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
    gru_forward_cpu(s);
  });
}

}  // namespace recurrent
}  // namespace fastvid

#else  // ------------------------------------------------ one ISA path: namespace FASTVID_ISA
namespace fastvid {
namespace recurrent {
namespace FASTVID_ISA {
namespace {

constexpr int64_t kGroupTiles = 64;  // tiles per GEMM group: measured best for the benchmark shapes

template <int M, typename scalar_t>
void winograd_conv_impl(const winograd::Job& j) {
  using acc_t = at::opmath_type<scalar_t>;
  using Mat = winograd::Matrices<M>;
  constexpr int A = Mat::A;
  const int64_t K = j.K, N = j.N, H = j.H, W = j.W;
  const int64_t tiles_h = (H + M - 1) / M, tiles_w = (W + M - 1) / M;
  const int64_t Wt = tiles_w * M;        // tiled width
  const int64_t Wp = Wt + 2;             // padded scratch width
  const int64_t strips = j.B * tiles_h;
  const int64_t per_group = std::max<int64_t>(1, kGroupTiles / tiles_w);
  const int64_t groups = (strips + per_group - 1) / per_group;
  const auto acc_options = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const Tensor V = at::from_blob(const_cast<void*>(j.V), {A * A, K, N}, acc_options);
  const scalar_t* in = static_cast<const scalar_t*>(j.input);
  const acc_t* bias = static_cast<const acc_t*>(j.bias);

  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    const int64_t max_tiles = per_group * tiles_w;
    std::vector<acc_t> D(A * Wp * K);             // padded input rows of one strip, channels innermost
    std::vector<acc_t> U_buf(A * A * max_tiles * K);
    std::vector<acc_t> M_buf(A * A * max_tiles * N);
    std::vector<acc_t> out(M * Wt * N);           // one strip's output, pixel-major
    std::vector<scalar_t> pre(M * W * N);         // the same in the frames layout and dtype
    for (int64_t grp = g0; grp < g1; ++grp) {
      const int64_t s0 = grp * per_group, s1 = std::min(strips, s0 + per_group);
      const int64_t P = (s1 - s0) * tiles_w;
      acc_t* U = U_buf.data();
      acc_t* Mm = M_buf.data();
      // ---- 1. gather + input transform
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t b = s / tiles_h, y_top = (s % tiles_h) * M - 1;
        const scalar_t* in_b = in + b * j.in_sb;
        for (int r = 0; r < A; ++r) {
          acc_t* row = D.data() + r * Wp * K;
          const int64_t y = y_top + r;
          if (y < 0 || y >= H) {
            std::fill(row, row + Wp * K, acc_t(0));
            continue;
          }
          std::fill(row, row + K, acc_t(0));  // x = -1
          std::fill(row + (W + 1) * K, row + Wp * K, acc_t(0));  // x >= W
          const scalar_t* src = in_b + y * j.in_sy;
          if (j.in_sc <= j.in_sx) {
            for (int64_t x = 0; x < W; ++x)
              for (int64_t k = 0; k < K; ++k) row[(x + 1) * K + k] = static_cast<acc_t>(src[x * j.in_sx + k * j.in_sc]);
          } else {
            for (int64_t k = 0; k < K; ++k)
              for (int64_t x = 0; x < W; ++x) row[(x + 1) * K + k] = static_cast<acc_t>(src[x * j.in_sx + k * j.in_sc]);
          }
        }
        for (int64_t tx = 0; tx < tiles_w; ++tx) {
          const int64_t p = (s - s0) * tiles_w + tx;
          const acc_t* d0 = D.data() + tx * M * K;
          acc_t* u0 = U + p * K;
#pragma GCC ivdep
          for (int64_t k = 0; k < K; ++k) {
            acc_t d[A][A], t[A][A];
#pragma GCC unroll 8
            for (int r = 0; r < A; ++r)
#pragma GCC unroll 8
              for (int c = 0; c < A; ++c) d[r][c] = d0[(r * Wp + c) * K + k];
#pragma GCC unroll 8
            for (int i = 0; i < A; ++i)
#pragma GCC unroll 8
              for (int c = 0; c < A; ++c) {
                acc_t v = 0;
#pragma GCC unroll 8
                for (int r = 0; r < A; ++r)
                  if (Mat::BT[i][r] != 0) v += acc_t(Mat::BT[i][r]) * d[r][c];
                t[i][c] = v;
              }
#pragma GCC unroll 8
            for (int i = 0; i < A; ++i)
#pragma GCC unroll 8
              for (int jj = 0; jj < A; ++jj) {
                acc_t v = 0;
#pragma GCC unroll 8
                for (int c = 0; c < A; ++c)
                  if (Mat::BT[jj][c] != 0) v += t[i][c] * acc_t(Mat::BT[jj][c]);
                u0[(i * A + jj) * P * K + k] = v;
              }
          }
        }
      }
      // ---- 2. alpha² GEMMs [P, K] x [K, N]
      {
        const Tensor Ut = at::from_blob(U, {A * A, P, K}, acc_options);
        Tensor Mt = at::from_blob(Mm, {A * A, P, N}, acc_options);
        at::bmm_out(Mt, Ut, V);
      }
      // ---- 3. output transform (+ bias), strip by strip
      for (int64_t s = s0; s < s1; ++s) {
        const int64_t b = s / tiles_h, y0 = (s % tiles_h) * M;
        const int64_t rows = std::min<int64_t>(M, H - y0);
        for (int64_t tx = 0; tx < tiles_w; ++tx) {
          const int64_t p = (s - s0) * tiles_w + tx;
          const acc_t* m0 = Mm + p * N;
          acc_t* o0 = out.data() + tx * M * N;
#pragma GCC ivdep
          for (int64_t n = 0; n < N; ++n) {
            acc_t m[A][A], t[M][A];
#pragma GCC unroll 8
            for (int r = 0; r < A; ++r)
#pragma GCC unroll 8
              for (int c = 0; c < A; ++c) m[r][c] = m0[(r * A + c) * P * N + n];
#pragma GCC unroll 8
            for (int i = 0; i < M; ++i)
#pragma GCC unroll 8
              for (int c = 0; c < A; ++c) {
                acc_t v = 0;
#pragma GCC unroll 8
                for (int r = 0; r < A; ++r)
                  if (Mat::AT[i][r] != 0) v += acc_t(Mat::AT[i][r]) * m[r][c];
                t[i][c] = v;
              }
            const acc_t bn = bias != nullptr ? bias[n] : acc_t(0);
#pragma GCC unroll 8
            for (int i = 0; i < M; ++i)
#pragma GCC unroll 8
              for (int jj = 0; jj < M; ++jj) {
                acc_t v = bn;
#pragma GCC unroll 8
                for (int c = 0; c < A; ++c)
                  if (Mat::AT[jj][c] != 0) v += t[i][c] * acc_t(Mat::AT[jj][c]);
                o0[(i * Wt + jj) * N + n] = v;
              }
          }
        }
        const int64_t pixels = rows * W;
        if (j.fn != nullptr) {
          Plane pl;
          pl.data = pre.data();
          if (j.channels_last) {
            for (int64_t q = 0; q < pixels; ++q) {
              const acc_t* src = out.data() + ((q / W) * Wt + q % W) * N;
              scalar_t* dst = pre.data() + q * N;
              for (int64_t n = 0; n < N; ++n) dst[n] = static_cast<scalar_t>(src[n]);
            }
            pl.stride_b = pixels * N, pl.stride_c = 1, pl.stride_p = N;
          } else {
            for (int64_t q = 0; q < pixels; ++q) {
              const acc_t* src = out.data() + ((q / W) * Wt + q % W) * N;
              for (int64_t n = 0; n < N; ++n) pre[n * pixels + q] = static_cast<scalar_t>(src[n]);
            }
            pl.stride_b = pixels * N, pl.stride_c = pixels, pl.stride_p = 1;
          }
          (*j.fn)(b, y0, rows, pl);
        } else {
          scalar_t* dst = static_cast<scalar_t*>(j.out.data) + b * j.out.stride_b + y0 * W * j.out.stride_p;
          const int64_t sc = j.out.stride_c, sp = j.out.stride_p;
          if (sc <= sp) {
            for (int64_t q = 0; q < pixels; ++q) {
              const acc_t* src = out.data() + ((q / W) * Wt + q % W) * N;
              for (int64_t n = 0; n < N; ++n) dst[q * sp + n * sc] = static_cast<scalar_t>(src[n]);
            }
          } else {
            for (int64_t n = 0; n < N; ++n)
              for (int64_t q = 0; q < pixels; ++q)
                dst[q * sp + n * sc] = static_cast<scalar_t>(out[((q / W) * Wt + q % W) * N + n]);
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

}  // namespace FASTVID_ISA
}  // namespace recurrent
}  // namespace fastvid
#endif  // FASTVID_ISA
