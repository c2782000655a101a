// Trainer: the schedule formula, a tiny run whose loss falls, exact resume, refusal of a corrupted checkpoint, the
// gate that skips steps with a NaN/Inf loss or gradient and stops a run that keeps producing them.
#include "catch_compat.h"
#include <nlohmann/json.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <limits>

#include "helpers.h"
#include "omnilite/data/tokenizer.h"
#include "omnilite/io/checkpoint.h"
#include "omnilite/io/weights_reader.h"
#include "omnilite/modules/omnilite.h"
#include "omnilite/train/schedule.h"
#include "omnilite/train/trainer.h"

using namespace omnilite;
namespace fs = std::filesystem;

namespace {

// A tiny corpus, its tokenizer (280 pieces) and a tiny config that trains on it.
Config tiny_training_config(const std::string& dir) {
  Config c = testing::tiny_text_config(dir);
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
  CHECK(io::latest_checkpoint(b.out_dir).find("step_0000012") != std::string::npos);

  // Corrupt the newest checkpoint's weights: resuming is refused and nothing is overwritten.
  const std::string ck = io::latest_checkpoint(a.out_dir) + "/model.safetensors";
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

TEST_CASE("the fused AdamW step equals torch::optim::AdamW, and the float64 sum of squares a float64 loop",
          "[train][adamw]") {
  torch::manual_seed(11);
  for (auto dt : {torch::kFloat64, torch::kFloat32}) {
    // two groups (weight decay and none), a parameter of 70,001 values (several threads' pieces), one without grad
    std::vector<torch::Tensor> a = {torch::randn({70001}, dt), torch::randn({3, 5}, dt), torch::randn({1}, dt),
                                    torch::randn({4}, dt)};
    std::vector<torch::Tensor> b;
    for (auto& t : a) b.push_back(t.clone());
    auto make = [](std::vector<torch::Tensor>& ps) {
      auto o = torch::optim::AdamWOptions(1e-2).betas({0.9, 0.95}).eps(1e-8).weight_decay(0.1);
      std::vector<torch::optim::OptimizerParamGroup> groups;
      groups.emplace_back(std::vector<torch::Tensor>{ps[0], ps[1]}, std::make_unique<torch::optim::AdamWOptions>(o));
      auto o2 = o;
      o2.weight_decay(0.0);
      groups.emplace_back(std::vector<torch::Tensor>{ps[2], ps[3]}, std::make_unique<torch::optim::AdamWOptions>(o2));
      return std::make_unique<torch::optim::AdamW>(groups, o);
    };
    auto fused = make(a), plain = make(b);
    for (int step = 1; step <= 4; ++step) {
      for (size_t i = 0; i + 1 < a.size(); ++i) {  // the last parameter never gets a gradient
        auto g = torch::randn(a[i].sizes(), dt) * (step == 2 ? 100.0 : 1.0);
        a[i].mutable_grad() = g.clone();
        b[i].mutable_grad() = g.clone();
      }
      for (auto* opt : {fused.get(), plain.get()})
        for (auto& group : opt->param_groups())
          static_cast<torch::optim::AdamWOptions&>(group.options()).lr(1e-2 / step);
      adamw_step(*fused);
      plain->step();
    }
    const double tol = dt == torch::kFloat64 ? 1e-14 : 2e-6;
    INFO("dtype " << dt);
    for (size_t i = 0; i < a.size(); ++i) CHECK(testing::max_rel_err(a[i], b[i]) < tol);
    auto& sa = fused->state();
    auto& sb = plain->state();
    CHECK(sa.size() == 3);
    CHECK(sb.size() == 3);
    for (size_t i = 0; i + 1 < a.size(); ++i) {
      const auto& x = static_cast<torch::optim::AdamWParamState&>(*sa.find(optimizer_state_key(sa, a[i]))->second);
      const auto& y = static_cast<torch::optim::AdamWParamState&>(*sb.find(optimizer_state_key(sb, b[i]))->second);
      CHECK(x.step() == 4);
      CHECK(y.step() == 4);
      CHECK(testing::max_rel_err(x.exp_avg(), y.exp_avg()) < tol);
      CHECK(testing::max_rel_err(x.exp_avg_sq(), y.exp_avg_sq()) < tol);
    }
    CHECK(a[3].equal(b[3]));  // no gradient: untouched
    // the sum of squares against a float64 loop
    double want = 0;
    auto t64 = a[0].to(torch::kFloat64);
    auto acc = t64.accessor<double, 1>();
    for (int64_t i = 0; i < t64.numel(); ++i) want += acc[i] * acc[i];
    CHECK(sum_of_squares_fp64(a[0]).item<double>() == Approx(want).epsilon(1e-13));
    CHECK(sum_of_squares_fp64(a[1].t()).item<double>() ==  // non-contiguous: the LibTorch path
          Approx(a[1].to(torch::kFloat64).square().sum().item<double>()).epsilon(1e-13));
  }
}

TEST_CASE("the step gate measures and clips the gradient norm and refuses NaN/Inf losses and gradients", "[train]") {
  // loss = |w|^2 / 2 at w = (3, 4): gradient (3, 4), norm 5.
  auto w = torch::tensor({3.0, 4.0}, torch::kFloat32).requires_grad_(true);
  auto grad_of = [&] {
    w.mutable_grad() = torch::Tensor();
    (w * w).sum().div(2).backward();
  };
  grad_of();
  auto c = clip_and_check({w}, 12.5, 1.0);
  CHECK(c.finite);
  CHECK(c.grad_norm == Approx(5.0).epsilon(1e-6));
  CHECK(w.grad()[0].item<double>() == Approx(0.6).epsilon(1e-5));  // scaled by 1 / 5
  CHECK(w.grad()[1].item<double>() == Approx(0.8).epsilon(1e-5));
  grad_of();
  c = clip_and_check({w}, 12.5, 0.0);  // measured only
  CHECK(c.finite);
  CHECK(c.grad_norm == Approx(5.0).epsilon(1e-6));
  CHECK(w.grad()[1].item<double>() == 4.0);

  // A finite loss whose backward is NaN: d sqrt(u) / du = inf at u = v - v = 0 reaches v as +inf and -inf.
  auto v = torch::ones({3}).requires_grad_(true);
  auto loss = torch::sqrt(v - v).sum();
  REQUIRE(loss.item<double>() == 0.0);
  loss.backward();
  c = clip_and_check({w, v}, loss.item<double>(), 1.0);
  CHECK_FALSE(c.finite);
  CHECK(std::isnan(c.grad_norm));

  // A NaN/Inf loss: not measured, the gradients left alone.
  grad_of();
  for (double bad : {std::nan(""), std::numeric_limits<double>::infinity()}) {
    c = clip_and_check({w}, bad, 1.0);
    CHECK_FALSE(c.finite);
    CHECK(c.grad_norm == 0.0);
    CHECK(w.grad()[1].item<double>() == 4.0);
  }
}

TEST_CASE("NaN losses skip their steps, then stop the run naming the last good checkpoint, which stays intact",
          "[train][qlora]") {
  const auto base = testing::fresh_temp_dir("train_nan");
  Config c = tiny_training_config(base + "/data");
  c.lora = testing::tiny_qlora("fp32").lora;  // adapters on fp32 bases
  c.train.batch_size = 2;
  c.train.seq_len = 16;
  c.train.steps = 8;
  c.train.ckpt_every = 2;
  c.train.max_bad_steps = 3;
  c.train.base_checkpoint = base + "/base.safetensors";
  auto save_base = [&](bool other) {
    torch::manual_seed(1);
    Config plain = c;
    plain.lora.enabled = false;
    OmniLite m(plain.model);
    if (other) m->text->norm->weight.data()[0] = 2.0;  // one value changed
    io::save_module(*m, c.train.base_checkpoint);
  };
  save_base(false);
  TrainRunOptions r;
  r.out_dir = base + "/run";
  r.max_steps = 2;
  train(c, r);
  const std::string good = io::latest_checkpoint(r.out_dir);
  REQUIRE(good.find("step_0000002") != std::string::npos);
  const std::string adapter = good + "/adapter_model.safetensors";
  auto read_all = [](const std::string& path) {
    std::ifstream f(path, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(f), {});
  };
  const std::string adapter_bytes = read_all(adapter);
  REQUIRE(!adapter_bytes.empty());

  // A resume against another base (same names and shapes, other values) is refused, naming both.
  save_base(true);
  r.resume_dir = r.out_dir;
  r.max_steps = 8;
  CHECK_THROWS_WITH(train(c, r), ContainsText("was trained on base \"" + c.train.base_checkpoint) &&
                                     ContainsText("but this run's base is") && ContainsText("header hash"));
  CHECK(io::latest_checkpoint(r.out_dir) == good);

  // The run's own base, and a model that now makes every loss NaN (an RMSNorm eps of -1 takes the root of a
  // negative number): steps 3 and 4 are skipped (logged as such), step 5 is the third in a row. The checkpoint of
  // step 4 holds the weights of step 2: a skipped step changes nothing.
  save_base(false);
  c.model.text.rms_norm_eps = -1.0;
  CHECK_THROWS_WITH(train(c, r), ContainsText("3 steps in a row with a non-finite loss") &&
                                     ContainsText("last good checkpoint is " + r.out_dir + "/checkpoints/step_0000004"));
  const std::string last = io::latest_checkpoint(r.out_dir);
  CHECK(last.find("step_0000004") != std::string::npos);
  CHECK(read_all(adapter) == adapter_bytes);
  CHECK(read_all(last + "/adapter_model.safetensors") == adapter_bytes);
  std::ifstream f(r.out_dir + "/metrics.jsonl");
  std::vector<nlohmann::json> lines;
  for (std::string line; std::getline(f, line);) lines.push_back(nlohmann::json::parse(line));
  REQUIRE(lines.size() == 4);
  CHECK_FALSE(lines[1]["skipped"].get<bool>());
  for (size_t i : {2, 3}) {
    INFO("step " << lines[i]["step"]);
    CHECK(lines[i]["skipped"].get<bool>());
    CHECK(lines[i]["loss"].is_null());  // NaN is written as null
  }
}

TEST_CASE("resume is exact when experts sit idle in a step: an unreached parameter takes no AdamW update",
          "[train][slow]") {
  // 16 experts, top-1, 4 tokens a step: most experts receive no token in a step. Before, gradients were zeroed, not
  // cleared, so an expert reached once in the process kept drifting by momentum and weight decay while idle, but
  // not after a resume (its gradient undefined again): the resumed run parted from the uninterrupted one.
  const std::string base = (fs::temp_directory_path() / "omnilite_test_idle_experts").string();
  fs::remove_all(base);
  Config cfg = tiny_training_config(base + "/data");
  cfg.model.moe.num_experts = 16;
  cfg.model.moe.top_k = 1;
  cfg.train.batch_size = 1;
  cfg.train.seq_len = 4;
  cfg.train.ckpt_every = 1;
  cfg.train.keep_last = 10;
  TrainRunOptions a;
  a.out_dir = base + "/a";
  a.max_steps = 8;
  train(cfg, a);
  TrainRunOptions b;
  b.out_dir = base + "/b";
  b.max_steps = 3;
  train(cfg, b);
  b.resume_dir = b.out_dir;
  b.max_steps = 8;
  train(cfg, b);
  const auto la = losses_of(a.out_dir + "/metrics.jsonl"), lb = losses_of(b.out_dir + "/metrics.jsonl");
  REQUIRE(la.size() == 8);
  REQUIRE(lb.size() == 8);
  for (size_t i = 0; i < 8; ++i) {
    INFO("step " << i + 1);
    CHECK(lb[i] == la[i]);
  }
  // Some expert weight is the same at steps 4 and 5 of the uninterrupted run (idle in step 5, no update), and the
  // final weights of both runs are equal bit for bit.
  io::WeightsReader s4(a.out_dir + "/checkpoints/step_0000004"), s5(a.out_dir + "/checkpoints/step_0000005");
  int64_t unchanged = 0;
  for (const auto& [name, e] : s4.tensors())
    if (name.find(".experts.") != std::string::npos) unchanged += torch::equal(s4.load(name), s5.load(name));
  CHECK(unchanged > 0);
  io::WeightsReader fa(io::latest_checkpoint(a.out_dir)), fb(io::latest_checkpoint(b.out_dir));
  for (const auto& [name, e] : fa.tensors()) {
    INFO(name);
    CHECK(torch::equal(fa.load(name), fb.load(name)));
  }
}
