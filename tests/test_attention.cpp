// Attention and RoPE against independent references: naive loops with repeated K/V, the explicit rotation
// formula, and float64 finite differences.
#include "catch_compat.h"

#include <cmath>
#include <limits>

#include "helpers.h"
#include "omnilite/modules/attention.h"
#include "omnilite/modules/omnilite.h"

using namespace omnilite;

namespace {

// Naive attention: explicit loops over batch, query head, query position; head h reads KV head h / (H/Hkv).
// allowed: bool [B, 1, T, S] or undefined; causal aligns the T queries with the last T keys.
torch::Tensor naive_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                              const torch::Tensor& allowed, bool causal) {
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1), S = k.size(2);
  auto out = torch::zeros_like(q);
  auto qa = q.accessor<double, 4>(), ka = k.accessor<double, 4>(), va = v.accessor<double, 4>();
  auto oa = out.accessor<double, 4>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t kh = h / (H / Hkv);
      for (int64_t i = 0; i < T; ++i) {
        std::vector<double> s(S, -std::numeric_limits<double>::infinity());
        double mx = -std::numeric_limits<double>::infinity();
        for (int64_t j = 0; j < S; ++j) {
          bool ok = true;
          if (causal) ok = j <= i + (S - T);
          if (allowed.defined()) ok = ok && allowed[allowed.size(0) == 1 ? 0 : b][0][i][j].item<bool>();
          if (!ok) continue;
          double dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += qa[b][h][i][d] * ka[b][kh][j][d];
          s[j] = dot / std::sqrt(static_cast<double>(D));
          mx = std::max(mx, s[j]);
        }
        double z = 0;
        for (int64_t j = 0; j < S; ++j) z += std::isinf(s[j]) ? 0.0 : std::exp(s[j] - mx);
        for (int64_t j = 0; j < S; ++j) {
          if (std::isinf(s[j])) continue;
          const double p = std::exp(s[j] - mx) / z;
          for (int64_t d = 0; d < D; ++d) oa[b][h][i][d] += p * va[b][kh][j][d];
        }
      }
    }
  return out;
}

}  // namespace

TEST_CASE("grouped-query attention equals naive attention with repeated K/V", "[attention]") {
  torch::manual_seed(0);
  const auto f64 = torch::kFloat64;
  struct Case { int64_t B, H, Hkv, T, S; bool causal; bool mask; };
  for (auto c : {Case{2, 8, 2, 5, 5, true, false}, Case{1, 4, 4, 6, 6, false, false}, Case{2, 6, 1, 3, 7, true, false},
                 Case{2, 8, 2, 7, 7, false, true}}) {
    auto q = torch::randn({c.B, c.H, c.T, 16}, f64), k = torch::randn({c.B, c.Hkv, c.S, 16}, f64);
    auto v = torch::randn({c.B, c.Hkv, c.S, 16}, f64);
    torch::Tensor allowed;
    if (c.mask) {  // causal + a bidirectional block over positions 2..4 in row 0, 4..6 in row 1
      auto tok = torch::tensor({1, 1, 6, 6, 6, 1, 1, 1, 1, 1, 1, 6, 6, 6}, torch::kInt64).view({2, 7});
      allowed = mixed_attention_mask(tok, 6);
    }
    auto got = attention_core(q, k, v, allowed, c.causal);
    auto want = naive_attention(q, k, v, allowed, c.causal);
    const double err = testing::max_rel_err(got, want);
    INFO("B=" << c.B << " H=" << c.H << " Hkv=" << c.Hkv << " T=" << c.T << " S=" << c.S << " max err " << err);
    CHECK(err < 1e-12);
    // fp32 path (the production dtype on CPU) within float tolerance
    auto got32 = attention_core(q.to(torch::kFloat32), k.to(torch::kFloat32), v.to(torch::kFloat32), allowed, c.causal);
    CHECK(testing::max_rel_err(got32, want) < 1e-5);
    CHECK(testing::max_rel_err(attention_reference(q, k, v, allowed, c.causal), want) < 1e-12);
  }
}

TEST_CASE("one query (decoding) over strided cached keys equals naive attention", "[attention][kv]") {
  torch::manual_seed(1);
  const auto f64 = torch::kFloat64;
  struct Case { int64_t B, H, Hkv, S, Dh; bool causal; };
  for (auto c : {Case{1, 8, 2, 1, 16, true}, Case{2, 8, 2, 37, 16, true}, Case{1, 6, 1, 9, 12, false},
                 Case{1, 32, 8, 300, 64, true}}) {
    // keys and values as the KV cache holds them: the first S positions of a larger storage
    auto ks = torch::randn({c.B, c.Hkv, c.S + 5, c.Dh}), vs = torch::randn({c.B, c.Hkv, c.S + 5, c.Dh});
    auto k = ks.narrow(2, 0, c.S), v = vs.narrow(2, 0, c.S);
    auto q = torch::randn({c.B, c.H, 1, c.Dh});
    torch::NoGradGuard ng;
    auto got = attention_core(q, k, v, torch::Tensor(), c.causal);
    auto want = naive_attention(q.to(f64), k.to(f64), v.to(f64), torch::Tensor(), c.causal);
    INFO("B=" << c.B << " H=" << c.H << " Hkv=" << c.Hkv << " S=" << c.S << " Dh=" << c.Dh);
    REQUIRE(got.sizes() == q.sizes());
    CHECK(testing::max_rel_err(got, want) < 1e-5);
  }
}

TEST_CASE("mixed mask: causal text, bidirectional generated-image blocks", "[attention][mask]") {
  // row: t t g g g t g g  -> blocks: 0 0 1 1 1 0 2 2
  auto tok = torch::tensor({1, 1, 6, 6, 6, 1, 6, 6}, torch::kInt64).view({1, 8});
  auto ids = generated_block_ids(tok, 6);
  CHECK(torch::equal(ids, torch::tensor({0, 0, 1, 1, 1, 0, 2, 2}, torch::kInt64).view({1, 8})));
  auto m = mixed_attention_mask(tok, 6)[0][0];
  for (int i = 0; i < 8; ++i)
    for (int j = 0; j < 8; ++j) {
      const int bi = ids[0][i].item<int>(), bj = ids[0][j].item<int>();
      const bool want = j <= i || (bi > 0 && bi == bj);
      INFO("i=" << i << " j=" << j);
      CHECK(m[i][j].item<bool>() == want);
    }
}

TEST_CASE("RoPE equals the explicit rotation formula", "[attention][rope]") {
  torch::manual_seed(1);
  for (int64_t rope_dim : {16, 8}) {
    const int64_t head_dim = 16, T = 9;
    const double theta = 10000.0;
    auto x = torch::randn({1, 2, T, head_dim}, torch::kFloat64);
    auto tables = rope_tables(torch::arange(T), rope_dim, theta, torch::kFloat64);
    auto got = apply_rope(x, tables);
    auto want = x.clone();
    const int64_t half = rope_dim / 2;
    for (int64_t h = 0; h < 2; ++h)
      for (int64_t p = 0; p < T; ++p)
        for (int64_t i = 0; i < half; ++i) {
          const double ang = p * std::pow(theta, -2.0 * i / rope_dim);
          const double a = x[0][h][p][i].item<double>(), b = x[0][h][p][i + half].item<double>();
          want[0][h][p][i] = a * std::cos(ang) - b * std::sin(ang);
          want[0][h][p][i + half] = b * std::cos(ang) + a * std::sin(ang);
        }
    const double err = testing::max_rel_err(got, want);
    INFO("rope_dim " << rope_dim << " max err " << err);
    CHECK(err < 1e-12);
  }
  // Relative-position property: <rope(q, m), rope(k, n)> depends only on m - n.
  auto q = torch::randn({1, 1, 1, 16}, torch::kFloat64), k = torch::randn({1, 1, 1, 16}, torch::kFloat64);
  auto dot_at = [&](int64_t m, int64_t n) {
    auto tq = rope_tables(torch::tensor({m}), 16, 10000.0, torch::kFloat64);
    auto tk = rope_tables(torch::tensor({n}), 16, 10000.0, torch::kFloat64);
    return (apply_rope(q, tq) * apply_rope(k, tk)).sum().item<double>();
  };
  CHECK(dot_at(7, 3) == Approx(dot_at(104, 100)).epsilon(1e-10));
}

TEST_CASE("GQA attention gradients match float64 finite differences", "[attention][grad]") {
  torch::manual_seed(2);
  TextOptions o;
  o.hidden_size = 16; o.num_heads = 4; o.num_kv_heads = 2; o.head_dim = 4; o.rope_dim = 4; o.rope_theta = 100.0;
  GQAttention attn(o, LinearBuilder(), "attn");
  attn->to(torch::kFloat64);
  auto x = torch::randn({2, 5, 16}, torch::kFloat64).requires_grad_(true);
  auto r = torch::randn({2, 5, 16}, torch::kFloat64);
  auto tables = rope_tables(torch::arange(5), 4, 100.0, torch::kFloat64);
  auto tok = torch::tensor({1, 6, 6, 6, 1, 1, 1, 6, 6, 1}, torch::kInt64).view({2, 5});
  auto allowed = mixed_attention_mask(tok, 6);
  auto loss = [&] { return (attn->forward(x, tables, allowed, false) * r).sum(); };
  const double ex = testing::finite_difference_error(loss, x, 30);
  const double eq = testing::finite_difference_error(loss, attn->q_proj->named_parameters()["weight"], 30);
  const double ek = testing::finite_difference_error(loss, attn->k_proj->named_parameters()["weight"], 30);
  INFO("input " << ex << ", q_proj " << eq << ", k_proj " << ek);
  CHECK(ex < 1e-6);
  CHECK(eq < 1e-6);
  CHECK(ek < 1e-6);
}

TEST_CASE("query-chunked attention equals naive attention, with the plain path's gradients", "[attention][chunked]") {
  torch::manual_seed(7);
  const auto f64 = torch::kFloat64;
  // chunks that do not divide T; causal with S > T (a cache's alignment); masks; GQA groups of 1, 3 and 4
  struct Case { int64_t B, H, Hkv, T, S, rows; bool causal, mask; };
  for (auto c : {Case{2, 8, 2, 11, 11, 4, true, false}, Case{1, 3, 1, 9, 13, 2, true, false},
                 Case{2, 4, 4, 10, 10, 3, false, true}, Case{2, 6, 2, 7, 7, 1, true, true},
                 Case{1, 4, 1, 8, 8, 8, true, false}}) {
    auto q = torch::randn({c.B, c.H, c.T, 8}, f64).requires_grad_(true);
    auto k = torch::randn({c.B, c.Hkv, c.S, 8}, f64).requires_grad_(true);
    auto v = torch::randn({c.B, c.Hkv, c.S, 8}, f64).requires_grad_(true);
    torch::Tensor allowed;
    if (c.mask) {  // random pattern, every row keeps its first key (no row is masked out entirely)
      allowed = torch::rand({c.B, 1, c.T, c.S}, f64).gt(0.4);
      allowed.select(3, 0).fill_(true);
    }
    INFO("B " << c.B << " H " << c.H << " Hkv " << c.Hkv << " T " << c.T << " S " << c.S << " rows " << c.rows);
    auto got = attention_chunked(q, k, v, allowed, c.causal, c.rows);
    torch::Tensor want;
    {
      torch::NoGradGuard ng;
      want = naive_attention(q, k, v, allowed, c.causal);
    }
    CHECK(testing::max_rel_err(got, want) < 1e-12);
    // gradients against autograd through the plain reference (repeated K/V, explicit masked softmax)
    auto r = torch::randn_like(want);
    auto g = torch::autograd::grad({(got * r).sum()}, {q, k, v});
    auto gr = torch::autograd::grad({(attention_reference(q, k, v, allowed, c.causal) * r).sum()}, {q, k, v});
    for (int i = 0; i < 3; ++i) CHECK(testing::max_rel_err(g[i], gr[i]) < 1e-12);
    // float32: within fp32 rounding of the float64 result
    auto got32 = attention_chunked(q.detach().to(torch::kFloat32), k.detach().to(torch::kFloat32),
                                   v.detach().to(torch::kFloat32), allowed, c.causal, c.rows);
    CHECK(testing::max_rel_err(got32, want) < 1e-5);
  }
}

TEST_CASE("attention_core takes the chunked path for long rows, with the plain path's values", "[attention][chunked]") {
  torch::manual_seed(8);
  // 16 heads x 1100 keys x 8 bytes: a chunk of 32 MiB holds 238 rows, so the 1100 rows take five chunks
  auto q = torch::randn({1, 16, 1100, 8}, torch::kFloat64).requires_grad_(true);
  auto k = torch::randn({1, 4, 1100, 8}, torch::kFloat64), v = torch::randn({1, 4, 1100, 8}, torch::kFloat64);
  auto got = attention_core(q, k, v, torch::Tensor(), true);
  CHECK(got.grad_fn()->name().find("ChunkedAttention") != std::string::npos);
  CHECK(testing::max_rel_err(got, attention_reference(q, k, v, torch::Tensor(), true)) < 1e-12);
}

TEST_CASE("attention on CUDA equals the naive float64 reference", "[attention][cuda]") {
  if (!torch::cuda::is_available()) {
    OMNILITE_SKIP("skipped: no CUDA device in this build or machine");
    return;
  }
  torch::manual_seed(6);
  auto q = torch::randn({2, 8, 7, 64}, torch::kFloat64), k = torch::randn({2, 2, 7, 64}, torch::kFloat64);
  auto v = torch::randn({2, 2, 7, 64}, torch::kFloat64);
  auto tok = torch::tensor({1, 1, 6, 6, 6, 1, 1, 1, 1, 1, 1, 6, 6, 6}, torch::kInt64).view({2, 7});
  for (bool mixed : {false, true}) {
    torch::Tensor allowed = mixed ? mixed_attention_mask(tok, 6) : torch::Tensor();
    auto want = naive_attention(q, k, v, allowed, true);
    auto dev = torch::Device("cuda");
    auto cuda_allowed = allowed.defined() ? allowed.to(dev) : allowed;
    auto got32 = attention_core(q.to(dev, torch::kFloat32), k.to(dev, torch::kFloat32), v.to(dev, torch::kFloat32),
                                cuda_allowed, true);
    auto gotbf = attention_core(q.to(dev, torch::kBFloat16), k.to(dev, torch::kBFloat16),
                                v.to(dev, torch::kBFloat16), cuda_allowed, true);
    const double e32 = testing::max_rel_err(got32.cpu(), want), ebf = testing::max_rel_err(gotbf.cpu(), want);
    INFO("mixed mask " << mixed << ": fp32 err " << e32 << ", bf16 err " << ebf);
    CHECK(e32 < 1e-4);  // TF32 may be on for matmuls
    CHECK(ebf < 2e-2);
  }
}
