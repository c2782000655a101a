// The Hugging Face export format: a folder that transformers loads as MixtralForCausalLM (the text part) and that
// also holds the rest of OMNI-LITE.
//
//   config.json                       Mixtral's config keys ("architectures": ["MixtralForCausalLM"], hidden_size, ...)
//                                     plus "omnilite": {version, stage, step, config (the whole OMNI-LITE config),
//                                     prefixes (what each non-Mixtral prefix holds)}
//   model.safetensors                 the Mixtral tensors, when they fit in one shard, or
//   model-0000K-of-0000N.safetensors  shards of at most --max-shard-size bytes (a larger tensor gets its own shard)
//   + model.safetensors.index.json    {"metadata": {"total_size"}, "weight_map": {tensor: shard file}}
//   omnilite/multimodal.safetensors   the vision encoder, resampler, flow head and VQ-VAE, in a subfolder so that
//                                     tools reading every *.safetensors of the folder (llama.cpp's converter, vLLM)
//                                     and transformers meet a clean Mixtral checkpoint
//   tokenizer.model                   the SentencePiece model, and tokenizer_config.json / special_tokens_map.json
//
// With quant = "nf4" the linear layers transformers' bitsandbytes integration quantises (every nn.Linear but the
// LM head: the attention projections; its fused experts and router are parameters, not nn.Linear) are stored as
// bitsandbytes serialises a Linear4bit: the packed codes [n/2, 1] uint8 under the weight's name, and .absmax,
// .quant_map, .nested_absmax, .nested_quant_map and .quant_state.bitsandbytes__nf4 beside it, with a
// "quantization_config" in config.json.
//
// Tensor names follow kKeyMap (one table, read in both directions): the text backbone takes Mixtral's names
// (model.embed_tokens, model.layers.N.self_attn.q_proj, model.layers.N.block_sparse_moe.experts.M.w1, ...), the
// vision encoder, resampler, flow head and VQ-VAE keep their OMNI-LITE names under the prefixes vision., resampler.,
// flow. and vqvae. Tensors are written in the order of their OMNI-LITE names, so exporting an imported export
// reproduces it byte for byte.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "omnilite/config.h"

namespace omnilite::io {

// One row of the key map: OMNI-LITE name pattern <-> Hugging Face name pattern. "{N}" and "{M}" stand for a number,
// "{*}" for any rest of the name; both patterns hold the same placeholders in the same order.
struct KeyRule {
  const char* omnilite;  // e.g. "text.layers.{N}.moe.gate.weight"
  const char* hf;        // e.g. "model.layers.{N}.block_sparse_moe.gate.weight"
};
const std::vector<KeyRule>& key_map();

// OMNI-LITE name -> Hugging Face name, and back. Throw naming the tensor when no rule matches.
std::string to_hf_name(const std::string& omnilite_name);
std::string from_hf_name(const std::string& hf_name);
// Rules of key_map() whose OMNI-LITE side (hf = false) or HF side (hf = true) matches `name` (tests: exactly one).
int64_t key_rules_matching(const std::string& name, bool hf);
// True when a file's tensor names are Hugging Face names (the Mixtral embedding is there).
bool has_hf_names(const std::vector<std::string>& names);

// True when `dir` is an export of this format (config.json with "architectures" and an "omnilite" section).
bool is_hf_export(const std::string& dir);
// config.json of an export: Mixtral's keys computed from `cfg` plus the "omnilite" section. Throws naming the
// option for a model Mixtral cannot express (partial RoPE).
nlohmann::json hf_config(const Config& cfg, int64_t step, torch::ScalarType dtype);
// The checkpoint state (as state.json holds it) of an export folder; data.tokenizer points to its tokenizer.model.
nlohmann::json hf_export_state(const std::string& dir);

struct HfExportOptions {
  std::string out_dir;                         // folder to write (files replaced atomically; stale shards removed)
  torch::ScalarType dtype = torch::kBFloat16;  // storage type of floating tensors
  uint64_t max_shard_bytes = 5'000'000'000;    // shard size limit (transformers' default: 5 GB)
  std::string tokenizer;                       // SentencePiece model to copy ("" = none)
  std::string quant = "none";                  // "nf4": bitsandbytes 4-bit serialisation of the attention weights
};

// The directory and file of the non-Mixtral tensors inside an export folder.
constexpr const char* kMultimodalFile = "omnilite/multimodal.safetensors";
// True for the tensors the Mixtral part of an export holds (the text backbone and LM head).
bool is_mixtral_tensor(const std::string& omnilite_name);

struct HfExportResult {
  int64_t tensors = 0;        // tensors written
  uint64_t bytes = 0;         // tensor bytes written (the index's total_size)
  std::vector<std::string> shards;  // file names, in order
};

// Writes the export of the checkpoint at `src` (anything WeightsReader opens) whose config is `cfg`.
HfExportResult write_hf_export(const std::string& src, const Config& cfg, int64_t step, const HfExportOptions& opts);

// "5GB", "500MB", "64KB", "123" -> bytes (decimal units, as transformers); throws naming `flag` otherwise.
uint64_t parse_byte_size(const std::string& flag, const std::string& text);

}  // namespace omnilite::io
