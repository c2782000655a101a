// The weights of a checkpoint, wherever they are stored: one .safetensors file, a checkpoint folder holding
// model.safetensors, or a sharded folder (model.safetensors.index.json naming each tensor's shard, as transformers
// writes it). Files with Hugging Face names (an `omnilite export --format hf`) are read under their OMNI-LITE names
// through the key map, so every loader sees one namespace. A weight stored as bitsandbytes serialises a Linear4bit
// (nf4, blocksize 64, double quantisation: the packed codes under the weight's name, .absmax, .quant_map,
// .nested_absmax, .nested_quant_map and .quant_state.bitsandbytes__nf4 beside it, as `export --quant nf4` and
// transformers' save_pretrained write them) is one tensor of the quant state's shape and dtype: load() dequantises
// it, nf4() hands the codes over as they are (a QLoRA base then never exists in full precision).
#pragma once

#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#include <torch/torch.h>

#include "omnilite/io/safetensors.h"
#include "omnilite/quant/nf4.h"

namespace omnilite::io {

class WeightsReader {
 public:
  // Opens and validates the file(s); throws naming the path and the problem (missing shard, tensor in two shards,
  // index that disagrees with a shard, name outside the key map).
  explicit WeightsReader(const std::string& path);

  // Tensors by OMNI-LITE name.
  const std::map<std::string, TensorEntry>& tensors() const { return tensors_; }
  bool contains(const std::string& name) const { return tensors_.count(name) > 0; }
  // A CPU copy of the named tensor (a 4-bit one dequantised); throws naming it if absent.
  torch::Tensor load(const std::string& name) const;
  // The NF4 codes of a tensor stored in bitsandbytes' 4-bit form, or nullopt for a plain one.
  std::optional<quant::Nf4Tensor> nf4(const std::string& name) const;
  // Checks every file's CRC (see SafetensorsReader::verify_checksum).
  void verify_checksum() const;
  // What was opened (for messages): the file, or the folder.
  const std::string& path() const { return path_; }
  // The files behind it, in the order they were opened.
  const std::vector<std::unique_ptr<SafetensorsReader>>& files() const { return files_; }
  // Whether the stored names were Hugging Face names.
  bool hf_names() const { return hf_names_; }

 private:
  struct Where {
    size_t file;         // index into files_
    std::string stored;  // name in that file
  };
  std::string path_;
  bool hf_names_ = false;
  std::vector<std::unique_ptr<SafetensorsReader>> files_;
  std::map<std::string, Where> where_;
  std::map<std::string, double> bnb_;  // bitsandbytes 4-bit weights (checked once, on open): name -> nested_offset
  std::map<std::string, TensorEntry> tensors_;
};

// What identifies the weights at `path` for a run that depends on them (a QLoRA run's base): {"path", "bytes" (the
// sizes of its safetensors files summed), "header_fnv1a" (a hash of every file's tensor names, dtypes, shapes and
// offsets and of its metadata, OMNI-LITE's data CRC included)}. Moving or copying the files keeps bytes and hash.
nlohmann::json weights_identity(const std::string& path);

// True when `path` is a weights file or a folder holding model.safetensors or model.safetensors.index.json.
bool has_weights(const std::string& path);

}  // namespace omnilite::io
