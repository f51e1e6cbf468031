// Small helpers shared by the torch-free CUDA kernels.
#pragma once

#include <cuda_runtime.h>
#include <cstdint>

namespace pyc {

inline unsigned int ceil_div_u(int64_t a, int64_t b) {
  return static_cast<unsigned int>((a + b - 1) / b);
}

}  // namespace pyc
