// The CPU kernel of torch.ops.pycompress.sparse_linear as a plain function, for the Python
// module's direct inference call (see module_calls.cpp). Binding files only (uses ATen).
#pragma once

#include <ATen/ATen.h>

namespace pyc {

// Same checks and result as the registered CPU kernel.
at::Tensor sparse_linear_cpu(const at::Tensor& x, const at::Tensor& row_ptr,
                             const at::Tensor& col_idx, const at::Tensor& values,
                             const c10::optional<at::Tensor>& bias, int64_t in_features);

}  // namespace pyc
