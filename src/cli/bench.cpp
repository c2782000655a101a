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
//             plus the KV cache) / read bandwidth of a large buffer measured in the same run (a decoded token
//             reads its weights, it does not copy them); and prompt tokens/s
//   loader  : the image-caption loader alone: micro-batches of the config's data.image_train (caption and generation
//             samples, decoded, resized and tokenized) built by train.loader_threads threads, images/s, and the
//             start-up (indexing) time
#include <chrono>
#include <iostream>

#include <cxxopts.hpp>
#include <nlohmann/json.hpp>

#include "omnilite/cli/commands.h"
#include "omnilite/config.h"
#include "omnilite/data/mm_batch.h"
#include "omnilite/data/prefetcher.h"
#include "omnilite/infer/bench.h"
#include "omnilite/modules/param_count.h"
#include "omnilite/runtime.h"
#include "omnilite/train/trainer.h"

namespace omnilite::cli {
namespace {

// bench loader: `steps` micro-batches of the image-caption sampler through the training loader (Prefetcher).
nlohmann::json bench_image_loader(const Config& cfg, int64_t steps) {
  const auto& tr = cfg.train;
  const int64_t per_micro = tr.caption_batch_size + tr.gen_batch_size;
  if (per_micro < 1)
    throw std::runtime_error("bench loader: train.caption_batch_size + train.gen_batch_size is 0; hint: --set "
                             "train.caption_batch_size=16");
  using clock = std::chrono::steady_clock;
  const auto t0 = clock::now();
  const Tokenizer tok(cfg.data.tokenizer);
  const auto images = read_training_images(cfg.data, std::max(cfg.model.vision.image_size, cfg.model.vqvae.image_size));
  const MultimodalSampler mm(images, tok, cfg.model, tr, tr.seed);
  const double open_s = std::chrono::duration<double>(clock::now() - t0).count();
  int64_t bad = 0;
  Prefetcher<MultimodalBatch> loader([&](int64_t m) { return mm.get(m); }, tr.loader_threads,
                                     2 * tr.loader_threads + 1, 0);
  loader.get(0);  // warm-up
  const auto t1 = clock::now();
  for (int64_t m = 1; m <= steps; ++m) bad += loader.get(m).bad_images;
  const double s = std::chrono::duration<double>(clock::now() - t1).count();
  return {{"samples", images.size()},
          {"streamed", images.shards != nullptr},
          {"loader_threads", tr.loader_threads},
          {"images_per_micro_batch", per_micro},
          {"open_seconds", open_s},
          {"images_per_second", static_cast<double>(steps * per_micro) / s},
          {"bad_images", bad}};
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
  opts.add_options()("what", "matmul | forward | train | nf4 | decode | loader", cxxopts::value<std::string>())(
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
      "moe-dispatch", "auto, loop or grouped: how MoE layers run their experts (overrides runtime.moe_dispatch)",
      cxxopts::value<std::string>())(
      "nf4-activations", "`decode` with nf4 weights: fp32 (exact) or int16 (inputs rounded to 16 bits per 64 values: "
      "faster; overrides runtime.nf4_activations)", cxxopts::value<std::string>())(
      "base", "QLoRA base checkpoint for `train` with a lora config (sets train.base_checkpoint)",
      cxxopts::value<std::string>())(
      "warmup", "untimed optimizer steps before the timed ones for `train`", cxxopts::value<int64_t>()->default_value("3"))(
      "profile", "`train`: write the timed steps' LibTorch ops as a Chrome trace to this file", cxxopts::value<std::string>())(
      "set", "`loader`, `train`, `decode`: override a config value, KEY=VALUE (repeatable)",
      cxxopts::value<std::vector<std::string>>())(
      "json", "print one JSON object")("h,help", "show this help");
  add_thread_flags(opts);
  opts.parse_positional({"what"});
  auto args = opts.parse(argc, argv);
  if (args.count("help") || !args.count("what")) {
    std::cout << opts.help() << "\nExamples:\n  omnilite bench matmul --size 1024 --blas-threads 2\n"
                 "  omnilite bench forward --config configs/small.json --backward --threads 2 --blas-threads 1\n"
                 "  omnilite bench train --config configs/small.json --steps 20\n"
                 "  omnilite bench nf4 --tokens 512 --in 2048 --out 768 --steps 50\n"
                 "  omnilite bench decode --config configs/omni-lite.json --weights nf4 --prompt 512 --new-tokens 32\n"
                 "  omnilite bench decode --config configs/omni-lite.json --weights nf4 --nf4-activations int16\n"
                 "  omnilite bench loader --config configs/small.json --set 'data.image_train=[\"data/shards/fmnist\"]'"
                 " --steps 200\n";
    return args.count("help") ? 0 : 2;
  }
  const std::string what = args["what"].as<std::string>();
  if (what != "matmul" && what != "forward" && what != "train" && what != "nf4" && what != "decode" && what != "loader")
    throw std::runtime_error("bench: unknown benchmark \"" + what + "\"; expected matmul, forward, train, nf4, decode "
                             "or loader");
  const int64_t steps = args["steps"].as<int64_t>();
  if (steps < 1) throw std::runtime_error("bench: --steps must be >= 1, got " + std::to_string(steps));

  Config cfg;
  if (args.count("config") && args.count("set")) {
    auto j = read_config_json(args["config"].as<std::string>());
    for (const auto& kv : args["set"].as<std::vector<std::string>>()) apply_config_override(j, kv);
    cfg = parse_config(j);
  } else if (args.count("config")) {
    cfg = load_config_file(args["config"].as<std::string>());
  }
  else if (what != "matmul" && what != "nf4") throw std::runtime_error("bench " + what + ": --config FILE is required");
  if (args.count("device")) cfg.runtime.device = args["device"].as<std::string>();
  if (args.count("dtype")) cfg.runtime.dtype = args["dtype"].as<std::string>();
  apply_thread_flags(args, cfg.runtime);
  if (args.count("moe-dispatch")) cfg.runtime.moe_dispatch = args["moe-dispatch"].as<std::string>();
  if (args.count("nf4-activations")) cfg.runtime.nf4_activations = args["nf4-activations"].as<std::string>();
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
  } else if (what == "loader") {
    result["config"] = args["config"].as<std::string>();
    result.update(bench_image_loader(cfg, steps));
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
    result["config"] = args["config"].as<std::string>();
    result.update(bench_forward(cfg, dev, args["batch"].as<int64_t>(), args["seq"].as<int64_t>(), steps,
                                args.count("backward") > 0));
  }
  if (args.count("json")) {
    std::cout << result.dump() << "\n";
  } else {
    for (auto it = result.begin(); it != result.end(); ++it) std::cout << it.key() << ": " << it.value() << "\n";
  }
  return 0;
}

}  // namespace omnilite::cli
