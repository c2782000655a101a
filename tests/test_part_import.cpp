// `init --from PART=SOURCE`: the text backbone of a Mixtral folder (first layers, grown vocabulary), a CLIP vision
// encoder against a float64 CLIP forward written here from transformers' definition (class token, pre-norm,
// separate q/k/v, quick-GELU, pixel normalisation folded into the patch embedding), the tokenizer extension, and the
// refusals that name the key or tensor and both values.
#include "catch_compat.h"

#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "helpers.h"
#include "omnilite/data/image_dataset.h"
#include "omnilite/data/tokenizer.h"
#include "omnilite/infer/generate.h"
#include "omnilite/io/adapter.h"
#include "omnilite/io/checkpoint.h"
#include "omnilite/io/hf_export.h"
#include "omnilite/io/init_checkpoint.h"
#include "omnilite/io/part_import.h"
#include "omnilite/io/safetensors.h"
#include "omnilite/io/spm_model.h"
#include "omnilite/io/weights_reader.h"
#include "omnilite/modules/lora_linear.h"
#include "omnilite/modules/omnilite.h"
#include "omnilite/modules/qlora_builder.h"
#include "omnilite/train/memory_estimate.h"
#include "omnilite/train/trainer.h"

using namespace omnilite;
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// configs/tiny.json with CLIP's vision variant.
Config clip_config() {
  Config c = testing::load("configs/tiny.json");
  c.model.vision.class_token = true;
  c.model.vision.pre_norm = true;
  c.model.vision.activation = "quick_gelu";
  c.model.vision.final_norm = false;
  c.model.vision.norm_eps = 1e-5;
  return c;
}

// A CLIPVisionModel folder as transformers saves it: random tensors under CLIP's names, `layers` encoder layers.
std::map<std::string, torch::Tensor> write_clip_folder(const std::string& dir, const VisionOptions& v, int64_t layers,
                                                       const std::string& prefix) {
  fs::create_directories(dir);
  torch::manual_seed(11);
  const int64_t W = v.width, F = v.mlp_dim, P = (v.image_size / v.patch_size) * (v.image_size / v.patch_size);
  std::map<std::string, torch::Tensor> t;
  t["embeddings.class_embedding"] = torch::randn({W});
  t["embeddings.patch_embedding.weight"] = torch::randn({W, 3, v.patch_size, v.patch_size}) * 0.05;
  t["embeddings.position_embedding.weight"] = torch::randn({P + 1, W}) * 0.1;
  for (const char* n : {"pre_layrnorm", "post_layernorm"}) {
    t[std::string(n) + ".weight"] = 1 + 0.1 * torch::randn({W});
    t[std::string(n) + ".bias"] = 0.1 * torch::randn({W});
  }
  for (int64_t l = 0; l < layers; ++l) {
    const std::string p = "encoder.layers." + std::to_string(l) + ".";
    for (const char* n : {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj"}) {
      t[p + n + ".weight"] = torch::randn({W, W}) * 0.15;
      t[p + n + ".bias"] = torch::randn({W}) * 0.1;
    }
    for (const char* n : {"layer_norm1", "layer_norm2"}) {
      t[p + n + ".weight"] = 1 + 0.1 * torch::randn({W});
      t[p + n + ".bias"] = 0.1 * torch::randn({W});
    }
    t[p + "mlp.fc1.weight"] = torch::randn({F, W}) * 0.15;
    t[p + "mlp.fc1.bias"] = torch::randn({F}) * 0.1;
    t[p + "mlp.fc2.weight"] = torch::randn({W, F}) * 0.15;
    t[p + "mlp.fc2.bias"] = torch::randn({W}) * 0.1;
  }
  std::vector<std::pair<std::string, torch::Tensor>> named;
  for (const auto& [k, x] : t) named.emplace_back(prefix + k, x);
  io::save_safetensors(dir + "/model.safetensors", named);
  json c = {{"model_type", "clip_vision_model"}, {"hidden_size", W}, {"intermediate_size", F},
            {"num_hidden_layers", layers}, {"num_attention_heads", v.num_heads}, {"image_size", v.image_size},
            {"patch_size", v.patch_size}, {"hidden_act", "quick_gelu"}, {"layer_norm_eps", 1e-5}};
  if (!prefix.empty()) c = {{"model_type", "clip"}, {"vision_config", c}};
  std::ofstream(dir + "/config.json") << c.dump(2);
  return t;
}

// transformers' CLIPVisionTransformer in float64, from the CLIP tensors: hidden_states[depth] of `pixel_values`
// (optionally through post_layernorm).
torch::Tensor clip_reference(const std::map<std::string, torch::Tensor>& t, const torch::Tensor& pixel_values,
                             const VisionOptions& v, bool post_norm) {
  auto g = [&](const std::string& n) { return t.at(n).to(torch::kFloat64); };
  auto ln = [&](const torch::Tensor& x, const std::string& n) {
    auto mu = x.mean(-1, true), var = (x - mu).pow(2).mean(-1, true);
    return (x - mu) / torch::sqrt(var + 1e-5) * g(n + ".weight") + g(n + ".bias");
  };
  auto lin = [&](const torch::Tensor& x, const std::string& n) {
    return torch::matmul(x, g(n + ".weight").t()) + g(n + ".bias");
  };
  const int64_t N = pixel_values.size(0), W = v.width, H = v.num_heads, Dh = W / H;
  auto patches = torch::conv2d(pixel_values.to(torch::kFloat64), g("embeddings.patch_embedding.weight"), {},
                               v.patch_size).flatten(2).transpose(1, 2);  // [N, P, W]
  auto x = torch::cat({g("embeddings.class_embedding").view({1, 1, W}).expand({N, 1, W}), patches}, 1) +
           g("embeddings.position_embedding.weight").unsqueeze(0);
  x = ln(x, "pre_layrnorm");
  for (int64_t l = 0; l < v.depth; ++l) {
    const std::string p = "encoder.layers." + std::to_string(l) + ".";
    auto h = ln(x, p + "layer_norm1");
    auto heads = [&](const torch::Tensor& y) { return y.view({N, -1, H, Dh}).transpose(1, 2); };
    auto q = heads(lin(h, p + "self_attn.q_proj")), k = heads(lin(h, p + "self_attn.k_proj"));
    auto a = torch::softmax(torch::matmul(q, k.transpose(-1, -2)) / std::sqrt(static_cast<double>(Dh)), -1);
    auto o = torch::matmul(a, heads(lin(h, p + "self_attn.v_proj"))).transpose(1, 2).reshape({N, -1, W});
    x = x + lin(o, p + "self_attn.out_proj");
    auto u = lin(ln(x, p + "layer_norm2"), p + "mlp.fc1");
    x = x + lin(u * torch::sigmoid(1.702 * u), p + "mlp.fc2");
  }
  return post_norm ? ln(x, "post_layernorm") : x;
}

std::string init_from(const Config& cfg, const std::string& out, const std::vector<std::string>& from,
                      uint64_t seed = 3) {
  io::InitCheckpointOptions o;
  o.out_dir = out;
  o.dtype = torch::kFloat32;
  o.seed = seed;
  o.from = io::parse_part_sources(from);
  io::write_init_checkpoint(cfg, o);
  return out;
}

OmniLite load_model(const std::string& dir) {
  const Config c = parse_config(io::read_checkpoint_state(dir)["config"]);
  OmniLite m(c.model);
  io::load_module(*m, dir + "/model.safetensors");
  m->eval();
  return m;
}

}  // namespace

TEST_CASE("part import: a CLIP vision encoder gives CLIP's hidden states (float64 CLIP forward)", "[parts]") {
  for (const std::string prefix : {"", "vision_model."}) {
    for (bool final_norm : {false, true}) {
      const auto dir = testing::fresh_temp_dir("parts_clip");
      Config cfg = clip_config();
      cfg.model.vision.final_norm = final_norm;
      const auto t = write_clip_folder(dir + "/clip", cfg.model.vision, 3, prefix);  // the model takes 2 of 3
      init_from(cfg, dir + "/init", {"vision=" + dir + "/clip"});
      auto m = load_model(dir + "/init");
      // OMNI-LITE's images are in [-1, 1]; CLIP sees (x01 - mean) / std of the same pixels.
      torch::manual_seed(5);
      auto images = torch::rand({2, 3, 28, 28}) * 2 - 1;
      auto mean = torch::tensor({0.48145466, 0.4578275, 0.40821073}).view({1, 3, 1, 1});
      auto stdv = torch::tensor({0.26862954, 0.26130258, 0.27577711}).view({1, 3, 1, 1});
      torch::NoGradGuard ng;
      auto ours = m->vision->forward(images);
      auto ref = clip_reference(t, ((images.to(torch::kFloat64) + 1) / 2 - mean) / stdv, cfg.model.vision, final_norm);
      INFO("prefix \"" << prefix << "\", final_norm " << final_norm);
      REQUIRE(ours.sizes() == ref.sizes());  // [2, 1 + 4, 32]
      CHECK(ours.size(1) == 5);
      CHECK(testing::max_rel_err(ours, ref) < 1e-5);
      // The other parts are the plain init's (same seed, piece by piece).
      if (prefix.empty() && !final_norm) {
        init_from(cfg, dir + "/plain", {});
        io::WeightsReader a(dir + "/init"), b(dir + "/plain");
        CHECK(torch::equal(a.load("resampler.latents"), b.load("resampler.latents")));
        CHECK(torch::equal(a.load("text.layers.1.moe.gate.weight"), b.load("text.layers.1.moe.gate.weight")));
        CHECK(!torch::equal(a.load("vision.blocks.0.qkv.weight"), b.load("vision.blocks.0.qkv.weight")));
      }
    }
  }
}

TEST_CASE("part import: the text backbone of a Mixtral folder, first layers, vocabulary grown by the mean row",
          "[parts]") {
  const auto dir = testing::fresh_temp_dir("parts_text");
  // The source: a 3-layer model exported as a Mixtral folder (its config.json has Mixtral's keys).
  Config src = testing::load("configs/tiny.json");
  src.model.text.num_layers = 3;
  torch::manual_seed(2);
  OmniLite source(src.model);
  io::save_module(*source, dir + "/src.safetensors");
  io::HfExportOptions ho;
  ho.out_dir = dir + "/mixtral";
  ho.dtype = torch::kFloat32;
  io::write_hf_export(dir + "/src.safetensors", src, 0, ho);

  Config cfg = testing::load("configs/tiny.json");  // 2 layers
  cfg.model.text.vocab_size = 70;                    // 6 rows more than the source's 64
  init_from(cfg, dir + "/init", {"text=" + dir + "/mixtral"});
  io::WeightsReader r(dir + "/init");
  for (const std::string n : {"text.layers.0.self_attn.q_proj.weight", "text.layers.1.moe.experts.3.w2.weight",
                              "text.layers.1.post_attention_layernorm.weight", "text.norm.weight"})
    CHECK(torch::equal(r.load(n), source->named_parameters()[n]));
  CHECK(!r.contains("text.layers.2.self_attn.q_proj.weight"));
  for (const std::string n : {"text.embed_tokens.weight", "lm_head.weight"}) {
    auto got = r.load(n), want = source->named_parameters()[n];
    INFO(n);
    REQUIRE(got.size(0) == 70);
    CHECK(torch::equal(got.narrow(0, 0, 64), want));
    for (int64_t row = 64; row < 70; ++row) CHECK(testing::max_rel_err(got[row], want.mean(0)) < 1e-6);
  }
  const json state = io::read_checkpoint_state(dir + "/init");
  CHECK(state["init"]["from"]["text"] == dir + "/mixtral");
  CHECK(parse_config(json::parse(std::ifstream(dir + "/init/config.json"))).model.text.vocab_size == 70);

  // Refusals name the key (or tensor) and both values, before anything is written.
  Config wrong = cfg;
  wrong.model.text.num_kv_heads = 4;
  CHECK_THROWS_WITH(init_from(wrong, dir + "/bad1", {"text=" + dir + "/mixtral"}),
                    ContainsText("num_key_value_heads = 2 but model.text.num_kv_heads = 4"));
  CHECK(!fs::exists(dir + "/bad1"));  // nothing left behind
  wrong = cfg;
  wrong.model.text.num_layers = 4;
  CHECK_THROWS_WITH(init_from(wrong, dir + "/bad2", {"text=" + dir + "/mixtral"}),
                    ContainsText("num_hidden_layers = 3 but model.text.num_layers = 4"));
  wrong = cfg;
  wrong.model.text.vocab_size = 60;
  CHECK_THROWS_WITH(init_from(wrong, dir + "/bad3", {"text=" + dir + "/mixtral"}),
                    ContainsText("vocab_size = 64 but model.text.vocab_size = 60"));
  wrong = cfg;
  wrong.model.text.rope_theta = 1e6;
  CHECK_THROWS_WITH(init_from(wrong, dir + "/bad4", {"text=" + dir + "/mixtral"}),
                    ContainsText("rope_theta = 10000 but model.text.rope_theta = 1e+06"));
  CHECK_THROWS_WITH(init_from(cfg, dir + "/bad5", {"vision=" + dir + "/mixtral"}),
                    ContainsText("model_type = \"mixtral\", expected \"clip_vision_model\""));
  CHECK_THROWS_WITH(io::parse_part_sources({"audio=x"}), ContainsText("unknown part \"audio\""));
  CHECK_THROWS_WITH(io::parse_part_sources({"text="}), ContainsText("expected PART=SOURCE"));
  CHECK_THROWS_WITH(init_from(cfg, dir + "/bad6", {"text=" + dir + "/nowhere"}), ContainsText("no such file"));
}

TEST_CASE("part import: CLIP mismatches are refused naming the key or tensor and both values", "[parts]") {
  const auto dir = testing::fresh_temp_dir("parts_clip_bad");
  Config cfg = clip_config();
  write_clip_folder(dir + "/clip", cfg.model.vision, 2, "");
  Config wrong = cfg;
  wrong.model.vision.class_token = false;
  CHECK_THROWS_WITH(init_from(wrong, dir + "/a", {"vision=" + dir + "/clip"}),
                    ContainsText("model.vision.class_token = false"));
  wrong = cfg;
  wrong.model.vision.activation = "gelu";
  CHECK_THROWS_WITH(init_from(wrong, dir + "/b", {"vision=" + dir + "/clip"}),
                    ContainsText("hidden_act = \"quick_gelu\" but model.vision.activation = \"gelu\""));
  wrong = cfg;
  wrong.model.vision.mlp_dim = 48;
  CHECK_THROWS_WITH(init_from(wrong, dir + "/c", {"vision=" + dir + "/clip"}),
                    ContainsText("intermediate_size = 64 but model.vision.mlp_dim = 48"));
  wrong = cfg;
  wrong.model.vision.depth = 3;
  CHECK_THROWS_WITH(init_from(wrong, dir + "/d", {"vision=" + dir + "/clip"}),
                    ContainsText("num_hidden_layers = 2 but model.vision.depth = 3"));
  // A tensor of another shape than its config says: named, with both shapes.
  io::SafetensorsReader rd(dir + "/clip/model.safetensors");
  std::vector<std::pair<std::string, torch::Tensor>> named;
  for (const auto& [k, e] : rd.tensors()) named.emplace_back(k, rd.load(k));
  for (auto& [k, x] : named)
    if (k == "encoder.layers.1.mlp.fc1.bias") x = torch::zeros({63});
  io::save_safetensors(dir + "/clip/model.safetensors", named);
  CHECK_THROWS_WITH(init_from(cfg, dir + "/e", {"vision=" + dir + "/clip"}),
                    ContainsText("\"vision.blocks.1.fc1.bias\" has shape [63] in the source, the model expects [64]"));
}

TEST_CASE("part import: a SentencePiece tokenizer gains the image markers, the vocabulary and ids follow", "[parts]") {
  const auto dir = testing::fresh_temp_dir("parts_tok");
  // A Llama-like vocabulary without markers: <unk> <s> </s>, 256 byte pieces, a few words.
  io::SpmModel m;
  m.pieces = {{"<unk>", 0, io::SpmPieceType::Unknown}, {"<s>", 0, io::SpmPieceType::Control},
              {"</s>", 0, io::SpmPieceType::Control}};
  for (int b = 0; b < 256; ++b) {
    char buf[8];
    std::snprintf(buf, sizeof buf, "<0x%02X>", b);
    m.pieces.push_back({buf, 0, io::SpmPieceType::Byte});
  }
  float score = -1;
  for (const char* w : {"\u2581red", "\u2581coat", "\u2581", "r", "e", "d", "c", "o", "a", "t"})
    m.pieces.push_back({w, score--, io::SpmPieceType::Normal});
  io::write_spm_model(m, dir + "/llama.model");
  const int64_t n = static_cast<int64_t>(m.pieces.size());  // 269

  const auto ext = io::extend_tokenizer(dir + "/llama.model", dir + "/ext.model");
  CHECK(ext.added == 4);
  CHECK(ext.vocab_size == n + 4);
  CHECK(ext.tokens.bos_id == 1);
  CHECK(ext.tokens.eos_id == 2);
  CHECK(ext.tokens.pad_id == 0);
  CHECK(ext.tokens.image_id == n);
  CHECK(ext.tokens.image_begin_id == n + 1);
  CHECK(ext.tokens.image_end_id == n + 2);
  CHECK(ext.tokens.gen_image_id == n + 3);
  // The original file's bytes come first, unchanged; SentencePiece reads the markers as single pieces.
  std::ifstream a(dir + "/llama.model", std::ios::binary), b(dir + "/ext.model", std::ios::binary);
  const std::string before((std::istreambuf_iterator<char>(a)), {}), after((std::istreambuf_iterator<char>(b)), {});
  CHECK(after.compare(0, before.size(), before) == 0);
  Tokenizer tok(dir + "/ext.model");
  CHECK(tok.vocab_size() == n + 4);
  CHECK(tok.piece_id("<image_begin>") == n + 1);
  for (int64_t k = 0; k < 4; ++k) CHECK(tok.piece_id(reserved_marker_pieces()[k]) == n + k);
  const auto ids = tok.encode("red<image>coat");  // typed markers are spelled as text, as with OMNI-LITE's own
  CHECK(std::count(ids.begin(), ids.end(), n) == 0);
  CHECK(tok.decode(ids) == "red<image>coat");
  // An extended file is extended by nothing.
  CHECK(io::extend_tokenizer(dir + "/ext.model", dir + "/ext2.model").added == 0);

  // init --from tokenizer: the config follows the tokenizer.
  Config cfg = testing::load("configs/tiny.json");
  cfg.model.text.vocab_size = 300;
  init_from(cfg, dir + "/init", {"tokenizer=" + dir + "/llama.model"});
  const Config stored = parse_config(json::parse(std::ifstream(dir + "/init/config.json")));
  CHECK(stored.model.text.vocab_size == n + 4);
  CHECK(stored.model.tokens.image_end_id == n + 2);
  CHECK(stored.data.tokenizer == dir + "/init/tokenizer.model");
  CHECK(io::WeightsReader(dir + "/init").tensors().at("text.embed_tokens.weight").shape[0] == n + 4);
  Tokenizer(stored.data.tokenizer).check_compatible(stored.model);  // what train checks before step 1
}

TEST_CASE("LLaVA recipe at tiny scale: init --from a CLIP folder, stage 1 trains the resampler alone, stage 2 QLoRA "
          "with the resampler in full (lora.modules_to_save), merged as trained", "[parts][recipe]") {
  const auto dir = testing::fresh_temp_dir("parts_llava");
  Config base = testing::tiny_text_config(dir);
  base.model.vision = clip_config().model.vision;
  write_clip_folder(dir + "/clip", base.model.vision, 2, "vision_model.");
  init_from(base, dir + "/init", {"vision=" + dir + "/clip"});
  // LLaVA records about two images (PPM, read without OpenCV too).
  torch::manual_seed(3);
  for (int i = 0; i < 2; ++i)
    write_image_file(torch::randint(0, 256, {28, 28, 3}, torch::kInt64).to(torch::kUInt8),
                     dir + "/img" + std::to_string(i) + ".ppm");
  {
    std::ofstream f(dir + "/llava.json");
    json records = json::array();
    for (int i = 0; i < 6; ++i)
      records.push_back({{"image", "img" + std::to_string(i % 2) + ".ppm"},
                         {"conversations", {{{"from", "human"}, {"value", "<image>\nthe coat"}},
                                            {{"from", "gpt"}, {"value", i % 2 ? "a red bag" : "the blue boot"}}}}});
    f << records.dump();
  }
  // The recipes as committed, on this folder and at this size (the model comes from the base: no model section).
  auto recipe = [&](const std::string& file, const std::string& base_dir, const std::string& out) {
    json j = read_config_json(testing::source_path(file));
    REQUIRE(!j.contains("model"));
    for (const std::string s : {"runtime.device=\"cpu\"", "runtime.dtype=\"fp32\"", "runtime.threads=1",
                                "train.steps=3", "train.warmup_steps=0", "train.sft_batch_size=2",
                                "train.sft_seq_len=64", "train.tensorboard=false", "train.ckpt_every=3"})
      apply_config_override(j, s);
    j["train"]["base_checkpoint"] = base_dir;
    j["data"]["sft_train"] = {dir + "/llava.json"};
    j["data"]["image_root"] = dir;
    j = io::with_base_model(j, base_dir);
    Config c = parse_config(j);
    if (c.lora.enabled) c.lora.rank = 4;
    TrainRunOptions run;
    run.out_dir = dir + "/" + out;
    train(c, run);
    return c;
  };
  const Config c1 = recipe("configs/llava-stage1.json", dir + "/init", "stage1");
  CHECK(c1.model.vision.class_token);  // the init's model
  CHECK(c1.data.tokenizer == base.data.tokenizer);
  io::WeightsReader init(dir + "/init"), s1(io::latest_checkpoint(dir + "/stage1"));
  int64_t changed = 0, unchanged_elsewhere = 0, others = 0;
  for (const auto& [name, e] : init.tensors()) {
    const bool same = torch::equal(init.load(name), s1.load(name));
    if (name.rfind("resampler.", 0) == 0) changed += same ? 0 : 1;
    else {
      ++others;
      unchanged_elsewhere += same ? 1 : 0;
    }
  }
  CHECK(changed > 0);
  CHECK(unchanged_elsewhere == others);  // ViT, LLM, flow head and VQ-VAE frozen

  const Config c2 = recipe("configs/llava-stage2.json", dir + "/stage1", "stage2");
  const std::string ck2 = io::latest_checkpoint(dir + "/stage2");
  io::SafetensorsReader adapter(ck2 + "/adapter_model.safetensors");
  int64_t lora = 0, saved = 0;
  for (const auto& [name, e] : adapter.tensors()) {
    if (name.find(".lora_") != std::string::npos) ++lora;
    else {
      ++saved;
      CHECK(name.rfind("base_model.model.resampler.", 0) == 0);
    }
  }
  CHECK(lora > 0);
  CHECK(saved == static_cast<int64_t>(std::count_if(s1.tensors().begin(), s1.tensors().end(), [](const auto& kv) {
          return kv.first.rfind("resampler.", 0) == 0;
        })));
  const auto trained_latents = adapter.load("base_model.model.resampler.latents");
  CHECK(!torch::equal(trained_latents, s1.load("resampler.latents")));
  // The memory estimate counts what trains: the adapters and the resampler in full.
  {
    OmniLite q(c2.model, *make_linear_builder(c2));
    train_adapters_only(*q, c2.lora.modules_to_save);
    int64_t trainable = 0;
    for (const auto& p : q->parameters()) trainable += p.requires_grad() ? p.numel() : 0;
    CHECK(estimate_training_memory(c2).trainable_params == trainable);
  }
  // Unmerged (NF4 bases + adapters + the trained resampler) and merged give the same logits, and the merged file
  // holds the resampler as trained.
  auto unmerged = load_omni_checkpoint(dir + "/stage1", "", dir + "/stage2");
  io::merge_adapter(dir + "/stage1", ck2, dir + "/merged.safetensors", torch::kFloat32);
  io::SafetensorsReader merged(dir + "/merged.safetensors");
  CHECK(torch::equal(merged.load("resampler.latents"), trained_latents));
  OmniLite plain(c2.model);
  io::load_module(*plain, dir + "/merged.safetensors");
  plain->eval();
  torch::NoGradGuard ng;
  OmniInput in;
  in.tokens = torch::tensor({1, 4, 3, 3, 3, 3, 5, 20, 30}, torch::kInt64).view({1, -1});
  in.images = torch::rand({1, 3, 28, 28}) * 2 - 1;
  CHECK(testing::max_rel_err(unmerged.model->forward(in).logits, plain->forward(in).logits) < 1e-4);
}
