// Token shards (data/token_shards.h): the .bin/.idx bytes against hand-written Megatron files, reading shards that
// Megatron's layout allows and ours never writes (int32, several sequences per document, sequence modes), refusal
// and skipping of bad shards naming file and byte, `omnilite data tokenize`'s stream against the in-memory
// tokenizer path, the O(1)-memory row permutation, and exact resume of a run that streams its text from shards.
#include "catch_compat.h"

#include <cstring>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <set>

#include "helpers.h"
#include "omnilite/data/text_dataset.h"
#include "omnilite/data/token_shards.h"
#include "omnilite/train/trainer.h"

using namespace omnilite;
namespace fs = std::filesystem;

namespace {

using testing::bytes_of;
using testing::write_bytes;

// Little-endian bytes of a value, appended.
template <class T>
void put(std::string& s, T v) {
  s.append(reinterpret_cast<const char*>(&v), sizeof v);
}

// A Megatron index written by hand from its definition (indexed_dataset.py's _IndexWriter).
std::string megatron_index(uint8_t dtype_code, const std::vector<int32_t>& lengths, const std::vector<int64_t>& docs,
                           int64_t item, bool modes = false) {
  std::string s("MMIDIDX\0\0", 9);
  put<uint64_t>(s, 1);
  put<uint8_t>(s, dtype_code);
  put<uint64_t>(s, lengths.size());
  put<uint64_t>(s, docs.size());
  for (auto l : lengths) put<int32_t>(s, l);
  int64_t ptr = 0;
  for (auto l : lengths) {
    put<int64_t>(s, ptr);
    ptr += l * item;
  }
  for (auto d : docs) put<int64_t>(s, d);
  if (modes)
    for (size_t i = 0; i < lengths.size(); ++i) put<int8_t>(s, 0);
  return s;
}


}  // namespace

TEST_CASE("a shard's .bin and .idx are byte for byte Megatron's layout", "[shards]") {
  const std::string dir = testing::fresh_temp_dir("shards_layout");
  {
    TokenShardWriter w(dir + "/s", TokenDType::kUInt16);
    w.add_document({1, 300, 40000, 2});
    w.add_document({1, 7, 2});
    CHECK(w.documents() == 2);
    CHECK(w.tokens() == 7);
    w.finish();
  }
  std::string bin;
  for (uint16_t t : {1, 300, 40000, 2, 1, 7, 2}) put<uint16_t>(bin, t);
  CHECK(bytes_of(dir + "/s.bin") == bin);
  CHECK(bytes_of(dir + "/s.idx") == megatron_index(8, {4, 3}, {0, 1, 2}, 2));
  CHECK_FALSE(fs::exists(dir + "/s.bin.tmp"));
  const auto h = check_token_index(dir + "/s.idx");
  CHECK(h.dtype == TokenDType::kUInt16);
  CHECK(h.sequences == 2);
  CHECK(h.doc_entries == 3);
  // an id the dtype cannot hold is refused, and an unfinished shard leaves nothing behind
  {
    TokenShardWriter w(dir + "/t", TokenDType::kUInt16);
    REQUIRE_THROWS_WITH(w.add_document({1, 70000}), ContainsText("70000") && ContainsText("does not fit"));
  }
  CHECK_FALSE(fs::exists(dir + "/t.bin.tmp"));
  CHECK_FALSE(fs::exists(dir + "/t.bin"));
}

TEST_CASE("Megatron shards we do not write read as one stream and corrupt ones are skipped naming file and byte",
          "[shards]") {
  const std::string dir = testing::fresh_temp_dir("shards_read");
  const Tokenizer tok(testing::word_corpus_and_tokenizer(dir + "/data").second);
  // int32 tokens, one document of two sequences (Megatron's sentence split), then a document of one; sequence modes
  std::string bin;
  for (int32_t t : {1, 10, 11, 12, 2, 1, 13, 2}) put<int32_t>(bin, t);
  fs::create_directories(dir + "/a");
  write_bytes(dir + "/a/x.bin", bin);
  write_bytes(dir + "/a/x.idx", megatron_index(4, {3, 2, 3}, {0, 2, 3}, 4, /*modes=*/true));
  // uint8 tokens, as a prefix given directly
  write_bytes(dir + "/y.bin", std::string("\x01\x05\x06\x02", 4));
  write_bytes(dir + "/y.idx", megatron_index(1, {4}, {0, 1}, 1));
  TokenShards s({dir + "/a", dir + "/y"}, "data.text_train", tok, 1, 2);  // a/ has no shards.json: warned
  CHECK(s.shards() == 2);
  CHECK(s.tokens() == 12);
  CHECK(s.documents() == 3);
  std::vector<int64_t> got(12);
  s.read(0, 12, got.data());
  CHECK(got == std::vector<int64_t>{1, 10, 11, 12, 2, 1, 13, 2, 1, 5, 6, 2});
  std::vector<int64_t> across(4);
  s.read(6, 4, across.data());  // across the shard boundary
  CHECK(across == std::vector<int64_t>{13, 2, 1, 5});
  CHECK(s.locate(9) == dir + "/y.bin at byte 1");

  // Each kind of corruption is named with its byte offset.
  struct Bad {
    std::string name, idx, bin, message;
  };
  std::string float_idx = megatron_index(4, {3}, {0, 1}, 4);
  float_idx[17] = 7;  // float32
  std::string bad_docs = megatron_index(4, {3}, {0, 1}, 4);
  bad_docs[bad_docs.size() - 8] = 5;  // the last boundary is 5, not S = 1
  const std::string three = bin.substr(0, 12);
  const std::vector<Bad> bads = {
      {"magic", "MMIDIDY" + megatron_index(4, {3}, {0, 1}, 4).substr(7), three, "byte 0: not a Megatron index"},
      {"float", float_idx, three, "byte 17: dtype code 7"},
      {"short", megatron_index(4, {3}, {0, 1}, 4).substr(0, 40), three, "byte 18: 1 sequences and 2 document entries"},
      {"docs", bad_docs, three, "document boundaries must run from 0 to 1"},
      {"trunc", megatron_index(4, {3}, {0, 1}, 4), three.substr(0, 10), "the index implies 12 bytes of tokens, the file has 10"},
  };
  for (const auto& b : bads) {
    INFO(b.name);
    write_bytes(dir + "/" + b.name + ".idx", b.idx);
    write_bytes(dir + "/" + b.name + ".bin", b.bin);
    REQUIRE_THROWS_WITH(check_token_index(dir + "/" + b.name + ".idx"), ContainsText(b.name) && ContainsText(b.message));
    TokenShards with_bad({dir + "/y", dir + "/" + b.name}, "data.text_train", tok, 1, 2);
    CHECK(with_bad.bad_shards() == 1);
    CHECK(with_bad.tokens() == 4);
  }
  // A shard that cannot be opened at all is an error, naming the missing file.
  fs::remove(dir + "/y.bin");
  REQUIRE_THROWS_WITH(TokenShards({dir + "/y"}, "data.text_train", tok, 1, 2),
                      ContainsText("data.text_train") && ContainsText("y.bin"));
  REQUIRE_THROWS_WITH(TokenShards({dir + "/data"}, "data.text_train", tok, 1, 2), ContainsText("holds no token shards"));
}

TEST_CASE("data tokenize writes the stream the in-memory path packs, in order, over shards and threads",
          "[shards]") {
  const std::string dir = testing::fresh_temp_dir("shards_tokenize");
  const auto [corpus, model] = testing::word_corpus_and_tokenizer(dir + "/data");
  const Tokenizer tok(model);
  {
    std::ofstream j(dir + "/more.jsonl");
    j << "{\"text\": \"red coat and blue bag\"}\nnot json\n{\"text\": \"the green dress\"}\n";
  }
  TokenizeOptions o;
  o.inputs = {corpus, dir + "/more.jsonl"};
  o.out_dir = dir + "/shards";
  o.threads = 2;
  o.shard_tokens = 700;  // several shards
  int64_t reports = 0;
  const auto r = tokenize_to_shards(o, tok, [&](const TokenizeResult&, double) { ++reports; });
  const auto docs = read_documents(o.inputs);
  const auto reference = tokenize_documents(docs.documents, tok, 1, 2);
  CHECK(r.documents == static_cast<int64_t>(docs.documents.size()));
  CHECK(r.tokens == reference.numel());
  CHECK(r.skipped == 1);
  CHECK(reports >= 1);
  int64_t files = 0;
  for (const auto& e : fs::directory_iterator(o.out_dir)) files += e.path().extension() == ".idx";
  CHECK(files == r.shards);
  CHECK(r.shards > 2);
  TokenShards s({o.out_dir}, "data.text_train", tok, 1, 2);
  REQUIRE(s.tokens() == reference.numel());
  std::vector<int64_t> got(static_cast<size_t>(s.tokens()));
  s.read(0, s.tokens(), got.data());
  CHECK(torch::equal(torch::tensor(got, torch::kInt64), reference));

  // The same rows as the documents path, and the shard rows' order is a permutation fixed by the seed.
  Config c = testing::tiny_text_config(dir + "/data");
  const PackedText from_docs(o.inputs, "data.text_train", tok, c.model, 16, 5);
  const PackedText from_shards({o.out_dir}, "data.text_train", tok, c.model, 16, 5);
  REQUIRE(from_shards.rows() == from_docs.rows());
  std::vector<int64_t> all(static_cast<size_t>(from_docs.rows()));
  std::iota(all.begin(), all.end(), 0);
  CHECK(torch::equal(from_shards.gather(all), from_docs.gather(all)));
  CHECK(from_shards.streamed());
  CHECK(from_shards.fingerprint().size() == 16);

  // Refusals: shards already there, a tokenizer the shards were not made with, a mixed key.
  REQUIRE_THROWS_WITH(tokenize_to_shards(o, tok, nullptr), ContainsText("already holds shards"));
  REQUIRE_THROWS_WITH(TokenShards({o.out_dir}, "data.text_train", tok, 1, 3),
                      ContainsText("were tokenized with") && ContainsText("EOS 2") && ContainsText("EOS 3"));
  REQUIRE_THROWS_WITH(PackedText({o.out_dir, corpus}, "data.text_train", tok, c.model, 16, 5),
                      ContainsText("mixes document files and token shards"));
  TokenizeOptions bad = o;
  bad.inputs = {dir + "/none.txt"};
  bad.out_dir = dir + "/other";
  REQUIRE_THROWS_WITH(tokenize_to_shards(bad, tok, nullptr), ContainsText("none.txt") && ContainsText("cannot open"));
  CHECK_FALSE(fs::exists(bad.out_dir));
}

TEST_CASE("shard rows with ids beyond the vocabulary are skipped for the next row, named and counted", "[shards]") {
  const std::string dir = testing::fresh_temp_dir("shards_badrows");
  Config c = testing::tiny_text_config(dir + "/data");
  const Tokenizer tok(c.data.tokenizer);
  {
    TokenShardWriter w(dir + "/s", TokenDType::kUInt16);
    w.add_document({1, 15, 16, 2});   // row 0
    w.add_document({1, 999, 16, 2});  // row 1: 999 >= vocab 320
    w.add_document({1, 17, 18, 2});   // row 2
    w.add_document({1, 19, 6, 2});    // row 3: 6 = <gen_image>, a placeholder text never holds
    w.finish();
  }
  const PackedText p({dir + "/s.idx"}, "data.text_train", tok, c.model, 4, 1);
  REQUIRE(p.rows() == 4);
  int64_t bad = 0;
  auto rows = p.gather({0, 1, 2, 3}, &bad);
  CHECK(bad == 2);
  CHECK(torch::equal(rows[1], torch::tensor({1, 17, 18, 2}, torch::kInt64)));  // row 1 replaced by row 2
  CHECK(torch::equal(rows[3], torch::tensor({1, 15, 16, 2}, torch::kInt64)));  // row 3 by row 0 (wrapping)

  // In training: a folder with this shard and a corrupt one. Each step reads the 4 rows once (an epoch): two bad
  // rows per step and the corrupt shard are counted in metrics.jsonl, and the run goes on.
  fs::create_directories(dir + "/folder");
  for (const char* ext : {".bin", ".idx"}) fs::copy_file(dir + "/s" + ext, dir + "/folder/s" + ext);
  write_bytes(dir + "/folder/zz.idx", "MMIDIDX");
  write_bytes(dir + "/folder/zz.bin", "");
  c.data.text_train = {dir + "/folder"};
  c.data.text_valid = {};
  c.train.seq_len = 4;
  c.train.batch_size = 4;
  c.train.steps = 2;
  c.train.ckpt_every = 2;
  TrainRunOptions run;
  run.out_dir = dir + "/run";
  train(c, run);
  const auto m = testing::metrics_of(run.out_dir);
  REQUIRE(m.size() == 2);
  for (const auto& line : m) {
    CHECK(line["data_bad_rows"].get<double>() == 2);
    CHECK(line["data_bad_shards"].get<double>() == 1);
  }
}

TEST_CASE("permuted_index is a permutation of 0..n-1 for any n and fixed by seed and epoch", "[shards]") {
  for (int64_t n : {1, 2, 3, 5, 17, 1000, 4097}) {
    INFO("n = " << n);
    std::set<int64_t> seen;
    std::vector<int64_t> e0, e1, again;
    for (int64_t i = 0; i < n; ++i) {
      e0.push_back(permuted_index(i, n, 9, 0));
      e1.push_back(permuted_index(i, n, 9, 1));
      again.push_back(permuted_index(i, n, 9, 0));
      seen.insert(e0.back());
    }
    CHECK(static_cast<int64_t>(seen.size()) == n);
    CHECK(*seen.begin() == 0);
    CHECK(*seen.rbegin() == n - 1);
    CHECK(e0 == again);
    if (n >= 17) CHECK(e0 != e1);
  }
  // not the identity: over 1000 items, few fixed points (a random permutation has about 1)
  int64_t fixed = 0;
  for (int64_t i = 0; i < 1000; ++i) fixed += permuted_index(i, 1000, 3, 0) == i;
  CHECK(fixed < 10);
}

TEST_CASE("a run streaming token shards with loader threads resumes exactly and records its stream", "[shards][train]") {
  const std::string dir = testing::fresh_temp_dir("shards_resume");
  Config c = testing::tiny_text_config(dir + "/data");
  const Tokenizer tok(c.data.tokenizer);
  TokenizeOptions o;
  o.inputs = c.data.text_train;
  o.out_dir = dir + "/shards";
  o.shard_tokens = 1000;
  tokenize_to_shards(o, tok, nullptr);
  c.data.text_train = {o.out_dir};
  c.data.text_valid = {o.out_dir};
  c.train.batch_size = 4;
  c.train.seq_len = 32;
  c.train.steps = 8;
  c.train.ckpt_every = 4;
  c.train.loader_threads = 2;
  c.train.document_masks = true;
  const auto [ma, mb] = testing::straight_and_resumed(c, dir, 4);
  REQUIRE(ma.size() == 8);
  REQUIRE(mb.size() == 8);
  for (size_t i = 0; i < 8; ++i) {
    INFO("step " << i + 1);
    CHECK(mb[i]["loss"].get<double>() == ma[i]["loss"].get<double>());
    CHECK(ma[i]["data_bad_rows"].get<double>() == 0);
    CHECK(ma[i]["data_bad_shards"].get<double>() == 0);
  }
  CHECK(ma.back()["loss_clm"].get<double>() < ma.front()["loss_clm"].get<double>());
  std::ifstream sf(dir + "/a/checkpoints/step_0000008/state.json");
  const auto state = nlohmann::json::parse(sf);
  CHECK(state["data"]["data.text_train"].get<std::string>() ==
        PackedText({o.out_dir}, "data.text_train", tok, c.model, 32, 1).fingerprint());
  CHECK(state["micro_batches"].get<int64_t>() == 8);
}
