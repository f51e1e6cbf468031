// Max pooling of uint8 / int8 NHWC images (see int8/pool.h): per output pixel, the valid taps of
// its window are found once and the channels are reduced in full vectors (64 bytes with AVX-512
// BW, 32 with AVX2), with a masked (AVX-512) or scalar tail; signed or unsigned byte maxima by
// type. The scalar code compares int8 values as unsigned bytes after flipping their sign bit
// (x ^ 0x80 is monotonic from int8 to uint8).
#include "int8/pool.h"

#include <algorithm>
#include <cstring>

#include "common/simd.h"

namespace pyc {
namespace {

// Byte offsets (into the image) of the taps of output pixel (oy, ox) that lie inside it.
inline int window_taps(const Int8PoolGeom& g, int64_t oy, int64_t ox, int64_t* off) {
  int n = 0;
  for (int64_t ky = 0; ky < g.kh; ++ky) {
    const int64_t iy = oy * g.sh - g.ph + ky * g.dh;
    if (iy < 0 || iy >= g.H) continue;
    for (int64_t kx = 0; kx < g.kw; ++kx) {
      const int64_t ix = ox * g.sw - g.pw + kx * g.dw;
      if (ix < 0 || ix >= g.W) continue;
      off[n++] = (iy * g.W + ix) * g.C;
    }
  }
  return n;
}

void pixel_scalar(const uint8_t* img, const int64_t* off, int n, int64_t c0, int64_t C,
                  uint8_t flip, uint8_t* out) {
  for (int64_t c = c0; c < C; ++c) {
    uint8_t m = 0;  // the smallest value (after the flip)
    for (int t = 0; t < n; ++t) m = std::max<uint8_t>(m, img[off[t] + c] ^ flip);
    out[c] = m ^ flip;
  }
}

#if PYC_HAVE_X86_SIMD
template <bool Signed>
PYC_TARGET_AVX2 void pixel_avx2(const uint8_t* img, const int64_t* off, int n, int64_t C,
                                uint8_t* out) {
  int64_t c = 0;
  for (; c + 32 <= C; c += 32) {
    __m256i m = Signed ? _mm256_set1_epi8(-128) : _mm256_setzero_si256();
    for (int t = 0; t < n; ++t) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(img + off[t] + c));
      m = Signed ? _mm256_max_epi8(m, v) : _mm256_max_epu8(m, v);
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + c), m);
  }
  pixel_scalar(img, off, n, c, C, Signed ? 0x80 : 0x00, out);
}

template <bool Signed>
PYC_TARGET_AVX512 void pixel_avx512(const uint8_t* img, const int64_t* off, int n, int64_t C,
                                    uint8_t* out) {
  const __m512i lo = Signed ? _mm512_set1_epi8(-128) : _mm512_setzero_si512();
  for (int64_t c = 0; c < C; c += 64) {
    const int64_t rem = C - c;
    const __mmask64 k = rem >= 64 ? ~__mmask64(0) : (__mmask64(1) << rem) - 1;
    __m512i m = lo;
    for (int t = 0; t < n; ++t) {
      const __m512i v = _mm512_maskz_loadu_epi8(k, img + off[t] + c);
      m = Signed ? _mm512_max_epi8(m, v) : _mm512_max_epu8(m, v);
    }
    _mm512_mask_storeu_epi8(out + c, k, m);
  }
}
#endif

}  // namespace

void int8_max_pool2d_cpu(int isa, const Int8PoolGeom& g, const uint8_t* x, bool is_signed,
                         uint8_t* y, int64_t row0, int64_t row1) {
  const int64_t taps = g.kh * g.kw;
  int64_t stack_off[64];
  int64_t* off = taps <= 64 ? stack_off : new int64_t[static_cast<size_t>(taps)];
  const uint8_t flip = is_signed ? 0x80 : 0x00;
  for (int64_t r = row0; r < row1; ++r) {
    const int64_t n = r / g.Ho, oy = r % g.Ho;
    const uint8_t* img = x + n * g.H * g.W * g.C;
    uint8_t* yrow = y + r * g.Wo * g.C;
    for (int64_t ox = 0; ox < g.Wo; ++ox) {
      const int nt = window_taps(g, oy, ox, off);
      uint8_t* out = yrow + ox * g.C;
#if PYC_HAVE_X86_SIMD
      if (isa >= 2) {
        if (is_signed)
          pixel_avx512<true>(img, off, nt, g.C, out);
        else
          pixel_avx512<false>(img, off, nt, g.C, out);
        continue;
      }
      if (isa >= 1) {
        if (is_signed)
          pixel_avx2<true>(img, off, nt, g.C, out);
        else
          pixel_avx2<false>(img, off, nt, g.C, out);
        continue;
      }
#else
      (void)isa;
#endif
      pixel_scalar(img, off, nt, 0, g.C, flip, out);
    }
  }
  if (off != stack_off) delete[] off;
}

}  // namespace pyc
