// Sparse mixture-of-experts feed-forward, Mixtral semantics.
//
// N = tokens (B*T flattened), D = width, E = experts, K = top_k, F = expert hidden width.
//   router_logits = gate(x)                       [N, E]
//   p = softmax(router_logits in fp32)            [N, E]
//   (w, e) = topk(p, K); w /= sum(w)              [N, K]
//   y[n] = sum_k w[n,k] * expert_{e[n,k]}(x[n]),  expert(x) = w2(silu(w1 x) * w3 x)
// Dispatch sorts the N*K token-slots by expert and runs each expert once on its contiguous slice.
#pragma once

#include <vector>

#include <torch/torch.h>

#include "omnilite/config.h"
#include "omnilite/modules/linear.h"

namespace omnilite {

// One SwiGLU expert: w2(silu(w1 x) * w3 x).
struct SwiGLUExpertImpl : torch::nn::Module {
  SwiGLUExpertImpl(int64_t dim, int64_t hidden, const LinearBuilder& builder, const std::string& path);
  // x: [n, D] -> [n, D]
  torch::Tensor forward(const torch::Tensor& x);

  std::shared_ptr<LinearBaseImpl> w1;  // D -> F (gate branch)
  std::shared_ptr<LinearBaseImpl> w2;  // F -> D (down projection)
  std::shared_ptr<LinearBaseImpl> w3;  // D -> F (up branch)
};
TORCH_MODULE(SwiGLUExpert);

struct MoEOutput {
  torch::Tensor y;              // [B, T, D]
  torch::Tensor router_logits;  // [B*T, E], before softmax (for the balancing and z losses)
};

struct MoEImpl : torch::nn::Module {
  MoEImpl(int64_t dim, const MoEOptions& opts, const LinearBuilder& builder, const std::string& path);
  // x: [B, T, D] -> y: [B, T, D], router_logits: [B*T, E]
  MoEOutput forward(const torch::Tensor& x);
  // Routing alone: x [N, D] -> weights [N, K] (renormalised, x's dtype) and expert ids [N, K] (int64).
  std::pair<torch::Tensor, torch::Tensor> route(const torch::Tensor& router_logits) const;

  MoEOptions opts;
  torch::nn::Linear gate{nullptr};  // router D -> E, no bias; always full precision
  torch::nn::ModuleList experts;    // E SwiGLU experts, registered as experts.0 .. experts.E-1
};
TORCH_MODULE(MoE);

}  // namespace omnilite
