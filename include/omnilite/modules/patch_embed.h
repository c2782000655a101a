// Vision patch embedding (card layer 1): Conv2d(3 -> 1024, kernel 14, stride 14) + learned position embedding.
// The position table is built for image_size; other sizes interpolate it bicubically (as ViT fine-tuning does).
// With vision.class_token (CLIP) a learned class embedding comes first and takes row 0 of the table.
#pragma once

#include <torch/torch.h>

#include "omnilite/config.h"

namespace omnilite {

struct PatchEmbedImpl : torch::nn::Module {
  explicit PatchEmbedImpl(const VisionOptions& opts);
  // images: [N, C, H, W] (H, W multiples of patch_size) -> [N, c + (H/p)*(W/p), width], c = 1 with a class token
  torch::Tensor forward(const torch::Tensor& images);
  // Position embeddings of the patches of a gh x gw grid: [1, gh*gw, width]
  torch::Tensor positions(int64_t gh, int64_t gw) const;

  VisionOptions opts;
  torch::nn::Conv2d proj{nullptr};  // C -> width, kernel = stride = patch_size
  torch::Tensor pos_embed;          // [1, c + g*g, width], g = image_size / patch_size (row 0: the class token's)
  torch::Tensor cls_token;          // [1, 1, width] with vision.class_token, else undefined
};
TORCH_MODULE(PatchEmbed);

}  // namespace omnilite
