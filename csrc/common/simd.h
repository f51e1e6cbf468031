// Helpers to compile one function for a given instruction set inside an
// otherwise portable translation unit (GCC/Clang target attributes).
#pragma once

#if defined(__x86_64__) || defined(_M_X64)
#define PYC_HAVE_X86_SIMD 1
#include <immintrin.h>
#define PYC_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define PYC_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")))
#define PYC_TARGET_AVX512VNNI \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c")))
#define PYC_TARGET_AMX \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma,f16c,amx-tile,amx-int8")))
#else
#define PYC_HAVE_X86_SIMD 0
#define PYC_TARGET_AVX2
#define PYC_TARGET_AVX512
#define PYC_TARGET_AVX512VNNI
#define PYC_TARGET_AMX
#endif
