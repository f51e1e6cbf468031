// int8 2-D convolution on the CPU — torch-free kernel API (the op contract is
// int8_conv2d in int8_conv_binding.cpp).
//
// Activations are NHWC bytes (uint8, or int8 read as x ^ 0x80), one zero point and one scale per
// image; weights int8 [Cout, Cin / groups, kh, kw] with one scale per output channel.
//
//   acc[n, oy, ox, co] = sum over (ky, kx, c of the group) (x_q - zp[n]) * w    (exact, int32)
//   y = ((float)acc * x_scale[n]) * w_scale[co] + bias[co],
//   y = y + r with the residual r of the same output element (when there is one):
//       quantized: r = (float)(res_q - res_zp) * res_scale, float: r = its value,
//   then the activation in fp32, then fp32 / fp16 / bf16 out, or requantized:
//   clamp(nearbyint(y * out_inv) + out_zp). Each step is one rounded fp32 operation (never fused
//   into an FMA), so every code path gives the same bits.
//
// Padding positions hold the zero point (they add nothing to acc). Padding may be asymmetric:
// ph / pw are the rows above / columns left of the image, which place every tap
// (iy = oy * sh - ph + ky * dh, ix = ox * sw - pw + kx * dw); pb / pr (below / right) only set
// Ho / Wo, since every tap outside [0, H) x [0, W) is padding whichever side it lies on.
//
// Regular and grouped convs are implicit GEMMs on the packed int8 GEMM (int8/gemm.h): per group,
// the weight is the [Cout / groups, K] matrix with K = kh * kw * (Cin / groups) in (ky, kx, c)
// order, packed as int8_pack_b does; the activation rows of a block of output pixels are gathered
// from the NHWC input into a small per-thread buffer in the form the GEMM path reads. Paths that
// read A + 128 as uint8 (AVX-512 VNNI, AMX, AVX2 with narrow weights) take the bytes x_q (or
// x_q ^ 0x80 for int8 x) as they are and add (128 - zp) * sum_k w[co, k] to the product; the int16
// paths read x_q - zp. Depthwise convs (groups == Cin == Cout) run a direct kernel vectorized over
// channels.
#pragma once

#include <cstdint>

#include "common/dtypes.h"

namespace pyc {

struct Int8ConvGeom {
  int64_t N = 0, C = 0, H = 0, W = 0;  // input [N, C, H, W], NHWC memory
  int64_t Cout = 0, kh = 1, kw = 1;
  int64_t sh = 1, sw = 1, ph = 0, pw = 0, dh = 1, dw = 1;  // ph, pw: top and left padding
  int64_t pb = 0, pr = 0;  // bottom and right padding (only Ho / Wo depend on them)
  int64_t groups = 1;
  int64_t Ho = 0, Wo = 0;  // from int8_conv_out_size

  int64_t cin_g() const { return C / groups; }
  int64_t cout_g() const { return Cout / groups; }
  int64_t k() const { return kh * kw * cin_g(); }
  bool depthwise() const { return groups == C && groups == Cout; }
};

// (in + pad_lo + pad_hi - dil * (k - 1) - 1) / stride + 1, or a value <= 0 when the kernel does
// not fit.
inline int64_t int8_conv_out_size(int64_t in, int64_t k, int64_t stride, int64_t pad_lo,
                                  int64_t pad_hi, int64_t dil) {
  const int64_t span = in + pad_lo + pad_hi - dil * (k - 1) - 1;
  return span < 0 ? 0 : span / stride + 1;
}

// The same with pad on both sides.
inline int64_t int8_conv_out_size(int64_t in, int64_t k, int64_t stride, int64_t pad,
                                  int64_t dil) {
  return int8_conv_out_size(in, k, stride, pad, pad, dil);
}

// Bytes of the packed weight (only Cout, C, kh, kw and groups matter).
//   regular / grouped: groups blocks of int8_packed_bytes(Cout / groups, K), one after another;
//   depthwise:         the direct kernel's own layout (VNNI tap groups, per-channel weight sums,
//                      int16 weights; see cpu/conv.cpp), valid for every ISA level.
int64_t int8_conv_packed_bytes(const Int8ConvGeom& g);

// Units of packing work (int8_conv_pack_weight covers units [u0, u1)).
int64_t int8_conv_pack_units(const Int8ConvGeom& g);

// w: int8 [Cout, Cin / groups, kh, kw], contiguous.
void int8_conv_pack_weight(const int8_t* w, const Int8ConvGeom& g, int8_t* packed, int64_t u0,
                           int64_t u1);

enum class ConvAct : int { None = 0, Relu = 1, Relu6 = 2, Silu = 3, Hardswish = 4 };
enum class ConvOut : int { F32 = 0, F16 = 1, BF16 = 2, U8 = 3, S8 = 4 };
// The residual's element type (fp16 / bf16 residuals are widened to fp32 by the caller).
enum class ConvRes : int { None = 0, U8 = 1, S8 = 2, F32 = 3 };

struct Int8ConvArgs {
  const uint8_t* x = nullptr;  // NHWC [N, H, W, C] bytes
  bool x_signed = false;       // int8 x (the bytes are two's complement)
  const int32_t* x_zp = nullptr;     // [N], in x's own range
  const float* x_scale = nullptr;    // [N]
  const float* w_scale = nullptr;    // [Cout]
  const float* bias = nullptr;       // [Cout] or nullptr
  ConvAct act = ConvAct::None;
  ConvOut out_kind = ConvOut::F32;
  float out_inv = 1.f;  // 1 / out_scale (requantized outputs)
  int32_t out_zp = 0;
  void* out = nullptr;  // NHWC [N, Ho, Wo, Cout]
  // residual added before the activation: NHWC [N, Ho, Wo, Cout] like out (element i of out
  // takes element i of res), or res_kind None
  const void* res = nullptr;
  ConvRes res_kind = ConvRes::None;
  float res_scale = 1.f;  // quantized residuals: r = (float)(res_q - res_zp) * res_scale
  int32_t res_zp = 0;     // in the residual's own range (uint8: 0..255, int8: -128..127)
  // plan.padded: the padded input written by int8_conv_pad_input (plan.pad_bytes)
  const uint8_t* x_padded = nullptr;
};

// How a problem is cut into tasks, and the per-thread workspace the tasks need.
struct Int8ConvPlan {
  int path = 0;            // GEMM path (int8_gemm_path) or, for depthwise, the ISA level
  bool depthwise = false;
  int64_t rows = 0;        // output pixels per block
  int64_t blocks = 0;      // pixel blocks
  int64_t chunks = 1;      // panel ranges per group
  int64_t chunk_panels = 0;
  int64_t tasks = 0;       // groups * blocks * chunks
  bool direct_rows = false;  // 1x1 stride-1 unpadded conv whose uint8 input rows the GEMM reads as they are
  // AMX, stride 1, more than one tap, input channels of a group a multiple of 64: the taps' rows
  // are read in place from a padded copy of the input (pad_h x pad_w pixels per image, the
  // padding holding the zero point) instead of being gathered. Row r of an image's pad_w-wide
  // output grid is output pixel (r / pad_w, r % pad_w) when r % pad_w < Wo (the other rows are
  // computed and dropped). A block is `rows` grid rows (img_blocks per image) of `imgs`
  // consecutive images (more than one only when an image is one block): the images of a block
  // share each weight panel pair while it is in cache.
  bool padded = false;
  int64_t pad_h = 0, pad_w = 0;
  int64_t grid_rows = 0;  // (Ho - 1) * pad_w + Wo
  int64_t img_blocks = 0;
  int64_t imgs = 1;
  int64_t pad_bytes = 0;  // the padded input, shared by all the tasks (with slack after the last image)
  int64_t pad_units = 0;  // units of int8_conv_pad_input's work
  int64_t workspace_bytes = 0;
};

// isa: 0 scalar, 1 avx2, 2 avx512, 3 amx (the active level); threads: how many will share the
// tasks. packed: the packed weight (its recorded maxima pick the AVX2 narrow path).
Int8ConvPlan int8_conv_plan(int isa, const Int8ConvGeom& g, const int8_t* packed, int threads);

// plan.padded: writes units [u0, u1) of the padded input (all of them before any task runs) to
// xpad (plan.pad_bytes, 64-byte aligned); args.x_padded must then point to it.
void int8_conv_pad_input(const Int8ConvPlan& plan, const Int8ConvGeom& g, const Int8ConvArgs& args,
                         uint8_t* xpad, int64_t u0, int64_t u1);

// Runs tasks [t0, t1) on the calling thread; workspace: plan.workspace_bytes, 64-byte aligned.
void int8_conv_run(const Int8ConvPlan& plan, const Int8ConvGeom& g, const int8_t* packed,
                   const Int8ConvArgs& args, int64_t t0, int64_t t1, void* workspace);

// ------------------------------------------------------------- float input quantization

// min / max over x[b, e) folded into *lo / *hi (start them at +inf / -inf); *finite cleared when a
// value is NaN or infinite.
void int8_conv_minmax(int isa, const void* x, DType dt, int64_t b, int64_t e, float* lo, float* hi,
                      bool* finite);

// Per-image dynamic parameters from the data range: lo = min(0, min x), hi = max(0, max x),
// scale = (hi - lo) / 255 (1 when hi == lo), zp = clamp(nearbyint(-lo / scale), 0, 255).
void int8_conv_dynamic_params(float min_x, float max_x, float* scale, int32_t* zp);

// q[i] = clamp(nearbyint(x[i] / s) + zp, 0, 255) (divide) or clamp(nearbyint(x[i] * s) + zp, 0, 255)
// for i in [b, e).
void int8_conv_quantize_u8(int isa, const void* x, DType dt, int64_t b, int64_t e, float s,
                           bool divide, int32_t zp, uint8_t* q);

// The same bytes for pixels [p0, p1) of one NCHW image (x: its C planes of HW values) written
// channels-last (q: the image's HW * C bytes): the layout change and the quantization in one pass.
void int8_conv_quantize_u8_nchw(int isa, const void* x, DType dt, int64_t C, int64_t HW, int64_t p0,
                                int64_t p1, float s, bool divide, int32_t zp, uint8_t* q);

}  // namespace pyc
