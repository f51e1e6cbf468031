// CUDA launchers for the int8 GEMM family (torch-free; raw pointers + stream).
#pragma once

#include <cuda_runtime.h>
#include <cstdint>

#include "common/dtypes.h"

namespace pyc {
namespace cuda {

// What the GEMM writes: int32 c[M, N] (out == nullptr) or
// out[m, n] = ((float)acc * a_scale[m]) * w_scale[n] + bias[n] in out_dtype
// (every step rounded to nearest, no FMA contraction: the CPU kernels give the same bits).
struct Int8GemmEpilogue {
  int32_t* c = nullptr;
  void* out = nullptr;
  DType out_dtype = DType::F32;
  const float* a_scale = nullptr;
  const float* w_scale = nullptr;
  const float* bias = nullptr;  // may be null
};

// C = A @ B^T with A int8 [M, K], B int8 [N, K], both contiguous, K % 16 == 0 and both
// base pointers 16-byte aligned (callers pad K with zeros). Any M >= 0, N >= 1: tails are
// predicated. Chooses a GEMV kernel (dp4a) for small M and an mma.sync m16n8k32
// tensor-core kernel (sm_80+) with a cp.async multi-stage pipeline otherwise.
cudaError_t int8_gemm(const int8_t* a, const int8_t* b, int64_t M, int64_t N, int64_t K,
                      const Int8GemmEpilogue& ep, cudaStream_t stream);

// Largest M the weight-only kernel handles (callers dequantize + GEMM beyond it).
constexpr int64_t kW8A16MaxM = 16;

// Weight-only linear: out[m, n] = (sum_k x[m, k] * w[n, k]) * w_scale[n] + bias[n],
// x [M, K] contiguous in `dtype`, w int8 [N, K] contiguous, K % 16 == 0, 16-byte aligned,
// M <= kW8A16MaxM. fp32 accumulation; out has x's dtype.
cudaError_t int8_w8a16(const void* x, DType dtype, const int8_t* w, const float* w_scale,
                       const float* bias, void* out, int64_t M, int64_t N, int64_t K,
                       cudaStream_t stream);

}  // namespace cuda
}  // namespace pyc
