// Torch glue for the int8 family (CUDA kernels).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/torch_utils.h"
#include "int8/int8_checks.h"
#include "int8/cuda/gemm.cuh"
#include "int8/gemm.h"
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

// Contiguous, 16-byte aligned, K padded with zeros to a multiple of 16 (the kernels'
// only layout requirement).
at::Tensor kernel_operand(const at::Tensor& t) {
  const int64_t K = t.size(1);
  const int64_t Kp = (K + 15) / 16 * 16;
  at::Tensor c = t.contiguous();
  if (Kp != K) return at::constant_pad_nd(c, {0, Kp - K}, 0);
  if ((reinterpret_cast<uintptr_t>(c.data_ptr()) & 15u) != 0) return c.clone();
  return c;
}

// The packed layout is the CPU kernels' (CUDA kernels read w directly); packing a CUDA
// weight gives the same bytes on the weight's device so that modules can move freely.
at::Tensor int8_pack_weight_cuda_impl(const at::Tensor& w_in) {
  check_2d_int8(w_in, "int8_pack_weight", "w");
  TORCH_CHECK(w_in.size(0) >= 1 && w_in.size(1) >= 1, "int8_pack_weight: w must be non-empty");
  const at::Tensor w = w_in.to(at::kCPU).contiguous();
  const int64_t N = w.size(0), K = w.size(1);
  auto packed = at::empty({int8_packed_bytes(N, K)}, w.options());
  int8_pack_b(w.data_ptr<int8_t>(), K, N, K, packed.data_ptr<int8_t>(), 0,
              int8_round_n(N) / kInt8PanelCols);
  return packed.to(w_in.device());
}

void check_cuda(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, " CUDA kernel failed: ", cudaGetErrorString(err));
}

at::Tensor int8_gemm_cuda_impl(const at::Tensor& a_in, const at::Tensor& b_in) {
  check_2d_int8(a_in, "int8_gemm", "a");
  check_2d_int8(b_in, "int8_gemm", "b");
  TORCH_CHECK(a_in.size(1) == b_in.size(1),
              "int8_gemm: a is [M, K] and b is [N, K] with the same K; got a ", a_in.sizes(),
              " and b ", b_in.sizes());
  TORCH_CHECK(a_in.device() == b_in.device(), "int8_gemm: a and b must be on the same device");
  const int64_t M = a_in.size(0), K = a_in.size(1), N = b_in.size(0);
  TORCH_CHECK(K >= 1 && N >= 1, "int8_gemm: K and N must be >= 1, got K=", K, " N=", N);
  const c10::cuda::CUDAGuard guard(a_in.device());
  auto c = at::empty({M, N}, a_in.options().dtype(at::kInt));
  if (M == 0) return c;
  const at::Tensor a = kernel_operand(a_in), b = kernel_operand(b_in);
  cuda::Int8GemmEpilogue ep;
  ep.c = c.data_ptr<int32_t>();
  check_cuda(cuda::int8_gemm(a.data_ptr<int8_t>(), b.data_ptr<int8_t>(), M, N, a.size(1), ep,
                             at::cuda::getCurrentCUDAStream()),
             "int8_gemm");
  return c;
}

at::Tensor int8_linear_cuda_impl(const at::Tensor& x_in, const at::Tensor& w_in,
                                 const at::Tensor& w_scale_in,
                                 const c10::optional<at::Tensor>& bias_in,
                                 const c10::optional<at::Tensor>& /*w_packed: CPU layout*/,
                                 int64_t act_bits) {
  check_linear_args(x_in, w_in, w_scale_in, bias_in, "int8_linear");
  TORCH_CHECK(act_bits == 8 || act_bits == 7, "int8_linear: act_bits must be 8 or 7, got ",
              act_bits);
  const DType dt = to_dtype(x_in, "int8_linear: x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t M = x_in.size(0), K = x_in.size(1), N = w_in.size(0);
  auto out = at::empty({M, N}, x_in.options());
  if (M == 0) return out;
  const auto stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const int64_t ldx = M > 1 ? x.stride(0) : K;
  // per-token quantization pass, then the GEMM with the dequantization epilogue
  auto q = at::empty({M, K}, x.options().dtype(at::kChar));
  auto xs = at::empty({M}, x.options().dtype(at::kFloat));
  check_cuda(cuda::quantize_per_token(x.data_ptr(), dt, ldx, q.data_ptr<int8_t>(),
                                      xs.data_ptr<float>(), M, K, stream,
                                      act_bits == 7 ? 63 : 127),
             "int8_linear (quantize)");
  const at::Tensor a = kernel_operand(q), w = kernel_operand(w_in);
  const at::Tensor w_scale = w_scale_in.contiguous();
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) bias = bias_in->to(at::kFloat).contiguous();
  cuda::Int8GemmEpilogue ep;
  ep.out = out.data_ptr();
  ep.out_dtype = dt;
  ep.a_scale = xs.data_ptr<float>();
  ep.w_scale = w_scale.data_ptr<float>();
  ep.bias = bias.defined() ? bias.data_ptr<float>() : nullptr;
  check_cuda(cuda::int8_gemm(a.data_ptr<int8_t>(), w.data_ptr<int8_t>(), M, N, a.size(1), ep,
                             stream),
             "int8_linear");
  return out;
}

at::Tensor int8_linear_w8a16_cuda_impl(const at::Tensor& x_in, const at::Tensor& w_in,
                                       const at::Tensor& w_scale_in,
                                       const c10::optional<at::Tensor>& bias_in) {
  check_linear_args(x_in, w_in, w_scale_in, bias_in, "int8_linear_w8a16");
  const DType dt = to_dtype(x_in, "int8_linear_w8a16: x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t M = x_in.size(0), N = w_in.size(0);
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) bias = bias_in->to(at::kFloat).contiguous();
  if (M > cuda::kW8A16MaxM) {
    // large M is compute bound: dequantize once and use the dense GEMM
    const auto st = x_in.scalar_type();
    const at::Tensor wf = (w_in.to(at::kFloat) * w_scale_in.unsqueeze(1)).to(st);
    return at::linear(x_in, wf, bias.defined() ? c10::optional<at::Tensor>(bias.to(st))
                                                : c10::optional<at::Tensor>());
  }
  auto out = at::empty({M, N}, x_in.options());
  if (M == 0) return out;
  const at::Tensor x = kernel_operand(x_in), w = kernel_operand(w_in);
  const at::Tensor w_scale = w_scale_in.contiguous();
  check_cuda(cuda::int8_w8a16(x.data_ptr(), dt, w.data_ptr<int8_t>(), w_scale.data_ptr<float>(),
                              bias.defined() ? bias.data_ptr<float>() : nullptr, out.data_ptr(),
                              M, N, w.size(1), at::cuda::getCurrentCUDAStream()),
             "int8_linear_w8a16");
  return out;
}

}  // namespace
}  // namespace pyc

TORCH_LIBRARY_IMPL(pycompress, CUDA, m) {
  m.impl("quantize_per_token", &pyc::quantize_per_token_cuda_impl);
  m.impl("int8_gemm", &pyc::int8_gemm_cuda_impl);
  m.impl("int8_pack_weight", &pyc::int8_pack_weight_cuda_impl);
  m.impl("int8_linear", &pyc::int8_linear_cuda_impl);
  m.impl("int8_linear_w8a16", &pyc::int8_linear_w8a16_cuda_impl);
}
