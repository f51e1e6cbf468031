// Glue shared by the binding files (the only place where torch meets kernels).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>

#include "common/dtypes.h"

namespace pyc {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline DType to_dtype(const at::Tensor& t, const char* arg) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::F32;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default:
      TORCH_CHECK_TYPE(false, arg, " must be float32, float16 or bfloat16, got ",
                       t.scalar_type());
  }
  return DType::F32;
}

// Grain size for at::parallel_for over rows of `cols` elements: aim at ~32k
// elements per task so tiny problems stay on one thread.
inline int64_t row_grain(int64_t cols) {
  const int64_t target = 32768;
  int64_t g = cols > 0 ? target / cols : target;
  return g < 1 ? 1 : g;
}

// at::parallel_for with dynamic scheduling: fn(b, e) runs over pieces of [begin, end) of at least
// `grain` items, up to `pieces_per_thread` pieces per thread, which the threads take from a
// shared counter. A thread slowed down by anything else on its core (a busy sibling, a late
// wake-up) then does fewer pieces instead of holding up the others, as a static split would.
template <typename F>
void parallel_for_dynamic(int64_t begin, int64_t end, int64_t grain, int64_t pieces_per_thread,
                          const F& fn) {
  const int64_t range = end - begin;
  if (range <= 0) return;
  grain = std::max<int64_t>(1, grain);
  const int64_t max_pieces = (range + grain - 1) / grain;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), max_pieces);
  if (threads <= 1 || at::in_parallel_region()) {
    fn(begin, end);
    return;
  }
  const int64_t pieces = std::min<int64_t>(max_pieces, threads * std::max<int64_t>(1, pieces_per_thread));
  const int64_t size = (range + pieces - 1) / pieces;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t p = next.fetch_add(1); p * size < range; p = next.fetch_add(1))
      fn(begin + p * size, std::min(end, begin + (p + 1) * size));
  });
}

}  // namespace pyc
