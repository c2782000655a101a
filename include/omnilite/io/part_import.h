// `omnilite init --from PART=SOURCE`: parts of a new checkpoint taken from pretrained Hugging Face checkpoints,
// every other part initialised as `init` does.
//
//   text=DIR       a MixtralForCausalLM folder (model.safetensors or shards with their index, config.json): the token
//                  embedding, the first model.text.num_layers decoder layers, the final norm and the LM head. Its
//                  config.json must agree with model.text and model.moe (widths, heads, experts, top-k, RoPE theta,
//                  norm epsilon); a larger vocabulary than the model's is refused, a smaller one grows (new rows =
//                  the mean row, as for an extended tokenizer).
//   vision=DIR     a CLIPVisionModel or CLIPModel folder: the embeddings, pre_layrnorm, the first model.vision.depth
//                  encoder layers (q, k, v concatenated into the fused qkv) and, with vision.final_norm,
//                  post_layernorm as the final norm. The model needs vision.class_token and vision.pre_norm, and
//                  vision.activation must be the checkpoint's hidden_act. OMNI-LITE's images are in [-1, 1]; CLIP's
//                  pixel normalisation (preprocessor_config.json image_mean / image_std, else OpenAI CLIP's) is folded
//                  into the patch embedding, so the same image gives CLIP's hidden states.
//   tokenizer=SRC  a Llama / Mistral SentencePiece tokenizer.model (or a folder holding one), extended with the
//                  marker pieces it lacks (<image>, <image_begin>, <image_end>, <gen_image> as user-defined pieces at
//                  the end). model.text.vocab_size, model.tokens and data.tokenizer follow the result.
//
// Every check runs before any tensor is read in full; a mismatch names the key or tensor and both values.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "omnilite/config.h"

namespace omnilite::io {

class WeightsReader;

struct PartSource {
  std::string part;  // "text", "vision" or "tokenizer"
  std::string path;  // the folder (or .model file) it comes from
};

// "PART=SOURCE" flags -> sources; throws naming the flag for an unknown part, a repeated one or a missing path.
std::vector<PartSource> parse_part_sources(const std::vector<std::string>& specs);

// The tokenizer after extension: the file written, the vocabulary and the special ids the model takes from it.
struct ExtendedTokenizer {
  std::string path;            // the .model file written
  int64_t vocab_size = 0;      // pieces in it
  TokenOptions tokens;         // bos, eos, pad and the four marker ids as the file has them
  int64_t added = 0;           // marker pieces appended
};
// Reads the SentencePiece model `source` (a file, or a folder with tokenizer.model), appends the marker pieces it
// lacks and writes it to `out_path` (atomically).
ExtendedTokenizer extend_tokenizer(const std::string& source, const std::string& out_path);

class PartImporter {
 public:
  // Opens the text and vision sources and checks them against `cfg` (after the tokenizer has set its vocabulary).
  PartImporter(const Config& cfg, const std::vector<PartSource>& sources);
  ~PartImporter();

  // Throws naming the tensor and both shapes when a source covers `name` with another shape than `shape` (from the
  // files' headers: nothing is loaded).
  void check_shape(const std::string& name, c10::IntArrayRef shape) const;
  // The value of OMNI-LITE tensor `name` (of shape `shape`) taken from a source, as float32, or an undefined tensor
  // when no source covers it. Throws naming the tensor and both shapes on a mismatch.
  torch::Tensor tensor(const std::string& name, c10::IntArrayRef shape) const;
  // What each part was taken from, for state.json ("init.from").
  nlohmann::json provenance() const;
  // Tensors handed out so far.
  int64_t imported() const { return imported_; }

 private:
  void open_text(const std::string& dir);
  void open_vision(const std::string& dir);
  // The CLIP tensors behind a vision tensor and how they combine.
  struct ClipSource {
    std::vector<std::string> names;  // stored names, prefix included
    enum class Kind { Same, Concat, Unsqueeze, ClassToken, PatchWeight, PatchBias } kind;
  };
  ClipSource clip_source(const std::string& name) const;
  // The shape a source gives `name` (empty when no source covers it).
  std::vector<int64_t> source_shape(const std::string& name) const;
  torch::Tensor text_tensor(const std::string& name) const;
  torch::Tensor vision_tensor(const std::string& name) const;

  Config cfg_;
  std::unique_ptr<WeightsReader> text_, vision_;
  std::string text_dir_, vision_dir_, vision_prefix_;  // vision_prefix_: "vision_model." in a CLIPModel, else ""
  int64_t text_vocab_ = 0;                           // rows of the source's embedding
  std::vector<double> pixel_mean_, pixel_std_;       // CLIP's normalisation, folded into the patch embedding
  mutable int64_t imported_ = 0;
};

}  // namespace omnilite::io
