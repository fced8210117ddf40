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
static int n_sites = 0, recording = 0, last_site = -1;
static double serial = 0, last_end = 0;
// The serial time before each region, by (site of the region before, site of this one).
static double gap[kMaxSites][kMaxSites];
static long gaps[kMaxSites][kMaxSites];
// The last kTrace regions in order: site, serial time before it, wall time.
enum { kTrace = 4096 };
static struct { int site; double gap, wall; } trace[kTrace];
static long n_trace = 0;

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
  real(timed_body, &body, threads, flags);
  const double t1 = now();
  int s = 0;
  while (s < n_sites && sites[s].caller != caller) ++s;
  if (s == kMaxSites) return;  // more call sites than slots: not counted
  if (s == n_sites) sites[n_sites++].caller = caller;
  if (last_end > 0) {
    serial += t0 - last_end;
    gap[last_site][s] += t0 - last_end;
    gaps[last_site][s]++;
  }
  trace[n_trace % kTrace].site = s;
  trace[n_trace % kTrace].gap = last_end > 0 ? t0 - last_end : 0;
  trace[n_trace % kTrace].wall = t1 - t0;
  ++n_trace;
  last_end = t1, last_site = s;
  sites[s].regions++;
  sites[s].wall += last_end - t0;
  for (int i = 0; i < kMaxThreads; ++i) sites[s].busy[i] += body.busy[i];
}

void omp_regions_start(void) {
  memset(sites, 0, sizeof sites);
  memset(gap, 0, sizeof gap);
  memset(gaps, 0, sizeof gaps);
  n_sites = 0, serial = 0, last_end = 0, last_site = -1, n_trace = 0, recording = 1;
}

// One line per call site, per call of the measured step (`calls` steps were recorded):
//   site <library> <offset> <regions> <wall ms> <busy ms of thread 0> <thread 1> ...
// then: gap <site before> <site after> <gaps per call> <ms per call> (by site index, in the order above),
// then: trace <site> <ms serial before it> <ms wall> for the last regions recorded, in order,
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
  for (int a = 0; a < n_sites; ++a)
    for (int b = 0; b < n_sites; ++b)
      if (gaps[a][b] > 0) fprintf(out, "gap %d %d %.2f %.4f\n", a, b, (double)gaps[a][b] / calls, 1e3 * gap[a][b] / calls);
  for (long i = n_trace > kTrace ? n_trace - kTrace : 0; i < n_trace; ++i)
    fprintf(out, "trace %d %.4f %.4f\n", trace[i % kTrace].site, 1e3 * trace[i % kTrace].gap, 1e3 * trace[i % kTrace].wall);
  fprintf(out, "serial %.4f\n", 1e3 * serial / calls);
  fclose(out);
}
