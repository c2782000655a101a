#include "omnilite/eval/evaluate.h"

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <stdexcept>

#include "omnilite/config.h"
#include "omnilite/data/idx.h"
#include "omnilite/data/image_dataset.h"
#include "omnilite/data/mm_batch.h"
#include "omnilite/data/text_dataset.h"
#include "omnilite/data/tokenizer.h"
#include "omnilite/infer/generate.h"
#include "omnilite/io/checkpoint.h"
#include "omnilite/log.h"
#include "omnilite/modules/image_classifier.h"
#include "omnilite/modules/omnilite.h"
#include "omnilite/runtime.h"
#include "omnilite/train/losses.h"
#include "omnilite/train/trainer.h"

namespace omnilite {
namespace fs = std::filesystem;
using nlohmann::json;

std::string run_folder_of(const std::string& checkpoint_dir) {
  const fs::path p = fs::absolute(checkpoint_dir).lexically_normal();
  const fs::path parent = (p.filename().empty() ? p.parent_path() : p).parent_path();
  return parent.filename() == "checkpoints" ? parent.parent_path().string() : parent.string();
}

namespace {


double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Held-out text perplexity of the model and of the training unigram distribution on the same target tokens.
void text_perplexity(OmniLiteImpl& model, const Config& cfg, const Tokenizer& tok, int64_t max_rows, json& out) {
  auto valid = read_documents(cfg.data.text_valid);
  if (valid.documents.empty()) return;
  auto rows = pack_sequences(tokenize_documents(valid.documents, tok, cfg.model.tokens.eos_id), cfg.train.seq_len,
                             "data.text_valid");
  rows = rows.narrow(0, 0, std::min(rows.size(0), max_rows));
  // Unigram: add-one smoothed counts over the training text.
  auto train_stream = tokenize_documents(read_documents(cfg.data.text_train).documents, tok, cfg.model.tokens.eos_id);
  const int64_t V = cfg.model.text.vocab_size;
  auto counts = torch::bincount(train_stream, {}, V).to(torch::kFloat64) + 1.0;
  auto log_p = (counts / counts.sum()).log();  // [V]
  torch::NoGradGuard ng;
  const auto dev = model.text->embed_tokens->weight.device();
  double nll = 0, uni = 0, n = 0;
  for (int64_t s = 0; s < rows.size(0); s += 8) {
    auto batch = rows.narrow(0, s, std::min<int64_t>(8, rows.size(0) - s));
    auto logits = model.forward({batch.to(dev)}).logits.to(torch::kFloat32).cpu();  // [B, T, V]
    auto targets = batch.narrow(1, 1, batch.size(1) - 1);                           // [B, T-1]
    auto lp = torch::log_softmax(logits.narrow(1, 0, batch.size(1) - 1).to(torch::kFloat64), -1);
    nll -= lp.gather(2, targets.unsqueeze(2)).sum().item<double>();
    uni -= log_p.index_select(0, targets.reshape(-1)).sum().item<double>();
    n += static_cast<double>(targets.numel());
  }
  out["text_ppl"] = std::exp(nll / n);
  out["unigram_ppl"] = std::exp(uni / n);
  out["text_tokens"] = n;
}

}  // namespace

json evaluate(const EvalOptions& o) {
  auto loaded = load_omni_checkpoint(o.checkpoint, o.device);
  const std::string& dir = loaded.dir;
  const Config& cfg = loaded.cfg;
  OmniLite model = loaded.model;
  const torch::Device dev = model->text->embed_tokens->weight.device();
  Tokenizer tok(cfg.data.tokenizer);
  tok.check_compatible(cfg.model);
  const std::string out_dir = o.out_dir.empty() ? run_folder_of(dir) : o.out_dir;
  fs::create_directories(out_dir);
  json out = {{"checkpoint", dir}, {"step", loaded.step}};
  const auto& classes = fashion_mnist_classes();

  // Text.
  auto t0 = std::chrono::steady_clock::now();
  if (!cfg.data.text_valid.empty()) {
    text_perplexity(*model, cfg, tok, o.text_rows, out);
    log::info(log::format("eval: text_ppl %.2f, unigram_ppl %.2f over %.0f held-out tokens (%.0fs)",
                          out["text_ppl"].get<double>(), out["unigram_ppl"].get<double>(),
                          out["text_tokens"].get<double>(), seconds_since(t0)));
  }

  // Captioning.
  auto io = image_load_options(cfg.data, std::max(cfg.model.vision.image_size, cfg.model.vqvae.image_size));
  io.max_images = o.caption_images;
  if (!cfg.data.image_valid.empty() && o.caption_images > 0) {
    t0 = std::chrono::steady_clock::now();
    auto valid = read_image_captions(cfg.data.image_valid, io);
    if (valid.size() > 0 && valid.labels.min().item<int64_t>() >= 0) {
      const int64_t L = cfg.model.resampler.num_latents;
      auto prefix_row = caption_row({}, L, cfg.model.tokens);
      prefix_row.pop_back();  // without eos: the caption follows
      int64_t hits = 0;
      json examples = json::array();
      for (int64_t s = 0; s < valid.size(); s += 100) {
        const int64_t n = std::min<int64_t>(100, valid.size() - s);
        auto idx = torch::arange(s, s + n, torch::kInt64);
        auto images = to_model_images(valid.images, cfg.model.vision.image_size, cfg.model.vision.in_channels, idx);
        auto prefix = pad_rows(std::vector<std::vector<int64_t>>(static_cast<size_t>(n), prefix_row),
                               static_cast<int64_t>(prefix_row.size()), cfg.model.tokens.pad_id);
        auto gen = greedy_generate(*model, prefix, images, o.max_caption_tokens);
        for (int64_t i = 0; i < n; ++i) {
          const std::string caption = tok.decode(ids_before_eos(gen[i], cfg.model.tokens));
          const int64_t label = valid.labels[s + i].item<int64_t>();
          const bool hit = find_class_name(caption, classes) == label;
          hits += hit;
          if (examples.size() < 10) examples.push_back({{"class", classes[static_cast<size_t>(label)]}, {"caption", caption}});
        }
      }
      out["caption_accuracy"] = static_cast<double>(hits) / static_cast<double>(valid.size());
      out["caption_images"] = valid.size();
      out["caption_examples"] = examples;
      log::info(log::format("eval: caption_accuracy %.3f on %lld held-out images (%.0fs)",
                            out["caption_accuracy"].get<double>(), static_cast<long long>(valid.size()),
                            seconds_since(t0)));
    }
  }

  // Text -> image, judged by the classifier.
  const std::string cls_dir = o.classifier.empty() ? cfg.data.classifier : o.classifier;
  if (o.t2i_per_class > 0 && !cls_dir.empty()) {
    t0 = std::chrono::steady_clock::now();
    const std::string cdir = latest_checkpoint(cls_dir);
    const json cstate = io::read_checkpoint_state(cdir);
    if (cstate.value("stage", std::string()) != "classifier")
      throw std::runtime_error("classifier \"" + cdir + "\" is not a train.stage = \"classifier\" checkpoint");
    io::SafetensorsReader r(cdir + "/model.safetensors");
    if (!r.contains("fc2.weight")) throw std::runtime_error("classifier \"" + cdir + "\": no fc2.weight");
    const int64_t num_classes = r.tensors().at("fc2.weight").shape[0];
    ImageClassifier clf(cfg.model.vqvae.in_channels, cfg.model.vqvae.image_size, num_classes);
    io::load_module(*clf, cdir + "/model.safetensors");
    clf->to(dev);
    clf->eval();
    torch::NoGradGuard ng;
    // The classifier's own held-out accuracy.
    ImageLoadOptions cio = io;
    cio.size = cfg.model.vqvae.image_size;
    cio.max_images = 2000;
    auto held = read_image_captions(cfg.data.image_valid, cio);
    if (held.size() > 0) {
      auto logits = clf->forward(to_model_images(held.images, cfg.model.vqvae.image_size, cfg.model.vqvae.in_channels).to(dev));
      out["classifier_accuracy"] = logits.argmax(1).cpu().eq(held.labels).to(torch::kFloat64).mean().item<double>();
    }
    std::vector<std::vector<int64_t>> prompts;
    std::vector<int64_t> labels;
    const int64_t C = std::min<int64_t>(num_classes, static_cast<int64_t>(classes.size()));
    for (int64_t c = 0; c < C; ++c)
      for (int64_t i = 0; i < o.t2i_per_class; ++i) {
        prompts.push_back(tok.encode(fashion_caption(c, 0)));
        labels.push_back(c);
      }
    SampleOptions so;
    so.steps = o.flow_steps;
    so.cfg_scale = o.cfg_scale;
    so.seed = o.seed;
    auto images = model->vqvae->decode_normalized(sample_latents(*model, prompts, so)).clamp(-1, 1);
    auto pred = clf->forward(images).argmax(1).cpu();
    out["t2i_accuracy"] = pred.eq(torch::tensor(labels, torch::kInt64)).to(torch::kFloat64).mean().item<double>();
    out["t2i_images"] = static_cast<int64_t>(prompts.size());
    out["cfg_scale"] = o.cfg_scale;
    out["flow_steps"] = o.flow_steps;
    const int64_t cols = std::min<int64_t>(o.t2i_per_class, 10);
    std::vector<torch::Tensor> shown;
    for (int64_t c = 0; c < C; ++c) shown.push_back(images.narrow(0, c * o.t2i_per_class, cols));
    const std::string grid = out_dir + "/t2i_grid.png";
    write_image_grid(torch::cat(shown, 0), cols, grid);
    out["t2i_grid"] = grid;
    log::info(log::format("eval: t2i_accuracy %.3f on %lld generated images (classifier held-out accuracy %.3f); "
                          "grid %s (%.0fs)", out["t2i_accuracy"].get<double>(), static_cast<long long>(prompts.size()),
                          out.value("classifier_accuracy", -1.0), grid.c_str(), seconds_since(t0)));
  }

  const std::string metrics = run_folder_of(dir) + "/metrics.jsonl";
  if (fs::exists(metrics)) {
    const std::string png = out_dir + "/loss_curves.png";
    write_loss_curves(metrics, {"loss", "loss_clm", "loss_rf", "loss_caption", "loss_aux", "valid_loss_text"}, png);
    out["loss_curves"] = png;
  }
  const std::string path = out_dir + "/eval.json";
  {
    std::ofstream f(path + ".tmp");
    f << out.dump(2) << "\n";
    if (!f) throw std::runtime_error("cannot write \"" + path + ".tmp\"");
  }
  fs::rename(path + ".tmp", path);
  out["eval_json"] = path;
  return out;
}

}  // namespace omnilite
