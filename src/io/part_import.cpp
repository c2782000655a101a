#include "omnilite/io/part_import.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <stdexcept>

#include "omnilite/data/tokenizer.h"
#include "omnilite/io/spm_model.h"
#include "omnilite/io/weights_reader.h"
#include "omnilite/log.h"

namespace omnilite::io {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

json read_json_file(const std::string& path, const std::string& what) {
  std::ifstream f(path);
  if (!f) throw std::runtime_error(what + ": \"" + path + "\" is missing; hint: pass the folder save_pretrained wrote");
  auto j = json::parse(f, nullptr, false);
  if (!j.is_object()) throw std::runtime_error(what + ": \"" + path + "\" is not a JSON object");
  return j;
}

std::string num(double v) {
  std::ostringstream s;
  s << v;
  return s.str();
}

// Refuses a source whose config value differs from the model's: names both keys and values.
void require_same(const std::string& what, const std::string& src_key, double src, const std::string& cfg_key,
                  double want) {
  if (std::abs(src - want) <= 1e-12 * std::max(1.0, std::abs(want))) return;
  throw std::runtime_error(what + ": config.json " + src_key + " = " + num(src) + " but " + cfg_key + " = " +
                           num(want) + "; hint: set " + cfg_key + " to the checkpoint's value, or use a checkpoint "
                           "of the config's dimensions");
}

std::string weights_folder(const std::string& dir, const std::string& what) {
  if (!fs::is_directory(dir)) throw std::runtime_error(what + ": \"" + dir + "\" is not a folder");
  if (!has_weights(dir))
    throw std::runtime_error(what + ": \"" + dir + "\" holds no model.safetensors or model.safetensors.index.json; "
                             "hint: save the model with save_pretrained (safetensors)");
  return dir;
}

// OpenAI CLIP's pixel normalisation (transformers' OPENAI_CLIP_MEAN / OPENAI_CLIP_STD).
const std::vector<double> kClipMean = {0.48145466, 0.4578275, 0.40821073};
const std::vector<double> kClipStd = {0.26862954, 0.26130258, 0.27577711};

}  // namespace

std::vector<PartSource> parse_part_sources(const std::vector<std::string>& specs) {
  std::vector<PartSource> out;
  std::set<std::string> seen;
  for (const auto& s : specs) {
    const auto eq = s.find('=');
    const std::string part = s.substr(0, eq);
    if (eq == std::string::npos || eq + 1 == s.size())
      throw std::runtime_error("--from \"" + s + "\": expected PART=SOURCE (text=DIR, vision=DIR or tokenizer=FILE)");
    if (part != "text" && part != "vision" && part != "tokenizer")
      throw std::runtime_error("--from \"" + s + "\": unknown part \"" + part +
                               "\"; expected text, vision or tokenizer");
    if (!seen.insert(part).second) throw std::runtime_error("--from \"" + s + "\": part " + part + " given twice");
    out.push_back({part, s.substr(eq + 1)});
  }
  return out;
}

ExtendedTokenizer extend_tokenizer(const std::string& source, const std::string& out_path) {
  const std::string in = fs::is_directory(source) ? source + "/tokenizer.model" : source;
  const SpmModel m = read_spm_model(in);
  std::map<std::string, int64_t> id;
  for (size_t i = 0; i < m.pieces.size(); ++i) id.emplace(m.pieces[i].piece, static_cast<int64_t>(i));
  std::vector<SpmPiece> add;
  for (const auto& marker : reserved_marker_pieces())
    if (!id.count(marker)) {
      id[marker] = static_cast<int64_t>(m.pieces.size() + add.size());
      add.push_back({marker, 0.0f, SpmPieceType::UserDefined});
    }
  for (const char* control : {"<s>", "</s>"})
    if (!id.count(control))
      throw std::runtime_error("--from tokenizer=" + source + ": \"" + in + "\" has no " + control + " piece; hint: "
                               "a Llama / Mistral SentencePiece tokenizer.model is expected");
  append_spm_pieces(in, add, out_path);
  ExtendedTokenizer r;
  r.path = out_path;
  r.vocab_size = static_cast<int64_t>(m.pieces.size() + add.size());
  r.added = static_cast<int64_t>(add.size());
  auto& t = r.tokens;
  t.bos_id = id["<s>"];
  t.eos_id = id["</s>"];
  t.pad_id = id.count("<pad>") ? id["<pad>"] : 0;  // Llama has none: <unk> (0), never a target
  const auto& markers = reserved_marker_pieces();
  t.image_id = id[markers[0]];
  t.image_begin_id = id[markers[1]];
  t.image_end_id = id[markers[2]];
  t.gen_image_id = id[markers[3]];
  return r;
}

PartImporter::PartImporter(const Config& cfg, const std::vector<PartSource>& sources) : cfg_(cfg) {
  for (const auto& s : sources) {
    if (s.part == "text") open_text(s.path);
    else if (s.part == "vision") open_vision(s.path);
  }
}

// The Mixtral folder, its config.json checked against model.text and model.moe.
void PartImporter::open_text(const std::string& dir) {
  const auto& cfg = cfg_;
  const PartSource s{"text", dir};
  const std::string what = "--from text=" + s.path;
  text_dir_ = weights_folder(s.path, what);
  const json c = read_json_file(s.path + "/config.json", what);
  if (c.value("model_type", std::string()) != "mixtral")
    throw std::runtime_error(what + ": config.json model_type = \"" + c.value("model_type", std::string()) +
                             "\", expected \"mixtral\" (a MixtralForCausalLM checkpoint)");
  const auto& t = cfg.model.text;
  const auto& moe = cfg.model.moe;
  auto val = [&](const char* k, double dflt) { return c.contains(k) && c[k].is_number() ? c[k].get<double>() : dflt; };
  const double heads = val("num_attention_heads", 32), hidden = val("hidden_size", 4096);
  require_same(what, "hidden_size", hidden, "model.text.hidden_size", t.hidden_size);
  require_same(what, "num_attention_heads", heads, "model.text.num_heads", t.num_heads);
  require_same(what, "num_key_value_heads", val("num_key_value_heads", 8), "model.text.num_kv_heads", t.num_kv_heads);
  require_same(what, "head_dim", val("head_dim", hidden / heads), "model.text.head_dim", t.head_dim);
  require_same(what, "head_dim (Mixtral rotates every dimension)", val("head_dim", hidden / heads),
               "model.text.rope_dim", t.rope_dim);
  require_same(what, "intermediate_size", val("intermediate_size", 14336), "model.moe.expert_hidden",
               moe.expert_hidden);
  require_same(what, "num_local_experts", val("num_local_experts", 8), "model.moe.num_experts", moe.num_experts);
  require_same(what, "num_experts_per_tok", val("num_experts_per_tok", 2), "model.moe.top_k", moe.top_k);
  const json rope = c.value("rope_parameters", json::object());
  const double theta = rope.is_object() && rope.contains("rope_theta") ? rope["rope_theta"].get<double>()
                                                                         : val("rope_theta", 1e6);
  require_same(what, "rope_theta", theta, "model.text.rope_theta", t.rope_theta);
  require_same(what, "rms_norm_eps", val("rms_norm_eps", 1e-5), "model.text.rms_norm_eps", t.rms_norm_eps);
  require_same(what, "tie_word_embeddings", c.value("tie_word_embeddings", false) ? 1 : 0,
               "model.text.tie_word_embeddings", t.tie_word_embeddings ? 1 : 0);
  const double layers = val("num_hidden_layers", 32);
  if (layers < static_cast<double>(t.num_layers))
    throw std::runtime_error(what + ": config.json num_hidden_layers = " + num(layers) + " but model.text.num_layers"
                             " = " + std::to_string(t.num_layers) + "; hint: the model takes the checkpoint's first"
                             " layers, so it may have as many or fewer");
  text_vocab_ = static_cast<int64_t>(val("vocab_size", 32000));
  if (text_vocab_ > t.vocab_size)
    throw std::runtime_error(what + ": config.json vocab_size = " + std::to_string(text_vocab_) + " but model.text."
                             "vocab_size = " + std::to_string(t.vocab_size) + "; hint: set model.text.vocab_size to "
                             "at least the checkpoint's (or pass --from tokenizer=DIR with its tokenizer)");
  text_ = std::make_unique<WeightsReader>(text_dir_);
  log::info(log::format("init: text backbone from %s: %lld of its %lld layers%s", text_dir_.c_str(),
                        static_cast<long long>(t.num_layers), static_cast<long long>(layers),
                        text_vocab_ < t.vocab_size ? log::format(", embedding grown from %lld to %lld rows (mean "
                                                                 "row)", static_cast<long long>(text_vocab_),
                                                                 static_cast<long long>(t.vocab_size)).c_str()
                                                   : ""));
}

// The CLIP folder, its config.json checked against model.vision, and the pixel normalisation to fold.
void PartImporter::open_vision(const std::string& dir) {
  const auto& cfg = cfg_;
  const PartSource s{"vision", dir};
  const std::string what = "--from vision=" + s.path;
  vision_dir_ = weights_folder(s.path, what);
  json c = read_json_file(s.path + "/config.json", what);
  const std::string type = c.value("model_type", std::string());
  if (type == "clip") c = c.value("vision_config", json::object());
  else if (type != "clip_vision_model")
    throw std::runtime_error(what + ": config.json model_type = \"" + type + "\", expected \"clip_vision_model\" "
                             "or \"clip\" (a CLIPVisionModel or CLIPModel checkpoint)");
  const auto& v = cfg.model.vision;
  auto val = [&](const char* k, double dflt) { return c.contains(k) && c[k].is_number() ? c[k].get<double>() : dflt; };
  require_same(what, "hidden_size", val("hidden_size", 768), "model.vision.width", v.width);
  require_same(what, "num_attention_heads", val("num_attention_heads", 12), "model.vision.num_heads", v.num_heads);
  require_same(what, "intermediate_size", val("intermediate_size", 3072), "model.vision.mlp_dim", v.mlp_dim);
  require_same(what, "patch_size", val("patch_size", 32), "model.vision.patch_size", v.patch_size);
  require_same(what, "image_size", val("image_size", 224), "model.vision.image_size", v.image_size);
  require_same(what, "num_channels", val("num_channels", 3), "model.vision.in_channels", v.in_channels);
  require_same(what, "layer_norm_eps", val("layer_norm_eps", 1e-5), "model.vision.norm_eps", v.norm_eps);
  const std::string act = c.value("hidden_act", std::string("quick_gelu"));
  if (act != v.activation)
    throw std::runtime_error(what + ": config.json hidden_act = \"" + act + "\" but model.vision.activation = \"" +
                             v.activation + "\"; hint: set model.vision.activation to \"" + act + "\"");
  if (!v.class_token || !v.pre_norm)
    throw std::runtime_error(what + ": CLIP has a class token and a pre-norm, model.vision.class_token = " +
                             (v.class_token ? "true" : "false") + ", model.vision.pre_norm = " +
                             (v.pre_norm ? "true" : "false") + "; hint: set both to true (configs/llava-stage1.json)");
  const double layers = val("num_hidden_layers", 12);
  if (layers < static_cast<double>(v.depth))
    throw std::runtime_error(what + ": config.json num_hidden_layers = " + num(layers) + " but model.vision.depth = " +
                             std::to_string(v.depth) + "; hint: the encoder takes the checkpoint's first layers");
  vision_ = std::make_unique<WeightsReader>(vision_dir_);
  vision_prefix_ = vision_->contains("vision_model.embeddings.class_embedding") ? "vision_model." : "";
  pixel_mean_ = kClipMean;
  pixel_std_ = kClipStd;
  std::string norm_from = "OpenAI CLIP's image_mean / image_std";
  if (fs::exists(s.path + "/preprocessor_config.json")) {
    const json p = read_json_file(s.path + "/preprocessor_config.json", what);
    if (p.contains("image_mean") && p.contains("image_std")) {
      pixel_mean_ = p["image_mean"].get<std::vector<double>>();
      pixel_std_ = p["image_std"].get<std::vector<double>>();
      norm_from = "preprocessor_config.json";
    }
  }
  if (static_cast<int64_t>(pixel_mean_.size()) != v.in_channels ||
      static_cast<int64_t>(pixel_std_.size()) != v.in_channels)
    throw std::runtime_error(what + ": image_mean / image_std have " + std::to_string(pixel_mean_.size()) + " / " +
                             std::to_string(pixel_std_.size()) + " values for " + std::to_string(v.in_channels) +
                             " channels");
  log::info(log::format("init: vision encoder from %s: %lld of its %lld layers, pixel normalisation (%s) folded "
                        "into the patch embedding", vision_dir_.c_str(), static_cast<long long>(v.depth),
                        static_cast<long long>(layers), norm_from.c_str()));
}

PartImporter::~PartImporter() = default;

torch::Tensor PartImporter::tensor(const std::string& name, c10::IntArrayRef shape) const {
  if (source_shape(name).empty()) return {};
  check_shape(name, shape);
  ++imported_;
  return name.rfind("vision.", 0) == 0 ? vision_tensor(name) : text_tensor(name);
}

// A text tensor under its OMNI-LITE name (the reader maps Mixtral's names); layers past the model's are never asked
// for. The embedding and LM head grow to the model's vocabulary with the mean row.
torch::Tensor PartImporter::text_tensor(const std::string& name) const {
  auto t = text_->load(name).to(torch::kFloat32);
  const int64_t vocab = cfg_.model.text.vocab_size;
  if ((name == "text.embed_tokens.weight" || name == "lm_head.weight") && t.size(0) < vocab) {
    auto mean = t.mean(0, /*keepdim=*/true).expand({vocab - t.size(0), t.size(1)});
    t = torch::cat({t, mean}, 0);
  }
  return t;
}

// The CLIP tensors (transformers' CLIPVisionTransformer names) behind an OMNI-LITE vision tensor, and how they
// combine into the fused and folded forms the model holds.
PartImporter::ClipSource PartImporter::clip_source(const std::string& name) const {
  using K = ClipSource::Kind;
  const std::string p = vision_prefix_;
  if (name == "vision.patch_embed.proj.weight") return {{p + "embeddings.patch_embedding.weight"}, K::PatchWeight};
  if (name == "vision.patch_embed.proj.bias") return {{p + "embeddings.patch_embedding.weight"}, K::PatchBias};
  if (name == "vision.patch_embed.pos_embed") return {{p + "embeddings.position_embedding.weight"}, K::Unsqueeze};
  if (name == "vision.patch_embed.cls_token") return {{p + "embeddings.class_embedding"}, K::ClassToken};
  if (name.rfind("vision.pre_norm.", 0) == 0) return {{p + "pre_layrnorm." + name.substr(16)}, K::Same};
  if (name.rfind("vision.norm.", 0) == 0) return {{p + "post_layernorm." + name.substr(12)}, K::Same};
  const std::string blocks = "vision.blocks.";
  if (name.rfind(blocks, 0) == 0) {
    const auto dot = name.find('.', blocks.size());
    const std::string layer = p + "encoder.layers." + name.substr(blocks.size(), dot - blocks.size()) + ".";
    const std::string rest = name.substr(dot + 1);                 // e.g. "qkv.weight"
    const std::string mod = rest.substr(0, rest.find('.')), kind = rest.substr(rest.find('.') + 1);
    if (mod == "qkv")
      return {{layer + "self_attn.q_proj." + kind, layer + "self_attn.k_proj." + kind,
               layer + "self_attn.v_proj." + kind},
              K::Concat};
    static const std::map<std::string, std::string> same = {
        {"proj", "self_attn.out_proj"}, {"norm1", "layer_norm1"}, {"norm2", "layer_norm2"}, {"fc1", "mlp.fc1"},
        {"fc2", "mlp.fc2"}};
    const auto it = same.find(mod);
    if (it != same.end()) return {{layer + it->second + "." + kind}, K::Same};
  }
  throw std::runtime_error("--from vision=" + vision_dir_ + ": no CLIP tensor for \"" + name + "\"");
}

std::vector<int64_t> PartImporter::source_shape(const std::string& name) const {
  if (text_ && (name.rfind("text.", 0) == 0 || name.rfind("lm_head.", 0) == 0)) {
    if (!text_->contains(name))
      throw std::runtime_error("--from text=" + text_dir_ + ": tensor \"" + name + "\" is missing from the checkpoint");
    auto shape = text_->tensors().at(name).shape;
    if (name == "text.embed_tokens.weight" || name == "lm_head.weight")
      shape[0] = std::max(shape[0], cfg_.model.text.vocab_size);  // grown by the mean row
    return shape;
  }
  if (!vision_ || name.rfind("vision.", 0) != 0) return {};
  const auto src = clip_source(name);
  std::vector<std::vector<int64_t>> shapes;
  for (const auto& n : src.names) {
    if (!vision_->contains(n))
      throw std::runtime_error("--from vision=" + vision_dir_ + ": tensor \"" + n + "\" is missing (for \"" + name +
                               "\")");
    shapes.push_back(vision_->tensors().at(n).shape);
  }
  auto shape = shapes.front();
  using K = ClipSource::Kind;
  switch (src.kind) {
    case K::Concat:
      for (size_t i = 1; i < shapes.size(); ++i) shape[0] += shapes[i].empty() ? 0 : shapes[i][0];
      break;
    case K::Unsqueeze: shape.insert(shape.begin(), 1); break;
    case K::ClassToken: shape = {1, 1, shape.empty() ? 0 : shape[0]}; break;
    case K::PatchBias: shape = {shape.empty() ? 0 : shape[0]}; break;
    default: break;
  }
  return shape;
}

void PartImporter::check_shape(const std::string& name, c10::IntArrayRef shape) const {
  const auto got = source_shape(name);
  if (!got.empty() && c10::IntArrayRef(got) != shape)
    throw std::runtime_error("init --from: tensor \"" + name + "\" has shape " + c10::str(c10::IntArrayRef(got)) +
                             " in the source, the model expects " + c10::str(shape));
}

torch::Tensor PartImporter::vision_tensor(const std::string& name) const {
  const auto src = clip_source(name);
  std::vector<torch::Tensor> t;
  for (const auto& n : src.names) t.push_back(vision_->load(n).to(torch::kFloat32));
  using K = ClipSource::Kind;
  switch (src.kind) {
    case K::Concat: return torch::cat(t, 0);
    case K::Unsqueeze: return t[0].unsqueeze(0);
    case K::ClassToken: return t[0].view({1, 1, -1});
    case K::PatchWeight:
    case K::PatchBias: {
      // conv(((x + 1) / 2 - mean) / std) = conv'(x) with W' = W / (2 std_c) and b' = b + sum over (c, kernel) of
      // W (0.5 - mean_c) / std_c, exactly (the convolution has no padding).
      auto w = t[0].to(torch::kFloat64);  // [width, C, p, p]
      auto mean = torch::tensor(pixel_mean_, torch::kFloat64).view({1, -1, 1, 1});
      auto stdv = torch::tensor(pixel_std_, torch::kFloat64).view({1, -1, 1, 1});
      if (src.kind == K::PatchWeight) return (w / (2.0 * stdv)).to(torch::kFloat32);
      auto b = (w * (0.5 - mean) / stdv).sum({1, 2, 3});
      const std::string bias = vision_prefix_ + "embeddings.patch_embedding.bias";
      if (vision_->contains(bias)) b = b + vision_->load(bias).to(torch::kFloat64);
      return b.to(torch::kFloat32);
    }
    default: return t[0];
  }
}

json PartImporter::provenance() const {
  json j = json::object();
  if (text_) j["text"] = text_dir_;
  if (vision_) j["vision"] = {{"path", vision_dir_}, {"image_mean", pixel_mean_}, {"image_std", pixel_std_}};
  return j;
}

}  // namespace omnilite::io
