#include "omnilite/modules/linear.h"

#include <vector>

#include "omnilite/quant/gemm.h"
#include "omnilite/quant/gemv.h"

namespace omnilite {

PlainLinearImpl::PlainLinearImpl(int64_t in_features, int64_t out_features, bool bias) {
  TORCH_CHECK(in_features > 0 && out_features > 0, "PlainLinear: expected positive sizes, got in=", in_features,
              ", out=", out_features);
  weight = register_parameter("weight", torch::empty({out_features, in_features}).normal_(0.0, kInitStd));
  if (bias) this->bias = register_parameter("bias", torch::zeros({out_features}));
}

// x: [..., in] -> [..., out]
torch::Tensor PlainLinearImpl::forward(const torch::Tensor& x) {
  // One row with bf16 weights on the CPU, outside autograd (batch-1 decoding): a matrix-vector kernel that reads
  // each weight once (quant/gemv.h).
  if (x.numel() == weight.size(1) && x.device().is_cpu() && weight.scalar_type() == torch::kBFloat16 &&
      x.scalar_type() == torch::kBFloat16 && weight.is_contiguous() && !torch::GradMode::is_enabled()) {
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
    shape.back() = weight.size(0);
    auto y = quant::bf16_matvec_cpu(x, weight).view(shape);
    return bias.defined() ? y + bias : y;
  }
  // More rows in bf16 on the CPU without gradients (a bf16 model's prompt): LibTorch 1.13's CPU bf16 GEMM ran at
  // ~1 prompt token/s on the full model (docs/benchmarks.md). The float32 GEMM of the widened values gives the bf16
  // GEMM's result (exact products, float32 sums, one rounding to bf16) up to the summation order.
  // Its rows are widened a block at a time, each block multiplied on an intra-op thread (quant/gemm.h).
  const int64_t in = weight.size(1), out = weight.size(0);
  if (x.device().is_cpu() && weight.scalar_type() == torch::kBFloat16 && x.scalar_type() == torch::kBFloat16 &&
      !torch::GradMode::is_enabled()) {
    auto y = quant::widened_matmul(x.reshape({-1, in}).to(torch::kFloat32), weight);
    if (bias.defined()) y = y + bias.to(torch::kFloat32);
    auto sizes = x.sizes().vec();
    sizes.back() = out;
    return y.to(torch::kBFloat16).view(sizes);
  }
  // float32 rows on the CPU when OpenBLAS has fewer threads than LibTorch (a prompt, or training, under
  // runtime.blas_threads = 1): the GEMMs of forward and backward split across the intra-op threads.
  if (x.device().is_cpu() && weight.scalar_type() == torch::kFloat32 && x.scalar_type() == torch::kFloat32 &&
      x.numel() > in && weight.is_contiguous() && quant::gemm_column_splits() > 1) {
    auto y = quant::split_linear(x.reshape({-1, in}), weight, bias);
    auto sizes = x.sizes().vec();
    sizes.back() = out;
    return y.view(sizes);
  }
  return torch::nn::functional::linear(x, weight, bias);
}

std::shared_ptr<LinearBaseImpl> LinearBuilder::make(const std::string& /*path*/, int64_t in_features,
                                                    int64_t out_features, bool bias) const {
  return std::make_shared<PlainLinearImpl>(in_features, out_features, bias);
}

std::string join_path(const std::string& prefix, const std::string& name) {
  return prefix.empty() ? name : prefix + "." + name;
}

}  // namespace omnilite
