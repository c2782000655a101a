// omnilite bench: measured throughput figures (docs/benchmarks.md records them with the machine and command).
//   matmul  : GEMM GFLOP/s at N^3 (fp32, or bf16 with --dtype bf16: the denominator of a bf16 MFU), the BLAS check
//             (reference BLAS is ~19x slower than OpenBLAS)
//   forward : tokens/s of the model's forward (and backward with --backward) on random text, for a config, and its
//             MFU as `train` defines it
//   nf4     : an NF4 projection (dequantise + matmul; default the expert shape 512 x 2048 -> 768) against the fp32
//             projection of the same shape
//   train   : whole optimizer steps of a config's stage on its data, and the model-FLOPs utilisation
//             MFU = train_flops_per_token * tokens/s / (GEMM FLOP/s in the step's compute dtype at 8192^3 on a GPU,
//             2048^3 on a CPU, measured in the same run); train_flops_per_token = 6 * the matmul parameters a text
//             token passes through (attention, router, top_k experts, LM head) + the attention scores (PaLM)
//   decode  : batch-1 decoding with the KV cache (tokens/s) against the memory-bandwidth bound: bytes of weights a
//             token reads (attention, router, top_k of num_experts experts, final norm, LM head, one embedding row,
//             plus the KV cache) / bandwidth of a large copy measured in the same run; and prompt tokens/s
#include <chrono>
#include <cstdio>
#include <iostream>
#include <thread>

#include <cxxopts.hpp>
#include <nlohmann/json.hpp>

#include "omnilite/cli/commands.h"
#include "omnilite/config.h"
#include "omnilite/modules/kv_cache.h"
#include "omnilite/modules/moe.h"
#include "omnilite/modules/nf4_linear.h"
#include "omnilite/modules/qlora_builder.h"
#include "omnilite/modules/omnilite.h"
#include "omnilite/param_count.h"
#include "omnilite/runtime.h"
#include "omnilite/train/trainer.h"

namespace omnilite::cli {
namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

void synchronize(const torch::Device& d) {
  if (d.is_cuda()) torch::cuda::synchronize();
}

// GEMM FLOP/s at n^3 in `dtype` (one warm-up, then `reps` timed products).
double matmul_flops(const torch::Device& dev, int64_t n, int64_t reps, torch::ScalarType dtype = torch::kFloat32) {
  auto a = torch::randn({n, n}, torch::TensorOptions().device(dev).dtype(dtype)), b = torch::randn_like(a);
  torch::NoGradGuard ng;
  auto c = torch::matmul(a, b);
  synchronize(dev);
  const auto t0 = Clock::now();
  for (int64_t i = 0; i < reps; ++i) c = torch::matmul(a, b);
  synchronize(dev);
  return 2.0 * static_cast<double>(n * n * n) * static_cast<double>(reps) / seconds_since(t0);
}

// The GEMM rate an MFU is measured against: square matmuls of the step's compute dtype, large enough to approach
// the device's peak (8192 on a GPU; 2048 on a CPU, where larger ones take seconds each).
struct MatmulRate {
  double flops = 0;     // FLOP/s
  nlohmann::json json;  // matmul_dtype, matmul_size, matmul_gflops
};
MatmulRate step_matmul_rate(const torch::Device& dev, bool bf16) {
  const int64_t n = dev.is_cuda() ? 8192 : 2048, reps = dev.is_cuda() ? 20 : 5;
  MatmulRate r;
  r.flops = matmul_flops(dev, n, reps, bf16 ? torch::kBFloat16 : torch::kFloat32);
  r.json = {{"matmul_dtype", bf16 ? "bf16" : "fp32"}, {"matmul_size", n}, {"matmul_gflops", r.flops / 1e9}};
  return r;
}

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
  return {{"shape", std::to_string(tokens) + " x " + std::to_string(in) + " -> " + std::to_string(out)},
          {"fp32_ms", 1e3 * t_fp32},
          {"nf4_ms", 1e3 * t_nf4},
          {"dequantize_ms", 1e3 * t_deq},
          {"fp32_gflops", flops / t_fp32 / 1e9},
          {"nf4_gflops", flops / t_nf4 / 1e9},
          {"nf4_speed_vs_fp32", t_fp32 / t_nf4}};
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

// Bytes of model state one decoded token reads: every text tensor once, except the experts (top_k of num_experts
// per layer on average) and the embedding table (one row); the image side is not used by text decoding.
double weight_bytes_per_token(const OmniLiteImpl& model, const ModelConfig& c) {
  double bytes = 0;
  const double expert_frac = static_cast<double>(c.moe.top_k) / static_cast<double>(c.moe.num_experts);
  auto add = [&](const std::string& name, const torch::Tensor& t) {
    const double b = static_cast<double>(t.nbytes());
    if (name.rfind("text.embed_tokens.", 0) == 0) bytes += b / static_cast<double>(c.text.vocab_size);
    else if (name.find(".moe.experts.") != std::string::npos) bytes += b * expert_frac;
    else if (name.rfind("text.", 0) == 0 || name.rfind("lm_head.", 0) == 0) bytes += b;
  };
  for (const auto& p : model.named_parameters()) add(p.key(), p.value());
  for (const auto& p : model.named_buffers()) add(p.key(), p.value());
  return bytes;
}

// Which MoE path the timed work took (auto decides per call): the model's layer forwards by path.
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
      q->weight_absmax_q.random_(-127, 128);
      q->weight_absmax_scale.fill_(1e-4);
      q->weight_absmax_mean.fill_(0.02);
    }
  m->to(dev);
  set_moe_dispatch(*m, dispatch);
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
  auto t0 = Clock::now();
  auto next = model->forward(in).logits.select(1, prompt - 1).argmax(-1).view({1, 1});
  synchronize(dev);
  const double prefill_s = seconds_since(t0);
  in.tokens = next;  // one warm-up decode step, then the timed ones
  in.tokens = model->forward(in).logits.select(1, 0).argmax(-1).view({1, 1});
  synchronize(dev);
  t0 = Clock::now();
  for (int64_t i = 0; i < new_tokens; ++i) in.tokens = model->forward(in).logits.select(1, 0).argmax(-1).view({1, 1});
  synchronize(dev);
  const double decode_s = seconds_since(t0) / static_cast<double>(new_tokens);
  const double peak_rss = peak_resident_bytes();  // before the copy's buffers exist
  const auto [bandwidth, read_bandwidth] = memory_bandwidth(dev, int64_t{1} << 30, 5);
  const double w_bytes = weight_bytes_per_token(*model, cfg.model);
  const double kv_bytes = static_cast<double>(cache.bytes());  // read once per token at the end of the run
  const double bound = bandwidth / (w_bytes + kv_bytes);
  nlohmann::json r = {{"weights", weights},
                      {"build_seconds", build_s},
                      {"prompt_tokens", prompt},
                      {"prompt_tokens_per_second", static_cast<double>(prompt) / prefill_s},
                      {"decoded_tokens", new_tokens},
                      {"decode_ms_per_token", 1e3 * decode_s},
                      {"decode_tokens_per_second", 1.0 / decode_s},
                      {"weight_mb_per_token", w_bytes / 1e6},
                      {"kv_cache_mb", kv_bytes / 1e6},
                      {"copy_bandwidth_gb_per_s", bandwidth / 1e9},
                      {"read_bandwidth_gb_per_s", read_bandwidth / 1e9},
                      {"bandwidth_bound_tokens_per_second", bound},
                      {"fraction_of_bound", (1.0 / decode_s) / bound}};
  if (dev.is_cuda()) r["peak_allocated_gib"] = cuda_peak_allocated_gib();
  else r["peak_rss_gib"] = peak_rss / double(1u << 30);
  add_moe_forwards(r, moe_path_counts(*model));
  return r;
}

}  // namespace

int run_bench(int argc, char** argv) {
  cxxopts::Options opts(argv[0], "Measure throughput. WHAT is `matmul` (GEMM GFLOP/s, fp32 or --dtype bf16), `forward` (model "
                                 "tokens/s on random text; add --backward for a training-style step) or `train` (whole "
                                 "optimizer steps of the config's stage on its data, with the model-FLOPs utilisation "
                                 "against a GEMM of the step's dtype measured in the same run) or `nf4` (an NF4 projection, "
                                 "dequantisation included, against the fp32 one of the same shape) or `decode` (batch-1 "
                                 "KV-cached decoding against the memory-bandwidth bound, and prompt tokens/s).");
  opts.positional_help("WHAT");
  opts.add_options()("what", "matmul | forward | train | nf4 | decode", cxxopts::value<std::string>())(
      "config", "model config for `forward` (e.g. configs/small.json)", cxxopts::value<std::string>())(
      "size", "matrix side N for `matmul`", cxxopts::value<int64_t>()->default_value("1024"))(
      "batch", "sequences per step for `forward`", cxxopts::value<int64_t>()->default_value("4"))(
      "seq", "tokens per sequence for `forward`", cxxopts::value<int64_t>()->default_value("128"))(
      "steps", "timed repetitions (after one warm-up; `train`: after --warmup steps)", cxxopts::value<int64_t>()->default_value("5"))(
      "tokens", "rows of x for `nf4`", cxxopts::value<int64_t>()->default_value("512"))(
      "in", "input features for `nf4` (a multiple of 64)", cxxopts::value<int64_t>()->default_value("2048"))(
      "out", "output features for `nf4`", cxxopts::value<int64_t>()->default_value("768"))(
      "weights", "`decode`: nf4, bf16 or fp32 weights", cxxopts::value<std::string>()->default_value("nf4"))(
      "prompt", "`decode`: prompt tokens processed before decoding", cxxopts::value<int64_t>()->default_value("512"))(
      "new-tokens", "`decode`: timed decoded tokens (after one warm-up)", cxxopts::value<int64_t>()->default_value("32"))(
      "backward", "also run backward (forward + backward = one training step without the optimizer)")(
      "device", "cpu, cuda or cuda:N (overrides runtime.device)", cxxopts::value<std::string>())(
      "dtype", "fp32 or bf16 (bf16 autocast on CUDA, bf16 GEMMs for `matmul`; overrides runtime.dtype)",
      cxxopts::value<std::string>())(
      "threads", "LibTorch intra-op threads, 0 = all cores (overrides runtime.threads)", cxxopts::value<int64_t>())(
      "blas-threads", "OpenBLAS threads (overrides runtime.blas_threads)", cxxopts::value<int64_t>())(
      "moe-dispatch", "auto, loop or grouped: how MoE layers run their experts (overrides runtime.moe_dispatch)",
      cxxopts::value<std::string>())(
      "base", "QLoRA base checkpoint for `train` with a lora config (sets train.base_checkpoint)",
      cxxopts::value<std::string>())(
      "warmup", "untimed optimizer steps before the timed ones for `train`", cxxopts::value<int64_t>()->default_value("3"))(
      "profile", "`train`: write the timed steps' LibTorch ops as a Chrome trace to this file", cxxopts::value<std::string>())(
      "json", "print one JSON object")("h,help", "show this help");
  opts.parse_positional({"what"});
  auto args = opts.parse(argc, argv);
  if (args.count("help") || !args.count("what")) {
    std::cout << opts.help() << "\nExamples:\n  omnilite bench matmul --size 1024 --blas-threads 2\n"
                 "  omnilite bench forward --config configs/small.json --backward --threads 2 --blas-threads 1\n"
                 "  omnilite bench train --config configs/small.json --steps 20\n"
                 "  omnilite bench nf4 --tokens 512 --in 2048 --out 768 --steps 50\n"
                 "  omnilite bench decode --config configs/omni-lite.json --weights nf4 --prompt 512 --new-tokens 32\n";
    return args.count("help") ? 0 : 2;
  }
  const std::string what = args["what"].as<std::string>();
  if (what != "matmul" && what != "forward" && what != "train" && what != "nf4" && what != "decode")
    throw std::runtime_error("bench: unknown benchmark \"" + what + "\"; expected matmul, forward, train, nf4 or decode");
  const int64_t steps = args["steps"].as<int64_t>();
  if (steps < 1) throw std::runtime_error("bench: --steps must be >= 1, got " + std::to_string(steps));

  Config cfg;
  if (args.count("config")) cfg = load_config_file(args["config"].as<std::string>());
  else if (what != "matmul" && what != "nf4") throw std::runtime_error("bench " + what + ": --config FILE is required");
  if (args.count("device")) cfg.runtime.device = args["device"].as<std::string>();
  if (args.count("dtype")) cfg.runtime.dtype = args["dtype"].as<std::string>();
  if (args.count("threads")) cfg.runtime.threads = args["threads"].as<int64_t>();
  if (args.count("blas-threads")) cfg.runtime.blas_threads = args["blas-threads"].as<int64_t>();
  if (args.count("moe-dispatch")) cfg.runtime.moe_dispatch = args["moe-dispatch"].as<std::string>();
  if (args.count("base")) cfg.train.base_checkpoint = args["base"].as<std::string>();
  validate(cfg);
  const torch::Device dev = apply_runtime(cfg.runtime);

  nlohmann::json result = {{"benchmark", what},
                           {"device", dev.str()},
                           {"threads", torch::get_num_threads()},
                           {"blas_threads", blas_threads_in_use()},
                           {"moe_dispatch", cfg.runtime.moe_dispatch}};
  // The compute dtype: bf16 only under CUDA autocast (runtime.dtype = bf16 on a GPU) or for `matmul --dtype bf16`.
  const bool bf16 = cfg.runtime.dtype == "bf16";
  if (what == "matmul") {
    const int64_t n = args["size"].as<int64_t>();
    const double flops = matmul_flops(dev, n, steps, bf16 ? torch::kBFloat16 : torch::kFloat32);
    result["size"] = n;
    result["dtype"] = cfg.runtime.dtype;
    result["seconds_per_matmul"] = 2.0 * static_cast<double>(n * n * n) / flops;
    result["gflops"] = flops / 1e9;
  } else if (what == "nf4") {
    const int64_t tokens = args["tokens"].as<int64_t>();
    if (tokens < 1) throw std::runtime_error("bench nf4: --tokens must be >= 1, got " + std::to_string(tokens));
    const auto r = bench_nf4(dev, tokens, args["in"].as<int64_t>(), args["out"].as<int64_t>(), steps);
    result.update(r);
  } else if (what == "decode") {
    result["config"] = args["config"].as<std::string>();
    result.update(bench_decode(cfg, dev, args["weights"].as<std::string>(), args["prompt"].as<int64_t>(),
                               args["new-tokens"].as<int64_t>()));
  } else if (what == "train") {
    // MFU against a GEMM of the dtype the step computes in
    const bool bf16_step = bf16 && dev.is_cuda();
    const auto rate = step_matmul_rate(dev, bf16_step);
    result.update(rate.json);
    const auto r = bench_train_steps(cfg, steps, args["warmup"].as<int64_t>(),
                                     args.count("profile") ? args["profile"].as<std::string>() : "");
    result["config"] = args["config"].as<std::string>();
    result["stage"] = cfg.train.stage;
    result["steps"] = steps;
    result["seconds_per_step"] = r.seconds_per_step;
    result[cfg.train.stage == "omni" ? "tokens_per_step" : "images_per_step"] = r.units_per_step;
    result[cfg.train.stage == "omni" ? "tokens_per_second" : "images_per_second"] = r.units_per_s;
    result["data_wait_frac"] = r.data_wait_frac;
    add_moe_forwards(result, r.moe_forwards);
    if (cfg.train.stage == "omni") {
      const double per_token = train_flops_per_token(cfg.model, cfg.train.seq_len);
      result["active_matmul_params"] = count_parameters(cfg.model).active_matmul;
      result["model_flops_per_token"] = per_token;
      result["model_gflops_per_s"] = per_token * r.units_per_s / 1e9;
      result["mfu"] = per_token * r.units_per_s / rate.flops;
    }
  } else {
    const int64_t B = args["batch"].as<int64_t>(), T = args["seq"].as<int64_t>();
    const bool backward = args.count("backward") > 0;
    OmniLite model(cfg.model);
    model->to(dev);
    set_moe_dispatch(*model, parse_moe_dispatch(cfg.runtime.moe_dispatch));
    AutocastGuard autocast(dev.is_cuda() && cfg.runtime.dtype == "bf16");
    const int64_t lo = 16;  // skip the special-token ids
    auto tokens = torch::randint(lo, cfg.model.text.vocab_size, {B, T}, torch::TensorOptions().dtype(torch::kInt64).device(dev));
    auto step = [&] {
      if (backward) {
        model->zero_grad();
        auto out = model->forward({tokens});
        auto logits = out.logits.narrow(1, 0, T - 1).reshape({-1, cfg.model.text.vocab_size});
        torch::nn::functional::cross_entropy(logits.to(torch::kFloat32), tokens.narrow(1, 1, T - 1).reshape(-1))
            .backward();
      } else {
        torch::NoGradGuard ng;
        model->forward({tokens});
      }
    };
    step();  // warm-up
    synchronize(dev);
    const auto t0 = Clock::now();
    for (int64_t i = 0; i < steps; ++i) step();
    synchronize(dev);
    const double s = seconds_since(t0) / static_cast<double>(steps);
    // Model FLOPs (PaLM's count; a forward pass is a third of forward + backward) against the GEMM rate of the
    // compute dtype, measured after the steps so that the model's memory is already taken.
    const auto rate = step_matmul_rate(dev, dev.is_cuda() && cfg.runtime.dtype == "bf16");
    const double per_token = train_flops_per_token(cfg.model, T) / (backward ? 1.0 : 3.0);
    result.update(rate.json);
    result["model_flops_per_token"] = per_token;
    result["model_gflops_per_s"] = per_token * static_cast<double>(B * T) / s / 1e9;
    result["mfu"] = per_token * static_cast<double>(B * T) / s / rate.flops;
    add_moe_forwards(result, moe_path_counts(*model));
    result["config"] = args["config"].as<std::string>();
    result["batch"] = B;
    result["seq"] = T;
    result["backward"] = backward;
    result["dtype"] = cfg.runtime.dtype;
    result["seconds_per_step"] = s;
    result["tokens_per_second"] = static_cast<double>(B * T) / s;
    if (dev.is_cuda()) result["peak_allocated_gib"] = cuda_peak_allocated_gib();
  }
  if (args.count("json")) {
    std::cout << result.dump() << "\n";
  } else {
    for (auto it = result.begin(); it != result.end(); ++it) std::cout << it.key() << ": " << it.value() << "\n";
  }
  return 0;
}

}  // namespace omnilite::cli
