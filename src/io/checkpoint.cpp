#include "omnilite/io/checkpoint.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <set>
#include <stdexcept>

#include "omnilite/io/gguf.h"
#include "omnilite/io/hf_export.h"
#include "omnilite/io/weights_reader.h"
#include "omnilite/log.h"

namespace omnilite::io {
namespace fs = std::filesystem;

std::vector<std::pair<std::string, torch::Tensor>> state_tensors(const torch::nn::Module& m) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& p : m.named_parameters()) out.emplace_back(p.key(), p.value());
  for (const auto& b : m.named_buffers()) out.emplace_back(b.key(), b.value());
  return out;
}

void save_module(const torch::nn::Module& m, const std::string& path, const std::map<std::string, std::string>& metadata,
                 c10::optional<torch::ScalarType> dtype) {
  auto tensors = state_tensors(m);
  std::vector<TensorSpec> specs;
  for (const auto& [name, t] : tensors) specs.push_back({name, dtype ? *dtype : t.scalar_type(), t.sizes().vec()});
  SafetensorsWriter w(path, std::move(specs), metadata);
  for (const auto& [name, t] : tensors) w.write(name, dtype ? t.detach().to(*dtype) : t.detach());
  w.commit();
}

void load_module(torch::nn::Module& m, const std::string& path, bool verify) {
  WeightsReader r(path);
  if (verify) r.verify_checksum();
  auto tensors = state_tensors(m);
  std::set<std::string> expected;
  for (const auto& [name, t] : tensors) {
    expected.insert(name);
    if (!r.contains(name))
      throw std::runtime_error("checkpoint \"" + path + "\": missing tensor \"" + name + "\" " +
                               c10::str(t.sizes()) + "; hint: the checkpoint was written for another config");
    const auto& e = r.tensors().at(name);
    if (e.shape != t.sizes().vec())
      throw std::runtime_error("checkpoint \"" + path + "\": tensor \"" + name + "\" has shape " +
                               c10::str(c10::IntArrayRef(e.shape)) + ", the model expects " + c10::str(t.sizes()) +
                               "; hint: the checkpoint was written for another config");
    // Floating-point tensors convert (a bf16 export loads into fp32 weights); codes and counters must match.
    const bool both_float = c10::isFloatingType(e.dtype) && c10::isFloatingType(t.scalar_type());
    if (!both_float && e.dtype != t.scalar_type())
      throw std::runtime_error("checkpoint \"" + path + "\": tensor \"" + name + "\" is " + dtype_name(e.dtype) +
                               ", the model holds " + c10::toString(t.scalar_type()) + " there; hint: only floating-point "
                               "tensors convert on load; the checkpoint was written for another config or format");
  }
  for (const auto& [name, e] : r.tensors())
    if (!expected.count(name))
      throw std::runtime_error("checkpoint \"" + path + "\": unexpected tensor \"" + name +
                               "\" that the model does not have; hint: the checkpoint was written for another config");
  torch::NoGradGuard ng;
  for (auto& [name, t] : tensors) t.copy_(r.load(name));
}

nlohmann::json read_checkpoint_state(const std::string& dir) {
  if (!std::filesystem::exists(dir + "/state.json") && is_hf_export(dir)) return hf_export_state(dir);
  std::ifstream f(dir + "/state.json");
  if (!f)
    throw std::runtime_error("checkpoint \"" + dir + "\": state.json is missing; hint: pass a run folder, a "
                             "checkpoints/step_N folder or a folder written by `omnilite init` or `omnilite export`");
  auto state = nlohmann::json::parse(f, nullptr, false);
  if (!state.is_object() || !state.contains("config") || state.value("version", 0) != kCheckpointVersion)
    throw std::runtime_error("checkpoint \"" + dir + "\": state.json is unreadable, lacks the config or is of "
                             "another version (this build reads version " + std::to_string(kCheckpointVersion) + ")");
  return state;
}

std::string run_folder_of(const std::string& path) {
  std::filesystem::path p = std::filesystem::path(path).lexically_normal();
  if (p.filename().empty()) p = p.parent_path();  // a trailing slash
  if (p.filename().string().rfind("step_", 0) == 0 && p.parent_path().filename() == "checkpoints")
    return p.parent_path().parent_path().string();
  return p.string();
}

std::string latest_checkpoint(const std::string& dir) {
  if (fs::exists(dir + "/state.json") || is_hf_export(dir)) return dir;
  if (fs::is_regular_file(dir) && is_gguf_file(dir))
    throw std::runtime_error("\"" + dir + "\" is a GGUF file; hint: import it into a checkpoint folder first: omnilite "
                             "export --checkpoint " + dir + " --out runs/imported [--multimodal CHECKPOINT]");
  const std::string ck = fs::exists(dir + "/checkpoints") ? dir + "/checkpoints" : dir;
  std::vector<std::string> names;
  if (fs::is_directory(ck))
    for (const auto& e : fs::directory_iterator(ck))
      if (e.is_directory() && e.path().filename().string().rfind("step_", 0) == 0) names.push_back(e.path().string());
  if (names.empty())
    throw std::runtime_error("no checkpoint under \"" + dir + "\"; hint: pass a run folder or a step_N folder");
  std::sort(names.begin(), names.end());
  return names.back();
}

nlohmann::json with_base_model(nlohmann::json config, const std::string& base) {
  const auto state = read_checkpoint_state(latest_checkpoint(base));
  const auto& from = state["config"];
  config["model"] = from.at("model");
  if (!config.contains("data") || !config["data"].contains("tokenizer"))
    config["data"]["tokenizer"] = from.value("data", nlohmann::json::object()).value("tokenizer", std::string());
  log::info("config: no model section; the model (and data.tokenizer) of the base " + base);
  return config;
}

void load_vqvae_weights(torch::nn::Module& vqvae, const std::string& run_or_checkpoint) {
  const std::string dir = latest_checkpoint(run_or_checkpoint);
  std::ifstream sf(dir + "/state.json");
  auto state = nlohmann::json::parse(sf, nullptr, false);
  if (!state.is_object() || state.value("stage", std::string()) != "vqvae")
    throw std::runtime_error("data.vqvae: \"" + dir + "\" is not a checkpoint of a train.stage = \"vqvae\" run; hint: "
                             "train the VQ-VAE first (configs/small-vqvae.json)");
  load_module(vqvae, dir + "/model.safetensors");
  log::info("vqvae: frozen weights from " + dir);
}

}  // namespace omnilite::io
