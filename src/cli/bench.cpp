// omnilite bench: measured throughput figures (docs/benchmarks.md records them with the machine and command).
//   matmul  : fp32 GEMM GFLOP/s at N^3, the BLAS check (reference BLAS is ~19x slower than OpenBLAS)
//   forward : tokens/s of the model's forward (and backward with --backward) on random text, for a config
//   nf4     : an NF4 projection (dequantise + matmul; default the expert shape 512 x 2048 -> 768) against the fp32
//             projection of the same shape
//   train   : whole optimizer steps of a config's stage on its data, and the model-FLOPs utilisation
//             MFU = 6 * N * tokens/s / (fp32 GEMM FLOP/s at 2048^3 measured in the same run), N = matmul parameters
//             a text token passes through (active backbone + LM head)
#include <chrono>
#include <cstdio>
#include <iostream>

#include <cxxopts.hpp>
#include <nlohmann/json.hpp>

#include "omnilite/cli/commands.h"
#include "omnilite/config.h"
#include "omnilite/modules/nf4_linear.h"
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

// fp32 GEMM FLOP/s at n^3 (one warm-up, then `reps` timed products).
double matmul_flops(const torch::Device& dev, int64_t n, int64_t reps) {
  auto a = torch::randn({n, n}, torch::TensorOptions().device(dev)), b = torch::randn_like(a);
  torch::NoGradGuard ng;
  auto c = torch::matmul(a, b);
  synchronize(dev);
  const auto t0 = Clock::now();
  for (int64_t i = 0; i < reps; ++i) c = torch::matmul(a, b);
  synchronize(dev);
  return 2.0 * static_cast<double>(n * n * n) * static_cast<double>(reps) / seconds_since(t0);
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

}  // namespace

int run_bench(int argc, char** argv) {
  cxxopts::Options opts(argv[0], "Measure throughput. WHAT is `matmul` (fp32 GEMM GFLOP/s), `forward` (model "
                                 "tokens/s on random text; add --backward for a training-style step) or `train` (whole "
                                 "optimizer steps of the config's stage on its data, with the model-FLOPs utilisation "
                                 "against a 2048^3 fp32 GEMM measured in the same run) or `nf4` (an NF4 projection, "
                                 "dequantisation included, against the fp32 one of the same shape).");
  opts.positional_help("WHAT");
  opts.add_options()("what", "matmul | forward | train | nf4", cxxopts::value<std::string>())(
      "config", "model config for `forward` (e.g. configs/small.json)", cxxopts::value<std::string>())(
      "size", "matrix side N for `matmul`", cxxopts::value<int64_t>()->default_value("1024"))(
      "batch", "sequences per step for `forward`", cxxopts::value<int64_t>()->default_value("4"))(
      "seq", "tokens per sequence for `forward`", cxxopts::value<int64_t>()->default_value("128"))(
      "steps", "timed repetitions (after one warm-up; `train`: after --warmup steps)", cxxopts::value<int64_t>()->default_value("5"))(
      "tokens", "rows of x for `nf4`", cxxopts::value<int64_t>()->default_value("512"))(
      "in", "input features for `nf4` (a multiple of 64)", cxxopts::value<int64_t>()->default_value("2048"))(
      "out", "output features for `nf4`", cxxopts::value<int64_t>()->default_value("768"))(
      "backward", "also run backward (forward + backward = one training step without the optimizer)")(
      "device", "cpu, cuda or cuda:N (overrides runtime.device)", cxxopts::value<std::string>())(
      "dtype", "fp32 or bf16 (bf16 autocast on CUDA; overrides runtime.dtype)", cxxopts::value<std::string>())(
      "threads", "LibTorch intra-op threads, 0 = all cores (overrides runtime.threads)", cxxopts::value<int64_t>())(
      "blas-threads", "OpenBLAS threads (overrides runtime.blas_threads)", cxxopts::value<int64_t>())(
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
                 "  omnilite bench nf4 --tokens 512 --in 2048 --out 768 --steps 50\n";
    return args.count("help") ? 0 : 2;
  }
  const std::string what = args["what"].as<std::string>();
  if (what != "matmul" && what != "forward" && what != "train" && what != "nf4")
    throw std::runtime_error("bench: unknown benchmark \"" + what + "\"; expected matmul, forward, train or nf4");
  const int64_t steps = args["steps"].as<int64_t>();
  if (steps < 1) throw std::runtime_error("bench: --steps must be >= 1, got " + std::to_string(steps));

  Config cfg;
  if (args.count("config")) cfg = load_config_file(args["config"].as<std::string>());
  else if (what != "matmul" && what != "nf4") throw std::runtime_error("bench " + what + ": --config FILE is required");
  if (args.count("device")) cfg.runtime.device = args["device"].as<std::string>();
  if (args.count("dtype")) cfg.runtime.dtype = args["dtype"].as<std::string>();
  if (args.count("threads")) cfg.runtime.threads = args["threads"].as<int64_t>();
  if (args.count("blas-threads")) cfg.runtime.blas_threads = args["blas-threads"].as<int64_t>();
  if (args.count("base")) cfg.train.base_checkpoint = args["base"].as<std::string>();
  validate(cfg);
  const torch::Device dev = apply_runtime(cfg.runtime);

  nlohmann::json result = {{"benchmark", what},
                           {"device", dev.str()},
                           {"threads", torch::get_num_threads()},
                           {"blas_threads", blas_threads_in_use()}};
  if (what == "matmul") {
    const int64_t n = args["size"].as<int64_t>();
    const double flops = matmul_flops(dev, n, steps);
    result["size"] = n;
    result["seconds_per_matmul"] = 2.0 * static_cast<double>(n * n * n) / flops;
    result["gflops"] = flops / 1e9;
  } else if (what == "nf4") {
    const int64_t tokens = args["tokens"].as<int64_t>();
    if (tokens < 1) throw std::runtime_error("bench nf4: --tokens must be >= 1, got " + std::to_string(tokens));
    const auto r = bench_nf4(dev, tokens, args["in"].as<int64_t>(), args["out"].as<int64_t>(), steps);
    result.update(r);
  } else if (what == "train") {
    const double peak = matmul_flops(dev, 2048, 5);
    const auto r = bench_train_steps(cfg, steps, args["warmup"].as<int64_t>(),
                                     args.count("profile") ? args["profile"].as<std::string>() : "");
    const auto pc = count_parameters(cfg.model);
    const int64_t lm_head = cfg.model.text.tie_word_embeddings ? 0 : cfg.model.text.vocab_size * cfg.model.text.hidden_size;
    const double n_active = static_cast<double>(pc.active_backbone + lm_head);
    result["config"] = args["config"].as<std::string>();
    result["stage"] = cfg.train.stage;
    result["steps"] = steps;
    result["seconds_per_step"] = r.seconds_per_step;
    result[cfg.train.stage == "omni" ? "tokens_per_step" : "images_per_step"] = r.units_per_step;
    result[cfg.train.stage == "omni" ? "tokens_per_second" : "images_per_second"] = r.units_per_s;
    result["data_wait_frac"] = r.data_wait_frac;
    result["matmul_2048_gflops"] = peak / 1e9;
    if (cfg.train.stage == "omni") {
      result["active_matmul_params"] = n_active;
      result["model_gflops_per_s"] = 6.0 * n_active * r.units_per_s / 1e9;
      result["mfu"] = 6.0 * n_active * r.units_per_s / peak;
    }
  } else {
    const int64_t B = args["batch"].as<int64_t>(), T = args["seq"].as<int64_t>();
    const bool backward = args.count("backward") > 0;
    OmniLite model(cfg.model);
    model->to(dev);
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
