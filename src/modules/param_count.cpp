#include "omnilite/modules/param_count.h"

#include "omnilite/modules/omnilite.h"
#include "omnilite/modules/qlora_builder.h"
#include "omnilite/pattern.h"
#include "omnilite/quant/nf4.h"

namespace omnilite {

std::shared_ptr<LinearBaseImpl> RecordingBuilder::make(const std::string& path, int64_t in, int64_t out,
                                                       bool bias) const {
  RecordedProjection p{in, out, bias, false, false};
  if (lora.enabled) {
    const auto c = qlora_choice(lora, path, in);
    p.nf4 = c.nf4;
    p.lora = c.lora;
  }
  seen[path] = p;
  return std::make_shared<PlainLinearImpl>(1, 1, false);
}

std::map<std::string, std::pair<int64_t, bool>> RecordingBuilder::parameters(const torch::nn::Module& model) const {
  std::map<std::string, std::pair<int64_t, bool>> out;
  for (const auto& [path, p] : seen) {
    out[path + ".weight"] = {p.in * p.out, p.nf4};
    if (p.bias) out[path + ".bias"] = {p.out, false};
  }
  for (const auto& p : model.named_parameters())
    if (!is_placeholder(p.key())) out[p.key()] = {p.value().numel(), false};
  return out;
}

bool RecordingBuilder::is_placeholder(const std::string& tensor_name) const {
  const auto dot = tensor_name.rfind('.');
  return dot != std::string::npos && seen.count(tensor_name.substr(0, dot)) > 0;
}

ParamReport count_parameters(const ModelConfig& c) {
  LoRAOptions qlora;  // QLoRA's defaults decide which weights the NF4 figures count
  qlora.enabled = true;
  RecordingBuilder rec(qlora);
  torch::NoGradGuard ng;
  OmniLite model(c, rec);
  ParamReport r;
  for (const char* row : {"vision.patch_embed", "vision.blocks", "vision.norm", "resampler", "text.embed_tokens",
                          "text.layers.*.self_attn", "text.layers.*.moe.gate", "text.layers.*.moe.experts",
                          "text.layers.*.*_layernorm", "text.norm", "lm_head", "flow", "vqvae"})
    r.rows.push_back({row, 0, 0});
  int64_t layers = 0, experts = 0, norms = 0, embed = 0, head = 0;
  for (const auto& [name, entry] : rec.parameters(*model)) {
    const auto [n, nf4] = entry;
    for (auto& row : r.rows)
      if (matches_pattern(name, row.name + ".*")) {
        row.params += n;
        row.nf4_params += nf4 ? n : 0;
        break;
      }
    r.total += n;
    r.nf4_params += nf4 ? n : 0;
    const bool layer = name.rfind("text.layers.", 0) == 0;
    layers += layer ? n : 0;
    experts += layer && name.find(".moe.experts.") != std::string::npos ? n : 0;
    norms += layer && name.find("_layernorm.") != std::string::npos ? n : 0;
    embed += name == "text.embed_tokens.weight" ? n : 0;
    head += name.rfind("lm_head.", 0) == 0 ? n : 0;
  }
  // Per text token: every decoder-layer tensor but the experts it is not routed to (E - K of E), the final norm.
  const int64_t unvisited = experts / c.moe.num_experts * (c.moe.num_experts - c.moe.top_k);
  const int64_t final_norm = c.text.hidden_size;
  r.active_backbone = layers - unvisited + final_norm;
  r.active_with_embeddings = r.active_backbone + embed + head;
  r.active_matmul = layers - norms - unvisited + c.text.vocab_size * c.text.hidden_size;  // LM head, tied or not
  r.bytes_fp32 = 4.0 * r.total;
  r.bytes_bf16 = 2.0 * r.total;
  r.bytes_nf4 = r.nf4_params * kNf4BitsPerParam / 8.0 + 2.0 * (r.total - r.nf4_params);
  return r;
}

double train_flops_per_token(const ModelConfig& c, int64_t seq) {
  const auto& t = c.text;
  return 6.0 * static_cast<double>(count_parameters(c).active_matmul) +
         12.0 * static_cast<double>(t.num_layers * t.num_heads * t.head_dim) * static_cast<double>(seq);
}

}  // namespace omnilite
