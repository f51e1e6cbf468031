// CUDA launchers of the sparse family (fp32; see sparse/sparse.h for the formats and math).
#pragma once

#include <cuda_runtime.h>
#include <cstdint>

namespace pyc {
namespace cuda {

// y[M, N] = x[M, K] (row-major) times the CSR weight (row_ptr [N+1], col_idx int16/int32,
// values [nnz]) transposed, plus bias. One warp per output row, a few tokens per warp. Row
// ranges are clamped to [0, nnz) and entries whose column is outside [0, K) are skipped, so
// arrays that are not valid CSR never make the kernel read out of bounds.
cudaError_t csr_linear(const float* x, int64_t M, int64_t K, const int32_t* row_ptr,
                       const void* col_idx, bool idx16, const float* values, int64_t nnz,
                       const float* bias, float* y, int64_t N, cudaStream_t stream);

// C[I, J] (row-major) = sum_r A(i, r) * B(j, r) * maskB(j, r), then C(i, j) = 0 where
// maskC[i * J + j] == 0, plus bias[j]. A(i, r) = A[i * a0 + r * a1], B(j, r) = B[j * b0 + r * b1],
// maskB(j, r) = maskB[j * b0 + r * b1]. maskB, maskC and bias may be null.
//   forward     : A = x [M,K], B = w [N,K], maskB = mask, bias
//   grad_input  : A = g [M,N], B(k, n) = w[n, k] (b0 = 1, b1 = K), maskB = mask
//   grad_weight : A(n, m) = g[m, n] (a0 = 1, a1 = N), B(k, m) = x[m, k] (b0 = 1, b1 = K), maskC = mask
cudaError_t masked_gemm(int64_t I, int64_t J, int64_t R, const float* A, int64_t a0, int64_t a1,
                        const float* B, int64_t b0, int64_t b1, const uint8_t* maskB,
                        const uint8_t* maskC, const float* bias, float* C, cudaStream_t stream);

}  // namespace cuda
}  // namespace pyc
