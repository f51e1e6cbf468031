// Torch glue for the fused KD softmax-KL family (CUDA kernels).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/torch_utils.h"
#include "kd/cuda/kd_kl.cuh"

namespace pyc {
namespace {

struct CudaArgs {
  at::Tensor s, t;
  int64_t N = 0, V = 0, lds = 0, ldt = 0;
  DType dt = DType::F32;
};

CudaArgs check_inputs(const at::Tensor& s_in, const at::Tensor& t_in, double temperature,
                      const char* op) {
  TORCH_CHECK(s_in.dim() == 2, op, ": student_logits must be 2-D [N, V], got ", s_in.dim(), "-D");
  TORCH_CHECK(s_in.sizes() == t_in.sizes(), op, ": student_logits ", s_in.sizes(),
              " and teacher_logits ", t_in.sizes(), " must have the same shape");
  TORCH_CHECK(s_in.scalar_type() == t_in.scalar_type(), op,
              ": student_logits and teacher_logits must have the same dtype");
  TORCH_CHECK(s_in.device() == t_in.device(), op, ": tensors must be on the same device");
  TORCH_CHECK(temperature > 0, op, ": temperature must be > 0, got ", temperature);
  CudaArgs a;
  a.dt = to_dtype(s_in, op);  // float64 is a CPU-only path
  a.s = s_in.stride(1) == 1 ? s_in : s_in.contiguous();
  a.t = t_in.stride(1) == 1 ? t_in : t_in.contiguous();
  a.N = a.s.size(0);
  a.V = a.s.size(1);
  TORCH_CHECK(a.N == 0 || a.V > 0, op, ": the class (last) dimension must not be empty");
  TORCH_CHECK(a.N <= 0x7fffffffLL, op, ": too many rows for one launch");
  a.lds = a.N > 1 ? a.s.stride(0) : a.V;
  a.ldt = a.N > 1 ? a.t.stride(0) : a.V;
  return a;
}

at::Tensor checked_vec(const at::Tensor& c, const CudaArgs& a, const char* op, const char* name) {
  TORCH_CHECK(c.dim() == 1 && c.size(0) == a.N, op, ": ", name, " must have shape [", a.N,
              "], got ", c.sizes());
  return c.to(a.s.device(), at::kFloat).contiguous();
}

void check_err(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, " CUDA kernel failed: ", cudaGetErrorString(err));
}

std::tuple<at::Tensor, at::Tensor> kd_forward_cuda(const at::Tensor& student,
                                                   const at::Tensor& teacher, double temperature,
                                                   bool reverse) {
  const c10::cuda::CUDAGuard guard(student.device());
  const CudaArgs a = check_inputs(student, teacher, temperature, "kd_kl_div_forward");
  auto opts = a.s.options().dtype(at::kFloat);
  auto loss = at::empty({a.N}, opts);
  auto stats = at::empty({a.N, cuda::kKdStats}, opts);
  check_err(cuda::kd_forward(a.s.data_ptr(), a.t.data_ptr(), a.dt, a.lds, a.ldt, a.N, a.V,
                             static_cast<float>(temperature), reverse, stats.data_ptr<float>(),
                             loss.data_ptr<float>(), nullptr, nullptr,
                             at::cuda::getCurrentCUDAStream()),
            "kd_kl_div_forward");
  return {loss, stats};
}

at::Tensor kd_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& student,
                            const at::Tensor& teacher, const at::Tensor& stats_in,
                            double temperature, bool reverse) {
  const c10::cuda::CUDAGuard guard(student.device());
  const CudaArgs a = check_inputs(student, teacher, temperature, "kd_kl_div_backward");
  const at::Tensor coef = checked_vec(grad_loss, a, "kd_kl_div_backward", "grad_loss");
  TORCH_CHECK(stats_in.dim() == 2 && stats_in.size(0) == a.N &&
                  stats_in.size(1) == cuda::kKdStats,
              "kd_kl_div_backward: stats must have shape [", a.N, ", ", cuda::kKdStats, "]");
  const at::Tensor stats = stats_in.to(a.s.device(), at::kFloat).contiguous();
  auto grad = at::empty({a.N, a.V}, a.s.options());
  check_err(cuda::kd_backward(coef.data_ptr<float>(), a.s.data_ptr(), a.t.data_ptr(), a.dt, a.lds,
                              a.ldt, a.N, a.V, static_cast<float>(temperature), reverse,
                              stats.data_ptr<float>(), grad.data_ptr(),
                              at::cuda::getCurrentCUDAStream()),
            "kd_kl_div_backward");
  return grad;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kd_fused_cuda(const at::Tensor& student,
                                                             const at::Tensor& teacher,
                                                             const at::Tensor& coef_in,
                                                             double temperature, bool reverse) {
  const c10::cuda::CUDAGuard guard(student.device());
  const CudaArgs a = check_inputs(student, teacher, temperature, "kd_kl_div_fused");
  const at::Tensor coef = checked_vec(coef_in, a, "kd_kl_div_fused", "coef");
  auto opts = a.s.options().dtype(at::kFloat);
  auto loss = at::empty({a.N}, opts);
  auto stats = at::empty({a.N, cuda::kKdStats}, opts);
  auto grad = at::empty({a.N, a.V}, a.s.options());
  check_err(cuda::kd_forward(a.s.data_ptr(), a.t.data_ptr(), a.dt, a.lds, a.ldt, a.N, a.V,
                             static_cast<float>(temperature), reverse, stats.data_ptr<float>(),
                             loss.data_ptr<float>(), coef.data_ptr<float>(), grad.data_ptr(),
                             at::cuda::getCurrentCUDAStream()),
            "kd_kl_div_fused");
  return {loss, stats, grad};
}

}  // namespace
}  // namespace pyc

TORCH_LIBRARY_IMPL(pycompress, CUDA, m) {
  m.impl("kd_kl_div_forward", &pyc::kd_forward_cuda);
  m.impl("kd_kl_div_backward", &pyc::kd_backward_cuda);
  m.impl("kd_kl_div_fused", &pyc::kd_fused_cuda);
}
