#include "omnilite/io/init_checkpoint.h"

#include <algorithm>
#include <filesystem>
#include <stdexcept>

#include "omnilite/io/checkpoint.h"
#include "omnilite/log.h"
#include "omnilite/io/safetensors.h"
#include "omnilite/modules/linear.h"
#include "omnilite/modules/omnilite.h"

namespace omnilite::io {
namespace fs = std::filesystem;

namespace {

// The tensors of one piece under its prefix, floating ones in the storage dtype: the source's where a part
// importer covers them, else the piece's own initialisation.
std::vector<std::pair<std::string, torch::Tensor>> piece_tensors(const ModelPart& part, torch::ScalarType dtype,
                                                                 const PartImporter& from) {
  auto module = part.make();
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (auto& [name, t] : state_tensors(*module)) {
    const std::string full = part.prefix + "." + name;
    auto imported = from.tensor(full, t.sizes());
    auto v = imported.defined() ? imported : t.detach();
    out.emplace_back(full, v.is_floating_point() ? v.to(dtype) : v);
  }
  return out;
}

// The tokenizer part (named, or the text part's own tokenizer.model) extended into out_dir, and the config following
// it: its vocabulary, special ids and data.tokenizer.
Config with_tokenizer_part(Config cfg, std::vector<PartSource>& from, const std::string& out_dir) {
  auto named = [&](const char* part) {
    return std::find_if(from.begin(), from.end(), [&](const PartSource& s) { return s.part == part; });
  };
  auto tok = named("tokenizer");
  if (tok == from.end()) {
    const auto text = named("text");
    if (text == from.end()) return cfg;
    if (!fs::exists(text->path + "/tokenizer.model")) {
      log::warn("init: " + text->path + " holds no tokenizer.model; the embedding rows are that checkpoint's token "
                "ids, so data.tokenizer (" + cfg.data.tokenizer + ") must be the tokenizer it was trained with; hint: "
                "--from tokenizer=FILE");
      return cfg;
    }
    from.push_back({"tokenizer", text->path});
    log::info("init: the tokenizer of " + text->path + " comes with its text backbone");
    tok = std::prev(from.end());
  }
  const auto t = extend_tokenizer(tok->path, out_dir + "/tokenizer.model");
  log::info(log::format("init: tokenizer %s with %lld marker pieces appended: %lld pieces (model.text.vocab_size)",
                        t.path.c_str(), static_cast<long long>(t.added), static_cast<long long>(t.vocab_size)));
  cfg.model.text.vocab_size = t.vocab_size;
  cfg.model.tokens = t.tokens;
  cfg.data.tokenizer = t.path;
  validate(cfg);
  return cfg;
}

InitCheckpointResult write_init_files(const Config& cfg_in, std::vector<PartSource> sources,
                                      const InitCheckpointOptions& opts,
                                      const std::function<void(int64_t, int64_t)>& progress);

}  // namespace

InitCheckpointResult write_init_checkpoint(const Config& cfg_in, const InitCheckpointOptions& opts,
                                           const std::function<void(int64_t, int64_t)>& progress) {
  if (opts.dtype != torch::kBFloat16 && opts.dtype != torch::kFloat32)
    throw std::runtime_error("init: storage dtype must be bf16 or fp32, got " + std::string(c10::toString(opts.dtype)));
  const std::string path = opts.out_dir + "/model.safetensors";
  if (fs::exists(path))
    throw std::runtime_error("init: \"" + path + "\" already exists; hint: choose another --out (nothing was "
                             "overwritten)");
  const auto& sources = opts.from;
  for (const auto& s : sources)  // every source exists before anything is written
    if (!fs::exists(s.path)) throw std::runtime_error("--from " + s.part + "=" + s.path + ": no such file or folder");
  if (!sources.empty() && fs::exists(opts.out_dir + "/tokenizer.model"))
    throw std::runtime_error("init: \"" + opts.out_dir + "/tokenizer.model\" already exists; hint: choose another "
                             "--out (nothing was overwritten)");
  // A refused source leaves no folder behind (or, in a folder that existed, no tokenizer.model).
  const bool existed = fs::exists(opts.out_dir);
  fs::create_directories(opts.out_dir);
  try {
    return write_init_files(cfg_in, sources, opts, progress);
  } catch (...) {
    std::error_code ec;
    if (!existed) fs::remove_all(opts.out_dir, ec);
    else if (!opts.from.empty()) fs::remove(opts.out_dir + "/tokenizer.model", ec);
    throw;
  }
}

namespace {

InitCheckpointResult write_init_files(const Config& cfg_in, std::vector<PartSource> sources,
                                      const InitCheckpointOptions& opts,
                                      const std::function<void(int64_t, int64_t)>& progress) {
  const std::string path = opts.out_dir + "/model.safetensors";
  const Config cfg = with_tokenizer_part(cfg_in, sources, opts.out_dir);
  const PartImporter importer(cfg, sources);  // checks every source's config against the model's
  const LinearBuilder builder;  // the plain model: QLoRA quantises when it loads
  const auto parts = model_parts(cfg.model, builder);
  torch::NoGradGuard ng;

  // Pass 1: names, dtypes and shapes (each piece built and dropped at once) to lay out the header; the sources'
  // shapes are checked here, from their headers, before any tensor is read.
  std::vector<TensorSpec> specs;
  for (const auto& part : parts) {
    auto module = part.make();
    for (const auto& [name, t] : state_tensors(*module)) {
      specs.push_back({part.prefix + "." + name, t.is_floating_point() ? opts.dtype : t.scalar_type(),
                       t.sizes().vec()});
      importer.check_shape(specs.back().name, t.sizes());
    }
  }
  // Pass 2: the same pieces, seeded per piece, streamed into the file.
  InitCheckpointResult r;
  {
    SafetensorsWriter w(path, specs, {{"format", "pt"}, {"omnilite.init_seed", std::to_string(opts.seed)}});
    for (size_t k = 0; k < parts.size(); ++k) {
      torch::manual_seed(opts.seed + k);
      for (const auto& [name, t] : piece_tensors(parts[k], opts.dtype, importer)) {
        w.write(name, t);
        r.tensors += 1;
        r.params += t.numel();
      }
      if (progress) progress(static_cast<int64_t>(k + 1), static_cast<int64_t>(parts.size()));
    }
    w.commit();
  }
  r.bytes = fs::file_size(path);
  r.imported = importer.imported();
  Config plain = cfg;  // the weights are those of the plain model, whatever the config's lora section says
  plain.lora.enabled = false;
  plain.train.base_checkpoint.clear();
  nlohmann::json state = {{"version", kCheckpointVersion},
                          {"stage", "omni"},
                          {"step", 0},
                          {"config", to_json(plain)},
                          {"init", {{"seed", opts.seed}, {"dtype", c10::toString(opts.dtype)}}}};
  if (!sources.empty()) state["init"]["from"] = importer.provenance();
  for (const auto& s : sources)
    if (s.part == "tokenizer") state["init"]["from"]["tokenizer"] = s.path;
  write_file_atomically(opts.out_dir + "/state.json", state.dump(2));
  Config to_train = cfg;  // `train --config OUT/config.json` starts from these weights
  to_train.train.base_checkpoint = opts.out_dir;
  write_file_atomically(opts.out_dir + "/config.json", to_json(to_train).dump(2) + "\n");
  r.config = to_train;
  return r;
}

}  // namespace

}  // namespace omnilite::io
