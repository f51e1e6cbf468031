// Torch glue for max pooling of quantized images (CUDA kernel): checks, allocation, stream. The
// schema and the CPU kernel are in int8_pool_binding.cpp; the kernel in int8/cuda/pool.cu.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "int8/cuda/pool.cuh"
#include "int8/int8_pool_checks.h"

namespace pyc {
namespace {

at::Tensor int8_max_pool2d_cuda_impl(const at::Tensor& x_in, at::IntArrayRef kernel_size,
                                     at::IntArrayRef stride, at::IntArrayRef padding,
                                     at::IntArrayRef dilation, bool ceil_mode) {
  const Int8PoolGeom g = int8_pool_geom(x_in, kernel_size, stride, padding, dilation, ceil_mode);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor y = at::empty({g.N, g.C, g.Ho, g.Wo},
                           x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (y.numel() == 0) return y;
  const cudaError_t err = cuda::int8_max_pool2d(
      g, static_cast<const uint8_t*>(x.data_ptr()), x.scalar_type() == at::kChar,
      static_cast<uint8_t*>(y.data_ptr()), at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "int8_max_pool2d: CUDA launch failed: ", cudaGetErrorString(err));
  return y;
}

}  // namespace
}  // namespace pyc

TORCH_LIBRARY_IMPL(pycompress, CUDA, m) {
  m.impl("int8_max_pool2d", &pyc::int8_max_pool2d_cuda_impl);
}
