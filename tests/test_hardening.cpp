// Hardening: the defects an outside review found, each against an independent reference. Readers that allocate
// from headers, marker text typed by users, eval labels, one-line CLI errors, runs without held-out data, gradient
// accumulation against one large batch (float64), full fine-tunes from a base, and where `--resume` continues.
#include "catch_compat.h"
#include <nlohmann/json.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "helpers.h"
#include "omnilite/files.h"
#include "omnilite/data/idx.h"
#include "omnilite/data/pnm.h"
#include "omnilite/data/text_dataset.h"
#include "omnilite/data/tokenizer.h"
#include "omnilite/eval/evaluate.h"
#include "omnilite/infer/generate.h"
#include "omnilite/io/adapter.h"
#include "omnilite/io/checkpoint.h"
#include "omnilite/modules/omnilite.h"
#include "omnilite/train/stage.h"
#include "omnilite/train/trainer.h"

using namespace omnilite;
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::string be32(uint32_t v) {
  return {static_cast<char>(v >> 24), static_cast<char>(v >> 16), static_cast<char>(v >> 8), static_cast<char>(v)};
}

// Runs the omnilite program with `args` (and `env` assignments before it); returns {exit status, stderr}.
std::pair<int, std::string> run_cli(const std::string& args, const std::string& env = "") {
  const std::string err = (fs::temp_directory_path() / "omnilite_test_cli_stderr.txt").string();
  const std::string cmd = env + " " + std::string(OMNILITE_CLI_PATH) + " " + args + " >/dev/null 2>" + err;
  const int status = std::system(cmd.c_str());
  std::ifstream f(err);
  std::string text(std::istreambuf_iterator<char>(f), {});
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, text};
}

// A text-only tiny config on the word corpus, 3 short steps.
Config tiny_text_config(const std::string& dir) {
  Config c = testing::tiny_text_config(dir);
  c.train.batch_size = 2;
  c.train.seq_len = 16;
  c.train.steps = 3;
  c.train.ckpt_every = 100;
  c.train.log_every = 100;
  return c;
}


}  // namespace

TEST_CASE("an atomic file replaces its path whole or not at all, also when the writer dies", "[io][crash]") {
  const std::string dir = testing::fresh_temp_dir("atomic_file");
  const std::string path = dir + "/f.bin";
  write_file_atomically(path, "old");
  CHECK(testing::bytes_of(path) == "old");
  {  // given up before commit (an exception on the way): the old content stays, no temporary is left
    AtomicFile f(path);
    f.write("new bytes");
  }
  CHECK(testing::bytes_of(path) == "old");
  CHECK_FALSE(fs::exists(path + ".tmp"));
  {  // killed while writing: the old content stays
    const pid_t child = fork();
    if (child == 0) {
      AtomicFile f(path);
      f.write("half of the new");
      ::raise(SIGKILL);
    }
    int status = 0;
    waitpid(child, &status, 0);
    CHECK(WIFSIGNALED(status));
  }
  CHECK(testing::bytes_of(path) == "old");
  {  // a header patched after the data (as the safetensors CRC), then committed
    AtomicFile f(path);
    f.write("########-data");
    f.write_at(0, "12345678", 8);
    CHECK(f.size() == 13);
    CHECK_THROWS(f.write_at(10, "1234", 4));
    f.commit();
  }
  CHECK(testing::bytes_of(path) == "12345678-data");
  CHECK_FALSE(fs::exists(path + ".tmp"));
  CHECK_THROWS_WITH(AtomicFile(dir + "/no/such/folder/x"), ContainsText("no/such/folder/x.tmp") &&
                                                                 ContainsText("No such file"));
}

TEST_CASE("IDX and PNM headers that announce more than the file holds are refused before allocating",
          "[data][errors]") {
  const auto dir = testing::fresh_temp_dir("hardening_readers");
  // A 20-byte IDX file announcing 60000 x 65536 x 65536 bytes (257 TB), and one whose product overflows 64 bits.
  write_bytes(dir + "/big-idx3-ubyte", be32(0x803) + be32(60000) + be32(65536) + be32(65536) + "abcd");
  CHECK_THROWS_WITH(read_idx(dir + "/big-idx3-ubyte"),
                    ContainsText("big-idx3-ubyte") && ContainsText("holds 4 of the 257698037760000 data bytes"));
  write_bytes(dir + "/wrap-idx3-ubyte", be32(0x803) + be32(0xFFFFFFFFu) + be32(0xFFFFFFFFu) + be32(0xFFFFFFFFu));
  CHECK_THROWS_WITH(read_idx(dir + "/wrap-idx3-ubyte"), ContainsText("more than 2^64"));
  // PNM: the largest size the reader accepts, with a few pixel bytes (binary) or values (ASCII).
  write_bytes(dir + "/big.ppm", "P6\n65536 65536\n255\nxyz");
  CHECK_THROWS_WITH(read_pnm(dir + "/big.ppm"), ContainsText("big.ppm") && ContainsText("truncated: 3 of 12884901888"));
  write_bytes(dir + "/big_ascii.ppm", "P3\n65536 65536\n255\n1 2 3\n");
  CHECK_THROWS_WITH(read_pnm(dir + "/big_ascii.ppm"), ContainsText("truncated") && ContainsText("12884901888"));
}

TEST_CASE("marker strings typed in a prompt or a document are plain text, never placeholders", "[data][infer]") {
  const auto dir = testing::fresh_temp_dir("hardening_markers");
  const Config c = tiny_text_config(dir);
  const Tokenizer tok(c.data.tokenizer);
  const auto prompt = tok.encode("what is <image> here <gen_image>");
  const auto& t = c.model.tokens;
  for (int64_t id : prompt) {
    CHECK(id != t.image_id);
    CHECK(id != t.gen_image_id);
  }
  torch::manual_seed(3);
  OmniLite model(c.model);
  model->eval();
  torch::NoGradGuard ng;
  TextSampling greedy;
  greedy.temperature = 0;
  std::vector<int64_t> ids{t.bos_id};
  ids.insert(ids.end(), prompt.begin(), prompt.end());
  // Before: the prompt held an image placeholder without an image, and the forward pass threw.
  const auto out = generate_text(*model, ids, 4, greedy);
  CHECK_FALSE(out.empty());
  CHECK(out.size() <= 4);
  // The documents training reads go through the same encoder.
  const auto stream = tokenize_documents({"a <image> b"}, tok, t.bos_id, t.eos_id);
  CHECK(stream.eq(t.image_id).sum().item<int64_t>() == 0);
}

TEST_CASE("eval refuses a held-out label outside the class names, naming it", "[eval][errors]") {
  const auto dir = testing::fresh_temp_dir("hardening_labels");
  write_ppm(dir + "/a.ppm", torch::full({28, 28, 3}, 200, torch::kUInt8));
  std::ofstream(dir + "/valid.jsonl") << json{{"image", dir + "/a.ppm"}, {"text", "a coat."}, {"label", 4}}.dump() << "\n"
                                      << json{{"image", dir + "/a.ppm"}, {"text", "a thing."}, {"label", 12}}.dump() << "\n";
  Config c = testing::load("configs/tiny.json");
  c.data.image_valid = {dir + "/valid.jsonl"};
  CHECK_THROWS_WITH(held_out_images(c, 28, 100), ContainsText("data.image_valid") && ContainsText("label 12") &&
                                                     ContainsText("image 1") && ContainsText("hint"));
  std::ofstream(dir + "/valid.jsonl") << json{{"image", dir + "/a.ppm"}, {"text", "a coat."}, {"label", 4}}.dump() << "\n";
  CHECK(held_out_images(c, 28, 100).size() == 1);
}

TEST_CASE("a LibTorch check reaches the user as one line without a C++ backtrace", "[cli][errors]") {
  // The decoder's TORCH_CHECK on the sequence length (a c10::Error, whose what() carries the backtrace).
  const std::string args = "bench forward --config " + testing::source_path("configs/tiny.json") + " --seq 5000 --batch 1";
  const auto [rc, err] = run_cli(args);
  INFO(err);
  CHECK(rc == 1);
  CHECK(err.find("max_position_embeddings = 256") != std::string::npos);
  CHECK(err.find("hint") != std::string::npos);
  CHECK(err.find("frame #") == std::string::npos);
  CHECK(err.find("Exception raised from") == std::string::npos);
  CHECK(std::count(err.begin(), err.end(), '\n') == 1);
  // Developers get the whole of it on request.
  const auto [rc_bt, err_bt] = run_cli(args, "OMNILITE_BACKTRACE=1");
  CHECK(rc_bt == 1);
  CHECK(err_bt.find("Exception raised from") != std::string::npos);
}

TEST_CASE("a run without held-out data skips validation and writes its final checkpoint", "[train][errors]") {
  const auto base = testing::fresh_temp_dir("hardening_novalid");
  for (const bool empty_file : {false, true}) {
    Config c = tiny_text_config(base + "/data");
    if (empty_file) {
      std::ofstream(base + "/empty.txt") << "";
      c.data.text_valid = {base + "/empty.txt"};
    } else {
      c.data.text_valid = {};
    }
    TrainRunOptions r;
    r.out_dir = base + (empty_file ? "/run_empty_file" : "/run_none");
    const auto result = train(c, r);  // before: SIGSEGV at the last step, no checkpoint
    CHECK(result.steps_done == 3);
    CHECK(fs::exists(result.last_checkpoint + "/model.safetensors"));
    const auto m = testing::metrics_of(r.out_dir);
    REQUIRE(m.size() == 3);
    for (const auto& line : m) CHECK_FALSE(line.contains("valid_loss_text"));
  }
}

TEST_CASE("grad_accum k at batch b takes the step of one batch k*b: CLM, RF and z-loss, in float64",
          "[train][accum]") {
  const auto base = testing::fresh_temp_dir("hardening_accum");
  // A multimodal config: text rows of different target counts, caption rows, generation rows (RF).
  auto [corpus, tok_model] = testing::word_corpus_and_tokenizer(base + "/data");
  const auto images = testing::write_synthetic_fashion(base + "/data", "train", 32, 4, 1);
  Config c = testing::load("configs/tiny.json");
  c.model.text.vocab_size = 320;
  c.data.tokenizer = tok_model;
  c.data.text_train = {corpus};
  c.data.text_valid = {};
  c.data.image_train = {images};
  c.data.image_valid = {};
  c.train.seq_len = 24;
  c.train.steps = 1;
  c.train.loader_threads = 0;
  c.train.aux_coef = 0;  // the balancing loss's routing fractions are per micro-batch (docs/training.md)
  c.train.z_coef = 0.5;  // large, so that a wrong z normaliser shows
  {  // the frozen VQ-VAE the flow targets come from
    Config vq = c;
    vq.train.stage = "vqvae";
    vq.train.batch_size = 8;
    vq.train.steps = 1;
    TrainRunOptions rv;
    rv.out_dir = base + "/vq";
    train(vq, rv);
    c.data.vqvae = rv.out_dir;
  }
  // Micro-batches of b items: text rows b, caption samples b, generation samples b.
  auto gradients = [&](int64_t b, int64_t k, std::map<std::string, double>& terms) {
    Config x = c;
    x.train.batch_size = b;
    x.train.caption_batch_size = b;
    x.train.gen_batch_size = b;
    x.train.grad_accum = k;
    torch::manual_seed(7);
    auto stage = make_stage(x, torch::kCPU);
    stage->module().to(torch::kFloat64);
    stage->start(0);
    stage->begin_step(0, k);
    for (int64_t m = 0; m < k; ++m) {
      auto r = stage->micro_step(m);
      r.loss.backward();
      for (const auto& [key, v] : r.terms) terms[key] += v;
    }
    std::vector<torch::Tensor> g;
    for (const auto& p : stage->module().parameters())
      if (p.requires_grad()) g.push_back(p.grad().defined() ? p.grad().clone() : torch::zeros_like(p));
    return g;
  };
  std::map<std::string, double> big_terms, accum_terms;
  const auto big = gradients(4, 1, big_terms), accum = gradients(1, 4, accum_terms);
  REQUIRE(big.size() == accum.size());
  double worst = 0, norm = 0;
  for (size_t i = 0; i < big.size(); ++i) {
    worst = std::max(worst, testing::max_rel_err(accum[i], big[i]));
    norm += big[i].abs().sum().item<double>();
  }
  INFO("max relative gradient difference " << worst);
  CHECK(norm > 0);
  CHECK(worst < 1e-10);
  for (const char* key : {"loss_clm", "loss_rf", "loss_z", "loss_caption"}) {
    INFO(key << ": one batch " << big_terms[key] << ", accumulated " << accum_terms[key]);
    CHECK(accum_terms[key] == Approx(big_terms[key]).epsilon(1e-12));
  }
  CHECK(big_terms["loss_rf"] > 0);
  CHECK(big_terms["loss_z"] > 0);
}

TEST_CASE("train --base without lora is a full fine-tune from the base, strict about every tensor", "[train][base]") {
  const auto base = testing::fresh_temp_dir("hardening_base");
  Config c = tiny_text_config(base + "/data");
  torch::manual_seed(42);
  OmniLite pretrained(c.model);
  io::save_module(*pretrained, base + "/base.safetensors");
  c.train.base_checkpoint = base + "/base.safetensors";
  torch::manual_seed(1);  // another initialisation: the base must replace it
  auto stage = make_stage(c, torch::kCPU);
  const auto want = pretrained->named_parameters();
  size_t trainable = 0;
  for (const auto& p : stage->module().named_parameters()) {
    INFO(p.key());
    CHECK(torch::equal(p.value(), want[p.key()]));
    trainable += p.value().requires_grad() ? 1 : 0;
  }
  CHECK(trainable > want.size() / 2);  // a full fine-tune trains (vqvae aside)
  // A base of another config: every mismatched tensor is named, in one message.
  Config wide = c;
  wide.model.text.num_layers = c.model.text.num_layers + 1;
  OmniLite other(wide.model);
  io::save_module(*other, base + "/wide.safetensors");
  c.train.base_checkpoint = base + "/wide.safetensors";
  std::string msg;
  try {
    make_stage(c, torch::kCPU);
  } catch (const std::exception& e) {
    msg = e.what();
  }
  INFO(msg);
  const std::string last = "text.layers." + std::to_string(c.model.text.num_layers);
  int64_t extra = 0;  // the tensors of the additional layer, counted independently
  for (const auto& p : other->named_parameters()) extra += p.key().rfind(last + ".", 0) == 0;
  CHECK(msg.find("does not fit the model (" + std::to_string(extra) + " tensors)") != std::string::npos);
  CHECK(msg.find("unexpected \"" + last + ".input_layernorm.weight\"") != std::string::npos);
  CHECK(msg.find("and " + std::to_string(extra - 12) + " more") != std::string::npos);
}

TEST_CASE("a resume without an out folder continues the resumed run's folder", "[train][cli]") {
  CHECK(io::run_folder_of("runs/a") == "runs/a");
  CHECK(io::run_folder_of("runs/a/") == "runs/a");
  CHECK(io::run_folder_of("runs/a/checkpoints/step_0000300") == "runs/a");
  CHECK(io::run_folder_of("runs/a/checkpoints/step_0000300/") == "runs/a");
  CHECK(io::run_folder_of("exports/hf") == "exports/hf");
  // The program: a run resumed without --out writes its further steps into the same run.
  const auto base = testing::fresh_temp_dir("hardening_resume_out");
  Config c = tiny_text_config(base + "/data");
  c.train.steps = 4;
  c.train.ckpt_every = 2;
  const std::string cfg_path = base + "/cfg.json";
  std::ofstream(cfg_path) << to_json(c).dump(2);
  const std::string run = base + "/run";
  auto [rc1, err1] = run_cli("train --config " + cfg_path + " --out " + run + " --max-steps 2");
  INFO(err1);
  REQUIRE(rc1 == 0);
  auto [rc2, err2] = run_cli("train --config " + cfg_path + " --resume " + run + "/checkpoints/step_0000002");
  INFO(err2);
  REQUIRE(rc2 == 0);
  CHECK(fs::exists(run + "/checkpoints/step_0000004/model.safetensors"));
  CHECK(testing::metrics_of(run).size() == 4);
}

TEST_CASE("a training process killed while it writes a checkpoint loses nothing: resume is exact", "[train][crash]") {
  const auto base = testing::fresh_temp_dir("hardening_kill");
  Config c = tiny_text_config(base + "/data");
  c.train.steps = 5;
  c.train.ckpt_every = 1;
  c.train.keep_last = 2;
  c.train.loader_threads = 0;
  const std::string cfg_path = base + "/cfg.json";
  std::ofstream(cfg_path) << to_json(c).dump(2);
  auto losses = [](const std::string& run) {
    std::vector<double> out;
    for (const auto& m : testing::metrics_of(run)) out.push_back(m["loss"].get<double>());
    return out;
  };
  const std::string whole = base + "/whole";
  REQUIRE(run_cli("train --config " + cfg_path + " --out " + whole).first == 0);
  const auto want = losses(whole);
  REQUIRE(want.size() == 5);
  // Killed at each point of writing checkpoint 3: inside the temporary folder (weights, optimizer, RNG, state
  // written), right after the rename, after the pruning of old checkpoints.
  for (const std::string phase : {"weights", "optimizer", "rng", "state", "rename", "prune"}) {
    INFO("killed at " << phase);
    const std::string run = base + "/run_" + phase;
    const auto [rc, err] = run_cli("train --config " + cfg_path + " --out " + run,
                                   "OMNILITE_KILL_DURING_SAVE=" + phase + ":3");
    CHECK(rc == 128 + SIGKILL);  // ended by the signal (as the shell reports it)
    const bool renamed = phase == "rename" || phase == "prune";
    const std::string newest = io::latest_checkpoint(run);
    CHECK(fs::path(newest).filename() == (renamed ? "step_0000003" : "step_0000002"));
    for (const char* f : {"model.safetensors", "optimizer.pt", "rng.safetensors", "state.json"})
      CHECK(fs::exists(newest + "/" + f));
    const auto [rc2, err2] = run_cli("train --config " + cfg_path + " --resume " + run);
    INFO(err2);
    REQUIRE(rc2 == 0);
    const auto got = losses(run);
    REQUIRE(got.size() == want.size());
    for (size_t i = 0; i < want.size(); ++i) CHECK(got[i] == want[i]);  // bit for bit
    for (const auto& e : fs::directory_iterator(run + "/checkpoints"))
      CHECK(e.path().filename().string().rfind(".tmp-", 0) != 0);  // the half-written folder was cleaned up
  }
}
