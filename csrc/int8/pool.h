// Max pooling of quantized (uint8 / int8) NHWC images — torch-free kernel API.
//
// y[n, oy, ox, c] = max over the taps (ky, kx) of the window that fall inside the image of
// x[n, oy * sh - ph + ky * dh, ox * sw - pw + kx * dw, c]
// (taps outside the image are skipped, as if the padding held -infinity; a window with no tap
// inside, which torch's argument rules exclude, gives the type's smallest value). A maximum
// commutes with every monotonic quantization, so the result is exactly the quantized maximum of
// the dequantized values, with the input's own scale and zero point.
#pragma once

#include <cstdint>

namespace pyc {

struct Int8PoolGeom {
  int64_t N = 0, H = 0, W = 0, C = 0;
  int64_t kh = 1, kw = 1, sh = 1, sw = 1, ph = 0, pw = 0, dh = 1, dw = 1;
  int64_t Ho = 0, Wo = 0;
};

// torch's output size of max pooling: floor (or ceil) of (in + 2 pad - dil (k - 1) - 1) / stride
// plus one; with ceil_mode the last window must start inside the image or its left padding.
// A value <= 0 when the window does not fit.
inline int64_t int8_pool_out_size(int64_t in, int64_t k, int64_t stride, int64_t pad, int64_t dil,
                                  bool ceil_mode) {
  const int64_t span = in + 2 * pad - dil * (k - 1) - 1;
  if (span < 0) return 0;
  int64_t out = (span + (ceil_mode ? stride - 1 : 0)) / stride + 1;
  if (ceil_mode && (out - 1) * stride >= in + pad) --out;
  return out;
}

// Output rows [row0, row1) of the N * Ho output rows (row r = image r / Ho, oy = r % Ho).
// x: [N, H, W, C] contiguous, y: [N, Ho, Wo, C] contiguous. is_signed: int8 values, else uint8.
// CPU, single thread; isa as CpuIsa (0 scalar, 1 AVX2, >= 2 AVX-512 BW).
void int8_max_pool2d_cpu(int isa, const Int8PoolGeom& g, const uint8_t* x, bool is_signed,
                         uint8_t* y, int64_t row0, int64_t row1);

}  // namespace pyc
