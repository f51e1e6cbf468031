// Switch and accounting of SparseLinear's M == 1 layouts (SellLayout on AVX2, ChunkedLayout on
// AVX-512 CPUs; see sparse.h): a copy of each layer's kept weights, built once per layer, about
// as large as the layer's CSR arrays. On by default; the environment variable
// PYCOMPRESS_SPARSE_DECODE_LAYOUT=0 sets the initial state to off.
#pragma once

#include <cstdint>
#include <tuple>
#include <utility>

namespace pyc {

bool sparse_decode_layout_enabled();
// Returns the previous state. Turning it off also drops the layouts held.
bool set_sparse_decode_layout(bool enabled);
// Number of layouts held for live layers, their total bytes, and how many of them are chunked
// (AVX-512) layouts (one pass over the cache).
std::tuple<int64_t, int64_t, int64_t> sparse_decode_layout_usage();
void clear_sparse_decode_layouts();

}  // namespace pyc
