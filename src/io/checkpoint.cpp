#include "omnilite/io/checkpoint.h"

#include <set>
#include <stdexcept>

namespace omnilite::io {

std::vector<std::pair<std::string, torch::Tensor>> state_tensors(const torch::nn::Module& m) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& p : m.named_parameters()) out.emplace_back(p.key(), p.value());
  for (const auto& b : m.named_buffers()) out.emplace_back(b.key(), b.value());
  return out;
}

void save_module(const torch::nn::Module& m, const std::string& path, const std::map<std::string, std::string>& metadata,
                 c10::optional<torch::ScalarType> dtype) {
  auto tensors = state_tensors(m);
  std::vector<TensorSpec> specs;
  for (const auto& [name, t] : tensors) specs.push_back({name, dtype ? *dtype : t.scalar_type(), t.sizes().vec()});
  SafetensorsWriter w(path, std::move(specs), metadata);
  for (const auto& [name, t] : tensors) w.write(name, dtype ? t.detach().to(*dtype) : t.detach());
  w.commit();
}

void load_module(torch::nn::Module& m, const std::string& path, bool verify) {
  SafetensorsReader r(path);
  if (verify) r.verify_checksum();
  auto tensors = state_tensors(m);
  std::set<std::string> expected;
  for (const auto& [name, t] : tensors) {
    expected.insert(name);
    if (!r.contains(name))
      throw std::runtime_error("checkpoint \"" + path + "\": missing tensor \"" + name + "\" " +
                               c10::str(t.sizes()) + "; hint: the checkpoint was written for another config");
    const auto& e = r.tensors().at(name);
    if (e.shape != t.sizes().vec())
      throw std::runtime_error("checkpoint \"" + path + "\": tensor \"" + name + "\" has shape " +
                               c10::str(c10::IntArrayRef(e.shape)) + ", the model expects " + c10::str(t.sizes()) +
                               "; hint: the checkpoint was written for another config");
  }
  for (const auto& [name, e] : r.tensors())
    if (!expected.count(name))
      throw std::runtime_error("checkpoint \"" + path + "\": unexpected tensor \"" + name +
                               "\" that the model does not have; hint: the checkpoint was written for another config");
  torch::NoGradGuard ng;
  for (auto& [name, t] : tensors) t.copy_(r.load(name));
}

}  // namespace omnilite::io
