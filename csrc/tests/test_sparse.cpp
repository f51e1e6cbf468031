// Unit test of the sparse CPU kernels (CSR linear, masked linear and its gradients) against
// naive double-precision references, for every ISA level this CPU supports.
// sources: csrc/sparse/cpu/csr_linear.cpp csrc/sparse/cpu/decode_layout.cpp
//          csrc/sparse/cpu/masked_linear.cpp csrc/common/cpu_features.cpp
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "common/cpu_features.h"
#include "sparse/sparse.h"

using namespace pyc;

static int failures = 0;

static void expect_close(const char* what, double got, double ref, int isa, int M, int K, int N) {
  if (std::fabs(got - ref) > 1e-4 * (1.0 + std::fabs(ref))) {
    if (failures < 10)
      std::printf("FAIL %s isa=%d M=%d K=%d N=%d: got %g expected %g\n", what, isa, M, K, N, got,
                  ref);
    ++failures;
  }
}

// The column-chunked M == 1 layout (scalar kernel everywhere, AVX-512 where the CPU has it):
// random masks and masks with a few dense columns (kept weights past `steps` go to the SELL
// rest), rows over several 256-row windows computed as two task ranges, and padding that never
// multiplies an input.
static void test_chunked(std::mt19937& rng) {
  std::uniform_real_distribution<float> U(-1.f, 1.f);
  const int shapes[][2] = {{31, 16}, {70, 33}, {300, 600}, {1000, 300}, {62, 1}};
  for (int isa_i : {0, 2}) {
    if (isa_i > static_cast<int>(max_cpu_isa())) continue;
    const CpuIsa isa = static_cast<CpuIsa>(isa_i);
    for (const auto& sh : shapes) {
      const int K = sh[0], N = sh[1];
      for (int pattern = 0; pattern < 4; ++pattern) {
        const double sparsity = pattern == 0 ? 0.0 : pattern == 1 ? 0.5 : 0.9;
        std::vector<float> w(N * K), x(K);
        std::vector<float> bias(N);
        for (auto& v : w) v = U(rng);
        for (auto& v : x) v = U(rng);
        for (auto& v : bias) v = U(rng);
        std::vector<int32_t> rp(N + 1, 0);
        std::vector<int16_t> ci;
        std::vector<float> vals;
        for (int n = 0; n < N; ++n) {
          for (int k = 0; k < K; ++k) {
            // pattern 3: 90% sparse with columns 3..9 kept in every row (overflow in chunk 0)
            const bool keep = (pattern == 3 && k >= 3 && k < 10) || (U(rng) * 0.5f + 0.5f) >= sparsity;
            if (keep) {
              ci.push_back(static_cast<int16_t>(k));
              vals.push_back(w[n * K + k]);
            }
          }
          rp[n + 1] = static_cast<int32_t>(ci.size());
        }
        std::vector<double> yref(N);
        for (int n = 0; n < N; ++n) {
          double a = bias[n];
          for (int p = rp[n]; p < rp[n + 1]; ++p) a += double(vals[p]) * x[ci[p]];
          yref[n] = a;
        }
        ChunkedLayout L;
        chunked_pack_cpu(rp.data(), ci.data(), true, vals.data(), N, K, L);
        if (L.steps == 0) {
          if (N >= 16) {  // the cost model takes the chunked layout at these densities
            std::printf("FAIL chunked: no layout K=%d N=%d pattern=%d\n", K, N, pattern);
            ++failures;
          }
          continue;
        }
        // every kept weight once: in a slot or in the rest
        int64_t in_slots = 0;
        for (float v : L.vals) in_slots += v != 0.f;
        int64_t in_rest = 0;
        for (float v : L.rest.vals) in_rest += v != 0.f;
        if (in_slots + in_rest != static_cast<int64_t>(vals.size())) {
          std::printf("FAIL chunked: %lld + %lld entries for %zu kept weights\n",
                      static_cast<long long>(in_slots), static_cast<long long>(in_rest), vals.size());
          ++failures;
        }
        if (pattern == 3 && in_rest == 0) {
          std::printf("FAIL chunked: dense columns left nothing to the rest (K=%d N=%d)\n", K, N);
          ++failures;
        }
        std::vector<float, Aligned64<float>> xq(chunked_x_size(L));
        chunked_pad_x(x.data(), K, L, xq.data());
        std::vector<float> y(N, -7.f);
        const int64_t windows = (N + kSellWindow - 1) / kSellWindow, half = windows / 2;
        chunked_gemv_cpu(isa, xq.data(), L, bias.data(), y.data(), 0, half);
        chunked_gemv_cpu(isa, xq.data(), L, bias.data(), y.data(), half, windows);
        for (int n = 0; n < N; ++n) expect_close("chunked_gemv", y[n], yref[n], isa_i, 1, K, N);
        // an inf in column c reaches exactly the rows that keep c
        for (int c : {0, K - 1}) {
          std::vector<float> xi(x);
          xi[c] = INFINITY;
          chunked_pad_x(xi.data(), K, L, xq.data());
          chunked_gemv_cpu(isa, xq.data(), L, nullptr, y.data(), 0, windows);
          for (int n = 0; n < N; ++n) {
            bool keeps = false;
            for (int p = rp[n]; p < rp[n + 1]; ++p) keeps = keeps || ci[p] == c;
            if (keeps == static_cast<bool>(std::isfinite(y[n]))) {
              if (failures < 10)
                std::printf("FAIL chunked padding isa=%d K=%d N=%d row %d col %d\n", isa_i, K, N, n, c);
              ++failures;
            }
          }
        }
      }
    }
  }
}

// The packed byte form of the layouts: written, read back as views, the same products bit for
// bit as the owning layouts; damaged headers are refused.
static void test_packed(std::mt19937& rng) {
  std::uniform_real_distribution<float> U(-1.f, 1.f);
  const int K = 300, N = 600;
  std::vector<int32_t> rp(N + 1, 0);
  std::vector<int16_t> ci;
  std::vector<float> vals, x(K), bias(N);
  for (auto& v : x) v = U(rng);
  for (auto& v : bias) v = U(rng);
  for (int n = 0; n < N; ++n) {
    for (int k = 0; k < K; ++k)
      if (U(rng) > 0.8f || (k >= 3 && k < 10)) {  // columns 3..9 fill a chunked rest
        ci.push_back(static_cast<int16_t>(k));
        vals.push_back(U(rng));
      }
    rp[n + 1] = static_cast<int32_t>(ci.size());
  }
  const int64_t nnz = static_cast<int64_t>(vals.size());
  ChunkedLayout C;
  chunked_pack_cpu(rp.data(), ci.data(), true, vals.data(), N, K, C);
  SellLayout S;
  sell_pack_cpu(rp.data(), ci.data(), true, vals.data(), N, K, S);
  if (C.steps == 0 || C.rest.n_slices == 0) {
    std::printf("FAIL packed: expected a chunked layout with a rest\n");
    ++failures;
    return;
  }
  const CpuIsa top = max_cpu_isa();
  for (int kind = 0; kind < 3; ++kind) {
    DecodeLayoutHeader h;
    const int64_t bytes = decode_layout_plan(kind == 2 ? &C : nullptr, kind == 1 ? &S : nullptr, N,
                                             K, nnz, h);
    std::vector<uint8_t, Aligned64<uint8_t>> buf(static_cast<size_t>(bytes));
    decode_layout_write(h, kind == 2 ? &C : nullptr, kind == 1 ? &S : nullptr, buf.data());
    DecodeLayoutHeader r;
    ChunkedView cv;
    SellView sv;
    const char* err = decode_layout_read(buf.data(), bytes, r, cv, sv);
    if (err || r.kind != kind || r.n_rows != N || r.in_features != K || r.nnz != nnz) {
      std::printf("FAIL packed kind %d: %s\n", kind, err ? err : "header fields");
      ++failures;
      continue;
    }
    for (int isa_i = 0; isa_i <= static_cast<int>(top) && isa_i <= 2; ++isa_i) {
      const CpuIsa isa = static_cast<CpuIsa>(isa_i);
      std::vector<float> y1(N, -7.f), y2(N, -7.f);  // kind 0: no product, both stay -7
      if (kind == 1) {
        std::vector<float> xp(x);
        xp.push_back(0.f);
        sell_gemv_cpu(isa, xp.data(), S, bias.data(), y1.data(), 0, S.n_slices);
        sell_gemv_cpu(isa, xp.data(), sv, bias.data(), y2.data(), 0, sv.n_slices);
      } else if (kind == 2) {
        std::vector<float, Aligned64<float>> xq(chunked_x_size(C));
        chunked_pad_x(x.data(), K, C, xq.data());
        const int64_t windows = (N + kSellWindow - 1) / kSellWindow;
        chunked_gemv_cpu(isa, xq.data(), C, bias.data(), y1.data(), 0, windows);
        chunked_gemv_cpu(isa, xq.data(), cv, bias.data(), y2.data(), 0, windows);
      }
      if (std::memcmp(y1.data(), y2.data(), sizeof(float) * N) != 0) {
        std::printf("FAIL packed kind %d isa %d: the view's product differs\n", kind, isa_i);
        ++failures;
      }
    }
    // damaged headers: another size, magic, kind or offset
    std::vector<uint8_t, Aligned64<uint8_t>> bad(buf);
    if (!decode_layout_read(bad.data(), bytes - 64, r, cv, sv)) ++failures;
    bad[0] ^= 1;
    if (!decode_layout_read(bad.data(), bytes, r, cv, sv)) ++failures;
    bad = buf;
    DecodeLayoutHeader hb = h;
    hb.kind = 7;
    std::memcpy(bad.data(), &hb, sizeof(hb));
    if (!decode_layout_read(bad.data(), bytes, r, cv, sv)) ++failures;
    if (kind > 0) {
      hb = h;
      (kind == 2 ? hb.c_vals_off : hb.s_vals_off) = bytes;  // past the end
      std::memcpy(bad.data(), &hb, sizeof(hb));
      if (!decode_layout_read(bad.data(), bytes, r, cv, sv)) {
        std::printf("FAIL packed kind %d: a section past the end was accepted\n", kind);
        ++failures;
      }
    }
  }
}

int main() {
  std::mt19937 rng(1);
  test_chunked(rng);
  test_packed(rng);
  std::uniform_real_distribution<float> U(-1.f, 1.f);
  const int shapes[][3] = {{1, 1, 1}, {1, 37, 19}, {2, 16, 8}, {9, 70, 33}, {33, 129, 40},
                           {70, 64, 17}, {13, 300, 24}, {1, 200, 50},
                           {32, 1000, 130}, {40, 300, 150}, {64, 600, 70}};
  const CpuIsa top = max_cpu_isa();
  for (int isa_i = 0; isa_i <= static_cast<int>(top) && isa_i <= 2; ++isa_i) {
    const CpuIsa isa = static_cast<CpuIsa>(isa_i);
    for (const auto& s : shapes) {
      const int M = s[0], K = s[1], N = s[2];
      for (double sparsity : {0.0, 0.7, 0.99}) {
        std::vector<float> w(N * K), x(M * K), bias(N), g(M * N);
        std::vector<uint8_t> mask(N * K);
        for (auto& v : w) v = U(rng);
        for (auto& v : x) v = U(rng);
        for (auto& v : bias) v = U(rng);
        for (auto& v : g) v = U(rng);
        for (auto& m : mask) m = (U(rng) * 0.5f + 0.5f) >= sparsity;
        // CSR of the masked weight
        std::vector<int32_t> rp(N + 1, 0);
        std::vector<int16_t> ci;
        std::vector<float> vals;
        for (int n = 0; n < N; ++n) {
          for (int k = 0; k < K; ++k)
            if (mask[n * K + k]) {
              ci.push_back(static_cast<int16_t>(k));
              vals.push_back(w[n * K + k]);
            }
          rp[n + 1] = static_cast<int32_t>(ci.size());
        }
        // references
        std::vector<double> yref(M * N), gxref(M * K), gwref(N * K);
        for (int m = 0; m < M; ++m)
          for (int n = 0; n < N; ++n) {
            double a = bias[n];
            for (int k = 0; k < K; ++k) a += mask[n * K + k] ? double(w[n * K + k]) * x[m * K + k] : 0.0;
            yref[m * N + n] = a;
          }
        for (int m = 0; m < M; ++m)
          for (int k = 0; k < K; ++k) {
            double a = 0;
            for (int n = 0; n < N; ++n) a += mask[n * K + k] ? double(g[m * N + n]) * w[n * K + k] : 0.0;
            gxref[m * K + k] = a;
          }
        for (int n = 0; n < N; ++n)
          for (int k = 0; k < K; ++k) {
            double a = 0;
            for (int m = 0; m < M; ++m) a += double(g[m * N + n]) * x[m * K + k];
            gwref[n * K + k] = mask[n * K + k] ? a : 0.0;
          }
        // CSR kernels
        if (M == 1) {
          std::vector<float> y(N);
          csr_gemv_cpu(isa, x.data(), rp.data(), ci.data(), true, vals.data(), bias.data(),
                       y.data(), 0, N);
          for (int n = 0; n < N; ++n) expect_close("csr_gemv", y[n], yref[n], isa_i, M, K, N);
          // the sliced (SELL-8) layout, over two slice ranges as the binding's tasks split it
          SellLayout L;
          sell_pack_cpu(rp.data(), ci.data(), true, vals.data(), N, K, L);
          int64_t kept = 0;
          for (int64_t s = 0; s < L.n_slices; ++s)
            for (int l = 0; l < 8; ++l) kept += L.row_of[8 * s + l] >= 0;
          if (kept != N || L.n_slices != (N + 7) / 8 || L.vals.size() < vals.size()) ++failures;
          std::vector<float> xp(x.begin(), x.end());
          xp.push_back(0.f);
          std::vector<float> y2(N, -7.f);
          const int64_t sh = L.n_slices / 2;
          sell_gemv_cpu(isa, xp.data(), L, bias.data(), y2.data(), 0, sh);
          sell_gemv_cpu(isa, xp.data(), L, bias.data(), y2.data(), sh, L.n_slices);
          for (int n = 0; n < N; ++n) expect_close("sell_gemv", y2[n], yref[n], isa_i, M, K, N);
          // padding never touches an input: an inf in column 0 reaches only the rows keeping it
          xp[0] = INFINITY;
          sell_gemv_cpu(isa, xp.data(), L, nullptr, y2.data(), 0, L.n_slices);
          for (int n = 0; n < N; ++n) {
            const bool keeps0 = rp[n + 1] > rp[n] && ci[rp[n]] == 0;
            if (keeps0 != !std::isfinite(y2[n])) {
              if (failures < 10) std::printf("FAIL sell padding isa=%d K=%d N=%d row %d\n", isa_i, K, N, n);
              ++failures;
            }
          }
          // int32 indices (K >= 32768 layouts) through the same pack
          std::vector<int32_t> ci32(ci.begin(), ci.end());
          SellLayout L32;
          sell_pack_cpu(rp.data(), ci32.data(), false, vals.data(), N, K, L32);
          L32.idx16 = false;
          L32.idx32v.assign(L32.idx16v.begin(), L32.idx16v.end());
          L32.idx16v.clear();
          xp[0] = x[0];
          sell_gemv_cpu(isa, xp.data(), L32, bias.data(), y2.data(), 0, L32.n_slices);
          for (int n = 0; n < N; ++n) expect_close("sell_gemv32", y2[n], yref[n], isa_i, M, K, N);
        }
        const int Mp = static_cast<int>(csr_padded_m(isa, M));
        std::vector<float> xTz((K + 1) * Mp, -1.f), ys(M * N);
        for (int m = 0; m < Mp; ++m) xTz[m] = 0.f;
        float* xT = xTz.data() + Mp;
        transpose_pad_cpu(x.data(), K, M, Mp, xT, 0, K);
        for (int k = 0; k < K; ++k)
          for (int m = 0; m < Mp; ++m)
            if (xT[k * Mp + m] != (m < M ? x[m * K + k] : 0.f)) ++failures;
        {  // the ISA transpose, over two column ranges as the binding's tasks split it
          std::vector<float> xT2(K * Mp, -1.f);
          const int kh = K / 3;
          transpose_pad_cpu(isa, x.data(), K, M, Mp, xT2.data(), 0, kh);
          transpose_pad_cpu(isa, x.data(), K, M, Mp, xT2.data(), kh, K);
          for (int i = 0; i < K * Mp; ++i)
            if (xT2[i] != xT[i]) {
              if (failures < 10) std::printf("FAIL transpose isa=%d M=%d K=%d\n", isa_i, M, K);
              ++failures;
            }
        }
        csr_spmm_t_cpu(isa, xT, Mp, rp.data(), ci.data(), true, vals.data(), bias.data(),
                       ys.data(), N, M, 0, N);
        for (int i = 0; i < M * N; ++i) expect_close("csr_spmm_t", ys[i], yref[i], isa_i, M, K, N);
        // masked kernels
        std::vector<float> y(M * N), gx(M * K), gw(N * K);
        masked_linear_fwd_cpu(isa, x.data(), w.data(), mask.data(), bias.data(), y.data(), M, N,
                              K, 0, N);
        masked_linear_grad_input_cpu(isa, g.data(), w.data(), mask.data(), gx.data(), M, N, K, 0,
                                     K);
        masked_linear_grad_weight_cpu(isa, g.data(), x.data(), mask.data(), gw.data(), M, N, K,
                                      0, N);
        for (int i = 0; i < M * N; ++i) expect_close("masked_fwd", y[i], yref[i], isa_i, M, K, N);
        for (int i = 0; i < M * K; ++i) expect_close("masked_gin", gx[i], gxref[i], isa_i, M, K, N);
        for (int i = 0; i < N * K; ++i) {
          expect_close("masked_gw", gw[i], gwref[i], isa_i, M, K, N);
          if (!mask[i] && gw[i] != 0.f) ++failures;
        }
      }
    }
  }
  if (failures) {
    std::printf("test_sparse: %d failure(s)\n", failures);
    return 1;
  }
  std::printf("test_sparse: ok (max isa %s)\n", cpu_isa_name(top));
  return 0;
}
