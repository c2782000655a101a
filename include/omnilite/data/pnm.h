// Netpbm images (PGM P2/P5, PPM P3/P6, 8-bit), read and written without any library, and a torch-only resize: the
// image path of a build without OpenCV (OMNILITE_WITH_OPENCV=OFF), which reads Fashion-MNIST IDX files and PNM
// images and writes PPM pictures. Builds with OpenCV read PNM files through here too.
#pragma once

#include <string>

#include <torch/torch.h>

namespace omnilite {

// True for the .pgm, .ppm and .pnm extensions (any case).
bool is_pnm_path(const std::string& path);
// -> [H, W, 3] uint8 RGB (gray replicated). Throws naming the file for a missing, truncated or malformed one, or a
// maxval above 255.
torch::Tensor read_pnm(const std::string& path);
// [H, W, 3] uint8 RGB -> binary PPM (P6), written atomically (temporary file + rename).
void write_ppm(const std::string& path, const torch::Tensor& rgb);
// [H, W, 3] uint8 -> [size, size, 3] uint8: area averaging when shrinking, bilinear when enlarging.
torch::Tensor resize_rgb(const torch::Tensor& rgb, int64_t size);

}  // namespace omnilite
