#include "omnilite/io/adapter.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <stdexcept>

#include <nlohmann/json.hpp>

#include "omnilite/io/checkpoint.h"
#include "omnilite/io/weights_reader.h"
#include "omnilite/io/safetensors.h"
#include "omnilite/modules/lora_linear.h"
#include "omnilite/modules/nf4_linear.h"
#include "omnilite/modules/omnilite.h"
#include "omnilite/modules/qlora_builder.h"
#include "omnilite/pattern.h"

namespace omnilite::io {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

const std::string kPeftPrefix = "base_model.model.";

bool is_adapter_key(const std::string& k) {
  return k.find(".lora_A.") != std::string::npos || k.find(".lora_B.") != std::string::npos;
}

}  // namespace

void save_adapter(const torch::nn::Module& model, const LoRAOptions& o, const std::string& dir) {
  fs::create_directories(dir);
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  for (const auto& p : model.named_parameters())
    if (is_adapter_key(p.key())) tensors.emplace_back(kPeftPrefix + p.key(), p.value().detach().cpu());
  if (tensors.empty()) throw std::runtime_error("save_adapter: the model has no LoRA adapters");
  save_safetensors(dir + "/adapter_model.safetensors", tensors, {{"format", "pt"}});
  std::string regex;
  for (const auto& t : o.target_modules) regex += (regex.empty() ? "" : "|") + pattern_to_regex(t);
  json cfg = {{"peft_type", "LORA"},
              {"task_type", "CAUSAL_LM"},
              {"r", o.rank},
              {"lora_alpha", o.alpha},
              {"lora_dropout", o.dropout},
              {"target_modules", "(" + regex + ")"},
              {"bias", "none"},
              {"fan_in_fan_out", false},
              {"inference_mode", false},
              {"base_model_name_or_path", "omni-lite"},
              {"omnilite_target_patterns", o.target_modules},
              {"omnilite_base_dtype", o.base_dtype}};
  const std::string path = dir + "/adapter_config.json";
  {
    std::ofstream f(path + ".tmp");
    f << cfg.dump(2) << "\n";
    if (!f) throw std::runtime_error("cannot write \"" + path + ".tmp\"");
  }
  fs::rename(path + ".tmp", path);
  fsync_directory(dir);
}

void load_adapter(torch::nn::Module& model, const std::string& dir) {
  const std::string path = dir + "/adapter_model.safetensors";
  SafetensorsReader r(path);
  r.verify_checksum();
  std::set<std::string> expected;
  torch::NoGradGuard ng;
  for (auto& p : model.named_parameters()) {
    if (!is_adapter_key(p.key())) continue;
    const std::string name = kPeftPrefix + p.key();
    expected.insert(name);
    if (!r.contains(name))
      throw std::runtime_error("adapter \"" + path + "\": missing tensor \"" + name + "\"; hint: the adapter was "
                               "trained with other lora.target_modules or another model config");
    auto t = r.load(name);
    if (t.sizes() != p.value().sizes())
      throw std::runtime_error("adapter \"" + path + "\": tensor \"" + name + "\" has shape " + c10::str(t.sizes()) +
                               ", the model expects " + c10::str(p.value().sizes()) + "; hint: another lora.rank?");
    p.value().copy_(t);
  }
  for (const auto& [name, e] : r.tensors())
    if (!expected.count(name))
      throw std::runtime_error("adapter \"" + path + "\": unexpected tensor \"" + name + "\" that the model does not "
                               "have; hint: the adapter was trained with other lora.target_modules");
}

void load_base_weights(torch::nn::Module& model, const std::string& path) {
  if (!has_weights(path))
    throw std::runtime_error("base checkpoint \"" + path + "\" does not exist or holds no model.safetensors");
  WeightsReader r(path);
  r.verify_checksum();
  std::map<std::string, torch::Tensor> state;
  for (auto& [k, t] : state_tensors(model)) state[k] = t;
  std::map<std::string, std::shared_ptr<torch::nn::Module>> modules;
  for (const auto& m : model.named_modules()) modules[m.key()] = m.value();
  std::set<std::string> covered;
  std::vector<std::string> problems;  // every mismatch, named; reported together before anything is used
  auto shape_problem = [&](const std::string& name, const std::vector<int64_t>& got, c10::IntArrayRef want) {
    problems.push_back("\"" + name + "\" has shape " + c10::str(c10::IntArrayRef(got)) + ", the model expects " +
                       c10::str(want));
  };
  torch::NoGradGuard ng;
  auto copy_checked = [&](const std::string& file_name, const std::string& key) {
    auto& dst = state.at(key);
    const auto& e = r.tensors().at(file_name);
    if (e.shape != dst.sizes().vec()) return shape_problem(file_name, e.shape, dst.sizes());
    dst.copy_(r.load(file_name));
    covered.insert(key);
  };
  for (const auto& [name, entry] : r.tensors()) {
    if (state.count(name)) {
      copy_checked(name, name);
      continue;
    }
    const auto dot = name.rfind('.');
    const std::string prefix = dot == std::string::npos ? "" : name.substr(0, dot), leaf = name.substr(dot + 1);
    const std::string wrapped = prefix + ".base_layer";
    const std::string owner = modules.count(wrapped) ? wrapped : prefix;
    auto it = modules.find(owner);
    auto* nf4 = it == modules.end() ? nullptr : dynamic_cast<Nf4LinearImpl*>(it->second.get());
    if (nf4 && leaf == "weight") {
      if (entry.shape != std::vector<int64_t>{nf4->out_, nf4->in_}) {
        shape_problem(name, entry.shape, {nf4->out_, nf4->in_});
        continue;
      }
      nf4->set_weight(r.load(name).to(torch::kFloat32));  // quantised here; the fp32 copy dies with this scope
      for (const char* b : {"weight_packed", "weight_absmax_q", "weight_absmax_scale", "weight_absmax_mean"})
        covered.insert(owner + "." + b);
    } else if (state.count(owner + "." + leaf)) {
      copy_checked(name, owner + "." + leaf);
    } else {
      problems.push_back("unexpected \"" + name + "\" that the model does not have");
    }
  }
  for (const auto& [key, t] : state) {
    if (covered.count(key) || is_adapter_key(key)) continue;
    // Name the tensor as the checkpoint would: NF4 buffers come from "<path>.weight", wrapped bases from "<path>".
    std::string shown = key;
    const auto w = shown.find(".weight_");
    if (w != std::string::npos) shown = shown.substr(0, w) + ".weight";
    const auto bl = shown.find(".base_layer.");
    if (bl != std::string::npos) shown.erase(bl, std::string(".base_layer").size());
    if (!covered.count(shown) && std::find(problems.begin(), problems.end(), "missing \"" + shown + "\"") == problems.end())
      problems.push_back("missing \"" + shown + "\"");
  }
  if (problems.empty()) return;
  std::string list;
  const size_t shown = std::min<size_t>(problems.size(), 12);
  for (size_t i = 0; i < shown; ++i) list += (i ? "; " : "") + problems[i];
  if (shown < problems.size()) list += "; and " + std::to_string(problems.size() - shown) + " more";
  throw std::runtime_error("base checkpoint \"" + path + "\" does not fit the model (" +
                           std::to_string(problems.size()) + " tensors): " + list +
                           "; hint: the checkpoint was written for another config");
}

namespace {

// The plain weight [out, in] a projection computes with, in fp32.
torch::Tensor effective_weight(const torch::nn::Module& m) {
  if (const auto* lora = dynamic_cast<const LoRALinearImpl*>(&m))
    return effective_weight(*lora->base_layer) + lora->delta_weight().to(torch::kFloat32);
  if (const auto* nf4 = dynamic_cast<const Nf4LinearImpl*>(&m)) return nf4->dequantized_weight(torch::kFloat32);
  if (const auto* plain = dynamic_cast<const PlainLinearImpl*>(&m)) return plain->weight.detach().to(torch::kFloat32);
  throw std::runtime_error("write_merged_weights: unexpected projection type");
}

// One tensor of the merged file: its name and how to produce it.
struct MergedTensor {
  std::string name;
  std::vector<int64_t> shape;
  torch::ScalarType dtype;
  std::function<torch::Tensor()> make;
};

}  // namespace

int64_t write_merged_weights(const torch::nn::Module& model, const std::string& path, torch::ScalarType dtype,
                             const std::map<std::string, std::string>& metadata) {
  std::map<std::string, const torch::nn::Module*> modules;
  for (const auto& m : model.named_modules()) modules[m.key()] = m.value().get();
  // The outermost projection owning a key: "a.b.base_layer.weight_packed" -> ("a.b", "weight_packed").
  auto owner_of = [](const std::string& key) {
    const auto dot = key.rfind('.');
    std::string owner = key.substr(0, dot), leaf = key.substr(dot + 1);
    const std::string bl = ".base_layer";
    if (owner.size() > bl.size() && owner.compare(owner.size() - bl.size(), bl.size(), bl) == 0)
      owner.resize(owner.size() - bl.size());
    return std::make_pair(owner, leaf);
  };
  torch::NoGradGuard ng;
  std::vector<MergedTensor> out;
  for (const auto& [key, t] : state_tensors(model)) {
    if (is_adapter_key(key)) continue;
    const auto [owner, leaf] = owner_of(key);
    auto it = modules.find(owner);
    const bool projection = it != modules.end() && dynamic_cast<const LinearBaseImpl*>(it->second) != nullptr;
    if (projection && (leaf == "weight" || leaf == "weight_packed")) {
      const auto* m = dynamic_cast<const LinearBaseImpl*>(it->second);
      out.push_back({owner + ".weight", {m->out_features(), m->in_features()}, dtype,
                     [m] { return effective_weight(*m); }});
    } else if (projection && leaf.rfind("weight_", 0) == 0) {
      continue;  // the NF4 constants are folded into the weight above
    } else {
      const std::string name = projection ? owner + "." + leaf : key;
      auto v = t.detach();
      out.push_back({name, v.sizes().vec(), v.is_floating_point() ? dtype : v.scalar_type(), [v] { return v; }});
    }
  }
  std::vector<TensorSpec> specs;
  for (const auto& m : out) specs.push_back({m.name, m.dtype, m.shape});
  SafetensorsWriter w(path, specs, metadata);
  for (const auto& m : out) w.write(m.name, m.make().to(m.dtype).cpu().contiguous());
  w.commit();
  return static_cast<int64_t>(out.size());
}

MergedAdapter merge_adapter(const std::string& base, const std::string& adapter_dir, const std::string& out_file,
                            torch::ScalarType dtype) {
  const auto state = read_checkpoint_state(adapter_dir);
  MergedAdapter r;
  r.cfg = parse_config(state["config"]);
  if (!r.cfg.lora.enabled)
    throw std::runtime_error("adapter checkpoint \"" + adapter_dir + "\": its config has lora.enabled = false; "
                             "hint: pass the folder of a QLoRA run");
  OmniLite model(r.cfg.model, *make_linear_builder(r.cfg));
  load_base_weights(*model, base);
  load_adapter(*model, adapter_dir);
  model->eval();
  r.tensors = write_merged_weights(*model, out_file, dtype, {{"format", "pt"}});
  r.step = state.value("step", int64_t{0});
  return r;
}

}  // namespace omnilite::io
