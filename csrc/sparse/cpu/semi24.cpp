// 2:4 semi-structured sparse linear: compression, decompression and the CPU gather kernel
// (scalar and AVX2, chosen at run time). Torch-free; the binding threads over output rows.
#include "sparse/semi24.h"

#include <cstring>

#include "common/simd.h"

namespace pyc {
namespace {

constexpr uint16_t kPadWord = 0x4444;  // indices (0, 1) in each of the four groups

inline bool kept(const void* w, DType wdt, const uint8_t* mask, int64_t i) {
  if (mask != nullptr) return mask[i] != 0;
  return load_as_float(w, i, wdt) != 0.f;
}

void linear_scalar(const float* x, int64_t ldx, int64_t M, const void* values, DType vdt,
                   const int16_t* meta, const float* bias, float* y, int64_t ldy, int64_t N,
                   int64_t K, int64_t n0, int64_t n1) {
  const int64_t Kp = semi24_padded_k(K), KT = Kp / kSemi24KTile, C = Kp / 16;
  (void)N;
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t vrow = n * (Kp / 2);
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * ldx;
      float acc = 0.f;
      for (int64_t c = 0; c < C; ++c) {
        const uint16_t word = static_cast<uint16_t>(meta[semi24_meta_index(n, c, KT)]);
        for (int q = 0; q < 4; ++q) {
          const int64_t j = 4 * c + q;
          const int i0 = (word >> (4 * q)) & 3, i1 = (word >> (4 * q + 2)) & 3;
          acc += load_as_float(values, vrow + 2 * j, vdt) * xr[4 * j + i0];
          acc += load_as_float(values, vrow + 2 * j + 1, vdt) * xr[4 * j + i1];
        }
      }
      y[m * ldy + n] = acc + (bias != nullptr ? bias[n] : 0.f);
    }
  }
}

#if PYC_HAVE_X86_SIMD
PYC_TARGET_AVX2 inline __m256 load8(const float* v) { return _mm256_loadu_ps(v); }
PYC_TARGET_AVX2 inline __m256 load8_f16(const uint16_t* v) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v)));
}
PYC_TARGET_AVX2 inline __m256 load8_bf16(const uint16_t* v) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

PYC_TARGET_AVX2 inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Lane permutations that expand 4 kept values (lanes 0..3 of a register whose lanes 4..7 are
// zero) into the 8 logical columns of one metadata byte; lane 4 (zero) fills the pruned
// columns. The upper byte of a word uses the same table + 4 on a register with lanes 0..3 zero
// (vpermps reads 3 index bits, so the zero lane 4 + 4 = 8 becomes lane 0).
struct ExpandTable {
  alignas(32) int32_t idx[256][8];
  ExpandTable() {
    for (int b = 0; b < 256; ++b) {
      for (int p = 0; p < 8; ++p) {
        const int grp = p >> 2, q = p & 3, nib = (b >> (4 * grp)) & 15;
        const int i0 = nib & 3, i1 = (nib >> 2) & 3;
        idx[b][p] = q == i0 ? 2 * grp : (q == i1 ? 2 * grp + 1 : 4);
      }
    }
  }
};
const ExpandTable kExpandTable;

template <int VT>
PYC_TARGET_AVX2 inline __m256 load_values8(const void* values, int64_t off) {
  if (VT == 0) return load8(static_cast<const float*>(values) + off);
  if (VT == 1) return load8_f16(static_cast<const uint16_t*>(values) + off);
  return load8_bf16(static_cast<const uint16_t*>(values) + off);
}

// MB (<= 4) rows of x against output row n: each 16-bit metadata word expands its 8 kept
// weights into two dense registers (16 logical columns) in registers, then plain FMAs with the
// contiguous activations.
template <int MB, int VT>
PYC_TARGET_AVX2 void row_avx2(const float* x, int64_t ldx, const void* values,
                              const int16_t* meta, int64_t n, int64_t KT, float* out) {
  const int64_t C = 2 * KT;
  const int64_t Kp = KT * kSemi24KTile;
  const int64_t r = n & 15;
  const int16_t* mrow = meta + ((((n >> 4) * KT) * 16 + (r & 7) * 2) << 1) + (r >> 3);
  __m256 acc[MB][2];
  for (int i = 0; i < MB; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  const __m256 zero = _mm256_setzero_ps();
  const __m256i four = _mm256_set1_epi32(4);
  for (int64_t c = 0; c < C; ++c) {
    const uint16_t word = static_cast<uint16_t>(mrow[(c >> 1) * 32 + (c & 1) * 2]);
    const __m256i ilo = _mm256_load_si256(reinterpret_cast<const __m256i*>(kExpandTable.idx[word & 255]));
    const __m256i ihi = _mm256_add_epi32(
        _mm256_load_si256(reinterpret_cast<const __m256i*>(kExpandTable.idx[word >> 8])), four);
    const __m256 v = load_values8<VT>(values, n * (Kp / 2) + 8 * c);
    const __m256 wlo = _mm256_permutevar8x32_ps(_mm256_blend_ps(v, zero, 0xF0), ilo);
    const __m256 whi = _mm256_permutevar8x32_ps(_mm256_blend_ps(v, zero, 0x0F), ihi);
    for (int i = 0; i < MB; ++i) {
      const float* xr = x + i * ldx + 16 * c;
      acc[i][0] = _mm256_fmadd_ps(wlo, _mm256_loadu_ps(xr), acc[i][0]);
      acc[i][1] = _mm256_fmadd_ps(whi, _mm256_loadu_ps(xr + 8), acc[i][1]);
    }
  }
  for (int i = 0; i < MB; ++i) out[i] = hsum(_mm256_add_ps(acc[i][0], acc[i][1]));
}

template <int VT>
PYC_TARGET_AVX2 void linear_avx2_t(const float* x, int64_t ldx, int64_t M, const void* values,
                                   const int16_t* meta, const float* bias, float* y,
                                   int64_t ldy, int64_t K, int64_t n0, int64_t n1) {
  const int64_t KT = semi24_padded_k(K) / kSemi24KTile;
  float out[4];
  for (int64_t n = n0; n < n1; ++n) {
    const float b = bias != nullptr ? bias[n] : 0.f;
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) {
      row_avx2<4, VT>(x + m * ldx, ldx, values, meta, n, KT, out);
      for (int i = 0; i < 4; ++i) y[(m + i) * ldy + n] = out[i] + b;
    }
    const int64_t rest = M - m;
    if (rest == 3) row_avx2<3, VT>(x + m * ldx, ldx, values, meta, n, KT, out);
    if (rest == 2) row_avx2<2, VT>(x + m * ldx, ldx, values, meta, n, KT, out);
    if (rest == 1) row_avx2<1, VT>(x + m * ldx, ldx, values, meta, n, KT, out);
    for (int64_t i = 0; i < rest; ++i) y[(m + i) * ldy + n] = out[i] + b;
  }
}

// Transposed kernel: yT[n, mb .. mb + 8 MV) += w * xT[k, mb .. mb + 8 MV) for every kept
// weight w = W[n, k] (one broadcast and MV FMAs; the pruned half costs nothing).
constexpr int64_t kBlockChunks = 8;  // 16-column chunks per block of the transposed kernel

template <int MV, int VT>
PYC_TARGET_AVX2 void rows_t_avx2(const float* xT, int64_t Mp, int64_t mb, const void* values,
                                 const int16_t* meta, const float* bias, float* yT, int64_t KT,
                                 int64_t c0, int64_t c1, int64_t n0, int64_t n1) {
  const int64_t Kp = KT * kSemi24KTile;
  alignas(32) float vbuf[kBlockChunks * 8];
  const float* xb = xT + mb;
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t r = n & 15;
    const int16_t* mrow = meta + ((((n >> 4) * KT) * 16 + (r & 7) * 2) << 1) + (r >> 3);
    float* yr = yT + n * Mp + mb;
    // S independent accumulator sets keep >= 8 FMA chains in flight (FMA latency 4, 2 per cycle)
    constexpr int S = MV == 1 ? 8 : (MV == 2 ? 4 : 2);
    __m256 acc[S][MV];
    for (int u = 1; u < S; ++u)
      for (int v = 0; v < MV; ++v) acc[u][v] = _mm256_setzero_ps();
    if (c0 == 0) {
      const __m256 b = _mm256_set1_ps(bias != nullptr ? bias[n] : 0.f);
      for (int v = 0; v < MV; ++v) acc[0][v] = b;
    } else {
      for (int v = 0; v < MV; ++v) acc[0][v] = _mm256_load_ps(yr + 8 * v);
    }
    // the block's kept weights as fp32, converted before use (broadcasts read them back from L1
    // well after the stores); the next row's are prefetched
    for (int64_t c = c0; c < c1; ++c)
      _mm256_store_ps(vbuf + 8 * (c - c0), load_values8<VT>(values, n * (Kp / 2) + 8 * c));
    if (n + 1 < n1) {
      const char* nxt = static_cast<const char*>(values) +
                        ((n + 1) * (Kp / 2) + 8 * c0) * (VT == 0 ? 4 : 2);
      for (int64_t off = 0; off < (c1 - c0) * 8 * (VT == 0 ? 4 : 2); off += 64)
        _mm_prefetch(nxt + off, _MM_HINT_T0);
    }
    for (int64_t c = c0; c < c1; ++c) {
      const uint32_t word = static_cast<uint16_t>(mrow[(c >> 1) * 32 + (c & 1) * 2]);
      const float* vb = vbuf + 8 * (c - c0);
      const float* xc = xb + 16 * c * Mp;
      #pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) {
        const uint32_t nib = word >> (4 * q);
        const float* x0 = xc + (4 * q + (nib & 3)) * Mp;
        const float* x1 = xc + (4 * q + ((nib >> 2) & 3)) * Mp;
        const __m256 w0 = _mm256_broadcast_ss(vb + 2 * q);
        const __m256 w1 = _mm256_broadcast_ss(vb + 2 * q + 1);
        const int a0 = (2 * q) % S, a1 = (2 * q + 1) % S;
        for (int v = 0; v < MV; ++v) {
          acc[a0][v] = _mm256_fmadd_ps(w0, _mm256_load_ps(x0 + 8 * v), acc[a0][v]);
          acc[a1][v] = _mm256_fmadd_ps(w1, _mm256_load_ps(x1 + 8 * v), acc[a1][v]);
        }
      }
    }
    for (int u = 1; u < S; ++u)
      for (int v = 0; v < MV; ++v) acc[0][v] = _mm256_add_ps(acc[0][v], acc[u][v]);
    for (int v = 0; v < MV; ++v) _mm256_store_ps(yr + 8 * v, acc[0][v]);
  }
}

// Blocking: 32 activation rows x 128 logical columns of xT (16 KiB) stay in L1 while a panel of
// 64 output rows runs over them; the panel's yT rows (8 KiB) carry the partial sums.
template <int VT>
PYC_TARGET_AVX2 void linear_t_avx2(const float* xT, int64_t Mp, const void* values,
                                   const int16_t* meta, const float* bias, float* yT, int64_t K,
                                   int64_t n0, int64_t n1) {
  const int64_t KT = semi24_padded_k(K) / kSemi24KTile, C = 2 * KT;
  constexpr int64_t kChunks = kBlockChunks;
  constexpr int64_t kPanel = 64;  // output rows per panel
  for (int64_t mb = 0; mb < Mp; mb += 32) {
    const int mv = (Mp - mb) >= 32 ? 4 : static_cast<int>((Mp - mb) / 8);
    for (int64_t p0 = n0; p0 < n1; p0 += kPanel) {
      const int64_t p1 = p0 + kPanel < n1 ? p0 + kPanel : n1;
      for (int64_t c0 = 0; c0 < C; c0 += kChunks) {
        const int64_t c1 = c0 + kChunks < C ? c0 + kChunks : C;
        switch (mv) {
          case 4: rows_t_avx2<4, VT>(xT, Mp, mb, values, meta, bias, yT, KT, c0, c1, p0, p1); break;
          case 3: rows_t_avx2<3, VT>(xT, Mp, mb, values, meta, bias, yT, KT, c0, c1, p0, p1); break;
          case 2: rows_t_avx2<2, VT>(xT, Mp, mb, values, meta, bias, yT, KT, c0, c1, p0, p1); break;
          default: rows_t_avx2<1, VT>(xT, Mp, mb, values, meta, bias, yT, KT, c0, c1, p0, p1); break;
        }
      }
    }
  }
}
#endif

}  // namespace

int64_t semi24_compress_cpu(const void* w, DType wdt, int64_t ldw, const uint8_t* mask,
                            int64_t N, int64_t K, void* values, DType vdt, int16_t* meta,
                            int64_t n0, int64_t n1) {
  const int64_t Kp = semi24_padded_k(K), KT = Kp / kSemi24KTile, C = Kp / 16;
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t row = n * ldw, vrow = n * (Kp / 2);
    for (int64_t c = 0; c < C; ++c) {
      uint16_t word = 0;
      for (int q = 0; q < 4; ++q) {
        const int64_t j = 4 * c + q;
        int pos[4], cnt = 0;
        for (int i = 0; i < 4; ++i) {
          const int64_t k = 4 * j + i;
          if (k < K && kept(w, wdt, mask, row + k)) {
            if (cnt == 2) return n * K + 4 * j;
            pos[cnt++] = i;
          }
        }
        // fill up to two distinct indices with the lowest unused positions (weights 0)
        bool real[2] = {cnt > 0, cnt > 1};
        for (int i = 0; cnt < 2 && i < 4; ++i) {
          if (cnt == 1 && pos[0] == i) continue;
          pos[cnt++] = i;
        }
        if (pos[0] > pos[1]) {
          const int t = pos[0];
          pos[0] = pos[1];
          pos[1] = t;
          const bool rt = real[0];
          real[0] = real[1];
          real[1] = rt;
        }
        for (int s = 0; s < 2; ++s) {
          const float v = real[s] ? load_as_float(w, row + 4 * j + pos[s], wdt) : 0.f;
          store_from_float(values, vrow + 2 * j + s, vdt, v);
        }
        word |= static_cast<uint16_t>((pos[0] | (pos[1] << 2)) << (4 * q));
      }
      meta[semi24_meta_index(n, c, KT)] = static_cast<int16_t>(word);
    }
  }
  // padding rows of the last tile
  if (n1 == N && n0 < n1) {
    for (int64_t n = N; n < semi24_n_tiles(N) * kSemi24NTile; ++n)
      for (int64_t c = 0; c < C; ++c)
        meta[semi24_meta_index(n, c, KT)] = static_cast<int16_t>(kPadWord);
  }
  return -1;
}

void semi24_decompress_cpu(const void* values, DType vdt, const int16_t* meta, int64_t N,
                           int64_t K, void* out, DType odt, int64_t n0, int64_t n1) {
  (void)N;
  const int64_t Kp = semi24_padded_k(K), KT = Kp / kSemi24KTile, C = Kp / 16;
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t k = 0; k < K; ++k) store_from_float(out, n * K + k, odt, 0.f);
    for (int64_t c = 0; c < C; ++c) {
      const uint16_t word = static_cast<uint16_t>(meta[semi24_meta_index(n, c, KT)]);
      for (int q = 0; q < 4; ++q) {
        const int64_t j = 4 * c + q;
        const int idx[2] = {(word >> (4 * q)) & 3, (word >> (4 * q + 2)) & 3};
        for (int s = 0; s < 2; ++s) {
          const int64_t k = 4 * j + idx[s];
          const float v = load_as_float(values, n * (Kp / 2) + 2 * j + s, vdt);
          // a corrupt word may name one position twice; keep the sum like the kernels do
          if (k < K) store_from_float(out, n * K + k, odt, load_as_float(out, n * K + k, odt) + v);
        }
      }
    }
  }
}

bool semi24_linear_t_supported(CpuIsa isa) {
#if PYC_HAVE_X86_SIMD
  return isa >= CpuIsa::Avx2;
#else
  (void)isa;
  return false;
#endif
}

void semi24_linear_t_cpu(CpuIsa isa, const float* xT, int64_t Mp, const void* values, DType vdt,
                         const int16_t* meta, const float* bias, float* yT, int64_t K, int64_t n0,
                         int64_t n1) {
#if PYC_HAVE_X86_SIMD
  if (isa >= CpuIsa::Avx2) {
    switch (vdt) {
      case DType::F32: linear_t_avx2<0>(xT, Mp, values, meta, bias, yT, K, n0, n1); return;
      case DType::F16: linear_t_avx2<1>(xT, Mp, values, meta, bias, yT, K, n0, n1); return;
      case DType::BF16: linear_t_avx2<2>(xT, Mp, values, meta, bias, yT, K, n0, n1); return;
    }
  }
#endif
  (void)isa, (void)xT, (void)Mp, (void)values, (void)vdt, (void)meta, (void)bias, (void)yT, (void)K,
      (void)n0, (void)n1;
}

void semi24_linear_cpu(CpuIsa isa, const float* x, int64_t ldx, int64_t M, const void* values,
                       DType vdt, const int16_t* meta, const float* bias, float* y, int64_t ldy,
                       int64_t N, int64_t K, int64_t n0, int64_t n1) {
#if PYC_HAVE_X86_SIMD
  if (isa >= CpuIsa::Avx2) {
    switch (vdt) {
      case DType::F32: linear_avx2_t<0>(x, ldx, M, values, meta, bias, y, ldy, K, n0, n1); return;
      case DType::F16: linear_avx2_t<1>(x, ldx, M, values, meta, bias, y, ldy, K, n0, n1); return;
      case DType::BF16: linear_avx2_t<2>(x, ldx, M, values, meta, bias, y, ldy, K, n0, n1); return;
    }
  }
#endif
  (void)isa;
  linear_scalar(x, ldx, M, values, vdt, meta, bias, y, ldy, N, K, n0, n1);
}

}  // namespace pyc
