// The multiply-add peak of the active CPU ISA path, the benchmark's compute yardstick
// (fastvid/bench/ceiling.py): independent chains of fp32 a·x + b in the path's vector width, on every
// thread at once. Rates are lanes per second (one FMA lane = 2 FLOPs); the baseline path (SSE2) has
// no fused instruction, so there one lane is a multiply and an add.
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <vector>

#include "cpu_isa.h"

#ifndef FASTVID_ISA
#define FASTVID_ISA_SOURCE "cpu_peak.cpp"
#include "cpu_isa_each.h"

namespace fastvid {
namespace cpu_peak {
namespace {

double chains_on_active_path(int64_t iterations) {
  switch (cpu_isa::active()) {
#ifdef FASTVID_ISA_X86
    case cpu_isa::Isa::avx512: return isa_avx512::multiply_add_chains(iterations);
    case cpu_isa::Isa::avx2: return isa_avx2::multiply_add_chains(iterations);
#endif
    default: return isa_baseline::multiply_add_chains(iterations);
  }
}

// Lanes per second of all of at::parallel_for's threads, each running `iterations` rounds of the
// chains; the best of `rounds` (on a shared machine the others are whatever the neighbours left).
double fma_peak(int64_t iterations, int64_t rounds) {
  TORCH_CHECK(iterations > 0 && rounds > 0, "fastvid._cpu_fma_peak: iterations and rounds must be positive, got ",
              iterations, " and ", rounds);
  const int64_t threads = at::get_num_threads();
  double best = 0;
  for (int64_t r = 0; r < rounds; ++r) {
    const auto start = std::chrono::steady_clock::now();
    std::vector<double> lanes(threads);
    at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) lanes[t] = chains_on_active_path(iterations);
    });
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    double total = 0;
    for (double l : lanes) total += l;
    best = std::max(best, total / seconds);
  }
  return best;
}

}  // namespace
}  // namespace cpu_peak
}  // namespace fastvid

// Schema in csrc/ops.cpp; no tensor arguments: a CompositeImplicitAutograd kernel serves every call.
TORCH_LIBRARY_IMPL(fastvid, CompositeImplicitAutograd, m) {
  m.impl("_cpu_fma_peak", [](int64_t iterations, int64_t rounds) { return fastvid::cpu_peak::fma_peak(iterations, rounds); });
}

#else  // one ISA path

namespace fastvid {
namespace cpu_peak {
namespace FASTVID_ISA {

typedef float Lanes __attribute__((vector_size(FASTVID_VEC_BYTES)));
// Chains in flight: 12 cover two FMA ports × 4-6 cycles of latency and, with the two operands, fit
// the 16 vector registers of AVX2.
constexpr int kChains = 12;

// Runs kChains chains of x = a·x + b for `iterations` rounds; returns the lanes computed.
double multiply_add_chains(int64_t iterations) {
  Lanes acc[kChains], a = Lanes{} + 1.0000001f, b = Lanes{} + 0.9999999f;
  for (int i = 0; i < kChains; ++i) acc[i] = Lanes{} + float(i);
  for (int64_t it = 0; it < iterations; ++it) {
#pragma GCC unroll 12
    for (int i = 0; i < kChains; ++i) acc[i] = a * acc[i] + b;
    asm volatile("" : "+x"(a));  // a is opaque: the loop cannot be folded
  }
  float sum = 0;
  for (int i = 0; i < kChains; ++i) sum += acc[i][0];
  asm volatile("" : : "x"(sum));  // the chains' results are used
  return double(iterations) * kChains * (sizeof(Lanes) / sizeof(float));
}

}  // namespace FASTVID_ISA
}  // namespace cpu_peak
}  // namespace fastvid

#endif
