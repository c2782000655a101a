#include "omnilite/modules/linear.h"

namespace omnilite {

PlainLinearImpl::PlainLinearImpl(int64_t in_features, int64_t out_features, bool bias) {
  TORCH_CHECK(in_features > 0 && out_features > 0, "PlainLinear: expected positive sizes, got in=", in_features,
              ", out=", out_features);
  weight = register_parameter("weight", torch::empty({out_features, in_features}).normal_(0.0, kInitStd));
  if (bias) this->bias = register_parameter("bias", torch::zeros({out_features}));
}

// x: [..., in] -> [..., out]
torch::Tensor PlainLinearImpl::forward(const torch::Tensor& x) {
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
