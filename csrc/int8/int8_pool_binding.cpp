// Torch glue for max pooling of quantized images (CPU): the schema, argument checks and the CPU
// kernel's dispatch. The op contract is in int8/pool.h.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "common/cpu_features.h"
#include "common/torch_utils.h"
#include "int8/int8_pool_checks.h"
#include "int8/pool.h"

namespace pyc {
namespace {

at::Tensor int8_max_pool2d_cpu_impl(const at::Tensor& x_in, at::IntArrayRef kernel_size,
                                    at::IntArrayRef stride, at::IntArrayRef padding,
                                    at::IntArrayRef dilation, bool ceil_mode) {
  const Int8PoolGeom g = int8_pool_geom(x_in, kernel_size, stride, padding, dilation, ceil_mode);
  const at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor y = at::empty({g.N, g.C, g.Ho, g.Wo},
                           x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (y.numel() == 0) return y;
  const int isa = static_cast<int>(active_cpu_isa());
  const uint8_t* xp = static_cast<const uint8_t*>(x.data_ptr());
  uint8_t* yp = static_cast<uint8_t*>(y.data_ptr());
  const bool is_signed = x.scalar_type() == at::kChar;
  parallel_for_dynamic(0, g.N * g.Ho, row_grain(g.Wo * g.C * g.kh * g.kw), 4,
                       [&](int64_t b, int64_t e) {
                         int8_max_pool2d_cpu(isa, g, xp, is_signed, yp, b, e);
                       });
  return y;
}

}  // namespace
}  // namespace pyc

TORCH_LIBRARY_FRAGMENT(pycompress, m) {
  m.def(
      "int8_max_pool2d(Tensor x, int[2] kernel_size, int[2] stride, int[2] padding, "
      "int[2] dilation, bool ceil_mode) -> Tensor");
}

TORCH_LIBRARY_IMPL(pycompress, CPU, m) {
  m.impl("int8_max_pool2d", &pyc::int8_max_pool2d_cpu_impl);
}
