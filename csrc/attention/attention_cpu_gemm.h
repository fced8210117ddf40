// fp32 tile products of the attention kernels, register-blocked at the active path's vector width.
// Included once per ISA path by attention_cpu.cpp (through cpu_isa_each.h, inside
// fastvid::attention::{anonymous}): FASTVID_ISA names the namespace, FASTVID_VEC_BYTES the width.
// No include guard.
//
// Why our own: MKL's sgemm runs its AVX2 kernel on the AMD CPUs measured here (~52 GFMA/s per core
// against a measured 133 at 512 bits), and PyTorch's SDPA uses that same sgemm for its tiles.
//
// C [m×n] = alpha · A B (+ C when accumulate). A element (i, kk) at a[i·rsa + kk·csa] (row-major
// A: csa = 1; a transposed operand: rsa = 1); B packed in column panels (pack_panels below);
// C row-major with row stride ldc. Each block of kGemmRows rows of A runs across B's columns
// kGemmVecs vectors at a time: kGemmRows × kGemmVecs accumulators, A broadcast, B streamed row by
// row. Full blocks read A in place; a partial block (and an A with neither stride 1) is packed.
// Measured alone on the attention tile shapes (one Zen 5 core, FMA peak 133 GFMA/s at 512 bits,
// 67 at 256): ~100-110 GFMA/s on the AVX-512 path; on the AVX2 path ~55 with B read in place, ~62
// with B packed in panels (120 × 480 × 128 tiles, thread CPU time), ~55-58 per product inside the
// op's backward (operands from L2/L3). Against the FMA peak measured alongside (12 independent FMA
// chains, same core, same minute; the clock moves with the machine's load): the 6 × 2 AVX2 block
// alone in L1 runs at 98-100 % for k = 120-960, the backward's five products with the op's operand
// layouts and sizes at 95-99 %. Tried on the AVX2 path, no gain: panels outer / row blocks inner
// (2-8 % slower), software prefetch of B (dQ +2.5 %, the others within ±1 %), P and dS stored by the
// S and dP products' epilogues (within the ±2 % run-to-run noise of the op; inlined into gemm_micro
// it made gcc spill an accumulator: backward 18 % slower).
namespace FASTVID_ISA {

typedef float gemm_vec __attribute__((vector_size(FASTVID_VEC_BYTES)));
constexpr int kGemmLanes = FASTVID_VEC_BYTES / int(sizeof(float));

#if FASTVID_VEC_BYTES == 64
inline gemm_vec gemm_fma(gemm_vec a, gemm_vec b, gemm_vec c) {
  return (gemm_vec)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
}
// (`gemm_vec{} + x` would add 0 before broadcasting: -0 + 0 is not -0, so gcc keeps the add)
inline gemm_vec gemm_broadcast(float x) { return (gemm_vec)_mm512_set1_ps(x); }
// x > m ? x : m per lane (a NaN x leaves m)
inline gemm_vec gemm_max(gemm_vec x, gemm_vec m) { return (gemm_vec)_mm512_max_ps((__m512)x, (__m512)m); }
constexpr int kGemmRows = 12, kGemmVecs = 2;  // 24 of the 32 vector registers accumulate
// B prefetched this many rows ahead of the FMAs (~200 cycles). On a Xeon (Emerald Rapids, two 512-bit
// FMA ports) the B panels, streamed from L2/L3 inside the op, stall the loads without it (perf: a
// third of the row-major kernel's samples on the B loads). Op fwd+bwd (B=2 N=6272 M=1568 D=128),
// in-process A/B, CPU time: one thread -5 % (median of 5; -9 % to +3 %), two threads -8 % (3; -11 %
// to -2 %). At 256 bits it measured within noise (op -2 %), so the AVX2 and baseline paths do not.
constexpr int kGemmPrefetchRows = 16;
#elif FASTVID_VEC_BYTES == 32
inline gemm_vec gemm_fma(gemm_vec a, gemm_vec b, gemm_vec c) {
  return (gemm_vec)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
}
inline gemm_vec gemm_broadcast(float x) { return (gemm_vec)_mm256_set1_ps(x); }
inline gemm_vec gemm_max(gemm_vec x, gemm_vec m) { return (gemm_vec)_mm256_max_ps((__m256)x, (__m256)m); }
constexpr int kGemmRows = 6, kGemmVecs = 2;  // 12 of 16
constexpr int kGemmPrefetchRows = 0;
#else
inline gemm_vec gemm_fma(gemm_vec a, gemm_vec b, gemm_vec c) { return a * b + c; }
inline gemm_vec gemm_broadcast(float x) { return gemm_vec{} + x; }
inline gemm_vec gemm_max(gemm_vec x, gemm_vec m) { return x > m ? x : m; }
constexpr int kGemmRows = 6, kGemmVecs = 2;
constexpr int kGemmPrefetchRows = 0;
#endif
constexpr int kGemmCols = kGemmVecs * kGemmLanes;
constexpr int kFloatsPerCacheLine = 64 / int(sizeof(float));  // one B-row prefetch per 64-byte line

// acc [kGemmRows × kGemmCols] = A B over k: A element (i, kk) at a[i·lda + kk] (kRowMajorA) or
// a[kk·lda + i] (a transposed operand, or a packed block with lda = kGemmRows); b row stride ldb.
// Full tiles (rows == kGemmRows, all columns) are written to c directly; others through `tile`.
// row_max (optional, kGemmRows vectors): each row's written values are max-ed into its lanes.
template <bool kRowMajorA>
inline void gemm_micro(int64_t k, const float* __restrict a, int64_t lda, const float* __restrict b, int64_t ldb,
                       float alpha, bool accumulate, float* c, int64_t ldc, int rows, int cols,
                       gemm_vec* __restrict row_max) {
  gemm_vec acc[kGemmRows][kGemmVecs];
#pragma GCC unroll 16
  for (int i = 0; i < kGemmRows; ++i)
#pragma GCC unroll 4
    for (int v = 0; v < kGemmVecs; ++v) acc[i][v] = gemm_vec{};
  for (int64_t kk = 0; kk < k; ++kk) {
    gemm_vec bv[kGemmVecs];
    if constexpr (kGemmPrefetchRows > 0)
#pragma GCC unroll 4
      for (int l = 0; l < kGemmCols; l += kFloatsPerCacheLine)
        __builtin_prefetch(b + (kk + kGemmPrefetchRows) * ldb + l, 0, 3);
#pragma GCC unroll 4
    for (int v = 0; v < kGemmVecs; ++v) std::memcpy(&bv[v], b + kk * ldb + v * kGemmLanes, sizeof(gemm_vec));
#pragma GCC unroll 16
    for (int i = 0; i < kGemmRows; ++i) {
      const gemm_vec ai = gemm_broadcast(kRowMajorA ? a[i * lda + kk] : a[kk * lda + i]);
#pragma GCC unroll 4
      for (int v = 0; v < kGemmVecs; ++v) acc[i][v] = gemm_fma(ai, bv[v], acc[i][v]);
    }
  }
  const gemm_vec alpha_v = gemm_broadcast(alpha);
  if (rows == kGemmRows && cols == kGemmCols) {
#pragma GCC unroll 16
    for (int i = 0; i < kGemmRows; ++i)
#pragma GCC unroll 4
      for (int v = 0; v < kGemmVecs; ++v) {
        float* dst = c + i * ldc + v * kGemmLanes;
        gemm_vec r = acc[i][v] * alpha_v;
        if (accumulate) {
          gemm_vec old;
          std::memcpy(&old, dst, sizeof(gemm_vec));
          r += old;
        }
        std::memcpy(dst, &r, sizeof(gemm_vec));
        if (row_max != nullptr) row_max[i] = gemm_max(r, row_max[i]);
      }
    return;
  }
  float tile[kGemmRows][kGemmCols];
  std::memcpy(tile, acc, sizeof(tile));
  for (int i = 0; i < rows; ++i) {
    float max = -std::numeric_limits<float>::infinity();
    for (int j = 0; j < cols; ++j) {
      const float r = tile[i][j] * alpha;
      c[i * ldc + j] = accumulate ? c[i * ldc + j] + r : r;
      max = c[i * ldc + j] > max ? c[i * ldc + j] : max;
    }
    if (row_max != nullptr) row_max[i] = gemm_max(gemm_broadcast(max), row_max[i]);
  }
}

// B operands are packed once into column panels of kGemmCols: panel p holds columns
// [p·kGemmCols, (p+1)·kGemmCols), zero-padded past n, row kk at bp[p·panel_stride + kk·kGemmCols].
// A panel is then one contiguous stream (the hardware prefetcher follows it, one TLB page per 4 KiB
// instead of one per row), and the key/value operands, reused by every query block, are packed once
// per call instead of being read with a row stride of the whole key dimension.
inline int64_t gemm_cols() { return kGemmCols; }

// Packs B [k × n], element (kk, j) at b[kk·rsb + j·csb], into panels (panel_stride >= k·kGemmCols).
inline void pack_panels(int64_t k, int64_t n, const float* b, int64_t rsb, int64_t csb, float* bp,
                        int64_t panel_stride) {
  for (int64_t j0 = 0; j0 < n; j0 += kGemmCols) {
    float* panel = bp + (j0 / kGemmCols) * panel_stride;
    const int cols = int(std::min<int64_t>(kGemmCols, n - j0));
    if (csb == 1) {
      for (int64_t kk = 0; kk < k; ++kk) {
        std::memcpy(panel + kk * kGemmCols, b + kk * rsb + j0, cols * sizeof(float));
        std::fill(panel + kk * kGemmCols + cols, panel + (kk + 1) * kGemmCols, 0.0f);
      }
    } else {  // a transposed source: read each column along its unit stride
      for (int j = 0; j < kGemmCols; ++j) {
        const float* column = b + (j0 + j) * csb;
        if (j < cols)
          for (int64_t kk = 0; kk < k; ++kk) panel[kk * kGemmCols + j] = column[kk * rsb];
        else
          for (int64_t kk = 0; kk < k; ++kk) panel[kk * kGemmCols + j] = 0.0f;
      }
    }
  }
}

// C [m×n] = alpha · A B (+ C when accumulate), B in panels (pack_panels) from bp. With row_max, also
// row_max[i] = the max of row i of C as written (NaNs skipped; -inf for a row of NaNs): the forward's
// softmax then needs no separate pass over the tile for it.
inline void tile_gemm(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t rsa, int64_t csa,
                      const float* bp, int64_t panel_stride, bool accumulate, float* c, int64_t ldc,
                      float* row_max) {
  // Per-thread scratch: a packed A block (a partial row block, zero-padded, or an A with neither
  // stride 1).
  thread_local std::vector<float> apack;
  // One block of kGemmRows rows of A (read as kRowMajorA says) across all of B's panels.
  auto row_block = [&](auto row_major_a, const float* ai, int64_t lda, int rows, float* ci, float* block_max) {
    constexpr bool kRowMajorA = decltype(row_major_a)::value;
    gemm_vec lane_max[kGemmRows];
    for (int i = 0; i < kGemmRows; ++i) lane_max[i] = gemm_broadcast(-std::numeric_limits<float>::infinity());
    for (int64_t j0 = 0; j0 < n; j0 += kGemmCols)
      gemm_micro<kRowMajorA>(k, ai, lda, bp + (j0 / kGemmCols) * panel_stride, kGemmCols, alpha, accumulate, ci + j0,
                             ldc, rows, int(std::min<int64_t>(kGemmCols, n - j0)), block_max ? lane_max : nullptr);
    if (block_max == nullptr) return;
    for (int i = 0; i < rows; ++i) {
      float lanes[kGemmLanes], max = -std::numeric_limits<float>::infinity();
      std::memcpy(lanes, &lane_max[i], sizeof(lanes));
      for (float x : lanes) max = x > max ? x : max;
      block_max[i] = max;
    }
  };
  for (int64_t i0 = 0; i0 < m; i0 += kGemmRows) {
    const int rows = int(std::min<int64_t>(kGemmRows, m - i0));
    const float* ai = a + i0 * rsa;
    float* ci = c + i0 * ldc;
    float* block_max = row_max ? row_max + i0 : nullptr;
    // Full row blocks read A in place: a row-major A through kGemmRows row streams, a transposed one
    // as kGemmRows consecutive values per kk.
    if (rows == kGemmRows && csa == 1) {
      row_block(std::true_type{}, ai, rsa, rows, ci, block_max);
    } else if (rows == kGemmRows && rsa == 1) {
      row_block(std::false_type{}, ai, csa, rows, ci, block_max);
    } else {
      apack.assign(size_t(k) * kGemmRows, 0.0f);
      for (int64_t kk = 0; kk < k; ++kk)
        for (int i = 0; i < rows; ++i) apack[kk * kGemmRows + i] = ai[i * rsa + kk * csa];
      row_block(std::false_type{}, apack.data(), int64_t(kGemmRows), rows, ci, block_max);
    }
  }
}

}  // namespace FASTVID_ISA
