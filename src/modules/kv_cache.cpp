#include "omnilite/modules/kv_cache.h"

#include <algorithm>

namespace omnilite {

// k_new, v_new: [B, Hkv, T, Dh] -> (k, v): [B, Hkv, S + T, Dh]
std::pair<torch::Tensor, torch::Tensor> LayerKV::write(const torch::Tensor& k_new, const torch::Tensor& v_new,
                                                       int64_t max_positions, bool append) {
  const int64_t S = k.defined() ? k.size(2) : 0, T = k_new.size(2), need = S + T;
  const bool fits = k_store.defined() && k_store.size(2) >= need && k_store.size(0) == k_new.size(0) &&
                    k_store.scalar_type() == k_new.scalar_type() && k_store.device() == k_new.device();
  if (!fits) {
    // Doubling keeps a token's amortised copying O(1); the context caps it (a longer input fails in the decoder).
    const int64_t cap = std::max(need, std::min(2 * (k_store.defined() ? k_store.size(2) : 0), max_positions));
    auto sizes = k_new.sizes().vec();
    sizes[2] = cap;
    auto ks = torch::empty(sizes, k_new.options()), vs = torch::empty(sizes, v_new.options());
    if (S > 0) {
      ks.narrow(2, 0, S).copy_(k);
      vs.narrow(2, 0, S).copy_(v);
    }
    k_store = ks;
    v_store = vs;
    if (S > 0) {
      k = k_store.narrow(2, 0, S);
      v = v_store.narrow(2, 0, S);
    }
  }
  k_store.narrow(2, S, T).copy_(k_new);
  v_store.narrow(2, S, T).copy_(v_new);
  auto keys = k_store.narrow(2, 0, need), values = v_store.narrow(2, 0, need);
  if (append) {
    k = keys;
    v = values;
  }
  return {keys, values};
}

}  // namespace omnilite
