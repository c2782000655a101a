// Config parsing: one field list per options struct (visit_fields) drives both reading and writing, so the two
// can never disagree. Reading checks types and rejects unknown keys; validate() checks the dimensional rules.
#include "omnilite/config.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include <nlohmann/json.hpp>

namespace omnilite {
namespace {

using nlohmann::json;

std::string dump_value(const json& v) {
  std::string s = v.dump();
  return s.size() > 60 ? s.substr(0, 57) + "..." : s;
}

template <class V> void visit_fields(V& v, MixtureSource& o);

// Reads the fields of one JSON object into a struct, tracking the dotted path for error messages.
class Reader {
 public:
  Reader(const json& j, std::string path) : j_(j), path_(std::move(path)) {
    if (!j_.is_object())
      throw ConfigError("config: " + path_ + " must be an object, got " + dump_value(j_));
  }
  std::string key(const char* name) const { return path_.empty() ? name : path_ + "." + name; }

  void operator()(const char* name, int64_t& out) {
    if (const json* v = find(name)) {
      if (!v->is_number_integer())
        throw ConfigError("config: " + key(name) + ": expected an integer, got " + dump_value(*v));
      out = v->get<int64_t>();
    }
  }
  void operator()(const char* name, uint64_t& out) {
    if (const json* v = find(name)) {
      if (!v->is_number_integer() || v->get<int64_t>() < 0)
        throw ConfigError("config: " + key(name) + ": expected a non-negative integer, got " + dump_value(*v));
      out = v->get<uint64_t>();
    }
  }
  void operator()(const char* name, double& out) {
    if (const json* v = find(name)) {
      if (!v->is_number())
        throw ConfigError("config: " + key(name) + ": expected a number, got " + dump_value(*v));
      out = v->get<double>();
    }
  }
  void operator()(const char* name, bool& out) {
    if (const json* v = find(name)) {
      if (!v->is_boolean())
        throw ConfigError("config: " + key(name) + ": expected true or false, got " + dump_value(*v));
      out = v->get<bool>();
    }
  }
  void operator()(const char* name, std::vector<std::string>& out) {
    if (const json* v = find(name)) {
      if (!v->is_array() || !std::all_of(v->begin(), v->end(), [](const json& e) { return e.is_string(); }))
        throw ConfigError("config: " + key(name) + ": expected an array of strings, got " + dump_value(*v));
      out = v->get<std::vector<std::string>>();
    }
  }
  void operator()(const char* name, std::string& out) {
    if (const json* v = find(name)) {
      if (!v->is_string())
        throw ConfigError("config: " + key(name) + ": expected a string, got " + dump_value(*v));
      out = v->get<std::string>();
    }
  }
  void operator()(const char* name, std::vector<MixtureSource>& out) {
    if (const json* v = find(name)) {
      if (!v->is_array()) throw ConfigError("config: " + key(name) + ": expected an array of objects, got " + dump_value(*v));
      out.clear();
      for (size_t i = 0; i < v->size(); ++i) {
        Reader sub((*v)[i], key(name) + "[" + std::to_string(i) + "]");
        out.emplace_back();
        visit_fields(sub, out.back());
        sub.finish();
      }
    }
  }
  // Nested section: recurse with the section's own field list.
  template <class T>
  void section(const char* name, T& out) {
    if (const json* v = find(name)) {
      Reader sub(*v, key(name));
      visit_fields(sub, out);
      sub.finish();
    }
  }
  // Every key of the object must have been read; the first unknown one is reported with the known ones.
  void finish() const {
    for (auto it = j_.begin(); it != j_.end(); ++it) {
      if (!seen_.count(it.key())) {
        std::string known;
        for (const auto& k : seen_all_) known += (known.empty() ? "" : ", ") + k;
        throw ConfigError("config: unknown key " + key(it.key().c_str()) + " (value " + dump_value(it.value()) +
                          "); known keys here: " + known + "; hint: check the spelling or the section");
      }
    }
  }

 private:
  const json* find(const char* name) {
    seen_all_.insert(name);
    auto it = j_.find(name);
    if (it == j_.end()) return nullptr;
    seen_.insert(name);
    return &*it;
  }
  const json& j_;
  std::string path_;
  std::set<std::string> seen_;      // keys present and read
  std::set<std::string> seen_all_;  // every key this section knows
};

// Writes the fields of a struct into a JSON object.
struct Writer {
  json j = json::object();
  template <class T>
  void operator()(const char* name, const T& v) { j[name] = v; }
  void operator()(const char* name, const std::vector<MixtureSource>& v) {
    j[name] = json::array();
    for (const auto& m : v) {
      Writer sub;
      visit_fields(sub, const_cast<MixtureSource&>(m));
      j[name].push_back(sub.j);
    }
  }
  template <class T>
  void section(const char* name, const T& v) {
    Writer sub;
    visit_fields(sub, const_cast<T&>(v));
    j[name] = sub.j;
  }
};

template <class V> void visit_fields(V& v, VisionOptions& o) {
  v("image_size", o.image_size); v("in_channels", o.in_channels); v("patch_size", o.patch_size);
  v("width", o.width); v("depth", o.depth); v("num_heads", o.num_heads); v("mlp_dim", o.mlp_dim);
  v("norm_eps", o.norm_eps); v("class_token", o.class_token); v("pre_norm", o.pre_norm);
  v("activation", o.activation); v("final_norm", o.final_norm);
}
template <class V> void visit_fields(V& v, ResamplerOptions& o) {
  v("num_latents", o.num_latents); v("depth", o.depth); v("num_heads", o.num_heads); v("ff_mult", o.ff_mult);
  v("norm_eps", o.norm_eps);
}
template <class V> void visit_fields(V& v, TextOptions& o) {
  v("vocab_size", o.vocab_size); v("hidden_size", o.hidden_size); v("num_layers", o.num_layers);
  v("num_heads", o.num_heads); v("num_kv_heads", o.num_kv_heads); v("head_dim", o.head_dim);
  v("rope_dim", o.rope_dim); v("rope_theta", o.rope_theta); v("rms_norm_eps", o.rms_norm_eps);
  v("max_position_embeddings", o.max_position_embeddings); v("tie_word_embeddings", o.tie_word_embeddings);
}
template <class V> void visit_fields(V& v, MoEOptions& o) {
  v("num_experts", o.num_experts); v("top_k", o.top_k); v("expert_hidden", o.expert_hidden);
}
template <class V> void visit_fields(V& v, FlowOptions& o) {
  v("latent_channels", o.latent_channels); v("patch_size", o.patch_size); v("time_embed_dim", o.time_embed_dim);
}
template <class V> void visit_fields(V& v, VQVAEOptions& o) {
  v("in_channels", o.in_channels); v("base_channels", o.base_channels); v("num_downsamples", o.num_downsamples);
  v("codebook_size", o.codebook_size); v("commitment_beta", o.commitment_beta); v("image_size", o.image_size);
}
template <class V> void visit_fields(V& v, TokenOptions& o) {
  v("bos_id", o.bos_id); v("eos_id", o.eos_id); v("pad_id", o.pad_id); v("image_id", o.image_id);
  v("image_begin_id", o.image_begin_id); v("image_end_id", o.image_end_id); v("gen_image_id", o.gen_image_id);
}
template <class V> void visit_fields(V& v, ModelConfig& o) {
  v.section("vision", o.vision); v.section("resampler", o.resampler); v.section("text", o.text);
  v.section("moe", o.moe); v.section("flow", o.flow); v.section("vqvae", o.vqvae); v.section("tokens", o.tokens);
}
template <class V> void visit_fields(V& v, RuntimeOptions& o) {
  v("device", o.device); v("dtype", o.dtype); v("threads", o.threads); v("blas_threads", o.blas_threads);
  v("seed", o.seed); v("moe_dispatch", o.moe_dispatch); v("nf4_activations", o.nf4_activations);
}
template <class V> void visit_fields(V& v, TrainOptions& o) {
  v("steps", o.steps); v("batch_size", o.batch_size); v("grad_accum", o.grad_accum); v("seq_len", o.seq_len);
  v("lr", o.lr); v("min_lr_ratio", o.min_lr_ratio); v("warmup_steps", o.warmup_steps);
  v("weight_decay", o.weight_decay); v("beta1", o.beta1); v("beta2", o.beta2); v("eps", o.eps);
  v("grad_clip", o.grad_clip); v("aux_coef", o.aux_coef); v("z_coef", o.z_coef); v("rf_weight", o.rf_weight);
  v("log_every", o.log_every); v("ckpt_every", o.ckpt_every); v("keep_last", o.keep_last);
  v("max_bad_steps", o.max_bad_steps); v("seed", o.seed); v("stage", o.stage);
  v("caption_batch_size", o.caption_batch_size); v("gen_batch_size", o.gen_batch_size);
  v("image_seq_len", o.image_seq_len); v("cfg_dropout", o.cfg_dropout); v("flow_time", o.flow_time);
  v("flow_time_mean", o.flow_time_mean); v("flow_time_std", o.flow_time_std); v("freeze", o.freeze);
  v("activation_checkpointing", o.activation_checkpointing); v("loader_threads", o.loader_threads);
  v("valid_every", o.valid_every); v("valid_batches", o.valid_batches); v("vq_restart_every", o.vq_restart_every);
  v("base_checkpoint", o.base_checkpoint); v("dist_timeout_s", o.dist_timeout_s); v("bucket_mb", o.bucket_mb);
  v("zero", o.zero); v("zero1", o.zero1); v("tensorboard", o.tensorboard); v("sft_batch_size", o.sft_batch_size);
  v("sft_seq_len", o.sft_seq_len); v("sft_packing", o.sft_packing); v("train_on_input", o.train_on_input);
  v("document_masks", o.document_masks);
}
template <class V> void visit_fields(V& v, LoRAOptions& o) {
  v("enabled", o.enabled); v("rank", o.rank); v("alpha", o.alpha); v("dropout", o.dropout);
  v("target_modules", o.target_modules); v("base_dtype", o.base_dtype); v("full_precision", o.full_precision);
  v("modules_to_save", o.modules_to_save);
  v("init_adapter", o.init_adapter);
}
template <class V> void visit_fields(V& v, DataOptions& o) {
  v("tokenizer", o.tokenizer); v("text_train", o.text_train); v("text_valid", o.text_valid);
  v("image_train", o.image_train); v("image_valid", o.image_valid); v("image_root", o.image_root);
  v("max_images", o.max_images); v("vqvae", o.vqvae); v("classifier", o.classifier);
  v("sft_train", o.sft_train); v("sft_valid", o.sft_valid); v("mixture", o.mixture);
}
template <class V> void visit_fields(V& v, MixtureSource& o) {
  v("name", o.name); v("kind", o.kind); v("sources", o.sources); v("weight", o.weight);
}
template <class V> void visit_fields(V& v, Config& o) {
  v.section("model", o.model); v.section("runtime", o.runtime); v.section("train", o.train);
  v.section("data", o.data); v.section("lora", o.lora);
}

// Error helpers for validate(): name the key, the value and the rule.
[[noreturn]] void fail(const std::string& key, const std::string& value, const std::string& rule) {
  throw ConfigError("config: " + key + " = " + value + ": " + rule);
}
void require_positive(const std::string& key, int64_t v) {
  if (v <= 0) fail(key, std::to_string(v), "must be positive");
}
void require_divides(const std::string& a_key, int64_t a, const std::string& b_key, int64_t b) {
  if (a <= 0 || b % a != 0)
    fail(a_key, std::to_string(a), "must divide " + b_key + " = " + std::to_string(b));
}
std::string num(double v) {
  std::ostringstream s;
  s << v;
  return s.str();
}

}  // namespace

void validate(const Config& c) {
  const auto& m = c.model;
  const auto& v = m.vision;
  for (auto [k, x] : {std::pair<const char*, int64_t>{"model.vision.image_size", v.image_size},
                      {"model.vision.in_channels", v.in_channels}, {"model.vision.patch_size", v.patch_size},
                      {"model.vision.width", v.width}, {"model.vision.depth", v.depth},
                      {"model.vision.num_heads", v.num_heads}, {"model.vision.mlp_dim", v.mlp_dim},
                      {"model.resampler.num_latents", m.resampler.num_latents},
                      {"model.resampler.depth", m.resampler.depth},
                      {"model.resampler.num_heads", m.resampler.num_heads},
                      {"model.resampler.ff_mult", m.resampler.ff_mult},
                      {"model.text.vocab_size", m.text.vocab_size}, {"model.text.hidden_size", m.text.hidden_size},
                      {"model.text.num_layers", m.text.num_layers}, {"model.text.num_heads", m.text.num_heads},
                      {"model.text.num_kv_heads", m.text.num_kv_heads}, {"model.text.head_dim", m.text.head_dim},
                      {"model.text.max_position_embeddings", m.text.max_position_embeddings},
                      {"model.moe.num_experts", m.moe.num_experts}, {"model.moe.top_k", m.moe.top_k},
                      {"model.moe.expert_hidden", m.moe.expert_hidden},
                      {"model.flow.latent_channels", m.flow.latent_channels},
                      {"model.flow.patch_size", m.flow.patch_size},
                      {"model.flow.time_embed_dim", m.flow.time_embed_dim},
                      {"model.vqvae.in_channels", m.vqvae.in_channels},
                      {"model.vqvae.base_channels", m.vqvae.base_channels},
                      {"model.vqvae.num_downsamples", m.vqvae.num_downsamples},
                      {"model.vqvae.codebook_size", m.vqvae.codebook_size},
                      {"model.vqvae.image_size", m.vqvae.image_size}}) {
    require_positive(k, x);
  }
  require_divides("model.vision.num_heads", v.num_heads, "model.vision.width", v.width);
  if (v.patch_size > v.image_size)
    fail("model.vision.patch_size", std::to_string(v.patch_size),
         "must not exceed model.vision.image_size = " + std::to_string(v.image_size));
  if (v.image_size % v.patch_size != 0)
    fail("model.vision.image_size", std::to_string(v.image_size),
         "must be a multiple of model.vision.patch_size = " + std::to_string(v.patch_size));
  require_divides("model.resampler.num_heads", m.resampler.num_heads, "model.text.hidden_size", m.text.hidden_size);

  const auto& t = m.text;
  if (t.num_heads * t.head_dim != t.hidden_size)
    fail("model.text.head_dim", std::to_string(t.head_dim),
         "model.text.num_heads * head_dim = " + std::to_string(t.num_heads) + " * " + std::to_string(t.head_dim) +
             " must equal model.text.hidden_size = " + std::to_string(t.hidden_size) +
             "; hint: the heads must divide the width");
  require_divides("model.text.num_kv_heads", t.num_kv_heads, "model.text.num_heads", t.num_heads);
  if (t.rope_dim <= 0 || t.rope_dim > t.head_dim || t.rope_dim % 2 != 0)
    fail("model.text.rope_dim", std::to_string(t.rope_dim),
         "must be even, positive and at most model.text.head_dim = " + std::to_string(t.head_dim));
  if (!(t.rope_theta > 1.0)) fail("model.text.rope_theta", num(t.rope_theta), "must be greater than 1");
  if (!(t.rms_norm_eps > 0.0)) fail("model.text.rms_norm_eps", num(t.rms_norm_eps), "must be positive");
  if (!(v.norm_eps > 0.0)) fail("model.vision.norm_eps", num(v.norm_eps), "must be positive");
  if (v.activation != "gelu" && v.activation != "quick_gelu")
    fail("model.vision.activation", "\"" + v.activation + "\"", "must be \"gelu\" or \"quick_gelu\"");
  if (!(m.resampler.norm_eps > 0.0)) fail("model.resampler.norm_eps", num(m.resampler.norm_eps), "must be positive");
  if (m.moe.top_k > m.moe.num_experts)
    fail("model.moe.top_k", std::to_string(m.moe.top_k),
         "must not exceed model.moe.num_experts = " + std::to_string(m.moe.num_experts));
  if (m.flow.time_embed_dim % 2 != 0)
    fail("model.flow.time_embed_dim", std::to_string(m.flow.time_embed_dim), "must be even (sin and cos halves)");
  if (!(m.vqvae.commitment_beta >= 0.0))
    fail("model.vqvae.commitment_beta", num(m.vqvae.commitment_beta), "must be non-negative");
  if (m.vqvae.num_downsamples > 6)
    fail("model.vqvae.num_downsamples", std::to_string(m.vqvae.num_downsamples), "must be at most 6 (64x)");
  if (m.vqvae.image_size % (m.vq_downsample() * m.flow.patch_size) != 0)
    fail("model.vqvae.image_size", std::to_string(m.vqvae.image_size),
         "must be a multiple of 2^model.vqvae.num_downsamples * model.flow.patch_size = " +
             std::to_string(m.vq_downsample() * m.flow.patch_size) + " (whole latent patches)");

  const auto& k = m.tokens;
  for (auto [name, id] : {std::pair<const char*, int64_t>{"bos_id", k.bos_id}, {"eos_id", k.eos_id},
                          {"pad_id", k.pad_id}, {"image_id", k.image_id}, {"image_begin_id", k.image_begin_id},
                          {"image_end_id", k.image_end_id}, {"gen_image_id", k.gen_image_id}}) {
    if (id < 0 || id >= t.vocab_size)
      fail(std::string("model.tokens.") + name, std::to_string(id),
           "must be a token id in [0, model.text.vocab_size = " + std::to_string(t.vocab_size) + ")");
  }
  if (k.image_id == k.gen_image_id)
    fail("model.tokens.gen_image_id", std::to_string(k.gen_image_id), "must differ from model.tokens.image_id");

  const auto& tr = c.train;
  for (auto [k2, x] : {std::pair<const char*, int64_t>{"train.steps", tr.steps},
                       {"train.grad_accum", tr.grad_accum}, {"train.log_every", tr.log_every},
                       {"train.ckpt_every", tr.ckpt_every}, {"train.keep_last", tr.keep_last},
                       {"train.max_bad_steps", tr.max_bad_steps}, {"train.valid_batches", tr.valid_batches}}) {
    require_positive(k2, x);
  }
  for (auto [k2, x] : {std::pair<const char*, int64_t>{"train.batch_size", tr.batch_size},
                       {"train.caption_batch_size", tr.caption_batch_size},
                       {"train.gen_batch_size", tr.gen_batch_size}, {"train.image_seq_len", tr.image_seq_len},
                       {"train.sft_batch_size", tr.sft_batch_size}, {"train.sft_seq_len", tr.sft_seq_len},
                       {"train.loader_threads", tr.loader_threads}, {"train.valid_every", tr.valid_every},
                       {"train.vq_restart_every", tr.vq_restart_every}, {"data.max_images", c.data.max_images}}) {
    if (x < 0) fail(k2, std::to_string(x), "must be >= 0");
  }
  if (!(tr.stage == "omni" || tr.stage == "vqvae" || tr.stage == "classifier"))
    fail("train.stage", "\"" + tr.stage + "\"", "must be \"omni\", \"vqvae\" or \"classifier\"");
  if (tr.stage == "omni" && tr.batch_size + tr.caption_batch_size + tr.gen_batch_size + tr.sft_batch_size == 0)
    fail("train.batch_size", "0", "train.batch_size + caption_batch_size + gen_batch_size + sft_batch_size must be "
         "positive");
  if (tr.sft_seq_len > t.max_position_embeddings)
    fail("train.sft_seq_len", std::to_string(tr.sft_seq_len),
         "must be at most model.text.max_position_embeddings = " + std::to_string(t.max_position_embeddings));
  if (tr.stage == "omni" && tr.sft_batch_size > 0 && c.data.sft_train.empty() &&
      std::none_of(c.data.mixture.begin(), c.data.mixture.end(), [](const MixtureSource& m) { return m.kind == "sft"; }))
    fail("data.sft_train", "[]", "must name at least one .json / .jsonl file of conversations when "
         "train.sft_batch_size > 0");
  if (tr.stage != "omni" && tr.batch_size <= 0)
    fail("train.batch_size", std::to_string(tr.batch_size), "must be positive (images per micro-batch)");
  if (!(tr.flow_time == "logit_normal" || tr.flow_time == "uniform"))
    fail("train.flow_time", "\"" + tr.flow_time + "\"", "must be \"logit_normal\" or \"uniform\"");
  if (!(tr.flow_time_std > 0.0)) fail("train.flow_time_std", num(tr.flow_time_std), "must be positive");
  if (!(tr.dist_timeout_s > 0.0)) fail("train.dist_timeout_s", num(tr.dist_timeout_s), "must be positive (seconds)");
  if (!(tr.bucket_mb > 0.0)) fail("train.bucket_mb", num(tr.bucket_mb), "must be positive (MiB)");
  if (tr.zero < 0 || tr.zero > 3) fail("train.zero", std::to_string(tr.zero), "must be 0, 1, 2 or 3 (the ZeRO stage)");
  if (tr.zero1 && tr.zero > 1)
    fail("train.zero1", "true", "asks for stage 1 but train.zero = " + std::to_string(tr.zero) +
                                    "; hint: drop train.zero1 (train.zero alone says the stage)");
  if (!(tr.cfg_dropout >= 0.0 && tr.cfg_dropout <= 1.0)) fail("train.cfg_dropout", num(tr.cfg_dropout), "must be in [0, 1]");
  if (tr.image_seq_len > t.max_position_embeddings)
    fail("train.image_seq_len", std::to_string(tr.image_seq_len),
         "must be at most model.text.max_position_embeddings = " + std::to_string(t.max_position_embeddings));
  if (tr.seq_len < 2 || tr.seq_len > t.max_position_embeddings)
    fail("train.seq_len", std::to_string(tr.seq_len),
         "must be in [2, model.text.max_position_embeddings = " + std::to_string(t.max_position_embeddings) + "]");
  if (!(tr.lr > 0.0)) fail("train.lr", num(tr.lr), "must be positive");
  if (!(tr.min_lr_ratio >= 0.0 && tr.min_lr_ratio <= 1.0)) fail("train.min_lr_ratio", num(tr.min_lr_ratio), "must be in [0, 1]");
  if (tr.warmup_steps < 0) fail("train.warmup_steps", std::to_string(tr.warmup_steps), "must be >= 0");
  if (!(tr.beta1 >= 0.0 && tr.beta1 < 1.0)) fail("train.beta1", num(tr.beta1), "must be in [0, 1)");
  if (!(tr.beta2 >= 0.0 && tr.beta2 < 1.0)) fail("train.beta2", num(tr.beta2), "must be in [0, 1)");
  for (auto [k2, x] : {std::pair<const char*, double>{"train.weight_decay", tr.weight_decay}, {"train.eps", tr.eps},
                       {"train.grad_clip", tr.grad_clip}, {"train.aux_coef", tr.aux_coef},
                       {"train.z_coef", tr.z_coef}, {"train.rf_weight", tr.rf_weight}}) {
    if (!(x >= 0.0)) fail(k2, num(x), "must be >= 0");
  }
  std::set<std::string> mixed, names;  // the kinds data.mixture gives, its names
  for (size_t i = 0; i < c.data.mixture.size(); ++i) {
    const auto& m = c.data.mixture[i];
    const std::string key = "data.mixture[" + std::to_string(i) + "]";
    if (m.name.empty() || !std::all_of(m.name.begin(), m.name.end(), [](char ch) {
          return (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || ch == '_';
        }))
      fail(key + ".name", "\"" + m.name + "\"", "must be a non-empty name of a-z, 0-9 and _ (it names mix_<name> in "
           "metrics.jsonl)");
    if (!names.insert(m.name).second) fail(key + ".name", "\"" + m.name + "\"", "is used twice; names must be unique");
    if (m.kind != "text" && m.kind != "images" && m.kind != "sft")
      fail(key + ".kind", "\"" + m.kind + "\"", "must be \"text\", \"images\" or \"sft\"");
    if (m.sources.empty()) fail(key + ".sources", "[]", "must name at least one file or folder");
    if (!(m.weight > 0.0 && std::isfinite(m.weight))) fail(key + ".weight", num(m.weight), "must be positive");
    mixed.insert(m.kind);
  }
  if (tr.stage == "omni" && tr.batch_size > 0 && c.data.text_train.empty() && !mixed.count("text"))
    fail("data.text_train", "[]", "must name at least one file when train.batch_size > 0");
  if (tr.stage == "omni" && mixed.count("text") && tr.batch_size <= 0)
    fail("data.mixture", "[...]", "has text sources but train.batch_size is 0 (no text rows to draw)");
  if (tr.stage == "omni" && mixed.count("images") && tr.caption_batch_size + tr.gen_batch_size <= 0)
    fail("data.mixture", "[...]", "has image sources but train.caption_batch_size + gen_batch_size is 0");
  if (tr.stage == "omni" && mixed.count("sft") && tr.sft_batch_size <= 0)
    fail("data.mixture", "[...]", "has sft sources but train.sft_batch_size is 0 (no conversation rows to draw)");
  if ((tr.stage != "omni" || (tr.caption_batch_size + tr.gen_batch_size > 0 && !mixed.count("images"))) &&
      c.data.image_train.empty())
    fail("data.image_train", "[]", "must name at least one image-caption source for this stage");
  if (tr.stage == "omni" && tr.gen_batch_size > 0 && c.data.vqvae.empty())
    fail("data.vqvae", "\"\"", "must name the VQ-VAE run folder when train.gen_batch_size > 0; hint: train one "
         "first with train.stage = \"vqvae\"");

  const auto& lo = c.lora;
  if (lo.rank <= 0) fail("lora.rank", std::to_string(lo.rank), "must be positive");
  if (!(lo.alpha > 0.0)) fail("lora.alpha", num(lo.alpha), "must be positive");
  if (!(lo.dropout >= 0.0 && lo.dropout < 1.0)) fail("lora.dropout", num(lo.dropout), "must be in [0, 1)");
  if (!(lo.base_dtype == "nf4" || lo.base_dtype == "fp32"))
    fail("lora.base_dtype", "\"" + lo.base_dtype + "\"", "must be \"nf4\" or \"fp32\"");
  if (lo.enabled && tr.stage != "omni")
    fail("lora.enabled", "true", "QLoRA fine-tunes the model: train.stage must be \"omni\"");

  const auto& r = c.runtime;
  if (!(r.device == "cpu" || r.device == "cuda" || r.device.rfind("cuda:", 0) == 0))
    fail("runtime.device", "\"" + r.device + "\"", "must be \"cpu\", \"cuda\" or \"cuda:N\"");
  if (!(r.dtype == "fp32" || r.dtype == "bf16"))
    fail("runtime.dtype", "\"" + r.dtype + "\"", "must be \"fp32\" or \"bf16\"");
  if (r.threads < 0) fail("runtime.threads", std::to_string(r.threads), "must be >= 0 (0 = all cores)");
  if (r.blas_threads < 0) fail("runtime.blas_threads", std::to_string(r.blas_threads), "must be >= 0 (0 = all cores)");
  if (!(r.moe_dispatch == "auto" || r.moe_dispatch == "loop" || r.moe_dispatch == "grouped"))
    fail("runtime.moe_dispatch", "\"" + r.moe_dispatch + "\"", "must be \"auto\", \"loop\" or \"grouped\"");
  if (!(r.nf4_activations == "fp32" || r.nf4_activations == "int16"))
    fail("runtime.nf4_activations", "\"" + r.nf4_activations + "\"",
         "must be \"fp32\" (exact) or \"int16\" (16-bit inputs per 64-block, faster decoding)");
}

Config parse_config(const json& j) {
  Config c;
  Reader r(j, "");
  visit_fields(r, c);
  r.finish();
  validate(c);
  return c;
}

json to_json(const Config& c) {
  Writer w;
  visit_fields(w, const_cast<Config&>(c));
  return w.j;
}

namespace {

// Reads one integer field of a card layer, naming the layer when it is missing or not an integer.
int64_t card_int(const json& layer, size_t index, const char* key) {
  const json& p = layer.at("params");
  auto it = p.find(key);
  if (it == p.end() || !it->is_number_integer())
    throw ConfigError("spec: layers[" + std::to_string(index) + "] (" + layer.value("type", "?") +
                      ") needs an integer params." + key);
  return it->get<int64_t>();
}

void card_expect(bool ok, size_t index, const std::string& what) {
  if (!ok) throw ConfigError("spec: layers[" + std::to_string(index) + "]: " + what);
}

}  // namespace

Config config_from_spec(const json& spec) {
  if (!spec.contains("layers") || !spec["layers"].is_array())
    throw ConfigError("spec: expected an object with a \"layers\" array (the OMNI-LITE design card)");
  Config c;
  auto& m = c.model;
  const json& layers = spec["layers"];
  // The card lists its layers in model order; each is recognised by type (and params.type for blocks).
  std::vector<bool> found(8, false);
  int linear_seen = 0, conv_seen = 0;
  int64_t flow_out = 0;  // flow head out_features = latent_channels * patch^2, resolved after the loop
  for (size_t i = 0; i < layers.size(); ++i) {
    const json& L = layers[i];
    card_expect(L.is_object() && L.contains("type") && L.contains("params") && L["params"].is_object(), i,
                "each layer needs \"type\" and an object \"params\"");
    const std::string type = L["type"].get<std::string>();
    const json& p = L["params"];
    if (type == "Conv2d") {
      if (conv_seen++ == 0) {  // vision patch embedding
        m.vision.in_channels = card_int(L, i, "in_channels");
        m.vision.width = card_int(L, i, "out_channels");
        m.vision.patch_size = card_int(L, i, "kernel_size");
        card_expect(card_int(L, i, "stride") == m.vision.patch_size, i,
                    "patch embedding stride must equal its kernel size (non-overlapping patches)");
        found[0] = true;
      } else {  // VQ-VAE decoder's last conv: latent_channels -> image channels
        m.flow.latent_channels = card_int(L, i, "in_channels");
        m.vqvae.in_channels = card_int(L, i, "out_channels");
        card_expect(card_int(L, i, "kernel_size") == 3 && card_int(L, i, "stride") == 1, i,
                    "the VQ-VAE output conv is built with kernel 3, stride 1");
        found[7] = true;
      }
    } else if (type == "TransformerBlock") {
      const std::string sub = p.value("type", "");
      if (sub.empty()) {  // ViT backbone
        card_expect(card_int(L, i, "embed_dim") == m.vision.width, i, "ViT embed_dim must equal the patch width");
        m.vision.num_heads = card_int(L, i, "num_heads");
        m.vision.mlp_dim = card_int(L, i, "ff_dim");
        m.vision.depth = card_int(L, i, "depth");
        found[1] = true;
      } else if (sub == "PerceiverResampler") {
        m.resampler.num_latents = card_int(L, i, "num_latents");
        m.text.hidden_size = card_int(L, i, "embed_dim");
        found[2] = true;
      } else if (sub == "GQA_MoE_Layer") {
        card_expect(card_int(L, i, "hidden_dim") == m.text.hidden_size, i,
                    "hidden_dim must equal the resampler/text width");
        m.text.num_layers = card_int(L, i, "repeat");
        m.moe.num_experts = card_int(L, i, "num_experts");
        m.moe.top_k = card_int(L, i, "top_k");
        m.text.num_heads = card_int(L, i, "num_heads");
        m.text.num_kv_heads = card_int(L, i, "num_kv_heads");
        m.text.rope_dim = card_int(L, i, "rope_dim");
        card_expect(m.text.num_heads > 0 && m.text.hidden_size % m.text.num_heads == 0, i,
                    "num_heads must divide hidden_dim");
        m.text.head_dim = m.text.hidden_size / m.text.num_heads;
        found[4] = true;
      } else {
        card_expect(false, i, "unknown TransformerBlock type \"" + sub + "\"");
      }
    } else if (type == "Linear") {
      const int64_t in = card_int(L, i, "in_features"), out = card_int(L, i, "out_features");
      if (linear_seen == 0) {  // token embedding, written as Linear(vocab -> hidden)
        m.text.vocab_size = in;
        card_expect(out == m.text.hidden_size, i, "token embedding width must equal the text width");
        found[3] = true;
      } else if (linear_seen == 1) {  // LM head
        card_expect(in == m.text.hidden_size && out == m.text.vocab_size, i,
                    "LM head must map hidden_size -> vocab_size");
        found[5] = true;
      } else {  // rectified-flow head: hidden -> latent patch values
        card_expect(in == m.text.hidden_size, i, "flow head input must be the text width");
        found[6] = true;
        flow_out = out;  // the latent channels come from the VQ-VAE conv that follows
      }
      ++linear_seen;
    } else {
      card_expect(false, i, "unknown layer type \"" + type + "\"");
    }
  }
  static const char* names[] = {"patch embedding Conv2d", "ViT TransformerBlock", "PerceiverResampler",
                                "token embedding Linear", "GQA_MoE_Layer", "LM head Linear",
                                "flow head Linear", "VQ-VAE Conv2d"};
  for (size_t k = 0; k < found.size(); ++k)
    if (!found[k]) throw ConfigError(std::string("spec: the card has no ") + names[k] + " layer");
  const int64_t per_channel = flow_out / m.flow.latent_channels;
  int64_t side = 1;
  while (side * side < per_channel) ++side;
  if (flow_out % m.flow.latent_channels != 0 || side * side != per_channel)
    throw ConfigError("spec: flow head out_features = " + std::to_string(flow_out) +
                      " must be latent_channels (" + std::to_string(m.flow.latent_channels) +
                      ") times a square patch area");
  m.flow.patch_size = side;
  validate(c);
  return c;
}

namespace {

// Objects merge key by key (the overlay wins); anything else is replaced.
void merge_into(json& base, const json& overlay) {
  for (auto it = overlay.begin(); it != overlay.end(); ++it) {
    if (it->is_object() && base.contains(it.key()) && base[it.key()].is_object()) merge_into(base[it.key()], *it);
    else base[it.key()] = *it;
  }
}

json read_config_json_depth(const std::string& path, int depth) {
  if (depth > 8) throw ConfigError("config: \"" + path + "\": \"extends\" nests more than 8 files deep (a cycle?)");
  std::ifstream f(path);
  if (!f) throw ConfigError("config: cannot open file \"" + path + "\"; hint: check the path");
  json j;
  try {
    j = json::parse(f);
  } catch (const json::parse_error& e) {
    throw ConfigError("config: \"" + path + "\" is not valid JSON: " + e.what());
  }
  if (!j.is_object() || !j.contains("extends")) return j;
  if (!j["extends"].is_string())
    throw ConfigError("config: \"" + path + "\": \"extends\" must be a file name, got " + j["extends"].dump());
  const std::string base_path =
      (std::filesystem::path(path).parent_path() / j["extends"].get<std::string>()).string();
  json base = read_config_json_depth(base_path, depth + 1);
  j.erase("extends");
  merge_into(base, j);
  return base;
}

}  // namespace

json read_config_json(const std::string& path) { return read_config_json_depth(path, 0); }

Config load_config_file(const std::string& path) {
  json j = read_config_json(path);
  try {
    if (j.is_object() && j.contains("layers")) return config_from_spec(j);
    return parse_config(j);
  } catch (const ConfigError& e) {
    throw ConfigError(std::string(e.what()) + " (in \"" + path + "\")");
  }
}

void apply_config_override(nlohmann::json& j, const std::string& assignment) {
  const auto eq = assignment.find('=');
  if (eq == std::string::npos || eq == 0)
    throw ConfigError("--set \"" + assignment + "\": expected KEY=VALUE with a dotted key, e.g. train.batch_size=4");
  const std::string key = assignment.substr(0, eq), text = assignment.substr(eq + 1);
  auto value = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (value.is_discarded()) value = text;
  nlohmann::json* node = &j;
  size_t start = 0;
  while (true) {
    const auto dot = key.find('.', start);
    const std::string part = key.substr(start, dot == std::string::npos ? std::string::npos : dot - start);
    if (part.empty()) throw ConfigError("--set \"" + assignment + "\": empty part in key \"" + key + "\"");
    if (dot == std::string::npos) {
      (*node)[part] = value;
      return;
    }
    if (!node->contains(part)) (*node)[part] = nlohmann::json::object();
    node = &(*node)[part];
    if (!node->is_object()) throw ConfigError("--set \"" + assignment + "\": \"" + part + "\" is not a section");
    start = dot + 1;
  }
}

}  // namespace omnilite
