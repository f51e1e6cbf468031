// 2:4 semi-structured sparse linear — torch-free CPU API and the compressed format.
//
// A weight W [N, K] is 2:4 sparse along K when every group of 4 consecutive inputs
// (k = 4j .. 4j+3) of each output row holds at most 2 nonzeros. K is padded with zeros to
// Kp = a multiple of 32 (one k-step of the sparse tensor core instruction mma.sp m16n8k32).
//
//   values [N, Kp/2]   fp32, fp16 or bf16: the 2 kept weights of group j of row n are
//                      values[n, 2j] (lower index) and values[n, 2j+1] (higher index)
//   meta   [NT, KT, 32] int16, NT = ceil(N/16), KT = Kp/32: the 2-bit in-group indices.
//
// The nibble of group j of row n is (i0 | i1 << 2) with i0 < i1 the positions of the kept
// weights inside the group (groups with fewer than two nonzeros keep zeros as well, so that
// i0 != i1 always holds: the tensor cores reject 0b0000/0b0101/0b1010/0b1111). Four groups
// (16 logical columns) form one 16-bit word, group 4c+q in bits 4q..4q+3.
//
// The words are stored in the order in which mma.sp.m16n8k32 (f16/bf16, sparsity selector 0)
// reads its metadata register, so that a warp loads its metadata with one 32-bit load per
// lane: for the 16 x 32 tile (nt, kt) (rows 16nt .. 16nt+15, logical columns 32kt .. 32kt+31),
// lane 4g + t (g = 0..7, t = 0..1) holds
//   bits  0..15: row 16nt + g,     columns 32kt + 16t .. 32kt + 16t + 15
//   bits 16..31: row 16nt + g + 8, the same columns
// i.e. meta[nt, kt, 2 * (2g + t) + h] is the word of row 16nt + g + 8h, chunk 2kt + t.
// Rows N .. 16*NT-1 are padding (values absent, meta 0x4444: indices 0 and 1).
#pragma once

#include <cstdint>

#include "common/cpu_features.h"
#include "common/dtypes.h"

namespace pyc {

constexpr int64_t kSemi24KTile = 32;  // logical K of one mma.sp step
constexpr int64_t kSemi24NTile = 16;  // rows of one mma.sp A tile

inline int64_t semi24_padded_k(int64_t K) { return (K + kSemi24KTile - 1) / kSemi24KTile * kSemi24KTile; }
inline int64_t semi24_n_tiles(int64_t N) { return (N + kSemi24NTile - 1) / kSemi24NTile; }

// Position (in int16 words) of the word of row n, 16-column chunk c (c < Kp/16).
inline int64_t semi24_meta_index(int64_t n, int64_t c, int64_t KT) {
  const int64_t nt = n >> 4, r = n & 15;
  return (((nt * KT + (c >> 1)) * 16 + (r & 7) * 2 + (c & 1)) << 1) + (r >> 3);
}

// Compresses rows [n0, n1) of w [N, K] (row stride ldw, dtype wdt) under `mask` (one byte
// per weight, same strides as w; nullptr = keep nonzeros) into values (dtype vdt) and meta
// (all tiles of those rows; rows of the last tile beyond N are written by the call that owns
// row N-1). Returns -1 on success, else the flat index n*K + k of the first weight of the
// first group (in row-major order among rows [n0, n1)) that keeps more than two weights.
int64_t semi24_compress_cpu(const void* w, DType wdt, int64_t ldw, const uint8_t* mask,
                            int64_t N, int64_t K, void* values, DType vdt, int16_t* meta,
                            int64_t n0, int64_t n1);

// Dense rows [n0, n1) of W [N, K] (dtype odt, row stride K) from values/meta.
void semi24_decompress_cpu(const void* values, DType vdt, const int16_t* meta, int64_t N,
                           int64_t K, void* out, DType odt, int64_t n0, int64_t n1);

// y[m, n] = bias[n] + sum_k x[m, k] W[n, k] for n in [n0, n1), all M rows.
// x: fp32 [M, Kp] (row stride ldx >= Kp, columns K .. Kp-1 zero); y fp32 with row stride ldy.
// Gather-free expansion kernel: each 16-bit metadata word expands its 8 kept weights into the
// 16 logical columns in registers (AVX2 vpermps), multiplied with up to 4 activation rows.
void semi24_linear_cpu(CpuIsa isa, const float* x, int64_t ldx, int64_t M, const void* values,
                       DType vdt, const int16_t* meta, const float* bias, float* y, int64_t ldy,
                       int64_t N, int64_t K, int64_t n0, int64_t n1);

// Transposed kernel for larger M (AVX2): xT fp32 [Kp, Mp] (Mp a multiple of 8, 32-byte
// aligned, zero past M and K) and yT [N, Mp]: every kept weight is one broadcast and Mp/8
// FMAs along the activation rows. rows [n0, n1) of yT. Available when
// semi24_linear_t_supported(isa).
bool semi24_linear_t_supported(CpuIsa isa);
// Activation rows from which the binding uses the transposed kernel (fewer: semi24_linear_cpu).
constexpr int64_t kSemi24TransposedMinRows = 12;
void semi24_linear_t_cpu(CpuIsa isa, const float* xT, int64_t Mp, const void* values, DType vdt,
                         const int16_t* meta, const float* bias, float* yT, int64_t K, int64_t n0,
                         int64_t n1);

}  // namespace pyc
