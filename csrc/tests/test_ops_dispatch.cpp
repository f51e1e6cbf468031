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

  // sparse_linear with the layout sparse_decode_layout returns (sparse.h): the dense product,
  // with or without the layout, and a layout that no longer matches its arrays is not used
  using Layout = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, bool);
  using Linear = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, const c10::optional<at::Tensor>&, int64_t,
                            const c10::optional<at::Tensor>&);
  auto layout_op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pycompress::sparse_decode_layout", "")
                       .typed<Layout>();
  auto linear_op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("pycompress::sparse_linear", "")
                       .typed<Linear>();
  at::manual_seed(0);
  const int64_t N = 300, K = 70;
  at::Tensor w = at::randn({N, K}) * (at::rand({N, K}) > 0.8);
  at::Tensor nz = w.ne(0);
  at::Tensor row_ptr = at::cat({at::zeros({1}, at::kInt), nz.sum(1).cumsum(0).to(at::kInt)});
  at::Tensor idx = nz.nonzero();
  at::Tensor col_idx = idx.select(1, 1).to(at::kShort).contiguous();
  at::Tensor values = w.masked_select(nz).contiguous();  // row-major, as nonzero()
  at::Tensor layout = layout_op.call(row_ptr, col_idx, values, K, true);
  PYC_EXPECT(layout.scalar_type() == at::kByte && layout.numel() >= 256, "layout tensor");
  for (int64_t M : {1, 5}) {
    at::Tensor xs = at::randn({M, K});
    at::Tensor ref = at::matmul(xs, w.t());
    for (bool with : {false, true}) {
      at::Tensor y = linear_op.call(xs, row_ptr, col_idx, values, c10::nullopt, K,
                                    with ? c10::optional<at::Tensor>(layout) : c10::nullopt);
      PYC_EXPECT(at::allclose(y, ref, 1e-4, 1e-4), "sparse_linear with and without the layout");
    }
  }
  values.mul_(2);  // the layout is stale now: the call must see the new values
  at::Tensor x1 = at::randn({1, K});
  at::Tensor y = linear_op.call(x1, row_ptr, col_idx, values, c10::nullopt, K, layout);
  PYC_EXPECT(at::allclose(y, at::matmul(x1, (2 * w).t()), 1e-4, 1e-4), "a stale layout is not used");
  return pyc_test::finish("test_ops_dispatch");
}
