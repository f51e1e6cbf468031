// The CPU kernels of torch.ops.pycompress.sparse_linear and semi24_linear as plain functions,
// for the Python modules' direct inference calls (see module_calls.cpp). Binding files only
// (uses ATen).
#pragma once

#include <ATen/ATen.h>

namespace pyc {

// Same checks and result as the registered CPU kernel.
at::Tensor sparse_linear_op_cpu(const at::Tensor& x, const at::Tensor& row_ptr,
                                const at::Tensor& col_idx, const at::Tensor& values,
                                const c10::optional<at::Tensor>& bias, int64_t in_features);

at::Tensor semi24_linear_op_cpu(const at::Tensor& x, const at::Tensor& values,
                                const at::Tensor& meta, const c10::optional<at::Tensor>& bias,
                                int64_t in_features);

}  // namespace pyc
