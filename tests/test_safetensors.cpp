// safetensors I/O against the format's definition (bytes read back by hand), atomic writes, and refusal of
// truncated, corrupted and mismatched files.
#include "catch_compat.h"
#include <nlohmann/json.hpp>

#include <cstdio>
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
