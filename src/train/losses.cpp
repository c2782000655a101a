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

torch::Tensor load_balancing_loss(const std::vector<torch::Tensor>& router_logits, int64_t top_k,
                                  const AllReduceSum& reduce) {
  TORCH_CHECK(!router_logits.empty(), "load_balancing_loss: no router logits");
  const int64_t L = static_cast<int64_t>(router_logits.size()), E = router_logits.front().size(1);
  // Per layer: slot counts per expert [E] and the token count, summed over ranks in one all-reduce.
  auto stats = torch::zeros({L, E + 1}, router_logits.front().options().dtype(torch::kFloat32));
  std::vector<torch::Tensor> probs;
  {
    torch::NoGradGuard ng;
    for (int64_t l = 0; l < L; ++l) {
      const auto& logits = router_logits[static_cast<size_t>(l)];
      const int64_t N = logits.size(0);
      auto chosen = std::get<1>(torch::softmax(logits.to(torch::kFloat32), -1).topk(top_k, -1));  // [N, K] as routed
      stats[l].narrow(0, 0, E).index_add_(0, chosen.reshape(-1), torch::ones({N * top_k}, stats.options()));
      stats[l][E] = static_cast<double>(N);
    }
  }
  if (reduce) reduce(stats);
  torch::Tensor total;
  for (int64_t l = 0; l < L; ++l) {
    auto p = torch::softmax(router_logits[static_cast<size_t>(l)].to(torch::kFloat32), -1);  // [N, E]
    auto n = stats[l][E].clamp_min(1.0);
    auto f = stats[l].narrow(0, 0, E) / (n * static_cast<double>(top_k));                  // [E], sums to 1
    auto P = p.sum(0) / n;                                                                  // [E]
    auto loss = (f * P).sum() * static_cast<double>(E);
    total = total.defined() ? total + loss : loss;
  }
  return total / static_cast<double>(L);
}

torch::Tensor router_z_loss(const std::vector<torch::Tensor>& router_logits, const AllReduceSum& reduce) {
  TORCH_CHECK(!router_logits.empty(), "router_z_loss: no router logits");
  const int64_t L = static_cast<int64_t>(router_logits.size());
  auto counts = torch::zeros({L}, router_logits.front().options().dtype(torch::kFloat32));
  for (int64_t l = 0; l < L; ++l) counts[l] = static_cast<double>(router_logits[static_cast<size_t>(l)].size(0));
  if (reduce) reduce(counts);
  torch::Tensor total;
  for (int64_t l = 0; l < L; ++l) {
    auto loss = torch::logsumexp(router_logits[static_cast<size_t>(l)].to(torch::kFloat32), -1).pow(2).sum() /
                counts[l].clamp_min(1.0);
    total = total.defined() ? total + loss : loss;
  }
  return total / static_cast<double>(L);
}

}  // namespace omnilite
