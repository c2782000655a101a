// Config parsing: the card import equals configs/omni-lite.json field by field, and every validation rule
// produces its message (key, value, rule).
#include "catch_compat.h"
#include <nlohmann/json.hpp>

#include <fstream>

#include "helpers.h"

using nlohmann::json;
using omnilite::ConfigError;

namespace {

json read_json(const std::string& rel) {
  std::ifstream f(testing::source_path(rel));
  return json::parse(f);
}

// Parses `base` with `patch` applied (JSON merge patch) and returns the error message, or "" if none.
std::string error_of(json base, const json& patch) {
  base.merge_patch(patch);
  try {
    omnilite::parse_config(base);
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "";
}

void flatten(const json& j, const std::string& prefix, std::map<std::string, json>& out) {
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string k = prefix.empty() ? it.key() : prefix + "." + it.key();
    if (it->is_object()) flatten(*it, k, out);
    else out[k] = *it;
  }
}

}  // namespace

TEST_CASE("every config in configs/ parses", "[config]") {
  for (const char* name : {"configs/omni-lite.json", "configs/tiny.json", "configs/small.json"}) {
    INFO(name);
    REQUIRE_NOTHROW(testing::load(name));
  }
}

TEST_CASE("the design card builds the same model config as configs/omni-lite.json", "[config][spec]") {
  // The card lives in ../shared/spec beside the checkout; docs/spec holds a verbatim copy for clones without it.
  std::string card = testing::source_path("../shared/spec/omni-lite.spec.json");
  if (std::ifstream(card)) {
    CHECK(read_json("../shared/spec/omni-lite.spec.json") == read_json("docs/spec/omni-lite.spec.json"));
  } else {
    WARN("../shared/spec/omni-lite.spec.json not found; testing the copy in docs/spec");
    card = testing::source_path("docs/spec/omni-lite.spec.json");
  }
  const auto spec = omnilite::load_config_file(card);
  const auto full = testing::load("configs/omni-lite.json");
  std::map<std::string, json> a, b;
  flatten(omnilite::to_json(spec)["model"], "model", a);
  flatten(omnilite::to_json(full)["model"], "model", b);
  REQUIRE(a.size() == b.size());
  REQUIRE(a.size() > 40);
  for (const auto& [k, v] : b) {
    INFO("field " << k << ": card gives " << a[k] << ", configs/omni-lite.json gives " << v);
    CHECK(a.at(k) == v);
  }
  // Spot-check values read from the card itself.
  CHECK(spec.model.vision.patch_size == 14);
  CHECK(spec.model.text.num_kv_heads == 8);
  CHECK(spec.model.flow_token_dim() == 64);
}

TEST_CASE("config errors name the key, the value and the rule", "[config][errors]") {
  const json base = read_json("configs/omni-lite.json");
  struct Case {
    json patch;
    std::vector<std::string> expect;  // substrings of the message
  };
  const std::vector<Case> cases = {
      {{{"model", {{"text", {{"hiden_size", 2048}}}}}}, {"unknown key model.text.hiden_size", "hidden_size"}},
      {{{"modle", json::object()}}, {"unknown key modle"}},
      {{{"model", {{"text", {{"num_heads", "32"}}}}}}, {"model.text.num_heads", "expected an integer", "\"32\""}},
      {{{"model", {{"text", {{"rope_theta", "big"}}}}}}, {"model.text.rope_theta", "expected a number"}},
      {{{"model", {{"text", {{"tie_word_embeddings", 1}}}}}}, {"model.text.tie_word_embeddings", "true or false"}},
      {{{"model", {{"text", {{"num_heads", 24}}}}}}, {"model.text.head_dim = 64", "24 * 64", "hidden_size = 2048"}},
      {{{"model", {{"text", {{"num_kv_heads", 5}}}}}}, {"model.text.num_kv_heads = 5", "must divide", "num_heads = 32"}},
      {{{"model", {{"moe", {{"top_k", 17}}}}}}, {"model.moe.top_k = 17", "num_experts = 16"}},
      {{{"model", {{"text", {{"rope_dim", 96}}}}}}, {"model.text.rope_dim = 96", "head_dim = 64"}},
      {{{"model", {{"text", {{"rope_dim", 33}}}}}}, {"model.text.rope_dim = 33", "even"}},
      {{{"model", {{"vision", {{"num_heads", 15}}}}}}, {"model.vision.num_heads = 15", "model.vision.width = 1024"}},
      {{{"model", {{"vision", {{"image_size", 225}}}}}}, {"model.vision.image_size = 225", "multiple", "14"}},
      {{{"model", {{"resampler", {{"num_heads", 3}}}}}}, {"model.resampler.num_heads = 3", "hidden_size = 2048"}},
      {{{"model", {{"moe", {{"num_experts", 0}}}}}}, {"model.moe.num_experts = 0", "positive"}},
      {{{"model", {{"tokens", {{"image_id", 32000}}}}}}, {"model.tokens.image_id = 32000", "vocab_size = 32000"}},
      {{{"runtime", {{"device", "tpu"}}}}, {"runtime.device = \"tpu\"", "cuda:N"}},
      {{{"runtime", {{"dtype", "fp8"}}}}, {"runtime.dtype = \"fp8\""}},
      {{{"runtime", {{"blas_threads", -1}}}}, {"runtime.blas_threads = -1", "0 = all cores"}},
      {{{"runtime", {{"moe_dispatch", "fast"}}}}, {"runtime.moe_dispatch = \"fast\"", "\"grouped\""}},
      {{{"model", {{"text", 5}}}}, {"model.text must be an object"}},
  };
  for (const auto& c : cases) {
    const std::string msg = error_of(base, c.patch);
    INFO("patch " << c.patch.dump() << " -> \"" << msg << "\"");
    REQUIRE_FALSE(msg.empty());
    for (const auto& s : c.expect) CHECK(msg.find(s) != std::string::npos);
  }
}

TEST_CASE("file errors name the file", "[config][errors]") {
  REQUIRE_THROWS_WITH(omnilite::load_config_file("/nonexistent/x.json"),
                      ContainsText("cannot open file \"/nonexistent/x.json\""));
  const std::string bad = "/tmp/omnilite_test_bad.json";
  std::ofstream(bad) << "{\"model\": {";
  REQUIRE_THROWS_WITH(omnilite::load_config_file(bad), ContainsText("is not valid JSON"));
  std::ofstream(bad) << R"({"layers": [{"type": "Conv2d", "params": {"in_channels": 3}}]})";
  REQUIRE_THROWS_WITH(omnilite::load_config_file(bad), ContainsText("spec: layers[0]") &&
                                                           ContainsText("out_channels") &&
                                                           ContainsText(bad));
}
