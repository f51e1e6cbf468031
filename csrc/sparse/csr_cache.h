// Caches of the CSR binding, keyed by tensor identity and version counters. Binding files only
// (uses ATen).
//
// Both caches hash the tensors' TensorImpl addresses, so a lookup costs the same with one layer
// or with thousands; the entry found is only used when weak references to the same tensors are
// still alive and every version counter is unchanged (a new tensor that reuses a dead one's
// address, or any in-place change, is a miss). Entries of dead tensors are swept whenever the map
// has doubled since the last sweep. Inference tensors have no version counter and are never
// cached.
//
// CsrCheckCache remembers which CSR index buffers (row_ptr, col_idx) already passed the
// structural check, so repeated calls with a layer's unchanged buffers skip it.
//
// SellCache holds the M == 1 copy (DecodeLayout) of each layer's CSR weight, built on the
// layer's second single-token call (the first one checks the buffers) and dropped when any of
// row_ptr, col_idx or values dies or changes in place. It costs about as much memory again as
// the CSR arrays; see sparse/decode_layout.h for the switch and the accounting.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cstddef>
#include <functional>
#include <memory>
#include <mutex>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

#include "sparse/sparse.h"

namespace pyc {

// Map from NT tensors (+ an int64 tag) to a Payload, valid while the tensors live unchanged.
template <size_t NT, typename Payload>
class TensorKeyedCache {
 public:
  using Tensors = std::array<const at::Tensor*, NT>;

  static bool cacheable(const Tensors& ts) {
    for (const at::Tensor* t : ts)
      if (t->is_inference()) return false;
    return true;
  }

  // The payload stored for these tensors and tag, when they are alive and unchanged.
  bool find(const Tensors& ts, int64_t tag, Payload* out) {
    if (!cacheable(ts)) return false;
    std::lock_guard<std::mutex> lock(mu_);
    auto it = map_.find(key_of(ts, tag));
    if (it == map_.end() || !valid(it->second, ts)) return false;
    if (out) *out = it->second.payload;
    return true;
  }

  void put(const Tensors& ts, int64_t tag, Payload payload) {
    if (!cacheable(ts)) return;
    Entry e;
    e.refs.reserve(NT);
    for (size_t i = 0; i < NT; ++i) {
      e.refs.emplace_back(ts[i]->getIntrusivePtr());
      e.versions[i] = ts[i]->_version();
    }
    e.payload = std::move(payload);
    std::lock_guard<std::mutex> lock(mu_);
    map_.insert_or_assign(key_of(ts, tag), std::move(e));
    if (map_.size() >= 2 * swept_size_ + 64) sweep();
  }

  // Visits the payloads of entries whose tensors are all alive (dead ones are dropped first).
  template <typename F>
  void for_each_live(F&& f) {
    std::lock_guard<std::mutex> lock(mu_);
    sweep();
    for (auto& kv : map_) f(kv.second.payload);
  }

  void clear() {
    std::lock_guard<std::mutex> lock(mu_);
    map_.clear();
    swept_size_ = 0;
  }

 private:
  using Weak = c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl>;
  struct Key {
    std::array<const void*, NT> impl;
    int64_t tag;
    bool operator==(const Key& o) const { return impl == o.impl && tag == o.tag; }
  };
  struct KeyHash {
    size_t operator()(const Key& k) const {
      size_t h = std::hash<int64_t>()(k.tag);
      for (const void* p : k.impl) h = h * 1000003u ^ std::hash<const void*>()(p);
      return h;
    }
  };
  struct Entry {
    std::vector<Weak> refs;  // NT (weak_intrusive_ptr has no default constructor)
    std::array<int64_t, NT> versions{};
    Payload payload{};
  };

  static Key key_of(const Tensors& ts, int64_t tag) {
    Key k;
    for (size_t i = 0; i < NT; ++i) k.impl[i] = ts[i]->unsafeGetTensorImpl();
    k.tag = tag;
    return k;
  }
  static bool valid(const Entry& e, const Tensors& ts) {
    for (size_t i = 0; i < NT; ++i) {
      auto alive = e.refs[i].lock();
      if (alive.get() != ts[i]->unsafeGetTensorImpl() || e.versions[i] != ts[i]->_version())
        return false;
    }
    return true;
  }
  void sweep() {
    for (auto it = map_.begin(); it != map_.end();) {
      bool dead = false;
      for (const Weak& w : it->second.refs) dead = dead || w.expired();
      it = dead ? map_.erase(it) : std::next(it);
    }
    swept_size_ = map_.size();
  }

  std::mutex mu_;
  std::unordered_map<Key, Entry, KeyHash> map_;
  size_t swept_size_ = 0;
};

class CsrCheckCache {
 public:
  // True when (row_ptr, col_idx, K) was marked good and neither tensor changed since.
  bool known_good(const at::Tensor& rp, const at::Tensor& ci, int64_t K) {
    return cache_.find({&rp, &ci}, K, nullptr);
  }
  void mark_good(const at::Tensor& rp, const at::Tensor& ci, int64_t K) {
    cache_.put({&rp, &ci}, K, true);
  }

 private:
  TensorKeyedCache<2, bool> cache_;
};

// What the M == 1 path keeps per layer: the chunked layout (AVX-512 CPUs, when its cost model
// picks it) or the sliced layout of all kept weights.
struct DecodeLayout {
  ChunkedLayout chunked;  // chunked.steps == 0: not used
  SellLayout sell;        // empty when chunked is used
  int64_t bytes() const { return chunked.bytes() + sell.bytes(); }
};

class SellCache {
 public:
  // The layout of (row_ptr, col_idx, values, K), built now when missing or stale; nullptr for
  // inference tensors (no version counter to tell a change). `chunked`: try the chunked layout
  // (AVX-512 kernels); the two kinds are cached apart.
  std::shared_ptr<const DecodeLayout> get(const at::Tensor& rp, const at::Tensor& ci,
                                          const at::Tensor& v, int64_t K, bool chunked) {
    const typename Cache::Tensors ts{&rp, &ci, &v};
    if (!Cache::cacheable(ts)) return nullptr;
    const int64_t tag = 2 * K + (chunked ? 1 : 0);
    std::shared_ptr<const DecodeLayout> layout;
    if (cache_.find(ts, tag, &layout)) return layout;
    auto built = std::make_shared<DecodeLayout>();
    const at::Tensor rpc = rp.contiguous(), cic = ci.contiguous(), vc = v.contiguous();
    const int32_t* rpp = rpc.data_ptr<int32_t>();
    const bool idx16 = cic.scalar_type() == at::kShort;
    const int64_t N = rp.size(0) - 1;
    if (chunked) chunked_pack_cpu(rpp, cic.data_ptr(), idx16, vc.data_ptr<float>(), N, K, built->chunked);
    if (built->chunked.steps == 0)
      sell_pack_cpu(rpp, cic.data_ptr(), idx16, vc.data_ptr<float>(), N, K, built->sell);
    cache_.put(ts, tag, built);
    return built;
  }

  // Layouts held for live layers, their total bytes, and how many of them are chunked.
  std::tuple<int64_t, int64_t, int64_t> usage() {
    int64_t n = 0, bytes = 0, chunked = 0;
    cache_.for_each_live([&](const std::shared_ptr<const DecodeLayout>& l) {
      ++n;
      bytes += l->bytes();
      chunked += l->chunked.steps > 0;
    });
    return {n, bytes, chunked};
  }

  void clear() { cache_.clear(); }

 private:
  using Cache = TensorKeyedCache<3, std::shared_ptr<const DecodeLayout>>;
  Cache cache_;
};

}  // namespace pyc
