// omnilite export: checkpoints for inference and other tools.
//   --adapter DIR --merge : a QLoRA adapter merged into its dequantised NF4 base -> plain full-precision weights
//   (no adapter)          : the checkpoint's weights re-stored as --dtype (e.g. a bf16 init -> fp32)
//   --format omnilite     : model.safetensors + state.json (config without the lora section), read by every command
//   --format hf           : the Hugging Face folder of io/hf_export.h (Mixtral names, shards, config.json, tokenizer),
//                           which --checkpoint of every command also reads
//   --format gguf         : the text backbone as llama.cpp's GGUF (io/gguf_export.h), --type f32 ... q4_0
//   --checkpoint X.gguf   : a GGUF imported into an OMNI-LITE checkpoint folder (--format omnilite)
#include <filesystem>
#include <iostream>
#include <sstream>

#include <cxxopts.hpp>
#include <nlohmann/json.hpp>

#include "omnilite/cli/commands.h"
#include "omnilite/config.h"
#include "omnilite/io/adapter.h"
#include "omnilite/io/checkpoint.h"
#include "omnilite/data/text_dataset.h"
#include "omnilite/data/tokenizer.h"
#include "omnilite/io/gguf.h"
#include "omnilite/io/gguf_export.h"
#include "omnilite/io/hf_export.h"
#include "omnilite/io/spm_model.h"
#include "omnilite/io/weights_reader.h"
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

// The weights of a checkpoint argument: a .safetensors file, a folder holding weights (checkpoint, init or export
// folder) or a run folder (its newest checkpoint).
std::string weights_source(const std::string& arg, const std::string& flag) {
  if (!fs::exists(arg)) throw std::runtime_error(flag + " \"" + arg + "\" does not exist");
  if (fs::is_regular_file(arg) || io::has_weights(arg)) return arg;
  const std::string dir = io::latest_checkpoint(arg);
  if (!io::has_weights(dir))
    throw std::runtime_error(flag + " \"" + arg + "\": no model.safetensors in \"" + dir + "\"; hint: a QLoRA run's "
                             "checkpoints hold adapters only: pass the run as --adapter and its base as --checkpoint");
  return dir;
}

// The folder whose state (state.json or an export's config.json) describes `source`.
std::string state_dir(const std::string& source) {
  if (!fs::is_regular_file(source)) return source;
  const std::string dir = fs::path(source).parent_path().string();
  return dir.empty() ? "." : dir;
}

void write_state(const std::string& out, Config cfg, int64_t step, const json& provenance) {
  cfg.lora.enabled = false;  // the exported weights are those of the plain model
  cfg.train.base_checkpoint.clear();
  json state = {{"version", io::kCheckpointVersion}, {"stage", "omni"}, {"step", step}, {"config", to_json(cfg)},
                {"export", provenance}};
  write_file_atomically(out + "/state.json", state.dump(2));
}

// Stores the weights of `source` as `dtype` with their OMNI-LITE names in out/model.safetensors.
int64_t restore_plain(const std::string& source, const std::string& out, torch::ScalarType dtype) {
  io::WeightsReader r(source);
  r.verify_checksum();
  std::vector<io::TensorSpec> specs;
  for (const auto& [name, e] : r.tensors())
    specs.push_back({name, c10::isFloatingType(e.dtype) ? dtype : e.dtype, e.shape});
  io::SafetensorsWriter w(out + "/model.safetensors", specs, {{"format", "pt"}});
  for (const auto& s : specs) w.write(s.name, r.load(s.name).to(s.dtype));
  w.commit();
  return static_cast<int64_t>(specs.size());
}

// --format peft: the adapter of a QLoRA run in PEFT's layout for the hf export's MixtralForCausalLM.
int export_peft(const cxxopts::ParseResult& args, const std::string& out) {
  if (!args.count("adapter"))
    throw std::runtime_error("--format peft needs --adapter RUN (a QLoRA run folder or checkpoint); hint: omnilite "
                             "export --adapter runs/qlora --format peft --out exports/qlora-peft");
  if (args.count("merge")) throw std::runtime_error("--format peft writes the adapter itself; drop --merge");
  const std::string adir = io::latest_checkpoint(args["adapter"].as<std::string>());
  const Config cfg = parse_config(io::read_checkpoint_state(adir)["config"]);
  const auto res = io::write_peft_adapter(adir, cfg, out);
  if (!res.skipped.empty())
    log::warn(log::format("export: %zu adapted modules outside the text backbone (e.g. %s) are not in the PEFT adapter "
                          "(PEFT's MixtralForCausalLM has no such modules); OMNI-LITE's own checkpoint keeps them",
                          res.skipped.size(), res.skipped.front().c_str()));
  log::info(log::format("export: %lld PEFT tensors (r = %lld) -> %s", static_cast<long long>(res.tensors),
                        static_cast<long long>(res.rank), out.c_str()));
  return 0;
}

// The first `limit` non-empty lines of the held-out documents (read as training reads them: .txt or .jsonl).
std::vector<std::string> held_out_lines(const std::vector<std::string>& files, size_t limit) {
  std::vector<std::string> present;
  for (const auto& f : files)
    if (fs::exists(f)) present.push_back(f);
  std::vector<std::string> out;
  for (const auto& doc : read_documents(present).documents) {
    std::stringstream ss(doc);
    for (std::string line; out.size() < limit && std::getline(ss, line);)
      if (!line.empty()) out.push_back(line);
  }
  return out;
}

// What llama.cpp will read of the GGUF's vocabulary: its SPM tokenisation of the held-out lines beside
// SentencePiece's, the ids the model was trained on. A difference is warned about with the measured share.
void check_llama_tokenizer(const Config& cfg) {
  const auto lines = held_out_lines(cfg.data.text_valid, 2000);
  if (lines.empty()) {
    log::warn("export: no held-out text (data.text_valid) to compare llama.cpp's tokenisation with SentencePiece's");
    return;
  }
  const Tokenizer sp(cfg.data.tokenizer);
  const io::SpmModel model = io::read_spm_model(cfg.data.tokenizer);
  const io::LlamaSpmTokenizer llama(model);
  size_t differ = 0;
  std::string example;
  for (const auto& line : lines)
    if (sp.encode(line) != llama.encode(line)) {
      differ += 1;
      if (example.empty()) example = line.substr(0, 60);
    }
  const std::string algo = model.model_type == 1 ? "a unigram model" : model.model_type == 2 ? "a BPE model" : "a model";
  if (differ == 0) {
    log::info(log::format("export: tokenizer (%s): llama.cpp's ids equal SentencePiece's on %zu/%zu held-out lines",
                          algo.c_str(), lines.size(), lines.size()));
    return;
  }
  log::warn(log::format("export: the tokenizer is %s: llama.cpp tokenises SentencePiece vocabularies by score-ordered "
                        "merges and gives other ids than the model was trained on for %zu of %zu held-out lines (%.1f%%; "
                        "e.g. \"%s\"); hint: retrain with `omnilite tokenizer train` (BPE, the default) for a model "
                        "that llama.cpp reads as trained", algo.c_str(), differ, lines.size(),
                        100.0 * static_cast<double>(differ) / static_cast<double>(lines.size()), example.c_str()));
}

// --checkpoint FILE.gguf: into an OMNI-LITE checkpoint folder.
int import_gguf(const cxxopts::ParseResult& args, const std::string& gguf, const std::string& out) {
  if (args["format"].as<std::string>() != "omnilite" || args.count("adapter"))
    throw std::runtime_error("--checkpoint \"" + gguf + "\" is a GGUF: it imports into an OMNI-LITE checkpoint folder "
                             "(--format omnilite, no --adapter); hint: omnilite export --checkpoint " + gguf +
                             " --out runs/imported");
  const std::string mm = args.count("multimodal") ? weights_source(args["multimodal"].as<std::string>(),
                                                                   "--multimodal") : "";
  const auto res = io::import_gguf(gguf, out, mm);
  log::info(log::format("export: %lld text-backbone tensors from %s%s -> %s", static_cast<long long>(res.text_tensors),
                        gguf.c_str(), mm.empty() ? "" : (", the multimodal ones from " + mm).c_str(), out.c_str()));
  if (res.multimodal_initialised)
    log::warn(log::format("export: a GGUF holds the text backbone only: the %lld vision / resampler / flow / VQ-VAE "
                          "tensors are randomly initialised (text tasks only); hint: --multimodal CHECKPOINT takes "
                          "them from the checkpoint the GGUF was exported from", static_cast<long long>(res.other_tensors)));
  return 0;
}

}  // namespace

int run_export(int argc, char** argv) {
  cxxopts::Options opts(argv[0], "Export a checkpoint. --format omnilite (default) writes model.safetensors + "
                                 "state.json, a checkpoint every command reads. --format hf writes a Hugging Face "
                                 "folder: the text backbone under Mixtral's names and config keys (transformers loads "
                                 "it as MixtralForCausalLM), the vision encoder, resampler, flow head and VQ-VAE under "
                                 "their own prefixes, safetensors shards with an index, config.json and the tokenizer; "
                                 "--checkpoint reads such a folder back. With --adapter DIR --merge, the QLoRA adapters "
                                 "of a fine-tuning run are merged into the dequantised NF4 base first (W = "
                                 "dequant(W_nf4) + alpha/r B A, the weights training saw).");
  opts.add_options()("checkpoint", "base checkpoint: run folder (newest checkpoint), checkpoint, init or export folder, "
                                   "or a .safetensors file", cxxopts::value<std::string>())(
      "adapter", "QLoRA run folder or checkpoint folder holding adapter_model.safetensors", cxxopts::value<std::string>())(
      "merge", "merge the adapters into the base (with --format omnilite or hf)")(
      "format", "omnilite, hf, gguf (the text backbone for llama.cpp; --out FILE.gguf), or peft (--adapter RUN "
                "alone: the adapter for PEFT on the hf export)", cxxopts::value<std::string>()->default_value("omnilite"))(
      "type", "--format gguf: type of the matrices: f32, f16, bf16, q8_0 or q4_0 (norms and the router stay f32)",
      cxxopts::value<std::string>()->default_value("f16"))(
      "multimodal", "--checkpoint FILE.gguf: checkpoint whose vision / resampler / flow / VQ-VAE tensors complete the "
                    "import (default: randomly initialised)", cxxopts::value<std::string>())(
      "out", "output folder (files are replaced only once the new ones are complete)", cxxopts::value<std::string>())(
      "dtype", "storage type of floating tensors: fp32 or bf16", cxxopts::value<std::string>()->default_value("fp32"))(
      "max-shard-size", "--format hf: largest shard, e.g. 5GB, 500MB (decimal units, as transformers)",
      cxxopts::value<std::string>()->default_value("5GB"))(
      "quant", "--format hf: none, or nf4 = the attention projections in bitsandbytes' 4-bit serialisation (what "
               "transformers' load_in_4bit quantises; docs/export.md)", cxxopts::value<std::string>()->default_value("none"))(
      "h,help", "show this help");
  auto args = opts.parse(argc, argv);
  if (args.count("help") || !(args.count("checkpoint") || args["format"].as<std::string>() == "peft") ||
      !args.count("out")) {
    std::cout << opts.help()
              << "\nExamples:\n  omnilite export --checkpoint runs/quickstart --format hf --out exports/quickstart-hf\n"
                 "  omnilite export --checkpoint runs/init-bf16 --adapter runs/qlora --merge --format hf --dtype bf16 "
                 "--out exports/qlora-hf\n"
                 "  omnilite export --checkpoint exports/quickstart-hf --out runs/imported   (back to --format omnilite)\n"
                 "  omnilite export --adapter runs/qlora --format peft --out exports/qlora-peft   (PeftModel.from_pretrained)\n"
                 "  omnilite export --checkpoint runs/quickstart --format gguf --type q8_0 --out exports/qs-q8_0.gguf\n"
                 "  omnilite export --checkpoint exports/qs-q8_0.gguf --multimodal runs/quickstart --out runs/from-gguf\n"
                 "  omnilite export --checkpoint runs/init-bf16 --out runs/init-fp32 --dtype fp32\n"
                 "See docs/export.md for the key map and loading the export in transformers.\n";
    return args.count("help") ? 0 : 2;
  }
  const std::string out = args["out"].as<std::string>(), format = args["format"].as<std::string>();
  if (format != "omnilite" && format != "hf" && format != "gguf" && format != "peft")
    throw std::runtime_error("--format \"" + format + "\": expected omnilite, hf, gguf or peft");
  if (format == "peft") return export_peft(args, out);
  const auto gguf_type = io::parse_ggml_type("--type", args["type"].as<std::string>());
  if (args.count("checkpoint") && fs::is_regular_file(args["checkpoint"].as<std::string>()) &&
      io::is_gguf_file(args["checkpoint"].as<std::string>()))
    return import_gguf(args, args["checkpoint"].as<std::string>(), out);
  if (format == "gguf" && (fs::is_directory(out) || fs::path(out).extension() != ".gguf"))
    throw std::runtime_error("--out \"" + out + "\": --format gguf writes one file; hint: --out exports/model.gguf");
  const auto dtype = parse_storage_dtype("--dtype", args["dtype"].as<std::string>());
  if (args["quant"].as<std::string>() != "none" && args["quant"].as<std::string>() != "nf4")
    throw std::runtime_error("--quant \"" + args["quant"].as<std::string>() + "\": expected none or nf4 (bitsandbytes "
                             "nf4 with double quantisation)");
  if (args["quant"].as<std::string>() != "none" && format != "hf")
    throw std::runtime_error("--quant " + args["quant"].as<std::string>() + " needs --format hf (bitsandbytes' "
                             "serialisation); hint: add --format hf");
  const uint64_t shard_bytes = io::parse_byte_size("--max-shard-size", args["max-shard-size"].as<std::string>());
  const std::string source = weights_source(args["checkpoint"].as<std::string>(), "--checkpoint");
  // A GGUF is a file: a merged model is staged in a folder beside it.
  const std::string folder = format == "gguf" ? out + ".tmp.d" : out;
  if (format == "gguf" && !fs::path(out).parent_path().empty()) fs::create_directories(fs::path(out).parent_path());
  if (format != "gguf" || args.count("adapter")) fs::create_directories(folder);
  if (format != "gguf" && fs::equivalent(out, state_dir(source)))
    throw std::runtime_error("--out \"" + out + "\" is the checkpoint being read; hint: choose another folder");
  if (format == "hf" ? fs::exists(out + "/state.json") : io::is_hf_export(out))
    throw std::runtime_error("--out \"" + out + "\" holds a checkpoint of the other format (" +
                             (format == "hf" ? "omnilite" : "hf") + "); hint: choose another folder");

  Config cfg;
  int64_t step = 0;
  std::string weights = source, merged_tmp;
  json provenance = {{"base", source}, {"merged", false}};
  if (args.count("adapter")) {
    if (!args.count("merge"))
      throw std::runtime_error("--adapter without --merge: hint: add --merge to write merged full-precision weights, "
                               "or --format peft for the adapter in PEFT's layout");
    const std::string given = args["adapter"].as<std::string>();
    const std::string adir = io::is_peft_adapter(given) ? given : io::latest_checkpoint(given);
    if (!fs::exists(adir + "/adapter_model.safetensors"))
      throw std::runtime_error("--adapter \"" + adir + "\" holds no adapter_model.safetensors; hint: pass the run "
                               "folder or a checkpoint of a lora.enabled run");
    // The hf format converts the merged file, written next to the output and removed afterwards.
    merged_tmp = format == "hf" ? out + "/.merged.tmp" : format == "gguf" ? folder : "";
    if (!merged_tmp.empty()) fs::create_directories(merged_tmp);
    const std::string merged_file = (merged_tmp.empty() ? out : merged_tmp) + "/model.safetensors";
    if (!io::is_peft_adapter(adir))
      apply_runtime(parse_config(io::read_checkpoint_state(adir)["config"]).runtime);  // the run's threads, once
    const auto merged = io::merge_adapter(source, adir, merged_file, dtype);
    cfg = merged.cfg;
    step = merged.step;
    weights = merged_file;
    provenance = {{"base", source}, {"adapter", adir}, {"merged", true}};
    log::info(log::format("export: %lld tensors merged from %s + %s", static_cast<long long>(merged.tensors),
                          source.c_str(), adir.c_str()));
  } else {
    const auto state = io::read_checkpoint_state(state_dir(source));
    cfg = parse_config(state["config"]);
    step = state.value("step", int64_t{0});
  }

  if (format == "gguf") {
    io::GgufExportOptions o;
    o.out_file = out;
    o.type = gguf_type;
    o.tokenizer = cfg.data.tokenizer;
    o.name = fs::path(source).filename().string();
    int64_t last = -1;
    const auto res = io::write_gguf_export(weights, cfg, step, o, [&](int64_t done, int64_t all) {
      if (done * 10 / all != last) {
        last = done * 10 / all;
        log::info(log::format("export: %lld/%lld tensors", static_cast<long long>(done), static_cast<long long>(all)));
      }
    });
    fs::remove_all(folder);
    std::string types;
    for (const auto& [t, n] : res.types) types += (types.empty() ? "" : ", ") + std::to_string(n) + " " + t;
    log::info(log::format("export: %lld tensors (%s), %.3f GB -> %s (GGUF v3, llama architecture)",
                          static_cast<long long>(res.tensors), types.c_str(), res.bytes / 1e9, out.c_str()));
    check_llama_tokenizer(cfg);
    return 0;
  }
  if (format == "hf") {
    io::HfExportOptions o;
    o.out_dir = out;
    o.dtype = dtype;
    o.max_shard_bytes = shard_bytes;
    o.quant = args["quant"].as<std::string>();
    if (fs::exists(cfg.data.tokenizer)) {
      o.tokenizer = cfg.data.tokenizer;
    } else {
      log::warn("export: the checkpoint's tokenizer \"" + cfg.data.tokenizer + "\" does not exist; the export has none "
                "(hint: run from the folder the model was trained in)");
    }
    const auto res = io::write_hf_export(weights, cfg, step, o);
    if (!merged_tmp.empty()) fs::remove_all(merged_tmp);
    log::info(log::format("export: %lld tensors, %.2f GB in %zu shard(s) -> %s (Hugging Face format, Mixtral names)",
                          static_cast<long long>(res.tensors), res.bytes / 1e9, res.shards.size(), out.c_str()));
    return 0;
  }
  const int64_t n = args.count("adapter") ? 0 : restore_plain(source, out, dtype);
  write_state(out, cfg, step, provenance);
  if (!args.count("adapter"))
    log::info(log::format("export: %lld tensors -> %s/model.safetensors", static_cast<long long>(n), out.c_str()));
  return 0;
}

}  // namespace omnilite::cli
