// Keys and values of the tokens already processed, per decoder layer, for incremental decoding.
//
// Only the num_kv_heads key/value heads are stored (8 in the full model, not the 32 query heads: GQA's 4x saving),
// after RoPE, so a cached position is never recomputed. A forward pass given a cache attends to the cached
// positions plus its own tokens, which take positions cache.length() ... cache.length() + T - 1.
//
// Storage is preallocated and grows by doubling (capped at the model's context), so a decoded token writes its own
// key and value in place instead of copying the whole cache (a concatenation per token is O(T^2) copying).
#pragma once

#include <vector>

#include <torch/torch.h>

namespace omnilite {

struct LayerKV {
  torch::Tensor k;      // [B, Hkv, S, Dh] keys after RoPE of the S stored positions: a view of k_store
  torch::Tensor v;      // [B, Hkv, S, Dh] values: a view of v_store
  torch::Tensor k_store;  // [B, Hkv, capacity, Dh] storage (undefined while empty)
  torch::Tensor v_store;  // [B, Hkv, capacity, Dh]

  // Writes k_new/v_new [B, Hkv, T, Dh] after the S stored positions, growing the storage to at most max_positions
  // (or to exactly what is needed beyond it), and returns (keys, values) [B, Hkv, S + T, Dh]: views, no copy of the
  // cached positions. append = false leaves S as it was (the new positions are scratch, overwritten next time).
  std::pair<torch::Tensor, torch::Tensor> write(const torch::Tensor& k_new, const torch::Tensor& v_new,
                                                int64_t max_positions, bool append);
};

struct KVCache {
  std::vector<LayerKV> layers;  // one per decoder layer, sized on first use
  // true: the new tokens' keys and values are stored; false: they are attended to and then dropped (used to score
  // several continuations of one cached prefix, e.g. each Euler step of image generation after its prompt).
  bool append = true;

  KVCache() = default;
  // Moved, never copied: two copies would share the storage, and each one's next tokens would overwrite the other's.
  KVCache(KVCache&&) = default;
  KVCache& operator=(KVCache&&) = default;
  KVCache(const KVCache&) = delete;
  KVCache& operator=(const KVCache&) = delete;

  // Cached positions S (0 when empty).
  int64_t length() const { return layers.empty() || !layers[0].k.defined() ? 0 : layers[0].k.size(2); }
  // Bytes of the stored keys and values (what a decoded token reads).
  int64_t bytes() const {
    int64_t n = 0;
    for (const auto& l : layers)
      if (l.k.defined()) n += static_cast<int64_t>(l.k.nbytes() + l.v.nbytes());
    return n;
  }
  // Bytes allocated for keys and values (the storage's capacity).
  int64_t capacity_bytes() const {
    int64_t n = 0;
    for (const auto& l : layers)
      if (l.k_store.defined()) n += static_cast<int64_t>(l.k_store.nbytes() + l.v_store.nbytes());
    return n;
  }
};

}  // namespace omnilite
