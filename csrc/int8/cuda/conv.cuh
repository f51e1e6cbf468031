// CUDA launchers for the int8 2-D convolution (torch-free; raw pointers + stream). The op
// contract is int8_conv2d's (csrc/int8/int8_conv_binding.cpp); in short:
//
//   acc[n, oy, ox, co] = sum over (ky, kx, c of the group) (x_q - zp[n]) * w      (exact, int32)
//   y = ((float)acc * x_scale[n]) * w_scale[co] + bias[co],
//   y = y + r with the residual r of the same output element (when there is one):
//       quantized: r = (float)(res_q - res_zp) * res_scale, float: r = its value,
//   then the activation, in fp32 (one rounded operation per step, never an FMA)
//   out = y cast to fp32 / fp16 / bf16, or clamp(nearbyint(y * out_inv) + out_zp) as uint8 / int8
//
// Padding positions hold the zero point (they add nothing to acc). Float x is first quantized
// to uint8 per image: with the given x_scale / x_zp (q = nearbyint(x * (1 / s)) + zp) or, dynamic,
// with the parameters int8_conv2d_dynamic_params computes (q = nearbyint(x / s) + zp).
#pragma once

#include <cuda_runtime.h>
#include <cstddef>
#include <cstdint>

namespace pyc {
namespace cuda {

enum class ConvSrc : int { U8 = 0, S8 = 1, F32 = 2, F16 = 3, BF16 = 4 };
enum class ConvAct : int { None = 0, Relu = 1, Relu6 = 2, Silu = 3, Hardswish = 4 };
enum class ConvOut : int { F32 = 0, F16 = 1, BF16 = 2, U8 = 3, S8 = 4 };
// The residual's element type (fp16 / bf16 residuals are widened to fp32 by the caller).
enum class ConvRes : int { None = 0, U8 = 1, S8 = 2, F32 = 3 };

struct Int8Conv2dArgs {
  // x: logical [N, C, H, W] with element strides (any layout; channels_last is the fast one)
  const void* x = nullptr;
  ConvSrc x_type = ConvSrc::U8;
  int64_t N = 0, C = 0, H = 0, W = 0;
  int64_t x_stride_n = 0, x_stride_c = 0, x_stride_h = 0, x_stride_w = 0;
  // per-image quantization of x, [N] each: the zero point in x's own range (uint8: 0..255,
  // int8: -128..127; float x: 0..255, the range of the uint8 it is quantized to)
  const float* x_scale = nullptr;
  const int32_t* x_zp = nullptr;
  bool x_dynamic = false;  // float x: q = nearbyint(x / s) + zp instead of x * (1 / s)
  // w: int8 [Cout, C / groups, kh, kw] contiguous; w_scale [Cout]; bias [Cout] or nullptr
  const int8_t* w = nullptr;
  const float* w_scale = nullptr;
  const float* bias = nullptr;
  int64_t Cout = 0, kh = 1, kw = 1;
  int64_t stride_h = 1, stride_w = 1, pad_h = 0, pad_w = 0, dil_h = 1, dil_w = 1;
  int64_t groups = 1;
  int64_t Ho = 0, Wo = 0;
  ConvAct act = ConvAct::None;
  ConvOut out_kind = ConvOut::F32;
  float out_inv = 1.f;  // 1.0f / out_scale (requantized outputs)
  int32_t out_zp = 0;
  void* out = nullptr;  // [N, Ho, Wo, Cout] contiguous (channels_last memory of [N, Cout, Ho, Wo])
  // residual added before the activation: [N, Ho, Wo, Cout] contiguous like out (element i of
  // out takes element i of res), or res_kind None
  const void* res = nullptr;
  ConvRes res_kind = ConvRes::None;
  float res_scale = 1.f;  // quantized residuals: r = (float)(res_q - res_zp) * res_scale
  int32_t res_zp = 0;     // in the residual's own range (uint8: 0..255, int8: -128..127)
};

// Largest K = kh * kw * C / groups for which no int32 sum of the kernels can overflow:
// |x_q - zp| <= 255 and |w| <= 128, so |acc| <= K * 32640 < 2^31 (also for the raw byte sums of
// the tensor-core path, |x_q| <= 255).
constexpr int64_t kInt8ConvMaxK = 65793;

// Bytes of device scratch that int8_conv2d_dynamic_params and int8_conv2d need for `a` (on the
// current device; the same value for both). Callers pass a buffer of at least that size.
size_t int8_conv2d_workspace_bytes(const Int8Conv2dArgs& a);

// Dynamic quantization parameters of float x, per image n over all of x[n]:
//   lo = min(0, min x), hi = max(0, max x), scale = (hi - lo) / 255 (1 when hi == lo),
//   zp = clamp(nearbyint(-lo / scale), 0, 255);
// nonfinite[n] = 1 where x[n] holds a NaN or an infinity (0 otherwise). Only the x fields and
// the shape fields that size the workspace are read.
cudaError_t int8_conv2d_dynamic_params(const Int8Conv2dArgs& a, float* scale, int32_t* zp,
                                       int32_t* nonfinite, void* workspace, cudaStream_t stream);

// The convolution. Every field of `a` must be set (x_scale / x_zp: [N] on the device).
cudaError_t int8_conv2d(const Int8Conv2dArgs& a, void* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace pyc
