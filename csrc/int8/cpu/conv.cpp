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

constexpr int64_t kDwLanes = 16;  // depthwise weights: channels padded to a multiple of this

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
      r = r < lo ? lo : r;
      r = r > hi ? hi : r;
      const int32_t q = r == r ? static_cast<int32_t>(r) : 0;
      if (u8)
        static_cast<uint8_t*>(a.out)[i] = static_cast<uint8_t>(q);
      else
        static_cast<int8_t*>(a.out)[i] = static_cast<int8_t>(q);
      return;
    }
  }
}

// Output pixel m, channels [co0, co0 + nc): acc (+ corr * colsum when colsum != nullptr, modulo
// 2^32) through dequantization, bias, activation and the output conversion.
__attribute__((noinline)) void epilogue_row_scalar(const int32_t* acc, const int32_t* colsum,
                                                   int32_t corr, float xs, const Int8ConvArgs& a,
                                                   int64_t Cout, int64_t m, int64_t co0,
                                                   int64_t nc) {
  for (int64_t j = 0; j < nc; ++j) {
    uint32_t v = static_cast<uint32_t>(acc[j]);
    if (colsum) v += static_cast<uint32_t>(corr) * static_cast<uint32_t>(colsum[j]);
    const int64_t co = co0 + j;
    float y = static_cast<float>(static_cast<int32_t>(v)) * xs;
    y = y * a.w_scale[co];
    if (a.bias) y = y + a.bias[co];
    store_out_scalar(a, m * Cout + co, act_scalar(a.act, y));
  }
}

// silu of 16 lanes held in memory (exp from the C library, as on the scalar path)
__attribute__((noinline)) void silu_lanes(float* v, int n) {
  for (int i = 0; i < n; ++i) v[i] = v[i] / (1.f + std::exp(-v[i]));
}

#if PYC_HAVE_X86_SIMD

PYC_TARGET_AVX512 inline __m512 act_avx512(ConvAct act, __m512 y, __mmask16 k) {
  const __m512 zero = _mm512_setzero_ps();
  switch (act) {
    case ConvAct::None: return y;
    case ConvAct::Relu: return _mm512_max_ps(zero, y);
    case ConvAct::Relu6: return _mm512_min_ps(_mm512_set1_ps(6.f), _mm512_max_ps(zero, y));
    case ConvAct::Silu: {
      alignas(64) float t[16];
      _mm512_store_ps(t, y);
      silu_lanes(t, 16);
      (void)k;
      return _mm512_load_ps(t);
    }
    case ConvAct::Hardswish: {
      __m512 t = _mm512_add_ps(y, _mm512_set1_ps(3.f));
      t = _mm512_min_ps(_mm512_set1_ps(6.f), _mm512_max_ps(zero, t));
      return _mm512_div_ps(_mm512_mul_ps(y, t), _mm512_set1_ps(6.f));
    }
  }
  return y;
}

PYC_TARGET_AVX512 inline void store_out_avx512(const Int8ConvArgs& a, int64_t i, __m512 y,
                                               __mmask16 k) {
  switch (a.out_kind) {
    case ConvOut::F32:
      _mm512_mask_storeu_ps(static_cast<float*>(a.out) + i, k, y);
      return;
    case ConvOut::F16:
      _mm256_mask_storeu_epi16(static_cast<uint16_t*>(a.out) + i, k,
                               _mm512_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      return;
    case ConvOut::BF16: {
      const __m512i u = _mm512_castps_si512(y);
      const __m512i hi = _mm512_srli_epi32(u, 16);
      const __m512i lsb = _mm512_and_si512(hi, _mm512_set1_epi32(1));
      __m512i r = _mm512_srli_epi32(
          _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb)), 16);
      const __m512i absu = _mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff));
      const __mmask16 nan = _mm512_cmpgt_epi32_mask(absu, _mm512_set1_epi32(0x7f800000));
      r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(hi, _mm512_set1_epi32(0x40)));
      _mm256_mask_storeu_epi16(static_cast<uint16_t*>(a.out) + i, k, _mm512_cvtepi32_epi16(r));
      return;
    }
    case ConvOut::U8:
    case ConvOut::S8: {
      const bool u8 = a.out_kind == ConvOut::U8;
      __m512 r = _mm512_roundscale_ps(_mm512_mul_ps(y, _mm512_set1_ps(a.out_inv)),
                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      r = _mm512_add_ps(r, _mm512_set1_ps(static_cast<float>(a.out_zp)));
      // NaN lanes become the low end (max returns its second operand)
      r = _mm512_max_ps(r, _mm512_set1_ps(u8 ? 0.f : -128.f));
      r = _mm512_min_ps(r, _mm512_set1_ps(u8 ? 255.f : 127.f));
      const __m128i q = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(r));
      _mm_mask_storeu_epi8(static_cast<uint8_t*>(a.out) + i, k, q);
      return;
    }
  }
}

PYC_TARGET_AVX512 void epilogue_row_avx512(const int32_t* acc, const int32_t* colsum,
                                           int32_t corr, float xs, const Int8ConvArgs& a,
                                           int64_t Cout, int64_t m, int64_t co0, int64_t nc) {
  const __m512 xsv = _mm512_set1_ps(xs);
  const __m512i corrv = _mm512_set1_epi32(corr);
  for (int64_t j = 0; j < nc; j += 16) {
    const __mmask16 k = nc - j >= 16 ? __mmask16(0xffff) : __mmask16((1u << (nc - j)) - 1);
    __m512i v = _mm512_maskz_loadu_epi32(k, acc + j);
    if (colsum) v = _mm512_add_epi32(v, _mm512_mullo_epi32(corrv, _mm512_maskz_loadu_epi32(k, colsum + j)));
    const int64_t co = co0 + j;
    __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(v), xsv);
    y = _mm512_mul_ps(y, _mm512_maskz_loadu_ps(k, a.w_scale + co));
    if (a.bias) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(k, a.bias + co));
    store_out_avx512(a, m * Cout + co, act_avx512(a.act, y, k), k);
  }
}

#endif  // PYC_HAVE_X86_SIMD

inline void epilogue_row(int level, const int32_t* acc, const int32_t* colsum, int32_t corr,
                         float xs, const Int8ConvArgs& a, int64_t Cout, int64_t m, int64_t co0,
                         int64_t nc) {
#if PYC_HAVE_X86_SIMD
  if (level >= 2) return epilogue_row_avx512(acc, colsum, corr, xs, a, Cout, m, co0, nc);
#endif
  (void)level;
  epilogue_row_scalar(acc, colsum, corr, xs, a, Cout, m, co0, nc);
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

inline int32_t byte_zero_point(const Int8ConvArgs& a, int64_t n) {
  return a.x_signed ? a.x_zp[n] + 128 : a.x_zp[n];
}

// Rows [m0, m0 + mr) (output pixels) of group grp into ap (row stride rb) in the form `path` reads.
void gather_rows(int path, int level, const Int8ConvGeom& g, const Int8ConvArgs& a, int64_t grp,
                 int64_t m0, int64_t mr, uint8_t* ap, int64_t rb) {
  const int64_t Cg = g.cin_g(), K = g.k(), HoWo = g.Ho * g.Wo;
  const bool u8 = path_reads_u8(path);
  const uint8_t flip = a.x_signed ? 0x80 : 0;
  for (int64_t r = 0; r < mr; ++r) {
    const int64_t m = m0 + r, n = m / HoWo, rem = m - n * HoWo;
    const int64_t oy = rem / g.Wo, ox = rem - oy * g.Wo;
    const uint8_t* img = a.x + n * g.H * g.W * g.C + grp * Cg;
    const int32_t zp = a.x_zp[n];
    if (u8) {
      uint8_t* dst = ap + r * rb;
      const uint8_t pad = static_cast<uint8_t>(byte_zero_point(a, n));
      for (int64_t ky = 0; ky < g.kh; ++ky) {
        const int64_t iy = oy * g.sh - g.ph + ky * g.dh;
        for (int64_t kx = 0; kx < g.kw; ++kx) {
          const int64_t ix = ox * g.sw - g.pw + kx * g.dw;
          uint8_t* d = dst + (ky * g.kw + kx) * Cg;
          if (iy < 0 || iy >= g.H || ix < 0 || ix >= g.W)
            std::memset(d, pad, static_cast<size_t>(Cg));
          else
            copy_xor(level, d, img + (iy * g.W + ix) * g.C, Cg, flip);
        }
      }
      std::memset(dst + K, 0, static_cast<size_t>(rb - K));
    } else {
      int16_t* dst = reinterpret_cast<int16_t*>(ap + r * rb);
      for (int64_t ky = 0; ky < g.kh; ++ky) {
        const int64_t iy = oy * g.sh - g.ph + ky * g.dh;
        for (int64_t kx = 0; kx < g.kw; ++kx) {
          const int64_t ix = ox * g.sw - g.pw + kx * g.dw;
          int16_t* d = dst + (ky * g.kw + kx) * Cg;
          if (iy < 0 || iy >= g.H || ix < 0 || ix >= g.W) {
            std::memset(d, 0, static_cast<size_t>(Cg) * 2);
          } else {
            const uint8_t* s = img + (iy * g.W + ix) * g.C;
            if (a.x_signed) {
              for (int64_t c = 0; c < Cg; ++c)
                d[c] = static_cast<int16_t>(static_cast<int8_t>(s[c]) - zp);
            } else {
              for (int64_t c = 0; c < Cg; ++c) d[c] = static_cast<int16_t>(s[c] - zp);
            }
          }
        }
      }
      std::memset(dst + K, 0, static_cast<size_t>(rb - 2 * K));
    }
  }
}

// ---------------------------------------------------------------- implicit GEMM driver

int level_of(int isa) { return std::min(isa, 2); }

void run_gemm_tasks(const Int8ConvPlan& plan, const Int8ConvGeom& g, const int8_t* packed,
                    const Int8ConvArgs& a, int64_t t0, int64_t t1, void* workspace, int level) {
  const int path = plan.path;
  const int64_t Coutg = g.cout_g(), K = g.k(), Kp = int8_round_k(K), Npg = int8_round_n(Coutg);
  const int64_t panels = Npg / kInt8PanelCols, block_bytes = int8_packed_bytes(Coutg, K);
  const int64_t rb = int8_a_row_bytes(path, K), M = g.N * g.Ho * g.Wo, HoWo = g.Ho * g.Wo;
  uint8_t* ap = static_cast<uint8_t*>(workspace);
  int32_t* cbuf = reinterpret_cast<int32_t*>(ap + round_up(plan.rows * rb, 64));
  const bool u8 = path_reads_u8(path);
  int64_t have_grp = -1, have_blk = -1;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t ch = t % plan.chunks, blk = (t / plan.chunks) % plan.blocks;
    const int64_t grp = t / (plan.chunks * plan.blocks);
    const int64_t m0 = blk * plan.rows, mr = std::min(plan.rows, M - m0);
    if (mr <= 0) continue;
    if (grp != have_grp || blk != have_blk) {
      gather_rows(path, level, g, a, grp, m0, mr, ap, rb);
      have_grp = grp;
      have_blk = blk;
    }
    const int8_t* pk = packed + grp * block_bytes;
    const int32_t* colsum = reinterpret_cast<const int32_t*>(pk + Npg * Kp);
    const int64_t p0 = ch * plan.chunk_panels, p1 = std::min(panels, p0 + plan.chunk_panels);
    if (p1 <= p0) continue;
    Int8Epilogue ep;
    ep.c = cbuf;
    ep.ldc = Npg;
    int8_gemm_packed(path, ap, pk, mr, Coutg, K, p0, p1, ep, nullptr);
    const int64_t n0 = p0 * kInt8PanelCols, n1 = std::min(Coutg, p1 * kInt8PanelCols);
    for (int64_t r = 0; r < mr; ++r) {
      const int64_t m = m0 + r, n = m / HoWo;
      const int32_t corr = u8 ? 128 - byte_zero_point(a, n) : 0;
      epilogue_row(level, cbuf + r * Npg + n0, u8 ? colsum + n0 : nullptr, corr, a.x_scale[n], a,
                   g.Cout, m, grp * Coutg + n0, n1 - n0);
    }
  }
}

// ---------------------------------------------------------------- depthwise

// Valid taps of output pixel (oy, ox): input offsets (pixels) and weight rows.
inline int valid_taps(const Int8ConvGeom& g, int64_t oy, int64_t ox, int64_t* off, int64_t* tap) {
  int nt = 0;
  for (int64_t ky = 0; ky < g.kh; ++ky) {
    const int64_t iy = oy * g.sh - g.ph + ky * g.dh;
    if (iy < 0 || iy >= g.H) continue;
    for (int64_t kx = 0; kx < g.kw; ++kx) {
      const int64_t ix = ox * g.sw - g.pw + kx * g.dw;
      if (ix < 0 || ix >= g.W) continue;
      off[nt] = iy * g.W + ix;
      tap[nt] = ky * g.kw + kx;
      ++nt;
    }
  }
  return nt;
}

void dw_pixel_scalar(const Int8ConvGeom& g, const Int8ConvArgs& a, const int32_t* wk, int64_t Cp,
                     const uint8_t* img, int32_t zp, const int64_t* off, const int64_t* tap,
                     int nt, int32_t* acc) {
  const int64_t C = g.C;
  for (int64_t c = 0; c < C; ++c) acc[c] = 0;
  for (int t = 0; t < nt; ++t) {
    const uint8_t* s = img + off[t] * C;
    const int32_t* w = wk + tap[t] * Cp;
    for (int64_t c = 0; c < C; ++c) {
      const int32_t xv = a.x_signed ? static_cast<int8_t>(s[c]) : s[c];
      acc[c] += (xv - zp) * static_cast<int16_t>(w[c] & 0xffff);
    }
  }
}

#if PYC_HAVE_X86_SIMD
// (x - zp) sits in the low 16 bits of each int32 lane (|x - zp| <= 255) and the weight in the low
// 16 bits with a zero high half, so vpmaddwd gives the exact product per lane.
PYC_TARGET_AVX2 void dw_pixel_avx2(const Int8ConvGeom& g, const Int8ConvArgs& a, const int32_t* wk,
                                   int64_t Cp, const uint8_t* img, int32_t zp, const int64_t* off,
                                   const int64_t* tap, int nt, int32_t* acc) {
  const int64_t C = g.C;
  const __m256i zpv = _mm256_set1_epi32(zp);
  int64_t c0 = 0;
  for (; c0 + 8 <= C; c0 += 8) {
    __m256i s = _mm256_setzero_si256();
    for (int t = 0; t < nt; ++t) {
      const __m128i xb = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(img + off[t] * C + c0));
      __m256i xv = a.x_signed ? _mm256_cvtepi8_epi32(xb) : _mm256_cvtepu8_epi32(xb);
      xv = _mm256_sub_epi32(xv, zpv);
      const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wk + tap[t] * Cp + c0));
      s = _mm256_add_epi32(s, _mm256_madd_epi16(xv, wv));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(acc + c0), s);
  }
  for (int64_t c = c0; c < C; ++c) {
    int32_t s = 0;
    for (int t = 0; t < nt; ++t) {
      const uint8_t b = img[off[t] * C + c];
      const int32_t xv = a.x_signed ? static_cast<int8_t>(b) : b;
      s += (xv - zp) * static_cast<int16_t>(wk[tap[t] * Cp + c] & 0xffff);
    }
    acc[c] = s;
  }
}

PYC_TARGET_AVX512 void dw_pixel_avx512(const Int8ConvGeom& g, const Int8ConvArgs& a,
                                       const int32_t* wk, int64_t Cp, const uint8_t* img,
                                       int32_t zp, const int64_t* off, const int64_t* tap, int nt,
                                       int32_t* acc) {
  const int64_t C = g.C;
  const __m512i zpv = _mm512_set1_epi32(zp);
  for (int64_t c0 = 0; c0 < C; c0 += 16) {
    const __mmask16 k = C - c0 >= 16 ? __mmask16(0xffff) : __mmask16((1u << (C - c0)) - 1);
    __m512i s = _mm512_setzero_si512();
    for (int t = 0; t < nt; ++t) {
      const __m128i xb = _mm_maskz_loadu_epi8(k, img + off[t] * C + c0);
      __m512i xv = a.x_signed ? _mm512_cvtepi8_epi32(xb) : _mm512_cvtepu8_epi32(xb);
      xv = _mm512_sub_epi32(xv, zpv);
      s = _mm512_add_epi32(s, _mm512_madd_epi16(xv, _mm512_loadu_si512(wk + tap[t] * Cp + c0)));
    }
    _mm512_storeu_si512(acc + c0, s);
  }
}
#endif

void run_depthwise_tasks(const Int8ConvPlan& plan, const Int8ConvGeom& g, const int8_t* packed,
                         const Int8ConvArgs& a, int64_t t0, int64_t t1, void* workspace,
                         int level) {
  const int64_t C = g.C, Cp = round_up(C, kDwLanes);
  const int32_t* wk = reinterpret_cast<const int32_t*>(packed);
  int32_t* acc = static_cast<int32_t*>(workspace);
  std::vector<int64_t> off(static_cast<size_t>(g.kh * g.kw)), tap(off.size());
  // task: one output row (n, oy)
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n = t / g.Ho, oy = t - n * g.Ho;
    const uint8_t* img = a.x + n * g.H * g.W * C;
    const int32_t zp = a.x_zp[n];
    const float xs = a.x_scale[n];
    for (int64_t ox = 0; ox < g.Wo; ++ox) {
      const int nt = valid_taps(g, oy, ox, off.data(), tap.data());
#if PYC_HAVE_X86_SIMD
      if (level >= 2)
        dw_pixel_avx512(g, a, wk, Cp, img, zp, off.data(), tap.data(), nt, acc);
      else if (level == 1)
        dw_pixel_avx2(g, a, wk, Cp, img, zp, off.data(), tap.data(), nt, acc);
      else
#endif
        dw_pixel_scalar(g, a, wk, Cp, img, zp, off.data(), tap.data(), nt, acc);
      epilogue_row(level, acc, nullptr, 0, xs, a, C, (n * g.Ho + oy) * g.Wo + ox, 0, C);
    }
  }
}

}  // namespace

// ---------------------------------------------------------------- packing

int64_t int8_conv_packed_bytes(const Int8ConvGeom& g) {
  if (g.depthwise()) return 4 * g.kh * g.kw * round_up(g.C, kDwLanes);
  return g.groups * int8_packed_bytes(g.cout_g(), g.k());
}

int64_t int8_conv_pack_units(const Int8ConvGeom& g) {
  return g.depthwise() ? g.kh * g.kw : g.groups;
}

void int8_conv_pack_weight(const int8_t* w, const Int8ConvGeom& g, int8_t* packed, int64_t u0,
                           int64_t u1) {
  const int64_t taps = g.kh * g.kw;
  if (g.depthwise()) {
    const int64_t Cp = round_up(g.C, kDwLanes);
    for (int64_t t = u0; t < u1; ++t) {
      int32_t* dst = reinterpret_cast<int32_t*>(packed) + t * Cp;
      for (int64_t c = 0; c < Cp; ++c) {
        const int32_t v = c < g.C ? w[c * taps + t] : 0;
        const int32_t word = static_cast<int32_t>(static_cast<uint16_t>(static_cast<int16_t>(v)));
        std::memcpy(dst + c, &word, sizeof word);
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
    p.workspace_bytes = 4 * round_up(g.C, kDwLanes) + 64;
    return p;
  }
  const int64_t Coutg = g.cout_g(), K = g.k(), Npg = int8_round_n(Coutg);
  const int64_t panels = Npg / kInt8PanelCols, block_bytes = int8_packed_bytes(Coutg, K);
  bool narrow = true;
  for (int64_t grp = 0; grp < g.groups && narrow; ++grp)
    narrow = int8_packed_narrow(packed + grp * block_bytes, Coutg, K);
  p.path = int8_gemm_path(isa, false, narrow);
  const int64_t rb = int8_a_row_bytes(p.path, K);
  // a block of gathered rows (and its int32 results) stays within L2 while the panels stream
  int64_t rows_max = std::min<int64_t>((int64_t(128) << 10) / rb, (int64_t(256) << 10) / (4 * Npg));
  rows_max = std::max<int64_t>(16, std::min<int64_t>(256, rows_max / 16 * 16));
  const int64_t blocks = std::max<int64_t>(1, (M + rows_max - 1) / rows_max);
  p.rows = std::max<int64_t>(1, round_up((M + blocks - 1) / blocks, 16));
  p.rows = std::min(p.rows, rows_max);
  p.blocks = std::max<int64_t>(1, (M + p.rows - 1) / p.rows);
  // enough tasks for the threads: split the panels when there are few pixel blocks
  const int64_t want = 4 * threads, have = p.blocks * g.groups;
  p.chunks = have >= want ? 1 : std::min<int64_t>(panels, (want + have - 1) / have);
  p.chunk_panels = (panels + p.chunks - 1) / p.chunks;
  p.chunks = (panels + p.chunk_panels - 1) / p.chunk_panels;
  p.tasks = g.groups * p.blocks * p.chunks;
  p.workspace_bytes = round_up(p.rows * rb, 64) + 4 * p.rows * Npg + 64;
  return p;
}

void int8_conv_run(const Int8ConvPlan& plan, const Int8ConvGeom& g, const int8_t* packed,
                   const Int8ConvArgs& args, int64_t t0, int64_t t1, void* workspace) {
  if (t1 <= t0) return;
  int level = plan.depthwise ? plan.path : (plan.path == 0 ? 0 : (plan.path == 1 || plan.path == 3 || plan.path == 4 ? 1 : 2));
  if (plan.depthwise)
    run_depthwise_tasks(plan, g, packed, args, t0, t1, workspace, level);
  else
    run_gemm_tasks(plan, g, packed, args, t0, t1, workspace, level);
}

// ---------------------------------------------------------------- float input quantization

void int8_conv_minmax(int isa, const void* x, DType dt, int64_t b, int64_t e, float* lo, float* hi,
                      bool* finite) {
  (void)isa;
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

void int8_conv_dynamic_params(float min_x, float max_x, float* scale, int32_t* zp) {
  const float lo = std::min(0.f, min_x), hi = std::max(0.f, max_x);
  float s = (hi - lo) / 255.f;
  if (hi == lo) s = 1.f;
  float z = std::nearbyint(-lo / s);
  z = z < 0.f ? 0.f : (z > 255.f ? 255.f : z);
  *scale = s;
  *zp = static_cast<int32_t>(z);
}

void int8_conv_quantize_u8(int isa, const void* x, DType dt, int64_t b, int64_t e, float s,
                           bool divide, int32_t zp, uint8_t* q) {
  (void)isa;
  const float zf = static_cast<float>(zp);
  for (int64_t i = b; i < e; ++i) {
    const float v = load_as_float(x, i, dt);
    float r = std::nearbyint(divide ? v / s : v * s) + zf;
    r = r < 0.f ? 0.f : (r > 255.f ? 255.f : r);
    q[i] = static_cast<uint8_t>(r);
  }
}

}  // namespace pyc
