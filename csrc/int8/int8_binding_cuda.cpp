// Torch glue for the int8 family (CUDA kernels).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/torch_utils.h"
#include "int8/cuda/quantize.cuh"

namespace pyc {
namespace {

std::tuple<at::Tensor, at::Tensor> quantize_per_token_cuda_impl(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.dim() == 2, "quantize_per_token: x must be 2-D [M, K], got ", x_in.dim(),
              "-D");
  const DType dt = to_dtype(x_in, "quantize_per_token: x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  auto q = at::empty({M, K}, x.options().dtype(at::kChar));
  auto scale = at::empty({M}, x.options().dtype(at::kFloat));
  if (M == 0) return {q, scale};
  const int64_t ldx = M > 1 ? x.stride(0) : K;
  const cudaError_t err =
      cuda::quantize_per_token(x.data_ptr(), dt, ldx, q.data_ptr<int8_t>(),
                               scale.data_ptr<float>(), M, K, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "quantize_per_token CUDA kernel failed: ",
              cudaGetErrorString(err));
  return {q, scale};
}

}  // namespace
}  // namespace pyc

TORCH_LIBRARY_IMPL(pycompress, CUDA, m) {
  m.impl("quantize_per_token", &pyc::quantize_per_token_cuda_impl);
}
