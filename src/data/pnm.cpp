#include "omnilite/data/pnm.h"

#include <algorithm>
#include <cctype>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <vector>

#include "omnilite/files.h"

namespace omnilite {

bool is_pnm_path(const std::string& path) {
  std::string ext = std::filesystem::path(path).extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return std::tolower(c); });
  return ext == ".pgm" || ext == ".ppm" || ext == ".pnm";
}

torch::Tensor read_pnm(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("image \"" + path + "\": cannot open (missing?)");
  const std::vector<uint8_t> b(std::istreambuf_iterator<char>(f), {});
  size_t pos = 0;
  auto fail = [&](const std::string& why) -> void {
    throw std::runtime_error("image \"" + path + "\": " + why + "; hint: 8-bit PGM (P2/P5) or PPM (P3/P6) expected");
  };
  // Header fields are separated by whitespace; '#' starts a comment up to the end of the line.
  auto skip_space = [&] {
    while (pos < b.size()) {
      if (b[pos] == '#') {
        while (pos < b.size() && b[pos] != '\n') ++pos;
      } else if (std::isspace(b[pos])) {
        ++pos;
      } else {
        break;
      }
    }
  };
  auto number = [&](const char* what) {
    skip_space();
    if (pos >= b.size() || !std::isdigit(b[pos])) fail(std::string("no ") + what + " in the header (truncated?)");
    long v = 0;
    while (pos < b.size() && std::isdigit(b[pos]) && v < 1'000'000'000) v = v * 10 + (b[pos++] - '0');
    return v;
  };
  if (b.size() < 2 || b[0] != 'P' || (b[1] != '2' && b[1] != '3' && b[1] != '5' && b[1] != '6'))
    fail("not a PNM file (no P2/P3/P5/P6 magic)");
  const char kind = static_cast<char>(b[1]);
  pos = 2;
  const long w = number("width"), h = number("height"), maxval = number("maxval");
  if (w <= 0 || h <= 0 || w > 65536 || h > 65536) fail("size " + std::to_string(w) + " x " + std::to_string(h));
  if (maxval <= 0 || maxval > 255) fail("maxval " + std::to_string(maxval) + " (only 8-bit images are read)");
  const int64_t channels = (kind == '3' || kind == '6') ? 3 : 1, n = static_cast<int64_t>(w) * h * channels;
  const bool binary = kind == '5' || kind == '6';
  if (binary) ++pos;  // exactly one whitespace byte after maxval
  // The file must hold the pixels before they are allocated: n bytes (binary), or at least one byte per value.
  const size_t left = b.size() - std::min(pos, b.size());
  if (left < static_cast<size_t>(n))
    fail("truncated: " + std::to_string(left) + " of " + std::to_string(n) + " pixel bytes (" + std::to_string(w) +
         " x " + std::to_string(h) + (binary ? ")" : ", at least one byte per value)"));
  auto out = torch::empty({h, w, channels}, torch::kUInt8);
  uint8_t* o = out.data_ptr<uint8_t>();
  if (binary) {
    std::copy(b.begin() + static_cast<std::ptrdiff_t>(pos), b.begin() + static_cast<std::ptrdiff_t>(pos + n), o);
  } else {
    for (int64_t i = 0; i < n; ++i) {
      const long v = number("pixel value");
      if (v > maxval) fail("pixel value " + std::to_string(v) + " above maxval " + std::to_string(maxval));
      o[i] = static_cast<uint8_t>(v);
    }
  }
  if (maxval != 255) out = (out.to(torch::kFloat32) * (255.0 / static_cast<double>(maxval))).round().to(torch::kUInt8);
  return channels == 1 ? out.expand({h, w, 3}).contiguous() : out;
}

void write_ppm(const std::string& path, const torch::Tensor& rgb) {
  TORCH_CHECK(rgb.dim() == 3 && rgb.size(2) == 3 && rgb.scalar_type() == torch::kUInt8,
              "write_ppm: expected [H, W, 3] uint8, got ", rgb.sizes(), " ", rgb.scalar_type());
  auto c = rgb.cpu().contiguous();
  AtomicFile f(path);
  f.write("P6\n" + std::to_string(c.size(1)) + " " + std::to_string(c.size(0)) + "\n255\n");
  f.write(c.data_ptr<uint8_t>(), static_cast<size_t>(c.numel()));
  f.commit();
}

torch::Tensor resize_rgb(const torch::Tensor& rgb, int64_t size) {
  if (rgb.size(0) == size && rgb.size(1) == size) return rgb.contiguous();
  auto x = rgb.permute({2, 0, 1}).unsqueeze(0).to(torch::kFloat32);  // [1, 3, H, W]
  namespace F = torch::nn::functional;
  const bool shrink = rgb.size(0) > size || rgb.size(1) > size;
  auto y = shrink ? F::interpolate(x, F::InterpolateFuncOptions().size(std::vector<int64_t>{size, size}).mode(torch::kArea))
                  : F::interpolate(x, F::InterpolateFuncOptions()
                                          .size(std::vector<int64_t>{size, size})
                                          .mode(torch::kBilinear)
                                          .align_corners(false));
  return y.squeeze(0).permute({1, 2, 0}).round().clamp(0, 255).to(torch::kUInt8).contiguous();
}

}  // namespace omnilite
