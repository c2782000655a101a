#include "omnilite/data/text_dataset.h"

#include "omnilite/log.h"

#include <algorithm>
#include <filesystem>
#include <functional>
#include <fstream>
#include <numeric>
#include <random>
#include <stdexcept>

#include <nlohmann/json.hpp>

namespace omnilite {

int64_t for_each_document(const std::string& path, const std::function<void(std::string&&)>& on_document) {
  const auto ext = std::filesystem::path(path).extension();
  if (ext != ".jsonl" && ext != ".txt")
    throw std::runtime_error("text data \"" + path + "\": unknown extension; expected .txt or .jsonl");
  std::ifstream f(path);
  if (!f) throw std::runtime_error("text data \"" + path + "\": cannot open; hint: run scripts/prepare_data.sh");
  std::string line;
  int64_t skipped = 0;
  if (ext == ".jsonl") {
    for (size_t lineno = 1; std::getline(f, line); ++lineno) {
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      auto j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
      if (!j.is_object() || !j.contains("text") || !j["text"].is_string()) {
        log::warn(log::format("text data %s:%zu: skipped, not a JSON object with a \"text\" string", path.c_str(),
                              lineno));
        ++skipped;
        continue;
      }
      on_document(j["text"].get<std::string>());
    }
    return skipped;
  }
  std::string doc;  // .txt
  auto flush = [&] {
    if (doc.find_first_not_of(" \t\r\n") != std::string::npos) on_document(std::move(doc));
    doc.clear();
  };
  while (std::getline(f, line)) {
    if (line == "%") flush();
    else doc += (doc.empty() ? "" : "\n") + line;
  }
  flush();
  return skipped;
}

DocumentSet read_documents(const std::vector<std::string>& paths) {
  DocumentSet out;
  for (const auto& path : paths)
    out.skipped += for_each_document(path, [&](std::string&& d) { out.documents.push_back(std::move(d)); });
  return out;
}

torch::Tensor tokenize_documents(const std::vector<std::string>& docs, const Tokenizer& tok, int64_t bos_id,
                                 int64_t eos_id) {
  std::vector<int64_t> ids;
  for (const auto& d : docs) {
    auto piece = tok.encode(d);
    ids.push_back(bos_id);
    ids.insert(ids.end(), piece.begin(), piece.end());
    ids.push_back(eos_id);
  }
  return torch::tensor(ids, torch::kInt64);
}

torch::Tensor pack_sequences(const torch::Tensor& stream, int64_t seq_len, const std::string& what) {
  const int64_t rows = stream.numel() / seq_len;
  if (rows == 0)
    throw std::runtime_error(what + ": " + std::to_string(stream.numel()) + " tokens do not fill one sequence of " +
                             std::to_string(seq_len) + "; hint: add data or lower train.seq_len");
  return stream.narrow(0, 0, rows * seq_len).view({rows, seq_len});
}

std::vector<int64_t> epoch_permutation(int64_t n, uint64_t seed, int64_t epoch) {
  std::vector<int64_t> p(static_cast<size_t>(n));
  std::iota(p.begin(), p.end(), 0);
  std::mt19937_64 rng(seed * 1000003ULL + static_cast<uint64_t>(epoch));
  // Fisher-Yates with our own draws: std::shuffle's result differs between standard libraries.
  for (int64_t i = n - 1; i > 0; --i) {
    const int64_t j = static_cast<int64_t>(rng() % static_cast<uint64_t>(i + 1));
    std::swap(p[static_cast<size_t>(i)], p[static_cast<size_t>(j)]);
  }
  return p;
}

PackedText::PackedText(const std::vector<std::string>& entries, const std::string& what, const Tokenizer& tok,
                       const ModelConfig& model, int64_t seq_len, uint64_t seed)
    : what_(what),
      seq_len_(seq_len),
      vocab_(model.text.vocab_size),
      image_id_(model.tokens.image_id),
      gen_image_id_(model.tokens.gen_image_id),
      seed_(seed) {
  const auto shard_entries = std::count_if(entries.begin(), entries.end(), is_token_shard_source);
  if (shard_entries > 0 && shard_entries < static_cast<int64_t>(entries.size()))
    throw std::runtime_error(what + ": mixes document files and token shards; hint: tokenize the documents too "
                             "(omnilite data tokenize) or list them under another key");
  if (shard_entries > 0) {
    shards_ = std::make_unique<TokenShards>(entries, what, tok, model.tokens.bos_id, model.tokens.eos_id);
    if (shards_->tokens() > 0 && shards_->tokens() < seq_len)
      throw std::runtime_error(log::format("%s: %lld tokens do not fill one sequence of %lld; hint: add data or lower "
                                           "train.seq_len", what.c_str(), static_cast<long long>(shards_->tokens()),
                                           static_cast<long long>(seq_len)));
    rows_ = shards_->tokens() / seq_len;
    return;
  }
  auto docs = read_documents(entries);
  if (docs.skipped > 0)
    log::warn(log::format("%s: skipped %lld malformed lines", what.c_str(), static_cast<long long>(docs.skipped)));
  documents_ = static_cast<int64_t>(docs.documents.size());
  if (documents_ == 0) return;
  stream_ = tokenize_documents(docs.documents, tok, model.tokens.bos_id, model.tokens.eos_id);
  packed_ = pack_sequences(stream_, seq_len, what);
  rows_ = packed_.size(0);
  order_ = std::make_unique<EpochSampler>(rows_, seed);
}

int64_t PackedText::shuffled(int64_t k) const {
  if (order_) return order_->at(k);
  return permuted_index(k % rows_, rows_, seed_, k / rows_);
}

torch::Tensor PackedText::row(int64_t r) const {
  auto out = torch::empty({seq_len_}, torch::kInt64);
  shards_->read(r * seq_len_, seq_len_, out.data_ptr<int64_t>());
  return out;
}

torch::Tensor PackedText::gather(const std::vector<int64_t>& idx, int64_t* bad) const {
  if (!shards_) return packed_.index_select(0, torch::tensor(idx, torch::kInt64));
  constexpr int64_t kMaxBadInARow = 64;  // so many bad rows in a row: the shards do not fit the model at all
  std::vector<torch::Tensor> out;
  for (int64_t r : idx) {
    for (int64_t tries = 0;; ++tries) {
      auto x = row(r);
      const int64_t lo = x.min().item<int64_t>(), hi = x.max().item<int64_t>();
      const bool in_vocab = lo >= 0 && hi < vocab_;
      // text never holds the image placeholders (the tokenizer spells typed markers as bytes): a row that does
      // would ask the model for images it does not have
      const bool placeholder = in_vocab && x.eq(image_id_).logical_or(x.eq(gen_image_id_)).any().item<bool>();
      if (in_vocab && !placeholder) {
        out.push_back(x);
        break;
      }
      log::warn(log::format("%s: row %lld skipped: %s (%s)", what_.c_str(), static_cast<long long>(r),
                            placeholder ? "it holds image placeholder ids (model.tokens.image_id / gen_image_id)"
                                        : log::format("token id %lld is outside the vocabulary [0, %lld)",
                                                      static_cast<long long>(lo < 0 ? lo : hi),
                                                      static_cast<long long>(vocab_)).c_str(),
                            shards_->locate(r * seq_len_).c_str()));
      if (bad) ++*bad;
      if (tries + 1 >= kMaxBadInARow)
        throw std::runtime_error(log::format("%s: %lld rows in a row hold ids outside model.text.vocab_size = %lld or "
                                             "image placeholders; hint: were the shards tokenized with "
                                             "data.tokenizer?", what_.c_str(), static_cast<long long>(kMaxBadInARow),
                                             static_cast<long long>(vocab_)));
      r = (r + 1) % rows_;
    }
  }
  return torch::stack(out);
}

torch::Tensor PackedText::stream_prefix(int64_t max_tokens) const {
  if (!shards_) return stream_.defined() ? stream_ : torch::empty({0}, torch::kInt64);
  auto out = torch::empty({std::min(max_tokens, shards_->tokens())}, torch::kInt64);
  shards_->read(0, out.numel(), out.data_ptr<int64_t>());
  return out;
}

std::string PackedText::describe() const {
  if (shards_)
    return log::format("%s: %lld token shards (%lld skipped as corrupt), %lld tokens -> %lld rows of %lld tokens, "
                       "memory-mapped", what_.c_str(), static_cast<long long>(shards_->shards()),
                       static_cast<long long>(shards_->bad_shards()), static_cast<long long>(shards_->tokens()),
                       static_cast<long long>(rows_), static_cast<long long>(seq_len_));
  return log::format("%s: %lld documents -> %lld rows of %lld tokens", what_.c_str(),
                     static_cast<long long>(documents_),
                     static_cast<long long>(rows_), static_cast<long long>(seq_len_));
}

}  // namespace omnilite
