// RMSNorm as in Mixtral/Llama: y = w * x / sqrt(mean(x^2) + eps), the statistics computed in fp32.
#pragma once

#include <torch/torch.h>

namespace omnilite {

struct RMSNormImpl : torch::nn::Module {
  RMSNormImpl(int64_t dim, double eps);
  // x: [..., dim] -> [..., dim]
  torch::Tensor forward(const torch::Tensor& x);

  torch::Tensor weight;  // [dim], initialised to ones
  double eps;            // added to the mean square (1e-5)
};
TORCH_MODULE(RMSNorm);

}  // namespace omnilite
