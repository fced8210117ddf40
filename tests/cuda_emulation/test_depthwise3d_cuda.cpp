// The CUDA depthwise 3D conv kernels (csrc/depthwise3d/depthwise3d_cuda_kernels.cuh) run on the CPU
// under the host shim and compared with a double-precision direct convolution written here (the input
// gradient as a scatter, the kernel gathers). Every dtype, NDHWC and NCDHW layouts, channel multiplier
// 1 and 2, strides / padding / dilation, grids small enough that the grid-stride loops wrap, and the
// weight gradient split into one and into many chunks (bitwise identical on a rerun).
#include "depthwise3d/depthwise3d_cuda_kernels.cuh"

#include "emulation_common.h"

using namespace fastvid::depthwise3d;
using namespace emu_test;

namespace {

constexpr int64_t kMaxBlocks = 2;  // 512 threads: every case below has more elements than that

struct Case {
  const char* name;
  int64_t batch, channels, multiplier;
  int64_t in[3], kernel[3], stride[3], padding[3], dilation[3];
};

const Case kCases[] = {
    {"3x3x3", 2, 3, 1, {5, 6, 7}, {3, 3, 3}, {1, 1, 1}, {1, 1, 1}, {1, 1, 1}},
    {"m2-strided-dilated", 1, 2, 2, {4, 7, 9}, {2, 3, 3}, {1, 2, 2}, {0, 1, 2}, {1, 1, 2}},
    {"1x3x1-stride3", 2, 4, 1, {7, 14, 5}, {1, 3, 1}, {3, 3, 1}, {0, 0, 0}, {1, 2, 1}},
};

Geometry geometry_of(const Case& k) {
  Geometry g;
  g.batch = k.batch, g.channels = k.channels, g.multiplier = k.multiplier;
  for (int d = 0; d < 3; ++d) {
    g.in[d] = k.in[d], g.kernel[d] = k.kernel[d], g.stride[d] = k.stride[d];
    g.padding[d] = k.padding[d], g.dilation[d] = k.dilation[d];
    g.out[d] = (k.in[d] + 2 * k.padding[d] - k.dilation[d] * (k.kernel[d] - 1) - 1) / k.stride[d] + 1;
  }
  return g;
}

// Offset of (b, c, t, h, w) in a dense [B, C, T, H, W] activation stored NCDHW or NDHWC.
int64_t offset(bool ncdhw, int64_t C, const int64_t* d, int64_t b, int64_t c, int64_t t, int64_t h, int64_t w) {
  return ncdhw ? (((b * C + c) * d[0] + t) * d[1] + h) * d[2] + w : (((b * d[0] + t) * d[1] + h) * d[2] + w) * C + c;
}

template <typename T>
void run_case(const Case& k, bool ncdhw, std::mt19937& rng) {
  using A = at::opmath_type<T>;
  const Geometry g = geometry_of(k);
  const std::string name = std::string(k.name) + "[" + dtype_name<T>() + (ncdhw ? ",ncdhw" : ",ndhwc") + "]";
  const int64_t C = g.channels, Cout = g.out_channels(), taps = g.taps(), m = g.multiplier;
  const int64_t n_in = g.batch * C * g.in[0] * g.in[1] * g.in[2];
  const int64_t n_out = g.batch * Cout * g.out[0] * g.out[1] * g.out[2];
  Framed<T> input(n_in), grad_output(n_out), output(n_out), grad_input(n_in);
  Framed<A> weight(taps * Cout), bias(Cout);
  input.fill_uniform(rng, -2, 2), grad_output.fill_uniform(rng, -2, 2);
  weight.fill_uniform(rng, -1, 1), bias.fill_uniform(rng, -1, 1);
  // weight element (o, tap) in the kernels' layout: [taps, C*m] (NDHWC) or [C*m, taps] (NCDHW).
  const auto w_at = [&](int64_t o, int64_t tap) { return double(weight[ncdhw ? o * taps + tap : tap * Cout + o]); };
  const auto x_at = [&](int64_t b, int64_t c, int64_t t, int64_t h, int64_t w) {
    return double(input[offset(ncdhw, C, g.in, b, c, t, h, w)]);
  };
  const auto go_at = [&](int64_t b, int64_t o, int64_t t, int64_t h, int64_t w) {
    return double(grad_output[offset(ncdhw, Cout, g.out, b, o, t, h, w)]);
  };

  cuda::launch_forward<T>(g, ncdhw, input.data(), weight.data(), bias.data(), output.data(), kMaxBlocks, 0);
  cuda::launch_input_grad<T>(g, ncdhw, grad_output.data(), weight.data(), grad_input.data(), kMaxBlocks, 0);

  // The oracle: every (output, tap) pair with its input element, in plain nested loops.
  std::vector<double> out_ref(n_out, 0), out_abs(n_out, 0), gi_ref(n_in, 0), gi_abs(n_in, 0);
  std::vector<double> gw_ref(taps * Cout, 0), gw_abs(taps * Cout, 0), gb_ref(Cout, 0), gb_abs(Cout, 0);
  int64_t positions = 0;
  for (int64_t b = 0; b < g.batch; ++b)
    for (int64_t ot = 0; ot < g.out[0]; ++ot)
      for (int64_t oh = 0; oh < g.out[1]; ++oh)
        for (int64_t ow = 0; ow < g.out[2]; ++ow, ++positions)
          for (int64_t o = 0; o < Cout; ++o) {
            const int64_t oi = offset(ncdhw, Cout, g.out, b, o, ot, oh, ow);
            const double go = go_at(b, o, ot, oh, ow);
            out_ref[oi] += double(bias[o]), out_abs[oi] += std::fabs(double(bias[o]));
            gb_ref[o] += go, gb_abs[o] += std::fabs(go);
            for (int64_t kt = 0; kt < g.kernel[0]; ++kt)
              for (int64_t kh = 0; kh < g.kernel[1]; ++kh)
                for (int64_t kw = 0; kw < g.kernel[2]; ++kw) {
                  const int64_t it = ot * g.stride[0] - g.padding[0] + kt * g.dilation[0];
                  const int64_t ih = oh * g.stride[1] - g.padding[1] + kh * g.dilation[1];
                  const int64_t iw = ow * g.stride[2] - g.padding[2] + kw * g.dilation[2];
                  if (it < 0 || it >= g.in[0] || ih < 0 || ih >= g.in[1] || iw < 0 || iw >= g.in[2]) continue;
                  const int64_t tap = (kt * g.kernel[1] + kh) * g.kernel[2] + kw, c = o / m;
                  const double x = x_at(b, c, it, ih, iw), w = w_at(o, tap);
                  out_ref[oi] += x * w, out_abs[oi] += std::fabs(x * w);
                  const int64_t ii = offset(ncdhw, C, g.in, b, c, it, ih, iw);
                  gi_ref[ii] += go * w, gi_abs[ii] += std::fabs(go * w);
                  gw_ref[o * taps + tap] += go * x, gw_abs[o * taps + tap] += std::fabs(go * x);
                }
          }
  // Sums of n terms in the acc type: n·eps_A·Σ|term|, plus the final rounding to the storage type.
  const double n_fwd = double(taps + 1), n_gi = double(taps * m), n_w = double(positions);
  for (int64_t i = 0; i < n_out; ++i)
    expect_close(name + " forward", double(output[i]), out_ref[i],
                 eps<T>() * std::fabs(out_ref[i]) + n_fwd * eps<A>() * out_abs[i]);
  for (int64_t i = 0; i < n_in; ++i)
    expect_close(name + " grad_input", double(grad_input[i]), gi_ref[i],
                 eps<T>() * std::fabs(gi_ref[i]) + n_gi * eps<A>() * gi_abs[i]);

  // Weight gradient: one chunk, many chunks, bias only; reruns must agree bit for bit.
  struct Variant {
    int64_t target_blocks;
    bool want_weight;
    int runs;
  };
  for (const Variant v : {Variant{1, true, 1}, Variant{int64_t(1) << 20, true, 2}, Variant{int64_t(1) << 20, false, 1}}) {
    {
      const int64_t target_blocks = v.target_blocks;
      const bool want_weight = v.want_weight;
      const cuda::WeightGradPlan plan = cuda::weight_grad_plan(g, ncdhw, target_blocks);
      const std::string wname = name + " weight_grad(chunks=" + std::to_string(plan.chunks) + (want_weight ? ")" : ",bias only)");
      if (target_blocks > 1 && plan.chunks < 2) {
        std::printf("FAIL %s: expected several chunks\n", wname.c_str());
        ++failures;
      }
      std::vector<A> first_w, first_b;
      for (int rerun = 0; rerun < v.runs; ++rerun) {
        Framed<A> workspace(plan.workspace_elems), gw(taps * Cout), gb(Cout);
        cuda::launch_weight_grad<T>(g, ncdhw, plan, grad_output.data(), input.data(), workspace.data(),
                                    want_weight ? gw.data() : nullptr, gb.data(), kMaxBlocks, 0);
        for (int64_t o = 0; o < Cout; ++o) {
          expect_close(wname + " bias", double(gb[o]), gb_ref[o], n_w * eps<A>() * gb_abs[o]);
          for (int64_t tap = 0; tap < taps && want_weight; ++tap)
            expect_close(wname + " weight", double(gw[ncdhw ? o * taps + tap : tap * Cout + o]), gw_ref[o * taps + tap],
                         n_w * eps<A>() * gw_abs[o * taps + tap]);
        }
        if (!want_weight)  // not asked for: not one element written
          for (int64_t i = 0; i < taps * Cout; ++i) {
            const A v = gw[i];
            const A nan = std::numeric_limits<A>::quiet_NaN();
            if (std::memcmp(&v, &nan, sizeof(A)) != 0) {
              std::printf("FAIL %s: grad_weight written though not wanted\n", wname.c_str());
              ++failures;
              break;
            }
          }
        std::vector<A> w_now(gw.data(), gw.data() + gw.n), b_now(gb.data(), gb.data() + gb.n);
        if (rerun == 1 && (std::memcmp(w_now.data(), first_w.data(), w_now.size() * sizeof(A)) != 0 ||
                           std::memcmp(b_now.data(), first_b.data(), b_now.size() * sizeof(A)) != 0)) {
          std::printf("FAIL %s: a rerun gave different bits\n", wname.c_str());
          ++failures;
        }
        ++checks;
        first_w = w_now, first_b = b_now;
        workspace.frames_intact(wname + " workspace"), gw.frames_intact(wname), gb.frames_intact(wname);
      }
    }
  }
  for (auto* t : {&input, &grad_output, &output, &grad_input}) t->frames_intact(name);
  weight.frames_intact(name), bias.frames_intact(name);
}

template <typename T>
void all_cases(std::mt19937& rng) {
  for (const Case& k : kCases)
    for (bool ncdhw : {false, true}) run_case<T>(k, ncdhw, rng);
}

}  // namespace

int main() {
  std::mt19937 rng(4321);
  all_cases<float>(rng);
  all_cases<double>(rng);
  all_cases<c10::BFloat16>(rng);
  all_cases<c10::Half>(rng);
  return report("emulated CUDA depthwise3d kernels");
}
