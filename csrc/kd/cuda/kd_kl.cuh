// CUDA launchers of the fused KD softmax-KL (see kd/kd.h for the math and the row statistics).
#pragma once

#include <cuda_runtime.h>
#include <cstdint>

#include "common/dtypes.h"

namespace pyc {
namespace cuda {

constexpr int kKdStats = 5;

// Row statistics stats[N, 5] and loss[N] = T^2 * KL for s, t: [N, V] with row strides lds, ldt
// (elements, unit column stride). When grad != nullptr the gradient of sum_i coef[i] * loss[i]
// with respect to s is written to grad ([N, V] contiguous, dtype of s) in the same kernel.
cudaError_t kd_forward(const void* s, const void* t, DType dtype, int64_t lds, int64_t ldt,
                       int64_t N, int64_t V, float temperature, bool reverse, float* stats,
                       float* loss, const float* coef, void* grad, cudaStream_t stream);

// grad = d(sum_i coef[i] * loss[i]) / ds from the statistics of kd_forward.
cudaError_t kd_backward(const float* coef, const void* s, const void* t, DType dtype, int64_t lds,
                        int64_t ldt, int64_t N, int64_t V, float temperature, bool reverse,
                        const float* stats, void* grad, cudaStream_t stream);

}  // namespace cuda
}  // namespace pyc
