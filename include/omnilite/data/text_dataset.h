// Text documents and sequence packing.
//
// Documents come from .txt files (documents separated by a line holding only "%", the fortune format; a file
// without such lines is one document) and .jsonl files ({"text": ...} per line). A malformed JSON line or one
// without a "text" string is skipped with a warning naming the file and the line; the count is returned.
// Packing concatenates tokenized documents with EOS between them and cuts fixed-length rows.
#pragma once

#include <string>
#include <vector>

#include <torch/torch.h>

#include "omnilite/data/tokenizer.h"

namespace omnilite {

struct DocumentSet {
  std::vector<std::string> documents;  // in file order
  int64_t skipped = 0;                 // malformed lines skipped
};

// Reads every file; throws naming a file that cannot be opened or has an unknown extension.
DocumentSet read_documents(const std::vector<std::string>& paths);

// Every document tokenized as Llama and Mistral frame it, BOS before and EOS after each, concatenated:
// [sum of (length + 2)] int64. Prompts start with BOS too (the Hugging Face export's add_bos_token).
torch::Tensor tokenize_documents(const std::vector<std::string>& docs, const Tokenizer& tok, int64_t bos_id,
                                 int64_t eos_id);

// stream [L] -> rows [floor(L / seq_len), seq_len]; the tail that does not fill a row is dropped. Throws when not
// even one row fits (an empty dataset is an error before step 1).
torch::Tensor pack_sequences(const torch::Tensor& stream, int64_t seq_len, const std::string& what);

// A permutation of [0, n) fixed by the seed and the epoch: the same on every run (deterministic shuffling).
std::vector<int64_t> epoch_permutation(int64_t n, uint64_t seed, int64_t epoch);

}  // namespace omnilite
