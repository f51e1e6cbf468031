// Argument checks shared by the int8 binding files (CPU and CUDA); torch-facing.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>

#include "common/torch_utils.h"

namespace pyc {

inline void check_2d_int8(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D, got ", t.dim(), "-D");
  TORCH_CHECK_TYPE(t.scalar_type() == at::kChar, op, ": ", name, " must be int8, got ",
                   t.scalar_type());
}

// x [M, K] float, w int8 [N, K], w_scale float32 [N], bias float [N] or None, one device.
inline void check_linear_args(const at::Tensor& x, const at::Tensor& w, const at::Tensor& w_scale,
                              const c10::optional<at::Tensor>& bias, const char* op) {
  TORCH_CHECK(x.dim() == 2, op,
              ": x must be 2-D [M, K] (the Python wrapper flattens leading dims), got ", x.dim(),
              "-D");
  to_dtype(x, op);
  check_2d_int8(w, op, "w");
  TORCH_CHECK(x.size(1) == w.size(1), op, ": x has K=", x.size(1), " but w is ", w.sizes());
  TORCH_CHECK(w.size(0) >= 1 && w.size(1) >= 1, op, ": w must be non-empty");
  TORCH_CHECK_TYPE(w_scale.scalar_type() == at::kFloat, op, ": w_scale must be float32");
  TORCH_CHECK(w_scale.dim() == 1 && w_scale.size(0) == w.size(0), op,
              ": w_scale must have shape [N] = [", w.size(0), "], got ", w_scale.sizes());
  TORCH_CHECK(x.device() == w.device() && w.device() == w_scale.device(), op,
              ": all tensors must be on the same device");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == w.size(0), op,
                ": bias must have shape [N] = [", w.size(0), "], got ", bias->sizes());
    TORCH_CHECK_TYPE(is_supported_float(bias->scalar_type()), op,
                     ": bias must be float32, float16 or bfloat16");
    TORCH_CHECK(bias->device() == w.device(), op, ": bias must be on the device of w");
  }
}

// The residual of int8_conv2d: [N, Cout, Ho, Wo] on x's device, uint8 / int8 (with a finite
// residual_scale > 0 in fp32 and a zero point in the dtype's range) or float32 / float16 /
// bfloat16. Returns whether it is quantized.
inline bool check_conv_residual(const at::Tensor& r, const char* op, int64_t N, int64_t Cout, int64_t Ho,
                                int64_t Wo, const at::Device& device, double residual_scale,
                                int64_t residual_zero_point) {
  const at::ScalarType rt = r.scalar_type();
  const bool quantized = rt == at::kByte || rt == at::kChar;
  TORCH_CHECK_TYPE(quantized || is_supported_float(rt), op,
                   ": residual must be uint8, int8, float32, float16 or bfloat16, got ", rt);
  TORCH_CHECK_VALUE(r.dim() == 4 && r.size(0) == N && r.size(1) == Cout && r.size(2) == Ho && r.size(3) == Wo,
                    op, ": residual must have the output's shape [N, Cout, Ho, Wo] = [", N, ", ", Cout, ", ", Ho,
                    ", ", Wo, "], got ", r.sizes());
  TORCH_CHECK_VALUE(r.device() == device, op, ": residual must be on x's device (", device, "), got ",
                    r.device());
  if (quantized) {
    const float rscale = static_cast<float>(residual_scale);
    TORCH_CHECK_VALUE(std::isfinite(rscale) && rscale > 0.f, op,
                      ": residual_scale must be finite and > 0 (in float32) for a quantized residual, got ",
                      residual_scale);
    const int64_t lo = rt == at::kByte ? 0 : -128, hi = rt == at::kByte ? 255 : 127;
    TORCH_CHECK_VALUE(residual_zero_point >= lo && residual_zero_point <= hi, op,
                      ": residual_zero_point must lie in [", lo, ", ", hi, "] for a ", rt, " residual, got ",
                      residual_zero_point);
  }
  return quantized;
}

}  // namespace pyc
