#include "omnilite/data/image_dataset.h"

#include <filesystem>
#include <fstream>
#include <map>
#include <stdexcept>

#include <nlohmann/json.hpp>
#if OMNILITE_HAVE_OPENCV
#include <opencv2/imgcodecs.hpp>
#include <opencv2/imgproc.hpp>
#endif

#include "omnilite/data/idx.h"
#include "omnilite/data/pnm.h"
#include "omnilite/files.h"
#include "omnilite/log.h"

namespace omnilite {
namespace fs = std::filesystem;
using nlohmann::json;

namespace {

std::vector<uint8_t> read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("image \"" + path + "\": cannot open (missing?)");
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(f), {});
}

// [H, W, 3] uint8 RGB -> [size, size, 3]: OpenCV's area (shrinking) / bilinear (enlarging) resize, or the torch one
// of a build without OpenCV.
torch::Tensor sized(const torch::Tensor& rgb, int64_t size) {
#if OMNILITE_HAVE_OPENCV
  if (rgb.size(0) == size && rgb.size(1) == size) return rgb.contiguous();
  auto c = rgb.contiguous();
  cv::Mat m(static_cast<int>(c.size(0)), static_cast<int>(c.size(1)), CV_8UC3, c.data_ptr<uint8_t>()), resized;
  const int s = static_cast<int>(size);
  cv::resize(m, resized, cv::Size(s, s), 0, 0, m.rows > s ? cv::INTER_AREA : cv::INTER_LINEAR);
  return torch::from_blob(resized.data, {size, size, 3}, torch::kUInt8).clone();
#else
  return resize_rgb(rgb, size);
#endif
}

torch::Tensor decode_native(const std::string& path);

// Accumulates images while sources are read: decoded ones (in memory), and streamed ones (ImageShards: image files
// of lists read with opts.stream, tar shards), whose samples come after the decoded ones.
struct Builder {
  const ImageLoadOptions& opts;
  std::vector<torch::Tensor> images;
  std::vector<std::vector<std::string>> captions, streamed_captions;
  std::vector<int64_t> labels, streamed_labels;
  std::shared_ptr<ImageShards> streamed;  // created with the first streamed sample
  int64_t skipped = 0;

  int64_t count() const { return static_cast<int64_t>(images.size() + streamed_captions.size()); }
  bool full() const { return opts.max_images > 0 && count() >= opts.max_images; }
  void add(torch::Tensor img, std::vector<std::string> caps, int64_t label) {
    images.push_back(std::move(img));
    captions.push_back(std::move(caps));
    labels.push_back(label);
  }
  ImageShards& stream() {
    if (!streamed) streamed = std::make_shared<ImageShards>(opts.size);
    return *streamed;
  }
  // An image file of a list (`where` names the entry): decoded now, or with opts.stream checked to exist and be
  // non-empty, and decoded when gathered.
  void add_file(const std::string& where, const std::string& path, std::vector<std::string> caps, int64_t label) {
    try {
      if (!opts.stream) return add(sized(decode_native(path), opts.size), std::move(caps), label);
      std::error_code ec;
      const auto n = fs::file_size(path, ec);
      if (ec) throw std::runtime_error("image \"" + path + "\": cannot open (missing?)");
      if (n == 0) throw std::runtime_error("image \"" + path + "\": the file is empty");
      stream().add_file(path);
      streamed_captions.push_back(std::move(caps));
      streamed_labels.push_back(label);
    } catch (const std::exception& e) {
      skip(where, e.what());
    }
  }
  void skip(const std::string& where, const std::string& why) {
    ++skipped;
    log::warn("image-caption data: skipped " + where + ": " + why);
  }
  std::string resolve(const std::string& list_file, const std::string& image) const {
    if (fs::path(image).is_absolute()) return image;
    const fs::path root = opts.image_root.empty() ? fs::path(list_file).parent_path() : fs::path(opts.image_root);
    return (root / image).string();
  }
};

void read_idx_source(const std::string& prefix, Builder& b) {
  auto images = read_idx(prefix + "-images-idx3-ubyte");
  auto labels = read_idx(prefix + "-labels-idx1-ubyte");
  if (images.dim() != 3 || labels.dim() != 1 || images.size(0) != labels.size(0))
    throw std::runtime_error("IDX source \"" + prefix + "\": " + std::to_string(images.size(0)) + " images but " +
                             std::to_string(labels.size(0)) + " labels; hint: the two files must belong together");
  const int64_t n = images.size(0), h = images.size(1), w = images.size(2);
  auto lab = labels.to(torch::kInt64);
  for (int64_t i = 0; i < n && !b.full(); ++i) {
    const int64_t label = lab[i].item<int64_t>();
    if (label < 0 || label >= static_cast<int64_t>(fashion_mnist_classes().size())) {
      b.skip(prefix + "-labels-idx1-ubyte item " + std::to_string(i), "label " + std::to_string(label) + " is not a class");
      continue;
    }
    std::vector<std::string> caps;
    for (int64_t v = 0; v < fashion_caption_templates(); ++v) caps.push_back(fashion_caption(label, v));
    b.add(sized(images[i].unsqueeze(2).expand({h, w, 3}), b.opts.size), std::move(caps), label);
  }
}

// Reads and decodes one file to [H, W, 3] uint8 RGB at its own size: PNM files directly, anything else through
// OpenCV; throws naming the file and the problem.
torch::Tensor decode_native(const std::string& path) {
  if (is_pnm_path(path)) return read_pnm(path);
  return decode_image_bytes(read_bytes(path), "image \"" + path + "\"");
}

void read_jsonl_source(const std::string& path, Builder& b) {
  std::ifstream f(path);
  if (!f) throw std::runtime_error("image-caption list \"" + path + "\": cannot open");
  std::string line;
  for (int64_t no = 1; !b.full() && std::getline(f, line); ++no) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const std::string where = path + ":" + std::to_string(no);
    auto j = json::parse(line, nullptr, false);
    if (!j.is_object() || !j.contains("image") || !j["image"].is_string() || !j.contains("text") ||
        !j["text"].is_string()) {
      b.skip(where, "expected a JSON object {\"image\": path, \"text\": caption}");
      continue;
    }
    const int64_t label = j.contains("label") && j["label"].is_number_integer() ? j["label"].get<int64_t>() : -1;
    b.add_file(where, b.resolve(path, j["image"].get<std::string>()), {j["text"].get<std::string>()}, label);
  }
}

void read_coco_source(const std::string& path, Builder& b) {
  std::ifstream f(path);
  if (!f) throw std::runtime_error("COCO captions \"" + path + "\": cannot open");
  auto j = json::parse(f, nullptr, false);
  if (!j.is_object() || !j.contains("images") || !j["images"].is_array() || !j.contains("annotations") ||
      !j["annotations"].is_array())
    throw std::runtime_error("COCO captions \"" + path + "\": expected {\"images\": [...], \"annotations\": [...]}");
  std::map<int64_t, std::vector<std::string>> caps;
  for (const auto& a : j["annotations"]) {
    if (a.contains("image_id") && a["image_id"].is_number_integer() && a.contains("caption") && a["caption"].is_string())
      caps[a["image_id"].get<int64_t>()].push_back(a["caption"].get<std::string>());
    else
      b.skip(path + " annotation", "expected {\"image_id\": int, \"caption\": str}, got " + a.dump().substr(0, 80));
  }
  int64_t k = 0;
  for (const auto& im : j["images"]) {
    if (b.full()) break;
    const std::string where = path + " images[" + std::to_string(k++) + "]";
    if (!im.contains("id") || !im["id"].is_number_integer() || !im.contains("file_name") || !im["file_name"].is_string()) {
      b.skip(where, "expected {\"id\": int, \"file_name\": str}");
      continue;
    }
    auto it = caps.find(im["id"].get<int64_t>());
    if (it == caps.end()) continue;  // an image without captions teaches nothing here
    b.add_file(where, b.resolve(path, im["file_name"].get<std::string>()), it->second, -1);
  }
}

}  // namespace

torch::Tensor decode_image_bytes(const std::vector<uint8_t>& bytes, const std::string& where) {
  if (bytes.empty()) throw std::runtime_error(where + ": the file is empty");
#if OMNILITE_HAVE_OPENCV
  const bool jpeg = bytes.size() >= 2 && bytes[0] == 0xFF && bytes[1] == 0xD8;
  const bool png = bytes.size() >= 8 && bytes[0] == 0x89 && bytes[1] == 'P' && bytes[2] == 'N' && bytes[3] == 'G';
  if (jpeg) {  // a complete JPEG ends with the end-of-image marker FF D9 (trailing zero padding allowed)
    size_t end = bytes.size();
    while (end > 2 && bytes[end - 1] == 0) --end;
    if (end < 4 || bytes[end - 2] != 0xFF || bytes[end - 1] != 0xD9)
      throw std::runtime_error(where + ": truncated JPEG (no end-of-image marker)");
  }
  if (png) {  // a complete PNG ends with the IEND chunk
    static const uint8_t iend[] = {'I', 'E', 'N', 'D'};
    if (bytes.size() < 12 || !std::equal(iend, iend + 4, bytes.end() - 8))
      throw std::runtime_error(where + ": truncated PNG (no IEND chunk)");
  }
  cv::Mat m = cv::imdecode(bytes, cv::IMREAD_COLOR);
  if (m.empty() || m.depth() != CV_8U)
    throw std::runtime_error(where + ": OpenCV cannot decode it (" + std::to_string(bytes.size()) +
                             " bytes); hint: use JPEG or PNG files");
  cv::Mat rgb;
  cv::cvtColor(m, rgb, cv::COLOR_BGR2RGB);
  return torch::from_blob(rgb.data, {rgb.rows, rgb.cols, 3}, torch::kUInt8).clone();
#else
  throw std::runtime_error(where + ": this build has no OpenCV (OMNILITE_WITH_OPENCV=OFF), so only PGM/PPM image "
                           "files are read; hint: convert the images to .ppm files or rebuild with OpenCV");
#endif
}

torch::Tensor resize_image(const torch::Tensor& rgb, int64_t size) { return sized(rgb, size); }

std::vector<uint8_t> encode_png(const torch::Tensor& rgb) {
  TORCH_CHECK(rgb.dim() == 3 && rgb.size(2) == 3 && rgb.scalar_type() == torch::kUInt8,
              "encode_png: expected [H, W, 3] uint8, got ", rgb.sizes());
#if OMNILITE_HAVE_OPENCV
  auto bgr = rgb.flip(2).contiguous();
  cv::Mat m(static_cast<int>(bgr.size(0)), static_cast<int>(bgr.size(1)), CV_8UC3, bgr.data_ptr<uint8_t>());
  std::vector<uint8_t> out;
  if (!cv::imencode(".png", m, out)) throw std::runtime_error("encode_png: OpenCV cannot encode the image");
  return out;
#else
  throw std::runtime_error("PNG encoding needs OpenCV, and this build has none (OMNILITE_WITH_OPENCV=OFF); hint: "
                           "write PPM pictures (name the file .ppm)");
#endif
}

torch::Tensor ImageCaptionSet::gather(const torch::Tensor& index, int64_t* replaced) const {
  const int64_t m = in_memory();
  if (!shards) return index.defined() ? images.index_select(0, index) : images;
  std::vector<int64_t> idx;
  if (index.defined()) {
    auto ix = index.to(torch::kInt64).contiguous();
    idx.assign(ix.data_ptr<int64_t>(), ix.data_ptr<int64_t>() + ix.numel());
  } else {
    for (int64_t i = 0; i < size(); ++i) idx.push_back(i);
  }
  // the in-memory rows in one gather, the streamed ones decoded; then put back in the asked order
  std::vector<int64_t> mem, streamed, mem_pos, streamed_pos;
  for (size_t p = 0; p < idx.size(); ++p) {
    TORCH_CHECK(idx[p] >= 0 && idx[p] < size(), "ImageCaptionSet::gather: sample ", idx[p], " of ", size());
    if (idx[p] < m) mem.push_back(idx[p]), mem_pos.push_back(static_cast<int64_t>(p));
    else streamed.push_back(idx[p] - m), streamed_pos.push_back(static_cast<int64_t>(p));
  }
  if (mem.empty()) return shards->gather(streamed, replaced);
  auto a = images.index_select(0, torch::tensor(mem, torch::kInt64));
  if (streamed.empty()) return a;
  auto b = shards->gather(streamed, replaced);
  auto out = torch::empty({static_cast<int64_t>(idx.size()), a.size(1), a.size(2), 3}, torch::kUInt8);
  out.index_copy_(0, torch::tensor(mem_pos, torch::kInt64), a);
  out.index_copy_(0, torch::tensor(streamed_pos, torch::kInt64), b);
  return out;
}

torch::Tensor decode_image_file(const std::string& path) { return decode_native(path); }

torch::Tensor load_image(const std::string& path, int64_t size) { return sized(decode_native(path), size); }

bool have_opencv() { return OMNILITE_HAVE_OPENCV != 0; }
const char* picture_extension() { return have_opencv() ? ".png" : ".ppm"; }

ImageCaptionSet read_image_captions(const std::vector<std::string>& sources, const ImageLoadOptions& opts) {
  Builder b{opts, {}, {}, {}, {}, {}, nullptr, 0};
  std::vector<std::string> tars;  // streamed sources, indexed after the in-memory ones (their samples come last)
  for (const auto& src : sources) {
    if (b.full()) break;
    if (is_image_shard_source(src)) tars.push_back(src);
    else if (fs::exists(src + "-images-idx3-ubyte")) read_idx_source(src, b);
    else if (fs::path(src).extension() == ".jsonl") read_jsonl_source(src, b);
    else if (fs::path(src).extension() == ".json") read_coco_source(src, b);
    else
      throw std::runtime_error("image-caption source \"" + src + "\": neither an IDX prefix (" + src +
                               "-images-idx3-ubyte is missing), a .jsonl list, a COCO captions .json nor tar shards; hint: run "
                               "scripts/prepare_data.sh for the embedded Fashion-MNIST");
  }
  ImageCaptionSet set;
  if (!tars.empty() && !b.full()) {
    // the streamed samples may reach max_images - (decoded ones)
    const int64_t left = opts.max_images > 0 ? opts.max_images - static_cast<int64_t>(b.images.size()) : 0;
    b.stream().add_shards(tars, left, b.streamed_captions, b.streamed_labels);
    b.skipped += b.streamed->skipped();
  }
  if (b.streamed && b.streamed->size() > 0) set.shards = b.streamed;
  set.skipped = b.skipped;
  if (b.skipped > 0) log::warn(log::format("image-caption data: %lld entries skipped", static_cast<long long>(b.skipped)));
  if (b.count() == 0) return set;
  if (!b.images.empty()) set.images = torch::stack(b.images);
  set.captions = std::move(b.captions);
  set.captions.insert(set.captions.end(), std::make_move_iterator(b.streamed_captions.begin()),
                      std::make_move_iterator(b.streamed_captions.end()));
  set.labels = torch::tensor(b.labels, torch::kInt64);
  if (!b.streamed_labels.empty())
    set.labels = torch::cat({set.labels, torch::tensor(b.streamed_labels, torch::kInt64)});
  return set;
}

ImageLoadOptions image_load_options(const DataOptions& data, int64_t size) {
  ImageLoadOptions io;
  io.size = size;
  io.image_root = data.image_root;
  io.max_images = data.max_images;
  return io;
}

ImageCaptionSet read_training_images(const DataOptions& data, int64_t size) {
  auto io = image_load_options(data, size);
  io.stream = true;
  auto set = read_image_captions(data.image_train, io);
  if (set.size() == 0)
    throw std::runtime_error("data.image_train: no usable images in the given sources; hint: run "
                             "scripts/prepare_data.sh");
  return set;
}

// [N, S, S, 3] uint8 -> [n, channels, size, size] float in [-1, 1]
torch::Tensor to_model_images(const torch::Tensor& images, int64_t size, int64_t channels, const torch::Tensor& index) {
  auto x = (index.defined() ? images.index_select(0, index) : images).permute({0, 3, 1, 2}).to(torch::kFloat32);
  x = x / 127.5 - 1.0;  // [n, 3, S, S]
  if (x.size(2) != size || x.size(3) != size)
    x = torch::nn::functional::interpolate(x, torch::nn::functional::InterpolateFuncOptions()
                                                  .size(std::vector<int64_t>{size, size})
                                                  .mode(torch::kBilinear)
                                                  .align_corners(false));
  if (channels == 1) return x.mean(1, true);
  TORCH_CHECK(channels == 3, "to_model_images: channels must be 1 or 3, got ", channels);
  return x.contiguous();
}

void write_image_grid(const torch::Tensor& images, int64_t cols, const std::string& path) {
  TORCH_CHECK(images.dim() == 4 && images.size(0) > 0 && cols > 0, "write_image_grid: expected [N, C, H, W], got ",
              images.sizes());
  const int64_t n = images.size(0), c = images.size(1), h = images.size(2), w = images.size(3), pad = 2;
  const int64_t rows = (n + cols - 1) / cols;
  auto u8 = ((images.detach().to(torch::kCPU, torch::kFloat32).clamp(-1, 1) + 1.0) * 127.5).round().to(torch::kUInt8);
  if (c == 1) u8 = u8.expand({n, 3, h, w});
  auto grid = torch::full({rows * (h + pad) + pad, cols * (w + pad) + pad, 3}, 255, torch::kUInt8);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = i / cols, q = i % cols;
    grid.narrow(0, pad + r * (h + pad), h).narrow(1, pad + q * (w + pad), w).copy_(u8[i].permute({1, 2, 0}));
  }
  write_image_file(grid, path);
}

void write_image_file(const torch::Tensor& rgb, const std::string& path) {
  TORCH_CHECK(rgb.dim() == 3 && rgb.size(2) == 3 && rgb.scalar_type() == torch::kUInt8,
              "write_image_file: expected [H, W, 3] uint8, got ", rgb.sizes());
  if (is_pnm_path(path)) {
    write_ppm(path, rgb.contiguous());
    return;
  }
  const auto png = encode_png(rgb);
  AtomicFile f(path);
  f.write(png.data(), png.size());
  f.commit();
}

}  // namespace omnilite
