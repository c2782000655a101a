// Text backbone (card layers 4 and 5): token embedding, num_layers decoder layers, final RMSNorm.
// Tensor names follow Mixtral's under the prefix "text." (text.embed_tokens, text.layers.N..., text.norm).
#pragma once

#include <memory>
#include <vector>

#include <torch/torch.h>

#include "omnilite/modules/decoder_layer.h"
#include "omnilite/modules/layer_gate.h"
#include "omnilite/modules/token_embedding.h"

namespace omnilite {

struct TextDecoderOutput {
  torch::Tensor hidden;                      // [B, T, D] after the final norm
  std::vector<torch::Tensor> router_logits;  // num_layers x [B*T, E]
};

struct TextDecoderImpl : torch::nn::Module {
  TextDecoderImpl(const TextOptions& text, const MoEOptions& moe, const LinearBuilder& builder,
                  const std::string& path);
  // x: [B, T, D] input embeddings, positions: [T] or [B, T] int64, allowed/causal as attention_core -> hidden [B, T, D]
  // With `cache` (inference; not with activation checkpointing), x continues the cached positions.
  TextDecoderOutput forward(const torch::Tensor& x, const torch::Tensor& positions, const torch::Tensor& allowed,
                            bool causal, KVCache* cache = nullptr);

  TextOptions opts;
  // Activation checkpointing: when true and gradients are on, each layer keeps only its input and recomputes its
  // activations in backward (memory O(layers) hidden states instead of every intermediate, ~1/3 more compute).
  bool checkpoint_layers = false;
  // ZeRO-3 (train.zero = 3): the layers' parameters are gathered around each use (see layer_gate.h); null otherwise.
  std::shared_ptr<LayerGate> gate;
  TokenEmbedding embed_tokens{nullptr};  // [V, D]
  torch::nn::ModuleList layers;          // num_layers DecoderLayer
  RMSNorm norm{nullptr};                 // final norm
};
TORCH_MODULE(TextDecoder);

}  // namespace omnilite
