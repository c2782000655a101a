// Data-parallel training (c10d): loss shares of split batches add up to the loss of the whole batch; 2 Gloo ranks
// of batch b take the steps of 1 process of batch 2b (losses and weights), with ZeRO-1, across a ZeRO-1 resume and a
// resume that changes the world size; ZeRO-2 and ZeRO-3 on 2 and 3 ranks take the steps of 1 process, write sharded
// checkpoints that re-shard on resume (other world size, other level) and export, and hold 1/W of the training state;
// a killed or stopped rank stops the other within the timeout (at ZeRO-3 the newest sharded checkpoint stays whole),
// mismatched ranks are refused at start.
#include "catch_compat.h"
#include <nlohmann/json.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "helpers.h"
#include "omnilite/io/checkpoint.h"
#include "omnilite/io/safetensors.h"
#include "omnilite/io/weights_reader.h"
#include "omnilite/log.h"
#include "omnilite/train/distributed.h"
#include "omnilite/modules/losses.h"
#include "omnilite/train/trainer.h"
#include "omnilite/data/image_dataset.h"
#include "omnilite/data/token_shards.h"

using namespace omnilite;
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// Runs a shell command; its exit status (-1 when it did not exit normally).
int run_shell(const std::string& cmd) {
  const int st = std::system(("bash -c '" + cmd + "'").c_str());
  return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}


// Rendezvous port k (< 32) of this test process: each process owns a block of 32 ports, so parallel ctest runs
// (neighbouring pids) do not meet.
int test_port(int k) { return 20000 + static_cast<int>(getpid() % 600) * 32 + k; }

// Tiny model on text rows and image-caption rows (synthetic images), activation checkpointing on (several gradients
// per parameter and step), small buckets (several all-reduces in flight), one thread per process.
std::string write_config(const std::string& dir, int64_t batch, int64_t caption_batch) {
  const auto [corpus, model] = testing::word_corpus_and_tokenizer(dir + "/data");
  const auto train_prefix = testing::write_synthetic_fashion(dir + "/data", "train", 32, 4, 1);
  Config c = testing::load("configs/tiny.json");
  c.model.text.vocab_size = 320;
  c.data.tokenizer = model;
  c.data.text_train = {corpus};
  c.data.text_valid = {corpus};
  c.data.image_train = {train_prefix};
  c.data.image_valid = {train_prefix};
  c.train.batch_size = batch;
  c.train.caption_batch_size = caption_batch;
  c.train.seq_len = 24;
  c.train.grad_accum = 2;
  c.train.lr = 3e-3;
  // AdamW divides a gradient by its own magnitude plus eps: the patch embedding's gradients (~1e-8) are of eps = 1e-8's
  // size, which turns the fp32 rounding of a differently ordered batch sum (~1e-7 relative) into 5.6e-5 (relative to
  // the tensor's largest weight) after 5 steps. With eps = 1e-4 the weights compare the reduction itself (6e-7).
  c.train.eps = 1e-4;
  c.train.warmup_steps = 2;
  c.train.steps = 5;
  c.train.ckpt_every = 3;
  c.train.keep_last = 5;
  c.train.valid_batches = 2;
  c.train.activation_checkpointing = true;
  c.train.bucket_mb = 0.05;
  c.train.dist_timeout_s = 60;
  c.train.loader_threads = 0;
  c.runtime.threads = 1;
  c.runtime.blas_threads = 1;
  const std::string path = dir + "/config_b" + std::to_string(batch) + ".json";
  std::ofstream(path) << to_json(c).dump(2);
  return path;
}

std::string cli() { return OMNILITE_CLI_PATH; }

// Whether this build can run Gloo ranks; says why a test skips when not.
bool have_gloo() {
  if (dist_backends().find("gloo") != std::string::npos) return true;
  OMNILITE_SKIP("skipped: this build has no Gloo backend (install libgloo-dev and rebuild)");
  return false;
}
std::string launch(int nproc, int port) {
  return testing::source_path("scripts/launch.sh") + " --nproc " + std::to_string(nproc) + " --master-port " +
         std::to_string(port) + " -- ";
}

// The logged losses and gradient norm of one step of a run against the same step of the reference run.
void check_same_step(const json& m, const json& ref) {
  for (const char* k : {"loss", "loss_clm", "loss_aux", "loss_z", "loss_caption", "grad_norm"}) {
    INFO(k << ": " << m[k].get<double>() << " vs " << ref[k].get<double>());
    CHECK(m[k].get<double>() == Approx(ref[k].get<double>()).epsilon(1e-5));
  }
}

// The metrics of `run`, 5 steps, each step's losses and gradient norm checked against `ref`'s.
std::vector<json> metrics_matching(const std::string& run, const std::vector<json>& ref) {
  INFO("run " << run << " against 1 process");
  const auto m = testing::metrics_of(run);
  REQUIRE(m.size() == 5);
  for (size_t s = 0; s < 5; ++s) {
    INFO("step " << s + 1);
    check_same_step(m[s], ref[s]);
  }
  return m;
}

// Over all tensors of two checkpoints (files or folders, sharded ones too): the largest max|a - b| / max|b|
// (difference against the tensor's scale).
std::pair<double, std::string> max_weight_diff(const std::string& a, const std::string& b) {
  io::WeightsReader ra(a), rb(b);
  REQUIRE(ra.tensors().size() == rb.tensors().size());
  std::pair<double, std::string> worst{0.0, ""};
  for (const auto& [name, e] : rb.tensors()) {
    auto x = ra.load(name).to(torch::kFloat64), y = rb.load(name).to(torch::kFloat64);
    const double d = (x - y).abs().max().item<double>() / std::max(1e-12, y.abs().max().item<double>());
    if (d > worst.first) worst = {d, name + log::format(" (max |difference| %.3g)", (x - y).abs().max().item<double>())};
  }
  return worst;
}

}  // namespace

TEST_CASE("MoE loss shares of two halves add up to the loss of the union, and so do their gradients", "[dist]") {
  torch::manual_seed(3);
  const int64_t E = 6, K = 2;
  auto a = torch::randn({10, E}, torch::kFloat64).requires_grad_(true);
  auto b = torch::randn({7, E}, torch::kFloat64).requires_grad_(true);
  // A stand-in for the all-reduce of rank "a": the statistics it is given plus those rank "b" contributes, which are
  // recorded by running the same function on b with a recording reducer.
  auto shares = [&](auto&& loss_fn) {
    torch::Tensor from_a, from_b;
    loss_fn(a, [&](torch::Tensor& t) { from_a = t.clone(); });
    loss_fn(b, [&](torch::Tensor& t) { from_b = t.clone(); });
    auto sa = loss_fn(a, [&](torch::Tensor& t) { t += from_b; });
    auto sb = loss_fn(b, [&](torch::Tensor& t) { t += from_a; });
    return std::make_pair(sa, sb);
  };
  auto whole = torch::cat({a, b}, 0);
  for (int which = 0; which < 2; ++which) {
    auto fn = [&](const torch::Tensor& x, const AllReduceSum& r) {
      return which == 0 ? load_balancing_loss({x, x * 0.5}, K, r) : router_z_loss({x, x * 0.5}, r);
    };
    auto [sa, sb] = shares(fn);
    auto ref = which == 0 ? load_balancing_loss({whole, whole * 0.5}, K) : router_z_loss({whole, whole * 0.5});
    INFO((which == 0 ? "load balancing" : "z-loss"));
    CHECK((sa + sb).item<double>() == Approx(ref.item<double>()).epsilon(1e-6));
    CHECK(std::abs(sa.item<double>() - ref.item<double>()) > 1e-3);  // a share alone is not the whole
    auto ga = torch::autograd::grad({sa}, {a})[0], gb = torch::autograd::grad({sb}, {b})[0];
    auto gref = torch::autograd::grad({ref}, {a, b});
    CHECK(torch::allclose(ga, gref[0], 1e-6, 1e-9));
    CHECK(torch::allclose(gb, gref[1], 1e-6, 1e-9));
  }
}

TEST_CASE("the launch environment is read from torchrun's or Slurm's variables, and a bad one is named", "[dist]") {
  for (const char* v : {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"})
    unsetenv(v);
  auto o = dist_options_from_env();
  CHECK(o.world_size == 1);
  CHECK(o.rank == 0);
  setenv("SLURM_PROCID", "5", 1);
  setenv("SLURM_NTASKS", "8", 1);
  setenv("SLURM_LOCALID", "1", 1);
  setenv("SLURM_NTASKS_PER_NODE", "4(x2)", 1);
  setenv("MASTER_ADDR", "node07", 1);
  o = dist_options_from_env();
  CHECK(o.rank == 5);
  CHECK(o.world_size == 8);
  CHECK(o.local_rank == 1);
  CHECK(o.local_world_size == 4);
  CHECK(o.master_addr == "node07");
  CHECK(o.master_port == 29500);
  setenv("RANK", "2", 1);  // torchrun's variables win over Slurm's
  setenv("WORLD_SIZE", "3", 1);
  o = dist_options_from_env();
  CHECK(o.rank == 2);
  CHECK(o.world_size == 3);
  setenv("RANK", "3", 1);
  CHECK_THROWS_WITH(dist_options_from_env(), ContainsText("RANK = 3") && ContainsText("WORLD_SIZE = 3"));
  setenv("RANK", "two", 1);
  CHECK_THROWS_WITH(dist_options_from_env(), ContainsText("RANK") && ContainsText("\"two\""));
  setenv("RANK", "0", 1);
  setenv("MASTER_PORT", "70000", 1);
  CHECK_THROWS_WITH(dist_options_from_env(), ContainsText("MASTER_PORT = 70000"));
  for (const char* v : {"RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
                        "SLURM_LOCALID", "SLURM_NTASKS_PER_NODE"})
    unsetenv(v);
}

TEST_CASE("2 Gloo ranks of batch b take the steps of 1 process of batch 2b, with ZeRO-1 and across resumes",
          "[dist][slow]") {
  if (!have_gloo()) return;
  const std::string dir = testing::fresh_temp_dir("omnilite_test_dist");
  const std::string half = write_config(dir, 2, 2), whole = write_config(dir, 4, 4);
  const std::string two = dir + "/two", one = dir + "/one", zero = dir + "/zero", mixed = dir + "/mixed";
  const std::string zero1 = " --set train.zero1=true";
  REQUIRE(run_shell(launch(2, test_port(0)) + cli() + " train --config " + half + " --out " + two + " > " + dir +
                    "/two.log 2>&1") == 0);
  REQUIRE(run_shell(cli() + " train --config " + whole + " --out " + one + " > " + dir + "/one.log 2>&1") == 0);
  // ZeRO-1 on 2 ranks: 3 steps, then resumed on 2 ranks to 5
  REQUIRE(run_shell(launch(2, test_port(1)) + cli() + " train --config " + half + zero1 + " --out " + zero +
                    " --max-steps 3 > " + dir + "/zero.log 2>&1") == 0);
  REQUIRE(run_shell(launch(2, test_port(2)) + cli() + " train --config " + half + zero1 + " --out " + zero +
                    " --resume " + zero + " >> " + dir + "/zero.log 2>&1") == 0);
  // 3 steps on 2 ZeRO-1 ranks, then steps 4-5 in one process with the same global batch
  REQUIRE(run_shell(launch(2, test_port(3)) + cli() + " train --config " + half + zero1 + " --out " + mixed +
                    " --max-steps 3 > " + dir + "/mixed.log 2>&1") == 0);
  REQUIRE(run_shell(cli() + " train --config " + whole + " --out " + mixed + " --resume " + mixed + " >> " + dir +
                    "/mixed.log 2>&1") == 0);

  const auto m1 = testing::metrics_of(one);
  REQUIRE(m1.size() == 5);
  CHECK(m1.back()["loss"].get<double>() < m1.front()["loss"].get<double>());
  const std::string last = "/checkpoints/step_0000005/model.safetensors";
  for (const auto& run : {two, zero, mixed}) {
    INFO("run " << run << " against 1 process");
    const auto m = metrics_matching(run, m1);
    for (size_t s = 0; s < 5; ++s) {
      INFO("step " << s + 1);
      CHECK(m[s].value("world_size", int64_t{1}) == (run == mixed && s >= 3 ? 1 : 2));
      CHECK(m[s].value("allreduce_s", 0.0) >= 0);
      CHECK(m[s]["tokens_per_s"].get<double>() > 0);
    }
    CHECK(m.back()["valid_loss_text"].get<double>() == Approx(m1.back()["valid_loss_text"].get<double>()).epsilon(1e-5));
    CHECK(m.back()["valid_loss_caption"].get<double>() ==
          Approx(m1.back()["valid_loss_caption"].get<double>()).epsilon(1e-5));
    const auto [d, where] = max_weight_diff(run + last, one + last);
    INFO("final weights, largest difference / tensor scale " << d << " in " << where);
    CHECK(d < 1e-5);
  }
  std::ifstream zl(dir + "/zero.log");
  CHECK_THAT(std::string((std::istreambuf_iterator<char>(zl)), std::istreambuf_iterator<char>()),
             ContainsText("zero1: rank 0 holds the AdamW state of"));
  // rank 0 alone wrote: one metrics line per step, the checkpoint records the world size
  std::ifstream sf(two + "/checkpoints/step_0000005/state.json");
  CHECK(json::parse(sf)["world_size"].get<int64_t>() == 2);
}

// ZeRO-2 and -3 at 2 and 3 ranks against 1 process of the same global batch: losses, gradient norms and final
// weights; resumes that change the world size and the level (3 ranks -> 1 process, 2 ranks -> 3) re-shard the
// checkpoint exactly (the moments too: the weights after the resumed steps agree); per-rank memory falls as 1/W and
// `omnilite memory` predicts it; `omnilite export` reads a sharded checkpoint.
TEST_CASE("ZeRO-2 and ZeRO-3 on 2 and 3 Gloo ranks take the steps of 1 process, shard checkpoints and re-shard them",
          "[dist][zero][slow]") {
  if (!have_gloo()) return;
  const std::string dir = testing::fresh_temp_dir("omnilite_test_zero");
  // the global batch is 6 rows (and 6 caption rows) per micro-batch at every world size
  const std::string b6 = write_config(dir, 6, 6), b3 = write_config(dir, 3, 3), b2 = write_config(dir, 2, 2);
  const std::string one = dir + "/one", z2 = dir + "/z2", z3a = dir + "/z3a", z3b = dir + "/z3b";
  const std::string z0 = dir + "/z0", z1 = dir + "/z1";
  auto train = [&](int nproc, const std::string& cfg, int zero, const std::string& out, const std::string& more,
                   int port) {
    const std::string cmd = (nproc > 1 ? launch(nproc, test_port(port)) : std::string()) + cli() + " train --config " +
                            cfg + " --set train.zero=" + std::to_string(zero) + " --out " + out + more + " >> " +
                            out + ".log 2>&1";
    INFO(cmd);
    REQUIRE(run_shell(cmd) == 0);
  };
  train(1, b6, 0, one, "", 20);
  // ZeRO-2 on 2 ranks, steps 1-5, without activation checkpointing (1 process recomputes: the same function)
  train(2, b3, 2, z2, " --set train.activation_checkpointing=false", 21);
  train(3, b2, 0, z0, "", 29);                                   // 3 ranks without ZeRO, and with ZeRO-1
  train(3, b2, 1, z1, "", 30);
  train(3, b2, 3, z3a, " --max-steps 3", 22);                    // ZeRO-3 on 3 ranks, steps 1-3 ...
  train(1, b6, 0, z3a, " --resume " + z3a, 23);                  // ... then 1 process from the sharded checkpoint
  train(2, b3, 3, z3b, " --max-steps 3", 24);                    // ZeRO-3 on 2 ranks, steps 1-3 ...
  train(3, b2, 2, z3b, " --resume " + z3b, 25);                  // ... then ZeRO-2 on 3 ranks: re-sharded 2 -> 3

  const auto m1 = testing::metrics_of(one);
  REQUIRE(m1.size() == 5);
  const std::string ckpt3 = "/checkpoints/step_0000003", ckpt5 = "/checkpoints/step_0000005";
  for (const auto& run : {z0, z1, z2, z3a, z3b}) {
    INFO("run " << run << " against 1 process");
    const auto m = metrics_matching(run, m1);
    CHECK(m.back()["valid_loss_text"].get<double>() ==
          Approx(m1.back()["valid_loss_text"].get<double>()).epsilon(1e-5));
    const auto [d, where] = max_weight_diff(run + ckpt5, one + ckpt5);
    INFO("final weights, largest difference / tensor scale " << d << " in " << where);
    CHECK(d < 1e-5);
  }
  // sharded checkpoints: one file per rank and the manifest, no optimizer.pt, nothing gathered on rank 0
  CHECK(fs::exists(z3a + ckpt3 + "/zero_shards.json"));
  CHECK(fs::exists(z3a + ckpt3 + "/zero-00002-of-00003.safetensors"));
  CHECK_FALSE(fs::exists(z3a + ckpt3 + "/optimizer.pt"));
  CHECK(fs::exists(z3a + ckpt5 + "/optimizer.pt"));  // the 1-process continuation writes the unsharded layout
  CHECK(fs::exists(z3b + ckpt5 + "/zero-00002-of-00003.safetensors"));
  {
    io::WeightsReader r(z3a + ckpt3);
    r.verify_checksum();
    const auto& man = r.zero_manifest();
    CHECK(man["world_size"].get<int64_t>() == 3);
    CHECK(man["zero"].get<int64_t>() == 3);
    io::SafetensorsReader rest(z3a + ckpt3 + "/model.safetensors");
    for (const auto& [name, t] : man["tensors"].items()) CHECK_FALSE(rest.contains(name));
    // every rank holds a third of the values (up to the padding of each unit to a multiple of 3)
    std::vector<double> values(3, 0.0);
    double total = 0;
    for (const auto& [name, t] : man["tensors"].items())
      for (const auto& piece : t["pieces"]) {
        values[piece[0].get<size_t>()] += piece[2].get<double>();
        total += piece[2].get<double>();
      }
    for (double v : values) CHECK(v == Approx(total / 3).margin(3 * 3));  // 3 units (2 layers, the root)
  }
  // A damaged sharded checkpoint is refused in one line that names the manifest and the problem.
  {
    const std::string bad = dir + "/bad";
    fs::copy(z3a + ckpt3, bad);
    std::ifstream mf(bad + "/zero_shards.json");
    json man = json::parse(mf);
    mf.close();
    auto& first = man["tensors"].begin().value();
    first["pieces"].erase(first["pieces"].size() - 1);  // the last piece of a tensor dropped
    std::ofstream(bad + "/zero_shards.json") << man.dump();
    CHECK_THROWS_WITH(io::WeightsReader(bad), ContainsText("zero_shards.json") && ContainsText("of its"));
    fs::copy(z3a + ckpt3 + "/zero_shards.json", bad + "/zero_shards.json", fs::copy_options::overwrite_existing);
    fs::remove(bad + "/zero-00001-of-00003.safetensors");
    CHECK_THROWS_WITH(io::WeightsReader(bad), ContainsText("names shard \"zero-00001-of-00003.safetensors\""));
  }
  // Memory, as each run's rank 0 measured it after its steps: weights + gradients + AdamW state fall as 1/W.
  auto held = [](const json& m) {
    return m["mem_weights_mib"].get<double>() + m["mem_grads_mib"].get<double>() + m["mem_optimizer_mib"].get<double>();
  };
  const double whole = held(m1.back());
  const auto ma = testing::metrics_of(z3a), mb = testing::metrics_of(z3b);
  INFO("held MiB: 1 process " << whole << ", ZeRO-3 on 3 ranks " << held(ma[2]) << ", on 2 " << held(mb[2]));
  CHECK(held(ma[2]) == Approx(whole / 3).epsilon(0.10));
  CHECK(held(mb[2]) == Approx(whole / 2).epsilon(0.10));
  // `omnilite memory` predicts the measured figure
  const std::string pred = dir + "/pred.json";
  REQUIRE(run_shell(cli() + " memory --config " + b2 + " --world-size 3 --zero 3 --json > " + pred + " 2> " + pred +
                    ".log") == 0);
  std::ifstream pf(pred);
  const json p = json::parse(pf);
  CHECK(p["per_rank_state_bytes"].get<double>() / (1024.0 * 1024.0) == Approx(held(ma[2])).epsilon(0.10));
  // ... and what is gathered at the peak of a step (the root and its gradients, a block's with the prefetched one)
  CHECK(p["per_rank"]["gathered_peak"].get<double>() / (1024.0 * 1024.0) ==
        Approx(ma[2]["mem_gathered_peak_mib"].get<double>()).epsilon(0.10));
  // `omnilite export` reads a sharded checkpoint as it is
  REQUIRE(run_shell(cli() + " export --checkpoint " + z2 + ckpt5 + " --format hf --out " + dir + "/hf-z2 > " + dir +
                    "/export.log 2>&1") == 0);
  REQUIRE(run_shell(cli() + " export --checkpoint " + one + ckpt5 + " --format hf --out " + dir + "/hf-one >> " + dir +
                    "/export.log 2>&1") == 0);
  const auto [d, where] = max_weight_diff(dir + "/hf-z2", dir + "/hf-one");
  INFO("exported weights " << d << " in " << where);
  CHECK(d < 1e-5);
  // Frozen parameters stay whole on every rank, in model.safetensors; a frozen decoder layer is an empty unit.
  auto frozen = [&](const std::string& cfg) {
    std::ifstream f(cfg);
    json j = json::parse(f);
    j["train"]["freeze"] = {"text.layers.0.*", "vision.blocks.1.*"};
    j["train"]["steps"] = 3;
    const std::string out = cfg.substr(0, cfg.size() - 5) + "_frozen.json";
    std::ofstream(out) << j.dump(2);
    return out;
  };
  const std::string f1 = dir + "/f1", f3 = dir + "/f3";
  train(1, frozen(b6), 0, f1, "", 26);
  train(2, frozen(b3), 3, f3, "", 27);
  {
    const auto a = testing::metrics_of(f1), b = testing::metrics_of(f3);
    REQUIRE(a.size() == 3);
    REQUIRE(b.size() == 3);
    for (size_t k = 0; k < 3; ++k)
      CHECK(b[k]["loss"].get<double>() == Approx(a[k]["loss"].get<double>()).epsilon(1e-5));
    const std::string c3 = "/checkpoints/step_0000003";
    io::SafetensorsReader rest(f3 + c3 + "/model.safetensors");
    CHECK(rest.contains("text.layers.0.self_attn.q_proj.weight"));
    CHECK_FALSE(rest.contains("text.layers.1.self_attn.q_proj.weight"));
    const auto [d, where] = max_weight_diff(f3 + c3, f1 + c3);
    INFO("frozen runs' weights " << d << " in " << where);
    CHECK(d < 1e-5);
  }
  // Non-finite losses at ZeRO-3 (lr = 1e30: step 6 blows the weights up, steps 7 and 8 overflow): every rank skips
  // alike (no rank waits in a collective the others left), the run stops after train.max_bad_steps naming the last
  // good checkpoint, and the earlier checkpoints stay as they were.
  const std::string before = dir + "/z2-step5";
  fs::copy(z2 + ckpt5, before);
  const std::string nan_cmd = launch(2, test_port(28)) + cli() + " train --config " + b3 +
                              " --set train.zero=3 --out " + z2 + " --resume " + z2 + " --set train.steps=8 --set train.max_bad_steps=2 " +
                              "--set train.lr=1e30 >> " + z2 + ".nan.log 2>&1";
  CHECK(run_shell(nan_cmd) != 0);
  {
    std::ifstream nl(z2 + ".nan.log");
    const std::string nlog((std::istreambuf_iterator<char>(nl)), std::istreambuf_iterator<char>());
    CHECK_THAT(nlog, ContainsText("2 steps in a row with a non-finite loss") &&
                         ContainsText("last good checkpoint is " + z2 + "/checkpoints/step_0000006"));
    CHECK(io::latest_checkpoint(z2) == z2 + "/checkpoints/step_0000006");
    const auto m = testing::metrics_of(z2);
    REQUIRE(m.size() == 7);  // step 8's line is not written: the run stops there
    CHECK_FALSE(m[5]["skipped"].get<bool>());
    CHECK(m[6]["skipped"].get<bool>());
    CHECK(max_weight_diff(z2 + ckpt5, before).first == 0.0);
  }
  std::ifstream zl(z3a + ".log");
  const std::string zlog((std::istreambuf_iterator<char>(zl)), std::istreambuf_iterator<char>());
  CHECK_THAT(zlog, ContainsText("zero3: 3 ranks (gloo)") &&
                       ContainsText("W reduce calls (gloo has no reduce_scatter)"));
}

TEST_CASE("2 Gloo ranks streaming token and image shards with loader threads resume to the losses of one run",
          "[dist][shards]") {
  if (!have_gloo() || !have_opencv()) return;
  const std::string dir = testing::fresh_temp_dir("omnilite_test_dist_shards");
  const std::string half = write_config(dir, 2, 2);
  Config c = load_config_file(half);
  TokenizeOptions o;
  o.inputs = c.data.text_train;
  o.out_dir = dir + "/shards";
  o.shard_tokens = 3000;
  tokenize_to_shards(o, Tokenizer(c.data.tokenizer), nullptr);
  c.data.text_train = {o.out_dir};
  ImageLoadOptions io;
  io.size = 28;
  ImageShardWriteOptions w;
  w.out_dir = dir + "/images";
  w.shard_samples = 10;
  REQUIRE(write_image_shards(read_image_captions(c.data.image_train, io), w).size() == 4);
  c.data.image_train = {w.out_dir};
  c.train.loader_threads = 2;
  c.train.document_masks = true;
  const std::string cfg = dir + "/shards.json";
  std::ofstream(cfg) << to_json(c).dump(2);
  const std::string one = dir + "/one", two = dir + "/two";
  REQUIRE(run_shell(launch(2, test_port(30)) + cli() + " train --config " + cfg + " --out " + one + " > " + dir +
                    "/one.log 2>&1") == 0);
  REQUIRE(run_shell(launch(2, test_port(31)) + cli() + " train --config " + cfg + " --out " + two +
                    " --max-steps 3 > " + dir + "/two.log 2>&1") == 0);
  REQUIRE(run_shell(launch(2, test_port(32)) + cli() + " train --config " + cfg + " --out " + two + " --resume " +
                    two + " >> " + dir + "/two.log 2>&1") == 0);
  const auto m1 = testing::metrics_of(one), m2 = testing::metrics_of(two);
  REQUIRE(m1.size() == 5);
  REQUIRE(m2.size() == 5);
  for (size_t s = 0; s < 5; ++s) {
    INFO("step " << s + 1);
    CHECK(m2[s]["loss"].get<double>() == m1[s]["loss"].get<double>());
    CHECK(m2[s]["grad_norm"].get<double>() == m1[s]["grad_norm"].get<double>());
    CHECK(m2[s]["world_size"].get<int64_t>() == 2);
    CHECK(m1[s]["data_bad_images"].get<double>() == 0);
  }
  CHECK(m1.back()["loss_caption"].get<double>() > 0);
}

TEST_CASE("QLoRA on 2 ranks reduces the adapters alone and takes the steps of 1 process, also at ZeRO-2 and -3",
          "[dist][slow]") {
  if (!have_gloo()) return;
  const std::string dir = testing::fresh_temp_dir("omnilite_test_dist_qlora");
  const std::string half = write_config(dir, 2, 2), whole = write_config(dir, 4, 4);
  REQUIRE(run_shell(cli() + " init --config " + whole + " --out " + dir + "/base > " + dir + "/init.log 2>&1") == 0);
  const std::string lora = " --set lora.enabled=true --set lora.rank=4 --set lora.alpha=8 --set lora.dropout=0 --base " +
                           dir + "/base";
  REQUIRE(run_shell(launch(2, test_port(20)) + cli() + " train --config " + half + lora + " --out " + dir +
                    "/two > " + dir + "/two.log 2>&1") == 0);
  REQUIRE(run_shell(cli() + " train --config " + whole + lora + " --out " + dir + "/one > " + dir + "/one.log 2>&1") == 0);
  // ZeRO-2, and ZeRO-3 for 3 steps resumed at ZeRO-3: the adapters and their moments are sharded; checkpoints keep
  // PEFT's adapter layout (the adapters gathered for rank 0); the NF4 base stays whole on every rank
  REQUIRE(run_shell(launch(2, test_port(21)) + cli() + " train --config " + half + lora + " --set train.zero=2 --out " +
                    dir + "/z2 > " + dir + "/z2.log 2>&1") == 0);
  REQUIRE(run_shell(launch(2, test_port(22)) + cli() + " train --config " + half + lora + " --set train.zero=3 --out " +
                    dir + "/z3 --max-steps 3 > " + dir + "/z3.log 2>&1") == 0);
  REQUIRE(run_shell(launch(2, test_port(23)) + cli() + " train --config " + half + lora + " --set train.zero=3 --out " +
                    dir + "/z3 --resume " + dir + "/z3 >> " + dir + "/z3.log 2>&1") == 0);
  const auto m1 = testing::metrics_of(dir + "/one");
  REQUIRE(m1.size() == 5);
  for (const char* run : {"/two", "/z2", "/z3"}) {
    const auto m2 = testing::metrics_of(dir + run);
    REQUIRE(m2.size() == 5);
    for (size_t s = 0; s < 5; ++s) {
      INFO(run << " step " << s + 1);
      CHECK(m2[s]["loss"].get<double>() == Approx(m1[s]["loss"].get<double>()).epsilon(1e-5));
      CHECK(m2[s]["grad_norm"].get<double>() == Approx(m1[s]["grad_norm"].get<double>()).epsilon(1e-5));
    }
    const std::string adapter = "/checkpoints/step_0000005/adapter_model.safetensors";
    const auto [d, where] = max_weight_diff(dir + run + adapter, dir + "/one" + adapter);
    INFO(run << ": adapters, largest difference / tensor scale " << d << " in " << where);
    CHECK(d < 1e-5);
  }
  const auto mz = testing::metrics_of(dir + "/z3");
  auto held = [](const json& m) {
    return m["mem_weights_mib"].get<double>() + m["mem_grads_mib"].get<double>() + m["mem_optimizer_mib"].get<double>();
  };
  CHECK(held(mz.back()) == Approx(held(m1.back()) / 2).epsilon(0.10));
  // the reducer holds the adapters only: 2 x rank x (in + out) per adapted projection, far below the model's size
  std::ifstream lf(dir + "/two.log");
  const std::string log((std::istreambuf_iterator<char>(lf)), std::istreambuf_iterator<char>());
  const std::string key = "global batch = 2 x the configured batch sizes, ";  // then "N trainable parameters"
  const auto at = log.find(key);
  REQUIRE(at != std::string::npos);
  const int64_t reduced = std::stoll(log.substr(at + key.size()));
  int64_t adapters = 0;
  io::SafetensorsReader ad(dir + "/one/checkpoints/step_0000005/adapter_model.safetensors");
  for (const auto& [name, e] : ad.tensors()) adapters += ad.load(name).numel();
  CHECK(reduced == adapters);
  CHECK(reduced < 100000);
}

TEST_CASE("a killed or stopped rank stops the other with an error within the timeout, mismatched ranks are refused",
          "[dist][slow]") {
  if (!have_gloo()) return;
  const std::string dir = testing::fresh_temp_dir("omnilite_test_dist_fault");
  const std::string cfg = write_config(dir, 2, 2);
  // Starts rank 0 and rank 1 by hand (no launcher, which would stop the survivor itself), waits until rank 0 has
  // logged a step, applies `signal` to rank 1, and writes rank 0's exit status and the seconds it took to exit.
  auto fault = [&](const std::string& name, const std::string& signal, int port, const std::string& more = "") {
    const std::string run = dir + "/" + name;
    const std::string env = "WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=" + std::to_string(port);
    const std::string args = " train --config " + cfg + " --out " + run +
                             " --max-steps 100000 --set train.steps=100000 --set train.dist_timeout_s=5" + more;
    const std::string script =
        "RANK=0 " + env + " " + cli() + args + " > " + run + ".r0.log 2>&1 & p0=$!; " +
        "RANK=1 " + env + " " + cli() + args + " > " + run + ".r1.log 2>&1 & p1=$!; " +
        "for i in $(seq 600); do [ -s " + run + "/metrics.jsonl ] && break; sleep 0.2; done; " +
        "kill -" + signal + " $p1; t0=$(date +%s%N); wait $p0; rc=$?; t1=$(date +%s%N); " +
        "kill -9 $p1 2>/dev/null; wait $p1 2>/dev/null; " +
        "echo $rc $(( (t1 - t0) / 1000000 )) > " + run + ".result";
    run_shell(script);
    std::ifstream f(run + ".result");
    int rc = -1;
    double ms = -1;
    f >> rc >> ms;
    const double seconds = ms / 1000.0;
    std::ifstream lf(run + ".r0.log");
    const std::string log((std::istreambuf_iterator<char>(lf)), std::istreambuf_iterator<char>());
    return std::make_tuple(rc, seconds, log);
  };
  {
    const auto [rc, seconds, log] = fault("killed", "9", test_port(10));
    INFO(log);
    CHECK(rc != 0);
    CHECK(seconds < 5 + 10);
    CHECK_THAT(log, ContainsText("distributed: rank 0") && ContainsText("failed"));
  }
  {
    // ZeRO-3 with a sharded checkpoint every step: the survivor stops within the timeout, and the newest complete
    // checkpoint (every shard and the manifest; a half-written one stays a .tmp- folder) loads and resumes.
    const auto [rc, seconds, log] = fault("zero3", "9", test_port(14), " --set train.zero=3 --set train.ckpt_every=1");
    INFO(log);
    CHECK(rc != 0);
    CHECK(seconds < 5 + 10);
    CHECK_THAT(log, ContainsText("distributed: rank 0") && ContainsText("failed"));
    const std::string last = io::latest_checkpoint(dir + "/zero3");
    INFO("newest checkpoint " << last);
    CHECK(fs::exists(last + "/zero_shards.json"));
    CHECK(fs::exists(last + "/zero-00001-of-00002.safetensors"));
    io::WeightsReader r(last);
    r.verify_checksum();
    std::ifstream sf(last + "/state.json");
    const int64_t step = json::parse(sf)["step"].get<int64_t>();
    REQUIRE(run_shell(launch(2, test_port(15)) + cli() + " train --config " + cfg + " --out " + dir + "/zero3" +
                      " --resume " + dir + "/zero3 --set train.steps=100000 --set train.zero=3 --max-steps " +
                      std::to_string(step + 1) + " > " + dir + "/zero3.resume.log 2>&1") == 0);
    CHECK(testing::metrics_of(dir + "/zero3").back()["step"].get<int64_t>() == step + 1);
  }
  {
    // a hung rank at ZeRO-3: the survivor waits in a block's all-gather or reduce-scatter until the timeout
    const auto [rc, seconds, log] = fault("zero3-stopped", "STOP", test_port(16), " --set train.zero=3");
    INFO(log);
    CHECK(rc != 0);
    CHECK(seconds < 5 + 10);
    CHECK_THAT(log, ContainsText("distributed: rank 0") && ContainsText("train.dist_timeout_s = 5"));
  }
  {
    const auto [rc, seconds, log] = fault("stopped", "STOP", test_port(11));
    INFO(log);
    CHECK(rc != 0);
    CHECK(seconds < 5 + 10);
    CHECK_THAT(log, ContainsText("distributed: rank 0") && ContainsText("train.dist_timeout_s = 5"));
  }
  // A different config on rank 1, then a different world size: both ranks refuse to start, naming the difference.
  auto mismatch = [&](const std::string& name, const std::string& world1, const std::string& extra1, int port) {
    const std::string run = dir + "/" + name;
    const std::string env = "MASTER_ADDR=127.0.0.1 MASTER_PORT=" + std::to_string(port);
    const std::string args = " train --config " + cfg + " --out " + run + " --set train.dist_timeout_s=20";
    run_shell("RANK=0 WORLD_SIZE=2 " + env + " " + cli() + args + " > " + run + ".r0.log 2>&1 & p0=$!; " +
              "RANK=1 WORLD_SIZE=" + world1 + " " + env + " " + cli() + args + extra1 + " > " + run +
              ".r1.log 2>&1; r1=$?; wait $p0; echo $? $r1 > " + run + ".result");
    std::ifstream f(run + ".result");
    int rc0 = -1, rc1 = -1;
    f >> rc0 >> rc1;
    std::ifstream l0(run + ".r0.log"), l1(run + ".r1.log");
    return std::make_tuple(rc0, rc1, std::string((std::istreambuf_iterator<char>(l0)), std::istreambuf_iterator<char>()),
                           std::string((std::istreambuf_iterator<char>(l1)), std::istreambuf_iterator<char>()));
  };
  {
    const auto [rc0, rc1, log0, log1] = mismatch("config", "2", " --set train.lr=0.1", test_port(12));
    INFO(log0 << "\n---\n" << log1);
    CHECK(rc0 != 0);
    CHECK(rc1 != 0);
    CHECK_THAT(log0, ContainsText("rank 0 and rank 1 run different configs"));
    CHECK_THAT(log1, ContainsText("rank 1 and rank 0 run different configs"));
  }
  {
    const auto [rc0, rc1, log0, log1] = mismatch("world", "3", "", test_port(13));
    INFO(log0 << "\n---\n" << log1);
    CHECK(rc0 != 0);
    CHECK(rc1 != 0);
    CHECK_THAT(log0, ContainsText("rank 0 runs with WORLD_SIZE = 2, rank 1 with 3"));
    CHECK_THAT(log1, ContainsText("rank 1 runs with WORLD_SIZE = 3, rank 0 with 2"));
  }
}
