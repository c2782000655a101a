#include "omnilite/modules/moe.h"

namespace omnilite {

SwiGLUExpertImpl::SwiGLUExpertImpl(int64_t dim, int64_t hidden, const LinearBuilder& builder,
                                   const std::string& path) {
  w1 = register_module("w1", builder.make(join_path(path, "w1"), dim, hidden, false));
  w2 = register_module("w2", builder.make(join_path(path, "w2"), hidden, dim, false));
  w3 = register_module("w3", builder.make(join_path(path, "w3"), dim, hidden, false));
}

// x: [n, D] -> [n, D]
torch::Tensor SwiGLUExpertImpl::forward(const torch::Tensor& x) {
  return w2->forward(torch::silu(w1->forward(x)) * w3->forward(x));
}

MoEImpl::MoEImpl(int64_t dim, const MoEOptions& o, const LinearBuilder& builder, const std::string& path)
    : opts(o) {
  gate = register_module("gate", torch::nn::Linear(torch::nn::LinearOptions(dim, o.num_experts).bias(false)));
  gate->weight.data().normal_(0.0, kInitStd);
  for (int64_t e = 0; e < o.num_experts; ++e)
    experts->push_back(SwiGLUExpert(dim, o.expert_hidden, builder, join_path(path, "experts." + std::to_string(e))));
  register_module("experts", experts);
}

// router_logits: [N, E] -> (weights [N, K], ids [N, K])
std::pair<torch::Tensor, torch::Tensor> MoEImpl::route(const torch::Tensor& router_logits) const {
  const auto acc = router_logits.scalar_type() == torch::kFloat64 ? torch::kFloat64 : torch::kFloat32;
  auto probs = torch::softmax(router_logits.to(acc), -1);  // [N, E]
  auto top = probs.topk(opts.top_k, -1);                    // values, indices: [N, K]
  auto weights = std::get<0>(top);
  weights = weights / weights.sum(-1, /*keepdim=*/true);
  return {weights, std::get<1>(top)};
}

// x: [B, T, D] -> y: [B, T, D], router_logits: [B*T, E]
MoEOutput MoEImpl::forward(const torch::Tensor& x) {
  const int64_t D = x.size(-1), K = opts.top_k, E = opts.num_experts;
  auto flat = x.reshape({-1, D});                    // [N, D]
  const int64_t N = flat.size(0);
  auto router_logits = gate->forward(flat);          // [N, E]
  auto [weights, ids] = route(router_logits);        // [N, K] each
  weights = weights.to(x.scalar_type());

  // Sort the N*K slots by expert: slot s belongs to token s / K.
  auto flat_ids = ids.reshape({-1});                             // [N*K]
  auto order = flat_ids.argsort();                               // slots grouped by expert
  auto token_of_slot = order.div(K, "floor");                    // [N*K]
  auto slot_weights = weights.reshape({-1}).index_select(0, order).unsqueeze(1);  // [N*K, 1]
  auto counts = flat_ids.bincount({}, E).to(torch::kCPU);       // [E] tokens per expert
  auto xs = flat.index_select(0, token_of_slot);                 // [N*K, D] inputs in expert order

  std::vector<torch::Tensor> outs;
  outs.reserve(E);
  const int64_t* c = counts.data_ptr<int64_t>();
  int64_t start = 0;
  for (int64_t e = 0; e < E; ++e) {
    if (c[e] == 0) continue;
    auto slice = xs.narrow(0, start, c[e]);                      // [n_e, D] contiguous slice of expert e
    outs.push_back(experts[e]->as<SwiGLUExpertImpl>()->forward(slice));
    start += c[e];
  }
  auto ys = torch::cat(outs, 0) * slot_weights;                  // [N*K, D]
  auto y = torch::zeros({N, D}, x.options()).index_add(0, token_of_slot, ys);  // sum the K slots per token
  return {y.view(x.sizes()), router_logits};
}

}  // namespace omnilite
