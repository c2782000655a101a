// The QLoRA flow around training: `init` (a checkpoint written piece by piece equals the model's tensors), `export
// --merge` (merged plain weights give the adapter model's logits) and `memory` (its counts against a constructed
// model).
#include "catch_compat.h"

#include <filesystem>
#include <map>

#include "helpers.h"
#include "omnilite/io/adapter.h"
#include "omnilite/io/checkpoint.h"
#include "omnilite/infer/generate.h"
#include "omnilite/io/init_checkpoint.h"
#include "omnilite/io/weights_reader.h"
#include "omnilite/io/safetensors.h"
#include "omnilite/modules/lora_linear.h"
#include "omnilite/modules/nf4_linear.h"
#include "omnilite/modules/omnilite.h"
#include "omnilite/modules/qlora_builder.h"
#include "omnilite/modules/param_count.h"
#include "omnilite/train/memory_estimate.h"

using namespace omnilite;
namespace fs = std::filesystem;


TEST_CASE("model_parts hold exactly the tensors of the whole model", "[qlora][init]") {
  for (bool tied : {false, true}) {
    Config c = testing::load("configs/tiny.json");
    c.model.text.tie_word_embeddings = tied;
    const LinearBuilder builder;
    OmniLite model(c.model, builder);
    std::map<std::string, std::pair<std::vector<int64_t>, torch::ScalarType>> whole, parts;
    for (const auto& [k, t] : io::state_tensors(*model)) whole[k] = {t.sizes().vec(), t.scalar_type()};
    for (const auto& part : model_parts(c.model, builder)) {
      auto m = part.make();
      for (const auto& [k, t] : io::state_tensors(*m)) {
        const std::string name = part.prefix + "." + k;
        INFO(name);
        CHECK(parts.count(name) == 0);
        parts[name] = {t.sizes().vec(), t.scalar_type()};
      }
    }
    INFO("tied " << tied);
    CHECK(parts == whole);
  }
}

TEST_CASE("init writes a bf16 checkpoint piece by piece that loads strictly and refuses to overwrite", "[qlora][init]") {
  const auto dir = testing::fresh_temp_dir("init");
  Config c = testing::load("configs/tiny.json");
  io::InitCheckpointOptions o;
  o.out_dir = dir + "/ck";
  o.seed = 11;
  int64_t calls = 0, pieces = 0;
  const auto r = io::write_init_checkpoint(c, o, [&](int64_t done, int64_t all) {
    ++calls;
    pieces = all;
    CHECK(done == calls);
  });
  const LinearBuilder builder;
  const auto parts = model_parts(c.model, builder);
  CHECK(pieces == static_cast<int64_t>(parts.size()));
  io::SafetensorsReader reader(o.out_dir + "/model.safetensors");
  reader.verify_checksum();
  CHECK(reader.tensors().at("text.layers.1.self_attn.q_proj.weight").dtype == torch::kBFloat16);
  // Piece k is the module built after manual_seed(seed + k), rounded to bf16.
  for (size_t k = 0; k < parts.size(); ++k) {
    if (parts[k].prefix != "text.layers.1" && parts[k].prefix != "text.embed_tokens") continue;
    torch::manual_seed(o.seed + k);
    auto m = parts[k].make();
    for (const auto& [name, t] : io::state_tensors(*m)) {
      INFO(parts[k].prefix << "." << name);
      CHECK(torch::equal(reader.load(parts[k].prefix + "." + name), t.to(torch::kBFloat16)));
    }
  }
  // The whole model loads it strictly; the state names the plain config.
  OmniLite model(c.model);
  io::load_module(*model, o.out_dir + "/model.safetensors");
  const auto state = io::read_checkpoint_state(o.out_dir);
  CHECK(state["step"] == 0);
  CHECK(state["config"]["lora"]["enabled"] == false);
  CHECK(r.params == count_parameters(c.model).total + 2 * c.model.flow.latent_channels);  // + VQ-VAE latent stats
  // A second init into the same folder is refused and leaves the file as it was.
  const auto before = fs::last_write_time(o.out_dir + "/model.safetensors");
  CHECK_THROWS_WITH(io::write_init_checkpoint(c, o), ContainsText("already exists"));
  CHECK(fs::last_write_time(o.out_dir + "/model.safetensors") == before);
}

TEST_CASE("merged QLoRA weights give the adapter model's logits", "[qlora][export]") {
  torch::manual_seed(21);
  const auto dir = testing::fresh_temp_dir("merge");
  Config plain_cfg = testing::load("configs/tiny.json");
  OmniLite plain(plain_cfg.model);
  io::save_module(*plain, dir + "/base.safetensors");
  for (const std::string base_dtype : {"nf4", "fp32"}) {
    Config c = testing::tiny_qlora();
    c.lora.base_dtype = base_dtype;
    OmniLite q(c.model, *make_linear_builder(c));
    io::load_base_weights(*q, dir + "/base.safetensors");
    {  // trained-looking adapters: B != 0
      torch::NoGradGuard ng;
      for (auto& p : q->named_parameters())
        if (p.key().find(".lora_B.") != std::string::npos) p.value().normal_(0, 0.05);
    }
    q->eval();
    const std::string out = dir + "/merged-" + base_dtype + ".safetensors";
    io::write_merged_weights(*q, out, torch::kFloat32);
    OmniLite merged(plain_cfg.model);
    io::load_module(*merged, out);  // strict: exactly the plain model's names and shapes
    merged->eval();
    torch::NoGradGuard ng;
    auto tokens = torch::randint(7, 64, {2, 12}, torch::kInt64);
    auto images = torch::rand({2, 3, 28, 28});
    tokens.narrow(1, 1, 4).fill_(c.model.tokens.image_id);  // one image per row through the adapted ViT/resampler
    auto ref = q->forward({tokens, images}).logits;
    auto got = merged->forward({tokens, images}).logits;
    INFO("base " << base_dtype);
    CHECK(testing::max_rel_err(got, ref) < 1e-4);
    // The adapters changed the model: the merged weights are not the base's.
    const double moved = testing::max_rel_err(got, plain->forward({tokens, images}).logits);
    CHECK(moved > 1e-3);
    // A merged NF4 weight is dequant(W) + alpha/r B A, computed here by hand.
    if (base_dtype == "nf4") {
      auto* lora = dynamic_cast<LoRALinearImpl*>(q->named_modules()["text.layers.0.moe.experts.1.w1"].get());
      REQUIRE(lora != nullptr);
      auto* nf4 = dynamic_cast<Nf4LinearImpl*>(lora->base_layer.get());
      REQUIRE(nf4 != nullptr);
      auto expect = nf4->dequantized_weight().to(torch::kFloat64) +
                    (c.lora.alpha / c.lora.rank) * torch::matmul(lora->lora_B->weight.to(torch::kFloat64),
                                                                  lora->lora_A->weight.to(torch::kFloat64));
      CHECK(testing::max_rel_err(merged->named_parameters()["text.layers.0.moe.experts.1.w1.weight"], expect) < 1e-6);
      // io::merge_adapter (`export --merge`) from the files of an adapter checkpoint: the same tensors, bit for bit.
      const std::string adir = dir + "/adapter";
      io::save_adapter(*q, c.lora, adir);
      write_file_atomically(adir + "/state.json", nlohmann::json{{"version", io::kCheckpointVersion}, {"stage", "omni"},
                                                                 {"step", 5}, {"config", to_json(c)}}.dump());
      const auto m = io::merge_adapter(dir + "/base.safetensors", adir, dir + "/from-files.safetensors", torch::kFloat32);
      CHECK(m.step == 5);
      io::WeightsReader want(out), have(dir + "/from-files.safetensors");
      REQUIRE(have.tensors().size() == want.tensors().size());
      CHECK(m.tensors == static_cast<int64_t>(want.tensors().size()));
      for (const auto& [name, e] : want.tensors()) CHECK(torch::equal(have.load(name), want.load(name)));
      REQUIRE_THROWS_WITH(io::merge_adapter(dir + "/base.safetensors", dir + "/nowhere", dir + "/x.safetensors",
                                            torch::kFloat32), ContainsText("nowhere"));
    }
  }
}

TEST_CASE("memory estimate counts what a constructed QLoRA model holds", "[qlora][memory]") {
  Config c = testing::tiny_qlora();
  c.train.batch_size = 2;
  c.train.seq_len = 16;
  c.model.text.num_layers = 6;  // enough layers for checkpointing to pay (it keeps two layers' activations)
  const auto e = estimate_training_memory(c);
  OmniLite q(c.model, *make_linear_builder(c));
  train_adapters_only(*q);
  int64_t nf4 = 0, lora = 0, full = 0, trainable = 0;
  double nf4_const_bytes = 0;
  for (const auto& [k, t] : io::state_tensors(*q)) {
    if (k.find(".weight_packed") != std::string::npos) nf4 += 2 * t.numel();
    else if (k.find(".weight_absmax") != std::string::npos) nf4_const_bytes += static_cast<double>(t.nbytes());
    else if (k.find(".lora_") != std::string::npos) lora += t.numel();
    else full += t.numel();
    if (t.requires_grad()) trainable += t.numel();
  }
  CHECK(e.nf4_params == nf4);
  CHECK(e.nf4_const_bytes == nf4_const_bytes);
  CHECK(e.lora_params == lora);
  CHECK(e.full_params == full);
  // on the CPU the frozen embedding and LM head are counted in bf16 (OmniStage keeps a bf16 base's tables so)
  const double tables = static_cast<double>(q->text->embed_tokens->weight.numel() + q->lm_head->weight.numel());
  CHECK(e.full_bytes == 4.0 * static_cast<double>(full) - 2.0 * tables);
  CHECK(e.trainable_params == trainable);
  CHECK(e.adam_bytes == 8.0 * trainable);
  CHECK(e.tokens == 32);
  CHECK(e.act_checkpointed < e.act_full);
  // Without LoRA every parameter but the VQ-VAE's trains.
  Config p = testing::load("configs/tiny.json");
  const auto ep = estimate_training_memory(p);
  OmniLite m(p.model);
  int64_t all = 0, vq = 0;
  for (const auto& t : m->parameters()) all += t.numel();
  for (const auto& t : m->vqvae->parameters()) vq += t.numel();
  CHECK(ep.nf4_params == 0);
  CHECK(ep.trainable_params == all - vq);
}

TEST_CASE("loading a checkpoint leaves the caller's threads and random stream alone", "[infer]") {
  const auto dir = testing::fresh_temp_dir("load_neutral");
  Config c = testing::load("configs/tiny.json");
  c.runtime.threads = torch::get_num_threads() == 1 ? 2 : 1;  // a checkpoint asking for other threads and seed
  c.runtime.seed = 99;
  io::InitCheckpointOptions o;
  o.out_dir = dir + "/init";
  o.dtype = torch::kFloat32;
  io::write_init_checkpoint(c, o);
  const int threads = torch::get_num_threads();
  torch::manual_seed(5);
  const auto want = torch::randn({6});
  torch::manual_seed(5);
  const auto first = torch::randn({3});
  const auto m = load_omni_checkpoint(o.out_dir);
  const auto second = torch::randn({3});
  CHECK(torch::equal(torch::cat({first, second}), want));
  CHECK(torch::get_num_threads() == threads);
  CHECK(m.cfg.runtime.threads == c.runtime.threads);
}
