// MaskedLinear kernels (fp32): forward, grad_input and grad_weight with the mask applied in
// registers (scalar and AVX2; the AVX-512 level uses the AVX2 code). See sparse/sparse.h.
#include "common/simd.h"
#include "sparse/sparse.h"

namespace pyc {
namespace {

inline float mw(const float* w, const uint8_t* mask, int64_t i) { return mask[i] ? w[i] : 0.f; }

// ---------------------------------------------------------------- scalar
void fwd_scalar(const float* x, const float* w, const uint8_t* mask, const float* bias, float* y,
                int64_t M, int64_t N, int64_t K, int64_t n0, int64_t n1, int64_t m0 = 0) {
  for (int64_t m = m0; m < M; ++m)
    for (int64_t n = n0; n < n1; ++n) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += x[m * K + k] * mw(w, mask, n * K + k);
      y[m * N + n] = (bias ? bias[n] : 0.f) + s;
    }
}

void gin_scalar(const float* g, const float* w, const uint8_t* mask, float* gx, int64_t M,
                int64_t N, int64_t K, int64_t k0, int64_t k1) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = k0; k < k1; ++k) {
      float s = 0.f;
      for (int64_t n = 0; n < N; ++n) s += g[m * N + n] * mw(w, mask, n * K + k);
      gx[m * K + k] = s;
    }
}

void gw_scalar(const float* g, const float* x, const uint8_t* mask, float* gw, int64_t M,
               int64_t N, int64_t K, int64_t n0, int64_t n1, int64_t k0 = 0) {
  for (int64_t n = n0; n < n1; ++n)
    for (int64_t k = k0; k < K; ++k) {
      float s = 0.f;
      if (mask[n * K + k])
        for (int64_t m = 0; m < M; ++m) s += g[m * N + n] * x[m * K + k];
      gw[n * K + k] = s;
    }
}

#if PYC_HAVE_X86_SIMD
// ---------------------------------------------------------------- AVX2
PYC_TARGET_AVX2 inline __m256 mask8(const uint8_t* m) {
  const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(m)));
  return _mm256_castsi256_ps(_mm256_cmpgt_epi32(b, _mm256_setzero_si256()));
}
PYC_TARGET_AVX2 inline __m256 load_masked(const float* w, const uint8_t* m) {
  return _mm256_and_ps(_mm256_loadu_ps(w), mask8(m));
}
PYC_TARGET_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Tile of MR activation rows x NR weight rows, dot products along K.
template <int MR, int NR>
PYC_TARGET_AVX2 inline void fwd_tile(const float* x, const float* w, const uint8_t* mask,
                                     const float* bias, float* y, int64_t N, int64_t K,
                                     int64_t m, int64_t n) {
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 xv[MR];
    for (int i = 0; i < MR; ++i) xv[i] = _mm256_loadu_ps(x + (m + i) * K + k);
    for (int j = 0; j < NR; ++j) {
      const __m256 wv = load_masked(w + (n + j) * K + k, mask + (n + j) * K + k);
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm256_fmadd_ps(xv[i], wv, acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      float s = hsum(acc[i][j]);
      for (int64_t kk = k; kk < K; ++kk) s += x[(m + i) * K + kk] * mw(w, mask, (n + j) * K + kk);
      y[(m + i) * N + n + j] = (bias ? bias[n + j] : 0.f) + s;
    }
}

template <int NR>
PYC_TARGET_AVX2 void fwd_cols(const float* x, const float* w, const uint8_t* mask,
                              const float* bias, float* y, int64_t M, int64_t N, int64_t K,
                              int64_t n) {
  int64_t m = 0;
  for (; m + 2 <= M; m += 2) fwd_tile<2, NR>(x, w, mask, bias, y, N, K, m, n);
  for (; m < M; ++m) fwd_tile<1, NR>(x, w, mask, bias, y, N, K, m, n);
}

PYC_TARGET_AVX2 void fwd_avx2(const float* x, const float* w, const uint8_t* mask,
                              const float* bias, float* y, int64_t M, int64_t N, int64_t K,
                              int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) fwd_cols<4>(x, w, mask, bias, y, M, N, K, n);
  for (; n < n1; ++n) fwd_cols<1>(x, w, mask, bias, y, M, N, K, n);
}

// grad_input: MR rows of g x 16 columns of k, loop over n.
template <int MR>
PYC_TARGET_AVX2 inline void gin_tile(const float* g, const float* w, const uint8_t* mask,
                                     float* gx, int64_t N, int64_t K, int64_t m, int64_t k) {
  __m256 acc[MR][2];
  for (int i = 0; i < MR; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  for (int64_t n = 0; n < N; ++n) {
    const __m256 w0 = load_masked(w + n * K + k, mask + n * K + k);
    const __m256 w1 = load_masked(w + n * K + k + 8, mask + n * K + k + 8);
    for (int i = 0; i < MR; ++i) {
      const __m256 gv = _mm256_broadcast_ss(g + (m + i) * N + n);
      acc[i][0] = _mm256_fmadd_ps(gv, w0, acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(gv, w1, acc[i][1]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    _mm256_storeu_ps(gx + (m + i) * K + k, acc[i][0]);
    _mm256_storeu_ps(gx + (m + i) * K + k + 8, acc[i][1]);
  }
}

PYC_TARGET_AVX2 void gin_avx2(const float* g, const float* w, const uint8_t* mask, float* gx,
                              int64_t M, int64_t N, int64_t K, int64_t k0, int64_t k1) {
  int64_t k = k0;
  for (; k + 16 <= k1; k += 16) {
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) gin_tile<4>(g, w, mask, gx, N, K, m, k);
    for (; m < M; ++m) gin_tile<1>(g, w, mask, gx, N, K, m, k);
  }
  if (k < k1) gin_scalar(g, w, mask, gx, M, N, K, k, k1);
}

// grad_weight: NR rows of n x 16 columns of k, loop over m, mask at the store.
template <int NR>
PYC_TARGET_AVX2 inline void gw_tile(const float* g, const float* x, const uint8_t* mask,
                                    float* gw, int64_t M, int64_t N, int64_t K, int64_t n,
                                    int64_t k) {
  __m256 acc[NR][2];
  for (int j = 0; j < NR; ++j) acc[j][0] = acc[j][1] = _mm256_setzero_ps();
  for (int64_t m = 0; m < M; ++m) {
    const __m256 x0 = _mm256_loadu_ps(x + m * K + k);
    const __m256 x1 = _mm256_loadu_ps(x + m * K + k + 8);
    for (int j = 0; j < NR; ++j) {
      const __m256 gv = _mm256_broadcast_ss(g + m * N + n + j);
      acc[j][0] = _mm256_fmadd_ps(gv, x0, acc[j][0]);
      acc[j][1] = _mm256_fmadd_ps(gv, x1, acc[j][1]);
    }
  }
  for (int j = 0; j < NR; ++j) {
    const int64_t o = (n + j) * K + k;
    _mm256_storeu_ps(gw + o, _mm256_and_ps(acc[j][0], mask8(mask + o)));
    _mm256_storeu_ps(gw + o + 8, _mm256_and_ps(acc[j][1], mask8(mask + o + 8)));
  }
}

PYC_TARGET_AVX2 void gw_avx2(const float* g, const float* x, const uint8_t* mask, float* gw,
                             int64_t M, int64_t N, int64_t K, int64_t n0, int64_t n1) {
  const int64_t kv = K / 16 * 16;
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4)
    for (int64_t k = 0; k < kv; k += 16) gw_tile<4>(g, x, mask, gw, M, N, K, n, k);
  for (; n < n1; ++n)
    for (int64_t k = 0; k < kv; k += 16) gw_tile<1>(g, x, mask, gw, M, N, K, n, k);
  if (kv < K) gw_scalar(g, x, mask, gw, M, N, K, n0, n1, kv);
}
#endif  // PYC_HAVE_X86_SIMD

}  // namespace

void masked_linear_fwd_cpu(CpuIsa isa, const float* x, const float* w, const uint8_t* mask,
                           const float* bias, float* y, int64_t M, int64_t N, int64_t K,
                           int64_t n0, int64_t n1) {
#if PYC_HAVE_X86_SIMD
  if (isa >= CpuIsa::Avx2) return fwd_avx2(x, w, mask, bias, y, M, N, K, n0, n1);
#endif
  fwd_scalar(x, w, mask, bias, y, M, N, K, n0, n1);
}

void masked_linear_grad_input_cpu(CpuIsa isa, const float* g, const float* w,
                                  const uint8_t* mask, float* gx, int64_t M, int64_t N,
                                  int64_t K, int64_t k0, int64_t k1) {
#if PYC_HAVE_X86_SIMD
  if (isa >= CpuIsa::Avx2) return gin_avx2(g, w, mask, gx, M, N, K, k0, k1);
#endif
  gin_scalar(g, w, mask, gx, M, N, K, k0, k1);
}

void masked_linear_grad_weight_cpu(CpuIsa isa, const float* g, const float* x,
                                   const uint8_t* mask, float* gw, int64_t M, int64_t N,
                                   int64_t K, int64_t n0, int64_t n1) {
#if PYC_HAVE_X86_SIMD
  if (isa >= CpuIsa::Avx2) return gw_avx2(g, x, mask, gw, M, N, K, n0, n1);
#endif
  gw_scalar(g, x, mask, gw, M, N, K, n0, n1);
}

}  // namespace pyc
