// Torch glue for the sparse family (CUDA kernels, fp32 compute; fp16/bf16 converted).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "common/torch_utils.h"
#include "sparse/masked_checks.h"
#include "sparse/cuda/sparse.cuh"

namespace pyc {
namespace {

void check_err(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, " CUDA kernel failed: ", cudaGetErrorString(err));
}

// The structure of CSR arrays on the device (host synchronizations; see sparse_decode_layout).
void check_csr_cuda(const at::Tensor& rp, const at::Tensor& ci, int64_t K) {
  const int64_t N = rp.size(0) - 1, nnz = ci.size(0);
  const at::Tensor r = rp.to(at::kLong);
  TORCH_CHECK(r[0].item<int64_t>() == 0 && r[N].item<int64_t>() == nnz,
              "sparse_linear: row_ptr must start at 0 and end at nnz");
  if (N > 0)
    TORCH_CHECK((r.slice(0, 1) - r.slice(0, 0, N)).min().item<int64_t>() >= 0,
                "sparse_linear: row_ptr must be non-decreasing");
  if (nnz > 0) {
    auto mm = at::aminmax(ci.to(at::kLong));
    TORCH_CHECK(std::get<0>(mm).item<int64_t>() >= 0 && std::get<1>(mm).item<int64_t>() < K,
                "sparse_linear: col_idx out of range [0, ", K, ")");
  }
}

// sparse_decode_layout of CUDA arrays: checks their structure completely; the CUDA kernel needs
// no single-row copy, so the layout is an empty tensor on the device.
at::Tensor sparse_decode_layout_cuda(const at::Tensor& row_ptr, const at::Tensor& col_idx,
                                     const at::Tensor& values, int64_t in_features,
                                     bool /*pack*/) {
  TORCH_CHECK(in_features >= 0, "sparse_decode_layout: in_features must be >= 0");
  TORCH_CHECK(row_ptr.dim() == 1 && row_ptr.size(0) >= 1 && row_ptr.scalar_type() == at::kInt,
              "sparse_decode_layout: row_ptr must be a 1-D int32 tensor [N + 1]");
  TORCH_CHECK(col_idx.dim() == 1 && (col_idx.scalar_type() == at::kShort ||
                                     col_idx.scalar_type() == at::kInt),
              "sparse_decode_layout: col_idx must be a 1-D int16 or int32 tensor");
  TORCH_CHECK(values.dim() == 1 && values.scalar_type() == at::kFloat &&
                  values.size(0) == col_idx.size(0),
              "sparse_decode_layout: values must be float32 [nnz]");
  TORCH_CHECK(row_ptr.device() == col_idx.device() && row_ptr.device() == values.device(),
              "sparse_decode_layout: all tensors must be on the same device");
  const c10::cuda::CUDAGuard guard(row_ptr.device());
  check_csr_cuda(row_ptr, col_idx, in_features);
  return at::empty({0}, row_ptr.options().dtype(at::kByte));
}

std::vector<int64_t> sparse_decode_layout_info_cuda(const at::Tensor& layout, const at::Tensor&,
                                                    const at::Tensor&, const at::Tensor&, int64_t) {
  return {-1, layout.numel(), 0};  // CUDA layouts are empty: nothing is used
}

at::Tensor sparse_linear_cuda(const at::Tensor& x_in, const at::Tensor& row_ptr_in,
                              const at::Tensor& col_idx_in, const at::Tensor& values_in,
                              const c10::optional<at::Tensor>& bias_in, int64_t in_features,
                              const c10::optional<at::Tensor>& /*layout: CPU only*/) {
  // The CSR structure is not checked here (a check costs host synchronizations on every call):
  // the kernel cannot read out of bounds whatever the arrays hold; pycompress.ops.sparse_linear
  // checks them on every call and SparseLinear once, when its buffers are set, both through
  // sparse_decode_layout.
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
  m.impl("sparse_decode_layout", &pyc::sparse_decode_layout_cuda);
  m.impl("sparse_decode_layout_info", &pyc::sparse_decode_layout_info_cuda);
  m.impl("masked_linear", &pyc::masked_linear_cuda);
  m.impl("masked_linear_grad_input", &pyc::masked_linear_grad_input_cuda);
  m.impl("masked_linear_grad_weight", &pyc::masked_linear_grad_weight_cuda);
}
