// CPU depthwise 3D conv kernels for NCDHW tensors with channel multiplier 1, vectorised along W.
//
// Every (b, c) is an independent 3D correlation of one channel with its own kT×kH×kW kernel. The
// source rows a task reads (input rows for the forward and weight gradient, grad_output rows for
// the input gradient) are first copied into scratch in the accumulation type, zero-extended on both
// sides along W and split into `s` phase rows for W stride s (phase r holds every s-th element from
// r on). Then every W tap is a contiguous, unaligned vector load at a fixed shift and the zero
// padding needs no tests in the inner loops:
//   forward:        out[ow] = bias + Σ_taps w[kt,kh,kw] · X_row[phase (kw·d)%s][ow + (kw·d)/s]
//   input gradient: with stride 1, the forward with the kernel flipped (flipped_geometry); else
//                   gi[q·s + r] = Σ_{taps with (r + p - kw·d) % s == 0} w · G_row[q + (r + p - kw·d)/s]
//                   (a gather per residue r of the input index: no two tasks write one element)
//   weight gradient: gw[tap] = Σ_rows Σ_ow go[ow] · X_row[...] (per (kt, kh): kW register
//                   accumulators over all rows of an output plane), gb = Σ go.
// Rows along T and H never need padding: taps that fall outside are skipped per row.
// Scratch planes are cached per task by source depth index (a ring of as many planes as one output
// or input plane reads), so consecutive planes of one channel reuse them.
// Weight/bias gradient: one partial sum per (b, c, ot-chunk) unit, added in a fixed order at the end
// (bit-identical results whatever the thread count). bf16/fp16 accumulate in fp32 in the same order
// as fp32; stores round to nearest even (store_vec / c10 conversions).
// Everything below is compiled once per ISA path (cpu_isa.h); the entry points at the top pick one.
// The vector width (and so the scratch row padding and the weight gradient's lane partial sums) is
// the path's own: results may differ between paths in the last bits, never between thread counts.
#include "depthwise3d_kernels.h"
#include "depthwise3d_math.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "../cpu_isa.h"
#include "../fastvid_common.h"

#ifdef FASTVID_ISA_X86
#include <immintrin.h>  // the AVX-512 forward's lane shifts and masked stores
#endif

#ifndef FASTVID_ISA
#define FASTVID_ISA_SOURCE "depthwise3d/depthwise3d_ncdhw_cpu.cpp"
#include "../cpu_isa_each.h"

namespace fastvid {
namespace depthwise3d {
void forward_ncdhw_cpu(const ForwardArgs& args) { FASTVID_ISA_CALL(depthwise3d, forward_ncdhw(args)); }
void input_grad_ncdhw_cpu(const InputGradArgs& args) { FASTVID_ISA_CALL(depthwise3d, input_grad_ncdhw(args)); }
void weight_grad_ncdhw_cpu(const WeightGradArgs& args) { FASTVID_ISA_CALL(depthwise3d, weight_grad_ncdhw(args)); }
}  // namespace depthwise3d
}  // namespace fastvid

#else  // ------------------------------------------------ one ISA path: namespace FASTVID_ISA
#include "depthwise3d_cpu_vec.h"

namespace fastvid {
namespace depthwise3d {
namespace FASTVID_ISA {
namespace {

using cpu::load_vec;
using cpu::store_vec;
using cpu::Vec;

#ifndef FASTVID_INLINE
#define FASTVID_INLINE __attribute__((always_inline)) inline
#endif

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }
int64_t ceil_div(int64_t n, int64_t m) { return (n + m - 1) / m; }

// Output positions [begin, end) along one dim whose tap k reads an input index inside [0, in).
struct Range {
  int64_t begin, end;
};
Range valid_outputs(int64_t k, int64_t stride, int64_t padding, int64_t dilation, int64_t in, int64_t out) {
  const int64_t lo = padding - k * dilation, hi = in - 1 + padding - k * dilation;
  if (hi < 0) return {0, 0};
  const int64_t begin = lo <= 0 ? 0 : ceil_div(lo, stride);
  const int64_t end = std::min<int64_t>(out, hi / stride + 1);
  return {begin, std::max(begin, end)};
}

// Scratch layout of one source row: `phases` phase rows of phase_len values each,
// row[r·phase_len + i] = src[i·phases + r - left] (0 outside [0, n)).
struct RowLayout {
  int64_t phases = 1, phase_len = 0, left = 0;
  int64_t size() const { return phases * phase_len; }
};

// One chunk of 2·LT source values (VT: LT floats) split into its even and odd values, stored at dst and
// dst + len (the two phases of a stride-2 scratch row).
template <typename VT, typename scalar_t, size_t... l>
FASTVID_INLINE void split_chunk(const scalar_t* src, float* dst, int64_t len, std::index_sequence<l...>) {
  constexpr int64_t LT = sizeof...(l);
  const VT a = load_vec<VT>(src), b = load_vec<VT>(src + LT);
  store_vec(dst, VT(__builtin_shufflevector(a, b, (2 * l)...)));
  store_vec(dst + len, VT(__builtin_shufflevector(a, b, (2 * l + 1)...)));
}
// The chunks of one row of n source values (zero-extended by `left`) into the two phases of len values:
// chunks start at even m = source index + left, read source [m - left, m - left + 2·LT) and write
// [m / 2, m / 2 + LT) of both phases; the last one ends where the vectors can reach (overlapping the one
// before). Returns the range of m covered, empty where no chunk fits.
template <typename VT, typename scalar_t>
FASTVID_INLINE Range split_two_phases(const scalar_t* src, int64_t n, int64_t left, int64_t len, float* dst) {
  constexpr int64_t LT = sizeof(VT) / sizeof(float);
  const int64_t first = left + (left & 1), last = std::min(n + left - 2 * LT, 2 * (len - LT)) & ~int64_t(1);
  if (first > last) return {0, 0};
  for (int64_t m0 = first; m0 < last; m0 += 2 * LT)
    split_chunk<VT>(src + m0 - left, dst + m0 / 2, len, std::make_index_sequence<LT>{});
  split_chunk<VT>(src + last - left, dst + last / 2, len, std::make_index_sequence<LT>{});
  return {first, last + 2 * LT};
}

// `rows` source rows of n values (row h at src + h·n) into scratch rows dst + h·dst_stride laid out as
// `layout`. Only the values are written: the zero padding around them is at the same
// places in every row a scratch buffer holds, so the buffer is zeroed once (PlaneCache::init, the
// weight gradient's go_plane) and never written there (the per-row fills were ~5 % of the forward).
// One-phase rows of at least one vector are copied as whole vectors, the last one ending at the row's
// end (overlapping the one before: the same values stored twice): GCC had turned the element loop
// into a memcpy call per row, which made the plane copy cost ~3x the FMA-free remainder of a
// forward unit (4x96x8x28^2: ~0.2 of 1.0-1.2 ms at two threads).
template <typename scalar_t, typename acc_t>
FASTVID_INLINE void build_rows(const scalar_t* src, int64_t rows, int64_t n, const RowLayout& layout, acc_t* dst,
                               int64_t dst_stride) {
  if (layout.phases == 1) {
    using V = typename Vec<acc_t>::type;
    constexpr int L = Vec<acc_t>::lanes;
    const int64_t left = std::min(layout.left, layout.phase_len);
    const int64_t count = std::max<int64_t>(0, std::min(n, layout.phase_len - left));
    dst += left;
    for (int64_t h = 0; h < rows; ++h, src += n, dst += dst_stride) {
      if (count < L) {
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          if (2 * count >= L) {  // two half vectors, the second ending at the row's end (12-15 wide at 16 lanes)
            std::memcpy(dst, src, L / 2 * sizeof(acc_t));
            std::memcpy(dst + count - L / 2, src + count - L / 2, L / 2 * sizeof(acc_t));
            continue;
          }
        }
        for (int64_t i = 0; i < count; ++i) dst[i] = static_cast<acc_t>(src[i]);  // (a memcpy call per row)
        continue;
      }
      int64_t i = 0;
      for (; i + L <= count; i += L) store_vec(dst + i, load_vec<V>(src + i));
      if (i < count) store_vec(dst + count - L, load_vec<V>(src + count - L));
    }
    return;
  }
  // Several phases (W stride s): source value j goes to phase (j + left) % s at index (j + left) / s,
  // m = j + left below. For s = 2 (the stride-2 convs of X3D and its kin) whole vectors of 2·L source values
  // are split into the two phases by two shuffles (split_two_phases; half vectors where a row is too short
  // for whole ones), the rest value by value with the phase and index stepped, not divided: the per-value
  // loop with a division each was ~45 % of the 4x48x8x56^2 stride-2 forward's samples and ~55 % of the
  // 4x96x8x28^2 one's on the AVX-512 path, whose 28-value rows were too short for a 16-lane chunk (perf,
  // one thread).
  const int64_t s = layout.phases, len = layout.phase_len, left = layout.left;
  const int64_t m_end = std::min(n + left, s * len);
  for (int64_t h = 0; h < rows; ++h, src += n, dst += dst_stride) {
    int64_t m = left, vector_begin = m_end, vector_end = m_end;
    if constexpr (std::is_same_v<acc_t, float>) {
      if (s == 2) {
        using Half = float __attribute__((vector_size(cpu::kVecBytes / 2)));
        Range covered = split_two_phases<typename Vec<acc_t>::type>(src, n, left, len, dst);
        if (covered.begin == covered.end) covered = split_two_phases<Half>(src, n, left, len, dst);
        if (covered.begin < covered.end) vector_begin = covered.begin, vector_end = covered.end;
      }
    }
    int64_t q = m / s, r = m % s;  // m's index and phase
    for (; m < m_end; ++m) {
      if (m == vector_begin) {
        m = vector_end;
        if (m >= m_end) break;
        q = m / s, r = m % s;
      }
      dst[r * len + q] = static_cast<acc_t>(src[m - left]);
      if (++r == s) r = 0, ++q;
    }
  }
}

// Scratch copies of the source planes of one (b, c), `slots` planes kept, keyed by depth index.
// A plane is `rows` scratch rows: `top` zero rows, the source rows, then zero rows (so that rows
// along H need no bounds tests either).
template <typename acc_t>
struct PlaneCache {
  int64_t rows = 0, top = 0, slots = 1;
  RowLayout layout;
  std::vector<acc_t> data;
  acc_t* base = nullptr;       // data's first 64-byte aligned element: the planes start there
  std::vector<int64_t> owner;  // depth index held by each slot, -1: none
  int64_t channel = -1;        // b·C + c the slots belong to

  void init(int64_t rows_, int64_t top_, const RowLayout& layout_, int64_t slots_) {
    rows = rows_, top = top_, layout = layout_, slots = slots_;
    data.assign(slots * rows * layout.size() + 64 / sizeof(acc_t), acc_t(0));
    base = reinterpret_cast<acc_t*>((reinterpret_cast<uintptr_t>(data.data()) + 63) & ~uintptr_t(63));
    owner.assign(slots, -1);
  }
  // The scratch plane for depth index `depth` of channel `bc` (src_rows rows of W values at `src`).
  template <typename scalar_t>
  const acc_t* plane(int64_t bc, int64_t depth, const scalar_t* src, int64_t src_rows, int64_t W) {
    if (bc != channel) std::fill(owner.begin(), owner.end(), -1), channel = bc;
    const int64_t slot = depth % slots;
    acc_t* dst = base + slot * rows * layout.size();
    if (owner[slot] != depth) {
      // The padding rows (outside [top, top + src_rows)) are the same rows in every plane: zero since init.
      const int64_t h0 = std::max<int64_t>(0, -top), h1 = std::min(src_rows, rows - top);
      if (h1 > h0) build_rows(src + h0 * W, h1 - h0, W, layout, dst + (top + h0) * layout.size(), layout.size());
      owner[slot] = depth;
    }
    return dst;
  }
};

#if defined(FASTVID_ISA_X86) && FASTVID_VEC_BYTES >= 32
// p[0, n) = the first n lanes of v (0 < n < lanes), the other lanes' memory untouched.
template <typename V>
FASTVID_INLINE void masked_store(float* p, const V& v, int64_t n) {
#if FASTVID_VEC_BYTES == 64
  _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), (__m512)v);
#else
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  _mm256_maskstore_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(int(n)), lane), (__m256)v);
#endif
}
#endif

constexpr int kMaxTaps = 7 * 7 * 7;
constexpr int kGroupRows = 4;  // output rows computed together (independent accumulator chains)

template <int NV, int R, typename V, typename scalar_t>
FASTVID_INLINE void store_block(const V (&a)[R][NV], int64_t q0, int64_t count, int64_t last, scalar_t* const* out,
                                int64_t out_step);

// Offset from q0 of a block's vector j: j·L, the last one at `last` (see last_vector).
template <int NV, int L>
FASTVID_INLINE int64_t vector_offset(int j, int64_t last) { return j == NV - 1 ? last : int64_t(j) * L; }

// Where a block of `count` positions (count <= NV·L) puts its last vector: where it ends at the
// block's end (count - L, overlapping the vector before it, or a block before it for NV = 1,
// `back` positions being available before q0), so that every store is a whole vector; else at
// (NV - 1)·L with a partial store. On Intel (Emerald Rapids) the partial store (a stack copy and
// 8-byte pieces) stalled on store forwarding: ~20 % of the 4x96x8x28^2 forward's samples (perf).
// The overlapped positions are computed twice with the same taps in the same order: equal values.
template <int NV, int L>
FASTVID_INLINE int64_t last_vector(int64_t count, int64_t back, int64_t out_step) {
  const bool whole = out_step == 1 && count + back >= L && count > (NV - 1) * L;
  return whole ? count - L : int64_t(NV - 1) * L;
}

// out[r][q·out_step] = init + Σ_t w[t]·(src[t] + row_offset[r])[q] for R rows and positions
// [q0, q0 + count), count <= NV·L, the block's vectors at vector_offset (last: last_vector); every
// source is readable for whole vectors. The R·NV accumulators stay in registers across the taps; each
// weight is broadcast once per tap for all rows.
template <int NV, int R, typename scalar_t, typename acc_t>
FASTVID_INLINE void stencil_block(int64_t q0, int64_t count, int64_t last, int64_t taps, const acc_t* const* src,
                                  const acc_t* w, const int64_t* row_offset, acc_t init, scalar_t* const* out,
                                  int64_t out_step) {
  using V = typename Vec<acc_t>::type;
  constexpr int L = Vec<acc_t>::lanes;
  V a[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) a[r][j] = init - V{};
  for (int64_t t = 0; t < taps; ++t) {
    const V wt = w[t] - V{};  // broadcast (w - 0 == w for every w, -0 included)
    const acc_t* s = src[t] + q0;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) a[r][j] += load_vec<V>(s + row_offset[r] + vector_offset<NV, L>(j, last)) * wt;
  }
  store_block<NV, R>(a, q0, count, last, out, out_step);
}

// Stores the accumulators of stencil_block: positions [q0, q0 + count) of R rows.
template <int NV, int R, typename V, typename scalar_t>
FASTVID_INLINE void store_block(const V (&a)[R][NV], int64_t q0, int64_t count, int64_t last, scalar_t* const* out,
                                int64_t out_step) {
  using acc_t = std::remove_cv_t<std::remove_reference_t<decltype(a[0][0][0])>>;
  constexpr int L = Vec<acc_t>::lanes;
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) {
      const int64_t offset = vector_offset<NV, L>(j, last), q = q0 + offset;
      const int64_t n = std::min<int64_t>(L, count - offset);
      if (n <= 0) break;
      if (out_step == 1 && n == L) {
        store_vec(out[r] + q, a[r][j]);
        continue;
      }
#if defined(FASTVID_ISA_X86) && FASTVID_VEC_BYTES >= 32
      if constexpr (std::is_same_v<scalar_t, float>) {
        // A masked store (every row of a 14x14 plane is one partial vector at 16 lanes).
        if (out_step == 1) {
          masked_store(out[r] + q, a[r][j], n);
          continue;
        }
      }
#endif
      {
        // A copy, not a[r][j]'s address: an address-taken accumulator array is kept on the stack, and
        // every FMA into it stored there (OW = 28 at 16 lanes: half the blocks of the forward).
        const V v = a[r][j];
        acc_t tmp[L];
        std::memcpy(tmp, &v, sizeof tmp);
        for (int64_t l = 0; l < n; ++l) out[r][(q + l) * out_step] = static_cast<scalar_t>(tmp[l]);
      }
    }
  }
}

// The forward's kernel height 3 with H stride = dilation = 1 (X3D's case): input row i of a group of R
// output rows feeds rows i - kh, so each source vector is loaded once for up to 3 FMAs instead of
// once per FMA. The taps are stencil_block's list for the group's first row, in order (kt, kh, kw):
// `groups` kt groups of 3·kW; row r reads src + row_offset0 + r·row_size.
template <int NV, int R, typename scalar_t, typename acc_t>
FASTVID_INLINE void stencil_block_h3(int64_t q0, int64_t count, int64_t last, int64_t groups, int64_t kW,
                                     const acc_t* const* src,
                                     const acc_t* w, int64_t row_offset0, int64_t row_size, acc_t init,
                                     scalar_t* const* out) {
  using V = typename Vec<acc_t>::type;
  constexpr int L = Vec<acc_t>::lanes, KH = 3;
  V a[R][NV];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) a[r][j] = init - V{};
  for (int64_t t = 0; t < groups; ++t) {
    for (int64_t kw = 0; kw < kW; ++kw) {
      const int64_t n0 = t * KH * kW + kw;
      V wv[KH];
#pragma GCC unroll 4
      for (int kh = 0; kh < KH; ++kh) wv[kh] = w[n0 + kh * kW] - V{};
      const acc_t* s = src[n0] + row_offset0 + q0;
#pragma GCC unroll 8
      for (int i = 0; i < R + KH - 1; ++i) {
        // Empty asm: one load per vector kept in a register (not folded into each FMA), and one
        // walking pointer rather than an offset register per row.
        V xv[NV];
#pragma GCC unroll 4
        for (int j = 0; j < NV; ++j) {
          xv[j] = load_vec<V>(s + vector_offset<NV, L>(j, last));
          asm("" : "+v"(xv[j]));
        }
        s += row_size;
        asm("" : "+r"(s));
#pragma GCC unroll 4
        for (int kh = 0; kh < KH; ++kh) {
          const int r = i - kh;
          if (r < 0 || r >= R) continue;
#pragma GCC unroll 4
          for (int j = 0; j < NV; ++j) a[r][j] += xv[j] * wv[kh];
        }
      }
    }
  }
  store_block<NV, R>(a, q0, count, last, out, 1);
}

template <int R, typename scalar_t, typename acc_t>
FASTVID_INLINE void stencil_rows_h3(int64_t n, int64_t groups, int64_t kW, const acc_t* const* src, const acc_t* w,
                                    int64_t row_offset0, int64_t row_size, acc_t init, scalar_t* const* out) {
  constexpr int L = Vec<acc_t>::lanes;
  int64_t q = 0;
  for (; q + 2 * L <= n; q += 2 * L)
    stencil_block_h3<2, R>(q, 2 * L, L, groups, kW, src, w, row_offset0, row_size, init, out);
  if (n - q > L)
    stencil_block_h3<2, R>(q, n - q, last_vector<2, L>(n - q, q, 1), groups, kW, src, w, row_offset0, row_size, init,
                           out);
  else if (n > q)
    stencil_block_h3<1, R>(q, n - q, last_vector<1, L>(n - q, q, 1), groups, kW, src, w, row_offset0, row_size, init,
                           out);
}

template <int R, typename scalar_t, typename acc_t>
FASTVID_INLINE void stencil_rows_r(int64_t n, int64_t taps, const acc_t* const* src, const acc_t* w,
                                   const int64_t* row_offset, acc_t init, scalar_t* const* out, int64_t out_step) {
  constexpr int L = Vec<acc_t>::lanes;
  int64_t q = 0;
  for (; q + 2 * L <= n; q += 2 * L) stencil_block<2, R>(q, 2 * L, L, taps, src, w, row_offset, init, out, out_step);
  if (n - q > L)
    stencil_block<2, R>(q, n - q, last_vector<2, L>(n - q, q, out_step), taps, src, w, row_offset, init, out, out_step);
  else if (n > q)
    stencil_block<1, R>(q, n - q, last_vector<1, L>(n - q, q, out_step), taps, src, w, row_offset, init, out, out_step);
}

// `rows` rows (any count) of n positions sharing one tap list, row r reading at row_offset[r].
template <typename scalar_t, typename acc_t>
FASTVID_INLINE void stencil_rows(int64_t rows, int64_t n, int64_t taps, const acc_t* const* src, const acc_t* w,
                                 const int64_t* row_offset, acc_t init, scalar_t* const* out, int64_t out_step) {
  int64_t r = 0;
  for (; r + kGroupRows <= rows; r += kGroupRows)
    stencil_rows_r<kGroupRows>(n, taps, src, w, row_offset + r, init, out + r, out_step);
  switch (rows - r) {
    case 1: stencil_rows_r<1>(n, taps, src, w, row_offset + r, init, out + r, out_step); break;
    case 2: stencil_rows_r<2>(n, taps, src, w, row_offset + r, init, out + r, out_step); break;
    case 3: stencil_rows_r<3>(n, taps, src, w, row_offset + r, init, out + r, out_step); break;
    default: break;
  }
}

// ------------------------------------------------------------------------ forward
#if FASTVID_VEC_BYTES == 64
using V16 = Vec<float>::type;

// Lanes [K, K + 16) of the 32 lanes lo:hi: one valignd. (The masked form only because GCC 12 warns
// about the unmasked one's undefined pass-through; __builtin_shufflevector became vpermi2ps here.)
template <int K>
FASTVID_INLINE V16 lanes_from(V16 lo, V16 hi) {
  const __m512i l = (__m512i)lo, h = (__m512i)hi;
  return (V16)_mm512_mask_alignr_epi32(l, static_cast<__mmask16>(0xFFFF), h, l, K);
}

// The fp32 forward for kernel 3×3 along H, W with stride and dilation 1 (X3D's case) on AVX-512: the
// scratch rows are 64-byte aligned and padded to whole vectors, so each source row is aligned loads
// (A0, A1, A2 at q, q + 16, q + 32) and the W taps 1 and 2 are lane shifts of them instead of unaligned
// loads, nearly all of which straddle two cache lines. A block is NV vectors from q; where the row ends,
// its last vector is stored with a mask. FMA order per output: (kt, kh, kw), as stencil_block.
template <int NV, int R>
FASTVID_INLINE void stencil_block_h3k3_aligned(int64_t q, int64_t count, int64_t groups, const float* const* src,
                                               const float* w, int64_t row_offset0, int64_t row_size, float init,
                                               float* const* out) {
  constexpr int KH = 3, KW = 3;
  V16 a[R][NV];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 2
    for (int j = 0; j < NV; ++j) a[r][j] = init - V16{};
  for (int64_t t = 0; t < groups; ++t) {
    V16 wv[KH][KW];
#pragma GCC unroll 4
    for (int kh = 0; kh < KH; ++kh)
#pragma GCC unroll 4
      for (int kw = 0; kw < KW; ++kw) wv[kh][kw] = w[t * KH * KW + kh * KW + kw] - V16{};
    const float* s = src[t * KH * KW] + row_offset0 + q;
#pragma GCC unroll 16
    for (int i = 0; i < R + KH - 1; ++i) {
      V16 A[NV + 1], x[NV][KW];
#pragma GCC unroll 4
      for (int j = 0; j <= NV; ++j) A[j] = load_vec<V16>(s + 16 * j);
#pragma GCC unroll 2
      for (int j = 0; j < NV; ++j) x[j][0] = A[j], x[j][1] = lanes_from<1>(A[j], A[j + 1]),
                                   x[j][2] = lanes_from<2>(A[j], A[j + 1]);
      s += row_size;
#pragma GCC unroll 4
      for (int kh = 0; kh < KH; ++kh) {
        const int r = i - kh;
        if (r < 0 || r >= R) continue;
#pragma GCC unroll 4
        for (int kw = 0; kw < KW; ++kw)
#pragma GCC unroll 2
          for (int j = 0; j < NV; ++j) a[r][j] += x[j][kw] * wv[kh][kw];
      }
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 2
    for (int j = 0; j < NV; ++j) {
      const int64_t n = count - 16 * j;
      if (n >= 16)
        store_vec(out[r] + q + 16 * j, a[r][j]);
      else
        masked_store(out[r] + q + 16 * j, a[r][j], n);
    }
  }
}

template <int R>
FASTVID_INLINE void stencil_rows_h3k3_aligned(int64_t n, int64_t groups, const float* const* src, const float* w,
                                              int64_t row_offset0, int64_t row_size, float init, float* const* out) {
  int64_t q = 0;
  for (; n - q > 16; q += 32)
    stencil_block_h3k3_aligned<2, R>(q, std::min<int64_t>(32, n - q), groups, src, w, row_offset0, row_size, init,
                                     out);
  if (n > q) stencil_block_h3k3_aligned<1, R>(q, n - q, groups, src, w, row_offset0, row_size, init, out);
}
#endif

// Whether the forward runs stencil_rows_h3k3_aligned (fp32, AVX-512, kernel 3 along H and W, H and W
// stride and dilation 1, output rows longer than one vector: at 14x14 and 7x7 it measured 5-15 % slower
// than stencil_rows_h3, one thread).
template <typename scalar_t>
bool forward_h3k3_aligned(const Geometry& g) {
  return FASTVID_VEC_BYTES == 64 && std::is_same_v<scalar_t, float> && g.kernel[1] == 3 && g.kernel[2] == 3 &&
         g.stride[1] == 1 && g.stride[2] == 1 && g.dilation[1] == 1 && g.dilation[2] == 1 && g.out[2] > 16;
}

RowLayout forward_row_layout(const Geometry& g, int lanes, bool aligned = false) {
  RowLayout l;
  l.phases = g.stride[2];
  l.left = g.padding[2];
  // stencil_rows_h3k3_aligned: whole vectors per row, three of them readable from each block's start.
  l.phase_len = aligned ? round_up(g.out[2], 2 * lanes) + lanes
                        : round_up(g.out[2], lanes) + (g.kernel[2] - 1) * g.dilation[2] / g.stride[2] + 1;
  return l;
}

// Scratch rows of the forward / weight-gradient input planes: `top` = H padding, enough rows for
// every output row's taps.
int64_t forward_plane_rows(const Geometry& g) {
  return std::max<int64_t>(g.padding[1] + g.in[1], (g.out[1] - 1) * g.stride[1] + (g.kernel[1] - 1) * g.dilation[1] + 1);
}

// What the forward decides once per call: whether stencil_rows_h3k3_aligned runs (and so the scratch
// row layout), and the offset of each W tap kw in a scratch row (its phase row, then its shift). The
// offsets were an array stored at each unit's start, which GCC then loaded in pairs as one vector: a
// store-forwarding stall, ~7 % of the forward's samples.
struct ForwardPlan {
  bool aligned = false;
  RowLayout layout;
  int64_t kw_offset[7] = {};
};

template <typename scalar_t>
ForwardPlan forward_plan(const Geometry& g) {
  ForwardPlan p;
  p.aligned = forward_h3k3_aligned<scalar_t>(g);
  p.layout = forward_row_layout(g, Vec<at::opmath_type<scalar_t>>::lanes, p.aligned);
  for (int64_t kw = 0; kw < g.kernel[2]; ++kw) {
    const int64_t shift = kw * g.dilation[2];
    p.kw_offset[kw] = (shift % g.stride[2]) * p.layout.phase_len + shift / g.stride[2];
  }
  return p;
}

// Output plane out[b, c, ot, :, :].
template <typename scalar_t>
void forward_plane(const Geometry& g, const ForwardPlan& plan, const scalar_t* input,
                   const at::opmath_type<scalar_t>* w, at::opmath_type<scalar_t> bias,
                   PlaneCache<at::opmath_type<scalar_t>>& cache, int64_t bc, int64_t ot, scalar_t* out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = g.in[0], H = g.in[1], W = g.in[2], OH = g.out[1], OW = g.out[2];
  const int64_t kT = g.kernel[0], kH = g.kernel[1], kW = g.kernel[2];
  const int64_t row_size = cache.layout.size();
  // Tap list of output row 0 (scratch row oh·sH + kh·dH for row oh: the top rows are the H padding).
  const acc_t* src[kMaxTaps];
  acc_t wt[kMaxTaps];
  int64_t n = 0;
  for (int64_t kt = 0; kt < kT; ++kt) {
    const int64_t it = ot * g.stride[0] - g.padding[0] + kt * g.dilation[0];
    if (it < 0 || it >= T) continue;
    const acc_t* plane = cache.plane(bc, it, input + (bc * T + it) * H * W, H, W);
    for (int64_t kh = 0; kh < kH; ++kh) {
      for (int64_t kw = 0; kw < kW; ++kw, ++n) {
        src[n] = plane + kh * g.dilation[1] * row_size + plan.kw_offset[kw];
        wt[n] = w[(kt * kH + kh) * kW + kw];
      }
    }
  }
  const bool h3 = kH == 3 && g.stride[1] == 1 && g.dilation[1] == 1;
  // Software prefetch of the input planes the next unit copies and this one does not hold ((bc, ot + 1)'s
  // planes after this unit's last, or all planes of the next channel's first unit), a slice per row
  // group: on Intel (Emerald Rapids: L3 over a high-latency mesh) the scratch-plane copy of each new
  // plane stalled on its loads (~1/3 of forward_plane's perf samples) although the reads are sequential.
  const int64_t reach = (kT - 1) * g.dilation[0], OT = g.out[0];
  const int64_t it_last = std::min(T - 1, ot * g.stride[0] - g.padding[0] + reach);
  const bool next_channel = ot + 1 == OT;
  const int64_t next_first = next_channel ? std::max<int64_t>(0, -g.padding[0]) : it_last + 1;
  const int64_t next_last = std::min(T - 1, (next_channel ? 0 : ot + 1) * g.stride[0] - g.padding[0] + reach);
  const int64_t total = g.batch * g.channels * T * H * W;
  const int64_t next_bc = next_channel ? bc + 1 : bc;
  const int64_t pf_begin = std::min(total, (next_bc * T + next_first) * H * W);
  const int64_t pf_end = std::min(total, (next_bc * T + std::max(next_first, next_last + 1)) * H * W);
  const char* pf = reinterpret_cast<const char*>(input + pf_begin);
  const int64_t pf_lines = ceil_div((pf_end - pf_begin) * int64_t(sizeof(scalar_t)), 64);
  const int64_t pf_step = ceil_div(pf_lines, ceil_div(OH, kGroupRows));
  const bool has_next_unit = bc * OT + ot + 1 < g.batch * g.channels * OT;
  int64_t row_offset[kGroupRows];
  scalar_t* outs[kGroupRows];
  for (int64_t oh0 = 0; oh0 < OH; oh0 += kGroupRows) {
    const int64_t rows = std::min<int64_t>(kGroupRows, OH - oh0);
    const int64_t line0 = oh0 / kGroupRows * pf_step;
    for (int64_t i = line0; i < std::min(pf_lines, line0 + pf_step); ++i) __builtin_prefetch(pf + i * 64, 0, 3);
    // The same rows of the next unit's output plane (the next in memory), to be written: their misses (a
    // new output is in no cache) are under way before the stores.
    if (has_next_unit) {
      const char* next_out = reinterpret_cast<const char*>(out + (OH + oh0) * OW);
      for (int64_t b = 0; b < rows * OW * int64_t(sizeof(scalar_t)); b += 64) __builtin_prefetch(next_out + b, 1, 3);
    }
    for (int64_t r = 0; r < rows; ++r) {
      row_offset[r] = (oh0 + r) * g.stride[1] * row_size;
      outs[r] = out + (oh0 + r) * OW;
    }
#if FASTVID_VEC_BYTES == 64
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (plan.aligned && rows == kGroupRows) {
        stencil_rows_h3k3_aligned<kGroupRows>(OW, n / 9, src, wt, row_offset[0], row_size, bias, outs);
        continue;
      }
    }
#endif
    if (h3 && rows == kGroupRows)
      stencil_rows_h3<kGroupRows>(OW, n / (3 * kW), kW, src, wt, row_offset[0], row_size, bias, outs);
    else
      stencil_rows(rows, OW, n, src, wt, row_offset, bias, outs, 1);
  }
}

template <typename scalar_t>
void forward_impl(const ForwardArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry& g = a.geo;
  const int64_t C = g.channels, OT = g.out[0], plane = g.out[1] * g.out[2];
  const int64_t units = g.batch * C * OT;
  if (units == 0 || plane == 0) return;
  const auto* input = static_cast<const scalar_t*>(a.input);
  const auto* weight = static_cast<const acc_t*>(a.weight);
  const auto* bias = static_cast<const acc_t*>(a.bias);
  auto* output = static_cast<scalar_t*>(a.output);
  const ForwardPlan plan = forward_plan<scalar_t>(g);
  const int64_t slots = (g.kernel[0] - 1) * g.dilation[0] + 1;
  at::parallel_for(0, units, std::max<int64_t>(1, 16384 / plane), [&](int64_t begin, int64_t end) {
    PlaneCache<acc_t> cache;
    cache.init(forward_plane_rows(g), g.padding[1], plan.layout, slots);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t bc = u / OT, ot = u % OT, c = bc % C;
      forward_plane<scalar_t>(g, plan, input, weight + c * g.taps(), bias != nullptr ? bias[c] : acc_t(0), cache, bc,
                              ot, output + u * plane);
    }
  });
}

// ------------------------------------------------------------------------ input gradient
// grad_output rows: one phase, zero-extended by `left` values so that every shift is >= 0.
RowLayout input_grad_row_layout(const Geometry& g, int lanes) {
  const int64_t s = g.stride[2], p = g.padding[2], reach = (g.kernel[2] - 1) * g.dilation[2];
  RowLayout l;
  l.phases = 1;
  l.left = reach > p ? ceil_div(reach - p, s) : 0;
  l.phase_len = l.left + round_up(ceil_div(g.in[2], s), lanes) + (s - 1 + p) / s + 1;
  return l;
}

// grad_output planes in scratch: `top` zero rows so that every (residue, kh) row shift is >= 0.
int64_t input_grad_plane_top(const Geometry& g) {
  const int64_t reach = (g.kernel[1] - 1) * g.dilation[1], p = g.padding[1];
  return reach > p ? ceil_div(reach - p, g.stride[1]) : 0;
}
int64_t input_grad_plane_rows(const Geometry& g) {
  return input_grad_plane_top(g) + std::max<int64_t>(g.out[1], (g.in[1] - 1 + g.padding[1]) / g.stride[1] + 1);
}

// W stride 2: the two residues rw = 0, 1 of R rows at pair positions [q, q + L) computed together
// (tap lists 0 and 1) and interleaved into two whole vectors, gi[2p] from residue 0 and gi[2p + 1] from
// residue 1; per residue alone every output vector was L stores of one value each. 4x48x8x56^2 with H and
// W stride 2, two threads: input gradient AVX-512 1.8-2.1 -> 1.1-1.2 ms, AVX2 2.8-3.1 -> 1.4.
template <int R, typename scalar_t>
FASTVID_INLINE void stencil_block_pair(int64_t q, int64_t taps0, const float* const* src0, const float* w0,
                                       int64_t taps1, const float* const* src1, const float* w1,
                                       const int64_t* row_offset, scalar_t* const* out) {
  using V = typename Vec<float>::type;
  constexpr int L = Vec<float>::lanes;
  V a0[R], a1[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) a0[r] = a1[r] = V{};
  for (int64_t t = 0; t < taps0; ++t) {
    const V wt = w0[t] - V{};
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) a0[r] += load_vec<V>(src0[t] + q + row_offset[r]) * wt;
  }
  for (int64_t t = 0; t < taps1; ++t) {
    const V wt = w1[t] - V{};
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) a1[r] += load_vec<V>(src1[t] + q + row_offset[r]) * wt;
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    store_vec(out[r] + 2 * q, __builtin_shuffle(a0[r], a1[r], cpu::kLow));
    store_vec(out[r] + 2 * q + L, __builtin_shuffle(a0[r], a1[r], cpu::kHigh));
  }
}

// Pair positions [0, pairs) of R rows (pairs >= L), the last block ending at `pairs` (overlapping the
// one before it: the same values stored twice).
template <int R, typename scalar_t>
FASTVID_INLINE void stencil_rows_pair(int64_t pairs, int64_t taps0, const float* const* src0, const float* w0,
                                      int64_t taps1, const float* const* src1, const float* w1,
                                      const int64_t* row_offset, scalar_t* const* out) {
  constexpr int L = Vec<float>::lanes;
  for (int64_t q = 0; q < pairs; q += L)
    stencil_block_pair<R>(std::min(q, pairs - L), taps0, src0, w0, taps1, src1, w1, row_offset, out);
}

// Input-gradient plane grad_input[b, c, it, :, :]: per residue (rh, rw) of (ih, iw) modulo the
// stride, one tap list for all its rows.
template <typename scalar_t>
void input_grad_plane(const Geometry& g, const scalar_t* grad_output,
                                         const at::opmath_type<scalar_t>* w,
                                         PlaneCache<at::opmath_type<scalar_t>>& cache, int64_t bc, int64_t it,
                                         scalar_t* gi) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int L = Vec<acc_t>::lanes;
  const int64_t H = g.in[1], W = g.in[2], OT = g.out[0], OH = g.out[1], OW = g.out[2];
  const int64_t kT = g.kernel[0], kH = g.kernel[1], kW = g.kernel[2];
  const int64_t sh = g.stride[1], ph = g.padding[1], dh = g.dilation[1];
  const int64_t sw = g.stride[2], pw = g.padding[2], dw = g.dilation[2];
  const int64_t row_size = cache.layout.size();
  const acc_t* planes[7];
  for (int64_t kt = 0; kt < kT; ++kt) {
    int64_t ot;
    planes[kt] = output_index(it, kt, g.stride[0], g.padding[0], g.dilation[0], OT, &ot)
                     ? cache.plane(bc, ot, grad_output + (bc * OT + ot) * OH * OW, OH, OW)
                     : nullptr;
  }
  // The taps of residue (rh, rw): source pointers and weights, returns their count.
  auto residue_taps = [&](int64_t rh, int64_t rw, const acc_t** src, acc_t* wt) {
    int64_t n = 0;
    for (int64_t kt = 0; kt < kT; ++kt) {
      if (planes[kt] == nullptr) continue;
      for (int64_t kh = 0; kh < kH; ++kh) {
        const int64_t num_h = rh + ph - kh * dh;
        if (((num_h % sh) + sh) % sh != 0) continue;
        const acc_t* row = planes[kt] + (cache.top + num_h / sh) * row_size + cache.layout.left;
        for (int64_t kw = 0; kw < kW; ++kw) {
          const int64_t num_w = rw + pw - kw * dw;
          if (((num_w % sw) + sw) % sw != 0) continue;
          src[n] = row + num_w / sw;
          wt[n++] = w[(kt * kH + kh) * kW + kw];
        }
      }
    }
    return n;
  };
  const acc_t* src[kMaxTaps];
  acc_t wt[kMaxTaps];
  const acc_t* src1[kMaxTaps];
  acc_t wt1[kMaxTaps];
  int64_t row_offset[kGroupRows];
  scalar_t* outs[kGroupRows];
  const int64_t pairs = W / 2;
  for (int64_t rh = 0; rh < std::min(sh, H); ++rh) {
    const int64_t rows = ceil_div(H - rh, sh);
    if constexpr (std::is_same_v<acc_t, float>) {
      if (sw == 2 && pairs >= L) {
        const int64_t n0 = residue_taps(rh, 0, src, wt), n1 = residue_taps(rh, 1, src1, wt1);
        // An odd W's last column: residue 0 at position `pairs`.
        const acc_t* last_src[kMaxTaps];
        for (int64_t t = 0; t < n0; ++t) last_src[t] = src[t] + pairs;
        for (int64_t i0 = 0; i0 < rows; i0 += kGroupRows) {
          const int64_t count = std::min<int64_t>(kGroupRows, rows - i0);
          for (int64_t r = 0; r < count; ++r) {
            row_offset[r] = (i0 + r) * row_size;
            outs[r] = gi + (rh + (i0 + r) * sh) * W;
          }
          switch (count) {
            case 1: stencil_rows_pair<1>(pairs, n0, src, wt, n1, src1, wt1, row_offset, outs); break;
            case 2: stencil_rows_pair<2>(pairs, n0, src, wt, n1, src1, wt1, row_offset, outs); break;
            case 3: stencil_rows_pair<3>(pairs, n0, src, wt, n1, src1, wt1, row_offset, outs); break;
            default: stencil_rows_pair<4>(pairs, n0, src, wt, n1, src1, wt1, row_offset, outs); break;
          }
          if (W % 2 == 0) continue;
          for (int64_t r = 0; r < count; ++r) outs[r] += 2 * pairs;
          stencil_rows(count, 1, n0, last_src, wt, row_offset, acc_t(0), outs, sw);
        }
        continue;
      }
    }
    for (int64_t rw = 0; rw < std::min(sw, W); ++rw) {
      const int64_t n = residue_taps(rh, rw, src, wt);
      for (int64_t i0 = 0; i0 < rows; i0 += kGroupRows) {
        const int64_t count = std::min<int64_t>(kGroupRows, rows - i0);
        for (int64_t r = 0; r < count; ++r) {
          row_offset[r] = (i0 + r) * row_size;
          outs[r] = gi + (rh + (i0 + r) * sh) * W + rw;
        }
        stencil_rows(count, ceil_div(W - rw, sw), n, src, wt, row_offset, acc_t(0), outs, sw);
      }
    }
  }
}

template <typename scalar_t>
void input_grad_impl(const InputGradArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry& g = a.geo;
  const int64_t C = g.channels, T = g.in[0], plane = g.in[1] * g.in[2];
  const int64_t units = g.batch * C * T;
  if (units == 0 || plane == 0) return;
  const auto* grad_output = static_cast<const scalar_t*>(a.grad_output);
  const auto* weight = static_cast<const acc_t*>(a.weight);
  auto* grad_input = static_cast<scalar_t*>(a.grad_input);
  if (const auto flipped = flipped_geometry(g)) {
    // Stride 1: the forward's kernel (4-row register blocks, kH = 3 row reuse) on grad_output,
    // measured 1.7x faster than the gather below (4x96x8x28^2, one thread).
    const int64_t taps = g.taps();
    std::vector<acc_t> w(C * taps);
    for (int64_t c = 0; c < C; ++c) std::reverse_copy(weight + c * taps, weight + (c + 1) * taps, w.data() + c * taps);
    ForwardArgs f;
    f.geo = *flipped, f.dtype = a.dtype, f.input = a.grad_output, f.weight = w.data(), f.output = a.grad_input;
    return forward_impl<scalar_t>(f);
  }
  const RowLayout layout = input_grad_row_layout(g, Vec<acc_t>::lanes);
  const int64_t slots = (g.kernel[0] - 1) * g.dilation[0] / g.stride[0] + 2;
  at::parallel_for(0, units, std::max<int64_t>(1, 16384 / plane), [&](int64_t begin, int64_t end) {
    PlaneCache<acc_t> cache;
    cache.init(input_grad_plane_rows(g), input_grad_plane_top(g), layout, slots);
    for (int64_t u = begin; u < end; ++u) {
      const int64_t bc = u / T, it = u % T, c = bc % C;
      input_grad_plane<scalar_t>(g, grad_output, weight + c * g.taps(), cache, bc, it, grad_input + u * plane);
    }
  });
}

// ------------------------------------------------------------------------ weight (+bias) gradient
// Bitwise lane masks over vectors of the accumulation type: first_lanes(n) has all bits set in lanes
// [0, n), keep_lanes(v, mask) clears v's other lanes (so that a non-finite input element no output
// reads cannot leak into a sum as 0·inf).
template <typename V>
FASTVID_INLINE V first_lanes(int64_t n) {
  typedef std::conditional_t<sizeof(V{}[0]) == 4, int32_t, int64_t> Bits;
  typedef Bits M __attribute__((vector_size(sizeof(V))));
  M bits;
  for (int l = 0; l < int(sizeof(V) / sizeof(Bits)); ++l) bits[l] = l < n ? Bits(-1) : Bits(0);
  V mask;
  std::memcpy(&mask, &bits, sizeof mask);
  return mask;
}
template <typename V>
FASTVID_INLINE V keep_lanes(V v, V mask) {
  typedef std::conditional_t<sizeof(V{}[0]) == 4, int32_t, int64_t> Bits;
  typedef Bits M __attribute__((vector_size(sizeof(V))));
  M a, m;
  std::memcpy(&a, &v, sizeof a);
  std::memcpy(&m, &mask, sizeof m);
  a &= m;
  std::memcpy(&v, &a, sizeof v);
  return v;
}

// sums[kw] += Σ_rows Σ_q go_rows[row][q] · x_rows[row][offset[kw] + q] per lane, q in [0, OW) (the
// caller adds the lanes once per unit; summed here per call, they made the 4x96x8x28^2 weight gradient
// take 2.4 ms instead of 1.9-2.1, two threads, AVX-512); go rows are
// zero beyond OW and the x values the last, partial vector reads there are masked out (so a
// non-finite input element no output reads cannot leak in as 0·inf). Vectors are taken in pairs into
// two sets of accumulators (2·KW independent chains).
template <int KW, bool kMasked, typename acc_t>
FASTVID_INLINE void weight_grad_vectors(int64_t nrows, const acc_t* const* go_rows, const acc_t* const* x_rows,
                                        const int64_t* offset, int64_t q_begin, int64_t q_end, int64_t tail,
                                        typename Vec<acc_t>::type* sums) {
  using V = typename Vec<acc_t>::type;
  constexpr int L = Vec<acc_t>::lanes;
  const V keep = first_lanes<V>(tail);
  V acc[2][KW];
#pragma GCC unroll 7
  for (int k = 0; k < KW; ++k) acc[0][k] = acc[1][k] = V{};
  int which = 0;
  auto step = [&](V (&a)[KW], const acc_t* go, const acc_t* x) {
    const V gv = load_vec<V>(go);
#pragma GCC unroll 7
    for (int k = 0; k < KW; ++k) {
      V product = gv * load_vec<V>(x + offset[k]);
      if constexpr (kMasked) product = keep_lanes(product, keep);
      a[k] += product;
    }
  };
  const acc_t* pending_go = nullptr;
  const acc_t* pending_x = nullptr;
  for (int64_t row = 0; row < nrows; ++row) {
    for (int64_t q = q_begin; q < q_end; q += L) {
      if (pending_go == nullptr) {
        pending_go = go_rows[row] + q, pending_x = x_rows[row] + q;
        continue;
      }
      step(acc[0], pending_go, pending_x);
      step(acc[1], go_rows[row] + q, x_rows[row] + q);
      pending_go = nullptr;
    }
  }
  if (pending_go != nullptr) step(acc[which], pending_go, pending_x);
#pragma GCC unroll 7
  for (int k = 0; k < KW; ++k) sums[k] += acc[0][k] + acc[1][k];
}

template <int KW, typename acc_t>
FASTVID_INLINE void weight_grad_rows(int64_t nrows, const acc_t* const* go_rows, const acc_t* const* x_rows,
                                     const int64_t* offset, int64_t OW, typename Vec<acc_t>::type* sums) {
  constexpr int L = Vec<acc_t>::lanes;
  const int64_t full = OW / L * L, tail = OW % L;
  if (full > 0) weight_grad_vectors<KW, false>(nrows, go_rows, x_rows, offset, 0, full, 0, sums);
  if (tail > 0) weight_grad_vectors<KW, true>(nrows, go_rows, x_rows, offset, full, full + L, tail, sums);
}

// kH = kW = 3: the 9 (kh, kw) sums of one input plane in registers while each input row is swept
// once: its 3 W-shifted vectors are loaded once for the up to 3 grad_output rows it pairs with
// (pair_oh[ih·3 + kh], -1 for none): 3 + 3 loads per 9 FMAs, against 4 per 3 along each (kh) row
// pair separately. The x values past OW in the last, partial vector are masked out as above.
// Two threads, AVX-512, weight (+ bias) gradient: 4x96x8x28^2 2.1-2.3 -> 1.3 ms, 4x192x8x14^2 1.4 -> 0.7,
// 4x48x8x56^2 with H and W stride 2 1.6-1.7 -> 1.3.
template <typename acc_t>
FASTVID_INLINE void weight_grad_plane_k3(int64_t H, const int32_t* pair_oh, const acc_t* go_plane, int64_t go_len,
                                         const acc_t* xp, int64_t x_row, const int64_t* kw_offset, int64_t OW,
                                         typename Vec<acc_t>::type* sums) {
  using V = typename Vec<acc_t>::type;
  constexpr int L = Vec<acc_t>::lanes;
  for (int64_t q = 0; q < OW; q += L) {
    const bool partial = OW - q < L;
    const V keep = first_lanes<V>(OW - q);
    V acc[3][3];
#pragma GCC unroll 4
    for (int kh = 0; kh < 3; ++kh)
#pragma GCC unroll 4
      for (int kw = 0; kw < 3; ++kw) acc[kh][kw] = V{};
    for (int64_t ih = 0; ih < H; ++ih) {
      const acc_t* x = xp + ih * x_row + q;
      V xv[3];
#pragma GCC unroll 4
      for (int kw = 0; kw < 3; ++kw) {
        xv[kw] = load_vec<V>(x + kw_offset[kw]);
        if (partial) xv[kw] = keep_lanes(xv[kw], keep);
      }
#pragma GCC unroll 4
      for (int kh = 0; kh < 3; ++kh) {
        const int32_t oh = pair_oh[ih * 3 + kh];
        if (oh < 0) continue;
        const V gv = load_vec<V>(go_plane + oh * go_len + q);
#pragma GCC unroll 4
        for (int kw = 0; kw < 3; ++kw) acc[kh][kw] += gv * xv[kw];
      }
    }
#pragma GCC unroll 4
    for (int kh = 0; kh < 3; ++kh)
#pragma GCC unroll 4
      for (int kw = 0; kw < 3; ++kw) sums[kh * 3 + kw] += acc[kh][kw];
  }
}

// Adds the contributions of output planes [ot_begin, ot_end) of channel bc to partial[taps + 1]
// (weight taps, then bias).
template <typename scalar_t>
void weight_grad_unit(const Geometry& g, const scalar_t* input, const scalar_t* grad_output,
                                         bool want_weight, bool want_bias,
                                         PlaneCache<at::opmath_type<scalar_t>>& x_cache,
                                         std::vector<at::opmath_type<scalar_t>>& go_plane,
                                         const std::vector<int32_t>& pair_oh, int64_t bc,
                                         int64_t ot_begin, int64_t ot_end, at::opmath_type<scalar_t>* partial) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = typename Vec<acc_t>::type;
  constexpr int L = Vec<acc_t>::lanes;
  const int64_t T = g.in[0], H = g.in[1], W = g.in[2], OT = g.out[0], OH = g.out[1], OW = g.out[2];
  const int64_t kT = g.kernel[0], kH = g.kernel[1], kW = g.kernel[2];
  const int64_t go_len = round_up(OW, L);
  const RowLayout& lay = x_cache.layout;
  int64_t kw_offset[7];
  for (int64_t kw = 0; kw < kW; ++kw) {
    const int64_t shift = kw * g.dilation[2];
    kw_offset[kw] = (shift % g.stride[2]) * lay.phase_len + shift / g.stride[2];
  }
  const RowLayout go_layout{1, go_len, 0};
  const acc_t* go_rows[512];
  const acc_t* x_rows[512];
  // The unit's sums per lane: weight taps, then bias.
  V lane_sums[kMaxTaps + 1];
  for (int64_t t = 0; t <= g.taps(); ++t) lane_sums[t] = V{};
  // Software prefetch of the next grad_output plane in memory (the next ot's, or the next unit's first)
  // and, where an input plane is no larger than an output plane, of the input plane after this ot's last
  // (the one the next ot adds to x_cache), a third of each per kt. Intel Xeon, two threads, separate
  // processes, weight gradient after native's fwd+bwd (its tensors then come from memory) / back to
  // back: 4x96x8x28^2 2.0-2.3 -> 1.5-1.9 ms / equal (AVX2 2.4-2.5 -> 1.9-2.0 / equal), 14^2 1.04 -> 0.9 /
  // equal; with H and W stride 2 (56^2 input planes, four times an output plane) the input planes' prefetch
  // made it 5-20 % slower, the grad_output planes' alone 5-10 % faster.
  const int64_t go_total = g.batch * g.channels * OT * OH * OW, x_total = g.batch * g.channels * T * H * W;
  const bool prefetch_x = H * W <= OH * OW;
  for (int64_t ot = ot_begin; ot < ot_end; ++ot) {
    const scalar_t* go = grad_output + (bc * OT + ot) * OH * OW;
    const int64_t it_last = std::min(T - 1, ot * g.stride[0] - g.padding[0] + (kT - 1) * g.dilation[0]);
    const int64_t go_next = (bc * OT + ot + 1) * OH * OW;
    // (it_last < 0 where every T tap of this ot is in the padding)
    const int64_t x_next = (bc * T + std::max<int64_t>(it_last + 1, 0)) * H * W;
    const char* pf_go = reinterpret_cast<const char*>(grad_output + go_next);
    const char* pf_x = reinterpret_cast<const char*>(input + x_next);
    const int64_t pf_go_bytes = std::min(OH * OW, go_total - go_next) * int64_t(sizeof(scalar_t));
    const int64_t pf_x_bytes = prefetch_x ? std::min(H * W, x_total - x_next) * int64_t(sizeof(scalar_t)) : 0;
    build_rows(go, OH, OW, go_layout, go_plane.data(), go_len);
    if (want_bias)
      for (int64_t i = 0; i < OH * go_len; i += L) lane_sums[g.taps()] += load_vec<V>(go_plane.data() + i);
    if (!want_weight) continue;
    for (int64_t kt = 0; kt < kT; ++kt) {
      const int64_t it = ot * g.stride[0] - g.padding[0] + kt * g.dilation[0];
      {
        const int64_t b0 = pf_go_bytes * kt / kT / 64 * 64, b1 = pf_go_bytes * (kt + 1) / kT;
        for (int64_t b = b0; b < b1; b += 64) __builtin_prefetch(pf_go + b, 0, 3);
        const int64_t c0 = pf_x_bytes * kt / kT / 64 * 64, c1 = pf_x_bytes * (kt + 1) / kT;
        for (int64_t b = c0; b < c1; b += 64) __builtin_prefetch(pf_x + b, 0, 3);
      }
      if (it < 0 || it >= T) continue;
      const acc_t* xp = x_cache.plane(bc, it, input + (bc * T + it) * H * W, H, W) + x_cache.top * lay.size();
      if (!pair_oh.empty()) {
        weight_grad_plane_k3(H, pair_oh.data(), go_plane.data(), go_len, xp, lay.size(), kw_offset, OW,
                             lane_sums + kt * 9);
        continue;
      }
      for (int64_t kh = 0; kh < kH; ++kh) {
        const Range rows = valid_outputs(kh, g.stride[1], g.padding[1], g.dilation[1], H, OH);
        V* sums = lane_sums + (kt * kH + kh) * kW;
        // Rows in batches that fit the pointer arrays.
        for (int64_t oh0 = rows.begin; oh0 < rows.end; oh0 += 512) {
          const int64_t n = std::min<int64_t>(512, rows.end - oh0);
          for (int64_t i = 0; i < n; ++i) {
            const int64_t oh = oh0 + i, ih = oh * g.stride[1] - g.padding[1] + kh * g.dilation[1];
            go_rows[i] = go_plane.data() + oh * go_len;
            x_rows[i] = xp + ih * lay.size();
          }
          switch (kW) {
            case 1: weight_grad_rows<1>(n, go_rows, x_rows, kw_offset, OW, sums); break;
            case 2: weight_grad_rows<2>(n, go_rows, x_rows, kw_offset, OW, sums); break;
            case 3: weight_grad_rows<3>(n, go_rows, x_rows, kw_offset, OW, sums); break;
            case 4: weight_grad_rows<4>(n, go_rows, x_rows, kw_offset, OW, sums); break;
            case 5: weight_grad_rows<5>(n, go_rows, x_rows, kw_offset, OW, sums); break;
            case 6: weight_grad_rows<6>(n, go_rows, x_rows, kw_offset, OW, sums); break;
            default: weight_grad_rows<7>(n, go_rows, x_rows, kw_offset, OW, sums); break;
          }
        }
      }
    }
  }
  for (int64_t t = 0; t <= g.taps(); ++t) {
    acc_t total = 0;
    for (int l = 0; l < L; ++l) total += lane_sums[t][l];
    partial[t] += total;
  }
}

template <typename scalar_t>
void weight_grad_impl(const WeightGradArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry& g = a.geo;
  const int64_t C = g.channels, taps = g.taps(), OT = g.out[0];
  const int64_t channels = g.batch * C;
  auto* grad_weight = static_cast<acc_t*>(a.grad_weight);
  auto* grad_bias = static_cast<acc_t*>(a.grad_bias);
  if (grad_weight != nullptr) std::fill(grad_weight, grad_weight + C * taps, acc_t(0));
  if (grad_bias != nullptr) std::fill(grad_bias, grad_bias + C, acc_t(0));
  if (channels == 0 || OT == 0 || g.out[1] * g.out[2] == 0 || (grad_weight == nullptr && grad_bias == nullptr))
    return;
  const auto* grad_output = static_cast<const scalar_t*>(a.grad_output);
  const auto* input = static_cast<const scalar_t*>(a.input);
  // Units of (b, c, a chunk of output planes), enough for parallelism, their count a function of
  // the shape only (so the summation order does not depend on the thread count).
  const int64_t splits = std::min<int64_t>(OT, std::max<int64_t>(1, 256 / channels));
  const int64_t units = channels * splits, per_unit = taps + 1;
  std::vector<acc_t> partials(units * per_unit, acc_t(0));
  const RowLayout layout = forward_row_layout(g, Vec<acc_t>::lanes);
  const int64_t slots = (g.kernel[0] - 1) * g.dilation[0] + 1;
  const int64_t plane = g.out[1] * g.out[2];
  // kH = kW = 3 (weight_grad_plane_k3): the grad_output row each (input row, kh) pairs with, -1: none.
  std::vector<int32_t> pair_oh;
  if (g.kernel[1] == 3 && g.kernel[2] == 3) {
    pair_oh.resize(g.in[1] * 3);
    for (int64_t ih = 0; ih < g.in[1]; ++ih)
      for (int64_t kh = 0; kh < 3; ++kh) {
        int64_t oh;
        const bool pairs = output_index(ih, kh, g.stride[1], g.padding[1], g.dilation[1], g.out[1], &oh);
        pair_oh[ih * 3 + kh] = pairs ? int32_t(oh) : -1;
      }
  }
  at::parallel_for(0, units, std::max<int64_t>(1, 16384 / (plane * ceil_div(OT, splits))), [&](int64_t begin,
                                                                                                int64_t end) {
    PlaneCache<acc_t> x_cache;
    x_cache.init(forward_plane_rows(g), g.padding[1], layout, slots);
    std::vector<acc_t> go_plane(g.out[1] * round_up(g.out[2], Vec<acc_t>::lanes));
    for (int64_t u = begin; u < end; ++u) {
      const int64_t bc = u / splits, part = u % splits;
      weight_grad_unit<scalar_t>(g, input, grad_output, grad_weight != nullptr, grad_bias != nullptr, x_cache,
                                 go_plane, pair_oh, bc, OT * part / splits, OT * (part + 1) / splits,
                                 partials.data() + u * per_unit);
    }
  });
  for (int64_t u = 0; u < units; ++u) {
    const int64_t c = (u / splits) % C;
    const acc_t* p = partials.data() + u * per_unit;
    if (grad_weight != nullptr)
      for (int64_t t = 0; t < taps; ++t) grad_weight[c * taps + t] += p[t];
    if (grad_bias != nullptr) grad_bias[c] += p[taps];
  }
}

}  // namespace

void forward_ncdhw(const ForwardArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, args.dtype, "fastvid.depthwise_conv3d",
                                  [&] { forward_impl<scalar_t>(args); });
}

void input_grad_ncdhw(const InputGradArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, args.dtype, "fastvid.depthwise_conv3d_backward",
                                  [&] { input_grad_impl<scalar_t>(args); });
}

void weight_grad_ncdhw(const WeightGradArgs& args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, args.dtype, "fastvid.depthwise_conv3d_backward",
                                  [&] { weight_grad_impl<scalar_t>(args); });
}

}  // namespace FASTVID_ISA
}  // namespace depthwise3d
}  // namespace fastvid
#endif  // FASTVID_ISA
