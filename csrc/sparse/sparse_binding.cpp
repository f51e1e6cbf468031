// Torch glue for the sparse family (CPU): schemas and CPU kernels of SparseLinear (CSR, its
// single-row decode layout, and the autograd of sparse_linear) and MaskedLinear (fused masked
// matmul and its gradients).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/cpu_features.h"
#include "common/torch_utils.h"
#include "sparse/masked_checks.h"
#include "sparse/sparse.h"

namespace pyc {
namespace {

// Shape, dtype and device checks of the CSR arguments (O(1), every call).
void check_csr_args(const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& values,
                    int64_t in_features, const char* op) {
  TORCH_CHECK(in_features >= 0, op, ": in_features must be >= 0, got ", in_features);
  TORCH_CHECK(row_ptr.dim() == 1 && row_ptr.size(0) >= 1 && row_ptr.scalar_type() == at::kInt,
              op, ": row_ptr must be a 1-D int32 tensor [N + 1]");
  TORCH_CHECK(col_idx.dim() == 1 && (col_idx.scalar_type() == at::kShort ||
                                     col_idx.scalar_type() == at::kInt),
              op, ": col_idx must be a 1-D int16 or int32 tensor");
  TORCH_CHECK(col_idx.scalar_type() == at::kInt || in_features <= 32768,
              op, ": int16 col_idx needs in_features <= 32768");
  TORCH_CHECK(values.dim() == 1 && values.scalar_type() == at::kFloat,
              op, ": values must be a 1-D float32 tensor");
  TORCH_CHECK(values.size(0) == col_idx.size(0), op, ": values and col_idx differ in size");
  TORCH_CHECK(row_ptr.is_cpu() && col_idx.is_cpu() && values.is_cpu(), op,
              ": all tensors must be on the same device (CPU)");
}

void check_csr(const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_idx,
               const at::Tensor& values, const c10::optional<at::Tensor>& bias,
               int64_t in_features) {
  TORCH_CHECK(x.dim() == 2, "sparse_linear: x must be 2-D [M, K], got ", x.dim(), "-D");
  TORCH_CHECK(x.size(1) == in_features, "sparse_linear: x has ", x.size(1),
              " columns, expected in_features=", in_features);
  check_csr_args(row_ptr, col_idx, values, in_features, "sparse_linear");
  const int64_t N = row_ptr.size(0) - 1;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->scalar_type() == at::kFloat,
                "sparse_linear: bias must be float32 [N]");
  }
  TORCH_CHECK(x.is_cpu() && (!bias.has_value() || bias->is_cpu()),
              "sparse_linear: all tensors must be on the same device (CPU)");
}

// Structural check of the CSR arrays (branch-free reductions the compiler vectorizes, so the
// check costs a few percent of the product; keeps a corrupt buffer from reading out of bounds).
template <typename I>
bool indices_in_range(const I* c, int64_t nnz, int64_t K) {
  int64_t lo = 0, hi = 0;
  if (nnz == 0) return true;
  I mn = c[0], mx = c[0];
  for (int64_t i = 0; i < nnz; ++i) {
    mn = c[i] < mn ? c[i] : mn;
    mx = c[i] > mx ? c[i] : mx;
  }
  lo = mn;
  hi = mx;
  return lo >= 0 && hi < K;
}

void check_csr_content(const at::Tensor& row_ptr, const at::Tensor& col_idx, int64_t K) {
  const int64_t N = row_ptr.size(0) - 1;
  const int32_t* rp = row_ptr.data_ptr<int32_t>();
  TORCH_CHECK(rp[0] == 0 && rp[N] == col_idx.size(0),
              "sparse_linear: row_ptr must start at 0 and end at nnz");
  int bad = 0;
  for (int64_t n = 0; n < N; ++n) bad |= rp[n] > rp[n + 1];
  TORCH_CHECK(!bad, "sparse_linear: row_ptr must be non-decreasing");
}

// Column indices of rows [n0, n1) (checked by each task on its own rows, just before use).
void check_rows(const int32_t* rp, const void* ci, bool idx16, int64_t n0, int64_t n1,
                int64_t K) {
  const int64_t p0 = rp[n0], cnt = rp[n1] - rp[n0];
  const bool ok = idx16 ? indices_in_range(static_cast<const int16_t*>(ci) + p0, cnt, K)
                        : indices_in_range(static_cast<const int32_t*>(ci) + p0, cnt, K);
  TORCH_CHECK(ok, "sparse_linear: col_idx out of range [0, ", K, ")");
}

int64_t address_of(const at::Tensor& t) {
  return static_cast<int64_t>(reinterpret_cast<intptr_t>(t.data_ptr()));
}

// ---------------------------------------------------------------- decode layout
// sparse_decode_layout: checks the CSR arrays completely and returns them packed for M == 1
// (sparse.h, "Packed decode layout"): the chunked layout on AVX-512 where its cost model expects
// a gain, else the sliced one on AVX2 and up; the header alone (kind Checked) with pack=False,
// on scalar CPUs, or for inference tensors (they have no version counter to record).
at::Tensor sparse_decode_layout_cpu(const at::Tensor& row_ptr_in, const at::Tensor& col_idx_in,
                                    const at::Tensor& values_in, int64_t in_features, bool pack) {
  check_csr_args(row_ptr_in, col_idx_in, values_in, in_features, "sparse_decode_layout");
  const at::Tensor row_ptr = row_ptr_in.contiguous(), col_idx = col_idx_in.contiguous(),
                   values = values_in.contiguous();
  const int64_t N = row_ptr.size(0) - 1, K = in_features, nnz = values.size(0);
  check_csr_content(row_ptr, col_idx, K);
  const int32_t* rp = row_ptr.data_ptr<int32_t>();
  const bool idx16 = col_idx.scalar_type() == at::kShort;
  const void* ci = col_idx.data_ptr();
  at::parallel_for(0, N, std::max<int64_t>(1, 32768 / (nnz / std::max<int64_t>(1, N) + 1)),
                   [&](int64_t n0, int64_t n1) { check_rows(rp, ci, idx16, n0, n1, K); });
  const bool tracked = !row_ptr_in.is_inference() && !col_idx_in.is_inference() &&
                       !values_in.is_inference();
  const CpuIsa isa = active_cpu_isa();
  ChunkedLayout chunked;
  SellLayout sell;
  const ChunkedLayout* cp = nullptr;
  const SellLayout* sp = nullptr;
  if (pack && tracked && N > 0 && isa >= CpuIsa::Avx2) {
    const float* v = values.data_ptr<float>();
    if (isa >= CpuIsa::Avx512) chunked_pack_cpu(rp, ci, idx16, v, N, K, chunked);
    if (chunked.steps > 0) {
      cp = &chunked;
    } else {
      sell_pack_cpu(rp, ci, idx16, v, N, K, sell);
      sp = &sell;
    }
  }
  DecodeLayoutHeader h;
  const int64_t bytes = decode_layout_plan(cp, sp, N, K, nnz, h);
  const at::Tensor* csr[3] = {&row_ptr_in, &col_idx_in, &values_in};
  for (int i = 0; i < 3; ++i) {
    h.csr_data[i] = address_of(*csr[i]);
    h.csr_version[i] = tracked ? csr[i]->_version() : -1;
  }
  at::Tensor out = at::empty({bytes}, row_ptr_in.options().dtype(at::kByte));
  TORCH_CHECK(reinterpret_cast<uintptr_t>(out.data_ptr()) % 64 == 0,
              "sparse_decode_layout: the allocator returned memory that is not 64-byte aligned");
  decode_layout_write(h, cp, sp, out.data_ptr<uint8_t>());
  return out;
}

// A decode layout as read for one call.
struct LayoutUse {
  bool current = false;  // built from these very CSR arrays, all unchanged since
  DecodeLayoutHeader h;
  ChunkedView chunked;
  SellView sell;
};

// Reads `layout` (a malformed one is an error) and tells whether it is current for the CSR
// arrays: same sizes, same addresses and version counters as recorded when it was built, and the
// layout itself never written to since (version 0). A stale layout is not an error: the call
// then runs on the CSR arrays, checked.
LayoutUse read_layout(const at::Tensor& layout, const at::Tensor& row_ptr,
                      const at::Tensor& col_idx, const at::Tensor& values, int64_t K,
                      const char* op) {
  LayoutUse u;
  TORCH_CHECK(layout.scalar_type() == at::kByte && layout.dim() == 1 && layout.is_cpu(), op,
              ": layout must be the 1-D uint8 CPU tensor that sparse_decode_layout returns");
  if (layout.numel() == 0 || !layout.is_contiguous() ||
      reinterpret_cast<uintptr_t>(layout.data_ptr()) % 64 != 0)
    return u;
  const char* err = decode_layout_read(layout.data_ptr<uint8_t>(), layout.numel(), u.h,
                                       u.chunked, u.sell);
  TORCH_CHECK(err == nullptr, op, ": layout is not a sparse_decode_layout result (", err, ")");
  if (layout.is_inference() || layout._version() != 0) return u;
  const at::Tensor* csr[3] = {&row_ptr, &col_idx, &values};
  for (int i = 0; i < 3; ++i) {
    if (csr[i]->is_inference() || !csr[i]->is_contiguous() || u.h.csr_version[i] < 0 ||
        u.h.csr_data[i] != address_of(*csr[i]) || u.h.csr_version[i] != csr[i]->_version())
      return u;
  }
  u.current = u.h.n_rows == row_ptr.size(0) - 1 && u.h.in_features == K &&
              u.h.nnz == values.size(0);
  return u;
}

// sparse_decode_layout_info: [kind (-1: no layout), bytes, current (0/1)].
std::vector<int64_t> sparse_decode_layout_info_cpu(const at::Tensor& layout,
                                                   const at::Tensor& row_ptr,
                                                   const at::Tensor& col_idx,
                                                   const at::Tensor& values, int64_t in_features) {
  check_csr_args(row_ptr, col_idx, values, in_features, "sparse_decode_layout_info");
  const LayoutUse u = read_layout(layout, row_ptr, col_idx, values, in_features,
                                  "sparse_decode_layout_info");
  if (layout.numel() == 0) return {-1, 0, 0};
  return {u.h.magic == kDecodeLayoutMagic ? u.h.kind : -1, layout.numel(), u.current ? 1 : 0};
}

// ---------------------------------------------------------------- sparse_linear
at::Tensor sparse_linear_cpu_op(const at::Tensor& x_in, const at::Tensor& row_ptr_in,
                                const at::Tensor& col_idx_in, const at::Tensor& values_in,
                                const c10::optional<at::Tensor>& bias_in, int64_t in_features,
                                const c10::optional<at::Tensor>& layout) {
  check_csr(x_in, row_ptr_in, col_idx_in, values_in, bias_in, in_features);
  to_dtype(x_in, "sparse_linear: x");
  LayoutUse use;
  if (layout.has_value())
    use = read_layout(*layout, row_ptr_in, col_idx_in, values_in, in_features, "sparse_linear");
  // a current layout vouches for the CSR arrays: checked when it was built, unchanged since
  const bool known = use.current;
  const at::Tensor row_ptr = row_ptr_in.contiguous();
  const at::Tensor col_idx = col_idx_in.contiguous();
  const at::Tensor values = values_in.contiguous();
  at::Tensor bias;
  if (bias_in.has_value()) bias = bias_in->contiguous();
  const int64_t M = x_in.size(0), K = in_features, N = row_ptr.size(0) - 1;
  if (!known) check_csr_content(row_ptr, col_idx, K);
  const CpuIsa isa = active_cpu_isa();
  const bool idx16 = col_idx.scalar_type() == at::kShort;
  const int32_t* rp = row_ptr.data_ptr<int32_t>();
  const void* ci = col_idx.data_ptr();
  const float* v = values.data_ptr<float>();
  const float* b = bias.defined() ? bias.data_ptr<float>() : nullptr;
  const int64_t nnz = values.size(0);
  if (M == 0 || N == 0) return at::zeros({M, N}, x_in.options());
  // fp32 copy of x only when needed (fp16/bf16 input, or a non-unit column stride)
  const at::Tensor x = x_in.scalar_type() == at::kFloat && (x_in.stride(1) == 1 || K <= 1)
                           ? x_in
                           : x_in.to(at::kFloat).contiguous();
  const float* xs = x.data_ptr<float>();
  const int64_t ldx = x.stride(0);
  at::Tensor y = at::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  // tasks of at least ~32k multiply-adds: below that, waking the thread pool costs more than it
  // saves, so small products stay on one thread
  const int64_t avg = (nnz + N - 1) / N + 1;
  const int64_t windows = (N + kSellWindow - 1) / kSellWindow;
  if (M == 1 && known && use.h.kind == kDecodeChunked && isa >= CpuIsa::Avx512) {
    // the chunked layout: tasks are whole 256-row windows (see SellLayout) of at least ~32k
    // multiply-adds
    const ChunkedView& L = use.chunked;
    std::vector<float, Aligned64<float>> xq(static_cast<size_t>(chunked_x_size(L.n_chunks)));
    chunked_pad_x(xs, K, L.n_chunks, xq.data());
    const int64_t work = L.n_slices * L.n_chunks * L.steps * 16 +
                         (L.rest.n_slices ? L.rest.slice_off[L.rest.n_slices] : 0);
    const int64_t per_window = std::max<int64_t>(1, work / windows);
    parallel_for_dynamic(0, windows, 32768 / per_window, 8, [&](int64_t w0, int64_t w1) {
      chunked_gemv_cpu(isa, xq.data(), L, b, yp, w0, w1);
    });
    return x_in.scalar_type() == at::kFloat ? y : y.to(x_in.scalar_type());
  }
  if (M == 1 && known && use.h.kind == kDecodeSliced && isa >= CpuIsa::Avx2) {
    // the sliced layout (no per-row tails or horizontal sums), whole 256-row windows per task
    const SellView& L = use.sell;
    // x and the zero activation the padding entries point at (x_pad[K])
    std::vector<float> xpad;
    xpad.reserve(static_cast<size_t>(K) + 1);
    xpad.assign(xs, xs + K);
    xpad.push_back(0.f);
    const int64_t* off = L.slice_off;
    const int64_t ns = L.n_slices;
    constexpr int64_t spw = kSellWindow / 8;  // slices per window
    const int64_t per_window = std::max<int64_t>(1, off[ns] / windows);
    parallel_for_dynamic(0, windows, 32768 / per_window, 8, [&](int64_t w0, int64_t w1) {
      sell_gemv_cpu(isa, xpad.data(), L, b, yp, w0 * spw, std::min(ns, w1 * spw));
    });
    return x_in.scalar_type() == at::kFloat ? y : y.to(x_in.scalar_type());
  }
  if (M == 1) {
    const int64_t grain = std::max<int64_t>(1, 32768 / avg);
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
      if (!known) check_rows(rp, ci, idx16, n0, n1, K);
      csr_gemv_cpu(isa, xs, rp, ci, idx16, v, b, yp, n0, n1);
    });
    return x_in.scalar_type() == at::kFloat ? y : y.to(x_in.scalar_type());
  }
  const int64_t Mp = csr_padded_m(isa, M);
  // xT [K, Mp] after one zero row (xT[-1] == 0)
  at::Tensor xTz = at::empty({K + 1, Mp}, x.options());
  float* xtp = xTz.data_ptr<float>() + Mp;
  std::memset(xtp - Mp, 0, sizeof(float) * Mp);
  at::parallel_for(0, K, std::max<int64_t>(64, 131072 / Mp), [&](int64_t k0, int64_t k1) {
    transpose_pad_cpu(isa, xs, ldx, M, Mp, xtp, k0, k1);
  });
  const int64_t grain = std::max<int64_t>(1, 32768 / (avg * (Mp / 8)));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    if (!known) check_rows(rp, ci, idx16, n0, n1, K);
    csr_spmm_t_cpu(isa, xtp, Mp, rp, ci, idx16, v, b, yp, N, M, n0, n1);
  });
  return x_in.scalar_type() == at::kFloat ? y : y.to(x_in.scalar_type());
}

// ---------------------------------------------------------------- autograd of sparse_linear
// SparseLinear is an inference layer: only x gets a gradient (so that the layers before it can
// still be trained), through the weight densified for this rare path. Registered for every
// device (the backward uses ATen ops only).
at::Tensor csr_to_dense(const at::Tensor& row_ptr, const at::Tensor& col_idx,
                        const at::Tensor& values, int64_t K) {
  const int64_t N = row_ptr.size(0) - 1;
  const at::Tensor rp = row_ptr.to(at::kLong);
  const at::Tensor counts = rp.slice(0, 1) - rp.slice(0, 0, N);
  const at::Tensor rows = at::repeat_interleave(at::arange(N, rp.options()), counts);
  at::Tensor w = at::zeros({N, K}, values.options().dtype(at::kFloat));
  w.index_put_({rows, col_idx.to(at::kLong)}, values.to(at::kFloat));
  return w;
}

using SparseLinearFn =
    at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
               const c10::optional<at::Tensor>&, int64_t, const c10::optional<at::Tensor>&);

at::Tensor call_below_autograd(const at::Tensor& x, const at::Tensor& row_ptr,
                               const at::Tensor& col_idx, const at::Tensor& values,
                               const c10::optional<at::Tensor>& bias, int64_t in_features,
                               const c10::optional<at::Tensor>& layout) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pycompress::sparse_linear", "")
                             .typed<SparseLinearFn>();
  at::AutoDispatchBelowADInplaceOrView guard;
  return op.call(x, row_ptr, col_idx, values, bias, in_features, layout);
}

class SparseLinearGrad : public torch::autograd::Function<SparseLinearGrad> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x,
                            const at::Tensor& row_ptr, const at::Tensor& col_idx,
                            const at::Tensor& values, const c10::optional<at::Tensor>& bias,
                            int64_t in_features, const c10::optional<at::Tensor>& layout) {
    ctx->save_for_backward({row_ptr, col_idx, values});
    ctx->saved_data["in_features"] = in_features;
    ctx->saved_data["x_dtype"] = static_cast<int64_t>(x.scalar_type());
    return call_below_autograd(x, row_ptr, col_idx, values, bias, in_features, layout);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    at::Tensor gx;
    if (ctx->needs_input_grad(0)) {
      const auto saved = ctx->get_saved_variables();
      const at::Tensor w =
          csr_to_dense(saved[0], saved[1], saved[2], ctx->saved_data["in_features"].toInt());
      const auto dtype = static_cast<at::ScalarType>(ctx->saved_data["x_dtype"].toInt());
      gx = at::matmul(grads[0].to(at::kFloat), w).to(dtype);
    }
    return {gx, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

at::Tensor sparse_linear_autograd(const at::Tensor& x, const at::Tensor& row_ptr,
                                  const at::Tensor& col_idx, const at::Tensor& values,
                                  const c10::optional<at::Tensor>& bias, int64_t in_features,
                                  const c10::optional<at::Tensor>& layout) {
  const bool grad = at::GradMode::is_enabled() &&
                    (x.requires_grad() || values.requires_grad() ||
                     (bias.has_value() && bias->defined() && bias->requires_grad()));
  if (!grad) return call_below_autograd(x, row_ptr, col_idx, values, bias, in_features, layout);
  return SparseLinearGrad::apply(x, row_ptr, col_idx, values, bias, in_features, layout);
}

at::Tensor masked_linear_cpu_op(const at::Tensor& x_in, const at::Tensor& w_in,
                             const at::Tensor& mask_in, const c10::optional<at::Tensor>& bias_in) {
  check_masked_linear_args(x_in, w_in, mask_in, bias_in);
  to_dtype(x_in, "masked_linear: x");
  to_dtype(w_in, "masked_linear: weight");
  const int64_t M = x_in.size(0), N = w_in.size(0), K = w_in.size(1);
  const at::Tensor x = as_f32(x_in), w = as_f32(w_in), mask = mask_in.contiguous();
  at::Tensor bias;
  if (bias_in.has_value()) bias = as_f32(*bias_in);
  auto y = at::empty({M, N}, x.options());
  if (M > 0 && N > 0) {
    const CpuIsa isa = active_cpu_isa();
    const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
    const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
    const uint8_t* mp = mask_bytes(mask);
    float* yp = y.data_ptr<float>();
    const int64_t grain = std::max<int64_t>(4, 65536 / std::max<int64_t>(1, M * K));
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
      masked_linear_fwd_cpu(isa, xp, wp, mp, bp, yp, M, N, K, n0, n1);
    });
  }
  return y.to(x_in.scalar_type());
}

at::Tensor masked_linear_grad_input_cpu_op(const at::Tensor& g_in, const at::Tensor& w_in,
                                        const at::Tensor& mask_in) {
  check_masked_grad_input_args(g_in, w_in, mask_in);
  const int64_t M = g_in.size(0), N = w_in.size(0), K = w_in.size(1);
  const at::Tensor g = as_f32(g_in), w = as_f32(w_in), mask = mask_in.contiguous();
  auto gx = at::empty({M, K}, g.options());
  if (M > 0 && K > 0) {
    if (N == 0) return gx.zero_().to(g_in.scalar_type());
    const CpuIsa isa = active_cpu_isa();
    const float *gp = g.data_ptr<float>(), *wp = w.data_ptr<float>();
    const uint8_t* mp = mask_bytes(mask);
    float* op = gx.data_ptr<float>();
    const int64_t grain = std::max<int64_t>(16, 65536 / std::max<int64_t>(1, M * N)) / 16 * 16;
    at::parallel_for(0, K, grain, [&](int64_t k0, int64_t k1) {
      masked_linear_grad_input_cpu(isa, gp, wp, mp, op, M, N, K, k0, k1);
    });
  }
  return gx.to(g_in.scalar_type());
}

at::Tensor masked_linear_grad_weight_cpu_op(const at::Tensor& g_in, const at::Tensor& x_in,
                                         const at::Tensor& mask_in) {
  check_masked_grad_weight_args(g_in, x_in, mask_in);
  const int64_t M = g_in.size(0), N = mask_in.size(0), K = mask_in.size(1);
  const at::Tensor g = as_f32(g_in), x = as_f32(x_in), mask = mask_in.contiguous();
  auto gw = at::empty({N, K}, g.options());
  if (N > 0 && K > 0) {
    const CpuIsa isa = active_cpu_isa();
    const float *gp = g.data_ptr<float>(), *xp = x.data_ptr<float>();
    const uint8_t* mp = mask_bytes(mask);
    float* op = gw.data_ptr<float>();
    const int64_t grain = std::max<int64_t>(6, 65536 / std::max<int64_t>(1, M * K));
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
      masked_linear_grad_weight_cpu(isa, gp, xp, mp, op, M, N, K, n0, n1);
    });
  }
  return gw.to(x_in.scalar_type());
}

}  // namespace
}  // namespace pyc

TORCH_LIBRARY_FRAGMENT(pycompress, m) {
  m.def(
      "sparse_linear(Tensor x, Tensor row_ptr, Tensor col_idx, Tensor values, Tensor? bias, "
      "int in_features, Tensor? layout=None) -> Tensor");
  m.def(
      "sparse_decode_layout(Tensor row_ptr, Tensor col_idx, Tensor values, int in_features, "
      "bool pack=True) -> Tensor");
  m.def(
      "sparse_decode_layout_info(Tensor layout, Tensor row_ptr, Tensor col_idx, Tensor values, "
      "int in_features) -> int[]");
  m.def("masked_linear(Tensor x, Tensor weight, Tensor mask, Tensor? bias) -> Tensor");
  m.def("masked_linear_grad_input(Tensor grad, Tensor weight, Tensor mask) -> Tensor");
  m.def("masked_linear_grad_weight(Tensor grad, Tensor x, Tensor mask) -> Tensor");
}

TORCH_LIBRARY_IMPL(pycompress, CPU, m) {
  m.impl("sparse_linear", &pyc::sparse_linear_cpu_op);
  m.impl("sparse_decode_layout", &pyc::sparse_decode_layout_cpu);
  m.impl("sparse_decode_layout_info", &pyc::sparse_decode_layout_info_cpu);
  m.impl("masked_linear", &pyc::masked_linear_cpu_op);
  m.impl("masked_linear_grad_input", &pyc::masked_linear_grad_input_cpu_op);
  m.impl("masked_linear_grad_weight", &pyc::masked_linear_grad_weight_cpu_op);
}

TORCH_LIBRARY_IMPL(pycompress, Autograd, m) {
  m.impl("sparse_linear", &pyc::sparse_linear_autograd);
}
