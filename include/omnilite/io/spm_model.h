// The SentencePiece model file (sentencepiece_model.proto, ModelProto) read and written without the library: the
// pieces with their scores and types, the algorithm, byte fallback and the normaliser flags. This is what a GGUF
// carries of a tokenizer (tokenizer.ggml.tokens / scores / token_type), so a GGUF's vocabulary turns back into a
// .model file that SentencePiece loads, and the export can check what llama.cpp will make of a model.
//
// LlamaSpmTokenizer is llama.cpp's tokenizer for `tokenizer.ggml.model = llama` vocabularies (llama-vocab.cpp,
// llm_tokenizer_spm): a space prefix, spaces escaped as U+2581, then the pair of adjacent symbols whose merged text is
// a piece of the highest score is merged, repeatedly; a symbol that is no piece falls back to its byte pieces. For a
// SentencePiece BPE model this is SentencePiece's own algorithm; for a unigram model (Viterbi over piece scores) it
// is not, and the export measures how often the two differ.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

namespace omnilite::io {

// sentencepiece.ModelProto.SentencePiece.Type
enum class SpmPieceType : int { Normal = 1, Unknown = 2, Control = 3, UserDefined = 4, Unused = 5, Byte = 6 };

struct SpmPiece {
  std::string piece;                        // UTF-8 text, spaces as U+2581; byte pieces are "<0xXX>"
  float score = 0.0f;                       // BPE: merge priority (higher first); unigram: log-probability
  SpmPieceType type = SpmPieceType::Normal;
};

struct SpmModel {
  std::vector<SpmPiece> pieces;          // id order
  int model_type = 2;                    // TrainerSpec.model_type: 1 unigram, 2 BPE
  bool byte_fallback = true;             // TrainerSpec.byte_fallback: unknown characters as <0xXX> pieces
  bool split_digits = true;              // TrainerSpec.split_digits
  bool allow_whitespace_only_pieces = true;   // TrainerSpec.allow_whitespace_only_pieces
  bool split_by_whitespace = true;       // TrainerSpec.split_by_whitespace
  std::string normalizer = "identity";   // NormalizerSpec.name ("identity": no Unicode normalisation)
  bool has_charsmap = false;             // NormalizerSpec.precompiled_charsmap is not empty (a normalisation table)
  bool add_dummy_prefix = true;          // NormalizerSpec.add_dummy_prefix: a space before the text
  bool remove_extra_whitespaces = false; // NormalizerSpec.remove_extra_whitespaces: runs of spaces collapsed
  bool escape_whitespaces = true;        // NormalizerSpec.escape_whitespaces: spaces as U+2581
};

// Parses a .model file; throws naming the file when it is missing or not a ModelProto with pieces.
SpmModel read_spm_model(const std::string& path);
// Writes `m` as a ModelProto (pieces, trainer spec with the flags above, normaliser spec without a table).
void write_spm_model(const SpmModel& m, const std::string& path);
// Copies the .model file `in` to `out` (atomically) with `pieces` appended after its own: the bytes of `in` are kept
// as they are (normaliser table, trainer spec and all), the new pieces follow as further entries of the repeated
// field, which is how protobuf appends to one.
void append_spm_pieces(const std::string& in, const std::vector<SpmPiece>& pieces, const std::string& out);

// llama.cpp's SPM tokeniser over a vocabulary.
class LlamaSpmTokenizer {
 public:
  explicit LlamaSpmTokenizer(SpmModel m);
  // Ids of `text` (no bos) as llama_tokenize(..., add_special = false, parse_special = false) returns them for a
  // GGUF holding this vocabulary with tokenizer.ggml.add_space_prefix = add_dummy_prefix.
  std::vector<int64_t> encode(const std::string& text) const;

 private:
  SpmModel m_;
  std::unordered_map<std::string, int64_t> id_of_;  // piece text -> id (llama_vocab::text_to_token)
};

}  // namespace omnilite::io
