// QLoRA weights on disk.
//
// A QLoRA checkpoint's adapters use PEFT's file layout under OMNI-LITE's module paths:
//   adapter_model.safetensors  "base_model.model.<module path>.lora_A.weight" [r, in] and ".lora_B.weight" [out, r]
//   adapter_config.json        {"peft_type": "LORA", "r", "lora_alpha", "lora_dropout", "target_modules" (a regular
//                              expression matched against full module paths), "bias": "none", ...}
// PEFT applies an adapter to transformers' Mixtral only under Hugging Face paths: write_peft_adapter below writes
// that form, and read_peft_adapter reads it back.
// Base weights come from plain checkpoints (the names of a model without adapters, e.g. `omnilite init` or a
// pretraining run); a projection that is LoRA-wrapped finds its weight under "<path>.base_layer", and an NF4 base
// quantises the tensor as it is read, so the full-precision model never exists in memory at once.
#pragma once

#include <map>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "omnilite/config.h"

namespace omnilite::io {

// Writes the lora_A / lora_B weights of `model`, and the parameters matching opts.modules_to_save, into `dir`
// (created if needed; each file atomically). adapter_config.json records the patterns.
void save_adapter(const torch::nn::Module& model, const LoRAOptions& opts, const std::string& dir);
// Loads adapter_model.safetensors of `dir` into `model`; throws naming a missing, unexpected or mis-shaped tensor.
void load_adapter(torch::nn::Module& model, const std::string& dir);
// Loads a plain checkpoint (a .safetensors file, a folder holding model.safetensors, or a training run folder: its
// newest checkpoint) into a model that may hold LoRA and NF4 projections. Every tensor of the model except the adapters must be covered; throws naming a
// missing, unexpected or mis-shaped tensor.
void load_base_weights(torch::nn::Module& model, const std::string& path);
// The weights a base names: a pretraining run folder stands for its newest checkpoint, any other path for itself.
std::string base_weights_path(const std::string& base);

// Writes the plain model that `model` (with LoRA and/or NF4 projections) computes, as one safetensors file at
// `path`: each LoRA projection's weight becomes base + (alpha / r) B A, with the base dequantised from NF4 exactly
// as training saw it; each NF4 weight its dequantisation; every other tensor as it is. Names are the plain model's
// ("<path>.weight", without base_layer, lora_A/B or the NF4 buffers), floating tensors are stored as `dtype`, and
// tensors are produced one at a time (memory: the model plus one merged matrix). Returns the tensors written.
int64_t write_merged_weights(const torch::nn::Module& model, const std::string& path, torch::ScalarType dtype,
                             const std::map<std::string, std::string>& metadata = {});

// What merge_adapter wrote.
struct MergedAdapter {
  Config cfg;           // the adapter run's config (lora.enabled still set)
  int64_t step = 0;     // the adapter checkpoint's step
  int64_t tensors = 0;  // tensors written
};
// Builds the adapter run's model (checkpoint folder `adapter_dir`), loads the base weights of `base` and the
// adapters, and writes the merged plain weights to `out_file` as `dtype` (`omnilite export --merge`). Throws naming
// the folder when its config has lora.enabled = false. `adapter_dir` may also be a PEFT adapter (is_peft_adapter):
// the model is then the base's, with the lora options the adapter implies and a full-precision (fp32) base.
MergedAdapter merge_adapter(const std::string& base, const std::string& adapter_dir, const std::string& out_file,
                            torch::ScalarType dtype);

}  // namespace omnilite::io

namespace omnilite::io {

// What write_peft_adapter wrote.
struct PeftExport {
  int64_t tensors = 0;                // tensors in adapter_model.safetensors
  int64_t rank = 0;                   // PEFT's r (2 * lora.rank when experts are adapted, see below)
  std::vector<std::string> skipped;   // adapted modules PEFT's Mixtral has no place for (vision, resampler, ...)
};
// The adapter of a QLoRA checkpoint folder (`adapter_dir`, trained with `cfg`) in the layout that PEFT applies to
// MixtralForCausalLM of the pinned transformers (`omnilite export --adapter RUN --format peft`), written into
// `out_dir`: adapter_config.json and adapter_model.safetensors under Hugging Face module paths.
//   attention projections  target_modules: base_model.model.model.layers.N.self_attn.P.lora_{A,B}.weight
//   experts                target_parameters ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]: transformers
//                          fuses each layer's experts into gate_up_proj [E, 2I, H] and down_proj [E, H, I], and
//                          PEFT adapts each with one stacked pair (lora_A [R*E, in], lora_B [out, R*E], expert e's
//                          rank-k column at k*E + e); gate_up_proj's wrapper is the inner one (".base_layer.").
//                          w1 and w3 keep their own factors as one rank-2r pair: A = [A1; A3], B = [[B1, 0], [0, B3]].
// Every module then has rank R = 2r (the attention and down_proj factors padded with zeros) and lora_alpha 2 alpha,
// so each delta, (alpha / r) B A, is unchanged. lora_dropout is written as 0: PEFT refuses dropout on adapted
// parameters (it only matters when training on with PEFT). Throws naming the folder when it holds no adapter.
PeftExport write_peft_adapter(const std::string& adapter_dir, const Config& cfg, const std::string& out_dir);

// True when `dir` holds a PEFT adapter under Hugging Face module paths (adapter_config.json with peft_type LORA and
// adapter_model.safetensors with "base_model.model.model." names), e.g. one PEFT trained on the hf export.
bool is_peft_adapter(const std::string& dir);
// A PEFT adapter read back as OMNI-LITE's: the lora options it implies (r, lora_alpha, lora_dropout, target_modules
// of the adapted projections) and the factors under OMNI-LITE names ("base_model.model.text.layers.N..."). The
// stacked expert pairs are split per expert; gate_up_proj's pair gives w1 and w3 the same A (rows [0, I) and
// [I, 2I) of B), which is exact. Throws naming the setting for what OMNI-LITE's LoRA cannot express (rank_pattern,
// alpha_pattern, rsLoRA, DoRA, biases, modules outside the attention projections and experts).
struct PeftAdapter {
  LoRAOptions lora;                                              // enabled, rank, alpha, dropout, target_modules
  std::vector<std::pair<std::string, torch::Tensor>> tensors;    // OMNI-LITE adapter names -> factors
};
PeftAdapter read_peft_adapter(const std::string& dir, const ModelConfig& model);
// Copies the factors into the model's LoRA parameters; throws naming a tensor the model lacks or shapes differ.
// Returns the LoRA parameters of the model the tensors did not cover (they keep their values). `what` names the
// source in errors. load_adapter is this on an adapter file, with every parameter required. Parameters matching
// `modules_to_save` (lora.modules_to_save) are loaded as the adapters are.
std::vector<std::string> load_adapter_tensors(torch::nn::Module& model,
                                              const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                                              const std::string& what,
                                              const std::vector<std::string>& modules_to_save = {});

}  // namespace omnilite::io
