// Inference: KV-cached decoding against full recomputation, the sampler's rules, and per-token scores against an
// independent prefix-by-prefix recomputation.
#include "catch_compat.h"

#include <cmath>

#include "helpers.h"
#include "omnilite/data/mm_batch.h"
#include "omnilite/infer/generate.h"
#include "omnilite/modules/omnilite.h"
#include "omnilite/modules/rfm_head.h"
#include "omnilite/modules/linear.h"
#include "omnilite/quant/gemv.h"

using namespace omnilite;

TEST_CASE("KV-cached decoding gives the logits of full recomputation", "[infer][kv]") {
  Config c = testing::load("configs/tiny.json");
  torch::manual_seed(31);
  OmniLite model(c.model);
  model->eval();
  torch::NoGradGuard ng;
  const auto& tk = c.model.tokens;
  const int64_t L = c.model.resampler.num_latents;
  // Two rows: bos, an image (L placeholders), then text; the prefix holds the image, the rest comes one by one.
  std::vector<int64_t> row{tk.bos_id, tk.image_begin_id};
  for (int64_t i = 0; i < L; ++i) row.push_back(tk.image_id);
  row.push_back(tk.image_end_id);
  const size_t prefix = row.size() + 2;
  for (int64_t t = 0; t < 8; ++t) row.push_back(10 + (7 * t) % 50);
  auto tokens = torch::tensor(row, torch::kInt64).view({1, -1}).repeat({2, 1});
  tokens[1][prefix + 3] = 40;  // rows differ
  auto images = torch::rand({2, 3, 28, 28});
  auto full = model->forward({tokens, images}).logits;  // [2, T, V]

  KVCache cache;
  OmniInput first;
  first.tokens = tokens.narrow(1, 0, static_cast<int64_t>(prefix));
  first.images = images;
  first.cache = &cache;
  std::vector<torch::Tensor> parts{model->forward(first).logits};
  std::vector<const void*> storage;  // layer 0's key storage after each step
  for (int64_t t = static_cast<int64_t>(prefix); t < tokens.size(1); ++t) {
    OmniInput step;
    step.tokens = tokens.narrow(1, t, 1);
    step.cache = &cache;
    parts.push_back(model->forward(step).logits);
    storage.push_back(cache.layers[0].k_store.data_ptr());
  }
  // The storage doubled once (prefix -> 2 * prefix positions) and then took every token in place.
  REQUIRE(storage.size() == static_cast<size_t>(tokens.size(1)) - prefix);
  for (const void* p : storage) CHECK(p == storage[0]);
  CHECK(cache.layers[0].k_store.size(2) == 2 * static_cast<int64_t>(prefix));
  CHECK(cache.capacity_bytes() > cache.bytes());
  auto cached = torch::cat(parts, 1);
  CHECK(testing::max_rel_err(cached, full) < 1e-5);
  // The cache holds the KV heads only: [B, num_kv_heads, T, head_dim] per layer.
  REQUIRE(cache.layers.size() == static_cast<size_t>(c.model.text.num_layers));
  CHECK(cache.layers[0].k.sizes() == torch::IntArrayRef({2, c.model.text.num_kv_heads, tokens.size(1),
                                                          c.model.text.head_dim}));
  CHECK(cache.length() == tokens.size(1));
  // append = false: attended to, not stored.
  cache.append = false;
  OmniInput peek;
  peek.tokens = tokens.narrow(1, 0, 1);
  peek.cache = &cache;
  model->forward(peek);
  CHECK(cache.length() == tokens.size(1));
}

TEST_CASE("sampler: temperature 0 and top-k 1 are greedy, the seed fixes the draw, top-p keeps the nucleus",
          "[infer][sampling]") {
  auto logits = torch::tensor({1.0, 3.0, 2.5, -1.0, 0.0});
  auto gen = at::make_generator<at::CPUGeneratorImpl>(3);
  TextSampling greedy;
  greedy.temperature = 0;
  CHECK(sample_next(logits, greedy, gen) == 1);
  TextSampling k1;
  k1.temperature = 5.0;
  k1.top_k = 1;
  CHECK(sample_next(logits, k1, gen) == 1);
  // top-p 0.5: p(1) = 0.52... alone reaches 0.5, so only id 1 can be drawn, whatever the temperature.
  TextSampling nucleus;
  nucleus.temperature = 1.0;
  nucleus.top_p = 0.5;
  const double p1 = torch::softmax(logits, 0)[1].item<double>();
  REQUIRE(p1 > 0.5);
  for (int i = 0; i < 50; ++i) CHECK(sample_next(logits, nucleus, gen) == 1);
  // top-k 2: only ids 1 and 2 ever; both occur.
  TextSampling k2;
  k2.temperature = 1.0;
  k2.top_k = 2;
  int seen[5] = {0, 0, 0, 0, 0};
  for (int i = 0; i < 200; ++i) ++seen[sample_next(logits, k2, gen)];
  CHECK(seen[0] + seen[3] + seen[4] == 0);
  CHECK(seen[1] > 0);
  CHECK(seen[2] > 0);

  // Whole generations: the same seed gives the same ids, another seed other ids; temperature 0 = argmax chain.
  Config c = testing::load("configs/tiny.json");
  c.model.tokens.eos_id = 63;  // an id the random model rarely picks, so that generations run long
  torch::manual_seed(32);
  OmniLite model(c.model);
  model->eval();
  TextSampling s;
  s.temperature = 1.5;
  s.seed = 7;
  const std::vector<int64_t> prompt{2, 20, 21, 22};
  auto a = generate_text(*model, prompt, 20, s);
  auto b = generate_text(*model, prompt, 20, s);
  s.seed = 8;
  auto d = generate_text(*model, prompt, 20, s);
  CHECK(a == b);
  CHECK(a != d);
  s.temperature = 0;
  auto g = generate_text(*model, prompt, 6, s);
  std::vector<int64_t> seq = prompt, ref;
  torch::NoGradGuard ng;
  for (size_t i = 0; i < g.size(); ++i) {  // no cache: argmax of the full forward at the last position
    auto logits_full = model->forward({torch::tensor(seq, torch::kInt64).view({1, -1})}).logits;
    ref.push_back(logits_full[0][static_cast<int64_t>(seq.size()) - 1].argmax().item<int64_t>());
    seq.push_back(ref.back());
  }
  CHECK(g == ref);
}

TEST_CASE("generate never emits an image placeholder, even from a model that prefers them", "[infer]") {
  // The LM head sees only hidden dim 0 (the final norm zeroes the rest) and maps it to +c for <image>, -c for
  // <gen_image> and 0 elsewhere: one of the two placeholders is the argmax at every step. Decoding must pass over
  // both (the forward refuses a placeholder without its image) and take the next best: id 0, the first of the ties.
  Config c = testing::load("configs/tiny.json");
  torch::manual_seed(34);
  OmniLite model(c.model);
  model->eval();
  {
    torch::NoGradGuard ng;
    auto params = model->named_parameters();
    auto w = params["lm_head.weight"];
    w.zero_();
    w[c.model.tokens.image_id][0] = 50.0;
    w[c.model.tokens.gen_image_id][0] = -50.0;
    auto norm = params["text.norm.weight"];
    norm.zero_();
    norm[0] = 1.0;
  }
  for (double temperature : {0.0, 1.0}) {
    TextSampling s;
    s.temperature = temperature;
    s.seed = 3;
    const auto out = generate_text(*model, {1, 20, 21}, 8, s);
    INFO("temperature " << temperature);
    REQUIRE(out.size() == 8);
    for (auto id : out) {
      CHECK(id != c.model.tokens.image_id);
      CHECK(id != c.model.tokens.gen_image_id);
    }
    if (temperature == 0.0) CHECK(out == std::vector<int64_t>(8, 0));
  }
}

TEST_CASE("score: logprobs[i] = log p(tokens[i+1] | tokens[..i]), recomputed prefix by prefix", "[infer][score]") {
  Config c = testing::load("configs/tiny.json");
  torch::manual_seed(33);
  OmniLite model(c.model);
  model->eval();
  const std::vector<int64_t> ids{2, 15, 9, 40, 33, 7, 61};
  const auto lp = score_tokens(*model, ids);
  REQUIRE(lp.size() == ids.size() - 1);
  torch::NoGradGuard ng;
  for (size_t i = 0; i + 1 < ids.size(); ++i) {
    std::vector<int64_t> pre(ids.begin(), ids.begin() + static_cast<long>(i) + 1);
    auto logits = model->forward({torch::tensor(pre, torch::kInt64).view({1, -1})}).logits[0][static_cast<int64_t>(i)];
    // log-softmax by hand in double: x - log(sum(exp(x)))
    auto x = logits.to(torch::kFloat64);
    const double ref = x[ids[i + 1]].item<double>() - std::log(x.exp().sum().item<double>());
    CHECK(lp[i] == Approx(ref).epsilon(1e-6));
  }
  CHECK_THROWS_WITH(score_tokens(*model, {3}), ContainsText("at least 2 tokens"));
  CHECK_THROWS_WITH(score_tokens(*model, {3, 64}), ContainsText("token id 64"));
}

TEST_CASE("imagine with the prompt cached equals sampling without a cache", "[infer][flow]") {
  Config c = testing::load("configs/tiny.json");
  torch::manual_seed(34);
  OmniLite model(c.model);
  model->eval();
  SampleOptions o;
  o.steps = 3;
  o.cfg_scale = 2.5;
  o.seed = 5;
  const std::vector<int64_t> prompt{20, 21, 22};
  auto ref = sample_latents(*model, {prompt}, o);  // every step re-runs the whole row
  auto got = imagine_latents(*model, prompt, o);
  REQUIRE(got.sizes() == ref.sizes());
  CHECK(testing::max_rel_err(got, ref) < 1e-4);
  CHECK(ref.abs().sum().item<double>() > 0);
}

TEST_CASE("one Euler step with guidance matches x1 = x0 + v_u + W (v_c - v_u), computed by hand", "[infer][flow]") {
  Config c = testing::load("configs/tiny.json");
  torch::manual_seed(35);
  OmniLite model(c.model);
  model->eval();
  const auto& tk = c.model.tokens;
  const int64_t G = generated_tokens_per_image(c.model), P = c.model.flow_token_dim();
  const int64_t side = c.model.vqvae.image_size / c.model.vq_downsample();
  const std::vector<int64_t> prompt{30, 31};
  for (double w : {1.0, 2.0}) {
    SampleOptions o;
    o.steps = 1;
    o.cfg_scale = w;
    o.seed = 9;
    auto got = imagine_latents(*model, prompt, o);
    // By hand: the same noise, both rows in full, velocities at t = 0.
    auto gen = at::make_generator<at::CPUGeneratorImpl>(9);
    auto x0 = torch::randn({G, P}, gen);
    auto v = [&](std::vector<int64_t> row) {
      for (int64_t i = 0; i < G; ++i) row.push_back(tk.gen_image_id);
      OmniInput in;
      in.tokens = torch::tensor(row, torch::kInt64).view({1, -1});
      in.gen_latents = x0;
      in.gen_times = torch::zeros({G});
      torch::NoGradGuard ng;
      return model->forward(in).velocity;
    };
    auto vc = v({tk.bos_id, 30, 31, tk.image_begin_id}), vu = v({tk.bos_id, tk.image_begin_id});
    auto x1 = w == 1.0 ? x0 + vc : x0 + vu + w * (vc - vu);  // W = 1 is the conditional velocity alone
    auto ref = unpatchify(x1.view({1, G, P}), c.model.flow.latent_channels, side, side, c.model.flow.patch_size);
    INFO("W = " << w);
    CHECK(testing::max_rel_err(got, ref) < 1e-4);
  }
}

TEST_CASE("the LM head's one-row product and last_logits give the full forward's logits", "[infer][kv]") {
  Config c = testing::load("configs/tiny.json");
  torch::manual_seed(5);
  OmniLite model(c.model);
  model->eval();
  torch::NoGradGuard ng;
  // one row ([1, 1, D], the matrix-vector path) against a float64 product with the same weight
  const auto h = torch::randn({1, 1, c.model.text.hidden_size});
  const auto w = model->lm_head->tied ? model->lm_head->tied->weight : model->lm_head->weight;
  const auto one = model->lm_head->forward(h);
  REQUIRE(one.sizes() == torch::IntArrayRef({1, 1, c.model.text.vocab_size}));
  CHECK(testing::max_rel_err(one, torch::matmul(h.to(torch::kFloat64), w.to(torch::kFloat64).t())) < 1e-5);
  // a prompt's prefill with last_logits: the last position of the full logits
  OmniInput in;
  in.tokens = torch::tensor(std::vector<int64_t>{1, 20, 31, 42, 53, 60}, torch::kInt64).view({1, -1});
  const auto full = model->forward(in).logits;  // [1, 6, V]
  in.last_logits = true;
  const auto last = model->forward(in).logits;  // [1, 1, V]
  REQUIRE(last.sizes() == torch::IntArrayRef({1, 1, c.model.text.vocab_size}));
  CHECK(torch::allclose(last[0][0], full[0][5], 1e-6, 1e-6));
}

TEST_CASE("an LM head of bf16 values kept in bf16 gives the fp32 head's logits bit for bit", "[infer][gemv]") {
  torch::manual_seed(11);
  LMHead head(256, 300, nullptr);
  torch::NoGradGuard ng;
  CHECK_FALSE(head->store_bf16_if_exact());  // random fp32 values: not representable, left as they are
  CHECK(head->weight.scalar_type() == torch::kFloat32);
  head->weight.set_data(head->weight.to(torch::kBFloat16).to(torch::kFloat32));  // as loaded from a bf16 checkpoint
  const auto one = torch::randn({1, 1, 256}), many = torch::randn({2, 5, 256});
  const auto one_fp32 = head->forward(one), many_fp32 = head->forward(many);
  REQUIRE(head->store_bf16_if_exact());
  CHECK(head->weight.scalar_type() == torch::kBFloat16);
  CHECK(torch::equal(head->forward(one), one_fp32));    // the one-row kernel: the same products in the same order
  CHECK(torch::equal(head->forward(many), many_fp32));  // the GEMM on the exactly widened weight
}

TEST_CASE("float32 one-row products: every kernel within float32 summation error of a float64 product",
          "[infer][gemv]") {
  torch::manual_seed(10);
  const int64_t out = 70, in = 2048 + 37;  // a tail after the 64-wide loop
  const auto w = torch::randn({out, in}), x = torch::randn({in});
  const auto ref = torch::mv(w.to(torch::kFloat64), x.to(torch::kFloat64));
  // float32 products and sums of `in` terms: rounding errors that partly cancel keep within 1e-6 of sum |w x|
  // (the worst case, in * 2^-24 = 1.2e-4 of it, is never approached); a wrong or dropped product exceeds it
  const auto scale = torch::mv(w.abs().to(torch::kFloat64), x.abs().to(torch::kFloat64));
  for (int simd : {2, 1, 0}) {
    INFO("simd " << simd);
    const auto y = quant::float_matvec_cpu(x, w, simd);
    REQUIRE(y.scalar_type() == torch::kFloat32);
    const auto err = (y.to(torch::kFloat64) - ref).abs();
    CHECK((err <= scale * 1e-6).all().item<bool>());
  }
  CHECK_THROWS_WITH(quant::float_matvec_cpu(x.narrow(0, 1, in - 1), w), ContainsText("float_matvec_cpu"));
}

TEST_CASE("bf16 one-row products: every kernel within one bf16 rounding of a float64 product", "[infer][bf16]") {
  torch::manual_seed(9);
  const int64_t out = 70, in = 2048 + 37;  // a tail after the 64-wide loop
  const auto w = torch::randn({out, in}).to(torch::kBFloat16);
  const auto x = torch::randn({in}).to(torch::kBFloat16);
  const auto ref = torch::mv(w.to(torch::kFloat64), x.to(torch::kFloat64));  // exact products, float64 sum
  for (int simd : {2, 1, 0}) {
    INFO("simd " << simd);
    const auto y = quant::bf16_matvec_cpu(x, w, simd);
    REQUIRE(y.scalar_type() == torch::kBFloat16);
    // one rounding to bf16 (relative 2^-8) plus float32 summation error
    const auto err = (y.to(torch::kFloat64) - ref).abs(), bound = ref.abs() * std::ldexp(1.0, -8) + 1e-4;
    CHECK((err <= bound).all().item<bool>());
  }
  // PlainLinear takes the kernel for one bf16 row without autograd: the same values as the kernel, and as the BLAS
  // path within one bf16 rounding
  auto lin = std::make_shared<PlainLinearImpl>(in, out, true);
  lin->to(torch::kBFloat16);
  torch::NoGradGuard ng;
  lin->bias.normal_();
  const auto row = x.view({1, 1, in});
  const auto y = lin->forward(row);
  REQUIRE(y.sizes() == torch::IntArrayRef({1, 1, out}));
  const auto blas = torch::nn::functional::linear(row, lin->weight, lin->bias);
  const auto tol = blas.to(torch::kFloat64).abs() * std::ldexp(1.0, -7) + 1e-2;
  CHECK(((y.to(torch::kFloat64) - blas.to(torch::kFloat64)).abs() <= tol).all().item<bool>());
}
