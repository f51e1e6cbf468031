// Per-token quantization kernels: every ISA this CPU has must match the scalar path bit for
// bit, and the scalar path must match the definition on hand-checked rows.
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "common/cpu_features.h"
#include "common/dtypes.h"
#include "int8/quantize.h"
#include "test_harness.h"

using pyc::DType;

static void check_isas(const std::vector<float>& x, int64_t M, int64_t K) {
  std::vector<int8_t> q0(M * K), q1(M * K);
  std::vector<float> s0(M), s1(M);
  pyc::quantize_per_token_cpu_isa(0, x.data(), DType::F32, K, q0.data(), K, s0.data(), 0, M, K);
  const int max_isa = static_cast<int>(pyc::max_cpu_isa());
  for (int isa = 1; isa <= max_isa && isa <= 2; ++isa) {
    pyc::quantize_per_token_cpu_isa(isa, x.data(), DType::F32, K, q1.data(), K, s1.data(), 0, M,
                                    K);
    PYC_EXPECT(std::memcmp(q0.data(), q1.data(), q0.size()) == 0, "isa %d q differs (M=%lld K=%lld)",
               isa, (long long)M, (long long)K);
    for (int64_t m = 0; m < M; ++m) {
      const bool same = (std::isnan(s0[m]) && std::isnan(s1[m])) || s0[m] == s1[m];
      PYC_EXPECT(same, "isa %d scale differs at row %lld", isa, (long long)m);
    }
  }
}

int main() {
  std::printf("cpu isa: max %s\n", pyc::cpu_isa_name(pyc::max_cpu_isa()));
  // hand-checked row: absmax 127 -> multiplier 1, halves round to even
  {
    const float row[] = {127.f, 0.5f, 1.5f, 2.5f, -0.5f, -1.5f, -2.5f, 3.49f, 126.5f};
    const int8_t want[] = {127, 0, 2, 2, 0, -2, -2, 3, 126};
    int8_t q[9];
    float s;
    pyc::quantize_per_token_cpu_isa(0, row, DType::F32, 9, q, 9, &s, 0, 1, 9);
    PYC_EXPECT(s == 1.f, "scale %g", s);
    for (int i = 0; i < 9; ++i) PYC_EXPECT(q[i] == want[i], "q[%d]=%d want %d", i, q[i], want[i]);
  }
  // zero row and non-finite rows
  {
    const float nan = std::numeric_limits<float>::quiet_NaN();
    const float inf = std::numeric_limits<float>::infinity();
    std::vector<float> x = {0, 0, 0, 1, nan, 2, -inf, 1, 1};
    std::vector<int8_t> q(9, 5);
    std::vector<float> s(3);
    pyc::quantize_per_token_cpu_isa(0, x.data(), DType::F32, 3, q.data(), 3, s.data(), 0, 3, 3);
    PYC_EXPECT(s[0] == 1.f && q[0] == 0 && q[1] == 0 && q[2] == 0, "zero row");
    PYC_EXPECT(std::isnan(s[1]) && q[3] == 0 && q[4] == 0 && q[5] == 0, "nan row");
    PYC_EXPECT(std::isnan(s[2]) && q[6] == 0 && q[8] == 0, "inf row");
    check_isas(x, 3, 3);
  }
  // random shapes, all ISAs agree
  std::mt19937 rng(0);
  std::normal_distribution<float> nd(0.f, 3.f);
  const int64_t shapes[][2] = {{1, 1}, {3, 7}, {5, 16}, {7, 17}, {33, 129}, {4, 4096}};
  for (const auto& sh : shapes) {
    std::vector<float> x(sh[0] * sh[1]);
    for (auto& v : x) v = nd(rng);
    check_isas(x, sh[0], sh[1]);
  }
  // fp16 / bf16 conversions round-trip exactly for representable values
  for (float v : {0.f, 1.f, -2.5f, 65504.f, 6.1035156e-05f, 5.9604645e-08f}) {
    PYC_EXPECT(pyc::half_bits_to_float(pyc::float_to_half_bits(v)) == v, "half %g", v);
    PYC_EXPECT(pyc::bf16_bits_to_float(pyc::float_to_bf16_bits(v)) == v || v == 65504.f ||
                   v == 6.1035156e-05f || v == 5.9604645e-08f,
               "bf16 %g", v);
  }
  return pyc_test::finish("test_quantize");
}
