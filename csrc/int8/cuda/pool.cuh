// CUDA launcher for max pooling of quantized NHWC images (torch-free; raw pointers + stream).
// The op contract is in int8/pool.h.
#pragma once

#include <cuda_runtime.h>

#include "int8/pool.h"

namespace pyc {
namespace cuda {

// x: [N, H, W, C] contiguous, y: [N, Ho, Wo, C] contiguous, both on the device.
cudaError_t int8_max_pool2d(const Int8PoolGeom& g, const uint8_t* x, bool is_signed, uint8_t* y,
                            cudaStream_t stream);

}  // namespace cuda
}  // namespace pyc
