// Parameter counts of OMNI-LITE, read off the model itself: the model is built with a RecordingBuilder, which
// records every projection the blocks ask for instead of allocating it (the full 2.46B model allocates 0.14B:
// embedding, LM head and the small non-projection tensors; `omnilite info` takes 1.5 s and 0.7 GB here). The same recording serves the
// training-memory estimate, so the architecture is described once, by the modules. Each row's name is the
// checkpoint-key pattern it covers; tests check every row against fully constructed models.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "omnilite/config.h"
#include "omnilite/modules/linear.h"

namespace omnilite {

struct ParamRow {
  std::string name;        // checkpoint-key pattern the row covers, e.g. "text.layers.*.moe.experts"
  int64_t params = 0;      // parameters in the row
  int64_t nf4_params = 0;  // of which are linear weights stored in NF4 by QLoRA (the rest stays bf16)
};

struct ParamReport {
  std::vector<ParamRow> rows;
  int64_t total = 0;                   // all parameters
  int64_t active_backbone = 0;         // per text token in the decoder layers + final norm (top_k experts)
  int64_t active_with_embeddings = 0;  // active_backbone + the embedding table + the LM head (if untied)
  int64_t active_matmul = 0;           // per text token, weights it is multiplied with: attention projections,
                                       // router, top_k experts, the LM head (tied or not); no norms, no embedding
  int64_t nf4_params = 0;              // sum of rows' nf4_params
  double bytes_fp32 = 0;               // weight memory at 4 bytes / parameter
  double bytes_bf16 = 0;               // weight memory at 2 bytes / parameter
  double bytes_nf4 = 0;                // NF4 weights with double-quantised constants (4.127 bits) + the rest in bf16
};

// Bits per NF4-quantised weight: 4-bit codes + 8-bit absmax per 64-block + fp32 scale per 256 absmax values.
constexpr double kNf4BitsPerParam = 4.0 + 8.0 / 64.0 + 32.0 / (64.0 * 256.0);

// One projection as a builder would make it.
struct RecordedProjection {
  int64_t in = 0, out = 0;  // features
  bool bias = false;        // has a bias vector
  bool nf4 = false;         // QLoRA would store its weight in NF4 (nf4 base, in % 64 == 0, not lora.full_precision)
  bool lora = false;        // QLoRA would give it an adapter (lora.target_modules)
};
// Records every projection the blocks ask for, with the variant that `lora` would make (plain when lora.enabled
// is false), and hands back a 1 x 1 placeholder, so that a model's other tensors can be enumerated without
// allocating the projections.
struct RecordingBuilder : LinearBuilder {
  explicit RecordingBuilder(LoRAOptions lora) : lora(std::move(lora)) {}
  std::shared_ptr<LinearBaseImpl> make(const std::string& path, int64_t in, int64_t out, bool bias) const override;
  // Every tensor of `model` (built with this builder), by checkpoint name: the recorded projections' weights and
  // biases, and the model's other parameters. Value: (elements, stored in NF4 by QLoRA).
  std::map<std::string, std::pair<int64_t, bool>> parameters(const torch::nn::Module& model) const;
  // Whether `tensor_name` (e.g. "text.layers.0.self_attn.q_proj.weight") belongs to a recorded projection's
  // 1 x 1 placeholder rather than to the model.
  bool is_placeholder(const std::string& tensor_name) const;

  LoRAOptions lora;                                           // decides nf4 and lora of each record
  mutable std::map<std::string, RecordedProjection> seen;     // module path -> projection
};

ParamReport count_parameters(const ModelConfig& cfg);

// Model FLOPs of one training step (forward + backward) per text token at sequence length `seq`, as PaLM counts them
// for model-FLOPs utilisation (Chowdhery et al. 2022, appendix B): 6 x active_matmul + 12 x layers x heads x
// head_dim x seq for attention's scores and weighted values (the half a causal mask skips is counted, as there).
double train_flops_per_token(const ModelConfig& cfg, int64_t seq);

}  // namespace omnilite
