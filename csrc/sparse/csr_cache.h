// Remembers which CSR index buffers (row_ptr, col_idx) already passed the structural check, so
// repeated calls with a layer's unchanged buffers skip it. Entries are keyed by the tensors'
// identity (weak references) and their version counters, so any in-place change, or a new tensor
// reusing the memory, is checked again. Binding files only (uses ATen).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <mutex>
#include <vector>

namespace pyc {

class CsrCheckCache {
 public:
  // True when (row_ptr, col_idx, K) was marked good and neither tensor changed since.
  bool known_good(const at::Tensor& rp, const at::Tensor& ci, int64_t K) {
    if (!cacheable(rp, ci)) return false;
    std::lock_guard<std::mutex> lock(mu_);
    for (auto& e : entries_) {
      auto a = e.rp.lock();
      auto b = e.ci.lock();
      if (a.get() == rp.unsafeGetTensorImpl() && b.get() == ci.unsafeGetTensorImpl() &&
          e.rp_version == rp._version() && e.ci_version == ci._version() && e.K == K)
        return true;
    }
    return false;
  }

  void mark_good(const at::Tensor& rp, const at::Tensor& ci, int64_t K) {
    if (!cacheable(rp, ci)) return;
    std::lock_guard<std::mutex> lock(mu_);
    entries_.erase(std::remove_if(entries_.begin(), entries_.end(),
                                  [](const Entry& e) { return e.rp.expired() || e.ci.expired(); }),
                   entries_.end());
    if (entries_.size() >= 256) entries_.erase(entries_.begin());
    entries_.push_back({Weak(rp.getIntrusivePtr()), Weak(ci.getIntrusivePtr()), rp._version(),
                        ci._version(), K});
  }

 private:
  using Weak = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;
  struct Entry {
    Weak rp, ci;
    int64_t rp_version, ci_version, K;
  };
  // inference tensors have no version counter: they are checked on every call
  static bool cacheable(const at::Tensor& rp, const at::Tensor& ci) {
    return !rp.is_inference() && !ci.is_inference();
  }
  std::mutex mu_;
  std::vector<Entry> entries_;
};

}  // namespace pyc
