// Where the second thread waits: an LD_PRELOAD wrapper of libgomp's GOMP_parallel (every
// at::parallel_for of torch's OpenMP build goes through it) that sums, per call site of a parallel
// region, the region's wall time and each thread's time inside the region body, and the wall time
// spent between regions (serial: Python, dispatch, allocation, single-threaded loops).
// Driven by scripts/omp_regions.py, which builds this file, preloads it and reads the report.
//   cc -O2 -shared -fPIC -fopenmp -o omp_regions.so scripts/omp_regions.c -ldl
#define _GNU_SOURCE
#include <dlfcn.h>
#include <omp.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

enum { kMaxSites = 256, kMaxThreads = 64 };

typedef void (*ParallelFn)(void (*)(void*), void*, unsigned, unsigned);

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + 1e-9 * t.tv_nsec;
}

struct Site {
  void* caller;  // return address of the GOMP_parallel call: identifies the parallel_for
  long regions;
  double wall, busy[kMaxThreads];
};
static struct Site sites[kMaxSites];
static int n_sites = 0, recording = 0;
static double serial = 0, last_end = 0;

struct Body {
  void (*fn)(void*);
  void* data;
  double busy[kMaxThreads];
};

static void timed_body(void* p) {
  struct Body* b = (struct Body*)p;
  const double t0 = now();
  b->fn(b->data);
  const int id = omp_get_thread_num();
  if (id < kMaxThreads) b->busy[id] = now() - t0;
}

void GOMP_parallel(void (*fn)(void*), void* data, unsigned threads, unsigned flags) {
  static ParallelFn real = NULL;
  if (real == NULL) real = (ParallelFn)dlsym(RTLD_NEXT, "GOMP_parallel");
  if (!recording || omp_in_parallel()) {
    real(fn, data, threads, flags);
    return;
  }
  void* caller = __builtin_return_address(0);
  struct Body body = {fn, data, {0}};
  const double t0 = now();
  if (last_end > 0) serial += t0 - last_end;
  real(timed_body, &body, threads, flags);
  last_end = now();
  int s = 0;
  while (s < n_sites && sites[s].caller != caller) ++s;
  if (s == kMaxSites) return;  // more call sites than slots: not counted
  if (s == n_sites) sites[n_sites++].caller = caller;
  sites[s].regions++;
  sites[s].wall += last_end - t0;
  for (int i = 0; i < kMaxThreads; ++i) sites[s].busy[i] += body.busy[i];
}

void omp_regions_start(void) {
  memset(sites, 0, sizeof sites);
  n_sites = 0, serial = 0, last_end = 0, recording = 1;
}

// One line per call site, per call of the measured step (`calls` steps were recorded):
//   site <library> <offset> <regions> <wall ms> <busy ms of thread 0> <thread 1> ...
// then: serial <ms between regions>.
void omp_regions_report(int calls, int threads, const char* path) {
  recording = 0;
  FILE* out = fopen(path, "w");
  if (out == NULL) return;
  for (int s = 0; s < n_sites; ++s) {
    Dl_info info;
    const char* lib = "?";
    long offset = 0;
    if (dladdr(sites[s].caller, &info)) lib = info.dli_fname, offset = (char*)sites[s].caller - (char*)info.dli_fbase;
    fprintf(out, "site %s 0x%lx %.2f %.4f", lib, offset, (double)sites[s].regions / calls, 1e3 * sites[s].wall / calls);
    for (int i = 0; i < threads && i < kMaxThreads; ++i) fprintf(out, " %.4f", 1e3 * sites[s].busy[i] / calls);
    fprintf(out, "\n");
  }
  fprintf(out, "serial %.4f\n", 1e3 * serial / calls);
  fclose(out);
}
