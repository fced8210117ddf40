// 64-byte GCC vectors of the accumulation type and the loads/stores that widen/narrow the storage
// type to them, shared by the CPU depthwise kernels (depthwise3d_cpu.cpp: NDHWC, vectorised over
// channels; depthwise3d_ncdhw_cpu.cpp: NCDHW, vectorised along W). Only included by CPU sources:
// each target clone (FASTVID_CPU_CLONES) lowers the vectors to its own ISA.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

// The 64-byte vector types are only passed between always-inlined functions.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace fastvid {
namespace depthwise3d {
namespace cpu {

// 64-byte vectors of the accumulation type (GCC vector extensions: each target clone lowers them to
// its own ISA) and loads that widen the storage type to them.
template <typename acc_t>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(64)));
  static constexpr int lanes = 16;
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(64)));
  static constexpr int lanes = 8;
};

template <typename V, typename T>
__attribute__((always_inline)) inline V load_vec(const T* p) {
  V v;
  if constexpr (std::is_same_v<T, c10::BFloat16>) {  // bf16 -> fp32 is a 16-bit shift
    typedef uint16_t u16 __attribute__((vector_size(32)));
    typedef uint32_t u32 __attribute__((vector_size(64)));
    u16 h;
    std::memcpy(&h, p, sizeof h);
    const u32 bits = __builtin_convertvector(h, u32) << 16;
    std::memcpy(&v, &bits, sizeof v);
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    for (int l = 0; l < static_cast<int>(sizeof(V) / sizeof(v[0])); ++l) v[l] = static_cast<float>(p[l]);
  } else {
    std::memcpy(&v, p, sizeof v);
  }
  return v;
}

// Stores a vector of the accumulation type narrowed to T (bf16: round to nearest even, NaN kept as a
// quiet NaN, exactly as c10::BFloat16's conversion).
template <typename T, typename V>
__attribute__((always_inline)) inline void store_vec(T* p, const V& v) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    typedef uint16_t u16 __attribute__((vector_size(32)));
    typedef uint32_t u32 __attribute__((vector_size(64)));
    u32 bits;
    std::memcpy(&bits, &v, sizeof bits);
    const u32 rounded = (bits + (((bits >> 16) & 1u) + 0x7FFFu)) >> 16;
    const u32 nan = reinterpret_cast<u32>(v != v);  // all ones where v is NaN
    const u16 h = __builtin_convertvector((nan & 0x7FC0u) | (~nan & rounded), u16);
    std::memcpy(p, &h, sizeof h);
  } else if constexpr (std::is_same_v<T, c10::Half>) {
    for (int l = 0; l < static_cast<int>(sizeof(V) / sizeof(v[0])); ++l) p[l] = static_cast<T>(v[l]);
  } else {
    std::memcpy(p, &v, sizeof v);
  }
}

}  // namespace cpu
}  // namespace depthwise3d
}  // namespace fastvid
