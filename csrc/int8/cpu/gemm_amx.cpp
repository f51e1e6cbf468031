// AMX-INT8 int8 GEMM (see gemm_amx.h): tile kernels and the loop over rows and panels.
//
// Tiles (palette 1, all 16 rows x 64 bytes): tmm0..tmm3 int32 accumulators of a 32 x 32 block
// (rows 0-15 x panel 0, rows 0-15 x panel 1, rows 16-31 x panel 0, rows 16-31 x panel 1),
// tmm4/tmm5 the two 16-row activation tiles of one 64-k step, tmm6/tmm7 the weight tiles of the
// two panels for that step. Each step loads four tiles and issues four tdpbusd.
//
// The GCC tile intrinsics are inline assembly that does not tell the compiler which memory a tile
// load reads, so memory written just before (the tile configuration, the accumulators' start
// values, the zero-padded K tail) is made visible with a compiler barrier first.
#include "int8/cpu/gemm_amx.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include "common/cpu_features.h"
#include "common/simd.h"

namespace pyc {

#if PYC_HAVE_X86_SIMD

namespace {

constexpr int64_t kTileRows = 16;     // rows of an activation / accumulator tile
constexpr int64_t kTileBytes = 1024;  // one weight tile: 16 k-groups x 16 columns x 4 k
constexpr int64_t kStepK = 64;        // k per tdpbusd
constexpr int kMrVnni = 8;            // tallest AVX-512 VNNI tile (the M % 16 tail rows)
// Rows of prepared activations kept in L2 (2 MB per core where AMX exists) while the weight
// panels stream past them.
constexpr int64_t kRowBlockBytes = int64_t(1) << 20;
// Weights of up to this many bytes are kept in L1 (48 KB per core where AMX exists) while the
// rows stream past them.
constexpr int64_t kL1WeightBytes = int64_t(32) << 10;
// Weight tiles are prefetched this many 64-k steps ahead.
constexpr int64_t kPrefetchSteps = 2;

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};
static_assert(sizeof(TileConfig) == 64, "the tile configuration is 64 bytes");

inline void compiler_barrier() { asm volatile("" ::: "memory"); }

PYC_TARGET_AMX void configure_tiles() {
  TileConfig cfg;
  std::memset(&cfg, 0, sizeof cfg);
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = kTileRows;
  }
  compiler_barrier();
  _tile_loadconfig(&cfg);
}

PYC_TARGET_AMX void release_tiles() { _tile_release(); }

// Holds the tile configuration for the calling thread while in scope (when `on`).
struct TileScope {
  explicit TileScope(bool on) : on_(on) {
    if (on_) configure_tiles();
  }
  ~TileScope() {
    if (on_) release_tiles();
  }
  bool on_;
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;
};

// One 64-k step of a (16 * MT) x (16 * NT) block: A0 / A1 the two activation tiles (rows 0-15,
// 16-31; row stride LDA), B0 / B1 the weight tiles of the two panels; all tiles are loaded
// before the first multiply.
#define PYC_AMX_STEP(A0, A1, LDA, B0, B1)            \
  do {                                               \
    _tile_loadd(4, (A0), (LDA));                     \
    _tile_loadd(6, (B0), 64);                        \
    if (NT == 2) _tile_loadd(7, (B1), 64);           \
    if (MT == 2) _tile_loadd(5, (A1), (LDA));        \
    _tile_dpbusd(0, 4, 6);                           \
    if (NT == 2) _tile_dpbusd(1, 4, 7);              \
    if (MT == 2) _tile_dpbusd(2, 5, 6);              \
    if (MT == 2 && NT == 2) _tile_dpbusd(3, 5, 7);   \
  } while (0)

// c (row stride ldc int32) = the (16 * MT) x (16 * NT) block of sum_k a * B (exact, modulo 2^32),
// the bytes of a read as uint8 (row stride lda). b: the first panel's k-groups, bstride bytes to
// the second panel; nfull whole 64-k steps, then, when tail != nullptr, one step whose weight
// tiles are tail and tail + tstride (the last k-groups, zero-padded). init: the accumulators'
// start value per column (16 int32 per panel, loaded into every row with a zero stride; the GEMM
// passes -128 * sum_k B[n, k], which removes the + 128 of its A), or nullptr to start at zero
// (the conv loop corrects for the zero point in its epilogue).
// koff: the byte offset of each whole step's activations from the row start, or nullptr for
// s * 64 (the rows hold their K bytes one after another).
template <int MT, int NT>
PYC_TARGET_AMX void amx_block(const uint8_t* a, int64_t lda, const int8_t* b, int64_t bstride,
                              int64_t nfull, const int8_t* tail, int64_t tstride,
                              const int32_t* init, int32_t* c, int64_t ldc, const int64_t* koff) {
  if (init != nullptr) {
    _tile_loadd(0, init, 0);
    if (NT == 2) _tile_loadd(1, init + 16, 0);
    if (MT == 2) _tile_loadd(2, init, 0);
    if (MT == 2 && NT == 2) _tile_loadd(3, init + 16, 0);
  } else {
    _tile_zero(0);
    if (NT == 2) _tile_zero(1);
    if (MT == 2) _tile_zero(2);
    if (MT == 2 && NT == 2) _tile_zero(3);
  }
  const uint8_t* a1 = a + kTileRows * lda;
  for (int64_t s = 0; s < nfull; ++s) {
    const int8_t* bs = b + s * kTileBytes;
    if (s + kPrefetchSteps < nfull) {
      // the weights stream from memory when few rows share them
      const char* pb = reinterpret_cast<const char*>(bs + kPrefetchSteps * kTileBytes);
      for (int64_t line = 0; line < kTileBytes; line += 64) {
        _mm_prefetch(pb + line, _MM_HINT_T0);
        if (NT == 2) _mm_prefetch(pb + bstride + line, _MM_HINT_T0);
      }
    }
    const int64_t ks = koff != nullptr ? koff[s] : s * kStepK;
    PYC_AMX_STEP(a + ks, a1 + ks, lda, bs, bs + bstride);
  }
  if (tail != nullptr)
    PYC_AMX_STEP(a + nfull * kStepK, a1 + nfull * kStepK, lda, tail, tail + tstride);
  const int64_t ldc_bytes = ldc * static_cast<int64_t>(sizeof(int32_t));
  _tile_stored(0, c, ldc_bytes);
  if (NT == 2) _tile_stored(1, c + 16, ldc_bytes);
  if (MT == 2) _tile_stored(2, c + kTileRows * ldc, ldc_bytes);
  if (MT == 2 && NT == 2) _tile_stored(3, c + kTileRows * ldc + 16, ldc_bytes);
}

#undef PYC_AMX_STEP

void run_block(int mt, int nt, const uint8_t* a, int64_t lda, const int8_t* b, int64_t bstride,
               int64_t nfull, const int8_t* tail, int64_t tstride, const int32_t* init, int32_t* c,
               int64_t ldc, const int64_t* koff = nullptr) {
  if (mt == 2 && nt == 2)
    return amx_block<2, 2>(a, lda, b, bstride, nfull, tail, tstride, init, c, ldc, koff);
  if (mt == 2) return amx_block<2, 1>(a, lda, b, bstride, nfull, tail, tstride, init, c, ldc, koff);
  if (nt == 2) return amx_block<1, 2>(a, lda, b, bstride, nfull, tail, tstride, init, c, ldc, koff);
  amx_block<1, 1>(a, lda, b, bstride, nfull, tail, tstride, init, c, ldc, koff);
}

}  // namespace

void int8_gemm_packed_amx(const void* ap, const int8_t* packed, int64_t M, int64_t N, int64_t K,
                          int64_t p0, int64_t p1, const Int8Epilogue& ep, int64_t lda) {
  if (M <= 0 || p1 <= p0) return;
  const int64_t Kp = int8_round_k(K), Np = int8_round_n(N);
  const int64_t nq = Kp / 4;              // k-groups
  const int64_t nfull = nq / 16;          // whole 64-k steps
  const int64_t ntail = nq - nfull * 16;  // k-groups of the last, partial step
  const int64_t panel_bytes = Kp * kInt8PanelCols;
  const int32_t* colsum = reinterpret_cast<const int32_t*>(packed + Np * Kp);
  const int64_t rb = lda > 0 ? lda : int8_a_row_bytes(kInt8PathAmx, K);
  const uint8_t* a = static_cast<const uint8_t*>(ap);
  // rows in whole tiles; none (all rows on the VNNI kernel, which reads the same prepared A)
  // if this process may not use AMX tile data
  const int64_t m16 = request_amx_permission() ? M / kTileRows * kTileRows : 0;
  // row blocks of equal height (a multiple of 16) with at most about kRowBlockBytes of A each
  const int64_t mc_max = std::max<int64_t>(32, kRowBlockBytes / rb / 32 * 32);
  const int64_t nblocks = m16 == 0 ? 1 : (m16 + mc_max - 1) / mc_max;
  const int64_t mc = m16 == 0 ? 0 : ((m16 + nblocks - 1) / nblocks + 15) / 16 * 16;

  alignas(64) int32_t cbuf[2 * kTileRows * 32];
  alignas(64) int32_t vbuf[kMrVnni * kInt8PanelCols];
  alignas(64) int32_t init[2 * kInt8PanelCols];
  alignas(64) int8_t tail[2 * kTileBytes];
  if (ntail) std::memset(tail, 0, sizeof tail);
  const TileScope tiles(m16 > 0);

  for (int64_t bi = 0; bi < nblocks; ++bi) {
    const int64_t mc0 = std::min(m16, bi * mc), mc1 = std::min(m16, mc0 + mc);
    for (int64_t p = p0; p < p1; p += 2) {
      const int nt = p + 1 < p1 ? 2 : 1;
      const int8_t* bp = packed + p * panel_bytes;
      const int64_t n0 = p * kInt8PanelCols;
      if (mc1 > mc0) {
        for (int64_t j = 0; j < nt * kInt8PanelCols; ++j)
          init[j] = static_cast<int32_t>(0u - 128u * static_cast<uint32_t>(colsum[n0 + j]));
        if (ntail) {
          // the last k-groups of each panel, padded with zero rows to a whole tile
          for (int j = 0; j < nt; ++j)
            std::memcpy(tail + j * kTileBytes, bp + j * panel_bytes + nfull * kTileBytes,
                        static_cast<size_t>(ntail * 64));
        }
        compiler_barrier();
      }
      for (int64_t m = mc0; m < mc1; m += 2 * kTileRows) {
        const int mt = mc1 - m >= 2 * kTileRows ? 2 : 1;
        run_block(mt, nt, a + m * rb, rb, bp, panel_bytes, nfull, ntail ? tail : nullptr,
                  kTileBytes, init, cbuf, 32);
        for (int j = 0; j < nt; ++j) {
          const int64_t nj = n0 + 16 * j;
          int8_detail::epilogue_simd(ep, cbuf + 16 * j, 32, m, kTileRows * mt, nj,
                                     std::min<int64_t>(kInt8PanelCols, N - nj));
        }
      }
      if (bi + 1 < nblocks || m16 == M) continue;
      // the M % 16 rows below the last whole tile, while these panels are in cache
      const int64_t rows = M - m16, ntiles = (rows + kMrVnni - 1) / kMrVnni;
      for (int j = 0; j < nt; ++j) {
        const int64_t nj = n0 + 16 * j;
        for (int64_t ti = 0, m = m16; ti < ntiles; ++ti) {
          const int mr = static_cast<int>(rows / ntiles + (ti < rows % ntiles ? 1 : 0));
          int8_detail::tile_vnni(mr, a + m * rb, rb, bp + j * panel_bytes, colsum + nj, nq, vbuf,
                                 kInt8PanelCols);
          int8_detail::epilogue_simd(ep, vbuf, kInt8PanelCols, m, mr, nj,
                                     std::min<int64_t>(kInt8PanelCols, N - nj));
          m += mr;
        }
      }
    }
  }
}

void int8_gemm_amx_u8(const Int8AmxTiles& tiles, const uint8_t* a, int64_t lda,
                      const int8_t* packed, int64_t M, int64_t N, int64_t K, int64_t p0,
                      int64_t p1, Int8BlockFn fn, void* ctx, const int32_t* init,
                      const int64_t* koff) {
  if (M <= 0 || p1 <= p0) return;
  const int64_t Kp = int8_round_k(K);
  const int64_t nq = Kp / 4, nfull = nq / 16, ntail = nq - nfull * 16;
  const int64_t panel_bytes = Kp * kInt8PanelCols;
  const int64_t m16 = tiles.active() ? M / kTileRows * kTileRows : 0;

  // The block just computed is finished after the next one is started: the vector loads of its
  // results then do not wait on the tile stores that wrote them.
  alignas(64) int32_t cbuf[2][2 * kTileRows * 32];
  int cur = 0;
  bool pending = false;
  int64_t pm = 0, pmr = 0, pn = 0, pnc = 0;
  auto finish_pending = [&]() {
    if (pending) fn(ctx, cbuf[cur ^ 1], 32, pm, pmr, pn, pnc);
    pending = false;
  };

  if (m16 > 0) {
    // the last k-groups of every panel, each padded with zero rows to a whole weight tile
    std::vector<int8_t> tails;
    if (ntail) {
      tails.assign(static_cast<size_t>((p1 - p0) * kTileBytes), 0);
      for (int64_t p = p0; p < p1; ++p)
        std::memcpy(tails.data() + (p - p0) * kTileBytes, packed + p * panel_bytes + nfull * kTileBytes,
                    static_cast<size_t>(ntail * 64));
      compiler_barrier();
    }
    auto block = [&](int64_t m, int64_t p) {
      const int mt = m16 - m >= 2 * kTileRows ? 2 : 1;
      const int nt = p + 1 < p1 ? 2 : 1;
      const int8_t* tail = ntail ? tails.data() + (p - p0) * kTileBytes : nullptr;
      run_block(mt, nt, a + m * lda, lda, packed + p * panel_bytes, panel_bytes, nfull, tail,
                kTileBytes, init ? init + p * kInt8PanelCols : nullptr, cbuf[cur], 32, koff);
      finish_pending();
      pending = true;
      pm = m;
      pmr = kTileRows * mt;
      pn = p * kInt8PanelCols;
      pnc = std::min<int64_t>(nt * kInt8PanelCols, N - pn);
      cur ^= 1;
    };
    if ((p1 - p0) * panel_bytes <= kL1WeightBytes) {
      // the weights of all the panels stay in L1: rows outside, each row group's outputs written
      // whole
      for (int64_t m = 0; m < m16; m += 2 * kTileRows)
        for (int64_t p = p0; p < p1; p += 2) block(m, p);
    } else {
      // row blocks of at most about kRowBlockBytes, the panels' weights streaming past them
      const int64_t mc_max = std::max<int64_t>(32, kRowBlockBytes / std::max<int64_t>(lda, 64) / 32 * 32);
      for (int64_t mc0 = 0; mc0 < m16; mc0 += mc_max) {
        const int64_t mc1 = std::min(m16, mc0 + mc_max);
        for (int64_t p = p0; p < p1; p += 2)
          for (int64_t m = mc0; m < mc1; m += 2 * kTileRows) block(m, p);
      }
    }
    finish_pending();
  }
  if (m16 == M) return;
  // the rows below the last whole tile (all rows without tiles) on the VNNI kernel
  alignas(64) int32_t vbuf[kMrVnni * kInt8PanelCols];
  const int64_t rows = M - m16, ntiles = (rows + kMrVnni - 1) / kMrVnni;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t n0 = p * kInt8PanelCols, nc = std::min<int64_t>(kInt8PanelCols, N - n0);
    for (int64_t ti = 0, m = m16; ti < ntiles; ++ti) {
      const int mr = static_cast<int>(rows / ntiles + (ti < rows % ntiles ? 1 : 0));
      int8_detail::tile_vnni(mr, a + m * lda, lda, packed + p * panel_bytes, nullptr, nq, vbuf,
                             kInt8PanelCols);
      if (init)
        for (int r = 0; r < mr; ++r)
          for (int64_t j = 0; j < kInt8PanelCols; ++j)
            vbuf[r * kInt8PanelCols + j] = static_cast<int32_t>(
                static_cast<uint32_t>(vbuf[r * kInt8PanelCols + j]) + static_cast<uint32_t>(init[n0 + j]));
      fn(ctx, vbuf, kInt8PanelCols, m, mr, n0, nc);
      m += mr;
    }
  }
}

#endif  // PYC_HAVE_X86_SIMD

Int8AmxTiles::Int8AmxTiles(bool want) {
#if PYC_HAVE_X86_SIMD
  on_ = want && request_amx_permission();
  if (on_) configure_tiles();
#else
  (void)want;
#endif
}

Int8AmxTiles::~Int8AmxTiles() {
#if PYC_HAVE_X86_SIMD
  if (on_) release_tiles();
#endif
}

}  // namespace pyc
