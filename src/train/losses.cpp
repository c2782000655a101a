#include "omnilite/train/losses.h"

namespace omnilite {

// logits [B, T, V], tokens [B, T], target_mask [B, T] -> scalar
torch::Tensor clm_loss(const torch::Tensor& logits, const torch::Tensor& tokens, const torch::Tensor& target_mask) {
  const int64_t T = tokens.size(1), V = logits.size(2);
  TORCH_CHECK(logits.size(0) == tokens.size(0) && logits.size(1) == T, "clm_loss: logits ", logits.sizes(),
              " do not match tokens ", tokens.sizes());
  auto pred = logits.narrow(1, 0, T - 1).reshape({-1, V});           // predictions from positions 0..T-2
  auto target = tokens.narrow(1, 1, T - 1).reshape(-1);              // targets at positions 1..T-1
  auto mask = target_mask.narrow(1, 1, T - 1).reshape(-1);
  auto idx = mask.nonzero().squeeze(1);
  if (idx.numel() == 0) return logits.sum() * 0.0;                   // keeps the graph, contributes nothing
  auto acc = logits.scalar_type() == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
  return torch::nn::functional::cross_entropy(pred.index_select(0, idx).to(acc), target.index_select(0, idx));
}

torch::Tensor flow_interpolate(const torch::Tensor& x0, const torch::Tensor& x1, const torch::Tensor& t) {
  auto tt = t.to(x1.scalar_type()).unsqueeze(1);  // [n, 1]
  return tt * x1 + (1 - tt) * x0;
}

torch::Tensor rf_loss(const torch::Tensor& v_pred, const torch::Tensor& x0, const torch::Tensor& x1) {
  auto acc = v_pred.scalar_type() == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
  return (v_pred.to(acc) - (x1 - x0).to(acc)).pow(2).mean();
}

torch::Tensor sample_flow_times(int64_t n, bool logit_normal, double mean, double std, const torch::TensorOptions& o) {
  if (logit_normal) return torch::sigmoid(torch::randn({n}, o) * std + mean);
  return torch::rand({n}, o);
}

torch::Tensor load_balancing_loss(const std::vector<torch::Tensor>& router_logits, int64_t top_k) {
  TORCH_CHECK(!router_logits.empty(), "load_balancing_loss: no router logits");
  torch::Tensor total;
  for (const auto& logits : router_logits) {
    const int64_t N = logits.size(0), E = logits.size(1);
    auto probs = torch::softmax(logits.to(torch::kFloat32), -1);                 // [N, E]
    auto chosen = std::get<1>(probs.topk(top_k, -1));                            // [N, K]
    auto counts = torch::zeros({E}, probs.options()).index_add(
        0, chosen.reshape(-1), torch::ones({N * top_k}, probs.options()));       // slots per expert
    auto f = counts / static_cast<double>(N * top_k);                            // [E], sums to 1
    auto P = probs.mean(0);                                                      // [E], sums to 1
    auto l = (f * P).sum() * static_cast<double>(E);
    total = total.defined() ? total + l : l;
  }
  return total / static_cast<double>(router_logits.size());
}

torch::Tensor router_z_loss(const std::vector<torch::Tensor>& router_logits) {
  TORCH_CHECK(!router_logits.empty(), "router_z_loss: no router logits");
  torch::Tensor total;
  for (const auto& logits : router_logits) {
    auto l = torch::logsumexp(logits.to(torch::kFloat32), -1).pow(2).mean();
    total = total.defined() ? total + l : l;
  }
  return total / static_cast<double>(router_logits.size());
}

}  // namespace omnilite
