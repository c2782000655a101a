// `export --format hf`: the key map (every tensor mapped exactly once, both ways), export -> import -> export byte for
// byte, sharding with its index, the Mixtral semantics of the export (logits recomputed from the files and the
// config.json keys alone, as transformers' Mixtral defines the forward), and the errors of broken folders.
#include "catch_compat.h"

#include <filesystem>
#include <fstream>
#include <iterator>
#include <set>

#include <nlohmann/json.hpp>

#include "helpers.h"
#include "omnilite/io/adapter.h"
#include "omnilite/io/checkpoint.h"
#include "omnilite/io/hf_export.h"
#include "omnilite/io/safetensors.h"
#include "omnilite/io/weights_reader.h"
#include "omnilite/modules/omnilite.h"
#include "omnilite/modules/qlora_builder.h"
#include "omnilite/quant/nf4.h"

using namespace omnilite;
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

std::string file_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

// Mixtral's forward as transformers defines it (RMSNorm x * rsqrt(mean(x^2) + eps) * w; rotate-half RoPE with
// inv_freq = theta^(-2i/Dh); query head h reads KV head h / (H / KV); causal softmax(q k^T / sqrt(Dh)); router
// softmax -> top-k -> weights renormalised to sum 1; expert w2(silu(w1 x) * w3 x); lm_head or the tied embedding),
// in float64, from the export's files under their Hugging Face names and its config.json keys alone.
torch::Tensor mixtral_reference_logits(const std::string& dir, const std::vector<int64_t>& ids) {
  std::ifstream cf(dir + "/config.json");
  const json c = json::parse(cf);
  std::map<std::string, std::string> shard_of;
  if (fs::exists(dir + "/model.safetensors.index.json")) {
    std::ifstream jf(dir + "/model.safetensors.index.json");
    const json index = json::parse(jf);
    for (const auto& [k, v] : index["weight_map"].items()) shard_of[k] = v.get<std::string>();
  }
  std::map<std::string, std::unique_ptr<io::SafetensorsReader>> files;
  auto W = [&](const std::string& name) {
    const std::string file = shard_of.count(name) ? shard_of[name] : "model.safetensors";
    auto& r = files[file];
    if (!r) r = std::make_unique<io::SafetensorsReader>(dir + "/" + file);
    return r->load(name).to(torch::kFloat64);
  };
  const int64_t D = c["hidden_size"], H = c["num_attention_heads"], KV = c["num_key_value_heads"];
  const int64_t Dh = c.value("head_dim", D / H), L = c["num_hidden_layers"], K = c["num_experts_per_tok"];
  const double eps = c["rms_norm_eps"], theta = c["rope_theta"];
  const int64_t T = static_cast<int64_t>(ids.size());
  auto rms = [&](const torch::Tensor& x, const torch::Tensor& w) {
    return x * torch::rsqrt(x.pow(2).mean(-1, true) + eps) * w;
  };
  auto inv_freq = torch::pow(theta, -torch::arange(0, Dh, 2, torch::kFloat64) / static_cast<double>(Dh));
  auto freqs = torch::arange(T, torch::kFloat64).unsqueeze(1) * inv_freq.unsqueeze(0);  // [T, Dh/2]
  auto emb = torch::cat({freqs, freqs}, -1);
  auto cos = emb.cos(), sin = emb.sin();
  auto rope = [&](const torch::Tensor& t) {  // [heads, T, Dh]
    auto x1 = t.narrow(-1, 0, Dh / 2), x2 = t.narrow(-1, Dh / 2, Dh / 2);
    return t * cos + torch::cat({-x2, x1}, -1) * sin;
  };
  auto mask = torch::full({T, T}, -INFINITY, torch::kFloat64).triu(1);
  auto x = W("model.embed_tokens.weight").index_select(0, torch::tensor(ids, torch::kInt64));  // [T, D]
  for (int64_t l = 0; l < L; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    auto h = rms(x, W(p + "input_layernorm.weight"));
    auto q = rope(torch::matmul(h, W(p + "self_attn.q_proj.weight").t()).view({T, H, Dh}).transpose(0, 1));
    auto k = rope(torch::matmul(h, W(p + "self_attn.k_proj.weight").t()).view({T, KV, Dh}).transpose(0, 1));
    auto v = torch::matmul(h, W(p + "self_attn.v_proj.weight").t()).view({T, KV, Dh}).transpose(0, 1);
    k = k.repeat_interleave(H / KV, 0);
    v = v.repeat_interleave(H / KV, 0);
    auto att = torch::softmax(torch::matmul(q, k.transpose(1, 2)) / std::sqrt(static_cast<double>(Dh)) + mask, -1);
    auto o = torch::matmul(att, v).transpose(0, 1).reshape({T, H * Dh});
    x = x + torch::matmul(o, W(p + "self_attn.o_proj.weight").t());
    h = rms(x, W(p + "post_attention_layernorm.weight"));
    auto probs = torch::softmax(torch::matmul(h, W(p + "block_sparse_moe.gate.weight").t()), -1);  // [T, E]
    auto top = probs.topk(K, -1);
    auto weights = std::get<0>(top) / std::get<0>(top).sum(-1, true);
    auto out = torch::zeros_like(x);
    for (int64_t t = 0; t < T; ++t)
      for (int64_t j = 0; j < K; ++j) {
        const std::string e = p + "block_sparse_moe.experts." + std::to_string(std::get<1>(top)[t][j].item<int64_t>());
        auto ht = h[t];
        auto y = torch::matmul(W(e + ".w2.weight"), torch::silu(torch::matmul(W(e + ".w1.weight"), ht)) *
                                                        torch::matmul(W(e + ".w3.weight"), ht));
        out[t] += weights[t][j] * y;
      }
    x = x + out;
  }
  x = rms(x, W("model.norm.weight"));
  const bool tied = c["tie_word_embeddings"].get<bool>();
  return torch::matmul(x, W(tied ? "model.embed_tokens.weight" : "lm_head.weight").t());  // [T, V]
}

}  // namespace

TEST_CASE("key map: every tensor of the model maps to one distinct HF name and back", "[export][hf]") {
  for (bool tied : {false, true}) {
    Config c = testing::load("configs/tiny.json");
    c.model.text.tie_word_embeddings = tied;
    c.model.text.num_layers = 24;  // the full model's layer and expert counts, at tiny widths
    c.model.moe.num_experts = 16;
    OmniLite model(c.model);
    std::set<std::string> hf_names;
    for (const auto& [name, t] : io::state_tensors(*model)) {
      INFO(name);
      CHECK(io::key_rules_matching(name, false) == 1);
      const std::string hf = io::to_hf_name(name);
      CHECK(io::key_rules_matching(hf, true) == 1);
      CHECK(io::from_hf_name(hf) == name);
      CHECK(hf_names.insert(hf).second);
    }
    // Mixtral's names, as transformers' MixtralForCausalLM registers them.
    for (const char* n : {"model.embed_tokens.weight", "model.norm.weight", "model.layers.23.input_layernorm.weight",
                          "model.layers.23.post_attention_layernorm.weight", "model.layers.0.self_attn.q_proj.weight",
                          "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight",
                          "model.layers.0.self_attn.o_proj.weight", "model.layers.5.block_sparse_moe.gate.weight",
                          "model.layers.5.block_sparse_moe.experts.15.w1.weight",
                          "model.layers.5.block_sparse_moe.experts.15.w2.weight",
                          "model.layers.5.block_sparse_moe.experts.15.w3.weight"})
      CHECK(hf_names.count(n) == 1);
    CHECK(hf_names.count("lm_head.weight") == (tied ? 0u : 1u));
    size_t text = 0;
    for (const auto& n : hf_names) text += n.rfind("model.", 0) == 0 || n == "lm_head.weight";
    // embed + norm + 24 x (2 norms + 4 projections + gate + 16 x 3 experts) [+ lm_head]
    CHECK(text == 2 + 24 * (2 + 4 + 1 + 16 * 3) + (tied ? 0 : 1));
  }
  CHECK_THROWS_WITH(io::to_hf_name("text.layers.0.extra.weight"), ContainsText("text.layers.0.extra.weight"));
  CHECK_THROWS_WITH(io::from_hf_name("model.layers.0.mlp.up_proj.weight"),
                    ContainsText("model.layers.0.mlp.up_proj.weight"));
}

TEST_CASE("hf export: shards and index, import is strict and lossless, export -> import -> export byte-identical",
          "[export][hf]") {
  torch::manual_seed(3);
  const auto dir = testing::fresh_temp_dir("hf_export");
  Config c = testing::load("configs/tiny.json");
  OmniLite model(c.model);
  model->eval();
  io::save_module(*model, dir + "/src.safetensors");
  { std::ofstream(dir + "/tok.model") << "not a real tokenizer: copied byte for byte"; }

  io::HfExportOptions o;
  o.out_dir = dir + "/a";
  o.dtype = torch::kFloat32;
  o.max_shard_bytes = 60'000;  // several shards for the tiny model
  o.tokenizer = dir + "/tok.model";
  const auto a = io::write_hf_export(dir + "/src.safetensors", c, 42, o);
  REQUIRE(a.shards.size() > 2);
  // The index: total_size, every Mixtral tensor once, each in the shard that holds it; shards within the limit
  // unless a single tensor is larger. The rest (vision, resampler, flow, VQ-VAE) is in omnilite/multimodal.safetensors,
  // so the shards hold Mixtral's names only.
  std::ifstream jf(o.out_dir + "/model.safetensors.index.json");
  const json index = json::parse(jf);
  CHECK(index["metadata"]["total_size"].get<uint64_t>() == a.bytes);
  io::SafetensorsReader extras(o.out_dir + "/" + io::kMultimodalFile);
  int64_t mixtral = 0;
  for (const auto& [name, t] : io::state_tensors(*model)) {
    INFO(name);
    if (io::is_mixtral_tensor(name)) {
      ++mixtral;
      CHECK(index["weight_map"].contains(io::to_hf_name(name)));
    } else {
      CHECK(extras.contains(name));
    }
  }
  CHECK(static_cast<int64_t>(index["weight_map"].size()) == mixtral);
  CHECK(static_cast<int64_t>(extras.tensors().size()) + mixtral == a.tensors);
  for (const auto& [n, file] : index["weight_map"].items()) CHECK((n.rfind("model.", 0) == 0 || n == "lm_head.weight"));
  CHECK(a.tensors == static_cast<int64_t>(io::state_tensors(*model).size()));
  uint64_t sum = 0;
  for (const auto& s : a.shards) {
    io::SafetensorsReader r(o.out_dir + "/" + s);
    uint64_t bytes = 0;
    for (const auto& [n, e] : r.tensors()) {
      bytes += e.end - e.begin;
      CHECK(index["weight_map"][n] == s);
    }
    CHECK((bytes <= o.max_shard_bytes || r.tensors().size() == 1));
    sum += bytes;
  }
  CHECK(sum == a.bytes);

  // Import: the state and tokenizer come from config.json, every tensor loads strictly and equals the source.
  const json state = io::read_checkpoint_state(o.out_dir);
  CHECK(state["step"] == 42);
  const Config back = parse_config(state["config"]);
  CHECK(back.data.tokenizer == o.out_dir + "/tokenizer.model");
  CHECK(file_bytes(back.data.tokenizer) == file_bytes(dir + "/tok.model"));
  OmniLite imported(back.model);
  io::load_module(*imported, o.out_dir);
  imported->eval();
  auto theirs = io::state_tensors(*imported);
  for (const auto& [name, t] : io::state_tensors(*model)) {
    INFO(name);
    auto it = std::find_if(theirs.begin(), theirs.end(), [&](const auto& p) { return p.first == name; });
    REQUIRE(it != theirs.end());
    CHECK(torch::equal(it->second, t));
  }
  torch::NoGradGuard ng;
  auto tokens = torch::randint(7, 64, {2, 10}, torch::kInt64);
  auto images = torch::rand({2, 3, 28, 28});
  tokens.narrow(1, 1, 4).fill_(c.model.tokens.image_id);
  CHECK(torch::equal(imported->forward({tokens, images}).logits, model->forward({tokens, images}).logits));

  // Export of the import: the same files, byte for byte.
  io::HfExportOptions o2 = o;
  o2.out_dir = dir + "/b";
  o2.tokenizer = back.data.tokenizer;
  io::write_hf_export(o.out_dir, back, state["step"].get<int64_t>(), o2);
  std::set<std::string> files_a, files_b;
  for (const auto& e : fs::recursive_directory_iterator(o.out_dir))
    if (e.is_regular_file()) files_a.insert(fs::relative(e.path(), o.out_dir).string());
  for (const auto& e : fs::recursive_directory_iterator(o2.out_dir))
    if (e.is_regular_file()) files_b.insert(fs::relative(e.path(), o2.out_dir).string());
  CHECK(files_a.count(io::kMultimodalFile) == 1);
  CHECK(files_a == files_b);
  for (const auto& f : files_a) {
    INFO(f);
    CHECK(file_bytes(o.out_dir + "/" + f) == file_bytes(o2.out_dir + "/" + f));
  }

  // Re-exporting into the folder with one shard leaves no stale shard or index behind.
  o2.max_shard_bytes = 5'000'000'000;
  const auto one = io::write_hf_export(o.out_dir, back, 42, o2);
  CHECK(one.shards == std::vector<std::string>{"model.safetensors"});
  CHECK_FALSE(fs::exists(o2.out_dir + "/model.safetensors.index.json"));
  for (const auto& e : fs::directory_iterator(o2.out_dir)) CHECK(e.path().filename().string().rfind("model-", 0) != 0);
  OmniLite single(back.model);
  io::load_module(*single, o2.out_dir);
  CHECK(torch::equal(single->forward({tokens, images}).logits, model->forward({tokens, images}).logits));
}

TEST_CASE("hf export: Mixtral's forward from the files and config.json keys gives OMNI-LITE's logits", "[export][hf]") {
  for (bool tied : {false, true}) {
    torch::manual_seed(tied ? 5 : 4);
    const auto dir = testing::fresh_temp_dir("hf_mixtral");
    Config c = testing::load("configs/tiny.json");
    c.model.text.tie_word_embeddings = tied;
    OmniLite model(c.model);
    model->eval();
    io::save_module(*model, dir + "/src.safetensors");
    io::HfExportOptions o;
    o.out_dir = dir + "/hf";
    o.dtype = torch::kFloat32;
    o.max_shard_bytes = 100'000;
    io::write_hf_export(dir + "/src.safetensors", c, 0, o);
    const std::vector<int64_t> ids = {2, 17, 33, 9, 60, 41, 8, 25, 12, 50, 7, 19};
    torch::NoGradGuard ng;
    auto ours = model->forward({torch::tensor(ids, torch::kInt64).view({1, -1})}).logits[0];
    auto ref = mixtral_reference_logits(o.out_dir, ids);
    INFO("tied " << tied);
    CHECK(testing::max_rel_err(ours, ref) < 1e-5);
  }
}

TEST_CASE("hf export of merged QLoRA weights loads as the plain model with the adapter model's logits",
          "[export][hf][qlora]") {
  torch::manual_seed(8);
  const auto dir = testing::fresh_temp_dir("hf_qlora");
  const Config plain_cfg = testing::load("configs/tiny.json");
  OmniLite plain(plain_cfg.model);
  io::save_module(*plain, dir + "/base.safetensors");
  const Config c = testing::tiny_qlora();
  OmniLite q(c.model, *make_linear_builder(c));
  io::load_base_weights(*q, dir + "/base.safetensors");
  {
    torch::NoGradGuard ng;
    for (auto& p : q->named_parameters())
      if (p.key().find(".lora_B.") != std::string::npos) p.value().normal_(0, 0.05);
  }
  q->eval();
  io::write_merged_weights(*q, dir + "/merged.safetensors", torch::kFloat32);
  io::HfExportOptions o;
  o.out_dir = dir + "/hf";
  o.dtype = torch::kFloat32;
  io::write_hf_export(dir + "/merged.safetensors", c, 7, o);
  const Config back = parse_config(io::read_checkpoint_state(o.out_dir)["config"]);
  CHECK_FALSE(back.lora.enabled);
  OmniLite merged(back.model);
  io::load_module(*merged, o.out_dir);
  merged->eval();
  torch::NoGradGuard ng;
  auto tokens = torch::randint(7, 64, {1, 12}, torch::kInt64);
  CHECK(testing::max_rel_err(merged->forward({tokens}).logits, q->forward({tokens}).logits) < 1e-4);
}

TEST_CASE("hf export and import: broken folders and inexpressible models give errors that name them", "[export][hf]") {
  torch::manual_seed(9);
  const auto dir = testing::fresh_temp_dir("hf_errors");
  Config c = testing::load("configs/tiny.json");
  OmniLite model(c.model);
  io::save_module(*model, dir + "/src.safetensors");
  io::HfExportOptions o;
  o.out_dir = dir + "/hf";
  o.dtype = torch::kFloat32;
  o.max_shard_bytes = 60'000;
  const auto res = io::write_hf_export(dir + "/src.safetensors", c, 0, o);

  // A shard the index names is missing.
  const std::string moved = dir + "/moved.safetensors";
  fs::rename(o.out_dir + "/" + res.shards[1], moved);
  CHECK_THROWS_WITH(io::WeightsReader(o.out_dir), ContainsText(res.shards[1]) && ContainsText("no such file"));
  fs::rename(moved, o.out_dir + "/" + res.shards[1]);
  // The index places a tensor in a shard that does not hold it.
  {
    std::ifstream jf(o.out_dir + "/model.safetensors.index.json");
    json index = json::parse(jf);
    auto& norm_shard = index["weight_map"]["model.norm.weight"];
    norm_shard = norm_shard.get<std::string>() == res.shards[0] ? res.shards[1] : res.shards[0];
    std::ofstream(o.out_dir + "/model.safetensors.index.json") << index.dump();
  }
  CHECK_THROWS_WITH(io::WeightsReader(o.out_dir), ContainsText("model.norm.weight"));
  // A Hugging Face name outside the key map.
  io::save_safetensors(dir + "/odd.safetensors", {{"model.embed_tokens.weight", torch::zeros({4, 2})},
                                                  {"model.layers.0.mlp.up_proj.weight", torch::zeros({2, 2})}});
  CHECK_THROWS_WITH(io::WeightsReader(dir + "/odd.safetensors"), ContainsText("model.layers.0.mlp.up_proj.weight"));
  // RoPE over part of each head has no Mixtral equivalent.
  Config partial = c;
  partial.model.text.rope_dim = 8;
  o.out_dir = dir + "/partial";
  CHECK_THROWS_WITH(io::write_hf_export(dir + "/src.safetensors", partial, 0, o),
                    ContainsText("rope_dim = 8") && ContainsText("head_dim = 16"));
  CHECK_FALSE(fs::exists(o.out_dir + "/config.json"));
  // Sizes.
  CHECK(io::parse_byte_size("--max-shard-size", "5GB") == 5'000'000'000ull);
  CHECK(io::parse_byte_size("--max-shard-size", "64KB") == 64'000ull);
  CHECK(io::parse_byte_size("--max-shard-size", "123") == 123ull);
  CHECK_THROWS_WITH(io::parse_byte_size("--max-shard-size", "5 gigs"), ContainsText("\"5 gigs\""));
}

TEST_CASE("hf export --quant nf4: bitsandbytes' Linear4bit tensors for the attention, read back as a QLoRA base",
          "[export][hf][nf4]") {
  torch::manual_seed(31);
  const auto dir = testing::fresh_temp_dir("hf_nf4");
  Config c = testing::load("configs/tiny.json");
  OmniLite model(c.model);
  io::save_module(*model, dir + "/src.safetensors");
  io::HfExportOptions o;
  o.out_dir = dir + "/q";
  o.dtype = torch::kFloat32;
  o.quant = "nf4";
  io::write_hf_export(dir + "/src.safetensors", c, 1, o);
  std::ifstream cf(o.out_dir + "/config.json");
  const json config = json::parse(cf);
  CHECK(config["quantization_config"]["quant_method"] == "bitsandbytes");
  CHECK(config["quantization_config"]["bnb_4bit_use_double_quant"] == true);
  io::SafetensorsReader r(o.out_dir + "/model.safetensors");
  io::SafetensorsReader src(dir + "/src.safetensors");
  const std::string w = "model.layers.1.self_attn.k_proj.weight";
  const auto orig = src.load("text.layers.1.self_attn.k_proj.weight");
  const auto q = quant::nf4_quantize(orig);
  // The packed codes [n/2, 1] and the double-quantised statistics, as nf4_quantize makes them.
  CHECK(r.tensors().at(w).dtype == torch::kUInt8);
  CHECK(r.tensors().at(w).shape == std::vector<int64_t>{orig.numel() / 2, 1});
  CHECK(torch::equal(r.load(w).view(-1), q.packed));
  CHECK(torch::equal(r.load(w + ".absmax"), q.absmax_q));
  CHECK(torch::equal(r.load(w + ".nested_absmax"), q.absmax_scale));
  CHECK(r.load(w + ".quant_map").numel() == 16);
  CHECK(r.load(w + ".nested_quant_map").numel() == 256);
  auto js = r.load(w + ".quant_state.bitsandbytes__nf4");
  const json state = json::parse(std::string(reinterpret_cast<const char*>(js.data_ptr<uint8_t>()), js.numel()));
  CHECK(state["quant_type"] == "nf4");
  CHECK(state["blocksize"] == 64);
  CHECK(state["shape"] == json(orig.sizes().vec()));
  CHECK(state["nested_offset"].get<double>() == Approx(q.absmax_mean.item<float>()).epsilon(1e-7));
  // Experts and norms stay full precision (transformers quantises nn.Linear modules only).
  CHECK(r.tensors().at("model.layers.0.block_sparse_moe.experts.1.w2.weight").dtype == torch::kFloat32);
  // Read back: one tensor of the original shape; load() is the dequantisation, nf4() the codes as stored.
  io::WeightsReader back(o.out_dir);
  const std::string k = "text.layers.1.self_attn.k_proj.weight";
  REQUIRE(back.contains(k));
  CHECK(back.tensors().at(k).shape == orig.sizes().vec());
  CHECK(torch::equal(back.load(k), quant::nf4_dequantize(q)));
  REQUIRE(back.nf4(k).has_value());
  CHECK(torch::equal(back.nf4(k)->absmax_q, q.absmax_q));
  CHECK_FALSE(back.nf4("text.layers.1.moe.experts.0.w1.weight").has_value());
  // A QLoRA model (NF4 base) from the 4-bit export equals one from the fp32 source bit for bit: the attention codes
  // are taken as they are, not quantised again.
  Config qc = c;
  qc.lora.enabled = true;
  qc.lora.base_dtype = "nf4";
  OmniLite from_fp32(qc.model, *make_linear_builder(qc)), from_4bit(qc.model, *make_linear_builder(qc));
  io::load_base_weights(*from_fp32, dir + "/src.safetensors");
  io::load_base_weights(*from_4bit, o.out_dir);
  auto b1 = from_fp32->named_buffers(), b2 = from_4bit->named_buffers();
  for (const auto& item : b1) {
    INFO(item.key());
    CHECK(torch::equal(item.value(), b2[item.key()]));
  }
  torch::NoGradGuard ng;
  auto tokens = torch::randint(7, 64, {1, 9}, torch::kInt64);
  from_fp32->eval();
  from_4bit->eval();
  CHECK(torch::equal(from_fp32->forward({tokens}).logits, from_4bit->forward({tokens}).logits));
  // Another 4-bit flavour is refused by name.
  {
    auto st = r.load(w + ".quant_state.bitsandbytes__nf4");
    std::string text(reinterpret_cast<const char*>(st.data_ptr<uint8_t>()), st.numel());
    text.replace(text.find("\"nf4\""), 5, "\"fp4\"");
    std::vector<std::pair<std::string, torch::Tensor>> all;
    for (const auto& [n, e] : r.tensors()) all.emplace_back(n, r.load(n));
    for (auto& [n, t] : all)
      if (n == w + ".quant_state.bitsandbytes__nf4")
        t = torch::from_blob(text.data(), {static_cast<int64_t>(text.size())}, torch::kUInt8).clone();
    fs::create_directories(dir + "/fp4");
    fs::copy_file(o.out_dir + "/config.json", dir + "/fp4/config.json");
    io::save_safetensors(dir + "/fp4/model.safetensors", all, {{"format", "pt"}});
    CHECK_THROWS_WITH(io::WeightsReader(dir + "/fp4"), ContainsText(w) && ContainsText("fp4") &&
                                                          ContainsText("blocksize 64"));
  }
}
