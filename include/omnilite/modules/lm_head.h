// Causal-LM head: hidden -> vocabulary logits (card: Linear 2048 -> 32000). Untied by default; when
// tie_word_embeddings is set it reads the token embedding's table and owns no parameter.
#pragma once

#include <torch/torch.h>

#include "omnilite/modules/linear.h"
#include "omnilite/modules/token_embedding.h"

namespace omnilite {

struct LMHeadImpl : torch::nn::Module {
  // tied: the embedding whose table is shared, or an empty holder for an own weight [V, D].
  LMHeadImpl(int64_t dim, int64_t vocab_size, TokenEmbedding tied);
  // h: [B, T, D] -> [B, T, V]
  torch::Tensor forward(const torch::Tensor& h);
  // Inference on the CPU: when the own fp32 weight holds bf16 values only (a bf16 checkpoint loaded into fp32, as
  // a QLoRA base is), keep it in bf16: a decoded token reads half the bytes, and every product is the float32 one
  // (the bf16 values widen exactly, quant/gemv.h). Returns whether it did. Not for training: the parameter's dtype
  // changes.
  bool store_bf16_if_exact();
  // The [V, D] matrix the logits are computed with: the own weight, or the tied embedding's table.
  const torch::Tensor& table() const { return tied ? tied->weight : weight; }

  torch::Tensor weight;     // [V, D] own parameter, undefined when tied
  TokenEmbedding tied{nullptr};  // embedding shared when tie_word_embeddings
};
TORCH_MODULE(LMHead);

}  // namespace omnilite
