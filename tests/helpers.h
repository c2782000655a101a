// Shared helpers of the test suite: config loading, error measures and a finite-difference gradient check.
#pragma once

#include <filesystem>
#include <fstream>
#include <functional>
#include <string>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "omnilite/config.h"
#include "omnilite/data/idx.h"
#include "omnilite/data/tokenizer.h"
#include "omnilite/train/trainer.h"

namespace testing {

inline std::string source_path(const std::string& rel) { return std::string(OMNILITE_SOURCE_DIR) + "/" + rel; }

// A fresh, empty folder under the system temp dir for one test.
inline std::string fresh_temp_dir(const std::string& name) {
  auto d = std::filesystem::temp_directory_path() / ("omnilite_test_" + name);
  std::filesystem::remove_all(d);
  std::filesystem::create_directories(d);
  return d.string();
}

// Writes an IDX file (uint8 images [N, H, W] or labels [N]) as the MNIST format lays it out.
inline void write_idx(const std::string& path, const torch::Tensor& t) {
  std::vector<unsigned char> bytes = {0, 0, 8, static_cast<unsigned char>(t.dim())};
  for (auto d : t.sizes())
    for (int s = 24; s >= 0; s -= 8) bytes.push_back(static_cast<unsigned char>((d >> s) & 0xFF));
  auto c = t.contiguous();
  bytes.insert(bytes.end(), c.data_ptr<uint8_t>(), c.data_ptr<uint8_t>() + c.numel());
  std::ofstream(path, std::ios::binary).write(reinterpret_cast<const char*>(bytes.data()),
                                             static_cast<std::streamsize>(bytes.size()));
}

// The bytes of a file, and a file written with exactly these bytes.
inline std::string bytes_of(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}
inline void write_bytes(const std::string& path, const std::string& b) { std::ofstream(path, std::ios::binary) << b; }

// A Fashion-MNIST-like IDX pair "<dir>/<split>-images-idx3-ubyte" / "-labels-idx1-ubyte" of n 28x28 images of
// `classes` easy classes: class k is a bright band at a class-specific position, plus noise.
inline std::string write_synthetic_fashion(const std::string& dir, const std::string& split, int64_t n,
                                           int64_t classes, uint64_t seed) {
  torch::manual_seed(seed);
  auto labels = torch::arange(n, torch::kInt64).remainder(classes);
  auto images = torch::randint(0, 40, {n, 28, 28}, torch::kInt64);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t k = labels[i].item<int64_t>();
    images[i].narrow(0, 2 + 24 * k / classes, 24 / classes).fill_(230);
  }
  write_idx(dir + "/" + split + "-images-idx3-ubyte", images.to(torch::kUInt8));
  write_idx(dir + "/" + split + "-labels-idx1-ubyte", labels.to(torch::kUInt8));
  return dir + "/" + split;
}

// A corpus of 300 short documents over ten words ("<dir>/corpus.txt") and its SentencePiece model (280 pieces,
// "<dir>/tok.model"), trained once per folder. Returns {corpus, model}.
inline std::pair<std::string, std::string> word_corpus_and_tokenizer(const std::string& dir) {
  const std::string corpus = dir + "/corpus.txt", model = dir + "/tok.model";
  if (std::filesystem::exists(model)) return {corpus, model};
  std::filesystem::create_directories(dir);
  {
    std::ofstream f(corpus);
    const char* words[] = {"red", "green", "blue", "coat", "shirt", "boot", "bag", "dress", "the", "a"};
    for (int d = 0; d < 300; ++d) {
      for (int w = 0; w < 12; ++w) f << words[(d * 7 + w * 3) % 10] << (w == 11 ? ".\n" : " ");
      f << "%\n";
    }
  }
  omnilite::TokenizerTrainOptions o;
  o.inputs = {corpus};
  o.vocab_size = 280;  // markers + 256 bytes + the few words
  omnilite::train_tokenizer(o, model);
  return {corpus, model};
}

inline omnilite::Config load(const std::string& rel) { return omnilite::load_config_file(source_path(rel)); }

// The lines of a run's metrics.jsonl.
inline std::vector<nlohmann::json> metrics_of(const std::string& run) {
  std::ifstream f(run + "/metrics.jsonl");
  std::vector<nlohmann::json> out;
  for (std::string line; std::getline(f, line);) out.push_back(nlohmann::json::parse(line));
  return out;
}

// configs/tiny.json reading the word corpus of `dir` (train and valid) with its 280-piece tokenizer.
inline omnilite::Config tiny_text_config(const std::string& dir) {
  const auto [corpus, model] = word_corpus_and_tokenizer(dir);
  omnilite::Config c = load("configs/tiny.json");
  c.model.text.vocab_size = 320;
  c.data.tokenizer = model;
  c.data.text_train = {corpus};
  c.data.text_valid = {corpus};
  return c;
}

// Trains `c` straight through into "<dir>/a", and into "<dir>/b" for `first` steps and then resumed to
// c.train.steps; returns the two runs' metrics.jsonl lines (for exact-resume checks).
inline std::pair<std::vector<nlohmann::json>, std::vector<nlohmann::json>> straight_and_resumed(
    const omnilite::Config& c, const std::string& dir, int64_t first) {
  omnilite::TrainRunOptions a;
  a.out_dir = dir + "/a";
  omnilite::train(c, a);
  omnilite::TrainRunOptions b;
  b.out_dir = dir + "/b";
  b.max_steps = first;
  omnilite::train(c, b);
  b.resume_dir = b.out_dir;
  b.max_steps = c.train.steps;
  omnilite::train(c, b);
  return {metrics_of(a.out_dir), metrics_of(b.out_dir)};
}

// Synthetic images of 4 classes ("<dir>/train", "<dir>/t10k"), a caption corpus, its tokenizer and a tiny
// multimodal config.
inline omnilite::Config tiny_multimodal_config(const std::string& dir) {
  std::filesystem::create_directories(dir);
  const auto train_prefix = write_synthetic_fashion(dir, "train", 64, 4, 1);
  const auto valid_prefix = write_synthetic_fashion(dir, "t10k", 16, 4, 2);
  const std::string corpus = dir + "/corpus.txt", model = dir + "/tok.model";
  {
    std::ofstream f(corpus);
    for (int d = 0; d < 200; ++d)
      f << omnilite::fashion_caption(d % 4, d / 4) << " " << omnilite::fashion_caption((d + 1) % 4, d) << "\n%\n";
  }
  omnilite::TokenizerTrainOptions o;
  o.inputs = {corpus};
  o.vocab_size = 290;  // markers + 256 bytes + the characters and a few words of the captions
  omnilite::train_tokenizer(o, model);
  omnilite::Config c = load("configs/tiny.json");
  c.model.text.vocab_size = 320;
  c.data.tokenizer = model;
  c.data.text_train = {corpus};
  c.data.text_valid = {corpus};
  c.data.image_train = {train_prefix};
  c.data.image_valid = {valid_prefix};
  c.train.batch_size = 2;
  c.train.seq_len = 32;
  c.train.caption_batch_size = 4;
  c.train.gen_batch_size = 4;
  c.train.lr = 3e-3;
  c.train.warmup_steps = 2;
  c.train.log_every = 100;
  c.train.ckpt_every = 4;
  c.train.keep_last = 5;
  c.train.steps = 8;
  c.train.valid_batches = 2;
  return c;
}

// configs/tiny.json with QLoRA on: rank 4, alpha 8, no dropout, the given base dtype.
inline omnilite::Config tiny_qlora(const std::string& base_dtype = "nf4") {
  omnilite::Config c = load("configs/tiny.json");
  c.lora.enabled = true;
  c.lora.rank = 4;
  c.lora.alpha = 8;
  c.lora.dropout = 0.0;
  c.lora.base_dtype = base_dtype;
  return c;
}

// max |a - b| / max(1, max |b|): the normalised error the tests report.
inline double max_rel_err(const torch::Tensor& a, const torch::Tensor& b) {
  auto bd = b.to(torch::kFloat64);
  auto scale = std::max(1.0, bd.abs().max().item<double>());
  return (a.to(torch::kFloat64) - bd).abs().max().item<double>() / scale;
}

// Central finite differences of loss() w.r.t. `n` entries of `param` (float64), against autograd.
// Returns the largest |fd - autograd| / max(1e-3, |autograd|) over the sampled entries.
inline double finite_difference_error(const std::function<torch::Tensor()>& loss, torch::Tensor param, int n,
                                      double eps = 1e-6) {
  param.mutable_grad() = torch::Tensor();
  auto l = loss();
  auto grad = torch::autograd::grad({l}, {param})[0];
  auto flat = param.data().view(-1);
  double worst = 0.0;
  torch::NoGradGuard ng;
  for (int i = 0; i < n; ++i) {
    const int64_t k = (i * 7919) % flat.numel();
    const double orig = flat[k].item<double>();
    flat[k] = orig + eps;
    const double up = loss().item<double>();
    flat[k] = orig - eps;
    const double down = loss().item<double>();
    flat[k] = orig;
    const double fd = (up - down) / (2 * eps);
    const double ad = grad.view(-1)[k].item<double>();
    worst = std::max(worst, std::abs(fd - ad) / std::max(1e-3, std::abs(ad)));
  }
  return worst;
}

}  // namespace testing
