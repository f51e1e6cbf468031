// Torch glue for the int8 family (CPU): schemas and CPU kernels.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/torch_utils.h"
#include "int8/int8_checks.h"
#include "common/cpu_features.h"
#include "int8/gemm.h"
#include "int8/quantize.h"

namespace pyc {
namespace {

std::tuple<at::Tensor, at::Tensor> quantize_per_token_cpu_impl(const at::Tensor& x_in) {
  TORCH_CHECK(x_in.dim() == 2, "quantize_per_token: x must be 2-D [M, K], got ", x_in.dim(),
              "-D");
  const DType dt = to_dtype(x_in, "quantize_per_token: x");
  const at::Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1);
  auto q = at::empty({M, K}, x.options().dtype(at::kChar));
  auto scale = at::empty({M}, x.options().dtype(at::kFloat));
  if (M == 0) return {q, scale};
  const int64_t ldx = M > 1 ? x.stride(0) : K;
  const void* xp = x.data_ptr();
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = scale.data_ptr<float>();
  at::parallel_for(0, M, row_grain(K), [&](int64_t b, int64_t e) {
    quantize_per_token_cpu(xp, dt, ldx, qp, K, sp, b, e, K);
  });
  return {q, scale};
}

// Packs an int8 [N, K] weight (see int8/gemm.h) using all threads.
at::Tensor pack_weight(const at::Tensor& w) {
  const int64_t N = w.size(0), K = w.size(1);
  auto packed = at::empty({int8_packed_bytes(N, K)}, w.options().dtype(at::kChar));
  const int8_t* wp = w.data_ptr<int8_t>();
  int8_t* pp = packed.data_ptr<int8_t>();
  const int64_t ldw = w.stride(0);
  at::parallel_for(0, int8_round_n(N) / kInt8PanelCols, 1, [&](int64_t b, int64_t e) {
    int8_pack_b(wp, ldw, N, K, pp, b, e);
  });
  return packed;
}

at::Tensor rows_contiguous(const at::Tensor& t) {
  return (t.stride(-1) == 1 && (t.size(0) <= 1 || t.stride(0) >= t.size(1))) ? t : t.contiguous();
}

at::Tensor int8_pack_weight_cpu_impl(const at::Tensor& w_in) {
  check_2d_int8(w_in, "int8_pack_weight", "w");
  TORCH_CHECK(w_in.size(0) >= 1 && w_in.size(1) >= 1, "int8_pack_weight: w must be non-empty");
  return pack_weight(rows_contiguous(w_in));
}

// Runs the packed GEMM over all panels, in pieces the threads take as they finish.
void run_gemm(int path, const void* ap, const int8_t* packed, int64_t M, int64_t N, int64_t K,
              const Int8Epilogue& ep) {
  const int64_t panels = int8_round_n(N) / kInt8PanelCols;
  const int64_t per_panel = std::max<int64_t>(1, M * int8_round_k(K) * kInt8PanelCols);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / per_panel);
  at::Tensor workspace;
  if (int8_gemm_kc(path, M, K) < int8_round_k(K))
    workspace = at::empty({M * int8_round_n(N)}, at::TensorOptions().dtype(at::kInt));
  int32_t* ws = workspace.defined() ? workspace.data_ptr<int32_t>() : nullptr;
  parallel_for_dynamic(0, panels, grain, 8, [&](int64_t b, int64_t e) {
    int8_gemm_packed(path, ap, packed, M, N, K, b, e, ep, ws);
  });
}

const int8_t* packed_or_pack(const at::Tensor& w, const c10::optional<at::Tensor>& w_packed,
                             at::Tensor& holder, const char* op) {
  const int64_t N = w.size(0), K = w.size(1);
  if (w_packed.has_value() && w_packed->defined()) {
    const at::Tensor& p = *w_packed;
    TORCH_CHECK(p.scalar_type() == at::kChar && p.dim() == 1 && p.is_contiguous() &&
                    p.numel() == int8_packed_bytes(N, K) && p.device() == w.device(),
                op, ": w_packed must be the contiguous int8 result of int8_pack_weight(w) (",
                int8_packed_bytes(N, K), " bytes for w of shape [", N, ", ", K, "])");
    return p.data_ptr<int8_t>();
  }
  holder = pack_weight(w);
  return holder.data_ptr<int8_t>();
}

at::Tensor int8_gemm_cpu_impl(const at::Tensor& a_in, const at::Tensor& b_in) {
  check_2d_int8(a_in, "int8_gemm", "a");
  check_2d_int8(b_in, "int8_gemm", "b");
  TORCH_CHECK(a_in.size(1) == b_in.size(1), "int8_gemm: a is [M, K] and b is [N, K] with the same K; got a ",
              a_in.sizes(), " and b ", b_in.sizes());
  const int64_t M = a_in.size(0), K = a_in.size(1), N = b_in.size(0);
  TORCH_CHECK(K >= 1 && N >= 1, "int8_gemm: K and N must be >= 1, got K=", K, " N=", N);
  auto c = at::empty({M, N}, a_in.options().dtype(at::kInt));
  if (M == 0) return c;
  const at::Tensor a = rows_contiguous(a_in), b = rows_contiguous(b_in);
  at::Tensor packed_holder;
  const int8_t* packed = packed_or_pack(b, c10::nullopt, packed_holder, "int8_gemm");
  const int path = int8_gemm_path(static_cast<int>(active_cpu_isa()), false,
                                  int8_packed_narrow(packed, N, K));
  const int64_t rb = int8_a_row_bytes(path, K);
  auto ap = at::empty({M * rb}, a.options().dtype(at::kByte));
  const int8_t* a_ptr = a.data_ptr<int8_t>();
  const int64_t lda = M > 1 ? a.stride(0) : K;
  void* app = ap.data_ptr();
  at::parallel_for(0, M, row_grain(K), [&](int64_t b0, int64_t e0) {
    int8_prepare_a(path, a_ptr, lda, K, app, b0, e0);
  });
  Int8Epilogue ep;
  ep.c = c.data_ptr<int32_t>();
  ep.ldc = N;
  run_gemm(path, app, packed, M, N, K, ep);
  return c;
}

at::Tensor int8_linear_cpu_impl(const at::Tensor& x_in, const at::Tensor& w_in,
                                const at::Tensor& w_scale_in, const c10::optional<at::Tensor>& bias_in,
                                const c10::optional<at::Tensor>& w_packed, int64_t act_bits) {
  check_linear_args(x_in, w_in, w_scale_in, bias_in, "int8_linear");
  TORCH_CHECK(act_bits == 8 || act_bits == 7, "int8_linear: act_bits must be 8 or 7, got ",
              act_bits);
  // 7-bit activations: scale absmax / 63, q in [-63, 63] (the vpmaddubsw path on AVX2)
  const int qmax = act_bits == 7 ? 63 : 127;
  const DType dt = to_dtype(x_in, "int8_linear: x");
  const int64_t M = x_in.size(0), K = x_in.size(1), N = w_in.size(0);
  auto out = at::empty({M, N}, x_in.options());
  if (M == 0) return out;
  const at::Tensor x = rows_contiguous(x_in), w = rows_contiguous(w_in);
  const at::Tensor w_scale = w_scale_in.contiguous();
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) bias = bias_in->to(at::kFloat).contiguous();
  at::Tensor packed_holder;
  const int8_t* packed = packed_or_pack(w, w_packed, packed_holder, "int8_linear");
  // 7-bit activations: vpmaddubsw with A + 64 (pair sums of two k-groups for narrow panels);
  // 8-bit activations with every weight in [-64, 64]: vpmaddubsw with A + 128
  const int path = int8_gemm_path(static_cast<int>(active_cpu_isa()), act_bits == 7,
                                  act_bits == 8 && int8_packed_narrow(packed, N, K));

  // fused per-token quantization + operand preparation, row-parallel
  const int64_t rb = int8_a_row_bytes(path, K);
  auto ap = at::empty({M * rb}, x.options().dtype(at::kByte));
  auto q = at::empty({M, K}, x.options().dtype(at::kChar));
  auto xs = at::empty({M}, x.options().dtype(at::kFloat));
  const int64_t ldx = M > 1 ? x.stride(0) : K;
  const void* xp = x.data_ptr();
  int8_t* qp = q.data_ptr<int8_t>();
  float* sp = xs.data_ptr<float>();
  void* app = ap.data_ptr();
  at::parallel_for(0, M, row_grain(K), [&](int64_t b0, int64_t e0) {
    quantize_per_token_cpu(xp, dt, ldx, qp, K, sp, b0, e0, K, qmax);
    int8_prepare_a(path, qp, K, K, app, b0, e0);
  });
  Int8Epilogue ep;
  ep.out = out.data_ptr();
  ep.out_dtype = dt;
  ep.ldo = N;
  ep.a_scale = sp;
  ep.w_scale = w_scale.data_ptr<float>();
  ep.bias = bias.defined() ? bias.data_ptr<float>() : nullptr;
  run_gemm(path, app, packed, M, N, K, ep);
  return out;
}

at::Tensor int8_linear_w8a16_cpu_impl(const at::Tensor& x_in, const at::Tensor& w_in,
                                      const at::Tensor& w_scale_in,
                                      const c10::optional<at::Tensor>& bias_in) {
  check_linear_args(x_in, w_in, w_scale_in, bias_in, "int8_linear_w8a16");
  const DType dt = to_dtype(x_in, "int8_linear_w8a16: x");
  const int64_t M = x_in.size(0), K = x_in.size(1), N = w_in.size(0);
  auto out = at::empty({M, N}, x_in.options());
  if (M == 0) return out;
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const at::Tensor w = rows_contiguous(w_in);
  const at::Tensor w_scale = w_scale_in.contiguous();
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) bias = bias_in->to(at::kFloat).contiguous();
  const int isa = static_cast<int>(active_cpu_isa());
  const float* xp = x.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  const int64_t ldw = w.stride(0);
  const float* wsp = w_scale.data_ptr<float>();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  void* op = out.data_ptr();
  const int64_t grain = std::max<int64_t>(4, ((int64_t(1) << 16) / std::max<int64_t>(1, M * K)) / 4 * 4);
  at::parallel_for(0, (N + 3) / 4, std::max<int64_t>(1, grain / 4), [&](int64_t b0, int64_t e0) {
    int8_w8a16_cpu(isa, xp, K, wp, ldw, wsp, bp, op, dt, N, M, K, b0 * 4, std::min(N, e0 * 4));
  });
  return out;
}

}  // namespace

}  // namespace pyc

TORCH_LIBRARY_FRAGMENT(pycompress, m) {
  m.def("quantize_per_token(Tensor x) -> (Tensor, Tensor)");
  m.def("int8_gemm(Tensor a, Tensor b) -> Tensor");
  m.def("int8_pack_weight(Tensor w) -> Tensor");
  m.def("int8_linear(Tensor x, Tensor w, Tensor w_scale, Tensor? bias=None, Tensor? w_packed=None, int act_bits=8) -> Tensor");
  m.def("int8_linear_w8a16(Tensor x, Tensor w, Tensor w_scale, Tensor? bias=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(pycompress, CPU, m) {
  m.impl("quantize_per_token", &pyc::quantize_per_token_cpu_impl);
  m.impl("int8_gemm", &pyc::int8_gemm_cpu_impl);
  m.impl("int8_pack_weight", &pyc::int8_pack_weight_cpu_impl);
  m.impl("int8_linear", &pyc::int8_linear_cpu_impl);
  m.impl("int8_linear_w8a16", &pyc::int8_linear_w8a16_cpu_impl);
}
