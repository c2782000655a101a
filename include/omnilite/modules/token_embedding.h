// Token embedding table (the card's "Linear 32000 -> 2048": a one-hot Linear is a table lookup).
#pragma once

#include <torch/torch.h>

namespace omnilite {

struct TokenEmbeddingImpl : torch::nn::Module {
  TokenEmbeddingImpl(int64_t vocab_size, int64_t dim);
  // tokens: [B, T] int64 -> [B, T, D]
  torch::Tensor forward(const torch::Tensor& tokens);

  torch::Tensor weight;  // [vocab_size, D], normal(0, 0.02)
};
TORCH_MODULE(TokenEmbedding);

}  // namespace omnilite
