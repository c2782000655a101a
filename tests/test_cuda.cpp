// Device parity on CUDA, where a GPU is present (each test says it skipped otherwise): the tiny model's forward on
// CUDA against the CPU (fp32 and bf16 autocast), a CUDA training step that lowers the loss, NF4 dequantisation on
// CUDA against the CPU loop, KV-cached decoding on CUDA against full recomputation, checkpointing under autocast
// with dropout, and an exact resume of a QLoRA run with dropout on CUDA.
#include "catch_compat.h"

#include "helpers.h"
#include "omnilite/modules/kv_cache.h"
#include "omnilite/modules/omnilite.h"
#include "omnilite/modules/lora_linear.h"
#include "omnilite/modules/qlora_builder.h"
#include "omnilite/quant/nf4.h"
#include "omnilite/runtime.h"
#include "omnilite/io/checkpoint.h"
#include "omnilite/train/trainer.h"

using namespace omnilite;

namespace {

bool skip_without_cuda() {
  if (torch::cuda::is_available()) return false;
  OMNILITE_SKIP("skipped: no CUDA device (torch::cuda::is_available() is false)");
  return true;
}

// Rows with an image (tiny config: 4 latents) and text, and their images.
std::pair<torch::Tensor, torch::Tensor> image_text_batch(const Config& c) {
  torch::manual_seed(40);
  auto tokens = torch::randint(7, c.model.text.vocab_size, {2, 14}, torch::kInt64);
  tokens.narrow(1, 1, c.model.resampler.num_latents).fill_(c.model.tokens.image_id);
  return {tokens, torch::rand({2, 3, 28, 28})};
}

}  // namespace

TEST_CASE("CUDA forward equals the CPU forward: fp32 within 1e-4, bf16 autocast within 2e-2", "[cuda]") {
  if (skip_without_cuda()) return;
  const Config c = testing::load("configs/tiny.json");
  torch::manual_seed(41);
  OmniLite model(c.model);
  model->eval();
  torch::NoGradGuard ng;
  auto [tokens, images] = image_text_batch(c);
  auto ref = model->forward({tokens, images}).logits;
  const torch::Device dev("cuda");
  model->to(dev);
  auto fp32 = model->forward({tokens.to(dev), images.to(dev)}).logits.cpu();
  CHECK(testing::max_rel_err(fp32, ref) < 1e-4);
  AutocastGuard autocast(true);
  auto bf16 = model->forward({tokens.to(dev), images.to(dev)}).logits.to(torch::kFloat32).cpu();
  CHECK(testing::max_rel_err(bf16, ref) < 2e-2);
}

TEST_CASE("a CUDA training step lowers the loss", "[cuda]") {
  if (skip_without_cuda()) return;
  const Config c = testing::load("configs/tiny.json");
  torch::manual_seed(42);
  const torch::Device dev("cuda");
  OmniLite model(c.model);
  model->to(dev);
  auto [tokens, images] = image_text_batch(c);
  tokens = tokens.to(dev);
  images = images.to(dev);
  torch::optim::AdamW opt(model->parameters(), torch::optim::AdamWOptions(3e-3));
  auto loss_of = [&] {
    auto logits = model->forward({tokens, images}).logits;
    const int64_t T = tokens.size(1), V = c.model.text.vocab_size;
    return torch::nn::functional::cross_entropy(logits.narrow(1, 0, T - 1).reshape({-1, V}),
                                                tokens.narrow(1, 1, T - 1).reshape(-1));
  };
  const double before = loss_of().item<double>();
  for (int i = 0; i < 5; ++i) {
    opt.zero_grad();
    loss_of().backward();
    opt.step();
  }
  const double after = loss_of().item<double>();
  INFO("loss " << before << " -> " << after);
  CHECK(after < before);
}

TEST_CASE("NF4 dequantisation on CUDA equals the CPU loop", "[cuda][nf4]") {
  if (skip_without_cuda()) return;
  torch::manual_seed(43);
  auto w = torch::randn({96, 256}) * 0.05;
  auto q = quant::nf4_quantize(w);
  auto cpu = quant::nf4_dequantize(q);
  const torch::Device dev("cuda");
  quant::Nf4Tensor qc{q.packed.to(dev), q.absmax_q.to(dev), q.absmax_scale.to(dev), q.absmax_mean.to(dev), q.shape};
  auto gpu = quant::nf4_dequantize(qc).cpu();
  CHECK(testing::max_rel_err(gpu, cpu) < 1e-6);
  // Quantising on CUDA gives the same codes as on the CPU.
  auto qg = quant::nf4_quantize(w.to(dev));
  CHECK(torch::equal(qg.packed.cpu(), q.packed));
}

TEST_CASE("KV-cached decoding on CUDA equals full recomputation", "[cuda][kv]") {
  if (skip_without_cuda()) return;
  const Config c = testing::load("configs/tiny.json");
  torch::manual_seed(44);
  const torch::Device dev("cuda");
  OmniLite model(c.model);
  model->to(dev);
  model->eval();
  torch::NoGradGuard ng;
  auto [tokens, images] = image_text_batch(c);
  tokens = tokens.to(dev);
  images = images.to(dev);
  auto full = model->forward({tokens, images}).logits;
  const int64_t prefix = c.model.resampler.num_latents + 3;
  KVCache cache;
  OmniInput first;
  first.tokens = tokens.narrow(1, 0, prefix);
  first.images = images;
  first.cache = &cache;
  std::vector<torch::Tensor> parts{model->forward(first).logits};
  for (int64_t t = prefix; t < tokens.size(1); ++t) {
    OmniInput step;
    step.tokens = tokens.narrow(1, t, 1);
    step.cache = &cache;
    parts.push_back(model->forward(step).logits);
  }
  CHECK(testing::max_rel_err(torch::cat(parts, 1).cpu(), full.cpu()) < 1e-4);
}

// Checkpointed layers under bf16 autocast with LoRA dropout: the recomputation must run in bf16 (the forward's
// autocast state) with the forward's CUDA dropout masks. Same ops in the same order: equal within 1e-6.
TEST_CASE("CUDA: activation checkpointing under bf16 autocast with LoRA dropout equals plain backward", "[cuda]") {
  if (skip_without_cuda()) return;
  Config c = testing::tiny_qlora("fp32");
  c.lora.dropout = 0.05;
  torch::manual_seed(43);
  OmniLite model(c.model, *make_linear_builder(c));
  train_adapters_only(*model);
  {
    torch::NoGradGuard ng;
    for (auto& p : model->named_parameters())
      if (p.key().find(".lora_B.") != std::string::npos) p.value().normal_(0, 0.05);
  }
  model->to(torch::kCUDA);
  model->train();
  auto tokens = torch::randint(7, 64, {2, 16}, torch::kInt64).to(torch::kCUDA);
  auto grads = [&](bool ckpt) {
    model->zero_grad();
    model->text->checkpoint_layers = ckpt;
    torch::manual_seed(5);  // seeds the CUDA generators too
    {
      AutocastGuard amp(true);
      auto out = model->forward({tokens});
      out.logits.to(torch::kFloat32).square().mean().backward();
    }
    std::vector<torch::Tensor> g;
    for (const auto& p : model->parameters())
      if (p.requires_grad()) g.push_back(p.grad().defined() ? p.grad().cpu().clone() : torch::zeros_like(p).cpu());
    return g;
  };
  const auto plain = grads(false), ckpt = grads(true);
  double worst = 0;
  for (size_t i = 0; i < plain.size(); ++i) worst = std::max(worst, testing::max_rel_err(ckpt[i], plain[i]));
  INFO("max relative gradient difference " << worst);
  CHECK(worst < 1e-6);
}

TEST_CASE("CUDA: a QLoRA run with dropout resumes exactly (the CUDA generator is in the checkpoint)", "[cuda][train]") {
  if (skip_without_cuda()) return;
  const auto dir = testing::fresh_temp_dir("cuda_resume");
  Config c = testing::tiny_text_config(dir + "/data");
  c.lora = testing::tiny_qlora().lora;
  c.lora.dropout = 0.1;  // LoRA dropout draws its masks from the CUDA generator
  c.runtime.device = "cuda";
  c.train.steps = 6;
  c.train.ckpt_every = 3;
  {
    OmniLite plain(c.model);
    io::save_module(*plain, dir + "/base.safetensors");
  }
  c.train.base_checkpoint = dir + "/base.safetensors";
  TrainRunOptions a;
  a.out_dir = dir + "/a";
  train(c, a);
  TrainRunOptions b;
  b.out_dir = dir + "/b";
  b.max_steps = 3;
  train(c, b);
  b.resume_dir = b.out_dir;
  b.max_steps = -1;
  train(c, b);
  const auto ma = testing::metrics_of(a.out_dir), mb = testing::metrics_of(b.out_dir);
  REQUIRE(ma.size() == 6);
  REQUIRE(mb.size() == 6);
  for (size_t i = 0; i < 6; ++i) {
    INFO("step " << i + 1);
    CHECK(mb[i]["loss"].get<double>() == ma[i]["loss"].get<double>());
  }
}
