// The text backbone as llama.cpp runs it: a GGUF of architecture `llama` with experts, as llama.cpp's
// convert_hf_to_gguf.py makes it from a Mixtral checkpoint (conversion/llama.py, LlamaModel), and back.
//
//   token_embd.weight              text.embed_tokens.weight                      [vocab, D]      ne {D, vocab}
//   blk.N.attn_norm.weight         text.layers.N.input_layernorm.weight          f32
//   blk.N.attn_q.weight            text.layers.N.self_attn.q_proj.weight         rows permuted (below)
//   blk.N.attn_k.weight            text.layers.N.self_attn.k_proj.weight         rows permuted (below)
//   blk.N.attn_v.weight / attn_output.weight   v_proj / o_proj
//   blk.N.ffn_norm.weight          text.layers.N.post_attention_layernorm.weight f32
//   blk.N.ffn_gate_inp.weight      text.layers.N.moe.gate.weight                 f32 (as the converter keeps it)
//   blk.N.ffn_{gate,up,down}_exps.weight   the experts' w1 / w3 / w2 stacked     [E, F, D]       ne {D, F, E}
//   output_norm.weight             text.norm.weight                              f32
//   output.weight                  lm_head.weight (absent when tied: llama.cpp then uses token_embd)
//
// RoPE: OMNI-LITE (as transformers) rotates the two halves of each head, llama.cpp's `llama` rotates adjacent pairs,
// so q and k rows are permuted per head as the converter does (LlamaModel.permute):
//   W.reshape(heads, 2, head_dim / 2, D).swapaxes(1, 2).reshape(W.shape), heads = num_heads for q, num_kv_heads for k.
// Matrices take the requested type; 1-D tensors, norms and the router stay f32; a matrix whose rows do not fill
// 32-value blocks falls back to f16 (both as the converter). q4_0 is what `llama-quantize --pure` makes of f32.
// The tokenizer is the SentencePiece model as the converter writes it (tokenizer.ggml.model = "llama": tokens,
// scores, token types, special ids, add_bos_token), the vocabulary padded to vocab_size with "[PADi]" unused pieces.
// The vision encoder, resampler, flow head and VQ-VAE are not in the file (docs/export.md says why).
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "omnilite/config.h"
#include "omnilite/io/gguf.h"
#include "omnilite/io/spm_model.h"

namespace omnilite::io {

struct GgufExportOptions {
  std::string out_file;               // the .gguf to write (atomically: nothing replaced on failure)
  GgmlType type = GgmlType::F16;      // type of the matrices (--type)
  std::string tokenizer;              // the SentencePiece .model (required: llama.cpp reads the vocabulary from it)
  std::string name = "omni-lite";     // general.name
};

struct GgufExportResult {
  int64_t tensors = 0;                         // tensors written
  uint64_t bytes = 0;                          // file size
  std::map<std::string, int64_t> types;        // ggml type name -> tensors of that type
};

// q / k rows from OMNI-LITE's (rotate-half) order to llama.cpp's (adjacent pairs), and back; `heads` as above.
torch::Tensor permute_for_gguf(const torch::Tensor& w, int64_t heads);
torch::Tensor unpermute_from_gguf(const torch::Tensor& w, int64_t heads);

// Writes the text backbone of the checkpoint at `src` (anything WeightsReader opens), whose config is `cfg`, tensor
// by tensor (a decoder layer's experts at most in memory). `progress` (may be empty) gets (tensors done, in all).
GgufExportResult write_gguf_export(const std::string& src, const Config& cfg, int64_t step,
                                   const GgufExportOptions& opts,
                                   const std::function<void(int64_t, int64_t)>& progress = {});

// The OMNI-LITE config of a `llama` GGUF: its own (metadata omnilite.config, checked against the llama.* keys)
// when OMNI-LITE wrote it, else the default config with the text backbone's sizes from the llama.* keys. Throws
// naming the file and the key for another architecture or a model OMNI-LITE cannot express (no experts, partial
// RoPE, RoPE scaling).
Config config_from_gguf(const GgufReader& r);
// The SentencePiece model a GGUF's vocabulary defines (BPE, byte fallback, add_dummy_prefix =
// tokenizer.ggml.add_space_prefix: what llama.cpp runs).
SpmModel spm_from_gguf(const GgufReader& r);

struct GgufImportResult {
  Config cfg;                 // the checkpoint's config (data.tokenizer = out_dir/tokenizer.model)
  int64_t text_tensors = 0;   // tensors taken from the GGUF
  int64_t other_tensors = 0;  // vision / resampler / flow / VQ-VAE tensors (from `multimodal`, or initialised)
  bool multimodal_initialised = false;  // true when no `multimodal` checkpoint gave them
};

// Writes an OMNI-LITE checkpoint folder (model.safetensors, state.json, tokenizer.model) from a GGUF: the text
// backbone dequantised to fp32 from the file, the multimodal parts from the checkpoint `multimodal` ("" = randomly
// initialised, seeded: text-only use). Throws naming the tensor for a missing or mis-shaped one.
GgufImportResult import_gguf(const std::string& gguf, const std::string& out_dir, const std::string& multimodal);

}  // namespace omnilite::io
