// MoE against a per-token loop over the top-k experts (computed with explicit float64 matrix products), the
// router semantics (fp32 softmax, top-k, renormalisation) and finite-difference gradients.
#include "catch_compat.h"

#include <algorithm>
#include <numeric>

#include "helpers.h"
#include "omnilite/modules/moe.h"

using namespace omnilite;

namespace {

torch::Tensor weight_of(const std::shared_ptr<LinearBaseImpl>& l) { return l->named_parameters()["weight"]; }

// y[n] = sum over the top-k experts of renormalised softmax weight * w2(silu(w1 x) * w3 x), one token at a time.
torch::Tensor per_token_moe(MoEImpl& moe, const torch::Tensor& x2d) {
  const int64_t N = x2d.size(0), E = moe.opts.num_experts, K = moe.opts.top_k;
  auto out = torch::zeros_like(x2d);
  auto gate = moe.gate->weight;
  for (int64_t n = 0; n < N; ++n) {
    auto xn = x2d[n];
    std::vector<double> logits(E), p(E);
    for (int64_t e = 0; e < E; ++e) logits[e] = (gate[e] * xn).sum().item<double>();
    const double mx = *std::max_element(logits.begin(), logits.end());
    double z = 0;
    for (int64_t e = 0; e < E; ++e) z += std::exp(logits[e] - mx);
    for (int64_t e = 0; e < E; ++e) p[e] = std::exp(logits[e] - mx) / z;
    std::vector<int64_t> order(E);
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return p[a] > p[b]; });
    double wsum = 0;
    for (int64_t k = 0; k < K; ++k) wsum += p[order[k]];
    for (int64_t k = 0; k < K; ++k) {
      auto* ex = moe.experts[order[k]]->as<SwiGLUExpertImpl>();
      auto a = torch::mv(weight_of(ex->w1), xn), b = torch::mv(weight_of(ex->w3), xn);
      auto hidden = a / (1 + torch::exp(-a)) * b;  // silu(a) * b
      out[n] += (p[order[k]] / wsum) * torch::mv(weight_of(ex->w2), hidden);
    }
  }
  return out;
}

MoEOptions small_moe() {
  MoEOptions o;
  o.num_experts = 5;
  o.top_k = 2;
  o.expert_hidden = 12;
  return o;
}

}  // namespace

TEST_CASE("sorted MoE dispatch equals a per-token loop over the top-k experts", "[moe]") {
  torch::manual_seed(3);
  for (int64_t k : {1, 2, 3}) {
    auto o = small_moe();
    o.top_k = k;
    MoE moe(8, o, LinearBuilder(), "moe");
    moe->to(torch::kFloat64);
    moe->gate->weight.data().normal_(0.0, 0.5);  // spread the router so the top-k choice is not a tie
    auto x = torch::randn({3, 7, 8}, torch::kFloat64);
    torch::NoGradGuard ng;
    auto out = moe->forward(x);
    auto want = per_token_moe(*moe, x.view({-1, 8}));
    const double err = testing::max_rel_err(out.y.view({-1, 8}), want);
    INFO("top_k " << k << " max err " << err);
    CHECK(err < 1e-12);
    CHECK(testing::max_rel_err(out.router_logits, x.view({-1, 8}).matmul(moe->gate->weight.t())) < 1e-14);
  }
}

TEST_CASE("router: fp32 softmax, top-k, renormalised weights", "[moe]") {
  auto o = small_moe();
  MoE moe(8, o, LinearBuilder(), "moe");
  auto logits = torch::tensor({{0.0, 1.0, 2.0, 3.0, -1.0}, {5.0, 5.0, 0.0, 0.0, 0.0}}, torch::kFloat32);
  auto [w, ids] = moe->route(logits);
  // Row 0: experts 3 and 2, weights e^3/(e^3+e^2) and e^2/(e^3+e^2).
  CHECK(ids[0][0].item<int64_t>() == 3);
  CHECK(ids[0][1].item<int64_t>() == 2);
  CHECK(w[0][0].item<double>() == Approx(std::exp(3.0) / (std::exp(3.0) + std::exp(2.0))).epsilon(1e-6));
  CHECK(w[1][0].item<double>() == Approx(0.5).epsilon(1e-6));
  CHECK(w.scalar_type() == torch::kFloat32);
  // bf16 logits are still routed in fp32.
  auto [wb, idb] = moe->route(logits.to(torch::kBFloat16));
  CHECK(wb.scalar_type() == torch::kFloat32);
  CHECK(torch::equal(idb, ids));
}

TEST_CASE("MoE gradients match float64 finite differences", "[moe][grad]") {
  torch::manual_seed(4);
  MoE moe(8, small_moe(), LinearBuilder(), "moe");
  moe->to(torch::kFloat64);
  moe->gate->weight.data().normal_(0.0, 0.5);
  auto x = torch::randn({2, 4, 8}, torch::kFloat64).requires_grad_(true);
  auto r = torch::randn({2, 4, 8}, torch::kFloat64);
  auto loss = [&] { return (moe->forward(x).y * r).sum(); };
  const double ex = testing::finite_difference_error(loss, x, 30);
  const double eg = testing::finite_difference_error(loss, moe->gate->weight, 20);
  const double ew = testing::finite_difference_error(
      loss, weight_of(moe->experts[1]->as<SwiGLUExpertImpl>()->w2), 20);
  INFO("input " << ex << ", gate " << eg << ", expert w2 " << ew);
  CHECK(ex < 1e-6);
  CHECK(eg < 1e-6);
  CHECK(ew < 1e-6);
}
