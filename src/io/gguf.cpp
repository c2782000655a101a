#include "omnilite/io/gguf.h"

#include <algorithm>
#include <filesystem>
#include <cmath>
#include <cstring>
#include <fstream>
#include <stdexcept>

#include <c10/util/Half.h>

#include "omnilite/io/safetensors.h"

namespace omnilite::io {
using nlohmann::json;

namespace {

constexpr uint32_t kMagic = 0x46554747;  // "GGUF" read as a little-endian uint32
constexpr uint32_t kVersion = 3;
constexpr uint64_t kAlignment = 32;      // general.alignment's default; OMNI-LITE writes no other
constexpr int64_t kQK = 32;              // values per Q8_0 / Q4_0 block

[[noreturn]] void fail(const std::string& path, const std::string& what) {
  throw std::runtime_error("GGUF \"" + path + "\": " + what);
}

uint64_t align(uint64_t x) { return (x + kAlignment - 1) / kAlignment * kAlignment; }

uint16_t to_half_bits(float f) { return c10::Half(f).x; }
float from_half_bits(uint16_t h) { return static_cast<float>(c10::Half(h, c10::Half::from_bits())); }

// ggml_compute_fp32_to_bf16: round to nearest even; a NaN stays a (quiet) NaN.
uint16_t to_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 64);
  return static_cast<uint16_t>((u + (0x7fffu + ((u >> 16) & 1u))) >> 16);
}
float from_bf16_bits(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Serialisation of the header: little-endian scalars, strings as u64 length + bytes.
struct Out {
  std::string buf;
  template <typename T>
  void put(T v) {
    buf.append(reinterpret_cast<const char*>(&v), sizeof v);
  }
  void str(const std::string& s) {
    put<uint64_t>(s.size());
    buf += s;
  }
};

void put_scalar(Out& o, GgufValueType t, const json& v) {
  switch (t) {
    case GgufValueType::U8: o.put<uint8_t>(v.get<uint8_t>()); break;
    case GgufValueType::I8: o.put<int8_t>(v.get<int8_t>()); break;
    case GgufValueType::U16: o.put<uint16_t>(v.get<uint16_t>()); break;
    case GgufValueType::I16: o.put<int16_t>(v.get<int16_t>()); break;
    case GgufValueType::U32: o.put<uint32_t>(v.get<uint32_t>()); break;
    case GgufValueType::I32: o.put<int32_t>(v.get<int32_t>()); break;
    case GgufValueType::F32: o.put<float>(v.get<float>()); break;
    case GgufValueType::BOOL: o.put<uint8_t>(v.get<bool>() ? 1 : 0); break;
    case GgufValueType::STRING: o.str(v.get<std::string>()); break;
    case GgufValueType::U64: o.put<uint64_t>(v.get<uint64_t>()); break;
    case GgufValueType::I64: o.put<int64_t>(v.get<int64_t>()); break;
    case GgufValueType::F64: o.put<double>(v.get<double>()); break;
    case GgufValueType::ARRAY: throw std::runtime_error("GGUF: nested arrays are not written");
  }
}

// Bounds-checked parsing of the header.
struct In {
  const uint8_t* p;
  size_t size, pos = 0;
  const std::string& path;
  const uint8_t* take(size_t n) {
    if (n > size - pos) fail(path, "truncated header (needs " + std::to_string(pos + n) + " bytes, the file has " +
                                       std::to_string(size) + ")");
    const uint8_t* q = p + pos;
    pos += n;
    return q;
  }
  template <typename T>
  T get() {
    T v;
    std::memcpy(&v, take(sizeof v), sizeof v);
    return v;
  }
  std::string str() {
    const uint64_t n = get<uint64_t>();
    if (n > size) fail(path, "string of " + std::to_string(n) + " bytes in the header");
    const uint8_t* q = take(n);
    return std::string(reinterpret_cast<const char*>(q), n);
  }
};

json get_scalar(In& in, GgufValueType t) {
  switch (t) {
    case GgufValueType::U8: return in.get<uint8_t>();
    case GgufValueType::I8: return in.get<int8_t>();
    case GgufValueType::U16: return in.get<uint16_t>();
    case GgufValueType::I16: return in.get<int16_t>();
    case GgufValueType::U32: return in.get<uint32_t>();
    case GgufValueType::I32: return in.get<int32_t>();
    case GgufValueType::F32: return in.get<float>();
    case GgufValueType::BOOL: return in.get<uint8_t>() != 0;
    case GgufValueType::STRING: return in.str();
    case GgufValueType::U64: return in.get<uint64_t>();
    case GgufValueType::I64: return in.get<int64_t>();
    case GgufValueType::F64: return in.get<double>();
    default: fail(in.path, "metadata value of unknown type " + std::to_string(static_cast<uint32_t>(t)));
  }
}

bool known_type(uint32_t t) {
  return t == 0 || t == 1 || t == 2 || t == 8 || t == 30;
}

}  // namespace

GgmlType parse_ggml_type(const std::string& flag, const std::string& text) {
  for (GgmlType t : {GgmlType::F32, GgmlType::F16, GgmlType::BF16, GgmlType::Q8_0, GgmlType::Q4_0})
    if (ggml_type_name(t) == text) return t;
  throw std::runtime_error(flag + " \"" + text + "\": expected f32, f16, bf16, q8_0 or q4_0");
}

std::string ggml_type_name(GgmlType t) {
  switch (t) {
    case GgmlType::F32: return "f32";
    case GgmlType::F16: return "f16";
    case GgmlType::BF16: return "bf16";
    case GgmlType::Q8_0: return "q8_0";
    case GgmlType::Q4_0: return "q4_0";
  }
  return "?";
}

uint32_t llama_file_type(GgmlType t) {
  switch (t) {
    case GgmlType::F32: return 0;
    case GgmlType::F16: return 1;
    case GgmlType::Q4_0: return 2;
    case GgmlType::Q8_0: return 7;
    case GgmlType::BF16: return 32;
  }
  return 0;
}

int64_t ggml_block_size(GgmlType t) { return t == GgmlType::Q8_0 || t == GgmlType::Q4_0 ? kQK : 1; }

uint64_t ggml_block_bytes(GgmlType t) {
  switch (t) {
    case GgmlType::F32: return 4;
    case GgmlType::F16:
    case GgmlType::BF16: return 2;
    case GgmlType::Q8_0: return 2 + kQK;
    case GgmlType::Q4_0: return 2 + kQK / 2;
  }
  return 0;
}

uint64_t ggml_nbytes(GgmlType t, int64_t n) {
  if (n < 0 || n % ggml_block_size(t) != 0)
    throw std::runtime_error("GGUF: " + std::to_string(n) + " values do not fill " + ggml_type_name(t) + " blocks of " +
                             std::to_string(ggml_block_size(t)));
  return static_cast<uint64_t>(n / ggml_block_size(t)) * ggml_block_bytes(t);
}

std::vector<uint8_t> quantize_q8_0(const float* x, int64_t n) {
  std::vector<uint8_t> out(ggml_nbytes(GgmlType::Q8_0, n));
  for (int64_t b = 0; b < n / kQK; ++b) {
    const float* v = x + b * kQK;
    float amax = 0.0f;
    for (int64_t j = 0; j < kQK; ++j) amax = std::max(amax, std::fabs(v[j]));
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    uint8_t* blk = out.data() + b * (2 + kQK);
    const uint16_t h = to_half_bits(d);
    std::memcpy(blk, &h, 2);
    for (int64_t j = 0; j < kQK; ++j) blk[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(std::roundf(v[j] * id)));
  }
  return out;
}

std::vector<uint8_t> quantize_q4_0(const float* x, int64_t n) {
  std::vector<uint8_t> out(ggml_nbytes(GgmlType::Q4_0, n));
  for (int64_t b = 0; b < n / kQK; ++b) {
    const float* v = x + b * kQK;
    float amax = 0.0f, max = 0.0f;  // the value of largest magnitude, sign kept (the first one on ties)
    for (int64_t j = 0; j < kQK; ++j)
      if (amax < std::fabs(v[j])) {
        amax = std::fabs(v[j]);
        max = v[j];
      }
    const float d = max / -8.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    uint8_t* blk = out.data() + b * (2 + kQK / 2);
    const uint16_t h = to_half_bits(d);
    std::memcpy(blk, &h, 2);
    for (int64_t j = 0; j < kQK / 2; ++j) {
      const auto lo = static_cast<uint8_t>(std::min(15, static_cast<int>(static_cast<int8_t>(v[j] * id + 8.5f))));
      const auto hi =
          static_cast<uint8_t>(std::min(15, static_cast<int>(static_cast<int8_t>(v[j + kQK / 2] * id + 8.5f))));
      blk[2 + j] = static_cast<uint8_t>(lo | (hi << 4));
    }
  }
  return out;
}

std::vector<uint8_t> to_ggml(GgmlType t, const torch::Tensor& values) {
  const auto c = values.detach().to(torch::kCPU, torch::kFloat32).contiguous();
  const float* x = c.data_ptr<float>();
  const int64_t n = c.numel();
  switch (t) {
    case GgmlType::Q8_0: return quantize_q8_0(x, n);
    case GgmlType::Q4_0: return quantize_q4_0(x, n);
    case GgmlType::F32: return std::vector<uint8_t>(reinterpret_cast<const uint8_t*>(x),
                                                    reinterpret_cast<const uint8_t*>(x + n));
    case GgmlType::F16:
    case GgmlType::BF16: {
      std::vector<uint8_t> out(2 * n);
      for (int64_t i = 0; i < n; ++i) {
        const uint16_t h = t == GgmlType::F16 ? to_half_bits(x[i]) : to_bf16_bits(x[i]);
        std::memcpy(out.data() + 2 * i, &h, 2);
      }
      return out;
    }
  }
  return {};
}

torch::Tensor from_ggml(GgmlType t, const uint8_t* data, const std::vector<int64_t>& shape) {
  auto out = torch::empty(shape, torch::kFloat32);
  float* y = out.data_ptr<float>();
  const int64_t n = out.numel();
  uint16_t h;
  switch (t) {
    case GgmlType::F32: std::memcpy(y, data, 4 * n); break;
    case GgmlType::F16:
    case GgmlType::BF16:
      for (int64_t i = 0; i < n; ++i) {
        std::memcpy(&h, data + 2 * i, 2);
        y[i] = t == GgmlType::F16 ? from_half_bits(h) : from_bf16_bits(h);
      }
      break;
    case GgmlType::Q8_0:
      ggml_nbytes(t, n);
      for (int64_t b = 0; b < n / kQK; ++b) {
        const uint8_t* blk = data + b * (2 + kQK);
        std::memcpy(&h, blk, 2);
        const float d = from_half_bits(h);
        for (int64_t j = 0; j < kQK; ++j) y[b * kQK + j] = static_cast<float>(static_cast<int8_t>(blk[2 + j])) * d;
      }
      break;
    case GgmlType::Q4_0:
      ggml_nbytes(t, n);
      for (int64_t b = 0; b < n / kQK; ++b) {
        const uint8_t* blk = data + b * (2 + kQK / 2);
        std::memcpy(&h, blk, 2);
        const float d = from_half_bits(h);
        for (int64_t j = 0; j < kQK / 2; ++j) {
          y[b * kQK + j] = static_cast<float>((blk[2 + j] & 0x0F) - 8) * d;
          y[b * kQK + j + kQK / 2] = static_cast<float>((blk[2 + j] >> 4) - 8) * d;
        }
      }
      break;
  }
  return out;
}

GgufValue gguf_u32(uint64_t v) { return {GgufValueType::U32, GgufValueType::U8, v}; }
GgufValue gguf_f32(double v) { return {GgufValueType::F32, GgufValueType::U8, v}; }
GgufValue gguf_bool(bool v) { return {GgufValueType::BOOL, GgufValueType::U8, v}; }
GgufValue gguf_string(const std::string& v) { return {GgufValueType::STRING, GgufValueType::U8, v}; }
GgufValue gguf_array(GgufValueType elem, json values) { return {GgufValueType::ARRAY, elem, std::move(values)}; }

GgufWriter::GgufWriter(std::string path, const GgufMetadata& metadata, std::vector<GgufTensorInfo> tensors)
    : path_(std::move(path)), tensors_(std::move(tensors)), file_(path_) {
  Out o;
  o.put<uint32_t>(kMagic);
  o.put<uint32_t>(kVersion);
  o.put<uint64_t>(tensors_.size());
  o.put<uint64_t>(metadata.size());
  for (const auto& [key, v] : metadata) {
    o.str(key);
    o.put<uint32_t>(static_cast<uint32_t>(v.type));
    if (v.type == GgufValueType::ARRAY) {
      o.put<uint32_t>(static_cast<uint32_t>(v.elem));
      o.put<uint64_t>(v.value.size());
      for (const auto& e : v.value) put_scalar(o, v.elem, e);
    } else {
      put_scalar(o, v.type, v.value);
    }
  }
  uint64_t offset = 0;
  for (auto& t : tensors_) {
    if (t.ne.empty() || t.ne[0] % ggml_block_size(t.type) != 0)
      fail(path_, "tensor \"" + t.name + "\" has rows of " + std::to_string(t.ne.empty() ? 0 : t.ne[0]) +
                      " values, not a multiple of the " + ggml_type_name(t.type) + " block (" +
                      std::to_string(ggml_block_size(t.type)) + ")");
    int64_t n = 1;
    for (auto d : t.ne) n *= d;
    t.offset = offset;
    t.bytes = ggml_nbytes(t.type, n);
    offset = align(offset + t.bytes);
    o.str(t.name);
    o.put<uint32_t>(static_cast<uint32_t>(t.ne.size()));
    for (auto d : t.ne) o.put<uint64_t>(static_cast<uint64_t>(d));
    o.put<uint32_t>(static_cast<uint32_t>(t.type));
    o.put<uint64_t>(t.offset);
  }
  o.buf.resize(align(o.buf.size()), '\0');
  file_.write(o.buf);
}

void GgufWriter::write(const std::string& name, const std::vector<uint8_t>& data) {
  if (next_ >= tensors_.size()) fail(path_, "tensor \"" + name + "\" written after the last one in the header");
  const auto& t = tensors_[next_];
  if (t.name != name || t.bytes != data.size())
    fail(path_, "expected tensor \"" + t.name + "\" of " + std::to_string(t.bytes) + " bytes next, got \"" + name +
                    "\" of " + std::to_string(data.size()));
  static const uint8_t zeros[kAlignment] = {};
  file_.write(data.data(), data.size());
  file_.write(zeros, align(data.size()) - data.size());  // padding up to the next tensor's offset
  ++next_;
}

void GgufWriter::commit() {
  if (next_ != tensors_.size())
    fail(path_, "commit after " + std::to_string(next_) + " of " + std::to_string(tensors_.size()) + " tensors");
  file_.commit();
}

GgufReader::GgufReader(const std::string& path) : path_(path), file_(path, "GGUF") {
  const size_t size = file_.size();
  if (size < 24) fail(path, "file of " + std::to_string(size) + " bytes is too short to be GGUF");
  In in{file_.data(), size, 0, path_};
  if (in.get<uint32_t>() != kMagic) fail(path, "not a GGUF file (no \"GGUF\" magic); hint: --checkpoint FILE.gguf "
                                               "expects a file written by llama.cpp's tools or omnilite export");
  const uint32_t version = in.get<uint32_t>();
  if (version != 2 && version != 3)
    fail(path, "GGUF version " + std::to_string(version) + "; this build reads versions 2 and 3");
  const uint64_t n_tensors = in.get<uint64_t>(), n_kv = in.get<uint64_t>();
  if (n_tensors > size || n_kv > size) fail(path, "header counts exceed the file size");
  uint64_t alignment = kAlignment;
  for (uint64_t i = 0; i < n_kv; ++i) {
    std::string key = in.str();
    GgufValue v;
    v.type = static_cast<GgufValueType>(in.get<uint32_t>());
    if (v.type == GgufValueType::ARRAY) {
      v.elem = static_cast<GgufValueType>(in.get<uint32_t>());
      const uint64_t n = in.get<uint64_t>();
      if (n > size) fail(path, "array \"" + key + "\" of " + std::to_string(n) + " elements");
      v.value = json::array();
      for (uint64_t k = 0; k < n; ++k) v.value.push_back(get_scalar(in, v.elem));
    } else {
      v.value = get_scalar(in, v.type);
    }
    if (key == "general.alignment") alignment = v.value.get<uint64_t>();
    metadata_.emplace_back(std::move(key), std::move(v));
  }
  if (alignment == 0 || (alignment & (alignment - 1)) != 0)
    fail(path, "general.alignment = " + std::to_string(alignment) + " is not a power of two");
  for (uint64_t i = 0; i < n_tensors; ++i) {
    GgufTensorInfo t;
    t.name = in.str();
    const uint32_t dims = in.get<uint32_t>();
    if (dims == 0 || dims > 4) fail(path, "tensor \"" + t.name + "\" has " + std::to_string(dims) + " dimensions");
    for (uint32_t d = 0; d < dims; ++d) t.ne.push_back(static_cast<int64_t>(in.get<uint64_t>()));
    const uint32_t type = in.get<uint32_t>();
    if (!known_type(type))
      fail(path, "tensor \"" + t.name + "\" has ggml type " + std::to_string(type) + "; OMNI-LITE reads f32, f16, "
                 "bf16, q8_0 and q4_0; hint: requantise with llama-quantize to q8_0, or convert to f16");
    t.type = static_cast<GgmlType>(type);
    t.offset = in.get<uint64_t>();
    int64_t n = 1;
    for (auto d : t.ne) {
      if (d < 0 || (d > 0 && n > (int64_t{1} << 40) / d)) fail(path, "tensor \"" + t.name + "\" is too large");
      n *= d;
    }
    t.bytes = ggml_nbytes(t.type, n);
    tensors_.push_back(std::move(t));
  }
  const uint64_t data_start = (in.pos + alignment - 1) / alignment * alignment;
  for (const auto& t : tensors_)
    if (data_start + t.offset + t.bytes > size)
      fail(path, "tensor \"" + t.name + "\" ends at byte " + std::to_string(data_start + t.offset + t.bytes) +
                     ", past the end of the file (" + std::to_string(size) + " bytes): truncated?");
  data_ = file_.data() + data_start;
}

const GgufValue* GgufReader::find(const std::string& key) const {
  for (const auto& [k, v] : metadata_)
    if (k == key) return &v;
  return nullptr;
}

const json& GgufReader::at(const std::string& key) const {
  const auto* v = find(key);
  if (!v) fail(path_, "metadata key \"" + key + "\" is missing");
  return v->value;
}

const GgufTensorInfo* GgufReader::tensor(const std::string& name) const {
  for (const auto& t : tensors_)
    if (t.name == name) return &t;
  return nullptr;
}

torch::Tensor GgufReader::load(const std::string& name) const {
  const auto* t = tensor(name);
  if (!t) fail(path_, "tensor \"" + name + "\" is missing");
  return from_ggml(t->type, data(*t), std::vector<int64_t>(t->ne.rbegin(), t->ne.rend()));
}

bool is_gguf_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  uint32_t magic = 0;
  return f.read(reinterpret_cast<char*>(&magic), 4) && magic == kMagic;
}

}  // namespace omnilite::io
