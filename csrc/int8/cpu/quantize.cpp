// Per-token symmetric int8 quantization on the CPU: scalar, AVX2 and AVX-512
// implementations selected at run time. All produce identical bits (see
// int8/quantize.h): fp32 multiply by 127/absmax, round-half-to-even, clamp.
#include "int8/quantize.h"

#include <cfloat>
#include <cmath>
#include <cstring>
#include <limits>

#include "common/cpu_features.h"
#include "common/simd.h"

namespace pyc {
namespace {

struct RowStats {
  float absmax;
  bool finite;
};

// Finalises a row from its statistics; returns the multiplier (0 for rows
// that quantize to all zeros) and writes the scale.
inline float row_multiplier(RowStats s, float* scale, float qmax) {
  if (!s.finite) {
    *scale = std::numeric_limits<float>::quiet_NaN();
    return 0.f;
  }
  if (s.absmax == 0.f) {
    *scale = 1.f;
    return 0.f;
  }
  *scale = s.absmax / qmax;
  return qmax / s.absmax;
}

inline int8_t quantize_one(float v, float inv, float qmax) {
  float r = std::nearbyint(v * inv);
  r = r > qmax ? qmax : (r < -qmax ? -qmax : r);
  return static_cast<int8_t>(r);
}

// A row whose absmax is below qmax / FLT_MAX (~3.7e-37): qmax / absmax overflows fp32, and
// x * inf would give +-qmax for every non-zero value and NaN for zeros. Such rows are scaled
// by 2^64 first (exact: a power of two, and nothing overflows), i.e. q = rint((x * 2^64) *
// (qmax / (absmax * 2^64))). Every ISA calls this one routine for them, so the bits agree.
constexpr float kTinyRowScale = 18446744073709551616.f;  // 2^64
void tiny_row(const void* x, DType dt, int64_t base, int8_t* qr, int64_t K, float absmax,
              float qmax) {
  const float inv = qmax / (absmax * kTinyRowScale);
  for (int64_t k = 0; k < K; ++k)
    qr[k] = quantize_one(load_as_float(x, base + k, dt) * kTinyRowScale, inv, qmax);
}

void rows_scalar(const void* x, DType dt, int64_t ldx, int8_t* q, int64_t ldq, float* scale,
                 int64_t r0, int64_t r1, int64_t K, int qm) {
  const float qmax = static_cast<float>(qm);
  for (int64_t m = r0; m < r1; ++m) {
    const int64_t base = m * ldx;
    RowStats s{0.f, true};
    for (int64_t k = 0; k < K; ++k) {
      const float a = std::fabs(load_as_float(x, base + k, dt));
      if (!(a <= FLT_MAX)) s.finite = false;
      s.absmax = a > s.absmax ? a : s.absmax;
    }
    const float inv = row_multiplier(s, scale + m, qmax);
    int8_t* qr = q + m * ldq;
    if (inv == 0.f) {
      for (int64_t k = 0; k < K; ++k) qr[k] = 0;
      continue;
    }
    if (std::isinf(inv)) {
      tiny_row(x, dt, base, qr, K, s.absmax, qmax);
      continue;
    }
    for (int64_t k = 0; k < K; ++k) qr[k] = quantize_one(load_as_float(x, base + k, dt), inv, qmax);
  }
}

#if PYC_HAVE_X86_SIMD

PYC_TARGET_AVX2 inline __m256 load8_avx2(const void* x, int64_t i, DType dt) {
  switch (dt) {
    case DType::F32:
      return _mm256_loadu_ps(static_cast<const float*>(x) + i);
    case DType::F16:
      return _mm256_cvtph_ps(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + i)));
    case DType::BF16:
    default: {
      __m128i h =
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + i));
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    }
  }
}

PYC_TARGET_AVX2 void rows_avx2(const void* x, DType dt, int64_t ldx, int8_t* q, int64_t ldq,
                               float* scale, int64_t r0, int64_t r1, int64_t K, int qm) {
  const float qmax = static_cast<float>(qm);
  const __m256 sign_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 fmax = _mm256_set1_ps(FLT_MAX);
  const __m256i lo127 = _mm256_set1_epi32(-qm), hi127 = _mm256_set1_epi32(qm);
  const int64_t Kv = K & ~int64_t(7);
  for (int64_t m = r0; m < r1; ++m) {
    const int64_t base = m * ldx;
    __m256 vmax = _mm256_setzero_ps();
    int bad = 0;
    for (int64_t k = 0; k < Kv; k += 8) {
      __m256 a = _mm256_and_ps(load8_avx2(x, base + k, dt), sign_mask);
      bad |= _mm256_movemask_ps(_mm256_cmp_ps(a, fmax, _CMP_NLE_UQ));
      vmax = _mm256_max_ps(vmax, a);
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
    RowStats s{_mm_cvtss_f32(m4), bad == 0};
    for (int64_t k = Kv; k < K; ++k) {
      const float a = std::fabs(load_as_float(x, base + k, dt));
      if (!(a <= FLT_MAX)) s.finite = false;
      s.absmax = a > s.absmax ? a : s.absmax;
    }
    const float inv = row_multiplier(s, scale + m, qmax);
    int8_t* qr = q + m * ldq;
    if (inv == 0.f) {  // zero or non-finite row: all zeros (NaN * 0 must not leak)
      std::memset(qr, 0, static_cast<size_t>(K));
      continue;
    }
    if (std::isinf(inv)) {
      tiny_row(x, dt, base, qr, K, s.absmax, qmax);
      continue;
    }
    const __m256 vinv = _mm256_set1_ps(inv);
    for (int64_t k = 0; k < Kv; k += 8) {
      __m256i i32 = _mm256_cvtps_epi32(_mm256_mul_ps(load8_avx2(x, base + k, dt), vinv));
      i32 = _mm256_min_epi32(_mm256_max_epi32(i32, lo127), hi127);
      __m128i p16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(qr + k), _mm_packs_epi16(p16, p16));
    }
    for (int64_t k = Kv; k < K; ++k) qr[k] = quantize_one(load_as_float(x, base + k, dt), inv, qmax);
  }
}

PYC_TARGET_AVX512 inline __m512 load16_avx512(const void* x, int64_t i, DType dt, __mmask16 mk) {
  switch (dt) {
    case DType::F32:
      return _mm512_maskz_loadu_ps(mk, static_cast<const float*>(x) + i);
    case DType::F16:
      return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, static_cast<const uint16_t*>(x) + i));
    case DType::BF16:
    default: {
      __m256i h = _mm256_maskz_loadu_epi16(mk, static_cast<const uint16_t*>(x) + i);
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
  }
}

PYC_TARGET_AVX512 void rows_avx512(const void* x, DType dt, int64_t ldx, int8_t* q, int64_t ldq,
                                   float* scale, int64_t r0, int64_t r1, int64_t K, int qm) {
  const float qmax = static_cast<float>(qm);
  const __m512 fmax = _mm512_set1_ps(FLT_MAX);
  const __m512i lo127 = _mm512_set1_epi32(-qm), hi127 = _mm512_set1_epi32(qm);
  for (int64_t m = r0; m < r1; ++m) {
    const int64_t base = m * ldx;
    __m512 vmax = _mm512_setzero_ps();
    __mmask16 bad = 0;
    for (int64_t k = 0; k < K; k += 16) {
      const int64_t left = K - k;
      const __mmask16 mk = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1u);
      __m512 a = _mm512_abs_ps(load16_avx512(x, base + k, dt, mk));
      bad |= _mm512_cmp_ps_mask(a, fmax, _CMP_NLE_UQ);
      vmax = _mm512_max_ps(vmax, a);
    }
    RowStats s{_mm512_reduce_max_ps(vmax), bad == 0};
    const float inv = row_multiplier(s, scale + m, qmax);
    int8_t* qr = q + m * ldq;
    if (inv == 0.f) {
      std::memset(qr, 0, static_cast<size_t>(K));
      continue;
    }
    if (std::isinf(inv)) {
      tiny_row(x, dt, base, qr, K, s.absmax, qmax);
      continue;
    }
    const __m512 vinv = _mm512_set1_ps(inv);
    for (int64_t k = 0; k < K; k += 16) {
      const int64_t left = K - k;
      const __mmask16 mk = left >= 16 ? __mmask16(0xffff) : __mmask16((1u << left) - 1u);
      __m512i i32 = _mm512_cvtps_epi32(_mm512_mul_ps(load16_avx512(x, base + k, dt, mk), vinv));
      i32 = _mm512_min_epi32(_mm512_max_epi32(i32, lo127), hi127);
      _mm_mask_storeu_epi8(qr + k, mk, _mm512_cvtepi32_epi8(i32));
    }
  }
}

#endif  // PYC_HAVE_X86_SIMD

}  // namespace

void quantize_per_token_cpu_isa(int isa, const void* x, DType dt, int64_t ldx, int8_t* q,
                                int64_t ldq, float* scale, int64_t r0, int64_t r1, int64_t K,
                                int qmax) {
#if PYC_HAVE_X86_SIMD
  if (isa >= 2) return rows_avx512(x, dt, ldx, q, ldq, scale, r0, r1, K, qmax);
  if (isa == 1) return rows_avx2(x, dt, ldx, q, ldq, scale, r0, r1, K, qmax);
#endif
  rows_scalar(x, dt, ldx, q, ldq, scale, r0, r1, K, qmax);
}

void quantize_per_token_cpu(const void* x, DType dt, int64_t ldx, int8_t* q, int64_t ldq,
                            float* scale, int64_t r0, int64_t r1, int64_t K, int qmax) {
  quantize_per_token_cpu_isa(static_cast<int>(active_cpu_isa()), x, dt, ldx, q, ldq, scale, r0,
                             r1, K, qmax);
}

}  // namespace pyc
