#include "omnilite/modules/qlora_builder.h"

#include "omnilite/modules/lora_linear.h"
#include "omnilite/modules/nf4_linear.h"
#include "omnilite/modules/omnilite.h"
#include "omnilite/pattern.h"
#include "omnilite/quant/nf4.h"

namespace omnilite {

QLoRAChoice qlora_choice(const LoRAOptions& o, const std::string& path, int64_t in) {
  QLoRAChoice c;
  c.saved = matches_any(path, o.modules_to_save);
  c.nf4 = !c.saved && o.base_dtype == "nf4" && in % quant::kNf4BlockSize == 0 && !matches_any(path, o.full_precision);
  c.lora = !c.saved && matches_any(path, o.target_modules);
  return c;
}

std::shared_ptr<LinearBaseImpl> QLoRABuilder::make(const std::string& path, int64_t in, int64_t out, bool bias) const {
  const auto c = qlora_choice(opts, path, in);
  std::shared_ptr<LinearBaseImpl> base;
  if (c.nf4) base = std::make_shared<Nf4LinearImpl>(in, out, bias);
  else base = std::make_shared<PlainLinearImpl>(in, out, bias);
  if (c.saved) return base;  // trains in full
  for (auto& p : base->parameters()) p.set_requires_grad(false);
  if (!c.lora) return base;
  return std::make_shared<LoRALinearImpl>(std::move(base), opts.rank, opts.alpha, opts.dropout);
}

std::unique_ptr<LinearBuilder> make_linear_builder(const Config& cfg) {
  if (cfg.lora.enabled) return std::make_unique<QLoRABuilder>(cfg.lora);
  return std::make_unique<LinearBuilder>();
}

int narrow_frozen_tables(OmniLiteImpl& model) {
  int narrowed = 0;
  auto& head = *model.lm_head;
  if (!head.tied && !head.weight.requires_grad() && head.store_bf16_if_exact()) ++narrowed;
  auto& embed = model.text->embed_tokens->weight;
  if (embed.requires_grad() || embed.scalar_type() != torch::kFloat32 || !embed.device().is_cpu()) return narrowed;
  torch::NoGradGuard ng;
  auto narrow = embed.to(torch::kBFloat16);
  if (!torch::equal(narrow.to(torch::kFloat32), embed)) return narrowed;
  embed.set_data(narrow);
  return narrowed + 1;
}

}  // namespace omnilite
