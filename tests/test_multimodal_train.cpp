// The three training stages end to end on synthetic labelled images, exact resume of a multimodal run, eval's
// outputs, and activation checkpointing against plain backward.
#include "catch_compat.h"
#include <nlohmann/json.hpp>

#include <filesystem>
#include <fstream>

#include "helpers.h"
#include "omnilite/data/idx.h"
#include "omnilite/data/image_dataset.h"
#include "omnilite/data/tokenizer.h"
#include "omnilite/eval/evaluate.h"
#include "omnilite/io/safetensors.h"
#include "omnilite/modules/omnilite.h"
#include "omnilite/io/checkpoint.h"
#include "omnilite/modules/losses.h"
#include "omnilite/train/trainer.h"

using namespace omnilite;
namespace fs = std::filesystem;
using nlohmann::json;

TEST_CASE("VQ-VAE, classifier and OMNI-LITE stages train, a multimodal resume is exact, eval reports",
          "[train][slow][multimodal]") {
  const auto base = testing::fresh_temp_dir("multimodal");
  Config cfg = testing::tiny_multimodal_config(base + "/data");

  // Stage 1: the VQ-VAE.
  Config vq = cfg;
  vq.train.stage = "vqvae";
  vq.train.batch_size = 16;
  vq.train.steps = 6;
  vq.train.vq_restart_every = 3;
  TrainRunOptions rv;
  rv.out_dir = base + "/vq";
  train(vq, rv);
  auto mv = testing::metrics_of(rv.out_dir);
  REQUIRE(mv.size() == 6);
  CHECK(mv.back()["loss_recon"].get<double>() < mv.front()["loss_recon"].get<double>());
  CHECK(mv.back().contains("valid_loss_recon"));

  // Stage 2: the judge classifier.
  Config cl = cfg;
  cl.train.stage = "classifier";
  cl.train.batch_size = 16;
  cl.train.steps = 6;
  TrainRunOptions rc;
  rc.out_dir = base + "/cls";
  train(cl, rc);
  CHECK(testing::metrics_of(rc.out_dir).back().contains("valid_accuracy"));

  // Stage 3: the model, with the frozen VQ-VAE.
  cfg.data.vqvae = rv.out_dir;
  cfg.data.classifier = rc.out_dir;
  TrainRunOptions a;
  a.out_dir = base + "/a";
  train(cfg, a);
  auto ma = testing::metrics_of(a.out_dir);
  REQUIRE(ma.size() == 8);
  for (const char* k : {"loss", "loss_clm", "loss_rf", "loss_aux", "loss_z", "loss_caption", "lr", "grad_norm",
                        "tokens_per_s", "data_wait_frac"})
    CHECK(ma[3].contains(k));
  CHECK(ma.front()["loss_rf"].get<double>() > 0.1);
  CHECK(ma.back()["loss"].get<double>() < ma.front()["loss"].get<double>());
  CHECK(ma.back().contains("valid_loss_rf"));
  // total = CLM + lambda_rf RF + alpha aux + beta z
  const auto& m = ma[2];
  CHECK(m["loss"].get<double>() ==
        Approx(m["loss_clm"].get<double>() + cfg.train.rf_weight * m["loss_rf"].get<double>() +
               cfg.train.aux_coef * m["loss_aux"].get<double>() + cfg.train.z_coef * m["loss_z"].get<double>()).epsilon(1e-5));
  // The frozen VQ-VAE is the one of stage 1.
  io::SafetensorsReader vq_file(io::latest_checkpoint(rv.out_dir) + "/model.safetensors");
  io::SafetensorsReader omni_file(io::latest_checkpoint(a.out_dir) + "/model.safetensors");
  CHECK(torch::equal(vq_file.load("decoder.conv_out.weight"), omni_file.load("vqvae.decoder.conv_out.weight")));

  // 4 steps, then resume to 8: the same per-step losses, bit for bit (loader thread on).
  TrainRunOptions b;
  b.out_dir = base + "/b";
  b.max_steps = 4;
  train(cfg, b);
  b.resume_dir = b.out_dir;
  b.max_steps = 8;
  train(cfg, b);
  auto mb = testing::metrics_of(b.out_dir);
  REQUIRE(mb.size() == 8);
  for (size_t i = 0; i < 8; ++i) {
    INFO("step " << i + 1);
    CHECK(mb[i]["loss"].get<double>() == ma[i]["loss"].get<double>());
    CHECK(mb[i]["loss_rf"].get<double>() == ma[i]["loss_rf"].get<double>());
  }

  // A VQ-VAE folder that is not a VQ-VAE checkpoint is refused by name.
  Config wrong = cfg;
  wrong.data.vqvae = rc.out_dir;
  TrainRunOptions w;
  w.out_dir = base + "/w";
  CHECK_THROWS_WITH(train(wrong, w), ContainsText("data.vqvae") && ContainsText("cls"));

  // Eval writes every figure and every picture.
  EvalOptions eo;
  eo.checkpoint = a.out_dir;
  eo.caption_images = 8;
  eo.t2i_per_class = 2;
  eo.flow_steps = 3;
  eo.text_rows = 4;
  eo.recon_images = 8;
  eo.moe_rows = 4;
  eo.seed = 5;
  auto r = evaluate(eo);
  for (const char* k : {"caption_accuracy", "caption_bleu4", "t2i_accuracy", "classifier_accuracy", "t2i_frechet",
                        "t2i_frechet_floor", "text_ppl", "unigram_ppl", "text_tokens", "recon_psnr_db",
                        "codebook_perplexity", "codebook_dead", "moe", "config_hash", "seed", "step"}) {
    INFO(k);
    REQUIRE(r.contains(k));
  }
  CHECK(r["caption_accuracy"].get<double>() >= 0.0);
  CHECK(r["caption_accuracy"].get<double>() <= 1.0);
  CHECK(r["caption_bleu4"].get<double>() >= 0.0);
  CHECK(r["caption_bleu4"].get<double>() <= 1.0);
  CHECK(r["t2i_images"].get<int64_t>() == 8);
  CHECK(r["t2i_frechet"].get<double>() >= -1e-9);
  CHECK(r["text_ppl"].get<double>() > 1.0);
  CHECK(r["seed"].get<uint64_t>() == 5);
  CHECK(r["step"].get<int64_t>() == 8);
  CHECK(r["codebook_perplexity"].get<double>() >= 1.0);
  CHECK(r["codebook_perplexity"].get<double>() <= static_cast<double>(cfg.model.vqvae.codebook_size));
  const auto& text_layers = r["moe"]["text"]["layers"];
  REQUIRE(text_layers.size() == static_cast<size_t>(cfg.model.text.num_layers));
  int64_t slots = 0;
  for (const auto& c : text_layers[0]["tokens_per_expert"]) slots += c.get<int64_t>();
  CHECK(slots == text_layers[0]["tokens"].get<int64_t>() * cfg.model.moe.top_k);
  // Image tokens: num_latents per captioned image.
  CHECK(r["moe"]["image"]["layers"][0]["tokens"].get<int64_t>() == 4 * cfg.model.resampler.num_latents);
  CHECK(fs::exists(a.out_dir + "/eval.json"));
  const std::string ext = picture_extension();  // PPM pictures and no plots in a build without OpenCV
  std::vector<std::string> pictures = {"t2i_grid" + ext, "recon_grid" + ext};
  if (have_opencv())
    for (const char* png : {"loss_curves.png", "train_stats.png", "captions.png", "expert_load.png"}) pictures.push_back(png);
  for (const auto& pic : pictures) {
    INFO(pic);
    CHECK(fs::file_size(a.out_dir + "/" + pic) > 1000);
  }
  // Only the asked tasks run.
  eo.tasks = {"ppl"};
  eo.out_dir = base + "/eval-ppl";
  auto p = evaluate(eo);
  CHECK(p.contains("text_ppl"));
  CHECK_FALSE(p.contains("moe"));
  CHECK(p["text_ppl"].get<double>() == r["text_ppl"].get<double>());
}

TEST_CASE("an empty image dataset is an error before step 1", "[train]") {
  const auto base = testing::fresh_temp_dir("empty_images");
  std::ofstream(base + "/empty.jsonl") << "\n";
  Config c = testing::load("configs/tiny.json");
  c.train.stage = "vqvae";
  c.data.image_train = {base + "/empty.jsonl"};
  TrainRunOptions r;
  r.out_dir = base + "/run";
  CHECK_THROWS_WITH(train(c, r), ContainsText("data.image_train") && ContainsText("no usable images"));
  CHECK_FALSE(fs::exists(base + "/run/metrics.jsonl"));
}

TEST_CASE("activation checkpointing gives the gradients of plain backward", "[model][checkpointing]") {
  Config c = testing::load("configs/tiny.json");
  torch::manual_seed(11);
  OmniLite model(c.model);
  model->train();
  const auto& t = c.model.tokens;
  // A mixed row: text, a generated-image block of 3 tokens, text.
  auto tokens = torch::tensor(std::vector<int64_t>{1, 10, 11, t.image_begin_id, t.gen_image_id, t.gen_image_id,
                                                  t.gen_image_id, t.image_end_id, 12, 13}).view({1, -1});
  OmniInput in;
  in.tokens = tokens;
  in.gen_latents = torch::randn({3, c.model.flow_token_dim()});
  in.gen_times = torch::full({3}, 0.3);
  auto grads = [&](bool ckpt) {
    model->zero_grad();
    model->text->checkpoint_layers = ckpt;
    auto out = model->forward(in);
    auto loss = clm_loss(out.logits, tokens, tokens.ne(t.gen_image_id)) +
                (out.velocity.defined() ? out.velocity.pow(2).mean() : torch::zeros({})) +
                0.01 * load_balancing_loss(out.router_logits, c.model.moe.top_k);
    loss.backward();
    std::vector<torch::Tensor> g;
    for (const auto& p : model->parameters())
      g.push_back(p.grad().defined() ? p.grad().clone() : torch::zeros_like(p));
    return g;
  };
  auto plain = grads(false), ckpt = grads(true);
  REQUIRE(plain.size() == ckpt.size());
  double worst = 0;
  for (size_t i = 0; i < plain.size(); ++i) worst = std::max(worst, testing::max_rel_err(ckpt[i], plain[i]));
  CHECK(worst < 1e-6);
  // Text only (no attention mask tensor: the causal path).
  in = OmniInput{};
  in.tokens = torch::tensor(std::vector<int64_t>{1, 10, 11, 12, 13, 14}).view({1, -1});
  tokens = in.tokens;
  auto plain_text = grads(false), ckpt_text = grads(true);
  double worst_text = 0;
  for (size_t i = 0; i < plain_text.size(); ++i)
    worst_text = std::max(worst_text, testing::max_rel_err(ckpt_text[i], plain_text[i]));
  CHECK(worst_text < 1e-6);
  // the layers' gradients are not all zero (the comparison is not vacuous)
  size_t q = 0;
  for (const auto& p : model->named_parameters()) {
    if (p.key() == "text.layers.0.self_attn.q_proj.weight") break;
    ++q;
  }
  REQUIRE(q < plain.size());
  CHECK(plain[q].abs().sum().item<double>() > 0);
}
