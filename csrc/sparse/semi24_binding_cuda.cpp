// Torch glue for 2:4 semi-structured sparsity (CUDA): the sparse tensor core linear (sm_80+).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/torch_utils.h"
#include "sparse/cuda/semi24.cuh"
#include "sparse/semi24_checks.h"

namespace pyc {
namespace {

bool aligned16(const at::Tensor& t) {
  return (reinterpret_cast<uintptr_t>(t.data_ptr()) & 15u) == 0;
}

at::Tensor aligned_contiguous(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return aligned16(c) ? c : c.clone();
}

at::Tensor semi24_linear_cuda_op(const at::Tensor& x_in, const at::Tensor& values_in,
                                 const at::Tensor& meta_in, const c10::optional<at::Tensor>& bias_in,
                                 int64_t in_features) {
  check_semi24_linear(x_in, values_in, meta_in, bias_in, in_features);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(prop->major >= 8, "semi24_linear: sparse tensor cores need compute capability 8.0+, ",
              "this GPU has ", prop->major, ".", prop->minor);
  const int64_t M = x_in.size(0), K = in_features, N = values_in.size(0);
  at::Tensor bias;
  if (bias_in.has_value()) bias = bias_in->to(at::kFloat).contiguous();
  if (M == 0 || N == 0 || K == 0) {
    at::Tensor y = at::zeros({M, N}, x_in.options().dtype(at::kFloat));
    if (bias.defined() && M > 0) y.add_(bias);
    return y.to(x_in.scalar_type());
  }
  // tensor cores take fp16/bf16: fp32 values are rounded to bf16 for the call (store the
  // module in fp16/bf16 to avoid the per-call conversion)
  const at::ScalarType ct =
      values_in.scalar_type() == at::kFloat ? at::kBFloat16 : values_in.scalar_type();
  const at::Tensor values = aligned_contiguous(values_in.to(ct));
  const at::Tensor meta = aligned_contiguous(meta_in);
  const int64_t Kx = (K + 7) / 8 * 8;
  at::Tensor x = x_in.to(ct);
  if (Kx != K || x.stride(1) != 1 || (M > 1 && x.stride(0) % 8 != 0) || !aligned16(x)) {
    at::Tensor xp = at::zeros({M, Kx}, x.options());
    xp.narrow(1, 0, K).copy_(x);
    x = xp;
  }
  const int64_t ldx = M > 1 ? x.stride(0) : Kx;
  at::Tensor y = at::empty({M, N}, x_in.options());
  const cudaError_t err = cuda::semi24_linear(
      x.data_ptr(), ldx, M, K, values.data_ptr(), meta.data_ptr<int16_t>(),
      bias.defined() ? bias.data_ptr<float>() : nullptr, to_dtype(values, "values"), y.data_ptr(),
      to_dtype(y, "y"), N, at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "semi24_linear CUDA kernel failed: ", cudaGetErrorString(err));
  return y;
}

}  // namespace
}  // namespace pyc

TORCH_LIBRARY_IMPL(pycompress, CUDA, m) {
  m.impl("semi24_linear", &pyc::semi24_linear_cuda_op);
  // conversion-time ops: computed on the CPU, results returned on the input's device
  m.impl("semi24_compress", &pyc::semi24_compress_op);
  m.impl("semi24_decompress", &pyc::semi24_decompress_op);
}
