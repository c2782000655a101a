// safetensors files (the format of Hugging Face's safetensors library): an 8-byte little-endian header length,
// a JSON header {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}} padded with
// spaces to 8 bytes, then the raw little-endian tensor data.
//
// Writing is atomic (a temporary file in the same folder, fsync, rename) and streaming: the header is laid out
// first from names, dtypes and shapes, then tensors are appended one at a time, so a model can be written layer by
// layer. A CRC-32 of the data region is stored in the metadata ("omnilite.crc32"); reading checks sizes and
// offsets always and the CRC on request, so a truncated or corrupted file is refused with its name.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include <torch/torch.h>

#include "omnilite/files.h"

namespace omnilite::io {

struct TensorSpec {
  std::string name;              // tensor name, e.g. "text.layers.0.self_attn.q_proj.weight"
  torch::ScalarType dtype;       // element type
  std::vector<int64_t> shape;    // dimensions
};

struct TensorEntry {
  torch::ScalarType dtype;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // byte offset in the data region
  uint64_t end = 0;    // one past the last byte
};

// "F32", "BF16", ... <-> ScalarType; throws for types safetensors lacks.
std::string dtype_name(torch::ScalarType t);
torch::ScalarType dtype_from_name(const std::string& name, const std::string& context);

// What a safetensors file declares, checked against the format: the header length fits the file (and 100 MiB),
// the header is a JSON object whose "__metadata__" maps strings to strings, every tensor has a known dtype, a shape
// of non-negative integers whose byte count does not overflow, and data_offsets [begin, end] with end - begin equal
// to that byte count, and the tensors tile the data region in offset order with no gap and no overlap.
struct SafetensorsLayout {
  std::map<std::string, TensorEntry> tensors;    // name -> dtype, shape, offsets in the data region
  std::map<std::string, std::string> metadata;   // "__metadata__"
  uint64_t data_offset = 0;                      // where the data region starts in the file (8 + header length)
};
// Checks bytes [0, size) of a whole file; throws std::runtime_error naming `path`, the tensor and the value.
SafetensorsLayout parse_safetensors(const uint8_t* file, size_t size, const std::string& path);

class SafetensorsReader {
 public:
  // Maps the file and validates its header; throws std::runtime_error naming the file and the problem.
  explicit SafetensorsReader(const std::string& path);

  const std::map<std::string, TensorEntry>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool contains(const std::string& name) const { return tensors_.count(name) > 0; }
  // A CPU tensor holding a copy of the named tensor; throws naming it if absent.
  torch::Tensor load(const std::string& name) const;
  // Recomputes the CRC-32 of the data region and compares it with the metadata; throws on mismatch. Files
  // written by other tools (no CRC) pass.
  void verify_checksum() const;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
  MappedFile file_;
  const uint8_t* data_ = nullptr;  // start of the data region
  size_t data_size_ = 0;
  std::map<std::string, TensorEntry> tensors_;
  std::map<std::string, std::string> metadata_;
};

class SafetensorsWriter {
 public:
  // Lays out the header for `specs` (in that order) and opens `path`.tmp; nothing is visible at `path` until
  // commit().
  SafetensorsWriter(std::string path, std::vector<TensorSpec> specs, std::map<std::string, std::string> metadata = {});

  // Appends the next tensor; its name, dtype and shape must be those of the next spec.
  void write(const std::string& name, const torch::Tensor& t);
  // Writes the CRC, flushes, fsyncs and renames into place. All tensors must have been written.
  void commit();

 private:
  std::string path_;
  std::vector<TensorSpec> specs_;
  AtomicFile file_;          // path_.tmp until commit(), removed if that is never reached
  size_t next_ = 0;
  uint64_t crc_offset_ = 0;  // file offset of the CRC's 8 hex digits in the header
  uint32_t crc_ = 0;
};

// Writes all tensors (CPU copies are made as needed) atomically to `path`.
void save_safetensors(const std::string& path, const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

// CRC-32 (IEEE, as zlib) continued from `crc` over n bytes.
uint32_t crc32_update(uint32_t crc, const uint8_t* data, size_t n);

}  // namespace omnilite::io
