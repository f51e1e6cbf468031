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

// The residual's element i as fp32: (float)(q - zp) * scale (the difference, at most 255 in
// magnitude, converts exactly) or the float value.
inline float residual_scalar(const Int8ConvArgs& a, int64_t i) {
  switch (a.res_kind) {
    case ConvRes::U8:
      return static_cast<float>(static_cast<int32_t>(static_cast<const uint8_t*>(a.res)[i]) - a.res_zp) *
             a.res_scale;
    case ConvRes::S8:
      return static_cast<float>(static_cast<int32_t>(static_cast<const int8_t*>(a.res)[i]) - a.res_zp) *
             a.res_scale;
    case ConvRes::F32: return static_cast<const float*>(a.res)[i];
    case ConvRes::None: break;
  }
  return 0.f;
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
      if (a.res_kind != ConvRes::None) y = y + residual_scalar(a, m * Cout + co);
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
      h = pyc_cvt_f32_bf16_avx512(y);
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

// How the vector epilogues read the residual: none, uint8 bytes, fp32, or int8 bytes with their
// sign bit flipped ((b ^ 0x80) - (zp + 128) = b - zp).
enum class ResV : int { None = 0, Q8 = 1, F32 = 2, S8 = 3 };

// The residual's pointer and constants, in locals like OutAvx512.
struct ResAvx512 {
  const void* res;
  __m512 scale;
  __m512i zp;    // the zero point of the unsigned bytes
  __m128i flip;  // 0x80 bytes for int8, else 0
};

PYC_TARGET_AVX512 inline ResAvx512 res_avx512(const Int8ConvArgs& a) {
  const bool s8 = a.res_kind == ConvRes::S8;
  return ResAvx512{a.res, _mm512_set1_ps(a.res_scale), _mm512_set1_epi32(a.res_zp + (s8 ? 128 : 0)),
                   _mm_set1_epi8(static_cast<char>(s8 ? 0x80 : 0))};
}

// y + the residual's 16 elements at i (lanes of k unless Full): one rounded multiply for a
// quantized residual, then one rounded add (the empty asm statements keep the compiler from
// contracting the multiply into an FMA with the add, or the add with the product before it).
template <ResV R, bool Full>
PYC_TARGET_AVX512 inline __m512 add_residual_avx512(const ResAvx512& rv, int64_t i, __m512 y,
                                                    __mmask16 k) {
  if (R == ResV::None) return y;
  __m512 r;
  if (R == ResV::Q8 || R == ResV::S8) {
    const uint8_t* p = static_cast<const uint8_t*>(rv.res) + i;
    __m128i b = Full ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)) : _mm_maskz_loadu_epi8(k, p);
    if (R == ResV::S8) b = _mm_xor_si128(b, rv.flip);
    r = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(b), rv.zp));
    r = _mm512_mul_ps(r, rv.scale);
  } else {
    const float* p = static_cast<const float*>(rv.res) + i;
    r = Full ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(k, p);
  }
  asm("" : "+v"(y), "+v"(r));
  return _mm512_add_ps(y, r);
}

// One row's 16 columns: acc + comp, dequantized, the residual added, activated and stored at
// out[i].
template <ConvAct A, ConvOut O, bool Full, bool Bias, ResV R, bool Comp>
PYC_TARGET_AVX512 inline void epilogue16_avx512(const OutAvx512& o, const ResAvx512& rv, int64_t i,
                                                const int32_t* src, __m512i comp, __m512 xs,
                                                __m512 ws, __m512 bias, __mmask16 k) {
  __m512i acc = Full ? _mm512_loadu_si512(src) : _mm512_maskz_loadu_epi32(k, src);
  if (Comp) acc = _mm512_add_epi32(acc, comp);
  __m512 y = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc), xs), ws);
  if (Bias) {
    // the product is rounded before the bias is added (the empty asm keeps the compiler from
    // contracting the two into an FMA)
    asm("" : "+v"(y));
    y = _mm512_add_ps(y, bias);
  }
  y = add_residual_avx512<R, Full>(rv, i, y, k);
  store_out_avx512<O, Full>(o, i, act_avx512<A>(y), k);
}

// One row's 16 columns up to the activation: acc + comp, dequantized, the residual added.
template <ConvAct A, bool Bias, ResV R, bool Comp>
PYC_TARGET_AVX512 inline __m512 epilogue16_value_avx512(const ResAvx512& rv, int64_t i,
                                                        const int32_t* src, __m512i comp,
                                                        __m512 xs, __m512 ws, __m512 bias) {
  __m512i acc = _mm512_loadu_si512(src);
  if (Comp) acc = _mm512_add_epi32(acc, comp);
  __m512 y = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc), xs), ws);
  if (Bias) {
    asm("" : "+v"(y));
    y = _mm512_add_ps(y, bias);
  }
  return act_avx512<A>(add_residual_avx512<R, true>(rv, i, y, 0xffff));
}

// round(y * inv) for the integer narrowing of uint8 / int8 output: min(256, t) first (NaN stays
// NaN: min returns its second operand), so that every lane converts to a value <= 256 or to
// 0x80000000 (NaN, below the int32 range); the packing below then saturates exactly as the clamp
// of round(t) + zp to the output range.
// hi: 256, or the bound that also applies ReLU6's upper clamp (see epilogue_pairs_q8_avx512).
PYC_TARGET_AVX512 inline __m512i requant_i32_avx512(__m512 y, __m512 inv, __m512 hi) {
  const __m512 t = _mm512_min_ps(hi, _mm512_mul_ps(y, inv));
  return _mm512_cvt_roundps_epi32(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

// Two rows of 32 columns each (r0: columns 0-15, 16-31 of the first row, r1 of the second) as
// bytes: signed saturation to int16, + zp with int16 saturation (the lanes are <= 256 or
// -32768, so the sum is exact or stays below the output range), saturation to the output's 8
// bits, then the dwords in column order; the first row's 32 bytes go to p0, the second's to p1.
template <ConvOut O, bool Zp>
PYC_TARGET_AVX512 inline void store_pair_q8_avx512(uint8_t* p0, uint8_t* p1, __m512i r00,
                                                   __m512i r01, __m512i r10, __m512i r11,
                                                   __m512i zp16, __m512i perm) {
  __m512i a = _mm512_packs_epi32(r00, r01), b = _mm512_packs_epi32(r10, r11);
  if (Zp) {
    a = _mm512_adds_epi16(a, zp16);
    b = _mm512_adds_epi16(b, zp16);
  }
  const __m512i q = O == ConvOut::U8 ? _mm512_packus_epi16(a, b) : _mm512_packs_epi16(a, b);
  const __m512i v = _mm512_permutexvar_epi32(perm, q);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p0), _mm512_castsi512_si256(v));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p1), _mm512_extracti64x4_epi64(v, 1));
}

// Rows [m, m_end) of 32 whole columns (m_end - m even) for uint8 / int8 output, in pairs; Zp:
// the output zero point is not 0.
template <ConvAct A, ConvOut O, bool Bias, ResV R, bool Comp, bool Zp>
PYC_TARGET_AVX512 void epilogue_pairs_q8_avx512(const OutAvx512& o, const ResAvx512& rv,
                                                int64_t m, int64_t m_end, int64_t co, int64_t Cout,
                                                const int32_t* src, int64_t ldt, __m512i c0,
                                                __m512i c1, __m512 xs, __m512 ws0, __m512 ws1,
                                                __m512 b0, __m512 b1, int32_t zp) {
  const __m512i zp16 = _mm512_set1_epi16(static_cast<int16_t>(zp));
  const __m512i perm = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  uint8_t* const out = static_cast<uint8_t*>(o.out);
  // ReLU6's upper clamp joins the bound of the requantization: the rounded product with
  // inv > 0 is monotonic, so fl(min(y, 6) * inv) = min(fl(y * inv), fl(6 * inv)) for every y
  // (NaN included: both forms give NaN), one instruction fewer per 16 outputs. With uint8
  // output and zero point 0 the lower clamp of ReLU / ReLU6 goes too: y < 0 rounds to an
  // integer <= 0 (-inf and NaN to 0x80000000), which the unsigned saturation of the packing
  // turns into 0 as max(y, 0) would.
  constexpr bool pack_clamps = O == ConvOut::U8 && !Zp && (A == ConvAct::Relu || A == ConvAct::Relu6);
  constexpr ConvAct Av = pack_clamps ? ConvAct::None : (A == ConvAct::Relu6 ? ConvAct::Relu : A);
  float hi_s = 256.f;
  if (A == ConvAct::Relu6) {
    const float six = 6.f * _mm512_cvtss_f32(o.inv);
    hi_s = six < 256.f ? six : 256.f;
  }
  const __m512 hi = _mm512_set1_ps(hi_s);
  for (; m < m_end; m += 2, src += 2 * ldt) {
    const int64_t i0 = m * Cout + co, i1 = i0 + Cout;
    const __m512i r00 = requant_i32_avx512(
        epilogue16_value_avx512<Av, Bias, R, Comp>(rv, i0, src, c0, xs, ws0, b0), o.inv, hi);
    const __m512i r01 = requant_i32_avx512(
        epilogue16_value_avx512<Av, Bias, R, Comp>(rv, i0 + 16, src + 16, c1, xs, ws1, b1), o.inv, hi);
    const __m512i r10 = requant_i32_avx512(
        epilogue16_value_avx512<Av, Bias, R, Comp>(rv, i1, src + ldt, c0, xs, ws0, b0), o.inv, hi);
    const __m512i r11 = requant_i32_avx512(
        epilogue16_value_avx512<Av, Bias, R, Comp>(rv, i1 + 16, src + ldt + 16, c1, xs, ws1, b1), o.inv, hi);
    store_pair_q8_avx512<O, Zp>(out + i0, out + i1, r00, r01, r10, r11, zp16, perm);
  }
}

// Columns in groups of 32 (two vectors per row, both kept with their per-column constants in
// registers while the rows go by); rows in runs of the same image. Quantized output of 32 whole
// columns: rows in pairs, narrowed together by packing (fewer shuffles per byte than the
// narrowing conversion of each vector, and no rounding instruction of its own).
template <ConvAct A, ConvOut O, bool Bias, ResV R, bool Comp>
PYC_TARGET_AVX512 void epilogue_tile_avx512_b(const EpTile& t, int64_t HoWo, int64_t Cout,
                                              const Int8ConvArgs& a) {
  const OutAvx512 o{a.out, _mm512_set1_ps(a.out_inv), _mm512_set1_ps(static_cast<float>(a.out_zp))};
  const ResAvx512 rv = res_avx512(a);
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
        if (O == ConvOut::U8 || O == ConvOut::S8) {
          const int64_t m_end = m + (seg_end - m) / 2 * 2;
          if (a.out_zp != 0)
            epilogue_pairs_q8_avx512<A, O, Bias, R, Comp, true>(o, rv, m, m_end, co, Cout, src, ldt, c0, c1,
                                                          xs, ws0, ws1, b0, b1, a.out_zp);
          else
            epilogue_pairs_q8_avx512<A, O, Bias, R, Comp, false>(o, rv, m, m_end, co, Cout, src, ldt, c0, c1,
                                                           xs, ws0, ws1, b0, b1, 0);
          src += (m_end - m) * ldt;
          m = m_end;
        }
        for (; m < seg_end; ++m, src += ldt) {
          epilogue16_avx512<A, O, true, Bias, R, Comp>(o, rv, m * Cout + co, src, c0, xs, ws0, b0, k0);
          epilogue16_avx512<A, O, true, Bias, R, Comp>(o, rv, m * Cout + co + 16, src + 16, c1, xs, ws1, b1, k1);
        }
      } else if (w == 16) {
        for (; m < seg_end; ++m, src += ldt)
          epilogue16_avx512<A, O, true, Bias, R, Comp>(o, rv, m * Cout + co, src, c0, xs, ws0, b0, k0);
      } else if (w > 16) {
        for (; m < seg_end; ++m, src += ldt) {
          epilogue16_avx512<A, O, true, Bias, R, Comp>(o, rv, m * Cout + co, src, c0, xs, ws0, b0, k0);
          epilogue16_avx512<A, O, false, Bias, R, Comp>(o, rv, m * Cout + co + 16, src + 16, c1, xs, ws1, b1, k1);
        }
      } else {
        for (; m < seg_end; ++m, src += ldt)
          epilogue16_avx512<A, O, false, Bias, R, Comp>(o, rv, m * Cout + co, src, c0, xs, ws0, b0, k0);
      }
      ++n;
    }
  }
}

template <ConvAct A, ConvOut O, ResV R>
PYC_TARGET_AVX512 void epilogue_tile_avx512(const EpTile& t, int64_t HoWo, int64_t Cout,
                                            const Int8ConvArgs& a) {
  // without column sums the int32 sums need no correction (none, or it is in the sums already)
  if (t.colsum) {
    if (a.bias)
      epilogue_tile_avx512_b<A, O, true, R, true>(t, HoWo, Cout, a);
    else
      epilogue_tile_avx512_b<A, O, false, R, true>(t, HoWo, Cout, a);
  } else {
    if (a.bias)
      epilogue_tile_avx512_b<A, O, true, R, false>(t, HoWo, Cout, a);
    else
      epilogue_tile_avx512_b<A, O, false, R, false>(t, HoWo, Cout, a);
  }
}

using EpilogueFn = void (*)(const EpTile&, int64_t, int64_t, const Int8ConvArgs&);

// The vector form of a residual kind.
inline ResV res_vec(ConvRes r) {
  switch (r) {
    case ConvRes::None: return ResV::None;
    case ConvRes::U8: return ResV::Q8;
    case ConvRes::S8: return ResV::S8;
    case ConvRes::F32: return ResV::F32;
  }
  return ResV::None;
}

// The epilogue of one ISA for an op's residual, activation and output kinds: Ep::get<A, O, R>()
// returns that ISA's epilogue_tile function (EpAvx512, EpAvx2 below).
template <class Ep, ConvAct A, ResV R>
EpilogueFn pick_out(ConvOut o) {
  switch (o) {
    case ConvOut::F32: return Ep::template get<A, ConvOut::F32, R>();
    case ConvOut::F16: return Ep::template get<A, ConvOut::F16, R>();
    case ConvOut::BF16: return Ep::template get<A, ConvOut::BF16, R>();
    case ConvOut::U8: return Ep::template get<A, ConvOut::U8, R>();
    case ConvOut::S8: return Ep::template get<A, ConvOut::S8, R>();
  }
  return Ep::template get<A, ConvOut::F32, R>();
}

template <class Ep, ResV R>
EpilogueFn pick_act(ConvAct act, ConvOut o) {
  switch (act) {
    case ConvAct::None: return pick_out<Ep, ConvAct::None, R>(o);
    case ConvAct::Relu: return pick_out<Ep, ConvAct::Relu, R>(o);
    case ConvAct::Relu6: return pick_out<Ep, ConvAct::Relu6, R>(o);
    case ConvAct::Silu: return pick_out<Ep, ConvAct::Silu, R>(o);
    case ConvAct::Hardswish: return pick_out<Ep, ConvAct::Hardswish, R>(o);
  }
  return pick_out<Ep, ConvAct::None, R>(o);
}

template <class Ep>
EpilogueFn pick_isa(const Int8ConvArgs& a) {
  switch (res_vec(a.res_kind)) {
    case ResV::Q8: return pick_act<Ep, ResV::Q8>(a.act, a.out_kind);
    case ResV::S8: return pick_act<Ep, ResV::S8>(a.act, a.out_kind);
    case ResV::F32: return pick_act<Ep, ResV::F32>(a.act, a.out_kind);
    case ResV::None: break;
  }
  return pick_act<Ep, ResV::None>(a.act, a.out_kind);
}

struct EpAvx512 {
  template <ConvAct A, ConvOut O, ResV R>
  static EpilogueFn get() { return epilogue_tile_avx512<A, O, R>; }
};

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

// y + the residual's 8 elements at i, rounded as add_residual_avx512 rounds them.
template <ResV R>
PYC_TARGET_AVX2 inline __m256 add_residual_avx2(const Int8ConvArgs& a, int64_t i, __m256 y,
                                                __m256i rzp, __m128i flip, __m256 rs) {
  if (R == ResV::None) return y;
  __m256 r;
  if (R == ResV::Q8 || R == ResV::S8) {
    const uint8_t* p = static_cast<const uint8_t*>(a.res) + i;
    const __m128i b = _mm_xor_si128(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)), flip);
    r = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_cvtepu8_epi32(b), rzp));
    r = _mm256_mul_ps(r, rs);
  } else {
    r = _mm256_loadu_ps(static_cast<const float*>(a.res) + i);
  }
  asm("" : "+x"(y), "+x"(r));
  return _mm256_add_ps(y, r);
}

// Whole groups of 8 columns in registers; the remaining columns go through the scalar code
// (kept out of line: inside this function the compiler could fuse its multiply-add).
template <ConvAct A, ConvOut O, ResV R>
PYC_TARGET_AVX2 void epilogue_tile_avx2(const EpTile& t, int64_t HoWo, int64_t Cout,
                                        const Int8ConvArgs& a) {
  const int64_t nv = t.nc / 8 * 8;
  const bool rs8 = a.res_kind == ConvRes::S8;
  const __m256i rzp = _mm256_set1_epi32(a.res_zp + (rs8 ? 128 : 0));
  const __m128i rflip = _mm_set1_epi8(static_cast<char>(rs8 ? 0x80 : 0));
  const __m256 rscale = _mm256_set1_ps(a.res_scale);
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
      if (a.bias) {
        asm("" : "+x"(y));
        y = _mm256_add_ps(y, bias);
      }
      y = add_residual_avx2<R>(a, m * Cout + co, y, rzp, rflip, rscale);
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

struct EpAvx2 {
  template <ConvAct A, ConvOut O, ResV R>
  static EpilogueFn get() { return epilogue_tile_avx2<A, O, R>; }
};

#endif  // PYC_HAVE_X86_SIMD

// The epilogue for a level (picked once per op call).
EpilogueFn pick_epilogue(int level, const Int8ConvArgs& a) {
#if PYC_HAVE_X86_SIMD
  if (level >= 2) return pick_isa<EpAvx512>(a);
  if (level == 1) return pick_isa<EpAvx2>(a);
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

// AMX accumulators that start from the zero-point correction -zp * sum_k w of a group's columns
// (one int32 add per output fewer in the epilogue), recomputed only when the group or the byte
// zero point changes.
class ZpStart {
 public:
  explicit ZpStart(int64_t columns) : v_(static_cast<size_t>(columns)) {}
  const int32_t* get(int64_t grp, int32_t zp, const int32_t* colsum) {
    if (grp != grp_ || zp != zp_) {
      const uint32_t corr = 0u - static_cast<uint32_t>(zp);
      for (size_t j = 0; j < v_.size(); ++j)
        v_[j] = static_cast<int32_t>(corr * static_cast<uint32_t>(colsum[j]));
      grp_ = grp;
      zp_ = zp;
    }
    return v_.data();
  }

 private:
  std::vector<int32_t> v_;
  int64_t grp_ = -1;
  int32_t zp_ = 0;
};

void finish_tile(void* ctx, const int32_t* tile, int64_t ldt, int64_t m0, int64_t mr, int64_t n0,
                 int64_t nc) {
  const TileCtx& c = *static_cast<const TileCtx*>(ctx);
  const EpTile t{tile, ldt, c.m_base + m0, mr, c.co_base + n0, nc,
                 c.colsum ? c.colsum + n0 : nullptr, 128};
  c.ep(t, c.g->Ho * c.g->Wo, c.g->Cout, *c.a);
}

// The AMX driver's block callback: its sums are x * w with the bytes as they are (no + 128
// compensation), so the correction is -zp * sum_k w (colsum), unless the sums started from it
// (colsum nullptr).
void finish_block(void* ctx, const int32_t* tile, int64_t ldt, int64_t m0, int64_t mr, int64_t n0,
                  int64_t nc) {
  const TileCtx& c = *static_cast<const TileCtx*>(ctx);
  const EpTile t{tile, ldt, c.m_base + m0, mr, c.co_base + n0, nc, c.colsum ? c.colsum + n0 : nullptr, 0};
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
  // AMX: the accumulators of a task whose rows all have the same byte zero point start from the
  // correction (else it is added in the epilogue)
  ZpStart amx_init(path == kInt8PathAmx ? Npg : 0);
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t ch = t % plan.chunks, blk = (t / plan.chunks) % plan.blocks;
    const int64_t grp = t / (plan.chunks * plan.blocks);
    const int64_t m0 = blk * plan.rows, mr = std::min(plan.rows, M - m0);
    if (mr <= 0) continue;
    const uint8_t* arows = ap;
    int64_t lda = 0;
    // AMX tiles read each row in whole 64-byte steps: when K is not a multiple of 64, the last
    // step reads past the row's K bytes into the next row (those bytes meet the zero-padded
    // weights), which must not run past the end of x: the rows whose reads would are gathered
    const int64_t amx_rows = path == kInt8PathAmx ? mr / 16 * 16 : 0;
    const bool in_place =
        direct && !(amx_rows > 0 && K % 64 != 0 &&
                    (m0 + amx_rows - 1) * g.C + grp * g.cin_g() + round_up(K, 64) > M * g.C);
    if (in_place) {
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
      const int64_t HoWo = g.Ho * g.Wo, n_first = m0 / HoWo, n_last = (m0 + mr - 1) / HoWo;
      const int32_t zp = byte_zero_point(a, n_first);
      bool uniform = true;
      for (int64_t n = n_first + 1; n <= n_last && uniform; ++n) uniform = byte_zero_point(a, n) == zp;
      const int32_t* init = nullptr;
      if (uniform) {
        init = amx_init.get(grp, zp, ctx.colsum);
        ctx.colsum = nullptr;
      }
      int8_gemm_amx_u8(tiles, arows, lda > 0 ? lda : rb, pk, mr, Coutg, K, p0, p1, finish_block,
                       &ctx, init);
      continue;
    }
#endif
    Int8Epilogue ep;
    ep.tile_fn = finish_tile;
    ep.tile_ctx = &ctx;
    int8_gemm_packed(path, arows, pk, mr, Coutg, K, p0, p1, ep, nullptr, lda);
  }
}

// The padded form (Int8ConvPlan::padded): the block callback maps the rows of a block of the
// pad_w-wide output grid to output pixels and drops the rows past each output row's end.
struct GridCtx {
  TileCtx tile;
  int64_t pad_w;
  int64_t grid_base;  // grid row of the block's first row
  int64_t grid_rows;  // grid rows of the image
  int64_t out_base;   // output pixel of the image's first pixel
};

void finish_grid_block(void* ctx, const int32_t* tile, int64_t ldt, int64_t m0, int64_t mr,
                       int64_t n0, int64_t nc) {
  const GridCtx& c = *static_cast<const GridCtx*>(ctx);
  const Int8ConvGeom& g = *c.tile.g;
  int64_t r = c.grid_base + m0;
  const int64_t end = std::min(r + mr, c.grid_rows);
  while (r < end) {
    const int64_t oy = r / c.pad_w, ox = r - oy * c.pad_w;
    const int64_t next_row = r + (c.pad_w - ox);
    if (ox < g.Wo) {
      const int64_t seg = std::min(end, r + (g.Wo - ox)) - r;
      const EpTile t{tile + (r - c.grid_base - m0) * ldt, ldt, c.out_base + oy * g.Wo + ox, seg,
                     c.tile.co_base + n0, nc, nullptr, 0};
      c.tile.ep(t, g.Ho * g.Wo, g.Cout, *c.tile.a);
    }
    r = next_row;
  }
}

void run_padded_tasks(const Int8ConvPlan& plan, const Int8ConvGeom& g, const int8_t* packed,
                      const Int8ConvArgs& a, int64_t t0, int64_t t1, int level) {
#if PYC_HAVE_X86_SIMD
  const int64_t Coutg = g.cout_g(), K = g.k(), Cg = g.cin_g(), Npg = int8_round_n(Coutg);
  const int64_t Kp = int8_round_k(K);
  const int64_t panels = Npg / kInt8PanelCols, block_bytes = int8_packed_bytes(Coutg, K);
  const EpilogueFn ep_fn = pick_epilogue(level, a);
  const Int8AmxTiles tiles(true);
  // the 64-k steps in the packed (ky, kx, c) order: tap (ky, kx) of grid row r reads the padded
  // pixel r + ky * dh * pad_w + kx * dw
  std::vector<int64_t> koff(static_cast<size_t>(K / 64));
  for (int64_t s = 0; s < K / 64; ++s) {
    const int64_t t = s * 64 / Cg, c = s * 64 - t * Cg, ky = t / g.kw, kx = t - ky * g.kw;
    koff[s] = (ky * g.dh * plan.pad_w + kx * g.dw) * g.C + c;
  }
  // the accumulators start from the zero-point correction: the padding holds the zero point too
  ZpStart init(Npg);
  const int64_t img_bytes = plan.pad_h * plan.pad_w * g.C;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t ch = t % plan.chunks, blk = (t / plan.chunks) % plan.blocks;
    const int64_t grp = t / (plan.chunks * plan.blocks);
    const int64_t n0 = blk / plan.img_blocks * plan.imgs, n1 = std::min(g.N, n0 + plan.imgs);
    const int64_t r0 = (blk % plan.img_blocks) * plan.rows;
    const int64_t rows = std::min(plan.rows, plan.grid_rows - r0);
    const int64_t p0 = ch * plan.chunk_panels, p1 = std::min(panels, p0 + plan.chunk_panels);
    if (rows <= 0 || p1 <= p0) continue;
    const int8_t* pk = packed + grp * block_bytes;
    // one image's rows through panels [q0, q1)
    auto image = [&](int64_t n, int64_t q0, int64_t q1) {
      const int32_t* start =
          init.get(grp, byte_zero_point(a, n), reinterpret_cast<const int32_t*>(pk + Npg * Kp));
      GridCtx ctx{TileCtx{&g, &a, ep_fn, nullptr, 0, grp * Coutg}, plan.pad_w, r0, plan.grid_rows,
                  n * g.Ho * g.Wo};
      const uint8_t* rows_at = a.x_padded + n * img_bytes + r0 * g.C + grp * Cg;
      int8_gemm_amx_u8(tiles, rows_at, g.C, pk, round_up(rows, 16), Coutg, K, q0, q1,
                       finish_grid_block, &ctx, start, koff.data());
    };
    if (n1 - n0 == 1) {
      image(n0, p0, p1);
    } else {
      for (int64_t q = p0; q < p1; q += 2)
        for (int64_t n = n0; n < n1; ++n) image(n, q, std::min(p1, q + 2));
    }
  }
#else
  (void)plan, (void)g, (void)packed, (void)a, (void)t0, (void)t1, (void)level;
#endif
}

// ---------------------------------------------------------------- depthwise
//
// Packed layout (T = kh * kw taps, KQ = ceil(kh / 4), Cp = round_up(C, 64), V = 4 * Cp * KQ * kw):
//   [0, V):        VNNI set A, [KQ][kw][Cp / 16][16 channels][4]: byte u of a channel's 4 is the
//                  weight of tap (ky = 4 * qy + u, kx), zero for ky >= kh;
//   [V, 2 V):      VNNI set B, the same with byte u holding tap ky = 4 * qy + u - 1 (zero outside
//                  [0, kh)): the taps of the next output row when the rows of the previous one
//                  are interleaved (stride and dilation 1 in y);
//   next 4 * Cp:   int32 sum over the taps of each channel's weights;
//   next 2 * Cp * kw * ceil(kh / 2) * 2: int16 pairs of vertically adjacent taps,
//                  [ceil(kh / 2)][kw][Cp / 16][2 halves][4 channel pairs][2], see dw_pair_index
//                  (the AVX2 kernel), and then the int16 [T][Cp] weights (the scalar kernel).
// Channels beyond C are zero.
//
// Every kernel computes sum_t v_t * w_t over all taps, with v the input byte (x ^ 0x80 for int8 x)
// and padding taps reading the zero point; the epilogue subtracts zp * sum_t w_t.
//
// A task is one output row, or two consecutive ones (stride and dilation 1 in y, kh not a
// multiple of 4), of one image; rows are cut into segments of at most 48 output pixels so that a
// segment's interleaved input and int32 results stay in L1, and the epilogue runs once per
// segment and block of 64 channels (once for both rows when a segment is the whole row).
//
// The VNNI kernel first interleaves, for every input column of the segment, the bytes of 4
// vertically adjacent rows per channel ([16 channels][4] per 64 bytes: a dword permutation of
// each row and two rounds of in-lane unpacking), so that each (vertical quad, kx) pair of the kernel is
// one vpdpbusd per 16 channels. With two rows per task the quads start at the first row's top
// tap: set A gives the first row, set B (taps shifted down by one) the second, from the same
// interleaved bytes. The tile loop keeps 4 pixels (x 2 rows) of 16 channels in registers and
// loads each interleaved vector once for both rows.
//
// The AVX2 kernel widens pairs of vertically adjacent input rows to int16 pairs per channel
// ([8 channel pairs] per 128-bit lane, the lanes' channel order fixed by dw_pair_index) and
// accumulates one vpmaddwd (2 taps) per 8 channels; each int16 pair vector is built once per
// input column and feeds the kw output pixels that read it.

int64_t dw_cp(const Int8ConvGeom& g) { return round_up(g.C, 64); }
int64_t dw_kq(const Int8ConvGeom& g) { return (g.kh + 3) / 4; }
int64_t dw_kp(const Int8ConvGeom& g) { return (g.kh + 1) / 2; }
int64_t dw_vnni_bytes(const Int8ConvGeom& g) { return 4 * dw_cp(g) * dw_kq(g) * g.kw; }
int64_t dw_wsum_offset(const Int8ConvGeom& g) { return 2 * dw_vnni_bytes(g); }
int64_t dw_pair_offset(const Int8ConvGeom& g) { return dw_wsum_offset(g) + 4 * dw_cp(g); }
int64_t dw_w16_offset(const Int8ConvGeom& g) {
  return dw_pair_offset(g) + 4 * dw_cp(g) * dw_kp(g) * g.kw;
}
// output rows per task
int64_t dw_task_rows(const Int8ConvGeom& g) {
  return g.sh == 1 && g.dh == 1 && g.kh % 4 != 0 && g.Ho > 1 ? 2 : 1;
}
// output pixels per row segment
int64_t dw_seg(const Int8ConvGeom& g) {
  const int64_t parts = (g.Wo + 47) / 48;
  return (g.Wo + parts - 1) / parts;
}
// input columns one segment reads
int64_t dw_seg_cols(const Int8ConvGeom& g) { return (dw_seg(g) - 1) * g.sw + (g.kw - 1) * g.dw + 1; }

// Index (in int16 elements, from the start of a tap pair's Cp * 2 values) of channel c's weight
// of the upper (h = 0) or lower (h = 1) tap: 16 channels per 32 values; 128-bit lane L of the
// two 256-bit vectors holds channel pairs (v, L): vector 0 lane 0 channels 0-3, lane 1 channels
// 8-11, vector 1 lane 0 channels 4-7, lane 1 channels 12-15 (the order unpacklo / unpackhi of
// int16 vectors produce), 2 values per channel.
inline int64_t dw_pair_index(int64_t c, int64_t h) {
  const int64_t blk = c / 16, i = c % 16;
  const int64_t lane = i / 8, half = (i % 8) / 4, j = i % 4;
  return blk * 32 + half * 16 + lane * 8 + 2 * j + h;
}

// Output row oy, channels [c_begin, c_end): acc[ox * ldt + c] (the portable kernel, also the
// channel tail of the AVX2 one).
void dw_row_scalar(const Int8ConvGeom& g, const uint8_t* img, const int16_t* w16, int64_t c_begin,
                   int64_t c_end, int64_t oy, const uint8_t* zprow, uint8_t flip, int32_t* acc,
                   int64_t ldt) {
  const int64_t C = g.C, Cp = dw_cp(g);
  for (int64_t ox = 0; ox < g.Wo; ++ox) {
    int32_t* d = acc + ox * ldt;
    for (int64_t c = c_begin; c < c_end; ++c) d[c] = 0;
    for (int64_t ky = 0; ky < g.kh; ++ky) {
      const int64_t iy = oy * g.sh - g.ph + ky * g.dh;
      for (int64_t kx = 0; kx < g.kw; ++kx) {
        const int64_t ix = ox * g.sw - g.pw + kx * g.dw;
        const uint8_t* src = iy >= 0 && iy < g.H && ix >= 0 && ix < g.W ? img + (iy * g.W + ix) * C : zprow;
        const int16_t* wt = w16 + (ky * g.kw + kx) * Cp;
        for (int64_t c = c_begin; c < c_end; ++c) d[c] += static_cast<int32_t>(src[c] ^ flip) * wt[c];
      }
    }
  }
}

#if PYC_HAVE_X86_SIMD
// q[(qy * ncols + j) * 256 + 4 * c + u] = the byte of input row rows[4 * qy + u] (nullptr: the
// zero point), column ix0 + j (the zero point outside [0, W)), channel c0 + c, c < min(64, C - c0).
template <bool Signed>
PYC_TARGET_AVX512VNNI void dw_interleave_vnni(const uint8_t* const* rows, int64_t KQ, int64_t ix0,
                                              int64_t ncols, int64_t W, int64_t C, int64_t c0,
                                              const uint8_t* zprow, uint8_t* q) {
  const __mmask64 k = C - c0 >= 64 ? ~__mmask64(0) : (~uint64_t(0)) >> (64 - (C - c0));
  const __m512i fv = _mm512_set1_epi8(static_cast<char>(0x80));
  // dword 4 L + j of a row's 64 bytes <- dword 4 j + L (channels 16 j + 4 L ..): after the two
  // rounds of in-lane unpacking, output j then holds channels 16 j .. 16 j + 15 in order
  const __m512i perm = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
  for (int64_t qy = 0; qy < KQ; ++qy) {
    const uint8_t* const* r = rows + 4 * qy;
    uint8_t* d = q + qy * ncols * 256;
    for (int64_t j = 0; j < ncols; ++j, d += 256) {
      const int64_t ix = ix0 + j;
      const bool xok = ix >= 0 && ix < W;
      const int64_t off = ix * C + c0;
      __m512i a0 = _mm512_permutexvar_epi32(perm, _mm512_maskz_loadu_epi8(k, xok && r[0] ? r[0] + off : zprow));
      __m512i a1 = _mm512_permutexvar_epi32(perm, _mm512_maskz_loadu_epi8(k, xok && r[1] ? r[1] + off : zprow));
      __m512i a2 = _mm512_permutexvar_epi32(perm, _mm512_maskz_loadu_epi8(k, xok && r[2] ? r[2] + off : zprow));
      __m512i a3 = _mm512_permutexvar_epi32(perm, _mm512_maskz_loadu_epi8(k, xok && r[3] ? r[3] + off : zprow));
      if (Signed) {
        a0 = _mm512_xor_si512(a0, fv);
        a1 = _mm512_xor_si512(a1, fv);
        a2 = _mm512_xor_si512(a2, fv);
        a3 = _mm512_xor_si512(a3, fv);
      }
      const __m512i l01 = _mm512_unpacklo_epi8(a0, a1), h01 = _mm512_unpackhi_epi8(a0, a1);
      const __m512i l23 = _mm512_unpacklo_epi8(a2, a3), h23 = _mm512_unpackhi_epi8(a2, a3);
      _mm512_store_si512(d, _mm512_unpacklo_epi16(l01, l23));
      _mm512_store_si512(d + 64, _mm512_unpackhi_epi16(l01, l23));
      _mm512_store_si512(d + 128, _mm512_unpacklo_epi16(h01, h23));
      _mm512_store_si512(d + 192, _mm512_unpackhi_epi16(h01, h23));
    }
  }
}

// acc[(r * S + p) * 64 + 16 * b + i], output pixel p < npx of row r (r = 1 with the taps of set
// B), channel 16 b + i of the block, b < nb; tap (qy, kx) of pixel p reads the interleaved column
// p * sw + kx * dw. KQc / KWc: the kernel's quads and width when fixed at compile time, else 0.
template <int KQc, int KWc, bool Pair>
PYC_TARGET_AVX512VNNI void dw_tile_vnni(const uint8_t* q, int64_t ncols, const int8_t* wa,
                                        const int8_t* wb, int64_t wstep, int64_t KQr, int64_t KWr,
                                        int64_t sw, int64_t dw, int64_t npx, int64_t nb,
                                        int32_t* acc, int64_t S) {
  const int64_t KQ = KQc ? KQc : KQr, KW = KWc ? KWc : KWr;
  const int64_t ps = sw * 256, ks = dw * 256, qs = ncols * 256;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* qb = q + b * 64;
    const int8_t* wab = wa + b * 64;
    const int8_t* wbb = wb + b * 64;
    int32_t* out0 = acc + b * 16;
    int32_t* out1 = acc + S * 64 + b * 16;
    int64_t p = 0;
    for (; p + 4 <= npx; p += 4) {
      __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
      __m512i b0 = a0, b1 = a0, b2 = a0, b3 = a0;
      const uint8_t* pp = qb + p * ps;
      for (int64_t qy = 0; qy < KQ; ++qy)
        for (int64_t kx = 0; kx < KW; ++kx) {
          const int64_t t = (qy * KW + kx) * wstep;
          const __m512i wA = _mm512_loadu_si512(wab + t);
          const uint8_t* s = pp + qy * qs + kx * ks;
          const __m512i v0 = _mm512_load_si512(s), v1 = _mm512_load_si512(s + ps);
          const __m512i v2 = _mm512_load_si512(s + 2 * ps), v3 = _mm512_load_si512(s + 3 * ps);
          a0 = _mm512_dpbusd_epi32(a0, v0, wA);
          a1 = _mm512_dpbusd_epi32(a1, v1, wA);
          a2 = _mm512_dpbusd_epi32(a2, v2, wA);
          a3 = _mm512_dpbusd_epi32(a3, v3, wA);
          if (Pair) {
            const __m512i wB = _mm512_loadu_si512(wbb + t);
            b0 = _mm512_dpbusd_epi32(b0, v0, wB);
            b1 = _mm512_dpbusd_epi32(b1, v1, wB);
            b2 = _mm512_dpbusd_epi32(b2, v2, wB);
            b3 = _mm512_dpbusd_epi32(b3, v3, wB);
          }
        }
      _mm512_store_si512(out0 + p * 64, a0);
      _mm512_store_si512(out0 + (p + 1) * 64, a1);
      _mm512_store_si512(out0 + (p + 2) * 64, a2);
      _mm512_store_si512(out0 + (p + 3) * 64, a3);
      if (Pair) {
        _mm512_store_si512(out1 + p * 64, b0);
        _mm512_store_si512(out1 + (p + 1) * 64, b1);
        _mm512_store_si512(out1 + (p + 2) * 64, b2);
        _mm512_store_si512(out1 + (p + 3) * 64, b3);
      }
    }
    for (; p < npx; ++p) {
      __m512i a0 = _mm512_setzero_si512(), b0 = a0;
      const uint8_t* pp = qb + p * ps;
      for (int64_t qy = 0; qy < KQ; ++qy)
        for (int64_t kx = 0; kx < KW; ++kx) {
          const int64_t t = (qy * KW + kx) * wstep;
          const __m512i v0 = _mm512_load_si512(pp + qy * qs + kx * ks);
          a0 = _mm512_dpbusd_epi32(a0, v0, _mm512_loadu_si512(wab + t));
          if (Pair) b0 = _mm512_dpbusd_epi32(b0, v0, _mm512_loadu_si512(wbb + t));
        }
      _mm512_store_si512(out0 + p * 64, a0);
      if (Pair) _mm512_store_si512(out1 + p * 64, b0);
    }
  }
}

using DwTileFn = void (*)(const uint8_t*, int64_t, const int8_t*, const int8_t*, int64_t, int64_t,
                          int64_t, int64_t, int64_t, int64_t, int64_t, int32_t*, int64_t);

template <bool Pair>
DwTileFn pick_dw_tile_vnni(int64_t KQ, int64_t KW) {
  if (KQ == 1 && KW == 3) return dw_tile_vnni<1, 3, Pair>;
  if (KQ == 2 && KW == 5) return dw_tile_vnni<2, 5, Pair>;
  return dw_tile_vnni<0, 0, Pair>;
}

// Output rows oy0 .. oy0 + nrows - 1 of image n (nrows == 2 only when dw_task_rows(g) == 2),
// channels [c_begin, c_end) (c_begin a multiple of 64).
template <bool Signed>
PYC_TARGET_AVX512VNNI void dw_rows_vnni(const Int8ConvGeom& g, const int8_t* packed,
                                        const Int8ConvArgs& a, EpilogueFn ep, int64_t n,
                                        int64_t oy0, int64_t nrows, int64_t c_begin,
                                        int64_t c_end, const uint8_t* zprow, const uint8_t** rows,
                                        uint8_t* q, int32_t* acc) {
  const int64_t C = g.C, Cp = dw_cp(g), KQ = dw_kq(g), S = dw_seg(g);
  const bool shifted = dw_task_rows(g) == 2;
  const uint8_t* img = a.x + n * g.H * g.W * C;
  // the quads' input rows: from the first row's top tap, one apart (shifted) or dh apart
  const int64_t used = shifted ? g.kh + 1 : g.kh, step = shifted ? 1 : g.dh;
  for (int64_t u = 0; u < 4 * KQ; ++u) {
    const int64_t iy = oy0 * g.sh - g.ph + u * step;
    rows[u] = u < used && iy >= 0 && iy < g.H ? img + iy * g.W * C : nullptr;
  }
  const DwTileFn tile = nrows == 2 ? pick_dw_tile_vnni<true>(KQ, g.kw) : pick_dw_tile_vnni<false>(KQ, g.kw);
  const int32_t* wsum = reinterpret_cast<const int32_t*>(packed + dw_wsum_offset(g));
  const int8_t* setb = packed + dw_vnni_bytes(g);
  for (int64_t c0 = c_begin; c0 < c_end; c0 += 64) {
    const int64_t nc = std::min<int64_t>(64, c_end - c0), nb = (nc + 15) / 16;
    for (int64_t ox0 = 0; ox0 < g.Wo; ox0 += S) {
      const int64_t npx = std::min(S, g.Wo - ox0);
      const int64_t ncols = (npx - 1) * g.sw + (g.kw - 1) * g.dw + 1;
      dw_interleave_vnni<Signed>(rows, KQ, ox0 * g.sw - g.pw, ncols, g.W, C, c0, zprow, q);
      tile(q, ncols, packed + 4 * c0, setb + 4 * c0, 4 * Cp, KQ, g.kw, g.sw, g.dw, npx, nb, acc, S);
      if (npx == g.Wo) {  // the rows' pixels follow one another, as the rows of acc
        const EpTile t{acc, 64, (n * g.Ho + oy0) * g.Wo, nrows * npx, c0, nc, wsum + c0, 0};
        ep(t, g.Ho * g.Wo, C, a);
      } else {
        for (int64_t r = 0; r < nrows; ++r) {
          const EpTile t{acc + r * S * 64, 64, (n * g.Ho + oy0 + r) * g.Wo + ox0, npx, c0, nc,
                         wsum + c0, 0};
          ep(t, g.Ho * g.Wo, C, a);
        }
      }
    }
  }
}

// The int16 pairs of rows sa (upper tap) and sb (lower tap) at 16 channels: p0 holds channels 0-3
// and 8-11, p1 channels 4-7 and 12-15 (see dw_pair_index).
template <bool Signed>
PYC_TARGET_AVX2 __attribute__((always_inline)) inline void dw_pairs_avx2(const uint8_t* sa,
                                                                         const uint8_t* sb,
                                                                         __m256i& p0, __m256i& p1) {
  const __m128i ba = _mm_loadu_si128(reinterpret_cast<const __m128i*>(sa));
  const __m128i bb = _mm_loadu_si128(reinterpret_cast<const __m128i*>(sb));
  const __m256i a = Signed ? _mm256_cvtepi8_epi16(ba) : _mm256_cvtepu8_epi16(ba);
  const __m256i b = Signed ? _mm256_cvtepi8_epi16(bb) : _mm256_cvtepu8_epi16(bb);
  p0 = _mm256_unpacklo_epi16(a, b);
  p1 = _mm256_unpackhi_epi16(a, b);
}

// One tap pair (rows ra, rb; nullptr: the zero point) of 4 output pixels from ox, 16 channels
// from c, added to s0 / s1. Interior: every column the pixels read lies inside the image. With
// KWc / SWc fixed (dilation 1 in x), each input column's pairs are built once for all the
// (pixel, kx) that read it.
template <bool Signed, int KWc, int SWc, bool Interior>
PYC_TARGET_AVX2 __attribute__((always_inline)) inline void dw_quad_avx2(const Int8ConvGeom& g, const uint8_t* ra,
                                         const uint8_t* rb, const int16_t* wq, int64_t Cp,
                                         int64_t c, int64_t ox, const uint8_t* zprow, __m256i* s0,
                                         __m256i* s1) {
  const int64_t C = g.C;
  // a null row reads the zero-point row at every column
  const uint8_t* ba = ra ? ra + c : zprow;
  const uint8_t* bb = rb ? rb + c : zprow;
  const int64_t sa = ra ? C : 0, sb = rb ? C : 0;
  if (KWc > 0) {
    const int64_t ix0 = ox * SWc - g.pw;
#pragma GCC unroll 16
    for (int j = 0; j < 3 * SWc + KWc; ++j) {
      const int64_t ix = ix0 + j;
      const bool in = Interior || (ix >= 0 && ix < g.W);
      __m256i v0, v1;
      dw_pairs_avx2<Signed>(in ? ba + ix * sa : zprow, in ? bb + ix * sb : zprow, v0, v1);
#pragma GCC unroll 8
      for (int kx = 0; kx < KWc; ++kx) {
        const int d = j - kx;
        if (d < 0 || d % SWc != 0 || d / SWc >= 4) continue;
        const int p = d / SWc;
        const int16_t* wk = wq + kx * Cp * 2;
        s0[p] = _mm256_add_epi32(
            s0[p], _mm256_madd_epi16(v0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wk))));
        s1[p] = _mm256_add_epi32(
            s1[p], _mm256_madd_epi16(v1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wk + 16))));
      }
    }
  } else {
    for (int64_t kx = 0; kx < g.kw; ++kx) {
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq + kx * Cp * 2));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq + kx * Cp * 2 + 16));
#pragma GCC unroll 4
      for (int p = 0; p < 4; ++p) {
        const int64_t ix = (ox + p) * g.sw - g.pw + kx * g.dw;
        const bool in = Interior || (ix >= 0 && ix < g.W);
        __m256i v0, v1;
        dw_pairs_avx2<Signed>(in ? ba + ix * sa : zprow, in ? bb + ix * sb : zprow, v0, v1);
        s0[p] = _mm256_add_epi32(s0[p], _mm256_madd_epi16(v0, w0));
        s1[p] = _mm256_add_epi32(s1[p], _mm256_madd_epi16(v1, w1));
      }
    }
  }
}

// Output row oy, channels [c_begin, c_end) (both multiples of 16): acc[ox * ldt + c], 4 output pixels of
// 16 channels at a time. Int8 x is widened as signed values and 128 * sum_t w_t added at the end
// (v = x + 128).
template <bool Signed, int KWc, int SWc>
PYC_TARGET_AVX2 void dw_row_avx2(const Int8ConvGeom& g, const uint8_t* img, const int16_t* wp,
                                 const int32_t* wsum, int64_t c_begin, int64_t c_end,
                                 int64_t oy, const uint8_t* zprow, const uint8_t** rows,
                                 int32_t* acc, int64_t ldt) {
  const int64_t KP = dw_kp(g), Cp = dw_cp(g), C = g.C, W = g.W;
  for (int64_t ky = 0; ky < 2 * KP; ++ky) {
    const int64_t iy = oy * g.sh - g.ph + ky * g.dh;
    rows[ky] = ky < g.kh && iy >= 0 && iy < g.H ? img + iy * W * C : nullptr;
  }
  // blocks of 4 pixels from ox whose columns all lie inside the image: ox in [in0, in1)
  const int64_t span = (g.kw - 1) * g.dw + 3 * g.sw;
  const int64_t in0 = (g.pw + g.sw - 1) / g.sw;
  const int64_t in1 = W - 1 - span + g.pw >= 0 ? (W - 1 - span + g.pw) / g.sw + 1 : 0;
  for (int64_t c = c_begin; c < c_end; c += 16) {
    const int16_t* wc = wp + c * 2;
    for (int64_t ox = 0; ox < g.Wo; ox += 4) {
      const int64_t np = std::min<int64_t>(4, g.Wo - ox);
      const bool interior = ox >= in0 && ox < in1;
      __m256i s0[4], s1[4];
      for (int p = 0; p < 4; ++p) s0[p] = s1[p] = _mm256_setzero_si256();
      for (int64_t qp = 0; qp < KP; ++qp) {
        const int16_t* wq = wc + qp * g.kw * Cp * 2;
        if (interior)
          dw_quad_avx2<Signed, KWc, SWc, true>(g, rows[2 * qp], rows[2 * qp + 1], wq, Cp, c, ox,
                                               zprow, s0, s1);
        else
          dw_quad_avx2<Signed, KWc, SWc, false>(g, rows[2 * qp], rows[2 * qp + 1], wq, Cp, c, ox,
                                                zprow, s0, s1);
      }
      __m256i add_lo = _mm256_setzero_si256(), add_hi = add_lo;
      if (Signed) {
        add_lo = _mm256_slli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wsum + c)), 7);
        add_hi = _mm256_slli_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wsum + c + 8)), 7);
      }
      for (int p = 0; p < np; ++p) {
        int32_t* d = acc + (ox + p) * ldt + c;
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(d),
                            _mm256_add_epi32(_mm256_permute2x128_si256(s0[p], s1[p], 0x20), add_lo));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + 8),
                            _mm256_add_epi32(_mm256_permute2x128_si256(s0[p], s1[p], 0x31), add_hi));
      }
    }
  }
}

using DwRowAvx2Fn = void (*)(const Int8ConvGeom&, const uint8_t*, const int16_t*, const int32_t*,
                             int64_t, int64_t, int64_t, const uint8_t*, const uint8_t**, int32_t*,
                             int64_t);

template <bool Signed>
DwRowAvx2Fn pick_dw_row_avx2(const Int8ConvGeom& g) {
  if (g.dw == 1 && g.sw == 1 && g.kw == 3) return dw_row_avx2<Signed, 3, 1>;
  if (g.dw == 1 && g.sw == 1 && g.kw == 5) return dw_row_avx2<Signed, 5, 1>;
  if (g.dw == 1 && g.sw == 2 && g.kw == 3) return dw_row_avx2<Signed, 3, 2>;
  if (g.dw == 1 && g.sw == 2 && g.kw == 5) return dw_row_avx2<Signed, 5, 2>;
  return dw_row_avx2<Signed, 0, 1>;
}
#endif

// workspace: int32 results, interleaved input (VNNI), the zero-point row, row / tap pointers
struct DwWorkspace {
  int32_t* acc;
  uint8_t* q;
  uint8_t* zprow;
  const uint8_t** ptr;
};

int64_t dw_acc_bytes(const Int8ConvGeom& g) {
  return round_up(4 * std::max(g.Wo * dw_cp(g), 2 * dw_seg(g) * 64), 64);
}
int64_t dw_q_bytes(const Int8ConvGeom& g) { return round_up(256 * dw_kq(g) * dw_seg_cols(g), 64); }

int64_t dw_workspace_bytes(const Int8ConvGeom& g) {
  return dw_acc_bytes(g) + dw_q_bytes(g) + dw_cp(g) +
         8 * std::max(g.kh * g.kw, 4 * dw_kq(g)) + 64;
}

DwWorkspace dw_workspace(const Int8ConvGeom& g, void* workspace) {
  DwWorkspace w;
  uint8_t* p = static_cast<uint8_t*>(workspace);
  w.acc = reinterpret_cast<int32_t*>(p);
  w.q = p + dw_acc_bytes(g);
  w.zprow = w.q + dw_q_bytes(g);
  w.ptr = reinterpret_cast<const uint8_t**>(
      (reinterpret_cast<uintptr_t>(w.zprow + dw_cp(g)) + 7) & ~uintptr_t(7));
  return w;
}

void run_depthwise_tasks(const Int8ConvPlan& plan, const Int8ConvGeom& g, const int8_t* packed,
                         const Int8ConvArgs& a, int64_t t0, int64_t t1, void* workspace,
                         int level) {
  const int64_t C = g.C, Cp = dw_cp(g), R = dw_task_rows(g);
  const int64_t tasks_per_image = (g.Ho + R - 1) / R;
  const int64_t cgroups = plan.chunks, cgroup_ch = 64 * plan.chunk_panels;
  const int32_t* wsum = reinterpret_cast<const int32_t*>(packed + dw_wsum_offset(g));
  const int16_t* w16 = reinterpret_cast<const int16_t*>(packed + dw_w16_offset(g));
  const DwWorkspace w = dw_workspace(g, workspace);
  const uint8_t flip = a.x_signed ? 0x80 : 0;
#if PYC_HAVE_X86_SIMD
  const bool vnni = level >= 2 && cpu_features().avx512vnni;
  const int16_t* wp = reinterpret_cast<const int16_t*>(packed + dw_pair_offset(g));
  const DwRowAvx2Fn row_avx2 = flip ? pick_dw_row_avx2<true>(g) : pick_dw_row_avx2<false>(g);
#endif
  const EpilogueFn ep = pick_epilogue(level, a);
  int64_t zp_image = -1;
  for (int64_t t = t0; t < t1; ++t) {  // task: R output rows of image n, one group of channels
    const int64_t rt = t / cgroups, cg = t - rt * cgroups;
    const int64_t n = rt / tasks_per_image, oy0 = (rt - n * tasks_per_image) * R;
    const int64_t nrows = std::min(R, g.Ho - oy0);
    const int64_t cb = cg * cgroup_ch, ce = std::min(C, cb + cgroup_ch);
    const uint8_t* img = a.x + n * g.H * g.W * C;
    if (n != zp_image) {
      std::memset(w.zprow, static_cast<uint8_t>(a.x_zp[n]), static_cast<size_t>(Cp));
      zp_image = n;
    }
#if PYC_HAVE_X86_SIMD
    if (vnni) {
      if (flip)
        dw_rows_vnni<true>(g, packed, a, ep, n, oy0, nrows, cb, ce, w.zprow, w.ptr, w.q, w.acc);
      else
        dw_rows_vnni<false>(g, packed, a, ep, n, oy0, nrows, cb, ce, w.zprow, w.ptr, w.q, w.acc);
      continue;
    }
#endif
    for (int64_t oy = oy0; oy < oy0 + nrows; ++oy) {
      int64_t c_done = cb;
#if PYC_HAVE_X86_SIMD
      if (level >= 1 && ce - cb >= 16) {
        c_done = cb + (ce - cb) / 16 * 16;
        row_avx2(g, img, wp, wsum, cb, c_done, oy, w.zprow, w.ptr, w.acc, Cp);
      }
#endif
      if (c_done < ce) dw_row_scalar(g, img, w16, c_done, ce, oy, w.zprow, flip, w.acc, Cp);
      const EpTile tile{w.acc + cb, Cp, (n * g.Ho + oy) * g.Wo, g.Wo, cb, ce - cb, wsum + cb, 0};
      ep(tile, g.Ho * g.Wo, C, a);
    }
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
    const int64_t Cp = dw_cp(g), KQ = dw_kq(g), KP = dw_kp(g), V = dw_vnni_bytes(g);
    int32_t* wsum = reinterpret_cast<int32_t*>(packed + dw_wsum_offset(g));
    int16_t* wp = reinterpret_cast<int16_t*>(packed + dw_pair_offset(g));
    int16_t* w16 = reinterpret_cast<int16_t*>(packed + dw_w16_offset(g));
    auto tap = [&](int64_t c, int64_t ky, int64_t kx) -> int8_t {
      return c < g.C && ky >= 0 && ky < g.kh ? w[(c * g.kh + ky) * g.kw + kx] : 0;
    };
    for (int64_t b = u0; b < u1; ++b) {
      for (int64_t qy = 0; qy < KQ; ++qy)
        for (int64_t kx = 0; kx < g.kw; ++kx)
          for (int64_t c = 64 * b; c < 64 * (b + 1); ++c)
            for (int64_t u = 0; u < 4; ++u) {
              const int64_t i = ((qy * g.kw + kx) * Cp + c) * 4 + u;
              packed[i] = tap(c, 4 * qy + u, kx);
              packed[V + i] = tap(c, 4 * qy + u - 1, kx);
            }
      for (int64_t qp = 0; qp < KP; ++qp)
        for (int64_t kx = 0; kx < g.kw; ++kx)
          for (int64_t c = 64 * b; c < 64 * (b + 1); ++c)
            for (int64_t h = 0; h < 2; ++h)
              wp[(qp * g.kw + kx) * Cp * 2 + dw_pair_index(c, h)] = tap(c, 2 * qp + h, kx);
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

namespace {

// The panels of each group in chunks, so that the groups x blocks x chunks tasks are at least
// `want` where the blocks alone are fewer.
void split_panels(Int8ConvPlan& p, const Int8ConvGeom& g, int64_t panels, int64_t want, bool amx) {
  const int64_t have = p.blocks * g.groups;
  p.chunks = have >= want ? 1 : std::min<int64_t>(panels, (want + have - 1) / have);
  p.chunk_panels = (panels + p.chunks - 1) / p.chunks;
  // AMX works on pairs of panels
  if (amx && p.chunk_panels % 2 == 1 && p.chunk_panels < panels) ++p.chunk_panels;
  p.chunks = (panels + p.chunk_panels - 1) / p.chunk_panels;
  p.tasks = g.groups * p.blocks * p.chunks;
}

}  // namespace

Int8ConvPlan int8_conv_plan(int isa, const Int8ConvGeom& g, const int8_t* packed, int threads) {
  Int8ConvPlan p;
  threads = std::max(1, threads);
  const int64_t M = g.N * g.Ho * g.Wo;
  if (g.depthwise()) {
    p.depthwise = true;
    p.path = level_of(isa);
    p.rows = g.Wo * dw_task_rows(g);  // output pixels per task
    p.blocks = g.N * ((g.Ho + dw_task_rows(g) - 1) / dw_task_rows(g));
    // few rows for the threads: tasks also split the channels (chunks groups of chunk_panels
    // blocks of 64 channels)
    const int64_t c64 = dw_cp(g) / 64, want = 4 * threads;
    p.chunks = threads > 1 && p.blocks < want ? std::min(c64, (want + p.blocks - 1) / p.blocks) : 1;
    p.chunk_panels = (c64 + p.chunks - 1) / p.chunks;
    p.chunks = (c64 + p.chunk_panels - 1) / p.chunk_panels;
    p.tasks = p.blocks * p.chunks;
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
  const int64_t Cg = g.cin_g();
  if (amx && g.sh == 1 && g.sw == 1 && g.kh * g.kw > 1 && Cg % 64 == 0 && request_amx_permission()) {
    // the taps' rows in place from a padded input (see Int8ConvPlan::padded): the padded image
    // covers every tap of every output pixel, the grid rows of one block of output rows read
    // (rows + (kh - 1) * dh * pad_w) * C bytes instead of rows * K gathered ones
    p.padded = true;
    p.pad_w = std::max(g.W + g.pw, g.Wo + (g.kw - 1) * g.dw);
    p.pad_h = std::max(g.H + g.ph, g.Ho + (g.kh - 1) * g.dh);
    p.grid_rows = (g.Ho - 1) * p.pad_w + g.Wo;
    // blocks of whole 32-row tile pairs; the last one reads up to 31 grid rows beyond the image's
    // last output (at most 32 * C bytes past its last tap), which the slack after the last
    // image covers
    p.pad_bytes = round_up(g.N * p.pad_h * p.pad_w * g.C + 32 * g.C + 64, 64);
    p.pad_units = g.N * p.pad_h;
    const int64_t rows_max = 512, want = threads == 1 ? 1 : 4 * threads;
    const int64_t per_img = (p.grid_rows + rows_max - 1) / rows_max;
    p.rows = round_up((p.grid_rows + per_img - 1) / per_img, 32);
    if (g.N * per_img * g.groups < want && g.N * p.grid_rows > Coutg) {
      const int64_t per = (want + g.N * g.groups - 1) / (g.N * g.groups);
      p.rows = std::min(p.rows, std::max<int64_t>(64, round_up((p.grid_rows + per - 1) / per, 32)));
    }
    p.img_blocks = (p.grid_rows + p.rows - 1) / p.rows;
    if (p.img_blocks == 1) {
      // small images: up to about rows_max grid rows of whole images per block, while there are
      // enough blocks for the threads
      p.imgs = std::max<int64_t>(1, std::min(g.N, rows_max / round_up(p.grid_rows, 16)));
      while (p.imgs > 1 && (g.N + p.imgs - 1) / p.imgs * g.groups < want) --p.imgs;
    }
    p.blocks = (g.N + p.imgs - 1) / p.imgs * p.img_blocks;
    p.workspace_bytes = 64;
    split_panels(p, g, panels, want, amx);
    return p;
  }
  int64_t rows_max = (amx ? int64_t(768) << 10 : int64_t(128) << 10) / rb;
  rows_max = std::max<int64_t>(amx ? 32 : 16, std::min<int64_t>(amx ? 512 : 256, rows_max / 16 * 16));
  const int64_t blocks = std::max<int64_t>(1, (M + rows_max - 1) / rows_max);
  p.rows = std::max<int64_t>(1, round_up((M + blocks - 1) / blocks, 16));
  p.rows = std::min(p.rows, rows_max);
  p.blocks = std::max<int64_t>(1, (M + p.rows - 1) / p.rows);
  // enough tasks for the threads (one thread needs no split: each task then covers all the
  // panels of its rows). Each task reads (gathers) all the rows of its block and all the weights
  // of its panels: smaller row blocks, down to 64 rows, when the rows outweigh the weights
  // (more output pixels than output channels), else the panels are split.
  const int64_t want = threads == 1 ? 1 : 4 * threads;
  if (p.blocks * g.groups < want && M > Coutg) {
    const int64_t per_group = (want + g.groups - 1) / g.groups;
    const int64_t rows = std::max<int64_t>(64, round_up((M + per_group - 1) / per_group, amx ? 32 : 16));
    if (rows < p.rows) {
      p.rows = rows;
      p.blocks = (M + rows - 1) / rows;
    }
  }
  split_panels(p, g, panels, want, amx);
  p.workspace_bytes = round_up(p.rows * rb, 64) + 64;
  // the byte paths read exactly K bytes of each row when K is a multiple of 4; AMX tiles read
  // whole 64-byte steps (see run_gemm_tasks)
  p.direct_rows = g.kh == 1 && g.kw == 1 && g.sh == 1 && g.sw == 1 && g.ph == 0 && g.pw == 0 &&
                  g.pb == 0 && g.pr == 0 && (p.path == 2 || p.path == kInt8PathAmx) && Cg % 4 == 0;
  return p;
}

void int8_conv_pad_input(const Int8ConvPlan& plan, const Int8ConvGeom& g, const Int8ConvArgs& a,
                         uint8_t* xpad, int64_t u0, int64_t u1) {
  // unit: one padded row of one image; the last unit also clears the slack
  const int64_t Wp = plan.pad_w, Hp = plan.pad_h, C = g.C;
  const uint8_t flip = a.x_signed ? 0x80 : 0;
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t n = u / Hp, r = u % Hp, iy = r - g.ph;
    const uint8_t pad = static_cast<uint8_t>(byte_zero_point(a, n));
    uint8_t* d = xpad + (n * Hp + r) * Wp * C;
    if (iy < 0 || iy >= g.H) {
      std::memset(d, pad, static_cast<size_t>(Wp * C));
    } else {
      const int64_t right = Wp - g.pw - g.W;
      if (g.pw > 0) std::memset(d, pad, static_cast<size_t>(g.pw * C));
      copy_xor(2, d + g.pw * C, a.x + (n * g.H + iy) * g.W * C, g.W * C, flip);
      if (right > 0) std::memset(d + (g.pw + g.W) * C, pad, static_cast<size_t>(right * C));
    }
    if (u == plan.pad_units - 1) {
      const int64_t used = g.N * Hp * Wp * C;
      std::memset(xpad + used, 0, static_cast<size_t>(plan.pad_bytes - used));
    }
  }
}

void int8_conv_run(const Int8ConvPlan& plan, const Int8ConvGeom& g, const int8_t* packed,
                   const Int8ConvArgs& args, int64_t t0, int64_t t1, void* workspace) {
  if (t1 <= t0) return;
  // the ISA level of the code around the GEMM (gather, epilogue): that of its path
  const int level = plan.depthwise ? plan.path
                                   : (plan.path == 0 ? 0 : (plan.path == 2 || plan.path == kInt8PathAmx ? 2 : 1));
  if (plan.depthwise)
    run_depthwise_tasks(plan, g, packed, args, t0, t1, workspace, level);
  else if (plan.padded)
    run_padded_tasks(plan, g, packed, args, t0, t1, level);
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

void int8_conv_quantize_u8_nchw(int isa, const void* x, DType dt, int64_t C, int64_t HW, int64_t p0,
                                int64_t p1, float s, bool divide, int32_t zp, uint8_t* q) {
  // blocks of pixels: each channel's run quantized by the elementwise kernel (the same bytes),
  // then interleaved into the pixels' channel-last bytes
  constexpr int64_t kBlock = 512;
  alignas(64) uint8_t tmp[4 * kBlock];
  const int64_t cb = std::max<int64_t>(1, std::min<int64_t>(C, 4)), elem = dt == DType::F32 ? 4 : 2;
  for (int64_t b = p0; b < p1; b += kBlock) {
    const int64_t n = std::min(kBlock, p1 - b);
    for (int64_t c0 = 0; c0 < C; c0 += cb) {
      const int64_t cn = std::min(cb, C - c0);
      for (int64_t c = 0; c < cn; ++c)
        int8_conv_quantize_u8(isa, static_cast<const char*>(x) + ((c0 + c) * HW + b) * elem, dt, 0, n, s,
                              divide, zp, tmp + c * kBlock);
      uint8_t* out = q + b * C + c0;
      if (cn == 3) {
        // an RGB image's three channels with a fixed stride: the stem's case, faster than the
        // loop below with its run-time channel count
        for (int64_t i = 0; i < n; ++i) {
          out[i * C] = tmp[i];
          out[i * C + 1] = tmp[kBlock + i];
          out[i * C + 2] = tmp[2 * kBlock + i];
        }
      } else {
        for (int64_t i = 0; i < n; ++i)
          for (int64_t c = 0; c < cn; ++c) out[i * C + c] = tmp[c * kBlock + i];
      }
    }
  }
}

}  // namespace pyc
