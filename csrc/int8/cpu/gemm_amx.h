// AMX-INT8 int8 GEMM (path 5 of int8_gemm_path) — internal to the CPU int8 kernels.
//
// The packed weight needs no layout of its own: a 16-column panel is stored as [Kp / 4][16 cols]
// [4 k], so 16 consecutive k-groups (1024 bytes) are exactly one AMX weight tile (16 rows of
// 64 bytes: 16 columns x 4 k each), which tdpbusd reads as the pre-interleaved B operand. A
// weight packed on any CPU is therefore valid for every code path, with or without AMX.
//
// The activations are prepared as on the AVX-512 VNNI path (A + 128 as uint8, rows padded with
// 128 to an odd number of 64-byte lines) and multiplied with tdpbusd (u8 x s8, four products
// summed into int32 without saturation); the accumulators start at -128 * sum_k B[n, k]. The
// result is the exact int32 product, so the float epilogue gives the same bits as every other
// path.
#pragma once

#include <cstdint>

#include "int8/gemm.h"

namespace pyc {

constexpr int kInt8PathAmx = 5;

// Rows [0, M) x panels [p0, p1) through the epilogue, on the calling thread. Whole groups of 16
// rows run on AMX tiles; the last M % 16 rows run on the AVX-512 VNNI kernel while the same
// weight panels are in cache. ap: activations from int8_prepare_a(kInt8PathAmx, ...). Meant for
// CPUs with AMX-INT8 (int8_gemm_path returned kInt8PathAmx); where this process may not use AMX
// tile data, every row runs on the VNNI kernel.
// lda: row stride of ap in bytes (0: int8_a_row_bytes(kInt8PathAmx, K)).
void int8_gemm_packed_amx(const void* ap, const int8_t* packed, int64_t M, int64_t N, int64_t K,
                          int64_t p0, int64_t p1, const Int8Epilogue& ep, int64_t lda = 0);

// The AMX tile configuration of the calling thread, held while in scope: a caller that runs many
// int8_gemm_amx_u8 calls (a conv task) configures the tiles once. active(): tiles are configured
// (the CPU has AMX-INT8, the level is AMX, and this process may use tile data).
class Int8AmxTiles {
 public:
  explicit Int8AmxTiles(bool want);
  ~Int8AmxTiles();
  bool active() const { return on_; }
  Int8AmxTiles(const Int8AmxTiles&) = delete;
  Int8AmxTiles& operator=(const Int8AmxTiles&) = delete;

 private:
  bool on_ = false;
};

// Receives finished blocks of int32 sums: rows [m0, m0 + mr) (mr <= 32) and columns
// [n0, n0 + nc) (nc <= 32, up to two panels), row stride ldc.
using Int8BlockFn = void (*)(void* ctx, const int32_t* c, int64_t ldc, int64_t m0, int64_t mr,
                             int64_t n0, int64_t nc);

// C[m, n] = init[n] + sum_k a[m, k] * B[n, k] (modulo 2^32) with the bytes of a read as uint8
// as they are (no + 128 compensation: the caller adds what its zero point needs, in init or in
// its epilogue), rows [0, M) x panels [p0, p1), each finished block handed to fn. init: one
// int32 per column of the panels (indexed by the column n), or nullptr for 0. a: row stride lda bytes; every row holds
// round_up(K, 64) readable bytes when K is not a multiple of 64 (the bytes beyond K are read
// and multiplied by zero weights). Whole groups of 16 rows run on the tiles when tiles.active(),
// the rest (every row otherwise) on the AVX-512 VNNI kernel (the CPU must have VNNI).
// koff (K a multiple of 64, M a multiple of 16 and tiles.active()): the activations of the 64-k
// step s of row m start at a + m * lda + koff[s] instead of a + m * lda + 64 * s, so that the
// rows of a convolution's taps are read in place from a padded image.
void int8_gemm_amx_u8(const Int8AmxTiles& tiles, const uint8_t* a, int64_t lda,
                      const int8_t* packed, int64_t M, int64_t N, int64_t K, int64_t p0,
                      int64_t p1, Int8BlockFn fn, void* ctx, const int32_t* init = nullptr,
                      const int64_t* koff = nullptr);

namespace int8_detail {
// Defined in gemm.cpp (x86-64 only), shared with the AMX driver so that every path finishes
// a tile with the same code.
// AVX-512 VNNI tile: mr (1..8) rows x one 16-column panel, nq k-groups, colsum (or nullptr)
// compensation for A + 128; int32 results in t (row stride ldt).
void tile_vnni(int mr, const uint8_t* a, int64_t lda, const int8_t* bp, const int32_t* colsum,
               int64_t nq, int32_t* t, int64_t ldt);
// The epilogue of the x86 SIMD paths for rows [m0, m0 + mr) and columns [n0, n0 + nc).
void epilogue_simd(const Int8Epilogue& ep, const int32_t* tile, int64_t ldt, int64_t m0,
                   int64_t mr, int64_t n0, int64_t nc);
}  // namespace int8_detail

}  // namespace pyc
