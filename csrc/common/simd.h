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

#if PYC_HAVE_X86_SIMD
// 8 fp32 lanes -> 8 bf16 values (low 128 bits), rounded to nearest even; a NaN stays a
// quiet NaN (the rounding add must not carry it into infinity).
PYC_TARGET_AVX2 inline __m128i pyc_cvt_f32_bf16_avx2(__m256 v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i hi = _mm256_srli_epi32(u, 16);
  const __m256i lsb = _mm256_and_si256(hi, _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(
      _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)), 16);
  const __m256i absu = _mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff));
  const __m256i nan = _mm256_cmpgt_epi32(absu, _mm256_set1_epi32(0x7f800000));
  r = _mm256_blendv_epi8(r, _mm256_or_si256(hi, _mm256_set1_epi32(0x40)), nan);
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8));
}

// 16 fp32 lanes -> 16 bf16 values, the same bits as pyc_cvt_f32_bf16_avx2.
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq"))) inline __m256i pyc_cvt_f32_bf16_avx512(
    __m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i hi = _mm512_srli_epi32(u, 16);
  const __m512i lsb = _mm512_and_si512(hi, _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(
      _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb)), 16);
  const __mmask16 nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                _mm512_set1_epi32(0x7f800000));
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(hi, _mm512_set1_epi32(0x40)));
  return _mm512_cvtepi32_epi16(r);
}
#endif
