#include "omnilite/io/weights_reader.h"

#include <algorithm>
#include <array>
#include <filesystem>
#include <fstream>
#include <set>
#include <stdexcept>

#include <nlohmann/json.hpp>

#include "omnilite/hash.h"
#include "omnilite/io/hf_export.h"

namespace omnilite::io {
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

constexpr const char* kSingle = "model.safetensors";
constexpr const char* kIndex = "model.safetensors.index.json";
constexpr const char* kZero = "zero_shards.json";
const std::string kBnbState = ".quant_state.bitsandbytes__nf4";
const char* const kBnbSuffixes[] = {".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map",
                                    ".quant_state.bitsandbytes__nf4"};

// The JSON quant state of bitsandbytes 4-bit weight `w` in `f`, checked against what OMNI-LITE's NF4 is: nf4 codes,
// blocks of 64, double quantisation in blocks of 256, the same code tables. Throws naming the weight otherwise.
json bnb_state(const SafetensorsReader& f, const std::string& w, const std::string& path) {
  auto bytes = f.load(w + kBnbState);
  const json s = json::parse(std::string(reinterpret_cast<const char*>(bytes.data_ptr<uint8_t>()), bytes.numel()),
                             nullptr, false);
  auto refuse = [&](const std::string& why) {
    throw std::runtime_error("checkpoint \"" + path + "\": 4-bit weight \"" + w + "\" " + why + "; OMNI-LITE reads "
                             "bitsandbytes nf4 with blocksize 64 and double quantisation (bnb_4bit_use_double_quant)");
  };
  if (!s.is_object()) refuse("has a quant state that is not JSON");
  if (s.value("quant_type", std::string()) != "nf4") refuse("is " + s.value("quant_type", std::string("?")));
  if (s.value("blocksize", 0) != quant::kNf4BlockSize) refuse("has blocksize " + std::to_string(s.value("blocksize", 0)));
  if (!s.contains("nested_offset") || s.value("nested_blocksize", 0) != quant::kAbsmaxBlockSize)
    refuse("is not double-quantised in blocks of 256");
  if (!s.contains("shape") || !s["shape"].is_array()) refuse("has no shape");
  const auto& codes = quant::nf4_code_values();
  const auto& map = quant::dynamic_map_values();
  const auto qm = f.load(w + ".quant_map").to(torch::kFloat32).contiguous();
  const auto nm = f.load(w + ".nested_quant_map").to(torch::kFloat32).contiguous();
  if (qm.numel() != 16 || !std::equal(codes.begin(), codes.end(), qm.data_ptr<float>()) || nm.numel() != 256 ||
      !std::equal(map.begin(), map.end(), nm.data_ptr<float>()))
    refuse("has code tables other than bitsandbytes' NF4 and dynamic maps");
  return s;
}

int64_t numel_of(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (auto d : shape) n *= d;
  return n;
}

// The logical tensor of a 4-bit weight: the quant state's shape and dtype (offsets are the codes'); `offset` gets
// the state's nested_offset.
TensorEntry bnb_entry(const SafetensorsReader& f, const std::string& w, const std::string& path, double& offset) {
  const json s = bnb_state(f, w, path);
  offset = s.at("nested_offset").get<double>();
  TensorEntry e = f.tensors().at(w);
  e.shape = s["shape"].get<std::vector<int64_t>>();
  const std::string dt = s.value("dtype", std::string("float32"));
  e.dtype = dt == "bfloat16" ? torch::kBFloat16 : dt == "float16" ? torch::kFloat16 : torch::kFloat32;
  int64_t n = 1;
  for (auto d : e.shape) n *= d;
  const uint64_t bytes = f.tensors().at(w).end - f.tensors().at(w).begin;
  if (n % quant::kNf4BlockSize != 0 || bytes != static_cast<uint64_t>(n / 2))
    throw std::runtime_error("checkpoint \"" + path + "\": 4-bit weight \"" + w + "\" holds " + std::to_string(bytes) +
                             " bytes for shape " + c10::str(c10::IntArrayRef(e.shape)));
  return e;
}

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
  return fs::is_regular_file(path) || fs::exists(path + "/" + kSingle) || fs::exists(path + "/" + kIndex) ||
         fs::exists(path + "/" + kZero);
}

namespace {
// A Hugging Face sharded folder: its index opened and checked against the shards (every tensor of every shard
// listed, in the shard the index names); `stored` gets (name, file index) for each tensor.
void open_hf_index(const std::string& path, std::vector<std::unique_ptr<SafetensorsReader>>& files,
                   std::vector<std::pair<std::string, size_t>>& stored) {
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
      it = file_ids.emplace(shard, files.size()).first;
      files.push_back(std::make_unique<SafetensorsReader>(path + "/" + shard));
    }
    stored.emplace_back(name, it->second);
  }
  // Every tensor of every shard is in the index, in the shard the index names.
  std::map<std::string, size_t> listed(stored.begin(), stored.end());
  for (size_t i = 0; i < files.size(); ++i)
    for (const auto& [name, e] : files[i]->tensors()) {
      auto it = listed.find(name);
      if (it == listed.end() || it->second != i)
        throw std::runtime_error("\"" + files[i]->path() + "\" holds tensor \"" + name + "\" that \"" + index_path +
                                 "\" does not place in it; the folder mixes files of different exports");
    }
  for (const auto& [name, i] : stored)
    if (!files[i]->contains(name))
      throw std::runtime_error("\"" + index_path + "\" places \"" + name + "\" in \"" + files[i]->path() +
                               "\", which does not hold it");
}

// A ZeRO checkpoint's manifest, checked: every file exists, every tensor's pieces tile it in order, each piece is a
// tensor of its file of that dtype and length. Opens the files into `files` and fills `pieces` and `entries`.
// A piece: {file index in `files`, first element, count}.
using ZeroPiece = std::array<int64_t, 3>;
nlohmann::json open_zero_manifest(const std::string& dir, std::vector<std::unique_ptr<SafetensorsReader>>& files,
                                  std::map<std::string, std::vector<ZeroPiece>>& pieces,
                                  std::map<std::string, TensorEntry>& entries) {
  const std::string mpath = dir + "/" + kZero;
  std::ifstream f(mpath);
  const auto m = nlohmann::json::parse(f, nullptr, false);
  auto bad = [&](const std::string& why) {
    throw std::runtime_error("\"" + mpath + "\": " + why + "; hint: the checkpoint is damaged or from another version");
  };
  if (!m.is_object() || m.value("format", std::string()) != "omnilite-zero-shards" || !m.contains("files") ||
      !m["files"].is_array() || !m.contains("tensors") || !m["tensors"].is_object())
    bad("not a ZeRO shard manifest (format, files, tensors)");
  const size_t first = files.size();
  for (const auto& name : m["files"]) {
    if (!name.is_string() || name.get<std::string>().find('/') != std::string::npos)
      bad("a file entry is not a file name");
    const std::string p = dir + "/" + name.get<std::string>();
    if (!fs::exists(p)) bad("names shard \"" + name.get<std::string>() + "\", which the folder lacks");
    files.push_back(std::make_unique<SafetensorsReader>(p));
  }
  for (const auto& [name, t] : m["tensors"].items()) {
    TensorEntry e;
    e.dtype = dtype_from_name(t.value("dtype", std::string()), mpath + ": tensor \"" + name + "\"");
    e.shape = t.value("shape", std::vector<int64_t>());
    const int64_t numel = numel_of(e.shape);
    int64_t at = 0;
    auto& ps = pieces[name];
    for (const auto& p : t.value("pieces", nlohmann::json::array())) {
      if (!p.is_array() || p.size() != 3) bad("tensor \"" + name + "\" has a piece that is not [file, begin, length]");
      const auto file = p[0].get<size_t>();
      const auto begin = p[1].get<int64_t>(), length = p[2].get<int64_t>();
      if (file >= files.size() - first || begin != at || length <= 0)
        bad("the pieces of \"" + name + "\" do not tile it in order (piece at " + std::to_string(begin) + ")");
      const auto& sf = *files[first + file];
      if (!sf.contains(name) || sf.tensors().at(name).dtype != e.dtype || sf.tensors().at(name).shape.size() != 1 ||
          sf.tensors().at(name).shape[0] != length)
        bad("\"" + sf.path() + "\" does not hold the piece of \"" + name + "\" the manifest names");
      ps.push_back({static_cast<int64_t>(first + file), begin, length});
      at += length;
    }
    if (at != numel) bad("the pieces of \"" + name + "\" hold " + std::to_string(at) + " of its " +
                         std::to_string(numel) + " elements");
    entries[name] = e;
  }
  return m;
}
}  // namespace

WeightsReader::WeightsReader(const std::string& path) : path_(path) {
  // stored name -> file index, from the index JSON or from each file's own header.
  std::vector<std::pair<std::string, size_t>> stored;
  if (fs::is_directory(path) && fs::exists(path + "/" + kIndex)) {
    open_hf_index(path, files_, stored);
  } else if (fs::is_directory(path) && fs::exists(path + "/" + kZero)) {
    // model.safetensors holds what was not sharded (buffers, frozen parameters); the manifest the rest.
    if (fs::exists(path + "/" + kSingle)) {
      files_.push_back(std::make_unique<SafetensorsReader>(path + "/" + kSingle));
      for (const auto& [name, e] : files_[0]->tensors()) stored.emplace_back(name, 0);
    }
    std::map<std::string, TensorEntry> entries;
    std::map<std::string, std::vector<ZeroPiece>> pieces;
    zero_ = open_zero_manifest(path, files_, pieces, entries);
    for (const auto& [name, ps] : pieces)
      for (const auto& p : ps) pieces_[name].push_back({static_cast<size_t>(p[0]), p[1], p[2]});
    tensors_.insert(entries.begin(), entries.end());  // a name also in model.safetensors is refused below
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
  // An export keeps its non-Mixtral tensors (OMNI-LITE names, which the key map leaves as they are) beside the shards.
  const std::string extras = path + "/" + kMultimodalFile;
  if (hf_names_ && fs::is_directory(path) && fs::exists(extras)) {
    files_.push_back(std::make_unique<SafetensorsReader>(extras));
    for (const auto& [name, e] : files_.back()->tensors()) stored.emplace_back(name, files_.size() - 1);
  }
  // bitsandbytes 4-bit weights: the codes stand for the weight; the state tensors beside them are not tensors of
  // their own.
  std::set<std::string> quantised, companions;
  for (const auto& [name, i] : stored)
    if (name.size() > kBnbState.size() && name.compare(name.size() - kBnbState.size(), kBnbState.size(), kBnbState) == 0)
      quantised.insert(name.substr(0, name.size() - kBnbState.size()));
  for (const auto& w : quantised)
    for (const char* s : kBnbSuffixes) companions.insert(w + s);
  for (const auto& [name, i] : stored) {
    if (companions.count(name)) continue;
    const std::string key = hf_names_ ? from_hf_name(name) : name;
    if (quantised.count(name)) {
      double offset = 0;
      if (!tensors_.emplace(key, bnb_entry(*files_[i], name, path, offset)).second)
        throw std::runtime_error("checkpoint \"" + path + "\": two tensors map to \"" + key + "\"");
      where_[key] = {i, name};
      bnb_[key] = offset;
      continue;
    }
    if (!tensors_.emplace(key, files_[i]->tensors().at(name)).second)
      throw std::runtime_error("checkpoint \"" + path + "\": two tensors map to \"" + key + "\"");
    where_[key] = {i, name};
  }
}

std::optional<quant::Nf4Tensor> WeightsReader::nf4(const std::string& name) const {
  auto it = bnb_.find(name);
  if (it == bnb_.end()) return std::nullopt;
  const auto& at = where_.at(name);
  const auto& f = *files_[at.file];
  const std::string& w = at.stored;
  quant::Nf4Tensor q;
  q.packed = f.load(w).reshape(-1);
  q.absmax_q = f.load(w + ".absmax").reshape(-1);
  q.absmax_scale = f.load(w + ".nested_absmax").to(torch::kFloat32).reshape(-1);
  q.absmax_mean = torch::tensor(it->second, torch::kFloat32);
  q.shape = tensors_.at(name).shape;
  return q;
}

torch::Tensor WeightsReader::load(const std::string& name) const {
  if (pieces_.count(name)) {
    const auto& shape = tensors_.at(name).shape;
    return load_range(name, 0, numel_of(shape)).view(shape);
  }
  if (auto q = nf4(name)) return quant::nf4_dequantize(*q).to(tensors_.at(name).dtype);
  auto it = where_.find(name);
  if (it == where_.end()) throw std::runtime_error("checkpoint \"" + path_ + "\" has no tensor \"" + name + "\"");
  return files_[it->second.file]->load(it->second.stored);
}

torch::Tensor WeightsReader::load_range(const std::string& name, int64_t begin, int64_t length) const {
  // "exp_avg/NAME" lies in NAME's pieces
  const auto slash = name.find('/');
  const std::string base = slash == std::string::npos ? name : name.substr(slash + 1);
  auto it = pieces_.find(base);
  if (it == pieces_.end()) {
    if (slash != std::string::npos)
      throw std::runtime_error("checkpoint \"" + path_ + "\" has no sharded tensor \"" + base + "\" (for \"" + name +
                               "\")");
    return load(name).reshape({-1}).narrow(0, begin, length).clone();
  }
  const int64_t numel = numel_of(tensors_.at(base).shape);
  if (begin < 0 || length < 0 || begin + length > numel)
    throw std::runtime_error("checkpoint \"" + path_ + "\": elements [" + std::to_string(begin) + ", " +
                             std::to_string(begin + length) + ") of \"" + name + "\" lie outside its " +
                             std::to_string(numel));
  auto out = torch::empty({length}, torch::TensorOptions().dtype(tensors_.at(base).dtype));
  for (const auto& p : it->second) {
    const int64_t a = std::max(begin, p.begin), b = std::min(begin + length, p.begin + p.length);
    if (a >= b) continue;
    if (!files_[p.file]->contains(name))
      throw std::runtime_error("checkpoint \"" + path_ + "\": \"" + files_[p.file]->path() + "\" lacks \"" + name +
                               "\"");
    out.narrow(0, a - begin, b - a).copy_(files_[p.file]->load(name).narrow(0, a - p.begin, b - a));
  }
  return out;
}

void WeightsReader::verify_checksum() const {
  for (const auto& f : files_) f->verify_checksum();
}

}  // namespace omnilite::io
