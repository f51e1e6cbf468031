// Views of SparseLinear's M == 1 layouts and their packed byte form (see sparse/sparse.h).
#include <cstdint>
#include <cstring>

#include "sparse/sparse.h"

namespace pyc {

SellView view_of(const SellLayout& L) {
  SellView v;
  v.n_slices = L.n_slices;
  v.idx16 = L.idx16;
  v.slice_off = L.slice_off.data();
  v.row_of = L.row_of.data();
  v.idx = L.idx16 ? static_cast<const void*>(L.idx16v.data())
                  : static_cast<const void*>(L.idx32v.data());
  v.vals = L.vals.data();
  return v;
}

ChunkedView view_of(const ChunkedLayout& L) {
  ChunkedView v;
  v.n_rows = L.n_rows;
  v.n_slices = L.n_slices;
  v.n_chunks = L.n_chunks;
  v.steps = L.steps;
  v.idx = L.idx.data();
  v.vals = L.vals.data();
  v.rest = view_of(L.rest);
  return v;
}

namespace {

constexpr int64_t kAlign = 64;

int64_t align_up(int64_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// Places a section of `bytes` bytes at the aligned end `*end` of the buffer; returns its offset.
int64_t place(int64_t* end, int64_t bytes) {
  const int64_t off = align_up(*end);
  *end = off + bytes;
  return off;
}

void plan_sell(const SellLayout& L, DecodeLayoutHeader& h, int64_t* end) {
  h.s_slices = L.n_slices;
  h.s_idx16 = L.idx16 ? 1 : 0;
  h.s_entries = L.slice_off.empty() ? 0 : L.slice_off.back();
  h.s_off_off = place(end, 8 * (h.s_slices + 1));
  h.s_row_off = place(end, 4 * 8 * h.s_slices);
  h.s_idx_off = place(end, (L.idx16 ? 2 : 4) * h.s_entries);
  h.s_vals_off = place(end, 4 * h.s_entries);
}

void write_sell(const DecodeLayoutHeader& h, const SellLayout& L, uint8_t* out) {
  std::memcpy(out + h.s_off_off, L.slice_off.data(), 8 * static_cast<size_t>(h.s_slices + 1));
  std::memcpy(out + h.s_row_off, L.row_of.data(), 4 * 8 * static_cast<size_t>(h.s_slices));
  if (L.idx16)
    std::memcpy(out + h.s_idx_off, L.idx16v.data(), 2 * static_cast<size_t>(h.s_entries));
  else
    std::memcpy(out + h.s_idx_off, L.idx32v.data(), 4 * static_cast<size_t>(h.s_entries));
  std::memcpy(out + h.s_vals_off, L.vals.data(), 4 * static_cast<size_t>(h.s_entries));
}

// [off, off + bytes) inside [header end, size), off aligned.
bool section_ok(int64_t off, int64_t bytes, int64_t size) {
  return off >= static_cast<int64_t>(sizeof(DecodeLayoutHeader)) && off % kAlign == 0 &&
         bytes >= 0 && off <= size && bytes <= size - off;
}

// Sizes that cannot overflow the section arithmetic (a buffer holds less than 2^48 bytes).
bool count_ok(int64_t n) { return n >= 0 && n < (int64_t(1) << 44); }

const char* read_sell(const uint8_t* p, int64_t size, const DecodeLayoutHeader& h, SellView& v) {
  if (!count_ok(h.s_slices) || !count_ok(h.s_entries) || (h.s_idx16 != 0 && h.s_idx16 != 1))
    return "bad sliced section sizes";
  if (!section_ok(h.s_off_off, 8 * (h.s_slices + 1), size) ||
      !section_ok(h.s_row_off, 4 * 8 * h.s_slices, size) ||
      !section_ok(h.s_idx_off, (h.s_idx16 ? 2 : 4) * h.s_entries, size) ||
      !section_ok(h.s_vals_off, 4 * h.s_entries, size))
    return "sliced sections out of bounds";
  v.n_slices = h.s_slices;
  v.idx16 = h.s_idx16 == 1;
  v.slice_off = reinterpret_cast<const int64_t*>(p + h.s_off_off);
  v.row_of = reinterpret_cast<const int32_t*>(p + h.s_row_off);
  v.idx = p + h.s_idx_off;
  v.vals = reinterpret_cast<const float*>(p + h.s_vals_off);
  // the kernels walk slice_off: it must stay within the entries
  if (v.slice_off[0] != 0 || v.slice_off[h.s_slices] != h.s_entries)
    return "sliced offsets do not span the entries";
  return nullptr;
}

}  // namespace

int64_t decode_layout_plan(const ChunkedLayout* chunked, const SellLayout* sell, int64_t N,
                           int64_t K, int64_t nnz, DecodeLayoutHeader& h) {
  h = DecodeLayoutHeader{};
  h.magic = kDecodeLayoutMagic;
  h.n_rows = N;
  h.in_features = K;
  h.nnz = nnz;
  int64_t end = sizeof(DecodeLayoutHeader);
  if (chunked && chunked->steps > 0) {
    h.kind = kDecodeChunked;
    h.c_slices = chunked->n_slices;
    h.c_chunks = chunked->n_chunks;
    h.c_steps = chunked->steps;
    const int64_t slots = static_cast<int64_t>(chunked->vals.size());
    h.c_idx_off = place(&end, slots);
    h.c_vals_off = place(&end, 4 * slots);
    if (chunked->rest.n_slices > 0) plan_sell(chunked->rest, h, &end);
  } else if (sell) {
    h.kind = kDecodeSliced;
    plan_sell(*sell, h, &end);
  } else {
    h.kind = kDecodeChecked;
  }
  h.bytes = align_up(end);
  return h.bytes;
}

void decode_layout_write(const DecodeLayoutHeader& h, const ChunkedLayout* chunked,
                         const SellLayout* sell, uint8_t* out) {
  std::memset(out, 0, static_cast<size_t>(h.bytes));
  std::memcpy(out, &h, sizeof(h));
  if (h.kind == kDecodeChunked) {
    std::memcpy(out + h.c_idx_off, chunked->idx.data(), chunked->idx.size());
    std::memcpy(out + h.c_vals_off, chunked->vals.data(), 4 * chunked->vals.size());
    if (h.s_slices > 0) write_sell(h, chunked->rest, out);
  } else if (h.kind == kDecodeSliced) {
    write_sell(h, *sell, out);
  }
}

const char* decode_layout_read(const uint8_t* p, int64_t size, DecodeLayoutHeader& h,
                               ChunkedView& chunked, SellView& sell) {
  if (size < static_cast<int64_t>(sizeof(DecodeLayoutHeader)) ||
      reinterpret_cast<uintptr_t>(p) % kAlign != 0)
    return "too short or not 64-byte aligned";
  std::memcpy(&h, p, sizeof(h));
  if (h.magic != kDecodeLayoutMagic) return "no layout header";
  if (h.bytes != size) return "its size differs from the size it records";
  if (!count_ok(h.n_rows) || !count_ok(h.in_features) || !count_ok(h.nnz))
    return "bad sizes";
  chunked = ChunkedView{};
  sell = SellView{};
  if (h.kind == kDecodeChecked) return nullptr;
  if (h.kind == kDecodeSliced) {
    if (h.s_slices != (h.n_rows + 7) / 8) return "sliced layout of another row count";
    return read_sell(p, size, h, sell);
  }
  if (h.kind != kDecodeChunked) return "unknown kind";
  if (!count_ok(h.c_slices) || !count_ok(h.c_chunks) || h.c_steps < 1 || h.c_steps > kChunkCols ||
      h.c_slices != (h.n_rows + 15) / 16 || h.c_chunks != (h.in_features + kChunkCols - 1) / kChunkCols)
    return "chunked layout of another shape";
  int64_t slots = 0;
  if (__builtin_mul_overflow(h.c_slices, h.c_chunks, &slots) ||
      __builtin_mul_overflow(slots, h.c_steps * 16, &slots) || !count_ok(slots))
    return "chunked layout too large";
  if (!section_ok(h.c_idx_off, slots, size) || !section_ok(h.c_vals_off, 4 * slots, size))
    return "chunked sections out of bounds";
  chunked.n_rows = h.n_rows;
  chunked.n_slices = h.c_slices;
  chunked.n_chunks = h.c_chunks;
  chunked.steps = h.c_steps;
  chunked.idx = p + h.c_idx_off;
  chunked.vals = reinterpret_cast<const float*>(p + h.c_vals_off);
  if (h.s_slices > 0) {
    if (h.s_slices != (h.n_rows + 7) / 8) return "chunked rest of another row count";
    return read_sell(p, size, h, chunked.rest);
  }
  return nullptr;
}

}  // namespace pyc
