// TensorBoard event files: CRC-32C against its published check value, and the records read back by an independent
// decoder of the TFRecord framing and of the protobuf fields (written here from the format's definition).
#include "catch_compat.h"

#include <cstring>
#include <filesystem>
#include <map>
#include <fstream>
#include <string>
#include <vector>

#include "helpers.h"
#include "omnilite/io/event_writer.h"

using namespace omnilite;

namespace {

// Bitwise CRC-32C, no table: the reference for the writer's table-driven one.
uint32_t crc32c_bitwise(const std::string& s) {
  uint32_t c = 0xFFFFFFFFu;
  for (unsigned char ch : s) {
    c ^= ch;
    for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
  }
  return ~c;
}

uint64_t read_varint(const std::string& s, size_t& pos) {
  uint64_t v = 0;
  for (int shift = 0;; shift += 7) {
    const auto b = static_cast<unsigned char>(s.at(pos++));
    v |= static_cast<uint64_t>(b & 0x7f) << shift;
    if (!(b & 0x80)) return v;
  }
}

// field number -> raw payloads (length-delimited ones as bytes, fixed32 / fixed64 as their bytes, varints decoded
// into 8 little-endian bytes)
std::multimap<int, std::string> fields(const std::string& msg) {
  std::multimap<int, std::string> out;
  size_t pos = 0;
  while (pos < msg.size()) {
    const uint64_t key = read_varint(msg, pos);
    const int field = static_cast<int>(key >> 3), wire = static_cast<int>(key & 7);
    if (wire == 0) {
      const uint64_t v = read_varint(msg, pos);
      out.emplace(field, std::string(reinterpret_cast<const char*>(&v), 8));
    } else if (wire == 1 || wire == 5) {
      const size_t n = wire == 1 ? 8 : 4;
      out.emplace(field, msg.substr(pos, n));
      pos += n;
    } else {
      REQUIRE(wire == 2);
      const uint64_t n = read_varint(msg, pos);
      out.emplace(field, msg.substr(pos, n));
      pos += n;
    }
  }
  return out;
}

template <typename T>
T as(const std::string& b) {
  T v{};
  std::memcpy(&v, b.data(), sizeof(T));
  return v;
}

uint32_t masked(uint32_t c) { return ((c >> 15) | (c << 17)) + 0xa282ead8u; }

}  // namespace

TEST_CASE("TensorBoard: CRC-32C check value and masking", "[tensorboard]") {
  CHECK(io::crc32c("123456789", 9) == 0xE3069283u);  // the CRC-32C check value (RFC 3720, B.4)
  const std::string s = "a longer string with \0 bytes in it";
  CHECK(io::crc32c(s.data(), s.size()) == crc32c_bitwise(s));
  CHECK(io::masked_crc32c(s.data(), s.size()) == masked(crc32c_bitwise(s)));
}

TEST_CASE("TensorBoard: event records decode to the scalars and images written, with valid framing",
          "[tensorboard]") {
  const auto dir = testing::fresh_temp_dir("tensorboard");
  std::string path;
  {
    io::EventWriter w(dir, /*resume_step=*/5);
    w.scalar("loss", 5, 2.5);
    w.scalar("lr", 6, 1e-3);
    w.image("grid", 6, std::string("\x89PNG\r\n\x1a\n", 8), 3, 4, 3);
    w.flush();
    path = w.path();
  }
  std::ifstream f(path, std::ios::binary);
  const std::string data((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  std::vector<std::string> events;
  size_t pos = 0;
  while (pos < data.size()) {
    REQUIRE(pos + 12 <= data.size());
    const auto len = as<uint64_t>(data.substr(pos, 8));
    CHECK(as<uint32_t>(data.substr(pos + 8, 4)) == masked(crc32c_bitwise(data.substr(pos, 8))));
    const std::string payload = data.substr(pos + 12, len);
    CHECK(as<uint32_t>(data.substr(pos + 12 + len, 4)) == masked(crc32c_bitwise(payload)));
    events.push_back(payload);
    pos += 16 + len;
  }
  CHECK(pos == data.size());
  REQUIRE(events.size() == 5);
  CHECK(fields(events[0]).find(3)->second == "brain.Event:2");              // file_version
  auto start = fields(events[1]);
  CHECK(as<int64_t>(start.find(2)->second) == 5);                           // step of the SessionLog
  CHECK(as<uint64_t>(fields(start.find(7)->second).find(1)->second) == 1);  // status START
  auto e = fields(events[2]);
  CHECK(as<int64_t>(e.find(2)->second) == 5);
  CHECK(as<double>(e.find(1)->second) > 1.7e9);  // wall time in seconds
  auto value = fields(fields(e.find(5)->second).find(1)->second);
  CHECK(value.find(1)->second == "loss");
  CHECK(as<float>(value.find(2)->second) == 2.5f);
  auto lr = fields(fields(fields(events[3]).find(5)->second).find(1)->second);
  CHECK(as<float>(lr.find(2)->second) == 1e-3f);
  auto img = fields(fields(fields(fields(events[4]).find(5)->second).find(1)->second).find(4)->second);
  CHECK(as<uint64_t>(img.find(1)->second) == 3);
  CHECK(as<uint64_t>(img.find(2)->second) == 4);
  CHECK(as<uint64_t>(img.find(3)->second) == 3);
  CHECK(img.find(4)->second.size() == 8);
  // A second writer in the folder gets a later file name, so TensorBoard reads it after the first.
  io::EventWriter second(dir);
  CHECK(std::filesystem::path(second.path()).filename().string() > std::filesystem::path(path).filename().string());
}
