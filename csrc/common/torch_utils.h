// Glue shared by the binding files (the only place where torch meets kernels).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include "common/dtypes.h"

namespace pyc {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline DType to_dtype(const at::Tensor& t, const char* arg) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::F32;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default:
      TORCH_CHECK_TYPE(false, arg, " must be float32, float16 or bfloat16, got ",
                       t.scalar_type());
  }
  return DType::F32;
}

// Grain size for at::parallel_for over rows of `cols` elements: aim at ~32k
// elements per task so tiny problems stay on one thread.
inline int64_t row_grain(int64_t cols) {
  const int64_t target = 32768;
  int64_t g = cols > 0 ? target / cols : target;
  return g < 1 ? 1 : g;
}

}  // namespace pyc
