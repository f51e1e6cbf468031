// Torch glue for the int8 convolution (CPU): schemas, argument checks and the CPU kernels'
// dispatch. The op contract is in int8/conv.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <string>
#include <vector>

#include "common/cpu_features.h"
#include "common/torch_utils.h"
#include "int8/conv.h"

namespace pyc {
namespace {

constexpr const char* kOp = "int8_conv2d";

ConvAct parse_activation(const std::string& s) {
  if (s == "none") return ConvAct::None;
  if (s == "relu") return ConvAct::Relu;
  if (s == "relu6") return ConvAct::Relu6;
  if (s == "silu") return ConvAct::Silu;
  if (s == "hardswish") return ConvAct::Hardswish;
  TORCH_CHECK(false, kOp, ": unknown activation '", s,
              "' (expected none, relu, relu6, silu or hardswish)");
  return ConvAct::None;
}

std::vector<int64_t> pair_arg(at::IntArrayRef v, const char* name, int64_t min) {
  TORCH_CHECK(v.size() == 2, kOp, ": ", name, " must have 2 values, got ", v.size());
  for (int64_t e : v)
    TORCH_CHECK(e >= min, kOp, ": ", name, " values must be >= ", min, ", got ", v);
  return {v[0], v[1]};
}

// Geometry from w [Cout, Cin / groups, kh, kw] and the conv arguments (x sizes N, C, H, W).
Int8ConvGeom make_geom(at::IntArrayRef xs, const at::Tensor& w, at::IntArrayRef stride,
                       at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(w.dim() == 4, kOp, ": w must be 4-D [Cout, Cin/groups, kh, kw], got ", w.dim(), "-D");
  TORCH_CHECK_TYPE(w.scalar_type() == at::kChar, kOp, ": w must be int8, got ", w.scalar_type());
  TORCH_CHECK(groups >= 1, kOp, ": groups must be >= 1, got ", groups);
  const auto s = pair_arg(stride, "stride", 1), p = pair_arg(padding, "padding", 0),
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
  g.pw = p[1];
  g.dh = d[0];
  g.dw = d[1];
  g.groups = groups;
  g.Ho = int8_conv_out_size(g.H, g.kh, g.sh, g.ph, g.dh);
  g.Wo = int8_conv_out_size(g.W, g.kw, g.sw, g.pw, g.dw);
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

// Per-image float32 [N] from a [1] or [N] tensor.
at::Tensor per_image(const at::Tensor& t, int64_t N, at::ScalarType dt, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == dt, kOp, ": ", name, " must be ", dt, ", got ",
                   t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && (t.size(0) == 1 || t.size(0) == N), kOp, ": ", name,
              " must have shape [1] or [N] = [", N, "], got ", t.sizes());
  TORCH_CHECK(t.device().is_cpu(), kOp, ": ", name, " must be on the CPU like x");
  at::Tensor c = t.contiguous();
  if (c.size(0) != N) c = c.expand({N}).contiguous();
  return c;
}

void check_zero_points(const at::Tensor& zp, int64_t lo, int64_t hi, const char* what) {
  if (zp.numel() == 0) return;
  const int64_t mn = zp.min().item<int64_t>(), mx = zp.max().item<int64_t>();
  TORCH_CHECK(mn >= lo && mx <= hi, kOp, ": x_zero_point must lie in [", lo, ", ", hi, "] for ",
              what, ", got values in [", mn, ", ", mx, "]");
}

void check_finite(const at::Tensor& t, const char* name, bool positive) {
  if (t.numel() == 0) return;
  TORCH_CHECK(at::isfinite(t).all().item<bool>(), kOp, ": ", name, " must be finite");
  if (positive) TORCH_CHECK((t > 0).all().item<bool>(), kOp, ": ", name, " must be > 0");
}

at::Tensor int8_conv2d_cpu(const at::Tensor& x_in, const c10::optional<at::Tensor>& x_scale_in,
                           const c10::optional<at::Tensor>& x_zp_in, const at::Tensor& w,
                           const at::Tensor& w_scale_in, const c10::optional<at::Tensor>& bias_in,
                           const c10::optional<at::Tensor>& w_packed, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                           c10::string_view activation, c10::optional<at::ScalarType> out_dtype,
                           double out_scale, int64_t out_zero_point) {
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
  check_finite(w_scale, "w_scale", false);
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
    TORCH_CHECK(std::isfinite(oscale) && oscale > 0.f && std::isfinite(1.0f / oscale), kOp,
                ": out_scale must be finite and > 0 for a quantized output, got ", out_scale);
    const int64_t lo = ok == ConvOut::U8 ? 0 : -128, hi = ok == ConvOut::U8 ? 255 : 127;
    TORCH_CHECK(out_zero_point >= lo && out_zero_point <= hi, kOp, ": out_zero_point must lie in [",
                lo, ", ", hi, "] for ", ot, " output, got ", out_zero_point);
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
  at::Tensor x_scale, x_zp;
  if (has_scale) {
    x_scale = per_image(*x_scale_in, N, at::kFloat, "x_scale");
    x_zp = per_image(*x_zp_in, N, at::kInt, "x_zero_point");
    check_finite(x_scale, "x_scale", !x_quant);
    if (xt == at::kChar) {
      check_zero_points(x_zp, -128, 127, "int8 x");
    } else {
      check_zero_points(x_zp, 0, 255, x_quant ? "uint8 x" : "float x (quantized to uint8)");
    }
  }
  if (N == 0) return out;

  const at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t per_img = g.H * g.W * g.C;
  at::Tensor xq;  // uint8 / int8 NHWC
  if (x_quant) {
    xq = x;
  } else {
    const DType dt = to_dtype(x, "int8_conv2d: x");
    const int isa = static_cast<int>(active_cpu_isa());
    xq = at::empty_like(x, x.options().dtype(at::kByte));
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
      x_scale = at::empty({N}, x.options().dtype(at::kFloat));
      x_zp = at::empty({N}, x.options().dtype(at::kInt));
      for (int64_t n = 0; n < N; ++n) {
        float l = INFINITY, h = -INFINITY;
        for (int64_t u = n * pieces; u < (n + 1) * pieces; ++u) {
          TORCH_CHECK(fin[u], kOp, ": x holds NaN or infinite values (image ", n, ")");
          l = std::min(l, lo[u]);
          h = std::max(h, hi[u]);
        }
        int8_conv_dynamic_params(l, h, x_scale.data_ptr<float>() + n, x_zp.data_ptr<int32_t>() + n);
      }
    }
    const float* sp = x_scale.data_ptr<float>();
    const int32_t* zp = x_zp.data_ptr<int32_t>();
    const bool divide = !has_scale;
    at::parallel_for(0, N * pieces, 1, [&](int64_t b, int64_t e) {
      for (int64_t u = b; u < e; ++u) {
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
  args.x_zp = x_zp.data_ptr<int32_t>();
  args.x_scale = x_scale.data_ptr<float>();
  args.w_scale = w_scale.data_ptr<float>();
  args.bias = bias.defined() ? bias.data_ptr<float>() : nullptr;
  args.act = act;
  args.out_kind = ok;
  args.out_inv = 1.0f / oscale;
  args.out_zp = static_cast<int32_t>(out_zero_point);
  args.out = out.data_ptr();

  const int isa = static_cast<int>(active_cpu_isa());
  const int8_t* pk = packed.data_ptr<int8_t>();
  const Int8ConvPlan plan = int8_conv_plan(isa, g, pk, at::get_num_threads());
  parallel_for_dynamic(0, plan.tasks, 1, 4, [&](int64_t b, int64_t e) {
    std::vector<uint8_t> buf(static_cast<size_t>(plan.workspace_bytes + 64));
    void* ws = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t(63));
    int8_conv_run(plan, g, pk, args, b, e, ws);
  });
  return out;
}

}  // namespace
}  // namespace pyc

TORCH_LIBRARY_FRAGMENT(pycompress, m) {
  m.def("int8_conv2d_pack_weight(Tensor w, int groups) -> Tensor");
  m.def(
      "int8_conv2d(Tensor x, Tensor? x_scale, Tensor? x_zero_point, Tensor w, Tensor w_scale, "
      "Tensor? bias, Tensor? w_packed, int[2] stride, int[2] padding, int[2] dilation, int groups, "
      "str activation, ScalarType? out_dtype, float out_scale, int out_zero_point) -> Tensor");
}

TORCH_LIBRARY_IMPL(pycompress, CPU, m) {
  m.impl("int8_conv2d_pack_weight", &pyc::int8_conv2d_pack_weight_cpu);
  m.impl("int8_conv2d", &pyc::int8_conv2d_cpu);
}
