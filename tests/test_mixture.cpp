// Data mixtures (data.mixture): the source picked per item against its weights (a binomial bound), a one-source
// mixture against the plain keys (the same losses, the same conversation rows), the realised shares in
// metrics.jsonl, exact resume of a run that mixes documents with token shards, IDX images with tar shards and two
// conversation sets, and the config's errors.
#include "catch_compat.h"

#include <cmath>
#include <filesystem>

#include "helpers.h"
#include "omnilite/data/image_dataset.h"
#include "omnilite/data/chat.h"
#include "omnilite/data/mm_batch.h"
#include "omnilite/data/sft_batch.h"
#include "omnilite/data/token_shards.h"

using namespace omnilite;
namespace fs = std::filesystem;

TEST_CASE("SourceMixture picks each source in proportion to its weight, from the item index alone", "[mixture]") {
  const SourceMixture m({3.0, 1.0, 4.0}, 11), same({3.0, 1.0, 4.0}, 11), other({3.0, 1.0, 4.0}, 12);
  const int64_t n = 80000;
  std::vector<int64_t> count(3, 0);
  int64_t differ = 0;
  for (int64_t k = 0; k < n; ++k) {
    ++count[m.pick(k)];
    CHECK(m.pick(k) == same.pick(k));
    differ += m.pick(k) != other.pick(k);
  }
  for (auto [j, p] : {std::pair<int, double>{0, 3.0 / 8}, {1, 1.0 / 8}, {2, 4.0 / 8}}) {
    INFO("source " << j);
    const double sigma = std::sqrt(p * (1 - p) / n);
    CHECK(std::abs(static_cast<double>(count[static_cast<size_t>(j)]) / n - p) < 5 * sigma);
  }
  CHECK(differ > n / 2);  // another seed is another draw
  const SourceMixture one({2.5}, 3);
  for (int64_t k = 0; k < 100; ++k) CHECK(one.pick(k) == 0);
}

TEST_CASE("a mixture of documents and token shards, IDX images and tar shards logs its shares and resumes exactly",
          "[mixture][train]") {
  if (!have_opencv()) return;
  const std::string dir = testing::fresh_temp_dir("mixture");
  Config c = testing::tiny_multimodal_config(dir + "/data");
  c.train.gen_batch_size = 0;
  c.train.steps = 6;
  c.train.ckpt_every = 3;
  c.train.loader_threads = 2;
  c.train.batch_size = 4;

  // one-source mixtures draw what the plain keys draw
  Config plain = c;
  plain.train.steps = 3;
  Config one = plain;
  one.data.mixture = {{"words", "text", c.data.text_train, 2.0}, {"fm", "images", c.data.image_train, 1.0}};
  one.data.text_train = {};
  one.data.image_train = {};
  TrainRunOptions pa, oa;
  pa.out_dir = dir + "/plain";
  oa.out_dir = dir + "/one";
  train(plain, pa);
  train(one, oa);
  const auto mp = testing::metrics_of(pa.out_dir), mo = testing::metrics_of(oa.out_dir);
  REQUIRE(mp.size() == 3);
  REQUIRE(mo.size() == 3);
  for (size_t s = 0; s < 3; ++s) CHECK(mo[s]["loss"].get<double>() == mp[s]["loss"].get<double>());
  CHECK_FALSE(mo[0].contains("mix_words"));  // one source per kind: nothing to report

  // two sources of each kind, each of another form
  TokenizeOptions o;
  o.inputs = c.data.text_train;
  o.out_dir = dir + "/shards";
  tokenize_to_shards(o, Tokenizer(c.data.tokenizer), nullptr);
  ImageLoadOptions io;
  io.size = 28;
  ImageShardWriteOptions w;
  w.out_dir = dir + "/tar";
  write_image_shards(read_image_captions(c.data.image_valid, io), w);
  c.data.mixture = {{"docs", "text", c.data.text_train, 3.0},
                    {"shards", "text", {o.out_dir}, 1.0},
                    {"idx", "images", c.data.image_train, 1.0},
                    {"tar", "images", {w.out_dir}, 1.0}};
  const auto [ma, mb] = testing::straight_and_resumed(c, dir, 3);
  REQUIRE(ma.size() == 6);
  REQUIRE(mb.size() == 6);
  // the shares against the picks of the items of each step (global items m * B + i)
  const SourceMixture text_mix({3.0, 1.0}, splitmix64(c.train.seed ^ 0x7E77ULL));
  const SourceMixture image_mix({1.0, 1.0}, splitmix64(c.train.seed ^ 0x313ULL));
  double docs = 0;
  for (size_t m = 0; m < 6; ++m) {
    INFO("step " << m + 1);
    CHECK(mb[m]["loss"].get<double>() == ma[m]["loss"].get<double>());
    int64_t want_docs = 0, want_idx = 0;
    for (int64_t i = 0; i < c.train.batch_size; ++i)
      want_docs += text_mix.pick(static_cast<int64_t>(m) * c.train.batch_size + i) == 0;
    for (int64_t i = 0; i < c.train.caption_batch_size; ++i)
      want_idx += image_mix.pick(static_cast<int64_t>(m) * c.train.caption_batch_size + i) == 0;
    CHECK(ma[m]["mix_docs"].get<double>() == Approx(static_cast<double>(want_docs) / c.train.batch_size));
    CHECK(ma[m]["mix_docs"].get<double>() + ma[m]["mix_shards"].get<double>() == Approx(1.0));
    CHECK(ma[m]["mix_idx"].get<double>() == Approx(static_cast<double>(want_idx) / c.train.caption_batch_size));
    CHECK(ma[m]["mix_idx"].get<double>() + ma[m]["mix_tar"].get<double>() == Approx(1.0));
    docs += ma[m]["mix_docs"].get<double>();
  }
  CHECK(docs > 0);
  CHECK(docs < 6);
  std::ifstream sf(dir + "/a/checkpoints/step_0000006/state.json");
  const auto state = nlohmann::json::parse(sf);
  CHECK(state["data"].contains("data.mixture.shards"));
  CHECK(state["data"].contains("data.mixture.tar"));
}

TEST_CASE("data.mixture errors name the entry, the value and the rule", "[mixture][config]") {
  auto with = [](const std::string& mixture) {
    auto j = read_config_json(testing::source_path("configs/tiny.json"));
    j["data"]["mixture"] = nlohmann::json::parse(mixture);
    return [j] { validate(parse_config(j)); };
  };
  REQUIRE_THROWS_WITH(with(R"([{"name": "a", "kind": "video", "sources": ["x"]}])")(),
                      ContainsText("data.mixture[0].kind") && ContainsText(R"("text", "images" or "sft")"));
  REQUIRE_THROWS_WITH(with(R"([{"name": "a", "kind": "sft", "sources": ["x.jsonl"]}])")(),
                      ContainsText("train.sft_batch_size is 0"));
  REQUIRE_THROWS_WITH(with(R"([{"name": "a", "sources": ["x"]}, {"name": "a", "sources": ["y"]}])")(),
                      ContainsText("data.mixture[1].name") && ContainsText("twice"));
  REQUIRE_THROWS_WITH(with(R"([{"name": "Web", "sources": ["x"]}])")(), ContainsText("a-z, 0-9 and _"));
  REQUIRE_THROWS_WITH(with(R"([{"name": "a", "sources": ["x"], "weight": 0}])")(),
                      ContainsText("data.mixture[0].weight") && ContainsText("positive"));
  REQUIRE_THROWS_WITH(with(R"([{"name": "a", "sources": []}])")(), ContainsText("data.mixture[0].sources"));
  REQUIRE_THROWS_WITH(with(R"([{"name": "a", "source": ["x"]}])")(), ContainsText("unknown key data.mixture[0].source"));
  REQUIRE_NOTHROW(with(R"([{"name": "a", "sources": ["x"], "weight": 0.5}, {"name": "b_2", "sources": ["y"]}])")());
}

TEST_CASE("conversation sets mix by weight: rows never mix sets, one set serves the rows of data.sft_train",
          "[mixture][sft]") {
  const std::string dir = testing::fresh_temp_dir("mixture_sft");
  Config cfg = testing::tiny_text_config(dir);
  for (const char* name : {"a", "b"}) {
    std::ofstream f(dir + "/" + name + ".jsonl");
    for (int i = 0; i < 5; ++i)
      f << nlohmann::json{{"instruction", std::string(name) + " question " + std::to_string(i)},
                          {"output", std::string(name) + " answer"}}.dump()
        << "\n";
  }
  cfg.train.sft_batch_size = 4;
  cfg.train.sft_seq_len = 40;
  cfg.train.sft_packing = true;
  const Tokenizer tok(cfg.data.tokenizer);
  const auto a = read_chat_records({dir + "/a.jsonl"}), b = read_chat_records({dir + "/b.jsonl"});
  // one set of weight 1: the rows of the single-set sampler
  const SftSampler single(a, "data.sft_train", tok, cfg.model, cfg.train, 5);
  const SftSampler one({&a}, {1.0}, {"data.mixture.a"}, tok, cfg.model, cfg.train, 5);
  for (int64_t m = 0; m < 6; ++m) CHECK(torch::equal(one.get(m).tokens, single.get(m).tokens));
  // two sets, 1 : 3: the counts follow SourceMixture's picks, and a row holds the samples of one set only
  const SftSampler mixed({&a, &b}, {1.0, 3.0}, {"data.mixture.a", "data.mixture.b"}, tok, cfg.model, cfg.train, 5);
  const SourceMixture picks({1.0, 3.0}, splitmix64(5 ^ 0x5F7AULL));
  int64_t from_b = 0;
  for (int64_t m = 0; m < 50; ++m) {
    const auto batch = mixed.get(m);
    int64_t want_b = 0;
    for (int64_t i = 0; i < 4; ++i) want_b += picks.pick(m * 4 + i) == 1;
    REQUIRE(batch.source_counts.size() == 2);
    CHECK(batch.source_counts[1] == want_b);
    CHECK(batch.source_counts[0] + batch.source_counts[1] == 4);
    from_b += want_b;
    int64_t rows_b = 0;
    for (int64_t r = 0; r < 4; ++r) {
      const auto row = batch.tokens[r].contiguous();
      const std::string text = tok.decode(std::vector<int64_t>(row.data_ptr<int64_t>(), row.data_ptr<int64_t>() + 40));
      const bool has_a = text.find("a question") != std::string::npos, has_b = text.find("b question") != std::string::npos;
      CHECK(has_a != has_b);  // a packed row holds samples of one set
      rows_b += has_b;
    }
    CHECK(rows_b == want_b);
  }
  CHECK(std::abs(static_cast<double>(from_b) / 200 - 0.75) < 5 * std::sqrt(0.75 * 0.25 / 200));
}
