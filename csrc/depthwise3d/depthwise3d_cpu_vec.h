// GCC vectors of the accumulation type, FASTVID_VEC_BYTES wide, and the loads/stores that widen/
// narrow the storage type to them, shared by the CPU depthwise kernels (depthwise3d_cpu.cpp: NDHWC,
// vectorised over channels; depthwise3d_ncdhw_cpu.cpp: NCDHW, vectorised along W). Included once
// per ISA path inside its pass (cpu_isa_each.h): no include guard, everything in namespace
// FASTVID_ISA. The c10 headers below must already be included before the per-ISA passes.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

// The vector types are only passed between always-inlined functions.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace fastvid {
namespace depthwise3d {
namespace FASTVID_ISA {
namespace cpu {

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
// 32-bit words of one float vector, 16-bit halves (bf16 / fp16 storage of a float vector) and
// shuffle masks.
typedef uint32_t U32 __attribute__((vector_size(kVecBytes)));
typedef int32_t I32 __attribute__((vector_size(kVecBytes)));
typedef uint16_t U16 __attribute__((vector_size(kVecBytes / 2)));

// Shuffle masks over two float vectors a, b of L lanes: even / odd lanes of the pair (a, b), and
// interleaving a (even channels) with b (odd channels) back into the low / high vector.
template <size_t... l>
constexpr I32 mask_even(std::index_sequence<l...>) { return I32{static_cast<int32_t>(2 * l)...}; }
template <size_t... l>
constexpr I32 mask_interleave(int32_t start, std::index_sequence<l...>) {
  return I32{static_cast<int32_t>(start + l / 2 + (l % 2) * (kVecBytes / 4))...};
}
constexpr int kFloatLanes = kVecBytes / 4;
constexpr I32 kEven = mask_even(std::make_index_sequence<kFloatLanes>{});
constexpr I32 kOdd = kEven + 1;
constexpr I32 kLow = mask_interleave(0, std::make_index_sequence<kFloatLanes>{});
constexpr I32 kHigh = mask_interleave(kFloatLanes / 2, std::make_index_sequence<kFloatLanes>{});

template <typename V, typename T>
__attribute__((always_inline)) inline V load_vec(const T* p) {
  V v;
  if constexpr (std::is_same_v<T, c10::BFloat16>) {  // bf16 -> fp32 is a 16-bit shift
    U16 h;
    std::memcpy(&h, p, sizeof h);
    const U32 bits = __builtin_convertvector(h, U32) << 16;
    std::memcpy(&v, &bits, sizeof v);
  } else if constexpr (std::is_same_v<T, c10::Half>) {
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
    for (int l = 0; l < static_cast<int>(sizeof(V) / sizeof(v[0])); ++l) p[l] = static_cast<T>(v[l]);
  } else {
    std::memcpy(p, &v, sizeof v);
  }
}

}  // namespace cpu
}  // namespace FASTVID_ISA
}  // namespace depthwise3d
}  // namespace fastvid
