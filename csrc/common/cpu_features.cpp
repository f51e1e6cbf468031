#include "common/cpu_features.h"

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <stdexcept>

#if defined(__x86_64__) || defined(_M_X64)
#define PYC_X86 1
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

namespace pyc {
namespace {

#if PYC_X86
unsigned long long xgetbv0() {
  unsigned int eax = 0, edx = 0;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<unsigned long long>(edx) << 32) | eax;
}
#endif

CpuFeatures detect() {
  CpuFeatures f;
#if PYC_X86
  unsigned int eax, ebx, ecx, edx;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx)) return f;
  const bool osxsave = (ecx >> 27) & 1;
  const bool avx = (ecx >> 28) & 1;
  f.fma = (ecx >> 12) & 1;
  f.f16c = (ecx >> 29) & 1;
  unsigned long long xcr0 = osxsave ? xgetbv0() : 0;
  const bool os_avx = (xcr0 & 0x6) == 0x6;
  f.os_avx512 = os_avx && ((xcr0 & 0xE0) == 0xE0);
  const bool os_tile_cfg = ((xcr0 >> 17) & 3) == 3;
  if (__get_cpuid_max(0, nullptr) >= 7) {
    __cpuid_count(7, 0, eax, ebx, ecx, edx);
    f.avx2 = avx && os_avx && ((ebx >> 5) & 1);
    f.avx512f = f.os_avx512 && ((ebx >> 16) & 1);
    f.avx512dq = f.os_avx512 && ((ebx >> 17) & 1);
    f.avx512bw = f.os_avx512 && ((ebx >> 30) & 1);
    f.avx512vl = f.os_avx512 && ((ebx >> 31) & 1);
    f.avx512vnni = f.os_avx512 && ((ecx >> 11) & 1);
    f.amx_bf16 = (edx >> 22) & 1;
    f.amx_tile = (edx >> 24) & 1;
    f.amx_int8 = (edx >> 25) & 1;
    unsigned int a1, b1, c1, d1;
    __cpuid_count(7, 1, a1, b1, c1, d1);
    f.avx512bf16 = f.os_avx512 && ((a1 >> 5) & 1);
  }
  f.fma = f.fma && f.avx2;
  f.f16c = f.f16c && f.avx2;
  f.os_amx = false;
  if (f.amx_tile && f.amx_int8 && os_tile_cfg) f.os_amx = request_amx_permission();
#endif
  return f;
}

CpuIsa compute_max(const CpuFeatures& f) {
  if (f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq && f.fma && f.f16c) {
    if (f.os_amx && f.avx512vnni) return CpuIsa::Amx;
    return CpuIsa::Avx512;
  }
  if (f.avx2 && f.fma && f.f16c) return CpuIsa::Avx2;
  return CpuIsa::Scalar;
}

bool parse_isa(const std::string& s, CpuIsa* out, bool* is_auto) {
  *is_auto = false;
  if (s == "scalar") { *out = CpuIsa::Scalar; return true; }
  if (s == "avx2") { *out = CpuIsa::Avx2; return true; }
  if (s == "avx512") { *out = CpuIsa::Avx512; return true; }
  if (s == "amx") { *out = CpuIsa::Amx; return true; }
  if (s == "auto" || s.empty()) { *is_auto = true; *out = CpuIsa::Amx; return true; }
  return false;
}

std::atomic<int> g_requested{-1};  // -1: not yet initialised from env

int requested_level() {
  int r = g_requested.load(std::memory_order_relaxed);
  if (r >= 0) return r;
  int level = static_cast<int>(CpuIsa::Amx);
  if (const char* env = std::getenv("PYCOMPRESS_CPU_ISA")) {
    CpuIsa isa;
    bool is_auto;
    if (parse_isa(env, &isa, &is_auto)) level = static_cast<int>(isa);
  }
  int expected = -1;
  g_requested.compare_exchange_strong(expected, level);
  return g_requested.load();
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

CpuIsa max_cpu_isa() {
  static const CpuIsa m = compute_max(cpu_features());
  return m;
}

CpuIsa active_cpu_isa() {
  int req = requested_level();
  int mx = static_cast<int>(max_cpu_isa());
  return static_cast<CpuIsa>(req < mx ? req : mx);
}

CpuIsa set_cpu_isa(const std::string& name) {
  CpuIsa isa;
  bool is_auto;
  if (!parse_isa(name, &isa, &is_auto)) {
    throw std::invalid_argument("unknown CPU ISA '" + name +
                                "' (expected one of: auto, scalar, avx2, avx512, amx)");
  }
  g_requested.store(static_cast<int>(isa));
  return active_cpu_isa();
}

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::Scalar: return "scalar";
    case CpuIsa::Avx2: return "avx2";
    case CpuIsa::Avx512: return "avx512";
    case CpuIsa::Amx: return "amx";
  }
  return "unknown";
}

bool request_amx_permission() {
#if PYC_X86 && defined(__linux__)
  static std::once_flag once;
  static bool granted = false;
  std::call_once(once, [] {
    constexpr int kArchGetXcompPerm = 0x1022;
    constexpr int kArchReqXcompPerm = 0x1023;
    constexpr int kXfeatureXtiledata = 18;
    unsigned long bitmask = 0;
    if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0 &&
        syscall(SYS_arch_prctl, kArchGetXcompPerm, &bitmask) == 0) {
      granted = (bitmask & (1UL << kXfeatureXtiledata)) != 0;
    }
  });
  return granted;
#else
  return false;
#endif
}

}  // namespace pyc
