// Image-caption data: Fashion-MNIST IDX files, .jsonl image-caption lists, COCO captions JSON and WebDataset tar
// shards (image_shards.h).
//
// Every source becomes images (uint8, resized to one square size when decoded: at load, or for streamed sources when
// gathered), one or more captions per image and an optional class label. Images are decoded with OpenCV. A missing,
// truncated or undecodable image and a malformed JSON line are skipped with a warning naming the file and the line;
// the count is returned (streamed images that do not decode are replaced when gathered). The model sees images as
// float [N, C, S, S] in [-1, 1] (to_model_images).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "omnilite/config.h"
#include "omnilite/data/image_shards.h"

namespace omnilite {

struct ImageLoadOptions {
  int64_t size = 32;          // square side images are resized to when loaded
  std::string image_root;     // folder of relative image paths ("" = the folder of the list file)
  int64_t max_images = 0;     // stop after this many images over all sources (0 = all)
  bool stream = false;        // .jsonl / COCO lists: check that each image file exists and decode it when gathered
                              // (training's loader threads), instead of decoding every image here
};

struct ImageCaptionSet {
  torch::Tensor images;                           // [M, S, S, 3] uint8 of the in-memory sources (grayscale
                                                  // replicated to 3 channels), samples 0 .. M-1
  std::shared_ptr<const ImageShards> shards;      // samples M .. N-1, streamed from tar shards and image files
                                                  // (null: none)
  std::vector<std::vector<std::string>> captions; // N lists of captions (one is drawn per use)
  torch::Tensor labels;                           // [N] int64 class label, -1 where unknown
  int64_t skipped = 0;                            // images or lines skipped with a warning
  int64_t in_memory() const { return images.defined() ? images.size(0) : 0; }
  int64_t size() const { return in_memory() + (shards ? shards->size() : 0); }
  // The images of samples `index` (all when undefined) as [n, S, S, 3] uint8: rows of `images` or decoded from the
  // shards (an undecodable one replaced by the next, counted in *replaced). Thread-safe.
  torch::Tensor gather(const torch::Tensor& index = {}, int64_t* replaced = nullptr) const;
};

// Reads every source (see DataOptions::image_train for the kinds). Throws naming a source that cannot be opened or
// whose kind is unknown; bad entries inside a source are skipped and counted.
ImageCaptionSet read_image_captions(const std::vector<std::string>& sources, const ImageLoadOptions& opts);

// The load options a config asks for: images resized to `size`, data.image_root, data.max_images.
ImageLoadOptions image_load_options(const DataOptions& data, int64_t size);
// The training images of a config (data.image_train) at `size`, streamed (ImageLoadOptions::stream); throws before
// step 1 when none is usable.
ImageCaptionSet read_training_images(const DataOptions& data, int64_t size);

// Decodes one image file with OpenCV into [H, W, 3] uint8 RGB. Throws naming the file when it is missing, empty,
// a truncated JPEG/PNG or undecodable.
torch::Tensor decode_image_file(const std::string& path);
// Decodes an encoded image held in memory (PNG, JPEG, PNM, ... through OpenCV) into [H, W, 3] uint8 RGB; throws
// naming `where` when it is empty, truncated or undecodable.
torch::Tensor decode_image_bytes(const std::vector<uint8_t>& bytes, const std::string& where);
// [H, W, 3] uint8 -> [size, size, 3] as the readers resize (area shrinking, bilinear enlarging).
torch::Tensor resize_image(const torch::Tensor& rgb, int64_t size);
// [H, W, 3] uint8 RGB -> the bytes of a PNG file (needs OpenCV).
std::vector<uint8_t> encode_png(const torch::Tensor& rgb);
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
