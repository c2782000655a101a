// MoE against a per-token loop over the top-k experts (computed with explicit float64 matrix products), the
// router semantics (fp32 softmax, top-k, renormalisation) and finite-difference gradients; the grouped dispatch
// (at::_grouped_mm, LibTorch >= 2.9) against the same reference and against the loop's gradients.
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

// small_moe() routing to top_k experts, D = 8, the router spread so that the top-k choice is not a tie.
MoE spread_moe(int64_t top_k) {
  auto o = small_moe();
  o.top_k = top_k;
  MoE moe(8, o, LinearBuilder(), "moe");
  moe->gate->weight.data().normal_(0.0, 0.5);
  return moe;
}

}  // namespace

TEST_CASE("sorted MoE dispatch equals a per-token loop over the top-k experts", "[moe]") {
  torch::manual_seed(3);
  for (int64_t k : {1, 2, 3}) {
    MoE moe = spread_moe(k);
    moe->to(torch::kFloat64);
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

TEST_CASE("one token without gradients (decoding) gives the sorted dispatch's output bit for bit", "[moe]") {
  torch::manual_seed(4);
  for (int64_t k : {1, 2, 3}) {
    MoE moe = spread_moe(k);
    for (int t = 0; t < 5; ++t) {
      auto x = torch::randn({1, 1, 8});
      const auto sorted = moe->forward(x).y.detach();  // gradients on: the general path
      torch::NoGradGuard ng;
      const auto one = moe->forward(x);  // the one-token path
      INFO("top_k " << k << " token " << t);
      CHECK(torch::equal(one.y, sorted));
      // and the float64 per-token reference
      CHECK(testing::max_rel_err(one.y.view({1, 8}).to(torch::kFloat64),
                                 per_token_moe(*moe, x.view({1, 8})).to(torch::kFloat64)) < 1e-5);
    }
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

TEST_CASE("grouped MoE dispatch: outputs equal the per-token reference, gradients equal the loop's", "[moe]") {
  if (!moe_grouped_available()) {
    OMNILITE_SKIP("LibTorch " TORCH_VERSION " has no at::_grouped_mm with a CPU kernel (needs >= 2.9)");
    return;
  }
  torch::manual_seed(5);
  auto o = small_moe();
  o.num_experts = 6;
  o.expert_hidden = 16;
  MoE moe(8, o, LinearBuilder(), "moe");  // D = 8, F = 16: rows of 16-byte multiples in fp32 and bf16
  {
    torch::NoGradGuard ng;
    for (auto& p : moe->parameters()) p.normal_(0.0, 0.4);  // outputs of order 1, so errors are not hidden
    moe->gate->weight[5].fill_(-3.0);                          // with x > 0, expert 5 is never chosen: an empty group
  }
  auto x = (torch::randn({3, 5, 8}).abs() + 0.1).requires_grad_(true);
  auto r = torch::randn({3, 5, 8});
  auto ids = std::get<1>(moe->route(moe->gate->forward(x.detach().view({-1, 8}))));
  REQUIRE(ids.eq(5).sum().item<int64_t>() == 0);
  REQUIRE(ids.eq(0).sum().item<int64_t>() > 0);

  // One forward and backward under a dispatch: y and the gradients of x and every parameter (zero where undefined).
  auto run = [&](MoEDispatch d) {
    moe->dispatch = d;
    REQUIRE(moe->uses_grouped(x) == (d == MoEDispatch::Grouped));
    moe->zero_grad();
    x.mutable_grad() = torch::Tensor();
    auto y = moe->forward(x).y;
    (y * r).sum().backward();
    std::vector<torch::Tensor> grads{y.detach(), x.grad().clone()};
    for (const auto& p : moe->parameters())
      grads.push_back(p.grad().defined() ? p.grad().clone() : torch::zeros_like(p));
    return grads;
  };
  const auto loop = run(MoEDispatch::Loop);
  const auto grouped = run(MoEDispatch::Grouped);
  MoE ref_moe(8, o, LinearBuilder(), "moe");
  ref_moe->to(torch::kFloat64);
  {
    torch::NoGradGuard ng;
    for (auto& item : moe->named_parameters()) ref_moe->named_parameters()[item.key()].copy_(item.value());
  }
  const auto want = per_token_moe(*ref_moe, x.detach().to(torch::kFloat64).view({-1, 8}));
  const double err = testing::max_rel_err(grouped[0].view({-1, 8}), want);
  INFO("grouped vs per-token float64: " << err);
  CHECK(err < 1e-5);
  const auto names = moe->named_parameters().keys();
  for (size_t i = 1; i < loop.size(); ++i) {
    const std::string what = i == 1 ? std::string("x") : names[i - 2];
    const double gerr = testing::max_rel_err(grouped[i], loop[i]);
    INFO("gradient of " << what << ": grouped vs loop " << gerr << ", scale " << loop[i].abs().max().item<double>());
    CHECK(gerr < 1e-5);
  }
  // grads: y, x, gate, then w1, w2, w3 of each expert. The unused expert 5 gets zero gradients from the grouped
  // path (the loop leaves them undefined).
  for (int j = 0; j < 3; ++j) CHECK(grouped[3 + 5 * 3 + j].abs().max().item<double>() == 0.0);

  // bf16, the dtype the grouped path is chosen for on CUDA: within bf16 rounding of the reference.
  moe->to(torch::kBFloat16);
  moe->dispatch = MoEDispatch::Grouped;
  torch::NoGradGuard ng;
  auto yb = moe->forward(x.detach().to(torch::kBFloat16)).y;
  CHECK(yb.scalar_type() == torch::kBFloat16);
  const double berr = testing::max_rel_err(yb.view({-1, 8}), want);
  INFO("bf16 grouped vs per-token float64: " << berr);
  CHECK(berr < 3e-2);
}

TEST_CASE("MoE dispatch: auto keeps the loop on CPU, a forced grouped dispatch names what stops it", "[moe]") {
  CHECK(parse_moe_dispatch("grouped") == MoEDispatch::Grouped);
  CHECK(std::string(moe_dispatch_name(parse_moe_dispatch("loop"))) == "loop");
  REQUIRE_THROWS_WITH(parse_moe_dispatch("fast"), ContainsText("\"fast\"") && ContainsText("\"grouped\""));
  auto o = small_moe();
  o.expert_hidden = 10;  // 40-byte fp32 rows: not a multiple of 16 bytes
  MoE moe(8, o, LinearBuilder(), "moe");
  auto x = torch::randn({2, 3, 8});
  CHECK(moe->dispatch == MoEDispatch::Auto);
  CHECK_FALSE(moe->uses_grouped(x));
  CHECK(moe->forward(x).y.sizes() == x.sizes());
  CHECK(moe_path_counts(*moe).loop == 1);
  CHECK(moe_path_counts(*moe).grouped == 0);
  set_moe_dispatch(*moe, MoEDispatch::Grouped);
  const std::string why = moe_grouped_available() ? "expert_hidden F = 10 is not a multiple of 4" : "needs >= 2.9";
  REQUIRE_THROWS_WITH(moe->forward(x), ContainsText("runtime.moe_dispatch = \"grouped\"") && ContainsText(why) &&
                                           ContainsText("hint: use \"auto\""));
}
