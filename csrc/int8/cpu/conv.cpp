// int8 2-D convolution on the CPU (see int8/conv.h): weight packing, the implicit-GEMM driver
// over the packed int8 GEMM, the direct depthwise kernel, the fused epilogue and the
// quantization of float input.
//
// Every path computes the exact int32 accumulator; the epilogue evaluates
// y = ((float)acc * x_scale) * w_scale + bias one rounded step at a time (the scalar code is kept
// out of line and compiled for the baseline ISA, the vector code calls the separate multiply and
// add instructions), so all ISA levels give the same bits.
#include "int8/conv.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common/cpu_features.h"
#include "common/simd.h"
#include "int8/cpu/gemm_amx.h"
#include "int8/gemm.h"

namespace pyc {
namespace {

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

// GEMM paths whose prepared A is x + 128 as uint8 (the others read int16 x - zp)
inline bool path_reads_u8(int path) { return path == 2 || path == 4 || path == kInt8PathAmx; }

// ---------------------------------------------------------------- epilogue (scalar)

inline float act_scalar(ConvAct act, float y) {
  switch (act) {
    case ConvAct::None: return y;
    case ConvAct::Relu: return y < 0.f ? 0.f : y;
    case ConvAct::Relu6: {
      float t = y < 0.f ? 0.f : y;
      return t > 6.f ? 6.f : t;
    }
    case ConvAct::Silu: return y / (1.f + std::exp(-y));
    case ConvAct::Hardswish: {
      float t = y + 3.f;
      t = t < 0.f ? 0.f : t;
      t = t > 6.f ? 6.f : t;
      return y * t / 6.f;
    }
  }
  return y;
}

inline void store_out_scalar(const Int8ConvArgs& a, int64_t i, float y) {
  switch (a.out_kind) {
    case ConvOut::F32: static_cast<float*>(a.out)[i] = y; return;
    case ConvOut::F16: store_from_float(a.out, i, DType::F16, y); return;
    case ConvOut::BF16: store_from_float(a.out, i, DType::BF16, y); return;
    case ConvOut::U8:
    case ConvOut::S8: {
      const bool u8 = a.out_kind == ConvOut::U8;
      const float lo = u8 ? 0.f : -128.f, hi = u8 ? 255.f : 127.f;
      float r = std::nearbyint(y * a.out_inv) + static_cast<float>(a.out_zp);
      r = r > lo ? r : lo;  // NaN -> the low end, as the vector code
      r = r < hi ? r : hi;
      const int32_t q = static_cast<int32_t>(r);
      if (u8)
        static_cast<uint8_t*>(a.out)[i] = static_cast<uint8_t>(q);
      else
        static_cast<int8_t*>(a.out)[i] = static_cast<int8_t>(q);
      return;
    }
  }
}

// A block of int32 results on its way out: rows are output pixels m_first .. m_first + mr - 1,
// columns the output channels co0 .. co0 + nc - 1. With colsum, corr(row) * colsum[col] is added
// first (modulo 2^32), corr(row) = corr_base - the byte zero point of the row's image.
struct EpTile {
  const int32_t* tile;
  int64_t ldt;
  int64_t m_first, mr;
  int64_t co0, nc;
  const int32_t* colsum;
  int32_t corr_base;
};

inline int32_t byte_zero_point(const Int8ConvArgs& a, int64_t n) {
  return a.x_signed ? a.x_zp[n] + 128 : a.x_zp[n];
}

__attribute__((noinline)) void epilogue_tile_scalar(const EpTile& t, int64_t HoWo, int64_t Cout,
                                                    const Int8ConvArgs& a) {
  for (int64_t r = 0; r < t.mr; ++r) {
    const int64_t m = t.m_first + r, n = m / HoWo;
    const float xs = a.x_scale[n];
    const uint32_t corr = static_cast<uint32_t>(t.corr_base - byte_zero_point(a, n));
    const int32_t* acc = t.tile + r * t.ldt;
    for (int64_t j = 0; j < t.nc; ++j) {
      uint32_t v = static_cast<uint32_t>(acc[j]);
      if (t.colsum) v += corr * static_cast<uint32_t>(t.colsum[j]);
      const int64_t co = t.co0 + j;
      float y = static_cast<float>(static_cast<int32_t>(v)) * xs;
      y = y * a.w_scale[co];
      if (a.bias) y = y + a.bias[co];
      store_out_scalar(a, m * Cout + co, act_scalar(a.act, y));
    }
  }
}

// silu of 16 lanes held in memory (exp from the C library, as on the scalar path)
__attribute__((noinline)) void silu_lanes(float* v, int n) {
  for (int i = 0; i < n; ++i) v[i] = v[i] / (1.f + std::exp(-v[i]));
}

#if PYC_HAVE_X86_SIMD

template <ConvAct A>
PYC_TARGET_AVX512 inline __m512 act_avx512(__m512 y) {
  const __m512 zero = _mm512_setzero_ps();
  if (A == ConvAct::Relu) return _mm512_max_ps(zero, y);
  if (A == ConvAct::Relu6) return _mm512_min_ps(_mm512_set1_ps(6.f), _mm512_max_ps(zero, y));
  if (A == ConvAct::Hardswish) {
    __m512 t = _mm512_add_ps(y, _mm512_set1_ps(3.f));
    t = _mm512_min_ps(_mm512_set1_ps(6.f), _mm512_max_ps(zero, t));
    return _mm512_div_ps(_mm512_mul_ps(y, t), _mm512_set1_ps(6.f));
  }
  if (A == ConvAct::Silu) {
    alignas(64) float t[16];
    _mm512_store_ps(t, y);
    silu_lanes(t, 16);
    return _mm512_load_ps(t);
  }
  return y;
}

// What the stores need, copied out of Int8ConvArgs into locals: the output is written through
// byte pointers, which may alias anything, so fields read through a reference would be reloaded
// after every store.
struct OutAvx512 {
  void* out;
  __m512 inv, zpf;
};

// Full: all 16 lanes are stored (plain stores); otherwise the lanes of k.
template <ConvOut O, bool Full>
PYC_TARGET_AVX512 inline void store_out_avx512(const OutAvx512& o, int64_t i, __m512 y,
                                               __mmask16 k) {
  if (O == ConvOut::F32) {
    float* p = static_cast<float*>(o.out) + i;
    if (Full)
      _mm512_storeu_ps(p, y);
    else
      _mm512_mask_storeu_ps(p, k, y);
    return;
  }
  if (O == ConvOut::F16 || O == ConvOut::BF16) {
    __m256i h;
    if (O == ConvOut::F16) {
      h = _mm512_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    } else {
      const __m512i u = _mm512_castps_si512(y);
      const __m512i hi = _mm512_srli_epi32(u, 16);
      const __m512i lsb = _mm512_and_si512(hi, _mm512_set1_epi32(1));
      __m512i r = _mm512_srli_epi32(
          _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb)), 16);
      const __m512i absu = _mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff));
      const __mmask16 nan = _mm512_cmpgt_epi32_mask(absu, _mm512_set1_epi32(0x7f800000));
      r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(hi, _mm512_set1_epi32(0x40)));
      h = _mm512_cvtepi32_epi16(r);
    }
    uint16_t* p = static_cast<uint16_t*>(o.out) + i;
    if (Full)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
    else
      _mm256_mask_storeu_epi16(p, k, h);
    return;
  }
  __m512 r = _mm512_roundscale_ps(_mm512_mul_ps(y, o.inv),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  r = _mm512_add_ps(r, o.zpf);
  __m128i q;
  if (O == ConvOut::U8) {
    // max(r, 0) (NaN -> 0: max returns its second operand), then the unsigned saturating
    // narrowing clamps at 255 (values beyond int32 convert to 0x80000000, also above 255)
    r = _mm512_max_ps(r, _mm512_setzero_ps());
    q = _mm512_cvtusepi32_epi8(_mm512_cvtps_epi32(r));
  } else {
    // min(127, r) (keeps NaN), then the signed saturating narrowing clamps at -128 (NaN and
    // values below int32 convert to 0x80000000): NaN -> -128, the low end as on the scalar path
    r = _mm512_min_ps(_mm512_set1_ps(127.f), r);
    q = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(r));
  }
  uint8_t* p = static_cast<uint8_t*>(o.out) + i;
  // the narrowing into a register, then a plain store (the narrowing store is slow)
  if (Full)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), q);
  else
    _mm_mask_storeu_epi8(p, k, q);
}

// One row's 16 columns: acc + comp, dequantized, activated and stored at out[i].
template <ConvAct A, ConvOut O, bool Full, bool Bias>
PYC_TARGET_AVX512 inline void epilogue16_avx512(const OutAvx512& o, int64_t i, const int32_t* src,
                                                __m512i comp, __m512 xs, __m512 ws, __m512 bias,
                                                __mmask16 k) {
  const __m512i acc = Full ? _mm512_loadu_si512(src) : _mm512_maskz_loadu_epi32(k, src);
  __m512 y = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(acc, comp)), xs), ws);
  if (Bias) {
    // the product is rounded before the bias is added (the empty asm keeps the compiler from
    // contracting the two into an FMA)
    asm("" : "+v"(y));
    y = _mm512_add_ps(y, bias);
  }
  store_out_avx512<O, Full>(o, i, act_avx512<A>(y), k);
}

// Columns in groups of 32 (two vectors per row, both kept with their per-column constants in
// registers while the rows go by); rows in runs of the same image.
template <ConvAct A, ConvOut O, bool Bias>
PYC_TARGET_AVX512 void epilogue_tile_avx512_b(const EpTile& t, int64_t HoWo, int64_t Cout,
                                              const Int8ConvArgs& a) {
  const OutAvx512 o{a.out, _mm512_set1_ps(a.out_inv), _mm512_set1_ps(static_cast<float>(a.out_zp))};
  const float* const w_scale = a.w_scale;
  const float* const bias = a.bias;
  const float* const x_scale = a.x_scale;
  const int32_t* const colsum = t.colsum;
  const int32_t* const tile = t.tile;
  const int64_t ldt = t.ldt, m_first = t.m_first, mr = t.mr, co0 = t.co0, nc = t.nc;
  // corr(image n) = corr_base - the byte zero point of image n
  const int32_t corr_base = t.corr_base + (a.x_signed ? -128 : 0);
  const int32_t* const x_zp = a.x_zp;
  for (int64_t j = 0; j < nc; j += 32) {
    const int64_t w = std::min<int64_t>(32, nc - j);
    const __mmask16 k0 = w >= 16 ? __mmask16(0xffff) : __mmask16((1u << w) - 1);
    const __mmask16 k1 = w >= 32 ? __mmask16(0xffff) : (w > 16 ? __mmask16((1u << (w - 16)) - 1) : __mmask16(0));
    const int64_t co = co0 + j;
    const __m512 ws0 = _mm512_maskz_loadu_ps(k0, w_scale + co);
    const __m512 ws1 = _mm512_maskz_loadu_ps(k1, w_scale + co + 16);
    const __m512 b0 = Bias ? _mm512_maskz_loadu_ps(k0, bias + co) : _mm512_setzero_ps();
    const __m512 b1 = Bias ? _mm512_maskz_loadu_ps(k1, bias + co + 16) : _mm512_setzero_ps();
    const __m512i cs0 = colsum ? _mm512_maskz_loadu_epi32(k0, colsum + j) : _mm512_setzero_si512();
    const __m512i cs1 = colsum ? _mm512_maskz_loadu_epi32(k1, colsum + j + 16) : _mm512_setzero_si512();
    const int64_t mend = m_first + mr;
    int64_t m = m_first, n = m / HoWo;
    const int32_t* src = tile + j;
    while (m < mend) {
      // the rows of image n
      const int64_t seg_end = std::min(mend, (n + 1) * HoWo);
      const __m512 xs = _mm512_set1_ps(x_scale[n]);
      const __m512i corr = _mm512_set1_epi32(corr_base - x_zp[n]);
      const __m512i c0 = _mm512_mullo_epi32(cs0, corr), c1 = _mm512_mullo_epi32(cs1, corr);
      if (w == 32) {
        for (; m < seg_end; ++m, src += ldt) {
          epilogue16_avx512<A, O, true, Bias>(o, m * Cout + co, src, c0, xs, ws0, b0, k0);
          epilogue16_avx512<A, O, true, Bias>(o, m * Cout + co + 16, src + 16, c1, xs, ws1, b1, k1);
        }
      } else if (w == 16) {
        for (; m < seg_end; ++m, src += ldt)
          epilogue16_avx512<A, O, true, Bias>(o, m * Cout + co, src, c0, xs, ws0, b0, k0);
      } else if (w > 16) {
        for (; m < seg_end; ++m, src += ldt) {
          epilogue16_avx512<A, O, true, Bias>(o, m * Cout + co, src, c0, xs, ws0, b0, k0);
          epilogue16_avx512<A, O, false, Bias>(o, m * Cout + co + 16, src + 16, c1, xs, ws1, b1, k1);
        }
      } else {
        for (; m < seg_end; ++m, src += ldt)
          epilogue16_avx512<A, O, false, Bias>(o, m * Cout + co, src, c0, xs, ws0, b0, k0);
      }
      ++n;
    }
  }
}

template <ConvAct A, ConvOut O>
PYC_TARGET_AVX512 void epilogue_tile_avx512(const EpTile& t, int64_t HoWo, int64_t Cout,
                                            const Int8ConvArgs& a) {
  if (a.bias)
    epilogue_tile_avx512_b<A, O, true>(t, HoWo, Cout, a);
  else
    epilogue_tile_avx512_b<A, O, false>(t, HoWo, Cout, a);
}

using EpilogueFn = void (*)(const EpTile&, int64_t, int64_t, const Int8ConvArgs&);

template <ConvAct A>
EpilogueFn pick_out_avx512(ConvOut o) {
  switch (o) {
    case ConvOut::F32: return epilogue_tile_avx512<A, ConvOut::F32>;
    case ConvOut::F16: return epilogue_tile_avx512<A, ConvOut::F16>;
    case ConvOut::BF16: return epilogue_tile_avx512<A, ConvOut::BF16>;
    case ConvOut::U8: return epilogue_tile_avx512<A, ConvOut::U8>;
    case ConvOut::S8: return epilogue_tile_avx512<A, ConvOut::S8>;
  }
  return epilogue_tile_avx512<A, ConvOut::F32>;
}

EpilogueFn pick_avx512(ConvAct act, ConvOut o) {
  switch (act) {
    case ConvAct::None: return pick_out_avx512<ConvAct::None>(o);
    case ConvAct::Relu: return pick_out_avx512<ConvAct::Relu>(o);
    case ConvAct::Relu6: return pick_out_avx512<ConvAct::Relu6>(o);
    case ConvAct::Silu: return pick_out_avx512<ConvAct::Silu>(o);
    case ConvAct::Hardswish: return pick_out_avx512<ConvAct::Hardswish>(o);
  }
  return pick_out_avx512<ConvAct::None>(o);
}

template <ConvAct A>
PYC_TARGET_AVX2 inline __m256 act_avx2(__m256 y) {
  const __m256 zero = _mm256_setzero_ps();
  if (A == ConvAct::Relu) return _mm256_max_ps(zero, y);
  if (A == ConvAct::Relu6) return _mm256_min_ps(_mm256_set1_ps(6.f), _mm256_max_ps(zero, y));
  if (A == ConvAct::Hardswish) {
    __m256 t = _mm256_add_ps(y, _mm256_set1_ps(3.f));
    t = _mm256_min_ps(_mm256_set1_ps(6.f), _mm256_max_ps(zero, t));
    return _mm256_div_ps(_mm256_mul_ps(y, t), _mm256_set1_ps(6.f));
  }
  if (A == ConvAct::Silu) {
    alignas(32) float t[8];
    _mm256_store_ps(t, y);
    silu_lanes(t, 8);
    return _mm256_load_ps(t);
  }
  return y;
}

template <ConvOut O>
PYC_TARGET_AVX2 inline void store_out_avx2(const Int8ConvArgs& a, int64_t i, __m256 y) {
  if (O == ConvOut::F32) {
    _mm256_storeu_ps(static_cast<float*>(a.out) + i, y);
  } else if (O == ConvOut::F16) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(a.out) + i),
                     _mm256_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else if (O == ConvOut::BF16) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(a.out) + i), pyc_cvt_f32_bf16_avx2(y));
  } else {
    constexpr bool u8 = O == ConvOut::U8;
    __m256 r = _mm256_round_ps(_mm256_mul_ps(y, _mm256_set1_ps(a.out_inv)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm256_add_ps(r, _mm256_set1_ps(static_cast<float>(a.out_zp)));
    // NaN -> the low end (max returns its second operand), as the scalar code
    r = _mm256_max_ps(r, _mm256_set1_ps(u8 ? 0.f : -128.f));
    r = _mm256_min_ps(r, _mm256_set1_ps(u8 ? 255.f : 127.f));
    const __m256i q = _mm256_cvtps_epi32(r);
    const __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
    const __m128i q8 = u8 ? _mm_packus_epi16(q16, q16) : _mm_packs_epi16(q16, q16);
    _mm_storel_epi64(reinterpret_cast<__m128i*>(static_cast<uint8_t*>(a.out) + i), q8);
  }
}

// Whole groups of 8 columns in registers; the remaining columns go through the scalar code
// (kept out of line: inside this function the compiler could fuse its multiply-add).
template <ConvAct A, ConvOut O>
PYC_TARGET_AVX2 void epilogue_tile_avx2(const EpTile& t, int64_t HoWo, int64_t Cout,
                                        const Int8ConvArgs& a) {
  const int64_t nv = t.nc / 8 * 8;
  for (int64_t j = 0; j < nv; j += 8) {
    const int64_t co = t.co0 + j;
    const __m256 ws = _mm256_loadu_ps(a.w_scale + co);
    const __m256 bias = a.bias ? _mm256_loadu_ps(a.bias + co) : _mm256_setzero_ps();
    const __m256i cs = t.colsum ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(t.colsum + j))
                                : _mm256_setzero_si256();
    int64_t n = t.m_first / HoWo, next = (n + 1) * HoWo;
    __m256 xs = _mm256_set1_ps(a.x_scale[n]);
    __m256i comp = _mm256_mullo_epi32(cs, _mm256_set1_epi32(t.corr_base - byte_zero_point(a, n)));
    const int32_t* src = t.tile + j;
    for (int64_t m = t.m_first; m < t.m_first + t.mr; ++m, src += t.ldt) {
      if (m == next) {
        ++n;
        next += HoWo;
        xs = _mm256_set1_ps(a.x_scale[n]);
        comp = _mm256_mullo_epi32(cs, _mm256_set1_epi32(t.corr_base - byte_zero_point(a, n)));
      }
      const __m256i v = _mm256_add_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)), comp);
      __m256 y = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(v), xs), ws);
      if (a.bias) y = _mm256_add_ps(y, bias);
      store_out_avx2<O>(a, m * Cout + co, act_avx2<A>(y));
    }
  }
  if (nv < t.nc) {
    EpTile rest = t;
    rest.tile = t.tile + nv;
    rest.co0 = t.co0 + nv;
    rest.nc = t.nc - nv;
    if (t.colsum) rest.colsum = t.colsum + nv;
    epilogue_tile_scalar(rest, HoWo, Cout, a);
  }
}

template <ConvAct A>
EpilogueFn pick_out_avx2(ConvOut o) {
  switch (o) {
    case ConvOut::F32: return epilogue_tile_avx2<A, ConvOut::F32>;
    case ConvOut::F16: return epilogue_tile_avx2<A, ConvOut::F16>;
    case ConvOut::BF16: return epilogue_tile_avx2<A, ConvOut::BF16>;
    case ConvOut::U8: return epilogue_tile_avx2<A, ConvOut::U8>;
    case ConvOut::S8: return epilogue_tile_avx2<A, ConvOut::S8>;
  }
  return epilogue_tile_avx2<A, ConvOut::F32>;
}

EpilogueFn pick_avx2(ConvAct act, ConvOut o) {
  switch (act) {
    case ConvAct::None: return pick_out_avx2<ConvAct::None>(o);
    case ConvAct::Relu: return pick_out_avx2<ConvAct::Relu>(o);
    case ConvAct::Relu6: return pick_out_avx2<ConvAct::Relu6>(o);
    case ConvAct::Silu: return pick_out_avx2<ConvAct::Silu>(o);
    case ConvAct::Hardswish: return pick_out_avx2<ConvAct::Hardswish>(o);
  }
  return pick_out_avx2<ConvAct::None>(o);
}

#endif  // PYC_HAVE_X86_SIMD

// The epilogue for a level (picked once per op call).
EpilogueFn pick_epilogue(int level, const Int8ConvArgs& a) {
#if PYC_HAVE_X86_SIMD
  if (level >= 2) return pick_avx512(a.act, a.out_kind);
  if (level == 1) return pick_avx2(a.act, a.out_kind);
#endif
  (void)level;
  (void)a;
  return epilogue_tile_scalar;
}

// ---------------------------------------------------------------- gathering A rows

// dst[0, n) = src[0, n) ^ x (bytes)
#if PYC_HAVE_X86_SIMD
PYC_TARGET_AVX512 void copy_xor_avx512(uint8_t* dst, const uint8_t* src, int64_t n, uint8_t x) {
  const __m512i xv = _mm512_set1_epi8(static_cast<char>(x));
  int64_t i = 0;
  for (; i + 64 <= n; i += 64)
    _mm512_storeu_si512(dst + i, _mm512_xor_si512(_mm512_loadu_si512(src + i), xv));
  if (i < n) {
    const __mmask64 k = (~uint64_t(0)) >> (64 - (n - i));
    _mm512_mask_storeu_epi8(dst + i, k, _mm512_xor_si512(_mm512_maskz_loadu_epi8(k, src + i), xv));
  }
}
#endif

inline void copy_xor(int level, uint8_t* dst, const uint8_t* src, int64_t n, uint8_t x) {
#if PYC_HAVE_X86_SIMD
  if (level >= 2) return copy_xor_avx512(dst, src, n, x);
#endif
  (void)level;
  if (x == 0) {
    std::memcpy(dst, src, static_cast<size_t>(n));
  } else {
    for (int64_t i = 0; i < n; ++i) dst[i] = src[i] ^ x;
  }
}

#if PYC_HAVE_X86_SIMD
PYC_TARGET_AVX512 inline void fill_avx512(uint8_t* d, int64_t n, __m512i v) {
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) _mm512_storeu_si512(d + i, v);
  if (i < n) _mm512_mask_storeu_epi8(d + i, (~uint64_t(0)) >> (64 - (n - i)), v);
}

PYC_TARGET_AVX512 inline void copy_avx512(uint8_t* d, const uint8_t* src, int64_t n, __m512i flip) {
  int64_t i = 0;
  for (; i + 64 <= n; i += 64)
    _mm512_storeu_si512(d + i, _mm512_xor_si512(_mm512_loadu_si512(src + i), flip));
  if (i < n) {
    const __mmask64 k = (~uint64_t(0)) >> (64 - (n - i));
    _mm512_mask_storeu_epi8(d + i, k, _mm512_xor_si512(_mm512_maskz_loadu_epi8(k, src + i), flip));
  }
}

// gather_rows for the paths that read bytes (x, or x ^ 0x80 for int8 x), with the copies inline.
// The bytes are written through uint8_t pointers, which may alias anything: what the loop reads
// is held in locals (read through the references, it would be reloaded after every store).
PYC_TARGET_AVX512 void gather_rows_u8_avx512(const Int8ConvGeom& g, const Int8ConvArgs& a,
                                             int64_t grp, int64_t m0, int64_t mr, uint8_t* ap,
                                             int64_t rb) {
  const int64_t Cg = g.cin_g(), K = g.k(), HoWo = g.Ho * g.Wo;
  const int64_t C = g.C, H = g.H, W = g.W, Ho = g.Ho, Wo = g.Wo, N = g.N;
  const int64_t kh = g.kh, kw = g.kw, sh = g.sh, sw = g.sw, ph = g.ph, pw = g.pw;
  const int64_t dh = g.dh, dw = g.dw;
  const bool runs = g.groups == 1 && dw == 1;
  const int64_t run = kw * Cg;  // bytes of one kernel row
  const uint8_t* const x = a.x;
  const uint8_t* const x_end = x + N * H * W * C;
  const int32_t* const x_zp = a.x_zp;
  const int32_t zp_shift = a.x_signed ? 128 : 0;
  const __m512i flip = _mm512_set1_epi8(a.x_signed ? static_cast<char>(0x80) : 0);
  const __m512i zero = _mm512_setzero_si512();
  int64_t n = m0 / HoWo, rem = m0 - n * HoWo;
  int64_t oy = rem / Wo, ox = rem - oy * Wo;
  __m512i pad = _mm512_set1_epi8(static_cast<char>(x_zp[n] + zp_shift));
  const uint8_t* img = x + n * H * W * C + grp * Cg;
  for (int64_t r = 0; r < mr; ++r) {
    const int64_t ix0 = ox * sw - pw;
    const int64_t iy0 = oy * sh - ph;
    uint8_t* row = ap + r * rb;
    if (runs && ix0 >= 0 && ix0 + kw - 1 < W) {
      // every tap column inside the image: one run of input bytes per kernel row
      const uint8_t* src = img + (iy0 * W + ix0) * C;
      for (int64_t ky = 0; ky < kh; ++ky, src += dh * W * C) {
        const int64_t iy = iy0 + ky * dh;
        if (iy < 0 || iy >= H) {
          fill_avx512(row + ky * run, run, pad);
        } else if (run <= 64 && src + 64 <= x_end) {
          // a short run (a few channels) as one whole vector: the bytes stored past its end
          // are overwritten by the next run, the zero tail or the next row (the workspace
          // ends with 64 spare bytes)
          _mm512_storeu_si512(row + ky * run, _mm512_xor_si512(_mm512_loadu_si512(src), flip));
        } else {
          copy_avx512(row + ky * run, src, run, flip);
        }
      }
    } else {
      int64_t kx_lo = 0, kx_hi = kw;
      while (kx_lo < kw && ix0 + kx_lo * dw < 0) ++kx_lo;
      while (kx_hi > kx_lo && ix0 + (kx_hi - 1) * dw >= W) --kx_hi;
      for (int64_t ky = 0; ky < kh; ++ky) {
        const int64_t iy = iy0 + ky * dh;
        uint8_t* d = row + ky * kw * Cg;
        if (iy < 0 || iy >= H || kx_hi <= kx_lo) {
          fill_avx512(d, kw * Cg, pad);
          continue;
        }
        if (kx_lo > 0) fill_avx512(d, kx_lo * Cg, pad);
        if (kx_hi < kw) fill_avx512(d + kx_hi * Cg, (kw - kx_hi) * Cg, pad);
        const uint8_t* src = img + (iy * W + ix0 + kx_lo * dw) * C;
        if (runs) {
          copy_avx512(d + kx_lo * Cg, src, (kx_hi - kx_lo) * Cg, flip);
        } else {
          for (int64_t kx = kx_lo; kx < kx_hi; ++kx)
            copy_avx512(d + kx * Cg, src + (kx - kx_lo) * dw * C, Cg, flip);
        }
      }
    }
    fill_avx512(row + K, rb - K, zero);
    if (++ox == Wo) {
      ox = 0;
      if (++oy == Ho) {
        oy = 0;
        ++n;
        if (n < N) {
          pad = _mm512_set1_epi8(static_cast<char>(x_zp[n] + zp_shift));
          img = x + n * H * W * C + grp * Cg;
        }
      }
    }
  }
}
#endif

// Rows [m0, m0 + mr) (output pixels) of group grp into ap (row stride rb) in the form `path` reads.
// With one group and no horizontal dilation the valid taps of a kernel row are one run of input
// bytes (kx-adjacent pixels are adjacent in NHWC), copied at once.
void gather_rows(int path, int level, const Int8ConvGeom& g, const Int8ConvArgs& a, int64_t grp,
                 int64_t m0, int64_t mr, uint8_t* ap, int64_t rb) {
#if PYC_HAVE_X86_SIMD
  if (level >= 2 && path_reads_u8(path)) return gather_rows_u8_avx512(g, a, grp, m0, mr, ap, rb);
#endif
  const int64_t Cg = g.cin_g(), K = g.k(), HoWo = g.Ho * g.Wo;
  const bool u8 = path_reads_u8(path);
  const bool runs = g.groups == 1 && g.dw == 1;
  const uint8_t flip = a.x_signed ? 0x80 : 0;
  int64_t n = m0 / HoWo, rem = m0 - n * HoWo;
  int64_t oy = rem / g.Wo, ox = rem - oy * g.Wo;
  for (int64_t r = 0; r < mr; ++r) {
    const uint8_t* img = a.x + n * g.H * g.W * g.C + grp * Cg;
    const int32_t zp = a.x_zp[n];
    const uint8_t pad = static_cast<uint8_t>(byte_zero_point(a, n));
    const int64_t ix0 = ox * g.sw - g.pw;
    // kx range whose input column is inside the image (dilation dw)
    int64_t kx_lo = 0, kx_hi = g.kw;
    while (kx_lo < g.kw && ix0 + kx_lo * g.dw < 0) ++kx_lo;
    while (kx_hi > kx_lo && ix0 + (kx_hi - 1) * g.dw >= g.W) --kx_hi;
    uint8_t* row = ap + r * rb;
    for (int64_t ky = 0; ky < g.kh; ++ky) {
      const int64_t iy = oy * g.sh - g.ph + ky * g.dh;
      const bool row_ok = iy >= 0 && iy < g.H && kx_hi > kx_lo;
      const int64_t t0 = ky * g.kw;
      if (u8) {
        uint8_t* d = row + t0 * Cg;
        if (!row_ok) {
          std::memset(d, pad, static_cast<size_t>(g.kw * Cg));
          continue;
        }
        if (kx_lo > 0) std::memset(d, pad, static_cast<size_t>(kx_lo * Cg));
        if (kx_hi < g.kw) std::memset(d + kx_hi * Cg, pad, static_cast<size_t>((g.kw - kx_hi) * Cg));
        const uint8_t* src = img + (iy * g.W + ix0 + kx_lo * g.dw) * g.C;
        if (runs) {
          copy_xor(level, d + kx_lo * Cg, src, (kx_hi - kx_lo) * Cg, flip);
        } else {
          for (int64_t kx = kx_lo; kx < kx_hi; ++kx)
            copy_xor(level, d + kx * Cg, src + (kx - kx_lo) * g.dw * g.C, Cg, flip);
        }
      } else {
        int16_t* d = reinterpret_cast<int16_t*>(row) + t0 * Cg;
        if (!row_ok) {
          std::memset(d, 0, static_cast<size_t>(g.kw * Cg) * 2);
          continue;
        }
        if (kx_lo > 0) std::memset(d, 0, static_cast<size_t>(kx_lo * Cg) * 2);
        if (kx_hi < g.kw) std::memset(d + kx_hi * Cg, 0, static_cast<size_t>((g.kw - kx_hi) * Cg) * 2);
        const uint8_t* src = img + (iy * g.W + ix0 + kx_lo * g.dw) * g.C;
        for (int64_t kx = kx_lo; kx < kx_hi; ++kx) {
          const uint8_t* s = src + (kx - kx_lo) * g.dw * g.C;
          int16_t* dk = d + kx * Cg;
          if (a.x_signed) {
            for (int64_t c = 0; c < Cg; ++c) dk[c] = static_cast<int16_t>(static_cast<int8_t>(s[c]) - zp);
          } else {
            for (int64_t c = 0; c < Cg; ++c) dk[c] = static_cast<int16_t>(s[c] - zp);
          }
        }
      }
    }
    if (u8)
      std::memset(row + K, 0, static_cast<size_t>(rb - K));
    else
      std::memset(row + 2 * K, 0, static_cast<size_t>(rb - 2 * K));
    if (++ox == g.Wo) {
      ox = 0;
      if (++oy == g.Ho) {
        oy = 0;
        ++n;
      }
    }
  }
}

// ---------------------------------------------------------------- implicit GEMM driver

int level_of(int isa) { return std::min(isa, 2); }

// What the GEMM's tile callback needs to finish a block's tiles.
struct TileCtx {
  const Int8ConvGeom* g;
  const Int8ConvArgs* a;
  EpilogueFn ep;
  const int32_t* colsum;  // the group's column sums (u8 paths), else nullptr
  int64_t m_base;         // first output pixel of the block
  int64_t co_base;        // first output channel of the group
};

void finish_tile(void* ctx, const int32_t* tile, int64_t ldt, int64_t m0, int64_t mr, int64_t n0,
                 int64_t nc) {
  const TileCtx& c = *static_cast<const TileCtx*>(ctx);
  const EpTile t{tile, ldt, c.m_base + m0, mr, c.co_base + n0, nc,
                 c.colsum ? c.colsum + n0 : nullptr, 128};
  c.ep(t, c.g->Ho * c.g->Wo, c.g->Cout, *c.a);
}

// The AMX driver's block callback: its sums are x * w with the bytes as they are (no + 128
// compensation), so the correction is -zp * sum_k w.
void finish_block(void* ctx, const int32_t* tile, int64_t ldt, int64_t m0, int64_t mr, int64_t n0,
                  int64_t nc) {
  const TileCtx& c = *static_cast<const TileCtx*>(ctx);
  const EpTile t{tile, ldt, c.m_base + m0, mr, c.co_base + n0, nc, c.colsum + n0, 0};
  c.ep(t, c.g->Ho * c.g->Wo, c.g->Cout, *c.a);
}

void run_gemm_tasks(const Int8ConvPlan& plan, const Int8ConvGeom& g, const int8_t* packed,
                    const Int8ConvArgs& a, int64_t t0, int64_t t1, void* workspace, int level) {
  const int path = plan.path;
  const int64_t Coutg = g.cout_g(), K = g.k(), Kp = int8_round_k(K), Npg = int8_round_n(Coutg);
  const int64_t panels = Npg / kInt8PanelCols, block_bytes = int8_packed_bytes(Coutg, K);
  const int64_t rb = int8_a_row_bytes(path, K), M = g.N * g.Ho * g.Wo;
  uint8_t* ap = static_cast<uint8_t*>(workspace);
  const bool u8 = path_reads_u8(path);
  const EpilogueFn ep_fn = pick_epilogue(level, a);
  // uint8 rows of a 1x1 conv are A + 128 as the byte paths read it (int8 rows would need ^ 0x80)
  const bool direct = plan.direct_rows && !a.x_signed;
  // the tile configuration is held for all the tasks
  const Int8AmxTiles tiles(path == kInt8PathAmx);
  int64_t have_grp = -1, have_blk = -1;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t ch = t % plan.chunks, blk = (t / plan.chunks) % plan.blocks;
    const int64_t grp = t / (plan.chunks * plan.blocks);
    const int64_t m0 = blk * plan.rows, mr = std::min(plan.rows, M - m0);
    if (mr <= 0) continue;
    const uint8_t* arows = ap;
    int64_t lda = 0;
    if (direct) {
      arows = a.x + m0 * g.C + grp * g.cin_g();
      lda = g.C;
    } else if (grp != have_grp || blk != have_blk) {
      gather_rows(path, level, g, a, grp, m0, mr, ap, rb);
      have_grp = grp;
      have_blk = blk;
    }
    const int8_t* pk = packed + grp * block_bytes;
    const int64_t p0 = ch * plan.chunk_panels, p1 = std::min(panels, p0 + plan.chunk_panels);
    if (p1 <= p0) continue;
    TileCtx ctx{&g, &a, ep_fn, u8 ? reinterpret_cast<const int32_t*>(pk + Npg * Kp) : nullptr, m0,
                grp * Coutg};
#if PYC_HAVE_X86_SIMD
    if (path == kInt8PathAmx) {
      int8_gemm_amx_u8(tiles, arows, lda > 0 ? lda : rb, pk, mr, Coutg, K, p0, p1, finish_block,
                       &ctx);
      continue;
    }
#endif
    Int8Epilogue ep;
    ep.tile_fn = finish_tile;
    ep.tile_ctx = &ctx;
    int8_gemm_packed(path, arows, pk, mr, Coutg, K, p0, p1, ep, nullptr, lda);
  }
}

// ---------------------------------------------------------------- depthwise
//
// Packed layout (T = kh * kw taps, KQ = ceil(kh / 4), Cp = round_up(C, 64)):
//   [0, 4 * Cp * KQ * kw):     the VNNI form [KQ][kw][Cp / 16][16 channels][4]: byte u of a
//                              channel's 4 is the weight of tap (ky = 4 * qy + u, kx), zero for
//                              ky >= kh;
//   next 4 * Cp bytes:         int32 sum over the taps of each channel's weights;
//   next 2 * T * Cp bytes:     int16 [T][Cp] weights (the AVX2 and scalar kernels).
// Channels beyond C are zero.
//
// Every kernel computes sum_t v_t * w_t over all taps, with v the input byte (x ^ 0x80 for int8 x)
// and padding taps reading the zero point; the epilogue subtracts zp * sum_t w_t.
//
// The VNNI kernel works on one output row at a time: it first interleaves, for every input column
// the row needs, the bytes of 4 vertically adjacent taps per channel ([16 channels][4] per 64
// bytes, two rounds of unpacking and a 4 x 4 transpose of 128-bit lanes), so that each (vertical
// quad, kx) pair of the kernel is one vpdpbusd per 16 channels, with no shuffles in the
// per-pixel loop.

int64_t dw_cp(const Int8ConvGeom& g) { return round_up(g.C, 64); }
int64_t dw_kq(const Int8ConvGeom& g) { return (g.kh + 3) / 4; }
int64_t dw_wsum_offset(const Int8ConvGeom& g) { return 4 * dw_cp(g) * dw_kq(g) * g.kw; }
int64_t dw_w16_offset(const Int8ConvGeom& g) { return dw_wsum_offset(g) + 4 * dw_cp(g); }
// input columns (from -pw) that one output row reads
int64_t dw_cols(const Int8ConvGeom& g) { return (g.Wo - 1) * g.sw + (g.kw - 1) * g.dw + 1; }

// Output pixel (oy, ox): each tap's input pixel (its first byte), or the zero-point row.
inline void dw_tap_pointers(const Int8ConvGeom& g, const uint8_t* img, const uint8_t* zprow,
                            int64_t oy, int64_t ox, const uint8_t** ptr) {
  int64_t t = 0;
  for (int64_t ky = 0; ky < g.kh; ++ky) {
    const int64_t iy = oy * g.sh - g.ph + ky * g.dh;
    const bool yok = iy >= 0 && iy < g.H;
    for (int64_t kx = 0; kx < g.kw; ++kx, ++t) {
      const int64_t ix = ox * g.sw - g.pw + kx * g.dw;
      ptr[t] = yok && ix >= 0 && ix < g.W ? img + (iy * g.W + ix) * g.C : zprow;
    }
  }
}

void dw_pixel_scalar(int64_t C, int64_t T, const int16_t* w16, int64_t Cp, const uint8_t* const* ptr,
                     uint8_t flip, int32_t* acc) {
  for (int64_t c = 0; c < C; ++c) {
    int32_t s = 0;
    for (int64_t t = 0; t < T; ++t) s += static_cast<int32_t>(ptr[t][c] ^ flip) * w16[t * Cp + c];
    acc[c] = s;
  }
}

#if PYC_HAVE_X86_SIMD
// 16 channels per step: (v * w) fits int16 exactly (|v * w| <= 255 * 128), widened to int32.
PYC_TARGET_AVX2 void dw_pixel_avx2(int64_t C, int64_t T, const int16_t* w16, int64_t Cp,
                                   const uint8_t* const* ptr, uint8_t flip, int32_t* acc) {
  const __m128i fv = _mm_set1_epi8(static_cast<char>(flip));
  int64_t c0 = 0;
  for (; c0 + 16 <= C; c0 += 16) {
    __m256i lo = _mm256_setzero_si256(), hi = _mm256_setzero_si256();
    for (int64_t t = 0; t < T; ++t) {
      const __m128i xb = _mm_xor_si128(_mm_loadu_si128(reinterpret_cast<const __m128i*>(ptr[t] + c0)), fv);
      const __m256i p = _mm256_mullo_epi16(
          _mm256_cvtepu8_epi16(xb), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w16 + t * Cp + c0)));
      lo = _mm256_add_epi32(lo, _mm256_cvtepi16_epi32(_mm256_castsi256_si128(p)));
      hi = _mm256_add_epi32(hi, _mm256_cvtepi16_epi32(_mm256_extracti128_si256(p, 1)));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + c0), lo);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + c0 + 8), hi);
  }
  for (int64_t c = c0; c < C; ++c) {
    int32_t s = 0;
    for (int64_t t = 0; t < T; ++t) s += static_cast<int32_t>(ptr[t][c] ^ flip) * w16[t * Cp + c];
    acc[c] = s;
  }
}

// The interleaved rows of output row oy: q[(qy * cols + j) * Cp * 4 + 4 * c + u] is the byte of
// input row oy * sh - ph + (4 * qy + u) * dh, column j - pw, channel c (the zero point outside
// the image or beyond kh).
template <bool Signed>
PYC_TARGET_AVX512VNNI void dw_interleave_vnni(const Int8ConvGeom& g, const uint8_t* img,
                                              const uint8_t* zprow, int64_t oy, uint8_t* q) {
  const int64_t C = g.C, Cp = dw_cp(g), cols = dw_cols(g), KQ = dw_kq(g);
  const __m512i fv = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t qy = 0; qy < KQ; ++qy) {
    const uint8_t* rows[4];
    for (int u = 0; u < 4; ++u) {
      const int64_t ky = 4 * qy + u, iy = oy * g.sh - g.ph + ky * g.dh;
      rows[u] = ky < g.kh && iy >= 0 && iy < g.H ? img + iy * g.W * C : nullptr;
    }
    for (int64_t j = 0; j < cols; ++j) {
      const int64_t ix = j - g.pw;
      const bool xok = ix >= 0 && ix < g.W;
      const uint8_t* src[4];
      for (int u = 0; u < 4; ++u) src[u] = xok && rows[u] ? rows[u] + ix * C : zprow;
      uint8_t* dst = q + (qy * cols + j) * Cp * 4;
      for (int64_t c0 = 0; c0 < C; c0 += 64) {
        const __mmask64 k = C - c0 >= 64 ? ~__mmask64(0) : (~uint64_t(0)) >> (64 - (C - c0));
        __m512i a0 = _mm512_maskz_loadu_epi8(k, src[0] + c0), a1 = _mm512_maskz_loadu_epi8(k, src[1] + c0);
        __m512i a2 = _mm512_maskz_loadu_epi8(k, src[2] + c0), a3 = _mm512_maskz_loadu_epi8(k, src[3] + c0);
        if (Signed) {
          a0 = _mm512_xor_si512(a0, fv);
          a1 = _mm512_xor_si512(a1, fv);
          a2 = _mm512_xor_si512(a2, fv);
          a3 = _mm512_xor_si512(a3, fv);
        }
        const __m512i l01 = _mm512_unpacklo_epi8(a0, a1), h01 = _mm512_unpackhi_epi8(a0, a1);
        const __m512i l23 = _mm512_unpacklo_epi8(a2, a3), h23 = _mm512_unpackhi_epi8(a2, a3);
        // lane L of r_j: channels 16 L + 4 j .. 16 L + 4 j + 3, 4 bytes each
        const __m512i r0 = _mm512_unpacklo_epi16(l01, l23), r1 = _mm512_unpackhi_epi16(l01, l23);
        const __m512i r2 = _mm512_unpacklo_epi16(h01, h23), r3 = _mm512_unpackhi_epi16(h01, h23);
        const __m512i t0 = _mm512_shuffle_i32x4(r0, r1, 0x44), t1 = _mm512_shuffle_i32x4(r2, r3, 0x44);
        const __m512i t2 = _mm512_shuffle_i32x4(r0, r1, 0xEE), t3 = _mm512_shuffle_i32x4(r2, r3, 0xEE);
        uint8_t* d = dst + 4 * c0;
        _mm512_storeu_si512(d, _mm512_shuffle_i32x4(t0, t1, 0x88));
        _mm512_storeu_si512(d + 64, _mm512_shuffle_i32x4(t0, t1, 0xDD));
        _mm512_storeu_si512(d + 128, _mm512_shuffle_i32x4(t2, t3, 0x88));
        _mm512_storeu_si512(d + 192, _mm512_shuffle_i32x4(t2, t3, 0xDD));
      }
    }
  }
}

// acc[ox * Cp + c] = sum over (qy, kx) of the interleaved bytes times the weights, 16 channels per
// vpdpbusd; the 16-channel block is the outer loop so its weights stay in L1 across the row.
PYC_TARGET_AVX512VNNI void dw_row_vnni(const Int8ConvGeom& g, const int8_t* wv, const uint8_t* q,
                                       int32_t* acc) {
  const int64_t Cp = dw_cp(g), cols = dw_cols(g), KQ = dw_kq(g), blocks = (g.C + 15) / 16;
  const int64_t nw = KQ * g.kw, step = g.sw * Cp * 4, kstep = g.dw * Cp * 4, qstep = cols * Cp * 4;
  for (int64_t cb = 0; cb < blocks; ++cb) {
    const int8_t* w = wv + cb * 64;
    const uint8_t* qb = q + cb * 64;
    int64_t ox = 0;
    // two output pixels at a time: independent accumulator chains
    for (; ox + 2 <= g.Wo; ox += 2) {
      __m512i s0 = _mm512_setzero_si512(), s1 = s0;
      const uint8_t* p = qb + ox * step;
      for (int64_t qy = 0; qy < KQ; ++qy)
        for (int64_t kx = 0; kx < g.kw; ++kx) {
          const __m512i wk = _mm512_loadu_si512(w + (qy * g.kw + kx) * Cp * 4);
          const uint8_t* pk = p + qy * qstep + kx * kstep;
          s0 = _mm512_dpbusd_epi32(s0, _mm512_loadu_si512(pk), wk);
          s1 = _mm512_dpbusd_epi32(s1, _mm512_loadu_si512(pk + step), wk);
        }
      _mm512_storeu_si512(acc + ox * Cp + cb * 16, s0);
      _mm512_storeu_si512(acc + (ox + 1) * Cp + cb * 16, s1);
    }
    for (; ox < g.Wo; ++ox) {
      __m512i s0 = _mm512_setzero_si512();
      const uint8_t* p = qb + ox * step;
      for (int64_t qy = 0; qy < KQ; ++qy)
        for (int64_t kx = 0; kx < g.kw; ++kx)
          s0 = _mm512_dpbusd_epi32(s0, _mm512_loadu_si512(p + qy * qstep + kx * kstep),
                                   _mm512_loadu_si512(w + (qy * g.kw + kx) * Cp * 4));
      _mm512_storeu_si512(acc + ox * Cp + cb * 16, s0);
    }
    (void)nw;
  }
}
#endif

int64_t dw_workspace_bytes(const Int8ConvGeom& g) {
  const int64_t Cp = dw_cp(g);
  return 4 * g.Wo * Cp + Cp + 8 * g.kh * g.kw + 4 * Cp * dw_kq(g) * dw_cols(g) + 256;
}

void run_depthwise_tasks(const Int8ConvPlan& plan, const Int8ConvGeom& g, const int8_t* packed,
                         const Int8ConvArgs& a, int64_t t0, int64_t t1, void* workspace,
                         int level) {
  (void)plan;
  const int64_t C = g.C, Cp = dw_cp(g), T = g.kh * g.kw;
  const int32_t* wsum = reinterpret_cast<const int32_t*>(packed + dw_wsum_offset(g));
  const int16_t* w16 = reinterpret_cast<const int16_t*>(packed + dw_w16_offset(g));
  int32_t* acc = static_cast<int32_t*>(workspace);                     // [Wo][Cp]
  uint8_t* zprow = reinterpret_cast<uint8_t*>(acc + g.Wo * Cp);        // Cp bytes
  const uint8_t** ptr = reinterpret_cast<const uint8_t**>(zprow + Cp);  // T pointers
  uint8_t* qbuf = reinterpret_cast<uint8_t*>(
      (reinterpret_cast<uintptr_t>(ptr + T) + 63) & ~uintptr_t(63));  // interleaved rows
  const uint8_t flip = a.x_signed ? 0x80 : 0;
#if PYC_HAVE_X86_SIMD
  const bool vnni = level >= 2 && cpu_features().avx512vnni;
#endif
  const EpilogueFn ep = pick_epilogue(level, a);
  int64_t zp_image = -1;
  for (int64_t t = t0; t < t1; ++t) {  // task: output row (n, oy)
    const int64_t n = t / g.Ho, oy = t - n * g.Ho;
    const uint8_t* img = a.x + n * g.H * g.W * C;
    if (n != zp_image) {
      std::memset(zprow, static_cast<uint8_t>(a.x_zp[n]), static_cast<size_t>(Cp));
      zp_image = n;
    }
#if PYC_HAVE_X86_SIMD
    if (vnni) {
      if (flip)
        dw_interleave_vnni<true>(g, img, zprow, oy, qbuf);
      else
        dw_interleave_vnni<false>(g, img, zprow, oy, qbuf);
      dw_row_vnni(g, packed, qbuf, acc);
    } else
#endif
    {
      // output columns whose taps all lie inside the image columns: pointers advance by sw * C
      const int64_t ox_in0 = std::min(g.Wo, (g.pw + g.sw - 1) / g.sw);
      const int64_t span = (g.kw - 1) * g.dw;
      const int64_t last = g.W - 1 - span + g.pw;
      const int64_t ox_in1 = std::max(ox_in0, std::min(g.Wo, last >= 0 ? last / g.sw + 1 : 0));
      for (int64_t ox = 0; ox < g.Wo; ++ox) {
        if (ox > ox_in0 && ox < ox_in1) {
          for (int64_t tp = 0; tp < T; ++tp)
            if (ptr[tp] != zprow) ptr[tp] += g.sw * C;
        } else {
          dw_tap_pointers(g, img, zprow, oy, ox, ptr);
        }
        int32_t* ar = acc + ox * Cp;
#if PYC_HAVE_X86_SIMD
        if (level >= 1)
          dw_pixel_avx2(C, T, w16, Cp, ptr, flip, ar);
        else
#endif
          dw_pixel_scalar(C, T, w16, Cp, ptr, flip, ar);
      }
    }
    const EpTile tile{acc, Cp, (n * g.Ho + oy) * g.Wo, g.Wo, 0, C, wsum, 0};
    ep(tile, g.Ho * g.Wo, C, a);
  }
}

}  // namespace

// ---------------------------------------------------------------- packing

int64_t int8_conv_packed_bytes(const Int8ConvGeom& g) {
  if (g.depthwise()) return dw_w16_offset(g) + 2 * g.kh * g.kw * dw_cp(g);
  return g.groups * int8_packed_bytes(g.cout_g(), g.k());
}

int64_t int8_conv_pack_units(const Int8ConvGeom& g) {
  return g.depthwise() ? dw_cp(g) / 64 : g.groups;
}

void int8_conv_pack_weight(const int8_t* w, const Int8ConvGeom& g, int8_t* packed, int64_t u0,
                           int64_t u1) {
  const int64_t taps = g.kh * g.kw;
  if (g.depthwise()) {
    // unit: a block of 64 channels
    const int64_t Cp = dw_cp(g), KQ = dw_kq(g);
    int32_t* wsum = reinterpret_cast<int32_t*>(packed + dw_wsum_offset(g));
    int16_t* w16 = reinterpret_cast<int16_t*>(packed + dw_w16_offset(g));
    for (int64_t b = u0; b < u1; ++b) {
      for (int64_t qy = 0; qy < KQ; ++qy)
        for (int64_t kx = 0; kx < g.kw; ++kx)
          for (int64_t c = 64 * b; c < 64 * (b + 1); ++c)
            for (int64_t u = 0; u < 4; ++u) {
              const int64_t ky = 4 * qy + u;
              packed[((qy * g.kw + kx) * Cp + c) * 4 + u] =
                  c < g.C && ky < g.kh ? w[c * taps + ky * g.kw + kx] : 0;
            }
      for (int64_t c = 64 * b; c < 64 * (b + 1); ++c) {
        int32_t sum = 0;
        for (int64_t t = 0; t < taps; ++t) {
          const int8_t v = c < g.C ? w[c * taps + t] : 0;
          w16[t * Cp + c] = v;
          sum += v;
        }
        wsum[c] = sum;
      }
    }
    return;
  }
  const int64_t Cg = g.cin_g(), Coutg = g.cout_g(), K = g.k();
  const int64_t block_bytes = int8_packed_bytes(Coutg, K);
  std::vector<int8_t> rows(static_cast<size_t>(Coutg * K));
  for (int64_t grp = u0; grp < u1; ++grp) {
    // [Cout_g, K] in (ky, kx, c) order
    for (int64_t co = 0; co < Coutg; ++co) {
      const int8_t* src = w + (grp * Coutg + co) * Cg * taps;
      int8_t* dst = rows.data() + co * K;
      for (int64_t c = 0; c < Cg; ++c)
        for (int64_t t = 0; t < taps; ++t) dst[t * Cg + c] = src[c * taps + t];
    }
    int8_pack_b(rows.data(), K, Coutg, K, packed + grp * block_bytes, 0,
                int8_round_n(Coutg) / kInt8PanelCols);
  }
}

// ---------------------------------------------------------------- planning and running

Int8ConvPlan int8_conv_plan(int isa, const Int8ConvGeom& g, const int8_t* packed, int threads) {
  Int8ConvPlan p;
  threads = std::max(1, threads);
  const int64_t M = g.N * g.Ho * g.Wo;
  if (g.depthwise()) {
    p.depthwise = true;
    p.path = level_of(isa);
    p.rows = g.Wo;
    p.blocks = g.N * g.Ho;
    p.chunks = 1;
    p.tasks = p.blocks;
    p.workspace_bytes = dw_workspace_bytes(g);
    return p;
  }
  const int64_t Coutg = g.cout_g(), K = g.k(), Npg = int8_round_n(Coutg);
  const int64_t panels = Npg / kInt8PanelCols, block_bytes = int8_packed_bytes(Coutg, K);
  bool narrow = true;
  for (int64_t grp = 0; grp < g.groups && narrow; ++grp)
    narrow = int8_packed_narrow(packed + grp * block_bytes, Coutg, K);
  p.path = int8_gemm_path(isa, false, narrow);
  const int64_t rb = int8_a_row_bytes(p.path, K);
  // a block of gathered rows (and its int32 results) stays within L2 while the panels stream.
  // AMX: blocks of up to ~768 KB of rows, so that a large weight (a 3x3 conv of many channels:
  // megabytes) streams from memory once for many rows instead of once per 16 rows, and the rows
  // come in whole 32-row tile pairs.
  const bool amx = p.path == kInt8PathAmx;
  int64_t rows_max = (amx ? int64_t(768) << 10 : int64_t(128) << 10) / rb;
  rows_max = std::max<int64_t>(amx ? 32 : 16, std::min<int64_t>(amx ? 512 : 256, rows_max / 16 * 16));
  const int64_t blocks = std::max<int64_t>(1, (M + rows_max - 1) / rows_max);
  p.rows = std::max<int64_t>(1, round_up((M + blocks - 1) / blocks, 16));
  p.rows = std::min(p.rows, rows_max);
  p.blocks = std::max<int64_t>(1, (M + p.rows - 1) / p.rows);
  // enough tasks for the threads: split the panels when there are few pixel blocks
  // (one thread needs no split: each task then covers all the panels of its rows)
  const int64_t want = threads == 1 ? 1 : 4 * threads, have = p.blocks * g.groups;
  p.chunks = have >= want ? 1 : std::min<int64_t>(panels, (want + have - 1) / have);
  p.chunk_panels = (panels + p.chunks - 1) / p.chunks;
  // AMX works on pairs of panels
  if (amx && p.chunk_panels % 2 == 1 && p.chunk_panels < panels) ++p.chunk_panels;
  p.chunks = (panels + p.chunk_panels - 1) / p.chunk_panels;
  p.tasks = g.groups * p.blocks * p.chunks;
  p.workspace_bytes = round_up(p.rows * rb, 64) + 64;
  // the byte paths read exactly K bytes of each row when K is a multiple of 4 (AMX: of 64)
  const int64_t Cg = g.cin_g();
  p.direct_rows = g.kh == 1 && g.kw == 1 && g.sh == 1 && g.sw == 1 && g.ph == 0 && g.pw == 0 &&
                  ((p.path == 2 && Cg % 4 == 0) || (p.path == kInt8PathAmx && Cg % 64 == 0));
  return p;
}

void int8_conv_run(const Int8ConvPlan& plan, const Int8ConvGeom& g, const int8_t* packed,
                   const Int8ConvArgs& args, int64_t t0, int64_t t1, void* workspace) {
  if (t1 <= t0) return;
  // the ISA level of the code around the GEMM (gather, epilogue): that of its path
  const int level = plan.depthwise ? plan.path
                                   : (plan.path == 0 ? 0 : (plan.path == 2 || plan.path == kInt8PathAmx ? 2 : 1));
  if (plan.depthwise)
    run_depthwise_tasks(plan, g, packed, args, t0, t1, workspace, level);
  else
    run_gemm_tasks(plan, g, packed, args, t0, t1, workspace, level);
}

// ---------------------------------------------------------------- float input quantization

namespace {

// Dynamic quantization divides, x / s; the vector code multiplies by 1 / s and divides only
// where the rounding could differ. |x * (1 / s) - x / s| stays within 3 ulps, i.e. below 2^-12 for
// |x / s| < 1024, so both round to the same integer unless the product is within kNearHalf of
// being halfway; beyond kRoundRange the result is clamped to 0 or 255 either way.
constexpr float kNearHalf = 0.5f - 1.f / 1024.f;
constexpr float kRoundRange = 1024.f;

inline uint8_t quantize_u8_scalar(float v, float s, bool divide, float zf) {
  float r = std::nearbyint(divide ? v / s : v * s) + zf;
  r = r > 0.f ? r : 0.f;  // NaN -> 0, as the vector code
  r = r < 255.f ? r : 255.f;
  return static_cast<uint8_t>(r);
}

void minmax_scalar(const void* x, DType dt, int64_t b, int64_t e, float* lo, float* hi,
                   bool* finite) {
  float l = *lo, h = *hi;
  bool ok = *finite;
  for (int64_t i = b; i < e; ++i) {
    const float v = load_as_float(x, i, dt);
    if (!(std::fabs(v) <= 3.402823466e+38f)) ok = false;
    l = v < l ? v : l;
    h = v > h ? v : h;
  }
  *lo = l;
  *hi = h;
  *finite = ok;
}

#if PYC_HAVE_X86_SIMD
PYC_TARGET_AVX512 inline __m512 load16_as_float(const void* x, DType dt, int64_t i, __mmask16 k) {
  switch (dt) {
    case DType::F16:
      return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, static_cast<const uint16_t*>(x) + i));
    case DType::BF16:
      return _mm512_castsi512_ps(_mm512_slli_epi32(
          _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, static_cast<const uint16_t*>(x) + i)), 16));
    case DType::F32:
    default:
      return _mm512_maskz_loadu_ps(k, static_cast<const float*>(x) + i);
  }
}

PYC_TARGET_AVX512 void minmax_avx512(const void* x, DType dt, int64_t b, int64_t e, float* lo,
                                     float* hi, bool* finite) {
  __m512 l = _mm512_set1_ps(*lo), h = _mm512_set1_ps(*hi);
  const __m512i absmask = _mm512_set1_epi32(0x7fffffff), infbits = _mm512_set1_epi32(0x7f800000);
  __mmask16 bad = 0;
  for (int64_t i = b; i < e; i += 16) {
    const __mmask16 k = e - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (e - i)) - 1);
    const __m512 v = load16_as_float(x, dt, i, k);
    l = _mm512_mask_min_ps(l, k, l, v);
    h = _mm512_mask_max_ps(h, k, h, v);
    bad |= _mm512_mask_cmpge_epu32_mask(k, _mm512_and_si512(_mm512_castps_si512(v), absmask), infbits);
  }
  alignas(64) float tl[16], th[16];
  _mm512_store_ps(tl, l);
  _mm512_store_ps(th, h);
  float lv = tl[0], hv = th[0];
  for (int j = 1; j < 16; ++j) {
    lv = tl[j] < lv ? tl[j] : lv;
    hv = th[j] > hv ? th[j] : hv;
  }
  *lo = lv;
  *hi = hv;
  if (bad) *finite = false;
}

PYC_TARGET_AVX512 void quantize_avx512(const void* x, DType dt, int64_t b, int64_t e, float s,
                                       bool divide, int32_t zp, uint8_t* q) {
  constexpr int kNear = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const __m512 sv = _mm512_set1_ps(s), zf = _mm512_set1_ps(static_cast<float>(zp));
  const __m512 mv = _mm512_set1_ps(divide ? 1.f / s : s);
  const __m512 zero = _mm512_setzero_ps(), top = _mm512_set1_ps(255.f);
  const __m512 near_half = _mm512_set1_ps(kNearHalf), in_range = _mm512_set1_ps(kRoundRange);
  for (int64_t i = b; i < e; i += 16) {
    const __mmask16 k = e - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (e - i)) - 1);
    const __m512 v = load16_as_float(x, dt, i, k);
    const __m512 t = _mm512_mul_ps(v, mv);
    __m512 r = _mm512_roundscale_ps(t, kNear);
    if (divide) {
      // x / s rounds to the same integer as x * (1 / s) unless the product lies within a few
      // ulps of a half-integer (and inside the range that is not clamped anyway): divide there
      const __mmask16 redo =
          _mm512_mask_cmp_ps_mask(k, _mm512_abs_ps(_mm512_sub_ps(t, r)), near_half, _CMP_GT_OQ) &
          _mm512_cmp_ps_mask(_mm512_abs_ps(t), in_range, _CMP_LT_OQ);
      if (redo) r = _mm512_mask_roundscale_ps(r, redo, _mm512_div_ps(v, sv), kNear);
    }
    r = _mm512_add_ps(r, zf);
    r = _mm512_min_ps(_mm512_max_ps(r, zero), top);
    _mm_mask_storeu_epi8(q + i, k, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(r)));
  }
}

PYC_TARGET_AVX2 inline __m256 load8_as_float(const void* x, DType dt, int64_t i) {
  switch (dt) {
    case DType::F16:
      return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + i)));
    case DType::BF16:
      return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(
          reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + i))), 16));
    case DType::F32:
    default:
      return _mm256_loadu_ps(static_cast<const float*>(x) + i);
  }
}

PYC_TARGET_AVX2 void minmax_avx2(const void* x, DType dt, int64_t b, int64_t e, float* lo,
                                 float* hi, bool* finite) {
  __m256 l = _mm256_set1_ps(*lo), h = _mm256_set1_ps(*hi);
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 fmax = _mm256_set1_ps(3.402823466e+38f);
  __m256 bad = _mm256_setzero_ps();
  int64_t i = b;
  for (; i + 8 <= e; i += 8) {
    const __m256 v = load8_as_float(x, dt, i);
    l = _mm256_min_ps(l, v);
    h = _mm256_max_ps(h, v);
    // !(|v| <= FLT_MAX): true for inf and NaN
    bad = _mm256_or_ps(bad, _mm256_cmp_ps(_mm256_and_ps(v, absmask), fmax, _CMP_NLE_UQ));
  }
  alignas(32) float tl[8], th[8];
  _mm256_store_ps(tl, l);
  _mm256_store_ps(th, h);
  float lv = tl[0], hv = th[0];
  for (int j = 1; j < 8; ++j) {
    lv = tl[j] < lv ? tl[j] : lv;
    hv = th[j] > hv ? th[j] : hv;
  }
  *lo = lv;
  *hi = hv;
  if (_mm256_movemask_ps(bad)) *finite = false;
  if (i < e) minmax_scalar(x, dt, i, e, lo, hi, finite);
}

PYC_TARGET_AVX2 void quantize_avx2(const void* x, DType dt, int64_t b, int64_t e, float s,
                                   bool divide, int32_t zp, uint8_t* q) {
  constexpr int kNear = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const __m256 sv = _mm256_set1_ps(s), zf = _mm256_set1_ps(static_cast<float>(zp));
  const __m256 mv = _mm256_set1_ps(divide ? 1.f / s : s);
  const __m256 zero = _mm256_setzero_ps(), top = _mm256_set1_ps(255.f);
  const __m256 near_half = _mm256_set1_ps(kNearHalf), in_range = _mm256_set1_ps(kRoundRange);
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  int64_t i = b;
  for (; i + 8 <= e; i += 8) {
    const __m256 v = load8_as_float(x, dt, i);
    const __m256 t = _mm256_mul_ps(v, mv);
    __m256 r = _mm256_round_ps(t, kNear);
    if (divide) {  // as in quantize_avx512
      const __m256 redo = _mm256_and_ps(
          _mm256_cmp_ps(_mm256_and_ps(_mm256_sub_ps(t, r), absmask), near_half, _CMP_GT_OQ),
          _mm256_cmp_ps(_mm256_and_ps(t, absmask), in_range, _CMP_LT_OQ));
      if (_mm256_movemask_ps(redo))
        r = _mm256_blendv_ps(r, _mm256_round_ps(_mm256_div_ps(v, sv), kNear), redo);
    }
    r = _mm256_add_ps(r, zf);
    // NaN lanes become 0 (max returns its second operand), as in the scalar code
    r = _mm256_min_ps(_mm256_max_ps(r, zero), top);
    const __m256i qi = _mm256_cvtps_epi32(r);
    const __m128i p16 = _mm_packus_epi32(_mm256_castsi256_si128(qi), _mm256_extracti128_si256(qi, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + i), _mm_packus_epi16(p16, p16));
  }
  const float zfs = static_cast<float>(zp);
  for (; i < e; ++i) q[i] = quantize_u8_scalar(load_as_float(x, i, dt), s, divide, zfs);
}
#endif

}  // namespace

void int8_conv_minmax(int isa, const void* x, DType dt, int64_t b, int64_t e, float* lo, float* hi,
                      bool* finite) {
  if (e <= b) return;
#if PYC_HAVE_X86_SIMD
  if (isa >= 2) return minmax_avx512(x, dt, b, e, lo, hi, finite);
  if (isa == 1) return minmax_avx2(x, dt, b, e, lo, hi, finite);
#endif
  (void)isa;
  minmax_scalar(x, dt, b, e, lo, hi, finite);
}

void int8_conv_dynamic_params(float min_x, float max_x, float* scale, int32_t* zp) {
  const float lo = std::min(0.f, min_x), hi = std::max(0.f, max_x);
  float s = (hi - lo) / 255.f;
  // scale 1 when the range is empty (or so small that the scale underflows to 0)
  if (hi == lo || s == 0.f) s = 1.f;
  float z = std::nearbyint(-lo / s);
  z = z < 0.f ? 0.f : (z > 255.f ? 255.f : z);
  *scale = s;
  *zp = static_cast<int32_t>(z);
}

void int8_conv_quantize_u8(int isa, const void* x, DType dt, int64_t b, int64_t e, float s,
                           bool divide, int32_t zp, uint8_t* q) {
  if (e <= b) return;
#if PYC_HAVE_X86_SIMD
  if (isa >= 2) return quantize_avx512(x, dt, b, e, s, divide, zp, q);
  if (isa == 1) return quantize_avx2(x, dt, b, e, s, divide, zp, q);
#endif
  (void)isa;
  const float zf = static_cast<float>(zp);
  for (int64_t i = b; i < e; ++i) q[i] = quantize_u8_scalar(load_as_float(x, i, dt), s, divide, zf);
}

}  // namespace pyc
