// int8 2-D convolution on CUDA (see conv.cuh for the math).
//
// Paths (the choice never changes a result: every path computes the same exact int32 sums and
// the same fp32 epilogue):
// * Implicit GEMM on int8 tensor cores (sm_80+, regular and grouped convs with at least 8 input
//   and 16 output channels per group): rows are output pixels m = (n, oy, ox), columns the output
//   channels of one group (blockIdx.z), K = kh * kw * Cg in (ky, kx, c) order, Cg the group's
//   input channels rounded up to 16. The A tile is gathered from the NHWC bytes straight into
//   shared memory, 16 channels per cp.async; the B tile is the reordered weight [Cout][K]. 64 x 64
//   x 64 block tiles, 4 warps of 32 x 32, a 4-stage cp.async pipeline, mma.sync m16n8k32 with
//   u8 (uint8 x) or s8 (int8 x) A and s8 B.
// * Direct kernel (depthwise convs, grouped convs with few channels per group, GPUs before
//   sm_80): one thread per output element, channels fastest, exact int32 sum of (x - zp) * w.
// * Float x: a min/max pass per image (dynamic quantization; also the finiteness check), then a
//   pass that quantizes into a temporary NHWC uint8 buffer, then one of the two paths above.
//
// Padding may be asymmetric: pad_h / pad_w are the rows above / columns left of the image and
// place every tap (iy = oy * stride_h - pad_h + ky * dil_h); the bottom / right padding enters
// only Ho / Wo (computed by the caller), since every tap outside the image is padding.
//
// Exactness of the tensor-core path. The MMA multiplies the stored bytes x_q (u8 or s8, as the
// instruction reads them) by w, so it yields raw = sum over K of x_q * w. Padding positions and
// pixel rows of a tile that hold padding are filled with the image's zero point byte zp (not with
// zeros), channels added to round Cg up to 16 hold weight 0, and the K tail past the last tap has
// weight 0 too. Hence, with wsum[co] = sum over K of w[co, k],
//   raw - zp * wsum[co] = sum over K of (x_q - zp) * w = acc
// over every tap of the window, padding included (where x_q - zp = 0), which is the contract's
// accumulator. No int32 sum here can overflow for K <= kInt8ConvMaxK (|x_q|, |x_q - zp| <= 255,
// |w| <= 128); the correction is computed modulo 2^32 (unsigned), which is exact because acc
// itself fits in int32.
//
// The epilogue uses the IEEE round-to-nearest intrinsics (__fmul_rn, __fadd_rn, __fdiv_rn), which
// nvcc never contracts into FMAs, in the contract's order (the residual's multiply and add too),
// so "none" / "relu" / "relu6" outputs are the CPU kernels' bits; silu uses expf (within 2 ulp), hence the looser promise there.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cfloat>
#include <type_traits>

#include "common/cuda_check.cuh"
#include "common/cuda_convert.cuh"
#include "int8/cuda/conv.cuh"

namespace pyc {
namespace cuda {
namespace {

// ------------------------------------------------------------------ plan

constexpr int64_t kAlign = 256;  // workspace regions start on 256-byte boundaries
int64_t align_up(int64_t v, int64_t a) { return (v + a - 1) / a * a; }
bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }
bool is_float_src(ConvSrc t) { return t == ConvSrc::F32 || t == ConvSrc::F16 || t == ConvSrc::BF16; }

struct Plan {
  bool gemm = false;    // tensor-core implicit GEMM, else the direct kernel
  bool pack_x = false;  // the kernels read x from the byte buffer in the workspace
  int64_t cin_g = 0, cout_g = 0;
  int64_t cg = 0;       // channels per group in the byte rows the kernels read (16 | cg on the GEMM path)
  int64_t taps = 0;     // kh * kw
  int64_t kp = 0;       // GEMM K: taps * cg
  int64_t parts = 1;    // min/max blocks per image
  // workspace layout (bytes)
  int64_t off_part = 0, off_xq = 0, off_w = 0, off_wsum = 0, total = 0;
};

int device_major() {
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess)
    return 0;
  return major;
}

Plan make_plan(const Int8Conv2dArgs& a) {
  Plan p;
  p.cin_g = a.C / a.groups;
  p.cout_g = a.Cout / a.groups;
  p.taps = a.kh * a.kw;
  const bool depthwise = a.groups == a.C && a.groups == a.Cout;
  // the GEMM kernel keeps image coordinates, K and channel counts in int, and the group and
  // column tiles in gridDim.z / gridDim.y
  const int64_t lim = int64_t{1} << 28;
  const bool fits = a.H <= lim && a.W <= lim && a.Ho <= lim && a.Wo <= lim && a.pad_h <= lim &&
                    a.pad_w <= lim && a.stride_h <= lim && a.stride_w <= lim &&
                    a.dil_h * (a.kh - 1) <= lim && a.dil_w * (a.kw - 1) <= lim &&
                    p.cout_g <= int64_t{65535} * 64 && a.groups <= 65535;
  p.gemm = !depthwise && fits && p.cin_g >= 8 && p.cout_g >= 16 && device_major() >= 8;
  const bool fl = is_float_src(a.x_type);
  if (p.gemm) {
    p.cg = align_up(p.cin_g, 16);
    // x is read in place when every 16 channels of a group are 16 aligned, contiguous bytes
    const bool in_place = !fl && p.cg == p.cin_g && a.x_stride_c == 1 && a.x_stride_n % 16 == 0 &&
                          a.x_stride_h % 16 == 0 && a.x_stride_w % 16 == 0 && aligned16(a.x);
    p.pack_x = !in_place;
  } else {
    p.cg = p.cin_g;
    p.pack_x = fl;  // the direct kernel reads byte x with any strides
  }
  p.kp = p.taps * p.cg;
  const int64_t elems = a.C * a.H * a.W;
  p.parts = std::min<int64_t>(64, std::max<int64_t>(1, (elems + 8191) / 8192));
  int64_t off = 0;
  p.off_part = off;
  if (fl) off += align_up(a.N * p.parts * 12, kAlign);  // lo, hi (float), nonfinite (int32)
  p.off_xq = off;
  if (p.pack_x) off += align_up(a.N * a.H * a.W * a.groups * p.cg, kAlign);
  p.off_w = off;
  off += align_up(a.Cout * (p.gemm ? p.kp : p.taps * p.cin_g), kAlign);
  p.off_wsum = off;
  if (p.gemm) off += align_up(a.Cout * 4, kAlign);
  p.total = off;
  return p;
}

constexpr int kThreads1D = 256;
unsigned grid_1d(int64_t total) {
  const int64_t b = (total + kThreads1D - 1) / kThreads1D;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(b, 1 << 20)));
}

// ------------------------------------------------------------------ epilogue

struct Epi {
  const float* x_scale;  // [N]
  const float* w_scale;  // [Cout]
  const float* bias;     // [Cout] or nullptr
  void* out;             // [N, Ho, Wo, Cout]
  const void* res;       // [N, Ho, Wo, Cout] or nullptr (res_kind None)
  ConvRes res_kind;
  float res_scale;
  int32_t res_zp;
  ConvAct act;
  ConvOut kind;
  float out_inv;
  float out_zp;
};

__device__ __forceinline__ float activate(float y, ConvAct act) {
  switch (act) {
    case ConvAct::None: return y;
    // comparisons written as the CPU kernels write them: the same result for -0 and NaN too
    case ConvAct::Relu: return y < 0.f ? 0.f : y;
    case ConvAct::Relu6: {
      const float t = y < 0.f ? 0.f : y;
      return t > 6.f ? 6.f : t;
    }
    case ConvAct::Silu: return __fdiv_rn(y, __fadd_rn(1.f, expf(-y)));
    case ConvAct::Hardswish: {
      float t = __fadd_rn(y, 3.f);
      t = t < 0.f ? 0.f : t;
      t = t > 6.f ? 6.f : t;
      return __fdiv_rn(__fmul_rn(y, t), 6.f);
    }
  }
  return y;
}

// clamp(nearbyint(y * inv) + zp, lo, hi), NaN -> 0 (as on the CPU). rintf rounds half to even;
// the fp32 add of the zero point is exact while |rint| < 2^24, and beyond that the result clamps
// to the same bound as the exact sum would.
__device__ __forceinline__ int requantize(float y, float inv, float zp, float lo, float hi) {
  float r = __fadd_rn(rintf(__fmul_rn(y, inv)), zp);
  r = r < lo ? lo : r;
  r = r > hi ? hi : r;
  return r == r ? __float2int_rn(r) : 0;
}

// Writes output element `off` (= pixel * Cout + co) of image n from the exact accumulator.
__device__ __forceinline__ void store_result(const Epi& e, int64_t off, int64_t n, int64_t co,
                                             int32_t acc) {
  float y = __fmul_rn(__int2float_rn(acc), e.x_scale[n]);
  y = __fmul_rn(y, e.w_scale[co]);
  if (e.bias != nullptr) y = __fadd_rn(y, e.bias[co]);
  switch (e.res_kind) {
    case ConvRes::None: break;
    // the integer difference (|d| <= 255) converts exactly; one rounded multiply, one rounded add
    case ConvRes::U8: {
      const int d = static_cast<int>(static_cast<const uint8_t*>(e.res)[off]) - e.res_zp;
      y = __fadd_rn(y, __fmul_rn(__int2float_rn(d), e.res_scale));
      break;
    }
    case ConvRes::S8: {
      const int d = static_cast<int>(static_cast<const int8_t*>(e.res)[off]) - e.res_zp;
      y = __fadd_rn(y, __fmul_rn(__int2float_rn(d), e.res_scale));
      break;
    }
    case ConvRes::F32: y = __fadd_rn(y, static_cast<const float*>(e.res)[off]); break;
  }
  y = activate(y, e.act);
  switch (e.kind) {
    case ConvOut::F32: static_cast<float*>(e.out)[off] = y; break;
    case ConvOut::F16: static_cast<__half*>(e.out)[off] = __float2half_rn(y); break;
    case ConvOut::BF16: static_cast<__nv_bfloat16*>(e.out)[off] = __float2bfloat16_rn(y); break;
    case ConvOut::U8:
      static_cast<uint8_t*>(e.out)[off] =
          static_cast<uint8_t>(requantize(y, e.out_inv, e.out_zp, 0.f, 255.f));
      break;
    case ConvOut::S8:
      static_cast<int8_t*>(e.out)[off] =
          static_cast<int8_t>(requantize(y, e.out_inv, e.out_zp, -128.f, 127.f));
      break;
  }
}

// ------------------------------------------------------------------ float input

template <typename T>
__device__ __forceinline__ float load_f32(const T* p) { return to_f32(*p); }

// Element e of image n's [C, H, W] block, in the order its memory is densest: channels fastest
// when they are unit-stride (channels_last), else width fastest.
struct ImageIndex {
  int64_t C, H, W, sc, sh, sw;
  bool c_inner;
  __device__ __forceinline__ int64_t offset(int64_t e) const {
    int64_t c, y, x;
    if (c_inner) {
      c = e % C;
      const int64_t t = e / C;
      x = t % W;
      y = t / W;
    } else {
      x = e % W;
      const int64_t t = e / W;
      y = t % H;
      c = t / H;
    }
    return c * sc + y * sh + x * sw;
  }
};

// Block b = n * parts + p folds its slice of image n into part_lo/hi/bad[b].
template <typename T>
__global__ void __launch_bounds__(kThreads1D)
    minmax_kernel(const T* __restrict__ x, int64_t sn, ImageIndex ix, int64_t parts,
                  float* __restrict__ part_lo, float* __restrict__ part_hi,
                  int32_t* __restrict__ part_bad) {
  const int64_t b = blockIdx.x;
  const int64_t n = b / parts, p = b % parts;
  const int64_t elems = ix.C * ix.H * ix.W;
  const int64_t chunk = (elems + parts - 1) / parts;
  const int64_t e0 = p * chunk, e1 = e0 + chunk < elems ? e0 + chunk : elems;
  const T* xn = x + n * sn;
  float lo = __int_as_float(0x7f800000), hi = __int_as_float(0xff800000);  // +inf, -inf
  int bad = 0;
  for (int64_t e = e0 + threadIdx.x; e < e1; e += kThreads1D) {
    const float v = load_f32(xn + ix.offset(e));
    bad |= !(fabsf(v) <= FLT_MAX);  // NaN or infinity
    lo = fminf(lo, v);              // fminf/fmaxf skip NaN; `bad` reports it
    hi = fmaxf(hi, v);
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, off));
    hi = fmaxf(hi, __shfl_xor_sync(0xffffffffu, hi, off));
    bad |= __shfl_xor_sync(0xffffffffu, bad, off);
  }
  __shared__ float s_lo[kThreads1D / 32], s_hi[kThreads1D / 32];
  __shared__ int s_bad[kThreads1D / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    s_lo[warp] = lo;
    s_hi[warp] = hi;
    s_bad[warp] = bad;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kThreads1D / 32; ++w) {
      lo = fminf(lo, s_lo[w]);
      hi = fmaxf(hi, s_hi[w]);
      bad |= s_bad[w];
    }
    part_lo[b] = lo;
    part_hi[b] = hi;
    part_bad[b] = bad;
  }
}

// One thread per image: lo = min(0, min x), hi = max(0, max x) (min / max are exact, so the
// order of the reduction does not matter), then the contract's scale and zero point.
__global__ void __launch_bounds__(kThreads1D)
    qparams_kernel(const float* __restrict__ part_lo, const float* __restrict__ part_hi,
                   const int32_t* __restrict__ part_bad, int64_t N, int64_t parts,
                   float* __restrict__ scale, int32_t* __restrict__ zp,
                   int32_t* __restrict__ nonfinite) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kThreads1D + threadIdx.x;
  if (n >= N) return;
  float lo = 0.f, hi = 0.f;
  int bad = 0;
  for (int64_t p = 0; p < parts; ++p) {
    lo = fminf(lo, part_lo[n * parts + p]);
    hi = fmaxf(hi, part_hi[n * parts + p]);
    bad |= part_bad[n * parts + p];
  }
  nonfinite[n] = bad;
  const float s = hi == lo ? 1.f : __fdiv_rn(__fsub_rn(hi, lo), 255.f);
  float z = rintf(__fdiv_rn(-lo, s));
  z = fminf(fmaxf(z, 0.f), 255.f);
  scale[n] = s;
  zp[n] = __float2int_rn(z);
}

// q = clamp(nearbyint(x / s) + zp, 0, 255) (dynamic) or clamp(nearbyint(x * (1 / s)) + zp, 0, 255)
// (static; 1 / s rounded to fp32 first, as the contract says).
__device__ __forceinline__ uint8_t quantize_u8(float v, float s, int32_t zp, bool dynamic) {
  const float t = dynamic ? __fdiv_rn(v, s) : __fmul_rn(v, __fdiv_rn(1.f, s));
  return static_cast<uint8_t>(requantize(t, 1.f, static_cast<float>(zp), 0.f, 255.f));
}

// Writes the byte rows the kernels read: q[n, y, x, g, c] (c < cg; channels past the group's
// cin_g are 0), from x with any strides. Byte x is copied as it is (its zero point unchanged);
// float x is quantized to uint8 with the image's scale and zero point.
template <typename T>
__global__ void __launch_bounds__(kThreads1D)
    pack_x_kernel(const T* __restrict__ x, int64_t sn, int64_t sc, int64_t sh, int64_t sw,
                  int64_t H, int64_t W, int64_t groups, int64_t cin_g, int64_t cg,
                  const float* __restrict__ scale, const int32_t* __restrict__ zp, bool dynamic,
                  uint8_t* __restrict__ q, int64_t total) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads1D + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads1D) {
    const int64_t c = i % cg;
    int64_t t = i / cg;
    const int64_t g = t % groups;
    t /= groups;
    const int64_t xw = t % W;
    t /= W;
    const int64_t y = t % H;
    const int64_t n = t / H;
    uint8_t v = 0;
    if (c < cin_g) {
      const T src = x[n * sn + (g * cin_g + c) * sc + y * sh + xw * sw];
      if constexpr (std::is_same<T, uint8_t>::value) {
        v = src;
      } else {
        v = quantize_u8(to_f32(src), scale[n], zp[n], dynamic);
      }
    }
    q[i] = v;
  }
}

// ------------------------------------------------------------------ weights

// GEMM layout: wk[co][tap * cg + c] = w[co, c, ky, kx] (tap = ky * kw + kx), 0 for c >= cin_g.
__global__ void __launch_bounds__(kThreads1D)
    weight_gemm_kernel(const int8_t* __restrict__ w, int64_t cin_g, int64_t taps, int64_t cg,
                       int8_t* __restrict__ wk, int64_t total) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads1D + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads1D) {
    const int64_t c = i % cg;
    const int64_t t = i / cg;
    const int64_t tap = t % taps, co = t / taps;
    wk[i] = c < cin_g ? w[(co * cin_g + c) * taps + tap] : static_cast<int8_t>(0);
  }
}

// wsum[co] = sum of w[co, :, :, :] (exact: at most K * 128 in magnitude).
__global__ void __launch_bounds__(kThreads1D)
    weight_sum_kernel(const int8_t* __restrict__ w, int64_t Cout, int64_t k,
                      int32_t* __restrict__ wsum) {
  const int64_t co = static_cast<int64_t>(blockIdx.x) * kThreads1D + threadIdx.x;
  if (co >= Cout) return;
  const int8_t* p = w + co * k;
  int32_t s = 0;
  for (int64_t j = 0; j < k; ++j) s += p[j];
  wsum[co] = s;
}

// Direct layout: wd[(tap * cin_g + c) * Cout + co] = w[co, c, ky, kx] (neighbouring threads, which
// own neighbouring output channels, read neighbouring bytes).
__global__ void __launch_bounds__(kThreads1D)
    weight_direct_kernel(const int8_t* __restrict__ w, int64_t Cout, int64_t cin_g, int64_t taps,
                         int8_t* __restrict__ wd, int64_t total) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads1D + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads1D) {
    const int64_t co = i % Cout;
    const int64_t t = i / Cout;
    const int64_t c = t % cin_g, tap = t / cin_g;
    wd[i] = w[(co * cin_g + c) * taps + tap];
  }
}

// ------------------------------------------------------------------ direct kernel

struct DirectArgs {
  const uint8_t* x;  // bytes, element strides below
  int64_t sn, sc, sh, sw;
  const int32_t* zp;  // [N]
  const int8_t* w;    // direct layout
  int64_t N, H, W, Cout, cin_g, cout_g, kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
      Ho, Wo;
  Epi ep;
};

// acc = sum over the taps inside the image of (x - zp) * w; taps in the padding add 0, as the
// contract says. |acc| <= K * 255 * 128 < 2^31 for K <= kInt8ConvMaxK.
template <bool SX>
__global__ void __launch_bounds__(kThreads1D) conv_direct_kernel(const DirectArgs a) {
  const int64_t total = a.N * a.Ho * a.Wo * a.Cout;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads1D + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * kThreads1D) {
    const int64_t co = i % a.Cout;
    int64_t t = i / a.Cout;
    const int64_t ox = t % a.Wo;
    t /= a.Wo;
    const int64_t oy = t % a.Ho;
    const int64_t n = t / a.Ho;
    const int64_t g = co / a.cout_g;
    const int32_t zp = a.zp[n];
    const uint8_t* xg = a.x + n * a.sn + g * a.cin_g * a.sc;
    int32_t acc = 0;
    for (int64_t ky = 0; ky < a.kh; ++ky) {
      const int64_t iy = oy * a.stride_h - a.pad_h + ky * a.dil_h;
      if (iy < 0 || iy >= a.H) continue;
      for (int64_t kx = 0; kx < a.kw; ++kx) {
        const int64_t ix = ox * a.stride_w - a.pad_w + kx * a.dil_w;
        if (ix < 0 || ix >= a.W) continue;
        const uint8_t* px = xg + iy * a.sh + ix * a.sw;
        const int8_t* pw = a.w + (ky * a.kw + kx) * a.cin_g * a.Cout + co;
        for (int64_t c = 0; c < a.cin_g; ++c) {
          const uint8_t b = px[c * a.sc];
          const int32_t xv = SX ? static_cast<int32_t>(static_cast<int8_t>(b)) : static_cast<int32_t>(b);
          acc += (xv - zp) * static_cast<int32_t>(pw[c * a.Cout]);
        }
      }
    }
    store_result(a.ep, i, n, co, acc);
  }
}

// ------------------------------------------------------------------ tensor-core implicit GEMM

constexpr int kBM = 64, kBN = 64, kBK = 64, kStages = 4, kGemmThreads = 128;
constexpr int kRow = kBK + 16;  // padded shared-memory row (bytes)

struct GemmArgs {
  const uint8_t* x;      // byte rows: 16-byte aligned, unit channel stride
  int64_t sn, sh, sw;    // element strides, multiples of 16
  int H, W, Ho, Wo, kh, kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int cg;                // channels per group in a pixel row (16 | cg); group g starts at g * cg
  int kp;                // kh * kw * cg
  int cout_g;
  int64_t M;             // N * Ho * Wo
  int64_t Cout;
  const int8_t* w;       // [Cout][kp]
  const int32_t* wsum;   // [Cout]
  const int32_t* zp;     // [N]
  Epi ep;
};

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int bytes = valid ? 16 : 0;  // 0: the 16 destination bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// D += A * B for one 16 x 8 x 32 tile: A row-major bytes (u8 when !SX, else s8), B s8 "col".
// Fragments (PTX ISA, m16n8k32 with 8-bit types; group = lane / 4, tig = lane % 4):
//   a0: row group,     k tig*4 .. +3      a1: row group + 8, k tig*4 .. +3
//   a2: row group,     k 16 + tig*4 .. +3 a3: row group + 8, k 16 + tig*4 .. +3
//   b0: col group,     k tig*4 .. +3      b1: col group,     k 16 + tig*4 .. +3
//   c0, c1: row group, cols tig*2, +1     c2, c3: row group + 8, cols tig*2, +1
template <bool SX>
__device__ __forceinline__ void mma_x8s8(int32_t (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (SX) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
#else
  __trap();  // not reached: the launcher picks this kernel on sm_80+ only
#endif
}

// Block (blockIdx.x, blockIdx.y, blockIdx.z) computes output pixels [m0, m0 + 64) x output
// channels [n0, n0 + 64) of group blockIdx.z.
template <bool SX>
__global__ void __launch_bounds__(kGemmThreads) conv_gemm_kernel(const GemmArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // not reached: the launcher picks this kernel on sm_80+ only
#else
  __shared__ __align__(16) uint8_t sA[kStages][kBM][kRow];
  __shared__ __align__(16) uint8_t sB[kStages][kBN][kRow];

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int warp_m = warp / 2, warp_n = warp % 2;  // 2 x 2 warps of 32 x 32
  const int group = lane / 4, tig = lane % 4;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int n0 = blockIdx.y * kBN;
  const int g = blockIdx.z;
  const int64_t HoWo = static_cast<int64_t>(a.Ho) * a.Wo;

  // Loads: each thread fills two 16-byte chunks of the A tile and two of the B tile per stage,
  // rows tid / 4 and tid / 4 + 32, bytes lcol .. lcol + 15 of the 64-byte k slice.
  const int lrow = tid / 4, lcol = (tid % 4) * 16;
  int64_t a_base[2];
  int a_iy[2], a_ix[2];
  uint32_t a_fill[2];
  bool a_ok[2];
  const int8_t* b_row[2];
  bool b_ok[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = lrow + 32 * i;
    const int64_t m = m0 + r;
    a_ok[i] = m < a.M;
    a_base[i] = 0;
    a_iy[i] = 0;
    a_ix[i] = 0;
    a_fill[i] = 0;
    if (a_ok[i]) {
      const int64_t n = m / HoWo;
      const int64_t rem = m - n * HoWo;
      const int oy = static_cast<int>(rem / a.Wo), ox = static_cast<int>(rem % a.Wo);
      a_iy[i] = oy * a.stride_h - a.pad_h;
      a_ix[i] = ox * a.stride_w - a.pad_w;
      a_base[i] = n * a.sn + static_cast<int64_t>(g) * a.cg;
      // padding holds the zero point: its byte, four times
      a_fill[i] = (static_cast<uint32_t>(a.zp[n]) & 0xffu) * 0x01010101u;
    }
    const int co = n0 + r;
    b_ok[i] = co < a.cout_g;
    b_row[i] = a.w + (static_cast<int64_t>(g) * a.cout_g + (b_ok[i] ? co : 0)) * a.kp;
  }

  const int ktiles = (a.kp + kBK - 1) / kBK;

  auto load_stage = [&](int stage, int kt) {
    const int k = kt * kBK + lcol;  // 16 | k and 16 | cg: the chunk is 16 channels of one tap
    const bool k_ok = k < a.kp;
    const int tap = k_ok ? k / a.cg : 0;
    const int c = k - tap * a.cg;
    const int ky = tap / a.kw, kx = tap - ky * a.kw;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      uint8_t* dst = &sA[stage][lrow + 32 * i][lcol];
      if (!a_ok[i] || !k_ok) {
        // rows past M are never stored, and the K tail has weight 0: any bytes do
        *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
        continue;
      }
      const int iy = a_iy[i] + ky * a.dil_h, ix = a_ix[i] + kx * a.dil_w;
      if (iy >= 0 && iy < a.H && ix >= 0 && ix < a.W) {
        cp_async16(dst, a.x + a_base[i] + iy * a.sh + ix * a.sw + c, true);
      } else {
        const uint32_t f = a_fill[i];
        *reinterpret_cast<uint4*>(dst) = make_uint4(f, f, f, f);
      }
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const bool ok = b_ok[i] && k_ok;
      cp_async16(&sB[stage][lrow + 32 * i][lcol], ok ? b_row[i] + k : a.w, ok);
    }
  };

  int32_t acc[2][4][4];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[i][j][r] = 0;

  // Pipeline: stage kt % kStages holds k tile kt. Plain stores into a stage (zero-point fills)
  // and cp.async copies are both complete and visible after the wait + __syncthreads that
  // precede the tile's use; a stage is refilled only after the __syncthreads that follows the
  // last reads of its previous tile.
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < ktiles) load_stage(s, s);
    cp_async_commit();
  }

  for (int kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // tile kt landed; every warp is done with tile kt - 1
    const int next = kt + kStages - 1;
    if (next < ktiles) load_stage(next % kStages, next);
    cp_async_commit();

    const int stage = kt % kStages;
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 32) {
      uint32_t af[2][4], bf[4][2];
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const uint8_t* p = &sA[stage][warp_m * 32 + i * 16 + group][kk + tig * 4];
        af[i][0] = *reinterpret_cast<const uint32_t*>(p);
        af[i][1] = *reinterpret_cast<const uint32_t*>(p + 8 * kRow);
        af[i][2] = *reinterpret_cast<const uint32_t*>(p + 16);
        af[i][3] = *reinterpret_cast<const uint32_t*>(p + 8 * kRow + 16);
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint8_t* p = &sB[stage][warp_n * 32 + j * 8 + group][kk + tig * 4];
        bf[j][0] = *reinterpret_cast<const uint32_t*>(p);
        bf[j][1] = *reinterpret_cast<const uint32_t*>(p + 16);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) mma_x8s8<SX>(acc[i][j], af[i], bf[j][0], bf[j][1]);
    }
  }
  cp_async_wait<0>();

#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t m = m0 + warp_m * 32 + i * 16 + group + 8 * h;
      if (m >= a.M) continue;
      const int64_t n = m / HoWo;
      const uint32_t zp = static_cast<uint32_t>(a.zp[n]);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = n0 + warp_n * 32 + j * 8 + tig * 2 + e;
          if (col >= a.cout_g) continue;
          const int64_t co = static_cast<int64_t>(g) * a.cout_g + col;
          // raw - zp * wsum modulo 2^32: the exact acc, which fits in int32
          const uint32_t raw = static_cast<uint32_t>(acc[i][j][2 * h + e]);
          const int32_t v =
              static_cast<int32_t>(raw - zp * static_cast<uint32_t>(a.wsum[co]));
          store_result(a.ep, m * a.Cout + co, n, co, v);
        }
      }
    }
  }
#endif
}

// ------------------------------------------------------------------ launchers

template <typename T>
cudaError_t launch_minmax(const Int8Conv2dArgs& a, const Plan& p, float* lo, float* hi,
                          int32_t* bad, cudaStream_t stream) {
  ImageIndex ix{a.C, a.H, a.W, a.x_stride_c, a.x_stride_h, a.x_stride_w, a.x_stride_c == 1};
  minmax_kernel<T><<<static_cast<unsigned>(a.N * p.parts), kThreads1D, 0, stream>>>(
      static_cast<const T*>(a.x), a.x_stride_n, ix, p.parts, lo, hi, bad);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_pack(const Int8Conv2dArgs& a, const Plan& p, uint8_t* q, cudaStream_t stream) {
  const int64_t total = a.N * a.H * a.W * a.groups * p.cg;
  if (total == 0) return cudaSuccess;
  pack_x_kernel<T><<<grid_1d(total), kThreads1D, 0, stream>>>(
      static_cast<const T*>(a.x), a.x_stride_n, a.x_stride_c, a.x_stride_h, a.x_stride_w, a.H,
      a.W, a.groups, p.cin_g, p.cg, a.x_scale, a.x_zp, a.x_dynamic, q, total);
  return cudaGetLastError();
}

bool valid_args(const Int8Conv2dArgs& a) {
  if (a.N < 0 || a.C < 1 || a.H < 0 || a.W < 0 || a.Cout < 1 || a.kh < 1 || a.kw < 1) return false;
  if (a.groups < 1 || a.C % a.groups != 0 || a.Cout % a.groups != 0) return false;
  if (a.stride_h < 1 || a.stride_w < 1 || a.pad_h < 0 || a.pad_w < 0 || a.dil_h < 1 || a.dil_w < 1)
    return false;
  if (a.Ho < 1 || a.Wo < 1) return false;
  if (a.res_kind != ConvRes::None && a.res == nullptr) return false;
  return a.kh * a.kw * (a.C / a.groups) <= kInt8ConvMaxK;
}

}  // namespace

size_t int8_conv2d_workspace_bytes(const Int8Conv2dArgs& a) {
  return static_cast<size_t>(make_plan(a).total);
}

cudaError_t int8_conv2d_dynamic_params(const Int8Conv2dArgs& a, float* scale, int32_t* zp,
                                       int32_t* nonfinite, void* workspace, cudaStream_t stream) {
  if (!is_float_src(a.x_type) || a.N < 0 || a.C < 1 || a.H < 0 || a.W < 0) return cudaErrorInvalidValue;
  if (a.N == 0) return cudaSuccess;
  const Plan p = make_plan(a);
  if (a.N * p.parts > 0x7fffffffLL) return cudaErrorInvalidValue;  // gridDim.x
  char* ws = static_cast<char*>(workspace);
  float* lo = reinterpret_cast<float*>(ws + p.off_part);
  float* hi = lo + a.N * p.parts;
  int32_t* bad = reinterpret_cast<int32_t*>(hi + a.N * p.parts);
  cudaError_t err = cudaErrorInvalidValue;
  switch (a.x_type) {
    case ConvSrc::F32: err = launch_minmax<float>(a, p, lo, hi, bad, stream); break;
    case ConvSrc::F16: err = launch_minmax<__half>(a, p, lo, hi, bad, stream); break;
    case ConvSrc::BF16: err = launch_minmax<__nv_bfloat16>(a, p, lo, hi, bad, stream); break;
    default: break;
  }
  if (err != cudaSuccess) return err;
  qparams_kernel<<<ceil_div_u(a.N, kThreads1D), kThreads1D, 0, stream>>>(lo, hi, bad, a.N,
                                                                          p.parts, scale, zp,
                                                                          nonfinite);
  return cudaGetLastError();
}

cudaError_t int8_conv2d(const Int8Conv2dArgs& a, void* workspace, cudaStream_t stream) {
  if (!valid_args(a)) return cudaErrorInvalidValue;
  if (a.N == 0) return cudaSuccess;
  const Plan p = make_plan(a);
  char* ws = static_cast<char*>(workspace);
  int8_t* wk = reinterpret_cast<int8_t*>(ws + p.off_w);
  cudaError_t err;

  // weights in the chosen kernel's layout
  if (p.gemm) {
    const int64_t total = a.Cout * p.kp;
    weight_gemm_kernel<<<grid_1d(total), kThreads1D, 0, stream>>>(a.w, p.cin_g, p.taps, p.cg, wk,
                                                                  total);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    weight_sum_kernel<<<ceil_div_u(a.Cout, kThreads1D), kThreads1D, 0, stream>>>(
        a.w, a.Cout, p.taps * p.cin_g, reinterpret_cast<int32_t*>(ws + p.off_wsum));
  } else {
    const int64_t total = a.Cout * p.taps * p.cin_g;
    weight_direct_kernel<<<grid_1d(total), kThreads1D, 0, stream>>>(a.w, a.Cout, p.cin_g, p.taps,
                                                                    wk, total);
  }
  if ((err = cudaGetLastError()) != cudaSuccess) return err;

  // the byte rows the kernels read, and their strides
  const uint8_t* xb = static_cast<const uint8_t*>(a.x);
  int64_t sn = a.x_stride_n, sc = a.x_stride_c, sh = a.x_stride_h, sw = a.x_stride_w;
  if (p.pack_x) {
    uint8_t* q = reinterpret_cast<uint8_t*>(ws + p.off_xq);
    switch (a.x_type) {
      case ConvSrc::U8:
      case ConvSrc::S8: err = launch_pack<uint8_t>(a, p, q, stream); break;
      case ConvSrc::F32: err = launch_pack<float>(a, p, q, stream); break;
      case ConvSrc::F16: err = launch_pack<__half>(a, p, q, stream); break;
      case ConvSrc::BF16: err = launch_pack<__nv_bfloat16>(a, p, q, stream); break;
      default: return cudaErrorInvalidValue;
    }
    if (err != cudaSuccess) return err;
    xb = q;
    sc = 1;
    sw = a.groups * p.cg;
    sh = a.W * sw;
    sn = a.H * sh;
  }
  // int8 bytes stay int8 (their zero point in -128..127); uint8 and quantized float are uint8
  const bool sx = a.x_type == ConvSrc::S8;

  Epi ep;
  ep.x_scale = a.x_scale;
  ep.w_scale = a.w_scale;
  ep.bias = a.bias;
  ep.out = a.out;
  ep.res = a.res;
  ep.res_kind = a.res_kind;
  ep.res_scale = a.res_scale;
  ep.res_zp = a.res_zp;
  ep.act = a.act;
  ep.kind = a.out_kind;
  ep.out_inv = a.out_inv;
  ep.out_zp = static_cast<float>(a.out_zp);

  if (p.gemm) {
    GemmArgs g;
    g.x = xb;
    g.sn = sn;
    g.sh = sh;
    g.sw = sw;
    g.H = static_cast<int>(a.H);
    g.W = static_cast<int>(a.W);
    g.Ho = static_cast<int>(a.Ho);
    g.Wo = static_cast<int>(a.Wo);
    g.kh = static_cast<int>(a.kh);
    g.kw = static_cast<int>(a.kw);
    g.stride_h = static_cast<int>(a.stride_h);
    g.stride_w = static_cast<int>(a.stride_w);
    g.pad_h = static_cast<int>(a.pad_h);
    g.pad_w = static_cast<int>(a.pad_w);
    g.dil_h = static_cast<int>(a.dil_h);
    g.dil_w = static_cast<int>(a.dil_w);
    g.cg = static_cast<int>(p.cg);
    g.kp = static_cast<int>(p.kp);
    g.cout_g = static_cast<int>(p.cout_g);
    g.M = a.N * a.Ho * a.Wo;
    g.Cout = a.Cout;
    g.w = wk;
    g.wsum = reinterpret_cast<const int32_t*>(ws + p.off_wsum);
    g.zp = a.x_zp;
    g.ep = ep;
    const int64_t mtiles = (g.M + kBM - 1) / kBM;
    if (mtiles > 0x7fffffffLL) return cudaErrorInvalidValue;
    const dim3 grid(static_cast<unsigned>(mtiles), ceil_div_u(p.cout_g, kBN),
                    static_cast<unsigned>(a.groups));
    if (sx)
      conv_gemm_kernel<true><<<grid, kGemmThreads, 0, stream>>>(g);
    else
      conv_gemm_kernel<false><<<grid, kGemmThreads, 0, stream>>>(g);
  } else {
    DirectArgs d;
    d.x = xb;
    d.sn = sn;
    d.sc = sc;
    d.sh = sh;
    d.sw = sw;
    d.zp = a.x_zp;
    d.w = wk;
    d.N = a.N;
    d.H = a.H;
    d.W = a.W;
    d.Cout = a.Cout;
    d.cin_g = p.cin_g;
    d.cout_g = p.cout_g;
    d.kh = a.kh;
    d.kw = a.kw;
    d.stride_h = a.stride_h;
    d.stride_w = a.stride_w;
    d.pad_h = a.pad_h;
    d.pad_w = a.pad_w;
    d.dil_h = a.dil_h;
    d.dil_w = a.dil_w;
    d.Ho = a.Ho;
    d.Wo = a.Wo;
    d.ep = ep;
    const unsigned grid = grid_1d(a.N * a.Ho * a.Wo * a.Cout);
    if (sx)
      conv_direct_kernel<true><<<grid, kThreads1D, 0, stream>>>(d);
    else
      conv_direct_kernel<false><<<grid, kThreads1D, 0, stream>>>(d);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace pyc
