// Per-token (per-row) symmetric int8 quantization — torch-free kernel API.
//
// For each row m of x[M, K]:
//   absmax   = max_k |x[m, k]|                       (computed in fp32)
//   scale[m] = absmax / 127          (1 when absmax == 0; NaN when the row has a non-finite value)
//   q[m, k]  = clamp(rint(x[m, k] * (127 / absmax)), -127, 127)   (0 for zero/non-finite rows)
//   (rows with absmax < 127 / FLT_MAX, where 127 / absmax overflows: x and absmax scaled by 2^64,
//    q[m, k] = clamp(rint((x[m, k] * 2^64) * (127 / (absmax * 2^64))), -127, 127); CPU)
// with IEEE fp32 arithmetic and round-half-to-even, so every implementation
// (scalar, AVX2, AVX-512, CUDA) produces identical bits.
//
// `qmax` replaces 127 everywhere (scale = absmax / qmax, q in [-qmax, qmax]); 63 gives the
// 7-bit activations of the vpmaddubsw GEMM path (see int8/gemm.h). 1 <= qmax <= 127.
#pragma once

#include <cstdint>

#include "common/dtypes.h"

namespace pyc {

// Quantizes rows [row_begin, row_end) of x (row stride ldx elements, unit
// column stride) into q (row stride ldq) and scale. CPU, single thread.
void quantize_per_token_cpu(const void* x, DType dtype, int64_t ldx, int8_t* q, int64_t ldq,
                            float* scale, int64_t row_begin, int64_t row_end, int64_t K,
                            int qmax = 127);

// Same, forcing one implementation (for tests): isa = 0 scalar, 1 avx2, 2 avx512.
void quantize_per_token_cpu_isa(int isa, const void* x, DType dtype, int64_t ldx, int8_t* q,
                                int64_t ldq, float* scale, int64_t row_begin, int64_t row_end,
                                int64_t K, int qmax = 127);

}  // namespace pyc
