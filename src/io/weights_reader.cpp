#include "omnilite/io/weights_reader.h"

#include <filesystem>
#include <fstream>
#include <stdexcept>

#include <nlohmann/json.hpp>

#include "omnilite/hash.h"
#include "omnilite/io/hf_export.h"

namespace omnilite::io {
namespace fs = std::filesystem;

namespace {

constexpr const char* kSingle = "model.safetensors";
constexpr const char* kIndex = "model.safetensors.index.json";

}  // namespace

nlohmann::json weights_identity(const std::string& path) {
  WeightsReader r(path);
  std::string header;
  uintmax_t bytes = 0;
  for (const auto& f : r.files()) {
    bytes += std::filesystem::file_size(f->path());
    header += std::filesystem::path(f->path()).filename().string() + "\n";
    for (const auto& [name, e] : f->tensors())
      header += name + " " + dtype_name(e.dtype) + " " + c10::str(c10::IntArrayRef(e.shape)) + " " +
                std::to_string(e.begin) + " " + std::to_string(e.end) + "\n";
    for (const auto& [k, v] : f->metadata()) header += k + "=" + v + "\n";
  }
  return {{"path", path}, {"bytes", static_cast<uint64_t>(bytes)}, {"header_fnv1a", fnv1a_hex(header)}};
}

bool has_weights(const std::string& path) {
  return fs::is_regular_file(path) || fs::exists(path + "/" + kSingle) || fs::exists(path + "/" + kIndex);
}

WeightsReader::WeightsReader(const std::string& path) : path_(path) {
  // stored name -> file index, from the index JSON or from each file's own header.
  std::vector<std::pair<std::string, size_t>> stored;
  if (fs::is_directory(path) && fs::exists(path + "/" + kIndex)) {
    const std::string index_path = path + "/" + kIndex;
    std::ifstream f(index_path);
    const auto index = nlohmann::json::parse(f, nullptr, false);
    if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object())
      throw std::runtime_error("\"" + index_path + "\" is not valid JSON with a \"weight_map\" object");
    std::map<std::string, size_t> file_ids;
    for (const auto& [name, file] : index["weight_map"].items()) {
      if (!file.is_string())
        throw std::runtime_error("\"" + index_path + "\": the shard of \"" + name + "\" is not a file name");
      const std::string shard = file.get<std::string>();
      if (shard.find('/') != std::string::npos)
        throw std::runtime_error("\"" + index_path + "\": shard \"" + shard + "\" is not a file in the folder");
      auto it = file_ids.find(shard);
      if (it == file_ids.end()) {
        if (!fs::exists(path + "/" + shard))
          throw std::runtime_error("\"" + index_path + "\" names shard \"" + shard + "\" (for \"" + name +
                                   "\") but the folder has no such file; hint: copy every model-*.safetensors file");
        it = file_ids.emplace(shard, files_.size()).first;
        files_.push_back(std::make_unique<SafetensorsReader>(path + "/" + shard));
      }
      stored.emplace_back(name, it->second);
    }
    // Every tensor of every shard is in the index, in the shard the index names.
    std::map<std::string, size_t> listed(stored.begin(), stored.end());
    for (size_t i = 0; i < files_.size(); ++i)
      for (const auto& [name, e] : files_[i]->tensors()) {
        auto it = listed.find(name);
        if (it == listed.end() || it->second != i)
          throw std::runtime_error("\"" + files_[i]->path() + "\" holds tensor \"" + name + "\" that \"" + index_path +
                                   "\" does not place in it; the folder mixes files of different exports");
      }
    for (const auto& [name, i] : stored)
      if (!files_[i]->contains(name))
        throw std::runtime_error("\"" + index_path + "\" places \"" + name + "\" in \"" + files_[i]->path() +
                                 "\", which does not hold it");
  } else {
    const std::string file = fs::is_directory(path) ? path + "/" + kSingle : path;
    if (!fs::exists(file))
      throw std::runtime_error("checkpoint \"" + path + "\": neither " + kSingle + " nor " + kIndex + " found");
    files_.push_back(std::make_unique<SafetensorsReader>(file));
    for (const auto& [name, e] : files_[0]->tensors()) stored.emplace_back(name, 0);
  }

  std::vector<std::string> names;
  for (const auto& s : stored) names.push_back(s.first);
  hf_names_ = has_hf_names(names);
  for (const auto& n : names)
    if (n.size() > 30 && n.compare(n.size() - 30, 30, ".quant_state.bitsandbytes__nf4") == 0)
      throw std::runtime_error("checkpoint \"" + path + "\" holds bitsandbytes 4-bit weights (\"" + n + "\"); OMNI-LITE "
                               "does not read them back yet; hint: export the full-precision model (--quant none) "
                               "and quantise on load with lora.base_dtype = nf4");
  // An export keeps its non-Mixtral tensors (OMNI-LITE names, which the key map leaves as they are) beside the shards.
  const std::string extras = path + "/" + kMultimodalFile;
  if (hf_names_ && fs::is_directory(path) && fs::exists(extras)) {
    files_.push_back(std::make_unique<SafetensorsReader>(extras));
    for (const auto& [name, e] : files_.back()->tensors()) stored.emplace_back(name, files_.size() - 1);
  }
  for (const auto& [name, i] : stored) {
    const std::string key = hf_names_ ? from_hf_name(name) : name;
    if (!tensors_.emplace(key, files_[i]->tensors().at(name)).second)
      throw std::runtime_error("checkpoint \"" + path + "\": two tensors map to \"" + key + "\"");
    where_[key] = {i, name};
  }
}

torch::Tensor WeightsReader::load(const std::string& name) const {
  auto it = where_.find(name);
  if (it == where_.end()) throw std::runtime_error("checkpoint \"" + path_ + "\" has no tensor \"" + name + "\"");
  return files_[it->second.file]->load(it->second.stored);
}

void WeightsReader::verify_checksum() const {
  for (const auto& f : files_) f->verify_checksum();
}

}  // namespace omnilite::io
