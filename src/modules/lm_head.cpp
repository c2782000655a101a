#include "omnilite/modules/lm_head.h"

#include <algorithm>
#include <vector>

#include "omnilite/quant/gemm.h"
#include "omnilite/quant/gemv.h"

namespace omnilite {
LMHeadImpl::LMHeadImpl(int64_t dim, int64_t vocab_size, TokenEmbedding tied_embedding) : tied(tied_embedding) {
  if (!tied) weight = register_parameter("weight", torch::empty({vocab_size, dim}).normal_(0.0, kInitStd));
}

// h: [B, T, D] -> [B, T, V]
torch::Tensor LMHeadImpl::forward(const torch::Tensor& h) {
  const auto& w = tied ? tied->weight : weight;
  // One row (batch-1 decoding) on the CPU: a matrix-vector product reads the [V, D] weight once (quant/gemv.h,
  // on the intra-op threads); the GEMM path of the CPU BLAS first packs (copies) all of it.
  if (h.numel() == h.size(-1) && h.device().is_cpu()) {
    std::vector<int64_t> shape(h.sizes().begin(), h.sizes().end());
    shape.back() = w.size(0);
    const bool grad = torch::GradMode::is_enabled();
    const bool fp32_h = h.scalar_type() == torch::kFloat32, fp32_w = w.scalar_type() == torch::kFloat32;
    const bool bf16_w = w.scalar_type() == torch::kBFloat16, kernel = !grad && w.is_contiguous();
    if (fp32_h && (fp32_w || bf16_w) && kernel)  // bf16_w: store_bf16_if_exact's weight, widened exactly
      return quant::float_matvec_cpu(h, w).view(shape);
    if (fp32_h && fp32_w) return torch::mv(w, h.reshape({-1})).view(shape);  // with gradients
    if (h.scalar_type() == torch::kBFloat16 && bf16_w && kernel) return quant::bf16_matvec_cpu(h, w).view(shape);
  }
  // an fp32 input with store_bf16_if_exact's weight: the weight widened (exactly) for the GEMM, a block of rows at a
  // time without gradients (no float32 copy of the whole table)
  const bool widen = h.scalar_type() == torch::kFloat32 && w.scalar_type() == torch::kBFloat16 && h.device().is_cpu();
  if (widen && !(torch::GradMode::is_enabled() && h.requires_grad())) {
    auto sizes = h.sizes().vec();
    sizes.back() = w.size(0);
    return quant::widened_matmul(h.reshape({-1, h.size(-1)}), w).view(sizes);
  }
  return torch::nn::functional::linear(h, widen ? w.to(torch::kFloat32) : w);
}

bool LMHeadImpl::store_bf16_if_exact() {
  if (tied || weight.scalar_type() != torch::kFloat32 || !weight.device().is_cpu()) return false;
  torch::NoGradGuard ng;
  // checked and narrowed in chunks of rows: no whole-matrix temporary beside the two copies
  auto narrow = torch::empty(weight.sizes(), weight.options().dtype(torch::kBFloat16));
  const int64_t rows = weight.size(0), chunk = 1024;
  for (int64_t r = 0; r < rows; r += chunk) {
    const int64_t n = std::min(chunk, rows - r);
    auto dst = narrow.narrow(0, r, n);
    dst.copy_(weight.narrow(0, r, n));
    if (!torch::equal(dst.to(torch::kFloat32), weight.narrow(0, r, n))) return false;
  }
  weight.set_data(narrow);
  return true;
}

}  // namespace omnilite
