// safetensors I/O against the format's definition (bytes read back by hand), atomic writes, and refusal of
// truncated, corrupted and mismatched files.
#include "catch_compat.h"
#include <nlohmann/json.hpp>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>

#include "helpers.h"
#include "omnilite/io/checkpoint.h"
#include "omnilite/modules/omnilite.h"

using namespace omnilite;
namespace fs = std::filesystem;

namespace {

std::vector<char> read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

void write_bytes(const std::string& path, const std::vector<char>& b) {
  std::ofstream(path, std::ios::binary).write(b.data(), static_cast<std::streamsize>(b.size()));
}

}  // namespace

TEST_CASE("safetensors layout follows the format definition", "[io]") {
  const auto dir = testing::fresh_temp_dir("layout");
  const auto path = dir + "/a.safetensors";
  auto a = torch::arange(6, torch::kFloat32).view({2, 3});
  auto b = torch::tensor(std::vector<int64_t>{7, -1});
  io::save_safetensors(path, {{"a", a}, {"b.c", b}}, {{"note", "hi"}});
  const auto bytes = read_bytes(path);
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  REQUIRE((8 + n) % 8 == 0);
  auto header = nlohmann::json::parse(bytes.begin() + 8, bytes.begin() + 8 + static_cast<long>(n));
  CHECK(header["a"]["dtype"] == "F32");
  CHECK(header["a"]["shape"] == nlohmann::json::array({2, 3}));
  CHECK(header["b.c"]["dtype"] == "I64");
  CHECK(header["__metadata__"]["note"] == "hi");
  CHECK(bytes.size() == 8 + n + 6 * 4 + 2 * 8);
  // The raw data of "a" at its offsets are the little-endian floats 0..5.
  const auto off = header["a"]["data_offsets"][0].get<size_t>();
  for (int i = 0; i < 6; ++i) {
    float v;
    std::memcpy(&v, bytes.data() + 8 + n + off + 4 * i, 4);
    CHECK(v == static_cast<float>(i));
  }
  io::SafetensorsReader r(path);
  CHECK(torch::equal(r.load("a"), a));
  CHECK(torch::equal(r.load("b.c"), b));
  CHECK(r.metadata().at("note") == "hi");
  REQUIRE_NOTHROW(r.verify_checksum());
  CHECK_FALSE(fs::exists(path + ".tmp"));
}

TEST_CASE("bf16 and CRC-32 check values", "[io]") {
  // CRC-32 of "123456789" is 0xCBF43926 (the standard check value).
  const std::string s = "123456789";
  CHECK(io::crc32_update(0, reinterpret_cast<const uint8_t*>(s.data()), s.size()) == 0xCBF43926u);
  const auto path = testing::fresh_temp_dir("bf16") + "/b.safetensors";
  auto t = torch::randn({4, 5}).to(torch::kBFloat16);
  io::save_safetensors(path, {{"w", t}});
  io::SafetensorsReader r(path);
  CHECK(r.tensors().at("w").dtype == torch::kBFloat16);
  CHECK(torch::equal(r.load("w"), t));
}

TEST_CASE("truncated and corrupted files are refused with their name", "[io][errors]") {
  const auto dir = testing::fresh_temp_dir("bad");
  const auto path = dir + "/m.safetensors";
  io::save_safetensors(path, {{"w", torch::randn({64})}});
  auto bytes = read_bytes(path);

  auto truncated = bytes;
  truncated.resize(bytes.size() - 10);
  write_bytes(dir + "/t.safetensors", truncated);
  REQUIRE_THROWS_WITH(io::SafetensorsReader(dir + "/t.safetensors"),
                      ContainsText("t.safetensors") && ContainsText("truncated"));

  auto corrupted = bytes;
  corrupted[corrupted.size() - 3] ^= 0x40;
  write_bytes(dir + "/c.safetensors", corrupted);
  io::SafetensorsReader r(dir + "/c.safetensors");
  REQUIRE_THROWS_WITH(r.verify_checksum(), ContainsText("c.safetensors") && ContainsText("corrupted"));

  write_bytes(dir + "/e.safetensors", {'x', 'y'});
  REQUIRE_THROWS_WITH(io::SafetensorsReader(dir + "/e.safetensors"), ContainsText("truncated or not safetensors"));
  REQUIRE_THROWS_WITH(io::SafetensorsReader(dir + "/none.safetensors"), ContainsText("cannot open"));
}

TEST_CASE("a failed write leaves the previous file intact", "[io]") {
  const auto dir = testing::fresh_temp_dir("atomic");
  const auto path = dir + "/m.safetensors";
  auto old = torch::randn({8});
  io::save_safetensors(path, {{"w", old}});
  {
    io::SafetensorsWriter w(path, {{"w", torch::kFloat32, {8}}, {"v", torch::kFloat32, {2}}});
    w.write("w", torch::zeros({8}));
    REQUIRE_THROWS_WITH(w.write("v", torch::zeros({3})), ContainsText("expected tensor \"v\""));
    REQUIRE_THROWS(w.commit());
  }  // abandoned writer
  CHECK_FALSE(fs::exists(path + ".tmp"));
  CHECK(torch::equal(io::SafetensorsReader(path).load("w"), old));
}

TEST_CASE("model checkpoints round-trip and strict loading names the tensor", "[io][model]") {
  auto cfg = testing::load("configs/tiny.json").model;
  const auto dir = testing::fresh_temp_dir("model");
  torch::manual_seed(1);
  OmniLite a(cfg);
  io::save_module(*a, dir + "/model.safetensors");
  torch::manual_seed(2);
  OmniLite b(cfg);
  io::load_module(*b, dir + "/model.safetensors");
  auto pa = a->named_parameters(), pb = b->named_parameters();
  REQUIRE(pa.size() == pb.size());
  for (const auto& p : pa) CHECK(torch::equal(p.value(), pb[p.key()]));

  auto tensors = io::state_tensors(*a);
  auto drop = tensors;
  drop.erase(drop.begin() + 3);
  io::save_safetensors(dir + "/missing.safetensors", drop);
  REQUIRE_THROWS_WITH(io::load_module(*b, dir + "/missing.safetensors"),
                      ContainsText("missing tensor \"" + tensors[3].first + "\""));
  auto extra = tensors;
  extra.emplace_back("text.layers.9.extra", torch::zeros({1}));
  io::save_safetensors(dir + "/extra.safetensors", extra);
  REQUIRE_THROWS_WITH(io::load_module(*b, dir + "/extra.safetensors"),
                      ContainsText("unexpected tensor \"text.layers.9.extra\""));
  auto shaped = tensors;
  shaped[0].second = torch::zeros({3});
  io::save_safetensors(dir + "/shape.safetensors", shaped);
  REQUIRE_THROWS_WITH(io::load_module(*b, dir + "/shape.safetensors"),
                      ContainsText("\"" + tensors[0].first + "\" has shape [3]"));
}

namespace {

// A safetensors file of a hand-written header and `data` bytes of data region (the header padded to 8 bytes).
std::string handmade(const std::string& dir, const std::string& name, std::string header, size_t data) {
  while ((8 + header.size()) % 8 != 0) header.push_back(' ');
  std::vector<char> b(8, 0);
  const uint64_t n = header.size();
  std::memcpy(b.data(), &n, 8);
  b.insert(b.end(), header.begin(), header.end());
  b.insert(b.end(), data, '\0');
  write_bytes(dir + "/" + name, b);
  return dir + "/" + name;
}

}  // namespace

TEST_CASE("safetensors headers that break the format are refused, naming the file and the tensor", "[io][errors]") {
  const auto dir = testing::fresh_temp_dir("bad_headers");
  struct Case {
    const char* name;    // file name
    std::string header;  // the JSON header
    size_t data;         // bytes of data region
    std::vector<std::string> expect;  // what the message must say
  };
  const std::vector<Case> cases = {
      {"short_offsets", R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0]}})", 4, {"\"w\"", "data_offsets must be [begin, end]"}},
      {"wrap", R"({"w":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,0]}})", 0,
       {"\"w\"", "more bytes than 2^64"}},
      {"negative", R"({"w":{"dtype":"F32","shape":[-2,-2],"data_offsets":[0,16]}})", 16,
       {"\"w\"", "non-negative integer", "-2"}},
      {"float_dim", R"({"w":{"dtype":"F32","shape":[2.5],"data_offsets":[0,8]}})", 8, {"\"w\"", "non-negative integer"}},
      {"overlap", R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
       8, {"overlap"}},
      {"gap", R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})",
       12, {"\"b\"", "gap"}},
      {"tail", R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", 12, {"cover 4 bytes", "holds 12"}},
      {"dtype_number", R"({"w":{"dtype":7,"shape":[1],"data_offsets":[0,4]}})", 4, {"\"w\"", "dtype must be a string"}},
      {"dtype_unknown", R"({"w":{"dtype":"F8_E4M3","shape":[1],"data_offsets":[0,1]}})", 1, {"\"w\"", "F8_E4M3"}},
      {"shape_string", R"({"w":{"dtype":"F32","shape":"4","data_offsets":[0,4]}})", 4, {"\"w\"", "shape must be an array"}},
      {"past_end", R"({"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", 8, {"\"w\"", "truncated"}},
      {"wrong_bytes", R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8, {"\"w\"", "need 12"}},
      {"metadata_number", R"({"__metadata__":{"k":1},"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})", 1,
       {"__metadata__", "\"k\"", "string"}},
      {"not_object", R"([1,2,3])", 0, {"does not start with '{'"}},
      {"bad_json", R"({"w":)", 0, {"not valid JSON"}},
      {"entry_not_object", R"({"w":5})", 0, {"\"w\"", "lacks dtype"}},
  };
  for (const auto& c : cases) {
    INFO(c.name << ": " << c.header);
    const auto path = handmade(dir, std::string(c.name) + ".safetensors", c.header, c.data);
    std::string msg;
    try {
      io::SafetensorsReader r(path);
    } catch (const std::runtime_error& e) {
      msg = e.what();
    }
    INFO("message: " << msg);
    CHECK(msg.find(std::string(c.name) + ".safetensors") != std::string::npos);
    for (const auto& e : c.expect) CHECK(msg.find(e) != std::string::npos);
  }
  // The header length itself: past the file, and above the 100 MiB limit.
  std::vector<char> b(16, 0);
  const uint64_t huge = uint64_t{1} << 40;
  std::memcpy(b.data(), &huge, 8);
  write_bytes(dir + "/huge.safetensors", b);
  CHECK_THROWS_WITH(io::SafetensorsReader(dir + "/huge.safetensors"), ContainsText("huge.safetensors") &&
                                                                           ContainsText("header length"));
  // A well-formed file of the same shapes still loads, with zero-sized tensors between others.
  const auto ok = handmade(dir, "ok.safetensors",
                           R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"e":{"dtype":"F32","shape":[0,3],"data_offsets":[4,4]},"b":{"dtype":"U8","shape":[2],"data_offsets":[4,6]}})",
                           6);
  io::SafetensorsReader r(ok);
  CHECK(r.load("e").sizes().vec() == std::vector<int64_t>{0, 3});
  CHECK(r.load("b").sizes().vec() == std::vector<int64_t>{2});
}

TEST_CASE("loading refuses a tensor whose dtype cannot convert, and converts floating-point ones", "[io][errors]") {
  const auto dir = testing::fresh_temp_dir("dtype_load");
  torch::nn::Linear lin(2, 3);
  // Floating point converts: a bf16 file loads into fp32 weights, values rounded as bf16.
  auto w = torch::randn({3, 2});
  io::save_safetensors(dir + "/bf16.safetensors", {{"weight", w.to(torch::kBFloat16)}, {"bias", torch::zeros({3}, torch::kBFloat16)}});
  io::load_module(*lin, dir + "/bf16.safetensors");
  CHECK(torch::equal(lin->weight, w.to(torch::kBFloat16).to(torch::kFloat32)));
  // Integer codes into floats (or the reverse) are refused by name.
  io::save_safetensors(dir + "/int.safetensors", {{"weight", torch::zeros({3, 2}, torch::kInt64)}, {"bias", torch::zeros({3})}});
  CHECK_THROWS_WITH(io::load_module(*lin, dir + "/int.safetensors"),
                    ContainsText("int.safetensors") && ContainsText("\"weight\" is I64") && ContainsText("Float"));
}
