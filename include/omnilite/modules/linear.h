// Linear projections and the builder that chooses their variant.
//
// Blocks never construct nn::Linear themselves: they ask a LinearBuilder for each projection, passing its full
// checkpoint path ("text.layers.3.self_attn.q_proj"). The default builder makes plain linears; the QLoRA
// builders return LoRA or NF4 variants for matching paths, so block code never branches on fine-tuning mode.
#pragma once

#include <memory>
#include <string>

#include <torch/torch.h>

namespace omnilite {

// Standard deviation of the normal initialisation of linear weights and embeddings (GPT-2, Mixtral: 0.02).
constexpr double kInitStd = 0.02;

// Interface of every projection variant: y = x W^T (+ b).
struct LinearBaseImpl : torch::nn::Module {
  // x: [..., in_features] -> [..., out_features]
  virtual torch::Tensor forward(const torch::Tensor& x) = 0;
  virtual int64_t in_features() const = 0;
  virtual int64_t out_features() const = 0;
};

// Plain full-precision linear layer; its parameters are named "weight" [out, in] and "bias" [out].
struct PlainLinearImpl : LinearBaseImpl {
  PlainLinearImpl(int64_t in_features, int64_t out_features, bool bias);
  torch::Tensor forward(const torch::Tensor& x) override;
  int64_t in_features() const override { return weight.size(1); }
  int64_t out_features() const override { return weight.size(0); }

  torch::Tensor weight;  // [out_features, in_features]
  torch::Tensor bias;    // [out_features], undefined when built without bias
};

// Chooses the variant of each projection from its checkpoint path.
struct LinearBuilder {
  virtual ~LinearBuilder() = default;
  // path: full dotted module path, e.g. "text.layers.0.moe.experts.5.w1".
  virtual std::shared_ptr<LinearBaseImpl> make(const std::string& path, int64_t in_features,
                                               int64_t out_features, bool bias) const;
};

// Joins a module prefix and a child name with a dot ("a.b" + "c" -> "a.b.c"; "" + "c" -> "c").
std::string join_path(const std::string& prefix, const std::string& name);

}  // namespace omnilite
