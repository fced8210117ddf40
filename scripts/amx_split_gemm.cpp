// Would AMX bf16 tiles make fp32 attention faster at fp32 accuracy? (issue 11's lever "bf16 tiles where
// the CPU has bf16", for fp32 inputs.) Each fp32 operand is split into three bf16 pieces, x = h + m + l
// (round to nearest each time), and C = A B is the sum of the six piece products whose weight is at
// least 2^-16 of hh (hh, hm, mh, hl, lh, mm), each an AMX TDPBF16PS with fp32 accumulation ("x6"); "x3"
// keeps hh, hm, mh (16 significant bits). Prints, per shape, the error of each against an fp64 product
// (max |C - C64| / max |C64|) next to a sequential fp32 FMA loop's, and the rates in fp32-equivalent
// multiply-adds per second (m·n·k / time; one thread; operands pre-split and pre-packed, so the split
// itself is not timed), then the raw bf16 rate of the same 32×32 block with its operands in L1.
//
//     g++ -O2 -march=sapphirerapids -o /tmp/amx_split_gemm scripts/amx_split_gemm.cpp && /tmp/amx_split_gemm
//
// Needs a CPU with AMX-BF16 and a Linux kernel that grants the tile state (arch_prctl). Measured
// (2026-12-06, the Intel Xeon of sessions 25-38, fp32 AVX-512 FMA peak 115-121 G lanes/s per core, two
// runs): x6 89-113 G/s on the attention's tile shapes (128×480×128, 128×128×480, 480×128×128; operands in
// L2), error 0.35-0.5x the fp32 loop's; x3 199-229 G/s, error 14-20x the fp32 loop's; raw bf16 with
// L1-resident operands 1090-1170 G/s (1200-1330 in a first version). fastvid's fp32 tile GEMM runs those
// shapes at 86-96 G/s alone (~87 inside the op): the fp32-accurate split is no faster, and the fast one is
// not fp32 at PyTorch's default precision. Not used. (An x3 with hi and lo pieces only is the two-bf16
// algorithm that torch.set_float32_matmul_precision("high") allows a backend to use: an opt-in path,
// not done.)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

namespace {

uint16_t bf16_round(float x) {  // round to nearest even; NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffff) > 0x7f800000) return uint16_t((u >> 16) | 0x40);
  u += 0x7fff + ((u >> 16) & 1);
  return uint16_t(u >> 16);
}

float bf16_value(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

void split3(float x, uint16_t* piece) {
  piece[0] = bf16_round(x);
  float rest = x - bf16_value(piece[0]);
  piece[1] = bf16_round(rest);
  rest -= bf16_value(piece[1]);
  piece[2] = bf16_round(rest);
}

struct TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t bytes_per_row[16];
  uint8_t rows[16];
};

// C [m×n] = Σ over `pairs` of A_p B_q. A pieces: [3][m][k] bf16 row-major; B pieces: [3][k/2][n][2]
// (AMX's pair-interleaved B layout). Blocks of 32×32: tiles 0-3 accumulate C, 4-5 hold A's two 16-row
// halves, 6-7 B's two 16-column halves. Each A piece is loaded once per k step for all the B pieces it
// pairs with (pairs grouped by A piece, the small products first).
void split_gemm(int m, int n, int k, const uint16_t* A, const uint16_t* B, float* C, bool six) {
  const size_t a_piece = size_t(m) * k, b_piece = size_t(k) * n;
  const int lda = k * 2, ldb = n * 4, ldc = n * 4;
  auto load_a = [&](int p, int i0, int k0) {
    const uint16_t* a = A + p * a_piece + size_t(i0) * k + k0;
    _tile_loadd(4, a, lda);
    _tile_loadd(5, a + 16 * k, lda);
  };
  auto times_b = [&](int q, int j0, int k0) {
    const uint16_t* b = B + q * b_piece + size_t(k0 / 2) * n * 2 + j0 * 2;
    _tile_loadd(6, b, ldb);
    _tile_loadd(7, b + 32, ldb);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  };
  for (int i0 = 0; i0 < m; i0 += 32)
    for (int j0 = 0; j0 < n; j0 += 32) {
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int k0 = 0; k0 < k; k0 += 32) {
        if (six) {
          load_a(2, i0, k0), times_b(0, j0, k0);                        // lh
          load_a(1, i0, k0), times_b(1, j0, k0), times_b(0, j0, k0);    // mm, mh
          load_a(0, i0, k0), times_b(2, j0, k0), times_b(1, j0, k0);    // hl, hm
        } else {
          load_a(1, i0, k0), times_b(0, j0, k0);                        // mh
          load_a(0, i0, k0), times_b(1, j0, k0);                        // hm
        }
        times_b(0, j0, k0);                                             // hh (A_h still loaded)
      }
      float* c = C + size_t(i0) * n + j0;
      _tile_stored(0, c, ldc);
      _tile_stored(1, c + 16, ldc);
      _tile_stored(2, c + 16 * n, ldc);
      _tile_stored(3, c + 16 * n + 16, ldc);
    }
}

template <typename F>
double fp32_equivalent_rate(int m, int n, int k, F&& run) {
  const int reps = std::max(1, int(2e8 / (double(m) * n * k)));
  double best = 1e9;
  for (int round = 0; round < 7; ++round) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int r = 0; r < reps; ++r) run();
    best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps);
  }
  return double(m) * n * k / best / 1e9;
}

}  // namespace

int main() {
  constexpr long kArchRequestPermission = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
  if (syscall(SYS_arch_prctl, kArchRequestPermission, kTileData) != 0) {
    std::perror("arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)");
    return 1;
  }
  TileConfig config{};
  config.palette = 1;
  for (int t = 0; t < 8; ++t) config.bytes_per_row[t] = 64, config.rows[t] = 16;
  _tile_loadconfig(&config);

  std::mt19937 rng(1);
  std::normal_distribution<float> normal;
  const int shapes[][3] = {{128, 480, 128}, {128, 128, 480}, {480, 128, 128}};  // S / O += P V / dV += Pᵀ dO
  for (const auto& shape : shapes) {
    const int m = shape[0], n = shape[1], k = shape[2];
    std::vector<float> A(size_t(m) * k), B(size_t(k) * n);
    for (auto& x : A) x = normal(rng);
    for (auto& x : B) x = std::exp(normal(rng)) * 0.01f;  // positive and spread, like probabilities
    std::vector<uint16_t> a_pieces(3 * A.size()), b_pieces(3 * B.size());
    uint16_t piece[3];
    for (size_t e = 0; e < A.size(); ++e) {
      split3(A[e], piece);
      for (int p = 0; p < 3; ++p) a_pieces[p * A.size() + e] = piece[p];
    }
    for (int kk = 0; kk < k; ++kk)
      for (int j = 0; j < n; ++j) {
        split3(B[size_t(kk) * n + j], piece);
        for (int q = 0; q < 3; ++q) b_pieces[q * B.size() + (size_t(kk / 2) * n + j) * 2 + (kk & 1)] = piece[q];
      }
    std::vector<double> exact(size_t(m) * n);
    std::vector<float> fp32(size_t(m) * n), six(size_t(m) * n), three(size_t(m) * n);
    for (int i = 0; i < m; ++i)
      for (int j = 0; j < n; ++j) {
        double d = 0;
        float f = 0;
        for (int kk = 0; kk < k; ++kk) {
          d += double(A[size_t(i) * k + kk]) * B[size_t(kk) * n + j];
          f = std::fma(A[size_t(i) * k + kk], B[size_t(kk) * n + j], f);
        }
        exact[size_t(i) * n + j] = d, fp32[size_t(i) * n + j] = f;
      }
    split_gemm(m, n, k, a_pieces.data(), b_pieces.data(), six.data(), true);
    split_gemm(m, n, k, a_pieces.data(), b_pieces.data(), three.data(), false);
    auto error = [&](const std::vector<float>& c) {
      double worst = 0, scale = 0;
      for (size_t e = 0; e < c.size(); ++e)
        worst = std::max(worst, std::fabs(c[e] - exact[e])), scale = std::max(scale, std::fabs(exact[e]));
      return worst / scale;
    };
    const double rate6 = fp32_equivalent_rate(m, n, k, [&] {
      split_gemm(m, n, k, a_pieces.data(), b_pieces.data(), six.data(), true);
    });
    const double rate3 = fp32_equivalent_rate(m, n, k, [&] {
      split_gemm(m, n, k, a_pieces.data(), b_pieces.data(), three.data(), false);
    });
    std::printf("m=%d n=%d k=%d  error: fp32 loop %.2e, x6 %.2e, x3 %.2e | fp32-equivalent G/s: x6 %.0f, x3 %.0f\n",
                m, n, k, error(fp32), error(six), error(three), rate6, rate3);
  }

  // The raw bf16 rate: one 32×32 block, k = 128, its operands in L1, repeated.
  const int k = 128, blocks = 20000;
  std::vector<uint16_t> A(32 * k), B(k * 32);
  std::vector<float> C(32 * 32);
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  const auto t0 = std::chrono::steady_clock::now();
  for (int r = 0; r < blocks; ++r)
    for (int k0 = 0; k0 < k; k0 += 32) {
      _tile_loadd(4, A.data() + k0, k * 2);
      _tile_loadd(5, A.data() + 16 * k + k0, k * 2);
      _tile_loadd(6, B.data() + (k0 / 2) * 64, 128);
      _tile_loadd(7, B.data() + (k0 / 2) * 64 + 32, 128);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  _tile_stored(0, C.data(), 128);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("raw bf16, operands in L1: %.0f G multiply-adds/s\n", double(blocks) * 32 * 32 * k / seconds / 1e9);
  _tile_release();
}
