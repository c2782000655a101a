// The benchmark kernels of `omnilite bench` (infer/bench.h): the bytes a decoded token reads against a count
// from the config's dimensions, and the decode bound against the read bandwidth the same run measured.
#include "catch_compat.h"

#include "helpers.h"
#include "omnilite/infer/bench.h"

using namespace omnilite;

namespace {

// fp32 bytes a decoded token reads, from the dimensions alone: per layer the attention projections, the router,
// top_k of the experts and two norms; the final norm; the LM head (the tied table) and one embedding row.
double expected_bytes(const ModelConfig& c) {
  const double D = c.text.hidden_size, Dh = c.text.head_dim, H = c.text.num_heads, Hk = c.text.num_kv_heads;
  const double E = c.moe.num_experts, K = c.moe.top_k, F = c.moe.expert_hidden, V = c.text.vocab_size;
  const double layer = D * H * Dh * 2 + D * Hk * Dh * 2 + D * E + K * 3 * D * F + 2 * D;
  const double head = V * D;
  const double embed_row = c.text.tie_word_embeddings ? 0 : D;
  return 4.0 * (c.text.num_layers * layer + D + head + embed_row);
}

}  // namespace

TEST_CASE("bench decode: bytes per token from the dimensions, the bound from the read bandwidth", "[bench]") {
  for (const bool tied : {false, true}) {
    Config cfg;
    cfg.model = testing::load("configs/tiny.json").model;
    cfg.model.text.tie_word_embeddings = tied;
    OmniLite model = decode_model(cfg, "fp32", torch::kCPU);
    INFO("tied " << tied);
    CHECK(weight_bytes_per_token(*model, cfg.model) == Approx(expected_bytes(cfg.model)).epsilon(1e-12));
  }
  Config cfg;
  cfg.model = testing::load("configs/tiny.json").model;
  const auto r = bench_decode(cfg, torch::kCPU, "nf4", 6, 3);
  CHECK(r["decode_tokens_per_second"].get<double>() > 0);
  const double per_token = 1e6 * (r["weight_mb_per_token"].get<double>() + r["kv_cache_mb"].get<double>());
  CHECK(r["bandwidth_bound_tokens_per_second"].get<double>() ==
        Approx(1e9 * r["read_bandwidth_gb_per_s"].get<double>() / per_token).epsilon(1e-9));
  CHECK(r["moe_forwards"]["loop"].get<int64_t>() > 0);  // prefill, warm-up and 3 steps through every layer
  REQUIRE_THROWS_WITH(bench_decode(cfg, torch::kCPU, "int3", 6, 3), ContainsText("\"int3\""));
}
