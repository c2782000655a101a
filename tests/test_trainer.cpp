// Trainer: the schedule formula, a tiny run whose loss falls, exact resume, refusal of a corrupted checkpoint.
#include "catch_compat.h"
#include <nlohmann/json.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>

#include "helpers.h"
#include "omnilite/data/tokenizer.h"
#include "omnilite/train/schedule.h"
#include "omnilite/train/trainer.h"

using namespace omnilite;
namespace fs = std::filesystem;

namespace {

// A tiny corpus, its tokenizer (280 pieces) and a tiny config that trains on it.
Config tiny_training_config(const std::string& dir) {
  const auto [corpus, model] = testing::word_corpus_and_tokenizer(dir);
  Config c = testing::load("configs/tiny.json");
  c.model.text.vocab_size = 320;
  c.data.tokenizer = model;
  c.data.text_train = {corpus};
  c.data.text_valid = {corpus};
  c.train.batch_size = 4;
  c.train.seq_len = 32;
  c.train.lr = 3e-3;
  c.train.warmup_steps = 2;
  c.train.log_every = 100;
  c.train.ckpt_every = 3;
  c.train.steps = 12;
  c.train.keep_last = 5;
  return c;
}

std::vector<double> losses_of(const std::string& metrics) {
  std::ifstream f(metrics);
  std::vector<double> out;
  std::string line;
  while (std::getline(f, line)) out.push_back(nlohmann::json::parse(line)["loss"].get<double>());
  return out;
}

}  // namespace

TEST_CASE("warmup + cosine schedule follows its formula", "[train]") {
  CHECK(lr_at(0, 100, 10, 1.0, 0.1) == Approx(0.1));
  CHECK(lr_at(9, 100, 10, 1.0, 0.1) == Approx(1.0));
  CHECK(lr_at(10, 100, 10, 1.0, 0.1) == Approx(1.0));
  CHECK(lr_at(99, 100, 10, 1.0, 0.1) == Approx(0.1));
  // halfway through the decay: min + (1 - min) * 0.5
  const double mid = 10 + (100 - 10 - 1) / 2.0;
  CHECK(lr_at(static_cast<int64_t>(mid), 100, 10, 1.0, 0.1) == Approx(0.1 + 0.9 * 0.5 * (1 + std::cos(M_PI * 44.0 / 89.0))));
}

TEST_CASE("a tiny run learns, resume continues exactly, a corrupted checkpoint is refused", "[train][slow]") {
  const std::string base = (fs::temp_directory_path() / "omnilite_test_train").string();
  fs::remove_all(base);
  const Config cfg = tiny_training_config(base + "/data");

  TrainRunOptions a;
  a.out_dir = base + "/a";
  a.max_steps = 12;
  const auto ra = train(cfg, a);
  const auto la = losses_of(a.out_dir + "/metrics.jsonl");
  REQUIRE(la.size() == 12);
  INFO("first loss " << la.front() << ", last " << la.back());
  CHECK(la.back() < la.front() - 0.5);

  // 6 steps, then resume to 12: the same per-step losses, bit for bit.
  TrainRunOptions b;
  b.out_dir = base + "/b";
  b.max_steps = 6;
  train(cfg, b);
  b.resume_dir = b.out_dir;
  b.max_steps = 12;
  train(cfg, b);
  const auto lb = losses_of(b.out_dir + "/metrics.jsonl");
  REQUIRE(lb.size() == 12);
  for (size_t i = 0; i < 12; ++i) {
    INFO("step " << i + 1);
    CHECK(lb[i] == la[i]);
  }
  CHECK(latest_checkpoint(b.out_dir).find("step_0000012") != std::string::npos);

  // Corrupt the newest checkpoint's weights: resuming is refused and nothing is overwritten.
  const std::string ck = latest_checkpoint(a.out_dir) + "/model.safetensors";
  const auto size_before = fs::file_size(ck);
  {
    std::fstream f(ck, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(size_before - 7));
    f.put('\x5a');
  }
  TrainRunOptions c = a;
  c.resume_dir = a.out_dir;
  c.max_steps = 14;
  REQUIRE_THROWS_WITH(train(cfg, c), ContainsText("model.safetensors") && ContainsText("corrupted"));
  CHECK(fs::file_size(ck) == size_before);
  CHECK(losses_of(a.out_dir + "/metrics.jsonl").size() == 12);
  (void)ra;
}
