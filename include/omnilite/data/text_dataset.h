// Text documents and sequence packing.
//
// Documents come from .txt files (documents separated by a line holding only "%", the fortune format; a file
// without such lines is one document) and .jsonl files ({"text": ...} per line). A malformed JSON line or one
// without a "text" string is skipped with a warning naming the file and the line; the count is returned.
// Packing concatenates tokenized documents with EOS between them and cuts fixed-length rows.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "omnilite/data/mm_batch.h"
#include "omnilite/data/token_shards.h"
#include "omnilite/data/tokenizer.h"

namespace omnilite {

struct DocumentSet {
  std::vector<std::string> documents;  // in file order
  int64_t skipped = 0;                 // malformed lines skipped
};

// Reads every file; throws naming a file that cannot be opened or has an unknown extension.
DocumentSet read_documents(const std::vector<std::string>& paths);

// Streams the documents of one file, in order, to `on_document` (what read_documents collects); returns the
// malformed lines skipped. Memory: one document.
int64_t for_each_document(const std::string& path, const std::function<void(std::string&&)>& on_document);

// Every document tokenized as Llama and Mistral frame it, BOS before and EOS after each, concatenated:
// [sum of (length + 2)] int64. Prompts start with BOS too (the Hugging Face export's add_bos_token).
torch::Tensor tokenize_documents(const std::vector<std::string>& docs, const Tokenizer& tok, int64_t bos_id,
                                 int64_t eos_id);

// stream [L] -> rows [floor(L / seq_len), seq_len]; the tail that does not fill a row is dropped. Throws when not
// even one row fits (an empty dataset is an error before step 1).
torch::Tensor pack_sequences(const torch::Tensor& stream, int64_t seq_len, const std::string& what);

// A permutation of [0, n) fixed by the seed and the epoch: the same on every run (deterministic shuffling).
std::vector<int64_t> epoch_permutation(int64_t n, uint64_t seed, int64_t epoch);

// The packed rows of a text data key (data.text_train, data.text_valid), from one kind of source:
//   documents (.txt / .jsonl files): read, tokenized and packed in memory at start-up (small sets);
//   token shards (folders, .idx / .bin files of `omnilite data tokenize`; token_shards.h): memory-mapped, and row r
//   is tokens [r * seq_len, (r + 1) * seq_len) of the shards' stream, cut when it is asked for.
// Both pack the same stream (BOS document EOS, ...) into the same rows; the tail that fills no row is dropped.
class PackedText {
 public:
  // Throws naming `what` when the entries mix the kinds, a source cannot be opened, or the tokens fill no row
  // (no documents at all gives rows() = 0: the caller decides whether that is an error).
  PackedText(const std::vector<std::string>& entries, const std::string& what, const Tokenizer& tok,
             const ModelConfig& model, int64_t seq_len, uint64_t seed);
  int64_t rows() const { return rows_; }
  bool streamed() const { return shards_ != nullptr; }
  // The row served k-th in training order (k counts on over epochs): epoch permutations fixed by the seed,
  // EpochSampler's for documents, permuted_index's (O(1) memory) for shards.
  int64_t shuffled(int64_t k) const;
  // rows [n, seq_len] int64 of these row indices. A shard row holding an id outside [0, vocab_size) or an image
  // placeholder id is replaced by the next good row, with a warning naming the shard and byte; `bad` (may be null)
  // counts them.
  torch::Tensor gather(const std::vector<int64_t>& idx, int64_t* bad = nullptr) const;
  // The first `max_tokens` of the packed stream (documents: all of it), [L] int64.
  torch::Tensor stream_prefix(int64_t max_tokens) const;
  // What was read, for the log: "N documents -> R rows of T tokens" / "S shards, N tokens -> R rows of T tokens".
  std::string describe() const;
  // Identity of the source (shard names and sizes; empty for documents), kept in checkpoints.
  std::string fingerprint() const { return shards_ ? shards_->fingerprint() : std::string(); }
  int64_t bad_shards() const { return shards_ ? shards_->bad_shards() : 0; }

 private:
  torch::Tensor row(int64_t r) const;  // [seq_len]
  std::string what_;
  int64_t seq_len_, vocab_, image_id_, gen_image_id_, rows_ = 0, documents_ = 0;
  uint64_t seed_;
  torch::Tensor stream_, packed_;         // documents: the stream and its rows [R, seq_len]
  std::unique_ptr<EpochSampler> order_;   // documents' row order
  std::unique_ptr<TokenShards> shards_;   // shards
};

}  // namespace omnilite
