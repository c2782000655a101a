#include "omnilite/modules/lm_head.h"

#include <vector>

#include "omnilite/quant/bf16_gemv.h"

namespace omnilite {

LMHeadImpl::LMHeadImpl(int64_t dim, int64_t vocab_size, TokenEmbedding tied_embedding) : tied(tied_embedding) {
  if (!tied) weight = register_parameter("weight", torch::empty({vocab_size, dim}).normal_(0.0, kInitStd));
}

// h: [B, T, D] -> [B, T, V]
torch::Tensor LMHeadImpl::forward(const torch::Tensor& h) {
  const auto& w = tied ? tied->weight : weight;
  // One row (batch-1 decoding) on the CPU: a matrix-vector product reads the [V, D] weight once; the GEMM path
  // of the CPU BLAS first packs (copies) all of it.
  if (h.numel() == h.size(-1) && h.device().is_cpu()) {
    std::vector<int64_t> shape(h.sizes().begin(), h.sizes().end());
    shape.back() = w.size(0);
    if (h.scalar_type() == torch::kFloat32 && w.scalar_type() == torch::kFloat32)
      return torch::mv(w, h.reshape({-1})).view(shape);
    if (h.scalar_type() == torch::kBFloat16 && w.scalar_type() == torch::kBFloat16 && w.is_contiguous() &&
        !torch::GradMode::is_enabled())
      return quant::bf16_matvec_cpu(h, w).view(shape);  // bf16 weights: quant/bf16_gemv.h
  }
  return torch::nn::functional::linear(h, w);
}

}  // namespace omnilite
