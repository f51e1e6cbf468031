// CUDA launcher for per-token int8 quantization (see int8/quantize.h for the math).
#pragma once

#include <cuda_runtime.h>
#include <cstdint>

#include "common/dtypes.h"

namespace pyc {
namespace cuda {

// x: [M, K] with row stride ldx (elements), q: [M, K] contiguous, scale: [M].
// qmax (1..127) replaces 127: scale = absmax / qmax, q in [-qmax, qmax].
cudaError_t quantize_per_token(const void* x, DType dtype, int64_t ldx, int8_t* q, float* scale,
                               int64_t M, int64_t K, cudaStream_t stream, int qmax = 127);

}  // namespace cuda
}  // namespace pyc
