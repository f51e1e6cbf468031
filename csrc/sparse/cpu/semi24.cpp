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

// Column offsets (inside 8 logical columns) of the 4 kept weights of one metadata byte.
struct ByteTable {
  alignas(16) int32_t idx[256][4];
  ByteTable() {
    for (int b = 0; b < 256; ++b) {
      idx[b][0] = b & 3;
      idx[b][1] = (b >> 2) & 3;
      idx[b][2] = 4 + ((b >> 4) & 3);
      idx[b][3] = 4 + ((b >> 6) & 3);
    }
  }
};
const ByteTable kByteTable;

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

// MB rows of x (MB <= 4) against output row n. Two accumulators per row (even and odd
// chunks) keep two independent FMA chains in flight.
template <int MB, int VT>
PYC_TARGET_AVX2 void row_avx2(const float* x, int64_t ldx, const void* values,
                              const int16_t* meta, int64_t n, int64_t KT, float* out) {
  const int64_t C = 2 * KT;
  const int64_t Kp = KT * kSemi24KTile;
  const int64_t r = n & 15;
  const int16_t* mrow = meta + ((((n >> 4) * KT) * 16 + (r & 7) * 2) << 1) + (r >> 3);
  __m256 acc[MB][2];
  for (int i = 0; i < MB; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  const __m256i half_off = _mm256_setr_epi32(0, 0, 0, 0, 8, 8, 8, 8);
  for (int64_t c = 0; c < C; ++c) {
    const uint16_t word = static_cast<uint16_t>(mrow[(c >> 1) * 32 + (c & 1) * 2]);
    const __m128i lo = _mm_load_si128(reinterpret_cast<const __m128i*>(kByteTable.idx[word & 255]));
    const __m128i hi = _mm_load_si128(reinterpret_cast<const __m128i*>(kByteTable.idx[word >> 8]));
    const __m256i idx = _mm256_add_epi32(_mm256_set_m128i(hi, lo),
                                         _mm256_add_epi32(half_off, _mm256_set1_epi32(static_cast<int>(16 * c))));
    __m256 v;
    if (VT == 0) {
      v = load8(static_cast<const float*>(values) + n * (Kp / 2) + 8 * c);
    } else if (VT == 1) {
      v = load8_f16(static_cast<const uint16_t*>(values) + n * (Kp / 2) + 8 * c);
    } else {
      v = load8_bf16(static_cast<const uint16_t*>(values) + n * (Kp / 2) + 8 * c);
    }
    const int p = static_cast<int>(c & 1);
    for (int i = 0; i < MB; ++i) {
      const __m256 xg = _mm256_i32gather_ps(x + i * ldx, idx, 4);
      acc[i][p] = _mm256_fmadd_ps(xg, v, acc[i][p]);
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
