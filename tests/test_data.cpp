// Data readers against hand-written files: IDX bytes, fortune-style .txt, .jsonl with bad lines, packing, shuffling.
#include "catch_compat.h"

#include <filesystem>
#include <fstream>
#include <set>

#include "helpers.h"
#include "omnilite/data/idx.h"
#include "omnilite/data/text_dataset.h"

using namespace omnilite;
namespace fs = std::filesystem;

TEST_CASE("IDX images and labels are read as written", "[data][idx]") {
  const auto dir = testing::fresh_temp_dir("idx");
  // 2 images of 2x3: magic 0x00000803, dims 2, 2, 3, then bytes 0..11
  std::vector<unsigned char> img = {0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 3};
  for (unsigned char i = 0; i < 12; ++i) img.push_back(i * 10);
  std::ofstream(dir + "/img", std::ios::binary).write(reinterpret_cast<const char*>(img.data()), img.size());
  auto t = read_idx(dir + "/img");
  REQUIRE(t.sizes() == torch::IntArrayRef({2, 2, 3}));
  CHECK(t[1][0][2].item<uint8_t>() == 80);  // element 8
  std::vector<unsigned char> lab = {0, 0, 8, 1, 0, 0, 0, 3, 9, 0, 4};
  std::ofstream(dir + "/lab", std::ios::binary).write(reinterpret_cast<const char*>(lab.data()), lab.size());
  CHECK(torch::equal(read_idx(dir + "/lab"), torch::tensor({9, 0, 4}, torch::kUInt8)));

  img.resize(img.size() - 5);
  std::ofstream(dir + "/short", std::ios::binary).write(reinterpret_cast<const char*>(img.data()), img.size());
  REQUIRE_THROWS_WITH(read_idx(dir + "/short"), ContainsText("short") && ContainsText("truncated") &&
                                                     ContainsText("7 of the 12"));
  std::ofstream(dir + "/gz", std::ios::binary) << "\x1f\x8b\x08\x00garbage";
  REQUIRE_THROWS_WITH(read_idx(dir + "/gz"), ContainsText("magic number"));
}

TEST_CASE("Fashion-MNIST captions name the class", "[data][idx]") {
  CHECK(fashion_mnist_classes().size() == 10);
  CHECK(fashion_caption(9, 0) == "a photo of a ankle boot.");
  CHECK(fashion_caption(1, 3) == "this is a trouser.");
  CHECK(fashion_caption(1, 3 + fashion_caption_templates()) == fashion_caption(1, 3));
  REQUIRE_THROWS_WITH(fashion_caption(10, 0), ContainsText("label 10"));
}

TEST_CASE("documents from .txt (fortune format) and .jsonl, bad lines skipped and counted", "[data][text]") {
  const auto dir = testing::fresh_temp_dir("docs");
  std::ofstream(dir + "/a.txt") << "first line\nsecond line\n%\nanother fortune\n%\n";
  std::ofstream(dir + "/b.jsonl") << "{\"text\": \"json doc\"}\n{not json\n\n{\"txt\": \"wrong key\"}\n"
                                     "{\"text\": \"last\"}\n";
  auto set = read_documents({dir + "/a.txt", dir + "/b.jsonl"});
  REQUIRE(set.documents.size() == 4);
  CHECK(set.documents[0] == "first line\nsecond line");
  CHECK(set.documents[1] == "another fortune");
  CHECK(set.documents[2] == "json doc");
  CHECK(set.documents[3] == "last");
  CHECK(set.skipped == 2);
  REQUIRE_THROWS_WITH(read_documents({dir + "/none.txt"}), ContainsText("none.txt") && ContainsText("cannot open"));
  REQUIRE_THROWS_WITH(read_documents({dir + "/x.csv"}), ContainsText("unknown extension"));
}

TEST_CASE("packing cuts fixed rows and refuses an empty dataset", "[data][text]") {
  auto stream = torch::arange(10, torch::kInt64);
  auto rows = pack_sequences(stream, 4, "train");
  REQUIRE(rows.sizes() == torch::IntArrayRef({2, 4}));
  CHECK(rows[1][0].item<int64_t>() == 4);
  REQUIRE_THROWS_WITH(pack_sequences(torch::arange(3, torch::kInt64), 4, "train text"),
                      ContainsText("train text: 3 tokens do not fill one sequence of 4"));
}

TEST_CASE("epoch permutations are permutations, fixed by seed and epoch", "[data]") {
  auto a = epoch_permutation(100, 7, 0), b = epoch_permutation(100, 7, 0), c = epoch_permutation(100, 7, 1);
  CHECK(a == b);
  CHECK(a != c);
  CHECK(std::set<int64_t>(a.begin(), a.end()).size() == 100);
  CHECK(*std::max_element(a.begin(), a.end()) == 99);
}
