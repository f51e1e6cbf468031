// Calls the registered ops through the libtorch dispatcher (no Python) to prove that the
// op library registers its schemas and CPU kernels.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "test_harness.h"

int main() {
  auto op = c10::Dispatcher::singleton()
                .findSchemaOrThrow("pycompress::quantize_per_token", "")
                .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&)>();
  at::Tensor x = at::tensor({1.0f, -2.0f, 0.5f, 0.0f, 0.0f, 0.0f}).reshape({2, 3});
  auto [q, s] = op.call(x);
  PYC_EXPECT(q.scalar_type() == at::kChar && s.scalar_type() == at::kFloat, "dtypes");
  PYC_EXPECT(q[0][0].item<int>() == 64 && q[0][1].item<int>() == -127 && q[0][2].item<int>() == 32,
             "row 0 values");
  PYC_EXPECT(s[1].item<float>() == 1.0f && q[1].abs().sum().item<int>() == 0, "zero row");
  bool threw = false;
  try {
    op.call(at::ones({2, 2, 2}));
  } catch (const c10::Error&) {
    threw = true;
  }
  PYC_EXPECT(threw, "3-D input must be rejected");
  return pyc_test::finish("test_ops_dispatch");
}
