// CSR sparse x dense kernels of SparseLinear: scalar, AVX2 and AVX-512, picked at run time.
// See sparse/sparse.h for the format. The M >= 2 kernels vectorize along the dense (token)
// dimension: each kept weight is broadcast once and multiplied into Mp activations that sit
// contiguously in the transposed activation copy xT [K, Mp].
#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <vector>

#include "common/simd.h"
#include "sparse/sparse.h"

namespace pyc {
namespace {

template <typename I>
inline const I* idx_ptr(const void* p) {
  return static_cast<const I*>(p);
}

constexpr int64_t kRowBlock = 16;

// y[m, nb + j] = tile[j, m] for j < ne - nb, m0 <= m < M.
inline void flush_tile(const float* tile, int64_t Mp, float* y, int64_t ldy, int64_t m0, int64_t M,
                       int64_t nb, int64_t ne) {
  const int64_t cnt = ne - nb;
  for (int64_t m = m0; m < M; ++m) {
    float* yr = y + m * ldy + nb;
    for (int64_t j = 0; j < cnt; ++j) yr[j] = tile[j * Mp + m];
  }
}

// ---------------------------------------------------------------- scalar
template <typename I>
void gemv_scalar(const float* x, const int32_t* rp, const I* ci, const float* v, const float* bias,
                 float* y, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    float a0 = 0.f, a1 = 0.f;
    int32_t p = rp[n];
    const int32_t e = rp[n + 1];
    for (; p + 2 <= e; p += 2) {
      a0 += v[p] * x[ci[p]];
      a1 += v[p + 1] * x[ci[p + 1]];
    }
    if (p < e) a0 += v[p] * x[ci[p]];
    y[n] = (bias ? bias[n] : 0.f) + (a0 + a1);
  }
}

template <typename I>
void spmm_t_scalar(const float* xT, int64_t Mp, const int32_t* rp, const I* ci, const float* v,
                   const float* bias, float* y, int64_t ldy, int64_t M, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const float b = bias ? bias[n] : 0.f;
    for (int64_t m = 0; m < M; ++m) {
      float a = 0.f;
      for (int32_t p = rp[n]; p < rp[n + 1]; ++p) a += v[p] * xT[static_cast<int64_t>(ci[p]) * Mp + m];
      y[m * ldy + n] = a + b;
    }
  }
}

// ACC: y[n] += sum (no bias) instead of y[n] = bias[n] + sum.
template <bool ACC, typename I>
void sell_scalar(const float* x, const SellView& L, const I* idx, const float* bias, float* y,
                 int64_t s0, int64_t s1) {
  for (int64_t s = s0; s < s1; ++s) {
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int64_t p = L.slice_off[s]; p < L.slice_off[s + 1]; p += 8)
      for (int l = 0; l < 8; ++l) acc[l] = std::fma(L.vals[p + l], x[idx[p + l]], acc[l]);
    for (int l = 0; l < 8; ++l) {
      const int32_t n = L.row_of[8 * s + l];
      if (n >= 0) y[n] = ACC ? y[n] + acc[l] : (bias ? bias[n] : 0.f) + acc[l];
    }
  }
}

#if PYC_HAVE_X86_SIMD
// ---------------------------------------------------------------- AVX2
PYC_TARGET_AVX2 inline __m256i load8_idx(const int16_t* p) {
  return _mm256_cvtepi16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
PYC_TARGET_AVX2 inline __m256i load8_idx(const int32_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

PYC_TARGET_AVX2 inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// o[q][i] = r[i][q] for an 8x8 block of floats.
PYC_TARGET_AVX2 inline __attribute__((always_inline)) void transpose8x8_avx2(const __m256* r,
                                                                             __m256* o) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  o[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
  o[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
  o[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
  o[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
  o[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
  o[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
  o[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
  o[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}

// flush_tile with 8x8 register transposes for whole blocks (a full tile of kRowBlock rows and
// 8 tokens); the rest element-wise.
PYC_TARGET_AVX2 void flush_tile_avx2(const float* tile, int64_t Mp, float* y, int64_t ldy,
                                     int64_t M, int64_t nb, int64_t ne) {
  int64_t m0 = 0;
  if (ne - nb == kRowBlock) {
    for (; m0 + 8 <= M; m0 += 8) {
      for (int64_t j0 = 0; j0 < kRowBlock; j0 += 8) {
        __m256 r[8], o[8];
        for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(tile + (j0 + i) * Mp + m0);
        transpose8x8_avx2(r, o);
        for (int q = 0; q < 8; ++q) _mm256_storeu_ps(y + (m0 + q) * ldy + nb + j0, o[q]);
      }
    }
  }
  flush_tile(tile, Mp, y, ldy, m0, M, nb, ne);
}

// M == 1. AVX2 gathers are slow on Zen (an 8-lane gather costs more than eight scalar loads),
// so each group of 8 kept weights is assembled into a vector from scalar loads (a load and an
// insert per weight) and multiplied by 8 contiguous values with one FMA. int16 indices are read
// four at a time as one 64-bit word. Two rows are computed together (independent accumulators,
// more work between the hard-to-predict row ends); the last < 8 weights of a row are one more
// vector whose lanes past the row end are masked to zero (the indices and values read there
// belong to the following rows of the same task, so they are in bounds), or scalar FMAs at the
// very end of the task's range.
PYC_TARGET_AVX2 inline __attribute__((always_inline)) __m256 gather8_avx2(const float* x,
                                                                          const int32_t* c) {
  return _mm256_setr_ps(x[c[0]], x[c[1]], x[c[2]], x[c[3]], x[c[4]], x[c[5]], x[c[6]], x[c[7]]);
}
PYC_TARGET_AVX2 inline __attribute__((always_inline)) __m256 gather8_avx2(const float* x,
                                                                          const int16_t* c) {
  uint32_t a[4];
  std::memcpy(a, c, 16);
  return _mm256_setr_ps(x[a[0] & 0xffff], x[a[0] >> 16], x[a[1] & 0xffff], x[a[1] >> 16],
                        x[a[2] & 0xffff], x[a[2] >> 16], x[a[3] & 0xffff], x[a[3] >> 16]);
}

alignas(32) constexpr int32_t kLaneMask[16] = {-1, -1, -1, -1, -1, -1, -1, -1,
                                                0,  0,  0,  0,  0,  0,  0,  0};

// Adds the kept weights [p, e) of one row to acc0/acc1 (8-wide); pend bounds the readable
// range of ci/v for the masked tail.
template <typename I>
PYC_TARGET_AVX2 inline __attribute__((always_inline)) void gemv_row_avx2(
    const float* x, const I* ci, const float* v, int32_t p, int32_t e, int32_t pend, __m256& acc0,
    __m256& acc1) {
  if (p + 16 <= e) {
    const I* c = ci + p;
    const float* vv = v + p;
    int32_t cnt = (e - p) / 16;
    p += cnt * 16;
    do {
      acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(vv), gather8_avx2(x, c), acc0);
      acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(vv + 8), gather8_avx2(x, c + 8), acc1);
      c += 16;
      vv += 16;
    } while (--cnt);
  }
  if (p + 8 <= e) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(v + p), gather8_avx2(x, ci + p), acc0);
    p += 8;
  }
  if (p < e) {
    if (p + 8 <= pend) {
      const __m256 m = _mm256_castsi256_ps(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(kLaneMask + 8 - (e - p))));
      acc1 = _mm256_fmadd_ps(_mm256_and_ps(_mm256_loadu_ps(v + p), m),
                             _mm256_and_ps(gather8_avx2(x, ci + p), m), acc1);
    } else {
      float a = 0.f;
      for (; p < e; ++p) a = std::fma(v[p], x[ci[p]], a);
      acc1 = _mm256_add_ps(acc1, _mm256_setr_ps(a, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f));
    }
  }
}

template <typename I>
PYC_TARGET_AVX2 void gemv_avx2(const float* x, const int32_t* rp, const I* ci, const float* v,
                               const float* bias, float* y, int64_t n0, int64_t n1) {
  const int32_t pend = rp[n1];
  int64_t n = n0;
  for (; n + 2 <= n1; n += 2) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    __m256 b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();
    gemv_row_avx2(x, ci, v, rp[n], rp[n + 1], pend, a0, a1);
    gemv_row_avx2(x, ci, v, rp[n + 1], rp[n + 2], pend, b0, b1);
    y[n] = (bias ? bias[n] : 0.f) + hsum256(_mm256_add_ps(a0, a1));
    y[n + 1] = (bias ? bias[n + 1] : 0.f) + hsum256(_mm256_add_ps(b0, b1));
  }
  if (n < n1) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    gemv_row_avx2(x, ci, v, rp[n], rp[n + 1], pend, a0, a1);
    y[n] = (bias ? bias[n] : 0.f) + hsum256(_mm256_add_ps(a0, a1));
  }
}

// M == 1 on the sliced layout: one step (8 rows x 1 kept weight) is one assembled vector of
// inputs and one FMA; two steps per iteration on independent accumulators.
// Cost on Zen 3 (AVX2, 3.2 GHz): about 6.3 cycles per step, no faster with the data in L1 or L2.
// Assembling 8 inputs from scalar loads takes 4.0 cycles by itself (two loads into vector
// registers per cycle, nine per step with the weights); the index loads add the rest. Measured
// and not faster: insert chains, broadcast + blend, BEXTR / 32-bit words / one load per index,
// inputs moved in through integer loads, 8-bit column deltas, hardware gathers (11.7 cycles),
// software prefetch, and column-chunk layouts assembled with vpermps (lanes 38-47% used; a
// vpermps costs about 1.3 cycles on this core).
template <bool ACC, typename I>
PYC_TARGET_AVX2 void sell_avx2(const float* x, const SellView& L, const I* idx,
                               const float* bias, float* y, int64_t s0, int64_t s1) {
  for (int64_t s = s0; s < s1; ++s) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    const I* c = idx + L.slice_off[s];
    const float* vv = L.vals + L.slice_off[s];
    int64_t steps = (L.slice_off[s + 1] - L.slice_off[s]) / 8;
    for (; steps >= 2; steps -= 2) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(vv), gather8_avx2(x, c), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(vv + 8), gather8_avx2(x, c + 8), a1);
      c += 16;
      vv += 16;
    }
    if (steps) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(vv), gather8_avx2(x, c), a0);
    alignas(32) float r[8];
    _mm256_store_ps(r, _mm256_add_ps(a0, a1));
    const int32_t* rows = L.row_of + 8 * s;
    for (int l = 0; l < 8; ++l) {
      const int32_t n = rows[l];
      if (n >= 0) y[n] = ACC ? y[n] + r[l] : (bias ? bias[n] : 0.f) + r[l];
    }
  }
}

// One output row, NV vectors of 8 along the dense dimension starting at column m0; U
// independent accumulator sets over consecutive kept weights hide the FMA latency. S is the
// row stride of xT when known at compile time (0: use Mp), which turns the index multiply into
// a shift.
template <int NV>
PYC_TARGET_AVX2 inline __attribute__((always_inline)) void spmm_entry_avx2(__m256* acc,
                                                                           const float* xr,
                                                                           float wv) {
  const __m256 w = _mm256_set1_ps(wv);
  for (int j = 0; j < NV; ++j) acc[j] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xr + 8 * j), acc[j]);
}

// Column indices of 4 consecutive kept weights (int16: one 64-bit load; indices are >= 0).
struct Idx4 {
  int64_t k[4];
};
inline __attribute__((always_inline)) Idx4 load_idx4(const int16_t* c) {
  uint64_t a;
  std::memcpy(&a, c, 8);
  return {{static_cast<int64_t>(a & 0xffff), static_cast<int64_t>((a >> 16) & 0xffff),
           static_cast<int64_t>((a >> 32) & 0xffff), static_cast<int64_t>(a >> 48)}};
}
inline __attribute__((always_inline)) Idx4 load_idx4(const int32_t* c) {
  return {{c[0], c[1], c[2], c[3]}};
}

// Four consecutive kept weights c[0..3], v[0..3]; entry j goes into accumulator set
// (s0 + j) % U. The weights are loaded as one vector and broadcast lane by lane with in-lane
// shuffles (fewer loads than four scalar broadcasts; loads are the bottleneck).
template <int NV, int U, bool PF, int KD, typename I>
PYC_TARGET_AVX2 inline __attribute__((always_inline)) void spmm_quad_avx2(
    __m256 (*acc)[NV], int s0, const float* base, int64_t ld, const I* c, const float* v) {
  const Idx4 ix = load_idx4(c);
  const __m256 v4 = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(v));
  const __m256 w[4] = {_mm256_permute_ps(v4, 0x00), _mm256_permute_ps(v4, 0x55),
                       _mm256_permute_ps(v4, 0xAA), _mm256_permute_ps(v4, 0xFF)};
  if (PF) {
    const Idx4 nx = load_idx4(c + KD);
    for (int q = 0; q < 4; ++q) {
      const char* pf = reinterpret_cast<const char*>(base + nx.k[q] * ld);
      for (int j = 0; j < NV; j += 2) _mm_prefetch(pf + 32 * j, _MM_HINT_T0);
    }
  }
  for (int q = 0; q < 4; ++q) {
    const float* xr = base + ix.k[q] * ld;
    __m256* a = acc[(s0 + q) % U];
    for (int j = 0; j < NV; ++j) a[j] = _mm256_fmadd_ps(w[q], _mm256_loadu_ps(xr + 8 * j), a[j]);
  }
}

template <int NV, int S, typename I>
PYC_TARGET_AVX2 inline __attribute__((always_inline)) void spmm_row_avx2(
    const float* xT, int64_t Mp, int64_t m0, int32_t p, int32_t e, const I* ci, const float* v,
    float b, float* yc) {
  constexpr int U = NV >= 8 ? 1 : 8 / NV;  // NV * U >= 8 independent FMA chains
  const int64_t ld = S ? S : Mp;
  __m256 acc[U][NV];
  for (int u = 0; u < U; ++u)
    for (int j = 0; j < NV; ++j) acc[u][j] = _mm256_setzero_ps();
  const float* base = xT + m0;
  // groups of G >= 4 entries (a multiple of U), 4 at a time
  constexpr int G = U > 4 ? U : 4;
  if (NV >= 4) {
    // wide rows of xT (>= 128 bytes) do not stay in L1: fetch the rows of the kept weights
    // kD entries ahead
    constexpr int kD = 16;
    if (p + G + kD <= e) {
      const I* c = ci + p;
      const float* vv = v + p;
      int32_t cnt = (e - kD - p) / G;
      p += cnt * G;
      do {
        for (int g = 0; g < G; g += 4)
          spmm_quad_avx2<NV, U, true, kD>(acc, g, base, ld, c + g, vv + g);
        c += G;
        vv += G;
      } while (--cnt);
    }
  }
  if (p + G <= e) {
    // pointer-stepped (fewer live integer registers in the hot loop)
    const I* c = ci + p;
    const float* vv = v + p;
    int32_t cnt = (e - p) / G;
    p += cnt * G;
    do {
      for (int g = 0; g < G; g += 4) spmm_quad_avx2<NV, U, false, 0>(acc, g, base, ld, c + g, vv + g);
      c += G;
      vv += G;
    } while (--cnt);
  }
  for (; p + U <= e; p += U) {
    for (int u = 0; u < U; ++u)
      spmm_entry_avx2<NV>(acc[u], base + static_cast<int64_t>(ci[p + u]) * ld, v[p + u]);
  }
  // tail: fewer than U kept weights left, each into its own accumulator set
  for (int u = 0; u < U - 1; ++u) {
    if (p + u >= e) break;
    spmm_entry_avx2<NV>(acc[u], base + static_cast<int64_t>(ci[p + u]) * ld, v[p + u]);
  }
  const __m256 bv = _mm256_set1_ps(b);
  for (int j = 0; j < NV; ++j) {
    __m256 s = acc[0][j];
    for (int u = 1; u < U; ++u) s = _mm256_add_ps(s, acc[u][j]);
    _mm256_storeu_ps(yc + m0 + 8 * j, _mm256_add_ps(s, bv));
  }
}

template <int S, typename I>
PYC_TARGET_AVX2 void spmm_t_avx2_rows(const float* xT, int64_t Mp, const int32_t* rp, const I* ci,
                                      const float* v, const float* bias, float* y, int64_t ldy,
                                      int64_t M, int64_t n0, int64_t n1) {
  // rows are computed into a small tile [kRowBlock, Mp] and written to y [M, ldy] block-wise,
  // so each token's outputs are stored contiguously
  if (S) Mp = S;
  // the tile lives on the stack when small (no heap allocation per task)
  alignas(32) float small[S > 0 && S <= 64 ? kRowBlock * S : 1];
  std::vector<float> heap(S > 0 && S <= 64 ? 0 : kRowBlock * Mp);
  float* const tile = S > 0 && S <= 64 ? small : heap.data();
  for (int64_t nb = n0; nb < n1; nb += kRowBlock) {
    const int64_t ne = nb + kRowBlock < n1 ? nb + kRowBlock : n1;
    for (int64_t n = nb; n < ne; ++n) {
      float* yr = tile + (n - nb) * Mp;
      const float b = bias ? bias[n] : 0.f;
      const int32_t p = rp[n], e = rp[n + 1];
      int64_t m0 = 0;
      for (; m0 + 64 <= Mp; m0 += 64) spmm_row_avx2<8, S>(xT, Mp, m0, p, e, ci, v, b, yr);
      if (m0 + 32 <= Mp) { spmm_row_avx2<4, S>(xT, Mp, m0, p, e, ci, v, b, yr); m0 += 32; }
      if (m0 + 16 <= Mp) { spmm_row_avx2<2, S>(xT, Mp, m0, p, e, ci, v, b, yr); m0 += 16; }
      if (m0 + 8 <= Mp) { spmm_row_avx2<1, S>(xT, Mp, m0, p, e, ci, v, b, yr); m0 += 8; }
    }
    flush_tile_avx2(tile, Mp, y, ldy, M, nb, ne);
  }
}

template <typename I>
PYC_TARGET_AVX2 void spmm_t_avx2(const float* xT, int64_t Mp, const int32_t* rp, const I* ci,
                                 const float* v, const float* bias, float* y, int64_t ldy,
                                 int64_t M, int64_t n0, int64_t n1) {
  switch (Mp) {
    case 8: return spmm_t_avx2_rows<8>(xT, Mp, rp, ci, v, bias, y, ldy, M, n0, n1);
    case 16: return spmm_t_avx2_rows<16>(xT, Mp, rp, ci, v, bias, y, ldy, M, n0, n1);
    case 32: return spmm_t_avx2_rows<32>(xT, Mp, rp, ci, v, bias, y, ldy, M, n0, n1);
    case 64: return spmm_t_avx2_rows<64>(xT, Mp, rp, ci, v, bias, y, ldy, M, n0, n1);
    default: return spmm_t_avx2_rows<0>(xT, Mp, rp, ci, v, bias, y, ldy, M, n0, n1);
  }
}

// ---------------------------------------------------------------- AVX-512
// Four consecutive kept weights; entry j goes into accumulator set (s0 + j) % U. See
// spmm_quad_avx2 (software prefetch, which AVX2 uses for wide rows, measured no faster here on
// Zen 4 at 64 tokens).
template <int NV, int U, typename I>
PYC_TARGET_AVX512 inline __attribute__((always_inline)) void spmm_quad_avx512(
    __m512 (*acc)[NV], int s0, const float* base, int64_t ld, const I* c, const float* v) {
  const Idx4 ix = load_idx4(c);
  const __m512 v4 = _mm512_broadcast_f32x4(_mm_loadu_ps(v));
  const __m512 w[4] = {_mm512_permute_ps(v4, 0x00), _mm512_permute_ps(v4, 0x55),
                       _mm512_permute_ps(v4, 0xAA), _mm512_permute_ps(v4, 0xFF)};
  for (int q = 0; q < 4; ++q) {
    const float* xr = base + ix.k[q] * ld;
    __m512* a = acc[(s0 + q) % U];
    for (int j = 0; j < NV; ++j)
      a[j] = _mm512_fmadd_ps(w[q], _mm512_loadu_ps(xr + 16 * j), a[j]);
  }
}

template <int NV, typename I>
PYC_TARGET_AVX512 inline __attribute__((always_inline)) void spmm_row_avx512(
    const float* xT, int64_t Mp, int64_t m0, int32_t p,
                                              int32_t e, const I* ci, const float* v, float b,
                                              float* yc) {
  constexpr int U = NV >= 8 ? 1 : 8 / NV;  // NV * U >= 8 independent FMA chains
  __m512 acc[U][NV];
  for (int u = 0; u < U; ++u)
    for (int j = 0; j < NV; ++j) acc[u][j] = _mm512_setzero_ps();
  const float* base = xT + m0;
  // groups of G >= 4 entries (a multiple of U), 4 at a time, pointer-stepped (as in AVX2)
  constexpr int G = U > 4 ? U : 4;
  if (p + G <= e) {
    const I* c = ci + p;
    const float* vv = v + p;
    int32_t cnt = (e - p) / G;
    p += cnt * G;
    do {
      for (int g = 0; g < G; g += 4)
        spmm_quad_avx512<NV, U>(acc, g, base, Mp, c + g, vv + g);
      c += G;
      vv += G;
    } while (--cnt);
  }
  for (; p + U <= e; p += U) {
    for (int u = 0; u < U; ++u) {
      const float* xr = base + static_cast<int64_t>(ci[p + u]) * Mp;
      const __m512 w = _mm512_set1_ps(v[p + u]);
      for (int j = 0; j < NV; ++j)
        acc[u][j] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xr + 16 * j), acc[u][j]);
    }
  }
  for (int u = 0; u < U - 1; ++u) {
    if (p + u >= e) break;
    const float* xr = base + static_cast<int64_t>(ci[p + u]) * Mp;
    const __m512 w = _mm512_set1_ps(v[p + u]);
    for (int j = 0; j < NV; ++j)
      acc[u][j] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xr + 16 * j), acc[u][j]);
  }
  const __m512 bv = _mm512_set1_ps(b);
  for (int j = 0; j < NV; ++j) {
    __m512 s = acc[0][j];
    for (int u = 1; u < U; ++u) s = _mm512_add_ps(s, acc[u][j]);
    _mm512_storeu_ps(yc + m0 + 16 * j, _mm512_add_ps(s, bv));
  }
}

template <typename I>
PYC_TARGET_AVX512 void spmm_t_avx512(const float* xT, int64_t Mp, const int32_t* rp, const I* ci,
                                     const float* v, const float* bias, float* y, int64_t ldy,
                                     int64_t M, int64_t n0, int64_t n1) {
  std::vector<float> tile(kRowBlock * Mp);
  for (int64_t nb = n0; nb < n1; nb += kRowBlock) {
    const int64_t ne = nb + kRowBlock < n1 ? nb + kRowBlock : n1;
    for (int64_t n = nb; n < ne; ++n) {
      float* yr = tile.data() + (n - nb) * Mp;
      const float b = bias ? bias[n] : 0.f;
      const int32_t p = rp[n], e = rp[n + 1];
      int64_t m0 = 0;
      for (; m0 + 64 <= Mp; m0 += 64) spmm_row_avx512<4>(xT, Mp, m0, p, e, ci, v, b, yr);
      if (m0 + 32 <= Mp) { spmm_row_avx512<2>(xT, Mp, m0, p, e, ci, v, b, yr); m0 += 32; }
      if (m0 + 16 <= Mp) { spmm_row_avx512<1>(xT, Mp, m0, p, e, ci, v, b, yr); m0 += 16; }
    }
    flush_tile_avx2(tile.data(), Mp, y, ldy, M, nb, ne);
  }
}
// xT[k, m] = x[m, k] for k in [k0, k1) (multiple-of-8 part), Mp a multiple of 8; rows m >= M
// are zero. 8x8 blocks transposed in registers.
PYC_TARGET_AVX2 void transpose_pad_avx2(const float* x, int64_t ldx, int64_t M, int64_t Mp,
                                        float* xT, int64_t k0, int64_t k1) {
  // chunks of 128 columns; within a chunk 8 rows of x at a time (rows of x are often a multiple
  // of 4 KiB apart, and more than 8 of them at once would conflict in L1)
  const int64_t kend = k0 + (k1 - k0) / 8 * 8;
  for (int64_t kc = k0; kc < kend; kc += 128) {
    const int64_t kce = kc + 128 < kend ? kc + 128 : kend;
    for (int64_t m0 = 0; m0 < Mp; m0 += 8) {
      for (int64_t k = kc; k < kce; k += 8) {
        __m256 r[8];
        for (int i = 0; i < 8; ++i)
          r[i] = m0 + i < M ? _mm256_loadu_ps(x + (m0 + i) * ldx + k) : _mm256_setzero_ps();
        __m256 c[8];
        transpose8x8_avx2(r, c);
        float* o = xT + k * Mp + m0;
        for (int q = 0; q < 8; ++q) _mm256_storeu_ps(o + q * Mp, c[q]);
      }
    }
  }
}
#endif  // PYC_HAVE_X86_SIMD

template <typename I>
void gemv_dispatch(CpuIsa isa, const float* x, const int32_t* rp, const I* ci, const float* v,
                   const float* bias, float* y, int64_t n0, int64_t n1) {
#if PYC_HAVE_X86_SIMD
  // AVX-512 CPUs too: a 16-lane hardware gather (vgatherdps) measured 2.2x slower than the
  // scalar-load assembly on Zen 4, as 8-lane gathers are on Zen 3
  if (isa >= CpuIsa::Avx2) return gemv_avx2(x, rp, ci, v, bias, y, n0, n1);
#endif
  gemv_scalar(x, rp, ci, v, bias, y, n0, n1);
}

template <typename I>
void spmm_dispatch(CpuIsa isa, const float* xT, int64_t Mp, const int32_t* rp, const I* ci,
                   const float* v, const float* bias, float* y, int64_t ldy, int64_t M,
                   int64_t n0, int64_t n1) {
#if PYC_HAVE_X86_SIMD
  if (isa >= CpuIsa::Avx512 && Mp % 16 == 0)
    return spmm_t_avx512(xT, Mp, rp, ci, v, bias, y, ldy, M, n0, n1);
  if (isa >= CpuIsa::Avx2) return spmm_t_avx2(xT, Mp, rp, ci, v, bias, y, ldy, M, n0, n1);
#endif
  spmm_t_scalar(xT, Mp, rp, ci, v, bias, y, ldy, M, n0, n1);
}

}  // namespace

int64_t csr_padded_m(CpuIsa isa, int64_t M) {
  // AVX-512 pads to 16 tokens, except M <= 8: one 8-wide AVX2 vector per kept weight there
  // beats a half-empty 16-wide one (measured 1.5x on Zen 4 at M = 2..8)
  const int64_t align = isa >= CpuIsa::Avx512 && M > 8 ? 16 : 8;
  return (M + align - 1) / align * align;
}

void csr_gemv_cpu(CpuIsa isa, const float* x, const int32_t* row_ptr, const void* col_idx,
                  bool idx16, const float* values, const float* bias, float* y, int64_t n0,
                  int64_t n1) {
  if (idx16)
    gemv_dispatch(isa, x, row_ptr, idx_ptr<int16_t>(col_idx), values, bias, y, n0, n1);
  else
    gemv_dispatch(isa, x, row_ptr, idx_ptr<int32_t>(col_idx), values, bias, y, n0, n1);
}

void csr_spmm_t_cpu(CpuIsa isa, const float* xT, int64_t Mp, const int32_t* row_ptr,
                    const void* col_idx, bool idx16, const float* values, const float* bias,
                    float* y, int64_t ldy, int64_t M, int64_t n0, int64_t n1) {
  if (idx16)
    spmm_dispatch(isa, xT, Mp, row_ptr, idx_ptr<int16_t>(col_idx), values, bias, y, ldy, M, n0,
                  n1);
  else
    spmm_dispatch(isa, xT, Mp, row_ptr, idx_ptr<int32_t>(col_idx), values, bias, y, ldy, M, n0,
                  n1);
}

int64_t SellLayout::bytes() const {
  return static_cast<int64_t>(slice_off.size() * sizeof(int64_t) + row_of.size() * sizeof(int32_t) +
                              idx16v.size() * sizeof(int16_t) + idx32v.size() * sizeof(int32_t) +
                              vals.size() * sizeof(float));
}

void sell_pack_cpu(const int32_t* row_ptr, const void* col_idx, bool idx16, const float* values,
                   int64_t N, int64_t K, SellLayout& out) {
  out.n_slices = (N + 7) / 8;
  out.idx16 = K < 32768;  // the padding index K must fit
  std::vector<int32_t> order(static_cast<size_t>(N));
  std::iota(order.begin(), order.end(), 0);
  auto len = [&](int32_t n) { return row_ptr[n + 1] - row_ptr[n]; };
  for (int64_t w0 = 0; w0 < N; w0 += kSellWindow)
    std::stable_sort(order.begin() + w0, order.begin() + std::min(N, w0 + kSellWindow),
                     [&](int32_t a, int32_t b) { return len(a) > len(b); });
  out.row_of.assign(static_cast<size_t>(8 * out.n_slices), -1);
  out.slice_off.assign(static_cast<size_t>(out.n_slices + 1), 0);
  for (int64_t s = 0; s < out.n_slices; ++s) {
    int64_t steps = 0;
    for (int64_t l = 0; l < 8 && 8 * s + l < N; ++l) {
      const int32_t n = order[8 * s + l];
      out.row_of[8 * s + l] = n;
      steps = std::max<int64_t>(steps, len(n));
    }
    out.slice_off[s + 1] = out.slice_off[s] + 8 * steps;
  }
  const int64_t total = out.slice_off[out.n_slices];
  out.vals.assign(static_cast<size_t>(total), 0.f);
  if (out.idx16) {
    out.idx16v.assign(static_cast<size_t>(total), static_cast<int16_t>(K));
    out.idx32v.clear();
  } else {
    out.idx32v.assign(static_cast<size_t>(total), static_cast<int32_t>(K));
    out.idx16v.clear();
  }
  for (int64_t s = 0; s < out.n_slices; ++s) {
    for (int64_t l = 0; l < 8; ++l) {
      const int32_t n = out.row_of[8 * s + l];
      if (n < 0) continue;
      int64_t q = out.slice_off[s] + l;
      for (int32_t p = row_ptr[n]; p < row_ptr[n + 1]; ++p, q += 8) {
        const int64_t k = idx16 ? static_cast<const int16_t*>(col_idx)[p]
                                : static_cast<const int32_t*>(col_idx)[p];
        if (out.idx16)
          out.idx16v[q] = static_cast<int16_t>(k);
        else
          out.idx32v[q] = static_cast<int32_t>(k);
        out.vals[q] = values[p];
      }
    }
  }
}

template <bool ACC>
void sell_dispatch(CpuIsa isa, const float* x_pad, const SellView& L, const float* bias,
                   float* y, int64_t s0, int64_t s1) {
  const int16_t* i16 = static_cast<const int16_t*>(L.idx);
  const int32_t* i32 = static_cast<const int32_t*>(L.idx);
#if PYC_HAVE_X86_SIMD
  if (isa >= CpuIsa::Avx2) {
    if (L.idx16) return sell_avx2<ACC>(x_pad, L, i16, bias, y, s0, s1);
    return sell_avx2<ACC>(x_pad, L, i32, bias, y, s0, s1);
  }
#endif
  (void)isa;
  if (L.idx16) return sell_scalar<ACC>(x_pad, L, i16, bias, y, s0, s1);
  sell_scalar<ACC>(x_pad, L, i32, bias, y, s0, s1);
}

void sell_gemv_cpu(CpuIsa isa, const float* x_pad, const SellView& L, const float* bias,
                   float* y, int64_t s0, int64_t s1) {
  sell_dispatch<false>(isa, x_pad, L, bias, y, s0, s1);
}

int64_t ChunkedLayout::bytes() const {
  return static_cast<int64_t>(idx.size() * sizeof(uint8_t) + vals.size() * sizeof(float)) +
         rest.bytes();
}

void chunked_pack_cpu(const int32_t* row_ptr, const void* col_idx, bool idx16, const float* values,
                      int64_t N, int64_t K, ChunkedLayout& out) {
  out = ChunkedLayout{};
  out.n_rows = N;
  out.n_slices = (N + 15) / 16;
  out.n_chunks = (K + kChunkCols - 1) / kChunkCols;
  const int64_t nch = out.n_chunks;
  auto col = [&](int32_t p) -> int64_t {
    return idx16 ? static_cast<const int16_t*>(col_idx)[p] : static_cast<const int32_t*>(col_idx)[p];
  };
  // how many (row, chunk) pairs keep c weights, c = 0 .. 31
  std::vector<int64_t> hist(kChunkCols + 1, 0);
  std::vector<int32_t> cnt(static_cast<size_t>(nch));
  for (int64_t n = 0; n < N; ++n) {
    std::fill(cnt.begin(), cnt.end(), 0);
    for (int32_t p = row_ptr[n]; p < row_ptr[n + 1]; ++p) ++cnt[col(p) / kChunkCols];
    for (int32_t c : cnt) ++hist[c];
  }
  // cost model in cycles (Zen 4, data in L2): a step streams 80 bytes at ~32 bytes/cycle, a
  // (slice, chunk) costs ~1 more cycle, a kept weight left to SELL ~0.75 cycles
  const double nnz = static_cast<double>(row_ptr[N]);
  double best = 0.75 * nnz;
  int64_t steps = 0;
  for (int64_t S = 1; S <= kChunkCols; ++S) {
    double rest = 0;
    for (int64_t c = S + 1; c <= kChunkCols; ++c) rest += static_cast<double>(hist[c] * (c - S));
    const double cost =
        static_cast<double>(out.n_slices * nch) * (static_cast<double>(S) * 16 * 5 / 32 + 1) +
        0.75 * rest;
    if (cost < best) best = cost, steps = S;
  }
  if (steps == 0) return;
  out.steps = steps;
  const size_t slots = static_cast<size_t>(out.n_slices * nch * steps * 16);
  out.idx.assign(slots, static_cast<uint8_t>(kChunkCols));
  out.vals.assign(slots, 0.f);
  // the rest as CSR over the chunk-padded input (column 31 c + i -> 32 c + i)
  std::vector<int32_t> rrp(static_cast<size_t>(N + 1), 0), rci;
  std::vector<float> rv;
  for (int64_t n = 0; n < N; ++n) {
    std::fill(cnt.begin(), cnt.end(), 0);
    const int64_t s = n / 16, l = n % 16;
    for (int32_t p = row_ptr[n]; p < row_ptr[n + 1]; ++p) {
      const int64_t k = col(p), c = k / kChunkCols, j = cnt[c]++;
      if (j < steps) {
        const size_t o = static_cast<size_t>(((s * nch + c) * steps + j) * 16 + l);
        out.idx[o] = static_cast<uint8_t>(k - c * kChunkCols);
        out.vals[o] = values[p];
      } else {
        rci.push_back(static_cast<int32_t>(32 * c + k - c * kChunkCols));
        rv.push_back(values[p]);
      }
    }
    rrp[n + 1] = static_cast<int32_t>(rci.size());
  }
  // no rest (every row keeps <= steps weights per chunk): no SELL pass over empty slices per call
  if (!rci.empty()) sell_pack_cpu(rrp.data(), rci.data(), false, rv.data(), N, 32 * nch, out.rest);
}

void chunked_pad_x(const float* x, int64_t K, int64_t n_chunks, float* xq) {
  std::memset(xq, 0, sizeof(float) * static_cast<size_t>(chunked_x_size(n_chunks)));
  for (int64_t c = 0; c < n_chunks; ++c) {
    const int64_t k0 = c * kChunkCols, w = std::min(kChunkCols, K - k0);
    std::memcpy(xq + 32 * c, x + k0, sizeof(float) * static_cast<size_t>(w));
  }
}

namespace {

void chunked_scalar(const float* xq, const ChunkedView& L, const float* bias, float* y,
                    int64_t s0, int64_t s1) {
  const int64_t S = L.steps, nch = L.n_chunks;
  for (int64_t s = s0; s < s1; ++s) {
    float acc[16] = {};
    const size_t base = static_cast<size_t>(s * nch * S * 16);
    for (int64_t c = 0; c < nch; ++c)
      for (int64_t j = 0; j < S; ++j)
        for (int l = 0; l < 16; ++l) {
          const size_t o = base + static_cast<size_t>((c * S + j) * 16 + l);
          acc[l] = std::fma(L.vals[o], xq[32 * c + (L.idx[o] & 31)], acc[l]);
        }
    for (int64_t l = 0; l < 16 && 16 * s + l < L.n_rows; ++l)
      y[16 * s + l] = (bias ? bias[16 * s + l] : 0.f) + acc[l];
  }
}

#if PYC_HAVE_X86_SIMD
// One step: the 16 lanes' inputs picked from the chunk's table (t0: columns 0-15, t1: 16-31)
// by their byte indices, times the 16 values.
PYC_TARGET_AVX512 inline __attribute__((always_inline)) __m512 chunk_step(__m512 acc, __m512 t0,
                                                                          __m512 t1,
                                                                          const uint8_t* ip,
                                                                          const float* vp) {
  const __m512i id = _mm512_cvtepu8_epi32(_mm_load_si128(reinterpret_cast<const __m128i*>(ip)));
  return _mm512_fmadd_ps(_mm512_load_ps(vp), _mm512_permutex2var_ps(t0, id, t1), acc);
}

// Cost on Zen 4 (3.7 GHz): about 2.5 cycles per step, the rate at which L2 delivers its 80
// bytes; the same with the layout in L3 plus ~20%.
PYC_TARGET_AVX512 void chunked_avx512(const float* xq, const ChunkedView& L, const float* bias,
                                      float* y, int64_t s0, int64_t s1) {
  const int64_t S = L.steps, nch = L.n_chunks;
  for (int64_t s = s0; s < s1; ++s) {
    const uint8_t* ip = L.idx + s * nch * S * 16;
    const float* vp = L.vals + s * nch * S * 16;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t c = 0; c < nch; ++c) {
      const __m512 t0 = _mm512_load_ps(xq + 32 * c), t1 = _mm512_load_ps(xq + 32 * c + 16);
      int64_t j = 0;
      for (; j + 4 <= S; j += 4, ip += 64, vp += 64) {
        a0 = chunk_step(a0, t0, t1, ip, vp);
        a1 = chunk_step(a1, t0, t1, ip + 16, vp + 16);
        a2 = chunk_step(a2, t0, t1, ip + 32, vp + 32);
        a3 = chunk_step(a3, t0, t1, ip + 48, vp + 48);
      }
      // the same remainder in every chunk: predicted branches
      if (j < S) {
        a0 = chunk_step(a0, t0, t1, ip, vp);
        ip += 16, vp += 16;
        if (++j < S) {
          a1 = chunk_step(a1, t0, t1, ip, vp);
          ip += 16, vp += 16;
          if (++j < S) {
            a2 = chunk_step(a2, t0, t1, ip, vp);
            ip += 16, vp += 16;
          }
        }
      }
    }
    __m512 r = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
    const int64_t n0 = 16 * s, rows = std::min<int64_t>(16, L.n_rows - n0);
    const __mmask16 m = rows == 16 ? static_cast<__mmask16>(0xffff)
                                   : static_cast<__mmask16>((1u << rows) - 1);
    if (bias) r = _mm512_add_ps(r, _mm512_maskz_loadu_ps(m, bias + n0));
    _mm512_mask_storeu_ps(y + n0, m, r);
  }
}
#endif

}  // namespace

void chunked_gemv_cpu(CpuIsa isa, const float* xq, const ChunkedView& L, const float* bias,
                      float* y, int64_t w0, int64_t w1) {
  const int64_t s0 = w0 * (kSellWindow / 16), s1 = std::min(L.n_slices, w1 * (kSellWindow / 16));
#if PYC_HAVE_X86_SIMD
  if (isa >= CpuIsa::Avx512)
    chunked_avx512(xq, L, bias, y, s0, s1);
  else
#endif
    chunked_scalar(xq, L, bias, y, s0, s1);
  const int64_t r0 = w0 * (kSellWindow / 8), r1 = std::min(L.rest.n_slices, w1 * (kSellWindow / 8));
  if (r0 < r1) sell_dispatch<true>(isa, xq, L.rest, nullptr, y, r0, r1);
}

void transpose_pad_cpu(const float* x, int64_t ldx, int64_t M, int64_t Mp, float* xT, int64_t k0,
                       int64_t k1) {
  constexpr int64_t B = 16;
  for (int64_t kb = k0; kb < k1; kb += B) {
    const int64_t ke = kb + B < k1 ? kb + B : k1;
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * ldx;
      for (int64_t k = kb; k < ke; ++k) xT[k * Mp + m] = xr[k];
    }
    for (int64_t k = kb; k < ke; ++k)
      for (int64_t m = M; m < Mp; ++m) xT[k * Mp + m] = 0.f;
  }
}

void transpose_pad_cpu(CpuIsa isa, const float* x, int64_t ldx, int64_t M, int64_t Mp, float* xT,
                       int64_t k0, int64_t k1) {
#if PYC_HAVE_X86_SIMD
  if (isa >= CpuIsa::Avx2 && Mp % 8 == 0) {
    transpose_pad_avx2(x, ldx, M, Mp, xT, k0, k1);
    k0 += (k1 - k0) / 8 * 8;  // the rest (< 8 columns) below
  }
#endif
  if (k0 < k1) transpose_pad_cpu(x, ldx, M, Mp, xT, k0, k1);
}

}  // namespace pyc
