// Unit test of the 2:4 CPU kernels: compression (layout, error reporting), decompression, and the
// expansion / transposed linear kernels against a double-precision reference, for every ISA
// level this CPU supports.
// sources: csrc/sparse/cpu/semi24.cpp csrc/common/cpu_features.cpp csrc/common/dtypes.cpp
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "common/cpu_features.h"
#include "sparse/semi24.h"

using namespace pyc;

static int failures = 0;

#define EXPECT(cond, ...)                                     \
  do {                                                        \
    if (!(cond)) {                                            \
      if (failures < 10) {                                    \
        std::printf("FAIL line %d: %s: ", __LINE__, #cond);   \
        std::printf(__VA_ARGS__);                             \
        std::printf("\n");                                    \
      }                                                       \
      ++failures;                                             \
    }                                                         \
  } while (0)

// Random 2:4 weight (0, 1 or 2 nonzeros per group).
static std::vector<float> weight24(int64_t N, int64_t K, std::mt19937& rng) {
  std::vector<float> w(N * K, 0.f);
  std::normal_distribution<float> nd;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t j = 0; j < (K + 3) / 4; ++j) {
      const int keep = static_cast<int>(rng() % 3);
      int pos[4] = {0, 1, 2, 3};
      for (int i = 3; i > 0; --i) std::swap(pos[i], pos[rng() % (i + 1)]);
      for (int s = 0; s < keep; ++s)
        if (4 * j + pos[s] < K) w[n * K + 4 * j + pos[s]] = nd(rng);
    }
  return w;
}

static void check_shape(int64_t M, int64_t K, int64_t N, std::mt19937& rng) {
  const int64_t Kp = semi24_padded_k(K), KT = Kp / kSemi24KTile;
  std::vector<float> w = weight24(N, K, rng);
  std::vector<float> values(N * Kp / 2);
  std::vector<int16_t> meta(semi24_n_tiles(N) * KT * 32, 0);
  EXPECT(semi24_compress_cpu(w.data(), DType::F32, K, nullptr, N, K, values.data(), DType::F32,
                             meta.data(), 0, N) == -1, "compress failed");
  std::vector<float> back(N * K);
  semi24_decompress_cpu(values.data(), DType::F32, meta.data(), N, K, back.data(), DType::F32, 0, N);
  for (int64_t i = 0; i < N * K; ++i) EXPECT(back[i] == w[i], "decompress mismatch at %lld", (long long)i);
  for (const int16_t word : meta)
    for (int q = 0; q < 4; ++q) {
      const int nib = (static_cast<uint16_t>(word) >> (4 * q)) & 15;
      EXPECT((nib & 3) < (nib >> 2), "metadata nibble %d not ordered", nib);
    }
  std::normal_distribution<float> nd;
  std::vector<float> x(M * Kp, 0.f), bias(N);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) x[m * Kp + k] = nd(rng);
  for (auto& b : bias) b = nd(rng);
  std::vector<double> ref(M * N);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double s = bias[n];
      for (int64_t k = 0; k < K; ++k) s += double(x[m * Kp + k]) * w[n * K + k];
      ref[m * N + n] = s;
    }
  for (int isa = 0; isa <= static_cast<int>(max_cpu_isa()); ++isa) {
    std::vector<float> y(M * N, -1.f);
    semi24_linear_cpu(static_cast<CpuIsa>(isa), x.data(), Kp, M, values.data(), DType::F32,
                      meta.data(), bias.data(), y.data(), N, N, K, 0, N);
    for (int64_t i = 0; i < M * N; ++i)
      EXPECT(std::fabs(y[i] - ref[i]) <= 1e-4 * (1 + std::fabs(ref[i])), "linear isa=%d M=%lld K=%lld N=%lld",
             isa, (long long)M, (long long)K, (long long)N);
    if (!semi24_linear_t_supported(static_cast<CpuIsa>(isa))) continue;
    const int64_t Mp = (M + 7) / 8 * 8;
    std::vector<float> xT(Kp * Mp + 8, 0.f), yT(N * Mp + 8);
    float* xa = xT.data() + ((8 - (reinterpret_cast<uintptr_t>(xT.data()) / 4) % 8) % 8);  // 32-byte aligned
    float* ya = yT.data() + ((8 - (reinterpret_cast<uintptr_t>(yT.data()) / 4) % 8) % 8);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) xa[k * Mp + m] = x[m * Kp + k];
    semi24_linear_t_cpu(static_cast<CpuIsa>(isa), xa, Mp, values.data(), DType::F32, meta.data(),
                        bias.data(), ya, K, 0, N);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n)
        EXPECT(std::fabs(ya[n * Mp + m] - ref[m * N + n]) <= 1e-4 * (1 + std::fabs(ref[m * N + n])),
               "transposed isa=%d M=%lld K=%lld N=%lld", isa, (long long)M, (long long)K, (long long)N);
  }
}

int main() {
  std::mt19937 rng(1);
  const int64_t shapes[][3] = {{1, 1, 1},   {1, 5, 3},    {2, 31, 17},  {3, 64, 16},
                               {4, 100, 33}, {9, 37, 70}, {40, 300, 90}, {70, 130, 20}};
  for (const auto& s : shapes) check_shape(s[0], s[1], s[2], rng);
  // a group with 3 kept weights is reported with its flat index (row 1, columns 4..7)
  std::vector<float> w(2 * 9, 0.f);
  w[9 + 4] = w[9 + 5] = w[9 + 7] = 1.f;
  std::vector<float> values(2 * 16);
  std::vector<int16_t> meta(32);
  EXPECT(semi24_compress_cpu(w.data(), DType::F32, 9, nullptr, 2, 9, values.data(), DType::F32,
                             meta.data(), 0, 2) == 9 + 4, "bad group not reported");
  if (failures) {
    std::printf("test_semi24: %d failure(s)\n", failures);
    return 1;
  }
  std::printf("test_semi24: all passed\n");
  return 0;
}
