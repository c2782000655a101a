#include "omnilite/io/safetensors.h"

#include <array>
#include <cstdio>
#include <cstring>
#include <algorithm>
#include <filesystem>
#include <limits>
#include <stdexcept>

#include <nlohmann/json.hpp>

namespace omnilite::io {
namespace {

using nlohmann::json;

constexpr const char* kCrcKey = "omnilite.crc32";
constexpr uint64_t kMaxHeader = 100u << 20;  // 100 MiB, as the safetensors library

[[noreturn]] void fail(const std::string& path, const std::string& what) {
  throw std::runtime_error("safetensors file \"" + path + "\": " + what);
}

const std::array<uint32_t, 256>& crc_table() {
  static const std::array<uint32_t, 256> table = [] {
    std::array<uint32_t, 256> t{};
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  return table;
}

std::string hex8(uint32_t v) {
  char buf[9];
  std::snprintf(buf, sizeof buf, "%08x", v);
  return buf;
}

uint64_t nbytes(torch::ScalarType t, const std::vector<int64_t>& shape) {
  uint64_t n = c10::elementSize(t);
  for (auto d : shape) n *= static_cast<uint64_t>(d);
  return n;
}

}  // namespace

uint32_t crc32_update(uint32_t crc, const uint8_t* data, size_t n) {
  const auto& t = crc_table();
  crc = ~crc;
  for (size_t i = 0; i < n; ++i) crc = t[(crc ^ data[i]) & 0xFFu] ^ (crc >> 8);
  return ~crc;
}

std::string dtype_name(torch::ScalarType t) {
  switch (t) {
    case torch::kFloat32: return "F32";
    case torch::kFloat64: return "F64";
    case torch::kBFloat16: return "BF16";
    case torch::kFloat16: return "F16";
    case torch::kInt64: return "I64";
    case torch::kInt32: return "I32";
    case torch::kInt16: return "I16";
    case torch::kInt8: return "I8";
    case torch::kUInt8: return "U8";
    case torch::kBool: return "BOOL";
    default: throw std::runtime_error(std::string("safetensors: unsupported dtype ") + c10::toString(t));
  }
}

torch::ScalarType dtype_from_name(const std::string& n, const std::string& context) {
  static const std::map<std::string, torch::ScalarType> m = {
      {"F32", torch::kFloat32}, {"F64", torch::kFloat64}, {"BF16", torch::kBFloat16}, {"F16", torch::kFloat16},
      {"I64", torch::kInt64},   {"I32", torch::kInt32},   {"I16", torch::kInt16},     {"I8", torch::kInt8},
      {"U8", torch::kUInt8},    {"BOOL", torch::kBool}};
  auto it = m.find(n);
  if (it == m.end()) throw std::runtime_error(context + ": unsupported dtype \"" + n + "\"");
  return it->second;
}

namespace {

// A header entry's unsigned integer (shape dimension or offset), or a one-line error naming the tensor.
uint64_t header_uint(const json& v, const std::string& path, const std::string& tensor, const char* what) {
  if (!v.is_number_integer() || (v.is_number_integer() && !v.is_number_unsigned() && v.get<int64_t>() < 0))
    fail(path, "tensor \"" + tensor + "\": " + what + " must be a non-negative integer, got " + v.dump());
  return v.get<uint64_t>();
}

}  // namespace

SafetensorsLayout parse_safetensors(const uint8_t* file, size_t size, const std::string& path) {
  if (size < 8) fail(path, "only " + std::to_string(size) + " bytes; truncated or not safetensors");
  uint64_t header_len = 0;
  std::memcpy(&header_len, file, 8);  // little-endian host assumed (x86-64, aarch64)
  if (header_len > kMaxHeader || header_len > size - 8)
    fail(path, "header length " + std::to_string(header_len) + " exceeds the file size " + std::to_string(size) +
                   " (or the 100 MiB limit); the file is truncated or not safetensors");
  if (header_len == 0 || file[8] != '{') fail(path, "the header does not start with '{'; not a safetensors file");
  json header = json::parse(file + 8, file + 8 + header_len, nullptr, /*allow_exceptions=*/false);
  if (header.is_discarded()) fail(path, "the header is not valid JSON; the file is corrupted or not safetensors");
  if (!header.is_object()) fail(path, "the header is not a JSON object");
  SafetensorsLayout out;
  out.data_offset = 8 + header_len;
  const uint64_t data_size = size - out.data_offset;
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const json& e = *it;
    if (name == "__metadata__") {
      if (!e.is_object()) fail(path, "__metadata__ must be an object of strings, got " + std::string(e.type_name()));
      for (auto m = e.begin(); m != e.end(); ++m) {
        if (!m->is_string())
          fail(path, "__metadata__ entry \"" + m.key() + "\" must be a string, got " + std::string(m->type_name()));
        out.metadata[m.key()] = m->get<std::string>();
      }
      continue;
    }
    if (!e.is_object() || !e.contains("dtype") || !e.contains("shape") || !e.contains("data_offsets"))
      fail(path, "tensor \"" + name + "\" lacks dtype, shape or data_offsets");
    const json &dt = e["dtype"], &shape = e["shape"], &off = e["data_offsets"];
    if (!dt.is_string()) fail(path, "tensor \"" + name + "\": dtype must be a string, got " + dt.dump());
    if (!shape.is_array()) fail(path, "tensor \"" + name + "\": shape must be an array, got " + shape.dump());
    if (!off.is_array() || off.size() != 2)
      fail(path, "tensor \"" + name + "\": data_offsets must be [begin, end], got " + off.dump());
    TensorEntry t;
    t.dtype = dtype_from_name(dt.get<std::string>(), "safetensors file \"" + path + "\", tensor \"" + name + "\"");
    uint64_t bytes = c10::elementSize(t.dtype);
    for (const auto& d : shape) {
      const uint64_t n = header_uint(d, path, name, "every shape dimension");
      if (n > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) || __builtin_mul_overflow(bytes, n, &bytes))
        fail(path, "tensor \"" + name + "\": shape " + shape.dump() + " has more bytes than 2^64");
      t.shape.push_back(static_cast<int64_t>(n));
    }
    t.begin = header_uint(off[0], path, name, "data_offsets[0]");
    t.end = header_uint(off[1], path, name, "data_offsets[1]");
    if (t.end < t.begin || t.end > data_size)
      fail(path, "tensor \"" + name + "\" spans bytes [" + std::to_string(t.begin) + ", " + std::to_string(t.end) +
                     ") but the data region holds " + std::to_string(data_size) + "; the file is truncated or corrupted");
    if (t.end - t.begin != bytes)
      fail(path, "tensor \"" + name + "\" has " + std::to_string(t.end - t.begin) + " bytes for shape " + shape.dump() +
                     " and dtype " + dt.get<std::string>() + " that need " + std::to_string(bytes));
    out.tensors.emplace(name, std::move(t));
  }
  // The tensors tile the data region in offset order: no gap, no overlap, nothing after the last one.
  std::vector<std::pair<uint64_t, const std::string*>> order;
  for (const auto& [name, t] : out.tensors) order.emplace_back(t.begin, &name);
  std::sort(order.begin(), order.end(), [&](const auto& a, const auto& b) {
    return a.first != b.first ? a.first < b.first : out.tensors.at(*a.second).end < out.tensors.at(*b.second).end;
  });
  uint64_t at = 0;
  for (const auto& [begin, name] : order) {
    const auto& t = out.tensors.at(*name);
    if (begin != at)
      fail(path, "tensor \"" + *name + "\" starts at byte " + std::to_string(begin) + " of the data region, where " +
                     (begin < at ? "the previous tensor still lies (they overlap)" : "a gap begins") + "; expected " +
                     std::to_string(at));
    at = t.end;
  }
  if (at != data_size)
    fail(path, "tensors cover " + std::to_string(at) + " bytes but the data region holds " + std::to_string(data_size));
  return out;
}

SafetensorsReader::SafetensorsReader(const std::string& path) : path_(path), file_(path, "safetensors file") {
  if (file_.size() < 8) fail(path, "only " + std::to_string(file_.size()) + " bytes; truncated or not safetensors");
  auto layout = parse_safetensors(file_.data(), file_.size(), path);
  tensors_ = std::move(layout.tensors);
  metadata_ = std::move(layout.metadata);
  data_ = file_.data() + layout.data_offset;
  data_size_ = file_.size() - layout.data_offset;
}

torch::Tensor SafetensorsReader::load(const std::string& name) const {
  auto it = tensors_.find(name);
  if (it == tensors_.end()) fail(path_, "has no tensor \"" + name + "\"");
  const auto& e = it->second;
  auto t = torch::empty(e.shape, torch::TensorOptions().dtype(e.dtype));
  if (e.end > e.begin) std::memcpy(t.data_ptr(), data_ + e.begin, e.end - e.begin);
  file_.release(data_ + e.begin, e.end - e.begin);  // streaming a large file keeps memory flat
  return t;
}

void SafetensorsReader::verify_checksum() const {
  auto it = metadata_.find(kCrcKey);
  if (it == metadata_.end()) return;
  constexpr size_t kChunk = size_t{64} << 20;
  uint32_t crc = 0;
  for (size_t off = 0; off < data_size_; off += kChunk) {
    const size_t n = std::min(kChunk, data_size_ - off);
    crc = crc32_update(crc, data_ + off, n);
    file_.release(data_ + off, n);
  }
  const std::string got = hex8(crc);
  if (got != it->second)
    fail(path_, "CRC-32 of the data is " + got + " but the header records " + it->second +
                    "; the file is corrupted");
}

SafetensorsWriter::SafetensorsWriter(std::string path, std::vector<TensorSpec> specs,
                                     std::map<std::string, std::string> metadata)
    : path_(std::move(path)), specs_(std::move(specs)), file_(path_) {
  json header = json::object();
  uint64_t offset = 0;
  for (const auto& s : specs_) {
    if (header.contains(s.name)) fail(path_, "tensor \"" + s.name + "\" given twice");
    const uint64_t n = nbytes(s.dtype, s.shape);
    header[s.name] = {{"dtype", dtype_name(s.dtype)}, {"shape", s.shape}, {"data_offsets", {offset, offset + n}}};
    offset += n;
  }
  metadata[kCrcKey] = "########";  // placeholder of the final width, patched in commit()
  header["__metadata__"] = metadata;
  std::string text = header.dump();
  while ((8 + text.size()) % 8 != 0) text.push_back(' ');
  crc_offset_ = 8 + text.find("########");
  const uint64_t len = text.size();
  file_.write(&len, 8);
  file_.write(text);
}

void SafetensorsWriter::write(const std::string& name, const torch::Tensor& t) {
  if (next_ >= specs_.size()) fail(path_, "tensor \"" + name + "\" written after the last one in the header");
  const auto& s = specs_[next_];
  if (s.name != name || t.scalar_type() != s.dtype || t.sizes().vec() != s.shape)
    fail(path_, "expected tensor \"" + s.name + "\" " + dtype_name(s.dtype) + c10::str(c10::IntArrayRef(s.shape)) + " next, got \"" +
                    name + "\" " + c10::toString(t.scalar_type()) + c10::str(t.sizes()));
  auto c = t.detach().to(torch::kCPU).contiguous();
  const auto* p = static_cast<const uint8_t*>(c.data_ptr());
  const size_t n = c.numel() * c.element_size();
  crc_ = crc32_update(crc_, p, n);
  file_.write(p, n);
  ++next_;
}

void SafetensorsWriter::commit() {
  if (next_ != specs_.size())
    fail(path_, "commit after " + std::to_string(next_) + " of " + std::to_string(specs_.size()) + " tensors");
  const std::string crc = hex8(crc_);
  file_.write_at(crc_offset_, crc.data(), crc.size());
  file_.commit();
}

void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata) {
  std::vector<TensorSpec> specs;
  specs.reserve(tensors.size());
  for (const auto& [name, t] : tensors) specs.push_back({name, t.scalar_type(), t.sizes().vec()});
  SafetensorsWriter w(path, std::move(specs), metadata);
  for (const auto& [name, t] : tensors) w.write(name, t);
  w.commit();
}

}  // namespace omnilite::io
