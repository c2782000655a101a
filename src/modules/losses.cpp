#include "omnilite/modules/losses.h"

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

torch::Tensor upcast(const torch::Tensor& t) {
  return t.scalar_type() == torch::kFloat64 ? t : t.to(torch::kFloat32);
}

namespace {
// The router rows that count, as float weights [N] (1 = a real token), or undefined when all count.
torch::Tensor row_weights(const torch::Tensor& logits, const torch::Tensor& token_mask, const char* what) {
  if (!token_mask.defined()) return {};
  TORCH_CHECK(token_mask.numel() == logits.size(0), what, ": token_mask has ", token_mask.numel(),
              " entries for ", logits.size(0), " router rows; hint: pass one entry per token of the forward");
  return token_mask.reshape(-1).to(logits.device(), upcast(logits).scalar_type());
}
}  // namespace

torch::Tensor load_balancing_loss(const std::vector<torch::Tensor>& router_logits, int64_t top_k,
                                  const AllReduceSum& reduce, const torch::Tensor& token_mask) {
  TORCH_CHECK(!router_logits.empty(), "load_balancing_loss: no router logits");
  const int64_t L = static_cast<int64_t>(router_logits.size()), E = router_logits.front().size(1);
  const auto w = row_weights(router_logits.front(), token_mask, "load_balancing_loss");
  // Per layer: slot counts per expert [E] and the token count, summed over ranks in one all-reduce.
  auto stats = torch::zeros({L, E + 1}, upcast(router_logits.front()).options());
  std::vector<torch::Tensor> probs;
  {
    torch::NoGradGuard ng;
    for (int64_t l = 0; l < L; ++l) {
      const auto& logits = router_logits[static_cast<size_t>(l)];
      const int64_t N = logits.size(0);
      auto chosen = std::get<1>(torch::softmax(upcast(logits), -1).topk(top_k, -1));  // [N, K] as routed
      auto slot_w = w.defined() ? w.unsqueeze(1).expand({N, top_k}).reshape(-1) : torch::ones({N * top_k}, stats.options());
      stats[l].narrow(0, 0, E).index_add_(0, chosen.reshape(-1), slot_w);
      stats[l][E] = w.defined() ? w.sum() : torch::full({}, static_cast<double>(N), stats.options());
    }
  }
  if (reduce) reduce(stats);
  torch::Tensor total;
  for (int64_t l = 0; l < L; ++l) {
    auto p = torch::softmax(upcast(router_logits[static_cast<size_t>(l)]), -1);  // [N, E]
    auto n = stats[l][E].clamp_min(1.0);
    auto f = stats[l].narrow(0, 0, E) / (n * static_cast<double>(top_k));                  // [E], sums to 1
    auto P = (w.defined() ? (p * w.unsqueeze(1)).sum(0) : p.sum(0)) / n;                  // [E]
    auto loss = (f * P).sum() * static_cast<double>(E);
    total = total.defined() ? total + loss : loss;
  }
  return total / static_cast<double>(L);
}

torch::Tensor router_z_loss(const std::vector<torch::Tensor>& router_logits, const AllReduceSum& reduce,
                            const torch::Tensor& token_mask) {
  TORCH_CHECK(!router_logits.empty(), "router_z_loss: no router logits");
  const int64_t L = static_cast<int64_t>(router_logits.size());
  const auto w = row_weights(router_logits.front(), token_mask, "router_z_loss");
  auto counts = torch::zeros({L}, upcast(router_logits.front()).options());
  for (int64_t l = 0; l < L; ++l)
    counts[l] = w.defined() ? w.sum() : torch::full({}, static_cast<double>(router_logits[static_cast<size_t>(l)].size(0)), counts.options());
  if (reduce) reduce(counts);
  torch::Tensor total;
  for (int64_t l = 0; l < L; ++l) {
    auto z2 = torch::logsumexp(upcast(router_logits[static_cast<size_t>(l)]), -1).pow(2);  // [N]
    auto loss = (w.defined() ? z2 * w : z2).sum() / counts[l].clamp_min(1.0);
    total = total.defined() ? total + loss : loss;
  }
  return total / static_cast<double>(L);
}

}  // namespace omnilite
