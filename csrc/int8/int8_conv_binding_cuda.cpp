// Torch glue for the int8 convolution (CUDA kernels): argument checks, allocation, stream.
// The schemas and the CPU kernels are in int8_conv_binding.cpp; the kernels in
// int8/cuda/conv.cu.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "int8/cuda/conv.cuh"
#include "int8/int8_checks.h"

namespace pyc {
namespace {

constexpr const char* kOp = "int8_conv2d";

bool is_quantized_dtype(at::ScalarType t) { return t == at::kByte || t == at::kChar; }
bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

cuda::ConvSrc src_kind(at::ScalarType t) {
  switch (t) {
    case at::kByte: return cuda::ConvSrc::U8;
    case at::kChar: return cuda::ConvSrc::S8;
    case at::kFloat: return cuda::ConvSrc::F32;
    case at::kHalf: return cuda::ConvSrc::F16;
    case at::kBFloat16: return cuda::ConvSrc::BF16;
    default: break;
  }
  TORCH_CHECK_TYPE(false, kOp, ": x must be uint8, int8, float32, float16 or bfloat16, got ", t);
  return cuda::ConvSrc::U8;
}

cuda::ConvAct act_kind(c10::string_view s) {
  if (s == "none") return cuda::ConvAct::None;
  if (s == "relu") return cuda::ConvAct::Relu;
  if (s == "relu6") return cuda::ConvAct::Relu6;
  if (s == "silu") return cuda::ConvAct::Silu;
  if (s == "hardswish") return cuda::ConvAct::Hardswish;
  TORCH_CHECK(false, kOp, ": unknown activation '", std::string(s.data(), s.size()),
              "' (expected none, relu, relu6, silu or hardswish)");
  return cuda::ConvAct::None;
}

cuda::ConvOut out_kind(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::ConvOut::F32;
    case at::kHalf: return cuda::ConvOut::F16;
    case at::kBFloat16: return cuda::ConvOut::BF16;
    case at::kByte: return cuda::ConvOut::U8;
    case at::kChar: return cuda::ConvOut::S8;
    default: break;
  }
  TORCH_CHECK_TYPE(false, kOp,
                   ": out_dtype must be float32, float16, bfloat16, uint8 or int8, got ", t);
  return cuda::ConvOut::F32;
}

std::vector<int64_t> pair_arg(at::IntArrayRef v, const char* name, int64_t min) {
  TORCH_CHECK(v.size() == 2, kOp, ": ", name, " must have 2 values, got ", v.size());
  TORCH_CHECK(v[0] >= min && v[1] >= min, kOp, ": ", name, " values must be >= ", min, ", got ",
              v);
  return {v[0], v[1]};
}

bool defined(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

void check_device(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.device() == x.device(), kOp, ": ", name, " is on ", t.device(),
              " but x is on ", x.device(), " (all tensors must be on one device)");
}

// [1] or [N] per-image quantization parameter of x.
void check_per_image(const at::Tensor& t, at::ScalarType dt, int64_t N, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == dt, kOp, ": ", name, " must be ", dt, ", got ",
                   t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && (t.size(0) == 1 || t.size(0) == N), kOp, ": ", name,
              " must have shape [1] or [N] = [", N, "], got ", t.sizes());
}

// Checks that read tensor values: collected as device flags and brought to the host with one copy
// (one synchronization per call). While the stream is being captured into a CUDA graph no copy to
// the host may happen, and the checks are skipped.
class ValueChecks {
 public:
  void add(const at::Tensor& bad, std::string msg) {
    flags_.push_back(bad.reshape({}));
    msgs_.push_back(std::move(msg));
  }
  void run(cudaStream_t stream) {
    if (flags_.empty()) return;
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(stream, &status) == cudaSuccess &&
        status != cudaStreamCaptureStatusNone)
      return;
    const at::Tensor host = at::stack(flags_).to(at::kCPU);
    const bool* bad = host.data_ptr<bool>();
    for (size_t i = 0; i < msgs_.size(); ++i) TORCH_CHECK(!bad[i], kOp, ": ", msgs_[i]);
  }

 private:
  std::vector<at::Tensor> flags_;
  std::vector<std::string> msgs_;
};

at::Tensor any_nonfinite(const at::Tensor& t) { return at::isfinite(t).logical_not().any(); }

at::Tensor int8_conv2d_cuda_impl(const at::Tensor& x, const c10::optional<at::Tensor>& x_scale_in,
                                 const c10::optional<at::Tensor>& x_zp_in, const at::Tensor& w_in,
                                 const at::Tensor& w_scale_in,
                                 const c10::optional<at::Tensor>& bias_in,
                                 const c10::optional<at::Tensor>& /*w_packed: CPU layout*/,
                                 at::IntArrayRef stride_in, at::IntArrayRef padding_in,
                                 at::IntArrayRef dilation_in, int64_t groups,
                                 c10::string_view activation,
                                 c10::optional<at::ScalarType> out_dtype, double out_scale,
                                 int64_t out_zero_point,
                                 const c10::optional<at::Tensor>& residual_in,
                                 double residual_scale, int64_t residual_zero_point) {
  // ---- shapes, dtypes, devices
  TORCH_CHECK(x.dim() == 4, kOp, ": x must be 4-D [N, C, H, W], got ", x.dim(), "-D");
  const cuda::ConvSrc src = src_kind(x.scalar_type());
  const bool quantized = is_quantized_dtype(x.scalar_type());
  TORCH_CHECK(x.is_cuda(), kOp, ": x must be a CUDA tensor here, got one on ", x.device());
  TORCH_CHECK(w_in.dim() == 4, kOp, ": w must be 4-D [Cout, Cin / groups, kh, kw], got ",
              w_in.dim(), "-D");
  TORCH_CHECK_TYPE(w_in.scalar_type() == at::kChar, kOp, ": w must be int8, got ",
                   w_in.scalar_type());
  check_device(w_in, x, "w");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Cout = w_in.size(0), kh = w_in.size(2), kw = w_in.size(3);
  TORCH_CHECK(Cout >= 1 && w_in.size(1) >= 1 && kh >= 1 && kw >= 1, kOp,
              ": w must be non-empty, got ", w_in.sizes());
  TORCH_CHECK(groups >= 1, kOp, ": groups must be >= 1, got ", groups);
  TORCH_CHECK(C % groups == 0 && Cout % groups == 0, kOp, ": groups = ", groups,
              " must divide the input channels (", C, ") and the output channels (", Cout, ")");
  TORCH_CHECK(C == w_in.size(1) * groups, kOp, ": x has ", C, " channels but w ", w_in.sizes(),
              " with groups = ", groups, " expects ", w_in.size(1) * groups);
  const auto stride = pair_arg(stride_in, "stride", 1);
  // padding: [ph, pw] (both sides) or [top, bottom, left, right]; the kernels place the taps
  // by the top / left padding, the bottom / right padding only sets Ho / Wo
  TORCH_CHECK_VALUE(padding_in.size() == 2 || padding_in.size() == 4, kOp,
                    ": padding must have 2 values [ph, pw] or 4 [top, bottom, left, right], got ",
                    padding_in.size(), " (", padding_in, ")");
  for (int64_t e : padding_in)
    TORCH_CHECK_VALUE(e >= 0, kOp, ": padding values must be >= 0, got ", padding_in);
  const bool pad4 = padding_in.size() == 4;
  const int64_t pad_t = padding_in[0], pad_b = pad4 ? padding_in[1] : padding_in[0];
  const int64_t pad_l = pad4 ? padding_in[2] : padding_in[1], pad_r = pad4 ? padding_in[3] : padding_in[1];
  const auto dilation = pair_arg(dilation_in, "dilation", 1);
  const int64_t span_h = H + pad_t + pad_b - dilation[0] * (kh - 1) - 1;
  const int64_t span_w = W + pad_l + pad_r - dilation[1] * (kw - 1) - 1;
  TORCH_CHECK(span_h >= 0 && span_w >= 0, kOp, ": the output would be empty: input ", H, "x", W,
              ", kernel ", kh, "x", kw, ", padding ", padding_in, ", dilation ", dilation_in);
  const int64_t Ho = span_h / stride[0] + 1, Wo = span_w / stride[1] + 1;
  TORCH_CHECK(kh * kw * (C / groups) <= cuda::kInt8ConvMaxK, kOp,
              ": kh * kw * Cin / groups = ", kh * kw * (C / groups), " exceeds ",
              cuda::kInt8ConvMaxK, ", where the int32 accumulator would no longer be exact");

  TORCH_CHECK_TYPE(w_scale_in.scalar_type() == at::kFloat, kOp, ": w_scale must be float32, got ",
                   w_scale_in.scalar_type());
  TORCH_CHECK(w_scale_in.dim() == 1 && w_scale_in.size(0) == Cout, kOp,
              ": w_scale must have shape [Cout] = [", Cout, "], got ", w_scale_in.sizes());
  check_device(w_scale_in, x, "w_scale");
  at::Tensor bias;
  if (defined(bias_in)) {
    TORCH_CHECK_TYPE(is_float_dtype(bias_in->scalar_type()), kOp,
                     ": bias must be float32 (or float16 / bfloat16), got ", bias_in->scalar_type());
    TORCH_CHECK(bias_in->dim() == 1 && bias_in->size(0) == Cout, kOp,
                ": bias must have shape [Cout] = [", Cout, "], got ", bias_in->sizes());
    check_device(*bias_in, x, "bias");
    bias = bias_in->to(at::kFloat).contiguous();
  }

  const bool has_scale = defined(x_scale_in), has_zp = defined(x_zp_in);
  TORCH_CHECK(has_scale == has_zp, kOp, ": x_scale and x_zero_point must be given together");
  TORCH_CHECK(!quantized || has_scale, kOp, ": ", x.scalar_type(),
              " x needs x_scale and x_zero_point");
  const bool dynamic = !quantized && !has_scale;
  if (has_scale) {
    check_per_image(*x_scale_in, at::kFloat, N, "x_scale");
    check_per_image(*x_zp_in, at::kInt, N, "x_zero_point");
    check_device(*x_scale_in, x, "x_scale");
    check_device(*x_zp_in, x, "x_zero_point");
  }
  // the zero point's range: int8 x's own, else the uint8 the bytes are (or become)
  const int64_t zp_lo = x.scalar_type() == at::kChar ? -128 : 0;
  const int64_t zp_hi = x.scalar_type() == at::kChar ? 127 : 255;

  const cuda::ConvAct act = act_kind(activation);
  const at::ScalarType ost = out_dtype.has_value() ? *out_dtype
                             : quantized          ? at::kFloat
                                                  : x.scalar_type();
  const cuda::ConvOut okind = out_kind(ost);
  float out_inv = 1.f;
  int32_t ozp = 0;
  if (okind == cuda::ConvOut::U8 || okind == cuda::ConvOut::S8) {
    const float s = static_cast<float>(out_scale);
    TORCH_CHECK(std::isfinite(s) && s > 0.f && std::isfinite(1.0f / s), kOp,
                ": out_scale must be finite and > 0 for a quantized output, got ", out_scale);
    const int64_t lo = okind == cuda::ConvOut::U8 ? 0 : -128;
    const int64_t hi = okind == cuda::ConvOut::U8 ? 255 : 127;
    TORCH_CHECK(out_zero_point >= lo && out_zero_point <= hi, kOp, ": out_zero_point must lie in [",
                lo, ", ", hi, "] for ", ost, " output, got ", out_zero_point);
    out_inv = 1.0f / s;
    ozp = static_cast<int32_t>(out_zero_point);
  }

  // residual: [N, Cout, Ho, Wo], read in the output's channels_last layout (fp16 / bf16 widened
  // to fp32, which is exact)
  cuda::ConvRes rkind = cuda::ConvRes::None;
  const float rscale = static_cast<float>(residual_scale);
  if (defined(residual_in)) {
    const at::Tensor& r = *residual_in;
    const at::ScalarType rt = r.scalar_type();
    if (check_conv_residual(r, kOp, N, Cout, Ho, Wo, x.device(), residual_scale, residual_zero_point)) {
      rkind = rt == at::kByte ? cuda::ConvRes::U8 : cuda::ConvRes::S8;
    } else {
      rkind = cuda::ConvRes::F32;
    }
  }

  // ---- allocation and launch
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({N, Cout, Ho, Wo},
                             x.options().dtype(ost).memory_format(at::MemoryFormat::ChannelsLast));
  if (N == 0) return out;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor w = w_in.contiguous();
  const at::Tensor w_scale = w_scale_in.contiguous();
  at::Tensor residual;
  if (rkind == cuda::ConvRes::F32)
    residual = residual_in->to(at::kFloat).contiguous(at::MemoryFormat::ChannelsLast);
  else if (rkind != cuda::ConvRes::None)
    residual = residual_in->contiguous(at::MemoryFormat::ChannelsLast);

  cuda::Int8Conv2dArgs a;
  a.x = x.data_ptr();
  a.x_type = src;
  a.N = N;
  a.C = C;
  a.H = H;
  a.W = W;
  a.x_stride_n = x.stride(0);
  a.x_stride_c = x.stride(1);
  a.x_stride_h = x.stride(2);
  a.x_stride_w = x.stride(3);
  a.x_dynamic = dynamic;
  a.w = w.data_ptr<int8_t>();
  a.w_scale = w_scale.data_ptr<float>();
  a.bias = bias.defined() ? bias.data_ptr<float>() : nullptr;
  a.Cout = Cout;
  a.kh = kh;
  a.kw = kw;
  a.stride_h = stride[0];
  a.stride_w = stride[1];
  a.pad_h = pad_t;
  a.pad_w = pad_l;
  a.dil_h = dilation[0];
  a.dil_w = dilation[1];
  a.groups = groups;
  a.Ho = Ho;
  a.Wo = Wo;
  a.act = act;
  a.out_kind = okind;
  a.out_inv = out_inv;
  a.out_zp = ozp;
  a.out = out.data_ptr();
  if (rkind != cuda::ConvRes::None) {
    a.res = residual.data_ptr();
    a.res_kind = rkind;
    a.res_scale = rscale;
    a.res_zp = static_cast<int32_t>(residual_zero_point);
  }

  const int64_t ws_bytes = static_cast<int64_t>(cuda::int8_conv2d_workspace_bytes(a));
  const at::Tensor workspace = at::empty({std::max<int64_t>(ws_bytes, 1)}, x.options().dtype(at::kByte));

  ValueChecks checks;
  checks.add(any_nonfinite(w_scale), "w_scale must be finite");
  at::Tensor xs, xzp;
  if (has_scale) {
    xs = x_scale_in->expand({N}).contiguous();
    xzp = x_zp_in->expand({N}).contiguous();
    checks.add(any_nonfinite(xs), "x_scale must be finite");
    if (!quantized) checks.add(xs.le(0).any(), "x_scale must be > 0");
    const std::string what = x.scalar_type() == at::kChar   ? "int8 x"
                             : x.scalar_type() == at::kByte ? "uint8 x"
                                                            : "float x (quantized to uint8)";
    checks.add(xzp.lt(zp_lo).logical_or(xzp.gt(zp_hi)).any(),
               "x_zero_point must lie in [" + std::to_string(zp_lo) + ", " +
                   std::to_string(zp_hi) + "] for " + what);
  }
  if (dynamic) {
    // per-image min / max: the quantization parameters, and the finiteness check
    xs = at::empty({N}, x.options().dtype(at::kFloat));
    xzp = at::empty({N}, x.options().dtype(at::kInt));
    const at::Tensor nonfinite = at::empty({N}, x.options().dtype(at::kInt));
    const cudaError_t err = cuda::int8_conv2d_dynamic_params(
        a, xs.data_ptr<float>(), xzp.data_ptr<int32_t>(), nonfinite.data_ptr<int32_t>(),
        workspace.data_ptr(), stream);
    TORCH_CHECK(err == cudaSuccess, kOp, " CUDA kernel (input range) failed: ",
                cudaGetErrorString(err));
    checks.add(nonfinite.ne(0).any(), "x holds NaN or infinite values");
  }
  checks.run(stream);

  a.x_scale = xs.data_ptr<float>();
  a.x_zp = xzp.data_ptr<int32_t>();
  const cudaError_t err = cuda::int8_conv2d(a, workspace.data_ptr(), stream);
  TORCH_CHECK(err == cudaSuccess, kOp, " CUDA kernel failed: ", cudaGetErrorString(err));
  return out;
}

// The packed blob is the CPU kernels' layout (the CUDA kernels read w directly): packing a CUDA
// weight gives the CPU op's bytes on the weight's device, so modules can move between devices.
at::Tensor int8_conv2d_pack_weight_cuda_impl(const at::Tensor& w, int64_t groups) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("pycompress::int8_conv2d_pack_weight", "")
                             .typed<at::Tensor(const at::Tensor&, int64_t)>();
  return op.call(w.to(at::kCPU), groups).to(w.device());
}

}  // namespace
}  // namespace pyc

TORCH_LIBRARY_IMPL(pycompress, CUDA, m) {
  m.impl("int8_conv2d", &pyc::int8_conv2d_cuda_impl);
  m.impl("int8_conv2d_pack_weight", &pyc::int8_conv2d_pack_weight_cuda_impl);
}
