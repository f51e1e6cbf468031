// Torch glue for the int8 family (CPU): schemas and CPU kernels.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/torch_utils.h"
#include "int8/quantize.h"

namespace pyc {
namespace {

std::tuple<at::Tensor, at::Tensor> quantize_per_token_cpu_impl(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.dim() == 2, "quantize_per_token: x must be 2-D [M, K], got ", x_in.dim(),
              "-D");
  const DType dt = to_dtype(x_in, "quantize_per_token: x");
  const at::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  auto q = at::empty({M, K}, x.options().dtype(at::kChar));
  auto scale = at::empty({M}, x.options().dtype(at::kFloat));
  if (M == 0) return {q, scale};
  const int64_t ldx = M > 1 ? x.stride(0) : K;
  const void* xp = x.data_ptr();
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = scale.data_ptr<float>();
  at::parallel_for(0, M, row_grain(K), [&](int64_t b, int64_t e) {
    quantize_per_token_cpu(xp, dt, ldx, qp, K, sp, b, e, K);
  });
  return {q, scale};
}

}  // namespace
}  // namespace pyc

TORCH_LIBRARY_FRAGMENT(pycompress, m) {
  m.def("quantize_per_token(Tensor x) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pycompress, CPU, m) {
  m.impl("quantize_per_token", &pyc::quantize_per_token_cpu_impl);
}
