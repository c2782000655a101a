// QLoRA: NF4 codes and blocks against the published table and naive loops, Nf4Linear against the dequantised
// matmul, LoRA against its formula, gradients reaching adapters only, PEFT adapter files, base-checkpoint loading
// and its errors, and a tiny QLoRA run whose loss falls.
#include "catch_compat.h"
#include <nlohmann/json.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>

#include "helpers.h"
#include "omnilite/data/tokenizer.h"
#include "omnilite/io/adapter.h"
#include "omnilite/io/checkpoint.h"
#include "omnilite/modules/lora_linear.h"
#include "omnilite/modules/nf4_linear.h"
#include "omnilite/modules/omnilite.h"
#include "omnilite/modules/qlora_builder.h"
#include "omnilite/quant/nf4.h"
#include "omnilite/modules/losses.h"
#include "omnilite/train/trainer.h"

using namespace omnilite;
namespace fs = std::filesystem;

namespace {

// The NF4 table as the QLoRA paper / bitsandbytes publish it.
const double kTable[16] = {-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                           -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                           0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                           0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0};

int naive_nearest(double x) {
  int best = 0;
  for (int k = 1; k < 16; ++k)
    if (std::abs(x - kTable[k]) < std::abs(x - kTable[best])) best = k;
  return best;
}


}  // namespace

TEST_CASE("NF4: the 16 codes and nearest-code mapping", "[qlora][nf4]") {
  const auto& v = quant::nf4_code_values();
  for (int k = 0; k < 16; ++k) CHECK(v[static_cast<size_t>(k)] == static_cast<float>(kTable[k]));
  auto x = torch::rand({20000}) * 2 - 1;
  x.narrow(0, 0, 16).copy_(torch::tensor(std::vector<float>(v.begin(), v.end())));  // the codes map to themselves
  auto idx = quant::nf4_nearest_codes(x);
  int64_t wrong = 0;
  for (int64_t i = 0; i < x.numel(); ++i) wrong += idx[i].item<uint8_t>() != naive_nearest(x[i].item<float>());
  CHECK(wrong == 0);
}

TEST_CASE("NF4 double quantisation map: bitsandbytes' signed dynamic 8-bit map, from its formula in double",
          "[qlora][nf4]") {
  // create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8): for i = 0..6 the midpoints of 2^i + 1 evenly
  // spaced points in [0.1, 1], times +-10^(i - 6); then 0 and 1; sorted.
  std::vector<double> ref;
  for (int i = 0; i < 7; ++i) {
    const int n = (1 << i) + 1;
    for (int k = 0; k + 1 < n; ++k) {
      const double a = 0.1 + 0.9 * k / (n - 1), b = 0.1 + 0.9 * (k + 1) / (n - 1);
      ref.push_back((a + b) / 2 * std::pow(10.0, i - 6));
      ref.push_back(-(a + b) / 2 * std::pow(10.0, i - 6));
    }
  }
  ref.push_back(0);
  ref.push_back(1);
  std::sort(ref.begin(), ref.end());
  const auto& map = quant::dynamic_map_values();
  REQUIRE(ref.size() == map.size());
  double worst = 0;
  for (size_t k = 0; k < map.size(); ++k) worst = std::max(worst, std::abs(map[k] - ref[k]) / std::max(std::abs(ref[k]), 1e-6));
  CHECK(worst < 1e-6);
  CHECK(std::is_sorted(map.begin(), map.end()));
  CHECK(map.back() == 1.0f);
}

TEST_CASE("NF4 round trip: per-value error within half the code gap, absmax codes the nearest of the dynamic map", "[qlora][nf4]") {
  torch::manual_seed(5);
  auto w = torch::randn({96, 256}) * 0.05;
  w[3][7] = 0.9;  // an outlier block
  auto q = quant::nf4_quantize(w);
  REQUIRE(q.packed.numel() == w.numel() / 2);
  REQUIRE(q.absmax_q.numel() == w.numel() / 64);
  // Double-quantised absmax: the offset is the mean absmax, and each code is bitsandbytes' CPU rule for
  // x = (absmax - mean) / the max |absmax - mean| of its 256-block: x's bin of 65536 over [-1, 1], then the number of
  // map midpoints below the bin's value (a naive scan here), which is the nearest map value to x unless x lies
  // within one bin of a midpoint.
  auto true_absmax = w.reshape({-1, 64}).abs().amax(1);
  auto dq_absmax = quant::nf4_absmax(q);
  CHECK(q.absmax_mean.item<float>() == true_absmax.mean().item<float>());
  {
    const auto& map = quant::dynamic_map_values();
    auto centred = (true_absmax - true_absmax.mean()).to(torch::kFloat64);
    const int64_t nb = centred.numel();
    int64_t wrong = 0, far = 0;
    for (int64_t s0 = 0; s0 < nb; s0 += 256) {
      auto blk = centred.narrow(0, s0, std::min<int64_t>(256, nb - s0));
      const double m = blk.abs().max().item<double>();
      CHECK(q.absmax_scale[s0 / 256].item<double>() == Approx(m).epsilon(1e-6));
      for (int64_t b = 0; b < blk.numel(); ++b) {
        const double x = blk[b].item<double>() / m;
        const auto bin = static_cast<int64_t>(std::floor((x + 1) / 2 * 65535 + 0.5));
        const double centre = -1.0 + 2.0 * static_cast<double>(bin) / 65535;
        size_t code = 0;
        for (size_t k = 0; k + 1 < map.size(); ++k) code += 0.5 * (map[k] + map[k + 1]) < centre;
        size_t nearest = 0;
        for (size_t k = 1; k < map.size(); ++k)
          if (std::abs(x - map[k]) < std::abs(x - map[nearest])) nearest = k;
        const auto got = q.absmax_q[s0 + b].item<uint8_t>();
        wrong += got != code;
        far += std::abs(x - map[got]) > std::abs(x - map[nearest]) + 2.0 / 65535;
      }
    }
    CHECK(wrong == 0);
    CHECK(far == 0);  // never more than a bin width farther than the nearest map value
  }
  // Values: |w - dq| <= absmax * max half gap between codes + |absmax error|.
  double max_half_gap = 0;
  for (int k = 1; k < 16; ++k) max_half_gap = std::max(max_half_gap, (kTable[k] - kTable[k - 1]) / 2);
  auto dq = quant::nf4_dequantize(q);
  auto err = (dq - w).abs().reshape({-1, 64}).amax(1);
  auto bound = true_absmax * max_half_gap + (dq_absmax - true_absmax).abs() + 1e-6;
  CHECK((err - bound).max().item<double>() <= 0);
  // Every stored code is the nearest code of w / absmax (the naive scan above, in double).
  {
    auto packed = q.packed.contiguous();
    const auto* pb = packed.data_ptr<uint8_t>();
    auto flat = w.reshape(-1).to(torch::kFloat64);
    auto am = true_absmax.to(torch::kFloat64);
    int64_t wrong = 0;
    for (int64_t i = 0; i < w.numel(); ++i) {
      const int code = i % 2 == 0 ? pb[i / 2] >> 4 : pb[i / 2] & 15;
      wrong += code != naive_nearest(flat[i].item<double>() / am[i / 64].item<double>());
    }
    CHECK(wrong == 0);
  }
  // The dequantisation equals a scalar decoding of the stored bytes: high nibble first, absmax = map[q] * scale + mean.
  {
    auto packed = q.packed.contiguous();
    auto aq = q.absmax_q.contiguous();
    const auto* pb = packed.data_ptr<uint8_t>();
    const auto* pa = aq.data_ptr<uint8_t>();
    const auto& map = quant::dynamic_map_values();
    auto flat = dq.reshape(-1);
    double worst = 0;
    for (int64_t i = 0; i < w.numel(); ++i) {
      const int64_t block = i / 64;
      const double absmax = map[pa[block]] * q.absmax_scale[block / 256].item<double>() + q.absmax_mean.item<double>();
      const int code = i % 2 == 0 ? pb[i / 2] >> 4 : pb[i / 2] & 15;
      worst = std::max(worst, std::abs(flat[i].item<double>() - kTable[code] * absmax));
    }
    CHECK(worst < 1e-6);
  }
  // Row slices equal the full dequantisation.
  CHECK(torch::equal(quant::nf4_dequantize_rows(q, 10, 7, torch::kFloat32), dq.narrow(0, 10, 7)));
  // 4 + 8/64 + 32/(64*256) bits per weight for a large matrix
  auto big = quant::nf4_quantize(torch::randn({2048, 768}));
  const double bits = 8.0 * (big.packed.numel() + big.absmax_q.numel() + 4.0 * big.absmax_scale.numel() + 4) / (2048.0 * 768);
  CHECK(bits == Approx(4.0 + 8.0 / 64 + 32.0 / (64 * 256)).epsilon(1e-4));
}

TEST_CASE("Nf4Linear equals the dequantised matmul, forward and backward, few rows and across row chunks",
          "[qlora][nf4]") {
  torch::manual_seed(6);
  // 8192 x 1024 = 8M weights: two chunks of 4M.
  Nf4Linear lin(1024, 8192, true);
  auto w = torch::randn({8192, 1024}) * 0.02, b = torch::randn({8192});
  lin->set_weight(w, b);
  auto wd = lin->dequantized_weight().to(torch::kFloat64);
  for (int64_t rows : {3, 16}) {  // 3: straight from the codes (decoding path); 16: chunked dequantisation
    INFO("rows " << rows);
    auto x = torch::randn({rows, 1024}, torch::requires_grad());
    auto y = lin->forward(x);
    auto ref = torch::matmul(x.detach().to(torch::kFloat64), wd.t()) + b.to(torch::kFloat64);
    CHECK(testing::max_rel_err(y, ref) < 1e-5);
    auto g = torch::randn({rows, 8192});
    y.backward(g);
    CHECK(testing::max_rel_err(x.grad(), torch::matmul(g.to(torch::kFloat64), wd)) < 1e-5);
  }
  CHECK(lin->parameters().empty());  // nothing to train, nothing for the optimizer
}

TEST_CASE("NF4 few-row product (SIMD and scalar) equals a naive decode of the stored bytes", "[qlora][nf4]") {
  torch::manual_seed(12);
  // 3 blocks per row and an odd number of rows; then 12 blocks per row, whose row 21 straddles two absmax scales
  // (blocks 252 .. 263), so the vectorised block-scale decoding meets both of its cases.
  for (const int64_t in : {192, 768}) {
    const int64_t out = 37;
    auto q = quant::nf4_quantize(torch::randn({out, in}) * 0.05);
    // Naive decode in float64: absmax from its double quantisation, then table[code] * absmax per value.
    auto W = torch::empty({out, in}, torch::kFloat64);
    const auto* p = q.packed.data_ptr<uint8_t>();
    const auto* aq = q.absmax_q.data_ptr<uint8_t>();
    const auto* sc = q.absmax_scale.data_ptr<float>();
    const auto& map = quant::dynamic_map_values();
    const double mean = q.absmax_mean.item<float>();
    for (int64_t i = 0; i < out * in; ++i) {
      const int64_t blk = i / 64;
      const double absmax = static_cast<double>(map[aq[blk]]) * sc[blk / 256] + mean;
      const int code = i % 2 == 0 ? p[i / 2] >> 4 : p[i / 2] & 15;
      W.view(-1)[i] = kTable[code] * absmax;
    }
    for (int64_t rows = 1; rows <= quant::kNf4FewRows; ++rows)
      for (int simd : {2, 1, 0}) {
        INFO("in " << in << " rows " << rows << " simd " << simd);
        auto x = torch::randn({rows, in});
        auto y = quant::nf4_matmul_few_rows_cpu(x, q, simd);
        REQUIRE(y.sizes() == torch::IntArrayRef({rows, out}));
        CHECK(testing::max_rel_err(y, torch::matmul(x.to(torch::kFloat64), W.t())) < 1e-5);
      }
    CHECK_THROWS_WITH(quant::nf4_matmul_few_rows_cpu(torch::randn({quant::kNf4FewRows + 1, in}), q),
                      ContainsText("N <= 8"));
  }
}

TEST_CASE("LoRALinear: B = 0 gives the base, otherwise base + alpha/r B A x", "[qlora][lora]") {
  torch::manual_seed(7);
  auto base = std::make_shared<PlainLinearImpl>(64, 32, true);
  LoRALinear lora(base, 4, 8.0, 0.0);
  auto x = torch::randn({5, 64});
  CHECK(torch::equal(lora->forward(x), base->forward(x)));
  {
    torch::NoGradGuard ng;
    lora->lora_B->weight.normal_();
  }
  auto expect = base->forward(x).to(torch::kFloat64) +
                (8.0 / 4.0) * torch::matmul(torch::matmul(x.to(torch::kFloat64), lora->lora_A->weight.to(torch::kFloat64).t()),
                                            lora->lora_B->weight.to(torch::kFloat64).t());
  CHECK(testing::max_rel_err(lora->forward(x), expect) < 1e-5);
  CHECK(lora->lora_A->weight.sizes() == torch::IntArrayRef({4, 64}));
  // A is Kaiming-uniform with a = sqrt(5): bound 1 / sqrt(in)
  CHECK(lora->lora_A->weight.abs().max().item<double>() <= 1.0 / std::sqrt(64.0));
  CHECK_FALSE(base->weight.requires_grad());
}

TEST_CASE("QLoRA model: only adapters get gradients, PEFT adapter files round trip", "[qlora]") {
  torch::manual_seed(8);
  Config c = testing::tiny_qlora("nf4");
  auto builder = make_linear_builder(c);
  OmniLite model(c.model, *builder);
  train_adapters_only(*model);
  {  // non-zero B so that A gets gradients too
    torch::NoGradGuard ng;
    for (auto& p : model->named_parameters())
      if (p.key().find(".lora_B.") != std::string::npos) p.value().normal_(0, 0.01);
  }
  auto tokens = torch::randint(7, 64, {2, 12}, torch::kInt64);
  auto out = model->forward({tokens});
  out.logits.square().mean().backward();
  int64_t adapters = 0;
  for (auto& p : model->named_parameters()) {
    const bool is_adapter = p.key().find(".lora_") != std::string::npos;
    INFO(p.key());
    if (is_adapter) {
      ++adapters;
      // text-only input: the text adapters get gradients (vision and resampler ones have no input here)
      if (p.key().rfind("text.", 0) == 0) REQUIRE(p.value().grad().defined());
    } else {
      CHECK_FALSE(p.value().grad().defined());
    }
  }
  CHECK(adapters > 0);
  // The q_proj base is NF4 and wrapped; names follow PEFT.
  auto named = model->named_parameters();
  CHECK(named.contains("text.layers.0.self_attn.q_proj.lora_A.weight"));
  auto buffers = model->named_buffers();
  CHECK(buffers.contains("text.layers.0.self_attn.q_proj.base_layer.weight_packed"));

  const auto dir = testing::fresh_temp_dir("adapter");
  io::save_adapter(*model, c.lora, dir);
  io::SafetensorsReader r(dir + "/adapter_model.safetensors");
  CHECK(r.contains("base_model.model.text.layers.0.self_attn.q_proj.lora_A.weight"));
  CHECK(r.contains("base_model.model.text.layers.1.moe.experts.3.w2.lora_B.weight"));
  std::ifstream f(dir + "/adapter_config.json");
  auto cfg = nlohmann::json::parse(f);
  CHECK(cfg["r"] == 4);
  CHECK(cfg["lora_alpha"].get<double>() == 8.0);
  CHECK(cfg["peft_type"] == "LORA");
  torch::manual_seed(9);
  OmniLite other(c.model, *builder);
  io::load_adapter(*other, dir);
  CHECK(torch::equal(other->named_parameters()["text.layers.1.moe.experts.3.w2.lora_B.weight"],
                     named["text.layers.1.moe.experts.3.w2.lora_B.weight"]));
  Config c8 = c;
  c8.lora.rank = 8;
  OmniLite wrong_rank(c8.model, *make_linear_builder(c8));
  CHECK_THROWS_WITH(io::load_adapter(*wrong_rank, dir), ContainsText("has shape") && ContainsText("lora.rank"));
}

TEST_CASE("PEFT layout: each delta from PEFT's stacked expert pairs equals OMNI-LITE's, and reads back exactly",
          "[qlora][peft]") {
  torch::manual_seed(21);
  Config c = testing::tiny_qlora("fp32");
  OmniLite model(c.model, *make_linear_builder(c));
  {
    torch::NoGradGuard ng;
    for (auto& p : model->named_parameters())
      if (p.key().find(".lora_B.") != std::string::npos) p.value().normal_(0, 0.02);
  }
  const auto dir = testing::fresh_temp_dir("peft_layout");
  io::save_adapter(*model, c.lora, dir + "/omni");
  const auto res = io::write_peft_adapter(dir + "/omni", c, dir + "/peft");
  CHECK_FALSE(res.skipped.empty());  // the vision and resampler adapters have no place in PEFT's Mixtral
  const int64_t r = c.lora.rank, R = res.rank, E = c.model.moe.num_experts, I = c.model.moe.expert_hidden;
  REQUIRE(R == 2 * r);
  std::ifstream f(dir + "/peft/adapter_config.json");
  const auto pc = nlohmann::json::parse(f);
  const double peft_scale = pc["lora_alpha"].get<double>() / pc["r"].get<double>(), scale = c.lora.alpha / r;
  CHECK(peft_scale == Approx(scale));
  io::SafetensorsReader pr(dir + "/peft/adapter_model.safetensors");
  auto params = model->named_parameters();
  auto delta = [&](const std::string& m) {  // OMNI-LITE's (alpha / r) B A of a projection, in double
    return params[m + ".lora_B.weight"].to(torch::kFloat64).matmul(params[m + ".lora_A.weight"].to(torch::kFloat64)) *
           scale;
  };
  for (int64_t l = 0; l < c.model.text.num_layers; ++l) {
    const std::string hf = "base_model.model.model.layers." + std::to_string(l) + ".";
    // PEFT's ParamWrapper.get_delta_weight for (experts, out, in) parameters, written out by its definition:
    // A [R*E, in] -> (E, R, in); B [out, R*E] -> (out, R, E); delta_e[o, i] = sum_k B[o, k, e] A[e, k, i] * scale.
    auto peft_delta = [&](const std::string& prefix, int64_t e) {
      auto a = pr.load(prefix + "lora_A.weight").to(torch::kFloat64);
      auto b = pr.load(prefix + "lora_B.weight").to(torch::kFloat64);
      auto ae = a.view({E, R, a.size(1)}).select(0, e);   // [R, in]
      auto be = b.view({b.size(0), R, E}).select(2, e);   // [out, R]
      return be.matmul(ae) * peft_scale;
    };
    for (int64_t e = 0; e < E; ++e) {
      const std::string p = "text.layers." + std::to_string(l) + ".moe.experts." + std::to_string(e) + ".";
      INFO(p);
      auto gate_up = peft_delta(hf + "mlp.experts.base_layer.", e);  // [2I, H]
      CHECK(testing::max_rel_err(gate_up.narrow(0, 0, I), delta(p + "w1")) < 1e-12);
      CHECK(testing::max_rel_err(gate_up.narrow(0, I, I), delta(p + "w3")) < 1e-12);
      CHECK(testing::max_rel_err(peft_delta(hf + "mlp.experts.", e), delta(p + "w2")) < 1e-12);
    }
    const std::string q = hf + "self_attn.q_proj.";
    auto pq = pr.load(q + "lora_B.weight").to(torch::kFloat64).matmul(pr.load(q + "lora_A.weight").to(torch::kFloat64));
    CHECK(testing::max_rel_err(pq * peft_scale, delta("text.layers." + std::to_string(l) + ".self_attn.q_proj")) < 1e-12);
  }
  // Read back: every text adapter's delta is the model's (w1 and w3 now share A; R = 2r).
  const auto back = io::read_peft_adapter(dir + "/peft", c.model);
  CHECK(back.lora.rank == R);
  Config c2 = c;
  c2.lora = back.lora;
  c2.lora.base_dtype = "fp32";
  OmniLite other(c2.model, *make_linear_builder(c2));
  CHECK(io::load_adapter_tensors(*other, back.tensors, "test").empty());
  auto oparams = other->named_parameters();
  const double scale2 = back.lora.alpha / back.lora.rank;
  for (const auto& m : {"text.layers.0.self_attn.k_proj", "text.layers.1.moe.experts.2.w1", "text.layers.1.moe.experts.2.w3",
                        "text.layers.0.moe.experts.0.w2"}) {
    INFO(m);
    auto d = oparams[std::string(m) + ".lora_B.weight"].to(torch::kFloat64)
                 .matmul(oparams[std::string(m) + ".lora_A.weight"].to(torch::kFloat64)) * scale2;
    CHECK(testing::max_rel_err(d, delta(m)) < 1e-12);
  }
}

TEST_CASE("base checkpoints load into QLoRA models quantised, bad ones are refused by name", "[qlora]") {
  torch::manual_seed(10);
  const auto dir = testing::fresh_temp_dir("qlora_base");
  Config plain_cfg = testing::load("configs/tiny.json");
  OmniLite plain(plain_cfg.model);
  io::save_module(*plain, dir + "/model.safetensors");
  auto tokens = torch::randint(7, 64, {2, 10}, torch::kInt64);
  torch::NoGradGuard ng;
  auto ref = plain->forward({tokens}).logits;

  // fp32 bases with fresh adapters (B = 0): the same logits.
  OmniLite full(testing::tiny_qlora("fp32").model, *make_linear_builder(testing::tiny_qlora("fp32")));
  io::load_base_weights(*full, dir);
  CHECK(testing::max_rel_err(full->forward({tokens}).logits, ref) < 1e-6);
  // NF4 bases: the logits of the dequantised weights, close to the original ones.
  OmniLite nf4(testing::tiny_qlora("nf4").model, *make_linear_builder(testing::tiny_qlora("nf4")));
  io::load_base_weights(*nf4, dir);
  auto nf4_logits = nf4->forward({tokens}).logits;
  // Parity: the plain model with each NF4 base's dequantised weight gives the same logits.
  OmniLite deq(plain_cfg.model);
  io::load_module(*deq, dir + "/model.safetensors");
  auto deq_params = deq->named_parameters();
  int64_t replaced = 0;
  for (const auto& m : nf4->named_modules())
    if (auto* q = dynamic_cast<Nf4LinearImpl*>(m.value().get())) {
      std::string path = m.key();
      const auto bl = path.find(".base_layer");
      if (bl != std::string::npos) path.erase(bl);
      deq_params[path + ".weight"].copy_(q->dequantized_weight());
      ++replaced;
    }
  CHECK(replaced > 10);
  CHECK(testing::max_rel_err(nf4_logits, deq->forward({tokens}).logits) < 1e-5);
  const double err = testing::max_rel_err(nf4_logits, ref);
  INFO("NF4 vs original logits error " << err);
  CHECK(err > 0);
  CHECK(err < 0.2);

  // Missing, extra and mis-shaped tensors are named.
  auto tensors = io::state_tensors(*plain);
  auto write_variant = [&](const std::string& name, auto&& edit) {
    auto t = tensors;
    edit(t);
    io::save_safetensors(dir + "/" + name, t);
    return dir + "/" + name;
  };
  auto missing = write_variant("missing.safetensors", [](auto& t) {
    t.erase(std::remove_if(t.begin(), t.end(), [](auto& p) { return p.first == "text.layers.1.self_attn.k_proj.weight"; }), t.end());
  });
  CHECK_THROWS_WITH(io::load_base_weights(*nf4, missing), ContainsText("missing \"text.layers.1.self_attn.k_proj.weight\""));
  auto extra = write_variant("extra.safetensors", [](auto& t) { t.emplace_back("text.layers.9.extra.weight", torch::zeros({2})); });
  CHECK_THROWS_WITH(io::load_base_weights(*nf4, extra), ContainsText("unexpected \"text.layers.9.extra.weight\""));
  auto shaped = write_variant("shaped.safetensors", [](auto& t) {
    for (auto& p : t)
      if (p.first == "text.layers.0.moe.experts.2.w1.weight") p.second = torch::zeros({8, 64});
  });
  CHECK_THROWS_WITH(io::load_base_weights(*nf4, shaped), ContainsText("text.layers.0.moe.experts.2.w1.weight") &&
                                                             ContainsText("has shape"));
}

TEST_CASE("a tiny QLoRA run learns with adapters only", "[qlora][train][slow]") {
  const auto base = testing::fresh_temp_dir("qlora_run");
  const auto [corpus, tok] = testing::word_corpus_and_tokenizer(base + "/data");
  Config c = testing::tiny_qlora("nf4");
  c.model.text.vocab_size = 320;
  c.lora.rank = 8;
  c.data.tokenizer = tok;
  c.data.text_train = {corpus};
  c.data.text_valid = {corpus};
  c.train.batch_size = 4;
  c.train.seq_len = 32;
  c.train.lr = 1e-2;
  c.train.warmup_steps = 2;
  c.train.steps = 24;
  c.train.log_every = 100;
  c.train.ckpt_every = 24;
  {
    torch::manual_seed(1);
    Config plain = c;
    plain.lora.enabled = false;
    OmniLite m(plain.model);
    io::save_module(*m, base + "/base.safetensors");
  }
  c.train.base_checkpoint = base + "/base.safetensors";
  TrainRunOptions r;
  r.out_dir = base + "/run";
  const auto res = train(c, r);
  INFO("loss " << res.first_loss << " -> " << res.last_loss);
  // The base (embedding, LM head included) is random and frozen: the adapters alone bring the loss down.
  CHECK(res.last_loss < res.first_loss - 0.3);
  const auto ck = io::latest_checkpoint(r.out_dir);
  CHECK(fs::exists(ck + "/adapter_model.safetensors"));
  CHECK(fs::exists(ck + "/adapter_config.json"));
  CHECK_FALSE(fs::exists(ck + "/model.safetensors"));
  // Without base weights the run is refused before step 1.
  c.train.base_checkpoint.clear();
  CHECK_THROWS_WITH(train(c, r), ContainsText("train.base_checkpoint"));
}

// The configuration users run (configs/qlora-omni-lite.json): NF4 base, LoRA dropout 0.05 and activation
// checkpointing together. The checkpointed backward recomputes each layer; it must draw the forward's dropout masks
// (and so route the same tokens), and leave the generators where plain backward leaves them.
TEST_CASE("activation checkpointing with LoRA dropout gives plain backward's gradients", "[qlora][checkpointing]") {
  torch::manual_seed(21);
  Config c = testing::tiny_qlora("nf4");
  c.lora.dropout = 0.05;
  OmniLite model(c.model, *make_linear_builder(c));
  train_adapters_only(*model);
  {
    torch::NoGradGuard ng;
    for (auto& p : model->named_parameters())
      if (p.key().find(".lora_B.") != std::string::npos) p.value().normal_(0, 0.05);
  }
  model->train();
  auto tokens = torch::randint(7, 64, {2, 16}, torch::kInt64);
  struct Run {
    std::vector<torch::Tensor> grads;
    torch::Tensor next_draw;  // what the generator gives after backward
  };
  auto run = [&](bool ckpt) {
    model->zero_grad();
    model->text->checkpoint_layers = ckpt;
    torch::manual_seed(5);
    auto out = model->forward({tokens});
    auto loss = clm_loss(out.logits, tokens, tokens.ne(0)) + 0.01 * load_balancing_loss(out.router_logits, 2);
    loss.backward();
    Run r;
    for (const auto& p : model->parameters())
      if (p.requires_grad()) r.grads.push_back(p.grad().defined() ? p.grad().clone() : torch::zeros_like(p));
    r.next_draw = torch::rand({4});
    return r;
  };
  const auto plain = run(false), ckpt = run(true);
  REQUIRE(plain.grads.size() == ckpt.grads.size());
  double worst = 0, norm = 0;
  for (size_t i = 0; i < plain.grads.size(); ++i) {
    worst = std::max(worst, testing::max_rel_err(ckpt.grads[i], plain.grads[i]));
    norm += plain.grads[i].abs().sum().item<double>();
  }
  INFO("max relative gradient difference " << worst);
  CHECK(worst < 1e-6);
  CHECK(norm > 0);  // the adapters do get gradients: the comparison is not vacuous
  // The recomputation's draws are undone: the run continues with the same random numbers either way.
  CHECK(torch::equal(plain.next_draw, ckpt.next_draw));
  // Dropout is really on: two plain runs from different seeds differ.
  model->text->checkpoint_layers = false;
  torch::manual_seed(6);
  model->zero_grad();
  auto out = model->forward({tokens});
  (clm_loss(out.logits, tokens, tokens.ne(0)) + 0.01 * load_balancing_loss(out.router_logits, 2)).backward();
  double other = 0;
  size_t i = 0;
  for (const auto& p : model->parameters())
    if (p.requires_grad()) {
      if (p.grad().defined()) other = std::max(other, testing::max_rel_err(p.grad(), plain.grads[i]));
      ++i;
    }
  CHECK(other > 1e-4);
}

TEST_CASE("QLoRA on the CPU keeps a bf16 base's frozen tables in bf16, with the float32 tables' loss and gradients",
          "[qlora][bf16]") {
  Config c = testing::tiny_qlora("nf4");
  auto make = [&] {
    torch::manual_seed(31);
    OmniLite m(c.model, *make_linear_builder(c));
    train_adapters_only(*m);
    torch::NoGradGuard ng;
    for (auto* t : {&m->text->embed_tokens->weight, &m->lm_head->weight}) t->copy_(t->to(torch::kBFloat16));
    for (auto& p : m->named_parameters())
      if (p.key().find(".lora_B.") != std::string::npos) p.value().normal_(0, 0.05);
    m->eval();  // no dropout: both models draw nothing
    return m;
  };
  OmniLite narrow = make(), wide = make();
  REQUIRE(narrow_frozen_tables(*narrow) == 2);
  CHECK(narrow->text->embed_tokens->weight.scalar_type() == torch::kBFloat16);
  CHECK(narrow->lm_head->weight.scalar_type() == torch::kBFloat16);
  auto tokens = torch::randint(7, c.model.text.vocab_size, {2, 12}, torch::kInt64);
  auto loss_and_grads = [&](OmniLite& m) {
    OmniInput in;
    in.tokens = tokens;
    in.compute_logits = false;
    auto out = m->forward(in);
    auto loss = clm_loss_sum(out.hidden, m->lm_head->table(), tokens, torch::ones({2, 12}, torch::kBool));
    std::vector<torch::Tensor> params;
    for (auto& p : m->parameters())
      if (p.requires_grad()) params.push_back(p);
    auto grads = torch::autograd::grad({loss}, params, {}, c10::nullopt, false, /*allow_unused=*/true);
    return std::pair{loss, grads};
  };
  const auto [ln, gn] = loss_and_grads(narrow);
  const auto [lw, gw] = loss_and_grads(wide);
  CHECK(ln.item<double>() == Approx(lw.item<double>()).epsilon(1e-6));
  REQUIRE(gn.size() == gw.size());
  double worst = 0;
  int64_t used = 0;  // the text adapters (the vision tower's get no gradient from text rows)
  for (size_t i = 0; i < gn.size(); ++i) {
    REQUIRE(gn[i].defined() == gw[i].defined());
    if (!gn[i].defined()) continue;
    worst = std::max(worst, testing::max_rel_err(gn[i], gw[i]));
    ++used;
  }
  CHECK(used > 4);
  CHECK(worst < 1e-5);
  // a trainable head, or values that are not bf16 values, stay float32
  OmniLite other = make();
  other->lm_head->weight.set_requires_grad(true);
  {
    torch::NoGradGuard ng;
    other->text->embed_tokens->weight.add_(1e-4);
  }
  CHECK(narrow_frozen_tables(*other) == 0);
  CHECK(other->lm_head->weight.scalar_type() == torch::kFloat32);
  CHECK(other->text->embed_tokens->weight.scalar_type() == torch::kFloat32);
}
