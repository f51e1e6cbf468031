// Sparse masked linear — torch-free CPU kernel API.
//
// Compressed format of SparseLinear (CSR over output rows):
//   row_ptr [N + 1] int32    kept weights of output row n are entries row_ptr[n] .. row_ptr[n+1)
//   col_idx [nnz]   int16 (K <= 32768) or int32 (larger K): input column of each entry
//   values  [nnz]   fp32
// y[m, n] = bias[n] + sum_{p in row n} values[p] * x[m, col_idx[p]]
//
// Small M (M == 1) uses a gather kernel along the row's kept weights. M >= 2 works on a
// transposed, zero-padded copy of the activations xT [K, Mp] (Mp = csr_padded_m(isa, M)) and
// writes y [M, N] directly: every kept weight is one broadcast and Mp/8 (AVX2) or Mp/16
// (AVX-512) fused multiply-adds along the dense dimension.
//
// MaskedLinear kernels (fp32, row-major, unit column stride):
//   forward      y[m, n]   = bias[n] + sum_k x[m, k] * (mask[n, k] ? w[n, k] : 0)
//   grad_input   gx[m, k]  = sum_n g[m, n] * (mask[n, k] ? w[n, k] : 0)
//   grad_weight  gw[n, k]  = mask[n, k] ? sum_m g[m, n] * x[m, k] : 0
// The mask (one byte per weight, 0 or 1) is applied in registers; no masked copy of the
// weight is written.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <new>
#include <vector>

#include "common/cpu_features.h"

namespace pyc {

// Padded size Mp of the dense dimension the M >= 2 kernel expects for `isa` and M tokens (a
// multiple of 8; of 16 where the AVX-512 kernel runs).
int64_t csr_padded_m(CpuIsa isa, int64_t M);

// M == 1: y[n] for rows n in [n0, n1). idx16 selects int16 (true) or int32 column indices.
void csr_gemv_cpu(CpuIsa isa, const float* x, const int32_t* row_ptr, const void* col_idx,
                  bool idx16, const float* values, const float* bias, float* y, int64_t n0,
                  int64_t n1);

// Row-sliced copy of a CSR weight for M == 1 (SELL-8). Within each window of kSellWindow
// consecutive rows, rows are sorted by their number of kept weights (descending, stable) and cut
// into slices of 8 (windows keep each task's outputs in one stretch of y: no cache line of y is
// written by two threads when tasks are whole windows); slice s stores its steps column-major:
// entry (j, l) at slice_off[s] + 8 * j + l is the j-th kept weight of lane l's row. Lanes shorter
// than the slice's longest row are padded with value 0 and index K, which points at a zero the
// caller appends to x (x_pad[K] == 0), so padding never multiplies an input value (an inf or
// NaN in x reaches exactly the rows that keep its column, as with CSR). Each step is one 8-wide
// fused multiply-add with no per-row tails or horizontal sums; with the rows sorted, padding is
// a fraction of a percent.
// Allocator of 64-byte aligned arrays (whole-vector loads never straddle cache lines).
template <typename T>
struct Aligned64 {
  using value_type = T;
  Aligned64() = default;
  template <typename U>
  Aligned64(const Aligned64<U>&) {}
  T* allocate(size_t n) {
    void* p = std::aligned_alloc(64, (n * sizeof(T) + 63) / 64 * 64);
    if (!p) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) { std::free(p); }
  template <typename U>
  bool operator==(const Aligned64<U>&) const { return true; }
  template <typename U>
  bool operator!=(const Aligned64<U>&) const { return false; }
};

constexpr int64_t kSellWindow = 256;  // rows; a multiple of 8

struct SellLayout {
  int64_t n_slices = 0;
  bool idx16 = true;                // int16 indices when K < 32768, else int32
  std::vector<int64_t> slice_off;   // [n_slices + 1] entry offsets (multiples of 8)
  std::vector<int32_t> row_of;      // [8 * n_slices] output row of each lane, -1 past N
  std::vector<int16_t, Aligned64<int16_t>> idx16v;  // [slice_off[n_slices]] when idx16
  std::vector<int32_t, Aligned64<int32_t>> idx32v;  // [slice_off[n_slices]] otherwise
  std::vector<float, Aligned64<float>> vals;        // [slice_off[n_slices]]
  int64_t bytes() const;
};

// Column-chunked copy of a CSR weight for M == 1 on AVX-512 CPUs. Rows are cut into slices of
// 16 (row n = 16 s + l, lane l) and columns into chunks of kChunkCols = 31. Each (slice, chunk)
// holds `steps` entries per lane, entry j of lane l being the j-th kept weight of row 16 s + l
// among the chunk's columns: its value, and its column within the chunk as one byte (31 for
// padding). A step is one 16-lane permute of the chunk's 31 inputs (held in two registers, lane
// 31 zero, which padding selects) and one fused multiply-add: no loads of single inputs, which
// bound SELL's speed. Kept weights past `steps` in their row and chunk go to `rest`, a SELL-8
// layout over the chunk-padded input (see chunked_pad_x), added afterwards. `steps` minimizes a
// cost model measured on Zen 4 (a step streams 80 bytes at about 32 bytes per cycle; SELL takes
// about 0.75 cycles per kept weight); steps == 0 means the layout would not beat SELL alone.
constexpr int64_t kChunkCols = 31;

struct ChunkedLayout {
  int64_t n_rows = 0;
  int64_t n_slices = 0;  // 16-row slices
  int64_t n_chunks = 0;  // 31-column chunks
  int64_t steps = 0;     // entries per lane per (slice, chunk); 0: not built
  std::vector<uint8_t, Aligned64<uint8_t>> idx;  // [n_slices][n_chunks][steps][16]
  std::vector<float, Aligned64<float>> vals;     // same shape
  SellLayout rest;  // the remaining kept weights, indices into the chunk-padded input
                    // (n_slices == 0 when there are none)
  int64_t bytes() const;
};

// Builds `out` (or leaves out.steps == 0) from CSR arrays already checked.
void chunked_pack_cpu(const int32_t* row_ptr, const void* col_idx, bool idx16, const float* values,
                      int64_t N, int64_t K, ChunkedLayout& out);

// Non-owning views of the layouts, as the M == 1 kernels read them: over a SellLayout /
// ChunkedLayout (view_of), or over the packed byte form of a layer's layout (see
// "Packed decode layout" below).
struct SellView {
  int64_t n_slices = 0;
  bool idx16 = true;
  const int64_t* slice_off = nullptr;  // [n_slices + 1]
  const int32_t* row_of = nullptr;     // [8 * n_slices]
  const void* idx = nullptr;           // int16 (idx16) or int32 [slice_off[n_slices]]
  const float* vals = nullptr;         // [slice_off[n_slices]]
};

struct ChunkedView {
  int64_t n_rows = 0, n_slices = 0, n_chunks = 0, steps = 0;
  const uint8_t* idx = nullptr;  // 64-byte aligned
  const float* vals = nullptr;   // 64-byte aligned
  SellView rest;
};

SellView view_of(const SellLayout& L);
ChunkedView view_of(const ChunkedLayout& L);

// Floats of the chunk-padded input: 32 per chunk and 16 zeros (the padding of `rest`).
inline int64_t chunked_x_size(int64_t n_chunks) { return 32 * n_chunks + 16; }
inline int64_t chunked_x_size(const ChunkedLayout& L) { return chunked_x_size(L.n_chunks); }

// xq[32 c + i] = x[31 c + i] for i < 31 and 31 c + i < K, zero elsewhere.
void chunked_pad_x(const float* x, int64_t K, int64_t n_chunks, float* xq);
inline void chunked_pad_x(const float* x, int64_t K, const ChunkedLayout& L, float* xq) {
  chunked_pad_x(x, K, L.n_chunks, xq);
}

// M == 1 on the chunked layout: rows of the 256-row windows [w0, w1) (as SellLayout's windows),
// from xq (64-byte aligned, chunked_x_size floats).
void chunked_gemv_cpu(CpuIsa isa, const float* xq, const ChunkedView& L, const float* bias,
                      float* y, int64_t w0, int64_t w1);
inline void chunked_gemv_cpu(CpuIsa isa, const float* xq, const ChunkedLayout& L,
                             const float* bias, float* y, int64_t w0, int64_t w1) {
  chunked_gemv_cpu(isa, xq, view_of(L), bias, y, w0, w1);
}

// Builds `out` from CSR arrays already checked (row_ptr non-decreasing, indices in [0, K)).
void sell_pack_cpu(const int32_t* row_ptr, const void* col_idx, bool idx16, const float* values,
                   int64_t N, int64_t K, SellLayout& out);

// M == 1 on the sliced layout: y[row_of[8 s + l]] for slices s in [s0, s1). x_pad has K + 1
// entries with x_pad[K] == 0.
void sell_gemv_cpu(CpuIsa isa, const float* x_pad, const SellView& L, const float* bias,
                   float* y, int64_t s0, int64_t s1);
inline void sell_gemv_cpu(CpuIsa isa, const float* x_pad, const SellLayout& L, const float* bias,
                          float* y, int64_t s0, int64_t s1) {
  sell_gemv_cpu(isa, x_pad, view_of(L), bias, y, s0, s1);
}

// ---------------------------------------------------------------- Packed decode layout
// A layer's M == 1 layout as one flat, 64-byte aligned byte buffer (the tensor that
// torch.ops.pycompress.sparse_decode_layout returns and SparseLinear keeps as a buffer): a
// header of int64 fields, then the sections of the layout, each at a 64-byte aligned offset.
//   kind Checked: the header only (the CSR arrays were checked; no single-row copy)
//   kind Sliced:  SELL-8 sections (slice_off, row_of, idx, vals)
//   kind Chunked: chunk sections (idx, vals), then the SELL-8 sections of its rest (if any)
// csr_data / csr_version record the CSR arrays the layout was built from (filled in by the
// torch glue); a reader uses the layout only for those very arrays, unchanged.
enum DecodeKind : int64_t { kDecodeChecked = 0, kDecodeSliced = 1, kDecodeChunked = 2 };

struct DecodeLayoutHeader {
  int64_t magic = 0;
  int64_t kind = kDecodeChecked;
  int64_t bytes = 0;  // size of the whole buffer
  int64_t n_rows = 0, in_features = 0, nnz = 0;
  int64_t csr_data[3] = {0, 0, 0};     // addresses of row_ptr, col_idx, values
  int64_t csr_version[3] = {0, 0, 0};  // their version counters
  // chunked sections
  int64_t c_slices = 0, c_chunks = 0, c_steps = 0, c_idx_off = 0, c_vals_off = 0;
  // SELL-8 sections (the layout of kind Sliced, or the rest of kind Chunked; s_slices == 0: none)
  int64_t s_slices = 0, s_idx16 = 1, s_entries = 0, s_off_off = 0, s_row_off = 0, s_idx_off = 0,
          s_vals_off = 0;
  int64_t reserved[8] = {};
};
constexpr int64_t kDecodeLayoutMagic = 0x3174796c44435950;  // "PYCDlyt1"
static_assert(sizeof(DecodeLayoutHeader) % 64 == 0, "sections start 64-byte aligned");

// Size in bytes of the packed form of `chunked` (when chunked->steps > 0) or `sell` (when
// given), or of the header alone; fills the header's kind, sizes and section offsets.
int64_t decode_layout_plan(const ChunkedLayout* chunked, const SellLayout* sell, int64_t N,
                           int64_t K, int64_t nnz, DecodeLayoutHeader& h);
// Writes the planned header and sections into `out` (64-byte aligned, h.bytes bytes).
void decode_layout_write(const DecodeLayoutHeader& h, const ChunkedLayout* chunked,
                         const SellLayout* sell, uint8_t* out);
// Reads a packed layout of `size` bytes at `p` (64-byte aligned): its header and views of its
// sections. Returns nullptr when the buffer is a well-formed layout, else what is wrong. Checks
// the header and the section bounds (O(1)); the section contents are those decode_layout_write
// wrote.
const char* decode_layout_read(const uint8_t* p, int64_t size, DecodeLayoutHeader& h,
                               ChunkedView& chunked, SellView& sell);

// M >= 2: columns n in [n0, n1) of y [M, ldy] (row-major) from xT [K, Mp]; the Mp floats
// before xT (xT[-1]) must be zeros.
void csr_spmm_t_cpu(CpuIsa isa, const float* xT, int64_t Mp, const int32_t* row_ptr,
                    const void* col_idx, bool idx16, const float* values, const float* bias,
                    float* y, int64_t ldy, int64_t M, int64_t n0, int64_t n1);

// xT[k, m] = x[m, k] for k in [k0, k1), m < M; zero for M <= m < Mp. x has row stride ldx.
void transpose_pad_cpu(const float* x, int64_t ldx, int64_t M, int64_t Mp, float* xT, int64_t k0,
                       int64_t k1);
// The same with SIMD 8x8 blocks where `isa` allows.
void transpose_pad_cpu(CpuIsa isa, const float* x, int64_t ldx, int64_t M, int64_t Mp, float* xT,
                       int64_t k0, int64_t k1);

// Masked linear forward for output columns n in [n0, n1) (all M rows).
void masked_linear_fwd_cpu(CpuIsa isa, const float* x, const float* w, const uint8_t* mask,
                           const float* bias, float* y, int64_t M, int64_t N, int64_t K,
                           int64_t n0, int64_t n1);

// grad_input for input columns k in [k0, k1) (all M rows).
void masked_linear_grad_input_cpu(CpuIsa isa, const float* g, const float* w,
                                  const uint8_t* mask, float* gx, int64_t M, int64_t N,
                                  int64_t K, int64_t k0, int64_t k1);

// grad_weight for output rows n in [n0, n1).
void masked_linear_grad_weight_cpu(CpuIsa isa, const float* g, const float* x,
                                   const uint8_t* mask, float* gw, int64_t M, int64_t N,
                                   int64_t K, int64_t n0, int64_t n1);

}  // namespace pyc
