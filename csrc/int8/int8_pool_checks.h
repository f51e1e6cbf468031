// Argument checks of int8_max_pool2d shared by the CPU and CUDA glue (torch's own rules for
// max pooling, plus the quantized dtypes).
#pragma once

#include <ATen/ATen.h>

#include "int8/pool.h"

namespace pyc {

inline Int8PoolGeom int8_pool_geom(const at::Tensor& x, at::IntArrayRef kernel_size,
                                   at::IntArrayRef stride, at::IntArrayRef padding,
                                   at::IntArrayRef dilation, bool ceil_mode) {
  constexpr const char* op = "int8_max_pool2d";
  TORCH_CHECK_TYPE(x.scalar_type() == at::kByte || x.scalar_type() == at::kChar, op,
                   ": x must be uint8 or int8, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 4, op, ": x must be 4-D [N, C, H, W], got shape ", x.sizes());
  TORCH_CHECK_VALUE(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2 &&
                        dilation.size() == 2,
                    op, ": kernel_size, stride, padding and dilation must have 2 values each");
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK_VALUE(kernel_size[i] >= 1 && stride[i] >= 1 && dilation[i] >= 1 && padding[i] >= 0,
                      op, ": kernel_size, stride and dilation must be >= 1 and padding >= 0, got ",
                      kernel_size, ", ", stride, ", ", dilation, ", ", padding);
    TORCH_CHECK_VALUE(padding[i] <= kernel_size[i] / 2, op,
                      ": padding must be at most half of the kernel size, got padding ", padding,
                      " for kernel_size ", kernel_size);
  }
  Int8PoolGeom g;
  g.N = x.size(0);
  g.C = x.size(1);
  g.H = x.size(2);
  g.W = x.size(3);
  g.kh = kernel_size[0];
  g.kw = kernel_size[1];
  g.sh = stride[0];
  g.sw = stride[1];
  g.ph = padding[0];
  g.pw = padding[1];
  g.dh = dilation[0];
  g.dw = dilation[1];
  g.Ho = int8_pool_out_size(g.H, g.kh, g.sh, g.ph, g.dh, ceil_mode);
  g.Wo = int8_pool_out_size(g.W, g.kw, g.sw, g.pw, g.dw, ceil_mode);
  TORCH_CHECK_VALUE(g.Ho > 0 && g.Wo > 0, op, ": the input of spatial size ", g.H, " x ", g.W,
                    " with padding ", padding, " is smaller than the dilated kernel ",
                    kernel_size);
  return g;
}

}  // namespace pyc
