// Losses against hand-computed values on tiny inputs.
#include "catch_compat.h"

#include <cmath>

#include "helpers.h"
#include "omnilite/modules/losses.h"

using namespace omnilite;

TEST_CASE("CLM loss is the mean cross-entropy of the counted next tokens", "[losses]") {
  // One row, T = 3, V = 2. Targets: tokens[1] = 1 from logits[0], tokens[2] = 0 from logits[1].
  auto logits = torch::tensor({0.0, 1.0, 2.0, 0.0, 5.0, 5.0}, torch::kFloat64).view({1, 3, 2});
  auto tokens = torch::tensor(std::vector<int64_t>{0, 1, 0}).view({1, 3});
  const double ce0 = -std::log(std::exp(1.0) / (1 + std::exp(1.0)));   // p(1 | [0, 1])
  const double ce1 = -std::log(std::exp(2.0) / (std::exp(2.0) + 1));   // p(0 | [2, 0])
  auto all = torch::ones({1, 3}, torch::kBool);
  CHECK(clm_loss(logits, tokens, all).item<double>() == Approx((ce0 + ce1) / 2).epsilon(1e-12));
  auto only_last = torch::tensor({false, false, true}).view({1, 3});
  CHECK(clm_loss(logits, tokens, only_last).item<double>() == Approx(ce1).epsilon(1e-12));
  CHECK(clm_loss(logits, tokens, torch::zeros({1, 3}, torch::kBool)).item<double>() == 0.0);
}

TEST_CASE("chunked linear cross-entropy equals the logits' cross-entropy, gradients included", "[losses][chunked]") {
  torch::manual_seed(3);
  const auto f64 = torch::kFloat64;
  const int64_t B = 2, T = 9, D = 6, V = 11;
  auto hidden = torch::randn({B, T, D}, f64).requires_grad_(true);
  auto w = (torch::randn({V, D}, f64) * 0.7).requires_grad_(true);
  auto tokens = torch::randint(0, V, {B, T});
  auto mask = torch::rand({B, T}, f64).gt(0.3);
  // reference: the full logits, cross-entropy per counted target written out (log-sum-exp minus the target's logit)
  auto logits = torch::matmul(hidden, w.t());  // [B, T, V]
  auto want = torch::zeros({}, f64);
  int64_t count = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 1; t < T; ++t) {
      if (!mask[b][t].item<bool>()) continue;
      auto z = logits[b][t - 1];
      want = want + (z.exp().sum().log() - z[tokens[b][t].item<int64_t>()]);
      ++count;
    }
  REQUIRE(count > 3);
  auto got = clm_loss_sum(hidden, w, tokens, mask);
  CHECK(got.item<double>() == Approx(want.item<double>()).epsilon(1e-12));
  CHECK(got.item<double>() == Approx(clm_loss(logits, tokens, mask).item<double>() * count).epsilon(1e-12));
  auto gw = torch::autograd::grad({want * 1.5}, {hidden, w});
  auto idx = mask.narrow(1, 1, T - 1).reshape(-1).nonzero().squeeze(1);
  auto ts = tokens.narrow(1, 1, T - 1).reshape(-1).index_select(0, idx);
  // chunks of one row, uneven chunks, one chunk; the logits' gradient kept from the forward or recomputed
  for (int64_t rows : {1, 4, 5, 100})
    for (int64_t keep : {int64_t{0}, kKeepLogitGradBytes}) {
      auto hs = hidden.narrow(1, 0, T - 1).reshape({-1, D}).index_select(0, idx);
      auto l = linear_cross_entropy_sum(hs, w, ts, rows, keep);
      INFO("rows " << rows << ", keep " << keep);
      CHECK(l.item<double>() == Approx(want.item<double>()).epsilon(1e-12));
      auto g = torch::autograd::grad({l * 1.5}, {hidden, w});
      CHECK(testing::max_rel_err(g[0], gw[0]) < 1e-12);
      CHECK(testing::max_rel_err(g[1], gw[1]) < 1e-12);
    }
  // a frozen head (QLoRA): only the hidden states get a gradient
  auto frozen = w.detach();
  auto g = torch::autograd::grad({clm_loss_sum(hidden, frozen, tokens, mask) * 1.5}, {hidden});
  CHECK(testing::max_rel_err(g[0], gw[0]) < 1e-12);
  // float32 within fp32 rounding; no target: 0 with a graph
  auto h32 = hidden.detach().to(torch::kFloat32);
  CHECK(clm_loss_sum(h32, w.detach().to(torch::kFloat32), tokens, mask).item<double>() ==
        Approx(want.item<double>()).epsilon(1e-5));
  auto none = clm_loss_sum(hidden, w, tokens, torch::zeros({B, T}, torch::kBool));
  CHECK(none.item<double>() == 0.0);
  CHECK(none.requires_grad());
}

TEST_CASE("chunked linear cross-entropy with a frozen bf16 table: the float64 loss and gradient of its values",
          "[losses][chunked][bf16]") {
  torch::manual_seed(4);
  const int64_t n = 23, D = 16, V = 9000;  // more table rows than one widened block (4096)
  const auto h = torch::randn({n, D}).requires_grad_(true);
  const auto w16 = (torch::randn({V, D}) * 0.3).to(torch::kBFloat16);
  const auto t = torch::randint(0, V, {n});
  // reference: float64 logits of the same values, cross-entropy written out
  const auto hd = h.detach().to(torch::kFloat64).requires_grad_(true);
  const auto z = torch::matmul(hd, w16.to(torch::kFloat64).t());
  const auto want = (z.logsumexp(1) - z.gather(1, t.unsqueeze(1)).squeeze(1)).sum();
  const auto gd = torch::autograd::grad({want}, {hd})[0];
  for (int64_t keep : {int64_t{0}, kKeepLogitGradBytes}) {
    INFO("keep " << keep);
    const auto l = linear_cross_entropy_sum(h, w16, t, 8, keep);
    REQUIRE(l.scalar_type() == torch::kFloat32);
    CHECK(l.item<double>() == Approx(want.item<double>()).epsilon(1e-5));
    const auto g = torch::autograd::grad({l}, {h})[0];
    CHECK(testing::max_rel_err(g, gd) < 1e-5);
  }
}

TEST_CASE("rectified flow: interpolation, target velocity, MSE", "[losses][flow]") {
  auto x0 = torch::tensor({1.0, -2.0, 0.5, 4.0}, torch::kFloat64).view({2, 2});
  auto x1 = torch::tensor({3.0, 2.0, -0.5, 0.0}, torch::kFloat64).view({2, 2});
  auto t = torch::tensor({0.25, 1.0}, torch::kFloat64);
  auto xt = flow_interpolate(x0, x1, t);
  // row 0: 0.25 * x1 + 0.75 * x0 = (0.75 + 0.75, 0.5 - 1.5); row 1: x1
  CHECK(xt[0][0].item<double>() == Approx(1.5));
  CHECK(xt[0][1].item<double>() == Approx(-1.0));
  CHECK(torch::equal(xt[1], x1[1]));
  // The exact velocity gives 0; an error of +1 on one of 4 entries gives 1/4.
  auto v = x1 - x0;
  CHECK(rf_loss(v, x0, x1).item<double>() == 0.0);
  auto v2 = v.clone();
  v2[1][0] += 1.0;
  CHECK(rf_loss(v2, x0, x1).item<double>() == Approx(0.25));
  // Along the straight path d x_t / dt equals the target velocity.
  auto d = (flow_interpolate(x0, x1, t + 1e-3) - flow_interpolate(x0, x1, t)) / 1e-3;
  CHECK(testing::max_rel_err(d, v) < 1e-9);
}

TEST_CASE("logit-normal flow times lie in (0, 1) with median 1/2", "[losses][flow]") {
  torch::manual_seed(0);
  auto t = sample_flow_times(20000, true, 0.0, 1.0, torch::TensorOptions().dtype(torch::kFloat64));
  CHECK(t.min().item<double>() > 0.0);
  CHECK(t.max().item<double>() < 1.0);
  CHECK(t.median().item<double>() == Approx(0.5).margin(0.02));
  // P(t < sigmoid(1)) = Phi(1) = 0.8413
  CHECK(t.lt(1.0 / (1.0 + std::exp(-1.0))).to(torch::kFloat64).mean().item<double>() == Approx(0.8413).margin(0.01));
}

TEST_CASE("load balancing loss: 1 when balanced, E/K when collapsed", "[losses][moe]") {
  const int64_t E = 4;
  // Balanced: token n prefers experts n%E and (n+1)%E equally; over 8 tokens every expert gets the same share of
  // slots and the same mean probability.
  std::vector<double> rows;
  const int64_t N = 8;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t e = 0; e < E; ++e) rows.push_back((e == n % E || e == (n + 1) % E) ? 2.0 : 0.0);
  auto balanced = torch::tensor(rows, torch::kFloat32).view({N, E});
  CHECK(load_balancing_loss({balanced}, 2).item<double>() == Approx(1.0).epsilon(1e-6));
  CHECK(load_balancing_loss({balanced}, 1).item<double>() == Approx(1.0).epsilon(1e-6));
  // Collapsed: every token puts (almost) all probability on expert 0; top-1 gives E, top-2 gives E/2.
  auto collapsed = torch::tensor({40.0, 0.0, -40.0, -40.0}, torch::kFloat32).view({1, E}).repeat({N, 1});
  CHECK(load_balancing_loss({collapsed}, 1).item<double>() == Approx(E).epsilon(1e-5));
  CHECK(load_balancing_loss({collapsed}, 2).item<double>() == Approx(E / 2.0).epsilon(1e-5));
  // Averaged over layers.
  CHECK(load_balancing_loss({balanced, collapsed}, 1).item<double>() == Approx((1.0 + E) / 2).epsilon(1e-5));
}

TEST_CASE("router z-loss is the mean squared logsumexp", "[losses][moe]") {
  auto logits = torch::tensor({0.0, 0.0, std::log(3.0), std::log(5.0)}, torch::kFloat32).view({2, 2});
  // row 0: log(2); row 1: log(8)
  const double want = (std::pow(std::log(2.0), 2) + std::pow(std::log(8.0), 2)) / 2;
  CHECK(router_z_loss({logits}).item<double>() == Approx(want).epsilon(1e-6));
}

TEST_CASE("router losses count real tokens only: masked rows change neither value nor gradient", "[losses][moe]") {
  // A hand-made batch of 7 router rows, of which rows 1, 4 and 5 are padding or image placeholders.
  torch::manual_seed(4);
  const int64_t E = 4, K = 2;
  auto logits = torch::randn({7, E}, torch::kFloat64).requires_grad_(true);
  auto mask = torch::tensor(std::vector<int64_t>{1, 0, 1, 1, 0, 0, 1}).to(torch::kBool);
  auto real_rows = torch::tensor(std::vector<int64_t>{0, 2, 3, 6});
  // Reference: the plain formulas on the real rows alone, computed by hand.
  auto real = logits.detach().index_select(0, real_rows);
  auto p = torch::softmax(real, -1);
  auto chosen = std::get<1>(p.topk(K, -1));
  std::vector<double> f(E, 0.0);
  for (int64_t i = 0; i < chosen.size(0); ++i)
    for (int64_t k = 0; k < K; ++k) f[static_cast<size_t>(chosen[i][k].item<int64_t>())] += 1.0 / (4.0 * K);
  double aux_ref = 0;
  for (int64_t e = 0; e < E; ++e) aux_ref += E * f[static_cast<size_t>(e)] * p.select(1, e).mean().item<double>();
  const double z_ref = torch::logsumexp(real, -1).pow(2).mean().item<double>();

  auto aux = load_balancing_loss({logits}, K, nullptr, mask);
  auto z = router_z_loss({logits}, nullptr, mask);
  CHECK(aux.item<double>() == Approx(aux_ref).epsilon(1e-12));
  CHECK(z.item<double>() == Approx(z_ref).epsilon(1e-12));
  // Unmasked, the padding rows would have counted.
  CHECK(std::abs(router_z_loss({logits}).item<double>() - z_ref) > 1e-3);
  (aux + z).backward();
  for (int64_t r : {1, 4, 5}) CHECK(logits.grad()[r].abs().sum().item<double>() == 0.0);
  CHECK(logits.grad()[0].abs().sum().item<double>() > 0.0);
  CHECK_THROWS_WITH(router_z_loss({logits}, nullptr, mask.narrow(0, 0, 5)), ContainsText("token_mask has 5 entries"));
}
