#include "omnilite/io/adapter.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <regex>
#include <set>
#include <stdexcept>

#include <nlohmann/json.hpp>

#include "omnilite/io/checkpoint.h"
#include "omnilite/io/hf_export.h"
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

// What an adapter checkpoint holds of a model: the LoRA factors and the parameters of lora.modules_to_save.
bool saved_with_adapter(const std::string& k, const std::vector<std::string>& modules_to_save) {
  return is_adapter_key(k) || matches_any(k, modules_to_save);
}

// lora.modules_to_save as an adapter checkpoint's adapter_config.json records it (none when absent).
std::vector<std::string> modules_to_save_of(const std::string& dir) {
  std::ifstream f(dir + "/adapter_config.json");
  const auto j = json::parse(f, nullptr, false);
  if (!j.is_object() || !j.contains("omnilite_modules_to_save")) return {};
  return j["omnilite_modules_to_save"].get<std::vector<std::string>>();
}

}  // namespace

void save_adapter(const torch::nn::Module& model, const LoRAOptions& o, const std::string& dir) {
  fs::create_directories(dir);
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  for (const auto& p : model.named_parameters())
    if (saved_with_adapter(p.key(), o.modules_to_save))
      tensors.emplace_back(kPeftPrefix + p.key(), p.value().detach().cpu());
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
              {"omnilite_modules_to_save", o.modules_to_save},
              {"omnilite_base_dtype", o.base_dtype}};
  write_file_atomically(dir + "/adapter_config.json", cfg.dump(2) + "\n");
}

void load_adapter(torch::nn::Module& model, const std::string& dir) {
  const std::string path = dir + "/adapter_model.safetensors";
  SafetensorsReader r(path);
  r.verify_checksum();
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  for (const auto& [name, e] : r.tensors()) tensors.emplace_back(name, r.load(name));
  const auto missing = load_adapter_tensors(model, tensors, "adapter \"" + path + "\"", modules_to_save_of(dir));
  if (!missing.empty())
    throw std::runtime_error("adapter \"" + path + "\": missing tensor \"" + missing.front() + "\" (and " +
                             std::to_string(missing.size() - 1) + " more); hint: the adapter was trained with other "
                             "lora.target_modules or another model config");
}

std::string base_weights_path(const std::string& base) {
  return !has_weights(base) && fs::is_directory(base + "/checkpoints") ? latest_checkpoint(base) : base;
}

void load_base_weights(torch::nn::Module& model, const std::string& base) {
  const std::string path = base_weights_path(base);
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
      if (auto q = r.nf4(name)) nf4->set_quantized(*q);  // a bitsandbytes 4-bit base: its codes as they are
      else nf4->set_weight(r.load(name).to(torch::kFloat32));  // quantised here; the fp32 copy dies with this scope
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
  MergedAdapter r;
  std::vector<std::pair<std::string, torch::Tensor>> peft_tensors;
  const bool peft = is_peft_adapter(adapter_dir);
  if (peft) {  // the base's model with the lora options the adapter implies, on a full-precision base
    const std::string base_dir = fs::is_regular_file(base) ? fs::path(base).parent_path().string() : base;
    r.cfg = parse_config(read_checkpoint_state(base_dir)["config"]);
    auto read = read_peft_adapter(adapter_dir, r.cfg.model);
    r.cfg.lora = read.lora;
    r.cfg.lora.base_dtype = "fp32";
    peft_tensors = std::move(read.tensors);
  } else {
    const auto state = read_checkpoint_state(adapter_dir);
    r.cfg = parse_config(state["config"]);
    r.step = state.value("step", int64_t{0});
    if (!r.cfg.lora.enabled)
      throw std::runtime_error("adapter checkpoint \"" + adapter_dir + "\": its config has lora.enabled = false; "
                               "hint: pass the folder of a QLoRA run");
  }
  OmniLite model(r.cfg.model, *make_linear_builder(r.cfg));
  load_base_weights(*model, base);
  if (!peft) {
    load_adapter(*model, adapter_dir);
  } else if (!load_adapter_tensors(*model, peft_tensors, "PEFT adapter \"" + adapter_dir + "\"").empty()) {
    throw std::runtime_error("PEFT adapter \"" + adapter_dir + "\" does not cover the projections it names");
  }
  model->eval();
  r.tensors = write_merged_weights(*model, out_file, dtype, {{"format", "pt"}});
  return r;
}

namespace {

// The LoRA factors of one projection of the adapter file (OMNI-LITE path without ".weight"), or undefined ones.
struct Factors {
  torch::Tensor a, b;  // [r, in], [out, r]
};

Factors factors_of(const SafetensorsReader& r, const std::string& module) {
  const std::string base = kPeftPrefix + module;
  if (!r.contains(base + ".lora_A.weight")) return {};
  return {r.load(base + ".lora_A.weight").to(torch::kFloat32), r.load(base + ".lora_B.weight").to(torch::kFloat32)};
}

// [r, in] -> [R, in] and [out, r] -> [out, R], zeros added.
Factors padded(const Factors& f, int64_t R) {
  const int64_t r = f.a.size(0);
  return {torch::cat({f.a, torch::zeros({R - r, f.a.size(1)})}), torch::cat({f.b, torch::zeros({f.b.size(0), R - r})}, 1)};
}

// Per-expert pairs (A_e [R, in], B_e [out, R]) -> PEFT's stacked lora_A [R*E, in] and lora_B [out, R*E] with expert
// e's column k at k*E + e.
Factors stacked(const std::vector<Factors>& experts) {
  std::vector<torch::Tensor> as, bs;
  for (const auto& f : experts) {
    as.push_back(f.a);
    bs.push_back(f.b);
  }
  auto b = torch::stack(bs, 2);                   // [out, R, E]
  return {torch::cat(as), b.reshape({b.size(0), -1})};  // [E*R, in] expert-major; [out, R*E] column k*E + e
}

}  // namespace

PeftExport write_peft_adapter(const std::string& adapter_dir, const Config& cfg, const std::string& out_dir) {
  const std::string file = adapter_dir + "/adapter_model.safetensors";
  if (!fs::exists(file))
    throw std::runtime_error("--adapter \"" + adapter_dir + "\" holds no adapter_model.safetensors; hint: pass a QLoRA "
                             "run folder or one of its checkpoints");
  SafetensorsReader r(file);
  r.verify_checksum();
  const int64_t rank = cfg.lora.rank, layers = cfg.model.text.num_layers, E = cfg.model.moe.num_experts;
  PeftExport res;
  // Which projections hold adapters.
  std::set<std::string> modules;
  for (const auto& [name, e] : r.tensors()) {
    const auto at = name.find(".lora_A.weight");
    if (at != std::string::npos) modules.insert(name.substr(kPeftPrefix.size(), at - kPeftPrefix.size()));
    else if (!is_adapter_key(name)) res.skipped.push_back(name.substr(kPeftPrefix.size()));  // lora.modules_to_save
  }
  bool experts = false;
  for (const auto& m : modules) experts = experts || m.find(".moe.experts.") != std::string::npos;
  const int64_t R = experts ? 2 * rank : rank;
  res.rank = R;
  std::vector<std::pair<std::string, torch::Tensor>> out;
  std::set<std::string> attn_names;
  static const std::regex attn(R"(text\.layers\.[0-9]+\.self_attn\.([qkvo]_proj))");
  for (const auto& m : modules) {
    std::smatch sm;
    if (std::regex_match(m, sm, attn)) {
      const auto f = padded(factors_of(r, m), R);
      const std::string hf = to_hf_name(m + ".weight");
      const std::string path = "base_model.model." + hf.substr(0, hf.size() - 7);
      out.emplace_back(path + ".lora_A.weight", f.a.contiguous());
      out.emplace_back(path + ".lora_B.weight", f.b.contiguous());
      attn_names.insert(sm[1].str());
    } else if (m.find(".moe.experts.") == std::string::npos) {
      res.skipped.push_back(m);
    }
  }
  bool gate_up = false, down = false;
  if (experts) {
    const int64_t I = cfg.model.moe.expert_hidden, H = cfg.model.text.hidden_size;
    for (int64_t l = 0; l < layers; ++l) {
      std::vector<Factors> gu, dn;
      bool any_gu = false, any_dn = false;
      for (int64_t e = 0; e < E; ++e) {
        const std::string p = "text.layers." + std::to_string(l) + ".moe.experts." + std::to_string(e) + ".";
        auto w1 = factors_of(r, p + "w1"), w3 = factors_of(r, p + "w3"), w2 = factors_of(r, p + "w2");
        any_gu = any_gu || w1.a.defined() || w3.a.defined();
        any_dn = any_dn || w2.a.defined();
        if (!w1.a.defined()) w1 = {torch::zeros({rank, H}), torch::zeros({I, rank})};
        if (!w3.a.defined()) w3 = {torch::zeros({rank, H}), torch::zeros({I, rank})};
        if (!w2.a.defined()) w2 = {torch::zeros({rank, I}), torch::zeros({H, rank})};
        auto b = torch::zeros({2 * I, R});
        b.narrow(0, 0, I).narrow(1, 0, rank).copy_(w1.b);
        b.narrow(0, I, I).narrow(1, rank, rank).copy_(w3.b);
        gu.push_back({torch::cat({w1.a, w3.a}), b});
        dn.push_back(padded(w2, R));
      }
      const std::string path = "base_model.model.model.layers." + std::to_string(l) + ".mlp.experts.";
      if (any_gu) {
        const auto f = stacked(gu);
        const std::string at = any_dn ? path + "base_layer." : path;  // gate_up_proj's wrapper is the inner one
        out.emplace_back(at + "lora_A.weight", f.a.contiguous());
        out.emplace_back(at + "lora_B.weight", f.b.contiguous());
        gate_up = true;
      }
      if (any_dn) {
        const auto f = stacked(dn);
        out.emplace_back(path + "lora_A.weight", f.a.contiguous());
        out.emplace_back(path + "lora_B.weight", f.b.contiguous());
        down = true;
      }
    }
  }
  if (out.empty())
    throw std::runtime_error("adapter \"" + file + "\" adapts nothing of the text backbone (only " +
                             std::to_string(res.skipped.size()) + " other modules), so PEFT's Mixtral has no place "
                             "for it; hint: lora.target_modules text.layers.*.self_attn.* or text.layers.*.moe.experts.*");
  json target_parameters = json::array();
  if (gate_up && down) target_parameters = {"mlp.experts.down_proj", "mlp.experts.gate_up_proj"};
  else if (gate_up) target_parameters = {"mlp.experts.gate_up_proj"};
  else if (down) target_parameters = {"mlp.experts.down_proj"};
  json config = {{"peft_type", "LORA"},
                 {"task_type", "CAUSAL_LM"},
                 {"r", R},
                 {"lora_alpha", cfg.lora.alpha * static_cast<double>(R) / static_cast<double>(rank)},
                 {"lora_dropout", 0.0},
                 {"target_modules", std::vector<std::string>(attn_names.begin(), attn_names.end())},
                 {"target_parameters", target_parameters},
                 {"bias", "none"},
                 {"fan_in_fan_out", false},
                 {"inference_mode", true},
                 {"init_lora_weights", true},
                 {"use_rslora", false},
                 {"use_dora", false},
                 {"rank_pattern", json::object()},
                 {"alpha_pattern", json::object()},
                 {"modules_to_save", nullptr},
                 {"base_model_name_or_path", nullptr},
                 {"omnilite", {{"lora_rank", rank}, {"lora_alpha", cfg.lora.alpha}, {"lora_dropout", cfg.lora.dropout},
                               {"source", adapter_dir}}}};
  fs::create_directories(out_dir);
  save_safetensors(out_dir + "/adapter_model.safetensors", out, {{"format", "pt"}});
  write_file_atomically(out_dir + "/adapter_config.json", config.dump(2) + "\n");
  res.tensors = static_cast<int64_t>(out.size());
  return res;
}

bool is_peft_adapter(const std::string& dir) {
  std::ifstream f(dir + "/adapter_config.json");
  if (!f || !fs::exists(dir + "/adapter_model.safetensors")) return false;
  const auto j = json::parse(f, nullptr, false);
  if (!j.is_object() || j.value("peft_type", std::string()) != "LORA") return false;
  SafetensorsReader r(dir + "/adapter_model.safetensors");
  for (const auto& [name, e] : r.tensors())
    if (name.rfind("base_model.model.model.", 0) == 0) return true;
  return false;
}

PeftAdapter read_peft_adapter(const std::string& dir, const ModelConfig& model) {
  const std::string cfg_path = dir + "/adapter_config.json", file = dir + "/adapter_model.safetensors";
  std::ifstream f(cfg_path);
  const auto j = json::parse(f, nullptr, false);
  if (!j.is_object()) throw std::runtime_error("\"" + cfg_path + "\" is not JSON");
  auto refuse = [&](const std::string& what) {
    throw std::runtime_error("PEFT adapter \"" + dir + "\": " + what + "; OMNI-LITE's LoRA has one rank and alpha for "
                             "every projection and no bias; hint: train it with plain LoRA");
  };
  for (const char* k : {"rank_pattern", "alpha_pattern"})
    if (j.contains(k) && j[k].is_object() && !j[k].empty()) refuse(std::string(k) + " is set");
  for (const char* k : {"use_rslora", "use_dora"})
    if (j.value(k, false)) refuse(std::string(k) + " is true");
  if (j.value("bias", std::string("none")) != "none") refuse("bias is " + j.value("bias", std::string()));
  PeftAdapter out;
  out.lora.enabled = true;
  out.lora.rank = j.value("r", int64_t{0});
  out.lora.alpha = j.value("lora_alpha", 0.0);
  out.lora.dropout = j.value("lora_dropout", 0.0);
  if (out.lora.rank <= 0) refuse("r is " + std::to_string(out.lora.rank));
  const int64_t R = out.lora.rank, E = model.moe.num_experts, I = model.moe.expert_hidden;
  SafetensorsReader r(file);
  r.verify_checksum();
  static const std::regex attn(
      R"(base_model\.model\.(model\.layers\.[0-9]+\.self_attn\.([qkvo]_proj))\.lora_([AB])\.weight)");
  static const std::regex experts(R"(base_model\.model\.model\.layers\.([0-9]+)\.mlp\.experts\.(base_layer\.)?lora_([AB])\.weight)");
  const bool nested = [&] {
    for (const auto& [name, e] : r.tensors())
      if (name.find(".experts.base_layer.") != std::string::npos) return true;
    return false;
  }();
  const auto params = j.value("target_parameters", std::vector<std::string>());
  auto targets = [&](const std::string& leaf) {  // "mlp.experts.gate_up_proj", "experts.gate_up_proj", ...
    return std::any_of(params.begin(), params.end(), [&](const std::string& p) {
      return p.size() >= leaf.size() && p.compare(p.size() - leaf.size(), leaf.size(), leaf) == 0;
    });
  };
  std::set<std::string> patterns;
  for (const auto& [name, e] : r.tensors()) {
    std::smatch m;
    if (std::regex_match(name, m, attn)) {
      const std::string omni = from_hf_name(m[1].str() + ".weight");
      out.tensors.emplace_back(kPeftPrefix + omni.substr(0, omni.size() - 7) + ".lora_" + m[3].str() + ".weight",
                               r.load(name));
      patterns.insert("text.layers.*.self_attn." + m[2].str());
      continue;
    }
    if (std::regex_match(name, m, experts)) {
      if (m[3].str() == "B") continue;  // read with its A below
      // The inner wrapper (".base_layer.") is gate_up_proj's when both are adapted; a lone one is the one targeted.
      const bool gate_up = m[2].matched || (!nested && targets("gate_up_proj"));
      const std::string layer = m[1].str();
      const auto a = r.load(name).to(torch::kFloat32);                                        // [R*E, in]
      const auto b = r.load(name.substr(0, name.size() - 13) + "lora_B.weight").to(torch::kFloat32);  // [out, R*E]
      if (a.size(0) != R * E || b.size(1) != R * E)
        refuse("\"" + name + "\" has " + std::to_string(a.size(0)) + " rows for r = " + std::to_string(R) + " and " +
               std::to_string(E) + " experts");
      const auto bs = b.view({b.size(0), R, E});
      for (int64_t e = 0; e < E; ++e) {
        const std::string p = kPeftPrefix + "text.layers." + layer + ".moe.experts." + std::to_string(e) + ".";
        const auto ae = a.narrow(0, e * R, R).contiguous();
        const auto be = bs.select(2, e).contiguous();  // [out, R]
        if (gate_up) {
          out.tensors.emplace_back(p + "w1.lora_A.weight", ae);
          out.tensors.emplace_back(p + "w1.lora_B.weight", be.narrow(0, 0, I).contiguous());
          out.tensors.emplace_back(p + "w3.lora_A.weight", ae.clone());
          out.tensors.emplace_back(p + "w3.lora_B.weight", be.narrow(0, I, I).contiguous());
        } else {
          out.tensors.emplace_back(p + "w2.lora_A.weight", ae);
          out.tensors.emplace_back(p + "w2.lora_B.weight", be);
        }
      }
      patterns.insert(gate_up ? "text.layers.*.moe.experts.*.w1" : "text.layers.*.moe.experts.*.w2");
      if (gate_up) patterns.insert("text.layers.*.moe.experts.*.w3");
      continue;
    }
    throw std::runtime_error("PEFT adapter \"" + file + "\": tensor \"" + name + "\" is outside what OMNI-LITE maps "
                             "(attention projections and experts of MixtralForCausalLM); hint: see docs/interop.md");
  }
  out.lora.target_modules.assign(patterns.begin(), patterns.end());
  return out;
}

std::vector<std::string> load_adapter_tensors(torch::nn::Module& model,
                                              const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                                              const std::string& what,
                                              const std::vector<std::string>& modules_to_save) {
  std::map<std::string, torch::Tensor> params;
  for (auto& p : model.named_parameters())
    if (saved_with_adapter(p.key(), modules_to_save)) params[kPeftPrefix + p.key()] = p.value();
  torch::NoGradGuard ng;
  std::set<std::string> seen;
  for (const auto& [name, t] : tensors) {
    auto it = params.find(name);
    if (it == params.end())
      throw std::runtime_error(what + ": unexpected tensor \"" + name + "\" that the model does not have; hint: the "
                               "adapter was trained with other lora.target_modules or another model config");
    if (t.sizes() != it->second.sizes())
      throw std::runtime_error(what + ": tensor \"" + name + "\" has shape " + c10::str(t.sizes()) + ", the model "
                               "expects " + c10::str(it->second.sizes()) + "; hint: another lora.rank?");
    it->second.copy_(t);
    seen.insert(name);
  }
  std::vector<std::string> missing;
  for (const auto& [name, p] : params)
    if (!seen.count(name)) missing.push_back(name);
  return missing;
}

}  // namespace omnilite::io
