// Caches of the CSR binding, keyed by tensor identity and version counters.
//
// CsrCheckCache remembers which CSR index buffers (row_ptr, col_idx) already passed the structural check, so
// repeated calls with a layer's unchanged buffers skip it. Entries are keyed by the tensors'
// identity (weak references) and their version counters, so any in-place change, or a new tensor
// reusing the memory, is checked again. Binding files only (uses ATen).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

#include "sparse/sparse.h"

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

// The M == 1 sliced copy (SellLayout) of each layer's CSR weight, built on the layer's second
// single-token call (the first one checks the buffers) and dropped when any of row_ptr, col_idx
// or values dies or changes in place. It costs about as much memory again as the CSR arrays;
// see sparse/decode_layout.h for the switch and the accounting.
class SellCache {
 public:
  // The layout of (row_ptr, col_idx, values, K), built now when missing or stale; nullptr for
  // inference tensors (no version counter to tell a change).
  std::shared_ptr<const SellLayout> get(const at::Tensor& rp, const at::Tensor& ci,
                                        const at::Tensor& v, int64_t K) {
    if (rp.is_inference() || ci.is_inference() || v.is_inference()) return nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto& e : entries_)
        if (matches(e, rp, ci, v, K)) return e.layout;
    }
    auto layout = std::make_shared<SellLayout>();
    const at::Tensor rpc = rp.contiguous(), cic = ci.contiguous(), vc = v.contiguous();
    sell_pack_cpu(rpc.data_ptr<int32_t>(), cic.data_ptr(), cic.scalar_type() == at::kShort,
                  vc.data_ptr<float>(), rp.size(0) - 1, K, *layout);
    std::lock_guard<std::mutex> lock(mu_);
    // drop entries whose tensors died, and the stale entry of these tensors
    entries_.erase(std::remove_if(entries_.begin(), entries_.end(),
                                  [&](const Entry& e) {
                                    auto a = e.rp.lock();
                                    auto b = e.ci.lock();
                                    auto c = e.v.lock();
                                    return !a || !b || !c ||
                                           (a.get() == rp.unsafeGetTensorImpl() &&
                                            b.get() == ci.unsafeGetTensorImpl() &&
                                            c.get() == v.unsafeGetTensorImpl());
                                  }),
                   entries_.end());
    entries_.push_back({Weak(rp.getIntrusivePtr()), Weak(ci.getIntrusivePtr()),
                        Weak(v.getIntrusivePtr()), rp._version(), ci._version(), v._version(), K,
                        layout});
    return layout;
  }

  // Layouts held for live layers (dead entries are dropped first) and their bytes.
  std::pair<int64_t, int64_t> usage() {
    std::lock_guard<std::mutex> lock(mu_);
    prune_dead();
    int64_t bytes = 0;
    for (auto& e : entries_) bytes += e.layout->bytes();
    return {static_cast<int64_t>(entries_.size()), bytes};
  }

  void clear() {
    std::lock_guard<std::mutex> lock(mu_);
    entries_.clear();
  }

 private:
  using Weak = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;
  struct Entry {
    Weak rp, ci, v;
    int64_t rp_version, ci_version, v_version, K;
    std::shared_ptr<const SellLayout> layout;
  };
  void prune_dead() {
    entries_.erase(std::remove_if(entries_.begin(), entries_.end(),
                                  [](const Entry& e) {
                                    return e.rp.expired() || e.ci.expired() || e.v.expired();
                                  }),
                   entries_.end());
  }
  static bool matches(Entry& e, const at::Tensor& rp, const at::Tensor& ci, const at::Tensor& v,
                      int64_t K) {
    auto a = e.rp.lock();
    auto b = e.ci.lock();
    auto c = e.v.lock();
    return a.get() == rp.unsafeGetTensorImpl() && b.get() == ci.unsafeGetTensorImpl() &&
           c.get() == v.unsafeGetTensorImpl() && e.rp_version == rp._version() &&
           e.ci_version == ci._version() && e.v_version == v._version() && e.K == K;
  }
  std::mutex mu_;
  std::vector<Entry> entries_;
};

}  // namespace pyc
