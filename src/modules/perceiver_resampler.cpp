#include "omnilite/modules/perceiver_resampler.h"

#include "omnilite/modules/attention.h"
#include "omnilite/modules/recompute.h"
#include "omnilite/modules/vision_encoder.h"

namespace omnilite {

PerceiverAttentionImpl::PerceiverAttentionImpl(int64_t dim, const ResamplerOptions& o, const LinearBuilder& builder,
                                               const std::string& path)
    : num_heads(o.num_heads) {
  norm_media = register_module("norm_media", make_layer_norm(dim, o.norm_eps));
  norm_latents = register_module("norm_latents", make_layer_norm(dim, o.norm_eps));
  to_q = register_module("to_q", builder.make(join_path(path, "to_q"), dim, dim, false));
  to_kv = register_module("to_kv", builder.make(join_path(path, "to_kv"), dim, 2 * dim, false));
  to_out = register_module("to_out", builder.make(join_path(path, "to_out"), dim, dim, false));
}

// media: [N, P, D], latents: [N, L, D] -> [N, L, D]
torch::Tensor PerceiverAttentionImpl::forward(const torch::Tensor& media, const torch::Tensor& latents) {
  const int64_t N = latents.size(0), L = latents.size(1), D = latents.size(2), Dh = D / num_heads;
  auto lat = norm_latents->forward(latents);
  auto kv_in = torch::cat({norm_media->forward(media), lat}, 1);  // [N, P+L, D]
  const int64_t S = kv_in.size(1);
  auto q = to_q->forward(lat).view({N, L, num_heads, Dh}).transpose(1, 2);              // [N, h, L, Dh]
  auto kv = to_kv->forward(kv_in).view({N, S, 2, num_heads, Dh}).permute({2, 0, 3, 1, 4});  // [2, N, h, S, Dh]
  auto a = attention_core(q, kv[0], kv[1], torch::Tensor(), /*causal=*/false);         // [N, h, L, Dh]
  return to_out->forward(a.transpose(1, 2).reshape({N, L, D}));
}

ResamplerFeedForwardImpl::ResamplerFeedForwardImpl(int64_t dim, const ResamplerOptions& o,
                                                   const LinearBuilder& builder, const std::string& path) {
  norm = register_module("norm", make_layer_norm(dim, o.norm_eps));
  fc1 = register_module("fc1", builder.make(join_path(path, "fc1"), dim, o.ff_mult * dim, false));
  fc2 = register_module("fc2", builder.make(join_path(path, "fc2"), o.ff_mult * dim, dim, false));
}

// x: [N, L, D] -> [N, L, D]
torch::Tensor ResamplerFeedForwardImpl::forward(const torch::Tensor& x) {
  return fc2->forward(torch::gelu(fc1->forward(norm->forward(x))));
}

PerceiverResamplerImpl::PerceiverResamplerImpl(int64_t vision_width, int64_t dim, const ResamplerOptions& o,
                                               const LinearBuilder& builder, const std::string& path) {
  proj_in = register_module("proj_in", builder.make(join_path(path, "proj_in"), vision_width, dim, true));
  latents = register_parameter("latents", torch::empty({o.num_latents, dim}).normal_(0.0, kInitStd));
  for (int64_t i = 0; i < o.depth; ++i) {
    attn_layers->push_back(PerceiverAttention(dim, o, builder, join_path(path, "attn_layers." + std::to_string(i))));
    ff_layers->push_back(ResamplerFeedForward(dim, o, builder, join_path(path, "ff_layers." + std::to_string(i))));
  }
  register_module("attn_layers", attn_layers);
  register_module("ff_layers", ff_layers);
  norm = register_module("norm", make_layer_norm(dim, o.norm_eps));
}

// features: [N, P, Wv] -> [N, L, D]
torch::Tensor PerceiverResamplerImpl::forward(const torch::Tensor& features) {
  auto media = proj_in->forward(features);                                      // [N, P, D]
  auto x = latents.unsqueeze(0).expand({media.size(0), -1, -1}).to(media.scalar_type());  // [N, L, D]
  for (size_t i = 0; i < attn_layers->size(); ++i) {
    auto* attn = attn_layers[i]->as<PerceiverAttentionImpl>();
    auto* ff = ff_layers[i]->as<ResamplerFeedForwardImpl>();
    x = x + (attn_gate ? gated_forward<PerceiverAttentionImpl, 2>(attn, *attn_gate, i, media, x, is_training())
                       : attn->forward(media, x));
    x = x + (ff_gate ? gated_forward<ResamplerFeedForwardImpl, 1>(ff, *ff_gate, i, x, torch::Tensor(), is_training())
                     : ff->forward(x));
  }
  return norm->forward(x);
}

}  // namespace omnilite
