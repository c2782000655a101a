#include "omnilite/modules/attention.h"

#include <limits>
#include <optional>
#include <tuple>

#include <torch/version.h>

#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 5)
#define OMNILITE_HAS_SDPA_GQA 1
#else
#define OMNILITE_HAS_SDPA_GQA 0
#endif

namespace omnilite {
namespace {

// Combined bool mask [B or 1, 1, T, S] from `allowed` and the causal rule, or undefined if neither applies.
torch::Tensor combined_mask(const torch::Tensor& allowed, bool causal, int64_t T, int64_t S, torch::Device dev) {
  torch::Tensor mask = allowed;
  if (causal && T > 1) {  // one query (decoding) sees every key
    // query i (of T, aligned to the last T keys) may see key j when j <= i + (S - T)
    auto tri = torch::ones({T, S}, torch::TensorOptions().dtype(torch::kBool).device(dev)).tril(S - T);
    mask = mask.defined() ? (mask & tri) : tri.view({1, 1, T, S});
  }
  return mask;
}

void check_shapes(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attention: expected 4-d q/k/v, got ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k.sizes() == v.sizes(), "attention: k ", k.sizes(), " and v ", v.sizes(), " must match");
  TORCH_CHECK(q.size(1) % k.size(1) == 0, "attention: ", k.size(1), " KV heads must divide ", q.size(1),
              " query heads");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(3) == k.size(3), "attention: q ", q.sizes(), " vs k ", k.sizes());
}

}  // namespace

// q: [B, H, T, Dh], k/v: [B, Hkv, S, Dh] -> [B, H, T, Dh]
torch::Tensor attention_core(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                             const torch::Tensor& allowed, bool causal) {
  check_shapes(q, k, v);
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), Dh = q.size(3);
  const int64_t Hkv = k.size(1), S = k.size(2), G = H / Hkv;
#if OMNILITE_HAS_SDPA_GQA
  if (q.scalar_type() != torch::kFloat64) {
    if (!allowed.defined() && causal && T == S)
      return at::scaled_dot_product_attention(q, k, v, std::nullopt, 0.0, /*is_causal=*/true, std::nullopt,
                                              /*enable_gqa=*/true);
    auto mask = combined_mask(allowed, causal, T, S, q.device());
    std::optional<torch::Tensor> opt_mask;
    if (mask.defined()) opt_mask = mask;
    return at::scaled_dot_product_attention(q, k, v, opt_mask, 0.0, /*is_causal=*/false, std::nullopt,
                                            /*enable_gqa=*/true);
  }
#endif
  // The [.., T, S] tensors dominate on CPU: the scale goes on q (T x Dh values, not T x S) and the mask is added in
  // place as 0 / -inf, so scores, probabilities and the output are the only T x S allocations.
  const double scale = 1.0 / std::sqrt(static_cast<double>(Dh));
  auto qg = (q * scale).reshape({B, Hkv, G * T, Dh});              // group g of KV head j: rows g*T .. g*T+T-1
  auto scores = torch::matmul(qg, k.transpose(-1, -2));            // [B, Hkv, G*T, S]
  scores = scores.view({B, Hkv, G, T, S});
  auto mask = combined_mask(allowed, causal, T, S, q.device());
  if (mask.defined()) {
    auto bias = torch::zeros(mask.sizes(), q.options()).masked_fill_(mask.logical_not(),
                                                                     -std::numeric_limits<double>::infinity());
    scores.add_(bias.unsqueeze(1));  // [B|1, 1, 1, T, S] broadcast over heads and groups
  }
  const auto acc = q.scalar_type() == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
  auto probs = torch::softmax(scores.to(acc), -1).to(q.scalar_type());  // [B, Hkv, G, T, S]
  auto out = torch::matmul(probs.view({B, Hkv, G * T, S}), v);          // [B, Hkv, G*T, Dh]
  return out.view({B, H, T, Dh});
}

// Plain reference: K/V repeated to H heads, masked softmax.
torch::Tensor attention_reference(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                  const torch::Tensor& allowed, bool causal) {
  check_shapes(q, k, v);
  const int64_t H = q.size(1), T = q.size(2), S = k.size(2), Hkv = k.size(1);
  auto kr = k.repeat_interleave(H / Hkv, 1);  // [B, H, S, Dh]
  auto vr = v.repeat_interleave(H / Hkv, 1);
  auto scores = torch::matmul(q, kr.transpose(-1, -2)) / std::sqrt(static_cast<double>(q.size(3)));
  auto mask = combined_mask(allowed, causal, T, S, q.device());
  if (mask.defined()) scores = scores.masked_fill(mask.logical_not(), -std::numeric_limits<double>::infinity());
  return torch::matmul(torch::softmax(scores, -1), vr);
}

GQAttentionImpl::GQAttentionImpl(const TextOptions& o, const LinearBuilder& builder, const std::string& path)
    : opts(o) {
  const int64_t D = o.hidden_size, Dh = o.head_dim;
  q_proj = register_module("q_proj", builder.make(join_path(path, "q_proj"), D, o.num_heads * Dh, false));
  k_proj = register_module("k_proj", builder.make(join_path(path, "k_proj"), D, o.num_kv_heads * Dh, false));
  v_proj = register_module("v_proj", builder.make(join_path(path, "v_proj"), D, o.num_kv_heads * Dh, false));
  o_proj = register_module("o_proj", builder.make(join_path(path, "o_proj"), o.num_heads * Dh, D, false));
}

// x: [B, T, D] -> [B, T, D]
torch::Tensor GQAttentionImpl::forward(const torch::Tensor& x, const RopeTables& rope, const torch::Tensor& allowed,
                                       bool causal, LayerKV* cache, bool append) {
  const int64_t B = x.size(0), T = x.size(1), Dh = opts.head_dim;
  auto q = q_proj->forward(x).view({B, T, opts.num_heads, Dh}).transpose(1, 2);     // [B, H, T, Dh]
  auto k = k_proj->forward(x).view({B, T, opts.num_kv_heads, Dh}).transpose(1, 2);  // [B, Hkv, T, Dh]
  auto v = v_proj->forward(x).view({B, T, opts.num_kv_heads, Dh}).transpose(1, 2);  // [B, Hkv, T, Dh]
  q = apply_rope(q, rope);
  k = apply_rope(k, rope);
  if (cache) std::tie(k, v) = cache->write(k, v, opts.max_position_embeddings, append);  // [B, Hkv, S, Dh]
  auto out = attention_core(q, k, v, allowed, causal);                            // [B, H, T, Dh]
  return o_proj->forward(out.transpose(1, 2).reshape({B, T, opts.num_heads * Dh}));  // [B, T, D]
}

}  // namespace omnilite
