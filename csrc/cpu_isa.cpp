// CPU ISA detection, the FASTVID_CPU_ISA override and the private ops that tests, fastvid.info()
// and the benchmarks use to read and switch the active path (see cpu_isa.h).
#include "cpu_isa.h"

#include <ATen/core/List.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cctype>
#include <cstdlib>
#include <fstream>
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#endif
#include <string>
#include <vector>

#include <unistd.h>  // sysconf

namespace fastvid {
namespace cpu_isa {
namespace {

const char* const kNames[] = {"baseline", "avx2", "avx512"};
const char* const kFamilies[] = {"depthwise3d", "recurrent", "attention"};

Isa detect() {
#ifdef FASTVID_ISA_X86
  __builtin_cpu_init();
  // Everything the paths' targets (cpu_isa.h) let the compiler use: f16c (fp16 loads and stores), bmi, bmi2.
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
                    __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
                      __builtin_cpu_supports("avx512cd");
  return avx512 ? Isa::avx512 : avx2 ? Isa::avx2 : Isa::baseline;
#else
  return Isa::baseline;
#endif
}

bool detect_bf16() {
#ifdef FASTVID_ISA_X86
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

std::shared_mutex g_switch;        // held shared by calls that pin the path, exclusively to switch it

const Isa g_cpu = detect();        // what cpuid says
std::atomic<int> g_supported{static_cast<int>(g_cpu)};  // lowered only by _cpu_isa_simulate (tests)

// A path's name, case and surrounding spaces ignored ("AVX2", " avx2 "): -1 for any other text.
int parse(const std::string& text) {
  const auto first = text.find_first_not_of(" \t"), last = text.find_last_not_of(" \t");
  std::string name = first == std::string::npos ? "" : text.substr(first, last - first + 1);
  for (char& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  for (int i = 0; i < 3; ++i)
    if (name == kNames[i]) return i;
  return -1;
}

// FASTVID_CPU_ISA, read when the library is loaded: unknown names and paths above the CPU's are
// reported and replaced (clamped), never fatal.
int initial_isa() {
  const char* env = std::getenv("FASTVID_CPU_ISA");
  const int best = static_cast<int>(g_cpu);
  if (env == nullptr || *env == '\0') return best;
  const int want = parse(env);
  if (want < 0) {
    TORCH_WARN("fastvid: FASTVID_CPU_ISA=", env, " is not one of avx512, avx2, baseline; using ", kNames[best]);
    return best;
  }
  if (want > best) {
    TORCH_WARN("fastvid: FASTVID_CPU_ISA=", env, " but this CPU supports at most ", kNames[best], "; using ",
               kNames[best]);
    return best;
  }
  return want;
}

std::string active_name() { return kNames[static_cast<int>(active())]; }
std::string supported_name() { return kNames[g_supported.load()]; }
bool has_bf16() { return detect_bf16() && g_supported.load() == static_cast<int>(Isa::avx512); }

void set_isa(const std::string& name) {
  const int want = parse(name);
  TORCH_CHECK(want >= 0, "fastvid._set_cpu_isa: isa must be one of avx512, avx2, baseline, got '", name, "'");
  TORCH_CHECK(want <= g_supported.load(), "fastvid._set_cpu_isa: isa '", name, "' is not supported by this CPU ",
              "(best: ", supported_name(), ")");
  std::unique_lock<std::shared_mutex> no_pinned_calls(g_switch);
  g_active.store(want);
}

// Test hook: behave as a CPU whose best path is `name` ("" restores cpuid's answer); the active path
// is clamped to it.
void simulate(const std::string& name) {
  const int cap = name.empty() ? static_cast<int>(g_cpu) : parse(name);
  TORCH_CHECK(cap >= 0 && cap <= static_cast<int>(g_cpu), "fastvid._cpu_isa_simulate: isa must be '' or one of ",
              "the CPU's paths (<= ", kNames[static_cast<int>(g_cpu)], "), got '", name, "'");
  std::unique_lock<std::shared_mutex> no_pinned_calls(g_switch);
  g_supported.store(cap);
  if (g_active.load() > cap) g_active.store(cap);
}

std::string ran(const std::string& family) {
  for (int f = 0; f < static_cast<int>(Family::count); ++f) {
    if (family != kFamilies[f]) continue;
    const int isa = g_ran[f].load();
    return isa < 0 ? std::string() : std::string(kNames[isa]);
  }
  TORCH_CHECK(false, "fastvid._cpu_isa_ran: family must be one of depthwise3d, recurrent, attention, got '", family,
              "'");
}

}  // namespace

std::shared_lock<std::shared_mutex> pin_path() { return std::shared_lock<std::shared_mutex>(g_switch); }

std::atomic<int> g_active{initial_isa()};
std::atomic<int> g_ran[static_cast<int>(Family::count)] = {-1, -1, -1};

// Read from cpuid directly: torch's ATen has no call for it that every supported version has
// (torch 2.9 has no at::cpu::get_cpu_capabilities, 2.11 and 2.14 no is_amx_tile_supported).
bool has_amx_bf16() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || !(ecx & bit_OSXSAVE)) return false;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || !(edx & (1u << 22))) return false;  // AMX-BF16
  unsigned xcr0_lo = 0, xcr0_hi = 0;
  __asm__("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  return (xcr0_lo & (3u << 17)) == (3u << 17);  // XTILECFG and XTILEDATA state
#else
  return false;
#endif
}

namespace {
// The size of CPU 0's cache of `level` from Linux's sysfs (what lscpu shows), 0 where it is not there.
// Read first because glibc's sysconf can report another cache: on AMD EPYC VMs (Zen 4, one 32 MiB L3
// per core complex) _SC_LEVEL3_CACHE_SIZE said 320 MiB, the whole package's, though a core only ever
// caches in its own complex's L3; the depthwise forward then took a 9.6 MB output as likely cached and
// wrote it with plain stores, at twice the time of streaming ones (one thread, AVX2 path).
int64_t sysfs_cache_bytes(int level) {
  for (int index = 0; index < 8; ++index) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
    std::ifstream level_file(dir + "level"), type_file(dir + "type"), size_file(dir + "size");
    int cache_level = 0;
    std::string type, size;
    if (!(level_file >> cache_level) || !(type_file >> type) || !(size_file >> size)) continue;
    if (cache_level != level || type == "Instruction") continue;
    char* unit = nullptr;
    const long long value = std::strtoll(size.c_str(), &unit, 10);
    const int64_t scale = *unit == 'K' ? 1024 : *unit == 'M' ? 1024 * 1024 : *unit == '\0' ? 1 : 0;
    if (value > 0 && scale > 0) return value * scale;
  }
  return 0;
}

// The size of the cache of `level` (2 or 3): sysfs, else glibc's sysconf where there is one, else 0.
int64_t cache_bytes(int level) {
  const int64_t sysfs = sysfs_cache_bytes(level);
  if (sysfs > 0) return sysfs;
#ifdef _SC_LEVEL2_CACHE_SIZE  // glibc
  const long bytes = sysconf(level == 2 ? _SC_LEVEL2_CACHE_SIZE : _SC_LEVEL3_CACHE_SIZE);
  if (bytes > 0) return int64_t(bytes);
#endif
  return 0;
}
}  // namespace

// Read once: the kernels' cache rules ask on every call.
int64_t l2_cache_bytes() {
  static const int64_t bytes = cache_bytes(2);
  return bytes;
}
int64_t last_level_cache_bytes() {
  static const int64_t bytes = cache_bytes(3);
  return bytes;
}

}  // namespace cpu_isa
}  // namespace fastvid

// Schemas in csrc/ops.cpp. No tensor arguments: CompositeImplicitAutograd kernels serve every call.
TORCH_LIBRARY_IMPL(fastvid, CompositeImplicitAutograd, m) {
  using namespace fastvid::cpu_isa;
  m.impl("_cpu_isa", [] { return active_name(); });
  m.impl("_cpu_isa_supported", [] { return supported_name(); });
  m.impl("_cpu_isa_bf16", [] { return has_bf16(); });
  m.impl("_set_cpu_isa", [](std::string name) { set_isa(name); });
  m.impl("_cpu_isa_simulate", [](std::string name) { simulate(name); });
  m.impl("_cpu_isa_ran", [](std::string family) { return ran(family); });
  m.impl("_cpu_cache_bytes", [] { return std::vector<int64_t>{l2_cache_bytes(), last_level_cache_bytes()}; });
}
