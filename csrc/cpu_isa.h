// CPU ISA dispatch: every vectorised CPU kernel is compiled once per ISA class and the entry points
// pick one at run time.
//
//   avx512    AVX-512 F/BW/VL/DQ/CD + FMA, 64-byte vectors
//   avx2      AVX2 + FMA (+ F16C), 32-byte vectors
//   baseline  the build's default x86-64 ISA (SSE2), 16-byte vectors; the only path off x86-64
//
// The active path is the best one the CPU supports (cpuid), or the one FASTVID_CPU_ISA names when
// fastvid._C is loaded; a request above what the CPU supports is clamped with a warning (an import
// must not fail on a smaller machine). torch.ops.fastvid._set_cpu_isa switches it at run time and
// raises for a path the CPU lacks (tests run parity under every path the machine supports).
//
// Per-ISA code lives in per-ISA namespaces (isa_avx512, isa_avx2, isa_baseline) compiled under
// `#pragma GCC target`, so no inline function is ever emitted with two different ISAs under one
// symbol (the linker would keep one of them and could run AVX-512 code on an AVX2 CPU). Headers are
// included before the pragma: what they define is baseline code, inlined into the per-ISA callers.
// Two ways to compile code per ISA:
//   - a whole file: guard its kernels with `#ifdef FASTVID_ISA`, define FASTVID_ISA_SOURCE to its own
//     path and include "cpu_isa_each.h"; the kernels then open namespace FASTVID_ISA and use
//     FASTVID_VEC_BYTES as their vector width;
//   - a few functions: FASTVID_PER_ISA(definitions) (no # directives inside).
// Call with FASTVID_ISA_CALL(family, fn(args)): the isa_<path>::fn of the active path.
#pragma once

#include <atomic>
#include <cstdint>
#include <shared_mutex>

namespace fastvid {
namespace cpu_isa {

enum class Isa : int { baseline = 0, avx2 = 1, avx512 = 2 };
// The kernel families, for "which path did it run" (fastvid.info, tests).
enum class Family : int { depthwise3d = 0, recurrent = 1, attention = 2, count = 3 };

extern std::atomic<int> g_active;                                     // the active Isa
extern std::atomic<int> g_ran[static_cast<int>(Family::count)];       // last path each family ran, -1: none

inline Isa active() { return static_cast<Isa>(g_active.load(std::memory_order_relaxed)); }
// Whether the CPU has AMX-BF16 and the OS enabled its tile state (cpuid + xgetbv; false off x86-64).
bool has_amx_bf16();
// The data cache sizes the kernels' cache rules go by, in bytes, as the OS reports them for CPU 0 (read
// once): one core's L2 and the last-level cache that core shares (on a VM the host's L3 as the guest is
// shown it, shared with other tenants). 0 where the OS does not say; each rule picks its own assumption
// for that.
int64_t l2_cache_bytes();
int64_t last_level_cache_bytes();
// The active path, noted as the one `family` ran (a store only when it changes: no shared-line traffic).
inline Isa use(Family family) {
  const int isa = g_active.load(std::memory_order_relaxed);
  std::atomic<int>& ran = g_ran[static_cast<int>(family)];
  if (ran.load(std::memory_order_relaxed) != isa) ran.store(isa, std::memory_order_relaxed);
  return static_cast<Isa>(isa);
}
// An op that reads the active path more than once per call holds this for the call: the attention op
// sizes its packed operands by one path's panel width, then runs that path's kernels on them (a switch
// in between, from another thread, corrupted the heap). _set_cpu_isa and _cpu_isa_simulate wait for
// such calls to end.
std::shared_lock<std::shared_mutex> pin_path();

}  // namespace cpu_isa
}  // namespace fastvid

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTVID_ISA_X86 1
// The target strings, once. prefer-vector-width=512: gcc's auto-vectoriser otherwise stays at 256 bits.
#define FASTVID_ISA_PUSH_avx512                                                                          \
  _Pragma("GCC push_options")                                                                            \
  _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx512dq,avx512cd,fma,f16c,bmi,bmi2,prefer-vector-width=512\")")
#define FASTVID_ISA_PUSH_avx2 \
  _Pragma("GCC push_options") _Pragma("GCC target(\"avx2,fma,f16c,bmi,bmi2,prefer-vector-width=256\")")
#define FASTVID_ISA_POP _Pragma("GCC pop_options")
#define FASTVID_PER_ISA(...)                                            \
  FASTVID_ISA_PUSH_avx512 namespace isa_avx512 { __VA_ARGS__ } FASTVID_ISA_POP \
  FASTVID_ISA_PUSH_avx2 namespace isa_avx2 { __VA_ARGS__ } FASTVID_ISA_POP     \
  namespace isa_baseline { __VA_ARGS__ }
#define FASTVID_ISA_CALL(family, ...)                                                \
  [&]() -> decltype(auto) {                                                          \
    switch (::fastvid::cpu_isa::use(::fastvid::cpu_isa::Family::family)) {           \
      case ::fastvid::cpu_isa::Isa::avx512: return isa_avx512::__VA_ARGS__;          \
      case ::fastvid::cpu_isa::Isa::avx2: return isa_avx2::__VA_ARGS__;              \
      default: return isa_baseline::__VA_ARGS__;                                     \
    }                                                                                \
  }()
#else  // other compilers / architectures: the baseline path only
#define FASTVID_PER_ISA(...) namespace isa_baseline { __VA_ARGS__ }
#define FASTVID_ISA_CALL(family, ...) \
  [&]() -> decltype(auto) { ::fastvid::cpu_isa::use(::fastvid::cpu_isa::Family::family); return isa_baseline::__VA_ARGS__; }()
#endif
