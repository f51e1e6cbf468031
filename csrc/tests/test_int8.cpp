// C++ unit test of the int8 CPU GEMM kernels (every code path this CPU has): packed GEMM
// against a naive int64 reference, with and without K blocking, int32 and float epilogues.
// sources: csrc/int8/cpu/gemm.cpp csrc/int8/cpu/gemm_amx.cpp csrc/int8/cpu/quantize.cpp csrc/common/cpu_features.cpp csrc/common/dtypes.cpp
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "common/cpu_features.h"
#include "int8/gemm.h"

namespace {

int failures = 0;

// extremes: every A = a_lo (a_high: a_hi) and every B = -128 (-127 without b_min).
// b_narrow: B in [-64, 64] (extremes: +64 for even rows, -64 for odd ones), which path 3 runs
// through its int16 pair-sum kernel.
void check_gemm(int path, int64_t M, int64_t K, int64_t N, std::mt19937& rng, bool extremes,
                bool b_min = true, bool a_high = false, bool b_narrow = false) {
  // path 3 (AVX2 vpmaddubsw) takes 7-bit activations only: A in [-64, 63]
  const int a_lo = path == 3 ? -64 : -128, a_hi = path == 3 ? 63 : 127;
  std::uniform_int_distribution<int> dist(a_lo, a_hi),
      dist_b(b_narrow ? -64 : (b_min ? -128 : -127), b_narrow ? 64 : 127);
  std::vector<int8_t> a(M * K), b(N * K);
  for (auto& v : a) v = extremes ? int8_t(a_high ? a_hi : a_lo) : static_cast<int8_t>(dist(rng));
  for (int64_t i = 0; i < N * K; ++i) {
    const int8_t extreme = b_narrow ? int8_t((i / K) % 2 ? -64 : 64) : int8_t(b_min ? -128 : -127);
    b[i] = extremes ? extreme : static_cast<int8_t>(dist_b(rng));
  }
  std::vector<int8_t> packed(pyc::int8_packed_bytes(N, K));
  pyc::int8_pack_b(b.data(), K, N, K, packed.data(), 0, pyc::int8_round_n(N) / 16);
  const int64_t rb = pyc::int8_a_row_bytes(path, K);
  std::vector<uint8_t> ap(M * rb + 64);
  pyc::int8_prepare_a(path, a.data(), K, K, ap.data(), 0, M);
  std::vector<int32_t> c(M * N, 0x5a5a5a5a);
  std::vector<int32_t> ws(M * pyc::int8_round_n(N));
  pyc::Int8Epilogue ep;
  ep.c = c.data();
  ep.ldc = N;
  const int64_t panels = pyc::int8_round_n(N) / 16;
  // two "threads" on disjoint panel ranges sharing the workspace
  pyc::int8_gemm_packed(path, ap.data(), packed.data(), M, N, K, 0, panels / 2, ep, ws.data());
  pyc::int8_gemm_packed(path, ap.data(), packed.data(), M, N, K, panels / 2, panels, ep, ws.data());
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      int64_t ref = 0;
      for (int64_t k = 0; k < K; ++k) ref += int64_t(a[m * K + k]) * b[n * K + k];
      if (c[m * N + n] != static_cast<int32_t>(ref)) {
        std::printf("FAIL path=%d M=%lld K=%lld N=%lld at (%lld,%lld): %d != %lld\n", path,
                    (long long)M, (long long)K, (long long)N, (long long)m, (long long)n,
                    c[m * N + n], (long long)ref);
        ++failures;
        return;
      }
    }
}

// Runs panels [0, panels) of the packed GEMM split into `pieces` ranges, each on its own thread
// (each thread configures its own AMX tiles) when threaded.
void gemm_pieces(int path, const void* ap, const int8_t* packed, int64_t M, int64_t N, int64_t K,
                 const pyc::Int8Epilogue& ep, int32_t* ws, int pieces, bool threaded) {
  const int64_t panels = pyc::int8_round_n(N) / 16;
  std::vector<std::thread> threads;
  for (int i = 0; i < pieces; ++i) {
    const int64_t p0 = panels * i / pieces, p1 = panels * (i + 1) / pieces;
    auto run = [=] { pyc::int8_gemm_packed(path, ap, packed, M, N, K, p0, p1, ep, ws); };
    if (threaded)
      threads.emplace_back(run);
    else
      run();
  }
  for (auto& t : threads) t.join();
}

// The AMX path (5): int32 results equal to the int64 reference, and float outputs (fp32, fp16,
// bf16, with and without bias) bit-identical to the AVX-512 VNNI path (2), for panel ranges of
// every parity run on concurrent threads. a7: activations in [-64, 63] (act_bits=7); b7: weights
// in [-63, 63] (weight_bits=7); extremes: A = -128 and B = -128 everywhere.
void check_amx(int64_t M, int64_t K, int64_t N, std::mt19937& rng, bool extremes = false,
               bool a7 = false, bool b7 = false, int pieces = 3) {
  std::uniform_int_distribution<int> dist_a(a7 ? -64 : -128, a7 ? 63 : 127),
      dist_b(b7 ? -63 : -128, b7 ? 63 : 127);
  std::uniform_real_distribution<float> dist_f(-2.f, 2.f);
  std::vector<int8_t> a(M * K), b(N * K);
  for (auto& v : a) v = extremes ? int8_t(-128) : static_cast<int8_t>(dist_a(rng));
  for (auto& v : b) v = extremes ? int8_t(-128) : static_cast<int8_t>(dist_b(rng));
  std::vector<int8_t> packed(pyc::int8_packed_bytes(N, K));
  pyc::int8_pack_b(b.data(), K, N, K, packed.data(), 0, pyc::int8_round_n(N) / 16);
  std::vector<uint8_t> ap5(M * pyc::int8_a_row_bytes(5, K)), ap2(M * pyc::int8_a_row_bytes(2, K));
  pyc::int8_prepare_a(5, a.data(), K, K, ap5.data(), 0, M);
  pyc::int8_prepare_a(2, a.data(), K, K, ap2.data(), 0, M);
  std::vector<int32_t> ws2(M * pyc::int8_round_n(N));
  std::vector<int32_t> c(M * N, 0x5a5a5a5a);
  pyc::Int8Epilogue ep;
  ep.c = c.data();
  ep.ldc = N;
  gemm_pieces(5, ap5.data(), packed.data(), M, N, K, ep, nullptr, pieces, true);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      int64_t ref = 0;
      for (int64_t k = 0; k < K; ++k) ref += int64_t(a[m * K + k]) * b[n * K + k];
      if (c[m * N + n] != static_cast<int32_t>(ref)) {
        std::printf("FAIL amx M=%lld K=%lld N=%lld pieces=%d at (%lld,%lld): %d != %lld\n",
                    (long long)M, (long long)K, (long long)N, pieces, (long long)m, (long long)n,
                    c[m * N + n], (long long)ref);
        ++failures;
        return;
      }
    }
  std::vector<float> a_scale(M), w_scale(N), bias(N);
  for (auto& v : a_scale) v = std::ldexp(dist_f(rng), -8);
  for (auto& v : w_scale) v = std::ldexp(dist_f(rng), -7);
  for (auto& v : bias) v = dist_f(rng);
  for (pyc::DType dt : {pyc::DType::F32, pyc::DType::F16, pyc::DType::BF16}) {
    for (bool with_bias : {false, true}) {
      const size_t bytes = static_cast<size_t>(M * N) * (dt == pyc::DType::F32 ? 4 : 2);
      std::vector<uint8_t> out5(bytes, 0xa5), out2(bytes, 0x5a);
      pyc::Int8Epilogue fe;
      fe.out_dtype = dt;
      fe.ldo = N;
      fe.a_scale = a_scale.data();
      fe.w_scale = w_scale.data();
      fe.bias = with_bias ? bias.data() : nullptr;
      fe.out = out5.data();
      gemm_pieces(5, ap5.data(), packed.data(), M, N, K, fe, nullptr, pieces, true);
      fe.out = out2.data();
      const bool blocked2 = pyc::int8_gemm_kc(2, M, K) < pyc::int8_round_k(K);
      gemm_pieces(2, ap2.data(), packed.data(), M, N, K, fe, blocked2 ? ws2.data() : nullptr, 1,
                  false);
      if (std::memcmp(out5.data(), out2.data(), bytes) != 0) {
        std::printf("FAIL amx float epilogue M=%lld K=%lld N=%lld dtype=%s bias=%d differs from "
                    "the VNNI path\n",
                    (long long)M, (long long)K, (long long)N, pyc::dtype_name(dt), int(with_bias));
        ++failures;
        return;
      }
    }
  }
}

// Float outputs (fp32, fp16, bf16, with and without bias) of the SIMD paths bit-identical to the
// scalar path, and int32 outputs equal to the int64 reference, for panel ranges split into
// `pieces` (odd ranges end on a single panel). Rows whose activation scale is large enough for
// (float)acc * a_scale to overflow take the double fallback on every path.
void check_float_paths(int64_t M, int64_t K, int64_t N, std::mt19937& rng, int pieces = 1) {
  const int isa = static_cast<int>(pyc::max_cpu_isa());
  std::uniform_int_distribution<int> dist(-128, 127);
  std::uniform_real_distribution<float> dist_f(-2.f, 2.f);
  std::vector<int8_t> a(M * K), b(N * K);
  for (auto& v : a) v = static_cast<int8_t>(dist(rng));
  for (auto& v : b) v = static_cast<int8_t>(dist(rng));
  std::vector<int8_t> packed(pyc::int8_packed_bytes(N, K));
  pyc::int8_pack_b(b.data(), K, N, K, packed.data(), 0, pyc::int8_round_n(N) / 16);
  std::vector<float> a_scale(M), w_scale(N), bias(N);
  for (auto& v : a_scale) v = std::ldexp(dist_f(rng), -8);
  if (M > 2) a_scale[M / 2] = 3e29f;   // (float)acc * a_scale overflows for |acc| >= 2
  if (M > 3) a_scale[M - 1] = -1e36f;  // and the result itself for most outputs
  for (auto& v : w_scale) v = std::ldexp(dist_f(rng), -7);
  for (auto& v : bias) v = dist_f(rng);
  std::vector<int64_t> ref(M * N);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      int64_t acc = 0;
      for (int64_t k = 0; k < K; ++k) acc += int64_t(a[m * K + k]) * b[n * K + k];
      ref[m * N + n] = acc;
    }
  std::vector<int32_t> ws(M * pyc::int8_round_n(N));
  auto run = [&](int path, const pyc::Int8Epilogue& ep, const std::vector<uint8_t>& ap) {
    const bool blocked = pyc::int8_gemm_kc(path, M, K) < pyc::int8_round_k(K);
    gemm_pieces(path, ap.data(), packed.data(), M, N, K, ep, blocked ? ws.data() : nullptr,
                pieces, false);
  };
  std::vector<uint8_t> ap0(M * pyc::int8_a_row_bytes(0, K));
  pyc::int8_prepare_a(0, a.data(), K, K, ap0.data(), 0, M);
  for (int path : {1, 2}) {
    if (pyc::int8_gemm_path(std::min(isa, path)) != path) continue;
    std::vector<uint8_t> ap(M * pyc::int8_a_row_bytes(path, K));
    pyc::int8_prepare_a(path, a.data(), K, K, ap.data(), 0, M);
    std::vector<int32_t> c(M * N, 0x5a5a5a5a);
    pyc::Int8Epilogue ie;
    ie.c = c.data();
    ie.ldc = N;
    run(path, ie, ap);
    for (int64_t i = 0; i < M * N; ++i)
      if (c[i] != static_cast<int32_t>(ref[i])) {
        std::printf("FAIL path=%d M=%lld K=%lld N=%lld pieces=%d int32 at %lld: %d != %lld\n", path,
                    (long long)M, (long long)K, (long long)N, pieces, (long long)i, c[i],
                    (long long)ref[i]);
        ++failures;
        return;
      }
    for (pyc::DType dt : {pyc::DType::F32, pyc::DType::F16, pyc::DType::BF16}) {
      for (bool with_bias : {false, true}) {
        const size_t bytes = static_cast<size_t>(M * N) * (dt == pyc::DType::F32 ? 4 : 2);
        std::vector<uint8_t> out0(bytes, 0xa5), out(bytes, 0x5a);
        pyc::Int8Epilogue fe;
        fe.out_dtype = dt;
        fe.ldo = N;
        fe.a_scale = a_scale.data();
        fe.w_scale = w_scale.data();
        fe.bias = with_bias ? bias.data() : nullptr;
        fe.out = out0.data();
        run(0, fe, ap0);
        fe.out = out.data();
        run(path, fe, ap);
        if (std::memcmp(out0.data(), out.data(), bytes) != 0) {
          std::printf("FAIL path=%d float epilogue M=%lld K=%lld N=%lld pieces=%d dtype=%s "
                      "bias=%d differs from the scalar path\n",
                      path, (long long)M, (long long)K, (long long)N, pieces, pyc::dtype_name(dt),
                      int(with_bias));
          ++failures;
          return;
        }
      }
    }
  }
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  const int isa = static_cast<int>(pyc::max_cpu_isa());
  const int64_t shapes[][3] = {{1, 1, 1},   {1, 67, 129}, {6, 4, 16},   {7, 3, 17},
                               {13, 100, 33}, {70, 2001, 40}, {200, 1500, 35}};
  // 0 scalar, 1 avx2, 2 avx512-vnni, 3 avx2 7-bit, 4 avx2 8-bit x weights in [-64, 64]
  for (int path = 0; path <= 5; ++path) {
    if ((path == 1 || path == 3 || path == 4) && pyc::int8_gemm_path(isa) < 1) continue;
    if (path == 2 && pyc::int8_gemm_path(std::min(isa, 2)) != 2) continue;
    if (path == 5 && pyc::int8_gemm_path(isa) != 5) {
      std::printf("int8 gemm path 5 (AMX): skipped, this CPU or OS does not allow AMX-INT8\n");
      continue;
    }
    if (path == 4) {  // only defined for narrow weights: A in [-128, 127] + 128 against |B| <= 64
      for (const auto& s : shapes) check_gemm(path, s[0], s[1], s[2], rng, false, true, false, true);
      for (int64_t m : {1, 2, 5, 6, 7, 13}) {
        check_gemm(path, m, 1000, 40, rng, true, true, false, true);  // A = -128 (stored 0)
        check_gemm(path, m, 1000, 40, rng, true, true, true, true);   // A = 127 (255) x +-64
      }
      check_gemm(path, 200, 4500, 36, rng, false, true, false, true);  // K blocks
      std::printf("int8 gemm path %d: %s\n", path, failures ? "FAILED" : "ok");
      continue;
    }
    for (const auto& s : shapes) check_gemm(path, s[0], s[1], s[2], rng, false);
    check_gemm(path, 9, 1000, 20, rng, true);
    if (path == 5) {
      // whole 16-row tiles and the M % 16 rows; K tails of every k-group count mod 16 and
      // K % 4 != 0; N % 16 != 0; 1, 2, 3 and 4 panel pieces per thread (single-panel pieces)
      for (int64_t m : {1, 2, 15, 16, 17, 31, 32, 33, 48, 128})
        for (int64_t k : {1, 3, 64, 67, 100, 130, 1000})
          for (int64_t n : {1, 17, 48, 129}) check_amx(m, k, n, rng);
      for (int64_t k = 1; k <= 68; ++k) check_amx(33, k, 40, rng, false, false, false, 2);
      for (int pieces : {1, 2, 4, 7}) check_amx(70, 300, 200, rng, false, false, false, pieces);
      check_amx(300, 4100, 70, rng);                  // several row blocks at K = 4100
      check_amx(40, 40001, 20, rng);                  // long K, no K blocks
      for (int64_t m : {16, 17, 33}) {
        check_amx(m, 4100, 33, rng, true);            // A = B = -128: 16384 * K, no saturation
        check_amx(m, 1000, 40, rng, false, true);     // act_bits=7
        check_amx(m, 1000, 40, rng, false, true, true);  // act_bits=7, weight_bits=7
        check_amx(m, 1000, 40, rng, false, false, true);  // weight_bits=7
      }
      std::printf("int8 gemm path %d: %s\n", path, failures ? "FAILED" : "ok");
      continue;
    }
    // largest pair sums of path 3: (63 + 64) * -128 * 2 = -32512 in every int16 lane, every row
    for (int64_t m : {3, 4, 5, 6, 7, 12}) check_gemm(path, m, 1000, 20, rng, true, true, true);
    check_gemm(path, 200, 4500, 20, rng, false);  // K blocks of 2048 on path 3
    // weights in [-64, 64]: path 3's pair-sum kernel, every row count of its 5-row tile, an odd
    // number of k-groups, K blocks; extremes (63 + 64) * 64 * 4 = 32512 per int16 lane
    for (int64_t m : {1, 2, 3, 4, 5, 6, 11, 16}) {
      check_gemm(path, m, 300, 40, rng, false, true, false, true);
      check_gemm(path, m, 1000, 40, rng, true, true, true, true);
    }
    check_gemm(path, 200, 4500, 36, rng, false, true, false, true);
    check_gemm(path, 7, 4104, 36, rng, true, true, true, true);
    for (int64_t m : {1, 2, 3}) {  // weights without -128 (what Int8Linear stores)
      check_gemm(path, m, 1000, 40, rng, false, false);
      check_gemm(path, m, 1000, 40, rng, true, false);
      check_gemm(path, m, 40001, 20, rng, false, false);  // K blocked
    }
    std::printf("int8 gemm path %d: %s\n", path, failures ? "FAILED" : "ok");
  }
  // the VNNI path's register tiles: every row count of a tile (1..12 rows, row blocks split
  // evenly), pairs of panels and a single last panel (odd panel ranges, N % 16 != 0), K tails
  // (K % 4 != 0, one k-group) and K blocks (first, middle and last block), float epilogues
  for (int64_t m : {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 16, 23, 25, 37})
    for (int64_t n : {16, 17, 32, 47, 48, 80})
      for (int64_t k : {1, 4, 67, 260}) check_float_paths(m, k, n, rng, m % 3 + 1);
  for (int pieces : {1, 2, 3}) {
    check_float_paths(200, 1500, 40, rng, pieces);   // K blocks, 2 row blocks
    check_float_paths(193, 2049, 33, rng, pieces);   // K blocks, 1 + 192 rows
    check_float_paths(24, 4100, 50, rng, pieces);    // long K, not blocked
  }
  std::printf("int8 gemm float epilogues: %s\n", failures ? "FAILED" : "ok");
  return failures ? 1 : 0;
}
