// int8 GEMM on the CPU — torch-free kernel API.
//
//   C[m, n] = sum_k A[m, k] * B[n, k]        (A int8 [M, K], B int8 [N, K], C int32)
//
// Exact in int32 (products are summed without any intermediate saturation);
// when |C| would exceed int32 (K > 131072 with extreme values) the result wraps
// modulo 2^32.
//
// The weight operand B is first packed into a blocked layout shared by every
// code path ("panels" of 16 output columns, K in groups of 4):
//
//   Kp = round_up(K, 4), Np = round_up(N, 16)
//   bytes [p * Kp * 16, (p + 1) * Kp * 16): panel p, laid out [Kp / 4][16 cols][4 k]
//   bytes [Np * Kp, Np * Kp + 4 * Np):       int32 column sums sum_k B[n, k]
//                                            (the u8/s8 compensation of the VNNI path)
//   next 4 * Np / 16 bytes:                  int32 max |B[n, k]| of each panel
//
// Padding is zero. The activation operand A is prepared per row into the form the
// chosen code path reads (int16 for scalar/AVX2, A + 128 as uint8 for AVX-512 VNNI and AMX,
// A + 64 as uint8 for the AVX2 7-bit path). The layout does not depend on the CPU: 16 k-groups
// of a panel (1024 bytes) are one AMX weight tile as they are.
//
// 7-bit activations (A in [-64, 63], what per-token quantization with qmax = 63 gives)
// have an extra AVX2 path (3): A + 64 is in [0, 127], so vpmaddubsw's int16 pair sums
// (u8 x s8, at most 2 * 127 * 128 in magnitude) never saturate; vpmaddwd with ones widens
// them to int32 and 64 * sum_k B[n, k] is subtracted. Exact, like every other path.
// Panels whose weights all lie in [-64, 64] (7-bit weights) take a variant that adds the
// int16 pair sums of two k-groups before widening (4 * 127 * 64 = 32512 still fits int16):
// three vector multiplies per 128 multiply-adds instead of four.
#pragma once

#include <cstdint>

#include "common/dtypes.h"

namespace pyc {

constexpr int64_t kInt8PanelCols = 16;

inline int64_t int8_round_k(int64_t K) { return (K + 3) / 4 * 4; }
inline int64_t int8_round_n(int64_t N) { return (N + 15) / 16 * 16; }

// Size in bytes of the packed form of an [N, K] weight.
inline int64_t int8_packed_bytes(int64_t N, int64_t K) {
  return int8_round_n(N) * int8_round_k(K) + 4 * int8_round_n(N) + int8_round_n(N) / 4;
}

// Packs panels [p0, p1) of b (row stride ldb) into `packed` (whole-buffer base
// pointer) including their column sums.
void int8_pack_b(const int8_t* b, int64_t ldb, int64_t N, int64_t K, int8_t* packed, int64_t p0,
                 int64_t p1);

// Code path used for the GEMM given a requested ISA level (0 scalar, 1 avx2,
// 2 avx512, 3 amx): returns 0 (scalar), 1 (avx2), 2 (avx512-vnni; only when the CPU
// has VNNI) or 5 (AMX-INT8 tiles, level 3 only, where the CPU and the OS allow AMX; A + 128
// as on path 2 and the same packed weight, see cpu/gemm_amx.h). With act7 (every A value in [-64, 63]) the AVX2 level returns 3
// (vpmaddubsw); the other paths are exact for any int8 A and are kept. Otherwise, with
// narrow_b (every B value in [-64, 64], see int8_packed_narrow) it returns 4: A + 128 as
// the unsigned vpmaddubsw operand, whose pair sums (at most 2 * 255 * 64 = 32640) cannot
// saturate, and 128 * sum_k B[n, k] subtracted. Path 4 must only be used with such a B.
int int8_gemm_path(int isa, bool act7 = false, bool narrow_b = false);

// Whether every value of the packed weight lies in [-64, 64] (from the panels' recorded maxima).
bool int8_packed_narrow(const int8_t* packed, int64_t N, int64_t K);

// Bytes per prepared A row for a path.
int64_t int8_a_row_bytes(int path, int64_t K);

// Prepares rows [m0, m1) of a (row stride lda) into ap (row stride
// int8_a_row_bytes(path, K)).
void int8_prepare_a(int path, const int8_t* a, int64_t lda, int64_t K, void* ap, int64_t m0,
                    int64_t m1);

// What is written for each finished tile.
struct Int8Epilogue {
  // int32 output (when out == nullptr): c[m * ldc + n]
  int32_t* c = nullptr;
  int64_t ldc = 0;
  // float output: out[m * ldo + n] = ((float)acc * a_scale[m]) * w_scale[n] + bias[n]
  // (on the CPU, where (float)acc * a_scale[m] alone overflows, the expression in double)
  void* out = nullptr;
  DType out_dtype = DType::F32;
  int64_t ldo = 0;
  const float* a_scale = nullptr;
  const float* w_scale = nullptr;
  const float* bias = nullptr;  // may be null
  // When set, replaces both outputs above: called with the int32 results of each finished tile,
  // rows [m0, m0 + mr) and columns [n0, n0 + nc) (row stride ldt), on the thread that computed it.
  void (*tile_fn)(void* ctx, const int32_t* tile, int64_t ldt, int64_t m0, int64_t mr, int64_t n0,
                  int64_t nc) = nullptr;
  void* tile_ctx = nullptr;
};

// K block length the GEMM uses for this problem (== round_k(K): no K blocking).
int64_t int8_gemm_kc(int path, int64_t M, int64_t K);

// Computes rows [0, M) and panels [p0, p1) of the product of prepared A and
// packed B, writing through the epilogue. Single thread. `workspace` (int32
// [M, round_n(N)], may be shared by threads working on disjoint panels) is needed
// when int8_gemm_kc(path, M, K) < round_k(K); with nullptr K is not blocked.
// lda: the row stride of ap in bytes; 0 (the default) means int8_a_row_bytes(path, K). Another
// stride is only valid on the paths that read bytes (2, 4, 5) with K a multiple of 4 (and of 64
// on path 5), where the kernels read exactly K bytes of each row.
void int8_gemm_packed(int path, const void* ap, const int8_t* packed, int64_t M, int64_t N,
                      int64_t K, int64_t p0, int64_t p1, const Int8Epilogue& ep,
                      int32_t* workspace, int64_t lda = 0);

// Weight-only linear (w8a16) on the CPU: x fp32 [M, K] (row stride ldx), w int8 [N, K] (row stride ldw)
// out[m, n] = (sum_k x[m, k] * (float)w[n, k]) * w_scale[n] + bias[n], fp32 accumulation,
// rows n in [n0, n1). isa as for int8_gemm_path.
void int8_w8a16_cpu(int isa, const float* x, int64_t ldx, const int8_t* w, int64_t ldw,
                    const float* w_scale, const float* bias, void* out, DType out_dtype,
                    int64_t ldo, int64_t M, int64_t K, int64_t n0, int64_t n1);

}  // namespace pyc
