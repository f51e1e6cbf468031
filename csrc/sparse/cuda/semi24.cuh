// 2:4 semi-structured sparse linear on sparse tensor cores (sm_80+), torch-free launcher.
// Format of values/meta: see sparse/semi24.h.
#pragma once

#include <cuda_runtime.h>
#include <cstdint>

#include "common/dtypes.h"

namespace pyc {
namespace cuda {

// y [M, N] (row-major, dtype ydt) = x [M, K] @ W^T + bias with W given by values/meta.
// x and values share the compute dtype `dt` (F16 or BF16); bias (nullable) is fp32 [N].
// Layout requirements (checked; cudaErrorInvalidValue otherwise): x rows 16-byte aligned with
// ldx a multiple of 8 elements and at least Kx = round_up(K, 8) readable columns, the columns
// K .. Kx-1 being zero; values contiguous [N, Kp/2] and meta contiguous, both 16-byte aligned.
// Accumulates in fp32. Returns the launch error (the device must be sm_80 or newer).
cudaError_t semi24_linear(const void* x, int64_t ldx, int64_t M, int64_t K, const void* values,
                          const int16_t* meta, const float* bias, DType dt, void* y, DType ydt,
                          int64_t N, cudaStream_t stream);

}  // namespace cuda
}  // namespace pyc
