#include "omnilite/train/trainer.h"

#include <algorithm>
#include <csignal>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <set>
#include <stdexcept>
#include <thread>
#include <type_traits>

#include <ATen/Parallel.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <nlohmann/json.hpp>

#if __has_include(<torch/csrc/autograd/profiler_legacy.h>)
#include <torch/csrc/autograd/profiler_legacy.h>
#define OMNILITE_HAS_LEGACY_PROFILER 1
#else
#define OMNILITE_HAS_LEGACY_PROFILER 0
#endif

#include "omnilite/io/adapter.h"
#include "omnilite/io/checkpoint.h"
#include "omnilite/io/event_writer.h"
#include "omnilite/io/hf_export.h"
#include "omnilite/io/weights_reader.h"
#include "omnilite/hash.h"
#include "omnilite/log.h"
#include "omnilite/modules/lora_linear.h"
#include "omnilite/modules/moe.h"
#include "omnilite/pattern.h"
#include "omnilite/runtime.h"
#include "omnilite/train/distributed.h"
#include "omnilite/train/schedule.h"
#include "omnilite/train/stage.h"
#include "omnilite/train/zero.h"
#include "stages.h"

namespace omnilite {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {


std::string step_name(int64_t step) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "step_%07lld", static_cast<long long>(step));
  return buf;
}


// AdamW's decay rule: matrices decay; norms, biases (1-d), the token embedding, position tables, the resampler
// latents and codebooks take none.
bool takes_weight_decay(const std::string& k, int64_t dim) {
  const bool embedding_like = k == "text.embed_tokens.weight" || k.find("pos_embed") != std::string::npos ||
                              k.find("cls_token") != std::string::npos || k == "resampler.latents" ||
                              k.find("codebook") != std::string::npos;
  return dim >= 2 && !embedding_like;
}

torch::optim::AdamWOptions adamw_options(const TrainOptions& tr) {
  return torch::optim::AdamWOptions(tr.lr).betas({tr.beta1, tr.beta2}).eps(tr.eps).weight_decay(tr.weight_decay);
}

// AdamW over the trainable parameters in two groups (takes_weight_decay). `keep`: the parameters to optimise (all
// trainable ones when empty; ZeRO-1 gives a rank's share).
std::unique_ptr<torch::optim::AdamW> make_optimizer(torch::nn::Module& model, const TrainOptions& tr,
                                                    const std::function<bool(const torch::Tensor&)>& keep = nullptr) {
  std::vector<torch::Tensor> decay, no_decay;
  for (const auto& p : model.named_parameters()) {
    if (!p.value().requires_grad() || (keep && !keep(p.value()))) continue;
    (takes_weight_decay(p.key(), p.value().dim()) ? decay : no_decay).push_back(p.value());
  }
  return make_adamw(std::move(decay), std::move(no_decay), adamw_options(tr));
}

// rng.safetensors: "cpu", and "cuda:N" for the CUDA device the run trains on (exact resume there too).
std::vector<std::pair<std::string, torch::Tensor>> rng_tensors(torch::Device dev) {
  const RngState s = capture_rng({dev});
  std::vector<std::pair<std::string, torch::Tensor>> out{{"cpu", s.cpu}};
  for (const auto& [index, t] : s.cuda) out.emplace_back("cuda:" + std::to_string(index), t);
  return out;
}

void restore_rng_file(const std::string& path, torch::Device dev) {
  io::SafetensorsReader r(path);
  r.verify_checksum();
  RngState s;
  s.cpu = r.load("cpu");
  if (dev.is_cuda()) {
    const int64_t index = dev.has_index() ? dev.index() : 0;
    const std::string key = "cuda:" + std::to_string(index);
    if (r.contains(key)) s.cuda.emplace_back(index, r.load(key));
    else log::warn("resume: \"" + path + "\" holds no " + key + " generator state (written on another device); "
                   "random draws on the GPU differ from the uninterrupted run's");
  }
  restore_rng(s);
}

// A run that trained on a base (QLoRA adapters, a full fine-tune) continues only on that base: the same bytes and
// header hash (the path may move). Checkpoints of runs without a base, or written before bases were recorded, pass.
void check_same_base(const std::string& dir, const json& state, const json& now) {
  const json before = state.value("base", json());
  auto shown = [](const json& b) {
    return "\"" + b.value("path", std::string()) + "\" (" + std::to_string(b.value("bytes", uint64_t{0})) +
           " bytes, header hash " + b.value("header_fnv1a", std::string()) + ")";
  };
  if (before.is_null() && now.is_null()) return;
  const bool recorded_base = state.contains("config") && state["config"].contains("train") &&
                             !state["config"]["train"].value("base_checkpoint", std::string()).empty();
  if (before.is_null() && recorded_base) {  // written before bases were recorded: nothing to compare
    log::warn("resume: checkpoint \"" + dir + "\" does not record its base's identity; continuing on " + shown(now));
    return;
  }
  if (before.is_null() || now.is_null())
    throw std::runtime_error("resume: checkpoint \"" + dir + "\" was trained " +
                             (before.is_null() ? std::string("without a base") : "on base " + shown(before)) +
                             ", this run has " + (now.is_null() ? std::string("none") : shown(now)) +
                             "; hint: resume with the base the run started from (--base)");
  if (before.value("bytes", uint64_t{0}) != now.value("bytes", uint64_t{0}) ||
      before.value("header_fnv1a", std::string()) != now.value("header_fnv1a", std::string()))
    throw std::runtime_error("resume: checkpoint \"" + dir + "\" was trained on base " + shown(before) +
                             " but this run's base is " + shown(now) +
                             "; hint: pass --base with the run's own base, or start a new run with --out");
}

// Fault injection for the kill-during-save test (tests/test_hardening.cpp): OMNILITE_KILL_DURING_SAVE=PHASE:STEP
// ends the process with SIGKILL at PHASE of writing the checkpoint of STEP, as a power cut or an OOM kill would.
void kill_point(const char* phase, int64_t step) {
  static const char* spec = std::getenv("OMNILITE_KILL_DURING_SAVE");
  if (spec && std::string(spec) == std::string(phase) + ":" + std::to_string(step)) ::raise(SIGKILL);
}

struct Checkpointer {
  std::string dir;      // <run>/checkpoints
  int64_t keep_last;    // checkpoints kept (older ones are pruned)
  torch::Device dev;    // the training device, whose generator is saved beside the CPU's
  json base;            // the identity of train.base_checkpoint (io::weights_identity), null without one

  // `metrics`: the step's training metrics line, kept in state.json: the checkpoint comes before validation and
  // the metrics line, so a resume from it restores the line a crash in between did not write.
  std::string write(int64_t step, int64_t micro, int64_t world, TrainStage& stage, torch::optim::AdamW& opt,
                    const Config& cfg, const json& metrics) {
    const std::string tmp = open_tmp(step);
    stage.save_weights(tmp, step);
    kill_point("weights", step);
    torch::save(opt, tmp + "/optimizer.pt");
    kill_point("optimizer", step);
    return commit(tmp, step, micro, world, stage, cfg, metrics);
  }

  // ZeRO-2/3, on every rank: each writes its shard into the folder rank 0 opened; once all are on disk, rank 0 adds
  // the manifest, the tensors that were not sharded (`rest`: buffers, frozen parameters), the generators and
  // state.json, and renames the folder into place. A rank that dies before then leaves only a .tmp- folder.
  std::string write_sharded(int64_t step, int64_t micro, Dist& dist, const ZeroShards& shards,
                            const torch::optim::AdamW& opt, TrainStage& stage,
                            const std::vector<std::pair<std::string, torch::Tensor>>& rest, const Config& cfg,
                            const json& metrics) {
    const std::string tmp = tmp_dir(step);
    if (dist.is_main()) open_tmp(step);
    dist.barrier();
    shards.write_checkpoint_shard(tmp + "/" + ZeroShards::shard_file(dist.rank(), dist.world()), opt);
    kill_point("shard", step);
    dist.barrier();
    if (!dist.is_main()) return final_dir(step);
    std::vector<std::string> files;
    for (int64_t r = 0; r < dist.world(); ++r) files.push_back(ZeroShards::shard_file(r, dist.world()));
    io::save_safetensors(tmp + "/model.safetensors", rest, {{"step", std::to_string(step)}});
    write_file_atomically(tmp + "/zero_shards.json", shards.manifest(files).dump(1));
    kill_point("manifest", step);
    return commit(tmp, step, micro, dist.world(), stage, cfg, metrics);
  }

  // <dir>/step_N, and the folder it is written in first.
  std::string final_dir(int64_t step) const { return dir + "/" + step_name(step); }
  std::string tmp_dir(int64_t step) const { return dir + "/.tmp-" + step_name(step); }

  // A fresh tmp_dir(step).
  std::string open_tmp(int64_t step) const {
    fs::create_directories(dir);
    const std::string tmp = tmp_dir(step);
    fs::remove_all(tmp);
    fs::create_directories(tmp);
    return tmp;
  }

  // The generators and state.json into `tmp`, then `tmp` renamed to step_N and older checkpoints pruned.
  std::string commit(const std::string& tmp, int64_t step, int64_t micro, int64_t world, TrainStage& stage,
                     const Config& cfg, const json& metrics) {
    const std::string done = final_dir(step);
    io::save_safetensors(tmp + "/rng.safetensors", rng_tensors(dev));
    kill_point("rng", step);
    // micro_batches counts global micro-batches of world_size ranks (the data position, with the config's batch sizes)
    json state = {{"version", io::kCheckpointVersion}, {"stage", cfg.train.stage}, {"step", step},
                  {"micro_batches", micro}, {"world_size", world}, {"zero", cfg.train.zero_stage()},
                  {"config", to_json(cfg)}};
    if (!base.is_null()) state["base"] = base;
    if (const auto sources = stage.data_fingerprints(); !sources.empty()) state["data"] = sources;
    state["metrics"] = metrics;
    write_file_atomically(tmp + "/state.json", state.dump(2));
    fsync_directory(tmp);
    kill_point("state", step);
    if (fs::exists(done)) fs::remove_all(done);
    fs::rename(tmp, done);
    kill_point("rename", step);
    fsync_directory(dir);
    prune();
    kill_point("prune", step);
    return done;
  }

  void prune() const {
    std::vector<std::string> names;
    for (const auto& e : fs::directory_iterator(dir))
      if (e.is_directory() && e.path().filename().string().rfind("step_", 0) == 0)
        names.push_back(e.path().string());
    std::sort(names.begin(), names.end());
    for (size_t i = 0; i + static_cast<size_t>(keep_last) < names.size(); ++i) fs::remove_all(names[i]);
    for (const auto& e : fs::directory_iterator(dir))  // half-written folders of an earlier, killed process
      if (e.is_directory() && e.path().filename().string().rfind(".tmp-", 0) == 0) fs::remove_all(e.path());
  }
};

// Keeps the metrics lines of steps <= `step` (a resumed run rewrites what came after its checkpoint).
// When the file ends before `step` and the checkpoint recorded that step's line (`last`), the line is restored.
void truncate_metrics(const std::string& path, int64_t step, const json& last) {
  std::ifstream in(path);
  std::string kept, line;
  int64_t newest = 0;
  while (in && std::getline(in, line)) {
    auto j = json::parse(line, nullptr, false);
    if (j.is_object() && j.value("step", int64_t{0}) <= step) {
      kept += line + "\n";
      newest = std::max(newest, j.value("step", int64_t{0}));
    }
  }
  in.close();
  if (newest < step && last.is_object() && last.value("step", int64_t{-1}) == step) kept += last.dump() + "\n";
  write_file_atomically(path, kept);
}

// Records every LibTorch op of its lifetime into a Chrome trace file (LibTorch's legacy profiler, present in 1.13
// and 2.x; builds without its header refuse --profile).
class ProfileGuard {
 public:
  explicit ProfileGuard(const std::string& path) {
#if OMNILITE_HAS_LEGACY_PROFILER
    rec_ = std::make_unique<torch::autograd::profiler::RecordProfile>(path);
#else
    throw std::runtime_error("--profile \"" + path + "\": this LibTorch build has no legacy profiler header");
#endif
  }

 private:
#if OMNILITE_HAS_LEGACY_PROFILER
  std::unique_ptr<torch::autograd::profiler::RecordProfile> rec_;
#endif
};

// Items per rank and micro-batch of the first data stream the stage reads (omni: text rows, else caption, else
// generation samples, else conversation rows; image stages: images).
int64_t first_stream_batch(const TrainOptions& tr) {
  if (tr.stage != "omni" || tr.batch_size > 0) return tr.batch_size;
  if (tr.caption_batch_size > 0) return tr.caption_batch_size;
  return tr.gen_batch_size > 0 ? tr.gen_batch_size : tr.sft_batch_size;
}

// The global micro-batch to continue from: the checkpoint's data position (micro-batches of `old_world` ranks with
// the checkpoint config's batch sizes) in micro-batches of this run. Exact when the global batch is unchanged (e.g.
// 2 ranks x 4 -> 1 rank x 8); otherwise the position in items of the first stream, rounded up.
int64_t resume_micro(int64_t micro, int64_t old_world, const TrainOptions& old, int64_t world, const TrainOptions& now) {
  const int64_t old_global = old_world * first_stream_batch(old), new_global = world * first_stream_batch(now);
  if (old_global == new_global || old_global <= 0 || new_global <= 0) return micro;
  const int64_t items = micro * old_global;
  const int64_t next = (items + new_global - 1) / new_global;
  log::warn(log::format("resume: the global batch changes from %lld x %lld to %lld x %lld items; the data continues "
                        "at item %lld of the stream (%lld skipped)", static_cast<long long>(old_world),
                        static_cast<long long>(first_stream_batch(old)), static_cast<long long>(world),
                        static_cast<long long>(first_stream_batch(now)), static_cast<long long>(next * new_global),
                        static_cast<long long>(next * new_global - items)));
  return next;
}

// The rank's process group: joins the job named by the environment (torchrun, Slurm, scripts/launch.sh) or, without
// one, a world of one. Every rank must run the same config and run options (their hash is compared at start).
std::shared_ptr<Dist> join_job(const DistOptions& env, const Config& cfg, const TrainRunOptions& run, torch::Device dev) {
  if (env.world_size == 1) return std::make_shared<Dist>();
  DistOptions o = env;
  o.timeout_s = cfg.train.dist_timeout_s;
  const std::string fingerprint = fnv1a_hex(to_json(cfg).dump() + "\n" + run.out_dir + "\n" + run.resume_dir + "\n" +
                                            std::to_string(run.max_steps));
  return Dist::join(o, fingerprint, dev);
}

}  // namespace

namespace {

// Σ x² of n values in float64: pieces of 2^16 on the intra-op threads, added in piece order.
template <class T>
double sum_of_squares_cpu(const T* x, int64_t n) {
  constexpr int64_t kPiece = int64_t{1} << 16;
  const int64_t pieces = (n + kPiece - 1) / kPiece;
  std::vector<double> part(static_cast<size_t>(pieces), 0.0);
  at::parallel_for(0, pieces, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t i0 = p * kPiece, i1 = std::min(n, i0 + kPiece);
      double acc[4] = {0, 0, 0, 0};  // 4 partial sums (vectorisable without reassociation)
      int64_t i = i0;
      for (; i + 4 <= i1; i += 4)
        for (int u = 0; u < 4; ++u) acc[u] += static_cast<double>(x[i + u]) * static_cast<double>(x[i + u]);
      for (; i < i1; ++i) acc[0] += static_cast<double>(x[i]) * static_cast<double>(x[i]);
      part[static_cast<size_t>(p)] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    }
  });
  double total = 0;
  for (double v : part) total += v;
  return total;
}

#if defined(__x86_64__)
// Values [i0, i1 - (i1 - i0) % 8) of adamw_update's float32 loop, 8 at a time with AVX2: the same operations in the
// same order (mul, add, sqrt and div round as the scalar ones do; no FMA, so nothing is contracted), so the results
// are bit for bit the scalar loop's. Returns where the scalar tail starts.
__attribute__((target("avx2"))) int64_t adamw_update_avx2(float* p, const float* g, float* m, float* v, int64_t i0,
                                                           int64_t i1, float decay, bool decayed, float tb1, float tb2,
                                                           float a1, float a2, float sqrt_bc2, float teps,
                                                           float neg_step) {
  const __m256 vdecay = _mm256_set1_ps(decay), vb1 = _mm256_set1_ps(tb1), vb2 = _mm256_set1_ps(tb2);
  const __m256 va1 = _mm256_set1_ps(a1), va2 = _mm256_set1_ps(a2), vbc2 = _mm256_set1_ps(sqrt_bc2);
  const __m256 veps = _mm256_set1_ps(teps), vstep = _mm256_set1_ps(neg_step);
  int64_t i = i0;
  for (; i + 8 <= i1; i += 8) {
    __m256 pi = _mm256_loadu_ps(p + i);
    if (decayed) pi = _mm256_mul_ps(pi, vdecay);
    const __m256 gi = _mm256_loadu_ps(g + i);
    const __m256 mi = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(m + i), vb1), _mm256_mul_ps(va1, gi));
    const __m256 vi = _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(v + i), vb2),
                                    _mm256_mul_ps(_mm256_mul_ps(va2, gi), gi));
    const __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(vi), vbc2), veps);
    _mm256_storeu_ps(m + i, mi);
    _mm256_storeu_ps(v + i, vi);
    _mm256_storeu_ps(p + i, _mm256_add_ps(pi, _mm256_mul_ps(vstep, _mm256_div_ps(mi, denom))));
  }
  return i;
}
#endif

// One AdamW update of n values in place, the arithmetic of torch::optim::AdamW::step in T: decay, moments, the
// bias-corrected denominator, the step. float32 runs 8 values at a time where the CPU has AVX2 (the same results).
template <class T>
void adamw_update(T* p, const T* g, T* m, T* v, int64_t n, double lr, double b1, double b2, double eps, double wd,
                  int64_t step) {
  const T decay = static_cast<T>(1 - lr * wd), tb1 = static_cast<T>(b1), tb2 = static_cast<T>(b2);
  const T a1 = static_cast<T>(1 - b1), a2 = static_cast<T>(1 - b2), teps = static_cast<T>(eps);
  const T sqrt_bc2 = static_cast<T>(std::sqrt(1 - std::pow(b2, static_cast<double>(step))));
  const T neg_step = static_cast<T>(-(lr / (1 - std::pow(b1, static_cast<double>(step)))));
  const bool decayed = wd != 0;
#if defined(__x86_64__)
  const bool avx2 = std::is_same_v<T, float> && __builtin_cpu_supports("avx2");
#endif
  at::parallel_for(0, n, int64_t{1} << 14, [&](int64_t i0, int64_t i1) {
#if defined(__x86_64__)
    if constexpr (std::is_same_v<T, float>)
      if (avx2) i0 = adamw_update_avx2(p, g, m, v, i0, i1, decay, decayed, tb1, tb2, a1, a2, sqrt_bc2, teps, neg_step);
#endif
    for (int64_t i = i0; i < i1; ++i) {
      T pi = decayed ? p[i] * decay : p[i];
      const T gi = g[i];
      const T mi = m[i] * tb1 + a1 * gi;
      const T vi = v[i] * tb2 + a2 * gi * gi;
      const T denom = std::sqrt(vi) / sqrt_bc2 + teps;
      m[i] = mi;
      v[i] = vi;
      p[i] = pi + neg_step * (mi / denom);
    }
  });
}

bool fusable(const torch::Tensor& t, torch::ScalarType dt) {
  return t.device().is_cpu() && t.scalar_type() == dt && t.is_contiguous();
}

}  // namespace

void adamw_step(torch::optim::AdamW& opt) {
  torch::NoGradGuard ng;
  auto& state = opt.state();
  bool all = true;  // every parameter with a gradient can take the fused update
  for (auto& group : opt.param_groups()) {
    const auto& o = static_cast<const torch::optim::AdamWOptions&>(group.options());
    for (const auto& p : group.params()) {
      if (!p.grad().defined()) continue;
      const auto dt = p.scalar_type();
      bool ok = !o.amsgrad() && (dt == torch::kFloat32 || dt == torch::kFloat64) && !p.grad().is_sparse() &&
                fusable(p, dt) && fusable(p.grad(), dt);
      if (auto it = state.find(optimizer_state_key(state, p)); ok && it != state.end()) {
        const auto& st = static_cast<const torch::optim::AdamWParamState&>(*it->second);
        ok = fusable(st.exp_avg(), dt) && fusable(st.exp_avg_sq(), dt);
      }
      all = all && ok;
    }
  }
  if (!all) {
    opt.step();
    return;
  }
  for (auto& group : opt.param_groups()) {
    const auto& o = static_cast<const torch::optim::AdamWOptions&>(group.options());
    const auto [b1, b2] = o.betas();
    for (auto& p : group.params()) {
      if (!p.grad().defined()) continue;
      const auto key = optimizer_state_key(state, p);
      if (state.find(key) == state.end()) {  // as AdamW::step initialises a parameter's state
        auto st = std::make_unique<torch::optim::AdamWParamState>();
        st->step(0);
        st->exp_avg(torch::zeros_like(p, torch::MemoryFormat::Preserve));
        st->exp_avg_sq(torch::zeros_like(p, torch::MemoryFormat::Preserve));
        state[key] = std::move(st);
      }
      auto& st = static_cast<torch::optim::AdamWParamState&>(*state[key]);
      st.step(st.step() + 1);
      AT_DISPATCH_FLOATING_TYPES(p.scalar_type(), "adamw_step", [&] {
        adamw_update(p.data_ptr<scalar_t>(), p.grad().data_ptr<scalar_t>(), st.exp_avg().data_ptr<scalar_t>(),
                     st.exp_avg_sq().data_ptr<scalar_t>(), p.numel(), o.lr(), b1, b2, o.eps(), o.weight_decay(),
                     st.step());
      });
    }
  }
}

torch::Tensor sum_of_squares_fp64(const torch::Tensor& t) {
  torch::NoGradGuard ng;
  const auto dt = t.scalar_type();
  if (t.device().is_cpu() && t.is_contiguous() && (dt == torch::kFloat32 || dt == torch::kFloat64)) {
    double sum = 0;
    AT_DISPATCH_FLOATING_TYPES(dt, "sum_of_squares_fp64",
                               [&] { sum = sum_of_squares_cpu(t.data_ptr<scalar_t>(), t.numel()); });
    return torch::tensor(sum, torch::kFloat64);
  }
  const auto flat = t.reshape({-1});
  auto acc = torch::zeros({}, t.options().dtype(torch::kFloat64));
  constexpr int64_t kPiece = int64_t{1} << 20;
  for (int64_t i = 0; i < flat.numel(); i += kPiece)
    acc += flat.narrow(0, i, std::min(kPiece, flat.numel() - i)).to(torch::kFloat64).square().sum();
  return acc;
}

namespace {
// The step gate over any gradient layout: `norm` measures the whole gradient (called only for a finite loss; every
// rank knows the reduced loss, so all skip a collective in it alike), `scale` multiplies it by the clip coefficient.
GradCheck check_and_clip(double loss, double max_norm, const std::function<double()>& norm,
                         const std::function<void(double)>& scale) {
  GradCheck c;
  if (!std::isfinite(loss)) return c;  // nothing to measure: the step is skipped anyway
  torch::NoGradGuard ng;
  c.grad_norm = norm();
  c.finite = std::isfinite(c.grad_norm);
  const double coef = max_norm / (c.grad_norm + 1e-6);
  if (c.finite && max_norm > 0 && coef < 1) scale(coef);
  return c;
}
}  // namespace

GradCheck clip_and_check(const std::vector<torch::Tensor>& params, double loss, double max_norm) {
  auto norm = [&] {
    torch::Tensor sq;  // on the gradients' device: one synchronisation, at the end
    for (const auto& p : params)
      if (p.grad().defined()) {
        auto t = sum_of_squares_fp64(p.grad());
        sq = sq.defined() ? sq + t : t;
      }
    return sq.defined() ? std::sqrt(sq.item<double>()) : 0.0;  // 0 without any gradient, as clip_grad_norm_ says
  };
  auto scale = [&](double coef) {
    for (const auto& p : params)
      if (p.grad().defined()) p.grad().mul_(coef);
  };
  return check_and_clip(loss, max_norm, norm, scale);
}

GradCheck clip_and_check(ZeroShards& z, double loss, double max_norm) {
  return check_and_clip(loss, max_norm, [&] { return z.grad_norm(); }, [&](double coef) { z.clip(coef); });
}

void TrainStage::save_weights(const std::string& dir, int64_t step) {
  io::save_module(module(), dir + "/model.safetensors", {{"step", std::to_string(step)}});
}

// The folder, not its model.safetensors: a ZeRO-2/3 checkpoint's trainable tensors lie in its shards.
void TrainStage::load_weights(const std::string& dir) { io::load_module(module(), dir); }

std::unique_ptr<TrainStage> make_stage(const Config& cfg, torch::Device dev, std::shared_ptr<Dist> dist) {
  if (!dist) dist = std::make_shared<Dist>();
  if (cfg.train.stage == "vqvae") return make_vqvae_stage(cfg, dev, dist);
  if (cfg.train.stage == "classifier") return make_classifier_stage(cfg, dev, dist);
  return make_omni_stage(cfg, dev, dist);
}

namespace {

// What the setup steps build, in order, for the step loop.
struct Session {
  torch::Device dev = torch::kCPU;         // the rank's device (runtime)
  std::shared_ptr<Dist> dist;              // the job's process group (distributed)
  std::unique_ptr<TrainStage> stage;       // data, model and losses of train.stage
  std::vector<torch::Tensor> params;       // the trainable parameters, in registration order
  std::vector<std::pair<std::string, torch::Tensor>> named;  // the same, by module path
  // AdamW over `params`; under ZeRO-1 it steps this rank's share, and `full` (no state of its own between
  // checkpoints) carries the unsharded checkpoint format. Under ZeRO-2/3 `opt` is the shards' AdamW, and `full`
  // takes a resumed unsharded optimizer.pt until the parameters are sharded.
  std::unique_ptr<torch::optim::AdamW> opt, full;
  std::unique_ptr<Zero1> zero;             // ZeRO-1 sharding (train.zero = 1 with more than one rank)
  std::shared_ptr<ZeroShards> shards;      // ZeRO-2/3 sharding (train.zero = 2, 3 with more than one rank)
  std::unique_ptr<io::WeightsReader> resumed_shards;  // a ZeRO checkpoint resumed from, until its state is taken
  std::unique_ptr<GradReducer> reducer;    // gradient all-reduce (more than one rank, zero < 2)
  int64_t step = 0, micro = 0;             // optimizer steps done, global micro-batches read

  torch::optim::AdamW& checkpoint_opt() { return full ? *full : *opt; }
  bool distributed() const { return reducer || shards; }
};

// ZeRO-3 keeps the root unit (embeddings, heads, what is not gathered block by block) gathered while the scope lasts
// (validation, codebook statistics); nothing otherwise.
struct RootGathered {
  explicit RootGathered(ZeroShards* z) : z_(z) {
    if (z_) z_->gather_root();
  }
  ~RootGathered() {
    if (z_) z_->release_root();
  }
  ZeroShards* z_;
};

// runtime: "all cores" (0) means this rank's part of the node's cores; ranks take cuda:LOCAL_RANK.
RuntimeOptions rank_runtime(RuntimeOptions rt, const DistOptions& env) {
  if (env.world_size == 1) return rt;
  const int64_t cores =
      std::max<int64_t>(1, static_cast<int64_t>(std::thread::hardware_concurrency()) / env.local_world_size);
  if (rt.threads == 0) rt.threads = cores;
  if (rt.blas_threads == 0) rt.blas_threads = cores;
  if (rt.device == "cuda") rt.device = "cuda:" + std::to_string(env.local_rank);
  return rt;
}

// model: the stage (an empty dataset is an error here, before step 1), train.freeze, the trainable parameters.
void setup_model(Session& s, const Config& cfg) {
  s.stage = make_stage(cfg, s.dev, s.dist);
  const int64_t frozen = freeze_parameters(s.stage->module(), [&](const std::string& name) {
    return matches_any(name, cfg.train.freeze);
  });
  if (!cfg.train.freeze.empty())
    log::info(log::format("train.freeze: %lld parameters frozen", static_cast<long long>(frozen)));
  for (const auto& p : s.stage->module().named_parameters())
    if (p.value().requires_grad()) {
      s.params.push_back(p.value());
      s.named.emplace_back(p.key(), p.value());
    }
}

// optimizer: AdamW, sharded by ZeRO (train.zero) over more than one rank. Stages 2 and 3 shard the parameters
// once the weights are final (setup_sharding, after a resume).
void setup_optimizer(Session& s, const TrainOptions& tr) {
  s.opt = make_optimizer(s.stage->module(), tr);
  const int64_t zero = tr.zero_stage();
  if (zero == 0) return;
  if (s.dist->world() == 1) return log::info(log::format("train.zero = %lld: one process, nothing to shard",
                                                         static_cast<long long>(zero)));
  if (zero >= 2) {
    s.shards = std::make_shared<ZeroShards>(s.dist, zero, s.named, s.stage->block_lists());
    s.full = std::move(s.opt);
    return;
  }
  s.zero = std::make_unique<Zero1>(s.dist, s.params);
  s.full = std::move(s.opt);
  s.opt = make_optimizer(s.stage->module(), tr, [&](const torch::Tensor& p) { return s.zero->owns(p); });
  const double mib = 2.0 * static_cast<double>(s.params.front().element_size()) / (1024.0 * 1024.0);
  const auto owned = s.zero->owned_numel(), total = s.zero->total_numel();
  log::info(log::format("zero1: rank 0 holds the AdamW state of %lld of %lld trainable parameters: %.1f MiB instead "
                        "of %.1f MiB (%.1f MiB saved per rank)", static_cast<long long>(owned),
                        static_cast<long long>(total), owned * mib, total * mib, (total - owned) * mib));
}

// checkpointing and resume: weights, optimizer, generators and data position of the newest checkpoint of
// `resume_dir`, refused with the reason when it belongs to another stage or base. Returns its metrics line.
json resume_from(Session& s, const Config& cfg, const std::string& resume_dir, const json& base,
                 TrainResult& result) {
  const auto& tr = cfg.train;
  const std::string dir = io::latest_checkpoint(resume_dir);
  const bool sharded = fs::exists(dir + "/zero_shards.json");  // written at train.zero = 2 or 3
  for (const char* f : {sharded ? "zero_shards.json" : "optimizer.pt", "rng.safetensors", "state.json"})
    if (!fs::exists(dir + "/" + f))
      throw std::runtime_error("checkpoint \"" + dir + "\" is incomplete: " + f + " is missing");
  const auto state = io::read_checkpoint_state(dir);
  if (state.value("stage", std::string("omni")) != tr.stage)
    throw std::runtime_error("checkpoint \"" + dir + "\" belongs to train.stage = \"" +
                             state.value("stage", std::string()) + "\", this run is \"" + tr.stage + "\"");
  check_same_base(dir, state, base);
  for (const auto& [key, print] : s.stage->data_fingerprints())
    if (state.contains("data") && state["data"].value(key, print) != print)
      log::warn("resume: " + key + " is not the stream checkpoint \"" + dir + "\" was trained on (its shards changed): "
                "training goes on from the same position of the new stream, which is not an exact resume");
  s.stage->load_weights(dir);  // a sharded checkpoint's tensors are assembled from its pieces
  if (!sharded) {
    torch::load(s.checkpoint_opt(), dir + "/optimizer.pt");
  } else if (s.shards) {
    s.resumed_shards = std::make_unique<io::WeightsReader>(dir);  // each rank reads its own ranges once sharded
  } else {
    load_full_adamw_state(io::WeightsReader(dir), s.named, s.checkpoint_opt());
  }
  if (s.zero) s.zero->take_state(*s.full, *s.opt);
  restore_rng_file(dir + "/rng.safetensors", s.dev);
  s.step = state["step"].get<int64_t>();
  const TrainOptions old = state.contains("config") ? parse_config(state["config"]).train : tr;
  s.micro = resume_micro(state["micro_batches"].get<int64_t>(), state.value("world_size", int64_t{1}), old,
                         s.dist->world(), tr);
  result.last_checkpoint = dir;
  log::info(log::format("resumed from %s at step %lld", dir.c_str(), static_cast<long long>(s.step)));
  return state.value("metrics", json());
}

// ZeRO-2/3: each rank keeps its chunks of the (final, resumed) weights and of their AdamW state; at stage 3 the
// blocks of the stage's block lists gather their parameters around each use.
void setup_sharding(Session& s, const RuntimeOptions& rt, const TrainOptions& tr) {
  auto& z = *s.shards;
  const bool resumed_full = s.full && !s.full->state().empty();
  s.opt = z.shard(resumed_full ? s.full.get() : nullptr, adamw_options(tr), takes_weight_decay);
  if (s.resumed_shards) z.load_optimizer_state(*s.resumed_shards, *s.opt);
  s.resumed_shards.reset();
  s.full.reset();
  if (z.level() == 3)
    for (const auto& prefix : s.stage->block_lists())
      s.stage->set_block_gate(prefix, ZeroShards::gate(s.shards, prefix));
  const double mib = 1024.0 * 1024.0, bytes = static_cast<double>(s.params.front().element_size());
  const auto owned = static_cast<double>(z.owned_numel()), total = static_cast<double>(z.total_numel());
  log::info(log::format("zero%lld: %lld ranks (%s); rank %lld owns %.0f of %.0f trainable values (%.1f%%): %.1f MiB "
                        "of %s, %.1f MiB of gradients and %.1f MiB of AdamW moments (unsharded: %.1f MiB in all); %s; "
                        "reduce-scatter: %s; %lld + %lld threads per rank",
                        static_cast<long long>(z.level()), static_cast<long long>(s.dist->world()),
                        s.dist->backend().c_str(), static_cast<long long>(s.dist->rank()), owned, total,
                        100.0 * owned / total, owned * bytes / mib,
                        z.level() == 3 ? "weights (the parameters are released)" : "weights it updates (it keeps all)",
                        owned * bytes / mib, 2 * owned * bytes / mib, 4 * total * bytes / mib,
                        z.level() == 3 ? "each block (decoder layer, ViT block, resampler layer) is gathered for its "
                                         "forward and again for its backward (recomputing the forward), the next "
                                         "one prefetched"
                                       : "the parameters are all-gathered after each step",
                        s.dist->reduce_scatter_impl().c_str(), static_cast<long long>(rt.threads),
                        static_cast<long long>(rt.blas_threads)));
}

// distributed: every rank starts from rank 0's trainable weights; gradients are summed over ranks in buckets
// during backward.
void setup_reducer(Session& s, const RuntimeOptions& rt, const TrainOptions& tr) {
  if (s.dist->world() == 1) return;
  {
    torch::NoGradGuard ng;
    s.dist->broadcast(s.params, 0);
  }
  if (s.shards) return setup_sharding(s, rt, tr);
  const double bucket_mb = tr.bucket_mb;
  s.reducer = std::make_unique<GradReducer>(s.dist, s.params, bucket_mb);
  int64_t n = 0;
  for (const auto& p : s.params) n += p.numel();
  const auto world = static_cast<long long>(s.dist->world());
  log::info(log::format("distributed: %lld ranks (%s), global batch = %lld x the configured batch sizes, %lld "
                        "trainable parameters in %lld all-reduce buckets of <= %g MiB, %lld + %lld threads per rank",
                        world, s.dist->backend().c_str(), world, static_cast<long long>(n),
                        static_cast<long long>(s.reducer->buckets()), bucket_mb, static_cast<long long>(rt.threads),
                        static_cast<long long>(rt.blas_threads)));
}

// The tensors of the module that ZeRO-2/3 does not shard (buffers, frozen parameters): rank 0 writes them beside the
// shards.
std::vector<std::pair<std::string, torch::Tensor>> unsharded_state(const Session& s) {
  std::set<std::string> sharded;
  for (const auto& [name, p] : s.named) sharded.insert(name);
  std::vector<std::pair<std::string, torch::Tensor>> rest;
  for (auto& [name, t] : io::state_tensors(s.stage->module()))
    if (!sharded.count(name)) rest.emplace_back(name, t);
  return rest;
}

// One optimizer step's work, as train() and bench_train_steps do it.
struct StepWork {
  double loss = 0;                     // the sum of the micro-batches' shares (over ranks)
  std::map<std::string, double> sums;  // the stage's loss terms, summed alike
  double wait_s = 0, units = 0;        // data wait and tokens (images) of this rank, summed over ranks when reduced
  double allreduce_s = 0;              // time in the final all-reduce wait (ZeRO-2/3: in the final reduce-scatters)
  GradCheck check;                     // gradient norm, and whether the step may be taken
  double lr = 0;                       // the learning rate the step took
};

// Every trainable parameter's gradient set to none (the sharded optimizer holds a share), as PyTorch's
// zero_grad(set_to_none=True): a parameter no micro-batch reaches in a step (an expert no token was routed to) has no
// gradient, and AdamW leaves it and its moments alone. Zeroed gradients instead would let it drift by momentum and
// decay only once it had been reached since the process started, so a resumed run (whose gradients start undefined)
// would part from an uninterrupted one at the first step after the resume that leaves an expert idle.
void clear_grads(torch::optim::Optimizer& opt) {
  for (auto& group : opt.param_groups())
    for (auto& p : group.params()) p.mutable_grad() = torch::Tensor();
}

// grad_accum micro-batches -> backward (one all-reduce per step) -> the logged values reduced over ranks (so every
// rank decides alike on a non-finite loss) -> gradient norm and clip -> AdamW at the schedule's learning rate when
// finite. The schedule's horizon is train.steps, so stopping early (--max-steps) and resuming changes nothing.
StepWork take_step(Session& s, const TrainOptions& tr, const std::vector<std::string>& names) {
  StepWork w;
  clear_grads(s.checkpoint_opt());
  if (s.shards) s.shards->begin_step();
  s.stage->begin_step(s.micro, tr.grad_accum);
  for (int64_t a = 0; a < tr.grad_accum; ++a) {
    auto r = s.stage->micro_step(s.micro++);
    if (s.reducer && a + 1 == tr.grad_accum) s.reducer->arm();
    r.loss.backward();  // the micro-batch's share of the step's loss
    for (const auto& [k, v] : r.terms) w.sums[k] += v;
    w.loss += r.loss.item<double>();
    w.wait_s += r.wait_s;
    w.units += r.units;
  }
  if (s.distributed()) {
    w.allreduce_s = s.reducer ? s.reducer->finish() : s.shards->finish();
    std::vector<double> v{w.loss, w.units};
    for (const auto& k : names) v.push_back(w.sums[k]);
    auto t = torch::tensor(v, torch::kFloat64).to(s.dev);
    s.dist->all_reduce_sum(t);
    t = t.cpu();
    w.loss = t[0].item<double>();
    w.units = t[1].item<double>();
    for (size_t i = 0; i < names.size(); ++i) w.sums[names[i]] = t[static_cast<int64_t>(i) + 2].item<double>();
  }
  w.lr = lr_at(s.step, tr.steps, tr.warmup_steps, tr.lr, tr.min_lr_ratio);
  w.check = s.shards ? clip_and_check(*s.shards, w.loss, tr.grad_clip) : clip_and_check(s.params, w.loss, tr.grad_clip);
  if (w.check.finite) {
    for (auto& g : s.opt->param_groups()) static_cast<torch::optim::AdamWOptions&>(g.options()).lr(w.lr);
    adamw_step(*s.opt);
    if (s.zero) s.zero->broadcast_params();
  }
  if (s.shards) s.shards->after_step(w.check.finite);
  ++s.step;
  if (w.check.finite) s.stage->after_step(s.step);
  return w;
}

// The step's metrics.jsonl line.
json step_metrics(const Session& s, const StepWork& w, const std::vector<std::string>& names,
                  const std::string& rate_key, double dt) {
  json m = {{"step", s.step}, {"loss", w.loss}};
  for (const auto& k : names) m[k] = w.sums.at(k);
  m["lr"] = w.lr;
  m["grad_norm"] = w.check.grad_norm;
  m[rate_key] = w.units / dt;
  m["data_wait_frac"] = w.wait_s / dt;
  m["skipped"] = !w.check.finite;
  if (s.distributed()) {
    m["allreduce_s"] = w.allreduce_s;
    m["world_size"] = s.dist->world();
  }
  if (s.reducer) m["allreduce_buckets_early"] = s.reducer->started_early();  // of reducer->buckets(): started early
  if (s.shards) m["zero"] = s.shards->level();
  // What this rank holds after the step (measured: the storages alive), and at ZeRO-3 the most it had gathered
  // during the step (parameters of the gathered units and one unit's full gradients).
  const auto h = s.shards ? s.shards->held(*s.opt) : held_bytes(s.params, *s.opt);
  const double mib = 1024.0 * 1024.0;
  m["mem_weights_mib"] = h.weights / mib;
  m["mem_grads_mib"] = h.grads / mib;
  m["mem_optimizer_mib"] = h.optimizer / mib;
  if (s.shards && s.shards->level() == 3) m["mem_gathered_peak_mib"] = s.shards->take_peak_gathered() / mib;
  return m;
}

// A checkpoint of the step, in the layout of the run's sharding: unsharded by rank 0 (ZeRO-1 gathers the state for
// it first; QLoRA at ZeRO-2/3 gathers its small adapters and their moments), or sharded by every rank (ZeRO-2/3).
// Returns the folder (empty on ranks that wrote nothing of an unsharded one).
std::string write_checkpoint(Session& s, Checkpointer& ckpt, const Config& cfg, const json& m) {
  {
    RootGathered root(s.shards.get());
    s.stage->before_checkpoint();  // on every rank: keeps their modules alike
  }
  const bool main = s.dist->is_main();
  std::string dir;
  if (s.shards && !cfg.lora.enabled) {
    dir = ckpt.write_sharded(s.step, s.micro, *s.dist, *s.shards, *s.opt, *s.stage, unsharded_state(s), cfg, m);
    if (main) log::info("checkpoint " + dir + " (sharded: " + std::to_string(s.dist->world()) +
                        " shards and zero_shards.json)");
    return dir;
  }
  std::unique_ptr<torch::optim::AdamW> gathered;  // QLoRA at ZeRO-2/3: an AdamW over the whole adapters
  if (s.shards) {
    s.shards->gather_all();
    gathered = make_optimizer(s.stage->module(), cfg.train);
    s.shards->gather_state(*s.opt, *gathered);
  }
  if (s.zero) s.zero->gather_state(*s.opt, *s.full);
  if (main) {
    dir = ckpt.write(s.step, s.micro, s.dist->world(), *s.stage, gathered ? *gathered : s.checkpoint_opt(), cfg, m);
    log::info("checkpoint " + dir + (s.shards ? " (the adapters gathered from " + std::to_string(s.dist->world()) +
                                                    " ranks)" : std::string()));
  }
  if (s.shards) s.shards->release_all();
  if (s.zero) s.full->state().clear();
  return dir;
}

// Every number of the step's metrics.jsonl line as a TensorBoard scalar (booleans as 0 / 1).
void write_events(io::EventWriter& events, const json& m) {
  const int64_t step = m.at("step").get<int64_t>();
  for (const auto& [k, v] : m.items())
    if (k != "step" && (v.is_number() || v.is_boolean()))
      events.scalar(k, step, v.is_boolean() ? (v.get<bool>() ? 1.0 : 0.0) : v.get<double>());
  events.flush();
}

// The progress line: step, losses, learning rate, gradient norm, rate, data wait, ETA, validation.
void log_step(const Session& s, const StepWork& w, const std::vector<std::string>& names, int64_t total_steps,
              double dt, double eta, const std::string& valid_text) {
  std::string line = log::format("step %lld/%lld | loss %.4f", static_cast<long long>(s.step),
                                 static_cast<long long>(total_steps), w.loss);
  for (const auto& k : names) {
    const bool count = k.rfind("data_", 0) == 0;  // data counts (bad rows, shards): shown when there are any
    if (!count) line += log::format(" | %s %.4f", k.c_str() + (k.rfind("loss_", 0) == 0 ? 5 : 0), w.sums.at(k));
    else if (w.sums.at(k) > 0) line += log::format(" | %s %.0f", k.c_str(), w.sums.at(k));
  }
  line += log::format(" | lr %.2e | grad %.2f | %.0f %s/s | data wait %.1f%%", w.lr, w.check.grad_norm,
                      w.units / dt, s.stage->unit().c_str(), 100.0 * w.wait_s / dt);
  if (s.reducer) line += log::format(" | all-reduce %.3fs", w.allreduce_s);
  if (s.shards) line += log::format(" | reduce-scatter %.3fs", w.allreduce_s);
  log::info(line + log::format(" | ETA %.0fs", eta) + valid_text);
}

// A non-finite loss or gradient norm skips the step; train.max_bad_steps in a row stop the run.
void count_bad_step(const StepWork& w, int64_t step, int64_t& bad_in_row, int64_t limit, const std::string& last) {
  if (w.check.finite) {
    bad_in_row = 0;
    return;
  }
  ++bad_in_row;
  const bool loss_ok = std::isfinite(w.loss);
  log::warn(log::format("step %lld: %s is %g; step skipped (%lld in a row, limit train.max_bad_steps = %lld)",
                        static_cast<long long>(step), loss_ok ? "gradient norm" : "loss",
                        loss_ok ? w.check.grad_norm : w.loss, static_cast<long long>(bad_in_row),
                        static_cast<long long>(limit)));
  if (bad_in_row >= limit)
    throw std::runtime_error("training stopped: " + std::to_string(bad_in_row) +
                             " steps in a row with a non-finite loss or gradient; the last good checkpoint is " +
                             (last.empty() ? std::string("none") : last) +
                             "; hint: lower train.lr, or run with OMNILITE_DETECT_ANOMALY=1 to name the op");
}

// OMNILITE_DETECT_ANOMALY=1: autograd checks every backward op and names the forward op whose gradient first
// turns NaN (slow; for finding the source of skipped steps).
std::unique_ptr<torch::autograd::DetectAnomalyGuard> anomaly_detection() {
  const char* a = std::getenv("OMNILITE_DETECT_ANOMALY");
  if (!a || std::string(a) == "0") return nullptr;
  log::warn("OMNILITE_DETECT_ANOMALY: autograd anomaly detection is on (slow)");
  return std::make_unique<torch::autograd::DetectAnomalyGuard>();
}

}  // namespace

TrainBenchResult bench_train_steps(const Config& cfg, int64_t steps, int64_t warmup, const std::string& profile) {
  Session s;
  s.dev = apply_runtime(cfg.runtime);
  torch::manual_seed(cfg.train.seed);
  s.dist = std::make_shared<Dist>();
  setup_model(s, cfg);
  setup_optimizer(s, cfg.train);
  s.stage->start(0);
  const auto names = s.stage->terms();
  double units = 0, wait = 0;
  std::chrono::steady_clock::time_point t0;
  std::unique_ptr<ProfileGuard> profiler;
  for (int64_t i = 0; i < warmup + steps; ++i) {
    if (i == warmup) {
      if (s.dev.is_cuda()) torch::cuda::synchronize();
      if (!profile.empty()) profiler = std::make_unique<ProfileGuard>(profile);
      t0 = std::chrono::steady_clock::now();
    }
    const auto w = take_step(s, cfg.train, names);
    if (i >= warmup) {
      units += w.units;
      wait += w.wait_s;
    }
  }
  if (s.dev.is_cuda()) torch::cuda::synchronize();
  const double total = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  profiler.reset();  // writes the trace
  TrainBenchResult r;
  r.seconds_per_step = total / static_cast<double>(steps);
  r.units_per_s = units / total;
  r.units_per_step = units / static_cast<double>(steps);
  r.data_wait_frac = wait / total;
  r.moe_forwards = moe_path_counts(s.stage->module());
  return r;
}

// train.base_checkpoint as a pretraining run folder: its newest checkpoint, fixed for the run (and its resumes) by the
// config the run stores.
namespace {
Config with_resolved_base(const Config& in) {
  Config c = in;
  std::string& base = c.train.base_checkpoint;
  if (base.empty()) return c;
  const std::string resolved = io::base_weights_path(base);
  if (resolved != base) log::info("train.base_checkpoint: the run folder's newest checkpoint, " + resolved);
  base = resolved;
  return c;
}
}  // namespace

TrainResult train(const Config& cfg_in, const TrainRunOptions& run) {
  const Config cfg = with_resolved_base(cfg_in);
  const auto& tr = cfg.train;
  const auto anomaly = anomaly_detection();
  const int64_t total_steps = run.max_steps >= 0 ? run.max_steps : tr.steps;
  // runtime and distributed: the ranks of a job share the cores of a node.
  const DistOptions env = dist_options_from_env();
  log::set_rank(env.rank);
  const RuntimeOptions rt = rank_runtime(cfg.runtime, env);
  Session s;
  s.dev = apply_runtime(rt);
  torch::manual_seed(tr.seed);
  s.dist = join_job(env, cfg, run, s.dev);
  const bool main = s.dist->is_main();
  setup_model(s, cfg);
  setup_optimizer(s, tr);
  // Resume (every rank reads the checkpoint), then the run folder (rank 0 alone writes): a refused resume leaves
  // the run's files as they were.
  Checkpointer ckpt{run.out_dir + "/checkpoints", tr.keep_last, s.dev,
                    tr.base_checkpoint.empty() ? json() : io::weights_identity(tr.base_checkpoint)};
  TrainResult result;
  const json resumed_metrics = run.resume_dir.empty() ? json() : resume_from(s, cfg, run.resume_dir, ckpt.base, result);
  std::ofstream metrics;
  if (main) {
    fs::create_directories(run.out_dir);
    write_file_atomically(run.out_dir + "/config.json", to_json(cfg).dump(2));
    truncate_metrics(run.out_dir + "/metrics.jsonl", s.step, resumed_metrics);
    metrics.open(run.out_dir + "/metrics.jsonl", std::ios::app);
  }
  // TensorBoard: a resumed run's file starts at its first new step, where TensorBoard drops the abandoned ones.
  std::unique_ptr<io::EventWriter> events;
  if (main && tr.tensorboard)
    events = std::make_unique<io::EventWriter>(run.out_dir + "/tb", run.resume_dir.empty() ? -1 : s.step + 1);
  s.stage->start(s.micro);
  setup_reducer(s, rt, tr);

  const auto names = s.stage->terms();
  const auto start = std::chrono::steady_clock::now();
  const int64_t first_step = s.step;
  int64_t bad_in_row = 0;
  while (s.step < total_steps) {
    const auto t0 = std::chrono::steady_clock::now();
    const StepWork w = take_step(s, tr, names);
    count_bad_step(w, s.step, bad_in_row, tr.max_bad_steps, result.last_checkpoint);
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (s.step == first_step + 1) result.first_loss = w.loss;
    result.last_loss = w.loss;
    json m = step_metrics(s, w, names, s.stage->unit() + "_per_s", dt);
    const bool last = s.step == total_steps;
    // The checkpoint comes before validation: a failure there never loses the step's weights.
    if (s.step % tr.ckpt_every == 0 || last) {
      const std::string written = write_checkpoint(s, ckpt, cfg, m);
      if (!written.empty()) result.last_checkpoint = written;
    }
    std::string valid_text;
    if ((tr.valid_every > 0 && s.step % tr.valid_every == 0) || last) {
      RootGathered root(s.shards.get());
      for (const auto& [k, v] : s.stage->validate()) {
        m[k] = v;
        valid_text += log::format(" | %s %.4f", k.c_str(), v);
      }
    }
    if (main) metrics << m.dump() << "\n" << std::flush;
    if (events) write_events(*events, m);
    if (s.step % tr.log_every == 0 || last || s.step == first_step + 1 || !valid_text.empty()) {
      const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      log_step(s, w, names, total_steps, dt,
               elapsed / static_cast<double>(s.step - first_step) * static_cast<double>(total_steps - s.step),
               valid_text);
    }
  }
  result.steps_done = s.step;
  return result;
}

}  // namespace omnilite
