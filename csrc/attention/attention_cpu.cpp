// Nonlocal attention on the CPU: out = softmax(scale · q kᵀ) v computed tile by tile with an online
// softmax (flash-attention-2), never holding the N×M affinity matrix. The math and conventions are
// those of fastvid/reference/attention.py.
//
// Shapes (heads folded into B by the caller):
//   q [B, N, D], k [B, M, D], v [B, M, Dv]: each either row-major (unit stride along its last dim)
//     or "transposed" (unit stride along its rows, e.g. the transpose of a channels-first
//     projection [B, D, T·H·W]); anything else is made contiguous first.
//   out [B, N, Dv] contiguous, lse [B, N] (fp32; fp64 for fp64 inputs): log-sum-exp of each score row;
//   with save_scores, scores [B, N, M] (lse's dtype) = scale · q kᵀ, else an empty [0].
//   Backward: grad_out [B, N, Dv] (row-major or transposed, like q), grad_lse [B, N] or absent, scores
//     as the forward returned them or absent -> grad_q/k/v contiguous like q/k/v.
//
// Work: the products of a query block with a key block are GEMMs: fp32 on the AVX-512 / AVX2 paths
// through our register-blocked kernel (attention_cpu_gemm.h), otherwise through the BLAS that torch
// loaded (MKL's sgemm_/dgemm_/gemm_bf16bf16f32_); the softmax update
// between them a vectorised loop. Forward: tasks = (batch, query block), each keeps its running row
// max m, row sum l and an fp32 output accumulator. Backward: the same tasks recompute S (or read
// the saved scores: one of the seven products fewer for B·N·M values of memory), P from lse,
// dP = dO vᵀ, dS = P ∘ (dP - delta) with delta = rowsum(dO ∘ O) - grad_lse, and accumulate dQ per task
// and dK, dV per thread range (summed afterwards in a fixed order: deterministic for a given thread count).
// Where the time goes (AVX2 path, one thread, B=2 N=6272 M=1568 D=128): the seven tile products
// 95 % (at ~95 % of the FMA peak measured alongside), the softmax row math 4 %, the rest ~1 %: the
// whole op at ~91 % of the peak, SDPA (MKL's sgemm) at ~74 %. A key-block-outer backward would only
// change where the products' operands stream from, which bounds its gain to a few percent.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "../cpu_block_cache.h"
#include "../cpu_isa.h"
#include "../fastvid_common.h"

// BLAS entry points (Fortran ABI, 32-bit ints) exported by the MKL inside torch's x86 wheels. Weak:
// without them (another BLAS, another platform) they are null and at::mm runs the tiles instead.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*, const int*,
            const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
            const int*, const double*, const int*, const double*, double*, const int*) __attribute__((weak));
void gemm_bf16bf16f32_(const char*, const char*, const int*, const int*, const int*, const float*,
                       const uint16_t*, const int*, const uint16_t*, const int*, const float*, float*,
                       const int*) __attribute__((weak));
}

namespace fastvid {
namespace attention {
namespace {

// Tile sizes: rows of q × rows of k (the fp32 S tile is 233 KiB, L2-resident with its K and V tiles).
// Multiples of 6 and 12, the row blocks of tile_gemm's AVX2 / AVX-512 kernels, so that no full tile
// leaves a partial row block (128 × 512 left 2 or 8 rows in every product: a whole block's time for
// them; 120 × 480 measured ~4 % faster forward+backward on the AVX2 path, one core). With MKL's sgemm
// (fp64, bf16, the baseline path) 64-256 × 256-512 measured within noise of each other; MKL's packed
// API (K/V tiles packed once per batch) measured slower.
constexpr int64_t kQueryBlock = 120, kKeyBlock = 480;
// Row stride of the score tiles: with 2 KiB (512 floats) the GEMMs that read a tile transposed would
// walk one column of it through the same few L1 sets.
constexpr int64_t kScoreLd = kKeyBlock + 16;
// Packed K/V operands are sliced per key block at whole column panels (32 columns at most).
static_assert(kKeyBlock % 32 == 0);
int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// A score tile's row into the saved scores, which the backward reads long after (B·N·M values, far
// beyond the caches): fp32 by streaming stores, which skip reading the destination lines first (the
// forward at B=2 N=6272 M=1568 measured 3 ms slower than without saving, 6 ms with plain stores).
template <typename acc_t>
void save_score_row(acc_t* dst, const acc_t* src, int64_t n) {
#if defined(__x86_64__)
  if constexpr (std::is_same_v<acc_t, float>) {
    int64_t j = 0;
    for (; j < n && (reinterpret_cast<uintptr_t>(dst + j) & 15) != 0; ++j) dst[j] = src[j];
    for (; j + 4 <= n; j += 4) _mm_stream_ps(dst + j, _mm_loadu_ps(src + j));
    for (; j < n; ++j) dst[j] = src[j];
    return;
  }
#endif
  std::memcpy(dst, src, n * sizeof(acc_t));
}

template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;  // float for float/bf16, double for double

// ---------------------------------------------------------------------------------------- GEMM
// tile_gemm, per ISA path: our register-blocked fp32 kernel (attention_cpu_gemm.h).
#define FASTVID_ISA_SOURCE "attention/attention_cpu_gemm.h"
#include "../cpu_isa_each.h"
#undef FASTVID_ISA_SOURCE

// fp32 tiles run through tile_gemm on the vector paths (AVX-512 measured 2x MKL's sgemm rate on the
// tile shapes, AVX2 at par); the baseline path, fp64 and bf16 keep the BLAS (at SSE2 width without
// FMA ours is far slower). Decided once per kernel call: the operands' layouts depend on it.
template <typename scalar_t>
bool use_own_gemm() {
  return std::is_same_v<scalar_t, float> && cpu_isa::active() != cpu_isa::Isa::baseline;
}

// One batch's [rows, cols] operand: element (r, c) at data[r * ld + c], or data[c * ld + r] when
// transposed. block(r0) is the operand from row r0 on.
template <typename scalar_t>
struct Operand {
  const scalar_t* data;
  int64_t batch_stride, ld;
  bool transposed;
  const scalar_t* block(int64_t batch, int64_t r0) const {
    return data + batch * batch_stride + (transposed ? r0 : r0 * ld);
  }
};

bool is_row_major(const at::Tensor& t) {
  return t.stride(2) == 1 && t.stride(1) >= std::max<int64_t>(1, t.size(2));
}

// A usable stride pattern, or a contiguous copy.
at::Tensor as_operand_layout(const at::Tensor& t) {
  const bool row_major = is_row_major(t);
  const bool transposed = t.stride(1) == 1 && t.stride(2) >= std::max<int64_t>(1, t.size(1));
  return (row_major || transposed) ? t : t.contiguous();
}

template <typename scalar_t>
Operand<scalar_t> operand(const at::Tensor& t) {
  const bool row_major = is_row_major(t);
  return {t.data_ptr<scalar_t>(), t.stride(0), row_major ? t.stride(1) : t.stride(2), !row_major};
}

// The B operand op(B) [k × n] of a tile product, for every batch. Plain (the BLAS reads it in place):
// the matrix at data with row stride ld, or with `trans` the transpose of the one stored there.
// Packed (panel_stride > 0): in tile_gemm's column panels of panel_cols columns (attention_cpu_gemm.h).
template <typename scalar_t>
struct TileB {
  const scalar_t* data;
  int64_t batch_stride, ld;
  bool trans;
  int64_t panel_cols = 0, panel_stride = 0;
  // op(B) from row kk0 and column j0 on (packed: j0 a multiple of panel_cols).
  const scalar_t* at(int64_t batch, int64_t kk0, int64_t j0) const {
    const scalar_t* base = data + batch * batch_stride;
    if (panel_stride > 0) return base + (j0 / panel_cols) * panel_stride + kk0 * panel_cols;
    return trans ? base + j0 * ld + kk0 : base + kk0 * ld + j0;
  }
};

// op(B) = x, or xᵀ with `transpose`, read in place.
template <typename scalar_t>
TileB<scalar_t> plain_b(const Operand<scalar_t>& x, bool transpose) {
  return {x.data, x.batch_stride, x.ld, x.transposed != transpose};
}

// op(B) [k × n] = x or xᵀ of every batch packed into tile_gemm's column panels (store keeps the buffer).
TileB<float> packed_b(const Operand<float>& x, bool transpose, int64_t batches, int64_t k, int64_t n,
                      at::Tensor& store) {
  const int64_t cols = FASTVID_ISA_CALL(attention, gemm_cols()), panels = (n + cols - 1) / cols;
  const int64_t panel_stride = k * cols, batch_stride = panels * panel_stride;
  store = cpu_block_cache::empty({batches * batch_stride}, at::TensorOptions().dtype(at::kFloat));
  float* dst = store.data_ptr<float>();
  const TileB<float> src = plain_b(x, transpose);
  at::parallel_for(0, batches * panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / panels, j0 = (item % panels) * cols;
      FASTVID_ISA_CALL(attention, pack_panels(k, std::min(cols, n - j0), src.at(b, 0, j0), src.trans ? 1 : src.ld,
                                              src.trans ? src.ld : 1, dst + b * batch_stride + (j0 / cols) * panel_stride,
                                              panel_stride));
    }
  });
  return {dst, batch_stride, 0, false, cols, panel_stride};
}

// op(B) = x or xᵀ for the tile products: packed for tile_gemm (use_own_gemm), else read in place.
template <typename scalar_t>
TileB<scalar_t> tile_b(const Operand<scalar_t>& x, bool transpose, int64_t batches, int64_t k, int64_t n,
                       at::Tensor& store) {
  if constexpr (std::is_same_v<scalar_t, float>)
    if (use_own_gemm<float>()) return packed_b(x, transpose, batches, k, n, store);
  return plain_b(x, transpose);
}

// Row-major C[m×n] = alpha · op(A) · op(B) + beta · C (C in the accumulation type, beta 0 or 1), op(B)
// from row kk0 and column j0 of batch `batch` of b_op. op(A) is the m×k matrix at a (row stride lda),
// or with trans_a the transpose of the k×m matrix at a. A packed B runs through tile_gemm (which can
// also return each row's max of the result in row_max); a plain one
// through the BLAS, where in column-major terms Cᵀ = op(B)ᵀ op(A)ᵀ: the operands swap, the flags pass
// through.
template <typename scalar_t>
void gemm(bool trans_a, int64_t m, int64_t n, int64_t k, acc_type<scalar_t> alpha, const scalar_t* a, int64_t lda,
          const TileB<scalar_t>& b_op, int64_t batch, int64_t kk0, int64_t j0, acc_type<scalar_t> beta,
          acc_type<scalar_t>* c, int64_t ldc, float* row_max = nullptr) {
  using acc_t = acc_type<scalar_t>;
  TORCH_INTERNAL_ASSERT(beta == acc_t(0) || beta == acc_t(1));
  const scalar_t* b = b_op.at(batch, kk0, j0);
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (b_op.panel_stride > 0)
      return FASTVID_ISA_CALL(attention, tile_gemm(m, n, k, alpha, a, trans_a ? 1 : lda, trans_a ? lda : 1, b,
                                                   b_op.panel_stride, beta != 0.0f, c, ldc, row_max));
  }
  TORCH_INTERNAL_ASSERT(b_op.panel_stride == 0 && row_max == nullptr);
  const bool trans_b = b_op.trans;
  const int64_t ldb = b_op.ld;
  const char ta = trans_a ? 'T' : 'N', tb = trans_b ? 'T' : 'N';
  const int mi = int(m), ni = int(n), ki = int(k), la = int(lda), lb = int(ldb), lc = int(ldc);
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (sgemm_) return sgemm_(&tb, &ta, &ni, &mi, &ki, &alpha, b, &lb, a, &la, &beta, c, &lc);
  } else if constexpr (std::is_same_v<scalar_t, double>) {
    if (dgemm_) return dgemm_(&tb, &ta, &ni, &mi, &ki, &alpha, b, &lb, a, &la, &beta, c, &lc);
  } else {
    if (gemm_bf16bf16f32_)
      return gemm_bf16bf16f32_(&tb, &ta, &ni, &mi, &ki, &alpha, reinterpret_cast<const uint16_t*>(b), &lb,
                               reinterpret_cast<const uint16_t*>(a), &la, &beta, c, &lc);
  }
  // Fallback: the same product with ATen on views of the buffers.
  const auto in_options = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
  const auto acc_options = at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value);
  auto view = [&](const scalar_t* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
    auto t = trans ? at::from_blob(const_cast<scalar_t*>(p), {rows, cols}, {1, ld}, in_options)
                   : at::from_blob(const_cast<scalar_t*>(p), {rows, cols}, {ld, 1}, in_options);
    return t.to(c10::CppTypeToScalarType<acc_t>::value);
  };
  at::Tensor c_view = at::from_blob(c, {m, n}, {ldc, 1}, acc_options);
  c_view.mul_(beta).add_(at::mm(view(a, m, k, lda, trans_a), view(b, k, n, ldb, trans_b)), alpha);
}

// ---------------------------------------------------------------------------------------- row math
// The tiles' scores are in natural units (the GEMM's alpha is scale), and P = 2^((s - m) · log2 e):
// s - m is exact where P matters (Sterbenz), so a row's largest score gives P = 1 exactly in the
// forward and, against the stored lse (= that score when it dominates), in the backward. (Scores kept
// in log2 units saved that multiply, but the fp32 lse, stored in natural units, then missed the
// log2-unit score by its rounding: ~0.2 % of P, and of dV, at scores of 6e4.)
constexpr double kLog2e = 1.4426950408889634, kLn2 = 0.6931471805599453;

// Lazy rescaling (as in FlashAttention-4): a row's running max m moves only when a tile's max
// exceeds it by more than this many binary orders (times ln 2 in score units), so most tiles skip rescaling the accumulator
// and the row sum. P entries then stay <= 2^8: no overflow, and no precision lost (the scale of P
// cancels in out = acc / l).
constexpr double kRescaleThreshold = 8;

// 2^x for float: round-to-nearest split x = n + r, |r| <= 1/2, and 2^r by its degree-7 Taylor
// polynomial (relative error < 1e-8 on that range, under float rounding), written branch-free so gcc
// vectorises the loops that call it. x <= -127 gives exactly 0 (exponent field 0); NaN stays NaN.
inline float exp2_fast(float x) {
  x = x < -127.0f ? -127.0f : x;
  x = x > 127.0f ? 127.0f : x;
  const float n = std::floor(x + 0.5f);
  const float r = x - n;
  float p = 1.5252733804e-5f;
  p = p * r + 1.5403530393e-4f;
  p = p * r + 1.3333558146e-3f;
  p = p * r + 9.6181291076e-3f;
  p = p * r + 5.5504108665e-2f;
  p = p * r + 2.4022650696e-1f;
  p = p * r + 6.9314718056e-1f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}
inline double exp2_fast(double x) { return std::exp2(x); }

// Partial sums/maxima over 16 lanes so gcc vectorises the reductions (a plain `sum += x` loop must
// stay in order under IEEE rules).
constexpr int kLanes = 16;

// The row functions below are compiled once per ISA path (cpu_isa.h), called with FASTVID_ISA_CALL.
FASTVID_PER_ISA(
template <typename acc_t>
acc_t row_max(const acc_t* s, int64_t n) {
  acc_t lane_max[kLanes];
  for (int u = 0; u < kLanes; ++u) lane_max[u] = -std::numeric_limits<acc_t>::infinity();
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int u = 0; u < kLanes; ++u) lane_max[u] = s[j + u] > lane_max[u] ? s[j + u] : lane_max[u];
  acc_t result = -std::numeric_limits<acc_t>::infinity();
  for (int u = 0; u < kLanes; ++u) result = lane_max[u] > result ? lane_max[u] : result;
  for (; j < n; ++j) result = s[j] > result ? s[j] : result;
  return result;
}

// P = e^(s - m) = 2^((s - m) · log2 e) over a row; returns its sum. fp32/fp64 write P over s (p_low
// unused), bf16 into p_low.
template <typename acc_t, typename p_t>
acc_t exp_row(acc_t* __restrict s, int64_t n, acc_t m, p_t* __restrict p_low) {
  constexpr acc_t log2e = acc_t(kLog2e);
  acc_t lane_sum[kLanes] = {};
  auto put = [&](int64_t j, acc_t e) {
    if constexpr (std::is_same_v<p_t, acc_t>) s[j] = e;
    else p_low[j] = p_t(e);
  };
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int u = 0; u < kLanes; ++u) {
      const acc_t e = exp2_fast((s[j + u] - m) * log2e);
      lane_sum[u] += e;
      put(j + u, e);
    }
  acc_t sum = 0;
  for (int u = 0; u < kLanes; ++u) sum += lane_sum[u];
  for (; j < n; ++j) {
    const acc_t e = exp2_fast((s[j] - m) * log2e);
    sum += e;
    put(j, e);
  }
  return sum;
}

// Online-softmax update of one query row with a new tile of scores s[0..n) whose max (NaNs skipped)
// is tile_max: the running max m moves (and l and the output accumulator are rescaled by e^(m_old - m))
// only when the tile's max exceeds m by more than kRescaleThreshold binary orders; then P = e^(s - m) is written (over s, or to p_low
// for bf16) and added to l. A row whose scores so far are all -inf keeps m = -inf and adds nothing
// (P = 0 for this tile); a later finite tile takes over with rescale 0.
template <typename acc_t, typename p_t>
void softmax_tile_row(acc_t* s, int64_t n, acc_t tile_max, acc_t& m, acc_t& l, acc_t* out_acc, int64_t dv,
                      p_t* p_low) {
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  if (tile_max > m + acc_t(kRescaleThreshold * kLn2)) {
    const acc_t rescale = m == kNegInf ? acc_t(0) : exp2_fast((m - tile_max) * acc_t(kLog2e));
    for (int64_t d = 0; d < dv; ++d) out_acc[d] *= rescale;
    l *= rescale;
    m = tile_max;
  }
  if (m == kNegInf) {  // every score so far is -inf or NaN (2^(-inf - -inf) would be NaN): P = 0, NaN kept
    acc_t sum = 0;
    for (int64_t j = 0; j < n; ++j) {
      const acc_t p = s[j] == kNegInf ? acc_t(0) : s[j];
      sum += p;
      if constexpr (std::is_same_v<p_t, acc_t>) s[j] = p;
      else p_low[j] = p_t(p);
    }
    l += sum;
    return;
  }
  l += exp_row(s, n, m, p_low);
}

// Backward of one row of a tile: P = e^(s - lse) (s - lse exact where P matters: the row's largest
// score, when it dominates, is the stored lse itself, so its P is 1), and dS = scale · P ∘ (dP - delta).
// fp32/fp64 write them over s and dp; bf16 into p_low and ds_low.
template <typename acc_t, typename p_t>
void softmax_grad_tile_row(acc_t* __restrict s, acc_t* __restrict dp, int64_t n, acc_t lse, acc_t delta,
                                              acc_t scale, p_t* __restrict p_low, p_t* __restrict ds_low) {
  constexpr acc_t log2e = acc_t(kLog2e);
  for (int64_t j = 0; j < n; ++j) {
    const acc_t p = exp2_fast((s[j] - lse) * log2e);
    const acc_t ds = scale * p * (dp[j] - delta);
    if constexpr (std::is_same_v<p_t, acc_t>) {
      s[j] = p;
      dp[j] = ds;
    } else {
      p_low[j] = p_t(p);
      ds_low[j] = p_t(ds);
    }
  }
}

template <typename scalar_t, typename acc_t>
acc_t row_dot(const scalar_t* a, const scalar_t* b, int64_t n) {
  acc_t lane[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int u = 0; u < kLanes; ++u) lane[u] += acc_t(a[j + u]) * acc_t(b[j + u]);
  acc_t sum = 0;
  for (int u = 0; u < kLanes; ++u) sum += lane[u];
  for (; j < n; ++j) sum += acc_t(a[j]) * acc_t(b[j]);
  return sum;
}
)  // FASTVID_PER_ISA

struct Sizes {
  int64_t B, N, M, D, Dv;
};

Sizes check_inputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"q", &q}, {"k", &k}, {"v", &v}}) {
    TORCH_CHECK(t->dim() == 3, "fastvid.", op, ": q, k, v must be 3-D [B, rows, dim], got shapes ", q.sizes(),
                ", ", k.sizes(), ", ", v.sizes());
    TORCH_CHECK(t->device().is_cpu(), "fastvid.", op, ": the CPU kernel needs CPU tensors, got ", name, " on ",
                t->device());
  }
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), "fastvid.", op,
              ": q, k, v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble || q.scalar_type() == at::kBFloat16,
              "fastvid.", op, ": the CPU kernel supports float32, float64 and bfloat16, got ", q.scalar_type());
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(0) == v.size(0), "fastvid.", op,
              ": q, k, v must have the same batch size, got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(q.size(2) == k.size(2), "fastvid.", op, ": q and k must have the same last dim D, got q ",
              q.sizes(), " and k ", k.sizes());
  TORCH_CHECK(k.size(1) == v.size(1), "fastvid.", op, ": k and v must have the same number of rows M, got k ",
              k.sizes(), " and v ", v.sizes());
  TORCH_CHECK(q.size(1) > 0 && k.size(1) > 0, "fastvid.", op, ": need at least one query and one key, got N = ",
              q.size(1), ", M = ", k.size(1));
  TORCH_CHECK(q.size(2) > 0 && v.size(2) > 0, "fastvid.", op, ": D and Dv must be positive, got ", q.size(2),
              " and ", v.size(2));
  const int64_t limit = std::numeric_limits<int>::max();
  for (const auto* t : {&q, &k, &v})
    TORCH_CHECK(t->stride(1) < limit && t->stride(2) < limit && t->size(1) < limit && t->size(2) < limit,
                "fastvid.", op, ": rows, dims and row strides must fit in 32 bits (BLAS), got ", t->sizes());
  return {q.size(0), q.size(1), k.size(1), q.size(2), v.size(2)};
}

// ---------------------------------------------------------------------------------------- forward
template <typename scalar_t>
void forward_kernel(const at::Tensor& q_t, const at::Tensor& k_t, const at::Tensor& v_t, double scale_d,
                    const Sizes& sz, at::Tensor& out_t, at::Tensor& lse_t, at::Tensor* scores_t) {
  using acc_t = acc_type<scalar_t>;
  constexpr bool kLowPrecision = !std::is_same_v<scalar_t, acc_t>;
  const auto q = operand<scalar_t>(q_t);
  at::Tensor k_store, v_store;
  const auto k_s = tile_b(operand<scalar_t>(k_t), true, sz.B, sz.D, sz.M, k_store);    // Kᵀ [D × M]
  const auto v_pv = tile_b(operand<scalar_t>(v_t), false, sz.B, sz.M, sz.Dv, v_store);  // V [M × Dv]
  scalar_t* out = out_t.data_ptr<scalar_t>();
  acc_t* lse = lse_t.data_ptr<acc_t>();
  acc_t* saved_scores = scores_t ? scores_t->data_ptr<acc_t>() : nullptr;
  const acc_t scale = acc_t(scale_d);
  const int64_t query_blocks = (sz.N + kQueryBlock - 1) / kQueryBlock;

  at::parallel_for(0, sz.B * query_blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scores(kQueryBlock * kScoreLd), out_acc(kQueryBlock * sz.Dv);
    std::vector<acc_t> row_max(kQueryBlock), row_sum(kQueryBlock), tile_max(kQueryBlock);
    std::vector<scalar_t> probs_low(kLowPrecision ? kQueryBlock * kScoreLd : 0);
    // tile_gemm returns each row's max of S with S; the BLAS path takes a pass over S for it.
    float* gemm_tile_max = nullptr;
    if constexpr (std::is_same_v<scalar_t, float>)
      if (k_s.panel_stride > 0) gemm_tile_max = tile_max.data();
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / query_blocks, i0 = (task % query_blocks) * kQueryBlock;
      const int64_t rows = std::min(kQueryBlock, sz.N - i0);
      std::fill(row_max.begin(), row_max.end(), -std::numeric_limits<acc_t>::infinity());
      std::fill(row_sum.begin(), row_sum.end(), acc_t(0));
      std::fill(out_acc.begin(), out_acc.end(), acc_t(0));
      for (int64_t j0 = 0; j0 < sz.M; j0 += kKeyBlock) {
        const int64_t cols = std::min(kKeyBlock, sz.M - j0);
        // S = scale · Q_i K_jᵀ
        gemm<scalar_t>(q.transposed, rows, cols, sz.D, scale, q.block(b, i0), q.ld, k_s, b, 0, j0, acc_t(0),
                       scores.data(), kScoreLd, gemm_tile_max);
        if (saved_scores != nullptr)
          for (int64_t r = 0; r < rows; ++r)
            save_score_row(saved_scores + (b * sz.N + i0 + r) * sz.M + j0, scores.data() + r * kScoreLd, cols);
        if (gemm_tile_max == nullptr)
          for (int64_t r = 0; r < rows; ++r)
            tile_max[r] = FASTVID_ISA_CALL(attention, row_max(scores.data() + r * kScoreLd, cols));
        scalar_t* probs;
        if constexpr (kLowPrecision) probs = probs_low.data();
        else probs = scores.data();
        for (int64_t r = 0; r < rows; ++r)
          FASTVID_ISA_CALL(attention, softmax_tile_row(scores.data() + r * kScoreLd, cols, tile_max[r], row_max[r], row_sum[r],
                                                       out_acc.data() + r * sz.Dv, sz.Dv, probs + r * kScoreLd));
        // O_i += P V_j
        gemm<scalar_t>(false, rows, sz.Dv, cols, acc_t(1), probs, kScoreLd, v_pv, b, j0, 0, acc_t(1), out_acc.data(),
                       sz.Dv);
      }
      for (int64_t r = 0; r < rows; ++r) {
        const acc_t inv = acc_t(1) / row_sum[r];
        scalar_t* out_row = out + (b * sz.N + i0 + r) * sz.Dv;
        for (int64_t d = 0; d < sz.Dv; ++d) out_row[d] = scalar_t(out_acc[r * sz.Dv + d] * inv);
        lse[b * sz.N + i0 + r] = acc_t(double(row_max[r]) + std::log(double(row_sum[r])));
      }
    }
#if defined(__x86_64__)
    if (saved_scores != nullptr) _mm_sfence();  // the streamed scores visible before the kernel returns
#endif
  });
}

// bf16 inputs: the tiles multiply in bf16 (MKL's gemm_bf16bf16f32) only where the CPU has AMX-BF16.
// Elsewhere that GEMM is no faster than sgemm (an EPYC with AVX512-BF16, one thread, N = 6272,
// M = 1568, D = 128 forward+backward: 200 ms with bf16 tiles, 186 ms in fp32) and, without native
// bf16, emulated; so the kernel runs in fp32 on upcast copies of the operands (linear memory) and
// rounds its results to bf16: as fast or faster, and P and dS are not rounded to bf16.
// FASTVID_ATTENTION_BF16_TILES=1 / =0 forces either path (tests run both on any machine).
bool use_bf16_tiles() {
  if (const char* env = std::getenv("FASTVID_ATTENTION_BF16_TILES"); env != nullptr && *env != '\0')
    return env[0] == '1';
  static const bool amx_bf16 = cpu_isa::has_amx_bf16();
  return amx_bf16;
}

bool upcast_bf16(const at::Tensor& t) { return t.scalar_type() == at::kBFloat16 && !use_bf16_tiles(); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> nonlocal_attention_cpu(const at::Tensor& q_in, const at::Tensor& k_in,
                                                                      const at::Tensor& v_in, double scale,
                                                                      bool save_scores) {
  const Sizes sz = check_inputs("nonlocal_attention", q_in, k_in, v_in);
  if (upcast_bf16(q_in)) {
    auto [out, lse, scores] = nonlocal_attention_cpu(q_in.to(at::kFloat), k_in.to(at::kFloat), v_in.to(at::kFloat),
                                                     scale, save_scores);
    return {out.to(at::kBFloat16), lse, scores};
  }
  const auto pinned = cpu_isa::pin_path();  // one ISA path for the whole call (cpu_isa.h)
  const at::Tensor q = as_operand_layout(q_in), k = as_operand_layout(k_in), v = as_operand_layout(v_in);
  const auto acc_options = q.options().dtype(q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  at::Tensor out = cpu_block_cache::empty({sz.B, sz.N, sz.Dv}, q.options());
  at::Tensor lse = at::empty({sz.B, sz.N}, acc_options);
  at::Tensor scores = save_scores ? cpu_block_cache::empty({sz.B, sz.N, sz.M}, acc_options) : at::empty({0}, acc_options);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "nonlocal_attention_cpu", [&] {
    forward_kernel<scalar_t>(q, k, v, scale, sz, out, lse, save_scores ? &scores : nullptr);
  });
  return {out, lse, scores};
}

// ---------------------------------------------------------------------------------------- backward
template <typename scalar_t>
void backward_kernel(const at::Tensor& grad_out_t, const at::Tensor* grad_lse_t, const at::Tensor& q_t,
                     const at::Tensor& k_t, const at::Tensor& v_t, const at::Tensor& out_t, const at::Tensor& lse_t,
                     const at::Tensor* scores_t, double scale_d, const Sizes& sz, at::Tensor& grad_q_t,
                     at::Tensor& grad_k_t, at::Tensor& grad_v_t) {
  using acc_t = acc_type<scalar_t>;
  constexpr bool kLowPrecision = !std::is_same_v<scalar_t, acc_t>;
  const auto q = operand<scalar_t>(q_t);
  // K and V as the B operands of S, dP and dQ (packed once for tile_gemm); Q_i and dO_i, the B of dK
  // and dV, are packed per task below.
  at::Tensor k_s_store, v_dp_store, k_dq_store;
  const auto k_s = tile_b(operand<scalar_t>(k_t), true, sz.B, sz.D, sz.M, k_s_store);      // Kᵀ [D × M]
  const auto v_dp = tile_b(operand<scalar_t>(v_t), true, sz.B, sz.Dv, sz.M, v_dp_store);   // Vᵀ [Dv × M]
  const auto k_dq = tile_b(operand<scalar_t>(k_t), false, sz.B, sz.M, sz.D, k_dq_store);   // K [M × D]
  const bool own = k_s.panel_stride > 0;
  const int64_t panel_cols = own ? k_s.panel_cols : 1;
  const auto grad_out = operand<scalar_t>(grad_out_t);
  const scalar_t* out = out_t.data_ptr<scalar_t>();
  const acc_t* lse = lse_t.data_ptr<acc_t>();
  const acc_t* saved_scores = scores_t ? scores_t->data_ptr<acc_t>() : nullptr;
  const acc_t* grad_lse = grad_lse_t ? grad_lse_t->data_ptr<acc_t>() : nullptr;
  scalar_t* grad_q = grad_q_t.data_ptr<scalar_t>();
  const acc_t scale = acc_t(scale_d);
  const int64_t query_blocks = (sz.N + kQueryBlock - 1) / kQueryBlock;
  const int64_t tasks = sz.B * query_blocks;

  // dK, dV are sums over every query block: each of `ranges` contiguous task ranges accumulates its
  // own copy for the batches it touches; the copies are summed below in range order.
  const int64_t ranges = std::min<int64_t>(tasks, at::get_num_threads());
  auto range_begin = [&](int64_t r) { return r * tasks / ranges; };
  std::vector<int64_t> first_batch(ranges), batch_count(ranges);
  std::vector<std::vector<acc_t>> grad_k_acc(ranges), grad_v_acc(ranges);

  at::parallel_for(0, ranges, 1, [&](int64_t range_lo, int64_t range_hi) {
    std::vector<acc_t> scores(kQueryBlock * kScoreLd), dscores(kQueryBlock * kScoreLd);
    // fp32/fp64: the GEMMs read P and dS from scores/dscores; bf16: from rounded copies.
    std::vector<scalar_t> probs_low(kLowPrecision ? kQueryBlock * kScoreLd : 0);
    std::vector<scalar_t> dscores_low(kLowPrecision ? kQueryBlock * kScoreLd : 0);
    scalar_t *probs, *dprobs;
    if constexpr (kLowPrecision) probs = probs_low.data(), dprobs = dscores_low.data();
    else probs = scores.data(), dprobs = dscores.data();
    std::vector<acc_t> grad_q_acc(kQueryBlock * sz.D), delta(kQueryBlock);
    // A transposed or row-padded grad_out (e.g. the gradient of a projection that read out through
    // its transpose) is brought to dense rows one tile at a time, instead of a full contiguous copy.
    std::vector<scalar_t> grad_out_tile(grad_out.transposed || grad_out.ld != sz.Dv ? kQueryBlock * sz.Dv : 0);
    std::vector<float> q_panels(own ? kQueryBlock * round_up(sz.D, panel_cols) : 0);
    std::vector<float> grad_out_panels(own ? kQueryBlock * round_up(sz.Dv, panel_cols) : 0);
    for (int64_t range = range_lo; range < range_hi; ++range) {
      const int64_t t_begin = range_begin(range), t_end = range_begin(range + 1);
      const int64_t b_first = t_begin / query_blocks, b_last = (t_end - 1) / query_blocks;
      first_batch[range] = b_first;
      batch_count[range] = b_last - b_first + 1;
      auto& gk = grad_k_acc[range];
      auto& gv = grad_v_acc[range];
      gk.assign(batch_count[range] * sz.M * sz.D, acc_t(0));
      gv.assign(batch_count[range] * sz.M * sz.Dv, acc_t(0));
      for (int64_t task = t_begin; task < t_end; ++task) {
        const int64_t b = task / query_blocks, i0 = (task % query_blocks) * kQueryBlock;
        const int64_t rows = std::min(kQueryBlock, sz.N - i0);
        const scalar_t* dO = grad_out.block(b, i0);
        if (grad_out.transposed) {
          for (int64_t d = 0; d < sz.Dv; ++d)
            for (int64_t r = 0; r < rows; ++r) grad_out_tile[r * sz.Dv + d] = dO[d * grad_out.ld + r];
          dO = grad_out_tile.data();
        } else if (grad_out.ld != sz.Dv) {
          for (int64_t r = 0; r < rows; ++r)
            std::copy(dO + r * grad_out.ld, dO + r * grad_out.ld + sz.Dv, grad_out_tile.data() + r * sz.Dv);
          dO = grad_out_tile.data();
        }
        for (int64_t r = 0; r < rows; ++r)
          delta[r] = FASTVID_ISA_CALL(attention, row_dot<scalar_t, acc_t>(dO + r * sz.Dv,
                                                                        out + (b * sz.N + i0 + r) * sz.Dv, sz.Dv)) -
                     (grad_lse ? grad_lse[b * sz.N + i0 + r] : acc_t(0));
        // Q_i [rows × D] and dO_i [rows × Dv] as B operands.
        TileB<scalar_t> q_i{q.block(b, i0), 0, q.ld, q.transposed}, grad_out_i{dO, 0, sz.Dv, false};
        if constexpr (std::is_same_v<scalar_t, float>) {
          if (own) {
            FASTVID_ISA_CALL(attention, pack_panels(rows, sz.D, q_i.data, q.transposed ? 1 : q.ld,
                                                    q.transposed ? q.ld : 1, q_panels.data(), kQueryBlock * panel_cols));
            FASTVID_ISA_CALL(attention, pack_panels(rows, sz.Dv, dO, sz.Dv, 1, grad_out_panels.data(),
                                                    kQueryBlock * panel_cols));
            q_i = {q_panels.data(), 0, 0, false, panel_cols, kQueryBlock * panel_cols};
            grad_out_i = {grad_out_panels.data(), 0, 0, false, panel_cols, kQueryBlock * panel_cols};
          }
        }
        std::fill(grad_q_acc.begin(), grad_q_acc.end(), acc_t(0));
        acc_t* gk_b = gk.data() + (b - b_first) * sz.M * sz.D;
        acc_t* gv_b = gv.data() + (b - b_first) * sz.M * sz.Dv;
        for (int64_t j0 = 0; j0 < sz.M; j0 += kKeyBlock) {
          const int64_t cols = std::min(kKeyBlock, sz.M - j0);
          // S = scale · Q_i K_jᵀ (the forward's, where it saved them) ; dP = dO_i V_jᵀ
          if (saved_scores != nullptr) {
            for (int64_t r = 0; r < rows; ++r)
              std::memcpy(scores.data() + r * kScoreLd, saved_scores + (b * sz.N + i0 + r) * sz.M + j0,
                          cols * sizeof(acc_t));
          } else {
            gemm<scalar_t>(q.transposed, rows, cols, sz.D, scale, q.block(b, i0), q.ld, k_s, b, 0, j0, acc_t(0),
                           scores.data(), kScoreLd);
          }
          gemm<scalar_t>(false, rows, cols, sz.Dv, acc_t(1), dO, sz.Dv, v_dp, b, 0, j0, acc_t(0), dscores.data(),
                         kScoreLd);
          for (int64_t r = 0; r < rows; ++r)
            FASTVID_ISA_CALL(attention, softmax_grad_tile_row(scores.data() + r * kScoreLd,
                                                              dscores.data() + r * kScoreLd, cols,
                                                              lse[b * sz.N + i0 + r], delta[r], scale, probs + r * kScoreLd,
                                                              dprobs + r * kScoreLd));
          // dV_j += Pᵀ dO_i ; dK_j += dSᵀ Q_i ; dQ_i += dS K_j   (dS carries the scale)
          gemm<scalar_t>(true, cols, sz.Dv, rows, acc_t(1), probs, kScoreLd, grad_out_i, 0, 0, 0, acc_t(1),
                         gv_b + j0 * sz.Dv, sz.Dv);
          gemm<scalar_t>(true, cols, sz.D, rows, acc_t(1), dprobs, kScoreLd, q_i, 0, 0, 0, acc_t(1),
                         gk_b + j0 * sz.D, sz.D);
          gemm<scalar_t>(false, rows, sz.D, cols, acc_t(1), dprobs, kScoreLd, k_dq, b, j0, 0, acc_t(1),
                         grad_q_acc.data(), sz.D);
        }
        scalar_t* gq = grad_q + (b * sz.N + i0) * sz.D;
        for (int64_t e = 0; e < rows * sz.D; ++e) gq[e] = scalar_t(grad_q_acc[e]);
      }
    }
  });

  // Sum the ranges' dK, dV per batch, in range order.
  scalar_t* grad_k = grad_k_t.data_ptr<scalar_t>();
  scalar_t* grad_v = grad_v_t.data_ptr<scalar_t>();
  at::parallel_for(0, sz.B * sz.M, 64, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row(std::max(sz.D, sz.Dv));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / sz.M, j = item % sz.M;
      for (auto [width, accs, dst] : {std::tuple{sz.D, &grad_k_acc, grad_k}, std::tuple{sz.Dv, &grad_v_acc, grad_v}}) {
        std::fill(row.begin(), row.begin() + width, acc_t(0));
        for (int64_t range = 0; range < ranges; ++range) {
          if (b < first_batch[range] || b >= first_batch[range] + batch_count[range]) continue;
          const acc_t* src = (*accs)[range].data() + ((b - first_batch[range]) * sz.M + j) * width;
          for (int64_t d = 0; d < width; ++d) row[d] += src[d];
        }
        for (int64_t d = 0; d < width; ++d) dst[(b * sz.M + j) * width + d] = scalar_t(row[d]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> nonlocal_attention_backward_cpu(
    const at::Tensor& grad_out_in, const std::optional<at::Tensor>& grad_lse_in, const at::Tensor& q_in,
    const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in,
    double scale, const std::optional<at::Tensor>& scores_in) {
  const Sizes sz = check_inputs("nonlocal_attention_backward", q_in, k_in, v_in);
  if (upcast_bf16(q_in)) {
    auto f32 = [](const at::Tensor& t) { return t.to(at::kFloat); };
    auto [grad_q, grad_k, grad_v] = nonlocal_attention_backward_cpu(
        f32(grad_out_in), grad_lse_in, f32(q_in), f32(k_in), f32(v_in), f32(out_in), lse_in, scale, scores_in);
    return {grad_q.to(at::kBFloat16), grad_k.to(at::kBFloat16), grad_v.to(at::kBFloat16)};
  }
  const auto pinned = cpu_isa::pin_path();  // one ISA path for the whole call (cpu_isa.h)
  const auto acc_dtype = q_in.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const std::vector<int64_t> out_shape{sz.B, sz.N, sz.Dv}, row_shape{sz.B, sz.N}, scores_shape{sz.B, sz.N, sz.M};
  // The forward's empty [0] scores (save_scores off) mean none, as an absent argument does.
  const bool has_scores = scores_in.has_value() && scores_in->defined() &&
                          !(scores_in->dim() == 1 && scores_in->size(0) == 0);
  // Device and dtype of the saved tensors and gradients, before any of them is read.
  const std::pair<const char*, const at::Tensor*> others[] = {
      {"grad_out", &grad_out_in}, {"out", &out_in}, {"lse", &lse_in},
      {"grad_lse", grad_lse_in.has_value() && grad_lse_in->defined() ? &*grad_lse_in : nullptr},
      {"scores", has_scores ? &*scores_in : nullptr}};
  for (const auto& [name, t] : others) {
    if (t == nullptr) continue;
    TORCH_CHECK(t->device().is_cpu(), "fastvid.nonlocal_attention_backward: ", name,
                " must be a CPU tensor like q, got ", t->device());
    TORCH_CHECK(at::isFloatingType(t->scalar_type()), "fastvid.nonlocal_attention_backward: ", name,
                " must be floating point, got ", t->scalar_type());
  }
  TORCH_CHECK(out_in.scalar_type() == q_in.scalar_type(), "fastvid.nonlocal_attention_backward: out must have q's dtype ",
              q_in.scalar_type(), ", got ", out_in.scalar_type());
  TORCH_CHECK(grad_out_in.sizes() == out_shape && out_in.sizes() == out_shape, "fastvid.nonlocal_attention_backward: ",
              "grad_out and out must be ", c10::IntArrayRef(out_shape), ", got ", grad_out_in.sizes(), " and ",
              out_in.sizes());
  TORCH_CHECK(lse_in.sizes() == row_shape && lse_in.scalar_type() == acc_dtype,
              "fastvid.nonlocal_attention_backward: lse must be ", c10::IntArrayRef(row_shape), " ", acc_dtype,
              ", got ", lse_in.sizes(), " ", lse_in.scalar_type());
  if (has_scores)
    TORCH_CHECK(scores_in->sizes() == scores_shape && scores_in->scalar_type() == acc_dtype,
                "fastvid.nonlocal_attention_backward: scores must be ", c10::IntArrayRef(scores_shape), " ", acc_dtype,
                " (as nonlocal_attention returned them with save_scores), got ", scores_in->sizes(), " ",
                scores_in->scalar_type());
  const at::Tensor q = as_operand_layout(q_in), k = as_operand_layout(k_in), v = as_operand_layout(v_in);
  const at::Tensor grad_out = as_operand_layout(grad_out_in.to(q.scalar_type()));
  const at::Tensor scores = has_scores ? scores_in->contiguous() : at::Tensor();
  const at::Tensor out = out_in.contiguous(), lse = lse_in.contiguous();
  at::Tensor grad_lse;
  if (grad_lse_in.has_value() && grad_lse_in->defined()) {
    TORCH_CHECK(grad_lse_in->sizes() == row_shape, "fastvid.nonlocal_attention_backward: grad_lse must be ",
                c10::IntArrayRef(row_shape), ", got ", grad_lse_in->sizes());
    grad_lse = grad_lse_in->to(acc_dtype).contiguous();
  }
  at::Tensor grad_q = cpu_block_cache::empty({sz.B, sz.N, sz.D}, q.options());
  at::Tensor grad_k = cpu_block_cache::empty({sz.B, sz.M, sz.D}, q.options());
  at::Tensor grad_v = cpu_block_cache::empty({sz.B, sz.M, sz.Dv}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, q.scalar_type(), "nonlocal_attention_backward_cpu", [&] {
    backward_kernel<scalar_t>(grad_out, grad_lse.defined() ? &grad_lse : nullptr, q, k, v, out, lse,
                              has_scores ? &scores : nullptr, scale, sz,
                              grad_q, grad_k, grad_v);
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastvid, CPU, m) {
  m.impl("nonlocal_attention", &nonlocal_attention_cpu);
  m.impl("nonlocal_attention_backward", &nonlocal_attention_backward_cpu);
}

// No tensor arguments: a CompositeImplicitAutograd kernel serves every call.
TORCH_LIBRARY_IMPL(fastvid, CompositeImplicitAutograd, m) {
  m.impl("_attention_cpu_tile", [] { return std::vector<int64_t>{kQueryBlock, kKeyBlock}; });
}

}  // namespace attention
}  // namespace fastvid
