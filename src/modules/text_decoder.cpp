#include "omnilite/modules/text_decoder.h"

namespace omnilite {

TextDecoderImpl::TextDecoderImpl(const TextOptions& text, const MoEOptions& moe, const LinearBuilder& builder,
                                 const std::string& path)
    : opts(text) {
  embed_tokens = register_module("embed_tokens", TokenEmbedding(text.vocab_size, text.hidden_size));
  for (int64_t i = 0; i < text.num_layers; ++i)
    layers->push_back(DecoderLayer(text, moe, builder, join_path(path, "layers." + std::to_string(i))));
  register_module("layers", layers);
  norm = register_module("norm", RMSNorm(text.hidden_size, text.rms_norm_eps));
}

// x: [B, T, D] -> hidden [B, T, D]
TextDecoderOutput TextDecoderImpl::forward(const torch::Tensor& x, const torch::Tensor& positions,
                                           const torch::Tensor& allowed, bool causal) {
  TORCH_CHECK(x.size(1) <= opts.max_position_embeddings, "TextDecoder: sequence of ", x.size(1),
              " tokens exceeds model.text.max_position_embeddings = ", opts.max_position_embeddings,
              "; hint: shorten the input or raise the limit in the config");
  auto rope = rope_tables(positions, opts.rope_dim, opts.rope_theta, x.scalar_type());
  TextDecoderOutput out;
  auto h = x;
  for (const auto& layer : *layers) {
    auto o = layer->as<DecoderLayerImpl>()->forward(h, rope, allowed, causal);
    h = o.y;
    out.router_logits.push_back(o.router_logits);
  }
  out.hidden = norm->forward(h);
  return out;
}

}  // namespace omnilite
