#include "omnilite/io/event_writer.h"

#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <stdexcept>

namespace omnilite::io {

namespace {

const std::array<uint32_t, 256>& crc32c_table() {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;  // reflected Castagnoli polynomial
      t[i] = c;
    }
    return t;
  }();
  return table;
}

// Protocol-buffer encoding of the few field kinds an Event needs.
void varint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out += static_cast<char>((v & 0x7f) | 0x80);
    v >>= 7;
  }
  out += static_cast<char>(v);
}
void key(std::string& out, int field, int wire) { varint(out, static_cast<uint64_t>(field) << 3 | wire); }
void field_varint(std::string& out, int field, uint64_t v) {
  key(out, field, 0);
  varint(out, v);
}
void field_bytes(std::string& out, int field, const std::string& bytes) {
  key(out, field, 2);
  varint(out, bytes.size());
  out += bytes;
}
template <typename T>
void field_fixed(std::string& out, int field, T v) {  // double: wire type 1, float: wire type 5 (little endian)
  key(out, field, sizeof(T) == 8 ? 1 : 5);
  char b[sizeof(T)];
  std::memcpy(b, &v, sizeof(T));
  out.append(b, sizeof(T));
}

double now_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// Event{wall_time, step} followed by `rest` (already encoded fields).
std::string event(int64_t step, const std::string& rest) {
  std::string e;
  field_fixed<double>(e, 1, now_seconds());
  field_varint(e, 2, static_cast<uint64_t>(step));
  return e + rest;
}

// summary = 5 { value = 1 { tag = 1, <payload> } }
std::string summary_value(const std::string& tag, const std::string& payload) {
  std::string value;
  field_bytes(value, 1, tag);
  value += payload;
  std::string summary;
  field_bytes(summary, 1, value);
  std::string out;
  field_bytes(out, 5, summary);
  return out;
}

}  // namespace

uint32_t crc32c(const void* data, size_t n) {
  const auto& t = crc32c_table();
  const auto* p = static_cast<const uint8_t*>(data);
  uint32_t c = 0xFFFFFFFFu;
  for (size_t i = 0; i < n; ++i) c = t[(c ^ p[i]) & 0xff] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

uint32_t masked_crc32c(const void* data, size_t n) {
  const uint32_t c = crc32c(data, n);
  return ((c >> 15) | (c << 17)) + 0xa282ead8u;
}

EventWriter::EventWriter(const std::string& dir, int64_t resume_step) {
  std::filesystem::create_directories(dir);
  char host[256] = "localhost";
  gethostname(host, sizeof host - 1);
  // TensorBoard reads a folder's files in name order: the new file's seconds field follows every earlier file's.
  int64_t seconds = static_cast<int64_t>(now_seconds());
  const std::string prefix = "events.out.tfevents.";
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    const std::string name = e.path().filename().string();
    if (name.rfind(prefix, 0) != 0) continue;
    try {
      seconds = std::max<int64_t>(seconds, std::stoll(name.substr(prefix.size())) + 1);
    } catch (const std::exception&) {
    }
  }
  path_ = dir + "/" + prefix + std::to_string(seconds) + "." + host + "." + std::to_string(getpid());
  out_.open(path_, std::ios::binary | std::ios::app);
  if (!out_) throw std::runtime_error("cannot create the TensorBoard event file \"" + path_ + "\"");
  std::string version;
  field_bytes(version, 3, "brain.Event:2");
  record(event(0, version));
  if (resume_step >= 0) {
    std::string log;
    field_varint(log, 1, 1);  // SessionLog.status = START
    std::string f;
    field_bytes(f, 7, log);
    record(event(resume_step, f));
  }
  flush();
}

void EventWriter::scalar(const std::string& tag, int64_t step, double value) {
  std::string payload;
  field_fixed<float>(payload, 2, static_cast<float>(value));
  record(event(step, summary_value(tag, payload)));
}

void EventWriter::image(const std::string& tag, int64_t step, const std::string& png, int height, int width,
                        int channels) {
  std::string img;
  field_varint(img, 1, static_cast<uint64_t>(height));
  field_varint(img, 2, static_cast<uint64_t>(width));
  field_varint(img, 3, static_cast<uint64_t>(channels));
  field_bytes(img, 4, png);
  std::string payload;
  field_bytes(payload, 4, img);
  record(event(step, summary_value(tag, payload)));
}

void EventWriter::png_file(const std::string& tag, int64_t step, const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  const std::string png((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  // signature (8 bytes), then the IHDR chunk: length, "IHDR", width and height (big endian), depth, colour type
  if (png.size() < 26 || png.compare(0, 8, "\x89PNG\r\n\x1a\n") != 0 || png.compare(12, 4, "IHDR") != 0)
    throw std::runtime_error("\"" + path + "\" is not a PNG file; TensorBoard images are PNGs");
  auto be32 = [&](size_t at) {
    uint32_t v = 0;
    for (size_t k = 0; k < 4; ++k) v = v << 8 | static_cast<unsigned char>(png[at + k]);
    return static_cast<int>(v);
  };
  const int colour = static_cast<unsigned char>(png[25]);
  const int channels = colour == 0 ? 1 : colour == 4 ? 2 : colour == 6 ? 4 : 3;  // grey, grey+alpha, RGBA, RGB
  image(tag, step, png, be32(20), be32(16), channels);
}

void EventWriter::flush() {
  out_.flush();
  if (!out_) throw std::runtime_error("cannot write the TensorBoard event file \"" + path_ + "\"");
}

void EventWriter::record(const std::string& e) {
  char header[12];
  const uint64_t len = e.size();
  std::memcpy(header, &len, 8);  // little endian on every platform LibTorch supports
  const uint32_t len_crc = masked_crc32c(header, 8), data_crc = masked_crc32c(e.data(), e.size());
  std::memcpy(header + 8, &len_crc, 4);
  out_.write(header, 12);
  out_.write(e.data(), static_cast<std::streamsize>(e.size()));
  char tail[4];
  std::memcpy(tail, &data_crc, 4);
  out_.write(tail, 4);
}

}  // namespace omnilite::io
