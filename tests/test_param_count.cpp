// The parameter counts (what `omnilite info` prints, read off a model built with the recording builder) against
// fully constructed models, and the full
// configuration's claims: ~2.45B parameters in all and ~480M active per token in the backbone.
#include "catch_compat.h"

#include <regex>

#include "helpers.h"
#include "omnilite/modules/omnilite.h"
#include "omnilite/modules/param_count.h"

using namespace omnilite;

namespace {

// Which report row a checkpoint key belongs to: written independently of param_count.cpp, from the names.
std::string row_of(const std::string& key) {
  static const std::vector<std::pair<std::regex, std::string>> rules = {
      {std::regex(R"(^vision\.patch_embed\..*)"), "vision.patch_embed"},
      {std::regex(R"(^vision\.blocks\..*)"), "vision.blocks"},
      {std::regex(R"(^vision\.norm\..*)"), "vision.norm"},
      {std::regex(R"(^resampler\..*)"), "resampler"},
      {std::regex(R"(^text\.embed_tokens\..*)"), "text.embed_tokens"},
      {std::regex(R"(^text\.layers\.\d+\.self_attn\..*)"), "text.layers.*.self_attn"},
      {std::regex(R"(^text\.layers\.\d+\.moe\.gate\..*)"), "text.layers.*.moe.gate"},
      {std::regex(R"(^text\.layers\.\d+\.moe\.experts\..*)"), "text.layers.*.moe.experts"},
      {std::regex(R"(^text\.layers\.\d+\.\w+_layernorm\..*)"), "text.layers.*.*_layernorm"},
      {std::regex(R"(^text\.norm\..*)"), "text.norm"},
      {std::regex(R"(^lm_head\..*)"), "lm_head"},
      {std::regex(R"(^flow\..*)"), "flow"},
      {std::regex(R"(^vqvae\..*)"), "vqvae"},
  };
  for (const auto& [re, row] : rules)
    if (std::regex_match(key, re)) return row;
  return "UNMATCHED:" + key;
}

// Linear weights QLoRA stores in NF4: builder-made projections of the ViT, resampler and decoder layers whose
// input width is a whole number of 64-value blocks.
bool is_nf4_weight(const std::string& key) {
  static const std::regex re(
      R"(^(vision\.blocks\.\d+\.(qkv|proj|fc1|fc2)|resampler\.(proj_in|attn_layers\.\d+\.(to_q|to_kv|to_out)|ff_layers\.\d+\.(fc1|fc2))|text\.layers\.\d+\.(self_attn\.[qkvo]_proj|moe\.experts\.\d+\.w[123]))\.weight$)");
  return std::regex_match(key, re);
}

int64_t check_against_model(const ModelConfig& cfg) {
  torch::NoGradGuard ng;
  OmniLite model(cfg);
  std::map<std::string, int64_t> actual;
  int64_t total = 0, nf4 = 0, layers = 0, experts = 0, final_norm = 0, layer_norms = 0, embed = 0, head = 0;
  for (const auto& p : model->named_parameters()) {
    const std::string key = p.key();
    actual[row_of(key)] += p.value().numel();
    total += p.value().numel();
    if (is_nf4_weight(key) && p.value().size(1) % 64 == 0) nf4 += p.value().numel();
    if (key.rfind("text.layers.", 0) == 0) layers += p.value().numel();
    if (key.find(".moe.experts.") != std::string::npos) experts += p.value().numel();
    if (key == "text.norm.weight") final_norm += p.value().numel();
    if (key.rfind("text.layers.", 0) == 0 && key.find("layernorm") != std::string::npos) layer_norms += p.value().numel();
    if (key == "text.embed_tokens.weight") embed = p.value().numel();
    if (key.rfind("lm_head.", 0) == 0) head += p.value().numel();
  }
  const auto report = count_parameters(cfg);
  std::map<std::string, int64_t> predicted;
  for (const auto& row : report.rows) predicted[row.name] = row.params;
  for (const auto& [name, n] : actual) {
    INFO("row " << name << ": model has " << n << ", formula says " << predicted[name]);
    CHECK(predicted[name] == n);
  }
  for (const auto& [name, n] : predicted) {
    INFO("row " << name);
    CHECK(actual[name] == n);
  }
  CHECK(report.total == total);
  CHECK(report.nf4_params == nf4);
  // Active per token: all of the decoder layers except the (E - K) experts a token does not visit.
  const auto& m = cfg.moe;
  CHECK(report.active_backbone == layers - experts / m.num_experts * (m.num_experts - m.top_k) + final_norm);
  // Multiplied with per token: the same without norms, plus the LM head (the embedding table when tied).
  const int64_t lm_head = cfg.text.tie_word_embeddings ? embed : head;
  CHECK(lm_head == cfg.text.vocab_size * cfg.text.hidden_size);
  CHECK(report.active_matmul ==
        layers - layer_norms - experts / m.num_experts * (m.num_experts - m.top_k) + lm_head);
  return nf4;
}

}  // namespace

TEST_CASE("parameter counts equal constructed models", "[params]") {
  auto tiny = testing::load("configs/tiny.json").model;
  SECTION("tiny") { check_against_model(tiny); }
  SECTION("tied embeddings") {
    auto c = tiny;
    c.text.tie_word_embeddings = true;
    check_against_model(c);
  }
  SECTION("other heads, experts, depths") {
    auto c = tiny;
    c.text.num_kv_heads = 1; c.text.num_layers = 3; c.moe.num_experts = 6; c.moe.top_k = 3; c.moe.expert_hidden = 20;
    c.resampler.depth = 3; c.resampler.ff_mult = 3; c.vision.depth = 1; c.vision.mlp_dim = 48;
    c.vqvae.num_downsamples = 2; c.vqvae.base_channels = 6; c.vqvae.codebook_size = 9; c.flow.patch_size = 1;
    check_against_model(c);
  }
  SECTION("small") { CHECK(check_against_model(testing::load("configs/small.json").model) > 0); }
}

TEST_CASE("the full model reproduces the card's claims", "[params][full]") {
  const auto r = count_parameters(testing::load("configs/omni-lite.json").model);
  INFO("total " << r.total << ", active backbone " << r.active_backbone);
  CHECK(r.total > 2'400'000'000);
  CHECK(r.total < 2'600'000'000);
  CHECK(r.active_backbone > 465'000'000);
  CHECK(r.active_backbone < 495'000'000);
  // Hand count of one decoder layer: attention 2048*(2048+512+512) + 2048*2048, router 2048*16,
  // 16 experts of 3*2048*768, two norms of 2048.
  const int64_t layer = 2048LL * (2048 + 512 + 512) + 2048LL * 2048 + 2048LL * 16 + 16LL * 3 * 2048 * 768 + 2 * 2048;
  int64_t text_layers = 0;
  for (const auto& row : r.rows)
    if (row.name.rfind("text.layers", 0) == 0) text_layers += row.params;
  CHECK(text_layers == 24 * layer);
  // MFU's FLOPs per token at 2048 (PaLM): 6 x (24 layers of attention + router + 2 of 16 experts, + the 32000 x 2048
  // head) + 12 x 24 layers x 32 heads x 64 x 2048.
  const double matmul = 24.0 * (2048.0 * (2048 + 512 + 512) + 2048.0 * 2048 + 2048.0 * 16 + 2.0 * 3 * 2048 * 768) +
                        32000.0 * 2048;
  CHECK(static_cast<double>(r.active_matmul) == matmul);
  CHECK(train_flops_per_token(testing::load("configs/omni-lite.json").model, 2048) ==
        Approx(6.0 * matmul + 12.0 * 24 * 32 * 64 * 2048).epsilon(1e-12));
}
