// Max pooling of quantized NHWC images on the GPU (see int8/pool.h). One thread per output
// byte: consecutive threads take consecutive channels of a pixel, so every tap's loads are
// coalesced across the channels.
#include "common/cuda_check.cuh"
#include "int8/cuda/pool.cuh"

namespace pyc {
namespace cuda {
namespace {

template <typename T>
__global__ void max_pool_kernel(Int8PoolGeom g, const T* __restrict__ x, T* __restrict__ y,
                                int64_t total, T lowest) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = i % g.C;
    int64_t p = i / g.C;
    const int64_t ox = p % g.Wo;
    p /= g.Wo;
    const int64_t oy = p % g.Ho;
    const int64_t n = p / g.Ho;
    const T* img = x + n * g.H * g.W * g.C + c;
    T m = lowest;
    for (int64_t ky = 0; ky < g.kh; ++ky) {
      const int64_t iy = oy * g.sh - g.ph + ky * g.dh;
      if (iy < 0 || iy >= g.H) continue;
      for (int64_t kx = 0; kx < g.kw; ++kx) {
        const int64_t ix = ox * g.sw - g.pw + kx * g.dw;
        if (ix < 0 || ix >= g.W) continue;
        const T v = img[(iy * g.W + ix) * g.C];
        m = v > m ? v : m;
      }
    }
    y[i] = m;
  }
}

}  // namespace

cudaError_t int8_max_pool2d(const Int8PoolGeom& g, const uint8_t* x, bool is_signed, uint8_t* y,
                            cudaStream_t stream) {
  const int64_t total = g.N * g.Ho * g.Wo * g.C;
  if (total == 0) return cudaSuccess;
  const int threads = 256;
  const unsigned int blocks = ceil_div_u(total, threads) < 65535u * 8u ? ceil_div_u(total, threads)
                                                                       : 65535u * 8u;
  if (is_signed)
    max_pool_kernel<int8_t><<<blocks, threads, 0, stream>>>(
        g, reinterpret_cast<const int8_t*>(x), reinterpret_cast<int8_t*>(y), total, int8_t(-128));
  else
    max_pool_kernel<uint8_t><<<blocks, threads, 0, stream>>>(g, x, y, total, uint8_t(0));
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace pyc
