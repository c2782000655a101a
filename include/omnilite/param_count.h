// Analytic parameter counts of OMNI-LITE: no tensor is allocated, so the full 2.5B model is counted in
// microseconds. Each row's name is the checkpoint-key prefix it covers; tests check every row against the
// parameters of constructed small models.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "omnilite/config.h"

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

ParamReport count_parameters(const ModelConfig& cfg);

// Model FLOPs of one training step (forward + backward) per text token at sequence length `seq`, as PaLM counts them
// for model-FLOPs utilisation (Chowdhery et al. 2022, appendix B): 6 x active_matmul + 12 x layers x heads x
// head_dim x seq for attention's scores and weighted values (the half a causal mask skips is counted, as there).
double train_flops_per_token(const ModelConfig& cfg, int64_t seq);

}  // namespace omnilite
