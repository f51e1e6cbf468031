// int8 GEMM on the CPU (see int8/gemm.h): packing, scalar / AVX2 / AVX-512 VNNI
// micro-kernels, fused dequantization epilogue, and the weight-only (w8a16) path.
//
// AVX2 has no exact 8-bit multiply-add (vpmaddubsw saturates its int16 pair sums),
// so the AVX2 kernel widens both operands to int16 and uses vpmaddwd, whose pair
// sums (at most 2 * 128 * 128) are exact in int32. Each group of 4 k values of 8
// columns is one 16-byte load sign-extended to 16 int16; one 64-bit broadcast of
// the activation's 4 int16 values multiplies it; pairs of partial sums are folded
// with vphaddd at the end.
//
// The VNNI kernel uses vpdpbusd (u8 x s8 -> 4 products summed into int32, no
// saturation) with A + 128 as the unsigned operand and subtracts 128 * sum_k B[n, k].
//
// The AVX2 7-bit path (A in [-64, 63]) multiplies A + 64 (u8, <= 127) with B (s8) by
// vpmaddubsw: pair sums are at most 2 * 127 * 128 in magnitude, so they never saturate;
// vpmaddwd with ones adds the pairs into int32 and 64 * sum_k B[n, k] is subtracted.
// One 32-byte load holds 8 columns x 4 k of the packed panel, so a whole 16-column panel
// is two memory operands and no widening shuffles are needed.
#include "int8/gemm.h"

#include <algorithm>
#include <array>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <utility>

#include "common/cpu_features.h"
#include "common/simd.h"
#include "int8/cpu/gemm_amx.h"

namespace pyc {
namespace {

constexpr int kMrScalar = 4;
constexpr int kMrAvx2 = 6;
constexpr int kMrVnni = 8;
constexpr int kMrAvx2U8 = 6;
constexpr int kMrAvx2U8Pair = 5;
// Largest weight magnitude the 7-bit x 7-bit kernel accepts: 4 * 127 * 64 = 32512 fits int16.
constexpr int32_t kNarrowWeightMax = 64;

inline int64_t load_i64(const void* p) {
  int64_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline int32_t load_i32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// ---------------------------------------------------------------- epilogue

// |acc| < 2^31, so (float)acc * a_scale can overflow fp32 only in rows whose activation
// scale exceeds FLT_MAX / 2^31 (|x| beyond ~1e29), even where the result, brought back by the
// weight scale, is finite. Those rows take epilogue_large_row; every other row keeps the fp32
// chain below, bit for bit.
constexpr float kLargeActScale = FLT_MAX / 2147483648.f;

// The fp32 chain where (float)acc * a_scale is finite (the same bits as any row), else the
// whole expression in double, rounded once to fp32 (inf only where the result overflows).
__attribute__((noinline)) void epilogue_large_row(const Int8Epilogue& ep, const int32_t* t,
                                                  int64_t m, int64_t n0, int64_t nc) {
  const float xs = ep.a_scale[m];
  for (int64_t j = 0; j < nc; ++j) {
    const int64_t n = n0 + j;
    float v = static_cast<float>(t[j]) * xs;
    if (std::isinf(v)) {
      double d = static_cast<double>(t[j]) * static_cast<double>(xs) * static_cast<double>(ep.w_scale[n]);
      if (ep.bias) d += static_cast<double>(ep.bias[n]);
      v = static_cast<float>(d);
    } else {
      v = v * ep.w_scale[n];
      if (ep.bias) v = v + ep.bias[n];
    }
    store_from_float(ep.out, m * ep.ldo + n, ep.out_dtype, v);
  }
}

// Kept out of line and compiled for the baseline ISA so the compiler never
// contracts the multiply-add into an FMA (the vector path rounds each step too).
__attribute__((noinline)) void epilogue_scalar(const Int8Epilogue& ep, const int32_t* tile,
                                               int64_t ldt, int64_t m0, int64_t mr, int64_t n0,
                                               int64_t nc) {
  if (ep.tile_fn != nullptr) return ep.tile_fn(ep.tile_ctx, tile, ldt, m0, mr, n0, nc);
  for (int64_t r = 0; r < mr; ++r) {
    const int32_t* t = tile + r * ldt;
    const int64_t m = m0 + r;
    if (ep.out == nullptr) {
      std::memcpy(ep.c + m * ep.ldc + n0, t, static_cast<size_t>(nc) * sizeof(int32_t));
      continue;
    }
    const float xs = ep.a_scale[m];
    if (std::fabs(xs) > kLargeActScale) {
      epilogue_large_row(ep, t, m, n0, nc);
      continue;
    }
    for (int64_t j = 0; j < nc; ++j) {
      const int64_t n = n0 + j;
      float v = static_cast<float>(t[j]) * xs;
      v = v * ep.w_scale[n];
      if (ep.bias) v = v + ep.bias[n];
      store_from_float(ep.out, m * ep.ldo + n, ep.out_dtype, v);
    }
  }
}

#if PYC_HAVE_X86_SIMD

PYC_TARGET_AVX2 inline void store8_avx2(void* out, int64_t i, DType dt, __m256 v) {
  switch (dt) {
    case DType::F32:
      _mm256_storeu_ps(static_cast<float*>(out) + i, v);
      break;
    case DType::F16:
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(out) + i),
                       _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      break;
    case DType::BF16:
    default: {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(out) + i), pyc_cvt_f32_bf16_avx2(v));
      break;
    }
  }
}

PYC_TARGET_AVX2 void epilogue_avx2(const Int8Epilogue& ep, const int32_t* tile, int64_t ldt,
                                   int64_t m0, int64_t mr, int64_t n0, int64_t nc) {
  if (ep.out == nullptr || nc % 8 != 0) return epilogue_scalar(ep, tile, ldt, m0, mr, n0, nc);
  for (int64_t r = 0; r < mr; ++r) {
    const int64_t m = m0 + r;
    if (std::fabs(ep.a_scale[m]) > kLargeActScale) {
      epilogue_large_row(ep, tile + r * ldt, m, n0, nc);
      continue;
    }
    const __m256 xs = _mm256_set1_ps(ep.a_scale[m]);
    for (int64_t j = 0; j < nc; j += 8) {
      const int64_t n = n0 + j;
      __m256 v = _mm256_cvtepi32_ps(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile + r * ldt + j)));
      v = _mm256_mul_ps(v, xs);
      v = _mm256_mul_ps(v, _mm256_loadu_ps(ep.w_scale + n));
      if (ep.bias) v = _mm256_add_ps(v, _mm256_loadu_ps(ep.bias + n));
      store8_avx2(ep.out, m * ep.ldo + n, ep.out_dtype, v);
    }
  }
}

// ---------------------------------------------------------------- AVX2 kernel

// Shared pieces of the inline-assembly kernels: int16 ones in ymm0, and zeroed accumulators.
#define PYC_ASM_ONES_Y0 "vpcmpeqw %%ymm0, %%ymm0, %%ymm0\n\tvpsrlw $15, %%ymm0, %%ymm0\n\t"
#define PYC_ASM_ZERO_4_5 "vpxor %%xmm4, %%xmm4, %%xmm4\n\tvpxor %%xmm5, %%xmm5, %%xmm5\n\t"
#define PYC_ASM_ZERO_6_15                                                                   \
  "vpxor %%xmm6, %%xmm6, %%xmm6\n\tvpxor %%xmm7, %%xmm7, %%xmm7\n\t"                    \
  "vpxor %%xmm8, %%xmm8, %%xmm8\n\tvpxor %%xmm9, %%xmm9, %%xmm9\n\t"                    \
  "vpxor %%xmm10, %%xmm10, %%xmm10\n\tvpxor %%xmm11, %%xmm11, %%xmm11\n\t"              \
  "vpxor %%xmm12, %%xmm12, %%xmm12\n\tvpxor %%xmm13, %%xmm13, %%xmm13\n\t"              \
  "vpxor %%xmm14, %%xmm14, %%xmm14\n\tvpxor %%xmm15, %%xmm15, %%xmm15\n\t"

// MR (3..6) rows x 8 columns (one half of a 16-column panel). a: int16 rows (stride lda
// elements); b: panel base + 32 * half, 64 bytes per k-group. Written in inline assembly:
// with intrinsics GCC hoists the broadcasts and spills accumulators. Accumulators live in
// ymm4..ymm15 (two per row), the sign-extended weights in ymm0/ymm1. Loops start on a 64-byte
// boundary (this and the 7-bit kernel): with 32-byte alignment their speed depended on where
// the build happened to place them (up to 10% apart between two builds of the same code on
// Zen 3); aligned, the layer measured 4-5% faster at M = 16 and 128 than the build before.
#define PYC_ASM_ROW(A, C0, C1)                   \
  "vpbroadcastq " A ", %%ymm2\n\t"               \
  "vpmaddwd %%ymm0, %%ymm2, %%ymm3\n\t"          \
  "vpaddd %%ymm3, %%ymm" C0 ", %%ymm" C0 "\n\t"  \
  "vpmaddwd %%ymm1, %%ymm2, %%ymm2\n\t"          \
  "vpaddd %%ymm2, %%ymm" C1 ", %%ymm" C1 "\n\t"
// c0 = [n0 n0 n1 n1 | n2 n2 n3 n3], c1 = [n4 n4 n5 n5 | n6 n6 n7 n7] (pairs of partial sums);
// hadd -> [n0 n1 n4 n5 | n2 n3 n6 n7], then the 64-bit quarters are put in order.
#define PYC_ASM_STORE(C0, C1, DST)                    \
  "vphaddd %%ymm" C1 ", %%ymm" C0 ", %%ymm" C0 "\n\t" \
  "vpermq $0xd8, %%ymm" C0 ", %%ymm" C0 "\n\t"        \
  "vmovdqu %%ymm" C0 ", " DST "\n\t"
#define PYC_R0 PYC_ASM_ROW("(%[pa])", "4", "5")
#define PYC_R1 PYC_ASM_ROW("(%[pa],%[ld],1)", "6", "7")
#define PYC_R2 PYC_ASM_ROW("(%[pa],%[ld],2)", "8", "9")
#define PYC_R3 PYC_ASM_ROW("(%[pb])", "10", "11")
#define PYC_R4 PYC_ASM_ROW("(%[pb],%[ld],1)", "12", "13")
#define PYC_R5 PYC_ASM_ROW("(%[pb],%[ld],2)", "14", "15")
#define PYC_S0 PYC_ASM_STORE("4", "5", "(%[t])")
#define PYC_S1 PYC_ASM_STORE("6", "7", "(%[t],%[ldt],1)")
#define PYC_S2 PYC_ASM_STORE("8", "9", "(%[t],%[ldt],2)")
#define PYC_S3 PYC_ASM_STORE("10", "11", "(%[t3])")
#define PYC_S4 PYC_ASM_STORE("12", "13", "(%[t3],%[ldt],1)")
#define PYC_S5 PYC_ASM_STORE("14", "15", "(%[t3],%[ldt],2)")
#define PYC_AVX2_KERNEL_ASM(ROWS, STORES)                                                      \
  asm volatile(                                                                                \
      PYC_ASM_ZERO_4_5 PYC_ASM_ZERO_6_15                                                 \
      "test %[n], %[n]\n\t"                                                                    \
      "jle 2f\n\t"                                                                             \
      ".p2align 6\n\t"                                                                         \
      "1:\n\t"                                                                                 \
      "vpmovsxbw (%[b]), %%ymm0\n\t"                                                           \
      "vpmovsxbw 16(%[b]), %%ymm1\n\t" ROWS                                                    \
      "add $64, %[b]\n\t"                                                                      \
      "add $8, %[pa]\n\t"                                                                      \
      "add $8, %[pb]\n\t"                                                                      \
      "dec %[n]\n\t"                                                                           \
      "jnz 1b\n\t"                                                                             \
      "2:\n\t" STORES                                                                          \
      : [b] "+r"(bq), [pa] "+r"(pa), [pb] "+r"(pb), [n] "+r"(cnt)                              \
      : [ld] "r"(lda * 2), [t] "r"(t), [t3] "r"(t + 3 * ldt), [ldt] "r"(ldt * 4)               \
      : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9",        \
        "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "cc", "memory")

template <int MR>
PYC_TARGET_AVX2 void kernel_avx2(const int16_t* a, int64_t lda, const int8_t* b, int64_t nq,
                                 int32_t* t, int64_t ldt) {
  static_assert(MR >= 3 && MR <= 6, "kernel_avx2 handles 3..6 rows");
  const int8_t* bq = b;
  const int16_t* pa = a;
  const int16_t* pb = a + 3 * lda;  // only dereferenced for MR > 3
  int64_t cnt = nq;
  if (MR == 6) PYC_AVX2_KERNEL_ASM(PYC_R0 PYC_R1 PYC_R2 PYC_R3 PYC_R4 PYC_R5,
                                   PYC_S0 PYC_S1 PYC_S2 PYC_S3 PYC_S4 PYC_S5);
  if (MR == 5) PYC_AVX2_KERNEL_ASM(PYC_R0 PYC_R1 PYC_R2 PYC_R3 PYC_R4,
                                   PYC_S0 PYC_S1 PYC_S2 PYC_S3 PYC_S4);
  if (MR == 4) PYC_AVX2_KERNEL_ASM(PYC_R0 PYC_R1 PYC_R2 PYC_R3, PYC_S0 PYC_S1 PYC_S2 PYC_S3);
  if (MR == 3) PYC_AVX2_KERNEL_ASM(PYC_R0 PYC_R1 PYC_R2, PYC_S0 PYC_S1 PYC_S2);
}

// Small-M variant: MR (<= 2) rows x all 16 columns of the panel in one pass, so each
// 64-byte group of the packed weight is read exactly once (GEMV-like, bandwidth bound).
template <int MR>
PYC_TARGET_AVX2 void kernel_avx2_n16(const int16_t* a, int64_t lda, const int8_t* b, int64_t nq,
                                     int32_t* t, int64_t ldt) {
  __m256i c[MR][4];
#pragma GCC unroll 2
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 4; ++j) c[r][j] = _mm256_setzero_si256();
  for (int64_t q = 0; q < nq; ++q) {
    const int8_t* bq = b + q * 64;
    __m256i bv[4];
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j)
      bv[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bq + 16 * j)));
#pragma GCC unroll 2
    for (int r = 0; r < MR; ++r) {
      const __m256i av = _mm256_set1_epi64x(load_i64(a + r * lda + 4 * q));
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) c[r][j] = _mm256_add_epi32(c[r][j], _mm256_madd_epi16(av, bv[j]));
    }
  }
#pragma GCC unroll 2
  for (int r = 0; r < MR; ++r) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(t + r * ldt),
                        _mm256_permute4x64_epi64(_mm256_hadd_epi32(c[r][0], c[r][1]), 0xD8));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(t + r * ldt + 8),
                        _mm256_permute4x64_epi64(_mm256_hadd_epi32(c[r][2], c[r][3]), 0xD8));
  }
}

PYC_TARGET_AVX2 void tile_avx2(int mr, const int16_t* a, int64_t lda, const int8_t* bp,
                               int64_t nq, int32_t* t, int64_t ldt) {
  if (mr == 1) return kernel_avx2_n16<1>(a, lda, bp, nq, t, ldt);
  if (mr == 2) return kernel_avx2_n16<2>(a, lda, bp, nq, t, ldt);
  for (int half = 0; half < 2; ++half) {
    const int8_t* b = bp + 32 * half;
    int32_t* th = t + 8 * half;
    switch (mr) {
      case 3: kernel_avx2<3>(a, lda, b, nq, th, ldt); break;
      case 4: kernel_avx2<4>(a, lda, b, nq, th, ldt); break;
      case 5: kernel_avx2<5>(a, lda, b, nq, th, ldt); break;
      default: kernel_avx2<6>(a, lda, b, nq, th, ldt); break;
    }
  }
}

#undef PYC_AVX2_KERNEL_ASM
#undef PYC_ASM_ROW
#undef PYC_ASM_STORE
#undef PYC_R0
#undef PYC_R1
#undef PYC_R2
#undef PYC_R3
#undef PYC_R4
#undef PYC_R5
#undef PYC_S0
#undef PYC_S1
#undef PYC_S2
#undef PYC_S3
#undef PYC_S4
#undef PYC_S5

// ---------------------------------------------------------------- AVX2 7-bit (u8 x s8) kernel

// MR (1..6) rows x all 16 columns of a panel. a: A + 64 as uint8 (row stride lda bytes),
// b: panel base (64 bytes per k-group: columns 0..7 then 8..15, 4 k each). Accumulators
// ymm4..ymm15 (two per row: columns 0..7, 8..15), ones (int16) in ymm0.
#define PYC_U8_ROW(A, C0, C1)                      \
  "vpbroadcastd " A ", %%ymm1\n\t"                 \
  "vpmaddubsw (%[b]), %%ymm1, %%ymm2\n\t"          \
  "vpmaddubsw 32(%[b]), %%ymm1, %%ymm3\n\t"        \
  "vpmaddwd %%ymm0, %%ymm2, %%ymm2\n\t"            \
  "vpmaddwd %%ymm0, %%ymm3, %%ymm3\n\t"            \
  "vpaddd %%ymm2, %%ymm" C0 ", %%ymm" C0 "\n\t"    \
  "vpaddd %%ymm3, %%ymm" C1 ", %%ymm" C1 "\n\t"
#define PYC_U8_STORE(C0, C1, DST0, DST1)  \
  "vmovdqu %%ymm" C0 ", " DST0 "\n\t"     \
  "vmovdqu %%ymm" C1 ", " DST1 "\n\t"
#define PYC_U0 PYC_U8_ROW("(%[pa])", "4", "5")
#define PYC_U1 PYC_U8_ROW("(%[pa],%[ld],1)", "6", "7")
#define PYC_U2 PYC_U8_ROW("(%[pa],%[ld],2)", "8", "9")
#define PYC_U3 PYC_U8_ROW("(%[pb])", "10", "11")
#define PYC_U4 PYC_U8_ROW("(%[pb],%[ld],1)", "12", "13")
#define PYC_U5 PYC_U8_ROW("(%[pb],%[ld],2)", "14", "15")
#define PYC_V0 PYC_U8_STORE("4", "5", "(%[t])", "32(%[t])")
#define PYC_V1 PYC_U8_STORE("6", "7", "(%[t],%[ldt],1)", "32(%[t],%[ldt],1)")
#define PYC_V2 PYC_U8_STORE("8", "9", "(%[t],%[ldt],2)", "32(%[t],%[ldt],2)")
#define PYC_V3 PYC_U8_STORE("10", "11", "(%[t3])", "32(%[t3])")
#define PYC_V4 PYC_U8_STORE("12", "13", "(%[t3],%[ldt],1)", "32(%[t3],%[ldt],1)")
#define PYC_V5 PYC_U8_STORE("14", "15", "(%[t3],%[ldt],2)", "32(%[t3],%[ldt],2)")
#define PYC_U8_KERNEL_ASM(ROWS, STORES)                                                        \
  asm volatile(                                                                                \
      PYC_ASM_ONES_Y0                                                                    \
      PYC_ASM_ZERO_4_5 PYC_ASM_ZERO_6_15                                                 \
      "test %[n], %[n]\n\t"                                                                    \
      "jle 2f\n\t"                                                                             \
      ".p2align 6\n\t"                                                                         \
      "1:\n\t" ROWS                                                                            \
      "add $64, %[b]\n\t"                                                                      \
      "add $4, %[pa]\n\t"                                                                      \
      "add $4, %[pb]\n\t"                                                                      \
      "dec %[n]\n\t"                                                                           \
      "jnz 1b\n\t"                                                                             \
      "2:\n\t" STORES                                                                          \
      : [b] "+r"(bq), [pa] "+r"(pa), [pb] "+r"(pb), [n] "+r"(cnt)                              \
      : [ld] "r"(lda), [t] "r"(t), [t3] "r"(t + 3 * ldt), [ldt] "r"(ldt * 4)                   \
      : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9",        \
        "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "cc", "memory")

template <int MR>
PYC_TARGET_AVX2 void kernel_avx2_u8(const uint8_t* a, int64_t lda, const int8_t* b, int64_t nq,
                                    int32_t* t, int64_t ldt) {
  static_assert(MR >= 1 && MR <= 6, "kernel_avx2_u8 handles 1..6 rows");
  const int8_t* bq = b;
  const uint8_t* pa = a;
  const uint8_t* pb = a + 3 * lda;  // only dereferenced for MR > 3
  int64_t cnt = nq;
  if (MR == 6) PYC_U8_KERNEL_ASM(PYC_U0 PYC_U1 PYC_U2 PYC_U3 PYC_U4 PYC_U5,
                                 PYC_V0 PYC_V1 PYC_V2 PYC_V3 PYC_V4 PYC_V5);
  if (MR == 5) PYC_U8_KERNEL_ASM(PYC_U0 PYC_U1 PYC_U2 PYC_U3 PYC_U4,
                                 PYC_V0 PYC_V1 PYC_V2 PYC_V3 PYC_V4);
  if (MR == 4) PYC_U8_KERNEL_ASM(PYC_U0 PYC_U1 PYC_U2 PYC_U3, PYC_V0 PYC_V1 PYC_V2 PYC_V3);
  if (MR == 3) PYC_U8_KERNEL_ASM(PYC_U0 PYC_U1 PYC_U2, PYC_V0 PYC_V1 PYC_V2);
  // 1-2 rows stream the weight once (bandwidth bound): prefetch 16 k-groups ahead
  if (MR == 2) PYC_U8_KERNEL_ASM("prefetcht0 1024(%[b])\n\t" PYC_U0 PYC_U1, PYC_V0 PYC_V1);
  if (MR == 1) PYC_U8_KERNEL_ASM("prefetcht0 1024(%[b])\n\t" PYC_U0, PYC_V0);
}

template <int MR>
PYC_TARGET_AVX2 void kernel_avx2_u8_pair(const uint8_t* a, int64_t lda, const int8_t* b,
                                         int64_t nq, int32_t* t, int64_t ldt);

// narrow: every weight of the panel is in [-64, 64] and A + 64 <= 127 (the int16 pair-sum
// kernel, at most 5 rows). shift: log2 of the offset added to A (6: A + 64, 7: A + 128).
PYC_TARGET_AVX2 void tile_avx2_u8(int mr, const uint8_t* a, int64_t lda, const int8_t* bp,
                                  const int32_t* colsum, int64_t nq, int32_t* t, int64_t ldt,
                                  bool narrow, int shift) {
  if (narrow) {
    switch (mr) {
      case 1: kernel_avx2_u8_pair<1>(a, lda, bp, nq, t, ldt); break;
      case 2: kernel_avx2_u8_pair<2>(a, lda, bp, nq, t, ldt); break;
      case 3: kernel_avx2_u8_pair<3>(a, lda, bp, nq, t, ldt); break;
      case 4: kernel_avx2_u8_pair<4>(a, lda, bp, nq, t, ldt); break;
      default: kernel_avx2_u8_pair<5>(a, lda, bp, nq, t, ldt); break;
    }
  } else {
    switch (mr) {
      case 1: kernel_avx2_u8<1>(a, lda, bp, nq, t, ldt); break;
      case 2: kernel_avx2_u8<2>(a, lda, bp, nq, t, ldt); break;
      case 3: kernel_avx2_u8<3>(a, lda, bp, nq, t, ldt); break;
      case 4: kernel_avx2_u8<4>(a, lda, bp, nq, t, ldt); break;
      case 5: kernel_avx2_u8<5>(a, lda, bp, nq, t, ldt); break;
      default: kernel_avx2_u8<6>(a, lda, bp, nq, t, ldt); break;
    }
  }
  // (a + 2^shift) * b summed = a * b summed + 2^shift * colsum (modulo 2^32); applied once, by
  // the first K block (colsum == nullptr for the others)
  if (colsum == nullptr) return;
  const __m128i sh = _mm_cvtsi32_si128(shift);
  const __m256i c0 = _mm256_sll_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(colsum)), sh);
  const __m256i c1 =
      _mm256_sll_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(colsum + 8)), sh);
  for (int r = 0; r < mr; ++r) {
    __m256i* tr = reinterpret_cast<__m256i*>(t + r * ldt);
    _mm256_storeu_si256(tr, _mm256_sub_epi32(_mm256_loadu_si256(tr), c0));
    _mm256_storeu_si256(tr + 1, _mm256_sub_epi32(_mm256_loadu_si256(tr + 1), c1));
  }
}

#undef PYC_U8_KERNEL_ASM
#undef PYC_U0
#undef PYC_U1
#undef PYC_U2
#undef PYC_U3
#undef PYC_U4
#undef PYC_U5
#undef PYC_V0
#undef PYC_V1
#undef PYC_V2
#undef PYC_V3
#undef PYC_V4
#undef PYC_V5

// ---------------------------------------------------------------- AVX2 7-bit x 7-bit kernel

// Panels whose weights all lie in [-64, 64] (7-bit weights), with 7-bit activations: four
// products (A + 64) * B of one column sum to at most 4 * 127 * 64 = 32512 in magnitude, so the
// int16 pair sums of two k-groups are added (vpaddw, exact) before one vpmaddwd widens them.
// Three multiplies per 128 multiply-adds instead of four per 128: on Zen 3 the two vector
// multiply pipes bound the other kernel at 32 multiply-adds per cycle and this one at 42.7.
// MR (1..5) rows x 16 columns; accumulators ymm6..ymm15, ones in ymm0, products in ymm2..ymm5.
// One iteration takes two k-groups (128 bytes of the panel); an odd last group runs once
// through the one-group row of the 7-bit kernel (PYC_U8_ROW).
#define PYC_P_ROW(A0, A1, C0, C1)                  \
  "vpbroadcastd " A0 ", %%ymm1\n\t"                \
  "vpmaddubsw (%[b]), %%ymm1, %%ymm2\n\t"          \
  "vpmaddubsw 32(%[b]), %%ymm1, %%ymm3\n\t"        \
  "vpbroadcastd " A1 ", %%ymm1\n\t"                \
  "vpmaddubsw 64(%[b]), %%ymm1, %%ymm4\n\t"        \
  "vpmaddubsw 96(%[b]), %%ymm1, %%ymm5\n\t"        \
  "vpaddw %%ymm4, %%ymm2, %%ymm2\n\t"              \
  "vpaddw %%ymm5, %%ymm3, %%ymm3\n\t"              \
  "vpmaddwd %%ymm0, %%ymm2, %%ymm2\n\t"            \
  "vpmaddwd %%ymm0, %%ymm3, %%ymm3\n\t"            \
  "vpaddd %%ymm2, %%ymm" C0 ", %%ymm" C0 "\n\t"    \
  "vpaddd %%ymm3, %%ymm" C1 ", %%ymm" C1 "\n\t"
#define PYC_P0 PYC_P_ROW("(%[pa])", "4(%[pa])", "6", "7")
#define PYC_P1 PYC_P_ROW("(%[pa],%[ld],1)", "4(%[pa],%[ld],1)", "8", "9")
#define PYC_P2 PYC_P_ROW("(%[pa],%[ld],2)", "4(%[pa],%[ld],2)", "10", "11")
#define PYC_P3 PYC_P_ROW("(%[pb])", "4(%[pb])", "12", "13")
#define PYC_P4 PYC_P_ROW("(%[pb],%[ld],1)", "4(%[pb],%[ld],1)", "14", "15")
#define PYC_O0 PYC_U8_ROW("(%[pa])", "6", "7")
#define PYC_O1 PYC_U8_ROW("(%[pa],%[ld],1)", "8", "9")
#define PYC_O2 PYC_U8_ROW("(%[pa],%[ld],2)", "10", "11")
#define PYC_O3 PYC_U8_ROW("(%[pb])", "12", "13")
#define PYC_O4 PYC_U8_ROW("(%[pb],%[ld],1)", "14", "15")
#define PYC_Q0 PYC_U8_STORE("6", "7", "(%[t])", "32(%[t])")
#define PYC_Q1 PYC_U8_STORE("8", "9", "(%[t],%[ldt],1)", "32(%[t],%[ldt],1)")
#define PYC_Q2 PYC_U8_STORE("10", "11", "(%[t],%[ldt],2)", "32(%[t],%[ldt],2)")
#define PYC_Q3 PYC_U8_STORE("12", "13", "(%[t3])", "32(%[t3])")
#define PYC_Q4 PYC_U8_STORE("14", "15", "(%[t3],%[ldt],1)", "32(%[t3],%[ldt],1)")
#define PYC_P_KERNEL_ASM(ROWS, ONE, STORES)                                                    \
  asm volatile(                                                                                \
      PYC_ASM_ONES_Y0                                                                    \
      PYC_ASM_ZERO_6_15                                                                  \
      "test %[n], %[n]\n\t"                                                                    \
      "jle 2f\n\t"                                                                             \
      ".p2align 6\n\t"                                                                         \
      "1:\n\t" ROWS                                                                            \
      "add $128, %[b]\n\t"                                                                     \
      "add $8, %[pa]\n\t"                                                                      \
      "add $8, %[pb]\n\t"                                                                      \
      "dec %[n]\n\t"                                                                           \
      "jnz 1b\n\t"                                                                             \
      "2:\n\t"                                                                                 \
      "test %[odd], %[odd]\n\t"                                                                \
      "jz 3f\n\t" ONE                                                                          \
      "3:\n\t" STORES                                                                          \
      : [b] "+r"(bq), [pa] "+r"(pa), [pb] "+r"(pb), [n] "+r"(pairs)                            \
      : [ld] "r"(lda), [t] "r"(t), [t3] "r"(t + 3 * ldt), [ldt] "r"(ldt * 4), [odd] "r"(odd)   \
      : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9",        \
        "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "cc", "memory")

template <int MR>
PYC_TARGET_AVX2 void kernel_avx2_u8_pair(const uint8_t* a, int64_t lda, const int8_t* b,
                                         int64_t nq, int32_t* t, int64_t ldt) {
  static_assert(MR >= 1 && MR <= 5, "kernel_avx2_u8_pair handles 1..5 rows");
  const int8_t* bq = b;
  const uint8_t* pa = a;
  const uint8_t* pb = a + 3 * lda;  // only dereferenced for MR > 3
  int64_t pairs = nq / 2;
  const int64_t odd = nq & 1;
  if (MR == 5) PYC_P_KERNEL_ASM(PYC_P0 PYC_P1 PYC_P2 PYC_P3 PYC_P4,
                                PYC_O0 PYC_O1 PYC_O2 PYC_O3 PYC_O4,
                                PYC_Q0 PYC_Q1 PYC_Q2 PYC_Q3 PYC_Q4);
  if (MR == 4) PYC_P_KERNEL_ASM(PYC_P0 PYC_P1 PYC_P2 PYC_P3, PYC_O0 PYC_O1 PYC_O2 PYC_O3,
                                PYC_Q0 PYC_Q1 PYC_Q2 PYC_Q3);
  if (MR == 3) PYC_P_KERNEL_ASM(PYC_P0 PYC_P1 PYC_P2, PYC_O0 PYC_O1 PYC_O2, PYC_Q0 PYC_Q1 PYC_Q2);
  // 1-2 rows stream the weight once (bandwidth bound): prefetch 8 pairs of k-groups ahead
  if (MR == 2)
    PYC_P_KERNEL_ASM("prefetcht0 1024(%[b])\n\tprefetcht0 1088(%[b])\n\t" PYC_P0 PYC_P1,
                     PYC_O0 PYC_O1, PYC_Q0 PYC_Q1);
  if (MR == 1)
    PYC_P_KERNEL_ASM("prefetcht0 1024(%[b])\n\tprefetcht0 1088(%[b])\n\t" PYC_P0, PYC_O0, PYC_Q0);
}

#undef PYC_P_KERNEL_ASM
#undef PYC_P_ROW
#undef PYC_U8_ROW
#undef PYC_U8_STORE
#undef PYC_ASM_ONES_Y0
#undef PYC_ASM_ZERO_4_5
#undef PYC_ASM_ZERO_6_15
#undef PYC_P0
#undef PYC_P1
#undef PYC_P2
#undef PYC_P3
#undef PYC_P4
#undef PYC_O0
#undef PYC_O1
#undef PYC_O2
#undef PYC_O3
#undef PYC_O4
#undef PYC_Q0
#undef PYC_Q1
#undef PYC_Q2
#undef PYC_Q3
#undef PYC_Q4

// ---------------------------------------------------------------- AVX-512 VNNI kernel

// A register tile of MR rows x NP panels (16 columns each): MR * NP zmm accumulators. Each
// k-group is NP 64-byte weight loads, MR 4-byte broadcasts of A and MR * NP vpdpbusd. vpdpbusd
// has a latency of about 5 cycles at two per cycle, so 8 independent accumulators (8 rows x one
// panel) leave the multiply ports idle part of the time and spend more than one load per
// multiply; 12 rows x 2 panels (24 accumulators, 14 loads per 24 multiplies) keep both busy and
// leave 8 registers for the weights and the broadcasts.
// b: the first panel's k-group base; bstride: bytes from one panel to the next (Kp * 16).
// cin (row stride ldc): partial sums the accumulators start from (the earlier K blocks), or
// nullptr for zero. colsum (or nullptr): the A + 128 compensation, applied once per output.
// Results (int32) go to t, row stride ldt, panel j at t + 16 * j. pf (or nullptr): two panels
// (bstride apart) whose k-groups are prefetched into L2 alongside.
constexpr int kMrVnniTile = 12;
constexpr int kNpVnni = 2;

template <int MR, int NP>
PYC_TARGET_AVX512VNNI void kernel_vnni(const uint8_t* a, int64_t lda, const int8_t* b,
                                       int64_t bstride, const int32_t* colsum, int64_t nq,
                                       const int32_t* cin, int64_t ldc, int32_t* t, int64_t ldt,
                                       const int8_t* pf = nullptr) {
  static_assert(MR >= 1 && MR <= kMrVnniTile && NP >= 1 && NP <= kNpVnni, "VNNI tile shape");
  __m512i acc[MR][NP];
  if (cin != nullptr) {
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
      for (int j = 0; j < NP; ++j) acc[r][j] = _mm512_loadu_si512(cin + r * ldc + 16 * j);
  } else {
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
      for (int j = 0; j < NP; ++j) acc[r][j] = _mm512_setzero_si512();
  }
  const int8_t* b1 = b + (NP > 1 ? bstride : 0);
  for (int64_t q = 0; q < nq; ++q) {
    __m512i bv[NP];
    bv[0] = _mm512_loadu_si512(b + q * 64);
    if (NP > 1) bv[NP - 1] = _mm512_loadu_si512(b1 + q * 64);
    if (pf != nullptr) {
      _mm_prefetch(reinterpret_cast<const char*>(pf + q * 64), _MM_HINT_T1);
      _mm_prefetch(reinterpret_cast<const char*>(pf + bstride + q * 64), _MM_HINT_T1);
    }
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      const __m512i av = _mm512_set1_epi32(load_i32(a + r * lda + 4 * q));
#pragma GCC unroll 2
      for (int j = 0; j < NP; ++j) acc[r][j] = _mm512_dpbusd_epi32(acc[r][j], av, bv[j]);
    }
  }
  // (a + 128) * b summed = a * b summed + 128 * colsum (all modulo 2^32)
  if (colsum != nullptr) {
#pragma GCC unroll 2
    for (int j = 0; j < NP; ++j) {
      const __m512i comp = _mm512_slli_epi32(_mm512_loadu_si512(colsum + 16 * j), 7);
#pragma GCC unroll 12
      for (int r = 0; r < MR; ++r) acc[r][j] = _mm512_sub_epi32(acc[r][j], comp);
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 2
    for (int j = 0; j < NP; ++j) _mm512_storeu_si512(t + r * ldt + 16 * j, acc[r][j]);
}

using VnniKernel = void (*)(const uint8_t*, int64_t, const int8_t*, int64_t, const int32_t*,
                            int64_t, const int32_t*, int64_t, int32_t*, int64_t, const int8_t*);

template <int NP, int... R>
constexpr std::array<VnniKernel, sizeof...(R)> vnni_kernels(std::integer_sequence<int, R...>) {
  return {&kernel_vnni<R + 1, NP>...};
}

// kernel_vnni<mr, np> for mr in 1..12, np in 1..2
PYC_TARGET_AVX512VNNI void tile_vnni_np(int mr, int np, const uint8_t* a, int64_t lda,
                                        const int8_t* b, int64_t bstride, const int32_t* colsum,
                                        int64_t nq, const int32_t* cin, int64_t ldc, int32_t* t,
                                        int64_t ldt, const int8_t* pf = nullptr) {
  static constexpr auto k1 = vnni_kernels<1>(std::make_integer_sequence<int, kMrVnniTile>{});
  static constexpr auto k2 = vnni_kernels<2>(std::make_integer_sequence<int, kMrVnniTile>{});
  (np == 2 ? k2 : k1)[mr - 1](a, lda, b, bstride, colsum, nq, cin, ldc, t, ldt, pf);
}

// mr (1..8) rows x one panel (the AMX driver's M % 16 rows)
PYC_TARGET_AVX512VNNI void tile_vnni(int mr, const uint8_t* a, int64_t lda, const int8_t* bp,
                                     const int32_t* colsum, int64_t nq, int32_t* t, int64_t ldt) {
  tile_vnni_np(std::min(mr, kMrVnni), 1, a, lda, bp, 0, colsum, nq, nullptr, 0, t, ldt);
}

// ---------------------------------------------------------------- AVX-512 epilogue

PYC_TARGET_AVX512 inline void store16_avx512(void* out, int64_t i, DType dt, __m512 v) {
  switch (dt) {
    case DType::F32:
      _mm512_storeu_ps(static_cast<float*>(out) + i, v);
      break;
    case DType::F16:
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + i),
                          _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
      break;
    case DType::BF16:
    default:
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + i),
                          pyc_cvt_f32_bf16_avx512(v));
      break;
  }
}

// Float output of full 16-column panels (nc a multiple of 16). The explicitly rounded multiply
// and add (embedded rounding, to nearest) are builtins the compiler never contracts into an FMA,
// so every step is rounded as in epilogue_scalar and epilogue_avx2.
PYC_TARGET_AVX512 void epilogue_avx512_full(const Int8Epilogue& ep, const int32_t* tile,
                                            int64_t ldt, int64_t m0, int64_t mr, int64_t n0,
                                            int64_t nc) {
  constexpr int kRn = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  for (int64_t r = 0; r < mr; ++r) {
    const int64_t m = m0 + r;
    if (std::fabs(ep.a_scale[m]) > kLargeActScale) {
      epilogue_large_row(ep, tile + r * ldt, m, n0, nc);
      continue;
    }
    const __m512 xs = _mm512_set1_ps(ep.a_scale[m]);
    for (int64_t j = 0; j < nc; j += 16) {
      const int64_t n = n0 + j;
      __m512 v = _mm512_cvtepi32_ps(_mm512_loadu_si512(tile + r * ldt + j));
      v = _mm512_mul_round_ps(v, xs, kRn);
      v = _mm512_mul_round_ps(v, _mm512_loadu_ps(ep.w_scale + n), kRn);
      if (ep.bias) v = _mm512_add_round_ps(v, _mm512_loadu_ps(ep.bias + n), kRn);
      store16_avx512(ep.out, m * ep.ldo + n, ep.out_dtype, v);
    }
  }
}

// Tiles of the VNNI path (up to kNpVnni panels): full panels of a float output take the AVX-512
// epilogue, the rest (int32 output, the last partial panel) the AVX2 one; a tile callback sees
// one panel at a time.
PYC_TARGET_AVX512 void epilogue_vnni(const Int8Epilogue& ep, const int32_t* tile, int64_t ldt,
                                     int64_t m0, int64_t mr, int64_t n0, int64_t nc) {
  if (ep.tile_fn != nullptr) {
    for (int64_t j = 0; j < nc; j += kInt8PanelCols)
      ep.tile_fn(ep.tile_ctx, tile + j, ldt, m0, mr, n0 + j,
                 std::min<int64_t>(kInt8PanelCols, nc - j));
    return;
  }
  const int64_t full = ep.out != nullptr ? nc / kInt8PanelCols * kInt8PanelCols : 0;
  if (full > 0) epilogue_avx512_full(ep, tile, ldt, m0, mr, n0, full);
  if (full < nc) epilogue_avx2(ep, tile + full, ldt, m0, mr, n0 + full, nc - full);
}

#endif  // PYC_HAVE_X86_SIMD

}  // namespace

#if PYC_HAVE_X86_SIMD
namespace int8_detail {
void tile_vnni(int mr, const uint8_t* a, int64_t lda, const int8_t* bp, const int32_t* colsum,
               int64_t nq, int32_t* t, int64_t ldt) {
  pyc::tile_vnni(mr, a, lda, bp, colsum, nq, t, ldt);
}
void epilogue_simd(const Int8Epilogue& ep, const int32_t* tile, int64_t ldt, int64_t m0,
                   int64_t mr, int64_t n0, int64_t nc) {
  static const bool avx512 = cpu_features().avx512f && cpu_features().avx512bw &&
                             cpu_features().avx512vl && cpu_features().avx512dq &&
                             cpu_features().os_avx512;
  if (avx512) return epilogue_vnni(ep, tile, ldt, m0, mr, n0, nc);
  epilogue_avx2(ep, tile, ldt, m0, mr, n0, nc);
}
}  // namespace int8_detail
#endif

namespace {

// ---------------------------------------------------------------- scalar kernel

void tile_scalar(int mr, const int16_t* a, int64_t lda, const int8_t* bp, int64_t nq, int32_t* t,
                 int64_t ldt) {
  for (int r = 0; r < mr; ++r) {
    int32_t acc[kInt8PanelCols] = {};
    const int16_t* ar = a + r * lda;
    for (int64_t q = 0; q < nq; ++q) {
      const int8_t* bq = bp + q * 64;
      const int32_t a0 = ar[4 * q], a1 = ar[4 * q + 1], a2 = ar[4 * q + 2], a3 = ar[4 * q + 3];
      for (int c = 0; c < kInt8PanelCols; ++c) {
        const int8_t* w = bq + 4 * c;
        acc[c] += a0 * w[0] + a1 * w[1] + a2 * w[2] + a3 * w[3];
      }
    }
    std::memcpy(t + r * ldt, acc, sizeof acc);
  }
}

// Each panel's max |B| in the packed form (see int8/gemm.h): after the Np column sums.
inline const int32_t* packed_panel_max(const int8_t* packed, int64_t N, int64_t K) {
  const int64_t Np = int8_round_n(N);
  return reinterpret_cast<const int32_t*>(packed + Np * int8_round_k(K)) + Np;
}

int mr_of(int path) {
  return path >= 3 ? kMrAvx2U8 : (path == 2 ? kMrVnni : (path == 1 ? kMrAvx2 : kMrScalar));
}

}  // namespace

void int8_pack_b(const int8_t* b, int64_t ldb, int64_t N, int64_t K, int8_t* packed, int64_t p0,
                 int64_t p1) {
  const int64_t Kp = int8_round_k(K), Np = int8_round_n(N);
  int32_t* colsum = reinterpret_cast<int32_t*>(packed + Np * Kp);
  int32_t* panel_max = colsum + Np;
  for (int64_t p = p0; p < p1; ++p) {
    int8_t* dst = packed + p * Kp * kInt8PanelCols;
    std::memset(dst, 0, static_cast<size_t>(Kp * kInt8PanelCols));
    int32_t pmax = 0;
    for (int c = 0; c < kInt8PanelCols; ++c) {
      const int64_t n = p * kInt8PanelCols + c;
      int32_t sum = 0;
      if (n < N) {
        const int8_t* src = b + n * ldb;
        for (int64_t k = 0; k < K; ++k) {
          dst[(k >> 2) * 64 + c * 4 + (k & 3)] = src[k];
          sum += src[k];
          pmax = std::max<int32_t>(pmax, src[k] < 0 ? -int32_t(src[k]) : int32_t(src[k]));
        }
      }
      std::memcpy(colsum + n, &sum, sizeof sum);
    }
    panel_max[p] = pmax;
  }
}

int int8_gemm_path(int isa, bool act7, bool narrow_b) {
#if PYC_HAVE_X86_SIMD
  // the amx level is only in effect where AMX-INT8 is usable (max_cpu_isa)
  if (isa >= static_cast<int>(CpuIsa::Amx) && cpu_features().os_amx && cpu_features().amx_int8)
    return kInt8PathAmx;
  if (isa >= 2 && cpu_features().avx512vnni) return 2;
  if (isa >= 1) return act7 ? 3 : (narrow_b ? 4 : 1);
#else
  (void)isa;
  (void)act7;
  (void)narrow_b;
#endif
  return 0;
}

bool int8_packed_narrow(const int8_t* packed, int64_t N, int64_t K) {
  const int32_t* panel_max = packed_panel_max(packed, N, K);
  return *std::max_element(panel_max, panel_max + int8_round_n(N) / kInt8PanelCols) <=
         kNarrowWeightMax;
}

int64_t int8_a_row_bytes(int path, int64_t K) {
  const int64_t Kp = int8_round_k(K);
  // rows padded to 64 bytes so every row starts on its own cache line
  const int64_t bytes = path >= 2 ? Kp : 2 * Kp;
  const int64_t rb = (bytes + 63) / 64 * 64;
  // AMX loads 16 rows at a time: a stride of an odd number of cache lines puts them in
  // different L1 sets (a multiple of 4096 bytes would put all of them in one)
  if (path == kInt8PathAmx && (rb / 64) % 2 == 0) return rb + 64;
  return rb;
}

void int8_prepare_a(int path, const int8_t* a, int64_t lda, int64_t K, void* ap, int64_t m0,
                    int64_t m1) {
  const int64_t rb = int8_a_row_bytes(path, K);
  for (int64_t m = m0; m < m1; ++m) {
    const int8_t* src = a + m * lda;
    if (path == 2 || path == 4 || path == kInt8PathAmx) {
      uint8_t* dst = static_cast<uint8_t*>(ap) + m * rb;
      for (int64_t k = 0; k < K; ++k) dst[k] = static_cast<uint8_t>(src[k] ^ 0x80);
      std::memset(dst + K, 0x80, static_cast<size_t>(rb - K));
    } else if (path == 3) {
      // A in [-64, 63] (7-bit activations) -> A + 64 in [0, 127]
      uint8_t* dst = static_cast<uint8_t*>(ap) + m * rb;
      for (int64_t k = 0; k < K; ++k) dst[k] = static_cast<uint8_t>(src[k] + 64);
      std::memset(dst + K, 64, static_cast<size_t>(rb - K));
    } else {
      int16_t* dst = reinterpret_cast<int16_t*>(static_cast<uint8_t*>(ap) + m * rb);
      for (int64_t k = 0; k < K; ++k) dst[k] = src[k];
      std::memset(dst + K, 0, static_cast<size_t>(rb - 2 * K));
    }
  }
}

int64_t int8_gemm_kc(int path, int64_t M, int64_t K) {
  const int64_t Kp = int8_round_k(K);
  // Without K blocking every row block of prepared A must stay in L2 while the panels
  // stream; when M * K is large, K is cut into blocks of 2048 and partial sums go through the
  // int32 workspace. Longer blocks mean fewer micro-kernel calls and less workspace traffic per
  // multiply-add; on Zen 3 (1 thread, K = N = 4096, M = 128..2048) blocks of 2048 beat 512 by
  // 11-15% on the 8-bit path and match 1024 on the 7-bit path, with row blocks of 192. The
  // VNNI path runs its K blocks inside the panel loop (see gemm_packed_vnni), where blocks of
  // 512 to 4096 measured the same on Emerald Rapids (1 thread, K = N = 4096, M = 128 and 512).
  // The AMX path accumulates whole K in its tiles (no workspace).
  if (path == kInt8PathAmx) return Kp;
  if (M * int8_a_row_bytes(path, K) <= (int64_t(256) << 10) || Kp <= 768) return Kp;
  return path == 2 ? 512 : std::min<int64_t>(2048, Kp);
}

#if PYC_HAVE_X86_SIMD
namespace {

// Path 2: tiles of up to kMrVnniTile rows x kNpVnni panels. Per row block the panels are taken
// kNpVnni at a time, and for each K block of them every row tile of the block passes over it
// while it is in L1; the row block itself (all of K) stays in L2. The partial sums of the K
// blocks meet in the workspace, which the kernel reads and writes itself; for one pair of panels
// they are at most 192 x 32 int32 and stay in L1 (K blocks outside the panel loop would send a
// whole [rows, N] slab of them through memory once per K block).
void gemm_packed_vnni(const uint8_t* abase, const int8_t* packed, int64_t M, int64_t N,
                      int64_t K, int64_t p0, int64_t p1, const Int8Epilogue& ep,
                      int32_t* workspace, int64_t rb) {
  const int64_t Kp = int8_round_k(K), Np = int8_round_n(N);
  const int32_t* colsum = reinterpret_cast<const int32_t*>(packed + Np * Kp);
  const int64_t kc = workspace ? int8_gemm_kc(2, M, K) : Kp;
  // the whole K extent of a row block stays in L2 while the panels pass: at most 768 KiB of it
  const int64_t mc = std::clamp<int64_t>(((int64_t(768) << 10) / rb) / 24 * 24, 24, 192);
  const int64_t bstride = Kp * kInt8PanelCols;
  alignas(64) int32_t tile[kMrVnniTile * kNpVnni * kInt8PanelCols];
  for (int64_t mc0 = 0; mc0 < M; mc0 += mc) {
    const int64_t mc1 = std::min(M, mc0 + mc);
    // the rows of the block are shared evenly between ceil(rows / kMrVnniTile) tiles
    // (16 rows: 8 + 8, not 12 + 4)
    const int64_t rows = mc1 - mc0, ntiles = (rows + kMrVnniTile - 1) / kMrVnniTile;
    for (int64_t p = p0; p < p1; p += kNpVnni) {
      const int np = static_cast<int>(std::min<int64_t>(kNpVnni, p1 - p));
      const int64_t n0 = p * kInt8PanelCols;
      const int64_t nc = std::min<int64_t>(np * kInt8PanelCols, N - n0);
      for (int64_t k0 = 0; k0 < Kp; k0 += kc) {
        const int64_t nq = std::min(kc, Kp - k0) / 4;
        const bool first = k0 == 0, last = k0 + kc >= Kp;
        const int8_t* bp = packed + p * bstride + k0 * kInt8PanelCols;
        for (int64_t ti = 0, m_next = mc0; ti < ntiles; ++ti) {
          const int mr = static_cast<int>(rows / ntiles + (ti < rows % ntiles ? 1 : 0));
          const int64_t m = m_next;
          m_next += mr;
          int32_t* w = workspace ? workspace + m * Np + n0 : nullptr;
          int32_t* t = last ? tile : w;
          const int64_t ldt = last ? np * kInt8PanelCols : Np;
          // the last tile over a pair of panels fetches the next pair's K block into L2, so that
          // the first tile over it does not wait on memory (1 thread, K = N = 4096 on Emerald
          // Rapids: about 6% at M = 16, 2-3% at M = 128)
          const int8_t* pf =
              ti + 1 == ntiles && np == 2 && p + 2 * kNpVnni <= p1 ? bp + 2 * bstride : nullptr;
          tile_vnni_np(mr, np, abase + m * rb + k0, rb, bp, bstride, first ? colsum + n0 : nullptr,
                       nq, first ? nullptr : w, Np, t, ldt, pf);
          if (last) epilogue_vnni(ep, tile, ldt, m, mr, n0, nc);
        }
      }
    }
  }
}

}  // namespace
#endif

void int8_gemm_packed(int path, const void* ap, const int8_t* packed, int64_t M, int64_t N,
                      int64_t K, int64_t p0, int64_t p1, const Int8Epilogue& ep,
                      int32_t* workspace, int64_t lda) {
#if PYC_HAVE_X86_SIMD
  if (path == kInt8PathAmx) return int8_gemm_packed_amx(ap, packed, M, N, K, p0, p1, ep, lda);
  if (path == 2)
    return gemm_packed_vnni(static_cast<const uint8_t*>(ap), packed, M, N, K, p0, p1, ep,
                            workspace, lda > 0 ? lda : int8_a_row_bytes(path, K));
#endif
  const int64_t Kp = int8_round_k(K), Np = int8_round_n(N);
  const int32_t* colsum = reinterpret_cast<const int32_t*>(packed + Np * Kp);
  const int32_t* panel_max = packed_panel_max(packed, N, K);
  const int64_t rb = lda > 0 ? lda : int8_a_row_bytes(path, K);
  const int64_t a_elem = path >= 2 ? 1 : 2;  // bytes per prepared A element
  const int64_t kc = workspace ? int8_gemm_kc(path, M, K) : Kp;
  const bool blocked = kc < Kp;
  const int64_t mc = blocked ? 192 : std::max<int64_t>(24, ((int64_t(192) << 10) / rb) / 24 * 24);
  static_assert(kMrVnni >= kMrAvx2 && kMrVnni >= kMrAvx2U8 && kMrVnni >= kMrAvx2U8Pair &&
                    kMrVnni >= kMrScalar,
                "tile holds the tallest micro-kernel");
  alignas(64) int32_t tile[kMrVnni * kInt8PanelCols];
  const uint8_t* abase = static_cast<const uint8_t*>(ap);
  for (int64_t mc0 = 0; mc0 < M; mc0 += mc) {
    const int64_t mc1 = std::min(M, mc0 + mc);
    for (int64_t k0 = 0; k0 < Kp; k0 += kc) {
      const int64_t nq = std::min(kc, Kp - k0) / 4;
      const bool first = k0 == 0, last = k0 + kc >= Kp;
      for (int64_t p = p0; p < p1; ++p) {
        const int8_t* bp = packed + p * Kp * kInt8PanelCols + k0 * kInt8PanelCols;
        const int64_t n0 = p * kInt8PanelCols;
        const int64_t nc = std::min<int64_t>(kInt8PanelCols, N - n0);
        const bool narrow = path == 3 && panel_max[p] <= kNarrowWeightMax;
        const int mrmax = narrow ? kMrAvx2U8Pair : mr_of(path);
        // the rows of the block are shared evenly between ceil(rows / mrmax) tiles
        // (16 rows with tiles of at most 5: 4 + 4 + 4 + 4, not 5 + 5 + 5 + 1)
        const int64_t rows = mc1 - mc0, ntiles = (rows + mrmax - 1) / mrmax;
        for (int64_t ti = 0, m_next = mc0; ti < ntiles; ++ti) {
          const int mr = static_cast<int>(rows / ntiles + (ti < rows % ntiles ? 1 : 0));
          const int64_t m = m_next;
          m_next += mr;
          const uint8_t* am = abase + m * rb + k0 * a_elem;
#if PYC_HAVE_X86_SIMD
          if (path == 3 || path == 4)
            tile_avx2_u8(mr, am, rb, bp, first ? colsum + n0 : nullptr, nq, tile, kInt8PanelCols,
                         narrow, path == 3 ? 6 : 7);
          else if (path == 1)
            tile_avx2(mr, reinterpret_cast<const int16_t*>(am), rb / 2, bp, nq, tile,
                      kInt8PanelCols);
          else
#endif
            tile_scalar(mr, reinterpret_cast<const int16_t*>(am), rb / 2, bp, nq, tile,
                        kInt8PanelCols);
          if (blocked) {
            // partial sums of the K blocks meet in the workspace ([M, Np] int32)
            for (int r = 0; r < mr; ++r) {
              int32_t* w = workspace + (m + r) * Np + n0;
              int32_t* t = tile + r * kInt8PanelCols;
              if (first) {
                std::memcpy(w, t, sizeof(int32_t) * kInt8PanelCols);
              } else if (!last) {
                for (int j = 0; j < kInt8PanelCols; ++j) w[j] += t[j];
              } else {
                for (int j = 0; j < kInt8PanelCols; ++j) t[j] += w[j];
              }
            }
            if (!last) continue;
          }
#if PYC_HAVE_X86_SIMD
          if (path >= 1) {
            epilogue_avx2(ep, tile, kInt8PanelCols, m, mr, n0, nc);
            continue;
          }
#endif
          epilogue_scalar(ep, tile, kInt8PanelCols, m, mr, n0, nc);
        }
      }
    }
  }
}

// ---------------------------------------------------------------- w8a16

namespace {

void w8a16_scalar(const float* x, int64_t ldx, const int8_t* w, int64_t ldw, const float* ws,
                  const float* bias, void* out, DType dt, int64_t ldo, int64_t M, int64_t K,
                  int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wr = w + n * ldw;
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * ldx;
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += xr[k] * static_cast<float>(wr[k]);
      float v = s * ws[n];
      if (bias) v = v + bias[n];
      store_from_float(out, m * ldo + n, dt, v);
    }
  }
}

#if PYC_HAVE_X86_SIMD
PYC_TARGET_AVX2 inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Blocks of 4 weight rows x MB (1 or 2) activation rows; the 4 weight rows (4 * K bytes)
// stay in L1 while all activation rows pass over them.
template <int MB>
PYC_TARGET_AVX2 void w8a16_block_avx2(const float* const* xr, const int8_t* const* wr, int64_t K,
                                      float (*sums)[4]) {
  const int64_t Kv = K & ~int64_t(7);
  __m256 acc[MB][4];
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < Kv; k += 8) {
    __m256 xv[MB];
    for (int i = 0; i < MB; ++i) xv[i] = _mm256_loadu_ps(xr[i] + k);
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const __m256 wv = _mm256_cvtepi32_ps(
          _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wr[j] + k))));
      for (int i = 0; i < MB; ++i) acc[i][j] = _mm256_fmadd_ps(xv[i], wv, acc[i][j]);
    }
  }
  for (int i = 0; i < MB; ++i)
    for (int j = 0; j < 4; ++j) {
      float v = hsum_avx2(acc[i][j]);
      for (int64_t k = Kv; k < K; ++k) v += xr[i][k] * static_cast<float>(wr[j][k]);
      sums[i][j] = v;
    }
}

PYC_TARGET_AVX2 void w8a16_avx2(const float* x, int64_t ldx, const int8_t* w, int64_t ldw,
                                const float* ws, const float* bias, void* out, DType dt,
                                int64_t ldo, int64_t M, int64_t K, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; n += 4) {
    const int8_t* wr[4];
    for (int j = 0; j < 4; ++j) wr[j] = w + std::min(n + j, n1 - 1) * ldw;
    for (int64_t m = 0; m < M; m += 2) {
      const float* xr[2] = {x + m * ldx, x + std::min(m + 1, M - 1) * ldx};
      float sums[2][4];
      const int mb = m + 1 < M ? 2 : 1;
      if (mb == 2)
        w8a16_block_avx2<2>(xr, wr, K, sums);
      else
        w8a16_block_avx2<1>(xr, wr, K, sums);
      for (int i = 0; i < mb; ++i) {
        for (int j = 0; j < 4 && n + j < n1; ++j) {
          float v = sums[i][j] * ws[n + j];
          if (bias) v = v + bias[n + j];
          store_from_float(out, (m + i) * ldo + n + j, dt, v);
        }
      }
    }
  }
}
#endif

}  // namespace

void int8_w8a16_cpu(int isa, const float* x, int64_t ldx, const int8_t* w, int64_t ldw,
                    const float* w_scale, const float* bias, void* out, DType out_dtype,
                    int64_t ldo, int64_t M, int64_t K, int64_t n0, int64_t n1) {
  if (M <= 0 || n1 <= n0) return;
#if PYC_HAVE_X86_SIMD
  if (isa >= 1) return w8a16_avx2(x, ldx, w, ldw, w_scale, bias, out, out_dtype, ldo, M, K, n0, n1);
#endif
  w8a16_scalar(x, ldx, w, ldw, w_scale, bias, out, out_dtype, ldo, M, K, n0, n1);
}

}  // namespace pyc
