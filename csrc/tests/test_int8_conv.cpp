// C++ unit test of the int8 convolution kernels (every ISA level this CPU has): the kernel API
// (pack, plan, run in pieces) against a naive reference with the same fp32 epilogue, for regular,
// grouped and depthwise convs, uint8 and int8 input, float and requantized output.
// sources: csrc/int8/cpu/conv.cpp csrc/int8/cpu/gemm.cpp csrc/int8/cpu/gemm_amx.cpp csrc/common/cpu_features.cpp csrc/common/dtypes.cpp
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include <sys/mman.h>
#include <unistd.h>

#include "common/cpu_features.h"
#include "int8/conv.h"

namespace {

int failures = 0;

// n bytes that end where an inaccessible page begins: a kernel reading past the end of its input
// faults instead of reading a neighbour's memory unnoticed.
class GuardedBytes {
 public:
  explicit GuardedBytes(size_t n) : n_(n) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    pages_ = (n + page - 1) / page * page;
    void* p = mmap(nullptr, pages_ + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) {
      std::perror("mmap");
      std::abort();
    }
    base_ = static_cast<uint8_t*>(p);
    mprotect(base_ + pages_, page, PROT_NONE);
    map_bytes_ = pages_ + page;
  }
  ~GuardedBytes() { munmap(base_, map_bytes_); }
  GuardedBytes(const GuardedBytes&) = delete;
  GuardedBytes& operator=(const GuardedBytes&) = delete;
  uint8_t* data() { return base_ + pages_ - n_; }
  size_t size() const { return n_; }
  uint8_t* begin() { return data(); }
  uint8_t* end() { return data() + n_; }
  uint8_t& operator[](size_t i) { return data()[i]; }

 private:
  uint8_t* base_ = nullptr;
  size_t n_, pages_ = 0, map_bytes_ = 0;
};

struct Case {
  int64_t N, C, H, W, Cout, kh, kw, s, p, d, groups;
  int64_t pb = -1, pr = -1;  // bottom / right padding when it differs from p (top / left)
};

// The expected output (fp32 or requantized bytes) of one element, the kernel's expression order.
float reference_value(int64_t acc, float xs, float ws, const float* bias, int64_t co) {
  float y = static_cast<float>(static_cast<int32_t>(acc)) * xs;
  y = y * ws;
  if (bias) y = y + bias[co];
  return y;
}

void check_case(int isa, const Case& cs, bool x_signed, bool quant_out, std::mt19937& rng,
                pyc::ConvAct act = pyc::ConvAct::Relu6, int32_t out_zp = 7) {
  pyc::Int8ConvGeom g;
  g.N = cs.N;
  g.C = cs.C;
  g.H = cs.H;
  g.W = cs.W;
  g.Cout = cs.Cout;
  g.kh = cs.kh;
  g.kw = cs.kw;
  g.sh = g.sw = cs.s;
  g.ph = g.pw = cs.p;
  g.pb = cs.pb < 0 ? cs.p : cs.pb;
  g.pr = cs.pr < 0 ? cs.p : cs.pr;
  g.dh = g.dw = cs.d;
  g.groups = cs.groups;
  g.Ho = pyc::int8_conv_out_size(g.H, g.kh, g.sh, g.ph, g.pb, g.dh);
  g.Wo = pyc::int8_conv_out_size(g.W, g.kw, g.sw, g.pw, g.pr, g.dw);
  const int64_t Cg = g.cin_g(), Coutg = g.cout_g(), taps = g.kh * g.kw;
  std::uniform_int_distribution<int> byte(0, 255), wdist(-128, 127);
  GuardedBytes x(static_cast<size_t>(g.N * g.H * g.W * g.C));
  for (auto& v : x) v = static_cast<uint8_t>(byte(rng));
  std::vector<int8_t> w(g.Cout * Cg * taps);
  for (auto& v : w) v = static_cast<int8_t>(wdist(rng));
  std::vector<int32_t> zp(g.N);
  std::vector<float> xs(g.N), ws(g.Cout), bias(g.Cout);
  std::uniform_real_distribution<float> u(0.001f, 0.02f), b(-1.f, 1.f);
  for (int64_t n = 0; n < g.N; ++n) {
    zp[n] = x_signed ? byte(rng) - 128 : byte(rng);
    xs[n] = u(rng);
  }
  for (int64_t c = 0; c < g.Cout; ++c) {
    ws[c] = u(rng);
    bias[c] = b(rng);
  }

  std::vector<int8_t> packed(pyc::int8_conv_packed_bytes(g));
  const int64_t units = pyc::int8_conv_pack_units(g);
  pyc::int8_conv_pack_weight(w.data(), g, packed.data(), 0, units / 2);
  pyc::int8_conv_pack_weight(w.data(), g, packed.data(), units / 2, units);

  const int64_t M = g.N * g.Ho * g.Wo;
  std::vector<float> outf(M * g.Cout, -12345.f);
  std::vector<uint8_t> outq(M * g.Cout, 0x5a);
  pyc::Int8ConvArgs a;
  a.x = x.data();
  a.x_signed = x_signed;
  a.x_zp = zp.data();
  a.x_scale = xs.data();
  a.w_scale = ws.data();
  a.bias = bias.data();
  a.act = act;
  a.out_kind = quant_out ? pyc::ConvOut::U8 : pyc::ConvOut::F32;
  const float out_scale = 0.02f;
  a.out_inv = 1.f / out_scale;
  a.out_zp = out_zp;
  a.out = quant_out ? static_cast<void*>(outq.data()) : static_cast<void*>(outf.data());

  const pyc::Int8ConvPlan plan = pyc::int8_conv_plan(isa, g, packed.data(), 2);
  std::vector<uint8_t> padded(plan.padded ? plan.pad_bytes + 64 : 0);
  if (plan.padded) {
    uint8_t* base = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(padded.data()) + 63) & ~uintptr_t(63));
    pyc::int8_conv_pad_input(plan, g, a, base, 0, plan.pad_units / 2);
    pyc::int8_conv_pad_input(plan, g, a, base, plan.pad_units / 2, plan.pad_units);
    a.x_padded = base;
  }
  std::vector<uint8_t> buf(plan.workspace_bytes + 64);
  void* ws_ptr = reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(buf.data()) + 63) & ~uintptr_t(63));
  // two "threads" on disjoint task ranges
  pyc::int8_conv_run(plan, g, packed.data(), a, 0, plan.tasks / 3, ws_ptr);
  pyc::int8_conv_run(plan, g, packed.data(), a, plan.tasks / 3, plan.tasks, ws_ptr);

  int bad = 0;
  for (int64_t n = 0; n < g.N; ++n)
    for (int64_t oy = 0; oy < g.Ho; ++oy)
      for (int64_t ox = 0; ox < g.Wo; ++ox)
        for (int64_t co = 0; co < g.Cout; ++co) {
          const int64_t grp = co / Coutg;
          int64_t acc = 0;
          for (int64_t ky = 0; ky < g.kh; ++ky)
            for (int64_t kx = 0; kx < g.kw; ++kx) {
              const int64_t iy = oy * g.sh - g.ph + ky * g.dh, ix = ox * g.sw - g.pw + kx * g.dw;
              if (iy < 0 || iy >= g.H || ix < 0 || ix >= g.W) continue;
              for (int64_t c = 0; c < Cg; ++c) {
                const uint8_t raw = x[((n * g.H + iy) * g.W + ix) * g.C + grp * Cg + c];
                const int64_t xv = x_signed ? static_cast<int8_t>(raw) : raw;
                acc += (xv - zp[n]) * w[((co * Cg + c) * g.kh + ky) * g.kw + kx];
              }
            }
          float y = reference_value(acc, xs[n], ws[co], bias.data(), co);
          y = y < 0.f ? 0.f : y;
          if (act == pyc::ConvAct::Relu6) y = y > 6.f ? 6.f : y;
          const int64_t i = ((n * g.Ho + oy) * g.Wo + ox) * g.Cout + co;
          bool ok;
          if (quant_out) {
            float r = std::nearbyint(y * a.out_inv) + static_cast<float>(out_zp);
            r = r < 0.f ? 0.f : (r > 255.f ? 255.f : r);
            ok = outq[i] == static_cast<uint8_t>(r);
          } else {
            ok = std::memcmp(&outf[i], &y, sizeof y) == 0;
          }
          if (!ok && bad++ < 3) {
            std::printf("FAIL isa=%d C=%lld Cout=%lld k=%lldx%lld s=%lld p=%lld d=%lld groups=%lld "
                        "signed=%d quant=%d at n=%lld oy=%lld ox=%lld co=%lld: %g != %g\n",
                        isa, (long long)g.C, (long long)g.Cout, (long long)g.kh, (long long)g.kw,
                        (long long)cs.s, (long long)cs.p, (long long)cs.d, (long long)g.groups,
                        (int)x_signed, (int)quant_out, (long long)n, (long long)oy, (long long)ox,
                        (long long)co, quant_out ? double(outq[i]) : double(outf[i]), double(y));
          }
        }
  if (bad) ++failures;
}

// Dynamic quantization parameters and the vector quantization against the definition.
void check_quantize(int isa, std::mt19937& rng) {
  std::uniform_real_distribution<float> u(-3.f, 5.f);
  std::vector<float> x(1003);
  for (auto& v : x) v = u(rng);
  float lo = INFINITY, hi = -INFINITY;
  bool finite = true;
  pyc::int8_conv_minmax(isa, x.data(), pyc::DType::F32, 0, 1003, &lo, &hi, &finite);
  const float elo = *std::min_element(x.begin(), x.end()), ehi = *std::max_element(x.begin(), x.end());
  if (!finite || lo != elo || hi != ehi) {
    std::printf("FAIL isa=%d minmax: %g %g (expected %g %g)\n", isa, lo, hi, elo, ehi);
    ++failures;
  }
  float s;
  int32_t zp;
  pyc::int8_conv_dynamic_params(lo, hi, &s, &zp);
  std::vector<uint8_t> q(x.size());
  pyc::int8_conv_quantize_u8(isa, x.data(), pyc::DType::F32, 0, 1003, s, true, zp, q.data());
  for (size_t i = 0; i < x.size(); ++i) {
    float r = std::nearbyint(x[i] / s) + static_cast<float>(zp);
    r = r < 0.f ? 0.f : (r > 255.f ? 255.f : r);
    if (q[i] != static_cast<uint8_t>(r)) {
      std::printf("FAIL isa=%d quantize at %zu: %d != %g\n", isa, i, q[i], double(r));
      ++failures;
      break;
    }
  }
  x[500] = NAN;
  finite = true;
  pyc::int8_conv_minmax(isa, x.data(), pyc::DType::F32, 0, 1003, &lo, &hi, &finite);
  if (finite) {
    std::printf("FAIL isa=%d minmax missed a NaN\n", isa);
    ++failures;
  }
}

}  // namespace

int main() {
  std::mt19937 rng(7);
  const Case cases[] = {
      {2, 5, 9, 11, 7, 3, 3, 1, 1, 1, 1},      // odd channels
      {1, 19, 8, 7, 33, 3, 3, 2, 1, 1, 1},     // stride 2, Cout not a multiple of 16
      {3, 64, 6, 5, 40, 1, 1, 1, 0, 1, 1},     // 1x1 (rows read in place for uint8 x)
      {2, 128, 5, 7, 36, 1, 1, 1, 0, 1, 2},    // 1x1, 2 groups of 64 channels
      {2, 40, 7, 7, 96, 1, 1, 1, 0, 1, 1},     // 1x1, K < 64 read in place: rows past the end of x
      {1, 200, 9, 9, 24, 1, 1, 1, 0, 1, 1},    // 1x1, K = 3 steps of 64 and a tail
      {3, 48, 5, 7, 40, 1, 1, 1, 0, 1, 2},     // 1x1, 2 groups of 24 channels
      {1, 36, 8, 8, 20, 1, 1, 1, 0, 1, 1},     // 1x1, 64 rows: every AMX row in whole tiles
      {2, 8, 10, 9, 12, 3, 3, 1, 2, 2, 2},     // groups 2, dilation 2
      {1, 12, 7, 8, 20, 3, 3, 2, 1, 1, 4},     // groups 4
      {2, 70, 9, 10, 70, 3, 3, 1, 1, 1, 70},   // depthwise 3x3, C > 64 and not a multiple of 64
      {1, 18, 12, 11, 18, 5, 5, 2, 2, 1, 18},  // depthwise 5x5 stride 2
      {1, 200, 7, 7, 200, 3, 3, 1, 1, 1, 200},    // depthwise, tasks split the channels
      {1, 150, 6, 61, 150, 5, 5, 1, 2, 1, 150},   // depthwise 5x5, two row segments, channel split
      {1, 3, 5, 5, 6, 5, 5, 1, 0, 1, 1},       // output 1x1
      {1, 160, 7, 7, 48, 3, 3, 1, 1, 1, 1},    // K = 1440 (several 64-k steps, tail)
      {1, 19, 8, 10, 33, 3, 3, 2, 0, 1, 1, 1, 1},     // TF "SAME" stride 2: padding only after
      {2, 64, 5, 6, 32, 1, 1, 1, 0, 1, 1, 2, 1},      // 1x1 stride 1 padded after: not in place
      {1, 40, 14, 16, 40, 5, 5, 2, 1, 1, 40, 2, 2},   // depthwise 5x5 stride 2, 1 before, 2 after
      {2, 24, 9, 10, 24, 3, 3, 1, 2, 1, 24, 0, 1},    // depthwise 3x3, more before than after
      // AMX, stride 1, channels of a group a multiple of 64: taps read in place from the padded x
      {3, 64, 6, 7, 40, 3, 3, 1, 1, 1, 1},            // several images per block
      {1, 128, 9, 20, 36, 3, 3, 1, 2, 2, 2},          // dilation 2, 2 groups of 64 channels
      {2, 64, 8, 9, 20, 3, 3, 1, 0, 1, 1, 2, 1},      // padding only after
      {1, 64, 40, 41, 16, 3, 3, 1, 1, 1, 1},          // several blocks per image
      {2, 192, 5, 5, 50, 5, 5, 1, 2, 1, 1},           // 5x5, 3 steps of 64 per tap
  };
  const int max_isa = static_cast<int>(pyc::max_cpu_isa());
  for (int isa = 0; isa <= max_isa; ++isa) {
    const int before = failures;
    for (const Case& c : cases)
      for (int sgn = 0; sgn < 2; ++sgn)
        for (int q = 0; q < 2; ++q) check_case(isa, c, sgn == 1, q == 1, rng);
    // uint8 output with zero point 0 (the packing's saturation is ReLU's lower clamp)
    for (const Case& c : cases)
      for (pyc::ConvAct act : {pyc::ConvAct::Relu, pyc::ConvAct::Relu6})
        check_case(isa, c, false, true, rng, act, 0);
    check_quantize(isa, rng);
    std::printf("int8 conv isa %d (%s): %s\n", isa, pyc::cpu_isa_name(static_cast<pyc::CpuIsa>(isa)),
                failures == before ? "ok" : "FAILED");
  }
  if (failures) {
    std::printf("test_int8_conv: %d failure(s)\n", failures);
    return 1;
  }
  std::printf("test_int8_conv: all passed\n");
  return 0;
}
