#include "omnilite/data/text_dataset.h"

#include "omnilite/log.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <random>
#include <stdexcept>

#include <nlohmann/json.hpp>

namespace omnilite {

DocumentSet read_documents(const std::vector<std::string>& paths) {
  DocumentSet out;
  for (const auto& path : paths) {
    const auto ext = std::filesystem::path(path).extension();
    if (ext != ".jsonl" && ext != ".txt")
      throw std::runtime_error("text data \"" + path + "\": unknown extension; expected .txt or .jsonl");
    std::ifstream f(path);
    if (!f) throw std::runtime_error("text data \"" + path + "\": cannot open; hint: run scripts/prepare_data.sh");
    std::string line;
    size_t lineno = 0;
    if (ext == ".jsonl") {
      while (std::getline(f, line)) {
        ++lineno;
        if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
        auto j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
        if (!j.is_object() || !j.contains("text") || !j["text"].is_string()) {
          log::warn(log::format("text data %s:%zu: skipped, not a JSON object with a \"text\" string", path.c_str(), lineno));
          ++out.skipped;
          continue;
        }
        out.documents.push_back(j["text"].get<std::string>());
      }
    } else {  // .txt
      std::string doc;
      auto flush = [&] {
        if (doc.find_first_not_of(" \t\r\n") != std::string::npos) out.documents.push_back(doc);
        doc.clear();
      };
      while (std::getline(f, line)) {
        if (line == "%") flush();
        else doc += (doc.empty() ? "" : "\n") + line;
      }
      flush();
    }
  }
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

}  // namespace omnilite
