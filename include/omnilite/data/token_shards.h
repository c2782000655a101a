// Pre-tokenized text shards: Megatron-LM's memory-mapped indexed dataset (.bin + .idx), written by
// `omnilite data tokenize` and read by training through mmap, so start-up costs no time whatever the corpus size
// and memory does not grow with it.
//
// Layout (little-endian; the one megatron/core/datasets/indexed_dataset.py writes and reads, so shards made by
// Megatron's tools/preprocess_data.py train here and ours load there):
//   NAME.bin  the tokens of every sequence, back to back, in the index's dtype (no header)
//   NAME.idx  offset 0   9 bytes   magic "MMIDIDX\0\0"
//             offset 9   uint64    version (1)
//             offset 17  uint8     dtype code: 1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 8 uint16
//             offset 18  uint64    S, the number of sequences
//             offset 26  uint64    D, the number of document-index entries (documents + 1)
//             offset 34  int32[S]  tokens per sequence
//                        int64[S]  byte offset of each sequence in NAME.bin
//                        int64[D]  document boundaries: 0, then the sequence index at the end of each document
// We write one sequence per document, framed as training packs it: BOS, the document's pieces, EOS (so the shards
// hold exactly the token stream that is packed into rows), dtype uint16 when the vocabulary has < 65500 pieces
// (Megatron's choice), else int32. A folder written by `omnilite data tokenize` also holds shards.json: the
// tokenizer's hash, vocabulary size, BOS/EOS ids and each shard's counts, which training checks against the run.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "omnilite/files.h"
#include "omnilite/data/tokenizer.h"

namespace omnilite {

// Megatron's dtype codes.
enum class TokenDType : uint8_t { kUInt8 = 1, kInt8 = 2, kInt16 = 3, kInt32 = 4, kInt64 = 5, kUInt16 = 8 };

// The fields of an .idx header (the arrays after it stay on disk).
struct TokenIndexHeader {
  TokenDType dtype = TokenDType::kUInt16;  // token width in NAME.bin
  uint64_t sequences = 0;                  // S
  uint64_t doc_entries = 0;                // D (= documents + 1 in a well-formed index)
};

// Reads and checks an .idx header and its sizes against the file lengths of the .idx and its .bin: throws
// naming the file, the byte offset of the bad field and the value when it is not a Megatron index (magic, version,
// dtype code, array sizes, the .bin length the last pointer implies).
TokenIndexHeader check_token_index(const std::string& idx_path);

// Writes one shard: sequences appended one at a time, the .bin streamed to a temporary file, the .idx at
// finish(); both renamed into place only then (the .bin first: a reader looks for the .idx, so a crash never
// leaves a shard that looks whole). Memory: 12 bytes per sequence.
class TokenShardWriter {
 public:
  // prefix: DIR/NAME (".bin" / ".idx" appended); an unfinished shard's temporary files are removed
  TokenShardWriter(std::string prefix, TokenDType dtype);
  // One document of one sequence; throws when a token does not fit the dtype.
  void add_document(const std::vector<int64_t>& tokens);
  void finish();
  int64_t documents() const { return static_cast<int64_t>(lengths_.size()); }
  int64_t tokens() const { return tokens_; }

 private:
  std::string prefix_;
  TokenDType dtype_;
  AtomicFile bin_;  // NAME.bin, committed by finish()
  std::vector<int32_t> lengths_;
  int64_t tokens_ = 0;
};

struct TokenizeOptions {
  std::vector<std::string> inputs;       // .txt / .jsonl document files (read as training reads them), in order
  std::string out_dir;                   // folder to write (must not hold shards yet)
  int64_t threads = 2;                   // tokenizing threads (the reader and writer run beside them)
  int64_t shard_tokens = int64_t{1} << 28;  // a shard is closed once it holds this many tokens (256 Mi = 512 MiB)
  int64_t bos_id = 1, eos_id = 2;        // framing of each document (model.tokens.bos_id / eos_id)
};

struct TokenizeResult {
  int64_t documents = 0, tokens = 0, shards = 0;  // written
  int64_t skipped = 0;                            // malformed input lines skipped (each warned)
  double bytes = 0, seconds = 0;                  // input bytes read, wall time
};

// Streams the inputs into shards OUT/shard-00000.{bin,idx}, ... and OUT/shards.json. Documents are read in order,
// tokenized in batches by `threads` workers and written in input order, with at most 2 * threads batches in flight:
// memory does not depend on the corpus size. `progress` (may be empty) is called every few seconds and at the end.
TokenizeResult tokenize_to_shards(const TokenizeOptions& opts, const Tokenizer& tok,
                                  const std::function<void(const TokenizeResult&, double total_bytes)>& progress);

// Whether a data entry names token shards: a folder holding .idx files, or a shard's .idx / .bin / prefix.
bool is_token_shard_source(const std::string& entry);

// The token stream of some shards, memory-mapped: the sequences of every shard in order, as one stream that rows
// are cut from. Opening reads only headers (O(1) per shard). A shard whose index is corrupt (check_token_index) is
// skipped with a warning naming the file and offset, and counted; one that cannot be opened at all, or a folder
// whose shards.json disagrees with the run's tokenizer or BOS/EOS ids, is an error.
class TokenShards {
 public:
  // entries: shard folders, .idx/.bin paths or prefixes. `tok`/`bos_id`/`eos_id`: the run's (checked against
  // shards.json where a folder has one); `what`: the config key, for messages.
  TokenShards(const std::vector<std::string>& entries, const std::string& what, const Tokenizer& tok,
              int64_t bos_id, int64_t eos_id);
  ~TokenShards();
  TokenShards(const TokenShards&) = delete;
  TokenShards& operator=(const TokenShards&) = delete;

  int64_t tokens() const { return total_; }  // tokens in the stream
  int64_t documents() const { return documents_; }  // documents of the readable shards (their boundaries - 1)
  int64_t shards() const { return static_cast<int64_t>(shards_.size()); }
  int64_t bad_shards() const { return bad_shards_; }
  // Identity of the stream (shard names and token counts), recorded in checkpoints.
  const std::string& fingerprint() const { return fingerprint_; }
  // tokens [offset, offset + count) of the stream as int64 (across shard boundaries).
  void read(int64_t offset, int64_t count, int64_t* out) const;
  // Where stream offset `offset` lies: "FILE.bin at byte B" (for warnings).
  std::string locate(int64_t offset) const;

 private:
  struct Shard;
  size_t shard_of(int64_t offset) const;  // the shard holding stream offset `offset` (shards() at the end)
  std::vector<std::unique_ptr<Shard>> shards_;
  std::vector<int64_t> starts_;  // stream offset of each shard's first token, plus the total at the end
  int64_t total_ = 0;
  int64_t bad_shards_ = 0;
  int64_t documents_ = 0;
  std::string fingerprint_;
};

// A pseudo-random permutation of [0, n) evaluated one index at a time in O(1) memory (a 4-round Feistel network
// over the next even power of two, cycle-walking into range): the row order of a token-shard stream, however many
// rows it has. Fixed by (seed, epoch).
int64_t permuted_index(int64_t i, int64_t n, uint64_t seed, int64_t epoch);

}  // namespace omnilite
