#include "omnilite/data/idx.h"

#include <fstream>
#include <stdexcept>

namespace omnilite {
namespace {

uint32_t read_be32(std::istream& in) {
  unsigned char b[4];
  in.read(reinterpret_cast<char*>(b), 4);
  return (uint32_t{b[0]} << 24) | (uint32_t{b[1]} << 16) | (uint32_t{b[2]} << 8) | uint32_t{b[3]};
}

}  // namespace

torch::Tensor read_idx(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("IDX file \"" + path + "\": cannot open; hint: run scripts/prepare_data.sh");
  const uint32_t magic = read_be32(in);
  if (!in || (magic != 0x00000803u && magic != 0x00000801u))
    throw std::runtime_error("IDX file \"" + path + "\": magic number " + std::to_string(magic) +
                             " is neither 2051 (uint8 images) nor 2049 (uint8 labels); hint: gunzip .gz files first");
  std::vector<int64_t> dims;
  uint64_t bytes = 1;  // announced data bytes, checked against the file before anything is allocated
  bool overflow = false;
  for (uint32_t i = 0; i < (magic & 0xFFu); ++i) {
    dims.push_back(read_be32(in));
    overflow = overflow || __builtin_mul_overflow(bytes, static_cast<uint64_t>(dims.back()), &bytes);
  }
  if (!in) throw std::runtime_error("IDX file \"" + path + "\": truncated header");
  const auto header_end = in.tellg();
  in.seekg(0, std::ios::end);
  const uint64_t available = static_cast<uint64_t>(in.tellg() - header_end);
  in.seekg(header_end);
  if (overflow || bytes > available)
    throw std::runtime_error("IDX file \"" + path + "\": holds " + std::to_string(available) + " of the " +
                             (overflow ? std::string("more than 2^64") : std::to_string(bytes)) +
                             " data bytes its header announces; the file is truncated or not IDX");
  auto t = torch::empty(dims, torch::kUInt8);
  in.read(reinterpret_cast<char*>(t.data_ptr<uint8_t>()), static_cast<std::streamsize>(t.numel()));
  if (in.gcount() != t.numel())
    throw std::runtime_error("IDX file \"" + path + "\": holds " + std::to_string(in.gcount()) + " of the " +
                             std::to_string(t.numel()) + " data bytes its header announces; the file is truncated");
  return t;
}

const std::vector<std::string>& fashion_mnist_classes() {
  static const std::vector<std::string> names = {"t-shirt", "trouser", "pullover", "dress", "coat",
                                                 "sandal",  "shirt",   "sneaker",  "bag",   "ankle boot"};
  return names;
}

namespace {
const std::vector<std::pair<std::string, std::string>>& templates() {
  static const std::vector<std::pair<std::string, std::string>> t = {
      {"a photo of a ", "."}, {"an image of a ", "."}, {"a small grayscale picture of a ", "."},
      {"this is a ", "."}};
  return t;
}
}  // namespace

int64_t fashion_caption_templates() { return static_cast<int64_t>(templates().size()); }

std::string fashion_caption(int64_t label, int64_t variant) {
  const auto& names = fashion_mnist_classes();
  if (label < 0 || label >= static_cast<int64_t>(names.size()))
    throw std::runtime_error("Fashion-MNIST label " + std::to_string(label) + " outside [0, 10)");
  const auto& t = templates()[static_cast<size_t>(variant % fashion_caption_templates())];
  return t.first + names[static_cast<size_t>(label)] + t.second;
}

}  // namespace omnilite
