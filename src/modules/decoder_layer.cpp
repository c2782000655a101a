#include "omnilite/modules/decoder_layer.h"

namespace omnilite {

DecoderLayerImpl::DecoderLayerImpl(const TextOptions& text, const MoEOptions& moe_opts, const LinearBuilder& builder,
                                   const std::string& path) {
  input_layernorm = register_module("input_layernorm", RMSNorm(text.hidden_size, text.rms_norm_eps));
  self_attn = register_module("self_attn", GQAttention(text, builder, join_path(path, "self_attn")));
  post_attention_layernorm =
      register_module("post_attention_layernorm", RMSNorm(text.hidden_size, text.rms_norm_eps));
  moe = register_module("moe", MoE(text.hidden_size, moe_opts, builder, join_path(path, "moe")));
}

// x: [B, T, D] -> [B, T, D]
DecoderLayerOutput DecoderLayerImpl::forward(const torch::Tensor& x, const RopeTables& rope,
                                             const torch::Tensor& allowed, bool causal, LayerKV* cache,
                                             bool append) {
  auto h = x + self_attn->forward(input_layernorm->forward(x), rope, allowed, causal, cache, append);
  auto m = moe->forward(post_attention_layernorm->forward(h));
  return {h + m.y, m.router_logits};
}

}  // namespace omnilite
