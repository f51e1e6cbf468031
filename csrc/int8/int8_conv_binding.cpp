// Torch glue for the int8 convolution (CPU): schemas, argument checks and the CPU kernels'
// dispatch. The op contract is in int8/conv.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "common/cpu_features.h"
#include "common/torch_utils.h"
#include "int8/conv.h"
#include "int8/int8_checks.h"

namespace pyc {
namespace {

constexpr const char* kOp = "int8_conv2d";

ConvAct parse_activation(const std::string& s) {
  if (s == "none") return ConvAct::None;
  if (s == "relu") return ConvAct::Relu;
  if (s == "relu6") return ConvAct::Relu6;
  if (s == "silu") return ConvAct::Silu;
  if (s == "hardswish") return ConvAct::Hardswish;
  TORCH_CHECK_VALUE(false, kOp, ": unknown activation '", s,
              "' (expected none, relu, relu6, silu or hardswish)");
  return ConvAct::None;
}

std::vector<int64_t> pair_arg(at::IntArrayRef v, const char* name, int64_t min) {
  TORCH_CHECK(v.size() == 2, kOp, ": ", name, " must have 2 values, got ", v.size());
  for (int64_t e : v)
    TORCH_CHECK(e >= min, kOp, ": ", name, " values must be >= ", min, ", got ", v);
  return {v[0], v[1]};
}

// padding: [ph, pw] (both sides) or [top, bottom, left, right]; returns {top, bottom, left, right}.
std::vector<int64_t> padding_arg(at::IntArrayRef v) {
  TORCH_CHECK_VALUE(v.size() == 2 || v.size() == 4, kOp,
                    ": padding must have 2 values [ph, pw] or 4 [top, bottom, left, right], got ",
                    v.size(), " (", v, ")");
  for (int64_t e : v) TORCH_CHECK_VALUE(e >= 0, kOp, ": padding values must be >= 0, got ", v);
  if (v.size() == 2) return {v[0], v[0], v[1], v[1]};
  return {v[0], v[1], v[2], v[3]};
}

// Geometry from w [Cout, Cin / groups, kh, kw] and the conv arguments (x sizes N, C, H, W).
Int8ConvGeom make_geom(at::IntArrayRef xs, const at::Tensor& w, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(w.dim() == 4, kOp, ": w must be 4-D [Cout, Cin/groups, kh, kw], got ", w.dim(), "-D");
  TORCH_CHECK_TYPE(w.scalar_type() == at::kChar, kOp, ": w must be int8, got ", w.scalar_type());
  TORCH_CHECK(groups >= 1, kOp, ": groups must be >= 1, got ", groups);
  const auto s = pair_arg(stride, "stride", 1), p = padding_arg(padding),
             d = pair_arg(dilation, "dilation", 1);
  Int8ConvGeom g;
  g.N = xs[0];
  g.C = xs[1];
  g.H = xs[2];
  g.W = xs[3];
  g.Cout = w.size(0);
  g.kh = w.size(2);
  g.kw = w.size(3);
  TORCH_CHECK(g.Cout >= 1 && w.size(1) >= 1 && g.kh >= 1 && g.kw >= 1, kOp,
              ": w must be non-empty, got shape ", w.sizes());
  TORCH_CHECK(g.Cout % groups == 0, kOp, ": groups=", groups,
              " must divide the output channels (w.size(0) = ", g.Cout, ")");
  TORCH_CHECK(g.C % groups == 0, kOp, ": groups=", groups, " must divide the input channels (x has ",
              g.C, ")");
  TORCH_CHECK(g.C == w.size(1) * groups, kOp, ": x has ", g.C, " channels but w ", w.sizes(),
              " with groups=", groups, " expects ", w.size(1) * groups);
  g.sh = s[0];
  g.sw = s[1];
  g.ph = p[0];
  g.pb = p[1];
  g.pw = p[2];
  g.pr = p[3];
  g.dh = d[0];
  g.dw = d[1];
  g.groups = groups;
  g.Ho = int8_conv_out_size(g.H, g.kh, g.sh, g.ph, g.pb, g.dh);
  g.Wo = int8_conv_out_size(g.W, g.kw, g.sw, g.pw, g.pr, g.dw);
  TORCH_CHECK(g.Ho >= 1 && g.Wo >= 1, kOp, ": the output would be empty: input ", g.H, "x", g.W,
              " with padding ", padding, " is smaller than the dilated kernel ",
              g.dh * (g.kh - 1) + 1, "x", g.dw * (g.kw - 1) + 1);
  return g;
}

at::Tensor conv_pack_weight(const at::Tensor& w, const Int8ConvGeom& g) {
  const at::Tensor wc = w.contiguous();
  auto packed = at::empty({int8_conv_packed_bytes(g)}, w.options().dtype(at::kChar));
  const int8_t* wp = wc.data_ptr<int8_t>();
  int8_t* pp = packed.data_ptr<int8_t>();
  at::parallel_for(0, int8_conv_pack_units(g), 1, [&](int64_t b, int64_t e) {
    int8_conv_pack_weight(wp, g, pp, b, e);
  });
  return packed;
}

at::Tensor int8_conv2d_pack_weight_cpu(const at::Tensor& w, int64_t groups) {
  TORCH_CHECK(w.dim() == 4, "int8_conv2d_pack_weight: w must be 4-D [Cout, Cin/groups, kh, kw], got ",
              w.dim(), "-D");
  TORCH_CHECK(groups >= 1, "int8_conv2d_pack_weight: groups must be >= 1, got ", groups);
  const int64_t C = w.size(1) * groups;
  return conv_pack_weight(w, make_geom({1, C, w.size(2), w.size(3)}, w, {1, 1}, {0, 0}, {1, 1},
                                       groups));
}

// Per-image values [N] from a [1] or [N] tensor (checked with raw loops: these are tiny and the
// op is called once per layer, where a few small tensor ops would cost more than a small conv).
template <typename T>
std::vector<T> per_image(const at::Tensor& t, int64_t N, at::ScalarType dt, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == dt, kOp, ": ", name, " must be ", dt, ", got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && (t.size(0) == 1 || t.size(0) == N), kOp, ": ", name,
                    " must have shape [1] or [N] = [", N, "], got ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), kOp, ": ", name, " must be on the CPU like x");
  std::vector<T> v(static_cast<size_t>(std::max<int64_t>(N, 1)));
  const T* p = t.data_ptr<T>();
  const int64_t st = t.stride(0);
  for (int64_t i = 0; i < static_cast<int64_t>(v.size()); ++i) v[i] = p[t.size(0) == 1 ? 0 : i * st];
  return v;
}

void check_finite(const float* p, int64_t n, int64_t stride, const char* name, bool positive) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = p[i * stride];
    TORCH_CHECK_VALUE(std::isfinite(v), kOp, ": ", name, " must be finite, got ", v, " at index ", i);
    if (positive)
      TORCH_CHECK_VALUE(v > 0.f && std::isfinite(1.0f / v), kOp, ": ", name,
                        " must be > 0 (with a finite 1 / x_scale in fp32) to quantize a float x, got ", v);
  }
}

at::Tensor int8_conv2d_cpu(const at::Tensor& x_in, const c10::optional<at::Tensor>& x_scale_in,
                           const c10::optional<at::Tensor>& x_zp_in, const at::Tensor& w,
                           const at::Tensor& w_scale_in, const c10::optional<at::Tensor>& bias_in,
                           const c10::optional<at::Tensor>& w_packed, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                           c10::string_view activation, c10::optional<at::ScalarType> out_dtype,
                           double out_scale, int64_t out_zero_point,
                           const c10::optional<at::Tensor>& residual_in, double residual_scale,
                           int64_t residual_zero_point) {
  TORCH_CHECK(x_in.dim() == 4, kOp, ": x must be 4-D [N, C, H, W], got ", x_in.dim(), "-D");
  const at::ScalarType xt = x_in.scalar_type();
  const bool x_quant = xt == at::kByte || xt == at::kChar;
  TORCH_CHECK_TYPE(x_quant || is_supported_float(xt), kOp,
                   ": x must be uint8, int8, float32, float16 or bfloat16, got ", xt);
  TORCH_CHECK(x_in.device().is_cpu() && w.device().is_cpu() && w_scale_in.device().is_cpu(), kOp,
              ": x, w and w_scale must be CPU tensors here");
  const Int8ConvGeom g = make_geom(x_in.sizes(), w, stride, padding, dilation, groups);
  const ConvAct act = parse_activation(std::string(activation));

  TORCH_CHECK_TYPE(w_scale_in.scalar_type() == at::kFloat, kOp, ": w_scale must be float32, got ",
                   w_scale_in.scalar_type());
  TORCH_CHECK(w_scale_in.dim() == 1 && w_scale_in.size(0) == g.Cout, kOp,
              ": w_scale must have shape [Cout] = [", g.Cout, "], got ", w_scale_in.sizes());
  const at::Tensor w_scale = w_scale_in.contiguous();
  check_finite(w_scale.data_ptr<float>(), g.Cout, 1, "w_scale", false);
  at::Tensor bias;
  if (bias_in.has_value() && bias_in->defined()) {
    TORCH_CHECK_TYPE(is_supported_float(bias_in->scalar_type()), kOp,
                     ": bias must be float32 (or float16 / bfloat16), got ", bias_in->scalar_type());
    TORCH_CHECK(bias_in->dim() == 1 && bias_in->size(0) == g.Cout, kOp,
                ": bias must have shape [Cout] = [", g.Cout, "], got ", bias_in->sizes());
    TORCH_CHECK(bias_in->device().is_cpu(), kOp, ": bias must be on the CPU like x");
    bias = bias_in->to(at::kFloat).contiguous();
  }

  // output kind
  const at::ScalarType ot = out_dtype.has_value() ? *out_dtype : (x_quant ? at::kFloat : xt);
  ConvOut ok = ConvOut::F32;
  switch (ot) {
    case at::kFloat: ok = ConvOut::F32; break;
    case at::kHalf: ok = ConvOut::F16; break;
    case at::kBFloat16: ok = ConvOut::BF16; break;
    case at::kByte: ok = ConvOut::U8; break;
    case at::kChar: ok = ConvOut::S8; break;
    default:
      TORCH_CHECK_TYPE(false, kOp, ": out_dtype must be float32, float16, bfloat16, uint8 or int8, got ",
                       ot);
  }
  const float oscale = static_cast<float>(out_scale);
  if (ok == ConvOut::U8 || ok == ConvOut::S8) {
    TORCH_CHECK_VALUE(std::isfinite(oscale) && oscale > 0.f && std::isfinite(1.0f / oscale), kOp,
                ": out_scale must be finite and > 0 for a quantized output, got ", out_scale);
    const int64_t lo = ok == ConvOut::U8 ? 0 : -128, hi = ok == ConvOut::U8 ? 255 : 127;
    TORCH_CHECK_VALUE(out_zero_point >= lo && out_zero_point <= hi, kOp, ": out_zero_point must lie in [",
                lo, ", ", hi, "] for ", ot, " output, got ", out_zero_point);
  }

  // residual: [N, Cout, Ho, Wo], read in the output's channels_last layout (fp16 / bf16 widened
  // to fp32, which is exact)
  at::Tensor residual;
  ConvRes rk = ConvRes::None;
  const float rscale = static_cast<float>(residual_scale);
  if (residual_in.has_value() && residual_in->defined()) {
    const at::Tensor& r = *residual_in;
    const at::ScalarType rt = r.scalar_type();
    if (check_conv_residual(r, kOp, g.N, g.Cout, g.Ho, g.Wo, x_in.device(), residual_scale,
                            residual_zero_point)) {
      rk = rt == at::kByte ? ConvRes::U8 : ConvRes::S8;
      residual = r.contiguous(at::MemoryFormat::ChannelsLast);
    } else {
      rk = ConvRes::F32;
      residual = r.to(at::kFloat).contiguous(at::MemoryFormat::ChannelsLast);
    }
  }

  at::Tensor packed;
  const int64_t pbytes = int8_conv_packed_bytes(g);
  if (w_packed.has_value() && w_packed->defined()) {
    const at::Tensor& p = *w_packed;
    TORCH_CHECK(p.scalar_type() == at::kChar && p.dim() == 1 && p.is_contiguous() &&
                    p.numel() == pbytes && p.device().is_cpu(),
                kOp, ": w_packed must be the contiguous int8 CPU result of int8_conv2d_pack_weight(w, ",
                groups, ") (", pbytes, " bytes for w of shape ", w.sizes(), "), got ",
                p.scalar_type(), " of shape ", p.sizes());
    packed = p;
  } else {
    packed = conv_pack_weight(w, g);
  }

  const bool has_scale = x_scale_in.has_value() && x_scale_in->defined();
  const bool has_zp = x_zp_in.has_value() && x_zp_in->defined();
  if (x_quant) {
    TORCH_CHECK(has_scale && has_zp, kOp, ": quantized x (", xt,
                ") needs x_scale and x_zero_point");
  } else {
    TORCH_CHECK(has_scale == has_zp, kOp,
                ": float x takes both x_scale and x_zero_point (static quantization) or neither "
                "(dynamic)");
  }

  const int64_t N = g.N;
  auto out = at::empty({N, g.Cout, g.Ho, g.Wo},
                       x_in.options().dtype(ot).memory_format(at::MemoryFormat::ChannelsLast));
  std::vector<float> x_scale;
  std::vector<int32_t> x_zp;
  if (has_scale) {
    x_scale = per_image<float>(*x_scale_in, N, at::kFloat, "x_scale");
    x_zp = per_image<int32_t>(*x_zp_in, N, at::kInt, "x_zero_point");
    check_finite(x_scale.data(), static_cast<int64_t>(x_scale.size()), 1, "x_scale", !x_quant);
    const int32_t lo = xt == at::kChar ? -128 : 0, hi = xt == at::kChar ? 127 : 255;
    for (int32_t z : x_zp)
      TORCH_CHECK_VALUE(z >= lo && z <= hi, kOp, ": x_zero_point must lie in [", lo, ", ", hi,
                        "] for ", xt == at::kChar ? "int8 x" : (x_quant ? "uint8 x" : "float x (quantized to uint8)"),
                        ", got ", z);
  }
  if (N == 0) return out;

  // a float NCHW x (an image batch as users hold it) is quantized straight into channels-last
  // bytes: one pass instead of a float layout copy and then the quantization
  const bool nchw = !x_quant && g.C > 1 && x_in.is_contiguous() &&
                    !x_in.is_contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor x = nchw ? x_in : x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t per_img = g.H * g.W * g.C;
  at::Tensor xq;  // uint8 / int8 NHWC
  if (x_quant) {
    xq = x;
  } else {
    const DType dt = to_dtype(x, "int8_conv2d: x");
    const int isa = static_cast<int>(active_cpu_isa());
    xq = at::empty({N, g.C, g.H, g.W}, x.options().dtype(at::kByte).memory_format(at::MemoryFormat::ChannelsLast));
    const void* xp = x.data_ptr();
    uint8_t* qp = xq.data_ptr<uint8_t>();
    const int64_t piece = 1 << 16, pieces = (per_img + piece - 1) / piece;
    if (!has_scale) {
      std::vector<float> lo(N * pieces), hi(N * pieces);
      std::vector<char> fin(N * pieces);
      at::parallel_for(0, N * pieces, 1, [&](int64_t b, int64_t e) {
        for (int64_t u = b; u < e; ++u) {
          const int64_t n = u / pieces, i0 = n * per_img + (u % pieces) * piece;
          const int64_t i1 = std::min(i0 + piece, (n + 1) * per_img);
          float l = INFINITY, h = -INFINITY;
          bool f = true;
          int8_conv_minmax(isa, xp, dt, i0, i1, &l, &h, &f);
          lo[u] = l;
          hi[u] = h;
          fin[u] = f;
        }
      });
      x_scale.resize(N);
      x_zp.resize(N);
      for (int64_t n = 0; n < N; ++n) {
        float l = INFINITY, h = -INFINITY;
        for (int64_t u = n * pieces; u < (n + 1) * pieces; ++u) {
          TORCH_CHECK_VALUE(fin[u], kOp, ": x holds NaN or infinite values (image ", n,
                            "), which dynamic quantization cannot represent");
          l = std::min(l, lo[u]);
          h = std::max(h, hi[u]);
        }
        int8_conv_dynamic_params(l, h, &x_scale[n], &x_zp[n]);
      }
    }
    const float* sp = x_scale.data();
    const int32_t* zp = x_zp.data();
    const bool divide = !has_scale;
    const int64_t HW = g.H * g.W, px_piece = std::max<int64_t>(1, piece / g.C);
    const int64_t px_pieces = (HW + px_piece - 1) / px_piece;
    const int64_t elem = x.element_size();
    at::parallel_for(0, N * (nchw ? px_pieces : pieces), 1, [&](int64_t b, int64_t e) {
      for (int64_t u = b; u < e; ++u) {
        if (nchw) {
          const int64_t n = u / px_pieces, p0 = (u % px_pieces) * px_piece, p1 = std::min(p0 + px_piece, HW);
          const float s = divide ? sp[n] : 1.0f / sp[n];
          int8_conv_quantize_u8_nchw(isa, static_cast<const char*>(xp) + n * per_img * elem, dt, g.C, HW, p0, p1,
                                     s, divide, zp[n], qp + n * per_img);
          continue;
        }
        const int64_t n = u / pieces, i0 = n * per_img + (u % pieces) * piece;
        const int64_t i1 = std::min(i0 + piece, (n + 1) * per_img);
        // static: q = x * (1 / x_scale) in fp32; dynamic: x / scale
        const float s = divide ? sp[n] : 1.0f / sp[n];
        int8_conv_quantize_u8(isa, xp, dt, i0, i1, s, divide, zp[n], qp);
      }
    });
  }

  Int8ConvArgs args;
  args.x = static_cast<const uint8_t*>(xq.data_ptr());
  args.x_signed = xq.scalar_type() == at::kChar;
  args.x_zp = x_zp.data();
  args.x_scale = x_scale.data();
  args.w_scale = w_scale.data_ptr<float>();
  args.bias = bias.defined() ? bias.data_ptr<float>() : nullptr;
  args.act = act;
  args.out_kind = ok;
  args.out_inv = 1.0f / oscale;
  args.out_zp = static_cast<int32_t>(out_zero_point);
  args.out = out.data_ptr();
  if (rk != ConvRes::None) {
    args.res = residual.data_ptr();
    args.res_kind = rk;
    args.res_scale = rscale;
    args.res_zp = static_cast<int32_t>(residual_zero_point);
  }

  const int isa = static_cast<int>(active_cpu_isa());
  const int8_t* pk = packed.data_ptr<int8_t>();
  // A conv of a few microseconds of work (the late layers of a small network at batch 1) runs on
  // the calling thread: waking and joining the others would cost about as much as they save.
  // The estimate counts multiply-adds at rough rates of the GEMM and the depthwise kernels.
  const double macs = static_cast<double>(N * g.Ho * g.Wo) * static_cast<double>(g.Cout * g.k());
  const bool small = macs / (g.depthwise() ? 15e3 : 300e3) < 10.0;
  const Int8ConvPlan plan = int8_conv_plan(isa, g, pk, small ? 1 : at::get_num_threads());
  at::Tensor padded;
  if (plan.padded) {
    // the taps read their rows in place from a padded copy of x (one pass over the input)
    padded = at::empty({plan.pad_bytes + 64}, x_in.options().dtype(at::kByte));
    uint8_t* base = reinterpret_cast<uint8_t*>(
        (reinterpret_cast<uintptr_t>(padded.data_ptr<uint8_t>()) + 63) & ~uintptr_t(63));
    args.x_padded = base;
    const int64_t grain = std::max<int64_t>(1, (int64_t(64) << 10) / (plan.pad_w * g.C));
    auto pad = [&](int64_t b, int64_t e) { int8_conv_pad_input(plan, g, args, base, b, e); };
    if (small)
      pad(0, plan.pad_units);
    else
      at::parallel_for(0, plan.pad_units, grain, pad);
  }
  auto run = [&](int64_t b, int64_t e) {
    std::unique_ptr<uint8_t[]> buf(new uint8_t[static_cast<size_t>(plan.workspace_bytes + 64)]);
    void* ws = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(buf.get()) + 63) & ~uintptr_t(63));
    int8_conv_run(plan, g, pk, args, b, e, ws);
  };
  if (small)
    run(0, plan.tasks);
  else
    parallel_for_dynamic(0, plan.tasks, 1, 4, run);
  return out;
}

}  // namespace
}  // namespace pyc

TORCH_LIBRARY_FRAGMENT(pycompress, m) {
  m.def("int8_conv2d_pack_weight(Tensor w, int groups) -> Tensor");
  m.def(
      "int8_conv2d(Tensor x, Tensor? x_scale, Tensor? x_zero_point, Tensor w, Tensor w_scale, "
      "Tensor? bias, Tensor? w_packed, int[2] stride, int[] padding, int[2] dilation, int groups, "
      "str activation, ScalarType? out_dtype, float out_scale, int out_zero_point, "
      "Tensor? residual=None, float residual_scale=1.0, int residual_zero_point=0) -> Tensor");
}

TORCH_LIBRARY_IMPL(pycompress, CPU, m) {
  m.impl("int8_conv2d_pack_weight", &pyc::int8_conv2d_pack_weight_cpu);
  m.impl("int8_conv2d", &pyc::int8_conv2d_cpu);
}
