// FMA peak of one core: C independent fp32 FMA chains at 512 and 256 bits, rates in GFMA/s (lanes
// per second) over the thread's CPU time, so a shared machine's time slicing does not count.
// 4 chains show the latency bound (one FMA in flight per 4 cycles per chain); 12-24 chains the
// throughput peak (two FMA ports need >= 8 chains). Run it alongside a benchmark, same minute.
//   g++ -O2 -march=native -o /tmp/fma_peak scripts/fma_peak.cpp && /tmp/fma_peak [iterations]
#include <immintrin.h>
#include <time.h>
#include <cstdio>
#include <cstdlib>
#include <cstring>

static double thread_seconds() {
  timespec t;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

template <int C, typename V, V (*fma)(V, V, V), V (*set)(float)>
static double rate(long iters) {
  V acc[C], a = set(1.0000001f), b = set(0.9999999f);
  for (int i = 0; i < C; ++i) acc[i] = set(float(i));
  const double t0 = thread_seconds();
  for (long it = 0; it < iters; ++it) {
#pragma GCC unroll 32
    for (int i = 0; i < C; ++i) acc[i] = fma(a, acc[i], b);
    __asm__ volatile("" : "+v"(a));  // keeps the loop from being folded
  }
  const double seconds = thread_seconds() - t0;
  float sum = 0, lane[sizeof(V) / sizeof(float)];
  for (int i = 0; i < C; ++i) std::memcpy(lane, &acc[i], sizeof(V)), sum += lane[0];
  if (sum == 1234.5f) std::puts("");  // uses the result
  return double(iters) * C * (sizeof(V) / sizeof(float)) / seconds * 1e-9;
}

#ifdef __AVX512F__
static __m512 fma512(__m512 a, __m512 b, __m512 c) { return _mm512_fmadd_ps(a, b, c); }
static __m512 set512(float x) { return _mm512_set1_ps(x); }
#endif
static __m256 fma256(__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); }
static __m256 set256(float x) { return _mm256_set1_ps(x); }

int main(int argc, char** argv) {
  const long n = argc > 1 ? std::atol(argv[1]) : 30000000;
  for (int rep = 0; rep < 3; ++rep) {
#ifdef __AVX512F__
    std::printf("512-bit: 4 chains %5.1f  8 %5.1f  12 %5.1f  24 %5.1f | ", rate<4, __m512, fma512, set512>(n),
                rate<8, __m512, fma512, set512>(n), rate<12, __m512, fma512, set512>(n),
                rate<24, __m512, fma512, set512>(n / 2));
#endif
    std::printf("256-bit: 4 chains %5.1f  8 %5.1f  12 %5.1f GFMA/s\n", rate<4, __m256, fma256, set256>(n),
                rate<8, __m256, fma256, set256>(n), rate<12, __m256, fma256, set256>(n));
  }
}
