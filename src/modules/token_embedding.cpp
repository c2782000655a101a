#include "omnilite/modules/token_embedding.h"

#include "omnilite/modules/linear.h"

namespace omnilite {

TokenEmbeddingImpl::TokenEmbeddingImpl(int64_t vocab_size, int64_t dim) {
  weight = register_parameter("weight", torch::empty({vocab_size, dim}).normal_(0.0, kInitStd));
}

// tokens: [B, T] -> [B, T, D]
torch::Tensor TokenEmbeddingImpl::forward(const torch::Tensor& tokens) {
  const int64_t V = weight.size(0);
  TORCH_CHECK(tokens.scalar_type() == torch::kInt64, "TokenEmbedding: expected int64 token ids, got ",
              tokens.scalar_type());
  if (tokens.numel() > 0) {
    const int64_t lo = tokens.min().item<int64_t>(), hi = tokens.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < V, "TokenEmbedding: token ids must lie in [0, ", V, "), got range [", lo, ", ", hi,
                "]; hint: the tokenizer's vocabulary must fit model.text.vocab_size");
  }
  return torch::embedding(weight, tokens);
}

}  // namespace omnilite
