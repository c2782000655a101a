// omnilite export: checkpoints for inference and other tools.
//   --adapter DIR --merge : a QLoRA adapter merged into its dequantised NF4 base -> plain full-precision weights
//   (no adapter)          : the checkpoint's weights re-stored as --dtype (e.g. a bf16 init -> fp32)
// The output folder holds model.safetensors and state.json (config without the lora section), so `eval`, `train
// --base` and later exports read it like any checkpoint.
#include <filesystem>
#include <iostream>

#include <cxxopts.hpp>
#include <nlohmann/json.hpp>

#include "omnilite/cli/commands.h"
#include "omnilite/config.h"
#include "omnilite/io/adapter.h"
#include "omnilite/io/checkpoint.h"
#include "omnilite/io/safetensors.h"
#include "omnilite/log.h"
#include "omnilite/modules/omnilite.h"
#include "omnilite/modules/qlora_builder.h"
#include "omnilite/runtime.h"
#include "omnilite/train/trainer.h"

namespace omnilite::cli {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// The weights file of a checkpoint argument: a .safetensors file, a checkpoint folder or a run folder (newest).
std::string weights_file(const std::string& arg, const std::string& flag) {
  if (fs::is_regular_file(arg)) return arg;
  if (!fs::exists(arg)) throw std::runtime_error(flag + " \"" + arg + "\" does not exist");
  const std::string dir = fs::exists(arg + "/model.safetensors") ? arg : latest_checkpoint(arg);
  if (!fs::exists(dir + "/model.safetensors"))
    throw std::runtime_error(flag + " \"" + arg + "\": no model.safetensors in \"" + dir + "\"; hint: a QLoRA run's "
                             "checkpoints hold adapters only: pass the run as --adapter and its base as --checkpoint");
  return dir + "/model.safetensors";
}

void write_state(const std::string& out, Config cfg, int64_t step, const json& provenance) {
  cfg.lora.enabled = false;  // the exported weights are those of the plain model
  cfg.train.base_checkpoint.clear();
  json state = {{"version", io::kCheckpointVersion}, {"stage", "omni"}, {"step", step}, {"config", to_json(cfg)},
                {"export", provenance}};
  io::write_file_synced(out + "/state.json", state.dump(2));
}

}  // namespace

int run_export(int argc, char** argv) {
  cxxopts::Options opts(argv[0], "Export a checkpoint. With --adapter DIR --merge: the QLoRA adapters of a fine-tuning "
                                 "run are merged into the dequantised NF4 base (W = dequant(W_nf4) + alpha/r B A, the "
                                 "weights training saw) and written as plain weights. Without --adapter: the "
                                 "checkpoint's weights re-stored as --dtype. The output folder is a checkpoint that "
                                 "eval, train --base and export read.");
  opts.add_options()("checkpoint", "base checkpoint: run folder (newest checkpoint), checkpoint folder, init folder or "
                                   ".safetensors file", cxxopts::value<std::string>())(
      "adapter", "QLoRA run folder or checkpoint folder holding adapter_model.safetensors", cxxopts::value<std::string>())(
      "merge", "merge the adapters into the base (required with --adapter)")(
      "out", "output folder (model.safetensors + state.json; files are replaced atomically)", cxxopts::value<std::string>())(
      "dtype", "storage type of floating tensors: fp32 or bf16", cxxopts::value<std::string>()->default_value("fp32"))(
      "h,help", "show this help");
  auto args = opts.parse(argc, argv);
  if (args.count("help") || !args.count("checkpoint") || !args.count("out")) {
    std::cout << opts.help()
              << "\nExamples:\n  omnilite export --checkpoint runs/init-bf16 --adapter runs/qlora --merge --out runs/merged\n"
                 "  omnilite export --checkpoint runs/init-bf16 --out runs/init-fp32 --dtype fp32\n";
    return args.count("help") ? 0 : 2;
  }
  const std::string base_arg = args["checkpoint"].as<std::string>(), out = args["out"].as<std::string>();
  const auto dtype = parse_storage_dtype("--dtype", args["dtype"].as<std::string>());
  const std::string base_file = weights_file(base_arg, "--checkpoint");
  fs::create_directories(out);
  if (fs::exists(out + "/model.safetensors") && fs::equivalent(out + "/model.safetensors", base_file))
    throw std::runtime_error("--out \"" + out + "\" is the checkpoint being read; hint: choose another folder");

  if (args.count("adapter")) {
    if (!args.count("merge"))
      throw std::runtime_error("--adapter without --merge: the adapter folder already is the PEFT export; hint: add "
                               "--merge to write merged full-precision weights");
    const std::string adir = latest_checkpoint(args["adapter"].as<std::string>());
    if (!fs::exists(adir + "/adapter_model.safetensors"))
      throw std::runtime_error("--adapter \"" + adir + "\" holds no adapter_model.safetensors; hint: pass the run "
                               "folder or a checkpoint of a lora.enabled run");
    const auto state = io::read_checkpoint_state(adir);
    const Config cfg = parse_config(state["config"]);
    if (!cfg.lora.enabled)
      throw std::runtime_error("--adapter \"" + adir + "\": its config has lora.enabled = false");
    apply_runtime(cfg.runtime);
    OmniLite model(cfg.model, *make_linear_builder(cfg));
    io::load_base_weights(*model, base_file);
    io::load_adapter(*model, adir);
    model->eval();
    const int64_t n = io::write_merged_weights(*model, out + "/model.safetensors", dtype,
                                               {{"format", "pt"}, {"omnilite.merged_adapter", adir}});
    write_state(out, cfg, state.value("step", int64_t{0}), {{"base", base_file}, {"adapter", adir}, {"merged", true}});
    log::info(log::format("export: %lld tensors merged from %s + %s -> %s/model.safetensors", static_cast<long long>(n),
                          base_file.c_str(), adir.c_str(), out.c_str()));
    return 0;
  }
  // Plain re-store, tensor by tensor.
  const std::string cdir = fs::path(base_file).parent_path().string();
  const auto state = io::read_checkpoint_state(cdir.empty() ? "." : cdir);
  const Config cfg = parse_config(state["config"]);
  io::SafetensorsReader r(base_file);
  r.verify_checksum();
  std::vector<io::TensorSpec> specs;
  for (const auto& [name, e] : r.tensors())
    specs.push_back({name, c10::isFloatingType(e.dtype) ? dtype : e.dtype, e.shape});
  io::SafetensorsWriter w(out + "/model.safetensors", specs, {{"format", "pt"}});
  for (const auto& s : specs) w.write(s.name, r.load(s.name).to(s.dtype));
  w.commit();
  write_state(out, cfg, state.value("step", int64_t{0}), {{"base", base_file}, {"merged", false}});
  log::info(log::format("export: %lld tensors -> %s/model.safetensors", static_cast<long long>(specs.size()), out.c_str()));
  return 0;
}

}  // namespace omnilite::cli
