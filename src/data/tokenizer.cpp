#include "omnilite/data/tokenizer.h"

#include <dlfcn.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <stdexcept>

#include <nlohmann/json.hpp>

#include "omnilite/log.h"

namespace omnilite {
namespace {

// SentencePiece lives behind a C interface in its own shared object (src/data/spm_shim.cpp explains why), loaded
// once with RTLD_LOCAL | RTLD_DEEPBIND (in sanitizer builds: into a link-map namespace of its own). Looked up in
// $OMNILITE_SPM_LIB, next to the running program, then at the path of the build that made this library.
struct SpmApi {
  void* (*load)(const char*, char*, size_t) = nullptr;
  void (*free_model)(void*) = nullptr;
  int (*encode)(void*, const char*, size_t, int**, size_t*, char*, size_t) = nullptr;
  int (*decode)(void*, const int*, size_t, char**, size_t*, char*, size_t) = nullptr;
  void (*free_buffer)(void*) = nullptr;
  int (*piece_size)(void*) = nullptr;
  int (*piece_to_id)(void*, const char*) = nullptr;
  int (*train)(const char*, unsigned, char*, size_t) = nullptr;

  static const SpmApi& get() {
    static const SpmApi api = open();
    return api;
  }

 private:
  template <class F>
  static void bind(void* lib, const char* name, F& fn, const std::string& where) {
    fn = reinterpret_cast<F>(dlsym(lib, name));
    if (!fn) throw std::runtime_error("tokenizer: " + where + " lacks " + name + "; hint: rebuild the project");
  }
  static SpmApi open() {
    std::vector<std::string> candidates;
    if (const char* env = std::getenv("OMNILITE_SPM_LIB")) candidates.emplace_back(env);
    std::error_code ec;
    const auto exe = std::filesystem::read_symlink("/proc/self/exe", ec);
    if (!ec) candidates.push_back((exe.parent_path() / "libomnilite_spm.so").string());
#ifdef OMNILITE_SPM_BUILD_PATH
    candidates.emplace_back(OMNILITE_SPM_BUILD_PATH);
#endif
    std::string tried;
    for (const auto& c : candidates) {
      if (!std::filesystem::exists(c)) {
        tried += " " + c;
        continue;
      }
#ifdef OMNILITE_SPM_NAMESPACE
      // Sanitizer builds (scripts/check_sanitizers.sh): AddressSanitizer refuses RTLD_DEEPBIND, so the
      // uninstrumented shim gets a link-map namespace of its own, with its own libstdc++ and protobuf. Nothing
      // allocated on one side is freed on the other (the shim frees its own buffers).
      void* lib = dlmopen(LM_ID_NEWLM, c.c_str(), RTLD_NOW | RTLD_LOCAL);
#else
      // OMNILITE_SPM_DEEPBIND=0 drops RTLD_DEEPBIND for programs without LibTorch's protobuf under AddressSanitizer,
      // which refuses it (scripts/fuzz.sh; docs/reliability.md).
      const char* deep = std::getenv("OMNILITE_SPM_DEEPBIND");
      const int bind_flag = deep && std::string(deep) == "0" ? 0 : RTLD_DEEPBIND;
      void* lib = dlopen(c.c_str(), RTLD_NOW | RTLD_LOCAL | bind_flag);
#endif
      if (!lib) throw std::runtime_error("tokenizer: cannot load " + c + ": " + dlerror());
      SpmApi a;
      bind(lib, "omnilite_spm_load", a.load, c);
      bind(lib, "omnilite_spm_free", a.free_model, c);
      bind(lib, "omnilite_spm_encode", a.encode, c);
      bind(lib, "omnilite_spm_decode", a.decode, c);
      bind(lib, "omnilite_spm_free_buffer", a.free_buffer, c);
      bind(lib, "omnilite_spm_piece_size", a.piece_size, c);
      bind(lib, "omnilite_spm_piece_to_id", a.piece_to_id, c);
      bind(lib, "omnilite_spm_train", a.train, c);
      return a;
    }
    throw std::runtime_error("tokenizer: SentencePiece interface libomnilite_spm.so not found (tried" + tried +
                             "); hint: set OMNILITE_SPM_LIB to its path");
  }
};

constexpr size_t kErrLen = 512;

}  // namespace

const std::vector<std::string>& reserved_marker_pieces() {
  static const std::vector<std::string> pieces = {"<image>", "<image_begin>", "<image_end>", "<gen_image>"};
  return pieces;
}

Tokenizer::Tokenizer(const std::string& model_path) : path_(model_path) {
  if (!std::filesystem::exists(model_path))
    throw std::runtime_error("tokenizer \"" + model_path + "\": file not found; hint: train one with "
                             "`omnilite tokenizer train` or pass a SentencePiece .model");
  const auto& api = SpmApi::get();
  char err[kErrLen] = {0};
  void* h = api.load(model_path.c_str(), err, kErrLen);
  if (!h) throw std::runtime_error("tokenizer \"" + model_path + "\": not a SentencePiece model (" + err + ")");
  sp_ = std::shared_ptr<void>(h, [](void* p) { SpmApi::get().free_model(p); });
  const int64_t unk = piece_id("<unk>");
  for (const auto& piece : reserved_marker_pieces()) {
    const int64_t id = piece_id(piece);
    if (id < 0 || id == unk) continue;
    std::vector<int64_t> bytes;
    for (unsigned char c : piece) {
      char name[8];
      std::snprintf(name, sizeof name, "<0x%02X>", c);
      const int64_t b = piece_id(name);
      bytes.push_back(b >= 0 ? b : unk);  // a model without byte fallback spells it as <unk>
    }
    marker_text_.emplace_back(id, std::move(bytes));
  }
}

std::vector<int64_t> Tokenizer::encode(const std::string& text) const {
  const auto& api = SpmApi::get();
  int* ids = nullptr;
  size_t n = 0;
  char err[kErrLen] = {0};
  if (api.encode(sp_.get(), text.data(), text.size(), &ids, &n, err, kErrLen) != 0)
    throw std::runtime_error("tokenizer \"" + path_ + "\": cannot encode: " + err);
  std::vector<int64_t> raw(ids, ids + n);
  api.free_buffer(ids);
  if (marker_text_.empty()) return raw;
  std::vector<int64_t> out;
  out.reserve(raw.size());
  for (const int64_t id : raw) {
    const std::vector<int64_t>* spelled = nullptr;
    for (const auto& [marker, bytes] : marker_text_)
      if (marker == id) spelled = &bytes;
    if (spelled) out.insert(out.end(), spelled->begin(), spelled->end());
    else out.push_back(id);
  }
  return out;
}

std::string Tokenizer::decode(const std::vector<int64_t>& ids) const {
  std::vector<int> v;
  v.reserve(ids.size());
  const int64_t n = vocab_size();
  for (auto id : ids) {
    if (id < 0 || id >= n)
      throw std::runtime_error("tokenizer \"" + path_ + "\": id " + std::to_string(id) + " outside [0, " +
                               std::to_string(n) + ")");
    v.push_back(static_cast<int>(id));
  }
  const auto& api = SpmApi::get();
  char* text = nullptr;
  size_t len = 0;
  char err[kErrLen] = {0};
  if (api.decode(sp_.get(), v.data(), v.size(), &text, &len, err, kErrLen) != 0)
    throw std::runtime_error("tokenizer \"" + path_ + "\": cannot decode: " + err);
  std::string out(text, len);
  api.free_buffer(text);
  return out;
}

int64_t Tokenizer::vocab_size() const { return SpmApi::get().piece_size(sp_.get()); }

int64_t Tokenizer::piece_id(const std::string& piece) const {
  return SpmApi::get().piece_to_id(sp_.get(), piece.c_str());
}

void Tokenizer::check_compatible(const ModelConfig& cfg) const {
  if (vocab_size() > cfg.text.vocab_size)
    throw std::runtime_error("tokenizer \"" + path_ + "\" has " + std::to_string(vocab_size()) +
                             " pieces but model.text.vocab_size = " + std::to_string(cfg.text.vocab_size) +
                             "; hint: raise model.text.vocab_size or train a smaller tokenizer");
  const auto& t = cfg.tokens;
  const std::vector<std::pair<std::string, int64_t>> expect = {{"<image>", t.image_id},
                                                               {"<image_begin>", t.image_begin_id},
                                                               {"<image_end>", t.image_end_id},
                                                               {"<gen_image>", t.gen_image_id}};
  const char* keys[] = {"model.tokens.image_id", "model.tokens.image_begin_id", "model.tokens.image_end_id",
                        "model.tokens.gen_image_id"};
  for (size_t i = 0; i < expect.size(); ++i) {
    const int64_t id = piece_id(expect[i].first);
    if (id >= 0 && id != expect[i].second)
      throw std::runtime_error("tokenizer \"" + path_ + "\" has " + expect[i].first + " at id " + std::to_string(id) +
                               " but " + keys[i] + " = " + std::to_string(expect[i].second) +
                               "; hint: set the key to the tokenizer's id");
  }
}

std::string train_tokenizer(const TokenizerTrainOptions& o, const std::string& out_path) {
  if (o.inputs.empty()) throw std::runtime_error("tokenizer train: no --input files given");
  const int64_t min_vocab = 3 + static_cast<int64_t>(reserved_marker_pieces().size()) + 256;
  if (o.vocab_size < min_vocab)
    throw std::runtime_error("tokenizer train: --vocab-size " + std::to_string(o.vocab_size) + " is below " +
                             std::to_string(min_vocab) + " (3 control pieces, 4 image markers, 256 byte pieces)");
  if (o.model_type != "unigram" && o.model_type != "bpe")
    throw std::runtime_error("tokenizer train: model type \"" + o.model_type + "\" is not unigram or bpe");
  // SentencePiece reads plain text, one sentence per line: .jsonl inputs are flattened into a temporary file.
  const auto tmp = std::filesystem::path(out_path).string() + ".corpus.txt";
  {
    std::ofstream corpus(tmp);
    if (!corpus) throw std::runtime_error("tokenizer train: cannot write \"" + tmp + "\"");
    for (const auto& in : o.inputs) {
      std::ifstream f(in);
      if (!f) throw std::runtime_error("tokenizer train: cannot open input \"" + in + "\"");
      const bool jsonl = in.size() > 6 && in.substr(in.size() - 6) == ".jsonl";
      std::string line;
      size_t lineno = 0, bad = 0, first_bad = 0;
      while (std::getline(f, line)) {
        ++lineno;
        if (!jsonl) {
          if (!line.empty() && line != "%") corpus << line << "\n";  // "%" separates fortune-format documents
          continue;
        }
        if (line.empty()) continue;
        auto j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
        if (j.is_discarded()) {
          if (bad++ == 0) first_bad = lineno;
          continue;
        }
        if (!j.is_object() || !j.contains("text") || !j["text"].is_string()) continue;  // not a text record
        std::string text = j["text"].get<std::string>();
        size_t start = 0;
        while (start <= text.size()) {  // one sentence per line
          const size_t nl = text.find('\n', start);
          const std::string part = text.substr(start, nl == std::string::npos ? std::string::npos : nl - start);
          if (!part.empty()) corpus << part << "\n";
          if (nl == std::string::npos) break;
          start = nl + 1;
        }
      }
      if (bad > 0)
        log::warn(log::format("tokenizer train: %s: skipped %zu lines that are not JSON (the first is line %zu)",
                              in.c_str(), bad, first_bad));
    }
  }
  for (const auto& path : {tmp, out_path})
    if (path.find(' ') != std::string::npos)
      throw std::runtime_error("tokenizer train: SentencePiece cannot take paths with spaces: \"" + path + "\"");
  std::string symbols;
  for (const auto& p : reserved_marker_pieces()) symbols += (symbols.empty() ? "" : ",") + p;
  std::string prefix = out_path;
  if (prefix.size() > 6 && prefix.substr(prefix.size() - 6) == ".model") prefix.resize(prefix.size() - 6);
  // Trained under a temporary prefix, then renamed: a failed run leaves an existing model untouched.
  const std::string tmp_prefix = prefix + ".partial";
  const std::string args = "--input=" + tmp + " --model_prefix=" + tmp_prefix + " --vocab_size=" +
                           std::to_string(o.vocab_size) + " --model_type=" + o.model_type +
                           " --character_coverage=1.0 --byte_fallback=true --control_symbols=" + symbols +
                           // Llama's and Mistral's trainer settings: text is kept as it is (no NFKC, whitespace
                           // runs kept), digits are single pieces; llama.cpp and transformers split the same way.
                           " --normalization_rule_name=identity --remove_extra_whitespaces=false"
                           " --allow_whitespace_only_pieces=true --split_digits=true" +
                           " --input_sentence_size=" + std::to_string(o.max_sentences) +
                           " --shuffle_input_sentence=true --minloglevel=2 --num_threads=2";
  char err[kErrLen] = {0};
  const int rc = SpmApi::get().train(args.c_str(), static_cast<unsigned>(o.seed), err, kErrLen);
  std::filesystem::remove(tmp);
  if (rc != 0)
    throw std::runtime_error(std::string("tokenizer train: SentencePiece failed: ") + err +
                             "; hint: a smaller --vocab-size fits a small corpus");
  std::filesystem::rename(tmp_prefix + ".vocab", prefix + ".vocab");
  std::filesystem::rename(tmp_prefix + ".model", prefix + ".model");
  return prefix + ".model";
}

}  // namespace omnilite
