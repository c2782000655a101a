#include "omnilite/io/gguf_export.h"

#include <filesystem>
#include <functional>
#include <regex>
#include <stdexcept>

#include "omnilite/data/chat.h"
#include "omnilite/io/checkpoint.h"
#include "omnilite/io/hf_export.h"
#include "omnilite/io/safetensors.h"
#include "omnilite/io/weights_reader.h"
#include "omnilite/log.h"
#include "omnilite/modules/linear.h"
#include "omnilite/modules/omnilite.h"

namespace omnilite::io {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// One GGUF tensor: its info and how to make its float32 values (torch order).
struct Planned {
  GgufTensorInfo info;
  std::function<torch::Tensor()> make;
};

std::string blk(int64_t n, const std::string& what) { return "blk." + std::to_string(n) + "." + what + ".weight"; }
std::string layer(int64_t n, const std::string& what) { return "text.layers." + std::to_string(n) + "." + what; }

// The converter's choice of storage type (conversion/base.py, prepare_tensors).
GgmlType type_for(const std::string& gguf_name, const std::vector<int64_t>& ne, GgmlType want) {
  if (ne.size() <= 1 || gguf_name.find("_norm.weight") != std::string::npos ||
      gguf_name.find("ffn_gate_inp.weight") != std::string::npos)
    return GgmlType::F32;
  if (ne[0] % ggml_block_size(want) != 0) return GgmlType::F16;
  return want;
}

std::vector<int64_t> ne_of(const std::vector<int64_t>& shape) { return {shape.rbegin(), shape.rend()}; }

// The text-backbone tensors in GGUF order, with their OMNI-LITE sources.
std::vector<Planned> plan(const WeightsReader& r, const Config& cfg, GgmlType want) {
  const auto& t = cfg.model.text;
  const int64_t experts = cfg.model.moe.num_experts;
  std::vector<Planned> out;
  auto shape_of = [&](const std::string& name) {
    if (!r.contains(name))
      throw std::runtime_error("checkpoint \"" + r.path() + "\": tensor \"" + name + "\" is missing; hint: the "
                               "checkpoint does not hold the model its config describes");
    return r.tensors().at(name).shape;
  };
  auto add = [&](const std::string& gguf_name, std::vector<int64_t> shape, std::function<torch::Tensor()> make) {
    const auto ne = ne_of(shape);
    out.push_back({{gguf_name, ne, type_for(gguf_name, ne, want)}, std::move(make)});
  };
  auto plain = [&](const std::string& gguf_name, const std::string& name) {
    add(gguf_name, shape_of(name), [&r, name] { return r.load(name).to(torch::kFloat32); });
  };
  plain("token_embd.weight", "text.embed_tokens.weight");
  for (int64_t n = 0; n < t.num_layers; ++n) {
    plain(blk(n, "attn_norm"), layer(n, "input_layernorm.weight"));
    for (const auto& [g, proj, heads] : {std::tuple<std::string, std::string, int64_t>{"attn_q", "q_proj", t.num_heads},
                                         {"attn_k", "k_proj", t.num_kv_heads}}) {
      const std::string name = layer(n, "self_attn." + proj + ".weight");
      const int64_t h = heads;
      add(blk(n, g), shape_of(name), [&r, name, h] { return permute_for_gguf(r.load(name).to(torch::kFloat32), h); });
    }
    plain(blk(n, "attn_v"), layer(n, "self_attn.v_proj.weight"));
    plain(blk(n, "attn_output"), layer(n, "self_attn.o_proj.weight"));
    plain(blk(n, "ffn_norm"), layer(n, "post_attention_layernorm.weight"));
    plain(blk(n, "ffn_gate_inp"), layer(n, "moe.gate.weight"));
    for (const auto& [g, w] : {std::pair<std::string, std::string>{"ffn_gate_exps", "w1"}, {"ffn_down_exps", "w2"},
                               {"ffn_up_exps", "w3"}}) {
      std::vector<std::string> names;
      for (int64_t e = 0; e < experts; ++e) names.push_back(layer(n, "moe.experts." + std::to_string(e) + "." + w + ".weight"));
      auto shape = shape_of(names.front());
      shape.insert(shape.begin(), experts);
      add(blk(n, g), shape, [&r, names] {
        std::vector<torch::Tensor> parts;
        for (const auto& nm : names) parts.push_back(r.load(nm).to(torch::kFloat32));
        return torch::stack(parts);
      });
    }
  }
  plain("output_norm.weight", "text.norm.weight");
  if (!t.tie_word_embeddings) plain("output.weight", "lm_head.weight");
  return out;
}

GgufMetadata metadata_for(const Config& cfg, int64_t step, const GgufExportOptions& o, const SpmModel& spm) {
  const auto& t = cfg.model.text;
  const auto& tk = cfg.model.tokens;
  const int64_t vocab = t.vocab_size;
  json tokens = json::array(), scores = json::array(), types = json::array();
  for (int64_t i = 0; i < vocab; ++i) {
    if (i < static_cast<int64_t>(spm.pieces.size())) {
      tokens.push_back(spm.pieces[i].piece);
      scores.push_back(spm.pieces[i].score);
      types.push_back(static_cast<int>(spm.pieces[i].type));
    } else {  // the converter's padding of a vocabulary smaller than the embedding
      tokens.push_back("[PAD" + std::to_string(i) + "]");
      scores.push_back(-10000.0);
      types.push_back(static_cast<int>(SpmPieceType::Unused));
    }
  }
  Config stored = cfg;
  stored.lora.enabled = false;
  stored.train.base_checkpoint.clear();
  stored.data.tokenizer = "tokenizer.model";
  return {
      {"general.architecture", gguf_string("llama")},
      {"general.type", gguf_string("model")},
      {"general.name", gguf_string(o.name)},
      {"llama.block_count", gguf_u32(t.num_layers)},
      {"llama.context_length", gguf_u32(t.max_position_embeddings)},
      {"llama.embedding_length", gguf_u32(t.hidden_size)},
      {"llama.feed_forward_length", gguf_u32(cfg.model.moe.expert_hidden)},
      {"llama.attention.head_count", gguf_u32(t.num_heads)},
      {"llama.attention.head_count_kv", gguf_u32(t.num_kv_heads)},
      {"llama.rope.freq_base", gguf_f32(t.rope_theta)},
      {"llama.attention.layer_norm_rms_epsilon", gguf_f32(t.rms_norm_eps)},
      {"llama.expert_count", gguf_u32(cfg.model.moe.num_experts)},
      {"llama.expert_used_count", gguf_u32(cfg.model.moe.top_k)},
      {"llama.attention.key_length", gguf_u32(t.head_dim)},
      {"llama.attention.value_length", gguf_u32(t.head_dim)},
      {"general.file_type", gguf_u32(llama_file_type(o.type))},
      {"llama.vocab_size", gguf_u32(vocab)},
      {"llama.rope.dimension_count", gguf_u32(t.rope_dim)},
      {"general.quantization_version", gguf_u32(2)},
      {"tokenizer.ggml.model", gguf_string("llama")},
      {"tokenizer.ggml.pre", gguf_string("default")},
      {"tokenizer.ggml.tokens", gguf_array(GgufValueType::STRING, tokens)},
      {"tokenizer.ggml.scores", gguf_array(GgufValueType::F32, scores)},
      {"tokenizer.ggml.token_type", gguf_array(GgufValueType::I32, types)},
      {"tokenizer.ggml.bos_token_id", gguf_u32(tk.bos_id)},
      {"tokenizer.ggml.eos_token_id", gguf_u32(tk.eos_id)},
      {"tokenizer.ggml.unknown_token_id", gguf_u32(0)},
      {"tokenizer.ggml.padding_token_id", gguf_u32(tk.pad_id)},
      {"tokenizer.ggml.add_bos_token", gguf_bool(true)},
      {"tokenizer.ggml.add_eos_token", gguf_bool(false)},
      {"tokenizer.ggml.add_space_prefix", gguf_bool(spm.add_dummy_prefix)},
      {"tokenizer.chat_template", gguf_string(chat_template_jinja())},
      {"omnilite.config", gguf_string(to_json(stored).dump())},
      {"omnilite.step", gguf_u32(static_cast<uint64_t>(step))},
  };
}

}  // namespace

torch::Tensor permute_for_gguf(const torch::Tensor& w, int64_t heads) {
  return w.reshape({heads, 2, w.size(0) / heads / 2, w.size(1)}).transpose(1, 2).reshape(w.sizes());
}

torch::Tensor unpermute_from_gguf(const torch::Tensor& w, int64_t heads) {
  return w.reshape({heads, w.size(0) / heads / 2, 2, w.size(1)}).transpose(1, 2).reshape(w.sizes());
}

GgufExportResult write_gguf_export(const std::string& src, const Config& cfg, int64_t step, const GgufExportOptions& o,
                                   const std::function<void(int64_t, int64_t)>& progress) {
  hf_config(cfg, step, torch::kFloat32);  // refuses a model Mixtral (and so llama.cpp) cannot express
  if (o.tokenizer.empty() || !fs::exists(o.tokenizer))
    throw std::runtime_error("tokenizer \"" + o.tokenizer + "\" (data.tokenizer of the checkpoint) does not exist; a "
                             "GGUF carries its vocabulary; hint: run from the folder the model was trained in, or "
                             "--set data.tokenizer=PATH");
  const SpmModel spm = read_spm_model(o.tokenizer);
  if (static_cast<int64_t>(spm.pieces.size()) > cfg.model.text.vocab_size)
    throw std::runtime_error("tokenizer \"" + o.tokenizer + "\" has " + std::to_string(spm.pieces.size()) +
                             " pieces, more than model.text.vocab_size = " + std::to_string(cfg.model.text.vocab_size));
  WeightsReader r(src);
  r.verify_checksum();
  auto planned = plan(r, cfg, o.type);
  std::vector<GgufTensorInfo> infos;
  for (const auto& p : planned) infos.push_back(p.info);
  GgufExportResult res;
  {
    GgufWriter w(o.out_file, metadata_for(cfg, step, o, spm), infos);
    for (size_t i = 0; i < planned.size(); ++i) {
      const auto& info = w.tensors()[i];
      w.write(info.name, to_ggml(info.type, planned[i].make()));
      res.types[ggml_type_name(info.type)] += 1;
      if (progress) progress(static_cast<int64_t>(i + 1), static_cast<int64_t>(planned.size()));
    }
    w.commit();
  }
  res.tensors = static_cast<int64_t>(planned.size());
  res.bytes = fs::file_size(o.out_file);
  return res;
}

namespace {

int64_t meta_int(const GgufReader& r, const std::string& key) { return r.at(key).get<int64_t>(); }

}  // namespace

Config config_from_gguf(const GgufReader& r) {
  const auto arch = r.at("general.architecture").get<std::string>();
  if (arch != "llama")
    throw std::runtime_error("GGUF \"" + r.path() + "\": general.architecture = \"" + arch + "\"; OMNI-LITE imports "
                             "\"llama\" (Mixtral-style) models");
  if (!r.find("llama.expert_count") || meta_int(r, "llama.expert_count") < 1)
    throw std::runtime_error("GGUF \"" + r.path() + "\": no llama.expert_count: a dense Llama has no experts, and "
                             "OMNI-LITE's feed-forward is a sparse MoE; hint: only MoE (Mixtral-style) GGUFs import");
  if (r.find("llama.rope.scaling.type") && r.at("llama.rope.scaling.type").get<std::string>() != "none")
    throw std::runtime_error("GGUF \"" + r.path() + "\": llama.rope.scaling.type = \"" +
                             r.at("llama.rope.scaling.type").get<std::string>() + "\"; OMNI-LITE's RoPE is unscaled");
  Config cfg;
  if (const auto* own = r.find("omnilite.config")) cfg = parse_config(json::parse(own->value.get<std::string>()));
  auto& t = cfg.model.text;
  auto set = [&](const std::string& key, int64_t& field) {
    if (!r.find(key)) return;
    const int64_t v = meta_int(r, key);
    if (r.find("omnilite.config") && v != field)
      throw std::runtime_error("GGUF \"" + r.path() + "\": " + key + " = " + std::to_string(v) + " but its "
                               "omnilite.config says " + std::to_string(field) + "; hint: the file was edited");
    field = v;
  };
  set("llama.block_count", t.num_layers);
  set("llama.embedding_length", t.hidden_size);
  set("llama.attention.head_count", t.num_heads);
  set("llama.attention.head_count_kv", t.num_kv_heads);
  if (!r.find("llama.attention.key_length") && !r.find("omnilite.config")) t.head_dim = t.hidden_size / t.num_heads;
  set("llama.attention.key_length", t.head_dim);
  if (!r.find("llama.rope.dimension_count") && !r.find("omnilite.config")) t.rope_dim = t.head_dim;
  set("llama.rope.dimension_count", t.rope_dim);
  set("llama.context_length", t.max_position_embeddings);
  set("llama.feed_forward_length", cfg.model.moe.expert_hidden);
  set("llama.expert_count", cfg.model.moe.num_experts);
  set("llama.expert_used_count", cfg.model.moe.top_k);
  const auto* embd = r.tensor("token_embd.weight");
  if (!embd || embd->ne.size() != 2)
    throw std::runtime_error("GGUF \"" + r.path() + "\": no 2-D token_embd.weight");
  t.vocab_size = embd->ne[1];
  // Stored as f32: OMNI-LITE's own config keeps the exact value, which must round to the stored one.
  auto set_f32 = [&](const std::string& key, double& field) {
    if (!r.find(key)) return;
    const double v = r.at(key).get<double>();
    if (r.find("omnilite.config") && static_cast<float>(field) != static_cast<float>(v))
      throw std::runtime_error("GGUF \"" + r.path() + "\": " + key + " = " + std::to_string(v) + " but its "
                               "omnilite.config says " + std::to_string(field) + "; hint: the file was edited");
    if (!r.find("omnilite.config")) field = v;
  };
  set_f32("llama.rope.freq_base", t.rope_theta);
  set_f32("llama.attention.layer_norm_rms_epsilon", t.rms_norm_eps);
  t.tie_word_embeddings = r.tensor("output.weight") == nullptr;
  auto& tk = cfg.model.tokens;
  if (r.find("tokenizer.ggml.bos_token_id")) tk.bos_id = meta_int(r, "tokenizer.ggml.bos_token_id");
  if (r.find("tokenizer.ggml.eos_token_id")) tk.eos_id = meta_int(r, "tokenizer.ggml.eos_token_id");
  if (r.find("tokenizer.ggml.padding_token_id")) tk.pad_id = meta_int(r, "tokenizer.ggml.padding_token_id");
  if (t.rope_dim != t.head_dim)
    throw std::runtime_error("GGUF \"" + r.path() + "\": llama.rope.dimension_count = " + std::to_string(t.rope_dim) +
                             " but the heads are " + std::to_string(t.head_dim) + " wide; OMNI-LITE imports full RoPE");
  validate(cfg);
  return cfg;
}

SpmModel spm_from_gguf(const GgufReader& r) {
  if (!r.find("tokenizer.ggml.model") || r.at("tokenizer.ggml.model").get<std::string>() != "llama")
    throw std::runtime_error("GGUF \"" + r.path() + "\": tokenizer.ggml.model is not \"llama\" (SentencePiece); "
                             "OMNI-LITE's tokenizer is a SentencePiece model");
  const auto& tokens = r.at("tokenizer.ggml.tokens");
  const auto* scores = r.find("tokenizer.ggml.scores");
  const auto* types = r.find("tokenizer.ggml.token_type");
  SpmModel m;
  m.model_type = 2;
  m.byte_fallback = false;
  for (size_t i = 0; i < tokens.size(); ++i) {
    SpmPiece p;
    p.piece = tokens[i].get<std::string>();
    p.score = scores ? scores->value.at(i).get<float>() : 0.0f;
    p.type = types ? static_cast<SpmPieceType>(types->value.at(i).get<int>()) : SpmPieceType::Normal;
    if (p.type == SpmPieceType::Byte) m.byte_fallback = true;
    m.pieces.push_back(std::move(p));
  }
  if (const auto* sp = r.find("tokenizer.ggml.add_space_prefix")) m.add_dummy_prefix = sp->value.get<bool>();
  return m;
}

GgufImportResult import_gguf(const std::string& path, const std::string& out_dir, const std::string& multimodal) {
  GgufReader r(path);
  GgufImportResult res;
  res.cfg = config_from_gguf(r);
  const Config& cfg = res.cfg;
  const auto& t = cfg.model.text;
  fs::create_directories(out_dir);
  if (fs::exists(out_dir + "/model.safetensors"))
    throw std::runtime_error("--out \"" + out_dir + "\" already holds a checkpoint; hint: choose another folder "
                             "(nothing was overwritten)");
  std::unique_ptr<WeightsReader> mm;
  if (!multimodal.empty()) mm = std::make_unique<WeightsReader>(multimodal);

  // OMNI-LITE name -> (GGUF name, and for the expert stacks the expert index; -1 otherwise).
  auto source = [&](const std::string& name) -> std::pair<std::string, int64_t> {
    static const std::regex layer_re(R"(text\.layers\.([0-9]+)\.(.+))");
    static const std::regex expert_re(R"(moe\.experts\.([0-9]+)\.(w[123])\.weight)");
    if (name == "text.embed_tokens.weight") return {"token_embd.weight", -1};
    if (name == "text.norm.weight") return {"output_norm.weight", -1};
    if (name == "lm_head.weight") return {"output.weight", -1};
    std::smatch m, e;
    if (!std::regex_match(name, m, layer_re)) return {"", -1};
    const int64_t n = std::stoll(m[1].str());
    const std::string rest = m[2].str();
    static const std::map<std::string, std::string> direct = {
        {"input_layernorm.weight", "attn_norm"}, {"self_attn.q_proj.weight", "attn_q"},
        {"self_attn.k_proj.weight", "attn_k"}, {"self_attn.v_proj.weight", "attn_v"},
        {"self_attn.o_proj.weight", "attn_output"}, {"post_attention_layernorm.weight", "ffn_norm"},
        {"moe.gate.weight", "ffn_gate_inp"}};
    if (direct.count(rest)) return {blk(n, direct.at(rest)), -1};
    if (std::regex_match(rest, e, expert_re)) {
      const std::string w = e[2].str();
      return {blk(n, w == "w1" ? "ffn_gate_exps" : w == "w2" ? "ffn_down_exps" : "ffn_up_exps"), std::stoll(e[1].str())};
    }
    return {"", -1};
  };

  const LinearBuilder builder;
  const auto parts = model_parts(cfg.model, builder);
  std::vector<TensorSpec> specs;
  for (const auto& part : parts)
    for (const auto& [name, tensor] : state_tensors(*part.make()))
      specs.push_back({part.prefix + "." + name, tensor.scalar_type(), tensor.sizes().vec()});
  {
    SafetensorsWriter w(out_dir + "/model.safetensors", specs, {{"format", "pt"}, {"omnilite.gguf", path}});
    torch::NoGradGuard ng;
    std::string cached_name;
    torch::Tensor cached;  // the expert stack last read (one layer's)
    for (size_t k = 0; k < parts.size(); ++k) {
      torch::manual_seed(cfg.runtime.seed + k);
      for (const auto& [local, init] : state_tensors(*parts[k].make())) {
        const std::string name = parts[k].prefix + "." + local;
        torch::Tensor v;
        if (is_mixtral_tensor(name)) {
          const auto [g, expert] = source(name);
          if (g.empty() || !r.tensor(g))
            throw std::runtime_error("GGUF \"" + path + "\": tensor \"" + (g.empty() ? name : g) + "\" (for \"" +
                                     name + "\") is missing");
          if (expert >= 0) {
            if (cached_name != g) cached = r.load(g), cached_name = g;
            v = cached[expert];
          } else {
            v = r.load(g);
          }
          if (g.find("attn_q") != std::string::npos) v = unpermute_from_gguf(v, t.num_heads);
          if (g.find("attn_k") != std::string::npos) v = unpermute_from_gguf(v, t.num_kv_heads);
          res.text_tensors += 1;
        } else if (mm) {
          if (!mm->contains(name))
            throw std::runtime_error("--multimodal \"" + multimodal + "\": tensor \"" + name + "\" is missing; hint: "
                                     "pass the checkpoint the GGUF was exported from");
          v = mm->load(name);
          res.other_tensors += 1;
        } else {
          v = init.detach();
          res.other_tensors += 1;
          res.multimodal_initialised = true;
        }
        if (v.sizes() != init.sizes())
          throw std::runtime_error("GGUF import: tensor \"" + name + "\" has shape " + c10::str(v.sizes()) +
                                   ", the model expects " + c10::str(init.sizes()));
        w.write(name, v.to(init.scalar_type()).contiguous());
      }
      log::info(log::format("import: piece %zu/%zu (%s)", k + 1, parts.size(), parts[k].prefix.c_str()));
    }
    w.commit();
  }
  write_spm_model(spm_from_gguf(r), out_dir + "/tokenizer.model");
  res.cfg.data.tokenizer = out_dir + "/tokenizer.model";
  res.cfg.lora.enabled = false;
  json state = {{"version", kCheckpointVersion}, {"stage", "omni"},
                {"step", r.find("omnilite.step") ? meta_int(r, "omnilite.step") : 0}, {"config", to_json(res.cfg)},
                {"import", {{"gguf", path}, {"multimodal", multimodal.empty() ? json(nullptr) : json(multimodal)}}}};
  write_file_atomically(out_dir + "/state.json", state.dump(2));
  return res;
}

}  // namespace omnilite::io
