// Per-token int8 quantization on CUDA: one warp-group per row, vectorised
// loads, fp32 math with IEEE round-to-nearest intrinsics so results match the
// CPU kernels bit for bit.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cfloat>

#include "common/cuda_check.cuh"
#include "common/cuda_convert.cuh"
#include "int8/cuda/quantize.cuh"

namespace pyc {
namespace cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    quantize_rows_kernel(const T* __restrict__ x, int64_t ldx, int8_t* __restrict__ q,
                         float* __restrict__ scale, int64_t M, int64_t K, float qmax) {
  const int64_t m = blockIdx.x;
  if (m >= M) return;
  const T* xr = x + m * ldx;
  int8_t* qr = q + m * K;

  float amax = 0.f;
  int bad = 0;
  for (int64_t k = threadIdx.x; k < K; k += kThreads) {
    const float a = fabsf(to_f32(xr[k]));
    bad |= !(a <= FLT_MAX);
    amax = fmaxf(amax, a);
  }
  // warp then block reduction
  for (int off = 16; off > 0; off >>= 1) {
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
    bad |= __shfl_xor_sync(0xffffffffu, bad, off);
  }
  __shared__ float s_max[kThreads / 32];
  __shared__ int s_bad[kThreads / 32];
  __shared__ float s_inv;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    s_max[warp] = amax;
    s_bad[warp] = bad;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float mx = 0.f;
    int b = 0;
    for (int w = 0; w < kThreads / 32; ++w) {
      mx = fmaxf(mx, s_max[w]);
      b |= s_bad[w];
    }
    float inv;
    if (b) {
      scale[m] = __int_as_float(0x7fc00000);
      inv = 0.f;
    } else if (mx == 0.f) {
      scale[m] = 1.f;
      inv = 0.f;
    } else {
      scale[m] = __fdiv_rn(mx, qmax);
      inv = __fdiv_rn(qmax, mx);
    }
    s_inv = inv;
  }
  __syncthreads();
  const float inv = s_inv;
  for (int64_t k = threadIdx.x; k < K; k += kThreads) {
    int8_t v = 0;
    if (inv != 0.f) {  // zero or non-finite rows stay all zeros
      float r = rintf(__fmul_rn(to_f32(xr[k]), inv));
      r = fminf(fmaxf(r, -qmax), qmax);
      v = static_cast<int8_t>(static_cast<int>(r));
    }
    qr[k] = v;
  }
}

template <typename T>
cudaError_t launch(const void* x, int64_t ldx, int8_t* q, float* scale, int64_t M, int64_t K,
                   cudaStream_t stream, float qmax) {
  if (M == 0) return cudaSuccess;
  // gridDim.x allows 2^31-1 blocks
  quantize_rows_kernel<T><<<static_cast<unsigned int>(M), kThreads, 0, stream>>>(
      static_cast<const T*>(x), ldx, q, scale, M, K, qmax);
  return cudaGetLastError();
}

}  // namespace

cudaError_t quantize_per_token(const void* x, DType dtype, int64_t ldx, int8_t* q, float* scale,
                               int64_t M, int64_t K, cudaStream_t stream, int qmax) {
  if (M > 0x7fffffffLL || qmax < 1 || qmax > 127) return cudaErrorInvalidValue;
  const float qm = static_cast<float>(qmax);
  switch (dtype) {
    case DType::F32: return launch<float>(x, ldx, q, scale, M, K, stream, qm);
    case DType::F16: return launch<__half>(x, ldx, q, scale, M, K, stream, qm);
    case DType::BF16: return launch<__nv_bfloat16>(x, ldx, q, scale, M, K, stream, qm);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace pyc
