// Argument checks of the 2:4 ops shared by the CPU and CUDA bindings (second line of defence;
// pycompress.ops.semi24 validates first and names the arguments).
#pragma once

#include <ATen/ATen.h>

#include "common/torch_utils.h"
#include "sparse/semi24.h"

namespace pyc {

inline void check_semi24_buffers(const at::Tensor& values, const at::Tensor& meta,
                                 int64_t in_features, const char* op) {
  TORCH_CHECK(in_features >= 0, op, ": in_features must be >= 0");
  TORCH_CHECK(values.dim() == 2, op, ": values must be 2-D [N, Kp/2]");
  TORCH_CHECK(is_supported_float(values.scalar_type()), op,
              ": values must be float32, float16 or bfloat16");
  const int64_t N = values.size(0), Kp = semi24_padded_k(in_features);
  TORCH_CHECK(values.size(1) == Kp / 2, op, ": values must have ", Kp / 2,
              " columns for in_features=", in_features, ", got ", values.size(1));
  TORCH_CHECK(meta.scalar_type() == at::kShort, op, ": meta must be int16");
  TORCH_CHECK(meta.dim() == 3 && meta.size(0) == semi24_n_tiles(N) &&
                  meta.size(1) == Kp / kSemi24KTile && meta.size(2) == 32,
              op, ": meta must have shape [", semi24_n_tiles(N), ", ", Kp / kSemi24KTile,
              ", 32], got ", meta.sizes());
  TORCH_CHECK(values.device() == meta.device(), op, ": values and meta on different devices");
}

inline void check_semi24_linear(const at::Tensor& x, const at::Tensor& values,
                                const at::Tensor& meta, const c10::optional<at::Tensor>& bias,
                                int64_t in_features) {
  check_semi24_buffers(values, meta, in_features, "semi24_linear");
  TORCH_CHECK(x.dim() == 2, "semi24_linear: x must be 2-D [M, K], got ", x.dim(), "-D");
  TORCH_CHECK(x.size(1) == in_features, "semi24_linear: x has ", x.size(1),
              " columns, expected in_features=", in_features);
  to_dtype(x, "semi24_linear: x");
  TORCH_CHECK(x.device() == values.device(), "semi24_linear: x and values on different devices");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == values.size(0),
                "semi24_linear: bias must be 1-D [N]");
    to_dtype(*bias, "semi24_linear: bias");
    TORCH_CHECK(bias->device() == x.device(), "semi24_linear: bias on a different device");
  }
}

// Conversion-time ops (semi24_binding.cpp): they run on the CPU for tensors of any device and
// return their results on the input's device (registered for CPU and CUDA).
std::tuple<at::Tensor, at::Tensor> semi24_compress_op(const at::Tensor& w,
                                                      const c10::optional<at::Tensor>& mask,
                                                      c10::optional<at::ScalarType> dtype);
at::Tensor semi24_decompress_op(const at::Tensor& values, const at::Tensor& meta,
                                int64_t in_features);

}  // namespace pyc
