// Tokenizer training with the reserved markers, round trips, and compatibility errors.
#include "catch_compat.h"

#include <filesystem>
#include <fstream>

#include <algorithm>
#include <cstdio>

#include "helpers.h"
#include "omnilite/data/tokenizer.h"

using namespace omnilite;
namespace fs = std::filesystem;

namespace {

// A small English corpus with enough variety for a 300-piece model; written as .jsonl.
std::string write_corpus(const std::string& dir) {
  const char* subjects[] = {"the cat", "a dog", "my friend", "the old sailor", "every student", "our teacher"};
  const char* verbs[] = {"reads", "writes", "finds", "loses", "paints", "remembers", "sells"};
  const char* objects[] = {"a book", "the letter", "seven shirts", "a red coat", "the trousers", "an ankle boot"};
  const std::string path = dir + "/corpus.jsonl";
  std::ofstream f(path);
  for (const char* s : subjects)
    for (const char* v : verbs)
      for (const char* o : objects) f << "{\"text\": \"" << s << " " << v << " " << o << ".\\nThen it rains.\"}\n";
  f << "not json at all\n";
  return path;
}

}  // namespace

TEST_CASE("trained tokenizer reserves the image markers at ids 3..6 and round-trips text", "[tokenizer]") {
  const auto dir = (fs::temp_directory_path() / "omnilite_test_tok").string();
  fs::remove_all(dir);
  fs::create_directories(dir);
  TokenizerTrainOptions o;
  o.inputs = {write_corpus(dir)};
  o.vocab_size = 300;
  CHECK(train_tokenizer(o, dir + "/tok.model") == dir + "/tok.model");
  Tokenizer tok(dir + "/tok.model");
  CHECK(tok.vocab_size() == 300);
  // Without the suffix the same files are written, and the path returned names the .model.
  CHECK(train_tokenizer(o, dir + "/tok2") == dir + "/tok2.model");
  CHECK(fs::exists(dir + "/tok2.model"));
  CHECK(fs::exists(dir + "/tok2.vocab"));
  CHECK(tok.piece_id("<image>") == 3);
  CHECK(tok.piece_id("<image_begin>") == 4);
  CHECK(tok.piece_id("<image_end>") == 5);
  CHECK(tok.piece_id("<gen_image>") == 6);
  CHECK(tok.piece_id("<s>") == 1);
  CHECK(tok.piece_id("</s>") == 2);
  CHECK(tok.piece_id("no-such-piece") == -1);
  for (const std::string text : {"the cat paints a red coat.", "Zebra ünïcode 42!"}) {
    auto ids = tok.encode(text);
    CHECK_FALSE(ids.empty());
    CHECK(tok.decode(ids) == text);  // byte fallback keeps unseen characters
  }
  // Marker strings in text are plain text: the markers are control symbols, which SentencePiece never reads out of
  // text, so "<image>" is spelled by ordinary pieces, never the placeholder ids, and decodes back.
  const std::string typed = "what is <image> here <image_begin><gen_image><image_end>";
  auto ids = tok.encode(typed);
  for (int64_t marker : {3, 4, 5, 6}) CHECK(std::count(ids.begin(), ids.end(), marker) == 0);
  CHECK(tok.decode(ids) == typed);
  CHECK(tok.encode("<image>").size() > 1);

  auto cfg = testing::load("configs/tiny.json").model;  // vocab 64 < 300 pieces
  REQUIRE_THROWS_WITH(tok.check_compatible(cfg), ContainsText("300 pieces") &&
                                                     ContainsText("model.text.vocab_size = 64"));
  cfg.text.vocab_size = 512;
  REQUIRE_NOTHROW(tok.check_compatible(cfg));
  cfg.tokens.gen_image_id = 9;
  REQUIRE_THROWS_WITH(tok.check_compatible(cfg), ContainsText("<gen_image> at id 6") &&
                                                     ContainsText("model.tokens.gen_image_id = 9"));
}

TEST_CASE("tokenizer errors name the file", "[tokenizer][errors]") {
  REQUIRE_THROWS_WITH(Tokenizer("/nonexistent/tok.model"), ContainsText("/nonexistent/tok.model") &&
                                                               ContainsText("not found"));
  const std::string bad = (fs::temp_directory_path() / "omnilite_bad.model").string();
  std::ofstream(bad) << "garbage";
  REQUIRE_THROWS_WITH(Tokenizer(bad), ContainsText("not a SentencePiece model"));
  TokenizerTrainOptions o;
  o.inputs = {"/nonexistent/corpus.txt"};
  REQUIRE_THROWS_WITH(train_tokenizer(o, "/tmp/x.model"), ContainsText("cannot open input"));
}
