// Image-caption data: Fashion-MNIST IDX files, .jsonl image-caption lists and COCO captions JSON.
//
// Every source becomes images (uint8, resized to one square size at load), one or more captions per image and an
// optional class label. Images are decoded with OpenCV. A missing, truncated or undecodable image and a malformed
// JSON line are skipped with a warning naming the file and the line; the count is returned. The model sees images
// as float [N, C, S, S] in [-1, 1] (to_model_images).
#pragma once

#include <string>
#include <vector>

#include <torch/torch.h>

#include "omnilite/config.h"

namespace omnilite {

struct ImageLoadOptions {
  int64_t size = 32;          // square side images are resized to when loaded
  std::string image_root;     // folder of relative image paths ("" = the folder of the list file)
  int64_t max_images = 0;     // stop after this many images over all sources (0 = all)
};

struct ImageCaptionSet {
  torch::Tensor images;                           // [N, S, S, 3] uint8 (grayscale replicated to 3 channels)
  std::vector<std::vector<std::string>> captions; // N lists of captions (one is drawn per use)
  torch::Tensor labels;                           // [N] int64 class label, -1 where unknown
  int64_t skipped = 0;                            // images or lines skipped with a warning
  int64_t size() const { return images.defined() ? images.size(0) : 0; }
};

// Reads every source (see DataOptions::image_train for the kinds). Throws naming a source that cannot be opened or
// whose kind is unknown; bad entries inside a source are skipped and counted.
ImageCaptionSet read_image_captions(const std::vector<std::string>& sources, const ImageLoadOptions& opts);

// The load options a config asks for: images resized to `size`, data.image_root, data.max_images.
ImageLoadOptions image_load_options(const DataOptions& data, int64_t size);
// The training images of a config (data.image_train) at `size`; throws before step 1 when none is usable.
ImageCaptionSet read_training_images(const DataOptions& data, int64_t size);

// Decodes one image file with OpenCV into [H, W, 3] uint8 RGB. Throws naming the file when it is missing, empty,
// a truncated JPEG/PNG or undecodable.
torch::Tensor decode_image_file(const std::string& path);
// decode_image_file resized to [size, size, 3] uint8 as the readers resize (area shrinking, bilinear enlarging).
torch::Tensor load_image(const std::string& path, int64_t size);

// images [N, S, S, 3] uint8 (rows `index`, all when undefined) -> [n, channels, size, size] float in [-1, 1],
// bilinearly resized when size != S; channels 1 averages RGB.
torch::Tensor to_model_images(const torch::Tensor& images, int64_t size, int64_t channels,
                              const torch::Tensor& index = {});

// Writes [N, C, H, W] images in [-1, 1] as a grid with `cols` columns (atomically: temporary file + rename): PPM for a
// .ppm/.pgm/.pnm path, otherwise through OpenCV (PNG, JPEG, ...; an error naming the path in a build without it).
void write_image_grid(const torch::Tensor& images, int64_t cols, const std::string& path);
// Writes one [H, W, 3] uint8 RGB image as write_image_grid does (atomically; PPM or through OpenCV).
void write_image_file(const torch::Tensor& rgb, const std::string& path);

// Whether this build has OpenCV (CMake option OMNILITE_WITH_OPENCV): without it, images are read from Fashion-MNIST
// IDX and PGM/PPM files only, pictures are written as PPM and the drawn reports (plots, heatmaps) are skipped.
bool have_opencv();
// ".png" with OpenCV, ".ppm" without: the extension of the pictures eval writes.
const char* picture_extension();

}  // namespace omnilite
