#include "omnilite/infer/generate.h"

#include <algorithm>
#include <cctype>
#include <limits>
#include <optional>
#include <stdexcept>

#include "omnilite/data/mm_batch.h"
#include "omnilite/io/adapter.h"
#include "omnilite/io/checkpoint.h"
#include "omnilite/infer/text_step.h"
#include "omnilite/modules/nf4_linear.h"
#include "omnilite/modules/qlora_builder.h"
#include "omnilite/runtime.h"
#include "omnilite/modules/rfm_head.h"

namespace omnilite {

// [N, T0] -> [N, max_new]
torch::Tensor greedy_generate(OmniLiteImpl& model, const torch::Tensor& prefix, const torch::Tensor& images,
                              int64_t max_new) {
  torch::NoGradGuard ng;
  const auto& tk = model.cfg.tokens;
  const auto dev = model.text->embed_tokens->weight.device();
  auto tokens = prefix.to(dev);
  auto imgs = images.defined() ? images.to(dev) : images;
  auto done = torch::zeros({prefix.size(0)}, torch::TensorOptions().dtype(torch::kBool).device(dev));
  std::vector<torch::Tensor> out;
  KVCache cache;
  // One row decodes through the lean CPU step after its prefix where the model allows it (infer/text_step.h).
  std::optional<TextStep> step;
  if (prefix.size(0) == 1 && text_step_obstacle(model).empty()) step.emplace(model);
  for (int64_t i = 0; i < max_new; ++i) {
    torch::Tensor logits;  // [N, V]
    const int64_t last = i > 0 && step ? tokens.item<int64_t>() : -1;
    if (i > 0 && step && step->accepts(last, cache)) {
      logits = step->logits(last, cache).unsqueeze(0);
    } else {
      OmniInput in;
      in.tokens = tokens;  // the prefix first, then one token per row
      in.images = i == 0 ? imgs : torch::Tensor();
      in.cache = &cache;
      logits = model.forward(in).logits.select(1, tokens.size(1) - 1);
    }
    auto next = logits.argmax(1).masked_fill(done, tk.pad_id);           // [N]
    out.push_back(next);
    done = done.logical_or(next.eq(tk.eos_id));
    tokens = next.unsqueeze(1);
    if (done.all().item<bool>()) break;
  }
  auto gen = torch::stack(out, 1).cpu();
  if (gen.size(1) < max_new)
    gen = torch::cat({gen, torch::full({gen.size(0), max_new - gen.size(1)}, tk.pad_id, torch::kInt64)}, 1);
  return gen;
}

std::vector<int64_t> ids_before_eos(const torch::Tensor& row, const TokenOptions& t) {
  auto r = row.to(torch::kCPU, torch::kInt64).contiguous();
  std::vector<int64_t> ids;
  for (int64_t k = 0; k < r.numel(); ++k) {
    const int64_t id = r.data_ptr<int64_t>()[k];
    if (id == t.eos_id || id == t.pad_id) break;
    ids.push_back(id);
  }
  return ids;
}

namespace {

// Velocities [N*G, P] of the generated tokens of rows [N, T] at state x [N*G, P] and time t (rows continue `cache`
// when given).
torch::Tensor velocity(OmniLiteImpl& model, const torch::Tensor& rows, const torch::Tensor& x, double t,
                       KVCache* cache = nullptr) {
  OmniInput in;
  in.tokens = rows;
  in.cache = cache;
  in.gen_latents = x;
  in.gen_times = torch::full({x.size(0)}, t, x.options());
  in.compute_logits = false;
  return model.forward(in).velocity.to(torch::kFloat32);
}

}  // namespace

// prompts -> [N, C, h, w]
torch::Tensor sample_latents(OmniLiteImpl& model, const std::vector<std::vector<int64_t>>& prompts,
                             const SampleOptions& o) {
  torch::NoGradGuard ng;
  const auto& cfg = model.cfg;
  const auto dev = model.text->embed_tokens->weight.device();
  const int64_t N = static_cast<int64_t>(prompts.size()), G = generated_tokens_per_image(cfg), P = cfg.flow_token_dim();
  const int64_t side = cfg.vqvae.image_size / cfg.vq_downsample();
  std::vector<std::vector<int64_t>> cond, uncond;
  size_t longest = 0;
  for (const auto& p : prompts) {
    auto row = generation_row(p, G, cfg.tokens);
    row.resize(row.size() - 2);  // without image_end and eos: the block ends the row
    longest = std::max(longest, row.size());
    cond.push_back(std::move(row));
  }
  auto empty = generation_row({}, G, cfg.tokens);
  empty.resize(empty.size() - 2);
  uncond.assign(static_cast<size_t>(N), empty);
  auto cond_rows = pad_rows(cond, static_cast<int64_t>(longest), cfg.tokens.pad_id).to(dev);
  auto uncond_rows = pad_rows(uncond, static_cast<int64_t>(empty.size()), cfg.tokens.pad_id).to(dev);
  auto gen = at::make_generator<at::CPUGeneratorImpl>(o.seed);
  auto x = torch::randn({N * G, P}, gen).to(dev);  // x0 ~ N(0, I) at t = 0
  const double dt = 1.0 / static_cast<double>(o.steps);
  for (int64_t s = 0; s < o.steps; ++s) {
    const double t = s * dt;
    auto v = velocity(model, cond_rows, x, t);
    if (o.cfg_scale != 1.0) {
      auto vu = velocity(model, uncond_rows, x, t);
      v = vu + o.cfg_scale * (v - vu);
    }
    x = x + dt * v;
  }
  return unpatchify(x.view({N, G, P}), cfg.flow.latent_channels, side, side, cfg.flow.patch_size);
}

int64_t find_class_name(const std::string& text, const std::vector<std::string>& names) {
  std::string low(text);
  std::transform(low.begin(), low.end(), low.begin(), [](unsigned char c) { return std::tolower(c); });
  auto boundary = [&](size_t i) { return i >= low.size() || !std::isalnum(static_cast<unsigned char>(low[i])); };
  int64_t best = -1;
  size_t best_pos = std::string::npos, best_len = 0;
  for (size_t k = 0; k < names.size(); ++k) {
    std::string name(names[k]);
    std::transform(name.begin(), name.end(), name.begin(), [](unsigned char c) { return std::tolower(c); });
    for (size_t pos = low.find(name); pos != std::string::npos; pos = low.find(name, pos + 1)) {
      if ((pos == 0 || boundary(pos - 1)) && boundary(pos + name.size())) {
        if (pos < best_pos || (pos == best_pos && name.size() > best_len)) {
          best = static_cast<int64_t>(k);
          best_pos = pos;
          best_len = name.size();
        }
        break;
      }
    }
  }
  return best;
}

// logits: [V] -> one id
int64_t sample_next(const torch::Tensor& logits, const TextSampling& o, at::Generator& gen) {
  auto l = logits.to(torch::kFloat32).cpu();
  if (o.temperature <= 0 || o.top_k == 1) return l.argmax().item<int64_t>();
  l = l / o.temperature;
  if (o.top_k > 0 && o.top_k < l.numel()) {
    const double kth = std::get<0>(l.topk(o.top_k)).min().item<double>();
    l = l.masked_fill(l.lt(kth), -std::numeric_limits<double>::infinity());
  }
  auto probs = torch::softmax(l, 0);
  if (o.top_p < 1.0) {
    // Nucleus: the most probable ids whose mass reaches top_p (the first always kept).
    auto sorted = probs.sort(0, /*descending=*/true);
    auto p = std::get<0>(sorted), idx = std::get<1>(sorted);
    auto before = p.cumsum(0) - p;  // mass of the ids ranked above each one
    auto drop = before.ge(o.top_p);
    probs = probs.index_put({idx.masked_select(drop)}, torch::zeros({}, probs.options()));
    probs = probs / probs.sum();
  }
  return torch::multinomial(probs, 1, /*replacement=*/false, gen).item<int64_t>();
}

std::vector<int64_t> continue_text(OmniLiteImpl& model, KVCache& cache, const std::vector<int64_t>& ids,
                                   const torch::Tensor& images, int64_t max_new, const TextSampling& o,
                                   at::Generator& gen, const std::function<void(int64_t)>& on_token) {
  torch::NoGradGuard ng;
  TORCH_CHECK(!ids.empty(), "generate: the prompt has no tokens");
  const int64_t limit = model.cfg.text.max_position_embeddings;
  if (cache.length() + static_cast<int64_t>(ids.size()) >= limit)
    throw std::runtime_error("generate: the prompt has " + std::to_string(cache.length() + ids.size()) + " tokens, "
                             "at least model.text.max_position_embeddings = " + std::to_string(limit) +
                             "; hint: shorten it (in a chat: /reset)");
  const auto dev = model.text->embed_tokens->weight.device();
  auto tokens = torch::tensor(ids, torch::kInt64).view({1, -1}).to(dev);
  std::vector<int64_t> out;
  // Decoded tokens take the lean CPU step where the model allows it (infer/text_step.h); the prompt, images and
  // other models take the module path.
  std::optional<TextStep> step;
  if (text_step_obstacle(model).empty()) step.emplace(model);
  for (int64_t i = 0; i < max_new && cache.length() + tokens.size(1) <= limit; ++i) {
    torch::Tensor logits;  // [V], of the last position
    if (i > 0 && step && step->accepts(out.back(), cache)) {
      logits = step->logits(out.back(), cache);
    } else {
      OmniInput in;
      in.tokens = tokens;
      if (i == 0 && images.defined()) in.images = images.to(dev, model.text->norm->weight.scalar_type());
      in.cache = &cache;
      in.last_logits = true;
      logits = model.forward(in).logits[0][0].clone();
    }
    // The image placeholders only ever stand for image content the caller supplies; text decoding never emits one
    // (the next step could not embed it).
    for (int64_t id : {model.cfg.tokens.image_id, model.cfg.tokens.gen_image_id})
      if (id >= 0 && id < logits.size(0)) logits[id] = -std::numeric_limits<float>::infinity();
    const int64_t next = sample_next(logits, o, gen);
    out.push_back(next);
    if (on_token) on_token(next);
    if (next == model.cfg.tokens.eos_id) break;
    tokens = torch::full({1, 1}, next, torch::TensorOptions().dtype(torch::kInt64).device(dev));
  }
  return out;
}

std::vector<int64_t> generate_text(OmniLiteImpl& model, const std::vector<int64_t>& prompt, int64_t max_new,
                                   const TextSampling& o, const std::function<void(int64_t)>& on_token) {
  KVCache cache;
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(o.seed);
  return continue_text(model, cache, prompt, torch::Tensor(), max_new, o, gen, on_token);
}

std::vector<double> score_tokens(OmniLiteImpl& model, const std::vector<int64_t>& ids) {
  torch::NoGradGuard ng;
  if (ids.size() < 2) throw std::runtime_error("score: need at least 2 tokens, got " + std::to_string(ids.size()));
  const int64_t limit = model.cfg.text.max_position_embeddings;
  if (static_cast<int64_t>(ids.size()) > limit)
    throw std::runtime_error("score: " + std::to_string(ids.size()) + " tokens exceed model.text."
                             "max_position_embeddings = " + std::to_string(limit) + "; hint: shorten the text");
  for (auto id : ids)
    if (id < 0 || id >= model.cfg.text.vocab_size)
      throw std::runtime_error("score: token id " + std::to_string(id) + " is outside the vocabulary [0, " +
                               std::to_string(model.cfg.text.vocab_size) + ")");
  const auto dev = model.text->embed_tokens->weight.device();
  auto t = torch::tensor(ids, torch::kInt64).view({1, -1}).to(dev);
  auto logits = model.forward({t}).logits[0].to(torch::kFloat64).cpu();  // [T, V]
  auto lp = torch::log_softmax(logits.narrow(0, 0, t.size(1) - 1), -1)
                .gather(1, t[0].cpu().narrow(0, 1, t.size(1) - 1).unsqueeze(1))
                .squeeze(1)
                .contiguous();
  return std::vector<double>(lp.data_ptr<double>(), lp.data_ptr<double>() + lp.numel());
}

namespace {

// A QLoRA run's adapters on their base: the run's config builds NF4 (or fp32) bases with LoRA adapters, the base
// weights load into them (quantised on load, as in training) and the adapters over them, unmerged.
LoadedModel load_with_adapter(const std::string& base_arg, const std::string& device, const std::string& adapter) {
  LoadedModel m;
  m.dir = io::latest_checkpoint(adapter);
  const auto state = io::read_checkpoint_state(m.dir);
  m.cfg = parse_config(state["config"]);
  if (!m.cfg.lora.enabled)
    throw std::runtime_error("--adapter \"" + adapter + "\" is not a QLoRA run (its config has lora.enabled = "
                             "false); hint: pass a full checkpoint as --checkpoint alone");
  const std::string base = base_arg.empty() ? m.cfg.train.base_checkpoint : base_arg;
  if (base.empty())
    throw std::runtime_error("--adapter \"" + adapter + "\": no base weights; hint: pass --checkpoint BASE");
  if (!device.empty()) m.cfg.runtime.device = device;
  m.step = state.value("step", int64_t{0});
  const RngState caller_rng = capture_rng();
  m.model = OmniLite(m.cfg.model, *make_linear_builder(m.cfg));
  restore_rng(caller_rng);
  io::load_base_weights(*m.model, base);
  io::load_adapter(*m.model, m.dir);
  set_moe_dispatch(*m.model, parse_moe_dispatch(m.cfg.runtime.moe_dispatch));
  set_nf4_activations(*m.model, quant::parse_nf4_activations(m.cfg.runtime.nf4_activations));
  m.model->to(resolve_device(m.cfg.runtime.device));
  m.model->eval();
  m.model->lm_head->store_bf16_if_exact();  // the frozen head of a bf16 base: half the bytes per decoded token
  return m;
}

}  // namespace

LoadedModel load_omni_checkpoint(const std::string& run_or_dir, const std::string& device,
                                 const std::string& adapter) {
  if (!adapter.empty()) return load_with_adapter(run_or_dir, device, adapter);
  LoadedModel m;
  m.dir = io::latest_checkpoint(run_or_dir);
  const auto state = io::read_checkpoint_state(m.dir);
  if (state.value("stage", std::string("omni")) != "omni")
    throw std::runtime_error("checkpoint \"" + m.dir + "\" is a train.stage = \"" + state.value("stage", std::string()) +
                             "\" checkpoint; an OMNI-LITE (stage \"omni\") checkpoint is needed");
  m.cfg = parse_config(state["config"]);
  if (m.cfg.lora.enabled)
    throw std::runtime_error("checkpoint \"" + m.dir + "\" holds QLoRA adapters only; hint: merge them first with "
                             "`omnilite export --checkpoint BASE --adapter " + run_or_dir + " --merge --out DIR`");
  if (!device.empty()) m.cfg.runtime.device = device;
  m.step = state.value("step", int64_t{0});
  // A library call: the process's threads and random streams stay the caller's (the CLI sets them once,
  // apply_runtime); the initialisation that loading overwrites draws from the CPU generator, which is put back.
  const torch::Device dev = resolve_device(m.cfg.runtime.device);
  const RngState caller_rng = capture_rng();
  m.model = OmniLite(m.cfg.model);
  restore_rng(caller_rng);
  io::load_module(*m.model, m.dir);
  set_moe_dispatch(*m.model, parse_moe_dispatch(m.cfg.runtime.moe_dispatch));
  m.model->to(dev);
  m.model->eval();
  return m;
}

// prompt -> [1, C, h, w]
torch::Tensor imagine_latents(OmniLiteImpl& model, const std::vector<int64_t>& prompt, const SampleOptions& o) {
  torch::NoGradGuard ng;
  const auto& cfg = model.cfg;
  const auto dev = model.text->embed_tokens->weight.device();
  const int64_t G = generated_tokens_per_image(cfg), P = cfg.flow_token_dim();
  const int64_t side = cfg.vqvae.image_size / cfg.vq_downsample();
  // The prefix [bos, prompt..., image_begin] of each row runs once; its keys and values serve every step.
  auto prefill = [&](const std::vector<int64_t>& p) {
    auto row = generation_row(p, G, cfg.tokens);
    row.resize(row.size() - 2 - static_cast<size_t>(G));  // without the block, image_end and eos
    KVCache cache;
    OmniInput in;
    in.tokens = torch::tensor(row, torch::kInt64).view({1, -1}).to(dev);
    in.compute_logits = false;
    in.cache = &cache;
    model.forward(in);
    cache.append = false;  // the generated block is attended to at each step, never stored
    return cache;
  };
  KVCache cond = prefill(prompt), uncond = prefill({});
  auto block = torch::full({1, G}, cfg.tokens.gen_image_id, torch::TensorOptions().dtype(torch::kInt64).device(dev));
  auto gen = at::make_generator<at::CPUGeneratorImpl>(o.seed);
  auto x = torch::randn({G, P}, gen).to(dev);  // x0 ~ N(0, I) at t = 0, drawn as sample_latents draws it
  const double dt = 1.0 / static_cast<double>(o.steps);
  for (int64_t s = 0; s < o.steps; ++s) {
    const double t = s * dt;
    auto v = velocity(model, block, x, t, &cond);
    if (o.cfg_scale != 1.0) {
      auto vu = velocity(model, block, x, t, &uncond);
      v = vu + o.cfg_scale * (v - vu);
    }
    x = x + dt * v;
  }
  return unpatchify(x.view({1, G, P}), cfg.flow.latent_channels, side, side, cfg.flow.patch_size);
}

}  // namespace omnilite
