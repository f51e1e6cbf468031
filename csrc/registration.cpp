// The pycompress operator namespace. Each op family declares its schemas with
// TORCH_LIBRARY_FRAGMENT(pycompress, m) in its own binding file and registers
// its CPU/CUDA kernels with TORCH_LIBRARY_IMPL; fake (meta) kernels and
// autograd formulas are registered from Python (pycompress/ops/).
#include <torch/library.h>

TORCH_LIBRARY(pycompress, m) {
  m.def("version() -> int", [](void) -> int64_t { return 1; });
}
