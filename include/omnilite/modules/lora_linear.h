// LoRA adapter over any linear variant (Hu et al. 2021; PEFT's layout): y = base(x) + (alpha / r) B A dropout(x).
//
// Registered names follow PEFT's in-memory model, so adapter files map one to one: the frozen base is "base_layer"
// (a PlainLinear or an Nf4Linear), A is "lora_A" (weight [r, in], Kaiming-uniform as nn.Linear initialises it)
// and B is "lora_B" (weight [out, r], zeros: a fresh adapter leaves the base's output unchanged).
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "omnilite/modules/linear.h"

namespace omnilite {

struct LoRALinearImpl : LinearBaseImpl {
  LoRALinearImpl(std::shared_ptr<LinearBaseImpl> base, int64_t rank, double alpha, double dropout);
  // x: [..., in] -> [..., out]
  torch::Tensor forward(const torch::Tensor& x) override;
  int64_t in_features() const override { return base_layer->in_features(); }
  int64_t out_features() const override { return base_layer->out_features(); }
  // The adapter's update (alpha / r) B A: [out, in].
  torch::Tensor delta_weight() const;

  std::shared_ptr<LinearBaseImpl> base_layer;  // frozen base projection
  torch::nn::Linear lora_A{nullptr};           // in -> r, no bias
  torch::nn::Linear lora_B{nullptr};           // r -> out, no bias, zeros
  torch::nn::Dropout dropout{nullptr};         // on the adapter's input only
  double scaling;                              // alpha / r
};
TORCH_MODULE(LoRALinear);

// The one freezing mechanism (train.freeze, QLoRA, the frozen VQ-VAE): every parameter of `model` whose name
// `frozen` accepts stops training (requires_grad = false). Returns the elements it froze.
int64_t freeze_parameters(torch::nn::Module& model, const std::function<bool(const std::string&)>& frozen);
// QLoRA's rule: everything but the adapters (lora_A, lora_B) and the parameters matching `modules_to_save`
// (lora.modules_to_save) is frozen.
int64_t train_adapters_only(torch::nn::Module& model, const std::vector<std::string>& modules_to_save = {});

}  // namespace omnilite
