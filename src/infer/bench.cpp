// Benchmark kernels behind `omnilite bench` (docs/benchmarks.md): GEMM rate, memory bandwidth, the NF4 projection,
// and batch-1 KV-cached decoding against the memory-bandwidth bound.
#include "omnilite/infer/bench.h"

#include <algorithm>
#include <chrono>
#include <optional>
#include <stdexcept>
#include <thread>

#include "omnilite/infer/text_step.h"
#include "omnilite/modules/kv_cache.h"
#include "omnilite/modules/moe.h"
#include "omnilite/modules/param_count.h"
#include "omnilite/modules/nf4_linear.h"
#include "omnilite/modules/qlora_builder.h"
#include "omnilite/runtime.h"

namespace omnilite {
namespace {
using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }
}  // namespace

void synchronize(const torch::Device& d) {
  if (d.is_cuda()) torch::cuda::synchronize();
}

// GEMM FLOP/s at n^3 in `dtype` (one warm-up, then `reps` timed products).
double matmul_flops(const torch::Device& dev, int64_t n, int64_t reps, torch::ScalarType dtype) {
  auto a = torch::randn({n, n}, torch::TensorOptions().device(dev).dtype(dtype)), b = torch::randn_like(a);
  torch::NoGradGuard ng;
  auto c = torch::matmul(a, b);
  synchronize(dev);
  const auto t0 = Clock::now();
  for (int64_t i = 0; i < reps; ++i) c = torch::matmul(a, b);
  synchronize(dev);
  return 2.0 * static_cast<double>(n * n * n) * static_cast<double>(reps) / seconds_since(t0);
}

MatmulRate step_matmul_rate(const torch::Device& dev, bool bf16) {
  const int64_t n = dev.is_cuda() ? 8192 : 2048, reps = dev.is_cuda() ? 20 : 5;
  MatmulRate r;
  r.flops = matmul_flops(dev, n, reps, bf16 ? torch::kBFloat16 : torch::kFloat32);
  r.json = {{"matmul_dtype", bf16 ? "bf16" : "fp32"}, {"matmul_size", n}, {"matmul_gflops", r.flops / 1e9}};
  return r;
}

namespace {
// Mean seconds of fn() over `reps` calls after one warm-up.
template <class Fn>
double time_per_call(const torch::Device& dev, int64_t reps, Fn fn) {
  fn();
  synchronize(dev);
  const auto t0 = Clock::now();
  for (int64_t i = 0; i < reps; ++i) fn();
  synchronize(dev);
  return seconds_since(t0) / static_cast<double>(reps);
}

}  // namespace

// NF4 projection (dequantise + matmul) vs the fp32 projection of the same shape, no gradients.
nlohmann::json bench_nf4(const torch::Device& dev, int64_t tokens, int64_t in, int64_t out, int64_t reps) {
  torch::NoGradGuard ng;
  auto w = torch::randn({out, in}, torch::TensorOptions().device(dev)) * 0.02;
  auto x = torch::randn({tokens, in}, torch::TensorOptions().device(dev));
  Nf4Linear nf4(in, out, false);
  nf4->to(dev);
  nf4->set_weight(w);
  const double t_fp32 = time_per_call(dev, reps, [&] { return torch::nn::functional::linear(x, w); });
  const double t_nf4 = time_per_call(dev, reps, [&] { return nf4->forward(x); });
  const double t_deq = time_per_call(dev, reps, [&] { return nf4->dequantized_weight(); });
  const double flops = 2.0 * static_cast<double>(tokens * in * out);
  nlohmann::json r;
  if (tokens == 1 && dev.is_cpu()) {  // the one-row kernel with int16 inputs (runtime.nf4_activations = int16)
    nf4->activations = quant::Nf4Activations::Int16;
    const double t16 = time_per_call(dev, reps, [&] { return nf4->forward(x); });
    const auto y16 = nf4->forward(x).to(torch::kFloat64);
    nf4->activations = quant::Nf4Activations::Float32;
    const auto y32 = nf4->forward(x).to(torch::kFloat64);
    // its error against the exact product: largest |difference| / largest |y|, and relative to the norm of y
    r = {{"nf4_int16_ms", 1e3 * t16}, {"nf4_int16_gweights_per_s", static_cast<double>(in * out) / t16 / 1e9},
         {"nf4_int16_max_err_rel", ((y16 - y32).abs().max() / y32.abs().max()).item<double>()},
         {"nf4_int16_norm_err_rel", ((y16 - y32).norm() / y32.norm()).item<double>()}};
  }
  r.update({{"shape", std::to_string(tokens) + " x " + std::to_string(in) + " -> " + std::to_string(out)},
          {"fp32_ms", 1e3 * t_fp32},
          {"nf4_ms", 1e3 * t_nf4},
          {"dequantize_ms", 1e3 * t_deq},
          {"fp32_gflops", flops / t_fp32 / 1e9},
          {"nf4_gflops", flops / t_nf4 / 1e9},
          {"nf4_speed_vs_fp32", t_fp32 / t_nf4}});
  return r;
}

// Memory bandwidth over `bytes` of fp32, best of `reps`: {copy (dst.copy_(src), read + write counted), read only
// (a sum)}.
std::pair<double, double> memory_bandwidth(const torch::Device& dev, int64_t bytes, int64_t reps) {
  // All cores copy, whatever the run's thread split: the bound is the machine's, not one thread's.
  const int threads = torch::get_num_threads();
  torch::set_num_threads(static_cast<int>(std::max(1u, std::thread::hardware_concurrency())));
  auto src = torch::rand({bytes / 4}, torch::TensorOptions().device(dev)), dst = torch::empty_like(src);
  dst.copy_(src);
  auto best_of = [&](auto fn) {
    double best = 1e30;
    for (int64_t i = 0; i < reps; ++i) {
      synchronize(dev);
      const auto t0 = Clock::now();
      fn();
      synchronize(dev);
      best = std::min(best, seconds_since(t0));
    }
    return best;
  };
  const double copy_s = best_of([&] { dst.copy_(src); });
  const double read_s = best_of([&] { src.sum(); });
  torch::set_num_threads(threads);
  return {2.0 * static_cast<double>(bytes) / copy_s, static_cast<double>(bytes) / read_s};
}

double weight_bytes_per_token(const OmniLiteImpl& model, const ModelConfig& c) {
  double bytes = 0;
  const double expert_frac = static_cast<double>(c.moe.top_k) / static_cast<double>(c.moe.num_experts);
  // A tied LM head multiplies with the whole embedding table; an untied one leaves it one row per token.
  const double embed_frac = c.text.tie_word_embeddings ? 1.0 : 1.0 / static_cast<double>(c.text.vocab_size);
  auto add = [&](const std::string& name, const torch::Tensor& t) {
    const double b = static_cast<double>(t.nbytes());
    if (name.rfind("text.embed_tokens.", 0) == 0) bytes += b * embed_frac;
    else if (name.find(".moe.experts.") != std::string::npos) bytes += b * expert_frac;
    else if (name.rfind("text.", 0) == 0 || name.rfind("lm_head.", 0) == 0) bytes += b;
  };
  for (const auto& p : model.named_parameters()) add(p.key(), p.value());
  for (const auto& p : model.named_buffers()) add(p.key(), p.value());
  return bytes;
}

void add_moe_forwards(nlohmann::json& result, const MoEPathCounts& paths) {
  if (paths.loop + paths.grouped > 0) result["moe_forwards"] = {{"loop", paths.loop}, {"grouped", paths.grouped}};
}

// The full text path with `weights` = fp32 | bf16 | nf4 (NF4 bases as QLoRA builds them, no adapters), random.
OmniLite decode_model(const Config& cfg, const std::string& weights, const torch::Device& dev) {
  if (weights != "fp32" && weights != "bf16" && weights != "nf4")
    throw std::runtime_error("bench decode: --weights \"" + weights + "\": expected nf4, bf16 or fp32");
  const auto dispatch = parse_moe_dispatch(cfg.runtime.moe_dispatch);
  if (weights != "nf4") {
    OmniLite m(cfg.model);
    m->to(dev, weights == "bf16" ? torch::kBFloat16 : torch::kFloat32);
    set_moe_dispatch(*m, dispatch);
    return m;
  }
  LoRAOptions lo;
  lo.enabled = true;
  lo.target_modules = {};  // NF4 bases only
  OmniLite m(cfg.model, QLoRABuilder(lo));
  torch::NoGradGuard ng;
  for (const auto& mod : m->modules(/*include_self=*/false))
    if (auto* q = dynamic_cast<Nf4LinearImpl*>(mod.get())) {  // random codes and block scales around 0.02
      q->weight_packed.random_(0, 256);
      q->weight_absmax_q.random_(0, 256);
      q->weight_absmax_scale.fill_(0.01);
      q->weight_absmax_mean.fill_(0.02);
    }
  // The LM head holds bf16 values, as a bf16 base checkpoint's does, and is kept in bf16 as QLoRA inference keeps it
  // (load_omni_checkpoint with an adapter: LMHeadImpl::store_bf16_if_exact).
  auto& head = m->lm_head->weight;
  for (int64_t r = 0; r < head.size(0); r += 1024) {  // rounded in place, in chunks
    auto rows = head.narrow(0, r, std::min<int64_t>(1024, head.size(0) - r));
    rows.copy_(rows.to(torch::kBFloat16));
  }
  m->to(dev);
  if (dev.is_cpu()) m->lm_head->store_bf16_if_exact();
  set_moe_dispatch(*m, dispatch);
  set_nf4_activations(*m, quant::parse_nf4_activations(cfg.runtime.nf4_activations));
  return m;
}

nlohmann::json bench_decode(const Config& cfg, const torch::Device& dev, const std::string& weights, int64_t prompt,
                            int64_t new_tokens) {
  if (prompt < 1 || new_tokens < 1 || prompt + new_tokens > cfg.model.text.max_position_embeddings)
    throw std::runtime_error("bench decode: --prompt " + std::to_string(prompt) + " + --new-tokens " +
                             std::to_string(new_tokens) + " must be >= 1 each and fit max_position_embeddings = " +
                             std::to_string(cfg.model.text.max_position_embeddings));
  const auto t_build = Clock::now();
  OmniLite model = decode_model(cfg, weights, dev);
  model->eval();
  const double build_s = seconds_since(t_build);
  AutocastGuard autocast(dev.is_cuda() && weights == "nf4");  // NF4 dequantises to bf16 under CUDA autocast
  torch::NoGradGuard ng;
  const auto iopts = torch::TensorOptions().dtype(torch::kInt64).device(dev);
  auto ids = torch::randint(16, cfg.model.text.vocab_size, {1, prompt}, iopts);
  KVCache cache;
  OmniInput in;
  in.cache = &cache;
  in.tokens = ids;
  synchronize(dev);
  // Greedy over the text ids [16, V) that the prompt is drawn from: a random model may otherwise pick an image
  // placeholder id, which the forward pass refuses without an image. logits [1, T, V] at position t -> [1, 1].
  const int64_t first = 16, span = cfg.model.text.vocab_size - first;
  auto greedy = [&](const torch::Tensor& logits, int64_t t) {
    return (logits.select(1, t).narrow(-1, first, span).argmax(-1) + first).view({1, 1});
  };
  auto t0 = Clock::now();
  in.last_logits = true;
  auto next = greedy(model->forward(in).logits, 0);
  synchronize(dev);
  const double prefill_s = seconds_since(t0);
  // Decoded tokens take the lean CPU step where the model allows it, as generation does (infer/text_step.h).
  const std::string obstacle = text_step_obstacle(*model);
  std::optional<TextStep> step;
  if (obstacle.empty()) step.emplace(*model);
  auto decode_one = [&] {
    const int64_t token = step ? in.tokens.item<int64_t>() : -1;
    if (step && step->accepts(token, cache))
      in.tokens = greedy(step->logits(token, cache).view({1, 1, -1}), 0);
    else
      in.tokens = greedy(model->forward(in).logits, 0);
  };
  in.tokens = next;  // one warm-up decode step, then the timed ones
  decode_one();
  synchronize(dev);
  t0 = Clock::now();
  for (int64_t i = 0; i < new_tokens; ++i) decode_one();
  synchronize(dev);
  const double decode_s = seconds_since(t0) / static_cast<double>(new_tokens);
  const double peak_rss = peak_resident_bytes();  // before the copy's buffers exist
  const auto [copy_bandwidth, read_bandwidth] = memory_bandwidth(dev, int64_t{1} << 30, 5);
  const double w_bytes = weight_bytes_per_token(*model, cfg.model);
  const double kv_bytes = static_cast<double>(cache.bytes());  // read once per token at the end of the run
  const double bound = read_bandwidth / (w_bytes + kv_bytes);  // decoding reads the weights once per token
  nlohmann::json r = {{"weights", weights},
                      {"decode_path", obstacle.empty() ? "text_step" : "modules (" + obstacle + ")"},
                      {"nf4_activations", cfg.runtime.nf4_activations},
                      {"build_seconds", build_s},
                      {"prompt_tokens", prompt},
                      {"prompt_tokens_per_second", static_cast<double>(prompt) / prefill_s},
                      {"decoded_tokens", new_tokens},
                      {"decode_ms_per_token", 1e3 * decode_s},
                      {"decode_tokens_per_second", 1.0 / decode_s},
                      {"weight_mb_per_token", w_bytes / 1e6},
                      {"kv_cache_mb", kv_bytes / 1e6},
                      {"copy_bandwidth_gb_per_s", copy_bandwidth / 1e9},
                      {"read_bandwidth_gb_per_s", read_bandwidth / 1e9},
                      {"bandwidth_bound_tokens_per_second", bound},
                      {"fraction_of_bound", (1.0 / decode_s) / bound}};
  if (dev.is_cuda()) r["peak_allocated_gib"] = cuda_peak_allocated_gib();
  else r["peak_rss_gib"] = peak_rss / double(1u << 30);
  add_moe_forwards(r, moe_path_counts(*model));
  return r;
}

nlohmann::json bench_forward(const Config& cfg, const torch::Device& dev, int64_t B, int64_t T, int64_t steps,
                             bool backward) {
  OmniLite model(cfg.model);
  model->to(dev);
  set_moe_dispatch(*model, parse_moe_dispatch(cfg.runtime.moe_dispatch));
  AutocastGuard autocast(dev.is_cuda() && cfg.runtime.dtype == "bf16");
  const int64_t lo = 16;  // skip the special-token ids
  auto tokens = torch::randint(lo, cfg.model.text.vocab_size, {B, T},
                               torch::TensorOptions().dtype(torch::kInt64).device(dev));
  const double s = time_per_call(dev, steps, [&] {
    if (!backward) {
      torch::NoGradGuard ng;
      return model->forward({tokens}).logits;
    }
    model->zero_grad();
    auto logits = model->forward({tokens}).logits.narrow(1, 0, T - 1).reshape({-1, cfg.model.text.vocab_size});
    auto loss = torch::nn::functional::cross_entropy(logits.to(torch::kFloat32), tokens.narrow(1, 1, T - 1).reshape(-1));
    loss.backward();
    return loss;
  });
  // Model FLOPs (PaLM's count; a forward pass is a third of forward + backward) against the GEMM rate of the
  // compute dtype, measured after the steps so that the model's memory is already taken.
  const auto rate = step_matmul_rate(dev, dev.is_cuda() && cfg.runtime.dtype == "bf16");
  const double per_token = train_flops_per_token(cfg.model, T) / (backward ? 1.0 : 3.0);
  const double tokens_per_s = static_cast<double>(B * T) / s;
  nlohmann::json r = rate.json;
  r.update({{"model_flops_per_token", per_token}, {"model_gflops_per_s", per_token * tokens_per_s / 1e9},
            {"mfu", per_token * tokens_per_s / rate.flops}, {"batch", B}, {"seq", T}, {"backward", backward},
            {"dtype", cfg.runtime.dtype}, {"seconds_per_step", s}, {"tokens_per_second", tokens_per_s}});
  add_moe_forwards(r, moe_path_counts(*model));
  if (dev.is_cuda()) r["peak_allocated_gib"] = cuda_peak_allocated_gib();
  return r;
}

}  // namespace omnilite
