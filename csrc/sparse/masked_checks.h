// Argument checks and small tensor helpers shared by the MaskedLinear bindings (CPU and CUDA);
// torch-facing.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace pyc {

inline void check_masked(const char* op, const at::Tensor& w, const at::Tensor& mask) {
  TORCH_CHECK(w.dim() == 2, op, ": weight must be 2-D [N, K]");
  TORCH_CHECK(mask.scalar_type() == at::kBool, op, ": mask must be bool");
  TORCH_CHECK(mask.sizes() == w.sizes(), op, ": mask shape ", mask.sizes(),
              " differs from weight shape ", w.sizes());
}

// masked_linear(x [M, K], weight [N, K], mask [N, K], bias [N] or None)
inline void check_masked_linear_args(const at::Tensor& x, const at::Tensor& w,
                                     const at::Tensor& mask,
                                     const c10::optional<at::Tensor>& bias) {
  check_masked("masked_linear", w, mask);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == w.size(1),
              "masked_linear: x must be [M, K] with K = weight.size(1)");
  if (bias.has_value())
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.size(0), "masked_linear: bias must be [N]");
}

// masked_linear_grad_input(grad [M, N], weight [N, K], mask [N, K])
inline void check_masked_grad_input_args(const at::Tensor& g, const at::Tensor& w,
                                         const at::Tensor& mask) {
  check_masked("masked_linear_grad_input", w, mask);
  TORCH_CHECK(g.dim() == 2 && g.size(1) == w.size(0),
              "masked_linear_grad_input: grad must be [M, N]");
}

// masked_linear_grad_weight(grad [M, N], x [M, K], mask [N, K])
inline void check_masked_grad_weight_args(const at::Tensor& g, const at::Tensor& x,
                                          const at::Tensor& mask) {
  TORCH_CHECK(mask.dim() == 2 && mask.scalar_type() == at::kBool,
              "masked_linear_grad_weight: mask must be bool [N, K]");
  TORCH_CHECK(g.dim() == 2 && x.dim() == 2 && g.size(0) == x.size(0) &&
                  g.size(1) == mask.size(0) && x.size(1) == mask.size(1),
              "masked_linear_grad_weight: expected grad [M, N], x [M, K], mask [N, K]");
}

// fp32 contiguous copy (or the tensor itself when it already is one): the kernels compute in fp32.
inline at::Tensor as_f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

inline const uint8_t* mask_bytes(const at::Tensor& m) {
  return reinterpret_cast<const uint8_t*>(m.data_ptr<bool>());
}

}  // namespace pyc
