#include "omnilite/io/hf_export.h"

#include "omnilite/data/chat.h"

#include <cctype>
#include <cstring>
#include <functional>
#include <memory>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <regex>
#include <set>
#include <stdexcept>

#include "omnilite/io/checkpoint.h"
#include "omnilite/quant/nf4.h"
#include "omnilite/io/safetensors.h"
#include "omnilite/io/weights_reader.h"

namespace omnilite::io {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

constexpr const char* kIndex = "model.safetensors.index.json";

// A key pattern compiled to a regular expression; the placeholders become capture groups, in order.
struct Compiled {
  std::regex re;
  std::string pattern;
};

Compiled compile(const std::string& pattern) {
  std::string re;
  for (size_t i = 0; i < pattern.size(); ++i) {
    if (pattern.compare(i, 3, "{N}") == 0 || pattern.compare(i, 3, "{M}") == 0) {
      re += "([0-9]+)";
      i += 2;
    } else if (pattern.compare(i, 3, "{*}") == 0) {
      re += "(.+)";
      i += 2;
    } else {
      if (!std::isalnum(static_cast<unsigned char>(pattern[i])) && pattern[i] != '_') re += '\\';
      re += pattern[i];
    }
  }
  return {std::regex(re), pattern};
}

// `pattern` with its placeholders replaced by the captures of `m`, in order.
std::string fill(const std::string& pattern, const std::smatch& m) {
  std::string out;
  size_t group = 1;
  for (size_t i = 0; i < pattern.size(); ++i) {
    if (pattern[i] == '{' && i + 2 < pattern.size() && pattern[i + 2] == '}') {
      out += m[group++].str();
      i += 2;
    } else {
      out += pattern[i];
    }
  }
  return out;
}

struct CompiledMap {
  std::vector<Compiled> omni, hf;
};

const CompiledMap& compiled_map() {
  static const CompiledMap map = [] {
    CompiledMap m;
    for (const auto& r : key_map()) {
      m.omni.push_back(compile(r.omnilite));
      m.hf.push_back(compile(r.hf));
    }
    return m;
  }();
  return map;
}

// Applies the first matching rule from `from` to `to`; throws naming the tensor when none matches.
std::string translate(const std::string& name, bool to_hf) {
  const auto& m = compiled_map();
  const auto& from = to_hf ? m.omni : m.hf;
  const auto& to = to_hf ? m.hf : m.omni;
  std::smatch match;
  for (size_t i = 0; i < from.size(); ++i)
    if (std::regex_match(name, match, from[i].re)) return fill(to[i].pattern, match);
  throw std::runtime_error(std::string("tensor \"") + name + "\" is not in the key map of the Hugging Face export (" +
                           (to_hf ? "an OMNI-LITE name was expected" : "a Mixtral or OMNI-LITE-prefixed name was "
                           "expected") + "); hint: see docs/export.md for the names");
}

std::string shard_name(size_t k, size_t n) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "model-%05zu-of-%05zu.safetensors", k + 1, n);
  return buf;
}

bool is_weights_file(const std::string& name) {
  return name == "model.safetensors" || name == kIndex ||
         (name.rfind("model-", 0) == 0 && name.size() > 12 && name.substr(name.size() - 12) == ".safetensors");
}

std::string dtype_label(torch::ScalarType t) { return t == torch::kBFloat16 ? "bfloat16" : "float32"; }

}  // namespace

const std::vector<KeyRule>& key_map() {
  static const std::vector<KeyRule> rules = {
      {"text.embed_tokens.weight", "model.embed_tokens.weight"},
      {"text.layers.{N}.input_layernorm.weight", "model.layers.{N}.input_layernorm.weight"},
      {"text.layers.{N}.self_attn.q_proj.weight", "model.layers.{N}.self_attn.q_proj.weight"},
      {"text.layers.{N}.self_attn.k_proj.weight", "model.layers.{N}.self_attn.k_proj.weight"},
      {"text.layers.{N}.self_attn.v_proj.weight", "model.layers.{N}.self_attn.v_proj.weight"},
      {"text.layers.{N}.self_attn.o_proj.weight", "model.layers.{N}.self_attn.o_proj.weight"},
      {"text.layers.{N}.post_attention_layernorm.weight", "model.layers.{N}.post_attention_layernorm.weight"},
      {"text.layers.{N}.moe.gate.weight", "model.layers.{N}.block_sparse_moe.gate.weight"},
      {"text.layers.{N}.moe.experts.{M}.w1.weight", "model.layers.{N}.block_sparse_moe.experts.{M}.w1.weight"},
      {"text.layers.{N}.moe.experts.{M}.w2.weight", "model.layers.{N}.block_sparse_moe.experts.{M}.w2.weight"},
      {"text.layers.{N}.moe.experts.{M}.w3.weight", "model.layers.{N}.block_sparse_moe.experts.{M}.w3.weight"},
      {"text.norm.weight", "model.norm.weight"},
      {"lm_head.weight", "lm_head.weight"},
      {"vision.{*}", "vision.{*}"},
      {"resampler.{*}", "resampler.{*}"},
      {"flow.{*}", "flow.{*}"},
      {"vqvae.{*}", "vqvae.{*}"},
  };
  return rules;
}

bool is_mixtral_tensor(const std::string& n) { return n.rfind("text.", 0) == 0 || n == "lm_head.weight"; }

std::string to_hf_name(const std::string& n) { return translate(n, true); }
std::string from_hf_name(const std::string& n) { return translate(n, false); }

int64_t key_rules_matching(const std::string& name, bool hf) {
  const auto& m = compiled_map();
  int64_t count = 0;
  for (const auto& c : hf ? m.hf : m.omni) count += std::regex_match(name, c.re) ? 1 : 0;
  return count;
}

bool has_hf_names(const std::vector<std::string>& names) {
  for (const auto& n : names)
    if (n == "model.embed_tokens.weight") return true;
  return false;
}

bool is_hf_export(const std::string& dir) {
  std::ifstream f(dir + "/config.json");
  if (!f) return false;
  const auto j = json::parse(f, nullptr, false);
  return j.is_object() && j.contains("architectures") && j.contains("omnilite");
}

json hf_config(const Config& cfg, int64_t step, torch::ScalarType dtype) {
  const auto& t = cfg.model.text;
  if (t.rope_dim != t.head_dim)
    throw std::runtime_error("model.text.rope_dim = " + std::to_string(t.rope_dim) + " but head_dim = " +
                             std::to_string(t.head_dim) + ": Mixtral rotates whole heads, so this model has no "
                             "Mixtral equivalent; hint: export with --format omnilite");
  Config stored = cfg;
  stored.lora.enabled = false;  // the exported weights are those of the plain model
  stored.train.base_checkpoint.clear();
  stored.data.tokenizer = "tokenizer.model";  // resolved against the export folder when read
  const auto& tk = cfg.model.tokens;
  json prefixes = {{"vision.", "ViT image encoder (patch embedding, blocks, final norm)"},
                   {"resampler.", "Perceiver resampler: vision features -> num_latents tokens of the text width"},
                   {"flow.", "rectified-flow head: latent-token input projection, timestep MLP, velocity output"},
                   {"vqvae.", "VQ-VAE encoder, codebook, decoder and latent normalisation statistics"}};
  return {
      {"architectures", {"MixtralForCausalLM"}},
      {"model_type", "mixtral"},
      {"vocab_size", t.vocab_size},
      {"hidden_size", t.hidden_size},
      {"intermediate_size", cfg.model.moe.expert_hidden},
      {"num_hidden_layers", t.num_layers},
      {"num_attention_heads", t.num_heads},
      {"num_key_value_heads", t.num_kv_heads},
      {"head_dim", t.head_dim},
      {"hidden_act", "silu"},
      {"max_position_embeddings", t.max_position_embeddings},
      {"initializer_range", 0.02},
      {"rms_norm_eps", t.rms_norm_eps},
      {"rope_theta", t.rope_theta},  // read by llama.cpp's converter and transformers 4
      {"rope_parameters", {{"rope_theta", t.rope_theta}, {"rope_type", "default"}}},  // transformers 5
      {"tie_word_embeddings", t.tie_word_embeddings},
      {"num_local_experts", cfg.model.moe.num_experts},
      {"num_experts_per_tok", cfg.model.moe.top_k},
      {"router_aux_loss_coef", cfg.train.aux_coef},
      {"router_jitter_noise", 0.0},
      {"output_router_logits", false},
      {"sliding_window", nullptr},
      {"attention_dropout", 0.0},
      {"use_cache", true},
      {"bos_token_id", tk.bos_id},
      {"eos_token_id", tk.eos_id},
      {"pad_token_id", tk.pad_id},
      {"dtype", dtype_label(dtype)},
      {"omnilite",
       {{"version", kCheckpointVersion},
        {"stage", "omni"},
        {"step", step},
        {"config", to_json(stored)},
        {"prefixes", prefixes},
        {"key_map", "docs/export.md of OMNI-LITE: the text backbone under Mixtral's names in model*.safetensors, the "
                     "rest under the prefixes in omnilite/multimodal.safetensors"}}},
  };
}

json hf_export_state(const std::string& dir) {
  std::ifstream f(dir + "/config.json");
  const auto j = json::parse(f, nullptr, false);
  if (!j.is_object() || !j.contains("omnilite") || !j["omnilite"].is_object())
    throw std::runtime_error("\"" + dir + "/config.json\" has no \"omnilite\" section; hint: only folders written by "
                             "`omnilite export --format hf` import back (their config holds the whole model)");
  json state = j["omnilite"];
  if (!state.contains("config") || state.value("version", 0) != kCheckpointVersion)
    throw std::runtime_error("\"" + dir + "/config.json\": the \"omnilite\" section lacks the config or is of another "
                             "version (this build reads version " + std::to_string(kCheckpointVersion) + ")");
  if (fs::exists(dir + "/tokenizer.model")) state["config"]["data"]["tokenizer"] = dir + "/tokenizer.model";
  return state;
}

uint64_t parse_byte_size(const std::string& flag, const std::string& text) {
  static const std::regex re("^([0-9]+)(B|KB|MB|GB|TB)?$");
  std::smatch m;
  if (!std::regex_match(text, m, re))
    throw std::runtime_error(flag + " \"" + text + "\": expected a size such as 5GB, 500MB, 64KB or a byte count");
  const std::map<std::string, uint64_t> unit = {{"", 1}, {"B", 1}, {"KB", 1000}, {"MB", 1000'000},
                                                {"GB", 1000'000'000}, {"TB", 1000'000'000'000}};
  const uint64_t v = std::stoull(m[1].str()) * unit.at(m[2].str());
  if (v == 0) throw std::runtime_error(flag + " \"" + text + "\" must be positive");
  return v;
}

namespace {

// bitsandbytes' serialisation of one Linear4bit weight (nf4, blocksize 64, double quantisation), as
// QuantState.as_dict(packed=True) and transformers' save_pretrained write it.
struct Bnb4bit {
  std::vector<std::pair<std::string, torch::Tensor>> tensors;  // suffix ("" = the weight itself) -> tensor
};

Bnb4bit bnb_serialise(const torch::Tensor& w, torch::ScalarType dtype) {
  const auto q = quant::nf4_quantize(w);
  const auto& codes = quant::nf4_code_values();
  const auto& map = quant::dynamic_map_values();
  json state = {{"quant_type", "nf4"}, {"blocksize", quant::kNf4BlockSize}, {"dtype", dtype_label(dtype)},
                {"shape", w.sizes().vec()}, {"nested_blocksize", quant::kAbsmaxBlockSize},
                {"nested_dtype", "float32"}, {"nested_offset", static_cast<double>(q.absmax_mean.item<float>())}};
  const std::string js = state.dump();
  auto js_bytes = torch::empty({static_cast<int64_t>(js.size())}, torch::kUInt8);
  std::memcpy(js_bytes.data_ptr<uint8_t>(), js.data(), js.size());
  Bnb4bit b;
  b.tensors = {{"", q.packed.view({-1, 1})},
               {".absmax", q.absmax_q},
               {".quant_map", torch::tensor(std::vector<float>(codes.begin(), codes.end()))},
               {".nested_absmax", q.absmax_scale},
               {".nested_quant_map", torch::tensor(std::vector<float>(map.begin(), map.end()))},
               {".quant_state.bitsandbytes__nf4", js_bytes}};
  return b;
}

// The weights transformers' bitsandbytes integration stores in 4 bits (its nn.Linear modules but the LM head).
bool bnb_quantised(const std::string& omnilite_name) {
  static const std::regex re(R"(text\.layers\.[0-9]+\.self_attn\.[qkvo]_proj\.weight)");
  return std::regex_match(omnilite_name, re);
}

json bnb_quantization_config() {
  return {{"quant_method", "bitsandbytes"}, {"load_in_4bit", true}, {"load_in_8bit", false},
          {"bnb_4bit_quant_type", "nf4"}, {"bnb_4bit_use_double_quant", true}, {"bnb_4bit_compute_dtype", "float32"},
          {"bnb_4bit_quant_storage", "uint8"}, {"llm_int8_skip_modules", nullptr}, {"llm_int8_threshold", 6.0},
          {"llm_int8_has_fp16_weight", false}, {"llm_int8_enable_fp32_cpu_offload", false}};
}

// One tensor to write: its stored name, type and shape, and how to make it.
struct Item {
  TensorSpec spec;
  std::function<torch::Tensor()> make;
  uint64_t bytes = 0;
};

uint64_t bytes_of(const TensorSpec& s) {
  uint64_t b = c10::elementSize(s.dtype);
  for (auto d : s.shape) b *= static_cast<uint64_t>(d);
  return b;
}

void write_file(const std::string& path, const std::vector<Item>& items) {
  std::vector<TensorSpec> specs;
  for (const auto& it : items) specs.push_back(it.spec);
  SafetensorsWriter w(path, specs, {{"format", "pt"}});
  for (const auto& it : items) w.write(it.spec.name, it.make());
  w.commit();
}

}  // namespace

HfExportResult write_hf_export(const std::string& src, const Config& cfg, int64_t step, const HfExportOptions& o) {
  json config = hf_config(cfg, step, o.dtype);  // refuses models Mixtral cannot express, before any work
  if (o.quant != "none" && o.quant != "nf4")
    throw std::runtime_error("--quant \"" + o.quant + "\": expected none or nf4");
  if (o.quant == "nf4") config["quantization_config"] = bnb_quantization_config();
  WeightsReader r(src);
  r.verify_checksum();
  fs::create_directories(o.out_dir);

  // The Mixtral tensors in OMNI-LITE name order, greedily packed into shards of at most max_shard_bytes; the rest
  // into the multimodal file.
  std::vector<std::vector<Item>> shards(1);
  std::vector<Item> extras;
  uint64_t in_shard = 0, total = 0;
  for (const auto& [name, e] : r.tensors()) {
    const std::string n = name;
    const auto dtype = c10::isFloatingType(e.dtype) ? o.dtype : e.dtype;
    if (!is_mixtral_tensor(n)) {
      extras.push_back({{n, dtype, e.shape}, [&r, n, dtype] { return r.load(n).to(dtype); }});
      continue;
    }
    std::vector<Item> items;
    const std::string hf = to_hf_name(n);
    if (o.quant == "nf4" && bnb_quantised(n)) {
      for (const auto& [suffix, t] : bnb_serialise(r.load(n), o.dtype).tensors)
        items.push_back({{hf + suffix, t.scalar_type(), t.sizes().vec()}, [t] { return t; }});
    } else {
      items.push_back({{hf, dtype, e.shape}, [&r, n, dtype] { return r.load(n).to(dtype); }});
    }
    for (auto& it : items) {
      it.bytes = bytes_of(it.spec);
      if (!shards.back().empty() && in_shard + it.bytes > o.max_shard_bytes) {
        shards.emplace_back();
        in_shard = 0;
      }
      in_shard += it.bytes;
      total += it.bytes;
      shards.back().push_back(std::move(it));
    }
  }

  // Everything is written into a staging folder first and moved into place at the end, so a failed export leaves
  // the previous one whole.
  const std::string stage = o.out_dir + "/.export.tmp";
  fs::remove_all(stage);
  fs::create_directories(stage);
  HfExportResult res;
  json weight_map = json::object();
  for (size_t k = 0; k < shards.size(); ++k) {
    const std::string file = shards.size() == 1 ? "model.safetensors" : shard_name(k, shards.size());
    write_file(stage + "/" + file, shards[k]);
    for (const auto& it : shards[k]) weight_map[it.spec.name] = file;
    res.tensors += static_cast<int64_t>(shards[k].size());
    res.shards.push_back(file);
  }
  if (!extras.empty()) {
    fs::create_directories(fs::path(stage + "/" + kMultimodalFile).parent_path());
    write_file(stage + "/" + kMultimodalFile, extras);
    res.tensors += static_cast<int64_t>(extras.size());
  }
  res.bytes = total;
  if (shards.size() > 1)
    write_file_atomically(stage + "/" + kIndex,
                      json{{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}}.dump(2) + "\n");
  write_file_atomically(stage + "/config.json", config.dump(2) + "\n");
  write_file_atomically(stage + "/generation_config.json",
                    json{{"bos_token_id", cfg.model.tokens.bos_id}, {"eos_token_id", cfg.model.tokens.eos_id},
                         {"pad_token_id", cfg.model.tokens.pad_id}}.dump(2) + "\n");
  if (!o.tokenizer.empty()) {
    if (!fs::exists(o.tokenizer))
      throw std::runtime_error("tokenizer \"" + o.tokenizer + "\" (data.tokenizer of the checkpoint) does not exist; "
                               "hint: run from the folder the checkpoint was trained in, or set --set data.tokenizer=...");
    fs::copy_file(o.tokenizer, stage + "/tokenizer.model", fs::copy_options::overwrite_existing);
    // Llama's convention, as OMNI-LITE frames documents and prompts: bos first, no eos. The chat template is
    // OMNI-LITE's (data/chat.h), so apply_chat_template gives the ids OMNI-LITE fine-tunes on. It writes "<s>" and
    // "</s>" as text, which only become their ids when special tokens are read out of text: transformers' default,
    // and every Llama and Mistral tokenizer's (docs/export.md: typed "</s>" or "<image>" are then special in
    // transformers, while OMNI-LITE and llama.cpp read prompts as plain text).
    write_file_atomically(stage + "/tokenizer_config.json",
                      json{{"tokenizer_class", "LlamaTokenizer"}, {"bos_token", "<s>"}, {"eos_token", "</s>"},
                           {"unk_token", "<unk>"}, {"add_bos_token", true}, {"add_eos_token", false},
                           {"legacy", true}, {"chat_template", chat_template_jinja()},
                           {"model_max_length", cfg.model.text.max_position_embeddings}}.dump(2) + "\n");
    write_file_atomically(stage + "/special_tokens_map.json",
                      json{{"bos_token", "<s>"}, {"eos_token", "</s>"}, {"unk_token", "<unk>"}}.dump(2) + "\n");
  }

  // Into place: weights first, config last; then files of an earlier export that this one does not have.
  std::set<std::string> written;
  for (const auto& e : fs::directory_iterator(stage)) written.insert(e.path().filename().string());
  for (const auto& name : written) {
    if (name == "config.json") continue;
    if (fs::is_directory(stage + "/" + name)) fs::remove_all(o.out_dir + "/" + name);
    fs::rename(stage + "/" + name, o.out_dir + "/" + name);
  }
  fs::rename(stage + "/config.json", o.out_dir + "/config.json");
  fs::remove_all(stage);
  for (const auto& e : fs::directory_iterator(o.out_dir)) {
    const std::string name = e.path().filename().string();
    if (is_weights_file(name) && !written.count(name)) fs::remove(e.path());
  }
  if (extras.empty()) fs::remove_all(o.out_dir + "/omnilite");
  fsync_directory(o.out_dir);
  return res;
}

}  // namespace omnilite::io
