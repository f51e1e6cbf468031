// Torch glue for the sparse family (CUDA kernels, fp32 compute; fp16/bf16 converted).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/torch_utils.h"
#include "sparse/masked_checks.h"
#include "sparse/cuda/sparse.cuh"

namespace pyc {
namespace {

void check_err(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, " CUDA kernel failed: ", cudaGetErrorString(err));
}

at::Tensor sparse_linear_cuda(const at::Tensor& x_in, const at::Tensor& row_ptr_in,
                              const at::Tensor& col_idx_in, const at::Tensor& values_in,
                              const c10::optional<at::Tensor>& bias_in, int64_t in_features,
                              const c10::optional<at::Tensor>& /*layout: CPU only*/) {
  // The CSR structure is not checked here (a check costs a host synchronization per call): the
  // kernel cannot read out of bounds whatever the arrays hold, pycompress.ops.sparse_linear
  // checks them on every call and SparseLinear once, when its buffers are set (see
  // pycompress/nn/sparse_linear.py).
  TORCH_CHECK(x_in.dim() == 2 && x_in.size(1) == in_features,
              "sparse_linear: x must be [M, in_features]");
  TORCH_CHECK(row_ptr_in.dim() == 1 && row_ptr_in.size(0) >= 1 &&
                  row_ptr_in.scalar_type() == at::kInt,
              "sparse_linear: row_ptr must be a 1-D int32 tensor [N + 1]");
  TORCH_CHECK(col_idx_in.dim() == 1 && (col_idx_in.scalar_type() == at::kShort ||
                                        col_idx_in.scalar_type() == at::kInt),
              "sparse_linear: col_idx must be a 1-D int16 or int32 tensor");
  TORCH_CHECK(values_in.dim() == 1 && values_in.scalar_type() == at::kFloat &&
                  values_in.size(0) == col_idx_in.size(0),
              "sparse_linear: values must be float32 [nnz]");
  to_dtype(x_in, "sparse_linear: x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t M = x_in.size(0), N = row_ptr_in.size(0) - 1;
  at::Tensor bias;
  if (bias_in.has_value()) {
    TORCH_CHECK(bias_in->dim() == 1 && bias_in->size(0) == N, "sparse_linear: bias must be [N]");
    bias = as_f32(*bias_in);
  }
  TORCH_CHECK(row_ptr_in.device() == x_in.device() && col_idx_in.device() == x_in.device() &&
                  values_in.device() == x_in.device(),
              "sparse_linear: all tensors must be on the same device");
  const at::Tensor x = as_f32(x_in), rp = row_ptr_in.contiguous(), ci = col_idx_in.contiguous(),
                   v = values_in.contiguous();
  auto y = at::empty({M, N}, x.options());
  check_err(cuda::csr_linear(x.data_ptr<float>(), M, in_features, rp.data_ptr<int32_t>(),
                             ci.data_ptr(), ci.scalar_type() == at::kShort, v.data_ptr<float>(),
                             v.size(0), bias.defined() ? bias.data_ptr<float>() : nullptr,
                             y.data_ptr<float>(), N, at::cuda::getCurrentCUDAStream()),
            "sparse_linear");
  return y.to(x_in.scalar_type());
}

at::Tensor masked_linear_cuda(const at::Tensor& x_in, const at::Tensor& w_in,
                              const at::Tensor& mask_in,
                              const c10::optional<at::Tensor>& bias_in) {
  check_masked_linear_args(x_in, w_in, mask_in, bias_in);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t M = x_in.size(0), N = w_in.size(0), K = w_in.size(1);
  const at::Tensor x = as_f32(x_in), w = as_f32(w_in), mask = mask_in.contiguous();
  at::Tensor bias;
  if (bias_in.has_value()) bias = as_f32(*bias_in);
  auto y = at::empty({M, N}, x.options());
  check_err(cuda::masked_gemm(M, N, K, x.data_ptr<float>(), K, 1, w.data_ptr<float>(), K, 1,
                              mask_bytes(mask), nullptr,
                              bias.defined() ? bias.data_ptr<float>() : nullptr,
                              y.data_ptr<float>(), at::cuda::getCurrentCUDAStream()),
            "masked_linear");
  return y.to(x_in.scalar_type());
}

at::Tensor masked_linear_grad_input_cuda(const at::Tensor& g_in, const at::Tensor& w_in,
                                         const at::Tensor& mask_in) {
  check_masked_grad_input_args(g_in, w_in, mask_in);
  const c10::cuda::CUDAGuard guard(g_in.device());
  const int64_t M = g_in.size(0), N = w_in.size(0), K = w_in.size(1);
  const at::Tensor g = as_f32(g_in), w = as_f32(w_in), mask = mask_in.contiguous();
  auto gx = at::empty({M, K}, g.options());
  check_err(cuda::masked_gemm(M, K, N, g.data_ptr<float>(), N, 1, w.data_ptr<float>(), 1, K,
                              mask_bytes(mask), nullptr, nullptr, gx.data_ptr<float>(),
                              at::cuda::getCurrentCUDAStream()),
            "masked_linear_grad_input");
  return gx.to(g_in.scalar_type());
}

at::Tensor masked_linear_grad_weight_cuda(const at::Tensor& g_in, const at::Tensor& x_in,
                                          const at::Tensor& mask_in) {
  check_masked_grad_weight_args(g_in, x_in, mask_in);
  const c10::cuda::CUDAGuard guard(g_in.device());
  const int64_t M = g_in.size(0), N = mask_in.size(0), K = mask_in.size(1);
  const at::Tensor g = as_f32(g_in), x = as_f32(x_in), mask = mask_in.contiguous();
  auto gw = at::empty({N, K}, g.options());
  check_err(cuda::masked_gemm(N, K, M, g.data_ptr<float>(), 1, N, x.data_ptr<float>(), 1, K,
                              nullptr, mask_bytes(mask), nullptr, gw.data_ptr<float>(),
                              at::cuda::getCurrentCUDAStream()),
            "masked_linear_grad_weight");
  return gw.to(x_in.scalar_type());
}

}  // namespace
}  // namespace pyc

TORCH_LIBRARY_IMPL(pycompress, CUDA, m) {
  m.impl("sparse_linear", &pyc::sparse_linear_cuda);
  m.impl("masked_linear", &pyc::masked_linear_cuda);
  m.impl("masked_linear_grad_input", &pyc::masked_linear_grad_input_cuda);
  m.impl("masked_linear_grad_weight", &pyc::masked_linear_grad_weight_cuda);
}
