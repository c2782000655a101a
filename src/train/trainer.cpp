#include "omnilite/train/trainer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <stdexcept>

#include <nlohmann/json.hpp>

#include "omnilite/data/text_dataset.h"
#include "omnilite/data/tokenizer.h"
#include "omnilite/io/checkpoint.h"
#include "omnilite/log.h"
#include "omnilite/modules/omnilite.h"
#include "omnilite/runtime.h"
#include "omnilite/train/losses.h"
#include "omnilite/train/schedule.h"

namespace omnilite {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr int kCheckpointVersion = 1;

std::string step_name(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "step_%07lld", static_cast<long long>(step));
  return buf;
}

void write_file_synced(const std::string& path, const std::string& text) {
  {
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    if (!f) throw std::runtime_error("cannot write \"" + path + "\"");
    f << text;
  }
  io::fsync_directory(fs::path(path).parent_path().string());
}

// Packed text rows, served as micro-batches in a deterministic order: micro-batch m holds global samples
// m*B .. m*B+B-1, sample k being row perm_{k / R}[k % R] of the epoch permutation for seed and epoch k / R.
class TextBatches {
 public:
  TextBatches(torch::Tensor rows, int64_t batch, uint64_t seed) : rows_(std::move(rows)), batch_(batch), seed_(seed) {}
  // rows [B, T] of micro-batch m
  torch::Tensor get(int64_t m) {
    const int64_t R = rows_.size(0);
    std::vector<int64_t> idx;
    for (int64_t i = 0; i < batch_; ++i) {
      const int64_t k = m * batch_ + i, epoch = k / R;
      if (epoch != cached_epoch_) {
        perm_ = epoch_permutation(R, seed_, epoch);
        cached_epoch_ = epoch;
      }
      idx.push_back(perm_[static_cast<size_t>(k % R)]);
    }
    return rows_.index_select(0, torch::tensor(idx, torch::kInt64));
  }
  int64_t rows() const { return rows_.size(0); }

 private:
  torch::Tensor rows_;
  int64_t batch_;
  uint64_t seed_;
  int64_t cached_epoch_ = -1;
  std::vector<int64_t> perm_;
};

// AdamW with decay on matrices only: norms, biases (1-d), the token embedding, position tables and the resampler
// latents take none.
std::unique_ptr<torch::optim::AdamW> make_optimizer(OmniLiteImpl& model, const TrainOptions& tr) {
  std::vector<torch::Tensor> decay, no_decay;
  for (const auto& p : model.named_parameters()) {
    if (!p.value().requires_grad()) continue;
    const std::string& k = p.key();
    const bool embedding_like = k == "text.embed_tokens.weight" || k.find("pos_embed") != std::string::npos ||
                                k == "resampler.latents" || k.find("codebook") != std::string::npos;
    (p.value().dim() >= 2 && !embedding_like ? decay : no_decay).push_back(p.value());
  }
  auto opts = torch::optim::AdamWOptions(tr.lr).betas({tr.beta1, tr.beta2}).eps(tr.eps).weight_decay(tr.weight_decay);
  auto no_decay_opts = std::make_unique<torch::optim::AdamWOptions>(opts);
  no_decay_opts->weight_decay(0.0);
  std::vector<torch::optim::OptimizerParamGroup> groups;
  groups.emplace_back(decay, std::make_unique<torch::optim::AdamWOptions>(opts));
  groups.emplace_back(no_decay, std::move(no_decay_opts));
  return std::make_unique<torch::optim::AdamW>(groups, opts);
}

struct Checkpointer {
  std::string dir;      // <run>/checkpoints
  int64_t keep_last;

  std::string write(int64_t step, int64_t micro, OmniLiteImpl& model, torch::optim::AdamW& opt, const Config& cfg) {
    fs::create_directories(dir);
    const std::string final_dir = dir + "/" + step_name(step);
    const std::string tmp = dir + "/.tmp-" + step_name(step);
    fs::remove_all(tmp);
    fs::create_directories(tmp);
    io::save_module(model, tmp + "/model.safetensors", {{"step", std::to_string(step)}});
    torch::save(opt, tmp + "/optimizer.pt");
    io::save_safetensors(tmp + "/rng.safetensors", {{"cpu", at::detail::getDefaultCPUGenerator().get_state()}});
    json state = {{"version", kCheckpointVersion}, {"step", step}, {"micro_batches", micro}, {"config", to_json(cfg)}};
    write_file_synced(tmp + "/state.json", state.dump(2));
    io::fsync_directory(tmp);
    if (fs::exists(final_dir)) fs::remove_all(final_dir);
    fs::rename(tmp, final_dir);
    io::fsync_directory(dir);
    prune();
    return final_dir;
  }

  void prune() const {
    std::vector<std::string> names;
    for (const auto& e : fs::directory_iterator(dir))
      if (e.is_directory() && e.path().filename().string().rfind("step_", 0) == 0)
        names.push_back(e.path().string());
    std::sort(names.begin(), names.end());
    for (size_t i = 0; i + static_cast<size_t>(keep_last) < names.size(); ++i) fs::remove_all(names[i]);
  }
};

// Keeps the metrics lines of steps <= `step` (a resumed run rewrites what came after its checkpoint).
void truncate_metrics(const std::string& path, int64_t step) {
  std::ifstream in(path);
  if (!in) return;
  std::string kept, line;
  while (std::getline(in, line)) {
    auto j = json::parse(line, nullptr, false);
    if (j.is_object() && j.value("step", int64_t{0}) <= step) kept += line + "\n";
  }
  in.close();
  write_file_synced(path, kept);
}

}  // namespace

std::string latest_checkpoint(const std::string& dir) {
  if (fs::exists(dir + "/state.json")) return dir;
  const std::string ck = fs::exists(dir + "/checkpoints") ? dir + "/checkpoints" : dir;
  std::vector<std::string> names;
  if (fs::is_directory(ck))
    for (const auto& e : fs::directory_iterator(ck))
      if (e.is_directory() && e.path().filename().string().rfind("step_", 0) == 0) names.push_back(e.path().string());
  if (names.empty())
    throw std::runtime_error("no checkpoint under \"" + dir + "\"; hint: pass a run folder or a step_N folder");
  std::sort(names.begin(), names.end());
  return names.back();
}

TrainResult train(const Config& cfg, const TrainRunOptions& run) {
  const auto& tr = cfg.train;
  const int64_t total_steps = run.max_steps >= 0 ? run.max_steps : tr.steps;
  const torch::Device dev = apply_runtime(cfg.runtime);
  torch::manual_seed(tr.seed);

  // setup_data: tokenizer, documents, packed rows. An empty dataset is an error here, before step 1.
  Tokenizer tok(cfg.data.tokenizer);
  tok.check_compatible(cfg.model);
  auto docs = read_documents(cfg.data.text_train);
  if (docs.skipped > 0) log::warn(log::format("data: skipped %lld malformed text lines", static_cast<long long>(docs.skipped)));
  if (docs.documents.empty())
    throw std::runtime_error("data.text_train: no documents in the given files; hint: run scripts/prepare_data.sh");
  TextBatches batches(pack_sequences(tokenize_documents(docs.documents, tok, cfg.model.tokens.eos_id), tr.seq_len,
                                     "data.text_train"),
                      tr.batch_size, tr.seed);
  log::info(log::format("data: %zu documents -> %lld sequences of %lld tokens", docs.documents.size(),
                         static_cast<long long>(batches.rows()), static_cast<long long>(tr.seq_len)));

  // setup_model and setup_optimizer
  OmniLite model(cfg.model);
  model->to(dev);
  model->train();
  auto opt = make_optimizer(*model, tr);

  // setup_run_folder, resume
  fs::create_directories(run.out_dir);
  write_file_synced(run.out_dir + "/config.json", to_json(cfg).dump(2));
  Checkpointer ckpt{run.out_dir + "/checkpoints", tr.keep_last};
  int64_t step = 0, micro = 0;
  TrainResult result;
  if (!run.resume_dir.empty()) {
    const std::string dir = latest_checkpoint(run.resume_dir);
    for (const char* f : {"model.safetensors", "optimizer.pt", "rng.safetensors", "state.json"})
      if (!fs::exists(dir + "/" + f))
        throw std::runtime_error("checkpoint \"" + dir + "\" is incomplete: " + f + " is missing");
    std::ifstream sf(dir + "/state.json");
    auto state = json::parse(sf, nullptr, false);
    if (!state.is_object() || state.value("version", 0) != kCheckpointVersion)
      throw std::runtime_error("checkpoint \"" + dir + "\": state.json is unreadable or of another version");
    io::load_module(*model, dir + "/model.safetensors");
    torch::load(*opt, dir + "/optimizer.pt");
    io::SafetensorsReader rng(dir + "/rng.safetensors");
    rng.verify_checksum();
    auto gen = at::detail::getDefaultCPUGenerator();  // a copy of the handle to the same generator
    gen.set_state(rng.load("cpu"));
    step = state["step"].get<int64_t>();
    micro = state["micro_batches"].get<int64_t>();
    result.last_checkpoint = dir;
    log::info(log::format("resumed from %s at step %lld", dir.c_str(), static_cast<long long>(step)));
  }
  const std::string metrics_path = run.out_dir + "/metrics.jsonl";
  truncate_metrics(metrics_path, step);
  std::ofstream metrics(metrics_path, std::ios::app);

  const auto& tk = cfg.model.tokens;
  std::vector<torch::Tensor> params;
  for (const auto& p : model->parameters())
    if (p.requires_grad()) params.push_back(p);
  const auto start = std::chrono::steady_clock::now();
  const int64_t first_step = step;
  int64_t bad_in_row = 0;
  bool first = true;
  while (step < total_steps) {
    const auto t0 = std::chrono::steady_clock::now();
    opt->zero_grad();
    double clm_sum = 0, aux_sum = 0, z_sum = 0, total_sum = 0, wait_s = 0;
    for (int64_t a = 0; a < tr.grad_accum; ++a) {
      const auto w0 = std::chrono::steady_clock::now();
      auto tokens = batches.get(micro++).to(dev);
      wait_s += std::chrono::duration<double>(std::chrono::steady_clock::now() - w0).count();
      auto out = model->forward({tokens});
      auto target = tokens.ne(tk.pad_id).logical_and(tokens.ne(tk.image_id)).logical_and(tokens.ne(tk.gen_image_id));
      auto clm = clm_loss(out.logits, tokens, target);
      auto aux = load_balancing_loss(out.router_logits, cfg.model.moe.top_k);
      auto z = router_z_loss(out.router_logits);
      auto loss = clm + tr.aux_coef * aux + tr.z_coef * z;
      (loss / static_cast<double>(tr.grad_accum)).backward();
      clm_sum += clm.item<double>();
      aux_sum += aux.item<double>();
      z_sum += z.item<double>();
      total_sum += loss.item<double>();
    }
    const double n = static_cast<double>(tr.grad_accum);
    const double loss_value = total_sum / n;
    // The schedule's horizon is train.steps, so stopping early (--max-steps) and resuming changes nothing.
    const double lr = lr_at(step, tr.steps, tr.warmup_steps, tr.lr, tr.min_lr_ratio);
    double grad_norm = 0.0;
    const bool finite = std::isfinite(loss_value);
    if (finite) {
      grad_norm = tr.grad_clip > 0 ? torch::nn::utils::clip_grad_norm_(params, tr.grad_clip)
                                   : torch::nn::utils::clip_grad_norm_(params, 1e30);
      for (auto& g : opt->param_groups()) static_cast<torch::optim::AdamWOptions&>(g.options()).lr(lr);
      opt->step();
      bad_in_row = 0;
    } else {
      ++bad_in_row;
      log::warn(log::format("step %lld: loss is %g; step skipped (%lld in a row, limit train.max_bad_steps = %lld)",
                            static_cast<long long>(step + 1), loss_value, static_cast<long long>(bad_in_row),
                            static_cast<long long>(tr.max_bad_steps)));
      if (bad_in_row >= tr.max_bad_steps)
        throw std::runtime_error("training stopped: " + std::to_string(bad_in_row) +
                                 " non-finite losses in a row; the last good checkpoint is " +
                                 (result.last_checkpoint.empty() ? std::string("none") : result.last_checkpoint) +
                                 "; hint: lower train.lr");
    }
    ++step;
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    const double tps = static_cast<double>(tr.grad_accum * tr.batch_size * tr.seq_len) / dt;
    if (first) result.first_loss = loss_value;
    first = false;
    result.last_loss = loss_value;
    json m = {{"step", step},           {"loss", loss_value},   {"loss_clm", clm_sum / n}, {"loss_rf", 0.0},
              {"loss_aux", aux_sum / n}, {"loss_z", z_sum / n}, {"lr", lr},                {"grad_norm", grad_norm},
              {"tokens_per_s", tps},    {"data_wait_frac", wait_s / dt}, {"skipped", !finite}};
    metrics << m.dump() << "\n";
    metrics.flush();
    if (step % tr.log_every == 0 || step == total_steps || step == first_step + 1) {
      const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      const double eta = elapsed / static_cast<double>(step - first_step) * static_cast<double>(total_steps - step);
      log::info(log::format("step %lld/%lld | loss %.4f | clm %.4f | aux %.3f | z %.3f | lr %.2e | grad %.2f | "
                            "%.0f tok/s | data wait %.1f%% | ETA %.0fs",
                            static_cast<long long>(step), static_cast<long long>(total_steps), loss_value, clm_sum / n,
                            aux_sum / n, z_sum / n, lr, grad_norm, tps, 100.0 * wait_s / dt, eta));
    }
    if (step % tr.ckpt_every == 0 || step == total_steps) {
      result.last_checkpoint = ckpt.write(step, micro, *model, *opt, cfg);
      log::info("checkpoint " + result.last_checkpoint);
    }
  }
  result.steps_done = step;
  return result;
}

}  // namespace omnilite
