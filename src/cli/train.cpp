// omnilite train: pretraining from a config (see include/omnilite/train/trainer.h for what a step does).
#include <fstream>
#include <iostream>

#include <cxxopts.hpp>
#include <nlohmann/json.hpp>

#include "omnilite/cli/commands.h"
#include "omnilite/config.h"
#include "omnilite/io/checkpoint.h"
#include "omnilite/log.h"
#include "omnilite/runtime.h"
#include "omnilite/train/trainer.h"

namespace omnilite::cli {

int run_train(int argc, char** argv) {
  cxxopts::Options opts(argv[0], "Train from a config. train.stage chooses what: \"omni\" (the model: CLM on text and "
                                 "captions + rectified flow on generated images + MoE balancing), \"vqvae\" (the VQ-VAE "
                                 "whose frozen encoder supplies the flow targets) or \"classifier\" (the CNN that judges "
                                 "generated images in eval). Writes metrics.jsonl and atomic checkpoints into the run folder.");
  opts.add_options()("config", "config JSON (e.g. configs/small.json)", cxxopts::value<std::string>())(
      "out", "run folder (metrics.jsonl, config.json, checkpoints/); default runs/default, or with --resume the "
             "resumed run's folder", cxxopts::value<std::string>())(
      "max-steps", "stop after this many steps in total (default train.steps; the LR schedule always spans train.steps)", cxxopts::value<int64_t>())(
      "resume", "run folder or checkpoint folder to continue from exactly (in its run folder unless --out is given)",
      cxxopts::value<std::string>())(
      "base", "weights to start from (checkpoint or export folder, or .safetensors; sets train.base_checkpoint): "
             "the frozen QLoRA base with a lora section, else a full fine-tune of every weight", cxxopts::value<std::string>())(
      "set", "override a config value by dotted key, validated like the file: --set train.batch_size=4 "
             "(repeatable)", cxxopts::value<std::vector<std::string>>())("h,help", "show this help");
  auto args = opts.parse(argc, argv);
  if (args.count("help") || !args.count("config")) {
    std::cout << opts.help()
              << "\nExamples:\n  omnilite train --config configs/small-vqvae.json --out runs/quickstart-vqvae\n"
                 "  omnilite train --config configs/small.json --out runs/small --max-steps 200\n"
                 "  omnilite train --config configs/small.json --out runs/small --resume runs/small --max-steps 400\n"
                 "  omnilite train --config configs/small.json --set train.batch_size=8 --set train.freeze='[\"vision.*\"]'\n"
                 "  scripts/launch.sh --nproc 2 -- omnilite train --config configs/small.json --out runs/dp\n"
                 "A config may start with \"extends\": \"base.json\" to change only some keys of another. A config\n"
                 "without a \"model\" section trains the model of its train.base_checkpoint (and its data.tokenizer\n"
                 "unless data names one), e.g. after `omnilite init --from` (configs/llava-stage1.json).\n"
                 "Data-parallel: run the same command as N processes (scripts/launch.sh, torchrun, srun); RANK, WORLD_SIZE,\n"
                 "LOCAL_RANK, MASTER_ADDR, MASTER_PORT say who is who; the batch sizes are per rank;\n"
                 "train.zero = 1, 2, 3 shards the optimizer state, then the gradients, then the parameters (2 and 3\n"
                 "write sharded checkpoints that resume at any world size); train.dist_timeout_s bounds every wait\n"
                 "(docs/distributed.md).\n";
    return args.count("help") ? 0 : 2;
  }
  const std::string path = args["config"].as<std::string>();
  auto j = read_config_json(path);
  const bool has_model = j.contains("model");
  auto apply_sets = [&] {
    if (args.count("set"))
      for (const auto& s : args["set"].as<std::vector<std::string>>()) apply_config_override(j, s);
    if (args.count("base")) j["train"]["base_checkpoint"] = args["base"].as<std::string>();
  };
  apply_sets();
  const std::string base = j.contains("train") ? j["train"].value("base_checkpoint", std::string()) : "";
  if (!has_model && !base.empty()) {  // the base's model, with --set model.* applied over it
    j = io::with_base_model(j, base);
    apply_sets();
  }
  const Config cfg = parse_config(j);
  TrainRunOptions run;
  if (args.count("resume")) run.resume_dir = args["resume"].as<std::string>();
  run.out_dir = args.count("out") ? args["out"].as<std::string>()
                : args.count("resume") ? io::run_folder_of(run.resume_dir) : std::string("runs/default");
  if (args.count("max-steps")) run.max_steps = args["max-steps"].as<int64_t>();
  const auto r = train(cfg, run);
  log::info(log::format("done: %lld steps, loss %.4f -> %.4f, last checkpoint %s, peak resident memory %.2f GiB",
                        static_cast<long long>(r.steps_done), r.first_loss, r.last_loss, r.last_checkpoint.c_str(),
                        peak_resident_bytes() / (1024.0 * 1024.0 * 1024.0)));
  if (cfg.runtime.device.rfind("cuda", 0) == 0)
    log::info(log::format("peak allocated CUDA memory %.2f GiB", cuda_peak_allocated_gib()));
  return 0;
}

}  // namespace omnilite::cli
