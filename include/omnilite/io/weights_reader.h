// The weights of a checkpoint, wherever they are stored: one .safetensors file, a checkpoint folder holding
// model.safetensors, or a sharded folder (model.safetensors.index.json naming each tensor's shard, as transformers
// writes it). Files with Hugging Face names (an `omnilite export --format hf`) are read under their OMNI-LITE names
// through the key map, so every loader sees one namespace. A weight stored as bitsandbytes serialises a Linear4bit
// (nf4, blocksize 64, double quantisation: the packed codes under the weight's name, .absmax, .quant_map,
// .nested_absmax, .nested_quant_map and .quant_state.bitsandbytes__nf4 beside it, as `export --quant nf4` and
// transformers' save_pretrained write them) is one tensor of the quant state's shape and dtype: load() dequantises
// it, nf4() hands the codes over as they are (a QLoRA base then never exists in full precision).
//
// A ZeRO-2/3 checkpoint folder (zero_shards.json beside model.safetensors, see include/omnilite/train/zero.h) holds
// each trainable tensor in flat pieces, one per rank that owned part of it, in that rank's zero-R-of-W.safetensors;
// the manifest names, per tensor, its dtype, shape and pieces [file, first element, count]. Such a tensor is one
// tensor here too (load() assembles it); the other tensors come from model.safetensors.
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
  // Elements [begin, begin + length) of the flattened tensor `name`, reading only the pieces that hold them. In a ZeRO
  // checkpoint also "exp_avg/NAME" and "exp_avg_sq/NAME" (the AdamW moments, stored in NAME's pieces).
  torch::Tensor load_range(const std::string& name, int64_t begin, int64_t length) const;
  // The manifest of a ZeRO checkpoint folder; null for any other weights.
  const nlohmann::json& zero_manifest() const { return zero_; }
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
  struct Piece {
    size_t file;
    int64_t begin, length;
  };
  std::map<std::string, std::vector<Piece>> pieces_;  // ZeRO checkpoint: tensor -> its pieces in element order
  nlohmann::json zero_;
};

// What identifies the weights at `path` for a run that depends on them (a QLoRA run's base): {"path", "bytes" (the
// sizes of its safetensors files summed), "header_fnv1a" (a hash of every file's tensor names, dtypes, shapes and
// offsets and of its metadata, OMNI-LITE's data CRC included)}. Moving or copying the files keeps bytes and hash.
nlohmann::json weights_identity(const std::string& path);

// True when `path` is a weights file or a folder holding model.safetensors, model.safetensors.index.json or
// zero_shards.json.
bool has_weights(const std::string& path);

}  // namespace omnilite::io
