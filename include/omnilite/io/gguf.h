// GGUF v3, the file format of llama.cpp (ggml/docs/gguf.md): a header (magic "GGUF", version 3, tensor count,
// metadata count), typed key/value metadata, one info record per tensor (name, dimensions innermost first, ggml
// type, offset), padding to general.alignment (32), then the tensor data, each tensor at an aligned offset.
//
// Writing is atomic and streaming, as for safetensors: the header is laid out from the tensor infos first, the
// tensors are appended one at a time (a model is converted layer by layer), and nothing is visible at the path
// until commit(). Reading checks the header against the file size and hands out tensors dequantised to float32.
//
// The quantisers are llama.cpp's reference ones (ggml-quants.c, quantize_row_q8_0_ref / quantize_row_q4_0_ref),
// bit for bit: blocks of 32 values along the innermost dimension, an fp16 scale per block.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "omnilite/files.h"

namespace omnilite::io {

// The ggml tensor types OMNI-LITE writes and reads (ggml.h, enum ggml_type).
enum class GgmlType : uint32_t { F32 = 0, F16 = 1, Q4_0 = 2, Q8_0 = 8, BF16 = 30 };

// "f32", "f16", "bf16", "q8_0", "q4_0" <-> type; parse throws naming `flag` and the value.
GgmlType parse_ggml_type(const std::string& flag, const std::string& text);
std::string ggml_type_name(GgmlType t);
// general.file_type for a file whose matrices are `t` (llama.h, enum llama_ftype: ALL_F32 0, MOSTLY_F16 1,
// MOSTLY_Q4_0 2, MOSTLY_Q8_0 7, MOSTLY_BF16 32).
uint32_t llama_file_type(GgmlType t);
// Values per block (32 for Q8_0 / Q4_0, 1 otherwise) and bytes per block (Q8_0: fp16 d + 32 int8 = 34; Q4_0:
// fp16 d + 16 bytes of nibbles = 18).
int64_t ggml_block_size(GgmlType t);
uint64_t ggml_block_bytes(GgmlType t);
// Bytes of `n` values (n a multiple of the block size; throws otherwise).
uint64_t ggml_nbytes(GgmlType t, int64_t n);

// llama.cpp's reference quantisers over n values (n % 32 == 0), and the matching dequantisers.
std::vector<uint8_t> quantize_q8_0(const float* x, int64_t n);
std::vector<uint8_t> quantize_q4_0(const float* x, int64_t n);
// Any supported type: float32 values (contiguous, on the CPU) -> the type's bytes, and back to float32 of `shape`.
std::vector<uint8_t> to_ggml(GgmlType t, const torch::Tensor& values);
torch::Tensor from_ggml(GgmlType t, const uint8_t* data, const std::vector<int64_t>& shape);

// Metadata value types (gguf.h, enum gguf_type).
enum class GgufValueType : uint32_t {
  U8 = 0, I8 = 1, U16 = 2, I16 = 3, U32 = 4, I32 = 5, F32 = 6, BOOL = 7, STRING = 8, ARRAY = 9, U64 = 10, I64 = 11,
  F64 = 12
};
struct GgufValue {
  GgufValueType type = GgufValueType::U32;  // the value's type
  GgufValueType elem = GgufValueType::U8;   // ARRAY: the elements' type
  nlohmann::json value;                     // a number, bool or string, or an array of them
};
// Metadata in file order.
using GgufMetadata = std::vector<std::pair<std::string, GgufValue>>;

// Convenience constructors for metadata values.
GgufValue gguf_u32(uint64_t v);
GgufValue gguf_f32(double v);
GgufValue gguf_bool(bool v);
GgufValue gguf_string(const std::string& v);
GgufValue gguf_array(GgufValueType elem, nlohmann::json values);

struct GgufTensorInfo {
  std::string name;         // e.g. "blk.0.attn_q.weight"
  std::vector<int64_t> ne;  // dimensions, innermost (contiguous) first: a torch [rows, cols] is ne = {cols, rows}
  GgmlType type = GgmlType::F32;
  uint64_t offset = 0;      // from the start of the data section (set by the writer, read by the reader)
  uint64_t bytes = 0;       // data size
};

class GgufWriter {
 public:
  // Lays out the header (offsets aligned to 32) and writes it to `path`.tmp; throws naming the tensor whose
  // innermost dimension is not a multiple of its type's block size.
  GgufWriter(std::string path, const GgufMetadata& metadata, std::vector<GgufTensorInfo> tensors);
  // Appends the next tensor's bytes (in the order given); its size must be the info's.
  void write(const std::string& name, const std::vector<uint8_t>& data);
  // Flushes, fsyncs and renames into place; all tensors must have been written.
  void commit();
  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }

 private:
  std::string path_;
  std::vector<GgufTensorInfo> tensors_;
  AtomicFile file_;  // path_.tmp until commit(), removed if that is never reached
  size_t next_ = 0;
};

class GgufReader {
 public:
  // Maps the file and parses its header; throws naming the file and the problem (not GGUF, another version,
  // truncated, a tensor past the end of the file, an unknown tensor type).
  explicit GgufReader(const std::string& path);

  const GgufMetadata& metadata() const { return metadata_; }
  // The value of `key`, or nullptr.
  const GgufValue* find(const std::string& key) const;
  // The value of `key` as a JSON value; throws naming the file and the key when it is absent.
  const nlohmann::json& at(const std::string& key) const;
  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  const GgufTensorInfo* tensor(const std::string& name) const;
  // The tensor as float32 in torch's order (ne reversed), dequantised; throws naming it when absent.
  torch::Tensor load(const std::string& name) const;
  // The tensor's stored bytes.
  const uint8_t* data(const GgufTensorInfo& t) const { return data_ + t.offset; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  MappedFile file_;
  const uint8_t* data_ = nullptr;
  GgufMetadata metadata_;
  std::vector<GgufTensorInfo> tensors_;
};

// True when the file starts with GGUF's magic.
bool is_gguf_file(const std::string& path);

}  // namespace omnilite::io
