// libFuzzer target: the tokenizer on any text (markers, invalid UTF-8, NUL bytes): encode, and decode of the
// ids. The model is trained once at start on a small corpus with the project's options (markers, byte fallback).
#include <cstdlib>
#include <fstream>
#include <memory>
#include <stdexcept>
#include <string>

#include "fuzz_common.h"
#include "omnilite/data/tokenizer.h"

namespace {
std::unique_ptr<omnilite::Tokenizer> tok;
}

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  const std::string corpus = fuzz::work_dir() + "/corpus.txt";
  {
    std::ofstream f(corpus);
    const char* words[] = {"red", "coat", "a photo of a", "sandal", "the", "ünïcode", "42", "<image>"};
    for (int i = 0; i < 400; ++i) f << words[i % 8] << " " << words[(i * 3) % 8] << " " << words[(i * 5) % 8] << "\n";
  }
  omnilite::TokenizerTrainOptions o;
  o.inputs = {corpus};
  o.vocab_size = 290;
  tok = std::make_unique<omnilite::Tokenizer>(omnilite::train_tokenizer(o, fuzz::work_dir() + "/tok.model"));
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  try {
    const auto ids = tok->encode(text);
    for (const int64_t id : ids)
      if (id == 3 || id == 4 || id == 5 || id == 6) std::abort();  // marker text must never become a marker id
    (void)tok->decode(ids);
  } catch (const std::exception&) {
  }
  return 0;
}
