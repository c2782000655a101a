#include "omnilite/io/init_checkpoint.h"

#include <filesystem>
#include <stdexcept>

#include "omnilite/io/checkpoint.h"
#include "omnilite/io/safetensors.h"
#include "omnilite/modules/linear.h"
#include "omnilite/modules/omnilite.h"

namespace omnilite::io {
namespace fs = std::filesystem;

namespace {

// The tensors of one piece under its prefix, floating ones in the storage dtype.
std::vector<std::pair<std::string, torch::Tensor>> piece_tensors(const ModelPart& part, torch::ScalarType dtype) {
  auto module = part.make();
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (auto& [name, t] : state_tensors(*module)) {
    auto v = t.detach();
    out.emplace_back(part.prefix + "." + name, v.is_floating_point() ? v.to(dtype) : v);
  }
  return out;
}

}  // namespace

InitCheckpointResult write_init_checkpoint(const Config& cfg, const InitCheckpointOptions& opts,
                                           const std::function<void(int64_t, int64_t)>& progress) {
  if (opts.dtype != torch::kBFloat16 && opts.dtype != torch::kFloat32)
    throw std::runtime_error("init: storage dtype must be bf16 or fp32, got " + std::string(c10::toString(opts.dtype)));
  const std::string path = opts.out_dir + "/model.safetensors";
  if (fs::exists(path))
    throw std::runtime_error("init: \"" + path + "\" already exists; hint: choose another --out (nothing was "
                             "overwritten)");
  fs::create_directories(opts.out_dir);
  const LinearBuilder builder;  // the plain model: QLoRA quantises when it loads
  const auto parts = model_parts(cfg.model, builder);
  torch::NoGradGuard ng;

  // Pass 1: names, dtypes and shapes (each piece built and dropped at once) to lay out the header.
  std::vector<TensorSpec> specs;
  for (const auto& part : parts) {
    auto module = part.make();
    for (const auto& [name, t] : state_tensors(*module))
      specs.push_back({part.prefix + "." + name, t.is_floating_point() ? opts.dtype : t.scalar_type(),
                       t.sizes().vec()});
  }
  // Pass 2: the same pieces, seeded per piece, streamed into the file.
  InitCheckpointResult r;
  {
    SafetensorsWriter w(path, specs, {{"format", "pt"}, {"omnilite.init_seed", std::to_string(opts.seed)}});
    for (size_t k = 0; k < parts.size(); ++k) {
      torch::manual_seed(opts.seed + k);
      for (const auto& [name, t] : piece_tensors(parts[k], opts.dtype)) {
        w.write(name, t);
        r.tensors += 1;
        r.params += t.numel();
      }
      if (progress) progress(static_cast<int64_t>(k + 1), static_cast<int64_t>(parts.size()));
    }
    w.commit();
  }
  r.bytes = fs::file_size(path);
  Config plain = cfg;  // the weights are those of the plain model, whatever the config's lora section says
  plain.lora.enabled = false;
  plain.train.base_checkpoint.clear();
  nlohmann::json state = {{"version", kCheckpointVersion},
                          {"stage", "omni"},
                          {"step", 0},
                          {"config", to_json(plain)},
                          {"init", {{"seed", opts.seed}, {"dtype", c10::toString(opts.dtype)}}}};
  write_file_synced(opts.out_dir + "/state.json", state.dump(2));
  return r;
}

}  // namespace omnilite::io
