// omnilite init: a full-size, randomly initialised checkpoint written piece by piece (a base for QLoRA tests and
// benchmarks, and the start of a pretraining run's weights).
#include <chrono>
#include <iostream>

#include <cxxopts.hpp>

#include "omnilite/cli/commands.h"
#include "omnilite/config.h"
#include "omnilite/io/init_checkpoint.h"
#include "omnilite/log.h"
#include "omnilite/runtime.h"

namespace omnilite::cli {

torch::ScalarType parse_storage_dtype(const std::string& flag, const std::string& value) {
  if (value == "bf16") return torch::kBFloat16;
  if (value == "fp32") return torch::kFloat32;
  throw std::runtime_error(flag + " \"" + value + "\": expected bf16 or fp32");
}

int run_init(int argc, char** argv) {
  cxxopts::Options opts(argv[0], "Write a full-size checkpoint of a config's model, one piece (ViT, decoder layer, "
                                 "embedding table, ...) at a time, so peak memory stays near one piece (~0.4 GB for a "
                                 "full-size decoder layer) instead of the checkpoint's size. Parts named by --from come "
                                 "from pretrained Hugging Face checkpoints (checked against the config first), the rest is "
                                 "randomly initialised. The folder holds model.safetensors, state.json and config.json "
                                 "(the config to train with); use it as a base (train --base).");
  opts.add_options()("config", "config JSON whose model section is written (e.g. configs/omni-lite.json)",
                     cxxopts::value<std::string>())(
      "out", "folder to create; refused if it already holds model.safetensors", cxxopts::value<std::string>())(
      "dtype", "storage type of the weights: bf16 or fp32", cxxopts::value<std::string>()->default_value("bf16"))(
      "seed", "initialisation seed (default runtime.seed)", cxxopts::value<uint64_t>())(
      "from", "PART=SOURCE, repeatable: text=DIR (an HF MixtralForCausalLM folder: embedding, the first "
              "model.text.num_layers layers, norm, LM head; its tokenizer.model too), vision=DIR (an HF "
              "CLIPVisionModel / CLIPModel folder: the first model.vision.depth layers), tokenizer=FILE (a Llama / "
              "Mistral SentencePiece model, extended with the image markers)",
      cxxopts::value<std::vector<std::string>>())("h,help", "show this help");
  add_thread_flags(opts);
  auto args = opts.parse(argc, argv);
  if (args.count("help") || !args.count("config") || !args.count("out")) {
    std::cout << opts.help() << "\nExample:\n  omnilite init --config configs/omni-lite.json --out runs/init-bf16 --dtype bf16\n"
                 "  (4.9 GB on disk for the 2.46B-parameter model; then: omnilite train --config "
                 "configs/qlora-omni-lite.json --base runs/init-bf16)\n"
                 "  omnilite init --config configs/llava-stage1.json --out runs/llava-init --from vision=clip-vit-large-patch14 "
                 "--from text=my-mixtral\n"
                 "  (then: omnilite train --config runs/llava-init/config.json --base runs/llava-init; docs/training.md)\n";
    return args.count("help") ? 0 : 2;
  }
  Config cfg = load_config_file(args["config"].as<std::string>());
  apply_thread_flags(args, cfg.runtime);
  apply_runtime(cfg.runtime);
  io::InitCheckpointOptions o;
  o.out_dir = args["out"].as<std::string>();
  o.dtype = parse_storage_dtype("--dtype", args["dtype"].as<std::string>());
  o.seed = args.count("seed") ? args["seed"].as<uint64_t>() : static_cast<uint64_t>(cfg.runtime.seed);
  if (args.count("from")) o.from = io::parse_part_sources(args["from"].as<std::vector<std::string>>());
  const auto t0 = std::chrono::steady_clock::now();
  auto elapsed = [&] { return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(); };
  const auto r = io::write_init_checkpoint(cfg, o, [&](int64_t done, int64_t all) {
    log::info(log::format("init: piece %lld/%lld written (%.0f s)", static_cast<long long>(done),
                          static_cast<long long>(all), elapsed()));
  });
  log::info(log::format("init: %s/model.safetensors: %lld tensors (%lld from --from sources), %lld values, %.2f GB, "
                        "%.0f s; its config: %s/config.json", o.out_dir.c_str(), static_cast<long long>(r.tensors),
                        static_cast<long long>(r.imported), static_cast<long long>(r.params), r.bytes / 1e9, elapsed(),
                        o.out_dir.c_str()));
  return 0;
}

}  // namespace omnilite::cli
