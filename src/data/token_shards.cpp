#include "omnilite/data/token_shards.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <future>
#include <sstream>
#include <stdexcept>

#include <nlohmann/json.hpp>

#include "omnilite/data/mm_batch.h"
#include "omnilite/data/text_dataset.h"
#include "omnilite/hash.h"
#include "omnilite/log.h"

namespace omnilite {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr char kMagic[9] = {'M', 'M', 'I', 'D', 'I', 'D', 'X', '\0', '\0'};
constexpr uint64_t kHeaderBytes = 34;  // magic 9 + version 8 + dtype 1 + S 8 + D 8

// A shard whose index or data does not add up: skipped with a warning (an unreadable one is a plain error).
struct CorruptShard : std::runtime_error {
  using std::runtime_error::runtime_error;
};

int64_t dtype_size(TokenDType t) {
  switch (t) {
    case TokenDType::kUInt8: case TokenDType::kInt8: return 1;
    case TokenDType::kInt16: case TokenDType::kUInt16: return 2;
    case TokenDType::kInt32: return 4;
    case TokenDType::kInt64: return 8;
  }
  return 0;
}

int64_t largest_token(TokenDType t) {
  switch (t) {
    case TokenDType::kUInt8: return 255;
    case TokenDType::kInt8: return 127;
    case TokenDType::kInt16: return 32767;
    case TokenDType::kUInt16: return 65535;
    case TokenDType::kInt32: return INT32_MAX;
    case TokenDType::kInt64: return INT64_MAX;
  }
  return 0;
}

std::string shard_name(int64_t i) { return log::format("shard-%05lld", static_cast<long long>(i)); }

bool valid_token_dtype(uint8_t code) { return (code >= 1 && code <= 5) || code == 8; }  // 6, 7: float64/32

// A shard file's bytes (mapped): at<T>() past its end is a CorruptShard naming it.
class ShardFile {
 public:
  explicit ShardFile(const std::string& path) : path_(path), file_(path, "token shard") {}
  uint64_t size() const { return file_.size(); }
  const uint8_t* data() const { return file_.data(); }
  template <class T>
  T at(uint64_t offset) const {
    T v{};
    if (offset + sizeof v > size())
      throw CorruptShard(log::format("token shard %s: truncated at byte %llu (the file has %llu)", path_.c_str(),
                                     static_cast<unsigned long long>(offset), static_cast<unsigned long long>(size())));
    std::memcpy(&v, data() + offset, sizeof v);  // little-endian, as the files are
    return v;
  }

 private:
  std::string path_;
  MappedFile file_;
};

std::string strip_shard_suffix(const std::string& entry) {
  for (const char* ext : {".idx", ".bin"})
    if (entry.size() > 4 && entry.compare(entry.size() - 4, 4, ext) == 0) return entry.substr(0, entry.size() - 4);
  return entry;
}

std::string file_hash(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return fnv1a_hex(ss.str());
}

}  // namespace

TokenIndexHeader check_token_index(const std::string& idx_path) {
  const ShardFile idx(idx_path);
  if (idx.size() < 9 || std::memcmp(idx.data(), kMagic, 9) != 0)
    throw CorruptShard("token shard " + idx_path + ": byte 0: not a Megatron index (magic \"MMIDIDX\\0\\0\" expected)");
  if (const auto v = idx.at<uint64_t>(9); v != 1)
    throw CorruptShard(log::format("token shard %s: byte 9: version %llu, only 1 is known", idx_path.c_str(),
                                   static_cast<unsigned long long>(v)));
  const auto code = idx.at<uint8_t>(17);
  if (!valid_token_dtype(code))
    throw CorruptShard(log::format("token shard %s: byte 17: dtype code %u is not an integer token type (1-5, 8)",
                                   idx_path.c_str(), static_cast<unsigned>(code)));
  TokenIndexHeader h;
  h.dtype = static_cast<TokenDType>(code);
  h.sequences = idx.at<uint64_t>(18);
  h.doc_entries = idx.at<uint64_t>(26);
  const uint64_t S = h.sequences, D = h.doc_entries;
  const uint64_t need = kHeaderBytes + 12 * S + 8 * D;
  if (S > (uint64_t{1} << 40) || D > (uint64_t{1} << 40) || (idx.size() != need && idx.size() != need + S))
    throw CorruptShard(log::format("token shard %s: byte 18: %llu sequences and %llu document entries need %llu "
                                   "bytes, the file has %llu", idx_path.c_str(), static_cast<unsigned long long>(S),
                                   static_cast<unsigned long long>(D), static_cast<unsigned long long>(need),
                                   static_cast<unsigned long long>(idx.size())));
  const uint64_t docs_at = kHeaderBytes + 12 * S;
  if (D == 0 || idx.at<int64_t>(docs_at) != 0 || idx.at<int64_t>(docs_at + 8 * (D - 1)) != static_cast<int64_t>(S))
    throw CorruptShard(log::format("token shard %s: byte %llu: document boundaries must run from 0 to %llu",
                                   idx_path.c_str(), static_cast<unsigned long long>(docs_at),
                                   static_cast<unsigned long long>(S)));
  const std::string bin_path = strip_shard_suffix(idx_path) + ".bin";
  const ShardFile bin(bin_path);
  uint64_t bin_bytes = 0;
  if (S > 0) {
    const auto last_len = idx.at<int32_t>(kHeaderBytes + 4 * (S - 1));
    const auto last_ptr = idx.at<int64_t>(kHeaderBytes + 4 * S + 8 * (S - 1));
    if (last_len < 0 || last_ptr < 0)
      throw CorruptShard(log::format("token shard %s: byte %llu: negative length or pointer", idx_path.c_str(),
                                     static_cast<unsigned long long>(kHeaderBytes + 4 * (S - 1))));
    bin_bytes = static_cast<uint64_t>(last_ptr) + static_cast<uint64_t>(last_len) * dtype_size(h.dtype);
  }
  if (bin.size() != bin_bytes)
    throw CorruptShard(log::format("token shard %s: byte %llu: the index implies %llu bytes of tokens, the file has "
                                   "%llu (truncated or not this index's data)", bin_path.c_str(),
                                   static_cast<unsigned long long>(std::min(bin.size(), bin_bytes)),
                                   static_cast<unsigned long long>(bin_bytes),
                                   static_cast<unsigned long long>(bin.size())));
  return h;
}

// ---------------------------------------------------------------------------------------------------------------

TokenShardWriter::TokenShardWriter(std::string prefix, TokenDType dtype)
    : prefix_(std::move(prefix)), dtype_(dtype), bin_(prefix_ + ".bin") {}

void TokenShardWriter::add_document(const std::vector<int64_t>& tokens) {
  const int64_t width = dtype_size(dtype_);
  const int64_t top = largest_token(dtype_);
  std::vector<char> buf(tokens.size() * static_cast<size_t>(width));
  for (size_t i = 0; i < tokens.size(); ++i) {
    const int64_t t = tokens[i];
    if (t < 0 || t > top)
      throw std::runtime_error(log::format("token shard %s: token id %lld does not fit dtype code %u",
                                           prefix_.c_str(), static_cast<long long>(t), static_cast<unsigned>(dtype_)));
    std::memcpy(buf.data() + i * static_cast<size_t>(width), &t, static_cast<size_t>(width));  // little-endian
  }
  bin_.write(buf.data(), buf.size());
  lengths_.push_back(static_cast<int32_t>(tokens.size()));
  tokens_ += static_cast<int64_t>(tokens.size());
}

void TokenShardWriter::finish() {
  const uint64_t S = lengths_.size();
  std::string idx(kMagic, 9);
  auto put = [&](const auto& v) { idx.append(reinterpret_cast<const char*>(&v), sizeof v); };
  put(uint64_t{1});
  put(static_cast<uint8_t>(dtype_));
  put(S);
  put(S + 1);
  idx.append(reinterpret_cast<const char*>(lengths_.data()), 4 * S);
  int64_t ptr = 0;
  for (const int32_t len : lengths_) {
    put(ptr);
    ptr += int64_t{len} * dtype_size(dtype_);
  }
  for (uint64_t d = 0; d <= S; ++d) put(static_cast<int64_t>(d));  // one sequence per document
  bin_.commit();
  write_file_atomically(prefix_ + ".idx", idx);
}

// ---------------------------------------------------------------------------------------------------------------

TokenizeResult tokenize_to_shards(const TokenizeOptions& o, const Tokenizer& tok,
                                  const std::function<void(const TokenizeResult&, double)>& progress) {
  if (o.inputs.empty()) throw std::runtime_error("data tokenize: no --input files; hint: --input corpus.jsonl");
  double total_bytes = 0;
  for (const auto& in : o.inputs) {
    const auto ext = fs::path(in).extension();
    if (ext != ".txt" && ext != ".jsonl")
      throw std::runtime_error("data tokenize: --input \"" + in + "\": unknown extension; expected .txt or .jsonl");
    std::error_code ec;
    const auto size = fs::file_size(in, ec);
    if (ec) throw std::runtime_error("data tokenize: --input \"" + in + "\": cannot open (" + ec.message() + ")");
    total_bytes += static_cast<double>(size);
  }
  if (o.threads < 1 || o.shard_tokens < 1)
    throw std::runtime_error("data tokenize: --threads and --shard-tokens must be >= 1");
  fs::create_directories(o.out_dir);
  for (const auto& e : fs::directory_iterator(o.out_dir))
    if (e.path().extension() == ".idx" || e.path().filename() == "shards.json")
      throw std::runtime_error("data tokenize: --out \"" + o.out_dir + "\" already holds shards (" +
                               e.path().filename().string() + "); hint: choose a new folder or delete it");
  const TokenDType dtype = tok.vocab_size() < 65500 ? TokenDType::kUInt16 : TokenDType::kInt32;
  const auto t0 = std::chrono::steady_clock::now();
  auto last_report = t0;
  TokenizeResult r;
  json shards = json::array();
  std::unique_ptr<TokenShardWriter> writer;
  auto close_shard = [&] {
    if (!writer) return;
    writer->finish();
    shards.push_back(
        {{"name", shard_name(r.shards)}, {"documents", writer->documents()}, {"tokens", writer->tokens()}});
    ++r.shards;
    writer.reset();
  };
  using Batch = std::vector<std::vector<int64_t>>;
  std::deque<std::future<Batch>> in_flight;
  auto write_front = [&] {
    Batch b = in_flight.front().get();
    in_flight.pop_front();
    for (const auto& doc : b) {
      if (!writer)
        writer = std::make_unique<TokenShardWriter>((fs::path(o.out_dir) / shard_name(r.shards)).string(), dtype);
      writer->add_document(doc);
      ++r.documents;
      r.tokens += static_cast<int64_t>(doc.size());
      if (writer->tokens() >= o.shard_tokens) close_shard();
    }
    const auto now = std::chrono::steady_clock::now();
    r.seconds = std::chrono::duration<double>(now - t0).count();
    if (progress && std::chrono::duration<double>(now - last_report).count() >= 5) {
      progress(r, total_bytes);
      last_report = now;
    }
  };
  std::vector<std::string> batch;
  size_t batch_bytes = 0;
  auto submit = [&] {
    if (batch.empty()) return;
    if (static_cast<int64_t>(in_flight.size()) >= o.threads) write_front();
    in_flight.push_back(std::async(std::launch::async, [&tok, docs = std::move(batch), bos = o.bos_id,
                                                        eos = o.eos_id] {
      Batch out;
      out.reserve(docs.size());
      for (const auto& d : docs) {
        std::vector<int64_t> ids{bos};
        const auto pieces = tok.encode(d);
        ids.insert(ids.end(), pieces.begin(), pieces.end());
        ids.push_back(eos);
        out.push_back(std::move(ids));
      }
      return out;
    }));
    batch = {};
    batch_bytes = 0;
  };
  constexpr size_t kBatchBytes = size_t{1} << 21;  // 2 MiB of text per task
  for (const auto& in : o.inputs) {
    r.skipped += for_each_document(in, [&](std::string&& doc) {
      r.bytes += static_cast<double>(doc.size() + 1);
      batch_bytes += doc.size();
      batch.push_back(std::move(doc));
      if (batch_bytes >= kBatchBytes) submit();
    });
  }
  submit();
  while (!in_flight.empty()) write_front();
  close_shard();
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  json meta = {{"format", "megatron-mmap-indexed-dataset"}, {"version", 1}, {"tokenizer", tok.path()},
               {"tokenizer_hash", file_hash(tok.path())}, {"vocab_size", tok.vocab_size()}, {"bos_id", o.bos_id},
               {"eos_id", o.eos_id}, {"dtype_code", static_cast<int>(dtype)}, {"documents", r.documents},
               {"tokens", r.tokens}, {"skipped_lines", r.skipped}, {"inputs", o.inputs}, {"shards", shards}};
  write_file_atomically((fs::path(o.out_dir) / "shards.json").string(), meta.dump(2));
  r.bytes = total_bytes;  // every input read to its end (documents alone leave out the separators)
  if (progress) progress(r, total_bytes);
  return r;
}

// ---------------------------------------------------------------------------------------------------------------

bool is_token_shard_source(const std::string& entry) {
  if (fs::is_directory(entry)) return true;
  const auto ext = fs::path(entry).extension();
  return ext == ".idx" || ext == ".bin" || fs::exists(entry + ".idx");
}

struct TokenShards::Shard {
  Shard(const std::string& bin, TokenDType dtype, const std::string& what)
      : bin(bin), file(bin, what + ": token shard", /*random=*/true), dtype(dtype),
        tokens(static_cast<int64_t>(file.size()) / dtype_size(dtype)) {}
  std::string bin;     // NAME.bin
  MappedFile file;     // its memory map
  TokenDType dtype{};  // token width
  int64_t tokens = 0;  // tokens in the file
};

TokenShards::TokenShards(const std::vector<std::string>& entries, const std::string& what, const Tokenizer& tok,
                         int64_t bos_id, int64_t eos_id) {
  std::vector<std::string> prefixes;
  std::string tok_hash;
  for (const auto& e : entries) {
    if (!fs::is_directory(e)) {
      const std::string p = strip_shard_suffix(e);
      if (!fs::exists(p + ".idx") || !fs::exists(p + ".bin"))
        throw std::runtime_error(what + ": token shard \"" + p + "\": cannot open " + p +
                                 (fs::exists(p + ".idx") ? ".bin" : ".idx") + "; hint: a shard is NAME.bin + NAME.idx");
      prefixes.push_back(p);
      continue;
    }
    std::vector<std::string> found;
    for (const auto& f : fs::directory_iterator(e))
      if (f.path().extension() == ".idx") found.push_back(strip_shard_suffix(f.path().string()));
    std::sort(found.begin(), found.end());
    if (found.empty())
      throw std::runtime_error(what + ": folder \"" + e + "\" holds no token shards (.idx files); hint: omnilite data "
                               "tokenize --input FILES --out " + e);
    const auto meta_path = fs::path(e) / "shards.json";
    if (fs::exists(meta_path)) {
      std::ifstream f(meta_path);
      const auto meta = json::parse(f, nullptr, /*allow_exceptions=*/false);
      if (!meta.is_object())
        throw std::runtime_error(what + ": \"" + meta_path.string() + "\" is not JSON; hint: run omnilite data "
                                 "tokenize again");
      if (tok_hash.empty()) tok_hash = file_hash(tok.path());
      if (meta.value("tokenizer_hash", std::string()) != tok_hash || meta.value("bos_id", int64_t{-1}) != bos_id ||
          meta.value("eos_id", int64_t{-1}) != eos_id)
        throw std::runtime_error(log::format(
            "%s: the shards in \"%s\" were tokenized with %s (hash %s, BOS %lld, EOS %lld), this run uses %s (hash %s, "
            "BOS %lld, EOS %lld); hint: tokenize again with --tokenizer %s", what.c_str(), e.c_str(),
            meta.value("tokenizer", std::string("?")).c_str(), meta.value("tokenizer_hash", std::string("?")).c_str(),
            static_cast<long long>(meta.value("bos_id", int64_t{-1})),
            static_cast<long long>(meta.value("eos_id", int64_t{-1})), tok.path().c_str(), tok_hash.c_str(),
            static_cast<long long>(bos_id), static_cast<long long>(eos_id), tok.path().c_str()));
    } else {
      log::warn(what + ": \"" + e + "\" has no shards.json (not written by omnilite data tokenize): its tokenizer "
                "cannot be checked; rows with ids beyond the vocabulary are skipped");
    }
    prefixes.insert(prefixes.end(), found.begin(), found.end());
  }
  starts_.push_back(0);
  for (const auto& p : prefixes) {
    TokenIndexHeader h;
    try {
      h = check_token_index(p + ".idx");
    } catch (const CorruptShard& err) {
      log::warn(what + ": skipped: " + err.what());
      ++bad_shards_;
      continue;
    }
    documents_ += static_cast<int64_t>(h.doc_entries) - 1;
    auto s = std::make_unique<Shard>(p + ".bin", h.dtype, what);
    if (s->tokens == 0) continue;
    total_ += s->tokens;
    starts_.push_back(total_);
    fingerprint_ += fs::path(p).filename().string() + ":" + std::to_string(s->tokens) + ";";
    shards_.push_back(std::move(s));
  }
  fingerprint_ = fnv1a_hex(fingerprint_);
}

TokenShards::~TokenShards() = default;

size_t TokenShards::shard_of(int64_t offset) const {
  return static_cast<size_t>(std::upper_bound(starts_.begin(), starts_.end(), offset) - starts_.begin() - 1);
}

void TokenShards::read(int64_t offset, int64_t count, int64_t* out) const {
  TORCH_CHECK(offset >= 0 && count >= 0 && offset + count <= total_, "token shards: read of [", offset, ", ",
              offset + count, ") outside the stream of ", total_, " tokens");
  while (count > 0) {
    const size_t k = shard_of(offset);
    const Shard& s = *shards_[k];
    const int64_t local = offset - starts_[k];
    const int64_t n = std::min(count, s.tokens - local);
    const auto* p = s.file.data() + local * dtype_size(s.dtype);
    switch (s.dtype) {
      case TokenDType::kUInt8: for (int64_t i = 0; i < n; ++i) out[i] = reinterpret_cast<const uint8_t*>(p)[i]; break;
      case TokenDType::kInt8: for (int64_t i = 0; i < n; ++i) out[i] = reinterpret_cast<const int8_t*>(p)[i]; break;
      case TokenDType::kInt16: for (int64_t i = 0; i < n; ++i) out[i] = reinterpret_cast<const int16_t*>(p)[i]; break;
      case TokenDType::kUInt16: for (int64_t i = 0; i < n; ++i) out[i] = reinterpret_cast<const uint16_t*>(p)[i]; break;
      case TokenDType::kInt32: for (int64_t i = 0; i < n; ++i) out[i] = reinterpret_cast<const int32_t*>(p)[i]; break;
      case TokenDType::kInt64: std::memcpy(out, p, static_cast<size_t>(n) * 8); break;
    }
    offset += n, count -= n, out += n;
  }
}

std::string TokenShards::locate(int64_t offset) const {
  const size_t k = shard_of(offset);
  if (k >= shards_.size()) return "the end of the stream";
  const Shard& s = *shards_[k];
  return log::format("%s at byte %lld", s.bin.c_str(),
                     static_cast<long long>((offset - starts_[k]) * dtype_size(s.dtype)));
}

int64_t permuted_index(int64_t i, int64_t n, uint64_t seed, int64_t epoch) {
  TORCH_CHECK(i >= 0 && i < n, "permuted_index: ", i, " is outside [0, ", n, ")");
  if (n == 1) return 0;
  int bits = 64 - __builtin_clzll(static_cast<unsigned long long>(n - 1));
  bits += bits % 2;
  const int half = bits / 2;
  const uint64_t mask = (uint64_t{1} << half) - 1;
  const uint64_t key = splitmix64(seed ^ splitmix64(static_cast<uint64_t>(epoch) + 0x7E57ULL));
  uint64_t x = static_cast<uint64_t>(i);
  do {  // cycle-walking: the permutation of [0, 2^bits) applied until the value falls in [0, n)
    uint64_t left = x >> half, right = x & mask;
    for (uint64_t round = 0; round < 4; ++round) {
      const uint64_t f = splitmix64(key + round * 0x9E3779B97F4A7C15ULL + right) & mask;
      const uint64_t next = left ^ f;
      left = right;
      right = next;
    }
    x = (left << half) | right;
  } while (x >= static_cast<uint64_t>(n));
  return static_cast<int64_t>(x);
}

}  // namespace omnilite
