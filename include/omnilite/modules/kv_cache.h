// Keys and values of the tokens already processed, per decoder layer, for incremental decoding.
//
// Only the num_kv_heads key/value heads are stored (8 in the full model, not the 32 query heads: GQA's 4x saving),
// after RoPE, so a cached position is never recomputed. A forward pass given a cache attends to the cached
// positions plus its own tokens, which take positions cache.length() ... cache.length() + T - 1.
#pragma once

#include <vector>

#include <torch/torch.h>

namespace omnilite {

struct LayerKV {
  torch::Tensor k;  // [B, Hkv, S, Dh] keys after RoPE (undefined while empty)
  torch::Tensor v;  // [B, Hkv, S, Dh] values
};

struct KVCache {
  std::vector<LayerKV> layers;  // one per decoder layer, sized on first use
  // true: the new tokens' keys and values are stored; false: they are attended to and then dropped (used to score
  // several continuations of one cached prefix, e.g. each Euler step of image generation after its prompt).
  bool append = true;

  // Cached positions S (0 when empty).
  int64_t length() const { return layers.empty() || !layers[0].k.defined() ? 0 : layers[0].k.size(2); }
  // Bytes held by keys and values.
  int64_t bytes() const {
    int64_t n = 0;
    for (const auto& l : layers)
      if (l.k.defined()) n += static_cast<int64_t>(l.k.nbytes() + l.v.nbytes());
    return n;
  }
};

}  // namespace omnilite
