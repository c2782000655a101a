#include "omnilite/modules/patch_embed.h"

#include "omnilite/modules/linear.h"

namespace omnilite {

PatchEmbedImpl::PatchEmbedImpl(const VisionOptions& o) : opts(o) {
  proj = register_module("proj", torch::nn::Conv2d(torch::nn::Conv2dOptions(o.in_channels, o.width, o.patch_size)
                                                       .stride(o.patch_size)));
  const int64_t g = o.image_size / o.patch_size, c = o.class_token ? 1 : 0;
  pos_embed = register_parameter("pos_embed", torch::empty({1, c + g * g, o.width}).normal_(0.0, kInitStd));
  if (o.class_token) cls_token = register_parameter("cls_token", torch::empty({1, 1, o.width}).normal_(0.0, kInitStd));
}

// -> [1, gh*gw, width]
torch::Tensor PatchEmbedImpl::positions(int64_t gh, int64_t gw) const {
  const int64_t g = opts.image_size / opts.patch_size;
  const auto patches = opts.class_token ? pos_embed.narrow(1, 1, g * g) : pos_embed;
  if (gh == g && gw == g) return patches;
  auto grid = patches.reshape({1, g, g, opts.width}).permute({0, 3, 1, 2});  // [1, width, g, g]
  auto resized = torch::nn::functional::interpolate(
      grid, torch::nn::functional::InterpolateFuncOptions()
                .size(std::vector<int64_t>{gh, gw})
                .mode(torch::kBicubic)
                .align_corners(false));                                   // [1, width, gh, gw]
  return resized.permute({0, 2, 3, 1}).reshape({1, gh * gw, opts.width});
}

// images: [N, C, H, W] -> [N, c + gh*gw, width]
torch::Tensor PatchEmbedImpl::forward(const torch::Tensor& images) {
  TORCH_CHECK(images.dim() == 4 && images.size(1) == opts.in_channels, "PatchEmbed: expected images [N, ",
              opts.in_channels, ", H, W], got ", images.sizes());
  TORCH_CHECK(images.size(2) % opts.patch_size == 0 && images.size(3) % opts.patch_size == 0,
              "PatchEmbed: image size ", images.size(2), "x", images.size(3), " is not a multiple of patch_size ",
              opts.patch_size, "; hint: resize images to model.vision.image_size = ", opts.image_size);
  auto x = proj->forward(images);                       // [N, width, gh, gw]
  const int64_t gh = x.size(2), gw = x.size(3);
  x = x.flatten(2).transpose(1, 2);                     // [N, gh*gw, width]
  x = x + positions(gh, gw).to(x.scalar_type());
  if (!opts.class_token) return x;
  auto cls = (cls_token + pos_embed.narrow(1, 0, 1)).to(x.scalar_type()).expand({x.size(0), 1, opts.width});
  return torch::cat({cls, x}, 1);                       // [N, 1 + gh*gw, width]
}

}  // namespace omnilite
