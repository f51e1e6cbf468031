// Torch glue for the sparse family (CPU): schemas and CPU kernels of SparseLinear (CSR) and
// MaskedLinear (fused masked matmul and its gradients).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "common/cpu_features.h"
#include "common/torch_utils.h"
#include "sparse/csr_cache.h"
#include "sparse/decode_layout.h"
#include "sparse/masked_checks.h"
#include "sparse/sparse.h"
#include "sparse/sparse_cpu.h"

namespace pyc {
namespace {

SellCache& sell_cache() {
  static SellCache cache;
  return cache;
}

std::atomic<bool>& decode_layout_flag() {
  static std::atomic<bool> on{[] {
    const char* v = std::getenv("PYCOMPRESS_SPARSE_DECODE_LAYOUT");
    return !(v && (std::strcmp(v, "0") == 0 || std::strcmp(v, "off") == 0 ||
                   std::strcmp(v, "false") == 0));
  }()};
  return on;
}

void check_csr(const at::Tensor& x, const at::Tensor& row_ptr, const at::Tensor& col_idx,
               const at::Tensor& values, const c10::optional<at::Tensor>& bias,
               int64_t in_features) {
  TORCH_CHECK(x.dim() == 2, "sparse_linear: x must be 2-D [M, K], got ", x.dim(), "-D");
  TORCH_CHECK(x.size(1) == in_features, "sparse_linear: x has ", x.size(1),
              " columns, expected in_features=", in_features);
  TORCH_CHECK(row_ptr.dim() == 1 && row_ptr.size(0) >= 1 && row_ptr.scalar_type() == at::kInt,
              "sparse_linear: row_ptr must be a 1-D int32 tensor [N + 1]");
  TORCH_CHECK(col_idx.dim() == 1 && (col_idx.scalar_type() == at::kShort ||
                                     col_idx.scalar_type() == at::kInt),
              "sparse_linear: col_idx must be a 1-D int16 or int32 tensor");
  TORCH_CHECK(col_idx.scalar_type() == at::kInt || in_features <= 32768,
              "sparse_linear: int16 col_idx needs in_features <= 32768");
  TORCH_CHECK(values.dim() == 1 && values.scalar_type() == at::kFloat,
              "sparse_linear: values must be a 1-D float32 tensor");
  TORCH_CHECK(values.size(0) == col_idx.size(0), "sparse_linear: values and col_idx differ in size");
  const int64_t N = row_ptr.size(0) - 1;
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N && bias->scalar_type() == at::kFloat,
                "sparse_linear: bias must be float32 [N]");
  }
  // the module may call this kernel by its dispatch key directly: all operands must be on the CPU
  TORCH_CHECK(x.is_cpu() && row_ptr.is_cpu() && col_idx.is_cpu() && values.is_cpu() &&
                  (!bias.has_value() || bias->is_cpu()),
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

at::Tensor sparse_linear_cpu_op(const at::Tensor& x_in, const at::Tensor& row_ptr_in,
                             const at::Tensor& col_idx_in, const at::Tensor& values_in,
                             const c10::optional<at::Tensor>& bias_in, int64_t in_features) {
  check_csr(x_in, row_ptr_in, col_idx_in, values_in, bias_in, in_features);
  to_dtype(x_in, "sparse_linear: x");
  const at::Tensor row_ptr = row_ptr_in.contiguous();
  const at::Tensor col_idx = col_idx_in.contiguous();
  const at::Tensor values = values_in.contiguous();
  at::Tensor bias;
  if (bias_in.has_value()) bias = bias_in->contiguous();
  const int64_t M = x_in.size(0), K = in_features, N = row_ptr.size(0) - 1;
  static CsrCheckCache checked;
  const bool known = checked.known_good(row_ptr_in, col_idx_in, K);
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
  if (M == 1 && known && isa >= CpuIsa::Avx2 && sparse_decode_layout_enabled()) {
    // AVX-512: the chunked layout where it pays; else the sliced layout (no per-row tails or
    // horizontal sums). Tasks are whole 256-row windows (see SellLayout) of at least ~32k
    // multiply-adds.
    const bool try_chunked = isa >= CpuIsa::Avx512;
    if (auto layout = sell_cache().get(row_ptr_in, col_idx_in, values_in, K, try_chunked)) {
      const int64_t windows = (N + kSellWindow - 1) / kSellWindow;
      if (layout->chunked.steps > 0) {
        const ChunkedLayout& L = layout->chunked;
        std::vector<float, Aligned64<float>> xq(static_cast<size_t>(chunked_x_size(L)));
        chunked_pad_x(xs, K, L, xq.data());
        const int64_t work = static_cast<int64_t>(L.vals.size()) +
                             (L.rest.n_slices ? L.rest.slice_off[L.rest.n_slices] : 0);
        const int64_t per_window = std::max<int64_t>(1, work / windows);
        parallel_for_dynamic(0, windows, 32768 / per_window, 8, [&](int64_t w0, int64_t w1) {
          chunked_gemv_cpu(isa, xq.data(), L, b, yp, w0, w1);
        });
      } else {
        const SellLayout& L = layout->sell;
        // x and the zero activation the padding entries point at (x_pad[K])
        std::vector<float> xpad;
        xpad.reserve(static_cast<size_t>(K) + 1);
        xpad.assign(xs, xs + K);
        xpad.push_back(0.f);
        const int64_t* off = L.slice_off.data();
        const int64_t ns = L.n_slices;
        constexpr int64_t spw = kSellWindow / 8;  // slices per window
        const int64_t per_window = std::max<int64_t>(1, off[ns] / windows);
        parallel_for_dynamic(0, windows, 32768 / per_window, 8, [&](int64_t w0, int64_t w1) {
          sell_gemv_cpu(isa, xpad.data(), L, b, yp, w0 * spw, std::min(ns, w1 * spw));
        });
      }
      return x_in.scalar_type() == at::kFloat ? y : y.to(x_in.scalar_type());
    }
  }
  if (M == 1) {
    const int64_t grain = std::max<int64_t>(1, 32768 / avg);
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
      if (!known) check_rows(rp, ci, idx16, n0, n1, K);
      csr_gemv_cpu(isa, xs, rp, ci, idx16, v, b, yp, n0, n1);
    });
    if (!known) checked.mark_good(row_ptr_in, col_idx_in, K);
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
  if (!known) checked.mark_good(row_ptr_in, col_idx_in, K);
  return x_in.scalar_type() == at::kFloat ? y : y.to(x_in.scalar_type());
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

bool sparse_decode_layout_enabled() { return decode_layout_flag().load(); }

bool set_sparse_decode_layout(bool enabled) {
  const bool before = decode_layout_flag().exchange(enabled);
  if (!enabled) sell_cache().clear();
  return before;
}

std::tuple<int64_t, int64_t, int64_t> sparse_decode_layout_usage() { return sell_cache().usage(); }
void clear_sparse_decode_layouts() { sell_cache().clear(); }

at::Tensor sparse_linear_op_cpu(const at::Tensor& x, const at::Tensor& row_ptr,
                                const at::Tensor& col_idx, const at::Tensor& values,
                                const c10::optional<at::Tensor>& bias, int64_t in_features) {
  return sparse_linear_cpu_op(x, row_ptr, col_idx, values, bias, in_features);
}

}  // namespace pyc

TORCH_LIBRARY_FRAGMENT(pycompress, m) {
  m.def(
      "sparse_linear(Tensor x, Tensor row_ptr, Tensor col_idx, Tensor values, Tensor? bias, "
      "int in_features) -> Tensor");
  m.def("masked_linear(Tensor x, Tensor weight, Tensor mask, Tensor? bias) -> Tensor");
  m.def("masked_linear_grad_input(Tensor grad, Tensor weight, Tensor mask) -> Tensor");
  m.def("masked_linear_grad_weight(Tensor grad, Tensor x, Tensor mask) -> Tensor");
}

TORCH_LIBRARY_IMPL(pycompress, CPU, m) {
  m.impl("sparse_linear", &pyc::sparse_linear_cpu_op);
  m.impl("masked_linear", &pyc::masked_linear_cpu_op);
  m.impl("masked_linear_grad_input", &pyc::masked_linear_grad_input_cpu_op);
  m.impl("masked_linear_grad_weight", &pyc::masked_linear_grad_weight_cpu_op);
}
