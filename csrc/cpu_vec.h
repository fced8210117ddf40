// GCC vectors of the accumulation type, FASTVID_VEC_BYTES wide, and the loads/stores that widen/
// narrow the storage type (bf16, fp16, fp32) to them: the CPU kernels' explicit-vector code (depthwise
// NDHWC / NCDHW kernels, the recurrent gate rows). Included once per ISA path inside its pass
// (cpu_isa_each.h): no include guard, everything in namespace cpu_vec::FASTVID_ISA. The c10 headers
// below must already be included before the per-ISA passes.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(FASTVID_ISA_X86) && FASTVID_VEC_BYTES >= 32
#include <immintrin.h>  // bf16 / F16C conversions (F16C: part of both x86 paths' targets)
#endif

// The vector types are only passed between always-inlined functions.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace fastvid {
namespace cpu_vec {
namespace FASTVID_ISA {

constexpr int kVecBytes = FASTVID_VEC_BYTES;

// Vectors of the accumulation type (GCC vector extensions, lowered to this pass's ISA).
template <typename acc_t>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(kVecBytes)));
  static constexpr int lanes = kVecBytes / 4;
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(kVecBytes)));
  static constexpr int lanes = kVecBytes / 8;
};
// 32-bit words of one float vector (I32: also shuffle masks) and 16-bit halves (bf16 / fp16 storage
// of a float vector).
typedef uint32_t U32 __attribute__((vector_size(kVecBytes)));
typedef int32_t I32 __attribute__((vector_size(kVecBytes)));
typedef uint16_t U16 __attribute__((vector_size(kVecBytes / 2)));

template <typename V, typename T>
__attribute__((always_inline)) inline V load_vec(const T* p) {
  V v;
  if constexpr (std::is_same_v<T, c10::BFloat16>) {  // bf16 -> fp32 is a 16-bit shift
    // One vpmovzxwd from memory and one shift: gcc lowers the generic conversion below to two 128-bit
    // halves extended, extracted and re-inserted (~6 uops per vector, session 31's perf of the depthwise
    // forward).
#if defined(FASTVID_ISA_X86) && FASTVID_VEC_BYTES >= 32
    if constexpr (sizeof(V) == 64) {
      const __m512i r = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16);
      std::memcpy(&v, &r, sizeof v);
      return v;
    } else if constexpr (sizeof(V) == 32) {
      const __m256i r = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16);
      std::memcpy(&v, &r, sizeof v);
      return v;
    }
#endif
    U16 h;
    std::memcpy(&h, p, sizeof h);
    const U32 bits = __builtin_convertvector(h, U32) << 16;
    std::memcpy(&v, &bits, sizeof v);
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    // F16C's vcvtph2ps converts exactly, as c10's scalar conversion (a software routine per element
    // here: the channels_last_3d fp16 forward took 14.5 ms, ~18x native's, session 31).
#if defined(FASTVID_ISA_X86) && FASTVID_VEC_BYTES >= 32
    if constexpr (sizeof(V) == 64) {
      const __m512 r = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
      std::memcpy(&v, &r, sizeof v);
      return v;
    } else if constexpr (sizeof(V) == 32) {
      const __m256 r = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
      std::memcpy(&v, &r, sizeof v);
      return v;
    }
#endif
    for (int l = 0; l < static_cast<int>(sizeof(V) / sizeof(v[0])); ++l) v[l] = static_cast<float>(p[l]);
  } else {
    std::memcpy(&v, p, sizeof v);
  }
  return v;
}

// Stores a vector of the accumulation type narrowed to T (bf16: round to nearest even, NaN kept as a
// quiet NaN, exactly as c10::BFloat16's conversion; AVX512-BF16's vcvtneps2bf16 is not used: it
// flushes subnormals, which c10 keeps).
template <typename T, typename V>
__attribute__((always_inline)) inline void store_vec(T* p, const V& v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    U32 bits;
    std::memcpy(&bits, &v, sizeof bits);
    const U32 rounded = (bits + (((bits >> 16) & 1u) + 0x7FFFu)) >> 16;
    const U32 nan = reinterpret_cast<U32>(v != v);  // all ones where v is NaN
    const U16 h = __builtin_convertvector((nan & 0x7FC0u) | (~nan & rounded), U16);
    std::memcpy(p, &h, sizeof h);
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    // vcvtps2ph rounds to nearest even and keeps subnormals, as c10's conversion; a NaN stays a NaN
    // (its payload truncated).
#if defined(FASTVID_ISA_X86) && FASTVID_VEC_BYTES >= 32
    if constexpr (sizeof(V) == 64) {
      __m512 r;
      std::memcpy(&r, &v, sizeof r);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(r, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      return;
    } else if constexpr (sizeof(V) == 32) {
      __m256 r;
      std::memcpy(&r, &v, sizeof r);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(r, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      return;
    }
#endif
    for (int l = 0; l < static_cast<int>(sizeof(V) / sizeof(v[0])); ++l) p[l] = static_cast<T>(v[l]);
  } else {
    std::memcpy(p, &v, sizeof v);
  }
}

}  // namespace FASTVID_ISA
}  // namespace cpu_vec
}  // namespace fastvid
