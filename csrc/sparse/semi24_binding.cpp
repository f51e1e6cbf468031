// Torch glue for 2:4 semi-structured sparsity (CPU): schemas, compression/decompression and the
// CPU linear kernel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/cpu_features.h"
#include "common/torch_utils.h"
#include "sparse/semi24.h"
#include "sparse/semi24_checks.h"

namespace pyc {

// Compression runs on the CPU (once, at conversion time); CUDA weights come back on their device.
std::tuple<at::Tensor, at::Tensor> semi24_compress_op(const at::Tensor& w_in,
                                                      const c10::optional<at::Tensor>& mask_in,
                                                      c10::optional<at::ScalarType> dtype) {
  TORCH_CHECK(w_in.dim() == 2, "semi24_compress: weight must be 2-D [N, K]");
  const DType wdt = to_dtype(w_in, "semi24_compress: weight");
  const at::ScalarType vst = dtype.value_or(w_in.scalar_type());
  TORCH_CHECK_TYPE(is_supported_float(vst),
                   "semi24_compress: dtype must be float32, float16 or bfloat16");
  const at::Tensor w = w_in.to(at::kCPU).contiguous();
  at::Tensor mask;
  if (mask_in.has_value()) {
    TORCH_CHECK_TYPE(mask_in->scalar_type() == at::kBool, "semi24_compress: mask must be bool");
    TORCH_CHECK(mask_in->sizes() == w_in.sizes(), "semi24_compress: mask must have the weight's shape");
    mask = mask_in->to(at::kCPU).contiguous();
  }
  const int64_t N = w.size(0), K = w.size(1), Kp = semi24_padded_k(K);
  auto opts = w.options();
  at::Tensor values = at::empty({N, Kp / 2}, opts.dtype(vst));
  at::Tensor meta = at::empty({semi24_n_tiles(N), Kp / kSemi24KTile, 32}, opts.dtype(at::kShort));
  const uint8_t* mp = mask.defined() ? reinterpret_cast<const uint8_t*>(mask.data_ptr<bool>()) : nullptr;
  int64_t bad = -1;
  if (N > 0) {
    // single pass, so that the first offending group is reported deterministically
    bad = semi24_compress_cpu(w.data_ptr(), wdt, K, mp, N, K, values.data_ptr(), to_dtype(values, "values"),
                              meta.data_ptr<int16_t>(), 0, N);
  }
  TORCH_CHECK_VALUE(bad < 0, "semi24_compress: weight is not 2:4 sparse along the input dimension: row ",
                    bad / std::max<int64_t>(K, 1), ", group ", (bad % std::max<int64_t>(K, 1)) / 4,
                    " (columns ", bad % std::max<int64_t>(K, 1), "..",
                    std::min(bad % std::max<int64_t>(K, 1) + 3, K - 1), ") keeps more than 2 of 4");
  return {values.to(w_in.device()), meta.to(w_in.device())};
}

at::Tensor semi24_decompress_op(const at::Tensor& values_in, const at::Tensor& meta_in,
                                int64_t in_features) {
  check_semi24_buffers(values_in, meta_in, in_features, "semi24_decompress");
  const at::Tensor v = values_in.to(at::kCPU).contiguous(), meta = meta_in.to(at::kCPU).contiguous();
  const int64_t N = v.size(0), K = in_features;
  at::Tensor out = at::empty({N, K}, v.options());
  const DType dt = to_dtype(v, "values");
  at::parallel_for(0, N, row_grain(K), [&](int64_t n0, int64_t n1) {
    semi24_decompress_cpu(v.data_ptr(), dt, meta.data_ptr<int16_t>(), N, K, out.data_ptr(), dt, n0, n1);
  });
  return out.to(values_in.device());
}

namespace {

at::Tensor semi24_linear_cpu_op(const at::Tensor& x_in, const at::Tensor& values_in,
                                const at::Tensor& meta_in, const c10::optional<at::Tensor>& bias_in,
                                int64_t in_features) {
  check_semi24_linear(x_in, values_in, meta_in, bias_in, in_features);
  const int64_t M = x_in.size(0), K = in_features, N = values_in.size(0);
  const int64_t Kp = semi24_padded_k(K);
  if (M == 0 || N == 0) return at::zeros({M, N}, x_in.options());
  const CpuIsa isa = active_cpu_isa();
  const DType vdt = to_dtype(values_in, "values");
  at::Tensor bias;
  if (bias_in.has_value()) bias = bias_in->to(at::kFloat).contiguous();
  const float* bp = bias.defined() ? bias.data_ptr<float>() : nullptr;
  if (M >= kSemi24TransposedMinRows && semi24_linear_t_supported(isa)) {
    // transposed activations xT [Kp, Mp] (zeros past K and M), result yT [N, Mp]
    const int64_t Mp = (M + 7) / 8 * 8;
    at::Tensor xT = at::zeros({Kp, Mp}, x_in.options().dtype(at::kFloat));
    xT.narrow(0, 0, K).narrow(1, 0, M).copy_(x_in.t());
    const at::Tensor values = values_in.contiguous(), meta = meta_in.contiguous();
    at::Tensor yT = at::empty({N, Mp}, xT.options());
    const float* xtp = xT.data_ptr<float>();
    float* ytp = yT.data_ptr<float>();
    const int64_t grain = std::max<int64_t>(1, (4 << 20) / std::max<int64_t>(1, (Kp / 2) * Mp));
    at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
      semi24_linear_t_cpu(isa, xtp, Mp, values.data_ptr(), vdt, meta.data_ptr<int16_t>(), bp, ytp, K,
                          n0, n1);
    });
    return yT.narrow(1, 0, M).t().contiguous().to(x_in.scalar_type());
  }
  // fp32 activations with Kp columns (zeros past K, read by the padded groups)
  at::Tensor x;
  if (K == Kp && x_in.scalar_type() == at::kFloat && x_in.stride(1) == 1 && (M == 1 || x_in.stride(0) >= Kp)) {
    x = x_in;
  } else {
    x = at::zeros({M, Kp}, x_in.options().dtype(at::kFloat));
    x.narrow(1, 0, K).copy_(x_in);
  }
  const int64_t ldx = M == 1 ? Kp : x.stride(0);
  const at::Tensor values = values_in.contiguous(), meta = meta_in.contiguous();
  auto y = at::empty({M, N}, x_in.options().dtype(at::kFloat));
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // rows per task: ~4M kept-weight x activation-row products (~0.5 ms), so that small layers
  // stay on one thread instead of waiting for a busy second one
  const int64_t grain = std::max<int64_t>(1, (4 << 20) / std::max<int64_t>(1, (Kp / 2) * M));
  at::parallel_for(0, N, grain, [&](int64_t n0, int64_t n1) {
    semi24_linear_cpu(isa, xp, ldx, M, values.data_ptr(), vdt, meta.data_ptr<int16_t>(), bp, yp, N,
                      N, K, n0, n1);
  });
  return x_in.scalar_type() == at::kFloat ? y : y.to(x_in.scalar_type());
}

}  // namespace

}  // namespace pyc

TORCH_LIBRARY_FRAGMENT(pycompress, m) {
  m.def("semi24_compress(Tensor weight, Tensor? mask, ScalarType? dtype) -> (Tensor, Tensor)");
  m.def("semi24_decompress(Tensor values, Tensor meta, int in_features) -> Tensor");
  m.def("semi24_linear(Tensor x, Tensor values, Tensor meta, Tensor? bias, int in_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(pycompress, CPU, m) {
  m.impl("semi24_compress", &pyc::semi24_compress_op);
  m.impl("semi24_decompress", &pyc::semi24_decompress_op);
  m.impl("semi24_linear", &pyc::semi24_linear_cpu_op);
}
