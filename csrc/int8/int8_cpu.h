// The CPU kernel of torch.ops.pycompress.int8_linear as a plain function, for the Python
// module's direct inference call (see module_calls.cpp). Binding files only (uses ATen).
#pragma once

#include <ATen/ATen.h>

namespace pyc {

// Same checks and result as the registered CPU kernel.
at::Tensor int8_linear_op_cpu(const at::Tensor& x, const at::Tensor& w,
                              const at::Tensor& w_scale, const c10::optional<at::Tensor>& bias,
                              const c10::optional<at::Tensor>& w_packed, int64_t act_bits);

}  // namespace pyc
