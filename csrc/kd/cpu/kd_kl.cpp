// Fused KD softmax-KL row kernels on the CPU: scalar, AVX2+FMA and AVX-512 builds of one
// body (kd_body.inc), chosen at run time from pyc::active_cpu_isa(). See kd/kd.h for the math.
#include "kd/kd.h"

#include <cmath>
#include <cstring>
#include <limits>

#include "common/cpu_features.h"
#include "common/simd.h"

namespace pyc {

namespace {
inline double safe_max(float m) { return m == -INFINITY ? 0.0 : static_cast<double>(m); }
}  // namespace

KdPartial kd_empty_partial() { return KdPartial{-INFINITY, -INFINITY, 0.0, 0.0, 0.0}; }

KdPartial kd_merge(const KdPartial& p, const KdPartial& q, bool reverse) {
  KdPartial r;
  r.ms = p.ms > q.ms ? p.ms : q.ms;
  r.mt = p.mt > q.mt ? p.mt : q.mt;
  if (std::isnan(p.ms) || std::isnan(q.ms)) r.ms = NAN;
  if (std::isnan(p.mt) || std::isnan(q.mt)) r.mt = NAN;
  const double rs = safe_max(r.ms), rt = safe_max(r.mt);
  // Rescales one part to the merged maxima; parts with a zero sum contribute nothing (this
  // also covers parts whose maximum is -inf).
  auto add = [&](const KdPartial& x) {
    const double fs = x.ss != 0.0 ? std::exp(safe_max(x.ms) - rs) : 0.0;
    const double ft = x.st != 0.0 ? std::exp(safe_max(x.mt) - rt) : 0.0;
    r.ss += x.ss * fs;
    r.st += x.st * ft;
    // d = (w - m_w) - (o - m_o) changes by (m_w,old - m_w,new) - (m_o,old - m_o,new).
    if (reverse) {
      if (x.ss != 0.0)
        r.w += fs * (x.w + x.ss * ((safe_max(x.ms) - rs) - (safe_max(x.mt) - rt)));
    } else {
      if (x.st != 0.0)
        r.w += ft * (x.w + x.st * ((safe_max(x.mt) - rt) - (safe_max(x.ms) - rs)));
    }
  };
  r.ss = r.st = r.w = 0.0;
  add(p);
  add(q);
  return r;
}

void kd_finalize(const KdPartial& p, bool reverse, float* stats) {
  const double ls = std::log(p.ss), lt = std::log(p.st);
  // forward: KL = E_t[(b - mt) - (a - ms)] - log S_t + log S_s; reverse symmetric.
  const double kl = reverse ? p.w / p.ss - ls + lt : p.w / p.st - lt + ls;
  stats[0] = p.ms;
  stats[1] = static_cast<float>(ls);
  stats[2] = p.mt;
  stats[3] = static_cast<float>(lt);
  stats[4] = static_cast<float>(kl);
}

// ---------------------------------------------------------------------------------- scalar
namespace kd_scalar {
#define KD_TARGET
using VF = float;
constexpr int kW = 1;
inline VF vset1(float x) { return x; }
inline VF vmax(VF a, VF b) { return b > a || std::isnan(b) ? b : a; }
inline VF vexp(VF x) { return std::exp(x); }
inline VF vhmax(VF a) { return a; }
inline double vhsum(VF a) { return a; }
inline VF vsel_pos(VF e, VF x) { return e > 0.f ? x : 0.f; }
inline VF vloadf(const float* p) { return *p; }
inline void vstoref(float* p, VF v) { *p = v; }
template <DType DT>
inline VF vload(const void* p, int64_t i) { return load_as_float(p, i, DT); }
template <DType DT>
inline void vstore(void* p, int64_t i, VF v) { store_from_float(p, i, DT, v); }
template <DType DT>
inline void vstream(void* p, int64_t i, VF v) { store_from_float(p, i, DT, v); }
inline void vfence() {}
#include "kd/cpu/kd_body.inc"
#undef KD_TARGET
}  // namespace kd_scalar

#if PYC_HAVE_X86_SIMD
// ------------------------------------------------------------------------------------ AVX2
namespace kd_avx2 {
#define KD_TARGET PYC_TARGET_AVX2
using VF = __m256;
constexpr int kW = 8;
KD_TARGET inline VF vset1(float x) { return _mm256_set1_ps(x); }
// max_ps returns its second operand when either is NaN: keep NaN inputs visible.
KD_TARGET inline VF vmax(VF acc, VF x) { return _mm256_max_ps(acc, x); }
// exp for fp32 lanes: Cody-Waite range reduction x = n ln2 + r, degree-6 polynomial on
// |r| <= ln2/2 (relative error ~2 ulp), 2^n through the exponent bits. x < -87.33 (incl. -inf)
// gives 0; NaN propagates; arguments here are <= 0 up to rounding.
KD_TARGET inline VF vexp(VF x) {
  const VF lo = _mm256_set1_ps(-87.33654f), hi = _mm256_set1_ps(88.0f);
  const VF under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  VF xc = _mm256_min_ps(hi, _mm256_max_ps(lo, x));  // NaN stays NaN (second operand)
  const VF n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  VF r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  VF p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const VF y = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  return _mm256_andnot_ps(under, y);
}
KD_TARGET inline float vhmax(VF v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
  return _mm_cvtss_f32(m);
}
KD_TARGET inline double vhsum(VF v) {
  const __m256d a = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
  const __m256d b = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
  __m256d s = _mm256_add_pd(a, b);
  __m128d h = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
  h = _mm_add_sd(h, _mm_unpackhi_pd(h, h));
  return _mm_cvtsd_f64(h);
}
KD_TARGET inline VF vsel_pos(VF e, VF x) {
  return _mm256_and_ps(_mm256_cmp_ps(e, _mm256_setzero_ps(), _CMP_GT_OQ), x);
}
KD_TARGET inline VF vloadf(const float* p) { return _mm256_load_ps(p); }
KD_TARGET inline void vstoref(float* p, VF v) { _mm256_store_ps(p, v); }
template <DType DT>
KD_TARGET inline VF vload(const void* p, int64_t i) {
  if (DT == DType::F32) return _mm256_loadu_ps(static_cast<const float*>(p) + i);
  const __m128i h =
      _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
  if (DT == DType::F16) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
template <DType DT>
KD_TARGET inline void vstore(void* p, int64_t i, VF v) {
  if (DT == DType::F32) {
    _mm256_storeu_ps(static_cast<float*>(p) + i, v);
    return;
  }
  __m128i h;
  if (DT == DType::F16) {
    h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  } else {
    // round to nearest even; NaN lanes keep a quiet NaN pattern
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(
        _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
    const __m256i packed = _mm256_packus_epi32(r, r);  // per 128-bit lane
    h = _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
  }
  _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(p) + i), h);
}
template <DType DT>
KD_TARGET inline void vstream(void* p, int64_t i, VF v) {
  if (DT == DType::F32) {
    _mm256_stream_ps(static_cast<float*>(p) + i, v);
    return;
  }
  alignas(32) uint16_t tmp[8];
  vstore<DT>(tmp, 0, v);
  _mm_stream_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(p) + i),
                   _mm_load_si128(reinterpret_cast<const __m128i*>(tmp)));
}
KD_TARGET inline void vfence() { _mm_sfence(); }
#include "kd/cpu/kd_body.inc"
#undef KD_TARGET
}  // namespace kd_avx2

// --------------------------------------------------------------------------------- AVX-512
// GCC 12's AVX-512 intrinsic headers trip -Wmaybe-uninitialized on their own placeholders.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
namespace kd_avx512 {
#define KD_TARGET PYC_TARGET_AVX512
using VF = __m512;
constexpr int kW = 16;
KD_TARGET inline VF vset1(float x) { return _mm512_set1_ps(x); }
KD_TARGET inline VF vmax(VF acc, VF x) { return _mm512_max_ps(acc, x); }
// Same polynomial as the AVX2 path.
KD_TARGET inline VF vexp(VF x) {
  const VF lo = _mm512_set1_ps(-87.33654f), hi = _mm512_set1_ps(88.0f);
  const __mmask16 under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  const VF xc = _mm512_min_ps(hi, _mm512_max_ps(lo, x));
  const VF n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  VF r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), xc);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  VF p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  const VF y = _mm512_mul_ps(p, _mm512_castsi512_ps(e));
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~under), y);
}
// Horizontal reductions run once per chunk: through memory (keeps GCC's intrinsic headers quiet).
KD_TARGET inline float vhmax(VF v) {
  alignas(64) float b[16];
  _mm512_store_ps(b, v);
  float m = b[0];
  for (int k = 1; k < 16; ++k) m = b[k] > m || std::isnan(b[k]) ? b[k] : m;
  return m;
}
KD_TARGET inline double vhsum(VF v) {
  alignas(64) float b[16];
  _mm512_store_ps(b, v);
  double s = 0;
  for (int k = 0; k < 16; ++k) s += b[k];
  return s;
}
KD_TARGET inline VF vsel_pos(VF e, VF x) {
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(e, _mm512_setzero_ps(), _CMP_GT_OQ), x);
}
KD_TARGET inline VF vloadf(const float* p) { return _mm512_load_ps(p); }
KD_TARGET inline void vstoref(float* p, VF v) { _mm512_store_ps(p, v); }
template <DType DT>
KD_TARGET inline VF vload(const void* p, int64_t i) {
  if (DT == DType::F32) return _mm512_loadu_ps(static_cast<const float*>(p) + i);
  const __m256i h =
      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i));
  if (DT == DType::F16) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
template <DType DT>
KD_TARGET inline void vstore(void* p, int64_t i, VF v) {
  if (DT == DType::F32) {
    _mm512_storeu_ps(static_cast<float*>(p) + i, v);
    return;
  }
  __m256i h;
  if (DT == DType::F16) {
    h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  } else {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(
        _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7fc0));
    h = _mm512_cvtepi32_epi16(r);
  }
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(p) + i), h);
}
template <DType DT>
KD_TARGET inline void vstream(void* p, int64_t i, VF v) {
  if (DT == DType::F32) {
    _mm512_stream_ps(static_cast<float*>(p) + i, v);
    return;
  }
  alignas(64) uint16_t tmp[16];
  vstore<DT>(tmp, 0, v);
  _mm256_stream_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(p) + i),
                      _mm256_load_si256(reinterpret_cast<const __m256i*>(tmp)));
}
KD_TARGET inline void vfence() { _mm_sfence(); }
#include "kd/cpu/kd_body.inc"
#undef KD_TARGET
}  // namespace kd_avx512
#pragma GCC diagnostic pop
#endif  // PYC_HAVE_X86_SIMD

namespace {
int current_isa() {
  switch (active_cpu_isa()) {
    case CpuIsa::Scalar: return 0;
    case CpuIsa::Avx2: return 1;
    default: return 2;  // Avx512 and Amx levels share the AVX-512 kernels
  }
}
}  // namespace

KdPartial kd_partial_cpu_isa(int isa, const void* s, const void* t, DType dtype, int64_t n,
                             float inv_t, bool reverse) {
#if PYC_HAVE_X86_SIMD
  if (isa >= 2) return kd_avx512::partial_dispatch(s, t, dtype, n, inv_t, reverse);
  if (isa == 1) return kd_avx2::partial_dispatch(s, t, dtype, n, inv_t, reverse);
#endif
  return kd_scalar::partial_dispatch(s, t, dtype, n, inv_t, reverse);
}

void kd_grad_cpu_isa(int isa, const void* s, const void* t, void* g, DType dtype, int64_t n,
                     float inv_t, float temperature, bool reverse, const float* stats,
                     float coef) {
#if PYC_HAVE_X86_SIMD
  if (isa >= 2)
    return kd_avx512::grad_dispatch(s, t, g, dtype, n, inv_t, temperature, reverse, stats, coef);
  if (isa == 1)
    return kd_avx2::grad_dispatch(s, t, g, dtype, n, inv_t, temperature, reverse, stats, coef);
#endif
  kd_scalar::grad_dispatch(s, t, g, dtype, n, inv_t, temperature, reverse, stats, coef);
}

KdPartial kd_partial_cpu(const void* s, const void* t, DType dtype, int64_t n, float inv_t,
                         bool reverse) {
  return kd_partial_cpu_isa(current_isa(), s, t, dtype, n, inv_t, reverse);
}

void kd_grad_cpu(const void* s, const void* t, void* g, DType dtype, int64_t n, float inv_t,
                 float temperature, bool reverse, const float* stats, float coef) {
  kd_grad_cpu_isa(current_isa(), s, t, g, dtype, n, inv_t, temperature, reverse, stats, coef);
}

// ------------------------------------------------------------------------ float64 (scalar)
void kd_row_stats_f64(const double* s, const double* t, int64_t n, double inv_t, bool reverse,
                      double* stats) {
  double ms = -INFINITY, mt = -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    ms = std::fmax(ms, s[j] * inv_t);
    mt = std::fmax(mt, t[j] * inv_t);
  }
  const double cs = ms == -INFINITY ? 0.0 : ms, ct = mt == -INFINITY ? 0.0 : mt;
  double ss = 0, st = 0, w = 0;
  for (int64_t j = 0; j < n; ++j) {
    const double xa = s[j] * inv_t - cs, xb = t[j] * inv_t - ct;
    const double ea = std::exp(xa), eb = std::exp(xb);
    ss += ea;
    st += eb;
    if (reverse) {
      if (ea > 0) w += ea * (xa - xb);
    } else {
      if (eb > 0) w += eb * (xb - xa);
    }
  }
  const double ls = std::log(ss), lt = std::log(st);
  stats[0] = ms;
  stats[1] = ls;
  stats[2] = mt;
  stats[3] = lt;
  stats[4] = reverse ? w / ss - ls + lt : w / st - lt + ls;
}

void kd_row_grad_f64(const double* s, const double* t, double* g, int64_t n, double inv_t,
                     double temperature, bool reverse, const double* st, double coef) {
  const double c = coef * temperature;
  for (int64_t j = 0; j < n; ++j) {
    const double lps = (s[j] * inv_t - st[0]) - st[1];
    const double lpt = (t[j] * inv_t - st[2]) - st[3];
    const double ps = std::exp(lps);
    if (reverse) {
      g[j] = ps > 0 ? c * ps * ((lps - lpt) - st[4]) : 0.0;
    } else {
      g[j] = c * (ps - std::exp(lpt));
    }
  }
}

}  // namespace pyc
