// The lean one-token decoding step (infer/text_step.h) against the module path, and the one-row NF4 kernel with
// int16 inputs (quant/nf4.h) against its scalar twin and a float64 product.
#include "catch_compat.h"

#include <cmath>

#include "helpers.h"
#include "omnilite/infer/generate.h"
#include "omnilite/infer/text_step.h"
#include "omnilite/modules/linear.h"
#include "omnilite/modules/lora_linear.h"
#include "omnilite/modules/nf4_linear.h"
#include "omnilite/modules/qlora_builder.h"
#include "omnilite/quant/nf4.h"

using namespace omnilite;

namespace {

// dequant(W) [out, in] in float64, from the codes and the double-quantised block scales (a naive loop).
torch::Tensor dequant_f64(const quant::Nf4Tensor& q) {
  const int64_t out = q.shape[0], in = q.shape[1];
  auto W = torch::empty({out * in}, torch::kFloat64);
  const auto* p = q.packed.data_ptr<uint8_t>();
  const auto* aq = q.absmax_q.data_ptr<uint8_t>();
  const auto* sc = q.absmax_scale.data_ptr<float>();
  const auto& map = quant::dynamic_map_values();
  const auto& code = quant::nf4_code_values();
  const float mean = q.absmax_mean.item<float>();
  auto* w = W.data_ptr<double>();
  for (int64_t i = 0; i < out * in; ++i) {
    const int64_t blk = i / 64;
    const float absmax = map[aq[blk]] * sc[blk / 256] + mean;  // as the kernels decode it, in float32
    const int c = i % 2 == 0 ? p[i / 2] >> 4 : p[i / 2] & 15;
    w[i] = static_cast<double>(code[static_cast<size_t>(c)]) * absmax;
  }
  return W.view({out, in});
}

// tiny.json with widths the one-row NF4 kernel takes (multiples of 64) and RoPE over part of each head.
Config step_config() {
  Config c = testing::load("configs/tiny.json");
  c.model.moe.expert_hidden = 64;
  c.model.text.rope_dim = 8;  // of head_dim 16
  return c;
}

// Decodes `ids` one by one after a module-path prefill of `prefix`, through the modules of `model` and through
// TextStep over `stepped` (default: the same model), and returns the largest normalised logit difference.
double step_vs_modules(OmniLiteImpl& model, const std::vector<int64_t>& prefix, const std::vector<int64_t>& ids,
                       OmniLiteImpl* stepped = nullptr) {
  if (!stepped) stepped = &model;
  torch::NoGradGuard ng;
  KVCache a, b;
  auto prefill = [&](OmniLiteImpl& m, KVCache& c) {
    if (prefix.empty()) return;
    OmniInput in;
    in.tokens = torch::tensor(prefix, torch::kInt64).view({1, -1});
    in.cache = &c;
    m.forward(in);
  };
  prefill(model, a);
  prefill(*stepped, b);
  TextStep step(*stepped);
  double worst = 0;
  for (const int64_t id : ids) {
    OmniInput in;
    in.tokens = torch::full({1, 1}, id, torch::kInt64);
    in.cache = &a;
    const auto ref = model.forward(in).logits.view({-1});
    REQUIRE(step.accepts(id, b));
    const auto got = step.logits(id, b);
    REQUIRE(got.sizes() == ref.sizes());
    worst = std::max(worst, testing::max_rel_err(got, ref));
    REQUIRE(b.length() == a.length());
  }
  for (size_t l = 0; l < a.layers.size(); ++l) {  // the caches hold the same keys and values
    CHECK(testing::max_rel_err(b.layers[l].k, a.layers[l].k) < 1e-5);
    CHECK(testing::max_rel_err(b.layers[l].v, a.layers[l].v) < 1e-5);
  }
  return worst;
}

}  // namespace

TEST_CASE("NF4 int16 inputs: AVX2 equals its scalar twin bit for bit, and stays within the rounding bound",
          "[qlora][nf4][int16]") {
  torch::manual_seed(41);
  const auto& code16 = [] {
    std::array<double, 16> c{};
    for (int k = 0; k < 16; ++k) c[static_cast<size_t>(k)] = std::lrint(quant::nf4_code_values()[k] * 16383.0);
    return c;
  }();
  CHECK(code16[0] == -16383);
  CHECK(code16[15] == 16383);
  for (const int64_t in : {64, 192, 2048}) {
    const int64_t out = 37;
    auto q = quant::nf4_quantize(torch::randn({out, in}) * 0.05);
    const auto W = dequant_f64(q);
    auto x = torch::randn({in}) * 3;
    x.narrow(0, 0, 64).mul_(1e-3);  // blocks of very different scales
    if (in >= 192) x.narrow(0, 64, 64).zero_();  // an all-zero block (scale 0)
    x[in - 1] = 40.0;  // one large value in the last block
    const auto ref = torch::mv(W, x.to(torch::kFloat64));
    // The rounding bound per row: sum_i |W_i| dx_b + absmax_b |x_i| dc (dx_b = 0.5 max_b |x| / 16383 for an input,
    // dc = 0.5 / 16383 for a code value; absmax_b = the block's max |W|, as its largest code is +-1), 1% for the
    // product of both, plus float32 rounding of the block sums (4e-6 of sum |W_i x_i|).
    const auto xa = x.to(torch::kFloat64).abs();
    const auto dx = (xa.view({in / 64, 64}).amax(1, true) * (0.5 / 16383)).expand({in / 64, 64}).reshape({in});
    const auto Wa = W.abs();
    const auto absmax = Wa.view({out, in / 64, 64}).amax(2, true).expand({out, in / 64, 64}).reshape({out, in});
    const auto bound =
        (torch::mv(Wa, dx) + torch::mv(absmax, xa) * (0.5 / 16383)) * 1.01 + torch::mv(Wa, xa) * 4e-6;
    std::vector<torch::Tensor> ys;
    for (int simd : {1, 0}) {
      INFO("in " << in << " simd " << simd);
      auto y = quant::nf4_matmul_few_rows_cpu(x.view({1, -1}), q, simd, quant::Nf4Activations::Int16).view({-1});
      const auto err = (y.to(torch::kFloat64) - ref).abs();
      CHECK((err <= bound).all().item<bool>());
      CHECK(err.max().item<double>() > 0);  // rounded, not the exact product
      ys.push_back(y);
    }
    CHECK(torch::equal(ys[0], ys[1]));  // same float32 bits
    // Float32 (the default) stays the exact product; Int16's error is ~1e-4 relative here
    auto exact = quant::nf4_matmul_few_rows_cpu(x.view({1, -1}), q).view({-1});
    CHECK(testing::max_rel_err(exact, ref) < 1e-5);
    CHECK(testing::max_rel_err(ys[0], ref) < 1e-3);
  }
}

TEST_CASE("NF4 int16 inputs: Nf4Linear uses them for one row without gradients only, and bad names are refused",
          "[qlora][nf4][int16]") {
  torch::manual_seed(42);
  Nf4Linear l(128, 48, false);
  l->set_weight(torch::randn({48, 128}) * 0.05);
  const auto x = torch::randn({1, 128});
  torch::Tensor exact, int16;
  {
    torch::NoGradGuard ng;
    exact = l->forward(x);
    set_nf4_activations(*l, quant::Nf4Activations::Int16);
    int16 = l->forward(x);
  }
  CHECK_FALSE(torch::equal(exact, int16));
  CHECK(testing::max_rel_err(int16, exact) < 1e-3);
  auto xg = x.clone().requires_grad_(true);
  CHECK(torch::equal(l->forward(xg).detach(), exact));  // with gradients: always the exact product
  CHECK_THROWS_WITH(quant::parse_nf4_activations("int8"), ContainsText("\"int8\""));
  Config c = testing::load("configs/tiny.json");
  c.runtime.nf4_activations = "int4";
  CHECK_THROWS_WITH(validate(c), ContainsText("runtime.nf4_activations"));
}

TEST_CASE("TextStep: float32 model gives the module path's logits and cache", "[infer][text_step]") {
  Config c = step_config();
  torch::manual_seed(43);
  OmniLite model(c.model);
  model->eval();
  REQUIRE(text_step_obstacle(*model).empty());
  // from an empty cache, and after a prefix (the storage grows by doubling along the way)
  CHECK(step_vs_modules(*model, {}, {5, 17, 33, 9, 60, 21, 8, 44, 12}) < 1e-5);
  CHECK(step_vs_modules(*model, {1, 30, 31, 32}, {40, 41, 7, 19, 55}) < 1e-5);
}

TEST_CASE("TextStep: QLoRA (NF4 bases, LoRA with dropout in eval, bf16 head) gives the module path's logits",
          "[infer][text_step][qlora]") {
  Config c = testing::tiny_qlora();
  c.model.moe.expert_hidden = 64;
  c.lora.dropout = 0.1;  // the default users run; eval() turns it off in both paths
  torch::manual_seed(44);
  OmniLite model(c.model, *make_linear_builder(c));
  torch::NoGradGuard ng;
  int64_t adapters = 0;
  for (const auto& m : model->modules())
    if (auto* lora = dynamic_cast<LoRALinearImpl*>(m.get())) {
      lora->lora_B->weight.normal_(0, 0.05);  // a trained adapter, not the zero start
      ++adapters;
    }
  REQUIRE(adapters > 0);
  auto& head = model->lm_head->weight;
  head.copy_(head.to(torch::kBFloat16));
  REQUIRE(model->lm_head->store_bf16_if_exact());
  model->eval();
  REQUIRE(text_step_obstacle(*model).empty());
  CHECK(step_vs_modules(*model, {1, 12, 13}, {20, 21, 22, 23, 24, 25}) < 1e-5);
  // int16 inputs in both paths: the same kernel, so the same logits again
  set_nf4_activations(*model, quant::Nf4Activations::Int16);
  CHECK(step_vs_modules(*model, {1, 12, 13}, {20, 21, 22, 23}) < 1e-5);
}

TEST_CASE("TextStep: a bf16 model gives the logits of the float32 model with its values, after a bf16 prompt too",
          "[infer][text_step][bf16]") {
  Config c = step_config();
  torch::manual_seed(47);
  OmniLite bf16(c.model);
  torch::manual_seed(47);
  OmniLite f32(c.model);
  bf16->to(torch::kBFloat16);
  {
    torch::NoGradGuard ng;
    for (auto& p : f32->parameters()) p.copy_(p.to(torch::kBFloat16));  // the same values in float32
  }
  bf16->eval();
  f32->eval();
  REQUIRE(text_step_obstacle(*bf16).empty());
  REQUIRE(bf16->text->layers[0]->as<DecoderLayerImpl>()->moe->gate->weight.scalar_type() == torch::kBFloat16);
  // from an empty cache: the step's float32 activations and cache against the float32 model's module path
  CHECK(step_vs_modules(*f32, {}, {5, 17, 33, 9, 60, 21, 8}, bf16.get()) < 1e-5);

  // after a prompt through the bf16 modules: the step takes their bf16 cache (widened once), and the logits follow
  // the bf16 module path within bf16 activation rounding
  torch::NoGradGuard ng;
  KVCache mod, stp;
  const std::vector<int64_t> prompt{1, 30, 31, 32, 33};
  for (KVCache* cache : {&mod, &stp}) {
    OmniInput in;
    in.tokens = torch::tensor(prompt, torch::kInt64).view({1, -1});
    in.cache = cache;
    bf16->forward(in);
  }
  REQUIRE(stp.layers[0].k.scalar_type() == torch::kBFloat16);
  TextStep step(*bf16);
  for (const int64_t id : {40, 41, 7}) {
    OmniInput in;
    in.tokens = torch::full({1, 1}, id, torch::kInt64);
    in.cache = &mod;
    const auto ref = bf16->forward(in).logits.view({-1});
    REQUIRE(step.accepts(id, stp));
    const auto got = step.logits(id, stp);
    CHECK(testing::max_rel_err(got, ref) < 3e-2);
    CHECK(got.argmax().item<int64_t>() == ref.argmax().item<int64_t>());
  }
  CHECK(stp.layers[0].k.scalar_type() == torch::kFloat32);
  CHECK(stp.length() == static_cast<int64_t>(prompt.size()) + 3);
  CHECK(testing::max_rel_err(stp.layers[1].k, mod.layers[1].k) < 3e-2);
  // the module path can go on from the step's float32 cache (LayerKV::write converts it back)
  OmniInput in;
  in.tokens = torch::full({1, 2}, 9, torch::kInt64);
  in.cache = &stp;
  const auto more = bf16->forward(in).logits;
  CHECK(stp.length() == static_cast<int64_t>(prompt.size()) + 5);
  CHECK(torch::isfinite(more).all().item<bool>());
}

TEST_CASE("TextStep: what it refuses, and generation takes it with the tokens of the module path",
          "[infer][text_step]") {
  Config c = step_config();
  torch::manual_seed(45);
  OmniLite model(c.model);
  model->eval();
  TextStep step(*model);
  KVCache cache;
  CHECK_FALSE(step.accepts(c.model.tokens.image_id, cache));  // placeholders need the module path
  CHECK_FALSE(step.accepts(c.model.text.vocab_size, cache));
  cache.append = false;
  CHECK_FALSE(step.accepts(5, cache));
  cache.append = true;
  CHECK(step.accepts(5, cache));
  CHECK_THROWS_WITH(step.logits(c.model.tokens.image_id, cache), ContainsText("module path"));
  {
    torch::NoGradGuard ng;  // a batch of 2 in the cache
    OmniInput in;
    in.tokens = torch::full({2, 3}, 7, torch::kInt64);
    in.cache = &cache;
    model->forward(in);
    CHECK_FALSE(step.accepts(5, cache));
  }
  OmniLite half(c.model);
  half->to(torch::kHalf);
  CHECK_THAT(text_step_obstacle(*half), ContainsText("text.embed_tokens"));
  CHECK_THROWS_WITH(TextStep(*half), ContainsText("float32 or bf16"));

  // greedy generation (which takes the step) against a module-path loop
  const std::vector<int64_t> prompt{1, 20, 21};
  TextSampling greedy;
  greedy.temperature = 0;
  const auto got = generate_text(*model, prompt, 12, greedy);
  torch::NoGradGuard ng;
  KVCache ref_cache;
  std::vector<int64_t> ref;
  auto tokens = torch::tensor(prompt, torch::kInt64).view({1, -1});
  for (int i = 0; i < 12; ++i) {
    OmniInput in;
    in.tokens = tokens;
    in.cache = &ref_cache;
    auto logits = model->forward(in).logits[0][-1].clone();
    for (int64_t id : {c.model.tokens.image_id, c.model.tokens.gen_image_id})
      logits[id] = -std::numeric_limits<float>::infinity();
    const int64_t next = logits.argmax().item<int64_t>();
    ref.push_back(next);
    if (next == c.model.tokens.eos_id) break;
    tokens = torch::full({1, 1}, next, torch::kInt64);
  }
  CHECK(got == ref);

  // greedy_generate (captions, VQA) with one row: the step after the prefix, the module path's argmax tokens
  const auto prefix = torch::tensor(prompt, torch::kInt64).view({1, -1});
  const auto gen = greedy_generate(*model, prefix, torch::Tensor(), 6);  // [1, 6]
  KVCache c2;
  tokens = prefix;
  for (int64_t i = 0; i < 6; ++i) {
    OmniInput in;
    in.tokens = tokens;
    in.cache = &c2;
    const int64_t next = model->forward(in).logits[0][-1].argmax().item<int64_t>();
    CHECK(gen[0][i].item<int64_t>() == next);
    if (next == c.model.tokens.eos_id) break;
    tokens = torch::full({1, 1}, next, torch::kInt64);
  }
}

TEST_CASE("PlainLinear: bf16 rows on the CPU without gradients equal the float64 product rounded to bf16",
          "[infer][bf16]") {
  torch::manual_seed(46);
  PlainLinearImpl l(256, 40, true);
  l.to(torch::kBFloat16);
  {
    torch::NoGradGuard ng;
    l.bias.normal_(0, 0.1);
  }
  const auto x = torch::randn({2, 7, 256}).to(torch::kBFloat16);
  torch::Tensor y;
  {
    torch::NoGradGuard ng;
    y = l.forward(x);  // the widened float32 GEMM
  }
  REQUIRE(y.scalar_type() == torch::kBFloat16);
  REQUIRE(y.sizes() == torch::IntArrayRef({2, 7, 40}));
  const auto ref = torch::matmul(x.to(torch::kFloat64), l.weight.to(torch::kFloat64).t()) + l.bias.to(torch::kFloat64);
  // within one bf16 rounding of the exact value (2^-8 relative) plus float32 summation error
  const auto err = (y.to(torch::kFloat64) - ref).abs();
  CHECK((err <= ref.abs() * (1.0 / 256) + 1e-5).all().item<bool>());
  // and mostly the very bf16 values of the exact product (a float32 sum can fall on the other side of a midpoint)
  CHECK(y.eq(ref.to(torch::kBFloat16)).to(torch::kFloat64).mean().item<double>() > 0.95);
}
