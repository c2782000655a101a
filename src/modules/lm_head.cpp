#include "omnilite/modules/lm_head.h"

namespace omnilite {

LMHeadImpl::LMHeadImpl(int64_t dim, int64_t vocab_size, TokenEmbedding tied_embedding) : tied(tied_embedding) {
  if (!tied) weight = register_parameter("weight", torch::empty({vocab_size, dim}).normal_(0.0, kInitStd));
}

// h: [B, T, D] -> [B, T, V]
torch::Tensor LMHeadImpl::forward(const torch::Tensor& h) {
  return torch::nn::functional::linear(h, tied ? tied->weight : weight);
}

}  // namespace omnilite
