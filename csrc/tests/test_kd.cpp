// C++ test of the torch-free KD softmax-KL CPU kernels: every ISA available here against a
// double-precision reference, including chunk merges, masked (-inf) teacher entries and tails.
// sources: csrc/kd/cpu/kd_kl.cpp csrc/common/cpu_features.cpp csrc/common/dtypes.cpp
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "common/cpu_features.h"
#include "kd/kd.h"

namespace {

int failures = 0;

void expect_close(double got, double want, double rtol, double atol, const char* what, int isa,
                  long n, bool rev) {
  if (!(std::fabs(got - want) <= atol + rtol * std::fabs(want))) {
    std::printf("FAIL %s isa=%d n=%ld reverse=%d: got %.9g want %.9g\n", what, isa, n, rev, got,
                want);
    ++failures;
  }
}

void check(int isa, long n, bool rev, double temperature, std::mt19937& rng, bool masked) {
  std::normal_distribution<float> nd(0.f, 3.f);
  std::vector<float> s(n), t(n), g(n);
  for (long j = 0; j < n; ++j) {
    s[j] = nd(rng);
    t[j] = (masked && !rev && j % 7 == 3 && j != 0) ? -INFINITY : nd(rng);
  }
  const double inv = 1.0 / temperature;
  std::vector<double> sd(s.begin(), s.end()), td(t.begin(), t.end()), gd(n);
  double ref[pyc::KD_STATS];
  pyc::kd_row_stats_f64(sd.data(), td.data(), n, inv, rev, ref);
  pyc::kd_row_grad_f64(sd.data(), td.data(), gd.data(), n, inv, temperature, rev, ref, 0.5);

  const pyc::KdPartial p = pyc::kd_partial_cpu_isa(isa, s.data(), t.data(), pyc::DType::F32, n,
                                                   static_cast<float>(inv), rev);
  float st[pyc::KD_STATS];
  pyc::kd_finalize(p, rev, st);
  expect_close(st[0] + st[1], ref[0] + ref[1], 1e-5, 1e-5, "lse_s", isa, n, rev);
  expect_close(st[2] + st[3], ref[2] + ref[3], 1e-5, 1e-5, "lse_t", isa, n, rev);
  expect_close(st[4], ref[4], 1e-4, 1e-6, "kl", isa, n, rev);
  pyc::kd_grad_cpu_isa(isa, s.data(), t.data(), g.data(), pyc::DType::F32, n,
                       static_cast<float>(inv), static_cast<float>(temperature), rev, st, 0.5f);
  // Size of the terms each gradient entry is computed from: forward c(p_s - p_t), reverse
  // c p_s ((log p_s - log p_t) - KL), whose fp32 rounding sets the attainable absolute error.
  double gmax = 0;
  for (long j = 0; j < n; ++j) {
    const double lps = (sd[j] * inv - ref[0]) - ref[1], lpt = (td[j] * inv - ref[2]) - ref[3];
    const double term = rev ? std::exp(lps) * (std::fabs(lps - lpt) + std::fabs(ref[4]))
                            : std::exp(lps) + (std::isinf(lpt) ? 0.0 : std::exp(lpt));
    gmax = std::fmax(gmax, 0.5 * temperature * term);
  }
  for (long j = 0; j < n; ++j) {
    if (!std::isfinite(g[j])) {
      std::printf("FAIL grad not finite isa=%d n=%ld j=%ld\n", isa, n, j);
      ++failures;
      return;
    }
    expect_close(g[j], gd[j], 1e-3, 1e-5 * gmax + 1e-9, "grad", isa, n, rev);
  }

  // merging two halves equals the whole row
  if (n >= 2) {
    const long h = n / 3;
    const pyc::KdPartial a = pyc::kd_partial_cpu_isa(isa, s.data(), t.data(), pyc::DType::F32, h,
                                                     static_cast<float>(inv), rev);
    const pyc::KdPartial b = pyc::kd_partial_cpu_isa(isa, s.data() + h, t.data() + h,
                                                     pyc::DType::F32, n - h,
                                                     static_cast<float>(inv), rev);
    float sm[pyc::KD_STATS];
    pyc::kd_finalize(h == 0 ? b : pyc::kd_merge(a, b, rev), rev, sm);
    expect_close(sm[4], ref[4], 1e-4, 1e-6, "kl(merged)", isa, n, rev);
  }
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  const int max_isa = pyc::max_cpu_isa() == pyc::CpuIsa::Scalar ? 0
                      : pyc::max_cpu_isa() == pyc::CpuIsa::Avx2 ? 1
                                                                : 2;
  const long sizes[] = {1, 2, 7, 8, 9, 31, 2047, 2048, 2049, 5000, 70001};
  for (int isa = 0; isa <= max_isa; ++isa)
    for (long n : sizes)
      for (bool rev : {false, true})
        for (double temp : {0.5, 1.0, 4.0}) check(isa, n, rev, temp, rng, n > 8);
  std::printf("%s (%d failures, ISA levels 0..%d)\n", failures ? "FAILED" : "OK", failures,
              max_isa);
  return failures ? 1 : 0;
}
