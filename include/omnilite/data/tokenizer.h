// SentencePiece tokenizer. Any SentencePiece .model loads as is (a 32000-piece Llama/Mistral model fits the full
// config's vocabulary); `omnilite tokenizer train` makes one with the image markers reserved:
//   0 <unk> (also padding), 1 <s>, 2 </s>, 3 <image>, 4 <image_begin>, 5 <image_end>, 6 <gen_image>
// which are the defaults of model.tokens in the configs.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "omnilite/config.h"

namespace omnilite {

// The reserved marker pieces, in id order after <unk> <s> </s>.
const std::vector<std::string>& reserved_marker_pieces();

class Tokenizer {
 public:
  // Loads a SentencePiece model; throws naming the file when it is missing or not a model.
  explicit Tokenizer(const std::string& model_path);

  // Text -> ids (no BOS/EOS added). Marker strings typed in the text ("<image>", "<gen_image>", ...) are plain
  // text: they come out as the byte pieces of their characters, never as the marker ids, which only the API and
  // the flags that carry images place.
  std::vector<int64_t> encode(const std::string& text) const;
  // Ids -> text; marker ids decode to their piece text.
  std::string decode(const std::vector<int64_t>& ids) const;
  int64_t vocab_size() const;
  // Id of a piece, or -1 when the model lacks it.
  int64_t piece_id(const std::string& piece) const;
  const std::string& path() const { return path_; }

  // Throws naming the keys when the model's token ids do not fit this tokenizer: vocabulary larger than
  // model.text.vocab_size, or a reserved marker piece present at another id than model.tokens says.
  void check_compatible(const ModelConfig& cfg) const;

 private:
  std::string path_;
  std::shared_ptr<void> sp_;  // SentencePiece processor behind the C interface of libomnilite_spm.so
  // Each reserved marker piece the model holds (its id) with the byte-piece ids that spell it as plain text.
  std::vector<std::pair<int64_t, std::vector<int64_t>>> marker_text_;
};

struct TokenizerTrainOptions {
  std::vector<std::string> inputs;  // .txt (one sentence per line) or .jsonl ({"text": ...} per line) files
  int64_t vocab_size = 4096;        // pieces in the model, markers and bytes included
  std::string model_type = "bpe";   // SentencePiece algorithm: bpe (what Llama and Mistral ship) or unigram
  int64_t max_sentences = 200000;   // sentences sampled for training
  uint64_t seed = 1234;             // sampling seed (SentencePiece's random seed)
};

// Trains a SentencePiece model with byte fallback, Llama's trainer settings (identity normalisation, whitespace runs
// kept, split digits) and the reserved markers as control symbols (never produced from text, so text that spells
// a marker reads as plain text in every runtime); writes out_path (a .model file; the
// suffix is added when missing) and its .vocab beside it, and returns the .model path written. Throws with the
// inputs and the SentencePiece status on failure.
std::string train_tokenizer(const TokenizerTrainOptions& opts, const std::string& out_path);

}  // namespace omnilite
