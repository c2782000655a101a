#include "omnilite/modules/lora_linear.h"

#include "omnilite/pattern.h"

namespace omnilite {

LoRALinearImpl::LoRALinearImpl(std::shared_ptr<LinearBaseImpl> base, int64_t rank, double alpha, double p)
    : scaling(alpha / static_cast<double>(rank)) {
  TORCH_CHECK(rank > 0, "LoRALinear: rank must be positive, got ", rank);
  base_layer = register_module("base_layer", std::move(base));
  for (auto& t : base_layer->parameters()) t.set_requires_grad(false);
  lora_A = register_module("lora_A", torch::nn::Linear(torch::nn::LinearOptions(in_features(), rank).bias(false)));
  lora_B = register_module("lora_B", torch::nn::Linear(torch::nn::LinearOptions(rank, out_features()).bias(false)));
  torch::NoGradGuard ng;
  lora_B->weight.zero_();
  dropout = register_module("dropout", torch::nn::Dropout(p));
}

// x: [..., in] -> [..., out]
torch::Tensor LoRALinearImpl::forward(const torch::Tensor& x) {
  return base_layer->forward(x) + lora_B->forward(lora_A->forward(dropout->forward(x))) * scaling;
}

torch::Tensor LoRALinearImpl::delta_weight() const {
  return torch::matmul(lora_B->weight, lora_A->weight) * scaling;  // [out, r] x [r, in]
}

int64_t freeze_parameters(torch::nn::Module& model, const std::function<bool(const std::string&)>& frozen) {
  int64_t n = 0;
  for (auto& p : model.named_parameters())
    if (p.value().requires_grad() && frozen(p.key())) {
      p.value().set_requires_grad(false);
      n += p.value().numel();
    }
  return n;
}

int64_t train_adapters_only(torch::nn::Module& model, const std::vector<std::string>& modules_to_save) {
  return freeze_parameters(model, [&](const std::string& name) {
    return name.find(".lora_") == std::string::npos && !matches_any(name, modules_to_save);
  });
}

}  // namespace omnilite
