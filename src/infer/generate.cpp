#include "omnilite/infer/generate.h"

#include <algorithm>
#include <cctype>

#include "omnilite/data/mm_batch.h"
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
  for (int64_t i = 0; i < max_new; ++i) {
    OmniInput in;
    in.tokens = tokens;
    in.images = imgs;
    auto logits = model.forward(in).logits.select(1, tokens.size(1) - 1);  // [N, V]
    auto next = logits.argmax(1).masked_fill(done, tk.pad_id);           // [N]
    out.push_back(next);
    done = done.logical_or(next.eq(tk.eos_id));
    tokens = torch::cat({tokens, next.unsqueeze(1)}, 1);
    if (done.all().item<bool>()) break;
  }
  auto gen = torch::stack(out, 1).cpu();
  if (gen.size(1) < max_new)
    gen = torch::cat({gen, torch::full({gen.size(0), max_new - gen.size(1)}, tk.pad_id, torch::kInt64)}, 1);
  return gen;
}

namespace {

// Velocities [N*G, P] of the generated tokens of rows [N, T] at state x [N*G, P] and time t.
torch::Tensor velocity(OmniLiteImpl& model, const torch::Tensor& rows, const torch::Tensor& x, double t) {
  OmniInput in;
  in.tokens = rows;
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

}  // namespace omnilite
