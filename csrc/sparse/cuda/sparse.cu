// CUDA kernels of the sparse family: CSR row-per-warp sparse x dense for small M, and a tiled
// masked matmul (mask applied while loading the weight tile, or at the store for grad_weight).
#include <cstdint>

#include "common/cuda_check.cuh"
#include "sparse/cuda/sparse.cuh"

namespace pyc {
namespace cuda {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kTokensPerWarp = 4;

template <typename I>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    csr_rows_kernel(const float* __restrict__ x, int64_t M, int64_t K,
                    const int32_t* __restrict__ rp, const I* __restrict__ ci,
                    const float* __restrict__ v, int64_t nnz, const float* __restrict__ bias,
                    float* __restrict__ y, int64_t N) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTokensPerWarp;
  if (n >= N) return;
  float acc[kTokensPerWarp];
#pragma unroll
  for (int j = 0; j < kTokensPerWarp; ++j) acc[j] = 0.f;
  // the row range and the column indices are clamped to the arrays: buffers that are not valid
  // CSR give wrong sums but never read out of bounds (the structure is checked before use, not
  // per call: that would cost a host synchronization)
  const int64_t e = min(static_cast<int64_t>(rp[n + 1]), nnz);
  for (int64_t p = max(static_cast<int64_t>(rp[n]), int64_t(0)) + lane; p < e; p += 32) {
    const float w = v[p];
    const int64_t k = static_cast<int64_t>(ci[p]);
    if (k < 0 || k >= K) continue;
#pragma unroll
    for (int j = 0; j < kTokensPerWarp; ++j)
      if (m0 + j < M) acc[j] = fmaf(w, __ldg(x + (m0 + j) * K + k), acc[j]);
  }
#pragma unroll
  for (int j = 0; j < kTokensPerWarp; ++j) {
    float s = acc[j];
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane == 0 && m0 + j < M) y[(m0 + j) * N + n] = s + (bias ? bias[n] : 0.f);
  }
}

constexpr int kTile = 32;
constexpr int kRowsPerThread = 4;  // blockDim = (32, 8)

__global__ void __launch_bounds__(kTile * kTile / kRowsPerThread)
    masked_gemm_kernel(int64_t I, int64_t J, int64_t R, const float* __restrict__ A, int64_t a0,
                       int64_t a1, const float* __restrict__ B, int64_t b0, int64_t b1,
                       const uint8_t* __restrict__ mB, const uint8_t* __restrict__ mC,
                       const float* __restrict__ bias, float* __restrict__ C) {
  __shared__ float As[kTile][kTile + 1];
  __shared__ float Bs[kTile][kTile + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kTile;
  float acc[kRowsPerThread];
#pragma unroll
  for (int q = 0; q < kRowsPerThread; ++q) acc[q] = 0.f;
  for (int64_t r0 = 0; r0 < R; r0 += kTile) {
#pragma unroll
    for (int q = 0; q < kRowsPerThread; ++q) {
      const int row = ty + 8 * q;
      const int64_t r = r0 + tx;
      const int64_t i = i0 + row, j = j0 + row;
      As[row][tx] = (i < I && r < R) ? A[i * a0 + r * a1] : 0.f;
      float b = 0.f;
      if (j < J && r < R) {
        const int64_t o = j * b0 + r * b1;
        b = (mB == nullptr || mB[o]) ? B[o] : 0.f;
      }
      Bs[row][tx] = b;
    }
    __syncthreads();
#pragma unroll 8
    for (int rr = 0; rr < kTile; ++rr) {
      const float bv = Bs[tx][rr];
#pragma unroll
      for (int q = 0; q < kRowsPerThread; ++q) acc[q] = fmaf(As[ty + 8 * q][rr], bv, acc[q]);
    }
    __syncthreads();
  }
  const int64_t j = j0 + tx;
  if (j >= J) return;
#pragma unroll
  for (int q = 0; q < kRowsPerThread; ++q) {
    const int64_t i = i0 + ty + 8 * q;
    if (i >= I) continue;
    float c = acc[q] + (bias ? bias[j] : 0.f);
    if (mC != nullptr && !mC[i * J + j]) c = 0.f;
    C[i * J + j] = c;
  }
}

}  // namespace

cudaError_t csr_linear(const float* x, int64_t M, int64_t K, const int32_t* row_ptr,
                       const void* col_idx, bool idx16, const float* values, int64_t nnz,
                       const float* bias, float* y, int64_t N, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  const int64_t gx = (N + kWarpsPerBlock - 1) / kWarpsPerBlock;
  if (gx > 0x7fffffffLL) return cudaErrorInvalidValue;
  const dim3 block(kWarpsPerBlock * 32);
  // gridDim.y is limited to 65535: launch token slabs of at most 65535 * kTokensPerWarp rows
  const int64_t slab = 65535LL * kTokensPerWarp;
  for (int64_t s0 = 0; s0 < M; s0 += slab) {
    const int64_t ms = M - s0 < slab ? M - s0 : slab;
    const dim3 grid(static_cast<unsigned int>(gx),
                    static_cast<unsigned int>((ms + kTokensPerWarp - 1) / kTokensPerWarp));
    if (idx16)
      csr_rows_kernel<int16_t><<<grid, block, 0, stream>>>(
          x + s0 * K, ms, K, row_ptr, static_cast<const int16_t*>(col_idx), values, nnz, bias,
          y + s0 * N, N);
    else
      csr_rows_kernel<int32_t><<<grid, block, 0, stream>>>(
          x + s0 * K, ms, K, row_ptr, static_cast<const int32_t*>(col_idx), values, nnz, bias,
          y + s0 * N, N);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

cudaError_t masked_gemm(int64_t I, int64_t J, int64_t R, const float* A, int64_t a0, int64_t a1,
                        const float* B, int64_t b0, int64_t b1, const uint8_t* maskB,
                        const uint8_t* maskC, const float* bias, float* C, cudaStream_t stream) {
  if (I == 0 || J == 0) return cudaSuccess;
  const int64_t gx = (I + kTile - 1) / kTile, gy = (J + kTile - 1) / kTile;
  if (gy > 65535 || gx > 0x7fffffffLL) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned int>(gx), static_cast<unsigned int>(gy));
  const dim3 block(kTile, kTile / kRowsPerThread);
  masked_gemm_kernel<<<grid, block, 0, stream>>>(I, J, R, A, a0, a1, B, b0, b1, maskB, maskC,
                                                 bias, C);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace pyc
